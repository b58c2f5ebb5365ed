"""SmolLM2-135M-Instruct (Q4_1 GGUF): lowbit's numpy model (examples/smollm2.py) against llama.cpp
(llama-cpp-python) on the same file and thread count.

Measures decode tokens/s (greedy, one token per step, the same argmax loop on both sides),
prompt tokens/s for a 256-token prompt, and next-token top-1 agreement under teacher forcing on a
fixed text of >= 500 tokens (the bundled sentences), and each one's agreement with an exact
evaluation of the same weights (float activations throughout) and with itself fed the same text
one token at a time (the decode path) instead of in one batch. Timings run in a fresh child
process per library and round (llama.cpp's OpenMP threads spin after each call and would slow
whatever runs next in the same process); rounds alternate and the best median is kept: the
machine is shared and noisy.

    python bench/smollm2.py [--threads 2] [--rounds 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import lowbit as lb  # noqa: E402
from smollm2 import SmolLM2, default_gguf  # noqa: E402

DECODE_STEPS = 64
PROMPT_TOKENS = 256


def fixed_text_ids(tokenizer, n):
    with open(os.path.join(HERE, "..", "examples", "data", "sentences.txt")) as f:
        ids = tokenizer.encode(" ".join(line.strip() for line in f if line.strip())).ids
    if len(ids) < n:
        raise SystemExit(f"the bundled text has {len(ids)} tokens, fewer than {n}")
    return ids[:n]


class Ours:
    name = "lowbit"

    def __init__(self, path):
        self.model = SmolLM2(path)

    def prefill(self, ids):
        self.model.reset()
        return int(np.argmax(self.model.forward(ids)))

    def step(self, tok):
        return int(np.argmax(self.model.forward([tok])))

    def top1(self, ids):
        self.model.reset()
        return np.argmax(self.model.forward(ids, all_logits=True), axis=1)

    def top1_stepwise(self, ids):
        self.model.reset()
        return np.array([np.argmax(self.model.forward([t])) for t in ids])

    def exact_top1(self, ids):
        """The same weights with float activations everywhere (W4A32 layers, a float32 output
        layer from the dequantized embedding): the reference both int8-activation runs
        approximate."""
        m = self.model
        layers = [l[k] for l in m.layers for k in ("qkv", "o", "gate_up", "down")]
        output, table = m.output, m.embed.dequantize()  # 113 MB of float32, for this only
        try:
            for layer in layers:
                layer.activations = "float"
            m.output = lambda x: x @ table.T
            return self.top1(ids)
        finally:
            for layer in layers:
                layer.activations = "int8"
            m.output = output


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx):
        from llama_cpp import Llama
        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=512, verbose=False)
        self.scorer = Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                            n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False)

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def step(self, tok):
        self.llm.eval([tok])
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def top1(self, ids):
        self.scorer.reset()
        self.scorer.eval(ids)
        return np.argmax(self.scorer.scores[: len(ids)], axis=1)

    def top1_stepwise(self, ids):
        from llama_cpp import Llama
        stepper = Llama(model_path=self.llm.model_path, n_threads=self.llm.n_threads,
                        n_ctx=self.llm.n_ctx(), n_batch=1, n_ubatch=1, logits_all=True, verbose=False)
        stepper.eval(ids)
        return np.argmax(stepper.scores[: len(ids)], axis=1)


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


def make(name, path, threads):
    lb.set_num_threads(threads)
    try:  # numpy's BLAS (attention) on the same number of threads
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass
    return Ours(path) if name == "lowbit" else LlamaCpp(path, threads, 2048)


def timed_in_child(name, path, threads, prompt, start, repeats):
    """Median (prompt tok/s, decode tok/s) of `repeats` runs, measured in a fresh process: so that
    neither library's idle threads (llama.cpp's OpenMP workers spin) slow the other."""
    impl = make(name, path, threads)
    runs = [time_run(impl, prompt, start) for _ in range(repeats)]
    return tuple(statistics.median(r[j] for r in runs) for j in (0, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per round")
    p.add_argument("--score-tokens", type=int, default=1024)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    path = args.gguf or default_gguf()
    ours = make("lowbit", path, args.threads)
    impls = [ours]
    try:
        impls.append(make("llama.cpp", path, args.threads))
    except ImportError:
        print("llama-cpp-python not installed: lowbit only", file=sys.stderr)
    tok = ours.model.tokenizer
    text = fixed_text_ids(tok, max(args.score_tokens, PROMPT_TOKENS))
    prompt, start = text[:PROMPT_TOKENS], tok.encode("The capital of France is").ids

    best = {i.name: [0.0, 0.0] for i in impls}
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for _ in range(args.rounds):
            for impl in impls:
                medians = pool.apply(timed_in_child, (impl.name, path, args.threads, prompt, start,
                                                      args.repeats))
                best[impl.name] = [max(b, m) for b, m in zip(best[impl.name], medians)]

    result = {"threads": args.threads, "isa": lb.cpu_info()["isa"], "decode_steps": DECODE_STEPS,
              "prompt_tokens": PROMPT_TOKENS, "weights_mb": round(ours.model.nbytes() / 1e6, 1)}
    for name, (pt, dt) in best.items():
        result[name] = {"prompt_tok_s": round(pt, 1), "decode_tok_s": round(dt, 1)}
    scored = text[: args.score_tokens]
    result["scored_tokens"] = len(scored)
    exact = ours.exact_top1(scored)
    tops = {impl.name: impl.top1(scored) for impl in impls}
    for impl in impls:
        top = tops[impl.name]
        result[impl.name]["top1_vs_exact"] = round(float(np.mean(top == exact)), 4)
        result[impl.name]["top1_vs_itself_stepwise"] = round(
            float(np.mean(top == impl.top1_stepwise(scored))), 4)
    if len(impls) == 2:
        result["top1_agreement"] = round(float(np.mean(tops["lowbit"] == tops["llama.cpp"])), 4)
        result["decode_ratio"] = round(best["lowbit"][1] / best["llama.cpp"][1], 2)
        result["prompt_ratio"] = round(best["lowbit"][0] / best["llama.cpp"][0], 2)
    if args.json:
        print(json.dumps(result))
        return
    print(f"SmolLM2-135M Q4_1, {args.threads} threads, lowbit ISA {result['isa']}, "
          f"best median of {args.rounds} rounds x {args.repeats}")
    print("| | prompt tok/s (256) | decode tok/s | top-1 agreement with exact | with itself, one "
          "token at a time |\n|---|---|---|---|---|")
    for name in best:
        r = result[name]
        print(f"| {name} | {r['prompt_tok_s']} | {r['decode_tok_s']} | {100 * r['top1_vs_exact']:.2f}% "
              f"| {100 * r['top1_vs_itself_stepwise']:.2f}% |")
    if "top1_agreement" in result:
        print(f"\nteacher-forced top-1 agreement on {result['scored_tokens']} tokens: "
              f"{100 * result['top1_agreement']:.2f}%; lowbit/llama.cpp decode "
              f"{result['decode_ratio']}x, prompt {result['prompt_ratio']}x")


if __name__ == "__main__":
    main()
