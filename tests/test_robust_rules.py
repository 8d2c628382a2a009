"""Byzantine-robust rules (fedmedian, fedtrimmedavg, krum, multikrum, bulyan): one hostile
reply among honest ones moves FedAvg's mean far from the honest mean and theirs not;
BatchNorm statistics and step counters stay statistics; settings a rule cannot withstand f
hostile sites with are refused in one line; whole runs checkpoint and resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedssl.client.app import app as client_app
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.methods import build_method
from fedssl.server.app import run_federation
from fedssl.server.resume import load_run_state
from fedssl.server.strategies import build_strategy
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config

RULES = ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]
VAR, COUNTER = "encoder.1.running_var", "encoder.1.num_batches_tracked"
GLOBAL = {"w": np.linspace(-1.0, 1.0, 8).astype(np.float32),
          VAR: np.ones(4, np.float32), COUNTER: np.asarray(1000, np.int64)}
STEP = {"w": np.linspace(0.1, 0.8, 8).astype(np.float32), VAR: np.full(4, 0.5, np.float32)}
# Six honest sites, unequal in examples and in steps run: counters hundreds apart, as sites
# with more data run more batches. The hostile seventh sits in the middle of the counters.
HONEST_EXAMPLES = [10, 11, 12, 13, 14, 15]
HONEST_STEPS = [100, 200, 300, 400, 500, 600]


def honest_replies(seed: int = 0) -> list[tuple[dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    return [({"w": (GLOBAL["w"] + STEP["w"] + rng.normal(0, 0.01, 8)).astype(np.float32),
              VAR: (GLOBAL[VAR] + STEP[VAR] + rng.normal(0, 0.02, 4)).astype(np.float32),
              COUNTER: np.asarray(GLOBAL[COUNTER] + steps, np.int64)}, n)
            for n, steps in zip(HONEST_EXAMPLES, HONEST_STEPS)]


# name: (the hostile reply, the norm-screening ratio it meets)
ATTACKS = {
    # the honest step flipped and scaled by 5: within screening's bound of 10 x the median
    "sign-flip": ({"w": GLOBAL["w"] - 5 * STEP["w"], VAR: GLOBAL[VAR] - 5 * STEP[VAR],
                   COUNTER: np.asarray(1350, np.int64)}, 10.0),
    # huge weights and a negative variance, with screening off: the rule alone must hold
    "huge": ({"w": np.full(8, 1e6, np.float32), VAR: np.full(4, -1e3, np.float32),
              COUNTER: np.asarray(10 ** 12, np.int64)}, 0.0),
}


def config(strategy: str, ratio: float) -> RunConfig:
    return RunConfig(strategy=strategy, min_train_clients=7, fraction_train=1.0, node_wait_timeout=1.0,
                     max_update_norm_ratio=ratio, num_malicious=1)


def aggregate(strategy, replies) -> dict[str, np.ndarray]:
    """Send GLOBAL to one in-process node per reply, hand the replies back, aggregate."""
    grid = InProcessGrid(client_app, num_nodes=len(replies))
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in GLOBAL.items()})
    sent = sorted(strategy.configure_train(1, record, ConfigRecord({}), grid), key=lambda m: m.metadata.dst_node_id)
    answers = [Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
               for msg, (arrays, n) in zip(sent, replies)]
    arrays, _ = strategy.aggregate_train(1, answers)
    assert strategy.round_record(1).clients_ok == len(replies)  # screening let the attack through
    return {k: v.numpy() for k, v in arrays.items()}


def honest_mean(replies) -> np.ndarray:
    return np.mean([arrays["w"].astype(np.float64) for arrays, _ in replies], axis=0)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("rule", RULES)
def test_one_hostile_reply_moves_fedavg_but_not_the_robust_rule(rule, attack):
    hostile, ratio = ATTACKS[attack]
    honest = honest_replies()
    replies = honest[:3] + [(hostile, 50)] + honest[3:]  # claims the most examples, too
    target, tolerance = honest_mean(honest), 0.25 * np.linalg.norm(STEP["w"])

    fedavg = aggregate(build_strategy(config("fedavg", ratio)), replies)
    assert np.linalg.norm(fedavg["w"] - target) > 2 * tolerance

    out = aggregate(build_strategy(config(rule, ratio)), replies)
    assert np.linalg.norm(out["w"].astype(np.float64) - target) < tolerance
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in GLOBAL.items()}
    # statistics stay statistics: each variance positive, within the honest sites' values,
    # the counter an integer the honest sites could have reached
    variances = np.stack([arrays[VAR] for arrays, _ in honest])
    assert (out[VAR] > 0).all()
    assert (variances.min(0) - 1e-6 <= out[VAR]).all() and (out[VAR] <= variances.max(0) + 1e-6).all()
    counters = [int(arrays[COUNTER]) for arrays, _ in honest]
    assert min(counters) <= int(out[COUNTER]) <= max(counters)


def test_krum_distances_leave_step_counters_out():
    """Counters hundreds apart would decide Flower's Krum: by them the hostile reply, in the
    middle of the counters, is the most central; by the weights it is the farthest."""
    from flwr.serverapp.strategy.multikrum import select_multikrum
    from fedssl.server.strategies.robust import select_by_float_distances

    hostile, _ = ATTACKS["sign-flip"]
    replies = honest_replies()[:3] + [(hostile, 50)] + honest_replies()[3:]
    contents = [RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                            "metrics": MetricRecord({"num-examples": n})}) for arrays, n in replies]
    assert select_multikrum(contents, 1, 1) == [contents[3]]
    assert select_by_float_distances(contents, 1, 1) != [contents[3]]


@pytest.mark.parametrize("changes, fragment", [
    (dict(strategy="bulyan", min_train_clients=6),
     "min-train-clients=6 is invalid with strategy='bulyan' and num-malicious=1: must be >= 7"),
    (dict(strategy="krum", min_train_clients=4), "must be >= 5 (Krum's bound: 2 f + 3)"),
    (dict(strategy="multikrum", min_train_clients=5, multikrum_keep=5),
     "multikrum-keep=5 is invalid with min-train-clients=5 and num-malicious=1: must be <= 4"),
    (dict(strategy="fedmedian", min_train_clients=2), "must be >= 3"),
    (dict(strategy="fedtrimmedavg", min_train_clients=4), "must be >= 5 (trim-beta=0.2 must cut"),
    (dict(strategy="fedtrimmedavg", min_train_clients=9, trim_beta=0.0), "trim-beta=0.0 is invalid"),
    (dict(strategy="krum", min_train_clients=5, dp="fixed", max_update_norm_ratio=0.0),
     "strategy='krum' is invalid with dp='fixed': allowed: fedavg, fedu, fedema"),
    (dict(strategy="fedmedian", min_train_clients=3, secure_aggregation=True, max_update_norm_ratio=0.0),
     "strategy='fedmedian' is invalid with secure-aggregation=true: allowed: fedavg, fedu, fedema"),
])
def test_settings_a_rule_cannot_hold_with_are_refused_in_one_line(changes, fragment):
    with pytest.raises(ConfigError) as err:
        build_strategy(RunConfig(**changes))
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key, value, fragment", [
    ("trim-beta", 0.5, "trim-beta=0.5 is invalid: must be in [0.0, 0.5)"),
    ("num-malicious", -1, "num-malicious=-1 is invalid: must be >= 0"),
    ("multikrum-keep", -1, "multikrum-keep=-1 is invalid: must be >= 0"),
])
def test_bad_robust_settings_name_key_and_value(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert fragment in str(err.value)


# --- whole runs on the in-process grid ------------------------------------------------------

# Three sites a run, each rule's settings for them: f = 1 where three suffice (a median, a
# trimmed mean cutting one from each end), else f = 0 (Krum's family needs 2 f + 3).
SITES = 3
SETTINGS = {"fedmedian": dict(num_malicious=1), "fedtrimmedavg": dict(num_malicious=1, trim_beta=0.34),
            "krum": dict(num_malicious=0), "multikrum": dict(num_malicious=0, multikrum_keep=2),
            "bulyan": dict(num_malicious=0)}
TIMING = ("seconds", "client_images_per_second", "client_train_seconds")


class Killed(BaseException):
    """Escapes the grid and the server the way SIGKILL ends them."""


def rows(out) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("rule", RULES)
def test_two_rounds_move_the_model_and_a_killed_run_resumes_to_the_same_result(small_image_folder, tmp_path, rule):
    # SimSiam keeps no client state, so the resumed run must repeat the uninterrupted one.
    settings = dict(method="simsiam", strategy=rule, num_rounds=2, min_train_clients=SITES, **SETTINGS[rule])
    run_federation(InProcessGrid(client_app, num_nodes=SITES),
                   fast_config(small_image_folder, tmp_path / "whole", **settings))
    whole = rows(tmp_path / "whole")
    assert [(r["round"], r["clients_ok"], r["aggregated"]) for r in whole] == [(0, 0, False), (1, 3, True), (2, 3, True)]

    def dies_in_round_2(msg: Message, context: Context) -> Message:
        if msg.content["config"]["server-round"] == 2:
            raise Killed()
        return client_app(msg, context)

    with pytest.raises(Killed):
        run_federation(InProcessGrid(dies_in_round_2, num_nodes=SITES),
                       fast_config(small_image_folder, tmp_path / "broken", **settings))
    assert load_run_state(tmp_path / "broken" / "checkpoint.safetensors").round == 1
    run_federation(InProcessGrid(client_app, num_nodes=SITES),
                   fast_config(small_image_folder, tmp_path / "broken", resume=True, **settings))
    assert rows(tmp_path / "broken") == whole

    state = load_run_state(tmp_path / "whole" / "checkpoint.safetensors")
    initial = build_method(fast_config(small_image_folder, tmp_path, **settings)).shared_state()
    assert state.server_state == {}
    assert {k: v.dtype for k, v in state.shared.items()} == {k: v.dtype for k, v in initial.items()}
    assert any(not torch.equal(state.shared[k], initial[k]) for k in initial if k.startswith("encoder."))
    assert all((v > 0).all() for k, v in state.shared.items() if k.endswith("running_var"))
    resumed = load_run_state(tmp_path / "broken" / "checkpoint.safetensors")
    assert all(torch.equal(resumed.shared[k], v) for k, v in state.shared.items())
