"""MoCo v2 (Chen et al., 2020, "Improved baselines"): a query network against keys from a
momentum copy of it, with past keys in a queue as the negatives. Only the query encoder
and projector are shared; the queue (embeddings of this client's images, which should not
leave it) and the key networks that made it stay on the client.

Augmentation: the paper's ("aug+", the authors' main_moco.py), the same for both views:
crop scale (0.2, 1), flip 0.5, colour jitter p 0.8 (0.4, 0.4, 0.4, 0.1), grayscale 0.2,
gaussian blur 0.5 at ImageNet size (fedssl's `blur` key, default off, drops it), no
solarize. (lightly's MoCoV2Transform is its SimCLRTransform instead: stronger jitter,
crop scale 0.08.)

The queue is capped at the keys this site makes in one epoch (2 views x the images an
epoch passes through; fit_to_data, with a logged warning saying from what to what). A
longer queue would hold older keys of the very images being queried, as their negatives:
the paper's 65,536 keys are 5% of an ImageNet epoch, while a site with 1,000 images makes
about 2,000 keys an epoch. Capped, not refused: each site has its own size, and the run
goes on with the longest queue that site can fill. Even at the cap about half of the
queries still meet their own image's keys from the previous epoch (when the image came
late in it); a smaller --moco-queue-size avoids more of that. The buffer keeps the configured
size, so the local state keeps its shape whatever the cap.

Where fedssl's MoCo v2 differs from the paper:
- Projector: the paper's is Linear(2048, 2048)-ReLU-Linear(2048, 128), no BatchNorm; here
  common/heads.py's Linear-BN-ReLU-Linear (as BYOL's), hidden-dim (1024) -> proj-dim (256).
- No shuffle-BN: the paper shuffles the key batch across GPUs so that a query and its key
  are normalised by BatchNorm statistics of different samples. A site trains in one
  process, so both networks normalise over the same 2N views of the batch, and the
  statistics can leak which key belongs to which query, a shortcut that lowers the loss
  without better features; the smaller the batch, the more each image weighs in those
  statistics (1 / 2N of them), so the stronger the leak.
- The loss is symmetric (both views are queries, both enqueue their keys), the key
  momentum is constant (--moco-tau, 0.99; the paper's 0.999), and the queue is smaller
  (--moco-queue-size, 4096; the paper's 65,536).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.common.augment import ViewRecipe
from fedssl.common.config import RunConfig
from fedssl.common.ema import ema_
from fedssl.common.heads import mlp
from fedssl.common.methods.base import HeadSizes, SSLMethod, frozen_copy

QUEUE_SEED = 0
VIEWS = 2  # keys enqueued per image and step: both views are queries and keys

log = logging.getLogger("fedssl")


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of each query against its key (the positive, logit 0) and the queue (the
    negatives); no gradient through the keys. Autocast is off for the reason nt_xent gives."""
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=-1)
        k = F.normalize(k.detach().float(), dim=-1)
        logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ queue.float().T], dim=1)
        targets = torch.zeros(len(q), dtype=torch.long, device=q.device)
        return F.cross_entropy(logits / temperature, targets)


class MoCoV2(SSLMethod):
    shared_prefixes = ("encoder.", "projector.")
    augmentation = ViewRecipe(
        crop_scale=(0.2, 1.0), jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
        hue=0.1, grayscale_prob=0.2, blur_probs=(0.5, 0.5), solarize_probs=(0.0, 0.0),
    )

    def __init__(self, encoder: nn.Module, feature_dim: int, heads: HeadSizes, *,
                 temperature: float = 0.2, queue_size: int = 4096, tau: float = 0.99):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(feature_dim, heads.hidden_dim, heads.proj_dim)
        self.key_encoder = frozen_copy(encoder)
        self.key_projector = frozen_copy(self.projector)
        self.temperature = temperature
        # Constant, as in the paper, not cosine toward 1 as BYOL's: each round replaces the
        # query networks with the global model, and a momentum near 1 late in the run would
        # leave the key networks, and so the positives, behind the model being trained.
        self.tau = tau
        # Buffers, so they travel in local_state() (and with .to(device)) but are not shared.
        self.register_buffer("queue", torch.empty(queue_size, heads.proj_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # The leading entries of the queue in use: all of it until fit_to_data caps it.
        self.capacity = queue_size
        self._keys: torch.Tensor | None = None
        self.init_local()

    @classmethod
    def from_config(cls, encoder: nn.Module, feature_dim: int, heads: HeadSizes, cfg: RunConfig) -> MoCoV2:
        return cls(encoder, feature_dim, heads, temperature=cfg.moco_temperature,
                   queue_size=cfg.moco_queue_size, tau=cfg.moco_tau)

    def fit_to_data(self, images_per_epoch: int) -> None:
        """Cap the queue at one epoch of this site's keys (the module docstring says why)."""
        keys_per_epoch = VIEWS * images_per_epoch
        capacity = min(len(self.queue), keys_per_epoch)
        if capacity < len(self.queue) and capacity != self.capacity:
            log.warning(
                "moco-queue-size %d capped to %d at this site: it makes %d keys an epoch "
                "(%d views x %d images), and a longer queue would hold older keys of the same "
                "images as their negatives", len(self.queue), capacity, keys_per_epoch, VIEWS,
                images_per_epoch)
        self.capacity = capacity

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        views = torch.cat([view1, view2])
        q1, q2 = self.projector(self.encoder(views)).chunk(2)
        with torch.no_grad():
            k = self.key_projector(self.key_encoder(views))
        k1, k2 = k.chunk(2)
        # The queue is enqueued in after_step, not here: the logits saved the queue for
        # backward, so writing it in place now would fail autograd's version check (or
        # need a copy of the queue every step).
        self._keys = k
        # Symmetric, and the mean of the two directions, so the value reads as the paper's
        # one-direction loss (log(1 + capacity) at chance).
        negatives = self.queue[: self.capacity]
        return (moco_loss(q1, k2, negatives, self.temperature)
                + moco_loss(q2, k1, negatives, self.temperature)) / 2

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest of the queue's first `capacity` entries with `keys`,
        L2-normalised; only the newest fit when there are more keys than that."""
        size = self.capacity
        keys = F.normalize(keys.float(), dim=-1)[-size:]
        start = self.queue_ptr % size  # a pointer restored from a longer capacity wraps
        slots = (start + torch.arange(len(keys), device=self.queue.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((start + len(keys)) % size)

    def after_step(self, progress: float) -> None:
        if self._keys is not None:
            self.enqueue(self._keys)
            self._keys = None
        query = [*self.encoder.parameters(), *self.projector.parameters()]
        key = [*self.key_encoder.parameters(), *self.key_projector.parameters()]
        ema_(key, query, self.tau)

    @torch.no_grad()
    def follow_global(self) -> None:
        self.key_encoder.load_state_dict(self.encoder.state_dict())
        self.key_projector.load_state_dict(self.projector.state_dict())
        self._keys = None

    @torch.no_grad()
    def init_local(self) -> None:
        self.follow_global()
        # Seeded, so reruns repeat: the client calls this without a seed, and the global RNG
        # differs between processes. Random unit vectors are negatives that carry no data.
        generator = torch.Generator().manual_seed(QUEUE_SEED)
        self.queue.copy_(F.normalize(torch.randn(self.queue.shape, generator=generator), dim=-1))
        self.queue_ptr.zero_()
