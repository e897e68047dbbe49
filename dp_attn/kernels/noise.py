"""Gaussian noise: x += std·N(0, I) in place (add_gaussian_noise_, the engine's noise, added once
per step to the summed clipped gradients), its keys, its kernel and its plain-PyTorch twin.

The rule. A call's 128-bit noise key (noise_key) keys Philox-4x32-10: its low 64 bits are the
Philox key, its high 64 bits (the "nonce") fill the two counter words that the element offsets
leave free, so the four counter words are (c mod 2^32, c >> 32, nonce mod 2^32, nonce >> 32)
for an element counter c < 2^64. A Philox call gives four 32-bit words w1..w4 and, by
Box-Muller, two normals: radius sqrt(-2 ln u) and angle θ, z1 = r·cos θ, z2 = r·sin θ, with
- u = (w1·2^32 + w2 + 1/2) / 2^64, a 64-bit uniform that is never 0 (at least 2^-65): the
  radius follows the Rayleigh tail P(r > t) = exp(-t²/2) out to t = 9.42, where that tail is
  2^-64, and reaches 9.49. No floor at small u: Triton's tl.randn clamps u at 1e-7, which
  truncates every normal at 5.68. u is computed in float32 as w1·2^-32 + (w2 + 1/2)·2^-64,
  every step exact or one rounding (relative error < 2^-22), so the tail is that precise. At
  the other end u rounds to 1 when w1 >= 2^32 - 2^7 (probability 2^-25), which would make the
  radius exactly 0 and release the un-noised value itself: u is capped at 1 - 2^-24, the
  largest float32 below 1 (radius >= 3.5e-4 there, in the centre of the distribution);
- θ = 2π·(w3 + 1/2) / 2^32 in float32; w4 is not used.
x is seen as rows of length W = x.shape[-1]; its element (r, k) gets std·z_{1 + k % 2} of
counter r·⌈W/2⌉ + k // 2 (NOISE_LANES = 2 elements per counter), in both modes, so every
element has its own (counter, lane), and each call has a fresh key. secure_mode then rounds the
noised value to the grid secure_noise_grid(std) (docs/threat_model.md).

The twin (released_noise, add_gaussian_noise_reference) reproduces the rule in plain PyTorch
(uint32 arithmetic in int64 lanes): the Philox words and u are bit-identical to the kernel's,
the normals equal up to float32 rounding of log, cos and sin.
"""

from __future__ import annotations

import math
import secrets

import torch
import triton
import triton.language as tl

from ..checks import is_int
from .utils import checked_grid

NOISE_LANES = 2  # elements of a released tensor per Philox counter: one Box-Muller pair
BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1: the cap on the uniform
TWO_PI_POW_M32 = 2.0 * math.pi * 2.0**-32  # angle per unit of the word w3

TWO_POW_M32 = tl.constexpr(2.0**-32)
TWO_POW_M64 = tl.constexpr(2.0**-64)
U_MAX = tl.constexpr(BELOW_ONE)
ANGLE_PER_WORD = tl.constexpr(TWO_PI_POW_M32)


def noise_key(seed: int | None) -> int:
    """The 128-bit key of one noise draw: its low 64 bits key Philox, its high 64 bits fill the
    Philox counter words that the element offsets leave free (the rule above).

    `seed=None` (the only setting for real training) takes 128 fresh bits from the operating
    system's CSPRNG, never from torch's global generator. An explicit seed is for tests. The
    key is never stored, logged or returned to the caller.
    """
    if seed is None:
        return secrets.randbits(128)
    if not is_int(seed) or not 0 <= seed < 2**128:
        raise ValueError(f"seed must be None or an int in [0, 2**128), got {seed!r}")
    return seed


def secure_noise_grid(noise_std: float) -> float:
    """The grid that secure_mode rounds noised values to: the largest power of two <= noise_std/2
    (within fp32's normal range). Coarse against the float spacing of the samples; the rounding
    adds at most (noise_std/2)²/12, i.e. 1/48 of the noise variance."""
    _, exponent = math.frexp(noise_std / 2)  # noise_std / 2 = m·2^exponent, m in [0.5, 1)
    return math.ldexp(1.0, min(max(exponent - 1, -126), 126))


# ---------------------------------------------------------------- kernel


def noise_args(key: int, noise_std: float, secure_mode: bool) -> tuple:
    """The noise kernel's scalar arguments (key, nonce_lo, nonce_hi, noise_std, grid, inv_grid)
    for a 128-bit noise key: the Philox key as a signed 64-bit integer and the nonce as two
    signed 32-bit words (fixed integer types whatever the values); the noise std, and
    secure_mode's grid and its inverse (powers of two; 1 without secure_mode, unused)."""

    def signed(value: int, bits: int) -> int:
        return value - (1 << bits) if value >> (bits - 1) else value

    low, nonce = key & (2**64 - 1), key >> 64
    words = (signed(nonce & 0xFFFFFFFF, 32), signed(nonce >> 32, 32))
    grid = secure_noise_grid(noise_std) if secure_mode and noise_std > 0 else 1.0
    return signed(low, 64), *words, noise_std, grid, 1.0 / grid


@triton.jit
def philox_words(key, nonce_lo, nonce_hi, counters):
    """The four uint32 words of Philox-4x32-10 on the counter words (counter low, counter high,
    nonce_lo, nonce_hi) under the 64-bit key: tl.randint4x(key, counters) for a zero nonce."""
    c0 = counters.to(tl.uint32)
    c1 = (counters >> 32).to(tl.uint32)
    c2 = c0 * 0 + nonce_lo.to(tl.uint32, bitcast=True)
    c3 = c0 * 0 + nonce_hi.to(tl.uint32, bitcast=True)
    return tl.philox(key, c0, c1, c2, c3)


@triton.jit
def box_muller(w1, w2, w3):
    """Two N(0, 1) from three uint32 words by the rule above: radius from the 64-bit uniform
    (w1·2^32 + w2 + 1/2)/2^64, never 0, so the tail reaches 9.49 (tl.randn's
    uint_to_uniform_float and pair_uniform_to_normal floor u at 1e-7: 5.68); angle from w3."""
    u = w1.to(tl.float32) * TWO_POW_M32 + (w2.to(tl.float32) + 0.5) * TWO_POW_M64  # exact products
    radius = tl.sqrt(-2.0 * tl.log(tl.minimum(u, U_MAX)))  # u = 1 would be radius 0: no noise
    theta = (w3.to(tl.float32) + 0.5) * ANGLE_PER_WORD
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def gaussian2x(key, nonce_lo, nonce_hi, counters):
    """The two normals of each int64 counter under the 128-bit key (Philox key, nonce words)."""
    w1, w2, w3, _ = philox_words(key, nonce_lo, nonce_hi, counters)
    return box_muller(w1, w2, w3)


@triton.jit
def noised(
    acc, rows, col0, width, key, nonce_lo, nonce_hi, noise_std, grid, inv_grid, SECURE: tl.constexpr
):
    """acc + noise (rounded to `grid` when SECURE) for the tile acc [R, C] at `rows` and
    columns col0 .. col0+C (col0 even) of rows of length `width`, by the rule above."""
    R: tl.constexpr = acc.shape[0]
    C: tl.constexpr = acc.shape[1]
    counters = (
        rows.to(tl.int64)[:, None] * tl.cdiv(width, 2) + (col0 // 2 + tl.arange(0, C // 2))[None, :]
    )
    z1, z2 = gaussian2x(key, nonce_lo, nonce_hi, counters)
    # [R, C/2, 2] -> [R, C]: column 2q + u is lane u of counter q.
    acc += tl.join(z1, z2).reshape(R, C) * noise_std
    if SECURE:
        acc = tl.floor(acc * inv_grid + 0.5) * grid
    return acc


@triton.jit
def column_halves(acc):
    """acc [R, C] as its columns 0 .. C/2 and C/2 .. C."""
    R: tl.constexpr = acc.shape[0]
    C: tl.constexpr = acc.shape[1]
    return tl.split(acc.reshape(R, 2, C // 2).permute(0, 2, 1))


@triton.jit
def joined_halves(left, right):
    """column_halves' inverse."""
    R: tl.constexpr = left.shape[0]
    C: tl.constexpr = 2 * left.shape[1]
    return tl.join(left, right).permute(0, 2, 1).reshape(R, C)


@triton.jit
def noised_by_halves(
    acc, rows, col0, width, key, nonce_lo, nonce_hi, noise_std, grid, inv_grid, SECURE: tl.constexpr
):
    """noised, on the two column halves of acc one after the other."""
    C: tl.constexpr = acc.shape[1]
    left, right = column_halves(acc)
    left = noised(
        left, rows, col0, width, key, nonce_lo, nonce_hi, noise_std, grid, inv_grid, SECURE
    )
    right = noised(
        right,
        rows,
        col0 + C // 2,
        width,
        key,
        nonce_lo,
        nonce_hi,
        noise_std,
        grid,
        inv_grid,
        SECURE,
    )
    return joined_halves(left, right)


@triton.jit
def noised_by_quarters(
    acc, rows, col0, width, key, nonce_lo, nonce_hi, noise_std, grid, inv_grid, SECURE: tl.constexpr
):
    """noised, on the four column quarters of acc [R, C] (C a multiple of 8) one after the
    other: a quarter of the tile's Philox states live at a time (all at once, 64 elements per
    thread spilled)."""
    C: tl.constexpr = acc.shape[1]
    left, right = column_halves(acc)
    left = noised_by_halves(
        left, rows, col0, width, key, nonce_lo, nonce_hi, noise_std, grid, inv_grid, SECURE
    )
    right = noised_by_halves(
        right,
        rows,
        col0 + C // 2,
        width,
        key,
        nonce_lo,
        nonce_hi,
        noise_std,
        grid,
        inv_grid,
        SECURE,
    )
    return joined_halves(left, right)


@triton.jit(do_not_specialize=["key", "nonce_lo", "nonce_hi"])
def _noise_kernel(
    x_ptr,
    R,
    W,
    key,
    nonce_lo,
    nonce_hi,
    noise_std,
    grid,
    inv_grid,
    SECURE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """x[r, k] += noise(r, k) in place for x [R, W] contiguous (each element is read before it
    is written, by the same program). One axis of programs, column blocks fastest (see
    noise_grid)."""
    col_blocks = tl.cdiv(W, BLOCK_W)
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = (pid % col_blocks) * BLOCK_W
    cols = col0 + tl.arange(0, BLOCK_W)
    offsets = rows.to(tl.int64)[:, None] * W + cols[None, :]
    mask = (rows[:, None] < R) & (cols[None, :] < W)
    acc = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    acc = noised_by_quarters(
        acc, rows, col0, W, key, nonce_lo, nonce_hi, noise_std, grid, inv_grid, SECURE
    )
    tl.store(x_ptr + offsets, acc.to(x_ptr.dtype.element_ty), mask=mask)


def noise_grid(rows: int, width: int) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK_R, BLOCK_W) of _noise_kernel on [rows, width]: tiles of about 4096
    elements, all on axis x (a single wide row would pass axis y's 65,535 at 2**28 elements)."""
    block_r = 1 if rows == 1 else 16
    block_w = max(16, min(4096 // block_r, triton.next_power_of_2(width)))
    return checked_grid(triton.cdiv(rows, block_r) * triton.cdiv(width, block_w)), block_r, block_w


def noise_warps(block_r: int, block_w: int) -> int:
    """_noise_kernel's warps: 8 for the 4096-element tiles (16 elements per thread; with 4
    warps the kernel spilled 4-12 B on sm_80 and sm_90a, around the slow path of sin/cos's
    range reduction), 4 for smaller tiles (8 warps spilled 4 B on [1, 1024] and [16, 64]
    tiles; bench/compile_report.py)."""
    return 8 if block_r * block_w >= 4096 else 4


def add_gaussian_noise_(x, std, *, seed=None, secure_mode=False):
    """x += std·N(0, I) in place, x seen as [-1, x.shape[-1]] for the noise rule."""
    key = noise_key(seed)
    if std == 0 or x.numel() == 0:
        return x
    work = x.contiguous()  # x itself when it is contiguous
    rows = work.view(-1, x.shape[-1] if x.dim() else 1)
    height, width = rows.shape
    grid, block_r, block_w = noise_grid(height, width)
    _noise_kernel[grid](
        rows,
        height,
        width,
        *noise_args(key, std, secure_mode),
        SECURE=secure_mode,
        BLOCK_R=block_r,
        BLOCK_W=block_w,
        num_warps=noise_warps(block_r, block_w),
    )
    return x if work is x else x.copy_(work)


# ---------------------------------------------------------------- twin

_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_U32 = 0xFFFFFFFF


def _mul32(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of const * x for uint32 values held in int64 (no int64 overflow)."""
    lo_part = const * (x & 0xFFFF)
    hi_part = const * (x >> 16)
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _U32
    return hi, lo


def philox4x32(key: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox-4x32-10 words (uint32 values in int64) of int64 offsets under a 128-bit
    key, as the kernel draws them; for key < 2^64 (nonce 0) exactly tl.randint4x(key, offsets)."""
    nonce = key >> 64
    c0, c1 = offsets & _U32, (offsets >> 32) & _U32  # any int64 bit pattern, as the kernel
    c2 = torch.full_like(offsets, nonce & _U32)
    c3 = torch.full_like(offsets, (nonce >> 32) & _U32)
    k0, k1 = key & _U32, (key >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def box_muller_reference(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Two float32 N(0, 1) tensors from Philox words (uint32 values in int64) by the rule above,
    the float32 operations of the kernel's box_muller in the same order."""
    f32 = torch.float32
    u = w1.to(f32) * 2.0**-32 + (w2.to(f32) + 0.5) * 2.0**-64  # powers of two: exact products
    radius = torch.sqrt(-2.0 * torch.log(torch.clamp(u, max=BELOW_ONE)))
    theta = (w3.to(f32) + 0.5) * torch.tensor(TWO_PI_POW_M32, dtype=f32)
    return radius * torch.cos(theta), radius * torch.sin(theta)


def philox_normals(key: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two float32 N(0, 1) tensors of int64 counters under a 128-bit key, as the kernel."""
    w1, w2, w3, _ = philox4x32(key, offsets)
    return box_muller_reference(w1, w2, w3)


def released_noise(key: int, rows: int, width: int, device=None, *, std: float = 1.0):
    """The float32 noise [rows, width] of a tensor seen as rows of length `width`, with std
    `std` (see the rule above), before secure_mode's rounding: N(0, std²·I) up to float32
    rounding."""
    per_row = -(-width // NOISE_LANES)
    counters = torch.arange(rows * per_row, device=device, dtype=torch.int64)
    noise = torch.stack(philox_normals(key, counters), dim=-1)
    noise = noise * torch.tensor(std, dtype=torch.float32)
    return noise.view(rows, per_row * NOISE_LANES)[:, :width]


def snap_to_grid(x: torch.Tensor, grid: float) -> torch.Tensor:
    """x rounded to the nearest multiple of the power of two `grid` (halves up), in x's dtype:
    the kernel's floor(x·(1/grid) + 0.5)·grid, exact float operations."""
    return torch.floor(x * (1.0 / grid) + 0.5) * grid


def add_gaussian_noise_reference(x, std, *, seed=None, secure_mode=False):
    """add_gaussian_noise_'s twin: x += std·N(0, I) in place, by the same noise rule."""
    key = noise_key(seed)
    if std == 0 or x.numel() == 0:  # nothing to noise (and no [-1, 0] view of an empty x)
        return x
    rows = x.float().reshape(-1, x.shape[-1] if x.dim() else 1)
    noised_rows = rows + released_noise(key, *rows.shape, device=x.device, std=std)
    if secure_mode:
        noised_rows = snap_to_grid(noised_rows, secure_noise_grid(std))
    return x.copy_(noised_rows.view(x.shape))
