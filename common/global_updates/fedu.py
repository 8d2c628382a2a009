"""FedU (Zhuang et al., ICCV 2021), divergence-aware predictor update (DAPU): the encoder
and the projector always take the global model; the predictor takes the global one only
while the client's last training moved its encoder less than fedu-threshold (divergence.py).
A client whose training moves it further keeps its own predictor, which holds what it learnt
of its own data.

As in the authors' code (EasyFL, applications/fedssl/client.py): the divergence compares the
encoder the client started its last round from (the global one, in FedU) with the encoder it
trained to, measured after training (`FedSSLClient.train` -> `_calculate_divergence(old_model,
new_model)`, turned into a choice by `_DAPU_predictor_usage`), and applied when the client
next trains (`update_model`, `update_predictor == DAPU`), however many rounds later: unlike
FedEMA's `selective_ema`, DAPU has no check of the round. A client's first round has nothing
to go by: it takes the whole global model.

Reported, the same names every round: `divergence` (0 before a first training),
`global-predictor` (1 or 0) and `previous-round`, the round the client's own model is from
(0 if none).
"""
from __future__ import annotations

import logging

from fedssl.common.config import ConfigError, RunConfig

log = logging.getLogger("fedssl")
PREDICTOR = "predictor."


def require_predictor(method_name: str, shared_keys) -> None:
    """FedU has nothing to decide for a method that shares no predictor (SimCLR, MoCo):
    refuse it rather than run FedAvg under FedU's name."""
    if not any(k.startswith(PREDICTOR) for k in shared_keys):
        raise ConfigError(f"strategy='fedu' is invalid with method={method_name!r}: FedU keeps or "
                          f"replaces the predictor, and {method_name} shares none; use method byol (FedU's "
                          f"own), or strategy fedema or fedavg")


def keeps_local_predictor(divergence: float, threshold: float) -> bool:
    return divergence >= threshold


def update(cfg: RunConfig, method, incoming, previous, memo, server_round: int) -> dict[str, float]:
    require_predictor(cfg.method, incoming)
    state = dict(incoming)
    keep = previous is not None and keeps_local_predictor(previous.divergence, cfg.fedu_threshold)
    if keep:
        state.update({k: v for k, v in previous.shared.items() if k.startswith(PREDICTOR)})
    if previous is not None:
        log.info("fedu: last training's divergence %.4f, %s predictor", previous.divergence,
                 "local" if keep else "global")
    method.load_partial(state)
    return {"divergence": previous.divergence if previous else 0.0,
            "global-predictor": float(not keep),
            "previous-round": float(previous.trained_in if previous else 0)}
