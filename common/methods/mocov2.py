"""MoCo v2 (Chen et al., 2020, "Improved baselines"): a query network against keys from a
momentum copy of it, with past keys in a queue as the negatives. Only the query encoder
and projector are shared; the queue (embeddings of this client's images, which should not
leave it) and the key networks that made it stay on the client."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.ema import ema_
from common.heads import mlp
from common.methods.base import HeadSizes, SSLMethod, frozen_copy

QUEUE_SEED = 0


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
        self._keys: torch.Tensor | None = None
        self.init_local()

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
        # one-direction loss (log(1 + queue_size) at chance).
        return (moco_loss(q1, k2, self.queue, self.temperature)
                + moco_loss(q2, k1, self.queue, self.temperature)) / 2

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries with `keys`, L2-normalised; only the newest fit when
        there are more keys than the queue holds."""
        size = len(self.queue)
        keys = F.normalize(keys.float(), dim=-1)[-size:]
        slots = (self.queue_ptr + torch.arange(len(keys), device=self.queue.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def after_step(self, progress: float) -> None:
        if self._keys is not None:
            self.enqueue(self._keys)
            self._keys = None
        query = [*self.encoder.parameters(), *self.projector.parameters()]
        key = [*self.key_encoder.parameters(), *self.key_projector.parameters()]
        ema_(key, query, self.tau)

    @torch.no_grad()
    def init_local(self) -> None:
        self.key_encoder.load_state_dict(self.encoder.state_dict())
        self.key_projector.load_state_dict(self.projector.state_dict())
        # Seeded, so reruns repeat: the client calls this without a seed, and the global RNG
        # differs between processes. Random unit vectors are negatives that carry no data.
        generator = torch.Generator().manual_seed(QUEUE_SEED)
        self.queue.copy_(F.normalize(torch.randn(self.queue.shape, generator=generator), dim=-1))
        self.queue_ptr.zero_()
        self._keys = None
