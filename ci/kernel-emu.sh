#!/usr/bin/env bash
# Compile the real CUDA kernels (kernels/*.cu) for the CPU through kernels/emu/cuda_emu.h
# and run them against a float64 reference (kernels/emu/emu_test.cpp). No GPU, no nvcc:
# needs g++ >= 12 (C++20, _Float16, ucontext). Checks the kernels' logic only (see
# docs/cuda.md for what it does not cover).
#
# Usage: ci/kernel-emu.sh [build-dir]     (default: target/kernel-emu)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/target/kernel-emu}"
mkdir -p "$out"
CXX="${CXX:-g++}"
# Two builds: the kernels as shipped, and with the compile-time variants a GPU run may
# A/B (ci/gpu-bundle.sh's GPU_BUNDLE_VARIANT_FLAGS), so a variant is correct before it is timed.
VARIANT_FLAGS=(-DBN_STATS_ROWS_GROUPS=2)
build() {
  "$CXX" -std=c++20 -O2 -g -U_FORTIFY_SOURCE -Wall -Wno-unused-function -Wno-unknown-pragmas -Wno-maybe-uninitialized \
    "$@" "$root/kernels/emu/emu_test.cpp"
}
build -o "$out/emu_test" &
b1=$!
build "${VARIANT_FLAGS[@]}" -o "$out/emu_test_variant" &
b2=$!
# each on its own line: under `set -e` a failing wait stops the script here (in an `&&`
# list a failed first build would be skipped over and a stale binary run)
wait "$b1"
wait "$b2"
# one process per dtype, one build after the other
status=0
logs=()
for bin in emu_test emu_test_variant; do
  pids=()
  for t in f32 f16 bf16; do
    "$out/$bin" "$t" >"$out/$bin-$t.log" 2>&1 &
    pids+=($!)
    logs+=("$out/$bin-$t.log")
  done
  for p in "${pids[@]}"; do
    wait "$p" || status=1
  done
done
for l in "${logs[@]}"; do
  case "$l" in *variant*) printf '%s ' "variant (${VARIANT_FLAGS[*]}):" ;; esac
  cat "$l"
done
exit $status
