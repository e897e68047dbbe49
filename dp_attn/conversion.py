"""Module conversion and the refusal checks of make_private (docs/design.md §1, coverage and
"nothing mixes examples"): nn layers become their dp_attn.nn versions in place, every
trainable parameter must belong to exactly one DP layer (tied embeddings excepted), and what
would release batch statistics or unclipped gradients is refused or guarded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import integrations
from .kernels.utils import FLOAT_DTYPES
from .nn import DPEmbedding, DPLayer, DPLayerNorm, DPLinear, DPMultiheadAttention, DPRMSNorm
from .nn.attention import check_attention
from .nn.layers import check_embedding

# What convert_module turns into what: exact types only (a subclass's forward may differ).
CONVERSIONS = {
    nn.Linear: DPLinear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: DPLinear,
    nn.LayerNorm: DPLayerNorm,
    nn.RMSNorm: DPRMSNorm,
    nn.Embedding: DPEmbedding,
    nn.MultiheadAttention: DPMultiheadAttention,
}


def convert_module(module: nn.Module) -> nn.Module:
    """Turn every nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding and nn.MultiheadAttention
    in `module` (itself included) into its dp_attn.nn version, in place: the same module and
    Parameter objects, now of the DP class. Norms without affine parameters stay as they are,
    and so do subclasses of these modules (their forward may differ). Without an engine the
    DP layers compute what their nn counterparts do (attention by flash attention)."""
    convert(module)
    return module


def convert(module: nn.Module) -> list[tuple[nn.Module, type]]:
    """convert_module; returns [(module, its former class)] of what it changed."""
    integrations.prepare_model(module)  # third-party modules (transformers) first
    found = []
    for name, m in module.named_modules():
        cls = CONVERSIONS.get(type(m))
        if cls is None or (cls in (DPLayerNorm, DPRMSNorm) and m.weight is None):
            continue
        try:
            if cls is DPMultiheadAttention:
                check_attention(m)
            elif cls is DPEmbedding:
                check_embedding(m)
        except ValueError as err:
            raise ValueError(f"cannot make {name or 'the model'} private: {err}") from None
        found.append((m, cls))
        if cls is DPMultiheadAttention:
            found.append((m.out_proj, DPLinear))
    changed = []
    for m, cls in found:
        if type(m) is not cls:
            changed.append((m, type(m)))
            m.__class__ = cls
    return changed


@dataclass
class PrivateLayer:
    """A DP layer with trainable parameters: one privacy group under per-layer clipping, or,
    tied_to set, part of the group of that embedding (a head sharing its weight)."""

    module: nn.Module
    params: list  # [(qualified name, Parameter)] it owns and trains
    tied_to: nn.Module | None = None


def _tie(first: nn.Module, second: nn.Module, p: nn.Parameter) -> nn.Module | None:
    """The embedding of a supported tie (one weight for an embedding and an output head), or
    None: every other sharing is refused."""
    pair = {type(first): first, type(second): second}
    embedding, head = pair.get(DPEmbedding), pair.get(DPLinear)
    if embedding is None or head is None or not (embedding.weight is p is head.weight):
        return None
    return embedding


def private_layers(module: nn.Module) -> list[tuple[str, PrivateLayer]]:
    """The DP layers owning trainable parameters; refuses uncovered parameters and shared ones
    other than tied embeddings (an nn.Embedding and an nn.Linear head with one weight)."""
    layers: list[tuple[str, PrivateLayer]] = []
    owner: dict[nn.Parameter, tuple[str, nn.Module]] = {}  # a parameter's first DP layer
    by_module: dict[nn.Module, PrivateLayer] = {}
    tied_embeddings: set[nn.Module] = set()
    head_of: dict[nn.Module, str] = {}  # a tied embedding's one head
    for name, m in module.named_modules():
        if not isinstance(m, DPLayer):
            continue
        prefix = f"{name}." if name else ""
        params, tied_to = [], None
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = prefix + pname
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"parameter {full} of {type(m).__name__} has dtype {p.dtype}; the DP kernels "
                    "take float16, bfloat16 and float32: convert the model with model.float() "
                    "(and train in lower precision with torch.autocast)"
                )
            if p in owner:
                first_name, first = owner[p]
                embedding = _tie(first, m, p)
                if embedding is None:
                    raise ValueError(
                        f"parameter {first_name} is also {full}: the DP layers "
                        f"{first_name.rpartition('.')[0] or 'the model'} and {name or 'the model'}"
                        " share it, and only an embedding's weight shared with an nn.Linear "
                        "output head (tied embeddings) is supported: its per-example gradient "
                        f"is the sum over its uses. Untie it, e.g. model.{full} = "
                        f"nn.Parameter(model.{first_name}.detach().clone()), or freeze it"
                    )
                head = first_name.rpartition(".")[0] if embedding is m else name
                if embedding in head_of:
                    # The group's bound has one cross term (embedding and head); more heads
                    # would add their aligned uses in quadrature.
                    raise ValueError(
                        f"parameter {full}: the DP layers {head_of[embedding]} and {head} both "
                        "use the weight of one embedding as their output weight; a tied "
                        "embedding may have one nn.Linear head. Untie the others, e.g. "
                        f"model.{full} = nn.Parameter(model.{full}.detach().clone()), or "
                        "freeze it"
                    )
                head_of[embedding] = head
                # The weight stays with its first layer; the group is the embedding's.
                if embedding is m:
                    by_module[first].tied_to = m
                    tied_embeddings.add(m)
                else:
                    tied_to = embedding
                continue
            owner[p] = (full, m)
            params.append((full, p))
        if params or tied_to is not None or m in tied_embeddings:
            layer = PrivateLayer(m, params, tied_to)
            layers.append((name, layer))
            by_module[m] = layer
    uncovered = [
        name
        for name, p in module.named_parameters(remove_duplicate=False)
        if p.requires_grad and p not in owner
    ]
    if uncovered:
        raise ValueError(
            "every trainable parameter must belong to a DP layer (nn.Linear, nn.LayerNorm, "
            "nn.RMSNorm, nn.Embedding or nn.MultiheadAttention, converted by make_private); "
            f"these do not: {', '.join(uncovered)}. Freeze them (requires_grad_(False)) or "
            "build their modules from those layers"
        )
    return layers


def check_optimizer_params(optimizer, layers) -> None:
    private = {p for _, layer in layers for _, p in layer.params}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.requires_grad and p not in private:
                raise ValueError(
                    f"optimizer param_groups[{i}] holds a trainable parameter of shape "
                    f"{tuple(p.shape)} that is not a private parameter of the module"
                )


def refuse_batch_statistics(module: nn.Module) -> None:
    """Refuse the norms that mix examples: BatchNorm normalises each example with the
    statistics of its batch (one outlier moves every example's gradient), and running
    statistics are batch statistics released without noise."""
    for name, m in module.named_modules():
        where = f"{name or 'the model'} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"cannot make {where} private: batch normalisation mixes the examples of a "
                "batch and its running statistics release them without noise. Replace it "
                "with nn.GroupNorm or nn.LayerNorm"
            )
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise ValueError(
                f"cannot make {where} private: its running statistics are batch statistics, "
                "released without noise. Build it with track_running_stats=False (or use "
                "nn.GroupNorm)"
            )


class BufferGuard:
    """Forward hooks on a module that owns buffers: a buffer replaced or written in place
    (its version counter moves) during a training forward with autograd on is a statistic of
    the batch, and releasing the model would release it without noise: raise, and poison the
    step so that nothing of it is released."""

    def __init__(self, name: str, poison: Callable[[str], None]):
        self.name, self.poison = name, poison  # poison(reason): void the step (the Clipper's)
        self.before: list[dict | None] = []  # one snapshot per forward in progress (nested calls)

    def attach(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self.pre)
        module.register_forward_hook(self.post)

    @staticmethod
    def snapshot(module: nn.Module) -> dict:
        return {n: (id(b), b._version) for n, b in module.named_buffers(recurse=False)}

    @torch.compiler.disable
    def pre(self, module, args) -> None:
        watched = module.training and torch.is_grad_enabled()
        self.before.append(self.snapshot(module) if watched else None)

    @torch.compiler.disable
    def post(self, module, args, output) -> None:
        before = self.before.pop() if self.before else None
        if before is None:
            return
        after = self.snapshot(module)
        changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
        if changed:
            where = f"{self.name}." if self.name else ""
            self.poison(f"{where}{changed[0]} changed during a training forward")
            raise RuntimeError(
                f"{type(module).__name__} {self.name or '(the model)'} changed its buffer "
                f"{where}{changed[0]} during a training forward pass: a buffer computed from "
                "the batch (running statistics) would be released without noise. Use modules "
                "without batch statistics (nn.GroupNorm, nn.LayerNorm), or run this module "
                "in eval mode or under torch.no_grad()"
            )


def refuse_outside_gradient(name: str):
    """Tensor hook on a private parameter: DP layers give it no gradient (the engine writes
    .grad in step), so any gradient autograd delivers comes from a use outside its DP layer."""

    def hook(grad):
        if grad is not None:
            raise RuntimeError(
                f"parameter {name} received a gradient from outside its DP layer (it is used "
                "directly, e.g. a weight tied through F.linear, or a penalty term in the loss); "
                "such a gradient is not clipped per example. Untie the parameter; use the "
                "optimizer's weight_decay instead of a penalty in the loss"
            )

    return hook
