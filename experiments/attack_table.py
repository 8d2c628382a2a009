"""Issue 22's measurement: the final-round kNN top-1 of each aggregation rule against each
simulated attack (simulations/attacks.py), over seeds 0-2, at a scale this 2-core CPU runs
in about an hour (11 min pretraining, then 13-25 min a seed: 36 runs). docs/security.md holds
the tables and the command. Cells already measured under --out are read back, not rerun.

    python experiments/attack_table.py --out runs/attack-table

Every cell is FedBYOL on the embedded synthetic set, `--sites` sites all training every
round (Krum's n >= 2 f + 3 and Bulyan's n >= 4 f + 3 hold for every round), the first
`--attack-sites` of them attacking, each rule told f = `--attack-sites` (num-malicious).
Every cell starts from one model that FedAvg trained without attack first (OUT/pretrain, its
checkpoint as `init-weights`): from a random encoder, BYOL's first rounds lower kNN even
without attack, which would mix with what an attack does.

Two tables: the final-round kNN top-1; and, each round, how far the rule's aggregate lands
from the example-weighted mean of the honest sites' replies, in units of the honest mean's
own step (|| aggregate - honest mean || / || honest mean - previous global ||, float weights,
BatchNorm statistics left out; averaged over the rounds). 0 is the honest mean itself; 1 is
as far off as not moving at all. kNN at this scale moves little in a few rounds, so the
second table shows what a rule lets an attack do to each round's model directly.

A run is `run_federation` (the ServerApp's own function, server/app.py) with the simulation's
ClientApp (simulations/attacks.py, which `fedssl simulate` runs) on the in-process
grid: the same server and client code as `fedssl simulate`, without a Ray start-up per run;
the clients train one after another, as `fedssl simulate` runs them on 2 cores anyway.

Each run lives in OUT/RULE/ATTACK/seed-S/ (a plain run directory) and ends with result.json;
a run that has one is not run again, so an interrupted grid continues where it stopped (a
run cut short starts again from round 0). A model that went non-finite is a result
(result.json says so), not a crash. The Markdown table (mean and 95% Student t-interval over
seeds, the final round, never the best) is printed and written to OUT/table.md; --table-only
writes it from the runs there.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from fedssl.common.config import ATTACKS, RunConfig  # noqa: E402
from fedssl.simulations.sweep_report import t_interval  # noqa: E402

RULES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def run_config(args, rule: str, attack: str, seed: int, out: Path, *, rounds: int,
               images_per_site: int, init_weights: str) -> RunConfig:
    # One torch thread: on a shared 2-core host two oversubscribe (5 against 25 images/s here).
    return RunConfig(
        method="byol", strategy=rule, attack=attack, attack_sites=args.attack_sites,
        num_malicious=args.attack_sites, dataset="synthetic", max_images=args.sites * images_per_site,
        encoder=args.encoder, image_size=args.image_size, proj_dim=64, hidden_dim=256,
        batch_size=args.batch_size, num_rounds=rounds, fraction_train=1.0,
        min_train_clients=args.sites, node_wait_timeout=5.0, eval_every=rounds,
        eval_bank_size=args.eval_images, eval_query_size=args.eval_images, knn_k=20, probe=False, threads=1,
        init_weights=init_weights, seed=seed, out_dir=str(out))


def pretrained(args) -> Path:
    """The model every cell starts from: FedAvg without attack, seed 0."""
    out = Path(args.out) / "pretrain"
    run(run_config(args, "fedavg", "none", 0, out, rounds=args.pretrain_rounds,
                   images_per_site=args.pretrain_images_per_site, init_weights=""), args)
    return out / "checkpoint.safetensors"


def run_cell(args, rule: str, attack: str, seed: int, start: Path) -> dict:
    out = Path(args.out) / rule / attack / f"seed-{seed}"
    return run(run_config(args, rule, attack, seed, out, rounds=args.rounds,
                          images_per_site=args.images_per_site, init_weights=str(start)), args)


def is_weight(key: str, value: np.ndarray) -> bool:
    from fedssl.client.privacy import is_statistic
    return value.dtype.kind == "f" and not is_statistic(key)


class HonestMean:
    """The simulation's ClientApp, summing the honest sites' float weights each round
    (example-weighted) on their way to the server."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.sums: dict[int, dict[str, np.ndarray]] = {}
        self.weights: dict[int, float] = {}

    def __call__(self, msg, context):
        from fedssl.server.npy_view import as_numpy
        from fedssl.simulations import attacks

        reply = attacks.app(msg, context)
        if reply.has_error() or attacks.is_attacker(self.cfg, context.node_config):
            return reply
        server_round = int(msg.content["config"]["server-round"])
        examples = float(reply.content["metrics"]["num-examples"])
        total = self.sums.setdefault(server_round, {})
        for key, value in as_numpy(reply.content["arrays"]).items():
            if is_weight(key, value):
                total[key] = total.get(key, 0.0) + examples * value.astype(np.float64)
        self.weights[server_round] = self.weights.get(server_round, 0.0) + examples
        return reply

    def mean(self, server_round: int) -> dict[str, np.ndarray]:
        return {k: v / self.weights[server_round] for k, v in self.sums[server_round].items()}


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in b))


def influence(grid, honest: HonestMean, final: dict[str, np.ndarray], rounds: int) -> list[float]:
    """Each round's || aggregate - honest mean || / || honest mean - previous global ||. The
    global model before round r is what the server sent in round r (the grid keeps it)."""
    from fedssl.server.npy_view import as_numpy

    sent = {int(m.content["config"]["server-round"]): m for m in grid.sent}
    globals_ = [as_numpy(sent[r].content["arrays"]) for r in range(1, rounds + 1)] + [final]
    return [distance(globals_[r], honest.mean(r)) / distance(globals_[r - 1], honest.mean(r))
            for r in range(1, rounds + 1)]


def run(cfg: RunConfig, args) -> dict:
    from fedssl.simulations.inprocess_grid import InProcessGrid
    from fedssl.server.app import run_federation
    from fedssl.server.evaluation import NonFiniteModel
    from fedssl.server.resume import load_run_state
    from fedssl.simulations import attacks

    done = Path(cfg.out_dir) / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    attacks.check(cfg, args.sites)
    clock = time.perf_counter()
    honest = HonestMean(cfg)
    grid = InProcessGrid(honest, num_nodes=args.sites)
    try:
        summary = run_federation(grid, cfg)
        final = {k: v.numpy() for k, v in load_run_state(Path(cfg.out_dir) / "checkpoint.safetensors").shared.items()}
        result = {"finite": True, "knn_top1": summary["final"]["knn_top1"],
                  "initial_knn_top1": summary["initial"]["knn_top1"],
                  "influence": influence(grid, honest, final, cfg.num_rounds)}
    except NonFiniteModel as err:
        result = {"finite": False, "knn_top1": None, "reason": str(err)}
    result["seconds"] = round(time.perf_counter() - clock, 1)
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def cell_text(results: list[dict], value) -> str:
    finite = [value(r) for r in results if r["finite"]]
    broken = len(results) - len(finite)
    interval = t_interval(finite)
    if interval.mean is None:
        text = "-"
    elif interval.low is None:
        text = f"{interval.mean:.3f}"
    else:
        text = f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]"
    return text + (f" ({broken} of {len(results)} NaN)" if broken else "")


def results_of(args, rule: str, attack: str) -> list[dict]:
    folder = Path(args.out) / rule / attack
    return [json.loads(p.read_text()) for p in sorted(folder.glob("seed-*/result.json"))
            if int(p.parent.name.split("-")[1]) in args.seeds]


def grid_table(args, value) -> str:
    lines = ["| rule | " + " | ".join(args.attacks) + " |", "| --- |" + " --- |" * len(args.attacks)]
    for rule in args.rules:
        cells = [cell_text(results_of(args, rule, attack), value) for attack in args.attacks]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(args) -> str:
    initial = t_interval(r["initial_knn_top1"] for rule in args.rules for attack in args.attacks
                         for r in results_of(args, rule, attack) if r.get("initial_knn_top1") is not None)
    start = (f"Round 0 (the pretrained model every cell starts from, before any attack): kNN "
             f"top-1 {initial.mean:.3f} (mean of {initial.n} runs; the seeds draw other kNN samples).\n"
             if initial.mean is not None else "")
    return ("Final-round kNN top-1, mean [95% t-interval] over seeds:\n\n"
            + grid_table(args, lambda r: r["knn_top1"]) + "\n" + start
            + "\nDistance of each round's aggregate from the honest sites' mean, in honest steps "
              "(0: the honest mean; 1: as far as not moving), mean over rounds, then mean "
              "[95% t-interval] over seeds:\n\n"
            + grid_table(args, lambda r: statistics.fmean(r["influence"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/attack-table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--sites", type=int, default=7, help="every site trains every round")
    parser.add_argument("--attack-sites", type=int, default=1, help="attackers, and every rule's f")
    parser.add_argument("--images-per-site", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pretrain-rounds", type=int, default=8)
    parser.add_argument("--pretrain-images-per-site", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoder", default="resnet10")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--eval-images", type=int, default=500, help="kNN bank and query size each")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        start = pretrained(args)
        # Seed-major: with the first seed done for every cell, a table exists early.
        for seed in args.seeds:
            for rule in args.rules:
                for attack in args.attacks:
                    result = run_cell(args, rule, attack, seed, start)
                    print(f"{rule} {attack} seed {seed}: kNN {result['knn_top1']} ({result['seconds']} s)",
                          flush=True)
    text = table(args)
    (Path(args.out) / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
