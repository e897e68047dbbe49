"""Head dims that are not a power of two >= 16 (the flash attention kernels pad their tiles):
PrivacyEngine on a small transformer whose nn.MultiheadAttention has head dim 8
(`nn.MultiheadAttention(32, 4)`) or 96 (Phi-3, GPT-NeoX-20B) releases, without noise, the
clipped sum of the torch.func oracle's per-example gradients, through the Triton kernels
(interpreter) and through the PyTorch twins."""

import copy

import pytest
import torch
from torch import nn

import dp_attn.functional as DF
from dp_attn.engine import PrivacyEngine
from dp_attn.functional import BLOCK_CLIP_TILE
from dp_attn.nn import DPMultiheadAttention
from tests.test_engine import BATCH, close, loader_of, train_step
from tests.tiny_models import clipped_sums, make_batch, make_model, per_example_grads

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

# head dim: (model width, heads)
SHAPES = {8: (32, 4), 96: (96, 1)}


@pytest.mark.parametrize("path", ["kernels", "twins"])
@pytest.mark.parametrize("head_dim", SHAPES)
def test_release_equals_oracle(head_dim, path, monkeypatch):
    if path == "twins":
        monkeypatch.setattr(DF, "use_triton", lambda *tensors: False)
    width, heads = SHAPES[head_dim]
    model = make_model(d=width, heads=heads, mlp=2 * width)
    ids, targets, mask = make_batch(batch=BATCH, padded=True)
    per_example = per_example_grads(copy.deepcopy(model), ids, targets, mask)
    norms = sum(g.flatten(1).square().sum(1) for g in per_example.values()).sqrt()
    max_grad_norm = float(norms.median())  # binds for some examples, not for others

    engine = PrivacyEngine()
    model, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader_of(),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        clipping="flat",
    )
    attention = [m for m in model.modules() if isinstance(m, DPMultiheadAttention)]
    assert attention and all(m.head_dim == head_dim for m in attention)
    train_step(model, optimizer, ids, targets, mask)

    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    want = clipped_sums(per_example, "flat", max_grad_norm, linear, BLOCK_CLIP_TILE)
    for name, p in model.named_parameters():
        close(p.grad, want[name] / BATCH, msg=name)
    unclipped = {n: g.sum(0) / BATCH for n, g in per_example.items()}
    assert any(
        (p.grad.double() - unclipped[n]).abs().max() > 1e-3 for n, p in model.named_parameters()
    )
