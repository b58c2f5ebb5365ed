"""Mixed precision: per-layer sensitivity to each format, and a plan under a size budget.

    sens = lb.layer_sensitivity(weights, calibration)        # {name: {format: {error, nbytes}}}
    sens = lb.model_sensitivity(evaluate, weights)           # or end to end: evaluate(plan) -> error
    plan = lb.plan_precision(sens, budget_bytes)             # {name: settings or "keep"}
    json.dump(plan, open("plan.json", "w"))                  # edit it, or: lowbit quantize --plan
    layers = {n: lb.Linear(w, **plan[n]) ...}                # (a "keep" layer stays float)

layer_sensitivity: a layer's error in a format is the relative squared error of its output on its
calibration rows, ``||X W^T - X Wq^T||^2 / ||X W^T||^2`` (float activations: the weights' share
of the loss); cheap, but blind to how much each layer's error matters downstream.
model_sensitivity: the model's own error (any measure the caller's `evaluate` returns) with one
layer quantized at a time; one model evaluation per layer and format, and the better guide (on
MiniLM, bench/methods.py: at the bytes of uniform INT4 its plan beats uniform INT4, the plan from
layer_sensitivity does not). The plan minimises the sum of the errors over the layers subject to
the sum of the layers' bytes, exactly (a multiple-choice knapsack over the Pareto front of
(bytes, error)).
"""
from __future__ import annotations

import numpy as np

from .quantize import _as_float32_matrix, quantize

# The candidate formats: lb.quantize settings (the CLI's --plan entries), or "keep" (float32).
FORMATS = {
    "int4-g32": {"bits": 4, "group_size": 32, "symmetric": False},
    "int4-g128": {"bits": 4, "group_size": 128, "symmetric": False},
    "int8": {"bits": 8, "group_size": None, "symmetric": True},
    "float": "keep",
}
_MAX_FRONT = 50_000


def layer_sensitivity(weights: dict, calibration: dict, formats=None, method="rtn") -> dict:
    """{name: {format: {"error": relative squared output error, "nbytes": bytes}}} for each
    weight (N, K) in `weights` and each format that applies to it (a group size must divide K),
    measured on `calibration[name]`, the layer's input rows (S, K). method: lb.quantize's method
    for the quantized formats (calibrated methods use the same rows)."""
    formats = FORMATS if formats is None else formats
    out = {}
    for name, w in weights.items():
        if name not in calibration:
            raise ValueError(f"no calibration rows for layer {name!r}")
        w = _as_float32_matrix(w, name)
        x = np.asarray(calibration[name])
        if x.dtype.kind != "f" or x.ndim != 2 or x.shape[1] != w.shape[1] or not len(x):
            raise ValueError(f"calibration[{name!r}]: expected float rows (S, {w.shape[1]}), got "
                             f"{x.dtype} {x.shape}")
        x = x.astype(np.float32, copy=False)
        y = x @ w.T
        energy = float((y.astype(np.float64) ** 2).sum())

        def measure(settings):  # called within this iteration: w, x, y are this layer's
            qw = quantize(w, **settings, method=method,
                          calibration=None if method == "rtn" else x)
            yq = x @ qw.dequantize().T  # the weights' share: float activations for every format
            err = float(((yq - y).astype(np.float64) ** 2).sum())
            return (err / energy if energy else float(err > 0)), qw.nbytes

        out[name] = _per_format(w, formats, measure)
    return out


def model_sensitivity(evaluate, weights: dict, formats=None) -> dict:
    """End-to-end sensitivity, in layer_sensitivity's form: for each layer and format,
    ``evaluate(plan)`` with that layer in that format and every other one kept ("keep"), e.g.
    1 - the mean cosine of the model's outputs to float32 on calibration data. `weights` gives
    each layer's float weight (for the formats' sizes). Costs one evaluation per layer and
    quantized format."""
    formats = FORMATS if formats is None else formats
    names = list(weights)
    out = {}
    for name in names:
        w = _as_float32_matrix(weights[name], name)

        def measure(settings):  # called within this iteration
            plan = dict.fromkeys(names, "keep")
            plan[name] = dict(settings)
            return float(evaluate(plan)), quantize(w, **settings).nbytes

        out[name] = _per_format(w, formats, measure)
    return out


def _per_format(w, formats, measure):
    """{format: {"error", "nbytes"}} over the formats that fit w (a group size must divide K):
    "keep" costs no error and w's float bytes; measure(settings) -> (error, nbytes) the others."""
    res = {}
    for fmt, settings in formats.items():
        if settings == "keep":
            res[fmt] = {"error": 0.0, "nbytes": int(w.nbytes)}
            continue
        g = settings.get("group_size")
        if g is not None and w.shape[1] % g:
            continue
        error, nbytes = measure(settings)
        res[fmt] = {"error": error, "nbytes": nbytes}
    return res


def plan_precision(sensitivity: dict, budget: int, formats=None) -> dict:
    """{name: lb.quantize settings or "keep"}: the format per layer with the least total error
    whose bytes sum to at most `budget` (ValueError when even the smallest formats exceed it)."""
    formats = FORMATS if formats is None else formats
    unknown = sorted({f for v in sensitivity.values() for f in v} - set(formats))
    if unknown:
        raise ValueError(f"sensitivity measured formats {unknown} that `formats` does not hold: "
                         f"pass the formats the sensitivity was measured with")
    names = list(sensitivity)
    # front: Pareto-optimal partial plans as parallel arrays (bytes ascending, error descending)
    front_bytes, front_err = np.zeros(1, np.int64), np.zeros(1)
    back = []  # per layer: (parent index, format) of each state of its front
    for name in names:
        opts = [(int(v["nbytes"]), float(v["error"]), fmt) for fmt, v in sensitivity[name].items()]
        if not opts:
            raise ValueError(f"layer {name!r}: no formats measured")
        nb = (front_bytes[:, None] + np.array([o[0] for o in opts])[None, :]).ravel()
        er = (front_err[:, None] + np.array([o[1] for o in opts])[None, :]).ravel()
        parent = np.repeat(np.arange(len(front_bytes)), len(opts))
        choice = np.tile(np.arange(len(opts)), len(front_bytes))
        ok = nb <= budget
        if not ok.any():
            least = sum(min(int(v["nbytes"]) for v in sensitivity[n].values()) for n in names)
            raise ValueError(f"budget {budget} bytes is below the smallest plan ({least} bytes)")
        nb, er, parent, choice = nb[ok], er[ok], parent[ok], choice[ok]
        order = np.lexsort((er, nb))
        nb, er, parent, choice = nb[order], er[order], parent[order], choice[order]
        best = np.minimum.accumulate(er)
        keep = np.r_[True, er[1:] < best[:-1]]  # strictly better than every smaller plan
        nb, er, parent, choice = nb[keep], er[keep], parent[keep], choice[keep]
        if len(nb) > _MAX_FRONT:  # thin evenly (then the plan is near-optimal, not exact)
            sel = np.unique(np.linspace(0, len(nb) - 1, _MAX_FRONT).astype(np.intp))
            nb, er, parent, choice = nb[sel], er[sel], parent[sel], choice[sel]
        back.append((parent, choice, [o[2] for o in opts]))
        front_bytes, front_err = nb, er
    i = int(np.argmin(front_err))
    plan = {}
    for name, (parent, choice, fmts) in zip(reversed(names), reversed(back)):
        settings = formats[fmts[choice[i]]]
        plan[name] = dict(settings) if isinstance(settings, dict) else settings
        i = parent[i]
    return {name: plan[name] for name in names}
