"""Plain-PyTorch twins of every kernel in dp_attn.kernels.

They are the test oracle's first rung (tests compare kernel vs twin, and twin vs an
independent oracle such as torch.func per-example gradients), and the CPU path when
Triton is not interpreting. Same signatures and semantics as the kernels' launchers.
"""

from __future__ import annotations

import math

import torch

from .utils import noise_key

# ---------------------------------------------------------------- flash attention


def attention_visibility(tq, tk, *, causal=False, key_lengths=None, device=None):
    """Boolean [B or 1, 1, Tq, Tk]: query i of example b sees key j iff j < key_lengths[b] and,
    when causal, j <= i + Tk - Tq (bottom-right aligned)."""
    rows = torch.arange(tq, device=device)[:, None]
    cols = torch.arange(tk, device=device)[None, :]
    visible = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        visible = cols <= rows + (tk - tq)
    visible = visible[None, None]
    if key_lengths is not None:
        visible = visible & (cols < key_lengths.to(device)[:, None, None, None])
    return visible


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, key_lengths=None):
    """softmax(q kᵀ · scale) v with flash_attention's semantics, in plain PyTorch.

    q [B, H, Tq, D], k and v [B, Hkv, Tk, D] with Hkv dividing H (query head h uses kv head
    h // (H / Hkv)); scale defaults to 1/sqrt(D). Computes in fp32 (fp64 for fp64 inputs) and
    returns q's dtype. A row that sees no key gives 0, with zero gradients (never NaN).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    k = k.to(compute).repeat_interleave(group, dim=1)
    v = v.to(compute).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) * scale
    visible = attention_visibility(
        q.shape[2], k.shape[2], causal=causal, key_lengths=key_lengths, device=q.device
    )
    # Rows without a visible key take finite scores (any value): their probabilities are zeroed
    # below, so they output 0, and no -inf - (-inf) = NaN reaches the softmax or its gradient.
    seen = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible & seen, float("-inf")).masked_fill(~seen, 0.0)
    probs = torch.softmax(scores, dim=-1) * visible
    return torch.matmul(probs, v).to(q.dtype)


# ---------------------------------------------------------------- per-example norms, clipped sums

# Noise. A call's 128-bit noise key (utils.noise_key) keys Philox-4x32-10: its low 64 bits are
# the Philox key, its high 64 bits (the "nonce") fill the two counter words that the element
# offsets leave free, so the four counter words are (c mod 2^32, c >> 32, nonce mod 2^32,
# nonce >> 32) for an element counter c < 2^64. A Philox call gives four 32-bit words w1..w4
# and, by Box-Muller (box_muller), two normals: radius sqrt(-2 ln u) and angle θ, z1 = r·cos θ,
# z2 = r·sin θ, with
# - u = (w1·2^32 + w2 + 1/2) / 2^64, a 64-bit uniform that is never 0 (at least 2^-65): the
#   radius follows the Rayleigh tail P(r > t) = exp(-t²/2) out to t = 9.42, where that tail is
#   2^-64, and reaches 9.49. No floor at small u: Triton's tl.randn clamps u at 1e-7, which
#   truncates every normal at 5.68. u is computed in float32 as w1·2^-32 + (w2 + 1/2)·2^-64,
#   every step exact or one rounding (relative error < 2^-22), so the tail is that precise. At
#   the other end u rounds to 1 when w1 >= 2^32 - 2^7 (probability 2^-25), which would make the
#   radius exactly 0 and release the un-noised value itself: u is capped at 1 - 2^-24, the
#   largest float32 below 1 (radius >= 3.5e-4 there, in the centre of the distribution);
# - θ = 2π·(w3 + 1/2) / 2^32 in float32; w4 is not used.
# A released tensor is seen as rows of length W; its element (r, k) is noise_std·z_{1 + k % 2}
# of counter base + r·⌈W/2⌉ + k // 2 (NOISE_LANES = 2 elements per counter), in both modes;
# secure_mode then rounds the noised value to the grid secure_noise_grid(noise_std) (see
# docs/threat_model.md).
# Linear layer: weight [dout, din] with base 0, then bias as one row of dout with base
# dout·⌈din/2⌉. Norm affine: weight one row of d (base 0), bias one row (base ⌈d/2⌉).
# Embedding: [V, d], base 0. add_gaussian_noise_: x as [-1, x.shape[-1]], base 0. So every
# element of a call has its own (counter, lane), and each call has a fresh key. released_noise
# reproduces this in plain PyTorch (uint32 arithmetic in int64 lanes): the Philox words and u are
# bit-identical to the kernels', the normals equal up to float32 rounding of log, cos and sin.
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_U32 = 0xFFFFFFFF
NOISE_LANES = 2  # elements of a released tensor per Philox counter: one Box-Muller pair
BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1: the cap on the uniform
TWO_PI_POW_M32 = 2.0 * math.pi * 2.0**-32  # angle per unit of the word w3


def secure_noise_grid(noise_std: float) -> float:
    """The grid that secure_mode rounds noised values to: the largest power of two <= noise_std/2
    (within fp32's normal range). Coarse against the float spacing of the samples; the rounding
    adds at most (noise_std/2)²/12, i.e. 1/48 of the noise variance."""
    _, exponent = math.frexp(noise_std / 2)  # noise_std / 2 = m·2^exponent, m in [0.5, 1)
    return math.ldexp(1.0, min(max(exponent - 1, -126), 126))


def _mul32(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of const * x for uint32 values held in int64 (no int64 overflow)."""
    lo_part = const * (x & 0xFFFF)
    hi_part = const * (x >> 16)
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _U32
    return hi, lo


def philox4x32(key: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox-4x32-10 words (uint32 values in int64) of int64 offsets under a 128-bit
    key, as the kernels draw them; for key < 2^64 (nonce 0) exactly tl.randint4x(key, offsets)."""
    nonce = key >> 64
    c0, c1 = offsets & _U32, (offsets >> 32) & _U32  # any int64 bit pattern, as the kernels
    c2 = torch.full_like(offsets, nonce & _U32)
    c3 = torch.full_like(offsets, (nonce >> 32) & _U32)
    k0, k1 = key & _U32, (key >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def box_muller(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Two float32 N(0, 1) tensors from Philox words (uint32 values in int64) by the rule above,
    the float32 operations of the kernels' box_muller in the same order."""
    f32 = torch.float32
    u = w1.to(f32) * 2.0**-32 + (w2.to(f32) + 0.5) * 2.0**-64  # powers of two: exact products
    radius = torch.sqrt(-2.0 * torch.log(torch.clamp(u, max=BELOW_ONE)))
    theta = (w3.to(f32) + 0.5) * torch.tensor(TWO_PI_POW_M32, dtype=f32)
    return radius * torch.cos(theta), radius * torch.sin(theta)


def philox_normals(key: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two float32 N(0, 1) tensors of int64 counters under a 128-bit key, as the kernels."""
    w1, w2, w3, _ = philox4x32(key, offsets)
    return box_muller(w1, w2, w3)


def released_noise(
    key: int, rows: int, width: int, base: int = 0, device=None, *, std: float = 1.0
) -> torch.Tensor:
    """The float32 noise [rows, width] of a released tensor with noise_std `std` (see the rule
    above), before secure_mode's rounding: N(0, std²·I) up to float32 rounding."""
    per_row = -(-width // NOISE_LANES)
    counters = base + torch.arange(rows * per_row, device=device, dtype=torch.int64)
    noise = torch.stack(philox_normals(key, counters), dim=-1)
    noise = noise * torch.tensor(std, dtype=torch.float32)
    return noise.view(rows, per_row * NOISE_LANES)[:, :width]


def snap_to_grid(x: torch.Tensor, grid: float) -> torch.Tensor:
    """x rounded to the nearest multiple of the power of two `grid` (halves up), in x's dtype:
    the kernels' floor(x·(1/grid) + 0.5)·grid, exact float operations."""
    return torch.floor(x * (1.0 / grid) + 0.5) * grid


def _noise_epilogue(acc, noise_std, scale, key, base, out_dtype, secure_mode=False):
    """scale·(acc + noise), noise by the rule above (rounded to the grid in secure_mode), for
    fp32 acc (1-D: one row), cast to out_dtype."""
    if noise_std > 0.0:
        rows, width = (1, acc.numel()) if acc.dim() < 2 else acc.shape
        noise = released_noise(key, rows, width, base, device=acc.device, std=noise_std)
        acc = acc + noise.view(acc.shape)
        if secure_mode:
            acc = snap_to_grid(acc, secure_noise_grid(noise_std))
    return (acc * scale).to(out_dtype)


def _as_sequences(x: torch.Tensor) -> torch.Tensor:
    """[B, d] inputs are sequences of length one: view them as [B, 1, d]."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def _zero_dropped(x: torch.Tensor, clip_factors: torch.Tensor) -> torch.Tensor:
    """x [B, T, d] in fp32 with the examples whose clip factor is 0 set to exactly 0, so that a
    non-finite example (clip factor 0) contributes 0 rather than 0 * inf = NaN."""
    return torch.where((clip_factors != 0)[:, None, None], x.float(), 0.0)


def grad_norm_method(seq_len: int, din: int, dout: int) -> str:
    """The cheaper exact per-example norm path by FLOPs: "ghost" costs ~T²(din+dout) per example
    (pairs of T-tiles, symmetric), "instantiate" ~2·T·din·dout. Both paths use this rule."""
    return "ghost" if seq_len * (din + dout) <= 2 * din * dout else "instantiate"


def per_example_grad_sq_norms(a, g, *, bias=True, method=None):
    """‖g_iᵀ a_i‖_F² (+ ‖Σ_t g_it‖² with bias) per example, fp32 [B]."""
    a, g = _as_sequences(a).float(), _as_sequences(g).float()
    method = method or grad_norm_method(a.shape[1], a.shape[2], g.shape[2])
    # fp32 Gram matrices or tiles, as the kernels; products and sums in float64, so that the
    # rounding stays within what norm_bounds assumes of the kernels.
    if method == "ghost":
        g_gram = torch.bmm(g, g.transpose(1, 2)).double()
        a_gram = torch.bmm(a, a.transpose(1, 2)).double()
        return ((a_gram + 1.0 if bias else a_gram) * g_gram).sum((1, 2)).float()
    # One example's [dout, din] gradient at a time: never [B, dout, din] (an LM head's B×V×d).
    sq = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
    for i, (g_i, a_i) in enumerate(zip(g, a, strict=True)):
        sq[i] = (g_i.T @ a_i).square().sum(dtype=torch.float64)
    return (sq + g.sum(1).double().square().sum(1) if bias else sq).float()


def clipped_grad_sum(
    a, g, clip_factors, *, noise_std=0.0, scale=1.0, bias=True, seed=None, out_dtype=None,
    secure_mode=False,
):
    """scale·(Σ_i c_i g_iᵀ a_i + noise_std·N(0, I)) [dout, din], and the same for the bias
    gradient Σ_i c_i Σ_t g_it [dout] (None without bias). Examples with c_i = 0 add exactly 0."""
    out_dtype = out_dtype or a.dtype
    a = _zero_dropped(_as_sequences(a), clip_factors)
    g = _zero_dropped(_as_sequences(g), clip_factors) * clip_factors[:, None, None]
    din, dout = a.shape[2], g.shape[2]
    key = noise_key(seed)
    weight = g.reshape(-1, dout).T @ a.reshape(-1, din)
    weight = _noise_epilogue(weight, noise_std, scale, key, 0, out_dtype, secure_mode)
    if not bias:
        return weight, None
    bias_base = dout * -(-din // NOISE_LANES)
    bias_grad = _noise_epilogue(
        g.sum((0, 1)), noise_std, scale, key, bias_base, out_dtype, secure_mode
    )
    return weight, bias_grad


# Block clipping: the privacy groups are the tiles of the weight gradient, BLOCK_CLIP_TILE =
# (rows of dout, columns of din), aligned at 0 (edge tiles are smaller). The bias slice of
# rows [o, o + tile rows) joins the group of the tile in the first din-column, so the number
# of groups does not depend on the bias. Fixed (never autotuned): it defines the groups.
BLOCK_CLIP_TILE = (128, 128)


def block_clip_num_groups(dout: int, din: int) -> int:
    """Number of block-clipping groups (tiles) of a [dout, din] weight (bias included)."""
    rows, cols = BLOCK_CLIP_TILE
    return -(-dout // rows) * -(-din // cols)


def block_clipped_grad_sum(
    a, g, threshold, *, noise_std=0.0, scale=1.0, bias=True, seed=None, out_dtype=None,
    secure_mode=False,
):
    """Like clipped_grad_sum, but each example's contribution to each group (weight tile, plus
    the bias slice for first-column tiles) is clipped to L2 norm `threshold`: factor
    min(1, threshold / (norm + 1e-6)), and 0 when the norm is not finite."""
    out_dtype = out_dtype or a.dtype
    a, g = _as_sequences(a).float(), _as_sequences(g).float()
    din, dout = a.shape[2], g.shape[2]
    rows, cols = BLOCK_CLIP_TILE
    per_example = torch.bmm(g.transpose(1, 2), a)  # [B, dout, din]
    per_example_bias = g.sum(1)  # [B, dout]
    weight = torch.zeros(dout, din, dtype=torch.float32, device=a.device)
    bias_sum = torch.zeros(dout, dtype=torch.float32, device=a.device)
    for o in range(0, dout, rows):
        for k in range(0, din, cols):
            tile = per_example[:, o : o + rows, k : k + cols]
            sq = tile.square().sum((1, 2))
            if bias and k == 0:
                sq = sq + per_example_bias[:, o : o + rows].square().sum(1)
            norm = sq.sqrt()
            factor = torch.clamp(threshold / (norm + 1e-6), max=1.0)
            factor = torch.where(torch.isfinite(norm), factor, 0.0)
            factor = torch.where(factor >= torch.finfo(torch.float32).tiny, factor, 0.0)
            keep = (factor > 0)[:, None, None]
            weight[o : o + rows, k : k + cols] = torch.where(
                keep, tile * factor[:, None, None], 0.0
            ).sum(0)
            if bias and k == 0:
                bias_slice = per_example_bias[:, o : o + rows]
                bias_sum[o : o + rows] = torch.where(
                    keep[:, :, 0], bias_slice * factor[:, None], 0.0
                ).sum(0)
    key = noise_key(seed)
    weight = _noise_epilogue(weight, noise_std, scale, key, 0, out_dtype, secure_mode)
    if not bias:
        return weight, None
    bias_base = dout * -(-din // NOISE_LANES)
    return weight, _noise_epilogue(
        bias_sum, noise_std, scale, key, bias_base, out_dtype, secure_mode
    )


def add_gaussian_noise_(x, std, *, seed=None, secure_mode=False):
    """x += std·N(0, I) in place; x is seen as [-1, x.shape[-1]] for the noise rule."""
    key = noise_key(seed)
    if x.numel() == 0:  # nothing to noise (and no [-1, 0] view of it)
        return x
    rows2d = x.float().reshape(-1, x.shape[-1] if x.dim() else 1)
    noisy = _noise_epilogue(rows2d, std, 1.0, key, 0, x.dtype, secure_mode)
    return x.copy_(noisy.view(x.shape))


# ---------------------------------------------------------------- small layers (norms, embeddings)


def norm_affine_grad_sq_norms(x_hat, g, *, bias=True):
    """LayerNorm/RMSNorm affine parameters: ‖Σ_t g_t ⊙ x̂_t‖² (+ ‖Σ_t g_t‖² with bias), fp32 [B]."""
    x_hat, g = _as_sequences(x_hat).float(), _as_sequences(g).float()
    sq = (g * x_hat).sum(1).double().square().sum(1)
    return (sq + g.sum(1).double().square().sum(1) if bias else sq).float()


def norm_affine_clipped_grad_sum(
    x_hat, g, clip_factors, *, noise_std=0.0, scale=1.0, bias=True, seed=None, out_dtype=None,
    secure_mode=False,
):
    """scale·(Σ_i c_i Σ_t g_it ⊙ x̂_it + noise_std·N(0, I)) [d], and the bias likewise (noise
    base ⌈d/L⌉), or None without bias. Examples with c_i = 0 add exactly 0."""
    out_dtype = out_dtype or x_hat.dtype
    x_hat = _zero_dropped(_as_sequences(x_hat), clip_factors)
    g = _zero_dropped(_as_sequences(g), clip_factors) * clip_factors[:, None, None]
    d = g.shape[2]
    key = noise_key(seed)
    weight = _noise_epilogue(
        (g * x_hat).sum((0, 1)), noise_std, scale, key, 0, out_dtype, secure_mode
    )
    if not bias:
        return weight, None
    bias_base = -(-d // NOISE_LANES)
    return weight, _noise_epilogue(
        g.sum((0, 1)), noise_std, scale, key, bias_base, out_dtype, secure_mode
    )


def _drop_padding(ids, g, padding_idx):
    """g [B, T, d] in fp32, with positions whose id is padding_idx zeroed."""
    g = g.float()
    return g if padding_idx is None else torch.where((ids != padding_idx)[..., None], g, 0.0)


def embedding_grad_sq_norms(ids, g, *, padding_idx=None):
    """Σ_v ‖Σ_{t: ids_t = v} g_t‖² per example, fp32 [B]: the positions of each example are
    grouped by id and summed in float64, then squared. Unlike the ghost form
    Σ_{s,t}[ids_s = ids_t]<g_s, g_t>, nothing cancels: a token repeated with nearly opposite
    gradients gets its true, small row. The same code serves CPU and GPU (no kernel): memory
    is one float64 row per distinct (example, id), at most B·T rows, never [B, V, d]."""
    g = _as_sequences(g)
    batch, seq_len, d = g.shape
    ids = ids.reshape(batch, seq_len).long()
    example = torch.arange(batch, device=g.device).repeat_interleave(seq_len)
    # ids < 2^31 (int32 or a vocabulary index), so (example, id) -> example·2^31 + id is 1:1.
    _, group = torch.unique(example * 2**31 + ids.reshape(-1), return_inverse=True)
    rows = _drop_padding(ids, g, padding_idx).double().reshape(-1, d)
    sums = torch.zeros(batch * seq_len, d, dtype=torch.float64, device=g.device)
    sums.index_add_(0, group, rows)
    owner = torch.zeros(batch * seq_len, dtype=torch.long, device=g.device)
    owner.scatter_(0, group, example)
    sq = torch.zeros(batch, dtype=torch.float64, device=g.device)
    return sq.index_add_(0, owner, sums.square().sum(1)).float()


def embedding_clipped_grad_sum(
    ids,
    g,
    clip_factors,
    num_embeddings,
    *,
    noise_std=0.0,
    scale=1.0,
    padding_idx=None,
    seed=None,
    out_dtype=None,
    secure_mode=False,
):
    """scale·(Σ_i c_i Σ_t onehot(ids_it) g_itᵀ + noise_std·N(0, I)) [V, d]. The padding_idx row
    is exactly 0: its gradient is 0 for every dataset, so it is released without noise."""
    out_dtype = out_dtype or g.dtype
    g = _as_sequences(g)
    ids = ids.reshape(g.shape[:2])
    g = _zero_dropped(_drop_padding(ids, g, padding_idx), clip_factors)
    g = g * clip_factors[:, None, None]
    d = g.shape[2]
    weight = torch.zeros(num_embeddings, d, dtype=torch.float32, device=g.device)
    weight.index_add_(0, ids.reshape(-1), g.reshape(-1, d))
    weight = _noise_epilogue(weight, noise_std, scale, noise_key(seed), 0, out_dtype, secure_mode)
    if padding_idx is not None:
        weight[padding_idx] = 0
    return weight
