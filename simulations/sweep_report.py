"""`fedssl sweep-report DIR`: a sweep's numbers (simulations/sweep.py) as DIR/report.md (a
Markdown table), DIR/report.json, DIR/report.csv and DIR/curves.png (simulations/plot.py).

Per cell: the mean of the final round's validation kNN top-1 over its seeds with a 95%
Student t-interval (mean +- t(0.975, n-1) s / sqrt(n)), and the paired difference to the
baseline cell: the same interval over the per-seed differences, seed by seed (a seed fixes
the partitions, which the report checks from the fingerprint each run records, the initial
model and the client sampling), with whether it excludes 0. And each cell's gain: its final
validation kNN top-1 less the same run's round 0 (the untrained model's), the same interval
over seeds, so that "this cell learns at this scale" is a claim with an interval too. And,
per run, the rounds that kept the previous global model (no update aggregated: fewer valid
replies than min-train-clients, the others failed or screened out, server/validation.py),
which a cell's number silently includes.

No choice on test: cells are ranked, and the best one chosen, by the validation column
alone, before any test number is read (and only among the cells that finished every seed of
the spec: a mean over fewer seeds, or other ones, is not comparable; such cells rank after
them); the test columns (the final row's kNN top-1 and
linear probe on the test images) are then read and reported for the chosen cells only: the
validation-best, the baseline, and the cells the spec names in `report-test` in advance.
Test numbers of other cells are never read, so nothing can be chosen by them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from fedssl.common.provenance import describe

LEVEL = 0.95
VALIDATION = "val_knn_top1"                # the one column cells are ranked and chosen by
TEST_COLUMNS = ("knn_top1", "probe_top1")  # read by test_scores only, for chosen cells only
INTERVAL = ("95% Student t-interval over seeds: mean +- t(0.975, n-1) * s / sqrt(n); paired "
            "differences: the same over the per-seed differences (cell - baseline, same seed)")


class ReportError(ValueError):
    """A folder that is not a sweep, or a sweep with nothing to report; one line."""


# ------------------------------------------------------------------------ intervals

def t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (an integer >= 1) degrees of freedom, in closed
    form (Abramowitz & Stegun 26.7.3 and 26.7.4): no dependency on scipy."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df == 1:
        return 2 * theta / math.pi
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return sin * total
    term = total = math.cos(theta)
    for k in range(1, (df - 1) // 2):
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + sin * total)


def t_quantile(level: float, df: int) -> float:
    """t such that P(|T| <= t) = level (t(0.975, df) for level 0.95), by bisection."""
    low, high = 0.0, 1.0
    while t_central_mass(high, df) < level:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_central_mass(mid, df) < level else (low, mid)
        if high - low < 1e-12:
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float | None
    low: float | None   # None: fewer than 2 values, no interval
    high: float | None

    @property
    def excludes_zero(self) -> bool | None:
        """None where there is no interval: one value, or values all equal (s = 0 gives a
        zero-width t-interval, which measures no spread, however far from 0 it lies)."""
        if self.low is None or self.low == self.high:
            return None
        return self.low > 0 or self.high < 0


def t_interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    values = [float(v) for v in values]
    if not values:
        return Interval(0, None, None, None)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(1, mean, None, None)
    half = t_quantile(level, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(len(values), mean, mean - half, mean + half)


def paired(cell: Mapping[int, float], baseline: Mapping[int, float]) -> tuple[Interval, list[int]]:
    """The interval of cell - baseline over the seeds both have; and those seeds."""
    seeds = sorted(set(cell) & set(baseline))
    return t_interval(cell[s] - baseline[s] for s in seeds), seeds


def choose(validation: Mapping[str, Interval]) -> str | None:
    """The cell with the highest mean validation score (the first in spec order on a tie);
    None when no cell has one. Takes validation intervals only."""
    scored = [(name, iv.mean) for name, iv in validation.items() if iv.mean is not None]
    return max(scored, key=lambda item: item[1])[0] if scored else None


# ---------------------------------------------------------------------------- reading

@dataclass
class RunView:
    """What the report knows of a run before the choice: validation numbers only."""
    status: str                       # done, failed or missing
    validation: float | None = None   # the final row's validation kNN top-1
    start: float | None = None        # round 0's: the untrained model's
    rounds_lost: int | None = None    # rounds that aggregated no update (None: not recorded)
    curve: tuple[tuple[int, float], ...] = ()
    seconds: float | None = None
    digest: str | None = None
    failure: str | None = None
    code: str | None = None           # which code made it (common/provenance.py's describe)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def read_validation(folder: Path) -> RunView:
    """A run's validation numbers; every row is cut to round, `val_knn_top1` and
    `aggregated` as it is read."""
    record = _json(folder / "sweep-run.json") or {}
    digest = record.get("partition_digest")
    failed = _json(folder / "sweep-failed.json")
    if failed is not None:
        return RunView("failed", digest=digest, failure=f"non-finite model in round {failed.get('round')}")
    summary = _json(folder / "summary.json")
    rows = [{key: row.get(key) for key in ("round", VALIDATION, "aggregated")}
            for row in _rows(folder / "metrics.jsonl")]
    curve = tuple((row["round"], row[VALIDATION]) for row in rows if row[VALIDATION] is not None)
    recorded = [row["aggregated"] for row in rows if row["round"] and row["aggregated"] is not None]
    if not isinstance(summary, dict) or not curve:
        return RunView("missing", curve=curve, digest=digest)
    final_round = (summary.get("final") or {}).get("round")
    value = curve[-1][1] if curve[-1][0] == final_round else None
    start = curve[0][1] if curve[0][0] == 0 else None
    return RunView("done" if value is not None else "missing", value, start,
                   recorded.count(False) if recorded else None, curve, summary.get("seconds"), digest,
                   code=describe(summary.get("code")))


def test_scores(folder: Path) -> dict[str, float | None]:
    """The final row's test numbers. Called only for the chosen cells, after the choice."""
    summary = _json(folder / "summary.json") or {}
    final = summary.get("final") or {}
    return {column: final.get(column) for column in TEST_COLUMNS}


def load_sweep(sweep_dir: Path) -> dict[str, Any]:
    manifest = _json(Path(sweep_dir) / "sweep.json")
    if not isinstance(manifest, dict) or "cells" not in manifest:
        raise ReportError(f"{str(sweep_dir)!r} is not a sweep folder: it has no sweep.json "
                          "(written by `fedssl sweep SPEC --out DIR`)")
    return manifest


def run_folder(sweep_dir: Path, cell: str, seed: int) -> Path:
    return Path(sweep_dir) / cell / f"seed-{seed}"


def read_sweep(sweep_dir: Path) -> tuple[dict[str, Any], dict[str, dict[int, RunView]]]:
    manifest = load_sweep(sweep_dir)
    views = {c["name"]: {s: read_validation(run_folder(sweep_dir, c["name"], s)) for s in manifest["seeds"]}
             for c in manifest["cells"]}
    return manifest, views


# ----------------------------------------------------------------------------- report

def _values(views: Mapping[int, RunView]) -> dict[int, float]:
    return {seed: v.validation for seed, v in views.items() if v.status == "done"}


def _partitions(cell: Mapping[int, RunView], base: Mapping[int, RunView], seeds: list[int],
                command: str) -> str:
    if command == "centralized":
        return "n/a (pooled images)"
    known = [s for s in seeds if cell[s].digest and base[s].digest]
    if not seeds:
        return "no common seeds"
    if len(known) < len(seeds):
        return "not recorded"
    same = [s for s in known if cell[s].digest == base[s].digest]
    if len(same) == len(seeds):
        return "same"
    return f"differ (seeds {', '.join(str(s) for s in seeds if s not in same)})"


def build_report(sweep_dir: str | Path) -> dict[str, Any]:
    sweep_dir = Path(sweep_dir)
    manifest, views = read_sweep(sweep_dir)
    cells = {c["name"]: c for c in manifest["cells"]}
    baseline = manifest["baseline"]
    base_values = _values(views[baseline])

    # 1. validation only: intervals, paired differences, ranking, the choice
    rows: dict[str, dict[str, Any]] = {}
    for name, cell_views in views.items():
        values = _values(cell_views)
        diff, seeds = paired(values, base_values)
        gain = {s: v.validation - v.start for s, v in cell_views.items() if v.status == "done" and v.start is not None}
        gain_interval = t_interval(gain.values())
        seconds = [v.seconds for v in cell_views.values() if v.status == "done" and v.seconds is not None]
        rows[name] = {
            "cell": name, "command": cells[name]["command"], "overrides": cells[name]["overrides"],
            "seeds": sorted(values),
            "failed": {s: v.failure for s, v in cell_views.items() if v.status == "failed"},
            "missing": sorted(s for s, v in cell_views.items() if v.status == "missing"),
            "validation": {"per_seed": values, **asdict(t_interval(values.values()))},
            "validation_vs_baseline": {"seeds": seeds, **asdict(diff), "excludes_zero": diff.excludes_zero},
            "gain_over_round_0": {"per_seed": gain, **asdict(gain_interval),
                                  "excludes_zero": gain_interval.excludes_zero},
            "rounds_lost": {s: v.rounds_lost for s, v in cell_views.items() if v.status == "done"},
            "partitions_vs_baseline": _partitions(cell_views, views[baseline], seeds, cells[name]["command"]),
            "minutes_per_run": round(statistics.fmean(seconds) / 60, 2) if seconds else None,
        }
    validation = {name: Interval(**{k: row["validation"][k] for k in ("n", "mean", "low", "high")})
                  for name, row in rows.items()}
    complete = {name for name, row in rows.items() if set(row["seeds"]) == set(manifest["seeds"])}
    best = choose({name: iv for name, iv in validation.items() if name in complete})
    ranking = sorted(rows, key=lambda n: (n not in complete, validation[n].mean is None,
                                          -(validation[n].mean or 0.0)))
    chosen = list(dict.fromkeys([c for c in (best, baseline, *manifest.get("report-test", [])) if c]))

    # 2. the test images, read now, for the chosen cells only
    test = {name: {seed: test_scores(run_folder(sweep_dir, name, seed)) for seed in rows[name]["seeds"]}
            for name in chosen}
    for name in chosen:
        block = {}
        for column in TEST_COLUMNS:
            values = {s: t[column] for s, t in test[name].items() if t[column] is not None}
            base = {s: t[column] for s, t in test[baseline].items() if t[column] is not None}
            diff, seeds = paired(values, base)
            block[column] = {"per_seed": values, **asdict(t_interval(values.values())),
                             "vs_baseline": {"seeds": seeds, **asdict(diff), "excludes_zero": diff.excludes_zero}}
        rows[name]["test"] = block
    for rank, name in enumerate(ranking, 1):
        rows[name]["rank"] = rank
        rows[name]["chosen"] = name in chosen
    code: dict[str, list[str]] = {}
    for name, cell_views in views.items():
        for seed, view in cell_views.items():
            if view.status == "done":
                code.setdefault(view.code, []).append(f"{name} seed {seed}")
    return {"description": manifest.get("description", ""), "command": manifest.get("command"),
            "seeds": manifest["seeds"], "baseline": baseline, "interval": INTERVAL, "code": code,
            "selection": {"column": VALIDATION, "rule": "highest mean over seeds, among the cells "
                          "that finished every seed", "best": best,
                          "test_reported_for": chosen},
            "cells": [rows[name] for name in ranking]}


def _score(block: Mapping[str, Any]) -> str:
    """A mean and its interval as a fraction, e.g. 0.412 [0.398, 0.426]."""
    return _interval(block, lambda v: f"{v:.3f}")


def _points(block: Mapping[str, Any]) -> str:
    """A difference and its interval in points, e.g. +1.4 [+0.2, +2.6]."""
    return _interval(block, lambda v: f"{100 * v:+.1f}")


def _interval(block: Mapping[str, Any], text: Callable[[float], str]) -> str:
    if block.get("mean") is None:
        return "-"
    if block.get("low") is None:
        return f"{text(block['mean'])} (n=1)"
    if block["low"] == block["high"]:
        return f"{text(block['mean'])} (all {block['n']} equal: no interval)"
    return f"{text(block['mean'])} [{text(block['low'])}, {text(block['high'])}]"


def _excludes(block: Mapping[str, Any]) -> str:
    return {True: "yes", False: "no", None: "-"}[block.get("excludes_zero")]


def _lost(per_seed: Mapping[int, int | None]) -> str:
    return ", ".join("-" if n is None else str(n) for _, n in sorted(per_seed.items())) or "-"


def _settings(cell: Mapping[str, Any]) -> str:
    keys = {k: v for k, v in cell["overrides"].items() if k != "command"}
    text = ", ".join(f"{k}={json.dumps(v)}" for k, v in keys.items())
    return ("centralized; " if cell["command"] == "centralized" else "") + (text or "(base)")


def _code_line(code: Mapping[str, list[str]]) -> str:
    """Which code made the finished runs: one commit, or a warning naming each."""
    if not code:
        return "Code: no finished run."
    if len(code) == 1:
        (what, runs), = code.items()
        return f"Code: {what} (all {len(runs)} finished runs)."
    parts = "; ".join(f"{what}: {', '.join(runs)}" for what, runs in code.items())
    return f"**Runs made by different code** (their differences may be the code's): {parts}."


def markdown(report: Mapping[str, Any]) -> str:
    sel = report["selection"]
    lines = [f"# Sweep: {report['description']}" if report["description"] else "# Sweep report", "",
             f"Reproduce: `{report['command']}` (then `fedssl sweep-report DIR`).",
             f"Seeds: {', '.join(map(str, report['seeds']))}. Intervals: {report['interval']}.",
             _code_line(report["code"]),
             f"Ranked and chosen on validation only ({sel['column']}: the final round's kNN top-1 on a "
             "seeded 10% of the training images, never trained on), among the cells that finished every "
             "seed (any other ranks after them); test numbers (final round, test "
             f"images, touched once per run) only for the chosen cells: {', '.join(sel['test_reported_for'])} "
             f"(validation-best: {sel['best']}; baseline: {report['baseline']}). Differences in points.", "",
             "| rank | cell | settings | seeds | val kNN top-1 [95% CI] | val gain over round 0 [95% CI] "
             "| val diff vs baseline [95% CI] | excludes 0 | test kNN top-1 [95% CI] "
             "| test diff vs baseline [95% CI] | excludes 0 | test probe [95% CI] "
             "| rounds with no update, per seed | partitions vs baseline | min/run |",
             "| --- " * 15 + "|"]
    for row in report["cells"]:
        test = row.get("test")
        knn = test["knn_top1"] if test else {}
        is_base = row["cell"] == report["baseline"]
        failed = f", {len(row['failed'])} failed" if row["failed"] else ""
        missing = f", {len(row['missing'])} not run" if row["missing"] else ""
        lines.append(" | ".join([
            f"| {row['rank']}", f"**{row['cell']}**" if row["cell"] == sel["best"] else row["cell"],
            _settings(row), f"{len(row['seeds'])}{failed}{missing}", _score(row["validation"]),
            _points(row["gain_over_round_0"]),
            "(baseline)" if is_base else _points(row["validation_vs_baseline"]),
            "" if is_base else _excludes(row["validation_vs_baseline"]),
            _score(knn) if test else "not chosen",
            "(baseline)" if is_base else _points(knn.get("vs_baseline", {})) if test else "",
            "" if is_base else _excludes(knn.get("vs_baseline", {})) if test else "",
            _score(test["probe_top1"]) if test else "", _lost(row["rounds_lost"]), row["partitions_vs_baseline"],
            "-" if row["minutes_per_run"] is None else f"{row['minutes_per_run']:.1f}"]) + " |")
    for row in report["cells"]:
        for seed, why in row["failed"].items():
            lines.append(f"\n{row['cell']} seed {seed} failed: {why} (left out of its mean).")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("rank", "cell", "command", "settings", "n", "seeds", "failed", "val_mean", "val_low", "val_high",
              "gain_mean", "gain_low", "gain_high", "gain_excludes_zero",
              "val_diff_mean", "val_diff_low", "val_diff_high", "val_diff_excludes_zero", "chosen",
              "test_knn_mean", "test_knn_low", "test_knn_high", "test_knn_diff_mean", "test_knn_diff_low",
              "test_knn_diff_high", "test_knn_diff_excludes_zero", "test_probe_mean", "test_probe_low",
              "test_probe_high", "rounds_lost", "partitions_vs_baseline", "minutes_per_run")


def csv_text(report: Mapping[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in report["cells"]:
        val, diff, gain = row["validation"], row["validation_vs_baseline"], row["gain_over_round_0"]
        test = row.get("test") or {}
        knn, probe = test.get("knn_top1", {}), test.get("probe_top1", {})
        kdiff = knn.get("vs_baseline", {})
        writer.writerow({
            "rank": row["rank"], "cell": row["cell"], "command": row["command"], "settings": _settings(row),
            "n": val["n"], "seeds": " ".join(map(str, row["seeds"])), "failed": len(row["failed"]),
            "val_mean": val["mean"], "val_low": val["low"], "val_high": val["high"],
            "gain_mean": gain["mean"], "gain_low": gain["low"], "gain_high": gain["high"],
            "gain_excludes_zero": gain["excludes_zero"],
            "val_diff_mean": diff["mean"], "val_diff_low": diff["low"], "val_diff_high": diff["high"],
            "val_diff_excludes_zero": diff["excludes_zero"], "chosen": row["chosen"],
            "test_knn_mean": knn.get("mean"), "test_knn_low": knn.get("low"), "test_knn_high": knn.get("high"),
            "test_knn_diff_mean": kdiff.get("mean"), "test_knn_diff_low": kdiff.get("low"),
            "test_knn_diff_high": kdiff.get("high"), "test_knn_diff_excludes_zero": kdiff.get("excludes_zero"),
            "test_probe_mean": probe.get("mean"), "test_probe_low": probe.get("low"),
            "test_probe_high": probe.get("high"), "rounds_lost": _lost(row["rounds_lost"]),
            "partitions_vs_baseline": row["partitions_vs_baseline"],
            "minutes_per_run": row["minutes_per_run"]})
    return out.getvalue()


def write_report(sweep_dir: str | Path) -> dict[str, Path]:
    """DIR/report.md, report.json, report.csv and curves.png; returns their paths."""
    from fedssl.common.checkpoint import atomic_write
    from fedssl.simulations.plot import plot_sweep

    sweep_dir = Path(sweep_dir)
    report = build_report(sweep_dir)
    if not any(row["seeds"] for row in report["cells"]):
        raise ReportError(f"{str(sweep_dir)!r}: no run of the sweep has finished yet")
    paths = {"markdown": sweep_dir / "report.md", "json": sweep_dir / "report.json",
             "csv": sweep_dir / "report.csv"}
    for key, text in (("markdown", markdown(report)), ("json", json.dumps(report, indent=2)),
                      ("csv", csv_text(report))):
        atomic_write(paths[key], lambda tmp, text=text: Path(tmp).write_text(text))
    paths["png"] = plot_sweep(sweep_dir, sweep_dir / "curves.png")
    return paths
