"""How the global model enters a client's local one: the client-side half of an aggregation
rule, looked up by the run config's `strategy`. Most rules replace the local shared networks
with the global ones; FedU and FedEMA keep some of the client's own, judged against the
shared arrays the client held after the last round it trained (`previous`).

A rule's `update(cfg, method, incoming, previous, memo)` loads into `method` what it trains
from, given the global shared arrays `incoming`, the client's `previous` shared arrays (None
before its first round) and `memo`, floats the rule keeps on the client across rounds
(FedEMA's lambda). It returns the numbers it decided by (divergence, FedEMA's mu, FedU's
choice), which the client reports and the server records per client. No Flower here: the
ClientApp keeps `previous` and `memo` in context.state.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from common.global_updates import fedema, fedu

log = logging.getLogger("fedssl")
State = Mapping[str, torch.Tensor]
# A client reports its rule's numbers as metrics under this prefix (server/rounds.py).
METRIC_PREFIX = "rule-"


def take_global(cfg, method, incoming: State, previous: State | None, memo: dict) -> dict:
    method.load_partial(dict(incoming))
    return {}


@dataclass(frozen=True)
class Rule:
    update: Callable[..., dict[str, float]] = take_global
    # Whether the client must keep its shared arrays after training for the next round;
    # rules that never look at them spare every node a copy of the model.
    keeps_previous: bool = False

    def apply(self, cfg, method, incoming: State, previous: State | None, memo: dict) -> dict[str, float]:
        if previous is not None and not _fits(previous, incoming):
            # Kept by another method or model on this node: nothing to compare with.
            log.warning("%s: this node's previous shared arrays do not fit the global model; "
                        "taking the global model", cfg.strategy)
            previous = None
        return self.update(cfg, method, incoming, previous, memo)


RULES: dict[str, Rule] = {
    "fedu": Rule(fedu.update, keeps_previous=True),
    "fedema": Rule(fedema.update, keeps_previous=True),
}


def rule_for(strategy: str) -> Rule:
    return RULES.get(strategy, Rule())


def _fits(previous: State, incoming: State) -> bool:
    return set(previous) == set(incoming) and all(previous[k].shape == incoming[k].shape
                                                  for k in incoming)
