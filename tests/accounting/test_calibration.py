"""Calibration: the noise multiplier for a target ε, and the steps a budget allows."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_attn.accounting import calibrate_noise_multiplier, calibrate_steps, make_accountant


def epsilon(name, z, q, count, delta):
    acc = make_accountant(name)
    acc.step(noise_multiplier=z, sample_rate=q, count=count)
    return acc.epsilon(delta)


@settings(max_examples=6, deadline=None)
@given(
    st.sampled_from(["rdp", "prv"]),
    st.floats(0.3, 10.0),
    st.sampled_from([1e-5, 1e-7]),
    st.floats(1e-3, 0.5),
    st.integers(10, 20000),
)
def test_calibrated_noise_meets_its_target(name, target, delta, q, steps):
    z = calibrate_noise_multiplier(target, delta, q, steps, accountant=name)
    assert 0.99 * target <= epsilon(name, z, q, steps, delta) <= target
    # and it is nearly the least noise that does: 1% less overspends.
    assert epsilon(name, 0.99 * z, q, steps, delta) > target


def test_calibration_for_the_reference_setting():
    """ε = 3, δ = 1e-5, q = 0.01, T = 1e4: PRV needs less noise than RDP for the same ε."""
    prv = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 10000)
    rdp = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 10000, accountant="rdp")
    assert prv < rdp
    assert epsilon("prv", prv, 0.01, 10000, 1e-5) <= 3.0


@pytest.mark.parametrize("name", ["rdp", "prv"])
@pytest.mark.parametrize("z, q, target, delta", [(1.1, 0.01, 2.0, 1e-5), (3.0, 0.2, 1.0, 1e-6)])
def test_calibrated_steps_are_the_largest_within_budget(name, z, q, target, delta):
    steps = calibrate_steps(z, q, target, delta, accountant=name)
    assert steps > 0
    assert epsilon(name, z, q, steps, delta) <= target < epsilon(name, z, q, steps + 1, delta)


def test_calibrated_steps_zero_when_one_step_overspends():
    assert calibrate_steps(0.5, 0.5, 0.1, 1e-5) == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 10.5}, "steps"),
        ({"accountant": "gdp"}, "accountant"),
    ],
)
def test_calibrate_noise_multiplier_rejects_bad_arguments(kwargs, name):
    args = {"target_epsilon": 3.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        calibrate_noise_multiplier(**args)


def test_calibrate_steps_rejects_bad_arguments():
    with pytest.raises(ValueError, match="noise_multiplier"):
        calibrate_steps(-1.0, 0.01, 3.0, 1e-5)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_steps(1.0, 0.01, -3.0, 1e-5)
    with pytest.raises(ValueError, match="accountant"):
        calibrate_steps(1.0, 0.01, 3.0, 1e-5, accountant="gdp")
