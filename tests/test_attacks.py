"""The simulation's hostile sites (simulations/attacks.py): each attack changes the attacking
site's reply as docs/security.md says and leaves the other sites' alone; a deployed ClientApp
cannot be made to attack; and one round with a sign-flipping site moves FedAvg's global model
away from the honest sites' mean, and FedMedian's less."""
from __future__ import annotations

import ast
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedssl.client.app import app as client_app, train_round
from fedssl.client.local_data import local_images
from fedssl.common.config import ATTACKS, ConfigError, RunConfig
from fedssl.common.methods import build_method
from fedssl.common.records import from_record, to_record
from fedssl.server.app import run_federation
from fedssl.server.resume import load_run_state
from fedssl.server.validation import screen, spec_of
from fedssl.server.npy_view import as_numpy
from fedssl.simulations import attacks
from fedssl.simulations.inprocess_grid import InProcessGrid
from fedssl.common.synthetic import write_image_folder
from conftest import fast_config

ROOT = Path(__file__).resolve().parents[1]
SITES = 3


def messages(cfg: RunConfig, count: int) -> list[Message]:
    """`count` copies of round 1's train message for `cfg`, all from the same global model."""
    InProcessGrid(client_app, num_nodes=1)  # sets the process's task identity
    torch.manual_seed(0)
    state = build_method(cfg).shared_state()
    config = ConfigRecord({**cfg.to_mapping(), "server-round": 1})
    return [Message(RecordDict({"arrays": to_record(state), "config": config}), 1000 + i, "train")
            for i in range(count)]


def context(partition: int, node_id: int = 1000) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={"partition-id": partition, "num-partitions": SITES},
                   state=RecordDict(), run_config={})


def reply(app, cfg: RunConfig, partition: int) -> tuple[dict, dict, Message]:
    """The global model sent, the arrays that came back, and the reply itself."""
    msg = messages(cfg, 1)[0]
    sent = from_record(msg.content["arrays"])
    answer = app(msg, context(partition))
    assert not answer.has_error(), answer.error.reason if answer.has_error() else ""
    return sent, from_record(answer.content["arrays"]), answer


def update(sent: dict, got: dict) -> dict[str, torch.Tensor]:
    return {k: got[k].double() - sent[k].double() for k in sent if sent[k].is_floating_point()}


def norm(arrays: dict) -> float:
    return math.sqrt(sum(float((v ** 2).sum()) for v in arrays.values()))


def flat(arrays: dict) -> torch.Tensor:
    return torch.cat([arrays[k].flatten() for k in sorted(arrays)])


@pytest.fixture
def honest(small_image_folder, tmp_path):
    """Partition 0's honest reply: what an attacking partition 0 would have sent."""
    cfg = fast_config(small_image_folder, tmp_path)
    sent, got, _ = reply(client_app, cfg, 0)
    return sent, got


def attacked(folder, tmp_path, attack: str, partition: int = 0, **changes):
    cfg = fast_config(folder, tmp_path, attack=attack, **changes)
    return reply(attacks.app, cfg, partition)


def test_every_attack_the_config_allows_has_its_code():
    assert {"none", *attacks.UPDATE_ATTACKS, *attacks.DATA_ATTACKS} == set(ATTACKS)


def test_sign_flip_sends_the_global_model_minus_the_honest_update(small_image_folder, tmp_path, honest):
    sent, got, _ = attacked(small_image_folder, tmp_path, "sign-flip")
    honest_update, sent_update = update(*honest), update(sent, got)
    assert norm(honest_update) > 0
    for key, value in honest_update.items():
        # float32 arrays: the flip is exact up to the rounding of global + update
        torch.testing.assert_close(sent_update[key], -value, atol=1e-6, rtol=1e-5)
    # step counters go as the honest site's: they are not part of the update's norm
    assert all(torch.equal(got[k], honest[1][k]) for k in got if not got[k].is_floating_point())


def test_scaled_flip_sits_just_inside_the_norm_bound_so_screening_accepts_it(small_image_folder, tmp_path, honest):
    sent, got, hostile = attacked(small_image_folder, tmp_path, "scaled-flip")
    honest_update, sent_update = update(*honest), update(sent, got)
    scale = 0.9 * 10.0  # attack-scale x max-update-norm-ratio, the defaults
    assert norm(sent_update) == pytest.approx(scale * norm(honest_update), rel=1e-5)
    cosine = float(flat(sent_update) @ flat(honest_update)) / (norm(sent_update) * norm(honest_update))
    assert cosine == pytest.approx(-1.0, abs=1e-6)

    def screened(attack_reply: Message):
        # The attacker among two honest twins of itself: the round's median is its honest norm.
        cfg = fast_config(small_image_folder, tmp_path)
        twins = [client_app(msg, context(0, msg.metadata.dst_node_id)) for msg in messages(cfg, 3)[1:]]
        replies = [attack_reply] + twins
        reference = {k: v.numpy() for k, v in sent.items()}
        return screen(replies, spec_of(reference), reference, max_norm_ratio=10.0)

    assert screened(hostile).rejected == {}
    _, _, too_far = attacked(small_image_folder, tmp_path, "scaled-flip", attack_scale=1.05)
    assert "update norm" in screened(too_far).rejected[1000]


def test_random_and_constant_updates_have_the_honest_norm(small_image_folder, tmp_path, honest):
    honest_update = update(*honest)
    sent, got, _ = attacked(small_image_folder, tmp_path, "random")
    noise = update(sent, got)
    assert norm(noise) == pytest.approx(norm(honest_update), rel=1e-4)
    cosine = float(flat(noise) @ flat(honest_update)) / (norm(noise) * norm(honest_update))
    assert abs(cosine) < 0.05  # a direction of its own
    _, again, _ = attacked(small_image_folder, tmp_path, "random")
    assert all(torch.equal(again[k], got[k]) for k in got)  # seeded: the same run repeats

    sent, got, _ = attacked(small_image_folder, tmp_path, "constant")
    constant = flat(update(sent, got))
    assert norm(update(sent, got)) == pytest.approx(norm(honest_update), rel=1e-4)
    value = norm(honest_update) / math.sqrt(constant.numel())
    # one value everywhere, up to the rounding of global + value in float32
    torch.testing.assert_close(constant, torch.full_like(constant, value), atol=1e-6, rtol=1e-3)


def test_noise_images_train_the_honest_code_on_noise(small_image_folder, tmp_path, honest):
    cfg = fast_config(small_image_folder, tmp_path, attack="noise-images")
    node = {"partition-id": 0, "num-partitions": SITES}
    own, noise = local_images(cfg, node), attacks.noise_images(cfg, node)
    assert noise.images.shape == own.images.shape and noise.images.dtype == torch.uint8
    assert not torch.equal(noise.images, own.images[:])
    assert abs(float(noise.images.float().mean()) - 127.5) < 5  # uniform over 0..255
    assert torch.equal(attacks.noise_images(cfg, node).images, noise.images)  # the same every round

    sent, got, hostile = attacked(small_image_folder, tmp_path, "noise-images")
    assert hostile.content["metrics"]["num-examples"] == len(own)
    assert any(not torch.equal(got[k], honest[1][k]) for k in got if got[k].is_floating_point())
    # what the honest code makes of the noise images, nothing else
    msg = messages(cfg, 1)[0]
    direct, _ = train_round(msg.content["config"], msg.content["arrays"], context(0), images=attacks.noise_images)
    assert all(torch.equal(got[k], direct[k]) for k in got)


@pytest.mark.parametrize("attack", ["sign-flip", "noise-images"])  # an update and a data attack
def test_sites_past_attack_sites_send_their_honest_reply(small_image_folder, tmp_path, attack):
    cfg = fast_config(small_image_folder, tmp_path)
    _, own, _ = reply(client_app, cfg, 2)
    _, got, _ = attacked(small_image_folder, tmp_path, attack, partition=2, attack_sites=2)
    assert all(torch.equal(got[k], own[k]) for k in own)
    _, second, _ = attacked(small_image_folder, tmp_path, attack, partition=1, attack_sites=2)
    _, second_own, _ = reply(client_app, cfg, 1)
    assert any(not torch.equal(second[k], second_own[k]) for k in second_own)  # partition 1 attacks


def test_a_deployed_client_app_ignores_the_attack_keys(small_image_folder, tmp_path, honest):
    cfg = fast_config(small_image_folder, tmp_path, attack="sign-flip", attack_sites=SITES)
    _, got, _ = reply(client_app, cfg, 0)
    assert all(torch.equal(got[k], honest[1][k]) for k in got)


def test_nothing_a_deployed_site_runs_can_reach_the_attacks():
    """A SuperNode runs the app's `clientapp` component; neither it nor anything in client/,
    common/ or server/ imports simulations/, where the attacks live."""
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components["clientapp"] == "fedssl.client.app:app"
    reaching = []
    for package in ("client", "common", "server"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                reaching += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "simulations"]
    assert reaching == []


@pytest.mark.parametrize("changes, num_clients, fragment", [
    (dict(attack="sign-flip", attack_sites=4), 3, "attack-sites=4 is invalid: must be <= num-clients (3)"),
    (dict(attack="random", secure_aggregation=True, max_update_norm_ratio=0.0), 3,
     "attack='random' is invalid with secure-aggregation=true"),
    (dict(attack="scaled-flip", max_update_norm_ratio=0.0), 3,
     "attack='scaled-flip' is invalid with max-update-norm-ratio=0"),
])
def test_attacks_the_harness_cannot_run_are_refused_in_one_line(changes, num_clients, fragment):
    with pytest.raises(ConfigError) as err:
        attacks.check(RunConfig(**changes), num_clients)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key, value, fragment", [
    ("attack", "label-flip", "attack='label-flip' is invalid: allowed: none, sign-flip, scaled-flip"),
    ("attack-sites", 0, "attack-sites=0 is invalid: must be >= 1"),
    ("attack-scale", 0.0, "attack-scale=0.0 is invalid: must be > 0"),
])
def test_bad_attack_settings_name_key_and_value(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert fragment in str(err.value)


# --- one round, five sites, the first sign-flipping --------------------------------------------

@pytest.fixture(scope="module")
def agreeing_folder(tmp_path_factory) -> Path:
    """4 classes x 48 images: about 30 a site, one batch of 32 each, so the honest sites'
    updates agree (cosine about 0.75 here; batches of 4 give about 0.3, where a coordinate's
    median is as far from the honest mean as one flipped update takes FedAvg's mean)."""
    return write_image_folder(tmp_path_factory.mktemp("agreeing-images"), per_class=48)


def test_one_sign_flipping_site_of_five_moves_fedavg_and_fedmedian_less(agreeing_folder, tmp_path):
    distances = {}
    for rule in ("fedavg", "fedmedian"):
        replies: dict[int, tuple[dict, float]] = {}

        def recording(msg: Message, ctx: Context) -> Message:
            answer = attacks.app(msg, ctx)
            replies[int(ctx.node_config["partition-id"])] = (
                {k: v.astype(np.float64) for k, v in as_numpy(answer.content["arrays"]).items()},
                float(answer.content["metrics"]["num-examples"]))
            return answer

        out = tmp_path / rule
        cfg = fast_config(agreeing_folder, out, strategy=rule, num_rounds=1, min_train_clients=5, batch_size=32,
                          num_malicious=1, attack="sign-flip", attack_sites=1)
        run_federation(InProcessGrid(recording, num_nodes=5), cfg)
        honest = [replies[p] for p in range(1, 5)]
        weights = sum(n for _, n in honest)
        final = load_run_state(out / "checkpoint.safetensors").shared
        keys = [k for k in final if final[k].is_floating_point() and "running" not in k]
        mean = {k: sum(arrays[k] * n for arrays, n in honest) / weights for k in keys}
        distances[rule] = math.sqrt(sum(float(((final[k].double().numpy() - mean[k]) ** 2).sum()) for k in keys))
    # about 0.5 here: the median of five agreeing updates, one flipped, stays near the others
    assert distances["fedmedian"] < 0.75 * distances["fedavg"], distances
