"""lb.fake_quantize / fake_quantize_grad (QAT), lb.metrics, lb.layer_sensitivity / plan_precision
(mixed precision) and the digits QAT example."""
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import lowbit as lb
from lowbit import metrics

FORMATS = lb.mixed.FORMATS
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def weights_with_edge_rows(rng, n, k):
    """Gaussian rows plus a zero row, constant rows, a single spike, tiny and large rows."""
    w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    w[0] = 0
    w[1] = 0.3
    w[2] = -2.5
    w[3] = 0
    w[3, k // 2] = -1.0
    w[4] *= np.float32(1e-3)
    w[5] *= np.float32(1e3)
    w[6, : k // 2] = 0  # half a zero row (a zero group when grouped)
    return w


def rel_max(actual, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------ fake_quantize: the weights

WEIGHT_FORMATS = [
    (8, None, True, 67),
    (8, 64, True, 128),
    (4, None, True, 67),
    (4, None, False, 67),
    (4, 32, True, 128),
    (4, 32, False, 128),
    (4, 64, True, 192),
    (4, 64, False, 192),
]


@pytest.mark.parametrize("bits,group,sym,k", WEIGHT_FORMATS)
def test_fake_quantize_equals_quantize_dequantize_bit_for_bit(isa, rng, bits, group, sym, k):
    w = weights_with_edge_rows(rng, 21, k)
    expected = lb.quantize(w, bits, group, sym).dequantize()
    got = lb.fake_quantize(w, bits, group, sym)
    assert got.dtype == np.float32 and got.shape == w.shape
    np.testing.assert_array_equal(got, expected)
    # the zero row stays zero, constant rows are exact in 8 bits
    np.testing.assert_array_equal(got[0], 0)
    if bits == 8:
        np.testing.assert_array_equal(got[1:3], w[1:3])


@pytest.mark.parametrize("bits,group,sym,k", WEIGHT_FORMATS)
def test_fake_quantize_works_on_any_leading_dims(rng, bits, group, sym, k):
    w = rng.normal(0, 1, (2, 3, k)).astype(np.float32)
    flat = lb.fake_quantize(w.reshape(6, k), bits, group, sym)
    got3 = lb.fake_quantize(w, bits, group, sym)
    assert got3.shape == w.shape
    np.testing.assert_array_equal(got3, flat.reshape(2, 3, k))
    got1 = lb.fake_quantize(w[1, 2], bits, group, sym)
    assert got1.shape == (k,)
    np.testing.assert_array_equal(got1, flat[5])
    np.testing.assert_array_equal(got1, lb.quantize(w[1, 2][None], bits, group, sym).dequantize()[0])


def test_fake_quantize_takes_other_float_dtypes_and_leaves_input_alone(rng):
    w = rng.normal(0, 1, (5, 64)).astype(np.float32)
    before = w.copy()
    ref = lb.fake_quantize(w, 4, 32, False)
    np.testing.assert_array_equal(w, before)
    np.testing.assert_array_equal(lb.fake_quantize(w.astype(np.float64), 4, 32, False), ref)
    assert lb.fake_quantize(w.astype(np.float64), 4, 32, False).dtype == np.float32
    # a strided view gives the same values as its contiguous copy
    big = np.zeros((10, 100), np.float32)
    big[::2, 7:71] = w
    np.testing.assert_array_equal(lb.fake_quantize(big[::2, 7:71], 4, 32, False), ref)


def test_fake_quantize_int4_symmetric_known_values():
    # d = (value of largest magnitude) / -8: [1, -1, 0.5, ...] -> d = -0.125, -1 clips to -0.875
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [1.0, -1.0, 0.5, 0.3]
    got = lb.fake_quantize(w, bits=4)
    np.testing.assert_array_equal(got[0, :4], np.float32([1.0, -0.875, 0.5, 0.25]))


# ------------------------------------------------------------ fake_quantize: the activations

def test_dynamic_int8_activations_match_an_8bit_layer(isa, rng):
    w = rng.normal(size=(24, 96)).astype(np.float32)
    x = rng.normal(size=(2, 3, 96)).astype(np.float32) * rng.uniform(0.1, 5, (2, 3, 1)).astype(np.float32)
    x[0, 1] = 0  # a zero row
    for group in (None, 32):
        qw = lb.quantize(w, 8, group)
        y = lb.Linear(qw)(x)
        ref = lb.fake_quantize(x, bits=8).astype(np.float64) @ qw.dequantize().T.astype(np.float64)
        assert rel_max(y, ref) < 1e-5
        # and the rounding is what makes the difference: float inputs are further off
        assert rel_max(y, x.astype(np.float64) @ qw.dequantize().T.astype(np.float64)) > 1e-4


@pytest.mark.parametrize("group,sym", [(None, True), (None, False), (32, True), (32, False),
                                       (64, False)])
def test_int8_activations_per_32_match_a_4bit_layer(isa, rng, group, sym):
    w = rng.normal(size=(20, 128)).astype(np.float32)
    x = rng.normal(size=(5, 128)).astype(np.float32)
    x[:, 64:96] *= 40  # blocks of very different ranges: per-row rounding would differ
    qw = lb.quantize(w, 4, group, sym)
    y = lb.Linear(qw)(x)
    ref = lb.fake_quantize(x, bits=8, group_size=32).astype(np.float64) @ qw.dequantize().T.astype(np.float64)
    assert rel_max(y, ref) < 1e-5
    per_row = lb.fake_quantize(x, bits=8).astype(np.float64) @ qw.dequantize().T.astype(np.float64)
    assert rel_max(y, per_row) > 1e-4


def test_static_activations_match_a_static_8bit_layer(isa, rng):
    w = rng.normal(size=(16, 64)).astype(np.float32)
    qw = lb.quantize(w, 8)
    sa = lb.StaticActivations(0.02, 17)  # x in about [-2.9, 2.2]; the rest is clipped
    x = (rng.normal(size=(6, 64)) * 2).astype(np.float32)
    x[0, :4] = [100.0, -100.0, 2.2, -2.9]
    fq = lb.fake_quantize(x, static=sa)
    lo, hi = np.float32(0.02) * (-128 - 17), np.float32(0.02) * (127 - 17)
    assert fq.min() >= lo and fq.max() <= hi and (fq == lo).any() and (fq == hi).any()
    y = lb.Linear(qw, activations=sa)(x)
    ref = fq.astype(np.float64) @ qw.dequantize().T.astype(np.float64)
    assert rel_max(y, ref) < 1e-5
    # ties (x / scale a half integer) round like the kernels
    sa = lb.StaticActivations(0.25, -5)
    xt = (rng.integers(-700, 700, (5, 64)) / 8).astype(np.float32)
    ref = lb.fake_quantize(xt, static=sa).astype(np.float64) @ qw.dequantize().T.astype(np.float64)
    assert rel_max(lb.Linear(qw, activations=sa)(xt), ref) < 1e-5
    # near ties with a scale that is not a power of two: the quotient x / scale, then rint
    sa = lb.StaticActivations(0.1, 3)
    s = np.float32(0.1)
    xn = ((rng.integers(-120, 120, (8, 64)) + 0.5) * s).astype(np.float32)
    xn = np.nextafter(xn, xn + rng.choice([-1, 0, 1], xn.shape).astype(np.float32))
    fq = lb.fake_quantize(xn, static=sa)
    np.testing.assert_array_equal(fq, s * (np.clip(np.rint(xn / s) + 3, -128, 127) - 3))
    ref = fq.astype(np.float64) @ qw.dequantize().T.astype(np.float64)
    assert rel_max(lb.Linear(qw, activations=sa)(xn), ref) < 1e-5


def test_static_activations_match_a_static_4bit_layer(isa, rng):
    w = rng.normal(size=(16, 64)).astype(np.float32)
    qw = lb.quantize(w, 4, 32)
    sa = lb.StaticActivations(0.015)
    x = (rng.normal(size=(4, 64)) * 2).astype(np.float32)
    ref = lb.fake_quantize(x, static=sa).astype(np.float64) @ qw.dequantize().T.astype(np.float64)
    assert rel_max(lb.Linear(qw, activations=sa)(x), ref) < 1e-5


def test_static_fake_quantize_known_values():
    sa = lb.StaticActivations(0.5, 10)  # q = clamp(rint(x / 0.5) + 10, -128, 127)
    x = np.float32([0.0, 0.25, 0.75, 58.5, 58.7, 58.75, 1e6, -69.0, -69.25, -69.3, -1e6])
    expected = np.float32([0.0, 0.0, 1.0, 58.5, 58.5, 58.5, 58.5, -69.0, -69.0, -69.0, -69.0])
    np.testing.assert_array_equal(lb.fake_quantize(x, static=sa), expected)


# ------------------------------------------------------------------------ fake_quantize_grad

def test_static_grad_is_zero_exactly_where_clipped():
    sa = lb.StaticActivations(0.5, 10)
    # x / 0.5 + 10 rounds into [-128, 127] for x in [-69.25, 58.5] (halves to even)
    x = np.float32([0.0, 58.5, 58.7, 58.75, 59.0, 1e6, -69.0, -69.25, -69.3, -70.0, -1e6])
    inside = np.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0], bool)
    grad = np.arange(1, len(x) + 1, dtype=np.float32)
    np.testing.assert_array_equal(lb.fake_quantize_grad(x, grad, static=sa), np.where(inside, grad, 0))


def test_static_grad_matches_an_explicit_mask(rng):
    sa = lb.StaticActivations(0.03, -20)
    x = (rng.normal(size=(3, 7, 50)) * 3).astype(np.float32)
    grad = rng.normal(size=x.shape)
    q = np.rint(x / np.float32(0.03)) - 20
    mask = (q >= -128) & (q <= 127)
    assert 0.05 < (~mask).mean() < 0.95
    got = lb.fake_quantize_grad(x, grad, static=sa)
    assert got.dtype == np.float64 and got.shape == x.shape
    np.testing.assert_array_equal(got, np.where(mask, grad, 0))
    # and the gradient passes exactly where fake_quantize did not clip
    fq = lb.fake_quantize(x, static=sa)
    assert np.array_equal(mask, np.abs(fq - x) <= np.float32(0.015) * (1 + 1e-5))


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (8, 32, True), (4, None, False),
                                            (4, 32, False), (4, 64, False)])
def test_weight_grad_passes_unchanged_for_data_ranges(rng, bits, group, sym):
    w = weights_with_edge_rows(rng, 12, 128)
    grad = rng.normal(size=w.shape).astype(np.float32)
    got = lb.fake_quantize_grad(w, grad, bits, group, sym)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, grad)


def test_weight_grad_int4_symmetric_zero_where_clipped(rng):
    # Q4_0 values run -8..7: the side opposite the largest magnitude loses its top half step
    w = np.zeros((2, 32), np.float32)
    w[0, :4] = [1.0, -1.0, 0.5, -0.93]   # d = -0.125: -1.0 -> 16 (clipped), -0.93 -> 15
    w[1, :4] = [-2.0, 1.9, 1.8, 1.7]     # d = 0.25: 1.9 -> 15.6 -> 16 (clipped), 1.8 -> 15
    grad = np.ones_like(w)
    expected = grad.copy()
    expected[0, 1] = expected[1, 1] = 0
    np.testing.assert_array_equal(lb.fake_quantize_grad(w, grad, bits=4), expected)
    # random rows: zero exactly where rint(w / d) + 8 leaves 0..15
    w = rng.normal(size=(40, 64)).astype(np.float32)
    d = lb.quantize(w, 4, 32).scales.astype(np.float32)
    t = np.rint(w.reshape(40, 2, 32) / d[:, :, None]) + 8
    mask = ((t >= 0) & (t <= 15)).reshape(40, 64)
    assert (~mask).any()
    grad = rng.normal(size=w.shape).astype(np.float32)
    np.testing.assert_array_equal(lb.fake_quantize_grad(w, grad, 4, 32), np.where(mask, grad, 0))


def test_grad_keeps_grad_dtype_and_checks_shape(rng):
    x = rng.normal(size=(4, 64)).astype(np.float32)
    for dt in (np.float16, np.float32, np.float64):
        g = np.ones((4, 64), dt)
        out = lb.fake_quantize_grad(x, g, bits=8, group_size=32)
        assert out.dtype == dt
        np.testing.assert_array_equal(out, g)
    with pytest.raises(ValueError, match="shape"):
        lb.fake_quantize_grad(x, np.ones((4, 32), np.float32))
    with pytest.raises(ValueError, match="shape"):
        lb.fake_quantize_grad(x, np.ones((64, 4), np.float32))


@pytest.mark.parametrize("fn", ["fake_quantize", "fake_quantize_grad"])
@pytest.mark.parametrize("x,kwargs,err,match", [
    (np.ones((2, 64), np.int32), {}, TypeError, "float"),
    (np.ones((2, 64), bool), {}, TypeError, "float"),
    (np.float32([[1, np.nan] + [0] * 62]), {}, ValueError, "NaN"),
    (np.float32([[1, np.inf] + [0] * 62]), {}, ValueError, "NaN or Inf"),
    (np.ones((0, 64), np.float32), {}, ValueError, "non-empty"),
    (np.float32(1.0), {}, ValueError, "non-empty"),
    (np.ones((2, 64), np.float32), dict(group_size=48), ValueError, "multiple of 32"),
    (np.ones((2, 64), np.float32), dict(group_size=128), ValueError, "dividing K=64"),
    (np.ones((2, 64), np.float32), dict(group_size=0), ValueError, "positive"),
    (np.ones((2, 67), np.float32), dict(bits=8, group_size=32), ValueError, "dividing K=67"),
    (np.ones((2, 64), np.float32), dict(group_size=32.0), TypeError, "int"),
    (np.ones((2, 64), np.float32), dict(bits=3), ValueError, "bits"),
    (np.ones((2, 64), np.float32), dict(bits=16), ValueError, "bits"),
    (np.ones((2, 64), np.float32), dict(bits=8, symmetric=False), ValueError, "symmetric"),
    (np.ones((2, 64), np.float32), dict(static=0.1), TypeError, "StaticActivations"),
    (np.ones((2, 64), np.float32), dict(static=(0.1, 0)), TypeError, "StaticActivations"),
])
def test_fake_quantize_rejects_bad_arguments(fn, x, kwargs, err, match):
    f = getattr(lb, fn)
    with pytest.raises(err, match=match):
        f(x, **kwargs) if fn == "fake_quantize" else f(x, np.ones(np.shape(x), np.float32), **kwargs)


# ------------------------------------------------------------------------------------ metrics

def test_sqnr_db_known_values():
    ref = np.full((4, 5), 10.0)
    assert metrics.sqnr_db(ref, ref + 1) == 20.0
    assert metrics.sqnr_db(ref, ref - 0.1) == pytest.approx(40.0, abs=1e-9)
    assert metrics.sqnr_db(ref, ref) == math.inf
    assert metrics.sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert metrics.sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    # float32 inputs are computed in float64
    assert metrics.sqnr_db(np.float32([3, 4]), np.float32([3, 4.5])) == pytest.approx(10 * math.log10(25 / 0.25))


def test_cosine_known_values():
    assert metrics.cosine([1, 0], [0, 1]) == 0.0
    assert metrics.cosine([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0, abs=1e-15)
    assert metrics.cosine([1, 2, 3], [-1, -2, -3]) == pytest.approx(-1.0, abs=1e-15)
    assert metrics.cosine([[1, 1], [0, 0]], [[1, 0], [0, 0]]) == pytest.approx(1 / math.sqrt(2))
    assert metrics.cosine(np.zeros(4), np.zeros(4)) == 1.0
    assert metrics.cosine(np.zeros(4), np.ones(4)) == 0.0
    assert metrics.cosine(np.ones(4), np.zeros(4)) == 0.0


def test_row_cosine_shape_and_values():
    a = np.zeros((2, 3, 2))
    b = np.zeros((2, 3, 2))
    a[0, 0], b[0, 0] = [1, 0], [0, 1]      # orthogonal: 0
    a[0, 1], b[0, 1] = [1, 1], [2, 2]      # parallel: 1
    a[0, 2], b[0, 2] = [1, 0], [-3, 0]     # opposite: -1
    a[1, 0], b[1, 0] = [1, 0], [0, 0]      # one zero: 0
    a[1, 2], b[1, 2] = [3, 4], [4, 3]      # 24 / 25
    c = metrics.row_cosine(a, b)           # a[1, 1], b[1, 1] both zero: 1
    assert c.shape == (2, 3)
    np.testing.assert_allclose(c, [[0, 1, -1], [0, 1, 24 / 25]], atol=1e-15)


def test_relative_and_max_abs_error_known_values():
    assert metrics.relative_error([3, 4], [3, 0]) == pytest.approx(0.8)
    assert metrics.relative_error([[1, 0], [0, 0]], [[1, 0], [0, 2]]) == pytest.approx(2.0)
    assert metrics.relative_error([0, 0], [0, 0]) == 0.0
    assert metrics.relative_error([0, 0], [0, 1]) == math.inf
    assert metrics.max_abs_error([1, 2, 3], [1, 5, 2]) == 3.0
    assert metrics.max_abs_error([[-1, 0]], [[1, 0.5]]) == 2.0
    c = metrics.compare(np.float32([[3, 4], [1, 0]]), np.float32([[3, 4], [0, 1]]))
    assert set(c) == {"sqnr_db", "cosine", "mean_row_cosine", "relative_error", "max_abs_error"}
    assert c["mean_row_cosine"] == pytest.approx(0.5)
    assert c["max_abs_error"] == 1.0
    assert c["relative_error"] == pytest.approx(math.sqrt(2 / 26))
    assert c["sqnr_db"] == pytest.approx(10 * math.log10(26 / 2))
    assert "mean_row_cosine" not in metrics.compare([1.0, 2.0], [1.0, 2.5])


@pytest.mark.parametrize("fn", ["sqnr_db", "cosine", "row_cosine", "relative_error", "max_abs_error",
                                "compare", "report"])
def test_metrics_reject_mismatched_and_empty_arrays(fn):
    f = getattr(metrics, fn)
    with pytest.raises(ValueError, match="shape"):
        f(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="shape"):
        f(np.ones((3, 4)), np.ones(12))
    with pytest.raises(ValueError, match="empty"):
        f(np.ones((0, 4)), np.ones((0, 4)))


def hand_made_logits():
    """6 examples, 3 classes; one-hot logits (x5) of the predicted classes."""
    targets = np.array([0, 0, 1, 1, 2, 2])
    pred_before = np.array([0, 0, 1, 2, 2, 2])   # 5 of 6 right
    pred_after = np.array([0, 1, 1, 2, 0, 0])    # 2 of 6 right; agrees with before on 3
    eye = np.eye(3, dtype=np.float32) * 5
    return eye[pred_before], eye[pred_after], targets


def test_report_with_targets_hand_made():
    before, after, targets = hand_made_logits()
    r = metrics.report(before, after, targets=targets)
    o = r.overall
    assert o["n"] == 6
    assert o["accuracy_before"] == pytest.approx(500 / 6)
    assert o["accuracy_after"] == pytest.approx(200 / 6)
    assert o["drop"] == pytest.approx(50.0)
    assert o["agreement"] == pytest.approx(50.0)
    assert o["sqnr_db"] == pytest.approx(0.0, abs=1e-12)  # signal 150, noise 150
    assert o["mean_row_cosine"] == pytest.approx(0.5)
    assert o["relative_error"] == pytest.approx(1.0)
    assert o["max_abs_error"] == 5.0
    # slices default to the classes, as plain ints
    assert list(r.slices) == [0, 1, 2] and all(type(k) is int for k in r.slices)
    s0, s1, s2 = r.slices[0], r.slices[1], r.slices[2]
    assert [s["n"] for s in (s0, s1, s2)] == [2, 2, 2]
    assert (s0["accuracy_before"], s0["accuracy_after"], s0["drop"], s0["agreement"]) == (100, 50, 50, 50)
    assert (s1["accuracy_before"], s1["accuracy_after"], s1["drop"], s1["agreement"]) == (50, 50, 0, 100)
    assert (s2["accuracy_before"], s2["accuracy_after"], s2["drop"], s2["agreement"]) == (100, 0, 100, 0)
    assert s1["sqnr_db"] == math.inf
    assert s0["sqnr_db"] == pytest.approx(0.0, abs=1e-12)
    assert s2["sqnr_db"] == pytest.approx(10 * math.log10(0.5))
    # the worst: the highest drop, the lowest of the others
    assert r.worst("drop") == 2
    assert r.worst("sqnr_db") == 2 and r.worst() == 2
    assert r.worst("accuracy_before") == 1
    assert r.worst("agreement") == 2
    # the table names every slice; to_dict goes through JSON
    text = str(r)
    lines = text.splitlines()
    assert len(lines) == 1 + 1 + 3
    assert lines[1].startswith("overall")
    for label, line in zip(("0", "1", "2"), lines[2:]):
        assert line.split()[0] == label
    assert "acc.before" in text and "drop" in text and "inf" in text
    d = r.to_dict()
    back = json.loads(json.dumps(d))
    assert back == d and set(back["slices"]) == {"0", "1", "2"}
    assert back["overall"]["drop"] == pytest.approx(50.0)
    assert "3 slices" in repr(r)


def test_report_custom_slices_and_no_targets():
    before, after, targets = hand_made_logits()
    labels = np.array(["short", "long", "short", "long", "short", "long"])
    r = metrics.report(before, after, targets=targets, slices=labels)
    assert set(r.slices) == {"short", "long"} and all(type(k) is str for k in r.slices)
    # short: examples 0, 2, 4: before right on all 3, after on 0, 2
    assert r.slices["short"]["accuracy_before"] == pytest.approx(100.0)
    assert r.slices["short"]["accuracy_after"] == pytest.approx(200 / 3)
    # long: examples 1, 3, 5: before right on 1 and 5, after on none
    assert r.slices["long"]["accuracy_before"] == pytest.approx(200 / 3)
    assert r.slices["long"]["accuracy_after"] == 0.0
    assert r.slices["long"]["drop"] == pytest.approx(200 / 3)
    assert r.worst("drop") == "long"
    assert r.worst("accuracy_after") == "long" and r.worst("accuracy_before") == "long"
    text = str(r)
    assert "short" in text and "long" in text
    json.dumps(r.to_dict())
    # without targets: no accuracies, no slices unless given
    r = metrics.report(before, after)
    assert r.slices == {} and "accuracy_before" not in r.overall and "drop" not in str(r)
    with pytest.raises(ValueError, match="no slices"):
        r.worst()
    r = metrics.report(before, after, slices=labels)
    assert set(r.slices) == {"short", "long"} and "accuracy_after" not in r.slices["long"]
    json.dumps(r.to_dict())


def test_report_rejects_bad_targets_and_slices():
    before, after, targets = hand_made_logits()
    with pytest.raises(ValueError, match="targets"):
        metrics.report(before, after, targets=targets[:5])
    with pytest.raises(ValueError, match="targets"):
        metrics.report(before, after, targets=targets[:, None])
    with pytest.raises(ValueError, match="targets"):  # classification outputs must be (n, classes)
        metrics.report(before[:, :, None], after[:, :, None], targets=targets)
    with pytest.raises(ValueError, match="slices"):
        metrics.report(before, after, slices=np.arange(4))


def test_evaluate_equals_report_on_the_full_outputs(rng):
    w0 = rng.normal(size=(8, 5))
    w1 = w0 + rng.normal(0, 0.2, w0.shape)
    x = rng.normal(size=(23, 8))
    targets = (x @ w0).argmax(1)
    seen = []

    def before(batch):
        seen.append(len(batch))
        return batch @ w0

    def after(batch):
        return batch @ w1

    r = metrics.evaluate(before, after, x, targets=targets, batch_size=5)
    assert seen == [5, 5, 5, 5, 3]
    expected = metrics.report(x @ w0, x @ w1, targets=targets)
    assert r.to_dict() == expected.to_dict()
    slices = np.arange(23) % 3
    r = metrics.evaluate(before, after, x, slices=slices)  # the default batch: all at once
    assert seen[-1] == 23
    assert r.to_dict() == metrics.report(x @ w0, x @ w1, slices=slices).to_dict()
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            metrics.evaluate(before, after, x, batch_size=bad)


# --------------------------------------------------------------------------- layer_sensitivity

def gaussian_layers(rng):
    weights = {"a": rng.normal(size=(16, 128)).astype(np.float32),
               "b": rng.normal(size=(8, 96)).astype(np.float32),
               "c": rng.normal(size=(12, 256)).astype(np.float32)}
    calibration = {n: rng.normal(size=(48, w.shape[1])).astype(np.float32) for n, w in weights.items()}
    return weights, calibration


def test_layer_sensitivity_formats_errors_and_bytes(rng):
    weights, calibration = gaussian_layers(rng)
    sens = lb.layer_sensitivity(weights, calibration)
    assert list(sens) == ["a", "b", "c"]
    assert set(sens["a"]) == set(FORMATS) == set(sens["c"])
    assert set(sens["b"]) == {"int4-g32", "int8", "float"}  # 96 % 128 != 0
    for name, res in sens.items():
        w = weights[name]
        assert res["float"] == {"error": 0.0, "nbytes": w.nbytes}
        assert 0 < res["int8"]["error"] < res["int4-g32"]["error"]
        if "int4-g128" in res:
            assert res["int4-g32"]["error"] < res["int4-g128"]["error"] < 0.05
        for fmt, v in res.items():
            assert type(v["nbytes"]) is int and type(v["error"]) is float
            if FORMATS[fmt] != "keep":
                assert v["nbytes"] == lb.quantize(w, **FORMATS[fmt]).nbytes
        assert res["int4-g128" if "int4-g128" in res else "int4-g32"]["nbytes"] < res["int8"]["nbytes"] \
            < res["float"]["nbytes"]
        # the 4-bit errors are the relative output error of the dequantized weights
        x = calibration[name].astype(np.float64)
        y = x @ w.T.astype(np.float64)
        for fmt in ("int4-g32", "int4-g128"):
            if fmt in res:
                wq = lb.quantize(w, **FORMATS[fmt]).dequantize().astype(np.float64)
                expected = ((x @ wq.T - y) ** 2).sum() / (y ** 2).sum()
                assert res[fmt]["error"] == pytest.approx(expected, rel=1e-3)


def test_layer_sensitivity_int8_error_is_the_documented_weight_error(rng):
    w = rng.normal(size=(32, 128)).astype(np.float32)
    x = rng.normal(size=(64, 128)).astype(np.float32)
    sens = lb.layer_sensitivity({"a": w}, {"a": x})
    y = x.astype(np.float64) @ w.T.astype(np.float64)
    wq = lb.quantize(w, **FORMATS["int8"]).dequantize().astype(np.float64)
    expected = ((x @ wq.T - y) ** 2).sum() / (y ** 2).sum()
    assert sens["a"]["int8"]["error"] == pytest.approx(expected, rel=0.05)


def test_layer_sensitivity_custom_formats(rng):
    weights, calibration = gaussian_layers(rng)
    fmts = {"q4": {"bits": 4, "group_size": 64, "symmetric": True}, "f": "keep"}
    sens = lb.layer_sensitivity(weights, calibration, formats=fmts)
    assert set(sens["a"]) == {"q4", "f"} and set(sens["b"]) == {"f"}  # 64 does not divide 96
    assert sens["a"]["q4"]["nbytes"] == lb.quantize(weights["a"], 4, 64, True).nbytes


def test_layer_sensitivity_rejects_bad_calibration(rng):
    weights, calibration = gaussian_layers(rng)
    with pytest.raises(ValueError, match="'b'"):
        lb.layer_sensitivity(weights, {k: v for k, v in calibration.items() if k != "b"})
    for bad in (np.ones((10, 95), np.float32), np.ones(96, np.float32), np.ones((0, 96), np.float32),
                np.ones((10, 96), np.int32), np.ones((2, 10, 96), np.float32)):
        with pytest.raises(ValueError, match=r"calibration\['b'\]"):
            lb.layer_sensitivity(weights, dict(calibration, b=bad))


# ------------------------------------------------------------------------------ plan_precision

SETTINGS_TO_FORMAT = [(v, k) for k, v in FORMATS.items()]


def format_of(settings):
    names = [k for v, k in SETTINGS_TO_FORMAT if v == settings]
    assert len(names) == 1, settings
    return names[0]


def random_sensitivity(rng, n_layers):
    sens = {}
    for i in range(n_layers):
        fmts = list(FORMATS)
        if rng.random() < 0.4:
            fmts.remove("int4-g128")
        sens[f"layer{i}"] = {f: {"error": float(rng.random() ** 2), "nbytes": int(rng.integers(10, 500))}
                             for f in fmts}
    return sens


def brute_force(sens, budget):
    best = None
    for combo in itertools.product(*(list(v.items()) for v in sens.values())):
        nbytes = sum(c[1]["nbytes"] for c in combo)
        if nbytes <= budget:
            err = sum(c[1]["error"] for c in combo)
            best = err if best is None else min(best, err)
    return best


def plan_totals(sens, plan):
    assert list(plan) == list(sens)
    fmts = {name: format_of(settings) for name, settings in plan.items()}
    return (sum(sens[n][f]["nbytes"] for n, f in fmts.items()),
            sum(sens[n][f]["error"] for n, f in fmts.items()))


@pytest.mark.parametrize("seed", range(12))
def test_plan_precision_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    sens = random_sensitivity(rng, int(rng.integers(4, 7)))
    least = sum(min(v["nbytes"] for v in s.values()) for s in sens.values())
    most = sum(max(v["nbytes"] for v in s.values()) for s in sens.values())
    budgets = {least, most, most + 100, *np.linspace(least, most, 10).astype(int).tolist()}
    for budget in sorted(budgets):
        plan = lb.plan_precision(sens, budget)
        nbytes, err = plan_totals(sens, plan)
        assert nbytes <= budget
        assert err == pytest.approx(brute_force(sens, budget), rel=1e-12, abs=1e-15), budget
    # below the smallest plan: an error that names its size
    with pytest.raises(ValueError, match=rf"smallest plan \({least} bytes\)"):
        lb.plan_precision(sens, least - 1)


def test_plan_precision_known_answer():
    sens = {
        "x": {"int8": {"error": 0.01, "nbytes": 100}, "int4-g32": {"error": 0.5, "nbytes": 60},
              "float": {"error": 0.0, "nbytes": 400}},
        "y": {"int8": {"error": 0.02, "nbytes": 100}, "int4-g32": {"error": 0.03, "nbytes": 60},
              "float": {"error": 0.0, "nbytes": 400}},
    }
    assert lb.plan_precision(sens, 10_000) == {"x": "keep", "y": "keep"}
    assert lb.plan_precision(sens, 500) == {"x": FORMATS["int8"], "y": "keep"}  # 0.01 < 0.02
    assert lb.plan_precision(sens, 200) == {"x": FORMATS["int8"], "y": FORMATS["int8"]}
    assert lb.plan_precision(sens, 199) == {"x": FORMATS["int8"], "y": FORMATS["int4-g32"]}
    assert lb.plan_precision(sens, 120) == {"x": FORMATS["int4-g32"], "y": FORMATS["int4-g32"]}
    with pytest.raises(ValueError, match=r"budget 119 bytes is below the smallest plan \(120 bytes\)"):
        lb.plan_precision(sens, 119)


def test_plan_values_are_independent_copies_and_json_round_trip(rng):
    sens = {n: {"int4-g32": {"error": 0.1, "nbytes": 10}, "int8": {"error": 0.01, "nbytes": 20},
                "float": {"error": 0.0, "nbytes": 80}} for n in ("p", "q", "r")}
    plan = lb.plan_precision(sens, 40)  # two layers int4, one int8 (all errors tie per layer)
    assert sorted(format_of(v) for v in plan.values()) == ["int4-g32", "int4-g32", "int8"]
    for v in plan.values():
        assert isinstance(v, dict) and v is not FORMATS[format_of(v)]
    assert json.loads(json.dumps(plan)) == plan
    snapshot = json.loads(json.dumps({k: v for k, v in FORMATS.items()}))
    a, b = [n for n, v in plan.items() if v == FORMATS["int4-g32"]]
    plan[a]["bits"] = 99
    plan[a]["group_size"] = 7
    assert plan[b] == FORMATS["int4-g32"] and plan[b]["bits"] == 4
    assert FORMATS == snapshot
    again = lb.plan_precision(sens, 40)
    assert sorted(format_of(v) for v in again.values()) == ["int4-g32", "int4-g32", "int8"]
    keep = lb.plan_precision(sens, 10_000)
    assert keep == {"p": "keep", "q": "keep", "r": "keep"}
    assert json.loads(json.dumps(keep)) == keep


def test_plan_from_real_sensitivities_quantizes(rng):
    weights, calibration = gaussian_layers(rng)
    sens = lb.layer_sensitivity(weights, calibration)
    full = sum(w.nbytes for w in weights.values())
    smallest = sum(min(v["nbytes"] for v in s.values()) for s in sens.values())
    assert smallest < full // 4
    for budget in (full, full // 2, full // 4, smallest + 1000, smallest):
        plan = lb.plan_precision(sens, budget)
        plan = json.loads(json.dumps(plan))
        total = 0
        for name, settings in plan.items():
            if settings == "keep":
                total += weights[name].nbytes
                continue
            qw = lb.quantize(weights[name], **settings)
            assert qw.nbytes == sens[name][format_of(settings)]["nbytes"]
            x = calibration[name]
            layer = lb.Linear(qw)
            assert layer(x).shape == (len(x), weights[name].shape[0])
            total += qw.nbytes
        assert total <= budget
        assert total == plan_totals(sens, plan)[0]
        assert plan_totals(sens, plan)[1] == pytest.approx(brute_force(sens, budget))
    assert all(v == "keep" for v in lb.plan_precision(sens, full).values())
    assert all(v != "keep" and v["bits"] == 4 for v in lb.plan_precision(sens, smallest).values())
    with pytest.raises(ValueError, match=str(smallest)):
        lb.plan_precision(sens, smallest - 1)


# ------------------------------------------------------------------------- the digits example

def test_digits_qat_example(capsys, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "digits_qat", raising=False)
    import digits_qat

    digits_qat.main(["--json"])
    out = json.loads(capsys.readouterr().out)
    acc = out["accuracy"]
    assert out["test_examples"] == 540
    assert set(acc) == {"float32", "int8_ptq", "int4_ptq", "int4_qat"}
    assert acc["float32"] > 90
    assert abs(acc["int8_ptq"] - acc["float32"]) <= 0.5
    assert abs(acc["int4_qat"] - acc["float32"]) <= 1.0


def test_model_sensitivity_evaluates_one_layer_at_a_time(rng):
    """model_sensitivity calls evaluate with exactly one layer quantized, the rest "keep", and
    reports its result with the format's real size; formats that do not fit are left out."""
    weights = {"a": rng.normal(size=(32, 128)).astype(np.float32),
               "b": rng.normal(size=(16, 96)).astype(np.float32)}
    calls = []

    def evaluate(plan):
        calls.append(plan)
        quantized = [n for n, s in plan.items() if s != "keep"]
        assert len(quantized) == 1
        s = plan[quantized[0]]
        return {"a": 1.0, "b": 10.0}[quantized[0]] * (s["bits"] + (s["group_size"] or 0) / 1000)

    sens = lb.model_sensitivity(evaluate, weights)
    assert set(sens["a"]) == set(lb.mixed.FORMATS) and "int4-g128" not in sens["b"]
    assert len(calls) == 3 + 2
    assert sens["b"]["int4-g32"]["error"] == pytest.approx(10 * 4.032)
    assert sens["a"]["float"] == {"error": 0.0, "nbytes": weights["a"].nbytes}
    for name, w in weights.items():
        for fmt, v in sens[name].items():
            if fmt != "float":
                assert v["nbytes"] == lb.quantize(w, **lb.mixed.FORMATS[fmt]).nbytes
    plan = lb.plan_precision(sens, sens["a"]["int8"]["nbytes"] + sens["b"]["int4-g32"]["nbytes"])
    assert plan["b"]["bits"] == 4 and plan["a"]["bits"] in (4, 8)


def test_unclear_misuses_get_errors_that_say_what_was_expected(rng):
    a = rng.normal(size=(10, 3))
    report = metrics.report(a, a + 0.01, slices=np.array(["x", "y"] * 5))
    with pytest.raises(ValueError, match="no 'drop'.*needs targets"):
        report.worst("drop")
    with pytest.raises(ValueError, match="at least one input"):
        metrics.evaluate(lambda x: x, lambda x: x, np.zeros((0, 3)))
    sens = {"a": {"i4": {"error": 0.01, "nbytes": 100}, "k": {"error": 0.0, "nbytes": 400}}}
    with pytest.raises(ValueError, match=r"formats \['i4', 'k'\]"):
        lb.plan_precision(sens, 1000)  # measured with formats= of its own, planned without them
