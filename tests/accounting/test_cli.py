"""`dp-attn epsilon` and `dp-attn calibrate`: plain and JSON output, errors, and one run as
`python -m dp_attn.cli`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dp_attn.accounting import Step, make_accountant, read_schedule
from dp_attn.accounting.schedule import COLUMNS
from dp_attn.cli import build_parser, main

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


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_huge_noise_is_answered_not_raised(name, capsys):
    argv = ["epsilon", "--noise-multiplier", "100000", "--sample-rate", "0.5", "--steps", "1000"]
    assert main([*argv, "--delta", "1e-5", "--accountant", name, "--json"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["epsilon"] < 0.01


def test_calibrate_a_tiny_epsilon(capsys):
    argv = ["calibrate", "--epsilon", "0.001", "--delta", "1e-5", "--sample-rate", "0.5"]
    assert main([*argv, "--steps", "1000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.99 * 0.001 <= result["epsilon"] <= 0.001


def test_steps_as_a_float_and_noiseless_steps_explained(capsys):
    argv = ["epsilon", "--noise-multiplier", "0", "--sample-rate", "0.01", "--delta", "1e-5"]
    assert main([*argv, "--steps", "1e4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 10000 and result["epsilon"] == float("inf")
    assert main([*argv, "--steps", "1e4"]) == 0
    assert "noise multiplier 0 adds no noise" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv, "--steps", "1.5"])


def test_every_option_has_a_help_text_with_its_default():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.choices and "epsilon" in a.choices).choices
    for command in ("epsilon", "calibrate"):
        for action in subs[command]._actions:
            if action.dest == "help":
                continue
            assert action.help and ("default" in action.help or "required" in action.help)


SCHEDULE = [(1.0, 0.01, 200), (1.2, 0.02, 300), (0.9, 0.01, 1)]


@pytest.mark.parametrize("form", ["csv", "csv-header", "json", "json-objects"])
def test_schedule_files(form, tmp_path, capsys):
    if form.startswith("csv"):
        path = tmp_path / "schedule.csv"
        lines = [f"{z},{q},{t}" for z, q, t in SCHEDULE]
        header = ["noise_multiplier,sample_rate,steps"] if form == "csv-header" else []
        path.write_text("\n".join(header + lines) + "\n")
    else:
        path = tmp_path / "schedule.json"
        rows = [list(r) for r in SCHEDULE]
        if form == "json-objects":
            rows = [dict(zip(COLUMNS, r, strict=True)) for r in SCHEDULE]
        path.write_text(json.dumps(rows))
    assert read_schedule(path) == tuple(Step(*r) for r in SCHEDULE)
    assert main(["epsilon", "--schedule", str(path), "--delta", "1e-5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    acc = make_accountant("prv")
    for z, q, t in SCHEDULE:
        acc.step(noise_multiplier=z, sample_rate=q, count=t)
    assert result["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12)
    assert result["steps"] == 501 and result["runs"] == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("1.0,0.01\n", "expected noise_multiplier"),
        ("1.0,2.0,10\n", "sample_rate"),
        ("1.0,0.01,2.5\n", "steps must be an integer"),
        ("", "no runs"),
    ],
)
def test_bad_schedule_files_are_reported(text, message, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_schedule(path)
    assert main(["epsilon", "--schedule", str(path), "--delta", "1e-5"]) == 2
    assert message in capsys.readouterr().err
    assert main(["epsilon", "--schedule", str(tmp_path / "missing.csv"), "--delta", "1e-5"]) == 2
    assert main(["epsilon", "--delta", "1e-5"]) == 2  # neither a schedule nor a regime
