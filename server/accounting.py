"""Epsilon for a DP run of T noisy releases, each a Gaussian mechanism of noise multiplier z
(noise std / sensitivity; docs/privacy.md states the adjacency and sensitivity).

Two bounds, both for T releases without amplification by sampling:
- exact: T Gaussian releases of multiplier z compose to exactly one Gaussian mechanism of
  multiplier s = z / sqrt(T) (Dong, Roth and Su, 2019: mu-GDP with mu = sqrt(T) / z), whose
  tight (epsilon, delta) curve is the analytic Gaussian mechanism (Balle and Wang, 2018,
  Theorem 8):  delta(eps) = Phi(-eps s + 1 / (2 s)) - e^eps Phi(-eps s - 1 / (2 s)),
  solved for epsilon by bisection.
- RDP (Mironov, 2017): alpha T / (2 z^2) at order alpha, converted as in Canonne, Kamath and
  Steinke (2020), Prop. 12, minimised over a grid of orders; an upper bound, kept as a check.

The tighter is reported. Neither uses a maintained accountant: `dp-accounting` (Flower's
RdpAccountant needs it) pins attrs<24 and pulls scipy and dm-tree for what is 30 lines here,
and its value would be amplification by sampling, which fedssl does not claim: Flower's
sampler draws from Python's `random`, seeded with the run's public seed."""
from __future__ import annotations

import math

import numpy as np

ORDERS = np.concatenate([np.linspace(1.01, 10.0, 900), np.arange(11.0, 513.0)])
EXACT = "exact: T Gaussian releases = one Gaussian mechanism of z / sqrt(T) (Balle and Wang, 2018); no amplification by sampling"
RDP = "RDP of the Gaussian mechanism (Mironov, 2017); no amplification by sampling"
BISECTION_STEPS = 200


def rdp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon at `delta` after `releases` Gaussian releases by RDP; inf without noise, 0
    without any release."""
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    a = ORDERS
    rdp = releases * a / (2 * noise_multiplier ** 2)
    eps = rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    return float(max(eps.min(), 0.0))


def _log_normal_cdf(x: float) -> float:
    # erfc underflows to 0 near x = -38: log(0) is -inf, and e^eps * 0 then counts as 0, which
    # only overstates delta (so epsilon), never understates it.
    value = 0.5 * math.erfc(-x / math.sqrt(2))
    return math.log(value) if value > 0 else -math.inf


def gaussian_delta(epsilon: float, s: float) -> float:
    """The smallest delta at which a Gaussian mechanism of noise multiplier s is
    (epsilon, delta)-DP (Balle and Wang, 2018, Theorem 8)."""
    first = math.exp(_log_normal_cdf(-epsilon * s + 1 / (2 * s)))
    second = math.exp(min(epsilon + _log_normal_cdf(-epsilon * s - 1 / (2 * s)), 700.0))
    return max(first - second, 0.0)


def exact_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """The smallest epsilon at `delta` after `releases` Gaussian releases of
    `noise_multiplier`, to bisection precision (rounded up); inf without noise, 0 without any
    release."""
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    s = noise_multiplier / math.sqrt(releases)
    if gaussian_delta(0.0, s) <= delta:
        return 0.0
    lo, hi = 0.0, max(rdp_epsilon(noise_multiplier, releases, delta), 1.0)
    while gaussian_delta(hi, s) > delta:  # the RDP bound is above it; this guards rounding
        hi *= 2
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if gaussian_delta(mid, s) > delta else (lo, mid)
    return hi


def epsilon_spent(noise_multiplier: float, releases: int, delta: float) -> dict:
    """summary.json's epsilon: the tighter of the two bounds, which one it is, and the RDP one."""
    exact = exact_epsilon(noise_multiplier, releases, delta)
    rdp = rdp_epsilon(noise_multiplier, releases, delta)
    epsilon, accountant = (exact, EXACT) if exact <= rdp else (rdp, RDP)
    return {"epsilon": epsilon, "accountant": accountant, "epsilon_rdp": rdp}
