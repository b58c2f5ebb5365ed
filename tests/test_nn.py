"""lowbit.nn: the float building blocks of the example models, against their definitions in
float64."""
import numpy as np
import pytest

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
