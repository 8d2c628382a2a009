"""Bulyan (El Mhamdi et al., 2018): Multi-Krum chooses n - 2 f of the accepted replies, then
per coordinate the mean of the n - 4 f chosen values closest to their median, Flower's Bulyan
with Krum's distances over float arrays only (robust.py). Needs n >= 4 f + 3. Sites count
equally in the coordinate-wise stage. BatchNorm statistics take the same per-coordinate
mean of chosen sites' values; every array returns in its sent dtype. No server state."""
from __future__ import annotations

from flwr.serverapp.strategy import Bulyan

from fedssl.common.config import RunConfig
from fedssl.server.rule import AggregationRule, sampling
from fedssl.server.strategies.robust import InSentDtypes, require_replies, select_by_float_distances


class BulyanInSentDtypes(InSentDtypes, Bulyan):
    pass


def check(cfg: RunConfig) -> None:
    require_replies(cfg, 4 * cfg.num_malicious + 3, "Bulyan's bound: 4 f + 3")


def build(cfg: RunConfig) -> BulyanInSentDtypes:
    return BulyanInSentDtypes(**sampling(cfg), num_malicious_nodes=cfg.num_malicious,
                              selection_rule=select_by_float_distances)


RULE = AggregationRule(build=build, check=check)
