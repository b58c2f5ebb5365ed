"""lowbit files: quantized weights and arrays in the safetensors format.

A file is a valid safetensors file (any safetensors reader opens it). A QuantizedWeight ``name`` is
stored as the arrays the kernels read, already packed (``name:packed``, ``name:scales`` and, as
present, ``name:comp``, ``name:mins``, ``name:zeros``, ``name:perm``, ``name:in_scale``), and described in the header's
``__metadata__["lowbit"]``: a JSON object with the format version and, per weight, its shape,
bits, group size, symmetry and layout. ``load`` memory-maps the file and hands back weights that
run at once, without re-packing; ``save`` writes a temporary file beside the target and renames
it into place, so an error or interrupt never leaves a partial file.

A memory-mapped file must not change while its arrays are in use: overwritten in place (``cp``
onto it, a program writing into it), the loaded weights change with it; truncated, reading the
missing pages kills the process with SIGBUS. Replacing it through ``lb.save`` (or any write to a
new file renamed over it) is safe: the map keeps the old file's pages. ``load(path, mmap=False)``
reads the file into memory instead.
"""
from __future__ import annotations

import json
import mmap as _mmap
import os
import socket
import struct
import tempfile
from collections.abc import Mapping

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
_MAX_DIMS = 32
# Temporary files of save: ".lowbit-save-<host>-<pid>-<random>.partial" beside the target. A save
# killed (SIGKILL, power loss) leaves one; the next save into that folder removes those whose
# process, on this host, is gone.
_PARTIAL = ".lowbit-save-"


class BF16:
    """A bfloat16 tensor of a file, read as float32 when used (``np.asarray``), one at a time:
    what ``lowbit quantize`` holds of a BF16 checkpoint, whose float32 copies would take twice
    the file. ``bits`` is the file's uint16 view; :func:`save` writes it back as BF16."""

    __slots__ = ("bits",)
    dtype = np.dtype(np.float32)  # what it reads as

    def __init__(self, bits):
        self.bits = bits

    shape = property(lambda self: self.bits.shape)
    ndim = property(lambda self: self.bits.ndim)
    nbytes = property(lambda self: self.bits.nbytes)  # in the file

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a BF16 tensor reads as float32 only through a copy")
        a = (self.bits.astype(np.uint32) << 16).view(np.float32)
        return a if dtype is None else a.astype(dtype, copy=False)


def save(path, tensors: dict) -> None:
    """Writes ``{name: QuantizedWeight | np.ndarray}`` to `path` (see the module docstring).

    The file is written beside the target and renamed over it: readers see the old file or the
    new one, never part of one. A symbolic link is written through (its target is replaced, the
    link kept); an existing file keeps its permission bits, a new one gets the umask's. Temporary
    files that earlier saves killed mid-way left in that folder are removed.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors: expected a dict of name -> QuantizedWeight or numpy array, "
                        f"got {type(tensors).__name__}")
    arrays, described, bf16 = {}, {}, set()
    for name, t in tensors.items():
        if not isinstance(name, str) or ":" in name or name == "__metadata__":
            raise ValueError(f"tensor names must be strings without ':', got {name!r}")
        if isinstance(t, QuantizedWeight) and t._parts is not None:
            described[name] = {"shape": list(t.shape), "format": t.format, "layout": LAYOUT}
            arrays.update({f"{name}:{part}": a for part, a in t._parts.items()})
        elif isinstance(t, QuantizedWeight):
            for part in ("scales", "mins"):  # what load() would refuse is refused here, unwritten
                a = getattr(t, "_" + part)
                if a is not None and not np.isfinite(a).all():
                    raise ValueError(f"{name}: {part} hold NaN or Inf (a GGUF Q4_0 / Q4_1 file's "
                                     f"float16 fields, say); lowbit files keep finite ones only")
            described[name] = {"shape": list(t.shape), "bits": t.bits, "group_size": t.group_size,
                               "symmetric": t.symmetric, "layout": LAYOUT}
            for part in _INT_PARTS:
                a = getattr(t, "_" + part)
                if a is not None:
                    arrays[f"{name}:{part}"] = a.astype(np.int64) if part == "perm" else a
        elif isinstance(t, BF16):
            arrays[name] = t.bits
            bf16.add(name)
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
        header[name] = {"dtype": "BF16" if name in bf16 else _CODES[a.dtype.newbyteorder("<")],
                        "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {"lowbit": json.dumps({"version": FORMAT_VERSION, "weights": described})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 64)  # data starts 64-byte aligned
    target = os.path.realpath(os.fspath(path))  # through symbolic links: replace what they name
    folder = output_folder(path)
    _remove_stale_partials(folder)
    try:
        mode = os.stat(target).st_mode & 0o7777  # an existing file keeps its permissions
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # mkstemp makes files private; a new file gets a normal file's mode
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{_PARTIAL}{_host()}-{os.getpid()}-",
                               suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name in order:
                f.write(np.ascontiguousarray(arrays[name], arrays[name].dtype.newbyteorder("<")).data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def output_folder(path) -> str:
    """The folder a file written to `path` goes in (through symbolic links), or
    FileNotFoundError naming it when it does not exist: checked before work that ends in a save."""
    folder = os.path.dirname(os.path.realpath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{os.fspath(path)}: no folder {folder} to write it in")
    return folder


def _host():
    """This host's name as it may appear in a file name."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"


def _remove_stale_partials(folder):
    """Removes the temporary files of saves into `folder` whose process (on this host) is gone:
    what a save killed mid-way leaves behind. Other hosts' files (a shared folder) are left."""
    mine = f"{_PARTIAL}{_host()}-"
    try:
        names = [n for n in os.listdir(folder) if n.startswith(mine) and n.endswith(".partial")]
    except OSError:
        return
    for name in names:
        pid = name[len(mine):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass  # removed by another save meanwhile, or not ours to remove


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or not a pid we can ask about: leave its files
    return True


def load(path, mmap=True) -> dict:
    """Reads a file written by :func:`save` (or any safetensors file of numeric arrays):
    ``{name: QuantizedWeight | np.ndarray}``, every array read-only. BF16 tensors, which numpy
    lacks, come back as float32 copies; a tensor not aligned to its item size in the file as an
    aligned copy.

    mmap=True (the default) maps the file: the arrays view its pages, read when first used. The
    file must then not be changed in place while they are in use (see the module docstring);
    mmap=False reads the whole file into memory instead. A truncated, inconsistent or malformed
    file raises :class:`lowbit.FormatError`; the parts of each weight are checked against each
    other (column sums recomputed, padding zero, scales finite), one pass over its values."""
    return _load(path, mmap)


def _load(path, mmap=True, bf16=False, private=False):
    """load(); bf16=True gives BF16 tensors as :class:`BF16` (converted when used); private: the
    arrays writable, on a copy-on-write map (their writes never reach the file)."""
    path = os.fspath(path)
    tensors, meta = _read(path, mmap, bf16, private)
    described, version = {}, None
    if "lowbit" in meta:
        lowbit = _parse_json(meta["lowbit"], path, "lowbit metadata")
        try:
            version, described = lowbit["version"], lowbit["weights"]
        except (TypeError, KeyError):
            raise FormatError(f"{path}: lowbit metadata lacks version or weights") from None
        if isinstance(version, bool) or version not in _READS:
            raise FormatError(f"{path}: lowbit format version {version!r}; this lowbit reads "
                              f"versions {list(_READS)}")
        if not isinstance(described, dict):
            raise FormatError(f"{path}: lowbit metadata: weights should be an object, got "
                              f"{type(described).__name__}")
    out = {}
    for name, d in described.items():
        parts = {p: tensors.pop(f"{name}:{p}", None) for p in _PARTS}
        parts = {p: np.asarray(a) if isinstance(a, BF16) else a for p, a in parts.items()}
        if name in tensors:
            raise FormatError(f"{path}: {name!r} names both a weight and a tensor")
        if version == 1 and parts["in_scale"] is not None:
            raise FormatError(f"{path}: weight {name!r}: in_scale in a version 1 file")
        if isinstance(d, dict) and "format" in d:
            out[name] = _block_weight(path, name, d, parts, version)
        else:
            out[name] = _weight(path, name, d, parts)
    out.update(tensors)
    return out


def _read(path, use_mmap=True, bf16=False, private=False):
    """({name: array}, the header's __metadata__) of a safetensors file; every byte count,
    offset, shape and dtype of the header checked against the file, tensors' byte ranges tiling
    the data section (disjoint, no bytes outside a tensor), the JSON strict (no duplicate keys,
    NaN or Infinity; nesting bounded). Anything else raises FormatError. BF16 tensors come as
    float32 copies, or with bf16=True as :class:`BF16` views of the file. The arrays are
    read-only, or with private writable, on a copy-on-write map (or the read bytes)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FormatError(f"{path}: {size} bytes, too short for a safetensors header")
        if use_mmap:
            buf = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY if private else _mmap.ACCESS_READ)
        else:
            buf = np.empty(size, np.uint8)
            if f.readinto(buf.data) != size:
                raise FormatError(f"{path}: the file changed size while it was read")
            buf.flags.writeable = private
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > min(size - 8, _MAX_HEADER):
        what = ("; a zip archive (torch.save writes those: torch.load reads it)"
                if bytes(buf[:4]) == b"PK\x03\x04" else "")
        raise FormatError(f"{path}: not a safetensors or lowbit file: header of {n} bytes does not "
                          f"fit in the {size}-byte file{what}")
    header = _parse_json(bytes(buf[8:8 + n]), path, "header")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: __metadata__ should be an object, got {type(meta).__name__}")
    tensors, ranges = {}, []
    for name, info in header.items():
        try:
            tensors[name], begin, end = _view(buf, 8 + n, size, name, info, bf16, private)
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
        if end > begin:
            ranges.append((begin, end, name))
    # as the safetensors format requires: the tensors tile the data section, no overlap, no hole
    ranges.sort()
    at, last = 0, None
    for begin, end, name in ranges:
        if begin < at:
            raise FormatError(f"{path}: tensors {last!r} and {name!r} overlap in the file")
        if begin > at:
            raise FormatError(f"{path}: bytes [{at}, {begin}) of the data section belong to no tensor")
        at, last = end, name
    if at != size - 8 - n:
        raise FormatError(f"{path}: bytes [{at}, {size - 8 - n}) of the data section belong to no "
                          f"tensor")
    return tensors, meta


def _parse_json(text, path, what):
    """A JSON object, strictly: duplicate keys, NaN / Infinity and non-objects raise FormatError,
    and so does nesting deep enough to exhaust Python's recursion."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        if not isinstance(value, dict):
            raise ValueError(f"not an object but {type(value).__name__}")
    except RecursionError:
        raise FormatError(f"{path}: {what} nests too deeply to be a safetensors header") from None
    except (ValueError, TypeError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise FormatError(f"{path}: {what} is not a JSON object ({e})") from None
    return value


def _unique_keys(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _view(buf, start, size, name, info, lazy_bf16=False, writable=False):
    """(the tensor `name` as a read-only array on `buf`, its byte range in the data section),
    its header entry checked against the file. A tensor misaligned for its dtype is copied; BF16
    is converted to float32, or with lazy_bf16 wrapped in :class:`BF16`; read-only unless
    writable (a copy-on-write map's)."""
    def bad_entry():
        return FormatError(f"tensor {name!r}: bad header entry {info!r} (dtype one of "
                           f"{sorted(_DTYPES) + ['BF16']}, shape: a list of at most {_MAX_DIMS} "
                           f"integers >= 0, data_offsets: [begin, end])")

    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise bad_entry()
    bf16 = info["dtype"] == "BF16"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    ints = lambda v: isinstance(v, list) and all(  # noqa: E731
        isinstance(i, int) and not isinstance(i, bool) for i in v)
    if (not bf16 and info["dtype"] not in _DTYPES or not ints(shape) or len(shape) > _MAX_DIMS
            or not ints(offsets) or len(offsets) != 2):
        raise bad_entry()
    dtype = np.dtype("<u2" if bf16 else _DTYPES[info["dtype"]])
    begin, end = offsets
    if any(s < 0 for s in shape):
        raise FormatError(f"tensor {name!r}: negative dimension in shape {shape}")
    if int(np.prod([s for s in shape if s], dtype=object)) >= 1 << 62:
        raise FormatError(f"tensor {name!r}: shape {shape} beyond any array")
    count = int(np.prod(shape, dtype=object))
    if not 0 <= begin <= end <= size - start or end - begin != count * dtype.itemsize:
        raise FormatError(f"tensor {name!r}: {dtype} {tuple(shape)} does not match bytes "
                          f"[{begin}, {end}) of the {size - start}-byte data section")
    a = np.frombuffer(buf, dtype, count, start + begin).reshape(shape)
    if bf16 and lazy_bf16:
        return BF16(a), begin, end  # (converted when used, aligned or not)
    if bf16:
        a = np.asarray(BF16(a))
    elif (start + begin) % dtype.alignment:
        a = a.copy()  # kernels read aligned memory (lb.save aligns every tensor; other writers may not)
    a.flags.writeable = writable
    return a, begin, end


def _weight(path, name, d, parts):
    """A QuantizedWeight from its stored parts, each checked against the shapes the kernels read."""
    try:
        (n, k), bits, group, sym = d["shape"], d["bits"], d["group_size"], d["symmetric"]
        layout = d["layout"]
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: weight {name!r}: incomplete description {d!r}") from None
    if (layout != LAYOUT or type(bits) is not int or bits not in (4, 8) or type(n) is not int
            or type(k) is not int or n <= 0 or k <= 0 or not isinstance(sym, bool)):
        raise FormatError(f"{path}: weight {name!r}: unsupported description {d!r}")
    if group is not None and (type(group) is not int or group <= 0 or group % 32 or k % group):
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
    qw = QuantizedWeight((n, k), bits, group, sym, parts["packed"], parts["scales"],
                         comp=parts["comp"], mins=parts["mins"], zeros=parts["zeros"],
                         perm=None if perm is None else perm.astype(np.intp), in_scale=in_scale)
    try:
        qw._check_stored()
    except ValueError as e:
        raise FormatError(f"{path}: weight {name!r}: {e}") from None
    return qw


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
    if not isinstance(base, _mmap.mmap) or not hasattr(_mmap, "MADV_DONTNEED") or not a.nbytes:
        return
    start = np.frombuffer(base, np.uint8, 1).ctypes.data
    lo = (a.ctypes.data - start) // _mmap.PAGESIZE * _mmap.PAGESIZE
    hi = min(len(base), a.ctypes.data - start + a.nbytes)
    base.madvise(_mmap.MADV_DONTNEED, lo, hi - lo)
