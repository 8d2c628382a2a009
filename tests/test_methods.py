"""Losses, EMA, schedules and the shared/local split of each SSL method."""
import math

import pytest
import torch

from common.config import RunConfig
from common.ema import ema_
from common.methods import METHODS, build_method
from common.methods.byol import byol_loss
from common.methods.simsiam import simsiam_loss
from common.schedules import byol_tau, cosine
from common.training import param_groups


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
    groups = param_groups(method, 0.05, 10.0)
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
