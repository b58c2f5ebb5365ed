"""GGUF files (llama.cpp's format): key/value metadata and tensors, read memory-mapped.

Every count, size and offset in the header is checked against the file before it is used, so a
truncated or lying file raises :class:`lowbit.FormatError` instead of reading past its end or
allocating what the header claims.
"""
from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from . import _core
from .errors import FormatError
from .formats import BLOCK_FORMATS
from .io import release_pages
from .quantize import QuantizedWeight

# GGUF value types: struct formats of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}

# ggml tensor types by number (names as llama.cpp spells them), with (elements, bytes) per block
# so that every tensor's extent is checked, read or not. The block formats' rows come from their
# descriptors (lowbit.formats); the rest are read as lowbit's int4 / int8 layouts or as arrays.
# Types newer than this table take their sizes from the gguf package where it is installed.
_GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
               9: ("Q8_1", 32, 40), 15: ("Q8_K", 256, 292),
               16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
               19: ("IQ1_S", 256, 50), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
               24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
               28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
               35: ("TQ2_0", 256, 66)}
_GGML_TYPES.update({f.ggml_type: (f.name, f.block, f.bytes) for f in BLOCK_FORMATS.values()})
_ARRAYS = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4",
           "I64": "<i8"}
# the quantized types that become QuantizedWeights
READ = ("Q4_0", "Q4_1") + tuple(BLOCK_FORMATS)
_MAX_DEPTH = 4  # arrays of arrays
# Metadata arrays cost Python objects, not just bytes: a list of 100M u8 values (a 100 MB file)
# took ~600 MB and 2M empty nested arrays (24 MB) seconds to build. Scalar arrays longer than
# _LIST_ITEMS come back as read-only numpy views of the file; strings in arrays (a vocabulary
# and its merges: up to ~10^6) and arrays in arrays are bounded over the whole file.
_LIST_ITEMS = 1024
_MAX_STRINGS = 1 << 22
_MAX_NESTED = 1 << 16


class _Cursor:
    """Little-endian reads from a buffer, each checked against its end."""

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0
        self.left = {_STRING: _MAX_STRINGS, _ARRAY: _MAX_NESTED}  # items in arrays, file-wide

    def take(self, n: int) -> int:
        """Reserves n bytes, returns where they start."""
        at = self.pos
        if n < 0 or at + n > len(self.buf):
            raise FormatError(f"GGUF file truncated: {n} bytes needed at offset {at}, "
                              f"the file has {len(self.buf)}")
        self.pos = at + n
        return at

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.buf, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        at = self.take(n)
        try:
            return bytes(self.buf[at:at + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"GGUF string at offset {at} is not UTF-8") from None

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY or depth >= _MAX_DEPTH:
            raise FormatError(f"GGUF value type {vtype} at offset {self.pos} is not a known type")
        itype, count = self.scalar("<I"), self.scalar("<Q")
        if itype in _SCALARS:
            dt = np.dtype(_NUMPY[itype])
            values = np.frombuffer(self.buf, dt, count, self.take(count * dt.itemsize))
            if count <= _LIST_ITEMS:
                return values.tolist()
            if itype == 7:  # bools as numpy reads them: any byte but 0 is True
                values = values.view(np.uint8) != 0
            values.flags.writeable = False
            return values
        # strings and arrays take at least 8 bytes each: refuse counts the file cannot hold
        if count * 8 > len(self.buf) - self.pos:
            raise FormatError(f"GGUF array of {count} items at offset {self.pos} exceeds the file")
        if itype in self.left:
            self.left[itype] -= count
            if self.left[itype] < 0:
                what = ("strings in arrays", _MAX_STRINGS) if itype == _STRING else \
                    ("arrays in arrays", _MAX_NESTED)
                raise FormatError(f"GGUF metadata holds more than {what[1]} {what[0]} (at offset "
                                  f"{self.pos}); lowbit reads at most that many")
        return [self.value(itype, depth + 1) for _ in range(count)]


class _File:
    """A parsed GGUF header over a read-only memory map of the file."""

    def __init__(self, path):
        with open(os.fspath(path), "rb") as f:
            try:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise FormatError(f"{os.fspath(path)}: empty file, not GGUF") from None
        c = _Cursor(self.map)
        if len(self.map) < 4 or self.map[:4] != b"GGUF":
            raise FormatError(f"{os.fspath(path)}: not a GGUF file (no GGUF magic)")
        c.take(4)
        version = c.scalar("<I")
        if version not in (2, 3):
            raise FormatError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        # every key/value takes >= 12 bytes and every tensor info >= 24: check before looping
        if n_kv * 12 + n_tensors * 24 > len(self.map):
            raise FormatError(f"GGUF header claims {n_tensors} tensors and {n_kv} values, more "
                              f"than a {len(self.map)}-byte file can hold")
        self.metadata = {}
        for _ in range(n_kv):
            key = c.string()
            if key in self.metadata:  # (llama.cpp's reader refuses it too)
                raise FormatError(f"GGUF metadata key {key!r} appears twice")
            self.metadata[key] = c.value(c.scalar("<I"))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise FormatError(f"GGUF general.alignment must be a power of two, got {align!r}")
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.scalar("<I")
            if not 1 <= n_dims <= 4:
                raise FormatError(f"GGUF tensor {name!r}: {n_dims} dimensions (1 to 4 expected)")
            dims = [c.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, c.scalar("<I"), c.scalar("<Q")))
        data = -(-c.pos // align) * align
        self.tensors = {}
        for name, dims, ttype, offset in infos:
            type_name, *sizes = _GGML_TYPES.get(ttype) or _newer_type(ttype) or (f"number {ttype}",)
            count = int(np.prod(dims, dtype=object))
            # numpy's limit is on bytes, 8 per element at most: an empty tensor with huge other
            # dimensions must not become an array either (F64 / I64 views of 2^60 elements)
            if int(np.prod([d for d in dims if d], dtype=object)) >= 1 << 59:
                raise FormatError(f"GGUF tensor {name!r}: dimensions {list(dims)} beyond any array")
            nbytes = None  # a type neither lowbit nor the gguf package knows: its extent is not
            if sizes:        # known, and only load_gguf(..., unsupported="skip") reads the file
                block, size = sizes
                if dims[0] % block:
                    raise FormatError(f"GGUF tensor {name!r}: rows of {dims[0]} are not whole "
                                      f"{type_name} blocks of {block}")
                nbytes = count // block * size
                if offset % align or data + offset + nbytes > len(self.map):
                    raise FormatError(f"GGUF tensor {name!r}: {nbytes} bytes at offset {offset} "
                                      f"lie outside the {len(self.map)}-byte file or off alignment")
            if name in self.tensors:
                raise FormatError(f"GGUF tensor {name!r} appears twice")
            # numpy order: the last GGUF dimension first
            self.tensors[name] = (type_name, tuple(reversed(dims)), data + offset, nbytes)

    def raw(self, name):
        """(type name, numpy shape, uint8 rows of the tensor's bytes: a view of the file)."""
        type_name, shape, at, nbytes = self.tensors[name]
        if nbytes is None:
            raise FormatError(f"GGUF tensor {name!r} has ggml type {type_name}, unknown to lowbit "
                              f"and to the gguf package{'' if _gguf_tables() else ' (not installed)'}; "
                              f"load_gguf(..., unsupported='skip') leaves it out")
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        raw = np.frombuffer(self.map, np.uint8, nbytes, at)
        return type_name, shape, raw.reshape(rows, nbytes // rows if rows else 0)


def _gguf_tables():
    """The gguf package's type enum and (elements, bytes) per block, or None without it."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        return None
    return GGMLQuantizationType, GGML_QUANT_SIZES


def _newer_type(ttype):
    """(name, elements, bytes) per block of a ggml type newer than lowbit's table, from the gguf
    package where it is installed and knows the type (its reference dequantizer then reads it)."""
    tables = _gguf_tables()
    if tables is None:
        return None
    types, sizes = tables
    try:
        qtype = types(ttype)
        return (qtype.name, *sizes[qtype])
    except (ValueError, KeyError):
        return None


def gguf_metadata(path) -> dict:
    """The key/value metadata of a GGUF file (architecture, sizes, tokenizer, ...) as plain Python
    values: ints, floats, bools, strings and lists of them, except arrays of more than 1024
    numbers or bools, which come back as read-only numpy arrays (views of the file: a token-type
    or score table costs no Python object per value). At most 4M strings and 64K nested arrays in
    arrays are read; a file with more raises :class:`lowbit.FormatError`."""
    return _File(path).metadata


UNSUPPORTED = ("raise", "dequantize", "skip")


def load_gguf(path, *, unsupported: str = "raise") -> dict:
    """Tensors of a GGUF file by name, read from a memory map of the file.

    Quantized matrices of the types in ``READ`` become :class:`QuantizedWeight` s that run on
    lowbit's kernels: Q4_0 and Q4_1 as lowbit's int4 weights (group size 32), every other one
    (Q8_0, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4) in its block format
    (``lowbit.formats``), repacked once into the kernels' layout at about its size in the file,
    run with int8 activations per block of 32 (as llama.cpp runs them) or float ones.
    ``qw.dequantize()`` equals the gguf package's reference dequantization bit for bit. F32, F16
    and the integer types come back as read-only arrays viewing the file, BF16 as float32 arrays.

    Any other type (IQ2_XXS, TQ1_0, ..., and types newer than lowbit) raises
    :class:`lowbit.FormatError` naming the tensor, its type and the types read;
    ``unsupported="dequantize"`` gives such tensors as float32 arrays instead (through the ``gguf``
    package's reference dequantizer, which must be installed and know the type), and
    ``unsupported="skip"`` leaves them out. So do quantized tensors of a type read that are not
    matrices the kernels run (stacks of experts' matrices, vectors, rows of more than
    ``lowbit._core.MAX_K`` inputs), dequantized by lowbit itself.
    """
    if unsupported not in UNSUPPORTED:
        raise ValueError(f"unsupported must be one of {list(UNSUPPORTED)}, got {unsupported!r}")
    f = _File(path)
    out = {}
    for name in f.tensors:
        if f.tensors[name][3] is None and unsupported == "skip":  # a type nobody here knows
            continue
        type_name, shape, raw = f.raw(name)
        if type_name in _ARRAYS:
            out[name] = raw.reshape(-1).view(_ARRAYS[type_name]).reshape(shape)
        elif type_name == "BF16":
            bits = raw.reshape(-1).view("<u2").astype(np.uint32) << 16
            out[name] = bits.view(np.float32).reshape(shape)
        elif type_name not in READ:
            if unsupported == "raise":
                raise FormatError(f"GGUF tensor {name!r} has type {type_name}, which lowbit does not "
                                  f"read (it reads F32, F16, BF16, {', '.join(READ)}); "
                                  f"load_gguf(..., unsupported='dequantize') gives it as float32")
            if unsupported == "dequantize":
                out[name] = _reference_dequantize(name, type_name, raw, shape)
        elif len(shape) == 2 and 0 not in shape and shape[1] <= _core.MAX_K:
            out[name] = weight_from_blocks(type_name, raw, shape[1])
        else:  # a stack of matrices (MoE experts), a vector, or rows longer than the kernels take
            if unsupported == "raise":
                why = (f"rows of {shape[-1]} inputs, more than the kernels' {_core.MAX_K}"
                       if len(shape) == 2 and 0 not in shape else f"shape {shape}")
                raise FormatError(f"GGUF tensor {name!r}: {type_name} of {why}: lowbit runs "
                                  f"non-empty 2-D matrices of at most {_core.MAX_K} inputs; "
                                  f"load_gguf(..., unsupported='dequantize') gives it as float32, "
                                  f"'skip' leaves it out")
            if unsupported == "dequantize":
                out[name] = _dequantized(type_name, raw, shape)
    return out


def _dequantized(type_name, raw, shape) -> np.ndarray:
    """float32 values (of `shape`) of GGUF rows `raw` of a type in ``READ``, bit for bit as
    QuantizedWeight.dequantize gives them: rows longer than the kernels take are cut into pieces
    of whole blocks (each block carries its own scales)."""
    if 0 in shape:
        return np.zeros(shape, np.float32)
    k = shape[-1]
    block = BLOCK_FORMATS[type_name].block if type_name in BLOCK_FORMATS else 32
    piece = max(p for p in range(block, min(k, _core.MAX_K) + 1, block) if k % p == 0)
    rows = raw.reshape(-1, raw.shape[1] * piece // k)
    return weight_from_blocks(type_name, rows, piece).dequantize().reshape(shape)


def weight_from_blocks(type_name, raw, k, chunk_bytes=16 << 20) -> QuantizedWeight:
    """The QuantizedWeight of GGUF rows `raw` (uint8 (N, bytes per row), one file row per weight
    row of K inputs) of a type in ``READ``. Block formats are repacked ~16 MB at a time, each
    chunk's file pages released once read (when `raw` views a memory map): loading holds about the
    weight plus one chunk, not two copies."""
    n = raw.shape[0]
    if type_name in ("Q4_0", "Q4_1"):
        packed, scales, mins = _core.gguf_q4(raw, k, type_name == "Q4_1")
        release_pages(raw)
        return QuantizedWeight((n, k), 4, 32 if k > 32 else None, mins is None, packed, scales,
                               mins=mins)
    fmt = BLOCK_FORMATS[type_name].index
    parts = _core.blk_zeros(fmt, n, k)
    step = max(16, chunk_bytes // max(raw.shape[1], 1) // 16 * 16)
    for r0 in range(0, n, step):
        _core.gguf_blocks(fmt, raw[r0:r0 + step], n, k, parts, r0)
        release_pages(raw[r0:r0 + step])
    return QuantizedWeight.from_blocks(type_name, (n, k), parts)


def _reference_dequantize(name, type_name, raw, shape):
    """float32 values of a tensor of a type lowbit does not run, by the gguf package."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise FormatError(f"GGUF tensor {name!r} has type {type_name}: dequantizing it needs the "
                          f"gguf package (pip install gguf)") from None
    try:
        qtype = GGMLQuantizationType[type_name]
        return dequantize(np.asarray(raw), qtype).astype(np.float32).reshape(shape)
    except (KeyError, NotImplementedError, ValueError) as e:
        raise FormatError(f"GGUF tensor {name!r}: the gguf package cannot dequantize {type_name} "
                          f"({e})") from None
