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
"$CXX" -std=c++20 -O2 -g -U_FORTIFY_SOURCE -Wall -Wno-unused-function -Wno-unknown-pragmas -Wno-maybe-uninitialized \
  -o "$out/emu_test" "$root/kernels/emu/emu_test.cpp"
# one process per dtype, in parallel
pids=()
for t in f32 f16 bf16; do
  "$out/emu_test" "$t" >"$out/emu-$t.log" 2>&1 &
  pids+=($!)
done
status=0
for i in 0 1 2; do
  wait "${pids[$i]}" || status=1
done
cat "$out"/emu-f32.log "$out"/emu-f16.log "$out"/emu-bf16.log
exit $status
