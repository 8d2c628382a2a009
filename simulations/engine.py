"""Run the fedssl ServerApp and ClientApp on Flower's simulation engine (Ray), in-process.

`flwr run .` is the other way in; this one needs no SuperLink process and passes the
validated RunConfig straight to the ServerApp, which sends it to clients each round.
It uses Flower's `_run_simulation`, the function `flwr-simulation` itself calls, because
the public `run_simulation` cannot carry a run config (flwr is pinned to 1.42.x)."""
from __future__ import annotations

import logging
import os
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.supercore.telemetry import EventType
from flwr.serverapp import Grid, ServerApp
from flwr.simulation.run_simulation import _run_simulation

from client.app import app as client_app
from common.config import RunConfig
from server.app import run_federation


def backend_config(client_cpus: float, client_gpus: float, ray_address: str | None) -> dict:
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": True}
    if ray_address:
        init_args["address"] = ray_address
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
            "init_args": init_args}


def simulate(cfg: RunConfig, *, num_clients: int, client_cpus: float = 2.0,
             client_gpus: float = 0.0, ray_address: str | None = None,
             client: ClientApp = client_app) -> dict[str, Any]:
    """Run a federated simulation of `num_clients` virtual clients; return the summary.
    `client` replaces the ClientApp (tests inject faulty sites)."""
    # Ray workers need not report home, and must not guess at GPUs that aren't there.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result.update(run_federation(grid, cfg))

    _run_simulation(
        num_supernodes=num_clients,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config(client_cpus, client_gpus, ray_address),
    )
    if not result:
        raise RuntimeError("the simulation ended without a result; see the log above")
    return result
