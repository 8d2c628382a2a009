"""Differential privacy and SecAgg+ on the in-process grid with the real ClientApp, Flower's
real DP wrappers, clipping mods and SecAgg+ workflow and mod (docs/privacy.md)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedssl.client.app import app as client_app
from fedssl.client.secure import SecureRoundClient
from fedssl.common.checkpoint import load_encoder
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.methods import build_method
from fedssl.common.evaluation import embed
from fedssl.common.records import to_record
from fedssl.server.accounting import exact_epsilon
from fedssl.server.app import run_federation
from fedssl.server.dp import batchnorm_statistics_from
from fedssl.server.resume import load_run_state
from fedssl.server.secure import SecureRounds
from fedssl.server.strategies import build_strategy
from fedssl.simulations.inprocess_grid import InProcessGrid
from fedssl.common.synthetic import write_image_folder
from conftest import fast_config

DP = dict(max_update_norm_ratio=0.0, amp=False)


class RecordingGrid(InProcessGrid):
    """Delivers a copy of each message, as the engines do (they serialize it), and keeps
    the replies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    @property
    def run(self):
        return type("Run", (), {"run_id": 1})()

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive([copy.deepcopy(m) for m in messages], timeout=timeout)
        self.replies += replies
        return replies


def floats(record) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in record.items() if v.numpy().dtype.kind == "f"}


def is_statistic(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def weights(record) -> dict[str, np.ndarray]:
    """The float entries that are learned weights (not BatchNorm statistics), in float64."""
    return {k: v for k, v in floats(record).items() if not is_statistic(k)}


def failing_at(nodes: set[int]):
    """The ClientApp, except that `nodes` raise in every round (an error reply)."""
    def app(msg: Message, context: Context) -> Message:
        if context.node_id in nodes:
            raise RuntimeError("site broke")
        return client_app(msg, context)
    return app


def one_dp_round(cfg, num_nodes=3, app=client_app, node_config=None):
    """Round 1 driven by hand: the global model sent, the replies, the aggregate."""
    strategy = build_strategy(cfg)
    grid = RecordingGrid(app, num_nodes=num_nodes, node_config=node_config)
    sent = to_record(build_method(cfg).shared_state())
    messages = strategy.configure_train(1, sent, ConfigRecord(cfg.to_mapping()), grid)
    replies = grid.send_and_receive(messages)
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, sent, replies, arrays


# --- differential privacy -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_every_update_reaching_aggregation_is_clipped_and_counters_stay_as_sent(small_image_folder, tmp_path, mode):
    clip = 0.05  # far below an unclipped round's update norm, so every site is clipped
    cfg = fast_config(small_image_folder, tmp_path, dp=mode, dp_clip_norm=clip, **DP)
    _, sent, replies, _ = one_dp_round(cfg)
    glob = floats(sent)
    assert len(replies) == 3 and not any(r.has_error() for r in replies)
    for reply in replies:
        arrays = reply.content["arrays"]
        update = np.sqrt(sum(((v - glob[k]) ** 2).sum() for k, v in floats(arrays).items()))
        assert update <= clip * (1 + 1e-5)
        assert update == pytest.approx(clip, rel=1e-3)  # clipped, not merely small
        counters = {k: v.numpy() for k, v in arrays.items() if "num_batches_tracked" in k}
        assert counters and all(c.dtype == np.int64 and c == sent[k].numpy() for k, c in counters.items())
    if mode == "adaptive":
        assert all(r.content["metrics"]["norm_bit"] == 1 for r in replies)


def test_the_noise_is_z_c_over_the_sampled_count_also_when_a_site_fails(small_image_folder, tmp_path):
    z, clip = 2.0, 0.05
    cfg = fast_config(small_image_folder, tmp_path, dp="fixed", dp_clip_norm=clip, dp_noise_multiplier=z, **DP)
    strategy, sent, replies, arrays = one_dp_round(cfg, app=failing_at({1001}))
    glob = weights(sent)
    updates = [{k: v - glob[k] for k, v in weights(r.content["arrays"]).items()} for r in replies if not r.has_error()]
    assert len(updates) == 2 and strategy.round_record(1).clients_failed == 1
    # 3 sampled, 2 replied: the noiseless aggregate adds the sum of the updates over 3, and
    # the noise is calibrated to the same 3 (a failed site counts as a zero update).
    noise = np.concatenate([(arrays[k].numpy().astype(np.float64) - glob[k] - sum(u[k] for u in updates) / 3).ravel()
                            for k in glob])
    expected = z * clip / 3
    assert noise.size > 10_000
    assert noise.std() == pytest.approx(expected, rel=0.05)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(noise.size)
    assert strategy.releases == 1


def unequal_sites(root, per_class=(1, 2, 8)):
    """Three site folders of 4, 8 and 32 images: example weights would differ 8-fold."""
    folders = [write_image_folder(root / f"site{i}", per_class=n, seed=i) for i, n in enumerate(per_class)]
    return lambda i: {"data-path": str(folders[i])}


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_under_dp_every_site_weighs_the_same_whatever_its_image_count(small_image_folder, tmp_path, mode):
    cfg = fast_config(small_image_folder, tmp_path / "run", dp=mode, dp_clip_norm=0.05, dp_noise_multiplier=0.0, **DP)
    _, sent, replies, arrays = one_dp_round(cfg, node_config=unequal_sites(tmp_path))
    assert len(replies) == 3 and not any(r.has_error() for r in replies)
    got = weights(arrays)
    clipped = [weights(r.content["arrays"]) for r in replies]
    plain = {k: np.mean([c[k] for c in clipped], axis=0) for k in got}
    by_examples = {k: np.average([c[k] for c in clipped], axis=0, weights=[4, 8, 32]) for k in got}
    assert max(np.abs(got[k] - by_examples[k]).max() for k in got) > 1e-4  # the two differ here
    assert all(np.allclose(got[k], plain[k], rtol=0, atol=1e-6) for k in got)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_under_dp_a_failed_site_is_a_zero_update_over_the_sampled_count(small_image_folder, tmp_path, mode):
    cfg = fast_config(small_image_folder, tmp_path / "run", dp=mode, dp_clip_norm=0.05, dp_noise_multiplier=0.0, **DP)
    strategy, sent, replies, arrays = one_dp_round(cfg, app=failing_at({1002}), node_config=unequal_sites(tmp_path))
    glob = weights(sent)
    clipped = [weights(r.content["arrays"]) for r in replies if not r.has_error()]
    assert len(clipped) == 2 and strategy.round_record(1).clients_ok == 2
    got = weights(arrays)
    expected = {k: glob[k] + sum(c[k] - glob[k] for c in clipped) / 3 for k in glob}
    assert all(np.allclose(got[k], expected[k], rtol=0, atol=1e-6) for k in glob)


def test_dp_replies_release_no_batchnorm_statistics_and_the_global_ones_stay_valid(small_image_folder, tmp_path):
    # A noise std of 5/3 per entry would make many running variances negative if noised.
    cfg = fast_config(small_image_folder, tmp_path, dp="fixed", dp_clip_norm=1.0, dp_noise_multiplier=5.0, **DP)
    _, sent, replies, arrays = one_dp_round(cfg)
    statistics = [k for k in sent.keys() if is_statistic(k)]
    assert any(k.endswith("running_var") for k in statistics)
    for reply in replies:  # each site sends back the statistics it received: nothing of its own
        for key in statistics:
            assert np.array_equal(reply.content["arrays"][key].numpy(), sent[key].numpy()), key
    for key in statistics:  # the global statistics are kept, not averaged or noised
        assert np.array_equal(arrays[key].numpy(), sent[key].numpy()), key
        assert arrays[key].numpy().dtype == sent[key].numpy().dtype


def test_dp_leaves_parameters_no_site_trains_as_sent_and_noises_the_others(small_image_folder, tmp_path):
    # A ViT's sine-cosine position embeddings are fixed: noise on them would pile up round
    # after round, as nothing trains them back.
    cfg = fast_config(small_image_folder, tmp_path, method="mae", image_size=32, dp="fixed", dp_clip_norm=1.0,
                      dp_noise_multiplier=1.0, **DP)
    _, sent, replies, arrays = one_dp_round(cfg)
    fixed = [k for k in sent.keys() if k.endswith("pos_embedding")]
    assert fixed and all(not r.has_error() for r in replies)
    for key in fixed:
        assert np.array_equal(arrays[key].numpy(), sent[key].numpy()), key
    assert not np.allclose(arrays["encoder.class_token"].numpy(), sent["encoder.class_token"].numpy())


def test_adaptive_clipping_grows_the_norm_when_sites_are_clipped_counting_over_the_sampled(small_image_folder, tmp_path):
    # Every site is clipped at 0.05; count noise ~0. Andrew et al.: fraction not clipped, the
    # bits centred (+-1/2) with the failed site adding 0, over the 3 sampled: (2 x -1/2) / 3
    # + 1/2 = 1/6, below the target 0.5, so C grows by exp(0.2 x (0.5 - 1/6)).
    cfg = fast_config(small_image_folder, tmp_path, dp="adaptive", dp_clip_norm=0.05, dp_noise_multiplier=0.0,
                      dp_clipped_count_stddev=1e-9, dp_clip_norm_lr=0.2, dp_target_quantile=0.5, **DP)
    strategy, *_ = one_dp_round(cfg, app=failing_at({1002}))
    assert strategy.clipping_norm == pytest.approx(0.05 * math.exp(0.2 * (0.5 - 1 / 6)), rel=1e-6)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_the_noise_cannot_be_replayed_from_the_rng_state_a_checkpoint_saves(small_image_folder, tmp_path, mode):
    # Every checkpoint saves numpy's global RNG state (server/resume.py, for resuming). Noise
    # drawn from that RNG could be replayed by whoever holds a checkpoint (and MT19937 can be
    # stepped back to earlier rounds), giving the noiseless mean: DP would be void.
    cfg = fast_config(small_image_folder, tmp_path, dp=mode, dp_clip_norm=1.0, dp_noise_multiplier=1.0,
                      dp_clipped_count_stddev=1.0, **DP)
    strategy = build_strategy(cfg)
    mean = to_record(build_method(cfg).shared_state())
    strategy.num_sampled_clients = strategy._sampled = 3
    saved = np.random.get_state()
    released, norms = [], []
    for _ in range(2):
        np.random.set_state(saved)  # as a checkpoint holds it
        strategy.clipping_norm = 1.0
        released.append(weights(strategy._add_noise_to_aggregated_arrays(mean)))
        strategy.after_release([])  # adaptive: the noisy count moves C
        norms.append(strategy.clipping_norm)
    assert any(not np.array_equal(released[0][k], released[1][k]) for k in released[0])
    if mode == "adaptive":
        assert norms[0] != norms[1]


def test_batchnorm_statistics_are_estimated_from_the_servers_images(small_image_folder, tmp_path):
    method = build_method(fast_config(small_image_folder, tmp_path)).eval()
    layers = [m for net in (method.encoder, method.projector) for m in net.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(layers) > 2
    seen = {}
    layers[0].register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0].detach().clone()))
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8)
    batchnorm_statistics_from([method.encoder, method.projector], images, batch_size=64)
    first = seen["input"].double()
    assert torch.allclose(layers[0].running_mean.double(), first.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(layers[0].running_var.double(), first.var(dim=(0, 2, 3)), rtol=1e-4)
    assert all(torch.isfinite(m.running_var).all() and (m.running_var > 0).all() for m in layers)
    assert not method.training and all(m.momentum == 0.1 for m in layers)  # modes and momenta restored
    assert torch.isfinite(embed(method.encoder, images)).all()


def test_a_dp_run_releases_no_per_site_metrics(small_image_folder, tmp_path):
    cfg = fast_config(small_image_folder, tmp_path / "run", dp="adaptive", dp_clip_norm=0.05, strategy="fedema",
                      num_rounds=2, **DP)
    grid = RecordingGrid(client_app, num_nodes=2)
    run_federation(grid, cfg)
    for reply in grid.replies:  # what leaves a site: the weight Flower needs, set to 1, and the norm bit
        metrics = dict(reply.content["metrics"])
        metrics.pop("dp-unit-weight", None)  # added by the server on arrival
        assert metrics.keys() == {"num-examples", "norm_bit"} and metrics["num-examples"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert row["aggregated"] and row["train_loss"] is None and row["client_images_per_second"] is None
        assert "client_rules" not in row and row["skipped_images"] == 0 and row["client_train_seconds"] == 0
    # the exported encoder's BatchNorm statistics are the server's estimate from its own bank,
    # not the initial ones (no site sent any): finite, positive, and no longer mean 0 / var 1
    encoder = load_encoder(tmp_path / "run" / "encoder.safetensors").eval()
    variances = [m.running_var for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert variances and all(torch.isfinite(v).all() and (v > 0).all() for v in variances)
    assert not all(torch.allclose(v, torch.ones_like(v)) for v in variances)
    assert torch.isfinite(encoder(torch.rand(2, 3, 16, 16))).all()


def test_a_dp_run_completes_reports_epsilon_and_resumes_its_accounting(small_image_folder, tmp_path):
    settings = dict(dp="adaptive", dp_clip_norm=0.05, num_rounds=3, **DP)
    run_federation(RecordingGrid(client_app, num_nodes=2),
                   fast_config(small_image_folder, tmp_path / "run", **settings))
    whole = load_run_state(tmp_path / "run" / "checkpoint.safetensors")
    assert int(whole.server_state["dp"]["releases"]) == 3

    # a resumed run continues the adaptive clipping norm and the count of releases
    partial = run_federation(RecordingGrid(client_app, num_nodes=2),
                             fast_config(small_image_folder, tmp_path / "part", **{**settings, "num_rounds": 2}))
    assert partial["privacy"]["releases"] == 2
    state = load_run_state(tmp_path / "part" / "checkpoint.safetensors")
    summary = run_federation(RecordingGrid(client_app, num_nodes=2),
                             fast_config(small_image_folder, tmp_path / "part", resume=True, **settings))
    privacy = summary["privacy"]
    assert privacy["releases"] == 3 and privacy["dp"] == "adaptive"
    assert privacy["epsilon"] == pytest.approx(exact_epsilon(1.0, 3, 1e-5))
    assert float(state.server_state["dp"]["clipping-norm"]) != 0.05  # it adapted, and was saved
    assert summary["final"]["aggregated"] and summary["final"]["round"] == 3


# --- refused combinations -------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(dp="fixed", strategy="ldawa", max_update_norm_ratio=0.0),
     "strategy='ldawa' is invalid with dp='fixed': allowed: fedavg, fedu, fedema"),
    (dict(dp="fixed", strategy="fedadam", max_update_norm_ratio=0.0), "strategy='fedadam' is invalid with dp='fixed'"),
    (dict(dp="adaptive"), "max-update-norm-ratio=10.0 is invalid with dp='adaptive': must be 0 (off)"),
    (dict(dp="adaptive", max_update_norm_ratio=0.0, dp_noise_multiplier=3.0),
     "dp-noise-multiplier=3.0 is invalid with dp-clipped-count-stddev=1.0: must be < 2 x"),
    (dict(secure_aggregation=True, strategy="ldawa", max_update_norm_ratio=0.0),
     "strategy='ldawa' is invalid with secure-aggregation=true: allowed: fedavg, fedu, fedema"),
    (dict(secure_aggregation=True, strategy="fedavgm", max_update_norm_ratio=0.0),
     "strategy='fedavgm' is invalid with secure-aggregation=true"),
    (dict(secure_aggregation=True),
     "max-update-norm-ratio=10.0 is invalid with secure-aggregation=true: must be 0 (off)"),
    (dict(secure_aggregation=True, max_update_norm_ratio=0.0, dp="fixed"),
     "dp='fixed' is invalid with secure-aggregation=true"),
    (dict(secure_aggregation=True, max_update_norm_ratio=0.0, secagg_shares=3, secagg_threshold=3, min_train_clients=3),
     "secagg-threshold=3 is invalid with secagg-shares=3: must be < secagg-shares"),
    (dict(secure_aggregation=True, max_update_norm_ratio=0.0, secagg_threshold=3),
     "secagg-threshold=3 is invalid with min-train-clients=2: must be <= min-train-clients"),
])
def test_incompatible_privacy_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError) as err:
        build_strategy(RunConfig(**settings))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("values, fragment", [
    ({"dp": "local"}, "dp='local' is invalid: allowed: none, fixed, adaptive"),
    ({"secagg-shares": 2}, "secagg-shares=2 is invalid: must be 0 (every sampled client) or >= 3"),
    ({"secagg-quant-bits": 31}, "secagg-quant-bits=31 is invalid: must be in [8, 30]"),
    ({"max-update-norm-ratio": 0.5}, "max-update-norm-ratio=0.5 is invalid: must be 0 (off) or >= 1.0"),
])
def test_bad_privacy_values_name_key_value_and_allowed(values, fragment):
    with pytest.raises(ConfigError, match="invalid") as err:
        RunConfig.from_mapping(values)
    assert fragment in str(err.value)


# --- SecAgg+ --------------------------------------------------------------------------------

@pytest.fixture
def observed(monkeypatch):
    """What each site computed (its true update, before masking) and what the server-side
    aggregation received."""
    seen = {"updates": [], "aggregate_fit": []}
    fit, aggregate_fit = SecureRoundClient.fit, SecureRounds.aggregate_fit

    def recording_fit(self, parameters, config):
        update, n, metrics = fit(self, parameters, config)
        seen["updates"].append((int(config["server-round"]), self.context.node_id, update, n))
        return update, n, metrics

    def recording_aggregate_fit(self, server_round, results, failures):
        seen["aggregate_fit"].append((server_round, [r.parameters for _, r in results], len(failures)))
        return aggregate_fit(self, server_round, results, failures)

    monkeypatch.setattr(SecureRoundClient, "fit", recording_fit)
    monkeypatch.setattr(SecureRounds, "aggregate_fit", recording_aggregate_fit)
    return seen


def drops_in_round_1(nodes: set[int]):
    """A ClientApp whose `nodes` leave round 1 after the key exchange, before uploading."""
    def app(msg: Message, context: Context) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if (context.node_id in nodes and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
                and msg.content.config_records["fitins.config"]["server-round"] == 1):
            raise ConnectionError("site went offline")
        return client_app(msg, context)
    return app


def secure_config(folder, out, **changes):
    return fast_config(folder, out, secure_aggregation=True, secagg_max_weight=16.0, **DP, **changes)


def quantization_bound(cfg, num_sites: int, total_examples: int) -> float:
    """Each site's value n / max-weight * update is rounded to a step of 2 c / 2^bits."""
    step = 2 * cfg.secagg_clip_range / 2 ** cfg.secagg_quant_bits
    return num_sites * step * cfg.secagg_max_weight / total_examples + 1e-9


def test_secagg_server_sees_only_the_unmasked_mean_which_matches_plain_averaging(small_image_folder, tmp_path, observed):
    cfg = secure_config(small_image_folder, tmp_path / "run", num_rounds=1, min_train_clients=3)
    grid = RecordingGrid(client_app, num_nodes=3)
    summary = run_federation(grid, cfg)
    assert summary["final"]["aggregated"] and summary["final"]["clients_ok"] == 3
    assert summary["privacy"]["secure_aggregation"] is True

    # The uploads: no ArrayRecord content, only masked integer vectors.
    uploads = [r for r in grid.replies if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(uploads) == 3
    assert all(len(record) == 0 for r in uploads for record in r.content.array_records.values())

    # The aggregation code got the same vector in every result: the mean, no one's update.
    (server_round, received, failures), = observed["aggregate_fit"]
    assert server_round == 1 and failures == 0 and len(received) == 3
    vectors = [parameters_to_ndarrays(p) for p in received]
    assert all(all(np.array_equal(a, b) for a, b in zip(vectors[0], v)) for v in vectors)
    updates = [(u, n) for _, _, u, n in observed["updates"]]
    total = sum(n for _, n in updates)
    plain = [sum(n * u[i] for u, n in updates) / total for i in range(len(vectors[0]))]
    error = max(np.abs(a - b).max() for a, b in zip(vectors[0], plain))
    assert error <= quantization_bound(cfg, 3, total)
    for u, _ in updates:  # and it is none of the sites' own updates
        assert max(np.abs(a - b).max() for a, b in zip(vectors[0], u)) > 100 * quantization_bound(cfg, 3, total)


def test_secagg_round_survives_a_site_dropping_out_after_sharing_its_keys(small_image_folder, tmp_path, observed):
    cfg = secure_config(small_image_folder, tmp_path / "run", num_rounds=2, min_train_clients=3,
                        secagg_threshold=2)
    summary = run_federation(RecordingGrid(drops_in_round_1({1003}), num_nodes=4), cfg)
    assert summary["final"]["aggregated"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients_ok"], r["clients_failed"], r["aggregated"]) for r in rows] == \
        [(0, 0, 0, False), (1, 3, 1, True), (2, 4, 0, True)]
    assert "dropped out of the SecAgg+ round" in rows[1]["failures"]["1003"]
    # The dropped site's masks were reconstructed from its shares: round 1's mean is the
    # survivors' mean.
    survivors = [(u, n) for rnd, node, u, n in observed["updates"] if rnd == 1 and node != 1003]
    total = sum(n for _, n in survivors)
    mean = parameters_to_ndarrays(observed["aggregate_fit"][0][1][0])
    plain = [sum(n * u[i] for u, n in survivors) / total for i in range(len(mean))]
    assert max(np.abs(a - b).max() for a, b in zip(mean, plain)) <= quantization_bound(cfg, 3, total)


def test_secagg_round_below_the_threshold_keeps_the_model_and_the_run_goes_on(small_image_folder, tmp_path, observed):
    cfg = secure_config(small_image_folder, tmp_path / "run", num_rounds=2, min_train_clients=3,
                        secagg_threshold=3)
    summary = run_federation(RecordingGrid(drops_in_round_1({1002, 1003}), num_nodes=4), cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["aggregated"]) for r in rows] == [(0, False), (1, False), (2, True)]
    assert rows[1]["knn_top1"] == rows[0]["knn_top1"]  # the global model was kept
    assert [rnd for rnd, *_ in observed["aggregate_fit"]] == [2]
    assert summary["final"]["clients_ok"] == 4
