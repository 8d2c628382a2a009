"""What DP and SecAgg+ cost: the same tiny federated job (synthetic default data at 16 px,
resnet10, 20 sites of 500 images, 3 sampled a round, fp32) run plain, with DP (fixed clipping) and with SecAgg+, on the
in-process grid with the real ClientApp and server (no Ray start-up in the timings). For each:
final kNN top-1, seconds per round, and the bytes a site sends and receives per round
(Flower messages serialized as on the wire, all protocol stages included).

    nice -n 19 python benchmarks/privacy_cost.py [--rounds 2] [--image-size 16] [--out runs/privacy-cost]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.proto.message_pb2 import Message as ProtoMessage  # noqa: E402

from fedssl.client.app import app as client_app  # noqa: E402
from fedssl.common.config import RunConfig  # noqa: E402
from fedssl.simulations.inprocess_grid import InProcessGrid  # noqa: E402
from fedssl.server.app import run_federation  # noqa: E402

MODES = {
    "plain": {},
    "dp-fixed (z=1, C=1)": {"dp": "fixed", "dp_noise_multiplier": 1.0, "dp_clip_norm": 1.0,
                            "max_update_norm_ratio": 0.0},
    "secagg+ (3 of 3 shares, t=2)": {"secure_aggregation": True, "max_update_norm_ratio": 0.0},
}


class MeteredGrid(InProcessGrid):
    """Counts the serialized size of every message each way, and delivers copies, as the
    engines do."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.down = self.up = 0

    @property
    def run(self):
        return type("Run", (), {"run_id": 1})()

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        wire = [message_to_proto(m).SerializeToString() for m in messages]
        self.down += sum(len(w) for w in wire)
        copies = [message_from_proto(ProtoMessage.FromString(w)) for w in wire]
        replies = super().send_and_receive(copies, timeout=timeout)
        self.up += sum(len(message_to_proto(r).SerializeToString()) for r in replies)
        return replies


def run(mode: dict, rounds: int, sites: int, sampled: int, image_size: int, out: Path) -> dict:
    cfg = RunConfig(method="byol", num_rounds=rounds, fraction_train=sampled / sites,
                    min_train_clients=sampled, probe=False, image_size=image_size, amp=False,
                    eval_bank_size=2000, eval_query_size=1000, out_dir=str(out), node_wait_timeout=5.0,
                    **mode)
    grid = MeteredGrid(client_app, num_nodes=sites)
    start = time.perf_counter()
    summary = run_federation(grid, cfg)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"knn_top1_initial": rows[0]["knn_top1"], "knn_top1_final": rows[-1]["knn_top1"],
            "seconds_per_round": statistics.mean(r["seconds"] for r in rows[1:]),
            "seconds_total": round(seconds, 1),
            "mb_down_per_site_round": grid.down / sampled / rounds / 1e6,
            "mb_up_per_site_round": grid.up / sampled / rounds / 1e6,
            "privacy": summary["privacy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--sampled", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--out", default="runs/privacy-cost")
    args = parser.parse_args()
    results = {}
    for name, mode in MODES.items():
        results[name] = run(mode, args.rounds, args.sites, args.sampled, args.image_size, Path(args.out) / name.split()[0])
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "privacy"}), flush=True)
    print("| mode | kNN top-1 (start -> end) | s / round | MB down / sampled site / round | MB up / sampled site / round |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['knn_top1_initial']:.3f} -> {r['knn_top1_final']:.3f} | "
              f"{r['seconds_per_round']:.1f} | {r['mb_down_per_site_round']:.2f} | {r['mb_up_per_site_round']:.2f} |")
    print(json.dumps({n: r["privacy"] for n, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
