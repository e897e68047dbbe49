"""Pieces: one DP layer's per-example material for one backward pass, with the certified
bounds and clipped sums of its parameters' per-example gradients (the Piece and BlockPiece
interfaces of dp_attn.nn.clipper), computed by dp_attn.functional."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import functional as DF
from ..kernels.norm_bounds import (
    tied_embedding_head_cross,
    tied_norm_bounds,
    vector_sum_norm_bounds,
)


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
class LinearTarget:
    """Where one linear map's gradient goes: rows `weight_rows` of `weight` and `bias_rows` of
    `bias` (None: all). `splits` > 1 marks a stack of that many equal weight matrices (the packed
    Q/K/V in-projection), which block clipping treats as separate matrices. `transposed`: the
    whole weight, stored [in, out] (DPConv1D; no row slices, splits = 1), receives the
    transpose of the [out, in] gradient."""

    weight: torch.Tensor  # a Parameter (torch's layers declare theirs as Tensor)
    bias: torch.Tensor | None
    weight_rows: slice | None = None
    bias_rows: slice | None = None
    splits: int = 1
    transposed: bool = False


class LinearPiece:
    """One linear map's share of a privacy group: activations a and output gradients g."""

    def __init__(self, a, g, target: LinearTarget, has_weight: bool, has_bias: bool):
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

    def block_sums(self, tile_threshold: float, scale: float):
        rows = self.g.shape[-1] // self.target.splits
        out = []
        for j in range(self.target.splits):
            g = self.g[..., j * rows : (j + 1) * rows]
            weight, bias = DF.block_clipped_grad_sum(
                self.a,
                g,
                tile_threshold,
                scale=scale,
                bias=self.has_bias,
                out_dtype=torch.float32,
            )
            out += self._out(weight, bias, j * rows, rows)
        return out

    def finite_examples(self) -> torch.Tensor:
        return torch.isfinite(self.a).flatten(1).all(1) & torch.isfinite(self.g).flatten(1).all(1)


def _shift(rows: slice | None, offset: int, length: int | None) -> slice | None:
    """The sub-slice [offset, offset + length) of `rows` (None: the whole tensor)."""
    if length is None:
        return rows
    start = (rows.start or 0) if rows is not None else 0
    return slice(start + offset, start + offset + length)


class NormPiece:
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
            bias_only = _bias_clipped_sum(self.g, clip_factors)
            return [(self.bias, None, bias_only.view(self.bias.shape))]
        weight_sum, bias_sum = DF.norm_affine_clipped_grad_sum(
            self.x_hat, self.g, clip_factors, bias=self.bias is not None, out_dtype=torch.float32
        )
        out = [(self.weight, None, weight_sum.view(self.weight.shape))]
        if bias_sum is not None:
            out.append((self.bias, None, bias_sum.view(self.bias.shape)))
        return out


class EmbeddingPiece:
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
            self.ids,
            self.g,
            clip_factors,
            self.weight.shape[0],
            padding_idx=self.padding_idx,
            out_dtype=torch.float32,
        )
        return [(self.weight, None, weight)]


def group_sq_bounds(pieces):
    """Certified bounds (norm², release_error², underflow), float64 [B] each, of one privacy
    group's per-example contribution. Pieces on different parameters add in quadrature; an
    embedding and an output head that share one weight (tied embeddings) need their cross
    term, since that weight's per-example gradient is the sum over both uses."""
    embedding = next((p for p in pieces if isinstance(p, EmbeddingPiece)), None)
    shares = [
        p
        for p in pieces
        if isinstance(p, LinearPiece)
        and p.has_weight
        and embedding is not None
        and p.target.weight is embedding.weight
    ]
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
