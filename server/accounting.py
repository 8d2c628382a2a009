"""Epsilon for a DP run: the Renyi-DP accountant of the Gaussian mechanism (Mironov, 2017).

Flower 1.42's RdpAccountant needs the optional `dp-accounting` package (`flwr[dp]`), and its
wrappers account only for an unmodified FedAvg.aggregate_train with every sampled reply
aggregated; fedssl screens replies first (server/rounds.py). The Gaussian case is small
enough to do here: one release with noise multiplier z (noise std / sensitivity) has RDP
alpha / (2 z^2) at order alpha; T releases compose additively; the (epsilon, delta)
conversion is Canonne, Kamath and Steinke (2020), Prop. 12 (also Balle et al., 2020):

    epsilon = T alpha / (2 z^2) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)

minimised over a grid of orders. Sampling only some sites a round would amplify privacy;
this ignores it, so the epsilon is an upper bound for sampled runs."""
from __future__ import annotations

import math

import numpy as np

ORDERS = np.concatenate([np.linspace(1.01, 10.0, 900), np.arange(11.0, 513.0)])
METHOD = "RDP of the Gaussian mechanism, no amplification by sampling (an upper bound)"


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon at `delta` after `releases` Gaussian releases; inf without noise, 0 without
    any release."""
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    a = ORDERS
    rdp = releases * a / (2 * noise_multiplier ** 2)
    eps = rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    return float(max(eps.min(), 0.0))
