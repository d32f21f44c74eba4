#!/usr/bin/env bash
# One device call (the `device` tool's `run`), from the repository root of a working tree
# that carries a bundle made by ci/gpu-bundle.sh in .bundle/:
#   device run: carry [".bundle"], command "bash ci/gpu-session.sh 430", timeout_s 500
# It runs .bundle/gpu-all.sh (tests, checks, the measurement, the sanitizers) into a
# scratch folder, then copies back what fits the tool's limits on returned files (at most
# 8 files, flat): summary.txt, targets.txt, the records JSON, the chart, ab.txt (when a
# baseline binary is there, below), and every log packed into gpu-logs.tar.gz. The last
# lines printed are the summaries, the targets and the A/B's geomean.
#
# A compile-time kernel variant A/B'd in the same call (as on 2026-12-04 for the two-group
# statistics loop, docs/perf-notes.md; 208 s in all, the sanitizers then had no time left):
#   here:  GPU_BUNDLE_VARIANT_FLAGS=-DBN_STATS_ROWS_GROUPS=2 ci/gpu-bundle.sh
#   there: GPU_AB_ARGS="--device cuda --suite resnet50 --batch 256 --combos f32:cl,f16:cl,bf16:cl
#          --ops forward_train --reps 20 --warmup 3" GPU_AB_ROUNDS=3 bash ci/gpu-session.sh 230
#
# Usage: bash ci/gpu-session.sh [BUDGET_S]   (default 430: gpu-all.sh's whole budget;
#        give the call ~60 s more as its timeout so the packing always runs)
# Environment: GPU_AB_* (below), and everything gpu-all.sh, gpu-run.sh and gpu-bench.sh read.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bundle="$root/.bundle"
budget="${1:-430}"
out="${OUT:-$root/gpu-session-out}"
work="$(mktemp -d /tmp/gpu-session.XXXXXX)"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if [[ ! -x "$bundle/gpu-all.sh" ]]; then
  echo "gpu-session: no bundle in $bundle (run ci/gpu-bundle.sh here and carry .bundle)" >&2
  exit 2
fi
GPU_ALL_BUDGET_S="$budget" "$bundle/gpu-all.sh" "$work" >"$work/gpu-all.log" 2>&1
status=$?

# A/B, both binaries alternating over the same cases in this call (GPU_AB_ARGS,
# GPU_AB_ROUNDS, at most GPU_AB_LIMIT_S seconds): bnorm against a compile-time variant of
# its kernels (.bundle/bnorm-variant.gz, from gpu-bundle.sh's GPU_BUNDLE_VARIANT_FLAGS), else
# a baseline binary put in the bundle by hand (.bundle/bnorm-base, e.g. the previous
# commit's) against bnorm.
ab_pair=()
if [[ -f "$bundle/bnorm-variant.gz" ]]; then
  gunzip -c "$bundle/bnorm-variant.gz" >"$work/bnorm-variant" && chmod +x "$work/bnorm-variant"
fi
if [[ -x "$work/bnorm-variant" ]]; then
  ab_pair=("$bundle/bnorm" "$work/bnorm-variant")
  echo "A/B: base = bnorm, new = bnorm-variant ($(cat "$bundle/bnorm-variant.flags" 2>/dev/null))" >"$work/ab.txt"
elif [[ -x "$bundle/bnorm-base" ]]; then
  ab_pair=("$bundle/bnorm-base" "$bundle/bnorm")
  echo "A/B: base = bnorm-base, new = bnorm" >"$work/ab.txt"
fi
if ((${#ab_pair[@]} == 2)); then
  read -r -a ab_args <<<"${GPU_AB_ARGS:---device cuda --suite resnet50 --batch 256 --combos f32:cf,f16:cl,bf16:cl --ops forward_train,backward --reps 20 --warmup 3}"
  timeout --signal=INT --kill-after=10 "${GPU_AB_LIMIT_S:-150}" \
    bash "$root/ci/gpu-ab.sh" "${ab_pair[@]}" "${GPU_AB_ROUNDS:-2}" "$work/ab" -- "${ab_args[@]}" \
    >>"$work/ab.txt" 2>&1 || echo "gpu-session: the A/B step failed or ran out of time (exit $?)" >>"$work/ab.txt"
  cp "$work/ab.txt" "$out/ab.txt"
fi

cp "$work/summary.txt" "$out/summary.txt" 2>/dev/null
cp "$work/bench/targets.txt" "$out/targets.txt" 2>/dev/null
for f in "$work"/bench/docs/bench/*.json; do [[ -f "$f" ]] && cp "$f" "$out/"; done
cp "$work/bench/chart.svg" "$out/chart.svg" 2>/dev/null
tar czf "$out/gpu-logs.tar.gz" -C "$work" . 2>/dev/null

cat "$work/summary.txt" 2>/dev/null || tail -n 40 "$work/gpu-all.log"
echo
# the targets table's summary part (the per-case table is in targets.txt)
sed -n '/^issue 4 targets/,$p' "$work/bench/targets.txt" 2>/dev/null
[[ -f "$work/ab.txt" ]] && tail -n 3 "$work/ab.txt"
ls -l "$out"
exit $status
