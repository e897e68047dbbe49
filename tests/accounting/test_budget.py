"""The budget guard refuses exactly the step that would overspend, before it is taken."""

import pytest

from dp_attn.accounting import BudgetExceededError, PrivacyBudget, make_accountant

DELTA = 1e-5


def epsilon_after(name, steps):
    """ε of a fresh accountant after the given (z, q, count) steps."""
    acc = make_accountant(name)
    for z, q, count in steps:
        acc.step(noise_multiplier=z, sample_rate=q, count=count)
    return acc.epsilon(DELTA)


def target_between(name, steps_within, one_more):
    """A budget that `steps_within` fits and `one_more` exceeds (midway between the two)."""
    low, high = epsilon_after(name, steps_within), epsilon_after(name, one_more)
    assert low < high
    return (low + high) / 2


def run_until_refused(budget, z, q, limit=200):
    taken = 0
    while taken < limit:
        try:
            budget.check(noise_multiplier=z, sample_rate=q)
        except BudgetExceededError:
            return taken
        budget.accountant.step(noise_multiplier=z, sample_rate=q)
        taken += 1
    raise AssertionError("the budget never ran out")


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_refuses_exactly_the_step_that_would_overspend(name):
    z, q = 1.0, 0.05
    target = target_between(name, [(z, q, 25)], [(z, q, 26)])
    budget = PrivacyBudget(target, DELTA, name)
    assert run_until_refused(budget, z, q) == 25
    assert budget.spent() <= target
    assert budget.remaining_steps(z, q) == 0
    # Refusing did not change the ledger.
    assert budget.accountant.history[-1].count == 25


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_regime_changes_and_multi_step_checks(name):
    z1, z2, q = 1.0, 2.0, 0.05
    target = target_between(name, [(z1, q, 10), (z2, q, 40)], [(z1, q, 10), (z2, q, 41)])
    acc = make_accountant(name)
    budget = PrivacyBudget(target, DELTA, acc)
    assert budget.accountant is acc
    for _ in range(10):
        budget.check(z1, q)
        acc.step(noise_multiplier=z1, sample_rate=q)
    assert budget.remaining_steps(z2, q) == 40
    budget.check(z2, q, count=40)
    with pytest.raises(BudgetExceededError, match="exceed the budget"):
        budget.check(z2, q, count=41)
    acc.step(noise_multiplier=z2, sample_rate=q, count=39)
    budget.check(z2, q)
    with pytest.raises(BudgetExceededError):
        budget.check(z2, q, count=2)
    acc.step(noise_multiplier=z2, sample_rate=q)
    with pytest.raises(BudgetExceededError):
        budget.check(z2, q)
    budget.check(z2, q, count=0)  # taking nothing is always allowed


def test_budget_follows_a_reloaded_ledger():
    z, q = 1.0, 0.05
    target = target_between("prv", [(z, q, 25)], [(z, q, 26)])
    budget = PrivacyBudget(target, DELTA, "prv")
    assert budget.remaining_steps(z, q) == 25
    other = make_accountant("prv")
    other.step(noise_multiplier=z, sample_rate=q, count=20)
    budget.accountant.load_state_dict(other.state_dict())
    assert budget.remaining_steps(z, q) == 5


def test_error_type_and_bad_arguments():
    assert issubclass(BudgetExceededError, RuntimeError)
    with pytest.raises(ValueError, match="epsilon"):
        PrivacyBudget(-1.0, DELTA)
    with pytest.raises(ValueError, match="delta"):
        PrivacyBudget(1.0, 0.0)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyBudget(1.0, DELTA, "gdp")
    with pytest.raises(TypeError, match="accountant"):
        PrivacyBudget(1.0, DELTA, object())
    budget = PrivacyBudget(1.0, DELTA)
    with pytest.raises(ValueError, match="count"):
        budget.check(1.0, 0.01, count=-1)
    with pytest.raises(ValueError, match="sample_rate"):
        budget.check(1.0, 2.0)
    # ε = 0 allows no noisy step at all.
    with pytest.raises(BudgetExceededError):
        PrivacyBudget(0.0, DELTA).check(1.0, 0.01)
