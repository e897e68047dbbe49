"""DP layers (dp_attn.nn): equal to their nn counterparts without an engine; with one, exact
input gradients and per-example material whose norms and sums match torch.func oracles."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dp_attn.nn import DPEmbedding, DPLayerNorm, DPLinear, DPMultiheadAttention, DPRMSNorm

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

B, T, D = 3, 5, 32
DP_LAYERS = (DPLinear, DPLayerNorm, DPRMSNorm, DPEmbedding, DPMultiheadAttention)


class Recorder:
    """Stands in for the engine: keeps what DP layers hand over in backward."""

    forward_token_shape = None

    def __init__(self):
        self.calls = []

    def record(self, owner, pieces):
        self.calls.append((owner, pieces))


def attach(module) -> Recorder:
    recorder = Recorder()
    for m in module.modules():
        if isinstance(m, DP_LAYERS):
            m.dp_clipper = recorder
    return recorder


def summed_grads(recorder, factors):
    """{param: Σ_i factors_i g_i} from the recorded pieces."""
    out = {}
    for _, pieces in recorder.calls:
        for piece in pieces:
            for param, rows, value in piece.clipped_sums(factors):
                acc = out.setdefault(param, torch.zeros(param.shape))
                acc[rows if rows is not None else slice(None)] += value
    return out


def oracle_per_example(module, loss_fn, *inputs):
    """Per-example gradients of loss_fn(module(*inputs_i)) for every parameter, by torch.func."""
    params = {n: p.detach() for n, p in module.named_parameters()}

    def loss(p, *xs):
        return loss_fn(functional_call(module, p, tuple(x[None] for x in xs)))

    return vmap(grad(loss), in_dims=(None, *([0] * len(inputs))))(params, *inputs)


def pair(make_nn, dp_cls, seed=0):
    torch.manual_seed(seed)
    ref = make_nn()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    dp = copy.deepcopy(ref)
    dp.__class__ = dp_cls
    if dp_cls is DPMultiheadAttention:
        dp.out_proj.__class__ = DPLinear
    return ref, dp


def close(actual, expected, tol=1e-5, msg=None):
    """Equal up to fp32 rounding: tol relative to each element and to the largest one."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=msg)


def weighted_loss(out):
    """A sum of per-example terms (the same function of each example's output)."""
    w = torch.linspace(-1.0, 1.0, out[0].numel()).view(out.shape[1:])
    return (out * w).sum() + out.square().sum()


LAYER_CASES = {
    "linear-seq": (lambda: nn.Linear(D, 24), DPLinear, lambda: torch.randn(B, T, D)),
    "linear-2d": (lambda: nn.Linear(D, 24), DPLinear, lambda: torch.randn(B, D)),
    "linear-4d": (lambda: nn.Linear(D, 24, bias=False), DPLinear, lambda: torch.randn(B, 2, 3, D)),
    "layernorm": (lambda: nn.LayerNorm(D), DPLayerNorm, lambda: torch.randn(B, T, D) * 2 + 1),
    "layernorm-2d-shape": (
        lambda: nn.LayerNorm((4, 8)),
        DPLayerNorm,
        lambda: torch.randn(B, T, 4, 8),
    ),
    "rmsnorm": (lambda: nn.RMSNorm(D), DPRMSNorm, lambda: torch.randn(B, T, D) * 2 + 1),
    "embedding": (
        lambda: nn.Embedding(7, D, padding_idx=2),
        DPEmbedding,
        lambda: torch.randint(0, 7, (B, T)),
    ),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_standalone_layer_is_its_nn_counterpart(case):
    make_nn, dp_cls, make_x = LAYER_CASES[case]
    ref, dp = pair(make_nn, dp_cls)
    x = make_x()
    xr, xd = (x.clone().requires_grad_(x.is_floating_point()) for _ in range(2))
    weighted_loss(ref(xr)).backward()
    weighted_loss(dp(xd)).backward()
    torch.testing.assert_close(dp(x), ref(x), rtol=0, atol=0)
    if x.is_floating_point():
        torch.testing.assert_close(xd.grad, xr.grad, rtol=0, atol=0)
    for (name, p), q in zip(dp.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", LAYER_CASES)
def test_private_layer_backward(case):
    """Engine attached: same output and input gradient as nn; no parameter .grad; the handed
    material gives each example's exact gradient norm and the exact (weighted) sum."""
    make_nn, dp_cls, make_x = LAYER_CASES[case]
    ref, dp = pair(make_nn, dp_cls)
    recorder = attach(dp)
    x = make_x()
    xr, xd = (x.clone().requires_grad_(x.is_floating_point()) for _ in range(2))
    out_ref, out_dp = ref(xr), dp(xd)
    close(out_dp, out_ref)
    weighted_loss(out_dp).backward()
    weighted_loss(out_ref).backward()
    if x.is_floating_point():
        close(xd.grad, xr.grad)
    assert all(p.grad is None for p in dp.parameters())
    assert [owner for owner, _ in recorder.calls] == [dp]

    per_example = oracle_per_example(ref, weighted_loss, x)
    oracle_sq = sum(g.flatten(1).square().sum(1) for g in per_example.values())
    ((_, pieces),) = recorder.calls
    sq = sum(piece.sq_norms() for piece in pieces)
    close(sq, oracle_sq)

    factors = torch.tensor([0.5, 0.0, 2.0])
    sums = summed_grads(recorder, factors)
    for (name, p), g in zip(dp.named_parameters(), per_example.values(), strict=True):
        want = torch.einsum("b,b...->...", factors, g)
        close(sums[p], want, msg=name)


def test_private_layer_partly_frozen_bias_only():
    """A frozen weight with a trainable bias (BitFit): only the bias is handed over."""
    ref, dp = pair(lambda: nn.Linear(D, 24), DPLinear)
    for m in (ref, dp):
        m.weight.requires_grad_(False)
    recorder = attach(dp)
    x = torch.randn(B, T, D)
    weighted_loss(dp(x)).backward()
    per_example = oracle_per_example(ref, weighted_loss, x)["bias"]
    ((_, (piece,)),) = recorder.calls
    close(piece.sq_norms(), per_example.square().sum(1))
    sums = summed_grads(recorder, torch.ones(B))
    assert list(sums) == [dp.bias]
    close(sums[dp.bias], per_example.sum(0))


# ---------------------------------------------------------------- multi-head attention


def causal_float(tq, tk):
    return torch.zeros(tq, tk).masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(1), -torch.inf)


def padding_mask(lengths, tk):
    return torch.arange(tk)[None, :] >= torch.tensor(lengths)[:, None]


ATTENTION_MASKS = {
    "none": {},
    "causal-float": {"attn_mask": causal_float(T, T)},
    "causal-bool+padding": {
        "attn_mask": torch.ones(T, T, dtype=torch.bool).triu(1),
        "key_padding_mask": padding_mask([5, 3, 2], T),
    },
    "padding-float": {
        "key_padding_mask": torch.zeros(B, T).masked_fill(padding_mask([4, 5, 1], T), -torch.inf)
    },
}


@pytest.mark.parametrize("masks", ATTENTION_MASKS)
def test_attention_matches_nn(masks):
    kwargs = ATTENTION_MASKS[masks]
    ref, dp = pair(lambda: nn.MultiheadAttention(D, 2, batch_first=True), DPMultiheadAttention)
    x = torch.randn(B, T, D)
    xr, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = ref(xr, xr, xr, need_weights=False, **kwargs)[0]
    out_dp, weights = dp(xd, xd, xd, need_weights=False, **kwargs)
    assert weights is None
    close(out_dp, out_ref)
    weighted_loss(out_ref).backward()
    weighted_loss(out_dp).backward()
    close(xd.grad, xr.grad)
    for (name, p), q in zip(dp.named_parameters(), ref.parameters(), strict=True):
        close(p.grad, q.grad, msg=name)


def test_attention_is_causal_flag_matches_causal_mask():
    _, dp = pair(lambda: nn.MultiheadAttention(D, 2, batch_first=True), DPMultiheadAttention)
    x = torch.randn(B, T, D)
    by_flag = dp(x, x, x, need_weights=False, is_causal=True)[0]
    by_mask = dp(x, x, x, need_weights=False, attn_mask=causal_float(T, T))[0]
    torch.testing.assert_close(by_flag, by_mask, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["self", "cross", "kdim"])
def test_private_attention_backward(kind):
    """Engine attached: exact input gradients, and the in-projection and out_proj material
    reproduces per-example norms and sums of nn.MultiheadAttention's gradients."""
    kdim = 16 if kind == "kdim" else None
    ref, dp = pair(
        lambda: nn.MultiheadAttention(D, 2, batch_first=True, kdim=kdim, vdim=kdim),
        DPMultiheadAttention,
    )
    recorder = attach(dp)
    q = torch.randn(B, T, D)
    kv = q if kind == "self" else torch.randn(B, 4, kdim or D)
    mask = padding_mask([4, 2, 3], kv.shape[1])

    def run(m, query, kv_):
        return m(query, kv_, kv_, key_padding_mask=mask, need_weights=False)[0]

    inputs_ref = [t.clone().requires_grad_() for t in ((q,) if kind == "self" else (q, kv))]
    inputs_dp = [t.detach().clone().requires_grad_() for t in inputs_ref]
    out_ref = run(ref, inputs_ref[0], inputs_ref[-1])
    out_dp = run(dp, inputs_dp[0], inputs_dp[-1])
    close(out_dp, out_ref)
    weighted_loss(out_ref).backward()
    weighted_loss(out_dp).backward()
    for a, b in zip(inputs_dp, inputs_ref, strict=True):
        close(a.grad, b.grad)
    assert all(p.grad is None for p in dp.parameters())
    owners = [owner for owner, _ in recorder.calls]
    assert owners == [dp.out_proj, dp] and isinstance(dp.out_proj, DPLinear)
    assert len(recorder.calls[1][1]) == (1 if kind == "self" else 3)

    class Wrapped(nn.Module):  # per-example oracle over (query, key/value) pairs
        def __init__(self):
            super().__init__()
            self.attn = ref

        def forward(self, query, kv_, mask_):
            return self.attn(query, kv_, kv_, key_padding_mask=mask_, need_weights=False)[0]

    per_example = oracle_per_example(Wrapped(), weighted_loss, q, kv, mask)
    groups = {dp: [n for n in per_example if "out_proj" not in n]}
    groups[dp.out_proj] = [n for n in per_example if "out_proj" in n]
    for owner, pieces in recorder.calls:
        oracle_sq = sum(per_example[n].flatten(1).square().sum(1) for n in groups[owner])
        sq = sum(piece.sq_norms() for piece in pieces)
        close(sq, oracle_sq)
    factors = torch.tensor([1.0, 0.25, 0.0])
    sums = summed_grads(recorder, factors)
    for (name, p), g in zip(dp.named_parameters(), per_example.values(), strict=True):
        want = torch.einsum("b,b...->...", factors, g)
        close(sums[p], want, msg=name)


def test_attention_refusals():
    with pytest.raises(ValueError, match="batch_first=True"):
        DPMultiheadAttention(D, 2, batch_first=False)
    with pytest.raises(ValueError, match="dropout"):
        DPMultiheadAttention(D, 2, dropout=0.1)
    with pytest.raises(ValueError, match="add_bias_kv"):
        DPMultiheadAttention(D, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match=r"head dim .* at most 256"):
        DPMultiheadAttention(512, 1)
    attn = DPMultiheadAttention(D, 2)
    x = torch.randn(B, T, D)
    with pytest.raises(ValueError, match="need_weights=False"):
        attn(x, x, x)
    with pytest.raises(ValueError, match="suffix"):
        attn(x, x, x, need_weights=False, key_padding_mask=~padding_mask([3, 5, 2], T))
    with pytest.raises(ValueError, match="causal mask"):
        attn(x, x, x, need_weights=False, attn_mask=torch.ones(T, T, dtype=torch.bool).tril(-1))
    with pytest.raises(ValueError, match="causal mask"):
        attn(x, x, x, need_weights=False, attn_mask=causal_float(T, T).expand(B * 2, T, T))
    with pytest.raises(ValueError, match="0 \\(keep\\) and -inf"):
        attn(x, x, x, need_weights=False, key_padding_mask=torch.full((B, T), -1.0))
    with pytest.raises(ValueError, match="batch-first query"):
        attn(x[0], x[0], x[0], need_weights=False)


def test_layer_refusals():
    with pytest.raises(ValueError, match="max_norm"):
        DPEmbedding(5, 4, max_norm=1.0)
    with pytest.raises(ValueError, match="sparse"):
        DPEmbedding(5, 4, sparse=True)
    with pytest.raises(ValueError, match="elementwise_affine"):
        DPLayerNorm(4, elementwise_affine=False)
    lin = DPLinear(4, 3)
    attach(lin)
    with pytest.raises(ValueError, match="batch dimension"):
        lin(torch.randn(4, requires_grad=True)).sum().backward()


def test_private_bf16_linear_runs():
    """bf16 activations: the handed material keeps its dtype and the sums come back in fp32."""
    lin = DPLinear(D, 16, dtype=torch.bfloat16)
    recorder = attach(lin)
    x = torch.randn(B, T, D, dtype=torch.bfloat16, requires_grad=True)
    F.gelu(lin(x)).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    ((_, (piece,)),) = recorder.calls
    sums = summed_grads(recorder, torch.ones(B))
    assert piece.sq_norms().dtype == torch.float32 and sums[lin.weight].dtype == torch.float32
