"""Small float32 numpy building blocks for running transformer models around lowbit's layers:
normalisations, rotary embeddings, activations and attention with a key/value cache.

They are plain numpy, written to allocate little and to make few passes over memory, since in
token-by-token decoding their per-call overhead sits next to the quantized matmuls.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


def rms_norm(x, weight, eps=1e-5):
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` over the last axis (LLaMA's RMSNorm)."""
    x = np.asarray(x, F32)
    ms = np.einsum("...i,...i->...", x, x)[..., None] / F32(x.shape[-1])
    return x * (F32(1) / np.sqrt(ms + F32(eps))) * weight


def layer_norm(x, weight, bias, eps=1e-12):
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    x = np.asarray(x, F32)
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = np.einsum("...i,...i->...", xc, xc)[..., None] / F32(x.shape[-1])
    return xc * (F32(1) / np.sqrt(var + F32(eps))) * weight + bias


def silu(x):
    """``x * sigmoid(x)``."""
    return x / (F32(1) + np.exp(-x))


def softmax(x, axis=-1):
    """Softmax along `axis`, max-subtracted; rows of all -inf give NaN like the definition."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def rope_tables(head_dim, positions, base=10000.0):
    """cos and sin, float32 (len(positions), head_dim // 2), for rotary position embeddings."""
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.asarray(positions, np.float64)[:, None] * inv[None, :]
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


def rope(x, cos, sin):
    """Rotates adjacent pairs (x[2i], x[2i+1]) of x (tokens, heads, head_dim) by the angles of
    (tokens, head_dim // 2) tables: the pair layout of GGUF llama weights (llama.cpp's "normal"
    RoPE)."""
    pairs = x.reshape(x.shape[:-1] + (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(pairs)
    out[..., 0] = x0 * c - x1 * s
    out[..., 1] = x0 * s + x1 * c
    return out.reshape(x.shape)


class KVCache:
    """Keys and values of one attention layer, (kv_heads, capacity, head_dim) each, grown by
    doubling; ``attend`` runs causal grouped-query attention of new queries over everything
    cached so far."""

    def __init__(self, kv_heads, head_dim, capacity=256):
        self.k = np.empty((kv_heads, capacity, head_dim), F32)
        self.v = np.empty_like(self.k)
        self.length = 0

    def append(self, k, v):
        """k, v: (tokens, kv_heads, head_dim)."""
        t = k.shape[0]
        if self.length + t > self.k.shape[1]:
            cap = max(2 * self.k.shape[1], self.length + t)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = np.empty((old.shape[0], cap, old.shape[2]), F32)
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        self.k[:, self.length:self.length + t] = k.transpose(1, 0, 2)
        self.v[:, self.length:self.length + t] = v.transpose(1, 0, 2)
        self.length += t

    def attend(self, q):
        """q: (tokens, heads, head_dim), the last `tokens` positions cached; returns
        (tokens, heads * head_dim). Head h reads kv head h // (heads // kv_heads)."""
        t, heads, d = q.shape
        kvh, n = self.k.shape[0], self.length
        group = heads // kvh
        k, v = self.k[:, :n], self.v[:, :n]
        # (kv_heads, group * tokens, d): the heads sharing a kv head attend in one matmul
        qg = q.reshape(t, kvh, group, d).transpose(1, 2, 0, 3).reshape(kvh, group * t, d)
        scores = np.matmul(qg, k.transpose(0, 2, 1)) * F32(1 / np.sqrt(d))
        if t > 1:  # causal: query i (position n - t + i) sees keys up to its own position
            mask = np.arange(n)[None, :] > (n - t + np.arange(t))[:, None]
            scores.reshape(kvh, group, t, n)[:, :, mask] = -np.inf
        out = np.matmul(softmax(scores), v)  # (kv_heads, group * tokens, d)
        return out.reshape(kvh, group, t, d).transpose(2, 0, 1, 3).reshape(t, heads * d)
