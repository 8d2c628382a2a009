"""What every fedssl strategy adds to its Flower strategy: the round's learning rate in
the train config, and a record of which clients replied, failed, and how they trained."""
from __future__ import annotations

import logging
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from common.schedules import cosine

log = logging.getLogger("fedssl")


class SSLRounds:
    """Mixin placed before a Flower strategy class: `class X(SSLRounds, FedAvg)`."""

    def setup_rounds(self, base_lr: float, num_rounds: int) -> None:
        self.base_lr = base_lr
        self.num_rounds = num_rounds
        self.round_stats: dict[int, dict] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Cosine decay over rounds, ending just above 0 so the last round still learns.
        round_config = ConfigRecord(dict(config))
        round_config["lr"] = cosine((server_round - 1) / self.num_rounds, self.base_lr, 0.0)
        return super().configure_train(server_round, arrays, round_config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        failed = {m.metadata.src_node_id: m.error.reason for m in replies if m.has_error()}
        for node, reason in failed.items():
            log.warning("round %d: client %s failed: %s", server_round, node, reason)
        arrays, metrics = super().aggregate_train(server_round, ok)
        self.round_stats[server_round] = {
            "clients_ok": len(ok),
            "clients_failed": len(failed),
            "failures": {str(k): v for k, v in failed.items()},
            "train_metrics": dict(metrics) if metrics is not None else {},
        }
        if arrays is None:
            log.warning("round %d: no usable reply; the global model stays as it was", server_round)
        return arrays, metrics
