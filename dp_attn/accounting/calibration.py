"""Noise for a target ε, and the number of steps a budget allows."""

from __future__ import annotations

import math
from collections.abc import Callable

from dp_attn.accounting.registry import make_accountant
from dp_attn.accounting.steps import (
    Step,
    append_step,
    check_count,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
)

# calibrate_noise_multiplier stops once ε is within this fraction below the target.
RELATIVE_TOLERANCE = 2e-3
MAX_STEPS = 1 << 40  # calibrate_steps reports this when even that many steps fit


def epsilon_of_history(history: tuple[Step, ...], delta: float, accountant: str) -> float:
    """ε of a history with a fresh accountant of the given name."""
    acc = make_accountant(accountant)
    for s in history:
        acc.step(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate, count=s.count)
    return acc.epsilon(delta)


def steps_within(
    history: tuple[Step, ...],
    noise_multiplier: float,
    sample_rate: float,
    target: float,
    delta: float,
    accountant: str,
) -> int:
    """How many steps of (z, q) can follow `history` with ε staying within `target`."""

    def epsilon_of(count: int) -> float:
        extended = append_step(history, Step(noise_multiplier, sample_rate, count))
        return epsilon_of_history(extended, delta, accountant)

    # RDP is fast and never below the other accountants: its count is a good first guess.
    guess = 1
    if accountant != "rdp":
        guess = steps_within(history, noise_multiplier, sample_rate, target, delta, "rdp")
    return _largest_count(epsilon_of, target, guess)


def _largest_count(epsilon_of: Callable[[int], float], target: float, guess: int) -> int:
    """The largest k in [0, MAX_STEPS] with epsilon_of(k) <= target (epsilon_of increasing).

    Brackets by doubling from `guess`, then narrows by interpolation in (log k, log ε),
    falling back to bisection whenever interpolation does not halve the bracket.
    """
    fits, exceeds = 0, None  # epsilon_of(fits) <= target < epsilon_of(exceeds)
    values = {0: 0.0}
    k = max(1, guess)
    while exceeds is None:
        values[k] = epsilon_of(k)
        if values[k] > target:
            exceeds = k
        elif k >= MAX_STEPS:
            return MAX_STEPS
        else:
            fits, k = k, min(2 * k, MAX_STEPS)
    bisect = False
    while exceeds - fits > 1:
        width = exceeds - fits
        if bisect or fits == 0 or math.isinf(values[exceeds]) or values[fits] <= 0:
            k = (fits + exceeds) // 2
        else:
            slope = math.log(values[exceeds] / values[fits]) / math.log(exceeds / fits)
            k = round(fits * (target / values[fits]) ** (1 / slope))
            k = min(max(k, fits + 1), exceeds - 1)
        values[k] = epsilon_of(k)
        if values[k] <= target:
            fits = k
        else:
            exceeds = k
        bisect = exceeds - fits > width // 2
    return fits


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
) -> float:
    """The noise multiplier z for which `steps` steps at rate q spend just under the target.

    ε(z) is at most `target_epsilon` and within 0.2% of it. Bracketing by doubling, then
    Illinois regula falsi on (log z, log ε), which converges in a handful of evaluations.
    """
    target = check_epsilon(target_epsilon, "target_epsilon")
    delta = check_delta(delta)
    q = check_sample_rate(sample_rate)
    steps = check_count(steps, "steps")
    make_accountant(accountant)  # fail early on a bad name
    if target == 0.0 or steps == 0:
        raise ValueError(
            f"target_epsilon and steps must be > 0 to calibrate, got {target} and {steps}"
        )

    def gap(log_z: float) -> float:
        """log ε(z) - log target: decreasing in z, +∞ where ε is."""
        eps = epsilon_of_history((Step(math.exp(log_z), q, steps),), delta, accountant)
        return math.inf if eps == math.inf else math.log(max(eps, 1e-300) / target)

    low, high = 0.0, 0.0  # log z with gap(low) > 0 >= gap(high)
    g_low = g_high = gap(0.0)
    if g_high > 0:
        while g_high > 0:
            low, g_low = high, g_high
            high += math.log(2)
            if high > math.log(1e6):
                raise ValueError(f"target_epsilon={target} needs a noise multiplier above 1e6")
            g_high = gap(high)
    else:
        while g_low <= 0:
            high, g_high = low, g_low
            low -= math.log(2)
            if low < math.log(1e-4):
                raise ValueError(
                    f"target_epsilon={target} holds for noise multipliers down to 1e-4"
                )
            g_low = gap(low)
    # Illinois: the secant uses weights that halve at an end kept twice in a row.
    w_low, w_high = g_low, g_high
    kept = 0  # +1: `high` moved last, -1: `low` moved last
    while g_high < math.log1p(-RELATIVE_TOLERANCE) and high - low > 1e-12:
        if math.isinf(w_low):
            middle = (low + high) / 2
        else:
            middle = high - w_high * (high - low) / (w_high - w_low)
        g = gap(middle)
        if g > 0:
            low, g_low, w_low = middle, g, g
            if kept == -1:
                w_high /= 2
            kept = -1
        else:
            high, g_high, w_high = middle, g, g
            if kept == 1 and not math.isinf(w_low):
                w_low /= 2
            kept = 1
    return math.exp(high)


def calibrate_steps(
    noise_multiplier: float,
    sample_rate: float,
    target_epsilon: float,
    delta: float,
    accountant: str = "prv",
) -> int:
    """The largest number of steps with noise z and rate q whose ε stays within the target.

    0 when even one step exceeds it; `MAX_STEPS` (2^40) when that many still fit.
    """
    z = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    target = check_epsilon(target_epsilon, "target_epsilon")
    delta = check_delta(delta)
    make_accountant(accountant)
    return steps_within((), z, q, target, delta, accountant)
