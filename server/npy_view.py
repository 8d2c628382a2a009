"""A reply's arrays read in place: Flower's `Array.numpy()` copies every array out of the
message's bytes, and the server reads a round's replies only to screen and sum them."""
from __future__ import annotations

import functools
import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only views of the record's bytes (numpy-serialized arrays; any other raises)."""
    return {k: _view(v) for k, v in record.items()}


def _view(array: Array) -> np.ndarray:
    if array.stype != SType.NUMPY:
        return array.numpy()  # raises, naming the serialization it cannot read
    data = array.data
    # .npy: 6-byte magic, 2 version bytes, the header's length (2 bytes in version 1, 4 after)
    length_bytes = 2 if data[6:7] == b"\x01" else 4
    offset = 8 + length_bytes + int.from_bytes(data[8:8 + length_bytes], "little")
    shape, fortran_order, dtype = _npy_header(bytes(data[:offset]))
    elements = np.frombuffer(data, dtype, count=math.prod(shape), offset=offset)
    return elements.reshape(shape, order="F" if fortran_order else "C")


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parsed once per distinct header: a model's arrays repeat theirs in every reply, and
    parsing (a Python literal) costs more than reading the array in place."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    if dtype.hasobject:  # never unpickled, as np.load(allow_pickle=False) refuses it too
        raise ValueError(f"array of Python objects ({dtype})")
    return shape, fortran_order, dtype
