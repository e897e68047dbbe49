"""examples/hf_fine_tuning.py runs as a user would run it: a default-config GPT-2 saved and
loaded with from_pretrained, fully fine-tuned and fine-tuned with DP-LoRA to its ε, then
generate()."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_hf_fine_tuning_example_trains_to_its_epsilon_and_generates():
    # The reference path (TRITON_INTERPRET=0 on CPU), as a user without a GPU runs it.
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [
            sys.executable,
            "examples/hf_fine_tuning.py",
            "--epochs",
            "1",
            "--epsilon",
            "4",
            "--examples",
            "128",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for label in ("full fine-tuning", "DP-LoRA"):
        losses = [float(x) for x in re.findall(rf"{label} epoch 1: loss (\d+\.\d+)", done.stdout)]
        assert len(losses) == 1 and 0 < losses[0] < 10, done.stdout
        assert f"{label}: this run is (4.00, 1e-05)-DP" in done.stdout, done.stdout
        assert re.search(rf"{label} generates: 'Beautiful is.+'", done.stdout), done.stdout
