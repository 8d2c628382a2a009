"""The DP accountant (server/accounting.py) against computations that share none of its code:
the privacy loss of the Gaussian mechanism integrated numerically, composed by convolution."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedssl.server.accounting import EXACT, RDP, epsilon_spent, exact_epsilon, gaussian_delta, rdp_epsilon

DELTA = 1e-5


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(x, np.float64) / math.sqrt(2))


def numerical_epsilon(z: float, releases: int, delta: float, step: float = 2e-3) -> float:
    """Epsilon of `releases` Gaussian releases of noise multiplier z, from the privacy loss
    distribution. One release, scaled by its sensitivity, tells N(1, z^2) from N(0, z^2); its
    privacy loss log(p/q) at x ~ N(1, z^2) is x / z^2 - 1 / (2 z^2). Its probability is
    integrated over bins of the loss and each bin's mass put at the bin's upper end (an
    over-estimate of the loss, so of epsilon); T releases compose by convolving the
    distributions (FFT); delta(eps) = E[(1 - e^(eps - L))+]."""
    mean, std = 1 / (2 * z * z), 1 / z
    edges = np.arange(mean - 14 * std, mean + 14 * std + step, step)
    mass = np.diff(normal_cdf((edges - mean) / std))
    beyond = 1 - normal_cdf(np.array([(edges[-1] - mean) / std]))[0]  # counted as an infinite loss
    size = releases * len(mass)
    composed = np.fft.irfft(np.fft.rfft(mass, size) ** releases, size)
    losses = releases * edges[1] + step * np.arange(size)  # the upper end of each composed bin
    infinite = 1 - (1 - beyond) ** releases

    def delta_at(eps: float) -> float:
        return infinite + float(np.sum(composed * np.maximum(0.0, -np.expm1(eps - losses))))

    lo, hi = 0.0, 200.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z, releases", [(1.0, 1), (1.0, 10), (2.0, 50), (5.0, 13), (0.7, 4)])
def test_exact_epsilon_matches_the_numerically_composed_privacy_loss(z, releases):
    numerical = numerical_epsilon(z, releases, DELTA)
    exact = exact_epsilon(z, releases, DELTA)
    # the numerical one over-estimates by at most its bin width per release
    assert exact <= numerical + 1e-6
    assert numerical <= exact + releases * 2e-3 + 1e-3


def test_the_gaussian_delta_is_the_integral_of_the_privacy_loss():
    # delta(eps) = integral of (p(x) - e^eps q(x))+ for N(1, s^2) against N(0, s^2)
    x = np.linspace(-40, 40, 2_000_001)
    for s in (0.5, 1.0, 3.0):
        p = np.exp(-0.5 * ((x - 1) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        q = np.exp(-0.5 * (x / s) ** 2) / (s * math.sqrt(2 * math.pi))
        for eps in (0.1, 1.0, 4.0):
            integral = float(np.trapezoid(np.maximum(0.0, p - math.exp(eps) * q), x))
            assert gaussian_delta(eps, s) == pytest.approx(integral, rel=1e-6, abs=1e-12)


def test_dp_accounting_agrees_where_it_is_installed():
    dp_accounting = pytest.importorskip("dp_accounting")
    for z, releases in [(1.0, 10), (2.0, 50)]:
        accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        accountant.compose(dp_accounting.GaussianDpEvent(z), releases)
        assert exact_epsilon(z, releases, DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-6)


def test_rdp_bounds_the_exact_epsilon_from_above_and_the_tighter_is_reported():
    for z, releases in [(1.0, 1), (1.0, 10), (2.0, 50), (5.0, 13)]:
        exact, rdp = exact_epsilon(z, releases, DELTA), rdp_epsilon(z, releases, DELTA)
        assert exact <= rdp <= 1.4 * exact + 0.1
        assert epsilon_spent(z, releases, DELTA) == {"epsilon": exact, "accountant": EXACT, "epsilon_rdp": rdp}
    assert exact_epsilon(1.0, 0, DELTA) == 0.0 and math.isinf(exact_epsilon(0.0, 3, DELTA))
    assert exact_epsilon(1.0, 10, DELTA) < exact_epsilon(1.0, 20, DELTA)
    assert RDP != EXACT
    # 100 releases at z = 10 are exactly one release at z = 1
    assert exact_epsilon(10.0, 100, DELTA) == pytest.approx(exact_epsilon(1.0, 1, DELTA), rel=1e-9)
