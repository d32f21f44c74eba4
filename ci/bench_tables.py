#!/usr/bin/env python3
"""Markdown tables from a `bnorm bench --json` file (peers merged): one table per
(dtype, layout) with ours, each peer, speedups and % of roofline, then geometric means,
then issue 5's targets checked case by case (for a file with a `torch` peer) and the
channels-last / channels-first time ratios.

    python3 ci/bench_tables.py docs/bench/cpu-2026-11-26.json > /tmp/tables.md
"""
import json
import math
import sys
from collections import defaultdict


def geomean(v):
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def main(path):
    d = json.load(open(path))
    recs = d["records"]
    peers = sorted({k[:-3] for r in recs for k in r if k.endswith("_ms") and k not in ("ours_ms", "ours_min_ms")})
    groups = defaultdict(list)
    for r in recs:
        groups[(r["dtype"], r["layout"])].append(r)
    summary = []
    for (dt, ly), rs in sorted(groups.items()):
        print(f"\n#### {dt} {'channels-first' if ly == 'cf' else 'channels-last'}\n")
        head = "| dims | op | bnorm ms | GB/s | % roofline | where |" + "".join(f" {p} ms | vs {p} |" for p in peers)
        print(head)
        print("|" + "---|" * (6 + 2 * len(peers)))
        for r in rs:
            dims = "x".join(map(str, r["dims"]))
            line = f"| {dims} | {r['op']} | {r['ours_ms']:.3f} | {r['ours_gbps']:.1f} | {r['pct_roofline']:.0f} | {r['regime']} |"
            for p in peers:
                t = r.get(f"{p}_ms")
                line += f" {t:.3f} | {t / r['ours_ms']:.2f}x |" if t else " - | - |"
            print(line)
        for op in ("forward_train", "inference", "backward"):
            ops = [r for r in rs if r["op"] == op]
            if not ops:
                continue
            row = [dt, ly, op, f"{geomean([r['pct_roofline'] for r in ops]):.0f}"]
            for p in peers:
                s = [r[f"{p}_ms"] / r["ours_ms"] for r in ops if r.get(f"{p}_ms")]
                row.append(f"{geomean(s):.2f}x (min {min(s):.2f}x)" if s else "-")
            summary.append(row)
    print("\n#### Geometric means\n")
    print("| dtype | layout | op | % roofline |" + "".join(f" vs {p} |" for p in peers))
    print("|" + "---|" * (4 + len(peers)))
    for row in summary:
        print("| " + " | ".join(row) + " |")
    if "torch" in peers:
        targets(recs)
    layout_ratios(recs)


# issue 5: the columns with targets, and the targets
TARGET_COLUMNS = [("f32", "cf"), ("f32", "cl"), ("bf16", "cl"), ("f16", "cf")]
OPS = ("forward_train", "inference", "backward")


def targets(recs):
    """Issue 5's targets on its four columns, each listed as met or with what misses it."""
    cols = [r for r in recs if (r["dtype"], r["layout"]) in TARGET_COLUMNS]
    print("\n#### Issue 5 targets (f32 cf, f32 cl, bf16 cl, f16 cf)\n")
    print("| column | op | vs torch (>= 1.5x) | cases < 0.9x torch | vs candle (>= 10x) | % roofline (>= 85) |")
    print("|---|---|---|---|---|---|")
    for dt, ly in TARGET_COLUMNS:
        for op in OPS:
            rs = [r for r in cols if (r["dtype"], r["layout"], r["op"]) == (dt, ly, op)]
            if not rs:
                continue
            t = [r["torch_ms"] / r["ours_ms"] for r in rs if r.get("torch_ms")]
            low = [f"{'x'.join(map(str, r['dims']))} {r['torch_ms'] / r['ours_ms']:.2f}x" for r in rs
                   if r.get("torch_ms") and r["torch_ms"] / r["ours_ms"] < 0.9]
            c = [r["candle_ms"] / r["ours_ms"] for r in rs if r.get("candle_ms")]
            c_low = [f"{'x'.join(map(str, r['dims']))} {r['candle_ms'] / r['ours_ms']:.1f}x" for r in rs
                     if r.get("candle_ms") and r["candle_ms"] / r["ours_ms"] < 10]
            roof = geomean([r["pct_roofline"] for r in rs])

            def mark(ok, text):
                return text if ok else f"**{text}**"

            tg = geomean(t)
            print(f"| {dt} {ly} | {op} | {mark(tg >= 1.5, f'{tg:.2f}x')} | {mark(not low, ', '.join(low) or 'none')} | "
                  + (mark(not c_low, f"{geomean(c):.0f}x" + (f" (under 10x: {', '.join(c_low)})" if c_low else ""))
                     if c else "-")
                  + f" | {mark(roof >= 85, f'{roof:.0f}')} |")


def layout_ratios(recs):
    """bnorm's channels-last time over its channels-first time, same dtype, op and dims."""
    by = {(r["dtype"], r["layout"], r["op"], tuple(r["dims"])): r["ours_ms"] for r in recs}
    print("\n#### Channels-last / channels-first time (bnorm, same shape)\n")
    print("| dtype | op | geomean | max (case) |")
    print("|---|---|---|---|")
    for dt in ("f32", "f16", "bf16"):
        for op in OPS:
            pairs = [(by[(dt, "cl", op, d)] / t, d) for (d_t, ly, o, d), t in by.items()
                     if (d_t, ly, o) == (dt, "cf", op) and (dt, "cl", op, d) in by and len(d) > 2]
            if pairs:
                worst = max(pairs)
                print(f"| {dt} | {op} | {geomean([p for p, _ in pairs]):.2f} | {worst[0]:.2f} ({'x'.join(map(str, worst[1]))}) |")


if __name__ == "__main__":
    main(sys.argv[1])
