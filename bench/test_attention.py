"""Attention throughput on a GPU: dp_attn.flash_attention against every backend of torch's
scaled_dot_product_attention, forward, backward and forward+backward, in TFLOP/s.

bf16; B·T = 16k tokens and H·D = 2048 (D in {64, 128}); T from 512 to 16k; causal and not.
FLOPs: 4·B·H·T²·D forward (half when causal), 2.5× that backward. Inputs are laid out as
[B, T, H, D] (the output of a projection) and viewed as [B, H, T, D].

    TRITON_INTERPRET=0 python -m pytest bench/test_attention.py --benchmark-json=out.json
    DP_ATTN_BENCH_QUICK=1 ...   # T in {1k, 4k, 16k} (one GPU lease: bench/run_gpu_suite.sh)

At the end of the session a table per mode prints ours / best SDPA backend.
"""

import os

import pytest
import torch

from dp_attn.functional import flash_attention

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)",
)

QUICK = os.environ.get("DP_ATTN_BENCH_QUICK", "0") == "1"
TOKENS, WIDTH = 16 * 1024, 2048
SEQ_LENS = [1024, 4096, 16384] if QUICK else [512, 1024, 2048, 4096, 8192, 16384]
HEAD_DIMS = [64, 128]
MODES = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # FLOPs relative to the forward
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
PROVIDERS = ["ours", *(f"sdpa-{name.split('_')[0].lower()}" for name in SDPA_BACKENDS)]
# Short calls run several times per timed round, so that launch latency stays hidden as in a
# training loop (the GPU queue runs ahead of Python).
MIN_WORK_TOKENS = 4096


def _attention(provider: str):
    if provider == "ours":
        return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[PROVIDERS.index(provider) - 1])

    def sdpa(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return sdpa


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("T", SEQ_LENS)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_attention_tflops(benchmark, record_comparison, D, T, causal, mode, provider):
    B, H = TOKENS // T, WIDTH // D
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensor():
        x = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        return x.transpose(1, 2).requires_grad_()

    q, k, v = tensor(), tensor(), tensor()
    attention = _attention(provider)
    try:
        out = attention(q, k, v, causal)
    except RuntimeError as error:  # an SDPA backend unavailable for this GPU or shape
        pytest.skip(f"{provider}: {error}")
    do = torch.randn_like(out)

    if mode == "fwd":
        step = lambda: attention(q, k, v, causal)
    elif mode == "bwd":
        step = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    else:
        step = lambda: torch.autograd.grad(attention(q, k, v, causal), (q, k, v), do)
    calls = max(1, MIN_WORK_TOKENS // T)

    def timed():
        for _ in range(calls):
            step()
        torch.cuda.synchronize()

    timed()  # compile and autotune outside the timed rounds
    benchmark.group = f"{mode} D={D} T={T} {'causal' if causal else 'dense'}"
    benchmark.pedantic(timed, rounds=5 if T >= 4096 else 10, iterations=1, warmup_rounds=1)

    flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0) * MODES[mode]
    tflops = flops * calls / benchmark.stats.stats.median / 1e12
    benchmark.extra_info.update(
        provider=provider,
        mode=mode,
        B=B,
        H=H,
        T=T,
        D=D,
        causal=causal,
        calls_per_round=calls,
        tflops=round(tflops, 2),
        dtype="bfloat16",
    )
    record_comparison(
        f"attention {mode}: TFLOP/s, ours vs best SDPA backend (bf16, B*T=16k, H*D=2048)",
        f"D={D:<3} T={T:<5} {'causal' if causal else 'dense'}",
        provider,
        tflops,
    )
