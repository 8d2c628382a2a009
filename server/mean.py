"""The example-weighted mean of a round's replies, summed while they are screened.

Aggregation is bound by memory bandwidth, not arithmetic: a ResNet-18 reply is 50 MB and
every pass over a model-sized temporary costs as much as reading the reply. So each array
is walked in cache-sized blocks, and per block the update's distance from the global model
(for norm screening) and the weighted sum are both made while the block is in cache: a
reply is read from memory once, in place, and the only model-sized buffer is the sum."""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

# Elements per block: 512 KB of float32, so a block and its two temporaries stay in a core's
# L2 cache; large enough that the Python loop costs nothing next to the arithmetic.
BLOCK = 1 << 17


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

    def squared_distance(self, value: np.ndarray, reference: np.ndarray) -> float:
        """||value - reference||^2 of two equal blocks, in their own precision: ample to tell
        an outlier 10x off. An infinite result is the answer for a non-finite reply."""
        diff = self.get("diff", value.size, np.result_type(value, reference))
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(value, reference, out=diff)
            return float(np.dot(diff, diff))


class WeightedMean:
    def __init__(self) -> None:
        self.blocks = BlockBuffers()
        self.clear()

    def clear(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0

    def _sum_for(self, key: str, value: np.ndarray) -> np.ndarray:
        if key not in self._sums:
            self._dtypes[key] = value.dtype
            # Floats sum in their own precision, as Flower's FedAvg does; integer buffers
            # (BatchNorm's step counters) in float64, rounded back at the end.
            self._sums[key] = np.zeros(value.shape, value.dtype if value.dtype.kind == "f" else np.float64)
        return self._sums[key]

    def add(self, arrays: Mapping[str, np.ndarray], weight: float,
            reference: Mapping[str, np.ndarray] | None = None) -> float:
        """Add `weight` x `arrays` to the sum. With `reference` (the global model), return the
        update's norm over its floating-point arrays (validation.update_norm), measured in the
        same pass; a reply it shows to be non-finite has been summed and must be taken out
        by summing again without it."""
        squared = 0.0
        for key, value in arrays.items():
            total = flat(self._sum_for(key, value))
            values = flat(value)
            against = flat(reference[key]) if reference is not None and value.dtype.kind == "f" else None
            for span in spans(values.size):
                block = values[span]
                if against is not None:
                    squared += self.blocks.squared_distance(block, against[span])
                weighted = self.blocks.get("weighted", block.size, total.dtype)
                with np.errstate(over="ignore", invalid="ignore"):
                    np.multiply(block, weight, out=weighted)
                    part = total[span]
                    np.add(part, weighted, out=part)
        self.total_weight += weight
        return squared ** 0.5

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
