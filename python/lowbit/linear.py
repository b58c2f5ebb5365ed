"""Linear layers on quantized weights: y = x @ W.T + b."""
from __future__ import annotations

import numpy as np

from . import _core
from .quantize import QuantizedWeight, quantize

ACTIVATIONS = ("int8", "float")


def _check_activations(activations, bits):
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {list(ACTIVATIONS)}, got {activations!r}")
    if activations == "float" and bits == 8:
        raise ValueError("activations='float' (weight-only) runs 4-bit weights; 8-bit weights "
                         "run with activations='int8'")


def _check_bias(bias, n):
    if bias is None:
        return None
    b = np.asarray(bias)
    if b.dtype.kind != "f":
        raise TypeError(f"bias: expected a float array, got dtype {b.dtype}")
    if b.shape != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {b.shape}")
    return np.ascontiguousarray(b, dtype=np.float32)


def _forward(x, qw: QuantizedWeight, bias, activations):
    x = np.asarray(x)
    if x.dtype != np.float32:
        if x.dtype.kind != "f":
            raise TypeError(f"x: expected float32 or float16, got dtype {x.dtype}")
        x = x.astype(np.float32)
    n, k = qw.shape
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"x: expected shape (..., {k}), got {x.shape}")
    x2 = x.reshape(-1, k)
    if qw._perm is not None:
        x2 = x2.take(qw._perm, axis=1)  # inputs in the packed column order (act-order)
    elif k > 1 and x2.strides[1] != 4 or x2.strides[0] < 0:
        x2 = np.ascontiguousarray(x2)
    if qw.bits == 8:
        y = _core.linear_w8a8(x2, qw._packed, qw._scales, qw._comp, n, k, qw.group_size or 0, bias)
    else:
        y = _core.linear_w4(x2, qw._packed, qw._scales, qw._mins, qw._zeros, n, k,
                            qw.group_size or 0, bias, activations == "int8")
    return y.reshape(x.shape[:-1] + (n,))


class Linear:
    """A quantized linear layer, ``y = x @ W.T + bias``, W of shape (out_features, in_features).

    ``w_or_qw`` is a float array (quantized here with ``bits``, ``group_size``, ``symmetric``) or a
    :class:`QuantizedWeight`. activations="int8": input rows are quantized to int8 on the fly
    (symmetric; one scale per row for 8-bit weights, per block of 32 inputs for 4-bit weights), the
    integer products are exact, then scaled to float32. activations="float" (4-bit weights):
    weight-only, the 4-bit values meet the float32 inputs in FMA.
    Input: float32 or float16 of shape (..., in_features); output float32 (..., out_features).
    """

    def __init__(self, w_or_qw, bias=None, *, bits=8, group_size=None, symmetric=True,
                 activations="int8"):
        if isinstance(w_or_qw, QuantizedWeight):
            self.weight = w_or_qw
        else:
            _check_activations(activations, bits)
            self.weight = quantize(w_or_qw, bits=bits, group_size=group_size, symmetric=symmetric)
        _check_activations(activations, self.weight.bits)
        self.bias = _check_bias(bias, self.weight.shape[0])
        self.activations = activations

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def __call__(self, x) -> np.ndarray:
        return _forward(x, self.weight, self.bias, self.activations)

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.weight.bits}, activations={self.activations!r}, nbytes={self.nbytes})")


def matmul(x, qw: QuantizedWeight, bias=None, activations="int8") -> np.ndarray:
    """``x @ qw.dequantize().T + bias`` on the quantized kernels (the functional ``Linear``)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"matmul: expected a QuantizedWeight, got {type(qw).__name__}")
    _check_activations(activations, qw.bits)
    return _forward(x, qw, _check_bias(bias, qw.shape[0]), activations)
