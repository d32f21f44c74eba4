#!/usr/bin/env bash
# Install the pinned CUDA 13.0 compiler from PyPI into a virtual environment (a few hundred
# MB; skipped when already there) and print the nvcc path as its last line: `NVCC=/.../nvcc`.
#
# Usage:  ci/install-nvcc.sh [DIR]        (default: $BNORM_NVCC_VENV, else ~/.cache/bnorm-nvcc)
#         export "$(ci/install-nvcc.sh | tail -n 1)"
#
# Needs python3 (with venv, or pip for a --target install) and, for nvcc itself, a host C++
# compiler (g++) on PATH: nvcc runs the host preprocessor even when it only emits PTX.
set -euo pipefail

dir="${1:-${BNORM_NVCC_VENV:-$HOME/.cache/bnorm-nvcc}}"
pkgs=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
stamp="$dir/.bnorm-nvcc-packages"

find_nvcc() {
  local c
  for c in "$dir"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc "$dir"/site/nvidia/cu13/bin/nvcc; do
    if [[ -x "$c" ]]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "${pkgs[*]}" ]] && find_nvcc >/dev/null; then
  echo "install-nvcc: ${pkgs[*]} already in $dir" >&2
else
  mkdir -p "$dir"
  if python3 -m venv "$dir" >/dev/null 2>&1; then
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "${pkgs[@]}" >&2
  else
    # no venv module (e.g. Debian without python3-venv): a plain --target install works too
    echo "install-nvcc: python3 -m venv unavailable; installing with pip --target $dir/site" >&2
    python3 -m pip install --quiet --disable-pip-version-check --target "$dir/site" "${pkgs[@]}" >&2
  fi
  printf '%s' "${pkgs[*]}" >"$stamp"
fi

nvcc="$(find_nvcc)" || {
  echo "install-nvcc: nvcc not found under $dir after installing" >&2
  exit 1
}

# Smoke test: one kernel to PTX for the architecture the build uses.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf '__global__ void k(float* a) { a[threadIdx.x] *= 2.0f; }\n' >"$tmp/k.cu"
if ! "$nvcc" -ptx -arch=compute_75 "$tmp/k.cu" -o "$tmp/k.ptx" >&2; then
  echo "install-nvcc: $nvcc cannot compile a test kernel (is g++ installed?)" >&2
  exit 1
fi
"$nvcc" --version | tail -n 2 >&2
echo "NVCC=$nvcc"
