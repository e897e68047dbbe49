"""Norm-affine (LayerNorm / RMSNorm) and embedding per-example norms and clipped sums: kernels
vs their twins, the twins vs torch.func per-example gradients of real modules, privacy bounds,
and input checks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as torch_f

from dp_attn import functional as F
from dp_attn.kernels import embedding, norm_affine
from dp_attn.kernels.embedding import embedding_clipped_grad_sum_reference
from dp_attn.kernels.norm_affine import (
    norm_affine_clipped_grad_sum_reference,
    norm_affine_grad_sq_norms_reference,
)

from .dp_oracle import clip_factors_for, per_example_grads, sq_norms


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def norm_case(kind, shape, seed=0):
    """(x_hat, g, per-example weight grads, bias grads or None) of a real LayerNorm/RMSNorm."""
    x, gy = (
        randn(*shape, dtype=torch.float64, seed=seed),
        randn(*shape, dtype=torch.float64, seed=seed + 1),
    )
    d = shape[-1]
    if kind == "layernorm":
        module = nn.LayerNorm(d, dtype=torch.float64)
        x_hat = torch_f.layer_norm(x, (d,), eps=module.eps)
    else:
        module = nn.RMSNorm(d, eps=1e-6, dtype=torch.float64)
        x_hat = torch_f.rms_norm(x, (d,), eps=1e-6)
    with torch.no_grad():  # non-trivial affine parameters: they must not enter the gradient
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    grads = per_example_grads(module, x, gy)
    return x_hat.float(), gy.float(), grads["weight"], grads.get("bias")


def assert_pairs_close(got, want, **tol):
    for x, y in zip(got, want, strict=True):
        if y is None:
            assert x is None
        else:
            torch.testing.assert_close(x, y, **tol)


# ---------------------------------------------------------------- norm affine


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape", [(1, 1, 5), (3, 7, 9), (2, 130, 20), (4, 6)])
def test_norm_affine_norms_and_sums_match_oracle(kind, shape):
    x_hat, g, weight, bias = norm_case(kind, shape)
    has_bias = bias is not None
    norms = F.norm_affine_grad_sq_norms(x_hat, g, bias=has_bias)
    torch.testing.assert_close(norms.double(), sq_norms(weight, bias), rtol=1e-5, atol=1e-5)
    twin = norm_affine_grad_sq_norms_reference(x_hat, g, bias=has_bias)
    torch.testing.assert_close(norms, twin, rtol=1e-5, atol=1e-5)
    c = clip_factors_for(sq_norms(weight, bias), threshold=1.0)
    got = F.norm_affine_clipped_grad_sum(x_hat, g, c, scale=0.5, bias=has_bias)
    want_w = 0.5 * (c.double()[:, None] * weight).sum(0)
    want_b = 0.5 * (c.double()[:, None] * bias).sum(0) if has_bias else None
    assert_pairs_close(
        got, (want_w.float(), None if want_b is None else want_b.float()), rtol=1e-5, atol=1e-5
    )


def test_norm_affine_split_rows_and_dtypes_match_twin():
    """1200 rows: several row-splits whose fp32 partials are added; fp16 output."""
    x_hat, g = (
        randn(3, 400, 24, dtype=torch.float16),
        randn(3, 400, 24, dtype=torch.float16, seed=1),
    )
    c = torch.tensor([1.0, 0.3, 0.0])
    args = dict(scale=0.25)
    got = norm_affine.norm_affine_clipped_grad_sum(x_hat, g, c, **args)
    assert got[0].dtype == torch.float16 and got[1].shape == (24,)
    want = norm_affine_clipped_grad_sum_reference(x_hat, g, c, **args)
    assert_pairs_close(got, want, rtol=2e-3, atol=2e-3)
    f32 = F.norm_affine_clipped_grad_sum(x_hat, g, c, **args, out_dtype=torch.float32)
    assert_pairs_close(
        f32,
        norm_affine_clipped_grad_sum_reference(x_hat, g, c, **args, out_dtype=torch.float32),
        rtol=1e-4,
        atol=1e-4,
    )


def test_norm_affine_empty_batch_and_dropped_examples():
    x_hat, g = randn(0, 4, 6), randn(0, 4, 6)
    assert F.norm_affine_grad_sq_norms(x_hat, g).shape == (0,)
    weight, bias = F.norm_affine_clipped_grad_sum(x_hat, g, torch.zeros(0), scale=0.5)
    assert weight.shape == bias.shape == (6,) and not weight.any() and not bias.any()
    x_hat, g = randn(2, 4, 6), randn(2, 4, 6, seed=1)
    x_hat[0, 1, 2] = float("nan")
    got = F.norm_affine_clipped_grad_sum(x_hat, g, torch.tensor([0.0, 0.5]))
    assert_pairs_close(
        got,
        F.norm_affine_clipped_grad_sum(x_hat[1:], g[1:], torch.tensor([0.5])),
        rtol=1e-6,
        atol=1e-6,
    )


# ---------------------------------------------------------------- embeddings


def embedding_case(batch, seq, vocab, d, padding_idx, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    gy = randn(batch, seq, d, dtype=torch.float64, seed=seed + 1)
    module = nn.Embedding(vocab, d, padding_idx=padding_idx, dtype=torch.float64)
    weight = per_example_grads(module, ids, gy)["weight"]  # [B, V, d]: small V only
    return ids, gy.float(), weight


@pytest.mark.parametrize(
    ("batch", "seq", "vocab", "d", "padding_idx"),
    [(1, 1, 3, 4, None), (3, 9, 5, 7, 0), (2, 130, 11, 20, None), (2, 70, 4, 33, 3)],
)
def test_embedding_norms_and_sums_match_oracle(batch, seq, vocab, d, padding_idx):
    """Few token values, so tokens repeat within an example (their gradient rows add up)."""
    ids, g, weight = embedding_case(batch, seq, vocab, d, padding_idx)
    norms = F.embedding_grad_sq_norms(ids, g, padding_idx=padding_idx)
    torch.testing.assert_close(norms.double(), sq_norms(weight), rtol=1e-5, atol=1e-4)
    c = clip_factors_for(sq_norms(weight), threshold=2.0)
    got = F.embedding_clipped_grad_sum(ids, g, c, vocab, scale=0.5, padding_idx=padding_idx)
    want = 0.5 * (c.double()[:, None, None] * weight).sum(0)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_embedding_1d_ids_int32_fp16_match_twin():
    ids = torch.tensor([4, 1, 4, 0, 2], dtype=torch.int32)
    g = randn(5, 12, dtype=torch.float16)
    norms = F.embedding_grad_sq_norms(ids, g)
    torch.testing.assert_close(norms, g.float().square().sum(1), rtol=1e-5, atol=1e-5)
    c = torch.rand(5)
    args = dict(scale=2.0, padding_idx=4)
    got = embedding.embedding_clipped_grad_sum(ids, g, c, 6, **args)
    assert got.dtype == torch.float16 and got.shape == (6, 12)
    torch.testing.assert_close(
        got, embedding_clipped_grad_sum_reference(ids, g, c, 6, **args), rtol=2e-3, atol=2e-3
    )
    # The padding row and the rows of ids that do not occur are exactly 0.
    assert not got[4].any() and not got[3].any() and not got[5].any() and got[1].all()


def test_embedding_empty_batch_and_dropped_examples():
    ids, g = torch.zeros(0, 5, dtype=torch.int64), randn(0, 5, 3)
    assert F.embedding_grad_sq_norms(ids, g).shape == (0,)
    assert not F.embedding_clipped_grad_sum(ids, g, torch.zeros(0), 4).any()
    ids, g, _ = embedding_case(3, 6, 5, 4, None)
    g[1, 2, 0] = float("inf")
    c = torch.tensor([1.0, 0.0, 0.5])
    got = F.embedding_clipped_grad_sum(ids, g, c, 5)
    keep = [0, 2]
    torch.testing.assert_close(got, F.embedding_clipped_grad_sum(ids[keep], g[keep], c[keep], 5))


# ---------------------------------------------------------------- privacy property


@settings(max_examples=10, deadline=None)
@given(
    seq=st.integers(1, 12),
    vocab=st.integers(1, 6),
    d=st.integers(1, 20),
    magnitude=st.floats(min_value=1e-3, max_value=1e4),
    threshold=st.floats(min_value=1e-3, max_value=10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_clipped_contribution_is_bounded(seq, vocab, d, magnitude, threshold, seed):
    """One example at a time through the kernels (norm → clip factor → clipped sum): the
    embedding and norm-affine contributions have norm ≤ threshold."""
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed))
    g = randn(1, seq, d, seed=seed) * magnitude
    c = torch.clamp(threshold / (embedding.embedding_grad_sq_norms(ids, g).sqrt() + 1e-6), max=1.0)
    out = embedding.embedding_clipped_grad_sum(ids, g, c, vocab)
    assert math.sqrt(float(out.double().square().sum())) <= threshold * (1 + 1e-4)
    x_hat = randn(1, seq, d, seed=seed + 1)
    c = torch.clamp(
        threshold / (norm_affine.norm_affine_grad_sq_norms(x_hat, g).sqrt() + 1e-6), max=1.0
    )
    weight, bias = norm_affine.norm_affine_clipped_grad_sum(x_hat, g, c)
    total = float(weight.double().square().sum() + bias.double().square().sum())
    assert math.sqrt(total) <= threshold * (1 + 1e-4)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    x, g = randn(2, 3, 4), randn(2, 3, 4)
    ids = torch.tensor([[0, 1, 2], [2, 2, 1]])
    c = torch.ones(2)
    cases = [
        (lambda: F.norm_affine_grad_sq_norms(x, g[..., :3]), ValueError, "same shape"),
        (lambda: F.norm_affine_grad_sq_norms(x.double(), g), TypeError, "dtype"),
        (lambda: F.norm_affine_clipped_grad_sum(x, g, c[:1]), ValueError, "clip_factors"),
        (lambda: F.norm_affine_clipped_grad_sum(x, g, c, scale=float("inf")), ValueError, "scale"),
        (lambda: F.embedding_grad_sq_norms(ids.float(), g), TypeError, "ids"),
        (lambda: F.embedding_grad_sq_norms(ids, g[:, :2]), ValueError, "g must have shape"),
        (lambda: F.embedding_grad_sq_norms(ids, g, padding_idx=-1), ValueError, "padding_idx"),
        (lambda: F.embedding_grad_sq_norms(ids, g.to("meta")), ValueError, "device"),
        (lambda: F.embedding_clipped_grad_sum(ids, g, c, 2), ValueError, "ids must lie"),
        (lambda: F.embedding_clipped_grad_sum(-ids, g, c, 3), ValueError, "ids must lie"),
        (lambda: F.embedding_clipped_grad_sum(ids, g, c, 0), ValueError, "num_embeddings"),
        (
            lambda: F.embedding_clipped_grad_sum(ids, g, c, 3, padding_idx=3),
            ValueError,
            "padding_idx",
        ),
        (lambda: F.embedding_clipped_grad_sum(ids, g, c[:1], 3), ValueError, "clip_factors"),
        (
            lambda: F.embedding_clipped_grad_sum(ids, g, c, 3, scale=float("nan")),
            ValueError,
            "scale",
        ),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()


# ---------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_cuda_bf16_norm_affine_and_embedding_match_twins():
    x_hat, g = (
        randn(8, 512, 768, dtype=torch.bfloat16).cuda(),
        randn(8, 512, 768, dtype=torch.bfloat16, seed=1).cuda(),
    )
    ids = torch.randint(0, 1000, (8, 512), device="cuda")
    c = torch.rand(8, device="cuda")
    torch.testing.assert_close(
        F.norm_affine_grad_sq_norms(x_hat, g),
        norm_affine_grad_sq_norms_reference(x_hat, g),
        rtol=1e-3,
        atol=0,
    )
    args = dict(out_dtype=torch.float32)
    assert_pairs_close(
        F.norm_affine_clipped_grad_sum(x_hat, g, c, **args),
        norm_affine_clipped_grad_sum_reference(x_hat, g, c, **args),
        rtol=1e-3,
        atol=1e-3,
    )
    torch.testing.assert_close(
        F.embedding_clipped_grad_sum(ids, g, c, 1000, **args),
        embedding_clipped_grad_sum_reference(ids, g, c, 1000, **args),
        rtol=1e-3,
        atol=1e-3,
    )
