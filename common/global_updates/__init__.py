"""How the global model enters a client's local one: the client-side half of an aggregation
rule, looked up by the run config's `strategy`. Most rules replace the local shared networks
with the global ones; FedU and FedEMA keep some of the client's own, judged by what the
client kept from the last round it trained (`Previous`).

A rule's `update(cfg, method, incoming, previous, memo, server_round)` loads into `method`
what it trains from in `server_round`, given the global shared arrays `incoming`, the
client's `previous` round (None before its first) and `memo`, floats the rule keeps on the
client across rounds (FedEMA's lambda). It returns the numbers it decided by (divergence,
FedEMA's branch and mu, FedU's choice), the same names in every round, since the server
refuses a reply whose metric keys differ from the others'; the client reports them and the
server records them per client. No Flower here: the ClientApp keeps what `to_keep` returns
in its state store and `memo` in context.state.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from fedssl.common.config import RunConfig
from fedssl.common.global_updates import fedema, fedu
from fedssl.common.global_updates.divergence import encoder_divergence, encoder_kernels

log = logging.getLogger("fedssl")
State = Mapping[str, torch.Tensor]
# A client reports its rule's numbers as metrics under this prefix (server/rounds.py).
METRIC_PREFIX = "rule-"
# Kept beside the shared arrays, in the same record, so the two cannot come from different
# rounds. Model entries are module paths: they never hold a colon.
TRAINED_IN = "fedssl:trained-in"
DIVERGENCE = "fedssl:divergence"


@dataclass(frozen=True)
class Previous:
    """What a client kept from the last round it trained."""

    shared: State  # its shared arrays after that round's training
    trained_in: int  # the server round that was
    divergence: float  # how far that training moved its encoder (divergence.py)


def take_global(cfg: RunConfig, method, incoming: State, previous: Previous | None, memo: dict,
                server_round: int) -> dict:
    method.load_partial(dict(incoming))
    return {}


@dataclass(frozen=True)
class Rule:
    update: Callable[..., dict[str, float]] = take_global
    # Whether the client must keep its shared arrays after training for the next round;
    # rules that never look at them spare every node a copy of the model.
    keeps_previous: bool = False
    # Whether, given the numbers `update` decided by, the client re-derives its local copies
    # of the shared networks (BYOL's target) from the global model (`follow_global`) after
    # restoring its local state.
    follows_global: Callable[[dict[str, float]], bool] = lambda decided_by: False

    def apply(self, cfg: RunConfig, method, incoming: State, kept: State | None, memo: dict,
              server_round: int) -> dict[str, float]:
        """`kept`: what this node's store holds from `to_keep`, or None."""
        previous = _recall(kept) if kept is not None else None
        if kept is not None and (previous is None or not _fits(previous.shared, incoming)):
            # Kept by another method, model or version on this node: nothing to compare with.
            log.warning("%s: this node's previous shared arrays do not fit the global model; "
                        "taking the global model", cfg.strategy)
            previous = None
        return self.update(cfg, method, incoming, previous, memo, server_round)

    def starting_point(self, shared: State) -> dict[str, torch.Tensor] | None:
        """A copy of what the divergence reads, taken before local training (the live
        arrays change in place as it trains); None for a rule that keeps nothing."""
        return {k: v.clone() for k, v in encoder_kernels(shared).items()} if self.keeps_previous else None

    def to_keep(self, started_from: State, trained: State, server_round: int) -> dict[str, torch.Tensor]:
        """What the client keeps after training in `server_round` from `started_from` (see
        `starting_point`) to `trained`, for `apply` in its next round."""
        return {**trained,
                TRAINED_IN: torch.tensor(server_round, dtype=torch.int64),
                DIVERGENCE: torch.tensor(encoder_divergence(started_from, trained), dtype=torch.float64)}


RULES: dict[str, Rule] = {
    "fedu": Rule(fedu.update, keeps_previous=True),
    "fedema": Rule(fedema.update, keeps_previous=True, follows_global=fedema.took_global),
}


def rule_for(strategy: str) -> Rule:
    return RULES.get(strategy, Rule())


def _recall(kept: State) -> Previous | None:
    if TRAINED_IN not in kept or DIVERGENCE not in kept:
        return None  # kept without its round and divergence: nothing to judge by
    shared = {k: v for k, v in kept.items() if k not in (TRAINED_IN, DIVERGENCE)}
    return Previous(shared, int(kept[TRAINED_IN]), float(kept[DIVERGENCE]))


def _fits(previous: State, incoming: State) -> bool:
    return set(previous) == set(incoming) and all(previous[k].shape == incoming[k].shape
                                                  for k in incoming)
