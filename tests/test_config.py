"""One typed config: defaults equal pyproject's, bad values fail in one line naming the key."""
import tomllib
from pathlib import Path

import pytest

from fedssl.common.config import ConfigError, RunConfig, defaults

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_defaults():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["config"] == defaults()
    assert app["components"] == {"serverapp": "fedssl.server.app:app", "clientapp": "fedssl.client.app:app"}


def test_from_mapping_coerces_text_and_keeps_defaults():
    cfg = RunConfig.from_mapping({"num-rounds": "3", "lr": 1, "amp": "false", "method": "simsiam"})
    assert (cfg.num_rounds, cfg.lr, cfg.amp, cfg.method) == (3, 1.0, False, "simsiam")
    assert cfg.batch_size == RunConfig().batch_size
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize("values, fragment", [
    ({"method": "ijepa"}, "method='ijepa' is invalid: allowed: byol, simsiam"),
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


def test_each_key_declares_its_help_and_check_beside_it():
    import dataclasses

    fields = dataclasses.fields(RunConfig)
    for field in fields:
        help_text = field.metadata["help"]
        assert help_text and "\n" not in help_text and "|" not in help_text, field.name
    checked = {f.name: f.metadata["check"] for f in fields if f.metadata["check"]}
    assert checked["batch_size"](1) == "must be >= 2" and checked["batch_size"](2) is None
    # validate reads the checks from the fields: every checked key refuses a value its check
    # refuses, naming that key (the strategy is checked where strategies live)
    assert {f.name for f in fields} - set(checked) == {
        "strategy", "data_path", "eval_path", "blur", "resume", "amp", "probe", "seed", "out_dir",
        "data_description", "tensorboard", "mlflow", "mlflow_uri", "secure_aggregation", "client_state_dir",
        "dino_share_center", "swav_share_prototypes", "mae_share_decoder"}
    with pytest.raises(ConfigError, match=r"^trim-beta=0\.5 is invalid: must be in \[0\.0, 0\.5\)$"):
        RunConfig().replace(trim_beta=0.5)


def test_readme_table_of_keys_is_the_generated_one():
    from fedssl.common.config import keys_table

    table = keys_table()
    section = (ROOT / "README.md").read_text().split("\n## Run-config keys\n", 1)[1].split("\n## ", 1)[0]
    assert [line for line in section.splitlines() if line.startswith("|")] == table.splitlines()
    assert len(table.splitlines()) == 2 + len(defaults())
    assert "| `batch-size` | `64` | images per local training step |" in table.splitlines()


def test_cli_help_shows_what_each_flag_does_and_its_default():
    from fedssl.simulations.cli import parser

    for command in ("simulate", "centralized"):
        sub = parser()._subparsers._group_actions[0].choices[command]
        helps = {a.dest: a.help for a in sub._actions}
        assert helps["batch-size"] == "images per local training step (default: 64)"
        assert helps["dp"].startswith("differential privacy") and helps["dp"].endswith("(default: 'none')")
        assert all(helps[key] != f"(default: {default!r})" for key, default in defaults().items())
        sub.format_help()  # a help text with a bare % would fail here
