"""The run configuration: one typed object, built from Flower's run config (or the CLI, or a
preset file) and validated here, so a bad value fails once, early, in one line. Each key is
declared once: its default, its one-line help (`fedssl simulate --help`, the README's table of
keys) and its check, side by side."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, Mapping

Check = Callable[[Any], "str | None"]  # what is wrong with a value, or None


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


def _choice(options: Callable[[], Any]) -> Check:
    def rule(value: Any) -> str | None:
        allowed = list(options())
        return None if value in allowed else f"allowed: {', '.join(map(str, allowed))}"
    return rule


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}"


def _between(low: float, high: float, *, low_open: bool = False) -> Check:
    def rule(v: float) -> str | None:
        ok = (low < v if low_open else low <= v) and v <= high
        bound = "(" if low_open else "["
        return None if ok else f"must be in {bound}{low}, {high}]"
    return rule


def _off_or_at_least(low: float) -> Check:
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


# The registries are read when a value is checked, not at import: they import torch.
def _method_names():
    from fedssl.common.methods import METHODS
    return METHODS


def _encoder_names():
    from fedssl.common.encoders import ENCODERS
    return ENCODERS


def _dataset_names():
    from fedssl.common.datasets import SOURCES
    return SOURCES


def _transfer_dtypes():
    from fedssl.common.records import TRANSFER_DTYPES
    return TRANSFER_DTYPES


def _partition_names():
    from fedssl.common.partition import SCHEMES
    return SCHEMES


# The simulation's hostile sites (simulations/attacks.py says what each sends). Named here,
# not read from there: common/ imports nothing of simulations/.
ATTACKS = ("none", "sign-flip", "scaled-flip", "random", "constant", "noise-images")


def setting(default: Any, help: str, check: Check | None = None) -> Any:
    """A RunConfig field: its default, what it does in one line, and its check (None: any
    value of the field's type)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


@dataclass(frozen=True)
class RunConfig:
    # what to train
    method: str = setting("simclr", "the self-supervised method: a module in common/methods/",
                          _choice(_method_names))
    # Checked where strategies live (server/strategies), with the same error type: common/
    # must not import server/.
    strategy: str = setting("fedavg", "the aggregation rule: a module in server/strategies/")
    encoder: str = setting("auto", "the encoder network (common/encoders.py); auto: the method's own "
                           "(vit_tiny for mae, else resnet10)", _choice(lambda: ("auto", *_encoder_names())))
    proj_dim: int = setting(256, "output size of the projector and predictor heads", _at_least(1))
    hidden_dim: int = setting(1024, "hidden width of the projector and predictor heads", _at_least(1))
    # The paper's 0.99 suits hundreds of epochs; runs of a few epochs' worth of steps learn
    # more with a target that follows faster (docs/results.md).
    byol_tau: float = setting(0.9, "BYOL's target momentum at the start; a cosine raises it to 1 by the "
                              "last step", _between(0.0, 1.0))
    predictor_lr_scale: float = setting(10.0, "BYOL's and SimSiam's predictor trains at this x lr", _positive)
    predictor_lr_schedule: str = setting("constant", "the predictor's rate: constant (scale x the base lr "
                                         "in every round) or cosine (scale x the round's lr, decaying with it)",
                                         _choice(lambda: ("cosine", "constant")))
    simclr_temperature: float = setting(0.2, "SimCLR's softmax temperature", _positive)
    moco_temperature: float = setting(0.2, "MoCo v2's softmax temperature", _positive)
    moco_queue_size: int = setting(4096, "MoCo v2's queue of negative keys, in embeddings", _at_least(1))
    moco_tau: float = setting(0.99, "MoCo v2's key-encoder momentum (constant)", _between(0.0, 1.0))
    dino_out_dim: int = setting(4096, "DINO's output dimension K, the last layer's outputs", _at_least(2))
    dino_tau: float = setting(0.996, "DINO's teacher momentum at the start; a cosine raises it to 1 by the "
                              "last step", _between(0.0, 1.0))
    dino_teacher_temperature: float = setting(0.04, "DINO's teacher softmax temperature (sharpening)",
                                              _positive)
    dino_student_temperature: float = setting(0.1, "DINO's student softmax temperature", _positive)
    dino_center_momentum: float = setting(0.9, "DINO's centre: EMA momentum toward the teacher's batch "
                                          "mean", _between(0.0, 1.0))
    dino_share_center: bool = setting(False, "DINO's centre is averaged by the server instead of kept "
                                      "at each site")
    swav_prototypes: int = setting(3000, "SwAV's number of prototypes K", _at_least(2))
    swav_temperature: float = setting(0.1, "SwAV's softmax temperature of the swapped prediction", _positive)
    swav_epsilon: float = setting(0.05, "SwAV's Sinkhorn-Knopp regularisation (smaller: sharper codes)",
                                  _positive)
    swav_sinkhorn_iterations: int = setting(3, "SwAV's Sinkhorn-Knopp iterations", _at_least(1))
    swav_share_prototypes: bool = setting(True, "SwAV's prototypes are averaged by the server instead of "
                                          "kept at each site")
    mae_mask_ratio: float = setting(0.75, "MAE's share of each image's patches hidden from the encoder",
                                    lambda v: None if 0.0 < v < 1.0 else "must be in (0.0, 1.0)")
    mae_decoder_dim: int = setting(128, "MAE's decoder width (heads 32 wide)",
                                   lambda v: None if v >= 32 and v % 32 == 0 else "must be a multiple of 32")
    mae_decoder_depth: int = setting(2, "MAE's decoder transformer blocks", _at_least(1))
    mae_share_decoder: bool = setting(True, "MAE's decoder is averaged by the server instead of kept at "
                                      "each site")
    init_weights: str = setting("", "weights the first global model starts from: a .pth/.pt state_dict, "
                                "a .safetensors file or a fedssl export (server only)", _weights_path)
    # data
    dataset: str = setting("synthetic", "where the training images come from (common/datasets.py)",
                           _choice(_dataset_names))
    data_path: str = setting("", "the training images: a folder (imagefolder), or where torchvision "
                             "keeps cifar10/cifar100")
    # A deployed site trains on all of its folder.
    max_images: int = setting(0, "train on a seeded random subset of this many images (0: all); "
                              "simulations and centralized runs only", _at_least(0))
    eval_path: str = setting("", "labelled folder the server evaluates on (train/ + test/, else a "
                             "seeded 80/20 split); empty: the training source")
    image_size: int = setting(32, "side, in pixels, images are resized to", _at_least(8))
    blur: bool = setting(False, "add Gaussian blur to the augmentation")
    crop_min_scale: float = setting(0.2, "smallest share of an image a random resized crop keeps",
                                    _between(0.0, 1.0, low_open=True))
    partition: str = setting("iid", "how the images are split over simulated clients "
                             "(common/partition.py)", _choice(_partition_names))
    alpha: float = setting(0.5, "Dirichlet concentration of the dirichlet partition (smaller: more "
                           "skewed)", _positive)
    shards_per_client: int = setting(2, "label-sorted shards each client gets in the shards partition",
                                     _at_least(1))
    # federation
    num_rounds: int = setting(11, "federated rounds (centralized: read as epochs of the schedule)",
                              _at_least(1))
    # A tenth of the clients a round, as McMahan et al.'s C = 0.1 (min-train-clients keeps at
    # least two): on one machine the global model advances by about one client's local steps
    # per round however many are averaged, so fewer clients and more rounds learn more per
    # CPU second (docs/results.md).
    fraction_train: float = setting(0.1, "share of the connected clients sampled to train each round",
                                    _between(0.0, 1.0, low_open=True))
    min_train_clients: int = setting(2, "fewest clients a round samples, and the valid replies it "
                                     "needs to aggregate", _at_least(1))
    round_timeout: float = setting(600.0, "seconds a round waits for replies; a client later than "
                                   "that is rejected", _positive)
    node_wait_timeout: float = setting(120.0, "seconds to wait for min-train-clients nodes to connect "
                                       "before the run ends", _positive)
    max_update_norm_ratio: float = setting(10.0, "reject a reply whose update norm per local step "
                                           "exceeds this x the round's lower median (0: off)", _off_or_at_least(1.0))
    # aggregation rules beyond fedavg (server/strategies)
    fedu_threshold: float = setting(0.4, "fedu: a client keeps its own predictor while its last "
                                    "training's divergence is at least this", _at_least(0.0))
    fedema_tau: float = setting(0.7, "fedema: the autoscaler; lambda = this / a client's first "
                                "divergence, decay = min(lambda x divergence, 1)", _positive)
    server_lr: float = setting(1.0, "fedavgm's server learning rate", _positive)
    server_momentum: float = setting(0.9, "fedavgm's server momentum, and fedadam's beta_1",
                                     _between(0.0, 1.0))
    fedadam_lr: float = setting(0.01, "fedadam's server learning rate (eta)", _positive)
    fedadam_tau: float = setting(0.001, "fedadam's adaptivity (tau)", _positive)
    # Byzantine-robust rules (server/strategies/robust.py)
    num_malicious: int = setting(1, "robust rules: f, the hostile sites a rule must withstand",
                                 _at_least(0))
    trim_beta: float = setting(0.2, "fedtrimmedavg: the share of replies cut from each end",
                               lambda v: None if 0.0 <= v < 0.5 else "must be in [0.0, 0.5)")
    multikrum_keep: int = setting(0, "multikrum: the replies kept (0: all but num-malicious)",
                                  _at_least(0))
    # Simulated hostile sites (simulations/attacks.py, docs/security.md): only `fedssl simulate`'s
    # ClientApp acts on these; a deployed SuperNode's ignores them.
    attack: str = setting("none", "simulation only: what the attacking sites send instead of their "
                          "honest update (docs/security.md)", _choice(lambda: ATTACKS))
    attack_sites: int = setting(1, "simulation only: how many sites attack: partitions 0 to this - 1",
                                _at_least(1))
    attack_scale: float = setting(0.9, "scaled-flip: the flipped update's norm as a share of screening's "
                                  "bound (max-update-norm-ratio x the site's honest norm)", _positive)
    resume: bool = setting(False, "continue the run in out-dir from its checkpoint")
    # local training
    local_epochs: int = setting(1, "passes a client makes over its images each round", _at_least(1))
    batch_size: int = setting(64, "images per local training step", _at_least(2))
    lr: float = setting(0.05, "local SGD learning rate of round 1; a cosine lowers it over the rounds",
                        _positive)
    momentum: float = setting(0.9, "local SGD momentum", _between(0.0, 1.0))
    weight_decay: float = setting(5e-4, "local SGD weight decay", _at_least(0.0))
    device: str = setting("auto", "train and evaluate on: auto (cuda > mps > cpu), cpu, cuda, cuda:N or "
                          "mps; a site's node config `device` wins", _device)
    threads: int = setting(0, "torch threads per process (0: the CPUs it was given)", _at_least(0))
    amp: bool = setting(True, "bf16 autocast where the hardware runs it natively (CUDA, CPUs with "
                        "AVX512-BF16 or AMX)")
    # evaluation and outputs
    eval_every: int = setting(1, "evaluate the global model every this many rounds (and after the "
                              "last)", _at_least(1))
    knn_k: int = setting(200, "neighbours the kNN monitor's vote counts", _at_least(1))
    knn_temperature: float = setting(0.1, "temperature of the kNN monitor's weighted vote", _positive)
    eval_bank_size: int = setting(2000, "most labelled images in the kNN bank (a seeded sample)",
                                  _at_least(1))
    eval_query_size: int = setting(1000, "most images the kNN monitor classifies (a seeded sample)",
                                   _at_least(1))
    # Anything chosen by a score (a sweep's best cell, a default) must not be chosen on the
    # test images that then report it: "validation" keeps the test set for the final row.
    monitor: str = setting("test", "what the per-round kNN monitor queries: test (the held-out "
                           "evaluation images) or validation (a seeded 10% of the training images, "
                           "left out of training; the final row adds test); validation: simulations "
                           "and centralized runs only",
                           _choice(lambda: ("test", "validation")))
    probe: bool = setting(True, "fit a linear probe on the final model's features")
    seed: int = setting(0, "seeds the partitions, initial weights, client sampling and augmentation")
    out_dir: str = setting("", "the run directory: metrics, checkpoint, exported encoder (empty: "
                           "runs/run-<time>)")
    data_description: str = setting("", "what the training images are, in words, for the exported "
                                    "encoder's model card")
    # experiment tracking (server/tracking.py)
    tensorboard: bool = setting(False, "copy the metrics.jsonl rows to TensorBoard")
    mlflow: bool = setting(False, "copy the metrics.jsonl rows to MLflow")
    mlflow_uri: str = setting("", "MLflow tracking URI (empty: an SQLite store in the run directory)")
    # privacy (docs/privacy.md)
    dp: str = setting("none", "differential privacy on the shared arrays: none, fixed or adaptive "
                      "clipping", _choice(lambda: ("none", "fixed", "adaptive")))
    dp_clip_norm: float = setting(1.0, "DP: the clipping norm (adaptive: its starting value)", _positive)
    dp_noise_multiplier: float = setting(1.0, "DP: the Gaussian noise's std as a multiple of the "
                                         "clipping norm", _at_least(0.0))
    dp_delta: float = setting(1e-5, "DP: the delta the reported epsilon is for",
                              _between(0.0, 1.0, low_open=True))
    dp_target_quantile: float = setting(0.5, "adaptive DP: the quantile of update norms the clipping "
                                        "norm follows", _between(0.0, 1.0))
    dp_clip_norm_lr: float = setting(0.2, "adaptive DP: the clipping norm's geometric learning rate",
                                     _positive)
    dp_clipped_count_stddev: float = setting(1.0, "adaptive DP: the noise's std on the count of "
                                             "clipped updates", _positive)
    secure_aggregation: bool = setting(False, "SecAgg+: the server sees only the sum of the sampled "
                                       "clients' updates")
    secagg_shares: int = setting(0, "SecAgg+: neighbours holding shares of each site's keys (0: every "
                                 "sampled site)", lambda v: None if v == 0 or v >= 3
                                 else "must be 0 (every sampled client) or >= 3")
    secagg_threshold: int = setting(2, "SecAgg+: fewest sites that must remain for the sum to be "
                                    "unmasked", _at_least(2))
    secagg_clip_range: float = setting(8.0, "SecAgg+: each update entry is clipped to +-this before "
                                       "quantization", _positive)
    secagg_quant_bits: int = setting(22, "SecAgg+: the bits each clipped entry is quantized to",
                                     lambda v: None if 8 <= v <= 30 else "must be in [8, 30]")
    secagg_max_weight: float = setting(10000.0, "SecAgg+: the largest num-examples a site's update may "
                                       "weigh", _positive)
    # Integer buffers and the server's global model, checkpoints and exported encoder stay as
    # they are.
    transfer_dtype: str = setting("float32", "the dtype float arrays travel in, both ways "
                                  "(common/records.py)", _choice(_transfer_dtypes))
    client_state_dir: str = setting("", "folder where clients keep their state between rounds, a "
                                    "file each (empty: in memory); node config `state-dir` wins")

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
        """Run each field's check, in the fields' order; the first problem is the error. Then
        whether the method can train the encoder (MAE needs a ViT)."""
        for name, field in _FIELDS.items():
            check = field.metadata["check"]
            problem = check(getattr(self, name)) if check else None
            if problem:
                key = name.replace("_", "-")
                raise ConfigError(f"{key}={getattr(self, name)!r} is invalid: {problem}")
        allowed = _method_names()[self.method].encoders
        if allowed is not None and self.encoder not in ("auto", *allowed):
            raise ConfigError(f"encoder={self.encoder!r} is invalid with method={self.method!r}: "
                              f"allowed: auto, {', '.join(allowed)}")

    @property
    def resolved_encoder(self) -> str:
        """The encoder this run builds: `encoder`, or for "auto" the method's preferred one
        (SSLMethod.preferred_encoder). Every reader of the run's encoder reads this."""
        if self.encoder != "auto":
            return self.encoder
        return _method_names()[self.method].preferred_encoder


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def config_keys() -> list[str]:
    return [name.replace("_", "-") for name in _FIELDS]


def defaults() -> dict[str, Any]:
    return RunConfig().to_mapping()


def key_help() -> dict[str, str]:
    """What each run-config key does, in one line, by hyphenated key."""
    return {name.replace("_", "-"): f.metadata["help"] for name, f in _FIELDS.items()}


def keys_table() -> str:
    """The README's table of run-config keys (Markdown): key, default as TOML writes it (as
    `--run-config` and pyproject.toml take it), what it does. tests/test_config.py keeps the
    README's copy equal to this."""
    rows = ["| key | default | what it does |", "| --- | --- | --- |"]
    helps = key_help()
    rows += [f"| `{key}` | `{json.dumps(default)}` | {helps[key]} |" for key, default in defaults().items()]
    return "\n".join(rows)


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
