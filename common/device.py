"""Where and with how many threads a process computes."""
from __future__ import annotations

import contextlib
import functools
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


def autocast(device: torch.device, enabled: bool = True,
             model: torch.nn.Module | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast where the hardware runs it natively: CUDA, and CPUs with AVX512-BF16 or
    AMX (there a resnet10 BYOL step is ~1.75x faster, resnet18 ~2.7x; docs/results.md), unless
    `model` says its layers are slower so on a CPU (`cpu_bf16 = False`: mobilenet's depthwise
    convolutions). Elsewhere bf16 is emulated and slower than fp32, so it stays off."""
    on_cpu = device.type == "cpu" and cpu_has_native_bf16() and getattr(model, "cpu_bf16", True)
    if enabled and (device.type == "cuda" or on_cpu):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache  # asked every training step; the answer is the hardware's
def cpu_has_native_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
