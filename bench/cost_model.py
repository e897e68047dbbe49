"""A cost model, not a measurement: FLOPs, HBM bytes and H100 roofline time per kernel of one
DP-SGD training step of one transformer block on one sequence (bf16), per clipping style,
against the non-private step. The first GPU run (bench/run_gpu_suite.sh) is to be compared
with it.

    python bench/cost_model.py               # the markdown tables of docs/performance.md

Model, per block and per sequence of T tokens (costs are linear in the batch):
- linear layer din -> dout: forward, input-gradient and weight-gradient GEMMs of 2·T·din·dout
  FLOPs each; HBM bytes: each operand read once and the result written once (ideal tiling).
- attention (causal, H heads of D): forward 2·T²·H·D FLOPs (half of 4·T²·H·D), backward 2.5×
  the forward; bytes: q, k, v, o (and dO, dq, dk, dv backward) once each.
- DP, flat and per-layer clipping (the same kernels; flat keeps every layer's activations
  until the end of the backward, a memory cost not modelled): the per-example norm pass,
  ghost (T²·(din + dout) FLOPs, the triangle of T×T Gram tiles; bytes: every 64-row tile of
  a and g re-read once per tile pair) or instantiate (2·T·din·dout; bytes: a and g re-read
  once per 128-wide tile of the other side), whichever has fewer FLOPs (as
  reference.grad_norm_method); then the clipped sum, the weight-gradient GEMM's cost, in
  place of that GEMM. The noise epilogue's Philox work (integer, about 40 ops per 4 weights)
  and the parameter-free layers are left out.
- DP, block clipping: the block-clipped GEMM, the weight-gradient GEMM's FLOPs and bytes plus
  one norm per 128×128 tile and example (left out); no norm pass.
- roofline time of a kernel: max(FLOPs / 989 TFLOP/s dense bf16, bytes / 3.35 TB/s), H100
  SXM's peaks; real kernels reach a fraction of either.
"""

from __future__ import annotations

import argparse
import sys

PEAK_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core FLOP/s
PEAK_BYTES = 3.35e12  # H100 SXM HBM3 bytes/s
BYTES = 2  # bf16
SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768)

# Each block: attention (heads, head dim) and its linear layers (din, dout).
MODELS = {
    "GPT-2 small": {"heads": 12, "head_dim": 64,
                    "linears": [(768, 2304), (768, 768), (768, 3072), (3072, 768)]},
    "LLaMA-7B": {"heads": 32, "head_dim": 128,
                 "linears": [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]},
}  # fmt: skip


def roofline(flops: float, nbytes: float) -> float:
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES)


def gemm(T: int, din: int, dout: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one of a linear layer's three GEMMs."""
    return 2 * T * din * dout, BYTES * (T * din + T * dout + din * dout)


def norm_pass(T: int, din: int, dout: int) -> tuple[str, float, float]:
    """(path, FLOPs, bytes) of the per-example norm kernel the dispatch would pick."""
    ghost_flops = T * T * (din + dout)
    inst_flops = 2 * T * din * dout
    if ghost_flops < inst_flops:
        tiles = -(-T // 64)
        return "ghost", ghost_flops, BYTES * T * tiles * (din + dout)
    inst_bytes = BYTES * T * (din * -(-dout // 128) + dout * -(-din // 128))
    return "instantiate", inst_flops, inst_bytes


def kernels(model: str, T: int) -> dict[str, list[tuple[str, float, float]]]:
    """Per style ("non-private", "flat / per-layer", "block"): (kernel, FLOPs, bytes) rows."""
    spec = MODELS[model]
    H, D = spec["heads"], spec["head_dim"]
    attention_fwd = (2 * T * T * H * D, BYTES * 4 * T * H * D)
    attention_bwd = (2.5 * attention_fwd[0], BYTES * 8 * T * H * D)
    common = [("attention fwd", *attention_fwd), ("attention bwd", *attention_bwd)]
    for din, dout in spec["linears"]:
        f, b = gemm(T, din, dout)
        common += [(f"linear {din}x{dout} fwd", f, b), (f"linear {din}x{dout} dgrad", f, b)]
    styles = {"non-private": list(common), "flat / per-layer": list(common), "block": list(common)}
    for din, dout in spec["linears"]:
        f, b = gemm(T, din, dout)
        path, nf, nb = norm_pass(T, din, dout)
        styles["non-private"].append((f"linear {din}x{dout} wgrad", f, b))
        styles["flat / per-layer"] += [
            (f"linear {din}x{dout} norms ({path})", nf, nb),
            (f"linear {din}x{dout} clipped sum", f, b),
        ]
        styles["block"].append((f"linear {din}x{dout} block-clipped sum", f, b))
    return styles


def totals(rows) -> tuple[float, float, float]:
    return (
        sum(r[1] for r in rows),
        sum(r[2] for r in rows),
        sum(roofline(r[1], r[2]) for r in rows),
    )


def step_table() -> list[str]:
    lines = [
        "| model | T | non-private: TFLOP, GB, roofline ms | flat / per-layer: ratio of "
        "FLOPs, bytes, time | block: ratio of FLOPs, bytes, time |",
        "|---|---|---|---|---|",
    ]
    for model in MODELS:
        for T in SEQ_LENS:
            styles = {k: totals(v) for k, v in kernels(model, T).items()}
            f0, b0, t0 = styles["non-private"]
            cells = [f"{f0 / 1e12:.2f}, {b0 / 1e9:.2f}, {t0 * 1e3:.2f}"]
            for style in ("flat / per-layer", "block"):
                f, b, t = styles[style]
                cells.append(f"{f / f0:.2f}, {b / b0:.2f}, {t / t0:.2f}")
            lines.append(f"| {model} | {T} | " + " | ".join(cells) + " |")
    return lines


def kernel_table(model: str, T: int) -> list[str]:
    """The DP kernels of one block (each distinct layer shape once, with its count)."""
    lines = [
        f"| {model}, T = {T}: DP kernel | count | GFLOP | MB | roofline µs | bound by |",
        "|---|---|---|---|---|---|",
    ]
    rows: dict[str, list] = {}
    for style, found in kernels(model, T).items():
        for name, f, b in found:
            if style != "non-private" and any(w in name for w in ("norms", "clipped")):
                rows.setdefault(f"{style}: {name}", [0, f, b])[0] += 1
    for name, (count, f, b) in rows.items():
        bound = "FLOPs" if f / PEAK_FLOPS >= b / PEAK_BYTES else "HBM"
        lines.append(
            f"| {name} | {count} | {f / 1e9:.1f} | {b / 1e6:.1f} | "
            f"{roofline(f, b) * 1e6:.1f} | {bound} |"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print("\n".join(step_table()))
    for model, T in (("GPT-2 small", 4096), ("LLaMA-7B", 4096)):
        print()
        print("\n".join(kernel_table(model, T)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
