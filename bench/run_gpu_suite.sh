#!/usr/bin/env bash
# GPU checks of dp_attn that fit one GPU lease (<= 8 minutes on one H100/H200), as one command:
#   1. the CUDA tests (tests marked `cuda`, kernels compiled: TRITON_INTERPRET=0);
#   2. the attention, DP-kernel and training-step benchmarks at the lease's sizes
#      (DP_ATTN_BENCH_QUICK=1: T in {1k, 4k, 16k}, D in {64, 128}, bf16), each writing
#      ARTIFACTS_DIR/<gpu>_<date>_<suite>.json (the naming of bench/results/);
#   3. bench/gpu_summary.py: bench/results/<date>-<gpu>.json and .md, the ratio tables (vs
#      every SDPA backend, non-private training, Opacus);
#   4. bench/compare.py: this run against the latest committed results of the same GPU.
#
#   bench/run_gpu_suite.sh [ARTIFACTS_DIR]        (default /tmp/dp-attn-gpu)
#
# Runs with the machine's own packages (torch 2.11 + triton 3.6 on the lent machines; nothing is
# installed): `python` on PATH must import torch with CUDA, and dp_attn from this checkout
# (PYTHONPATH is set to it). Each step has a time budget: benchmarks not started by their
# step's deadline are skipped (bench/conftest.py), and `timeout` stops a step that overruns.
# Every step runs even when an earlier one failed; the exit status is 1 when any failed.
# DP_ATTN_SUITE_FULL=1 runs the suites' full sizes without budgets (hours, not a lease).
set -uo pipefail

artifacts_arg="${1:-/tmp/dp-attn-gpu}"
mkdir -p "$artifacts_arg" && artifacts="$(cd "$artifacts_arg" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
start=$(date +%s)

export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${DP_ATTN_SUITE_FULL:-0}" = "1" ]; then
  export DP_ATTN_BENCH_QUICK=0
else
  export DP_ATTN_BENCH_QUICK=1
fi

# Seconds per step: benchmarks start until the budget is spent, then `timeout` allows the
# running one a grace period. Sum with the graces: 455 s, under the 8 minutes.
budget_tests=75 budget_attention=140 budget_dp_kernels=80 budget_training_step=100 grace=15

if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "error: torch sees no CUDA GPU; this script is for GPU machines" >&2
  exit 1
fi
python -c "import torch, triton; print('GPU:', torch.cuda.get_device_name(), '| torch',
torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__)"
# Clocks and temperature at the start: they tell a slow machine from a slow kernel.
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv
fi

# "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"
gpu="$(python -c "import re, torch
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")"
date="$(date -u +%Y-%m-%d)"
failed=()

# run_step BUDGET_S COMMAND...: the command with DP_ATTN_BENCH_DEADLINE at now + BUDGET_S.
run_step() {
  local budget="$1"
  shift
  if [ "$DP_ATTN_BENCH_QUICK" = "1" ]; then
    DP_ATTN_BENCH_DEADLINE=$(($(date +%s) + budget)) timeout -k 5 $((budget + grace)) "$@"
  else
    "$@"
  fi
}

echo "== CUDA tests"
run_step "$budget_tests" python -m pytest -m cuda tests -q -x -p no:cacheprovider
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "no CUDA tests were collected" >&2
fi
[ "$rc" -eq 0 ] || failed+=("CUDA tests (exit status $rc; 124: over its ${budget_tests} s)")

written=()
for suite in attention dp_kernels training_step; do
  json="$artifacts/${gpu}_${date}_${suite}.json"
  budget_var="budget_${suite}"
  rm -f "$json"
  echo "== benchmarks: bench/test_${suite}.py -> $json ($(($(date +%s) - start)) s so far)"
  run_step "${!budget_var}" python -m pytest "bench/test_${suite}.py" -q -p no:cacheprovider \
    --benchmark-json="$json"
  rc=$?
  [ "$rc" -eq 0 ] || failed+=("bench/test_${suite}.py (exit status $rc)")
  [ -f "$json" ] && written+=("$json")
done

echo "== summary and comparison with bench/results/"
if [ "${#written[@]}" -gt 0 ]; then
  python bench/gpu_summary.py "${written[@]}" --out-dir bench/results
  rc=$?
  [ "$rc" -eq 0 ] || failed+=("bench/gpu_summary.py (exit status $rc)")
  python bench/compare.py "${written[@]}" --baseline-dir bench/results
  rc=$?
  [ "$rc" -eq 0 ] || failed+=("bench/compare.py (exit status $rc)")
else
  failed+=("summary (no benchmark JSON was written)")
fi

echo "== done in $(($(date +%s) - start)) s: JSON in $artifacts, summary in bench/results/"
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all steps passed"
