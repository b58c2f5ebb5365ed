"""all-MiniLM-L6-v2 end to end: lowbit INT8 / INT4 against numpy float32 and PyTorch dynamic INT8.

    python bench/minilm.py [--threads 2] [--repeats 7] [--rounds 3] [--json]

One process. Latency of one forward pass over a batch of 32 sequences of exactly 128 real tokens
(bundled sentences joined and truncated at 128, so no padding), for:

* numpy float32 and lowbit INT8 / INT4: examples/minilm.py (`MiniLM`, modes float / int8 / int4),
  and INT8 with lb.nn.attention's int8 dot products (`attention="int8"`);
* PyTorch: the same network written as a small torch module from the same weights (fused QKV,
  scaled_dot_product_attention, exact GELU), in float32 and after
  `torch.ao.quantization.quantize_dynamic(..., {nn.Linear}, dtype=torch.qint8)`.

Every implementation gets the same thread count (lowbit, torch, numpy's BLAS through threadpoolctl;
the numpy models spread their own work over that many Python threads). The machine may be shared,
so calls are interleaved: after a warm-up call each, every step times one call of each
implementation (order rotated from step to step, each after a pause that lets the previous one's
spinning threads go idle), rounds x repeats steps; the reported latency is each one's median over
its calls, so all see the same stretch of machine noise.

Accuracy: cosine of each implementation's embeddings of the bundled sentences to the numpy float32
ones; the torch float32 model (and sentence-transformers itself, when installed) checks that the
numpy float32 model computes the reference. Profile: where the lowbit INT8 forwards spend their time.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

import lowbit as lb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import minilm  # noqa: E402  (examples/minilm.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BATCH, SEQ = 32, 128


class TorchMiniLM(torch.nn.Module):
    """all-MiniLM-L6-v2 in torch, mirroring examples/minilm.py: forward(ids, types, mask) ->
    L2-normalized mean-pooled embeddings."""

    def __init__(self, model_dir):
        from safetensors.numpy import load_file

        super().__init__()
        config = json.loads((Path(model_dir) / "config.json").read_text())
        w = {k.removeprefix("bert."): torch.from_numpy(v)
             for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}
        self.heads, self.eps = config["num_attention_heads"], config["layer_norm_eps"]
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"]
        self.ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.blocks = torch.nn.ModuleList(_TorchBlock(w, f"encoder.layer.{i}.", self.heads, self.eps)
                                          for i in range(config["num_hidden_layers"]))

    def forward(self, ids, types, mask):
        x = self.word[ids] + self.position[:ids.shape[1]] + self.token_type[types]
        x = F.layer_norm(x, x.shape[-1:], *self.ln, self.eps)
        attend = mask[:, None, None, :].bool()  # (B, 1, 1, S): which keys each query sees
        for block in self.blocks:
            x = block(x, attend)
        m = mask[:, :, None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


class _TorchBlock(torch.nn.Module):
    def __init__(self, w, p, heads, eps):
        super().__init__()
        self.heads, self.eps = heads, eps
        a = p + "attention.self."
        self.qkv = _linear(torch.cat([w[a + n + ".weight"] for n in ("query", "key", "value")]),
                           torch.cat([w[a + n + ".bias"] for n in ("query", "key", "value")]))
        self.attn_out = _linear(w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"])
        self.inter = _linear(w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"])
        self.out = _linear(w[p + "output.dense.weight"], w[p + "output.dense.bias"])
        self.ln1 = (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
        self.ln2 = (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])

    def forward(self, x, attend):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        x = F.layer_norm(self.attn_out(ctx.transpose(1, 2).reshape(b, s, h)) + x, (h,), *self.ln1, self.eps)
        return F.layer_norm(self.out(F.gelu(self.inter(x))) + x, (h,), *self.ln2, self.eps)


def _linear(weight, bias):
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def torch_dynamic_int8(model):
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def torch_linear_bytes(model):
    """Bytes of the linear layers' weights and biases (int8 values + float bias when quantized)."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            total += m.weight().int_repr().numel() + m.bias().numel() * 4
        elif isinstance(m, torch.nn.Linear):
            total += (m.weight.numel() + m.bias.numel()) * 4
    return total


def full_batch(tokenizer_model, sentences):
    """BATCH sequences of exactly SEQ real tokens: runs of consecutive sentences, truncated."""
    texts = [" ".join(sentences[(i * 9 + j) % len(sentences)] for j in range(30)) for i in range(BATCH)]
    ids, types, mask = tokenizer_model.tokenize(texts, pad_to=SEQ)
    assert mask.all(), "a sequence is shorter than SEQ tokens"
    return ids, types, mask


def torch_encode(model, tokenizer_model, sentences, batch_size=32):
    ids, types, mask = (torch.from_numpy(a) for a in tokenizer_model.tokenize(sentences))
    with torch.inference_mode():
        return np.concatenate([model(ids[i:i + batch_size], types[i:i + batch_size],
                                     mask[i:i + batch_size]).numpy()
                               for i in range(0, len(sentences), batch_size)])


def latencies(fns, repeats, rounds, pause=0.05):
    """{name: median of rounds * repeats timed calls (seconds)}, the calls interleaved."""
    names = list(fns)
    for name in names:
        fns[name]()
    times = {name: [] for name in names}
    for step in range(rounds * repeats):
        for name in names[step % len(names):] + names[:step % len(names)]:
            time.sleep(pause)
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def profile_int8(model, batch, calls):
    """Wall time per lowbit INT8 forward (ms and share) of the lb.Linear calls and each numpy stage."""
    totals = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - t0
        return wrapper

    patches = [(minilm.MiniLM, "_self_attention", "self-attention (lb.nn.attention_block: QKV, "
                "attention, output projection, residual add + LayerNorm)"),
               (minilm, "_add_layer_norm", "the embeddings' LayerNorm (lb.nn, C++)"),
               (minilm.MiniLM, "_feed_forward", "feed-forward (lb.nn.mlp: intermediate, its GELU, "
                "output, residual add + LayerNorm)")]
    saved = [getattr(obj, attr) for obj, attr, _ in patches]
    for obj, attr, name in patches:
        setattr(obj, attr, timed(name, getattr(obj, attr)))
    try:
        model.forward(*batch)
        totals.clear()
        t0 = time.perf_counter()
        for _ in range(calls):
            model.forward(*batch)
        total = time.perf_counter() - t0
    finally:
        for (obj, attr, _), fn in zip(patches, saved):
            setattr(obj, attr, fn)
    ms = {name: t / calls * 1e3 for name, t in sorted(totals.items(), key=lambda kv: -kv[1])}
    ms["embeddings, pooling, Python glue"] = total / calls * 1e3 - sum(ms.values())
    return {"forward_ms": total / calls * 1e3,
            "parts": {name: {"ms": t, "share": t / (total / calls * 1e3)} for name, t in ms.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (latency: median of all calls)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    lb.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads, user_api="blas")
    except ImportError:
        pass

    sentences = minilm.read_sentences()
    model_dir = minilm.default_model_dir()
    models = {mode: minilm.MiniLM(model_dir, mode=mode, threads=args.threads) for mode in minilm.MODES}
    # INT8 with lb.nn.attention's int8 dot products (precision="int8"), its accuracy beside
    models["int8+"] = minilm.MiniLM(model_dir, mode="int8", threads=args.threads, attention="int8")
    torch_float = TorchMiniLM(model_dir).eval()
    torch_q8 = torch_dynamic_int8(torch_float)
    names = {"float": "numpy float32", "int8": "lowbit INT8 (W8A8)",
             "int8+": "lowbit INT8 (W8A8), int8 attention", "int4": "lowbit INT4 g32 (W4A8)"}

    # Accuracy on the bundled sentences, against the numpy float32 embeddings.
    reference = models["float"].encode(sentences)
    embeddings = {names[m]: models[m].encode(sentences) for m in models}
    embeddings["torch float32"] = torch_encode(torch_float, models["float"], sentences)
    embeddings["torch dynamic INT8"] = torch_encode(torch_q8, models["float"], sentences)
    try:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(model_dir), device="cpu")
        embeddings["sentence-transformers (float32)"] = st.encode(sentences, batch_size=32)
    except ImportError:
        pass
    cosines = {}
    for name, e in embeddings.items():
        c = np.sum(e * reference, axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(reference, axis=1))
        cosines[name] = {"mean": float(c.mean()), "min": float(c.min())}

    # Latency on one full 32 x 128 batch.
    batch = full_batch(models["float"], sentences)
    batch_t = tuple(torch.from_numpy(a) for a in batch)

    def torch_call(model):
        def call():
            with torch.inference_mode():
                model(*batch_t)
        return call

    fns = {names[m]: (lambda model=models[m]: model.forward(*batch)) for m in models}
    fns["torch float32"] = torch_call(torch_float)
    fns["torch dynamic INT8"] = torch_call(torch_q8)
    seconds = latencies(fns, args.repeats, args.rounds)
    weight_bytes = {names[m]: models[m].nbytes for m in models}
    weight_bytes["torch float32"] = torch_linear_bytes(torch_float)
    weight_bytes["torch dynamic INT8"] = torch_linear_bytes(torch_q8)

    profile = profile_int8(models["int8"], batch, calls=args.repeats)
    profile_i8 = profile_int8(models["int8+"], batch, calls=args.repeats)
    report = {
        "batch": [BATCH, SEQ], "threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
        "lowbit_isa": lb.cpu_info()["isa"], "torch": torch.__version__, "numpy": np.__version__,
        "sentences": len(sentences),
        "results": {name: {"ms": seconds[name] * 1e3 if name in seconds else None,
                           "speedup_vs_torch_int8": (seconds["torch dynamic INT8"] / seconds[name]
                                                     if name in seconds else None),
                           "mean_cos": cosines[name]["mean"], "min_cos": cosines[name]["min"],
                           "linear_bytes": weight_bytes.get(name)}
                    for name in cosines},
        "profile_lowbit_int8": profile,
        "profile_lowbit_int8_int8_attention": profile_i8,
    }
    int8 = report["results"][names["int8"]]
    report["targets"] = {
        "int8 mean cos >= 0.995": int8["mean_cos"] >= 0.995,
        "int8 min cos >= 0.98": int8["min_cos"] >= 0.98,
        "int8 >= 1.5x faster than torch dynamic INT8": int8["speedup_vs_torch_int8"] >= 1.5,
        "int8 with int8 attention >= 2x torch dynamic INT8":
            report["results"][names["int8+"]]["speedup_vs_torch_int8"] >= 2.0,
        "numpy float32 = torch float32 (min cos > 0.99999)": cosines["torch float32"]["min"] > 0.99999,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return

    print(f"all-MiniLM-L6-v2, batch {BATCH} x {SEQ} tokens, {args.threads} threads, lowbit kernels "
          f"{report['lowbit_isa']}, torch {torch.__version__}; median of {args.rounds * args.repeats} "
          f"interleaved calls each. Cosine to numpy float32 over {len(sentences)} sentences.\n")
    print("| implementation | latency (ms) | vs torch dynamic INT8 | mean cos | min cos | linear weights (MB) |")
    print("|---|---|---|---|---|---|")
    for name, r in report["results"].items():
        ms = f"{r['ms']:.1f}" if r["ms"] is not None else "-"
        sp = f"{r['speedup_vs_torch_int8']:.2f}x" if r["ms"] is not None else "-"
        mb = f"{r['linear_bytes'] / 1e6:.2f}" if r["linear_bytes"] is not None else "-"
        print(f"| {name} | {ms} | {sp} | {r['mean_cos']:.7f} | {r['min_cos']:.7f} | {mb} |")
    print("\ntargets: " + "; ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in report["targets"].items()))
    for title, prof in (("lowbit INT8", profile), ("lowbit INT8, int8 attention", profile_i8)):
        print(f"\n{title} forward, {prof['forward_ms']:.1f} ms per call:\n")
        print("| part | ms | share |")
        print("|---|---|---|")
        for name, part in prof["parts"].items():
            print(f"| {name} | {part['ms']:.1f} | {part['share'] * 100:.1f}% |")


if __name__ == "__main__":
    main()
