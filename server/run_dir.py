"""A run's output directory: metrics.jsonl (a row per round), the latest checkpoint,
the exported encoder (encoder/: model.safetensors, config.json and a model card README.md)
and summary.json; each row also goes to the trackers the run config asks for
(server/tracking.py)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fedssl.common.augment import MEAN, STD
from fedssl.common.checkpoint import EXPORT_WEIGHTS, atomic_write, export_folder
from fedssl.common.config import RunConfig
from fedssl.common.encoders import describe_encoder, torchvision_recipe
from fedssl.common.provenance import code_version, fedssl_version
from fedssl.server.evaluation import eval_source
from fedssl.server.tracking import Tracking

ENCODER_DIR = "encoder"
# The file earlier runs exported; the same bytes as encoder/model.safetensors, kept for the
# readers that still open it.
LEGACY_ENCODER_FILE = "encoder.safetensors"
FEATURES = ("the encoder's output in eval mode: {pooled} ({dim} values; the torchvision "
            "classifier replaced by Identity). knn_top1 votes among the k={k} nearest bank images "
            "by cosine similarity of these features (temperature {t}); probe_top1 is a linear "
            "classifier trained on them (frozen encoder)")
# A CNN's feature; an encoder whose output is another (the ViT's class token) names it in its
# description's "pooled_feature" (common/encoders.py).
POOLED = "the last stage's activations (BatchNorm running statistics), global-average-pooled"
INPUT = ("RGB, the shorter side resized to image_size (bicubic) and centre-cropped, scaled to "
         "[0, 1], then normalised with mean and std per channel")


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")


def weights_metadata(cfg: RunConfig, server_round: int, **extra: Any) -> dict[str, Any]:
    """What a checkpoint or exported encoder needs to be rebuilt from its file alone."""
    return {"round": server_round, "method": cfg.method, "encoder": cfg.resolved_encoder,
            "image-size": cfg.image_size, "config": cfg.to_mapping(), **extra}


def _gain(history: list[dict[str, Any]], key: str) -> float | None:
    first, last = history[0].get(key), history[-1].get(key)
    return None if first is None or last is None else last - first


def summarize(cfg: RunConfig, history: list[dict[str, Any]], *, seconds: float, encoder: Path,
              out_dir: Path, **extra: Any) -> dict[str, Any]:
    """summary.json: the config, the first and final rows, the final kNN gain (on the test
    images; under monitor = validation, whose first row never reads them, on validation) and
    the code that made the run (common/provenance.py)."""
    return {"config": cfg.to_mapping(), "code": code_version(), "initial": history[0], "final": history[-1],
            "knn_top1_gain": _gain(history, "knn_top1"),
            "val_knn_top1_gain": _gain(history, "val_knn_top1"),
            "seconds": round(seconds, 3), "encoder": str(encoder), "out_dir": str(out_dir),
            **extra}


class RunDir:
    def __init__(self, path: str | Path, rows: list[dict[str, Any]] = (), cfg: RunConfig | None = None):
        """`rows`: the history a resumed run continues; rows a killed run wrote after its
        last checkpoint are dropped, so metrics.jsonl and the checkpoint agree. `cfg`: the
        run config, whose tracking keys choose where rows are copied (none without it)."""
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoint_path = self.path / "checkpoint.safetensors"
        resume_from = rows[-1]["round"] + 1 if rows else None
        self.tracking = Tracking.open(cfg, self.path, resume_from) if cfg is not None else Tracking()
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        atomic_write(self.metrics_path, lambda tmp: Path(tmp).write_text(text))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        self.tracking.log_row(row)

    @property
    def encoder_dir(self) -> Path:
        return self.path / ENCODER_DIR

    def export_encoder(self, shared_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                       summary: dict[str, Any]) -> Path:
        """OUT/encoder/ (model.safetensors, config.json, README.md), written from the run's
        `summary`; returns the folder. OUT/encoder.safetensors: the same weights file."""
        cfg = RunConfig.from_mapping(summary["config"])
        config = encoder_config(cfg, summary)
        export_folder(self.encoder_dir, shared_state, metadata, config, model_card(cfg, config))
        _same_file(self.encoder_dir / EXPORT_WEIGHTS, self.path / LEGACY_ENCODER_FILE)
        return self.encoder_dir

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The run's last output, so it also ends the tracked runs."""
        atomic_write(self.path / "summary.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, sort_keys=True)))
        self.tracking.close()


def _same_file(source: Path, link: Path) -> None:
    """`link` holds `source`'s bytes: a hard link where the file system has them, else a copy."""
    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    atomic_write(link, write)


def encoder_config(cfg: RunConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """config.json: what a user needs to rebuild and feed the encoder, and how it was made."""
    about = describe_encoder(cfg.resolved_encoder, cfg.image_size)
    final, privacy = summary["final"], summary.get("privacy") or {}
    source, path = eval_source(cfg)
    centralized = bool(summary.get("centralized"))
    return {
        "architecture": cfg.resolved_encoder,
        **about,
        "image_size": cfg.image_size,
        "input": INPUT,
        "mean": list(MEAN),
        "std": list(STD),
        "features": FEATURES.format(pooled=about.get("pooled_feature", POOLED), dim=about["num_features"],
                                    k=cfg.knn_k, t=cfg.knn_temperature),
        "method": cfg.method,
        "strategy": "centralized" if centralized else cfg.strategy,
        "rounds": final["round"],  # epochs over the pooled data for the centralized baseline
        "knn_top1": final.get("knn_top1"),
        "probe_top1": final.get("probe_top1"),
        "evaluated_on": {"source": source, "path": path, "max_bank_images": cfg.eval_bank_size,
                         "max_query_images": cfg.eval_query_size},
        # summary.json's privacy section: a centralized run has none, whatever `dp` says
        "dp": privacy.get("dp", "none"),
        "dp_epsilon": privacy.get("epsilon"),
        "dp_delta": privacy.get("delta"),
        "secure_aggregation": bool(privacy.get("secure_aggregation")),
        "data_description": cfg.data_description or None,
        "init_weights": cfg.init_weights or None,
        "seed": cfg.seed,
        "library_name": "fedssl",
        "fedssl_version": fedssl_version(),
        "fedssl_commit": (summary.get("code") or {}).get("commit"),
    }


def _score(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def _privacy_text(config: dict[str, Any]) -> str:
    if config["dp"] == "none":
        text = ("trained without differential privacy, so the weights may retain details of "
                "training images")
    elif config["dp_epsilon"] is None:
        text = f"differential privacy (`{config['dp']}` clipping) with no finite epsilon (no noise)"
    else:
        text = (f"differential privacy (`{config['dp']}` clipping): epsilon {config['dp_epsilon']:.3g} "
                f"at delta {config['dp_delta']:g} for all of one site's images, covering the released "
                "model only (docs/privacy.md)")
    if config["secure_aggregation"]:
        text += "; SecAgg+: the server saw only the sum of the sampled sites' updates"
    return text


def model_card(cfg: RunConfig, config: dict[str, Any]) -> str:
    """README.md of the export: the data the user described, settings, results and limits,
    written from the run, and how to load the encoder."""
    centralized = config["strategy"] == "centralized"
    evaluated = config["evaluated_on"]
    where = (f"`{evaluated['path']}`" if evaluated["path"] else
             f"the {evaluated['source']} source's held-out images")
    data = cfg.data_description or (
        "No description of the training data was given (`--data-description`); before using this "
        "encoder, find out what images it was trained on.")
    if cfg.dataset == "synthetic":
        data += (" The run trained on fedssl's built-in synthetic shapes: a demonstration, not an "
                 "encoder for real images.")
    how = ("the centralized baseline: one model trained on the pooled images" if centralized else
           f"federated: `{cfg.strategy}` over the sites, a share {cfg.fraction_train:g} of them "
           f"sampled each round (`{cfg.partition}` partition where simulated)")
    privacy = _privacy_text(config)
    rows = [("method", f"`{cfg.method}`"), ("training", how),
            ("rounds" if not centralized else "epochs", config["rounds"]),
            ("encoder", f"`{config['architecture']}` ({config['num_features']} features), "
                        f"{cfg.image_size}x{cfg.image_size} px"),
            ("local epochs, batch, lr", f"{cfg.local_epochs}, {cfg.batch_size}, {cfg.lr:g}"),
            ("started from", f"`{cfg.init_weights}`" if cfg.init_weights else "random initialisation"),
            ("privacy", privacy), ("seed", cfg.seed),
            ("fedssl", config["fedssl_version"] + (f" (commit {config['fedssl_commit'][:7]})"
                                                   if config["fedssl_commit"] else ""))]
    settings = "\n".join(f"| {name} | {value} |" for name, value in rows)
    recipe = torchvision_recipe(config["architecture"], cfg.image_size, ".")
    return f"""---
library_name: fedssl
pipeline_tag: image-feature-extraction
tags: [self-supervised-learning, federated-learning, {cfg.method}, {config["architecture"]}]
---

# {config["architecture"]} encoder trained with {cfg.method} ({"centralized" if centralized else cfg.strategy})

Written by fedssl {config["fedssl_version"]} at the end of the run. `model.safetensors` holds
the encoder's weights under torchvision's parameter names; `config.json` holds what this card
says in machine-readable form.

## Data

{data}

## Settings

| setting | value |
| --- | --- |
{settings}

## Results

| metric (final round, not the best) | value |
| --- | --- |
| kNN top-1 (cosine, k={cfg.knn_k}) | {_score(config["knn_top1"])} |
| linear probe top-1 | {_score(config["probe_top1"])} |

Measured on {where}: a kNN bank of up to {evaluated["max_bank_images"]} labelled images and up to
{evaluated["max_query_images"]} held-out queries. Features: {config["features"]}.

## Use

Inputs, {cfg.image_size}x{cfg.image_size} px: {INPUT.replace("image_size", str(cfg.image_size))}
(mean {tuple(MEAN)}, std {tuple(STD)}).

```python
import fedssl

encoder = fedssl.load_encoder(".")  # this folder; eval mode, [N, 3, H, W] -> [N, {config["num_features"]}]
```

With plain safetensors + torchvision, run in this folder:

```python
{recipe}```

## Limits

- One run with one seed ({cfg.seed}): no interval. Two such runs can differ by a few points
  through chance alone; compare settings over several seeds.
- The numbers are the final round's on {where} only. They do not show how the encoder
  transfers to other images, sizes or tasks, how it does on the sites, classes or groups
  least represented in training, or how robust it is to a shift in the data.
- Privacy: {privacy}.
"""
