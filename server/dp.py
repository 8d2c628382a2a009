"""Differential privacy for a run (dp = fixed | adaptive): Flower's client-side clipping
wrappers around the run's aggregation rule. Each site clips its update to the clipping norm
(client/privacy.py, Flower's fixedclipping_mod / adaptiveclipping_mod); the server averages
the clipped updates and adds Gaussian noise of std z * C / k to the mean of k updates
(z = dp-noise-multiplier, C = the round's clipping norm). Adaptive clipping moves C toward
the dp-target-quantile of the update norms from the sites' noisy clipped/not-clipped bits
(Andrew et al., 2021).

What changes from Flower's wrappers, and why:
- Replies are screened by the rule first (server/rounds.py) and the wrapper sees only the
  accepted ones: Flower's aggregate_train skips the whole round on one error reply and
  raises on a reply without a norm bit, which one broken site could then cause every round.
- The noise is calibrated to the number of updates actually averaged: a site's influence on
  a mean of k updates is C / k, and k can be below the number sampled.
- Sites count equally (each site's clipped update has weight 1 / k): weighting by examples
  would let one large site move the mean by more than C / k, which the noise does not cover.
- Integer step counters (BatchNorm's num_batches_tracked) are averaged but get no float
  noise; they are not clipped either (client/privacy.py says why).
- Adaptive clipping adds the noise with the norm the sites clipped to this round, then
  updates the norm for the next round (Flower's wrapper updates it first).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping)

from common.config import ConfigError
from server.accounting import METHOD, gaussian_epsilon
from server.validation import refuse_per_update_settings

# Rules whose server side is FedAvg's mean: the noise then lands on the mean of the clipped
# updates. A server optimizer (fedavgm, fedadam) would keep momentum built from noiseless
# means; L-DAWA weights whole models by their cosine, not clipped updates.
DP_RULES = ("fedavg", "fedu", "fedema")
UNIT_WEIGHT = "dp-unit-weight"
STATE_KEY = "dp"


def check(cfg) -> None:
    """Refuse settings DP cannot run with, in one line each."""
    if cfg.dp == "none":
        return
    if cfg.strategy not in DP_RULES:
        raise ConfigError(f"strategy={cfg.strategy!r} is invalid with dp={cfg.dp!r}: allowed: "
                          f"{', '.join(DP_RULES)} (the noise must land on the mean of clipped updates)")
    refuse_per_update_settings(
        cfg, f"dp={cfg.dp!r}",
        norm_reason="clipping bounds each update, and rejecting by the others' norms would make "
                    "who is averaged depend on other sites' data",
        dtype_reason="rounding a clipped update to a narrower float could raise its norm above dp-clip-norm")


def _is_counter(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))


def _with_unit_weight(reply: Message) -> Message:
    if not reply.has_error() and len(reply.content.metric_records) == 1:
        next(iter(reply.content.metric_records.values()))[UNIT_WEIGHT] = 1
    return reply


class PrivateRounds:
    """Mixin placed before a Flower client-side DP wrapper whose wrapped strategy is a fedssl
    rule (server/rounds.py's SSLRounds); serves the rest of the server the rule's interface."""

    def setup_privacy(self, cfg) -> None:
        self.mode = cfg.dp
        self.target_noise_multiplier = cfg.dp_noise_multiplier
        self.delta = cfg.dp_delta
        self.sampling_rate = cfg.fraction_train
        self.releases = 0
        self._counter_keys: set[str] | None = None
        self.strategy.weighted_by_key = UNIT_WEIGHT

    # --- the rule's interface -------------------------------------------------------------
    @property
    def round_stats(self) -> dict:
        return self.strategy.round_stats

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
        epsilon = gaussian_epsilon(self.target_noise_multiplier, self.releases, self.delta)
        return {"dp": self.mode, "secure_aggregation": False,
                "noise_multiplier": self.target_noise_multiplier,
                "clip_norm": self.clipping_norm, "releases": self.releases,
                "sampling_rate": self.sampling_rate, "delta": self.delta,
                "epsilon": epsilon if math.isfinite(epsilon) else None,
                "accountant": METHOD, "unit": "one site (all its images)",
                "weights": "equal: each accepted site's clipped update counts once"}

    # --- a round --------------------------------------------------------------------------
    def configure_train(self, server_round, arrays: ArrayRecord, config, grid):
        # Learned from the first model sent, which holds the method's own dtypes (FedAvg
        # returns integer buffers as float64 afterwards).
        if self._counter_keys is None:
            self._counter_keys = {k for k, v in arrays.items() if _is_counter(v.dtype)}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = self.strategy.aggregate_train(
            server_round, [_with_unit_weight(r) for r in replies])
        accepted = self.strategy.last_accepted
        if arrays is None or not accepted:
            return None, None
        self.num_sampled_clients = len(accepted)
        arrays = self._add_noise_to_aggregated_arrays(arrays)
        self.releases += 1
        self.after_release(accepted)
        return arrays, metrics

    def after_release(self, accepted: list[Message]) -> None:
        """What a clipping mode learns from the round's accepted replies."""

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        counters = self._counter_keys or set()
        floats = ArrayRecord({k: v for k, v in aggregated.items() if k not in counters})
        noisy = super()._add_noise_to_aggregated_arrays(floats)
        return ArrayRecord({k: noisy[k] if k in noisy else v for k, v in aggregated.items()})


class FixedClippingSSL(PrivateRounds, DifferentialPrivacyClientSideFixedClipping):
    @classmethod
    def wrap(cls, cfg, rule) -> "FixedClippingSSL":
        return cls(rule, noise_multiplier=cfg.dp_noise_multiplier, clipping_norm=cfg.dp_clip_norm,
                   num_sampled_clients=cfg.min_train_clients)


class AdaptiveClippingSSL(PrivateRounds, DifferentialPrivacyClientSideAdaptiveClipping):
    @classmethod
    def wrap(cls, cfg, rule) -> "AdaptiveClippingSSL":
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
        self._update_clip_norm_from_replies(accepted)


WRAPPERS = {"fixed": FixedClippingSSL, "adaptive": AdaptiveClippingSSL}


def private(cfg, rule):
    """The rule as the run's DP mode needs it: itself without DP."""
    if cfg.dp == "none":
        return rule
    strategy = WRAPPERS[cfg.dp].wrap(cfg, rule)
    strategy.setup_privacy(cfg)
    return strategy
