"""Discrete privacy-loss distributions and their composition by FFT (for dp_attn.accounting.prv).

A `_Measure` is mass on the atoms k·mesh of a grid plus mass at +∞. Chernoff bounds on its
log-MGF choose FFT windows and bound the mass an FFT wraps around from above; `_self_compose`
composes a measure with itself, `_coarsen` moves it onto a coarser grid by connect-the-dots
(which can only raise δ), and `_Composed` reads δ(ε) and ε(δ) off a composed distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import fft

MAX_POINTS = 1 << 23  # largest FFT

# Chernoff exponents tried: powers of 2 from 2^-6/std to 2^8/std of the loss they bound.
_LAMBDA_OCTAVES = np.arange(-6, 9)


@dataclass(frozen=True)
class _Measure:
    """A discrete loss distribution: mass pmf[i] at loss (start + i)·mesh, and mass at +∞."""

    start: int
    mesh: float
    pmf: np.ndarray
    infinite: float
    _log_mgfs: dict[float, tuple[float, float]] = field(
        default_factory=dict, compare=False, repr=False
    )  # λ: (log-MGF at λ, at -λ)

    @property
    def losses(self) -> np.ndarray:
        return (self.start + np.arange(self.pmf.size)) * self.mesh

    def log_mgf(self, lambdas: np.ndarray) -> np.ndarray:
        """log E[e^{λY}; Y finite] at λ = lambdas (row 0) and λ = -lambdas (row 1)."""
        missing = [lam for lam in lambdas if lam not in self._log_mgfs]
        if missing:
            positive = self.pmf > 0
            log_pmf = np.log(self.pmf[positive])
            losses = self.losses[positive]
            signed = np.concatenate([missing, -np.asarray(missing)])
            exponents = np.multiply.outer(signed, losses) + log_pmf
            top = exponents.max(axis=1)
            values = np.log(np.exp(exponents - top[:, None]).sum(axis=1)) + top
            for lam, up, down in zip(
                missing, values[: len(missing)], values[len(missing) :], strict=True
            ):
                self._log_mgfs[lam] = (up, down)
        return np.array([self._log_mgfs[lam] for lam in lambdas]).T


def _lambdas(std: float) -> np.ndarray:
    """Chernoff exponents for a loss of standard deviation `std`."""
    return 2.0 ** (round(math.log2(1 / std)) + _LAMBDA_OCTAVES)


def _window(log_mgf: np.ndarray, lambdas: np.ndarray, tail: float) -> tuple[float, float]:
    """[low, high] holding all but `tail` of the mass on each side, by Chernoff on log_mgf."""
    high = float(np.min((log_mgf[0] + math.log(1 / tail)) / lambdas))
    low = float(np.max(-(log_mgf[1] + math.log(1 / tail)) / lambdas))
    return low, high


def _wrapped(log_mgf: np.ndarray, lambdas: np.ndarray, top: float) -> float:
    """Chernoff bound on the mass at or above `top`."""
    return math.exp(min(float(np.min(log_mgf[0] - lambdas * top)), 0.0))


def _fast_size(points: float) -> int:
    """Smallest 2^k or 3·2^(k-1) >= points (fast FFT sizes; repeat across similar queries)."""
    power = 1 << max(6, math.ceil(math.log2(max(points, 1.0))))
    return power * 3 // 4 if power * 3 // 4 >= points else power


def _self_compose(measure: _Measure, count: int, std: float, tail: float) -> _Measure:
    """`count`-fold self-composition of a measure with loss std `std`, on its own grid, in a
    window from Chernoff."""
    if count == 1:
        return measure
    lambdas = _lambdas(math.sqrt(count) * std)
    log_mgf = count * measure.log_mgf(lambdas)
    low, high = _window(log_mgf, lambdas, tail)
    first = max(math.floor(low / measure.mesh), count * measure.start)
    size = _fast_size(math.ceil(high / measure.mesh) - first + 1)
    if size > MAX_POINTS:
        raise OverflowError("a block of steps spans too many grid points")
    # Positions are taken mod size: the sum's position mod size comes out right either way.
    index = np.arange(measure.start, measure.start + measure.pmf.size) % size
    placed = np.bincount(index, measure.pmf, minlength=size)
    pmf = _power_spectrum([(fft.rfft(placed), count)], size)
    pmf = np.roll(pmf, -(first % size))  # window index k is loss (first + k)·mesh
    # Rounding noise is left in (zero on average); the final composition accounts for it.
    top = (first + size) * measure.mesh
    infinite = -math.expm1(count * math.log1p(-measure.infinite)) + _wrapped(log_mgf, lambdas, top)
    return _Measure(first, measure.mesh, pmf, min(infinite, 1.0))


def _power_spectrum(factors: list[tuple[np.ndarray, int]], size: int) -> np.ndarray:
    """irfft of Π spectrum^count, powers taken in polar form."""
    log_magnitude = 0.0
    phase = 0.0
    with np.errstate(divide="ignore"):
        for spectrum, count in factors:
            log_magnitude = log_magnitude + count * np.log(np.abs(spectrum))
            phase = phase + count * np.angle(spectrum)
    magnitude = np.exp(log_magnitude)
    return fft.irfft(magnitude * np.cos(phase) + 1j * magnitude * np.sin(phase), n=size)


def _coarsen(measure: _Measure, mesh: float) -> _Measure:
    """Connect-the-dots of a fine measure onto the grid of `mesh` (a power-of-2 multiple)."""
    if measure.mesh == mesh:
        return measure
    ratio = round(mesh / measure.mesh)
    fine = measure.start + np.arange(measure.pmf.size)
    cell = np.floor_divide(fine, ratio)
    offset = (fine - cell * ratio) * measure.mesh
    # Split keeping mass and e^{-loss}-weighted mass: the upper end gets this share.
    share = np.expm1(-offset) / math.expm1(-mesh)
    first = int(cell[0])
    index = cell - first
    pmf = np.bincount(index, measure.pmf * (1 - share), minlength=int(index[-1]) + 2)
    pmf += np.bincount(index + 1, measure.pmf * share, minlength=pmf.size)
    return _Measure(first, mesh, pmf, measure.infinite)


def _power(spectrum: np.ndarray, count: int) -> np.ndarray:
    """spectrum**count, taken in polar form (exact phases for large counts)."""
    if count == 1:
        return spectrum
    with np.errstate(divide="ignore", under="ignore"):
        magnitude = np.exp(count * np.log(np.abs(spectrum)))
    return magnitude * np.exp(1j * (count * np.angle(spectrum)))


@dataclass(frozen=True)
class _Composed:
    """The composed loss of one direction, from loss 0 up (lower losses never reach δ)."""

    losses: np.ndarray
    pmf: np.ndarray
    infinite: float  # mass at +∞, including the wrap-around bound

    def delta(self, epsilon: float) -> float:
        above = self.losses > epsilon
        hockey = float(np.dot(self.pmf[above], -np.expm1(epsilon - self.losses[above])))
        return min(1.0, self.infinite + hockey)

    def epsilon(self, delta: float) -> float:
        """The smallest ε >= 0 with delta(ε) <= δ (∞ when the mass at +∞ exceeds δ)."""
        budget = delta - self.infinite
        if budget <= 0:
            return math.inf
        # For ε in [v_{i-1}, v_i]: δ(ε) = Σ_{k>=i} p_k - e^ε Σ_{k>=i} p_k e^{-v_k}.
        mass = np.cumsum(self.pmf[::-1])[::-1]
        weighted = np.cumsum((self.pmf * np.exp(-self.losses))[::-1])[::-1]
        at_atoms = np.append(mass[1:] - np.exp(self.losses[:-1]) * weighted[1:], 0.0)
        i = int(np.argmax(at_atoms <= budget))  # first atom where δ is within budget
        if i == 0:
            return 0.0
        return max(0.0, math.log((mass[i] - budget) / weighted[i]))
