"""FedAvgM (Hsu et al., 2019): FedAvg's mean taken as a pseudo-gradient step with server
momentum, Flower's FedAvgM with server-lr and server-momentum. The step and its momentum cover
the parameters; running statistics take the example-weighted mean (running_stats.py). The
momentum is checkpointed."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAvgM

from fedssl.common.config import RunConfig
from fedssl.server.rule import AggregationRule, KeepsServerState, sampling
from fedssl.server.strategies.running_stats import StatisticsAsMean, statistics_keys

MOMENTUM = "momentum_vector"


class FedAvgMOnParameters(KeepsServerState, StatisticsAsMean, FedAvgM):
    # Momentum restored from a checkpoint, by array name, until the first round orders it.
    _saved_momentum: dict | None = None

    def configure_train(self, server_round, arrays, config, grid):
        if self._saved_momentum is not None:
            # Flower keeps the momentum as a list in the order of the arrays it steps: the
            # global model's parameters (a checkpoint's entries for statistics are not used).
            statistics = self.statistics_in(arrays)
            self.momentum_vector = [self._saved_momentum[k] for k in arrays.keys() if k not in statistics]
            self._saved_momentum = None
        return super().configure_train(server_round, arrays, config, grid)

    def server_state(self):
        if self.momentum_vector is None:
            return {}
        return {MOMENTUM: dict(zip(self.current_arrays.keys(), self.momentum_vector, strict=True))}

    def load_server_state(self, state):
        unknown = set(state) - {MOMENTUM}
        if unknown:
            raise KeyError(f"checkpoint holds server state {sorted(unknown)} this strategy does not keep")
        self._saved_momentum = state.get(MOMENTUM)


def build(cfg: RunConfig) -> FedAvgMOnParameters:
    strategy = FedAvgMOnParameters(**sampling(cfg), server_learning_rate=cfg.server_lr,
                                   server_momentum=cfg.server_momentum)
    strategy.statistics = statistics_keys(cfg)
    return strategy


RULE = AggregationRule(build=build)
