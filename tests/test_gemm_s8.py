"""lb.gemm_s8: exact int8 x int8 -> int32 on every ISA, all tails, extreme values."""
import numpy as np
import pytest

import lowbit as lb
from lowbit import _core

# M: GEMV path (1..4), tile tails (5, 7), several row tiles (17, 64); N: panel tails;
# K: 1, below / at / above the 4-byte step and the 64-byte block, long; at / above AVX-512's
# 4096-k block (rows > 4: partial sums carried across blocks).
SHAPES = [(m, n, k) for m in (1, 2, 3, 5, 17) for n in (1, 15, 16, 17, 70) for k in (1, 3, 4, 5, 63, 64, 65, 260)]
SHAPES += [(64, 129, 1000), (7, 300, 4100), (128, 64, 96), (1, 1000, 4096), (9, 40, 4096), (6, 17, 8195)]


def reference(a, b):
    return (a.astype(np.int64) @ b.astype(np.int64).T).astype(np.int32)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_s8_matches_reference_for_every_isa(isa, rng, m, n, k):
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (n, k), dtype=np.int8)
    np.testing.assert_array_equal(lb.gemm_s8(a, b), reference(a, b))


@pytest.mark.parametrize("va,vb", [(-128, -128), (-128, 127), (127, 127), (127, -128), (0, -128)])
def test_gemm_s8_is_exact_at_extreme_values(isa, va, vb):
    # all-max rows: the cases where u8 x s8 tricks or 16-bit pair sums would saturate
    a = np.full((5, 300), va, np.int8)
    b = np.full((33, 300), vb, np.int8)
    np.testing.assert_array_equal(lb.gemm_s8(a, b), reference(a, b))


def test_gemm_s8_mixed_extremes(isa, rng):
    a = rng.choice(np.array([-128, 127, -1, 0, 1], np.int8), (9, 517))
    b = rng.choice(np.array([-128, 127, -127, 0], np.int8), (40, 517))
    np.testing.assert_array_equal(lb.gemm_s8(a, b), reference(a, b))


def test_gemm_s8_largest_k_does_not_overflow(isa):
    k = _core.MAX_K  # (-128)(-128) K = 2^31 - 16384: the largest sum that always fits
    a = np.full((1, k), -128, np.int8)
    b = np.full((2, k), -128, np.int8)
    assert lb.gemm_s8(a, b)[0, 0] == 16384 * k


def test_gemm_s8_refuses_k_that_could_overflow():
    a = np.zeros((1, _core.MAX_K + 1), np.int8)
    with pytest.raises(ValueError, match="overflow"):
        lb.gemm_s8(a, a)


def test_gemm_s8_non_contiguous_inputs(rng):
    a = rng.integers(-128, 128, (10, 64), dtype=np.int8)[::2, ::2]
    b = rng.integers(-128, 128, (12, 64), dtype=np.int8)[:, 1::2]
    np.testing.assert_array_equal(lb.gemm_s8(a, b), reference(a, b))


def test_gemm_s8_empty():
    assert lb.gemm_s8(np.zeros((0, 8), np.int8), np.zeros((3, 8), np.int8)).shape == (0, 3)
    np.testing.assert_array_equal(lb.gemm_s8(np.zeros((2, 0), np.int8), np.zeros((3, 0), np.int8)),
                                  np.zeros((2, 3), np.int32))


@pytest.mark.parametrize("a,b,err", [
    (np.zeros((2, 4), np.int16), np.zeros((2, 4), np.int8), TypeError),
    (np.zeros((2, 4), np.int8), np.zeros((2, 4), np.uint8), TypeError),
    (np.zeros((2, 4), np.int8), np.zeros((2, 5), np.int8), ValueError),
    (np.zeros(4, np.int8), np.zeros((2, 4), np.int8), ValueError),
])
def test_gemm_s8_rejects_bad_input(a, b, err):
    with pytest.raises(err):
        lb.gemm_s8(a, b)
