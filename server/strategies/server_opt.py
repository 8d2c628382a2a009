"""What Flower's server optimizers (FedAvgM, FedAdam) need to step an SSL model's shared
arrays. They treat every array as a weight; BatchNorm's step counters (num_batches_tracked)
are integers that count steps: a momentum or Adam step on one means nothing, and comes back
as float64. So counters take the example-weighted mean of the replies, as under FedAvg,
rounded; every other array goes back to the dtype the clients sent (FedAdam's float64 step
size would otherwise double the model sent each round)."""
from __future__ import annotations

from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message


class SentDtypes:
    """Placed between SSLRounds and the Flower strategy, so it sees the accepted replies:
    `class X(SSLRounds, SentDtypes, FedAdam)`."""

    weighted_by_key: str

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or not replies:
            return arrays, metrics
        return as_sent(arrays, replies, self.weighted_by_key), metrics


def as_sent(arrays: ArrayRecord, replies: list[Message], weight_key: str) -> ArrayRecord:
    sent = [next(iter(r.content.array_records.values())) for r in replies]
    weights = np.array([float(next(iter(r.content.metric_records.values()))[weight_key])
                        for r in replies])
    weights /= weights.sum()
    out = {}
    for key, value in arrays.items():
        dtype = np.dtype(sent[0][key].dtype)
        if dtype.kind in "iu":
            mean = sum(w * s[key].numpy().astype(np.float64) for w, s in zip(weights, sent))
            out[key] = np.rint(mean).astype(dtype)
        else:
            out[key] = value.numpy().astype(dtype, copy=False)
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()})
