"""Independent oracles for the DP-SGD kernels: per-example gradients of real torch modules
through torch.func (vmap over grad) in float64, with norms and clipped sums formed by hand."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_example_grads(module: nn.Module, inputs: torch.Tensor, out_grads: torch.Tensor):
    """{name: [B, *param.shape]} gradients of Σ module(x_i) ⊙ out_grads_i for each example i.

    inputs and out_grads are [B, ...] (one example per row); module and tensors in float64.
    """
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p, x, gy):
        return (functional_call(module, p, (x.unsqueeze(0),)).squeeze(0) * gy).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, out_grads)


def linear_grads(a: torch.Tensor, g: torch.Tensor, bias: bool):
    """Per-example (weight [B, dout, din], bias [B, dout] or None) of nn.Linear at inputs a and
    output gradients g ([B, T, d] or [B, d])."""
    lin = nn.Linear(a.shape[-1], g.shape[-1], bias=bias, dtype=torch.float64)
    grads = per_example_grads(lin, a.double(), g.double())
    return grads["weight"], grads.get("bias")


def sq_norms(*grads) -> torch.Tensor:
    """Σ over the given per-example gradients [B, ...] of their squared entries, per example."""
    return sum(x.flatten(1).square().sum(1) for x in grads if x is not None)


def clip_factors_for(norms_sq: torch.Tensor, threshold: float) -> torch.Tensor:
    """min(1, C / (‖g_i‖ + 1e-6)) in fp32, the flat clipping factor."""
    return torch.clamp(threshold / (norms_sq.double().sqrt() + 1e-6), max=1.0).float()
