"""Embedding tables: per-example gradient norms (plain PyTorch on every device), the clipped
sum's kernel, and its plain-PyTorch twin.

The clipped sum scatters c_i·g_t into row ids_t with fp32 atomics (summation order, hence the
last bits, may vary between GPU runs). The per-example norms are per-token sums inside each
example, which cannot cancel the way the ghost form does. No noise: the engine noises the
summed gradients once per step (noise.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_utils import feature_block
from .utils import as_sequences, zero_dropped


def _drop_padding(ids, g, padding_idx):
    """g [B, T, d] in fp32, with positions whose id is padding_idx zeroed."""
    g = g.float()
    return g if padding_idx is None else torch.where((ids != padding_idx)[..., None], g, 0.0)


def embedding_grad_sq_norms(ids, g, *, padding_idx=None):
    """Σ_v ‖Σ_{t: ids_t = v} g_t‖² per example, fp32 [B]: the positions of each example are
    grouped by id and summed in float64, then squared. Unlike the ghost form
    Σ_{s,t}[ids_s = ids_t]<g_s, g_t>, nothing cancels: a token repeated with nearly opposite
    gradients gets its true, small row. The same code serves CPU and GPU (no kernel): memory
    is one float64 row per distinct (example, id), at most B·T rows, never [B, V, d]."""
    g = as_sequences(g)
    batch, seq_len, d = g.shape
    ids = ids.reshape(batch, seq_len).long()
    example = torch.arange(batch, device=g.device).repeat_interleave(seq_len)
    # ids < 2^31 (int32 or a vocabulary index), so (example, id) -> example·2^31 + id is 1:1.
    _, group = torch.unique(example * 2**31 + ids.reshape(-1), return_inverse=True)
    rows = _drop_padding(ids, g, padding_idx).double().reshape(-1, d)
    sums = torch.zeros(batch * seq_len, d, dtype=torch.float64, device=g.device)
    sums.index_add_(0, group, rows)
    owner = torch.zeros(batch * seq_len, dtype=torch.long, device=g.device)
    owner.scatter_(0, group, example)
    sq = torch.zeros(batch, dtype=torch.float64, device=g.device)
    return sq.index_add_(0, owner, sums.square().sum(1)).float()


@triton.jit
def _embedding_scatter_kernel(
    ids_ptr,
    g_ptr,
    c_ptr,
    ws_ptr,
    ROWS,
    T,
    D,
    padding_idx,
    HAS_PADDING: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    tl.atomic_add(
        ws_ptr + ids.to(tl.int64)[:, None] * D + cols[None, :],
        g.to(tl.float32) * c[:, None],
        mask=mask,
    )


def embedding_clipped_grad_sum(
    ids, g, clip_factors, num_embeddings, *, scale=1.0, padding_idx=None, out_dtype=None
):
    """Clipped embedding-table gradient [num_embeddings, d]; see functional."""
    out_dtype = out_dtype or g.dtype
    d = g.shape[-1]
    seq_len = ids.shape[1] if ids.dim() == 2 else 1
    rows = ids.numel()
    ws = torch.zeros(num_embeddings, d, dtype=torch.float32, device=g.device)
    block_r, block_d = 32, feature_block(d)
    if rows:
        _embedding_scatter_kernel[(triton.cdiv(rows, block_r), triton.cdiv(d, block_d))](
            ids.contiguous(),
            g.contiguous(),
            clip_factors.contiguous(),
            ws,
            rows,
            seq_len,
            d,
            -1 if padding_idx is None else padding_idx,
            HAS_PADDING=padding_idx is not None,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
        )
    if scale != 1.0:  # the engine's calls: no pass over the table
        ws.mul_(scale)
    return ws.to(out_dtype)  # the padding_idx row stays 0: the scatter skips it


# ---------------------------------------------------------------- twin


def embedding_clipped_grad_sum_reference(
    ids, g, clip_factors, num_embeddings, *, scale=1.0, padding_idx=None, out_dtype=None
):
    """embedding_clipped_grad_sum's twin: scale·Σ_i c_i Σ_t onehot(ids_it) g_itᵀ [V, d]; the
    padding_idx row is 0."""
    out_dtype = out_dtype or g.dtype
    g = as_sequences(g)
    ids = ids.reshape(g.shape[:2])
    g = zero_dropped(_drop_padding(ids, g, padding_idx), clip_factors)
    g = g * clip_factors[:, None, None]
    d = g.shape[2]
    weight = torch.zeros(num_embeddings, d, dtype=torch.float32, device=g.device)
    weight.index_add_(0, ids.reshape(-1), g.reshape(-1, d))
    return (weight * scale).to(out_dtype)
