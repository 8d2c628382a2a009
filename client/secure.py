"""Client side of SecAgg+ (secure-aggregation = true): a thin adapter from Flower's legacy
SecAgg+ protocol (`secaggplus_mod` around a NumPyClient) to the same local round as a plain
run (client/app.py's train_round: same method, trainer, data and client-side rule).

The node masks and uploads its *update* (new shared float arrays minus the global ones), not
its weights: the protocol clips each value to +-secagg-clip-range before quantizing, and an
update stays far inside a range that whole weights and BatchNorm variances could leave.
Integer step counters do not enter the sum (common/secure_update.py)."""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedssl.common.config import RunConfig
from fedssl.common.secure_update import SHARED_KEYS, summed_keys

TrainRound = Callable[[Mapping, ArrayRecord, Context], tuple[dict, MetricRecord]]


class SecureRoundClient(NumPyClient):
    def __init__(self, train_round: TrainRound, context: Context):
        self.train_round = train_round
        self.context = context

    def fit(self, parameters, config):
        keys = str(config[SHARED_KEYS]).split(",")
        max_weight = RunConfig.from_mapping(config, ignore_unknown=True).secagg_max_weight
        sent = dict(zip(keys, parameters, strict=True))
        record = ArrayRecord({k: Array(np.asarray(v)) for k, v in sent.items()})
        shared, metrics = self.train_round(config, record, self.context)
        update = [shared[k].numpy().astype(np.float64) - sent[k].astype(np.float64)
                  for k in summed_keys(keys, sent)]
        if metrics["num-examples"] > max_weight:
            # The protocol scales the update by num-examples / max-weight; above 1 the
            # masked sum can overflow and corrupt every site's share of the mean.
            raise ValueError(f"num-examples {metrics['num-examples']} exceeds secagg-max-weight "
                             f"{max_weight:g}; raise it to at least the largest site's image count")
        # A broken update cannot be screened out on the server once it is masked: the
        # node drops out of the round instead (the others' sum is still unmasked).
        if not all(np.isfinite(u).all() for u in update):
            raise ValueError("the local update holds NaN or Inf; leaving this round")
        return update, int(metrics["num-examples"]), dict(metrics)


def secure_rounds_mod(train_round: TrainRound):
    """A mod for the fedssl ClientApp's train handler: SecAgg+ protocol messages go through
    Flower's secaggplus_mod to a NumPyClient running `train_round`; others pass through. One
    ClientApp thus serves plain and secure runs, in simulation and at deployed sites."""
    secure_app = ClientApp(client_fn=lambda context: SecureRoundClient(train_round, context).to_client(),
                           mods=[secaggplus_mod])

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secure_app(msg, context)
        return call_next(msg, context)

    return mod
