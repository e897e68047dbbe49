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

Layout: `bound` holds the theorem (p_value, epsilon_lower_bound), `scores` the tests on canary
scores (audit_scores), `canaries` the Dirac canaries, and `one_run` the training run that
scores them (audit_one_run); their public names are all importable from dp_attn.audit.
"""

from dp_attn.audit.bound import epsilon_lower_bound, p_value
from dp_attn.audit.canaries import dirac_canaries, dirac_loss
from dp_attn.audit.one_run import AuditResult, audit_one_run
from dp_attn.audit.scores import ScoreAudit, audit_scores, default_guess_counts

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
