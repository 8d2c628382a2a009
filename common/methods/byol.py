"""BYOL (Grill et al., 2020). FedBYOL shares the online encoder, projector and predictor;
the EMA target stays on the client (Zhuang et al., 2021).

Augmentation: the paper's Table 6, asymmetric between the views: crop scale (0.08, 1),
flip 0.5, colour jitter p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in
random order), grayscale 0.2, gaussian blur 1.0 / 0.1, solarize 0.0 / 0.2. The same numbers
as lightly's BYOLView1Transform / BYOLView2Transform; solo-learn's CIFAR config
(scripts/pretrain/cifar/augmentations/asymmetric.yaml) drops the blur at 32 px, as
fedssl's `blur` key does by default.

The predictor trains at predictor-lr-scale (10) x the base learning rate in every round
(`predictor-lr-schedule` "constant", common/training.py); BYOL's paper and code train it at
the schedule's rate like every other parameter. Measured here (docs/results.md, "The
predictor's schedule"): both fast schedules within 0.2 points of each other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig
from fedssl.common.ema import ema_
from fedssl.common.heads import mlp
from fedssl.common.methods.base import HeadSizes, SSLMethod, frozen_copy
from fedssl.common.schedules import byol_tau


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), averaged over the batch; 0 when aligned. In fp32 under bf16 autocast:
    near convergence 2 - 2cos is a small difference of numbers near 2."""
    return 2 - 2 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1).mean()


class BYOL(SSLMethod):
    shared_prefixes = ("encoder.", "projector.", "predictor.")
    predictor_prefixes = ("predictor.",)
    augmentation = ViewRecipe(
        crop_scale=(0.08, 1.0), jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
        hue=0.1, grayscale_prob=0.2, blur_probs=(1.0, 0.1), solarize_probs=(0.0, 0.2),
    )

    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes, base_tau: float = 0.99):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(feature_dim, heads.hidden_dim, heads.proj_dim)
        self.predictor = mlp(heads.proj_dim, heads.hidden_dim, heads.proj_dim)
        self.target_encoder = frozen_copy(encoder)
        self.target_projector = frozen_copy(self.projector)
        self.base_tau = base_tau

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> BYOL:
        return cls(encoder, feature_dim, heads, base_tau=cfg.byol_tau)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        # Both views in one batch: one pass per network instead of two.
        views = torch.cat([view1, view2])
        p1, p2 = self.predictor(self.projector(self.encoder(views))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_encoder(views)).chunk(2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = [*self.target_encoder.parameters(), *self.target_projector.parameters()]
        return target, online

    def after_step(self, progress: float) -> None:
        ema_(*self._pairs(), byol_tau(progress, self.base_tau))

    @torch.no_grad()
    def init_local(self) -> None:
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_projector.load_state_dict(self.projector.state_dict())
