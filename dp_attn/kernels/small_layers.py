"""Per-example norms and clipped sums of the small DP layers: norm affine parameters and
embedding tables.

- LayerNorm / RMSNorm weight and bias: per-example gradients are d-vectors
  (Σ_t g_t ⊙ x̂_t and Σ_t g_t), so they are instantiated in registers, tile by tile of d.
- Embeddings: the clipped sum scatters c_i·g_t into row ids_t with fp32 atomics (summation
  order, hence the last bits, may vary between GPU runs). Their per-example norms are plain
  PyTorch on every device (reference.embedding_grad_sq_norms: per-token sums inside each
  example, which cannot cancel the way the ghost form does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .clipped_sum import finish_with_noise
from .per_example_norms import feature_block, seq_block
from .reference import NOISE_LANES
from .utils import noise_key


def _row_splits(rows: int) -> int:
    """Programs along the B·T rows of the norm-affine clipped sum (fp32 partials, then summed)."""
    return max(1, min(64, triton.cdiv(rows, 1024)))


@triton.jit
def _norm_affine_sq_norm_kernel(
    x_ptr, g_ptr, part_ptr, T, D,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
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
    tl.store(part_ptr + i.to(tl.int64) * tl.num_programs(1) + tile,
             tl.sum(acc_w * acc_w) + tl.sum(acc_b * acc_b))


def norm_affine_grad_sq_norms(x_hat, g, *, bias=True):
    """‖Σ_t g_t ⊙ x̂_t‖² (+ ‖Σ_t g_t‖² with bias) per example, fp32 [B]; see functional."""
    batch, d = x_hat.shape[0], x_hat.shape[-1]
    seq_len = x_hat.shape[1] if x_hat.dim() == 3 else 1
    block_d = feature_block(d)
    partial = torch.zeros(batch, triton.cdiv(d, block_d), dtype=torch.float32,
                          device=x_hat.device)
    if batch:
        _norm_affine_sq_norm_kernel[partial.shape](
            x_hat.contiguous(), g.contiguous(), partial, seq_len, d,
            HAS_BIAS=bias, BLOCK_T=seq_block(seq_len), BLOCK_D=block_d,
        )
    return partial.sum(1, dtype=torch.float64).float()  # one rounding (norm_bounds)


@triton.jit
def _norm_affine_clipped_sum_kernel(
    x_ptr, g_ptr, c_ptr, ws_ptr, ROWS, ROWS_PER_SPLIT, T, D,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
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


def norm_affine_clipped_grad_sum(
    x_hat, g, clip_factors, *, noise_std=0.0, scale=1.0, bias=True, seed=None, out_dtype=None,
    secure_mode=False,
):
    """Clipped, noised norm-affine gradients (weight [d], bias [d] or None); see functional."""
    key = noise_key(seed)
    out_dtype = out_dtype or x_hat.dtype
    d = x_hat.shape[-1]
    seq_len = x_hat.shape[1] if x_hat.dim() == 3 else 1
    rows = x_hat.numel() // d
    splits, block_r, block_d = _row_splits(rows), 32, feature_block(d)
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    ws = torch.empty(splits, 2 if bias else 1, d, dtype=torch.float32, device=x_hat.device)
    _norm_affine_clipped_sum_kernel[(triton.cdiv(d, block_d), splits)](
        x_hat.contiguous(), g.contiguous(), clip_factors.contiguous(), ws, rows, rows_per_split,
        seq_len, d, HAS_BIAS=bias, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    weight = torch.empty(d, dtype=out_dtype, device=x_hat.device)
    noise = dict(noise_std=noise_std, scale=scale, key=key, secure_mode=secure_mode)
    finish_with_noise(ws[:, 0], weight, **noise)
    if not bias:
        return weight, None
    bias_grad = torch.empty(d, dtype=out_dtype, device=x_hat.device)
    # The bias's noise counters follow the weight's ⌈d/2⌉, as in the twin.
    finish_with_noise(ws[:, 1], bias_grad, base=triton.cdiv(d, NOISE_LANES), **noise)
    return weight, bias_grad


@triton.jit
def _embedding_scatter_kernel(
    ids_ptr, g_ptr, c_ptr, ws_ptr, ROWS, T, D, padding_idx,
    HAS_PADDING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ws[ids_r] += c_{r // T}·g_r for a block of rows r (fp32 atomics)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ids = tl.load(ids_ptr + rows, mask=rows < ROWS, other=0)
    c = tl.load(c_ptr + rows // T, mask=rows < ROWS, other=0.0)
    # Dropped examples (c = 0) and padding positions add nothing, not even 0·NaN.
    keep = (rows < ROWS) & (c != 0.0)
    if HAS_PADDING:
        keep = keep & (ids != padding_idx)
    mask = keep[:, None] & (cols[None, :] < D)
    g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    tl.atomic_add(ws_ptr + ids.to(tl.int64)[:, None] * D + cols[None, :],
                  g.to(tl.float32) * c[:, None], mask=mask)


def embedding_clipped_grad_sum(
    ids, g, clip_factors, num_embeddings, *, noise_std=0.0, scale=1.0, padding_idx=None,
    seed=None, out_dtype=None, secure_mode=False,
):
    """Clipped, noised embedding-table gradient [num_embeddings, d]; see functional."""
    key = noise_key(seed)
    out_dtype = out_dtype or g.dtype
    d = g.shape[-1]
    seq_len = ids.shape[1] if ids.dim() == 2 else 1
    rows = ids.numel()
    ws = torch.zeros(num_embeddings, d, dtype=torch.float32, device=g.device)
    block_r, block_d = 32, feature_block(d)
    if rows:
        _embedding_scatter_kernel[(triton.cdiv(rows, block_r), triton.cdiv(d, block_d))](
            ids.contiguous(), g.contiguous(), clip_factors.contiguous(), ws, rows, seq_len, d,
            -1 if padding_idx is None else padding_idx,
            HAS_PADDING=padding_idx is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    weight = torch.empty(num_embeddings, d, dtype=out_dtype, device=g.device)
    finish_with_noise(ws[None], weight, noise_std=noise_std, scale=scale, key=key,
                      secure_mode=secure_mode)
    if padding_idx is not None:
        # Its gradient is 0 for every dataset: released exactly, without noise.
        weight[padding_idx] = 0
    return weight
