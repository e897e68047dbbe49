#!/usr/bin/env bash
# GPU checks of dp_attn, run by .github/workflows/gpu.yml and by hand on a GPU machine:
#   1. the CUDA tests (tests marked `cuda`, kernels compiled: TRITON_INTERPRET=0);
#   2. every pytest-benchmark suite in bench/, each writing
#      ARTIFACTS_DIR/<gpu>_<date>_<suite>.json (the naming of bench/results/);
#   3. bench/compare.py: this run against the latest committed results of the same GPU in
#      bench/results/, failing on a slowdown beyond its noise margin.
#
#   bench/run_gpu_suite.sh ARTIFACTS_DIR
#
# Uses the `python` on PATH, which needs torch with CUDA and dp_attn installed with ".[test]".
# Every step runs even when an earlier one failed, so that all JSON files get written; the
# exit status is 1 when any step failed. DP_ATTN_BENCH_QUICK=1 runs the suites' smaller sets
# of shapes (compared with the committed results for the shapes they share).
set -uo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 ARTIFACTS_DIR" >&2
  exit 2
fi
mkdir -p "$1" && artifacts="$(cd "$1" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2

export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
suites=(attention dp_kernels training_step)

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

echo "== CUDA tests"
python -m pytest -m cuda tests -q
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "no CUDA tests were collected" >&2
fi
[ "$rc" -eq 0 ] || failed+=("CUDA tests (pytest exit status $rc)")

written=()
for suite in "${suites[@]}"; do
  json="$artifacts/${gpu}_${date}_${suite}.json"
  rm -f "$json"
  echo "== benchmarks: bench/test_${suite}.py -> $json"
  python -m pytest "bench/test_${suite}.py" -q --benchmark-json="$json"
  rc=$?
  [ "$rc" -eq 0 ] || failed+=("bench/test_${suite}.py (pytest exit status $rc)")
  [ -f "$json" ] && written+=("$json")
done

echo "== comparison with bench/results/"
if [ "${#written[@]}" -gt 0 ]; then
  python bench/compare.py "${written[@]}" --baseline-dir bench/results
  rc=$?
  [ "$rc" -eq 0 ] || failed+=("bench/compare.py (exit status $rc)")
else
  failed+=("bench/compare.py (no benchmark JSON was written)")
fi

echo "== summary: JSON in $artifacts"
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all steps passed"
