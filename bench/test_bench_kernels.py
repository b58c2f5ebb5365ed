"""pytest-benchmark suite: one benchmark per kernel, shapes of real layers.

    pytest bench/test_bench_kernels.py --benchmark-only
"""
import numpy as np
import pytest

import lowbit as lb
from lowbit import nn
from lowbit.bench import design_problem

LINEAR_SHAPES = [(1, 576, 576), (1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096)]


@pytest.mark.parametrize("m,n,k", LINEAR_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("grouped", [False, True])
def test_linear_int8(benchmark, m, n, k, grouped):
    group = (128 if k % 128 == 0 else 64) if grouped else None  # (576 inputs: nine groups of 64)
    w, x = design_problem(m, n, k)
    layer = lb.Linear(w, group_size=group)
    benchmark(layer, x)


@pytest.mark.parametrize("m,n,k", LINEAR_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("activations", ["int8", "float"])
def test_linear_int4_g32(benchmark, m, n, k, activations):
    w, x = design_problem(m, n, k)
    layer = lb.Linear(w, bits=4, group_size=32, symmetric=False, activations=activations)
    benchmark(layer, x)


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (128, 1024, 1024)], ids=lambda v: str(v))
def test_gemm_s8(benchmark, m, n, k):
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (n, k), dtype=np.int8)
    benchmark(lb.gemm_s8, a, b)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize(benchmark, bits):
    w, _ = design_problem(1, 4096, 4096)
    benchmark(lb.quantize, w, bits=bits, group_size=32 if bits == 4 else None)


def test_pack_int4(benchmark):
    q = np.random.default_rng(0).integers(0, 16, (4096, 4096), dtype=np.uint8)
    benchmark(lb.pack_int4, q)


# lowbit.nn float helpers, against numpy doing the same (peer: numpy + its BLAS, same process).
# Attention shapes: MiniLM's (batch 32 x 128 tokens, 12 heads of 32) and a SmolLM2 decode step
# (one query, 9 heads over 3 kv heads of 64, 1024 cached keys).
ATTENTION = {"minilm": (32, 128, 128, 12, 12, 32, False), "decode": (1, 1, 1024, 9, 3, 64, True)}


def attention_inputs(name):
    b, sq, sk, h, hkv, d, causal = ATTENTION[name]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, sq, h, d), dtype=np.float32)
    k, v = (rng.standard_normal((b, sk, hkv, d), dtype=np.float32) for _ in range(2))
    return q, k, v, causal


def numpy_attention(q, k, v, causal):
    b, sq, h, d = q.shape
    kh = np.repeat(k, h // k.shape[2], axis=2).transpose(0, 2, 3, 1)  # (b, h, d, sk)
    vh = np.repeat(v, h // v.shape[2], axis=2).transpose(0, 2, 1, 3)  # (b, h, sk, d)
    s = q.transpose(0, 2, 1, 3) @ kh * np.float32(1 / np.sqrt(d))
    if causal:
        sk = k.shape[1]
        s[..., np.arange(sk)[None, :] > sk - sq + np.arange(sq)[:, None]] = -np.inf
    s = np.exp(s - s.max(-1, keepdims=True))
    return (s @ vh / s.sum(-1, keepdims=True)).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("impl", ["lowbit", "lowbit_int8", "numpy"])
@pytest.mark.parametrize("shape", list(ATTENTION))
def test_attention(benchmark, shape, impl):
    q, k, v, causal = attention_inputs(shape)
    if impl.startswith("lowbit"):
        out = np.empty_like(q)
        precision = "int8" if impl == "lowbit_int8" else "float32"
        benchmark(lambda: nn.attention(q, k, v, causal=causal, out=out, precision=precision))
    else:
        benchmark(numpy_attention, q, k, v, causal)


@pytest.mark.parametrize("impl", ["lowbit", "numpy"])
def test_gelu(benchmark, impl):
    from scipy.special import erf

    x = np.random.default_rng(0).standard_normal((4096, 1536), dtype=np.float32)
    if impl == "lowbit":
        benchmark(nn.gelu, x, out=np.empty_like(x))
    else:
        benchmark(lambda: x * 0.5 * (1 + erf(x * np.float32(0.7071067811865476))))
