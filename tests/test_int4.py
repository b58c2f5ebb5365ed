"""4-bit weights: quantization (sym / asym, groups), W4A8 and W4A32 layers on every ISA."""
import numpy as np
import pytest

import lowbit as lb

F16 = np.float16
F32 = np.float32


def expected_int4(w, group, symmetric):
    """The quantizer's definition in numpy: float16 scale (and minimum), q from the rounded ones."""
    n, k = w.shape
    g = group or k
    wg = w.reshape(n, k // g, g)
    lo, hi = wg.min(axis=2), wg.max(axis=2)
    if symmetric:
        d = (np.where(-lo > hi, lo, hi) / F32(-8)).astype(F16)
        m = np.zeros_like(d)
    else:
        d = ((hi - lo) / F32(15)).astype(F16)
        m = lo.astype(F16)
    df, mf = d.astype(F32)[..., None], m.astype(F32)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.rint((wg - mf) / df) + (8 if symmetric else 0)
    q = np.where(df != 0, q, 8 if symmetric else 0)
    return np.clip(q, 0, 15).astype(np.uint8).reshape(n, k), d, (None if symmetric else m)


@pytest.mark.parametrize("n,k,group", [(1, 32, None), (3, 40, None), (17, 64, 32), (33, 256, 64),
                                       (20, 512, 128), (5, 1024, 256), (70, 96, 32)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_int4_matches_its_definition(isa, rng, n, k, group, symmetric):
    w = rng.normal(0, 0.02, (n, k)).astype(F32)
    qw = lb.quantize(w, bits=4, group_size=group, symmetric=symmetric)
    q, d, m = expected_int4(w, group, symmetric)
    np.testing.assert_array_equal(qw.int_values(), q)
    np.testing.assert_array_equal(qw.scales, d)
    if symmetric:
        assert qw.mins is None
    else:
        np.testing.assert_array_equal(qw.mins, m)
    g = group or k
    ds = np.repeat(d.astype(F32), g, axis=1)
    expected = ds * (q.astype(F32) - 8) if symmetric else q * ds + np.repeat(m.astype(F32), g, axis=1)
    np.testing.assert_array_equal(qw.dequantize(), expected)


def test_int4_signed_zero_minimum_is_the_same_on_every_isa(isa):
    w = np.zeros((2, 64), F32)
    w[0, ::2] = -0.0
    w[1, 3] = 1.0
    qw = lb.quantize(w, bits=4, group_size=32, symmetric=False)
    assert qw.mins.view(np.uint16)[0, 0] == 0  # +0, whichever zero the search met first


def test_int4_footprint_is_what_q4_1_costs(rng):
    w = rng.normal(size=(64, 1024)).astype(F32)
    asym = lb.quantize(w, bits=4, group_size=32, symmetric=False)
    sym = lb.quantize(w, bits=4, group_size=32)
    assert asym.nbytes == 64 * 1024 * 0.625  # nibbles + float16 scale and minimum per 32 values
    assert sym.nbytes == 64 * 1024 * (0.5 + 2 / 32)


def test_int4_rounding_error_is_at_most_half_a_step(rng):
    w = rng.normal(0, 0.02, (16, 256)).astype(F32)
    qw = lb.quantize(w, bits=4, group_size=32, symmetric=False)
    step = np.repeat(qw.scales.astype(F32), 32, axis=1)
    # float16 rounding of d and m can move the grid by a little more than half a step at the ends
    assert np.all(np.abs(qw.dequantize() - w) <= 0.5 * step + 2e-3 * np.abs(w).max())


SHAPES = [(m, n, k, g) for m in (1, 2, 3, 5, 17) for n in (1, 16, 17, 70) for k, g in
          ((32, None), (40, None), (64, 32), (256, 64), (256, 128), (512, 256))]


@pytest.mark.parametrize("m,n,k,group", SHAPES)
@pytest.mark.parametrize("activations", ["int8", "float"])
def test_int4_linear_is_bit_identical_on_every_isa(isa, rng, m, n, k, group, activations):
    w = rng.normal(0, 0.02, (n, k)).astype(F32)
    x = rng.normal(0, 1, (m, k)).astype(F32)
    bias = rng.normal(size=n).astype(F32)
    for symmetric in (True, False):
        qw = lb.quantize(w, bits=4, group_size=group, symmetric=symmetric)
        y = lb.matmul(x, qw, bias, activations=activations)
        with lb.use_isa("ref"):
            expected = lb.matmul(x, qw, bias, activations=activations)
        np.testing.assert_array_equal(y, expected)


def emulate_w4a8(x, qw):
    """W4A8 from its definition: 32-blocks of x quantized like the int8 path, exact integer dots
    per block, then the scales -- in float64, so equal to the kernels up to float32 rounding."""
    n, k = qw.shape
    g = qw.group_size or k
    xb = x.reshape(len(x), -1, 32)
    s = np.abs(xb).max(axis=2, keepdims=True) / F32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        xq = np.where(s > 0, np.clip(np.rint(xb / s), -127, 127), 0).astype(np.int64)
    q = qw.int_values().astype(np.int64).reshape(n, -1, 32)
    dots = np.einsum("mbk,nbk->mnb", xq, q).astype(np.float64)    # exact integers per block
    i_blk = dots * s[:, None, :, 0]                                 # times each block's scale
    a_blk = (xq.sum(axis=2) * s[:, :, 0])[:, None, :]               # scale * sum(q_x) per block
    d = np.repeat(qw.scales.astype(np.float64), g // 32, axis=1)[None]
    mins = -8 * d if qw.symmetric else np.repeat(qw.mins.astype(np.float64), g // 32, axis=1)[None]
    return (d * i_blk + mins * a_blk).sum(axis=2)


@pytest.mark.parametrize("group,symmetric", [(None, True), (32, False), (64, True), (128, False)])
def test_w4a8_equals_its_integer_definition(rng, group, symmetric):
    w = rng.normal(0, 0.02, (40, 256)).astype(F32)
    x = rng.normal(0, 1, (7, 256)).astype(F32)
    x[3, :32] = 0  # an all-zero block
    qw = lb.quantize(w, bits=4, group_size=group, symmetric=symmetric)
    y = lb.matmul(x, qw, activations="int8")
    expected = emulate_w4a8(x, qw)
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("group,symmetric", [(None, False), (32, True), (256, False)])
def test_w4a32_is_the_dequantized_matmul(rng, group, symmetric):
    w = rng.normal(0, 0.02, (33, 512)).astype(F32)
    x = rng.normal(0, 1, (6, 512)).astype(F32)
    qw = lb.quantize(w, bits=4, group_size=group, symmetric=symmetric)
    y = lb.matmul(x, qw, activations="float")
    exact = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 1e-5  # float32 accumulation only


def test_int4_accuracy_against_float32(rng):
    # DESIGN.md section 7 distribution; asymmetric g32 round-to-nearest with float16 scale and
    # minimum gives about 0.078 (the benchmark measures K = N = 4096).
    w = rng.normal(0, 0.02, (1024, 2048)).astype(F32)
    x = rng.normal(0, 1, (64, 2048)).astype(F32)
    exact = x @ w.T
    qw = lb.quantize(w, bits=4, group_size=32, symmetric=False)
    for activations, bound in (("float", 0.079), ("int8", 0.085)):
        y = lb.matmul(x, qw, activations=activations)
        assert np.linalg.norm(y - exact) / np.linalg.norm(exact) <= bound, activations


def test_int4_results_do_not_depend_on_thread_count(rng, threads):
    w = rng.normal(0, 0.02, (300, 1024)).astype(F32)
    x = rng.normal(0, 1, (40, 1024)).astype(F32)
    qw = lb.quantize(w, bits=4, group_size=64, symmetric=False)
    runs = []
    for n in (1, 2, 3):
        lb.set_num_threads(n)
        runs.append([lb.matmul(x[:r], qw, activations=a) for r in (1, 40) for a in ("int8", "float")])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


def test_int4_activation_rows_policy(rng):
    qw = lb.quantize(rng.normal(size=(20, 64)).astype(F32), bits=4, group_size=32)
    x = rng.normal(size=(3, 64)).astype(F32)
    x[1, 40] = np.nan
    for activations in ("int8", "float"):
        y = lb.matmul(x, qw, activations=activations)
        assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
        assert lb.matmul(np.zeros((0, 64), F32), qw, activations=activations).shape == (0, 20)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(bits=4, group_size=48), ValueError, "multiple of 32"),
    (dict(bits=4, group_size=96), ValueError, "dividing K=128"),
    (dict(bits=2), ValueError, "bits must be 4 or 8"),
])
def test_int4_rejects_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        lb.quantize(np.ones((4, 128), F32), **kwargs)


def test_int4_refuses_what_float16_scales_cannot_hold(isa):
    w = np.ones((3, 64), F32)
    w[2, 5] = 1e7
    with pytest.raises(ValueError, match="row 2.*float16"):
        lb.quantize(w, bits=4, group_size=32)
    w[2, 5] = np.inf
    with pytest.raises(ValueError, match="row 2.*NaN or Inf"):
        lb.quantize(w, bits=4)


def test_float_activations_run_8_bit_weights_too():
    """API.md's activations="float" (weight-only) for every weight kind, 8-bit ones included."""
    w = np.arange(4 * 64, dtype=F32).reshape(4, 64) / 256 - 0.5
    x = np.linspace(-1, 1, 64, dtype=F32)[None]
    qw = lb.quantize(w)
    y = lb.Linear(w, activations="float")(x)
    np.testing.assert_array_equal(y, lb.matmul(x, qw, activations="float"))
    exact = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    assert np.abs(y - exact).max() < 1e-5
