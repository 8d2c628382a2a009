"""FedAvg over the method's shared arrays, weighted by examples: FedBYOL / FedSimSiam."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from server.rounds import SSLRounds


class FedAvgSSL(SSLRounds, FedAvg):
    pass


def build(cfg) -> FedAvgSSL:
    return FedAvgSSL(fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
                     min_train_nodes=cfg.min_train_clients,
                     min_available_nodes=cfg.min_train_clients)
