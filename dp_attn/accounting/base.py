"""What every accountant shares: the ledger of steps, its checks, and its saved state."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

from dp_attn.accounting.steps import (
    Step,
    append_step,
    check_count,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
)


class Accountant(ABC):
    """Composes a history of Poisson-subsampled Gaussian steps into an (ε, δ) guarantee.

    The guarantee is for adding or removing one example. Both queries give upper bounds:
    `epsilon(delta)` never reports less than the true ε, `delta(epsilon)` never less than
    the true δ. With no steps, ε = 0 and δ = 0; a step without noise (z = 0) gives ε = ∞
    and δ = 1.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._history: tuple[Step, ...] = ()

    @property
    def history(self) -> tuple[Step, ...]:
        """The steps taken so far, consecutive identical regimes merged into one `Step`."""
        return self._history

    def step(self, *, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        """Record `count` steps with noise multiplier z and sampling rate q (count=0: nothing)."""
        z = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        count = check_count(count)
        if count:
            step = Step(z, q, count)
            self._history = append_step(self._history, step)
            self._record(step)

    def compose(self, steps: Iterable[Step]) -> None:
        """Record each `Step` of a schedule in order (e.g. from `read_schedule`)."""
        for s in steps:
            if not isinstance(s, Step):
                raise TypeError(f"compose takes Step records, got {type(s).__name__}")
            self.step(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate, count=s.count)

    def epsilon(self, delta: float) -> float:
        """The smallest ε this accountant can prove for the given δ, in (0, 1)."""
        delta = check_delta(delta)
        if not self._history:
            return 0.0
        if self._noiseless():
            return math.inf
        return self._epsilon(delta)

    def delta(self, epsilon: float) -> float:
        """The smallest δ this accountant can prove for the given ε >= 0."""
        epsilon = check_epsilon(epsilon)
        if not self._history:
            return 0.0
        if self._noiseless():
            return 1.0
        return self._delta(epsilon)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the history (it is all an accountant needs to resume)."""
        return {
            "accountant": self.name,
            "history": [
                {
                    "noise_multiplier": s.noise_multiplier,
                    "sample_rate": s.sample_rate,
                    "count": s.count,
                }
                for s in self._history
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the history by the one in `state` (from any accountant's `state_dict`)."""
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise ValueError("state must be a dict with a 'history' list, as from state_dict()")
        self._reset()
        for record in state["history"]:
            if not isinstance(record, dict) or set(record) != {
                "noise_multiplier",
                "sample_rate",
                "count",
            }:
                raise ValueError(
                    "each state['history'] entry must be a dict with keys noise_multiplier, "
                    f"sample_rate and count, got {record!r}"
                )
            self.step(**record)

    def __repr__(self) -> str:
        steps = sum(s.count for s in self._history)
        return f"{type(self).__name__}(steps={steps}, regimes={len(self._history)})"

    def _noiseless(self) -> bool:
        return any(s.noise_multiplier == 0.0 for s in self._history)

    def _reset(self) -> None:
        self._history = ()

    def _record(self, step: Step) -> None:  # noqa: B027 (only accountants with running state need it)
        """Hook: update running state after `step` was appended to the history."""

    @abstractmethod
    def _epsilon(self, delta: float) -> float:
        """ε for a non-empty history whose steps all have noise."""

    @abstractmethod
    def _delta(self, epsilon: float) -> float:
        """δ for a non-empty history whose steps all have noise."""
