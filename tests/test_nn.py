"""lowbit.nn: the float building blocks of the example models, against their definitions in
float64."""
import numpy as np
import pytest

import lowbit as lb
from lowbit import nn

F32 = np.float32


def close(a, b, tol=1e-5):
    return np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def test_norms_and_activations(rng):
    x = rng.normal(size=(5, 64)).astype(F32)
    w, b = rng.normal(size=64).astype(F32), rng.normal(size=64).astype(F32)
    xd = x.astype(np.float64)
    assert close(nn.rms_norm(x, w, 1e-5), xd / np.sqrt((xd ** 2).mean(-1, keepdims=True) + 1e-5) * w)
    mu, var = xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True)
    assert close(nn.layer_norm(x, w, b, 1e-12), (xd - mu) / np.sqrt(var + 1e-12) * w + b)
    assert close(nn.silu(x), xd / (1 + np.exp(-xd)))
    s = nn.softmax(x * 30)
    e = np.exp(xd * 30 - (xd * 30).max(-1, keepdims=True))
    assert close(s, e / e.sum(-1, keepdims=True))
    for f in (nn.rms_norm(x, w), nn.layer_norm(x, w, b), nn.silu(x), s):
        assert f.dtype == F32


def test_gelu_is_the_erf_form(rng):
    import math
    x = np.concatenate([rng.normal(0, 3, 5000), [-30, -8, -1e-8, 0, 1e-8, 8, 30]]).astype(F32)
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    assert np.abs(nn.gelu(x) - exact).max() < 1e-6 * max(1, np.abs(x).max())
    y = x[:5000].reshape(50, 100).copy()
    expected = nn.gelu(y)
    assert nn.gelu(y, out=y) is y and np.array_equal(y, expected)
    with pytest.raises(ValueError, match="out"):
        nn.gelu(x, out=np.empty(3, F32))


def test_gelu_of_infinities_is_the_limit_on_every_isa(isa):
    """GELU(+inf) = +inf, GELU(-inf) = 0 (the erfc tail is 0 there; inf * 0 made both NaN), NaN
    stays NaN; the same bits on every kernel set, in and past the vector tail."""
    x = np.array([np.inf, -np.inf, np.nan, 3e38, -3e38, 1.0] * 7, F32)
    got = nn.gelu(x)
    expected = np.array([np.inf, 0.0, np.nan, 3e38, 0.0, 0.8413447] * 7, F32)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert not np.signbit(got[1::6]).any()
    with lb.use_isa("ref"):
        np.testing.assert_array_equal(got, nn.gelu(x))
    # the Linear epilogue is the same function: outputs of +-inf (from the bias) become inf, 0
    bias = np.array([np.inf, -np.inf] * 8, F32)
    layer = lb.Linear(np.ones((16, 32), F32), bias, epilogue="gelu")
    np.testing.assert_array_equal(layer(np.ones((3, 32), F32)), np.tile([np.inf, 0.0], (3, 8)))


def test_gelu_tanh_is_the_tanh_approximation(rng):
    x = np.concatenate([rng.normal(0, 3, 5000), [-1e4, -30, -8, -1e-8, 0, 1e-8, 8, 30, 1e4]]).astype(F32)
    xd = x.astype(np.float64)
    exact = 0.5 * xd * (1 + np.tanh(np.sqrt(2 / np.pi) * (xd + 0.044715 * xd ** 3)))
    got = nn.gelu(x, approximate="tanh")
    assert got.dtype == F32 and np.isfinite(got).all()
    assert (np.abs(got - exact) <= 1e-6 * np.maximum(1, np.abs(exact))).all()
    assert np.abs(got - exact).max() > 0 and not np.array_equal(got, nn.gelu(x))  # not the erf form
    assert np.abs(nn.gelu(x) - got).max() < 1e-3 * np.abs(x).max()  # ... but close to it
    y = x[:5000].reshape(50, 100).copy()
    expected = nn.gelu(y, approximate="tanh")
    assert nn.gelu(y, out=y, approximate="tanh") is y and np.array_equal(y, expected)
    with pytest.raises(ValueError, match="approximate"):
        nn.gelu(x, approximate="sigmoid")
    ends = nn.gelu(np.array([-np.inf, np.inf, np.nan, -3e38, 3e38], F32), approximate="tanh")
    np.testing.assert_array_equal(ends[:2], [0, np.inf])
    assert np.isnan(ends[2]) and ends[3] == 0 and ends[4] == F32(3e38)


def test_geglu_is_gelu_tanh_of_gate_times_up(rng):
    gu = rng.normal(0, 2, (7, 2 * 96)).astype(F32)
    gate, up = gu[:, :96], gu[:, 96:]  # halves of a fused gate/up projection: strided views
    got = nn.geglu(gate, up)
    np.testing.assert_array_equal(got, nn.gelu(np.ascontiguousarray(gate), approximate="tanh") * up)
    g = gate.astype(np.float64)
    assert close(got, 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * up)


def test_layer_norm_with_residual_and_softmax_mask(rng):
    x, r = rng.normal(size=(70, 384)).astype(F32), rng.normal(size=(70, 384)).astype(F32)
    w, b = rng.normal(size=384).astype(F32), rng.normal(size=384).astype(F32)
    v = (x + r).astype(np.float64)
    expected = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-12) * w + b
    assert close(nn.layer_norm(x, w, b, residual=r), expected)
    s = rng.normal(size=(4, 9)).astype(F32)
    s[:, 5:] = -np.inf
    p = nn.softmax(s)
    assert (p[:, 5:] == 0).all() and close(p.sum(-1), np.ones(4), 1e-6)
    assert np.isnan(nn.softmax(np.full((1, 3), -np.inf, F32))).all()
    assert close(nn.softmax(s[:, :5], axis=0).sum(0), np.ones(5), 1e-6)


@pytest.mark.parametrize("size", [(3, 17), (300, 384)])  # serial, and split over threads
def test_float_helpers_are_bit_identical_on_every_isa(isa, rng, size):
    x = rng.normal(0, 3, size).astype(F32)
    w, b = rng.normal(size=size[1]).astype(F32), rng.normal(size=size[1]).astype(F32)
    def helpers():
        return [nn.gelu(x), nn.gelu(x, approximate="tanh"), nn.layer_norm(x, w, b, residual=x),
                nn.rms_norm(x, w), nn.softmax(x)]
    got = helpers()
    with lb.use_isa("ref"):
        expected = helpers()
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_rope_rotates_adjacent_pairs(rng):
    x = rng.normal(size=(7, 3, 16)).astype(F32)
    pos = np.arange(10, 17)
    cos, sin = nn.rope_tables(16, pos, base=100000.0)
    got = nn.rope(x, cos, sin)
    theta = pos[:, None] * 100000.0 ** (-np.arange(0, 16, 2) / 16)        # (tokens, pairs)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * theta)[:, None]  # pair = complex number
    expected = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    assert close(got, expected, 1e-5)


def test_swiglu_is_silu_times_up_and_reads_the_halves_of_a_fused_output(rng):
    gu = rng.normal(0, 4, (5, 2, 96)).astype(F32)
    gu[0, 0, :4] = [-np.inf, -100, 100, 0]
    gate, up = gu[..., :48], gu[..., 48:]  # strided views
    got = nn.swiglu(gate, up)
    g = gate.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = np.where(g < -88, 0.0, g / (1 + np.exp(-g))) * up
    assert got.dtype == F32 and got.shape == gate.shape
    assert close(got, expected, 1e-6)
    assert got[0, 0, 0] == 0 and got[0, 0, 1] == 0  # silu(-inf) and silu(-100): 0
    np.testing.assert_array_equal(got, nn.swiglu(np.ascontiguousarray(gate), np.ascontiguousarray(up)))
    np.testing.assert_array_equal(got, nn.swiglu(gate, np.ascontiguousarray(up)))  # strides differ
    with pytest.raises(ValueError, match="one shape"):
        nn.swiglu(gate, up[..., :47])


@pytest.mark.parametrize("neox", [False, True])
def test_rope_is_float32_products_then_sums_bit_for_bit(rng, neox):
    # (a, b) -> (a c - b s, a s + b c) with every product rounded to float32 first (no fma): what
    # numpy's float32 arithmetic gives, on every machine
    x = rng.normal(size=(5, 3, 64)).astype(F32)
    cos, sin = nn.rope_tables(64, np.arange(100, 105))
    if neox:
        x0, x1 = x[..., :32], x[..., 32:]
    else:
        x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    r0, r1 = x0 * c - x1 * s, x0 * s + x1 * c
    expected = (np.concatenate([r0, r1], -1) if neox
                else np.stack([r0, r1], -1).reshape(x.shape))
    np.testing.assert_array_equal(nn.rope(x, cos, sin, style="neox" if neox else "pairs"), expected)
    with pytest.raises(ValueError, match="even head_dim"):
        nn.rope(x[..., :63], cos, sin)
    with pytest.raises(ValueError, match="cos"):
        nn.rope(x, cos[:4], sin)


def test_rope_neox_rotates_halves(rng):
    x = rng.normal(size=(7, 3, 16)).astype(F32)
    pos = np.arange(10, 17)
    cos, sin = nn.rope_tables(16, pos, base=10000.0)
    got = nn.rope(x, cos, sin, style="neox")
    theta = pos[:, None] * 10000.0 ** (-np.arange(0, 16, 2) / 16)
    z = (x[..., :8] + 1j * x[..., 8:]) * np.exp(1j * theta)[:, None]  # pair i = (x[i], x[i + 8])
    assert close(got, np.concatenate([z.real, z.imag], axis=-1), 1e-5)
    assert got.dtype == F32 and got.shape == x.shape
    np.testing.assert_array_equal(nn.rope(x, cos, sin), nn.rope(x, cos, sin, style="pairs"))
    # the two layouts are the same rotation of permuted coordinates
    perm = np.arange(16).reshape(2, 8).T.reshape(-1)  # pairs order (0, 8, 1, 9, ...)
    np.testing.assert_array_equal(nn.rope(x[..., perm], cos, sin)[..., np.argsort(perm)], got)
    with pytest.raises(ValueError, match="style"):
        nn.rope(x, cos, sin, style="gptj")


def test_rms_norm_per_head_over_the_last_axis(rng):
    """QK-norm (Gemma 3, Qwen 3): rms_norm of (tokens, heads, head_dim) with a (head_dim,) weight
    normalises each head's vector alone, the same as row by row."""
    t, h, d = 5, 4, 256
    qk = rng.normal(0, 3, (t, h * d)).astype(F32)
    w = rng.normal(size=d).astype(F32)
    got = nn.rms_norm(qk.reshape(t, h, d), w, 1e-6)
    assert got.shape == (t, h, d)
    x = qk.reshape(t, h, d).astype(np.float64)
    assert close(got, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w)
    np.testing.assert_array_equal(got.reshape(t * h, d), nn.rms_norm(qk.reshape(t * h, d), w, 1e-6))
    # a strided view: the k part of a fused qkv output
    fused = rng.normal(size=(t, 3 * d)).astype(F32)
    k = fused[:, d:2 * d].reshape(t, 1, d)
    np.testing.assert_array_equal(nn.rms_norm(k, w, 1e-6),
                                  nn.rms_norm(np.ascontiguousarray(k), w, 1e-6))


def naive_attention(q, k, v):
    """Causal grouped-query attention in float64; q (t, h, d) are the last t of k, v (n, kvh, d)."""
    t, h, d = q.shape
    n, kvh, _ = k.shape
    out = np.zeros((t, h, d))
    for i in range(t):
        for j in range(h):
            kk, vv = k[: n - t + i + 1, j // (h // kvh)], v[: n - t + i + 1, j // (h // kvh)]
            s = kk @ q[i, j] / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, j] = (p / p.sum()) @ vv
    return out.reshape(t, h * d)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (4, 1)])
def test_kv_cache_attention_matches_definition_batched_and_step_by_step(rng, heads, kv_heads):
    d, n = 8, 23
    q = rng.normal(size=(n, heads, d)).astype(F32)
    k = rng.normal(size=(n, kv_heads, d)).astype(F32)
    v = rng.normal(size=(n, kv_heads, d)).astype(F32)
    expected = naive_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    whole = nn.KVCache(kv_heads, d, capacity=4)  # grows past its first capacity
    whole.append(k, v)
    assert close(whole.attend(q), expected)
    steps = nn.KVCache(kv_heads, d, capacity=4)
    rows = []
    for a, b in ((0, 10), (10, 11), (11, 23)):  # a prompt, one token, a chunk
        steps.append(k[a:b], v[a:b])
        rows.append(steps.attend(q[a:b]))
    assert close(np.concatenate(rows), expected)
    assert steps.length == n
    for cache in (whole, steps):  # the 32-key blocks give back what went in
        np.testing.assert_array_equal(cache.keys(), k)
        np.testing.assert_array_equal(cache.values(), v)


# ---------------------------------------------------------------------------------------------
# lb.nn.attention: fused softmax attention (masks, causal, GQA, strided views, out=)


def visible_keys(b, Sq, Sk, lengths, causal, window):
    """Batch b's key count n (its first min(lengths[b], Sk) keys) and the (Sq, Sk) mask of the
    keys each query sees (causal: j <= Sk - Sq + i; window W: j > Sk - Sq + i - W)."""
    n = Sk if lengths is None else max(0, min(int(lengths[b]), Sk))
    visible = np.broadcast_to(np.arange(Sk)[None, :] < n, (Sq, Sk))
    if causal:
        visible = visible & (np.arange(Sk)[None, :] <= Sk - Sq + np.arange(Sq)[:, None])
    if window is not None:
        visible = visible & (np.arange(Sk)[None, :] > Sk - Sq + np.arange(Sq)[:, None] - window)
    return n, visible


def reference_attention(q, k, v, lengths=None, causal=False, scale=None, window=None):
    """The definition in float64: per batch and head, scores masked to the keys the query sees
    (its batch's first min(lengths[b], Sk) keys; causal: j <= Sk - Sq + i; window W: j > Sk - Sq +
    i - W), softmax, weights @ v; a query that sees no key gets zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, Sq, H, d = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros((B, Sq, H, d))
    for b in range(B):
        n, visible = visible_keys(b, Sq, Sk, lengths, causal, window)
        seen = visible.any(1)
        for h in range(H):
            kvh = h // (H // Hkv)
            s = np.where(visible, q[b, :, h] @ k[b, :, kvh].T * scale, -np.inf)
            m = np.where(seen, s.max(1, initial=-np.inf), 0)[:, None]
            p = np.where(visible, np.exp(s - m), 0)
            p[seen] /= p[seen].sum(1, keepdims=True)
            out[b, :, h] = p @ v[b, :, kvh]
    return out


def qkv(rng, B, Sq, Sk, H, Hkv, d, sigma=1.0):
    return (rng.normal(0, sigma, (B, Sq, H, d)).astype(F32),
            rng.normal(0, sigma, (B, Sk, Hkv, d)).astype(F32),
            rng.normal(0, 1, (B, Sk, Hkv, d)).astype(F32))


def mixed_lengths(B, Sk):
    """Per-batch lengths: a partial one, 0 (no key at all) and one past Sk (clamped to Sk)."""
    return np.array([Sk // 2 + 1, 0, Sk + 7][:B], np.int64)


# (B, Sq, Sk, H, Hkv, d): 1, 2, 31..33, 63..65 and 130 queries / keys cross the 32-key tile and
# the 64-query task block; Sq < Sk is a key/value cache (Sq = 1: one decoded token), Sq > Sk
# leaves the first causal queries without a key.
ATTN_SHAPES = [
    (1, 1, 1, 1, 1, 1), (2, 2, 2, 4, 4, 8), (1, 31, 31, 9, 3, 32), (3, 32, 32, 6, 1, 33),
    (2, 33, 33, 4, 4, 64), (1, 63, 63, 9, 3, 80), (2, 64, 64, 1, 1, 8), (1, 65, 65, 6, 1, 32),
    (2, 130, 130, 4, 4, 33), (1, 1, 130, 9, 3, 64), (3, 1, 65, 6, 1, 80), (2, 1, 33, 4, 4, 8),
    (1, 2, 64, 4, 4, 32), (2, 31, 63, 9, 3, 8), (1, 65, 130, 6, 1, 64), (1, 130, 33, 4, 4, 8),
    (2, 64, 31, 9, 3, 32), (1, 33, 1, 1, 1, 80), (3, 65, 2, 4, 4, 1), (2, 130, 64, 6, 1, 33),
]


@pytest.mark.parametrize("with_lengths", [False, True], ids=["all_keys", "lengths"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,d", ATTN_SHAPES)
def test_attention_matches_float64_definition(rng, B, Sq, Sk, H, Hkv, d, causal, with_lengths):
    q, k, v = qkv(rng, B, Sq, Sk, H, Hkv, d)
    lengths = mixed_lengths(B, Sk) if with_lengths else None
    got = nn.attention(q, k, v, lengths=lengths, causal=causal)
    assert got.shape == (B, Sq, H, d) and got.dtype == F32 and got.flags.c_contiguous
    expected = reference_attention(q, k, v, lengths, causal)
    assert np.isfinite(got).all()
    assert close(got, expected, 1e-5), np.abs(got - expected).max()
    if with_lengths and B >= 2:
        assert not got[1].any()  # lengths 0: every query of batch 1 gets zeros


# windows of 1 key, inside the 32-key tile, at and across it, across the 64-query block, and
# wider than the keys
@pytest.mark.parametrize("window", [1, 5, 32, 33, 64, 100, 500])
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,d", [(2, 130, 130, 4, 1, 32), (1, 1, 200, 4, 2, 16),
                                             (2, 65, 200, 2, 2, 8), (1, 70, 31, 3, 1, 8)])
def test_attention_window_matches_float64_definition(rng, B, Sq, Sk, H, Hkv, d, window):
    q, k, v = qkv(rng, B, Sq, Sk, H, Hkv, d)
    for kw in (dict(causal=True), dict(), dict(causal=True, lengths=mixed_lengths(B, Sk))):
        got = nn.attention(q, k, v, window=window, **kw)
        assert close(got, reference_attention(q, k, v, window=window, **kw), 1e-5), kw
    if window >= Sk:  # every key is in the window: the same as no window, bit for bit
        np.testing.assert_array_equal(nn.attention(q, k, v, causal=True, window=window),
                                      nn.attention(q, k, v, causal=True))


def test_attention_window_one_sees_its_own_key(rng):
    q, k, v = qkv(rng, 2, 40, 70, 4, 2, 16)
    got = nn.attention(q, k, v, causal=True, window=1)  # each query sees key p = 30 + i only
    np.testing.assert_array_equal(got, v[:, 30:].repeat(2, axis=2))
    # non-causal window 1 sees keys from p on (all later keys too)
    assert close(nn.attention(q, k, v, window=1), reference_attention(q, k, v, window=1))


@pytest.mark.parametrize("window", [None, 1, 20, 64])
@pytest.mark.parametrize("h,kvh", [(4, 1), (9, 3), (9, 1), (2, 2)])
def test_kv_cache_window_is_bit_identical_batched_and_step_by_step(rng, window, h, kvh):
    """A query's result does not depend on how the context was fed (the property a model's
    logits rely on): the whole prompt at once, token by token, or in uneven chunks. (A decode
    step computes the heads that share a KV head as one tile, 9 of them in two.)"""
    d, n = 32, 150
    q = rng.normal(size=(n, h, d)).astype(F32)
    k = rng.normal(size=(n, kvh, d)).astype(F32)
    v = rng.normal(size=(n, kvh, d)).astype(F32)
    results = []
    for chunks in ([0, n], list(range(n + 1)), [0, 3, 70, 71, 135, n]):
        cache = nn.KVCache(kvh, d, capacity=8)
        results.append(np.concatenate([
            (cache.append(k[a:b], v[a:b]), cache.attend(q[a:b], window=window))[1]
            for a, b in zip(chunks, chunks[1:])]))
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_array_equal(results[2], results[0])
    expected = reference_attention(q[None], k[None], v[None], causal=True, window=window)
    assert close(results[0], expected.reshape(n, h * d))
    scaled = nn.KVCache(kvh, d)
    scaled.append(k, v)
    assert close(scaled.attend(q, scale=0.0625, window=window),
                 reference_attention(q[None], k[None], v[None], causal=True, scale=0.0625,
                                     window=window).reshape(n, h * d))


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "8"])
def test_attention_rejects_bad_window(rng, window):
    q, k, v = qkv(rng, 1, 3, 5, 2, 2, 8)
    with pytest.raises(ValueError, match="window"):
        nn.attention(q, k, v, window=window)


@pytest.mark.parametrize("Sq,Sk", [(130, 33), (70, 1), (5, 2)])
def test_attention_causal_queries_before_the_first_key_get_zeros(rng, Sq, Sk):
    q, k, v = qkv(rng, 2, Sq, Sk, 6, 2, 16)
    got = nn.attention(q, k, v, causal=True)
    blind = Sq - Sk  # query i sees keys j <= Sk - Sq + i: none for i < Sq - Sk
    assert (got[:, :blind] == 0).all()
    assert (np.abs(got[:, blind:]).max(axis=-1) > 0).all()
    np.testing.assert_array_equal(got[:, blind], v[:, 0].repeat(3, axis=1))  # sees key 0 alone
    assert close(got, reference_attention(q, k, v, causal=True))


def test_attention_kv_cache_decode_and_lengths_bounds(rng):
    B, Sk, H, Hkv, d = 3, 70, 8, 2, 16
    q, k, v = qkv(rng, B, 1, Sk, H, Hkv, d)
    # one new token at the end of the cache attends to every key, causal or not
    np.testing.assert_array_equal(nn.attention(q, k, v, causal=True), nn.attention(q, k, v))
    # lengths of Sk, past Sk and None agree bit for bit; negative and 0 give zeros
    full = nn.attention(q, k, v)
    np.testing.assert_array_equal(nn.attention(q, k, v, lengths=[Sk, Sk + 1, 10 ** 9]), full)
    got = nn.attention(q, k, v, lengths=np.array([0, -5, 1], np.int32))
    assert not got[:2].any()
    np.testing.assert_array_equal(got[2], v[2, :1].repeat(H // Hkv, axis=1))  # one key: its v
    # lengths = L is the same as slicing the keys to L (uint lengths accepted too)
    np.testing.assert_array_equal(nn.attention(q, k, v, lengths=np.array([40, 40, 40], np.uint8)),
                                  nn.attention(q, np.ascontiguousarray(k[:, :40]),
                                               np.ascontiguousarray(v[:, :40])))
    # causal masks with lengths together: a chunk of 5 queries over a 70-key cache of 40 valid keys
    q5 = rng.normal(size=(B, 5, H, d)).astype(F32)
    lengths = np.array([40, 68, 3])
    assert close(nn.attention(q5, k, v, lengths=lengths, causal=True),
                 reference_attention(q5, k, v, lengths, causal=True))


def test_attention_empty_cache_and_no_queries_as_slices(rng):
    q, k, v = qkv(rng, 2, 3, 5, 4, 2, 8)
    got = nn.attention(q, k[:, :0], v[:, :0])  # an empty cache: no key at all, zeros
    assert got.shape == (2, 3, 4, 8) and not got.any()
    assert not nn.attention(q, k[:, :0], v[:, :0], causal=True, lengths=[4, 4]).any()
    assert nn.attention(q[:, :0], k, v, causal=True).shape == (2, 0, 4, 8)


def test_attention_empty_arrays():
    q = np.ones((2, 3, 4, 8), F32)
    empty = np.zeros((2, 0, 2, 8), F32)
    assert empty.flags.c_contiguous
    got = nn.attention(q, empty, empty)
    assert got.shape == (2, 3, 4, 8) and not got.any()
    assert nn.attention(np.zeros((2, 0, 4, 8), F32), q[:, :, :2], q[:, :, :2]).shape == (2, 0, 4, 8)


def test_attention_gqa_heads_read_their_kv_head(rng):
    # H = 6 over Hkv = 2: heads 0..2 read kv head 0, heads 3..5 kv head 1, i.e. the same result as
    # the kv heads repeated (bit for bit: the same arithmetic per head)
    q, k, v = qkv(rng, 2, 33, 40, 6, 2, 16)
    got = nn.attention(q, k, v, causal=True)
    np.testing.assert_array_equal(got, nn.attention(q, k.repeat(3, axis=2), v.repeat(3, axis=2),
                                                    causal=True))
    assert not np.array_equal(got, nn.attention(q, np.tile(k, (1, 1, 3, 1)),
                                                np.tile(v, (1, 1, 3, 1)), causal=True))


# shapes above kSerialElems * 8 run on the thread pool; the others on the caller's thread
ATTN_BIT_SHAPES = [
    (2, 130, 130, 4, 4, 32), (2, 130, 65, 9, 3, 33), (2, 1, 600, 8, 2, 64), (3, 65, 31, 6, 1, 80),
    (1, 31, 33, 9, 3, 8),
]


@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,d", ATTN_BIT_SHAPES)
def test_attention_is_bit_identical_on_every_isa(isa, rng, B, Sq, Sk, H, Hkv, d):
    q, k, v = qkv(rng, B, Sq, Sk, H, Hkv, d)
    lengths = np.array([Sk, Sk - 3, 1][:B])
    calls = [dict(), dict(causal=True), dict(lengths=lengths), dict(lengths=lengths, causal=True),
             dict(causal=True, window=33), dict(window=70, lengths=lengths)]
    got = [nn.attention(q, k, v, **c) for c in calls]
    with lb.use_isa("ref"):
        expected = [nn.attention(q, k, v, **c) for c in calls]
    assert lb._core.isa() == isa
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert close(got[3], reference_attention(q, k, v, lengths, True))


def test_attention_bit_identical_across_isas_and_thread_counts(rng, threads):
    original = lb._core.isa()
    cases = [qkv(rng, *s) for s in ATTN_BIT_SHAPES[:3]]
    results = {}
    try:
        for name in lb._core.available_isas():
            lb._core.set_isa(name)
            assert lb._core.isa() == name
            for n in (1, 2, 3):
                lb.set_num_threads(n)
                assert lb.get_num_threads() == n
                results[name, n] = [nn.attention(q, k, v, causal=c, lengths=[k.shape[1] - 1] * len(k),
                                                 window=w)
                                    for q, k, v in cases for c in (False, True) for w in (None, 40)]
    finally:
        lb._core.set_isa(original)
    assert lb._core.isa() == original
    assert len(results) == 3 * len(lb._core.available_isas())
    first = results[lb._core.available_isas()[-1], 1]
    for key, outs in results.items():
        for g, e in zip(outs, first):
            assert np.array_equal(g, e), key


@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2)])
def test_attention_fused_qkv_views_equal_contiguous_copies(rng, H, Hkv):
    B, S, d = 2, 70, 16
    fused = rng.normal(size=(B, S, (H + 2 * Hkv) * d)).astype(F32)  # one QKV projection output
    q = fused[..., : H * d].reshape(B, S, H, d)
    k = fused[..., H * d:(H + Hkv) * d].reshape(B, S, Hkv, d)
    v = fused[..., (H + Hkv) * d:].reshape(B, S, Hkv, d)
    for a in (q, k, v):
        assert np.shares_memory(a, fused) and not a.flags.c_contiguous  # strided views
    copies = [np.ascontiguousarray(a) for a in (q, k, v)]
    for kw in (dict(), dict(causal=True), dict(lengths=[50, 3])):
        got = nn.attention(q, k, v, **kw)
        np.testing.assert_array_equal(got, nn.attention(*copies, **kw))
        assert close(got, reference_attention(q, k, v, **kw))
    # heads-major storage (B, Hkv, S, d) seen as (B, S, Hkv, d), a query slice with a stride,
    # and views the kernel cannot take (reversed tokens, a strided last axis) copied on the way
    kh = np.ascontiguousarray(copies[1].transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(nn.attention(q[:, ::3], kh, v, causal=True),
                                  nn.attention(np.ascontiguousarray(q[:, ::3]), *copies[1:],
                                               causal=True))
    np.testing.assert_array_equal(nn.attention(q, k[:, ::-1], v[:, ::-1]),
                                  nn.attention(*copies[:1], np.ascontiguousarray(k[:, ::-1]),
                                               np.ascontiguousarray(v[:, ::-1])))
    wide = np.repeat(copies[0], 2, axis=-1)[..., ::2]  # last-axis stride 8 bytes
    np.testing.assert_array_equal(nn.attention(wide, k, v), nn.attention(*copies))


def test_attention_scale(rng):
    q, k, v = qkv(rng, 2, 33, 40, 4, 2, 24)
    default = nn.attention(q, k, v)
    np.testing.assert_array_equal(nn.attention(q, k, v, scale=1 / np.sqrt(24)), default)
    for s in (0.37, 2.5, -1.0):
        got = nn.attention(q, k, v, scale=s, causal=True)
        assert close(got, reference_attention(q, k, v, causal=True, scale=s))
    assert not np.array_equal(nn.attention(q, k, v, scale=0.37), default)
    # scale 0: every key weighs the same, the output is the mean of the visible values
    got = nn.attention(q, k, v, scale=0.0, lengths=[40, 7])
    assert close(got[0], v[0].mean(0).repeat(2, axis=0)[None].repeat(33, axis=0), 1e-6)
    assert close(got[1], v[1, :7].mean(0).repeat(2, axis=0)[None].repeat(33, axis=0), 1e-6)


def test_attention_large_scores_do_not_overflow(rng):
    B, Sq, Sk, H, d = 2, 40, 70, 4, 16
    q = rng.uniform(80, 120, (B, Sq, H, d)).astype(F32) * rng.choice([-1, 1], (B, Sq, H, d)).astype(F32)
    k = rng.uniform(80, 120, (B, Sk, H, d)).astype(F32) * rng.choice([-1, 1], (B, Sk, H, d)).astype(F32)
    v = rng.normal(size=(B, Sk, H, d)).astype(F32)
    for kw in (dict(), dict(causal=True), dict(lengths=[33, 70])):
        got = nn.attention(q, k, v, **kw)
        assert np.isfinite(got).all()  # scores up to ~1e5: exp(s - max) only
        assert close(got, reference_attention(q, k, v, **kw), 1e-5)
    # a huge score next to tiny ones picks its value exactly; equal huge scores average
    q1 = np.full((1, 1, 1, 4), 100, F32)
    k1 = np.zeros((1, 3, 1, 4), F32)
    k1[0, 1] = 100
    v1 = np.arange(12, dtype=F32).reshape(1, 3, 1, 4)
    np.testing.assert_array_equal(nn.attention(q1, k1, v1)[0, 0, 0], v1[0, 1, 0])
    k1[0, 2] = 100
    np.testing.assert_array_equal(nn.attention(q1, k1, v1)[0, 0, 0], (v1[0, 1, 0] + v1[0, 2, 0]) / 2)
    k1[:] = -100  # all scores hugely negative and equal: still the mean, no 0/0
    np.testing.assert_array_equal(nn.attention(q1, k1, v1)[0, 0, 0], v1[0, :, 0].mean(0))


@pytest.mark.parametrize("Sk", [1, 31, 65, 130])
def test_attention_equal_scores_give_the_mean_of_v(rng, Sk):
    B, Sq, H, d = 2, 70, 4, 33
    q = np.zeros((B, Sq, H, d), F32)  # every score 0: exp(0) = 1 exactly, weights all equal
    k = rng.normal(size=(B, Sk, 2, d)).astype(F32)
    v = rng.integers(-50, 50, (B, Sk, 2, d)).astype(F32)  # integer sums: exact in float32
    got = nn.attention(q, k, v)
    mean = (v.astype(np.float64).sum(1) / Sk).astype(F32)  # correctly rounded, as the kernel's /
    np.testing.assert_array_equal(got, np.broadcast_to(mean.repeat(2, axis=1)[:, None], got.shape))
    # causal: query i of the last Sk positions averages keys 0..Sk - Sq + i
    got = nn.attention(q, k, v, causal=True)
    counts = np.arange(Sq) + Sk - Sq + 1
    cum = v.astype(np.float64).cumsum(1)
    for i in range(Sq):
        if counts[i] <= 0:
            assert not got[:, i].any()
        else:
            want = (cum[:, counts[i] - 1] / counts[i]).astype(F32).repeat(2, axis=1)
            np.testing.assert_array_equal(got[:, i], want)
    # equal (non-zero) scores from identical keys: the mean within rounding
    k[:] = k[:, :1]
    got = nn.attention(rng.normal(size=(B, Sq, H, d)).astype(F32), k, v)
    assert close(got, np.broadcast_to(mean.repeat(2, axis=1)[:, None], got.shape), 1e-6)


def test_attention_out(rng):
    B, Sq, Sk, H, Hkv, d = 3, 33, 65, 6, 2, 40
    q, k, v = qkv(rng, B, Sq, Sk, H, Hkv, d)
    for kw in (dict(), dict(causal=True, lengths=[0, 20, 99]), dict(scale=0.5)):
        expected = nn.attention(q, k, v, **kw)
        out = np.full((B, Sq, H, d), np.nan, F32)  # every element must be written, zeros too
        assert nn.attention(q, k, v, out=out, **kw) is out
        np.testing.assert_array_equal(out, expected)
    # a buffer reused from call to call
    q2 = rng.normal(size=q.shape).astype(F32)
    assert nn.attention(q2, k, v, out=out) is out
    np.testing.assert_array_equal(out, nn.attention(q2, k, v))


def test_attention_out_rejects_bad_buffers(rng):
    B, S, H, d = 2, 9, 4, 8
    q, k, v = qkv(rng, B, S, S, H, H, d)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 9, 4, 8\)"):
        nn.attention(q, k, v, out=np.empty((2, 9, 4, 9), F32))
    with pytest.raises(ValueError, match="out: expected shape"):
        nn.attention(q, k, v, out=np.empty((2 * 9 * 4 * 8,), F32))
    with pytest.raises((ValueError, TypeError), match="float32"):
        nn.attention(q, k, v, out=np.empty((B, S, H, d), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        nn.attention(q, k, v, out=np.empty((B, S, H, 2 * d), F32)[..., ::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        nn.attention(q, k, v, out=np.empty((B, H, S, d), F32).transpose(0, 2, 1, 3))
    ro = np.empty((B, S, H, d), F32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        nn.attention(q, k, v, out=ro)
    with pytest.raises(TypeError, match="numpy array"):
        nn.attention(q, k, v, out=[[0.0]])
    for inp in (q, k, v):
        before = inp.copy()
        with pytest.raises(ValueError, match="overlap"):
            nn.attention(q, k, v, out=inp)
        np.testing.assert_array_equal(inp, before)  # rejected before anything was written
    fused = rng.normal(size=(B, S, 3 * H * d)).astype(F32)
    qf = fused[..., : H * d].reshape(B, S, H, d)
    out = fused.reshape(-1)[: B * S * H * d].reshape(B, S, H, d)  # contiguous, part of q's buffer
    assert out.flags.c_contiguous
    with pytest.raises(ValueError, match="overlap"):
        nn.attention(qf, k, v, out=out)


@pytest.mark.parametrize("call,err,match", [
    (lambda q, k, v: nn.attention(q.astype(np.float64), k, v), TypeError, "q: expected float32"),
    (lambda q, k, v: nn.attention(q, k.astype(np.float16), v), TypeError, "k: expected float32"),
    (lambda q, k, v: nn.attention(q, k, v.astype(np.float64)), TypeError, "v: expected float32"),
    (lambda q, k, v: nn.attention(q[0], k, v), ValueError, "q: expected 4 dimensions"),
    (lambda q, k, v: nn.attention(q, k[None], v), ValueError, "k: expected 4 dimensions"),
    (lambda q, k, v: nn.attention(q, k, v[..., 0]), ValueError, "v: expected 4 dimensions"),
    (lambda q, k, v: nn.attention(q, np.concatenate([k, k], 2), np.concatenate([v, v], 2)), ValueError,
     r"k: expected shape \(2, keys, kv_heads, 8\) with kv_heads dividing 6, got \(2, 9, 4, 8\)"),
    (lambda q, k, v: nn.attention(q, k[:, :, :0], v[:, :, :0]), ValueError, "kv_heads"),
    (lambda q, k, v: nn.attention(q, k[:1], v[:1]), ValueError, r"k: expected shape \(2, keys"),
    (lambda q, k, v: nn.attention(q, k[..., :7], v[..., :7]), ValueError, "k: expected shape"),
    (lambda q, k, v: nn.attention(q, k, v[:, :4]), ValueError, "v: expected k's shape"),
    (lambda q, k, v: nn.attention(q, k, v[:, :, :1]), ValueError, "v: expected k's shape"),
    (lambda q, k, v: nn.attention(q, k, v[..., :7]), ValueError, "v: expected k's shape"),
    (lambda q, k, v: nn.attention(q, k, v[:1]), ValueError, "v: expected k's shape"),
    (lambda q, k, v: nn.attention(q, k, v, lengths=[3.0, 4.0]), TypeError, "lengths: expected integers"),
    (lambda q, k, v: nn.attention(q, k, v, lengths=np.array([True, False])), TypeError, "lengths"),
    (lambda q, k, v: nn.attention(q, k, v, lengths=["3", "4"]), TypeError, "lengths"),
    (lambda q, k, v: nn.attention(q, k, v, lengths=[3, 4, 5]), ValueError, "lengths"),
    (lambda q, k, v: nn.attention(q, k, v, lengths=[[3, 4]]), ValueError, "lengths"),
    (lambda q, k, v: nn.attention(q, k, v, lengths=3), ValueError, "lengths"),
])
def test_attention_rejects_bad_input(rng, call, err, match):
    q, k, v = qkv(rng, 2, 5, 9, 6, 2, 8)
    with pytest.raises(err, match=match):
        call(q, k, v)


# ---------------------------------------------------------------------------------------------
# out= on layer_norm / rms_norm


def norm_inputs(rng, shape):
    n = shape[-1]
    return (rng.normal(0, 3, shape).astype(F32), rng.normal(size=shape).astype(F32),
            rng.normal(size=n).astype(F32), rng.normal(size=n).astype(F32))


NORMS = {  # name: f(x, residual, weight, bias, out)
    "rms_norm": lambda x, r, w, b, out=None: nn.rms_norm(x, w, 1e-5, out=out),
    "layer_norm": lambda x, r, w, b, out=None: nn.layer_norm(x, w, b, 1e-12, out=out),
    "layer_norm_residual": lambda x, r, w, b, out=None: nn.layer_norm(x, w, b, 1e-12, residual=r,
                                                                      out=out),
}


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("shape", [(1, 17), (5, 64), (300, 384), (2, 3, 40), (70,)])
def test_norm_out_is_bit_identical_to_a_new_array(rng, name, shape):
    f = NORMS[name]
    x, r, w, b = norm_inputs(rng, shape)
    expected = f(x, r, w, b)
    assert expected.shape == shape
    out = np.full(shape, np.nan, F32)
    x0, r0 = x.copy(), r.copy()
    assert f(x, r, w, b, out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(x, x0)  # the inputs untouched
    np.testing.assert_array_equal(r, r0)
    assert f(x + 1, r, w, b, out) is out  # reused
    np.testing.assert_array_equal(out, f(x + 1, r, w, b))


@pytest.mark.parametrize("shape", [(1, 17), (5, 64), (300, 384)])
def test_norm_in_place_matches_out_of_place(rng, shape):
    x, r, w, b = norm_inputs(rng, shape)
    cases = [  # (expected, the call writing in place, the array it writes)
        (nn.rms_norm(x, w), lambda xc, rc: nn.rms_norm(xc, w, out=xc), "x"),
        (nn.layer_norm(x, w, b), lambda xc, rc: nn.layer_norm(xc, w, b, out=xc), "x"),
        (nn.layer_norm(x, w, b, residual=r), lambda xc, rc: nn.layer_norm(xc, w, b, residual=rc, out=xc), "x"),
        (nn.layer_norm(x, w, b, residual=r), lambda xc, rc: nn.layer_norm(xc, w, b, residual=rc, out=rc), "r"),
    ]
    for expected, call, target in cases:
        xc, rc = x.copy(), r.copy()
        got = call(xc, rc)
        assert got is (xc if target == "x" else rc)
        np.testing.assert_array_equal(got, expected)
        if target == "r":
            np.testing.assert_array_equal(xc, x)
        else:
            np.testing.assert_array_equal(rc, r)


@pytest.mark.parametrize("shape", [(2, 3, 40), (70,)])
def test_norm_in_place_with_leading_dims(rng, shape):
    x, r, w, b = norm_inputs(rng, shape)
    expected = nn.rms_norm(x, w)
    xc = x.copy()
    assert nn.rms_norm(xc, w, out=xc) is xc
    np.testing.assert_array_equal(xc, expected)
    expected = nn.layer_norm(x, w, b, residual=r)
    rc = r.copy()
    assert nn.layer_norm(x, w, b, residual=rc, out=rc) is rc
    np.testing.assert_array_equal(rc, expected)


def test_norm_out_rejects_overlap_and_bad_buffers(rng):
    n = 32
    buf = rng.normal(size=(7, n)).astype(F32)
    x, r = buf[:6], rng.normal(size=(6, n)).astype(F32)
    w, b = rng.normal(size=n).astype(F32), rng.normal(size=n).astype(F32)
    before = buf.copy()
    for call in (lambda out: nn.rms_norm(x, w, out=out), lambda out: nn.layer_norm(x, w, b, out=out)):
        with pytest.raises(ValueError, match="overlap"):
            call(buf[1:])  # x's shape, shifted a row: a partial overlap
        with pytest.raises(ValueError, match="overlap"):
            call(x[::-1])  # x's shape and memory, rows reversed
        with pytest.raises(ValueError, match=r"out: expected shape \(6, 32\)"):
            call(x[1:])
        with pytest.raises(ValueError, match=r"out: expected shape \(6, 32\)"):
            call(np.empty((6, 33), F32))
        with pytest.raises(ValueError, match=r"out: expected shape \(6, 32\)"):
            call(np.empty((6 * 32,), F32))
        with pytest.raises(ValueError, match="float32"):
            call(np.empty((6, n), np.float64))
        with pytest.raises(ValueError, match="C-contiguous"):
            call(np.empty((6, 2 * n), F32)[:, ::2])
        with pytest.raises(TypeError, match="numpy array"):
            call([[0.0] * n] * 6)
    np.testing.assert_array_equal(buf, before)  # nothing written by a rejected call
    with pytest.raises(ValueError, match="overlap"):  # overlaps residual without being it
        nn.layer_norm(r, w, b, residual=buf[:6], out=buf[1:])
    with pytest.raises(ValueError, match="overlap"):  # overlaps x while being residual's view
        nn.layer_norm(buf[:6], w, b, residual=buf[1:], out=buf[1:])
    wide = rng.normal(size=(6, 2 * n)).astype(F32)
    xs = wide[:, :n]  # contiguous rows at a wider stride: no in-place (out must be C-contiguous)
    np.testing.assert_array_equal(nn.rms_norm(xs, w), nn.rms_norm(np.ascontiguousarray(xs), w))
    with pytest.raises(ValueError):
        nn.rms_norm(xs, w, out=xs)
    np.testing.assert_array_equal(buf, before)


def test_norm_out_overlapping_weight_is_rejected_or_correct(rng):
    n = 16
    x = rng.normal(size=(5, n)).astype(F32)
    buf = rng.normal(size=(5, n)).astype(F32)
    w, b = buf[0], rng.normal(size=n).astype(F32)
    expected = nn.layer_norm(x, w.copy(), b)
    try:
        got = nn.layer_norm(x, w, b, out=buf)
    except ValueError:
        return
    np.testing.assert_array_equal(got, expected)


# precision="int8": int8 queries, keys and values, byte softmax weights (kernels.h, AttnArgs.int8)


def _int8_rows(x, axis):
    """Symmetric int8 along axis as the kernels define it: scale = amax / 127, q = round-half-
    even(x * (127 / amax)) in float32 arithmetic."""
    amax = np.abs(x).max(axis=axis, keepdims=True).astype(F32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = (F32(127) / amax).astype(F32)
        inv = np.where((amax > 0) & np.isfinite(inv), inv, F32(0)).astype(F32)
    return np.rint((x * inv).astype(F32)).astype(np.int64), (amax / F32(127)).astype(F32)


def reference_attention_int8(q, k, v, lengths=None, causal=False, scale=None, window=None):
    """precision="int8" by its definition (kernels.h, AttnArgs.int8), in numpy: exact integer dot
    products, float32 scales, scores s in log2 units; per row and 32-key block (from key 0) the
    weights as bytes u = round(180 * 2^(s - max - kb)), kb the largest round(s - max) of the
    block's keys the row sees; values per 32-key block (over the batch's first min(lengths[b],
    Sk) keys) and dimension; out = sum over blocks of (u . v_q) * 2^kb * block scale, / sum of
    2^kb * u. The kernel's 2^x is a polynomial (relative error 3e-6) and its sums run in another
    order, so a weight may round the other way: compare with a tolerance."""
    B, Sq, H, d = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    qscale = F32(1 / np.sqrt(d) if scale is None else scale) * F32(1.44269504)
    out = np.zeros((B, Sq, H, d), F32)
    for b in range(B):
        n, visible = visible_keys(b, Sq, Sk, lengths, causal, window)
        for h in range(H):
            kvh = h // (H // Hkv)
            qq, sq = _int8_rows(q[b, :, h], 1)
            kq, sk = _int8_rows(k[b, :, kvh], 1)
            s = (qq @ kq.T).astype(F32) * ((sq * qscale).astype(F32) * sk.T).astype(F32)
            m = np.where(visible, s, -np.inf).max(1, initial=-np.inf)[:, None]
            t = np.clip(np.where(visible, s - m, 0), -60, 0).astype(F32)
            kr = np.rint(t)
            o = np.zeros((Sq, d), F32)
            total = np.zeros((Sq, 1), F32)
            for j0 in range(0, n, 32):
                j1 = min(j0 + 32, n)
                seen = visible[:, j0:j1]
                kb = np.where(seen, kr[:, j0:j1], -61).max(1, keepdims=True)
                w = np.exp2((t[:, j0:j1] - kr[:, j0:j1]).astype(np.float64)) * np.exp2(kr[:, j0:j1] - kb)
                u = np.where(seen, np.rint((w.astype(F32) * F32(180)).astype(F32)), 0).astype(np.int64)
                p2 = np.exp2(kb).astype(F32)
                vq, sv = _int8_rows(v[b, j0:j1, kvh], 0)
                o = ((u @ vq).astype(F32) * p2 * sv + o).astype(F32)
                total = (total + u.sum(1, keepdims=True).astype(F32) * p2).astype(F32)
            out[b, :, h] = np.where(total > 0, o / np.where(total > 0, total, 1), 0)
    return out


@pytest.mark.parametrize("mask", ["all", "causal", "lengths", "causal_lengths", "window"])
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,d", ATTN_SHAPES[::2] + [(2, 128, 128, 12, 12, 32)])
def test_attention_int8_matches_its_definition(rng, B, Sq, Sk, H, Hkv, d, mask):
    q, k, v = qkv(rng, B, Sq, Sk, H, Hkv, d)
    opts = {"all": {}, "causal": dict(causal=True), "lengths": dict(lengths=mixed_lengths(B, Sk)),
            "causal_lengths": dict(causal=True, lengths=mixed_lengths(B, Sk)),
            "window": dict(causal=True, window=max(1, Sk // 3))}[mask]
    got = nn.attention(q, k, v, precision="int8", **opts)
    assert got.shape == (B, Sq, H, d) and got.dtype == F32 and np.isfinite(got).all()
    expected = reference_attention_int8(q, k, v, **opts)
    # (a weight rounded the other way moves an output by at most |v| / 255 of the row's sum)
    assert np.abs(got - expected).max() <= 2e-3 * np.abs(v).max(), np.abs(got - expected).max()
    exact = reference_attention(q, k, v, **opts)
    assert np.linalg.norm(got - exact) <= 0.03 * np.linalg.norm(exact) + 1e-6


@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,d", ATTN_BIT_SHAPES)
def test_attention_int8_is_bit_identical_on_every_isa(isa, rng, B, Sq, Sk, H, Hkv, d):
    q, k, v = qkv(rng, B, Sq, Sk, H, Hkv, d, sigma=3.0)
    lengths = np.array([Sk, Sk - 3, 1][:B])
    calls = [dict(), dict(causal=True), dict(lengths=lengths, causal=True),
             dict(causal=True, window=33), dict(window=70, lengths=lengths)]
    got = [nn.attention(q, k, v, precision="int8", **c) for c in calls]
    with lb.use_isa("ref"):
        expected = [nn.attention(q, k, v, precision="int8", **c) for c in calls]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_attention_int8_bit_identical_across_thread_counts(rng, threads):
    cases = [qkv(rng, *s) for s in ATTN_BIT_SHAPES[:3]]
    results = []
    for n in (1, 2, 3):
        lb.set_num_threads(n)
        results.append([nn.attention(q, k, v, causal=c, lengths=[k.shape[1] - 1] * len(k),
                                     window=w, precision="int8")
                        for q, k, v in cases for c in (False, True) for w in (None, 40)])
    for outs in results[1:]:
        for g, e in zip(outs, results[0]):
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_attention_nan_value_a_query_does_not_see_is_the_same_on_every_isa(precision):
    """A NaN value at a key a causal query does not see reached that query's fma chain (as 0 x
    NaN) whenever a later row of its tile saw the key, and tiles are 8 rows on AVX-512, 2 on AVX2:
    the float32 outputs differed per kernel set. Now float32 leaves it out entirely; int8 makes
    NaN exactly the queries whose 32-key blocks hold it, on every set."""
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 1, 40, 40, 2, 1, 16)
    v[0, 5, 0, 3] = np.nan
    results = {}
    for name in lb._core.available_isas():
        with lb.use_isa(name):
            results[name] = nn.attention(q, k, v, causal=True, precision=precision)
    first = next(iter(results.values()))
    for got in results.values():
        np.testing.assert_array_equal(got, first)
    if precision == "float32":
        assert np.isfinite(first[0, :5]).all() and np.isnan(first[0, 5:, :, 3]).all()
        assert np.isfinite(np.delete(first[0], 3, axis=2)).all()
    else:
        assert np.isnan(first[0, :32, :, 3]).all() and np.isfinite(np.delete(first[0], 3, axis=2)).all()


def test_attention_window_past_int64_means_every_key(rng):
    q, k, v = qkv(rng, 1, 5, 9, 2, 2, 8)
    for precision in ("float32", "int8"):
        np.testing.assert_array_equal(
            nn.attention(q, k, v, causal=True, window=2**70, precision=precision),
            nn.attention(q, k, v, causal=True, precision=precision))


def test_attention_int8_nan_zeros_and_equal_scores():
    """A NaN in a query, a key the query sees or a value in a 32-key block it sees gives NaN,
    never a number; a query with no key gets zeros; equal scores give the mean of v up to its
    8-bit rounding."""
    q, k, v = (np.ones((1, 40, 2, 8), F32) for _ in range(3))
    v[0, :, :, :] = np.linspace(-1, 1, 40, dtype=F32)[:, None, None]
    out = nn.attention(q, k, v, precision="int8")
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(1, keepdims=True), out.shape), atol=1 / 127)
    qn = q.copy()
    qn[0, 1, 0, 0] = np.nan
    out = nn.attention(qn, k, v, precision="int8")
    assert np.isnan(out[0, 1, 0]).all() and not np.isnan(np.delete(out[0, :, 0], 1, axis=0)).any()
    assert not np.isnan(out[0, :, 1]).any()
    kn = k.copy()
    kn[0, 5, 0, 3] = np.nan  # seen by causal queries 5.. only
    out = nn.attention(q, kn, v, causal=True, precision="int8")
    assert not np.isnan(out[0, :5, 0]).any() and np.isnan(out[0, 5:, 0]).all()
    vn = v.copy()
    vn[0, 3, 1, 2] = np.inf
    out = nn.attention(q, k, vn, precision="int8")
    assert np.isnan(out[0, :, 1, 2]).all() and np.isfinite(np.delete(out[0, :, 1], 2, axis=1)).all()
    assert not np.any(nn.attention(q, k, v, lengths=[0], precision="int8"))


def test_attention_int8_keeps_a_long_tail_of_small_weights():
    """One key scoring 6.6 above 4095 equal ones: each of those weighs 1/735 of it, below a
    byte's step of the row's largest weight, yet together they hold 85% of the row. Rounded to
    bytes of the row's largest they all vanished (output 0 instead of 0.85); with a power of two
    per 32-key block they keep 8 bits of their block's largest."""
    S, d = 4096, 8
    q = np.zeros((1, 1, 1, d), F32)
    q[..., 0] = 1
    k = np.zeros((1, S, 1, d), F32)
    k[0, 0, 0, 0] = 6.6
    v = np.zeros((1, S, 1, d), F32)
    v[0, 1:, 0, :] = 1
    exact = reference_attention(q, k, v, scale=1.0)
    got = nn.attention(q, k, v, scale=1.0, precision="int8")
    assert exact[0, 0, 0, 0] > 0.8
    np.testing.assert_allclose(got, exact, rtol=0.01)


def test_attention_int8_tiny_and_infinite_inputs():
    """Rows too small for 127 / amax (denormals) quantize to zeros instead of overflowing; an
    infinite key makes NaN only where it is seen."""
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 40, 40, 2, 2, 16)
    k[0, 3] = 1e-40  # denormal keys: scores 0
    got = nn.attention(q, k, v, precision="int8")
    assert np.isfinite(got).all()
    k[0, 7, 1, 2] = np.inf
    got = nn.attention(q, k, v, causal=True, precision="int8")
    assert np.isfinite(got[0, :7]).all() and np.isnan(got[0, 7:, 1]).all()
    assert np.isfinite(got[0, :, 0]).all()


def test_attention_int8_rejects_bad_precision_and_head_dim(rng):
    q, k, v = qkv(rng, 1, 2, 3, 1, 1, 8)
    with pytest.raises(ValueError, match="precision"):
        nn.attention(q, k, v, precision="bf16")
    big = np.zeros((1, 1, 1, 65537), F32)
    with pytest.raises(ValueError, match="head_dim <= 65536"):
        nn.attention(big, big, big, precision="int8")


def test_attention_nan_propagates_instead_of_vanishing():
    """A NaN in a query (or in a visible key) makes that output NaN: never zeros, which are the
    answer only for a query with no visible key."""
    q, k, v = (np.ones((1, 3, 2, 8), F32) for _ in range(3))
    q[0, 1, 0, 0] = np.nan
    out = nn.attention(q, k, v)
    assert np.isnan(out[0, 1, 0]).all()
    assert np.array_equal(out[0, [0, 2]], np.ones((2, 2, 8), F32))
    assert np.array_equal(out[0, 1, 1], np.ones(8, F32))
    k[0, 0, 0, 3] = np.nan
    assert np.isnan(nn.attention(q, k, v, causal=True)[0, :, 0]).all()
    assert not np.isnan(nn.attention(q, k, v, lengths=[0])).any()  # no key seen: zeros


def test_gelu_out_must_have_x_shape_and_not_overlap_it(rng):
    """out overlapping x at an offset made a silently wrong answer (x read after out overwrote
    it); out of x's size but another shape was accepted. Both are refused, nothing written."""
    buf = rng.normal(size=10).astype(F32)
    before = buf.copy()
    with pytest.raises(ValueError, match="overlap"):
        nn.gelu(buf[:8], out=buf[2:])
    with pytest.raises(ValueError, match="overlap"):
        nn.gelu(buf[2:], out=buf[:8])
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3\)"):
        nn.gelu(buf[:6].reshape(2, 3), out=np.empty(6, F32))
    with pytest.raises(ValueError, match=r"out: expected shape \(6,\)"):
        nn.gelu(buf[:6], out=np.empty((2, 3), F32))
    np.testing.assert_array_equal(buf, before)
    x = buf[:8].copy()
    expected = nn.gelu(x)
    assert nn.gelu(x, out=x) is x and np.array_equal(x, expected)  # in place: still fine
    y = buf.astype(np.float64)  # converted first: out may then share nothing with the copy
    out = np.empty(10, F32)
    np.testing.assert_array_equal(nn.gelu(y, out=out), nn.gelu(buf))


def strided_inputs(rng, n):
    """Valid float32 arrays (rows, n) of layouts the kernels do not read as they are."""
    row = rng.normal(size=n).astype(F32)
    flat = rng.normal(size=n + 5).astype(F32)
    rec = np.zeros(4, dtype=[("a", "<f4", (n,)), ("b", "<i2")])  # 4 n + 2 byte records
    rec["a"] = rng.normal(size=(4, n))
    wide = rng.normal(size=(3, 2 * n)).astype(F32)
    return {
        "broadcast rows": np.broadcast_to(row, (3, n)),
        "sliding window": np.lib.stride_tricks.sliding_window_view(flat, n),
        "structured field": rec["a"],
        "reversed rows": wide[::-1, :n],
        "every other column": wide[:, ::2],
        "zero rows": np.zeros((0, n), F32),
        "zero rows, 3-D": np.zeros((2, 0, n), F32),
    }


@pytest.mark.parametrize("layout", list(strided_inputs(np.random.default_rng(0), 8)))
def test_strided_inputs_are_copied_not_refused(rng, layout):
    """Broadcast rows, sliding windows, structured-array fields, reversed rows and empty batches
    were refused with "expected contiguous rows" (numpy gives an empty array strides of 0)."""
    n = 8
    x = strided_inputs(rng, n)[layout]
    dense = np.ascontiguousarray(x)
    w, b = rng.normal(size=n).astype(F32), rng.normal(size=n).astype(F32)
    for f in (lambda a: nn.layer_norm(a, w, b), lambda a: nn.rms_norm(a, w), nn.gelu,
              lambda a: nn.layer_norm(a, w, b, residual=a), nn.softmax):
        np.testing.assert_array_equal(f(x), f(dense))
    if x.ndim == 2:
        qw = lb.quantize(rng.normal(size=(4, n)).astype(F32))
        np.testing.assert_array_equal(lb.matmul(x, qw), lb.matmul(dense, qw))


def test_misaligned_arrays_in_nn(rng):
    """Float32 arrays at odd byte addresses: copied at the binding, the aligned results."""
    from test_linear import misaligned
    x = rng.normal(size=(5, 40)).astype(F32)
    r = rng.normal(size=(5, 40)).astype(F32)
    w, b = rng.normal(size=40).astype(F32), rng.normal(size=40).astype(F32)
    np.testing.assert_array_equal(nn.gelu(misaligned(x)), nn.gelu(x))
    out = misaligned(np.zeros_like(x))
    assert nn.gelu(x, out=out) is out and np.array_equal(out, nn.gelu(x))
    mx = misaligned(x)
    assert nn.gelu(mx, out=mx) is mx and np.array_equal(mx, nn.gelu(x))  # in place
    expected = nn.layer_norm(x, w, b, residual=r)
    got = nn.layer_norm(misaligned(x), misaligned(w), misaligned(b), residual=misaligned(r),
                        out=misaligned(np.zeros_like(x)))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(nn.rms_norm(misaligned(x), misaligned(w)), nn.rms_norm(x, w))
    s = misaligned(x)
    lb._core.softmax_(s)  # in place, as nn.softmax calls it
    np.testing.assert_array_equal(s, nn.softmax(x))
    q, k, v = qkv(rng, 2, 3, 6, 4, 2, 8)
    lengths = np.array([6, 4])
    expected = nn.attention(q, k, v, lengths=lengths, causal=True)
    out = misaligned(np.zeros_like(expected))
    got = nn.attention(misaligned(q), misaligned(k), misaligned(v), lengths=misaligned(lengths),
                       causal=True, out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)


def test_scalars_and_complex_values_are_refused(rng):
    """A scalar reached x.shape[-1] (IndexError, found by tests/test_fuzz_api.py); complex values
    lost their imaginary parts with only a ComplexWarning."""
    w = np.ones(4, F32)
    for f in (lambda a: nn.rms_norm(a, w), lambda a: nn.layer_norm(a, w, w)):
        with pytest.raises(ValueError, match="scalar"):
            f(np.float32(1))
    z = np.ones((2, 4), np.complex64)
    for f in (lambda: nn.gelu(z), lambda: nn.rms_norm(z, w), lambda: nn.layer_norm(z.real, w, w, residual=z),
              lambda: nn.softmax(z), lambda: nn.rms_norm(z.real, w.astype(np.complex64))):
        with pytest.raises(TypeError, match="real values"):
            f()


def test_norm_and_rope_arguments_checked(rng):
    x = rng.normal(size=(2, 64)).astype(F32)
    w, b = np.ones(64, F32), np.zeros(64, F32)
    for r in (np.ones((1, 128), F32), np.ones((4, 32), F32), np.ones((1, 64), F32), np.ones(64, F32)):
        with pytest.raises(ValueError, match=r"residual: expected x's shape \(2, 64\)"):
            nn.layer_norm(x, w, b, residual=r)  # (not reshaped into x's shape, nor broadcast)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            nn.layer_norm(x, w, b, eps=eps)
        with pytest.raises(ValueError, match="eps"):
            nn.rms_norm(x, w, eps=eps)
    rope = nn.RoPE(8)
    q = np.ones((3, 1, 8), F32)
    for positions in ([0, 1, 2 ** 40], np.array([0, 1, 2 ** 63], np.uint64)):
        with pytest.raises(IndexError, match="beyond"):
            rope(q, positions)  # not a table of 2**40 rows
    assert rope(q, [0, 1, 2]).shape == (3, 1, 8)


def test_cache_keys_are_a_copy_and_huge_unsigned_lengths_mean_all_keys(rng):
    cache = nn.KVCache(2, 4, 32)  # one block of keys: the layout's reshape is a view
    k = rng.normal(size=(3, 2, 4)).astype(F32)
    cache.append(k, k)
    keys = cache.keys()
    assert not np.shares_memory(keys, cache.k)
    keys[...] = 0
    np.testing.assert_array_equal(cache.keys(), k)
    q = rng.normal(size=(1, 2, 2, 4)).astype(F32)
    kv = rng.normal(size=(1, 5, 2, 4)).astype(F32)
    np.testing.assert_array_equal(nn.attention(q, kv, kv, lengths=np.array([2 ** 64 - 1], np.uint64)),
                                  nn.attention(q, kv, kv))
