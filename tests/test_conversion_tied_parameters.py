"""Tied embeddings (issue 12): one weight used as an input embedding and as the output head
(GPT-2, LLaMA-3.2, Qwen2.5, Gemma, T5 by default). Its per-example gradient is the sum over
both uses, so its norm needs their cross term; the noise-free release equals the torch.func
oracle of the unconverted model for every clipping style on both backends, a cancelling cross
term cannot push a release past C, and any other sharing is refused naming both layers."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import dp_attn.functional as DF
from dp_attn.engine import PrivacyEngine

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB, DIM, BATCH, LENGTH = 13, 8, 4, 5


class TiedLM(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def loss_of(model, ids, targets):
    logits = model(ids)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def per_example_grads(model, ids, targets):
    params = {n: p.detach() for n, p in model.named_parameters()}  # the tied weight once

    def loss(p, i, t):
        return loss_of(lambda x: functional_call(model, p, (x,)), i[None], t[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, ids, targets)


# The privacy groups of TiedLM: the tied embedding + head (with the head's bias), and mix.
GROUPS = {"emb.weight": "tied", "head.bias": "tied", "mix.weight": "mix", "mix.bias": "mix"}


def expected(per_example, style, max_grad_norm):
    """Σ_i clip(g_i) / (q·N): flat clips the whole gradient; per-layer and block (whose groups
    here are the same two: the tied pair is one group, mix's 8×8 weight one tile) clip each
    group at C/√2."""
    if style == "flat":
        groups, threshold = dict.fromkeys(GROUPS, "all"), max_grad_norm
    else:
        groups, threshold = GROUPS, max_grad_norm / math.sqrt(2)
    sq = {}
    for name, g in per_example.items():
        sq[groups[name]] = sq.get(groups[name], 0) + g.flatten(1).square().sum(1)
    out = {}
    for name, g in per_example.items():
        factor = torch.clamp(threshold / (sq[groups[name]].sqrt() + 1e-6), max=1.0)
        out[name] = torch.einsum("b,b...->...", factor, g) / BATCH
    return out


def release(model, ids, targets, style, max_grad_norm):
    engine = PrivacyEngine()
    loader = DataLoader(TensorDataset(torch.zeros(2 * BATCH, 1)), batch_size=BATCH)
    model, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        clipping=style,
    )
    optimizer.zero_grad()
    loss_of(model, ids, targets).backward()
    optimizer.step()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(params=["kernels", "twins"])
def backend(request, monkeypatch):
    if request.param == "twins":
        monkeypatch.setattr(DF, "use_triton", lambda *tensors: False)


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("style", ["flat", "per-layer", "block"])
def test_tied_release_equals_oracle(style, padding_idx, backend):
    torch.manual_seed(0)
    model = TiedLM(padding_idx)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
    targets = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
    per_example = per_example_grads(copy.deepcopy(model), ids, targets)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_example.values()))
    max_grad_norm = float(norms.median())  # binds for some examples
    want = expected(per_example, style, max_grad_norm)
    got = release(model, ids, targets, style, max_grad_norm)
    assert got.keys() == want.keys()
    for name, g in got.items():
        scale = want[name].abs().max()
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    if padding_idx is not None:  # the head trains the padding row: it is released
        assert got["emb.weight"][padding_idx].abs().max() > 0


@pytest.mark.parametrize("direction", ["aligned", "cancelling"])
def test_both_uses_of_a_row_stay_clipped(direction, backend):
    """One example whose embedding row gets v and whose head row gets ±v (+ a small r): aligned,
    the tied gradient is 2v, which a bound without the cross term would release at √2·C;
    cancelling, it is small while both uses are huge. Either way: at most C·(1 + 1e-5)."""
    model = nn.Module()
    model.emb, model.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB, bias=False)
    model.head.weight = model.emb.weight
    engine = PrivacyEngine()
    loader = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1)
    model, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
    )
    gen = torch.Generator().manual_seed(3)
    v, r = torch.randn(DIM, generator=gen) * 1e4, torch.randn(DIM, generator=gen)
    x = v if direction == "aligned" else -v + 1e-3 * r  # the head's input at its one position
    w_head = torch.zeros(1, 1, VOCAB)
    w_head[0, 0, 5] = 1.0  # the head's output gradient: row 5 gets 1·x
    optimizer.zero_grad()
    loss = (model.emb(torch.tensor([[5]])) * v).sum() + (model.head(x[None, None]) * w_head).sum()
    loss.backward()
    optimizer.step()
    released = float(model.emb.weight.grad.double().norm())
    assert released <= 1.0 + 1e-5
    if direction == "aligned":  # clipped to C, not below it
        assert released >= 1.0 - 1e-4


def test_other_shared_parameters_are_refused_naming_both_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    engine = PrivacyEngine()
    with pytest.raises(ValueError, match=r"DP layers 0 and 1 share it"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


@pytest.mark.parametrize("order", ["emb-head-head", "head-emb-head", "head-head-emb"])
def test_an_embedding_tied_to_two_heads_is_refused_in_any_module_order(order):
    """One weight as an embedding and two heads: its per-example gradient sums three uses,
    whose bound held only the embedding-first-head cross term (two aligned heads released
    1.414·C, four 2.0·C, when the embedding came first in named_modules). Only one head is
    supported: refused, naming the layers, whatever the order of the modules."""
    model = nn.Module()
    for name in order.split("-"):
        index = sum(1 for n in dict(model.named_children()) if n.startswith(name))
        layer = nn.Embedding(VOCAB, DIM) if name == "emb" else nn.Linear(DIM, VOCAB, bias=False)
        model.add_module(f"{name}{index}", layer)
    weight = model.emb0.weight
    model.head0.weight = model.head1.weight = weight
    with pytest.raises(ValueError, match=r"DP layers head0 and head1 (both use|share)"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    assert all(type(m) in (nn.Module, nn.Embedding, nn.Linear) for m in model.modules())


def test_opacus_per_parameter_thresholds_cover_a_tied_group():
    """Opacus' per_layer list (one threshold per parameter): the tied group's threshold is
    sqrt(Σ C_p²) over the tied weight and the head's bias, and mix's over its two."""
    model = TiedLM()
    engine = PrivacyEngine()
    thresholds = [1.0, 2.0, 2.0, 3.0]  # emb.weight, mix.weight, mix.bias, head.bias
    engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=thresholds,
        clipping="per_layer",
    )
    by_layer = engine._clipper.layer_thresholds
    assert by_layer[model.emb] == by_layer[model.head] == pytest.approx(math.sqrt(1 + 9))
    assert by_layer[model.mix] == pytest.approx(math.sqrt(8))
