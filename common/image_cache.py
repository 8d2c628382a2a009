"""The decoded-image cache: an image folder is decoded once per image size into an ``.npy``
under ``$FEDSSL_CACHE_DIR`` (default ``~/.cache/fedssl``), with a small ``.json`` beside it
(labels, classes, skipped files). Every process then shares it through the page cache: the
set's ``images`` is a copy-on-write memory mapping of the file, and its ``cached``
:class:`ImageRows` reads batches from it (what training and subsets use), so no process holds
a private copy of the folder's pixels.

An entry is keyed by the folder's real path, the size and every file's (path, size, mtime),
so a changed file invalidates it; writing a new entry drops the stale ones of the same folder
and size. Both files are written to a temporary name and renamed into place, the ``.json``
last: an entry without its ``.json`` is incomplete and decoded again. A file of an entry is
never changed in place (a mapping of a file that shrinks would fault), only replaced or
removed, which leaves open readers their old copy. Caches of the earlier one-file ``.npz``
format are not read: the folder is decoded again once, and the new entry removes them."""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedssl.common.folders import (MAX_SKIPPED_LOGGED, decode_chunks, decode_folder, folder_classes, log_skipped,
                            require_decoded, require_images)
from fedssl.common.image_set import DataError, ImageRows, ImageSet, OpenFile

logger = logging.getLogger("fedssl")

CACHE_FORMAT = 1  # bump when decoding changes, to invalidate old caches
_ENTRY_SUFFIXES = (".npy", ".json", ".npz")  # .npz: the earlier format, removed as stale


def default_cache_dir() -> str:
    return os.environ.get("FEDSSL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedssl")


def load_folder(folder: Path, image_size: int, cache_dir: str | None) -> ImageSet:
    """Every image below ``folder``, from the cache when it holds the folder as it is now,
    else decoded into the cache (``cache_dir`` None: :func:`default_cache_dir`); decoded into
    memory only when the cache cannot be written."""
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist")
    real = os.path.realpath(folder)
    files = require_images(folder)

    cache_root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    folder_key = hashlib.sha256(f"{CACHE_FORMAT}\0{real}\0{image_size}".encode()).hexdigest()[:16]
    content = hashlib.sha256(folder_key.encode())
    for rel, size, mtime in files:
        content.update(f"{rel}\0{size}\0{mtime}\n".encode())
    entry = cache_root / f"imagefolder-{image_size}px-{folder_key}-{content.hexdigest()[:16]}"

    cached = _read_entry(entry, image_size)
    if cached is not None:
        images, skipped_paths = cached
        log_skipped(folder, images.skipped, skipped_paths)
        logger.debug("loaded %d images of %s from cache %s.npy", len(images), folder, entry)
        return images

    t0 = time.perf_counter()
    if _write_entry(entry, folder, files, image_size):
        cached = _read_entry(entry, image_size)
    if cached is None:  # not writable (warned), or removed at once by another writer
        images, skipped_paths = decode_folder(folder, files, image_size)
    else:
        images, skipped_paths = cached
    logger.info("decoded %d images from %s in %.1f s", len(images), folder, time.perf_counter() - t0)
    log_skipped(folder, images.skipped, skipped_paths)
    return images


def _read_entry(entry: Path, image_size: int) -> tuple[ImageSet, list[str]] | None:
    npy, sidecar = entry.with_suffix(".npy"), entry.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        count = int(meta["images"])
        file = OpenFile(os.open(npy, os.O_RDONLY), str(npy))
        with os.fdopen(os.dup(file.fd), "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version} is not one this cache writes")
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        expected = (count, 3, image_size, image_size)
        if dtype != np.uint8 or fortran or shape != expected:
            raise ValueError(f"it holds {dtype} {shape}, not uint8 {expected}")
        if os.fstat(file.fd).st_size != offset + int(np.prod(shape)):
            raise ValueError("its size does not match its shape (cut short?)")
        classes = tuple(str(c) for c in meta["classes"])
        labels = meta["labels"]
        if labels is not None:
            labels = torch.tensor(labels, dtype=torch.int64)
            if labels.shape != (count,) or not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
                raise ValueError("its labels do not fit its images and classes")
        # Copy-on-write: the pages are the page cache's until a caller writes to one, which then
        # gets its own copy; the file itself is never written through this mapping.
        mapping = mmap.mmap(file.fd, 0, access=mmap.ACCESS_COPY)
        mapped = np.frombuffer(mapping, dtype=np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)
        rows = ImageRows(file, offset, count, image_size)
        images = ImageSet(torch.from_numpy(mapped), labels, classes, int(meta["skipped"]), cached=rows)
        return images, [str(p) for p in meta["skipped_paths"]]
    except Exception as exc:
        logger.warning("ignoring unreadable image cache %s.npy (%s); decoding again", entry, exc)
        return None


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _write_entry(entry: Path, folder: Path, files: list[tuple[str, int, int]], image_size: int) -> bool:
    """Decode ``files`` straight into the entry's ``.npy``, a chunk at a time (the folder is
    never in memory whole), then its ``.json``; False (warned) when the cache is not writable.
    Raises DataError when no image is readable."""
    rels = [rel for rel, _, _ in files]
    temps: list[str] = []
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_npy = tempfile.mkstemp(prefix=entry.name + ".", suffix=".npy.tmp", dir=entry.parent)
        temps.append(tmp_npy)
        with os.fdopen(fd, "wb") as fh:
            ok = _decode_into(fh, folder, rels, image_size)
        skipped_paths = require_decoded(folder, rels, ok)
        classes, labels = folder_classes(rels)
        meta = {"images": int(ok.sum()), "image_size": image_size, "classes": list(classes),
                "labels": None if labels is None else labels[ok].tolist(), "skipped": int((~ok).sum()),
                "skipped_paths": skipped_paths[:MAX_SKIPPED_LOGGED]}
        fd, tmp_json = tempfile.mkstemp(prefix=entry.name + ".", suffix=".json.tmp", dir=entry.parent)
        temps.append(tmp_json)
        with os.fdopen(fd, "w") as fh:
            json.dump(meta, fh)
        for tmp in temps:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache of decoded images need not be
        os.replace(tmp_npy, entry.with_suffix(".npy"))
        os.replace(tmp_json, entry.with_suffix(".json"))  # last: the entry is complete
        temps.clear()
    except OSError as exc:
        logger.warning("could not write image cache in %s (%s); continuing without cache", entry.parent, exc)
        return False
    finally:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _drop_stale(entry)
    return True


def _decode_into(fh, folder: Path, rels: list[str], image_size: int) -> np.ndarray:
    """Write the readable images of ``rels`` to ``fh`` as one uint8 ``.npy``; which were readable."""
    def header(rows: int) -> None:
        fh.seek(0)
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "|u1", "fortran_order": False, "shape": (rows, 3, image_size, image_size)})

    header(len(rels))
    start = fh.tell()
    oks = []
    for chunk, ok in decode_chunks(folder, rels, image_size):
        fh.write(np.ascontiguousarray(chunk[ok] if not ok.all() else chunk).data)
        oks.append(ok)
    ok = np.concatenate(oks)
    # numpy pads the header so that the first axis can change without moving the data.
    header(int(ok.sum()))
    if fh.tell() != start:
        raise OSError(f"the .npy header changed length ({start} -> {fh.tell()} bytes)")
    return ok


def _drop_stale(entry: Path) -> None:
    """Remove the other entries of the same folder and size (files changed since they were
    written), the earlier ``.npz`` format's included."""
    prefix = entry.name.rsplit("-", 1)[0] + "-"
    for old in entry.parent.glob(prefix + "*"):
        if old.suffix in _ENTRY_SUFFIXES and (old.stem != entry.name or old.suffix == ".npz"):
            try:
                old.unlink()
            except OSError:
                pass
