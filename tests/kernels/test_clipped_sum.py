"""Clipped sums of linear layers (flat and block clipping): kernels vs their twins, the twins
vs torch.func per-example gradients of a real nn.Linear, privacy properties (hypothesis), and
input checks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_attn import functional as F
from dp_attn.kernels import clipped_sum, per_example_norms
from dp_attn.kernels.clipped_sum import (
    BLOCK_CLIP_TILE,
    block_clipped_grad_sum_reference,
    clipped_grad_sum_reference,
)

from .dp_oracle import clip_factors_for, linear_grads, sq_norms


def inputs(batch, seq, din, dout, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, seq, din, generator=gen).to(dtype)
    g = torch.randn(batch, seq, dout, generator=gen).to(dtype)
    return a, g


def assert_pairs_close(got, want, **tol):
    for x, y in zip(got, want, strict=True):
        if y is None:
            assert x is None
        else:
            torch.testing.assert_close(x, y, **tol)


# ---------------------------------------------------------------- flat clipping: exactness


@pytest.mark.parametrize(
    ("batch", "seq", "din", "dout"), [(1, 1, 5, 3), (3, 7, 9, 5), (2, 50, 70, 140), (3, 1, 17, 33)]
)
def test_clipped_sum_matches_oracle(batch, seq, din, dout):
    a, g = inputs(batch, seq, din, dout)
    weight, bias = linear_grads(a, g, True)
    c = clip_factors_for(sq_norms(weight, bias), threshold=3.0)
    want_w = (c.double()[:, None, None] * weight).sum(0) * 0.25
    want_b = (c.double()[:, None] * bias).sum(0) * 0.25
    got = F.clipped_grad_sum(a, g, c, scale=0.25)
    assert got[0].dtype == torch.float32 and got[0].shape == (dout, din)
    assert_pairs_close(got, (want_w.float(), want_b.float()), rtol=1e-5, atol=1e-5)
    twin = clipped_grad_sum_reference(a, g, c, scale=0.25)
    assert_pairs_close(got, twin, rtol=1e-5, atol=1e-5)
    no_bias = F.clipped_grad_sum(a, g, c, scale=0.25, bias=False)
    assert no_bias[1] is None
    torch.testing.assert_close(no_bias[0], got[0])


def test_clipped_sum_2d_inputs_match_twin():
    a, g = inputs(5, 1, 33, 20)
    c = torch.rand(5)
    args = dict(scale=0.5)
    got = clipped_sum.clipped_grad_sum(a[:, 0], g[:, 0], c, **args)
    assert_pairs_close(
        got, clipped_grad_sum_reference(a[:, 0], g[:, 0], c, **args), rtol=1e-5, atol=1e-5
    )
    assert_pairs_close(got, F.clipped_grad_sum(a, g, c, **args), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clipped_sum_half_precision(dtype):
    """Output in the parameter's dtype by default (fp32 with out_dtype), fp32 accumulation."""
    a, g = inputs(3, 20, 24, 40, dtype=dtype)
    c = torch.tensor([1.0, 0.5, 0.25])
    weight, _ = linear_grads(a, g, True)
    want = (c.double()[:, None, None] * weight).sum(0)
    got_w, got_b = F.clipped_grad_sum(a, g, c)
    assert got_w.dtype == dtype and got_b.dtype == dtype
    fp32_w, _ = F.clipped_grad_sum(a, g, c, out_dtype=torch.float32)
    assert fp32_w.dtype == torch.float32
    # The clip factors scale g in fp32, then go back to the input dtype before tl.dot.
    torch.testing.assert_close(fp32_w.double(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_w, fp32_w.to(dtype))


def test_dropped_example_adds_exactly_zero_even_if_not_finite():
    """c_i = 0 (e.g. an example whose norm was NaN) must remove it, not give 0·NaN = NaN."""
    a, g = inputs(3, 4, 6, 5)
    g[1, 2, 0] = float("nan")
    a[1, 0, 1] = float("inf")
    c = torch.tensor([0.5, 0.0, 1.0])
    keep = [0, 2]
    for fn in (F.clipped_grad_sum, clipped_grad_sum_reference):
        got = fn(a, g, c)
        assert all(torch.isfinite(x).all() for x in got)
        assert_pairs_close(got, F.clipped_grad_sum(a[keep], g[keep], c[keep]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [F.clipped_grad_sum, clipped_grad_sum_reference])
def test_empty_batch_is_zero(fn):
    a, g = inputs(0, 5, 20, 30)
    c = torch.zeros(0)
    weight, bias = fn(a, g, c, scale=0.5)
    assert weight.shape == (30, 20) and bias.shape == (30,)
    assert not weight.any() and not bias.any()


# ---------------------------------------------------------------- block clipping: exactness


def block_oracle(a, g, threshold, bias):
    """Per-example gradients from torch.func, clipped tile by tile (bias slices with the first
    column's tiles), summed: float64 [dout, din], [dout]."""
    weight, bias_grad = linear_grads(a, g, bias)
    rows, cols = BLOCK_CLIP_TILE
    dout, din = weight.shape[1:]
    out_w = torch.zeros(dout, din, dtype=torch.float64)
    out_b = torch.zeros(dout, dtype=torch.float64)
    for o in range(0, dout, rows):
        for k in range(0, din, cols):
            tile = weight[:, o : o + rows, k : k + cols]
            parts = [tile] + ([bias_grad[:, o : o + rows]] if bias and k == 0 else [])
            factor = torch.clamp(threshold / (sq_norms(*parts).sqrt() + 1e-6), max=1.0)
            out_w[o : o + rows, k : k + cols] = (factor[:, None, None] * tile).sum(0)
            if bias and k == 0:
                out_b[o : o + rows] = (factor[:, None] * bias_grad[:, o : o + rows]).sum(0)
    return out_w, (out_b if bias else None)


@pytest.mark.parametrize(
    ("batch", "seq", "din", "dout", "bias"),
    [(1, 1, 5, 3, True), (3, 7, 140, 9, True), (2, 70, 20, 150, False), (2, 2, 260, 130, True)],
)
def test_block_clipped_matches_oracle(batch, seq, din, dout, bias):
    a, g = inputs(batch, seq, din, dout)
    threshold = 2.0
    want = block_oracle(a, g, threshold, bias)
    got = F.block_clipped_grad_sum(a, g, threshold, scale=0.5, bias=bias)
    want = tuple(None if x is None else (0.5 * x).float() for x in want)
    assert_pairs_close(got, want, rtol=1e-5, atol=1e-5)
    twin = block_clipped_grad_sum_reference(a, g, threshold, scale=0.5, bias=bias)
    assert_pairs_close(got, twin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_block_clipped_splits_match_twin(monkeypatch, bias):
    """With the examples split between several programs per tile (as on a GPU with few tiles),
    the fp32 partial sums are added, scaled and cast: the twin's result."""
    a, g = inputs(5, 3, 140, 20)
    args = dict(scale=2.0, bias=bias, out_dtype=torch.float16)
    want = block_clipped_grad_sum_reference(a, g, 1.0, **args)
    assert_pairs_close(
        clipped_sum.block_clipped_grad_sum(a, g, 1.0, **args), want, rtol=2e-3, atol=1e-3
    )
    monkeypatch.setattr(clipped_sum, "block_clip_splits", lambda tiles, batch, device: 3)
    got = clipped_sum.block_clipped_grad_sum(a, g, 1.0, **args)
    assert got[0].dtype == torch.float16
    assert_pairs_close(got, want, rtol=2e-3, atol=1e-3)


def test_block_clip_groups():
    assert BLOCK_CLIP_TILE == F.BLOCK_CLIP_TILE == (128, 128)
    assert F.block_clip_num_groups(768, 3072) == 6 * 24
    assert F.block_clip_num_groups(129, 128) == 2
    assert F.block_clip_num_groups(1, 1) == 1


def test_block_clipped_empty_batch_and_non_finite():
    a, g = inputs(0, 4, 10, 12)
    weight, bias = F.block_clipped_grad_sum(a, g, 1.0)
    assert weight.shape == (12, 10) and not weight.any() and not bias.any()
    a, g = inputs(2, 4, 10, 12)
    g[0, 1, 1] = float("nan")
    got = F.block_clipped_grad_sum(a, g, 1.0)
    assert_pairs_close(got, F.block_clipped_grad_sum(a[1:], g[1:], 1.0), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- privacy properties


finite_scale = st.floats(min_value=1e-4, max_value=1e4)


@settings(max_examples=12, deadline=None)
@given(
    seq=st.integers(1, 9),
    din=st.integers(1, 40),
    dout=st.integers(1, 40),
    magnitude=finite_scale,
    threshold=st.floats(min_value=1e-3, max_value=10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_flat_clipped_contribution_is_bounded(seq, din, dout, magnitude, threshold, seed):
    """One example at a time through the kernels: norm → clip factor → clipped sum has norm
    ≤ threshold (weight and bias together)."""
    a, g = inputs(1, seq, din, dout, seed=seed)
    a = a * magnitude
    norm = per_example_norms.per_example_grad_sq_norms(a, g).sqrt()
    c = torch.clamp(threshold / (norm + 1e-6), max=1.0)
    weight, bias = clipped_sum.clipped_grad_sum(a, g, c)
    total = math.sqrt(float(weight.double().square().sum() + bias.double().square().sum()))
    assert total <= threshold * (1 + 1e-4)


@settings(max_examples=8, deadline=None)
@given(
    seq=st.integers(1, 5),
    din=st.integers(1, 160),
    dout=st.integers(1, 140),
    magnitude=finite_scale,
    threshold=st.floats(min_value=1e-3, max_value=10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_block_clipped_tile_is_bounded(seq, din, dout, magnitude, threshold, seed):
    """One example through the block kernel: every group (tile, plus the bias slice for the
    first column) has norm ≤ threshold, so the whole contribution is ≤ threshold·√K."""
    a, g = inputs(1, seq, din, dout, seed=seed)
    weight, bias = clipped_sum.block_clipped_grad_sum(a, g * magnitude, threshold)
    rows, cols = BLOCK_CLIP_TILE
    for o in range(0, dout, rows):
        for k in range(0, din, cols):
            sq = weight[o : o + rows, k : k + cols].double().square().sum()
            if k == 0:
                sq = sq + bias[o : o + rows].double().square().sum()
            assert math.sqrt(float(sq)) <= threshold * (1 + 1e-4)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    a, g = inputs(2, 3, 4, 5)
    c = torch.ones(2)
    cases = [
        (lambda: F.clipped_grad_sum(a, g[:1], c), ValueError, "a and g"),
        (lambda: F.clipped_grad_sum(a, g[:, :2], c), ValueError, "a and g"),
        (lambda: F.clipped_grad_sum(a[:, 0], g, c), ValueError, "a and g"),
        (lambda: F.clipped_grad_sum(a, g.half(), c), TypeError, "dtype"),
        (lambda: F.clipped_grad_sum(a, g.to("meta"), c), ValueError, "device"),
        (lambda: F.clipped_grad_sum(a.long(), g, c), TypeError, "a must"),
        (lambda: F.clipped_grad_sum(a.numpy(), g, c), TypeError, "a must"),
        (lambda: F.clipped_grad_sum(a[..., :0], g, c), ValueError, "feature"),
        (lambda: F.clipped_grad_sum(a, g, torch.ones(3)), ValueError, "clip_factors"),
        (lambda: F.clipped_grad_sum(a, g, c.double()), TypeError, "clip_factors"),
        (lambda: F.clipped_grad_sum(a, g, c[None]), ValueError, "clip_factors"),
        (lambda: F.clipped_grad_sum(a, g, c.to("meta")), ValueError, "clip_factors"),
        (lambda: F.clipped_grad_sum(a, g, c, scale=float("inf")), ValueError, "scale"),
        (lambda: F.clipped_grad_sum(a, g, c, scale=torch.tensor(1.0)), TypeError, "scale"),
        (lambda: F.block_clipped_grad_sum(a, g, 1.0, scale=float("nan")), ValueError, "scale"),
        (lambda: F.clipped_grad_sum(a, g, c, out_dtype=torch.int8), TypeError, "out_dtype"),
        (lambda: F.block_clipped_grad_sum(a, g, -1.0), ValueError, "threshold"),
        (lambda: F.block_clipped_grad_sum(a, g, float("nan")), ValueError, "threshold"),
        (lambda: F.per_example_grad_sq_norms(a, g, method="exact"), ValueError, "method"),
        (lambda: F.per_example_grad_sq_norms(a[None], g[None]), ValueError, "a must have"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()


# ---------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize(("seq", "din", "dout"), [(512, 768, 3072), (128, 4096, 1000)])
def test_cuda_bf16_clipped_sums_match_twin(seq, din, dout):
    a, g = (x.cuda() for x in inputs(8, seq, din, dout, dtype=torch.bfloat16))
    c = torch.rand(8, device="cuda")
    args = dict(scale=1 / 64, out_dtype=torch.float32)
    for fn, twin, clip in (
        (F.clipped_grad_sum, clipped_grad_sum_reference, c),
        (F.block_clipped_grad_sum, block_clipped_grad_sum_reference, 5.0),
    ):
        got = fn(a, g, clip, **args)
        want = twin(a, g, clip, **args)
        # The twin scales rows in fp32; the kernel rounds the scaled rows back to bf16.
        assert_pairs_close(got, want, rtol=2e-2, atol=2e-2)
    weight, _ = F.clipped_grad_sum(a, g, c, scale=1 / 64)
    assert weight.dtype == torch.bfloat16
