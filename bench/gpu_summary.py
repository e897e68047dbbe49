"""One GPU run's results in one file, and its ratio tables in markdown.

    python bench/gpu_summary.py ATTENTION.json DP_KERNELS.json TRAINING_STEP.json \\
        --out-dir bench/results

reads the pytest-benchmark JSON of the suites (any subset, told apart by the test file named in
each benchmark's fullname) and writes `<out-dir>/<date>-<gpu>.json` (the machine, versions
and, per suite, each benchmark's name, median seconds and extra_info) and
`<out-dir>/<date>-<gpu>.md` with three tables:

- attention: our TFLOP/s and its ratio to every SDPA backend (>1: ours is faster);
- DP kernels: each kernel's time over the plain weight-gradient GEMM's, and Opacus' ghost
  norm over ours (>1: ours is faster);
- training step: each method's step time over non-private SDPA training's, and Opacus' over
  ours (flat clipping).

Missing cells (a backend unavailable, out of memory, a case past the suite's deadline) are "-".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SUITES = ("attention", "dp_kernels", "training_step")
SDPA_PROVIDERS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
TRAINING_BASELINE = "non-private SDPA"


def load_run(paths: list[str]) -> dict:
    """{"machine": ..., "suites": {suite: [{name, median_s, extra_info}]}} of pytest-benchmark
    JSON files of one run."""
    run = {"machine": {}, "datetime": None, "suites": {}}
    for path in paths:
        data = json.loads(Path(path).read_text())
        run["machine"] = run["machine"] or {
            k: data.get("machine_info", {}).get(k) for k in ("gpu", "torch", "triton", "cuda")
        }
        run["datetime"] = run["datetime"] or data.get("datetime")
        for bench in data.get("benchmarks", []):
            match = re.search(r"test_(\w+?)\.py::", bench.get("fullname", ""))
            if not match or match.group(1) not in SUITES:
                continue
            extra = bench.get("extra_info", {})
            median = extra.get("time_ms", 0) / 1e3 or (bench.get("stats") or {}).get("median")
            run["suites"].setdefault(match.group(1), []).append(
                {"name": bench["name"], "median_s": median, "extra_info": extra}
            )
    return run


def _ratio(num, den) -> str:
    return f"{num / den:.2f}" if num and den else "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def attention_table(benchmarks: list[dict]) -> list[str]:
    cells: dict[tuple, dict[str, float]] = {}
    for b in benchmarks:
        e = b["extra_info"]
        key = (e["mode"], e["D"], e["T"], "causal" if e["causal"] else "dense")
        cells.setdefault(key, {})[e["provider"]] = e["tflops"]
    header = ["mode", "D", "T", "mask", "ours TFLOP/s", *(f"ours / {p}" for p in SDPA_PROVIDERS)]
    rows = []
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], k[3])):
        got = cells[key]
        ours = got.get("ours")
        rows.append(
            [
                *map(str, key),
                f"{ours:.1f}" if ours else "-",
                *(_ratio(ours, got.get(p)) for p in SDPA_PROVIDERS),
            ]
        )
    return _table(header, rows)


def dp_kernels_table(benchmarks: list[dict]) -> list[str]:
    cells: dict[tuple, dict[str, float]] = {}
    for b in benchmarks:
        e = b["extra_info"]
        cells.setdefault((e["layer"], e["seq"]), {})[e["case"]] = b["median_s"]
    cases = ("ghost", "inst", "clipped", "block")
    header = ["layer", "T", *(f"{c} / gemm" for c in cases), "opacus / ghost"]
    rows = []
    for (layer, seq), got in sorted(cells.items()):
        rows.append(
            [
                layer,
                str(seq),
                *(_ratio(got.get(c), got.get("gemm")) for c in cases),
                _ratio(got.get("opacus"), got.get("ghost")),
            ]
        )
    return _table(header, rows)


def training_table(benchmarks: list[dict]) -> list[str]:
    cells: dict[int, dict[str, float]] = {}
    for b in benchmarks:
        e = b["extra_info"]
        cells.setdefault(e["T"], {})[e["method"]] = b["median_s"]
    methods = sorted({m for got in cells.values() for m in got} - {TRAINING_BASELINE})
    opacus = [m for m in methods if m.startswith("opacus")]
    header = [
        "T",
        f"{TRAINING_BASELINE} ms",
        *(f"{m} / non-private" for m in methods),
        *(f"{m} / ours flat" for m in opacus),
    ]
    rows = []
    for T, got in sorted(cells.items()):
        base = got.get(TRAINING_BASELINE)
        rows.append(
            [
                str(T),
                f"{base * 1e3:.0f}" if base else "-",
                *(_ratio(got.get(m), base) for m in methods),
                *(_ratio(got.get(m), got.get("ours flat")) for m in opacus),
            ]
        )
    return _table(header, rows)


def markdown(run: dict) -> str:
    m = run["machine"]
    lines = [
        f"# GPU run: {m.get('gpu')}, {run.get('datetime')}",
        "",
        f"torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}. Ratios of "
        "times are >1 where ours is slower, of TFLOP/s >1 where ours is faster.",
        "",
    ]
    sections = (
        ("attention", "Attention (bf16)", attention_table),
        ("dp_kernels", "DP kernels (bf16)", dp_kernels_table),
        ("training_step", "Training step", training_table),
    )
    for suite, title, table in sections:
        lines += [f"## {title}", ""]
        lines += table(run["suites"][suite]) if run["suites"].get(suite) else ["(not run)"]
        lines.append("")
    return "\n".join(lines)


def run_name(run: dict) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", (run["machine"].get("gpu") or "unknown").lower()).strip("-")
    return f"{(run.get('datetime') or 'undated')[:10]}-{gpu}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files of one run")
    parser.add_argument("--out-dir", default="bench/results")
    args = parser.parse_args(argv)
    run = load_run(args.json)
    out = Path(args.out_dir) / run_name(run)
    out.with_suffix(".json").write_text(json.dumps(run, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(run))
    print(markdown(run))
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
