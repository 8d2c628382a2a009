"""Simulation partitioners: split one labelled (or unlabelled) image set across N clients.

Why not flwr-datasets' partitioners: they partition a HuggingFace ``datasets.Dataset``, so
they pull in the HuggingFace ``datasets`` stack (pyarrow, pandas, matplotlib: about 300 MB
installed, ~1.3 s of imports in every client process) just to split an in-memory array of
labels. The three schemes below are ~50 lines of numpy and follow the same definitions
(IID, per-class Dirichlet(alpha) proportions, and McMahan et al.'s label-sorted shards).
"""

from __future__ import annotations

import numpy as np

from fedssl.common.datasets import DataError

SCHEMES = ("iid", "dirichlet", "shards")
DIRICHLET_MAX_TRIES = 100


def partition_indices(
    num_samples: int,
    labels: np.ndarray | None,
    num_partitions: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split ``range(num_samples)`` into ``num_partitions`` non-empty, disjoint, sorted int64 arrays.

    ``iid``: a seeded permutation cut into near-equal parts. ``dirichlet``: for every class,
    proportions ~ Dir(alpha) over the partitions (smaller alpha = more skew), redrawn with a
    derived seed while a partition is empty. ``shards``: samples sorted by label, cut into
    ``num_partitions * shards_per_client`` shards, ``shards_per_client`` random shards each.
    Deterministic by ``seed``.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    num_samples, num_partitions = int(num_samples), int(num_partitions)
    if num_partitions < 1:
        raise DataError(f"num-partitions must be >= 1, got {num_partitions}")
    if num_samples < num_partitions:
        raise DataError(
            f"cannot split {num_samples} samples into {num_partitions} non-empty partitions; "
            "use at most as many partitions as samples"
        )
    if scheme != "iid":
        if labels is None:
            raise DataError(f"partition scheme {scheme!r} needs labels; use 'iid' for an unlabelled image set")
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != num_samples:
            raise DataError(f"labels has {labels.shape[0]} entries but num_samples is {num_samples}")

    if scheme == "iid":
        rng = np.random.default_rng([seed, 0])
        parts = np.array_split(rng.permutation(num_samples), num_partitions)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        parts = _dirichlet(labels, num_partitions, float(alpha), seed)
    else:
        if int(shards_per_client) < 1:
            raise DataError(f"shards-per-client must be >= 1, got {shards_per_client}")
        parts = _shards(labels, num_partitions, int(shards_per_client), seed)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(labels: np.ndarray, n: int, alpha: float, seed: int) -> list[np.ndarray]:
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for attempt in range(DIRICHLET_MAX_TRIES):
        rng = np.random.default_rng([seed, 1, attempt])
        buckets: list[list[np.ndarray]] = [[] for _ in range(n)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha))) * len(idx)).astype(np.int64)[:-1]
            for b, piece in zip(buckets, np.split(idx, cuts)):
                b.append(piece)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) > 0:
            return parts
    raise DataError(
        f"dirichlet partition (alpha={alpha}) left a partition empty in {DIRICHLET_MAX_TRIES} draws of "
        f"{len(labels)} samples into {n} partitions; use a larger alpha or fewer partitions"
    )


def _shards(labels: np.ndarray, n: int, per_client: int, seed: int) -> list[np.ndarray]:
    num_shards = n * per_client
    if num_shards > len(labels):
        raise DataError(
            f"shards partition needs num-partitions * shards-per-client = {num_shards} <= {len(labels)} samples"
        )
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(len(labels))  # random order within a class, then a stable sort by label
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, num_shards)
    owner = rng.permutation(num_shards).reshape(n, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in owner]
