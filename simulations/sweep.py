"""`fedssl sweep SPEC.toml --out DIR`: a grid of run-config settings x seeds, run one after
another on this machine through the functions `fedssl simulate` and `fedssl centralized`
call (fedssl/api.py), each run in DIR/<cell>/seed-<s>/ as a plain run directory; then the
report (simulations/sweep_report.py: DIR/report.md, .json, .csv) and DIR/curves.png.

The spec (TOML):

    seeds = [0, 1, 2]            # every cell runs once per seed; the seed fixes the
                                 # partitions, initial model, client sampling, augmentation
    baseline = "fedavg"          # the cell every other cell is compared with, seed by seed
    report-test = ["fedu"]       # optional: cells whose test numbers are reported besides the
                                 # validation-best cell and the baseline (named in advance:
                                 # neither may take a cell that already has finished runs)
    description = "..."          # optional: the report's title

    [base]                       # run-config keys every cell shares (as in a preset), and
    dataset = "synthetic"        # the harness keys num-clients, client-cpus, client-gpus
    num-rounds = 20
    num-clients = 10

    [cells.fedavg]               # one table a cell: its own keys over [base]'s
    strategy = "fedavg"
    [cells.fedu]
    strategy = "fedu"
    [cells.central]
    command = "centralized"      # optional: "simulate" (default) or "centralized"

`seed`, `out-dir` and `resume` belong to the sweep. Every run monitors the validation split
(`monitor = "validation"`, common/eval_split.py): the report ranks and selects on it, and the
test images are scored once per run, in its final row. Every cell's settings are checked
before the first run starts; a bad spec is one line naming the key.

Resumable: the same command again skips every finished run (summary.json with all its rounds,
made with the same settings; a run made with other settings in the same folder, or recorded
before one of today's keys existed, is an error, not overwritten). The report names the
commit each finished run was made at (summary.json's `code`) and flags a sweep whose runs
come from different code. A run cut short (no summary.json) is restarted cleanly, not resumed from
its checkpoint: `--resume` rebuilds client-side state (BYOL's target, FedU's and FedEMA's
previous models) from the global model, so a resumed run is not the run its seed names,
and a paired comparison needs exactly that run. A run whose model went non-finite (NaN/Inf;
the run stops, server/evaluation.py) is a result, not a crash: it is marked
(sweep-failed.json), counted in the report as failed and not run again; delete the marker to
retry it. `--ray-address` joins a running Ray cluster for every run's clients; the runs still
go one after another.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from fedssl.common.config import ConfigError, RunConfig, config_keys
from fedssl.preflight import HARNESS_DEFAULTS
from fedssl.run_config import run_config

COMMANDS = ("sweep", "sweep-report")
SPEC_KEYS = ("seeds", "baseline", "report-test", "description", "base", "cells")
HARNESS_KEYS = ("num-clients", "client-cpus", "client-gpus")
RUN_COMMANDS = ("simulate", "centralized")
OWNED = {"seed": "the sweep's `seeds` list sets it",
         "out-dir": "the sweep sets it (DIR/<cell>/seed-<s>)",
         "resume": "the sweep skips finished runs and restarts unfinished ones"}
MONITOR = "validation"
# Files the sweep writes into DIR beside the cells' folders.
RESERVED = ("sweep.json", "spec.toml", "report.md", "report.json", "report.csv", "curves.png")
CELL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
FAILED_MARKER = "sweep-failed.json"
RUN_RECORD = "sweep-run.json"


class SpecError(ValueError):
    """A bad sweep spec or sweep folder: one line naming the key (or folder) and what is allowed."""


@dataclass(frozen=True)
class Cell:
    name: str
    command: str
    overrides: dict[str, Any]  # the cell's own table, as written
    config: dict[str, Any]     # base and cell run-config keys (no seed, out-dir)
    harness: dict[str, Any]

    def run_config(self, seed: int, out_dir: Path) -> RunConfig:
        return run_config({**self.config, "seed": seed, "out-dir": str(out_dir)})


@dataclass(frozen=True)
class Spec:
    seeds: tuple[int, ...]
    baseline: str
    cells: tuple[Cell, ...]
    report_test: tuple[str, ...] = ()
    description: str = ""
    text: str = field(default="", compare=False)

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


def run_dir(out: Path, cell: str, seed: int) -> Path:
    return Path(out) / cell / f"seed-{seed}"


# ---------------------------------------------------------------------------- the spec

def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"sweep spec {str(path)!r} cannot be read: {err.strerror or err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"sweep spec {str(path)!r} is not valid TOML: {err}") from None
    try:
        return parse_spec(data, text=text)
    except (SpecError, ConfigError) as err:
        raise SpecError(f"{path}: {err}") from None


def parse_spec(data: Mapping[str, Any], *, text: str = "") -> Spec:
    """The spec from its TOML tables; every cell's run config is built and checked here."""
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise SpecError(f"unknown key {unknown[0]!r}; allowed at the top: {', '.join(SPEC_KEYS)}")
    seeds = data.get("seeds")
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SpecError(f"seeds={seeds!r} is invalid: must be a non-empty list of integers >= 0, "
                        "e.g. seeds = [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds={seeds!r} is invalid: a seed is listed twice")
    base = _table(data.get("base", {}), "base")
    cells_table = _table(data.get("cells"), "cells")
    if not cells_table:
        raise SpecError("cells is missing or empty: add one [cells.NAME] table a cell")
    cells = tuple(_cell(name, _table(table, f"cells.{name}"), base) for name, table in cells_table.items())
    names = [c.name for c in cells]
    baseline = data.get("baseline")
    if baseline not in names:
        raise SpecError(f"baseline={baseline!r} is invalid: must name a cell: {', '.join(names)}")
    report_test = data.get("report-test", [])
    if not isinstance(report_test, list) or any(name not in names for name in report_test):
        raise SpecError(f"report-test={report_test!r} is invalid: must be a list of cell names: "
                        f"{', '.join(names)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"description={description!r} is invalid: must be a string")
    spec = Spec(tuple(seeds), baseline, cells, tuple(report_test), description, text)
    for cell in cells:
        _check_cell(cell, seeds[0])
    return spec


def _table(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where} is invalid: must be a table ([{where}])")
    return value


def _cell(name: str, table: dict[str, Any], base: dict[str, Any]) -> Cell:
    if not CELL_NAME.fullmatch(name) or name in RESERVED:
        raise SpecError(f"cells.{name} is invalid: a cell's name is a folder name of letters, digits, "
                        f"'.', '_' and '-', not one of {', '.join(RESERVED)}")
    merged: dict[str, Any] = {}
    for where, values in (("base", base), (f"cells.{name}", table)):
        for key, value in values.items():
            if isinstance(value, dict):  # [cells.a.b]: TOML reads a dotted name as nested tables
                raise SpecError(f"{where}.{key} is a table, not a setting: quote a cell name that "
                                f"holds a dot, as in [cells.\"{name}.{key}\"]")
            if key == "command" and where != "base":
                continue
            if key in OWNED:
                raise SpecError(f"{where}.{key} is not allowed: {OWNED[key]}")
            if key == "monitor" and value != MONITOR:
                raise SpecError(f"{where}.monitor={value!r} is invalid: a sweep monitors "
                                f"{MONITOR!r} (the report selects on it); remove the key")
            if key not in config_keys() and key not in HARNESS_KEYS:
                # RunConfig names the key and suggests the closest one.
                try:
                    RunConfig.from_mapping({key: value})
                except ConfigError as err:
                    raise SpecError(f"{where}: {err}") from None
            merged[key] = value
    command = table.get("command", "simulate")
    if command not in RUN_COMMANDS:
        raise SpecError(f"cells.{name}.command={command!r} is invalid: allowed: {', '.join(RUN_COMMANDS)}")
    harness = {k: merged.pop(k, HARNESS_DEFAULTS[k]) for k in HARNESS_KEYS}
    return Cell(name, command, dict(table), {**merged, "monitor": MONITOR}, harness)


def _check_cell(cell: Cell, seed: int) -> None:
    """Every check that needs no images: the run config, the harness, the strategy."""
    where = f"cells.{cell.name}"
    try:
        cfg = cell.run_config(seed, Path("."))
    except ConfigError as err:
        raise SpecError(f"{where}: {err}") from None
    num, cpus, gpus = (cell.harness[k] for k in HARNESS_KEYS)
    if not isinstance(num, int) or isinstance(num, bool) or num < cfg.min_train_clients:
        raise SpecError(f"{where}: num-clients={num!r} is invalid: must be an integer >= "
                        f"min-train-clients ({cfg.min_train_clients})")
    for key, value, positive in (("client-cpus", cpus, True), ("client-gpus", gpus, False)):
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not (value > 0 if positive else value >= 0)):
            raise SpecError(f"{where}: {key}={value!r} is invalid: must be a number "
                            f"{'> 0' if positive else '>= 0'}")
    if cell.command == "simulate":
        from fedssl.server.strategies import build_strategy
        try:
            build_strategy(cfg)
        except ConfigError as err:
            raise SpecError(f"{where}: {err}") from None


# ----------------------------------------------------------------------- run states

def final_round(cell: Cell, cfg: RunConfig) -> int:
    """The round (epoch for the centralized baseline) a finished run's last row holds."""
    if cell.command == "centralized":
        from fedssl.simulations.centralized import pooled_epochs
        return pooled_epochs(cfg)
    return cfg.num_rounds


def _result_keys_differ(recorded: Mapping[str, Any], cfg: RunConfig) -> list[str]:
    from fedssl.server.app import RESUMABLE_CHANGES  # keys that do not change a run's results

    # A key the record lacks counts as differing: the run predates the key, and today's
    # default need not be the behaviour it had then.
    return sorted(k for k, v in cfg.to_mapping().items()
                  if k not in RESUMABLE_CHANGES and (k not in recorded or recorded[k] != v))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _last_row(path: Path) -> dict[str, Any] | None:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None


def run_status(cell: Cell, cfg: RunConfig, folder: Path) -> str:
    """'done' (finished with these settings), 'failed' (its model went non-finite: a result,
    kept), or 'todo' (never started, or cut short: run it from the start). A folder holding a
    run made with other settings is a SpecError: a sweep never overwrites another's results."""
    for name in ("summary.json", FAILED_MARKER):
        record = _read_json(folder / name)
        if record is None:
            continue
        there = record.get("config") or {}
        differ = _result_keys_differ(there, cfg)
        if differ:
            shown = ", ".join((f"{k}={there[k]!r} there" if k in there else f"{k} absent there (older code)")
                              + f", {cfg.to_mapping()[k]!r} here" for k in differ[:3])
            raise SpecError(f"{folder} holds a run made with other settings ({shown}); "
                            "give the sweep another --out, or remove that folder")
        if name == FAILED_MARKER:
            return "failed"
        last = _last_row(folder / "metrics.jsonl")
        if (last is not None and last.get("round") == final_round(cell, cfg)
                and (record.get("final") or {}).get("round") == last.get("round")):
            return "done"
    return "todo"


def partition_digest(cell: Cell, cfg: RunConfig) -> str:
    """A fingerprint of which training images each client gets (the pooled set for the
    centralized baseline), computed as the clients compute it: the report checks that the
    same seed gave every cell the baseline's partitions."""
    import numpy as np

    from fedssl.common.datasets import training_images
    from fedssl.common.partition import partition_indices

    images = training_images(cfg.dataset, cfg.data_path, cfg.image_size, cfg.max_images, cfg.seed,
                             eval_path=cfg.eval_path, validation=cfg.monitor == "validation")
    digest = hashlib.sha256()
    labels = None if images.labels is None else images.labels.numpy()
    digest.update(np.ascontiguousarray(labels if labels is not None else np.arange(len(images))).tobytes())
    if cell.command == "centralized":
        digest.update(b"pooled")
    else:
        for part in partition_indices(len(images), labels, cell.harness["num-clients"], cfg.partition,
                                      alpha=cfg.alpha, shards_per_client=cfg.shards_per_client,
                                      seed=cfg.seed):
            digest.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- running

Runner = Callable[[Cell, RunConfig], dict[str, Any]]


def api_runner(ray_address: str | None = None, verbose: bool = False) -> Runner:
    """The run as `fedssl simulate` / `fedssl centralized` start it (fedssl/api.py)."""
    def run(cell: Cell, cfg: RunConfig) -> dict[str, Any]:
        import fedssl

        if cell.command == "centralized":
            return fedssl.centralized(cfg)
        return fedssl.simulate(cfg, num_clients=cell.harness["num-clients"],
                               client_cpus=cell.harness["client-cpus"],
                               client_gpus=cell.harness["client-gpus"],
                               ray_address=ray_address or None, verbose=verbose)
    return run


def manifest(spec: Spec, spec_path: str, out: Path) -> dict[str, Any]:
    """DIR/sweep.json: what the report needs to read the sweep without its spec file."""
    return {"spec": str(spec_path), "out": str(out), "description": spec.description,
            "seeds": list(spec.seeds), "baseline": spec.baseline, "report-test": list(spec.report_test),
            "command": shlex.join(["fedssl", "sweep", str(spec_path), "--out", str(out)]),
            "cells": [{"name": c.name, "command": c.command, "overrides": c.overrides,
                       "config": c.config, "harness": c.harness} for c in spec.cells]}


def plan(spec: Spec, out: Path) -> list[tuple[Cell, int, RunConfig, Path]]:
    """The runs in the order they run: seed by seed, so a sweep stopped early still holds
    complete paired comparisons for its first seeds."""
    return [(cell, seed, cell.run_config(seed, run_dir(out, cell.name, seed)), run_dir(out, cell.name, seed))
            for seed in spec.seeds for cell in spec.cells]


def check_named_in_advance(spec: Spec, out: Path, finished: set[str]) -> None:
    """The baseline and `report-test` decide whose test numbers the report reads, so they are
    named before a cell's runs finish: once a cell has results, a spec may not make it the
    baseline or add it to `report-test` (dropping one is allowed: fewer test numbers are read)."""
    before = _read_json(out / "sweep.json")
    if before is None:
        return
    if before.get("baseline") != spec.baseline and finished:
        raise SpecError(f"baseline={spec.baseline!r} is invalid for {out}: its runs were made with "
                        f"baseline {before.get('baseline')!r}, and the baseline is named in advance; "
                        "give the sweep another --out")
    added = [name for name in spec.report_test
             if name not in before.get("report-test", []) and name != before.get("baseline") and name in finished]
    if added:
        raise SpecError(f"report-test names {added[0]!r}, which has finished runs in {out} and was not in "
                        "report-test before: test numbers are chosen in advance, not after a report; "
                        "give the sweep another --out")


def run_sweep(spec: Spec, out: str | Path, *, spec_path: str = "SPEC.toml", runner: Runner | None = None,
              say: Callable[[str], None] | None = None) -> dict[str, int]:
    """Run every run not finished yet; return how many were run, skipped and failed."""
    from fedssl.common.checkpoint import atomic_write

    out = Path(out)
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    runner = runner or api_runner()
    runs = plan(spec, out)
    states = [run_status(cell, cfg, folder) for cell, _, cfg, folder in runs]  # every folder checked first
    check_named_in_advance(spec, out, {cell.name for (cell, *_), state in zip(runs, states) if state != "todo"})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "sweep.json", lambda tmp: Path(tmp).write_text(
        json.dumps(manifest(spec, spec_path, out), indent=2)))
    if spec.text:
        atomic_write(out / "spec.toml", lambda tmp: Path(tmp).write_text(spec.text))
    counts = {"run": 0, "skipped": 0, "failed": 0}
    for index, ((cell, seed, cfg, folder), state) in enumerate(zip(runs, states), 1):
        where = f"sweep [{index}/{len(runs)}] {cell.name} seed {seed}"
        if state != "todo":
            say(f"{where}: {'finished' if state == 'done' else 'failed before'}; skipped")
            counts["skipped"] += 1
            continue
        if (folder / "metrics.jsonl").exists():
            say(f"{where}: cut short before; restarting it from round 0 in {folder}")
            (folder / "summary.json").unlink(missing_ok=True)  # a stale one must not read as done
        else:
            say(f"{where}: running in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        record = {"cell": cell.name, "seed": seed, "command": cell.command,
                  "harness": cell.harness, "partition_digest": partition_digest(cell, cfg)}
        atomic_write(folder / RUN_RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        started = time.perf_counter()
        try:
            runner(cell, cfg)
        except Exception as err:  # noqa: BLE001 - a diverged model is a result; anything else is raised
            diverged = _diverged_row(folder)
            if diverged is None:
                raise
            failure = {"config": cfg.to_mapping(), "round": diverged["round"],
                       "error": f"{type(err).__name__}: {err}"}
            atomic_write(folder / FAILED_MARKER, lambda tmp: Path(tmp).write_text(json.dumps(failure, indent=2)))
            say(f"{where}: the model went non-finite in round {diverged['round']}; marked failed")
            counts["failed"] += 1
            continue
        say(f"{where}: done in {time.perf_counter() - started:.0f} s")
        counts["run"] += 1
    return counts


def _diverged_row(folder: Path) -> dict[str, Any] | None:
    last = _last_row(folder / "metrics.jsonl")
    return last if last is not None and last.get("finite") is False else None


# -------------------------------------------------------------------------------- CLI

def add_commands(commands) -> None:
    sub = commands.add_parser("sweep", help="a grid of settings x seeds, resumable, with its report")
    sub.add_argument("spec", type=Path, metavar="SPEC.toml", help="the sweep spec (simulations/sweep.py)")
    sub.add_argument("--out", required=True, type=Path, metavar="DIR", help="the sweep's folder")
    sub.add_argument("--ray-address", default=None,
                     help="run every run's clients on this Ray cluster (runs still go one at a time)")
    sub.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    sub.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sub = commands.add_parser("sweep-report", help="a sweep's report: intervals over seeds, paired "
                              "differences, curves")
    sub.add_argument("sweep_dir", type=Path, metavar="DIR", help="a folder `fedssl sweep` wrote")


def interrupted_line(signum: int, args: argparse.Namespace) -> str:
    import signal

    again = shlex.join(["fedssl", "sweep", str(args.spec), "--out", str(args.out)])
    return (f"fedssl: sweep interrupted by {signal.Signals(signum).name}; finished runs are kept, "
            f"the run in progress starts again from round 0; continue with: {again}")


def run(args: argparse.Namespace) -> int:
    from fedssl.common.datasets import DataError
    from fedssl.simulations.plot import PlotError
    from fedssl.simulations.sweep_report import ReportError, write_report

    try:
        if args.command == "sweep-report":
            print(json.dumps({k: str(v) for k, v in write_report(args.sweep_dir).items()}, indent=2))
            return 0
        spec = load_spec(args.spec)
        if args.dry_run:
            for cell, seed, cfg, folder in plan(spec, args.out):
                print(f"{run_status(cell, cfg, folder):6s} {cell.name} seed {seed}: {folder}")
            return 0
        from fedssl.simulations.cli import interrupts_end_the_run

        with interrupts_end_the_run(lambda signum: interrupted_line(signum, args)):
            counts = run_sweep(spec, args.out, spec_path=str(args.spec),
                               runner=api_runner(args.ray_address, args.verbose))
        paths = write_report(args.out)
    except (SpecError, ConfigError, DataError, PlotError, ReportError, TimeoutError) as err:
        print(f"fedssl: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({**counts, **{k: str(v) for k, v in paths.items()}}, indent=2))
    return 0
