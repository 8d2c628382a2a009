"""End to end on Flower's real simulation engine (Ray): the `fedssl simulate` command."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fedssl.common.checkpoint import load_encoder, load_weights
from fedssl.common.config import RunConfig
from fedssl.common.methods import build_method

pytestmark = pytest.mark.engine


def test_fedssl_simulate_three_clients_two_rounds(image_folder, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "imagefolder", "--data-path", str(image_folder),
            "--eval-path", str(image_folder), "--num-clients", "3", "--client-cpus", "1",
            "--rounds", "2", "--fraction", "1", "--batch-size", "8", "--proj-dim", "32", "--hidden-dim", "64",
            "--knn-k", "10", "--partition", "dirichlet", "--alpha", "1.0", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "fedssl.simulations.cli", "simulate", *args],
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A Ray cluster started the way an operator starts one (`ray start --head`), in its own
    short temp dir (Ray's socket paths must stay under 108 characters); stopped with it."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = _free_port()
    ray = Path(sys.executable).with_name("ray")
    log = (temp_dir / "head.log").open("w")
    # --block: the process owns the cluster, and SIGTERM to it stops every Ray process it began.
    head = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (temp_dir / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (temp_dir / "head.log").read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        head.terminate()
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_fedssl_simulate_runs_its_clients_on_an_existing_ray_cluster(image_folder, tmp_path, ray_cluster):
    address, temp_dir = ray_cluster
    out = tmp_path / "run"
    args = ["--ray-address", address, "--dataset", "imagefolder", "--data-path", str(image_folder),
            "--eval-path", str(image_folder), "--num-clients", "2", "--client-cpus", "1", "--rounds", "1",
            "--fraction", "1", "--batch-size", "8", "--proj-dim", "32", "--hidden-dim", "64",
            "--knn-k", "10", "--probe", "false", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "fedssl.simulations.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_ok"] for r in rows[1:]] == [2]
    # The run's driver joined that cluster's session instead of starting a cluster of its own.
    logs = [p.name for p in (temp_dir / "session_latest" / "logs").iterdir()]
    assert any(n.startswith("python-core-driver-") for n in logs), logs
