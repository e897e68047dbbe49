"""The one-run privacy audit: the lower-bound function against exact binomial computations, the
scoring and guessing, and the audit of the real release path of PrivacyEngine, which must stay
below the accountant's ε, against deliberately broken mechanisms, which must exceed it.

Robustness of the end-to-end tests. With Dirac canaries (one weight coordinate each, norm
10·C) the per-step canary signals are exactly y_it = b_it·S_i + z·n_it in units of C/(q·N)
(b_it: Poisson inclusion, S_i: the canary coin, n_it: the step's noise), so the whole audit can
be simulated in numpy. Simulated with the tests' settings (m, z, q, steps, the default grid of
guess counts, both statistics):
- real mechanism, full batches (m=400, z=2, 1 step, ε=1.99): bound above ε in 0 of 10^6 runs;
- real mechanism, Poisson q=1/2 (m=128, z=4, 8 steps, ε=1.48): 0 of 10^6 runs;
- noise scaled by 0.1, clipping disabled, one noise draw reused (same settings): the bound
  stayed at or below ε in 0 of 2·10^5 runs each.
So each end-to-end test fails spuriously with probability < 3e-6 (real) or < 1.5e-5 (broken),
the one-sided 95% upper limits for 0 events; < 6e-5 for the five together. The theorem alone
only guarantees 5% for the real mechanism: the margin comes from the audit's known looseness.
"""

import itertools
import math
import secrets
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn
from torch.utils.data import TensorDataset

import dp_attn.clipping as clipping_module
import dp_attn.functional as DF
from dp_attn.audit import (
    audit_one_run,
    audit_scores,
    default_guess_counts,
    dirac_canaries,
    dirac_loss,
    epsilon_lower_bound,
    p_value,
)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

DELTA = 1e-5
LEVEL = 0.05  # 1 - confidence


# ---------------------------------------------------------------- the bound


def brute_p_value(r, v, epsilon, m, delta, number=float):
    """The theorem's right-hand side summed term by term from math.comb, in `number`
    arithmetic (Fraction: exact, for q = the float 1 / (1 + e^-ε))."""
    q = number(1) / (1 + number(math.exp(-epsilon)))
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    tails = [sum(pmf[u:], number(0)) for u in range(r + 1)]  # P[Binomial(r, q) >= u]
    bound = tails[v]
    if v > 0:
        bound += 2 * m * number(delta) * max((tails[v - i] - tails[v]) / i for i in range(1, v + 1))
    return float(min(bound, number(1)))


@pytest.mark.parametrize(("r", "v", "epsilon", "m", "delta"), [
    (10, 10, 0.5, 10, 0.0), (20, 17, 1.3, 40, 1e-3), (30, 5, 2.0, 30, 1e-2),
    (40, 36, 3.0, 100, 1e-4), (25, 0, 1.0, 25, 1e-3), (12, 12, 8.0, 12, 0.04),
])  # fmt: skip
def test_p_value_matches_exact_binomial_sums(r, v, epsilon, m, delta):
    got = p_value(r, v, epsilon, num_canaries=m, delta=delta)
    exact = brute_p_value(r, v, epsilon, m, delta, number=Fraction)
    assert got == pytest.approx(exact, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("r", "v", "m", "delta"), [(30, 27, 30, 0.0), (40, 37, 200, 1e-4)])
def test_lower_bound_matches_brute_force_scan(r, v, m, delta):
    """The bound is the edge of the set of ε rejected by the brute-force p-value on a grid."""
    grid = np.arange(0.0, 8.0, 1e-3)
    rejected = [e for e in grid if brute_p_value(r, v, e, m, delta) < LEVEL]
    bound = epsilon_lower_bound(r, v, num_canaries=m, delta=delta, confidence=1 - LEVEL)
    assert rejected and rejected == list(grid[: len(rejected)])  # an interval [0, edge]
    assert rejected[-1] <= bound < rejected[-1] + 1e-3


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
def test_all_correct_pure_dp_is_closed_form(r):
    """δ = 0, v = r: p-value expit(ε)^r, so the bound is logit(level^(1/r)) (0 if negative:
    one right guess proves nothing)."""
    bound = epsilon_lower_bound(r, r, num_canaries=r, delta=0.0, confidence=1 - LEVEL)
    assert bound == pytest.approx(max(0.0, special.logit(LEVEL ** (1 / r))), rel=1e-7)


def test_chance_level_gives_zero_and_bound_grows_with_correct_guesses():
    r, m = 200, 400
    bounds = [epsilon_lower_bound(r, v, num_canaries=m, delta=DELTA) for v in range(r + 1)]
    assert all(b == 0.0 for b in bounds[: r // 2 + 1])  # at most half right: nothing
    assert all(b1 <= b2 for b1, b2 in itertools.pairwise(bounds))
    assert bounds[-1] > bounds[-2] > bounds[150] > 0.0
    # δ and a higher confidence can only lower it.
    assert epsilon_lower_bound(r, 180, num_canaries=m, delta=0.0) > bounds[180]
    assert epsilon_lower_bound(r, 180, num_canaries=m, delta=DELTA, confidence=0.99) < bounds[180]


@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0, 2.0])
def test_bound_exceeds_true_epsilon_with_probability_at_most_one_minus_confidence(epsilon):
    """ε-DP randomized response (each guess right with probability expit(ε), the extremal
    ε-DP guesser): P[bound > ε] computed exactly over W ~ Binomial(r, expit(ε)) is <= 5%, and
    not far below it (the test is exact for this mechanism)."""
    r = 60
    bounds = np.array([epsilon_lower_bound(r, v, num_canaries=r, delta=0.0) for v in range(r + 1)])
    pmf = stats.binom.pmf(np.arange(r + 1), r, special.expit(epsilon))
    false_alarm = pmf[bounds > epsilon].sum()
    assert 0.005 < false_alarm <= LEVEL


def test_bound_argument_checks():
    with pytest.raises(ValueError, match="num_correct <= num_guesses <= num_canaries"):
        epsilon_lower_bound(10, 11, num_canaries=20, delta=DELTA)
    with pytest.raises(ValueError, match="got 5, 10, 9"):
        epsilon_lower_bound(10, 5, num_canaries=9, delta=DELTA)
    with pytest.raises(ValueError, match="num_guesses must be an int"):
        epsilon_lower_bound(10.0, 5, num_canaries=20, delta=DELTA)
    with pytest.raises(ValueError, match="delta must be in"):
        epsilon_lower_bound(10, 5, num_canaries=20, delta=1.0)
    with pytest.raises(ValueError, match="confidence must be in"):
        epsilon_lower_bound(10, 5, num_canaries=20, delta=DELTA, confidence=1.0)
    with pytest.raises(TypeError, match="delta must be a number"):
        epsilon_lower_bound(10, 5, num_canaries=20, delta="0")
    with pytest.raises(ValueError, match="epsilon must be a number >= 0"):
        p_value(10, 5, -1.0, num_canaries=20, delta=DELTA)


# ---------------------------------------------------------------- guesses from scores


def test_perfect_scores_pay_for_the_search():
    """Scores that rank every canary right: the best test is the largest guess count, at the
    Bonferroni level (1 - confidence) / tests. (Exactly 50 of 100 included, so that the top 50
    can all be right.)"""
    rng = np.random.default_rng(0)
    included = rng.permutation(np.arange(100) < 50)
    scores = included + rng.random(100) * 0.5
    result = audit_scores(scores, included, delta=DELTA)
    tests = len(default_guess_counts(100))
    assert result.tests == tests and result.statistic == "score"
    assert (result.k_plus, result.k_minus) == (50, 50) and result.correct == result.guesses
    assert result.epsilon_lower_bound == epsilon_lower_bound(
        100, 100, num_canaries=100, delta=DELTA, confidence=1 - LEVEL / tests
    )
    two = audit_scores({"a": scores, "b": -scores}, included, delta=DELTA, guess_counts=[(50, 50)])
    assert two.statistic == "a" and two.tests == 2
    assert two.epsilon_lower_bound == epsilon_lower_bound(
        100, 100, num_canaries=100, delta=DELTA, confidence=1 - LEVEL / 2
    )


def test_guesses_top_and_bottom_scores():
    included = np.array([True, False, True, False, True, False])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    # top 2 (canaries 0, 1): one right; bottom 3 (canaries 5, 4, 3): two right.
    result = audit_scores(scores, included, delta=0.0, guess_counts=[(2, 3)])
    assert (result.guesses, result.correct) == (5, 3)
    # Ties are broken by index: constant scores guess the last k_plus "in", the first k_minus
    # "out".
    result = audit_scores(np.zeros(6), included, delta=0.0, guess_counts=[(1, 2)])
    assert (result.guesses, result.correct) == (3, 1)
    anti = audit_scores(-scores, included, delta=DELTA, guess_counts=[(3, 3)])
    assert anti.epsilon_lower_bound == 0.0


def test_score_argument_checks():
    included = np.array([True, False, True])
    with pytest.raises(ValueError, match="included must be a non-empty 1-D bool array"):
        audit_scores(np.zeros(3), np.array([1, 0, 1]), delta=DELTA)
    with pytest.raises(ValueError, match=r"scores\['score'\] must have shape \(3,\)"):
        audit_scores(np.zeros(4), included, delta=DELTA)
    with pytest.raises(ValueError, match="must be finite"):
        audit_scores({"s": [0.0, np.nan, 1.0]}, included, delta=DELTA)
    with pytest.raises(ValueError, match="guess_counts must be"):
        audit_scores(np.zeros(3), included, delta=DELTA, guess_counts=[(2, 2)])
    with pytest.raises(ValueError, match="at least one statistic"):
        audit_scores({}, included, delta=DELTA)


# ---------------------------------------------------------------- canaries and scores


def test_dirac_canaries_have_distinct_one_coordinate_gradients():
    canaries = dirac_canaries(4, 3, 12, norm=2.5)
    layer = nn.Linear(4, 3, bias=False)
    grads = []
    for i in range(len(canaries)):
        layer.zero_grad()
        x, u = canaries[i]
        dirac_loss(layer, (x[None], u[None])).sum().backward()
        grads.append(layer.weight.grad.clone())
    grads = torch.stack(grads).flatten(1)
    assert torch.equal(grads.abs().amax(1), torch.full((12,), 2.5))
    assert torch.equal(torch.count_nonzero(grads, dim=1), torch.ones(12, dtype=torch.long))
    assert torch.equal(grads.argmax(1), torch.arange(12))  # coordinate i for canary i
    with pytest.raises(ValueError, match="each canary needs its own coordinate"):
        dirac_canaries(4, 3, 13, norm=1.0)
    with pytest.raises(ValueError, match="norm must be a finite number > 0"):
        dirac_canaries(4, 3, 2, norm=0.0)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def cross_entropy_losses(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def test_scores_are_inner_products_with_the_clipped_canary_gradients():
    """A non-linear model, no noise, one step: each canary's score is ⟨release, clip(g_i)⟩ with
    release = Σ_{included} clip(g_j) / N (N counts the inert excluded rows), from per-example
    gradients computed one by one with autograd."""
    torch.manual_seed(1)
    canaries = TensorDataset(torch.randn(6, 3) * 3, torch.randint(0, 2, (6,)))
    model = TwoLayer()
    grads = []
    for x, y in canaries:
        model.zero_grad()
        cross_entropy_losses(model, (x[None], y[None])).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    grads = torch.stack(grads)
    clip = grads.norm(dim=1).median().item()  # clips some canaries, not others
    clipped = grads * torch.clamp(clip / grads.norm(dim=1, keepdim=True), max=1.0)
    result = audit_one_run(
        TwoLayer,
        canaries,
        cross_entropy_losses,
        steps=1,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        delta=DELTA,
        guess_counts=[(1, 1)],
    )
    release = clipped[torch.from_numpy(result.included)].sum(0) / len(canaries)
    expected = (clipped @ release).numpy()
    # The engine's clip factors come from certified bounds, within ~1e-5 of the exact norms
    # (docs/threat_model.md §2b): a score that is a small difference of terms moves by
    # about 1e-5 of the largest one.
    atol = 2e-5 * float(np.abs(expected).max())
    np.testing.assert_allclose(result.scores["sum"], expected, rtol=1e-4, atol=atol)
    assert math.isinf(result.claimed_epsilon) and not result.violates_claim


def test_audit_argument_checks():
    canaries = dirac_canaries(2, 2, 4, norm=1.0)
    make = lambda: nn.Linear(2, 2, bias=False)
    run = dict(steps=1, noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA)
    with pytest.raises(ValueError, match="loss_fn must return one loss per example"):
        audit_one_run(make, canaries, lambda model, b: dirac_loss(model, b).mean(), **run)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        audit_one_run(make, canaries, dirac_loss, **{**run, "steps": 0})
    with pytest.raises(ValueError, match="sample_rate must be in"):
        audit_one_run(make, canaries, dirac_loss, sample_rate=0.0, **run)
    with pytest.raises(ValueError, match="at least one example"):
        audit_one_run(make, TensorDataset(torch.zeros(0, 2), torch.zeros(0, 2)), dirac_loss, **run)
    model = make()
    with pytest.raises(ValueError, match="must build a new model at each call"):
        audit_one_run(lambda: model, canaries, dirac_loss, **run)
    with pytest.raises(ValueError, match="guess_counts must be"):
        audit_one_run(make, canaries, dirac_loss, guess_counts=[(3, 2)], **run)
    with pytest.raises(TypeError, match=r"make_model must return an nn\.Module"):
        audit_one_run(lambda: None, canaries, dirac_loss, **run)


# ---------------------------------------------------------------- the real and broken mechanisms


def spy(monkeypatch, owner, name, change=None):
    """Replace owner.name by a wrapper that counts its calls (and applies `change` to its
    arguments): proof that the audited run went through it."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if change is not None:
            args, kwargs = change(args, kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def scale_noise(factor):
    def change(args, kwargs):
        x, std = args
        return (x, std * factor), kwargs

    return change


def reuse_noise():
    key = secrets.randbits(63)  # one draw, the same noise at every step

    def change(args, kwargs):
        return args, {**kwargs, "seed": key}

    return change


def no_clipping(args, kwargs):
    clipper, sq_norms, _threshold, scale = args
    return (clipper, sq_norms, math.inf, scale), kwargs


# Full batches: m = 400 canaries in a 32×32 bias-free layer, one step, z = 2 (ε = 1.99).
FULL_BATCH = dict(count=400, steps=1, sample_rate=1.0, noise_multiplier=2.0)
# Poisson sampling: m = 128, q = 1/2, 8 steps, z = 4 (ε = 1.48).
POISSON = dict(count=128, steps=8, sample_rate=0.5, noise_multiplier=4.0)


# CPU: the kernels through the interpreter (the reference twins with TRITON_INTERPRET=0);
# CUDA: the compiled kernels.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def audit(device, count, **run):
    return audit_one_run(
        lambda: nn.Linear(32, 32, bias=False, device=device),
        dirac_canaries(32, 32, count, norm=10.0),
        dirac_loss,
        max_grad_norm=1.0,
        delta=DELTA,
        **run,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("settings", [FULL_BATCH, POISSON], ids=["full-batch", "poisson"])
def test_real_mechanism_stays_below_the_claimed_epsilon(monkeypatch, settings, device):
    noise_calls = spy(monkeypatch, DF, "add_gaussian_noise_")
    clip_calls = spy(monkeypatch, clipping_module.Clipper, "_factors")
    result = audit(device, **settings)
    assert len(noise_calls) == settings["steps"] and len(clip_calls) >= settings["steps"]
    assert result.sample_rate == settings["sample_rate"]
    assert result.claimed_epsilon < 2.0
    assert not result.violates_claim, (
        f"the audit bounds ε >= {result.epsilon_lower_bound:.3f} above the claimed "
        f"{result.claimed_epsilon:.3f}: the release path leaks more than it claims"
    )


@pytest.mark.parametrize(
    ("settings", "owner", "name", "change"),
    [
        (FULL_BATCH, DF, "add_gaussian_noise_", scale_noise(0.1)),
        (FULL_BATCH, clipping_module.Clipper, "_factors", no_clipping),
        (POISSON, DF, "add_gaussian_noise_", reuse_noise()),
    ],
    ids=["noise-scaled-by-0.1", "clipping-disabled", "noise-reused-across-steps"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_broken_mechanism_exceeds_the_claimed_epsilon(
    monkeypatch, settings, owner, name, change, device
):
    calls = spy(monkeypatch, owner, name, change)
    # The unrounded release: secure_mode's grid (σ/2 here, twice a canary's clipped signal)
    # hides a reused noise draw from an audit this small; the mechanism is broken either way.
    result = audit(device, **settings, secure_mode=False)
    assert len(calls) >= settings["steps"]  # the broken function is on the release path
    assert result.violates_claim, (
        f"a broken mechanism went undetected: bound {result.epsilon_lower_bound:.3f} <= "
        f"claimed {result.claimed_epsilon:.3f}"
    )
