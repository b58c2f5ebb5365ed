"""Weight quantization: float (N, K) arrays to packed low-bit weights the kernels read directly."""
from __future__ import annotations

import numbers
import sys

import numpy as np

from . import _core

METHODS = ("rtn", "mse", "gptq", "awq")


class QuantizedWeight:
    """A quantized weight matrix of shape (N out_features, K in_features).

    Holds only what the kernels read, prepacked in 16-column panels:

    * bits=8: int8 values (symmetric, ``w = scale * q``), float32 scales and the per-column sums
      the u8 x s8 kernels need;
    * bits=4: 4-bit values q in 0..15 (two per byte) with float16 scales ``d`` and either float16
      minima ``m`` (``w = d * q + m``, GGUF Q4_1 and ``quantize(symmetric=False)``), or integer zero
      points ``z`` (``w = d * (q - z)``, GPTQ / AWQ), or neither: symmetric, ``w = d * (q - 8)``.

    One scale (and minimum or zero point) per output row, or per row and group of ``group_size``
    inputs. ``perm`` (act-order GPTQ) is the input order the packed columns are in: column j holds
    input ``perm[j]``, so that each group's inputs are contiguous; layers gather their inputs in
    that order. ``input_scale`` (AWQ) is a float32 factor per input that layers multiply their
    inputs by before the kernel: the weights stored are ``W / input_scale``, quantized.
    ``nbytes`` is what it really holds; no float copy is kept. Every array it holds (and so every
    array its properties return) is read-only: a weight cannot change under the layers using it.

    ``format`` names the layout: "int8", "int4", or a GGUF block format read by
    :func:`lowbit.load_gguf` ("Q4_K", "Q6_K", "IQ4_XS", ... : ``lowbit.formats.BLOCK_FORMATS``),
    held in that format's own kernel layout at about its size in the file; for those, ``bits`` is
    the format's bits per value, ``group_size`` its sub-block (the inputs sharing one scale) and
    ``symmetric`` whether it has no minima.
    """

    __slots__ = ("shape", "bits", "group_size", "symmetric", "format", "_packed", "_scales", "_comp",
                 "_mins", "_zeros", "_perm", "_in_scale", "_parts", "_kernel")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Not a tensor to torch: its functions handed one (the fused fast paths of torch's
        nn.TransformerEncoderLayer / TransformerEncoder gather their Linears' ``.weight``, a
        LowbitLinear's being this) find it implements none of them and take their general path,
        which calls the layers; without it they read ``.device`` off it and failed."""
        return NotImplemented

    def __init__(self, shape, bits, group_size, symmetric, packed, scales, comp=None, mins=None,
                 zeros=None, perm=None, in_scale=None):
        self.shape = (int(shape[0]), int(shape[1]))
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.format = f"int{bits}"
        self._parts = None
        self._kernel = None  # block formats: the parts as the kernels take them (_core.BlockWeight)
        self._packed = packed
        self._scales = scales
        self._comp = comp
        self._mins = mins
        self._zeros = zeros
        self._perm = perm
        self._in_scale = in_scale
        for a in (packed, scales, comp, mins, zeros, perm, in_scale):
            if a is not None:
                a.flags.writeable = False

    @classmethod
    def from_int(cls, q, scales, *, bits, group_size=None, mins=None, zeros=None, perm=None,
                 input_scale=None):
        """Build a weight from integer values and scales (no rounding: exactly these weights).

        q: (N, K) integers, int8 for bits=8, 0..15 for bits=4; scales: (N, K // group_size) (or
        (N, 1) per channel), float32 for 8 bits, float16 values for 4 bits. 4 bits only: mins
        (float16, ``w = d * q + m``) or zeros (integers 0..255, ``w = d * (q - z)``); neither means
        symmetric ``w = d * (q - 8)``. perm: optional permutation of range(K), the input each
        column of q belongs to; input_scale: optional positive float32 (K,) factors the inputs are
        multiplied by (see the class docstring).
        """
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        q = np.asarray(q)
        if q.ndim != 2 or q.dtype.kind not in "iu" or 0 in q.shape:
            raise ValueError(f"q: expected a non-empty 2-D integer array, got {q.dtype} of shape "
                             f"{q.shape}")
        n, k = q.shape
        group_size = _check_group(group_size, k)
        groups = k // (group_size or k)
        lo, hi = (-128, 127) if bits == 8 else (0, 15)
        if q.min() < lo or q.max() > hi:
            raise ValueError(f"q: {bits}-bit values must be in {lo}..{hi}, got {q.min()}..{q.max()}")
        q = np.ascontiguousarray(q, dtype=np.int8 if bits == 8 else np.uint8)
        if perm is not None:
            perm = np.asarray(perm)
            if perm.shape != (k,) or perm.dtype.kind not in "iu" or not np.array_equal(
                    np.sort(perm), np.arange(k)):
                raise ValueError(f"perm: expected a permutation of range({k})")
            perm = None if np.array_equal(perm, np.arange(k)) else perm.astype(np.intp)
        input_scale = _check_input_scale(input_scale, k)
        if bits == 8:
            if mins is not None or zeros is not None:
                raise ValueError("8-bit weights are symmetric: no mins or zeros")
            d = _group_array(scales, "scales", n, groups, np.float32)
            packed, comp = _core.pack_w8(q, group_size or 0)
            s = np.zeros((groups, packed.shape[0]), np.float32)
            s[:, :n] = d.T
            return cls((n, k), 8, group_size, True, packed, s, comp=comp, perm=perm,
                       in_scale=input_scale)
        if mins is not None and zeros is not None:
            raise ValueError("give mins or zeros, not both")
        d = _group_array(scales, "scales", n, groups, np.float16)
        if mins is not None:
            mins = _panels(_group_array(mins, "mins", n, groups, np.float16))
        if zeros is not None:
            zeros = _group_array(zeros, "zeros", n, groups, np.uint8)
            zeros = None if (zeros == 8).all() else _panels(zeros)  # z = 8 is symmetric
        packed = _core.pack_w4(q, group_size or 0)
        return cls((n, k), 4, group_size, mins is None and zeros is None, packed, _panels(d),
                   mins=mins, zeros=zeros, perm=perm, in_scale=input_scale)

    @classmethod
    def from_blocks(cls, fmt: str, shape, parts: dict):
        """A weight in block format `fmt` (a name of ``lowbit.formats.BLOCK_FORMATS``) from its
        kernel-layout parts (as :func:`lowbit.load_gguf` and :func:`lowbit.load` produce them),
        each checked against the format's layout."""
        from .formats import BLOCK_FORMATS

        if fmt not in BLOCK_FORMATS:
            raise ValueError(f"unknown block format {fmt!r}; known: {sorted(BLOCK_FORMATS)}")
        f = BLOCK_FORMATS[fmt]
        n, k = int(shape[0]), int(shape[1])
        if not all(isinstance(a, np.ndarray) for a in parts.values()):
            raise ValueError(f"{fmt} weight: parts must be numpy arrays")
        qw = cls((n, k), f.bits, f.sub, f.min == "none", None, None)
        qw.format = fmt
        qw._parts = dict(parts)
        qw._kernel = _core.BlockWeight(f.index, n, k, qw._parts)  # checks every part's layout
        for a in qw._parts.values():
            a.flags.writeable = False
        return qw

    @property
    def nbytes(self) -> int:
        """The bytes really held: packed values, scales and what else the layout keeps."""
        parts = (self._packed, self._scales, self._comp, self._mins, self._zeros, self._perm,
                 self._in_scale) + tuple((self._parts or {}).values())
        return sum(a.nbytes for a in parts if a is not None)

    def _per_row(self, a):
        if a is None:
            return None  # block formats: their scales live in the format's own layout
        # (N, groups), read-only (4 bits: a copy, read-only too, so that writing to it never looks
        # like it changed qw)
        out = _all_rows(a)[: self.shape[0]]
        out.flags.writeable = False
        return out

    @property
    def scales(self) -> np.ndarray:
        """(N, groups) scales: float32 for 8 bits, float16 for 4 bits; None for block formats."""
        return self._per_row(self._scales)

    @property
    def mins(self):
        """float16 (N, groups) minima of 4-bit weights stored as ``d * q + m``, else None."""
        return None if self._mins is None else self._per_row(self._mins)

    @property
    def zeros(self):
        """uint8 (N, groups) zero points of 4-bit weights stored as ``d * (q - z)``, else None."""
        return None if self._zeros is None else self._per_row(self._zeros)

    @property
    def perm(self):
        """The input order of the packed columns (act-order), or None for the natural order."""
        return self._perm

    @property
    def input_scale(self):
        """float32 (K,) factors layers multiply their inputs by (AWQ), or None."""
        return self._in_scale

    def _rows(self, rows):
        """Row numbers (1-D) selected by rows (None, an index, a slice or an index array)."""
        n = self.shape[0]
        r = None if rows is None or isinstance(rows, slice) else np.asarray(rows)
        if r is not None and (r.ndim > 1 or (r.dtype.kind not in "iub" and r.size) or
                              (r.dtype.kind == "b" and r.ndim == 0)):
            raise TypeError(f"rows: expected None, an integer, a slice, or a 1-D array of row "
                            f"numbers or booleans, got {rows!r}")
        if (r is not None and r.ndim == 1 and r.dtype == np.int64 and 0 < r.size <= 64 and
                r.min() >= 0 and r.max() < n):
            return r  # the array itself (lowbit.nn.record reads the rows from it)
        if r is not None and r.ndim <= 1 and r.dtype.kind in "iu" and r.size <= 64:
            # a few rows (a token's embedding): checked in Python, not through an arange of all
            picked = [int(i) for i in r.reshape(-1)]
            if any(not -n <= i < n for i in picked):
                raise IndexError(f"rows {rows!r} out of range for {n} rows")
            return np.array([i % n for i in picked], np.int64)
        try:
            return np.atleast_1d(np.arange(n)[slice(None) if rows is None else rows])
        except IndexError:
            raise IndexError(f"rows {rows!r} out of range for {n} rows") from None

    def _blocks(self):
        """The packed values as (panel, k block, column, byte): a block is 4 inputs of a column
        (8 bits), or 8 as nibbles, k0..3 low and k4..7 high (4 bits)."""
        return self._packed.reshape(-1, self._packed.shape[1] * 16 // 64, 16, 4)

    def _check_stored(self):
        """Raises ValueError unless the parts agree with each other as the kernels need: the
        column sums (8 bits) are those of the values, padding rows hold zeros, and so do 8-bit
        padding columns (the kernels multiply them by the activations' offset of 128; 4-bit ones
        meet zero activations, and the quantizer fills them with the symmetric zero, 8), scales
        and minima are finite. (Parts read from a file: a layer would multiply by them.)"""
        n, k = self.shape
        b = self._blocks()
        if n % 16 and b[n // 16, :, n % 16:].any():
            raise ValueError(f"padding rows {n}.. of the packed values are not zero")
        if self.bits == 8 and k % 4 and b[:, k // 4, :, k % 4:].any():  # per channel: k to 4s
            raise ValueError(f"padding columns {k}.. of the packed values are not zero")
        for name in ("scales", "mins"):
            a = getattr(self, "_" + name)
            if a is not None and not np.isfinite(a).all():
                raise ValueError(f"{name}: NaN or Inf")
        for name in ("scales", "comp", "mins", "zeros"):
            a = getattr(self, "_" + name)
            if a is not None and _all_rows(a)[n:].any():
                raise ValueError(f"{name}: padding rows {n}.. are not zero")
        if self.bits == 8:
            g = self._comp.shape[0]  # (einsum over 64-byte rows: ~10x numpy's sum over the axes)
            sums = np.einsum("pgkc->pgc", b.reshape(b.shape[0], g, -1, 64), dtype=np.int32)
            sums = sums.reshape(b.shape[0], g, 16, 4).sum(-1)
            if not np.array_equal(128 * sums.transpose(1, 0, 2).reshape(g, -1), self._comp):
                raise ValueError("comp (the kernels' column sums) disagrees with the packed values")

    def int_values(self, rows=None) -> np.ndarray:
        """The quantized integers (N, K), or of the given rows (an index gives one row (K,), a
        slice or an index array several), in the packed input order (see ``perm``): int8 for 8
        bits, uint8 0..15 for 4 bits."""
        if self._parts is not None:
            raise ValueError(f"int_values: a {self.format} weight keeps its values in its own block "
                             f"layout; dequantize() gives the weights")
        k = self.shape[1]
        r = self._rows(rows)
        # the selected rows' bytes in k order, rows gathered first
        b = self._blocks()[r // 16, :, r % 16]
        if self.bits == 4:  # low nibbles k0..3, high k4..7
            b = np.concatenate([b & 0x0F, b >> 4], axis=-1)
        q = np.ascontiguousarray(b.reshape(len(r), b.shape[1] * b.shape[2])[:, :k])  # (no rows: (0, k))
        return q[0] if isinstance(rows, (int, np.integer)) else q

    def dequantize(self, rows=None) -> np.ndarray:
        """float32 (N, K), or the given rows (as ``int_values``): the weights the kernels multiply
        by (``scale * q``, ``d * q + m``, ``d * (q - z)``, ``d * (q - 8)``, each in float32, times
        ``input_scale`` if any), in the original input order."""
        k = self.shape[1]
        sel = self._rows(rows)
        if self._parts is not None:
            w = _core.dequantize_blk(self._kernel, sel.astype(np.int64, copy=False))
            return w[0] if isinstance(rows, (int, np.integer)) else w
        q = self.int_values(sel).astype(np.float32)
        r = q.shape[0]
        group = self.group_size or k
        q = q.reshape(r, k // group, group)
        d = self.scales[sel].astype(np.float32)[:, :, None]
        if self.bits == 8:
            w = q * d
        elif self._mins is not None:
            w = q * d + self.mins[sel].astype(np.float32)[:, :, None]
        elif self._zeros is not None:
            w = d * (q - self.zeros[sel].astype(np.float32)[:, :, None])
        else:
            w = d * (q - np.float32(8))
        w = w.reshape(r, k)
        if self._perm is not None:
            out = np.empty_like(w)
            out[:, self._perm] = w
            w = out
        if self._in_scale is not None:
            w *= self._in_scale
        return w[0] if isinstance(rows, (int, np.integer)) else w

    def __getstate__(self):
        """By value (pickle, multiprocessing): every slot but the kernels' handle of a block
        format, rebuilt from the parts on load."""
        return {s: getattr(self, s) for s in self.__slots__ if s != "_kernel"}

    def __setstate__(self, state):
        for s in self.__slots__:
            setattr(self, s, state.get(s))
        # pickle hands arrays back writeable: held arrays are read-only, as when built
        held = (self._packed, self._scales, self._comp, self._mins, self._zeros, self._perm,
                self._in_scale) + tuple((self._parts or {}).values())
        for a in held:
            if a is not None:
                a.flags.writeable = False
        if self._parts is not None:
            from .formats import BLOCK_FORMATS

            self._kernel = _core.BlockWeight(BLOCK_FORMATS[self.format].index, *self.shape, self._parts)

    def __repr__(self):
        if self._parts is not None:
            return f"QuantizedWeight(shape={self.shape}, format={self.format}, nbytes={self.nbytes})"
        g = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        sym = "symmetric" if self.symmetric else "zero points" if self._zeros is not None else "asymmetric"
        act = ", act-order" if self._perm is not None else ""
        act += ", input_scale" if self._in_scale is not None else ""
        return (f"QuantizedWeight(shape={self.shape}, bits={self.bits}, {g}, {sym}{act}, "
                f"nbytes={self.nbytes})")


def concat_rows(weights) -> QuantizedWeight:
    """One weight whose output rows are those of `weights` in order: fused projections (Q, K and V;
    gate and up) make one kernel call instead of several. The weights must share K, format, bits,
    group size and symmetry (and input order / input scale); every weight but the last must have a
    multiple of 16 rows, so that the packed panels are simply laid end to end (no repacking)."""
    weights = list(weights)
    if not weights or not all(isinstance(w, QuantizedWeight) for w in weights):
        raise TypeError("concat_rows: expected a non-empty sequence of QuantizedWeight")
    first = weights[0]
    k = first.shape[1]
    for w in weights[1:]:
        if (w.shape[1], w.format, w.bits, w.group_size, w.symmetric) != (
                k, first.format, first.bits, first.group_size, first.symmetric):
            raise ValueError(f"concat_rows: {w!r} does not match {first!r} (K, format, group size "
                             f"and symmetry must agree)")
        if (w._mins is None) != (first._mins is None) or (w._zeros is None) != (first._zeros is None):
            raise ValueError("concat_rows: minima / zero points on some weights but not others")
        for a, b in ((w._perm, first._perm), (w._in_scale, first._in_scale)):
            if (a is None) != (b is None) or a is not None and not np.array_equal(a, b):
                raise ValueError("concat_rows: weights with different input orders or input scales")
    if any(w.shape[0] % 16 for w in weights[:-1]):
        raise ValueError("concat_rows: every weight but the last needs a multiple of 16 rows, got "
                         f"{[w.shape[0] for w in weights]}")
    n = sum(w.shape[0] for w in weights)
    cat = lambda parts, axis=0: np.concatenate(parts, axis=axis)  # noqa: E731
    if first._parts is not None:
        parts = {p: cat([w._parts[p] for w in weights]) for p in first._parts}
        return QuantizedWeight.from_blocks(first.format, (n, k), parts)
    def part(name):  # noqa: E306
        a = [getattr(w, name) for w in weights]
        if a[0] is None:
            return None
        return cat(a, 1 if first.bits == 8 and name in ("_scales", "_comp") else 0)  # [G][Np]
    out = QuantizedWeight((n, k), first.bits, first.group_size, first.symmetric, part("_packed"),
                          part("_scales"), comp=part("_comp"), mins=part("_mins"),
                          zeros=part("_zeros"), perm=first._perm, in_scale=first._in_scale)
    return out


def _all_rows(a):
    """A per-row part (scales, comp, mins, zeros) in the kernels' layout as (Np, groups), padding
    rows included: 8 bits [G][Np]; 4 bits [Np/16][G][16] (per panel)."""
    return a.T if a.ndim == 2 else a.transpose(0, 2, 1).reshape(-1, a.shape[1])


def _check_input_scale(c, k):
    """None, or positive finite float32 (K,) input factors: a copy of `c` (the caller's array may
    change later), checked after the cast to float32 (1e39 in float64 is inf there, 1e-50 is 0)."""
    if c is None:
        return None
    c = np.asarray(c)
    if c.shape != (k,) or c.dtype.kind != "f":
        raise ValueError(f"input_scale: expected ({k},) positive finite floats, got {c.dtype} of "
                         f"shape {c.shape}")
    with np.errstate(over="ignore", under="ignore"):
        c32 = np.array(c, dtype=np.float32)
    if not (np.isfinite(c32) & (c32 > 0)).all():
        raise ValueError(f"input_scale: expected ({k},) positive finite floats (in float32, as the "
                         f"kernels use them)")
    c32.flags.writeable = False
    return c32


def _check_group(group_size, k):
    """None, or a positive multiple of 32 dividing K (a group of all K is per channel: None)."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    group_size = int(group_size)
    if group_size <= 0 or group_size % 32 or k % group_size:
        raise ValueError(f"group_size must be a positive multiple of 32 dividing K={k}, got {group_size}")
    return None if group_size == k else group_size


def _group_array(a, what, n, groups, dtype):
    """An (N, groups) array of `what` as `dtype` (a copy), refusing values the conversion would
    change and, for floats, values that are not finite once converted."""
    a = np.asarray(a)
    if a.shape != (n, groups):
        raise ValueError(f"{what}: expected shape ({n}, {groups}), got {a.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        out = a.astype(dtype)
        same = np.array_equal(out.astype(a.dtype), a, equal_nan=a.dtype.kind == "f")
    if not same:
        raise ValueError(f"{what}: values not exactly representable as {np.dtype(dtype).name}")
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise ValueError(f"{what}: NaN or Inf (the kernels need finite {np.dtype(dtype).name} values)")
    return out


def _panels(a):
    """(N, G) per-row values to the kernels' per-panel layout [Np/16][G][16], zero padded."""
    n, g = a.shape
    out = np.zeros((-(-n // 16) * 16, g), a.dtype)
    out[:n] = a
    return np.ascontiguousarray(out.reshape(-1, 16, g).transpose(0, 2, 1))


def _as_float32_matrix(w, what="w") -> np.ndarray:
    w = np.asarray(w)
    if w.dtype.kind != "f":
        raise TypeError(f"{what}: expected a float array (float32, float16 or float64), got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (out_features, in_features) array, got shape {w.shape}")
    if w.dtype != np.float32:
        w = w.astype(np.float32)
    if w.shape[1] > 1 and w.strides[1] != 4 or w.strides[0] < 0:
        w = np.ascontiguousarray(w)
    return w


def quantize(w, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
             method: str = "rtn", calibration=None, *, act_order: bool = False,
             damp: float = 0.1, progress: bool | None = None, input_scale=None) -> QuantizedWeight:
    """Quantize a float weight matrix ``w`` (N, K) to a :class:`QuantizedWeight`.

    bits: 8 (symmetric: ``scale = max|w| / 127``, values in [-127, 127]) or 4 (symmetric like GGUF
    Q4_0: ``d = (value of largest magnitude) / -8``; asymmetric like Q4_1: ``d = (max - min) / 15``,
    ``m = min``; d and m stored as float16). group_size: None for one scale per output row, else a
    positive multiple of 32 dividing K. NaN or Inf in ``w`` raise ValueError.

    method (see lowbit.methods for the algorithms):

    * "rtn": round to nearest (half to even) with the ranges above. No calibration.
    * "mse": per row and group, the clipping of the range (1.0 down to 0.5 of it) with the least
      squared error of the weights, or, given calibration rows, of the layer's output on them.
    * "gptq": GPTQ on the Hessian of the calibration rows (required), damped by ``damp`` times
      its mean diagonal (0.1: GPTQ's usual 0.01 fits the calibration rows closer but generalized
      worse to held-out text on MiniLM); ``act_order=True`` rounds the most active inputs first
      (the weight keeps that input order, ``perm``, and runs on the same kernels).
    * "awq": activation-aware scaling of the input channels from the calibration rows (required),
      then the "mse" clipping search; the weight keeps the inverse scales as ``input_scale``.

    calibration: float activations (S, K), the inputs the layer sees (a few hundred rows or more).
    progress: report GPTQ's progress on stderr (default: when the matrix has over 16M weights and
    stderr is a terminal).

    input_scale: None, or positive float (K,) factors c: the matrix quantized is ``w / c`` (input
    column j divided by c_j) and layers multiply their inputs by c inside the kernels' activation
    quantization (no extra pass), so ``x @ w.T`` is unchanged in exact arithmetic. This is
    SmoothQuant's smoothing with c = 1 / s: inputs with outlier channels shrink to the range of
    the rest, the weights' columns grow to match. Calibration rows stay the layer's own inputs.
    Not with method="awq", which chooses its own input scale.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method == "rtn" and calibration is not None:
        raise ValueError("calibration is only used by calibrated methods; method='rtn' takes none")
    if method in ("gptq", "awq") and calibration is None:
        raise ValueError(f"method={method!r} needs calibration: activations (S, K) of the layer")
    if act_order and method != "gptq":
        raise ValueError("act_order is an option of method='gptq'")
    if isinstance(damp, bool) or not (isinstance(damp, numbers.Real) and 0 < damp < 1):
        raise ValueError(f"damp must be in (0, 1), got {damp!r}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 8 and not symmetric:
        raise ValueError("8-bit weights are symmetric only (symmetric=True)")
    w = _as_float32_matrix(w)
    n, k = w.shape
    group_size = _check_group(group_size, k)
    c = _check_input_scale(input_scale, k)
    if c is not None:
        if method == "awq":
            raise ValueError("input_scale: method='awq' chooses its own input scale")
        w = w / c
        if calibration is not None:  # checked as given (not broadcast by the scaling)
            from . import methods
            calibration = methods.calibration_rows(calibration, k) * c
    if method != "rtn":
        qw = _quantize_method(w, bits, group_size, bool(symmetric), method, calibration,
                              act_order, damp, progress)
    elif bits == 8:
        packed, scales, comp = _core.quantize_w8(w, group_size or 0)
        qw = QuantizedWeight((n, k), 8, group_size, True, packed, scales, comp=comp)
    else:
        packed, scales, mins = _core.quantize_w4(w, group_size or 0, bool(symmetric))
        qw = QuantizedWeight((n, k), 4, group_size, bool(symmetric), packed, scales, mins=mins)
    if c is not None:
        qw._in_scale = c
    return qw


def _quantize_method(w, bits, group_size, symmetric, method, calibration, act_order, damp, progress):
    from . import methods

    n, k = w.shape
    if not np.isfinite(w).all():
        raise ValueError("w: NaN or Inf in the weights")
    grid = methods.Grid(bits, symmetric)
    group = group_size or k
    h = None if calibration is None else methods.hessian(calibration, k)
    if method == "mse":
        q, d, m = methods.mse(w, grid, group, h)
        return grid.build(q, d, m, group_size)
    if method == "gptq":
        if progress is None:
            progress = n * k > (1 << 24) and sys.stderr.isatty()
        q, d, m, perm = methods.gptq(w, grid, group, h, damp, act_order, progress)
        return grid.build(q, d, m, group_size, perm=perm)
    q, d, m, inv_s = methods.awq(w, grid, group, calibration, h)
    return grid.build(q, d, m, group_size, input_scale=inv_s)
