"""Privacy random variables (Gopi, Lee, Wutschitz 2021) composed by FFT with certified bounds.

A Poisson-subsampled Gaussian step is the pair P = (1-q)·N(0, σ²) + q·N(1, σ²), Q = N(0, σ²)
("remove"; "add" is the pair reversed). Its privacy random variable is the loss
Y = log(dP/dQ)(x), x ~ P, and δ(ε) = E[(1 - e^{ε-Y})₊]. Losses of composed steps add, so the
composition's loss distribution is the convolution of the steps'.

Discretisation ("connect the dots", Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022): the
mass of every grid cell is split between the cell's two ends so that both its P-mass and
its Q-mass are kept. As (1 - e^ε·u)₊ is convex in u = e^{-Y}, this spread can only raise
δ(ε) at every ε, and composition keeps that order; so every δ computed here is an upper
bound, not an estimate. Its price is extra variance, at most mesh²/4 per discretised
variable, so meshes are tied to the loss's spread:

1. each distinct (z, q) is discretised on a fine grid, mesh <= its one-step loss std / 20;
2. its steps are self-composed on that fine grid in blocks whose loss std is >= 20 coarse
   meshes, and each block is discretised again onto the shared coarse grid;
3. on the coarse grid every block's spectrum is raised to its count, all are multiplied,
   and one inverse FFT gives the composed loss, for each direction.

Loss beyond a grid's top is moved to +∞ and counted in δ in full. An FFT wraps sums around
its window: wrapping from below only raises losses, which is safe; the mass that wraps from
above is bounded with Chernoff, P(S >= top) <= e^{-λ·top} E[e^{λS}], on the discrete
distributions themselves, and added to δ.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import fft, optimize, special

from dp_attn.accounting.base import Accountant
from dp_attn.accounting.rdp import ORDERS, delta_from_rdp, epsilon_from_rdp, rdp_of_history
from dp_attn.accounting.steps import Step

# Error parameters, see PRVAccountant.
TAIL_FRACTION = 1e-3  # truncation and wrap-around may cost this fraction of δ
STEP_RESOLUTION = 20  # fine mesh <= one step's loss std / STEP_RESOLUTION
BLOCK_RESOLUTION = 20  # a block's loss std >= BLOCK_RESOLUTION coarse meshes
COARSE_POINTS = 1 << 15  # aim for the coarse grid (finer when the blocks demand it)
MAX_POINTS = 1 << 23  # largest FFT
MAX_LOSS = 500.0  # largest loss on a grid (e^loss must stay within float64)

# Chernoff exponents tried: powers of 2 from 2^-6/std to 2^8/std of the loss they bound.
_LAMBDA_OCTAVES = np.arange(-6, 9)


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


@dataclass(frozen=True)
class _Measure:
    """A discrete loss distribution: mass pmf[i] at loss (start + i)·mesh, and mass at +∞."""

    start: int
    mesh: float
    pmf: np.ndarray
    infinite: float
    _log_mgfs: dict = field(default_factory=dict, compare=False, repr=False)  # λ: row

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


@functools.lru_cache(maxsize=256)
def _step_std(sigma: float, q: float) -> float:
    """Standard deviation of one step's loss under P (from a 4096-point discretisation)."""
    low, high = _step_range(sigma, q, 1e-12)
    mesh = (high - low) / 4096
    for _ in range(8):
        remove, _add = _discretise(sigma, q, mesh, math.floor(low / mesh), math.ceil(high / mesh))
        weights = remove.pmf / remove.pmf.sum()
        mean = float(np.dot(weights, remove.losses))
        std = max(math.sqrt(float(np.dot(weights, (remove.losses - mean) ** 2))), mesh)
        if mesh <= std / 4:
            return std
        mesh = std / 8  # the loss is concentrated in a few cells: look closer
    return std


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


def _compose_blocks(
    blocks: list[tuple[_Measure, int]], mesh: float, std: float, tail: float
) -> _Composed:
    """Compose blocks (measure on the coarse grid, count), whose sum has loss std `std`, on
    one symmetric FFT window."""
    lambdas = _lambdas(std)
    log_mgf = sum(count * block.log_mgf(lambdas) for block, count in blocks)
    low, high = _window(log_mgf, lambdas, tail)
    half = max(math.ceil(max(high, -low) / mesh) + 1, 32)
    size = _fast_size(2 * half)
    if size > MAX_POINTS or half * mesh > MAX_LOSS:
        raise OverflowError("the composed loss spans too wide a range")
    half = size // 2
    factors = []
    log_finite = 0.0
    for block, count in blocks:
        index = block.start + np.arange(block.pmf.size)
        pmf = block.pmf[index < half]
        infinite = block.infinite + float(block.pmf[index >= half].sum())
        index = np.maximum(index[index < half], -half)  # losses below the window are raised
        placed = np.bincount(index % size, pmf, minlength=size)
        factors.append((fft.rfft(placed), count))
        log_finite += count * math.log1p(-min(infinite, 1.0))
    pmf = fft.fftshift(_power_spectrum(factors, size))  # index k is loss (k - half)·mesh
    # Rounding noise: negative entries show its level; as much mass may be missing at any
    # atom, so size·level goes to +∞ and the negative entries are clipped.
    pmf = pmf[half:]
    rounding = size * max(0.0, -float(pmf.min()))
    pmf = np.maximum(pmf, 0.0)
    infinite = -math.expm1(log_finite) + _wrapped(log_mgf, lambdas, half * mesh) + rounding
    return _Composed(losses=np.arange(size - half) * mesh, pmf=pmf, infinite=min(infinite, 1.0))


def _fine_mesh(std: float) -> float:
    return 2.0 ** math.floor(math.log2(std / STEP_RESOLUTION))


def _plan_mesh(history: tuple[Step, ...], stds: list[float], delta: float) -> float:
    """Coarse mesh (a power of 2): ~COARSE_POINTS over the RDP loss range, but not below 1/8
    of the finest step grid (where steps' own ranges would need too many points); then
    refined until the blocks' discretisation variance is within 1/(4·BLOCK_RESOLUTION²) of
    the total."""
    small = TAIL_FRACTION * delta
    rdp = rdp_of_history(history)
    width = float(np.min(rdp + math.log(1 / small) / (ORDERS - 1)))
    mesh = 2.0 ** math.floor(math.log2(2 * width / COARSE_POINTS))
    mesh = max(mesh, min(_fine_mesh(std) for std in stds) / 8)
    total_variance = sum(s.count * std**2 for s, std in zip(history, stds, strict=True))
    while True:
        blocks = sum(
            -(-s.count // _block_size(s.count, std, mesh))
            for s, std in zip(history, stds, strict=True)
        )
        if blocks * mesh**2 <= total_variance / BLOCK_RESOLUTION**2 or mesh < 1e-12:
            return mesh
        mesh /= 2


def _block_size(count: int, std: float, mesh: float) -> int:
    return int(min(count, math.ceil((BLOCK_RESOLUTION * mesh / std) ** 2)))


def _compose(history: tuple[Step, ...], delta: float) -> tuple[_Composed, _Composed]:
    """(remove, add) composed losses of the history, with tails within TAIL_FRACTION·δ."""
    small = TAIL_FRACTION * delta
    steps = sum(s.count for s in history)
    stds = [_step_std(s.noise_multiplier, s.sample_rate) for s in history]
    mesh = _plan_mesh(history, stds, delta)
    blocks: tuple[list, list] = ([], [])
    for s, std in zip(history, stds, strict=True):
        fine = min(mesh, _fine_mesh(std))
        low, high = _step_range(s.noise_multiplier, s.sample_rate, small / (4 * steps))
        # Ends rounded out to quarter octaves, so that nearby queries share the discretisation.
        high = 2.0 ** (math.ceil(4 * math.log2(max(high, fine))) / 4)
        low = -high if s.sample_rate == 1.0 else low
        pair = _discretise(
            s.noise_multiplier, s.sample_rate, fine, math.floor(low / fine), math.ceil(high / fine)
        )
        size = _block_size(s.count, std, mesh)
        runs = [(size, s.count // size)] + ([(s.count % size, 1)] if s.count % size else [])
        for direction, measure in enumerate(pair):
            for length, repeat in runs:
                block = _self_compose(measure, length, std, small * length / (4 * steps))
                blocks[direction].append((_coarsen(block, mesh), repeat))
    std = math.sqrt(sum(s.count * std**2 for s, std in zip(history, stds, strict=True)))
    remove, add = (_compose_blocks(b, mesh, std, small / 4) for b in blocks)
    return remove, add


class PRVAccountant(Accountant):
    """Privacy-random-variable accountant: tight (ε, δ) for Poisson-subsampled Gaussian steps.

    Both directions of add/remove are composed and the larger ε (larger δ) is reported. The
    result is the exact ε of a discrete pair that provably dominates the history, plus
    certified tail terms, so it is an upper bound on the true ε (up to float64 rounding,
    whose level is read off the FFT's negative entries and added to δ). The RDP bound of the
    same history is an upper bound too; the smaller of the two is reported, which only
    matters where the grid cannot hold the loss (ε in the hundreds) or δ is within a
    hundred times the float64 rounding level of the FFT (δ below ~1e-11).

    Error parameters: truncation and wrap-around cost at most `TAIL_FRACTION` = 1e-3 of δ
    (bounded, then added to δ); the discretisation adds at most 1/(4·20²) of the loss
    variance per stage (fine mesh <= one step's loss std / `STEP_RESOLUTION` = 20; blocks at
    least `BLOCK_RESOLUTION` = 20 coarse meshes wide). Measured against dp-accounting's PLD
    at a fine interval, the upper bound is within 0.05% of the true ε on typical runs (Abadi
    et al.'s MNIST run: 0.006%). Cost: tens of ms for 1e5 steps, most of it per distinct
    (z, q), which is cached.
    """

    name = "prv"

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple | None = None

    def _composed(self, delta: float) -> tuple[_Composed, _Composed] | None:
        """Both directions composed with tails fit for δ (None: too wide for the grid)."""
        key = (self._history, delta)
        if self._cache is None or self._cache[0] != key:
            try:
                composed = _compose(self._history, delta)
            except OverflowError:
                composed = None
            self._cache = (key, composed)
        return self._cache[1]

    def _epsilon(self, delta: float) -> float:
        bound = epsilon_from_rdp(ORDERS, rdp_of_history(self._history), delta)
        composed = self._composed(delta)
        if composed is None:
            return bound
        return min(bound, max(c.epsilon(delta) for c in composed))

    def _delta(self, epsilon: float) -> float:
        bound = delta_from_rdp(ORDERS, rdp_of_history(self._history), epsilon)
        # Tails are budgeted relative to δ: start from RDP's δ and refine once the answer
        # is known, so that they stay a small fraction of it.
        target = min(bound, 0.5)
        while True:
            composed = self._composed(target)
            if composed is None:
                return bound
            result = max(c.delta(epsilon) for c in composed)
            if result >= target / 2 or result < 1e-100:
                return min(bound, result)
            target = result
