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
    got = [nn.gelu(x), nn.layer_norm(x, w, b, residual=x), nn.rms_norm(x, w), nn.softmax(x)]
    with lb.use_isa("ref"):
        expected = [nn.gelu(x), nn.layer_norm(x, w, b, residual=x), nn.rms_norm(x, w), nn.softmax(x)]
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
