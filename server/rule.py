"""An aggregation rule, declared once: what aggregates on the server, what it refuses, and
what may stand in for its aggregate. Each module of server/strategies declares one (`RULE`),
and server/strategies/__init__.py lists them by name; server/rounds.py's SSLRounds wraps the
Flower strategy a declaration builds; server/dp.py and server/secure.py replace its aggregate
only where the declaration says they may. A rule's client half, where it has one (FedU,
FedEMA), is common/global_updates/<rule>.py: the sites run it and never import server code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedssl.common.config import RunConfig


def _accepts_any(cfg: RunConfig) -> None:
    return None


@dataclass(frozen=True)
class AggregationRule:
    # The Flower strategy that aggregates a round's accepted replies (and keeps any server
    # state, by mixing in KeepsServerState).
    build: Callable[[RunConfig], Strategy]
    # Its aggregate is FedAvg's example-weighted mean of the replies: summed while they are
    # screened (server/mean.py) instead of held, and replaceable by DP's noised mean of
    # clipped updates (server/dp.py) and by SecAgg+'s masked sum (server/secure.py). A rule
    # that looks at each reply or steps a server optimizer is none of these.
    fedavg_mean: bool = False
    # Raises ConfigError, in one line, for settings the rule cannot run with: before round 1,
    # also under SecAgg+ (whose adapter replaces the aggregation this builds).
    check: Callable[[RunConfig], None] = _accepts_any


def sampling(cfg: RunConfig) -> dict:
    """The Flower strategy arguments every rule shares: who trains each round. Evaluation is
    the server's own (server/evaluation.py), so no client is asked to evaluate."""
    return dict(fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
                min_train_nodes=cfg.min_train_clients, min_available_nodes=cfg.min_train_clients)


class KeepsServerState:
    """Mixed into a Flower strategy that keeps state across rounds (FedAdam's moments), so a
    checkpoint holds it without knowing the rule.

    `server_state_attrs` names the attributes that hold it as None or a dict of arrays; a
    strategy keeping state in another shape overrides both methods (FedAvgM's momentum list).
    """

    server_state_attrs: tuple[str, ...] = ()

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        return {attr: {k: np.asarray(v) for k, v in getattr(self, attr).items()}
                for attr in self.server_state_attrs if getattr(self, attr, None) is not None}

    def load_server_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        for attr, arrays in state.items():
            if attr not in self.server_state_attrs:
                raise KeyError(f"checkpoint holds server state {attr!r} this strategy does not keep")
            setattr(self, attr, dict(arrays))


class ScoresSites:
    """Mixed into a Flower strategy that scores each site's reply as it aggregates (L-DAWA's
    layer weights): the round record keeps `site_numbers`, by node, beside the numbers a rule's
    client half reports (`client_rules` in metrics.jsonl). The strategy sets them each round."""

    site_numbers: dict[str, dict[str, float]] = {}
