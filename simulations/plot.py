"""`fedssl plot`: kNN top-1 and train loss per round of one or more run directories, on one
PNG figure, each run labelled by its method, strategy and partition."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class PlotError(ValueError):
    """A run directory or output path that cannot be plotted; one line, naming it."""


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{str(run_dir)!r} is not a run directory: it has no metrics.jsonl")
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise PlotError(f"{str(path)!r} is not JSON lines: {err}") from None
    if not rows:
        raise PlotError(f"{str(path)!r} has no rows yet")
    return rows


def _run_metadata(run_dir: Path) -> dict[str, Any]:
    """summary.json when the run finished, else encoder.json; {} for a run cut short."""
    for name in ("summary.json", "encoder.json"):
        try:
            return json.loads((run_dir / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return {}


def run_label(run_dir: Path) -> str:
    meta = _run_metadata(run_dir)
    cfg = meta.get("config") or {}
    try:
        if meta.get("centralized"):
            return f"{cfg['method']} centralized"
        partition = cfg["partition"]
        if partition == "dirichlet":
            partition = f"dirichlet a={cfg['alpha']:g}"
        elif partition == "shards":
            partition = f"{cfg['shards-per-client']} shards/client"
        return f"{cfg['method']} + {cfg['strategy']}, {partition}"
    except KeyError:  # a run cut short, or from before a key existed
        return run_dir.name


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Write the figure to `out` (a .png path); return it."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise PlotError(f"--out {str(out)!r}: the figure is a PNG, so the name must end in .png")
    runs = [(Path(d), read_rows(Path(d))) for d in run_dirs]
    labels = [run_label(d) for d, _ in runs]
    # Two runs of the same setup (seeds, encoders, ...) tell apart by directory.
    labels = [f"{label} ({d.name})" if labels.count(label) > 1 else label
              for label, (d, _) in zip(labels, runs)]

    # The object API, not pyplot: no global figure state and no display backend, so it
    # draws the same on a headless server.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    knn, loss = figure.subplots(1, 2)
    for label, (_, rows) in zip(labels, runs):
        for axes, key in ((knn, "knn_top1"), (loss, "train_loss")):
            points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                rounds, values = zip(*points)
                axes.plot(rounds, values, marker="o", markersize=3, label=label)
    knn.set(title="kNN top-1", xlabel="round (epoch if centralized)", ylabel="top-1 accuracy")
    loss.set(title="train loss (mean over a round's clients)", xlabel="round (epoch if centralized)",
             ylabel="loss")
    for axes in (knn, loss):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    knn.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=120)
    return out
