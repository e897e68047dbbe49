"""A privacy budget that refuses, before it is taken, the step that would overspend it."""

from __future__ import annotations

from dp_attn.accounting.base import Accountant
from dp_attn.accounting.calibration import steps_within
from dp_attn.accounting.registry import make_accountant
from dp_attn.accounting.steps import (
    Step,
    check_count,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
)


class BudgetExceededError(RuntimeError):
    """Taking the requested steps would push ε past the budget."""


class PrivacyBudget:
    """An (ε, δ) budget watched over by an accountant.

    Call `check(noise_multiplier, sample_rate)` before each step and `accountant.step(...)`
    after it. `check` never changes the accountant. It works out once per regime how many
    steps of that regime still fit, so that checking every step costs almost nothing.

        budget = PrivacyBudget(epsilon=3.0, delta=1e-5, accountant="prv")
        budget.check(noise_multiplier=1.1, sample_rate=0.01)  # raises BudgetExceededError
        budget.accountant.step(noise_multiplier=1.1, sample_rate=0.01)
    """

    def __init__(self, epsilon: float, delta: float, accountant: Accountant | str = "prv") -> None:
        self.epsilon = check_epsilon(epsilon)
        self.delta = check_delta(delta)
        if isinstance(accountant, str):
            accountant = make_accountant(accountant)
        if not isinstance(accountant, Accountant):
            raise TypeError(
                f"accountant must be an Accountant or a name, got {type(accountant).__name__}"
            )
        self.accountant = accountant
        # (history, z, q, n): from `history`, n more steps of (z, q) fit and n + 1 do not.
        self._fits: tuple[tuple[Step, ...], float, float, int] | None = None

    def spent(self) -> float:
        """ε spent so far, at the budget's δ."""
        return self.accountant.epsilon(self.delta)

    def remaining_steps(self, noise_multiplier: float, sample_rate: float) -> int:
        """How many more steps with noise z and rate q fit in the budget."""
        z = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        history = self.accountant.history
        cached = self._fits
        if cached is not None and cached[1:3] == (z, q):
            taken = _steps_since(cached[0], history, Step(z, q))
            if taken is not None:
                return cached[3] - taken
        fits = steps_within(history, z, q, self.epsilon, self.delta, self.accountant.name)
        self._fits = (history, z, q, fits)
        return fits

    def check(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        """Raise BudgetExceededError if `count` more steps of (z, q) would exceed the budget."""
        count = check_count(count)
        left = self.remaining_steps(noise_multiplier, sample_rate)
        if count > left:
            raise BudgetExceededError(
                f"taking {count} step(s) with noise_multiplier={noise_multiplier}, "
                f"sample_rate={sample_rate} would exceed the budget ε={self.epsilon} at "
                f"δ={self.delta} (spent so far: ε={self.spent():.4g}; steps left in this "
                f"regime: {left})"
            )

    def __repr__(self) -> str:
        return (
            f"PrivacyBudget(epsilon={self.epsilon}, delta={self.delta}, "
            f"accountant={self.accountant!r})"
        )


def _steps_since(base: tuple[Step, ...], now: tuple[Step, ...], regime: Step) -> int | None:
    """m if `now` is `base` followed by m steps of `regime`'s (z, q); else None."""
    if now == base:
        return 0
    if len(now) == len(base) + 1 and now[:-1] == base and now[-1].same_regime(regime):
        return now[-1].count
    if (
        base
        and len(now) == len(base)
        and now[:-1] == base[:-1]
        and base[-1].same_regime(regime)
        and now[-1].same_regime(regime)
        and now[-1].count > base[-1].count
    ):
        return now[-1].count - base[-1].count
    return None
