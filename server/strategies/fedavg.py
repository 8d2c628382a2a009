"""FedAvg over the method's shared arrays, weighted by examples: FedBYOL / FedSimSiam."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from server.rounds import SSLRounds, sampling


class FedAvgSSL(SSLRounds, FedAvg):
    streams_mean = True


def build(cfg: RunConfig) -> FedAvgSSL:
    return FedAvgSSL(**sampling(cfg))
