"""Local SSL training on a uint8 image tensor: shared by the ClientApp and the centralized
baseline, so both run the same hot path."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from fedssl.common.augment import TwoViewAugment
from fedssl.common.config import RunConfig
from fedssl.common.device import autocast
from fedssl.common.methods import method_type
from fedssl.common.methods.base import SSLMethod


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean loss over the steps
    steps: int
    images: int  # images passed through (each yields the method's views)
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches only (BatchNorm needs more than one sample); a set smaller than a batch
    is one batch."""
    return max(num_images // batch_size, 1)


def augmenter(cfg: RunConfig) -> TwoViewAugment:
    """The run's method's own recipe at the run's image size, making as many views as the
    method takes (`SSLMethod.views`: two, MAE's one). Of the run config,
    `blur` (false: no blur in either view; true: the recipe's per-view probabilities) and
    `crop-min-scale` (replaces the recipe's lower crop bound) override it; the rest is the
    method's (ViewRecipe.at)."""
    kind = method_type(cfg.method)
    return TwoViewAugment(kind.augmentation.at(cfg.image_size, blur=cfg.blur, crop_min_scale=cfg.crop_min_scale),
                          views=kind.views)


@dataclass(frozen=True)
class StepSettings:
    """train_epochs' batch, optimizer and precision settings. `lr` is the rate these steps
    train at: a round's (common.schedules.round_lr), not the run's base rate; `predictor_lr`
    the rate of a method's predictor (None: `lr`)."""
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    amp: bool = True
    predictor_lr: float | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, *, lr: float | None = None) -> StepSettings:
        """The run config's settings, at `lr` if given (else its base rate), so every caller
        that trains as a client does passes the same ones.

        The predictor trains at `predictor-lr-scale` x the base rate in every round under
        `predictor-lr-schedule = "constant"` (the default; SimSiam's authors' `--fix-pred-lr`,
        whose multiple is 1), at that multiple of the round's rate under "cosine" (it decays
        with every other parameter). The predictor has to keep up with a projector that moves
        under it; docs/results.md ("The predictor's schedule") has the measurement that chose
        the default."""
        round_rate = cfg.lr if lr is None else lr
        predictor_base = cfg.lr if cfg.predictor_lr_schedule == "constant" else round_rate
        return cls(batch_size=cfg.batch_size, lr=round_rate, momentum=cfg.momentum,
                   weight_decay=cfg.weight_decay, amp=cfg.amp,
                   predictor_lr=cfg.predictor_lr_scale * predictor_base)


def param_groups(method: SSLMethod, lr: float, predictor_lr: float | None = None) -> list[dict]:
    """The trainable parameters at `lr`, the method's predictor at `predictor_lr` (None: `lr`)."""
    predictor, rest = [], []
    for name, param in method.named_parameters():
        if param.requires_grad:
            (predictor if name.startswith(method.predictor_prefixes) else rest).append(param)
    groups = [{"params": rest, "lr": lr}]
    if predictor:
        groups.append({"params": predictor, "lr": lr if predictor_lr is None else predictor_lr})
    return groups


def train_epochs(
    method: SSLMethod,
    images: torch.Tensor,
    augment: TwoViewAugment,
    *,
    settings: StepSettings,
    epochs: int,
    device: torch.device,
    progress_start: float = 0.0,
    progress_end: float = 1.0,
    seed: int = 0,
) -> TrainResult:
    """Train `method` for `epochs` over `images` (uint8 [N,3,H,W]); `progress_*` place these
    steps within the whole run for schedules such as BYOL's target momentum."""
    if len(images) < 2:
        raise ValueError(f"need at least 2 images to train, got {len(images)}")
    method.to(device).train()
    lr = settings.lr
    optimizer = torch.optim.SGD(param_groups(method, lr, settings.predictor_lr), lr=lr,
                                momentum=settings.momentum, weight_decay=settings.weight_decay)
    batch = min(settings.batch_size, len(images))
    per_epoch = steps_per_epoch(len(images), batch)
    total = epochs * per_epoch
    method.fit_to_data(per_epoch * batch)
    generator = torch.Generator().manual_seed(seed)
    # A CPU generator whatever the device: the same seed gives the same views on CPU and
    # CUDA, and drawing the augmentation's parameters costs no device sync (common/augment.py).
    aug_generator = torch.Generator().manual_seed(seed + 1)
    pin = device.type == "cuda"
    loss_sum = torch.zeros((), device=device)
    start = time.perf_counter()
    step = 0
    # What a method draws inside its loss (MAE's masks) comes from the global generators:
    # seeded here and restored after, so the same seed gives the same steps whatever ran before.
    with torch.random.fork_rng(devices=None if device.type == "cuda" else []):
        torch.manual_seed(seed + 2)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for b in range(per_epoch):
                chunk = images[order[b * batch:(b + 1) * batch]]
                if pin:
                    chunk = chunk.pin_memory()
                views = augment(chunk.to(device, non_blocking=True), aug_generator)
                with autocast(device, settings.amp, method.encoder):
                    loss = method(*views)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                method.after_step(progress_start + (progress_end - progress_start) * step / total)
                loss_sum += loss.detach()
    mean_loss = float(loss_sum) / max(step, 1)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"training diverged: mean loss {mean_loss}")
    return TrainResult(loss=mean_loss, steps=step, images=step * batch,
                       seconds=time.perf_counter() - start)
