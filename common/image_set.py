"""What every image source yields (:class:`ImageSet`, whose images may be :class:`ImageRows`
read from the image cache a batch at a time) and the error every one raises (:class:`DataError`)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch


class DataError(ValueError):
    """One-line, user-facing: names the path/key/value and what is allowed."""


class ImageRows:
    """uint8 ``[N, 3, S, S]`` images that stay in a file (the decoded-image cache, an ``.npy``)
    and are read when indexed: ``rows[index]`` (an int, a slice, or integer/boolean indices)
    reads just those rows, in file order, into a new tensor. Reads go through the page cache,
    which every process reading the file shares; between reads this process holds none of the
    file, so a client training on a large folder holds one batch of it, not the folder (a
    memory mapping would instead count every page it ever touched in the process's RSS).

    ``rows`` picks and orders rows of the file (None: all of them); ``take`` narrows it without
    reading anything. Supports what training and evaluation ask of their images: ``len``,
    ``shape``, ``dtype`` and indexing along the first axis."""

    dtype = torch.uint8
    ndim = 4

    def __init__(self, file: OpenFile, offset: int, count: int, size: int, rows: np.ndarray | None = None):
        """``count`` rows of ``3 * size * size`` bytes from byte ``offset`` of ``file``."""
        self._file, self._offset, self._count, self._size = file, offset, count, size
        self._row_bytes = 3 * size * size
        self._rows = rows

    def __len__(self) -> int:
        return self._count if self._rows is None else len(self._rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self._size, self._size))

    def __repr__(self) -> str:
        return f"ImageRows({len(self)} of {self._count} rows of {self._file.name})"

    def take(self, index) -> ImageRows:
        """These rows at ``index`` (as ``__getitem__`` takes it), still unread."""
        return ImageRows(self._file, self._offset, self._count, self._size, self._file_rows(index))

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0
                                                    and not index.is_floating_point()):
            return self[np.array([int(index)])][0]
        return torch.from_numpy(self._read(self._file_rows(index)))

    def _file_rows(self, index) -> np.ndarray:
        n = len(self)
        if isinstance(index, slice):
            positions = np.arange(n)[index]
        else:
            if isinstance(index, tuple):
                raise TypeError("ImageRows are indexed by rows only; index the tensor it returns for more")
            positions = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
            if positions.dtype == bool:
                if positions.shape != (n,):
                    raise IndexError(f"a boolean index of shape {positions.shape} for {n} rows")
                positions = np.flatnonzero(positions)
            elif positions.size == 0:
                positions = positions.astype(np.int64)
            elif positions.dtype.kind not in "iu":
                raise IndexError(f"rows are indexed by integers or booleans, not {positions.dtype}")
            positions = positions.astype(np.int64).reshape(-1)
            if positions.size and (positions.min() < -n or positions.max() >= n):
                raise IndexError(f"row index out of range for {n} rows")
            positions = np.where(positions < 0, positions + n, positions)
        return positions if self._rows is None else self._rows[positions]

    def _read(self, file_rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(file_rows), 3, self._size, self._size), dtype=np.uint8)
        flat = out.reshape(len(file_rows), self._row_bytes)
        if not len(file_rows):
            return out
        # File order: a run of consecutive rows is one read, and a cold cache is read forward.
        order = np.argsort(file_rows, kind="stable")
        ordered = file_rows[order]
        starts = np.flatnonzero(np.diff(ordered, prepend=ordered[0] - 2) != 1)
        for a, b in zip(starts, np.append(starts[1:], len(ordered))):
            dest = order[a:b]
            if b - a == 1 or bool((np.diff(dest) == 1).all()):
                self._read_at(flat[dest[0]:dest[0] + b - a], int(ordered[a]))
            else:
                run = np.empty((b - a, self._row_bytes), dtype=np.uint8)
                self._read_at(run, int(ordered[a]))
                flat[dest] = run
        return out

    def _read_at(self, buffer: np.ndarray, first_row: int) -> None:
        view = memoryview(buffer).cast("B")
        offset = self._offset + first_row * self._row_bytes
        done = 0
        while done < len(view):
            got = _read_at(self._file.fd, view[done:], offset + done)
            if got <= 0:
                raise DataError(f"image cache {self._file.name!r} ends before row "
                                f"{first_row + done // self._row_bytes}: delete it to decode again")
            done += got


class OpenFile:
    """A read-only file descriptor, closed when the last :class:`ImageRows` reading it is gone.
    Held open, so a cache entry replaced or removed meanwhile still reads as it was."""

    def __init__(self, fd: int, name: str):
        self.fd, self.name = fd, name

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


if hasattr(os, "preadv"):
    def _read_at(fd: int, view: memoryview, offset: int) -> int:
        return os.preadv(fd, [view], offset)
elif hasattr(os, "pread"):
    def _read_at(fd: int, view: memoryview, offset: int) -> int:
        data = os.pread(fd, len(view), offset)
        view[:len(data)] = data
        return len(data)
else:  # pragma: no cover - Windows: no positional read, so one reader at a time moves the offset
    _seek_lock = threading.Lock()

    def _read_at(fd: int, view: memoryview, offset: int) -> int:
        with _seek_lock:
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, len(view))
        view[:len(data)] = data
        return len(data)


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor | ImageRows  # uint8 [N, 3, S, S]: in memory (contiguous), or read on demand
    labels: torch.Tensor | None  # int64 [N]; None for an unlabelled folder
    classes: tuple[str, ...]  # class names (empty when unlabelled)
    skipped: int = 0  # files found but not usable (count)
    # The same rows as `images`, read on demand from the image cache (read_on_demand); None
    # when the images are only in memory.
    cached: ImageRows | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        im = self.images
        if im.dtype != torch.uint8 or im.ndim != 4 or im.shape[1] != 3 or im.shape[2] != im.shape[3]:
            raise ValueError(f"ImageSet.images must be uint8 [N, 3, S, S], got {im.dtype} {tuple(im.shape)}")
        if isinstance(im, torch.Tensor) and not im.is_contiguous():
            object.__setattr__(self, "images", im.contiguous())
        if self.cached is not None and len(self.cached) != im.shape[0]:
            raise ValueError(f"ImageSet.cached has {len(self.cached)} rows for {im.shape[0]} images")
        if self.labels is not None:
            lb = self.labels
            if lb.dtype != torch.int64 or lb.shape != (im.shape[0],):
                raise ValueError(f"ImageSet.labels must be int64 [{im.shape[0]}], got {lb.dtype} {tuple(lb.shape)}")
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices) -> "ImageSet":
        """Rows ``indices`` (ints or a boolean mask); ``skipped`` describes loading, so a subset has 0.
        Of images read on demand (:meth:`read_on_demand`) the subset is read on demand too, and
        reads nothing yet; else it is a copy in memory."""
        idx = torch.as_tensor(np.asarray(indices))
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.long).flatten()
        labels = None if self.labels is None else self.labels[idx].contiguous()
        if isinstance(self.images, ImageRows):
            rows = self.images.take(idx)
            return ImageSet(rows, labels, self.classes, 0, cached=rows)
        return ImageSet(self.images[idx].contiguous(), labels, self.classes, 0)

    def read_on_demand(self) -> "ImageSet":
        """This set with its images as :class:`ImageRows` when it comes from the image cache,
        so that training reads a batch at a time (common.training.train_epochs indexes its
        images per batch) and subsets read nothing until indexed; an in-memory set as it is.
        Indexing ImageRows gives tensors; they are not tensors themselves, so only code that
        just indexes them (training, `embed`) should be given them."""
        if self.cached is None or self.images is self.cached:
            return self
        return ImageSet(self.cached, self.labels, self.classes, self.skipped, cached=self.cached)

    def sample(self, limit: int, seed: int) -> "ImageSet":
        """At most ``limit`` rows, drawn at random by ``seed`` and kept in their order;
        ``limit`` 0 means all."""
        if limit <= 0 or len(self) <= limit:
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[:limit].sort().values)
