"""DPMultiheadAttention: nn.MultiheadAttention computed with dp_attn.flash_attention, its
Q/K/V in-projection one DP layer and its out_proj a DPLinear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as DF
from ..kernels.flash_attn import MAX_HEAD_DIM
from .clipper import DPLayer
from .functions import DPLinearFunction, is_recording
from .layers import DPLinear
from .pieces import LinearTarget


class DPMultiheadAttention(DPLayer, nn.MultiheadAttention):
    """nn.MultiheadAttention (batch_first=True) computed with dp_attn.flash_attention.

    Same constructor, parameters and state_dict keys as nn.MultiheadAttention, except that
    batch_first defaults to True and must be True (examples are indexed by dim 0), and that
    attention dropout, add_bias_kv and add_zero_attn are not supported. The Q/K/V
    in-projection is one DP layer (one privacy group; its rows for Q, K and V are separate
    matrices under block clipping) and out_proj is a DPLinear.

    forward has nn.MultiheadAttention.forward's signature and returns (output, None):
    - need_weights=True is refused (the attention matrix is never formed): pass
      need_weights=False — note that nn.MultiheadAttention's default is True;
    - key_padding_mask [B, S] (bool, True = padding, or float 0/-inf) must mark a suffix of
      each row (right padding); it becomes per-example key lengths;
    - causal masking: is_causal=True, or attn_mask equal to the causal mask (bool, True =
      masked, or float 0/-inf; bottom-right aligned when T != S). Other masks are refused.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=True,
        device=None,
        dtype=None,
    ):
        super().__init__(
            embed_dim,
            num_heads,
            dropout,
            bias,
            add_bias_kv,
            add_zero_attn,
            kdim,
            vdim,
            batch_first,
            device,
            dtype,
        )
        check_attention(self)
        self.out_proj.__class__ = DPLinear

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError(
                "DPMultiheadAttention cannot return attention weights (flash attention never "
                "forms the attention matrix): call it with need_weights=False"
            )
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"DPMultiheadAttention expects batch-first {name} [B, T, features], got {got}"
                )
        batch, tq, _ = query.shape
        tk = key.shape[1]
        if key.shape[:2] != value.shape[:2] or key.shape[0] != batch:
            raise ValueError(
                f"key and value must be [B, S, ...] with the query's batch size {batch}, got "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        causal = _causal_flag(attn_mask, is_causal, tq, tk)
        key_lengths = key_lengths_from_padding_mask(key_padding_mask, batch, tk)
        q, k, v = self._in_projection(query, key, value)
        heads, head_dim = self.num_heads, self.head_dim
        q = q.reshape(batch, tq, heads, head_dim).transpose(1, 2)
        k, v = (t.reshape(batch, tk, heads, head_dim).transpose(1, 2) for t in (k, v))
        out = DF.flash_attention(q, k, v, causal=causal, key_lengths=key_lengths)
        out = out.transpose(1, 2).reshape(batch, tq, self.embed_dim)
        return self.out_proj(out), None

    def _in_projection(self, query, key, value):
        e = self.embed_dim
        if self._qkv_same_embed_dim and query is key and key is value:
            weight, bias = self.in_proj_weight, self.in_proj_bias
            if not is_recording(self):
                return F.linear(query, weight, bias).chunk(3, dim=-1)
            target = LinearTarget(weight, bias, splits=3)
            (qkv,) = DPLinearFunction.apply(self, (target,), query, weight, bias)
            return qkv.chunk(3, dim=-1)
        rows = [slice(j * e, (j + 1) * e) for j in range(3)]
        if self._qkv_same_embed_dim:
            weights = [self.in_proj_weight[r] for r in rows]
            targets = [LinearTarget(self.in_proj_weight, self.in_proj_bias, r, r) for r in rows]
        else:
            weights = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
            targets = [
                LinearTarget(w, self.in_proj_bias, None, r)
                for w, r in zip(weights, rows, strict=True)
            ]
        biases = [None] * 3 if self.in_proj_bias is None else [self.in_proj_bias[r] for r in rows]
        inputs = (query, key, value)
        if not is_recording(self):
            return [F.linear(x, w, b) for x, w, b in zip(inputs, weights, biases, strict=True)]
        args = [t for part in zip(inputs, weights, biases, strict=True) for t in part]
        return DPLinearFunction.apply(self, tuple(targets), *args)


def check_attention(module: nn.MultiheadAttention) -> None:
    if not module.batch_first:
        raise ValueError(
            "DP layers index examples by dim 0, so nn.MultiheadAttention must be built with "
            "batch_first=True (and fed [B, T, E] tensors)"
        )
    if module.dropout:
        raise ValueError(
            f"DPMultiheadAttention does not support attention dropout (dropout={module.dropout}):"
            " flash attention has none; use dropout=0.0 (dropout on the output is fine)"
        )
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("DPMultiheadAttention does not support add_bias_kv or add_zero_attn")
    if module.head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"flash attention needs a head dim (embed_dim / num_heads) of at most {MAX_HEAD_DIM}, "
            f"got {module.embed_dim} / {module.num_heads} = {module.head_dim}"
        )


def _causal_mask(tq: int, tk: int, device) -> torch.Tensor:
    """Bool [tq, tk], True where query i may not see key j (bottom-right aligned)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).triu(tk - tq + 1)


def _causal_flag(attn_mask, is_causal: bool, tq: int, tk: int) -> bool:
    if attn_mask is None:
        return bool(is_causal)
    causal = _causal_mask(tq, tk, attn_mask.device)
    if attn_mask.dtype == torch.bool:
        ok = attn_mask.shape == causal.shape and torch.equal(attn_mask, causal)
    else:
        additive = torch.zeros(causal.shape, dtype=attn_mask.dtype, device=attn_mask.device)
        additive.masked_fill_(causal, float("-inf"))
        ok = attn_mask.shape == causal.shape and torch.equal(attn_mask, additive)
    if not ok:
        raise ValueError(
            f"attn_mask must be None or exactly the causal mask of shape ({tq}, {tk}) (bool True "
            "above the diagonal, or float -inf there and 0 elsewhere; bottom-right aligned); "
            "DPMultiheadAttention supports causal masking and key padding (key_padding_mask) only"
        )
    return True


def key_lengths_from_padding_mask(key_padding_mask, batch: int, tk: int) -> torch.Tensor | None:
    if key_padding_mask is None:
        return None
    mask = key_padding_mask
    if mask.shape != (batch, tk):
        raise ValueError(
            f"key_padding_mask must have shape (B, S) = ({batch}, {tk}), got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        padded = torch.isneginf(mask)
        if not bool((padded | (mask == 0)).all()):
            raise ValueError("a float key_padding_mask must hold only 0 (keep) and -inf (padding)")
        mask = padded
    lengths = tk - mask.sum(1)
    suffix = torch.arange(tk, device=mask.device)[None, :] >= lengths[:, None]
    if not torch.equal(mask, suffix):
        raise ValueError(
            "key_padding_mask must mark a suffix of each row (right padding): "
            "DPMultiheadAttention turns it into per-example key lengths"
        )
    return lengths.to(torch.int32)
