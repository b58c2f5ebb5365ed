"""lowbit against its peers, in one process, written to bench/RESULTS.md.

    python bench/peers.py                  # full run (about 3 minutes on 2 cores)
    python bench/peers.py --quick --out -  # fewer shapes, print only

INT8: numpy float32, PyTorch dynamic quantized Linear (FBGEMM), ONNX Runtime dynamic int8
(MatMulInteger via quantize_dynamic). INT4: ONNX Runtime MatMulNBits (4 bits, block 32,
accuracy_level 0 and 4), PyTorch _weight_int4pack_mm_for_cpu (group 32, bfloat16 activations).
Peers that are not installed are skipped (pip install ".[bench]").

Every time is the median of many calls, float32 in and float32 out, activation quantization
included; the best of three interleaved rounds, each after a pause that lets the previous
library's spinning threads go idle. Threads: set the same for every library.
"""
from __future__ import annotations

import argparse
import datetime
import logging
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
warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)


# ---------------------------------------------------------------- peers (each returns x -> y)

def numpy_threads(n):
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(n)
    except ImportError:
        return None


def torch_int8(w):
    try:
        import torch
    except ImportError:
        return None
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = torch.from_numpy(w.copy())
    q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)

    def run(x):
        with torch.no_grad():
            return q(torch.from_numpy(x)).numpy()
    return run


def torch_int4(w, group=32):
    """Asymmetric group-32 weights, as torch's int4 CPU kernel takes them: w = (q - 8) s + z."""
    try:
        import torch
        op = torch.ops.aten._weight_int4pack_mm_for_cpu
    except (ImportError, AttributeError):
        return None
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.min(axis=2), wg.max(axis=2)
    scale = np.maximum((hi - lo) / 15, 1e-10)
    q = np.clip(np.rint((wg - lo[..., None]) / scale[..., None]), 0, 15).astype(np.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q), 8)
    # (K / group, N, 2), C-contiguous: the op ignores strides
    sz = np.ascontiguousarray(np.stack([scale.T, (lo + 8 * scale).T], -1), dtype=np.float32)
    sz = torch.from_numpy(sz).to(torch.bfloat16)
    return lambda x: op(torch.from_numpy(x).to(torch.bfloat16), packed, group, sz).float().numpy()


def _ort_session(graph_nodes, inputs, k, n, initializers, threads, domains=()):
    import onnx  # noqa: F401
    import onnxruntime as ort
    from onnx import TensorProto, helper
    graph = helper.make_graph(graph_nodes, "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              initializers)
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(),
                                so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def ort_int8(w, threads, tmp):
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
        import onnxruntime as ort
    except ImportError:
        return None
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


def ort_int4(w, threads, accuracy_level, block=32):
    """MatMulNBits, symmetric 4-bit blocks of 32 (zero point 8, as its quantizer makes them)."""
    try:
        from onnx import helper, numpy_helper
    except ImportError:
        return None
    n, k = w.shape
    wb = w.reshape(n, k // block, block)
    vmax = np.take_along_axis(wb, np.abs(wb).argmax(axis=2)[..., None], 2)[..., 0]
    scale = np.where(vmax == 0, 1, vmax / -8).astype(np.float32)
    q = np.clip(np.rint(wb / scale[..., None]) + 8, 0, 15).astype(np.uint8)
    blob = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level)
    try:
        return _ort_session([node], None, k, n, [numpy_helper.from_array(blob, "B"),
                                                 numpy_helper.from_array(scale.reshape(-1), "scales")],
                            threads, domains=("com.microsoft",))
    except Exception:
        return None


def set_threads(n):
    lb.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def time_all(impls, x, threads, rounds=3, settle=0.3):
    """Best of `rounds` interleaved medians. Before each, a pause: the runtimes' idle worker
    threads spin for a while after a call (OpenMP, ONNX Runtime), and on a small machine they
    would slow down whichever library is timed next."""
    limiter = numpy_threads(threads)
    best = {}
    for _ in range(rounds):
        for name, fn in impls.items():
            if fn is None:
                continue
            time.sleep(settle)
            t = median_time(lambda: fn(x), min_time=0.3) * 1e6
            best[name] = min(best.get(name, t), t)
    if limiter:
        limiter.unregister()
    return best


# ---------------------------------------------------------------- measurements

def measure_int8(shapes, thread_counts, tmp):
    rows = []
    for m, n, k in shapes:
        w, x = design_problem(m, n, k)
        layer, tp = lb.Linear(w), torch_int8(w)
        for t in thread_counts:
            set_threads(t)
            impls = {"lowbit int8": layer, "numpy fp32": lambda x, w=w: x @ w.T,
                     "torch dynamic int8": tp, "onnxruntime dynamic int8": ort_int8(w, t, tmp)}
            rows.append(((m, n, k, t), time_all(impls, x, t)))
    return rows


def int4_impls(w, threads):
    qw = lb.quantize(w, bits=4, group_size=32, symmetric=False)
    return {"lowbit W4A8": lambda x: lb.matmul(x, qw, activations="int8"),
            "lowbit W4A32": lambda x: lb.matmul(x, qw, activations="float"),
            "numpy fp32": lambda x: x @ w.T,
            "ort MatMulNBits acc0": ort_int4(w, threads, 0),
            "ort MatMulNBits acc4": ort_int4(w, threads, 4),
            "torch int4pack bf16": torch_int4(w)}


def measure_int4(shapes, threads):
    set_threads(threads)
    rows = []
    for m, n, k in shapes:
        w, x = design_problem(m, n, k)
        rows.append(((m, n, k, threads), time_all(int4_impls(w, threads), x, threads)))
    return rows


def measure_cold(threads, total_bytes=1 << 30, n=4096, k=4096):
    """M=1 with every call on a different matrix: a rotating set larger than any cache."""
    set_threads(threads)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, k)).astype(np.float32)
    out = {}
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    for name, make in (("lowbit int8", lambda w: lb.Linear(w)),
                       ("lowbit W4A8", lambda w: lb.Linear(w, bits=4, group_size=32, symmetric=False)),
                       ("lowbit W4A32", lambda w: lb.Linear(w, bits=4, group_size=32, symmetric=False,
                                                            activations="float"))):
        first = make(w)
        count = int(np.ceil(total_bytes / first.nbytes))
        # distinct matrices: the same values re-quantized, each its own memory
        layers = [first] + [make(w) for _ in range(count - 1)]
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % count
            return layers[state["i"]](x)
        t = min(median_time(call, min_time=0.5, min_runs=3 * count) for _ in range(3))
        out[name] = (t * 1e6, first.nbytes / t)
        del layers
    return out


def accuracy(tmp, m=64, n=4096, k=4096):
    w, x = design_problem(m, n, k, seed=1)
    exact = x @ w.T
    qw4 = lb.quantize(w, bits=4, group_size=32, symmetric=False)
    cand = {
        "lowbit int8 (per-channel weights, per-row activations)": lambda x: lb.Linear(w)(x),
        "torch dynamic int8": torch_int8(w),
        "onnxruntime dynamic int8": ort_int8(w, 1, tmp),
        "lowbit W4A32 (asym g32, float16 scale + min)": lambda x: lb.matmul(x, qw4, activations="float"),
        "lowbit W4A8 (asym g32; activations int8 per 32)": lambda x: lb.matmul(x, qw4, activations="int8"),
        "ort MatMulNBits (sym b32, acc0)": ort_int4(w, 1, 0),
        "ort MatMulNBits (sym b32, acc4)": ort_int4(w, 1, 4),
        "torch int4pack (asym g32, bf16)": torch_int4(w),
    }
    return {name: relative_error(fn(x), exact) for name, fn in cand.items() if fn is not None}


def other_figures():
    w, x = design_problem(1, 576, 576)
    layer = lb.Linear(w)
    overhead = median_time(lambda: layer(x), min_time=1.0) * 1e6
    w, _ = design_problem(1, 4096, 4096)
    before = lb.get_num_threads()
    lb.set_num_threads(1)
    q8 = w.nbytes / median_time(lambda: lb.quantize(w), min_time=1.0, min_runs=5)
    q4 = w.nbytes / median_time(lambda: lb.quantize(w, bits=4, group_size=32, symmetric=False),
                                min_time=1.0, min_runs=5)
    lb.set_num_threads(before)
    return overhead, q8, q4


# ---------------------------------------------------------------- report

def table(rows, ours, bound_of):
    impls = list(dict.fromkeys(name for _, cell in rows for name in cell))
    lines = ["| M x N x K | threads | " + " | ".join(impls) + " | best lowbit vs best peer | best lowbit vs limit |",
             "|---|---|" + "---|" * (len(impls) + 2)]
    for (m, n, k, t), cell in rows:
        best = min(ours, key=lambda name: cell.get(name, np.inf))
        peers = [v for name, v in cell.items() if not name.startswith("lowbit")]
        bound, what = bound_of(best, m, n, k, t)
        ratio = f"{min(peers) / cell[best]:.2f}x ({best})" if peers else "-"
        lines.append(f"| {m} x {n} x {k} | {t} | " + " | ".join(f"{cell[i]:.0f}" if i in cell else "-" for i in impls)
                     + f" | {ratio} | {bound / cell[best]:.0%} {what} |")
    return lines


def report(limits, int8, int4, cold, acc, other, threads, command):
    def int8_bound(name, m, n, k, t):
        lim = limits[t]
        if m <= 4:
            return n * k / lim["read_hot_bytes"] * 1e6, "of hot read bandwidth"
        return m * n * k / lim["dot_peak_macs"] * 1e6, "of int8 dot peak"

    def int4_bound(name, m, n, k, t):
        lim = limits[t]
        if m <= 4:  # packed nibbles + float16 scale and minimum per 32
            return n * k * 0.625 / lim["read_hot_bytes"] * 1e6, "of hot read bandwidth"
        if m >= 32:  # W4A8 runs on AMX tiles from 32 rows (kernel set amx)
            return m * n * k / lim["dot_peak_macs"] * 1e6, "of int8 dot peak"
        return m * n * k / lim["vector_dot_peak_macs"] * 1e6, "of VPDPBUSD peak"

    lines = ["# lowbit benchmark", "",
             f"Produced by `{command}` on {datetime.date.today()}; CPU: {cpu_name()}; "
             f"kernels: {lb.cpu_info()['isa']}; lowbit {lb.__version__}.", "",
             "Median per call in microseconds (best of three interleaved rounds, each after a pause that "
             "lets the previous library's spinning threads go idle), float32 in / float32 out, activation "
             "quantization included. Weights N(0, 0.02), inputs N(0, 1) "
             "(DESIGN.md section 7).", "",
             "## Machine limits (lowbit's probes)", "",
             "| threads | int8 dot peak, kernels in use | int8 vector dot (VPDPBUSD) peak | read, cache-resident 16 MB | read, DRAM 1 GB |",
             "|---|---|---|---|---|"]
    for t, lim in limits.items():
        lines.append(f"| {t} | {lim['dot_peak_macs'] * 2 / 1e9:.0f} GOPS | {lim['vector_dot_peak_macs'] * 2 / 1e9:.0f} GOPS "
                     f"| {lim['read_hot_bytes'] / 1e9:.1f} GB/s | {lim['read_dram_bytes'] / 1e9:.1f} GB/s |")
    lines += ["", "## INT8 (per-channel int8 weights, dynamic int8 activations)", ""]
    lines += table(int8, ["lowbit int8"], int8_bound)
    lines += ["", f"## INT4 (group 32), hot: one weight matrix called repeatedly, {threads} threads", "",
              "lowbit: asymmetric g32 (float16 scale and minimum, like Q4_1); W4A8 = activations "
              "quantized to int8 per block of 32; W4A32 = float32 activations. ONNX Runtime: symmetric "
              "b32; accuracy_level 4 quantizes activations to int8.", ""]
    lines += table(int4, ["lowbit W4A8", "lowbit W4A32"], int4_bound)
    if cold:
        lim = limits[threads]["read_dram_bytes"]
        lines += ["", f"## Cold weights: M=1, 4096 x 4096, a rotating set of 1 GB of distinct matrices (more than any cache here), {threads} threads", "",
                  "| format | us per call | bytes read per call / time | fraction of DRAM read bandwidth |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {us:.0f} | {bw / 1e9:.1f} GB/s | {bw / lim:.0%} |" for name, (us, bw) in cold.items()]
    lines += ["", "## Accuracy (M=64, K=N=4096): relative Frobenius error against float32", "",
              "| implementation | relative error |", "|---|---|"]
    lines += [f"| {name} | {v:.4f} |" for name, v in acc.items()]
    overhead, q8, q4 = other
    lines += ["", "## Other figures", "",
              f"* Python-to-result time of a 1 x 576 x 576 INT8 layer call ({threads} threads): {overhead:.1f} us",
              f"* Weight quantization, 4096 x 4096 float32, 1 thread: INT8 {q8 / 1e9:.2f} GB/s, "
              f"INT4 asym g32 {q4 / 1e9:.2f} GB/s of float32 input", ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, all threads only, no cold regime")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                   help="where to write the report ('-' prints only)")
    args = p.parse_args()
    threads = lb.get_num_threads()
    thread_counts = [threads] if args.quick else sorted({1, threads})
    shapes = SHAPES[::3] if args.quick else SHAPES
    with tempfile.TemporaryDirectory() as tmp:
        limits = {}
        for t in thread_counts:
            set_threads(t)
            limits[t] = machine_limits()
        int8 = measure_int8(shapes, thread_counts, tmp)
        int4 = measure_int4(shapes, threads)
        cold = {} if args.quick else measure_cold(threads)
        set_threads(threads)
        acc = accuracy(tmp)
    text = report(limits, int8, int4, cold, acc, other_figures(), threads,
                  "python bench/peers.py" + (" --quick" if args.quick else ""))
    print(text)
    if args.out != "-":
        # keep the real-model sections (bench/smollm2.py, bench/minilm.py) that follow MODELS
        kept = ""
        if os.path.exists(args.out):
            with open(args.out) as f:
                old = f.read()
            kept = old[old.index(MODELS):] if MODELS in old else ""
        with open(args.out, "w") as f:
            f.write(text + ("\n" + kept if kept else ""))


MODELS = "## Real models"

if __name__ == "__main__":
    sys.exit(main())
