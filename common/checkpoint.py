"""Checkpoints and exported encoders: safetensors weights with JSON metadata in the same
file, written atomically so a crash mid-write never replaces a good file with a torn one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from common.encoders import build_encoder

METADATA_KEY = "fedssl"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename over `path`: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(path)), read_metadata(path)


def encoder_state(shared_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision's own names (drop the `encoder.` prefix)."""
    prefix = "encoder."
    return {k[len(prefix):]: v for k, v in shared_state.items() if k.startswith(prefix)}


def export_encoder(path: Path, shared_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write the encoder alone, loadable with plain torchvision (see README)."""
    state = encoder_state(shared_state)
    save_weights(path, state, metadata)
    atomic_write(Path(path).with_suffix(".json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=2, sort_keys=True)))


def load_encoder(path: Path) -> nn.Module:
    """Rebuild an exported encoder from its file alone."""
    state, meta = load_weights(Path(path))
    encoder, _ = build_encoder(meta["encoder"], int(meta["image-size"]))
    encoder.load_state_dict(state)
    return encoder
