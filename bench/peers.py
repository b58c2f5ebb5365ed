"""lowbit INT8 against its peers, in one process: numpy float32, PyTorch dynamic quantized Linear
(FBGEMM), ONNX Runtime dynamic int8 (MatMulInteger via quantize_dynamic). Peers that are not
installed are skipped (pip install .[bench]).

    python bench/peers.py                 # writes bench/RESULTS.md
    python bench/peers.py --quick --out -  # fewer shapes, print only

Every time is the median of many calls, float32 in and float32 out, activation quantization
included. Threads: 1 and all this process may use, set the same for every library.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
import warnings

import numpy as np

import lowbit as lb
from lowbit.bench import design_problem, machine_limits, median_time, relative_error
from lowbit.cli import cpu_name

SHAPES = [(1, 4096, 4096), (1, 11008, 4096), (16, 4096, 4096), (128, 4096, 4096)]


def numpy_threads(n):
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(n)
    except ImportError:
        return None


def torch_peer(w):
    try:
        import torch
    except ImportError:
        return None
    warnings.filterwarnings("ignore")
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = torch.from_numpy(w.copy())
    q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)

    def run(x):
        with torch.no_grad():
            return q(torch.from_numpy(x)).numpy()
    return run


def ort_peer(w, threads, tmp):
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return None
    import logging
    logging.getLogger().setLevel(logging.ERROR)
    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wT"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wT")])
    f32, q8 = os.path.join(tmp, "f32.onnx"), os.path.join(tmp, "q8.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), f32)
    quantize_dynamic(f32, q8, weight_type=QuantType.QInt8)  # per-tensor weights, MatMulInteger
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(q8, so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def set_threads(n):
    lb.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def measure(shapes, thread_counts, tmp):
    rows = []
    for m, n, k in shapes:
        w, x = design_problem(m, n, k)
        layer = lb.Linear(w)
        tp = torch_peer(w)
        for t in thread_counts:
            set_threads(t)
            op = ort_peer(w, t, tmp)
            impls = {"lowbit int8": layer, "numpy fp32": lambda x: x @ w.T}
            if tp:
                impls["torch dynamic int8"] = tp
            if op:
                impls["onnxruntime dynamic int8"] = op
            limiter = numpy_threads(t)
            for name, fn in impls.items():
                # three interleaved rounds: a noisy neighbour hurts every library alike
                rows.append(dict(M=m, N=n, K=k, threads=t, impl=name,
                                 us=min(median_time(lambda: fn(x), min_time=0.3) for _ in range(3)) * 1e6))
            if limiter:
                limiter.unregister()
    return rows


def accuracy(tmp, m=64, n=4096, k=4096):
    w, x = design_problem(m, n, k, seed=1)
    exact = x @ w.T
    out = {"lowbit int8": relative_error(lb.Linear(w)(x), exact)}
    tp, op = torch_peer(w), ort_peer(w, 1, tmp)
    if tp:
        out["torch dynamic int8"] = relative_error(tp(x), exact)
    if op:
        out["onnxruntime dynamic int8"] = relative_error(op(x), exact)
    return out


def small_layer_overhead():
    w, x = design_problem(1, 576, 576)
    layer = lb.Linear(w)
    return median_time(lambda: layer(x), min_time=1.0) * 1e6


def quantize_speed():
    w, _ = design_problem(1, 4096, 4096)
    before = lb.get_num_threads()
    lb.set_num_threads(1)
    t = median_time(lambda: lb.quantize(w), min_time=1.0, min_runs=5)
    lb.set_num_threads(before)
    return w.nbytes / t


def report(rows, limits, acc, overhead, qspeed, all_threads, command):
    lines = [f"# lowbit INT8 benchmark", "",
             f"Produced by `{command}` on {datetime.date.today()}; CPU: {cpu_name()}; "
             f"kernels: {lb.cpu_info()['isa']}; lowbit {lb.__version__}.", "",
             "Median per call, float32 in / float32 out, activation quantization included. "
             "Weights N(0, 0.02), inputs N(0, 1) (DESIGN.md section 7).", ""]
    lines += ["## Machine limits (lowbit's probes)", "",
              "| threads | int8 dot peak | read, cache-resident 16 MB | read, DRAM 512 MB |",
              "|---|---|---|---|"]
    for t, lim in limits.items():
        lines.append(f"| {t} | {lim['dot_peak_macs'] * 2 / 1e9:.0f} GOPS | "
                     f"{lim['read_hot_bytes'] / 1e9:.1f} GB/s | {lim['read_dram_bytes'] / 1e9:.1f} GB/s |")
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines += ["", "## Time per call (us)", "",
              "| M x N x K | threads | " + " | ".join(impls) + " | lowbit vs best peer | lowbit vs limit |",
              "|---|---|" + "---|" * (len(impls) + 2)]
    keys = list(dict.fromkeys((r["M"], r["N"], r["K"], r["threads"]) for r in rows))
    for key in keys:
        cell = {r["impl"]: r["us"] for r in rows if (r["M"], r["N"], r["K"], r["threads"]) == key}
        m, n, k, t = key
        peers = [v for name, v in cell.items() if name != "lowbit int8"]
        ours = cell["lowbit int8"]
        lim = limits[t]
        if m <= 4:  # weight streaming: bytes of packed weights over the hot read bandwidth
            bound = n * k / lim["read_hot_bytes"] * 1e6
            what = "of hot read bandwidth"
        else:
            bound = m * n * k / lim["dot_peak_macs"] * 1e6
            what = "of int8 dot peak"
        lines.append(f"| {m} x {n} x {k} | {t} | " + " | ".join(f"{cell[i]:.0f}" for i in impls)
                     + f" | {min(peers) / ours:.2f}x | {bound / ours:.0%} {what} |")
    lines += ["", "## Accuracy (M=64, K=N=4096): relative Frobenius error against float32", "",
              "| implementation | relative error |", "|---|---|"]
    lines += [f"| {name} | {v:.4f} |" for name, v in acc.items()]
    lines += ["", "## Other figures", "",
              f"* Python-to-result time of a 1 x 576 x 576 INT8 layer call ({all_threads} threads): {overhead:.1f} us",
              f"* INT8 weight quantization (4096 x 4096 float32, 1 thread): {qspeed / 1e9:.2f} GB/s of float32 input", ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, all threads only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                   help="where to write the report ('-' prints only)")
    args = p.parse_args()
    all_threads = lb.get_num_threads()
    thread_counts = [all_threads] if args.quick else sorted({1, all_threads})
    shapes = SHAPES[::3] if args.quick else SHAPES
    with tempfile.TemporaryDirectory() as tmp:
        limits = {}
        for t in thread_counts:
            set_threads(t)
            limits[t] = machine_limits()
        rows = measure(shapes, thread_counts, tmp)
        set_threads(all_threads)
        acc = accuracy(tmp)
    text = report(rows, limits, acc, small_layer_overhead(), quantize_speed(), all_threads,
                  "python bench/peers.py" + (" --quick" if args.quick else ""))
    print(text)
    if args.out != "-":
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
