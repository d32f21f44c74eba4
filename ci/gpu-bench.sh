#!/usr/bin/env bash
# The GPU measurement of issue 4, run from a bundle made by ci/gpu-bundle.sh on a machine
# with an NVIDIA GPU, PyTorch and no Rust toolchain (no cargo, no network). Writes into one
# folder:
#   env.txt                     nvidia-smi, torch / cuDNN / driver versions, the libcudnn used
#   bench.json / bench.txt      bnorm bench --device cuda --peer cudnn (ours, cuDNN, checks)
#   torch-*.json / .txt         ci/torch_bench.py --device cuda --no-cudnn (torch_ms, torch_native_ms)
#   persistent.json / .txt      the same cases that fit on chip with BNORM_CUDA_PERSISTENT=1
#   check-persistent.txt        bnorm check --device cuda with the persistent kernels
#   docs/bench/<gpu>-<date>.json  the records to commit: bench.json with PyTorch's times and
#                               the persistent times merged in by case
#   chart.svg                   bnorm chart: speedup per shape vs cuDNN and PyTorch
#   targets.txt                 every case with all peers side by side, and issue 4's targets
#                               against the measured numbers
#   ncu-<op>.txt                Nsight Compute on the worst case of each op's kernels (if ncu exists)
#   summary.txt                 one line per step: status, seconds
#
# Cases: resnet50 shapes at batch 256 (training forward, backward, inference) plus
# inference at batch 1 and 8, BatchNorm1d (4096, 1024), (256, 4096) and the 3-D shape, in
# the headline columns f32 channels-first, f16 and bf16 channels-last: 207 cases. 20 timed
# calls per case after 3 warm-up calls (DESIGN.md's minimum), rotating buffers over 2x L2.
#
# Time: every step has a limit derived from GPU_BENCH_BUDGET_S (default 290 s): the
# measurements first, then the persistent comparison, then ncu; a step that would not fit is
# reported NOT RUN. To go faster: GPU_BENCH_REPS, GPU_BENCH_INFER_BATCHES ("1 8" drops the
# batch-256 inference), GPU_BENCH_SKIP="torch persistent ncu".
#
# A dry run of the script's logic on a machine without a GPU (no cuDNN peer, a few cases):
#   GPU_BENCH_DEVICE=cpu GPU_BENCH_BATCH=2 GPU_BENCH_INFER_BATCHES=1 GPU_BENCH_SKIP="torch ncu" \
#   GPU_BENCH_EXTRA_ARGS="--only 2x512x7x7 --only 256x4096" ./gpu-bench.sh /tmp/out
#
# Usage: ./gpu-bench.sh [OUT_DIR]      (default: $OUT/bench when $OUT is set, else ./bench-out)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${OUT:+$OUT/bench}}"
out="${out:-$here/bench-out}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
t_start=$(date +%s)
budget="${GPU_BENCH_BUDGET_S:-290}"
reps="${GPU_BENCH_REPS:-20}"
infer_batches="${GPU_BENCH_INFER_BATCHES:-256 1 8}"
skip=" ${GPU_BENCH_SKIP:-} "
device="${GPU_BENCH_DEVICE:-cuda}"
batch="${GPU_BENCH_BATCH:-256}"
read -r -a extra_args <<<"${GPU_BENCH_EXTRA_ARGS:-}"
cudnn_peer=()
[[ "$device" == cuda* ]] && cudnn_peer=(--peer cudnn)
failed=0
cd "$here"

BNORM="$here/bnorm"
TORCH_BENCH="$here/torch_bench.py"
[[ -f "$TORCH_BENCH" ]] || TORCH_BENCH="$here/ci/torch_bench.py"
PY="${PYTHON:-python3}"

note() { echo "$*" | tee -a "$summary"; }
left() { echo $((budget - ($(date +%s) - t_start))); }

# step NAME WANT_SECONDS MIN_SECONDS LOG CMD...: run with limit min(WANT, time left - 5);
# NOT RUN when fewer than MIN_SECONDS are left.
step() {
  local name="$1" want="$2" min="$3" log="$4"
  shift 4
  local l=$(($(left) - 5))
  local limit=$((want < l ? want : l))
  if ((limit < min)); then
    note "$(printf '%-36s %-24s %4ss  %s' "$name" "NOT RUN: time budget" 0 "$(basename "$log")")"
    return 1
  fi
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
  note "$(printf '%-36s %-24s %4ss  %s' "$name" "$status" "$dt" "$(basename "$log")")"
  return $rc
}

# ---------------------------------------------------------------- environment
if [[ ! -x "$BNORM" ]]; then
  note "gpu-bench: no bnorm binary in $here (build the bundle with ci/gpu-bundle.sh)"
  exit 2
fi
# libcudnn from the PyTorch wheel: every nvidia/*/lib and torch/lib under site-packages,
# the folder holding libcudnn.so.9 first.
cudnn_path="$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site
roots = []
try:
    roots += site.getsitepackages()
except Exception:
    pass
try:
    roots.append(site.getusersitepackages())
except Exception:
    pass
dirs = []
for r in roots:
    dirs += sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib")))
    dirs += glob.glob(os.path.join(r, "torch", "lib"))
dirs = [d for d in dirs if os.path.isdir(d)]
first = [d for d in dirs if glob.glob(os.path.join(d, "libcudnn.so*"))]
print(":".join(first + [d for d in dirs if d not in first]))
EOF
)"
# cudarc asks the loader for `libcudnn.so` before `libcudnn.so.9`, and a wheel ships only the
# versioned name: a system libcudnn.so elsewhere on the path would win (the first H200 run
# loaded cuDNN 9.14.0 while PyTorch used its wheel's 9.19.0). An unversioned link to the
# wheel's library, first on the path, makes the peer load the library PyTorch uses.
wheel_cudnn="$(ls "${cudnn_path%%:*}"/libcudnn.so.9 2>/dev/null | head -n 1 || true)"
if [[ -n "$wheel_cudnn" ]]; then
  cudnn_link="$(mktemp -d /tmp/bnorm-cudnn-link.XXXXXX)"
  ln -s "$wheel_cudnn" "$cudnn_link/libcudnn.so"
  cudnn_path="$cudnn_link:$cudnn_path"
fi
export LD_LIBRARY_PATH="${cudnn_path}${cudnn_path:+:}${LD_LIBRARY_PATH:-}"
{
  echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host:   $(uname -n)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || echo "nvidia-smi failed"
  "$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"); print("python", sys.version.split()[0])' 2>&1
  echo "LD_LIBRARY_PATH (for libcudnn): $LD_LIBRARY_PATH"
  ls -l "${cudnn_path%%:*}"/libcudnn.so* 2>/dev/null || echo "no libcudnn.so* found under python's site-packages"
  echo "every libcudnn.so the loader's cache knows:"
  ldconfig -p 2>/dev/null | grep 'libcudnn\.so' || echo "  (none)"
  [[ -f "$here/MANIFEST.txt" ]] && cat "$here/MANIFEST.txt"
  "$BNORM" info 2>&1
} >"$out/env.txt" 2>&1
gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
slug="$(echo "${gpu_name:-gpu}" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')"
day="$(date -u +%Y-%m-%d)"

batches_args=()
for b in $infer_batches; do batches_args+=(--infer-batch "$b"); done
torch_infer=()
for b in $infer_batches; do torch_infer+=(--infer-batch "$b"); done

# ---------------------------------------------------------------- bnorm (+ cuDNN in the same run)
# First: ours against cuDNN is the measurement that matters most; PyTorch's numbers are
# merged into the records afterwards (by case), so a slow PyTorch run cannot starve it.
COMMON=(--device "$device" --suite resnet50 --batch "$batch" "${batches_args[@]}" --combos f32:cf,f16:cl,bf16:cl
  --reps "$reps" --warmup 3 "${extra_args[@]}")
step "bnorm bench ${cudnn_peer[*]}" 150 40 "$out/bench.txt" \
  "$BNORM" bench "${COMMON[@]}" "${cudnn_peer[@]}" --json "$out/bench.json"

# ---------------------------------------------------------------- PyTorch (cuDNN on and off)
if [[ "$skip" != *" torch "* ]]; then
  # the headline columns: f32 channels-first; f16 and bf16 channels-last. torch_bench.py
  # writes its JSON after every case group, so a run cut short keeps what it measured.
  for part in "f32 cf" "f16,bf16 cl"; do
    dts="${part% *}"
    lay="${part#* }"
    tag="${dts//,/-}-$lay"
    step "torch $tag" 75 20 "$out/torch-$tag.txt" \
      "$PY" "$TORCH_BENCH" --device cuda --suite resnet50 --batch "$batch" "${torch_infer[@]}" \
      --dtypes "$dts" --layouts "$lay" --reps "$reps" --warmup 3 --no-cudnn --json "$out/torch-$tag.json"
  done
fi

# ---------------------------------------------------------------- the persistent kernels
if [[ "$skip" != *" persistent "* ]]; then
  # shapes where a channel (tile) fits on chip: 7x7 and 14x14 planes at batch 256, BatchNorm1d
  # (256x256x14x14 does not fit: it shows the fallback to the default path)
  step "bnorm check (persistent)" 40 15 "$out/check-persistent.txt" \
    env BNORM_CUDA_PERSISTENT=1 "$BNORM" check --device "$device"
  step "bnorm bench (persistent)" 40 15 "$out/persistent.txt" \
    env BNORM_CUDA_PERSISTENT=1 "$BNORM" bench "${COMMON[@]}" --ops forward_train,backward \
    --only "${batch}x512x7x7" --only "${batch}x2048x7x7" --only "${batch}x256x14x14" --only 4096x1024 --only 256x4096 \
    --json "$out/persistent.json"
fi

# ---------------------------------------------------------------- records, chart, targets
mkdir -p "$out/docs/bench"
records="$out/docs/bench/$slug-$day.json"
if [[ -f "$out/bench.json" ]]; then
  "$PY" - "$out" "$records" <<'EOF' >"$out/targets.txt" 2>&1
import json, math, os, sys
out, dest = sys.argv[1], sys.argv[2]
bench = json.load(open(os.path.join(out, "bench.json")))
key = lambda r: (r["op"], r["dtype"], r["layout"], tuple(r["dims"]))
pers = {}
p = os.path.join(out, "persistent.json")
if os.path.exists(p):
    for r in json.load(open(p))["records"]:
        pers[key(r)] = r["ours_ms"]
torch_meta, torch = {}, {}
for f in sorted(os.listdir(out)):
    if f.startswith("torch-") and f.endswith(".json"):
        try:
            t = json.load(open(os.path.join(out, f)))
        except Exception as e:
            torch_meta[f] = {"error": str(e)}
            continue
        torch_meta[f] = t["meta"]
        for r in t["records"]:
            torch[key(r)] = r
for r in bench["records"]:
    t = torch.get(key(r))
    if t:
        for k in ("torch_ms", "torch_native_ms"):
            if t.get(k):
                r[k] = t[k]
        if t.get("torch_impl"):
            r["torch_impl"] = t["torch_impl"]
    if key(r) in pers:
        r["persistent"] = {"ours_ms": pers[key(r)], "speedup": r["ours_ms"] / pers[key(r)]}
bench["meta"]["torch"] = torch_meta
json.dump(bench, open(dest, "w"), indent=1)
print("records: %s (%d)" % (dest, len(bench["records"])))

def fmt(v):
    return "-" if v is None else ("%.4f" % v if v < 1 else "%.3f" % v)

print("\n%-14s %-5s %-3s %-16s %9s %9s %9s %9s %7s %7s %7s %6s %s" % ("op", "dtype", "lay", "dims", "ours_ms",
      "cudnn_ms", "torch_ms", "native_ms", "vs_cdn", "vs_tch", "vs_nat", "%roof", "cudnn mode"))
for r in bench["records"]:
    sp = lambda k: ("%6.2fx" % (r[k] / r["ours_ms"])) if r.get(k) else "      -"
    print("%-14s %-5s %-3s %-16s %9s %9s %9s %9s %7s %7s %7s %6.1f %s" % (r["op"], r["dtype"], r["layout"],
          "x".join(map(str, r["dims"])), fmt(r["ours_ms"]), fmt(r.get("cudnn_ms")), fmt(r.get("torch_ms")),
          fmt(r.get("torch_native_ms")), sp("cudnn_ms"), sp("torch_ms"), sp("torch_native_ms"), r["pct_roofline"],
          r.get("cudnn_best_mode", "-")))

def gm(v):
    v = [x for x in v if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")

recs = bench["records"]
batch = max([r["dims"][0] for r in recs if len(r["dims"]) == 4 and r["op"] != "inference"] or [256])
headline = [r for r in recs if r["dims"][0] == batch and len(r["dims"]) == 4]
print("\nissue 4 targets (resnet50 at batch %d, f32 cf / f16 cl / bf16 cl; speedup = peer time / ours)" % batch)
print("%-14s %-8s %8s %8s %8s %s" % ("op", "peer", "geomean", "min", "target", "ok"))
for op in ("forward_train", "inference", "backward"):
    rs = [r for r in headline if r["op"] == op]
    for peer, target in (("cudnn", 1.3), ("torch", 1.5), ("torch_native", 1.5)):
        s = [r[peer + "_ms"] / r["ours_ms"] for r in rs if r.get(peer + "_ms")]
        if not s:
            print("%-14s %-8s %8s" % (op, peer, "-"))
            continue
        g, m = gm(s), min(s)
        print("%-14s %-8s %7.2fx %7.2fx %7.1fx %s" % (op, peer, g, m, target, "yes" if g >= target and m >= 1.0 else "NO"))
print("\nbandwidth: %roofline (3 passes fwd, 5 bwd, 2 inference) on tensors larger than L2 (target >= 90)")
for op in ("forward_train", "inference", "backward"):
    rs = [r for r in headline if r["op"] == op and r.get("regime") == "DRAM"]
    if rs:
        worst = min(rs, key=lambda r: r["pct_roofline"])
        print("  %-14s geomean %5.1f%%  worst %5.1f%% (%s %s %s)" % (op, gm([r["pct_roofline"] for r in rs]),
              worst["pct_roofline"], worst["dtype"], worst["layout"], "x".join(map(str, worst["dims"]))))
small = [r for r in recs if r["op"] == "inference" and r["dims"][0] in (1, 8) and len(r["dims"]) == 4]
if small:
    slow = [r for r in small if r["ours_ms"] >= 0.005]
    print("\nsmall inference (batch 1 and 8): %d cases, max %.2f us (target < 5 us): %s" % (
        len(small), 1e3 * max(r["ours_ms"] for r in small), "yes" if not slow else "NO (%d over)" % len(slow)))
bn1d = [r for r in recs if len(r["dims"]) == 2 and r.get("torch_ms")]
if bn1d:
    print("\nBatchNorm1d vs PyTorch (target >= 2x):")
    for r in bn1d:
        print("  %-14s %-5s %-12s %6.2fx" % (r["op"], r["dtype"], "x".join(map(str, r["dims"])), r["torch_ms"] / r["ours_ms"]))
if pers:
    print("\npersistent kernels (BNORM_CUDA_PERSISTENT=1) vs the default path (speedup > 1: persistent faster):")
    for r in recs:
        if "persistent" in r:
            print("  %-14s %-5s %-3s %-14s %8.4f ms -> %8.4f ms  %5.2fx" % (r["op"], r["dtype"], r["layout"],
                  "x".join(map(str, r["dims"])), r["ours_ms"], r["persistent"]["ours_ms"], r["persistent"]["speedup"]))
EOF
  note "$(printf '%-36s %-24s %4ss  %s' "records + targets" "ok" 0 "$(basename "$records"), targets.txt")"
  step "bnorm chart" 20 5 "$out/chart.txt" "$BNORM" chart --json "$records" --svg "$out/chart.svg" || true
fi

# ---------------------------------------------------------------- ncu on the worst cases
ncu_bin="$(command -v ncu || true)"
if [[ -z "$ncu_bin" ]]; then
  for c in /usr/local/cuda/bin/ncu /usr/local/cuda-*/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
    [[ -x "$c" ]] && ncu_bin="$c" && break
  done
fi
if [[ "$skip" == *" ncu "* ]]; then
  note "ncu                                  NOT RUN: GPU_BENCH_SKIP"
elif [[ -z "$ncu_bin" ]]; then
  note "ncu                                  NOT RUN: not installed on this machine"
elif [[ -f "$out/bench.json" ]]; then
  METRICS="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,sm__maximum_warps_per_active_cycle_pct,launch__registers_per_thread,launch__grid_size,launch__block_size,launch__shared_mem_per_block_dynamic"
  # the worst DRAM-regime case of each op (lowest % of the pass-count roofline)
  "$PY" - "$out/bench.json" >"$out/ncu-cases.txt" <<'EOF'
import json, sys
recs = json.load(open(sys.argv[1]))["records"]
for op, kernels in (("forward_train", "^bn_fwd"), ("backward", "^bn_bwd"), ("inference", "^bn_fwd_norm")):
    rs = [r for r in recs if r["op"] == op and r.get("regime") == "DRAM"] or [r for r in recs if r["op"] == op]
    if rs:
        w = min(rs, key=lambda r: r["pct_roofline"])
        # --batch only matters for the resnet shapes (4-D); 256 keeps --only unambiguous otherwise
        batch = w["dims"][0] if len(w["dims"]) == 4 else 256
        print(op, kernels, w["dtype"] + ":" + w["layout"], "x".join(map(str, w["dims"])), batch)
EOF
  while read -r op kernels combo dims batch; do
    step "ncu $op $combo $dims" 40 15 "$out/ncu-$op.txt" \
      "$ncu_bin" --clock-control none --target-processes all --kernel-name "regex:$kernels" --launch-count 2 --metrics "$METRICS" \
      "$BNORM" bench --device "$device" --suite resnet50 --batch "$batch" --infer-batch "$batch" --combos "$combo" \
      --ops "$op" --only "$dims" --reps 1 --warmup 0 || true
  done <"$out/ncu-cases.txt"
fi

note "total $(($(date +%s) - t_start))s of ${budget}s; output in $out"
if [[ $failed -ne 0 ]]; then
  note "gpu-bench: SOME STEPS FAILED"
  exit 1
fi
note "gpu-bench: all steps that ran passed"
