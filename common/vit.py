"""A small Vision Transformer for 32-96 px images: torchvision's own `VisionTransformer`, so an
exported encoder's state_dict has torchvision's names and loads into a plain torchvision
`VisionTransformer` built with the same arguments (`describe_vit` writes them to config.json,
`VIT_RECIPE` is the code).

`vit_tiny`: DeiT-Tiny's width (192, 3 heads of 64, MLP 768) and depth (12 blocks) with 4 px
patches, as solo-learn's CIFAR MAE setting patches 32 px (scripts/pretrain/cifar/mae.yaml):
8x8 = 64 patches at 32 px, 24x24 at 96 px. The position embedding is the fixed 2-D sine-cosine one of MAE and
MoCo v3 (He et al. 2022, Chen et al. 2021), kept out of training: small images and short runs
give a learned one little to learn positions from.

Cost, measured side by side on 2 shared CPU cores (32 px, batch 64, fp32, a training step
with its augmentation, the setups interleaved step by step; rough, the cores were loaded):
MAE on vit_tiny runs about 1.4x BYOL-on-resnet10's images/s (one view, a quarter of the
patches through the encoder), BYOL on vit_tiny about 0.2x (two views of all 65 tokens).

The feature (what kNN, probe, collapse monitor and export read) is torchvision's own: the class
token after the final LayerNorm, with the classifier head replaced by Identity. So plain
torchvision's forward gives the evaluated feature with no code of ours; a mean of the patch
tokens would need a forward of our own after export. The class token is also what MAE's own
linear probing reads (main_linprobe.py: global_pool off unless asked); MAE trains it through
its decoder, which attends to it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

PATCH = 4
WIDTH = 192
DEPTH = 12
HEADS = 3
MLP = 768

POOLED_FEATURE = "the class token after the final LayerNorm (torchvision's VisionTransformer forward)"


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """[1, 1 + grid*grid, dim]: a zero row for the class token, then for each patch (row-major)
    sines and cosines of its column (first half of `dim`) and row (second half) at geometric
    frequencies 1 / 10000^(k / (dim/4)), as in MAE."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(position: torch.Tensor) -> torch.Tensor:
        angles = position.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    patches = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches]).float().unsqueeze(0)


def vit_tiny(image_size: int) -> tuple[nn.Module, int]:
    """torchvision's VisionTransformer at ViT-Tiny's width and depth, 4 px patches, fixed
    sine-cosine positions, head replaced by Identity: [B, 3, S, S] -> [B, 192]."""
    if image_size % PATCH:
        raise ValueError(f"image-size={image_size} is invalid for encoder='vit_tiny': must be a "
                         f"multiple of its {PATCH} px patch")
    net = VisionTransformer(image_size=image_size, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS,
                            hidden_dim=WIDTH, mlp_dim=MLP)
    net.heads = nn.Identity()
    with torch.no_grad():
        net.encoder.pos_embedding.copy_(sincos_position_embedding(image_size // PATCH, WIDTH))
    net.encoder.pos_embedding.requires_grad_(False)
    return net, WIDTH


def patch_embeddings(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """[B, N, D]: each patch projected and its position added (no class token yet)."""
    tokens = vit.conv_proj(images).flatten(2).transpose(1, 2)
    return tokens + vit.encoder.pos_embedding[:, 1:]


def encode_visible(vit: VisionTransformer, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, 1 + K, D]: the class token and the patches at `keep` ([B, K] indices into the N
    patches) through the transformer, exactly as torchvision's forward treats the whole
    sequence (which it is when `keep` holds every patch)."""
    tokens = patch_embeddings(vit, images)
    visible = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    cls = (vit.class_token + vit.encoder.pos_embedding[:, :1]).expand(len(images), -1, -1)
    x = torch.cat([cls, visible], dim=1)
    return vit.encoder.ln(vit.encoder.layers(vit.encoder.dropout(x)))


def describe_vit(net: VisionTransformer, dim: int) -> dict[str, Any]:
    """config.json's rebuild section: VisionTransformer's own arguments, read off the net."""
    return {"torchvision_builder": "torchvision.models.vision_transformer.VisionTransformer",
            "vit": {"image_size": net.image_size, "patch_size": net.patch_size,
                    "num_layers": len(net.encoder.layers), "num_heads": net.encoder.layers[0].num_heads,
                    "hidden_dim": net.hidden_dim, "mlp_dim": net.mlp_dim},
            "pooled_feature": POOLED_FEATURE, "replaced_by_identity": ["heads"], "num_features": dim}


VIT_RECIPE = """import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchvision.models.vision_transformer import VisionTransformer

folder = Path("{folder}")
config = json.loads((folder / "config.json").read_text())
net = VisionTransformer(**config["vit"])  # {name}: {text}
net.heads = torch.nn.Identity()  # the class token's features, not ImageNet logits
net.load_state_dict(load_file(folder / "model.safetensors"))
net.eval()
"""


def vit_recipe(about: dict[str, Any], name: str, folder: str) -> str:
    vit = about["vit"]
    text = (f"{vit['patch_size']} px patches, {vit['num_layers']} blocks, width {vit['hidden_dim']}, "
            f"{vit['image_size']} px input")
    return VIT_RECIPE.format(folder=folder, name=name, text=text)
