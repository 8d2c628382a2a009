"""A Grid that delivers each message straight to the ClientApp in this process: the
server logic runs for real, in seconds, without Ray or a SuperLink (tests, benchmarks and
experiments/attack_table.py use it; clients run one after another)."""
from __future__ import annotations

from typing import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp | Callable[[Message, Context], Message],
                 num_nodes: int, node_config: Callable[[int], dict] | None = None):
        self.client_app = client_app
        # Messages take their run and sender from the process's task identity, which the
        # engines set; here this process plays the ServerApp.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i,
                              node_config=(node_config(i) if node_config else
                                           {"partition-id": i, "num-partitions": num_nodes}),
                              state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.sent: list[Message] = []

    def set_run(self, run):  # pragma: no cover - not used in-process
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            try:
                replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:  # the engines turn a client exception into an error reply
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"),
                                       reply_to=msg))
        return replies
