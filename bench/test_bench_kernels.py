"""pytest-benchmark suite: one benchmark per kernel, shapes of real layers.

    pytest bench/test_bench_kernels.py --benchmark-only
"""
import numpy as np
import pytest

import lowbit as lb
from lowbit.bench import design_problem

LINEAR_SHAPES = [(1, 576, 576), (1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096)]


@pytest.mark.parametrize("m,n,k", LINEAR_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("group", [None, 128])
def test_linear_int8(benchmark, m, n, k, group):
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
