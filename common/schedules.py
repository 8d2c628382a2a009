"""Stateless schedules: each is a function of progress, so rounds and restarts map onto
them without carrying a counter around."""
from __future__ import annotations

import math


def cosine(progress: float, start: float, end: float) -> float:
    """Cosine from `start` at progress 0 to `end` at progress 1 (clamped outside)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def byol_tau(progress: float, base_tau: float = 0.99) -> float:
    """BYOL's target momentum: tau = 1 - (1 - base)(cos(pi k/K) + 1)/2, rising to 1."""
    return cosine(progress, base_tau, 1.0)


def round_lr(server_round: int, num_rounds: int, base_lr: float) -> float:
    """The learning rate of round `server_round` (1-based) of `num_rounds`: a cosine from
    `base_lr` in round 1 toward 0, which it would reach only after the last round, so the
    last round still learns. The centralized baseline reads an epoch as a round."""
    return cosine((server_round - 1) / num_rounds, base_lr, 0.0)
