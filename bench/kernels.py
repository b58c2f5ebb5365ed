"""Each matmul kernel's fraction of its own limit across M = 1 .. 256, so that regressions show.

For every weight format (lowbit's int8, int4 (symmetric, the default W4A8) and int4a (with minima),
and each GGUF block format) and activation mode (int8; with --float also float32 for the
weight-only kernels), an N x K weight (default 4096 x 4096) is multiplied by M rows for M in 1, 2,
4, 8, 16, 64, 256. The limit of a call is the larger of

* its weight bytes over the read bandwidth of a buffer of the same size (lowbit's own probe, the
  same threads: a weight that fits in cache is held to the cache's speed, not DRAM's), and
* its multiply-adds over the int8 dot instruction's peak (lowbit's probe: VPDPBUSD on AVX-512
  VNNI, SDOT / SMMLA on aarch64; int8-activation kernels only),

and the table gives time(limit) / time(call): 100% is the roofline. Float-activation kernels are
held to bandwidth only (their FMA peak is not probed), so their large-M cells read low by design.
Timings are medians of interleaved repeats.

Then lb.nn.attention (float32 and precision="int8") at a MiniLM batch, a SmolLM2 prompt and a
decode step over a long cache: its multiply-adds per second (scores and weighted values, the keys
each query sees) and their share of the int8 dot peak; the softmax's exponentials are not counted,
so these read low by design, and a regression shows as a drop.

    python bench/kernels.py [--threads 2] [--repeats 7] [--formats int8,int4,Q4_K] [--float]
                            [--no-attention] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import lowbit as lb
from lowbit import _core
from lowbit.formats import BLOCK_FORMATS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formats import INT_FORMATS, block_weight, format_names, int_weight  # noqa: E402

MS = (1, 2, 4, 8, 16, 64, 256)


def median_time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--formats", help="comma-separated subset (default: int8, int4, int4a and every block format)")
    p.add_argument("--float", action="store_true", help="also the float-activation kernels")
    p.add_argument("--no-attention", action="store_true", help="leave out lb.nn.attention's rows")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    lb.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, k = args.n, args.k
    names = format_names(p, args.formats, list(INT_FORMATS) + sorted(BLOCK_FORMATS))

    peak = _core.dot_peak(0.5)
    bandwidth = {}  # bytes -> read bandwidth of a buffer that size

    def read_bw(nbytes):
        key = 1 << max(12, int(nbytes - 1).bit_length())  # per power of two
        if key not in bandwidth:
            buf = np.ones(key, np.uint8)
            bandwidth[key] = _core.read_bandwidth(buf, max(3, (1 << 30) // key))
        return bandwidth[key]

    xs = {m: rng.normal(size=(m, k)).astype(np.float32) for m in MS}
    rows = []
    for name in names:
        qw = (int_weight(name, n, k, rng) if name in INT_FORMATS
              else block_weight(name, n, k, rng))[0]
        bw = read_bw(qw.nbytes)
        modes = ("int8", "float") if args.float else ("int8",)
        for mode in modes:
            row = {"format": name, "activations": mode, "weight_MB": round(qw.nbytes / 1e6, 1),
                   "read_GBs": round(bw / 1e9, 1), "cells": {}}
            for m in MS:
                t = median_time(lambda: lb.matmul(xs[m], qw, activations=mode), args.repeats)
                t_bw = qw.nbytes / bw
                t_dot = m * n * k / peak if mode == "int8" else 0.0
                row["cells"][m] = {"us": round(t * 1e6, 1), "of_limit": round(max(t_bw, t_dot) / t, 3),
                                   "bound": "dot" if t_dot > t_bw else "bandwidth"}
            rows.append(row)
            if not args.json:
                if len(rows) == 1:
                    print(f"kernel set {lb.cpu_info()['isa']}, {args.threads} threads, N x K = {n} x {k}; "
                          f"int8 dot peak {peak / 1e9:.0f} G multiply-adds/s; % of the roofline "
                          f"(b: bandwidth-bound, d: dot-bound)")
                    print(f"{'format':8s} {'acts':5s} {'MB':>6s} {'GB/s':>6s} " +
                          " ".join(f"{f'M={m}':>8s}" for m in MS))
                cells = " ".join(f"{c['of_limit']:7.0%}{c['bound'][0]}" for c in row["cells"].values())
                print(f"{name:8s} {mode[:5]:5s} {row['weight_MB']:6.1f} {row['read_GBs']:6.1f} {cells}",
                      flush=True)
    attention = [] if args.no_attention else attention_rows(rng, peak, args.repeats)
    if args.json:
        print(json.dumps({"isa": lb.cpu_info()["isa"], "threads": args.threads,
                          "dot_peak_GMACs": round(peak / 1e9, 1), "kernels": rows,
                          "attention": attention}))
    elif attention:
        print(f"\nlb.nn.attention: G multiply-adds/s (q.k and weights.v over the keys each query "
              f"sees) and % of the int8 dot peak")
        print(f"{'case':34s} {'precision':9s} {'us':>9s} {'GMAC/s':>8s} {'of peak':>8s}")
        for r in attention:
            print(f"{r['case']:34s} {r['precision']:9s} {r['us']:9.1f} {r['GMACs']:8.1f} "
                  f"{r['of_dot_peak']:8.1%}")


# (name, B, Sq, Sk, H, Hkv, d, causal)
ATTENTION_CASES = [("MiniLM batch 32 x 128, 12 x 32", 32, 128, 128, 12, 12, 32, False),
                   ("SmolLM2 prompt 256, 9 / 3 x 64", 1, 256, 256, 9, 3, 64, True),
                   ("decode over 4096 keys, 9 / 3 x 64", 1, 1, 4096, 9, 3, 64, True)]


def attention_rows(rng, peak, repeats):
    rows = []
    for name, B, Sq, Sk, H, Hkv, d, causal in ATTENTION_CASES:
        q = rng.normal(size=(B, Sq, H, d)).astype(np.float32)
        k, v = (rng.normal(size=(B, Sk, Hkv, d)).astype(np.float32) for _ in range(2))
        out = np.empty_like(q)
        seen = Sq * Sk - (Sq * (Sq - 1) // 2 if causal else 0)  # (query, key) pairs
        macs = 2 * B * H * seen * d
        for precision in ("float32", "int8"):
            t = median_time(lambda: lb.nn.attention(q, k, v, causal=causal, out=out,
                                                    precision=precision), repeats)
            rows.append({"case": name, "precision": precision, "us": round(t * 1e6, 1),
                         "GMACs": round(macs / t / 1e9, 1), "of_dot_peak": round(macs / t / peak, 3)})
    return rows


if __name__ == "__main__":
    main()
