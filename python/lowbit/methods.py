"""Weight quantization methods better than rounding: "mse", "gptq", "awq" (see lb.quantize).

All of them choose integers and scales in numpy (BLAS for the heavy products) and hand them to
``QuantizedWeight.from_int``, so the result runs on the same kernels as round-to-nearest.

* "mse": per (row, group) the clipping of the range, among 1.0, 0.98, ..., 0.5 of it, with the
  least squared error: of the weights, or given calibration rows X, of the layer's output on them
  (the group's own block of H = X^T X: ``delta H_gg delta^T``).
* "gptq" (Frantar et al. 2022): columns are rounded one at a time and each rounding error is
  spread over the columns not yet rounded, in the proportions the inverse Hessian of the output
  error gives (H = X^T X / S, damped by ``damp`` times its mean diagonal), in blocks of 128 columns
  with lazy updates of the rest. With groups, each group's parameters are chosen when its first
  column comes up, from its columns as updated so far, by the clipping search of "mse" on the
  group's block of H. act_order rounds the inputs of largest H_jj first; the weight then keeps
  that order (``perm``) so that groups stay contiguous for the kernels.
* "awq" (Lin et al. 2023): input channels are scaled by s = mean|x_j|^a, or by
  mean|x_j|^a / mean|w_:j|^(1 - a) (|w| relative to its group's largest), before rounding (a from
  a grid of 20, s normalised; the candidate with the least output error on the calibration rows
  wins), then the clipping is searched as "mse" does; the weight keeps 1 / s as its
  ``input_scale``.
"""
from __future__ import annotations

import sys

import numpy as np

CLIPS = np.linspace(1.0, 0.5, 26, dtype=np.float32)  # fractions of the range "mse" tries
GPTQ_BLOCK = 128
GPTQ_INNER = 16  # divides every group size (multiples of 32)


class Grid:
    """The rounding of lb.quantize, in numpy: parameters per row (and group), bit for bit those of
    the C++ quantizers when clip is 1, and the values and weights they give."""

    def __init__(self, bits, symmetric):
        self.bits, self.symmetric = bits, symmetric
        self.stored = np.float32 if bits == 8 else np.float16

    def params(self, w, clip=1.0):
        """(d, m) over the last axis of w, float32 holding values exact in the stored type (m is
        None unless asymmetric). clip: a fraction of the range (a scalar or per row)."""
        clip = np.asarray(clip, np.float32)
        lo = w.min(-1) + np.float32(0)  # -0 -> +0, as the C++ does
        hi = w.max(-1) + np.float32(0)
        with np.errstate(over="ignore"):  # beyond float16: refused just below
            d, m = self._params(lo, hi, clip)
        if not (np.isfinite(d).all() and (m is None or np.isfinite(m).all())):
            raise ValueError("a scale or minimum is beyond float16 (|w| too large for 4 bits)")
        return d.astype(np.float32), None if m is None else m.astype(np.float32)

    def _params(self, lo, hi, clip):
        m = None
        if self.bits == 8:
            d = np.maximum(-lo, hi) * clip / np.float32(127)
        elif self.symmetric:
            d = (np.where(-lo > hi, lo, hi) * clip / np.float32(-8)).astype(np.float16)
        else:
            d = ((hi - lo) * clip / np.float32(15)).astype(np.float16)
            m = (lo * clip).astype(np.float16)
        return d, m

    def round(self, w, d, m):
        """Integer values of w for parameters d, m (broadcast against w), as float32."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.bits == 8:
                q = np.clip(np.rint(w / d), -127, 127)
                return np.where(d == 0, np.float32(0), q)
            if self.symmetric:
                q = np.clip(np.rint(w / d) + 8, 0, 15)
                return np.where(d == 0, np.float32(8), q)
            q = np.clip(np.rint((w - m) / d), 0, 15)
            return np.where(d == 0, np.float32(0), q)

    def dequant(self, q, d, m):
        """The float32 weights of values q, computed as QuantizedWeight.dequantize does."""
        if self.bits == 8:
            return q * d
        if self.symmetric:
            return d * (q - np.float32(8))
        return q * d + m

    def build(self, q, d, m, group_size, perm=None, input_scale=None):
        """A QuantizedWeight of values q (N, K) and parameters (N, groups)."""
        from .quantize import QuantizedWeight

        mins = None if m is None else m.astype(np.float16)
        return QuantizedWeight.from_int(
            q.astype(np.int8 if self.bits == 8 else np.uint8), d.astype(self.stored),
            bits=self.bits, group_size=group_size, mins=mins, perm=perm, input_scale=input_scale)


def calibration_rows(calibration, k) -> np.ndarray:
    """Calibration activations as given: float, of shape (..., k), at least one row."""
    x = np.asarray(calibration)
    if x.dtype.kind != "f":
        raise TypeError(f"calibration: expected float activations, got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[-1] != k or x.size == 0:
        raise ValueError(f"calibration: expected activations of shape (S, {k}) with S >= 1, got "
                         f"{x.shape}")
    return x


def hessian(calibration, k, chunk=4096):
    """H = X^T X / S (float64, (K, K)) of the calibration rows X (S, K), in chunks of rows, with
    X first scaled by the power of two that brings its largest |x| into [0.5, 1): H up to a
    positive factor, which no method depends on (clipping errors, GPTQ's updates and its damping
    are all relative), and always finite: in float32, rows near 1e19 overflowed H (8-bit GPTQ
    then returned weights with 99% error) and rows near 1e-20 underflowed it to 0. Scaling by a
    power of two is exact, so X and X * 2^e give the same H."""
    x = calibration_rows(calibration, k).reshape(-1, k)
    shift = power_of_two_scale(x, chunk)
    h = np.zeros((k, k), np.float64)
    for lo in range(0, len(x), chunk):
        part = scaled(x[lo:lo + chunk], shift)
        h += part.T @ part
    return h / len(x)


def power_of_two_scale(x, chunk=4096) -> int:
    """The exponent e with max |x| * 2^e in [0.5, 1) (0 for all zeros); NaN or Inf raise."""
    amax = 0.0
    for lo in range(0, len(x), chunk):
        part = float(np.abs(x[lo:lo + chunk]).max())  # NaN if any is
        if not np.isfinite(part):
            raise ValueError("calibration: NaN or Inf in the activations")
        amax = max(amax, part)
    return -int(np.frexp(amax)[1]) if amax else 0


def scaled(x, shift):
    """float32 x * 2^shift (exact barring underflow; float64 input scaled before the cast)."""
    x = np.asarray(x)
    return np.ldexp(x.astype(np.float32 if x.dtype.itemsize <= 4 else x.dtype), shift).astype(np.float32)


def mse(w, grid, group, h=None):
    """Values and parameters with the clipping of least (output) error per row and group."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    hg = None
    if h is not None:  # the diagonal blocks of H, one per group: (G, group, group)
        idx = np.arange(k).reshape(-1, group)
        hg = h[idx[:, :, None], idx[:, None, :]].astype(np.float32)
    best_err = np.full(wg.shape[:2], np.inf)
    best_clip = np.ones(wg.shape[:2], np.float32)
    for c in CLIPS:
        d, m = grid.params(wg, c)
        m_ = None if m is None else m[..., None]
        delta = grid.dequant(grid.round(wg, d[..., None], m_), d[..., None], m_) - wg
        if hg is None:
            err = np.einsum("ngi,ngi->ng", delta, delta)
        else:
            dt = delta.transpose(1, 0, 2)  # (G, N, group)
            err = np.einsum("gni,gni->ng", dt @ hg, dt)
        better = err < best_err
        best_err[better] = err[better]
        best_clip[better] = c
    d, m = grid.params(wg, best_clip)
    m_ = None if m is None else m[..., None]
    q = grid.round(wg, d[..., None], m_).reshape(n, k)
    return q, d, m


def _inverse_upper(r):
    """The inverse of an upper triangular matrix, by blocks: n^3 / 3 multiply-adds in BLAS."""
    n = len(r)
    if n <= 256:
        return np.linalg.inv(r)
    h = n // 2
    a, c = _inverse_upper(r[:h, :h]), _inverse_upper(r[h:, h:])
    out = np.zeros_like(r)
    out[:h, :h], out[h:, h:] = a, c
    out[:h, h:] = -(a @ r[:h, h:]) @ c
    return out


def gptq(w, grid, group, h, damp, act_order=False, progress=False):
    """GPTQ's values and parameters (see the module docstring): (q, d, m, perm)."""
    n, k = w.shape
    h = h.copy()
    diag = np.diagonal(h).copy()
    dead = diag == 0
    # Inputs never seen: their columns are only rounded. The damping is a fraction of the mean
    # diagonal of the inputs seen (the GPTQ reference's filler of 1 counted in that mean: with
    # H scaled to inputs of at most 1, ReLU units that never fire multiplied the damping).
    live = float(np.mean(diag[~dead])) if (~dead).any() else 1.0
    h[dead, dead] = live
    perm = np.argsort(-diag, kind="stable") if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
        w = w[:, perm]
    h[np.diag_indices(k)] += damp * live
    # U, the upper Cholesky factor of H^-1: H = R R^T with R upper (the Cholesky factor of H with
    # its index order reversed), so H^-1 = R^-T R^-1 and U = R^-1.
    try:
        r = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    except np.linalg.LinAlgError:
        raise ValueError("gptq: the damped Hessian is not positive definite; raise damp") from None
    u = _inverse_upper(np.ascontiguousarray(r)).astype(np.float32)

    wt = np.ascontiguousarray(w.T, np.float32)  # (K, N): column i of W is the row wt[i]
    q = np.empty((k, n), np.float32)
    groups = k // group
    d = np.empty((groups, n), np.float32)
    m = np.empty((groups, n), np.float32) if not (grid.bits == 8 or grid.symmetric) else None
    # blocks hold whole groups: a group's parameters then see every update of earlier columns
    block = GPTQ_BLOCK if group >= k else max(group, GPTQ_BLOCK // group * group)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        err = np.empty((i2 - i1, n), np.float32)
        # Within a block, rank-1 updates reach only the next few columns (sub-blocks of
        # GPTQ_INNER); the rest of the block and then the rest of W get theirs as products.
        for j1 in range(i1, i2, GPTQ_INNER):
            j2 = min(j1 + GPTQ_INNER, i2)
            for i in range(j1, j2):
                g = i // group
                if i % group == 0:  # the group's parameters, from its columns as updated so far
                    wg = np.ascontiguousarray(wt[i:i + group].T)
                    if group < k:  # clipped as "mse" would, on the group's block of H
                        _, dg, mg = mse(wg, grid, group, h[i:i + group, i:i + group])
                        d[g], mg = dg[:, 0], None if mg is None else mg[:, 0]
                    else:
                        d[g], mg = grid.params(wg)
                    if m is not None:
                        m[g] = mg
                mg = None if m is None else m[g]
                qi = grid.round(wt[i], d[g], mg)
                e = (wt[i] - grid.dequant(qi, d[g], mg)) / u[i, i]
                wt[i + 1:j2] -= u[i, i + 1:j2, None] * e
                err[i - i1] = e
                q[i] = qi
            wt[j2:i2] -= u[j1:j2, j2:i2].T @ err[j1 - i1:j2 - i1]
        wt[i2:] -= u[i1:i2, i2:].T @ err
        if progress:
            print(f"\rgptq: {i2}/{k} columns", end="" if i2 < k else "\n", file=sys.stderr, flush=True)
    return q.T, d.T, None if m is None else m.T, perm


def awq(w, grid, group, x, h):
    """AWQ's values, parameters and input scale (see the module docstring): (q, d, m, 1 / s)."""
    n, k = w.shape
    x = np.asarray(x).reshape(-1, k)
    x = x[np.linspace(0, len(x) - 1, min(len(x), 2048)).astype(np.intp)]
    x = scaled(x, power_of_two_scale(x))  # errors compared, scales normalised: scale-free
    x_mean = np.abs(x).mean(0).astype(np.float64)
    x_mean = np.maximum(x_mean, x_mean.max() * 1e-4 + 1e-30)
    wa = np.abs(w).reshape(n, k // group, group)
    w_mean = (wa / np.maximum(wa.max(-1, keepdims=True), 1e-30)).reshape(n, k).mean(0)
    w_mean = np.maximum(w_mean.astype(np.float64), 1e-6)
    y = x @ w.T
    best, best_err = None, np.inf
    for a in np.arange(20) / 20:
        for s in (x_mean ** a, x_mean ** a / w_mean ** (1 - a)):
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
            ws = (w * s).reshape(n, k // group, group)
            d, m = grid.params(ws)
            m_ = None if m is None else m[..., None]
            wq = grid.dequant(grid.round(ws, d[..., None], m_), d[..., None], m_).reshape(n, k) / s
            err = float(((x @ wq.T - y) ** 2).sum())
            if err < best_err:
                best, best_err = s, err
    if best is None:  # every error NaN: the weights or inputs are beyond float32 products
        raise ValueError("awq: the output error is not finite for any scaling (weights or "
                         "calibration rows too large for float32 products)")
    s = best
    q, d, m = mse(w * s, grid, group, h / np.outer(s, s))
    return q, d, m, (1 / s).astype(np.float32)
