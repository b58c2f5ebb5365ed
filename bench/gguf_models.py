"""GGUF models as users have them: lowbit's example models against llama.cpp (llama-cpp-python)
on the same files, and both against an exact float64 evaluation of the file's own weights.

    PYTHONPATH=/tmp/llamacpp python bench/gguf_models.py                  # every /work/models/*.gguf
    PYTHONPATH=/tmp/llamacpp python bench/gguf_models.py --files a.gguf b.gguf --threads 2 --json

For each file, side by side in one run, at the same thread count (2 by default):

* decode tokens/s: greedy, DECODE_STEPS steps of one token after a short prompt, the same argmax
  loop on both sides (llama.cpp's logits read straight from its context);
* prompt tokens/s: one PROMPT_TOKENS-token prompt (llama.cpp with n_batch=512);
* next-token top-1 agreement under teacher forcing on the first --score-tokens tokens of
  examples/data/sentences.txt, of each library with the exact evaluation: every tensor
  dequantized with the gguf package's reference ``gguf.quants.dequantize`` and the model run in
  float64 (``exact_logits``: the llama architecture is here; another architecture's example module
  may provide ``exact_logits(path, ids)``, e.g. examples/gemma3.py);
* lowbit's weight bytes against the file's size;
* decode against the memory: weight bytes x decode tokens/s over the machine's read probe
  (``lowbit._core.read_bandwidth`` over 1 GB, measured before each round of the file's timings;
  the best of the rounds, like the speeds), for both.

lowbit decodes with the example's ``decode(token)`` where it has one (SmolLM2: its forward
recorded once by ``lowbit.nn.record`` and replayed from C++).

lowbit's side uses the example model class of the file's architecture (MODELS below: llama ->
examples/smollm2.py SmolLM2, gemma3 -> examples/gemma3.py Gemma3 when present). A file it cannot
run yet (a tensor type lowbit.load_gguf does not read, an architecture without an example) is
reported per file and the rest goes on; so is a missing llama-cpp-python (lowbit only).

Every timing runs in a fresh child process per library, file and round (llama.cpp's OpenMP
threads spin after each call and would slow whatever runs next in the same process); rounds
alternate between the libraries and the best median is kept: the machine is shared and noisy.
The teacher-forced scoring runs in a child process too, once per library and file.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "..", "examples")
sys.path.insert(0, EXAMPLES)
import lowbit as lb  # noqa: E402

DECODE_STEPS = 64
PROMPT_TOKENS = 256
START = "The capital of France is"  # the short context decode speed is measured after
DEFAULT_FILES = "/work/models/*.gguf"
# architecture -> (example module, class): lowbit's model for files of that architecture
MODELS = {"llama": ("smollm2", "SmolLM2"), "gemma3": ("gemma3", "Gemma3")}


# ---------------------------------------------------------------- the exact evaluation (float64)

def dequantized(path) -> dict:
    """Every tensor of a GGUF file as float64 in numpy order (the last GGUF dimension first),
    dequantized by the gguf package's reference code: the weights both libraries approximate."""
    import gguf
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
    return out


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def exact_llama_logits(path, ids, weights=None) -> np.ndarray:
    """Logits (len(ids), vocab), float64, of a llama-architecture GGUF on `ids` from an empty
    context, computed in float64 from the dequantized weights: RMSNorm, RoPE on adjacent pairs
    (the layout of GGUF llama Q/K weights: llama.cpp's "normal" RoPE) over the first
    rope.dimension_count dimensions, causal grouped-query attention, SwiGLU, output tied to the
    token embedding when the file has no output.weight. Optional biases are added."""
    meta = lb.gguf_metadata(path)
    arch = meta["general.architecture"]
    p = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    w = weights if weights is not None else dequantized(path)
    hidden, heads = p("embedding_length"), p("attention.head_count")
    kv_heads = p("attention.head_count_kv", heads)
    head_dim = p("attention.key_length", hidden // heads)
    rope_dim = p("rope.dimension_count", head_dim)
    eps, base = p("attention.layer_norm_rms_epsilon"), p("rope.freq_base", 10000.0)
    t = len(ids)
    inv = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    angles = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rope(v):  # (t, heads, head_dim): rotate pairs (2i, 2i+1) of the first rope_dim
        out = v.copy()
        a, b = v[..., 0:rope_dim:2], v[..., 1:rope_dim:2]
        out[..., 0:rope_dim:2] = a * cos - b * sin
        out[..., 1:rope_dim:2] = a * sin + b * cos
        return out

    def linear(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    mask = np.triu(np.full((t, t), -np.inf), 1)
    group = heads // kv_heads
    x = w["token_embd.weight"][np.asarray(ids)]
    for i in range(p("block_count")):
        b = f"blk.{i}."
        h = _rms_norm(x, w[b + "attn_norm.weight"], eps)
        q = rope(linear(h, b + "attn_q").reshape(t, heads, head_dim))
        k = rope(linear(h, b + "attn_k").reshape(t, kv_heads, head_dim))
        v = linear(h, b + "attn_v").reshape(t, kv_heads, head_dim)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # head j reads kv j//group
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        x = x + linear(np.einsum("hqk,khd->qhd", s, v).reshape(t, heads * head_dim),
                       b + "attn_output")
        h = _rms_norm(x, w[b + "ffn_norm.weight"], eps)
        gate, up = linear(h, b + "ffn_gate"), linear(h, b + "ffn_up")
        x = x + linear(gate / (1 + np.exp(-gate)) * up, b + "ffn_down")
    x = _rms_norm(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


EXACT = {"llama": exact_llama_logits}


def exact_hook(arch):
    """The float64 evaluation for an architecture: EXACT, else ``exact_logits(path, ids)`` of its
    example module (MODELS); None if neither has one."""
    if arch in EXACT:
        return EXACT[arch]
    if arch in MODELS:
        try:
            return getattr(importlib.import_module(MODELS[arch][0]), "exact_logits", None)
        except ImportError:
            return None
    return None


# ------------------------------------------------------------------------- the two libraries

class Lowbit:
    """lowbit's example model class for the file's architecture: forward(ids, all_logits),
    reset(), tokenizer, and decode(token) (one more token, replayed by nn.record) where it has
    one."""
    name = "lowbit"

    def __init__(self, path):
        arch = lb.gguf_metadata(path)["general.architecture"]
        if arch not in MODELS:
            raise NotSupported(f"no lowbit example for architecture {arch!r}")
        module, cls = MODELS[arch]
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise NotSupported(f"examples/{module}.py not importable ({e})") from None
        try:
            self.model = getattr(mod, cls)(path)
        except lb.FormatError as e:
            raise NotSupported(str(e)) from None

    def nbytes(self):
        return self.model.nbytes()

    def prefill(self, ids):
        self.model.reset()
        return int(np.argmax(self.model.forward(ids)))

    def step(self, tok):
        decode = getattr(self.model, "decode", None)
        return int(np.argmax(decode(tok) if decode else self.model.forward([tok])))

    def top1(self, ids):
        self.model.reset()
        return np.argmax(self.model.forward(ids, all_logits=True), axis=1)

    def top1_stepwise(self, ids):
        self.model.reset()
        return np.array([self.step(t) for t in ids])


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx, scoring=False):
        from llama_cpp import Llama
        self.path, self.threads, self.n_ctx = path, threads, n_ctx
        # logits_all keeps an (n_ctx, vocab) float32 array: only the scoring instance has it
        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=512, logits_all=scoring, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def nbytes(self):
        return None

    def _last_top1(self):
        # llama-cpp-python's eval() stores logits in .scores only with logits_all: read the last
        # position's logits from the context itself
        import llama_cpp
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.n_vocab,))))

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return self._last_top1()

    def step(self, tok):
        self.llm.eval([tok])
        return self._last_top1()

    def top1(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return np.argmax(self.llm.scores[: len(ids)], axis=1)

    def top1_stepwise(self, ids):
        from llama_cpp import Llama
        stepper = Llama(model_path=self.path, n_threads=self.threads, n_ctx=self.n_ctx, n_batch=1,
                        n_ubatch=1, logits_all=True, verbose=False)
        stepper.eval(ids)
        return np.argmax(stepper.scores[: len(ids)], axis=1)


class NotSupported(Exception):
    """lowbit cannot run this file yet."""


def make(name, path, threads, n_ctx, scoring=False):
    lb.set_num_threads(threads)
    try:  # numpy's BLAS (lowbit's examples use it here and there) on the same number of threads
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass
    return Lowbit(path) if name == "lowbit" else LlamaCpp(path, threads, n_ctx, scoring)


def time_run(impl, prompt, start):
    """(prompt tok/s, decode tok/s): prefill of `prompt`, then DECODE_STEPS greedy steps after a
    short `start` context (decode speed is quoted at short context, as llama-bench does)."""
    t0 = time.perf_counter()
    impl.prefill(prompt)
    t_prompt = time.perf_counter() - t0
    tok = impl.prefill(start)
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        tok = impl.step(tok)
    return len(prompt) / t_prompt, DECODE_STEPS / (time.perf_counter() - t0)


def _error(e):
    return {"error": f"not supported yet: {e}" if isinstance(e, NotSupported)
            else f"{type(e).__name__}: {e}"}


def timed_in_child(name, path, threads, n_ctx, prompt, start, repeats):
    """Median (prompt tok/s, decode tok/s) of `repeats` runs in a fresh process, or {"error"}."""
    try:
        impl = make(name, path, threads, n_ctx)
        runs = [time_run(impl, prompt, start) for _ in range(repeats)]
    except Exception as e:  # noqa: BLE001 -- reported per file, the bench goes on
        return _error(e)
    return {"prompt": statistics.median(r[0] for r in runs),
            "decode": statistics.median(r[1] for r in runs), "nbytes": impl.nbytes()}


def scored_in_child(name, path, threads, n_ctx, ids, stepwise):
    """Teacher-forced top-1 ids (and, with `stepwise`, those of the same text fed one token at a
    time) in a fresh process, or {"error"}."""
    try:
        impl = make(name, path, threads, n_ctx, scoring=True)
        out = {"top1": impl.top1(ids).tolist()}
        if stepwise:
            out["top1_stepwise"] = impl.top1_stepwise(ids).tolist()
    except Exception as e:  # noqa: BLE001
        return _error(e)
    return out


# ---------------------------------------------------------------------------------- one file

def text_ids(path, n):
    """The first n token ids of the bundled sentences, tokenized as llama.cpp does (with the BOS
    the file asks for); with lowbit's example tokenizer when llama-cpp-python is missing."""
    with open(os.path.join(EXAMPLES, "data", "sentences.txt")) as f:
        text = " ".join(line.strip() for line in f if line.strip())
    try:
        from llama_cpp import Llama
    except ImportError:
        meta = lb.gguf_metadata(path)
        from gguf_tokenizer import tokenizer_from_gguf
        encode = tokenizer_from_gguf(meta).encode
        bos = [meta["tokenizer.ggml.bos_token_id"]] if meta.get(
            "tokenizer.ggml.add_bos_token") else []
        ids, start = bos + encode(text).ids, bos + encode(START).ids
    else:
        vocab = Llama(model_path=path, vocab_only=True, verbose=False)
        ids, start = (vocab.tokenize(s.encode(), add_bos=True) for s in (text, START))
    if len(ids) < n:
        raise SystemExit(f"the bundled text has {len(ids)} tokens, fewer than {n}")
    return ids[:n], start


_PROBE = []


def read_probe():
    """The machine's read bandwidth now, bytes/s: the best of two passes over 1 GB (made once)."""
    if not _PROBE:
        _PROBE.append(np.ones(1 << 30, np.uint8))
    return max(lb._core.read_bandwidth(_PROBE[0], 2) for _ in range(2))


def bench_file(path, args, names, pool):
    meta = lb.gguf_metadata(path)
    arch = meta["general.architecture"]
    n = max(args.score_tokens, PROMPT_TOKENS)
    text, start = text_ids(path, n)
    prompt, scored = text[:PROMPT_TOKENS], text[: args.score_tokens]
    n_ctx = max(n, PROMPT_TOKENS + DECODE_STEPS + len(start)) + 16
    r = {"file": os.path.basename(path), "path": path, "architecture": arch,
         "file_mb": round(os.path.getsize(path) / 1e6, 1), "scored_tokens": len(scored),
         "load_avg_1min": round(os.getloadavg()[0], 2)}  # other users of the machine: see timings

    hook = exact_hook(arch)
    exact = None
    if not scored:
        r["exact"] = "not scored (--score-tokens 0)"
    elif hook is None:
        r["exact"] = f"no exact evaluation for architecture {arch!r}"
    else:
        t0 = time.perf_counter()
        exact = np.argmax(hook(path, scored), axis=1)
        r["exact_s"] = round(time.perf_counter() - t0, 1)

    side = {name: {} for name in names}
    best = {name: None for name in names}
    probes = []
    for _ in range(args.rounds):
        probes.append(read_probe())
        for name in names:
            if "error" in side[name]:
                continue
            got = pool.apply(timed_in_child, (name, path, args.threads, n_ctx, prompt, start,
                                              args.repeats))
            if "error" in got:
                side[name] = got
                continue
            old = best[name]
            best[name] = got if old is None else {
                "prompt": max(old["prompt"], got["prompt"]),
                "decode": max(old["decode"], got["decode"]), "nbytes": got["nbytes"]}
    tops = {}
    for name in names:
        if "error" in side[name]:
            continue
        s = side[name]
        s["prompt_tok_s"] = round(best[name]["prompt"], 1)
        s["decode_tok_s"] = round(best[name]["decode"], 1)
        if best[name]["nbytes"] is not None:
            s["weights_mb"] = round(best[name]["nbytes"] / 1e6, 1)
            s["weights_vs_file"] = round(best[name]["nbytes"] / os.path.getsize(path), 3)
        if not scored:
            continue
        got = pool.apply(scored_in_child, (name, path, args.threads, n_ctx, scored,
                                           args.stepwise))
        if "error" in got:
            s["top1_error"] = got["error"]
            continue
        tops[name] = top = np.asarray(got["top1"])
        if exact is not None:
            s["top1_vs_exact"] = round(float(np.mean(top == exact)), 4)
        if args.stepwise:
            s["top1_vs_itself_stepwise"] = round(
                float(np.mean(top == np.asarray(got["top1_stepwise"]))), 4)
    r.update(side)
    # decode against the memory: the weights a token reads (lowbit's bytes, which are the file's
    # tensors at their native size) times tokens/s, over the read probe's best of the rounds
    r["read_gb_s"] = round(max(probes) / 1e9, 1)
    weights = next((best[n]["nbytes"] for n in names if best[n] and best[n]["nbytes"]), None)
    for name in names:
        if weights and "decode_tok_s" in side[name]:
            side[name]["decode_share_of_read"] = round(
                weights * side[name]["decode_tok_s"] / (r["read_gb_s"] * 1e9), 3)
    if len(tops) == 2:
        r["top1_lowbit_vs_llama_cpp"] = round(float(np.mean(tops["lowbit"] == tops["llama.cpp"])), 4)
    if all("decode_tok_s" in side.get(n, {}) for n in ("lowbit", "llama.cpp")):
        r["decode_ratio"] = round(side["lowbit"]["decode_tok_s"] / side["llama.cpp"]["decode_tok_s"], 2)
        r["prompt_ratio"] = round(side["lowbit"]["prompt_tok_s"] / side["llama.cpp"]["prompt_tok_s"], 2)
    return r


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def print_table(results, args):
    print(f"{args.threads} threads, lowbit ISA {lb.cpu_info()['isa']}, best median of "
          f"{args.rounds} rounds x {args.repeats}; decode {DECODE_STEPS} steps, prompt "
          f"{PROMPT_TOKENS} tokens; top-1 vs exact (float64) on {args.score_tokens} tokens")
    loads = [r["load_avg_1min"] for r in results]
    print(f"machine load (1-minute average) at each file's start: {min(loads)} to {max(loads)} on "
          f"{os.cpu_count()} CPUs (above {os.cpu_count()}, the timings shared the CPUs with other "
          f"work)\n")
    libs = ["lowbit", "llama.cpp"]
    cols = ["file", "file MB", "lowbit MB", "read probe GB/s"]
    for what in ("decode tok/s", "decode share of read probe", "prompt tok/s", "top-1 vs exact"):
        cols += [f"{what} {name}" for name in libs]
    cols.append("top-1 lowbit vs llama.cpp")
    if args.stepwise:
        cols += [f"vs itself one token at a time {name}" for name in libs]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    notes = []
    for r in results:
        sides = [r.get(name, {}) for name in libs]
        pair = lambda key, fmt=str: [  # noqa: E731
            fmt(s[key]) if s.get(key) is not None else "-" for s in sides]
        row = [r["file"], str(r["file_mb"]), str(sides[0].get("weights_mb", "-")), str(r["read_gb_s"]),
               *pair("decode_tok_s"), *pair("decode_share_of_read", lambda v: f"{100 * v:.0f}%"),
               *pair("prompt_tok_s"), *pair("top1_vs_exact", _pct),
               _pct(r.get("top1_lowbit_vs_llama_cpp"))]
        if args.stepwise:
            row += pair("top1_vs_itself_stepwise", _pct)
        print("| " + " | ".join(row) + " |")
        for name, s in zip(libs, sides):
            for key in ("error", "top1_error"):
                if key in s:
                    notes.append(f"{r['file']}: {name}: {s[key]}")
        if "exact" in r:
            notes.append(f"{r['file']}: {r['exact']}")
    for note in notes:
        print("* " + note)


def main(argv=None, description=None):
    p = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    p.add_argument("--files", nargs="+", default=None,
                   help=f"GGUF files (default: {DEFAULT_FILES})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per round")
    p.add_argument("--score-tokens", type=int, default=512,
                   help="teacher-forced tokens scored for top-1 agreement; 0: speed only")
    p.add_argument("--stepwise", action="store_true",
                   help="also score the text fed one token at a time (each against its batched run)")
    p.add_argument("--only", choices=["lowbit", "llama.cpp"], help="run one library only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    files = args.files or sorted(glob.glob(DEFAULT_FILES))
    if not files:
        raise SystemExit(f"no GGUF files: none match {DEFAULT_FILES}; pass --files")
    names = ["lowbit", "llama.cpp"] if args.only is None else [args.only]
    if "llama.cpp" in names and importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python not installed: lowbit only", file=sys.stderr)
        names.remove("llama.cpp")
    results = []
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for path in files:
            print(f"{os.path.basename(path)} ...", file=sys.stderr, flush=True)
            results.append(bench_file(path, args, names, pool))
    if args.json:
        print(json.dumps({"threads": args.threads, "isa": lb.cpu_info()["isa"],
                          "decode_steps": DECODE_STEPS, "prompt_tokens": PROMPT_TOKENS,
                          "rounds": args.rounds, "repeats": args.repeats, "files": results}))
    else:
        print_table(results, args)
    return results


if __name__ == "__main__":
    main()
