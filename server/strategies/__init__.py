"""Aggregation rules, selected by the run config's `strategy`. A rule is one module with a
`build(cfg)` returning a Flower strategy that mixes in server.rounds.SSLRounds."""
from __future__ import annotations

from typing import Callable

from common.config import ConfigError, RunConfig
from server.rounds import SSLRounds
from server.strategies import fedadam, fedavg, fedavgm, fedema, fedu, ldawa

STRATEGIES: dict[str, Callable[[RunConfig], SSLRounds]] = {
    "fedavg": fedavg.build,
    "fedavgm": fedavgm.build,
    "fedadam": fedadam.build,
    "fedu": fedu.build,
    "fedema": fedema.build,
    "ldawa": ldawa.build,
}


def build_strategy(cfg: RunConfig) -> SSLRounds:
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"strategy={cfg.strategy!r} is invalid: allowed: {', '.join(STRATEGIES)}")
    strategy = STRATEGIES[cfg.strategy](cfg)
    strategy.setup_rounds(cfg)
    return strategy
