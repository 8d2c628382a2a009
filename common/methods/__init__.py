"""The SSL methods. Adding one is a module here plus an entry in METHODS."""
from __future__ import annotations

from fedssl.common.config import RunConfig
from fedssl.common.encoders import build_encoder
from fedssl.common.methods.barlowtwins import BarlowTwins
from fedssl.common.methods.base import HeadSizes, SSLMethod
from fedssl.common.methods.byol import BYOL
from fedssl.common.methods.dino import DINO
from fedssl.common.methods.mae import MAE
from fedssl.common.methods.mocov2 import MoCoV2
from fedssl.common.methods.simclr import SimCLR
from fedssl.common.methods.simsiam import SimSiam
from fedssl.common.methods.swav import SwAV
from fedssl.common.methods.vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {"byol": BYOL, "simsiam": SimSiam, "simclr": SimCLR, "mocov2": MoCoV2}
METHODS["vicreg"] = VICReg
METHODS["barlowtwins"] = BarlowTwins
METHODS["dino"] = DINO
METHODS["swav"] = SwAV
METHODS["mae"] = MAE


def method_type(name: str) -> type[SSLMethod]:
    """The method class registered under `name`, for what it declares (its augmentation)."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not known; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def encoder_line(cfg: RunConfig) -> str:
    """The run's encoder as its log names it, saying when the method picked it."""
    if cfg.encoder == "auto":
        return f"{cfg.resolved_encoder} encoder ({cfg.method}'s own: encoder=auto)"
    return f"{cfg.resolved_encoder} encoder"


def build_method(cfg: RunConfig) -> SSLMethod:
    """The method named by a RunConfig, with its encoder and heads, seeded by cfg.seed so
    every process builds the same initial weights."""
    import torch

    kind = method_type(cfg.method)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        encoder, dim = build_encoder(cfg.resolved_encoder, cfg.image_size)
        heads = HeadSizes(proj_dim=cfg.proj_dim, hidden_dim=cfg.hidden_dim)
        return kind.from_config(encoder, dim, heads, cfg)
