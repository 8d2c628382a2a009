"""The per-round checkpoint a killed server resumes from: one safetensors file (written
atomically, so a kill mid-write leaves the previous round's file) holding the global shared
arrays, the strategy's server state, and in its JSON header the round number, the metrics
history and the RNG states. One file, so the parts can never come from different rounds."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedssl.common.checkpoint import load_weights, save_weights

# Shared-state keys are the method's parameter names, which never contain this.
SERVER_STATE_PREFIX = "server-state/"


@dataclass
class RunState:
    round: int
    shared: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    server_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """Every RNG the server draws from: Flower samples clients with `random`."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().numpy().tobytes().hex()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8))


def save_run_state(path: Path, state: RunState, metadata: dict[str, Any]) -> None:
    tensors = dict(state.shared)
    for attr, arrays in state.server_state.items():
        tensors.update({f"{SERVER_STATE_PREFIX}{attr}/{k}": torch.from_numpy(np.array(v, order="C"))
                        for k, v in arrays.items()})
    save_weights(path, tensors, {**metadata, "round": state.round, "history": state.history,
                                 "rng": state.rng})


def load_run_state(path: Path) -> RunState:
    tensors, meta = load_weights(path)
    shared, server_state = {}, {}
    for key, value in tensors.items():
        if key.startswith(SERVER_STATE_PREFIX):
            attr, name = key[len(SERVER_STATE_PREFIX):].split("/", 1)
            server_state.setdefault(attr, {})[name] = value.numpy()
        else:
            shared[key] = value
    return RunState(round=int(meta["round"]), shared=shared, history=list(meta.get("history", [])),
                    server_state=server_state, rng=meta.get("rng", {}), config=meta.get("config", {}))
