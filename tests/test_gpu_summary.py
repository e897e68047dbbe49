"""bench/gpu_summary.py, the summary step of bench/run_gpu_suite.sh, on a synthetic run: one
file and the ratio tables, without a GPU."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "bench" / "gpu_summary.py")
gpu_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_summary)

MACHINE = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8"}
WHEN = "2026-05-01T10:00:00+00:00"


def bench(suite, name, median, **extra):
    return {
        "name": name,
        "fullname": f"bench/test_{suite}.py::{name}",
        "stats": {"median": median},
        "extra_info": extra,
    }


def write(path, benchmarks):
    path.write_text(
        json.dumps({"machine_info": MACHINE, "datetime": WHEN, "benchmarks": benchmarks})
    )
    return str(path)


def synthetic_run(tmp_path):
    attention = [
        bench(
            "attention",
            f"attn[{p}]",
            1e-3,
            provider=p,
            mode="fwd",
            D=128,
            T=4096,
            causal=True,
            tflops=tflops,
        )
        for p, tflops in (("ours", 300.0), ("sdpa-flash", 400.0), ("sdpa-cudnn", 600.0))
    ]
    kernels = [
        bench(
            "dp_kernels", f"k[{c}]", 1.0, layer="gpt2-mlp 768->3072", seq=1024, case=c, time_ms=ms
        )
        for c, ms in (("gemm", 2.0), ("ghost", 3.0), ("opacus", 9.0))
    ]
    training = [
        bench("training_step", f"t[{m}]", s, method=m, T=1024)
        for m, s in (("non-private SDPA", 0.1), ("ours flat", 0.15), ("opacus ghost", 0.6))
    ]
    return [
        write(tmp_path / f"{name}.json", rows)
        for name, rows in (
            ("attention", attention),
            ("dp_kernels", kernels),
            ("training_step", training),
        )
    ]


def test_summary_writes_one_file_and_the_ratio_tables(tmp_path):
    paths = synthetic_run(tmp_path)
    assert gpu_summary.main([*paths, "--out-dir", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "2026-05-01-nvidia-h200.json").read_text())
    assert run["machine"] == MACHINE
    assert {s: len(b) for s, b in run["suites"].items()} == {
        "attention": 3,
        "dp_kernels": 3,
        "training_step": 3,
    }
    text = (tmp_path / "2026-05-01-nvidia-h200.md").read_text()
    # ours 300 TFLOP/s: 0.75 of flash, 0.50 of cuDNN, no efficient-attention result
    assert "| fwd | 128 | 4096 | causal | 300.0 | 0.75 | 0.50 | - |" in text
    # ghost 3 ms over gemm 2 ms; opacus 9 ms over ghost 3 ms; the rest did not run
    assert "| gpt2-mlp 768->3072 | 1024 | 1.50 | - | - | - | 3.00 |" in text
    # dp kernels' time comes from extra_info's time_ms, training's from the median
    assert "| 1024 | 100 | 6.00 | 1.50 | 4.00 |" in text


def test_summary_of_a_partial_run_marks_missing_suites(tmp_path):
    paths = synthetic_run(tmp_path)
    text = gpu_summary.markdown(gpu_summary.load_run(paths[:1]))
    assert text.count("(not run)") == 2
