import numpy as np
import pytest

from fedssl.common.datasets import DataError
from fedssl.common.partition import SCHEMES, partition_indices

NUM_CLASSES = 10
LABELS = np.repeat(np.arange(NUM_CLASSES), 100)  # 1,000 samples, 100 per class
rng = np.random.default_rng(123)
LABELS = LABELS[rng.permutation(len(LABELS))]


def _parts(scheme, seed=0, n=10, **kw):
    return partition_indices(len(LABELS), LABELS, n, scheme, seed=seed, **kw)


def _max_class_fraction(parts):
    return float(np.mean([np.bincount(LABELS[p], minlength=NUM_CLASSES).max() / len(p) for p in parts]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_disjoint_complete_nonempty(scheme):
    parts = _parts(scheme)
    assert len(parts) == 10
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_by_seed(scheme):
    a, b, c = _parts(scheme, seed=1), _parts(scheme, seed=1), _parts(scheme, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_iid_without_labels_and_balanced_sizes():
    parts = partition_indices(1003, None, 10, "iid", seed=0)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 100 and sizes[-1] <= 101
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1003))


def test_dirichlet_skewed_iid_uniform():
    iid = _max_class_fraction(_parts("iid"))
    skew = _max_class_fraction(_parts("dirichlet", alpha=0.1))
    assert iid < 0.25  # uniform would be 0.1
    assert skew > 0.5
    # smaller alpha, more skew (averaged over seeds to be robust)
    mild = np.mean([_max_class_fraction(_parts("dirichlet", alpha=100.0, seed=s)) for s in range(3)])
    assert mild < 0.25


def test_dirichlet_many_partitions_small_alpha_nonempty():
    parts = partition_indices(len(LABELS), LABELS, 50, "dirichlet", alpha=0.1, seed=0)
    assert len(parts) == 50 and all(len(p) > 0 for p in parts)


def test_dirichlet_impossible_gives_clear_error():
    labels = np.zeros(12, dtype=np.int64)
    with pytest.raises(DataError, match="alpha"):
        partition_indices(12, labels, 12, "dirichlet", alpha=0.001, seed=0)


def test_shards_at_most_shards_per_client_classes():
    parts = _parts("shards", shards_per_client=2)  # 20 shards of 50: each shard is one class
    for p in parts:
        assert len(np.unique(LABELS[p])) <= 2
        assert len(p) == 100
    parts = _parts("shards", n=5, shards_per_client=1)  # 5 shards of 200: two classes each
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_accepts_label_list():
    parts = partition_indices(len(LABELS), LABELS.tolist(), 4, "shards", seed=0)
    assert sum(len(p) for p in parts) == len(LABELS)


@pytest.mark.parametrize("scheme", ["dirichlet", "shards"])
def test_labels_required(scheme):
    with pytest.raises(DataError, match=scheme):
        partition_indices(100, None, 4, scheme)


def test_unknown_scheme_lists_allowed():
    with pytest.raises(DataError) as err:
        partition_indices(100, None, 4, "pathological")
    assert "pathological" in str(err.value)
    for s in SCHEMES:
        assert s in str(err.value)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_more_partitions_than_samples(scheme):
    with pytest.raises(DataError, match="5 samples"):
        partition_indices(5, np.arange(5), 6, scheme)


def test_bad_arguments():
    with pytest.raises(DataError):
        partition_indices(10, None, 0, "iid")
    with pytest.raises(DataError):
        partition_indices(10, np.zeros(9), 2, "dirichlet")
    with pytest.raises(DataError):
        partition_indices(10, np.zeros(10), 2, "dirichlet", alpha=0)
    with pytest.raises(DataError):
        partition_indices(10, np.zeros(10), 4, "shards", shards_per_client=3)
