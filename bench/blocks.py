"""A transformer layer's halves as plain calls against lowbit.nn's block ops, which keep the
intermediate activations in cache: ``nn.mlp`` (feed-forward) and ``nn.attention_block``
(self-attention with its projections). Random weights in the shapes of all-MiniLM-L6-v2 at a
batch of 32 x 128 tokens (INT8, GELU; attention in float32 and int8) and of SmolLM2-135M's
feed-forward on a 256-token prompt (INT8, SwiGLU).
Each pair is checked equal bit for bit, then timed interleaved (median ms of --rounds calls).

    python bench/blocks.py [--threads 2] [--rounds 15] [--json]
"""
import argparse
import json
import time

import numpy as np

import lowbit as lb
from lowbit import nn


def cases(rng):
    w = lambda n, k: rng.standard_normal((n, k)).astype(np.float32) * 0.05  # noqa: E731
    b = lambda n: rng.standard_normal(n).astype(np.float32)  # noqa: E731
    out = {}
    # all-MiniLM-L6-v2: hidden 384, intermediate 1536, 12 heads; 32 sequences of 128 tokens
    bs, seq, hid, inter, heads = 32, 128, 384, 1536, 12
    x = rng.standard_normal((bs * seq, hid)).astype(np.float32)
    up, down = lb.Linear(w(inter, hid), b(inter), epilogue="gelu"), lb.Linear(w(hid, inter), b(hid))
    h, y = np.empty((bs * seq, inter), np.float32), np.empty((bs * seq, hid), np.float32)

    def ffn_plain():
        up(x, out=h)
        return down(h, out=y)

    out["MiniLM feed-forward (INT8, GELU), 4096 rows"] = (
        ffn_plain, lambda: nn.mlp(x, up, down, out=y))
    qkv, proj = lb.Linear(w(3 * hid, hid), b(3 * hid)), lb.Linear(w(hid, hid), b(hid))
    p, ctx = np.empty((bs * seq, 3 * hid), np.float32), np.empty((bs * seq, hid), np.float32)
    lengths = np.full(bs, seq)
    for prec in ("float32", "int8"):
        def attn_plain(prec=prec):
            q = qkv(x, out=p).reshape(bs, seq, 3, heads, -1)
            nn.attention(q[:, :, 0], q[:, :, 1], q[:, :, 2], lengths=lengths, scale=1.0,
                         precision=prec, out=ctx.reshape(bs, seq, heads, -1))
            return proj(ctx, out=y)

        def attn_block(prec=prec):
            return nn.attention_block(x.reshape(bs, seq, hid), qkv, proj, heads, lengths=lengths,
                                      scale=1.0, precision=prec, out=y.reshape(bs, seq, hid))

        out[f"MiniLM self-attention ({prec} attention), 32 x 128"] = (attn_plain, attn_block)
    # SmolLM2-135M: hidden 576, feed-forward 1536, a 256-token prompt
    rows, width, ffn = 256, 576, 1536
    x2 = rng.standard_normal((rows, width)).astype(np.float32)
    gate_up = lb.Linear(w(2 * ffn, width))
    down2 = lb.Linear(w(width, ffn))

    def swiglu_plain():
        gu = gate_up(x2)
        return down2(nn.swiglu(gu[:, :ffn], gu[:, ffn:]))

    out["SmolLM2 feed-forward (INT8, SwiGLU), 256 rows"] = (
        swiglu_plain, lambda: nn.mlp(x2, gate_up, down2, activation="swiglu"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    lb.set_num_threads(args.threads)
    results = {}
    for name, (plain, block) in cases(np.random.default_rng(0)).items():
        first = np.array(plain()).ravel()  # (a copy: both may write the same buffer)
        assert np.array_equal(first, np.array(block()).ravel()), name  # bit for bit
        times = {"plain": [], "block": []}
        for i in range(args.rounds):
            for kind, fn in (("plain", plain), ("block", block))[:: 1 if i % 2 else -1]:
                t = time.perf_counter()
                fn()
                times[kind].append(1e3 * (time.perf_counter() - t))
        results[name] = {k: float(np.median(v)) for k, v in times.items()}
    info = lb.cpu_info()
    if args.json:
        print(json.dumps({"threads": args.threads, "isa": info["isa"], "cases": results}, indent=2))
        return
    print(f"{args.threads} threads, lowbit kernels {info['isa']}; median ms of {args.rounds} "
          f"interleaved calls (results equal bit for bit)\n")
    print("| case | plain calls | block op | speed-up |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['plain']:.2f} | {r['block']:.2f} | {r['plain'] / r['block']:.2f}x |")


if __name__ == "__main__":
    main()
