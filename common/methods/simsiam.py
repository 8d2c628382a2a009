"""SimSiam (Chen & He, 2021): a stop-gradient on the other view replaces BYOL's target;
every network is shared, nothing stays local.

Augmentation: MoCo v2's, the same for both views, as the authors' main_simsiam.py:
crop scale (0.2, 1), flip 0.5, colour jitter p 0.8 (0.4, 0.4, 0.4, 0.1), grayscale 0.2,
gaussian blur 0.5 at ImageNet size, no solarize (lightly's SimSiamTransform has the same
numbers). The paper's CIFAR setting (appendix D: 32x32, "we do not use blur
augmentation") is what fedssl's `blur` key, default false, gives at 32 px.

Predictor learning rate: predictor-lr-scale (10) x the base learning rate in every round
(`predictor-lr-schedule` "constant"), while every other parameter follows the run's cosine.
The paper's Table 1 reports the predictor with the decayed lr (67.7) and with a constant,
not decayed one (68.1); the authors' README runs the latter (`--fix-pred-lr`, off unless
passed: the predictor stays at the base lr, with no scale). fedssl's 10x scale was measured
in short runs, and constant against decayed at that scale with seeds (docs/results.md, "The
predictor's schedule": +0.2 points for constant, within the noise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig
from fedssl.common.heads import mlp
from fedssl.common.methods.base import HeadSizes, SSLMethod


def simsiam_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine with stop-gradient on the target; -1 when aligned (fp32 under autocast)."""
    return -F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1).mean()


class SimSiam(SSLMethod):
    shared_prefixes = ("encoder.", "projector.", "predictor.")
    predictor_prefixes = ("predictor.",)
    augmentation = ViewRecipe(
        crop_scale=(0.2, 1.0), jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
        hue=0.1, grayscale_prob=0.2, blur_probs=(0.5, 0.5), solarize_probs=(0.0, 0.0),
    )

    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(feature_dim, heads.hidden_dim, heads.proj_dim, last_bn=True)
        # The paper's bottleneck predictor: hidden = out / 4.
        self.predictor = mlp(heads.proj_dim, max(heads.proj_dim // 4, 1), heads.proj_dim)

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> SimSiam:
        return cls(encoder, feature_dim, heads)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.encoder(torch.cat([view1, view2]))).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        return (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)) / 2
