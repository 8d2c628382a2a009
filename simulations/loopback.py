"""A real deployment on one machine, over loopback: `fedssl server` (flower-superlink with
TLS and site authentication), one `fedssl client` (flower-supernode) per site, runs started
with `flwr run . NAME`. Used by tests/test_deployment*.py and the deployment benchmarks
(benchmarks/deploy_latency.py, faulty_link.py, soak.py).

Every process is started in its own session and stopped with its whole process group
(and the SuperExec that a SuperLink detaches) by `Processes.stop()`, also on errors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fedssl.common.synthetic import write_image_folder
from fedssl.server.certs import make_certs

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _detached_children(pid: int) -> list[int]:
    """Flower's SuperLink starts its SuperExec in a new session with `--parent-pid PID`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--parent-pid" in argv and argv[argv.index(b"--parent-pid") + 1:][:1] == [str(pid).encode()]:
            found.append(int(entry.name))
    return found


def _signal_groups(groups: list[int], sig: int) -> None:
    for pgid in groups:  # each was started as its own session (and group) leader
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _groups_alive(groups: list[int]) -> bool:
    for pgid in groups:
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


class Processes:
    """Started processes, each logging to DIR/NAME.log; `stop()` ends them all."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str],
              cwd: Path | None = None) -> subprocess.Popen:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop_one(self, name: str, grace: float = 10.0) -> None:
        """SIGTERM the process group (and the detached SuperExec's), wait up to `grace`,
        then SIGKILL both groups, so grandchildren (ServerApp, ClientApps) go too."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        detached = _detached_children(proc.pid)
        # A process that ended earlier (a test killed it) was reaped, and its pid may now
        # name another process, maybe another session's leader: that group is not ours.
        reused = proc.poll() is not None and Path(f"/proc/{proc.pid}").exists()
        groups = ([] if reused else [proc.pid]) + detached
        _signal_groups(groups, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _groups_alive(detached):
            time.sleep(0.2)
        _signal_groups(groups, signal.SIGKILL)
        proc.wait(timeout=grace)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop_one(name)


class LoopbackDeployment:
    """One SuperLink and any number of SuperNodes on 127.0.0.1, under `root`."""

    CONNECTION = "loopback"

    def __init__(self, root: Path, sites: list[str], insecure: bool = False):
        self.root = Path(root)
        self.sites, self.insecure = list(sites), insecure
        self.certs = self.root / "certs"
        self.workdir = self.root / "server"
        self.port = free_port()
        self.procs = Processes(self.root / "logs")
        self.env = {**os.environ, "FLWR_HOME": str(self.root / "flwr-home"),
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def fedssl(self, *args: str) -> list[str]:
        return [str(BIN / "fedssl"), *args]

    def check(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, cwd=PROJECT, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        return proc

    def start_server(self, timeout: float = 60) -> None:
        if not self.insecure:
            make_certs(self.certs, ["localhost", "127.0.0.1"], self.sites, force=True)
        args = ["server", "--workdir", str(self.workdir), "--host", "127.0.0.1",
                "--port", str(self.port)]
        args += ["--insecure"] if self.insecure else ["--certs", str(self.certs)]
        proc = self.procs.start("superlink", self.fedssl(*args), self.env)
        wait_for_port(self.port, timeout, proc)
        connect = ["connect", self.CONNECTION, "--address", self.address]
        connect += ["--insecure"] if self.insecure else ["--ca", str(self.certs / "ca.crt")]
        self.check(self.fedssl(*connect))

    def register(self, site: str) -> None:
        self.check([str(BIN / "flwr"), "supernode", "register", str(self.certs / "sites" / f"{site}.pub"),
                    self.CONNECTION, "--name", site])

    def site_settings(self, site: str, data_path: Path, threads: int = 1,
                      insecure: bool | None = None, max_wait: float | None = None,
                      superlink: str | None = None):
        """`superlink`: another address than the SuperLink's own (a proxy in front of it)."""
        from fedssl.client.supernode import SuperNodeSettings
        insecure = self.insecure if insecure is None else insecure
        return SuperNodeSettings(
            superlink=superlink or self.address, data_path=Path(data_path), threads=threads,
            port=free_port(), insecure=insecure, max_wait_time=max_wait,
            ca=None if insecure else self.certs / "ca.crt",
            key=None if insecure else self.certs / "sites" / f"{site}.key")

    def start_site(self, site: str, data_path: Path, *, raw: bool = False, name: str | None = None,
                   **kwargs) -> subprocess.Popen:
        """Start `fedssl client`; `raw`: the flower-supernode command it would exec, without
        the wrapper's checks (a site whose folder vanished after start-up)."""
        from fedssl.client.supernode import supernode_command
        st = self.site_settings(site, data_path, **kwargs)
        if raw:
            return self.procs.start(name or site, supernode_command(st, check_data=False), self.env)
        args = ["client", "--superlink", st.superlink, "--data-path", str(st.data_path),
                "--threads", str(st.threads), "--port", str(st.port)]
        args += ["--insecure"] if st.insecure else ["--ca", str(st.ca), "--key", str(st.key)]
        if st.max_wait_time is not None:
            args += ["--max-wait-time", str(st.max_wait_time)]
        return self.procs.start(name or site, self.fedssl(*args), self.env)

    def nodes(self) -> list[dict]:
        out = self.check([str(BIN / "flwr"), "supernode", "ls", self.CONNECTION, "--format", "json"])
        return json.loads(out.stdout[out.stdout.index("{"):])["nodes"]

    def online(self) -> int:
        """SuperNodes online now, from the SuperLink's log (cheaper than `flwr supernode ls`)."""
        log = (self.workdir / "logs" / "superlink.log").read_text(errors="replace")
        state: dict[str, bool] = {}
        for m in re.finditer(r"\[Fleet\.(Activate|Deactivate)Node\] \w+ node_id=(\d+)", log):
            state[m[2]] = m[1] == "Activate"
        return sum(state.values())

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online() >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")

    def run(self, run_config: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), "run", str(PROJECT), self.CONNECTION, "--stream",
                               "--run-config", run_config], env=self.env, cwd=PROJECT,
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        self.procs.stop()

    def __enter__(self) -> "LoopbackDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------ the benchmarks' smallest real federation

def site_images(root: Path, sites: list[str]) -> dict[str, Path]:
    """A different 8-image synthetic folder for each site."""
    return {site: write_image_folder(Path(root) / site, per_class=2, seed=i + 1)
            for i, site in enumerate(sites)}


def tiny_run_config(root: Path, rounds: int, sites: int, **extra: object) -> tuple[str, Path]:
    """`flwr run --run-config` for a federation whose rounds cost the deployment, not the
    training (sites of 8 images, batch 4, tiny heads, a 16-image kNN bank), and the out-dir
    it writes."""
    evaluation = write_image_folder(Path(root) / "eval", per_class=4, seed=99)
    out = Path(root) / "run"
    keys = {"num-rounds": rounds, "fraction-train": 1.0, "dataset": "imagefolder",
            "data-path": evaluation, "eval-path": evaluation, "batch-size": 4, "proj-dim": 32,
            "hidden-dim": 64, "knn-k": 5, "eval-bank-size": 16, "eval-query-size": 8,
            "probe": False, "threads": 1, "min-train-clients": sites, **extra, "out-dir": out}
    return " ".join(f"{k}={_toml_value(v)}" for k, v in keys.items()), out


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, (str, Path)) else str(value)


@contextmanager
def scratch_dir(prefix: str, keep: bool) -> Iterator[Path]:
    """A work directory with its own image cache; removed afterwards unless `keep`."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("FEDSSL_CACHE_DIR", str(root / "image-cache"))
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
