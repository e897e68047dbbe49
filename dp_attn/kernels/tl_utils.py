"""Triton helpers shared by several kernel families: the tl.dot wrapper, and the host-side
choices of tile sizes and autotune configs that go with it."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import triton
import triton.language as tl

from .utils import interpreting


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """All configs on a GPU; only the first through the interpreter (it fails on several)."""
    return configs[:1] if interpreting() else configs


def fitted_to_layer(block_widths: Callable[[Mapping], dict[str, int]]) -> dict:
    """autotune's prune_configs_by: drop configs whose feature tiles are wider than the layer
    (feature_block of the width each tiles, from block_widths(kernel arguments)), or the
    smallest config if none fits. A 40x24 layer in 128-wide tiles computes mostly padding, and
    those configs spilled registers (bench/compile_report.py)."""

    def prune(configs, named_args, **kwargs):
        widths = block_widths({**named_args, **kwargs})
        fitting = [
            c
            for c in configs
            if all(c.kwargs[key] <= feature_block(w) for key, w in widths.items())
        ]
        return fitting or [min(configs, key=lambda c: [c.kwargs[key] for key in widths])]

    return {"early_config_prune": prune}


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot must take fp32 operands: fp32 inputs (IEEE, as torch's default matmul),
    and every dtype in the interpreter, whose bf16 tl.dot is wrong."""
    return dtype == torch.float32 or interpreting()


@triton.jit
def dot_acc(x, y, acc, DOT_FP32: tl.constexpr):
    """acc + x @ y with fp32 accumulation."""
    if DOT_FP32:
        out = tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(x, y, acc)
    return out


def seq_block(seq_len: int) -> int:
    """Rows per T-tile of the ghost paths: 64, or the next power of two >= T (at least 16,
    the smallest K of a 16-bit tl.dot on NVIDIA)."""
    return min(64, max(16, triton.next_power_of_2(seq_len)))


def feature_block(width: int, cap: int = 128) -> int:
    """Columns per feature tile: the next power of two >= width, between 16 and cap."""
    return min(cap, max(16, triton.next_power_of_2(width)))
