"""The README stays true: its Python example runs and spends the ε it says, and its quickstart
commands name extras and a console script that the package defines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_example_trains_to_the_target_epsilon():
    (example,) = _blocks("python")
    # The reference path (TRITON_INTERPRET=0 on CPU): the interpreter would take minutes here,
    # and the kernels are compared with it in tests/kernels.
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", example],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    epsilons = [float(e) for e in re.findall(r"ε = ([0-9.]+)", done.stdout)]
    assert len(epsilons) == 2 and epsilons[0] < epsilons[1] <= 3.0 + 1e-9, done.stdout
    assert epsilons[1] > 2.9  # calibrated to spend (nearly) all of the budget


def test_quickstart_commands_name_what_the_package_defines():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11)
    main_job, tests = _blocks("bash")[0].strip().splitlines()
    for command, extra in ((main_job, "demo"), (tests, "test")):
        assert f'.[{extra}]"' in command and re.search(rf"^{extra} = \[", pyproject, re.M)
    assert "dp-attn demo" in main_job and 'dp-attn = "dp_attn.cli:main"' in pyproject
    assert "python -m pytest -n auto" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.split("#")[0].strip() in ci  # CI runs the README's test command verbatim
