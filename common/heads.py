"""Projection and prediction heads: a head is a short list of layers, nothing more."""
from __future__ import annotations

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
