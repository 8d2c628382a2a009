"""Held-out images are never trained on: when the server's evaluation split is carved from
the images the clients train on, its query / probe-test side is left out of every client's
partition and of the centralized baseline's pool; folders that overlap otherwise are refused."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedssl.client.local_data import local_images
from fedssl.common.config import ConfigError
from fedssl.common.datasets import load_eval_split, load_images
from fedssl.common.synthetic import write_image_folder
from conftest import fast_config
from fedssl.server.evaluation import GlobalEvaluator, eval_source

CLIENTS = 3
REPO = Path(__file__).resolve().parents[1]


def rows(images) -> set[bytes]:
    """Pixel content of every image: identifies an image in a set of distinct images.
    (`[:]` reads them all: a client's images are read from the image cache on demand.)"""
    return {r.tobytes() for r in images.images[:].reshape(len(images), -1).numpy()}


def trained_on(cfg, clients: int = CLIENTS) -> set[bytes]:
    """The union of the images the simulated clients train on (client/app.py's `local_images`)."""
    parts = [local_images(cfg, {"partition-id": i, "num-partitions": clients}) for i in range(clients)]
    return set().union(*(rows(p) for p in parts))


def server_queries(cfg) -> set[bytes]:
    return rows(GlobalEvaluator(cfg, torch.device("cpu")).query)


@pytest.mark.parametrize("eval_path", ["the data folder", "a link to it", ""])
def test_no_query_of_a_flat_folder_is_trained_on(image_folder, tmp_path, eval_path):
    link = tmp_path / "link"
    link.symlink_to(image_folder, target_is_directory=True)
    evaluation = {"the data folder": str(image_folder), "a link to it": str(link), "": ""}[eval_path]
    cfg = fast_config(image_folder, tmp_path, eval_path=evaluation)
    full = rows(load_images("imagefolder", str(image_folder), cfg.image_size))
    assert len(full) == 96  # distinct images, so pixel content tells them apart
    trained, queries = trained_on(cfg), server_queries(cfg)
    assert len(queries) == 20  # 20% of 24 images in each of 4 classes
    assert len(trained & queries) == 0
    assert trained | queries == full  # nothing but the held-out images is left out


def test_max_images_draws_from_the_images_left_for_training(image_folder, tmp_path):
    cfg = fast_config(image_folder, tmp_path, max_images=60)
    trained = trained_on(cfg)
    assert len(trained) == 60 and len(trained & server_queries(cfg)) == 0


def test_no_query_of_the_synthetic_source_is_trained_on(tmp_path):
    cfg = fast_config(tmp_path, tmp_path, dataset="synthetic", data_path="", eval_path="",
                      max_images=0, eval_query_size=2_000)
    trained, queries = trained_on(cfg), server_queries(cfg)
    assert len(trained) == 10_000 and len(queries) == 2_000
    assert len(trained & queries) == 0


def test_centralized_pools_what_the_clients_train_on(image_folder, tmp_path):
    from fedssl.simulations.centralized import pooled_images

    cfg = fast_config(image_folder, tmp_path)
    pooled = rows(pooled_images(cfg))
    assert pooled == trained_on(cfg)
    assert len(pooled & server_queries(cfg)) == 0


def test_a_train_test_layout_keeps_every_training_image(tmp_path):
    root = tmp_path / "layout"
    write_image_folder(root / "train", per_class=6)
    write_image_folder(root / "test", per_class=2, seed=1)
    for data, evaluation in ((root, ""), (root / "train", root)):
        cfg = fast_config(data, tmp_path, eval_path=str(evaluation))
        train = rows(load_images("imagefolder", str(root / "train"), cfg.image_size))
        assert trained_on(cfg) == train
        assert len(train & server_queries(cfg)) == 0


def test_clients_and_server_hold_out_the_same_images_without_talking(image_folder, tmp_path):
    """Clients in a fresh process (as a simulation actor or a ClientApp process is) leave out
    exactly the images the server holds out, from the seed alone."""
    seeds = (5, 6)
    configs = [fast_config(image_folder, tmp_path, seed=seed) for seed in seeds]
    script = (
        "import hashlib, json, sys\n"
        "from client.local_data import local_images\n"
        "from common.config import RunConfig\n"
        "def trained(cfg):\n"
        f"    parts = [local_images(cfg, {{'partition-id': i, 'num-partitions': {CLIENTS}}}) "
        f"for i in range({CLIENTS})]\n"
        "    return sorted({hashlib.sha1(r.tobytes()).hexdigest() for p in parts "
        "for r in p.images[:].reshape(len(p), -1).numpy()})\n"
        "print(json.dumps([trained(RunConfig.from_mapping(m)) for m in json.loads(sys.argv[1])]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps([c.to_mapping() for c in configs])],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    client_side = [set(digests) for digests in json.loads(done.stdout)]

    def digests(images) -> set[str]:
        return {hashlib.sha1(r).hexdigest() for r in rows(images)}

    full = digests(load_images("imagefolder", str(image_folder), 16))
    held_out = []
    for cfg, trained in zip(configs, client_side):
        _, query = load_eval_split(*eval_source(cfg), cfg.image_size, seed=cfg.seed)
        held_out.append(digests(query))
        assert full - trained == held_out[-1]
    assert held_out[0] != held_out[1]  # the seed decides the split


def _overlapping(tmp_path: Path) -> list[tuple[Path, Path]]:
    labelled = write_image_folder(tmp_path / "labelled", per_class=6)
    layout = tmp_path / "layout"
    write_image_folder(layout / "train", per_class=6)
    write_image_folder(layout / "test", per_class=2, seed=1)
    outer = tmp_path / "outer"
    write_image_folder(outer / "inner", per_class=6, seed=2)
    return [
        (labelled / "disc", labelled),  # training folder inside the evaluation folder
        (layout / "test", layout),  # training on the test/ half of a train/ + test/ folder
        (outer, outer / "inner"),  # evaluation folder inside the training folder
    ]


def test_folders_that_overlap_otherwise_are_refused_on_both_sides(tmp_path):
    for data, evaluation in _overlapping(tmp_path):
        cfg = fast_config(data, tmp_path, eval_path=str(evaluation))
        for side in (lambda: eval_source(cfg),
                     lambda: local_images(cfg, {"partition-id": 0, "num-partitions": 2})):
            with pytest.raises(ConfigError) as err:
                side()
            message = str(err.value)
            assert "data-path" in message and "eval-path" in message and "\n" not in message
            assert str(data) in message and str(evaluation) in message
