"""DINO and SwAV: their losses and heads against lightly's reference implementations, the
Sinkhorn codes on known answers, the shared/local split, the momentum teacher and centre, a
few real steps and a federated round."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fedssl.client.app import LOCAL_STATE_KEY
from fedssl.client.app import app as client_app
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.heads import NormalizedLinear, dino_head
from fedssl.common.methods import METHODS, build_method
from fedssl.common.methods.byol import BYOL
from fedssl.common.methods.dino import DINO, dino_loss, updated_center
from fedssl.common.methods.swav import SwAV, sinkhorn, swav_loss
from fedssl.common.records import from_record
from fedssl.common.schedules import cosine
from fedssl.common.training import augmenter, param_groups
from fedssl.server.app import run_federation
from fedssl.server.resume import load_run_state
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config

SHAPES = [(2, 8), (16, 64), (64, 4096)]


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: on shared cores, a second OpenMP thread that waits for a busy core makes
    # each small step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # (batch, outputs): the smallest, tiny, the defaults'


def logits(n: int, k: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(n, k, generator=g) for _ in range(4)]


def cosines(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views' scores against K unit prototypes, as SwAV's are: cosines in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    z1 = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    z2 = F.normalize(z1 + 0.5 * torch.randn(n, 16, generator=g), dim=1)
    return z1 @ prototypes.T, z2 @ prototypes.T


# --- against the reference ------------------------------------------------------------------

@pytest.mark.parametrize("n, k", SHAPES)
def test_dino_loss_and_centre_match_lightly(n, k):
    lightly_loss = pytest.importorskip("lightly.loss")
    # the range of DINO's outputs (cosines): soft targets at tau_t 0.04, not one-hot ones
    s1, s2, t1, t2 = logits(n, k, seed=n, scale=0.3)
    center = 0.1 * logits(1, k, seed=k)[0][0]
    # Conventions bridged: lightly keeps the centre as [1, 1, K] and updates it inside its
    # forward; fedssl keeps [K] and updates it in after_step (updated_center). lightly's
    # teacher-temperature warm-up (0.04 -> 0.04 over 30 epochs by default) is a no-op;
    # passing teacher_temp pins it anyway.
    reference = lightly_loss.DINOLoss(output_dim=k, teacher_temp=0.04, student_temp=0.1,
                                      center_momentum=0.9)
    reference.center.copy_(center.view(1, 1, k))
    ours_s = [x.clone().requires_grad_() for x in (s1, s2)]
    ref_s = [x.clone().requires_grad_() for x in (s1, s2)]
    ours = dino_loss(tuple(ours_s), (t1, t2), center, student_temperature=0.1, teacher_temperature=0.04)
    theirs = reference([t1, t2], ref_s, teacher_temp=0.04)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    for mine, ref in zip(ours_s, ref_s):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(updated_center(center, torch.cat([t1, t2]), 0.9),
                               reference.center.view(k), rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # lightly's, not ours
def test_dino_head_matches_lightlys():
    heads = pytest.importorskip("lightly.models.modules.heads")
    torch.manual_seed(0)
    mlp, last = dino_head(24, 32, 16), NormalizedLinear(16, 48)
    # lightly's DINOProjectionHead: the authors' DINOHead, weight_norm with the gain at 1
    reference = heads.DINOProjectionHead(24, 32, 16, 48, batch_norm=False, norm_last_layer=True)
    linears = [m for m in reference.layers if isinstance(m, torch.nn.Linear)]
    ours_linear = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for theirs, mine in zip(linears, ours_linear, strict=True):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        reference.last_layer.weight_v.copy_(last.weight)
    assert torch.equal(reference.last_layer.weight_g, torch.ones(48, 1))
    x = torch.randn(8, 24)
    ours, theirs = last(mlp(x)), reference(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (ours ** 2).sum().backward()
    (theirs ** 2).sum().backward()
    torch.testing.assert_close(last.weight.grad, reference.last_layer.weight_v.grad, rtol=1e-4, atol=1e-7)
    # every output is a cosine; the MLP starts as the authors' (std 0.02, zero biases)
    assert ours.abs().max() <= 1 + 1e-6
    assert all(torch.all(m.bias == 0) and m.weight.std() < 0.025 for m in ours_linear)


@pytest.mark.parametrize("n, k", [(2, 8), (16, 64), (64, 3000)])
def test_swav_codes_and_loss_match_lightly(n, k):
    swav_module = pytest.importorskip("lightly.loss.swav_loss")
    s1, s2 = cosines(n, k, seed=n)
    # lightly's sinkhorn leaves out the row step's 1/K, a factor common to every entry that
    # the column step cancels; the codes agree.
    torch.testing.assert_close(sinkhorn(s1, 0.05, 3), swav_module.sinkhorn(s1, iterations=3, epsilon=0.05),
                               rtol=1e-5, atol=1e-7)
    reference = swav_module.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    ours_in = [s.clone().requires_grad_() for s in (s1, s2)]
    ref_in = [s.clone().requires_grad_() for s in (s1, s2)]
    ours = swav_loss(*ours_in, temperature=0.1, epsilon=0.05, iterations=3)
    theirs = reference(ref_in, [])  # two high-resolution views, no multi-crop; shape [1]
    torch.testing.assert_close(ours, theirs.squeeze(0), rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    for mine, ref in zip(ours_in, ref_in):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-8)


def test_swav_heads_match_lightlys():
    heads = pytest.importorskip("lightly.models.modules.heads")
    method = build_method(RunConfig(method="swav", proj_dim=16, hidden_dim=32, swav_prototypes=24))
    projection = heads.SwaVProjectionHead(512, 32, 16)
    # lightly's prototypes carry a bias; the authors' (and fedssl's) do not
    prototypes = heads.SwaVPrototypes(16, 24)
    projection.layers.load_state_dict(method.projector.state_dict())
    with torch.no_grad():
        prototypes.heads[0].weight.copy_(method.prototypes.weight)
        prototypes.heads[0].bias.zero_()
    method.train(), projection.train()
    features = torch.randn(8, 512)
    ours = method.prototypes(F.normalize(method.projector(features), dim=1))
    theirs = prototypes(F.normalize(projection(features), dim=1))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# --- known answers --------------------------------------------------------------------------

def test_sinkhorn_codes_are_distributions_that_share_the_prototypes():
    s1, _ = cosines(64, 16, seed=1)
    codes = sinkhorn(s1, 0.05, 3)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64))  # each sample: a distribution
    # the prototypes share the batch (64 / 16 = 4 samples each): the fixed point, which 3
    # iterations approach from the plain softmax's assignment
    def unevenness(c):
        return (c.sum(dim=0) - 4).abs().max().item()
    assert unevenness(codes) < 0.7 * unevenness(F.softmax(s1 / 0.05, dim=1))
    assert unevenness(sinkhorn(s1, 0.05, 50)) < 1e-3
    # a collapsed batch (every sample alike) gets the uniform code: nothing to predict
    same = s1[:1].repeat(64, 1)
    torch.testing.assert_close(sinkhorn(same), torch.full((64, 16), 1 / 16))


def test_dino_loss_on_hand_made_outputs():
    k = 8
    center = torch.zeros(k)
    uniform = torch.zeros(4, k)
    # a flat teacher and a flat student: the cross-entropy of two uniform distributions
    assert dino_loss((uniform, uniform), (uniform, uniform), center).item() == pytest.approx(math.log(k))
    # the teacher is centred: a constant shift of its outputs is removed by its own centre
    t = torch.randn(4, k)
    shifted = t + torch.linspace(0, 3, k)
    s = torch.randn(4, k), torch.randn(4, k)
    assert dino_loss(s, (shifted, shifted), torch.linspace(0, 3, k)).item() == pytest.approx(
        dino_loss(s, (t, t), center).item(), rel=1e-5)
    # cross-view: each student view is scored against the other view's teacher
    a, b = torch.eye(k)[:4] * 10, torch.eye(k)[4:] * 10
    assert dino_loss((b, a), (a, b), center).item() < 0.01
    assert dino_loss((a, b), (a, b), center).item() > 10
    # the centre moves a tenth of the way to the teacher's batch mean
    torch.testing.assert_close(updated_center(torch.ones(k), torch.zeros(6, k)), torch.full((k,), 0.9))


@pytest.mark.parametrize("loss, inputs", [
    (lambda a, b: dino_loss((a, b), (b, a), torch.zeros(64)), logits(16, 64, seed=2)[:2]),
    (lambda a, b: swav_loss(a, b), cosines(16, 64, seed=2)),
])
def test_losses_run_in_fp32_under_bf16_autocast(loss, inputs):
    a, b = (x.bfloat16() for x in inputs)
    reference = loss(a.float(), b.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(a, b)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)


# --- the methods ----------------------------------------------------------------------------

def small(name: str, **kw) -> RunConfig:
    sizes = {"dino": dict(dino_out_dim=128), "swav": dict(swav_prototypes=64)}[name]
    return RunConfig(method=name, proj_dim=32, hidden_dim=64, image_size=16, **{**sizes, **kw})


def test_registered_with_their_papers_views():
    assert METHODS["dino"] is DINO and METHODS["swav"] is SwAV
    dino, byol = DINO.augmentation, BYOL.augmentation
    # DINO's global crops: BYOL's asymmetric blur and solarize, the code's scale without multi-crop
    assert dino.crop_scale == (0.14, 1.0)
    for field in ("jitter_prob", "brightness", "contrast", "saturation", "hue", "grayscale_prob",
                  "blur_probs", "solarize_probs", "flip_prob"):
        assert getattr(dino, field) == getattr(byol, field), field
    assert dino.blur_probs == (1.0, 0.1) and dino.solarize_probs == (0.0, 0.2)
    swav = SwAV.augmentation  # multicropdataset.py: colour distortion s = 1, blur 0.5, symmetric
    assert (swav.crop_scale, swav.jitter_prob, swav.brightness, swav.contrast, swav.saturation,
            swav.hue, swav.grayscale_prob, swav.blur_probs, swav.solarize_probs, swav.flip_prob) == (
        (0.08, 1.0), 0.8, 0.8, 0.8, 0.8, 0.2, 0.2, (0.5, 0.5), (0.0, 0.0), 0.5)
    for name in ("dino", "swav"):
        RunConfig(method=name).validate()
        assert augmenter(RunConfig(method=name)).cfg.solarize_probs == METHODS[name].augmentation.solarize_probs


def test_the_papers_settings_are_the_defaults_and_reach_the_methods():
    dino = build_method(RunConfig(method="dino", proj_dim=32, hidden_dim=64))
    assert (dino.student_temperature, dino.teacher_temperature, dino.center_momentum) == (0.1, 0.04, 0.9)
    assert dino.last_layer.weight.shape == (4096, 32) and dino.center.shape == (4096,)
    swav = build_method(RunConfig(method="swav", proj_dim=32, hidden_dim=64))
    assert (swav.temperature, swav.epsilon, swav.iterations) == (0.1, 0.05, 3)
    assert swav.prototypes.weight.shape == (3000, 32) and swav.prototypes.bias is None
    cfg = RunConfig(method="dino", proj_dim=32, hidden_dim=64, dino_out_dim=100, dino_tau=0.5,
                    dino_teacher_temperature=0.07, dino_student_temperature=0.2, dino_center_momentum=0.5)
    dino = build_method(cfg)
    assert (dino.last_layer.weight.shape[0], dino.base_tau, dino.teacher_temperature,
            dino.student_temperature, dino.center_momentum) == (100, 0.5, 0.07, 0.2, 0.5)
    swav = build_method(RunConfig(method="swav", proj_dim=32, hidden_dim=64, swav_prototypes=10,
                                  swav_temperature=0.2, swav_epsilon=0.03, swav_sinkhorn_iterations=5))
    assert (swav.prototypes.weight.shape[0], swav.temperature, swav.epsilon, swav.iterations) == (10, 0.2, 0.03, 5)


@pytest.mark.parametrize("key, value", [("dino-teacher-temperature", 0.0), ("dino-center-momentum", 1.5),
                                        ("swav-epsilon", -0.05), ("swav-sinkhorn-iterations", 0),
                                        ("swav-prototypes", 1), ("dino-out-dim", 1)])
def test_a_bad_value_is_one_line_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"^{key}={value!r} is invalid: must be") as err:
        RunConfig.from_mapping({key: value})
    assert "\n" not in str(err.value)


def test_dino_shares_the_student_and_keeps_the_teacher_and_centre():
    method = build_method(small("dino"))
    method.init_local()
    assert {k.split(".")[0] for k in method.shared_state()} == {"encoder", "projector", "last_layer"}
    assert {k.split(".")[0] for k in method.local_state()} == {
        "teacher_encoder", "teacher_projector", "teacher_last_layer", "center"}
    assert not any(p.requires_grad for n, p in method.named_parameters() if n.startswith("teacher_"))
    trained = {id(p) for group in param_groups(method, 0.1, 1.0) for p in group["params"]}
    assert not trained & {id(p) for n, p in method.named_parameters() if n.startswith("teacher_")}
    # the alternative: the centre averaged by the server, the teacher still local
    shared_centre = build_method(small("dino", dino_share_center=True))
    assert "center" in shared_centre.shared_state() and "center" not in shared_centre.local_state()
    assert DINO.shared_prefixes == ("encoder.", "projector.", "last_layer.")  # the class is untouched


def test_swav_shares_its_prototypes_by_default_and_keeps_nothing_else():
    method = build_method(small("swav"))
    method.init_local()
    assert method.local_state() == {}
    assert {k.split(".")[0] for k in method.shared_state()} == {"encoder", "projector", "prototypes"}
    local = build_method(small("swav", swav_share_prototypes=False))
    assert set(local.local_state()) == {"prototypes.weight"}
    assert not any(k.startswith("prototypes.") for k in local.shared_state())


def _views(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)


def test_the_teacher_and_centre_move_by_momentum_only():
    torch.manual_seed(0)
    method = build_method(small("dino", dino_tau=0.9))
    method.init_local()
    views = _views()
    opt = torch.optim.SGD(param_groups(method, 0.1), lr=0.1)
    for step in range(3):
        teacher_before = [p.clone() for p in method._pairs()[0]]
        centre_before = method.center.clone()
        loss = method(*views)
        with torch.no_grad():
            expected_centre = updated_center(centre_before, method.teacher_last_layer(
                method.teacher_projector(method.teacher_encoder(torch.cat(views)))), 0.9)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in method._pairs()[0])  # no gradient reaches the teacher
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(teacher_before, method._pairs()[0]))  # not stepped
        progress = 0.25 * (step + 1)
        method.after_step(progress)
        tau = cosine(progress, 0.9, 1.0)
        for old, new, student in zip(teacher_before, *method._pairs()):
            torch.testing.assert_close(new, tau * old + (1 - tau) * student, rtol=0, atol=1e-6)
        torch.testing.assert_close(method.center, expected_centre, rtol=1e-5, atol=1e-7)
    # a forward without a step changes neither (the teacher's BatchNorm statistics, as any
    # network's in training mode, do follow the batches it sees)
    teacher_before, centre_before = [p.clone() for p in method._pairs()[0]], method.center.clone()
    with torch.no_grad():
        method(*views)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, method._pairs()[0]))
    assert torch.equal(centre_before, method.center)


def test_init_local_copies_the_student_and_clears_only_a_local_centre():
    for share, kept in ((False, False), (True, True)):
        method = build_method(small("dino", dino_share_center=share))
        with torch.no_grad():
            method.center.fill_(0.5)
            for p in method.encoder.parameters():
                p.add_(1.0)
        method.init_local()
        assert all(torch.equal(a, b) for a, b in zip(*method._pairs()))
        assert torch.all(method.center == (0.5 if kept else 0.0))


def test_swav_normalises_its_prototypes_before_every_step():
    method = build_method(small("swav"))
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    method(*_views())
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(64))


# DINO's targets move with every step: on a fixed batch the loss first falls, then rises while
# the centre catches up with the teacher's common direction and removes it from the targets
# (its own dynamics, not a fault). Held (teacher momentum 1, centre momentum 1), the loss is a
# fixed target the student's steps must approach.
@pytest.mark.parametrize("name, held", [("dino", dict(dino_tau=1.0, dino_center_momentum=1.0)),
                                        ("swav", {})])
def test_steps_on_a_fixed_batch_lower_the_loss_and_change_only_the_trained_weights(name, held):
    torch.manual_seed(0)
    method = build_method(small(name, **held))
    method.init_local()
    views = _views(n=8)
    shared_before = {k: v.clone() for k, v in method.shared_state().items()}
    opt = torch.optim.SGD(param_groups(method, 0.05), lr=0.05, momentum=0.9)
    losses = []
    for step in range(8):
        loss = method(*views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step / 8)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    changed = {k.split(".")[0] for k, v in method.shared_state().items()
               if v.is_floating_point() and not torch.equal(v, shared_before[k])}
    assert changed == ({"encoder", "projector", "last_layer"} if name == "dino"
                       else {"encoder", "projector", "prototypes"})
    assert set(method.shared_state()).isdisjoint(method.local_state())


@pytest.mark.parametrize("name", ["dino", "swav"])
def test_a_federated_round_trains_keeps_local_state_at_the_site_and_reports_collapse(
        name, small_image_folder, tmp_path):
    out = tmp_path / "run"
    cfg = fast_config(small_image_folder, out, method=name, num_rounds=1,
                      **{"dino": dict(dino_out_dim=128), "swav": dict(swav_prototypes=16)}[name])
    initial = build_method(cfg).shared_state()
    grid = InProcessGrid(client_app, num_nodes=2)
    run_federation(grid, cfg)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["round"] == 1 and last["clients_ok"] == 2 and not last.get("failures")
    assert math.isfinite(last["train_loss"]) and last["train_loss"] > 0
    # the projector's output (DINO: the bottleneck), healthy near 1/sqrt(proj-dim)
    assert 0 < last["collapse_std"] <= 1
    assert last["collapse_healthy"] == pytest.approx(cfg.proj_dim ** -0.5)
    final = load_run_state(out / "checkpoint.safetensors").shared
    assert final.keys() == initial.keys()  # the server never holds a teacher or a centre
    assert not torch.equal(final["encoder.conv1.weight"], initial["encoder.conv1.weight"])
    for context in grid.contexts.values():
        local = context.state.get(LOCAL_STATE_KEY)
        if name == "dino":  # each site kept its own teacher and centre
            kept = from_record(local)
            assert {k.split(".")[0] for k in kept} == {
                "teacher_encoder", "teacher_projector", "teacher_last_layer", "center"}
            assert kept["center"].abs().sum() > 0
        else:
            assert local is None  # nothing to keep
