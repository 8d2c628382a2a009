"""The decoded-image cache (common/image_cache.py): an .npy that every process maps and reads
through the page cache, with a .json beside it; decoded once, written atomically, invalidated
when a file changes; read a batch at a time (ImageRows) where a client trains on it."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fedssl.common.folders as folders
import fedssl.common.image_set as image_set
from fedssl.common.config import RunConfig
from fedssl.common.datasets import DataError, load_images
from fedssl.common.folders import load_folder_with_paths
from fedssl.common.methods import build_method
from fedssl.common.training import StepSettings, augmenter, train_epochs
from fedssl.client.local_data import local_images

S = 16


def noise_folder(root: Path, per_class: int = 6, classes: int = 3, seed: int = 0) -> Path:
    """Distinct images (random pixels), class subfolders, PNG so decoding is exact."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (S + 3, S, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i:03d}.png")
    return root


def entry_files(cache: Path) -> list[str]:
    return sorted(p.suffix for p in cache.iterdir())


def test_the_cache_is_an_npy_and_a_json_holding_what_decoding_gives(tmp_path):
    root, cache = noise_folder(tmp_path / "data"), tmp_path / "cache"
    images = load_images("imagefolder", str(root), S, cache_dir=str(cache))
    assert entry_files(cache) == [".json", ".npy"]
    (npy,) = cache.glob("*.npy")
    decoded, _ = load_folder_with_paths(str(root), S)
    on_disk = np.load(npy, mmap_mode="r")  # any numpy reads it
    assert on_disk.shape == (18, 3, S, S) and np.array_equal(on_disk, decoded.images.numpy())
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["classes"] == ["c0", "c1", "c2"] and meta["labels"] == decoded.labels.tolist()
    assert torch.equal(images.images, decoded.images) and torch.equal(images.labels, decoded.labels)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_loaded_folder_maps_the_cache_file_instead_of_copying_it(tmp_path):
    root, cache = noise_folder(tmp_path / "data"), tmp_path / "cache"
    load_images("imagefolder", str(root), S, cache_dir=str(cache))
    images = load_images("imagefolder", str(root), S, cache_dir=str(cache)).images  # from the cache
    (npy,) = cache.glob("*.npy")
    start = images.data_ptr()
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, path = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in span.split("-"))
        if path.strip() == str(npy):
            mapped.append((low, high))
    assert any(low <= start and start + images.numel() <= high for low, high in mapped)
    # copy-on-write: a caller that writes to its images changes neither the file nor other readers
    before = np.load(npy).copy()
    images[0].fill_(7)
    assert np.array_equal(np.load(npy), before)
    assert not torch.equal(load_images("imagefolder", str(root), S, cache_dir=str(cache)).images[0], images[0])


def test_rows_read_on_demand_are_the_rows_asked_for(tmp_path):
    full = load_images("imagefolder", str(noise_folder(tmp_path / "data")), S, cache_dir=str(tmp_path / "c"))
    rows = full.read_on_demand().images
    assert isinstance(rows, image_set.ImageRows) and rows.shape == full.images.shape and len(rows) == 18
    tensor = full.images
    index = torch.tensor([5, 0, 17, 5, 6, 7, 8, -1])  # unsorted, repeated, a run, negative
    assert torch.equal(rows[index], tensor[index])
    assert torch.equal(rows[2:11:3], tensor[2:11:3]) and torch.equal(rows[:], tensor)
    assert torch.equal(rows[3], tensor[3]) and torch.equal(rows[np.array([4, 1])], tensor[[4, 1]])
    mask = torch.arange(18) % 4 == 1
    assert torch.equal(rows[mask], tensor[mask])
    assert rows[torch.tensor([], dtype=torch.long)].shape == (0, 3, S, S)
    # subsets of subsets stay unread until indexed, and index the rows they were given
    part = full.read_on_demand().subset([9, 2, 14, 3]).subset(np.array([True, False, True, True]))
    assert isinstance(part.images, image_set.ImageRows) and part.labels.tolist() == full.labels[[9, 14, 3]].tolist()
    assert torch.equal(part.images[:], tensor[[9, 14, 3]])
    for bad, error in ((torch.tensor([18]), IndexError), (np.array([0.5]), IndexError), ((0, 1), TypeError)):
        with pytest.raises(error):
            rows[bad]


def test_a_client_reads_its_folder_a_batch_at_a_time(tmp_path, monkeypatch, one_thread):
    """A site's training reads only one batch of rows at a time from the cache, and trains
    exactly as on the same images in memory."""
    root = noise_folder(tmp_path / "data", per_class=8)
    cfg = RunConfig(image_size=S, batch_size=4, proj_dim=16, hidden_dim=32, threads=1)
    data = local_images(cfg, {"data-path": str(root)})
    assert isinstance(data.images, image_set.ImageRows)
    reads = []
    real_read = image_set.ImageRows._read

    def counting(self, file_rows):
        reads.append(len(file_rows))
        return real_read(self, file_rows)

    monkeypatch.setattr(image_set.ImageRows, "_read", counting)

    def train(images):
        torch.manual_seed(0)
        method = build_method(cfg)
        return train_epochs(method, images, augmenter(cfg), settings=StepSettings.from_config(cfg), epochs=2,
                            device=torch.device("cpu"), seed=3), method


    on_demand, method = train(data.images)
    assert reads == [4] * 12  # 24 images, batch 4: 6 steps an epoch, one read of one batch each
    reads.clear()
    in_memory, reference = train(load_images("imagefolder", str(root), S).images.clone())
    assert not reads and on_demand.loss == in_memory.loss
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), reference.state_dict().values()))


def test_decode_once_into_the_cache_across_chunks_with_unreadable_files(tmp_path, monkeypatch, fedssl_log):
    root = noise_folder(tmp_path / "data", per_class=5)
    (root / "c1" / "001.png").write_bytes(b"not an image")
    (root / "c2" / "004.png").write_bytes(b"")
    monkeypatch.setattr(folders, "DECODE_CHUNK", 2)  # several chunks, decoded ahead
    cache = tmp_path / "cache"
    first = load_images("imagefolder", str(root), S, cache_dir=str(cache))
    assert len(first) == 13 and first.skipped == 2
    assert first.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 4
    (npy,) = cache.glob("*.npy")
    assert np.load(npy).shape == (13, 3, S, S)  # the header counts the images written, not the files
    expected, _ = load_folder_with_paths(str(root), S)
    assert torch.equal(first.images, expected.images)

    monkeypatch.setattr(folders, "_decode_image", lambda path, size: pytest.fail("decoded again"))
    fedssl_log.clear()
    again = load_images("imagefolder", str(root), S, cache_dir=str(cache))
    assert torch.equal(again.images, first.images) and again.skipped == 2
    assert "001.png" in fedssl_log.text and "004.png" in fedssl_log.text  # still reported from the cache


def test_changed_files_invalidate_and_a_reader_keeps_what_it_opened(tmp_path):
    root, cache = noise_folder(tmp_path / "data"), tmp_path / "cache"
    old = load_images("imagefolder", str(root), S, cache_dir=str(cache)).read_on_demand()
    before = old.images[:]
    (old_npy,) = cache.glob("*.npy")
    # an entry of the earlier .npz format for this folder and size: not read, removed
    stale_npz = old_npy.with_name(old_npy.name.rsplit("-", 1)[0] + "-0123456789abcdef.npz")
    stale_npz.write_bytes(b"old format")

    Image.new("RGB", (S, S), (255, 255, 255)).save(root / "c0" / "000.png")
    os.utime(root / "c0" / "000.png", ns=(1_700_000_000_000_000_000,) * 2)
    new = load_images("imagefolder", str(root), S, cache_dir=str(cache))
    assert int(new.images[0].min()) == 255
    assert entry_files(cache) == [".json", ".npy"] and not old_npy.exists() and not stale_npz.exists()
    # a process that opened the old entry reads it as it was (its file is held open)
    assert torch.equal(old.images[:], before) and not torch.equal(old.images[:], new.images)


def test_an_incomplete_or_inconsistent_entry_is_decoded_again(tmp_path, fedssl_log):
    root, cache = noise_folder(tmp_path / "data"), tmp_path / "cache"
    expected = load_images("imagefolder", str(root), S, cache_dir=str(cache)).images.clone()
    (npy,) = cache.glob("*.npy")
    sidecar = npy.with_suffix(".json")

    sidecar.unlink()  # written last: without it the entry is not complete
    assert torch.equal(load_images("imagefolder", str(root), S, cache_dir=str(cache)).images, expected)
    assert sidecar.is_file() and not fedssl_log.text

    meta = json.loads(sidecar.read_text())
    for broken in ("{not json", json.dumps({**meta, "images": 17}), json.dumps({**meta, "labels": [9] * 18})):
        sidecar.write_text(broken)
        fedssl_log.clear()
        assert torch.equal(load_images("imagefolder", str(root), S, cache_dir=str(cache)).images, expected)
        assert "ignoring unreadable image cache" in fedssl_log.text
        assert entry_files(cache) == [".json", ".npy"]  # and rewritten, with no temporary left


def test_rows_of_a_file_cut_short_under_a_reader_are_a_one_line_error(tmp_path):
    root, cache = noise_folder(tmp_path / "data"), tmp_path / "cache"
    rows = load_images("imagefolder", str(root), S, cache_dir=str(cache)).read_on_demand().images
    (npy,) = cache.glob("*.npy")
    os.truncate(npy, npy.stat().st_size - 3 * S * S)  # the last image gone
    assert rows[:17].shape == (17, 3, S, S)
    with pytest.raises(DataError, match="ends before row 17") as err:
        rows[[0, 17]]
    assert "\n" not in str(err.value)


def test_an_unwritable_cache_decodes_into_memory(tmp_path, fedssl_log):
    root = noise_folder(tmp_path / "data")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    images = load_images("imagefolder", str(root), S, cache_dir=str(not_a_dir))
    assert images.cached is None and images.read_on_demand() is images and len(images) == 18
    assert "could not write image cache" in fedssl_log.text
