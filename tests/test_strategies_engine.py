"""The aggregation rules with a client half (FedU, FedEMA) end to end on Flower's real
simulation engine (Ray): a smoke test, as small as the engine allows. Their state lives in
each client's context between rounds, which the engine carries to and from its workers
(client/state_store.py) and the in-process grid does not; the server-only rules run the
same code on both, so tests/test_strategies.py's in-process runs cover them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("strategy", ["fedu", "fedema"])
def test_two_rounds_on_the_simulation_engine(small_image_folder, tmp_path, strategy):
    out = tmp_path / "run"
    # BYOL: FedU and FedEMA act on its predictor and target.
    args = ["--method", "byol", "--strategy", strategy, "--dataset", "imagefolder", "--data-path", str(small_image_folder),
            "--eval-path", str(small_image_folder), "--num-clients", "3", "--client-cpus", "1",
            "--rounds", "2", "--fraction", "1", "--batch-size", "4", "--image-size", "16", "--proj-dim", "32",
            "--hidden-dim", "64", "--knn-k", "5", "--probe", "false", "--threads", "1",
            "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "fedssl.simulations.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients_ok"], r["aggregated"]) for r in rows[1:]] == [(1, 3, True), (2, 3, True)]
    assert json.loads((out / "summary.json").read_text())["config"]["strategy"] == strategy
