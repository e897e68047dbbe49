"""Flash attention: softmax(q kᵀ · scale) v as tiled Triton kernels (FlashAttention-2).

Forward: one program per (query block, head, example) streams over key blocks with an online
softmax and saves the row log-sum-exp. Backward: a preprocessing kernel forms
Delta = rowsum(dO ∘ O); one program per (key block, kv head, example) accumulates dK and dV over
the query blocks of every query head that shares that kv head (GQA), so the reduction stays in
registers and the result is deterministic (no atomics); one program per (query block, head,
example) accumulates dQ.

Tricks from Triton's fused-attention tutorial: exp2 with log2(e) folded into the scale, and the
key range of a query block split into blocks that need no mask (no causal, padding or length
check) and the few that do (the causal diagonal and the last, partial block).

Head dims: any D from 1 to 256. The kernels work on tiles BLOCK_D = padded_head_dim(D) wide
(the next power of two, at least 16): the D real columns are loaded with a column mask, the
padding columns read as 0 (exact for q·kᵀ and p·v) and are never stored; the softmax scale
stays 1/sqrt(D). Power-of-two D ≥ 16 build no column mask at all.

Masks: query i of example b sees key j iff j < key_lengths[b] and, when causal,
j <= i + Tk - Tq (bottom-right alignment). A row that sees no key gets output 0 and its
log-sum-exp is stored as +inf, so that every probability the backward recomputes for it is 0.

fp32 inputs: tl.dot uses 3xTF32 (three TF32 tensor-core products, about fp32 accuracy: IEEE
fp32 FMA dots compile to heavily spilling code on sm_90) unless the user opted into TF32 for
matmuls (torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision("high")),
in which case plain TF32. The interpreter computes fp32 dots in IEEE fp32.

The launchers are the torch.library custom ops dp_attn::flash_attention_fwd and
dp_attn::flash_attention_bwd, with fake (shape) functions and the autograd formula registered,
so that torch.compile runs a model calling flash_attention without a graph break.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from dp_attn.checks import check_bool, is_real
from dp_attn.kernels.utils import check_same, check_tensor, checked_grid, interpreting

MAX_HEAD_DIM = 256
KEY_LENGTH_DTYPES = (torch.int32, torch.int64)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))
# Row offsets inside one (example, head) slice are 32-bit in the kernels.
MAX_ROW_OFFSET = 2**31 - 1


# ---------------------------------------------------------------- launch configurations


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Candidates per head dim (BLOCK_M, BLOCK_N, num_warps, num_stages) for Ampere and Hopper alike:
# each 16-bit one compiles for sm_80 and sm_90a under triton 3.6 and 3.9 without register spills
# and within shared memory (bench/compile_report.py; the numbers are in bench/results/compile/).
# 4-warp tiles of 128 rows spill on sm_80 at D >= 64: those tiles take 8 warps there.
# Forward: BLOCK_M query rows stay in registers, BLOCK_N keys stream through shared memory.
_FWD_CANDIDATES = {
    16: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
    128: [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    # (64, 64, 8, 2) spilled 44 B on sm_90a under triton 3.9; BLOCK_N 32 holds under 190 regs.
    256: [(64, 32, 8, 2), (64, 32, 8, 3)],
}
# dK/dV: BLOCK_N keys (and their fp32 dK, dV accumulators) stay resident, BLOCK_M queries stream.
_DKDV_CANDIDATES = {
    16: [(32, 128, 8, 3), (32, 64, 4, 3), (16, 128, 4, 3)],
    32: [(32, 128, 8, 3), (32, 64, 4, 3), (16, 128, 4, 3)],
    64: [(16, 128, 8, 3), (16, 64, 8, 3), (32, 32, 4, 3), (16, 64, 4, 3)],
    128: [(16, 64, 8, 3), (16, 32, 4, 3)],
    256: [(16, 32, 8, 2), (16, 32, 8, 3)],
}
# dQ: BLOCK_M queries (and their fp32 dQ accumulator) stay resident, BLOCK_N keys stream.
_DQ_CANDIDATES = {
    16: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    32: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    64: [(128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3)],
    128: [(128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 8, 3), (64, 32, 4, 3)],
    256: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2)],
}
# fp32 (tests, debugging) takes one small config per head dim: twice the bytes of 16-bit.
_FP32_CANDIDATES = {
    "fwd": {16: [(64, 32, 4, 2)], 32: [(64, 32, 4, 2)], 64: [(64, 32, 4, 2)],
            128: [(64, 32, 4, 2)], 256: [(32, 32, 8, 2)]},
    "dkdv": {16: [(32, 64, 4, 2)], 32: [(32, 64, 4, 2)], 64: [(16, 64, 8, 2)],
             128: [(16, 32, 8, 2)], 256: [(16, 16, 8, 2)]},
    "dq": {16: [(64, 32, 4, 2)], 32: [(64, 32, 4, 2)], 64: [(64, 32, 4, 2)],
           128: [(16, 32, 4, 2)], 256: [(16, 16, 8, 2)]},
}  # fmt: skip
# The interpreter cannot autotune over several configs, and runs faster with fewer blocks.
_INTERPRETER_CONFIGS = {
    "fwd": _config(128, 64, 4, 1),
    "dkdv": _config(64, 128, 4, 1),
    "dq": _config(128, 64, 4, 1),
}


def _autotune(kernel: str, candidates: dict[int, list[tuple[int, int, int, int]]]):
    """Autotune over the candidates written for the call's head dim and dtype.

    SEQ_BUCKET (next power of two of the longer sequence) is part of the key, so that training
    with varying lengths does not re-tune at every new length.
    """
    fp32_candidates = _FP32_CANDIDATES[kernel]
    if interpreting():
        configs = [_INTERPRETER_CONFIGS[kernel]]
    else:
        tables = (candidates, fp32_candidates)
        unique = sorted({c for table in tables for rows in table.values() for c in rows})
        configs = [_config(*c) for c in unique]

    def keep_head_dim(configs, named_args, **kwargs):
        if interpreting():
            return configs
        fp32 = named_args["Q"].dtype == torch.float32
        wanted = (fp32_candidates if fp32 else candidates)[{**named_args, **kwargs}["BLOCK_D"]]
        return [
            c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted
        ]  # fmt: skip

    return triton.autotune(
        configs=configs,
        key=["HEAD_DIM", "CAUSAL", "SEQ_BUCKET"],
        prune_configs_by={"early_config_prune": keep_head_dim},
    )


# ---------------------------------------------------------------- kernels


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    rows,
    offs_d,
    lo,
    hi,
    kv_len,
    causal_shift,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = k_base + (lo + offs_n)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + (lo + offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        key_ok = cols < kv_len
        k = _load_tile(k_ptrs, key_ok, offs_d, MASK, HEAD_DIM, BLOCK_D)
        qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=INPUT_PRECISION)
        if MASK:
            keep = cols[None, :] < kv_len
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + causal_shift)
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            # qk_scale > 0, so the row max commutes with the scaling (one FMA per score).
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(v_ptrs, key_ok, offs_d, MASK, HEAD_DIM, BLOCK_D)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        m_i = m_ij
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _load_tile(
    ptrs, row_ok, offs_d, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """The [rows, BLOCK_D] tile at ptrs. Masked rows (row_ok false, when MASK_ROWS) and the
    padding columns d >= HEAD_DIM read as 0 and are never touched; a head dim that is its own
    block width needs no column mask, so none is built."""
    if BLOCK_D == HEAD_DIM:
        if MASK_ROWS:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
    else:
        d_ok = offs_d[None, :] < HEAD_DIM
        if MASK_ROWS:
            tile = tl.load(ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
        else:
            tile = tl.load(ptrs, mask=d_ok, other=0.0)
    return tile


@triton.jit
def _load_rows(
    base, rows, row_ok, stride_row, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """The [rows, BLOCK_D] tile of one head; rows past the sequence and padding columns read as
    0, never touched."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :] * stride_d
    return _load_tile(ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)


@triton.jit
def _store_rows(
    base, rows, row_ok, stride_row, stride_d, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Store the first HEAD_DIM columns of a [rows, BLOCK_D] tile of one head; rows past the
    sequence and padding columns are not written."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(
        base + rows[:, None] * stride_row + offs_d[None, :] * stride_d,
        value.to(base.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _key_range(start_m, kv_len, causal_shift, BLOCK_M, BLOCK_N, CAUSAL: tl.constexpr):
    """Keys seen by query rows [start_m, start_m + BLOCK_M): blocks [0, full_hi) need no mask,
    blocks [full_hi, hi) do."""
    hi = kv_len
    full_hi = kv_len // BLOCK_N * BLOCK_N
    if CAUSAL:
        # The last row sees keys < start_m + BLOCK_M + shift, the first keys < start_m + 1 + shift.
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + causal_shift, 0))
        first_row_end = tl.maximum(start_m + 1 + causal_shift, 0)
        full_hi = tl.minimum(full_hi, first_row_end // BLOCK_N * BLOCK_N)
    return full_hi, hi


@_autotune("fwd", _FWD_CANDIDATES)
@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    LSE,
    KeyLengths,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    H,
    G,
    Tq,
    Tk,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # the longest rows first, for a short tail
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // G
    kv_len = tl.load(KeyLengths + b).to(tl.int32) if HAS_KEY_LENGTHS else Tk
    causal_shift = Tk - Tq

    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Tq
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q = _load_rows(q_base, rows, row_ok, stride_qm, stride_qd, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)

    # -FLT_MAX: finite (a fully masked block gives p = 0, not NaN) and below every finite score
    # (-1e30 made a row whose visible scores are all below it output 0).
    m_i = tl.full([BLOCK_M], -3.4028234663852886e38, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    full_hi, hi = _key_range(start_m, kv_len, causal_shift, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        rows,
        offs_d,
        0,
        full_hi,
        kv_len,
        causal_shift,
        qk_scale,
        BLOCK_N,
        False,
        CAUSAL,
        DOT_DTYPE,
        INPUT_PRECISION,
        HEAD_DIM,
        BLOCK_D,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        rows,
        offs_d,
        full_hi,
        hi,
        kv_len,
        causal_shift,
        qk_scale,
        BLOCK_N,
        True,
        CAUSAL,
        DOT_DTYPE,
        INPUT_PRECISION,
        HEAD_DIM,
        BLOCK_D,
    )

    seen = l_i > 0.0
    l_i = tl.where(seen, l_i, 1.0)
    out = acc / l_i[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_i), float("inf"))
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    _store_rows(o_base, rows, row_ok, stride_om, stride_od, out, HEAD_DIM, BLOCK_D)
    tl.store(LSE + (b * H + h).to(tl.int64) * Tq + rows, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    H,
    Tq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    o = _load_rows(o_base, rows, row_ok, stride_om, stride_od, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(do_base, rows, row_ok, stride_dom, stride_dod, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(Delta + (b * H + h).to(tl.int64) * Tq + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    cols,
    offs_d,
    lo,
    hi,
    Tq,
    kv_len,
    causal_shift,
    qk_scale,
    BLOCK_M: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    q_ptrs = q_base + (lo + offs_m)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = do_base + (lo + offs_m)[:, None] * stride_dom + offs_d[None, :] * stride_dod
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        row_ok = rows < Tq
        # Rows past Tq load q = dO = 0 and lse = +inf: they add nothing.
        q = _load_tile(q_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASK:
            keep = cols[:, None] < kv_len
            if CAUSAL:
                keep = keep & (cols[:, None] <= rows[None, :] + causal_shift)
            p_t = tl.where(keep, p_t, 0.0)
        do = _load_tile(do_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
        dv = tl.dot(p_t.to(DOT_DTYPE), do, dv, input_precision=INPUT_PRECISION)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DOT_DTYPE), q, dk, input_precision=INPUT_PRECISION)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@_autotune("dkdv", _DKDV_CANDIDATES)
@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    Delta,
    KeyLengths,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    H,
    G,
    Tq,
    Tk,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    kv_len = tl.load(KeyLengths + b).to(tl.int32) if HAS_KEY_LENGTHS else Tk
    causal_shift = Tk - Tq
    qk_scale = sm_scale * LOG2E

    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < Tk
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    k = _load_rows(k_base, cols, col_ok, stride_kn, stride_kd, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
    v = _load_rows(v_base, cols, col_ok, stride_vn, stride_vd, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks [lo, diag_end) need a mask, [diag_end, q_end) do not.
    q_end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Row i sees key j iff i >= j - shift: the first row to see this block's first key, and
        # the first block-aligned row from which every row sees all of this block's keys.
        lo = tl.maximum(start_n - causal_shift, 0) // BLOCK_M * BLOCK_M
        diag_end = tl.minimum(
            tl.cdiv(tl.maximum(start_n + BLOCK_N - causal_shift, 0), BLOCK_M) * BLOCK_M, q_end
        )
    else:
        lo = start_n * 0
        diag_end = start_n * 0
    # A partial key block needs the length mask for every query block; a block wholly past the
    # example's length gets zero gradients without any work.
    diag_end = tl.where(start_n + BLOCK_N > kv_len, q_end, diag_end)
    lo = tl.where(start_n >= kv_len, q_end, lo)

    for g in range(G):  # the query heads sharing this kv head
        h = hk * G + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + (b * H + h).to(tl.int64) * Tq
        delta_base = Delta + (b * H + h).to(tl.int64) * Tq
        dk, dv = _bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qm,
            stride_qd,
            stride_dom,
            stride_dod,
            cols,
            offs_d,
            lo,
            diag_end,
            Tq,
            kv_len,
            causal_shift,
            qk_scale,
            BLOCK_M,
            True,
            CAUSAL,
            DOT_DTYPE,
            INPUT_PRECISION,
            HEAD_DIM,
            BLOCK_D,
        )
        dk, dv = _bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qm,
            stride_qd,
            stride_dom,
            stride_dod,
            cols,
            offs_d,
            tl.maximum(lo, diag_end),
            q_end,
            Tq,
            kv_len,
            causal_shift,
            qk_scale,
            BLOCK_M,
            False,
            CAUSAL,
            DOT_DTYPE,
            INPUT_PRECISION,
            HEAD_DIM,
            BLOCK_D,
        )

    dk = dk * sm_scale
    dk_base = DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
    _store_rows(dk_base, cols, col_ok, stride_dkn, stride_dkd, dk, HEAD_DIM, BLOCK_D)
    _store_rows(dv_base, cols, col_ok, stride_dvn, stride_dvd, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    rows,
    offs_d,
    lo,
    hi,
    kv_len,
    causal_shift,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = k_base + (lo + offs_n)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + (lo + offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        key_ok = cols < kv_len
        k = _load_tile(k_ptrs, key_ok, offs_d, MASK, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
        v = _load_tile(v_ptrs, key_ok, offs_d, MASK, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            keep = cols[None, :] < kv_len
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + causal_shift)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=INPUT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@_autotune("dq", _DQ_CANDIDATES)
@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    Delta,
    KeyLengths,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    H,
    G,
    Tq,
    Tk,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // G
    kv_len = tl.load(KeyLengths + b).to(tl.int32) if HAS_KEY_LENGTHS else Tk
    causal_shift = Tk - Tq
    qk_scale = sm_scale * LOG2E

    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Tq
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    q = _load_rows(q_base, rows, row_ok, stride_qm, stride_qd, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
    do = _load_rows(do_base, rows, row_ok, stride_dom, stride_dod, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
    lse = tl.load(LSE + (b * H + h).to(tl.int64) * Tq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + (b * H + h).to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_hi, hi = _key_range(start_m, kv_len, causal_shift, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        rows,
        offs_d,
        0,
        full_hi,
        kv_len,
        causal_shift,
        qk_scale,
        BLOCK_N,
        False,
        CAUSAL,
        DOT_DTYPE,
        INPUT_PRECISION,
        HEAD_DIM,
        BLOCK_D,
    )
    dq = _bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        rows,
        offs_d,
        full_hi,
        hi,
        kv_len,
        causal_shift,
        qk_scale,
        BLOCK_N,
        True,
        CAUSAL,
        DOT_DTYPE,
        INPUT_PRECISION,
        HEAD_DIM,
        BLOCK_D,
    )

    dq = dq * sm_scale
    dq_base = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    _store_rows(dq_base, rows, row_ok, stride_dqm, stride_dqd, dq, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------- host side


def check_attention_args(q, k, v, *, causal, softmax_scale, key_lengths) -> float:
    """Validate flash_attention's arguments without reading tensor values (no device sync, so
    that torch.compile traces it); return the softmax scale to use. key_lengths' values are
    checked by check_key_lengths_range where they are used."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same("dtype", q=q, k=k, v=v)
    check_same("device", q=q, k=k, v=v)
    B, H, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k must have batch size {B} like q, got shape {tuple(k.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have head dim {D} like q, got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(
            f"v must have the shape of k {tuple(k.shape)} (batch, kv heads, keys, head dim), "
            f"got {tuple(v.shape)}"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k and v must have a number of heads that divides q's ({H}), got {Hkv}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q must have a head dim from 1 to {MAX_HEAD_DIM}, got {D}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if (t.shape[2] - 1) * t.stride(2) + (D - 1) * t.stride(3) > MAX_ROW_OFFSET:
            raise ValueError(
                f"{name} is too long: sequence positions times stride must stay below 2**31"
            )
    check_bool("causal", causal)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    elif not is_real(softmax_scale):
        got = type(softmax_scale).__name__
        raise TypeError(f"softmax_scale must be a float or None, got {got}")
    elif not (0.0 < softmax_scale < math.inf):
        raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale}")
    if key_lengths is not None:
        check_tensor("key_lengths", key_lengths, ndim=1, dtypes=KEY_LENGTH_DTYPES)
        if key_lengths.shape[0] != B:
            raise ValueError(
                f"key_lengths must have shape ({B},) (one length per example), "
                f"got {tuple(key_lengths.shape)}"
            )
        if key_lengths.device != q.device:
            raise ValueError(
                f"key_lengths must be on q's device {q.device}, got {key_lengths.device}"
            )
    return float(softmax_scale)


def padded_head_dim(head_dim: int) -> int:
    """The kernels' tile width along the head dim: the next power of two, at least 16 (tl.dot's
    smallest inner dimension). The padding columns are loaded as 0, which leaves every q·k and
    p·v exact, and are never stored; the launch configurations are chosen by this width."""
    return max(16, triton.next_power_of_2(head_dim))


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _bhsd_empty(like: torch.Tensor, B: int, H: int, T: int, D: int) -> torch.Tensor:
    """An uninitialised [B, H, T, D] tensor laid out as [B, T, H, D] in memory (like SDPA's
    flash backend): the usual `.transpose(1, 2).reshape(B, T, H * D)` after it is a view."""
    return like.new_empty(B, T, H, D).transpose(1, 2)


def _dot_settings(dtype: torch.dtype):
    """(DOT_DTYPE, INPUT_PRECISION) constexprs for inputs of `dtype`."""
    if dtype == torch.float32:
        if interpreting():
            return tl.float32, "ieee"
        return tl.float32, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32, "ieee"  # the interpreter's bf16 tl.dot is wrong
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), "tf32"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def attention_grid(seq_len: int, block: int, heads: int, batch: int) -> tuple[int, int, int]:
    """Every kernel's grid: (blocks of `block` rows of the sequence, heads, examples). The
    blocks fit axis x at any size memory holds; more than 65,535 heads or examples in one call
    is refused with a ValueError, since the kernels read the head and example from axes y, z."""
    return checked_grid(triton.cdiv(seq_len, block), heads, batch)


def _seq_bucket(Tq: int, Tk: int) -> int:
    return triton.next_power_of_2(max(Tq, Tk, 128))


# ---------------------------------------------------------------- torch.library ops, autograd
# The two launchers are custom operators (torch.library.custom_op), so that torch.compile keeps a
# model that calls flash_attention in one graph: Dynamo and AOTAutograd see each launcher as one
# opaque node, shaped by its fake (meta) function, with the backward op wired in through
# register_autograd. They are not torch.library.triton_op + wrap_triton, which would let Inductor
# trace into the kernels: under TRITON_INTERPRET=1 (how CI tests the kernels) wrap_triton does
# not recognise the interpreter's kernels and launches them on fake tensors while tracing (torch
# 2.13, triton 3.9), and attention has no neighbouring elementwise work worth fusing into it.


def check_key_lengths_range(key_lengths: torch.Tensor | None, num_keys: int) -> None:
    """Raise ValueError unless every key length lies in [0, num_keys] (one device sync). The
    kernels read every key below an example's length, so the forward op runs this check on
    each call, compiled or not. While torch.compile traces (the reference path), the check is
    an asynchronous assertion in the graph instead, which raises RuntimeError."""
    if key_lengths is None or key_lengths.numel() == 0:
        return
    message = f"key_lengths must lie in [0, {num_keys}] (the number of keys)"
    if torch.compiler.is_compiling():
        torch._assert_async(((key_lengths >= 0) & (key_lengths <= num_keys)).all(), message)
        return
    lo, hi = torch.stack(torch.aminmax(key_lengths)).tolist()
    if lo < 0 or hi > num_keys:
        raise ValueError(f"{message}, got values in [{lo}, {hi}]")


@torch.library.custom_op("dp_attn::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    sm_scale: float,
    key_lengths: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel: (out [B, H, Tq, D] laid out as [B, Tq, H, D], lse fp32 [B, H, Tq]).

    lse is the base-2 log-sum-exp of each row's scaled scores (+inf for a row that sees no key),
    saved for the backward; it is not differentiable. Arguments must have passed
    check_attention_args; key_lengths' values are checked here."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    check_key_lengths_range(key_lengths, Tk)
    out = _bhsd_empty(q, B, H, Tq, D)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    # Empty batch (legal under Poisson sampling) or no key to see: an all-zero output.
    if q.numel() == 0 or Tk == 0:
        return out.zero_(), lse.fill_(math.inf)
    dot_dtype, precision = _dot_settings(q.dtype)
    has_lengths = key_lengths is not None

    def grid(meta):
        return attention_grid(Tq, meta["BLOCK_M"], H, B)

    with _device_guard(q):
        _attn_fwd[grid](
            q,
            k,
            v,
            out,
            lse,
            key_lengths if has_lengths else lse,
            sm_scale,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(out),
            H,
            H // Hkv,
            Tq,
            Tk,
            _seq_bucket(Tq, Tk),
            HEAD_DIM=D,
            BLOCK_D=padded_head_dim(D),
            CAUSAL=causal,
            HAS_KEY_LENGTHS=has_lengths,
            DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision,
        )
    return out, lse


@flash_attention_fwd.register_fake
def _flash_attention_fwd_fake(q, k, v, causal, sm_scale, key_lengths):
    B, H, Tq, D = q.shape
    return _bhsd_empty(q, B, H, Tq, D), q.new_empty(B, H, Tq, dtype=torch.float32)


@torch.library.custom_op("dp_attn::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float,
    key_lengths: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernels: (dq, dk, dv), each laid out as [B, T, heads, D] in memory, from the
    output gradient do and the forward's out and lse."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq = _bhsd_empty(q, B, H, Tq, D)
    dk = _bhsd_empty(k, B, Hkv, Tk, D)
    dv = _bhsd_empty(v, B, Hkv, Tk, D)
    if q.numel() == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    dot_dtype, precision = _dot_settings(q.dtype)
    has_lengths = key_lengths is not None
    lengths_arg = key_lengths if has_lengths else lse
    common = dict(
        HEAD_DIM=D,
        BLOCK_D=padded_head_dim(D),
        CAUSAL=causal,
        HAS_KEY_LENGTHS=has_lengths,
        DOT_DTYPE=dot_dtype,
        INPUT_PRECISION=precision,
    )
    preprocess_block = 8192 // padded_head_dim(D)  # 8k elements per program: no spills

    with _device_guard(q):
        _bwd_preprocess[attention_grid(Tq, preprocess_block, H, B)](
            out,
            do,
            delta,
            *_strides(out),
            *_strides(do),
            H,
            Tq,
            HEAD_DIM=D,
            BLOCK_D=padded_head_dim(D),
            BLOCK_M=preprocess_block,
        )
        _attn_bwd_dkdv[lambda meta: attention_grid(Tk, meta["BLOCK_N"], Hkv, B)](
            q,
            k,
            v,
            do,
            dk,
            dv,
            lse,
            delta,
            lengths_arg,
            sm_scale,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(do),
            *_strides(dk),
            *_strides(dv),
            H,
            H // Hkv,
            Tq,
            Tk,
            _seq_bucket(Tq, Tk),
            **common,
        )
        _attn_bwd_dq[lambda meta: attention_grid(Tq, meta["BLOCK_M"], H, B)](
            q,
            k,
            v,
            do,
            dq,
            lse,
            delta,
            lengths_arg,
            sm_scale,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(do),
            *_strides(dq),
            H,
            H // Hkv,
            Tq,
            Tk,
            _seq_bucket(Tq, Tk),
            **common,
        )
    return dq, dk, dv


@flash_attention_bwd.register_fake
def _flash_attention_bwd_fake(do, q, k, v, out, lse, causal, sm_scale, key_lengths):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    return _bhsd_empty(q, B, H, Tq, D), _bhsd_empty(k, B, Hkv, Tk, D), _bhsd_empty(v, B, Hkv, Tk, D)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, key_lengths = inputs
    out, lse = output
    ctx.causal, ctx.sm_scale = causal, sm_scale
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_lengths)


def _backward(ctx, do, _lse_grad):
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(do, q, k, v, out, lse, ctx.causal, ctx.sm_scale, key_lengths)
    return dq, dk, dv, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention_triton(q, k, v, causal: bool, softmax_scale: float, key_lengths):
    """The kernel path of dp_attn.functional.flash_attention (arguments already checked by
    check_attention_args)."""
    return flash_attention_fwd(q, k, v, causal, softmax_scale, key_lengths)[0]


# The plain-PyTorch twin: the test oracle's first rung and the CPU path when Triton is not
# interpreting.


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
