"""What one small layer call costs from Python, and where the time goes (issue #16, item 1).

For each layer shape (1 x 32 x 32: nearly all fixed cost; 1 x 576 x 576: a SmolLM2 decode layer)
and weight format, the median time of ``layer(x)`` over interleaved rounds, beside:

* ``empty``: an M = 0 call (every check, no kernel): the fixed cost of the binding;
* ``numpy``: ``np.empty`` of the output and a float32 ``x @ w.T`` (what a plain numpy layer pays);
* the same call at each thread count asked for (``--threads 1 2``);
* with PyTorch installed, the torch route: ``lowbit.torch.LowbitLinear`` called on a tensor
  (eager, under ``torch.inference_mode``) beside torch's own ``nn.Linear`` (float32) and its
  dynamic INT8 ``nn.quantized.dynamic.Linear`` (FBGEMM), the same weights.

    python bench/calls.py [--threads 1 2] [--rounds 15]
"""
import argparse
import statistics
import time

import numpy as np

import lowbit as lb
from lowbit import _core


def per_call(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def medians(cases, reps, rounds):
    """{name: median microseconds per call} of the cases, each warmed up, timed in `rounds`
    interleaved rounds of `reps` calls."""
    for f in cases.values():  # warm up (pool threads, caches)
        per_call(f, reps // 10)
    times = {c: [] for c in cases}
    for _ in range(rounds):
        for c, f in cases.items():
            times[c].append(per_call(f, reps))
    return {c: statistics.median(v) * 1e6 for c, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"kernel set {_core.isa()}; microseconds per call, median of "
          f"{args.rounds} interleaved rounds")
    print(f"{'shape':>12} {'weight':>10} {'threads':>7} {'layer(x)':>9} {'out=':>7} {'empty':>7} "
          f"{'np f32':>7} {'np.empty':>8}")
    for n, k in ((32, 32), (576, 576)):
        w = rng.standard_normal((n, k)).astype(np.float32)
        x = rng.standard_normal((1, k)).astype(np.float32)
        x0 = np.zeros((0, k), np.float32)
        out = np.empty((1, n), np.float32)
        layers = {"int8": lb.Linear(w, bits=8),
                  "int4 g32": lb.Linear(w, bits=4, group_size=32, symmetric=False)}
        reps = 20000 if n < 100 else 3000
        for name, layer in layers.items():
            for t in args.threads:
                lb.set_num_threads(t)
                med = medians({"call": lambda: layer(x), "out": lambda: layer(x, out=out),
                               "empty": lambda: layer(x0), "np": lambda: x @ w.T,
                               "np.empty": lambda: np.empty((1, n), np.float32)},
                              reps, args.rounds)
                print(f"{f'1x{n}x{k}':>12} {name:>10} {t:>7} {med['call']:9.2f} {med['out']:7.2f} "
                      f"{med['empty']:7.2f} {med['np']:7.2f} {med['np.empty']:8.2f}", flush=True)
    try:
        import torch
    except ImportError:
        print("(PyTorch is not installed: no torch route)")
        return
    torch_route(torch, args, rng)


def torch_route(torch, args, rng):
    import warnings

    import lowbit.torch as lt
    print(f"\ntorch {torch.__version__}, eager under inference_mode; microseconds per call, median "
          f"of {args.rounds} interleaved rounds")
    print(f"{'shape':>12} {'threads':>7} {'lb int8':>8} {'lb int4':>8} {'nn.Linear':>9} "
          f"{'torch dyn int8':>14}")
    for n, k in ((32, 32), (576, 576)):
        lin = torch.nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)))
        x = torch.from_numpy(rng.standard_normal((1, k)).astype(np.float32))
        with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated, not gone
            warnings.simplefilter("ignore")
            dyn = torch.ao.nn.quantized.dynamic.Linear.from_float(_with_qconfig(torch, lin))
        cases = {"int8": lt.LowbitLinear.from_linear(lin, bits=8),
                 "int4": lt.LowbitLinear.from_linear(lin, bits=4, group_size=32, symmetric=False),
                 "f32": lin, "dyn": dyn}
        reps = 20000 if n < 100 else 3000
        for t in args.threads:
            lb.set_num_threads(t)
            torch.set_num_threads(t)
            with torch.inference_mode():
                med = medians({c: (lambda m=m: m(x)) for c, m in cases.items()}, reps, args.rounds)
            print(f"{f'1x{n}x{k}':>12} {t:>7} {med['int8']:8.2f} {med['int4']:8.2f} "
                  f"{med['f32']:9.2f} {med['dyn']:14.2f}", flush=True)


def _with_qconfig(torch, lin):
    lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
    return lin


if __name__ == "__main__":
    main()
