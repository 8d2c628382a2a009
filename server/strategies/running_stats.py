"""Running statistics are statistics, not weights.

The shared state's buffers (BatchNorm's running mean and variance and its step counter, the
only buffers the methods' networks share) are computed from data, not trained. A server
optimizer's step (FedAvgM's momentum, FedAdam's adaptive step) or L-DAWA's cosine weighting
turns them into numbers that are no statistic of anything, down to a negative variance, and
eval-mode BatchNorm then gives NaN features. So whatever the rule, they take what FedAvg gives
them: the example-weighted mean of the accepted replies (counters rounded to their dtype). The
rule's own aggregation, and its optimizer state (momentum, moments), cover the parameters only.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedssl.common.config import RunConfig
from fedssl.common.methods import build_method
from fedssl.server.npy_view import as_numpy


def statistics_keys(cfg: RunConfig) -> frozenset[str]:
    """The shared entries of the run's method that are module buffers, not parameters:
    BatchNorm's running statistics and step counters, computed from a site's images rather
    than learned. Every name a shared buffer is sent under (remove_duplicate=False), as the
    state dict sends it under each."""
    method = build_method(cfg)
    shared = method.shared_state()
    return frozenset(name for name, _ in method.named_buffers(remove_duplicate=False) if name in shared)


def in_dtype(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`value` as `dtype`, the dtype a site sent: integer step counters rounded, not truncated."""
    return np.asarray(np.rint(value) if np.dtype(dtype).kind in "iu" else value).astype(dtype)


def weighted_mean(records: list[Mapping[str, np.ndarray]], weights: list[float],
                  keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Each key's mean over the records, weighted, in the records' dtype (integers rounded)."""
    total = float(sum(weights))
    out = {}
    for key in keys:
        mean = sum((w / total) * r[key].astype(np.float64) for w, r in zip(weights, records))
        out[key] = in_dtype(mean, records[0][key].dtype)
    return out


def _without(reply: Message, keys: frozenset[str]) -> Message:
    """A view of the reply whose arrays lack `keys`; the reply itself is left as it came."""
    if reply.has_error() or not keys:
        return reply
    view = copy.copy(reply)  # its own content slot: setting it leaves the reply's alone
    view.content = RecordDict({
        name: ArrayRecord({k: v for k, v in record.items() if k not in keys})
        if isinstance(record, ArrayRecord) else record
        for name, record in reply.content.items()})
    return view


class StatisticsAsMean:
    """Placed before the Flower strategy, so it sees the accepted replies and the Flower
    strategy sees parameters only: `class X(StatisticsAsMean, FedAdam)`.

    `statistics` is set by the rule's build (`statistics_keys(cfg)`); integer arrays count as
    statistics whatever the method, as step counters. The aggregate comes back in the dtypes
    the clients sent (FedAdam's float64 step would otherwise double the model sent each round).
    """

    statistics: frozenset[str] = frozenset()
    weighted_by_key: str
    server_state_attrs: tuple[str, ...] = ()  # KeepsServerState's, where mixed in

    def statistics_in(self, arrays: Mapping) -> frozenset[str]:
        return frozenset(k for k, v in arrays.items()
                         if k in self.statistics or np.dtype(v.dtype).kind in "iu")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        # The Flower strategy keeps the model it steps from (current_arrays) and its moments
        # by array name; a checkpoint written before this rule may hold statistics there too.
        statistics = self.statistics_in(arrays)
        for attr in ("current_arrays", *self.server_state_attrs):
            held = getattr(self, attr, None)
            if isinstance(held, Mapping) and statistics & held.keys():
                setattr(self, attr, type(held)({k: v for k, v in held.items() if k not in statistics}))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return super().aggregate_train(server_round, replies)
        sent = [as_numpy(next(iter(r.content.array_records.values()))) for r in valid]
        statistics = self.statistics_in(sent[0])
        arrays, metrics = super().aggregate_train(server_round, [_without(r, statistics) for r in replies])
        if arrays is None:
            return arrays, metrics
        weights = [float(next(iter(r.content.metric_records.values()))[self.weighted_by_key])
                   for r in valid]
        means = weighted_mean(sent, weights, statistics)
        out = {key: means[key] if key in statistics
               else np.asarray(arrays[key].numpy().astype(first.dtype, copy=False))
               for key, first in sent[0].items()}
        return ArrayRecord({k: Array(v) for k, v in out.items()}), metrics
