"""The one place `common` meets Flower: model state <-> Flower records, and the narrower form
float arrays may travel in (run config `transfer-dtype`)."""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

# The dtypes float arrays may travel in. Integer buffers (BatchNorm's step counters) always
# travel as they are: a narrow float cannot hold a large count exactly.
TRANSFER_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32),
                                        "float16": np.dtype(np.float16)}
WIDE = np.dtype(np.float32)


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def is_narrow(dtype) -> bool:
    """A float dtype below float32: an array that travelled narrowed."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # arrays converted from Flower's legacy Parameters carry no dtype
        return False
    return dtype.kind == "f" and dtype.itemsize < WIDE.itemsize


def has_narrow(record: ArrayRecord) -> bool:
    return any(is_narrow(v.dtype) for v in record.values())


def narrow(record: ArrayRecord, keys: Iterable[str], dtype: np.dtype) -> ArrayRecord:
    """The server's model as sent: the arrays named in `keys` (its float ones) in `dtype`,
    every other array as it is."""
    keys = set(keys)
    return ArrayRecord({k: Array(v.numpy().astype(dtype)) if k in keys else v
                        for k, v in record.items()})


def widen(record: ArrayRecord) -> ArrayRecord:
    """What a client trains from: narrow arrays in float32, every other array as it is."""
    return ArrayRecord({k: Array(v.numpy().astype(WIDE)) if is_narrow(v.dtype) else v
                        for k, v in record.items()})


def encode_update(reply: ArrayRecord, arrived: ArrayRecord) -> ArrayRecord:
    """A client's reply as sent: each array that arrived narrow goes back as its change from
    what arrived, in the dtype it arrived in; every other array as it is. A change is small
    next to the weight it changes: fp16 keeps about three significant digits of the change,
    where fp16 weights would round away every update below a thousandth of the weight."""
    out = {}
    for key, value in reply.items():
        came = arrived.get(key)
        if came is not None and is_narrow(came.dtype):
            change = value.numpy().astype(WIDE) - came.numpy().astype(WIDE)
            out[key] = Array(np.asarray(change, dtype=np.dtype(came.dtype)))  # 0-d stays an array
        else:
            out[key] = value
    return ArrayRecord(out)


def decode_update(reply: ArrayRecord, reference: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The server's reading of a reply: a narrow array is a change from `reference` (the
    model the server sent, as it holds it: float32) and becomes reference + change in the
    reference's dtype; every other array is taken as it is. A narrow array without a
    reference of its shape stays narrow, for screening to reject."""
    out = {}
    for key, value in reply.items():
        base = reference.get(key)
        if is_narrow(value.dtype) and base is not None and tuple(base.shape) == tuple(value.shape):
            out[key] = Array(np.asarray(base + value.numpy().astype(base.dtype)))
        else:
            out[key] = value
    return ArrayRecord(out)
