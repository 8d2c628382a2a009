"""Image sources, decoded once into a uint8 tensor cache: the entry point callers load from.

Every source yields an :class:`ImageSet` (common/image_set.py): ``images`` uint8 ``[N, 3, S, S]``
(contiguous), ``labels`` int64 ``[N]`` or ``None`` for an unlabelled folder, ``classes`` and
``skipped``. Augmentation works on these tensors in batches, so nothing here is per-sample at
training time.

Sources (``SOURCES``):

* ``synthetic`` - the embedded default (rendered by common/synthetic.py): 10 shape/texture classes with
  random grey levels, position, scale and rotation, so class identity is *shape*, never colour.
  No files, no download, deterministic by seed; generated vectorised with torch.
* ``imagefolder`` - any folder of images (recursive, common/folders.py), decoded once, then read
  back from the image cache (common/image_cache.py).
* ``cifar10`` / ``cifar100`` - torchvision datasets under ``path`` (common/torchvision_sources.py).

Held-out images are never trained on. The server evaluates on ``(bank, query)`` from
:func:`load_eval_split`; the query side (also the linear probe's test set) is other images
than the training split whenever the source has one of its own (``synthetic``'s test split is
a separate render; cifar's test files; a folder's ``test/``). When an image folder without
``train/`` and ``test/`` is both the training folder and the evaluation folder, the query side
is a seeded split of the training images (common/eval_split.py), so :func:`training_images`
leaves it out. The bank may be the training images, as in standard SSL evaluation, where the
kNN bank is the training set.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from fedssl.common.eval_split import (carved_folder, folder_for_split, held_out_split, load_folder_eval_split,
                               without_validation)
from fedssl.common.image_cache import load_folder
from fedssl.common.image_set import DataError, ImageSet
from fedssl.common.synthetic import SYNTHETIC_CLASSES, render_synthetic
from fedssl.common.torchvision_sources import load_torchvision

logger = logging.getLogger("fedssl")

SOURCES = ("synthetic", "imagefolder", "cifar10", "cifar100")
SPLITS = ("train", "test")

SYNTHETIC_TRAIN_SIZE = 10_000
SYNTHETIC_TEST_SIZE = 2_000

MIN_IMAGE_SIZE = 8


def load_images(
    source: str,
    path: str,
    image_size: int,
    *,
    split: str = "train",
    seed: int = 0,
    cache_dir: str | None = None,
) -> ImageSet:
    """Load one split of ``source`` as uint8 ``[N, 3, image_size, image_size]``.

    ``imagefolder``: when ``path`` has both ``train/`` and ``test/`` subfolders, ``split``
    picks one; otherwise ``split="train"`` is the whole folder and ``"test"`` is an error
    (use :func:`load_eval_split` for a held-out part). ``seed`` only affects ``synthetic``.
    """
    _check_common(source, image_size, split)
    if source == "synthetic":
        return _load_synthetic(split, image_size, seed)
    if source == "imagefolder":
        return load_folder(folder_for_split(path, split), image_size, cache_dir)
    return load_torchvision(source, path, image_size, split, cache_dir)


def training_images(
    source: str, path: str, image_size: int, max_images: int, seed: int, *, eval_path: str = "",
    validation: bool = False,
) -> ImageSet:
    """The images a simulation shares out to its clients, or the centralized baseline pools:
    the ``train`` split less the evaluation's held-out images, cut to a seeded ``max_images``
    subset when that is not 0.

    ``eval_path`` is the run's eval-path ('' = the server evaluates on this source). When the
    evaluation's queries are a seeded split of these very images (``carved_folder``), the
    rows ``held_out_split`` holds out for seed ``seed`` are removed: the server computes
    the same rows from the same seed, so no query or probe-test image is trained on. An
    unlabelled folder has no such split (the evaluation refuses it), so it is kept whole.
    ``validation`` (run-config ``monitor = "validation"``): the validation rows, carved from
    what remains (common.eval_split.validation_split), are removed as well.

    A folder's images are read from the image cache a batch at a time (ImageSet.read_on_demand):
    every process that trains on them, or only counts them, holds none of their pixels.
    """
    images = load_images(source, path, image_size, seed=seed).read_on_demand()
    if carved_folder(source, path, eval_path) is not None and images.labels is not None:
        kept_rows, held_rows = held_out_split(images.labels.numpy(), seed)
        logger.info("%d of the %d images in %s are held out for evaluation, never trained on",
                    len(held_rows), len(images), path)
        images = dataclasses.replace(images.subset(kept_rows), skipped=images.skipped)
    if validation:
        images = without_validation(images, seed, path or source)
    return images.sample(max_images, seed)


def load_eval_split(
    source: str,
    path: str,
    image_size: int,
    *,
    seed: int = 0,
    cache_dir: str | None = None,
) -> tuple[ImageSet, ImageSet]:
    """(kNN bank / probe train, query / probe test), both labelled, same ``classes``.

    ``imagefolder``: ``path/train`` and ``path/test`` when both exist, else a seeded,
    stratified split (``held_out_split``, ``EVAL_TEST_FRACTION`` held out) of a folder
    with class subfolders. The query side is never trained on (:func:`training_images` leaves
    a carved one out); the bank may be training images, as in standard SSL evaluation.
    """
    _check_common(source, image_size, "train")
    if source == "imagefolder":
        return load_folder_eval_split(path, image_size, seed, cache_dir)
    train = load_images(source, path, image_size, split="train", seed=seed, cache_dir=cache_dir)
    test = load_images(source, path, image_size, split="test", seed=seed, cache_dir=cache_dir)
    return train, test


def _check_common(source: str, image_size: int, split: str) -> None:
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise DataError(f"image size {image_size!r} is not allowed; use an integer >= {MIN_IMAGE_SIZE}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def _derived_seed(seed: int, *stream: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *stream]).generate_state(1, np.uint64)[0] >> 1)


def _load_synthetic(split: str, image_size: int, seed: int) -> ImageSet:
    n = SYNTHETIC_TRAIN_SIZE if split == "train" else SYNTHETIC_TEST_SIZE
    gen = torch.Generator().manual_seed(_derived_seed(seed, SPLITS.index(split), 0x5A7))
    k = len(SYNTHETIC_CLASSES)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    images = render_synthetic(labels, image_size, gen)
    return ImageSet(images, labels.to(torch.int64), SYNTHETIC_CLASSES, 0)
