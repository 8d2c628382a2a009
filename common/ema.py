"""Exponential moving averages over parameter lists (BYOL's target, FedEMA's update)."""
from __future__ import annotations

from typing import Iterable

import torch


@torch.no_grad()
def ema_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, in place, as one fused op per list."""
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"EMA over lists of different length: {len(target)} vs {len(online)}")
    torch._foreach_lerp_(target, online, 1.0 - tau)
