"""L-DAWA (Rehman et al., ICCV 2023): layer-wise divergence-aware weight aggregation.

Each client's layer l (here: each shared state_dict entry) is weighted by its cosine
similarity to the same layer of the global model the clients started from, and the weighted
layers are averaged over the K replies, following the authors' reference implementation
(github.com/yasar-rehman/L-DAWA, L-DAWA-Agg.py):

    w_g^l  <-  (1 / K) * sum_k  delta_k^l * w_k^l,    delta_k^l = cos(w_k^l, w_g^l)

The weights are not normalised to sum to 1 (a divergent round shrinks the layer), nor
weighted by examples; delta is capped at 1 against rounding, and not floored at 0, as there.
Where the cosine is undefined (a layer, or the global one, of norm 0: zero-initialised
biases) delta is 1, i.e. the plain mean; the reference divides by zero there. Entries without
a direction (0-d) and integer step counters take the plain mean, counters rounded to their
dtype. BatchNorm's running statistics are no layer to weight: the strategy gives them the
example-weighted mean of the replies (running_stats.py) and weights the parameters only.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg

from fedssl.common.config import RunConfig
from fedssl.server.npy_view import as_numpy
from fedssl.server.rule import AggregationRule, sampling
from fedssl.server.strategies.running_stats import StatisticsAsMean, in_dtype, statistics_keys


def layer_weight(client: np.ndarray, glob: np.ndarray) -> float:
    c, g = client.astype(np.float64).ravel(), glob.astype(np.float64).ravel()
    norms = np.linalg.norm(c) * np.linalg.norm(g)
    return 1.0 if norms == 0 else min(float(np.dot(c, g) / norms), 1.0)


def ldawa_aggregate(clients: list[Mapping[str, np.ndarray]],
                    glob: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, first in clients[0].items():
        layers = [c[key].astype(np.float64) for c in clients]
        if first.dtype.kind == "f" and first.ndim > 0:
            weights = [layer_weight(c[key], glob[key]) for c in clients]
            mean = sum(w * layer for w, layer in zip(weights, layers)) / len(clients)
            out[key] = mean.astype(first.dtype)
        else:
            mean = sum(layers) / len(clients)
            out[key] = in_dtype(mean, first.dtype)
    return out


class LDAWA(FedAvg):
    """FedAvg with L-DAWA's aggregation of the arrays it is handed (the parameters, under
    StatisticsAsMean); metrics are still example-weighted."""

    # The global model the round's clients started from, as numpy arrays.
    round_start: dict[str, np.ndarray] = {}

    def configure_train(self, server_round, arrays: ArrayRecord, config, grid):
        self.round_start = as_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        contents = [m.content for m in replies if not m.has_error()]
        if not contents:
            return None, None
        clients = [{k: v.numpy() for k, v in next(iter(c.array_records.values())).items()}
                   for c in contents]
        arrays = ldawa_aggregate(clients, self.round_start)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}), metrics


class LDAWAOnParameters(StatisticsAsMean, LDAWA):
    pass


def build(cfg: RunConfig) -> LDAWAOnParameters:
    strategy = LDAWAOnParameters(**sampling(cfg))
    strategy.statistics = statistics_keys(cfg)
    return strategy


RULE = AggregationRule(build=build)
