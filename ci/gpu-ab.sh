#!/usr/bin/env bash
# A/B of two bnorm binaries on the same GPU in one call: BASE and NEW alternate ROUNDS
# times over the same `bnorm bench` cases (base, new, base, new, ...), each run writing
# its JSON; the table printed last gives, per case, the minimum over the rounds of each
# binary's median, and base / new (> 1: NEW is faster). The spread between a binary's
# own rounds is printed too: a ratio inside it is noise.
#
# Usage: ci/gpu-ab.sh BASE NEW ROUNDS OUT_DIR -- BENCH_ARGS...
#   e.g. ci/gpu-ab.sh ./bnorm-base ./bnorm 2 /tmp/ab -- --device cuda --suite resnet50 \
#        --batch 256 --combos f16:cl,bf16:cl --ops forward_train,backward --reps 20 --warmup 3
set -uo pipefail
if (($# < 5)) || [[ "$5" != "--" ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
base="$1" new="$2" rounds="$3" out="$4"
shift 5
mkdir -p "$out"
PY="${PYTHON:-python3}"
for ((r = 1; r <= rounds; r++)); do
  for which in base new; do
    bin="$base"
    [[ "$which" == new ]] && bin="$new"
    "$bin" bench "$@" --json "$out/$which-$r.json" >"$out/$which-$r.txt" 2>&1 || {
      echo "gpu-ab: $which round $r failed (exit $?), see $out/$which-$r.txt"
      tail -n 5 "$out/$which-$r.txt"
    }
  done
done
"$PY" - "$out" "$rounds" <<'EOF'
import json, math, os, sys
out, rounds = sys.argv[1], int(sys.argv[2])
key = lambda r: (r["op"], r["dtype"], r["layout"], "x".join(map(str, r["dims"])))
runs = {"base": [], "new": []}
for w in runs:
    for r in range(1, rounds + 1):
        p = os.path.join(out, "%s-%d.json" % (w, r))
        if os.path.exists(p):
            runs[w].append({key(x): x["ours_ms"] for x in json.load(open(p))["records"]})
if not runs["base"] or not runs["new"]:
    sys.exit("gpu-ab: no results to compare")
cases = [k for k in runs["base"][0] if all(k in d for d in runs["base"] + runs["new"])]
print("%-14s %-5s %-3s %-16s %9s %9s %7s %7s %7s" % ("op", "dtype", "lay", "dims", "base_ms", "new_ms", "base/new", "spreadB", "spreadN"))
ratios = []
for k in cases:
    b = [d[k] for d in runs["base"]]
    n = [d[k] for d in runs["new"]]
    ratio = min(b) / min(n)
    ratios.append(ratio)
    print("%-14s %-5s %-3s %-16s %9.4f %9.4f %7.3f %7.3f %7.3f" % (k + (min(b), min(n), ratio, max(b) / min(b), max(n) / min(n))))
g = math.exp(sum(map(math.log, ratios)) / len(ratios))
print("geomean base/new over %d cases: %.3f (min %.3f, max %.3f); %d rounds each" % (len(ratios), g, min(ratios), max(ratios), rounds))
EOF
