"""The example-weighted mean of a round's replies, summed while they are screened.

Aggregation is bound by memory bandwidth, not arithmetic: a ResNet-18 reply is 50 MB and
every pass over a model-sized temporary costs as much as reading the reply. So each array
is walked in cache-sized blocks, and per block the update's distance from the global model
(for norm screening) and the weighted sum are both made while the block is in cache: a
reply is read from memory once, in place, and the only model-sized buffer is the sum."""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Mapping

import numpy as np

# Elements per block: 512 KB of float32, so a block and its two temporaries stay in a core's
# L2 cache; large enough that the Python loop costs nothing next to the arithmetic.
BLOCK = 1 << 17
# One core cannot keep enough memory reads in flight to use the machine's bandwidth; a few
# can. numpy's ufuncs and dot release the GIL, so threads suffice.
MAX_THREADS = 4


def flat(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)


def spans(size: int) -> Iterator[slice]:
    return (slice(start, min(start + BLOCK, size)) for start in range(0, size, BLOCK))


class BlockBuffers:
    """Block-sized temporaries, one per (use, dtype), kept from one block and reply to the next."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, use: str, size: int, dtype) -> np.ndarray:
        key = (use, np.dtype(dtype))
        found = self._buffers.get(key)
        if found is None:
            found = self._buffers[key] = np.empty(BLOCK, key[1])
        return found[:size]

    def walk(self, blocks: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]], weight: float) -> float:
        """For each (values, reference, sum) block: add ||values - reference||^2 (where a
        reference is given) to the result, and weight x values to the sum (where one is
        given). Squared distances in the arrays' own precision: ample to tell an outlier
        10x off; an infinite result is the answer for a non-finite reply."""
        squared = 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            for values, reference, total in blocks:
                if reference is not None:
                    diff = self.get("diff", values.size, np.result_type(values, reference))
                    np.subtract(values, reference, out=diff)
                    squared += float(np.dot(diff, diff))
                if total is not None:
                    weighted = self.get("weighted", values.size, total.dtype)
                    np.multiply(values, weight, out=weighted)
                    np.add(total, weighted, out=total)
        return squared


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="fedssl-aggregate")


class BlockWalker:
    """Walks a reply's arrays block by block on a few threads, each with its own buffers and
    its own contiguous share of the blocks. Shares are summed in order: the same replies
    give the same norm and mean whatever the timing."""

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads or min(len(os.sched_getaffinity(0)), MAX_THREADS)
        self._buffers = [BlockBuffers() for _ in range(self.threads)]

    def run(self, arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None,
            sums: Mapping[str, np.ndarray] | None, weight: float = 0.0) -> float:
        """||arrays - reference|| over the floating-point arrays (with a reference), having
        added weight x arrays to `sums` (when given; flat, C-ordered, keyed as arrays)."""
        blocks = []
        for key, value in arrays.items():
            values = flat(value)
            against = flat(reference[key]) if reference is not None and value.dtype.kind == "f" else None
            total = sums[key] if sums is not None else None
            if against is None and total is None:
                continue
            for span in spans(values.size):
                blocks.append((values[span], None if against is None else against[span],
                               None if total is None else total[span]))
        shares = _split(blocks, self.threads)
        if len(shares) == 1:
            return self._buffers[0].walk(shares[0], weight) ** 0.5
        futures = [_pool(self.threads).submit(buffers.walk, share, weight)
                   for buffers, share in zip(self._buffers, shares)]
        return sum(f.result() for f in futures) ** 0.5


def _split(blocks: list, parts: int) -> list[list]:
    """`blocks` cut into at most `parts` contiguous shares of about equal element counts."""
    total = sum(block[0].size for block in blocks)
    if parts <= 1 or total < parts * BLOCK:
        return [blocks]
    shares, current, done = [], [], 0
    for block in blocks:
        current.append(block)
        done += block[0].size
        if done >= total * (len(shares) + 1) / parts and len(shares) < parts - 1:
            shares.append(current)
            current = []
    shares.append(current)
    return [share for share in shares if share]


class WeightedMean:
    def __init__(self) -> None:
        self.walker = BlockWalker()
        self.clear()

    def clear(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0

    def _flat_sums(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for key, value in arrays.items():
            if key not in self._sums:
                self._dtypes[key] = value.dtype
                # Floats sum in their own precision, as Flower's FedAvg does; integer
                # buffers (BatchNorm's step counters) in float64, rounded back at the end.
                self._sums[key] = np.zeros(value.shape, value.dtype if value.dtype.kind == "f" else np.float64)
        return {key: self._sums[key].reshape(-1) for key in arrays}

    def add(self, arrays: Mapping[str, np.ndarray], weight: float,
            reference: Mapping[str, np.ndarray] | None = None) -> float:
        """Add `weight` x `arrays` to the sum. With `reference` (the global model), return the
        update's norm over its floating-point arrays (validation.update_norm), measured in the
        same pass; a reply it shows to be non-finite has been summed and must be taken out
        by summing again without it."""
        norm = self.walker.run(arrays, reference, self._flat_sums(arrays), weight)
        self.total_weight += weight
        return norm

    def result(self) -> dict[str, np.ndarray]:
        """The mean, in the dtypes the replies came in. Divides the sum in place: the sum
        ends here."""
        if self.total_weight <= 0:
            raise ValueError("no replies were added to the mean")
        out = {}
        for key, total in self._sums.items():
            total /= self.total_weight
            dtype = self._dtypes[key]
            # asarray: rint of a 0-d array is a numpy scalar
            out[key] = total if dtype.kind == "f" else np.asarray(np.rint(total).astype(dtype))
        return out
