"""Guesses from canary scores (see dp_attn.audit): every (statistic, guess counts) test on one
set of scores, at a Bonferroni level, and the best of their ε lower bounds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from dp_attn.audit.bound import _check_probability, _epsilon_lower_bound, _is_int


@dataclass(frozen=True, eq=False)
class ScoreAudit:
    """The best of the tests run on one set of canary scores.

    epsilon_lower_bound: the largest bound over the tests, valid at `confidence` (each test
        ran at level (1 - confidence) / tests).
    statistic, k_plus, k_minus: the test that gave it ("included" guessed for the k_plus
        highest scores of that statistic, "excluded" for the k_minus lowest).
    guesses, correct: r = k_plus + k_minus and the number of right guesses among them.
    """

    epsilon_lower_bound: float
    statistic: str
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    tests: int
    num_canaries: int
    delta: float
    confidence: float


def default_guess_counts(num_canaries: int) -> list[tuple[int, int]]:
    """(k, k) for k = m/32, m/16, m/8, m/4, m/2 (rounded down, at least 1, no repeats)."""
    ks = sorted({max(1, num_canaries // d) for d in (32, 16, 8, 4, 2)})
    return [(k, k) for k in ks if 2 * k <= num_canaries] or [(1, 0)]


def _guess_counts(guess_counts: Iterable[Sequence[int]] | None, m: int) -> list[tuple[int, int]]:
    """The checked (k_plus, k_minus) pairs to test for m canaries."""
    counts = default_guess_counts(m) if guess_counts is None else list(guess_counts)
    if not counts:
        raise ValueError("guess_counts must hold at least one (k_plus, k_minus) pair")
    for pair in counts:
        ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(_is_int, pair))
        if not ok or min(pair) < 0 or not 1 <= pair[0] + pair[1] <= m:
            raise ValueError(
                f"guess_counts must be (k_plus, k_minus) int pairs >= 0 with "
                f"1 <= k_plus + k_minus <= {m}, got {pair!r}"
            )
    return [(int(k_plus), int(k_minus)) for k_plus, k_minus in counts]


def audit_scores(
    scores: Mapping[str, np.ndarray] | np.ndarray,
    included: ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
) -> ScoreAudit:
    """Turn canary scores into an empirical lower bound on ε.

    scores: one score per canary ([m], higher = more likely included), or a mapping
        {statistic name: [m] scores}; every statistic is tested.
    included: [m] booleans, which canaries were in the training set (each independently with
        probability 1/2, drawn without looking at the run).
    guess_counts: the (k_plus, k_minus) pairs to test, fixed before looking at the scores
        (default default_guess_counts(m)). Ties between scores are broken by canary index.

    Runs one test per (statistic, guess counts) pair at level (1 - confidence) / tests and
    returns the best; its bound holds at `confidence` for the whole search.
    """
    included = np.asarray(included)
    if included.ndim != 1 or included.dtype != np.bool_ or included.size == 0:
        raise ValueError(
            f"included must be a non-empty 1-D bool array, got shape {included.shape} "
            f"and dtype {included.dtype}"
        )
    m = included.size
    if not isinstance(scores, Mapping):
        scores = {"score": scores}
    if not scores:
        raise ValueError("scores must hold at least one statistic")
    checked: dict[str, np.ndarray] = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (m,):
            raise ValueError(f"scores[{name!r}] must have shape ({m},), got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"scores[{name!r}] must be finite (a released gradient was not?)")
        checked[name] = values
    counts = _guess_counts(guess_counts, m)
    delta = _check_probability("delta", delta, low_open=False)
    level = (1.0 - _check_probability("confidence", confidence)) / (len(checked) * len(counts))

    best: ScoreAudit | None = None
    for name, values in checked.items():
        ranked = included[np.argsort(values, kind="stable")]  # lowest score first
        for k_plus, k_minus in counts:
            correct = int(ranked[m - k_plus :].sum()) + int((~ranked[:k_minus]).sum())
            r = k_plus + k_minus
            bound = _epsilon_lower_bound(r, correct, m, delta, level)
            if best is None or bound > best.epsilon_lower_bound:
                best = ScoreAudit(
                    epsilon_lower_bound=bound,
                    statistic=name,
                    k_plus=k_plus,
                    k_minus=k_minus,
                    guesses=r,
                    correct=correct,
                    tests=len(checked) * len(counts),
                    num_canaries=m,
                    delta=delta,
                    confidence=float(confidence),
                )
    assert best is not None  # `checked` and `counts` are not empty
    return best
