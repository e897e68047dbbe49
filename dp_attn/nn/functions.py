"""The DP layers' autograd Functions: each backward returns the exact input gradient and,
instead of the parameters' gradient, hands the per-example material (pieces) to the layer's
`dp_clipper` (the GradientClipper of dp_attn.nn.clipper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pieces import EmbeddingPiece, LinearPiece, NormPiece


class DPLinearFunction(torch.autograd.Function):
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
                pieces.append(LinearPiece(x.to(g.dtype), g, target, need_w, need_b))
        if pieces:
            ctx.owner.dp_clipper.record(ctx.owner, pieces)
        return (None, None, *grad_args)


class DPLayerNormFunction(torch.autograd.Function):
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
            piece = NormPiece(
                x_hat,
                g,
                owner.weight if need_w else None,
                owner.bias if need_b else None,
                owner.normalized_shape,
            )
            owner.dp_clipper.record(owner, [piece])
        return None, grad_x, None, None


def _rms_eps(owner, x: torch.Tensor) -> float:
    return owner.eps if owner.eps is not None else torch.finfo(x.dtype).eps


class DPRMSNormFunction(torch.autograd.Function):
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
            piece = NormPiece(x_hat.to(g.dtype), g, owner.weight, None, owner.normalized_shape)
            owner.dp_clipper.record(owner, [piece])
        return None, grad_x, None


class DPEmbeddingFunction(torch.autograd.Function):
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
            piece = EmbeddingPiece(ids, g, owner.weight, owner.padding_idx)
            owner.dp_clipper.record(owner, [piece])
        return None, None, None


def is_recording(layer: nn.Module) -> bool:
    """Whether this forward must go through the layer's autograd Function, whose backward
    hands per-example material to the attached clipper."""
    return layer.dp_clipper is not None and torch.is_grad_enabled()
