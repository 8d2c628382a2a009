"""The same app through Flower's own CLI: `flwr run .` with a local simulation SuperLink."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[1]


def stop_processes_mentioning(text: str) -> None:
    """The local SuperLink outlives `flwr run`; it is the only process naming our FLWR_HOME
    (its log file), and its SuperExec exits with it."""
    subprocess.run(["pkill", "-f", text], check=False)


def test_flwr_run_dot(image_folder, tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_config = (f'num-rounds=1 fraction-train=1.0 dataset="imagefolder" data-path="{image_folder}" '
                  f'eval-path="{image_folder}" batch-size=8 proj-dim=32 hidden-dim=64 '
                  f'knn-k=10 out-dir="{out}"')
    try:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "run", ".", "--stream",
             "--run-config", run_config, "--federation-config", "num-supernodes=3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_processes_mentioning(str(home))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients_ok"] == 3
    assert (out / "encoder.safetensors").exists()
