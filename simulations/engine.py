"""Run the fedssl ServerApp and ClientApp on Flower's simulation engine (Ray), in-process.

`flwr run .` is the other way in; this one needs no SuperLink process and passes the
validated RunConfig straight to the ServerApp, which sends it to clients each round.
It uses Flower's `_run_simulation`, the function `flwr-simulation` itself calls, because
the public `run_simulation` cannot carry a run config (flwr is pinned to 1.42.x)."""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.supercore.telemetry import EventType
from flwr.serverapp import Grid, ServerApp
from flwr.simulation.run_simulation import _run_simulation

from fedssl.common.config import RunConfig
from fedssl.server.app import run_federation
from fedssl.simulations import attacks


def backend_config(client_cpus: float, client_gpus: float, ray_address: str | None) -> dict:
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": True}
    if ray_address:
        init_args["address"] = ray_address
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
            "init_args": init_args}


# How long an interrupted simulation is waited for: its clients' work in progress, Ray's stop.
STOP_SECONDS = 30.0


class Interrupted(Exception):
    """Raised in the ServerApp once the caller stopped waiting for it."""


def stoppable(grid: Grid, stopping: threading.Event) -> Grid:
    """`grid`, whose replies are no longer awaited once `stopping` is set: the ServerApp then
    ends in the round in progress and records nothing of it (Flower's in-memory grid would
    wait out the round timeout). Its `send_and_receive` polls `pull_messages`."""
    pull = grid.pull_messages

    def pull_unless_stopping(message_ids):
        if stopping.is_set():
            raise Interrupted("the simulation was interrupted")
        return pull(message_ids)

    grid.pull_messages = pull_unless_stopping
    return grid


def simulate(cfg: RunConfig, *, num_clients: int, client_cpus: float = 2.0,
             client_gpus: float = 0.0, ray_address: str | None = None,
             client: ClientApp = attacks.app) -> dict[str, Any]:
    """Run a federated simulation of `num_clients` virtual clients; return the summary.
    The ClientApp is the honest one with the run's `attack` (simulations/attacks.py);
    `client` replaces it (tests inject faulty sites)."""
    attacks.check(cfg, num_clients)
    # Ray workers need not report home, and must not guess at GPUs that aren't there.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Flower starts Ray itself; once it stopped Ray, a late ray.get in one of its threads must
    # fail rather than start a new cluster (read when Ray is imported).
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    result: dict[str, Any] = {}
    stopping = threading.Event()
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result.update(run_federation(stoppable(grid, stopping), cfg))

    failure: list[BaseException] = []

    def run() -> None:
        try:
            _run_simulation(
                num_supernodes=num_clients,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client,
                server_app=server_app,
                backend_name="ray",
                backend_config=backend_config(client_cpus, client_gpus, ray_address),
            )
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(err)

    # The engine runs in a daemon thread (its ServerApp thread inherits that) while this one
    # only waits, so SIGINT/SIGTERM reach the handlers the CLI installed at once: in the main
    # thread ray.init would replace the SIGTERM handler with one that raises SystemExit there
    # and leaves Flower's non-daemon ServerApp thread holding the process open.
    runner = threading.Thread(target=run, name="fedssl-simulation", daemon=True)
    runner.start()
    main_thread = threading.current_thread() is threading.main_thread()
    try:
        while runner.is_alive():
            runner.join(1.0)
            own = signal.getsignal(signal.SIGTERM) if main_thread else None
            if own is not None:
                # Ray's core worker puts a C-level SIGTERM handler in front of Python's that
                # prints a stack dump first; put Python's own back.
                signal.signal(signal.SIGTERM, own)
    except BaseException:
        # Interrupted while waiting (Ctrl-C in a Python session): end the run in progress
        # rather than leave it in the background, where it would go on recording rounds.
        # Flower then stops Ray itself once the clients' work in progress returns; stopping
        # Ray under a thread waiting on it can leave that thread waiting for good.
        stopping.set()
        runner.join(STOP_SECONDS)
        raise
    if failure:
        raise failure[0]
    if not result:
        raise RuntimeError("the simulation ended without a result; see the log above")
    return result
