"""SimSiam (Chen & He, 2021): a stop-gradient on the other view replaces BYOL's target;
every network is shared, nothing stays local."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.heads import mlp
from common.methods.base import HeadSizes, SSLMethod


def simsiam_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine with stop-gradient on the target; -1 when aligned (fp32 under autocast)."""
    return -F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1).mean()


class SimSiam(SSLMethod):
    shared_prefixes = ("encoder.", "projector.", "predictor.")
    predictor_prefixes = ("predictor.",)

    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(feature_dim, heads.hidden_dim, heads.proj_dim, last_bn=True)
        # The paper's bottleneck predictor: hidden = out / 4.
        self.predictor = mlp(heads.proj_dim, max(heads.proj_dim // 4, 1), heads.proj_dim)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.encoder(torch.cat([view1, view2]))).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        return (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)) / 2
