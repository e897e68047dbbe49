"""Hardening (issue 7): the 128-bit noise key reaches Philox whole (kernel and twin), noised
kernels equal their twins in both modes, secure_mode (the stated distribution, the grid, the
engine option), the engine never draws
noise from torch's global generator nor keeps the key, and failures: non-finite examples,
a crash after accounting, out of memory in the backward pass.

False alarms: the statistical checks are a chi-square test at p < 1e-6 and z-tests at 5 sigma
(two-sided, ~6e-7 each); the file's ~10 such checks give a false-alarm rate < 1e-5."""

import io
import json
import logging
import math
import pickle

import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

import dp_attn.functional as DF
from dp_attn.kernels import noise
from dp_attn.nn.pieces import LinearPiece
from tests.test_engine import flat_grads, linear_model, linear_step, private

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

SIGMAS = 5.0
P_ALARM = 1e-6

# Philox-4x32-10 known-answer vector of Random123 (kat_vectors): every counter word and both
# key words non-zero.
KAT_KEY = (0xA4093822, 0x299F31D0)
KAT_COUNTER = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
KAT_OUTPUT = (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def box_muller_fp64(words):
    """The two normals of four Philox words by the rule in kernels/noise.py, in float64 (an oracle
    independent of the code under test): radius from (w1·2^32 + w2 + 1/2)/2^64, angle from w3."""
    w1, w2, w3, _ = words
    radius = math.sqrt(-2.0 * math.log((w1 * 2**32 + w2 + 0.5) / 2**64))
    theta = 2.0 * math.pi * (w3 + 0.5) / 2**32
    return torch.tensor([radius * math.cos(theta), radius * math.sin(theta)], dtype=torch.float64)


@triton.jit(do_not_specialize=["key", "nonce_lo", "nonce_hi"])
def _philox_kernel(
    words_ptr, normals_ptr, counters_ptr, N, key, nonce_lo, nonce_hi, BLOCK: tl.constexpr
):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    counters = tl.load(counters_ptr + offs, mask=mask, other=0)
    w1, w2, w3, w4 = noise.philox_words(key, nonce_lo, nonce_hi, counters)
    tl.store(words_ptr + offs, w1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(words_ptr + N + offs, w2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(words_ptr + 2 * N + offs, w3.to(tl.int32, bitcast=True), mask=mask)
    tl.store(words_ptr + 3 * N + offs, w4.to(tl.int32, bitcast=True), mask=mask)
    z1, z2 = noise.gaussian2x(key, nonce_lo, nonce_hi, counters)
    tl.store(normals_ptr + offs, z1, mask=mask)
    tl.store(normals_ptr + N + offs, z2, mask=mask)


def kernel_philox(key: int, counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' Philox words [4, N] (as uint32 values in int64) and normals [2, N] for a
    128-bit key: philox_words and gaussian2x."""
    words = torch.empty(4, counters.numel(), dtype=torch.int32)
    normals = torch.empty(2, counters.numel(), dtype=torch.float32)
    _philox_kernel[(1,)](
        words,
        normals,
        counters,
        counters.numel(),
        *noise.noise_args(key, 1.0, False)[:3],
        BLOCK=triton.next_power_of_2(counters.numel()),
    )
    return words.long() & 0xFFFFFFFF, normals


# ---------------------------------------------------------------- the 128-bit key


def test_key_words_reach_philox_known_answer():
    """The known-answer vector through the 128-bit key layout: key = nonce·2^64 + Philox key,
    counter words (c0, c1) = the element counter, (c2, c3) = the nonce. Kernel and twin give the
    vector's output words exactly, and their normals, so all 128 bits and all four counter words
    are used."""
    c0, c1, c2, c3 = KAT_COUNTER
    key = (c3 << 96) | (c2 << 64) | (KAT_KEY[1] << 32) | KAT_KEY[0]
    counter = (c1 << 32) | c0  # >= 2^63: the int64 with its bit pattern
    counters = torch.tensor([counter - 2**64 if counter >= 2**63 else counter])
    kernel_words, kernel_normals = kernel_philox(key, counters)
    twin_words = torch.stack(noise.philox4x32(key, counters))
    assert twin_words.flatten().tolist() == list(KAT_OUTPUT)
    assert kernel_words.flatten().tolist() == list(KAT_OUTPUT)
    want = box_muller_fp64(KAT_OUTPUT)
    twin = torch.stack(noise.philox_normals(key, counters)).flatten().double()
    torch.testing.assert_close(twin, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel_normals.flatten().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("secure_mode", [False, True])
def test_every_key_bit_changes_the_noise(secure_mode):
    """Flipping one bit of the key, low or high half, gives unrelated noise (kernel and twin
    alike, and equal to each other): no key bit is dropped or truncated on the way."""
    key = 0x0123456789ABCDEF_FEDCBA9876543210
    draws = {}
    for bit in (None, 0, 63, 64, 95, 96, 127):
        seed = key if bit is None else key ^ (1 << bit)
        kernel = noise.add_gaussian_noise_(
            torch.zeros(3, 50), 1.0, seed=seed, secure_mode=secure_mode
        )
        twin = noise.add_gaussian_noise_reference(
            torch.zeros(3, 50), 1.0, seed=seed, secure_mode=secure_mode
        )
        tol = 0.0 if secure_mode else 1e-5
        torch.testing.assert_close(kernel, twin, rtol=tol, atol=tol)
        draws[bit] = kernel
    for bit in (0, 63, 64, 95, 96, 127):
        same = (draws[bit] == draws[None]).float().mean().item()
        assert same < 0.5, (bit, same)  # secure_mode's grid makes a few equal by chance


def test_large_counters_and_key_agree_between_kernel_and_twin():
    """Counters above 2^32 (the high counter word) and random 128-bit keys: the kernel's Philox
    words equal the twin's bit for bit, its normals the twin's up to float32 rounding."""
    gen = torch.Generator().manual_seed(5)
    counters = torch.randint(0, 2**62, (200,), generator=gen, dtype=torch.int64)
    for key in (3, 2**64 - 1, 2**64, 2**128 - 1, 0x5DEECE66_0000FFFF_12345678_9ABCDEF0):
        words, normals = kernel_philox(key, counters)
        assert torch.equal(words, torch.stack(noise.philox4x32(key, counters)))
        twin = torch.stack(noise.philox_normals(key, counters))
        torch.testing.assert_close(normals, twin, rtol=1e-5, atol=1e-5)


def test_seed_none_takes_128_fresh_bits(monkeypatch):
    asked = []

    def randbits(k):
        asked.append(k)
        return (1 << 127) | 12345

    monkeypatch.setattr(noise.secrets, "randbits", randbits)
    assert noise.noise_key(None) == (1 << 127) | 12345 and asked == [128]
    for bad in (-1, 2**128, 1.5, True, "7"):
        with pytest.raises(ValueError, match="seed"):
            noise.noise_key(bad)


# ---------------------------------------------------------------- secure_mode


def noised_calls(seed, secure_mode=True):
    """(name, kernel result, twin result) of every noised function."""
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(3, 5, 37, generator=gen)
    return [
        ("add_gaussian_noise_",
         (noise.add_gaussian_noise_(a.clone(), 0.7, seed=seed, secure_mode=secure_mode),),
         (noise.add_gaussian_noise_reference(a.clone(), 0.7, seed=seed,
                                             secure_mode=secure_mode),)),
    ]  # fmt: skip


def test_secure_mode_kernels_equal_twins_bit_exact_on_the_grid():
    """Every noised kernel in secure_mode equals its twin bit for bit (rounding to the grid
    absorbs the float differences of summation order), and every value lies on the grid
    secure_noise_grid(0.7) = 0.25."""
    grid = noise.secure_noise_grid(0.7)
    assert grid == 0.25
    for name, kernel, twin in noised_calls(seed=2**100 + 77):
        for got, want in zip(kernel, twin, strict=True):
            assert torch.equal(got, want), name
            assert torch.equal(torch.remainder(got, grid), torch.zeros_like(got)), name


def test_default_mode_kernels_equal_twins():
    """Without secure_mode every noised kernel equals its twin up to float32 rounding (the
    same counters, lanes and normals), and does not round to the grid."""
    for name, kernel, twin in noised_calls(seed=2**100 + 77, secure_mode=False):
        for got, want in zip(kernel, twin, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
            assert torch.remainder(got, noise.secure_noise_grid(0.7)).any(), name


def test_secure_noise_grid_bounds():
    """grid is a power of two in (std/4, std/2], clamped to fp32's normal exponents."""
    for std in (1e-30, 3e-7, 0.37, 1.0, 1.5, 2.0, 1e6, 1e30):
        grid = noise.secure_noise_grid(std)
        assert math.frexp(grid)[0] == 0.5
        lo, hi = max(std / 4, 2.0**-126), min(std / 2, 2.0**126)
        assert lo < grid <= hi or grid == 2.0**-126, (std, grid)


def rounded_normal_probabilities(std, grid, cells):
    """P(round(N(0, std²) / grid) = k) for the integers k in `cells` (ties have probability 0)."""
    edges = torch.cat([cells.double() - 0.5, cells[-1:].double() + 0.5]) * grid / std
    return torch.diff(torch.tensor(stats.norm.cdf(edges.numpy())))


@pytest.mark.parametrize("std", [1.0, 0.37])
def test_secure_noise_has_the_stated_distribution(std):
    """secure_mode on zeros releases round(N(0, std²), grid): before the rounding the twin's
    noise has std `std`; after it the kernel's values fit the rounded normal (chi-square over
    the grid cells, tails pooled) and their variance is in [std², std²·(1 + 1/48)]."""
    n = 100_000
    raw = noise.released_noise(2**90 + 1, 1, n, std=std).double()
    assert abs(raw.square().mean().item() / std**2 - 1) < SIGMAS * math.sqrt(2 / n)
    released = noise.add_gaussian_noise_(
        torch.zeros(n), std, seed=2**90 + 1, secure_mode=True
    ).double()
    grid = noise.secure_noise_grid(std)
    cells = torch.round(released / grid).long()
    assert torch.equal(cells.double() * grid, released)
    reach = int(4 * std / grid)  # cells beyond ±4 std are pooled into the two tails
    inner = torch.arange(-reach, reach + 1)
    p_inner = rounded_normal_probabilities(std, grid, inner)
    p_tail = (1 - p_inner.sum()) / 2
    observed = torch.cat(
        [
            (cells < -reach).sum()[None],
            (cells[:, None] == inner).sum(0),
            (cells > reach).sum()[None],
        ]
    ).double()
    expected = torch.cat([p_tail[None], p_inner, p_tail[None]]) * n
    _, p_value = stats.chisquare(observed.numpy(), expected.numpy())
    assert p_value > P_ALARM, p_value
    exact_var = (p_inner * (inner.double() * grid) ** 2).sum().item()
    assert std**2 <= exact_var <= std**2 * (1 + 1 / 48)
    var = released.square().mean().item()
    assert abs(var / exact_var - 1) < SIGMAS * math.sqrt(2 / n), (var, exact_var)


@pytest.mark.parametrize("secure_mode", [False, True])
def test_engine_secure_mode(secure_mode):
    """PrivacyEngine(..., secure_mode=True) releases (sum + noise) rounded to the grid of
    z·C, divided by q·N (4: exact), with the stated std; secure_mode=False does not round."""
    z, clip = 1.3, 0.8
    engine, model, opt, _ = private(
        linear_model(), noise_multiplier=z, max_grad_norm=clip, secure_mode=secure_mode
    )
    assert engine.state_dict()["settings"]["secure_mode"] is secure_mode
    linear_step(model, opt, torch.randn(3, 2, 48))
    released = flat_grads(model).double() * 4  # q·N = 4
    on_grid = torch.remainder(released, noise.secure_noise_grid(z * clip)) == 0
    assert bool(on_grid.all()) is secure_mode
    noise_only = flat_grads(_empty_step(secure_mode, z, clip)).double() * 4
    n, std = noise_only.numel(), z * clip
    want_var = std**2
    if secure_mode:
        grid = noise.secure_noise_grid(std)
        cells = torch.arange(-int(8 * std / grid), int(8 * std / grid) + 1)
        want_var = (rounded_normal_probabilities(std, grid, cells) * (cells * grid) ** 2).sum()
    var = noise_only.square().mean().item()
    assert abs(var / float(want_var) - 1) < SIGMAS * math.sqrt(2 / n), (var, want_var)


def _empty_step(secure_mode, z, clip):
    _, model, opt, _ = private(
        linear_model(), noise_multiplier=z, max_grad_norm=clip, secure_mode=secure_mode
    )
    linear_step(model, opt, torch.randn(0, 2, 48))
    return model


def test_engine_secure_mode_must_be_a_bool():
    with pytest.raises(TypeError, match="secure_mode must be a bool"):
        private(linear_model(), noise_multiplier=1.0, secure_mode="yes")


# ---------------------------------------------------------------- the key is fresh and not kept


def test_engine_noise_ignores_torch_global_generator():
    """Seeding torch's global generator identically before two steps does not repeat the noise,
    and a step leaves the global generator's state untouched (it draws nothing from it).
    Unrounded noise: secure_mode's grid would make many coordinates of two draws equal."""
    _, model, opt, _ = private(linear_model(), noise_multiplier=1.0, secure_mode=False)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        linear_step(model, opt, torch.zeros(0, 2, 48))
        assert torch.equal(torch.get_rng_state(), state)
        draws.append(flat_grads(model))
    assert (draws[0] == draws[1]).float().mean().item() < 1e-3


def test_noise_key_is_not_kept_saved_or_logged(monkeypatch, caplog):
    """With the CSPRNG forced to a known 128-bit key, none of its representations (the whole key,
    either half, as decimal, hex or little-endian bytes) appears in the engine's state_dict (as
    JSON or pickle), the model or optimizer checkpoints, the logs, or any attribute of the
    engine, optimizer or clipper after the step."""
    key = 0x8F1E2D3C4B5A69788796A5B4C3D2E1F0
    real = noise.secrets.randbits
    monkeypatch.setattr(noise.secrets, "randbits", lambda k: key if k == 128 else real(k))
    caplog.set_level(logging.DEBUG)
    engine, model, opt, _ = private(linear_model(), noise_multiplier=1.0, lr=0.1)
    linear_step(model, opt, torch.randn(2, 2, 48))
    parts = (key, key & (2**64 - 1), key >> 64)
    texts = [s for v in parts for s in (str(v), hex(v)[2:], hex(v)[2:].upper())]
    blobs = [v.to_bytes(8 if v < 2**64 else 16, "little") for v in parts]
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, saved)
    state = engine.state_dict()
    dumps = [json.dumps(state), caplog.text]
    binaries = [pickle.dumps(state), saved.getvalue()]
    for text in texts:
        assert not any(text in d for d in dumps), text
    for blob in blobs:
        assert not any(blob in b for b in binaries)
    for obj in (engine, opt, engine._clipper):
        for name, value in vars(obj).items():
            assert not (isinstance(value, int) and value in parts), name


# ---------------------------------------------------------------- failures


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_examples_are_counted_over_micro_batches_and_steps():
    """NaN in one example and inf in another, in different micro-batches: both contribute 0,
    the released gradient is finite, and engine.stats counts 2 per step; the count survives a
    checkpoint."""
    x = torch.randn(4, 3, 48)
    x[0, 1, 2] = math.nan
    x[3, 0, 7] = math.inf
    for style in ("flat", "per-layer", "block"):
        engine, model, opt, _ = private(linear_model(), style, noise_multiplier=0.5)
        for _ in range(2):
            linear_step(model, opt, x, micro_batches=2)
            assert torch.isfinite(flat_grads(model)).all(), style
        assert engine.stats.nonfinite_examples == 4 and engine.stats.examples == 8, style
        resumed, *_ = private(linear_model(), style, noise_multiplier=0.5)
        resumed.load_state_dict(json.loads(json.dumps(engine.state_dict())))
        assert resumed.stats.nonfinite_examples == 4


def test_crash_after_accounting_loses_no_ledger_entry(monkeypatch):
    """If releasing the noisy gradient raises (the noise draw fails), the step is already in
    the ledger and nothing was released; the ledger then resumes from a checkpoint to exactly
    the ε of an uninterrupted run with as many recorded steps."""
    engine, model, opt, _ = private(linear_model(), noise_multiplier=1.1, n=16, lr=0.1)
    linear_step(model, opt, torch.randn(2, 2, 48))
    weights = [p.detach().clone() for p in model.parameters()]

    def crash(*args, **kwargs):
        raise RuntimeError("device lost while drawing noise")

    monkeypatch.setattr(DF, "add_gaussian_noise_", crash)
    with pytest.raises(RuntimeError, match="device lost"):
        linear_step(model, opt, torch.randn(2, 2, 48))
    monkeypatch.undo()
    assert sum(s.count for s in engine.accountant.history) == 2
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    checkpoint = json.loads(json.dumps(engine.state_dict()))

    resumed, r_model, r_opt, _ = private(linear_model(), noise_multiplier=1.1, n=16)
    resumed.load_state_dict(checkpoint)
    uninterrupted, u_model, u_opt, _ = private(linear_model(), noise_multiplier=1.1, n=16)
    for _ in range(2):
        linear_step(u_model, u_opt, torch.randn(0, 2, 48))
    assert resumed.get_epsilon(1e-5) == uninterrupted.get_epsilon(1e-5)
    for model_, opt_ in ((r_model, r_opt), (u_model, u_opt)):
        linear_step(model_, opt_, torch.randn(1, 2, 48))
    assert resumed.get_epsilon(1e-5) == uninterrupted.get_epsilon(1e-5)


def test_crash_in_the_wrapped_optimizer_keeps_the_ledger(monkeypatch):
    engine, model, opt, _ = private(linear_model(), noise_multiplier=1.0)

    def crash():
        raise RuntimeError("optimizer failed")

    monkeypatch.setattr(opt.original_optimizer, "step", crash)
    with pytest.raises(RuntimeError, match="optimizer failed"):
        linear_step(model, opt, torch.randn(2, 2, 48))
    assert sum(s.count for s in engine.accountant.history) == 1


@pytest.mark.parametrize("style", ["flat", "per-layer", "block"])
def test_out_of_memory_in_backward_points_to_micro_batching(monkeypatch, style):
    """torch.OutOfMemoryError while clipping (flat: at the end of the pass; per-layer, block:
    inside a layer's backward) is re-raised as torch.OutOfMemoryError naming the batch size and
    micro-batching; after optimizer.zero_grad() training continues."""
    _, model, opt, _ = private(linear_model(), style, noise_multiplier=1.0)
    method = "block_sums" if style == "block" else "clipped_sums"
    original = getattr(LinearPiece, method)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(LinearPiece, method, out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=r"(?s)batch of 5 examples.*micro-batches"):
        linear_step(model, opt, torch.randn(5, 2, 48))
    monkeypatch.setattr(LinearPiece, method, original)
    linear_step(model, opt, torch.randn(5, 2, 48))
    assert torch.isfinite(flat_grads(model)).all()
