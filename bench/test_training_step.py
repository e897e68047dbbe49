"""One DP-SGD training step of a GPT-2-small-like model on a GPU: time and peak memory.

Model: token and position embeddings, 4 pre-norm blocks (d = 768, 12 heads, MLP 3072), final
LayerNorm, head to a 4096-token vocabulary; bf16 parameters and activations; causal LM loss
(mean cross entropy); SGD. Fixed batch B = 8 sequences, T from 512 to 16k.

Methods (same architecture):
- "non-private SDPA": nn.Linear Q/K/V/O around torch's scaled_dot_product_attention — the
  baseline every ratio is taken against;
- "non-private flash": the nn.MultiheadAttention model with dp_attn's layers and no engine
  (dp_attn.flash_attention, plain autograd);
- "ours flat" / "ours per-layer" / "ours block": the nn.MultiheadAttention model made private
  with dp_attn.PrivacyEngine (z = 1, C = 1, secure_mode on: the default; Opacus runs with its
  default, secure_mode off);
- "opacus hooks" / "opacus ghost": Opacus 1.6 on the SDPA model (only its nn.Linear,
  nn.LayerNorm and nn.Embedding layers hold parameters), grad_sample_mode "hooks" and "ghost"
  (skipped if opacus is not installed).

A method that runs out of memory at some T is recorded as OOM there and not run at larger T.
At the end a table prints step time and peak memory per method and T with the ratios to
non-private SDPA, and the longest T each method ran.

    TRITON_INTERPRET=0 python -m pytest bench/test_training_step.py --benchmark-json=out.json
    DP_ATTN_BENCH_QUICK=1 ...   # T in {1k, 4k, 16k} (one GPU lease: bench/run_gpu_suite.sh)
"""

from __future__ import annotations

import gc
import os
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)",
)

QUICK = os.environ.get("DP_ATTN_BENCH_QUICK", "0") == "1"
SEQ_LENS = [1024, 4096, 16384] if QUICK else [512, 1024, 2048, 4096, 8192, 16384]
BATCH, WIDTH, HEADS, MLP, BLOCKS, VOCAB = 8, 768, 12, 3072, 4, 4096
METHODS = [
    "non-private SDPA",
    "non-private flash",
    "ours flat",
    "ours per-layer",
    "ours block",
    "opacus hooks",
    "opacus ghost",
]
BASELINE = METHODS[0]
SLOW_STEP_S = 20.0  # a method slower than this per step is not run at larger T
DEVICE = "cuda"
_RESULTS: dict[tuple[str, int], tuple[float, float] | str] = {}  # (ms, GiB) or why not run
_STOPPED: dict[str, str] = {}  # method -> why it is not run at larger T


class SDPABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, MLP), nn.Linear(MLP, WIDTH)

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, length, 3, HEADS, -1).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(batch, length, WIDTH))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class MHABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(WIDTH, MLP), nn.Linear(MLP, WIDTH)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, is_causal=True, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, block: type[nn.Module], max_len: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(max_len, WIDTH)
        self.blocks = nn.Sequential(*(block() for _ in range(BLOCKS)))
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        # contiguous ids: Opacus' ghost-norm sampler for embeddings needs them
        positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        return self.head(self.norm(self.blocks(self.tok(ids) + self.pos(positions))))


def _loader():
    """Only its batch size and dataset size matter (q = B / N); batches come from _data."""
    return DataLoader(TensorDataset(torch.zeros(1000 * BATCH, 1)), batch_size=BATCH)


def _build(method: str, length: int):
    """A zero-argument function running one training step (forward, backward, optimizer)."""
    torch.manual_seed(0)
    block = SDPABlock if method == BASELINE or method.startswith("opacus") else MHABlock
    model = GPT(block, length).to(DEVICE, torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, length + 1), device=DEVICE)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def loss_of(logits):
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))

    if method == "non-private flash":
        from dp_attn.engine import convert_module

        convert_module(model)  # DP layers without an engine: their nn behaviour
    elif method.startswith("ours"):
        from dp_attn import PrivacyEngine

        model, optimizer, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=_loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            clipping=method.split()[1],
        )
    elif method.startswith("opacus"):
        opacus = pytest.importorskip("opacus")
        mode = method.split()[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = opacus.PrivacyEngine(accountant="prv").make_private(
                module=model,
                optimizer=optimizer,
                data_loader=_loader(),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                grad_sample_mode=mode,
                criterion=nn.CrossEntropyLoss(),
                poisson_sampling=False,
            )
        if mode == "ghost":
            model, optimizer, criterion, _ = private

            def loss_of(logits):
                logits = logits.float().reshape(-1, VOCAB)
                return criterion(logits, y.reshape(-1), shape=(BATCH, length))
        else:
            model, optimizer, _ = private

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        optimizer.step()
        torch.cuda.synchronize()

    return step


def _release_memory():
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize(
    ("method", "length"),
    [(m, t) for m in METHODS for t in SEQ_LENS],
    ids=[f"{m.replace(' ', '_')}-T{t}" for m in METHODS for t in SEQ_LENS],
)
def test_training_step(benchmark, method, length):
    if method in _STOPPED:
        _RESULTS[(method, length)] = _STOPPED[method]
        pytest.skip(f"{method} is not run beyond the T where it was {_STOPPED[method]}")
    _release_memory()
    try:
        step = _build(method, length)
        start = time.perf_counter()
        step()  # warm-up: compiles the kernels, allocates the optimizer state
        slow = time.perf_counter() - start > SLOW_STEP_S
        torch.cuda.reset_peak_memory_stats()
        if slow:  # one timed step, and no larger T
            start = time.perf_counter()
            step()
            ms = 1e3 * (time.perf_counter() - start)
            _STOPPED[method] = "slow"
        else:
            benchmark.pedantic(step, rounds=max(3, 8192 // length), iterations=1)
            ms = 1e3 * benchmark.stats.stats.median
        gib = torch.cuda.max_memory_allocated() / 2**30
        _RESULTS[(method, length)] = (ms, gib)
        benchmark.extra_info.update({"method": method, "T": length, "peak_gib": gib, "time_ms": ms})
    except torch.cuda.OutOfMemoryError:
        _RESULTS[(method, length)] = _STOPPED[method] = "OOM"
    finally:
        step = None
        _release_memory()


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is None or not _RESULTS:
        return
    reporter.section(f"training step, B = {BATCH}: ms and GiB (ratio to {BASELINE})")
    reporter.write_line(f"{'method':<20}" + "".join(f"{f'T={t}':>26}" for t in SEQ_LENS))
    for method in METHODS:
        cells = []
        for length in SEQ_LENS:
            result, base = _RESULTS.get((method, length)), _RESULTS.get((BASELINE, length))
            if result is None or isinstance(result, str):
                cells.append(f"{result or '-':>26}")
                continue
            ms, gib = result
            if isinstance(base, tuple):
                cells.append(f"{ms:7.0f} ({ms / base[0]:4.2f}x) {gib:5.1f} ({gib / base[1]:4.2f}x)")
            else:
                cells.append(f"{ms:7.0f}         {gib:5.1f}       ")
        reporter.write_line(f"{method:<20}" + "".join(f"{c:>26}" for c in cells))
    for method in METHODS:
        ran = [t for t in SEQ_LENS if isinstance(_RESULTS.get((method, t)), tuple)]
        reporter.write_line(f"longest T run by {method}: {max(ran) if ran else 'none'}")
