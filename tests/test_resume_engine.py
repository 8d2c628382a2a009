"""A `fedssl simulate` process killed with SIGKILL during a round, then started again with
--resume, ends with the metrics of an uninterrupted run, on Flower's real simulation engine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedssl.server.resume import load_run_state
from test_resume import rows

pytestmark = pytest.mark.engine


def _simulate(folder, out, *extra: str) -> list[str]:
    # Two clients: a weighted sum of two terms does not depend on the order replies arrive
    # in, so the real engine repeats bit for bit. SimSiam keeps no client state (README).
    args = ["--method", "simsiam", "--dataset", "imagefolder", "--data-path", str(folder),
            "--eval-path", str(folder), "--num-clients", "2", "--client-cpus", "1",
            "--rounds", "3", "--image-size", "16", "--batch-size", "4", "--proj-dim", "32",
            "--hidden-dim", "64", "--knn-k", "5", "--probe", "false", "--threads", "1",
            "--out", str(out)]
    return [sys.executable, "-m", "fedssl.simulations.cli", "simulate", *args, *extra]


def _completed_rounds(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) - 1 if path.is_file() else -1


def test_a_killed_simulation_resumes_to_the_uninterrupted_result(small_image_folder, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(_simulate(small_image_folder, whole), check=True, capture_output=True,
                   timeout=600)

    broken = tmp_path / "broken"
    proc = subprocess.Popen(_simulate(small_image_folder, broken), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while _completed_rounds(broken) < 1:
            assert proc.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
    finally:
        # The whole session: the driver and the Ray processes it started.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_after = load_run_state(broken / "checkpoint.safetensors").round
    assert 1 <= killed_after < 3

    resumed = subprocess.run(_simulate(small_image_folder, broken, "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after round {killed_after}" in resumed.stderr
    assert [r["round"] for r in rows(broken)] == [0, 1, 2, 3]
    assert rows(broken) == rows(whole)
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["final"]["knn_top1"] == rows(whole)[-1]["knn_top1"]
