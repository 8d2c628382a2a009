"""Aggregation rules, selected by the run config's `strategy`: one module each, declaring its
`RULE` (server/rule.py's AggregationRule), and one line here."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from fedssl.common.config import ConfigError, RunConfig
from fedssl.server import dp, secure
from fedssl.server.protocol import SSLStrategy
from fedssl.server.rounds import SSLRounds
from fedssl.server.rule import AggregationRule
from fedssl.server.strategies import (bulyan, fedadam, fedavg, fedavgm, fedema, fedmedian, fedtrimmedavg, fedu,
                               krum, ldawa, multikrum)

RULES: dict[str, AggregationRule] = {
    "fedavg": fedavg.RULE,
    "fedavgm": fedavgm.RULE,
    "fedadam": fedadam.RULE,
    "fedu": fedu.RULE,
    "fedema": fedema.RULE,
    "ldawa": ldawa.RULE,
    "fedmedian": fedmedian.RULE,
    "fedtrimmedavg": fedtrimmedavg.RULE,
    "krum": krum.RULE,
    "multikrum": multikrum.RULE,
    "bulyan": bulyan.RULE,
}


def build_strategy(cfg: RunConfig) -> SSLStrategy:
    """The run's rule, with its privacy mode (docs/privacy.md): in SSLRounds as it is, wrapped
    for DP, or (SecAgg+) replaced by the secure adapter, which runs FedAvg's mean under masks."""
    if cfg.strategy not in RULES:
        raise ConfigError(f"strategy={cfg.strategy!r} is invalid: allowed: {', '.join(RULES)}")
    rule = RULES[cfg.strategy]
    fedavg_means = [name for name, declared in RULES.items() if declared.fedavg_mean]
    dp.check(cfg, fedavg_means)
    secure.check(cfg, fedavg_means)
    rule.check(cfg)
    if cfg.secure_aggregation:
        return secure.build(cfg)
    with _quiet_flower():
        aggregation = rule.build(cfg)
    return dp.private(cfg, SSLRounds(aggregation, cfg, streams_mean=rule.fedavg_mean))


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
