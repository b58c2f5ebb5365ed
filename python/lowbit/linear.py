"""Linear layers on quantized weights: y = x @ W.T + b."""
from __future__ import annotations

import numbers

import numpy as np

from . import _core
from .calibrate import StaticActivations
from .nn import _out as _check_out
from .quantize import QuantizedWeight, quantize

ACTIVATIONS = ("int8", "float")


def _check_activations(activations, fmt):
    """"int8", "float" or a StaticActivations (a positive number is a symmetric static scale), for
    weights of format `fmt` (QuantizedWeight.format)."""
    if isinstance(activations, numbers.Real) and not isinstance(activations, bool):
        activations = StaticActivations(float(activations))
    if isinstance(activations, StaticActivations):
        if fmt != "int8" and activations.zero_point != 0:
            raise ValueError("static activations with a zero point need 8-bit weights; 4-bit "
                             "and block-format weights take symmetric ones (zero_point=0)")
        return activations
    if not isinstance(activations, str) or activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {list(ACTIVATIONS)} or a StaticActivations "
                         f"(a calibrated scale), got {activations!r}")
    return activations


def _check_bias(bias, n):
    if bias is None:
        return None
    b = np.asarray(bias)
    if b.dtype.kind != "f":
        raise TypeError(f"bias: expected a float array, got dtype {b.dtype}")
    if b.shape != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {b.shape}")
    return np.ascontiguousarray(b, dtype=np.float32)


def _held(a):
    """A read-only copy of an array a layer keeps: the caller's array may change afterwards
    without changing the layer, and the layer's cannot be changed through its attributes."""
    if a is None:
        return None
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def _zero_point_term(qw: QuantizedWeight, activations):
    """float64 (N,) -scale * z * sum_k w[n, k] for a static zero point z on 8-bit weights (the
    kernel multiplies the int8 values q, x ~ scale * (q - z)), else None."""
    if not (isinstance(activations, StaticActivations) and activations.zero_point):
        return None
    n = qw.shape[0]
    colsum = (qw._comp[:, :n] // 128).astype(np.float64)  # (groups, N) sums of the int8 values
    wsum = (qw._scales[:, :n].astype(np.float64) * colsum).sum(0)
    return -activations.scale * activations.zero_point * wsum


def _kernel_bias(qw: QuantizedWeight, bias, activations):
    """The bias the kernel adds: `bias`, plus the static zero point's term where there is one."""
    term = _zero_point_term(qw, activations)
    if term is None:
        return bias
    return (term if bias is None else term + bias).astype(np.float32)


def _out_rows(out, x, n, bias):
    """out (..., n) for an input x (..., k) as the kernel's (rows, n) view, or None."""
    if _check_out(out, x.shape[:-1] + (n,), [a for a in (x, bias) if a is not None]) is None:
        return None
    return out.reshape(-1, n) if out.flags.c_contiguous else out  # the kernel rejects the rest


EPILOGUES = (None, "gelu")


def _check_epilogue(epilogue):
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {list(EPILOGUES)}, got {epilogue!r}")
    return epilogue


def _plan(qw: QuantizedWeight, bias, activations, epilogue):
    """The kernel call ``x @ W.T + bias`` for a weight and its settings, checked once
    (``_core.LinearPlan``): ``plan(x, out)`` runs inputs it can take as they are and returns None
    for the rest (see _forward)."""
    n, k = qw.shape
    in_scale = qw._in_scale  # the kernel multiplies the inputs by it as it quantizes them
    perm = qw._perm  # act-order: the kernel gathers the inputs into the packed column order
    if perm is not None:
        in_scale = None if in_scale is None else in_scale[perm]
        perm = perm.astype(np.int64, copy=False)
    static = isinstance(activations, StaticActivations)
    scale = activations.scale if static else 0.0
    gelu = epilogue == "gelu"
    if qw._parts is not None:
        return _core.plan_blk(qw._kernel, bias, activations != "float", scale, in_scale, gelu)
    if qw.bits == 8:
        zero = activations.zero_point if static else 0
        return _core.plan_w8(qw._packed, qw._scales, qw._comp, n, k, qw.group_size or 0, bias,
                             activations != "float", scale, zero, in_scale, gelu, perm=perm)
    return _core.plan_w4(qw._packed, qw._scales, qw._mins, qw._zeros, n, k, qw.group_size or 0,
                         bias, activations != "float", scale, in_scale, gelu, perm=perm)


def _forward(plan, qw: QuantizedWeight, x, out=None, bias=None):
    """plan's output for x (..., K): at once when x (float32) and out fit the kernels as they are,
    else x converted here (float16, a list, another layout, act-order columns) and out checked."""
    y = plan(x, out)
    return y if y is not None else _forward_converted(plan, qw, x, out, bias)


def _forward_converted(plan, qw: QuantizedWeight, x, out, bias):
    x = np.asarray(x)
    if x.dtype != np.float32:
        if x.dtype.kind != "f":
            raise TypeError(f"x: expected float32 or float16, got dtype {x.dtype}")
        x = x.astype(np.float32)
    n, k = qw.shape
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"x: expected shape (..., {k}), got {x.shape}")
    y2 = _out_rows(out, x, n, bias)
    y = plan.run(x.reshape(-1, k), y2)
    return out if out is not None else y.reshape(x.shape[:-1] + (n,))


class Linear:
    """A quantized linear layer, ``y = x @ W.T + bias``, W of shape (out_features, in_features).

    ``w_or_qw`` is a float array (quantized here with ``bits``, ``group_size``, ``symmetric``) or a
    :class:`QuantizedWeight`. activations:

    * "int8" (dynamic): input rows are quantized to int8 on the fly (symmetric; one scale per row
      for 8-bit weights, per block of 32 inputs for 4-bit and block-format weights), the integer products are
      exact, then scaled to float32.
    * a :class:`StaticActivations` (from a calibration observer, or a positive number: a
      symmetric scale): one fixed scale (and, with 8-bit weights, zero point) for every input,
      ``q = clamp(round(x / scale) + zero_point, -128, 127)``; no range is computed per call.
    * "float": weight-only, the weight's integer values meet the float32 inputs in FMA (the
      scales applied per group), for 8-bit, 4-bit and block-format weights alike.

    epilogue: None, or "gelu" for ``GELU(x @ W.T + bias)`` (lowbit.nn.gelu's exact erf form, bit
    for bit), applied to each block of the output while it is in cache: a BERT intermediate
    layer without a second pass over its output.

    Input: float32 or float16 of shape (..., in_features); output float32 (..., out_features),
    written to ``out`` when given (a C-contiguous float32 array of that shape, not overlapping
    the input: a buffer reused from call to call spares allocating and first-touching a new one).
    """

    def __init__(self, w_or_qw, bias=None, *, bits=8, group_size=None, symmetric=True,
                 activations="int8", epilogue=None):
        if not isinstance(w_or_qw, QuantizedWeight):
            _check_activations(activations, f"int{bits}")
            w_or_qw = quantize(w_or_qw, bits=bits, group_size=group_size, symmetric=symmetric)
        else:  # a weight's own settings apply: one given otherwise would be silently ignored
            one_group = group_size == w_or_qw.shape[1] and w_or_qw.group_size is None
            given = (("bits", bits, bits != 8),  # (name, as given, given at all)
                     ("group_size", group_size, group_size is not None and not one_group),
                     ("symmetric", symmetric, symmetric is not True))
            for name, value, set_ in given:
                if set_ and value != getattr(w_or_qw, name):
                    raise ValueError(f"Linear: {name}={value!r} given with a QuantizedWeight of "
                                     f"{name}={getattr(w_or_qw, name)!r}; a quantized weight keeps "
                                     f"its own (quantize the float weight again to change it)")
        self._setup(w_or_qw, bias, activations, epilogue)

    _SETTINGS = ("weight", "bias", "activations", "epilogue")

    def _setup(self, weight, bias, activations, epilogue):
        """Checks the settings and prepares the kernel call (again when one of them changes)."""
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"weight: expected a QuantizedWeight, got {type(weight).__name__}")
        # every check and the plan first: a refused setting leaves the layer as it was
        epilogue = _check_epilogue(epilogue)
        activations = _check_activations(activations, weight.format)
        bias = _held(_check_bias(bias, weight.shape[0]))
        kernel_bias = _kernel_bias(weight, bias, activations)
        kernel_bias = bias if kernel_bias is bias else _held(kernel_bias)
        plan = _plan(weight, kernel_bias, activations, epilogue)
        self.__dict__.update(epilogue=epilogue, weight=weight, activations=activations,
                             bias=bias, _bias=kernel_bias, _plan=plan)

    def __setattr__(self, name, value):
        if name not in self._SETTINGS:
            return object.__setattr__(self, name, value)
        settings = {s: getattr(self, s) for s in self._SETTINGS}
        settings[name] = value
        self._setup(*settings.values())

    def __getstate__(self):  # pickle / deepcopy: the settings; the kernel call is made again
        return {s: getattr(self, s) for s in self._SETTINGS}

    def __setstate__(self, state):
        self._setup(*(state[s] for s in self._SETTINGS))

    @property
    def in_features(self) -> int:
        """K, the length of an input row."""
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        """N, the length of an output row."""
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        """The weight's bytes plus the bias's (and the kernel's bias, when a static zero point
        gives it a term of its own)."""
        biases = {id(b): b.nbytes for b in (self.bias, self._bias) if b is not None}
        return self.weight.nbytes + sum(biases.values())

    def __call__(self, x, out=None) -> np.ndarray:
        y = self._plan(x, out)  # float32 inputs as they are: straight to the kernel
        return y if y is not None else _forward_converted(self._plan, self.weight, x, out, self._bias)

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.weight.bits}, activations={self.activations!r}, "
                f"epilogue={self.epilogue!r}, nbytes={self.nbytes})")


def matmul(x, qw: QuantizedWeight, bias=None, activations="int8", out=None,
           epilogue=None) -> np.ndarray:
    """``x @ qw.dequantize().T + bias`` on the quantized kernels (the functional ``Linear``)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"matmul: expected a QuantizedWeight, got {type(qw).__name__}")
    activations = _check_activations(activations, qw.format)
    bias = _kernel_bias(qw, _check_bias(bias, qw.shape[0]), activations)
    return _forward(_plan(qw, bias, activations, _check_epilogue(epilogue)), qw, x, out, bias)


class FusedLinear:
    """Several linear layers on the same input, outputs side by side: ``y = [x @ W_1.T | x @ W_2.T
    | ...]`` (fused Q / K / V or gate / up projections). Consecutive weights that share a format
    run as one kernel call on their rows stacked (:func:`lowbit.concat_rows`); GGUF mixes that give
    one projection another type (Q4_K_M's attn_v in Q8_0 beside Q5_0 attn_q / attn_k) run as
    one call per run of equal formats. ``activations`` as for :class:`Linear`."""

    def __init__(self, weights, *, activations="int8"):
        from .quantize import concat_rows

        weights = list(weights)
        if not weights or not all(isinstance(w, QuantizedWeight) for w in weights):
            raise TypeError("FusedLinear: expected a non-empty sequence of QuantizedWeight")
        k = weights[0].shape[1]
        for i, w in enumerate(weights):
            if w.shape[1] != k:
                raise ValueError(f"FusedLinear: every weight must take the same inputs; weight "
                                 f"{i} has in_features {w.shape[1]}, weight 0 has {k}")
        runs = [[weights[0]]]
        for w in weights[1:]:
            try:
                concat_rows(runs[-1] + [w])
                runs[-1].append(w)
            except ValueError:  # another format or layout: a call of its own
                runs.append([w])
        self.layers = [Linear(concat_rows(r) if len(r) > 1 else r[0], activations=activations)
                       for r in runs]
        self.out_features = sum(w.shape[0] for w in weights)
        self.in_features = weights[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def __call__(self, x) -> np.ndarray:
        if len(self.layers) == 1:
            return self.layers[0](x)
        shape = np.shape(x)
        if len(shape) == 2 and shape[0] == 1:  # one row: each call writes its columns in place
            y = np.empty((1, self.out_features), np.float32)
            ends = np.cumsum([0] + [layer.out_features for layer in self.layers])
            columns = [y[:, a:b] for a, b in zip(ends, ends[1:])]  # (views made before any call:
            for layer, out in zip(self.layers, columns):  # recording makes y read-only after one)
                layer(x, out=out)
            return y
        return np.concatenate([layer(x) for layer in self.layers], axis=-1)

    def __repr__(self):
        return (f"FusedLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"calls={len(self.layers)}, nbytes={self.nbytes})")
