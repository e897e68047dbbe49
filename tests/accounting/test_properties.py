"""Properties both accountants must have, on random settings (hypothesis): ε falls with more
noise and rises with the sampling rate and the number of steps; δ(ε(δ)) gives δ back."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dp_attn.accounting import make_accountant

noise = st.floats(0.5, 8.0)
rate = st.floats(1e-3, 1.0)
steps = st.integers(1, 20000)
deltas = st.sampled_from([1e-4, 1e-5, 1e-6, 1e-8])
names = st.sampled_from(["rdp", "prv"])


def epsilon(name, z, q, count, delta):
    acc = make_accountant(name)
    acc.step(noise_multiplier=z, sample_rate=q, count=count)
    return acc.epsilon(delta)


@settings(max_examples=15, deadline=None)
@given(names, noise, rate, steps, deltas)
def test_epsilon_falls_as_noise_grows(name, z, q, count, delta):
    assert epsilon(name, z * 1.05, q, count, delta) <= epsilon(name, z, q, count, delta)


@settings(max_examples=15, deadline=None)
@given(names, noise, rate, steps, deltas)
def test_epsilon_rises_with_the_sampling_rate(name, z, q, count, delta):
    assume(q < 0.95)
    assert epsilon(name, z, q, count, delta) <= epsilon(name, z, q * 1.05, count, delta)


@settings(max_examples=15, deadline=None)
@given(names, noise, rate, steps, deltas)
def test_epsilon_rises_with_the_number_of_steps(name, z, q, count, delta):
    assert epsilon(name, z, q, count, delta) <= epsilon(name, z, q, count + 1 + count // 20, delta)


@settings(max_examples=15, deadline=None)
@given(names, noise, rate, steps, deltas)
def test_delta_of_epsilon_gives_delta_back(name, z, q, count, delta):
    acc = make_accountant(name)
    acc.step(noise_multiplier=z, sample_rate=q, count=count)
    eps = acc.epsilon(delta)
    assume(eps > 0)  # at ε = 0 the curve is flat: any smaller δ also has ε = 0
    assert acc.delta(eps) == pytest.approx(delta, rel=1e-2)
