"""A server killed during a round resumes from its last checkpoint and ends exactly where an
uninterrupted run with the same seed ends."""
from __future__ import annotations

import json

import pytest
from flwr.app import Context, Message

from fedssl.client.app import app as client_app
from fedssl.common.config import ConfigError
from fedssl.server.app import run_federation
from fedssl.server.resume import load_run_state
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config

# Wall-clock measurements; everything else in a row must repeat exactly.
TIMING = {"seconds", "client_images_per_second", "client_train_seconds"}


class Killed(BaseException):
    """Not an Exception, so it escapes the grid and the server the way SIGKILL ends it."""


def rows(out) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_during_a_round_then_resumed_matches_an_uninterrupted_run(small_image_folder, tmp_path):
    # SimSiam keeps no client state; BYOL's target would be rebuilt after a restart (README).
    settings = dict(method="simsiam", num_rounds=3)
    whole = tmp_path / "whole"
    run_federation(InProcessGrid(client_app, num_nodes=2), fast_config(small_image_folder, whole, **settings))

    def dies_in_round_2(msg: Message, context: Context) -> Message:
        if msg.content["config"]["server-round"] == 2:
            raise Killed()
        return client_app(msg, context)

    broken = tmp_path / "broken"
    with pytest.raises(Killed):
        run_federation(InProcessGrid(dies_in_round_2, num_nodes=2),
                       fast_config(small_image_folder, broken, **settings))
    assert load_run_state(broken / "checkpoint.safetensors").round == 1
    assert [r["round"] for r in rows(broken)] == [0, 1]

    # a new server process and fresh client nodes, as after a restart
    summary = run_federation(InProcessGrid(client_app, num_nodes=2),
                             fast_config(small_image_folder, broken, resume=True, **settings))
    assert [r["round"] for r in rows(broken)] == [0, 1, 2, 3]
    assert rows(broken) == rows(whole)
    assert summary["final"]["knn_top1"] == rows(whole)[-1]["knn_top1"]
    assert load_run_state(broken / "checkpoint.safetensors").round == 3
    with pytest.raises(ConfigError, match="num-rounds=2 is invalid: .* already at round 3"):
        run_federation(InProcessGrid(client_app, num_nodes=2),
                       fast_config(small_image_folder, broken, resume=True, **{**settings, "num_rounds": 2}))


def test_resume_without_a_checkpoint_names_the_folder(small_image_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"resume=True is invalid: out-dir=.*empty.* holds no checkpoint"):
        run_federation(InProcessGrid(client_app, num_nodes=2),
                       fast_config(small_image_folder, tmp_path / "empty", resume=True))


def test_rng_and_server_state_survive_the_checkpoint_file(tmp_path):
    import random

    import numpy as np
    import torch

    from fedssl.server.resume import RunState, rng_state, save_run_state, set_rng_state

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    server_state = {"m_t": {"encoder.w": np.arange(6, dtype=np.float32).reshape(2, 3),
                            "encoder.n": np.asarray(3, dtype=np.int64)}}
    save_run_state(tmp_path / "c.safetensors",
                   RunState(4, {"encoder.w": torch.ones(2, 3)}, [{"round": 4}], server_state, saved),
                   {"method": "byol"})
    loaded = load_run_state(tmp_path / "c.safetensors")
    assert (loaded.round, loaded.history, list(loaded.shared)) == (4, [{"round": 4}], ["encoder.w"])
    assert loaded.server_state["m_t"]["encoder.n"].shape == ()
    assert all(np.array_equal(loaded.server_state["m_t"][k], v) for k, v in server_state["m_t"].items())
    random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(loaded.rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_strategy_declares_its_server_state_and_gets_it_back():
    import numpy as np
    from flwr.serverapp.strategy import FedAdam, FedAvg

    from fedssl.common.config import RunConfig
    from fedssl.server.rounds import SSLRounds
    from fedssl.server.rule import KeepsServerState

    class FedAdamWithState(KeepsServerState, FedAdam):
        server_state_attrs = ("current_arrays", "m_t", "v_t")

    before = SSLRounds(FedAdamWithState(), RunConfig())
    before.rule.current_arrays, before.rule.m_t = {"w": np.zeros(3)}, {"w": np.full(3, 0.5)}
    state = before.server_state()
    assert set(state) == {"current_arrays", "m_t"}  # v_t not yet built
    after = SSLRounds(FedAdamWithState(), RunConfig())
    after.load_server_state(state)
    assert np.array_equal(after.rule.m_t["w"], before.rule.m_t["w"]) and after.rule.v_t is None
    with pytest.raises(KeyError, match="server state 'current_arrays' this strategy does not keep"):
        SSLRounds(FedAvg(), RunConfig()).load_server_state(state)
