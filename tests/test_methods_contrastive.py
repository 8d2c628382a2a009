"""SimCLR and MoCo v2: their losses on hand-made vectors, MoCo's queue and key networks,
the shared/local split, and a few real steps through the clients' training loop."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedssl.common.augment import AugmentConfig, TwoViewAugment
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.methods import build_method
from fedssl.common.methods.base import HeadSizes
from fedssl.common.methods.mocov2 import MoCoV2, moco_loss
from fedssl.common.methods.simclr import SimCLR, nt_xent
from fedssl.common.records import from_record, to_record
from fedssl.common.training import StepSettings, train_epochs

E = torch.eye(4)


def small(method: str, **kw) -> RunConfig:
    return RunConfig(method=method, proj_dim=32, hidden_dim=64, **kw)


def tiny_moco(queue_size: int = 5, tau: float = 0.9) -> MoCoV2:
    """A MoCo over flattened 2x2 RGB images, for the queue and EMA bookkeeping."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
    return MoCoV2(encoder, 8, HeadSizes(proj_dim=4, hidden_dim=8), queue_size=queue_size, tau=tau)


# --- losses -----------------------------------------------------------------------------

def test_nt_xent_on_two_orthogonal_pairs():
    # Each view's others: its pair (cos 1) and the other image's two views (cos 0).
    z = torch.stack([E[0], E[1]])
    t = 0.5
    assert nt_xent(z, z, t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), abs=1e-6)
    # Only its pair left besides itself: nothing to tell apart.
    assert nt_xent(E[:1], E[1:2], t).item() == pytest.approx(0.0, abs=1e-6)


def test_nt_xent_is_scale_free_symmetric_and_prefers_matching_views():
    torch.manual_seed(0)
    a, b = torch.randn(16, 32), torch.randn(16, 32)
    assert nt_xent(a, 3 * a, 0.2).item() < nt_xent(a, b, 0.2).item()
    assert nt_xent(a, b, 0.2).item() == pytest.approx(nt_xent(b, a, 0.2).item(), abs=1e-5)
    # Lower temperature sharpens: matching views get closer to 0.
    assert nt_xent(a, a, 0.1).item() < nt_xent(a, a, 0.5).item()


def test_moco_loss_on_hand_made_queue():
    t = 0.5
    q, queue = E[:1], torch.stack([E[1], -E[0]])  # logits 1 (positive), 0, -1
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1 + math.exp(-1 / t)))
    assert moco_loss(q, q, queue, t).item() == pytest.approx(expected, abs=1e-6)
    # A key orthogonal to its query scores like a negative.
    assert moco_loss(q, E[2:3], queue, t).item() > moco_loss(q, q, queue, t).item()


def test_moco_loss_has_no_gradient_through_keys():
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    moco_loss(q, k, F.normalize(torch.randn(16, 8), dim=-1), 0.2).backward()
    assert q.grad is not None and k.grad is None


@pytest.mark.parametrize("loss", [
    lambda a, b: nt_xent(a, b, 0.2),
    lambda a, b: moco_loss(a, b, F.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(1)), dim=-1), 0.2),
])
def test_losses_run_in_fp32_under_bf16_autocast(loss):
    # bf16 head outputs, as autocast hands them over; the loss must not redo its matmul in bf16.
    torch.manual_seed(0)
    a, b = torch.randn(16, 32).bfloat16(), torch.randn(16, 32).bfloat16()
    reference = loss(a.float(), b.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(a, b)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference.item(), abs=1e-5)


@pytest.mark.parametrize("name", ["simclr", "mocov2"])
def test_method_loss_is_symmetric_in_the_view_order(name):
    method = build_method(small(name))
    torch.manual_seed(0)
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert method(v1, v2).item() == pytest.approx(method(v2, v1).item(), rel=1e-4)


# --- MoCo's queue and key networks -------------------------------------------------------

def test_enqueue_fills_in_order_and_wraps_around():
    method = tiny_moco(queue_size=5)
    keys = 2 * torch.eye(4)[:3]
    method.enqueue(keys)
    assert torch.allclose(method.queue[:3], torch.eye(4)[:3])  # stored L2-normalised
    assert int(method.queue_ptr) == 3
    rest = method.queue[3:].clone()
    method.enqueue(-keys)  # slots 3, 4, then 0
    assert torch.allclose(method.queue[[3, 4, 0]], -torch.eye(4)[:3])
    assert torch.allclose(method.queue[1:3], torch.eye(4)[1:3]) and not torch.equal(method.queue[3:], rest)
    assert int(method.queue_ptr) == 1


def test_enqueue_more_keys_than_the_queue_keeps_the_newest():
    method = tiny_moco(queue_size=5)
    method.enqueue(torch.eye(4)[:1])  # pointer at 1
    keys = torch.randn(7, 4)
    method.enqueue(keys)
    newest = F.normalize(keys[-5:], dim=-1)
    assert torch.allclose(method.queue[[1, 2, 3, 4, 0]], newest, atol=1e-6)
    assert int(method.queue_ptr) == 1


def test_after_step_enqueues_the_keys_of_the_last_batch():
    method = tiny_moco(queue_size=16)
    views = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2)
    method(*views)
    with torch.no_grad():
        keys = method.key_projector(method.key_encoder(torch.cat(views)))
    method.after_step(0.5)
    assert torch.allclose(method.queue[:6], F.normalize(keys, dim=-1), atol=1e-6)
    assert int(method.queue_ptr) == 6
    method.after_step(0.6)  # no new batch: nothing more to enqueue
    assert int(method.queue_ptr) == 6


@pytest.mark.parametrize("progress", [0.0, 1.0])
def test_key_networks_follow_the_query_networks_with_constant_momentum(progress):
    method = tiny_moco(tau=0.9)
    with torch.no_grad():
        for p in [*method.encoder.parameters(), *method.projector.parameters()]:
            p.add_(1.0)
    query = [*method.encoder.parameters(), *method.projector.parameters()]
    key = [*method.key_encoder.parameters(), *method.key_projector.parameters()]
    before = [p.clone() for p in key]
    method.after_step(progress)
    for old, new, q in zip(before, key, query):
        assert torch.allclose(new, 0.9 * old + 0.1 * q, atol=1e-6)
    assert all(not p.requires_grad for p in key)


def test_init_local_rebuilds_key_networks_and_queue():
    method = tiny_moco()
    fresh_queue = method.queue.clone()
    assert torch.allclose(fresh_queue.norm(dim=-1), torch.ones(5))
    method.enqueue(torch.randn(3, 4))
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    method.init_local()
    assert torch.equal(method.queue, fresh_queue) and int(method.queue_ptr) == 0
    for k, q in zip(method.key_encoder.state_dict().values(), method.encoder.state_dict().values()):
        assert torch.equal(k, q)


def _train_tiny(method, num_images: int, epochs: int):
    """The clients' training loop over a site of `num_images` 2x2 images, batch 8."""
    images = torch.randint(0, 256, (num_images, 3, 2, 2), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    augment = TwoViewAugment(AugmentConfig(image_size=2, blur_probs=(0.0, 0.0)))
    return train_epochs(method, images, augment, epochs=epochs, device=torch.device("cpu"),
                        settings=StepSettings(batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4,
                                              amp=False))


def test_a_queue_longer_than_an_epoch_of_keys_is_capped_with_a_warning(fedssl_log):
    # 24 images, batch 8: 3 steps of 2 x 8 keys, 48 keys an epoch, against a queue of 80.
    method = tiny_moco(queue_size=80)
    unused = method.queue[48:].clone()
    _train_tiny(method, 24, epochs=2)
    assert method.capacity == 48
    assert int(method.queue_ptr) == (2 * 48) % 48  # wrapped at the cap, not at 80
    assert torch.equal(method.queue[48:], unused)  # beyond the cap: never a negative, never written
    assert "moco-queue-size 80 capped to 48" in fedssl_log.text
    assert "2 views x 24 images" in fedssl_log.text


def test_a_queue_within_an_epoch_of_keys_is_used_whole_and_logs_nothing(fedssl_log):
    method = tiny_moco(queue_size=40)
    _train_tiny(method, 24, epochs=1)
    assert method.capacity == 40 and int(method.queue_ptr) == 48 % 40
    assert "capped" not in fedssl_log.text


def test_a_capped_queue_gives_only_its_first_entries_as_negatives():
    method = tiny_moco(queue_size=16)
    method.fit_to_data(images_per_epoch=5)  # 10 keys an epoch
    views = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2)
    with torch.no_grad():
        q1, q2 = method.projector(method.encoder(torch.cat(views))).chunk(2)
        k1, k2 = method.key_projector(method.key_encoder(torch.cat(views))).chunk(2)
        negatives = method.queue[:10]
        expected = (moco_loss(q1, k2, negatives, method.temperature)
                    + moco_loss(q2, k1, negatives, method.temperature)) / 2
        assert method(*views).item() == pytest.approx(expected.item(), abs=1e-6)
    method.enqueue(torch.randn(6, 4))
    method.enqueue(torch.randn(6, 4))  # slots 6..9, then 0, 1
    assert int(method.queue_ptr) == 2


# --- shared / local ----------------------------------------------------------------------

def test_simclr_shares_everything():
    method = build_method(small("simclr"))
    assert method.local_state() == {}
    assert {k.split(".")[0] for k in method.shared_state()} == {"encoder", "projector"}


def test_mocov2_keeps_queue_and_key_networks_local():
    method = build_method(small("mocov2", moco_queue_size=128))
    assert {k.split(".")[0] for k in method.shared_state()} == {"encoder", "projector"}
    local = method.local_state()
    assert {k.split(".")[0] for k in local} == {"key_encoder", "key_projector", "queue", "queue_ptr"}
    assert local["queue"].shape == (128, 32)


def test_mocov2_local_state_survives_a_record_round_trip():
    method = build_method(small("mocov2", moco_queue_size=64))
    method.enqueue(torch.randn(10, 32))
    with torch.no_grad():
        for p in method.key_encoder.parameters():
            p.mul_(0.5)
    local = method.local_state()
    other = build_method(small("mocov2", moco_queue_size=64))
    other.load_partial(from_record(to_record(local)))
    restored = other.local_state()
    assert set(restored) == set(local)
    assert all(torch.equal(restored[k], v) for k, v in local.items())
    assert int(other.queue_ptr) == 10


# --- building and training ---------------------------------------------------------------

def test_build_method_reads_the_contrastive_config_keys():
    simclr = build_method(RunConfig(method="simclr", simclr_temperature=0.5))
    assert isinstance(simclr, SimCLR) and simclr.temperature == 0.5
    moco = build_method(RunConfig(method="mocov2", moco_temperature=0.1, moco_queue_size=100, moco_tau=0.95))
    assert isinstance(moco, MoCoV2)
    assert (moco.temperature, len(moco.queue), moco.tau) == (0.1, 100, 0.95)


def test_unknown_method_still_fails():
    with pytest.raises(ValueError, match="mocov2"):
        build_method(RunConfig(method="nope"))
    with pytest.raises(ConfigError, match="method='nope'"):
        RunConfig(method="nope").validate()


@pytest.mark.parametrize("name", ["simclr", "mocov2"])
def test_a_few_real_steps_change_the_shared_weights(name):
    cfg = small(name, moco_queue_size=80)
    method = build_method(cfg)
    method.init_local()
    before = {k: v.clone() for k, v in method.shared_state().items()}
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    result = train_epochs(method, images, TwoViewAugment(AugmentConfig(image_size=32)), epochs=1,
                          settings=StepSettings(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4),
                          device=torch.device("cpu"), seed=0)
    assert result.steps == 4 and math.isfinite(result.loss) and result.loss > 0
    after = method.shared_state()
    changed = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("projector.") for k in changed)
    if name == "mocov2":
        assert int(method.queue_ptr) == (4 * 32) % 80  # 2 x 16 keys a step, wrapped once
        assert not torch.equal(method.key_encoder.conv1.weight, before["encoder.conv1.weight"])
