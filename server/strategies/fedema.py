"""FedEMA (Zhuang et al., ICLR 2022): FedAvg on the server; each client's divergence-aware
EMA towards the global model runs on the client (common/global_updates/fedema.py)."""
from __future__ import annotations

from fedssl.server.strategies import fedavg

RULE = fedavg.RULE
