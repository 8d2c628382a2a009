"""Backbones that map images to a feature vector, built from torchvision so an exported
encoder loads into plain torchvision after the same two-line stem change."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, ResNet


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
}


def build_encoder(name: str, image_size: int) -> tuple[nn.Module, int]:
    """Return (encoder, feature dimension); the encoder outputs [B, feature_dim]."""
    if name not in ENCODERS:
        raise ValueError(f"encoder={name!r} is not known; allowed: {', '.join(ENCODERS)}")
    encoder, dim = ENCODERS[name](image_size)
    return encoder.to(memory_format=torch.channels_last), dim
