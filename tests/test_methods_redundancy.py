"""VICReg and Barlow Twins: their losses against lightly's reference implementations and on
hand-made embeddings, the shared/local split, a few real steps and a federated round."""
import json
import math

import pytest
import torch

from fedssl.client.app import app as client_app
from fedssl.common.config import RunConfig
from fedssl.common.datasets import load_images
from fedssl.common.methods import METHODS, build_method
from fedssl.common.methods.barlowtwins import LAMBDA_OFFDIAG, BarlowTwins, barlow_twins_loss
from fedssl.common.methods.byol import BYOL
from fedssl.common.methods.vicreg import VICReg, covariance_term, variance_term, vicreg_loss
from fedssl.common.training import StepSettings, augmenter, train_epochs
from fedssl.server.app import run_federation
from fedssl.server.resume import load_run_state
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config

NAMES = ["vicreg", "barlowtwins"]
SHAPES = [(2, 3), (16, 32), (64, 256)]  # (batch, dimension): the smallest batch, tiny, the run's


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's [n, n] matrix of +-1 (n a power of 2): columns 1.. are centred and
    mutually orthogonal, each with a variance over the rows of n / (n - 1) (1, biased)."""
    h = torch.ones(1, 1)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


H = hadamard(8)[:, 1:]  # 8 samples x 7 uncorrelated dimensions, std 1.069 each


def embeddings(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated views' embeddings, off-centre and of uneven scale per dimension."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 3 + 1
    return z1, z1 + 0.5 * torch.randn(n, d, generator=g)


# --- against the reference ------------------------------------------------------------------

def _value_and_grads(loss_fn, z1, z2):
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    value = loss_fn(z1, z2)
    value.backward()
    return value.detach(), z1.grad, z2.grad


@pytest.mark.parametrize("n, d", SHAPES)
def test_vicreg_loss_matches_lightly(n, d):
    lightly_loss = pytest.importorskip("lightly.loss")
    # lightly's defaults are the paper's (25, 25, 1, eps 1e-4); gather_distributed is off,
    # and one process has nothing to gather anyway.
    reference = lightly_loss.VICRegLoss()
    ours, ref = (_value_and_grads(f, *embeddings(n, d, seed=n)) for f in (vicreg_loss, reference))
    for mine, theirs in zip(ours, ref):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("lambda_offdiag", [LAMBDA_OFFDIAG, 5e-3])  # ours (authors' code), lightly's
def test_barlow_twins_loss_matches_lightly(n, d, lambda_offdiag):
    lightly_loss = pytest.importorskip("lightly.loss")
    reference = lightly_loss.BarlowTwinsLoss(lambda_param=lambda_offdiag)
    z1, z2 = embeddings(n, d, seed=n)
    ours = _value_and_grads(lambda a, b: barlow_twins_loss(a, b, lambda_offdiag), z1, z2)
    ref = _value_and_grads(reference, z1, z2)
    for mine, theirs in zip(ours, ref):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_the_methods_use_the_papers_coefficients():
    method = build_method(RunConfig(method="barlowtwins", proj_dim=16, hidden_dim=32))
    assert method.lambda_offdiag == 0.0051
    z1, z2 = embeddings(16, 32, seed=0)
    assert vicreg_loss(z1, z2).item() == pytest.approx(
        vicreg_loss(z1, z2, invariance=25.0, variance=25.0, covariance=1.0).item())


# --- known answers --------------------------------------------------------------------------

def test_vicreg_is_zero_for_identical_views_of_decorrelated_dimensions_with_std_above_one():
    assert variance_term(H).item() == 0.0  # every std 1.069 >= 1: the hinge is off
    assert covariance_term(H).item() == pytest.approx(0.0, abs=1e-12)
    assert vicreg_loss(H, H).item() == pytest.approx(0.0, abs=1e-12)


def test_vicreg_terms_on_hand_made_embeddings():
    # std below the target: the hinge is 1 - sqrt(var + eps) in every dimension
    half = 0.5 * H
    assert variance_term(half).item() == pytest.approx(1 - math.sqrt(0.25 * 8 / 7 + 1e-4), abs=1e-6)
    # a collapsed embedding: the hinge is 1 - sqrt(eps); that is all the loss has
    point = torch.ones(8, 7)
    assert variance_term(point).item() == pytest.approx(0.99, abs=1e-6)
    assert vicreg_loss(point, point).item() == pytest.approx(25 * 0.99, abs=1e-4)
    # one dimension copied: covariances 8/7 at (0, 1) and (1, 0), over d = 3
    copied = torch.stack([H[:, 0], H[:, 0], H[:, 1]], dim=1)
    assert covariance_term(copied).item() == pytest.approx(2 * (8 / 7) ** 2 / 3, abs=1e-6)
    # invariance: the mean squared difference, x 25
    assert vicreg_loss(H, H + 0.1).item() == pytest.approx(25 * 0.01, abs=1e-5)


def test_barlow_twins_is_zero_for_perfectly_correlated_decorrelated_views():
    assert barlow_twins_loss(H, H).item() == pytest.approx(0.0, abs=1e-8)
    # the standardisation makes it blind to each dimension's scale and offset
    assert barlow_twins_loss(H, 3 * H + 5).item() == pytest.approx(0.0, abs=1e-8)


def test_barlow_twins_on_hand_made_embeddings():
    # anti-correlated views: C = -I, (1 - (-1))^2 per dimension
    assert barlow_twins_loss(H, -H).item() == pytest.approx(4 * 7, rel=1e-4)
    # redundant dimensions: C = all ones, so only the off-diagonal term counts
    copied = H[:, :1].repeat(1, 2)
    assert barlow_twins_loss(copied, copied, 0.1).item() == pytest.approx(0.1 * 2, rel=1e-4)
    # unrelated views: C = 0, the whole diagonal missing
    assert barlow_twins_loss(H[:, :3], H[:, 3:6]).item() == pytest.approx(3.0, rel=1e-4)


@pytest.mark.parametrize("loss", [vicreg_loss, barlow_twins_loss])
def test_losses_are_symmetric_and_run_in_fp32_under_bf16_autocast(loss):
    a, b = (z.bfloat16() for z in embeddings(32, 64, seed=3))
    reference = loss(a.float(), b.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(a, b)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    assert loss(b.float(), a.float()).item() == pytest.approx(reference.item(), rel=1e-5)


# --- the methods ----------------------------------------------------------------------------

def small(name: str, **kw) -> RunConfig:
    return RunConfig(method=name, proj_dim=32, hidden_dim=64, **kw)


@pytest.mark.parametrize("name, kind", [("vicreg", VICReg), ("barlowtwins", BarlowTwins)])
def test_registered_with_byols_asymmetric_views(name, kind):
    assert METHODS[name] is kind
    RunConfig(method=name).validate()
    # the authors' code uses BYOL's recipe (sources in each module)
    for field in ("crop_scale", "jitter_prob", "brightness", "contrast", "saturation", "hue",
                  "grayscale_prob", "blur_probs", "solarize_probs", "flip_prob"):
        assert getattr(kind.augmentation, field) == getattr(BYOL.augmentation, field), field
    # at 32 px by default: no blur, solarize on the second view only
    views = augmenter(RunConfig(method=name)).cfg
    assert views.blur_probs == (0.0, 0.0) and views.solarize_probs == (0.0, 0.2)


@pytest.mark.parametrize("name", NAMES)
def test_everything_is_shared_and_nothing_stays_local(name):
    method = build_method(small(name))
    method.init_local()  # nothing to build
    assert method.local_state() == {}
    shared, everything = method.shared_state(), method.state_dict()
    assert shared.keys() == everything.keys()
    assert all(torch.equal(shared[k], everything[k]) for k in everything)
    assert {k.split(".")[0] for k in shared} == {"encoder", "projector"}
    # three layers, the run's sizes: what the server's collapse telemetry embeds with
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 64), (64, 64), (64, 32)]


@pytest.mark.parametrize("name", NAMES)
def test_a_few_steps_on_the_synthetic_images_lower_the_loss_and_change_the_weights(name):
    cfg = small(name, image_size=16, batch_size=16, threads=1)
    torch.set_num_threads(1)
    images = load_images("synthetic", "", 16).sample(128, 0).images
    method = build_method(cfg)
    augment = augmenter(cfg)
    fixed_views = augment(images[:64], torch.Generator().manual_seed(123))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        loss_before = method(*fixed_views).item()
    result = train_epochs(method, images, augment, epochs=2, device=torch.device("cpu"),
                          settings=StepSettings.from_config(cfg))
    with torch.no_grad():
        loss_after = method(*fixed_views).item()
    assert result.steps == 16 and math.isfinite(result.loss)
    assert loss_after < 0.97 * loss_before, (loss_before, loss_after)
    changed = {k.split(".")[0] for k, v in method.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])}
    assert changed == {"encoder", "projector"}


@pytest.mark.parametrize("name", NAMES)
def test_a_federated_round_trains_and_reports_collapse(name, small_image_folder, tmp_path):
    out = tmp_path / "run"
    cfg = fast_config(small_image_folder, out, method=name, num_rounds=1)
    initial = build_method(cfg).shared_state()
    run_federation(InProcessGrid(client_app, num_nodes=2), cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["round"] == 1 and last["clients_ok"] == 2 and not last.get("failures")
    assert math.isfinite(last["train_loss"]) and last["train_loss"] > 0
    # the projector's output, as for the other methods: healthy near 1/sqrt(proj-dim)
    assert 0 < last["collapse_std"] <= 1
    assert last["collapse_healthy"] == pytest.approx(cfg.proj_dim ** -0.5)
    final = load_run_state(out / "checkpoint.safetensors").shared
    assert final.keys() == initial.keys()
    assert not torch.equal(final["encoder.conv1.weight"], initial["encoder.conv1.weight"])
