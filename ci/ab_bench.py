#!/usr/bin/env python3
"""A/B two `bnorm` binaries case by case, interleaved, on this machine.

A run of the whole suite with one binary, then with the other, mixes the change with the
machine's drift (this VM's speed moves by 10 % to 50 % over minutes). Here each case runs
`bnorm bench --only` with A, then B, then B, then A, ... (`--rounds` times each), and the
minimum of each binary's medians is compared: both see the same windows of noise.

    python3 ci/ab_bench.py --a /tmp/bnorm-before --b target/release/bnorm --rounds 8 \\
        --case f16:cf:backward:32x128x28x28 --case f32:cl:inference:32x256x14x14

A case is DTYPE:LAYOUT:OP:DIMS (OP: forward_train, inference or backward; DIMS as the suite
prints them). Prints one line per case and the geometric mean of A/B (> 1: B is faster).
"""
import argparse
import json
import math
import os
import subprocess
import tempfile


def time_case(binary, case, reps, threads):
    dtype, layout, op, dims = case.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [binary, "bench", "--device", "cpu", "--suite", "resnet50", "--combos", f"{dtype}:{layout}", "--ops", op, "--only", dims, "--reps", str(reps), "--json", out]
        if threads:
            cmd += ["--threads", str(threads)]
        subprocess.run(cmd, check=True, capture_output=True)
        recs = json.load(open(out))["records"]
    hits = [r["ours_ms"] for r in recs if "x".join(map(str, r["dims"])) == dims]
    if not hits:
        raise SystemExit(f"{case}: not in the resnet50 suite (batch 32)")
    return hits[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the baseline bnorm binary")
    ap.add_argument("--b", required=True, help="the changed bnorm binary")
    ap.add_argument("--case", action="append", required=True, help="DTYPE:LAYOUT:OP:DIMS (repeatable)")
    ap.add_argument("--rounds", type=int, default=6, help="runs of each binary per case")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per run (the run's median is kept)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    args = ap.parse_args()
    ratios = []
    for case in args.case:
        t = {args.a: [], args.b: []}
        for i in range(args.rounds):
            for b in (args.a, args.b) if i % 2 == 0 else (args.b, args.a):
                t[b].append(time_case(b, case, args.reps, args.threads))
        a, b = min(t[args.a]), min(t[args.b])
        ratios.append(a / b)
        print(f"{case:40s} A {a:8.4f} ms  B {b:8.4f} ms  A/B {a / b:.3f}", flush=True)
    print(f"geomean A/B {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f} over {len(ratios)} cases")


if __name__ == "__main__":
    main()
