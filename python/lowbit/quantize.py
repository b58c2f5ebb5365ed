"""Weight quantization: float (N, K) arrays to packed low-bit weights the kernels read directly."""
from __future__ import annotations

import numpy as np

from . import _core

METHODS = ("rtn",)


class QuantizedWeight:
    """A quantized weight matrix of shape (N out_features, K in_features).

    Holds only what the kernels read: int8 values prepacked in 16-column panels, float32 scales
    (one per output row, or per row and group of ``group_size`` inputs) and the per-column sums the
    u8 x s8 kernels need. ``nbytes`` is what it really holds; no float copy is kept.
    """

    __slots__ = ("shape", "bits", "group_size", "symmetric", "_packed", "_scales", "_comp")

    def __init__(self, shape, bits, group_size, symmetric, packed, scales, comp):
        self.shape = (int(shape[0]), int(shape[1]))
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self._packed = packed
        self._scales = scales
        self._comp = comp

    @property
    def nbytes(self) -> int:
        return self._packed.nbytes + self._scales.nbytes + self._comp.nbytes

    @property
    def scales(self) -> np.ndarray:
        """float32 (N, groups) view of the scales (groups = 1 per channel)."""
        return self._scales[:, : self.shape[0]].T

    def int_values(self) -> np.ndarray:
        """The quantized integers as int8 (N, K), in row order."""
        return _core.unpack_w8(self._packed, *self.shape)

    def dequantize(self) -> np.ndarray:
        """float32 (N, K): each integer times its scale, exactly as the kernels see them."""
        n, k = self.shape
        q = self.int_values().astype(np.float32)
        s = self.scales
        group = self.group_size or k
        return (q.reshape(n, k // group, group) * s[:, :, None]).reshape(n, k)

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

    bits: 8. group_size: None for one scale per output row, else a positive multiple of 32
    dividing K. symmetric: True (int8 values in [-127, 127], scale = max|w| / 127).
    method: "rtn" (round to nearest, half to even). NaN or Inf in ``w`` raise ValueError.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if calibration is not None:
        raise ValueError("calibration is only used by calibrated methods; method='rtn' takes none")
    if bits != 8:
        raise ValueError(f"bits must be 8, got {bits!r}")
    if not symmetric:
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
    packed, scales, comp = _core.quantize_w8(w, group_size or 0)
    return QuantizedWeight((n, k), 8, group_size, True, packed, scales, comp)
