"""Real-process faults on a loopback deployment (flower-superlink and flower-supernode
started by `fedssl server` / `fedssl client`, runs by `flwr run`, TLS and site
authentication on): a site SIGKILLed while it holds a round's message, the SuperLink and
its ServerApp SIGKILLed mid-run and the run resumed as docs/deployment.md ("Recovery")
says, and a slow, lossy link to one site (simulations/tcp_proxy.py). Each uses the smallest
workload the deployment tests use: 8 tiny images a site, a 16-image kNN monitor.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from fedssl.common.checkpoint import load_weights
from fedssl.common.config import RunConfig
from fedssl.common.methods import build_method
from fedssl.simulations.loopback import BIN, PROJECT, LoopbackDeployment, _detached_children, wait_for_port

from fedssl.common.synthetic import write_image_folder
from fedssl.simulations.tcp_proxy import FaultyLink, Link
from test_deployment import run_config

WORKLOAD = dict(batch_size=4, proj_dim=32, hidden_dim=64, knn_k=5, eval_bank_size=16,
                eval_query_size=8, probe=False, threads=1, fraction_train=1.0)
# Generous: on a loaded 2-core machine a healthy round has taken over 120 s. A dead site
# ends its round sooner anyway: the SuperLink answers for it once its heartbeat lapses.
ROUND_TIMEOUT = 400.0


# ----------------------------------------------------------------- helpers


def wait_until(condition: Callable[[], object], timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) while waiting for {what}")
        time.sleep(0.3)
    raise AssertionError(f"no {what} after {timeout:.0f} s")


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def register(dep: LoopbackDeployment, site: str) -> int:
    """Register `site`; its node id, which the SuperLink keeps across restarts of the site."""
    dep.register(site)
    created = re.findall(r"RegisterNode\] Created node_id=(\d+)",
                         (dep.workdir / "logs" / "superlink.log").read_text())
    return int(created[-1])


def clientapp_running(group: int) -> bool:
    """A live `flwr-clientapp` in the SuperNode's process group: the site has pulled a
    round's message and is working on it."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == group and b"flwr-clientapp" in (entry / "cmdline").read_bytes():
                return True
        except (OSError, ProcessLookupError):
            continue
    return False


def start_run(dep: LoopbackDeployment, values: dict, log: Path) -> subprocess.Popen:
    """`flwr run . loopback --stream` in the background, so faults can be made meanwhile."""
    with log.open("wb") as f:
        return subprocess.Popen([str(BIN / "flwr"), "run", str(PROJECT), dep.CONNECTION, "--stream",
                                 "--run-config", run_config(values)],
                                env=dep.env, cwd=PROJECT, stdout=f, stderr=subprocess.STDOUT)


def deployment(root: Path, sites: list[str]) -> tuple[LoopbackDeployment, dict[str, int], dict]:
    """A started, TLS + authenticated SuperLink with `sites` registered (not started), their
    node ids, and the run config of a tiny run writing to ROOT/run."""
    dep = LoopbackDeployment(root, sites)
    try:
        dep.start_server()
        ids = {site: register(dep, site) for site in sites}
    except BaseException:
        dep.stop()
        raise
    evaluation = write_image_folder(root / "eval", per_class=4, seed=99)
    values = dict(dataset="imagefolder", data_path=str(evaluation), eval_path=str(evaluation),
                  out_dir=str(root / "run"), round_timeout=ROUND_TIMEOUT, **WORKLOAD)
    return dep, ids, values


def site_images(root: Path, site: str) -> Path:
    return write_image_folder(root / site, per_class=2, seed=int(site[-1]) + 1)


def checkpoint_round(out: Path, values: dict) -> int:
    """The checkpoint's round, after checking it loads into the method it came from."""
    state, meta = load_weights(out / "checkpoint.safetensors")
    build_method(RunConfig(**values)).load_partial(state)
    return meta["round"]


# ----------------------------------------------------------------- a site dies


@pytest.mark.engine
def test_a_site_killed_while_it_trains_is_recorded_and_rejoins_later(tmp_path):
    """SIGKILL (the whole process group: SuperNode and its ClientApp) while site1 holds a
    round's message. The round ends with site0 once the SuperLink sees site1's heartbeat
    lapse, recorded as site1's failure (under site1's node id, once); site1 restarted
    with the same key comes back as the same node and trains again; the run completes."""
    dep, ids, values = deployment(tmp_path, ["site0", "site1"])
    with dep:
        for site in ids:
            dep.start_site(site, site_images(tmp_path, site), threads=1)
        dep.wait_online(2)
        values.update(num_rounds=4, min_train_clients=1)
        run = start_run(dep, values, tmp_path / "flwr-run.log")
        victim = dep.procs.procs["site1"]
        wait_until(lambda: clientapp_running(victim.pid), 300, "ClientApp at site1", run)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        out = Path(values["out_dir"])
        killed_in = len(rows(out))  # rows 0..k-1 are written: round k was in flight
        wait_until(lambda: len(rows(out)) > killed_in, 2 * ROUND_TIMEOUT, f"round {killed_in}'s row", run)
        dep.start_site("site1", tmp_path / "site1", threads=1, name="site1-restarted")
        run.wait(timeout=900)
        output = (tmp_path / "flwr-run.log").read_text(errors="replace")
        assert run.returncode == 0, output[-3000:]

    history = rows(out)
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    dead = history[killed_in]
    assert (dead["clients_ok"], dead["clients_failed"], dead["aggregated"]) == (1, 1, True)
    assert list(dead["failures"]) == [str(ids["site1"])]  # not node 1, the SuperLink
    assert "Node Unavailable" in dead["failures"][str(ids["site1"])]
    later = history[killed_in + 1:]
    assert any(r["clients_ok"] == 2 and not r["failures"] for r in later), later
    assert checkpoint_round(out, values) == 4
    log = (dep.workdir / "logs" / "superlink.log").read_text()
    assert log.count(f"Activated node_id={ids['site1']}") == 2  # the same node, back


def test_the_superlinks_answer_for_a_lost_site_is_recorded_once_under_the_sites_id(small_image_folder, tmp_path):
    """In-process, the SuperLink's part of the test above: for a site whose heartbeat lapsed
    the SuperLink replies itself, from node 1 (Flower's own error message). The round must
    record that site's failure once, under the site's id, not a failure of node 1 plus a
    "no reply within round-timeout" for the site."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from fedssl.client.app import app as client_app
    from conftest import fast_config
    from fedssl.simulations.inprocess_grid import InProcessGrid
    from fedssl.server.app import run_federation

    class LosesALink(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            for message in messages:  # the ids a real grid gives them when it pushes them
                message.metadata.__dict__["_message_id"] = message.object_id
            lost = [m for m in messages if m.metadata.dst_node_id == 1002]
            replies = list(super().send_and_receive([m for m in messages if m not in lost]))
            return replies + [create_message_error_unavailable_res_message(m.metadata, "node_unavail")
                              for m in lost]

    cfg = fast_config(small_image_folder, tmp_path / "run", num_rounds=1)
    final = run_federation(LosesALink(client_app, num_nodes=3), cfg)["final"]
    assert (final["clients_ok"], final["clients_failed"], final["aggregated"]) == (2, 1, True)
    assert list(final["failures"]) == ["1002"]
    assert "Node Unavailable" in final["failures"]["1002"]


def test_stopping_a_site_killed_earlier_spares_the_process_that_reused_its_pid(tmp_path):
    """The test above kills site1 minutes before the deployment is stopped; by then this
    machine may have given its pid to another session's leader (a SuperLink of another
    run), which the clean-up must not signal."""
    from fedssl.simulations.loopback import Processes

    procs = Processes(tmp_path)
    victim = procs.start("site1", ["sleep", "300"], env={"PATH": "/usr/bin:/bin"})
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        victim.pid = bystander.pid  # as if the kernel had handed the freed pid on
        procs.stop()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# ----------------------------------------------------------------- the server dies


def kill_server(dep: LoopbackDeployment) -> None:
    """SIGKILL the SuperLink's process group and the detached SuperExec's, which holds the
    ServerApp: as a power loss or the OOM killer would, no clean shutdown."""
    link = dep.procs.procs.pop("superlink")
    for group in [link.pid] + _detached_children(link.pid):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    link.wait(timeout=30)


def restart_server(dep: LoopbackDeployment) -> None:
    """`fedssl server` again with the same certificates, work directory (its state database:
    the registered sites) and port."""
    args = ["server", "--workdir", str(dep.workdir), "--host", "127.0.0.1", "--port", str(dep.port),
            "--certs", str(dep.certs)]
    proc = dep.procs.start("superlink-restarted", dep.fedssl(*args), dep.env)
    wait_for_port(dep.port, 60, proc)


@pytest.mark.engine
def test_a_killed_server_resumes_from_its_checkpoint_with_no_round_lost_or_repeated(tmp_path):
    dep, ids, values = deployment(tmp_path, ["site0", "site1"])
    out = Path(values["out_dir"])
    with dep:
        for site in ids:
            dep.start_site(site, site_images(tmp_path, site), threads=1)
        dep.wait_online(2)
        values.update(num_rounds=3, min_train_clients=2)
        run = start_run(dep, values, tmp_path / "flwr-run.log")
        wait_until(lambda: len(rows(out)) >= 2, 600, "round 1's row", run)
        wait_until(lambda: clientapp_running(dep.procs.procs["site0"].pid), 300, "round 2 at site0", run)
        kill_server(dep)
        assert run.wait(timeout=120) != 0  # `flwr run --stream` loses its SuperLink
        before = rows(out)
        assert [r["round"] for r in before] == [0, 1]
        assert checkpoint_round(out, values) == 1

        restart_server(dep)  # the sites were left running: they reconnect by themselves
        resumed = dep.run(run_config({**values, "resume": True}), timeout=900)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
        assert "resuming after round 1" in resumed.stdout + resumed.stderr

    history = rows(out)
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert history[:2] == before  # the rounds before the crash, as they were
    assert [r["clients_ok"] for r in history[1:]] == [2, 2, 2]
    assert checkpoint_round(out, values) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["round"] == 3 and summary["initial"] == before[0]


# ----------------------------------------------------------------- a slow, lossy link


# 50 ms each way, 4 MB/s each way, a fifth of new connections cut at once (the first among
# them: seed 1), and every connection reset after 5-15 s: a poor mobile or satellite uplink.
LOSSY = Link(latency=0.05, bandwidth=4e6, refuse=0.2, reset_every=10.0, seed=1)


@pytest.mark.engine
def test_a_site_behind_a_slow_lossy_link_does_not_stop_the_run(tmp_path):
    """Flower retries each request on a new connection, and `fedssl server` makes a repeated
    object push succeed (server/superlink_launch.py), so a reset during a reply's upload no
    longer loses the reply. Flower still delivers a round's message at most once: a reset
    that loses the response carrying it costs site1 that round, which then ends at its
    round-timeout. Either way the run completes, and nothing but a late reply is recorded."""
    dep, ids, values = deployment(tmp_path, ["site0", "site1"])
    out = Path(values["out_dir"])
    with dep, FaultyLink(dep.port, LOSSY) as link:
        dep.start_site("site0", site_images(tmp_path, "site0"), threads=1)
        dep.start_site("site1", site_images(tmp_path, "site1"), threads=1, superlink=f"127.0.0.1:{link.port}")
        dep.wait_online(2, timeout=300)
        values.update(num_rounds=2, min_train_clients=1, round_timeout=120.0)
        run = start_run(dep, values, tmp_path / "flwr-run.log")
        run.wait(timeout=900)
        assert run.returncode == 0, (tmp_path / "flwr-run.log").read_text(errors="replace")[-3000:]
        counters = link.counters

    history = rows(out)
    assert [r["round"] for r in history] == [0, 1, 2]
    for row in history[1:]:
        assert all(reason.startswith("no reply within round-timeout") for reason in row["failures"].values()), row
    assert counters.refused >= 1 and counters.resets >= 1, counters
    assert checkpoint_round(out, values) == 2


def test_a_repeated_object_push_is_stored(monkeypatch, tmp_path):
    """The retry after a reset that lost the SuperLink's answer to an object push: Flower
    1.42 answers False (and the SuperNode drops its reply); `fedssl server` answers True,
    and still False for an object nobody pushed."""
    from flwr.app import ConfigRecord
    from flwr.proto.message_pb2 import ObjectTree
    from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

    from fedssl.server.superlink_launch import idempotent_object_push

    for cls in (SqlCoreState, InMemoryCoreState):
        monkeypatch.setattr(cls, "store_object", cls.store_object)  # put back after the test

    class State(SqlCoreState):  # the object-push part of the SuperLink's state
        get_node_id = store_message_and_object_tree = None

    def pushed_twice(db: Path) -> tuple[bool, bool, bool]:
        state = State(str(db), InMemoryObjectStore())
        state.initialize()
        session = state.start_session(7)
        record, other = ConfigRecord({"round": 1}), ConfigRecord({"round": 2})
        state.preregister_object_tree(ObjectTree(object_id=record.object_id), session)
        return (state.store_object(7, session, record.object_id, record.deflate()),
                state.store_object(7, session, record.object_id, record.deflate()),
                state.store_object(7, session, other.object_id, other.deflate()))

    assert pushed_twice(tmp_path / "flower.db") == (True, False, False)
    idempotent_object_push()
    assert pushed_twice(tmp_path / "fedssl.db") == (True, True, False)
