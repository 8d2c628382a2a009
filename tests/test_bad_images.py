"""A site's folder as real sites have them: every kind of broken or odd file, generated here.
Usable images are converted, the rest skipped, counted in the client's metrics and named in
its log; a folder with nothing usable is a one-line error naming the folder."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedssl.client.app import app as client_app
from fedssl.common.datasets import DataError, load_images
from test_client import context, train_message
from conftest import fast_config

S = 16


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size far past Pillow's decompression-bomb limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


USABLE = {
    "rgb.png": lambda: _bytes(Image.new("RGB", (20, 14), (200, 30, 30)), "PNG"),
    "cmyk.jpg": lambda: _bytes(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"),
    "rgba.png": lambda: _bytes(Image.new("RGBA", (20, 20), (0, 0, 255, 128)), "PNG"),
    "sixteen-bit.png": lambda: _bytes(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG"),
    "palette.gif": lambda: _bytes(Image.new("RGB", (20, 20), (10, 200, 10)).convert("P"), "GIF"),
    "grey.bmp": lambda: _bytes(Image.new("L", (30, 20), 90), "BMP"),
    "tiny.png": lambda: _bytes(Image.new("RGB", (1, 1), (0, 0, 0)), "PNG"),
    "very-large.jpg": lambda: _bytes(Image.new("RGB", (6000, 4000), (50, 60, 70)), "JPEG"),
    "jpeg-named.png": lambda: _bytes(Image.new("RGB", (20, 20), (1, 2, 3)), "JPEG"),
}
UNUSABLE = {
    "zero-bytes.jpg": lambda: b"",
    "truncated.jpg": lambda: _bytes(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")[:400],
    "truncated.png": lambda: _bytes(Image.effect_noise((64, 64), 60).convert("RGB"), "PNG")[:300],
    "not-an-image.png": lambda: b"%PDF-1.4 this is a document, not a picture",
    "bomb.png": lambda: _png_header_only(30000, 30000),
}


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for name, make in {**USABLE, **UNUSABLE}.items():
        (root / name).write_bytes(make())
    os.symlink(root / "gone.jpg", root / "broken-link.jpg")
    (root / "notes.txt").write_text("not an image extension: not even counted")
    return root


SKIPPED = [*UNUSABLE, "broken-link.jpg"]


def test_usable_images_are_converted_and_bad_ones_skipped_and_counted(bad_site, tmp_path):
    images = load_images("imagefolder", str(bad_site), S, cache_dir=str(tmp_path / "cache"))
    assert images.images.shape == (len(USABLE), 3, S, S)
    assert images.skipped == len(SKIPPED)
    assert images.labels is None


def test_the_site_client_reports_skipped_images_in_metrics_and_names_them_in_its_log(
        bad_site, small_image_folder, tmp_path, caplog):
    cfg = fast_config(small_image_folder, tmp_path, dataset="synthetic", data_path="")
    with caplog.at_level("WARNING", logger="fedssl"):
        reply = client_app(train_message(cfg), context({"data-path": str(bad_site)}))
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(USABLE) and metrics["skipped-images"] == len(SKIPPED)
    for name in SKIPPED:
        assert name in caplog.text, name
    for name in USABLE:
        assert name not in caplog.text, name


def test_a_folder_without_a_usable_image_is_a_one_line_error_naming_it(tmp_path):
    folder = tmp_path / "all bad"
    folder.mkdir()
    for name, make in UNUSABLE.items():
        (folder / name).write_bytes(make())
    with pytest.raises(DataError) as err:
        load_images("imagefolder", str(folder), S, cache_dir=str(tmp_path / "cache"))
    message = str(err.value)
    assert str(folder) in message and "no usable image" in message and "\n" not in message
