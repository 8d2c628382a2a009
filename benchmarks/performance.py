"""fedssl's performance, measured against a peer and against its own limits (issue 6).

    python benchmarks/performance.py all --data-path CIFAR10/train [--out runs/performance]
    python benchmarks/performance.py throughput|overhead|scale|aggregate|transfer [options]

- throughput: images/s of one client epoch (fedssl's hot path, train_epochs), the same
  method assembled from lightly (benchmarks/lightly_peer.py), and the model-only limit (the
  same loop on ready views: forward, backward, optimizer, EMA, no data pipeline); BYOL and
  SimSiam, each encoder; same images, batch, threads, precision; `--image-size` (32 by default),
  `--runs` to time only some of the three. On CUDA (`--device cuda`; benchmarks/gpu_check.sh)
  each batch is pinned and copied without blocking, augmented on the GPU, and stepped under
  bf16 autocast, as a client does.
- overhead: wall time of a `fedssl simulate` process (N clients, every client every round)
  over the clients' own training seconds divided by the clients that can run at once.
- scale: many virtual clients, few sampled: peak memory of the whole process tree (driver,
  Ray's daemons, workers) and seconds per round outside client training.
- aggregate: time and peak memory of one round's aggregation of U ResNet-18 replies, fedssl's
  (screening + FedAvg) against Flower's stock FedAvg.aggregate_train on the same replies.
- transfer: bytes per client per round each way and final kNN top-1, transfer-dtype float32
  against float16, the same job and seed (in-process grid: the real ClientApp and server).

Each writes OUT/<command>.json; `all` runs them in turn and writes OUT/performance.json and
OUT/performance.md (the tables for docs/performance.md). Other processes on the machine
stretch every number: run on an idle machine; the load average is recorded.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedssl.common.config import RunConfig  # noqa: E402
from fedssl.common.datasets import load_images  # noqa: E402
from fedssl.common.device import select_device, set_threads  # noqa: E402
from fedssl.common.methods import build_method  # noqa: E402
from fedssl.common.training import StepSettings, augmenter, train_epochs  # noqa: E402
from process_memory import TreePeak, current_rss, peak_rss, reset_peak_rss  # noqa: E402

TARGETS = {"vs_lightly": 1.5, "vs_model_only": 0.85, "overhead": 1.15, "scale_gb": 4.0,
           "knn_points": 0.5}
GB = 1e9


def cores() -> int:
    return len(os.sched_getaffinity(0))


def machine() -> dict:
    return {"cpus": cores(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1m": round(os.getloadavg()[0], 2)}


def overrides(pairs: list[str]) -> dict[str, str]:
    """`--set key=value ...`: run-config keys for the jobs this benchmark runs."""
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        out[key.strip()] = value.strip()
    return out


def data_settings(args) -> dict:
    # The method is pinned (BYOL unless --method): these federation measurements predate the
    # default job's SimCLR and are compared across sessions in docs/performance.md.
    settings = {"dataset": args.dataset, "data-path": args.data_path, "method": args.method}
    if args.eval_path:
        settings["eval-path"] = args.eval_path
    return settings


# ---------------------------------------------------------------------------- throughput

def _ours(cfg, images, device, augment=None):
    method = build_method(cfg)
    method.init_local()
    return train_epochs(method, images, augment or augmenter(cfg), epochs=1, device=device,
                        settings=StepSettings.from_config(cfg))


def _model_only(cfg, images, device):
    """The same loop, with the data pipeline replaced by one pair of ready views."""
    views = augmenter(cfg)(images[: cfg.batch_size].to(device), torch.Generator().manual_seed(0))
    return _ours(cfg, images, device, augment=lambda batch, generator: views)


def throughput(args) -> dict:
    if "lightly" in args.runs:  # the bench extra; not needed for fedssl's own rows
        import lightly_peer

    device = select_device(args.device)
    threads = set_threads(args.threads)
    if device.type == "cuda":
        # The GPU path measured as a client runs it (common/training.py): each batch pinned and
        # copied without blocking, augmentation on the GPU, bf16 autocast (amp); say so up front.
        print(json.dumps({"device": torch.cuda.get_device_name(), "pinned batches": True,
                          "augmentation on": "cuda", "autocast": "bf16" if RunConfig.amp else "off"}), flush=True)
    images = load_images(args.dataset, args.data_path, args.image_size).images[: args.images]
    warm = images[: 2 * args.batch]
    results = []
    for encoder in args.encoders:
        for method in args.methods:
            cfg = RunConfig.from_mapping({**overrides(args.set), "method": method, "encoder": encoder,
                                          "batch-size": args.batch, "image-size": args.image_size})
            runs = {"fedssl": lambda im: _ours(cfg, im, device),
                    "lightly": lambda im: lightly_peer.train_epoch(lightly_peer.build(cfg), im, cfg, device,
                                                                   workers=args.lightly_workers),
                    "model only": lambda im: _model_only(cfg, im, device)}
            runs = {name: run for name, run in runs.items() if name.replace(" ", "-") in args.runs}
            best = {}
            for name, run in runs.items():
                run(warm)  # first-call costs: allocator, oneDNN primitives, worker start-up
            for _ in range(args.repeats):  # interleaved: load from elsewhere hits all alike
                for name, run in runs.items():
                    best[name] = max(best.get(name, 0.0), run(images).images_per_second)
            results.append({"encoder": cfg.resolved_encoder, "method": method, "image size": args.image_size,
                            **{f"{k} images/s": round(v, 1) for k, v in best.items()}})
            if "fedssl" in best and "lightly" in best:
                results[-1]["x lightly"] = round(best["fedssl"] / best["lightly"], 2)
            if "fedssl" in best and "model only" in best:
                results[-1]["of model only"] = round(best["fedssl"] / best["model only"], 2)
            print(json.dumps(results[-1]), flush=True)
    checks = [check(f"{r['encoder']} {r['method']}: fedssl / lightly", r["x lightly"], ">=", TARGETS["vs_lightly"])
              for r in results if "x lightly" in r]
    checks += [check(f"{r['encoder']} {r['method']}: fedssl / model only", r["of model only"], ">=",
                     TARGETS["vs_model_only"]) for r in results if "of model only" in r]
    return {"settings": {"images": len(images), "image size": args.image_size, "batch": args.batch, "threads": threads,
                         "device": str(device), "amp": cfg.amp, "lightly_workers": args.lightly_workers,
                         "repeats": args.repeats, "dataset": args.dataset},
            "results": results, "checks": checks}


# ------------------------------------------------------------- simulations in a process

def simulate_process(flags: list[str], out: Path) -> dict:
    """`fedssl simulate` in its own process, its tree's memory sampled; its metrics rows."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=tempfile.mkdtemp(prefix="fedssl-bench-flwr-"))
    command = [sys.executable, "-m", "fedssl.simulations.cli", "simulate", *flags, "--out", str(out)]
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc, TreePeak(proc.pid) as memory:
        output, _ = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"fedssl simulate failed ({proc.returncode}):\n{output[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall": wall, "rows": rows, "peak_rss": memory.peak_rss, "peak_pss": memory.peak_pss,
            "processes": memory.peak_processes}


def run_flags(settings: dict) -> list[str]:
    return [token for key, value in settings.items() for token in (f"--{key}", str(value))]


def parallel_clients(client_cpus: float, per_round: int) -> int:
    return max(1, min(int(cores() // client_cpus), per_round))


def overhead(args) -> dict:
    client_cpus = args.client_cpus or float(cores())
    settings = {**data_settings(args), "num-rounds": args.rounds, "fraction-train": 1.0,
                "min-train-clients": args.clients, "local-epochs": 1, "probe": "false",
                "eval-bank-size": args.eval_images, "eval-query-size": args.eval_images, **overrides(args.set)}
    run = simulate_process(run_flags(settings) + ["--num-clients", str(args.clients),
                                                  "--client-cpus", str(client_cpus)],
                           Path(args.out) / "overhead-run")
    trained = sum(r["client_train_seconds"] for r in run["rows"][1:])
    parallel = parallel_clients(client_cpus, args.clients)
    ratio = run["wall"] / (trained / parallel)
    result = {"clients": args.clients, "rounds": args.rounds, "client cpus": client_cpus,
              "clients at once": parallel, "wall s": round(run["wall"], 1),
              "client training s (sum)": round(trained, 1),
              "server evaluation + rest s": round(run["wall"] - trained / parallel, 1),
              "wall / (training / parallel)": round(ratio, 3)}
    print(json.dumps(result), flush=True)
    return {"settings": settings, "results": [result],
            "checks": [check("federation overhead", result["wall / (training / parallel)"], "<=",
                             TARGETS["overhead"])]}


def scale(args) -> dict:
    """Twice: client state (BYOL's target) in Flower's context.state, as by default, and in
    files under a state directory (client/state_store.py), the setting for many clients."""
    client_cpus = args.client_cpus or float(cores())
    settings = {**data_settings(args), "num-rounds": args.rounds, "fraction-train": args.sampled / args.clients,
                "min-train-clients": args.sampled, "local-epochs": 1, "probe": "false",
                "eval-bank-size": args.eval_images, "eval-query-size": args.eval_images, **overrides(args.set)}
    parallel = parallel_clients(client_cpus, args.sampled)
    results = []
    for state, state_dir in (("context.state", ""), ("state dir", str(Path(args.out) / "scale-client-state"))):
        run = simulate_process(run_flags({**settings, "client-state-dir": state_dir})
                               + ["--num-clients", str(args.clients), "--client-cpus", str(client_cpus)],
                               Path(args.out) / f"scale-run-{state.replace(' ', '-')}")
        outside = [r["seconds"] - r["client_train_seconds"] / parallel for r in run["rows"][1:]]
        results.append({"client state": state, "virtual clients": args.clients, "sampled a round": args.sampled,
                        "rounds": args.rounds,
                        "peak RSS of the tree GB (sum)": round(run["peak_rss"] / GB, 2),
                        "peak PSS of the tree GB": round(run["peak_pss"] / GB, 2),
                        "processes (peak)": run["processes"],
                        "s a round outside client training (mean)": round(float(np.mean(outside)), 2),
                        "wall s": round(run["wall"], 1)})
        print(json.dumps(results[-1]), flush=True)
    return {"settings": settings, "results": results,
            "checks": [check(f"{args.clients} virtual clients ({r['client state']}), peak RSS GB",
                             r["peak RSS of the tree GB (sum)"], "<=", TARGETS["scale_gb"]) for r in results]}


# ---------------------------------------------------------------------------- aggregate

def _replies(strategy, grid, cfg, model, updates: int):
    """A round as the server sees it: the messages it sends, and U replies to them, each the
    global model plus its own small seeded change."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    messages = list(strategy.configure_train(1, model, ConfigRecord(cfg.to_mapping()), grid))
    replies = []
    for i, message in enumerate(messages[:updates]):
        rng = np.random.default_rng(i)
        arrays = {k: v.numpy() for k, v in model.items()}
        changed = {k: (v + rng.standard_normal(v.shape, np.float32) * 1e-3).astype(v.dtype)
                   if v.dtype.kind == "f" else v for k, v in arrays.items()}
        replies.append(Message(RecordDict({
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in changed.items()}),
            "metrics": MetricRecord({"num-examples": 500 + i, "train-loss": 1.0, "train-seconds": 1.0})}),
            reply_to=message))
    return replies


def _measure(aggregate, model_bytes: int, repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        aggregate()
        seconds.append(time.perf_counter() - start)
    gc.collect()
    baseline = current_rss()
    reset_peak_rss()
    tracemalloc.start()
    aggregate()
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    extra_rss = max(peak_rss() - baseline, 0)
    return {"s (best)": round(min(seconds), 3), "peak traced MB": round(traced / 1e6, 1),
            "peak RSS growth MB": round(extra_rss / 1e6, 1),
            "model copies (traced)": round(traced / model_bytes, 2)}


def aggregate(args) -> dict:
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fedssl.common.records import to_record
    from fedssl.simulations.inprocess_grid import InProcessGrid
    from fedssl.server.strategies import build_strategy

    set_threads(args.threads)
    cfg = RunConfig.from_mapping({**overrides(args.set), "method": args.method, "encoder": args.encoder,
                                  "fraction-train": 1.0, "min-train-clients": args.updates})
    model = to_record(build_method(cfg).shared_state())
    model_bytes = model.count_bytes()
    grid = InProcessGrid(lambda msg, context: None, num_nodes=args.updates)
    ours = build_strategy(cfg)
    replies = _replies(ours, grid, cfg, model, args.updates)
    stock = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)

    def run_ours():
        # the round's bookkeeping first (who was sent what), as in a run; not a copy of the model
        ours.configure_train(1, model, ConfigRecord(cfg.to_mapping()), grid)
        arrays, _ = ours.aggregate_train(1, replies)
        assert arrays is not None, ours.round_record(1)

    def run_stock():
        arrays, _ = stock.aggregate_train(1, replies)
        assert arrays is not None

    results = [{"aggregation": "Flower FedAvg.aggregate_train", **_measure(run_stock, model_bytes, args.repeats)},
               {"aggregation": "fedssl fedavg (screening + FedAvg)", **_measure(run_ours, model_bytes, args.repeats)}]
    for r in results:
        print(json.dumps(r), flush=True)
    return {"settings": {"updates": args.updates, "encoder": args.encoder, "method": args.method,
                         "model MB": round(model_bytes / 1e6, 1), "repeats": args.repeats},
            "results": results,
            "checks": [check("aggregation time fedssl / Flower", round(results[1]["s (best)"] / results[0]["s (best)"], 3),
                             "<=", 1.0),
                       # O(1): an accumulator, one reply being read, one temporary
                       check("aggregation model copies (fedssl)", results[1]["model copies (traced)"], "<=", 3.0)]}


# ----------------------------------------------------------------------------- transfer

def transfer(args) -> dict:
    from fedssl.client.app import app as client_app
    from fedssl.simulations.inprocess_grid import InProcessGrid
    from fedssl.server.app import run_federation
    from fedssl.simulations.cli import load_preset

    base = {**(load_preset(args.preset) if args.preset else {}), **data_settings(args), **overrides(args.set)}
    results = []
    for seed in args.seeds:
        for dtype in ("float32", "float16"):
            out = Path(args.out) / f"transfer-{dtype}-seed{seed}"
            cfg = RunConfig.from_mapping({**base, "seed": seed, "transfer-dtype": dtype, "out-dir": str(out)})
            start = time.perf_counter()
            run_federation(InProcessGrid(client_app, num_nodes=args.clients), cfg)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
            sampled = [r["clients_ok"] + r["clients_failed"] for r in rows]
            results.append({"transfer": dtype, "seed": seed,
                            "MB down / client / round": round(np.mean([r["bytes_sent"] / n for r, n in zip(rows, sampled)]) / 1e6, 3),
                            "MB up / client / round": round(np.mean([r["bytes_received"] / max(r["clients_ok"], 1) for r in rows]) / 1e6, 3),
                            "final kNN top-1": rows[-1]["knn_top1"], "wall s": round(time.perf_counter() - start, 1)})
            print(json.dumps(results[-1]), flush=True)
    wide = [r for r in results if r["transfer"] == "float32"]
    narrow = [r for r in results if r["transfer"] == "float16"]
    knn_points = 100 * float(np.mean([n["final kNN top-1"] - w["final kNN top-1"] for w, n in zip(wide, narrow)]))
    down = narrow[0]["MB down / client / round"] / wide[0]["MB down / client / round"]
    up = narrow[0]["MB up / client / round"] / wide[0]["MB up / client / round"]
    return {"settings": {**base, "clients": args.clients, "seeds": args.seeds}, "results": results,
            "checks": [check("fp16 bytes down / fp32", round(down, 3), "<=", 0.51),
                       check("fp16 bytes up / fp32", round(up, 3), "<=", 0.51),
                       check("|kNN top-1 fp16 - fp32| (points, mean over seeds)", round(abs(knn_points), 2), "<=",
                             TARGETS["knn_points"])]}


# ------------------------------------------------------------------------------- report

def check(what: str, value: float, relation: str, target: float) -> dict:
    ok = value >= target if relation == ">=" else value <= target
    return {"what": what, "value": value, "target": f"{relation} {target}", "met": bool(ok)}


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def report(sections: dict) -> str:
    parts = [f"Machine: {json.dumps(machine())}", ""]
    for name, section in sections.items():
        parts += [f"## {name}", "", f"Settings: `{json.dumps(section['settings'])}`", "",
                  markdown_table(section["results"]), "", markdown_table(section["checks"]), ""]
    return "\n".join(parts)


COMMANDS = {"throughput": throughput, "overhead": overhead, "scale": scale, "aggregate": aggregate,
            "transfer": transfer}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    top.add_argument("command", choices=[*COMMANDS, "all"])
    top.add_argument("--out", default="runs/performance")
    top.add_argument("--dataset", default="imagefolder")
    top.add_argument("--data-path", default="", help="CIFAR-10 JPEG folders (train/<class>/*.jpg)")
    top.add_argument("--eval-path", default="", help="labelled folder for the kNN monitor (default: data)")
    top.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                     help="run-config keys for every job (e.g. image-size=16 for a smoke run)")
    top.add_argument("--threads", type=int, default=0, help="0: all cores given to this process")
    top.add_argument("--device", default="auto")
    # throughput
    top.add_argument("--images", type=int, default=5000, help="one client's epoch (CIFAR-10 / 10)")
    top.add_argument("--batch", type=int, default=RunConfig.batch_size)
    top.add_argument("--encoders", nargs="+", default=["resnet10", "resnet18"])
    top.add_argument("--methods", nargs="+", default=["byol", "simsiam"])
    top.add_argument("--lightly-workers", type=int, default=0, help="DataLoader workers for lightly")
    top.add_argument("--image-size", type=int, default=32, help="throughput: side images are decoded and trained at")
    top.add_argument("--runs", nargs="+", default=["fedssl", "lightly", "model-only"],
                     choices=["fedssl", "lightly", "model-only"], help="throughput: which loops to time")
    top.add_argument("--repeats", type=int, default=1, help="best of this many (interleaved)")
    # overhead and scale
    top.add_argument("--clients", type=int, default=None, help="overhead 10, scale 1000, transfer 5")
    top.add_argument("--sampled", type=int, default=10, help="scale: clients sampled a round")
    top.add_argument("--rounds", type=int, default=3)
    top.add_argument("--client-cpus", type=float, default=0.0, help="0: all cores, one client at a time")
    top.add_argument("--eval-images", type=int, default=1000,
                     help="kNN bank and query size: a small monitor, so the federation is measured")
    top.add_argument("--method", default="byol", help="overhead, scale, transfer, aggregate: the method")
    # aggregate
    top.add_argument("--updates", type=int, default=100)
    top.add_argument("--encoder", default="resnet18")
    # transfer
    top.add_argument("--preset", default="", help="transfer: a fedssl preset for the job")
    top.add_argument("--seeds", type=int, nargs="+", default=[0])
    return top


DEFAULT_CLIENTS = {"overhead": 10, "scale": 1000, "transfer": 5}


def main() -> None:
    args = parser().parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per sampled round otherwise
    Path(args.out).mkdir(parents=True, exist_ok=True)
    names = list(COMMANDS) if args.command == "all" else [args.command]
    clients = args.clients
    sections = {}
    for name in names:
        args.clients = clients or DEFAULT_CLIENTS.get(name)
        started = time.perf_counter()
        section = {"machine": machine(), **COMMANDS[name](args)}
        section["seconds"] = round(time.perf_counter() - started, 1)
        (Path(args.out) / f"{name}.json").write_text(json.dumps(section, indent=1))
        sections[name] = section
    if args.command == "all":
        (Path(args.out) / "performance.json").write_text(json.dumps(sections, indent=1))
    (Path(args.out) / f"{args.command if args.command != 'all' else 'performance'}.md").write_text(report(sections))
    print(report(sections))


if __name__ == "__main__":
    main()
