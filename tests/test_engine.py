"""End to end on Flower's real simulation engine (Ray): the `fedssl simulate` command."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from common.checkpoint import load_encoder, load_weights
from common.config import RunConfig
from common.methods import build_method

pytestmark = pytest.mark.engine


def test_fedssl_simulate_three_clients_two_rounds(image_folder, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "imagefolder", "--data-path", str(image_folder),
            "--eval-path", str(image_folder), "--num-clients", "3", "--client-cpus", "1",
            "--rounds", "2", "--fraction", "1", "--batch-size", "8", "--proj-dim", "32", "--hidden-dim", "64",
            "--knn-k", "10", "--partition", "dirichlet", "--alpha", "1.0", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 2/2" in proc.stderr  # the progress line per round

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(proc.stdout)["out_dir"] == str(out) == summary["out_dir"]

    cfg = RunConfig.from_mapping(summary["config"])
    initial = build_method(cfg).shared_state()
    state, meta = load_weights(out / "checkpoint.safetensors")
    assert meta["round"] == 2
    assert any(not torch.equal(state[k], initial[k]) for k in initial if k.startswith("encoder."))
    assert load_encoder(out / "encoder.safetensors").eval()(torch.rand(1, 3, 32, 32)).shape == (1, 512)
