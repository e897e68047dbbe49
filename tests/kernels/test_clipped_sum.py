"""Clipped sums with Gaussian noise (flat and block clipping) and add_gaussian_noise_: kernels
vs their twin, the twin vs torch.func per-example gradients of a real nn.Linear, privacy
properties (hypothesis), noise statistics, and input checks."""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dp_attn import functional as F
from dp_attn.kernels import clipped_sum, per_example_norms, reference

from .dp_oracle import clip_factors_for, linear_grads, sq_norms

# Every statistical check below fails by chance with probability ~1e-5 (two-sided z = 4.42
# for a normal statistic), so the ~20 checks of this file give a false-alarm rate < 1e-3.
Z = 4.42


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
    twin = reference.clipped_grad_sum(a, g, c, scale=0.25)
    assert_pairs_close(got, twin, rtol=1e-5, atol=1e-5)
    no_bias = F.clipped_grad_sum(a, g, c, scale=0.25, bias=False)
    assert no_bias[1] is None
    torch.testing.assert_close(no_bias[0], got[0])


def test_clipped_sum_2d_inputs_and_noise_match_twin():
    a, g = inputs(5, 1, 33, 20)
    c = torch.rand(5)
    args = dict(noise_std=0.7, scale=0.5, seed=1234)
    got = clipped_sum.clipped_grad_sum(a[:, 0], g[:, 0], c, **args)
    assert_pairs_close(got, reference.clipped_grad_sum(a[:, 0], g[:, 0], c, **args),
                       rtol=1e-5, atol=1e-5)
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
    for fn in (F.clipped_grad_sum, reference.clipped_grad_sum):
        got = fn(a, g, c)
        assert all(torch.isfinite(x).all() for x in got)
        assert_pairs_close(got, F.clipped_grad_sum(a[keep], g[keep], c[keep]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [F.clipped_grad_sum, reference.clipped_grad_sum])
def test_empty_batch_is_pure_noise_or_zero(fn):
    a, g = inputs(0, 5, 20, 30)
    c = torch.zeros(0)
    weight, bias = fn(a, g, c)
    assert weight.shape == (30, 20) and bias.shape == (30,)
    assert not weight.any() and not bias.any()
    weight, bias = fn(a, g, c, noise_std=2.0, scale=0.5, seed=9)
    torch.testing.assert_close(weight, reference.released_noise(9, 30, 20), rtol=1e-5, atol=1e-5)
    # The bias's Philox counters follow the weight's 30·⌈20/2⌉.
    bias_noise = reference.released_noise(9, 1, 30, base=300)[0]
    torch.testing.assert_close(bias, bias_noise, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- block clipping: exactness


def block_oracle(a, g, threshold, bias):
    """Per-example gradients from torch.func, clipped tile by tile (bias slices with the first
    column's tiles), summed: float64 [dout, din], [dout]."""
    weight, bias_grad = linear_grads(a, g, bias)
    rows, cols = reference.BLOCK_CLIP_TILE
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
    twin = reference.block_clipped_grad_sum(a, g, threshold, scale=0.5, bias=bias)
    assert_pairs_close(got, twin, rtol=1e-5, atol=1e-5)


def test_block_clipped_noise_and_splits_match_twin(monkeypatch):
    """With the examples split between several programs per tile (as on a GPU with few tiles),
    fp32 partial sums go through the noise kernel: same result, same noise as the twin."""
    a, g = inputs(5, 3, 140, 20)
    args = dict(noise_std=0.3, scale=2.0, seed=77)
    want = reference.block_clipped_grad_sum(a, g, 1.0, **args)
    assert_pairs_close(clipped_sum.block_clipped_grad_sum(a, g, 1.0, **args), want,
                       rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(clipped_sum, "block_clip_splits", lambda tiles, batch, device: 3)
    assert_pairs_close(clipped_sum.block_clipped_grad_sum(a, g, 1.0, **args), want,
                       rtol=1e-5, atol=1e-5)


def test_block_clip_groups():
    assert reference.BLOCK_CLIP_TILE == (128, 128)
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
    rows, cols = reference.BLOCK_CLIP_TILE
    for o in range(0, dout, rows):
        for k in range(0, din, cols):
            sq = weight[o : o + rows, k : k + cols].double().square().sum()
            if k == 0:
                sq = sq + bias[o : o + rows].double().square().sum()
            assert math.sqrt(float(sq)) <= threshold * (1 + 1e-4)


# ---------------------------------------------------------------- noise


def pure_noise(seed, std=1.0, scale=1.0, dout=250, din=400):
    """The released gradient of a batch whose gradients are all zero: noise only (1e5 draws)."""
    a, g = torch.zeros(2, 3, din), torch.zeros(2, 3, dout)
    weight, bias = F.clipped_grad_sum(a, g, torch.ones(2), noise_std=std, scale=scale, seed=seed)
    return weight.double(), bias.double()


def correlation(x, y):
    return float(np.corrcoef(x.flatten().numpy(), y.flatten().numpy())[0, 1])


def test_noise_is_standard_normal_with_the_requested_std():
    """Mean within Z·σ/√n of 0, sample std within Z·σ/√(2n) of σ (n = 1e5), and a
    Kolmogorov-Smirnov test at level 1e-5."""
    std, scale = 1.5, 0.5
    weight, bias = pure_noise(seed=None, std=std, scale=scale)
    sigma, n = std * scale, weight.numel()
    assert abs(float(weight.mean())) <= Z * sigma / math.sqrt(n)
    assert abs(float(weight.std()) - sigma) <= Z * sigma / math.sqrt(2 * n)
    assert stats.kstest(weight.flatten().numpy() / sigma, "norm").pvalue > 1e-5
    assert abs(float(bias.mean())) <= Z * sigma / math.sqrt(bias.numel())


def test_noise_coordinates_are_uncorrelated():
    """Neighbouring coordinates (within a row, across rows, weight vs bias) have sample
    correlation within Z/√n of 0."""
    weight, bias = pure_noise(seed=None)
    bound = Z / math.sqrt(weight[:, 1:].numel())
    assert abs(correlation(weight[:, 1:], weight[:, :-1])) <= bound
    assert abs(correlation(weight[1:], weight[:-1])) <= bound
    assert abs(correlation(weight[:, 0], bias)) <= Z / math.sqrt(bias.numel())


def test_calls_without_seed_draw_fresh_independent_noise():
    first, second = pure_noise(seed=None)[0], pure_noise(seed=None)[0]
    assert not torch.equal(first, second)
    assert abs(correlation(first, second)) <= Z / math.sqrt(first.numel())


def test_fixed_test_seed_reproduces_noise():
    first, second = pure_noise(seed=2024), pure_noise(seed=2024)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], pure_noise(seed=2025)[0])


def test_noise_does_not_depend_on_data():
    """Same key: the noised sum minus the exact sum is the same noise for any data."""
    a, g = inputs(3, 4, 30, 20)
    c = torch.rand(3)
    exact = F.clipped_grad_sum(a, g, c)
    noised = F.clipped_grad_sum(a, g, c, noise_std=1.0, seed=5)
    noise = pure_noise(seed=5, dout=20, din=30)
    for x, y, z in zip(noised, exact, noise, strict=True):
        torch.testing.assert_close((x - y).double(), z, rtol=1e-5, atol=1e-5)


@triton.jit
def _randint4x_kernel(out_ptr, key, base, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w1, w2, w3, w4 = tl.randint4x(key, base + offs.to(tl.int64))
    for lane, w in enumerate((w1, w2, w3, w4)):
        tl.store(out_ptr + lane * N + offs, w.to(tl.int32, bitcast=True), mask=offs < N)


@pytest.mark.parametrize("key", [3, 2**40 + 17, 2**63 - 1])
def test_philox_twin_reproduces_tl_randint4x(key):
    """The twin's Philox-4x32-10 words equal tl.randint4x's, also at counters >= 2^32."""
    base, n = 2**33 - 500, 1000
    out = torch.empty(4, n, dtype=torch.int32)
    _randint4x_kernel[(1,)](out, key, base, n, BLOCK=1024)
    want = reference.philox4x32(key, base + torch.arange(n, dtype=torch.int64))
    assert torch.equal(out.long() & 0xFFFFFFFF, torch.stack(want))


@pytest.mark.parametrize("fn", [F.add_gaussian_noise_, reference.add_gaussian_noise_])
def test_add_gaussian_noise_in_place(fn):
    x = torch.full((30, 40), 2.0)
    view = x.t()  # not contiguous: the noise rule sees the view's [40, 30] rows all the same
    out = fn(view, 0.5, seed=11)
    assert out is view
    noise = reference.released_noise(11, 40, 30)
    torch.testing.assert_close(view, 2.0 + 0.5 * noise, rtol=1e-5, atol=1e-5)
    y = torch.zeros(100_000, dtype=torch.bfloat16)
    fn(y, 1.0)
    assert abs(float(y.double().mean())) <= Z / math.sqrt(y.numel())
    assert abs(float(y.double().std()) - 1.0) <= Z / math.sqrt(2 * y.numel()) + 4e-3
    z = torch.ones(3)
    assert torch.equal(fn(z, 0.0), torch.ones(3))


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
        (lambda: F.clipped_grad_sum(a, g, c, noise_std=-1.0), ValueError, "noise_std"),
        (lambda: F.clipped_grad_sum(a, g, c, noise_std=float("nan")), ValueError, "noise_std"),
        (lambda: F.clipped_grad_sum(a, g, c, noise_std=torch.tensor(1.0)), TypeError, "noise_std"),
        (lambda: F.clipped_grad_sum(a, g, c, scale=float("inf")), ValueError, "scale"),
        (lambda: F.clipped_grad_sum(a, g, c, seed=-3), ValueError, "seed"),
        (lambda: F.clipped_grad_sum(a, g, c, out_dtype=torch.int8), TypeError, "out_dtype"),
        (lambda: F.block_clipped_grad_sum(a, g, -1.0), ValueError, "threshold"),
        (lambda: F.block_clipped_grad_sum(a, g, float("nan")), ValueError, "threshold"),
        (lambda: F.block_clipped_grad_sum(a, g, 1.0, noise_std=-0.1), ValueError, "noise_std"),
        (lambda: F.per_example_grad_sq_norms(a, g, method="exact"), ValueError, "method"),
        (lambda: F.per_example_grad_sq_norms(a[None], g[None]), ValueError, "a must have"),
        (lambda: F.add_gaussian_noise_(a, -1.0), ValueError, "std"),
        (lambda: F.add_gaussian_noise_(a.long(), 1.0), TypeError, "x must"),
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
    args = dict(noise_std=0.1, scale=1 / 64, seed=3, out_dtype=torch.float32)
    for fn, clip in (("clipped_grad_sum", c), ("block_clipped_grad_sum", 5.0)):
        got = getattr(F, fn)(a, g, clip, **args)
        want = getattr(reference, fn)(a, g, clip, **args)
        # The twin scales rows in fp32; the kernel rounds the scaled rows back to bf16.
        assert_pairs_close(got, want, rtol=2e-2, atol=2e-2)
    weight, _ = F.clipped_grad_sum(a, g, c, scale=1 / 64)
    assert weight.dtype == torch.bfloat16
