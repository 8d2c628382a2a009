import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

import fedssl.common.datasets as ds
import fedssl.common.folders as folders
import fedssl.common.torchvision_sources as torchvision_sources
from fedssl.common.datasets import SOURCES, DataError, ImageSet, load_eval_split, load_images

S = 16


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never write into the user's ~/.cache from tests."""
    monkeypatch.setenv("FEDSSL_CACHE_DIR", str(tmp_path / "default-cache"))


def _save(path: Path, img: Image.Image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


def _solid(colour, size=(20, 14)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _class_folder(root: Path, per_class: int = 3, classes=("cat", "ant", "bee")) -> Path:
    colours = {"ant": (255, 0, 0), "bee": (0, 0, 255), "cat": (0, 255, 0)}
    for c in classes:
        for i in range(per_class):
            _save(root / c / f"{i:03d}.png", _solid(colours.get(c, (i * 20, 100, 50))))
    return root


# --------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic():
    return load_images("synthetic", "", 32, seed=0), load_images("synthetic", "", 32, split="test", seed=0)


def test_synthetic_shapes_dtype_balance(synthetic):
    train, test = synthetic
    assert train.images.shape == (ds.SYNTHETIC_TRAIN_SIZE, 3, 32, 32)
    assert test.images.shape == (ds.SYNTHETIC_TEST_SIZE, 3, 32, 32)
    for part in (train, test):
        assert part.images.dtype == torch.uint8 and part.images.is_contiguous()
        assert part.labels.dtype == torch.int64
        assert part.classes == ds.SYNTHETIC_CLASSES and len(part.classes) == 10
        counts = torch.bincount(part.labels, minlength=10)
        assert counts.min() == counts.max() == len(part) // 10
        assert part.skipped == 0
    # images use the whole range and are not constant
    assert train.images.float().std() > 30


def test_synthetic_deterministic_by_seed(synthetic):
    train, test = synthetic
    again = load_images("synthetic", "ignored/path", 32, split="test", seed=0)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    other = load_images("synthetic", "", 32, seed=1, split="test")
    assert not torch.equal(other.images, test.images)
    assert not torch.equal(train.images[: len(test)], test.images)


def test_synthetic_colour_does_not_give_the_class(synthetic):
    train, _ = synthetic
    mean_rgb = train.images.float().mean(dim=(2, 3))  # [N, 3]
    per_class = torch.stack([mean_rgb[train.labels == c].mean(0) for c in range(10)])
    # class-average colours are all close to the global average colour
    assert (per_class - mean_rgb.mean(0)).abs().max() < 12


def test_synthetic_other_size_and_eval_split(monkeypatch):
    monkeypatch.setattr(ds, "SYNTHETIC_TRAIN_SIZE", 500)
    monkeypatch.setattr(ds, "SYNTHETIC_TEST_SIZE", 100)
    train, test = load_eval_split("synthetic", "", 24)
    assert train.images.shape == (500, 3, 24, 24) and test.images.shape == (100, 3, 24, 24)
    assert train.labels is not None and test.labels is not None
    assert train.classes == test.classes == ds.SYNTHETIC_CLASSES


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_class_subfolders(tmp_path):
    root = _class_folder(tmp_path / "data")
    _save(root / "bee" / "nested" / "deep.png", _solid((0, 0, 255)))  # recursive, class = first level
    (root / "notes.txt").write_text("not an image, ignored")
    out = load_images("imagefolder", str(root), S, cache_dir=str(tmp_path / "c"))
    assert out.classes == ("ant", "bee", "cat")
    assert out.images.shape == (10, 3, S, S) and out.images.dtype == torch.uint8
    assert out.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert out.skipped == 0
    # pixels follow the labels: ant red, bee blue, cat green
    dominant = out.images.float().mean(dim=(2, 3)).argmax(dim=1)
    assert dominant.tolist() == [0, 0, 0, 2, 2, 2, 2, 1, 1, 1]


def test_imagefolder_flat_is_unlabelled(tmp_path):
    for i in range(3):
        _save(tmp_path / "flat" / f"{i}.jpg", _solid((10 * i, 20, 30)))
    out = load_images("imagefolder", str(tmp_path / "flat"), S, cache_dir=str(tmp_path / "c"))
    assert out.labels is None and out.classes == () and len(out) == 3


def test_imagefolder_mixed_is_unlabelled(tmp_path):
    root = _class_folder(tmp_path / "mixed", per_class=1)
    _save(root / "loose.png", _solid((1, 2, 3)))
    out = load_images("imagefolder", str(root), S, cache_dir=str(tmp_path / "c"))
    assert out.labels is None and out.classes == () and len(out) == 4


def test_imagefolder_modes_and_sizes(tmp_path):
    root = tmp_path / "modes"
    _save(root / "grey.bmp", Image.new("L", (30, 20), 128))
    _save(root / "palette.gif", Image.new("RGB", (25, 25), (200, 10, 10)).convert("P"))
    _save(root / "transparent.png", Image.new("RGBA", (20, 20), (0, 0, 0, 0)))
    _save(root / "cmyk.jpg", Image.new("CMYK", (20, 20), (0, 255, 255, 0)))
    _save(root / "cmyk.tiff", Image.new("CMYK", (20, 20), (0, 255, 255, 0)))
    _save(root / "sixteen.png", Image.fromarray(np.full((20, 20), 65535, np.uint16)))
    _save(root / "tiny.png", Image.new("RGB", (1, 1), (0, 200, 0)))
    large = Image.new("RGB", (1000, 700), (255, 0, 0))
    large.paste((0, 255, 0), (0, 0, 140, 700))  # left band outside the centre crop (x 150..850)
    _save(root / "large.JPG", large, "JPEG")
    if features.check("webp"):
        _save(root / "pic.webp", Image.new("RGB", (20, 20), (0, 0, 255)))
    out = load_images("imagefolder", str(root), S, cache_dir=str(tmp_path / "c"))
    n = 8 + features.check("webp")
    assert out.images.shape == (n, 3, S, S) and out.images.dtype == torch.uint8
    assert out.skipped == 0 and out.labels is None
    names = sorted(p.name for p in root.iterdir())
    px = {name: out.images[i, :, S // 2, S // 2].tolist() for i, name in enumerate(names)}
    assert px["grey.bmp"] == [128, 128, 128]
    assert px["transparent.png"] == [255, 255, 255]  # composited over white
    assert px["sixteen.png"] == [255, 255, 255]  # 16-bit full scale -> 8-bit full scale
    assert px["tiny.png"] == [0, 200, 0]
    for name in ("cmyk.jpg", "cmyk.tiff"):
        r, g, b = px[name]
        assert r > 200 and g < 60 and b < 60
    big = out.images[names.index("large.JPG")].int()
    assert big[1].max() < 60 and big[0].min() > 200  # centre crop: red only, green band cut away


def test_imagefolder_sixteen_bit_mid_grey(tmp_path):
    _save(tmp_path / "g" / "a.png", Image.fromarray(np.full((10, 10), 32896, np.uint16)))
    out = load_images("imagefolder", str(tmp_path / "g"), S, cache_dir=str(tmp_path / "c"))
    assert out.images[0, :, 4, 4].tolist() == [128, 128, 128]


def test_imagefolder_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 10, 40, 20))  # stored: top red, bottom blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: left blue, right red
    path = tmp_path / "phone" / "photo.jpg"
    path.parent.mkdir()
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_images("imagefolder", str(path.parent), S, cache_dir=str(tmp_path / "c"))
    left, right = out.images[0, :, 8, 2].tolist(), out.images[0, :, 8, 13].tolist()
    assert left[2] > 200 and left[0] < 60
    assert right[0] > 200 and right[2] < 60


def test_imagefolder_bad_files_skipped_and_logged(tmp_path, caplog):
    root = tmp_path / "bad"
    _save(root / "good1.png", _solid((1, 2, 3)))
    _save(root / "good2.jpg", _solid((4, 5, 6)))
    (root / "zero.jpg").write_bytes(b"")
    full = root / "full.jpg"
    _save(full, Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    data = full.read_bytes()
    full.unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.png").write_text("hello, I am not a PNG")
    os.symlink(root / "does-not-exist.png", root / "broken.png")
    with caplog.at_level(logging.WARNING, logger="fedssl"):
        out = load_images("imagefolder", str(root), S, cache_dir=str(tmp_path / "c"))
    assert len(out) == 2 and out.skipped == 4
    logged = caplog.text
    for name in ("zero.jpg", "truncated.jpg", "text.png", "broken.png"):
        assert name in logged
    assert "good1.png" not in logged


def test_imagefolder_skipped_log_is_capped(tmp_path, caplog):
    root = tmp_path / "many-bad"
    _save(root / "ok.png", _solid((1, 2, 3)))
    for i in range(folders.MAX_SKIPPED_LOGGED + 5):
        (root / f"bad{i:02d}.png").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="fedssl"):
        out = load_images("imagefolder", str(root), S, cache_dir=str(tmp_path / "c"))
    assert out.skipped == folders.MAX_SKIPPED_LOGGED + 5
    assert len(caplog.records) == folders.MAX_SKIPPED_LOGGED + 1
    assert str(folders.MAX_SKIPPED_LOGGED + 5) in caplog.records[-1].getMessage()


def test_imagefolder_missing_empty_unusable(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_images("imagefolder", str(missing), S)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=str(empty)):
        load_images("imagefolder", str(empty), S)
    unusable = tmp_path / "unusable"
    unusable.mkdir()
    (unusable / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=str(unusable)):
        load_images("imagefolder", str(unusable), S, cache_dir=str(tmp_path / "c"))
    a_file = tmp_path / "file.png"
    a_file.write_text("x")
    with pytest.raises(DataError, match=str(a_file)):
        load_images("imagefolder", str(a_file), S)


def test_imagefolder_cache_hit_and_invalidation(tmp_path, monkeypatch):
    root = _class_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_images("imagefolder", str(root), S, cache_dir=str(cache))
    assert len(list(cache.glob("*.npy"))) == len(list(cache.glob("*.json"))) == 1

    real_decode = folders._decode_image

    def must_not_decode(path, size):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(folders, "_decode_image", must_not_decode)
    second = load_images("imagefolder", str(root), S, cache_dir=str(cache))
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes and second.skipped == first.skipped

    calls = []

    def counting(path, size):
        calls.append(path)
        return real_decode(path, size)

    monkeypatch.setattr(folders, "_decode_image", counting)
    changed = root / "ant" / "000.png"
    _save(changed, _solid((255, 255, 255), size=(21, 14)))
    os.utime(changed, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    third = load_images("imagefolder", str(root), S, cache_dir=str(cache))
    assert calls, "a changed file must invalidate the cache"
    assert third.images[0].min() == 255 and not torch.equal(third.images, first.images)
    assert len(list(cache.glob("*.npy"))) == len(list(cache.glob("*.json"))) == 1  # the stale one replaced
    assert not list(cache.glob("*.tmp"))

    # a different image size is a different cache entry
    calls.clear()
    other = load_images("imagefolder", str(root), S * 2, cache_dir=str(cache))
    assert calls and other.images.shape[-1] == S * 2


def test_imagefolder_cache_dir_from_env(tmp_path, monkeypatch):
    root = _class_folder(tmp_path / "data", per_class=1)
    monkeypatch.setenv("FEDSSL_CACHE_DIR", str(tmp_path / "envcache"))
    load_images("imagefolder", str(root), S)
    assert len(list((tmp_path / "envcache").glob("*.npy"))) == 1


def test_imagefolder_unwritable_cache_warns_and_continues(tmp_path, caplog):
    root = _class_folder(tmp_path / "data", per_class=1)
    not_a_dir = tmp_path / "cache-is-a-file"
    not_a_dir.write_text("x")
    with caplog.at_level(logging.WARNING, logger="fedssl"):
        out = load_images("imagefolder", str(root), S, cache_dir=str(not_a_dir))
    assert len(out) == 3
    assert "cache" in caplog.text


def test_imagefolder_corrupt_cache_is_ignored(tmp_path, caplog):
    root = _class_folder(tmp_path / "data", per_class=1)
    cache = tmp_path / "cache"
    # a copy: `first` maps the file cut short below, which no reader expects (common/image_cache.py)
    first = load_images("imagefolder", str(root), S, cache_dir=str(cache)).images.clone()
    (entry,) = cache.glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="fedssl"):
        again = load_images("imagefolder", str(root), S, cache_dir=str(cache))
    assert torch.equal(first, again.images)
    assert "cache" in caplog.text


def test_imagefolder_split_layout(tmp_path):
    root = tmp_path / "split"
    _class_folder(root / "train", per_class=2)
    _class_folder(root / "test", per_class=1, classes=("bee", "cat"))
    train = load_images("imagefolder", str(root), S, cache_dir=str(tmp_path / "c"))
    test = load_images("imagefolder", str(root), S, split="test", cache_dir=str(tmp_path / "c"))
    assert len(train) == 6 and train.classes == ("ant", "bee", "cat")
    assert len(test) == 2 and test.classes == ("bee", "cat")
    flat = _class_folder(tmp_path / "nosplit", per_class=1)
    with pytest.raises(DataError, match="load_eval_split"):
        load_images("imagefolder", str(flat), S, split="test")


def test_eval_split_uses_train_test_subfolders(tmp_path):
    root = tmp_path / "split"
    _class_folder(root / "train", per_class=2)
    _class_folder(root / "test", per_class=1, classes=("bee", "cat"))
    bank, query = load_eval_split("imagefolder", str(root), S, cache_dir=str(tmp_path / "c"))
    assert len(bank) == 6 and len(query) == 2
    assert bank.classes == query.classes == ("ant", "bee", "cat")
    assert query.labels.tolist() == [1, 2]  # remapped onto the train classes
    assert query.images.float().mean(dim=(2, 3)).argmax(dim=1).tolist() == [2, 1]  # bee blue, cat green


def test_eval_split_test_class_not_in_train(tmp_path):
    root = tmp_path / "split"
    _class_folder(root / "train", per_class=1, classes=("ant",))
    _class_folder(root / "test", per_class=1, classes=("ant", "bee"))
    with pytest.raises(DataError, match="bee"):
        load_eval_split("imagefolder", str(root), S, cache_dir=str(tmp_path / "c"))


def test_eval_split_stratified(tmp_path):
    root = _class_folder(tmp_path / "data", per_class=10)
    bank, query = load_eval_split("imagefolder", str(root), S, seed=3, cache_dir=str(tmp_path / "c"))
    assert len(bank) == 24 and len(query) == 6
    assert torch.bincount(bank.labels).tolist() == [8, 8, 8]
    assert torch.bincount(query.labels).tolist() == [2, 2, 2]
    assert bank.classes == query.classes == ("ant", "bee", "cat")
    again_bank, again_query = load_eval_split("imagefolder", str(root), S, seed=3, cache_dir=str(tmp_path / "c"))
    assert torch.equal(again_query.images, query.images)
    # every image is in exactly one part (images here differ only by class, so compare counts by class)
    full = load_images("imagefolder", str(root), S, cache_dir=str(tmp_path / "c"))
    assert len(bank) + len(query) == len(full)


def test_eval_split_unlabelled_folder(tmp_path):
    for i in range(4):
        _save(tmp_path / "flat" / f"{i}.png", _solid((i, i, i)))
    with pytest.raises(DataError, match="class subfolder"):
        load_eval_split("imagefolder", str(tmp_path / "flat"), S, cache_dir=str(tmp_path / "c"))


# --------------------------------------------------------------------------- errors, cifar, ImageSet


def test_unknown_source_lists_allowed():
    with pytest.raises(DataError) as err:
        load_images("imagenet", "/x", 32)
    assert "imagenet" in str(err.value)
    for s in SOURCES:
        assert s in str(err.value)
    with pytest.raises(DataError):
        load_eval_split("imagenet", "/x", 32)


def test_bad_size_and_split():
    with pytest.raises(DataError, match="image size"):
        load_images("synthetic", "", 2)
    with pytest.raises(DataError, match="split"):
        load_images("synthetic", "", 32, split="validation")


def test_cifar_download_failure_message(tmp_path, monkeypatch):
    def offline(source, root, train):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision_sources, "_torchvision_dataset", offline)
    target = tmp_path / "cifar-here"
    with pytest.raises(DataError) as err:
        load_images("cifar10", str(target), 32)
    msg = str(err.value)
    assert str(target) in msg and "imagefolder" in msg and "\n" not in msg


def test_imageset_subset():
    images = torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(4, 3, 8, 8)
    full = ImageSet(images, torch.tensor([0, 1, 0, 1]), ("a", "b"), skipped=2)
    part = full.subset(np.array([3, 1]))
    assert len(part) == 2 and torch.equal(part.images, images[[3, 1]]) and part.labels.tolist() == [1, 1]
    assert part.classes == ("a", "b") and part.images.is_contiguous()
    masked = full.subset(torch.tensor([True, False, True, False]))
    assert masked.labels.tolist() == [0, 0]
    unlabelled = ImageSet(images, None, ())
    assert unlabelled.subset([0]).labels is None
    with pytest.raises(ValueError):
        ImageSet(images.float(), None, ())


CIFAR10 = Path(os.environ.get("FEDSSL_CIFAR10_PATH", "/work/shared/datasets/cifar10"))


@pytest.mark.skipif(not (CIFAR10 / "test").is_dir(), reason="no CIFAR-10 image folder (set FEDSSL_CIFAR10_PATH)")
def test_real_cifar10_test_split(tmp_path):
    out = load_images("imagefolder", str(CIFAR10), 32, split="test", cache_dir=str(tmp_path / "c"))
    assert out.images.shape == (10_000, 3, 32, 32)
    assert len(out.classes) == 10 and out.skipped == 0
    assert torch.bincount(out.labels).tolist() == [1000] * 10



def test_max_images_takes_a_seeded_subset_in_order(synthetic):
    full = synthetic[0]
    assert len(ds.training_images("synthetic", "", 32, 0, seed=0)) == len(full)  # 0: all
    cut = ds.training_images("synthetic", "", 32, 100, seed=0)
    assert len(cut) == 100
    assert torch.equal(cut.images, full.sample(100, seed=0).images)
    assert not torch.equal(full.sample(100, seed=0).images, full.sample(100, seed=1).images)
    # the rows are the full set's rows, in their original order, with their labels
    position = {full.images[i].numpy().tobytes(): i for i in range(len(full))}
    picked = [position[cut.images[i].numpy().tobytes()] for i in range(100)]
    assert picked == sorted(picked)
    assert torch.equal(cut.labels, full.labels[picked])
    assert full.sample(10**9, seed=0) is full
