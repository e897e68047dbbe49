"""Clipped, noised weight gradients of linear layers, and the shared Gaussian-noise epilogue.

clipped_grad_sum: Σ_i c_i g_iᵀ a_i as one GEMM over the B·T rows; each loaded tile of rows is
scaled by its example's clip factor before tl.dot, so clipping adds no pass over memory. The
bias gradient is computed by extra programs of the same launch (column sums of scaled g).

block_clipped_grad_sum: every program owns one BLOCK_CLIP_TILE tile of the weight gradient;
per example it accumulates that example's tile over its T rows in registers, takes its norm,
clips it and adds it to the tile's sum: the GEMM's FLOPs plus O(tile) per example. When the
tiles are too few to fill the GPU, the examples are split over several programs per tile whose
fp32 partial sums are added by the noise kernel.

Noise: Philox-4x32-10 keyed by the 128-bit noise_key(seed) (64 bits of key, 64 bits in the
counter words the offsets leave free), then Box-Muller with a 64-bit uniform for the radius, so
the tails are not truncated at tl.randn's 5.68 standard deviations; by the rule documented in
reference.py (reference.released_noise is its twin). One Philox call yields two normals;
secure_mode draws the same normals and rounds the noised value to a grid (one floor more).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import BELOW_ONE, BLOCK_CLIP_TILE, NOISE_LANES, TWO_PI_POW_M32, secure_noise_grid
from .utils import checked_grid, interpreting, noise_key

FLT_MAX = tl.constexpr(3.4028234663852886e38)
FLT_MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)
TWO_POW_M32 = tl.constexpr(2.0**-32)
TWO_POW_M64 = tl.constexpr(2.0**-64)
U_MAX = tl.constexpr(BELOW_ONE)
ANGLE_PER_WORD = tl.constexpr(TWO_PI_POW_M32)


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """All configs on a GPU; only the first through the interpreter (it fails on several)."""
    return configs[:1] if interpreting() else configs


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot must take fp32 operands: fp32 inputs (IEEE, as torch's default matmul),
    and every dtype in the interpreter, whose bf16 tl.dot is wrong."""
    return dtype == torch.float32 or interpreting()


@triton.jit
def dot_acc(x, y, acc, DOT_FP32: tl.constexpr):
    """acc + x @ y with fp32 accumulation."""
    if DOT_FP32:
        out = tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(x, y, acc)
    return out


def noise_args(key: int, noise_std: float, secure_mode: bool) -> tuple:
    """The noise epilogue's scalar kernel arguments (key, nonce_lo, nonce_hi, noise_std, grid,
    inv_grid) for a 128-bit noise key: the Philox key as a signed 64-bit integer and the nonce
    as two signed 32-bit words (fixed integer types whatever the values); the noise std, and
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
    """Two N(0, 1) from three uint32 words by the rule in reference.py: radius from the 64-bit
    uniform (w1·2^32 + w2 + 1/2)/2^64, never 0, so the tail reaches 9.49 (tl.randn's
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
def noised(acc, rows, col0, width, base, key, nonce_lo, nonce_hi, noise_std, grid, inv_grid,
           SECURE: tl.constexpr):
    """acc + noise (rounded to `grid` when SECURE) for the tile acc [R, C] at `rows` and
    columns col0 .. col0+C (col0 even), by the rule in reference.py."""
    R: tl.constexpr = acc.shape[0]
    C: tl.constexpr = acc.shape[1]
    counters = (base + rows.to(tl.int64)[:, None] * tl.cdiv(width, 2)
                + (col0 // 2 + tl.arange(0, C // 2))[None, :])
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
def noised_by_halves(acc, rows, col0, width, base, key, nonce_lo, nonce_hi, noise_std, grid,
                     inv_grid, SECURE: tl.constexpr):
    """noised, on the two column halves of acc one after the other."""
    C: tl.constexpr = acc.shape[1]
    left, right = column_halves(acc)
    left = noised(left, rows, col0, width, base, key, nonce_lo, nonce_hi, noise_std, grid,
                  inv_grid, SECURE)
    right = noised(right, rows, col0 + C // 2, width, base, key, nonce_lo, nonce_hi, noise_std,
                   grid, inv_grid, SECURE)
    return joined_halves(left, right)


@triton.jit
def noise_epilogue(acc, rows, col0, width, base, key, nonce_lo, nonce_hi, noise_std, grid,
                   inv_grid, scale, HAS_NOISE: tl.constexpr, SECURE: tl.constexpr):
    """scale·(acc + noise) for the tile acc [R, C] at `rows` and columns col0 .. col0+C (col0
    even) of a released tensor of row length `width`, by the rule in reference.py: z(r, k) is
    lane k % 2 of the normals of counter base + r·⌈width/2⌉ + k // 2, times noise_std; SECURE
    then rounds acc + noise to a multiple of `grid`.
    """
    if HAS_NOISE:
        C: tl.constexpr = acc.shape[1]
        if C >= 8:
            # The four column quarters one after the other: a quarter of the tile's Philox
            # states live at a time (all at once, 64 elements per thread spilled).
            left, right = column_halves(acc)
            left = noised_by_halves(left, rows, col0, width, base, key, nonce_lo, nonce_hi,
                                    noise_std, grid, inv_grid, SECURE)
            right = noised_by_halves(right, rows, col0 + C // 2, width, base, key, nonce_lo,
                                     nonce_hi, noise_std, grid, inv_grid, SECURE)
            acc = joined_halves(left, right)
        else:
            acc = noised(acc, rows, col0, width, base, key, nonce_lo, nonce_hi, noise_std, grid,
                         inv_grid, SECURE)
    return acc * scale


@triton.jit(do_not_specialize=["key", "nonce_lo", "nonce_hi"])
def _noise_kernel(
    src_ptr, dst_ptr, R, W, N_SPLITS, SPLIT_STRIDE, key, nonce_lo, nonce_hi, noise_std, grid,
    inv_grid, base, scale, HAS_NOISE: tl.constexpr, SECURE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """dst[r, k] = scale·(Σ_s src[s, r, k] + noise(r, k)) for dst [R, W] contiguous and
    src[s] [R, W] contiguous at s·SPLIT_STRIDE. dst may be src (in place, one split): each
    element is read before it is written. One axis of programs, column blocks fastest (see
    noise_grid)."""
    col_blocks = tl.cdiv(W, BLOCK_W)
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = (pid % col_blocks) * BLOCK_W
    cols = col0 + tl.arange(0, BLOCK_W)
    offsets = rows.to(tl.int64)[:, None] * W + cols[None, :]
    mask = (rows[:, None] < R) & (cols[None, :] < W)
    acc = tl.zeros((BLOCK_R, BLOCK_W), tl.float32)
    for _ in range(0, N_SPLITS):
        acc += tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        src_ptr += SPLIT_STRIDE
    acc = noise_epilogue(acc, rows, col0, W, base, key, nonce_lo, nonce_hi, noise_std, grid,
                         inv_grid, scale, HAS_NOISE, SECURE)
    tl.store(dst_ptr + offsets, acc.to(dst_ptr.dtype.element_ty), mask=mask)


def noise_grid(rows: int, width: int) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK_R, BLOCK_W) of _noise_kernel on [rows, width]: tiles of about 4096
    elements, all on axis x (a single wide row would pass axis y's 65,535 at 2**28 elements)."""
    block_r = 1 if rows == 1 else 16
    block_w = max(16, min(4096 // block_r, triton.next_power_of_2(width)))
    return checked_grid(triton.cdiv(rows, block_r) * triton.cdiv(width, block_w)), block_r, block_w


def noise_warps(block_r: int, block_w: int) -> int:
    """_noise_kernel's warps: 8 for the 4096-element tiles (16 elements per thread; with 4
    warps the noised kernel spilled 4-12 B on sm_80 and sm_90a, around the slow path of
    sin/cos's range reduction), 4 for smaller tiles (8 warps spilled 4 B on [1, 1024] and
    [16, 64] tiles; bench/compile_report.py)."""
    return 8 if block_r * block_w >= 4096 else 4


def finish_with_noise(src, dst, *, noise_std, scale, key, base=0, secure_mode=False):
    """dst = scale·(Σ_s src[s] + noise) for dst [R, W] or [W] (one row) contiguous and
    src [S, *dst.shape] whose per-split blocks are contiguous (S = 1: src may be dst)."""
    rows, width = (1, dst.numel()) if dst.dim() < 2 else dst.shape
    if dst.numel() == 0:
        return dst
    grid, block_r, block_w = noise_grid(rows, width)
    _noise_kernel[grid](
        src, dst, rows, width, src.shape[0], src.stride(0),
        *noise_args(key, noise_std, secure_mode), base, scale,
        HAS_NOISE=noise_std > 0, SECURE=secure_mode, BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=noise_warps(block_r, block_w),
    )
    return dst


def add_gaussian_noise_(x, std, *, seed=None, secure_mode=False):
    """x += std·N(0, I) in place, x seen as [-1, x.shape[-1]] for the noise rule."""
    key = noise_key(seed)
    if std == 0 or x.numel() == 0:
        return x
    work = x.contiguous()  # x itself when it is contiguous
    rows = work.view(-1, x.shape[-1] if x.dim() else 1)
    finish_with_noise(rows[None], rows, noise_std=std, scale=1.0, key=key,
                      secure_mode=secure_mode)
    return x if work is x else x.copy_(work)


def bias_noise_base(dout: int, din: int) -> int:
    """First Philox counter of a linear layer's bias noise: after the weight's dout·⌈din/2⌉."""
    return dout * triton.cdiv(din, NOISE_LANES)


def _flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, d] or [B, d] -> contiguous [B·T, d]."""
    return x.reshape(-1, x.shape[-1]).contiguous()


# ---------------------------------------------------------------- Σ_i c_i g_iᵀ a_i


@triton.autotune(
    configs=autotune_configs([
        # The noised variants spilled (bench/compile_report.py) in [128, 128] with 4 warps
        # (0.8-6.7 KB), [128, 64] and [64, 128] with 4 warps on sm_80 (12 B), and with 8 warps
        # under triton 3.9 on sm_80 (16-36 B: ptxas stopped at 128 registers).
        triton.Config({"BLOCK_O": 128, "BLOCK_I": 128, "BLOCK_R": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_R": 64}, num_warps=4, num_stages=3),
    ]),
    key=["ROWS", "DIN", "DOUT", "HAS_NOISE", "SECURE"],
)
@triton.jit(do_not_specialize=["key", "nonce_lo", "nonce_hi"])
def _clipped_sum_kernel(
    a_ptr, g_ptr, c_ptr, w_ptr, b_ptr, ROWS, T, DIN, DOUT, key, nonce_lo, nonce_hi, noise_std,
    grid, inv_grid, BIAS_BASE, scale,
    HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr, SECURE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    n_i = tl.cdiv(DIN, BLOCK_I)
    n_weight_tiles = tl.cdiv(DOUT, BLOCK_O) * n_i
    offs_r = tl.arange(0, BLOCK_R)
    offs_o = tl.arange(0, BLOCK_O)
    if pid < n_weight_tiles:
        cols_o = (pid // n_i) * BLOCK_O + offs_o
        cols_i = (pid % n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_O, BLOCK_I), tl.float32)
        for r0 in range(0, ROWS, BLOCK_R):
            rows = r0 + offs_r
            c = tl.load(c_ptr + rows // T, mask=rows < ROWS, other=0.0)
            # Dropped examples (c = 0) must add exactly 0, even where a or g is inf/NaN: their
            # rows are masked out of the loads (zero-filled by the copy, no extra pass).
            live = (rows < ROWS) & (c != 0.0)
            rows64 = rows.to(tl.int64)
            # gᵀ is loaded as a [BLOCK_O, BLOCK_R] tile (no tl.trans: fewer registers). Edge
            # tiles load wrapped-around columns (no column masks): the store drops them.
            g_t = tl.load(g_ptr + rows64[None, :] * DOUT + (cols_o % DOUT)[:, None],
                          mask=live[None, :], other=0.0)
            x = tl.load(a_ptr + rows64[:, None] * DIN + (cols_i % DIN)[None, :],
                        mask=live[:, None], other=0.0)
            g_t = (g_t * c[None, :]).to(x.dtype)
            acc = dot_acc(g_t, x, acc, DOT_FP32)
        acc = noise_epilogue(acc, cols_o, (pid % n_i) * BLOCK_I, DIN, 0, key, nonce_lo, nonce_hi,
                             noise_std, grid, inv_grid, scale, HAS_NOISE, SECURE)
        offsets = cols_o.to(tl.int64)[:, None] * DIN + cols_i[None, :]
        mask = (cols_o[:, None] < DOUT) & (cols_i[None, :] < DIN)
        tl.store(w_ptr + offsets, acc.to(w_ptr.dtype.element_ty), mask=mask)
    elif HAS_BIAS:
        # The bias programs: column sums of the scaled rows of g (no tl.dot, no loads of a).
        cols_o = (pid - n_weight_tiles) * BLOCK_O + offs_o
        acc_b = tl.zeros((BLOCK_O,), tl.float32)
        for r0 in range(0, ROWS, BLOCK_R):
            rows = r0 + offs_r
            c = tl.load(c_ptr + rows // T, mask=rows < ROWS, other=0.0)
            live = ((rows < ROWS) & (c != 0.0))[:, None]
            g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * DOUT + cols_o[None, :],
                        mask=live & (cols_o[None, :] < DOUT), other=0.0)
            acc_b += tl.sum(g * c[:, None], axis=0)
        acc_b = noise_epilogue(acc_b[None, :], tl.arange(0, 1), (pid - n_weight_tiles) * BLOCK_O,
                               DOUT, BIAS_BASE, key, nonce_lo, nonce_hi, noise_std, grid, inv_grid,
                               scale, HAS_NOISE, SECURE).reshape(BLOCK_O)
        tl.store(b_ptr + cols_o, acc_b.to(b_ptr.dtype.element_ty), mask=cols_o < DOUT)


def clipped_sum_grid(dout: int, din: int, block_o: int, block_i: int, bias: bool) -> tuple[int]:
    """_clipped_sum_kernel's grid: one program per weight tile, then one per bias block."""
    tiles_o = triton.cdiv(dout, block_o)
    return checked_grid(tiles_o * triton.cdiv(din, block_i) + (tiles_o if bias else 0))


def clipped_grad_sum(
    a, g, clip_factors, *, noise_std=0.0, scale=1.0, bias=True, seed=None, out_dtype=None,
    secure_mode=False,
):
    """scale·(Σ_i c_i g_iᵀ a_i + noise_std·N(0, I)) and the bias likewise; see functional."""
    key = noise_key(seed)
    out_dtype = out_dtype or a.dtype
    seq_len = a.shape[1] if a.dim() == 3 else 1
    a2, g2 = _flatten_rows(a), _flatten_rows(g)
    rows, din = a2.shape
    dout = g2.shape[1]
    weight = torch.empty(dout, din, dtype=out_dtype, device=a.device)
    bias_grad = torch.empty(dout, dtype=out_dtype, device=a.device) if bias else None

    def grid(meta):
        return clipped_sum_grid(dout, din, meta["BLOCK_O"], meta["BLOCK_I"], bias)

    _clipped_sum_kernel[grid](
        a2, g2, clip_factors.contiguous(), weight, weight if bias_grad is None else bias_grad,
        rows, seq_len, din, dout, *noise_args(key, noise_std, secure_mode),
        bias_noise_base(dout, din), scale, HAS_BIAS=bias, HAS_NOISE=noise_std > 0,
        SECURE=secure_mode, DOT_FP32=dot_in_fp32(a.dtype),
    )
    return weight, bias_grad


# ---------------------------------------------------------------- block clipping


@triton.autotune(
    configs=autotune_configs([
        # Two [128, 128] fp32 accumulators (the example's tile and the sum): 8 warps, 255
        # registers on sm_80. BLOCK_T 64, and BLOCK_T 32 with 3 stages, spilled there 4-28 B;
        # 16 warps cap a thread at 128 registers and spilled more (bench/compile_report.py).
        triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=5),
        triton.Config({"BLOCK_T": 16}, num_warps=8, num_stages=4),
    ]),
    key=["T", "DIN", "DOUT", "HAS_NOISE", "SECURE", "PARTIAL"],
)
@triton.jit(do_not_specialize=["key", "nonce_lo", "nonce_hi"])
def _block_clipped_sum_kernel(
    a_ptr, g_ptr, w_ptr, b_ptr, B, T, DIN, DOUT, threshold, key, nonce_lo, nonce_hi, noise_std,
    grid, inv_grid, BIAS_BASE, scale,
    HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr, SECURE: tl.constexpr, PARTIAL: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Program (tile, split) sums the clipped contributions of examples split, split + S, ...
    to one tile. PARTIAL: store fp32 sums to w/b[split] for _noise_kernel, else the result."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    n_i = tl.cdiv(DIN, BLOCK_I)
    cols_o = (tile // n_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols_i = (tile % n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    # The bias slice of these rows belongs to the group of the tile in the first column.
    first_column = tile % n_i == 0
    offs_t = tl.arange(0, BLOCK_T)
    n_chunks = tl.cdiv(T, BLOCK_T)
    n_mine = tl.cdiv(B - split, n_splits)
    acc = tl.zeros((BLOCK_O, BLOCK_I), tl.float32)
    acc_b = tl.zeros((BLOCK_O,), tl.float32)
    tile_i = tl.zeros((BLOCK_O, BLOCK_I), tl.float32)
    bias_i = tl.zeros((BLOCK_O,), tl.float32)
    in_tile = (cols_o[:, None] < DOUT) & (cols_i[None, :] < DIN)
    # One flat loop over (example, chunk of its T rows): an example's tile is complete, clipped
    # and added at its last chunk.
    for j in range(0, n_mine * n_chunks):
        example = split + (j // n_chunks) * n_splits
        t = (j % n_chunks) * BLOCK_T + offs_t
        rows64 = example.to(tl.int64) * T + t
        # Edge tiles load wrapped-around columns (no column masks in the loop); their
        # entries are zeroed before the norm.
        g_t = tl.load(g_ptr + rows64[None, :] * DOUT + (cols_o % DOUT)[:, None],
                      mask=t[None, :] < T, other=0.0)
        x = tl.load(a_ptr + rows64[:, None] * DIN + (cols_i % DIN)[None, :],
                    mask=t[:, None] < T, other=0.0)
        tile_i = dot_acc(g_t, x, tile_i, DOT_FP32)
        if HAS_BIAS:
            if first_column:
                bias_i += tl.sum(g_t.to(tl.float32), axis=1)
        if j % n_chunks == n_chunks - 1:
            tile_i = tl.where(in_tile, tile_i, 0.0)
            bias_i = tl.where(cols_o < DOUT, bias_i, 0.0)
            norm = tl.sqrt(tl.sum(tile_i * tile_i) + tl.sum(bias_i * bias_i))
            # Non-finite norm (NaN/inf in this example): factor 0 and the tile adds exactly 0.
            factor = tl.where(norm <= FLT_MAX, tl.minimum(1.0, threshold / (norm + 1e-6)), 0.0)
            # A subnormal factor is rounded by up to a third of itself: such a tile (norm
            # above 2^126 thresholds) adds 0, never more than its threshold.
            factor = tl.where(factor >= FLT_MIN_NORMAL, factor, 0.0)
            acc += tl.where(factor > 0.0, tile_i * factor, 0.0)
            acc_b += tl.where(factor > 0.0, bias_i * factor, 0.0)
            tile_i = tl.zeros((BLOCK_O, BLOCK_I), tl.float32)
            bias_i = tl.zeros((BLOCK_O,), tl.float32)
    offsets = cols_o.to(tl.int64)[:, None] * DIN + cols_i[None, :]
    mask = (cols_o[:, None] < DOUT) & (cols_i[None, :] < DIN)
    if PARTIAL:
        tl.store(w_ptr + split.to(tl.int64) * DOUT * DIN + offsets, acc, mask=mask)
        if HAS_BIAS:
            if first_column:
                tl.store(b_ptr + split * DOUT + cols_o, acc_b, mask=cols_o < DOUT)
    else:
        acc = noise_epilogue(acc, cols_o, (tile % n_i) * BLOCK_I, DIN, 0, key, nonce_lo, nonce_hi,
                             noise_std, grid, inv_grid, scale, HAS_NOISE, SECURE)
        tl.store(w_ptr + offsets, acc.to(w_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            if first_column:
                acc_b = noise_epilogue(acc_b[None, :], tl.arange(0, 1), (tile // n_i) * BLOCK_O,
                                       DOUT, BIAS_BASE, key, nonce_lo, nonce_hi, noise_std,
                                       grid, inv_grid, scale, HAS_NOISE,
                                       SECURE).reshape(BLOCK_O)
                tl.store(b_ptr + cols_o, acc_b.to(b_ptr.dtype.element_ty), mask=cols_o < DOUT)


def block_clip_splits(num_tiles: int, batch: int, device: torch.device) -> int:
    """Programs per tile (examples split between them) so that about four waves of programs
    fill the GPU; 1 in the interpreter. The groups, hence the result, do not depend on it."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(batch, triton.cdiv(4 * sms, num_tiles)))


def block_clipped_grad_sum(
    a, g, threshold, *, noise_std=0.0, scale=1.0, bias=True, seed=None, out_dtype=None,
    secure_mode=False,
):
    """Per-example, per-tile clipped weight-gradient GEMM with noise; see functional."""
    key = noise_key(seed)
    out_dtype = out_dtype or a.dtype
    seq_len = a.shape[1] if a.dim() == 3 else 1
    batch = a.shape[0]
    a2, g2 = _flatten_rows(a), _flatten_rows(g)
    din, dout = a2.shape[1], g2.shape[1]
    block_o, block_i = BLOCK_CLIP_TILE
    num_tiles = triton.cdiv(dout, block_o) * triton.cdiv(din, block_i)
    grid = checked_grid(num_tiles, block_clip_splits(num_tiles, batch, a.device))
    splits = grid[1]
    weight = torch.empty(dout, din, dtype=out_dtype, device=a.device)
    bias_grad = torch.empty(dout, dtype=out_dtype, device=a.device) if bias else None
    if splits > 1:
        w_dst = torch.empty(splits, dout, din, dtype=torch.float32, device=a.device)
        b_dst = torch.zeros(splits, dout, dtype=torch.float32, device=a.device)
    else:
        w_dst, b_dst = weight, weight if bias_grad is None else bias_grad
    _block_clipped_sum_kernel[grid](
        a2, g2, w_dst, b_dst, batch, seq_len, din, dout, threshold,
        *noise_args(key, noise_std, secure_mode), bias_noise_base(dout, din), scale,
        HAS_BIAS=bias, HAS_NOISE=noise_std > 0, SECURE=secure_mode,
        PARTIAL=splits > 1, DOT_FP32=dot_in_fp32(a.dtype), BLOCK_O=block_o, BLOCK_I=block_i,
    )
    if splits > 1:
        noise = dict(noise_std=noise_std, scale=scale, key=key, secure_mode=secure_mode)
        finish_with_noise(w_dst, weight, **noise)
        if bias:
            finish_with_noise(b_dst, bias_grad, base=bias_noise_base(dout, din),
                              **noise)
    return weight, bias_grad
