"""The fedssl round around a rule's Flower strategy: the run config sent unchanged each round
(clients compute the round's schedules from its number: common/schedules.py), screening of
every train reply before aggregation, a record of which clients were accepted or rejected and
why (a RoundRecord per round: server/round_record.py), and the round offset and server state
that let a run resume from a checkpoint."""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedssl.common.config import RunConfig
from fedssl.common.global_updates import METRIC_PREFIX
from fedssl.common.records import TRANSFER_DTYPES, decode_update, has_narrow, narrow
from fedssl.common.training import steps_per_epoch
from fedssl.server.mean import WeightedMean
from fedssl.server.nodes import RegisteredOrder, registration_order, wait_for_nodes
from fedssl.server.round_record import RoundOffset, RoundRecord
from fedssl.server.npy_view import as_numpy
from fedssl.server.rule import KeepsServerState, ScoresSites
from fedssl.server.validation import screen, spec_of

log = logging.getLogger("fedssl")


def client_rules(replies: list[Message]) -> dict[str, dict[str, float]]:
    """Each client's numbers from its strategy's client-side rule (FedU's divergence and
    choice, FedEMA's mu), by node: averaged, they would hide who took the global model."""
    rules = {}
    for reply in replies:
        for record in reply.content.metric_records.values():
            numbers = {k[len(METRIC_PREFIX):]: v for k, v in record.items()
                       if k.startswith(METRIC_PREFIX)}
            if numbers:
                rules[str(reply.metadata.src_node_id)] = numbers
    return rules


def _attribute_link_errors(replies: list[Message], sent: list[Metadata]) -> None:
    """The SuperLink answers for a node whose heartbeat stopped (Flower's NODE_UNAVAILABLE
    error reply) from its own node id; put that answer back under the node it was sent to,
    so the round records the dead site once, with the SuperLink's reason, instead of a
    failure of node 1 plus a "no reply within round-timeout" for the site."""
    to_node = {m.message_id: m.dst_node_id for m in sent if m.message_id}
    for reply in replies:
        node = to_node.get(reply.metadata.reply_to_message_id)
        if node is not None and reply.metadata.src_node_id == SUPERLINK_NODE_ID:
            reply.metadata.__dict__["_src_node_id"] = node  # Metadata has no setter for it


class SSLRounds(Strategy):
    """Holds the Flower strategy that aggregates (`rule`, built from the run's
    server/strategies declaration), the way Flower's DP wrappers hold theirs: each round it
    sends through the rule's sampling, screens the replies, and hands the rule the accepted
    ones, or (`streams_mean`, a rule whose aggregate is FedAvg's mean) sums them while
    screening and asks the rule only for the metrics."""

    def __init__(self, rule: Strategy, cfg: RunConfig, *, streams_mean: bool = False):
        self.rule = rule
        self.streams_mean = streams_mean
        self.min_valid = cfg.min_train_clients
        self.max_norm_ratio = cfg.max_update_norm_ratio
        self.batch_size, self.local_epochs = cfg.batch_size, cfg.local_epochs
        self.round_timeout = cfg.round_timeout
        self.node_wait_timeout = cfg.node_wait_timeout
        self.transfer_dtype = TRANSFER_DTYPES[cfg.transfer_dtype]
        self.offset = RoundOffset()
        self.records: dict[int, RoundRecord] = {}
        self._spec: dict | None = None
        self._float_keys: list[str] = []
        self._global: dict[str, np.ndarray] = {}
        # Each round's sent messages' metadata: the grid fills in their ids when it pushes them.
        self._sent: dict[int, list[Metadata]] = {}
        self._bytes_sent: dict[int, int] = {}
        self._rank: dict[int, int] = {}
        # The replies the latest round aggregated (DP counts them: server/dp.py).
        self.last_accepted: list[Message] = []

    @property
    def weighted_by_key(self) -> str:
        """The reply metric that weighs a site, in screening's mean and in the rule's."""
        return self.rule.weighted_by_key

    @weighted_by_key.setter
    def weighted_by_key(self, key: str) -> None:
        self.rule.weighted_by_key = key

    def resume_after(self, completed_round: int) -> None:
        self.offset = RoundOffset(completed_round)

    def round_record(self, server_round: int) -> RoundRecord | None:
        return self.records.get(server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round = self.offset.server_round(server_round)
        # Flower's sampler would wait forever for nodes that left; fail with numbers instead.
        wait_for_nodes(grid, self.min_valid, self.node_wait_timeout)
        self._global = as_numpy(arrays)
        # Replies are held to the first model's keys, shapes and dtypes: later global models
        # come back from FedAvg with integer buffers as float64, clients keep them integer.
        if self._spec is None:
            self._spec = spec_of(self._global)
            self._float_keys = [k for k, (_, dtype) in self._spec.items() if dtype.kind == "f"]
        # A copy each round: Flower writes the round number into the record it is given.
        round_config = ConfigRecord(dict(config))
        self._rank = {node: rank for rank, node in enumerate(registration_order(grid))}
        messages = list(self.rule.configure_train(server_round, arrays, round_config, RegisteredOrder(grid)))
        # Narrowed only in the messages: Flower's strategy (FedAdam's current arrays) and the
        # global model this server keeps stay in the method's dtypes.
        sent = self._as_sent(arrays)
        for message in messages:
            message.content[self.rule.arrayrecord_key] = sent
        self._sent[server_round] = [m.metadata for m in messages]
        self._bytes_sent[server_round] = sent.count_bytes() * len(messages)
        return messages

    def _registration_rank(self, reply: Message) -> tuple[int, int]:
        node = reply.metadata.src_node_id
        return self._rank.get(node, len(self._rank)), node

    def _as_sent(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.transfer_dtype == TRANSFER_DTYPES["float32"]:
            return arrays
        return narrow(arrays, self._float_keys, self.transfer_dtype)

    def _widened(self, reply: Message) -> Message:
        """A reply as the method's dtypes, in place: narrow arrays are changes from the
        model this server sent (common/records.py). Anything that cannot be read is left as
        it came, for screening to reject with its reason."""
        if reply.has_error():
            return reply
        for name, record in list(reply.content.array_records.items()):
            try:
                if has_narrow(record):
                    reply.content[name] = decode_update(record, self._global)
            except Exception:  # noqa: BLE001 - screening names what is wrong with it
                pass
        return reply

    def local_steps(self, examples: int) -> int:
        """The SGD steps a site with `examples` images trains a round (client/app.py)."""
        return self.local_epochs * steps_per_epoch(examples, self.batch_size)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round = self.offset.server_round(server_round)
        sent = self._sent.pop(server_round, [])
        replies = list(replies)
        _attribute_link_errors(replies, sent)
        # Summed in registration order, not arrival order: a floating-point sum depends on
        # its order, and the same seed must give the same model however sites are scheduled.
        replies = sorted(replies, key=self._registration_rank)
        # Counted as they travelled, before narrow arrays are widened.
        received = sum(record.count_bytes() for m in replies if m.has_content()
                       for record in m.content.array_records.values())
        replies = [self._widened(m) for m in replies]
        mean = WeightedMean() if self.streams_mean else None
        verdict = screen(replies, self._spec or {}, self._global, self.max_norm_ratio, mean,
                         self.weighted_by_key, local_steps=self.local_steps)
        replied = {m.metadata.src_node_id for m in replies}
        for node in (m.dst_node_id for m in sent):
            if node not in replied:
                verdict.rejected[node] = f"no reply within round-timeout ({self.round_timeout:g} s)"
        for node, reason in sorted(verdict.rejected.items()):
            log.warning("round %d: client %s rejected: %s", server_round, node, reason)

        arrays = metrics = None
        rule_numbers = client_rules(verdict.accepted)
        self.last_accepted = verdict.accepted if len(verdict.accepted) >= self.min_valid else []
        if self.last_accepted:
            arrays, metrics = self._aggregate_accepted(server_round, verdict.accepted, mean)
            if isinstance(self.rule, ScoresSites):
                for node, numbers in self.rule.site_numbers.items():
                    rule_numbers.setdefault(node, {}).update(numbers)
        else:
            log.warning("round %d: %d valid replies, %d needed (min-train-clients); the global "
                        "model stays as it was", server_round, len(verdict.accepted), self.min_valid)
        self.records[server_round] = RoundRecord.of_round(
            clients_ok=len(verdict.accepted), failures=dict(sorted(verdict.rejected.items())),
            aggregated=arrays is not None,
            client_metrics=[record for m in verdict.accepted for record in m.content.metric_records.values()],
            train_metrics=metrics, client_rules=rule_numbers,
            bytes_sent=self._bytes_sent.pop(server_round, 0), bytes_received=received)
        return arrays, metrics

    def _aggregate_accepted(self, server_round: int, accepted: list[Message], mean: WeightedMean | None):
        if mean is None:
            return self.rule.aggregate_train(server_round, accepted)
        metrics = self.rule.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        return ArrayRecord({k: Array(v) for k, v in mean.result().items()}), metrics

    def privacy_report(self) -> dict:
        """summary.json's `privacy`: a plain run has neither protection."""
        return {"dp": "none", "secure_aggregation": False}

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        """The rule's own state, for a checkpoint."""
        return self.rule.server_state() if isinstance(self.rule, KeepsServerState) else {}

    def load_server_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        if isinstance(self.rule, KeepsServerState):
            self.rule.load_server_state(state)
        elif state:
            raise KeyError(f"checkpoint holds server state {next(iter(state))!r} this strategy does not keep")

    # --- what Flower's Strategy asks besides training: the rule's answers -------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.rule.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.rule.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.rule.summary()
