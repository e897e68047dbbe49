"""Import-and-call API. Each function checks its inputs and dispatches to the Triton
kernel's launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or its plain-PyTorch
twin (`*_reference`, beside the kernel in its family's file)."""

from __future__ import annotations

import torch

from .checks import check_bool, check_int, is_int, is_real
from .kernels import clipped_sum, embedding, noise, norm_affine, norm_bounds, per_example_norms
from .kernels.flash_attn import (
    attention_reference,
    check_attention_args,
    check_key_lengths_range,
    flash_attention_triton,
)
from .kernels.utils import FLOAT_DTYPES, check_nonnegative, check_same, check_tensor, use_triton

__all__ = [
    "BLOCK_CLIP_TILE",
    "add_gaussian_noise_",
    "block_clip_num_groups",
    "block_clipped_grad_sum",
    "clip_factors",
    "clipped_grad_sum",
    "embedding_clipped_grad_sum",
    "embedding_grad_norm_bounds",
    "embedding_grad_sq_norms",
    "flash_attention",
    "norm_affine_clipped_grad_sum",
    "norm_affine_grad_norm_bounds",
    "norm_affine_grad_sq_norms",
    "per_example_grad_norm_bounds",
    "per_example_grad_sq_norms",
]

# ---------------------------------------------------------------- attention


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention softmax(q kᵀ · softmax_scale) v, differentiable in q, k and v.

    Layout as torch.nn.functional.scaled_dot_product_attention: q [B, H, Tq, D], k and v
    [B, Hkv, Tk, D], output [B, H, Tq, D] in q's dtype (memory laid out as [B, Tq, H, D], like
    SDPA's flash backend, so that `out.transpose(1, 2).reshape(B, Tq, H * D)` is a view).

    - GQA/MQA: Hkv must divide H; query head h uses kv head h // (H // Hkv), and the gradients
      of k and v are summed over the query heads that share them.
    - softmax_scale: a finite number > 0, default 1 / sqrt(D).
    - causal: query i sees keys j <= i + Tk - Tq (aligned bottom-right when Tq != Tk, as in
      FlashAttention-2; the usual lower triangle when Tq == Tk).
    - key_lengths: int32/int64 [B] on q's device, values in [0, Tk]; keys j >= key_lengths[b]
      are masked for example b (right padding). Examples never see each other's data.
    - A query row that sees no key (causal with Tq > Tk, or key_lengths[b] = 0) outputs 0 and
      gets zero gradients, never NaN. B = 0 (an empty Poisson batch) gives an empty output.
    - any head dim D from 1 to 256; fp16, bf16, fp32 (on GPU, fp32 matmuls use 3xTF32, about
      fp32 accuracy, or plain TF32 when torch.backends.cuda.matmul.allow_tf32 is set); any Tq,
      Tk; q, k, v may be non-contiguous views (e.g. of one fused QKV projection output) and
      are not copied.
    - The backward is deterministic (no atomics).

    CUDA tensors run the Triton kernels; CPU tensors run them through Triton's interpreter when
    TRITON_INTERPRET=1 and the plain-PyTorch reference otherwise. Bad arguments raise
    TypeError/ValueError naming the argument.
    """
    softmax_scale = check_attention_args(
        q, k, v, causal=causal, softmax_scale=softmax_scale, key_lengths=key_lengths
    )
    if use_triton(q, k, v):
        return flash_attention_triton(q, k, v, causal, softmax_scale, key_lengths)
    check_key_lengths_range(key_lengths, k.shape[2])
    return attention_reference(
        q, k, v, causal=causal, softmax_scale=softmax_scale, key_lengths=key_lengths
    )


# ---------------------------------------------------------------- DP-SGD kernels for layers
# Per-example gradient norms and clipped sums for linear, norm-affine and embedding layers
# (docs/design.md §1, §3), and the Gaussian noise added once per step to their sums. Noise is
# Philox-4x32-10 keyed by the 128-bit noise_key(seed) (the OS CSPRNG when seed is None), every
# element with its own counter and lane by the rule in kernels/noise.py; twin and kernel draw
# the same noise. secure_mode=True resists floating-point attacks on the Gaussian samples
# (docs/threat_model.md).


def _check_number(name: str, value, *, nonnegative: bool) -> float:
    if not is_real(value):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if nonnegative:
        check_nonnegative(name, value)
    elif value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None or float16, bfloat16, float32, got {out_dtype}")


def _check_pair(x_name: str, x, g, *, same_width: bool) -> None:
    """x [B, T, d_x] or [B, d_x] and g [B, T, d_g] or [B, d_g] on one device with one dtype."""
    check_tensor(x_name, x, ndim=(2, 3))
    check_tensor("g", g, ndim=(2, 3))
    check_same("device", **{x_name: x, "g": g})
    check_same("dtype", **{x_name: x, "g": g})
    lead_ok = x.dim() == g.dim() and x.shape[:-1] == g.shape[:-1]
    if not lead_ok or (same_width and x.shape != g.shape):
        want = "the same shape" if same_width else "the same batch and sequence dimensions"
        shapes = f"{tuple(x.shape)} and {tuple(g.shape)}"
        raise ValueError(f"{x_name} and g must have {want}, got {shapes}")
    if x.shape[-1] == 0 or g.shape[-1] == 0:
        shapes = f"{tuple(x.shape)} and {tuple(g.shape)}"
        raise ValueError(f"{x_name} and g need at least one feature, got {shapes}")


def _check_clip_factors(clip_factors, batch: int, like: torch.Tensor) -> None:
    check_tensor("clip_factors", clip_factors, ndim=1, dtypes=(torch.float32,))
    if clip_factors.shape[0] != batch:
        raise ValueError(
            f"clip_factors must have one entry per example ({batch}), got {clip_factors.shape[0]}"
        )
    check_same("device", clip_factors=clip_factors, g=like)


def _check_sum_args(scale, out_dtype) -> float:
    _check_out_dtype(out_dtype)
    return _check_number("scale", scale, nonnegative=False)


def per_example_grad_sq_norms(
    a: torch.Tensor, g: torch.Tensor, *, bias: bool = True, method: str | None = None
) -> torch.Tensor:
    """Squared L2 norm of each example's linear-layer gradient, fp32 [B].

    a: activations [B, T, din] or [B, din]; g: output gradients [B, T, dout] or [B, dout].
    Per example ‖g_iᵀ a_i‖_F², plus ‖Σ_t g_it‖² with bias. method: "ghost" (pairs of T-tiles
    of (a aᵀ)⊙(g gᵀ)), "instantiate" (dout×din tiles of g_iᵀ a_i), or None for the cheaper by
    FLOPs (per_example_norms.grad_norm_method). Neither holds a T×T matrix or a per-example
    gradient.
    """
    _check_pair("a", a, g, same_width=False)
    if method not in (None, "ghost", "instantiate"):
        raise ValueError(f"method must be None, 'ghost' or 'instantiate', got {method!r}")
    sq_norms = (
        per_example_norms.per_example_grad_sq_norms
        if use_triton(a, g)
        else per_example_norms.per_example_grad_sq_norms_reference
    )
    return sq_norms(a, g, bias=bias, method=method)


def clip_factors(
    norm: torch.Tensor, release_error: torch.Tensor, underflow: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Clip factors clamp((C·(1 + 1e-5) - underflow) / (norm + release_error + 1e-6), 0, 1),
    float32 [B] rounded toward zero (what the clipped sums take), from the bounds of
    per_example_grad_norm_bounds (norm and release_error summed in quadrature over the layers
    of a group, underflow summed): each example's released contribution is then at most
    C·(1 + 1e-5), rounding included."""
    if not is_real(threshold):
        raise TypeError(f"threshold must be a Python number, got {type(threshold).__name__}")
    if not threshold >= 0:  # inf is allowed: no clipping
        raise ValueError(f"threshold must be a number >= 0, got {threshold}")
    factors = norm_bounds.clip_factors(norm, release_error, underflow, threshold)
    return norm_bounds.as_fp32_factors(factors)


def per_example_grad_norm_bounds(
    a: torch.Tensor, g: torch.Tensor, *, bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Certified bounds (norm, release_error, underflow) of each example's linear-layer
    gradient, float64 [B] each.

    norm >= the exact norm ‖g_iᵀ a_i‖ (+ bias), within ~1e-5 of it on ordinary inputs;
    release_error bounds the rounding of clipped_grad_sum: for any clip factors c, the part of
    clipped_grad_sum(a, g, c, bias=bias) that example i contributes has norm at most
    c_i·(norm_i + release_error_i) + underflow_i, whatever the values of a and g (crafted
    cancellations, magnitudes up to the dtype's range; underflow, absolute, is below 1e-30 for
    ordinary fp32 inputs). clip_factors(norm, release_error, underflow, C) gives factors
    whose contributions are at most C·(1 + 1e-5). Both are finite for every finite example
    (inf or NaN only when a or g is); kernels/norm_bounds.py has the error analysis.
    """
    _check_pair("a", a, g, same_width=False)
    seq_len = a.shape[1] if a.dim() == 3 else 1
    method = norm_bounds.certified_norm_method(seq_len, a.shape[-1], g.shape[-1], a.device)
    sq = per_example_grad_sq_norms(a, g, bias=bias, method=method)
    return norm_bounds.linear_norm_bounds(sq, a, g, bias=bias, method=method)


def clipped_grad_sum(
    a: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    *,
    scale: float = 1.0,
    bias: bool = True,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clipped linear-layer gradient: (weight_grad [dout, din], bias_grad [dout] | None).

    weight_grad = scale·Σ_i c_i g_iᵀ a_i, bias_grad = scale·Σ_i c_i Σ_t g_it; one GEMM over the
    B·T rows with rows scaled by c_i in-kernel, fp32 accumulation, stored in out_dtype (default
    a.dtype). clip_factors: fp32 [B]; an example with c_i = 0 contributes exactly 0 even if its
    a or g is not finite. No noise: add it once to the summed gradients (add_gaussian_noise_).
    """
    _check_pair("a", a, g, same_width=False)
    _check_clip_factors(clip_factors, a.shape[0], g)
    scale = _check_sum_args(scale, out_dtype)
    clipped_sum_fn = (
        clipped_sum.clipped_grad_sum
        if use_triton(a, g, clip_factors)
        else clipped_sum.clipped_grad_sum_reference
    )
    return clipped_sum_fn(a, g, clip_factors, scale=scale, bias=bias, out_dtype=out_dtype)


# Tile (rows of dout, columns of din) of the weight gradient that is one block-clipping group.
BLOCK_CLIP_TILE = clipped_sum.BLOCK_CLIP_TILE


def block_clip_num_groups(dout: int, din: int) -> int:
    """Number K of block-clipping groups of one [dout, din] linear layer (its bias included):
    the BLOCK_CLIP_TILE tiles of the weight gradient. Set per-group thresholds C/√K_total."""
    check_int("dout", dout, minimum=1)
    check_int("din", din, minimum=1)
    return clipped_sum.block_clip_num_groups(dout, din)


def block_clipped_grad_sum(
    a: torch.Tensor,
    g: torch.Tensor,
    threshold: float,
    *,
    scale: float = 1.0,
    bias: bool = True,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-clipped linear-layer gradient: (weight_grad, bias_grad | None).

    Each example's contribution to each group is clipped to L2 norm `threshold` before it is
    summed. A group is one BLOCK_CLIP_TILE = (128, 128) tile of the [dout, din] weight gradient
    (rows of dout × columns of din, aligned at 0); the bias slice of a tile's rows belongs to the
    tile in the first column. Clip factor min(1, threshold / (norm + 1e-6)), 0 for a non-finite
    norm. Scale and dtypes as in clipped_grad_sum.
    """
    _check_pair("a", a, g, same_width=False)
    threshold = _check_number("threshold", threshold, nonnegative=True)
    scale = _check_sum_args(scale, out_dtype)
    block_sum_fn = (
        clipped_sum.block_clipped_grad_sum
        if use_triton(a, g)
        else clipped_sum.block_clipped_grad_sum_reference
    )
    return block_sum_fn(a, g, threshold, scale=scale, bias=bias, out_dtype=out_dtype)


def norm_affine_grad_sq_norms(
    x_hat: torch.Tensor, g: torch.Tensor, *, bias: bool = True
) -> torch.Tensor:
    """Squared norm of each example's LayerNorm/RMSNorm affine gradient, fp32 [B].

    x_hat: the normalised input [B, T, d] or [B, d]; g: output gradients of the same shape.
    Per example ‖Σ_t g_t ⊙ x̂_t‖² (weight), plus ‖Σ_t g_t‖² with bias.
    """
    _check_pair("x_hat", x_hat, g, same_width=True)
    sq_norms = (
        norm_affine.norm_affine_grad_sq_norms
        if use_triton(x_hat, g)
        else norm_affine.norm_affine_grad_sq_norms_reference
    )
    return sq_norms(x_hat, g, bias=bias)


def norm_affine_grad_norm_bounds(
    x_hat: torch.Tensor, g: torch.Tensor, *, bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Certified bounds (norm, release_error, underflow) of each example's LayerNorm/RMSNorm
    affine gradient
    (for norm_affine_clipped_grad_sum), float64 [B] each; see per_example_grad_norm_bounds."""
    sq = norm_affine_grad_sq_norms(x_hat, g, bias=bias)
    return norm_bounds.norm_affine_norm_bounds(sq, x_hat, g, bias=bias)


def norm_affine_clipped_grad_sum(
    x_hat: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    *,
    scale: float = 1.0,
    bias: bool = True,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clipped LayerNorm/RMSNorm affine gradient: (weight_grad [d], bias_grad [d] | None),
    scale·Σ_i c_i Σ_t g_it ⊙ x̂_it and scale·Σ_i c_i Σ_t g_it."""
    _check_pair("x_hat", x_hat, g, same_width=True)
    _check_clip_factors(clip_factors, x_hat.shape[0], g)
    scale = _check_sum_args(scale, out_dtype)
    clipped_sum_fn = (
        norm_affine.norm_affine_clipped_grad_sum
        if use_triton(x_hat, g, clip_factors)
        else norm_affine.norm_affine_clipped_grad_sum_reference
    )
    return clipped_sum_fn(x_hat, g, clip_factors, scale=scale, bias=bias, out_dtype=out_dtype)


def _check_embedding_inputs(ids, g, padding_idx, num_embeddings=None) -> None:
    check_tensor("ids", ids, ndim=(1, 2), dtypes=(torch.int32, torch.int64))
    check_tensor("g", g, ndim=ids.dim() + 1)
    check_same("device", ids=ids, g=g)
    if g.shape[:-1] != ids.shape or g.shape[-1] == 0:
        shapes = f"{tuple(g.shape)} and ids {tuple(ids.shape)}"
        raise ValueError(f"g must have shape (*ids.shape, d) with d >= 1, got {shapes}")
    if num_embeddings is not None:
        check_int("num_embeddings", num_embeddings, minimum=1)
        # One device sync: an out-of-range id would make the kernel write out of bounds.
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
            raise ValueError(f"ids must lie in [0, num_embeddings={num_embeddings})")
    if padding_idx is not None:
        upper = num_embeddings if num_embeddings is not None else float("inf")
        if not is_int(padding_idx) or not 0 <= padding_idx < upper:
            raise ValueError(
                f"padding_idx must be None or an int in [0, num_embeddings), got {padding_idx!r}"
            )


def embedding_grad_sq_norms(
    ids: torch.Tensor, g: torch.Tensor, *, padding_idx: int | None = None
) -> torch.Tensor:
    """Squared norm of each example's embedding-table gradient, fp32 [B].

    ids: token ids [B, T] (or [B]); g: output gradients [B, T, d] (or [B, d]). Per example
    Σ_v ‖Σ_{t: ids_t = v} g_t‖²: positions grouped by id and summed in float64 (no
    cancellation, never a [B, V, d] tensor), in PyTorch on every device. Positions whose id
    is padding_idx contribute nothing.
    """
    _check_embedding_inputs(ids, g, padding_idx)
    return embedding.embedding_grad_sq_norms(ids, g, padding_idx=padding_idx)


def embedding_grad_norm_bounds(
    ids: torch.Tensor, g: torch.Tensor, *, padding_idx: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Certified bounds (norm, release_error, underflow) of each example's embedding-table
    gradient (for
    embedding_clipped_grad_sum), float64 [B] each; see per_example_grad_norm_bounds."""
    sq = embedding_grad_sq_norms(ids, g, padding_idx=padding_idx)
    keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if padding_idx is not None:
        keep = ids != padding_idx
    return norm_bounds.embedding_norm_bounds(sq, g, keep)


def embedding_clipped_grad_sum(
    ids: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    num_embeddings: int,
    *,
    scale: float = 1.0,
    padding_idx: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Clipped embedding-table gradient [num_embeddings, d]:
    scale·Σ_i c_i Σ_t onehot(ids_it) g_itᵀ, out_dtype default g.dtype. The padding_idx row is
    exactly 0 (positions with that id contribute nothing)."""
    _check_embedding_inputs(ids, g, padding_idx, num_embeddings)
    _check_clip_factors(clip_factors, ids.shape[0], g)
    scale = _check_sum_args(scale, out_dtype)
    clipped_sum_fn = (
        embedding.embedding_clipped_grad_sum
        if use_triton(ids, g, clip_factors)
        else embedding.embedding_clipped_grad_sum_reference
    )
    return clipped_sum_fn(
        ids,
        g,
        clip_factors,
        num_embeddings,
        scale=scale,
        padding_idx=padding_idx,
        out_dtype=out_dtype,
    )


def add_gaussian_noise_(
    x: torch.Tensor, std: float, *, seed: int | None = None, secure_mode: bool = False
) -> torch.Tensor:
    """x += std·N(0, I) in place and return x (x seen as rows [-1, x.shape[-1]] for the noise
    rule), keyed by noise_key(seed): fresh CSPRNG bits per call when seed is None (training); an
    int seed is for tests only. For noise added once per logical step to the summed clipped
    gradients. secure_mode=True: x + noise is rounded to a power-of-two grid in (std/4, std/2],
    so that no floating-point structure of the samples shows, at most 1/48 more noise variance
    (docs/threat_model.md)."""
    check_tensor("x", x)
    if any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape, strict=True)):
        raise ValueError(
            f"x must not be expanded (stride 0 in a dimension of size > 1: its elements share "
            f"memory), got shape {tuple(x.shape)} with strides {x.stride()}; pass x.clone()"
        )
    std = _check_number("std", std, nonnegative=True)
    check_bool("secure_mode", secure_mode)
    add_noise = noise.add_gaussian_noise_ if use_triton(x) else noise.add_gaussian_noise_reference
    return add_noise(x, std, seed=seed, secure_mode=secure_mode)
