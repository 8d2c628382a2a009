"""The run configuration: one typed object, built from Flower's run config (or the CLI, or a
preset file) and validated here, so a bad value fails once, early, in one line."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class RunConfig:
    # what to train
    method: str = "byol"
    strategy: str = "fedavg"
    encoder: str = "resnet10"
    proj_dim: int = 256
    hidden_dim: int = 1024
    # BYOL's target momentum at the start (cosine to 1). The paper's 0.99 suits hundreds of
    # epochs; runs of a few epochs' worth of steps learn more with a target that follows
    # faster (docs/results.md).
    byol_tau: float = 0.9
    predictor_lr_scale: float = 10.0  # BYOL's and SimSiam's predictor trains at this x lr
    simclr_temperature: float = 0.2
    moco_temperature: float = 0.2
    moco_queue_size: int = 4096
    moco_tau: float = 0.99
    # Weights the initial global model starts from: a torchvision state_dict (.pth/.pt), a
    # safetensors file or a fedssl export; read on the server only (common/checkpoint.py).
    init_weights: str = ""
    # data
    dataset: str = "synthetic"
    data_path: str = ""
    # Train on a seeded random subset of this many images (0: all), for quick experiments;
    # simulation and centralized runs only: a deployed site trains on all of its folder.
    max_images: int = 0
    eval_path: str = ""
    image_size: int = 32
    blur: bool = False
    crop_min_scale: float = 0.2
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    # federation
    num_rounds: int = 11
    # Half the clients a round, as Flower's app template: on one machine the global model
    # advances by about one client's local steps per round however many are averaged, so
    # fewer clients and more rounds learn more per CPU second (docs/results.md).
    fraction_train: float = 0.5
    min_train_clients: int = 2
    round_timeout: float = 600.0
    node_wait_timeout: float = 120.0
    max_update_norm_ratio: float = 10.0
    # aggregation rules beyond fedavg (server/strategies)
    fedu_threshold: float = 0.4
    fedema_tau: float = 0.7
    server_lr: float = 1.0
    server_momentum: float = 0.9
    fedadam_lr: float = 0.01
    fedadam_tau: float = 0.001
    # Byzantine-robust rules (server/strategies/robust.py): f, the hostile sites a rule must
    # withstand; FedTrimmedAvg's cut from each end; Multi-Krum's replies kept (0: all but f)
    num_malicious: int = 1
    trim_beta: float = 0.2
    multikrum_keep: int = 0
    resume: bool = False
    # local training
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    device: str = "auto"
    threads: int = 0
    amp: bool = True
    # evaluation and outputs
    eval_every: int = 1
    knn_k: int = 200
    knn_temperature: float = 0.1
    eval_bank_size: int = 10000
    eval_query_size: int = 10000
    probe: bool = True
    seed: int = 0
    out_dir: str = ""
    # What the training images are, in words, for the exported encoder's model card.
    data_description: str = ""
    # experiment tracking (server/tracking.py): copies of the metrics.jsonl rows
    tensorboard: bool = False
    mlflow: bool = False
    mlflow_uri: str = ""  # empty: an SQLite store in the run directory
    # privacy (docs/privacy.md): differential privacy on the shared arrays ...
    dp: str = "none"
    dp_clip_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_delta: float = 1e-5
    dp_target_quantile: float = 0.5
    dp_clip_norm_lr: float = 0.2
    dp_clipped_count_stddev: float = 1.0
    # ... and SecAgg+ (the server sees only the sum of the sampled clients' updates)
    secure_aggregation: bool = False
    secagg_shares: int = 0
    secagg_threshold: int = 2
    secagg_clip_range: float = 8.0
    secagg_quant_bits: int = 22
    secagg_max_weight: float = 10000.0
    # the dtype float arrays travel in, both ways (common/records.py); integer buffers and
    # the server's global model, checkpoints and exported encoder stay as they are
    transfer_dtype: str = "float32"
    # where clients keep their state between rounds (client/state_store.py): empty, Flower's
    # context.state in memory; a folder, one file per client (a site's node config
    # `state-dir` takes precedence)
    client_state_dir: str = ""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, ignore_unknown: bool = False) -> "RunConfig":
        """Build from hyphenated keys (Flower run config, presets, CLI); missing keys take
        their defaults. Raises ConfigError naming the first bad key."""
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                if ignore_unknown:
                    continue
                close = difflib.get_close_matches(key, config_keys(), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}; allowed: {', '.join(config_keys())}")
            kwargs[name] = _coerce(key, raw, _FIELDS[name].type)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_mapping(self) -> dict[str, Any]:
        """Hyphenated keys, Flower ConfigRecord-compatible values."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "RunConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name, rule in _RULES.items():
            problem = rule(getattr(self, name))
            if problem:
                key = name.replace("_", "-")
                raise ConfigError(f"{key}={getattr(self, name)!r} is invalid: {problem}")


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def config_keys() -> list[str]:
    return [name.replace("_", "-") for name in _FIELDS]


def defaults() -> dict[str, Any]:
    return RunConfig().to_mapping()


def _coerce(key: str, raw: Any, type_name: str) -> Any:
    """Accept the value's own type or its text (CLI, environment); nothing lossy."""
    want = _TYPES[type_name]
    if isinstance(raw, want) and not (want is int and isinstance(raw, bool)):
        return raw
    if want is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        text = raw.strip()
        if want is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        try:
            if want is int:
                return int(text)
            if want is float:
                return float(text)
        except ValueError:
            pass
    raise ConfigError(f"{key}={raw!r} is invalid: must be {_ARTICLE[type_name]}")


_ARTICLE = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _choice(options: Callable[[], Any]) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        allowed = list(options())
        return None if value in allowed else f"allowed: {', '.join(map(str, allowed))}"
    return rule


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _between(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], str | None]:
    def rule(v: float) -> str | None:
        ok = (low < v if low_open else low <= v) and v <= high
        bound = "(" if low_open else "["
        return None if ok else f"must be in {bound}{low}, {high}]"
    return rule


def _off_or_at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v == 0 or v >= low else f"must be 0 (off) or >= {low}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _device(v: str) -> str | None:
    if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return "allowed: auto, cpu, cuda, cuda:N, mps"


def _weights_path(v: str) -> str | None:
    # By its form only: clients validate the same config and need not hold the file.
    suffix = PurePath(v).suffix
    if not v or suffix in (".pth", ".pt", ".safetensors") or not suffix:
        return None
    return "must be empty, a .pth, .pt or .safetensors file, or a folder exported by fedssl"


def _method_names():
    from common.methods import METHODS
    return METHODS


def _encoder_names():
    from common.encoders import ENCODERS
    return ENCODERS


def _dataset_names():
    from common.datasets import SOURCES
    return SOURCES


def _transfer_dtypes():
    from common.records import TRANSFER_DTYPES
    return TRANSFER_DTYPES


def _partition_names():
    from common.partition import SCHEMES
    return SCHEMES


# The strategy name is checked where strategies live (server/strategies), with the same
# error type; common/ must not import server/.
_RULES: dict[str, Callable[[Any], str | None]] = {
    "method": _choice(_method_names),
    "encoder": _choice(_encoder_names),
    "proj_dim": _at_least(1),
    "hidden_dim": _at_least(1),
    "byol_tau": _between(0.0, 1.0),
    "predictor_lr_scale": _positive,
    "simclr_temperature": _positive,
    "moco_temperature": _positive,
    "moco_queue_size": _at_least(1),
    "moco_tau": _between(0.0, 1.0),
    "init_weights": _weights_path,
    "dataset": _choice(_dataset_names),
    "image_size": _at_least(8),
    "crop_min_scale": _between(0.0, 1.0, low_open=True),
    "partition": _choice(_partition_names),
    "alpha": _positive,
    "shards_per_client": _at_least(1),
    "num_rounds": _at_least(1),
    "fraction_train": _between(0.0, 1.0, low_open=True),
    "min_train_clients": _at_least(1),
    "round_timeout": _positive,
    "node_wait_timeout": _positive,
    "max_update_norm_ratio": _off_or_at_least(1.0),
    "fedu_threshold": _at_least(0.0),
    "fedema_tau": _positive,
    "server_lr": _positive,
    "server_momentum": _between(0.0, 1.0),
    "fedadam_lr": _positive,
    "fedadam_tau": _positive,
    "num_malicious": _at_least(0),
    "trim_beta": lambda v: None if 0.0 <= v < 0.5 else "must be in [0.0, 0.5)",
    "multikrum_keep": _at_least(0),
    "local_epochs": _at_least(1),
    "batch_size": _at_least(2),
    "lr": _positive,
    "momentum": _between(0.0, 1.0),
    "weight_decay": _at_least(0.0),
    "device": _device,
    "threads": _at_least(0),
    "eval_every": _at_least(1),
    "knn_k": _at_least(1),
    "knn_temperature": _positive,
    "max_images": _at_least(0),
    "eval_bank_size": _at_least(1),
    "eval_query_size": _at_least(1),
    "dp": _choice(lambda: ("none", "fixed", "adaptive")),
    "dp_clip_norm": _positive,
    "dp_noise_multiplier": _at_least(0.0),
    "dp_delta": _between(0.0, 1.0, low_open=True),
    "dp_target_quantile": _between(0.0, 1.0),
    "dp_clip_norm_lr": _positive,
    "dp_clipped_count_stddev": _positive,
    "secagg_shares": lambda v: None if v == 0 or v >= 3 else "must be 0 (every sampled client) or >= 3",
    "secagg_threshold": _at_least(2),
    "secagg_clip_range": _positive,
    "secagg_quant_bits": lambda v: None if 8 <= v <= 30 else "must be in [8, 30]",
    "secagg_max_weight": _positive,
    "transfer_dtype": _choice(_transfer_dtypes),
}
