"""The GGUF block formats (lowbit.formats: Q8_0, Q5_0, Q5_1, Q2_K .. Q6_K, IQ4_NL, IQ4_XS, MXFP4).

Each is read from random valid file blocks (every scale code, nibble and high-bit pattern, extreme,
subnormal and non-finite float16 scales), must dequantize bit for bit as the gguf package's
reference does, run on every kernel set with results identical to the reference kernels and to
any thread count, hold about its size in the file, and survive lb.save / lb.load."""
import numpy as np
import pytest

import lowbit as lb
from lowbit.formats import BLOCK_FORMATS
from lowbit.gguf import weight_from_blocks
from test_io import rewrite_header

F32 = np.float32
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T, quants  # noqa: E402

NAMES = sorted(BLOCK_FORMATS)


def random_rows(name, n, nblocks, rng):
    """n rows of nblocks random file blocks: random bytes are valid blocks of every format."""
    f = BLOCK_FORMATS[name]
    return rng.integers(0, 256, (n, nblocks * f.bytes), dtype=np.uint8)


def reference(name, raw):
    n = raw.shape[0]
    return quants.dequantize(raw, T[name]).reshape(n, -1).astype(F32)


def same_bits(a, b):
    """Equal bit for bit (NaNs: equal wherever both are NaN, whatever their payloads)."""
    nan = np.isnan(a)
    return (a.shape == b.shape and np.array_equal(nan, np.isnan(b))
            and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


def weight(name, n, nblocks, rng, finite=True):
    """A QuantizedWeight from random blocks; finite: scales replaced by moderate float16 values
    (for the kernels' accuracy checks)."""
    f = BLOCK_FORMATS[name]
    raw = random_rows(name, n, nblocks, rng)
    parts = {p: a.copy() for p, a in weight_from_blocks(name, raw, nblocks * f.block)._parts.items()}
    if finite:
        for p in ("d", "dm"):
            if p in parts and parts[p].dtype == np.float16:
                parts[p][...] = rng.uniform(-0.02, 0.02, parts[p].shape).astype(np.float16)
        if f.scale == "e8m0":
            parts["d"][...] = rng.integers(118, 124, parts["d"].shape)
    return lb.QuantizedWeight.from_blocks(name, (n, nblocks * f.block), parts)


def write_raw_gguf(path, tensors):
    """tensors: {name: (raw uint8 rows, ggml type name)}, written as they are."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    for tname, (raw, type_name) in tensors.items():
        w.add_tensor(tname, raw, raw_dtype=T[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_registry_agrees_with_ggml_block_sizes():
    for name, f in BLOCK_FORMATS.items():
        assert gguf.GGML_QUANT_SIZES[T[name]] == (f.block, f.bytes), name
        assert T[name].value == f.ggml_type


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,nblocks", [(1, 1), (16, 2), (37, 3)])
def test_random_blocks_dequantize_bit_exactly(name, n, nblocks):
    rng = np.random.default_rng(n * 100 + nblocks)
    raw = random_rows(name, n, nblocks, rng)
    qw = weight_from_blocks(name, raw, nblocks * BLOCK_FORMATS[name].block)
    with np.errstate(all="ignore"):
        ref = reference(name, raw)
    assert same_bits(qw.dequantize(), ref)
    rows = np.array([n - 1, 0])
    assert same_bits(qw.dequantize(rows=rows), ref[rows])
    assert same_bits(qw.dequantize(rows=n - 1), ref[n - 1])


@pytest.mark.parametrize("name", NAMES)
def test_every_scale_code_and_extreme_float16_scale(name):
    """Blocks whose float16 fields sweep zero, subnormals, the largest finite values, infinities
    and NaN, over many random blocks (so every code and value pattern occurs)."""
    f = BLOCK_FORMATS[name]
    rng = np.random.default_rng(7)
    raw = random_rows(name, 64, 4, rng)
    halves = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0x7E00,
                       0x3C00], np.uint16)
    # every pair of bytes of a block in turn takes these values: the float16 fields among them
    blocks = raw.reshape(-1, f.bytes)
    for i in range(blocks.shape[0]):
        at = 2 * (i % (f.bytes // 2))
        blocks[i, at:at + 2] = np.frombuffer(halves[i % len(halves)].tobytes(), np.uint8)
    with np.errstate(all="ignore"):
        ref = reference(name, raw)
    got = weight_from_blocks(name, raw, 4 * f.block).dequantize()
    assert same_bits(got, ref)


@pytest.mark.parametrize("name", NAMES)
def test_gguf_file_loads_every_block_format_at_native_size(tmp_path, name):
    rng = np.random.default_rng(3)
    f = BLOCK_FORMATS[name]
    raw = random_rows(name, 64, 2, rng)
    odd = random_rows(name, 5, 1, rng)
    path = tmp_path / f"{name}.gguf"
    write_raw_gguf(path, {"w": (raw, name), "odd": (odd, name)})
    got = lb.load_gguf(path)
    assert got["w"].format == name and got["w"].shape == (64, 2 * f.block)
    assert got["w"].bits == f.bits and got["w"].group_size == f.sub
    assert got["w"].symmetric == (f.min == "none")
    with np.errstate(all="ignore"):
        assert same_bits(got["w"].dequantize(), reference(name, raw))
        assert same_bits(got["odd"].dequantize(), reference(name, odd))
    assert got["w"].nbytes <= 1.1 * raw.nbytes  # native size: no widening to bytes or floats
    # the parts are those the descriptor lists (lowbit.formats: the layout users can inspect)
    assert {p: (a.dtype, a.shape) for p, a in got["w"]._parts.items()} == f.parts(64, 2 * f.block)


@pytest.mark.parametrize("name", NAMES)
# from 12 rows (bit-plane formats) or 32 (the others) each panel pair's values are rebuilt once for
# every row tile (gemm_blk/avx512.cpp); 13 and 33 rows end on a single-row tile, 50 columns on a
# single panel
@pytest.mark.parametrize("m,n,nblocks", [(1, 1, 1), (1, 33, 2), (5, 40, 1), (7, 17, 3), (2, 64, 2), (13, 50, 2),
                                         (33, 50, 2)])
@pytest.mark.parametrize("activations", ["int8", "float"])
def test_block_linear_is_bit_identical_on_every_isa(isa, name, m, n, nblocks, activations):
    rng = np.random.default_rng(m * 1000 + n * 10 + nblocks)
    qw = weight(name, n, nblocks, rng)
    k = qw.shape[1]
    x = rng.normal(size=(m, k)).astype(F32)
    b = rng.normal(size=n).astype(F32)
    y = lb.matmul(x, qw, b, activations=activations)
    exact = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T + b
    tol = 0.03 if activations == "int8" else 1e-5
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < tol
    x[0, :3] = [40.0, -1e-3, 0.0]  # a wide range inside one activation block
    y = lb.matmul(x, qw, b, activations=activations)
    with lb.use_isa("ref"):
        ref = lb.matmul(x, qw, b, activations=activations)
    assert same_bits(y, ref)


@pytest.mark.parametrize("name", NAMES)
def test_block_linear_does_not_depend_on_thread_count(name, threads):
    rng = np.random.default_rng(5)
    qw = weight(name, 256, 512 // BLOCK_FORMATS[name].block or 1, rng)
    x = rng.normal(size=(9, qw.shape[1])).astype(F32)
    outs = []
    for t in (1, 2, 3):
        lb.set_num_threads(t)
        outs.append(lb.matmul(x, qw))
        outs.append(lb.matmul(x, qw, activations="float"))
    for a, b in zip(outs[2:], outs[:-2]):
        assert same_bits(a, b)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "IQ4_NL", "Q5_1", "Q8_0"])
def test_block_linear_extreme_and_non_finite_inputs(isa, name):
    rng = np.random.default_rng(11)
    qw = weight(name, 24, 2 if BLOCK_FORMATS[name].block == 256 else 8, rng)
    k = qw.shape[1]
    x = np.zeros((4, k), F32)
    x[1] = rng.normal(size=k) * 3e37
    x[2] = rng.normal(size=k) * 1e-38
    x[3, 5] = np.nan
    for activations in ("int8", "float"):
        y = lb.matmul(x, qw, activations=activations)
        assert (y[0] == 0).all()
        assert np.isnan(y[3]).all()
        with lb.use_isa("ref"):
            assert same_bits(y, lb.matmul(x, qw, activations=activations))


@pytest.mark.parametrize("name", NAMES)
def test_block_weights_save_and_load(tmp_path, name):
    rng = np.random.default_rng(2)
    qw = weight(name, 20, 2, rng, finite=False)
    path = tmp_path / "w.lowbit"
    lb.save(path, {"w": qw, "bias": np.ones(3, F32)})
    got = lb.load(path)["w"]
    assert got.format == name and got.shape == qw.shape and got.nbytes == qw.nbytes
    assert same_bits(got.dequantize(), qw.dequantize())
    assert all(not a.flags.writeable for a in got._parts.values())  # views of the file's map
    x = rng.normal(size=(3, qw.shape[1])).astype(F32)
    ok = weight(name, 20, 2, rng)
    lb.save(path, {"w": ok})
    assert same_bits(lb.load(path)["w"].dequantize(), ok.dequantize())
    assert same_bits(lb.matmul(x, lb.load(path)["w"]), lb.matmul(x, ok))


def test_block_weight_parts_are_checked(tmp_path):
    rng = np.random.default_rng(4)
    qw = weight("Q4_K", 16, 1, rng)
    parts = dict(qw._parts)
    with pytest.raises(ValueError, match="part 'sc'"):
        lb.QuantizedWeight.from_blocks("Q4_K", (16, 256), {**parts, "sc": parts["sc"][:, :4]})
    with pytest.raises(ValueError, match="part 'mc' missing"):
        lb.QuantizedWeight.from_blocks("Q4_K", (16, 256), {k: v for k, v in parts.items() if k != "mc"})
    with pytest.raises(ValueError, match="part 'q8' not expected"):
        lb.QuantizedWeight.from_blocks("Q4_K", (16, 256), {**parts, "q8": parts["nib"]})
    with pytest.raises(ValueError, match="multiple of 256"):
        lb.QuantizedWeight.from_blocks("Q4_K", (16, 300), parts)
    with pytest.raises(ValueError, match="unknown block format"):
        lb.QuantizedWeight.from_blocks("Q9_K", (16, 256), parts)
    with pytest.raises(ValueError, match="block layout"):
        qw.int_values()
    # a saved file whose part has the wrong shape is refused as a format error
    path = tmp_path / "w.lowbit"
    lb.save(path, {"w": qw})
    rewrite_header(path, lambda h: h["w:sc"].update(shape=[1, 4, 32]))
    with pytest.raises(lb.FormatError, match="sc"):
        lb.load(path)


@pytest.mark.parametrize("names", [["Q4_K", "Q4_K", "Q4_K"], ["Q6_K", "Q6_K"], ["Q8_0", "Q8_0"]])
def test_concat_rows_stacks_outputs(names):
    rng = np.random.default_rng(6)
    ws = [weight(nm, n, 1, rng) for nm, n in zip(names, (32, 16, 7))]
    cat = lb.concat_rows(ws)
    assert cat.shape == (sum(w.shape[0] for w in ws), ws[0].shape[1]) and cat.format == names[0]
    assert same_bits(cat.dequantize(), np.concatenate([w.dequantize() for w in ws]))
    x = rng.normal(size=(3, ws[0].shape[1])).astype(F32)
    assert same_bits(lb.matmul(x, cat), np.concatenate([lb.matmul(x, w) for w in ws], axis=1))


def test_concat_rows_of_int_weights(rng):
    w = rng.normal(size=(48, 64)).astype(F32)
    for kw in (dict(bits=8), dict(bits=8, group_size=32), dict(bits=4, group_size=32, symmetric=False),
               dict(bits=4)):
        parts = [lb.quantize(w[:16], **kw), lb.quantize(w[16:32], **kw), lb.quantize(w[32:45], **kw)]
        cat = lb.concat_rows(parts)
        assert same_bits(cat.dequantize(), lb.quantize(w[:45], **kw).dequantize())
        x = rng.normal(size=(2, 64)).astype(F32)
        assert same_bits(lb.matmul(x, cat), np.concatenate([lb.matmul(x, p) for p in parts], axis=1))


def test_concat_rows_refuses_mismatches(rng):
    w = rng.normal(size=(32, 64)).astype(F32)
    with pytest.raises(ValueError, match="match"):
        lb.concat_rows([lb.quantize(w, bits=8), lb.quantize(w, bits=4)])
    with pytest.raises(ValueError, match="multiple of 16"):
        lb.concat_rows([lb.quantize(w[:5]), lb.quantize(w)])
    with pytest.raises(TypeError):
        lb.concat_rows([])


def test_unsupported_gguf_type_is_named_and_can_be_dequantized_or_skipped(tmp_path):
    rng = np.random.default_rng(8)
    iq2 = rng.integers(0, 256, (4, gguf.GGML_QUANT_SIZES[T.IQ2_XXS][1]), dtype=np.uint8)
    iq2[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # a finite d
    path = tmp_path / "mixed.gguf"
    write_raw_gguf(path, {"iq2": (iq2, "IQ2_XXS")})
    with pytest.raises(lb.FormatError, match=r"'iq2'.*IQ2_XXS.*Q4_K"):
        lb.load_gguf(path)
    got = lb.load_gguf(path, unsupported="dequantize")["iq2"]
    assert got.dtype == F32 and got.shape == (4, 256)
    assert same_bits(got, quants.dequantize(iq2, T.IQ2_XXS).reshape(4, 256).astype(F32))
    assert lb.load_gguf(path, unsupported="skip") == {}
    with pytest.raises(ValueError, match="unsupported"):
        lb.load_gguf(path, unsupported="ignore")


def test_gguf_types_newer_than_lowbit_are_dequantized_skipped_or_named(tmp_path):
    """A ggml type lowbit's table lacks (NVFP4 here) takes its block size from the gguf package,
    so unsupported= works on it as on any type lowbit does not run; a type number nobody knows
    can still be skipped, and is named otherwise."""
    if "NVFP4" not in T.__members__:
        pytest.skip("this gguf package predates NVFP4")
    rng = np.random.default_rng(11)
    nv = rng.integers(0, 256, (4, gguf.GGML_QUANT_SIZES[T.NVFP4][1]), dtype=np.uint8)
    path = tmp_path / "newer.gguf"
    ok = rng.normal(size=(4, 32)).astype(F32)
    write_raw_gguf(path, {"ok": (ok, "F32"), "nv": (nv, "NVFP4")})
    with pytest.raises(lb.FormatError, match=r"'nv' has type NVFP4.*dequantize"):
        lb.load_gguf(path)
    with np.errstate(all="ignore"):
        got = lb.load_gguf(path, unsupported="dequantize")
        ref = quants.dequantize(nv, T.NVFP4).astype(F32).reshape(got["nv"].shape)
    assert same_bits(got["nv"], ref) and same_bits(got["ok"], ok)
    assert list(lb.load_gguf(path, unsupported="skip")) == ["ok"]
    # the same file with the tensor's type number changed to one nobody knows (255)
    data = bytearray(path.read_bytes())
    info = data.index(b"\x02" + bytes(7) + b"nv") + 10 + 4 + 16  # name, n_dims, 2 dims
    assert data[info:info + 4] == T.NVFP4.value.to_bytes(4, "little")
    data[info:info + 4] = (255).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert list(lb.load_gguf(path, unsupported="skip")) == ["ok"]
    for mode in ("raise", "dequantize"):
        with pytest.raises(lb.FormatError, match=r"'nv' has ggml type number 255, unknown to lowbit"):
            lb.load_gguf(path, unsupported=mode)


def test_fused_linear_groups_runs_of_equal_formats():
    rng = np.random.default_rng(9)
    q, k, v = weight("Q5_0", 32, 8, rng), weight("Q5_0", 16, 8, rng), weight("Q8_0", 16, 8, rng)
    fused = lb.FusedLinear([q, k, v])
    assert len(fused.layers) == 2 and fused.out_features == 64 and fused.in_features == 256
    for shape in ((3, 256), (1, 256), (256,), (2, 1, 256)):  # one row: each call writes its columns
        x = rng.normal(size=shape).astype(F32)
        parts = [lb.matmul(x, w) for w in (q, k, v)]
        got = fused(x)
        assert got.shape == shape[:-1] + (64,) and got.dtype == F32
        assert same_bits(got, np.concatenate(parts, axis=-1))
    assert same_bits(fused(x.astype(np.float16)), np.concatenate([lb.matmul(x.astype(np.float16), w)
                                                                   for w in (q, k, v)], axis=-1))
    assert len(lb.FusedLinear([q, k]).layers) == 1
    with pytest.raises(TypeError):
        lb.FusedLinear([])
    with pytest.raises(ValueError, match="same inputs; weight 1 has in_features 512"):
        lb.FusedLinear([q, weight("Q5_0", 16, 16, rng)])  # a layer no input could run


def test_gguf_tensors_that_are_not_runnable_matrices_can_be_dequantized_or_skipped(tmp_path):
    """Stacks of expert matrices (3-D), vectors and rows longer than the kernels take (MAX_K):
    named in the error, dequantized bit for bit by lowbit itself on request, or skipped."""
    rng = np.random.default_rng(11)
    long_k = (lb._core.MAX_K // 32 + 1) * 32 + 32 * 16  # whole blocks, past MAX_K
    tensors = {"experts": (random_rows("Q4_K", 8, 1, rng).reshape(2, 4, -1), "Q4_K"),
               "vector": (random_rows("Q8_0", 1, 2, rng).reshape(-1), "Q8_0"),
               "long": (random_rows("Q8_0", 2, long_k // 32, rng), "Q8_0"),
               "long4": (rng.integers(0, 256, (1, long_k // 32 * 18), dtype=np.uint8), "Q4_0")}
    path = tmp_path / "odd.gguf"
    write_raw_gguf(path, tensors)
    with pytest.raises(lb.FormatError, match=r"'experts': Q4_K of shape \(2, 4, 256\).*dequantize"):
        lb.load_gguf(path)
    with np.errstate(invalid="ignore", over="ignore"):  # (random blocks: some scales NaN / Inf)
        got = lb.load_gguf(path, unsupported="dequantize")
        for name, (raw, type_name) in tensors.items():
            ref = quants.dequantize(raw, T[type_name]).astype(F32)
            assert got[name].shape == ref.shape and same_bits(got[name], ref), name
    assert got["long"].shape == (2, long_k) and got["experts"].shape == (2, 4, 256)
    assert lb.load_gguf(path, unsupported="skip") == {}


def test_q3_k_scale_codes_beyond_what_a_file_holds_are_refused(tmp_path):
    """Q3_K's integer dot holds code * value in a byte: codes outside -32..31 (which no GGUF block
    can hold) would give wrong results on some kernel sets, so neither from_blocks nor a saved
    file takes them."""
    rng = np.random.default_rng(12)
    q = weight("Q3_K", 16, 2, rng)
    parts = {p: a.copy() for p, a in q._parts.items()}
    assert parts["sc"].min() >= -32 and parts["sc"].max() <= 31
    lb.save(tmp_path / "ok.lowbit", {"q": q})
    parts["sc"][0, 0, 3] = 33
    with pytest.raises(ValueError, match=r"Q3_K weight: part 'sc' holds the scale code 33.*-32\.\.31"):
        lb.QuantizedWeight.from_blocks("Q3_K", q.shape, parts)
    path = tmp_path / "ok.lowbit"  # the same code written into a saved file: refused on load
    data = bytearray(path.read_bytes())
    sc = q._parts["sc"].tobytes()
    at = bytes(data).find(sc)
    assert at > 0
    data[at + 3] = 33
    (tmp_path / "bad.lowbit").write_bytes(bytes(data))
    with pytest.raises(lb.FormatError, match="scale code 33"):
        lb.load(tmp_path / "bad.lowbit")
