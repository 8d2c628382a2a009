"""How far a client's encoder is from the global one: the divergence FedU and FedEMA act on."""
from __future__ import annotations

from typing import Mapping

import torch

ENCODER = "encoder."


def encoder_divergence(local: Mapping[str, torch.Tensor], incoming: Mapping[str, torch.Tensor]) -> float:
    """Mean, over the encoder's kernels (its floating-point entries with 2+ dimensions: conv
    and linear weights), of the L2 distance between the local and the global kernel.

    The measure of the authors' reference code (EasyFL, applications/fedssl), where FedU's
    threshold of 0.4 was tuned: a per-layer mean does not grow with depth as one distance over
    all weights would. Biases and BatchNorm entries are left out, as there."""
    keys = [k for k, v in local.items()
            if k.startswith(ENCODER) and v.is_floating_point() and v.ndim >= 2]
    if not keys:
        raise ValueError(f"no encoder kernels (entries {ENCODER}* with 2+ dimensions) to compare")
    distances = [torch.dist(local[k].double(), incoming[k].double()) for k in keys]
    return float(torch.stack(distances).mean())
