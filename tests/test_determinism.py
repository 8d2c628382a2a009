"""Same seed, same result: the sites a round samples and the order their replies are summed
in follow registration, not the random node ids or the order replies arrive in."""
from __future__ import annotations

import json
import random
import secrets

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.proto.node_pb2 import NodeInfo

from fedssl.client.app import app as client_app
from fedssl.server.app import run_federation
from fedssl.server.nodes import RegisteredOrder, registration_order
from fedssl.server.resume import load_run_state
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config


class EngineLikeGrid(InProcessGrid):
    """Like Flower's engines: random node ids registered in partition order, handed out as a
    set, and replies returned in the order they happen to finish (here: shuffled)."""

    def __init__(self, num_nodes: int):
        super().__init__(client_app, num_nodes)
        ids = [secrets.randbits(62) for _ in range(num_nodes)]
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                       node_config={"partition-id": i, "num-partitions": num_nodes})
                         for i, node in enumerate(ids)}
        self.registered = {node: f"2026-11-30T10:00:00.{i:06d}" for i, node in enumerate(ids)}

    def get_node_ids(self):
        return set(self.contexts)

    def get_nodes(self):
        return [NodeInfo(node_id=n, registered_at=self.registered[n]) for n in self.get_node_ids()]

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        random.Random(secrets.randbits(32)).shuffle(replies)
        return replies


def test_nodes_come_in_registration_order_whatever_their_ids():
    grid = EngineLikeGrid(6)
    by_registration = sorted(grid.registered, key=grid.registered.get)
    assert registration_order(grid) == by_registration
    assert RegisteredOrder(grid).get_node_ids() == by_registration
    # a grid that knows no registration times (Flower's default get_nodes) orders by node id
    assert registration_order(InProcessGrid(client_app, 3)) == [1000, 1001, 1002]


def _run(folder, out, **changes) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cfg = fast_config(folder, out, num_rounds=3, fraction_train=0.5, min_train_clients=3,
                      amp=False, **changes)
    run_federation(EngineLikeGrid(6), cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # what only the clock or the node ids decide
        for key in ("seconds", "client_train_seconds", "failures", "client_rules",
                    "client_images_per_second"):
            row.pop(key, None)
    return rows, load_run_state(out / "checkpoint.safetensors").shared


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])
def test_the_same_seed_gives_the_same_model_however_ids_and_arrival_order_fall(
        small_image_folder, tmp_path, strategy):
    first_rows, first = _run(small_image_folder, tmp_path / "a", strategy=strategy)
    second_rows, second = _run(small_image_folder, tmp_path / "b", strategy=strategy)
    assert first_rows == second_rows
    assert all(torch.equal(first[k], second[k]) for k in first)
