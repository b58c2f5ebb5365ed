"""Calibration of activation ranges for static int8 activations.

An observer is fed the activations a layer sees, batch by batch (``obs.observe(x)``), then gives
the static quantization they call for (``obs.params()``, a :class:`StaticActivations` that
``lb.Linear(..., activations=...)`` takes):

    obs = lb.PercentileObserver(99.99)
    for batch in calibration_batches:
        obs.observe(layer_inputs(batch))
    layer = lb.Linear(w, b, activations=obs.params())

Observers (per tensor; symmetric by default, ``symmetric=False`` adds a zero point):

* :class:`MinMaxObserver`: the extremes seen.
* :class:`MovingAverageMinMaxObserver`: extremes averaged over batches (``momentum``).
* :class:`PercentileObserver`: the given percentile of |x| (or of x at both ends).
* :class:`MSEObserver`: the clipping range of least expected squared quantization error.
* :class:`EntropyObserver`: TensorRT's: the threshold whose 128-level quantized histogram of |x|
  has the least KL divergence from the clipped histogram (asymmetric: one per side of zero).

The last three keep a histogram of 2048 bins over the range seen so far; when a batch goes
beyond it the range grows and the counts are redistributed (evenly within each old bin).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StaticActivations:
    """Static int8 activation quantization: ``q = clamp(round(x / scale) + zero_point, -128, 127)``,
    so ``x ~ scale * (q - zero_point)``. zero_point 0 is symmetric."""

    scale: float
    zero_point: int = 0

    def __post_init__(self):
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, (int, float, np.floating, np.integer)) \
                or not (math.isfinite(s) and s > 0):
            raise ValueError(f"scale: expected a positive finite number, got {s!r}")
        with np.errstate(over="ignore", under="ignore"):
            s32 = float(np.float32(s))  # the kernels' float32 scale
        if not (math.isfinite(s32) and s32 > 0):
            raise ValueError(f"scale: {s!r} is not a positive finite float32")
        z = self.zero_point
        if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not -128 <= z <= 127:
            raise ValueError(f"zero_point: expected an integer in [-128, 127], got {z!r}")
        object.__setattr__(self, "scale", s32)
        object.__setattr__(self, "zero_point", int(z))

    @classmethod
    def from_range(cls, lo, hi, symmetric=True):
        """The scale (and zero point) covering [lo, hi]: symmetric max(|lo|, |hi|) / 127; else the
        range widened to hold 0 (so that 0 is exact) over 255 steps."""
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"range: expected finite lo <= hi, got [{lo}, {hi}]")
        if symmetric:
            amax = max(-lo, hi)
            return cls(amax / 127 if amax > 0 else 1.0)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi == lo:
            return cls(1.0)
        scale = (hi - lo) / 255
        return cls(scale, int(np.clip(round(-128 - lo / scale), -128, 127)))


class Observer:
    """Base: ``observe(x)`` batch by batch, then ``range()`` (the clipping range) and ``params()``."""

    def __init__(self, symmetric=True):
        self.symmetric = bool(symmetric)
        self.lo = self.hi = None  # extremes seen
        self.count = 0

    def observe(self, x):
        """Records a batch of activations (any shape, float); returns self."""
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"x: expected float activations, got dtype {x.dtype}")
        if x.size == 0:
            return self
        x = x.astype(np.float32, copy=False).ravel()
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("x: NaN or Inf in the activations")
        self._update(x, lo, hi)
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        self.count += x.size
        return self

    def _update(self, x, lo, hi):
        pass

    def range(self):
        """(lo, hi): the range the scale covers."""
        self._check()
        return self.lo, self.hi

    def params(self) -> StaticActivations:
        return StaticActivations.from_range(*self.range(), symmetric=self.symmetric)

    def _check(self):
        if not self.count:
            raise ValueError(f"{type(self).__name__}: no activations observed yet")

    def __repr__(self):
        r = "empty" if not self.count else "range=[%.4g, %.4g]" % self.range()
        return f"{type(self).__name__}(symmetric={self.symmetric}, {self.count} values, {r})"


class MinMaxObserver(Observer):
    """The smallest and largest values seen."""


class MovingAverageMinMaxObserver(Observer):
    """Per-batch extremes averaged: ``r += momentum * (batch - r)`` (the first batch sets r)."""

    def __init__(self, momentum=0.01, symmetric=True):
        super().__init__(symmetric)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.momentum = momentum
        self._avg = None

    def _update(self, x, lo, hi):
        if self._avg is None:
            self._avg = (lo, hi)
        else:
            a, b = self._avg
            self._avg = (a + self.momentum * (lo - a), b + self.momentum * (hi - b))

    def range(self):
        """(lo, hi): the range the scale covers."""
        self._check()
        return self._avg


class HistogramObserver(Observer):
    """Keeps a histogram of |x| (symmetric) or x over the range seen, in ``bins`` bins."""

    def __init__(self, symmetric=True, bins=2048):
        super().__init__(symmetric)
        self.bins = int(bins)
        self.hist = np.zeros(self.bins, np.float64)
        self.edges = None  # (left, right) of the histogram

    def _update(self, x, lo, hi):
        if self.symmetric:
            x = np.abs(x)
            lo, hi = 0.0, max(-lo, hi)
        if self.edges is None:
            # a constant first batch: bins of some width
            self.edges = (lo, hi if hi > lo else lo + max(abs(lo) * 1e-3, 1e-30))
        elif lo < self.edges[0] or hi > self.edges[1]:
            self._widen(min(lo, self.edges[0]), max(hi, self.edges[1]))
        # float64 edges: with float32 ones (numpy's choice for float32 x) the width of a range
        # like [-3e38, 3e38] overflows and np.histogram fails with an IndexError
        left, right = self.edges
        self.hist += np.histogram(x, self.bins, (np.float64(left), np.float64(right)))[0]

    def _widen(self, lo, hi):
        """Re-bins the counts over [lo, hi], each old bin's count spread evenly over its width."""
        old = np.linspace(*self.edges, self.bins + 1)
        new = np.linspace(lo, hi, self.bins + 1)
        cum = np.concatenate([[0.0], np.cumsum(self.hist)])
        self.hist = np.diff(np.interp(new, old, cum))
        self.edges = (lo, hi)

    def range(self):
        """(lo, hi): the range the scale covers (the extremes seen, where they are one value: a
        histogram of one value, all zeros say, has no shape to clip)."""
        self._check()
        if self.lo == self.hi:
            return self.lo, self.hi
        return self._clip_range()

    def _clip_range(self):  # (the subclasses' choice of range; here the extremes)
        return self.lo, self.hi

    def _centers(self):
        left, right = self.edges
        return left + (np.arange(self.bins) + 0.5) * (right - left) / self.bins

    def _cdf_at(self, frac):
        """The value below which `frac` of the histogram lies (linear within a bin)."""
        cum = np.concatenate([[0.0], np.cumsum(self.hist)])
        return float(np.interp(frac * cum[-1], cum, np.linspace(*self.edges, self.bins + 1)))


class PercentileObserver(HistogramObserver):
    """Clips at the ``percentile`` of |x| (symmetric), or at the (100 - p)th and pth percentiles of x."""

    def __init__(self, percentile=99.99, symmetric=True, bins=2048):
        super().__init__(symmetric, bins)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = percentile

    def _clip_range(self):
        p = self.percentile / 100
        if self.symmetric:
            t = self._cdf_at(p)
            return -t, t
        return self._cdf_at(1 - p), self._cdf_at(p)


class MSEObserver(HistogramObserver):
    """The clipping range with the least expected squared error: values inside it round with
    error step^2 / 12, values beyond it are clipped to it. Symmetric: thresholds t over the
    histogram of |x|; asymmetric: the observed range shrunk by factors 1.0 down to 0.05."""

    def _clip_range(self):
        c = self._centers()
        h = self.hist
        left, right = self.edges
        f = np.linspace(1.0, 0.05, 400)[:, None]
        if self.symmetric:
            lo, hi = -right * f, right * f  # thresholds on |x|: c >= 0
            step = (hi - lo) / 254  # 127 steps each side of zero
        else:
            lo, hi = np.minimum(left * f, 0), np.maximum(right * f, 0)
            step = (hi - lo) / 255
        below = np.maximum(lo - c, 0)
        above = np.maximum(c - hi, 0)
        err = (h * (below ** 2 + above ** 2)).sum(1) + step[:, 0] ** 2 / 12 * \
            (h * ((c >= lo) & (c <= hi))).sum(1)
        i = int(np.argmin(err))
        return float(lo[i, 0]), float(hi[i, 0])


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration: for each threshold (bin i from 128 up) the histogram of |x|
    clipped at it (the tail added to its last bin) is compared, by KL divergence, with its
    quantization to 128 levels (each level's count spread over the level's non-empty bins); the
    threshold of least divergence wins. Asymmetric: the histogram of x is split at zero and each
    side's threshold is searched so, on that side's histogram."""

    LEVELS = 128

    def __init__(self, symmetric=True, bins=2048):
        super().__init__(symmetric, bins)

    def _clip_range(self):
        left, right = self.edges
        width = (right - left) / self.bins
        if self.symmetric:
            t = self._threshold(self.hist) * width
            return -t, t
        zero = min(max(int(round(-left / width)), 0), self.bins)  # the bin edge nearest to 0
        hi = left + (zero + self._threshold(self.hist[zero:])) * width
        lo = left + (zero - self._threshold(self.hist[:zero][::-1])) * width
        return min(lo, 0.0), max(hi, 0.0)

    def _threshold(self, h):
        """The number of bins (from the start of h) whose clipped histogram diverges least."""
        n = self.LEVELS
        nonzero = np.nonzero(h)[0]
        last = int(nonzero[-1]) + 1 if len(nonzero) else 0
        if last <= n:
            return last  # fewer bins than levels: nothing to clip
        best_i, best_kl = last, np.inf
        for i in range(n, last + 1):
            src = h[:i]
            if np.count_nonzero(src) < 2:  # one spike clipped to one spike: a divergence of 0
                continue                   # that says nothing (data away from zero)
            p = src.copy()
            p[-1] += h[i:].sum()
            # level j covers bins [j * i / n, (j + 1) * i / n)
            level = (np.arange(i) * n) // i
            total = np.bincount(level, src, n)
            used = np.bincount(level, src > 0, n)
            q = np.where(src > 0, total[level] / np.maximum(used[level], 1), 0.0)
            if not q.sum():  # every count lies beyond i
                continue
            p, q = p / p.sum(), q / q.sum() + 1e-12  # the clipped tail's bin may have no levels of its own
            m = p > 0
            kl = float((p[m] * np.log(p[m] / q[m])).sum())
            if kl < best_kl:
                best_i, best_kl = i, kl
        return best_i


class _Recorder:
    """A layer that records a float32 copy of the (rows, in_features) inputs it is called with."""

    def __init__(self, layer, rows):
        self._layer, self._rows = layer, rows

    def __call__(self, x, *args, **kwargs):
        a = np.asarray(x)
        self._rows.append(a.reshape(-1, a.shape[-1]).astype(np.float32))  # a copy
        return self._layer(x, *args, **kwargs)

    def __getattr__(self, name):  # the layer's own attributes (weight, epilogue, ...)
        return getattr(self._layer, name)


def capture_inputs(layers: dict, run) -> dict:
    """{key: float32 (rows, in_features)}: the inputs each layer is called with while ``run()``
    runs. layers: {key: (owner, attribute name)}, the layer being ``getattr(owner, name)`` (an
    ``lb.Linear`` or any callable taking the input first); each is wrapped by a recorder for the
    duration and put back after, even on error. Layers never called are left out. The inputs of
    a layer are calibration for it (``lb.quantize(..., calibration=...)``, an observer's
    ``observe``); for PyTorch models, ``lowbit.torch.capture_inputs`` does the same with hooks."""
    rows = {key: [] for key in layers}
    saved = {key: getattr(owner, name) for key, (owner, name) in layers.items()}
    try:
        for key, (owner, name) in layers.items():
            setattr(owner, name, _Recorder(saved[key], rows[key]))
        run()
    finally:
        for key, (owner, name) in layers.items():
            setattr(owner, name, saved[key])
    return {key: np.concatenate(r) for key, r in rows.items() if r}
