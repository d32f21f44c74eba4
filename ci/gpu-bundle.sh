#!/usr/bin/env bash
# Build, here (nvcc needed, no GPU), what a GPU machine without a Rust toolchain needs to run
# bnorm's GPU checks, into one folder (default .bundle/, gitignored, must stay < 64 MB):
#   tests/NAME   the release test executables that touch a GPU (GPU_BUNDLE_TESTS, default
#                "gpu* bnorm-unit bnorm-cli-*": tests/gpu.rs, tests/gpu_persistent.rs, the
#                library's and the CLI's unit tests; the CPU-only integration tests run in CI
#                and would push the bundle past 64 MiB), debug info stripped
#   bnorm        the command-line tool (package bnorm-cli, with its `cudnn` feature: the cuDNN
#                peer of `bnorm bench`, libcudnn loaded at run time), when the workspace has it
#   bnorm-variant.gz  the same tool with the kernels compiled with GPU_BUNDLE_VARIANT_FLAGS
#                (nvcc flags, e.g. "-DBN_STATS_ROWS_GROUPS=2"; only when that is set, in a
#                target folder of its own), gzipped: ci/gpu-session.sh unpacks it and A/Bs
#                bnorm against it
#   gpu-run.sh   runs the tests and checks there (see that script)
#   gpu-bench.sh the measurement of issue 4 against cuDNN and PyTorch (see that script)
#   torch_bench.py  the PyTorch peer it runs
#   gpu-all.sh   all of it in one call: gpu-run.sh's tests, gpu-bench.sh, the sanitizers
#   MANIFEST.txt what was built, from which commit, with which nvcc
#
# Usage: ci/gpu-bundle.sh [DIR]
# The build uses BNORM_REQUIRE_CUDA=1: it fails rather than bundle binaries without kernels.
# nvcc is found as build.rs finds it ($NVCC, $CUDA_HOME, $CUDA_PATH, PATH).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
dest="${1:-$root/.bundle}"
limit=$((64 * 1024 * 1024))
export BNORM_REQUIRE_CUDA=1
target_dir="${CARGO_TARGET_DIR:-$root/target}"

json="$(mktemp)"
trap 'rm -f "$json"' EXIT
echo "gpu-bundle: building release test executables (BNORM_REQUIRE_CUDA=1)" >&2
cargo test --release --workspace --no-run --message-format=json >"$json"

rm -rf "$dest"
mkdir -p "$dest/tests"
# name<TAB>path for every test executable: <package>-unit for a library's unit tests,
# <package>-bin-<name> for a binary's, the target name for integration tests.
python3 - "$json" >"$dest/.list" <<'EOF'
import json, sys
seen = set()
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("profile", {}).get("test") or not m.get("executable"):
        continue
    t = m["target"]
    pkg = m["package_id"].split("#")[-1].split("@")[0].split("/")[-1]
    kinds = t["kind"]
    if "lib" in kinds or "rlib" in kinds:
        name = f"{pkg}-unit"
    elif "bin" in kinds:
        name = f"{pkg}-bin-{t['name']}"
    else:
        name = t["name"]
    if name in seen:
        continue
    seen.add(name)
    print(f"{name}\t{m['executable']}")
EOF
read -r -a patterns <<<"${GPU_BUNDLE_TESTS:-gpu* bnorm-unit bnorm-cli-*}"
while IFS=$'\t' read -r name exe; do
  keep=0
  for pat in "${patterns[@]}"; do
    # shellcheck disable=SC2053 # a pattern on purpose
    [[ "$name" == $pat ]] && keep=1 && break
  done
  ((keep)) || continue
  cp "$exe" "$dest/tests/$name"
  strip --strip-debug "$dest/tests/$name" 2>/dev/null || true
done <"$dest/.list"
rm -f "$dest/.list"

if [[ -f "$root/cli/Cargo.toml" ]]; then
  echo "gpu-bundle: building the bnorm command (bnorm-cli, features cudnn)" >&2
  cargo build --release -p bnorm-cli --features cudnn
  cp "$target_dir/release/bnorm" "$dest/bnorm"
  strip --strip-debug "$dest/bnorm" 2>/dev/null || true
else
  echo "gpu-bundle: no cli/ package, no bnorm binary in the bundle" >&2
fi
if [[ -n "${GPU_BUNDLE_VARIANT_FLAGS:-}" && -f "$root/cli/Cargo.toml" ]]; then
  echo "gpu-bundle: building bnorm-variant (BNORM_NVCC_FLAGS=$GPU_BUNDLE_VARIANT_FLAGS)" >&2
  BNORM_NVCC_FLAGS="$GPU_BUNDLE_VARIANT_FLAGS" cargo build --release -p bnorm-cli --features cudnn \
    --target-dir "$target_dir/variant"
  cp "$target_dir/variant/release/bnorm" "$dest/bnorm-variant"
  strip --strip-debug "$dest/bnorm-variant" 2>/dev/null || true
  # gzipped (19 -> 8 MB) so that the bundle with both tools stays under 64 MiB;
  # ci/gpu-session.sh unpacks it
  gzip -9 "$dest/bnorm-variant"
  echo "$GPU_BUNDLE_VARIANT_FLAGS" >"$dest/bnorm-variant.flags"
fi
for f in gpu-run.sh gpu-bench.sh gpu-all.sh torch_bench.py; do
  cp "$root/ci/$f" "$dest/$f"
done
chmod +x "$dest/gpu-run.sh" "$dest/gpu-bench.sh" "$dest/gpu-all.sh"

nvcc_bin="${NVCC:-$(command -v nvcc || true)}"
nvcc_version="$([[ -n "$nvcc_bin" ]] && "$nvcc_bin" --version 2>/dev/null | tail -n 1 || echo unknown)"
{
  echo "bnorm GPU bundle"
  echo "built:  $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "nvcc:   ${nvcc_bin:-(found by build.rs)}: $nvcc_version"
  echo "rustc:  $(rustc --version)"
  echo
  (cd "$dest" && find . -type f ! -name MANIFEST.txt -printf '%10s  %p\n' | sort -k2)
} >"$dest/MANIFEST.txt"

size="$(du -sb "$dest" | cut -f1)"
echo "gpu-bundle: $dest: $((size / 1024 / 1024)) MiB in $(find "$dest" -type f | wc -l) files" >&2
if ((size > limit)); then
  echo "gpu-bundle: the bundle exceeds 64 MiB" >&2
  exit 1
fi
