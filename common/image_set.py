"""What every image source yields (:class:`ImageSet`) and the error every one raises (:class:`DataError`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """One-line, user-facing: names the path/key/value and what is allowed."""


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, S, S], contiguous
    labels: torch.Tensor | None  # int64 [N]; None for an unlabelled folder
    classes: tuple[str, ...]  # class names (empty when unlabelled)
    skipped: int = 0  # files found but not usable (count)

    def __post_init__(self) -> None:
        im = self.images
        if im.dtype != torch.uint8 or im.ndim != 4 or im.shape[1] != 3 or im.shape[2] != im.shape[3]:
            raise ValueError(f"ImageSet.images must be uint8 [N, 3, S, S], got {im.dtype} {tuple(im.shape)}")
        if not im.is_contiguous():
            object.__setattr__(self, "images", im.contiguous())
        if self.labels is not None:
            lb = self.labels
            if lb.dtype != torch.int64 or lb.shape != (im.shape[0],):
                raise ValueError(f"ImageSet.labels must be int64 [{im.shape[0]}], got {lb.dtype} {tuple(lb.shape)}")
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices) -> "ImageSet":
        """Rows ``indices`` (ints or a boolean mask); ``skipped`` describes loading, so a subset has 0."""
        idx = torch.as_tensor(np.asarray(indices))
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.long).flatten()
        labels = None if self.labels is None else self.labels[idx].contiguous()
        return ImageSet(self.images[idx].contiguous(), labels, self.classes, 0)

    def sample(self, limit: int, seed: int) -> "ImageSet":
        """At most ``limit`` rows, drawn at random by ``seed`` and kept in their order;
        ``limit`` 0 means all."""
        if limit <= 0 or len(self) <= limit:
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[:limit].sort().values)
