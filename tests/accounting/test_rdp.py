"""RDP of the Poisson-subsampled Gaussian against Opacus and dp-accounting: the RDP curve per
order, ε with the same orders and conversion, and the accountant's ε on a grid of settings
that includes Abadi et al.'s MNIST run."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from dp_attn.accounting import RDPAccountant
from dp_attn.accounting.rdp import ORDERS, delta_from_rdp, epsilon_from_rdp, rdp_poisson_gaussian

# (z, q, steps, δ); Abadi et al.: z = 1.1, batch 256 of 60000, 60 epochs.
SETTINGS = [
    (1.1, 256 / 60000, 14063, 1e-5),
    (0.8, 0.01, 10000, 1e-5),
    (2.0, 0.001, 100000, 1e-6),
    (1.5, 0.05, 500, 1e-5),
    (4.0, 0.3, 200, 1e-8),
    (0.7, 0.002, 30000, 1e-6),
]


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of the Gaussian mechanism with sensitivity/σ = mu (Balle & Wang 2018)."""

    def gap(eps):
        return (
            stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
            - delta
        )

    return optimize.brentq(gap, 0.0, 200.0, xtol=1e-12)


@pytest.mark.parametrize("z", [0.5, 0.8, 1.1, 2.0, 5.0])
@pytest.mark.parametrize("q", [1e-3, 256 / 60000, 0.05, 0.3, 1.0])
def test_rdp_curve_matches_opacus_at_every_order(z, q):
    analysis = pytest.importorskip("opacus.accountants.analysis.rdp")
    mine = rdp_poisson_gaussian(z, q, ORDERS)
    theirs = np.array([analysis._compute_rdp(q, z, a) for a in ORDERS])
    # Near α = 1, log A_α ≈ 0 and Opacus' sequential log-space sums lose digits (up to 1e-2
    # relative where RDP < 1e-9; see the mpmath test for which side is right). Such orders
    # never decide ε.
    meaningful = theirs > 1e-9
    np.testing.assert_allclose(mine[meaningful], theirs[meaningful], rtol=1e-4)


@pytest.mark.parametrize(
    "z, q, order", [(0.8, 1e-3, 1.01), (0.5, 1e-4, 1.01), (2.0, 1e-4, 1.05), (1.1, 0.01, 7.5)]
)
def test_rdp_matches_quadrature_in_high_precision(z, q, order):
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    sigma, q_, alpha = mp.mpf(z), mp.mpf(q), mp.mpf(order)

    def integrand(x):
        mixture_ratio = 1 - q_ + q_ * mp.e ** ((2 * x - 1) / (2 * sigma**2))
        return mp.npdf(x, 0, sigma) * mixture_ratio**alpha

    a = mp.quad(integrand, [-mp.inf, -10 * sigma, 0, 10 * sigma, mp.inf])
    want = float(mp.log(a) / (alpha - 1))
    assert rdp_poisson_gaussian(z, q, np.array([order]))[0] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("z, q, steps, delta", SETTINGS)
def test_epsilon_conversion_matches_opacus_on_its_orders(z, q, steps, delta):
    analysis = pytest.importorskip("opacus.accountants.analysis.rdp")
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = steps * rdp_poisson_gaussian(z, q, orders)
    theirs, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert epsilon_from_rdp(orders, rdp, delta) == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("z, q, steps, delta", SETTINGS)
def test_accountant_within_one_percent_of_opacus_and_dp_accounting(z, q, steps, delta):
    opacus_rdp = pytest.importorskip("opacus.accountants")
    dp_accounting = pytest.importorskip("dp_accounting")
    acc = RDPAccountant()
    acc.step(noise_multiplier=z, sample_rate=q, count=steps)
    mine = acc.epsilon(delta)
    opacus = opacus_rdp.RDPAccountant()
    opacus.history = [(z, q, steps)]
    google = dp_accounting.rdp.RdpAccountant()
    google.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    # Our order grid contains both of theirs, and the same conversion: never looser.
    for theirs in (opacus.get_epsilon(delta), google.get_epsilon(delta)):
        assert theirs * 0.99 <= mine <= theirs * (1 + 1e-9)


@pytest.mark.parametrize(
    "sigma, steps, delta", [(5.0, 100, 1e-5), (2.0, 10, 1e-6), (20.0, 1, 1e-5)]
)
def test_full_batch_is_an_upper_bound_on_the_exact_gaussian(sigma, steps, delta):
    acc = RDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=1.0, count=steps)
    np.testing.assert_allclose(acc.rdp, steps * ORDERS / (2 * sigma**2))
    exact = gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    assert exact <= acc.epsilon(delta) <= 1.25 * exact  # RDP is loosest for few steps


@pytest.mark.parametrize("z, q, steps, delta", SETTINGS)
def test_delta_inverts_epsilon(z, q, steps, delta):
    acc = RDPAccountant()
    acc.step(noise_multiplier=z, sample_rate=q, count=steps)
    eps = acc.epsilon(delta)
    assert acc.delta(eps) == pytest.approx(delta, rel=1e-9)
    assert acc.delta(eps * 1.01) < delta < acc.delta(eps * 0.99)


def test_conversion_edge_cases():
    orders = ORDERS
    assert epsilon_from_rdp(orders, np.zeros_like(orders), 1e-5) == 0.0
    assert delta_from_rdp(orders, np.zeros_like(orders), 0.0) == 0.0
    # δ >= sqrt(1 - e^-KL) (Bretagnolle-Huber) gives ε = 0.
    assert epsilon_from_rdp(orders, np.full_like(orders, 1e-4), 0.2) == 0.0
    assert delta_from_rdp(orders, np.full_like(orders, np.inf), 3.0) == 1.0
    with pytest.raises(ValueError, match="orders"):
        rdp_poisson_gaussian(1.0, 0.1, np.array([0.5, 2.0]))


def test_orders_whose_series_does_not_converge_are_dropped_not_raised():
    rdp = rdp_poisson_gaussian(1e5, 0.5)
    fractional = ORDERS != np.round(ORDERS)
    assert np.isinf(rdp[fractional]).any()  # α = 1.01 needs ~e^15 terms
    assert np.isfinite(rdp[~fractional]).all()
    assert 0 < epsilon_from_rdp(ORDERS, 1000 * rdp, 1e-5) < 0.01
