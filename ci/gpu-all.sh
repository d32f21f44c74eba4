#!/usr/bin/env bash
# Everything a GPU session runs, in one call, from a bundle made by ci/gpu-bundle.sh:
#   1. gpu-run.sh's tests and checks (every test binary with the GPU tests, bnorm check)
#   2. gpu-bench.sh: bnorm vs cuDNN vs PyTorch, records, chart, targets, ncu
#   3. gpu-run.sh's compute-sanitizer runs, with the time left
# into OUT_DIR/{run,bench,sanitizer}/ and OUT_DIR/summary.txt (all three summaries).
#
# Usage: ./gpu-all.sh [OUT_DIR]     (default: $OUT when set, else ./all-out)
# GPU_ALL_BUDGET_S (default 560): the whole run's seconds, for a 600 s device call. The
# measurement gets up to 290 s of it and leaves the sanitizers at least 90 s when it can.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${OUT:-$here/all-out}}"
mkdir -p "$out"
t0=$(date +%s)
budget="${GPU_ALL_BUDGET_S:-560}"
left() { echo $((budget - ($(date +%s) - t0))); }
status=0

GPU_RUN_STEPS="tests check" "$here/gpu-run.sh" "$out/run" || status=1

l=$(($(left) - 90))
bench=$((l < 290 ? l : 290))
((bench < 150)) && bench=150
GPU_BENCH_BUDGET_S=$bench "$here/gpu-bench.sh" "$out/bench" || status=1

l=$(($(left) - 5))
if ((l >= 40)); then
  GPU_RUN_STEPS="sanitizer" GPU_RUN_BUDGET_S=$l "$here/gpu-run.sh" "$out/sanitizer" || status=1
else
  mkdir -p "$out/sanitizer"
  echo "compute-sanitizer                  NOT RUN: time budget (${l}s left)" >"$out/sanitizer/summary.txt"
fi

{
  for part in run bench sanitizer; do
    echo "== $part"
    cat "$out/$part/summary.txt" 2>/dev/null
  done
  echo "== gpu-all: $(($(date +%s) - t0))s of ${budget}s, $([[ $status -eq 0 ]] && echo 'all steps that ran passed' || echo 'SOME STEPS FAILED')"
} >"$out/summary.txt"
cat "$out/summary.txt"
exit $status
