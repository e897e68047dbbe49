"""examples/train_tiny_transformer.py runs as a user would run it and spends its target ε."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_transformer_example_trains_to_its_epsilon():
    # The reference path (TRITON_INTERPRET=0 on CPU), as a user without a GPU runs it.
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [
            sys.executable,
            "examples/train_tiny_transformer.py",
            "--epochs",
            "1",
            "--epsilon",
            "2",
            "--clipping",
            "per-layer",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", done.stdout)]
    assert losses and all(0 < x < 10 for x in losses), done.stdout
    assert "(2.00, 1e-05)-DP" in done.stdout, done.stdout
