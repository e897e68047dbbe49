"""A small causal transformer built from plain nn modules, its data, and the per-example
gradient oracle (torch.func on an unconverted float64 copy) for the engine tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x, causal_mask, key_padding_mask):
        h = self.ln1(x)
        x = (
            x
            + self.attn(
                h,
                h,
                h,
                attn_mask=causal_mask,
                key_padding_mask=key_padding_mask,
                need_weights=False,
            )[0]
        )
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token and position embeddings, `blocks` pre-norm blocks of causal self-attention and
    MLP, a final LayerNorm and a head. The MLP width 160 > 128 gives the MLP weights two
    block-clipping tiles (rows for fc1, columns for fc2)."""

    def __init__(self, vocab=11, d=32, heads=2, mlp=160, max_len=8, blocks=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, mlp) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, key_padding_mask=None):
        batch, length = ids.shape
        positions = torch.arange(length, device=ids.device).expand(batch, length)
        x = self.tok(ids) + self.pos(positions)
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)
        for block in self.blocks:
            x = block(x, causal, key_padding_mask)
        return self.head(self.norm(x))


def make_model(seed=0, **kwargs) -> TinyTransformer:
    torch.manual_seed(seed)
    model = TinyTransformer(**kwargs)
    with torch.no_grad():  # non-trivial norm parameters, so that their gradients are generic
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


def make_batch(batch=4, length=8, vocab=11, padded=True, seed=1):
    """ids [B, T], next-token targets (-100 on padding), and the right-padding mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g) if padded else None
    if lengths is None:
        mask = torch.zeros(batch, length, dtype=torch.bool)
    else:
        mask = torch.arange(length)[None, :] >= lengths[:, None]
    targets = torch.roll(ids, -1, dims=1).masked_fill(mask | torch.roll(mask, -1, dims=1), -100)
    targets[:, -1] = -100
    return ids, targets, (mask if padded else None)


def example_losses(logits, targets):
    """Per-example loss: mean next-token cross entropy over the example's real targets."""
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return ce.sum(1) / (targets != -100).sum(1).clamp(min=1)


def per_example_grads(model: nn.Module, ids, targets, mask) -> dict[str, torch.Tensor]:
    """{parameter name: [B, *shape] float64 per-example gradients} of an unconverted model."""
    model = model.double()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, ids_i, targets_i, mask_i):
        mask_i = None if mask_i is None else mask_i[None]
        logits = functional_call(model, p, (ids_i[None], mask_i))
        return example_losses(logits, targets_i[None])[0]

    in_dims = (None, 0, 0, None if mask is None else 0)
    return vmap(grad(loss), in_dims=in_dims)(params, ids, targets, mask)


def _groups(per_example, style, tile, linear_layers):
    """Privacy groups as lists of (parameter name, index into its [B, *shape] gradient)."""
    everything = (slice(None),)
    if style == "flat":
        return [[(n, everything) for n in per_example]]
    layers = {}
    for n in per_example:
        layers.setdefault(n.rsplit(".", 1)[0], []).append(n)
    if style == "per-layer":
        return [[(n, everything) for n in names] for names in layers.values()]
    rows, cols = tile
    groups = []
    for layer, names in layers.items():
        weight = f"{layer}.in_proj_weight" if f"{layer}.in_proj_weight" in names else None
        weight = weight or (f"{layer}.weight" if layer in linear_layers else None)
        if weight is None:  # norm layers and embeddings: one group each
            groups.append([(n, everything) for n in names])
            continue
        bias = weight.replace("weight", "bias")
        dout, din = per_example[weight].shape[1:]
        matrices = 3 if "in_proj" in weight else 1  # Q, K, V are separate matrices
        for m in range(matrices):
            lo, hi = m * dout // matrices, (m + 1) * dout // matrices
            for o in range(lo, hi, rows):
                r = slice(o, min(o + rows, hi))
                for k in range(0, din, cols):
                    group = [(weight, (slice(None), r, slice(k, k + cols)))]
                    if k == 0 and bias in names:
                        group.append((bias, (slice(None), r)))
                    groups.append(group)
    return groups


def clipped_sums(per_example, style: str, max_grad_norm: float, linear_layers=(), tile=None):
    """Σ_i of the per-example gradients clipped per the style's definition (docs/design.md §1):
    flat over the whole gradient; per-layer per DP layer at C/√K; block per weight tile (with
    its bias slice) and per small layer, at C/√K over all groups. linear_layers: names of the
    nn.Linear modules (block style)."""
    groups = _groups(per_example, style, tile, linear_layers)
    threshold = max_grad_norm / len(groups) ** 0.5
    out = {n: torch.zeros_like(g[0]) for n, g in per_example.items()}
    for group in groups:
        sq = sum(per_example[n][index].flatten(1).square().sum(1) for n, index in group)
        factors = torch.clamp(threshold / (sq.sqrt() + 1e-6), max=1.0)
        for n, index in group:
            part = per_example[n][index]
            out[n][index[1:]] += torch.einsum("b,b...->...", factors, part)
    return out
