"""Checkpoints and exported encoders: safetensors weights with JSON metadata in the same
file, written atomically so a crash mid-write never replaces a good file with a torn one;
an exported encoder as a folder in the Hugging Face/timm layout (model.safetensors,
config.json, README.md), and weights a run starts from (`init-weights`)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.encoders import build_encoder
from fedssl.common.logs import get_logger

METADATA_KEY = "fedssl"
# The Hugging Face/timm names of an exported encoder folder's files.
EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_CARD = "model.safetensors", "config.json", "README.md"
ENCODER_PREFIX = "encoder."
# How many offending keys an init-weights error names before it only counts them.
NAMED_MISMATCHES = 12

log = get_logger()


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
    # "format": Hugging Face's loaders expect it in a model.safetensors header.
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(path)), read_metadata(path)


def encoder_state(shared_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision's own names (drop the `encoder.` prefix)."""
    return {k[len(ENCODER_PREFIX):]: v for k, v in shared_state.items() if k.startswith(ENCODER_PREFIX)}


def export_encoder(path: Path, shared_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write the encoder alone, loadable with plain torchvision (see README), and its
    metadata beside it as JSON."""
    state = encoder_state(shared_state)
    save_weights(path, state, metadata)
    atomic_write(Path(path).with_suffix(".json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=2, sort_keys=True)))


def export_folder(folder: Path, shared_state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  config: dict[str, Any], card: str) -> Path:
    """The encoder as a folder in the Hugging Face/timm layout: model.safetensors (torchvision's
    names; `metadata` in its header, so the file alone rebuilds it), config.json and the
    model card README.md. Each file is written atomically."""
    folder = Path(folder)
    save_weights(folder / EXPORT_WEIGHTS, encoder_state(shared_state), metadata)
    atomic_write(folder / EXPORT_CONFIG,
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    atomic_write(folder / EXPORT_CARD, lambda tmp: Path(tmp).write_text(card))
    return folder


def encoder_weights_path(path: str | Path) -> Path:
    """The weights file of an exported encoder given as its folder, its model.safetensors, a
    run's output folder (holding encoder/) or an encoder.safetensors file. A path that is
    none of these comes back as given, for the caller to report."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / EXPORT_WEIGHTS, path / "encoder" / EXPORT_WEIGHTS):
            if candidate.is_file():
                return candidate
    return path


def load_encoder(path: str | Path) -> nn.Module:
    """Rebuild an exported encoder from its weights file alone (`encoder_weights_path`
    finds it in a folder), in eval mode."""
    state, meta = load_weights(encoder_weights_path(path))
    encoder, _ = build_encoder(meta["encoder"], int(meta["image-size"]))
    encoder.load_state_dict(state)
    return encoder.eval()


# --------------------------------------------------------------------- init-weights


def read_init_weights(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from a torchvision .pth/.pt (torch.load, weights only), a safetensors
    file, or a fedssl export (folder or file) or checkpoint; one-line ConfigError otherwise."""
    where = f"init-weights={path!r}"
    file = encoder_weights_path(path)
    if file.is_dir():
        raise ConfigError(f"{where} is invalid: the folder holds no {EXPORT_WEIGHTS}")
    if not file.is_file():
        raise ConfigError(f"{where} is invalid: no such file or folder")
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, safetensors header: all mean "not weights we can read"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{where} is invalid: cannot be read as weights ({reason})") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"{where} is invalid: it holds no state_dict (names to tensors); "
                          "save one with torch.save(model.state_dict(), FILE)")
    return state


def load_init_weights(method: nn.Module, cfg: RunConfig) -> int:
    """Load the weights at the run config's `init-weights` into `method` (built from the same
    config): its shared networks, the initial global model. Return how many arrays were
    loaded, 0 when the key is empty.

    The file's names are torchvision's (`conv1.weight`: the encoder alone) or the method's
    (`encoder.conv1.weight`, `projector.0.weight`: a fedssl checkpoint or shared state). Every
    encoder array must be there with its shape; head arrays are loaded where the method has
    the same names (and must then have its shapes), other head arrays are skipped, and so are
    arrays of modules this encoder replaces with Identity (torchvision's `fc` classifier).
    Anything else that does not fit is one ConfigError naming the keys and shapes."""
    path = cfg.init_weights
    if not path:
        return 0
    file_state = read_init_weights(path)
    model = method.shared_state()
    replaced = tuple(f"{ENCODER_PREFIX}{name}." for name, module in method.encoder.named_modules()
                     if name and isinstance(module, nn.Identity))
    bare = not any(k.startswith(ENCODER_PREFIX) for k in file_state)
    # Names as the method has them; `shown` gives each back as the file writes it.
    state = {(ENCODER_PREFIX + k if bare else k): v for k, v in file_state.items()}

    def shown(key: str) -> str:
        return key[len(ENCODER_PREFIX):] if bare else key

    skipped = sorted(k for k in state if k.startswith(replaced) or
                     (k not in model and not k.startswith(ENCODER_PREFIX)))
    unexpected = sorted(k for k in state if k not in model and k not in skipped)
    missing = sorted(k for k in model if k.startswith(ENCODER_PREFIX) and k not in state)
    shapes = sorted(k for k in state if k in model and state[k].shape != model[k].shape)
    problems = ([f"missing {shown(k)}" for k in missing] + [f"unexpected {shown(k)}" for k in unexpected]
                + [f"{shown(k)} has shape {list(state[k].shape)}, the model {list(model[k].shape)}"
                   for k in shapes])
    if problems:
        named = "; ".join(problems[:NAMED_MISMATCHES])
        more = f"; and {len(problems) - NAMED_MISMATCHES} more" if len(problems) > NAMED_MISMATCHES else ""
        raise ConfigError(
            f"init-weights={path!r} does not fit encoder={cfg.resolved_encoder!r} at image-size="
            f"{cfg.image_size} (method={cfg.method!r}): {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} of another shape ({len(problems)} in "
            f"all): {named}{more}")
    loaded = {k: v for k, v in state.items() if k not in skipped}
    method.load_partial(loaded)
    if skipped:
        log.info("init-weights: skipped %d arrays this run's model has no place for: %s%s",
                 len(skipped), ", ".join(shown(k) for k in skipped[:NAMED_MISMATCHES]),
                 " ..." if len(skipped) > NAMED_MISMATCHES else "")
    log.info("init-weights: %d arrays loaded from %s", len(loaded), path)
    return len(loaded)
