"""Faulty sites on Flower's real simulation engine (Ray): one that raises, one that hangs past
the round timeout, and ones that reply with NaN, a wrong shape, an extra array or a huge
update. The run completes, aggregates only the two honest sites and names every fault."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedssl.common.checkpoint import load_weights
from conftest import fast_config
from faulty_client import FAULTS, REASONS

pytestmark = pytest.mark.engine
TESTS = Path(__file__).resolve().parent

RUN = """
import json, sys
from fedssl.common.config import RunConfig
from faulty_client import app
from fedssl.simulations.engine import simulate
cfg = RunConfig.from_mapping(json.loads(sys.argv[1]))
simulate(cfg, num_clients=int(sys.argv[2]), client_cpus=1.0, client=app)
"""


def test_faulty_sites_are_rejected_with_reasons_and_the_run_completes(image_folder, tmp_path):
    out = tmp_path / "run"
    honest = 2
    # The honest sites must reply within the timeout, actor start-up included (up to ~45 s
    # on a busy 2-core machine); the hanging site sleeps just past it.
    cfg = fast_config(image_folder, out, num_rounds=1, round_timeout=60.0)
    # Ray workers import the faulty ClientApp by module name.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg.to_mapping()),
                           str(honest + len(FAULTS))], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["round"] == 1 and row["aggregated"] is True
    assert row["clients_ok"] == honest and row["clients_failed"] == len(FAULTS)
    reasons = sorted(row["failures"].values())
    for kind in FAULTS.values():
        assert sum(REASONS[kind] in r for r in reasons) == 1, (kind, reasons)
    assert "rejected: " in proc.stderr  # and the log says so, per client
    state, _ = load_weights(out / "checkpoint.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
