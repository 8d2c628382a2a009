"""FedAvg over the method's shared arrays, weighted by examples: FedBYOL / FedSimSiam."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedssl.server.rule import AggregationRule, sampling

RULE = AggregationRule(build=lambda cfg: FedAvg(**sampling(cfg)), fedavg_mean=True)
