"""One-run empirical privacy audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One
(1) Training Run", arXiv:2305.08846) with white-box gradient canaries.

    result = audit_one_run(
        lambda: nn.Linear(32, 32, bias=False), dirac_canaries(32, 32, 1000, norm=10.0),
        dirac_loss, steps=1, noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-5)
    result.epsilon_lower_bound <= result.claimed_epsilon  # else: the run is not private

The game. m canary examples are each included in the training set independently with
probability 1/2 (S_i ~ Bernoulli(1/2), drawn from the OS CSPRNG). The model is trained once
with PrivacyEngine: the real release path (Poisson sampling, per-example clipping, noise,
normalisation). An auditor who sees every released gradient scores each canary and guesses
"included" for the k+ highest scores and "excluded" for the k- lowest, abstaining on the rest.
If the run is (ε, δ)-DP with respect to adding or removing one example, the number W of correct
guesses among r = k+ + k- satisfies, for every v (the paper's main theorem for (ε, δ)-DP),

    P[W >= v] <= f(v) + 2·m·δ · max_{1<=i<=v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, e^ε / (1 + e^ε)) >= u].

So observing v correct guesses rejects "(ε, δ)-DP" at level 1 - confidence when the right-hand
side is below 1 - confidence; the largest rejected ε is an empirical lower bound on the run's ε
that holds with probability >= confidence. It can catch a bug (a bound above the accountant's
ε means the implementation leaks more than it claims); it can never prove privacy.

Excluded canaries stay in the training set as inert rows whose loss is multiplied by 0: their
per-example gradient is exactly 0, so the run's output is distributed exactly as if they were
absent, while the dataset size, hence the sampling rate and the normalisation q·N, does not
depend on S (it would otherwise leak |S| and leave the accountant's analysis).

Scores are post-processing of the released gradients only. At step t the auditor, who knows
the public parameters θ_t and the canaries, computes each canary's gradient g_i(θ_t), clips it
to max_grad_norm as flat clipping would, and takes the inner product y_{i,t} with the released
(noised, normalised) gradient of that step. Two statistics of y_{i,·} are tested:
- "sum": Σ_t y_{i,t}, the natural detector of a canary's contribution under fresh noise;
- "variation": Σ_t (y_{i,t} - y_{i,t-1})², which separates canaries whose signal moves between
  steps (Poisson sampling) from those whose signal is constant: it catches noise that is not
  fresh at every step. Only tested when there are at least two steps.
The guess counts (k+, k-) come from a grid fixed before the run (default k+ = k- = m/32, m/16,
..., m/2). Every (statistic, guess counts) pair is one test; each is run at level
(1 - confidence) / (number of tests) (Bonferroni), so the largest of their bounds is a valid
lower bound at the stated confidence: the search over k and statistics is paid for.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special, stats
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.dataloader import default_collate

__all__ = [
    "AuditResult",
    "ScoreAudit",
    "audit_one_run",
    "audit_scores",
    "default_guess_counts",
    "dirac_canaries",
    "dirac_loss",
    "epsilon_lower_bound",
    "p_value",
]

# Bisection on ε stops when the bracket is this narrow.
_EPSILON_TOLERANCE = 1e-9


# ---------------------------------------------------------------- the bound


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_counts(num_guesses, num_correct, num_canaries) -> None:
    for name, value in (
        ("num_guesses", num_guesses), ("num_correct", num_correct), ("num_canaries", num_canaries)
    ):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            "need num_correct <= num_guesses <= num_canaries, got "
            f"{num_correct}, {num_guesses}, {num_canaries}"
        )


def _check_probability(name: str, value, *, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
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


# ---------------------------------------------------------------- guesses from scores


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


def _guess_counts(guess_counts, m: int) -> list[tuple[int, int]]:
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
    included,
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
    checked = {}
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

    best = None
    for name, values in checked.items():
        ranked = included[np.argsort(values, kind="stable")]  # lowest score first
        for k_plus, k_minus in counts:
            correct = int(ranked[m - k_plus :].sum()) + int((~ranked[:k_minus]).sum())
            r = k_plus + k_minus
            bound = _epsilon_lower_bound(r, correct, m, delta, level)
            if best is None or bound > best.epsilon_lower_bound:
                best = ScoreAudit(
                    epsilon_lower_bound=bound, statistic=name, k_plus=k_plus, k_minus=k_minus,
                    guesses=r, correct=correct, tests=len(checked) * len(counts),
                    num_canaries=m, delta=delta, confidence=float(confidence),
                )
    return best


# ---------------------------------------------------------------- canaries


def dirac_canaries(
    in_features: int, out_features: int, count: int, *, norm: float
) -> TensorDataset:
    """`count` Dirac canaries for a bias-free linear layer nn.Linear(in_features, out_features,
    bias=False), to be used with `dirac_loss`.

    Canary i is the input norm·e_j with output direction e_k, (k, j) = divmod(i, in_features):
    its per-example weight gradient is norm·e_k e_jᵀ, a different coordinate for every canary,
    of norm `norm` (choose norm >= max_grad_norm, so that clipping scales every canary to
    exactly max_grad_norm). Needs count <= in_features·out_features.
    """
    for name, value in (("in_features", in_features), ("out_features", out_features),
                        ("count", count)):  # fmt: skip
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if count > in_features * out_features:
        raise ValueError(
            f"count ({count}) exceeds the number of weight coordinates "
            f"({in_features}·{out_features}): each canary needs its own coordinate"
        )
    if isinstance(norm, bool) or not isinstance(norm, (int, float)):
        raise TypeError(f"norm must be a number, got {type(norm).__name__}")
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"norm must be a finite number > 0, got {norm}")
    index = torch.arange(count)
    inputs = torch.zeros(count, in_features)
    inputs[index, index % in_features] = float(norm)
    directions = torch.zeros(count, out_features)
    directions[index, index // in_features] = 1.0
    return TensorDataset(inputs, directions)


def dirac_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-example loss ⟨model(x), u⟩ of (inputs x, output directions u) batches: its gradient
    with respect to the layer's output is u, whatever the parameters."""
    inputs, directions = batch
    return (model(inputs) * directions).sum(-1)


class _AuditSet(Dataset):
    """The training set of the audit: the data (weight 1), then every canary with weight 1 if
    included and 0 if not. A weight-0 row is inert: its per-example gradient is exactly 0."""

    def __init__(self, data, canaries, included: np.ndarray):
        self.data, self.canaries = data, canaries
        self.weights = torch.as_tensor(included, dtype=torch.float32)
        self.offset = 0 if data is None else len(data)

    def __len__(self) -> int:
        return self.offset + len(self.canaries)

    def __getitem__(self, i):
        if i < self.offset:
            return self.data[i], torch.tensor(1.0)
        return self.canaries[i - self.offset], self.weights[i - self.offset]


def _map_tensors(fn, batch):
    """`fn` applied to every tensor of a (nested) tuple, list or dict."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: _map_tensors(fn, v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        items = [_map_tensors(fn, v) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


class _LossOf(nn.Module):
    """loss_fn(model, batch) as a module, so that torch.func can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


# Per-canary gradients are formed for chunks of canaries of at most this many elements.
_CHUNK_ELEMENTS = 1 << 24


def _canary_signals(probe, names, canary_batch, count, release, max_grad_norm) -> np.ndarray:
    """⟨release, clip(g_i)⟩ for every canary i, with g_i its gradient at the probe's parameters
    (the parameters the step's gradients were computed at), clipped to max_grad_norm."""
    params = dict(probe.model.named_parameters())
    params = {n: params[n].detach() for n in names}

    def canary_loss(params, example):
        batch = _map_tensors(lambda t: t.unsqueeze(0), example)
        losses = functional_call(probe, {f"model.{n}": p for n, p in params.items()}, (batch,))
        return losses.sum()

    per_canary = vmap(grad(canary_loss), in_dims=(None, 0))
    chunk = max(1, _CHUNK_ELEMENTS // release.numel())
    signals = []
    for start in range(0, count, chunk):
        rows = slice(start, start + chunk)
        part = _map_tensors(lambda t, rows=rows: t[rows], canary_batch)
        grads = per_canary(params, part)
        flat = torch.cat([grads[n].flatten(1).float() for n in names], dim=1)
        factors = torch.clamp(max_grad_norm / flat.norm(dim=1), max=1.0)
        signals.append((flat @ release) * factors)
    return torch.cat(signals).double().cpu().numpy()


# ---------------------------------------------------------------- the audit


@dataclass(frozen=True, eq=False)
class AuditResult(ScoreAudit):
    """A one-run audit (see ScoreAudit for the test fields).

    claimed_epsilon: what the engine's accountant reports for the run at `delta`.
    violates_claim: epsilon_lower_bound > claimed_epsilon: with probability >= confidence the
        run is not as private as claimed (a bug, or an accountant that is not an upper bound).
    included: which canaries were in the training set; scores: {statistic: [m] scores};
    sample_rate: the Poisson rate the engine used (batch size / dataset size).
    """

    claimed_epsilon: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    included: np.ndarray
    scores: dict[str, np.ndarray]

    @property
    def violates_claim(self) -> bool:
        return self.epsilon_lower_bound > self.claimed_epsilon


def audit_one_run(
    make_model: Callable[[], nn.Module],
    canaries: Dataset,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    steps: int,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    sample_rate: float = 1.0,
    clipping: str = "flat",
    data: Dataset | None = None,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    accountant: str = "prv",
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
    secure_mode: bool = True,
) -> AuditResult:
    """Audit PrivacyEngine on your model with one training run; see the module docstring.

    make_model: builds the model (plain torch.nn layers that make_private converts, on the
        device to train on); called twice: the trained model, and a probe that computes the
        canaries' gradients with torch.func.
    canaries: a map-style dataset of m canary examples; each is included with probability 1/2.
    loss_fn(model, batch): the per-example losses [B] of a collated batch of examples.
    data: other training examples (same structure as the canaries), always included.
    steps, noise_multiplier, max_grad_norm, clipping, accountant, secure_mode: the run, as
        make_private takes them; max_grad_norm must be a number. sample_rate: the Poisson rate; the
        engine uses batch_size / N with batch_size = round(sample_rate·N), N = len(data) + m.
    make_optimizer: params -> optimizer (default SGD, lr 0.1).
    delta, confidence, guess_counts: the test (see audit_scores).
    """
    from .engine import PrivacyEngine  # the engine imports the kernels: only when auditing

    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
        raise TypeError(f"sample_rate must be a number, got {type(sample_rate).__name__}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(f"max_grad_norm must be a number, got {type(max_grad_norm).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    m = len(canaries)
    if m < 1:
        raise ValueError("canaries must hold at least one example")
    delta = _check_probability("delta", delta, low_open=False)
    _check_probability("confidence", confidence)
    guess_counts = _guess_counts(guess_counts, m)

    # S: the secret coin flips, from the OS CSPRNG.
    included = np.unpackbits(np.frombuffer(secrets.token_bytes((m + 7) // 8), np.uint8))
    included = included[:m].astype(bool)
    train_set = _AuditSet(data, canaries, included)
    batch_size = max(1, round(sample_rate * len(train_set)))

    model, probe = make_model(), make_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_model must return an nn.Module, got {type(model).__name__}")
    if {id(p) for p in model.parameters()} & {id(p) for p in probe.parameters()}:
        raise ValueError(
            "make_model must build a new model at each call: the audit needs a second copy "
            "(the probe) that the engine does not convert"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model from make_model has no trainable parameters")
    device = params[0].device
    optimizer = (make_optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.1)))(model.parameters())
    engine = PrivacyEngine(accountant=accountant)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(train_set, batch_size=batch_size),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, clipping=clipping,
        secure_mode=secure_mode,
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    private = dict(model.named_parameters())
    probe = _LossOf(probe.eval(), loss_fn)
    canary_batch = _map_tensors(
        lambda t: t.to(device), default_collate([canaries[i] for i in range(m)])
    )

    signals = np.zeros((steps, m))
    step = 0
    while step < steps:
        for batch, weights in loader:
            if step == steps:
                break
            batch = _map_tensors(lambda t: t.to(device), batch)
            probe.model.load_state_dict(model.state_dict())  # θ_t, before the update
            optimizer.zero_grad()
            losses = loss_fn(model, batch)
            if not isinstance(losses, torch.Tensor) or losses.shape != weights.shape:
                raise ValueError(
                    "loss_fn must return one loss per example, a tensor of shape "
                    f"{tuple(weights.shape)}, got "
                    f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else losses!r}"
                )
            (losses * weights.to(losses)).mean().backward()
            optimizer.step()
            release = torch.cat([private[n].grad.flatten().float() for n in names])
            signals[step] = _canary_signals(
                probe, names, canary_batch, m, release, float(max_grad_norm)
            )
            step += 1

    scores = {"sum": signals.sum(0)}
    if steps >= 2:
        scores["variation"] = np.square(np.diff(signals, axis=0)).sum(0)
    best = audit_scores(
        scores, included, delta=delta, confidence=confidence, guess_counts=guess_counts
    )
    return AuditResult(
        **vars(best),
        claimed_epsilon=engine.get_epsilon(delta),
        steps=steps,
        sample_rate=loader.sample_rate,
        noise_multiplier=float(noise_multiplier),
        included=included,
        scores=scores,
    )
