"""BatchNorm's running statistics are statistics, not weights: every rule that does not
simply average (FedAvgM, FedAdam, L-DAWA) must give them the example-weighted mean of the
replies, never a server-optimizer step or a cosine weighting, so a variance stays positive
and the eval-mode encoder gives finite features."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedssl.client.app import app as client_app
from fedssl.common.checkpoint import load_encoder
from fedssl.common.config import RunConfig
from fedssl.common.datasets import load_eval_split
from fedssl.common.evaluation import embed
from fedssl.common.methods import build_method
from fedssl.server.app import run_federation
from fedssl.server.resume import load_run_state
from fedssl.server.strategies import build_strategy
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config

# The run's real networks, small: a ResNet-10 at 16 px with BatchNorm in encoder and heads.
SMALL = dict(method="byol", encoder="resnet10", image_size=16, proj_dim=32, hidden_dim=64,
             min_train_clients=2, fraction_train=1.0, node_wait_timeout=1.0, threads=1)
EXAMPLES = (1, 3, 6)  # unequal, so the example-weighted mean differs from the plain one


def statistics_of(cfg: RunConfig) -> set[str]:
    """The shared entries of the method's BatchNorm layers, found from its modules."""
    method = build_method(cfg)
    shared = method.shared_state()
    return {f"{name}.{buffer}" for name, module in method.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            for buffer in ("running_mean", "running_var", "num_batches_tracked")
            if f"{name}.{buffer}" in shared}


def client_states(glob: dict[str, np.ndarray], statistics: set[str], seed: int) -> list[dict[str, np.ndarray]]:
    """One state per client: weights moved a little from the global ones, running means and
    (positive) variances of each client's own, counters advanced by unequal step counts."""
    rng = np.random.default_rng(seed)
    states = []
    for _ in EXAMPLES:
        state = {}
        for key, value in glob.items():
            if key.endswith("num_batches_tracked"):
                state[key] = np.asarray(value + rng.integers(1, 50), value.dtype)
            elif key.endswith("running_var"):
                state[key] = rng.uniform(0.05, 3.0, value.shape).astype(value.dtype)
            elif key.endswith("running_mean"):
                state[key] = rng.normal(0.0, 1.0, value.shape).astype(value.dtype)
            else:
                state[key] = (value + 0.05 * rng.normal(size=value.shape)).astype(value.dtype)
        states.append(state)
    return states


def aggregate_one_round(strategy, glob, states, server_round):
    """Send `glob` to one in-process node per client state, reply with the states, aggregate."""
    grid = InProcessGrid(client_app, num_nodes=len(states))
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in glob.items()})
    # by node, so a node sends the same state whatever order the sampler drew it in
    sent = sorted(strategy.configure_train(server_round, record, ConfigRecord({}), grid),
                  key=lambda msg: msg.metadata.dst_node_id)
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
               for msg, (state, n) in zip(sent, zip(states, EXAMPLES))]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert strategy.round_record(server_round).clients_ok == len(states)
    return {k: v.numpy() for k, v in arrays.items()}


def weighted_mean(states, key):
    weights = np.asarray(EXAMPLES, np.float64) / sum(EXAMPLES)
    return sum(w * s[key].astype(np.float64) for w, s in zip(weights, states))


@pytest.mark.parametrize("strategy_name", ["fedavgm", "fedadam", "ldawa"])
def test_statistics_take_the_example_weighted_mean_and_weights_keep_the_rule(strategy_name):
    cfg = RunConfig(strategy=strategy_name, **SMALL)
    statistics = statistics_of(cfg)
    assert any(k.endswith("running_var") for k in statistics)
    strategy = build_strategy(cfg)
    glob = {k: v.numpy() for k, v in build_method(cfg).shared_state().items()}
    for server_round in (1, 2):  # round 2: FedAvgM's momentum and FedAdam's moments are warm
        states = client_states(glob, statistics, seed=server_round)
        out = aggregate_one_round(strategy, glob, states, server_round)
        assert set(out) == set(glob)
        for key in statistics:
            expected = weighted_mean(states, key)
            assert out[key].dtype == glob[key].dtype, key
            if key.endswith("num_batches_tracked"):
                assert out[key] == np.rint(expected), (server_round, key)
            else:
                np.testing.assert_allclose(out[key], expected, rtol=1e-6, atol=1e-7,
                                           err_msg=f"round {server_round}: {key}")
        # the weights are still the rule's own, not turned into FedAvg's mean (FedAvgM's
        # first step, with server-lr 1, lands on the mean)
        weights = [k for k in glob if k not in statistics]
        assert server_round == 1 and strategy_name == "fedavgm" or any(not np.allclose(out[k], weighted_mean(states, k), rtol=1e-4, atol=1e-6) for k in weights)
        # the server optimizer's state holds no entries for statistics
        for name, arrays in strategy.server_state().items():
            assert not set(arrays) & statistics, name
        glob = out


def test_optimizer_state_from_a_checkpoint_that_held_statistics_still_resumes():
    """A checkpoint written before statistics were left out of the momentum still loads; its
    entries for statistics are ignored, the weights' momentum is used."""
    cfg = RunConfig(strategy="fedavgm", **SMALL)
    statistics = statistics_of(cfg)
    glob = {k: v.numpy() for k, v in build_method(cfg).shared_state().items()}
    first = build_strategy(cfg)
    g1 = aggregate_one_round(first, glob, client_states(glob, statistics, seed=1), 1)
    saved = first.server_state()
    old_style = {"momentum_vector": {**saved["momentum_vector"],
                                     **{k: np.full_like(glob[k], 7.0, dtype=np.float64) for k in statistics}}}
    resumed = build_strategy(cfg)
    resumed.load_server_state(old_style)
    states = client_states(g1, statistics, seed=2)
    expected = aggregate_one_round(first, g1, states, 2)
    got = aggregate_one_round(resumed, g1, states, 2)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


# --- whole runs: the real ClientApp trains the real networks ----------------------------------

class Recording:
    """The ClientApp, keeping every reply it sends, so the test knows what clients sent."""

    def __init__(self):
        self.replies: list[tuple[int, Message]] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        self.replies.append((int(msg.content["config"]["server-round"]), reply))
        return reply


# At these settings today's code gives a negative running_var from round 3 under FedAvgM
# (measured: min -0.64 after 4 rounds, NaN collapse_std from round 3).
ROUNDS = 4


@pytest.mark.parametrize("strategy_name", ["fedavgm", "fedadam"])
def test_default_server_settings_keep_every_variance_positive_and_features_finite(
        small_image_folder, tmp_path, strategy_name):
    cfg = fast_config(small_image_folder, tmp_path / "run", strategy=strategy_name, num_rounds=ROUNDS)
    defaults = RunConfig()
    assert (cfg.server_lr, cfg.server_momentum, cfg.fedadam_lr, cfg.fedadam_tau) == (
        defaults.server_lr, defaults.server_momentum, defaults.fedadam_lr, defaults.fedadam_tau)
    clients = Recording()
    run_federation(InProcessGrid(clients, num_nodes=2), cfg)

    state = load_run_state(tmp_path / "run" / "checkpoint.safetensors")
    variances = {k: v for k, v in state.shared.items() if k.endswith("running_var")}
    assert variances
    low = min(float(v.min()) for v in variances.values())
    assert all(bool(torch.isfinite(v).all()) and float(v.min()) > 0 for v in variances.values()), low

    # the global statistics are the example-weighted mean of what the clients sent last round
    last = [reply for server_round, reply in clients.replies if server_round == ROUNDS]
    sent = [{k: v.numpy() for k, v in reply.content["arrays"].items()} for reply in last]
    examples = [float(reply.content["metrics"]["num-examples"]) for reply in last]
    for key in statistics_of(cfg):
        expected = sum(n * s[key].astype(np.float64) for n, s in zip(examples, sent)) / sum(examples)
        if key.endswith("num_batches_tracked"):
            assert int(state.shared[key]) == int(np.rint(expected)), key
        else:
            np.testing.assert_allclose(state.shared[key].numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=key)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["collapse_std"]) for row in rows), [row["collapse_std"] for row in rows]
    encoder = load_encoder(tmp_path / "run" / "encoder.safetensors")
    bank, _ = load_eval_split("imagefolder", str(small_image_folder), cfg.image_size, seed=0)
    assert bool(torch.isfinite(embed(encoder, bank.images)).all())
