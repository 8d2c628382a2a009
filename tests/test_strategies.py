"""Aggregation rules beyond FedAvg: each rule's arithmetic on hand-made arrays, then whole
runs on the in-process grid with the real ClientApp."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fedssl.client.app import MEMO_KEY, PREVIOUS_KEY, app as client_app
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.global_updates import Previous, fedema, fedu, rule_for
from fedssl.common.global_updates.divergence import encoder_divergence
from fedssl.common.methods import build_method
from fedssl.common.methods.base import SSLMethod
from fedssl.server.app import run_federation
from fedssl.server.resume import load_run_state
from fedssl.server.strategies import build_strategy
from fedssl.server.strategies.ldawa import layer_weights, ldawa_aggregate, weight_summary
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config


class Tiny(SSLMethod):
    """Two encoder kernels around a BatchNorm, a projector and (optionally) a predictor."""

    shared_prefixes = ("encoder.", "projector.", "predictor.")

    def __init__(self, predictor: bool = True):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2, bias=False))
        self.projector = nn.Linear(2, 2)
        if predictor:
            self.predictor = nn.Linear(2, 2)


def filled(value: float, counter: int = 0, **kernels) -> dict[str, torch.Tensor]:
    """Tiny's shared state with every float entry `value`, BN's counter `counter`, and the
    named encoder kernels (k0 = encoder.0.weight, k2 = encoder.2.weight) as given."""
    state = {k: (torch.tensor(counter) if not v.is_floating_point() else torch.full_like(v, value))
             for k, v in Tiny().shared_state().items()}
    for name, rows in kernels.items():
        state[f"encoder.{name[1:]}.weight"] = torch.tensor(rows, dtype=torch.float32)
    return state


# --- the divergence both client-side rules act on -------------------------------------------

def test_divergence_is_the_mean_l2_distance_over_encoder_kernels_only():
    local = filled(0.0)
    incoming = filled(0.0, k0=[[3.0, 4.0], [0.0, 0.0]], k2=[[1.0, 0.0], [0.0, 0.0]])
    assert encoder_divergence(local, incoming) == pytest.approx((5.0 + 1.0) / 2)
    # biases, BatchNorm entries, the heads and the counter do not count
    for key in incoming:
        if not (key.startswith("encoder.") and incoming[key].ndim >= 2):
            incoming[key] = incoming[key] + 7
    assert encoder_divergence(local, incoming) == pytest.approx(3.0)


# --- FedEMA (its branches by round: tests/test_client_rules.py) ----------------------------

def test_fedema_later_rounds_keep_lambda_and_cap_mu_at_one():
    cfg = RunConfig(strategy="fedema", fedema_tau=0.7)
    lam = 0.7 / 3
    memo = {fedema.LAMBDA: lam}
    method = Tiny()
    shared = filled(0.0)
    # last training's d = 1.5: mu = lambda * d = 0.35
    decided_by = fedema.update(cfg, method, filled(1.0), Previous(shared, 4, 1.5), memo, 5)
    assert memo == {fedema.LAMBDA: lam} and decided_by["mu"] == pytest.approx(0.35)
    assert torch.allclose(method.shared_state()["predictor.weight"], torch.full((2, 2), 0.65))
    # d = 6: lambda * d = 1.4, capped: the client keeps its own weights
    fedema.update(cfg, method, filled(1.0), Previous(shared, 5, 6.0), memo, 6)
    assert all(torch.equal(v, shared[k]) for k, v in method.named_parameters() if k in shared)
    assert fedema.decay(3.0, lam) == pytest.approx(0.7) and fedema.decay(6.0, lam) == 1.0


def test_fedema_takes_the_global_model_without_a_previous_one_or_any_divergence():
    cfg = RunConfig(strategy="fedema")
    method, memo = Tiny(), {}
    incoming = filled(1.0, k0=[[3.0, 4.0], [0.0, 0.0]])
    assert fedema.update(cfg, method, incoming, None, memo, 1) == {
        "ema": 0.0, "divergence": 0.0, "mu": 0.0, "previous-round": 0.0}
    assert memo == {} and all(torch.equal(method.shared_state()[k], v) for k, v in incoming.items())
    # a training that did not move the encoder: no lambda can be scaled from d = 0, mu = 0
    fedema.update(cfg, method, incoming, Previous(filled(0.0), 1, 0.0), memo, 2)
    assert memo == {} and torch.equal(method.shared_state()["predictor.weight"], incoming["predictor.weight"])


# --- FedU (the divergence it decides by: tests/test_client_rules.py) ------------------------

@pytest.mark.parametrize("distance, predictor_from", [(0.3, "global"), (0.5, "local")])
def test_fedu_replaces_the_predictor_only_below_the_threshold(distance, predictor_from):
    cfg = RunConfig(strategy="fedu", fedu_threshold=0.4)
    method = Tiny()
    previous = Previous(filled(0.0), 1, distance)
    incoming = filled(1.0)
    decided_by = fedu.update(cfg, method, incoming, previous, {}, 2)
    assert decided_by == pytest.approx({"divergence": distance, "previous-round": 1.0,
                                        "global-predictor": float(predictor_from == "global")})
    got = method.shared_state()
    expected = incoming if predictor_from == "global" else previous.shared
    assert all(torch.equal(got[k], expected[k]) for k in got if k.startswith("predictor."))
    # the encoder and the projector always take the global model
    assert all(torch.equal(got[k], incoming[k]) for k in got if not k.startswith("predictor."))
    assert fedu.keeps_local_predictor(0.4, 0.4)  # at the threshold: no longer "below" it


def test_fedu_first_round_takes_the_whole_global_model():
    method, incoming = Tiny(), filled(1.0)
    assert fedu.update(RunConfig(strategy="fedu"), method, incoming, None, {}, 1) == {
        "divergence": 0.0, "global-predictor": 1.0, "previous-round": 0.0}
    assert all(torch.equal(method.shared_state()[k], v) for k, v in incoming.items())


def test_fedu_refuses_a_method_without_a_predictor_on_client_and_server(monkeypatch):
    headless = Tiny(predictor=False)
    cfg = RunConfig(strategy="fedu", method="simsiam")
    with pytest.raises(ConfigError, match="strategy='fedu' is invalid with method='simsiam': FedU keeps "
                                          "or replaces the predictor, and simsiam shares none"):
        fedu.update(cfg, headless, headless.shared_state(), None, {}, 1)
    import fedssl.server.strategies.fedu as server_fedu
    monkeypatch.setattr(server_fedu, "build_method", lambda cfg: headless)
    with pytest.raises(ConfigError, match="strategy='fedu' is invalid"):
        build_strategy(cfg)


def test_a_rules_declaration_alone_decides_what_may_stand_in_for_its_aggregate(
        monkeypatch, small_image_folder, tmp_path):
    from dataclasses import replace

    from fedssl.server.rounds import SSLRounds
    from fedssl.server.strategies import RULES
    from fedssl.server.strategies.fedavg import RULE as FEDAVG

    private = dict(dp="fixed", max_update_norm_ratio=0.0)
    # a new rule, FedAvg's aggregation but not declared a FedAvg mean: DP and SecAgg+ refuse it
    monkeypatch.setitem(RULES, "mine", replace(FEDAVG, fedavg_mean=False))
    for settings in (private, dict(secure_aggregation=True, max_update_norm_ratio=0.0)):
        with pytest.raises(ConfigError, match="strategy='mine' is invalid with .*allowed: fedavg, fedu, fedema\\b"):
            build_strategy(fast_config(small_image_folder, tmp_path, strategy="mine", **settings))
    plain = build_strategy(fast_config(small_image_folder, tmp_path, strategy="mine"))
    assert isinstance(plain, SSLRounds) and not plain.streams_mean
    # declared one, it is allowed under DP and its mean is summed while screening
    monkeypatch.setitem(RULES, "mine", FEDAVG)
    assert build_strategy(fast_config(small_image_folder, tmp_path, strategy="mine")).streams_mean
    assert build_strategy(fast_config(small_image_folder, tmp_path, strategy="mine", **private)).strategy.streams_mean
    # its check runs before anything is built, also under SecAgg+
    def refuse(cfg):
        raise ConfigError("mine refuses")
    monkeypatch.setitem(RULES, "mine", replace(FEDAVG, check=refuse))
    with pytest.raises(ConfigError, match="mine refuses"):
        build_strategy(fast_config(small_image_folder, tmp_path, strategy="mine", secure_aggregation=True,
                                   max_update_norm_ratio=0.0))


def test_rules_by_strategy_name_and_a_previous_model_that_no_longer_fits():
    assert rule_for("fedavg").keeps_previous is False and rule_for("ldawa").keeps_previous is False
    assert rule_for("fedu").keeps_previous and rule_for("fedema").keeps_previous
    assert rule_for("fedavg").starting_point(filled(0.0)) is None
    rule, method, incoming, memo = rule_for("fedema"), Tiny(), filled(1.0), {}
    other = {k: v for k, v in filled(0.0).items() if not k.startswith("predictor.")}
    without_round = filled(0.0)  # kept without the round it is from: not judged by
    for kept in (rule.to_keep(rule.starting_point(other), other, 1), without_round):
        decided_by = rule.apply(RunConfig(strategy="fedema"), method, incoming, kept, memo, 2)
        assert memo == {} and decided_by["previous-round"] == 0.0
        assert all(torch.equal(method.shared_state()[k], v) for k, v in incoming.items())


# --- L-DAWA ---------------------------------------------------------------------------------

def test_ldawa_weights_each_layer_by_its_cosine_to_the_global_layer():
    glob = {"w": np.array([1.0, 0.0], np.float32), "b": np.zeros(2, np.float32),
            "s": np.asarray(2.0, np.float32), "n": np.asarray(4, np.int64)}
    clients = [
        {"w": np.array([2.0, 0.0], np.float32), "b": np.array([1.0, 1.0], np.float32),
         "s": np.asarray(1.0, np.float32), "n": np.asarray(10, np.int64)},   # cos 1
        {"w": np.array([0.0, 3.0], np.float32), "b": np.array([3.0, 1.0], np.float32),
         "s": np.asarray(2.0, np.float32), "n": np.asarray(11, np.int64)},   # cos 0
        {"w": np.array([1.0, 1.0], np.float32), "b": np.array([2.0, 1.0], np.float32),
         "s": np.asarray(6.0, np.float32), "n": np.asarray(12, np.int64)},   # cos 1/sqrt 2
    ]
    out = ldawa_aggregate(clients, glob)
    # (1/K) sum_k cos_k w_k: not normalised by the sum of the cosines
    expected_w = (1.0 * clients[0]["w"] + 0.0 * clients[1]["w"] + clients[2]["w"] / math.sqrt(2)) / 3
    assert np.allclose(out["w"], expected_w) and out["w"].dtype == np.float32
    # a global layer of norm 0 has no direction: the plain mean
    assert np.allclose(out["b"], [2.0, 1.0])
    # 0-d entries and counters: the plain mean, counters rounded to their dtype
    assert out["s"] == pytest.approx(3.0)
    assert out["n"] == 11 and out["n"].dtype == np.int64
    # what a round records of each site: its layers' weights, 0-d entries and counters left out
    assert weight_summary(layer_weights(clients[2], glob)) == pytest.approx(
        {"layer-weight-mean": (1 / math.sqrt(2) + 1) / 2, "layer-weight-min": 1 / math.sqrt(2)})


# --- FedAvgM and FedAdam: one hand-checked step each ----------------------------------------

GLOBAL = {"w": np.array([1.0, 2.0, -1.0], np.float32), "n": np.asarray(0, np.int64)}
ROUND_1 = [({"w": np.array([1.5, 2.5, -1.0], np.float32), "n": np.asarray(10, np.int64)}, 1),
           ({"w": np.array([0.5, 2.5, -0.5], np.float32), "n": np.asarray(21, np.int64)}, 3)]


def step(strategy, glob, replies, server_round):
    """Send `glob` to one in-process node per reply, hand back the replies, aggregate."""
    grid = InProcessGrid(client_app, num_nodes=len(replies))
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in glob.items()})
    sent = list(strategy.configure_train(server_round, record, ConfigRecord({}), grid))
    answers = [Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
               for msg, (arrays, n) in zip(sent, replies)]
    arrays, _ = strategy.aggregate_train(server_round, answers)
    return {k: v.numpy() for k, v in arrays.items()}


def mean_of(replies):
    total = sum(n for _, n in replies)
    return sum(arrays["w"].astype(np.float64) * n / total for arrays, n in replies)


def test_fedavgm_steps_with_server_momentum_and_checkpoints_it():
    cfg = RunConfig(strategy="fedavgm", min_train_clients=2, node_wait_timeout=1.0)
    strategy = build_strategy(cfg)
    g1 = step(strategy, GLOBAL, ROUND_1, 1)
    # round 1: momentum = pseudo-gradient, so with server-lr 1 the step lands on the mean
    m1 = GLOBAL["w"] - mean_of(ROUND_1)
    assert np.allclose(g1["w"], GLOBAL["w"] - cfg.server_lr * m1) and g1["w"].dtype == np.float32
    # the counter is the example-weighted mean (10 + 3 * 21) / 4 = 18.25, not a momentum step
    assert g1["n"] == 18 and g1["n"].dtype == np.int64

    saved = strategy.server_state()
    assert set(saved) == {"momentum_vector"} and np.allclose(saved["momentum_vector"]["w"], m1)
    resumed = build_strategy(cfg)
    resumed.load_server_state(saved)

    round_2 = [({"w": np.array([1.0, 3.0, 0.0], np.float32), "n": np.asarray(30, np.int64)}, 2),
               ({"w": np.array([2.0, 2.0, 0.0], np.float32), "n": np.asarray(40, np.int64)}, 2)]
    g2 = step(strategy, g1, round_2, 2)
    m2 = cfg.server_momentum * m1 + (g1["w"] - mean_of(round_2))
    assert np.allclose(g2["w"], g1["w"] - cfg.server_lr * m2, atol=1e-6)
    # a strategy restored from the checkpoint takes the same step
    assert np.array_equal(step(resumed, g1, round_2, 2)["w"], g2["w"])


def test_fedadam_takes_an_adam_step_and_checkpoints_its_moments():
    cfg = RunConfig(strategy="fedadam", min_train_clients=2, node_wait_timeout=1.0)
    strategy = build_strategy(cfg)
    g1 = step(strategy, GLOBAL, ROUND_1, 1)
    delta = mean_of(ROUND_1) - GLOBAL["w"]
    beta_1, beta_2 = cfg.server_momentum, 0.99
    m, v = (1 - beta_1) * delta, (1 - beta_2) * delta ** 2
    eta = cfg.fedadam_lr * math.sqrt(1 - beta_2 ** 2) / (1 - beta_1 ** 2)  # Flower's bias correction
    expected = GLOBAL["w"] + eta * m / (np.sqrt(v) + cfg.fedadam_tau)
    assert np.allclose(g1["w"], expected, atol=1e-6)
    assert g1["w"].dtype == np.float32  # sent back as the clients sent it, not float64
    assert g1["n"] == 18 and g1["n"].dtype == np.int64

    saved = strategy.server_state()
    assert set(saved) == {"m_t", "v_t"} and np.allclose(saved["m_t"]["w"], m)
    resumed = build_strategy(cfg)
    resumed.load_server_state(saved)
    round_2 = [({"w": np.array([1.0, 3.0, 0.0], np.float32), "n": np.asarray(30, np.int64)}, 2),
               ({"w": np.array([2.0, 2.0, 0.0], np.float32), "n": np.asarray(40, np.int64)}, 2)]
    assert np.array_equal(step(resumed, g1, round_2, 2)["w"], step(strategy, g1, round_2, 2)["w"])


# --- whole runs on the in-process grid ------------------------------------------------------

STRATEGIES = ["fedavgm", "fedadam", "ldawa", "fedu", "fedema"]


def rows(out, drop: tuple[str, ...] = ()) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_rounds_move_the_global_model_and_keep_each_rules_state(small_image_folder, tmp_path, strategy):
    cfg = fast_config(small_image_folder, tmp_path / "run", strategy=strategy)
    grid = InProcessGrid(client_app, num_nodes=2)
    run_federation(grid, cfg)
    assert [(r["round"], r["clients_ok"]) for r in rows(tmp_path / "run")] == [(0, 0), (1, 2), (2, 2)]
    # each rule's numbers per site, every round a site trains (L-DAWA's from its server half)
    recorded = [r.get("client_rules") for r in rows(tmp_path / "run")]
    names = {"fedu": {"divergence", "global-predictor", "previous-round"},
             "fedema": {"ema", "divergence", "mu", "previous-round"},
             "ldawa": {"layer-weight-mean", "layer-weight-min"}}.get(strategy)
    if names is None:
        assert recorded == [None, None, None]
    else:
        assert recorded[0] is None and len(recorded[1]) == len(recorded[2]) == 2
        assert all(set(numbers) == names for numbers in [*recorded[1].values(), *recorded[2].values()])
    if strategy in ("fedu", "fedema"):
        assert all(numbers["divergence"] > 0 and numbers["previous-round"] == 1
                   for numbers in recorded[2].values())
    if strategy == "ldawa":
        # a trained layer turns away from the global one, so some weight falls below 1
        assert all(0 < numbers["layer-weight-min"] < numbers["layer-weight-mean"] < 1
                   for numbers in [*recorded[1].values(), *recorded[2].values()])

    state = load_run_state(tmp_path / "run" / "checkpoint.safetensors")
    initial = build_method(cfg).shared_state()
    assert {k: v.dtype for k, v in state.shared.items()} == {k: v.dtype for k, v in initial.items()}
    assert any(not torch.equal(state.shared[k], initial[k]) for k in initial if k.startswith("encoder."))
    assert set(state.server_state) == {"fedavgm": {"momentum_vector"}, "fedadam": {"m_t", "v_t"}}.get(strategy, set())
    for context in grid.contexts.values():
        kept = context.state.get(PREVIOUS_KEY)
        assert (kept is not None) == (strategy in ("fedu", "fedema"))
        if strategy == "fedema":
            assert context.state[MEMO_KEY][fedema.LAMBDA] > 0  # scaled in round 2


class Killed(BaseException):
    """Escapes the grid and the server the way SIGKILL ends them."""


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_server_optimizer_state_survives_a_kill_and_resume(small_image_folder, tmp_path, strategy):
    # SimSiam keeps no client state, so the resumed run must repeat the uninterrupted one exactly.
    settings = dict(method="simsiam", strategy=strategy, num_rounds=3)
    run_federation(InProcessGrid(client_app, num_nodes=2),
                   fast_config(small_image_folder, tmp_path / "whole", **settings))

    def dies_in_round_3(msg: Message, context: Context) -> Message:
        if msg.content["config"]["server-round"] == 3:
            raise Killed()
        return client_app(msg, context)

    with pytest.raises(Killed):
        run_federation(InProcessGrid(dies_in_round_3, num_nodes=2),
                       fast_config(small_image_folder, tmp_path / "broken", **settings))
    run_federation(InProcessGrid(client_app, num_nodes=2),
                   fast_config(small_image_folder, tmp_path / "broken", resume=True, **settings))

    timing = ("seconds", "client_images_per_second", "client_train_seconds")
    assert rows(tmp_path / "broken", timing) == rows(tmp_path / "whole", timing)
    whole = load_run_state(tmp_path / "whole" / "checkpoint.safetensors")
    resumed = load_run_state(tmp_path / "broken" / "checkpoint.safetensors")
    assert all(torch.equal(resumed.shared[k], v) for k, v in whole.shared.items())
