"""FedAdam (Reddi et al., 2021): FedAvg's mean taken as a pseudo-gradient for a server-side
Adam step, Flower's FedAdam with eta = fedadam-lr, beta_1 = server-momentum, tau = fedadam-tau
(beta_2 = 0.99, Flower's default). The step and its moments cover the parameters; running
statistics take the example-weighted mean (running_stats.py). The moments m_t and v_t are
checkpointed; the arrays it steps from are the global model each round, which the checkpoint
holds already."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAdam

from fedssl.common.config import RunConfig
from fedssl.server.rule import AggregationRule, KeepsServerState, sampling
from fedssl.server.strategies.running_stats import StatisticsAsMean, statistics_keys


class FedAdamOnParameters(KeepsServerState, StatisticsAsMean, FedAdam):
    server_state_attrs = ("m_t", "v_t")


def build(cfg: RunConfig) -> FedAdamOnParameters:
    strategy = FedAdamOnParameters(**sampling(cfg), eta=cfg.fedadam_lr, beta_1=cfg.server_momentum,
                                   tau=cfg.fedadam_tau)
    strategy.statistics = statistics_keys(cfg)
    return strategy


RULE = AggregationRule(build=build)
