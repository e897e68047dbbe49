"""Flash attention: the Triton kernels (through the interpreter on CPU) vs the reference twin,
and the twin vs an independent float64 computation (explicit per-row visibility, exp and
normalise by hand), forward and gradients. Tests marked `cuda` compare the compiled kernels
with torch's scaled_dot_product_attention at realistic sizes."""

import math

import pytest
import torch

from dp_attn import functional as F
from dp_attn.kernels import flash_attn

# Kernel vs twin: fp32 runs IEEE matmuls (interpreter) against a float64 twin.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


def make_inputs(B, H, Hkv, Tq, Tk, D, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, D))
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def oracle(q, k, v, *, causal=False, softmax_scale=None, key_lengths=None):
    """float64 attention from first principles: the visible keys of each row are listed one row
    at a time, and the softmax is exp(s - max) / Σ over them (0 for a row with none)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    visible = torch.zeros(B, Tq, Tk, dtype=torch.bool, device=q.device)
    for b in range(B):
        n_keys = Tk if key_lengths is None else int(key_lengths[b])
        for i in range(Tq):
            last = i + (Tk - Tq) if causal else Tk - 1  # last visible key position
            visible[b, i, : max(0, min(last + 1, n_keys))] = True
    heads = []
    for h in range(H):
        kv_head = h // (H // Hkv)
        s = torch.einsum("bid,bjd->bij", q[:, h], k[:, kv_head]) * scale
        s = s.masked_fill(~visible, float("-inf"))
        top = s.amax(-1, keepdim=True).detach()
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.exp(s - top)
        z = e.sum(-1, keepdim=True)
        p = e / torch.where(z > 0, z, torch.ones_like(z))
        heads.append(torch.einsum("bij,bjd->bid", p, v[:, kv_head]))
    return torch.stack(heads, 1)


def value_and_grads(fn, q, k, v, do, **kwargs):
    """fn(q, k, v, **kwargs) and the gradients of <fn(...), do> w.r.t. q, k, v."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


def assert_all_close(actual, expected, **tol):
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        assert a.shape == e.shape, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e.double(), msg=lambda m, n=name: f"{n}: {m}", **tol)


# (B, H, Hkv, Tq, Tk, D, causal, key_lengths, dtype). T = 130 spans several blocks of every
# kernel (the unmasked loops, the causal diagonal and the partial last block); 1 and 17 are
# single partial blocks. Head dims that are not a power of two >= 16 run on zero-padded tiles.
CASES = {
    "dense-130-d32": (2, 2, 2, 130, 130, 32, False, None, torch.float32),
    "causal-130-d64": (2, 2, 2, 130, 130, 64, True, None, torch.float32),
    "causal-q<k-gqa": (2, 4, 2, 17, 130, 32, True, None, torch.float32),
    "causal-q>k-mqa": (2, 4, 1, 130, 17, 16, True, None, torch.float32),
    "dense-q<k-mqa": (1, 3, 1, 17, 130, 16, False, None, torch.float32),
    "dense-q>k": (2, 2, 2, 130, 1, 16, False, None, torch.float32),
    "single": (2, 2, 2, 1, 1, 32, True, None, torch.float32),
    "lengths-causal": (3, 2, 1, 130, 130, 32, True, [0, 77, 130], torch.float32),
    "lengths-dense-q<k": (2, 2, 2, 17, 130, 64, False, [130, 5], torch.float32),
    "d128": (1, 2, 2, 70, 70, 128, True, None, torch.float32),
    "fp16-causal-gqa-d128": (2, 4, 2, 130, 130, 128, True, [130, 64], torch.float16),
    "fp16-dense-d64": (2, 2, 1, 17, 130, 64, False, None, torch.float16),
    "bf16-causal-d32": (2, 2, 2, 130, 130, 32, True, None, torch.bfloat16),
    "d1-causal-lengths": (2, 2, 1, 70, 70, 1, True, [70, 9], torch.float32),
    "d8-dense-q<k": (2, 2, 2, 17, 130, 8, False, None, torch.float32),
    "d24-causal-gqa-lengths": (2, 4, 2, 130, 130, 24, True, [130, 77], torch.float32),
    "d80-causal": (1, 2, 2, 70, 70, 80, True, None, torch.float32),
    "d96-causal-gqa-lengths": (2, 4, 2, 70, 70, 96, True, [70, 40], torch.float32),
    "d112-dense-lengths": (1, 2, 1, 33, 70, 112, False, [70], torch.float32),
    "fp16-causal-d96": (2, 2, 1, 70, 70, 96, True, None, torch.float16),
    "bf16-dense-d24": (2, 2, 2, 33, 33, 24, False, [33, 20], torch.bfloat16),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_twin_and_twin_matches_oracle(case):
    B, H, Hkv, Tq, Tk, D, causal, lengths, dtype = case
    q, k, v, do = make_inputs(B, H, Hkv, Tq, Tk, D, dtype)
    kwargs = dict(causal=causal, softmax_scale=None if D != 64 else 0.3)
    kwargs["key_lengths"] = None if lengths is None else torch.tensor(lengths)

    kernel = value_and_grads(F.flash_attention, q, k, v, do, **kwargs)
    assert kernel[0].dtype == dtype and kernel[1].dtype == dtype
    # The twin on float64 copies of the same (rounded) inputs: kernel error only.
    twin = value_and_grads(
        flash_attn.attention_reference, q.double(), k.double(), v.double(), do.double(), **kwargs
    )
    assert_all_close(kernel, twin, **TOLERANCE[dtype])
    exact = value_and_grads(oracle, q.double(), k.double(), v.double(), do.double(), **kwargs)
    assert_all_close(twin, exact, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_twin_computes_in_fp32_and_returns_input_dtype(dtype):
    q, k, v, do = make_inputs(2, 2, 1, 9, 11, 16, dtype)
    out, dq, dk, dv = value_and_grads(flash_attn.attention_reference, q, k, v, do, causal=True)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == dtype
    expected = oracle(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])


def test_rows_without_keys_give_zero_output_and_zero_gradients():
    # Causal with Tq > Tk: rows i < Tq - Tk see no key; example 1 has key length 0.
    q, k, v, do = make_inputs(2, 2, 2, 130, 40, 32)
    lengths = torch.tensor([40, 0])
    out, dq, dk, dv = value_and_grads(
        F.flash_attention, q, k, v, do, causal=True, key_lengths=lengths
    )
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[0, :, :90] == 0).all() and (dq[0, :, :90] == 0).all()
    assert (out[0, :, 90:] != 0).any(dim=-1).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()


def test_padded_keys_get_zero_gradients_and_do_not_matter():
    q, k, v, do = make_inputs(2, 2, 2, 33, 130, 16)
    lengths = torch.tensor([100, 7])
    out, _, dk, dv = value_and_grads(F.flash_attention, q, k, v, do, key_lengths=lengths)
    assert (dk[0, :, 100:] == 0).all() and (dv[0, :, 100:] == 0).all()
    assert (dk[1, :, 7:] == 0).all() and (dv[1, :, 7:] == 0).all()
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 100:] = 1e4  # garbage in the padding must not leak
    v2[1, :, 7:] = float("nan")
    out2 = F.flash_attention(q, k2, v2, key_lengths=lengths)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("causal", [False, True])
def test_examples_never_mix(causal):
    """Perturbing example 1 (its q, k, v and key length) leaves example 0's output and
    gradients bit-for-bit unchanged."""
    q, k, v, do = make_inputs(2, 4, 2, 130, 130, 32)
    lengths = torch.tensor([120, 130])
    base = value_and_grads(F.flash_attention, q, k, v, do, causal=causal, key_lengths=lengths)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[1] = 3.0 * torch.randn_like(t[1])
    lengths2 = torch.tensor([120, 50])
    moved = value_and_grads(F.flash_attention, q2, k2, v2, do, causal=causal, key_lengths=lengths2)
    for a, b in zip(base, moved, strict=True):
        assert torch.equal(a[0], b[0])
        assert not torch.equal(a[1], b[1])


def test_empty_batch_and_empty_sequences():
    for B, Tq, Tk in ((0, 16, 16), (2, 0, 16), (2, 16, 0)):
        q, k, v, do = make_inputs(B, 4, 2, Tq, Tk, 32)
        kwargs = dict(causal=True, key_lengths=torch.zeros(B, dtype=torch.int64))
        out, dq, dk, dv = value_and_grads(F.flash_attention, q, k, v, do, **kwargs)
        assert out.shape == (B, 4, Tq, 32) and dq.shape == q.shape
        assert dk.shape == k.shape and dv.shape == v.shape
        for t in (out, dq, dk, dv):
            assert (t == 0).all()


@pytest.mark.parametrize("D", [8, 24, 96])
def test_columns_past_the_head_dim_are_never_read(D):
    """q, k, v as views of the first D columns of wider tensors whose other columns are NaN
    (the padding columns of the kernels' tiles): output and gradients equal those of
    contiguous copies."""
    q, k, v, do = make_inputs(2, 2, 1, 40, 40, D)
    width = max(16, 1 << (D - 1).bit_length()) + 8
    wide = [torch.full((*t.shape[:3], width), float("nan")) for t in (q, k, v)]
    for w, t in zip(wide, (q, k, v), strict=True):
        w[..., :D] = t
    kwargs = dict(causal=True, key_lengths=torch.tensor([40, 25]))
    views = value_and_grads(F.flash_attention, *(w[..., :D] for w in wide), do, **kwargs)
    copies = value_and_grads(F.flash_attention, q, k, v, do, **kwargs)
    assert_all_close(views, copies, atol=0.0, rtol=0.0)


def test_views_of_a_fused_qkv_projection():
    """q, k, v as strided views of one [B, T, 3, H, D] tensor (no copies) give the result and
    the fused gradient of contiguous inputs."""
    B, T, H, D = 2, 70, 2, 32
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, 3, H, D, generator=gen, requires_grad=True)
    do = torch.randn(B, H, T, D, generator=gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = F.flash_attention(q, k, v, causal=True)
    (grad,) = torch.autograd.grad(out, qkv, do)

    fused = qkv.detach().clone().requires_grad_()
    parts = [fused[:, :, i].transpose(1, 2).contiguous() for i in range(3)]
    expected = flash_attn.attention_reference(*parts, causal=True)
    (expected_grad,) = torch.autograd.grad(expected, fused, do)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad, expected_grad, **TOLERANCE[torch.float32])


def test_cpu_runs_the_kernel_when_interpreting_and_the_twin_otherwise(monkeypatch):
    q, k, v, _ = make_inputs(1, 2, 2, 20, 20, 16)

    def no_twin(*args, **kwargs):
        raise AssertionError("the reference twin ran instead of the kernel")

    with monkeypatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setattr(F, "attention_reference", no_twin)  # the name functional dispatches to
        kernel_out = F.flash_attention(q, k, v)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    twin_out = F.flash_attention(q, k, v)
    assert torch.equal(twin_out, flash_attn.attention_reference(q, k, v))
    torch.testing.assert_close(kernel_out, twin_out, **TOLERANCE[torch.float32])


def _bad_inputs():
    q, k, v, _ = make_inputs(2, 4, 2, 8, 8, 16)
    lengths = torch.tensor([8, 3])
    meta = torch.empty(2, 2, 8, 16, device="meta")
    return [
        # (id, q, k, v, kwargs, error, words the message must contain)
        ("q-not-tensor", q.tolist(), k, v, {}, TypeError, "q must be a torch.Tensor"),
        ("v-not-tensor", q, k, None, {}, TypeError, "v must be a torch.Tensor"),
        ("q-rank", q[0], k, v, {}, ValueError, "q must have 4 dimensions"),
        ("k-rank", q, k.unsqueeze(0), v, {}, ValueError, "k must have 4 dimensions"),
        ("int-dtype", q.long(), k.long(), v.long(), {}, TypeError, "q must have dtype"),
        ("fp64", q.double(), k.double(), v.double(), {}, TypeError, "q must have dtype"),
        ("dtype-mismatch", q, k.half(), v, {}, TypeError, "must share a dtype"),
        ("device-mismatch", q, meta, meta, {}, ValueError, "must share a device"),
        ("batch", q, k[:1], v[:1], {}, ValueError, "k must have batch size 2"),
        ("head-dim", q, k[..., :8], v[..., :8], {}, ValueError, "k must have head dim 16"),
        ("v-shape", q, k, v[:, :, :5], {}, ValueError, "v must have the shape of k"),
        (
            "heads-divide",
            q,
            k[:, :1].expand(2, 3, 8, 16),
            v[:, :1].expand(2, 3, 8, 16),
            {},
            ValueError,
            "divides q's (4)",
        ),
        (
            "head-dim-0",
            q[..., :0],
            k[..., :0],
            v[..., :0],
            {},
            ValueError,
            "q must have a head dim from 1 to 256, got 0",
        ),
        (
            "head-dim-512",
            q.repeat(1, 1, 1, 32),
            k.repeat(1, 1, 1, 32),
            v.repeat(1, 1, 1, 32),
            {},
            ValueError,
            "q must have a head dim from 1 to 256, got 512",
        ),
        ("causal-int", q, k, v, dict(causal=1), TypeError, "causal must be a bool"),
        ("scale-str", q, k, v, dict(softmax_scale="0.1"), TypeError, "softmax_scale must be"),
        ("scale-negative", q, k, v, dict(softmax_scale=-0.5), ValueError, "softmax_scale must"),
        ("scale-nan", q, k, v, dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
        ("lengths-list", q, k, v, dict(key_lengths=[8, 3]), TypeError, "key_lengths must be a"),
        (
            "lengths-float",
            q,
            k,
            v,
            dict(key_lengths=lengths.float()),
            TypeError,
            "key_lengths must have dtype",
        ),
        (
            "lengths-shape",
            q,
            k,
            v,
            dict(key_lengths=lengths[:1]),
            ValueError,
            "key_lengths must have shape (2,)",
        ),
        (
            "lengths-2d",
            q,
            k,
            v,
            dict(key_lengths=lengths[None]),
            ValueError,
            "key_lengths must have 1 dimensions",
        ),
        (
            "lengths-device",
            q,
            k,
            v,
            dict(key_lengths=lengths.to("meta")),
            ValueError,
            "key_lengths must be on q's device",
        ),
        (
            "lengths-negative",
            q,
            k,
            v,
            dict(key_lengths=torch.tensor([-1, 3])),
            ValueError,
            "key_lengths must lie in [0, 8]",
        ),
        (
            "lengths-too-long",
            q,
            k,
            v,
            dict(key_lengths=torch.tensor([9, 3])),
            ValueError,
            "key_lengths must lie in [0, 8]",
        ),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize(
    "q, k, v, kwargs, error, words", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_inputs_raise_naming_the_argument(q, k, v, kwargs, error, words):
    with pytest.raises(error) as info:
        F.flash_attention(q, k, v, **kwargs)
    assert words in str(info.value)


# ---------------------------------------------------------------- CUDA (compiled kernels)


def sdpa(q, k, v, causal):
    """torch's SDPA with kv heads repeated for GQA (is_causal is top-left aligned: Tq = Tk)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def max_errors(actual, expected):
    return [
        (a.double() - e.double()).abs().max().item() for a, e in zip(actual, expected, strict=True)
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "B, H, Hkv, T, D",
    [(2, 16, 16, 2048, 128), (2, 16, 4, 2048, 64), (1, 8, 8, 1024, 256), (1, 4, 2, 16384, 128)],
)
def test_cuda_matches_sdpa(B, H, Hkv, T, D, causal, dtype):
    """Our error against an fp32 SDPA is at most twice SDPA's own (in the same dtype) plus a
    small floor, for the output and all gradients."""
    q, k, v, do = make_inputs(B, H, Hkv, T, T, D, dtype, device="cuda")
    ours = value_and_grads(F.flash_attention, q, k, v, do, causal=causal)
    theirs = value_and_grads(sdpa, q, k, v, do, causal=causal)
    exact = value_and_grads(sdpa, q.float(), k.float(), v.float(), do.float(), causal=causal)
    floor = 2e-3 if dtype == torch.float16 else 1.6e-2
    for name, ours_err, theirs_err in zip(
        ("out", "dq", "dk", "dv"), max_errors(ours, exact), max_errors(theirs, exact), strict=True
    ):
        assert ours_err <= 2 * theirs_err + floor, (name, ours_err, theirs_err)


CUDA_CASES = {name: case for name, case in CASES.items() if case[-1] != torch.bfloat16} | {
    "bf16-causal-lengths": (3, 4, 2, 1000, 1000, 128, True, [0, 999, 1000], torch.bfloat16),
    "fp16-q>k-d256": (2, 2, 1, 300, 77, 256, True, [77, 40], torch.float16),
    "fp32-d256": (1, 2, 2, 200, 333, 256, True, None, torch.float32),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES.values(), ids=CUDA_CASES.keys())
def test_cuda_masks_lengths_and_odd_shapes(case):
    B, H, Hkv, Tq, Tk, D, causal, lengths, dtype = case
    q, k, v, do = make_inputs(B, H, Hkv, Tq, Tk, D, dtype, device="cuda")
    lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
    kwargs = dict(causal=causal, key_lengths=lengths)
    kernel = value_and_grads(F.flash_attention, q, k, v, do, **kwargs)
    twin = value_and_grads(
        flash_attn.attention_reference, q.double(), k.double(), v.double(), do.double(), **kwargs
    )
    tol = dict(atol=2e-4, rtol=1e-3) if dtype == torch.float32 else TOLERANCE[dtype]
    assert_all_close(kernel, twin, **tol)


@pytest.mark.cuda
def test_cuda_fused_qkv_views_and_deterministic_backward():
    B, T, H, Hkv, D = 2, 1500, 8, 2, 64
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=gen).to("cuda", torch.bfloat16)
    qkv.requires_grad_()
    do = torch.randn(B, H, T, D, generator=gen).to("cuda", torch.bfloat16)
    lengths = torch.tensor([T, 1000], device="cuda")

    def run():
        q = qkv[:, :, :H].transpose(1, 2)
        k = qkv[:, :, H : H + Hkv].transpose(1, 2)
        v = qkv[:, :, H + Hkv :].transpose(1, 2)
        out = F.flash_attention(q, k, v, causal=True, key_lengths=lengths)
        return out, torch.autograd.grad(out, qkv, do)[0]

    (out1, grad1), (out2, grad2) = run(), run()
    assert torch.equal(out1, out2) and torch.equal(grad1, grad2)
    fused = qkv.detach().float().requires_grad_()
    parts = (fused[:, :, :H], fused[:, :, H : H + Hkv], fused[:, :, H + Hkv :])
    expected = flash_attn.attention_reference(
        *(p.transpose(1, 2) for p in parts), causal=True, key_lengths=lengths
    )
    (expected_grad,) = torch.autograd.grad(expected, fused, do.float())
    torch.testing.assert_close(out1.float(), expected, **TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(grad1.float(), expected_grad, **TOLERANCE[torch.bfloat16])
