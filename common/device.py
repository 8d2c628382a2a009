"""Where and with how many threads a process computes."""
from __future__ import annotations

import os

import torch


def select_device(preference: str = "auto") -> torch.device:
    """`auto` picks cuda > mps > cpu; an explicit device that is absent is an error."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={preference!r} was asked for but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device={preference!r} was asked for but MPS is not available")
    return device


def set_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads: `threads`, or when 0 the CPUs this process was given
    (Ray sets OMP_NUM_THREADS to an actor's CPUs) so co-located clients don't oversubscribe."""
    if threads <= 0:
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
