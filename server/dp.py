"""Differential privacy for a run (dp = fixed | adaptive): Flower's client-side clipping
wrappers around the run's aggregation rule (docs/privacy.md states the guarantee). Each site
clips its update to the clipping norm C (client/privacy.py, Flower's fixedclipping_mod /
adaptiveclipping_mod); the server releases

    global + (sum of the accepted clipped updates) / m + N(0, (z C / m)^2)

per float weight, m = the number of sites sampled this round (z = dp-noise-multiplier, under
adaptive the share of it the noisy count leaves; C = the round's clipping norm). Adaptive
clipping moves C toward the dp-target-quantile of the update norms from the sites' noisy
clipped/not-clipped bits (Andrew et al., 2021).

What changes from Flower's wrappers, and why:
- Replies are screened by the rule first (server/rounds.py) and the wrapper sees only the
  accepted ones: Flower's aggregate_train skips the whole round on one error reply and
  raises on a reply without a norm bit, which one broken site could then cause every round.
- A fixed denominator (McMahan et al., 2018): the sum is divided by the m sites sampled,
  whoever replied; a site that failed or was rejected adds a zero update. Dividing by the k
  that replied would make the release depend on who replied, which the add/remove-one-site
  sensitivity C / m does not cover.
- Sites count equally (the rule weighs each reply by UNIT_WEIGHT): weighting by examples
  would let one large site move the mean by more than C / m, which the noise does not cover.
- BatchNorm statistics are not released: the sites send back the ones they received
  (client/privacy.py) and the global ones are kept as sent, neither averaged nor noised; the
  server estimates statistics for evaluation from its own images (batchnorm_statistics_from).
- Parameters no site trains (a ViT's fixed sine-cosine position embeddings) are kept as sent
  too: they come back unchanged from every site and carry no data, and noise on them would
  pile up round after round, as nothing pulls them back.
- Nothing else of the sites is released: the rule's aggregated metrics and the per-site
  numbers in its round record are withheld (WITHHELD_STATS).
- Adaptive clipping adds the noise with the norm the sites clipped to this round, then
  updates it (Flower's wrapper updates it first), from the bits centred and over m, as in
  Andrew et al. (sensitivity 1/2, which Flower's split of the noise assumes), and in the
  paper's direction: C grows when more than 1 - dp-target-quantile of the sites are clipped
  (Flower 1.42 shrinks it then, and C runs away to 0).
- The noise comes from a generator of its own, seeded by the operating system and never
  saved. Flower's wrappers draw from numpy's global RNG, whose state every checkpoint holds
  (server/resume.py): from it the noise of a round could be replayed (MT19937 also steps
  back), and with it the noiseless mean.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping)
from flwr.supercore.differential_privacy import KEY_NORM_BIT, compute_stdv

from fedssl.common.augment import normalize
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.methods import build_method
from fedssl.server.accounting import epsilon_spent
from fedssl.server.round_record import RoundRecord
from fedssl.server.strategies.running_stats import statistics_keys
from fedssl.server.privacy_settings import refuse_per_update_settings

UNIT_WEIGHT = "dp-unit-weight"
STATE_KEY = "dp"
# The fields of a rule's round record (server/round_record.py) that come from the sites' own
# metrics (their mean train loss and images/s, FedU/FedEMA's per-site numbers, image counts,
# training time): not released.
WITHHELD_STATS = ("train_loss", "client_images_per_second", "client_rules", "skipped_images",
                  "client_train_seconds")
ADJACENCY = ("add or remove one site (all its images); a removed, failed or rejected site "
             "adds a zero update to the sum")
SENSITIVITY = "C on the sum of clipped updates, C / m on the released mean (m = sites sampled)"


def check(cfg: RunConfig, fedavg_means: list[str]) -> None:
    """Refuse settings DP cannot run with, in one line each. `fedavg_means`: the rules whose
    aggregate is FedAvg's mean (server/rule.py), the only ones the noised mean of clipped
    updates can stand in for: a server optimizer (fedavgm, fedadam) would keep momentum built
    from noiseless means; L-DAWA weights whole models by their cosine, not clipped updates."""
    if cfg.dp == "none":
        return
    if cfg.strategy not in fedavg_means:
        raise ConfigError(f"strategy={cfg.strategy!r} is invalid with dp={cfg.dp!r}: allowed: "
                          f"{', '.join(fedavg_means)} (the noise must land on the mean of clipped updates)")
    refuse_per_update_settings(
        cfg, f"dp={cfg.dp!r}",
        norm_reason="clipping bounds each update, and rejecting by the others' norms would make "
                    "who is averaged depend on other sites' data",
        dtype_reason="rounding a clipped update to a narrower float could raise its norm above dp-clip-norm")


def untrained_keys(cfg: RunConfig) -> frozenset[str]:
    """The shared parameters of the run's method that no site trains (requires_grad off: a
    ViT's fixed position embeddings), under every name the state dict sends them."""
    method = build_method(cfg)
    shared = method.shared_state()
    return frozenset(name for name, p in method.named_parameters(remove_duplicate=False)
                     if name in shared and not p.requires_grad)


def _with_unit_weight(reply: Message) -> Message:
    if not reply.has_error() and len(reply.content.metric_records) == 1:
        next(iter(reply.content.metric_records.values()))[UNIT_WEIGHT] = 1
    return reply


class PrivateRounds:
    """Mixin placed before a Flower client-side DP wrapper whose wrapped strategy is a fedssl
    rule (server/rounds.py's SSLRounds); serves the rest of the server the rule's interface."""

    def setup_privacy(self, cfg: RunConfig) -> None:
        self.mode = cfg.dp
        self.target_noise_multiplier = cfg.dp_noise_multiplier
        self.delta = cfg.dp_delta
        self.sampling_rate = cfg.fraction_train
        self.releases = 0
        # released as they were sent: statistics (withheld) and untrained parameters (no data)
        self.as_sent = statistics_keys(cfg) | untrained_keys(cfg)
        self._sent: ArrayRecord | None = None
        self._sampled = 0
        self.noise_rng = np.random.default_rng()  # OS entropy; not in any checkpoint
        self.strategy.weighted_by_key = UNIT_WEIGHT

    # --- the fedssl strategy interface (server/protocol.py) -------------------------------
    def round_record(self, server_round: int) -> RoundRecord | None:
        record = self.strategy.round_record(server_round)
        return None if record is None else record.withheld(WITHHELD_STATS)

    def resume_after(self, completed_round: int) -> None:
        self.strategy.resume_after(completed_round)

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        # The clipping norm (adaptive) and the releases so far (epsilon) resume with the run.
        return {**self.strategy.server_state(),
                STATE_KEY: {"clipping-norm": np.asarray(self.clipping_norm, np.float64),
                            "releases": np.asarray(self.releases, np.int64)}}

    def load_server_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        state = dict(state)
        saved = state.pop(STATE_KEY, None)
        if saved is not None:
            self.clipping_norm = float(saved["clipping-norm"])
            self.releases = int(saved["releases"])
        self.strategy.load_server_state(state)

    def privacy_report(self) -> dict:
        spent = epsilon_spent(self.target_noise_multiplier, self.releases, self.delta)
        return {"dp": self.mode, "secure_aggregation": False,
                "noise_multiplier": self.target_noise_multiplier,
                "clip_norm": self.clipping_norm, "releases": self.releases,
                "sampling_rate": self.sampling_rate, "delta": self.delta,
                **{k: v if math.isfinite(v) else None for k, v in spent.items() if k != "accountant"},
                "accountant": spent["accountant"],
                "unit": "one site (all its images)", "adjacency": ADJACENCY, "sensitivity": SENSITIVITY,
                "weights": "equal: each accepted site's clipped update counts once, over the sites sampled",
                "released": "the noised model only: no site metrics, no BatchNorm statistics (docs/privacy.md)"}

    # --- a round --------------------------------------------------------------------------
    def configure_train(self, server_round, arrays: ArrayRecord, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # The fixed denominator, known before any site answers.
        self._sent, self._sampled = arrays, len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, _ = self.strategy.aggregate_train(
            server_round, [_with_unit_weight(r) for r in replies])
        accepted = self.strategy.last_accepted
        if arrays is None or not accepted:
            return None, None
        self.num_sampled_clients = self._sampled
        arrays = self._over_sampled(arrays, len(accepted))
        arrays = self._add_noise_to_aggregated_arrays(arrays)
        self.releases += 1
        self.after_release(accepted)
        return arrays, None  # the sites' aggregated metrics are withheld

    def after_release(self, accepted: list[Message]) -> None:
        """What a clipping mode learns from the round's accepted replies."""

    def _over_sampled(self, mean: ArrayRecord, accepted: int) -> ArrayRecord:
        """The rule's equal-weight mean of `accepted` models as global + (sum of updates) / m,
        and the global statistics as they were sent."""
        out = {}
        for key, value in mean.items():
            sent = self._sent[key]
            if key in self.as_sent:
                out[key] = sent
            elif accepted == self._sampled:
                out[key] = value
            else:
                glob, avg = sent.numpy(), value.numpy()
                scaled = glob + (avg.astype(np.float64) - glob) * (accepted / self._sampled)
                out[key] = Array(np.asarray(scaled.astype(avg.dtype)))
        return ArrayRecord(out)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        # Flower's std (z C / m), drawn from self.noise_rng rather than numpy's global RNG.
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        out = {}
        for key, value in aggregated.items():
            if key not in self.as_sent:
                array = value.numpy()
                value = Array(np.asarray(array + self.noise_rng.normal(0.0, std, array.shape).astype(array.dtype)))
            out[key] = value
        return ArrayRecord(out)


class FixedClippingSSL(PrivateRounds, DifferentialPrivacyClientSideFixedClipping):
    @classmethod
    def wrap(cls, cfg: RunConfig, rule) -> "FixedClippingSSL":
        return cls(rule, noise_multiplier=cfg.dp_noise_multiplier, clipping_norm=cfg.dp_clip_norm,
                   num_sampled_clients=cfg.min_train_clients)


class AdaptiveClippingSSL(PrivateRounds, DifferentialPrivacyClientSideAdaptiveClipping):
    @classmethod
    def wrap(cls, cfg: RunConfig, rule) -> "AdaptiveClippingSSL":
        try:
            # num_sampled_clients only sets Flower's default count noise, given here instead.
            return cls(rule, noise_multiplier=cfg.dp_noise_multiplier,
                       num_sampled_clients=cfg.min_train_clients,
                       initial_clipping_norm=cfg.dp_clip_norm,
                       target_clipped_quantile=cfg.dp_target_quantile,
                       clip_norm_lr=cfg.dp_clip_norm_lr,
                       clipped_count_stddev=cfg.dp_clipped_count_stddev)
        except ValueError:  # the noise multiplier the count noise leaves no room for
            raise ConfigError(
                f"dp-noise-multiplier={cfg.dp_noise_multiplier!r} is invalid with "
                f"dp-clipped-count-stddev={cfg.dp_clipped_count_stddev!r}: must be < 2 x "
                "dp-clipped-count-stddev (the count noise spends part of the privacy budget)") from None

    def after_release(self, accepted: list[Message]) -> None:
        # Andrew et al.'s estimate of the fraction of updates that fit under C: each bit
        # centred (+-1/2; a site that did not reply adds 0), noised, over the m sampled.
        centred = sum(0.5 - int(bool(metrics[KEY_NORM_BIT])) for reply in accepted
                      for metrics in reply.content.metric_records.values() if KEY_NORM_BIT in metrics)
        unclipped = (centred + self.noise_rng.normal(0.0, self.clipped_count_stddev)) / self._sampled + 0.5
        self.clipping_norm *= math.exp(-self.clip_norm_lr * (unclipped - self.target_clipped_quantile))


WRAPPERS = {"fixed": FixedClippingSSL, "adaptive": AdaptiveClippingSSL}


def private(cfg: RunConfig, rule):
    """The rule as the run's DP mode needs it: itself without DP."""
    if cfg.dp == "none":
        return rule
    strategy = WRAPPERS[cfg.dp].wrap(cfg, rule)
    strategy.setup_privacy(cfg)
    return strategy


@torch.no_grad()
def batchnorm_statistics_from(networks: Sequence[torch.nn.Module], images: torch.Tensor,
                              batch_size: int = 512, device: torch.device | str = "cpu") -> None:
    """Re-estimate the running statistics of every BatchNorm layer in `networks` (applied in
    order: encoder, then projector) from uint8 `images` [N, 3, H, W], as the average over
    batches of each batch's statistics. Under DP the global model's statistics carry no site
    data (client/privacy.py); the server's own labelled bank stands in for the sites' images
    when the model is evaluated or exported. Each module's train/eval mode and momentum are
    restored."""
    layers = [m for net in networks for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    modes = {m: m.training for net in networks for m in net.modules()}
    momenta = {m: m.momentum for m in layers}
    try:
        for net in networks:
            net.train()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the batches
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device))
            for net in networks:
                x = net(x).flatten(1)
    finally:
        for module, training in modes.items():
            module.training = training
        for layer, momentum in momenta.items():
            layer.momentum = momentum
