"""Train a tiny causal transformer with differential privacy, on CPU in about a minute.

The model is ordinary PyTorch (nn.Embedding, nn.MultiheadAttention(batch_first=True),
nn.Linear, nn.LayerNorm); three lines make the training private:

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(...)
    ...
    engine.get_epsilon(delta)

The corpus is the Zen of Python (it ships with Python: no download), cut into overlapping
character windows; one window is one example (the privacy unit).

    python examples/train_tiny_transformer.py [--epsilon 8] [--epochs 12] [--clipping flat]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_attn import PrivacyEngine

DELTA = 1e-5


def zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        import this
    return codecs.decode(this.s, "rot13")  # kept rot13-encoded in the module


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, length: int, d: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.head(self.norm(self.blocks(self.tok(ids) + self.pos(positions))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--clipping", default="flat", choices=["flat", "per-layer", "block"])
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    text = zen_of_python()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    windows = ids.unfold(0, args.length + 1, 1)  # [N, length + 1]: inputs and next chars
    dataset = TensorDataset(windows[:, :-1], windows[:, 1:])
    loader = DataLoader(dataset, batch_size=args.batch_size)

    model = TinyGPT(len(chars), args.length)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=args.epsilon,
        target_delta=DELTA,
        epochs=args.epochs,
        max_grad_norm=args.max_grad_norm,
        clipping=args.clipping,
    )
    print(
        f"{len(dataset)} examples, q = {loader.sample_rate:.4f}, {len(loader)} steps per epoch, "
        f"noise multiplier {optimizer.noise_multiplier:.3f} for (ε = {args.epsilon}, δ = {DELTA})"
    )

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses = []
        for x, y in loader:
            optimizer.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits.transpose(1, 2), y)  # mean over examples and tokens
            loss.backward()
            optimizer.step()
            if len(x):  # an empty Poisson batch still takes a (pure-noise) step
                losses.append(loss.item())
        mean = sum(losses) / max(1, len(losses))
        print(
            f"epoch {epoch:2d}  loss {mean:.3f}  ε = {engine.get_epsilon(DELTA):.2f}  "
            f"({time.perf_counter() - start:.0f} s)"
        )
    stats = engine.stats
    print(
        f"done: {stats.steps} steps, {stats.examples} examples seen; this run is "
        f"({engine.get_epsilon(DELTA):.2f}, {DELTA})-DP for adding or removing one window"
    )


if __name__ == "__main__":
    main()
