"""Image files in a folder: listed (recursive) and decoded to uint8 ``[N, 3, S, S]``.

Any size or mode is resized so the shorter side is S and centre-cropped. Class = first-level
subfolder when every image lies in one. Decoded with a small thread pool; unreadable files are
skipped, counted and logged, never fatal. The cache of decoded folders is common/image_cache.py.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from fedssl.common.image_set import DataError, ImageSet

logger = logging.getLogger("fedssl")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DECODE_THREADS = 2
MAX_SKIPPED_LOGGED = 10  # warning lines for unreadable files; the rest is one summary line


def load_folder_with_paths(path: str, image_size: int) -> tuple[ImageSet, list[str]]:
    """Every image below ``path`` (recursive), decoded without the cache, and each one's path
    relative to ``path`` in the same order; unreadable files are skipped and logged."""
    root = require_folder(path)
    files = require_images(root)
    images, skipped_paths = decode_folder(root, files, image_size)
    log_skipped(root, images.skipped, skipped_paths)
    skipped = set(skipped_paths)
    return images, [rel for rel, _, _ in files if rel not in skipped]


def require_folder(path: str) -> Path:
    if not path:
        raise DataError("imagefolder needs a data path (a folder of images); got an empty path")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} is not a folder")
    return root


def require_images(folder: Path) -> list[tuple[str, int, int]]:
    """:func:`_list_images` of ``folder``; raises DataError when it holds none."""
    files = _list_images(folder)
    if not files:
        raise DataError(
            f"no images in folder {str(folder)!r} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _list_images(root: Path) -> list[tuple[str, int, int]]:
    """Sorted (relative posix path, size, mtime_ns) of image files below ``root``.

    Recursive; follows directory symlinks (each real directory once); ignores hidden files and
    folders (names starting with '.', e.g. macOS '._x.jpg'). A broken link gets size/mtime -1.
    """
    found: list[tuple[str, int, int]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            dirnames[:] = []
            continue
        if key in seen:
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            try:
                st = os.stat(full)
                found.append((rel, st.st_size, st.st_mtime_ns))
            except OSError:
                found.append((rel, -1, -1))
    found.sort()
    return found


def _decode_image(path: str, size: int) -> np.ndarray:
    """Decode one file -> uint8 ``[size, size, 3]``: EXIF-oriented, RGB, shorter side to
    ``size``, centre crop. Raises on anything unreadable."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))  # DCT-domain downscale, still >= size on both sides
        ImageOps.exif_transpose(im, in_place=True)
        rgb = _to_rgb(im)
        w, h = rgb.size
        if (w, h) != (size, size):
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
        arr = np.asarray(rgb, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise ValueError(f"decoded to shape {arr.shape}")
    return arr


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        im.load()
        return im
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float greyscale
        a = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "F":
            a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        elif a.size and a.max() > 255:
            a = a / 257.0 if a.max() <= 65535 else a * (255.0 / a.max())
        a = np.nan_to_num(a, nan=0.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")  # transparent pixels over white, as viewers show them
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


DECODE_CHUNK = 256  # images a decode task handles; a few chunks are in flight at once


def folder_classes(rels: list[str]) -> tuple[tuple[str, ...], np.ndarray | None]:
    """(class names, each file's class index) when every file lies in a first-level subfolder,
    else ((), None): an unlabelled folder."""
    if not all("/" in rel for rel in rels):
        return (), None
    names = [rel.split("/", 1)[0] for rel in rels]
    classes = tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[n] for n in names], dtype=np.int64)


def decode_chunks(folder: Path, rels: list[str], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 [k, 3, size, size], readable [k]) for consecutive chunks of ``rels``, in order.
    A small thread pool decodes ahead, but never more than a few chunks, so a caller that
    writes each chunk away (the image cache) holds a few chunks, not the folder."""
    base = str(folder)

    def work(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        start, stop = bounds
        out = np.empty((stop - start, 3, size, size), dtype=np.uint8)
        ok = np.zeros(stop - start, dtype=bool)
        for i in range(start, stop):
            try:
                out[i - start] = _decode_image(os.path.join(base, rels[i]), size).transpose(2, 0, 1)
                ok[i - start] = True
            except Exception:  # unreadable for any reason: counted and logged, never fatal
                pass
        return out, ok

    bounds = [(s, min(s + DECODE_CHUNK, len(rels))) for s in range(0, len(rels), DECODE_CHUNK)]
    with ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="fedssl-decode") as pool:
        pending = deque(pool.submit(work, b) for b in bounds[:DECODE_THREADS + 1])
        for b in bounds[DECODE_THREADS + 1:]:
            done = pending.popleft().result()
            pending.append(pool.submit(work, b))
            yield done
        while pending:
            yield pending.popleft().result()


def require_decoded(folder: Path, rels: list[str], ok: np.ndarray) -> list[str]:
    """The relative paths of the files that failed to decode; DataError when all did."""
    skipped_paths = [rels[i] for i in np.flatnonzero(~ok)]
    if not ok.any():
        raise DataError(
            f"no usable image in folder {str(folder)!r}: all {len(rels)} image files failed to decode "
            f"(e.g. {skipped_paths[0]!r})"
        )
    return skipped_paths


def decode_folder(folder: Path, files: list[tuple[str, int, int]], size: int) -> tuple[ImageSet, list[str]]:
    """The readable ``files`` of ``folder`` decoded into memory, and the relative paths of those
    skipped; raises DataError when none is readable."""
    rels = [rel for rel, _, _ in files]
    out = np.empty((len(rels), 3, size, size), dtype=np.uint8)
    ok = np.zeros(len(rels), dtype=bool)
    at = 0
    for chunk, chunk_ok in decode_chunks(folder, rels, size):
        out[at:at + len(chunk)] = chunk
        ok[at:at + len(chunk)] = chunk_ok
        at += len(chunk)
    skipped_paths = require_decoded(folder, rels, ok)
    if not ok.all():
        out = out[ok]
    classes, labels = folder_classes(rels)
    images = ImageSet(torch.from_numpy(np.ascontiguousarray(out)),
                      None if labels is None else torch.from_numpy(labels[ok]), classes, int((~ok).sum()))
    return images, skipped_paths


def log_skipped(folder: Path, skipped: int, paths: list[str]) -> None:
    if not skipped:
        return
    for rel in paths[:MAX_SKIPPED_LOGGED]:
        logger.warning("skipped unreadable image %s", os.path.join(str(folder), rel))
    if skipped > MAX_SKIPPED_LOGGED:
        logger.warning("skipped %d unreadable images in %s in total", skipped, folder)
