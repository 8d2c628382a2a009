"""Which images of a folder are trained on and which are held out for evaluation.

A folder with both ``train/`` and ``test/`` subfolders has its own split. Otherwise, when the
folder is both the training folder and the evaluation folder, the evaluation's query side is a
seeded, stratified split of it (:func:`held_out_split`, ``EVAL_TEST_FRACTION`` of each class),
computed from the seed alone on every client and on the server, so the clients leave out
exactly the rows the server queries with. Folders that overlap in any other way are refused
(:func:`carved_folder`).

The validation split (run-config ``monitor = "validation"``) is carved from the training
images, after any held-out rows are gone: ``VALIDATION_FRACTION`` of each class, seeded
(:func:`validation_split`), a function of the labels and the seed alone like the held-out
split, so the server's validation queries and the clients' training images never meet
(:func:`without_validation`). Labels are read only to stratify and to score: what is
chosen on validation (a sweep's best cell) then meets the test images once, in the final row.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from fedssl.common.config import ConfigError
from fedssl.common.folders import require_folder
from fedssl.common.image_cache import load_folder
from fedssl.common.image_set import DataError, ImageSet

EVAL_TEST_FRACTION = 0.2  # held-out share of a labelled folder without train/ and test/
VALIDATION_FRACTION = 0.1  # share of the training images the validation monitor queries
# Separate RNG streams: a validation split must not repeat the held-out split's draw.
_HELD_OUT_STREAM, _VALIDATION_STREAM = 0x5E1, 0x7A1


def folder_for_split(path: str, split: str) -> Path:
    """The folder of ``split``: ``path/<split>`` when ``path`` has both ``train/`` and
    ``test/``, else ``path`` itself for ``train`` (and a DataError for ``test``)."""
    root = require_folder(path)
    if _has_split_layout(root):
        return root / split
    if split == "test":
        raise DataError(
            f"image folder {str(root)!r} has no train/ and test/ subfolders, so split 'test' does not exist; "
            "use load_eval_split for a held-out split"
        )
    return root


def held_out_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows) of a labelled folder carved for evaluation: seeded and
    stratified, ``EVAL_TEST_FRACTION`` of every class (of 2 or more images) held out.
    A function of the labels and the seed alone, so clients and server agree without talking."""
    return _stratified_split(labels, EVAL_TEST_FRACTION, seed, _HELD_OUT_STREAM)


def validation_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of the training images: seeded and stratified,
    ``VALIDATION_FRACTION`` of every class (of 2 or more images)."""
    return _stratified_split(labels, VALIDATION_FRACTION, seed, _VALIDATION_STREAM)


def without_validation(images: ImageSet, seed: int, where: str) -> ImageSet:
    """``images`` less their validation rows: what clients train on under the validation
    monitor. ``where`` names the images in the error an unlabelled set gets."""
    kept, _ = validation_split(_labels_for_validation(images, where), seed)
    return dataclasses.replace(images.subset(kept), skipped=images.skipped)


def split_validation(images: ImageSet, seed: int, where: str) -> tuple[ImageSet, ImageSet]:
    """(bank, queries) of the validation monitor: the training images less the validation
    rows, and the validation rows."""
    kept, validation = validation_split(_labels_for_validation(images, where), seed)
    if len(validation) == 0:
        raise DataError(f"the training images {where!r} are too small for a validation split "
                        f"({len(images)} images): every class needs at least 2 images")
    return dataclasses.replace(images.subset(kept), skipped=images.skipped), images.subset(validation)


def _labels_for_validation(images: ImageSet, where: str) -> np.ndarray:
    if images.labels is None:
        raise DataError(f"monitor='validation' needs labelled training images, and {where!r} is "
                        "unlabelled (no class subfolders); use monitor='test'")
    return images.labels.numpy()


def evaluation_source(source: str, path: str, eval_path: str) -> tuple[str, str]:
    """(source, path) of the labelled images the server evaluates on: ``eval_path``'s folder,
    else the training source itself. Raises ConfigError when the two folders overlap in a way
    that common.datasets.training_images cannot keep the queries out of training."""
    carved_folder(source, path, eval_path)
    return ("imagefolder", eval_path) if eval_path else (source, path)


def carved_folder(source: str, path: str, eval_path: str) -> Path | None:
    """The training folder when the evaluation's queries are a seeded split of it (a folder
    without ``train/`` and ``test/`` that is also the evaluation folder), else None.

    Raises ConfigError when the query folder and the training folder are the same folder
    without a carved split (training on a ``test/``), or one lies inside the other: the
    training images would then include queries that no seeded split can name. Folders
    missing on this machine are not compared (a deployed server need not hold the sites'
    data-path; the loaders report a missing folder where they load it).
    """
    if source != "imagefolder" or not path:
        return None
    data_root, eval_root = Path(path).expanduser(), Path(eval_path or path).expanduser()
    if not data_root.is_dir() or not eval_root.is_dir():
        return None
    training = data_root / "train" if _has_split_layout(data_root) else data_root
    carved = not _has_split_layout(eval_root)
    queries = eval_root if carved else eval_root / "test"
    trained, queried = Path(os.path.realpath(training)), Path(os.path.realpath(queries))
    if carved and trained == queried:
        return training
    if trained == queried or trained.is_relative_to(queried) or queried.is_relative_to(trained):
        raise ConfigError(
            f"data-path {path!r} and eval-path {eval_path!r} overlap: the training folder {str(trained)!r} "
            f"and the evaluation's query folder {str(queried)!r} share images; use the same folder for "
            f"both (its held-out {EVAL_TEST_FRACTION:.0%} is then left out of training), a folder with "
            "train/ and test/ subfolders as eval-path, or folders that do not contain one another"
        )
    return None


def load_folder_eval_split(path: str, image_size: int, seed: int, cache_dir: str | None) -> tuple[ImageSet, ImageSet]:
    """(bank, query) of an image folder: ``path/train`` and ``path/test`` when both exist, else
    the :func:`held_out_split` of a folder with class subfolders. Both labelled, same classes."""
    root = require_folder(path)
    if _has_split_layout(root):
        train = load_folder(root / "train", image_size, cache_dir)
        test = load_folder(root / "test", image_size, cache_dir)
        _require_labels(train, root / "train")
        _require_labels(test, root / "test")
        return train, _align_classes(test, train.classes, root / "test")

    full = load_folder(root, image_size, cache_dir)
    _require_labels(full, root)
    train_idx, test_idx = held_out_split(full.labels.numpy(), seed)
    if len(test_idx) == 0:
        raise DataError(
            f"image folder {str(root)!r} is too small for a held-out split "
            f"({len(full)} images in {len(full.classes)} classes): every class needs at least 2 images"
        )
    # loading problems are reported once, on the bank
    return dataclasses.replace(full.subset(train_idx), skipped=full.skipped), full.subset(test_idx)


def _has_split_layout(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _require_labels(images: ImageSet, folder: Path) -> None:
    if images.labels is None:
        raise DataError(
            f"image folder {str(folder)!r} is unlabelled: evaluation needs every image inside a class "
            "subfolder (FOLDER/<class>/<image>)"
        )


def _align_classes(test: ImageSet, train_classes: tuple[str, ...], folder: Path) -> ImageSet:
    if test.classes == train_classes:
        return test
    extra = [c for c in test.classes if c not in train_classes]
    if extra:
        raise DataError(
            f"image folder {str(folder)!r} has classes not in train/: {', '.join(extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}; test classes must be a subset of train classes"
        )
    mapping = torch.tensor([train_classes.index(c) for c in test.classes], dtype=torch.int64)
    return ImageSet(test.images, mapping[test.labels], train_classes, test.skipped)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int,
                      stream: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, stream])
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        n_test = min(max(n_test, 1), len(idx) - 1) if len(idx) >= 2 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
