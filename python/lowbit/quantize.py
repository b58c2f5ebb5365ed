"""Weight quantization: float (N, K) arrays to packed low-bit weights the kernels read directly."""
from __future__ import annotations

import numpy as np

from . import _core

METHODS = ("rtn",)


class QuantizedWeight:
    """A quantized weight matrix of shape (N out_features, K in_features).

    Holds only what the kernels read, prepacked in 16-column panels:

    * bits=8: int8 values (symmetric, ``w = scale * q``), float32 scales and the per-column sums
      the u8 x s8 kernels need;
    * bits=4: 4-bit values q in 0..15 (two per byte) with float16 scales ``d`` and, when
      asymmetric, float16 minima ``m``: ``w = d * q + m``; symmetric means ``w = d * (q - 8)``.

    One scale (and minimum) per output row, or per row and group of ``group_size`` inputs.
    ``nbytes`` is what it really holds; no float copy is kept.
    """

    __slots__ = ("shape", "bits", "group_size", "symmetric", "_packed", "_scales", "_comp", "_mins")

    def __init__(self, shape, bits, group_size, symmetric, packed, scales, comp=None, mins=None):
        self.shape = (int(shape[0]), int(shape[1]))
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self._packed = packed
        self._scales = scales
        self._comp = comp
        self._mins = mins

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._packed, self._scales, self._comp, self._mins) if a is not None)

    def _per_row(self, a):
        # kernel layouts to (N, groups): 8 bits [G][Np]; 4 bits [Np/16][G][16] (per panel)
        if a.ndim == 2:
            return a[:, : self.shape[0]].T
        return a.transpose(0, 2, 1).reshape(-1, a.shape[1])[: self.shape[0]]

    @property
    def scales(self) -> np.ndarray:
        """(N, groups) scales: float32 for 8 bits, float16 for 4 bits."""
        return self._per_row(self._scales)

    @property
    def mins(self):
        """float16 (N, groups) minima of asymmetric 4-bit weights, else None."""
        return None if self._mins is None else self._per_row(self._mins)

    def int_values(self) -> np.ndarray:
        """The quantized integers (N, K) in row order: int8 for 8 bits, uint8 0..15 for 4 bits."""
        if self.bits == 8:
            return _core.unpack_w8(self._packed, *self.shape)
        return _core.unpack_w4(self._packed, *self.shape, self.group_size or 0)

    def dequantize(self) -> np.ndarray:
        """float32 (N, K): the weights the kernels multiply by (``scale * q``, ``d * (q - 8)`` or
        ``d * q + m``, each in float32)."""
        n, k = self.shape
        group = self.group_size or k
        q = self.int_values().astype(np.float32).reshape(n, k // group, group)
        d = self.scales.astype(np.float32)[:, :, None]
        if self.bits == 8:
            w = q * d
        elif self.symmetric:
            w = d * (q - np.float32(8))
        else:
            w = q * d + self.mins.astype(np.float32)[:, :, None]
        return w.reshape(n, k)

    def __repr__(self):
        g = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return (f"QuantizedWeight(shape={self.shape}, bits={self.bits}, {g}, {sym}, "
                f"nbytes={self.nbytes})")


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
             method: str = "rtn", calibration=None) -> QuantizedWeight:
    """Quantize a float weight matrix ``w`` (N, K) to a :class:`QuantizedWeight`.

    bits: 8 (symmetric: ``scale = max|w| / 127``, values in [-127, 127]) or 4 (symmetric like GGUF
    Q4_0: ``d = (value of largest magnitude) / -8``; asymmetric like Q4_1: ``d = (max - min) / 15``,
    ``m = min``; d and m stored as float16). group_size: None for one scale per output row, else a
    positive multiple of 32 dividing K. method: "rtn" (round to nearest, half to even).
    NaN or Inf in ``w`` raise ValueError.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if calibration is not None:
        raise ValueError("calibration is only used by calibrated methods; method='rtn' takes none")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 8 and not symmetric:
        raise ValueError("8-bit weights are symmetric only (symmetric=True)")
    w = _as_float32_matrix(w)
    n, k = w.shape
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
            raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
        group_size = int(group_size)
        if group_size <= 0 or group_size % 32 or k % group_size:
            raise ValueError(f"group_size must be a positive multiple of 32 dividing K={k}, "
                             f"got {group_size}")
        if group_size == k:
            group_size = None  # one group per row is per-channel
    if bits == 8:
        packed, scales, comp = _core.quantize_w8(w, group_size or 0)
        return QuantizedWeight((n, k), 8, group_size, True, packed, scales, comp=comp)
    packed, scales, mins = _core.quantize_w4(w, group_size or 0, bool(symmetric))
    return QuantizedWeight((n, k), 4, group_size, bool(symmetric), packed, scales, mins=mins)
