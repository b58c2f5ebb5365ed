"""lowbit files: quantized weights and arrays in the safetensors format.

A file is a valid safetensors file (any safetensors reader opens it). A QuantizedWeight ``name`` is
stored as the arrays the kernels read, already packed (``name:packed``, ``name:scales`` and, as
present, ``name:comp``, ``name:mins``, ``name:zeros``, ``name:perm``, ``name:in_scale``), and described in the header's
``__metadata__["lowbit"]``: a JSON object with the format version and, per weight, its shape,
bits, group size, symmetry and layout. ``load`` memory-maps the file and hands back weights that
run at once, without re-packing; ``save`` writes a temporary file beside the target and renames
it into place, so an error or interrupt never leaves a partial file.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile

import numpy as np

from .errors import FormatError
from .formats import BLOCK_FORMATS, PARTS as BLOCK_PARTS
from .quantize import QuantizedWeight

FORMAT_VERSION = 3  # 3: block formats (GGUF K-quants, ...); 2: the in_scale part (AWQ)
_READS = (1, 2, 3)
LAYOUT = "panel16"  # kernels.h: 16-column panels; bump FORMAT_VERSION if it ever changes
_INT_PARTS = ("packed", "scales", "comp", "mins", "zeros", "perm", "in_scale")  # int8 / int4
_PARTS = _INT_PARTS + BLOCK_PARTS
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20


def save(path, tensors: dict) -> None:
    """Writes ``{name: QuantizedWeight | np.ndarray}`` to `path` (see the module docstring)."""
    arrays, described = {}, {}
    for name, t in tensors.items():
        if not isinstance(name, str) or ":" in name or name == "__metadata__":
            raise ValueError(f"tensor names must be strings without ':', got {name!r}")
        if isinstance(t, QuantizedWeight) and t._parts is not None:
            described[name] = {"shape": list(t.shape), "format": t.format, "layout": LAYOUT}
            arrays.update({f"{name}:{part}": a for part, a in t._parts.items()})
        elif isinstance(t, QuantizedWeight):
            described[name] = {"shape": list(t.shape), "bits": t.bits, "group_size": t.group_size,
                               "symmetric": t.symmetric, "layout": LAYOUT}
            for part in _INT_PARTS:
                a = getattr(t, "_" + part)
                if a is not None:
                    arrays[f"{name}:{part}"] = a.astype(np.int64) if part == "perm" else a
        else:
            a = np.asarray(t)
            if a.dtype.newbyteorder("<") not in _CODES:
                raise TypeError(f"{name}: dtype {a.dtype} cannot be stored (numeric or bool only)")
            arrays[name] = a
    # largest items first: every tensor then starts at a multiple of its item size
    order = sorted(arrays, key=lambda k: -arrays[k].dtype.itemsize)
    header, offset = {}, 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _CODES[a.dtype.newbyteorder("<")], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {"lowbit": json.dumps({"version": FORMAT_VERSION, "weights": described})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 64)  # data starts 64-byte aligned
    target = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)), suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name in order:
                f.write(np.ascontiguousarray(arrays[name], arrays[name].dtype.newbyteorder("<")).data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path) -> dict:
    """Reads a file written by :func:`save` (or any safetensors file of numeric arrays):
    ``{name: QuantizedWeight | np.ndarray}``, every array a read-only view of a memory map of the
    file (BF16 tensors, which numpy lacks, come back as float32 copies). A truncated or inconsistent file raises :class:`lowbit.FormatError`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FormatError(f"{path}: {size} bytes, too short for a safetensors header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > min(size - 8, _MAX_HEADER):
        raise FormatError(f"{path}: header of {n} bytes does not fit in the {size}-byte file")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise FormatError(f"{path}: header is not a JSON object ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    arrays = {name: _view(buf, 8 + n, size, name, info) for name, info in header.items()}
    described = {}
    if isinstance(meta, dict) and "lowbit" in meta:
        try:
            lowbit = json.loads(meta["lowbit"])
            version, described = lowbit["version"], lowbit["weights"]
        except (ValueError, TypeError, KeyError):
            raise FormatError(f"{path}: unreadable lowbit metadata") from None
        if version not in _READS:
            raise FormatError(f"{path}: lowbit format version {version}; this lowbit reads "
                              f"versions {list(_READS)}")
    out = {}
    for name, d in described.items():
        parts = {p: arrays.pop(f"{name}:{p}", None) for p in _PARTS}
        if version == 1 and parts["in_scale"] is not None:
            raise FormatError(f"{path}: weight {name!r}: in_scale in a version 1 file")
        if isinstance(d, dict) and "format" in d:
            out[name] = _block_weight(path, name, d, parts, version)
        else:
            out[name] = _weight(path, name, d, parts)
    out.update(arrays)
    return out


def _view(buf, start, size, name, info):
    """The tensor `name` as a read-only array on `buf`, its header entry checked against the file."""
    bf16 = isinstance(info, dict) and info.get("dtype") == "BF16"
    try:
        dtype = np.dtype("<u2" if bf16 else _DTYPES[info["dtype"]])
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"tensor {name!r}: bad header entry {info!r} (dtype one of "
                          f"{sorted(_DTYPES)}, shape, data_offsets)") from None
    count = 1
    for s in shape:
        if s < 0:
            raise FormatError(f"tensor {name!r}: negative dimension in shape {shape}")
        count *= s
    if not 0 <= begin <= end <= size - start or end - begin != count * dtype.itemsize:
        raise FormatError(f"tensor {name!r}: {dtype} {shape} does not match bytes [{begin}, {end}) "
                          f"of the {size - start}-byte data section")
    a = np.frombuffer(buf, dtype, count, start + begin).reshape(shape)
    return (a.astype(np.uint32) << 16).view(np.float32) if bf16 else a


def _weight(path, name, d, parts):
    """A QuantizedWeight from its stored parts, each checked against the shapes the kernels read."""
    try:
        (n, k), bits, group, sym = d["shape"], d["bits"], d["group_size"], d["symmetric"]
        layout = d["layout"]
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: weight {name!r}: incomplete description {d!r}") from None
    if layout != LAYOUT or bits not in (4, 8) or not (isinstance(n, int) and isinstance(k, int)
                                                      and n > 0 and k > 0):
        raise FormatError(f"{path}: weight {name!r}: unsupported description {d!r}")
    if group is not None and (not isinstance(group, int) or group <= 0 or group % 32 or k % group):
        raise FormatError(f"{path}: weight {name!r}: bad group size {group!r}")
    np_ = -(-n // 16) * 16
    if bits == 8:
        kp = k if group else -(-k // 4) * 4
        g = kp // (group or kp)
        expect = {"packed": ((np_, kp), np.int8), "scales": ((g, np_), np.float32),
                  "comp": ((g, np_), np.int32)}
    else:
        kp = k if group else -(-k // 32) * 32
        g = kp // (group or kp)
        expect = {"packed": ((np_, kp // 2), np.uint8), "scales": ((np_ // 16, g, 16), np.float16)}
        if parts["mins"] is not None:
            expect["mins"] = ((np_ // 16, g, 16), np.float16)
        if parts["zeros"] is not None:
            expect["zeros"] = ((np_ // 16, g, 16), np.uint8)
    if parts["perm"] is not None:
        expect["perm"] = ((k,), np.int64)
    if parts["in_scale"] is not None:
        expect["in_scale"] = ((k,), np.float32)
    for part in _PARTS:
        a = parts[part]
        if part not in expect:
            if a is not None:
                raise FormatError(f"{path}: weight {name!r}: unexpected part {part!r}")
            continue
        shape, dtype = expect[part]
        if a is None or a.shape != shape or a.dtype != dtype:
            got = "missing" if a is None else f"{a.dtype} {a.shape}"
            raise FormatError(f"{path}: weight {name!r}: {part} should be {np.dtype(dtype)} "
                              f"{shape}, got {got}")
    if (bits == 8 and sym is not True or bits == 4 and
            sum(parts[p] is not None for p in ("mins", "zeros")) + bool(sym) != 1):
        raise FormatError(f"{path}: weight {name!r}: 8-bit weights are symmetric; 4-bit ones are "
                          f"symmetric or have mins or zeros")
    perm, in_scale = parts["perm"], parts["in_scale"]
    if perm is not None and not np.array_equal(np.sort(perm), np.arange(k)):
        raise FormatError(f"{path}: weight {name!r}: perm is not a permutation of range({k})")
    if in_scale is not None and not (np.isfinite(in_scale) & (in_scale > 0)).all():
        raise FormatError(f"{path}: weight {name!r}: in_scale must be positive and finite")
    return QuantizedWeight((n, k), bits, group, bool(sym), parts["packed"], parts["scales"],
                           comp=parts["comp"], mins=parts["mins"], zeros=parts["zeros"],
                           perm=None if perm is None else perm.astype(np.intp), in_scale=in_scale)


def _block_weight(path, name, d, parts, version):
    """A block-format QuantizedWeight from its stored parts, checked against its descriptor."""
    fmt, shape = d.get("format"), d.get("shape")
    if (version < 3 or fmt not in BLOCK_FORMATS or d.get("layout") != LAYOUT or
            not (isinstance(shape, list) and len(shape) == 2 and
                 all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape))):
        raise FormatError(f"{path}: weight {name!r}: unsupported description {d!r}")
    try:
        return QuantizedWeight.from_blocks(fmt, shape, {p: a for p, a in parts.items() if a is not None})
    except ValueError as e:
        raise FormatError(f"{path}: weight {name!r}: {e}") from None


def release_pages(a):
    """Lets the kernel drop the pages of `a` when it is a view of a memory-mapped file read once
    (a GGUF tensor once repacked, the input of lowbit quantize): resident memory then holds about
    one input tensor at a time. Safe for other views of the map: dropped pages of a read-only
    file mapping are read back from the file if touched again."""
    base = a
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    if not isinstance(base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or not a.nbytes:
        return
    start = np.frombuffer(base, np.uint8, 1).ctypes.data
    lo = (a.ctypes.data - start) // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(len(base), a.ctypes.data - start + a.nbytes)
    base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
