"""Client side of differential privacy (dp = fixed | adaptive): Flower's clipping mods bound
this node's update ||reply - global|| by the clipping norm the server sends each round.

Flower's mods clip every array of the reply, integer ones included: BatchNorm's step counter
(num_batches_tracked) would then count in the norm (a step count dwarfs a weight update) and
a float scale factor cannot be applied to an int64 array in place. So the counters are held
out of the mod: it sees them unchanged from the global model (an update of zero, no weight in
the norm), and the reply gets this node's real counters back afterwards. A counter reveals how
many steps the node took, which its num-examples metric reveals in the clear anyway."""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

CLIPPING_MODS: dict[str, Mod] = {"fixed": fixedclipping_mod, "adaptive": adaptiveclipping_mod}


def is_counter(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))


def clip_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the reply's float update with the run's Flower clipping mod; a run without DP
    passes through. The run config sent with the round names the mode."""
    config = msg.content.config_records.get("config", {})
    clipping = CLIPPING_MODS.get(str(config.get("dp", "none")))
    if clipping is None:
        return call_next(msg, context)
    sent = next(iter(msg.content.array_records.values()))
    counters = {}

    def train_with_counters_held(inner_msg: Message, inner_context: Context) -> Message:
        reply = call_next(inner_msg, inner_context)
        if reply.has_error():
            return reply
        arrays = next(iter(reply.content.array_records.values()))
        for key in [k for k, v in arrays.items() if is_counter(v.dtype)]:
            counters[key] = arrays[key]
            arrays[key] = sent[key]
        return reply

    reply = clipping(msg, context, train_with_counters_held)
    if not reply.has_error():
        arrays = next(iter(reply.content.array_records.values()))
        for key, value in counters.items():
            arrays[key] = value
    return reply
