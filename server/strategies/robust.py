"""What the Byzantine-robust rules (fedmedian, fedtrimmedavg, krum, multikrum, bulyan) share.

They run on the replies screening accepted (server/rounds.py), over every shared array.

BatchNorm statistics take the rule's robust aggregate too, not the example-weighted mean the
other rules give them (running_stats.py): a hostile site can poison its running means and
variances as easily as its weights (a huge variance shrinks every eval-mode feature), and a
mean passes that on. The robust aggregates stay statistics: a coordinate-wise median or
trimmed mean of positive variances is positive, Krum's choice is one site's own statistics,
and MultiKrum's and Bulyan's means are taken over chosen sites' values (Bulyan's per
coordinate), so each variance stays a mean of positive ones. Step counters are rounded back
to their integer dtype; every array comes back in the dtype the sites sent.

`num-malicious` (f) is the number of hostile sites a rule must withstand; each rule refuses a
`min-train-clients` too small for it (screening keeps the global model in a round with fewer
accepted replies than that).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedssl.common.config import ConfigError, RunConfig
from fedssl.server.npy_view import as_numpy
from fedssl.server.strategies.running_stats import in_dtype


def require_replies(cfg: RunConfig, needed: int, why: str) -> None:
    if cfg.min_train_clients < needed:
        raise ConfigError(f"min-train-clients={cfg.min_train_clients} is invalid with strategy="
                          f"{cfg.strategy!r} and num-malicious={cfg.num_malicious}: must be >= "
                          f"{needed} ({why})")


class InSentDtypes:
    """Placed before the Flower rule: the aggregate comes back in the dtypes the sites sent (a median or a mean of int64 counters is float64), counters rounded."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        valid = [r for r in replies if not r.has_error()]
        # Read before the rule runs: Flower's median and Bulyan take the arrays out of the replies.
        sent = {k: v.dtype for k, v in as_numpy(next(iter(valid[0].content.array_records.values()))).items()} \
            if valid else {}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        return ArrayRecord({key: Array(in_dtype(array.numpy(), sent[key])) for key, array in arrays.items()}), metrics


def select_by_float_distances(contents: list[RecordDict], num_malicious: int,
                              num_to_select: int) -> list[RecordDict]:
    """Flower's (Multi-)Krum choice, its distances taken over the float arrays only: integer
    step counters count a site's batches (differences in the tens) and would outweigh every
    weight's distance, as screening leaves them out of update norms too."""
    views = [RecordDict({name: ArrayRecord({k: v for k, v in record.items() if np.dtype(v.dtype).kind == "f"})
                         for name, record in content.array_records.items()})
             for content in contents]
    position = {id(view): i for i, view in enumerate(views)}
    return [contents[position[id(view)]] for view in select_multikrum(views, num_malicious, num_to_select)]


class FloatDistanceKrum:
    """Placed before Flower's Krum / MultiKrum: their aggregation, choosing with
    select_by_float_distances. `num_nodes_to_select` 0 keeps all but f of the round's replies."""

    num_malicious_nodes: int
    num_nodes_to_select: int

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        contents = [m.content for m in replies if not m.has_error()]
        if not contents:
            return None, None
        keep = self.num_nodes_to_select or max(len(contents) - self.num_malicious_nodes, 1)
        chosen = select_by_float_distances(contents, self.num_malicious_nodes, keep)
        return (aggregate_arrayrecords(chosen, self.weighted_by_key),
                self.train_metrics_aggr_fn(chosen, self.weighted_by_key))
