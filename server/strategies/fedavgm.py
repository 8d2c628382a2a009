"""FedAvgM (Hsu et al., 2019): FedAvg's mean taken as a pseudo-gradient step with server
momentum, Flower's FedAvgM with server-lr and server-momentum. Its momentum is checkpointed."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAvgM

from server.rounds import SSLRounds, sampling
from server.strategies.server_opt import SentDtypes

MOMENTUM = "momentum_vector"


class FedAvgMSSL(SSLRounds, SentDtypes, FedAvgM):
    # Momentum restored from a checkpoint, by array name, until the first round orders it.
    _saved_momentum: dict | None = None

    def configure_train(self, server_round, arrays, config, grid):
        if self._saved_momentum is not None:
            # Flower keeps the momentum as a list in the global model's key order.
            self.momentum_vector = [self._saved_momentum[k] for k in arrays.keys()]
            self._saved_momentum = None
        return super().configure_train(server_round, arrays, config, grid)

    def server_state(self):
        if self.momentum_vector is None:
            return {}
        return {MOMENTUM: dict(zip(self.current_arrays.keys(), self.momentum_vector))}

    def load_server_state(self, state):
        unknown = set(state) - {MOMENTUM}
        if unknown:
            raise KeyError(f"checkpoint holds server state {sorted(unknown)} this strategy does not keep")
        self._saved_momentum = state.get(MOMENTUM)


def build(cfg) -> FedAvgMSSL:
    return FedAvgMSSL(**sampling(cfg), server_learning_rate=cfg.server_lr,
                      server_momentum=cfg.server_momentum)
