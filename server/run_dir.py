"""A run's output directory: metrics.jsonl (a row per round), the latest checkpoint,
the exported encoder and summary.json."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import atomic_write, export_encoder, save_weights


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.write_text("")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def save_checkpoint(self, shared_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        save_weights(self.path / "checkpoint.safetensors", shared_state, metadata)

    def export_encoder(self, shared_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        path = self.path / "encoder.safetensors"
        export_encoder(path, shared_state, metadata)
        return path

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.path / "summary.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, sort_keys=True)))
