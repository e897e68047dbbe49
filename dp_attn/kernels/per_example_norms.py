"""Exact per-example squared gradient norms of linear layers on sequences.

For activations a_i [T, din] and output gradients g_i [T, dout] of example i, the weight
gradient is g_iᵀ a_i and the bias gradient Σ_t g_it. Two tiled paths, fp32 accumulation:

- ghost: ‖g_iᵀ a_i‖² = Σ_{s,t} (a_i a_iᵀ)_{st} (g_i g_iᵀ)_{st}, summed over pairs of
  BLOCK_T-row tiles t >= s (off-diagonal pairs twice), one BLOCK_T × BLOCK_T Gram tile at a
  time. The bias adds Σ_{s,t} (g_i g_iᵀ)_{st}, i.e. a constant-1 feature appended to a.
  ~T²(din + dout) FLOPs per example.
- instantiate: tiles [BLOCK_O, BLOCK_I] of g_iᵀ a_i, squared and summed in registers.
  ~2·T·din·dout FLOPs per example, i.e. one weight-gradient GEMM.

Neither path holds a T×T matrix or a per-example gradient: the only memory beyond the inputs
is one fp32 partial sum per (example, program), summed in float64 in a fixed order
(deterministic). The sums are structured so that norm_bounds can bound their rounding.

per_example_grad_sq_norms_reference is the plain-PyTorch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_utils import (
    autotune_configs,
    dot_acc,
    dot_in_fp32,
    feature_block,
    fitted_to_layer,
    seq_block,
)
from .utils import as_sequences, checked_grid


def grad_norm_method(seq_len: int, din: int, dout: int) -> str:
    """The cheaper exact per-example norm path by FLOPs: "ghost" costs ~T²(din+dout) per example
    (pairs of T-tiles, symmetric), "instantiate" ~2·T·din·dout. Kernels and twin use this rule."""
    return "ghost" if seq_len * (din + dout) <= 2 * din * dout else "instantiate"


@triton.jit
def folded_pair_count(r, N_TILES):
    """Program r of the folded triangle of T-tile pairs owns tile rows r and N_TILES-1-r, so
    every program has N_TILES + 1 pairs (the middle row of an odd count is owned once)."""
    return tl.where(2 * r + 1 == N_TILES, N_TILES - r, N_TILES + 1)


@triton.jit
def folded_pair(r, j, N_TILES):
    """The j-th pair (s, t), t >= s, of program r."""
    first = N_TILES - r
    in_first = j < first
    s = tl.where(in_first, r, N_TILES - 1 - r)
    t = tl.where(in_first, r + j, N_TILES - 1 - r + (j - first))
    return s, t


@triton.jit
def gram_tile(
    x_ptr,
    rows_s,
    rows_t,
    valid_s,
    valid_t,
    D,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """x[rows_s] @ x[rows_t]ᵀ, [BLOCK_T, BLOCK_T] in fp32, over the D features in chunks."""
    offs_d = tl.arange(0, BLOCK_D)
    gram = tl.zeros((BLOCK_T, BLOCK_T), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        x_s = tl.load(
            x_ptr + rows_s[:, None] * D + cols[None, :],
            mask=valid_s[:, None] & (cols[None, :] < D),
            other=0.0,
        )
        x_t = tl.load(
            x_ptr + rows_t[None, :] * D + cols[:, None],
            mask=valid_t[None, :] & (cols[:, None] < D),
            other=0.0,
        )
        gram = dot_acc(x_s, x_t, gram, DOT_FP32)
    return gram


@triton.autotune(
    configs=autotune_configs(
        [
            # 4 warps took 123-168 registers where 8 took 64-122, and spilled 76-208 B on a narrow
            # layer (bench/compile_report.py).
            triton.Config({"BLOCK_D": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_D": 128}, num_warps=8, num_stages=3),
        ]
    ),
    key=["T", "DIN", "DOUT"],
    prune_configs_by=fitted_to_layer(lambda args: {"BLOCK_D": max(args["DIN"], args["DOUT"])}),
)
@triton.jit
def _ghost_sq_norm_kernel(
    a_ptr,
    g_ptr,
    part_ptr,
    T,
    DIN,
    DOUT,
    N_TILES,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One flat grid (example, program): neither count is bounded by CUDA's 65,535 on y.
    programs = tl.cdiv(N_TILES, 2)
    i = tl.program_id(0) // programs
    r = tl.program_id(0) % programs
    base = i.to(tl.int64) * T
    offs_t = tl.arange(0, BLOCK_T)
    total = 0.0
    for j in range(0, folded_pair_count(r, N_TILES)):
        s, t = folded_pair(r, j, N_TILES)
        pos_s, pos_t = s * BLOCK_T + offs_t, t * BLOCK_T + offs_t
        valid_s, valid_t = pos_s < T, pos_t < T
        a_gram = gram_tile(
            a_ptr, base + pos_s, base + pos_t, valid_s, valid_t, DIN, BLOCK_D, BLOCK_T, DOT_FP32
        )
        g_gram = gram_tile(
            g_ptr, base + pos_s, base + pos_t, valid_s, valid_t, DOUT, BLOCK_D, BLOCK_T, DOT_FP32
        )
        if HAS_BIAS:
            a_gram += 1.0
        # Two sums of BLOCK_T terms rather than one of BLOCK_T²: the rounding bound of
        # norm_bounds.ghost_rounding counts 2·BLOCK_T additions per term.
        total += tl.where(s == t, 1.0, 2.0) * tl.sum(tl.sum(a_gram * g_gram, axis=1), axis=0)
    tl.store(part_ptr + tl.program_id(0).to(tl.int64), total)


@triton.autotune(
    configs=autotune_configs(
        [
            # BLOCK_T 64 spilled on sm_80 (bench/compile_report.py): 142 B with 4 warps, and 4 B
            # with 8 warps and 3 stages (triton 3.6: ptxas stopped at 128 registers).
            triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=4),
        ]
    ),
    key=["T", "DIN", "DOUT"],
)
@triton.jit
def _instantiate_sq_norm_kernel(
    a_ptr,
    g_ptr,
    part_ptr,
    T,
    DIN,
    DOUT,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    n_i = tl.cdiv(DIN, BLOCK_I)
    tiles = tl.cdiv(DOUT, BLOCK_O) * n_i
    i = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    cols_o = (tile // n_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols_i = (tile % n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_O, BLOCK_I), tl.float32)
    acc_b = tl.zeros((BLOCK_O,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        rows64 = i.to(tl.int64) * T + t
        g_t = tl.load(
            g_ptr + rows64[None, :] * DOUT + cols_o[:, None],
            mask=(t[None, :] < T) & (cols_o[:, None] < DOUT),
            other=0.0,
        )
        x = tl.load(
            a_ptr + rows64[:, None] * DIN + cols_i[None, :],
            mask=(t[:, None] < T) & (cols_i[None, :] < DIN),
            other=0.0,
        )
        acc = dot_acc(g_t, x, acc, DOT_FP32)
        if HAS_BIAS:
            if tile % n_i == 0:  # only the first-column tile reports its rows' bias sums
                # A load of its own: the dot's operand feeding a reduction as well fails
                # triton 3.6's OptimizeThreadLocality pass for fp32 (bench/compile_report.py).
                g_b = tl.load(
                    g_ptr + rows64[None, :] * DOUT + cols_o[:, None],
                    mask=(t[None, :] < T) & (cols_o[:, None] < DOUT),
                    other=0.0,
                )
                acc_b += tl.sum(g_b.to(tl.float32), axis=1)
    # Row sums, then their sum: at most BLOCK_O + BLOCK_I additions per term (norm_bounds).
    sq = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    if HAS_BIAS:
        sq += tl.sum(acc_b * acc_b)  # 0 but in the first-column tile
    tl.store(part_ptr + tl.program_id(0).to(tl.int64), sq)


def per_example_grad_sq_norms(a, g, *, bias=True, method=None):
    """‖g_iᵀ a_i‖_F² (+ ‖Σ_t g_it‖² with bias) per example, fp32 [B]; see functional."""
    batch, din, dout = a.shape[0], a.shape[-1], g.shape[-1]
    seq_len = a.shape[1] if a.dim() == 3 else 1
    method = method or grad_norm_method(seq_len, din, dout)
    a2 = a.reshape(-1, din).contiguous()
    g2 = g.reshape(-1, dout).contiguous()
    if method == "ghost":
        block_t = seq_block(seq_len)
        n_tiles = triton.cdiv(seq_len, block_t)
        programs = triton.cdiv(n_tiles, 2)
    else:
        block_o, block_i = feature_block(dout), feature_block(din)
        programs = triton.cdiv(dout, block_o) * triton.cdiv(din, block_i)
    partial = torch.zeros(batch, programs, dtype=torch.float32, device=a.device)
    if batch and programs:
        grid = checked_grid(batch * programs)
        dot_fp32 = dot_in_fp32(a.dtype)
        if method == "ghost":
            _ghost_sq_norm_kernel[grid](
                a2,
                g2,
                partial,
                seq_len,
                din,
                dout,
                n_tiles,
                HAS_BIAS=bias,
                DOT_FP32=dot_fp32,
                BLOCK_T=block_t,
            )
        else:
            _instantiate_sq_norm_kernel[grid](
                a2,
                g2,
                partial,
                seq_len,
                din,
                dout,
                HAS_BIAS=bias,
                DOT_FP32=dot_fp32,
                BLOCK_O=block_o,
                BLOCK_I=block_i,
            )
    # float64 across programs, so that this sum adds one rounding (norm_bounds), not γ(programs).
    return partial.sum(1, dtype=torch.float64).float()


def per_example_grad_sq_norms_reference(a, g, *, bias=True, method=None):
    """per_example_grad_sq_norms' twin: ‖g_iᵀ a_i‖_F² (+ ‖Σ_t g_it‖² with bias), fp32 [B]."""
    a, g = as_sequences(a).float(), as_sequences(g).float()
    method = method or grad_norm_method(a.shape[1], a.shape[2], g.shape[2])
    # fp32 Gram matrices or tiles, as the kernels; products and sums in float64, so that the
    # rounding stays within what norm_bounds assumes of the kernels.
    if method == "ghost":
        g_gram = torch.bmm(g, g.transpose(1, 2)).double()
        a_gram = torch.bmm(a, a.transpose(1, 2)).double()
        return ((a_gram + 1.0 if bias else a_gram) * g_gram).sum((1, 2)).float()
    # One example's [dout, din] gradient at a time: never [B, dout, din] (an LM head's B×V×d).
    sq = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
    for i, (g_i, a_i) in enumerate(zip(g, a, strict=True)):
        sq[i] = (g_i.T @ a_i).square().sum(dtype=torch.float64)
    return (sq + g.sum(1).double().square().sum(1) if bias else sq).float()
