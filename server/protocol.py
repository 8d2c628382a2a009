"""What the ServerApp (server/app.py, server/round_step.py) needs from a run's strategy,
declared once. A plain rule (server/rounds.py's SSLRounds), its DP wrapper (server/dp.py's
PrivateRounds) and the SecAgg+ adapter (server/secure.py's SecureRounds) each provide it;
the ServerApp never asks which it runs."""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedssl.server.round_record import RoundRecord

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@runtime_checkable
class SSLStrategy(Protocol):
    def start(self, grid: Grid, initial_arrays: ArrayRecord, *, num_rounds: int, timeout: float,
              train_config: ConfigRecord, evaluate_fn: EvaluateFn) -> Any:
        """Run `num_rounds` rounds, calling `evaluate_fn(flower_round, arrays)` before the
        first (round 0) and after each (Flower's Strategy.start)."""

    def round_record(self, server_round: int) -> RoundRecord | None:
        """What `server_round` left behind, as this strategy may release it; None before
        any training (round 0)."""

    def resume_after(self, completed_round: int) -> None:
        """Count rounds on from a checkpoint's `completed_round` (server/round_record.RoundOffset)."""

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        """State kept across rounds, for the checkpoint (server/resume.py)."""

    def load_server_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        """Take back what server_state() gave, from a checkpoint."""

    def privacy_report(self) -> dict[str, Any]:
        """summary.json's `privacy`."""
