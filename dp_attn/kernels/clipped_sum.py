"""Clipped weight gradients of linear layers, and their plain-PyTorch twins.

clipped_grad_sum: Σ_i c_i g_iᵀ a_i as one GEMM over the B·T rows; each loaded tile of rows is
scaled by its example's clip factor before tl.dot, so clipping adds no pass over memory. The
bias gradient is computed by extra programs of the same launch (column sums of scaled g).

block_clipped_grad_sum: every program owns one BLOCK_CLIP_TILE tile of the weight gradient;
per example it accumulates that example's tile over its T rows in registers, takes its norm,
clips it and adds it to the tile's sum: the GEMM's FLOPs plus O(tile) per example. When the
tiles are too few to fill the GPU, the examples are split over several programs per tile whose
fp32 partial sums are then added.

Neither adds noise: the engine noises the summed gradients once per step (noise.py).
clipped_grad_sum_reference and block_clipped_grad_sum_reference are the twins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_utils import autotune_configs, dot_acc, dot_in_fp32, feature_block, fitted_to_layer
from .utils import as_sequences, checked_grid, zero_dropped

FLT_MAX = tl.constexpr(3.4028234663852886e38)
FLT_MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)

# Block clipping: the privacy groups are the tiles of the weight gradient, BLOCK_CLIP_TILE =
# (rows of dout, columns of din), aligned at 0 (edge tiles are smaller). The bias slice of
# rows [o, o + tile rows) joins the group of the tile in the first din-column, so the number
# of groups does not depend on the bias. Fixed (never autotuned): it defines the groups.
BLOCK_CLIP_TILE = (128, 128)


def block_clip_num_groups(dout: int, din: int) -> int:
    """Number of block-clipping groups (tiles) of a [dout, din] weight (bias included)."""
    rows, cols = BLOCK_CLIP_TILE
    return -(-dout // rows) * -(-din // cols)


def _flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, d] or [B, d] -> contiguous [B·T, d]."""
    return x.reshape(-1, x.shape[-1]).contiguous()


# ---------------------------------------------------------------- Σ_i c_i g_iᵀ a_i


@triton.autotune(
    configs=autotune_configs(
        [
            # Chosen when the kernel still noised in its epilogue: that variant spilled
            # (bench/compile_report.py) in [128, 128] with 4 warps (0.8-6.7 KB), and in [128, 64]
            # and [64, 128] on sm_80 (12 B with 4 warps, 16-36 B with 8 under triton 3.9).
            triton.Config(
                {"BLOCK_O": 128, "BLOCK_I": 128, "BLOCK_R": 64}, num_warps=8, num_stages=3
            ),
            triton.Config({"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_R": 64}, num_warps=4, num_stages=3),
            # For layers at most 32 wide, where [64, 64] spilled under triton 3.6 (8-32 B).
            triton.Config({"BLOCK_O": 32, "BLOCK_I": 32, "BLOCK_R": 32}, num_warps=4, num_stages=3),
        ]
    ),
    key=["ROWS", "DIN", "DOUT"],
    prune_configs_by=fitted_to_layer(lambda a: {"BLOCK_O": a["DOUT"], "BLOCK_I": a["DIN"]}),
)
@triton.jit
def _clipped_sum_kernel(
    a_ptr,
    g_ptr,
    c_ptr,
    w_ptr,
    b_ptr,
    ROWS,
    T,
    DIN,
    DOUT,
    scale,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
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
            g_t = tl.load(
                g_ptr + rows64[None, :] * DOUT + (cols_o % DOUT)[:, None],
                mask=live[None, :],
                other=0.0,
            )
            x = tl.load(
                a_ptr + rows64[:, None] * DIN + (cols_i % DIN)[None, :],
                mask=live[:, None],
                other=0.0,
            )
            g_t = (g_t * c[None, :]).to(x.dtype)
            acc = dot_acc(g_t, x, acc, DOT_FP32)
        acc = acc * scale
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
            g = tl.load(
                g_ptr + rows.to(tl.int64)[:, None] * DOUT + cols_o[None, :],
                mask=live & (cols_o[None, :] < DOUT),
                other=0.0,
            )
            acc_b += tl.sum(g * c[:, None], axis=0)
        acc_b = acc_b * scale
        tl.store(b_ptr + cols_o, acc_b.to(b_ptr.dtype.element_ty), mask=cols_o < DOUT)


def clipped_sum_grid(dout: int, din: int, block_o: int, block_i: int, bias: bool) -> tuple[int]:
    """_clipped_sum_kernel's grid: one program per weight tile, then one per bias block."""
    tiles_o = triton.cdiv(dout, block_o)
    return checked_grid(tiles_o * triton.cdiv(din, block_i) + (tiles_o if bias else 0))


def clipped_grad_sum(a, g, clip_factors, *, scale=1.0, bias=True, out_dtype=None):
    """scale·Σ_i c_i g_iᵀ a_i and the bias likewise; see functional."""
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
        a2,
        g2,
        clip_factors.contiguous(),
        weight,
        weight if bias_grad is None else bias_grad,
        rows,
        seq_len,
        din,
        dout,
        scale,
        HAS_BIAS=bias,
        DOT_FP32=dot_in_fp32(a.dtype),
    )
    return weight, bias_grad


# ---------------------------------------------------------------- block clipping


@triton.autotune(
    configs=autotune_configs(
        [
            # Two [128, 128] fp32 accumulators (the example's tile and the sum): 8 warps, 255
            # registers on sm_80. BLOCK_T 64, and BLOCK_T 32 with 3 stages, spilled there 4-28 B;
            # 16 warps cap a thread at 128 registers and spilled more (bench/compile_report.py).
            triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=5),
            triton.Config({"BLOCK_T": 16}, num_warps=8, num_stages=4),
            # Tiles fitted to a narrow layer: 8 warps spilled 8 B there under triton 3.6.
            triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_T": 16}, num_warps=4, num_stages=4),
        ]
    ),
    key=["T", "DIN", "DOUT", "PARTIAL"],
    prune_configs_by={
        "early_config_prune": lambda configs, named_args, **kwargs: (
            [
                c
                for c in configs
                if c.num_warps == block_clip_warps(kwargs["BLOCK_O"], kwargs["BLOCK_I"])
            ]
            or configs
        )
    },
)
@triton.jit
def _block_clipped_sum_kernel(
    a_ptr,
    g_ptr,
    w_ptr,
    b_ptr,
    B,
    T,
    DIN,
    DOUT,
    threshold,
    scale,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Program (tile, split) sums the clipped contributions of examples split, split + S, ...
    to one tile. PARTIAL: store fp32 sums to w/b[split] (added by the launcher), else the result."""
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
        g_t = tl.load(
            g_ptr + rows64[None, :] * DOUT + (cols_o % DOUT)[:, None],
            mask=t[None, :] < T,
            other=0.0,
        )
        x = tl.load(
            a_ptr + rows64[:, None] * DIN + (cols_i % DIN)[None, :], mask=t[:, None] < T, other=0.0
        )
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
        acc = acc * scale
        tl.store(w_ptr + offsets, acc.to(w_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            if first_column:
                acc_b = acc_b * scale
                tl.store(b_ptr + cols_o, acc_b.to(b_ptr.dtype.element_ty), mask=cols_o < DOUT)


def block_clip_warps(block_o: int, block_i: int) -> int:
    """Warps of a block-clipping program: 8 for the full tile, 4 for one fitted to a layer of
    at most 64x64 (bench/compile_report.py)."""
    return 8 if block_o * block_i > 64 * 64 else 4


def block_clip_splits(num_tiles: int, batch: int, device: torch.device) -> int:
    """Programs per tile (examples split between them) so that about four waves of programs
    fill the GPU; 1 in the interpreter. The groups, hence the result, do not depend on it."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(batch, triton.cdiv(4 * sms, num_tiles)))


def block_clipped_grad_sum(a, g, threshold, *, scale=1.0, bias=True, out_dtype=None):
    """Per-example, per-tile clipped weight-gradient GEMM; see functional."""
    out_dtype = out_dtype or a.dtype
    seq_len = a.shape[1] if a.dim() == 3 else 1
    batch = a.shape[0]
    a2, g2 = _flatten_rows(a), _flatten_rows(g)
    din, dout = a2.shape[1], g2.shape[1]
    # A layer narrower than the tile is one tile wide: a kernel tile fitted to it (the groups,
    # hence the result, are the same) computes no padding and spilled no registers.
    block_o = min(BLOCK_CLIP_TILE[0], feature_block(dout))
    block_i = min(BLOCK_CLIP_TILE[1], feature_block(din))
    num_tiles = triton.cdiv(dout, block_o) * triton.cdiv(din, block_i)
    grid = checked_grid(num_tiles, block_clip_splits(num_tiles, batch, a.device))
    splits = grid[1]
    if splits > 1:
        w_dst = torch.empty(splits, dout, din, dtype=torch.float32, device=a.device)
        b_dst = torch.zeros(splits, dout, dtype=torch.float32, device=a.device)
    else:
        w_dst = torch.empty(dout, din, dtype=out_dtype, device=a.device)
        b_dst = torch.empty(dout, dtype=out_dtype, device=a.device) if bias else w_dst  # unused
    _block_clipped_sum_kernel[grid](
        a2,
        g2,
        w_dst,
        b_dst,
        batch,
        seq_len,
        din,
        dout,
        threshold,
        scale,
        HAS_BIAS=bias,
        PARTIAL=splits > 1,
        DOT_FP32=dot_in_fp32(a.dtype),
        BLOCK_O=block_o,
        BLOCK_I=block_i,
    )
    if splits == 1:
        return w_dst, (b_dst if bias else None)

    def finished(partials):
        """The splits' fp32 partial sums added (deterministic: no atomics), scaled, cast."""
        return (partials.sum(0) * scale).to(out_dtype)

    return finished(w_dst), (finished(b_dst) if bias else None)


# ---------------------------------------------------------------- twins


def clipped_grad_sum_reference(a, g, clip_factors, *, scale=1.0, bias=True, out_dtype=None):
    """clipped_grad_sum's twin: scale·Σ_i c_i g_iᵀ a_i [dout, din], and scale·Σ_i c_i Σ_t g_it
    [dout] (None without bias). Examples with c_i = 0 add exactly 0."""
    out_dtype = out_dtype or a.dtype
    a = zero_dropped(as_sequences(a), clip_factors)
    g = zero_dropped(as_sequences(g), clip_factors) * clip_factors[:, None, None]
    din, dout = a.shape[2], g.shape[2]
    weight = g.reshape(-1, dout).T @ a.reshape(-1, din)
    bias_grad = (g.sum((0, 1)) * scale).to(out_dtype) if bias else None
    return (weight * scale).to(out_dtype), bias_grad


def block_clipped_grad_sum_reference(a, g, threshold, *, scale=1.0, bias=True, out_dtype=None):
    """block_clipped_grad_sum's twin: like clipped_grad_sum_reference, but each example's
    contribution to each group (weight tile, plus the bias slice for first-column tiles) is
    clipped to L2 norm `threshold`: factor min(1, threshold / (norm + 1e-6)), and 0 when the
    norm is not finite or the factor subnormal."""
    out_dtype = out_dtype or a.dtype
    a, g = as_sequences(a).float(), as_sequences(g).float()
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
    bias_grad = (bias_sum * scale).to(out_dtype) if bias else None
    return (weight * scale).to(out_dtype), bias_grad
