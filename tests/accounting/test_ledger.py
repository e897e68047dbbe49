"""The ledger every accountant shares: Step records, merging, argument checks, edge cases,
saved state, the factory, and that dp_attn.accounting imports neither torch nor triton."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dp_attn.accounting import (
    PRVAccountant,
    RDPAccountant,
    Step,
    make_accountant,
)

ROOT = Path(__file__).resolve().parents[2]
ACCOUNTANTS = [RDPAccountant, PRVAccountant]


def test_step_is_immutable_and_normalised():
    s = Step(np.float32(1.5), 0.01, np.int64(3))
    assert (s.noise_multiplier, s.sample_rate, s.count) == (1.5, 0.01, 3)
    assert type(s.count) is int and type(s.noise_multiplier) is float
    with pytest.raises(AttributeError):
        s.count = 4


@pytest.mark.parametrize(
    "args, name",
    [
        ((-0.1, 0.01), "noise_multiplier"),
        ((math.inf, 0.01), "noise_multiplier"),
        ((math.nan, 0.01), "noise_multiplier"),
        ((1.0, 0.0), "sample_rate"),
        ((1.0, 1.5), "sample_rate"),
        ((1.0, -0.2), "sample_rate"),
        ((1.0, 0.01, -1), "count"),
        ((1.0, 0.01, 0), "count"),
        ((1.0, 0.01, 2.0), "count"),
        ((1.0, 0.01, True), "count"),
    ],
)
def test_step_rejects_bad_arguments_by_name(args, name):
    with pytest.raises(ValueError, match=name):
        Step(*args)


def test_step_rejects_non_numbers():
    with pytest.raises(TypeError, match="noise_multiplier"):
        Step("1.0", 0.1)


@pytest.mark.parametrize("cls", ACCOUNTANTS)
def test_history_merges_consecutive_identical_regimes(cls):
    acc = cls()
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, count=7)
    acc.step(noise_multiplier=2.0, sample_rate=0.01, count=2)
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, count=0)  # nothing
    assert acc.history == (Step(1.0, 0.01, 10), Step(2.0, 0.01, 2), Step(1.0, 0.01, 1))


@pytest.mark.parametrize("cls", ACCOUNTANTS)
def test_merged_and_unmerged_histories_give_the_same_epsilon(cls):
    merged, stepwise = cls(), cls()
    merged.step(noise_multiplier=1.2, sample_rate=0.02, count=40)
    for _ in range(40):
        stepwise.step(noise_multiplier=1.2, sample_rate=0.02)
    assert merged.epsilon(1e-5) == stepwise.epsilon(1e-5)


@pytest.mark.parametrize("cls", ACCOUNTANTS)
def test_zero_steps_and_noiseless_steps(cls):
    acc = cls()
    assert acc.epsilon(1e-5) == 0.0 and acc.delta(1.0) == 0.0
    acc.step(noise_multiplier=0.0, sample_rate=0.01)  # allowed, for ablations
    assert acc.epsilon(1e-5) == math.inf and acc.delta(5.0) == 1.0
    acc.step(noise_multiplier=1.0, sample_rate=0.01, count=10)
    assert acc.epsilon(1e-5) == math.inf


@pytest.mark.parametrize("cls", ACCOUNTANTS)
def test_full_batch_works(cls):
    acc = cls()
    acc.step(noise_multiplier=5.0, sample_rate=1.0, count=100)
    assert 9.99 < acc.epsilon(1e-5) < 11.0


@pytest.mark.parametrize("cls", ACCOUNTANTS)
def test_queries_reject_bad_arguments_by_name(cls):
    acc = cls()
    for bad in (0.0, 1.0, -1e-5, 2.0, math.nan):
        with pytest.raises(ValueError, match="delta"):
            acc.epsilon(bad)
    for bad in (-0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="epsilon"):
            acc.delta(bad)
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(noise_multiplier=1.0, sample_rate=0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.step(noise_multiplier=-1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="count"):
        acc.step(noise_multiplier=1.0, sample_rate=0.1, count=-2)
    with pytest.raises(ValueError, match="count"):
        acc.step(noise_multiplier=1.0, sample_rate=0.1, count=1.5)
    assert acc.history == ()


@pytest.mark.parametrize("source", ["rdp", "prv"])
@pytest.mark.parametrize("target", ["rdp", "prv"])
def test_state_round_trips_through_json(source, target):
    acc = make_accountant(source)
    acc.step(noise_multiplier=1.1, sample_rate=0.004, count=1000)
    acc.step(noise_multiplier=0.9, sample_rate=0.01, count=50)
    state = json.loads(json.dumps(acc.state_dict()))
    resumed = make_accountant(target)
    resumed.step(noise_multiplier=3.0, sample_rate=0.5)  # replaced by the loaded history
    resumed.load_state_dict(state)
    assert resumed.history == acc.history
    if source == target:
        assert resumed.epsilon(1e-5) == acc.epsilon(1e-5)
    # The ledger continues where it stopped.
    acc.step(noise_multiplier=0.9, sample_rate=0.01)
    resumed.step(noise_multiplier=0.9, sample_rate=0.01)
    assert resumed.history[-1] == Step(0.9, 0.01, 51)


def test_load_state_dict_rejects_malformed_state():
    acc = RDPAccountant()
    with pytest.raises(ValueError, match="history"):
        acc.load_state_dict({"steps": []})
    with pytest.raises(ValueError, match="keys"):
        acc.load_state_dict({"history": [{"noise_multiplier": 1.0}]})
    with pytest.raises(ValueError, match="sample_rate"):
        acc.load_state_dict(
            {"history": [{"noise_multiplier": 1.0, "sample_rate": 2.0, "count": 1}]}
        )


def test_make_accountant():
    assert isinstance(make_accountant("rdp"), RDPAccountant)
    assert isinstance(make_accountant("prv"), PRVAccountant)
    with pytest.raises(ValueError, match="accountant"):
        make_accountant("gdp")


def test_accounting_and_its_cli_import_neither_torch_nor_triton():
    code = (
        "import sys\n"
        "import dp_attn.accounting\n"
        "from dp_attn.cli import main\n"
        "import dp_attn\n"
        "assert not hasattr(dp_attn, '__wrapped__')\n"  # an attribute probe (inspect's)
        "main(['epsilon', '--noise-multiplier', '1', '--sample-rate', '0.01', '--steps', '10',"
        " '--delta', '1e-5'])\n"
        "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
