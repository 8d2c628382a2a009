"""Image sources, decoded once into a uint8 tensor cache.

Every source yields an :class:`ImageSet`: ``images`` uint8 ``[N, 3, S, S]`` (contiguous),
``labels`` int64 ``[N]`` or ``None`` for an unlabelled folder, ``classes`` and ``skipped``.
Augmentation works on these tensors in batches, so nothing here is per-sample at training time.

Sources (``SOURCES``):

* ``synthetic`` - the embedded default (rendered by common/synthetic.py): 10 shape/texture classes with
  random grey levels, position, scale and rotation, so class identity is *shape*, never colour.
  No files, no download, deterministic by seed; generated vectorised with torch.
* ``imagefolder`` - any folder of images (recursive), any size or mode, resized so the shorter
  side is S and centre-cropped. Class = first-level subfolder when every image lies in one.
  Decoded with a small thread pool once, then cached as one ``.npz`` under the cache directory.
* ``cifar10`` / ``cifar100`` - torchvision datasets under ``path`` (downloaded when missing).

Held-out images are never trained on. The server evaluates on ``(bank, query)`` from
:func:`load_eval_split`; the query side (also the linear probe's test set) is other images
than the training split whenever the source has one of its own (``synthetic``'s test split is
a separate render; cifar's test files; a folder's ``test/``). When an image folder without
``train/`` and ``test/`` is both the training folder and the evaluation folder, the query side
is a seeded split of the training images, so :func:`training_images` leaves it out (the same
split from the seed alone, on every client and on the server); folders that overlap in any
other way are refused (:func:`evaluation_source`). The bank may be the training images, as in
standard SSL evaluation, where the kNN bank is the training set.

torchvision is imported only for the cifar sources: a ClientApp process pays imports per message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from common.config import ConfigError
from common.synthetic import SYNTHETIC_CLASSES, render_synthetic

logger = logging.getLogger("fedssl")

SOURCES = ("synthetic", "imagefolder", "cifar10", "cifar100")
SPLITS = ("train", "test")

SYNTHETIC_TRAIN_SIZE = 10_000
SYNTHETIC_TEST_SIZE = 2_000

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DECODE_THREADS = 2
EVAL_TEST_FRACTION = 0.2  # held-out share of a labelled folder without train/ and test/
MAX_SKIPPED_LOGGED = 10  # warning lines for unreadable files; the rest is one summary line
CACHE_FORMAT = 1  # bump when decoding changes, to invalidate old caches
MIN_IMAGE_SIZE = 8


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


# --------------------------------------------------------------------------- public API


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
        return _load_folder(_folder_for_split(path, split), image_size, cache_dir)
    return _load_torchvision(source, path, image_size, split, cache_dir)


def training_images(
    source: str, path: str, image_size: int, max_images: int, seed: int, *, eval_path: str = ""
) -> ImageSet:
    """The images a simulation shares out to its clients, or the centralized baseline pools:
    the ``train`` split less the evaluation's held-out images, cut to a seeded ``max_images``
    subset when that is not 0.

    ``eval_path`` is the run's eval-path ('' = the server evaluates on this source). When the
    evaluation's queries are a seeded split of these very images (:func:`carved_folder`), the
    rows :func:`held_out_split` holds out for seed ``seed`` are removed: the server computes
    the same rows from the same seed, so no query or probe-test image is trained on. An
    unlabelled folder has no such split (the evaluation refuses it), so it is kept whole.
    """
    images = load_images(source, path, image_size, seed=seed)
    if carved_folder(source, path, eval_path) is not None and images.labels is not None:
        kept_rows, held_rows = held_out_split(images.labels.numpy(), seed)
        logger.info("%d of the %d images in %s are held out for evaluation, never trained on",
                    len(held_rows), len(images), path)
        images = dataclasses.replace(images.subset(kept_rows), skipped=images.skipped)
    return images.sample(max_images, seed)


def held_out_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows) of a labelled folder carved for evaluation: seeded and
    stratified, ``EVAL_TEST_FRACTION`` of every class (of 2 or more images) held out.
    A function of the labels and the seed alone, so clients and server agree without talking."""
    return _stratified_split(labels, EVAL_TEST_FRACTION, seed)


def evaluation_source(source: str, path: str, eval_path: str) -> tuple[str, str]:
    """(source, path) of the labelled images the server evaluates on: ``eval_path``'s folder,
    else the training source itself. Raises ConfigError when the two folders overlap in a way
    that :func:`training_images` cannot keep the queries out of training."""
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
    stratified split (:func:`held_out_split`, ``EVAL_TEST_FRACTION`` held out) of a folder
    with class subfolders. The query side is never trained on (:func:`training_images` leaves
    a carved one out); the bank may be training images, as in standard SSL evaluation.
    """
    _check_common(source, image_size, "train")
    if source != "imagefolder":
        train = load_images(source, path, image_size, split="train", seed=seed, cache_dir=cache_dir)
        test = load_images(source, path, image_size, split="test", seed=seed, cache_dir=cache_dir)
        return train, test

    root = _require_folder(path)
    if _has_split_layout(root):
        train = _load_folder(root / "train", image_size, cache_dir)
        test = _load_folder(root / "test", image_size, cache_dir)
        _require_labels(train, root / "train")
        _require_labels(test, root / "test")
        return train, _align_classes(test, train.classes, root / "test")

    full = _load_folder(root, image_size, cache_dir)
    _require_labels(full, root)
    train_idx, test_idx = held_out_split(full.labels.numpy(), seed)
    if len(test_idx) == 0:
        raise DataError(
            f"image folder {str(root)!r} is too small for a held-out split "
            f"({len(full)} images in {len(full.classes)} classes): every class needs at least 2 images"
        )
    # loading problems are reported once, on the bank
    return dataclasses.replace(full.subset(train_idx), skipped=full.skipped), full.subset(test_idx)


def load_folder_with_paths(path: str, image_size: int) -> tuple[ImageSet, list[str]]:
    """Every image below ``path`` (recursive), decoded without the cache, and each one's path
    relative to ``path`` in the same order; unreadable files are skipped and logged."""
    root = _require_folder(path)
    files = _require_images(root)
    images, skipped_paths = _decode_folder(root, files, image_size)
    _log_skipped(root, images.skipped, skipped_paths)
    skipped = set(skipped_paths)
    return images, [rel for rel, _, _ in files if rel not in skipped]


# --------------------------------------------------------------------------- validation helpers


def _check_common(source: str, image_size: int, split: str) -> None:
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise DataError(f"image size {image_size!r} is not allowed; use an integer >= {MIN_IMAGE_SIZE}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def _require_folder(path: str) -> Path:
    if not path:
        raise DataError("imagefolder needs a data path (a folder of images); got an empty path")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} is not a folder")
    return root


def _has_split_layout(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _folder_for_split(path: str, split: str) -> Path:
    root = _require_folder(path)
    if _has_split_layout(root):
        return root / split
    if split == "test":
        raise DataError(
            f"image folder {str(root)!r} has no train/ and test/ subfolders, so split 'test' does not exist; "
            "use load_eval_split for a held-out split"
        )
    return root


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


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0x5E1])
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        n_test = min(max(n_test, 1), len(idx) - 1) if len(idx) >= 2 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --------------------------------------------------------------------------- synthetic


def _derived_seed(seed: int, *stream: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *stream]).generate_state(1, np.uint64)[0] >> 1)


def _load_synthetic(split: str, image_size: int, seed: int) -> ImageSet:
    n = SYNTHETIC_TRAIN_SIZE if split == "train" else SYNTHETIC_TEST_SIZE
    gen = torch.Generator().manual_seed(_derived_seed(seed, SPLITS.index(split), 0x5A7))
    k = len(SYNTHETIC_CLASSES)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    images = render_synthetic(labels, image_size, gen)
    return ImageSet(images, labels.to(torch.int64), SYNTHETIC_CLASSES, 0)


# --------------------------------------------------------------------------- image folders


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


def _require_images(folder: Path) -> list[tuple[str, int, int]]:
    files = _list_images(folder)
    if not files:
        raise DataError(
            f"no images in folder {str(folder)!r} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _default_cache_dir() -> str:
    return os.environ.get("FEDSSL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedssl")


def _load_folder(folder: Path, image_size: int, cache_dir: str | None) -> ImageSet:
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist")
    real = os.path.realpath(folder)
    files = _require_images(folder)

    cache_root = Path(cache_dir if cache_dir is not None else _default_cache_dir()).expanduser()
    folder_key = hashlib.sha256(f"{CACHE_FORMAT}\0{real}\0{image_size}".encode()).hexdigest()[:16]
    content = hashlib.sha256(folder_key.encode())
    for rel, size, mtime in files:
        content.update(f"{rel}\0{size}\0{mtime}\n".encode())
    cache_file = cache_root / f"imagefolder-{image_size}px-{folder_key}-{content.hexdigest()[:16]}.npz"

    cached = _read_cache(cache_file, image_size)
    if cached is not None:
        images, skipped_paths = cached
        _log_skipped(folder, images.skipped, skipped_paths)
        logger.debug("loaded %d images of %s from cache %s", len(images), folder, cache_file)
        return images

    t0 = time.perf_counter()
    images, skipped_paths = _decode_folder(folder, files, image_size)
    logger.info("decoded %d images from %s in %.1f s", len(images), folder, time.perf_counter() - t0)
    _log_skipped(folder, images.skipped, skipped_paths)
    _write_cache(cache_file, images, skipped_paths)
    return images


def _decode_folder(folder: Path, files: list[tuple[str, int, int]], size: int) -> tuple[ImageSet, list[str]]:
    rels = [rel for rel, _, _ in files]
    labelled = all("/" in rel for rel in rels)
    classes = tuple(sorted({rel.split("/", 1)[0] for rel in rels})) if labelled else ()
    n = len(rels)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    base = str(folder)

    def work(bounds: tuple[int, int]) -> None:
        for i in range(*bounds):
            try:
                out[i] = _decode_image(os.path.join(base, rels[i]), size).transpose(2, 0, 1)
                ok[i] = True
            except Exception:  # unreadable for any reason: counted and logged, never fatal
                ok[i] = False

    step = 256
    chunks = [(s, min(s + step, n)) for s in range(0, n, step)]
    with ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="fedssl-decode") as pool:
        for _ in pool.map(work, chunks):
            pass

    skipped_paths = [rels[i] for i in np.flatnonzero(~ok)]
    if not ok.any():
        raise DataError(
            f"no usable image in folder {str(folder)!r}: all {n} image files failed to decode "
            f"(e.g. {skipped_paths[0]!r})"
        )
    if not ok.all():
        out = out[ok]
    labels = None
    if labelled:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[rels[i].split("/", 1)[0]] for i in np.flatnonzero(ok)], dtype=torch.int64)
    images = ImageSet(torch.from_numpy(np.ascontiguousarray(out)), labels, classes, int((~ok).sum()))
    return images, skipped_paths


def _log_skipped(folder: Path, skipped: int, paths: list[str]) -> None:
    if not skipped:
        return
    for rel in paths[:MAX_SKIPPED_LOGGED]:
        logger.warning("skipped unreadable image %s", os.path.join(str(folder), rel))
    if skipped > MAX_SKIPPED_LOGGED:
        logger.warning("skipped %d unreadable images in %s in total", skipped, folder)


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


# --------------------------------------------------------------------------- torchvision (cifar)


def _torchvision_dataset(source: str, root: str, train: bool):
    from torchvision import datasets  # imported here: ~0.5 s that other sources need not pay

    cls = datasets.CIFAR10 if source == "cifar10" else datasets.CIFAR100
    return cls(root=root, train=train, download=True)


def _load_torchvision(source: str, path: str, image_size: int, split: str, cache_dir: str | None) -> ImageSet:
    root = str(Path(path).expanduser()) if path else os.path.join(cache_dir or _default_cache_dir(), source)
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


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 2_000) -> torch.Tensor:
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for s in range(0, images.shape[0], chunk):
        x = images[s : s + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[s : s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out
