"""lb.pack_int4 / lb.unpack_int4: API nibble order, exact round trip on every ISA."""
import numpy as np
import pytest

import lowbit as lb


@pytest.mark.parametrize("n,k", [(1, 2), (3, 6), (1, 64), (2, 66), (5, 130), (17, 1000), (64, 4096)])
def test_pack_unpack_round_trip_for_every_isa(isa, rng, n, k):
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    p = lb.pack_int4(q)
    assert p.shape == (n, k // 2) and p.dtype == np.uint8
    # element 2i in the low nibble, 2i+1 in the high
    np.testing.assert_array_equal(p, q[:, 0::2] | (q[:, 1::2] << 4))
    np.testing.assert_array_equal(lb.unpack_int4(p), q)


def test_pack_accepts_other_integer_dtypes(rng):
    q = rng.integers(0, 16, (4, 8))
    np.testing.assert_array_equal(lb.unpack_int4(lb.pack_int4(q)), q)


@pytest.mark.parametrize("pos", [(0, 0), (0, 1), (3, 200), (3, 255)])
def test_pack_rejects_values_above_15_for_every_isa(isa, pos):
    q = np.zeros((4, 256), np.uint8)
    q[pos] = 16
    with pytest.raises(ValueError, match=r"0\.\.15.*16 at \(%d, %d\)" % pos):
        lb.pack_int4(q)


def test_pack_rejects_negative_odd_k_and_floats():
    with pytest.raises(ValueError, match="0..15"):
        lb.pack_int4(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="even"):
        lb.pack_int4(np.zeros((2, 3), np.uint8))
    with pytest.raises(TypeError):
        lb.pack_int4(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError):
        lb.unpack_int4(np.zeros((2, 4), np.int8))
