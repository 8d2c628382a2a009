"""FedEMA and FedU as their authors run them under partial participation (EasyFL,
applications/fedssl/client.py): the divergence is how far a client's last training moved its
encoder, FedEMA's EMA applies only to a client that trained in the previous round, and every
reply says which branch its client took."""
from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn

from fedssl.client.app import app as client_app
from fedssl.common.config import RunConfig
from fedssl.common.global_updates import fedema, rule_for
from fedssl.common.methods import build_method
from fedssl.common.methods.base import SSLMethod
from fedssl.common.records import to_record
from fedssl.server.app import run_federation
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config

FEDEMA_NUMBERS = {"ema", "divergence", "mu", "previous-round"}
FEDU_NUMBERS = {"divergence", "global-predictor", "previous-round"}


class Tiny(SSLMethod):
    """Two encoder kernels around a BatchNorm, a projector and a predictor."""

    shared_prefixes = ("encoder.", "projector.", "predictor.")

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2, bias=False))
        self.projector = nn.Linear(2, 2)
        self.predictor = nn.Linear(2, 2)


def filled(value: float, counter: int = 0, k0=None) -> dict[str, torch.Tensor]:
    """Tiny's shared state with every float entry `value`, BN's counter `counter`, and the
    first encoder kernel (encoder.0.weight) `k0` when given."""
    state = {k: (torch.tensor(counter) if not v.is_floating_point() else torch.full_like(v, value))
             for k, v in Tiny().shared_state().items()}
    if k0 is not None:
        state["encoder.0.weight"] = torch.tensor(k0, dtype=torch.float32)
    return state


def kept_after(rule, started_from, trained, server_round):
    """What a client keeps after training in `server_round` from `started_from` to `trained`."""
    return rule.to_keep(rule.starting_point(started_from), trained, server_round)


# --- FedEMA: the EMA only toward last round's own model -------------------------------------

def test_fedema_client_that_skipped_the_last_round_takes_the_global_model():
    rule, cfg = rule_for("fedema"), RunConfig(strategy="fedema", fedema_tau=0.7)
    # trained in round 1, moving its first kernel by 3 (divergence 3 / 2 kernels = 1.5)
    kept = kept_after(rule, filled(0.0), filled(0.0, k0=[[3.0, 0.0], [0.0, 0.0]]), server_round=1)
    method, memo, incoming = Tiny(), {}, filled(1.0, counter=5)
    decided_by = rule.apply(cfg, method, incoming, kept, memo, server_round=3)  # skipped round 2
    assert all(torch.equal(method.shared_state()[k], v) for k, v in incoming.items())
    assert decided_by == pytest.approx({"ema": 0.0, "divergence": 1.5, "mu": 0.0, "previous-round": 1.0})
    # lambda is still scaled from the client's first training, as the authors do it
    assert memo == pytest.approx({fedema.LAMBDA: 0.7 / 1.5})


def test_fedema_client_that_trained_last_round_gets_the_ema_with_mu_from_its_training():
    rule, cfg = rule_for("fedema"), RunConfig(strategy="fedema", fedema_tau=0.7)
    trained = filled(0.0, counter=2, k0=[[6.0, 0.0], [0.0, 0.0]])  # moved by 6 from filled(0): d = 3
    kept = kept_after(rule, filled(0.0), trained, server_round=2)
    # the incoming global is far from `trained`: the divergence is not measured against it
    incoming = filled(1.0, counter=5, k0=[[40.0, 0.0], [0.0, 0.0]])
    method, memo = Tiny(), {}
    decided_by = rule.apply(cfg, method, incoming, kept, memo, server_round=3)
    assert decided_by == pytest.approx({"ema": 1.0, "divergence": 3.0, "mu": 0.7, "previous-round": 2.0})
    got = method.shared_state()
    # parameters: local <- mu * local + (1 - mu) * global, mu = tau at the first comparison
    assert torch.allclose(got["encoder.0.weight"], torch.tensor([[0.7 * 6 + 0.3 * 40, 0.0], [0.0, 0.0]]))
    for key in ("encoder.0.bias", "encoder.1.weight", "projector.weight", "predictor.bias"):
        assert torch.allclose(got[key], torch.full_like(got[key], 0.3)), key
    # BatchNorm statistics and counters are not weights: the global ones, as in the authors' code
    assert torch.equal(got["encoder.1.running_var"], incoming["encoder.1.running_var"])
    assert got["encoder.1.num_batches_tracked"].item() == 5

    # the next round, having moved by 1.5 (d = 0.75): mu = lambda * d = 0.7 / 3 * 0.75
    kept = kept_after(rule, filled(0.0), filled(0.0, k0=[[1.5, 0.0], [0.0, 0.0]]), server_round=3)
    decided_by = rule.apply(cfg, method, incoming, kept, memo, server_round=4)
    assert decided_by["mu"] == pytest.approx(0.175) and memo[fedema.LAMBDA] == pytest.approx(0.7 / 3)


@pytest.mark.parametrize("strategy, numbers", [("fedema", FEDEMA_NUMBERS), ("fedu", FEDU_NUMBERS)])
def test_every_branch_reports_the_same_numbers(strategy, numbers):
    # A reply whose metric keys differ from the others' is rejected by the server, so a client
    # in its first round must report the same keys as one with a previous model.
    rule, cfg = rule_for(strategy), RunConfig(strategy=strategy)
    kept = kept_after(rule, filled(0.0), filled(0.0, k0=[[1.0, 0.0], [0.0, 0.0]]), server_round=1)
    for previous, server_round in ((None, 1), (kept, 2), (kept, 3)):
        assert set(rule.apply(cfg, Tiny(), filled(1.0), previous, {}, server_round)) == numbers


# --- FedU: the divergence its authors measure -----------------------------------------------

@pytest.mark.parametrize("moved, predictor_from", [(0.6, "global"), (1.0, "local")])
def test_fedu_decides_by_how_far_its_last_training_moved_the_encoder(moved, predictor_from):
    rule, cfg = rule_for("fedu"), RunConfig(strategy="fedu", fedu_threshold=0.4)
    trained = filled(0.0, k0=[[moved, 0.0], [0.0, 0.0]])  # d = moved / 2 kernels: 0.3 or 0.5
    trained.update({k: torch.full_like(v, 0.5) for k, v in trained.items() if k.startswith("predictor.")})
    kept = kept_after(rule, filled(0.0), trained, server_round=1)
    incoming = filled(9.0)  # far from `trained` either way: not what FedU compares
    method = Tiny()
    # a client back after several rounds decides the same way (the authors have no round check)
    decided_by = rule.apply(cfg, method, incoming, kept, {}, server_round=5)
    assert decided_by == pytest.approx({"divergence": moved / 2, "previous-round": 1.0,
                                        "global-predictor": float(predictor_from == "global")})
    expected = incoming if predictor_from == "global" else trained
    got = method.shared_state()
    assert all(torch.equal(got[k], expected[k]) for k in got if k.startswith("predictor."))
    assert all(torch.equal(got[k], incoming[k]) for k in got if not k.startswith("predictor."))


# --- through the ClientApp and a whole run --------------------------------------------------

def train_message(cfg, arrays, server_round: int) -> Message:
    config = ConfigRecord({**cfg.to_mapping(), "server-round": server_round})
    return Message(RecordDict({"arrays": to_record(arrays), "config": config}), 1000, "train")


def test_the_reply_says_which_branch_the_client_took(small_image_folder, tmp_path):
    cfg = fast_config(small_image_folder, tmp_path, strategy="fedema", num_rounds=4)
    InProcessGrid(client_app, num_nodes=1)  # sets the process's task identity
    context = Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    global_arrays = build_method(cfg).shared_state()
    numbers = {}
    for server_round in (1, 3, 4):  # not selected in round 2
        reply = client_app(train_message(cfg, global_arrays, server_round), context)
        assert not reply.has_error(), reply.error
        metrics = reply.content["metrics"]
        numbers[server_round] = {k[len("rule-"):]: v for k, v in metrics.items() if k.startswith("rule-")}
    assert {r: (n["ema"], n["previous-round"]) for r, n in numbers.items()} == {
        1: (0.0, 0.0), 3: (0.0, 1.0), 4: (1.0, 3.0)}
    assert numbers[3]["mu"] == 0.0 and numbers[3]["divergence"] > 0
    # lambda from round 1's training (reported in round 3), applied to round 3's
    expected_mu = min(cfg.fedema_tau * numbers[4]["divergence"] / numbers[3]["divergence"], 1.0)
    assert numbers[4]["mu"] == pytest.approx(expected_mu)


def test_a_run_with_client_sampling_records_both_branches(small_image_folder, tmp_path):
    # 2 of 3 clients a round: some return straight after training, some after a skipped round.
    cfg = fast_config(small_image_folder, tmp_path / "run", strategy="fedema", num_rounds=5,
                      fraction_train=0.6, min_train_clients=2)
    run_federation(InProcessGrid(client_app, num_nodes=3), cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clients_ok"] == 2 and not r.get("failures") for r in rows[1:])  # no reply refused
    branches = set()
    for previous, row in zip(rows, rows[1:]):
        for node, numbers in row["client_rules"].items():
            assert set(numbers) == FEDEMA_NUMBERS
            # the EMA exactly when this client trained in the round before
            trained_before = node in previous.get("client_rules", {})
            assert numbers["ema"] == float(trained_before), (row["round"], node)
            branches.add((numbers["ema"], numbers["previous-round"] > 0))
    assert branches == {(0.0, False), (0.0, True), (1.0, True)}  # first round, skipped, EMA


def test_fedema_global_branch_rebuilds_byols_target_from_the_global_model(small_image_folder, tmp_path):
    # The authors' client resets its target to the global online encoder when it takes the
    # global model; after the EMA it keeps its own.
    from fedssl.client.app import LOCAL_STATE_KEY, restore_local_state

    rule = rule_for("fedema")
    assert rule.follows_global({"ema": 0.0}) and not rule.follows_global({"ema": 1.0})
    assert not rule_for("fedavg").follows_global({})
    method = build_method(fast_config(small_image_folder, tmp_path, strategy="fedema"))
    own_target = {k: torch.randn_like(v) if v.is_floating_point() else v
                  for k, v in method.local_state().items()}
    store = {LOCAL_STATE_KEY: own_target}
    for fresh in (False, True):
        restore_local_state(method, store, server_round=3, fresh=fresh)
        target = method.target_encoder.state_dict()
        online = method.encoder.state_dict()
        took_online = all(torch.equal(target[k], online[k]) for k in online)
        assert took_online == fresh


@pytest.mark.parametrize("method, own, copy", [
    ("mocov2", ("queue",), ("key_encoder.", "key_projector.")),
    ("mae", ("decoder.",), ()),
])
def test_fedema_global_branch_keeps_local_state_that_is_no_copy_of_the_global_model(
        small_image_folder, tmp_path, method, own, copy):
    # MoCo's queue and a site's own MAE decoder are not copies of a shared network: the
    # global branch re-derives the key encoder and must keep them (it used to re-randomise
    # the decoder a site had trained, whenever it skipped a round).
    from fedssl.client.app import LOCAL_STATE_KEY, restore_local_state

    cfg = fast_config(small_image_folder, tmp_path, strategy="fedema", method=method, mae_share_decoder=False,
                      image_size=32)
    built = build_method(cfg)
    kept = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in built.local_state().items()}
    restore_local_state(built, {LOCAL_STATE_KEY: kept}, server_round=3, fresh=True)
    local, shared = built.local_state(), built.state_dict()
    assert any(k.startswith(own) for k in kept)
    for k in kept:
        if k.startswith(own):
            assert torch.equal(local[k], kept[k]), k
        elif k.startswith(copy):
            online = k.replace("key_", "", 1)
            assert torch.equal(local[k], shared[online]), k
