"""One typed config: defaults equal pyproject's, bad values fail in one line naming the key."""
import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig, defaults

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_defaults():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["config"] == defaults()
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_from_mapping_coerces_text_and_keeps_defaults():
    cfg = RunConfig.from_mapping({"num-rounds": "3", "lr": 1, "amp": "false", "method": "simsiam"})
    assert (cfg.num_rounds, cfg.lr, cfg.amp, cfg.method) == (3, 1.0, False, "simsiam")
    assert cfg.batch_size == RunConfig().batch_size
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize("values, fragment", [
    ({"method": "mae"}, "method='mae' is invalid: allowed: byol, simsiam"),
    ({"encoder": "vit"}, "encoder='vit' is invalid: allowed:"),
    ({"dataset": "imagenet"}, "dataset='imagenet' is invalid: allowed:"),
    ({"partition": "zipf"}, "partition='zipf' is invalid"),
    ({"batch-size": 1}, "batch-size=1 is invalid: must be >= 2"),
    ({"fraction-train": 0}, "fraction-train=0.0 is invalid: must be in (0.0, 1.0]"),
    ({"lr": -1}, "lr=-1.0 is invalid: must be > 0"),
    ({"num-rounds": "ten"}, "num-rounds='ten' is invalid: must be an integer"),
    ({"num-rounds": 2.5}, "num-rounds=2.5 is invalid: must be an integer"),
    ({"device": "tpu"}, "device='tpu' is invalid"),
    ({"max-update-norm-ratio": 0.5}, "max-update-norm-ratio=0.5 is invalid: must be 0 (off) or >= 1.0"),
    ({"resume": "maybe"}, "resume='maybe' is invalid: must be true or false"),
    ({"num-round": 3}, "unknown config key 'num-round' (did you mean 'num-rounds'?)"),
])
def test_bad_values_name_key_value_and_allowed(values, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
