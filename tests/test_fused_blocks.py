"""lowbit.nn.mlp and lowbit.nn.attention_block: a transformer's feed-forward and self-attention
blocks run in row / sequence blocks with their intermediate activations in cache. Each must equal
its plain calls (up, activation, down; qkv, attention, proj) bit for bit, for every weight format
and activation setting, on both of its paths (few rows: the calls themselves; many: blocks on
the threads), at any thread count and on every kernel set; fall back to the plain calls for
layers it cannot run itself; and refuse bad input with errors that say what was expected."""
import numpy as np
import pytest

import lowbit as lb
from lowbit import nn
from lowbit.formats import BLOCK_FORMATS
from lowbit.gguf import weight_from_blocks

F32 = np.float32


@pytest.fixture(autouse=True)
def two_threads(threads):
    """Two threads unless a test sets others: the row / sequence counts below then take the
    blocked path (two blocks per thread or more) or the plain one on any machine."""
    lb.set_num_threads(2)


def block_weight(name, n, k, rng):
    """A block-format weight from random file blocks, its float16 scales moderate."""
    f = BLOCK_FORMATS[name]
    raw = rng.integers(0, 256, (n, k // f.block * f.bytes), dtype=np.uint8)
    parts = {p: a.copy() for p, a in weight_from_blocks(name, raw, k)._parts.items()}
    for p in ("d", "dm"):
        if p in parts and parts[p].dtype == np.float16:
            parts[p][...] = rng.uniform(-0.02, 0.02, parts[p].shape).astype(np.float16)
    if f.scale == "e8m0":
        parts["d"][...] = rng.integers(118, 124, parts["d"].shape)
    return lb.QuantizedWeight.from_blocks(name, (n, k), parts)


# (quantize settings or a block format name, activations)
FORMATS = {
    "int8": (dict(bits=8), "int8"),
    "int8-static": (dict(bits=8), lb.StaticActivations(0.05, 3)),
    "int8-w8a32": (dict(bits=8, group_size=32), "float"),
    "int4-g32-min": (dict(bits=4, group_size=32, symmetric=False), "int8"),
    "int4-w4a32": (dict(bits=4, group_size=64), "float"),
    "Q4_K": ("Q4_K", "int8"),
    "Q6_K": ("Q6_K", "float"),
}


def layer(fmt, n, k, rng, epilogue=None):
    settings, acts = FORMATS[fmt]
    w = rng.normal(0, 0.1, (n, k)).astype(F32)
    qw = block_weight(settings, n, k, rng) if isinstance(settings, str) else lb.quantize(w, **settings)
    return lb.Linear(qw, rng.normal(size=n).astype(F32), activations=acts, epilogue=epilogue)


def recording_wrapper(calls):
    """wrap(layer): a plain function calling layer, appending its input's shape to calls."""
    def wrap(fn):
        def call(a, **kw):
            calls.append(a.shape)
            return fn(a, **kw)
        return call
    return wrap


def plain_mlp(x, up, down, activation):
    h = up(x)
    if activation is not None:
        half = h.shape[-1] // 2
        h = (nn.swiglu if activation == "swiglu" else nn.geglu)(h[..., :half], h[..., half:])
    return down(h)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("activation", [None, "swiglu", "geglu"])
@pytest.mark.parametrize("rows", [1, 7, 160, 333, 1000])  # the plain calls, then blocks (with a tail)
def test_mlp_is_its_plain_calls_bit_for_bit(rng, fmt, activation, rows):
    k, hidden, n = 256, 256, 64  # (K-quants: K a multiple of 256)
    up = layer(fmt, 2 * hidden if activation else hidden, k, rng,
               epilogue=None if activation else "gelu")
    down = layer(fmt, n, hidden, rng)
    x = rng.normal(size=(rows, k)).astype(F32)
    expected = plain_mlp(x, up, down, activation)
    assert np.array_equal(nn.mlp(x, up, down, activation=activation), expected)
    out = np.full((rows, n), np.nan, F32)
    assert nn.mlp(x, up, down, activation=activation, out=out) is out
    assert np.array_equal(out, expected)


def test_mlp_same_bits_on_every_thread_count_and_isa(rng, isa, threads):
    up = layer("int8", 3 * 96, 128, rng, epilogue="gelu")
    down = layer("int4-g32-min", 80, 3 * 96, rng)
    x = rng.normal(size=(2, 250, 128)).astype(F32)  # leading axes kept
    with lb.use_isa("ref"):
        expected = plain_mlp(x, up, down, None)
    assert expected.shape == (2, 250, 80)
    for t in (1, 2, 3, 7):
        lb.set_num_threads(t)
        assert np.array_equal(nn.mlp(x, up, down), expected), t


def test_mlp_takes_float16_and_fused_gate_up_layers(rng):
    gate, upw = (rng.normal(0, 0.1, (64, 96)).astype(F32) for _ in range(2))
    fused = lb.FusedLinear([lb.quantize(gate), lb.quantize(upw)])
    down = layer("int8", 48, 64, rng)
    x = rng.normal(size=(300, 96)).astype(np.float16)
    expected = plain_mlp(x.astype(F32), fused, down, "swiglu")
    assert np.array_equal(nn.mlp(x, fused, down, activation="swiglu"), expected)


def test_mlp_runs_other_layers_through_their_own_calls(rng):
    """Wrappers, subclasses and recorders of lb.calibrate.capture_inputs are called, not bypassed."""
    up, down = layer("int8", 96, 64, rng, epilogue="gelu"), layer("int8", 32, 96, rng)
    x = rng.normal(size=(200, 64)).astype(F32)
    expected = plain_mlp(x, up, down, None)
    calls = []
    wrapped = recording_wrapper(calls)
    assert np.array_equal(nn.mlp(x, wrapped(up), wrapped(down)), expected)
    assert calls == [(200, 64), (200, 96)]

    class Traced(lb.Linear):
        def __call__(self, a, out=None):
            calls.append("traced")
            return super().__call__(a, out=out)

    traced = Traced(down.weight, down.bias)
    out = np.empty((200, 32), F32)
    assert nn.mlp(x, up, traced, out=out) is out and np.array_equal(out, expected)
    assert calls[-1] == "traced"

    class Owner:
        pass

    owner = Owner()
    owner.up, owner.down = up, down
    seen = lb.calibrate.capture_inputs({"up": (owner, "up"), "down": (owner, "down")},
                                       lambda: nn.mlp(x, owner.up, owner.down))
    assert np.array_equal(seen["up"], x)
    assert np.array_equal(seen["down"], up(x))  # (GELU included: up's epilogue)


@pytest.mark.parametrize("rows", [1, 200])  # (the layer calls, or the C++ op declining)
def test_mlp_records_as_its_plain_calls(rng, rows):
    up = lb.FusedLinear([lb.quantize(rng.normal(0, 0.1, (48, 32)).astype(F32)) for _ in range(2)])
    down = layer("int8", 32, 48, rng)
    w, b = rng.normal(size=32).astype(F32), rng.normal(size=32).astype(F32)
    graph = nn.record(lambda a: nn.mlp(a, up, down, activation="swiglu", residual_norm=(w, b, 1e-5)),
                      np.zeros((rows, 32), F32))
    for _ in range(2):
        x = rng.normal(size=(rows, 32)).astype(F32)
        expected = nn.layer_norm(plain_mlp(x, up, down, "swiglu"), w, b, 1e-5, residual=x)
        assert np.array_equal(graph(x), expected)


def test_mlp_rejects_bad_input(rng):
    up, down = layer("int8", 96, 64, rng), layer("int8", 32, 96, rng)
    x = rng.normal(size=(200, 64)).astype(F32)
    with pytest.raises(ValueError, match="activation"):
        nn.mlp(x, up, down, activation="relu")
    with pytest.raises(ValueError, match="down takes 96 inputs, but up gated gives 48"):
        nn.mlp(x, up, down, activation="swiglu")
    with pytest.raises(ValueError, match="odd out_features"):
        nn.mlp(x, layer("int8", 95, 64, rng), down, activation="geglu")
    with pytest.raises(ValueError, match="down takes 96 inputs, but up gives 32"):
        nn.mlp(x, layer("int8", 32, 64, rng), down)
    with pytest.raises(ValueError, match="expected dimension 1 to be 64"):
        nn.mlp(x[:, :60], up, down)
    with pytest.raises(ValueError, match="out: expected shape"):
        nn.mlp(x, up, down, out=np.empty((200, 31), F32))
    with pytest.raises(ValueError, match="overlap"):
        big = np.empty((200, 64), F32)
        nn.mlp(big, up, down, out=big[:, :32])
    with pytest.raises(ValueError, match="C-contiguous"):
        nn.mlp(x, up, down, out=np.empty((200, 64), F32)[:, ::2])
    with pytest.raises(TypeError, match="expected float32 or float16, got dtype int64"):
        nn.mlp(np.ones((200, 64), np.int64), up, down)
    wrap = recording_wrapper([])
    for u, d in ((up, down), (wrap(up), wrap(down))):  # both paths refuse out overlapping x
        square = layer("int8", 64, 96, rng)
        big = rng.normal(size=(200, 64)).astype(F32)
        with pytest.raises(ValueError, match="overlap"):
            nn.mlp(big, u, square if d is down else wrap(square), out=big)
    with pytest.raises(ValueError, match="odd out_features, 95"):
        nn.mlp(x, wrap(layer("int8", 95, 64, rng)), wrap(down), activation="swiglu")


def plain_attention_block(x, qkv, proj, heads, kv_heads, **kw):
    b, s, _ = x.shape
    p = qkv(x)
    d = p.shape[-1] // (heads + 2 * kv_heads)
    q = p[..., :heads * d].reshape(b, s, heads, d)
    k = p[..., heads * d:(heads + kv_heads) * d].reshape(b, s, kv_heads, d)
    v = p[..., (heads + kv_heads) * d:].reshape(b, s, kv_heads, d)
    return proj(nn.attention(q, k, v, **kw).reshape(b, s, heads * d))


@pytest.mark.parametrize("fmt", ["int8", "int8-static", "int4-g32-min", "Q4_K", "int4-w4a32"])
@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("batch", [1, 3, 9])  # the plain calls, then sequence by sequence
@pytest.mark.parametrize("mask", ["lengths", "causal_window", "none"])
def test_attention_block_is_its_plain_calls_bit_for_bit(rng, fmt, precision, batch, mask):
    heads, kv_heads, d, hidden, tokens = 4, 2, 64, 256, 45  # (K-quants: K a multiple of 256)
    qkv = layer(fmt, (heads + 2 * kv_heads) * d, hidden, rng)
    proj = layer(fmt, 40, heads * d, rng)
    x = rng.normal(size=(batch, tokens, hidden)).astype(F32)
    kw = dict(precision=precision)
    if mask == "lengths":
        kw["lengths"] = rng.integers(-1, tokens + 3, batch)
    elif mask == "causal_window":
        kw.update(causal=True, window=9, scale=0.3)
    expected = plain_attention_block(x, qkv, proj, heads, kv_heads, **kw)
    got = nn.attention_block(x, qkv, proj, heads, kv_heads=kv_heads, **kw)
    assert np.array_equal(got, expected)
    out = np.full(expected.shape, np.nan, F32)
    assert nn.attention_block(x, qkv, proj, heads, kv_heads=kv_heads, out=out, **kw) is out
    assert np.array_equal(out, expected)


def test_attention_block_same_bits_on_every_thread_count_and_isa(rng, isa, threads):
    qkv, proj = layer("int8", 3 * 64, 64, rng), layer("int8", 64, 64, rng)
    x = rng.normal(size=(7, 33, 64)).astype(F32)
    lengths = rng.integers(1, 34, 7)
    for precision in ("float32", "int8"):
        with lb.use_isa("ref"):
            expected = plain_attention_block(x, qkv, proj, 4, 4, lengths=lengths, precision=precision)
        for t in (1, 2, 5):
            lb.set_num_threads(t)
            got = nn.attention_block(x, qkv, proj, 4, lengths=lengths, precision=precision)
            assert np.array_equal(got, expected), (precision, t)


def test_attention_block_runs_other_layers_through_their_own_calls(rng):
    qkv, proj = layer("int8", 3 * 32, 32, rng), layer("int8", 32, 32, rng)
    x = rng.normal(size=(6, 10, 32)).astype(F32)
    expected = plain_attention_block(x, qkv, proj, 2, 2)
    calls = []
    wrapped = recording_wrapper(calls)
    assert np.array_equal(nn.attention_block(x, wrapped(qkv), wrapped(proj), 2), expected)
    assert calls == [(6, 10, 32), (6, 10, 32)]
    out = np.empty_like(expected)
    assert nn.attention_block(x, qkv, wrapped(proj), 2, out=out) is out
    assert np.array_equal(out, expected)


def test_attention_block_rejects_bad_input(rng):
    qkv, proj = layer("int8", 3 * 32, 32, rng), layer("int8", 16, 32, rng)
    x = rng.normal(size=(6, 10, 32)).astype(F32)
    with pytest.raises(ValueError, match="precision"):
        nn.attention_block(x, qkv, proj, 2, precision="bf16")
    with pytest.raises(ValueError, match="heads"):
        nn.attention_block(x, qkv, proj, 0)
    with pytest.raises(ValueError, match="kv_heads"):
        nn.attention_block(x, qkv, proj, 2, kv_heads=1.5)
    with pytest.raises(ValueError, match="kv_heads >= 1 dividing heads"):
        nn.attention_block(x, qkv, proj, 3, kv_heads=2)
    with pytest.raises(ValueError, match="not .* heads of one width"):
        nn.attention_block(x, qkv, proj, 5)
    with pytest.raises(ValueError, match="proj takes 32 inputs, but the attention gives"):
        nn.attention_block(x, layer("int8", 6 * 8, 32, rng), proj, 2)
    with pytest.raises(ValueError, match="batch, tokens, hidden"):
        nn.attention_block(x[0], qkv, proj, 2)
    with pytest.raises(ValueError, match="expected dimension 2 to be 32"):
        nn.attention_block(x[..., :30], qkv, proj, 2)
    with pytest.raises(ValueError, match="lengths"):
        nn.attention_block(x, qkv, proj, 2, lengths=np.ones(5, np.int64))
    with pytest.raises(TypeError, match="lengths"):
        nn.attention_block(x, qkv, proj, 2, lengths=np.ones(6))
    with pytest.raises(ValueError, match="window"):
        nn.attention_block(x, qkv, proj, 2, window=0)
    with pytest.raises(ValueError, match="out: expected shape"):
        nn.attention_block(x, qkv, proj, 2, out=np.empty((6, 10, 32), F32))
    with pytest.raises(ValueError, match="overlap"):
        big = np.empty((6, 10, 32), F32)
        nn.attention_block(big, qkv, proj, 2, out=big[..., :16])
    with pytest.raises(ValueError, match="overlap"):  # (the plain calls' path too)
        big = np.empty((6, 10, 32), F32)
        nn.attention_block(big, recording_wrapper([])(qkv), proj, 2, out=big[..., :16])
    with pytest.raises(TypeError, match="expected float32 or float16"):
        nn.attention_block(x.astype(np.int32), qkv, proj, 2)


def test_attention_block_while_recording_is_refused_as_attention_is(rng):
    qkv, proj = layer("int8", 3 * 32, 32, rng), layer("int8", 32, 32, rng)
    with pytest.raises(TypeError, match="lowbit.nn.attention cannot be recorded"):
        nn.record(lambda a: nn.attention_block(a, qkv, proj, 2, window=4), np.zeros((1, 3, 32), F32))


@pytest.mark.parametrize("rows", [5, 700])  # the plain calls, then blocks
def test_mlp_residual_norm_is_layer_norm_of_the_sum_bit_for_bit(rng, rows):
    up, down = layer("int8", 160, 64, rng, epilogue="gelu"), layer("int4-g32-min", 64, 160, rng)
    w, b = rng.normal(size=64).astype(F32), rng.normal(size=64).astype(F32)
    x = rng.normal(size=(rows, 64)).astype(F32)
    expected = nn.layer_norm(plain_mlp(x, up, down, None), w, b, 1e-12, residual=x)
    assert np.array_equal(nn.mlp(x, up, down, residual_norm=(w, b, 1e-12)), expected)
    out = np.empty_like(expected)
    nn.mlp(x[:, ::1], up, lambda h, out=None: down(h, out=out), residual_norm=(w, b, 1e-12), out=out)
    assert np.array_equal(out, expected)  # (the plain calls' path)
    strided = np.zeros((rows, 128), F32)
    strided[:, :64] = x
    assert np.array_equal(nn.mlp(strided[:, :64], up, down, residual_norm=(w, b, 1e-12)), expected)


@pytest.mark.parametrize("batch", [1, 6])
def test_attention_block_residual_norm_is_layer_norm_of_the_sum_bit_for_bit(rng, batch):
    qkv, proj = layer("int8", 3 * 64, 64, rng), layer("int8", 64, 64, rng)
    w, b = rng.normal(size=64).astype(F32), rng.normal(size=64).astype(F32)
    x = rng.normal(size=(batch, 20, 64)).astype(F32)
    lengths = rng.integers(1, 21, batch)
    expected = nn.layer_norm(plain_attention_block(x, qkv, proj, 4, 4, lengths=lengths), w, b, 1e-5,
                             residual=x)
    got = nn.attention_block(x, qkv, proj, 4, lengths=lengths, residual_norm=(w, b, 1e-5))
    assert np.array_equal(got, expected)


def test_residual_norm_rejects_bad_input(rng):
    up, down = layer("int8", 96, 64, rng), layer("int8", 64, 96, rng)
    x = rng.normal(size=(300, 64)).astype(F32)
    w, b = np.ones(64, F32), np.zeros(64, F32)
    with pytest.raises(TypeError, match=r"residual_norm: expected \(weight, bias, eps\)"):
        nn.mlp(x, up, down, residual_norm=(w, b))
    with pytest.raises(ValueError, match="residual_norm weight: expected dimension 0 to be 64"):
        nn.mlp(x, up, down, residual_norm=(np.ones(63, F32), b, 1e-5))
    with pytest.raises(ValueError, match="eps"):
        nn.mlp(x, up, down, residual_norm=(w, b, -1.0))
    with pytest.raises(ValueError, match="the residual is the block's input, 64 wide, and the output is 32"):
        nn.mlp(x, up, layer("int8", 32, 96, rng), residual_norm=(w, b, 1e-5))
    qkv, proj = layer("int8", 3 * 64, 64, rng), layer("int8", 32, 64, rng)
    with pytest.raises(ValueError, match="the residual is the block's input"):
        nn.attention_block(x.reshape(6, 50, 64), qkv, proj, 4, residual_norm=(w, b, 1e-5))
