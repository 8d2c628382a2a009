"""The exported encoder folder (OUT/encoder: model.safetensors, config.json, README.md) of
federated and centralized runs, `fedssl.load_encoder`, and the model card's plain
safetensors + torchvision recipe, run as written."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fedssl
from fedssl.client.app import app as client_app
from fedssl.common.augment import MEAN, STD
from fedssl.common.checkpoint import load_weights
from fedssl.common.config import RunConfig
from fedssl.common.datasets import load_images
from fedssl.common.evaluation import embed
from fedssl.common.methods import METHODS, build_method
from fedssl.server.app import run_federation
from fedssl.server.evaluation import GlobalEvaluator
from fedssl.server.run_dir import RunDir, summarize, weights_metadata
from fedssl.simulations.centralized import run_centralized
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config

DESCRIPTION = "Shapes drawn by the test suite: 4 classes, 24 PNGs each."


@pytest.fixture(scope="module")
def federated_run(image_folder, tmp_path_factory) -> tuple[RunConfig, dict, Path]:
    out = tmp_path_factory.mktemp("fed") / "run"
    cfg = fast_config(image_folder, out, num_rounds=2, probe=True, data_description=DESCRIPTION)
    summary = run_federation(InProcessGrid(client_app, num_nodes=2), cfg)
    return cfg, summary, out


def card_recipe(card: str) -> str:
    """The card's plain-torchvision code block, as written."""
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    recipes = [code for code in blocks if "load_file" in code]
    assert len(recipes) == 1, blocks
    return recipes[0]


def test_a_run_exports_a_folder_in_the_hugging_face_layout(federated_run):
    cfg, summary, out = federated_run
    folder = out / "encoder"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert summary["encoder"] == str(folder)

    # the weights: the final global encoder under torchvision's names, header with "format": "pt"
    weights, meta = load_weights(folder / "model.safetensors")
    final, _ = load_weights(out / "checkpoint.safetensors")
    assert weights.keys() == {k[len("encoder."):] for k in final if k.startswith("encoder.")}
    assert all(torch.equal(weights[k], final["encoder." + k]) for k in weights)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    assert (meta["encoder"], meta["image-size"], meta["round"]) == ("resnet10", 16, 2)

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet10" and config["blocks_per_stage"] == [1, 1, 1, 1]
    # up to 64 px resnet10 has a 3x3 stride-2 stem without max-pool
    assert config["stem"] == {"conv1": {"kernel_size": 3, "stride": 2, "padding": 1}, "maxpool": False}
    assert (config["image_size"], config["mean"], config["std"]) == (16, list(MEAN), list(STD))
    assert config["num_features"] == 512 and "global-average-pooled" in config["features"]
    assert (config["method"], config["strategy"], config["rounds"]) == ("byol", "fedavg", 2)
    assert config["knn_top1"] == summary["final"]["knn_top1"] is not None
    assert config["probe_top1"] == summary["final"]["probe_top1"] is not None
    assert config["dp"] == "none" and config["dp_epsilon"] is None
    assert config["data_description"] == DESCRIPTION
    assert config["fedssl_version"] not in ("", None)

    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: fedssl\n")
    assert DESCRIPTION in card and "No description" not in card
    assert f"{summary['final']['knn_top1']:.4f}" in card and f"{summary['final']['probe_top1']:.4f}" in card
    assert "One run with one seed (0)" in card and "do not show" in card
    assert "trained without differential privacy" in card

    # earlier readers' file: the same bytes
    assert (out / "encoder.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_load_encoder_gives_the_runs_own_features(federated_run, image_folder):
    cfg, summary, out = federated_run
    method = build_method(cfg)  # the run's final global model, from its checkpoint
    method.load_partial(load_weights(out / "checkpoint.safetensors")[0])
    images = load_images("imagefolder", str(image_folder), cfg.image_size).images
    expected = embed(method.encoder, images)
    for path in (out / "encoder", out / "encoder" / "model.safetensors"):
        encoder = fedssl.load_encoder(path)
        assert isinstance(encoder, torch.nn.Module) and not encoder.training
        assert not any(m.training for m in encoder.modules())
        assert torch.equal(embed(encoder, images), expected)
    # and the same kNN the run reported for its final round
    method.encoder = fedssl.load_encoder(out / "encoder")
    assert GlobalEvaluator(cfg, torch.device("cpu"))(method)["knn_top1"] == summary["final"]["knn_top1"]


def test_the_model_card_recipe_loads_the_weights_with_plain_torchvision(federated_run, monkeypatch):
    _, _, out = federated_run
    folder = out / "encoder"
    monkeypatch.chdir(folder)  # the card says: run in this folder
    scope: dict = {}
    exec(card_recipe((folder / "README.md").read_text()), scope)
    net = scope["net"]
    assert type(net).__module__ == "torchvision.models.resnet" and not net.training
    images = torch.rand(3, 3, 16, 16)
    # fedssl's copy computes in channels_last, whose kernels round differently: compare like with like
    ours = fedssl.load_encoder(folder).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        torch.testing.assert_close(net(images), ours(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("encoder, image_size", [("resnet18", 32), ("mobilenet_v3_small", 32),
                                                 ("resnet10", 96)])
def test_the_recipe_follows_each_encoders_stem(encoder, image_size, tmp_path, monkeypatch):
    cfg = RunConfig(encoder=encoder, image_size=image_size, proj_dim=16, hidden_dim=32)
    method = build_method(cfg)
    with torch.no_grad():  # statistics a fresh torchvision model does not have
        for module in method.encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    history = [{"round": 0, "knn_top1": 0.25}, {"round": 1, "knn_top1": 0.5}]
    out = RunDir(tmp_path / "run")
    summary = summarize(cfg, history, seconds=1.0, encoder=out.encoder_dir, out_dir=out.path, rounds=1)
    folder = out.export_encoder(method.shared_state(), weights_metadata(cfg, 1), summary)
    config = json.loads((folder / "config.json").read_text())
    if encoder == "resnet18":  # the CIFAR stem: 3x3 stride 1, no max-pool
        assert config["stem"] == {"conv1": {"kernel_size": 3, "stride": 1, "padding": 1}, "maxpool": False}
    elif encoder == "resnet10":  # above 64 px, torchvision's own stem
        assert config["stem"] == {"conv1": {"kernel_size": 7, "stride": 2, "padding": 3}, "maxpool": True}
    else:
        assert config["stem"] == {"features.0.0": {"stride": 1}} and config["num_features"] == 576
    card = (folder / "README.md").read_text()
    assert "No description of the training data was given" in card  # none given here
    monkeypatch.chdir(folder)
    scope: dict = {}
    exec(card_recipe(card), scope)
    images = torch.rand(2, 3, image_size, image_size)
    ours = method.encoder.eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        torch.testing.assert_close(scope["net"](images), ours(images), rtol=0, atol=1e-6)


def test_the_centralized_baseline_exports_the_same_folder(small_image_folder, tmp_path):
    cfg = fast_config(small_image_folder, tmp_path / "run", num_rounds=1, fraction_train=1.0)
    summary = run_centralized(cfg)
    folder = tmp_path / "run" / "encoder"
    config = json.loads((folder / "config.json").read_text())
    assert (config["strategy"], config["rounds"]) == ("centralized", summary["epochs"])
    assert config["knn_top1"] == summary["final"]["knn_top1"] is not None
    assert config["data_description"] is None
    assert "No description of the training data was given" in (folder / "README.md").read_text()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fedssl.load_encoder(folder)(images),
                                   fedssl.load_encoder(tmp_path / "run")(images), rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_family_trains_under_the_centralized_baseline_and_exports(small_image_folder, tmp_path, method):
    """`fedssl centralized --method X` alone, for every family: its default encoder (MAE's
    ViT), its views, one epoch; the exported encoder loads and is not the untrained one."""
    cfg = fast_config(small_image_folder, tmp_path / "run", method=method, num_rounds=1, fraction_train=1.0,
                      encoder="auto")
    summary = run_centralized(cfg)
    assert summary["final"]["round"] == summary["epochs"] == 1
    assert math.isfinite(summary["final"]["train_loss"])
    torch.manual_seed(cfg.seed)  # as run_centralized builds it: the untrained model
    untrained = build_method(cfg).encoder.eval()
    trained = fedssl.load_encoder(tmp_path / "run" / "encoder")
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(trained(images), untrained(images))


def test_a_dp_run_writes_its_epsilon(small_image_folder, tmp_path):
    cfg = fast_config(small_image_folder, tmp_path / "run", dp="fixed", dp_clip_norm=0.05,
                      num_rounds=1, max_update_norm_ratio=0.0, amp=False)
    summary = run_federation(InProcessGrid(client_app, num_nodes=2), cfg)
    config = json.loads((tmp_path / "run" / "encoder" / "config.json").read_text())
    assert config["dp"] == "fixed" and config["dp_epsilon"] == summary["privacy"]["epsilon"] > 0
    assert config["dp_delta"] == cfg.dp_delta
    card = (tmp_path / "run" / "encoder" / "README.md").read_text()
    assert f"epsilon {summary['privacy']['epsilon']:.3g}" in card
