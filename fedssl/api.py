"""The runs, as the `fedssl simulate` and `fedssl centralized` commands start them (the CLI
is a thin layer over these), and the exported encoder: `evaluate` and `embed` are the
functions `fedssl evaluate` / `fedssl embed` call (common/downstream.py), `load_encoder`
gives it as a module."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from fedssl.common.config import RunConfig
from fedssl.common.downstream import embed_folder as embed
from fedssl.common.downstream import evaluate_encoder as evaluate
from fedssl.common.downstream import open_encoder
from fedssl.preflight import HARNESS_DEFAULTS, preflight, quiet_engines
from fedssl.run_config import run_config

__all__ = ["centralized", "embed", "evaluate", "load_encoder", "simulate"]


def simulate(config: RunConfig | Mapping[str, Any] | None = None, /, *,
             num_clients: int = HARNESS_DEFAULTS["num-clients"], client_cpus: float | None = None,
             client_gpus: float = HARNESS_DEFAULTS["client-gpus"], ray_address: str | None = None,
             verbose: bool = False, **keys: Any) -> dict[str, Any]:
    """A federated run of `num_clients` virtual clients on Flower's simulation engine (Ray);
    returns the summary (also OUT/summary.json). `config` and `keys` as `run_config` takes
    them; `client_cpus` defaults to every core (one client at a time); `ray_address` joins a
    running Ray cluster; `verbose` shows Flower's and Ray's logs."""
    cfg = run_config(config, **keys)
    preflight(cfg, num_clients)
    quiet_engines(verbose)
    from fedssl.simulations.engine import simulate as run_on_engine

    return run_on_engine(cfg, num_clients=num_clients,
                         client_cpus=HARNESS_DEFAULTS["client-cpus"] if client_cpus is None else client_cpus,
                         client_gpus=client_gpus, ray_address=ray_address or None)


def centralized(config: RunConfig | Mapping[str, Any] | None = None, /, **keys: Any) -> dict[str, Any]:
    """The centralized baseline (the same method on the pooled images, as many image-passes
    as the federated run would make); returns the summary (also OUT/summary.json)."""
    cfg = run_config(config, **keys)
    preflight(cfg, None)
    from fedssl.simulations.centralized import run_centralized

    return run_centralized(cfg)


def load_encoder(path: str | Path) -> nn.Module:
    """A run's exported encoder, ready to use: a torch module in eval mode mapping normalised
    images [N, 3, H, W] to features [N, D]. `path`: OUT/encoder, its model.safetensors, the
    run folder OUT, or an encoder.safetensors; a bad path is a one-line DataError."""
    return open_encoder(path)[0]
