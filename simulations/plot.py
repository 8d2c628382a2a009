"""`fedssl plot`: kNN top-1 and train loss per round of one or more run directories, on one
PNG figure, each run labelled by its method, strategy and partition; or, given a sweep's
folder (simulations/sweep.py), its validation kNN per round, one line per cell: the mean
over seeds with its 95% t-interval as a band."""
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
        # A run monitored on validation has one test point, its last: its curve is validation.
        monitored = "val_knn_top1" if any(r.get("val_knn_top1") is not None for r in rows) else "knn_top1"
        for axes, key in ((knn, monitored), (loss, "train_loss")):
            points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                rounds, values = zip(*points)
                axes.plot(rounds, values, marker="o", markersize=3,
                          label=f"{label} (validation)" if key == "val_knn_top1" else label)
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


def is_sweep(path: Path) -> bool:
    return (Path(path) / "sweep.json").is_file()


def plot(paths: list[Path], out: Path) -> dict[str, Any]:
    """`fedssl plot`: run directories, or one sweep folder."""
    sweeps = [p for p in paths if is_sweep(p)]
    if sweeps and len(paths) > 1:
        raise PlotError(f"{str(sweeps[0])!r} is a sweep folder: plot it alone (its cells are its lines)")
    if sweeps:
        return {"out": str(plot_sweep(sweeps[0], out)), "sweep": str(sweeps[0])}
    return {"out": str(plot_runs(paths, out)), "runs": len(paths)}


def plot_sweep(sweep_dir: Path, out: Path) -> Path:
    """Validation kNN top-1 per round of a sweep, a line per cell: the mean over its finished
    seeds, and where 2 or more seeds have the round, the 95% Student t-interval as a band."""
    from fedssl.simulations.sweep_report import ReportError, read_sweep, t_interval

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise PlotError(f"--out {str(out)!r}: the figure is a PNG, so the name must end in .png")
    try:
        manifest, views = read_sweep(Path(sweep_dir))
    except ReportError as err:
        raise PlotError(str(err)) from None

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    drawn = 0
    for cell, runs in views.items():
        curves = [dict(v.curve) for v in runs.values() if v.status == "done"]
        rounds = sorted({r for curve in curves for r in curve})
        stats = [(r, t_interval([c[r] for c in curves if r in c])) for r in rounds]
        if not stats:
            continue
        line, = axes.plot([r for r, _ in stats], [iv.mean for _, iv in stats], marker="o", markersize=3,
                          label=f"{cell}{' (baseline)' if cell == manifest['baseline'] else ''}, n={len(curves)}")
        banded = [(r, iv) for r, iv in stats if iv.low is not None]
        if banded:
            # Drawn within [0, 1], where an accuracy lies; the report gives the interval whole.
            axes.fill_between([r for r, _ in banded], [max(iv.low, 0.0) for _, iv in banded],
                              [min(iv.high, 1.0) for _, iv in banded], color=line.get_color(), alpha=0.2,
                              linewidth=0)
        drawn += 1
    if not drawn:
        raise PlotError(f"{str(sweep_dir)!r}: no run of the sweep has finished yet")
    axes.set(title="validation kNN top-1: mean over seeds, band: 95% Student t-interval",
             xlabel="round (epoch if centralized)", ylabel="top-1 accuracy")
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=120)
    return out
