"""Real image sizes end to end (issue 17): folders of 256-px JPEGs, as sites hold them, trained
at `image-size` 96 in a simulated federation and at 224 by deployed sites reading their own
folders, then `fedssl evaluate` and `fedssl embed` on the exported encoder; above 64 px every
encoder has torchvision's standard stem (common/encoders.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import fedssl
from fedssl.client.app import app as client_app
from fedssl.common.augment import normalize
from fedssl.common.encoders import build_encoder, describe_encoder
from fedssl.common.evaluation import embed
from fedssl.common.folders import load_folder_with_paths
from fedssl.server.app import run_federation
from conftest import fast_config
from fedssl.simulations.inprocess_grid import InProcessGrid

SHAPES = ("disc", "square", "bars", "ring")


def jpeg_folder(root: Path, per_class: int, seed: int) -> Path:
    """Labelled photographs-to-be: a class's shape drawn at a random place, size and colour on a
    noisy background, 256x256 JPEGs (every fourth 320x240, so decoding crops too)."""
    rng = np.random.default_rng(seed)
    for c, shape in enumerate(SHAPES):
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (320, 240) if i % 4 == 3 else (256, 256)
            background = rng.integers(0, 96, (h, w, 3), dtype=np.uint8)
            image = Image.fromarray(background)
            draw = ImageDraw.Draw(image)
            side = int(rng.integers(80, 160))
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            colour = tuple(int(v) for v in rng.integers(128, 256, 3))
            box = (x, y, x + side, y + side)
            if shape == "disc":
                draw.ellipse(box, fill=colour)
            elif shape == "square":
                draw.rectangle(box, fill=colour)
            elif shape == "bars":
                for k in range(0, side, 24):
                    draw.rectangle((x + k, y, x + k + 10, y + side), fill=colour)
            else:
                draw.ellipse(box, outline=colour, width=14)
            image.save(root / shape / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return jpeg_folder(tmp_path_factory.mktemp("photos"), per_class=8, seed=0)


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sites")
    return [jpeg_folder(root / f"site{i}", per_class=4, seed=10 + i) for i in range(2)]


@pytest.mark.parametrize("name", ["resnet10", "resnet18", "mobilenet_v3_small"])  # the ones with two stems
def test_above_64_px_every_encoder_has_the_standard_stem(name):
    for size in (96, 224):
        stem = describe_encoder(name, size)["stem"]
        if "conv1" in stem:  # resnets: torchvision's 7x7 stride-2 conv1 and its max-pool
            assert stem == {"conv1": {"kernel_size": 7, "stride": 2, "padding": 3}, "maxpool": True}
        else:
            assert stem == {"features.0.0": {"stride": 2}}
    assert describe_encoder(name, 64)["stem"] != describe_encoder(name, 96)["stem"]  # the small-input stem
    encoder, dim = build_encoder(name, 224)
    with torch.no_grad():
        assert encoder.eval()(normalize(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))).shape == (1, dim)


def test_a_federation_at_96_px_then_evaluate_and_embed(photos, tmp_path, one_thread):
    out = tmp_path / "run"
    cfg = fast_config(photos, out, image_size=96, num_rounds=1, batch_size=8, threads=1)
    run_federation(InProcessGrid(client_app, num_nodes=2), cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["clients_ok"] == 2 and rows[-1]["finite"]
    config = json.loads((out / "encoder" / "config.json").read_text())
    assert config["image_size"] == 96 and config["stem"]["conv1"]["kernel_size"] == 7

    scores = fedssl.evaluate(out / "encoder", data_path=str(photos), knn_k=5, threads=1)
    assert scores["classes"] == 4 and 0.0 <= scores["knn_top1"] <= 1.0
    result = fedssl.embed(out / "encoder", photos, tmp_path / "features.npy", threads=1)
    assert (result["images"], result["dim"]) == (32, 512)
    decoded, paths = load_folder_with_paths(str(photos), 96)  # the embedding is of 96-px images
    assert decoded.images.shape == (32, 3, 96, 96)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "features.npy")),
                       embed(fedssl.load_encoder(out / "encoder"), decoded.images))


def test_deployed_sites_train_their_own_224_px_folders(photos, sites, tmp_path, one_thread):
    """Each site's ClientApp reads its own folder (node config `data-path`) at 224 px; the
    mobile encoder, whose stem at 224 is torchvision's (stride 2), keeps it quick."""
    out = tmp_path / "run"
    cfg = fast_config(photos, out, image_size=224, encoder="mobilenet_v3_small", num_rounds=1,
                      batch_size=8, threads=1, eval_bank_size=16, eval_query_size=8)
    replies = []

    def site(message, context):
        replies.append(client_app(message, context))
        return replies[-1]

    run_federation(InProcessGrid(site, num_nodes=2, node_config=lambda i: {"data-path": str(sites[i])}), cfg)
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["clients_ok"] == 2 and row["finite"] and row["skipped_images"] == 0
    assert [r.content["metrics"]["num-examples"] for r in replies] == [16, 16]  # each its own folder
    config = json.loads((out / "encoder" / "config.json").read_text())
    assert config["image_size"] == 224 and config["stem"] == {"features.0.0": {"stride": 2}}
    scores = fedssl.evaluate(out / "encoder", data_path=str(sites[0]), knn_k=3, threads=1)
    assert scores["classes"] == 4 and 0.0 <= scores["knn_top1"] <= 1.0
