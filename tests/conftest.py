"""Test configuration: run the real Triton kernels through the interpreter on CPU.

TRITON_INTERPRET must be set before triton is imported anywhere. On a GPU machine run
with TRITON_INTERPRET=0 to compile the kernels and run the tests marked `cuda`.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1":
        return
    why = "needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))
