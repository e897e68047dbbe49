"""Every kernel masks its memory accesses (issue 7). The interpreter, like the GPU, does not
check bounds: an unmasked store past a tensor's end silently overwrites whatever lies there
(docs/design.md §4). So each kernel family runs here, at sizes that are not multiples of its block
sizes, with

- every tensor the launcher allocates for the kernel to write (outputs, partial sums, the
  log-sum-exp) placed in the middle of a larger buffer filled with a sentinel: after the call
  the guard regions before and after must still hold the sentinel (no stray store);
- every input a view into a larger buffer filled with NaN (attention: a strided slice, so
  the neighbours of every row and column are NaN): an unmasked load that reaches the result
  turns it into NaN, and the result must equal the twin's on clean inputs.

Allocations are redirected by replacing the `torch` name of the kernel module with a proxy whose
empty/zeros/empty_like hand out guarded views (the launchers' own code is unchanged)."""

import math

import pytest
import torch
import triton
import triton.language as tl

from dp_attn import functional as F
from dp_attn.kernels import clipped_sum, embedding, flash_attn, norm_affine, per_example_norms
from dp_attn.kernels.clipped_sum import block_clipped_grad_sum_reference, clipped_grad_sum_reference
from dp_attn.kernels.embedding import embedding_clipped_grad_sum_reference
from dp_attn.kernels.flash_attn import attention_reference
from dp_attn.kernels.noise import add_gaussian_noise_reference
from dp_attn.kernels.norm_affine import (
    norm_affine_clipped_grad_sum_reference,
    norm_affine_grad_sq_norms_reference,
)
from dp_attn.kernels.per_example_norms import per_example_grad_sq_norms_reference

GUARD = 1 << 15  # elements on each side: more than any block of any kernel reaches
SENTINEL = 12345.0


class GuardedTorch:
    """Stands for `torch` in a kernel module: allocations land inside sentinel-filled buffers."""

    def __init__(self):
        self.buffers = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def _guarded(self, size, dtype, device, zero):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        numel = math.prod(shape)
        buffer = torch.full(
            (2 * GUARD + numel,), SENTINEL, dtype=dtype or torch.float32, device=device
        )
        view = buffer[GUARD : GUARD + numel].view(shape)
        self.buffers.append((buffer, numel))
        return view.zero_() if zero else view

    def empty(self, *size, dtype=None, device=None):
        return self._guarded(size, dtype, device, zero=False)

    def zeros(self, *size, dtype=None, device=None):
        return self._guarded(size, dtype, device, zero=True)

    def empty_like(self, t):
        return self._guarded(t.shape, t.dtype, t.device, zero=False)

    def assert_guards_intact(self, expected_buffers):
        assert len(self.buffers) >= expected_buffers, "the launcher allocated elsewhere"
        for buffer, numel in self.buffers:
            for guard in (buffer[:GUARD], buffer[GUARD + numel :]):
                assert torch.equal(guard, torch.full_like(guard, SENTINEL)), "stray store"


@pytest.fixture
def guarded(monkeypatch):
    """Redirect the allocations of every kernel module; returns the proxy to check."""
    proxy = GuardedTorch()
    for module in (clipped_sum, per_example_norms, norm_affine, embedding, flash_attn):
        monkeypatch.setattr(module, "torch", proxy)
    monkeypatch.setattr(
        flash_attn,
        "_bhsd_empty",
        lambda like, B, H, T, D: proxy.empty(
            B, T, H, D, dtype=like.dtype, device=like.device
        ).transpose(1, 2),
    )
    return proxy


def in_nan_buffer(x: torch.Tensor) -> torch.Tensor:
    """x's values as a contiguous view in the middle of a NaN-filled buffer (ints: -7 around)."""
    fill = -7 if not x.is_floating_point() else math.nan
    buffer = torch.full((2 * GUARD + x.numel(),), fill, dtype=x.dtype)
    view = buffer[GUARD : GUARD + x.numel()].view(x.shape)
    return view.copy_(x)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_close_to_twin(got, want):
    if isinstance(want, tuple):
        for g, w in zip(got, want, strict=True):
            assert_close_to_twin(g, w)
        return
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the method can fail


@triton.jit
def _copy_block_kernel(src_ptr, dst_ptr, N, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < N), mask=offs < N)
    else:
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs))


def test_guards_catch_an_unmasked_kernel():
    """A block of 64 copied for 37 elements: masked, the guards hold and the copy is exact;
    unmasked, the store hits the guard and the load brings NaN in."""
    for masked in (True, False):
        proxy = GuardedTorch()
        src = randn(37)
        dst = proxy.empty(37)
        _copy_block_kernel[(1,)](in_nan_buffer(src), dst, 37, BLOCK=64, MASKED=masked)
        if masked:
            proxy.assert_guards_intact(1)
            assert torch.equal(dst, src)
        else:
            with pytest.raises(AssertionError, match="stray store"):
                proxy.assert_guards_intact(1)
            assert proxy.buffers[0][0][GUARD + 37 :].isnan().any()


# ---------------------------------------------------------------- per-example norms


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_per_example_norms_mask_every_access(guarded, method):
    a, g = randn(3, 37, 19, seed=1), randn(3, 37, 45, seed=2)
    got = per_example_norms.per_example_grad_sq_norms(
        in_nan_buffer(a), in_nan_buffer(g), method=method
    )
    guarded.assert_guards_intact(1)
    assert_close_to_twin(got, per_example_grad_sq_norms_reference(a, g, method=method))


# ---------------------------------------------------------------- clipped sums and noise


def test_clipped_sums_mask_every_access(guarded):
    """Edge tiles in both dimensions (131 x 133 against 128-wide blocks), sequences of 7."""
    a, g = randn(3, 7, 131, seed=3), randn(3, 7, 133, seed=4)
    c = torch.tensor([0.5, 0.0, 1.0])
    inputs = (in_nan_buffer(a), in_nan_buffer(g))
    got = clipped_sum.clipped_grad_sum(*inputs, in_nan_buffer(c), scale=0.5)
    assert_close_to_twin(got, clipped_grad_sum_reference(a, g, c, scale=0.5))
    got = clipped_sum.block_clipped_grad_sum(*inputs, 0.8, scale=0.5)
    assert_close_to_twin(got, block_clipped_grad_sum_reference(a, g, 0.8, scale=0.5))
    guarded.assert_guards_intact(4)


def test_noise_kernel_masks_every_access():
    """_noise_kernel in place on a caller's view with a sentinel before and after, and on a
    row-strided view."""
    caller = torch.full((2 * GUARD + 5 * 39,), SENTINEL)
    x = caller[GUARD : GUARD + 5 * 39].view(5, 39).zero_()
    F.add_gaussian_noise_(x, 1.5, seed=77)
    assert torch.equal(caller[:GUARD], torch.full((GUARD,), SENTINEL))
    assert torch.equal(caller[GUARD + 5 * 39 :], torch.full((GUARD,), SENTINEL))
    torch.testing.assert_close(x, add_gaussian_noise_reference(torch.zeros(5, 39), 1.5, seed=77))

    wide = torch.full((5, 64), SENTINEL)
    strided = wide[:, 3:42].zero_()
    F.add_gaussian_noise_(strided, 1.5, seed=77)
    torch.testing.assert_close(strided, x)
    assert (wide[:, :3] == SENTINEL).all() and (wide[:, 42:] == SENTINEL).all()


# ---------------------------------------------------------------- norm affine and embeddings


def test_norm_affine_kernels_mask_every_access(guarded):
    x_hat, g = randn(3, 37, 133, seed=6), randn(3, 37, 133, seed=7)
    c = torch.tensor([1.0, 0.25, 0.0])
    got = norm_affine.norm_affine_grad_sq_norms(in_nan_buffer(x_hat), in_nan_buffer(g))
    assert_close_to_twin(got, norm_affine_grad_sq_norms_reference(x_hat, g))
    got = norm_affine.norm_affine_clipped_grad_sum(
        in_nan_buffer(x_hat), in_nan_buffer(g), in_nan_buffer(c), scale=0.5
    )
    assert_close_to_twin(got, norm_affine_clipped_grad_sum_reference(x_hat, g, c, scale=0.5))
    guarded.assert_guards_intact(2)  # the norms' partial sums and the clipped sum's


def test_embedding_kernel_masks_every_access(guarded):
    """ids are guarded by -7 (an id never written through, but an unmasked load would scatter
    rows out of range)."""
    ids = torch.randint(0, 11, (3, 37), generator=torch.Generator().manual_seed(8))
    g = randn(3, 37, 133, seed=9)
    c = torch.tensor([0.0, 0.5, 1.0])
    args = dict(scale=0.5, padding_idx=2)
    got = embedding.embedding_clipped_grad_sum(
        in_nan_buffer(ids), in_nan_buffer(g), in_nan_buffer(c), 11, **args
    )
    assert_close_to_twin(got, embedding_clipped_grad_sum_reference(ids, g, c, 11, **args))
    guarded.assert_guards_intact(1)  # the scatter's workspace, which is the result


# ---------------------------------------------------------------- attention


def strided_in_nan(x: torch.Tensor, pad_t: int = 3, pad_d: int = 16) -> torch.Tensor:
    """x [B, H, T, D] as a slice of a NaN-filled [B, H, T + 2·pad_t, D + pad_d] buffer."""
    b, h, t, d = x.shape
    buffer = torch.full((b, h, t + 2 * pad_t, d + pad_d), math.nan, dtype=x.dtype)
    view = buffer[:, :, pad_t : pad_t + t, :d]
    return view.copy_(x)


def test_flash_attention_masks_every_access(guarded):
    """Forward and backward, GQA, causal with Tq != Tk, key lengths: 37 queries and 29 keys
    against the interpreter's blocks. Inputs and the output gradient are strided slices of
    NaN buffers; out, lse, delta, dq, dk and dv are guarded."""
    q, k, v = (randn(2, h, t, 16, seed=s) for h, t, s in ((2, 37, 10), (1, 29, 11), (1, 29, 12)))
    do = randn(2, 2, 37, 16, seed=13)
    key_lengths = in_nan_buffer(torch.tensor([29, 17], dtype=torch.int32))
    leaves = [strided_in_nan(t).requires_grad_() for t in (q, k, v)]
    out = F.flash_attention(*leaves, causal=True, key_lengths=key_lengths)
    grads = torch.autograd.grad(out, leaves, strided_in_nan(do))
    guarded.assert_guards_intact(6)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = attention_reference(*ref_leaves, causal=True, key_lengths=key_lengths.clone())
    want_grads = torch.autograd.grad(want, ref_leaves, do)
    assert_close_to_twin(out.detach(), want.detach())
    assert_close_to_twin(tuple(grads), tuple(want_grads))
