"""The ``lowbit`` command: ``lowbit info``, ``lowbit bench``, ``lowbit quantize``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

from . import __version__
from .runtime import cpu_info


# aarch64 Linux names no CPU model in /proc/cpuinfo, only the MIDR codes: the implementers and the
# server cores lowbit's aarch64 kernel sets aim at (Graviton 2 / 3 / 4: Neoverse N1 / V1 / V2).
ARM_IMPLEMENTERS = {0x41: "Arm", 0x46: "Fujitsu", 0x48: "HiSilicon", 0x51: "Qualcomm",
                    0x61: "Apple", 0xC0: "Ampere"}
ARM_CORES = {(0x41, 0xD03): "Arm Cortex-A53", (0x41, 0xD08): "Arm Cortex-A72",
             (0x41, 0xD0B): "Arm Cortex-A76", (0x41, 0xD0C): "Arm Neoverse N1",
             (0x41, 0xD40): "Arm Neoverse V1", (0x41, 0xD49): "Arm Neoverse N2",
             (0x41, 0xD4F): "Arm Neoverse V2", (0xC0, 0xAC3): "Ampere-1",
             (0xC0, 0xAC4): "Ampere-1A"}


def cpu_name_from(cpuinfo: str, machine: str) -> str | None:
    """The CPU's name in the text of /proc/cpuinfo: x86's "model name"; on aarch64 the first core's
    implementer and part codes, named where known ("Arm Neoverse N1", else "Arm part 0xd4f")."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if machine.lower() not in ("aarch64", "arm64"):
        return fields.get("model name") or None
    try:
        implementer, part = int(fields["CPU implementer"], 16), int(fields["CPU part"], 16)
    except (KeyError, ValueError):
        return None  # (qemu-user before 8.1 shows the host's /proc/cpuinfo: not this CPU)
    if (implementer, part) in ARM_CORES:
        return ARM_CORES[implementer, part]
    who = ARM_IMPLEMENTERS.get(implementer, f"implementer {implementer:#04x}")
    return f"{who} part {part:#05x}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = cpu_name_from(f.read(), platform.machine())
    except OSError:
        name = None
    return name or platform.processor() or platform.machine()


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
    from . import bench

    shapes = args.shapes or (bench.PLOT_SHAPES if args.plot else bench.SHAPES)
    if args.plot:  # (before the timing, not after it)
        bench.plotting()
    info = cpu_info()
    threads = args.threads or info["num_threads"]
    rows = bench.quick_table(shapes=shapes, threads=args.threads)
    if args.plot:
        bench.plot(rows, args.plot, f"{cpu_name()}, kernels {info['isa']}, {threads} threads, "
                                    f"lowbit {__version__}")
        print(f"lowbit bench: plot written to {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(dict(version=__version__, cpu=cpu_name(), isa=info["isa"], threads=threads,
                              rows=rows)))
        return
    print(f"lowbit {__version__}: quantized Linear layers against numpy float32 matmul")
    print(f"{cpu_name()}, kernels {info['isa']}, {threads} threads; weights N(0,0.02), inputs N(0,1)")
    print("W8A8: int8 symmetric weights, int8 activations per row; W4A8: 4-bit asymmetric weights")
    print("(d q + m, groups of 32), int8 activations per 32 inputs; W4A32: the same 4-bit weights,")
    print("float32 activations. Times are medians per call.\n")
    head = f"{'M x N x K':>18}  {'format':<21} {'time':>9} {'vs numpy':>9} {'rel.err':>8} {'weights':>9}"
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        shape = f"{r['M']} x {r['N']} x {r['K']}"
        print(f"{shape if shape != last else '':>18}  {r['format']:<21} {r['us']:>7.0f}us "
              f"{r['speedup']:>8.1f}x {r['rel_error']:>8.4f} {r['weight_mb']:>6.1f} MB")
        last = shape


def read_tensors(path):
    """{name: array | QuantizedWeight | io.BF16} of a .gguf, .npz or safetensors / lowbit file
    (BF16 tensors as views of the file, read as float32 when used)."""
    from .gguf import load_gguf
    from .io import _load

    path = str(path)
    if path.lower().endswith(".gguf"):
        return load_gguf(path)
    if path.lower().endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return _load(path, bf16=True)  # BF16 tensors converted one at a time, as they are used


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


SETTINGS = ("bits", "group_size", "symmetric")


def check_settings(s, where):
    """lb.quantize settings {bits, group_size, symmetric} as the CLI takes them, or ValueError
    saying what `where` (an option, a plan entry) got wrong."""
    bits, group, sym = s["bits"], s["group_size"], s["symmetric"]
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group <= 0
                              or group % 32):
        raise ValueError(f"{where}: group_size must be a positive multiple of 32 or null (one scale "
                         f"per row), got {group!r}")
    if not isinstance(sym, bool):
        raise ValueError(f"{where}: symmetric must be true or false, got {sym!r}")
    if bits == 8 and not sym:
        raise ValueError(f"{where}: 8-bit weights are symmetric only")
    return s


def read_plan(path, default):
    """{tensor name: settings (the defaults overridden) or None to keep it}, every entry checked."""
    with open(path) as f:
        try:
            raw = json.load(f)
        except ValueError as e:
            raise ValueError(f"--plan {path}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--plan {path}: expected a JSON object {{name: settings or \"keep\"}}")
    plan = {}
    for name, entry in raw.items():
        where = f"--plan {path}: {name!r}"
        if entry == "keep":
            plan[name] = None
            continue
        if not isinstance(entry, dict) or set(entry) - set(SETTINGS):
            raise ValueError(f"{where}: expected \"keep\" or an object of {', '.join(SETTINGS)}, "
                             f"got {entry!r}")
        plan[name] = check_settings(dict(default, **entry), where)
    return plan


def same_file(a, b) -> bool:
    """Whether paths a and b name one file (through links, other spellings, hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


class Progress:
    """Progress of a loop over `total` items on stderr: a bar redrawn in place on a terminal,
    plain lines otherwise (a log keeps one line per item instead of one line of carriage returns)."""

    def __init__(self, total, stream=None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def step(self, label):
        self.done += 1
        if self.tty:
            filled = 30 * self.done // max(self.total, 1)
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label[:40]:<40}",
                  end="", file=self.stream, flush=True)
        else:
            print(f"[{self.done}/{self.total}] {label}", file=self.stream, flush=True)

    def close(self):
        if self.tty:
            print(file=self.stream)


def plan_tensors(tensors, plan, default, min_dim):
    """{name: settings or None (kept), reason kept}: plan entries must name tensors that exist
    and can be quantized with their settings; the defaults apply to the float matrices they fit."""
    from .io import BF16
    from .quantize import QuantizedWeight

    unknown = sorted(set(plan) - set(tensors))
    if unknown:
        raise ValueError(f"--plan names tensors the input does not hold: {', '.join(map(repr, unknown))}")
    jobs = {}
    for name, t in tensors.items():
        a = None if isinstance(t, QuantizedWeight) else t if isinstance(t, BF16) else np.asarray(t)
        matrix = a is not None and a.ndim == 2 and a.dtype.kind == "f"
        what = ("already quantized" if a is None else
                f"{'bfloat16' if isinstance(t, BF16) else a.dtype} of shape {a.shape}, not a 2-D "
                f"float matrix")
        if name in plan:
            s = plan[name]
            if s is None:
                jobs[name] = (None, "kept: plan")
                continue
            if not matrix:
                raise ValueError(f"--plan quantizes {name!r}, which is {what}")
            if s["group_size"] and a.shape[1] % s["group_size"]:
                raise ValueError(f"--plan: group_size {s['group_size']} does not divide the "
                                 f"{a.shape[1]} columns of {name!r}")
            jobs[name] = (s, None)
        elif not matrix:
            jobs[name] = (None, "kept")
        elif min(a.shape) < min_dim:
            jobs[name] = (None, f"kept: < --min-dim {min_dim}")
        elif default["group_size"] and a.shape[1] % default["group_size"]:
            jobs[name] = (None, f"kept: {a.shape[1]} % g{default['group_size']}")
        else:
            jobs[name] = (default, None)
    return jobs


def cmd_quantize(args):
    from .io import BF16, output_folder, release_pages, save
    from .quantize import QuantizedWeight, quantize

    output_folder(args.output)  # (before the work, not after it)
    inputs = [p for p in (args.input, args.calibration, args.plan) if p]
    for p in inputs:
        if same_file(args.output, p):
            raise ValueError(f"the output {args.output} is the input {p}: refusing to overwrite it")
    default = check_settings({"bits": args.bits, "group_size": args.group_size,
                              "symmetric": not args.asymmetric}, "--bits / --group-size / --asymmetric")
    plan = read_plan(args.plan, default) if args.plan else {}
    calibration = {}
    if args.calibration:
        with np.load(args.calibration, allow_pickle=False) as z:
            calibration = {k: z[k] for k in z.files}
    elif args.method in ("gptq", "awq"):
        raise ValueError(f"--method {args.method} needs --calibration (a .npz of input rows per tensor)")
    tensors = read_tensors(args.input)
    jobs = plan_tensors(tensors, plan, default, args.min_dim)
    todo = [name for name, (s, _) in jobs.items() if s is not None]
    if not todo:
        raise ValueError(f"{args.input}: nothing to quantize ({len(tensors)} tensors, none a float "
                         f"matrix the settings fit); no output written")
    missing = [n for n in todo if n not in calibration]
    if args.method in ("gptq", "awq") and missing:
        raise ValueError(f"--calibration {args.calibration}: no input rows for tensor"
                         f"{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    out, table = {}, []
    progress = Progress(len(tensors))
    for name, t in tensors.items():
        progress.step(name)
        s, kept = jobs[name]
        if s is None:
            out[name] = t
            kind = (t.format if isinstance(t, QuantizedWeight) else "bfloat16" if isinstance(t, BF16)
                    else f"{np.asarray(t).dtype}")
            table.append((name, t.shape, f"{kind} ({kept})", t.nbytes, t.nbytes, None))
            continue
        a = np.asarray(t)
        try:
            qw = quantize(a, bits=s["bits"], group_size=s["group_size"], symmetric=s["symmetric"],
                          method=args.method, calibration=calibration.get(name)
                          if args.method != "rtn" else None)
        except ValueError as e:  # (NaN weights, say): which tensor
            raise ValueError(f"tensor {name!r}: {e}") from None
        out[name] = qw
        g = f"g{qw.group_size}" if qw.group_size else "per-row"
        how = ("" if qw.symmetric else " asym") + ("" if args.method == "rtn" else " " + args.method)
        table.append((name, a.shape, f"int{qw.bits} {g}{how}", t.nbytes, qw.nbytes,
                      relative_error(a, qw)))
        release_pages(t.bits if isinstance(t, BF16) else a)
    progress.close()
    save(args.output, out)
    width = max([len(r[0]) for r in table] + [6])
    print(f"{'tensor':<{width}}  {'shape':>14}  {'format':<22} {'in MB':>8} {'out MB':>8} "
          f"{'rel.err':>8}  (on <= 1024 rows)")
    for name, shape, kind, before, after, err in table:
        e = "-" if err is None else f"{err:.4f}"
        print(f"{name:<{width}}  {str(tuple(shape)):>14}  {kind:<22} {before / 1e6:>8.2f} "
              f"{after / 1e6:>8.2f} {e:>8}")
    total_in, total_out = sum(r[3] for r in table), sum(r[4] for r in table)
    print(f"{len(table)} tensors ({len(todo)} quantized), {total_in / 1e6:.1f} MB -> "
          f"{total_out / 1e6:.1f} MB: {args.output}")


def shapes_arg(text):
    from .bench import parse_shapes

    try:
        return parse_shapes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(s):
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return n


def main(argv=None):
    p = argparse.ArgumentParser(prog="lowbit", description="Fast low-bit CPU kernels for numpy.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="CPU, kernels chosen and available, threads")
    pi.add_argument("--json", action="store_true")
    pi.set_defaults(fn=cmd_info)
    pb = sub.add_parser("bench", help="INT8 / INT4 Linear vs numpy float32: speed, accuracy, memory")
    pb.add_argument("--threads", type=positive_int, default=None)
    pb.add_argument("--json", action="store_true")
    pb.add_argument("--shapes", type=shapes_arg, metavar="MxNxK,...",
                    help="the shapes timed, e.g. 1x4096x4096,16x4096x4096 (default: M = 1, 16, 128 "
                         "at 4096 x 4096; with --plot M = 1, 2, 4, ..., 128)")
    pb.add_argument("--plot", metavar="FILE.png", help="also draw throughput against batch size "
                                                     "(needs matplotlib: lowbit[plot])")
    pb.set_defaults(fn=cmd_bench)
    pq = sub.add_parser("quantize", help="quantize the matrices of a safetensors / GGUF / .npz "
                                         "file into a lowbit file (see lb.load)")
    pq.add_argument("input")
    pq.add_argument("output")
    pq.add_argument("--bits", type=int, choices=(4, 8), default=8)
    pq.add_argument("--group-size", type=int, default=None,
                    help="a multiple of 32 (matrices whose width it does not divide stay float); "
                         "default: one scale per row")
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
    except BrokenPipeError:  # (lowbit info | head): the reader has gone; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (ValueError, TypeError, OSError, ImportError) as e:  # FormatError is a ValueError
        p.exit(2, f"lowbit {args.cmd}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
