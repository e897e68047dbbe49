"""The shared grid of PRVAccountant and the composition kept on it (see dp_attn.accounting.prv).

`_plan` sizes a grid for a history at δ: its mesh (fine enough that the discretisation adds
at most 1/(4·BLOCK_RESOLUTION²) of the loss variance), its windows (by Chernoff on the composed
MGF) and the tail budget of one step. `_record_part` discretises one record of the history,
self-composes it in blocks, and places the blocks' spectra on the grid; `_Composition` keeps
their product between queries and certifies every error term of the composed loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
from scipy import fft

from dp_attn.accounting.pld import (
    MAX_POINTS,
    _coarsen,
    _Composed,
    _fast_size,
    _lambdas,
    _Measure,
    _power,
    _self_compose,
    _window,
    _wrapped,
)
from dp_attn.accounting.privacy_loss import (
    MAX_LOSS,
    _discretise,
    _step_log_mgf,
    _step_moments,
    _step_range,
)
from dp_attn.accounting.steps import Step

# Error parameters, see PRVAccountant.
TAIL_FRACTION = 1e-3  # truncation and wrap-around may cost this fraction of δ
STEP_RESOLUTION = 20  # fine mesh <= one step's loss std / STEP_RESOLUTION
BLOCK_RESOLUTION = 20  # a block's loss std >= BLOCK_RESOLUTION coarse meshes
COARSE_POINTS = 1 << 15  # aim for the coarse grid (finer when the blocks demand it)


def _fine_mesh(std: float) -> float:
    return 2.0 ** math.floor(math.log2(std / STEP_RESOLUTION))


def _block_runs(count: int, std: float, mesh: float) -> list[tuple[int, int]]:
    """`count` steps as blocks (length, repeat) whose loss std is >= BLOCK_RESOLUTION meshes."""
    length = int(min(count, math.ceil((BLOCK_RESOLUTION * mesh / std) ** 2)))
    return [(length, count // length)] + ([(count % length, 1)] if count % length else [])


def _plan_mesh(history: tuple[Step, ...], small: float) -> float:
    """Shared mesh (a power of 2): `points` over the expected loss range, but not below the
    finest step grid; then refined until the blocks' discretisation variance is
    within 1/(4·BLOCK_RESOLUTION²) of the total. Long histories of distinct steps get fewer
    points to start from, as each of their steps costs an FFT of the shared grid."""
    moments = [_step_moments(s.noise_multiplier, s.sample_rate) for s in history]
    variance = sum(s.count * std**2 for s, (_, std) in zip(history, moments, strict=True))
    mean = sum(s.count * m for s, (m, _) in zip(history, moments, strict=True))
    width = mean + (math.sqrt(2 * math.log(1 / small)) + 1) * math.sqrt(variance)
    points = max(COARSE_POINTS * 64 // max(len(history), 64), COARSE_POINTS >> 4)
    mesh = 2.0 ** math.floor(math.log2(2 * width / points))
    mesh = max(mesh, min(_fine_mesh(std) for _, std in moments))
    while True:
        blocks = sum(
            sum(repeat for _, repeat in _block_runs(s.count, std, mesh))
            for s, (_, std) in zip(history, moments, strict=True)
        )
        if blocks * mesh**2 <= variance / BLOCK_RESOLUTION**2 or mesh < 1e-12:
            return mesh
        mesh /= 2


class _Grid:
    """The shared grid: atoms k·mesh, composed by FFTs of `size` points. Direction d (0:
    remove, 1: add) keeps atoms lows[d] <= k < lows[d] + size.

    `step_tail` is the P-mass of one step left beyond its discretisation range (sent to +∞);
    `lambdas` are the Chernoff exponents of the window bounds.
    """

    def __init__(
        self, mesh: float, size: int, lows: tuple[int, int], step_tail: float, lambdas: np.ndarray
    ) -> None:
        if size > MAX_POINTS or max(abs(low) + size for low in lows) * mesh > MAX_LOSS:
            raise OverflowError("the composed loss spans too wide a range")
        self.mesh, self.size, self.lows = mesh, size, lows
        self.step_tail, self.lambdas = step_tail, lambdas
        self._powers = np.ones((0, lambdas.size))  # e^{λ·mesh·i}, rows i = 0, 1, ...

    def _geometric(self, n: int) -> np.ndarray:
        if self._powers.shape[0] < n:
            with np.errstate(over="ignore"):
                self._powers = np.exp(np.multiply.outer(np.arange(n) * self.mesh, self.lambdas))
        return self._powers[:n]

    def place(self, measure: _Measure, direction: int) -> tuple[np.ndarray, float, np.ndarray]:
        """(rfft, mass at +∞, log-MGF at ±λ) of a measure moved into the window: mass above
        it goes to +∞, mass below is raised to its lowest atom (both only raise losses)."""
        low = self.lows[direction]
        start, pmf = measure.start, measure.pmf
        keep = max(0, min(pmf.size, low + self.size - start))
        infinite = measure.infinite + float(pmf[keep:].sum())
        pmf = pmf[:keep]
        if start < low and pmf.size:
            cut = min(low - start, pmf.size - 1)
            pmf = np.concatenate([[pmf[: cut + 1].sum()], pmf[cut + 1 :]])
            start = low
        n = pmf.size
        # Σ p_i e^{±λ·loss_i} as e^{±λ·end}·Σ p_i e^{λ·mesh·distance from that end}; where
        # λ·width overflows, that λ is not used (its bound is +∞).
        powers = self._geometric(n)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            up = np.log(pmf @ powers) + self.lambdas * start * self.mesh
            down = np.log(pmf[::-1] @ powers) - self.lambdas * (start + n - 1) * self.mesh
        log_mgf = np.array([up, down])
        log_mgf[np.isnan(log_mgf)] = np.inf
        placed = np.zeros(self.size)
        first = start % self.size
        tail = min(n, self.size - first)
        placed[first : first + tail] = pmf[:tail]
        placed[: n - tail] = pmf[tail:]
        return fft.rfft(placed), infinite, log_mgf


@dataclass
class _Part:
    """What some steps contribute to a composition: spectra and log P(finite) of both
    directions, their summed log-MGFs, loss variance and the coarse grid's extra variance."""

    spectra: np.ndarray
    log_finite: np.ndarray
    log_mgf: np.ndarray
    variance: float = 0.0
    spread: float = 0.0
    steps: int = 0

    @classmethod
    def empty(cls, grid: _Grid) -> _Part:
        return cls(
            np.ones((2, grid.size // 2 + 1), dtype=complex),
            np.zeros(2),
            np.zeros((2, 2, grid.lambdas.size)),
        )

    def add(self, other: _Part) -> None:
        self.spectra *= other.spectra
        self.log_finite += other.log_finite
        self.log_mgf += other.log_mgf
        self.variance += other.variance
        self.spread += other.spread
        self.steps += other.steps


def _record_part(grid: _Grid, step: Step) -> _Part:
    """Discretise, self-compose in blocks and place on the grid one record of the history."""
    sigma, q, count = step.noise_multiplier, step.sample_rate, step.count
    std = _step_moments(sigma, q)[1]
    fine = min(grid.mesh, _fine_mesh(std))
    low, high = _step_range(sigma, q, grid.step_tail)
    # Ends rounded out to quarter octaves, so that nearby queries share the discretisation.
    high = 2.0 ** (math.ceil(4 * math.log2(max(high, fine))) / 4)
    low = -high if q == 1.0 else low
    pair = _discretise(sigma, q, fine, math.floor(low / fine), math.ceil(high / fine))
    part = _Part.empty(grid)
    runs = _block_runs(count, std, grid.mesh)
    for direction, measure in enumerate(pair):
        for length, repeat in runs:
            block = _self_compose(measure, length, std, grid.step_tail * length)
            spectrum, infinite, log_mgf = grid.place(_coarsen(block, grid.mesh), direction)
            part.spectra[direction] *= _power(spectrum, repeat)
            part.log_finite[direction] += repeat * math.log1p(-min(infinite, 1.0))
            part.log_mgf[direction] += repeat * log_mgf
    part.variance = count * std**2
    part.spread = sum(repeat for _, repeat in runs) * grid.mesh**2
    part.steps = count
    return part


class _Composition:
    """A history composed on one grid, kept so that later steps only add their own part.

    Records before the last are folded in for good; the last one (whose count may still
    grow) is composed on each query and cached while it does not change.
    """

    def __init__(self, grid: _Grid, small: float) -> None:
        self.grid = grid
        self.small = small  # the tail budget the grid was sized for (TAIL_FRACTION·δ)
        self.folded: tuple[Step, ...] = ()
        self.total = _Part.empty(grid)
        self._last: tuple[Step, _Part] | None = None
        self._result: tuple[tuple[Step, ...], tuple[_Composed, _Composed] | None] | None = None
        self.narrow = False  # a query found the window too narrow

    def extends(self, history: tuple[Step, ...]) -> bool:
        n = len(self.folded)
        return len(history) > n and history[:n] == self.folded

    def _part(self, step: Step) -> _Part:
        if self._last is None or self._last[0] != step:
            self._last = (step, _record_part(self.grid, step))
        return self._last[1]

    def compose(
        self, history: tuple[Step, ...], delta: float
    ) -> tuple[_Composed, _Composed] | None:
        """Both directions of `history` (which extends this composition) with every error
        term certified; None where this grid is too small or too coarse for it at δ."""
        if self._result is not None and self._result[0] == history:
            return self._result[1]
        for step in history[len(self.folded) : -1]:
            self.total.add(self._part(step))
            self.folded += (step,)
        total = _Part.empty(self.grid)
        total.add(self.total)
        total.add(self._part(history[-1]))
        self._result = (history, self._composed(total, delta))
        return self._result[1]

    def _composed(self, total: _Part, delta: float) -> tuple[_Composed, _Composed] | None:
        grid, small = self.grid, TAIL_FRACTION * delta
        if (
            small < self.small
            or total.steps * grid.step_tail > small / 4
            or total.spread > 2 * total.variance / BLOCK_RESOLUTION**2
        ):
            return None
        composed = []
        for direction, low in enumerate(grid.lows):
            up, down = total.log_mgf[direction]
            wrapped = _wrapped(np.array([up, down]), grid.lambdas, (low + grid.size) * grid.mesh)
            below = _wrapped(np.array([down, up]), grid.lambdas, -low * grid.mesh)
            if wrapped > small / 4 or below > small / 4:
                self.narrow = True
                return None
            circular = fft.irfft(total.spectra[direction], n=grid.size)
            # Rounding noise: negative entries show its level; as much mass may be missing
            # at any atom, so size·level goes to +∞ and the negative entries are clipped.
            rounding = grid.size * max(0.0, -float(circular.min()))
            # Atom k sits at index k mod size; losses below 0 never reach δ.
            atoms = np.arange(low + grid.size)
            pmf = np.where(atoms >= low, circular[atoms % grid.size], 0.0)
            infinite = -math.expm1(total.log_finite[direction]) + wrapped + rounding
            composed.append(
                _Composed(
                    losses=atoms * grid.mesh, pmf=np.maximum(pmf, 0.0), infinite=min(infinite, 1.0)
                )
            )
        return composed[0], composed[1]


def _plan(history: tuple[Step, ...], delta: float, headroom: float, widen: float = 1.0) -> _Grid:
    """A grid for `history` at δ, with room for `headroom` times as many steps and windows
    `widen` times as wide as the tails' estimate asks."""
    small = TAIL_FRACTION * delta
    steps = sum(s.count for s in history)
    mesh = _plan_mesh(history, small)
    std = math.sqrt(
        sum(s.count * _step_moments(s.noise_multiplier, s.sample_rate)[1] ** 2 for s in history)
    )
    lambdas = _lambdas(std)
    # Windows from Chernoff on an estimate of the composed MGF: at most 64 records, scaled.
    sample = history[:: -(-len(history) // 64)]
    scale = headroom * steps / sum(s.count for s in sample)
    terms = (
        s.count * _step_log_mgf(s.noise_multiplier, s.sample_rate, tuple(lambdas)) for s in sample
    )
    log_mgf = scale * cast(np.ndarray, sum(terms))  # `sample` is never empty: an array
    step_tail = small / (8 * steps * headroom)
    reach = max(_step_range(s.noise_multiplier, s.sample_rate, step_tail)[1] for s in sample)
    lows, tops = [], []
    for direction in range(2):
        low, high = _window(log_mgf[direction], lambdas, small / 8)
        low, high = min(low * widen, -reach), max(high * widen, reach)
        lows.append(math.floor(low / mesh) - 1)
        tops.append(math.ceil(high / mesh) + 1)
    size = _fast_size(max(max(t - lo for lo, t in zip(lows, tops, strict=True)), 64))
    return _Grid(mesh, size, (lows[0], lows[1]), step_tail, lambdas)
