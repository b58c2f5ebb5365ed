"""Post-training quantization and quantization-aware training of a small numpy MLP.

The data are scikit-learn's handwritten digits (1797 8x8 images, bundled with scikit-learn: no
download), split 70 / 30 with a fixed seed. A 64-32-10 ReLU MLP is trained in float32 with Adam,
then every layer is replaced by an lb.Linear:

* INT8 post-training: 8-bit weights per output row, dynamic int8 activations;
* INT4 post-training: 4-bit symmetric weights, one scale per output row, dynamic int8
  activations (per 32 inputs);
* INT4 after QAT: the float model fine-tuned for a few epochs with its forward pass running the
  INT4 weights and int8 activations it will be deployed with (lb.fake_quantize) and the
  straight-through gradient (lb.fake_quantize_grad), then converted the same way.

    python examples/digits_qat.py [--json] [--seed S]

prints the test accuracy of each, and lb.metrics' per-class report of the INT4 models.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

import lowbit as lb

INT4 = {"bits": 4, "group_size": None, "symmetric": True}
SIZES = [64, 32, 10]
ACT_BLOCK = 32  # 4-bit layers quantize their inputs to int8 per 32 (every width here is a multiple)


def load_data(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)


class MLP:
    """ReLU MLP in numpy: params [(W (out, in), b)], trained with Adam on cross-entropy."""

    def __init__(self, sizes, seed=0):
        rng = np.random.default_rng(seed)
        self.params = [(rng.standard_normal((o, i)).astype(np.float32) * np.float32(np.sqrt(2 / i)),
                        np.zeros(o, np.float32)) for i, o in zip(sizes[:-1], sizes[1:])]
        self._adam = [[np.zeros_like(a) for a in p] * 2 for p in self.params]
        self._t = 0

    def forward(self, x, qat=False):
        """Logits; with qat, each layer runs as an INT4 lb.Linear would: its input rounded to
        int8 per 32-block and its weights to INT4. Returns (logits, cache for backward)."""
        cache = []
        h = x
        for i, (w, b) in enumerate(self.params):
            hq = lb.fake_quantize(h, bits=8, group_size=ACT_BLOCK) if qat else h
            wq = lb.fake_quantize(w, **INT4) if qat else w
            z = hq @ wq.T + b
            cache.append((h, hq, w, wq, z))
            h = np.maximum(z, 0) if i + 1 < len(self.params) else z
        return h, cache

    def step(self, x, y, lr, qat=False):
        logits, cache = self.forward(x, qat)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = p
        g[np.arange(len(y)), y] -= 1
        g /= len(y)
        grads = []
        for i in reversed(range(len(self.params))):
            h, hq, w, wq, z = cache[i]
            if i + 1 < len(self.params):
                g = g * (z > 0)
            gw, gb = g.T @ hq, g.sum(0)
            gh = g @ wq
            if qat:  # straight through the roundings
                gw = lb.fake_quantize_grad(w, gw, **INT4)
                gh = lb.fake_quantize_grad(h, gh, bits=8, group_size=ACT_BLOCK)
            grads.append((gw, gb))
            g = gh
        self._adam_update(list(reversed(grads)), lr)

    def _adam_update(self, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
        self._t += 1
        new = []
        for (w, b), (gw, gb), st in zip(self.params, grads, self._adam):
            out = []
            for j, (a, ga) in enumerate(((w, gw), (b, gb))):
                st[j] = b1 * st[j] + (1 - b1) * ga
                st[j + 2] = b2 * st[j + 2] + (1 - b2) * ga * ga
                mhat = st[j] / (1 - b1 ** self._t)
                vhat = st[j + 2] / (1 - b2 ** self._t)
                out.append((a - lr * mhat / (np.sqrt(vhat) + eps)).astype(np.float32))
            new.append(tuple(out))
        self.params = new

    def fit(self, x, y, epochs, lr, qat=False, seed=0, batch=32):
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for lo in range(0, len(x), batch):
                idx = order[lo:lo + batch]
                self.step(x[idx], y[idx], lr, qat)

    def logits(self, x):
        return self.forward(x)[0]

    def lowbit(self, bits=8, **fmt):
        """The network on lb.Linear layers (dynamic int8 activations): a callable x -> logits."""
        layers = [lb.Linear(w, b, bits=bits, **fmt) for w, b in self.params]

        def run(x):
            h = x
            for i, layer in enumerate(layers):
                h = layer(h)
                if i + 1 < len(layers):
                    np.maximum(h, 0, out=h)
            return h
        return run


def accuracy(logits, y):
    return 100.0 * float((np.asarray(logits).argmax(1) == y).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    x_train, x_test, y_train, y_test = load_data(args.seed)

    model = MLP(SIZES, seed=args.seed)
    model.fit(x_train, y_train, epochs=100, lr=3e-3, seed=args.seed)
    float_logits = model.logits(x_test)
    results = {"float32": accuracy(float_logits, y_test),
               "int8_ptq": accuracy(model.lowbit(bits=8)(x_test), y_test)}
    int4_ptq = model.lowbit(**INT4)(x_test)
    results["int4_ptq"] = accuracy(int4_ptq, y_test)
    model.fit(x_train, y_train, epochs=15, lr=2e-4, qat=True, seed=args.seed + 1)
    int4_qat = model.lowbit(**INT4)(x_test)
    results["int4_qat"] = accuracy(int4_qat, y_test)

    if args.json:
        print(json.dumps({"test_examples": len(y_test), "accuracy": results}))
        return
    print(f"digits: {len(y_train)} training and {len(y_test)} test images, MLP "
          f"{'-'.join(map(str, SIZES))}")
    for name, acc in results.items():
        print(f"  {name:<9} test accuracy {acc:6.2f}%   ({acc - results['float32']:+.2f} points)")
    for label, logits in (("INT4 post-training", int4_ptq), ("INT4 after QAT", int4_qat)):
        r = lb.metrics.report(float_logits, logits, targets=y_test)
        worst = r.worst("drop")
        print(f"\n{label} vs float32, per class (worst: digit {worst}, "
              f"{r.slices[worst]['drop']:+.2f} points):")
        print(r)


if __name__ == "__main__":
    main()
