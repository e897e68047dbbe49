"""Per-example norms and clipped sums of LayerNorm / RMSNorm affine parameters, and their
plain-PyTorch twins.

Per-example gradients are d-vectors (Σ_t g_t ⊙ x̂_t and Σ_t g_t), so they are instantiated in
registers, tile by tile of d. The clipped sum splits the B·T rows over programs whose fp32
partial sums are then added. No noise: the engine noises the summed gradients once per step
(noise.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_utils import feature_block, seq_block
from .utils import as_sequences, zero_dropped


def _row_splits(rows: int) -> int:
    """Programs along the B·T rows of the norm-affine clipped sum (fp32 partials, then summed)."""
    return max(1, min(64, triton.cdiv(rows, 1024)))


@triton.jit
def _norm_affine_sq_norm_kernel(
    x_ptr,
    g_ptr,
    part_ptr,
    T,
    D,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    tile = tl.program_id(1)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    acc_w = tl.zeros((BLOCK_D,), tl.float32)
    acc_b = tl.zeros((BLOCK_D,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        offsets = (i.to(tl.int64) * T + t)[:, None] * D + cols[None, :]
        mask = (t[:, None] < T) & (cols[None, :] < D)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc_w += tl.sum(g * x, axis=0)
        if HAS_BIAS:
            acc_b += tl.sum(g, axis=0)
    tl.store(
        part_ptr + i.to(tl.int64) * tl.num_programs(1) + tile,
        tl.sum(acc_w * acc_w) + tl.sum(acc_b * acc_b),
    )


def norm_affine_grad_sq_norms(x_hat, g, *, bias=True):
    """‖Σ_t g_t ⊙ x̂_t‖² (+ ‖Σ_t g_t‖² with bias) per example, fp32 [B]; see functional."""
    batch, d = x_hat.shape[0], x_hat.shape[-1]
    seq_len = x_hat.shape[1] if x_hat.dim() == 3 else 1
    block_d = feature_block(d)
    partial = torch.zeros(batch, triton.cdiv(d, block_d), dtype=torch.float32, device=x_hat.device)
    if batch:
        _norm_affine_sq_norm_kernel[partial.shape](
            x_hat.contiguous(),
            g.contiguous(),
            partial,
            seq_len,
            d,
            HAS_BIAS=bias,
            BLOCK_T=seq_block(seq_len),
            BLOCK_D=block_d,
        )
    return partial.sum(1, dtype=torch.float64).float()  # one rounding (norm_bounds)


@triton.jit
def _norm_affine_clipped_sum_kernel(
    x_ptr,
    g_ptr,
    c_ptr,
    ws_ptr,
    ROWS,
    ROWS_PER_SPLIT,
    T,
    D,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """ws[split] = fp32 (Σ c g ⊙ x̂, Σ c g) over this split's rows, laid out [weight | bias]."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    acc_w = tl.zeros((BLOCK_D,), tl.float32)
    acc_b = tl.zeros((BLOCK_D,), tl.float32)
    first = split * ROWS_PER_SPLIT
    last = tl.minimum(first + ROWS_PER_SPLIT, ROWS)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + offs_r
        c = tl.load(c_ptr + rows // T, mask=rows < last, other=0.0)
        # Dropped examples (c = 0) must add exactly 0, even where x̂ or g is inf/NaN.
        keep = ((rows < last) & (c != 0.0))[:, None] & (cols[None, :] < D)
        offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
        g = tl.load(g_ptr + offsets, mask=keep, other=0.0).to(tl.float32) * c[:, None]
        x = tl.load(x_ptr + offsets, mask=keep, other=0.0).to(tl.float32)
        acc_w += tl.sum(g * x, axis=0)
        if HAS_BIAS:
            acc_b += tl.sum(g, axis=0)
    width = 2 * D if HAS_BIAS else D
    out = ws_ptr + split.to(tl.int64) * width + cols
    tl.store(out, acc_w, mask=cols < D)
    if HAS_BIAS:
        tl.store(out + D, acc_b, mask=cols < D)


def norm_affine_clipped_grad_sum(x_hat, g, clip_factors, *, scale=1.0, bias=True, out_dtype=None):
    """Clipped norm-affine gradients (weight [d], bias [d] or None); see functional."""
    out_dtype = out_dtype or x_hat.dtype
    d = x_hat.shape[-1]
    seq_len = x_hat.shape[1] if x_hat.dim() == 3 else 1
    rows = x_hat.numel() // d
    splits, block_r, block_d = _row_splits(rows), 32, feature_block(d)
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    ws = torch.empty(splits, 2 if bias else 1, d, dtype=torch.float32, device=x_hat.device)
    _norm_affine_clipped_sum_kernel[(triton.cdiv(d, block_d), splits)](
        x_hat.contiguous(),
        g.contiguous(),
        clip_factors.contiguous(),
        ws,
        rows,
        rows_per_split,
        seq_len,
        d,
        HAS_BIAS=bias,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )

    def finished(partials):
        """The splits' fp32 partial sums added (deterministic: no atomics), scaled, cast."""
        return (partials.sum(0) * scale).to(out_dtype)

    return finished(ws[:, 0]), (finished(ws[:, 1]) if bias else None)


# ---------------------------------------------------------------- twins


def norm_affine_grad_sq_norms_reference(x_hat, g, *, bias=True):
    """norm_affine_grad_sq_norms' twin: ‖Σ_t g_t ⊙ x̂_t‖² (+ ‖Σ_t g_t‖² with bias), fp32 [B]."""
    x_hat, g = as_sequences(x_hat).float(), as_sequences(g).float()
    sq = (g * x_hat).sum(1).double().square().sum(1)
    return (sq + g.sum(1).double().square().sum(1) if bias else sq).float()


def norm_affine_clipped_grad_sum_reference(
    x_hat, g, clip_factors, *, scale=1.0, bias=True, out_dtype=None
):
    """norm_affine_clipped_grad_sum's twin: scale·Σ_i c_i Σ_t g_it ⊙ x̂_it [d], and
    scale·Σ_i c_i Σ_t g_it [d] (None without bias). Examples with c_i = 0 add exactly 0."""
    out_dtype = out_dtype or x_hat.dtype
    x_hat = zero_dropped(as_sequences(x_hat), clip_factors)
    g = zero_dropped(as_sequences(g), clip_factors) * clip_factors[:, None, None]
    weight = ((g * x_hat).sum((0, 1)) * scale).to(out_dtype)
    return weight, ((g.sum((0, 1)) * scale).to(out_dtype) if bias else None)
