"""The server's step after each round (Flower's evaluate_fn): evaluate the global model,
checkpoint the run, write the round's metrics row. Checkpoint before the row: a row on disk
always has its checkpoint."""
from __future__ import annotations

import time
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from fedssl.common.config import RunConfig
from fedssl.common.methods.base import SSLMethod
from fedssl.common.records import from_record
from fedssl.server.evaluation import GlobalEvaluator, stop_if_not_finite
from fedssl.server.progress import Progress
from fedssl.server.protocol import SSLStrategy
from fedssl.server.resume import RunState, rng_state, save_run_state
from fedssl.server.round_record import RoundOffset, RoundRecord
from fedssl.server.run_dir import RunDir, weights_metadata


class RoundRecorder:
    """Evaluates, checkpoints and records each round of one start(); `history` (the rows so
    far, a resumed run's included) grows by a row a round."""

    def __init__(self, cfg: RunConfig, method: SSLMethod, evaluator: GlobalEvaluator,
                 strategy: SSLStrategy, out: RunDir, history: list[dict[str, Any]],
                 offset: RoundOffset, resumed: bool):
        self.cfg, self.method, self.evaluator, self.strategy = cfg, method, evaluator, strategy
        self.out, self.history, self.offset, self.resumed = out, history, offset, resumed
        self.round_started = time.perf_counter()

    def __call__(self, flower_round: int, arrays: ArrayRecord, progress: Progress) -> MetricRecord | None:
        if flower_round == 0 and self.resumed:
            return None  # evaluated and recorded before the interruption
        server_round = self.offset.server_round(flower_round)
        self.method.load_partial(from_record(arrays))
        scores = self.evaluate(server_round)
        row = self.row(server_round, scores)
        self.history.append(row)
        self.checkpoint(server_round)
        self.out.append_metrics(row)
        stop_if_not_finite(scores, server_round)  # a NaN/Inf model: warned, marked, stopped
        progress.update(row)
        return MetricRecord({k: float(v) for k, v in scores.items()})

    def evaluate(self, server_round: int) -> dict[str, Any]:
        """The global model's scores on eval-every rounds and the last (with the probe)."""
        final = server_round == self.cfg.num_rounds
        if final or server_round % self.cfg.eval_every == 0:
            return self.evaluator(self.method, probe=final and self.cfg.probe, final=final)
        return {}

    def row(self, server_round: int, scores: dict[str, Any]) -> dict[str, Any]:
        # No record before any training: round 0 is the initial model.
        record = self.strategy.round_record(server_round) or RoundRecord()
        now = time.perf_counter()
        seconds, self.round_started = round(now - self.round_started, 3), now
        return {"round": server_round, **scores, **record.row_fields(), "seconds": seconds}

    def checkpoint(self, server_round: int) -> None:
        # Weights come back from the method, so buffers keep their dtypes (FedAvg returns
        # int64 counters as float64).
        save_run_state(self.out.checkpoint_path,
                       RunState(server_round, self.method.shared_state(), self.history,
                                self.strategy.server_state(), rng_state()),
                       weights_metadata(self.cfg, server_round))
