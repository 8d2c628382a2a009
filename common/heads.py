"""Projection and prediction heads: a head is a short list of layers, nothing more."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, *, last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU-Linear (BYOL's projector and predictor); `last_bn` adds the output
    BatchNorm SimSiam's projector uses."""
    layers: list[nn.Module] = [
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=not last_bn),
    ]
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def expander(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Three layers, (Linear-BN-ReLU) x 2 then a plain Linear: Barlow Twins' projector and
    VICReg's expander, as in the authors' code. No bias before a BatchNorm (it would be
    cancelled by it; VICReg's code keeps one there, to no effect) and none at the output."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


def dino_head(in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Sequential:
    """DINO's head up to its bottleneck, as the authors' DINOHead (3 layers, use_bn False):
    (Linear-GELU) x 2, then Linear; weights truncated normal (std 0.02), biases 0. The L2
    normalisation and the weight-normalised last layer (`NormalizedLinear`) follow it."""
    head = nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, bottleneck_dim),
    )
    for layer in head:
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    return head


class NormalizedLinear(nn.Module):
    """A bias-free linear layer whose rows are L2-normalised at every call, applied to the
    L2-normalised input: DINO's weight-normalised last layer with its gain fixed at 1 (the
    authors' norm_last_layer True), so each output is a cosine. Only the direction (weight
    norm's v, here `weight`) is a parameter: a gain frozen at 1 would be one more array to
    ship that never changes. Initialised as nn.Linear, as the authors' last layer is."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))
