"""The privacy loss of one Poisson-subsampled Gaussian step, and its dominating discretisation.

For the "remove" pair P = (1-q)·N(0, σ²) + q·N(1, σ²), Q = N(0, σ²) (see dp_attn.accounting.prv),
the loss Y = log(dP/dQ)(x) has Gaussian tails in closed form under either hypothesis
(`loss_distribution`, `_step_range`); its moments and MGF, taken by quadrature, only choose
meshes and windows. `_discretise` is the connect-the-dots discretisation of one step: a discrete
pair (remove, add) that dominates it, so every δ computed from it is an upper bound.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import optimize, special

from dp_attn.accounting.pld import _Measure

MAX_LOSS = 500.0  # largest loss on a grid (e^loss must stay within float64)


def _log_above_p(sigma: float, q: float, t: float) -> float:
    """log P(Y > t) for one step, by the same Gaussian tails as `loss_distribution`."""
    if q == 1.0:
        a = sigma * t + 0.5 / sigma
        return float(special.log_ndtr(1 / sigma - a))
    if t <= math.log1p(-q):
        return 0.0
    a = sigma * (math.log(math.expm1(t) + q) - math.log(q)) + 0.5 / sigma
    return float(
        np.logaddexp(
            math.log(q) + special.log_ndtr(1 / sigma - a),
            math.log1p(-q) + special.log_ndtr(-a),
        )
    )


def loss_distribution(
    noise_multiplier: float, sample_rate: float, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """P(Y <= t), P(Y > t), Q(Y <= t), Q(Y > t) for the loss Y of one step (remove pair).

    Y > t  <=>  x > σ²·log((e^t - (1 - q))/q) + 1/2, a Gaussian tail under either hypothesis.
    Both sides are returned so that small masses keep their relative precision.
    """
    sigma, q = noise_multiplier, sample_rate
    t = np.asarray(t, dtype=np.float64)
    if q == 1.0:
        a = sigma * t + 0.5 / sigma
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log(np.expm1(t) + q) - math.log(q)
        # The loss never falls below log(1 - q).
        a = np.where(t > math.log1p(-q), sigma * z + 0.5 / sigma, -np.inf)
    below_q, above_q = special.ndtr(a), special.ndtr(-a)
    below_p = q * special.ndtr(a - 1 / sigma) + (1 - q) * below_q
    above_p = q * special.ndtr(1 / sigma - a) + (1 - q) * above_q
    return below_p, above_p, below_q, above_q


@functools.lru_cache(maxsize=1 << 14)
def _step_range(sigma: float, q: float, tail: float) -> tuple[float, float]:
    """Losses [low, high] of one step outside which P has at most `tail` on each side."""
    if q == 1.0:  # Y ~ N(±1/(2σ²), 1/σ²) under P and Q: cover both
        high = 0.5 / sigma**2 - special.ndtri(tail) / sigma
        if high > MAX_LOSS:
            raise OverflowError("one step's privacy loss spans too wide a range")
        return -high, high
    if _log_above_p(sigma, q, 0.0) <= math.log(tail):
        return math.log1p(-q), 0.0
    high = 1.0
    while _log_above_p(sigma, q, high) > math.log(tail):
        high *= 2
        if high > MAX_LOSS:
            raise OverflowError("one step's privacy loss spans too wide a range")
    high = optimize.brentq(lambda t: _log_above_p(sigma, q, t) - math.log(tail), 0.0, high)
    return math.log1p(-q), high


@functools.lru_cache(maxsize=64)
def _discretise(
    sigma: float, q: float, mesh: float, low: int, high: int
) -> tuple[_Measure, _Measure]:
    """Dominating discrete pair of one step on atoms j·mesh, low <= j <= high: (remove, add).

    P-mass below the lowest atom is raised to it; above the highest it goes to +∞. Q-mass the
    atoms do not carry (above the grid; excess of the low tail or of clipped cells) is, for
    the reversed pair, a loss of +∞.
    """
    t = np.arange(low, high + 1) * mesh
    below_p, above_p, below_q, above_q = loss_distribution(sigma, q, t)
    # Mass of each cell (t_j, t_{j+1}], differenced on the side of the median where it is small.
    mass_p = np.where(above_p[:-1] < 0.5, above_p[:-1] - above_p[1:], below_p[1:] - below_p[:-1])
    mass_q = np.where(above_q[:-1] < 0.5, above_q[:-1] - above_q[1:], below_q[1:] - below_q[:-1])
    # The part `upper` of a cell's P-mass goes to its top end, so that Q-mass is kept too.
    with np.errstate(over="ignore", invalid="ignore"):
        upper = (mass_p - mass_q * np.exp(t[:-1])) / -math.expm1(-mesh)
    upper = np.clip(np.nan_to_num(upper), 0.0, mass_p)
    atoms = np.zeros(t.size)
    atoms[:-1] += mass_p - upper
    atoms[1:] += upper
    atoms[0] += below_p[0]
    with np.errstate(over="ignore", invalid="ignore"):
        q_atoms = np.where(atoms > 0, atoms * np.exp(-t), 0.0)
        q_cells = (mass_p - upper) * np.exp(-t[:-1]) + upper * np.exp(-t[1:])
    q_infinite = (
        above_q[-1]
        + max(below_q[0] - below_p[0] * math.exp(-t[0]), 0.0)
        + float(np.maximum(mass_q - np.nan_to_num(q_cells), 0.0).sum())
    )
    remove = _Measure(low, mesh, atoms, float(above_p[-1]))
    add = _Measure(-high, mesh, q_atoms[::-1].copy(), q_infinite)
    return remove, add


def _quadrature(sigma: float, q: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loss Y(x) of one step on a grid of noise values x, with weights of P and of Q."""
    x = np.linspace(-14 * sigma, 1 + 14 * sigma, 2001)
    u = (2 * x - 1) / (2 * sigma**2)
    loss = u if q == 1.0 else np.logaddexp(math.log1p(-q), math.log(q) + u)
    weight_q = np.exp(-0.5 * (x / sigma) ** 2)
    weight_p = (1 - q) * weight_q + q * np.exp(-0.5 * ((x - 1) / sigma) ** 2)
    return loss, weight_p / weight_p.sum(), weight_q / weight_q.sum()


@functools.lru_cache(maxsize=1 << 14)
def _step_moments(sigma: float, q: float) -> tuple[float, float]:
    """Mean and standard deviation of one step's loss under P. They, like `_step_log_mgf`,
    only choose meshes and windows; no bound depends on them."""
    loss, weight_p, _ = _quadrature(sigma, q)
    mean = float(np.dot(weight_p, loss))
    std = math.sqrt(max(float(np.dot(weight_p, (loss - mean) ** 2)), 0.0))
    return mean, max(std, 1e-300)


@functools.lru_cache(maxsize=1 << 10)
def _step_log_mgf(sigma: float, q: float, lambdas: tuple[float, ...]) -> np.ndarray:
    """Approximate log E[e^{±λ·loss}] of one step for (remove, add) × (+λ, -λ)."""
    loss, weight_p, weight_q = _quadrature(sigma, q)
    signed = np.multiply.outer(lambdas, loss)
    with np.errstate(divide="ignore"):
        log_p, log_q = np.log(weight_p), np.log(weight_q)
    # The add direction's loss is -Y with x ~ Q.
    rows = [signed + log_p, -signed + log_p, -signed + log_q, signed + log_q]
    return np.array([special.logsumexp(r, axis=1) for r in rows]).reshape(2, 2, -1)
