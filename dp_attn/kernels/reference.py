"""The plain-PyTorch twin of flash attention (flash_attn.py): the test oracle's first rung
and the CPU path when Triton is not interpreting. The other families hold their twins beside
their kernels (`*_reference`)."""

from __future__ import annotations

import torch


def attention_visibility(tq, tk, *, causal=False, key_lengths=None, device=None):
    """Boolean [B or 1, 1, Tq, Tk]: query i of example b sees key j iff j < key_lengths[b] and,
    when causal, j <= i + Tk - Tq (bottom-right aligned)."""
    rows = torch.arange(tq, device=device)[:, None]
    cols = torch.arange(tk, device=device)[None, :]
    visible = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        visible = cols <= rows + (tk - tq)
    visible = visible[None, None]
    if key_lengths is not None:
        visible = visible & (cols < key_lengths.to(device)[:, None, None, None])
    return visible


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, key_lengths=None):
    """softmax(q kᵀ · scale) v with flash_attention's semantics, in plain PyTorch.

    q [B, H, Tq, D], k and v [B, Hkv, Tk, D] with Hkv dividing H (query head h uses kv head
    h // (H / Hkv)); scale defaults to 1/sqrt(D). Computes in fp32 (fp64 for fp64 inputs) and
    returns q's dtype. A row that sees no key gives 0, with zero gradients (never NaN).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    k = k.to(compute).repeat_interleave(group, dim=1)
    v = v.to(compute).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) * scale
    visible = attention_visibility(
        q.shape[2], k.shape[2], causal=causal, key_lengths=key_lengths, device=q.device
    )
    # Rows without a visible key take finite scores (any value): their probabilities are zeroed
    # below, so they output 0, and no -inf - (-inf) = NaN reaches the softmax or its gradient.
    seen = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible & seen, float("-inf")).masked_fill(~seen, 0.0)
    probs = torch.softmax(scores, dim=-1) * visible
    return torch.matmul(probs, v).to(q.dtype)
