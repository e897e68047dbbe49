"""Self-check: run the kernels on this machine against float64 computations of the plain-PyTorch
reference and print what was found (device, backend, dtype, max abs errors).

Each kernel family contributes a check function to CHECKS: it takes the device and returns rows
{"kernel", "dtype", "shape", "errors": {name: max abs error}, "ok"}.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dp_attn import functional
from dp_attn.kernels.clipped_sum import clipped_grad_sum_reference
from dp_attn.kernels.flash_attn import attention_reference
from dp_attn.kernels.per_example_norms import per_example_grad_sq_norms_reference
from dp_attn.kernels.utils import backend_name

# Allowed max abs error, relative to max(1, max |expected|), per input dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return 2e-3  # the user opted into TF32 matmuls
    return TOLERANCE[dtype]


def _row(kernel: str, dtype: torch.dtype, shape: str, actual, expected) -> dict:
    """A result row: max abs error of each named output, and whether all are within tolerance."""
    errors, ok = {}, True
    for name, a in actual.items():
        e = expected[name]
        errors[name] = (a.double() - e.double()).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, e.abs().max().item() if e.numel() else 0.0)
        ok = ok and errors[name] <= _tolerance(dtype) * scale
    return {
        "kernel": kernel,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "errors": errors,
        "ok": ok,
    }


def check_flash_attention(device: torch.device) -> list[dict]:
    """Forward and backward of flash_attention (causal, GQA, per-example key lengths with odd
    lengths) against the reference computed in float64 on the same inputs."""
    B, H, Hkv, D = 2, 4, 2, 64
    T = 512 if device.type == "cuda" else 96
    dtypes = (
        [torch.bfloat16, torch.float16, torch.float32] if device.type == "cuda" else [torch.float32]
    )
    key_lengths = torch.tensor([T, T // 2 + 1], device=device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in dtypes:
        shapes = ((B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (B, H, T, D))
        q, k, v, do = (torch.randn(s, generator=gen).to(device, dtype) for s in shapes)
        results = {}
        for name, fn, args in (
            ("kernel", functional.flash_attention, (q, k, v)),
            ("reference", attention_reference, (q.double(), k.double(), v.double())),
        ):
            leaves = [t.detach().requires_grad_() for t in args]
            out = fn(*leaves, causal=True, key_lengths=key_lengths)
            grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
            results[name] = dict(zip(("out", "dq", "dk", "dv"), (out, *grads), strict=True))
        shape = f"B={B} H={H} Hkv={Hkv} T={T} D={D} causal, key_lengths"
        rows.append(_row("flash_attention", dtype, shape, results["kernel"], results["reference"]))
    return rows


def check_linear_dp_kernels(device: torch.device) -> list[dict]:
    """Per-example gradient norms (both methods) and the clipped weight-gradient sum of a linear
    layer against the reference in float64 on the same inputs."""
    B, T, din, dout = 4, 48, 64, 32
    gen = torch.Generator().manual_seed(1)
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    rows = []
    for dtype in dtypes:
        a = torch.randn(B, T, din, generator=gen).to(device, dtype)
        g = torch.randn(B, T, dout, generator=gen).to(device, dtype)
        factors = torch.rand(B, generator=gen).to(device)
        results = {}
        for name, sq_norms, clipped_sum, (x, y) in (
            ("kernel", functional.per_example_grad_sq_norms, functional.clipped_grad_sum, (a, g)),
            (
                "reference",
                per_example_grad_sq_norms_reference,
                clipped_grad_sum_reference,
                (a.double(), g.double()),
            ),
        ):
            out = {m: sq_norms(x, y, method=m) for m in ("ghost", "instantiate")}
            out["weight_grad"], out["bias_grad"] = clipped_sum(x, y, factors)
            results[name] = out
        shape = f"B={B} T={T} din={din} dout={dout}"
        rows.append(_row("clipped linear", dtype, shape, results["kernel"], results["reference"]))
    return rows


CHECKS: list[Callable[[torch.device], list[dict]]] = [
    check_flash_attention,
    check_linear_dp_kernels,
]


def run_selfcheck(device: torch.device | str | None = None) -> dict:
    """Run every check in CHECKS on `device` (default: CUDA if available, else CPU), print a
    table, and return {"device", "device_name", "backend", "checks": rows, "ok"}."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    backend = backend_name(device)
    print(f"device:  {device} ({name})")
    print(f"backend: {backend}")
    rows = [row for check in CHECKS for row in check(device)]
    print(f"{'kernel':<18} {'dtype':<9} {'max abs error':<72} {'ok':<4} shape")
    for row in rows:
        errors = " ".join(f"{k}={v:.1e}" for k, v in row["errors"].items())
        ok = "ok" if row["ok"] else "FAIL"
        print(f"{row['kernel']:<18} {row['dtype']:<9} {errors:<72} {ok:<4} {row['shape']}")
    return {
        "device": str(device),
        "device_name": name,
        "backend": backend,
        "checks": rows,
        "ok": all(row["ok"] for row in rows),
    }
