"""The decoded-image cache: an image folder is decoded once per image size, then read back as
one ``.npz`` under ``$FEDSSL_CACHE_DIR`` (default ``~/.cache/fedssl``). An entry is keyed by
the folder's real path, the size and every file's (path, size, mtime), so a changed file
invalidates it; writing a new entry drops the stale ones of the same folder and size."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.folders import MAX_SKIPPED_LOGGED, decode_folder, log_skipped, require_images
from common.image_set import DataError, ImageSet

logger = logging.getLogger("fedssl")

CACHE_FORMAT = 1  # bump when decoding changes, to invalidate old caches


def default_cache_dir() -> str:
    return os.environ.get("FEDSSL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedssl")


def load_folder(folder: Path, image_size: int, cache_dir: str | None) -> ImageSet:
    """Every image below ``folder``, from the cache when it holds the folder as it is now,
    else decoded and cached (``cache_dir`` None: :func:`default_cache_dir`)."""
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist")
    real = os.path.realpath(folder)
    files = require_images(folder)

    cache_root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    folder_key = hashlib.sha256(f"{CACHE_FORMAT}\0{real}\0{image_size}".encode()).hexdigest()[:16]
    content = hashlib.sha256(folder_key.encode())
    for rel, size, mtime in files:
        content.update(f"{rel}\0{size}\0{mtime}\n".encode())
    cache_file = cache_root / f"imagefolder-{image_size}px-{folder_key}-{content.hexdigest()[:16]}.npz"

    cached = _read_cache(cache_file, image_size)
    if cached is not None:
        images, skipped_paths = cached
        log_skipped(folder, images.skipped, skipped_paths)
        logger.debug("loaded %d images of %s from cache %s", len(images), folder, cache_file)
        return images

    t0 = time.perf_counter()
    images, skipped_paths = decode_folder(folder, files, image_size)
    logger.info("decoded %d images from %s in %.1f s", len(images), folder, time.perf_counter() - t0)
    log_skipped(folder, images.skipped, skipped_paths)
    _write_cache(cache_file, images, skipped_paths)
    return images


def _read_cache(cache_file: Path, image_size: int) -> tuple[ImageSet, list[str]] | None:
    if not cache_file.is_file():
        return None
    try:
        with open(cache_file, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            images = z["images"]
            labels = z["labels"] if bool(z["labelled"]) else None
            classes = tuple(str(c) for c in z["classes"])
            skipped = int(z["skipped"])
            skipped_paths = [str(p) for p in z["skipped_paths"]]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, image_size, image_size):
            raise ValueError(f"unexpected cached array {images.dtype} {images.shape}")
        result = ImageSet(
            torch.from_numpy(images),
            None if labels is None else torch.from_numpy(labels.astype(np.int64)),
            classes,
            skipped,
        )
        return result, skipped_paths
    except Exception as exc:
        logger.warning("ignoring unreadable image cache %s (%s); decoding again", cache_file, exc)
        return None


def _write_cache(cache_file: Path, images: ImageSet, skipped_paths: list[str]) -> None:
    tmp_name = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=cache_file.stem + ".", suffix=".tmp", dir=cache_file.parent)
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                images=images.images.numpy(),
                labels=images.labels.numpy() if images.labels is not None else np.zeros(0, np.int64),
                labelled=np.array(images.labels is not None),
                classes=np.array(images.classes, dtype=np.str_),
                skipped=np.array(images.skipped, dtype=np.int64),
                skipped_paths=np.array(skipped_paths[:MAX_SKIPPED_LOGGED], dtype=np.str_),
            )
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a cache of decoded images need not be
        os.replace(tmp_name, cache_file)
        tmp_name = None
    except OSError as exc:
        logger.warning("could not write image cache in %s (%s); continuing without cache", cache_file.parent, exc)
        return
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    # Drop stale caches of the same folder and size (files changed since they were written).
    prefix = cache_file.name.rsplit("-", 1)[0] + "-"
    for old in cache_file.parent.glob(prefix + "*.npz"):
        if old.name != cache_file.name:
            try:
                old.unlink()
            except OSError:
                pass
