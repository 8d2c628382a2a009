"""FedEMA (Zhuang et al., ICLR 2022): a client moves its online networks (everything it
shares: encoder, projector, predictor) towards the global ones by an EMA whose weight on the
local model grows with the divergence d (divergence.py) between them:

    local <- mu * local + (1 - mu) * global,   mu = min(lambda * d, 1)

lambda is set once per client, at its first round with a previous local model, to
fedema-tau / d, so mu = tau then; the client keeps it (in `memo`) for later rounds. A client's
first round, and a divergence of 0 before lambda is set, take the global model. Integer
entries (BatchNorm step counters) are not weights and take the global value.
"""
from __future__ import annotations

import logging

from common.ema import ema_
from common.global_updates.divergence import encoder_divergence

log = logging.getLogger("fedssl")
LAMBDA = "fedema-lambda"


def decay(divergence: float, lam: float) -> float:
    return min(lam * divergence, 1.0)


def update(cfg, method, incoming, previous, memo) -> dict[str, float]:
    if previous is None:
        method.load_partial(dict(incoming))
        return {}
    divergence = encoder_divergence(previous, incoming)
    if LAMBDA not in memo and divergence > 0:
        memo[LAMBDA] = cfg.fedema_tau / divergence
    mu = decay(divergence, memo.get(LAMBDA, 0.0))
    local = {k: v.clone() for k, v in previous.items() if v.is_floating_point()}
    keys = list(local)
    ema_([local[k] for k in keys], [incoming[k].to(local[k].dtype) for k in keys], mu)
    method.load_partial({**incoming, **local})
    log.info("fedema: encoder divergence %.4f, mu %.4f", divergence, mu)
    return {"divergence": divergence, "mu": mu}
