"""The server's typed round record (server/round_record.py), the interface every strategy
serves the ServerApp (server/protocol.py) and the step that evaluates, checkpoints and
records a round (server/round_step.py)."""
from __future__ import annotations

import copy
import inspect
import json
from dataclasses import replace

import pytest
from flwr.app import ConfigRecord, MetricRecord

from fedssl.client.app import app as client_app
from fedssl.common.methods import build_method
from fedssl.common.records import to_record
from fedssl.server.dp import PrivateRounds
from fedssl.server.evaluation import GlobalEvaluator
from fedssl.server.progress import Progress
from fedssl.server.protocol import SSLStrategy
from fedssl.server.resume import load_run_state
from fedssl.server.round_record import RoundOffset, RoundRecord
from fedssl.server.round_step import RoundRecorder
from fedssl.server.rounds import SSLRounds
from fedssl.server.run_dir import RunDir
from fedssl.server.secure import SecureRounds
from fedssl.server.strategies import build_strategy
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config

PRIVACY = dict(max_update_norm_ratio=0.0, amp=False)


class CopyingGrid(InProcessGrid):
    """Delivers a copy of each message, as the engines do (they serialize it)."""

    def send_and_receive(self, messages, *, timeout=None):
        return super().send_and_receive([copy.deepcopy(m) for m in messages], timeout=timeout)


def one_round(strategy, cfg, flower_round=1, num_nodes=3):
    grid = CopyingGrid(client_app, num_nodes=num_nodes)
    messages = list(strategy.configure_train(flower_round, to_record(build_method(cfg).shared_state()),
                                             ConfigRecord(cfg.to_mapping()), grid))
    strategy.aggregate_train(flower_round, grid.send_and_receive(messages))
    return messages


@pytest.mark.parametrize("settings, kind", [
    (dict(strategy="fedavg"), SSLRounds),
    (dict(strategy="fedadam"), SSLRounds),
    (dict(strategy="fedu", dp="fixed", **PRIVACY), PrivateRounds),
    (dict(strategy="fedema", dp="adaptive", **PRIVACY), PrivateRounds),
    (dict(strategy="fedavg", secure_aggregation=True, **PRIVACY), SecureRounds),
], ids=["fedavg", "fedadam", "dp-fixed", "dp-adaptive", "secagg+"])
def test_a_rule_its_dp_wrapper_and_the_secagg_adapter_each_serve_the_server_interface(
        small_image_folder, tmp_path, settings, kind):
    strategy = build_strategy(fast_config(small_image_folder, tmp_path, **settings))
    assert isinstance(strategy, kind) and isinstance(strategy, SSLStrategy)
    # server/app.py's call, by keyword, binds to each start() (Flower's has more parameters)
    inspect.signature(strategy.start).bind(None, None, num_rounds=1, timeout=1.0,
                                           train_config=ConfigRecord(), evaluate_fn=lambda r, a: None)
    assert strategy.round_record(1) is None  # nothing trained yet


def test_a_record_sums_the_sites_numbers_and_gives_them_the_rows_names():
    sites = [MetricRecord({"num-examples": 4, "train-loss": 3.0, "train-seconds": 0.25, "skipped-images": 1,
                           "images-per-second": 16.0}),
             MetricRecord({"num-examples": 12, "train-loss": 1.0, "train-seconds": 1.5004, "skipped-images": 2,
                           "images-per-second": 8.0})]
    mean = MetricRecord({"train-loss": 1.5, "images-per-second": 10.0})
    record = RoundRecord.of_round(clients_ok=2, failures={1009: "no reply", 1003: "NaN in arrays"},
                                  aggregated=True, client_metrics=sites, train_metrics=mean,
                                  client_rules={"1000": {"mu": 0.5}}, bytes_sent=300, bytes_received=200)
    assert record.clients_failed == 2
    assert record.row_fields() == {
        "train_loss": 1.5, "client_images_per_second": 10.0, "skipped_images": 3, "clients_ok": 2,
        "clients_failed": 2, "failures": {"1009": "no reply", "1003": "NaN in arrays"},
        "client_rules": {"1000": {"mu": 0.5}}, "aggregated": True, "bytes_sent": 300, "bytes_received": 200,
        "client_train_seconds": 1.75}
    # in the order the strategy gave them (SecAgg+: sampling order), node ids as text
    assert list(record.row_fields()["failures"]) == ["1009", "1003"]


def test_a_round_nobody_finished_has_no_train_metrics_and_no_client_rules_field():
    record = RoundRecord.of_round(clients_ok=0, failures={1000: "client error"}, aggregated=False)
    row = record.row_fields()
    assert row["train_loss"] is None and row["client_images_per_second"] is None
    assert "client_rules" not in row and row["skipped_images"] == 0
    # a float like every other round's training time, not a bare integer 0
    assert json.dumps(row["client_train_seconds"]) == "0.0"
    assert RoundRecord().row_fields() == {**row, "clients_failed": 0, "failures": {}}


def test_the_dp_wrapper_withholds_the_sites_numbers_and_keeps_the_rounds_outcome(small_image_folder, tmp_path):
    cfg = fast_config(small_image_folder, tmp_path, dp="fixed", dp_clip_norm=0.5, dp_noise_multiplier=0.0,
                      **PRIVACY)
    strategy = build_strategy(cfg)
    one_round(strategy, cfg)
    released = strategy.round_record(1)
    assert released.aggregated and released.clients_ok == 3 and released.bytes_received > 0
    assert released == strategy.strategy.round_record(1)  # DP sites send no numbers to withhold
    # a rule's record holding every site number (as a plain run's does) is released without them
    full = RoundRecord.of_round(
        clients_ok=2, failures={1002: "no reply"}, aggregated=True,
        client_metrics=[MetricRecord({"train-seconds": 2.0, "skipped-images": 3})],
        train_metrics=MetricRecord({"train-loss": 1.5, "images-per-second": 9.0}),
        client_rules={"1000": {"mu": 0.5}}, bytes_sent=10, bytes_received=20)
    strategy.strategy.records[2] = full
    assert strategy.round_record(2) == replace(full, train_loss=None, client_images_per_second=None,
                                               client_rules={}, skipped_images=0, client_train_seconds=0.0)
    assert strategy.round_record(3) is None


def test_a_resumed_rule_sends_and_records_the_true_round_number(small_image_folder, tmp_path):
    cfg = fast_config(small_image_folder, tmp_path)
    strategy = build_strategy(cfg)
    strategy.resume_after(2)
    messages = one_round(strategy, cfg, flower_round=1)
    assert {m.content["config"]["server-round"] for m in messages} == {3}
    assert strategy.round_record(1) is None and strategy.round_record(3).clients_ok == 3
    assert RoundOffset(2).server_round(1) == 3 and RoundOffset(2).remaining(5) == 3


def test_the_round_step_checkpoints_then_records_and_skips_round_0_when_resumed(small_image_folder, tmp_path):
    cfg = fast_config(small_image_folder, tmp_path, num_rounds=2, eval_every=1)
    method, strategy, history = build_method(cfg), build_strategy(cfg), []
    out = RunDir(tmp_path, history, cfg)
    evaluator = GlobalEvaluator(cfg, "cpu")
    arrays = to_record(method.shared_state())
    with Progress(cfg.num_rounds) as progress:
        resumed = RoundRecorder(cfg, method, evaluator, strategy, out, history, RoundOffset(1), resumed=True)
        assert resumed(0, arrays, progress) is None and history == []
        scores = RoundRecorder(cfg, method, evaluator, strategy, out, history, RoundOffset(), resumed=False)(
            0, arrays, progress)
    row = json.loads(out.metrics_path.read_text())
    assert set(scores) <= set(row) and row["round"] == 0 and row["knn_top1"] == scores["knn_top1"]
    assert {k: v for k, v in row.items() if k in RoundRecord().row_fields()} == RoundRecord().row_fields()
    assert load_run_state(out.checkpoint_path).history == [row] == history
