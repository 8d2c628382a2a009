"""How far a client's training moved its encoder: the divergence FedU and FedEMA act on.

Both rules compare the same two models, as their authors' code does (EasyFL,
applications/fedssl/client.py, `FedSSLClient.train`: `old_model` is copied before local
training, `new_model` after it, and `_calculate_divergence(old_model, new_model)` is kept for
the client's next round): the encoder a client started its last round of training from and
the encoder it trained to. Neither side is the global model that arrives next."""
from __future__ import annotations

from typing import Mapping

import torch

ENCODER = "encoder."


def encoder_kernels(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries the divergence reads: the encoder's floating-point entries with 2+
    dimensions (conv and linear weights)."""
    kernels = {k: v for k, v in state.items()
               if k.startswith(ENCODER) and v.is_floating_point() and v.ndim >= 2}
    if not kernels:
        raise ValueError(f"no encoder kernels (entries {ENCODER}* with 2+ dimensions) to compare")
    return kernels


def encoder_divergence(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """Mean, over the encoder's kernels, of the L2 distance between the two states' kernels.

    The measure of the authors' `_calculate_divergence`, where FedU's threshold of 0.4 was
    tuned: a per-layer mean does not grow with depth as one distance over all weights would.
    Biases and BatchNorm entries are left out, as there. The authors pick the kernels by name
    (parameters named `*conv*weight`), which leaves out their ResNet's 1x1 shortcut convs
    (`shortcut.0.weight`); here those (`downsample.0.weight`) count too, so for a ResNet the
    mean is over a few more, smaller kernels."""
    keys = list(encoder_kernels(before))
    distances = [torch.dist(before[k].double(), after[k].double()) for k in keys]
    return float(torch.stack(distances).mean())
