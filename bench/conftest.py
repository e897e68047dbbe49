"""Shared plumbing of the GPU benchmarks (pytest-benchmark).

- The saved JSON's machine_info names the GPU and the torch, triton and CUDA versions.
- DP_ATTN_BENCH_DEADLINE (seconds since the epoch): benchmarks not started by then are skipped,
  so that a suite fits a GPU lease and still writes its JSON.
- `record_comparison(table, case, provider, value)`: a higher-is-better number (e.g. TFLOP/s)
  of one provider on one case. At the end of the session every table is printed with, per case,
  ours (provider "ours") against the best other provider, and their ratio.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import pytest
import torch
import triton

_COMPARISONS: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))


DEADLINE = float(os.environ.get("DP_ATTN_BENCH_DEADLINE", "inf"))


def pytest_runtest_setup(item):
    if time.time() > DEADLINE:
        pytest.skip("past the suite's deadline (DP_ATTN_BENCH_DEADLINE)")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cuda"] = torch.version.cuda


@pytest.fixture
def record_comparison():
    def record(table: str, case: str, provider: str, value: float) -> None:
        _COMPARISONS[table][case][provider] = value

    return record


def pytest_terminal_summary(terminalreporter):
    for table, cases in _COMPARISONS.items():
        terminalreporter.section(table)
        width = max(len(case) for case in cases)
        terminalreporter.write_line(
            f"{'case':<{width}}  {'ours':>8}  {'best other':>8}  {'ratio':>6}  (best other)"
        )
        for case, values in cases.items():
            others = {p: v for p, v in values.items() if p != "ours"}
            ours = values.get("ours")
            best = max(others, key=others.get) if others else None
            ours_text = f"{ours:8.1f}" if ours is not None else f"{'-':>8}"
            best_text = f"{others[best]:8.1f}" if best else f"{'-':>8}"
            ratio = f"{ours / others[best]:6.2f}" if ours is not None and best else f"{'-':>6}"
            terminalreporter.write_line(
                f"{case:<{width}}  {ours_text}  {best_text}  {ratio}  ({best or 'none'})"
            )
