#!/usr/bin/env python3
"""PyTorch peer benchmark for bnorm's batch-normalization kernels.

Times torch's own batch norm (forward_train, inference, backward) on the
same shapes, dtypes and memory layouts our Rust bench uses, and writes the
medians plus effective bandwidth to JSON so the two can be compared.

Examples:
  python3 ci/torch_bench.py --device cpu --suite smoke --threads 2 --json smoke.json
  python3 ci/torch_bench.py --device cpu --suite resnet50 --only 32x64x56x56 --threads 2
  python3 ci/torch_bench.py --device cuda --suite all --batch 32 --batch 256 \
      --no-cudnn --json h100.json

Bandwidth formula (same as the Rust bench; per-channel arrays ignored):
  forward_train, inference: 2 * numel * elem_size  (read x, write y)
  backward:                 3 * numel * elem_size  (read x and dy, write dx)

Timing:
  cpu : time.perf_counter_ns around each call, ONE input buffer (hot cache
        when the tensor fits; "bytes" and "copy_gbps_same_size" show the
        regime), median of --reps after --warmup.
  cuda: a torch.cuda.Event pair per call, median of --reps after --warmup,
        rotating among enough input buffers that together they exceed 2x the
        L2 size.  The timed calls are queued behind a GPU sleep so the events
        measure GPU execution, not Python/launch overhead.

Only torch is required (numpy is not used).
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib

import torch
import torch.nn.functional as F

MOMENTUM = 0.1
EPS = 1e-5
SEED = 20240607
MiB = 1 << 20

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ALL_OPS = ("forward_train", "inference", "backward")
IMPL_NAMES = {0: "native", 1: "cudnn", 2: "miopen"}

# Per-image (C, H, W) shapes of the BatchNorm2d layers in ResNet-50.
RESNET50_CHW = [
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56),
    (128, 28, 28), (512, 28, 28), (256, 28, 28), (256, 14, 14),
    (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7),
]
RESNET50_FIXED = [(4096, 1024), (256, 4096), (8, 64, 16, 56, 56)]
SMOKE_FIXED = [(4, 64, 28, 28), (4, 32, 7, 7), (64, 128), (2, 8, 4, 8, 8)]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def dims_str(dims):
    return "x".join(str(d) for d in dims)


def parse_list(text, allowed, what):
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in allowed:
            raise SystemExit("unknown %s %r (allowed: %s)" % (what, t, ", ".join(allowed)))
    return items


def build_cases(suite, train_batches, infer_batches, ops):
    """Return an ordered list of (dims, ops-for-these-dims)."""
    train_ops = [o for o in ops if o != "inference"]
    infer_ops = [o for o in ops if o == "inference"]
    table = {}  # dims -> set of ops; dict keeps insertion order

    def add(dims, wanted):
        if wanted:
            table.setdefault(tuple(dims), set()).update(wanted)

    if suite in ("smoke", "all"):
        for dims in SMOKE_FIXED:  # fixed shapes, N is not substituted
            add(dims, ops)
    if suite in ("resnet50", "all"):
        for n in train_batches:
            for chw in RESNET50_CHW:
                add((n,) + chw, train_ops)
        for n in infer_batches:
            for chw in RESNET50_CHW:
                add((n,) + chw, infer_ops)
        for dims in RESNET50_FIXED:  # fixed shapes
            add(dims, ops)
    return [(d, [o for o in ALL_OPS if o in s]) for d, s in table.items()]


def memory_format(layout, ndim):
    if layout == "cf" or ndim < 4:
        return torch.contiguous_format
    if ndim == 4:
        return torch.channels_last
    if ndim == 5:
        return torch.channels_last_3d
    raise ValueError("channels-last layout needs a 4-D or 5-D tensor")


def cpu_model_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def schema(op):
    try:
        return str(op.default._schema)
    except Exception:  # pragma: no cover - schema introspection is best effort
        return None


class Timer:
    """Device-specific timing of a callable taking a buffer index."""

    def __init__(self, device, reps, warmup):
        self.device = device
        self.reps = reps
        self.warmup = warmup
        self.cuda = device.type == "cuda"
        self.l2_bytes = None
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            l2 = getattr(props, "L2_cache_size", None) or getattr(props, "l2_cache_size", None)
            self.l2_bytes = int(l2) if l2 else 50 * MiB
            # Cycles for the GPU sleep that lets the CPU queue all timed calls.
            self.sleep_cycles = int(getattr(props, "clock_rate", 0) or 0)  # kHz, may be absent

    def n_buffers(self, bytes_per_buffer):
        """How many input buffer sets to rotate among."""
        if not self.cuda:
            return 1
        n = max(2, math.ceil(2 * self.l2_bytes / max(1, bytes_per_buffer)) + 1)
        return n

    def _gpu_sleep(self, ms):
        # torch.cuda._sleep spins for a number of GPU clock cycles; it is a
        # private helper, so fall back to nothing if it is missing.
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is None:
            return
        khz = self.sleep_cycles or 2_000_000  # assume 2 GHz if unknown
        sleep(int(khz * ms))

    def median_ms(self, fn, nbuf):
        """fn(i) runs one call on buffer set i. Returns median milliseconds."""
        if self.cuda:
            return self._median_cuda(fn, nbuf)
        return self._median_cpu(fn)

    def _median_cpu(self, fn):
        for _ in range(self.warmup):
            fn(0)
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter_ns()
            out = fn(0)
            t1 = time.perf_counter_ns()
            times.append((t1 - t0) / 1e6)
            del out
        return statistics.median(times)

    def _median_cuda(self, fn, nbuf):
        k = 0
        for _ in range(self.warmup):
            fn(k % nbuf)
            k += 1
        torch.cuda.synchronize(self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        # Keep the stream busy while Python enqueues the timed calls.
        self._gpu_sleep(max(5.0, 0.5 * self.reps))
        for i in range(self.reps):
            starts[i].record()
            fn(k % nbuf)
            ends[i].record()
            k += 1
        torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return statistics.median(times)


def make_copy_timer(timer, device, numel, dtype, gen):
    """Median ms and GB/s of dst.copy_(src) for a tensor of `numel` elements."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    nbuf = timer.n_buffers(2 * nbytes)
    srcs = [torch.randn(numel, generator=gen, device=device, dtype=torch.float32).to(dtype)
            for _ in range(nbuf)]
    dsts = [torch.empty_like(s) for s in srcs]

    def fn(i):
        return dsts[i].copy_(srcs[i])

    ms = timer.median_ms(fn, nbuf)
    del srcs, dsts
    return ms, (2 * nbytes) / (ms * 1e-3) / 1e9


class Bench:
    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.timer = Timer(device, args.reps, args.warmup)
        self.gen = torch.Generator(device=device)
        self.copy_cache = {}

    # ---- data -----------------------------------------------------------
    def randn(self, dims, dtype, mf, seed):
        self.gen.manual_seed(seed)
        t = torch.randn(dims, generator=self.gen, device=self.device, dtype=torch.float32)
        return t.to(dtype).contiguous(memory_format=mf)

    def params(self, c, seed):
        self.gen.manual_seed(seed)
        kw = dict(generator=self.gen, device=self.device, dtype=torch.float32)
        weight = 1.0 + 0.1 * torch.randn(c, **kw)
        bias = 0.1 * torch.randn(c, **kw)
        rmean = 0.1 * torch.randn(c, **kw)
        rvar = 0.5 + torch.rand(c, **kw)
        return weight, bias, rmean, rvar

    def copy_same_size(self, numel, dtype):
        key = (numel, dtype)
        if key not in self.copy_cache:
            try:
                self.copy_cache[key] = make_copy_timer(self.timer, self.device, numel, dtype, self.gen)[1]
            except Exception as e:  # noqa: BLE001
                log("  copy %d x %s failed: %s" % (numel, dtype, e))
                self.copy_cache[key] = None
        return self.copy_cache[key]

    # ---- impl detection (cuda) ---------------------------------------------
    def impl_of(self, x, w, b, rm, rv, training, cudnn_enabled):
        """Which backend F.batch_norm dispatches to for these arguments."""
        r = torch.ops.aten._batch_norm_impl_index(
            x, w, b, rm.clone(), rv.clone(), training, MOMENTUM, EPS, cudnn_enabled)
        return IMPL_NAMES.get(int(r[4]), str(int(r[4])))

    # ---- ops -------------------------------------------------------------
    def time_forward(self, xs, w, b, rm, rv, training, cudnn):
        prev = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = cudnn
        try:
            def fn(i):
                return F.batch_norm(xs[i], rm, rv, w, b, training=training,
                                    momentum=MOMENTUM, eps=EPS)
            return self.timer.median_ms(fn, len(xs))
        finally:
            torch.backends.cudnn.enabled = prev

    def time_backward_native(self, xs, dys, w, b, rm, rv):
        saves = []
        for x in xs:
            _, sm, si = torch.ops.aten.native_batch_norm(
                x, w, b, rm.clone(), rv.clone(), True, MOMENTUM, EPS)
            saves.append((sm, si))

        def fn(i):
            sm, si = saves[i]
            return torch.ops.aten.native_batch_norm_backward(
                dys[i], xs[i], w, rm, rv, sm, si, True, EPS, [True, True, True])
        return self.timer.median_ms(fn, len(xs))

    def time_backward_dispatch(self, xs, dys, w, b, rm, rv):
        """What autograd of F.batch_norm runs on cuda (cudnn if eligible)."""
        saves = []
        impl = None
        for x in xs:
            r = torch.ops.aten._batch_norm_impl_index(
                x, w, b, rm.clone(), rv.clone(), True, MOMENTUM, EPS, True)
            impl = int(r[4])
            saves.append((r[1], r[2], r[3]))

        def fn(i):
            sm, sv, reserve = saves[i]
            return torch.ops.aten._batch_norm_impl_index_backward(
                impl, xs[i], dys[i], w, rm, rv, sm, sv, True, EPS,
                [True, True, True], reserve)
        return self.timer.median_ms(fn, len(xs)), IMPL_NAMES.get(impl, str(impl))

    # ---- one (dims, dtype, layout) group ------------------------------------
    def run_group(self, dims, ops, dtname, layout, seed):
        dtype = DTYPES[dtname]
        mf = memory_format(layout, len(dims))
        numel = math.prod(dims)
        es = torch.empty((), dtype=dtype).element_size()
        x_bytes = numel * es
        records = []
        copy_gbps = self.copy_same_size(numel, dtype)

        for op in ops:
            nbytes = (3 if op == "backward" else 2) * x_bytes
            rec = {"op": op, "dtype": dtname, "layout": layout, "dims": list(dims),
                   "torch_ms": None, "torch_gbps": None, "bytes": nbytes,
                   "copy_gbps_same_size": copy_gbps}
            if self.cuda and self.args.no_cudnn:
                rec["torch_native_ms"] = None
                rec["torch_native_gbps"] = None
            xs = dys = None
            try:
                w, b, rm, rv = self.params(dims[1], seed + 7)
                per_buf = x_bytes * (2 if op == "backward" else 1)
                nbuf = self.timer.n_buffers(per_buf)
                xs = [self.randn(dims, dtype, mf, seed + 100 * i) for i in range(nbuf)]
                if op == "backward":
                    dys = [self.randn(dims, dtype, mf, seed + 100 * i + 1) for i in range(nbuf)]
                    if self.cuda:
                        ms, impl = self.time_backward_dispatch(xs, dys, w, b, rm, rv)
                        rec["torch_impl"] = impl
                    else:
                        ms = self.time_backward_native(xs, dys, w, b, rm, rv)
                        rec["torch_impl"] = "native"
                else:
                    training = op == "forward_train"
                    if self.cuda:
                        rec["torch_impl"] = self.impl_of(xs[0], w, b, rm, rv, training,
                                                         torch.backends.cudnn.enabled)
                    else:
                        rec["torch_impl"] = "native"
                    ms = self.time_forward(xs, w, b, rm, rv, training,
                                           torch.backends.cudnn.enabled)
                rec["torch_ms"] = ms
                rec["torch_gbps"] = nbytes / (ms * 1e-3) / 1e9
                if self.cuda and self.args.no_cudnn:
                    if op == "backward":
                        nms = self.time_backward_native(xs, dys, w, b, rm, rv)
                    else:
                        nms = self.time_forward(xs, w, b, rm, rv, op == "forward_train", False)
                    rec["torch_native_ms"] = nms
                    rec["torch_native_gbps"] = nbytes / (nms * 1e-3) / 1e9
            except Exception as e:  # noqa: BLE001 - record, do not crash
                msg = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
                rec["error"] = msg
            finally:
                del xs, dys
                if self.cuda:
                    torch.cuda.empty_cache()
            records.append(rec)
        return records


def fmt_ms(v):
    return "-" if v is None else ("%.4f" % v if v < 1 else "%.3f" % v)


def fmt_gbps(v):
    return "-" if v is None else "%.1f" % v


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--suite", choices=["smoke", "resnet50", "all"], default="smoke")
    p.add_argument("--batch", type=int, action="append",
                   help="batch N for resnet50 training ops (repeatable; default 32)")
    p.add_argument("--infer-batch", type=int, action="append",
                   help="batch N for resnet50 inference (repeatable; default: --batch)")
    p.add_argument("--dtypes", default="f32,f16,bf16")
    p.add_argument("--layouts", default="cf,cl")
    p.add_argument("--ops", default=",".join(ALL_OPS))
    p.add_argument("--threads", type=int, default=None, help="cpu: torch.set_num_threads")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--only", action="append", default=None,
                   help="keep cases whose dims string (e.g. 32x64x56x56) contains SUBSTR "
                        "(repeatable; any match keeps)")
    p.add_argument("--no-cudnn", action="store_true",
                   help="cuda: also time with torch.backends.cudnn.enabled=False "
                        "(key torch_native_ms)")
    p.add_argument("--json", metavar="OUT.json", default=None)
    args = p.parse_args()

    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("--reps must be >= 1 and --warmup >= 0")
    dtypes = parse_list(args.dtypes, DTYPES, "dtype")
    layouts = parse_list(args.layouts, ("cf", "cl"), "layout")
    ops = parse_list(args.ops, ALL_OPS, "op")
    train_batches = args.batch or [32]
    infer_batches = args.infer_batch or train_batches

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
    if args.no_cudnn and device.type != "cuda":
        log("note: --no-cudnn has no effect on cpu")

    cases = build_cases(args.suite, train_batches, infer_batches, ops)
    if args.only:
        cases = [(d, o) for d, o in cases if any(s in dims_str(d) for s in args.only)]
    if not cases:
        raise SystemExit("no cases selected")

    torch.set_grad_enabled(False)
    bench = Bench(args, device)

    meta = {
        "torch_version": torch.__version__,
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_model_name()),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "reps": args.reps,
        "warmup": args.warmup,
        "momentum": MOMENTUM,
        "eps": EPS,
        "param_dtype": "f32",
        "bytes_formula": "forward_train/inference: 2*numel*elem_size; backward: 3*numel*elem_size",
    }
    if device.type == "cpu":
        meta["cpu_capability"] = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
        meta["timing"] = "perf_counter_ns per call, one buffer, median"
    else:
        meta["cudnn_version"] = torch.backends.cudnn.version()
        meta["cudnn_enabled"] = bool(torch.backends.cudnn.enabled)
        meta["l2_cache_bytes"] = bench.timer.l2_bytes
        meta["timing"] = ("cuda.Event pair per call, median; rotating input buffers whose total "
                          "exceeds 2x L2; calls queued behind a GPU sleep"
                          + ("" if hasattr(torch.cuda, "_sleep") else " (unavailable)"))
        meta["cuda_version"] = torch.version.cuda

    fwd = "torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training=%s, momentum=0.1, eps=1e-5) under no_grad"
    ops_used = {
        "forward_train": fwd % "True",
        "inference": fwd % "False",
    }
    if device.type == "cpu":
        ops_used["backward"] = ("torch.ops.aten.native_batch_norm_backward(grad_out, x, weight, running_mean, "
                                "running_var, save_mean, save_invstd, True, 1e-5, [True, True, True]); "
                                "save_* from torch.ops.aten.native_batch_norm(x, weight, bias, "
                                "running_mean, running_var, True, 0.1, 1e-5)")
    else:
        ops_used["backward"] = ("torch.ops.aten._batch_norm_impl_index_backward(impl, x, grad_out, weight, "
                                "running_mean, running_var, save_mean, save_var_transform, True, 1e-5, "
                                "[True, True, True], reserve) with impl/save_*/reserve from "
                                "torch.ops.aten._batch_norm_impl_index(..., True, 0.1, 1e-5, cudnn_enabled=True)"
                                " (the path autograd of F.batch_norm takes; torch_impl says cudnn or native)")
        ops_used["impl_detection"] = "torch.ops.aten._batch_norm_impl_index(...)[4]: 0 native, 1 cudnn, 2 miopen"
        if args.no_cudnn:
            ops_used["forward_native"] = "same F.batch_norm calls with torch.backends.cudnn.enabled=False"
            ops_used["backward_native"] = ("torch.ops.aten.native_batch_norm_backward after "
                                           "torch.ops.aten.native_batch_norm")
    ops_used["schemas"] = {name: schema(getattr(torch.ops.aten, name)) for name in (
        "native_batch_norm", "native_batch_norm_backward", "_batch_norm_impl_index",
        "_batch_norm_impl_index_backward", "_native_batch_norm_legit")
        if hasattr(torch.ops.aten, name)}
    meta["ops_used"] = ops_used

    big = 1 << 30 if device.type == "cuda" else 256 * MiB
    try:
        _, copy_gbps = make_copy_timer(bench.timer, device, big // 4, torch.float32, bench.gen)
    except Exception as e:  # noqa: BLE001
        log("copy bandwidth failed: %s" % e)
        copy_gbps = None
    meta["copy_gbps"] = copy_gbps
    meta["copy_bytes"] = big
    log("torch %s on %s (%s), threads=%d, copy %s GB/s (%d MiB buffers)" % (
        torch.__version__, device.type, meta["device_name"], meta["threads"],
        fmt_gbps(copy_gbps), big // MiB))

    records = []
    groups = []

    def write_json(partial):
        # Written after every group too, so a run cut short by a time limit keeps what it
        # measured ("partial": true until the end).
        if not args.json:
            return
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        meta["partial"] = partial
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
        os.replace(tmp, args.json)

    for dims, case_ops in cases:
        for dt in dtypes:
            lays = ["cf"] if len(dims) < 4 else layouts
            for lay in lays:
                groups.append((dims, case_ops, dt, lay))
    # 2-D cases get a single cf group even if only cl was asked for
    seen = set()
    for gi, (dims, case_ops, dt, lay) in enumerate(groups):
        key = (dims, dt, lay)
        if key in seen:
            continue
        seen.add(key)
        # seed depends only on the case, so --only/--dtypes filters do not change the data
        seed = SEED + zlib.crc32(("%s/%s/%s" % (dims_str(dims), dt, lay)).encode()) % 100000 * 1000
        t0 = time.perf_counter()
        recs = bench.run_group(dims, case_ops, dt, lay, seed)
        records.extend(recs)
        parts = []
        for r in recs:
            s = "%s=%s" % (r["op"], "ERR" if r.get("error") else fmt_ms(r["torch_ms"]) + "ms")
            if "torch_native_ms" in r and r["torch_native_ms"] is not None:
                s += "(native %sms)" % fmt_ms(r["torch_native_ms"])
            parts.append(s)
        log("[%d/%d] %s %s %s: %s  (%.1fs)" % (gi + 1, len(groups), dims_str(dims), dt, lay,
                                               " ".join(parts), time.perf_counter() - t0))
        for r in recs:
            if r.get("error"):
                log("    %s unsupported: %s" % (r["op"], r["error"]))
        write_json(True)

    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.json:
        write_json(False)
        log("wrote %s (%d records)" % (args.json, len(records)))

    native = device.type == "cuda" and args.no_cudnn
    hdr = "%-14s %-5s %-3s %-20s %10s %8s %8s" % ("op", "dtype", "lay", "dims", "torch_ms", "GB/s", "copyGB/s")
    if native:
        hdr += " %10s %8s" % ("native_ms", "GB/s")
    if device.type == "cuda":
        hdr += " impl"
    print(hdr)
    for r in records:
        line = "%-14s %-5s %-3s %-20s %10s %8s %8s" % (
            r["op"], r["dtype"], r["layout"], dims_str(r["dims"]),
            "ERR" if r.get("error") else fmt_ms(r["torch_ms"]),
            fmt_gbps(r["torch_gbps"]), fmt_gbps(r["copy_gbps_same_size"]))
        if native:
            line += " %10s %8s" % (fmt_ms(r.get("torch_native_ms")), fmt_gbps(r.get("torch_native_gbps")))
        if device.type == "cuda":
            line += " " + str(r.get("torch_impl", "-"))
        print(line)
    print("copy bandwidth (%d MiB): %s GB/s" % (big // MiB, fmt_gbps(copy_gbps)))
    n_err = sum(1 for r in records if r.get("error"))
    if n_err:
        print("%d record(s) unsupported/failed (see \"error\" in JSON)" % n_err)


if __name__ == "__main__":
    main()
