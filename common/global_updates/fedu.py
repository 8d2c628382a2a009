"""FedU (Zhuang et al., ICCV 2021), divergence-aware predictor update: the encoder and the
projector always take the global model; the predictor takes the global one only while the
client's encoder is close to the global encoder (divergence < fedu-threshold). A client that
has drifted further keeps its own predictor, which holds what it learnt of its own data.

The divergence (divergence.py) is measured as the global model arrives, between the encoder
this client trained last round and the incoming global encoder, the same pair FedEMA compares
(the authors' code instead measures how far the client moved during its last round, from the
global model it started from). A client's first round has nothing to compare: it takes the
whole global model.
"""
from __future__ import annotations

import logging

from common.config import ConfigError
from common.global_updates.divergence import encoder_divergence

log = logging.getLogger("fedssl")
PREDICTOR = "predictor."


def require_predictor(method_name: str, shared_keys) -> None:
    """FedU has nothing to decide for a method that shares no predictor (SimCLR, MoCo):
    refuse it rather than run FedAvg under FedU's name."""
    if not any(k.startswith(PREDICTOR) for k in shared_keys):
        raise ConfigError(f"strategy='fedu' is invalid with method={method_name!r}: FedU keeps or "
                          f"replaces the predictor, and {method_name} shares none; use fedema or fedavg")


def keeps_local_predictor(divergence: float, threshold: float) -> bool:
    return divergence >= threshold


def update(cfg, method, incoming, previous, memo) -> dict[str, float]:
    require_predictor(cfg.method, incoming)
    state = dict(incoming)
    if previous is None:
        method.load_partial(state)
        return {}
    divergence = encoder_divergence(previous, incoming)
    keep = keeps_local_predictor(divergence, cfg.fedu_threshold)
    if keep:
        state.update({k: v for k, v in previous.items() if k.startswith(PREDICTOR)})
    log.info("fedu: encoder divergence %.4f, %s predictor", divergence, "local" if keep else "global")
    method.load_partial(state)
    return {"divergence": divergence, "global-predictor": float(not keep)}
