"""The noise sampler's tails are not truncated (issue 11, item 4): Box-Muller's radius comes from
a 64-bit uniform that is never 0, so the radius follows the Rayleigh tail exp(-t²/2) out to
t = 9.42 (where that tail is 2^-64) instead of stopping at tl.randn's 5.68; the released noise
is N(0, σ²), its frequency beyond 4σ is the Gaussian's, and secure_mode draws the same normals
and only rounds them to its grid.

The extreme words are fed to the sampler directly (kernel helper and twin): no sample size can
show a 1e-18 tail. False alarms: a Kolmogorov-Smirnov test and two Poisson counts at p < 1e-6,
and three z-tests at 5 sigma (~6e-7 each): < 5e-6 for the file."""

import math

import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

from dp_attn.kernels import noise

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

SIGMAS = 5.0
P_ALARM = 1e-6
TAIL_END = math.sqrt(128 * math.log(2))  # 9.42: exp(-t²/2) = 2^-64, the uniform's grid step
RADIUS_MAX = math.sqrt(130 * math.log(2))  # 9.49: the radius of the smallest uniform, 2^-65


@triton.jit
def _box_muller_kernel(words_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    w1 = tl.load(words_ptr + offs, mask=mask, other=0).to(tl.uint32)
    w2 = tl.load(words_ptr + N + offs, mask=mask, other=0).to(tl.uint32)
    w3 = tl.load(words_ptr + 2 * N + offs, mask=mask, other=0).to(tl.uint32)
    z1, z2 = noise.box_muller(w1, w2, w3)
    tl.store(out_ptr + offs, z1, mask=mask)
    tl.store(out_ptr + N + offs, z2, mask=mask)


def kernel_box_muller(words: torch.Tensor) -> torch.Tensor:
    """[2, N] normals of the kernels' box_muller for Philox words [3, N] (uint32 in int64)."""
    out = torch.empty(2, words.shape[1], dtype=torch.float32)
    _box_muller_kernel[(1,)](
        words.contiguous(), out, words.shape[1], BLOCK=triton.next_power_of_2(words.shape[1])
    )
    return out


def twin_box_muller(words: torch.Tensor) -> torch.Tensor:
    return torch.stack(noise.box_muller_reference(*words))


def radius_words(m: torch.Tensor) -> torch.Tensor:
    """The words (w1, w2, w3 = 0) of the 64-bit uniform index m = w1·2^32 + w2: angle
    π/2^32, so z1 is the radius itself (its cosine is 1 in float32)."""
    return torch.stack([m >> 32, m & 0xFFFFFFFF, torch.zeros_like(m)])


def test_smallest_uniform_gives_a_finite_radius_past_nine_sigma():
    """The words of the smallest uniform, (w1, w2) = (0, 0), give radius 9.49 in the kernel and
    the twin, finite, on either sign of either lane (angles 0, π/2, π, 3π/2); the largest words
    give a radius > 0 (u is capped below 1), never an exact zero noise."""
    w3 = torch.tensor([0, 2**30, 2**31, 3 * 2**30])
    smallest = torch.stack([torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), w3])
    largest = torch.full((3, 1), 2**32 - 1)
    for sampler in (kernel_box_muller, twin_box_muller):
        z = sampler(smallest).double()
        assert torch.isfinite(z).all()
        want = RADIUS_MAX * torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
        torch.testing.assert_close(z, want.double(), rtol=0, atol=1e-5)
        assert (z.abs().amax(0) >= 9.0).all()
        radius = sampler(largest).double().norm()
        assert 3e-4 < radius < 4e-4  # sqrt(-2 ln(1 - 2^-24)) = 3.45e-4
    torch.testing.assert_close(
        kernel_box_muller(smallest), twin_box_muller(smallest), rtol=1e-6, atol=1e-6
    )


def test_radius_tail_is_the_rayleigh_tail_out_to_9_42():
    """P(radius > t) of the sampler, counted exactly over the 2^64 uniforms (the radius is
    monotone in m = w1·2^32 + w2 for m < 2^56, so a bisection finds how many exceed t), equals
    the Rayleigh tail exp(-t²/2) within one grid step of 2^-64 and 1e-4 relative (float32
    rounding of the radius) for every t from 4 to 9.42: the tail is not truncated before 9.42,
    where the old sampler stopped at 5.68. The kernel's radii at the bisection's end points equal
    the twin's."""
    ts = torch.tensor([4.0, 5.0, 5.68, 6.0, 7.0, 8.0, 9.0, 9.3, TAIL_END - 1e-4]).double()
    lo = torch.zeros_like(ts, dtype=torch.long)  # radius(lo) > t
    hi = torch.full_like(lo, 2**56)  # radius(hi) <= t
    assert (twin_box_muller(radius_words(hi))[0].double() <= ts).all()
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        above = twin_box_muller(radius_words(mid))[0].double() > ts
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    count = hi.double()  # uniforms m = 0 .. hi - 1 have radius > t
    want = torch.exp(-ts.square() / 2) * 2.0**64
    assert ((count - want).abs() <= 1 + 1e-4 * want).all(), (count, want)
    ends = radius_words(torch.cat([lo, hi]))
    torch.testing.assert_close(kernel_box_muller(ends), twin_box_muller(ends), rtol=1e-6, atol=0)


def test_released_noise_is_normal_with_the_stated_std():
    """The kernel's noise on 1e5 zeros is N(0, σ²): Kolmogorov-Smirnov p > 1e-6, mean and
    variance within 5 sigma of 0 and σ², and the two lanes of a counter (r cos θ, r sin θ, one
    radius) are independent: the mean of (z1² - 1)(z2² - 1) (variance 4 per pair) within 5
    sigma of 0."""
    n, std = 100_000, 1.7
    z = noise.add_gaussian_noise_(torch.zeros(n), std, seed=2**77 + 9).double() / std
    _, p_value = stats.kstest(z.numpy(), "norm")
    assert p_value > P_ALARM, p_value
    assert abs(z.mean().item()) < SIGMAS / math.sqrt(n)
    assert abs(z.square().mean().item() - 1) < SIGMAS * math.sqrt(2 / n)
    lanes = z.view(-1, 2).square() - 1
    assert abs((lanes[:, 0] * lanes[:, 1]).mean().item()) < SIGMAS * 2 / math.sqrt(n / 2)


def test_frequency_beyond_four_sigma_is_the_gaussians():
    """|z| > 4 among 2e6 draws of the twin (bit-identical Philox words and float32-equal
    normals to the kernels') is within the Poisson bounds of 2·Φ(-4)·n = 126.7 at a two-sided
    false alarm of 1e-6; so is |z| > 3 (5,399.6)."""
    n = 2_000_000
    z = noise.released_noise(2**101 + 5, 1, n, std=1.0)[0].double()
    for t in (3.0, 4.0):
        expected = 2 * stats.norm.sf(t) * n
        count = int((z.abs() > t).sum())
        low = stats.poisson.ppf(P_ALARM / 2, expected)
        high = stats.poisson.isf(P_ALARM / 2, expected)
        assert low <= count <= high, (t, count, expected)


def test_secure_mode_draws_the_same_normals_and_only_rounds():
    """secure_mode's release is the default release rounded to secure_noise_grid(σ), bit for
    bit (same counters, lanes and normals): kernel and twin."""
    x = torch.randn(7, 45, generator=torch.Generator().manual_seed(3))
    for add_noise in (noise.add_gaussian_noise_, noise.add_gaussian_noise_reference):
        plain = add_noise(x.clone(), 0.9, seed=2**99 + 1)
        secure = add_noise(x.clone(), 0.9, seed=2**99 + 1, secure_mode=True)
        assert torch.equal(secure, noise.snap_to_grid(plain, noise.secure_noise_grid(0.9)))
