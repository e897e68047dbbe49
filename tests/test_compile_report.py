"""The kernels compile for A100 (sm_80) and H100/H200 (sm_90a) without a GPU: the CI subset of
bench/compile_report.py (bf16; attention at head dim 128 with GQA, causal masks and key
lengths; a GPT-2 MLP layer's norms and clipped sums; embeddings, norm affine, noise), at every
config the autotuners may pick, the clipped sums as the engine calls them (fp32 sums) and in the
input dtype. Fails on a compile error, on shared memory over the arch's per-block limit and
on any register spill. About 1 min on 2 cores (compiles run in parallel, one per core). The full
table (every head dim, shape and dtype, both noise modes; ~15-20 min):
`python bench/compile_report.py --full`, committed under bench/results/compile/.

The report runs in its own process: it needs TRITON_INTERPRET=0 before dp_attn is imported,
and this test session interprets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dp_attn.kernels import flash_attn

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("attn", "norm", "clip", "embed", "noise")


@pytest.fixture(scope="module")
def subset_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_report.py"), "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), f"the report wrote no JSON:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text()), done


def test_every_kernel_family_compiles_for_both_archs(subset_rows):
    rows, _ = subset_rows
    for arch in ("sm_80", "sm_90a"):
        families = {r["kernel"].split("_")[0] for r in rows if r["arch"] == arch}
        assert families == set(FAMILIES), (arch, families)
    kernels = {r["kernel"] for r in rows}
    assert {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_preprocess"} <= kernels


def test_no_compile_error_smem_overflow_or_16_bit_spill(subset_rows):
    rows, done = subset_rows
    failing = [
        f"{r['kernel']} {r['arch']} {r['dtype']} {r['shape']} [{r['config']}]: {r['error']}"
        for r in rows
        if not r["ok"]
    ]
    assert not failing, "\n".join(failing)
    assert done.returncode == 0, done.stderr[-3000:]
    for r in rows:
        assert r["registers"] and r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, r
        assert 0 <= r["smem_bytes"] <= {"sm_80": 166_912, "sm_90a": 232_448}[r["arch"]], r


def test_every_attention_config_of_the_tables_is_compiled(subset_rows):
    """The report compiles what the autotuner may pick: each bf16 candidate of the head dim."""
    rows, _ = subset_rows
    tables = {
        "attn_fwd": flash_attn._FWD_CANDIDATES,
        "attn_bwd_dkdv": flash_attn._DKDV_CANDIDATES,
        "attn_bwd_dq": flash_attn._DQ_CANDIDATES,
    }
    for kernel, table in tables.items():
        head_dim = 128
        configs = {
            r["config"]
            for r in rows
            if r["kernel"] == kernel
            and r["shape"].startswith(f"D={head_dim} ")
            and r["arch"] == "sm_90a"
        }
        assert len(configs) == len(set(table[head_dim])), configs
