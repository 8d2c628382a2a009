"""The peer in the throughput comparison: BYOL and SimSiam assembled from lightly's building
blocks the way its documentation assembles them (its transforms applied image by image in a
torch DataLoader, its projection and prediction heads, its loss, `update_momentum` with its
cosine schedule), around the same encoder, optimizer, batch size, threads and precision as
fedssl's client. Needs the `bench` extra (`pip install --no-deps lightly lightning-utilities`
is enough for these imports).

The DataLoader reads the same decoded uint8 images as fedssl (as PIL images, the input
lightly's transforms take), so JPEG decoding is excluded on both sides: what differs is the
data pipeline and the method's assembly, not the disk."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_pil_image

from fedssl.common.device import autocast
from fedssl.common.encoders import build_encoder
from fedssl.common.methods.base import HeadSizes
from fedssl.common.training import TrainResult

try:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import (BYOLPredictionHead, BYOLProjectionHead,
                                        SimSiamPredictionHead, SimSiamProjectionHead)
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimSiamTransform
    from lightly.utils.scheduler import cosine_schedule
except ImportError as err:  # pragma: no cover - the bench extra is optional
    raise SystemExit(f"lightly is not installed ({err}): pip install -e '.[bench]' "
                     "(or pip install --no-deps lightly lightning-utilities)") from None


class _DecodedImages(Dataset):
    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(to_pil_image(self.images[index]))


class LightlyBYOL(nn.Module):
    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes, base_tau: float):
        super().__init__()
        self.backbone = encoder
        self.projection_head = BYOLProjectionHead(feature_dim, heads.hidden_dim, heads.proj_dim)
        self.prediction_head = BYOLPredictionHead(heads.proj_dim, heads.hidden_dim, heads.proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.base_tau = base_tau

    def _online(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def _target(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def loss(self, x0, x1):
        p0, p1 = self._online(x0), self._online(x1)
        z0, z1 = self._target(x0), self._target(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def after_step(self, step: int, total: int) -> None:
        tau = cosine_schedule(step, total, self.base_tau, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m=tau)
        update_momentum(self.projection_head, self.projection_head_momentum, m=tau)


class LightlySimSiam(nn.Module):
    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes):
        super().__init__()
        self.backbone = encoder
        self.projection_head = SimSiamProjectionHead(feature_dim, heads.hidden_dim, heads.proj_dim)
        self.prediction_head = SimSiamPredictionHead(heads.proj_dim, max(heads.proj_dim // 4, 1),
                                                     heads.proj_dim)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, x0, x1):
        z0 = self.projection_head(self.backbone(x0).flatten(start_dim=1))
        z1 = self.projection_head(self.backbone(x1).flatten(start_dim=1))
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))

    def after_step(self, step: int, total: int) -> None:
        pass


def transform_for(method: str, image_size: int, crop_min_scale: float, blur: bool):
    """lightly's own recipe for the method, at fedssl's crop scale and blur setting."""
    if method == "byol":
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=image_size, min_scale=crop_min_scale,
                                                gaussian_blur=1.0 if blur else 0.0),
            view_2_transform=BYOLView2Transform(input_size=image_size, min_scale=crop_min_scale,
                                                gaussian_blur=0.1 if blur else 0.0))
    return SimSiamTransform(input_size=image_size, min_scale=crop_min_scale,
                            gaussian_blur=0.5 if blur else 0.0)


def build(cfg) -> nn.Module:
    """The lightly model for `cfg.method`, on fedssl's encoder and head sizes, seeded alike."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        encoder, dim = build_encoder(cfg.resolved_encoder, cfg.image_size)
        heads = HeadSizes(proj_dim=cfg.proj_dim, hidden_dim=cfg.hidden_dim)
        if cfg.method == "byol":
            return LightlyBYOL(encoder, dim, heads, cfg.byol_tau)
        if cfg.method == "simsiam":
            return LightlySimSiam(encoder, dim, heads)
    raise ValueError(f"method={cfg.method!r}: the lightly peer is built for byol and simsiam")


def train_epoch(model: nn.Module, images: torch.Tensor, cfg, device: torch.device, *,
                workers: int = 0, seed: int = 0) -> TrainResult:
    """One epoch over `images` (uint8 [N,3,H,W]), timed like train_epochs:
    from the first batch requested to the last step's loss on the host."""
    model.to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    transform = transform_for(cfg.method, cfg.image_size, cfg.crop_min_scale, cfg.blur)
    loader = DataLoader(_DecodedImages(images, transform), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    total = len(loader)
    loss_sum = torch.zeros((), device=device)
    start = time.perf_counter()
    step = 0
    for (x0, x1) in loader:
        x0, x1 = x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)
        with autocast(device, cfg.amp, model.backbone):
            loss = model.loss(x0, x1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_step(step, total)
        loss_sum += loss.detach()
        step += 1
    loss = float(loss_sum) / max(step, 1)
    return TrainResult(loss=loss, steps=step, images=step * cfg.batch_size,
                       seconds=time.perf_counter() - start)
