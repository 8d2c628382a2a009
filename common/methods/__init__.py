"""The SSL methods. Adding one is a module here plus a line in METHODS."""
from __future__ import annotations

from typing import Callable

from common.encoders import build_encoder
from common.methods.base import HeadSizes, SSLMethod
from common.methods.byol import BYOL
from common.methods.mocov2 import MoCoV2
from common.methods.simclr import SimCLR
from common.methods.simsiam import SimSiam

METHODS: dict[str, Callable[..., SSLMethod]] = {
    "byol": lambda enc, dim, heads, cfg: BYOL(enc, dim, heads, base_tau=cfg.byol_tau),
    "simsiam": lambda enc, dim, heads, cfg: SimSiam(enc, dim, heads),
    "simclr": lambda enc, dim, heads, cfg: SimCLR(enc, dim, heads, temperature=cfg.simclr_temperature),
    "mocov2": lambda enc, dim, heads, cfg: MoCoV2(enc, dim, heads, temperature=cfg.moco_temperature,
                                                  queue_size=cfg.moco_queue_size, tau=cfg.moco_tau),
}


# Every RunConfig field build_method reads: the client caches the built method by them.
MODEL_FIELDS = ("method", "encoder", "image_size", "proj_dim", "hidden_dim", "byol_tau",
                "simclr_temperature", "moco_temperature", "moco_queue_size", "moco_tau", "seed")


def build_method(cfg) -> SSLMethod:
    """The method named by a RunConfig, with its encoder and heads, seeded by cfg.seed so
    every process builds the same initial weights."""
    import torch

    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r} is not known; allowed: {', '.join(METHODS)}")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        encoder, dim = build_encoder(cfg.encoder, cfg.image_size)
        heads = HeadSizes(proj_dim=cfg.proj_dim, hidden_dim=cfg.hidden_dim)
        return METHODS[cfg.method](encoder, dim, heads, cfg)
