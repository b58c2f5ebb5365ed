"""Quantization-aware training helpers: fake quantization that rounds like the kernels, and its
straight-through gradient.

    wq = lb.fake_quantize(w, bits=4, group_size=32)        # forward: the weights lowbit will use
    ... loss, grad_wq = backward(...)
    w -= lr * lb.fake_quantize_grad(w, grad_wq, bits=4, group_size=32)

Weights: ``fake_quantize(w, bits, group_size, symmetric)`` equals
``lb.quantize(w, ...).dequantize()`` bit for bit (without packing anything). Activations as a
layer quantizes them: dynamic int8 per row is ``fake_quantize(x, bits=8)``, per 32-block (4-bit
weights) ``fake_quantize(x, bits=8, group_size=32)``, static ``fake_quantize(x, static=params)``.
The gradient is the straight-through estimator: passed unchanged where the value lies in the
quantization range, zero where it was clipped (static activations beyond the range, or weights
outside a clipped range).
"""
from __future__ import annotations

import numpy as np

from .calibrate import StaticActivations
from .methods import Grid
from .quantize import _check_group


def _rows(x, group_size, bits, symmetric, static):
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x: expected a float array, got dtype {x.dtype}")
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"x: expected a non-empty array of shape (..., K), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("x: NaN or Inf")
    x = x.astype(np.float32, copy=False)
    if static is not None:
        if not isinstance(static, StaticActivations):
            raise TypeError(f"static: expected a StaticActivations, got {type(static).__name__}")
        return x, None
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 8 and not symmetric:
        raise ValueError("8-bit quantization is symmetric only (symmetric=True)")
    k = x.shape[-1]
    group = _check_group(group_size, k) or k
    return x.reshape(-1, k // group, group), group


def _static(x, static):
    s = np.float32(static.scale)
    t = np.clip(x / s, -1024, 1024)  # as the kernels: the quotient first, then round, then clamp
    q = np.rint(t) + static.zero_point
    return q, s


def fake_quantize(x, bits=8, group_size=None, symmetric=True, *, static=None) -> np.ndarray:
    """x (..., K) rounded to the values lowbit computes with, as float32 of x's shape: per row
    (over the last axis) or per group of `group_size`, like lb.quantize; or with static int8
    parameters (a StaticActivations) like a static layer's inputs."""
    xr, group = _rows(x, group_size, bits, symmetric, static)
    if static is not None:
        q, s = _static(xr, static)
        return (s * (np.clip(q, -128, 127) - static.zero_point)).astype(np.float32)
    grid = Grid(bits, symmetric)
    d, m = grid.params(xr)
    d = d[..., None]
    m = None if m is None else m[..., None]
    return grid.dequant(grid.round(xr, d, m), d, m).reshape(np.shape(x))


def fake_quantize_grad(x, grad, bits=8, group_size=None, symmetric=True, *, static=None) -> np.ndarray:
    """The straight-through gradient of :func:`fake_quantize` at x: `grad` (the gradient with
    respect to its output) where x was not clipped, 0 where it was."""
    grad = np.asarray(grad)
    if np.shape(x) != grad.shape:
        raise ValueError(f"grad: expected the shape of x {np.shape(x)}, got {grad.shape}")
    xr, group = _rows(x, group_size, bits, symmetric, static)
    if static is not None:
        q, _ = _static(xr, static)
        inside = (q >= -128) & (q <= 127)
    else:
        grid = Grid(bits, symmetric)
        d, m = grid.params(xr)
        d = d[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            if bits == 8:
                t = np.rint(xr / d)
                inside = (d == 0) | ((t >= -127) & (t <= 127))
            elif symmetric:
                t = np.rint(xr / d) + 8
                inside = (d == 0) | ((t >= 0) & (t <= 15))
            else:
                t = np.rint((xr - m[..., None]) / d)
                inside = (d == 0) | ((t >= 0) & (t <= 15))
    return np.where(inside.reshape(grad.shape), grad, 0).astype(grad.dtype, copy=False)
