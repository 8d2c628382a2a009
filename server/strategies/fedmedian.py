"""FedMedian (Yin et al., 2018): the coordinate-wise median of the accepted replies, Flower's
FedMedian; sites count equally, whatever their number of examples. With n replies it
withstands f hostile ones while n >= 2 f + 1. BatchNorm statistics take the median too, and
every array returns in its sent dtype (robust.py). No server state."""
from __future__ import annotations

from flwr.serverapp.strategy import FedMedian

from fedssl.common.config import RunConfig
from fedssl.server.rule import AggregationRule, sampling
from fedssl.server.strategies.robust import InSentDtypes, require_replies


class FedMedianInSentDtypes(InSentDtypes, FedMedian):
    pass


def check(cfg: RunConfig) -> None:
    require_replies(cfg, 2 * cfg.num_malicious + 1, "a median needs a majority of honest replies: 2 f + 1")


RULE = AggregationRule(build=lambda cfg: FedMedianInSentDtypes(**sampling(cfg)), check=check)
