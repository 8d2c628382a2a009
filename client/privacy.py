"""Client side of differential privacy (dp = fixed | adaptive): under DP a site releases its
clipped update and nothing else. Flower's clipping mods bound ||reply - global|| by the
clipping norm the server sends each round; around them, this mod makes the rest of the reply
carry nothing of this site's data (docs/privacy.md):

- BatchNorm statistics (running means and variances, step counters) go back as they
  arrived: they are computed from the site's images, and the noise that covers the clipped
  weights does not cover them (noised, a variance can go negative). Sent unchanged, they are
  an update of zero: no weight in the norm, and the mean of them is the global value. The
  site's own statistics never leave it; its training normalises each batch by the batch's
  own statistics anyway, and the server estimates statistics for evaluation from its images.
  A step counter's own change would also dominate the norm Flower clips by (a step count
  dwarfs a weight update) and escape the clipping (Flower scales each array in place; a 0-d
  one is rebound, not scaled).
- Metrics: one, `num-examples` = 1. Flower's protocol needs that key; the server weighs every
  site the same under DP whatever it says. The train loss, timings, image counts and the
  strategy's rule numbers (FedU's divergence, FedEMA's mu) stay on the site; the adaptive mod
  adds its clipped/not bit, which the server releases only through a noisy count."""
from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

CLIPPING_MODS: dict[str, Mod] = {"fixed": fixedclipping_mod, "adaptive": adaptiveclipping_mod}
# torch's names for the buffers of its normalisation layers (BatchNorm, InstanceNorm with
# running statistics); server/dp.py finds the same entries as the method's buffers.
STATISTIC_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
RELEASED_METRICS = {"num-examples": 1}


def is_statistic(key: str) -> bool:
    return key.endswith(STATISTIC_SUFFIXES)


def clip_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the reply's update with the run's Flower clipping mod and release nothing else; a
    run without DP passes through. The run config sent with the round names the mode."""
    config = msg.content.config_records.get("config", {})
    clipping = CLIPPING_MODS.get(str(config.get("dp", "none")))
    if clipping is None:
        return call_next(msg, context)
    sent = next(iter(msg.content.array_records.values()))

    def train_releasing_only_the_update(inner_msg: Message, inner_context: Context) -> Message:
        reply = call_next(inner_msg, inner_context)
        if reply.has_error():
            return reply
        arrays = next(iter(reply.content.array_records.values()))
        for key in [k for k in arrays.keys() if is_statistic(k)]:
            arrays[key] = sent[key]  # a zero update: the mod sends back sent + 0, dtype kept
        for name in list(reply.content.metric_records):
            reply.content[name] = MetricRecord(dict(RELEASED_METRICS))
        return reply

    return clipping(msg, context, train_releasing_only_the_update)
