"""SimCLR (Chen et al., 2020): the other view of the same image is the positive, the other
2N - 2 views in the batch are the negatives. Every network is shared, nothing stays local.

Augmentation: the paper's (appendix A), the same for both views: crop scale (0.08, 1),
flip 0.5, colour distortion of strength s = 1 (jitter p 0.8 with brightness, contrast and
saturation 0.8 s and hue 0.2 s, in random order; grayscale 0.2), gaussian blur 0.5 at
ImageNet size, no solarize. The same numbers as lightly's SimCLRTransform and solo-learn's
CIFAR config (scripts/pretrain/cifar/augmentations/symmetric.yaml). The authors' own
CIFAR-10 command (google-research/simclr README) lowers the strength to s = 0.5 and turns
blur off; fedssl keeps s = 1 (COLOUR_STRENGTH) and leaves blur to its `blur` key (default
off).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig
from fedssl.common.heads import mlp
from fedssl.common.methods.base import HeadSizes, SSLMethod


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2N views: cross-entropy of each view's cosine similarities (over
    `temperature`, itself excluded) against its pair. Autocast is off, not just the inputs
    cast: under bf16 autocast the matmul would run in bf16 again, and logits up to
    1/temperature then carry errors of a few hundredths."""
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
        logits = z @ z.T / temperature
        logits.fill_diagonal_(float("-inf"))
        n = len(z1)
        pairs = torch.arange(2 * n, device=z.device).roll(n)  # view i of one half <-> i of the other
        return F.cross_entropy(logits, pairs)


COLOUR_STRENGTH = 1.0


class SimCLR(SSLMethod):
    shared_prefixes = ("encoder.", "projector.")
    augmentation = ViewRecipe(
        crop_scale=(0.08, 1.0), jitter_prob=0.8, brightness=0.8 * COLOUR_STRENGTH,
        contrast=0.8 * COLOUR_STRENGTH, saturation=0.8 * COLOUR_STRENGTH, hue=0.2 * COLOUR_STRENGTH,
        grayscale_prob=0.2, blur_probs=(0.5, 0.5), solarize_probs=(0.0, 0.0),
    )

    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes, temperature: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(feature_dim, heads.hidden_dim, heads.proj_dim)
        self.temperature = temperature

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> SimCLR:
        return cls(encoder, feature_dim, heads, temperature=cfg.simclr_temperature)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        # Both views in one batch: one pass, and BatchNorm normalises over all 2N views.
        z1, z2 = self.projector(self.encoder(torch.cat([view1, view2]))).chunk(2)
        return nt_xent(z1, z2, self.temperature)
