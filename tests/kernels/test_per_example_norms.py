"""Per-example gradient norms of linear layers: ghost and instantiate kernels vs their twin,
the twin vs torch.func per-example gradients of a real nn.Linear, and the two paths vs each
other. CPU runs the real kernels through the Triton interpreter (tests/conftest.py)."""

import pytest
import torch

from dp_attn import functional as F
from dp_attn.kernels import per_example_norms
from dp_attn.kernels.per_example_norms import grad_norm_method, per_example_grad_sq_norms_reference

from .dp_oracle import linear_grads, sq_norms

METHODS = ["ghost", "instantiate"]

# (B, T, din, dout): T = 1 / odd sizes / several T-tiles (an odd count: 130 rows = 3 tiles of
# 64, the folded triangle's middle row) / several dout×din tiles of the instantiate path.
SHAPES = [(1, 1, 5, 3), (3, 7, 9, 5), (2, 130, 12, 10), (2, 3, 150, 20)]


def inputs(batch, seq, din, dout, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, seq, din, generator=gen).to(dtype)
    g = torch.randn(batch, seq, dout, generator=gen).to(dtype)
    return a, g


def oracle(a, g, bias):
    return sq_norms(*linear_grads(a, g, bias))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_kernel_matches_twin_and_oracle(shape, method):
    a, g = inputs(*shape)
    for bias in (True, False):
        kernel = per_example_norms.per_example_grad_sq_norms(a, g, bias=bias, method=method)
        twin = per_example_grad_sq_norms_reference(a, g, bias=bias, method=method)
        assert kernel.dtype == torch.float32 and kernel.shape == (shape[0],)
        torch.testing.assert_close(kernel, twin, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(twin.double(), oracle(a, g, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_2d_inputs_are_sequences_of_one(method):
    a, g = inputs(4, 1, 6, 9)
    flat = F.per_example_grad_sq_norms(a[:, 0], g[:, 0], method=method)
    torch.testing.assert_close(flat, F.per_example_grad_sq_norms(a, g, method=method))
    torch.testing.assert_close(flat.double(), oracle(a[:, 0], g[:, 0], True), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(method):
    a, g = inputs(0, 5, 6, 7)
    out = F.per_example_grad_sq_norms(a, g, method=method)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_padded_positions_do_not_count(method):
    """Positions past an example's length have zero output gradient (whatever their
    activations): the norm equals that of the example truncated to its length."""
    a, g = inputs(2, 9, 8, 6)
    g[0, 4:] = 0
    a[0, 4:] = 1e3
    out = F.per_example_grad_sq_norms(a, g, method=method)
    short = F.per_example_grad_sq_norms(a[:1, :4], g[:1, :4], method=method)
    torch.testing.assert_close(out[:1], short, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.double(), oracle(a, g, True), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_inputs_accumulate_in_fp32(dtype, method):
    a, g = inputs(2, 20, 24, 16, dtype=dtype)
    out = F.per_example_grad_sq_norms(a, g, method=method)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), oracle(a, g, True), rtol=2e-3, atol=0)


def test_paths_agree_and_default_picks_by_flops():
    a, g = inputs(3, 70, 40, 30, seed=1)
    ghost = F.per_example_grad_sq_norms(a, g, method="ghost")
    torch.testing.assert_close(ghost, F.per_example_grad_sq_norms(a, g, method="instantiate"))
    assert grad_norm_method(70, 40, 30) == "instantiate"  # 70·70 > 2·40·30
    assert grad_norm_method(8, 40, 30) == "ghost"
    assert grad_norm_method(4096, 4096, 11008) == "ghost"
    assert grad_norm_method(8192, 4096, 11008) == "instantiate"
    torch.testing.assert_close(F.per_example_grad_sq_norms(a, g), ghost)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_example_has_non_finite_norm(method):
    """The engine drops examples whose norm is not finite: a NaN must not vanish here."""
    a, g = inputs(3, 4, 5, 6)
    g[1, 2, 3] = float("nan")
    out = F.per_example_grad_sq_norms(a, g, method=method)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("seq", "din", "dout"), [(512, 768, 3072), (1000, 1024, 96)])
def test_cuda_bf16_matches_twin(method, seq, din, dout):
    a, g = (x.cuda() for x in inputs(4, seq, din, dout, dtype=torch.bfloat16))
    out = F.per_example_grad_sq_norms(a, g, method=method)
    twin = per_example_grad_sq_norms_reference(a, g, method=method)
    torch.testing.assert_close(out, twin, rtol=1e-3, atol=0)
