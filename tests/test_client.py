"""The ClientApp's train handler, called directly as the engines call it."""
from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from safetensors.torch import load_file

from fedssl.client.app import LOCAL_STATE_KEY, app as client_app
from fedssl.common.datasets import DataError
from fedssl.common.methods import build_method
from fedssl.common.records import from_record, to_record
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config, tiny_config


def train_message(cfg, server_round: int = 1) -> Message:
    InProcessGrid(client_app, num_nodes=1)  # sets the process's task identity
    config = ConfigRecord({**cfg.to_mapping(), "server-round": server_round})
    content = RecordDict({"arrays": to_record(build_method(cfg).shared_state()), "config": config})
    return Message(content, 1000, "train")


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1000, node_config=node_config, state=RecordDict(), run_config={})


def test_train_replies_with_changed_shared_arrays_and_metrics(image_folder, tmp_path):
    cfg = tiny_config(image_folder, tmp_path)
    msg = train_message(cfg)
    ctx = context({"partition-id": 0, "num-partitions": 3})
    reply = client_app(msg, ctx)
    assert not reply.has_error()
    sent, got = from_record(msg.content["arrays"]), from_record(reply.content["arrays"])
    assert set(got) == set(sent)  # only the shared part travels: no target network
    assert not any(k.startswith("target_") for k in got)
    assert any(not torch.equal(got[k], sent[k]) for k in sent if k.startswith("encoder."))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 26  # a third of the 76 images left after 20 are held out
    assert metrics["train-loss"] > 0 and metrics["images-per-second"] > 0


def test_byol_target_stays_on_the_client_across_rounds(image_folder, tmp_path):
    cfg = tiny_config(image_folder, tmp_path)
    ctx = context({"partition-id": 1, "num-partitions": 3})
    client_app(train_message(cfg, 1), ctx)
    target_1 = from_record(ctx.state[LOCAL_STATE_KEY])
    assert all(k.startswith("target_") for k in target_1)
    client_app(train_message(cfg, 2), ctx)
    target_2 = from_record(ctx.state[LOCAL_STATE_KEY])
    # round 2 continued the EMA from round 1's target instead of re-copying the online net
    fresh = build_method(cfg)
    fresh.init_local()
    key = next(k for k in target_2 if k.endswith("weight") and target_2[k].ndim > 1)
    assert not torch.equal(target_2[key], target_1[key])
    assert not torch.equal(target_2[key], fresh.local_state()[key])


def test_a_site_trains_on_its_own_folder(image_folder, tmp_path):
    cfg = tiny_config(image_folder, tmp_path, dataset="synthetic", data_path="")
    reply = client_app(train_message(cfg), context({"data-path": str(image_folder / "disc")}))
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == 24


@pytest.mark.parametrize("node_config, fragment", [
    ({}, "this node has no data"),
    ({"data-path": "/nonexistent/site0"}, "/nonexistent/site0"),
])
def test_a_site_without_data_fails_with_a_clear_reason(image_folder, tmp_path, node_config, fragment):
    cfg = tiny_config(image_folder, tmp_path)
    with pytest.raises(DataError, match=fragment):
        client_app(train_message(cfg), context(node_config))


@pytest.mark.parametrize("lost", ["missing", "wrong-keys", "wrong-shapes"])
def test_a_client_that_lost_its_local_state_rebuilds_it_from_the_global_model(
        small_image_folder, tmp_path, caplog, lost):
    cfg = fast_config(small_image_folder, tmp_path)
    ctx = context({"partition-id": 0, "num-partitions": 2})
    assert client_app(train_message(cfg, 1), ctx).content["metrics"]["local-state-rebuilt"] == 0
    kept = from_record(ctx.state[LOCAL_STATE_KEY])
    # continued in round 2 from round 1's target: nothing rebuilt
    assert client_app(train_message(cfg, 2), ctx).content["metrics"]["local-state-rebuilt"] == 0

    if lost == "missing":  # a restarted SuperNode, or a resumed server's new run
        del ctx.state[LOCAL_STATE_KEY]
    elif lost == "wrong-keys":  # e.g. saved by another method
        ctx.state[LOCAL_STATE_KEY] = to_record({"queue": torch.zeros(4, 8)})
    else:
        ctx.state[LOCAL_STATE_KEY] = to_record({k: (v[..., :1].clone() if v.ndim else v) for k, v in kept.items()})
    with caplog.at_level("INFO", logger="fedssl"):
        reply = client_app(train_message(cfg, 3), ctx)
    assert not reply.has_error() and reply.content["metrics"]["local-state-rebuilt"] == 1
    assert "round 3: local state rebuilt from the global model" in caplog.text
    rebuilt = from_record(ctx.state[LOCAL_STATE_KEY])
    assert set(rebuilt) == set(kept)
    assert all(rebuilt[k].shape == kept[k].shape for k in kept)


def test_local_state_kept_in_a_state_dir_survives_a_restarted_supernode(small_image_folder, tmp_path, caplog):
    cfg = fast_config(small_image_folder, tmp_path, client_state_dir=str(tmp_path / "run-config-dir"))
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "site")}  # the site's wins
    ctx = context(node)
    assert client_app(train_message(cfg, 1), ctx).content["metrics"]["local-state-rebuilt"] == 0
    path = tmp_path / "site" / "run-1" / "client-0" / f"{LOCAL_STATE_KEY}.safetensors"
    target_1 = load_file(path)
    assert LOCAL_STATE_KEY not in ctx.state and not (tmp_path / "run-config-dir").exists()

    restarted = context(node)  # a new process: Flower's context.state starts empty
    assert client_app(train_message(cfg, 2), restarted).content["metrics"]["local-state-rebuilt"] == 0
    target_2 = load_file(path)
    key = next(k for k in target_2 if k.endswith("weight") and target_2[k].ndim > 1)
    assert not torch.equal(target_1[key], target_2[key])  # the EMA went on from round 1's target

    path.write_bytes(b"torn")
    with caplog.at_level("WARNING", logger="fedssl"):
        reply = client_app(train_message(cfg, 3), context(node))
    assert reply.content["metrics"]["local-state-rebuilt"] == 1
    assert f"local state {path} cannot be read" in caplog.text
    assert set(load_file(path)) == set(target_1)


def test_a_simulated_client_keeps_its_state_under_the_run_configs_state_dir(small_image_folder, tmp_path):
    cfg = fast_config(small_image_folder, tmp_path, client_state_dir=str(tmp_path / "state"))
    client_app(train_message(cfg, 1), context({"partition-id": 1, "num-partitions": 2}))
    assert (tmp_path / "state" / "run-1" / "client-1" / f"{LOCAL_STATE_KEY}.safetensors").is_file()


def test_the_rounds_of_one_run_reuse_the_built_method_and_another_model_builds_anew(
        small_image_folder, tmp_path, monkeypatch):
    from fedssl.client import app as client_module
    builds, real = [], client_module.build_method
    monkeypatch.setattr(client_module, "build_method", lambda cfg: builds.append(cfg) or real(cfg))
    client_module.built_method.cache_clear()
    cfg = fast_config(small_image_folder, tmp_path)
    ctx = context({"partition-id": 0, "num-partitions": 2})
    for server_round in (1, 2):  # each round's config arrives as a new record
        assert not client_app(train_message(cfg, server_round), ctx).has_error()
    assert len(builds) == 1

    other = cfg.replace(proj_dim=16)
    assert not client_app(train_message(other, 1), context({"partition-id": 0, "num-partitions": 2})).has_error()
    assert builds == [cfg, other]
    assert client_module.built_method(other).projector[-1].out_features == 16
