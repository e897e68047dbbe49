"""torch.compile: flash attention is a pair of torch.library custom ops, so a compiled model that
calls it has no graph break and gets the eager outputs and gradients; a model with a
PrivacyEngine attached compiles with a graph break at each DP layer (its backward hands
per-example material to the engine and runs eagerly), releases the eager gradient, and fails
under fullgraph=True naming the engine function that is never compiled."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import dp_attn
from dp_attn.kernels import flash_attn
from dp_attn.kernels.utils import interpreting
from dp_attn.nn import DPMultiheadAttention
from tests.test_engine import private, released, train_step
from tests.tiny_models import make_batch, make_model

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class FusedSelfAttention(nn.Module):
    """One QKV projection with grouped kv heads (GQA) and dp_attn.flash_attention."""

    def __init__(self, d=32, heads=4, kv_heads=2, head_dim=16):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * head_dim)
        self.out = nn.Linear(heads * head_dim, d)

    def forward(self, x, key_lengths=None):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        o = dp_attn.flash_attention(q, k, v, causal=True, key_lengths=key_lengths)
        return self.out(o.transpose(1, 2).reshape(B, T, -1))


def select_path(path, monkeypatch):
    """ "kernel-ops": the custom ops, whose kernels run on CPU tensors only in a process started
    with TRITON_INTERPRET=1 (Triton decides at import); "reference": the PyTorch path."""
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not interpreting():
        pytest.skip("the kernels run on CPU tensors only with TRITON_INTERPRET=1")


def outputs_and_grads(module, *args):
    module.zero_grad()
    x = args[0].detach().requires_grad_()
    out = module(x, *args[1:])
    out.square().sum().backward()
    return [out.detach(), x.grad, *(p.grad for p in module.parameters())]


def attention_inputs(B=3, T=20, d=32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(B, T, d, generator=gen), torch.tensor([20, 7, 0])


@pytest.mark.parametrize("path", ["kernel-ops", "reference"])
def test_flash_attention_compiles_without_graph_break(path, monkeypatch):
    """Kernel path (the custom ops, run by the interpreter) and reference path alike: one graph,
    and the compiled model's output and every gradient equal the eager ones."""
    select_path(path, monkeypatch)
    torch.manual_seed(0)
    module = FusedSelfAttention()
    x, lengths = attention_inputs()
    explained = torch._dynamo.explain(module)(x, lengths)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()

    eager = outputs_and_grads(module, x, lengths)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got = outputs_and_grads(compiled, x, lengths)
    for a, e in zip(got, eager, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def test_compiled_graph_calls_the_custom_ops(monkeypatch):
    """The traced forward and backward graphs hold the registered ops, not a fallback."""
    select_path("kernel-ops", monkeypatch)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    module = FusedSelfAttention()
    x, lengths = attention_inputs()
    compiled = torch.compile(module, fullgraph=True, backend=aot_autograd(fw_compiler=backend))
    compiled(x, lengths).sum().backward()
    assert "dp_attn.flash_attention_fwd.default" in seen
    assert "dp_attn.flash_attention_bwd.default" in seen


@pytest.mark.parametrize("path", ["kernel-ops", "reference"])
def test_compiled_flash_attention_refuses_bad_key_lengths(path, monkeypatch):
    """The key-length range check survives compilation: inside the forward op (kernel path,
    ValueError) or as an assertion in the graph (reference path, RuntimeError)."""
    select_path(path, monkeypatch)
    module = FusedSelfAttention()
    x, _ = attention_inputs()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    compiled(x, torch.tensor([20, 7, 0]))
    error = ValueError if path == "kernel-ops" else RuntimeError
    with pytest.raises(error, match=r"key_lengths must lie in \[0, 20\]"):
        compiled(x, torch.tensor([21, 7, 0]))


@pytest.mark.cuda
def test_flash_attention_compiles_with_inductor_cuda():
    """The compiled kernels inside an Inductor-compiled model: no graph break, the eager
    output and gradients (fp32: the same flash kernels, cuBLAS or Inductor for the rest)."""
    torch.manual_seed(0)
    module = FusedSelfAttention(d=128, heads=4, kv_heads=2, head_dim=32).cuda()
    x = torch.randn(2, 300, 128, device="cuda")
    lengths = torch.tensor([300, 120], device="cuda")
    eager = outputs_and_grads(module, x, lengths)
    compiled = torch.compile(module, fullgraph=True)
    for a, e in zip(outputs_and_grads(compiled, x, lengths), eager, strict=True):
        torch.testing.assert_close(a, e, atol=1e-3 * e.abs().max().item(), rtol=1e-3)


def test_flash_attention_ops_pass_opcheck(monkeypatch):
    """Schema, fake (meta) functions, autograd registration and AOT dispatch with dynamic
    shapes, for GQA with key lengths and causal masking."""
    select_path("kernel-ops", monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=gen)
    k, v = (torch.randn(2, 2, 11, 16, generator=gen) for _ in range(2))
    lengths = torch.tensor([11, 3])
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, lengths)
    torch.library.opcheck(flash_attn.flash_attention_fwd, args)
    out, lse = flash_attn.flash_attention_fwd(*args)
    do = torch.randn(out.shape, generator=gen)
    detached = [t.detach() for t in (q, k, v, out)]
    torch.library.opcheck(flash_attn.flash_attention_bwd, (do, *detached, lse, True, 0.25, lengths))


def test_dp_multihead_attention_without_engine_compiles_in_one_graph():
    torch.manual_seed(0)
    attention = DPMultiheadAttention(32, 2)
    x = torch.randn(2, 10, 32)

    def forward(x):
        return attention(x, x, x, need_weights=False, is_causal=True)[0]

    explained = torch._dynamo.explain(forward)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), forward(x), atol=1e-6, rtol=1e-5)


def one_private_step(model, clipping, forward=None):
    _, model, optimizer, _ = private(model, clipping, max_grad_norm=0.5)
    train_step(model if forward is None else forward, optimizer, *make_batch(batch=4, padded=True))
    return released(model)


@pytest.mark.parametrize("clipping", ["flat", "per-layer"])
def test_private_model_compiles_with_graph_breaks_and_releases_the_eager_gradient(clipping):
    """noise_multiplier=0: the compiled private transformer (embeddings, LayerNorm,
    DPMultiheadAttention with key padding, Linear) releases the gradient of the eager one, with
    clipping at the end of the backward pass (flat) or inside each layer's backward."""
    model = make_model(blocks=1)
    eager = one_private_step(copy.deepcopy(model), clipping)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    got = one_private_step(compiled_model, clipping, forward=compiled)
    assert got.keys() == eager.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, eager[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().max() > 0 for g in got.values())


def test_private_model_fails_under_fullgraph_naming_the_uncompiled_function():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2))
    _, model, _, _ = private(model, "flat")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"Clipper\.record"):
        compiled(torch.randn(4, 8))
