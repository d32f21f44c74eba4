#!/usr/bin/env python3
"""Combine repeated benchmark runs into one bench JSON: per case, the minimum over runs of
each run's median, for bnorm and for every peer alike (the machine's noise only ever adds
time; each run is a median of >= 20 calls). GB/s is that of the run whose median was kept;
the copy it is measured against is the fastest copy of that case over all runs (the copy is
timed once per case and run, and a slow copy would inflate % copy and % roofline: single
runs showed 150 % to 180 % for cases whose copy happened to hit a busy moment).

    python3 ci/merge_runs.py --ours a.json b.json --peer torch=t1.json --peer torch=t2.json \\
        --peer candle=c.json --out docs/bench/cpu-2026-11-26.json
"""
import argparse
import json


def key(r):
    return (r["op"], r["dtype"], r["layout"], tuple(r["dims"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", nargs="+", required=True)
    ap.add_argument("--peer", action="append", default=[], help="NAME=FILE (repeat a NAME for several runs)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = [json.load(open(f)) for f in a.ours]
    base = runs[0]
    best = {}
    copy = {}
    for run in runs:
        for r in run["records"]:
            k = key(r)
            if k not in best or r["ours_ms"] < best[k]["ours_ms"]:
                best[k] = dict(r)
            copy[k] = max(copy.get(k, 0.0), r["copy_gbps"])
    peers = {}
    for spec in a.peer:
        name, f = spec.split("=", 1)
        for r in json.load(open(f))["records"]:
            t = r.get(f"{name}_ms")
            if t is None:
                continue
            k = key(r)
            cur = peers.setdefault(name, {}).get(k)
            peers[name][k] = t if cur is None else min(cur, t)
    out = []
    for r in base["records"]:
        # the best run's record carries its own GB/s, % copy and % roofline
        b = best[key(r)]
        rec = {k: v for k, v in b.items() if not k.endswith("_ms") or k in ("ours_ms", "ours_min_ms")}
        # against the best copy: % copy and % roofline scale by the copy's ratio
        fastest = copy[key(r)]
        for pct in ("pct_copy", "pct_roofline"):
            rec[pct] = b[pct] * b["copy_gbps"] / fastest
        rec["copy_gbps"] = fastest
        for name, times in peers.items():
            if key(r) in times:
                rec[f"{name}_ms"] = times[key(r)]
        out.append(rec)
    meta = dict(base["meta"])
    meta["combined"] = {
        "ours_runs": a.ours,
        "peer_runs": a.peer,
        "rule": "per case, min over runs of each run's median (ours and peers alike); "
        "% copy and % roofline against the fastest copy of the case over the runs",
    }
    json.dump({"meta": meta, "records": out}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
