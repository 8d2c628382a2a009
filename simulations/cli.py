"""The `fedssl` command: `simulate` (federated, on Flower's simulation engine) and
`centralized` (the pooled-data baseline), where every run-config key is also a flag; the
deployment commands (deploy_cli) and those that use a run's outputs (analysis_cli)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

from common.config import ConfigError, RunConfig, defaults
from simulations import analysis_cli, deploy_cli

PRESETS_DIR = Path(__file__).parent / "presets"
# Flags that are easier to type than their run-config keys.
ALIASES = {"rounds": "num-rounds", "fraction": "fraction-train", "out": "out-dir"}
HARNESS_DEFAULTS = {"num-clients": 5, "client-cpus": float(len(os.sched_getaffinity(0))),
                    "client-gpus": 0.0, "ray-address": ""}


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
        for key, default in defaults().items():
            flags = [f"--{key}"] + [f"--{a}" for a, k in ALIASES.items() if k == key]
            # A bare boolean flag (`--resume`) means true.
            bare = {"nargs": "?", "const": "true"} if isinstance(default, bool) else {}
            sub.add_argument(*flags, dest=key, default=None, metavar=type(default).__name__.upper(),
                             help=f"(default: {default!r})", **bare)
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
    return top


def settings(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any]]:
    """Preset first, then flags; split into the run config and the harness settings."""
    values: dict[str, Any] = load_preset(args.preset) if args.preset else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in
                   ("command", "preset", "verbose")})
    harness = {k: values.pop(k, d) for k, d in HARNESS_DEFAULTS.items()}
    return RunConfig.from_mapping(values), harness


def preflight(cfg: RunConfig, num_clients: int | None) -> None:
    """Fail in one line before starting Ray, and decode the images once (the disk cache
    then serves every client process)."""
    from common.datasets import load_eval_split, training_images
    from common.partition import partition_indices
    from server.evaluation import eval_source
    from server.strategies import build_strategy
    from server.tracking import check_installed

    check_installed(cfg)
    if cfg.resume:
        from server.app import resume_point
        resume_point(cfg, Path(cfg.out_dir).expanduser())
    build_strategy(cfg)
    images = training_images(cfg.dataset, cfg.data_path, cfg.image_size, cfg.max_images, cfg.seed,
                             eval_path=cfg.eval_path)
    if num_clients is not None:
        if num_clients < cfg.min_train_clients:
            raise ConfigError(f"num-clients={num_clients} is invalid: must be >= "
                              f"min-train-clients ({cfg.min_train_clients})")
        labels = None if images.labels is None else images.labels.numpy()
        partition_indices(len(images), labels, num_clients, cfg.partition, alpha=cfg.alpha,
                          shards_per_client=cfg.shards_per_client, seed=cfg.seed)
    load_eval_split(*eval_source(cfg), cfg.image_size, seed=cfg.seed)


def quiet_engines(verbose: bool) -> None:
    if verbose:
        return
    import logging
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in deploy_cli.COMMANDS:
        return deploy_cli.run(args)
    if args.command in analysis_cli.COMMANDS:
        return analysis_cli.run(args)
    from common.datasets import DataError

    try:
        cfg, harness = settings(args)
        if args.command == "simulate":
            preflight(cfg, harness["num-clients"])
            quiet_engines(args.verbose)
            from simulations.engine import simulate
            summary = simulate(cfg, num_clients=harness["num-clients"],
                               client_cpus=harness["client-cpus"], client_gpus=harness["client-gpus"],
                               ray_address=harness["ray-address"] or None)
        else:
            preflight(cfg, None)
            from simulations.centralized import run_centralized
            summary = run_centralized(cfg)
    except (ConfigError, DataError, UsageError, TimeoutError) as err:
        print(f"fedssl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedssl: interrupted", file=sys.stderr)
        return 130
    print(json.dumps({k: summary[k] for k in ("out_dir", "seconds", "knn_top1_gain")} |
                     {"initial_knn_top1": summary["initial"].get("knn_top1"),
                      "final_knn_top1": summary["final"].get("knn_top1"),
                      "final_probe_top1": summary["final"].get("probe_top1")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
