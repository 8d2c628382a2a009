"""Ctrl-C (SIGINT) or SIGTERM during `fedssl simulate` ends the run within seconds: one line
naming the round the checkpoint holds and the command that resumes it, none of its Ray
processes left behind, exit code 130 / 143; and that command finishes the run. A real
subprocess on Flower's real simulation engine."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedssl.common.checkpoint import read_metadata
from test_resume import rows

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 4


def _simulate(folder, out) -> list[str]:
    args = ["--method", "simsiam", "--dataset", "imagefolder", "--data-path", str(folder),
            "--eval-path", str(folder), "--num-clients", "2", "--client-cpus", "1",
            "--rounds", str(ROUNDS), "--image-size", "16", "--batch-size", "4", "--proj-dim", "32",
            "--hidden-dim", "64", "--knn-k", "5", "--probe", "false", "--threads", "1",
            "--out", str(out)]
    return [sys.executable, "-m", "fedssl.simulations.cli", "simulate", *args]


def _completed_rounds(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) - 1 if path.is_file() else -1


def _session_processes(sid: int) -> list[str]:
    """Live (not zombie) processes of session `sid`: the run's driver and every process it
    started (Ray's daemons and workers change their process group, not their session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = text.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            found.append(text.split(")", 1)[0] + ")")
    return found


def _interrupt_after_a_new_round(command: list[str], out: Path, sig: int, log: Path):
    """Run `command`, send `sig` once a round ends that was not on disk before; return the
    exit code, the seconds from the signal to the exit, and the output."""
    before = max(_completed_rounds(out), 0)
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=sink,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while _completed_rounds(out) <= before:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        # SIGINT to the process group, as a terminal's Ctrl-C; SIGTERM to the process, as `kill`.
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else os.kill(proc.pid, sig)
        sent = time.monotonic()
        code = proc.wait(timeout=30)
        seconds = time.monotonic() - sent
        deadline = time.monotonic() + 5
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = _session_processes(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return code, seconds, leftover, log.read_text()


def _check_interrupted(out: Path, code: int, seconds: float, leftover: list[str], output: str,
                       expected_code: int) -> list[str]:
    """The checks both signals share; returns the resume command the run printed."""
    assert code == expected_code, output[-3000:]
    assert seconds < 20, f"{seconds:.1f} s from the signal to the exit"
    assert not leftover, leftover
    assert "Traceback" not in output and "Error" not in output, output[-3000:]
    lines = output.splitlines()
    said = [line for line in lines if line.startswith("fedssl: interrupted")]
    last_round = max(i for i, line in enumerate(lines) if re.search(r"round \d+/\d+", line))
    assert len(said) == 1 and lines[last_round + 1:] == said, output[-3000:]  # nothing else
    held = read_metadata(out / "checkpoint.safetensors")["round"]
    assert 1 <= held < ROUNDS and rows(out)[-1]["round"] == held
    assert f"checkpoint holds round {held} of {ROUNDS}" in said[0]
    command = shlex.split(said[0].split("resume with: ", 1)[1])
    assert command.count("--resume") == 1 and command[command.index("--out") + 1] == str(out)
    return command


def test_sigint_then_sigterm_end_the_run_at_once_and_the_printed_command_finishes_it(
        small_image_folder, tmp_path):
    out = tmp_path / "run"
    first = _interrupt_after_a_new_round(_simulate(small_image_folder, out), out, signal.SIGINT,
                                         tmp_path / "first.log")
    resume = _check_interrupted(out, *first, expected_code=130)
    assert resume[:-1] == [*_simulate(small_image_folder, out)] and resume[-1] == "--resume"

    held = read_metadata(out / "checkpoint.safetensors")["round"]
    second = _interrupt_after_a_new_round(resume, out, signal.SIGTERM, tmp_path / "second.log")
    assert _check_interrupted(out, *second, expected_code=143) == resume
    assert read_metadata(out / "checkpoint.safetensors")["round"] > held

    done = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["round"] for r in rows(out)] == list(range(ROUNDS + 1))
    assert read_metadata(out / "checkpoint.safetensors")["round"] == ROUNDS
    assert (out / "summary.json").is_file()
