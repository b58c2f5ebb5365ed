"""lb.save / lb.load: exact round trips, memory-mapped loading, atomic writes, corrupt files."""
import json
import os
import struct

import numpy as np
import pytest

import lowbit as lb

F32 = np.float32


def weights(rng):
    w = rng.normal(0, 0.02, (40, 256)).astype(F32)
    q = rng.integers(0, 16, (24, 128))
    return {
        "int8": lb.quantize(w, bits=8),
        "int8_g64": lb.quantize(w, bits=8, group_size=64),
        "q4_sym": lb.quantize(w, bits=4, group_size=32),
        "q4_asym": lb.quantize(w, bits=4, symmetric=False),
        "q4_zeros_perm": lb.QuantizedWeight.from_int(
            q, np.full((24, 4), 0.01, np.float16), bits=4, group_size=32,
            zeros=rng.integers(0, 16, (24, 4)), perm=rng.permutation(128)),
        "bias": rng.normal(size=40).astype(F32),
        "ids": np.arange(7, dtype=np.int64),
        "half": rng.normal(size=(3, 5)).astype(np.float16),
        "flags": np.array([True, False]),
    }


def test_round_trip_is_exact_and_runs(tmp_path, rng):
    src = weights(rng)
    path = tmp_path / "model.lowbit"
    lb.save(path, src)
    got = lb.load(path)
    assert set(got) == set(src)
    x = rng.normal(size=(3, 256)).astype(F32)
    for name, t in src.items():
        if isinstance(t, lb.QuantizedWeight):
            g = got[name]
            assert (g.shape, g.bits, g.group_size, g.symmetric) == (t.shape, t.bits, t.group_size, t.symmetric)
            assert g.nbytes == t.nbytes
            np.testing.assert_array_equal(g.dequantize(), t.dequantize())
            xx = x[:, : t.shape[1]]
            np.testing.assert_array_equal(lb.matmul(xx, g), lb.matmul(xx, t))
        else:
            np.testing.assert_array_equal(got[name], t)
            assert got[name].dtype == t.dtype


def test_load_memory_maps_without_copies(tmp_path, rng):
    path = tmp_path / "m.lowbit"
    lb.save(path, weights(rng))
    got = lb.load(path)
    assert not got["int8"]._packed.flags.writeable and not got["bias"].flags.writeable
    assert got["int8"]._packed.base is not None  # a view of the file's map, not a copy


def test_files_are_safetensors(tmp_path, rng):
    st = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "m.safetensors"
    src = weights(rng)
    lb.save(path, src)
    plain = st.load_file(str(path))
    np.testing.assert_array_equal(plain["bias"], src["bias"])
    np.testing.assert_array_equal(plain["int8:packed"], src["int8"]._packed)
    other = tmp_path / "other.safetensors"  # any safetensors file of arrays loads too
    st.save_file({"a": np.ones((2, 3), F32)}, str(other))
    np.testing.assert_array_equal(lb.load(other)["a"], np.ones((2, 3), F32))


def test_failed_save_leaves_no_file(tmp_path, rng):
    path = tmp_path / "m.lowbit"
    with pytest.raises(TypeError, match="dtype"):
        lb.save(path, {"ok": np.ones(3, F32), "bad": np.array(["text"])})
    assert list(tmp_path.iterdir()) == []
    lb.save(path, {"a": np.ones(3, F32)})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's 0600
    with pytest.raises(ValueError, match="names"):
        lb.save(path, {"a:b": np.ones(3, F32)})
    np.testing.assert_array_equal(lb.load(path)["a"], np.ones(3, F32))  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lowbit"]


def rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def set_meta(header, fn):
    meta = json.loads(header["__metadata__"]["lowbit"])
    fn(meta)
    header["__metadata__"]["lowbit"] = json.dumps(meta)


@pytest.mark.parametrize("edit,match", [
    (lambda h: h["bias"].update(data_offsets=[0, 1 << 40]), "does not match"),
    (lambda h: h["bias"].update(dtype="Q4"), "bad header entry"),
    (lambda h: h["bias"].update(shape=[-1]), "negative"),
    (lambda h: h["int8:packed"].update(shape=[24, 512]), "packed should be"),
    (lambda h: h.pop("int8:comp"), "comp should be"),
    (lambda h: set_meta(h, lambda m: m.update(version=99)), "version 99"),
    (lambda h: set_meta(h, lambda m: m["weights"]["int8"].update(bits=3)), "unsupported"),
    (lambda h: set_meta(h, lambda m: m["weights"]["q4_sym"].update(group_size=48)), "group size"),
    (lambda h: set_meta(h, lambda m: m["weights"]["q4_asym"].update(symmetric=True)), "symmetric"),
    (lambda h: set_meta(h, lambda m: m["weights"]["int8"].update(shape=[49, 256])), "should be"),
])
def test_corrupt_files_raise_format_error(tmp_path, rng, edit, match):
    path = tmp_path / "m.lowbit"
    lb.save(path, weights(rng))
    rewrite_header(path, edit)
    with pytest.raises(lb.FormatError, match=match):
        lb.load(path)


def test_truncated_and_garbage_files(tmp_path, rng):
    path = tmp_path / "m.lowbit"
    lb.save(path, weights(rng))
    data = path.read_bytes()
    for blob in (b"", b"1234", data[:20], data[: len(data) - 1], b"\xff" * 8 + data[8:],
                 struct.pack("<Q", 4) + b"[1] " + data[12:]):
        path.write_bytes(blob)
        with pytest.raises(lb.FormatError):
            lb.load(path)


def test_release_pages_keeps_the_values(tmp_path, rng):
    """Dropping a memory-mapped input's pages (load_gguf and lowbit quantize do, tensor by tensor) only
    makes the kernel read them again: the values stay; arrays not backed by a file are left."""
    w = rng.normal(size=(300, 1000)).astype(F32)
    lb.save(tmp_path / "w.lowbit", {"w": w})
    a = lb.load(tmp_path / "w.lowbit")["w"]
    before = np.array(a)
    lb.io.release_pages(a)
    lb.io.release_pages(a[7:9])
    np.testing.assert_array_equal(a, before)
    lb.io.release_pages(before)  # in memory: nothing to do
    np.testing.assert_array_equal(a, w)
