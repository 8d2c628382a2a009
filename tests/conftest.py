"""Shared fixtures: small real image folders, a private image cache, tiny run configs."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from fedssl.common.config import RunConfig
from fedssl.common.synthetic import write_image_folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Never write into the user's ~/.cache from tests."""
    monkeypatch.setenv("FEDSSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "image-cache"))


@pytest.fixture
def one_thread():
    """One torch thread, as a client with threads=1 sets it: tiny steps, no pool to wake."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fedssl_log(caplog):
    """caplog, also when the fedssl logger does not propagate (common/logs.py)."""
    logger = logging.getLogger("fedssl")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="fedssl")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """4 classes x 24 images: enough for 3 clients and a kNN bank, small enough for seconds."""
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=24)


@pytest.fixture(scope="session")
def small_image_folder(tmp_path_factory) -> Path:
    """4 classes x 6 images, for tests that run several whole federations."""
    return write_image_folder(tmp_path_factory.mktemp("small-images"), per_class=6)


def fast_config(folder: Path, out: Path, **changes) -> RunConfig:
    """tiny_config at 16 px, one thread and no probe: a whole round in well under a second."""
    base = dict(image_size=16, batch_size=4, threads=1, probe=False, knn_k=5)
    return tiny_config(folder, out, **{**base, **changes})


def tiny_config(folder: Path, out: Path, **changes) -> RunConfig:
    """A run that takes seconds: the compact encoder, small heads, small batches; BYOL, the
    method with client-side state (its EMA target), which the federation tests exercise."""
    base = dict(method="byol", dataset="imagefolder", data_path=str(folder), eval_path=str(folder),
                proj_dim=32, hidden_dim=64, batch_size=8, num_rounds=2, min_train_clients=2,
                fraction_train=1.0,
                knn_k=10, out_dir=str(out), node_wait_timeout=5.0, seed=0, threads=2)
    base.update(changes)
    return RunConfig(**base)


def cifar10_path() -> Path | None:
    path = os.environ.get("FEDSSL_CIFAR10_PATH")
    return Path(path) if path and Path(path, "train").is_dir() else None
