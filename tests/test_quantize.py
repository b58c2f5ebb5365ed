"""lb.quantize(bits=8): symmetric RTN per channel / per group, identical on every ISA."""
import numpy as np
import pytest

import lowbit as lb


def expected_int8(w, group):
    """Round-half-even(w / (amax / 127)) per row (or per row and group), as float32 maths."""
    n, k = w.shape
    g = group or k
    wg = w.reshape(n, k // g, g)
    scale = np.abs(wg).max(axis=2, keepdims=True) / np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(scale > 0, np.rint(wg / scale), 0)
    return np.clip(q, -127, 127).astype(np.int8).reshape(n, k), scale[:, :, 0]


@pytest.mark.parametrize("n,k,group", [(1, 1, None), (3, 5, None), (17, 67, None), (16, 64, 32),
                                       (33, 256, 64), (70, 512, 128), (5, 1024, 256), (2, 4096, None)])
def test_quantize_int8_matches_reference_for_every_isa(isa, rng, n, k, group):
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    qw = lb.quantize(w, bits=8, group_size=group)
    q, scale = expected_int8(w, group)
    np.testing.assert_array_equal(qw.int_values(), q)
    np.testing.assert_array_equal(qw.scales, scale)
    assert qw.shape == (n, k) and qw.bits == 8 and qw.group_size == group and qw.symmetric


def test_dequantize_error_is_at_most_half_a_step(rng):
    w = rng.normal(0, 0.02, (40, 320)).astype(np.float32)
    qw = lb.quantize(w, group_size=32)
    step = np.repeat(qw.scales, 32, axis=1)
    assert np.all(np.abs(qw.dequantize() - w) <= step / 2 * (1 + 1e-6))
    # the largest magnitude of each group lands exactly on +-127
    assert np.all(np.abs(qw.int_values()).reshape(40, 10, 32).max(axis=2) == 127)


def test_zero_rows_and_groups_quantize_to_zero():
    w = np.zeros((3, 64), np.float32)
    w[1, 32:] = 1.0
    qw = lb.quantize(w, group_size=32)
    np.testing.assert_array_equal(qw.dequantize(), w)


def test_nbytes_is_what_is_held_and_no_float_copy(rng):
    w = rng.normal(size=(256, 1024)).astype(np.float32)
    qw = lb.quantize(w)
    assert qw.nbytes == qw._packed.nbytes + qw._scales.nbytes + qw._comp.nbytes
    assert qw.nbytes < 256 * 1024 * 1.01 + 256 * 8  # one byte per weight plus a scale and sum per row
    layer = lb.Linear(qw, np.zeros(256, np.float32))
    assert layer.nbytes == qw.nbytes + 256 * 4


def test_quantize_accepts_other_float_dtypes_and_strided_rows(rng):
    w = rng.normal(size=(8, 64)).astype(np.float32)
    ref = lb.quantize(w).int_values()
    np.testing.assert_array_equal(lb.quantize(w.astype(np.float64)).int_values(), ref)
    big = np.zeros((16, 100), np.float32)
    big[::2, 10:74] = w
    np.testing.assert_array_equal(lb.quantize(big[::2, 10:74]).int_values(), ref)
    np.testing.assert_array_equal(lb.quantize(np.asfortranarray(w)).int_values(), ref)


def test_group_size_equal_to_k_is_per_channel(rng):
    w = rng.normal(size=(4, 64)).astype(np.float32)
    assert lb.quantize(w, group_size=64).group_size is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(isa, bad):
    w = np.ones((20, 40), np.float32)
    w[13, 7] = bad
    with pytest.raises(ValueError, match="row 13.*NaN or Inf"):
        lb.quantize(w)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(group_size=16), ValueError, "multiple of 32"),
    (dict(group_size=48), ValueError, "multiple of 32"),
    (dict(group_size=0), ValueError, "positive multiple of 32"),
    (dict(group_size=-32), ValueError, "positive multiple of 32"),
    (dict(group_size=96), ValueError, "dividing K=128"),
    (dict(group_size=32.0), TypeError, "int"),
    (dict(bits=3), ValueError, "bits"),
    (dict(symmetric=False), ValueError, "symmetric"),
    (dict(method="gptq"), ValueError, "method"),
])
def test_quantize_rejects_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        lb.quantize(np.ones((4, 128), np.float32), **kwargs)


@pytest.mark.parametrize("w,err", [
    (np.ones((4, 8), np.int32), TypeError),
    (np.ones(8, np.float32), ValueError),
    (np.ones((2, 4, 8), np.float32), ValueError),
    (np.ones((0, 8), np.float32), ValueError),
])
def test_quantize_rejects_bad_arrays(w, err):
    with pytest.raises(err):
        lb.quantize(w)


@pytest.mark.parametrize("fmt", [dict(bits=8), dict(bits=4, group_size=32, symmetric=False)])
def test_rows_select_like_numpy_indexing(rng, fmt):
    """dequantize / int_values of some rows: an index gives one row (1-D), a slice, a list or an
    array several (2-D), exactly those of the whole matrix; out of range is an IndexError."""
    qw = lb.quantize(rng.normal(size=(40, 64)).astype(np.float32), **fmt)
    d, q = qw.dequantize(), qw.int_values()
    for rows in (3, -1, np.int64(7), np.uint8(9), slice(2, 5), [3, 39], [-40, 0], np.array([0, 0, 17]),
                 [], np.arange(40) % 3 == 0, np.arange(40)[::-1]):
        np.testing.assert_array_equal(qw.dequantize(rows=rows), d[rows])
        np.testing.assert_array_equal(qw.int_values(rows=rows), q[rows])
    for bad in (40, -41, [0, 40], np.array([-41]), np.uint64(2**63 + 1)):
        with pytest.raises(IndexError, match="out of range"):
            qw.dequantize(rows=bad)
    for bad in (True, 1.0, np.array([[0, 1], [2, 3]]), [0.5]):  # not row numbers: named as such
        with pytest.raises(TypeError, match="rows: expected"):
            qw.dequantize(rows=bad)
