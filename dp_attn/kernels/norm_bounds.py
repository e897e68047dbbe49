"""Certified upper bounds of per-example released norms, rounding included (issue 11).

A clip factor must come from an upper bound of the norm of what is actually released, for any
input: a crafted example can make the fp32 ghost sum Σ_{s,t}(a_s·a_t)(g_s·g_t) a difference
of huge terms that comes out ~0 while the true norm is large. Each function here takes the
fp32 squared norm a norm kernel (or its twin) computed and returns, in float64, three bounds
(N_i, E_i, U_i) with

    ‖R_i(c)‖ <= c·(N_i + E_i) + U_i   for every clip factor c >= 0,

where R_i(c) is what the matching clipped-sum kernel (or twin) adds to the released sum for
example i with factor c. clip_factors turns them into factors with ‖R_i‖ <= C·(1 + 1e-5):

- N_i bounds the exact norm of the example's gradient (of the stored a and g). The norm paths'
  rounding is bounded by standard forward error analysis: an fp32 sum of n terms in any order
  is within γ(n)·Σ|terms| of the exact sum, γ(n) = n·u/(1 - n·u). All the error terms are
  at most γ·P_i², or γ·P_i, with P_i = Σ_t ‖a_t‖‖g_t‖ (a constant-1 feature for the bias),
  which is also itself a bound of the norm (triangle inequality): N_i <= P_i always, so an
  overflowing or NaN fp32 sum of a finite example falls back to P_i and is never dropped.
- E_i = ε_release·P_i bounds the rounding of the release: c·g rounded to fp32 (and to the
  input dtype for 16-bit tl.dot), then accumulated over all B·T rows in fp32.
- U_i bounds, absolutely, what underflow can add (values below 2⁻¹²⁶, or among fp16's
  subnormals, lose their relative precision): negligible unless C is tiny or the inputs near
  fp32's overflow.

u is fp32's unit roundoff 2⁻²⁴ on the CPU and 2⁻²³ on a GPU, where tensor cores may truncate
rather than round their fp32 accumulation. P_i is computed in float64 (no overflow for any finite
fp32 input; relative error ~1e-15, absorbed by HOST_SLACK).

What is left, and what this does not bound, is in docs/threat_model.md §2b.
"""

from __future__ import annotations

import math

import torch

from .per_example_norms import grad_norm_method
from .tl_utils import feature_block

FP32_UNIT = 2.0**-24  # one fp32 operation, round to nearest
# Per fp32 addition of an accumulation: round to nearest on the CPU (twins and interpreter);
# on a GPU twice that, for tensor cores that truncate their fp32 accumulation.
ACC_UNIT = {"cpu": FP32_UNIT, "cuda": 2.0 * FP32_UNIT}
HOST_SLACK = 1e-12  # float64 host arithmetic on the bounds
# The ghost path's a-priori relative slack on an example whose T tokens do not correlate
# (P² ~ T·‖W‖²); above it the instantiate path, whose bound is much tighter, is used.
GHOST_SLACK_LIMIT = 1e-5
# The share of the threshold that the rounding of a release may add: ‖R_i‖ <= C·(1 + this).
# The engine's noise is z·C·(1 + RELEASE_ROUNDING), so that z is exact for that sensitivity.
RELEASE_ROUNDING = 1e-5


def gamma(n: int, device: torch.device) -> float:
    """Bound of the relative error of an fp32 sum of n terms, in any order, on `device`."""
    x = n * ACC_UNIT.get(device.type, ACC_UNIT["cuda"])
    return x / (1.0 - x) if x < 0.5 else math.inf


def unit_roundoff(dtype: torch.dtype) -> float:
    """Relative error of rounding to `dtype` (round to nearest)."""
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, FP32_UNIT)


def _grow(*units: float) -> float:
    """(1 + e_1)(1 + e_2)... - 1: the relative bound of a chain of roundings."""
    return math.prod(1.0 + e for e in units) - 1.0


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_t‖ in float64, [B, T]."""
    return x.double().square().sum(-1).sqrt()


def _as_sequences(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 2 else x


def _release_error(rows: int, x: torch.Tensor, products: int = 1) -> float:
    """ε_release: c·g rounded to fp32, then to the dot's input dtype (x's), `products` more
    fp32 multiplications, and an fp32 accumulation over `rows` terms on x's device."""
    cast = unit_roundoff(x.dtype) if x.dtype != torch.float32 else 0.0
    return _grow(FP32_UNIT, cast, *([FP32_UNIT] * products), gamma(rows + 1, x.device))


# (N_i, E_i, U_i), float64 [B] each: ‖R_i(c)‖ <= c·(N_i + E_i) + U_i. U_i is absolute: values
# that underflow (flush to zero on a GPU) lose at most 2⁻¹²⁶ each, whatever c; fp16's
# subnormals are spaced 2⁻²⁴, so c·g rounded to fp16 may lose 2⁻²⁵ each.
Bounds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TINY = 2.0**-120  # per underflowing operation, with room for the count of operations' slack


def _finish(exact_bound: torch.Tensor, p: torch.Tensor, release: float, underflow) -> Bounds:
    """(N, E, U) = (min(N, P), ε_release·P, underflow), N replaced by P where it is not finite
    (P is finite for every finite input; a non-finite P marks a non-finite example, dropped by
    the caller)."""
    n = torch.where(torch.isfinite(exact_bound), torch.minimum(exact_bound, p), p)
    underflow = torch.as_tensor(underflow, dtype=torch.float64, device=p.device).expand_as(p)
    return n * (1.0 + HOST_SLACK), release * p * (1.0 + HOST_SLACK), underflow


def _squares_underflow(entries: int) -> float:
    """The norm lost by a sum of squares whose squares underflow (entries below 2⁻⁶³)."""
    return 2.0**-62 * math.sqrt(entries)


def clip_factors(norm, release_error, underflow, threshold: float):
    """clamp((C·(1 + RELEASE_ROUNDING) - U) / (N + E + 1e-6), 0, 1), float64: the released
    contribution has norm <= c·(N + E) + U <= C·(1 + RELEASE_ROUNDING). On ordinary fp32
    inputs E/N is a few 1e-6, inside that allowance, and U below 1e-30, so the factors are
    those of the true norms to ~1e-5; where a cancellation makes E large against N, E clips.
    16-bit inputs round c·g to their dtype before the tensor-core dot: E/N ~ 2⁻⁸·P/N for bf16,
    factors ~1% smaller; fp16's subnormals add U ~ 2⁻²⁵·√dout·Σ_t‖a_t‖. An example with U >= C
    (activations near fp32's overflow with a tiny C) gets 0: it cannot be released safely."""
    # (1 - 2u): the factor is cast to fp32 (one rounding up to u) before it scales g.
    target = threshold * (1.0 + RELEASE_ROUNDING) * (1.0 - 2 * FP32_UNIT) - underflow
    return torch.clamp(target / (norm + release_error + 1e-6), min=0.0, max=1.0)


def as_fp32_factors(factors: torch.Tensor) -> torch.Tensor:
    """float64 clip factors as the fp32 the kernels take, rounded toward zero: a plain cast
    rounds to nearest, up by a relative 2⁻²⁴ for normal values but by up to a third for a
    factor among fp32's subnormals (found by an attack: 1.33·C released)."""
    rounded = factors.float()
    down = torch.nextafter(rounded, torch.zeros_like(rounded))
    return torch.where(rounded.double() > factors, down, rounded)


def ghost_rounding(seq_len: int, din: int, dout: int, device: torch.device) -> float:
    """Relative (to P²) bound of the ghost path's error: Gram entries over din(+1) and dout
    features, one product, and the tiled reduction (two in-tile sums of BLOCK_T terms, then one
    term per tile pair of the program; programs summed in float64, one final rounding)."""
    block_t = min(64, max(16, 1 << max(0, seq_len - 1).bit_length()))
    n_tiles = -(-seq_len // block_t)
    return _grow(
        gamma(din + 1, device),
        gamma(dout, device),
        FP32_UNIT,
        gamma(2 * block_t + n_tiles + 2, device),
        FP32_UNIT,
    )


def certified_norm_method(seq_len: int, din: int, dout: int, device: torch.device) -> str:
    """The norm path for bounds: the cheaper by FLOPs (per_example_norms.grad_norm_method),
    except that ghost is used only where its certified bound stays tight on benign inputs."""
    method = grad_norm_method(seq_len, din, dout)
    slack = ghost_rounding(seq_len, din, dout, device) * seq_len
    if method == "ghost" and slack > GHOST_SLACK_LIMIT:
        return "instantiate"
    return method


def linear_norm_bounds(sq: torch.Tensor, a, g, *, bias: bool, method: str) -> Bounds:
    """(N_i, E_i, U_i) for clipped_grad_sum(a, g, ...) from sq = per_example_grad_sq_norms(a, g,
    bias=bias, method=method), float64 [B] each."""
    a, g = _as_sequences(a), _as_sequences(g)
    batch, seq_len, din = a.shape
    dout = g.shape[-1]
    norms_a = _row_norms(a)
    if bias:
        norms_a = (norms_a.square() + 1.0).sqrt()  # the constant-1 feature of the bias
    p = (norms_a * _row_norms(g)).sum(1) * (1.0 + HOST_SLACK)
    sq = sq.double().clamp(min=0.0)
    if method == "ghost":
        rounding = ghost_rounding(seq_len, din, dout, a.device)
        exact = sq * (1.0 + 2 * FP32_UNIT) + rounding * p.square()
        exact = exact.sqrt()
    else:
        # Squares, two in-tile sums (BLOCK_O and BLOCK_I terms), the bias term, float64 across
        # tiles, one final rounding; each entry of the tile is off by γ(T)·(|g|ᵀ|a|).
        tile = feature_block(dout) + feature_block(din) + 2
        summed = _grow(FP32_UNIT, gamma(tile, a.device), FP32_UNIT)
        exact = (sq / (1.0 - summed)).sqrt() + gamma(seq_len + 1, a.device) * p
    exact = exact + _squares_underflow(din * dout + dout + seq_len * seq_len)
    # c·g cast to fp16 may land among its subnormals; bf16 and fp32 only below 2⁻¹²⁶.
    cast_loss = 2.0**-25 if a.dtype == torch.float16 else TINY
    underflow = cast_loss * math.sqrt(dout) * (norms_a.sum(1) + 1.0) * (1.0 + HOST_SLACK)
    underflow = underflow + TINY * batch * seq_len * math.sqrt((din + 1) * dout)
    return _finish(exact, p, _release_error(batch * seq_len, a), underflow)


def norm_affine_norm_bounds(sq: torch.Tensor, x_hat, g, *, bias: bool) -> Bounds:
    """(N_i, E_i, U_i) for norm_affine_clipped_grad_sum from sq = norm_affine_grad_sq_norms,
    float64 [B] each."""
    x_hat, g = _as_sequences(x_hat), _as_sequences(g)
    batch, seq_len, d = x_hat.shape
    products = g.double() * x_hat.double()
    per_token = products.square().sum(-1)
    if bias:
        per_token = per_token + g.double().square().sum(-1)
    p = per_token.sqrt().sum(1) * (1.0 + HOST_SLACK)
    summed = _grow(FP32_UNIT, gamma(min(d, 128) + 2, g.device), FP32_UNIT)
    exact = (sq.double().clamp(min=0.0) / (1.0 - summed)).sqrt()
    exact = exact + gamma(seq_len + 1, g.device) * p + _squares_underflow(2 * d)
    underflow = TINY * batch * seq_len * math.sqrt(2 * d)
    return _finish(exact, p, _release_error(batch * seq_len, g.float(), products=1), underflow)


def vector_sum_norm_bounds(g) -> Bounds:
    """(N_i, E_i, U_i) of a bias-only layer, whose per-example gradient is Σ_t g_t, released as
    the sum over examples of c_i·(Σ_t g_t) in fp32; computed here in float64 [B] each."""
    g = g.reshape(g.shape[0], -1, g.shape[-1])
    batch, seq_len = g.shape[0], g.shape[1]
    exact = g.double().sum(1).norm(dim=1)
    p = _row_norms(g).sum(1) * (1.0 + HOST_SLACK)
    exact = exact * (1.0 + HOST_SLACK) + seq_len * 2.0**-52 * p
    release = _grow(gamma(seq_len, g.device), FP32_UNIT, gamma(batch, g.device))
    return _finish(exact, p, release, TINY * (batch + seq_len) * math.sqrt(g.shape[-1]))


def embedding_norm_bounds(sq: torch.Tensor, g, keep: torch.Tensor) -> Bounds:
    """(N_i, E_i, U_i) for embedding_clipped_grad_sum from sq = embedding_grad_sq_norms (per-token
    sums in float64, one final fp32 rounding), float64 [B] each. keep: [B, T] positions that are not
    padding. The release scatters c·g_t (one fp32 product) and adds into each row in fp32."""
    g = _as_sequences(g)
    batch, seq_len = g.shape[0], g.shape[1]
    q = torch.where(keep.reshape(batch, seq_len), _row_norms(g), 0.0).sum(1) * (1.0 + HOST_SLACK)
    exact = (sq.double().clamp(min=0.0) * (1.0 + 2 * FP32_UNIT)).sqrt() + seq_len * 2.0**-52 * q
    release = _grow(FP32_UNIT, gamma(batch * seq_len + 1, g.device))
    return _finish(exact, q, release, TINY * batch * seq_len * math.sqrt(g.shape[-1]))


def _gamma64(n: int) -> float:
    x = n * 2.0**-53
    return x / (1.0 - x)


def tied_embedding_head_cross(ids, g_emb, keep, x, delta):
    """(⟨W_emb, W_head⟩, a bound of its rounding), float64 [B] each, for one [V, d] weight that
    is both an embedding (gradient Σ_t onehot(ids_t) g_tᵀ) and an output head (Σ_s δ_s x_sᵀ): the
    two meet where the head's output gradient is read at the embedding's token ids,
    Σ_{t,s} δ_s[ids_t]·(g_t·x_s). Tensors of [B, T_head, T_emb] values, never [B, V, d] or more
    of [B, T, V] than the head's own δ. keep: [B, T_emb] non-padding positions."""
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    g_emb = torch.where(keep.reshape(ids.shape)[..., None], _as_sequences(g_emb).double(), 0.0)
    x, delta = _as_sequences(x).double(), _as_sequences(delta)
    at_ids = torch.gather(delta, 2, ids[:, None, :].expand(-1, delta.shape[1], -1)).double()
    cross = (at_ids * torch.bmm(x, g_emb.transpose(1, 2))).sum((1, 2))
    # float64 products of float32 values are exact; the d-term dots and the T_head·T_emb-term
    # sum round: within γ64(d + T_head·T_emb)·Σ|δ_s[ids_t]|·‖x_s‖·‖g_t‖.
    magnitude = (at_ids.abs() * _row_norms(x)[:, :, None] * _row_norms(g_emb)[:, None, :]).sum(
        (1, 2)
    )
    return cross, _gamma64(x.shape[-1] + at_ids.shape[1] * at_ids.shape[2] + 2) * magnitude


def tied_norm_bounds(embedding: Bounds, head: Bounds, cross, cross_error) -> Bounds:
    """(N, E) of one example's gradient of a tied embedding + head, from each use's bounds and
    their cross term: ‖W_e + W_h‖² = ‖W_e‖² + ‖W_h‖² + 2⟨W_e, W_h⟩ <= N_e² + N_h² + 2·(cross +
    its error), and never above N_e + N_h (triangle inequality: a cancelling cross term cannot
    hurt). The releases' roundings add: E = E_e + E_h, U = U_e + U_h."""
    (n_e, e_e, u_e), (n_h, e_h, u_h) = embedding, head
    sq = (n_e.square() + n_h.square() + 2.0 * (cross + cross_error)).clamp(min=0.0)
    n = torch.minimum(sq.sqrt(), n_e + n_h)
    return n * (1.0 + HOST_SLACK), (e_e + e_h) * (1.0 + HOST_SLACK), u_e + u_h
