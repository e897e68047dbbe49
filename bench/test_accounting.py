"""Privacy accounting speed and tightness against dp-accounting, Opacus and prv-accountant (CPU).

Three queries, each answered by every library that can:

    single      ε of 1e5 steps of one regime (z = 1.1, q = 256/60000, δ = 1e-5)
    hetero      ε of a 3-regime history (2000 + 3000 + 5000 steps), δ = 1e-5
    calibrate   the noise multiplier for ε = 3 at δ = 1e-5, q = 0.01, 1e4 steps
    ramp        ε of 1000 distinct steps, z ramping 0.8 → 1.2 at q = 0.01 (δ = 1e-5)
    ramp10k     the same ramp over 10,000 distinct steps (ours only)
    every step  ε after each of the ramp's first 200 steps (ours: one accountant, stepped)

Ours run cold (caches cleared before each round). Every result stores its ε (or z) in the
benchmark JSON's extra_info, and a table of times, time ratios against ours and ε against
ours is printed at the end. Upper bounds: ours (both), prv-accountant's and Opacus PRV's
upper end, dp-accounting's pessimistic PLD; RDP values are upper bounds too. For the noise
multiplier, smaller at the same ε is tighter.

    python -m pytest bench/test_accounting.py --benchmark-json=out.json
"""

from __future__ import annotations

import importlib
import math
import time

import numpy as np
import pytest

from dp_attn.accounting import calibrate_noise_multiplier, make_accountant, prv, rdp


def optional(name):
    """A baseline library, or None where it is not installed (its cases are then skipped).
    Imported up front so that no timing includes an import."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def need(module, name):
    if module is None:
        pytest.skip(f"{name} is not installed")
    return module


dp_accounting = optional("dp_accounting")
opacus_accountants = optional("opacus.accountants")
opacus_utils = optional("opacus.accountants.utils")
prv_accountant = optional("prv_accountant")

SINGLE = ([(1.1, 256 / 60000, 100_000)], 1e-5)
HETERO = ([(1.0, 0.01, 2000), (2.0, 0.02, 3000), (0.8, 0.005, 5000)], 1e-5)
CALIBRATE = (3.0, 1e-5, 0.01, 10_000)  # target ε, δ, q, steps
RAMP = ([(float(z), 0.01, 1) for z in np.linspace(0.8, 1.2, 1000)], 1e-5)
RAMP10K = ([(float(z), 0.01, 1) for z in np.linspace(0.8, 1.2, 10_000)], 1e-5)
QUERIES = {"single": SINGLE, "hetero": HETERO, "ramp": RAMP, "ramp10k": RAMP10K}
RESULTS: dict[str, dict[str, tuple[float, float]]] = {}  # query -> provider -> (s, ε or z)


def cold() -> None:
    prv._discretise.cache_clear()
    prv._step_moments.cache_clear()
    prv._step_log_mgf.cache_clear()
    prv._step_range.cache_clear()
    rdp._rdp_of_regime.cache_clear()


def ours(name):
    def epsilon(history, delta):
        acc = make_accountant(name)
        for z, q, steps in history:
            acc.step(noise_multiplier=z, sample_rate=q, count=steps)
        return acc.epsilon(delta)

    return epsilon


def dp_accounting_epsilon(kind):
    def epsilon(history, delta):
        need(dp_accounting, "dp-accounting")
        event = dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t
                )
                for z, q, t in history
            ]
        )
        make = {"pld": dp_accounting.pld.PLDAccountant, "rdp": dp_accounting.rdp.RdpAccountant}
        acc = make[kind]()
        acc.compose(event)
        return acc.get_epsilon(delta)

    return epsilon


def opacus_epsilon(kind):
    def epsilon(history, delta):
        accountants = need(opacus_accountants, "opacus")
        acc = {"rdp": accountants.RDPAccountant, "prv": accountants.PRVAccountant}[kind]()
        acc.history = list(history)
        return acc.get_epsilon(delta)

    return epsilon


def prv_accountant_epsilon(history, delta):
    need(prv_accountant, "prv-accountant")
    acc = prv_accountant.PRVAccountant(
        prvs=[
            prv_accountant.PoissonSubsampledGaussianMechanism(
                noise_multiplier=z, sampling_probability=q
            )
            for z, q, _ in history
        ],
        max_self_compositions=[t for _, _, t in history],
        eps_error=0.01,  # Opacus' choice
        delta_error=delta / 1000,
    )
    return acc.compute_epsilon(delta, [t for _, _, t in history])[2]  # the upper end


EPSILON_PROVIDERS = {
    "ours prv": (ours("prv"), 5),
    "ours rdp": (ours("rdp"), 5),
    "dp-accounting pld": (dp_accounting_epsilon("pld"), 2),
    "dp-accounting rdp": (dp_accounting_epsilon("rdp"), 2),
    "opacus prv": (opacus_epsilon("prv"), 2),
    "opacus rdp": (opacus_epsilon("rdp"), 2),
    "prv-accountant": (prv_accountant_epsilon, 1),
}


def timed(benchmark, function, args, rounds):
    """benchmark.pedantic, also keeping the mean time (for the table, and when the
    benchmark plugin is disabled)."""
    times = []

    def run(*args):
        start = time.perf_counter()
        value = function(*args)
        times.append(time.perf_counter() - start)
        return value

    value = benchmark.pedantic(run, args=args, setup=cold, rounds=rounds, iterations=1)
    return value, sum(times) / len(times)


def record(benchmark, query, provider, value, seconds, kind):
    benchmark.extra_info.update({"query": query, "provider": provider, kind: value})
    RESULTS.setdefault(query, {})[provider] = (seconds, value)


@pytest.mark.parametrize("provider", list(EPSILON_PROVIDERS))
@pytest.mark.parametrize("query", list(QUERIES))
def test_epsilon(benchmark, query, provider):
    function, rounds = EPSILON_PROVIDERS[provider]
    history, delta = QUERIES[query]
    if provider == "prv-accountant" and len(history) > 1:
        pytest.skip("prv-accountant composes distinct regimes pairwise: minutes here")
    if query == "ramp10k" and provider != "ours prv":
        pytest.skip("10,000 distinct steps: ours only (the others take many minutes)")
    if query == "ramp" and provider in ("dp-accounting pld", "opacus prv"):
        rounds = 1  # over a minute each
    value, seconds = timed(benchmark, function, (history, delta), rounds)
    record(benchmark, query, provider, value, seconds, "epsilon")


def ours_every_step(history, delta):
    """ε after each of the first 200 steps, the engine's way: one accountant, stepped."""
    acc = make_accountant("prv")
    for z, q, _ in history[:200]:
        acc.step(noise_multiplier=z, sample_rate=q)
        epsilon = acc.epsilon(delta)
    return epsilon


def test_epsilon_every_step(benchmark):
    value, seconds = timed(benchmark, ours_every_step, RAMP, 3)
    record(benchmark, "ramp", "ours every step", value, seconds, "epsilon")


def ours_calibration(name):
    return lambda: calibrate_noise_multiplier(*CALIBRATE, accountant=name)


def opacus_calibration(name):
    def calibrate():
        epsilon, delta, q, steps = CALIBRATE
        return need(opacus_utils, "opacus").get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=q,
            steps=steps,
            accountant=name,
        )

    return calibrate


def dp_accounting_calibration(kind):
    def calibrate():
        need(dp_accounting, "dp-accounting")
        epsilon, delta, q, steps = CALIBRATE
        make = {"pld": dp_accounting.pld.PLDAccountant, "rdp": dp_accounting.rdp.RdpAccountant}
        return dp_accounting.calibrate_dp_mechanism(
            make[kind],
            lambda z: dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
            ),
            epsilon,
            delta,
            dp_accounting.ExplicitBracketInterval(0.5, 5.0),
            tol=2e-3,
        )

    return calibrate


CALIBRATION_PROVIDERS = {
    "ours prv": (ours_calibration("prv"), 3),
    "ours rdp": (ours_calibration("rdp"), 3),
    "dp-accounting pld": (dp_accounting_calibration("pld"), 1),
    "dp-accounting rdp": (dp_accounting_calibration("rdp"), 1),
    "opacus prv": (opacus_calibration("prv"), 1),
    "opacus rdp": (opacus_calibration("rdp"), 1),
}


@pytest.mark.parametrize("provider", list(CALIBRATION_PROVIDERS))
def test_calibrate(benchmark, provider):
    function, rounds = CALIBRATION_PROVIDERS[provider]
    value, seconds = timed(benchmark, function, (), rounds)
    record(benchmark, "calibrate", provider, value, seconds, "noise_multiplier")
    # Whatever it claims, check the noise with our (certified) PRV accountant.
    epsilon, delta, q, steps = CALIBRATE
    certified = ours("prv")([(value, q, steps)], delta)
    benchmark.extra_info["our_prv_epsilon"] = certified
    assert certified <= epsilon * 1.01 or provider.startswith(("opacus", "dp-accounting"))


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request):
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print_table()


def print_table() -> None:
    for query, rows in RESULTS.items():
        if "ours prv" not in rows:
            continue
        base_s, base_v = rows["ours prv"]
        label = "z" if query == "calibrate" else "ε"
        print(f"\naccounting: {query}  (ratios against ours prv)")
        print(f"{'provider':<18} {'time':>9} {'time/ours':>10} {label:>9} {label + '/ours':>9}")
        for provider, (seconds, value) in rows.items():
            ratio = value / base_v if base_v and math.isfinite(value) else math.nan
            print(
                f"{provider:<18} {seconds * 1e3:7.1f}ms {seconds / base_s:10.2f} "
                f"{value:9.5f} {ratio:9.4f}"
            )
