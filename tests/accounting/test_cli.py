"""`dp-attn epsilon` and `dp-attn calibrate`: plain and JSON output, errors, and one run as
`python -m dp_attn.cli`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dp_attn.accounting import make_accountant
from dp_attn.cli import main

ROOT = Path(__file__).resolve().parents[2]
EPSILON = ["epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.0043"]
EPSILON += ["--steps", "14062", "--delta", "1e-5"]
CALIBRATE = ["calibrate", "--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01"]
CALIBRATE += ["--steps", "1000"]


def expected_epsilon(name):
    acc = make_accountant(name)
    acc.step(noise_multiplier=1.1, sample_rate=0.0043, count=14062)
    return acc.epsilon(1e-5)


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_epsilon_plain_and_json(name, capsys):
    assert main([*EPSILON, "--accountant", name]) == 0
    text = capsys.readouterr().out
    assert f"ε = {expected_epsilon(name):.4f} at δ = 1e-05" in text
    assert f"{name} accountant" in text
    assert main([*EPSILON, "--accountant", name, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {
        "epsilon": pytest.approx(expected_epsilon(name), rel=1e-12),
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "sample_rate": 0.0043,
        "steps": 14062,
        "accountant": name,
    }


def test_epsilon_defaults_to_prv(capsys):
    main([*EPSILON, "--json"])
    assert json.loads(capsys.readouterr().out)["accountant"] == "prv"


def test_calibrate_plain_and_json(capsys):
    assert main([*CALIBRATE, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.99 * 3 <= result["epsilon"] <= 3
    acc = make_accountant("prv")
    acc.step(noise_multiplier=result["noise_multiplier"], sample_rate=0.01, count=1000)
    assert acc.epsilon(1e-5) == pytest.approx(result["epsilon"], rel=1e-12)
    assert main(CALIBRATE) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"noise multiplier = {result['noise_multiplier']:.4f}")


def test_bad_values_are_reported_not_raised(capsys):
    assert main([*EPSILON[:-1], "1.5"]) == 2  # δ = 1.5
    assert "delta must be in (0, 1)" in capsys.readouterr().err
    assert main([*CALIBRATE[:2], "-3", *CALIBRATE[3:]]) == 2
    assert "target_epsilon" in capsys.readouterr().err


def test_missing_arguments_and_unknown_accountant_exit_with_usage():
    with pytest.raises(SystemExit) as missing:
        main(["epsilon", "--noise-multiplier", "1.0"])
    assert missing.value.code == 2
    with pytest.raises(SystemExit):
        main([*EPSILON, "--accountant", "gdp"])


def test_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "dp_attn.cli", *EPSILON, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["epsilon"] == pytest.approx(expected_epsilon("prv"), rel=1e-12)
