"""FedEMA (Zhuang et al., ICLR 2022) as its authors run it with client sampling: the
`selective_ema` mode of EasyFL's applications/fedssl/client.py (`FedSSLClient.update_model`).

A client that trained in the previous server round (r - 1) moves its online networks (all it
shares: encoder, projector, predictor) towards the global ones by an EMA whose weight on its
own model grows with the divergence d of its last training (divergence.py):

    local <- mu * local + (1 - mu) * global,   mu = min(lambda * d, 1)

Any other client takes the global model: in its first round, and when its own model is from
an older round, since pulling back toward a model several rounds old undoes the global
progress made meanwhile (there: the EMA branch only when `previous_trained_round + 1` is
the current round).

As in the authors' code:
- d is how far the client's last training moved its encoder from where that round started
  (`_calculate_divergence(old_model, new_model)` in `FedSSLClient.train`), not the distance
  between its model and the incoming global one;
- lambda is set once, to fedema-tau / d, from the divergence of the client's first training
  (`_calculate_weight_scaler`, which `train` calls under random selection), so mu = tau when
  that is the d applied; the client keeps it in `memo`; a d of 0 sets none (mu = 0);
- the EMA runs over parameters (`model.update_moving_average` walks `.parameters()`), with
  the predictor at the same mu (`ema_predictor`'s two branches give the same weights);
  BatchNorm statistics and counters are not weights and take the global values. (The
  authors' predictor keeps the client's own statistics when mu > 0.5, a side effect of
  which of the two modules their EMA writes into; here the predictor's are global too.)

In its global branch the client also re-derives its copies of the shared networks (BYOL's
target, MoCo's key encoder, DINO's teacher) from the global model, as the authors' client
resets its target to the global online encoder there (`took_global`, read by client/app.py
through the rule's `follows_global`); local state that is no such copy (MoCo's queue,
DINO's centre, MAE's local decoder) stays the site's own.

Reported, the same names every round: `ema` (1 for the EMA, 0 for the global model), the
last training's `divergence`, `mu` (0 in the global branch, which is the EMA with mu = 0) and
`previous-round`, the round the client's own model is from (0 if none).
"""
from __future__ import annotations

import logging

from fedssl.common.config import RunConfig
from fedssl.common.ema import ema_

log = logging.getLogger("fedssl")
LAMBDA = "fedema-lambda"


def decay(divergence: float, lam: float) -> float:
    return min(lam * divergence, 1.0)


def took_global(decided_by: dict[str, float]) -> bool:
    return decided_by.get("ema") == 0.0


def update(cfg: RunConfig, method, incoming, previous, memo, server_round: int) -> dict[str, float]:
    if previous is not None and LAMBDA not in memo and previous.divergence > 0:
        memo[LAMBDA] = cfg.fedema_tau / previous.divergence
    numbers = {"divergence": previous.divergence if previous else 0.0,
               "previous-round": float(previous.trained_in if previous else 0)}
    if previous is None or previous.trained_in != server_round - 1:
        method.load_partial(dict(incoming))
        return {"ema": 0.0, "mu": 0.0, **numbers}
    mu = decay(previous.divergence, memo.get(LAMBDA, 0.0))
    weights = [name for name, _ in method.named_parameters() if name in incoming]
    local = {k: previous.shared[k].clone() for k in weights}
    ema_([local[k] for k in weights], [incoming[k].to(local[k].dtype) for k in weights], mu)
    method.load_partial({**incoming, **local})
    log.info("fedema: last training's divergence %.4f, mu %.4f", previous.divergence, mu)
    return {"ema": 1.0, "mu": mu, **numbers}
