"""Where a client keeps what it carries from one round to the next (BYOL's target network,
FedU's and FedEMA's previous model): Flower's `context.state` by default, or files.

`context.state` lives in the SuperNode's memory, and in a simulation in the driver's: every
virtual client that has trained so far keeps its copy there, and it travels to the client's
worker and back each round (about 23 MB a client for resnet10 BYOL). With a state directory
(node config `state-dir` at a site; the run config's `client-state-dir` in a simulation)
each is a safetensors file instead: memory stays flat however many clients have trained,
and a SuperNode restarted mid-run finds its state again."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from safetensors.torch import load_file, save_file

from fedssl.common.checkpoint import atomic_write
from fedssl.common.records import from_record, to_record

log = logging.getLogger("fedssl")


class MemoryStore:
    def __init__(self, context: Context) -> None:
        self._state = context.state

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        record = self._state.get(key)
        return from_record(record) if isinstance(record, ArrayRecord) else None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self._state[key] = to_record(tensors)


class DiskStore:
    def __init__(self, root: Path, context: Context) -> None:
        # Per run: a new run must not pick up an old run's target. Per partition in a
        # simulation, whose node ids are drawn anew by each run.
        client = context.node_config.get("partition-id", context.node_id)
        self.folder = root / f"run-{context.run_id}" / f"client-{client}"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - unreadable state is lost state: rebuilt
            log.warning("local state %s cannot be read (%s: %s); it is rebuilt", path, type(err).__name__, err)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        # Atomic: a client killed while writing leaves the previous round's state, not half a file.
        atomic_write(self.folder / f"{key}.safetensors", lambda tmp: save_file(contiguous, tmp))


Store = MemoryStore | DiskStore


def state_store(context: Context, client_state_dir: str) -> Store:
    root = str(context.node_config.get("state-dir", "")) or client_state_dir
    return DiskStore(Path(root), context) if root else MemoryStore(context)
