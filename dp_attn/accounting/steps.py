"""The record of one training regime, and the argument checks every accountant shares."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    return value


def check_noise_multiplier(value: object) -> float:
    """z >= 0 and finite; z = 0 (no noise) is legal and gives ε = ∞."""
    value = _real("noise_multiplier", value)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {value}")
    return value


def check_sample_rate(value: object) -> float:
    """q in (0, 1]: each example is in a step's batch independently with probability q."""
    value = _real("sample_rate", value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {value}")
    return value


def check_count(value: object, name: str = "count") -> int:
    """A number of steps: an integer >= 0 (floats such as 3.0 are refused, not rounded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value}")
    return int(value)


def check_delta(value: object) -> float:
    value = _real("delta", value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {value}")
    return value


def check_epsilon(value: object, name: str = "epsilon") -> float:
    value = _real(name, value)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


@dataclass(frozen=True)
class Step:
    """`count` consecutive DP-SGD steps, each a Poisson-subsampled Gaussian mechanism.

    Every example joins a step's batch independently with probability `sample_rate` (q);
    the clipped sum gets Gaussian noise of standard deviation `noise_multiplier` (z) times
    the clipping norm. Neighbouring datasets differ by adding or removing one example.
    """

    noise_multiplier: float
    sample_rate: float
    count: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        count = check_count(self.count)
        if count == 0:
            raise ValueError("count must be an integer >= 1 in a Step, got 0")
        object.__setattr__(self, "count", count)

    def same_regime(self, other: Step) -> bool:
        return (self.noise_multiplier, self.sample_rate) == (
            other.noise_multiplier,
            other.sample_rate,
        )


def append_step(history: tuple[Step, ...], step: Step) -> tuple[Step, ...]:
    """`history` followed by `step`, merged into the last record when the regime is the same."""
    if history and history[-1].same_regime(step):
        last = history[-1]
        return (
            *history[:-1],
            Step(last.noise_multiplier, last.sample_rate, last.count + step.count),
        )
    return (*history, step)
