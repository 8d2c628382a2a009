"""Using the exported encoder: `fedssl evaluate` (kNN, linear probe, fine-tuning on a share of
the labels) and `fedssl embed` (.npz, .safetensors, .npy, .csv, .parquet) on real image
folders, the README's plain-torchvision loading snippet, and one-line errors for bad input."""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedssl.common.checkpoint import load_encoder
from fedssl.common.config import RunConfig
from fedssl.common.datasets import load_eval_split
from fedssl.common.downstream import finetune, labelled_fraction
from fedssl.common.datasets import load_images
from fedssl.common.device import set_threads
from fedssl.common.evaluation import embed
from fedssl.common.methods import build_method
from fedssl.common.synthetic import SYNTHETIC_CLASSES, render_synthetic
from fedssl.common.training import StepSettings, augmenter, train_epochs
from fedssl.server.run_dir import RunDir, summarize, weights_metadata
from fedssl.simulations.cli import main
from fedssl.common.synthetic import write_image_folder

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
    """An encoder after a short BYOL run on synthetic images, exported as a run exports it
    (the folder OUT/encoder)."""
    torch.manual_seed(0)
    cfg = RunConfig(image_size=IMAGE_SIZE, proj_dim=32, hidden_dim=64, batch_size=32)
    set_threads(int(THREADS))
    images = render_synthetic(torch.arange(CLASSES).repeat(32), IMAGE_SIZE,
                              torch.Generator().manual_seed(2))
    method = build_method(cfg)
    method.init_local()
    settings = StepSettings(batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    train_epochs(method, images, augmenter(cfg), epochs=4, settings=settings, device=torch.device("cpu"))
    out = RunDir(tmp_path_factory.mktemp("run") / "run")
    summary = summarize(cfg, [{"round": 1, "knn_top1": None}], seconds=1.0, encoder=out.encoder_dir,
                        out_dir=out.path, rounds=1)
    return out.export_encoder(method.shared_state(), weights_metadata(cfg, 1), summary)


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


def read_embeddings(out: Path) -> tuple[torch.Tensor, list[str]]:
    """The rows and their image paths from any format `embed` writes, read without fedssl."""
    if out.suffix == ".npz":
        with np.load(out) as saved:
            return torch.from_numpy(saved["embeddings"]), list(saved["paths"])
    if out.suffix == ".safetensors":
        with safe_open(str(out), framework="pt") as saved:
            return saved.get_tensor("embeddings"), json.loads(saved.metadata()["paths"])
    if out.suffix == ".npy":
        return torch.from_numpy(np.load(out)), json.loads(out.with_suffix(".json").read_text())["paths"]
    if out.suffix == ".csv":
        with out.open(newline="") as f:
            header, *rows = list(csv.reader(f))
        assert header[0] == "path" and header[1:] == [f"f{i}" for i in range(len(header) - 1)]
        return (torch.tensor(np.array([row[1:] for row in rows], dtype=np.float32)),
                [row[0] for row in rows])
    import pyarrow.parquet as pq
    table = pq.read_table(out)
    assert json.loads(table.schema.metadata[b"fedssl"])["encoder"] == "resnet10"
    return torch.tensor(table.column("embedding").to_pylist()), table.column("path").to_pylist()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".npy", ".csv", ".parquet"])
def test_embed_writes_one_row_per_image_with_its_path(encoder_file, labelled_folder, tmp_path,
                                                      capsys, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"features{suffix}"
    result = run_cli(capsys, "embed", str(encoder_file), str(labelled_folder), "--out", str(out),
                     "--threads", THREADS)
    features, paths = read_embeddings(out)
    files = sorted(p.relative_to(labelled_folder).as_posix() for p in labelled_folder.rglob("*.png"))
    assert paths == files and result["images"] == len(files) == CLASSES * PER_CLASS
    assert features.shape == (len(files), 512) == (result["images"], result["dim"])
    # row i is the embedding of paths[i], decoded at the encoder's image size; every format
    # holds the float32 values exactly (CSV too)
    expected = embed(load_encoder(encoder_file),
                     load_images("imagefolder", str(labelled_folder), IMAGE_SIZE).images)
    assert torch.equal(features, expected)


def test_parquet_without_pyarrow_is_one_line_naming_the_install(encoder_file, labelled_folder, tmp_path,
                                                                capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # imports as where it is not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert main(["embed", str(encoder_file), str(labelled_folder), "--out", str(tmp_path / "f.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("writing .parquet needs pyarrow, which is not installed: pip install pyarrow")
    assert "\n" not in err and not (tmp_path / "f.parquet").exists()


def test_the_readme_snippet_loads_the_exported_encoder_with_plain_torchvision(encoder_file):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using the encoder downstream", 1)[1].split("\n## ", 1)[0]
    code = next(block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "load_file" in block)
    assert 'Path("runs/my-run/encoder")' in code
    scope: dict = {}
    exec(code.replace("runs/my-run/encoder", str(encoder_file)), scope)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    ours = load_encoder(encoder_file).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        torch.testing.assert_close(scope["net"](images), ours(images), rtol=0, atol=1e-6)


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
    (lambda tmp, enc, folder: ["embed", str(enc), str(folder), "--out", str(tmp / "f.txt")],
     "must end in .npz, .safetensors, .npy, .csv or .parquet"),
    (lambda tmp, enc, folder: ["evaluate", str(tmp), "--data-path", str(folder)],
     "holds no model.safetensors (nor encoder/model.safetensors)"),
])
def test_bad_input_is_one_line_and_exit_2(encoder_file, labelled_folder, tmp_path, capsys,
                                          make_args, fragment):
    assert main(make_args(tmp_path, encoder_file, labelled_folder)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("fedssl: error:") and fragment in err and "\n" not in err, err
    assert captured.out == ""
