"""Gaussian noise (add_gaussian_noise_, the engine's once-per-step noise): kernel vs its twin,
the twin's Philox vs tl.randint4x, noise statistics, keys, and input checks."""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

from dp_attn import functional as F
from dp_attn.kernels import noise
from dp_attn.kernels.noise import add_gaussian_noise_reference, philox4x32, released_noise

# Every statistical check below fails by chance with probability ~1e-5 (two-sided z = 4.42
# for a normal statistic), so the checks of this file give a false-alarm rate < 1e-3.
Z = 4.42


def pure_noise(seed, std=1.0, rows=250, width=400):
    """The noise add_gaussian_noise_ adds to zeros [rows, width] (1e5 draws), in float64."""
    return F.add_gaussian_noise_(torch.zeros(rows, width), std, seed=seed).double()


def correlation(x, y):
    return float(np.corrcoef(x.flatten().numpy(), y.flatten().numpy())[0, 1])


def test_noise_is_standard_normal_with_the_requested_std():
    """Mean within Z·σ/√n of 0, sample std within Z·σ/√(2n) of σ (n = 1e5), and a
    Kolmogorov-Smirnov test at level 1e-5."""
    sigma = 0.75
    z = pure_noise(seed=None, std=sigma)
    n = z.numel()
    assert abs(float(z.mean())) <= Z * sigma / math.sqrt(n)
    assert abs(float(z.std()) - sigma) <= Z * sigma / math.sqrt(2 * n)
    assert stats.kstest(z.flatten().numpy() / sigma, "norm").pvalue > 1e-5


def test_noise_coordinates_are_uncorrelated():
    """Neighbouring coordinates (within a row: the two lanes of a counter and across counters;
    across rows) have sample correlation within Z/√n of 0."""
    z = pure_noise(seed=None)
    bound = Z / math.sqrt(z[:, 1:].numel())
    assert abs(correlation(z[:, 1:], z[:, :-1])) <= bound
    assert abs(correlation(z[1:], z[:-1])) <= bound


def test_calls_without_seed_draw_fresh_independent_noise():
    first, second = pure_noise(seed=None), pure_noise(seed=None)
    assert not torch.equal(first, second)
    assert abs(correlation(first, second)) <= Z / math.sqrt(first.numel())


def test_fixed_test_seed_reproduces_noise():
    assert torch.equal(pure_noise(seed=2024), pure_noise(seed=2024))
    assert not torch.equal(pure_noise(seed=2024), pure_noise(seed=2025))


def test_noise_does_not_depend_on_data():
    """Same key: the noised tensor minus the data is the same noise for any data."""
    x = torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    noised = F.add_gaussian_noise_(x.clone(), 1.0, seed=5)
    torch.testing.assert_close(
        (noised - x).double(), pure_noise(seed=5, rows=20, width=30), rtol=1e-5, atol=1e-5
    )


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
    want = philox4x32(key, base + torch.arange(n, dtype=torch.int64))
    assert torch.equal(out.long() & 0xFFFFFFFF, torch.stack(want))


@pytest.mark.parametrize("fn", [F.add_gaussian_noise_, add_gaussian_noise_reference])
def test_add_gaussian_noise_in_place(fn):
    x = torch.full((30, 40), 2.0)
    view = x.t()  # not contiguous: the noise rule sees the view's [40, 30] rows all the same
    out = fn(view, 0.5, seed=11)
    assert out is view
    torch.testing.assert_close(view, 2.0 + 0.5 * released_noise(11, 40, 30), rtol=1e-5, atol=1e-5)
    y = torch.zeros(100_000, dtype=torch.bfloat16)
    fn(y, 1.0)
    assert abs(float(y.double().mean())) <= Z / math.sqrt(y.numel())
    assert abs(float(y.double().std()) - 1.0) <= Z / math.sqrt(2 * y.numel()) + 4e-3
    z = torch.ones(3)
    assert torch.equal(fn(z, 0.0), torch.ones(3))


@pytest.mark.parametrize("secure_mode", [False, True])
def test_kernel_draws_the_twins_noise(secure_mode):
    """Same key, same noise: the Philox words are bit-identical, the normals equal up to float32
    rounding of log, cos and sin (and bit for bit on secure_mode's grid, but at a tie)."""
    x = torch.randn(17, 45, generator=torch.Generator().manual_seed(1))
    kernel = noise.add_gaussian_noise_(x.clone(), 0.7, seed=2**100 + 3, secure_mode=secure_mode)
    twin = add_gaussian_noise_reference(x.clone(), 0.7, seed=2**100 + 3, secure_mode=secure_mode)
    torch.testing.assert_close(kernel, twin, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x = torch.ones(2, 3)
    cases = [
        (lambda: F.add_gaussian_noise_(x, -1.0), ValueError, "std"),
        (lambda: F.add_gaussian_noise_(x, float("nan")), ValueError, "std"),
        (lambda: F.add_gaussian_noise_(x.long(), 1.0), TypeError, "x must"),
        (lambda: F.add_gaussian_noise_(x, 1.0, seed=-3), ValueError, "seed"),
        (lambda: F.add_gaussian_noise_(x, 1.0, secure_mode="yes"), TypeError, "secure_mode"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()
