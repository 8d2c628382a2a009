"""A run's output directory: metrics.jsonl (a row per round), the latest checkpoint,
the exported encoder and summary.json; each row also goes to the trackers the run config
asks for (server/tracking.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import atomic_write, export_encoder
from server.tracking import Tracking


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")


def weights_metadata(cfg, server_round: int, **extra: Any) -> dict[str, Any]:
    """What a checkpoint or exported encoder needs to be rebuilt from its file alone."""
    return {"round": server_round, "method": cfg.method, "encoder": cfg.encoder,
            "image-size": cfg.image_size, "config": cfg.to_mapping(), **extra}


def summarize(cfg, history: list[dict[str, Any]], *, seconds: float, encoder: Path,
              out_dir: Path, **extra: Any) -> dict[str, Any]:
    """summary.json: the config, the first and final rows, and the final kNN gain."""
    first, last = history[0].get("knn_top1"), history[-1].get("knn_top1")
    return {"config": cfg.to_mapping(), "initial": history[0], "final": history[-1],
            "knn_top1_gain": None if first is None or last is None else last - first,
            "seconds": round(seconds, 3), "encoder": str(encoder), "out_dir": str(out_dir),
            **extra}


class RunDir:
    def __init__(self, path: str | Path, rows: list[dict[str, Any]] = (), cfg=None):
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

    def export_encoder(self, shared_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        path = self.path / "encoder.safetensors"
        export_encoder(path, shared_state, metadata)
        return path

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The run's last output, so it also ends the tracked runs."""
        atomic_write(self.path / "summary.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, sort_keys=True)))
        self.tracking.close()
