"""Every weight format against the machine's own limits, in one run.

For each GGUF block format lowbit reads (lowbit.formats: Q8_0, Q5_0, Q5_1, Q2_K .. Q6_K, IQ4_NL,
IQ4_XS, MXFP4) and lowbit's own int8, int4 (symmetric, lb.quantize's default W4A8: as Q4_0) and
int4a (asymmetric, with minima: as Q4_1), int4 in groups of 32:

* size: bytes held per weight against the bytes of the GGUF file (nbytes / file);
* cold GEMV (M = 1, int8 and float activations) on a ~128 MB weight (4x the last-level cache, so
  every call streams it from DRAM): GB/s of weight bytes read and the fraction of the machine's
  DRAM read bandwidth (lowbit's own probe, same threads);
* GEMM (M = 128, K = N = 4096, int8 activations): int8 multiply-adds per second and the fraction
  of the dot instruction's peak (lowbit's probe: VPDPBUSD throughput on AVX-512 VNNI).

Formats are timed interleaved, call by call, medians over the repeats (the machine is shared).

    python bench/formats.py [--threads 2] [--repeats 15] [--formats Q4_K,Q6_K] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import lowbit as lb
from lowbit import _core
from lowbit.formats import BLOCK_FORMATS
from lowbit.gguf import weight_from_blocks

COLD_BYTES = 128 << 20


def format_names(parser, text, default):
    """The formats of a --formats list (default: `default`); an unknown name is an argument error
    naming the choices."""
    if not text:
        return default
    names = text.split(",")
    known = list(INT_FORMATS) + sorted(BLOCK_FORMATS)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--formats: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def block_weight(name, n, k, rng):
    """An (n, k) weight of random valid blocks with moderate scales, and its GGUF file bytes."""
    f = BLOCK_FORMATS[name]
    raw = rng.integers(0, 256, (n, k // f.block * f.bytes), dtype=np.uint8)
    if name == "MXFP4":
        raw.reshape(-1, f.bytes)[:, 0] = rng.integers(118, 124, n * (k // f.block))
    parts = {p: a.copy() for p, a in weight_from_blocks(name, raw, k)._parts.items()}
    for p in ("d", "dm"):  # finite scales, so the timings never run on NaN / Inf
        if p in parts and parts[p].dtype == np.float16:
            parts[p][...] = rng.uniform(-0.01, 0.01, parts[p].shape).astype(np.float16)
    return lb.QuantizedWeight.from_blocks(name, (n, k), parts), raw.nbytes


INT_FORMATS = {"int8": 34, "int4": 18, "int4a": 20}  # bytes per 32 weights of the GGUF type alike


def int_weight(name, n, k, rng):
    """lowbit's own format `name` (INT_FORMATS) of a random (n, k) weight, and the bytes of the
    GGUF type alike (Q8_0, Q4_0, Q4_1)."""
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    qw = (lb.quantize(w, bits=8) if name == "int8"
          else lb.quantize(w, bits=4, group_size=32, symmetric=name == "int4"))
    return qw, n * k // 32 * INT_FORMATS[name]


def weights(names, k, rows_for, rng):
    out = {}
    for name in names:
        n = rows_for(name)
        if name in INT_FORMATS:
            # quantizing floats of a 128 MB weight is slow: build rows once, tile them
            qw, file_bytes = int_weight(name, 256, k, rng)
            qw = lb.concat_rows([qw] * (n // 256))
            file_bytes *= n // 256
        else:
            qw, file_bytes = block_weight(name, n, k, rng)
        out[name] = (qw, file_bytes)
    return out


def bits_per_weight(name):
    if name in INT_FORMATS:
        return INT_FORMATS[name] / 4
    f = BLOCK_FORMATS[name]
    return f.bytes * 8 / f.block


def interleaved(calls, repeats):
    """{name: median seconds} of fn() for each (name, fn), calls interleaved round by round."""
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm up (page faults of the output, thread pool)
    for _ in range(repeats):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--formats", help="comma-separated subset (default: all, and int8 / int4 / int4a)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    lb.set_num_threads(args.threads)
    names = format_names(p, args.formats, sorted(BLOCK_FORMATS) + list(INT_FORMATS))
    rng = np.random.default_rng(0)
    k = 4096

    probe = np.ones(512 << 20, np.uint8)
    dram = _core.read_bandwidth(probe, 3)
    del probe
    peak = _core.dot_peak(0.5)

    rows = lambda name: max(256, int(COLD_BYTES * 8 / bits_per_weight(name) / k) // 256 * 256)  # noqa: E731
    cold = weights(names, k, rows, rng)
    x1 = rng.normal(size=(1, k)).astype(np.float32)
    gemv = interleaved({(n, a): (lambda qw=qw, a=a: lb.matmul(x1, qw, activations=a))
                        for n, (qw, _) in cold.items()
                        for a in ("int8", "float")}, args.repeats)
    del cold
    hot = weights(names, k, lambda name: 4096, rng)
    x128 = rng.normal(size=(128, k)).astype(np.float32)
    gemm = interleaved({n: (lambda qw=qw: lb.matmul(x128, qw)) for n, (qw, _) in hot.items()},
                       max(3, args.repeats // 3))

    rows_out = []
    for name in names:
        qw, file_bytes = hot[name]
        n_cold = rows(name)
        nbytes_cold = qw.nbytes * n_cold / 4096
        r = {"format": name, "bits_per_weight": round(bits_per_weight(name), 3),
             "nbytes_over_file": round(qw.nbytes / file_bytes, 3)}
        for a in ("int8", "float"):
            if (name, a) in gemv:
                t = gemv[(name, a)]
                r[f"gemv_{a}_us"] = round(t * 1e6, 1)
                r[f"gemv_{a}_dram"] = round(nbytes_cold / t / dram, 3)
        r["gemm_int8_macs"] = 128 * 4096 * k / gemm[name]
        r["gemm_int8_peak"] = round(r["gemm_int8_macs"] / peak, 3)
        rows_out.append(r)
    info = {"lowbit": lb.__version__, "isa": lb.cpu_info()["isa"], "threads": args.threads,
            "dram_read_GBs": round(dram / 1e9, 2), "dot_peak_GMACs": round(peak / 1e9, 1)}
    if args.json:
        print(json.dumps({"machine": info, "formats": rows_out}))
        return
    print(f"kernel set {info['isa']}, {args.threads} threads; DRAM read {info['dram_read_GBs']} GB/s, "
          f"int8 dot peak {info['dot_peak_GMACs']} G multiply-adds/s")
    print(f"{'format':8s} {'bits/w':>6s} {'size/file':>9s} {'GEMV a8 us':>10s} {'of DRAM':>8s} "
          f"{'GEMV f32 us':>11s} {'of DRAM':>8s} {'GEMM a8 of peak':>15s}")
    for r in rows_out:
        f32 = (f"{r['gemv_float_us']:11.0f} {r['gemv_float_dram']:8.0%}" if "gemv_float_us" in r
               else f"{'-':>11s} {'-':>8s}")
        print(f"{r['format']:8s} {r['bits_per_weight']:6.2f} {r['nbytes_over_file']:9.3f} "
              f"{r['gemv_int8_us']:10.0f} {r['gemv_int8_dram']:8.0%} {f32} {r['gemm_int8_peak']:15.0%}")


if __name__ == "__main__":
    main()
