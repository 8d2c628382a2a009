"""Krum (Blanchard et al., 2017): the one accepted reply whose summed squared distance to its
n - f - 2 nearest others is least, Flower's Krum, with distances over float arrays only
(robust.py). Guaranteed while n >= 2 f + 3. The chosen site's BatchNorm statistics come with
its weights; every array returns in its sent dtype. No server state."""
from __future__ import annotations

from flwr.serverapp.strategy import Krum

from fedssl.common.config import RunConfig
from fedssl.server.rule import AggregationRule, sampling
from fedssl.server.strategies.robust import FloatDistanceKrum, InSentDtypes, require_replies


class KrumOnFloats(InSentDtypes, FloatDistanceKrum, Krum):
    pass


def check(cfg: RunConfig) -> None:
    require_replies(cfg, 2 * cfg.num_malicious + 3, "Krum's bound: 2 f + 3")


RULE = AggregationRule(build=lambda cfg: KrumOnFloats(**sampling(cfg), num_malicious_nodes=cfg.num_malicious),
                       check=check)
