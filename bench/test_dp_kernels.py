"""DP-SGD kernels vs the plain weight-gradient GEMM and Opacus' ghost-clipping norm (CUDA).

One run times, on GPT-2-small and LLaMA-7B shaped linear layers in bf16 (din/dout 768/3072
with ~16k tokens per batch, 4096/11008 with ~8k), for T in {128, 512, 2k, 8k}:

    gemm       g.reshape(-1, dout).T @ a.reshape(-1, din)       (the baseline, ratio 1)
    ghost      per_example_grad_sq_norms(method="ghost")
    inst       per_example_grad_sq_norms(method="instantiate")
    clipped    clipped_grad_sum with noise                        (goal <= 1.05x gemm)
    block      block_clipped_grad_sum with noise                  (goal <= 1.05x gemm)
    opacus     Opacus' ghost-clipping norm of nn.Linear (compute_linear_norm_sample)

and the peak memory each allocates beyond its inputs (torch.cuda.max_memory_allocated delta,
outputs included). A ratio table is printed at the end; every case also stores time, memory
and ratio in the benchmark JSON's extra_info.

    TRITON_INTERPRET=0 python -m pytest bench/test_dp_kernels.py --benchmark-json=out.json -s
    DP_ATTN_BENCH_QUICK=1 ...   # T in {1k, 4k, 16k} (one GPU lease: bench/run_gpu_suite.sh)
"""

from __future__ import annotations

import os

import pytest
import torch

from dp_attn import functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QUICK = os.environ.get("DP_ATTN_BENCH_QUICK", "0") == "1"
LAYERS = {"gpt2-mlp 768->3072": (768, 3072, 16384), "llama7b-mlp 4096->11008": (4096, 11008, 8192)}
SEQ_LENS = [1024, 4096, 16384] if QUICK else [128, 512, 2048, 8192]
CASES = ["gemm", "ghost", "inst", "clipped", "block", "opacus"]
RESULTS: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}


def make_inputs(din, dout, tokens, seq):
    batch = max(1, tokens // seq)
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(batch, seq, din, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.randn(batch, seq, dout, device="cuda", dtype=torch.bfloat16, generator=gen) * 1e-2
    return a, g


def operation(case, a, g):
    batch, _, din = a.shape
    dout = g.shape[-1]
    clip = torch.rand(batch, device="cuda")
    if case == "gemm":
        return lambda: g.reshape(-1, dout).T @ a.reshape(-1, din)
    if case in ("ghost", "inst"):
        method = "ghost" if case == "ghost" else "instantiate"
        return lambda: F.per_example_grad_sq_norms(a, g, method=method)
    if case == "clipped":
        return lambda: F.clipped_grad_sum(a, g, clip, scale=1 / batch)
    if case == "block":
        return lambda: F.block_clipped_grad_sum(a, g, 0.1, scale=1 / batch)
    linear_module = pytest.importorskip("opacus.grad_sample.linear")
    layer = torch.nn.Linear(din, dout, device="cuda", dtype=torch.bfloat16)
    return lambda: linear_module.compute_linear_norm_sample(layer, [a], g)


def peak_extra_memory(fn) -> float:
    """MiB allocated at peak by one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_dp_kernel(benchmark, layer, seq, case):
    din, dout, tokens = LAYERS[layer]
    a, g = make_inputs(din, dout, tokens, seq)
    fn = operation(case, a, g)

    def run():
        fn()
        torch.cuda.synchronize()

    try:
        run()  # compile / autotune outside the timing
        memory = peak_extra_memory(fn)
        benchmark.pedantic(run, rounds=5, iterations=5, warmup_rounds=1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{case} ran out of GPU memory")
    seconds = benchmark.stats.stats.median
    RESULTS.setdefault((layer, seq), {})[case] = (seconds, memory)
    gemm = RESULTS[(layer, seq)].get("gemm", (float("nan"), 0.0))[0]
    benchmark.extra_info.update(
        layer=layer,
        seq=seq,
        batch=a.shape[0],
        case=case,
        time_ms=seconds * 1e3,
        peak_extra_mib=memory,
        ratio_to_gemm=seconds / gemm,
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
    )


def test_zz_print_ratio_table(capsys):
    """Time ratio to the plain GEMM and peak extra memory of every case of this run."""
    if not RESULTS:
        pytest.skip("no benchmark ran")
    lines = [
        f"{'layer':24} {'T':>5} {'gemm ms':>8} "
        + " ".join(f"{c:>16}" for c in CASES[1:])
        + "   (ratio to gemm / extra MiB)"
    ]
    for (layer, seq), row in RESULTS.items():
        gemm = row.get("gemm", (float("nan"), 0.0))[0]
        cells = []
        for case in CASES[1:]:
            seconds, memory = row.get(case, (float("nan"), float("nan")))
            cells.append(f"{seconds / gemm:7.2f}x/{memory:7.0f}")
        cells = " ".join(f"{c:>16}" for c in cells)
        lines.append(f"{layer:24} {seq:5d} {gemm * 1e3:8.3f} {cells}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
