"""Multi-Krum (Blanchard et al., 2017): the example-weighted mean of the multikrum-keep
accepted replies with the least Krum scores (0: all but num-malicious of the round's
replies), Flower's MultiKrum with distances over float arrays only (robust.py). Guaranteed
while n >= 2 f + 3 and at most n - f are kept. BatchNorm statistics take the same mean over
the chosen sites; every array returns in its sent dtype. No server state."""
from __future__ import annotations

from flwr.serverapp.strategy import MultiKrum

from fedssl.common.config import ConfigError, RunConfig
from fedssl.server.rule import AggregationRule, sampling
from fedssl.server.strategies.robust import FloatDistanceKrum, InSentDtypes, require_replies


class MultiKrumOnFloats(InSentDtypes, FloatDistanceKrum, MultiKrum):
    pass


def check(cfg: RunConfig) -> None:
    require_replies(cfg, 2 * cfg.num_malicious + 3, "Krum's bound: 2 f + 3")
    if cfg.multikrum_keep > cfg.min_train_clients - cfg.num_malicious:
        raise ConfigError(f"multikrum-keep={cfg.multikrum_keep} is invalid with min-train-clients="
                          f"{cfg.min_train_clients} and num-malicious={cfg.num_malicious}: must be <= "
                          f"{cfg.min_train_clients - cfg.num_malicious} (n - f), or 0 for all but f")


def build(cfg: RunConfig) -> MultiKrumOnFloats:
    return MultiKrumOnFloats(**sampling(cfg), num_malicious_nodes=cfg.num_malicious,
                             num_nodes_to_select=cfg.multikrum_keep)


RULE = AggregationRule(build=build, check=check)
