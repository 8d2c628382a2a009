"""The ServerApp's round logic against an in-process Grid and the real ClientApp."""
from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Message

from fedssl.client.app import app as client_app
from fedssl.common.checkpoint import load_encoder, load_weights
from fedssl.common.config import ConfigError
from fedssl.common.methods import build_method
from fedssl.server.app import run_federation, wait_for_nodes
from fedssl.server.strategies import build_strategy
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config, tiny_config

REQUIRED = {"round", "knn_top1", "train_loss", "clients_ok", "clients_failed", "seconds"}


@pytest.mark.parametrize("method", ["byol", "simsiam"])
def test_two_rounds_write_metrics_checkpoint_and_encoder(image_folder, tmp_path, method):
    cfg = tiny_config(image_folder, tmp_path / "run", method=method)
    grid = InProcessGrid(client_app, num_nodes=3)
    summary = run_federation(grid, cfg)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(REQUIRED <= set(r) for r in rows)
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3] and rows[-1]["clients_failed"] == 0
    assert all(0.0 <= r["knn_top1"] <= 1.0 for r in rows)
    assert "probe_top1" in rows[-1] and rows[-1]["train_loss"] is not None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"] == rows[-1]
    assert summary["final"]["round"] == 2

    # the global weights moved away from the initial ones, and the checkpoint holds them
    initial = build_method(cfg).shared_state()
    state, meta = load_weights(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["round"] == 2 and meta["method"] == method
    assert set(state) == set(initial)
    assert any(not torch.equal(state[k], initial[k]) for k in initial if k.startswith("encoder."))
    encoder = load_encoder(tmp_path / "run" / "encoder.safetensors").eval()
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    # every client was sent the whole run config, unchanged, and the round's number
    config = dict(grid.sent[-1].content["config"])
    assert config.pop("server-round") == 2 and config == cfg.to_mapping()


def test_a_failing_client_is_recorded_and_the_run_goes_on(image_folder, tmp_path):
    cfg = tiny_config(image_folder, tmp_path / "run", num_rounds=1)

    def flaky(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk on fire")
        return client_app(msg, context)

    summary = run_federation(InProcessGrid(flaky, num_nodes=3), cfg)
    final = summary["final"]
    assert final["clients_ok"] == 2 and final["clients_failed"] == 1
    assert "disk on fire" in next(iter(final["failures"].values()))


def test_waiting_for_nodes_times_out_with_numbers():
    with pytest.raises(TimeoutError, match=r"1 client node\(s\) connected .* 3 needed"):
        wait_for_nodes(InProcessGrid(client_app, num_nodes=1), needed=3, timeout=0.1)


def test_unknown_strategy_is_a_config_error(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="strategy='fedprox2' is invalid: allowed: fedavg"):
        build_strategy(tiny_config(image_folder, tmp_path, strategy="fedprox2"))


def test_bad_replies_are_rejected_with_reasons_and_only_good_ones_aggregated(small_image_folder, tmp_path):
    from faulty_client import FAULTS, REASONS, train as faulty

    kinds = [k for k in FAULTS.values() if k != "hang"]  # the in-process grid has no timeout
    cfg = fast_config(small_image_folder, tmp_path / "run", num_rounds=1)
    grid = InProcessGrid(faulty, num_nodes=2 + len(kinds))
    summary = run_federation(grid, cfg)
    final = summary["final"]
    assert final["clients_ok"] == 2 and final["clients_failed"] == len(kinds)
    assert final["aggregated"] is True
    reasons = " | ".join(final["failures"].values())
    for kind in kinds:
        assert REASONS[kind] in reasons, kind
    state, _ = load_weights(tmp_path / "run" / "checkpoint.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_too_few_valid_replies_keep_the_previous_global_model(small_image_folder, tmp_path, caplog):
    from faulty_client import train as faulty

    cfg = fast_config(small_image_folder, tmp_path / "run", num_rounds=1)
    # partitions 0 and 1 behave, 2 raises, 3 sends NaN: 2 valid of 4 is enough...
    assert run_federation(InProcessGrid(faulty, num_nodes=4), cfg)["final"]["aggregated"]
    # ...but with min-train-clients 3 it is not, and the model stays as it was
    cfg = cfg.replace(min_train_clients=3, out_dir=str(tmp_path / "kept"))
    with caplog.at_level("WARNING", logger="fedssl"):
        final = run_federation(InProcessGrid(faulty, num_nodes=4), cfg)["final"]
    assert final["aggregated"] is False and final["clients_ok"] == 2 and final["clients_failed"] == 2
    assert "2 valid replies, 3 needed" in caplog.text
    state, _ = load_weights(tmp_path / "kept" / "checkpoint.safetensors")
    initial = build_method(cfg).shared_state()
    assert all(torch.equal(state[k], initial[k]) for k in initial)


def test_nodes_leaving_mid_run_end_it_with_numbers_not_a_silent_wait(small_image_folder, tmp_path):
    class Shrinking(InProcessGrid):
        def get_node_ids(self):
            # all three at the start and in round 1, then two sites go away
            trained = any(m.content["config"]["server-round"] >= 1 for m in self.sent)
            return list(self.contexts)[:1] if trained else list(self.contexts)

    cfg = fast_config(small_image_folder, tmp_path / "run", num_rounds=2, node_wait_timeout=1.0)
    with pytest.raises(TimeoutError, match=r"1 client node\(s\) connected within 1 s .* 2 needed"):
        run_federation(Shrinking(client_app, num_nodes=3), cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]  # round 1 kept; resumable from its checkpoint
