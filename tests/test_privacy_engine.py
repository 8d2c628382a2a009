"""SecAgg+ end to end on Flower's real simulation engine (Ray): every protocol stage is a
serialized message to a Ray actor, and the SecAgg+ state lives in each node's context."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def test_fedssl_simulate_with_secure_aggregation(small_image_folder, tmp_path):
    out = tmp_path / "run"
    args = ["--secure-aggregation", "--max-update-norm-ratio", "0", "--secagg-max-weight", "16",
            "--min-train-clients", "3", "--dataset", "imagefolder", "--data-path", str(small_image_folder),
            "--eval-path", str(small_image_folder), "--num-clients", "3", "--client-cpus", "1",
            "--rounds", "1", "--fraction", "1", "--batch-size", "4", "--image-size", "16", "--proj-dim", "32",
            "--hidden-dim", "64", "--knn-k", "5", "--probe", "false", "--threads", "1", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "fedssl.simulations.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients_ok"], r["aggregated"]) for r in rows] == [(0, 0, False), (1, 3, True)]
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert privacy["secure_aggregation"] is True and privacy["threshold"] == 2
