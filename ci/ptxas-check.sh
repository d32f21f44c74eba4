#!/usr/bin/env bash
# Assemble every kernel PTX of the last build with `ptxas -v` for sm_80 and sm_90 (no GPU
# needed), print a table (kernel | arch | registers | spill stores | spill loads | stack |
# static smem, bytes; the channels-last reductions add dynamic smem at launch) and fail on
# any spill. The same PTX, assembled the same way, is the SASS build.rs
# embeds for those architectures.
#
# Usage: ci/ptxas-check.sh [FILE.ptx ...]
#   Without arguments: the PTX of the most recent build (target/*/build/bnorm-*/out/*.ptx).
#   ptxas: $PTXAS, else next to $NVCC, else on PATH. Architectures: $BNORM_PTXAS_ARCHS
#   (default "sm_80 sm_90").
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

ptxas="${PTXAS:-}"
if [[ -z "$ptxas" && -n "${NVCC:-}" && -x "$(dirname "$NVCC")/ptxas" ]]; then
  ptxas="$(dirname "$NVCC")/ptxas"
fi
if [[ -z "$ptxas" ]]; then
  ptxas="$(command -v ptxas || true)"
fi
if [[ -z "$ptxas" ]]; then
  echo "ptxas-check: no ptxas (set PTXAS or NVCC; ci/install-nvcc.sh installs one)" >&2
  exit 2
fi

files=("$@")
if [[ ${#files[@]} -eq 0 ]]; then
  newest="$(ls -t "$root"/target/*/build/bnorm-*/out/*.ptx 2>/dev/null | head -n 1 || true)"
  if [[ -z "$newest" ]]; then
    echo "ptxas-check: no PTX under target/*/build/bnorm-*/out (build with NVCC set first)" >&2
    exit 2
  fi
  files=("$(dirname "$newest")"/*.ptx)
fi
archs="${BNORM_PTXAS_ARCHS:-sm_80 sm_90}"

echo "ptxas: $ptxas ($("$ptxas" --version | tail -n 1))"
echo "PTX:   ${files[*]}"
echo
printf '| %-28s | %-5s | %9s | %12s | %11s | %5s | %5s |\n' kernel arch registers "spill stores" "spill loads" stack "smem"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..30})" "-------" "-----------" "--------------" "-------------" "-------" "-------"

bad=0
rows=0
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
for arch in $archs; do
  for f in "${files[@]}"; do
    if ! "$ptxas" -v --gpu-name "$arch" "$f" -o /dev/null 2>"$tmp"; then
      cat "$tmp" >&2
      echo "ptxas-check: ptxas failed on $f for $arch" >&2
      exit 1
    fi
    # ptxas -v prints, per entry point: "Compiling entry function 'NAME' for 'sm_XY'",
    # "Function properties for NAME", "N bytes stack frame, N bytes spill stores, N bytes
    # spill loads", "Used N registers, ... [N bytes smem, ...]".
    out="$(awk '
      /Compiling entry function/ { s = $0; sub(/.*function ./, "", s); sub(/. for .*/, "", s); fn = s; st = 0; ld = 0; fr = 0 }
      /bytes stack frame/ { s = $0; sub(/^[^0-9]*/, "", s); split(s, p, " "); fr = p[1]; st = p[5]; ld = p[9] }
      /Used [0-9]+ registers/ {
        s = $0; sub(/.*Used /, "", s); split(s, p, " "); regs = p[1]; smem = 0
        t = $0; if (t ~ /bytes smem/) { sub(/ bytes smem.*/, "", t); sub(/.* /, "", t); smem = t }
        printf "%s %s %s %s %s %s\n", fn, regs, st, ld, fr, smem
      }' "$tmp")"
    while read -r fn regs st ld fr smem; do
      [[ -z "$fn" ]] && continue
      rows=$((rows + 1))
      flag=""
      if [[ "$st" != 0 || "$ld" != 0 ]]; then
        bad=$((bad + 1))
        flag="  <-- SPILL"
      elif [[ "$fr" != 0 ]]; then
        flag="  (stack frame: local memory without spills)"
      fi
      printf '| %-28s | %-5s | %9s | %12s | %11s | %5s | %5s |%s\n' "$fn" "$arch" "$regs" "$st" "$ld" "$fr" "$smem" "$flag"
    done <<<"$out"
  done
done

echo
if [[ $rows -eq 0 ]]; then
  echo "ptxas-check: no kernels found" >&2
  exit 1
fi
if [[ $bad -ne 0 ]]; then
  echo "ptxas-check: FAILED: $bad kernel/arch pairs spill registers" >&2
  exit 1
fi
echo "ptxas-check: $rows kernel/arch pairs, no spills"
