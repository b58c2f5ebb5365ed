"""The ``lowbit`` command: ``lowbit info``, ``lowbit bench``, ``lowbit quantize``."""
from __future__ import annotations

import argparse
import json
import platform
import sys

import numpy as np

from . import __version__
from .runtime import cpu_info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cmd_info(args):
    info = cpu_info()
    if args.json:
        print(json.dumps(dict(info, cpu=cpu_name(), version=__version__)))
        return
    print(f"lowbit {__version__} on {cpu_name()}")
    print(f"  kernels in use : {info['isa']}")
    print(f"  available      : {', '.join(info['available'])}")
    print(f"  compiled       : {', '.join(info['compiled'])}")
    print(f"  threads        : {info['num_threads']}")
    print(f"  CPU flags      : {' '.join(f for f, on in info['features'].items() if on) or '-'}")


def cmd_bench(args):
    from .bench import quick_table

    info = cpu_info()
    rows = quick_table(threads=args.threads)
    if args.plot:
        from .bench import plot
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(dict(cpu=cpu_name(), isa=info["isa"], rows=rows)))
        return
    threads = args.threads or info["num_threads"]
    print(f"lowbit {__version__}: quantized Linear layers against numpy float32 matmul")
    print(f"{cpu_name()}, kernels {info['isa']}, {threads} threads; weights N(0,0.02), inputs N(0,1)")
    print("W8A8: int8 weights, int8 activations per row; W4A8: 4-bit weights, int8 activations per")
    print("32 inputs; W4A32: 4-bit weights, float32 activations. Times are medians per call.\n")
    head = f"{'M x N x K':>18}  {'format':<17} {'time':>9} {'vs numpy':>9} {'rel.err':>8} {'weights':>9}"
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        shape = f"{r['M']} x {r['N']} x {r['K']}"
        print(f"{shape if shape != last else '':>18}  {r['format']:<17} {r['us']:>7.0f}us "
              f"{r['speedup']:>8.1f}x {r['rel_error']:>8.4f} {r['weight_mb']:>6.1f} MB")
        last = shape


def read_tensors(path):
    """{name: array | QuantizedWeight} of a .gguf, .npz or safetensors / lowbit file."""
    from .gguf import load_gguf
    from .io import load

    path = str(path)
    if path.endswith(".gguf"):
        return load_gguf(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return load(path)


def relative_error(a, qw, sample=1024):
    """||dequantize(qw) - a|| / ||a|| over at most `sample` evenly spread rows (an estimate that
    costs no full float copy and little time on large matrices)."""
    rows = np.unique(np.linspace(0, a.shape[0] - 1, min(sample, a.shape[0])).astype(np.intp))
    ref = np.ascontiguousarray(a[rows], dtype=np.float32)
    err = qw.dequantize(rows=rows)
    err -= ref
    den, num = _sum_of_squares(ref), _sum_of_squares(err)
    return float(np.sqrt(num / den)) if den else 0.0


def _sum_of_squares(x):
    x = x.ravel()
    s = float(np.dot(x, x))  # float32 BLAS: plenty for a 4-digit estimate
    return s if np.isfinite(s) else float(np.dot(x.astype(np.float64), x.astype(np.float64)))


def cmd_quantize(args):
    from .io import release_pages, save
    from .quantize import QuantizedWeight, quantize

    plan = {}
    if args.plan:
        with open(args.plan) as f:
            plan = json.load(f)
        if not isinstance(plan, dict):
            raise ValueError(f"{args.plan}: expected a JSON object {{name: settings or \"keep\"}}")
    default = {"bits": args.bits, "group_size": args.group_size, "symmetric": not args.asymmetric}
    calibration = {}
    if args.calibration:
        with np.load(args.calibration, allow_pickle=False) as z:
            calibration = {k: z[k] for k in z.files}
    elif args.method in ("gptq", "awq"):
        raise ValueError(f"--method {args.method} needs --calibration (a .npz of input rows per tensor)")
    tensors = read_tensors(args.input)
    out, table = {}, []
    for i, (name, t) in enumerate(tensors.items()):
        print(f"\r[{i + 1}/{len(tensors)}] {name[:60]:<60}", end="", file=sys.stderr, flush=True)
        settings = plan.get(name, default)
        s = None if settings == "keep" else dict(default, **settings)
        a = None if isinstance(t, QuantizedWeight) else np.asarray(t)
        if (s and a is not None and a.ndim == 2 and a.dtype.kind == "f"
                and min(a.shape) >= args.min_dim
                and (s["group_size"] is None or a.shape[1] % s["group_size"] == 0)):
            if args.method in ("gptq", "awq") and name not in calibration:
                raise ValueError(f"--calibration {args.calibration}: no input rows for tensor {name!r}")
            qw = quantize(a, bits=s["bits"], group_size=s["group_size"], symmetric=s["symmetric"],
                          method=args.method, calibration=calibration.get(name)
                          if args.method != "rtn" else None)
            out[name] = qw
            g = f"g{qw.group_size}" if qw.group_size else "per-row"
            how = ("" if qw.symmetric else " asym") + ("" if args.method == "rtn" else " " + args.method)
            table.append((name, a.shape, f"int{qw.bits} {g}{how}",
                          a.nbytes, qw.nbytes, relative_error(a, qw)))
            release_pages(a)
        else:
            out[name] = t
            kind = f"{t.format} (kept)" if a is None else f"{a.dtype} (kept)"
            table.append((name, t.shape, kind, t.nbytes, t.nbytes, None))
    print(file=sys.stderr)
    save(args.output, out)
    width = max([len(r[0]) for r in table] + [6])
    print(f"{'tensor':<{width}}  {'shape':>14}  {'format':<18} {'in MB':>8} {'out MB':>8} "
          f"{'rel.err':>8}  (on <= 1024 rows)")
    for name, shape, kind, before, after, err in table:
        e = "-" if err is None else f"{err:.4f}"
        print(f"{name:<{width}}  {str(tuple(shape)):>14}  {kind:<18} {before / 1e6:>8.2f} "
              f"{after / 1e6:>8.2f} {e:>8}")
    total_in, total_out = sum(r[3] for r in table), sum(r[4] for r in table)
    print(f"{len(table)} tensors, {total_in / 1e6:.1f} MB -> {total_out / 1e6:.1f} MB: {args.output}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="lowbit", description="Fast low-bit CPU kernels for numpy.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="CPU, kernels chosen and available, threads")
    pi.add_argument("--json", action="store_true")
    pi.set_defaults(fn=cmd_info)
    pb = sub.add_parser("bench", help="INT8 / INT4 Linear vs numpy float32: speed, accuracy, memory")
    pb.add_argument("--threads", type=int, default=None)
    pb.add_argument("--json", action="store_true")
    pb.add_argument("--plot", metavar="FILE.png", help="also draw throughput against batch size "
                                                     "(needs matplotlib: lowbit[plot])")
    pb.set_defaults(fn=cmd_bench)
    pq = sub.add_parser("quantize", help="quantize the matrices of a safetensors / GGUF / .npz "
                                         "file into a lowbit file (see lb.load)")
    pq.add_argument("input")
    pq.add_argument("output")
    pq.add_argument("--bits", type=int, choices=(4, 8), default=8)
    pq.add_argument("--group-size", type=int, default=None, help="default: one scale per row")
    pq.add_argument("--asymmetric", action="store_true", help="4-bit with minima (like Q4_1)")
    pq.add_argument("--method", choices=("rtn", "mse", "gptq", "awq"), default="rtn",
                    help="see lb.quantize; gptq and awq need --calibration")
    pq.add_argument("--calibration", help=".npz of {tensor name: input rows (S, in_features)} "
                                          "for the calibrated methods")
    pq.add_argument("--min-dim", type=int, default=32,
                    help="keep float matrices with a dimension below this (default 32)")
    pq.add_argument("--plan", help='JSON {tensor name: {"bits": .., "group_size": .., '
                                   '"symmetric": ..} or "keep"} overriding the defaults')
    pq.set_defaults(fn=cmd_quantize)
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, TypeError, OSError, ImportError) as e:  # FormatError is a ValueError
        p.exit(2, f"lowbit {args.cmd}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
