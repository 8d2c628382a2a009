"""Monitors for self-supervised encoders: kNN accuracy, linear probe, collapse.

All of them work on frozen features (``embed``), so the server can evaluate the
aggregated encoder without any labels ever reaching the training loop. Features holding NaN
or Inf (a diverged model, a BatchNorm variance gone negative) are refused with
``NonFiniteFeatures``: on them kNN votes for one class and reads as chance accuracy, which
is no measurement. ``nonfinite_rows`` lets a caller check before it measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedssl.common.augment import normalize
from fedssl.common.device import autocast

__all__ = ["NonFiniteFeatures", "collapse_std", "embed", "knn_top1", "linear_probe", "nonfinite_rows"]


class NonFiniteFeatures(ValueError):
    """Features with NaN or Inf values were given to a monitor."""


def nonfinite_rows(features: torch.Tensor) -> int:
    """How many feature vectors hold a NaN or an Inf."""
    return int((~torch.isfinite(features.flatten(1))).any(dim=1).sum())


def _require_finite(where: str, **features: torch.Tensor) -> None:
    for name, values in features.items():
        bad = nonfinite_rows(values)
        if bad:
            raise NonFiniteFeatures(f"{where}: {name} holds NaN/Inf in {bad} of {len(values)} feature vectors")


@torch.no_grad()
def embed(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Features of uint8 images [N, 3, H, W] as float32 [N, D] on the CPU.

    The encoder runs in eval mode (batch-norm running statistics, no dropout);
    each submodule's previous train/eval mode is restored afterwards, so calling
    this mid-training is safe. ``batch_size`` None: 128 on a CPU, 512 on an accelerator.
    """
    device = torch.device(device)
    if batch_size is None:
        # On a CPU without bf16, batches of 128 ran 1.2x faster than 512 (docs/results.md,
        # benchmarks/fp32_step.py eval); an accelerator wants the larger batch.
        batch_size = 128 if device.type == "cpu" else 512
    modes = {module: module.training for module in encoder.modules()}
    encoder.eval()
    try:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = normalize(images[start : start + batch_size].to(device, non_blocking=True))
            with autocast(device, model=encoder):
                features = encoder(batch)
            chunks.append(features.flatten(1).float().cpu())
    finally:
        for module, training in modes.items():
            module.training = training
    if not chunks:
        raise ValueError("embed: no images given")
    return torch.cat(chunks)


def _num_classes(*labels: torch.Tensor) -> int:
    return int(max(int(label.max()) for label in labels if label.numel() > 0)) + 1


@torch.no_grad()
def knn_top1(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier of InstDisc / SimSiam / solo-learn.

    Each query votes with its k most cosine-similar bank samples, weighted by
    exp(similarity / temperature). Queries are processed ``chunk`` at a time, so
    memory stays at [chunk, len(bank)] similarities.
    """
    if len(bank_features) == 0 or len(query_features) == 0:
        raise ValueError("knn_top1: empty bank or query set")
    _require_finite("knn_top1", bank_features=bank_features, query_features=query_features)
    if num_classes is None:
        num_classes = _num_classes(bank_labels, query_labels)
    k = min(k, len(bank_features))
    bank = F.normalize(bank_features.float(), dim=1)
    bank_labels = bank_labels.to(bank.device, torch.long)
    query_labels = query_labels.to(bank.device, torch.long)

    correct = 0
    for start in range(0, len(query_features), chunk):
        query = F.normalize(query_features[start : start + chunk].float().to(bank.device), dim=1)
        similarity, neighbours = (query @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(query), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[neighbours], weights)
        correct += int((votes.argmax(dim=1) == query_labels[start : start + chunk]).sum())
    return correct / len(query_features)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Test top-1 of a logistic regression trained on frozen features.

    Features are standardised with the training set's statistics; the classifier
    starts at zero (the problem is convex, so nothing is lost) and trains with
    mini-batch SGD, momentum 0.9 and a cosine learning-rate decay. The only
    randomness is the shuffling, drawn from ``seed``, so a seed fixes the result.
    The accuracy after the last epoch is returned: nothing is selected on test.
    """
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("linear_probe: empty train or test set")
    _require_finite("linear_probe", train_features=train_features, test_features=test_features)
    device = train_features.device
    num_classes = _num_classes(train_labels, test_labels)
    mean = train_features.float().mean(dim=0)
    std = train_features.float().std(dim=0, unbiased=False).clamp_min(1e-6)
    train_x = (train_features.float() - mean) / std
    test_x = (test_features.float().to(device) - mean) / std
    train_y = train_labels.to(device, torch.long)
    test_y = test_labels.to(device, torch.long)

    classifier = torch.nn.Linear(train_x.shape[1], num_classes, device=device)
    torch.nn.init.zeros_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay
    )
    steps_per_epoch = -(-len(train_x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)

    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(train_x), generator=generator).to(device)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                loss = F.cross_entropy(classifier(train_x[index]), train_y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()

    with torch.no_grad():
        predictions = classifier(test_x).argmax(dim=1)
    return float((predictions == test_y).float().mean())


@torch.no_grad()
def collapse_std(features: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised features (SimSiam's monitor).

    About 1/sqrt(D) for healthy, spread-out features; towards 0 when the encoder
    collapses to a constant.
    """
    if len(features) < 2:
        raise ValueError("collapse_std: need at least two feature vectors")
    _require_finite("collapse_std", features=features)
    return float(F.normalize(features.float(), dim=1).std(dim=0).mean())
