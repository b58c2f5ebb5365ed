"""all-MiniLM-L6-v2 through transformers, INT4 g32 through lowbit.torch.quantize_model: round to
nearest against GPTQ run layer by layer on each layer's own captured inputs (issue #14).

    python bench/torch_calibrated.py [--threads 2]

Calibration: the bundled sentences but every 4th (batches of 32, the model run on them by the
callable passed as ``calibration``); held out: every 4th sentence. Prints the mean and minimum
cosine of the held-out embeddings (sentence-transformers' pooling) to the float32 model's.
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lowbit.torch as lbt  # noqa: E402
from torch_minilm import SENTENCES, embed, model_dir  # noqa: E402

SETTINGS = {
    "rtn, asymmetric": dict(symmetric=False),
    "gptq, asymmetric": dict(method="gptq", symmetric=False),
    "gptq, asymmetric, act_order": dict(method="gptq", symmetric=False, act_order=True),
    "gptq, symmetric, act_order": dict(method="gptq", act_order=True),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir())
    float_model = AutoModel.from_pretrained(model_dir()).eval()
    sentences = [s for s in SENTENCES.read_text().splitlines() if s.strip()]
    cal_s = [s for i, s in enumerate(sentences) if i % 4]
    batches = [dict(tok(cal_s[i:i + 32], return_tensors="pt", padding=True))
               for i in range(0, len(cal_s), 32)]
    held = tok(sentences[::4], return_tensors="pt", padding=True)
    with torch.inference_mode():
        ref = embed(float_model, held)
    print(f"INT4 g32, {len(cal_s)} calibration sentences, {len(sentences[::4])} held out")
    for name, kw in SETTINGS.items():
        model = copy.deepcopy(float_model)
        calibration = (lambda m: [m(**b) for b in batches]) if "method" in kw else None
        lbt.quantize_model(model, bits=4, group_size=32, calibration=calibration, **kw)
        with torch.inference_mode():
            cos = (embed(model, held) * ref).sum(-1)
        print(f"{name:30s} cosine mean {float(cos.mean()):.4f}  min {float(cos.min()):.4f}")


if __name__ == "__main__":
    main()
