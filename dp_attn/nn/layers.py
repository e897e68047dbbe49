"""DP layers for linear maps, norms and embeddings: drop-in subclasses of nn.Linear,
nn.LayerNorm, nn.RMSNorm, nn.Embedding, and GPT-2's Conv1D (see dp_attn.nn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clipper import DPLayer
from .functions import (
    DPEmbeddingFunction,
    DPLayerNormFunction,
    DPLinearFunction,
    DPRMSNormFunction,
    is_recording,
)
from .pieces import LinearTarget


class DPLinear(DPLayer, nn.Linear):
    """nn.Linear whose backward hands per-example material to an attached PrivacyEngine.
    Same constructor, parameters (weight, bias) and state_dict keys as nn.Linear."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not is_recording(self):
            return F.linear(input, self.weight, self.bias)
        target = LinearTarget(self.weight, self.bias)
        (out,) = DPLinearFunction.apply(self, (target,), input, self.weight, self.bias)
        return out


class DPConv1D(DPLayer, nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils.Conv1D) for DP training: a linear layer
    y = x @ weight + bias whose weight is stored transposed, [nx, nf] = [in, out]. Same
    constructor (nf = out features, nx = in features), attributes and state_dict keys, so that
    a Conv1D is converted in place (the dp_attn.integrations.transformers integration does)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_recording(self):
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
            return out.view(*x.shape[:-1], self.nf)
        target = LinearTarget(self.weight, self.bias, transposed=True)
        (out,) = DPLinearFunction.apply(self, (target,), x, self.weight.t(), self.bias)
        return out

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


class DPLayerNorm(DPLayer, nn.LayerNorm):
    """nn.LayerNorm (with elementwise affine parameters) for DP training."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_norm(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not is_recording(self):
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return DPLayerNormFunction.apply(self, input, self.weight, self.bias)


class DPRMSNorm(DPLayer, nn.RMSNorm):
    """nn.RMSNorm (with an elementwise affine weight) for DP training."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_recording(self):
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return DPRMSNormFunction.apply(self, x, self.weight)


def check_norm(module: nn.Module) -> None:
    if module.weight is None:
        raise ValueError(
            f"{type(module).__name__} needs elementwise_affine=True: without affine parameters "
            f"the norm has nothing to train; use the plain nn module"
        )


class DPEmbedding(DPLayer, nn.Embedding):
    """nn.Embedding for DP training. max_norm, scale_grad_by_freq and sparse are not
    supported (they make the gradient depend on the whole batch or use sparse gradients)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_embedding(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        clipper = self.dp_clipper
        if clipper is None or not is_recording(self):
            return F.embedding(input, self.weight, self.padding_idx)
        if input.dim() >= 2:
            clipper.forward_token_shape = (input.shape[0], input.shape[1])
        else:
            input = _per_example_positions(self, input, clipper.forward_token_shape)
        return DPEmbeddingFunction.apply(self, input, self.weight)


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


def check_embedding(module: nn.Embedding) -> None:
    for option, off in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
        if getattr(module, option) != off:
            raise ValueError(
                f"DPEmbedding does not support {option}={getattr(module, option)!r} "
                f"(use {option}={off!r})"
            )
