"""Timing and machine probes shared by ``lowbit bench`` and bench/peers.py.

Every figure is a median over many calls; the machine limits (int8 dot-instruction peak, read
bandwidth) are measured with lowbit's own probes so results can be stated as a fraction of them.
"""
from __future__ import annotations

import time

import numpy as np

from . import _core
from .linear import Linear
from .runtime import get_num_threads, set_num_threads, use_isa


def median_time(fn, min_time=0.25, min_runs=7, max_runs=2000) -> float:
    """Median wall time of ``fn()`` in seconds (after one warm-up call)."""
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < min_runs or (time.perf_counter() - start < min_time and len(samples) < max_runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return float(np.median(samples))


def machine_limits(dram_bytes=1 << 30, hot_bytes=16 << 20) -> dict:
    """Limits at the current thread count: int8 dot peak (multiply-adds/s) of the kernel set in use
    and of its vector dot instruction (they differ under AMX, whose tiles serve the INT8 GEMM of 8+
    rows and W4A8 of 32+), and read bandwidth (bytes/s) of a cache-resident and of a DRAM-sized
    buffer."""
    hot = np.ones(hot_bytes, np.uint8)
    dram = np.ones(dram_bytes, np.uint8)
    peak = _core.dot_peak(0.5)
    vector_peak = peak
    if _core.isa() == "amx":
        with use_isa("avx512vnni"):
            vector_peak = _core.dot_peak(0.5)
    return {
        "dot_peak_macs": peak,
        "vector_dot_peak_macs": vector_peak,
        "read_hot_bytes": max(_core.read_bandwidth(hot, 40) for _ in range(3)),
        "read_dram_bytes": max(_core.read_bandwidth(dram, 2) for _ in range(2)),
    }


def relative_error(y, exact) -> float:
    return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))


def design_problem(m, n, k, seed=0):
    """DESIGN.md section 7: weights N(0, 0.02), inputs N(0, 1)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.02, (n, k)).astype(np.float32),
            rng.normal(0, 1, (m, k)).astype(np.float32))


FORMATS = {
    "int8 sym (W8A8)": dict(bits=8),
    "int4 g32 asym (W4A8)": dict(bits=4, group_size=32, symmetric=False, activations="int8"),
    "int4 g32 asym (W4A32)": dict(bits=4, group_size=32, symmetric=False, activations="float"),
}

SHAPES = ((1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096))
# lowbit bench --plot without --shapes: a line needs more than three batch sizes
PLOT_SHAPES = tuple((m, 4096, 4096) for m in (1, 2, 4, 8, 16, 32, 64, 128))


def parse_shapes(text):
    """"MxNxK,MxNxK,..." (e.g. "1x4096x4096,16x4096x4096") -> ((M, N, K), ...), each positive."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shapes: expected MxNxK with positive integers, like 16x4096x4096, "
                             f"got {item.strip()!r}")
        shapes.append(tuple(int(p) for p in parts))
    return tuple(shapes)


def quick_table(shapes=SHAPES, threads=None):
    """Each format's Linear against numpy float32 on the same shapes: rows of dicts."""
    before = get_num_threads()
    if threads:
        set_num_threads(threads)
    rows = []
    try:
        for m, n, k in shapes:
            w, x = design_problem(m, n, k)
            exact = x @ w.T
            t_np = median_time(lambda: x @ w.T)
            rows.append(dict(M=m, N=n, K=k, format="numpy float32", us=t_np * 1e6, speedup=1.0,
                             rel_error=0.0, weight_mb=w.nbytes / 1e6))
            for name, kw in FORMATS.items():
                layer = Linear(w, **kw)
                t = median_time(lambda: layer(x))
                rows.append(dict(M=m, N=n, K=k, format=name, us=t * 1e6, speedup=t_np / t,
                                 rel_error=relative_error(layer(x), exact),
                                 weight_mb=layer.nbytes / 1e6))
    finally:
        set_num_threads(before)
    return rows


def plotting():
    """matplotlib.pyplot (without a display), or ImportError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'lowbit[plot]'") from None
    return plt


def plot(rows, path, machine=""):
    """Throughput (GFLOP/s, 2 M N K per call) against batch size M, one line per format and
    N x K, from quick_table's rows, written to `path` (PNG, SVG, PDF: by its suffix); `machine`
    (CPU, kernel set, threads) heads the title. Needs matplotlib."""
    plt = plotting()
    fig, ax = plt.subplots(figsize=(8, 5))
    shapes = sorted({(r["N"], r["K"]) for r in rows})
    for fmt in dict.fromkeys(r["format"] for r in rows):
        for n, k in shapes:
            pts = sorted((r["M"], 2e-3 * r["M"] * r["N"] * r["K"] / r["us"]) for r in rows
                         if r["format"] == fmt and (r["N"], r["K"]) == (n, k))
            label = fmt if len(shapes) == 1 else f"{fmt}, {n} x {k}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    linestyle="--" if fmt.startswith("numpy") else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size M (rows per call)")
    ax.set_ylabel("GFLOP/s (2 M N K per call)")
    title = f"Linear layers, N x K = {', '.join(f'{n} x {k}' for n, k in shapes)}"
    ax.set_title(f"{machine}\n{title}" if machine else title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
