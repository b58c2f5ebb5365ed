"""Accuracy metrics for quantized outputs, and a before / after report over a dataset.

    import lowbit as lb
    lb.metrics.compare(y_float, y_int4)          # {"sqnr_db": ..., "cosine": ..., ...}
    r = lb.metrics.report(logits_float, logits_int4, targets=labels)
    print(r)                                     # overall and per class: is the loss even?

Every function takes the reference (float) output first and the quantized one second, as arrays of
the same shape; errors are computed in float64.
"""
from __future__ import annotations

import math

import numpy as np


def _real(x, what):
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{what}: expected real numbers (int or float), got dtype {x.dtype}")
    return x.astype(np.float64)


def _pair(reference, actual):
    a = _real(reference, "reference")
    b = _real(actual, "actual")
    if a.shape != b.shape:
        raise ValueError(f"reference and actual differ in shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("reference and actual are empty")
    return a, b


def sqnr_db(reference, actual) -> float:
    """Signal to quantization noise ratio, 10 log10(sum ref^2 / sum (ref - actual)^2), in dB
    (inf when they are equal)."""
    a, b = _pair(reference, actual)
    noise = float(((a - b) ** 2).sum())
    signal = float((a ** 2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal else -math.inf


def cosine(reference, actual) -> float:
    """Cosine similarity of the two arrays taken as flat vectors (1.0 when both are zero)."""
    a, b = _pair(reference, actual)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float((a * b).sum() / (na * nb))


def row_cosine(reference, actual) -> np.ndarray:
    """Cosine similarity per row (over the last axis): shape reference.shape[:-1]."""
    a, b = _pair(reference, actual)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = dot / (na * nb)
    return np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, c))


def relative_error(reference, actual) -> float:
    """||reference - actual|| / ||reference|| (Frobenius norms)."""
    a, b = _pair(reference, actual)
    den = np.linalg.norm(a)
    num = np.linalg.norm(a - b)
    return float(num / den) if den else (0.0 if num == 0 else math.inf)


def max_abs_error(reference, actual) -> float:
    """The largest |reference - actual|."""
    a, b = _pair(reference, actual)
    return float(np.abs(a - b).max())


def compare(reference, actual) -> dict:
    """All of the above in one dict: sqnr_db, cosine, mean_row_cosine (for 2-D and up),
    relative_error, max_abs_error."""
    out = {"sqnr_db": sqnr_db(reference, actual), "cosine": cosine(reference, actual)}
    if np.ndim(reference) >= 2:
        out["mean_row_cosine"] = float(row_cosine(reference, actual).mean())
    out["relative_error"] = relative_error(reference, actual)
    out["max_abs_error"] = max_abs_error(reference, actual)
    return out


class Report:
    """A before / after comparison: ``overall`` and ``slices`` ({slice: row}) dicts of n, sqnr_db,
    mean_row_cosine, relative_error, max_abs_error and, given targets, accuracy_before,
    accuracy_after, drop (points) and agreement (same argmax, %). ``str(report)`` is a table."""

    def __init__(self, overall, slices):
        self.overall, self.slices = overall, slices

    def worst(self, key="sqnr_db"):
        """The slice with the lowest `key` (the highest for drop, relative_error, max_abs_error)."""
        if not self.slices:
            raise ValueError("the report has no slices")
        known = next(iter(self.slices.values()))
        if key not in known:
            raise ValueError(f"worst: no {key!r} in the report's slices (they hold "
                             f"{sorted(known)}{'; drop needs targets' if key == 'drop' else ''})")
        high = key in ("drop", "relative_error", "max_abs_error")
        pick = max if high else min
        return pick(self.slices, key=lambda s: self.slices[s][key])

    def to_dict(self):
        return {"overall": self.overall, "slices": {str(k): v for k, v in self.slices.items()}}

    def __str__(self):
        keys = [k for k in ("n", "sqnr_db", "mean_row_cosine", "relative_error", "max_abs_error",
                            "accuracy_before", "accuracy_after", "drop", "agreement")
                if k in self.overall]
        heads = {"n": "n", "sqnr_db": "SQNR dB", "mean_row_cosine": "cosine", "relative_error": "rel.err",
                 "max_abs_error": "max abs", "accuracy_before": "acc.before", "accuracy_after": "acc.after",
                 "drop": "drop", "agreement": "agree %"}
        rows = [("overall", self.overall)] + [(str(k), v) for k, v in self.slices.items()]
        width = max(len(r[0]) for r in rows + [("slice", None)])
        lines = [f"{'slice':<{width}} " + " ".join(f"{heads[k]:>10}" for k in keys)]
        for name, row in rows:
            cells = []
            for k in keys:
                v = row[k]
                cells.append(f"{v:>10d}" if k == "n" else f"{v:>10.4f}" if k in (
                    "mean_row_cosine", "relative_error") else f"{v:>10.2f}" if math.isfinite(v)
                    else f"{v:>10}")
            lines.append(f"{name:<{width}} " + " ".join(cells))
        return "\n".join(lines)

    def __repr__(self):
        return f"Report({len(self.slices)} slices, overall={self.overall})"


def _row(before, after, targets):
    row = {"n": int(len(before))}
    c = compare(before, after)
    row["sqnr_db"] = c["sqnr_db"]
    row["mean_row_cosine"] = float(row_cosine(before.reshape(len(before), -1),
                                              after.reshape(len(after), -1)).mean())
    row["relative_error"], row["max_abs_error"] = c["relative_error"], c["max_abs_error"]
    if targets is not None:
        pb, pa = before.argmax(-1), after.argmax(-1)
        row["accuracy_before"] = 100.0 * float((pb == targets).mean())
        row["accuracy_after"] = 100.0 * float((pa == targets).mean())
        row["drop"] = row["accuracy_before"] - row["accuracy_after"]
        row["agreement"] = 100.0 * float((pb == pa).mean())
    return row


def report(before, after, *, targets=None, slices=None) -> Report:
    """Compares the float model's outputs `before` with the quantized model's `after` (arrays
    (n, ...) over the same n examples), overall and per slice. targets: class labels (n,) of
    classification outputs (adds accuracies, their drop and argmax agreement; slices default to
    the classes). slices: a label per example (n,), e.g. a class, a language, a length bucket."""
    before, after = _pair(before, after)
    if before.ndim < 1:
        raise ValueError("before / after: expected outputs of shape (n, ...)")
    n = len(before)
    if targets is not None:
        targets = np.asarray(targets)
        if targets.shape != (n,) or before.ndim != 2:
            raise ValueError(f"targets: expected shape ({n},) with outputs (n, classes), got "
                             f"{targets.shape} with outputs {before.shape}")
        if slices is None:
            slices = targets
    overall = _row(before, after, targets)
    by_slice = {}
    if slices is not None:
        slices = np.asarray(slices)
        if slices.shape != (n,):
            raise ValueError(f"slices: expected one label per example, shape ({n},), got {slices.shape}")
        for s in np.unique(slices):
            sel = slices == s
            key = s.item() if hasattr(s, "item") else s
            by_slice[key] = _row(before[sel], after[sel], None if targets is None else targets[sel])
    return Report(overall, by_slice)


def evaluate(model_before, model_after, inputs, *, targets=None, slices=None, batch_size=256) -> Report:
    """Runs both models (callables, batch of inputs -> outputs) over `inputs` in batches and
    returns their :func:`report`."""
    inputs = np.asarray(inputs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if inputs.ndim == 0 or len(inputs) == 0:
        raise ValueError(f"inputs: expected at least one input, got shape {inputs.shape}")
    outs = ([], [])
    for lo in range(0, len(inputs), batch_size):
        batch = inputs[lo:lo + batch_size]
        outs[0].append(np.asarray(model_before(batch)))
        outs[1].append(np.asarray(model_after(batch)))
    return report(np.concatenate(outs[0]), np.concatenate(outs[1]), targets=targets, slices=slices)
