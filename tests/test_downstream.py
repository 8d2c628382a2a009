"""Using the exported encoder: `fedssl evaluate` (kNN, linear probe, fine-tuning on a share of
the labels) and `fedssl embed` on real image folders, the README's plain-torchvision loading
snippet, and one-line errors for bad input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from common.checkpoint import export_encoder, load_encoder
from common.config import RunConfig
from common.datasets import load_eval_split
from common.downstream import finetune, labelled_fraction
from common.datasets import load_images
from common.device import set_threads
from common.evaluation import embed
from common.methods import build_method
from common.synthetic import SYNTHETIC_CLASSES, render_synthetic
from common.training import augmenter, train_epochs
from server.run_dir import weights_metadata
from simulations.cli import main
from conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
CLASSES = len(SYNTHETIC_CLASSES)
PER_CLASS = 60
BEATS_CHANCE = 0.175
# One thread: where the cores are shared, two threads wait on each other (20x slower here).
THREADS = "1"


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    """10 classes x 60 PNGs: 120 held-out queries, where a classifier at chance (0.1) scores
    above BEATS_CHANCE less than once in 200 draws."""
    return write_image_folder(tmp_path_factory.mktemp("labelled"), per_class=PER_CLASS, seed=1,
                              classes=CLASSES)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    """An encoder after a short BYOL run on synthetic images, exported as a run exports it."""
    torch.manual_seed(0)
    cfg = RunConfig(image_size=IMAGE_SIZE, proj_dim=32, hidden_dim=64, batch_size=32)
    set_threads(int(THREADS))
    images = render_synthetic(torch.arange(CLASSES).repeat(32), IMAGE_SIZE,
                              torch.Generator().manual_seed(2))
    method = build_method(cfg)
    method.init_local()
    train_epochs(method, images, augmenter(cfg), epochs=4, batch_size=cfg.batch_size, lr=cfg.lr,
                 momentum=cfg.momentum, weight_decay=cfg.weight_decay, device=torch.device("cpu"))
    path = tmp_path_factory.mktemp("run") / "encoder.safetensors"
    export_encoder(path, method.shared_state(), weights_metadata(cfg, 1))
    return path


def run_cli(capsys, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_reports_knn_and_probe_above_chance(encoder_file, labelled_folder, capsys):
    result = run_cli(capsys, "evaluate", str(encoder_file), "--data-path", str(labelled_folder),
                     "--knn-k", "20", "--threads", THREADS)
    assert (result["classes"], result["train_images"], result["test_images"]) == (CLASSES, 480, 120)
    for key in ("knn_top1", "probe_top1"):
        assert BEATS_CHANCE <= result[key] <= 1.0, result
    assert "finetune_top1" not in result


def test_evaluate_uses_a_train_test_layout_as_the_split(encoder_file, labelled_folder, tmp_path, capsys):
    split = tmp_path / "split"
    for part, seed in (("train", 3), ("test", 4)):
        write_image_folder(split / part, per_class=3, seed=seed, classes=CLASSES)
    result = run_cli(capsys, "evaluate", str(encoder_file), "--data-path", str(split), "--knn-k", "5",
                     "--threads", THREADS)
    assert (result["train_images"], result["test_images"]) == (3 * CLASSES, 3 * CLASSES)
    assert 0.0 <= result["knn_top1"] <= 1.0 and 0.0 <= result["probe_top1"] <= 1.0


def test_labels_fraction_fine_tunes_on_a_balanced_share(encoder_file, labelled_folder, capsys):
    result = run_cli(capsys, "evaluate", str(encoder_file), "--data-path", str(labelled_folder),
                     "--labels-fraction", "0.1", "--epochs", "2", "--batch-size", "16",
                     "--threads", THREADS)
    # 48 train images a class (the seeded 80/20 split), 10% of them each
    assert result["labels_fraction"] == 0.1 and result["labelled_images"] == 5 * CLASSES
    assert 0.0 <= result["finetune_top1"] <= 1.0


def test_fine_tuning_changes_the_encoder_weights_not_just_a_head(encoder_file, labelled_folder):
    encoder = load_encoder(encoder_file)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train, test = load_eval_split("imagefolder", str(labelled_folder), IMAGE_SIZE)
    accuracy = finetune(encoder, train.subset(labelled_fraction(train.labels, 0.1, 0)), test,
                        epochs=2, batch_size=16)
    assert 0.0 <= accuracy <= 1.0
    changed = [k for k, v in encoder.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, before[k])]
    assert any(k.startswith("conv1.") for k in changed) and any(k.startswith("layer4.") for k in changed)


def test_labelled_fraction_is_seeded_and_class_balanced():
    labels = torch.tensor([0] * 100 + [1] * 10 + [2] * 3)
    picked = labelled_fraction(labels, 0.1, seed=5)
    assert torch.bincount(labels[picked]).tolist() == [10, 1, 1]  # at least one of each class
    assert torch.equal(picked, labelled_fraction(labels, 0.1, seed=5))
    assert not torch.equal(picked, labelled_fraction(labels, 0.1, seed=6))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_embed_writes_one_row_per_image_with_its_path(encoder_file, labelled_folder, tmp_path,
                                                      capsys, suffix):
    out = tmp_path / f"features{suffix}"
    result = run_cli(capsys, "embed", str(encoder_file), str(labelled_folder), "--out", str(out),
                     "--threads", THREADS)
    if suffix == ".npz":
        with np.load(out) as saved:
            features, paths = torch.from_numpy(saved["embeddings"]), list(saved["paths"])
    else:
        with safe_open(str(out), framework="pt") as saved:
            features, paths = saved.get_tensor("embeddings"), json.loads(saved.metadata()["paths"])
    files = sorted(p.relative_to(labelled_folder).as_posix() for p in labelled_folder.rglob("*.png"))
    assert paths == files and result["images"] == len(files) == CLASSES * PER_CLASS
    assert features.shape == (len(files), 512) == (result["images"], result["dim"])
    # row i is the embedding of paths[i], decoded at the encoder's image size
    expected = embed(load_encoder(encoder_file),
                     load_images("imagefolder", str(labelled_folder), IMAGE_SIZE).images)
    torch.testing.assert_close(features, expected)


def test_the_readme_snippet_loads_the_exported_encoder_with_plain_torchvision(encoder_file):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using the encoder downstream", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "runs/my-run/encoder.safetensors" in code
    scope: dict = {}
    exec(code.replace("runs/my-run/encoder.safetensors", str(encoder_file)), scope)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scope["net"].eval()(images), load_encoder(encoder_file).eval()(images))


@pytest.mark.parametrize("make_args, fragment", [
    (lambda tmp, enc, folder: ["evaluate", str(tmp / "none.safetensors"), "--data-path", str(folder)],
     "does not exist"),
    (lambda tmp, enc, folder: ["evaluate", str(folder / "disc" / "0000.png"), "--data-path", str(folder)],
     "is not an encoder exported by fedssl"),
    (lambda tmp, enc, folder: ["evaluate", str(enc), "--data-path", str(tmp)], "no images in folder"),
    (lambda tmp, enc, folder: ["evaluate", str(enc), "--data-path", str(folder),
                               "--labels-fraction", "1.5"], "must be in (0, 1]"),
    (lambda tmp, enc, folder: ["evaluate", str(enc), "--data-path", str(folder),
                               "--labels-fraction", "ten"], "is not a number"),
    (lambda tmp, enc, folder: ["embed", str(enc), str(tmp), "--out", str(tmp / "f.npz")],
     "no images in folder"),
    (lambda tmp, enc, folder: ["embed", str(enc), str(folder), "--out", str(tmp / "f.csv")],
     "must end in .npz or .safetensors"),
])
def test_bad_input_is_one_line_and_exit_2(encoder_file, labelled_folder, tmp_path, capsys,
                                          make_args, fragment):
    assert main(make_args(tmp_path, encoder_file, labelled_folder)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("fedssl: error:") and fragment in err and "\n" not in err, err
    assert captured.out == ""
