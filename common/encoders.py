"""Backbones that map images to a feature vector, built from torchvision so an exported
encoder loads into plain torchvision after the same stem change (`describe_encoder` says
which, `torchvision_recipe` writes the code)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from fedssl.common.vit import describe_vit, vit_recipe, vit_tiny


def resnet18(image_size: int) -> tuple[nn.Module, int]:
    """ResNet-18; for small inputs the CIFAR stem (3x3 stride-1 conv1, no max-pool),
    without which a 32x32 image is 1x1 by the last stage."""
    net = models.resnet18()
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


def resnet10(image_size: int) -> tuple[nn.Module, int]:
    """The compact encoder for CPU-only and edge clients: torchvision's ResNet with one
    BasicBlock per stage. For small inputs the stem is a 3x3 stride-2 conv without max-pool
    (16x16 after the stem at 32x32: a quarter of the CIFAR stem's cost, and on 2 cores as
    fast as mobilenet_v3_small while its kNN accuracy rises from the first epoch, where
    mobilenet's first falls; docs/results.md)."""
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


def mobilenet_v3_small(image_size: int) -> tuple[nn.Module, int]:
    """A mobile encoder (about 4x ResNet-18's throughput per core here). For small inputs the stem keeps full resolution, as ResNet's CIFAR stem
    does; only a stride changes, so the weights keep torchvision's names and shapes."""
    net = models.mobilenet_v3_small()
    if image_size <= 64:
        net.features[0][0].stride = (1, 1)
    net.classifier = nn.Identity()
    # torchvision sets BatchNorm momentum 0.01 for long ImageNet schedules; over a few short
    # local epochs the running statistics would stay near their initial values and the
    # encoder would look collapsed in eval mode. 0.1 is PyTorch's default.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    # Its depthwise convolutions run about 2x slower under bf16 autocast on a CPU, where
    # resnets run 1.8-2.7x faster (benchmarks/encoder_choice.py speed): fp32 there.
    net.cpu_bf16 = False
    return net, 576


ENCODERS: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "resnet18": resnet18,
    "resnet10": resnet10,
    "mobilenet_v3_small": mobilenet_v3_small,
    "vit_tiny": vit_tiny,
}


def build_encoder(name: str, image_size: int) -> tuple[nn.Module, int]:
    """Return (encoder, feature dimension); the encoder outputs [B, feature_dim]."""
    if name not in ENCODERS:
        raise ValueError(f"encoder={name!r} is not known; allowed: {', '.join(ENCODERS)}")
    encoder, dim = ENCODERS[name](image_size)
    return encoder.to(memory_format=torch.channels_last), dim


def describe_encoder(name: str, image_size: int) -> dict[str, Any]:
    """What plain torchvision needs to rebuild encoder `name` at `image_size` (an export's
    config.json): its torchvision builder, the stem as built here and the classifier replaced
    by Identity, read off the built network so it cannot drift from the builders above."""
    if name not in ENCODERS:
        raise ValueError(f"encoder={name!r} is not known; allowed: {', '.join(ENCODERS)}")
    net, dim = ENCODERS[name](image_size)
    if isinstance(net, VisionTransformer):
        return describe_vit(net, dim)
    if isinstance(net, ResNet):
        conv = net.conv1
        return {"torchvision_builder": "torchvision.models.resnet.ResNet",
                "block": type(net.layer1[0]).__name__,
                "blocks_per_stage": [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)],
                "stem": {"conv1": {"kernel_size": conv.kernel_size[0], "stride": conv.stride[0],
                                   "padding": conv.padding[0]},
                         "maxpool": not isinstance(net.maxpool, nn.Identity)},
                "replaced_by_identity": ["fc"], "num_features": dim}
    first = net.features[0][0]
    return {"torchvision_builder": "torchvision.models.mobilenet_v3_small",
            "stem": {"features.0.0": {"stride": first.stride[0]}},
            "replaced_by_identity": ["classifier"], "num_features": dim}


_RESNET_RECIPE = """import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchvision.models.resnet import {block}, ResNet

folder = Path("{folder}")
config = json.loads((folder / "config.json").read_text())
net = ResNet({block}, config["blocks_per_stage"])  # {blocks}: {name}
stem = config["stem"]  # {stem}
net.conv1 = torch.nn.Conv2d(3, 64, bias=False, **stem["conv1"])
if not stem["maxpool"]:
    net.maxpool = torch.nn.Identity()
net.fc = torch.nn.Identity()  # pooled features, not ImageNet logits
net.load_state_dict(load_file(folder / "model.safetensors"))
net.eval()
"""

_MOBILENET_RECIPE = """import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchvision.models import mobilenet_v3_small

folder = Path("{folder}")
config = json.loads((folder / "config.json").read_text())
net = mobilenet_v3_small()
stride = config["stem"]["features.0.0"]["stride"]  # {stride}
net.features[0][0].stride = (stride, stride)
net.classifier = torch.nn.Identity()  # pooled features, not ImageNet logits
net.load_state_dict(load_file(folder / "model.safetensors"))
net.eval()
"""


def torchvision_recipe(name: str, image_size: int, folder: str) -> str:
    """Python that rebuilds the encoder exported in `folder` with plain torchvision +
    safetensors, reading its stem from config.json (the export's model card shows it)."""
    about = describe_encoder(name, image_size)
    if "vit" in about:
        return vit_recipe(about, name, folder)
    stem = about["stem"]
    if "blocks_per_stage" in about:
        conv = stem["conv1"]
        text = (f"conv1 {conv['kernel_size']}x{conv['kernel_size']} stride {conv['stride']}, "
                f"{'a' if stem['maxpool'] else 'no'} max-pool")
        return _RESNET_RECIPE.format(folder=folder, block=about["block"], name=name, stem=text,
                                     blocks=about["blocks_per_stage"])
    return _MOBILENET_RECIPE.format(folder=folder, stride=f"{stem['features.0.0']['stride']} here")
