"""Aggregation rules, selected by the run config's `strategy`. A rule is one module with a
`build(cfg)` returning a Flower strategy that mixes in server.rounds.SSLRounds."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

from common.config import ConfigError, RunConfig
from server import dp, secure
from server.protocol import SSLStrategy
from server.rounds import SSLRounds
from server.strategies import (bulyan, fedadam, fedavg, fedavgm, fedema, fedmedian, fedtrimmedavg, fedu,
                               krum, ldawa, multikrum)

STRATEGIES: dict[str, Callable[[RunConfig], SSLRounds]] = {
    "fedavg": fedavg.build,
    "fedavgm": fedavgm.build,
    "fedadam": fedadam.build,
    "fedu": fedu.build,
    "fedema": fedema.build,
    "ldawa": ldawa.build,
    "fedmedian": fedmedian.build,
    "fedtrimmedavg": fedtrimmedavg.build,
    "krum": krum.build,
    "multikrum": multikrum.build,
    "bulyan": bulyan.build,
}


def build_strategy(cfg: RunConfig) -> SSLStrategy:
    """The run's rule, with its privacy mode (docs/privacy.md): as it is, wrapped for DP, or
    (SecAgg+) replaced by the secure adapter, which runs FedAvg's mean under masks."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"strategy={cfg.strategy!r} is invalid: allowed: {', '.join(STRATEGIES)}")
    dp.check(cfg)
    secure.check(cfg)
    with _quiet_flower():  # also under SecAgg+: the rule's own checks apply
        strategy = STRATEGIES[cfg.strategy](cfg)
    if cfg.secure_aggregation:
        return secure.build(cfg)
    strategy.setup_rounds(cfg)
    return dp.private(cfg, strategy)


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower's strategies warn that fraction_evaluate is 0, which is fedssl's design (the
    server evaluates, server/evaluation.py): not news for the user at every start."""
    flower = logging.getLogger("flwr")
    level = flower.level
    flower.setLevel(logging.ERROR)
    try:
        yield
    finally:
        flower.setLevel(level)
