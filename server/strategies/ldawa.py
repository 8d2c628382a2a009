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
from fedssl.server.rule import AggregationRule, ScoresSites, sampling
from fedssl.server.strategies.running_stats import StatisticsAsMean, in_dtype, statistics_keys


def layer_weight(client: np.ndarray, glob: np.ndarray) -> float:
    c, g = client.astype(np.float64).ravel(), glob.astype(np.float64).ravel()
    norms = np.linalg.norm(c) * np.linalg.norm(g)
    return 1.0 if norms == 0 else min(float(np.dot(c, g) / norms), 1.0)


def is_layer(array: np.ndarray) -> bool:
    """An entry with a direction to compare: a float array of at least one dimension."""
    return array.dtype.kind == "f" and array.ndim > 0


def layer_weights(client: Mapping[str, np.ndarray], glob: Mapping[str, np.ndarray]) -> dict[str, float]:
    """delta^l of one client's reply, for each of its layers."""
    return {key: layer_weight(array, glob[key]) for key, array in client.items() if is_layer(array)}


def ldawa_aggregate(clients: list[Mapping[str, np.ndarray]], glob: Mapping[str, np.ndarray],
                    weights: list[dict[str, float]] | None = None) -> dict[str, np.ndarray]:
    """`weights`: each client's layer_weights, where the caller has them already."""
    weights = weights or [layer_weights(c, glob) for c in clients]
    out = {}
    for key, first in clients[0].items():
        layers = [c[key].astype(np.float64) for c in clients]
        if is_layer(first):
            mean = sum(w[key] * layer for w, layer in zip(weights, layers)) / len(clients)
            out[key] = mean.astype(first.dtype)
        else:
            mean = sum(layers) / len(clients)
            out[key] = in_dtype(mean, first.dtype)
    return out


def weight_summary(weights: Mapping[str, float]) -> dict[str, float]:
    """What a round records of one site's layer weights."""
    values = list(weights.values())
    return {"layer-weight-mean": float(np.mean(values)), "layer-weight-min": float(min(values))}


class LDAWA(ScoresSites, FedAvg):
    """FedAvg with L-DAWA's aggregation of the arrays it is handed (the parameters, under
    StatisticsAsMean); metrics are still example-weighted."""

    # The global model the round's clients started from, as numpy arrays.
    round_start: dict[str, np.ndarray] = {}

    def configure_train(self, server_round, arrays: ArrayRecord, config, grid):
        self.round_start = as_numpy(arrays)
        self.site_numbers = {}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return None, None
        clients = [{k: v.numpy() for k, v in next(iter(m.content.array_records.values())).items()}
                   for m in valid]
        weights = [layer_weights(c, self.round_start) for c in clients]
        self.site_numbers = {str(m.metadata.src_node_id): weight_summary(w) for m, w in zip(valid, weights)}
        arrays = ldawa_aggregate(clients, self.round_start, weights)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}), metrics


class LDAWAOnParameters(StatisticsAsMean, LDAWA):
    pass


def build(cfg: RunConfig) -> LDAWAOnParameters:
    strategy = LDAWAOnParameters(**sampling(cfg))
    strategy.statistics = statistics_keys(cfg)
    return strategy


RULE = AggregationRule(build=build)
