"""CIFAR-10 / CIFAR-100 from torchvision, under ``path`` (downloaded when missing), resized
to the run's image size when it differs from 32.

torchvision is imported only when one is loaded: a ClientApp process pays imports per message.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedssl.common.image_cache import default_cache_dir
from fedssl.common.image_set import DataError, ImageSet


def load_torchvision(source: str, path: str, image_size: int, split: str, cache_dir: str | None) -> ImageSet:
    root = str(Path(path).expanduser()) if path else os.path.join(cache_dir or default_cache_dir(), source)
    name = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[source]
    try:
        ds = _torchvision_dataset(source, root, split == "train")
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{name} could not be downloaded to {root!r} ({reason}); without internet, use source "
            "'imagefolder' with a local folder of images instead"
        ) from exc
    images = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
    if image_size != images.shape[-1]:
        images = _resize_uint8(images, image_size)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return ImageSet(images, labels, tuple(ds.classes), 0)


def _torchvision_dataset(source: str, root: str, train: bool):
    from torchvision import datasets  # imported here: ~0.5 s that other sources need not pay

    cls = datasets.CIFAR10 if source == "cifar10" else datasets.CIFAR100
    return cls(root=root, train=train, download=True)


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 2_000) -> torch.Tensor:
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for s in range(0, images.shape[0], chunk):
        x = images[s : s + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[s : s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out
