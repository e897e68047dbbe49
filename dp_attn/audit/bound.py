"""The test of a one-run audit (see dp_attn.audit): an upper bound on the p-value of W correct
guesses under (ε, δ)-DP, and the empirical lower bound on ε it gives."""

from __future__ import annotations

from typing import Any, TypeGuard

import numpy as np
from scipy import special, stats

from dp_attn.checks import is_int, is_real

# Bisection on ε stops when the bracket is this narrow.
_EPSILON_TOLERANCE = 1e-9


def _is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    """An int as checks.is_int, or a NumPy integer (counts often come out of NumPy)."""
    return is_int(value) or isinstance(value, np.integer)


def _check_counts(num_guesses: int, num_correct: int, num_canaries: int) -> None:
    for name, value in (
        ("num_guesses", num_guesses),
        ("num_correct", num_correct),
        ("num_canaries", num_canaries),
    ):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            "need num_correct <= num_guesses <= num_canaries, got "
            f"{num_correct}, {num_guesses}, {num_canaries}"
        )


def _check_probability(name: str, value: object, *, low_open: bool = True) -> float:
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0):
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def p_value(
    num_guesses: int, num_correct: int, epsilon: float, *, num_canaries: int, delta: float
) -> float:
    """Upper bound on P[W >= num_correct] for any (ε, δ)-DP run audited with `num_canaries`
    canaries and `num_guesses` guesses (the right-hand side of the theorem, capped at 1)."""
    _check_counts(num_guesses, num_correct, num_canaries)
    delta = _check_probability("delta", delta, low_open=False)
    if not is_real(epsilon) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    return _p_value(num_guesses, num_correct, float(epsilon), num_canaries, delta)


def _p_value(r: int, v: int, epsilon: float, m: int, delta: float) -> float:
    if v == 0:
        return 1.0
    q = special.expit(epsilon)  # accuracy of ε-DP randomized response
    tail = stats.binom.sf(v - 1, r, q)  # f(v) = P[Binomial(r, q) >= v]
    if delta > 0:
        # (f(v - i) - f(v)) / i for i = 1..v: mean pmf over the window v-i .. v-1.
        window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        tail += 2.0 * m * delta * float(np.max(window / np.arange(1, v + 1)))
    return min(float(tail), 1.0)


def epsilon_lower_bound(
    num_guesses: int,
    num_correct: int,
    *,
    num_canaries: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Empirical lower bound on ε from one audit: `num_correct` right among `num_guesses`
    guesses (a number fixed before the run) about `num_canaries` canaries, each included
    with probability 1/2.

    Returns ε̂ >= 0 such that every ε < ε̂ is rejected: p_value(ε) < 1 - confidence. If the
    run is (ε, δ)-DP, P[ε̂ > ε] <= 1 - confidence. Chance-level guessing gives 0.
    """
    _check_counts(num_guesses, num_correct, num_canaries)
    delta = _check_probability("delta", delta, low_open=False)
    level = 1.0 - _check_probability("confidence", confidence)
    return _epsilon_lower_bound(num_guesses, num_correct, num_canaries, delta, level)


def _epsilon_lower_bound(r: int, v: int, m: int, delta: float, level: float) -> float:
    def rejected(epsilon: float) -> bool:
        return _p_value(r, v, epsilon, m, delta) < level

    if not rejected(0.0):
        return 0.0
    # Bisection keeps rejected(low) and not rejected(high). The bound need not be monotone
    # in ε, but any ε with a p-value below the level is a valid lower bound: a run that is
    # (ε*, δ)-DP is (ε, δ)-DP for every ε >= ε*, so P[some ε >= ε* is rejected] is at most
    # P[W >= v0] <= level for the smallest such count v0.
    low, high = 0.0, 1.0
    while rejected(high):  # terminates: expit(ε) rounds to 1 before ε = 64, p-value 1
        low, high = high, 2.0 * high
    while high - low > _EPSILON_TOLERANCE * max(1.0, high):
        middle = 0.5 * (low + high)
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low
