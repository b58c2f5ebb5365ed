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
    print(f"lowbit {__version__}: INT8 Linear (dynamic int8 activations) vs numpy float32 matmul")
    print(f"{cpu_name()}, kernels {info['isa']}, {threads} threads; weights N(0,0.02), inputs N(0,1)\n")
    head = f"{'M x N x K':>18} {'numpy fp32':>11} {'lowbit int8':>12} {'speedup':>8} {'rel.err':>8} {'weights':>16}"
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = f"{r['M']} x {r['N']} x {r['K']}"
        mem = f"{r['fp32_mb']:.0f} -> {r['int8_mb']:.1f} MB"
        print(f"{shape:>18} {r['numpy_us']:>9.0f}us {r['lowbit_us']:>10.0f}us {r['speedup']:>7.1f}x "
              f"{r['rel_error']:>8.4f} {mem:>16}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="lowbit", description="Fast low-bit CPU kernels for numpy.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="CPU, kernels chosen and available, threads")
    pi.add_argument("--json", action="store_true")
    pi.set_defaults(fn=cmd_info)
    pb = sub.add_parser("bench", help="INT8 Linear vs numpy float32: speed, accuracy, memory")
    pb.add_argument("--threads", type=int, default=None)
    pb.add_argument("--json", action="store_true")
    pb.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
