"""A ClientApp that wraps the real one and misbehaves as real sites do, chosen by the node's
partition id. Module-level (not a closure) so Ray workers can import it by name."""
from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedssl.client.app import app as real_app
from fedssl.common.records import from_record, to_record

# partition id -> fault; every other partition behaves.
FAULTS = {2: "raise", 3: "nan", 4: "shape", 5: "huge", 6: "extra", 7: "hang"}
# What the server must say about each fault.
REASONS = {"raise": "site exploded", "nan": "NaN or Inf", "shape": "has shape",
           "huge": "update norm", "extra": "unexpected arrays", "hang": "no reply within round-timeout"}

app = ClientApp()


def _corrupt(kind: str, sent: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    key = next(k for k, v in got.items() if v.is_floating_point() and v.ndim > 1)
    if kind == "nan":
        got[key].view(-1)[0] = float("nan")
    elif kind == "shape":
        got[key] = got[key][..., :1].clone()
    elif kind == "extra":
        got["backdoor.weight"] = torch.zeros(3)
    elif kind == "huge":
        for k, v in got.items():
            if v.is_floating_point():
                got[k] = sent[k] + (v - sent[k]) * 1e4


@app.train()
def train(msg: Message, context: Context) -> Message:
    kind = FAULTS.get(int(context.node_config.get("partition-id", -1)))
    if kind == "raise":
        raise RuntimeError("site exploded")
    if kind == "hang":
        # Just past the deadline: the engine waits for the sleeper before it shuts down.
        time.sleep(float(msg.content["config"]["round-timeout"]) + 2)
    reply = real_app(msg, context)
    if kind in ("nan", "shape", "huge", "extra"):
        got = from_record(reply.content["arrays"])
        _corrupt(kind, from_record(msg.content["arrays"]), got)
        reply = Message(RecordDict({"arrays": to_record(got), "metrics": reply.content["metrics"]}),
                        reply_to=msg)
    return reply
