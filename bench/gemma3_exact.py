"""Gemma 3 270M (Q4_K_M GGUF): lowbit's model (examples/gemma3.py) against an exact float64
evaluation of the same weights.

The reference dequantizes every tensor with the ``gguf`` package's numpy reference
(``gguf.quants.dequantize``) and runs the architecture in float64 numpy, written separately from
the example from the facts in docs (DESIGN.md section 6, llama.cpp's gemma3 graph): both run
teacher-forced over the bundled sentences (one context of --tokens tokens, past the 512-position
sliding window), and the report gives the next-token top-1 agreement, each one's perplexity on
the text, and lowbit's agreement with itself fed one token at a time.

With --llama-cpp (llama-cpp-python importable), llama.cpp scores the same ids too, and the
report adds its agreement with both, and whether its tokenizer gives the same ids for the text.

    python bench/gemma3_exact.py [--tokens 1024] [--threads 2] [--stepwise] [--llama-cpp] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import lowbit as lb  # noqa: E402
from gemma3 import GLOBAL_EVERY, LOCAL_ROPE_BASE, Gemma3, default_gguf  # noqa: E402


def fixed_text_ids(tokenizer, n):
    with open(os.path.join(HERE, "..", "examples", "data", "sentences.txt")) as f:
        ids = tokenizer.encode(" ".join(line.strip() for line in f if line.strip())).ids
    if len(ids) < n:
        raise SystemExit(f"the bundled text has {len(ids)} tokens, fewer than {n}")
    return ids[:n]


class ExactGemma3:
    """Gemma 3 in float64 over the gguf package's dequantized weights (the embedding is kept
    float32, 671 MB, and widened row block by row block)."""

    def __init__(self, path):
        import gguf
        reader = gguf.GGUFReader(path)
        meta = lb.gguf_metadata(path)
        hp = lambda key: meta["gemma3." + key]  # noqa: E731
        self.n_layers, self.hidden = hp("block_count"), hp("embedding_length")
        self.heads, self.kv_heads = hp("attention.head_count"), hp("attention.head_count_kv")
        self.hd, self.eps, self.window = (hp("attention.key_length"),
                                          hp("attention.layer_norm_rms_epsilon"),
                                          hp("attention.sliding_window"))
        self.global_base = meta.get("gemma3.rope.freq_base", 1e6)
        self.w = {}
        for t in reader.tensors:
            shape = tuple(int(s) for s in reversed(t.shape))
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            self.w[t.name] = w.astype(np.float32 if t.name == "token_embd.weight" else np.float64)

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos, base):  # NeoX: pairs (x[i], x[i + d/2])
        h = self.hd // 2
        theta = pos[:, None] * base ** (-np.arange(h) * 2.0 / self.hd)
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        x0, x1 = x[..., :h], x[..., h:]
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], -1)

    def logits_top1(self, ids):
        """Next-token argmax and the log-probability of each following token, every position."""
        t, hd, w = len(ids), self.hd, self.w
        x = w["token_embd.weight"][ids].astype(np.float64) * np.sqrt(np.float32(self.hidden))
        pos = np.arange(t, dtype=np.float64)
        j, i = np.arange(t)[None, :], np.arange(t)[:, None]
        for layer in range(self.n_layers):
            b = lambda name: w[f"blk.{layer}.{name}.weight"]  # noqa: E731
            is_global = (layer + 1) % GLOBAL_EVERY == 0
            base = self.global_base if is_global else LOCAL_ROPE_BASE
            visible = (j <= i) if is_global else (j <= i) & (i - j < self.window)
            h = self.rms(x, b("attn_norm"))
            q = self.rms((h @ b("attn_q").T).reshape(t, self.heads, hd), b("attn_q_norm"))
            k = self.rms((h @ b("attn_k").T).reshape(t, self.kv_heads, hd), b("attn_k_norm"))
            v = (h @ b("attn_v").T).reshape(t, self.kv_heads, hd)
            q, k = self.rope(q, pos, base), self.rope(k, pos, base)
            out = np.empty((t, self.heads, hd))
            for head in range(self.heads):
                kv = head // (self.heads // self.kv_heads)
                s = np.where(visible, q[:, head] @ k[:, kv].T / np.sqrt(hd), -np.inf)
                p = np.exp(s - s.max(1, keepdims=True))
                out[:, head] = (p / p.sum(1, keepdims=True)) @ v[:, kv]
            x = x + self.rms(out.reshape(t, -1) @ b("attn_output").T, b("post_attention_norm"))
            h = self.rms(x, b("ffn_norm"))
            g = h @ b("ffn_gate").T
            g = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
            x = x + self.rms((g * (h @ b("ffn_up").T)) @ b("ffn_down").T, b("post_ffw_norm"))
        x = self.rms(x, w["output_norm.weight"])
        return self.scores(x, ids)

    def scores(self, x, ids):
        emb = self.w.get("output.weight", self.w["token_embd.weight"])
        logits = np.concatenate([x @ emb[r:r + 16384].astype(np.float64).T
                                 for r in range(0, len(emb), 16384)], axis=1)
        return np.argmax(logits, 1), log_probs(logits, ids)


def log_probs(logits, ids):
    """log p(ids[i + 1] | ids[..i]) for every position but the last."""
    logits = np.asarray(logits, np.float64)
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return logits[np.arange(len(ids) - 1), ids[1:]] - lse[:-1]


def llama_cpp_top1(path, ids, threads):
    """llama.cpp's next-token argmax over ids (batches of 512), and whether its tokenizer encodes
    the bundled text to the same ids as ours."""
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=max(512, len(ids)), n_batch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    with open(os.path.join(HERE, "..", "examples", "data", "sentences.txt")) as f:
        text = " ".join(line.strip() for line in f if line.strip())
    same = llm.tokenize(text.encode(), add_bos=True, special=True)[:len(ids)] == list(ids)
    llm.eval(ids)
    return np.argmax(np.asarray(llm.scores[:len(ids)]), axis=1), same


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="GGUF file (default: assembled from the gemma3-270m packages)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stepwise", action="store_true",
                   help="also feed lowbit one token at a time and compare with the batched run")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also score the text with llama.cpp (llama-cpp-python) on the same file")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    lb.set_num_threads(args.threads)
    path = args.gguf or default_gguf()

    model = Gemma3(path)
    ids = fixed_text_ids(model.tokenizer, args.tokens)
    t0 = time.perf_counter()
    logits = model.forward(ids, all_logits=True)
    seconds = time.perf_counter() - t0
    ours, ours_lp = np.argmax(logits, 1), log_probs(logits, ids)
    result = {"tokens": len(ids), "threads": args.threads, "isa": lb.cpu_info()["isa"],
              "lowbit_prompt_tok_s": round(len(ids) / seconds, 1),
              "lowbit_ppl": round(float(np.exp(-ours_lp.mean())), 3)}
    if args.stepwise:
        model.reset()
        step = np.array([np.argmax(model.decode(t)) for t in ids])  # the replayed decode step
        result["lowbit_stepwise_vs_batched"] = round(float(np.mean(step == ours)), 4)
    if args.llama_cpp:
        llama = llama_cpp_top1(path, ids, args.threads)
        result["llama_cpp_same_token_ids"] = llama[1]
        result["lowbit_vs_llama_cpp"] = round(float(np.mean(ours == llama[0])), 4)
    del model, logits

    exact, exact_lp = ExactGemma3(path).logits_top1(ids)
    result["exact_ppl"] = round(float(np.exp(-exact_lp.mean())), 3)
    result["top1_agreement"] = round(float(np.mean(ours == exact)), 4)
    if args.llama_cpp:
        result["llama_cpp_vs_exact"] = round(float(np.mean(llama[0] == exact)), 4)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
