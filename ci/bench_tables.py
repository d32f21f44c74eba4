#!/usr/bin/env python3
"""Markdown tables from a `bnorm bench --json` file (peers merged): one table per
(dtype, layout) with ours, each peer, speedups and % of roofline, then geometric means.

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


if __name__ == "__main__":
    main(sys.argv[1])
