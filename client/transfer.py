"""Client side of a narrow transfer (transfer-dtype = float16): the server sends its float
arrays narrowed; this node trains on them widened to float32 and sends back, in the dtype
they arrived in, how each changed (common/records.py says why changes, not weights). The
arrays that arrive say it all, so a site needs no setting; arrays that arrive in float32
pass through untouched."""
from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedssl.common.records import encode_update, has_narrow, widen


def transfer_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    narrowed = {name: record for name, record in msg.content.array_records.items() if has_narrow(record)}
    if not narrowed:
        return call_next(msg, context)
    # A new RecordDict for this message only: the server's messages of a round may share one.
    msg.content = RecordDict({**msg.content, **{name: widen(r) for name, r in narrowed.items()}})
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    arrived = next(iter(narrowed.values()))
    for name, record in list(reply.content.array_records.items()):
        reply.content[name] = encode_update(record, arrived)
    return reply
