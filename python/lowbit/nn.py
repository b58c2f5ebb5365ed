"""Float32 building blocks for running transformer models around lowbit's layers: GELU (erf or
tanh), SwiGLU / GeGLU, LayerNorm / RMSNorm (with a fused residual add), softmax, attention (causal,
padded, sliding-window), rotary embeddings (pair or NeoX layout), a key/value cache, and
``record``: a function of lowbit calls (a model's decode step) recorded once and replayed from C++.

GELU, SwiGLU, the norms, softmax, attention and RoPE run in C++ (vectorized, threaded on large
inputs, bit-identical on every kernel set, thread count and machine); ``silu`` is numpy.
"""
from __future__ import annotations

import functools

import numpy as np

from . import _core

F32 = np.float32
_F32 = np.dtype(F32)
_ND = np.ndarray


def _plain(*arrays):
    """Whether every one is a float32 numpy array: what a model's decode step passes, sent to
    the C++ binding (which checks shapes and layouts) without the conversions the wrappers offer
    for anything else (~1-3 us a call, paid ~300 times a token)."""
    for a in arrays:
        if type(a) is not _ND or a.dtype is not _F32:
            return False
    return True


def _f32(a, what="x"):
    """`a` as a float32 array; complex values are refused (the cast would drop their imaginary
    parts without a word)."""
    a = np.asarray(a)
    if a.dtype.kind == "c":
        raise TypeError(f"{what}: expected real values, got dtype {a.dtype}")
    return a.astype(F32, copy=False)


def _rows(x):
    """float32 x and x as (rows, last axis) (a view when possible; the kernels' binding copies
    any layout they cannot read)."""
    x = _f32(x)
    if x.ndim == 0:
        raise ValueError("x: expected an array of shape (..., n), got a scalar")
    return x, x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x


def _vector(v, n, what):
    v = _f32(v, what)
    if v.shape != (n,):
        raise ValueError(f"{what}: expected shape ({n},), got {v.shape}")
    return v


def _out(out, shape, inputs, in_place=()):
    """Checks ``out`` (None, or a float32 array of `shape` to write the result to): it may be one
    of the arrays `in_place` itself (an elementwise-safe alias) but must not otherwise overlap any
    of `inputs` (the arrays the kernel reads)."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"out: expected shape {tuple(shape)}, got {out.shape}")
    if any(out is a for a in in_place):  # then an input laid out exactly as out may be out
        at = out.__array_interface__["data"][0]
        inputs = [a for a in inputs if not (a.flags.c_contiguous and out.flags.c_contiguous and
                                            a.size == out.size and a.__array_interface__["data"][0] == at)]
    if any(np.may_share_memory(out, a) for a in inputs):
        raise ValueError("out must not overlap the inputs" +
                         (" (except being one of them itself)" if in_place else ""))
    return out


def _norm(x, residual, weight, bias, eps, rms, out):
    x_in = x
    x, x2 = _rows(x)
    n = x.shape[-1]
    r = None
    if residual is not None:
        r = _f32(residual, "residual")
        if r.shape != x.shape:
            raise ValueError(f"residual: expected x's shape {x.shape}, got {r.shape}")
        r = r.reshape(x2.shape)
    w = _vector(weight, n, "weight")
    b = None if rms else _vector(bias, n, "bias")
    o = _out(out, x.shape, [a for a in (x2, r, w, b) if a is not None],
             in_place=[a for a in (x_in, residual) if isinstance(a, np.ndarray)])
    y = _core.layer_norm(x2, r, w, b, float(eps), rms, None if o is None else o.reshape(x2.shape))
    return o if o is not None else y.reshape(x.shape)


def rms_norm(x, weight, eps=1e-5, out=None):
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` over the last axis (LLaMA's RMSNorm). ``out``:
    a C-contiguous float32 array of x's shape to write to (may be x itself)."""
    if out is None and _plain(x, weight) and x.ndim == 2 and weight.shape == x.shape[1:]:
        return _core.layer_norm(x, None, weight, None, float(eps), True, None)
    return _norm(x, None, weight, None, eps, True, out)


def layer_norm(x, weight, bias, eps=1e-12, residual=None, out=None):
    """LayerNorm over the last axis of ``x + residual`` (residual optional, fused in one pass):
    ``(v - mean) / sqrt(var + eps) * weight + bias``. ``out``: a C-contiguous float32 array of x's
    shape to write to (may be x or residual itself)."""
    if (out is None and residual is None and _plain(x, weight, bias) and x.ndim == 2 and
            weight.shape == bias.shape == x.shape[1:]):
        return _core.layer_norm(x, None, weight, bias, float(eps), False, None)
    return _norm(x, residual, weight, bias, eps, False, out)


def gelu(x, out=None, *, approximate="none"):
    """GELU: its exact erf form ``x * Phi(x)`` (erf to 1.5e-7, as BERT uses it), or with
    ``approximate="tanh"`` the tanh approximation ``x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715
    x**3)))`` (PyTorch's ``gelu(approximate="tanh")``, Gemma's and GPT-2's; to ~3e-7 relative).
    ``out``: a C-contiguous float32 array of x's shape to write to, not overlapping x unless it is
    x itself (``out=x`` works in place, no new memory)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
    x_in = x
    x = _f32(x)
    _out(out, x.shape, [x], in_place=[x_in] if isinstance(x_in, np.ndarray) else [])
    return _core.gelu(x, out, approximate == "tanh")


def geglu(gate, up):
    """``gelu(gate, approximate="tanh") * up``: the gated FFN activation of Gemma (GeGLU), in one
    pass in C++ like :func:`swiglu` (bit-identical to gelu then a float32 product); an ``up`` of
    another shape is broadcast (in two passes)."""
    if np.shape(gate) != np.shape(up):
        y = gelu(gate, approximate="tanh")
        y *= up
        return y
    return _gated(gate, up, "gelu_tanh")


def swiglu(gate, up):
    """``silu(gate) * up``: the gated FFN activation of LLaMA-style models (SwiGLU), in one pass
    in C++. gate and up: float32 of the same shape, e.g. the two halves of a fused gate / up
    projection's output (strided views are read in place). Bit-identical on every kernel set; its
    exp is lowbit's own (as GELU's), so within ~1e-7 relative of numpy's ``silu(gate) * up``."""
    return _gated(gate, up, "silu")


def _gated(gate, up, act):
    if _plain(gate, up) and gate.ndim == 2 and gate.shape == up.shape:
        return _core.gated(gate, up, act)
    g, u = _f32(gate, "gate"), _f32(up, "up")
    if g.shape != u.shape or g.ndim == 0:
        raise ValueError(f"gate and up: expected arrays of one shape (..., n), got {g.shape} and {u.shape}")
    rows = lambda a: a if a.ndim == 2 else a.reshape(-1, a.shape[-1])  # noqa: E731
    return _core.gated(rows(g), rows(u), act).reshape(g.shape)


_MLP_ACTIVATIONS = {None: "none", "swiglu": "silu", "geglu": "gelu_tanh"}


def _plan_of(layer):
    """The kernel call of an lb.Linear (or of a FusedLinear that is one call), else None (for
    anything else, subclasses and wrappers included, whose own __call__ must run)."""
    from .linear import FusedLinear, Linear

    if type(layer) is FusedLinear and len(layer.layers) == 1:
        layer = layer.layers[0]
    return layer._plan if type(layer) is Linear else None


# Calls of at most this many rows (a decode step's) take the plain path even for lowbit layers:
# their LinearPlans then learn the weight called next and prefetch it (as LinearPlan's kStreamRows).
_FEW_ROWS = 16


def _block_input(x, out):
    """A block op's x as float32 (float16 and float64 converted, as lb.Linear does; other dtypes
    refused), out checked not to overlap it on every path."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x: expected float32 or float16, got dtype {x.dtype}")
    x = x.astype(F32, copy=False)
    if isinstance(out, np.ndarray) and np.may_share_memory(out, x):
        raise ValueError("out must not overlap the inputs")
    return x


def _residual_norm(spec):
    """residual_norm's (weight, bias, eps) as float32 arrays and a float, or Nones."""
    if spec is None:
        return None, None, 0.0
    try:
        weight, bias, eps = spec
    except (TypeError, ValueError):
        raise TypeError("residual_norm: expected (weight, bias, eps), a LayerNorm's parameters") from None
    return _f32(weight, "residual_norm weight"), _f32(bias, "residual_norm bias"), float(eps)


def mlp(x, up, down, *, activation=None, residual_norm=None, out=None):
    """``down(act(up(x)))``: a transformer's feed-forward block, its hidden activations kept in
    cache. up and down: ``lb.Linear`` layers (any format; up's own epilogue applies, e.g.
    ``epilogue="gelu"`` for BERT), or a one-call ``FusedLinear`` of gate and up projections.
    activation: None (up's output as it is), "swiglu" or "geglu": :func:`swiglu` / :func:`geglu`
    on the two halves ``[gate | up]`` of up's output (a ``FusedLinear([gate, up])``).

    Many rows run in blocks of 16-96 rows, each block through all three steps on one thread, so
    up's output (a BERT's 4096 x 1536 floats: 25 MB) is never written to memory and read back;
    fewer rows than two blocks per thread run as the three kernel calls, and up to 16 rows (a
    decode step) as the three layer calls. Either way the result is bit for bit that of
    ``down(act(up(x)))``, which is also what runs for other layers (any callables; ``out`` then
    goes to ``down(h, out=out)``) and while a graph is recorded (:func:`record`).

    residual_norm: None, or a LayerNorm's (weight, bias, eps) for a post-LN layer (BERT's):
    ``layer_norm(mlp(x) + x, weight, bias, eps)``, each block normalized while it is in cache
    (bit for bit :func:`layer_norm` with ``residual=x``; x as wide as the output).

    x: float32 or float16 (..., in_features); out: None or a C-contiguous float32 array of shape
    (..., down's out_features) not overlapping x."""
    if activation not in _MLP_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {list(_MLP_ACTIVATIONS)}, got {activation!r}")
    nw, nb, eps = _residual_norm(residual_norm)
    x = _block_input(x, out)
    up_plan, down_plan = _plan_of(up), _plan_of(down)
    if up_plan is not None and down_plan is not None and x.size > _FEW_ROWS * x.shape[-1]:
        x, x2 = _rows(x)
        n = down.out_features
        o = _out(out, x.shape[:-1] + (n,), [a for a in (x2, nw, nb) if a is not None])
        if o is not None and not o.flags.c_contiguous:
            raise ValueError("out: expected a C-contiguous float32 array")
        y = _core.mlp(up_plan, down_plan, _MLP_ACTIVATIONS[activation], x2,
                      None if o is None else o.reshape(-1, n), nw, nb, eps)
        if y is not None:
            return o if o is not None else y.reshape(x.shape[:-1] + (n,))
    h = up(x)
    if activation is not None:
        if h.shape[-1] % 2:
            raise ValueError("mlp: a gated activation takes the two halves of up's output, and up "
                             f"has an odd out_features, {h.shape[-1]}")
        half = h.shape[-1] // 2
        h = (swiglu if activation == "swiglu" else geglu)(h[..., :half], h[..., half:])
    y = down(h) if out is None else down(h, out=out)
    return y if nw is None else layer_norm(y, nw, nb, eps, residual=x, out=out)


def silu(x):
    """``x * sigmoid(x)``."""
    return x / (F32(1) + np.exp(-x))


def softmax(x, axis=-1):
    """Softmax along `axis` (max-subtracted); masked entries of -inf get weight 0; a row of all
    -inf gives NaN, like the definition."""
    out = np.array(np.moveaxis(_f32(x), axis, -1), order="C")
    _core.softmax_(out)
    return np.moveaxis(out, -1, axis)


def attention(q, k, v, *, lengths=None, causal=False, scale=None, window=None, out=None,
              precision="float32"):
    """Softmax attention ``softmax(scale * q @ k.T) @ v`` for every batch and head, fused in one
    pass (the scores never leave the cache) on lowbit's threads.

    q: float32 (batch, queries, heads, head_dim); k, v: (batch, keys, kv_heads, head_dim) with
    kv_heads dividing heads (grouped-query attention: head h reads kv head h // (heads //
    kv_heads)). Strided views are fine as long as the last axis is contiguous, e.g. slices of a
    fused QKV projection reshaped to (batch, tokens, heads, head_dim).

    lengths: int (batch,) or None: batch b attends to its first ``lengths[b]`` keys only (BERT's
    padding mask; a length past the keys means all of them, 0 or less none). causal: query i attends to keys j <= keys - queries + i (the queries are the
    last positions, as in a key/value cache). window: None, or W >= 1 for sliding-window
    attention (Gemma's, Mistral's local layers): query i, at key position p = keys - queries + i,
    also sees only keys j > p - W (llama.cpp's rule: j visible iff p - j < W), so with causal the
    last W positions up to its own. A query with no key to attend to gets zeros.
    scale: default 1 / sqrt(head_dim). Returns float32 (batch, queries, heads, head_dim), written
    to ``out`` when given (C-contiguous, that shape, not overlapping q, k or v).

    precision: "float32" (float32 dot products, each an fma chain in a fixed order), or "int8":
    each query and key row quantized to int8 (symmetric, scale = amax / 127), the scores their
    exact integer dot products times the scales, the softmax weights as bytes of the largest in
    their 32-key block (times a power of two per block, so a long tail of small weights keeps its
    share) and the values int8 per 32-key block and dimension; integer sums exact, so every ISA
    and thread count still gives the same bits. The values' scales cover each block's keys up to
    `lengths`, so a causal query's result also depends on up to 31 later values of its last
    block (within their rounding), and a NaN or inf value makes NaN every query whose blocks hold
    it. It quantizes the keys and values on every call, so it pays where many queries share
    them (an encoder's batch, a prompt: 1.2-1.6x faster on AVX-512 VNNI, bench/kernels.py), not
    for one decoded token over a long cache (slower there). Its error is that of 8-bit inputs:
    1-3% of the output's size on random data (more with thousands of keys or sharp scores;
    tests/test_nn.py); on all-MiniLM-L6-v2 (bench/minilm.py) the embeddings' mean cosine to
    float32 moves by under 1e-4.
    """
    if precision not in ("float32", "int8"):
        raise ValueError(f'precision: expected "float32" or "int8", got {precision!r}')
    q, k, v = (np.asarray(a) for a in (q, k, v))
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.dtype != F32:
            raise TypeError(f"{name}: expected float32, got dtype {a.dtype}")
    lengths = _lengths(lengths)
    scale, window = _attention_scale_window(q, scale, window)
    if out is not None and q.ndim == 4:
        _out(out, q.shape, (q, k, v))
    return _core.attention(q, k, v, lengths, bool(causal), scale, window, out,
                           int8=precision == "int8")


def attention_block(x, qkv, proj, heads, *, kv_heads=None, lengths=None, causal=False,
                    scale=None, window=None, precision="float32", residual_norm=None, out=None):
    """``proj(attention(q, k, v))`` with ``[q | k | v] = qkv(x)``: a transformer's self-attention
    with its projections, for x (batch, tokens, hidden). qkv: the fused projection (``lb.Linear``
    or a one-call ``FusedLinear``) giving ``heads`` query heads then ``kv_heads`` (default
    ``heads``) key and value heads of one width; proj: the output projection (``lb.Linear``).
    lengths, causal, scale, window, precision: as for :func:`attention` (no rotary embedding:
    an encoder's, BERT's, or any whose positions are in x already). residual_norm: None, or a
    LayerNorm's (weight, bias, eps) for a post-LN layer, as for :func:`mlp`.

    A batch of several sequences runs sequence by sequence, each through the three steps on one
    thread, so the projections (a BERT's 4096 x 1152 floats: 19 MB) and the attention's output
    stay in cache instead of going to memory and back; fewer sequences than twice the threads
    run as the three kernel calls, and up to 16 tokens in all as the three layer calls. Either
    way the result is bit for bit that of the three calls, which is also what runs for other
    layers (any callables: ``qkv(x)`` then ``proj(ctx)``, or ``proj(ctx, out=out)``) and while a
    graph is recorded. Returns float32 (batch, tokens, proj's out_features), written to ``out``
    when given (C-contiguous, not overlapping x)."""
    if precision not in ("float32", "int8"):
        raise ValueError(f'precision: expected "float32" or "int8", got {precision!r}')
    kv_heads = heads if kv_heads is None else kv_heads
    for name, n in (("heads", heads), ("kv_heads", kv_heads)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name}: expected a positive integer, got {n!r}")
    x = _block_input(x, out)
    if x.ndim != 3:
        raise ValueError(f"x: expected shape (batch, tokens, hidden), got {x.shape}")
    lengths = _lengths(lengths)
    nw, nb, eps = _residual_norm(residual_norm)
    b, s = x.shape[:2]
    qkv_plan, proj_plan = _plan_of(qkv), _plan_of(proj)
    if qkv_plan is not None and proj_plan is not None and b * s > _FEW_ROWS:
        o = _out(out, (b, s, proj.out_features), [a for a in (x, nw, nb) if a is not None])
        if o is not None and not o.flags.c_contiguous:
            raise ValueError("out: expected a C-contiguous float32 array")
        width = qkv.out_features // (heads + 2 * kv_heads)  # head_dim (checked in C++)
        sc, win = _attention_scale_window(x, _default_scale(width) if scale is None else scale, window)
        y = _core.attention_block(qkv_plan, proj_plan, x, int(heads), int(kv_heads), lengths,
                                  bool(causal), sc, win, precision == "int8", o, nw, nb, eps)
        if y is not None:
            return y
    p = qkv(x)
    width = p.shape[-1] // (heads + 2 * kv_heads)
    if p.shape[-1] != (heads + 2 * kv_heads) * width:
        raise ValueError(f"attention_block: qkv's {p.shape[-1]} outputs are not (heads + 2 * "
                         f"kv_heads) = {heads + 2 * kv_heads} heads of one width")
    q = p[..., :heads * width].reshape(b, s, heads, width)
    k = p[..., heads * width:(heads + kv_heads) * width].reshape(b, s, kv_heads, width)
    v = p[..., (heads + kv_heads) * width:].reshape(b, s, kv_heads, width)
    ctx = attention(q, k, v, lengths=lengths, causal=causal, scale=scale, window=window,
                    precision=precision).reshape(b, s, heads * width)
    y = proj(ctx) if out is None else proj(ctx, out=out)
    return y if nw is None else layer_norm(y, nw, nb, eps, residual=x, out=out)


def _lengths(lengths):
    """None, or int64 lengths (values past int64 clipped: all the keys, not a wrapped negative)."""
    if lengths is None:
        return None
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths: expected integers, got dtype {lengths.dtype}")
    if lengths.dtype == np.uint64:
        lengths = np.minimum(lengths, np.uint64(np.iinfo(np.int64).max))
    return lengths.astype(np.int64)


def _default_scale(head_dim):
    return float(1.0 / np.sqrt(head_dim)) if head_dim else 1.0


def _attention_scale_window(q, scale, window):
    if scale is None:
        scale = _default_scale(q.shape[-1] if q.ndim else 0)
    if window is None:
        window = 0
    elif isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window: expected None or an integer >= 1, got {window!r}")
    return float(scale), min(int(window), 1 << 62)  # (a window past every key: all of them)


def rope_tables(head_dim, positions, base=10000.0):
    """cos and sin, float32 (len(positions), head_dim // 2), for rotary position embeddings."""
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.asarray(positions, np.float64)[:, None] * inv[None, :]
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


def rope(x, cos, sin, style="pairs"):
    """Rotates x (tokens, heads, head_dim) by the angles of (tokens, head_dim // 2) tables, pair i
    by angle i. style "pairs": adjacent pairs (x[2i], x[2i+1]), the layout of GGUF llama weights
    (llama.cpp's "normal" RoPE); "neox": the two halves (x[i], x[i + head_dim/2]), as Hugging Face
    models and GGUF Gemma, Qwen, Phi use it (llama.cpp's NeoX RoPE)."""
    if style not in ("pairs", "neox"):
        raise ValueError(f"style: expected 'pairs' or 'neox', got {style!r}")
    # float32 products and sums, in C++ (numpy's seven temporaries took ~10 us a decode step)
    if _plain(x, cos, sin):
        return _core.rope(x, cos, sin, style == "neox")
    return _core.rope(_f32(x), _f32(cos, "cos"), _f32(sin, "sin"), style == "neox")


def _rope_rows(head_dim, base, rows, chunk=1 << 15):
    """rope_tables of positions 0 .. rows - 1, made a chunk at a time: the float64 angles and
    their cosines of a million positions would take three times the float32 tables."""
    cos, sin = np.empty((rows, head_dim // 2), F32), np.empty((rows, head_dim // 2), F32)
    for r in range(0, rows, chunk):
        cos[r:r + chunk], sin[r:r + chunk] = rope_tables(head_dim, np.arange(r, min(rows, r + chunk)), base)
    return cos, sin


class RoPE:
    """Rotary position embeddings at given positions: ``rope(x, positions)`` rotates x (tokens,
    heads, head_dim), token t by the angles of position ``positions[t]`` (integers >= 0). Equal
    to ``rope(x, *rope_tables(head_dim, positions, base), style)``, from tables made once and
    grown (doubling) as positions need; recordable by :func:`record`, the positions an input of
    the graph."""

    def __init__(self, head_dim, base=10000.0, style="pairs"):
        if style not in ("pairs", "neox"):
            raise ValueError(f"style: expected 'pairs' or 'neox', got {style!r}")
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim: expected an even number >= 2, got {head_dim}")
        self.head_dim, self.base, self.style = head_dim, base, style
        # (the tables' maker must not hold self: see RopeTables)
        self._tables = _core.RopeTables(functools.partial(_rope_rows, head_dim, base), 256)

    def __reduce__(self):  # (pickles by its settings: the tables are made again)
        return RoPE, (self.head_dim, self.base, self.style)

    def __call__(self, x, positions):
        p = np.asarray(positions)
        if p.dtype.kind not in "iu":
            raise TypeError(f"positions: expected integers, got dtype {p.dtype}")
        if p.ndim != 1:
            raise ValueError(f"positions: expected shape (tokens,), got {p.shape}")
        if p.dtype == np.uint64 and p.size and p.max() > np.iinfo(np.int64).max:
            raise IndexError(f"position {p.max()} beyond the positions RoPE tables are made for")
        x = x if _plain(x) else _f32(x)
        return _core.rope_at(x, self._tables, p.astype(np.int64, copy=False), self.style == "neox")


def scale(x, s, out=None):
    """``x * s`` (s a number, rounded to float32) of a float32 array; recordable by
    :func:`record`. ``out``: a C-contiguous float32 array of x's shape (may be x itself)."""
    if not _plain(x):
        x = _f32(x)
    if out is not None:
        _out(out, x.shape, [x], in_place=[x])
    return _core.scale(x, float(np.float32(s)), out)


def add(a, b, out=None):
    """``a + b`` of two float32 arrays of one shape (no broadcasting), e.g. a residual connection;
    recordable by :func:`record` (numpy's ``a + b`` is not). ``out``: a C-contiguous float32
    array of that shape (may be a or b itself)."""
    if not _plain(a, b):
        a, b = _f32(a, "a"), _f32(b, "b")
    if out is not None:
        _out(out, a.shape, [a, b], in_place=[a, b])
    return _core.add(a, b, out)


class KVCache:
    """Keys and values of one attention layer, grown by doubling; ``attend`` runs causal
    grouped-query attention of new queries over everything cached so far. Both are recordable
    by :func:`record` (the cache grows as a replay needs it).

    Values are held as ``v`` (kv_heads, capacity, head_dim); keys as ``k`` (kv_heads, capacity /
    32, head_dim, 32), blocks of 32 keys transposed, the layout the attention kernel reads its keys
    in: a decoding step does not transpose the whole cache again, and each head's first keys are
    one contiguous run (``keys()`` gives them as (tokens, kv_heads, head_dim)). The capacity is a
    multiple of 32."""

    def __init__(self, kv_heads, head_dim, capacity=256):
        self._c = _core.KVCache(kv_heads, head_dim, capacity)
        self._scale = _default_scale(head_dim)
        self._d = head_dim

    def __reduce__(self):  # (pickles by value: what is cached, at its capacity)
        return _kv_cache, (self.k.shape[0], self._d, self.capacity, self.keys(), self.values())

    @property
    def length(self):
        """The number of positions cached; set it lower to forget the positions after it."""
        return self._c.length

    @length.setter
    def length(self, n):
        self._c.truncate(n)

    @property
    def capacity(self):
        """The number of positions it holds before it grows."""
        return self._c.capacity

    @property
    def k(self):
        return self._c.k

    @property
    def v(self):
        return self._c.v

    def clear(self):
        """Forgets every position (keeps the memory)."""
        self._c.truncate(0)

    def append(self, k, v):
        """k, v: (tokens, kv_heads, head_dim)."""
        self._c.append(k if _plain(k) else _f32(k, "k"), v if _plain(v) else _f32(v, "v"))

    def keys(self):
        """The cached keys, (tokens, kv_heads, head_dim) (a copy)."""
        kv, blocks, d, _ = self.k.shape
        keys = self.k.transpose(1, 3, 0, 2).reshape(blocks * 32, kv, d)[: self.length]
        return keys.copy() if np.shares_memory(keys, self.k) else keys  # (one block: a view)

    def values(self):
        """The cached values, (tokens, kv_heads, head_dim) (a view, valid until the cache grows)."""
        return self.v[:, : self.length].transpose(1, 0, 2)

    def attend(self, q, scale=None, window=None):
        """q: (tokens, heads, head_dim), the last `tokens` positions cached; returns causal
        attention (tokens, heads * head_dim) (``attention`` over the cached keys and values, with
        its scale and sliding window). Head h reads kv head h // (heads // kv_heads)."""
        if type(q) is not _ND:
            q = np.asarray(q)
        if q.dtype != F32:
            raise TypeError(f"q: expected float32, got dtype {q.dtype}")
        if scale is None and window is None and q.ndim == 3 and q.shape[2] == self._d:
            scale, window = self._scale, 0
        else:
            scale, window = _attention_scale_window(q, scale, window)
        return self._c.attend(q, scale, window)


def _kv_cache(kv_heads, head_dim, capacity, k, v):
    cache = KVCache(kv_heads, head_dim, capacity)
    cache.append(k, v)
    return cache


class Graph:
    """A function of lowbit calls recorded once and replayed from C++ (see :func:`record`).
    ``graph(*inputs)`` copies the inputs (same shapes as recorded; values cast like
    ``np.copyto``) into the graph's input buffers, runs every recorded kernel call again with the
    GIL released once, and returns ``result``: the recorded function's result, whose arrays each
    replay rewrites in place (copy what you keep). Not reentrant: one replay at a time."""

    def __init__(self, fn, inputs):
        self._g = _core.Graph()
        self.inputs = tuple(self._g.input(np.asarray(a)) for a in inputs)
        self._g.begin()
        try:
            self.result = fn(*self.inputs)
        finally:
            self._g.end()
        arrays = self.result if isinstance(self.result, (tuple, list)) else [self.result]
        for a in arrays:
            if not isinstance(a, np.ndarray):
                raise TypeError(f"record: the function must return arrays, got {type(a).__name__}")
            self._g.output(a)

    def __call__(self, *inputs):
        self._g.replay(*inputs)
        return self.result

    def __len__(self):
        """The number of kernel calls recorded."""
        return len(self._g)


def record(fn, *inputs):
    """Records ``fn(*inputs)`` as a :class:`Graph` that replays its lowbit calls from C++: a
    model's decode step as one call (the CUDA-graphs idea on the CPU), without the Python
    between its ~300 kernel calls. ``fn`` runs once, now, as usual (its result is the graph's
    ``result``), on read-only copies of the inputs (numpy arrays, e.g. token ids and positions).

    Recordable: ``Linear`` / ``FusedLinear`` (one row, or one call), ``rms_norm``, ``layer_norm``,
    ``swiglu``, ``geglu``, ``add``, ``scale``, ``mlp`` (as its plain calls), ``RoPE``,
    ``KVCache.append`` / ``attend``, the rows of a block-format weight's
    ``dequantize(rows=ids)``; views of their results (slices, reshapes that do not copy).
    Anything else computed from the inputs would run once only and be replayed with its recorded
    value, so it is refused as it is recorded: each recorded call checks that the activations it
    reads come from the inputs or from recorded calls, and the arrays recorded calls return are
    read-only (so is an ``out=`` buffer a recorded call wrote, with the arrays it views). Python
    control flow runs once: a replay repeats the recorded path, with the layers' settings of the
    recording (a bias or activation setting changed later is not seen). Constants
    (weights, norm weights, the RoPE tables) are read where they are; the KV caches and RoPE
    tables grow as a replay needs, before it starts.

    Not checked, so keep them out of a recorded step: a norm's weight or bias computed from the
    inputs (it is taken as a constant, with its recorded value), and numpy writes into an
    ``out=`` buffer through a view of it made before recording (only the buffer and the arrays
    it views become read-only). RoPE reads query / key slices of a fused projection's rows where
    they are; ``add`` and ``scale`` refuse operands that are not C-contiguous."""
    return Graph(fn, inputs)
