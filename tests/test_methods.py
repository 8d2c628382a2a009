"""Losses, EMA, schedules and the shared/local split of each SSL method."""
import dataclasses
import math

import pytest
import torch

from fedssl.common.augment import MEAN, STD, TwoViewAugment, normalize
from fedssl.common.config import RunConfig
from fedssl.common.ema import ema_
from fedssl.common.methods import METHODS, build_method
from fedssl.common.methods.byol import BYOL, byol_loss
from fedssl.common.methods.simsiam import simsiam_loss
from fedssl.common.schedules import byol_tau, cosine
from fedssl.common.training import StepSettings, augmenter, param_groups


def small(method: str) -> RunConfig:
    return RunConfig(method=method, proj_dim=32, hidden_dim=64)


def test_byol_loss_is_zero_for_identical_and_symmetric():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    assert byol_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(a, -a).item() == pytest.approx(4.0, abs=1e-5)
    assert byol_loss(a, b).item() == pytest.approx(byol_loss(b, a).item(), abs=1e-6)
    assert 0.0 < byol_loss(a, b).item() < 4.0


def test_simsiam_loss_is_minus_one_for_identical_and_symmetric():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    assert simsiam_loss(a, a).item() == pytest.approx(-1.0, abs=1e-6)
    assert simsiam_loss(a, b).item() == pytest.approx(simsiam_loss(b, a).item(), abs=1e-6)


def test_losses_stop_gradient_on_the_target():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    (byol_loss(p, z) + simsiam_loss(p, z)).backward()
    assert p.grad is not None and z.grad is None


def test_cosine_and_byol_tau_endpoints():
    assert cosine(0.0, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine(1.0, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine(0.5, 1.0, 0.0) == pytest.approx(0.5)
    assert byol_tau(0.0) == pytest.approx(0.99)
    assert byol_tau(1.0) == pytest.approx(1.0)
    assert byol_tau(0.5) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    assert byol_tau(2.0) == pytest.approx(1.0)  # clamped past the end


def test_ema_moves_target_towards_online_by_one_minus_tau():
    target, online = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.zeros(2)]
    ema_(target, online, tau=0.9)
    assert torch.allclose(target[0], torch.full((3,), 0.1))
    assert torch.allclose(target[1], torch.full((2,), 0.9))
    ema_(target, online, tau=1.0)  # tau 1 freezes the target
    assert torch.allclose(target[0], torch.full((3,), 0.1))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_a_step_and_splits_shared_from_local(name):
    torch.manual_seed(0)
    method = build_method(small(name))
    method.init_local()
    shared, local = method.shared_state(), method.local_state()
    assert shared and set(shared).isdisjoint(local)
    assert set(shared) | set(local) == set(method.state_dict())
    assert all(k.startswith(method.shared_prefixes) for k in shared)
    before = {k: v.clone() for k, v in shared.items()}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    views = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = method(*views)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    opt.step()
    method.after_step(0.5)
    changed = [k for k, v in method.shared_state().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed)


def test_byol_target_is_local_and_follows_online_by_ema():
    method = build_method(RunConfig(method="byol", proj_dim=32, hidden_dim=64, byol_tau=0.99))
    method.init_local()
    assert all(k.startswith(("target_encoder.", "target_projector.")) for k in method.local_state())
    assert all(not p.requires_grad for p in method.target_encoder.parameters())
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    target_before = [p.clone() for p in method.target_encoder.parameters()]
    method.after_step(0.0)  # tau = 0.99: target moves 1% of the way
    for old, new, online in zip(target_before, method.target_encoder.parameters(),
                                method.encoder.parameters()):
        assert torch.allclose(new, 0.99 * old + 0.01 * online, atol=1e-6)


def test_build_method_is_seeded():
    a, b = build_method(small("simsiam")), build_method(small("simsiam"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_load_partial_rejects_foreign_keys():
    method = build_method(small("simsiam"))
    with pytest.raises(KeyError, match="does not have"):
        method.load_partial({"nonsense.weight": torch.zeros(1)})


@pytest.mark.parametrize("name, has_predictor", [("byol", True), ("simsiam", True), ("simclr", False)])
def test_the_predictor_trains_at_its_own_learning_rate(name, has_predictor):
    method = build_method(RunConfig(method=name, encoder="resnet10", proj_dim=16, hidden_dim=32))
    groups = param_groups(method, 0.05, 0.5)
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # each parameter once
    assert groups[0]["lr"] == 0.05
    if has_predictor:
        predictor = {id(p) for p in method.predictor.parameters()}
        assert len(groups) == 2 and math.isclose(groups[1]["lr"], 0.5)
        assert {id(p) for p in groups[1]["params"]} == predictor
        assert not predictor & {id(p) for p in groups[0]["params"]}
    else:
        assert len(groups) == 1


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_predictor_rate_follows_its_schedule_through_the_rounds(schedule):
    # cosine: a constant multiple of the round's decayed rate; constant: that multiple of the
    # base rate in every round (SimSiam's authors' --fix-pred-lr, there with multiple 1).
    cfg = RunConfig(method="simsiam", proj_dim=16, hidden_dim=32, lr=0.05, predictor_lr_scale=4.0,
                    predictor_lr_schedule=schedule)
    method = build_method(cfg)
    for progress in (0.0, 0.9):
        rate = cosine(progress, 0.05, 0.0)
        groups = param_groups(method, rate, StepSettings.from_config(cfg, lr=rate).predictor_lr)
        assert math.isclose(groups[0]["lr"], rate)
        assert math.isclose(groups[1]["lr"], 4.0 * (rate if schedule == "cosine" else 0.05))


# --- each method's augmentation ----------------------------------------------------------

# (crop scale, jitter p, brightness, contrast, saturation, hue, grayscale p, blur per view,
# solarize per view), from the papers and the authors' code (sources in each module).
PAPER_RECIPES = {
    "byol": ((0.08, 1.0), 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, (1.0, 0.1), (0.0, 0.2)),  # Table 6
    "simsiam": ((0.2, 1.0), 0.8, 0.4, 0.4, 0.4, 0.1, 0.2, (0.5, 0.5), (0.0, 0.0)),  # main_simsiam.py
    "simclr": ((0.08, 1.0), 0.8, 0.8, 0.8, 0.8, 0.2, 0.2, (0.5, 0.5), (0.0, 0.0)),  # s = 1, appendix A
    "mocov2": ((0.2, 1.0), 0.8, 0.4, 0.4, 0.4, 0.1, 0.2, (0.5, 0.5), (0.0, 0.0)),  # main_moco.py aug+
    # both authors' code use BYOL's asymmetric recipe (vicreg: augmentations.py; barlowtwins: main.py)
    "vicreg": ((0.08, 1.0), 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, (1.0, 0.1), (0.0, 0.2)),
    "barlowtwins": ((0.08, 1.0), 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, (1.0, 0.1), (0.0, 0.2)),
    "dino": ((0.14, 1.0), 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, (1.0, 0.1), (0.0, 0.2)),  # main_dino.py global crops
    "swav": ((0.08, 1.0), 0.8, 0.8, 0.8, 0.8, 0.2, 0.2, (0.5, 0.5), (0.0, 0.0)),  # main_swav.py, two views
    "mae": ((0.2, 1.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, (0.0, 0.0), (0.0, 0.0)),  # main_pretrain.py: crop + flip
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_declares_its_papers_augmentation(name):
    r = METHODS[name].augmentation
    got = (r.crop_scale, r.jitter_prob, r.brightness, r.contrast, r.saturation, r.hue,
           r.grayscale_prob, r.blur_probs, r.solarize_probs)
    assert got == PAPER_RECIPES[name]
    assert r.flip_prob == 0.5
    assert build_method(small(name)).augmentation is r  # what the built method declares


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("blur", [False, True])
def test_the_run_augments_with_its_methods_recipe_under_blur_and_crop_min_scale(name, blur):
    recipe = METHODS[name].augmentation
    cfg = augmenter(RunConfig(method=name, image_size=40, blur=blur, crop_min_scale=0.3)).cfg
    assert cfg.image_size == 40 and cfg.crop_scale == (0.3, 1.0)  # crop-min-scale overrides
    assert cfg.blur_probs == (recipe.blur_probs if blur else (0.0, 0.0))  # blur: on or off
    assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (
        recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
    assert cfg.solarize_probs == recipe.solarize_probs


def _blurred_and_solarized(recipe, images: torch.Tensor, seed: int):
    """Per view, which samples were blurred and which solarized, with every other
    transform of the recipe off: an unblurred view is the image or its solarized copy
    exactly, and a solarized one has no pixel above 0.5."""
    cfg = dataclasses.replace(recipe.at(32), crop_scale=(1.0, 1.0), flip_prob=0.0,
                              jitter_prob=0.0, grayscale_prob=0.0)
    unit = images.float() / 255
    solarized_images = normalize((torch.minimum(unit, 1 - unit) * 255).round().to(torch.uint8))
    out = []
    for view in TwoViewAugment(cfg)(images, torch.Generator().manual_seed(seed)):
        plain = (view - normalize(images)).flatten(1).abs().amax(dim=1) < 1e-5
        only_solarized = (view - solarized_images).flatten(1).abs().amax(dim=1) < 1e-2
        pixels = view * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        solarized = pixels.flatten(1).amax(dim=1) <= 0.5 + 1e-4
        out.append(((~(plain | only_solarized)).float().mean().item(), solarized.float().mean().item()))
    return out


def test_byols_two_views_differ_in_blur_and_solarize_as_its_paper_specifies():
    images = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    # A blur whose sigma is drawn near 0.1 changes nothing measurable (about 5% of them at
    # 32 px), so a view blurred with probability p shows about 0.95 p blurred samples.
    (blur1, solar1), (blur2, solar2) = _blurred_and_solarized(BYOL.augmentation, images, 0)
    assert blur1 > 0.9 and solar1 == 0.0  # view 1: always blurred, never solarized
    assert 0.06 < blur2 < 0.13 and 0.16 < solar2 < 0.24  # view 2: 10% and 20%
    # A symmetric recipe, for contrast: the views have the same statistics.
    (b1, s1), (b2, s2) = _blurred_and_solarized(METHODS["mocov2"].augmentation, images, 0)
    assert 0.41 < b1 < 0.54 and 0.41 < b2 < 0.54 and s1 == s2 == 0.0
