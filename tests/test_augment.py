"""Behaviour of the batched two-view augmentation (common/augment.py)."""

from __future__ import annotations

import pytest
import torch

from common.augment import MEAN, STD, AugmentConfig, TwoViewAugment, normalize

# Every random transform off, the crop covering the whole image: the identity.
OFF = dict(
    crop_scale=(1.0, 1.0),
    jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_probs=(0.0, 0.0),
    solarize_probs=(0.0, 0.0),
    flip_prob=0.0,
)


def _images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)


def _unnormalize(views: torch.Tensor) -> torch.Tensor:
    std = torch.tensor(STD).view(1, 3, 1, 1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    return views * std + mean


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("height", "width", "size"), [(32, 32, 32), (64, 64, 32), (40, 56, 24), (32, 32, 64)]
)
def test_views_have_shape_dtype_layout_and_normalised_range(height, width, size):
    images = _images(16, height, width)
    views = TwoViewAugment(AugmentConfig(image_size=size))(images, _seeded(0))

    assert len(views) == 2
    for view in views:
        assert view.shape == (16, 3, size, size)
        assert view.dtype == torch.float32
        assert view.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(view).all()
        unit = _unnormalize(view)
        assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5


def test_normalize_matches_mean_std_in_channels_last():
    images = _images(4)
    out = normalize(images)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected)


def test_same_seed_gives_identical_views():
    images = _images(32)
    augment = TwoViewAugment(AugmentConfig(image_size=32))
    first = augment(images, _seeded(7))
    second = augment(images, _seeded(7))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_different_seeds_give_different_views():
    images = _images(32)
    augment = TwoViewAugment(AugmentConfig(image_size=32))
    first = augment(images, _seeded(1))
    second = augment(images, _seeded(2))
    assert not torch.allclose(first[0], second[0])
    assert not torch.allclose(first[1], second[1])


def test_the_two_views_differ():
    view1, view2 = TwoViewAugment(AugmentConfig(image_size=32))(_images(8), _seeded(0))
    assert not torch.allclose(view1, view2)


def test_identical_images_in_a_batch_get_different_views():
    # The pitfall of torchvision transforms on a batch: one crop for all images.
    one = _images(1)
    batch = one.expand(64, -1, -1, -1).contiguous()
    only_crops = AugmentConfig(image_size=32, **{**OFF, "crop_scale": (0.08, 1.0)})
    for cfg in (AugmentConfig(image_size=32), only_crops):
        for view in TwoViewAugment(cfg)(batch, _seeded(0)):
            distinct = torch.unique(view.flatten(1), dim=0)
            assert len(distinct) == len(batch)


def test_disabled_pipeline_is_the_identity():
    images = _images(8)
    view1, view2 = TwoViewAugment(AugmentConfig(image_size=32, **OFF))(images, _seeded(0))
    expected = normalize(images)
    torch.testing.assert_close(view1, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(view2, expected, atol=1e-5, rtol=0)


def test_full_crop_is_the_image_or_its_mirror():
    images = _images(64)
    cfg = AugmentConfig(image_size=32, **{**OFF, "flip_prob": 0.5})
    view, _ = TwoViewAugment(cfg)(images, _seeded(0))
    same = (view - normalize(images)).flatten(1).abs().amax(dim=1) < 1e-5
    mirrored = (view - normalize(images).flip(-1)).flatten(1).abs().amax(dim=1) < 1e-5
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()


def test_crops_zoom_in():
    # A smooth image: a crop of it, resized back up, has a smaller spread of values.
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8)
    images = ramp.view(1, 1, 1, 32).expand(128, 3, 32, -1).contiguous()
    cfg = AugmentConfig(image_size=32, **{**OFF, "crop_scale": (0.08, 0.3)})
    view, _ = TwoViewAugment(cfg)(images, _seeded(0))
    spread = _unnormalize(view)[:, 0].amax(dim=(1, 2)) - _unnormalize(view)[:, 0].amin(dim=(1, 2))
    assert (spread < 0.75).all()


def test_grayscale_gives_equal_channels():
    cfg = AugmentConfig(image_size=32, grayscale_prob=1.0)
    for view in TwoViewAugment(cfg)(_images(16), _seeded(0)):
        unit = _unnormalize(view)
        torch.testing.assert_close(unit[:, 0], unit[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(unit[:, 0], unit[:, 2], atol=1e-5, rtol=0)


def test_grayscale_is_drawn_per_sample():
    cfg = AugmentConfig(image_size=32, **{**OFF, "grayscale_prob": 0.5})
    view, _ = TwoViewAugment(cfg)(_images(400), _seeded(0))
    unit = _unnormalize(view)
    gray = ((unit[:, 0] - unit[:, 1]).abs().flatten(1).amax(dim=1) < 1e-5) & (
        (unit[:, 0] - unit[:, 2]).abs().flatten(1).amax(dim=1) < 1e-5
    )
    assert 0.35 < gray.float().mean() < 0.65


def test_solarize_inverts_bright_pixels_of_selected_samples():
    cfg = AugmentConfig(image_size=32, **{**OFF, "solarize_probs": (1.0, 0.0)})
    images = _images(8)
    solarized, untouched = TwoViewAugment(cfg)(images, _seeded(0))
    unit = images.float() / 255
    expected = torch.minimum(unit, 1 - unit)
    torch.testing.assert_close(_unnormalize(solarized), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(untouched, normalize(images), atol=1e-5, rtol=0)


def test_solarize_is_drawn_per_sample():
    cfg = AugmentConfig(image_size=32, **{**OFF, "solarize_probs": (0.5, 0.5)})
    images = _images(400)
    view, _ = TwoViewAugment(cfg)(images, _seeded(0))
    changed = (view - normalize(images)).flatten(1).abs().amax(dim=1) > 1e-3
    assert 0.35 < changed.float().mean() < 0.65


def test_blur_smooths_and_keeps_the_mean():
    images = _images(16, 64, 64)
    cfg = AugmentConfig(image_size=64, **{**OFF, "blur_probs": (1.0, 0.0)})
    blurred, sharp = TwoViewAugment(cfg)(images, _seeded(0))

    def roughness(view):
        unit = _unnormalize(view)
        return (unit[..., 1:] - unit[..., :-1]).abs().mean(dim=(1, 2, 3))

    assert (roughness(blurred) < roughness(sharp)).all()
    mean_blurred = _unnormalize(blurred).mean(dim=(2, 3))
    mean_sharp = _unnormalize(sharp).mean(dim=(2, 3))
    torch.testing.assert_close(mean_blurred, mean_sharp, atol=0.02, rtol=0)


def test_jitter_changes_colours_of_about_jitter_prob_of_the_samples():
    cfg = AugmentConfig(image_size=32, **{**OFF, "jitter_prob": 0.8})
    images = _images(400)
    view, _ = TwoViewAugment(cfg)(images, _seeded(0))
    changed = (view - normalize(images)).flatten(1).abs().amax(dim=1) > 1e-3
    assert 0.7 < changed.float().mean() < 0.9


def test_batch_of_one():
    view1, view2 = TwoViewAugment(AugmentConfig(image_size=32))(_images(1), _seeded(0))
    assert view1.shape == view2.shape == (1, 3, 32, 32)


def test_input_is_not_modified():
    images = _images(8)
    before = images.clone()
    TwoViewAugment(AugmentConfig(image_size=32, solarize_probs=(1.0, 1.0)))(images, _seeded(0))
    assert torch.equal(images, before)


def test_works_without_a_generator():
    view1, view2 = TwoViewAugment(AugmentConfig(image_size=32))(_images(4))
    assert view1.shape == view2.shape == (4, 3, 32, 32)


@pytest.mark.parametrize(
    "bad",
    [
        {"image_size": 0},
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.9, 0.5)},
        {"jitter_prob": 1.5},
        {"blur_probs": (0.5,)},
        {"solarize_probs": (0.0, -0.1)},
        {"hue": 0.7},
        {"brightness": -0.1},
    ],
)
def test_bad_config_is_rejected_with_its_key(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        AugmentConfig(**{"image_size": 32, **bad})


def test_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        TwoViewAugment(AugmentConfig(image_size=32))(torch.rand(2, 3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_views_for_a_cpu_seed():
    images = _images(32)
    augment = TwoViewAugment(AugmentConfig(image_size=32))
    cpu = augment(images, _seeded(3))
    gpu = augment(images.cuda(), _seeded(3))
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and b.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
