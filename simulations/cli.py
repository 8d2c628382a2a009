"""The `fedssl` command: `simulate` (federated, on Flower's simulation engine) and
`centralized` (the pooled-data baseline), where every run-config key is also a flag; the
deployment commands (deploy_cli), those that use a run's outputs (analysis_cli), and
`sweep` / `sweep-report` (settings x seeds, with intervals: sweep)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import fedssl
from fedssl.common.config import ConfigError, RunConfig, defaults, key_help
from fedssl.preflight import HARNESS_DEFAULTS
from fedssl.run_config import parse_run_config, run_config
from fedssl.simulations import analysis_cli, deploy_cli, sweep

PRESETS_DIR = Path(__file__).parent / "presets"
# Flags that are easier to type than their run-config keys.
ALIASES = {"rounds": "num-rounds", "fraction": "fraction-train", "out": "out-dir"}


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


def load_preset(name: str) -> dict[str, Any]:
    path = Path(name)
    if not path.exists():
        path = PRESETS_DIR / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
        raise UsageError(f"--preset {name!r}: no such file or preset; presets: {known}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"--preset {path}: not valid TOML: {err}") from None


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fedssl", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    for name, help_text in (("simulate", "federated run of N virtual clients on one machine"),
                            ("centralized", "baseline: the same method on the pooled data")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--preset", help="TOML file of settings, or a name from simulations/presets")
        sub.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
        sub.add_argument("--run-config", dest="run_config", action="append", metavar='"KEY=VALUE ..."',
                         help="run-config keys as `flwr run --run-config` takes them (TOML values, "
                              "strings quoted), or a FILE.toml; the flags below win")
        helps = key_help()
        for key, default in defaults().items():
            flags = [f"--{key}"] + [f"--{a}" for a, k in ALIASES.items() if k == key]
            # A bare boolean flag (`--resume`) means true.
            bare = {"nargs": "?", "const": "true"} if isinstance(default, bool) else {}
            sub.add_argument(*flags, dest=key, default=None, metavar=type(default).__name__.upper(),
                             help=f"{helps[key]} (default: {default!r})".replace("%", "%%"), **bare)
        if name == "simulate":
            sub.add_argument("--num-clients", dest="num-clients", type=int, default=None,
                             help=f"virtual clients (default: {HARNESS_DEFAULTS['num-clients']})")
            sub.add_argument("--client-cpus", dest="client-cpus", type=float, default=None,
                             help="CPUs per client; default: all cores, one client at a time")
            sub.add_argument("--client-gpus", dest="client-gpus", type=float, default=None,
                             help="GPU share per client (default: 0)")
            sub.add_argument("--ray-address", dest="ray-address", default=None,
                             help="connect to an existing Ray cluster instead of starting one")
    deploy_cli.add_commands(commands)
    analysis_cli.add_commands(commands)
    sweep.add_commands(commands)
    return top


def settings(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any]]:
    """Preset first, then --run-config, then flags; split into the run config and the
    harness settings."""
    values: dict[str, Any] = load_preset(args.preset) if args.preset else {}
    if args.run_config:
        values.update(parse_run_config(args.run_config))
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in
                   ("command", "preset", "verbose", "run_config")})
    harness = {k: values.pop(k, d) for k, d in HARNESS_DEFAULTS.items()}
    return run_config(values), harness


def checkpoint_round(out_dir: str, since: float) -> int | None:
    """The round the run's checkpoint holds; None without one, or when the file predates
    `since` (a previous run's, which a fresh run in the same folder replaces at round 0)."""
    path = Path(out_dir).expanduser() / "checkpoint.safetensors"
    try:
        if path.stat().st_mtime < since:
            return None
        from fedssl.common.checkpoint import read_metadata
        return int(read_metadata(path)["round"])
    except Exception:  # noqa: BLE001 - asked while exiting: no checkpoint is the safe answer
        return None


def interrupted_line(signum: int, args: argparse.Namespace, argv: list[str], cfg: RunConfig,
                     started: float) -> str:
    """The one line an interrupted run prints: what the checkpoint holds and the command that
    continues it (the same line, plus --resume and, where it came from a default, --out)."""
    prog = ["fedssl"] if Path(sys.argv[0]).name == "fedssl" else [sys.executable, "-m", "fedssl.simulations.cli"]
    again = [*prog, *argv] + ([] if getattr(args, "out-dir") else ["--out", cfg.out_dir])
    said = f"fedssl: interrupted by {signal.Signals(signum).name}"
    if args.command != "simulate":
        return f"{said}; a {args.command} run keeps no checkpoint; start it again with: {shlex.join(again)}"
    held = checkpoint_round(cfg.out_dir, 0.0 if cfg.resume else started)
    if held is None:
        return f"{said} before the first checkpoint; start again with: {shlex.join(again)}"
    resume = again + ([] if cfg.resume else ["--resume"])
    return (f"{said}; the checkpoint holds round {held} of {cfg.num_rounds}; "
            f"resume with: {shlex.join(resume)}")


def descendants() -> list[int]:
    """Every process this one started and theirs (Ray's daemons, agents and workers), parents
    before their children, found in /proc (Linux; elsewhere nothing is found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (name) state ppid ...": the name may hold spaces and parentheses
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            found.append(child)
    return found


def kill_after_exit(pids: list[int]) -> None:
    """SIGKILL `pids` once this process has exited, from a small shell started now: killed
    while this process still runs, Ray's core worker in it sees its raylet die and can end
    the process first, with its own exit code 1 (seen once in CI)."""
    if not pids:
        return
    listed = " ".join(map(str, pids))
    # Up to 2 s for this process to be gone (a parent that never reaps it: kill anyway).
    script = (f"i=0; while kill -0 {os.getpid()} 2>/dev/null && [ $i -lt 200 ]; do sleep 0.01; i=$((i+1)); "
              f"done; kill -9 {listed} 2>/dev/null; exit 0")
    subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True)


@contextmanager
def interrupts_end_the_run(line: Callable[[int], str]) -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM (systemd, schedulers) end the run at once: print
    `line(signal)`, kill the processes this one started (Ray's), exit with 128 + the signal's
    number, without unwinding. Nothing is lost but the round in progress: checkpoints are
    written atomically, and a resumed run rebuilds metrics.jsonl from its checkpoint.
    At once, not after ray.shutdown() (seconds): meanwhile Flower's threads would fail the
    round in progress and the ServerApp record it, making the line untrue, and Ray's core
    worker can end the process first with its own exit code (both seen). A cluster given by
    --ray-address drops this driver's actors when it exits."""
    def handler(signum: int, frame: Any) -> None:
        try:
            print(line(signum), file=sys.stderr, flush=True)
        finally:
            kill_after_exit(descendants())
            os._exit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a caller elsewhere keeps its own
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.command in deploy_cli.COMMANDS:
        return deploy_cli.run(args)
    if args.command in analysis_cli.COMMANDS:
        return analysis_cli.run(args)
    if args.command in sweep.COMMANDS:
        return sweep.run(args)
    from fedssl.common import checkpoint  # noqa: F401  read by the signal handler, which must not import
    from fedssl.common.datasets import DataError

    try:
        cfg, harness = settings(args)
        if not cfg.out_dir and not cfg.resume:  # named now, so an interrupted run can say where
            from fedssl.server.run_dir import default_out_dir
            cfg = cfg.replace(out_dir=str(default_out_dir()))
        started = time.time()
        with interrupts_end_the_run(lambda signum: interrupted_line(signum, args, argv, cfg, started)):
            if args.command == "simulate":
                summary = fedssl.simulate(cfg, num_clients=harness["num-clients"],
                                          client_cpus=harness["client-cpus"],
                                          client_gpus=harness["client-gpus"],
                                          ray_address=harness["ray-address"] or None,
                                          verbose=args.verbose)
            else:
                summary = fedssl.centralized(cfg)
    except (ConfigError, DataError, UsageError, TimeoutError) as err:
        print(f"fedssl: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("out_dir", "seconds", "knn_top1_gain")} |
                     {"initial_knn_top1": summary["initial"].get("knn_top1"),
                      "final_knn_top1": summary["final"].get("knn_top1"),
                      "final_probe_top1": summary["final"].get("probe_top1")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
