#!/usr/bin/env bash
# Runs a bundle made by ci/gpu-bundle.sh on a machine with an NVIDIA GPU and no Rust
# toolchain, and writes every log into one folder:
#   nvidia-smi.txt, info.txt          the machine, `bnorm info`
#   test-NAME.log                      every test executable, ignored (GPU) tests included
#   check-cuda.txt                     `bnorm check --device cuda` (conformance table)
#   bench-resnet50.txt / .json         `bnorm bench --device cuda --suite resnet50`
#   sanitizer-memcheck.log             compute-sanitizer memcheck over GPU tests (if installed)
#   sanitizer-racecheck.log            compute-sanitizer racecheck over GPU tests (if installed)
#   sanitizer-*-persistent.log         the same over the persistent kernels' smoke test
#   summary.txt                        one line per step: status, seconds; NOT RUN lines
# Every step has a time limit; the whole run stays under 6 minutes.
#
# Usage: ./gpu-run.sh [LOG_DIR]        (default: $OUT when set, else ./logs)
# Environment: GPU_RUN_STEPS (default "tests check bench sanitizer": the steps to run),
# GPU_RUN_BUDGET_S (default 345: the sanitizers get what is left of it). gpu-all.sh uses
# them to run the tests, then gpu-bench.sh, then the sanitizers in one call.
# Exit status: 0 when every step that ran passed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
logs="${1:-${OUT:-$here/logs}}"
mkdir -p "$logs"
summary="$logs/summary.txt"
: >"$summary"
start_all=$(date +%s)
failed=0
steps=" ${GPU_RUN_STEPS:-tests check bench sanitizer} "
budget_all="${GPU_RUN_BUDGET_S:-345}"
wants() { [[ "$steps" == *" $1 "* ]]; }

# The CLI's flags, in one place.
CHECK_ARGS=(check --device cuda)
BENCH_ARGS=(bench --device cuda --suite resnet50)
# Tests the sanitizers run (tests/gpu.rs names; substrings): fast ones that cover every
# kernel path between them: split reductions with the last-block merge, fused single-launch
# paths, two-launch paths, vector and scalar, both layouts, all dtypes. Override with
# MEMCHECK_TESTS / RACECHECK_TESTS (space-separated).
read -r -a MEMCHECK_FILTER <<<"${MEMCHECK_TESTS:-split_reductions misaligned_views callers_stream}"
read -r -a RACECHECK_FILTER <<<"${RACECHECK_TESTS:-split_reductions callers_stream}"

note() { echo "$*" | tee -a "$summary"; }

# step NAME LIMIT_SECONDS LOG CMD...: run with a time limit, log output, record status.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  local status="ok"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    status="TIMEOUT after ${limit}s"
    failed=1
  elif [[ $rc -ne 0 ]]; then
    status="FAILED (exit $rc)"
    failed=1
  fi
  note "$(printf '%-34s %-22s %4ss  %s' "$name" "$status" "$dt" "$(basename "$log")")"
}

cd "$here"
export RUST_BACKTRACE=1

{ nvidia-smi 2>&1 || echo "nvidia-smi not available"; } >"$logs/nvidia-smi.txt"
if [[ -x ./bnorm ]]; then
  step "bnorm info" 30 "$logs/info.txt" ./bnorm info
fi

# 1. every test executable, ignored tests included. GPU tests first: they matter most.
if wants tests; then
  # the bundle holds the test executables that touch a GPU (gpu-bundle.sh chose them)
  mapfile -t tests < <(ls tests/ | sort)
  ordered=()
  for t in "${tests[@]}"; do [[ "$t" == gpu* ]] && ordered+=("$t"); done
  for t in "${tests[@]}"; do [[ "$t" != gpu* ]] && ordered+=("$t"); done
  for t in "${ordered[@]}"; do
    limit=45
    [[ "$t" == gpu ]] && limit=120
    [[ "$t" == gpu_persistent ]] && limit=90
    step "test $t" "$limit" "$logs/test-$t.log" "./tests/$t" --include-ignored
  done
  grep -h "NOT RUN:" "$logs"/test-*.log 2>/dev/null | sed 's/^/  /' | sort -u | tee -a "$summary"
fi

# 2. the command-line checks
if [[ ! -x ./bnorm ]]; then
  note "bnorm                              NOT RUN: no bnorm binary in the bundle"
else
  if wants check; then
    step "bnorm ${CHECK_ARGS[*]}" 60 "$logs/check-cuda.txt" ./bnorm "${CHECK_ARGS[@]}"
  fi
  if wants bench; then
    step "bnorm ${BENCH_ARGS[*]}" 75 "$logs/bench-resnet50.txt" ./bnorm "${BENCH_ARGS[@]}" --json "$logs/bench-resnet50.json"
  fi
fi

# 3. compute-sanitizer over the GPU tests
sanitizer="$(command -v compute-sanitizer || true)"
if [[ -z "$sanitizer" ]]; then
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer /opt/cuda/bin/compute-sanitizer; do
    [[ -x "$c" ]] && sanitizer="$c" && break
  done
fi
if ! wants sanitizer; then
  :
elif [[ -z "$sanitizer" ]]; then
  note "compute-sanitizer                  NOT RUN: not installed on this machine"
elif [[ ! -x tests/gpu ]]; then
  note "compute-sanitizer                  NOT RUN: no tests/gpu in the bundle"
else
  # the persistent kernels' smoke test gets up to 60 s at the end (below)
  reserve=0
  [[ -x tests/gpu_persistent ]] && reserve=60
  for tool in memcheck racecheck; do
    elapsed=$(($(date +%s) - start_all))
    left=$((budget_all - elapsed - reserve))
    if ((left < 30)); then
      note "sanitizer $tool                   NOT RUN: time budget spent"
      continue
    fi
    limit=$left
    [[ "$tool" == memcheck ]] && limit=$((left * 6 / 10))
    ((limit > 150)) && limit=150
    args=(--tool "$tool" --error-exitcode 1)
    filter=("${RACECHECK_FILTER[@]}")
    if [[ "$tool" == memcheck ]]; then
      args+=(--leak-check full)
      filter=("${MEMCHECK_FILTER[@]}")
    fi
    step "sanitizer $tool" "$limit" "$logs/sanitizer-$tool.log" \
      "$sanitizer" "${args[@]}" ./tests/gpu --include-ignored --test-threads 1 "${filter[@]}"
  done
  # the persistent kernels (grid barrier, shared-memory storage): a few small cases
  if [[ -x tests/gpu_persistent ]]; then
    for tool in memcheck racecheck; do
      left=$((budget_all - ($(date +%s) - start_all)))
      if ((left < 20)); then
        note "sanitizer $tool (persistent)      NOT RUN: time budget spent"
        continue
      fi
      limit=$((left < 30 ? left : 30))
      step "sanitizer $tool (persistent)" "$limit" "$logs/sanitizer-$tool-persistent.log" \
        "$sanitizer" --tool "$tool" --error-exitcode 1 ./tests/gpu_persistent --include-ignored --test-threads 1 \
        persistent_smoke
    done
  fi
fi

note "total $(($(date +%s) - start_all))s; logs in $logs"
if [[ $failed -ne 0 ]]; then
  note "gpu-run: SOME STEPS FAILED"
  exit 1
fi
note "gpu-run: all steps that ran passed"
