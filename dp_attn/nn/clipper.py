"""The contract between the DP layers and whatever clips their per-example gradients.

A DP layer (a DPLayer) knows nothing of the engine: `make_private` sets each layer's
`dp_clipper` to a GradientClipper (dp_attn.clipping.Clipper), and the layer's backward calls
`dp_clipper.record(layer, pieces)` with its per-example material (Pieces) instead of
accumulating `.grad` (docs/design.md §2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

# Certified bounds on one privacy group's per-example contribution, float64 [B] each:
# (norm², release_error², underflow) (kernels/norm_bounds.py). The first two add up in
# quadrature over the pieces of a group, the absolute underflow linearly.
SqBounds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# One parameter's share of a clipped sum: (parameter, its rows that receive it (None: the
# whole parameter), the fp32 value Σ_i c_i·g_i over the examples i).
ClippedSum = tuple[nn.Parameter, slice | None, torch.Tensor]


class Piece(Protocol):
    """One DP layer's share of a privacy group in one backward pass: per-example material
    (activations and output gradients; x̂ and g for a norm; ids and g for an embedding)."""

    batch_size: int  # B: dim 0 of the layer's input, one index per example
    g: torch.Tensor  # the layer's output gradients, [B, ...]
    blockwise: bool  # clipped tile by tile under block clipping: a BlockPiece

    def sq_norm_bounds(self) -> SqBounds:
        """Certified bounds on each example's gradient for this piece's parameters."""
        ...

    def clipped_sums(self, clip_factors: torch.Tensor) -> list[ClippedSum]:
        """Σ_i clip_factors[i]·(example i's gradient), fp32 (an example with factor 0 adds
        exactly 0, even if its material is not finite)."""
        ...


class BlockPiece(Piece, Protocol):
    """A piece with a weight matrix: block clipping clips each of its 128×128 tiles."""

    def block_sums(self, tile_threshold: float, scale: float) -> list[ClippedSum]:
        """Σ_i of example i's gradient (scaled by `scale`), each tile clipped to
        tile_threshold inside the GEMM (dp_attn.functional.block_clipped_grad_sum)."""
        ...

    def finite_examples(self) -> torch.Tensor:
        """bool [B]: whether example i's material is finite (block clipping's tiles of a
        non-finite example add 0; this counts them in engine.stats)."""
        ...


class GradientClipper(Protocol):
    """What a DP layer calls while an engine is attached (the layer's `dp_clipper`)."""

    # (examples, tokens) of the last batched embedding lookup of the current forward, written
    # and read by DPEmbedding to give 1-D position ids a batch dimension (nanoGPT's wpe).
    forward_token_shape: tuple[int, int] | None

    def record(self, layer: nn.Module, pieces: Sequence[Piece]) -> None:
        """From `layer`'s backward: the per-example material of one of its privacy groups.
        The clipper clips and sums it; the layer gives its parameters no gradient."""
        ...


class DPLayer(nn.Module):
    """Base of the DP layers (mixed into their torch classes): `dp_clipper` is None until
    make_private attaches the engine's clipper; while None the layer computes what its torch
    counterpart computes, and autograd fills `.grad` as usual."""

    dp_clipper: GradientClipper | None = None
