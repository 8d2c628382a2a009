"""Same seed, same numbers: a fingerprint of what every aggregation rule (and DP) computes, for
checking that a change meant to keep behaviour (a redesign) keeps it.

    python benchmarks/rule_digests.py > after.txt
    git stash; python benchmarks/rule_digests.py > before.txt; git stash pop
    diff before.txt after.txt          # no output: every rule computed the same

Each line is one run on the in-process grid (3 sites of a small synthetic image folder, 3
rounds, seed 0): a hash of its metrics rows (timings left out) and of the final checkpoint's
shared arrays, and the final kNN top-1. Runs whose noise is seeded by the operating system
(DP's adaptive clipping count, SecAgg+) differ from run to run by design and are not listed.
Compare only outputs of one machine: floating-point results differ between CPUs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

from fedssl.client.app import app as client_app
from fedssl.common.config import RunConfig
from fedssl.common.synthetic import write_image_folder
from fedssl.server.app import run_federation
from fedssl.server.resume import load_run_state
from fedssl.simulations.inprocess_grid import InProcessGrid

ROBUST = dict(min_train_clients=3, num_malicious=0)
CASES = {
    "fedavg": dict(strategy="fedavg"),
    "fedavgm": dict(strategy="fedavgm"),
    "fedadam": dict(strategy="fedadam"),
    "fedadam, 2 of 3 sites a round": dict(strategy="fedadam", fraction_train=0.5),
    "fedu": dict(strategy="fedu"),
    "fedema": dict(strategy="fedema"),
    "ldawa": dict(strategy="ldawa"),
    "fedmedian": dict(strategy="fedmedian", **ROBUST),
    "fedtrimmedavg": dict(strategy="fedtrimmedavg", **ROBUST),
    "krum": dict(strategy="krum", **ROBUST),
    "multikrum": dict(strategy="multikrum", **ROBUST),
    "bulyan": dict(strategy="bulyan", **ROBUST),
    "fedavg, dp fixed, no noise": dict(strategy="fedavg", dp="fixed", max_update_norm_ratio=0.0,
                                       dp_noise_multiplier=0.0),
    "simsiam + fedavg": dict(method="simsiam"),
}


def digest(out: Path) -> tuple[str, float | None]:
    rows = [{k: v for k, v in json.loads(line).items() if "seconds" not in k and "per_second" not in k}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    shared = load_run_state(out / "checkpoint.safetensors").shared
    h = hashlib.sha256(json.dumps(rows, sort_keys=True).encode())
    for key in sorted(shared):
        h.update(shared[key].numpy().tobytes())
    return h.hexdigest()[:16], rows[-1].get("knn_top1")


def main() -> None:
    logging.getLogger("fedssl").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="rule-digests-"))
    images = write_image_folder(root / "images", per_class=6)
    for name, settings in CASES.items():
        out = root / str(len(list(root.iterdir())))
        cfg = RunConfig(**{**dict(method="byol", dataset="imagefolder", data_path=str(images),
                                  eval_path=str(images), image_size=16, batch_size=4, proj_dim=32,
                                  hidden_dim=64, num_rounds=3, min_train_clients=2, fraction_train=1.0,
                                  knn_k=5, probe=False, threads=1, seed=0, node_wait_timeout=5.0,
                                  out_dir=str(out)),
                               **settings})
        run_federation(InProcessGrid(client_app, num_nodes=3), cfg)
        fingerprint, knn = digest(out)
        print(f"{name}: {fingerprint} knn {knn}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
