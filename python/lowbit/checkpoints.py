"""GPTQ and AWQ 4-bit checkpoints (the transformers-world layouts) as lowbit weights.

Both store ``W[n, k] = s * (q - z)`` per group of inputs, with int32 words packing eight 4-bit
values, float16 scales and packed integer zero points:

* GPTQ (AutoGPTQ v1): ``qweight`` int32 [K/8, N], bits 4j..4j+3 of row r hold input k = 8r + j;
  ``qzeros`` int32 [K/G, N/8] packed along N, storing z - 1; ``scales`` float16 [K/G, N];
  optional ``g_idx`` int32 [K], the group of each input (act-order). lowbit sorts the inputs by
  group once, at load, so every group is contiguous for the kernels, and gathers each layer's
  inputs in that order. GPTQModel's v2 (``"checkpoint_format": "gptq_v2"`` in the config) is the
  same but for ``qzeros``, which store z itself.
* AWQ (GEMM): ``qweight`` int32 [K, N/8] packed along N, nibble i of word c holding column
  8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; ``qzeros`` int32 [K/G, N/8] in the same order, storing z;
  ``scales`` float16 [K/G, N].

The result keeps the integer zero points, so ``dequantize()`` is exactly ``s * (q - z)`` computed
in float32 and the kernels multiply by those same weights. Files are read by lowbit's own
safetensors reader (lowbit.io: strict header checks, BF16 tensors as float32); anything a layer's
tensors cannot be, empty or with scales beyond float16, raises :class:`lowbit.FormatError`.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .errors import FormatError
from .quantize import QuantizedWeight

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format: what qzeros add to z


def _int32_matrix(a, what):
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype not in (np.int32, np.uint32):
        raise FormatError(f"{what}: expected a 2-D int32 array, got {a.dtype} of shape {a.shape}")
    return a.view(np.uint32)


def _nibbles(words, order=tuple(range(8))):
    """uint32 [R, C] -> uint8 [R, C * 8]: nibble i of word c goes to position 8c + order[i]."""
    out = np.empty(words.shape + (8,), np.uint8)
    for i, pos in enumerate(order):
        out[..., pos] = (words >> np.uint32(4 * i)) & np.uint32(0xF)
    return out.reshape(words.shape[0], words.shape[1] * 8)


def _scales(scales, groups, n, what):
    s = np.asarray(scales)
    if s.shape != (groups, n) or s.dtype.kind != "f":
        raise FormatError(f"{what}: expected float scales of shape ({groups}, {n}), got {s.dtype} "
                          f"of shape {s.shape}")
    return s.T


def _layer(q, d, **kwargs) -> QuantizedWeight:
    """The 4-bit weight of integers q (N, K) and scales d (N, groups); what from_int refuses (an
    empty layer, scales beyond float16, zero points beyond a byte) is the checkpoint's fault."""
    if 0 in q.shape:
        raise FormatError(f"an empty layer: N={q.shape[0]}, K={q.shape[1]}")
    try:
        return QuantizedWeight.from_int(q, d, bits=4, **kwargs)
    except ValueError as e:
        raise FormatError(str(e)) from None


def _group_size(k, groups):
    if groups < 1 or k % groups:
        raise FormatError(f"scales have {groups} groups, which do not divide K={k}")
    group = k // groups
    if groups > 1 and group % 32:
        raise FormatError(f"group size {group} is not supported: lowbit's 4-bit kernels take "
                          f"groups of a multiple of 32 (or one per channel)")
    return None if groups == 1 else group


def _check_qzeros(qz, groups, n, kind):
    if qz.shape[1] * 8 != n:
        bits = 32 * qz.shape[1] // n if n and 32 * qz.shape[1] % n == 0 else None
        other = f" (as {bits}-bit {kind} packs them)" if bits else ""
        raise FormatError(f"qzeros: expected shape ({groups}, {n // 8}) for N={n} of 4-bit {kind}, "
                          f"got {qz.shape}{other}; lowbit reads 4-bit {kind}")


def from_gptq(qweight, qzeros, scales, g_idx=None, *, bits=4, checkpoint_format="gptq") -> QuantizedWeight:
    """A :class:`QuantizedWeight` from one GPTQ layer's tensors; see the module docstring for the
    layout. Only 4-bit GPTQ is read. checkpoint_format: "gptq" (v1: qzeros store z - 1) or
    "gptq_v2" (they store z), as the checkpoint's quantization config names it."""
    if bits != 4:
        raise FormatError(f"GPTQ with {bits} bits is not supported; lowbit reads 4-bit GPTQ")
    if checkpoint_format not in _GPTQ_FORMATS:
        raise FormatError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; lowbit "
                          f"reads {' and '.join(map(repr, _GPTQ_FORMATS))}")
    qw = _int32_matrix(qweight, "qweight")
    qz = _int32_matrix(qzeros, "qzeros")
    k, n = qw.shape[0] * 8, qw.shape[1]
    groups = qz.shape[0]
    _check_qzeros(qz, groups, n, "GPTQ")
    d = _scales(scales, groups, n, "scales")
    q = _nibbles(qw.T)                                # [K/8, N] -> (N, K)
    z = _nibbles(qz).T.astype(np.int16) + _GPTQ_FORMATS[checkpoint_format]  # stored z - 1 (v1)
    group = _group_size(k, groups)
    perm = None
    if g_idx is not None and k:
        g = np.asarray(g_idx)
        if g.shape != (k,) or g.dtype.kind not in "iu" or g.min() < 0 or g.max() >= groups:
            raise FormatError(f"g_idx: expected {k} group numbers in 0..{groups - 1}")
        if not np.array_equal(g, np.arange(k) // (group or k)):
            if np.any(np.bincount(g, minlength=groups) != k // groups):
                raise FormatError(f"g_idx: every group must hold {k // groups} inputs")
            perm = np.argsort(g, kind="stable")
            q = np.ascontiguousarray(q[:, perm])
    return _layer(q, d, group_size=group, zeros=z, perm=perm)


def from_awq(qweight, qzeros, scales) -> QuantizedWeight:
    """A :class:`QuantizedWeight` from one AWQ (GEMM layout) layer's tensors; see the module
    docstring for the layout."""
    qw = _int32_matrix(qweight, "qweight")
    qz = _int32_matrix(qzeros, "qzeros")
    k, n = qw.shape[0], qw.shape[1] * 8
    groups = qz.shape[0]
    _check_qzeros(qz, groups, n, "AWQ")
    d = _scales(scales, groups, n, "scales")
    q = np.ascontiguousarray(_nibbles(qw, _AWQ_ORDER).T)
    z = _nibbles(qz, _AWQ_ORDER).T
    return _layer(q, d, group_size=_group_size(k, groups), zeros=z)


def _tensors(source) -> dict:
    """A dict of arrays, or the tensors of a .safetensors file or of every one in a directory
    (memory-mapped; BF16 tensors, as exports store embeddings, norms and heads, as float32)."""
    from .io import _read

    if isinstance(source, dict):
        return source
    path = os.fspath(source)
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
             if os.path.isdir(path) else [path])
    if not files:
        raise FormatError(f"{path}: no .safetensors files")
    out = {}
    for f in files:
        tensors, _ = _read(f)
        for name in tensors.keys() & out.keys():
            raise FormatError(f"{f}: tensor {name!r} is also in another file of {path}")
        out.update(tensors)
    return out


def _config(source) -> dict:
    """The quantization config beside a checkpoint (quantize_config.json, quant_config.json, or
    config.json's quantization_config, in its directory or the file's), or {}."""
    if isinstance(source, dict):
        return {}
    folder = os.fspath(source)
    folder = folder if os.path.isdir(folder) else os.path.dirname(folder) or "."
    for name, key in (("quantize_config.json", None), ("quant_config.json", None),
                      ("config.json", "quantization_config")):
        try:
            with open(os.path.join(folder, name)) as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        config = config.get(key) if key and isinstance(config, dict) else config
        if isinstance(config, dict):
            return config
    return {}


def _check_config(source, method, accepted):
    """Refuses a checkpoint whose config names other bits, another method, or (a key of
    `accepted`) a value lowbit does not read; gives the config."""
    config = _config(source)
    bits = config.get("bits", config.get("w_bit"))  # (AutoAWQ's own name)
    bits = 4 if bits is None else bits
    try:
        bits = int(bits)
    except (TypeError, ValueError):
        pass
    if bits != 4:
        raise FormatError(f"{source}: {method.upper()} with {bits} bits is not supported; lowbit "
                          f"reads 4-bit {method.upper()}")
    quant_method = str(config.get("quant_method", method)).lower()
    if quant_method != method:
        raise FormatError(f"{source}: its config names quant_method {quant_method!r}, not {method!r}")
    if config.get("is_marlin_format"):  # (AutoGPTQ 0.6-0.7's name for Marlin's repacking)
        raise FormatError(f"{source}: a Marlin-format {method.upper()} checkpoint (is_marlin_format); "
                          f"lowbit reads the plain layout")
    for key, values in accepted.items():
        value = str(config.get(key, values[0])).lower()
        if value not in values:
            raise FormatError(f"{source}: {method.upper()} {key} {value!r} is not supported; lowbit "
                              f"reads {' and '.join(map(repr, values))}")
    return config


def _load(source, build, parts) -> dict:
    tensors = _tensors(source)
    out = {}
    used = set()
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        names = {p: f"{prefix}.{p}" for p in parts}
        missing = [p for p in ("qzeros", "scales") if names[p] not in tensors]
        if missing:
            raise FormatError(f"layer {prefix!r}: missing {', '.join(missing)}")
        args = {p: tensors[names[p]] for p in parts if names[p] in tensors}
        try:
            out[prefix] = build(**args)
        except FormatError as e:
            raise FormatError(f"layer {prefix!r}: {e}") from None
        used.update(names.values())
        used.add(key)
    out.update({k: v for k, v in tensors.items() if k not in used})
    return out


def load_gptq(source) -> dict:
    """Every layer of a 4-bit GPTQ checkpoint (a .safetensors file, a directory of them, or a dict
    of arrays) as a :class:`QuantizedWeight` under its prefix (``...q_proj``); the other tensors
    (biases, embeddings, norms) come back as arrays under their own names. The quantization config
    in the checkpoint's folder (quantize_config.json, quant_config.json, or config.json's
    quantization_config) is read: its checkpoint_format picks v1 ("gptq", the default) or v2
    ("gptq_v2"), and other bits, another quant_method or another checkpoint_format are refused."""
    config = _check_config(source, "gptq", {"checkpoint_format": tuple(_GPTQ_FORMATS)})
    fmt = str(config.get("checkpoint_format", "gptq")).lower()
    return _load(source, lambda qweight, qzeros, scales, g_idx=None: from_gptq(
        qweight, qzeros, scales, g_idx, checkpoint_format=fmt),
        ("qweight", "qzeros", "scales", "g_idx"))


def load_awq(source) -> dict:
    """Like :func:`load_gptq`, for AWQ (GEMM layout) checkpoints: a config naming other bits,
    another quant_method or a version of another layout (GEMV, Marlin) is refused; "gemm",
    "exllama" and "ipex" (kernels over the GEMM layout) are read."""
    _check_config(source, "awq", {"version": ("gemm", "exllama", "ipex")})  # (GEMM's layout, all)
    return _load(source, from_awq, ("qweight", "qzeros", "scales"))
