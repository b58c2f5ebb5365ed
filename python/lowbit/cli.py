"""The ``lowbit`` command: ``lowbit info``, ``lowbit bench``."""
from __future__ import annotations

import argparse
import json
import platform
import sys

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
    pb.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
