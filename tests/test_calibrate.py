"""Calibration observers (lowbit.calibrate) and static int8 activations in lb.Linear / lb.matmul."""
import math

import numpy as np
import pytest

import lowbit as lb
from lowbit import StaticActivations as SA


# --------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------

def quant_static(x, act):
    """q = clamp(round-half-even(x / scale) + zero, -128, 127), x / scale taken in float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.asarray(x, np.float32) / np.float32(act.scale)
        q = np.clip(np.rint(t), -1024, 1024) + act.zero_point
    return np.clip(q, -128, 127)


def ref_w8(x, qw, act, bias=None):
    """Static W8A8 in exact integers: y = scale * sum_g ws_g * sum_{k in g} (q_k - z) w_k + bias
    (float64). Returns (y, mag): mag bounds the size of the terms the kernel rounds in float32.
    Rows with NaN / Inf come out NaN."""
    m, k = x.shape
    n = qw.shape[0]
    g = qw.group_size or k
    bad = ~np.isfinite(x).all(axis=1)
    q = quant_static(np.where(bad[:, None], 0, x), act).astype(np.int64)
    wi = qw.int_values().astype(np.int64).reshape(n, k // g, g)
    ws = qw.scales.astype(np.float64)  # (N, groups)
    z = act.zero_point
    acc = np.einsum("mgk,ngk->mng", (q - z).reshape(m, k // g, g), wi)  # exact
    y = (acc * ws).sum(-1) * act.scale
    mag = (np.einsum("mgk,ngk->mng", np.abs(q).reshape(m, k // g, g), np.abs(wi)) * np.abs(ws)).sum(-1)
    mag = mag * act.scale + act.scale * abs(z) * np.abs((wi.sum(-1) * ws).sum(-1))
    if bias is not None:
        y = y + bias
        mag = mag + np.abs(bias)
    y[bad] = np.nan
    return y, mag


def ref_w4(x, qw, act, bias=None):
    """Static W4A8: scale * (q_x @ W.T) + bias with W the dequantized 4-bit weights (float64)."""
    q = quant_static(x, act).astype(np.float64)
    y = act.scale * (q @ qw.dequantize().astype(np.float64).T)
    if bias is not None:
        y = y + bias
    return y


def quant_mse(x, act):
    """The squared error of static quantize-dequantize of x."""
    xq = act.scale * (quant_static(x, act) - act.zero_point)
    return float(np.mean((xq - x.astype(np.float64)) ** 2))


# --------------------------------------------------------------------------------------------
# StaticActivations
# --------------------------------------------------------------------------------------------

def test_static_activations_stores_the_kernels_float32_scale():
    a = SA(0.1, -5)
    assert a.scale == float(np.float32(0.1)) and a.zero_point == -5
    assert type(a.zero_point) is int
    assert SA(np.float32(0.5), np.int8(3)) == SA(0.5, 3)
    assert SA(2).scale == 2.0 and SA(2).zero_point == 0
    assert SA(1.0, -128).zero_point == -128 and SA(1.0, 127).zero_point == 127


@pytest.mark.parametrize("scale", [0, 0.0, -0.1, float("nan"), np.float32("nan"), float("inf"),
                                   -float("inf"), True, False, "0.1", None, np.array([0.1, 0.2])])
def test_static_activations_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        SA(scale)


@pytest.mark.parametrize("zero", [128, -129, 1000, 1.0, 0.5, np.float32(3), True, "1", None])
def test_static_activations_rejects_bad_zero_point(zero):
    with pytest.raises(ValueError, match="zero_point"):
        SA(0.1, zero)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("scale", [1e-50, 1e300])
def test_static_activations_rejects_scale_not_representable_in_float32(scale):
    with pytest.raises(ValueError, match="scale"):
        SA(scale)


def test_from_range_symmetric_and_asymmetric():
    a = SA.from_range(-5.0, 3.0)
    assert a == SA(5.0 / 127) and a.zero_point == 0
    a = SA.from_range(-1.0, 3.0, symmetric=False)
    assert a.scale == float(np.float32(4.0 / 255))
    assert a.zero_point == round(-128 + 1.0 / (4.0 / 255)) == -64
    # the range maps onto -128..127 and 0 is exactly representable
    q = quant_static(np.array([-1.0, 0.0, 3.0], np.float32), a)
    assert q[0] == -128 and q[2] == 127 and a.scale * (q[1] - a.zero_point) == 0
    # all-negative data: the zero point sits at the top
    assert SA.from_range(-2.0, -1.0, symmetric=False).zero_point == 127
    assert SA.from_range(0.0, 0.0) == SA(1.0)
    with pytest.raises(ValueError, match="range"):
        SA.from_range(1.0, 0.0)
    with pytest.raises(ValueError, match="range"):
        SA.from_range(float("nan"), 1.0)


# --------------------------------------------------------------------------------------------
# observers
# --------------------------------------------------------------------------------------------

def test_minmax_observer_gives_the_extremes_over_batches(rng):
    batches = [rng.normal(0, s, size=(4, 50)).astype(np.float32) for s in (1.0, 3.0, 0.5)]
    batches[2][1, 7] = -11.25  # the minimum is in the last batch, the maximum in the second
    obs = lb.MinMaxObserver()
    for b in batches:
        assert obs.observe(b) is obs
    allx = np.concatenate([b.ravel() for b in batches])
    assert obs.range() == (float(allx.min()), float(allx.max()))
    assert obs.count == allx.size
    p = obs.params()
    assert p.zero_point == 0 and p.scale == float(np.float32(11.25 / 127))
    asym = lb.MinMaxObserver(symmetric=False)
    for b in batches:
        asym.observe(b)
    assert asym.range() == obs.range()
    assert asym.params() == SA.from_range(allx.min(), allx.max(), symmetric=False)


def test_minmax_observer_ignores_empty_batches_and_takes_float16():
    obs = lb.MinMaxObserver()
    obs.observe(np.zeros((0, 4), np.float32))
    assert obs.count == 0
    obs.observe(np.array([1.5, -0.25], np.float16))
    obs.observe(np.float64(2.0))
    assert obs.range() == (-0.25, 2.0) and obs.count == 3


def test_moving_average_follows_the_update_rule_exactly(rng):
    momentum = 0.1
    obs = lb.MovingAverageMinMaxObserver(momentum=momentum)
    lo = hi = None
    for i in range(6):
        b = rng.normal(0, 1 + i, size=300).astype(np.float32)
        obs.observe(b)
        blo, bhi = float(b.min()), float(b.max())
        if lo is None:
            lo, hi = blo, bhi
        else:
            lo += momentum * (blo - lo)
            hi += momentum * (bhi - hi)
        assert obs.range() == (lo, hi)
    # the plain extremes differ from the averaged ones (the batches grow)
    assert obs.lo < lo and obs.hi > hi
    assert obs.params() == SA(max(-lo, hi) / 127)


def test_moving_average_momentum_one_is_the_last_batch_and_bad_momentum_raises():
    obs = lb.MovingAverageMinMaxObserver(momentum=1.0, symmetric=False)
    obs.observe(np.array([-5.0, 5.0], np.float32)).observe(np.array([-1.0, 2.0], np.float32))
    assert obs.range() == (-1.0, 2.0)
    for m in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="momentum"):
            lb.MovingAverageMinMaxObserver(momentum=m)


@pytest.fixture(scope="module")
def gauss():
    return np.random.default_rng(7).normal(size=1_000_000).astype(np.float32)


def test_percentile_observer_symmetric(gauss):
    obs = lb.PercentileObserver(99.9)
    for b in np.split(gauss, 10):
        obs.observe(b)
    lo, hi = obs.range()
    want = np.percentile(np.abs(gauss), 99.9)
    assert lo == -hi and abs(hi - want) <= 0.01 * want
    assert obs.params() == SA(hi / 127)


def test_percentile_observer_asymmetric(gauss):
    x = gauss + np.float32(1.0)  # off-centre, so the two ends differ
    obs = lb.PercentileObserver(99.9, symmetric=False)
    for b in np.split(x, 10):
        obs.observe(b)
    lo, hi = obs.range()
    want_lo, want_hi = np.percentile(x, [0.1, 99.9])
    assert abs(lo - want_lo) <= 0.01 * abs(want_lo) and abs(hi - want_hi) <= 0.01 * want_hi
    assert obs.params() == SA.from_range(lo, hi, symmetric=False)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("p", [99.0, 99.9])
def test_percentile_observer_through_growing_ranges(rng, symmetric, p):
    # every batch widens the range (an outlier 2x the last), so the counts of the earlier batches,
    # where the percentile lies, are re-binned again and again
    batches = []
    for i in range(5):
        b = rng.normal(size=100_000).astype(np.float32)
        b[:3] = [4 * 2 ** i, -3 * 2 ** i, 2 * 2 ** i]
        batches.append(b)
    allx = np.concatenate(batches)
    obs = lb.PercentileObserver(p, symmetric=symmetric)
    for b in batches:
        obs.observe(b)
    lo, hi = obs.range()
    if symmetric:
        want_lo, want_hi = -np.percentile(np.abs(allx), p), np.percentile(np.abs(allx), p)
    else:
        want_lo, want_hi = np.percentile(allx, [100 - p, p])
    assert abs(lo - want_lo) <= 0.02 * abs(want_lo) and abs(hi - want_hi) <= 0.02 * want_hi
    assert obs.count == allx.size


def test_percentile_interpolates_within_a_bin(rng):
    # |x| uniform on [0, 1] in 8 bins: the 90th percentile lies inside the last bin [0.875, 1]
    x = rng.uniform(-1, 1, size=400_000).astype(np.float32)
    lo, hi = lb.PercentileObserver(90, bins=8).observe(x).range()
    assert abs(hi - 0.9) <= 0.005
    lo, hi = lb.PercentileObserver(95, symmetric=False, bins=8).observe(x).range()
    assert abs(lo + 0.9) <= 0.005 and abs(hi - 0.9) <= 0.005


def test_percentile_100_is_the_max_and_bad_percentile_raises(rng):
    x = rng.normal(size=10_000).astype(np.float32)
    obs = lb.PercentileObserver(100).observe(x)
    assert obs.range()[1] == pytest.approx(float(np.abs(x).max()), rel=1e-12)
    for p in (50, 10, 100.5):
        with pytest.raises(ValueError, match="percentile"):
            lb.PercentileObserver(p)


def test_percentile_observer_keeps_a_constant_first_batch():
    obs = lb.PercentileObserver(60, symmetric=False)
    obs.observe(np.full(1000, 3.0, np.float32))
    obs.observe(np.linspace(3.0, 4.0, 1000, dtype=np.float32))
    x = np.concatenate([np.full(1000, 3.0), np.linspace(3.0, 4.0, 1000)])
    lo, hi = obs.range()
    want_lo, want_hi = np.percentile(x, [40, 60])
    assert abs(lo - want_lo) <= 0.01 and abs(hi - want_hi) <= 0.01


def test_mse_observer_picks_the_gaussian_optimal_clip(gauss):
    obs = lb.MSEObserver()
    minmax = lb.MinMaxObserver()
    for b in np.split(gauss, 10):
        obs.observe(b)
        minmax.observe(b)
    lo, hi = obs.range()
    assert lo == -hi and 3.5 <= hi <= 4.3
    assert hi < float(np.abs(gauss).max())
    sample = gauss[:200_000]
    assert quant_mse(sample, obs.params()) < 0.9 * quant_mse(sample, minmax.params())


def test_mse_observer_asymmetric_beats_minmax(rng):
    x = np.abs(rng.normal(size=300_000)).astype(np.float32)  # half-normal: all positive
    obs = lb.MSEObserver(symmetric=False).observe(x)
    minmax = lb.MinMaxObserver(symmetric=False).observe(x)
    lo, hi = obs.range()
    assert lo == 0.0 and hi < float(x.max())
    assert obs.params().zero_point == -128
    assert quant_mse(x, obs.params()) < 0.9 * quant_mse(x, minmax.params())


def test_entropy_observer_clips_a_heavy_tail(rng):
    x = rng.laplace(size=200_000).astype(np.float32)
    obs = lb.EntropyObserver()
    for b in np.split(x, 4):
        obs.observe(b)
    lo, hi = obs.range()
    amax = float(np.abs(x).max())
    assert lo == -hi and np.percentile(np.abs(x), 99) < hi < 0.9 * amax
    assert obs.params() == SA(hi / 127) and obs.symmetric


def test_entropy_observer_keeps_a_bounded_range(rng):
    # uniform data has no tail to cut: the threshold stays at (nearly) the max
    x = rng.uniform(-2, 2, size=200_000).astype(np.float32)
    lo, hi = lb.EntropyObserver().observe(x).range()
    assert 0.9 * 2 < hi <= float(np.abs(x).max()) + 1e-6


def test_params_symmetric_scale_and_zero_point(rng):
    x = rng.uniform(-5, 3, size=10_000).astype(np.float32)
    x[0] = -5.0
    for obs in (lb.MinMaxObserver(), lb.MovingAverageMinMaxObserver(), lb.PercentileObserver(100)):
        p = obs.observe(x).params()
        assert p.zero_point == 0
        assert p.scale == pytest.approx(5.0 / 127, rel=1e-6)


@pytest.mark.parametrize("make", [lambda x: np.abs(x), lambda x: np.maximum(x, 0)])
def test_params_asymmetric_on_positive_data(rng, make):
    x = make(rng.normal(size=50_000)).astype(np.float32)
    hi = float(x.max())
    p = lb.MinMaxObserver(symmetric=False).observe(x).params()
    assert p.zero_point == -128 and p.scale == float(np.float32(hi / 255))
    # the data then spans all 256 levels: 0 -> -128, max -> 127
    q = quant_static(x, p)
    assert q.min() == -128 and q.max() == 127
    # a percentile observer on the same data keeps the zero point at -128 too
    pp = lb.PercentileObserver(99.9, symmetric=False).observe(x).params()
    assert pp.zero_point == -128 and pp.scale < p.scale


@pytest.mark.parametrize("cls", [lb.MinMaxObserver, lb.MovingAverageMinMaxObserver,
                                 lb.PercentileObserver, lb.MSEObserver, lb.EntropyObserver])
def test_observer_errors(cls):
    obs = cls()
    with pytest.raises(ValueError, match="no activations"):
        obs.params()
    with pytest.raises(ValueError, match="no activations"):
        obs.range()
    obs.observe(np.zeros(0, np.float32))  # empty: still nothing observed
    with pytest.raises(ValueError, match="no activations"):
        obs.params()
    for bad in (np.array([1.0, np.nan], np.float32), np.array([np.inf, 0.0]),
                np.array([-np.inf], np.float16)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            obs.observe(bad)
    for bad in (np.arange(4), np.arange(4, dtype=np.int8), np.array([True]), [1, 2, 3]):
        with pytest.raises(TypeError, match="float"):
            obs.observe(bad)
    assert obs.count == 0  # the rejected batches left nothing behind
    obs.observe(np.array([-1.0, 2.0], np.float32))
    assert obs.count == 2 and obs.params().scale > 0
    assert "2 values" in repr(obs)


# --------------------------------------------------------------------------------------------
# static W8A8
# --------------------------------------------------------------------------------------------

W8_CASES = [  # m, n, k, group
    (1, 24, 37, None), (5, 40, 100, None), (3, 17, 128, 64), (7, 33, 256, 64), (64, 50, 512, 64),
    (2, 16, 4, None),
]


@pytest.mark.parametrize("m,n,k,group", W8_CASES)
@pytest.mark.parametrize("zero,with_bias", [(0, False), (0, True), (-37, True), (100, False),
                                            (-128, True)])
def test_static_w8_matches_integer_reference(isa, rng, m, n, k, group, zero, with_bias):
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32) if with_bias else None
    x = rng.normal(0.5, 1, (m, k)).astype(np.float32)
    act = SA(0.021, zero)  # some of x clips at -128 or 127
    layer = lb.Linear(w, bias, group_size=group, activations=act)
    y = layer(x)
    ref, mag = ref_w8(x, layer.weight, act, bias)
    assert y.dtype == np.float32 and y.shape == (m, n)
    np.testing.assert_array_less(np.abs(y - ref), 2e-6 * mag + 1e-30)
    # relative to the output as a whole, too
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("zero", [0, 3, -8])
def test_static_w8_rounds_half_to_even_before_the_zero_point(isa, rng, zero):
    # x / scale exactly k + 1/2: round-half-away or rounding after adding an odd zero point differ
    k, n = 64, 24
    act = SA(0.25, zero)
    x = (rng.integers(-200, 200, (4, k)) * 2 + 1).astype(np.float32) * np.float32(0.125)
    layer = lb.Linear(rng.normal(size=(n, k)).astype(np.float32), activations=act)
    ref, mag = ref_w8(x, layer.weight, act)
    np.testing.assert_array_less(np.abs(layer(x) - ref), 2e-6 * mag + 1e-30)


@pytest.mark.parametrize("zero", [0, -20, 90])
def test_static_w8_clips_huge_inputs_without_overflow(isa, rng, zero):
    n, k = 30, 100
    act = SA(0.01, zero)
    bias = rng.normal(size=n).astype(np.float32)
    layer = lb.Linear(rng.normal(0, 0.05, (n, k)).astype(np.float32), bias, activations=act)
    x = rng.normal(size=(6, k)).astype(np.float32)
    huge = x.copy()
    huge[0, :] = 1e30
    huge[1, :] = -1e30
    huge[2, ::3] = 3.0e38
    huge[3, 1::2] = -3.0e38
    huge[4, 5] = 1e30
    huge[5, :4] = [1e10, -1e10, 1e-45, -1e-45]  # and subnormals: 0
    y = layer(huge)
    assert np.isfinite(y).all()
    ref, mag = ref_w8(huge, layer.weight, act, bias)
    np.testing.assert_array_less(np.abs(y - ref), 2e-6 * mag + 1e-30)
    # values that reach the same int8 values (well beyond the range) give the same output
    tame = np.where(huge > 1e5, 1e4, np.where(huge < -1e5, -1e4, huge)).astype(np.float32)
    np.testing.assert_array_equal(quant_static(huge, act), quant_static(tame, act))
    np.testing.assert_array_equal(y, layer(tame))
    # the rows that saturate completely: every q is 127 (or -128)
    assert (quant_static(huge[0], act) == 127).all() and (quant_static(huge[1], act) == -128).all()


@pytest.mark.parametrize("zero", [0, 50])
def test_static_w8_nan_rows(isa, rng, zero):
    n, k = 20, 37
    bias = np.arange(n, dtype=np.float32)
    act = SA(0.03, zero)
    layer = lb.Linear(rng.normal(size=(n, k)).astype(np.float32), bias, activations=act)
    x = rng.normal(size=(5, k)).astype(np.float32)
    x[1, 4] = np.nan
    x[3, 36] = np.inf
    y = layer(x)
    assert np.isnan(y[1]).all() and np.isnan(y[3]).all()
    good = [0, 2, 4]
    assert np.isfinite(y[good]).all()
    np.testing.assert_array_equal(y[good], layer(x[good]))
    ref, mag = ref_w8(x[good], layer.weight, act, bias)
    np.testing.assert_array_less(np.abs(y[good] - ref), 2e-6 * mag + 1e-30)
    # an all-zero row is exactly the bias when the zero point is 0
    if zero == 0:
        np.testing.assert_array_equal(layer(np.zeros((1, k), np.float32))[0], bias)


def test_static_w8_is_close_to_float_after_calibration(rng):
    # end to end: calibrate on some batches, then run others; error of the order of int8 rounding
    w = rng.normal(0, 0.02, (64, 256)).astype(np.float32)
    b = rng.normal(size=64).astype(np.float32)
    xs = [np.abs(rng.normal(size=(32, 256))).astype(np.float32) for _ in range(4)]
    for obs in (lb.MinMaxObserver(symmetric=False), lb.PercentileObserver(99.99, symmetric=False)):
        for x in xs[:3]:
            obs.observe(x)
        layer = lb.Linear(w, b, activations=obs.params())
        exact = xs[3] @ w.T + b
        err = np.linalg.norm(layer(xs[3]) - exact) / np.linalg.norm(exact - b)
        assert err < 0.02
    assert obs.params().zero_point == -128


def test_static_shorthand_and_leading_dims(rng):
    w = rng.normal(size=(12, 64)).astype(np.float32)
    x = rng.normal(size=(2, 3, 64)).astype(np.float32)
    for bits in (8, 4):
        qw = lb.quantize(w, bits=bits, group_size=32)
        a = lb.Linear(qw, activations=0.05)
        assert a.activations == SA(0.05)
        y = a(x)
        assert y.shape == (2, 3, 12)
        np.testing.assert_array_equal(y, lb.Linear(qw, activations=SA(0.05))(x))
        np.testing.assert_array_equal(y.reshape(6, 12), a(x.reshape(6, 64)))
        # a static scale is not the dynamic per-row one
        assert not np.array_equal(y, lb.Linear(qw)(x))
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            lb.Linear(w, activations=bad)
    with pytest.raises(ValueError, match="activations"):
        lb.Linear(w, activations=True)


# --------------------------------------------------------------------------------------------
# static W4A8
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,k,group", [(1, 24, 64, 32), (5, 40, 256, 32), (64, 33, 512, 32),
                                         (3, 17, 100, None), (4, 16, 128, 64)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_static_w4_matches_reference(isa, rng, m, n, k, group, symmetric, with_bias):
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32) if with_bias else None
    x = rng.normal(0.3, 1, (m, k)).astype(np.float32)
    act = SA(0.019)  # clips some of x at 127 and -128
    layer = lb.Linear(w, bias, bits=4, group_size=group, symmetric=symmetric, activations=act)
    assert layer.weight.bits == 4
    y = layer(x)
    ref = ref_w4(x, layer.weight, act, bias)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_static_w4_rounds_half_to_even_and_clips(isa, rng):
    k, n = 64, 20
    act = SA(0.25)
    x = (rng.integers(-200, 200, (4, k)) * 2 + 1).astype(np.float32) * np.float32(0.125)
    x[3, :8] = [1e30, -1e30, 3e38, -3e38, 40.0, -40.0, 1e-45, 0.0]
    layer = lb.Linear(rng.normal(size=(n, k)).astype(np.float32), bits=4, group_size=32,
                      activations=act)
    y = layer(x)
    assert np.isfinite(y).all()
    ref = ref_w4(x, layer.weight, act)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_static_w4_nan_rows(isa, rng):
    layer = lb.Linear(rng.normal(size=(20, 96)).astype(np.float32), np.ones(20, np.float32),
                      bits=4, group_size=32, activations=0.02)
    x = rng.normal(size=(4, 96)).astype(np.float32)
    x[2, 70] = np.nan
    y = layer(x)
    assert np.isnan(y[2]).all() and np.isfinite(y[[0, 1, 3]]).all()
    np.testing.assert_array_equal(y[[0, 1, 3]], layer(x[[0, 1, 3]]))


def test_static_w4_rejects_a_zero_point(rng):
    w = rng.normal(size=(16, 64)).astype(np.float32)
    qw = lb.quantize(w, bits=4, group_size=32)
    x = rng.normal(size=(2, 64)).astype(np.float32)
    for act in (SA(0.1, 1), SA(0.1, -128), SA(0.1, 127)):
        with pytest.raises(ValueError, match="zero point"):
            lb.Linear(qw, activations=act)
        with pytest.raises(ValueError, match="zero point"):
            lb.Linear(w, bits=4, group_size=32, activations=act)
        with pytest.raises(ValueError, match="zero point"):
            lb.matmul(x, qw, activations=act)
    # zero point 0 is fine, and 8-bit weights take any zero point
    lb.Linear(qw, activations=SA(0.1, 0))(x)
    lb.Linear(w, activations=SA(0.1, 127))(x)


# --------------------------------------------------------------------------------------------
# determinism and the functional form
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["w8_zero_point", "w8_group", "w4", "w4_asym"])
def test_static_results_identical_on_every_isa_and_thread_count(rng, threads, kind):
    isas = lb.cpu_info()["available"]
    assert "ref" in isas
    for m in (1, 5, 64):
        for k in (32, 100, 512):
            w = rng.normal(0, 0.02, (40, k)).astype(np.float32)
            b = rng.normal(size=40).astype(np.float32)
            x = rng.normal(0.2, 1, (m, k)).astype(np.float32)
            if kind == "w8_zero_point":
                layer = lb.Linear(w, b, activations=SA(0.02, -17))
            elif kind == "w8_group":
                layer = lb.Linear(w, b, group_size=32 if k % 32 == 0 else None,
                                  activations=SA(0.015, 40))
            else:
                layer = lb.Linear(w, b, bits=4, group_size=32 if k % 32 == 0 else None,
                                  symmetric=kind == "w4", activations=SA(0.02))
            with lb.use_isa("ref"):
                lb.set_num_threads(1)
                expected = layer(x)
            assert np.isfinite(expected).all()
            for name in isas:
                for t in (1, 2):
                    lb.set_num_threads(t)
                    with lb.use_isa(name):
                        np.testing.assert_array_equal(layer(x), expected,
                                                      err_msg=f"{kind} isa={name} threads={t} m={m} k={k}")


@pytest.mark.parametrize("bits,group,act", [(8, None, SA(0.03, -9)), (8, 32, SA(0.03, 0)),
                                            (8, 64, 0.04), (4, 32, SA(0.02)), (4, None, 0.05)])
def test_matmul_with_static_activations_is_the_linear(rng, bits, group, act):
    w = rng.normal(size=(24, 128)).astype(np.float32)
    b = rng.normal(size=24).astype(np.float32)
    x = rng.normal(size=(5, 128)).astype(np.float32)
    qw = lb.quantize(w, bits=bits, group_size=group)
    y = lb.matmul(x, qw, b, activations=act)
    np.testing.assert_array_equal(y, lb.Linear(qw, b, activations=act)(x))
    np.testing.assert_array_equal(lb.matmul(x, qw, activations=act), lb.Linear(qw, activations=act)(x))
    # the static result differs from the dynamic one
    assert not np.array_equal(y, lb.matmul(x, qw, b))


def test_entropy_observer_asymmetric_searches_each_side():
    """Asymmetric entropy: a threshold per side of zero. All-positive heavy-tailed data: the low
    end stays at 0 and the high end clips the tail; data symmetric about zero: each side clips
    its tail between the tail's 99.9th percentile and its extreme."""
    rng = np.random.default_rng(5)
    pos = np.abs(rng.laplace(size=200_000)).astype(np.float32)
    lo, hi = lb.EntropyObserver(symmetric=False).observe(pos).range()
    assert lo == 0.0 and np.percentile(pos, 99) < hi < 0.9 * pos.max()
    sa = lb.EntropyObserver(symmetric=False).observe(pos).params()
    assert sa.zero_point == -128 and sa.scale == pytest.approx(hi / 255, rel=1e-6)

    x = rng.laplace(size=200_000).astype(np.float32)
    lo, hi = lb.EntropyObserver(symmetric=False).observe(x).range()
    assert np.percentile(x, 0.1) > lo >= x.min() and np.percentile(x, 99.9) < hi <= x.max()


def test_capture_inputs_records_each_layers_inputs_and_puts_the_layers_back(rng):
    class Net:
        def __init__(self):
            self.a = lb.Linear(rng.normal(size=(32, 64)).astype(np.float32))
            self.b = lb.Linear(rng.normal(size=(16, 32)).astype(np.float32))

        def __call__(self, x):
            return self.b(np.maximum(self.a(x), 0))

    net = Net()
    layers = {"a": (net, "a"), "b": (net, "b")}
    xs = [rng.normal(size=(2, 3, 64)).astype(np.float16), rng.normal(size=(5, 64)).astype(np.float32)]
    before = (net.a, net.b)
    got = lb.calibrate.capture_inputs(layers, lambda: [net(x) for x in xs])
    assert (net.a, net.b) == before
    np.testing.assert_array_equal(got["a"], np.concatenate([xs[0].reshape(6, 64), xs[1]]).astype(np.float32))
    np.testing.assert_array_equal(got["b"][6:], np.maximum(net.a(xs[1]), 0))
    with pytest.raises(ZeroDivisionError):
        lb.calibrate.capture_inputs(layers, lambda: 1 / 0)
    assert (net.a, net.b) == before


@pytest.mark.parametrize("cls", [lb.PercentileObserver, lb.MSEObserver, lb.EntropyObserver])
@pytest.mark.parametrize("symmetric", [False, True])
def test_histogram_observers_take_the_whole_float32_range(cls, symmetric):
    """Asymmetric observers fed +-3e38 raised IndexError: np.histogram computed the range's
    width in float32 (x's type), where 6e38 overflows. The edges are float64 now."""
    obs = cls(symmetric=symmetric)
    obs.observe(np.array([-3e38, 3e38, 1.0], np.float32))
    obs.observe(np.array([0.5, -np.finfo(np.float32).max], np.float32))  # and a wider one
    lo, hi = obs.range()
    assert np.isfinite(lo) and np.isfinite(hi) and lo <= 0 <= hi
    p = obs.params()
    assert np.isfinite(p.scale) and p.scale > 0


@pytest.mark.parametrize("observer", [lb.MinMaxObserver, lb.PercentileObserver, lb.MSEObserver,
                                      lb.EntropyObserver])
@pytest.mark.parametrize("symmetric", [True, False])
def test_observers_of_one_value_agree_with_minmax(observer, symmetric):
    """All-zero (or constant) calibration batches: a histogram of one value has no tail to clip,
    so every observer gives MinMax's scale (1.0 for zeros), not a scale of 1e-30 that would
    saturate every later input."""
    for value in (0.0, 5.0, -2.0):
        x = np.full((4, 8), value, np.float32)
        got = observer(symmetric=symmetric).observe(x).observe(x).params()
        assert got == lb.MinMaxObserver(symmetric=symmetric).observe(x).params()


@pytest.mark.parametrize("symmetric", [True, False])
def test_entropy_observer_on_data_away_from_zero_keeps_its_range(rng, symmetric):
    """No data near zero: the first candidate thresholds clip everything into one bin, whose
    divergence from itself is 0; they are no choice (they clipped 99% of the values)."""
    x = rng.uniform(3, 7, 10000).astype(np.float32)
    if not symmetric:
        x *= rng.choice([-1, 1], x.size).astype(np.float32)
    lo, hi = lb.EntropyObserver(symmetric=symmetric).observe(x).range()
    assert hi > 6 and lo < -6
