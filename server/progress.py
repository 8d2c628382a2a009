"""A run's progress, a line per round (or per epoch of the centralized baseline): round,
clients, loss, accuracy, time and ETA. On a terminal it is one line rewritten in place;
elsewhere (a file, a service's journal) one log line per round."""
from __future__ import annotations

from typing import Any

from fedssl.common.logs import end_status, get_logger, show_status, status_is_live

log = get_logger()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(row: dict[str, Any], total: int, unit: str = "round",
                  eta: float | None = None) -> str:
    parts = [f"{unit} {row['round']}/{total}"]
    if row["round"] > 0:
        if "clients_ok" in row:
            parts.append(f"clients {row['clients_ok']} ok {row['clients_failed']} failed")
        if row.get("aggregated") is False:
            parts.append("too few valid replies: global model kept")
        if row.get("train_loss") is not None:
            parts.append(f"loss {row['train_loss']:.4f}")
    if row.get("val_knn_top1") is not None:  # monitor = validation
        parts.append(f"validation kNN top-1 {row['val_knn_top1']:.4f}")
    if row.get("knn_top1") is not None:
        parts.append(f"kNN top-1 {row['knn_top1']:.4f}")
    if row.get("probe_top1") is not None:
        parts.append(f"probe {row['probe_top1']:.4f}")
    parts.append(f"{row['seconds']:.1f} s")
    if eta is not None and row["round"] < total:
        parts.append(f"ETA {_duration(eta)}")
    return " | ".join(parts)


class Progress:
    """`with Progress(total) as progress:` and `progress.update(row)` after each metrics row;
    leaving the block (an error too) keeps the last status line and goes on below it."""

    def __init__(self, total: int, unit: str = "round"):
        self.total, self.unit = total, unit
        self.live = status_is_live()
        self.trained_seconds: list[float] = []

    def eta(self, row: dict[str, Any]) -> float | None:
        """The mean time of the rounds this process has run, times the rounds left. Round 0
        only evaluates, so it does not count."""
        if row["round"] > 0:
            self.trained_seconds.append(row["seconds"])
        if not self.trained_seconds:
            return None
        mean = sum(self.trained_seconds) / len(self.trained_seconds)
        return mean * (self.total - row["round"])

    def update(self, row: dict[str, Any]) -> None:
        line = progress_line(row, self.total, self.unit, self.eta(row))
        if self.live:
            show_status(line)
        else:
            log.info(line)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            end_status()
