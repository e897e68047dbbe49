"""Dirac canaries for a bias-free linear layer, and their loss (see dp_attn.audit)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dp_attn.audit.bound import _is_int
from dp_attn.checks import check_real


def dirac_canaries(
    in_features: int, out_features: int, count: int, *, norm: float
) -> TensorDataset:
    """`count` Dirac canaries for a bias-free linear layer nn.Linear(in_features, out_features,
    bias=False), to be used with `dirac_loss`.

    Canary i is the input norm·e_j with output direction e_k, (k, j) = divmod(i, in_features):
    its per-example weight gradient is norm·e_k e_jᵀ, a different coordinate for every canary,
    of norm `norm` (choose norm >= max_grad_norm, so that clipping scales every canary to
    exactly max_grad_norm). Needs count <= in_features·out_features.
    """
    for name, value in (
        ("in_features", in_features),
        ("out_features", out_features),
        ("count", count),
    ):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if count > in_features * out_features:
        raise ValueError(
            f"count ({count}) exceeds the number of weight coordinates "
            f"({in_features}·{out_features}): each canary needs its own coordinate"
        )
    norm = check_real("norm", norm, positive=True)
    index = torch.arange(count)
    inputs = torch.zeros(count, in_features)
    inputs[index, index % in_features] = norm
    directions = torch.zeros(count, out_features)
    directions[index, index // in_features] = 1.0
    return TensorDataset(inputs, directions)


def dirac_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-example loss ⟨model(x), u⟩ of (inputs x, output directions u) batches: its gradient
    with respect to the layer's output is u, whatever the parameters."""
    inputs, directions = batch
    return (model(inputs) * directions).sum(-1)
