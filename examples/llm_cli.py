"""What the GGUF language-model examples share: greedy generation and their command line.

A model (examples/smollm2.py's SmolLM2, examples/gemma3.py's Gemma3) provides ``reset()``,
``forward(ids, all_logits=False)``, ``tokenizer``, ``eos`` (a set of ids), ``nbytes()`` and
``chat_prompt(text)``, and may provide ``decode(token)`` (the logits of one more token; both
examples take these from CachedModel below); ``main`` runs it from the command line:

    --prompt TEXT [--chat] [--max-tokens N] [--threads N] [--gguf FILE] [--json]
    --score-ids FILE [--json]       # argmax next token at every position of a JSON list of ids
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import lowbit as lb
from lowbit import nn


class CachedModel:
    """``reset``, ``forward`` and ``decode`` for a model whose ``run(ids, positions, all_logits)``
    feeds int64 token ids at their positions through its key/value caches (``self.caches``) with
    lowbit calls only: ``decode`` records ``run`` at its first step (``lowbit.nn.record``) and
    replays it from C++ at every later one. Token ids must be in the vocabulary (the rows of
    ``self.embed``) and positions within ``self.context`` (the file's context length)."""

    step = None  # the recorded decode step
    context = None  # most positions, from the file (None: not checked)

    def _check(self, ids):
        """ids as int64, refused unless whole numbers in the vocabulary that fit the context."""
        a = np.asarray(ids)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"token ids: expected a list of integers, got {a.dtype} of shape {a.shape}")
        vocab = self.embed.shape[0]
        if a.size and (a.min() < 0 or a.max() >= vocab):
            raise ValueError(f"token ids: expected 0..{vocab - 1}, got {a.min()}..{a.max()}")
        if self.context is not None and self.position + a.size > self.context:
            raise ValueError(f"{self.position} cached + {a.size} new tokens exceed the model's "
                             f"context of {self.context}")
        return a.astype(np.int64)

    def reset(self):
        """Forgets the context (empties every layer's key/value cache)."""
        for cache in self.caches:
            cache.clear()
        self.position = 0

    def forward(self, ids, all_logits=False):
        """Feeds token ids after the cached context; returns float32 logits of the last position
        (vocab,), or of every new position (len(ids), vocab)."""
        ids = self._check(ids)
        t = len(ids)
        logits = self.run(ids, np.arange(self.position, self.position + t), all_logits)
        self.position += t
        return logits

    def decode(self, token):
        """forward([token]), replayed: its logits (vocab,) are overwritten by the next call."""
        ids, positions = self._check([token]), np.array([self.position])
        if self.step is None:
            self.step = nn.record(self.run, ids, positions)
            logits = self.step.result
        else:
            logits = self.step(ids, positions)
        self.position += 1
        return logits


def generate(model, prompt_ids, max_tokens):
    """Greedy decoding, up to max_tokens, an end token or the model's context. Returns (new ids,
    prompt seconds, decode seconds, decode steps)."""
    model.reset()
    t0 = time.perf_counter()
    out = [int(np.argmax(model.forward(prompt_ids)))]
    t1 = time.perf_counter()
    step = getattr(model, "decode", None) or (lambda token: model.forward([token]))
    context = getattr(model, "context", None)
    while (len(out) < max_tokens and out[-1] not in model.eos and
           (context is None or model.position < context)):
        out.append(int(np.argmax(step(out[-1]))))
    return out, t1 - t0, time.perf_counter() - t1, len(out) - 1


def main(make_model, default_gguf, description, gguf_help, argv=None):
    """The examples' command line: make_model(path) builds the model of a GGUF file,
    default_gguf() finds the packaged one."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--gguf", help=gguf_help)
    p.add_argument("--prompt", default="The three primary colors are")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens to make (>= 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--score-ids", metavar="FILE",
                   help="JSON list of token ids: print the argmax next token at every position")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error(f"--max-tokens: expected at least 1, got {args.max_tokens}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected at least 1, got {args.threads}")
    if args.threads:
        lb.set_num_threads(args.threads)
        try:  # numpy's BLAS on the same number of threads, when controllable
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)
        except ImportError:
            pass
    model = make_model(args.gguf or default_gguf())

    if args.score_ids:
        with open(args.score_ids) as f:
            ids = json.load(f)
        top1 = np.argmax(model.forward(ids, all_logits=True), axis=1).tolist()
        print(json.dumps({"top1": top1}) if args.json else top1)
        return

    prompt = model.chat_prompt(args.prompt) if args.chat else args.prompt
    ids = model.tokenizer.encode(prompt).ids
    if not ids:  # (an empty prompt of a tokenizer that adds no BOS)
        p.error("--prompt: the prompt has no tokens; give some text")
    new, t_prompt, t_decode, steps = generate(model, ids, args.max_tokens)
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
