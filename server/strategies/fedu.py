"""FedU (Zhuang et al., ICCV 2021): FedAvg on the server; the divergence-aware predictor
update runs on each client (common/global_updates/fedu.py)."""
from __future__ import annotations

from dataclasses import replace

from fedssl.common.config import RunConfig
from fedssl.common.global_updates.fedu import require_predictor
from fedssl.common.methods import build_method
from fedssl.server.strategies import fedavg


def check(cfg: RunConfig) -> None:
    # Refused here, before round 1, rather than as an error reply from every client each round.
    require_predictor(cfg.method, build_method(cfg).shared_state())


RULE = replace(fedavg.RULE, check=check)
