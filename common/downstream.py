"""An exported encoder used downstream: the kNN monitor and a linear probe on frozen
features, fine-tuning the whole encoder on a fraction of the labels, and embeddings of a
folder of images written to a file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from common.augment import AugmentConfig, TwoViewAugment
from common.checkpoint import atomic_write, load_encoder, read_metadata
from common.datasets import DataError, ImageSet
from common.device import autocast
from common.evaluation import embed, knn_top1, linear_probe
from common.schedules import cosine
from common.training import steps_per_epoch

EMBEDDING_FORMATS = (".npz", ".safetensors")


def open_encoder(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported encoder and its metadata (image size, method, config); a file that is
    missing or not an exported encoder is a one-line DataError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"encoder file {str(path)!r} does not exist")
    try:
        meta = read_metadata(path)
        return load_encoder(path), meta
    except Exception as err:  # safetensors, JSON or a state-dict mismatch: all mean "not ours"
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise DataError(f"{str(path)!r} is not an encoder exported by fedssl "
                        f"(encoder.safetensors): {reason}") from None


def frozen_scores(encoder: nn.Module, train: ImageSet, test: ImageSet, *, k: int = 200,
                  temperature: float = 0.1, seed: int = 0,
                  device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """kNN top-1 (train as the bank) and linear-probe top-1 on the encoder's frozen features."""
    bank = embed(encoder, train.images, device=device)
    query = embed(encoder, test.images, device=device)
    return {
        "knn_top1": knn_top1(bank, train.labels, query, test.labels, k=k, temperature=temperature,
                             num_classes=len(train.classes)),
        "probe_top1": linear_probe(bank, train.labels, query, test.labels, seed=seed),
    }


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"--labels-fraction {fraction!r} is not allowed: it must be in (0, 1], "
                        "e.g. 0.01 or 0.1")
    return fraction


def labelled_fraction(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded `fraction` of the images, the same share of every class
    (at least one image each), as in the 1% / 10% semi-supervised protocol."""
    check_fraction(fraction)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(picked).sort().values


def finetune(encoder: nn.Module, train: ImageSet, test: ImageSet, *, epochs: int = 30,
             lr: float = 0.05, batch_size: int = 64, seed: int = 0,
             device: torch.device = torch.device("cpu"), amp: bool = True) -> float:
    """Train the whole encoder and a linear head with cross-entropy on `train` (random
    resized crops and flips), in place; return the test top-1 after the last epoch:
    nothing is selected on the test set."""
    if epochs < 1 or batch_size < 2:
        raise DataError(f"fine-tuning needs --epochs >= 1 and --batch-size >= 2 (batch norm), "
                        f"got {epochs} and {batch_size}")
    if len(train) < 2:
        raise DataError(f"fine-tuning needs at least 2 labelled images, got {len(train)}: "
                        "raise --labels-fraction or add images")
    image_size = int(train.images.shape[-1])
    feature_dim = embed(encoder, train.images[:2]).shape[1]
    # Zeros, as the probe: the first steps fit the head, then the encoder gets gradients.
    head = nn.Linear(feature_dim, len(train.classes))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(encoder, head).to(device).train()
    # Crop and flip only: the colour distortions of SSL views would hide what labels name.
    augment = TwoViewAugment(AugmentConfig(image_size=image_size, crop_scale=(0.5, 1.0),
                                           jitter_prob=0.0, grayscale_prob=0.0,
                                           blur_probs=(0.0, 0.0), solarize_probs=(0.0, 0.0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    batch = min(batch_size, len(train))
    per_epoch = steps_per_epoch(len(train), batch)
    total = epochs * per_epoch
    order_generator = torch.Generator().manual_seed(seed)
    view_generator = torch.Generator().manual_seed(seed + 1)
    labels = train.labels.to(device)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=order_generator)
        for b in range(per_epoch):
            index = order[b * batch:(b + 1) * batch]
            view = augment.one_view(train.images[index].to(device), view_generator)
            for group in optimizer.param_groups:
                group["lr"] = cosine(step / total, lr, 0.0)
            with autocast(device, amp, encoder):
                logits = model(view)
            loss = F.cross_entropy(logits.float(), labels[index.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    predictions = embed(model, test.images, device=device).argmax(dim=1)
    model.cpu()
    return float((predictions == test.labels).float().mean())


def check_embeddings_path(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.suffix not in EMBEDDING_FORMATS:
        raise DataError(f"--out {str(out)!r}: the file must end in {' or '.join(EMBEDDING_FORMATS)}")
    return out


def write_embeddings(out: str | Path, features: torch.Tensor, paths: list[str],
                     metadata: dict[str, Any]) -> Path:
    """`features` [N, D] with the image paths they belong to, row i for paths[i]: .npz
    (arrays `embeddings`, `paths`) or .safetensors (tensor `embeddings`, the paths as JSON
    in its header)."""
    out = check_embeddings_path(out)
    features = features.float().contiguous()
    if out.suffix == ".npz":
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=features.numpy(), paths=np.array(paths, dtype=np.str_))
    else:
        header = {"paths": json.dumps(paths), "fedssl": json.dumps(metadata, sort_keys=True)}

        def write(tmp: str) -> None:
            save_file({"embeddings": features}, tmp, metadata=header)
    atomic_write(out, write)
    return out
