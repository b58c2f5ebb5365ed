"""Quantization methods on real data: all-MiniLM-L6-v2 layers and model, the digits MLP, GPTQ time.

    python bench/methods.py [--write] [--json]

The bundled sentences (examples/data/sentences.txt) are split: every 4th one is held out, the
others are the calibration set. Measured:

1. Layers: the query, intermediate and output projections of blocks 0, 2 and 4, with the float
   model's inputs to them. Each is quantized to INT4, asymmetric, groups of 128, by rtn / mse /
   gptq (act_order) / awq calibrated on the calibration sentences; the figure is the output MSE on
   the held-out sentences' inputs (float activations) relative to rtn's.
2. The model with every linear layer INT4 g32 by GPTQ (act_order), calibrated block by block:
   mean cosine of the held-out sentences' embeddings to float32 (rtn for comparison).
3. The model with INT8 weights and static int8 activations from each observer (rtn weights).
4. Mixed precision on MiniLM: lb.plan_precision under the bytes of uniform INT4 g32 (and 1.25x
   that), fed (a) lb.layer_sensitivity (each layer's own output error on its calibration inputs)
   or (b) lb.model_sensitivity (1 - mean cosine of calibration embeddings with only that layer
   quantized); the plans' held-out mean cosine against uniform INT4 g32.
5. The digits MLP of examples/digits_qat.py (INT8 and INT4 post-training, INT4 after QAT), seeds
   0, 1, 2.
6. GPTQ time on a 4096 x 4096 layer with 512 calibration rows (random data), INT4 g128.

--write replaces the "## Quantization methods" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import lowbit as lb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import digits_qat  # noqa: E402
import minilm  # noqa: E402

SECTION = "## Quantization methods"
LAYERS = (("query", "qkv", slice(0, 384)), ("intermediate", "inter", slice(None)),
          ("output", "out", slice(None)))
METHODS = (("mse", {}), ("gptq", {"act_order": True}), ("awq", {}))


def split():
    sentences = minilm.read_sentences()
    return ([s for i, s in enumerate(sentences) if i % 4 != 3],
            [s for i, s in enumerate(sentences) if i % 4 == 3])


def layers(cal, held):
    model = minilm.MiniLM(mode="float")
    xc, xh = model.capture(cal), model.capture(held)
    rows = []
    for b in (0, 2, 4):
        blk = model._blocks[b]
        for label, name, sel in LAYERS:
            w = getattr(blk, name).weight[sel]
            x = xh[b, name]
            y = x @ w.T

            def mse_of(qw):
                return float(((lb.matmul(x, qw, activations="float") - y) ** 2).mean())

            fmt = dict(bits=4, group_size=128, symmetric=False)
            base = mse_of(lb.quantize(w, **fmt))
            row = {"layer": f"{b}.{label}", "shape": list(w.shape), "rtn_mse": base}
            for method, kw in METHODS:
                row[method] = mse_of(lb.quantize(w, **fmt, method=method,
                                                 calibration=xc[b, name], **kw)) / base
            rows.append(row)
    return rows


def model_cosines(cal, held):
    ref = minilm.MiniLM(mode="float").encode(held)
    out = {}

    def cos(**kw):
        emb = minilm.MiniLM(**kw).encode(held)
        return float((emb * ref).sum(1).mean())

    out["int4_g32_rtn"] = cos(mode="int4")
    t0 = time.perf_counter()
    out["int4_g32_gptq"] = cos(mode="int4", method="gptq", method_options={"act_order": True},
                               calibration=cal)
    out["gptq_build_seconds"] = time.perf_counter() - t0
    out["int8_dynamic"] = cos(mode="int8")
    for obs in minilm.OBSERVERS:
        out[f"int8_static_{obs}"] = cos(mode="int8", static=obs, calibration=cal)
    return out


def mixed(cal, held):
    fm = minilm.MiniLM(mode="float")
    ref, ref_cal = fm.encode(held), fm.encode(cal[::3])
    caps = fm.capture(cal)
    weights = {f"{i}.{n}": getattr(b, n).weight for i, b in enumerate(fm._blocks)
               for n in minilm._Block.LINEARS}
    layer_sens = lb.layer_sensitivity(weights, {f"{i}.{n}": caps[i, n] for i, n in caps})

    def evaluate(plan):  # 1 - mean cosine of calibration embeddings, the model quantized by plan
        emb = minilm.MiniLM(mode="int4", plan=plan).encode(cal[::3])
        return 1 - float((emb * ref_cal).sum(1).mean())

    model_sens = lb.model_sensitivity(evaluate, weights)
    names = list(weights)
    uniform = sum(layer_sens[n]["int4-g32"]["nbytes"] for n in names)
    rows = []
    for budget in (uniform, int(uniform * 1.25)):
        row = {"budget": budget}
        for label, sens in (("layer", layer_sens), ("model", model_sens)):
            plan = lb.plan_precision(sens, budget)
            emb = minilm.MiniLM(mode="int4", plan=plan).encode(held)
            row[label] = float((emb * ref).sum(1).mean())
            row[label + "_formats"] = {f: sum(plan[n] == s for n in names)
                                       for f, s in lb.mixed.FORMATS.items()}
        rows.append(row)
    emb = minilm.MiniLM(mode="int4").encode(held)
    return {"uniform_int4_bytes": uniform, "uniform_int4": float((emb * ref).sum(1).mean()),
            "plans": rows}


def digits():
    rows = []
    for seed in (0, 1, 2):
        x_train, x_test, y_train, y_test = digits_qat.load_data(seed)
        model = digits_qat.MLP(digits_qat.SIZES, seed=seed)
        model.fit(x_train, y_train, epochs=100, lr=3e-3, seed=seed)
        acc = {"float32": digits_qat.accuracy(model.logits(x_test), y_test),
               "int8_ptq": digits_qat.accuracy(model.lowbit(bits=8)(x_test), y_test),
               "int4_ptq": digits_qat.accuracy(model.lowbit(**digits_qat.INT4)(x_test), y_test)}
        model.fit(x_train, y_train, epochs=15, lr=2e-4, qat=True, seed=seed + 1)
        acc["int4_qat"] = digits_qat.accuracy(model.lowbit(**digits_qat.INT4)(x_test), y_test)
        rows.append(acc)
    return rows


def gptq_time(n=4096, k=4096, rows=512):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        lb.quantize(w, bits=4, group_size=128, symmetric=False, method="gptq", calibration=x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def markdown(r):
    cal, held = r["split"]
    lines = [SECTION, "",
             f"`python bench/methods.py --write`, {r['threads']} threads, kernels {r['isa']}, "
             f"{r['cpu']}. Calibration: {cal} bundled sentences; held out: {held} (every 4th).", "",
             "### MiniLM layers, INT4 asymmetric g128: held-out output MSE relative to RTN", "",
             "| layer | shape | RTN MSE | mse | gptq (act_order) | awq |", "|---|---|---|---|---|---|"]
    for row in r["layers"]:
        lines.append(f"| {row['layer']} | {row['shape'][0]} x {row['shape'][1]} | {row['rtn_mse']:.3g} | "
                     f"{row['mse']:.3f} | {row['gptq']:.3f} | {row['awq']:.3f} |")
    for stat, fn in (("mean", np.mean), ("geometric mean", lambda v: np.exp(np.mean(np.log(v)))),
                     ("worst", np.max)):
        cells = " | ".join(f"{fn([row[m] for row in r['layers']]):.3f}" for m, _ in METHODS)
        lines.append(f"| **{stat}** | | | {cells} |")
    m = r["model"]
    lines += ["", "### MiniLM model: mean cosine of held-out embeddings to float32", "",
              "| weights | activations | mean cosine |", "|---|---|---|",
              f"| INT4 g32 asym, RTN | dynamic int8 | {m['int4_g32_rtn']:.4f} |",
              f"| INT4 g32 asym, GPTQ act_order (block by block, {m['gptq_build_seconds']:.0f} s) | "
              f"dynamic int8 | {m['int4_g32_gptq']:.4f} |",
              f"| INT8, RTN | dynamic int8 | {m['int8_dynamic']:.4f} |"]
    for obs in minilm.OBSERVERS:
        lines.append(f"| INT8, RTN | static int8, {obs} observer | {m['int8_static_' + obs]:.4f} |")
    mx = r["mixed"]
    lines += ["", "### Mixed precision on MiniLM (lb.plan_precision): held-out mean cosine", "",
              f"Uniform INT4 g32: {mx['uniform_int4_bytes'] / 1e6:.2f} MB of linear weights, "
              f"{mx['uniform_int4']:.4f}.", "",
              "| budget | plan from lb.layer_sensitivity | formats | plan from lb.model_sensitivity | formats |",
              "|---|---|---|---|---|"]
    for row in mx["plans"]:
        fmts = {k: ", ".join(f"{n} {f}" for f, n in row[k + "_formats"].items() if n)
                for k in ("layer", "model")}
        lines.append(f"| {row['budget'] / 1e6:.2f} MB | {row['layer']:.4f} | {fmts['layer']} | "
                     f"{row['model']:.4f} | {fmts['model']} |")
    lines += ["", "### Digits MLP (examples/digits_qat.py): test accuracy, %", "",
              "| seed | float32 | INT8 PTQ | INT4 PTQ | INT4 after QAT |", "|---|---|---|---|---|"]
    for seed, acc in enumerate(r["digits"]):
        lines.append(f"| {seed} | {acc['float32']:.2f} | {acc['int8_ptq']:.2f} | "
                     f"{acc['int4_ptq']:.2f} | {acc['int4_qat']:.2f} |")
    lines += ["", f"GPTQ, 4096 x 4096 layer, 512 calibration rows, INT4 g128: "
              f"{r['gptq_4096_seconds']:.1f} s (median of 3).", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from lowbit.cli import cpu_name

    cal, held = split()
    r = {"threads": lb.get_num_threads(), "isa": lb.cpu_info()["isa"], "cpu": cpu_name(),
         "split": [len(cal), len(held)], "layers": layers(cal, held),
         "model": model_cosines(cal, held), "mixed": mixed(cal, held), "digits": digits(), "gptq_4096_seconds": gptq_time()}
    if args.json:
        print(json.dumps(r, indent=2))
    text = markdown(r)
    if not args.json:
        print(text)
    if args.write:
        path = ROOT / "bench" / "RESULTS.md"
        old = path.read_text()
        if SECTION in old:
            start = old.index(SECTION)
            nxt = old.find("\n## ", start + len(SECTION))
            old = old[:start] + old[nxt + 1:] if nxt >= 0 else old[:start]
        path.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
