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
