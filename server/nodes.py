"""Waiting for client nodes with a deadline: Flower's sampler waits forever for nodes that
never connect (or left), which looks like a hung run."""
from __future__ import annotations

import time

from flwr.serverapp import Grid


def wait_for_nodes(grid: Grid, needed: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (seen := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{seen} client node(s) connected within {timeout:.0f} s "
                               f"(node-wait-timeout), {needed} needed (min-train-clients)")
        time.sleep(1.0)
    return seen


def registration_order(grid: Grid) -> list[int]:
    """The connected nodes in the order they registered with the SuperLink (node id breaks a
    tie). Node ids are random (in simulation, new each run) and the grid hands them out as a
    set, so Flower's seeded `random.sample` over them would pick other sites, and a sum would
    add replies in another order, in every run; registration order is the partition order in
    simulation and the enrolment order in deployment."""
    return [node.node_id for node in sorted(grid.get_nodes(),
                                            key=lambda node: (node.registered_at, node.node_id))]


class RegisteredOrder:
    """A grid whose node ids come in registration order, for Flower's sampler: the run's
    seed then picks the same sites in every run. Everything else is the grid's own."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        return registration_order(self._grid)
