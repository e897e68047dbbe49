"""DP layers: drop-in subclasses of nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding and
nn.MultiheadAttention.

Each layer is its nn counterpart with a different forward. Without an engine attached it
computes exactly what the counterpart computes and autograd fills `.grad` as usual
(DPMultiheadAttention runs flash attention instead of materialising the attention matrix).
With a PrivacyEngine attached (`make_private`), the forward goes through a thin
torch.autograd.Function that saves the layer's input; its backward returns the exact input
gradient but, instead of the summed parameter gradient, hands the per-example material
(activations and output gradients) to the engine, which clips and sums it (docs/design.md §1).
The parameter slots get no gradient: the engine writes `.grad` in `optimizer.step()`.

Per-example means along dim 0 of every DP layer's input: models must be batch-first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as DF
from .kernels.flash_attn import MAX_HEAD_DIM
from .kernels.norm_bounds import (
    tied_embedding_head_cross,
    tied_norm_bounds,
    vector_sum_norm_bounds,
)

__all__ = [
    "DPConv1D",
    "DPEmbedding",
    "DPLayerNorm",
    "DPLinear",
    "DPMultiheadAttention",
    "DPRMSNorm",
]


# ---------------------------------------------------------------- per-example material


def _per_example(t: torch.Tensor, what: str) -> torch.Tensor:
    """t [B, *, d] as [B, T, d] (or [B, d]) for the kernels, which take at most one sequence dim."""
    if t.dim() < 2:
        raise ValueError(
            f"{what} needs a batch dimension (dim 0 indexes examples), got shape {tuple(t.shape)}"
        )
    return _rows(t, t.shape[-1]) if t.dim() > 3 else t


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [B, ...] as [B, n, width] (explicit sizes: B may be 0)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]) // width, width)


def _bias_sums(g: torch.Tensor) -> torch.Tensor:
    """Per-example bias gradients Σ_t g_t, fp32 [B, d]."""
    return _rows(g.float(), g.shape[-1]).sum(1)


def _bias_sq_norms(g: torch.Tensor) -> torch.Tensor:
    return _bias_sums(g).square().sum(1)


def _squared(bounds):
    """(norm², release_error², underflow): the form in which the bounds of a group's pieces
    add up (the first two in quadrature, the absolute underflow linearly)."""
    norm, release_error, underflow = bounds
    return norm.square(), release_error.square(), underflow


def _bias_clipped_sum(g: torch.Tensor, clip_factors: torch.Tensor) -> torch.Tensor:
    sums = _bias_sums(g)
    # where, not multiply: an example with factor 0 may be non-finite, and 0 * inf = NaN.
    return torch.where((clip_factors != 0)[:, None], sums * clip_factors[:, None], 0.0).sum(0)


@dataclass(frozen=True)
class _LinearTarget:
    """Where one linear map's gradient goes: rows `weight_rows` of `weight` and `bias_rows` of
    `bias` (None: all). `splits` > 1 marks a stack of that many equal weight matrices (the packed
    Q/K/V in-projection), which block clipping treats as separate matrices. `transposed`: the
    whole weight, stored [in, out] (DPConv1D; no row slices, splits = 1), receives the
    transpose of the [out, in] gradient."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_rows: slice | None = None
    bias_rows: slice | None = None
    splits: int = 1
    transposed: bool = False


class _LinearPiece:
    """One linear map's share of a privacy group: activations a and output gradients g."""

    def __init__(self, a, g, target: _LinearTarget, has_weight: bool, has_bias: bool):
        self.a = _per_example(a, "DP linear input")
        self.g = _per_example(g, "DP linear output")
        self.target, self.has_weight, self.has_bias = target, has_weight, has_bias
        self.batch_size = self.a.shape[0]

    @property
    def blockwise(self) -> bool:
        return self.has_weight

    def _out(self, weight, bias, rows_offset=0, rows=None):
        t = self.target
        out = []
        if t.transposed and weight is not None:  # DPConv1D: one whole matrix, stored [in, out]
            out.append((t.weight, None, weight.t()))
        elif weight is not None:
            out.append((t.weight, _shift(t.weight_rows, rows_offset, rows), weight))
        if bias is not None:
            out.append((t.bias, _shift(t.bias_rows, rows_offset, rows), bias))
        return out

    def sq_norms(self) -> torch.Tensor:
        if not self.has_weight:
            return _bias_sq_norms(self.g)
        return DF.per_example_grad_sq_norms(self.a, self.g, bias=self.has_bias)

    def sq_norm_bounds(self):
        """Certified bounds (norm², release_error², underflow), float64 [B] each, of what
        clipped_sums releases (kernels/norm_bounds.py)."""
        if not self.has_weight:
            return _squared(vector_sum_norm_bounds(self.g))
        return _squared(DF.per_example_grad_norm_bounds(self.a, self.g, bias=self.has_bias))

    def clipped_sums(self, clip_factors: torch.Tensor):
        if not self.has_weight:
            return self._out(None, _bias_clipped_sum(self.g, clip_factors))
        weight, bias = DF.clipped_grad_sum(
            self.a, self.g, clip_factors, bias=self.has_bias, out_dtype=torch.float32
        )
        return self._out(weight, bias)

    def block_sums(self, threshold: float, scale: float):
        rows = self.g.shape[-1] // self.target.splits
        out = []
        for j in range(self.target.splits):
            g = self.g[..., j * rows : (j + 1) * rows]
            weight, bias = DF.block_clipped_grad_sum(
                self.a, g, threshold, scale=scale, bias=self.has_bias, out_dtype=torch.float32
            )
            out += self._out(weight, bias, j * rows, rows)
        return out


def _shift(rows: slice | None, offset: int, length: int | None) -> slice | None:
    """The sub-slice [offset, offset + length) of `rows` (None: the whole tensor)."""
    if length is None:
        return rows
    start = (rows.start or 0) if rows is not None else 0
    return slice(start + offset, start + offset + length)


class _NormPiece:
    """LayerNorm/RMSNorm affine parameters: normalised input x̂ and output gradients g."""

    blockwise = False

    def __init__(self, x_hat, g, weight, bias, normalized_shape):
        if x_hat.dim() <= len(normalized_shape):
            raise ValueError(
                "a DP norm layer's input needs a batch dimension before the normalised ones, "
                f"got shape {tuple(x_hat.shape)}"
            )
        width = (weight if weight is not None else bias).numel()
        self.x_hat = _rows(x_hat, width)
        self.g = g.reshape(self.x_hat.shape)
        self.weight, self.bias = weight, bias
        self.batch_size = x_hat.shape[0]

    def sq_norms(self) -> torch.Tensor:
        if self.weight is None:
            return _bias_sq_norms(self.g)
        return DF.norm_affine_grad_sq_norms(self.x_hat, self.g, bias=self.bias is not None)

    def sq_norm_bounds(self):
        if self.weight is None:
            return _squared(vector_sum_norm_bounds(self.g))
        bias = self.bias is not None
        return _squared(DF.norm_affine_grad_norm_bounds(self.x_hat, self.g, bias=bias))

    def clipped_sums(self, clip_factors: torch.Tensor):
        if self.weight is None:
            bias = _bias_clipped_sum(self.g, clip_factors)
            return [(self.bias, None, bias.view(self.bias.shape))]
        weight, bias = DF.norm_affine_clipped_grad_sum(
            self.x_hat, self.g, clip_factors, bias=self.bias is not None, out_dtype=torch.float32
        )
        out = [(self.weight, None, weight.view(self.weight.shape))]
        if bias is not None:
            out.append((self.bias, None, bias.view(self.bias.shape)))
        return out


class _EmbeddingPiece:
    """Embedding table: token ids and output gradients g."""

    blockwise = False

    def __init__(self, ids, g, weight, padding_idx):
        if ids.dim() < 1:
            raise ValueError("a DP embedding's ids need a batch dimension (dim 0 indexes examples)")
        batch = ids.shape[0]
        self.ids = _rows(ids, 1)[..., 0]
        self.g = _rows(g, g.shape[-1])
        self.weight, self.padding_idx = weight, padding_idx
        self.batch_size = batch

    def sq_norms(self) -> torch.Tensor:
        return DF.embedding_grad_sq_norms(self.ids, self.g, padding_idx=self.padding_idx)

    def sq_norm_bounds(self):
        return _squared(
            DF.embedding_grad_norm_bounds(self.ids, self.g, padding_idx=self.padding_idx)
        )

    def clipped_sums(self, clip_factors: torch.Tensor):
        weight = DF.embedding_clipped_grad_sum(
            self.ids, self.g, clip_factors, self.weight.shape[0],
            padding_idx=self.padding_idx, out_dtype=torch.float32,
        )
        return [(self.weight, None, weight)]


def group_sq_bounds(pieces):
    """Certified bounds (norm², release_error², underflow), float64 [B] each, of one privacy
    group's per-example contribution. Pieces on different parameters add in quadrature; an
    embedding and an output head that share one weight (tied embeddings) need their cross
    term, since that weight's per-example gradient is the sum over both uses."""
    embedding = next((p for p in pieces if isinstance(p, _EmbeddingPiece)), None)
    shares = [p for p in pieces if isinstance(p, _LinearPiece) and p.has_weight
              and embedding is not None and p.target.weight is embedding.weight]  # fmt: skip
    head = shares[0] if shares else None
    if head is None:
        bounds = [p.sq_norm_bounds() for p in pieces]
        return tuple(sum(parts) for parts in zip(*bounds, strict=True))
    keep = torch.ones_like(embedding.ids, dtype=torch.bool)
    if embedding.padding_idx is not None:
        keep = embedding.ids != embedding.padding_idx
    cross = tied_embedding_head_cross(embedding.ids, embedding.g, keep, head.a, head.g)
    emb_bounds = DF.embedding_grad_norm_bounds(
        embedding.ids, embedding.g, padding_idx=embedding.padding_idx
    )
    head_bounds = DF.per_example_grad_norm_bounds(head.a, head.g, bias=head.has_bias)
    total = _squared(tied_norm_bounds(emb_bounds, head_bounds, *cross))
    for piece in pieces:
        if piece is not embedding and piece is not head:
            total = tuple(map(torch.add, total, piece.sq_norm_bounds()))
    return total


# ---------------------------------------------------------------- autograd Functions


class _DPLinearFn(torch.autograd.Function):
    """Several linear maps y_j = x_j W_jᵀ + b_j forming one privacy group (one DPLinear: one
    map; the Q/K/V in-projection: one packed map or three). args = x_1, W_1, b_1, x_2, ..."""

    @staticmethod
    def forward(ctx, owner, targets, *args):
        parts = [args[i : i + 3] for i in range(0, len(args), 3)]
        ctx.owner, ctx.targets = owner, targets
        ctx.save_for_backward(*(t for x, w, _ in parts for t in (x, w)))
        return tuple(F.linear(x, w, b) for x, w, b in parts)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        grad_args, pieces = [], []
        for j, (g, target) in enumerate(zip(grads, ctx.targets, strict=True)):
            x, w = saved[2 * j], saved[2 * j + 1]
            need_x, need_w, need_b = needs[3 * j : 3 * j + 3]
            # Under torch.autocast the forward ran in g's dtype (x and w were cast to it); the
            # input gradient goes back in x's dtype, and the kernels accumulate in fp32.
            grad_x = (g @ w.to(g.dtype)).to(x.dtype) if need_x else None
            grad_args += [grad_x, None, None]
            if need_w or need_b:
                pieces.append(_LinearPiece(x.to(g.dtype), g, target, need_w, need_b))
        if pieces:
            ctx.owner._dp_controller.record(ctx.owner, pieces)
        return (None, None, *grad_args)


class _DPLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner, x, weight, bias):
        out, mean, rstd = torch.native_layer_norm(
            x, owner.normalized_shape, weight, bias, owner.eps
        )
        ctx.owner = owner
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        owner = ctx.owner
        _, need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = None
        if need_x:
            grad_x = torch.ops.aten.native_layer_norm_backward(
                g, x, owner.normalized_shape, mean, rstd, weight, bias, [True, False, False]
            )[0]
        if need_w or need_b:
            x_hat = ((x.float() - mean) * rstd).to(g.dtype)
            piece = _NormPiece(
                x_hat, g, owner.weight if need_w else None, owner.bias if need_b else None,
                owner.normalized_shape,
            )
            owner._dp_controller.record(owner, [piece])
        return None, grad_x, None, None


def _rms_eps(owner, x: torch.Tensor) -> float:
    return owner.eps if owner.eps is not None else torch.finfo(x.dtype).eps


class _DPRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner, x, weight):
        ctx.owner = owner
        ctx.save_for_backward(x, weight)
        return F.rms_norm(x, owner.normalized_shape, weight, owner.eps)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        owner = ctx.owner
        dims = tuple(range(-len(owner.normalized_shape), 0))
        x32 = x.float()
        rstd = torch.rsqrt(x32.square().mean(dims, keepdim=True) + _rms_eps(owner, x))
        x_hat = x32 * rstd
        grad_x = None
        if ctx.needs_input_grad[1]:
            dx_hat = g.float() * weight.float()
            grad_x = rstd * (dx_hat - x_hat * (dx_hat * x_hat).mean(dims, keepdim=True))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[2]:
            piece = _NormPiece(x_hat.to(g.dtype), g, owner.weight, None, owner.normalized_shape)
            owner._dp_controller.record(owner, [piece])
        return None, grad_x, None


class _DPEmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner, ids, weight):
        ctx.owner = owner
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight, owner.padding_idx)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        owner = ctx.owner
        if ctx.needs_input_grad[2]:
            piece = _EmbeddingPiece(ids, g, owner.weight, owner.padding_idx)
            owner._dp_controller.record(owner, [piece])
        return None, None, None


def _private(module: nn.Module) -> bool:
    """Whether this forward must record per-example material for an attached engine."""
    return module._dp_controller is not None and torch.is_grad_enabled()


# ---------------------------------------------------------------- modules


class DPLinear(nn.Linear):
    """nn.Linear whose backward hands per-example material to an attached PrivacyEngine.
    Same constructor, parameters (weight, bias) and state_dict keys as nn.Linear."""

    _dp_controller = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _private(self):
            return F.linear(input, self.weight, self.bias)
        target = _LinearTarget(self.weight, self.bias)
        (out,) = _DPLinearFn.apply(self, (target,), input, self.weight, self.bias)
        return out


class DPConv1D(nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils.Conv1D) for DP training: a linear layer
    y = x @ weight + bias whose weight is stored transposed, [nx, nf] = [in, out]. Same
    constructor (nf = out features, nx = in features), attributes and state_dict keys, so that
    a Conv1D is converted in place (the dp_attn.integrations.transformers integration does)."""

    _dp_controller = None

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _private(self):
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
            return out.view(*x.shape[:-1], self.nf)
        target = _LinearTarget(self.weight, self.bias, transposed=True)
        (out,) = _DPLinearFn.apply(self, (target,), x, self.weight.t(), self.bias)
        return out

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


class DPLayerNorm(nn.LayerNorm):
    """nn.LayerNorm (with elementwise affine parameters) for DP training."""

    _dp_controller = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_norm(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _private(self):
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return _DPLayerNormFn.apply(self, input, self.weight, self.bias)


class DPRMSNorm(nn.RMSNorm):
    """nn.RMSNorm (with an elementwise affine weight) for DP training."""

    _dp_controller = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _private(self):
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return _DPRMSNormFn.apply(self, x, self.weight)


def _check_norm(module: nn.Module) -> None:
    if module.weight is None:
        raise ValueError(
            f"{type(module).__name__} needs elementwise_affine=True: without affine parameters "
            f"the norm has nothing to train; use the plain nn module"
        )


class DPEmbedding(nn.Embedding):
    """nn.Embedding for DP training. max_norm, scale_grad_by_freq and sparse are not
    supported (they make the gradient depend on the whole batch or use sparse gradients)."""

    _dp_controller = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_embedding(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _private(self):
            return F.embedding(input, self.weight, self.padding_idx)
        controller = self._dp_controller
        if input.dim() >= 2:
            controller.forward_tokens = tuple(input.shape[:2])
        else:
            input = _per_example_positions(self, input, controller.forward_tokens)
        return _DPEmbeddingFn.apply(self, input, self.weight)


def _per_example_positions(module, ids, tokens):
    """1-D ids under an engine: nanoGPT's `wpe(torch.arange(T))`, whose [T, d] output the model
    broadcasts over the batch, so that autograd would sum the examples' gradients into one.
    When a batched embedding of this forward saw (B, T) tokens and ids has T entries, the ids
    are positions: expanded to [B, T], each example gets its own gradient rows (and the output,
    [B, T, d], broadcasts as before). Otherwise 1-D ids are one token per example, [B]."""
    if tokens is not None and ids.shape[0] == tokens[1]:
        return ids.expand(tokens[0], -1)
    if tokens is None or ids.shape[0] == tokens[0]:
        return ids
    raise ValueError(
        f"{type(module).__name__} got 1-D ids of length {ids.shape[0]}, neither this forward's "
        f"batch ({tokens[0]}) nor its sequence length ({tokens[1]}): give the ids a batch "
        "dimension, e.g. positions[None].expand(batch_size, -1)"
    )


def _check_embedding(module: nn.Embedding) -> None:
    for option, off in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
        if getattr(module, option) != off:
            raise ValueError(
                f"DPEmbedding does not support {option}={getattr(module, option)!r} "
                f"(use {option}={off!r})"
            )


class DPMultiheadAttention(nn.MultiheadAttention):
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

    _dp_controller = None

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=True, device=None,
                 dtype=None):  # fmt: skip
        super().__init__(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
            batch_first, device, dtype,
        )
        _check_attention(self)
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
        key_lengths = _key_lengths(key_padding_mask, batch, tk)
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
            if not _private(self):
                return F.linear(query, weight, bias).chunk(3, dim=-1)
            target = _LinearTarget(weight, bias, splits=3)
            (qkv,) = _DPLinearFn.apply(self, (target,), query, weight, bias)
            return qkv.chunk(3, dim=-1)
        rows = [slice(j * e, (j + 1) * e) for j in range(3)]
        if self._qkv_same_embed_dim:
            weights = [self.in_proj_weight[r] for r in rows]
            targets = [_LinearTarget(self.in_proj_weight, self.in_proj_bias, r, r) for r in rows]
        else:
            weights = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
            targets = [
                _LinearTarget(w, self.in_proj_bias, None, r)
                for w, r in zip(weights, rows, strict=True)
            ]
        biases = [None] * 3 if self.in_proj_bias is None else [self.in_proj_bias[r] for r in rows]
        inputs = (query, key, value)
        if not _private(self):
            return [F.linear(x, w, b) for x, w, b in zip(inputs, weights, biases, strict=True)]
        args = [t for part in zip(inputs, weights, biases, strict=True) for t in part]
        return _DPLinearFn.apply(self, tuple(targets), *args)


def _check_attention(module: nn.MultiheadAttention) -> None:
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


def _key_lengths(key_padding_mask, batch: int, tk: int) -> torch.Tensor | None:
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
