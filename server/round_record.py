"""What a training round leaves behind on the server (RoundRecord, built in one place:
RoundRecord.of_round) and the one place a resumed run's round numbers are shifted
(RoundOffset). The metrics row's training fields come from RoundRecord.row_fields()."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

# The client metrics (client/app.py's MetricRecord) a record reads, by their wire names.
TRAIN_LOSS = "train-loss"
IMAGES_PER_SECOND = "images-per-second"
SKIPPED_IMAGES = "skipped-images"
TRAIN_SECONDS = "train-seconds"


@dataclass(frozen=True)
class RoundRecord:
    """One round as the server saw it. The defaults are a round nobody trained in (round 0,
    the initial model), and what a field reads when a privacy mode withholds it."""

    clients_ok: int = 0
    # node id (as text) -> why its reply was not aggregated
    failures: dict[str, str] = field(default_factory=dict)
    aggregated: bool = False
    # Summed over the accepted sites: Flower's metric aggregation is an example-weighted mean.
    skipped_images: int = 0
    client_train_seconds: float = 0.0
    # The rule's aggregated client metrics (None when nothing was aggregated or released).
    train_loss: float | None = None
    client_images_per_second: float | None = None
    # Each site's numbers from its rule, by node: from the rule's client half (FedU's
    # divergence, FedEMA's mu) and from its server half (L-DAWA's layer weights).
    client_rules: dict[str, dict[str, float]] = field(default_factory=dict)
    # Model arrays only, each way: what a round costs the network.
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def clients_failed(self) -> int:
        return len(self.failures)

    @classmethod
    def of_round(cls, *, clients_ok: int, failures: Mapping[Any, str], aggregated: bool,
                 client_metrics: Iterable[Mapping[str, Any]] = (),
                 train_metrics: Mapping[str, Any] | None = None,
                 client_rules: Mapping[str, dict[str, float]] | None = None,
                 bytes_sent: int = 0, bytes_received: int = 0) -> RoundRecord:
        """The record of a round from what its strategy learnt: `client_metrics` are the
        accepted sites' own metric records, `train_metrics` the rule's aggregate of them.
        `failures` keep their order (a strategy passes them sorted or in sampling order)."""
        client_metrics = list(client_metrics)
        train = train_metrics or {}
        return cls(
            clients_ok=clients_ok,
            failures={str(node): reason for node, reason in failures.items()},
            aggregated=aggregated,
            skipped_images=sum(int(m.get(SKIPPED_IMAGES, 0)) for m in client_metrics),
            client_train_seconds=sum((float(m.get(TRAIN_SECONDS, 0.0)) for m in client_metrics), 0.0),
            train_loss=train.get(TRAIN_LOSS),
            client_images_per_second=train.get(IMAGES_PER_SECOND),
            client_rules=dict(client_rules or {}),
            bytes_sent=bytes_sent,
            bytes_received=bytes_received)

    def withheld(self, names: Iterable[str]) -> RoundRecord:
        """This record with the fields `names` back at their defaults (a privacy mode's
        redaction: server/dp.py names the fields)."""
        blank = type(self)()
        return replace(self, **{name: getattr(blank, name) for name in names})

    def row_fields(self) -> dict[str, Any]:
        """The metrics row's training fields (server/round_step.py adds the round, the
        scores and the wall time)."""
        return {
            "train_loss": self.train_loss,
            "client_images_per_second": self.client_images_per_second,
            "skipped_images": self.skipped_images,
            "clients_ok": self.clients_ok,
            "clients_failed": self.clients_failed,
            "failures": dict(self.failures),
            # only rules that score their sites report numbers
            **({"client_rules": dict(self.client_rules)} if self.client_rules else {}),
            "aggregated": self.aggregated,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "client_train_seconds": round(self.client_train_seconds, 3),
        }


@dataclass(frozen=True)
class RoundOffset:
    """Flower's start() counts rounds from 1; a resumed run continues after the `completed`
    rounds its checkpoint holds, so clients, records and rows carry the true numbers (and the
    clients' schedules continue where they stopped)."""

    completed: int = 0

    def server_round(self, flower_round: int) -> int:
        return flower_round + self.completed

    def remaining(self, num_rounds: int) -> int:
        """How many rounds a start() still runs to reach `num_rounds`."""
        return num_rounds - self.completed
