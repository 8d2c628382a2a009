"""The example-weighted mean of a round's replies, summed while they are screened: each
reply is read once, in place, and the mean holds two model-sized buffers (the sum and a
scratch buffer), where screening and then Flower's FedAvg would decode every reply twice."""
from __future__ import annotations

from typing import Mapping

import numpy as np


def buffer(buffers: dict[str, np.ndarray], key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """`buffers[key]`, made on first use: kept from one reply to the next, because a fresh
    model-sized temporary for every reply costs more in page faults than the arithmetic."""
    found = buffers.get(key)
    if found is None or found.shape != tuple(shape) or found.dtype != dtype:
        found = buffers[key] = np.empty(shape, dtype)
    return found


class WeightedMean:
    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.scratch: dict[str, np.ndarray] = {}
        self.total_weight = 0.0

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        for key, value in arrays.items():
            if key not in self._sums:
                self._dtypes[key] = value.dtype
                # Floats sum in their own precision, as Flower's FedAvg does; integer
                # buffers (BatchNorm's step counters) in float64, rounded back at the end.
                self._sums[key] = np.zeros(value.shape, value.dtype if value.dtype.kind == "f" else np.float64)
            weighted = buffer(self.scratch, key, value.shape, self._sums[key].dtype)
            np.multiply(value, weight, out=weighted)
            self._sums[key] += weighted
        self.total_weight += weight

    def result(self) -> dict[str, np.ndarray]:
        """The mean, in the dtypes the replies came in. Divides the sum in place: the sum
        ends here."""
        if self.total_weight <= 0:
            raise ValueError("no replies were added to the mean")
        self.scratch = {}
        out = {}
        for key, total in self._sums.items():
            total /= self.total_weight
            dtype = self._dtypes[key]
            # asarray: rint of a 0-d array is a numpy scalar
            out[key] = total if dtype.kind == "f" else np.asarray(np.rint(total).astype(dtype))
        return out
