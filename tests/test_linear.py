"""lb.Linear / lb.matmul with int8 weights and dynamic int8 activations."""
import os
import pickle

import numpy as np
import pytest

import lowbit as lb
from lowbit import nn

SHAPES = [(1, 1, 1), (1, 17, 5), (2, 16, 64), (3, 33, 67), (5, 70, 128), (17, 100, 260),
          (64, 129, 1024), (1, 300, 4096), (4, 50, 96)]


def emulate(x, qw, bias):
    """The kernels' arithmetic in numpy (per channel): quantize rows, exact int dot, then
    y = fma(acc * ws, sa, bias) -- the fma taken in float64, so within 1 ulp of the kernels."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    sa = amax / np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        xq = np.where(sa > 0, np.clip(np.rint(x / sa), -127, 127), 0).astype(np.int64)
    acc = xq @ qw.int_values().astype(np.int64).T
    f = acc.astype(np.float32) * qw.scales[:, 0]
    y = f.astype(np.float64) * sa.astype(np.float64)
    if bias is not None:
        y += bias
    return y.astype(np.float32)


@pytest.mark.parametrize("m,n,k,group", [s + (g,) for s in SHAPES for g in (None, 32) if not g or s[2] % g == 0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_bit_identical_on_every_isa(isa, rng, m, n, k, group, with_bias):
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32) if with_bias else None
    y = lb.Linear(w, bias, group_size=group)(x)
    with lb.use_isa("ref"):
        expected = lb.Linear(w, bias, group_size=group)(x)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("m,n,k,group", [s + (g,) for s in SHAPES + [(1, 300, 1024), (9, 40, 4096)]
                                          for g in (None, 32) if not g or s[2] % g == 0])
def test_weight_only_int8_is_bit_identical_on_every_isa_and_thread_count(isa, rng, threads, m, n,
                                                                         k, group):
    """activations="float" with 8-bit weights (gemm_w8f32.cpp): per group an fma chain in k order,
    then the scales; equal to the float64 product of the dequantized weight up to float32 sums."""
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    qw = lb.quantize(w, group_size=group)
    layer = lb.Linear(qw, bias, activations="float")
    y = layer(x)
    with lb.use_isa("ref"):
        np.testing.assert_array_equal(y, layer(x))
    lb.set_num_threads(1)
    np.testing.assert_array_equal(y, layer(x))
    exact = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T + bias
    assert np.abs(y - exact).max() <= 1e-5 * max(1.0, np.abs(exact).max()) * max(1, k / 64)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_linear_reference_matches_numpy_emulation(rng, m, n, k):
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    layer = lb.Linear(w, bias)
    with lb.use_isa("ref"):
        y = layer(x)
    np.testing.assert_array_max_ulp(y, emulate(x, layer.weight, bias), maxulp=1)


def test_linear_accuracy_against_float32(rng):
    # DESIGN.md section 7 distribution; per-row int8 activations x per-channel int8 weights give
    # about 0.0122 relative Frobenius error at K = N = 4096 (the benchmark measures that shape).
    w = rng.normal(0, 0.02, (1024, 2048)).astype(np.float32)
    x = rng.normal(0, 1, (64, 2048)).astype(np.float32)
    y = lb.Linear(w)(x)
    exact = x @ w.T
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) <= 0.0125


def test_results_do_not_depend_on_thread_count(rng, threads):
    w = rng.normal(0, 0.02, (300, 1024)).astype(np.float32)
    x = rng.normal(0, 1, (70, 1024)).astype(np.float32)
    layer = lb.Linear(w, rng.normal(size=300).astype(np.float32), group_size=64)
    outs = []
    for n in (1, 2, 3, 5):
        lb.set_num_threads(n)
        outs.append(layer(x))
        outs.append(layer(x[:1]))
    for a, b in zip(outs[0::2], outs[2::2]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(outs[1::2], outs[3::2]):
        np.testing.assert_array_equal(a, b)


def test_leading_dims_float16_and_non_contiguous_input(rng):
    w = rng.normal(0, 0.02, (48, 64)).astype(np.float32)
    layer = lb.Linear(w)
    x = rng.normal(size=(2, 3, 64)).astype(np.float32)
    y = layer(x)
    assert y.shape == (2, 3, 48) and y.dtype == np.float32
    np.testing.assert_array_equal(y.reshape(6, 48), layer(x.reshape(6, 64)))
    np.testing.assert_array_equal(layer(x.astype(np.float16)), layer(x.astype(np.float16).astype(np.float32)))
    xt = np.ascontiguousarray(x.reshape(6, 64).T).T  # column-major view
    np.testing.assert_array_equal(layer(xt), layer(x.reshape(6, 64)))
    wide = np.zeros((6, 200), np.float32)
    wide[:, 100:164] = x.reshape(6, 64)
    np.testing.assert_array_equal(layer(wide[:, 100:164]), layer(x.reshape(6, 64)))
    np.testing.assert_array_equal(layer(x.reshape(6, 64)[::-1]), layer(x.reshape(6, 64))[::-1])
    np.testing.assert_array_equal(layer(x[0, 0]), layer(x[0, :1])[0])  # a single 1-D row


def test_zero_rows_give_zero_rows(rng):
    layer = lb.Linear(rng.normal(size=(8, 32)).astype(np.float32))
    assert layer(np.zeros((0, 32), np.float32)).shape == (0, 8)
    assert layer(np.zeros((4, 0, 32), np.float32)).shape == (4, 0, 8)


def test_activation_rows_policy(isa, rng):
    # all-zero row -> bias; a NaN or Inf in a row -> that output row is NaN, others untouched
    w = rng.normal(size=(20, 64)).astype(np.float32)
    bias = np.arange(20, dtype=np.float32)
    layer = lb.Linear(w, bias)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    x[1] = 0
    x[2, 5] = np.nan
    x[3, 9] = np.inf
    y = layer(x)
    np.testing.assert_array_equal(y[1], bias)
    assert np.isnan(y[2]).all() and np.isnan(y[3]).all()
    np.testing.assert_array_equal(y[0], layer(x[:1])[0])


def test_matmul_is_the_functional_linear(rng):
    w = rng.normal(size=(24, 96)).astype(np.float32)
    b = rng.normal(size=24).astype(np.float32)
    x = rng.normal(size=(5, 96)).astype(np.float32)
    qw = lb.quantize(w, group_size=32)
    np.testing.assert_array_equal(lb.matmul(x, qw, b), lb.Linear(qw, b)(x))


def test_linear_properties(rng):
    layer = lb.Linear(rng.normal(size=(24, 96)).astype(np.float32))
    assert (layer.in_features, layer.out_features) == (96, 24)
    assert isinstance(layer.weight, lb.QuantizedWeight)
    assert "Linear(in_features=96, out_features=24" in repr(layer)


@pytest.mark.parametrize("call,err,match", [
    (lambda l: l(np.zeros((2, 33), np.float32)), ValueError, r"\(\.\.\., 32\)"),
    (lambda l: l(np.zeros((2, 32), np.int32)), TypeError, "float32"),
    (lambda l: l(np.float32(1.0)), ValueError, r"\(\.\.\., 32\)"),
])
def test_linear_call_rejects_bad_input(call, err, match):
    layer = lb.Linear(np.ones((8, 32), np.float32))
    with pytest.raises(err, match=match):
        call(layer)


def test_linear_construction_errors():
    w = np.ones((8, 32), np.float32)
    with pytest.raises(ValueError, match="activations"):
        lb.Linear(w, activations="int4")
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
        lb.Linear(w, np.zeros(7, np.float32))
    with pytest.raises(TypeError, match="bias"):
        lb.Linear(w, np.zeros(8, np.int32))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        lb.matmul(np.ones((1, 32), np.float32), w)


# ---------------------------------------------------------------------------------------------
# out=: the result written into a caller's buffer

OUT_CONFIGS = [(8, None, "int8"), (8, 32, "int8"), (8, 32, "float"), (4, 32, "int8"),
               (4, 32, "float")]


def out_layer(rng, bits, group, activations, n=48, k=64, with_bias=True):
    w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32) if with_bias else None
    qw = lb.quantize(w, bits=bits, group_size=group)
    return qw, bias, lb.Linear(qw, bias, activations=activations)


@pytest.mark.parametrize("x_shape", [(5, 64), (2, 3, 64), (64,), (70, 64)])
@pytest.mark.parametrize("bits,group,activations", OUT_CONFIGS)
def test_linear_and_matmul_out_are_bit_identical(isa, rng, bits, group, activations, x_shape):
    qw, bias, layer = out_layer(rng, bits, group, activations)
    x = rng.normal(size=x_shape).astype(np.float32)
    x0 = x.copy()
    expected = layer(x)
    assert expected.shape == x_shape[:-1] + (48,)
    out = np.full(expected.shape, np.nan, np.float32)
    assert layer(x, out=out) is out
    np.testing.assert_array_equal(out, expected)
    out[...] = np.nan
    assert lb.matmul(x, qw, bias, activations=activations, out=out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(lb.matmul(x, qw, activations=activations, out=out),
                                  lb.matmul(x, qw, activations=activations))  # no bias
    np.testing.assert_array_equal(x, x0)
    x2 = rng.normal(size=x_shape).astype(np.float32)  # a buffer reused from call to call
    assert layer(x2, out=out) is out
    np.testing.assert_array_equal(out, layer(x2))
    with lb.use_isa("ref"):
        np.testing.assert_array_equal(layer(x2), out)


@pytest.mark.parametrize("bits,group,activations", OUT_CONFIGS)
def test_linear_out_with_converted_and_strided_inputs(rng, bits, group, activations):
    qw, bias, layer = out_layer(rng, bits, group, activations)
    x = rng.normal(size=(6, 64)).astype(np.float32)
    for xi in (x.astype(np.float16), np.ascontiguousarray(x.T).T, x[::-1], np.repeat(x, 2, 1)[:, ::2]):
        out = np.empty((6, 48), np.float32)
        assert layer(xi, out=out) is out
        np.testing.assert_array_equal(out, layer(xi))
    out = np.empty((0, 48), np.float32)
    assert layer(np.zeros((0, 64), np.float32), out=out) is out


@pytest.mark.parametrize("bits,group,activations", OUT_CONFIGS)
def test_linear_out_rejects_bad_buffers(rng, bits, group, activations):
    qw, bias, layer = out_layer(rng, bits, group, activations, n=64, k=64)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    calls = (lambda out: layer(x, out=out),
             lambda out: lb.matmul(x, qw, bias, activations=activations, out=out))
    for call in calls:
        with pytest.raises(ValueError, match=r"out: expected shape \(5, 64\)"):
            call(np.empty((5, 63), np.float32))
        with pytest.raises(ValueError, match=r"out: expected shape \(5, 64\)"):
            call(np.empty((1, 5, 64), np.float32))
        with pytest.raises(ValueError, match=r"out: expected shape \(5, 64\)"):
            call(np.empty((5 * 64,), np.float32))
        with pytest.raises((ValueError, TypeError), match="float32"):
            call(np.empty((5, 64), np.float64))
        with pytest.raises(ValueError, match="C-contiguous"):
            call(np.empty((5, 128), np.float32)[:, ::2])
        with pytest.raises(ValueError, match="C-contiguous"):
            call(np.empty((64, 5), np.float32).T)
        ro = np.empty((5, 64), np.float32)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="writeable"):
            call(ro)
        with pytest.raises(TypeError, match="numpy array"):
            call([[0.0] * 64] * 5)
        x0 = x.copy()
        with pytest.raises(ValueError, match="overlap"):
            call(x)  # out is x itself (N == K)
        np.testing.assert_array_equal(x, x0)
    flat = rng.normal(size=5 * 64 + 5 * 64).astype(np.float32)
    xv = flat[: 5 * 64].reshape(5, 64)
    ov = flat[5 * 64 - 10: 10 * 64 - 10].reshape(5, 64)  # contiguous, sharing 10 floats with xv
    before = flat.copy()
    with pytest.raises(ValueError, match="overlap"):
        layer(xv, out=ov)
    with pytest.raises(ValueError, match="overlap"):
        lb.matmul(xv, qw, bias, activations=activations, out=ov)
    np.testing.assert_array_equal(flat, before)
    x3 = rng.normal(size=(2, 3, 64)).astype(np.float32)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3, 64\)"):
        layer(x3, out=np.empty((6, 64), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        layer(x3, out=x3)


@pytest.mark.parametrize("bits,group,activations", [(8, None, "int8"), (4, 32, "float")])
def test_matmul_out_overlapping_bias_is_rejected_or_correct(rng, bits, group, activations):
    qw, _, _ = out_layer(rng, bits, group, activations)
    x = rng.normal(size=(200, 64)).astype(np.float32)
    buf = rng.normal(size=(200, 48)).astype(np.float32)
    bias = buf[0]
    expected = lb.matmul(x, qw, bias.copy(), activations=activations)
    try:
        got = lb.matmul(x, qw, bias, activations=activations, out=buf)
    except ValueError:
        return
    np.testing.assert_array_equal(got, expected)


# --- epilogue="gelu" and input_scale in the kernels ---------------------------------------------

EPILOGUE_CONFIGS = [(8, None, "int8"), (8, 32, "int8"), (8, None, 0.02), (8, None, "float"),
                    (8, 32, "float"), (4, 32, "int8"), (4, None, "int8"), (4, 32, "float"),
                    (4, 32, 0.02)]


@pytest.mark.parametrize("m", [1, 3, 33, 300])
@pytest.mark.parametrize("bits,group,activations", EPILOGUE_CONFIGS)
def test_gelu_epilogue_is_gelu_of_the_output_bit_for_bit(isa, rng, bits, group, activations, m):
    w = rng.normal(0, 0.05, (200, 96)).astype(np.float32)
    bias = rng.normal(size=200).astype(np.float32)
    qw = lb.quantize(w, bits=bits, group_size=group)
    x = rng.normal(size=(m, 96)).astype(np.float32)
    expected = nn.gelu(lb.Linear(qw, bias, activations=activations)(x))
    fused = lb.Linear(qw, bias, activations=activations, epilogue="gelu")
    assert np.array_equal(fused(x), expected)
    assert np.array_equal(lb.matmul(x, qw, bias, activations, epilogue="gelu"), expected)
    out = np.full((m, 200), np.nan, np.float32)
    assert fused(x, out=out) is out and np.array_equal(out, expected)


def test_gelu_epilogue_does_not_depend_on_threads(rng, threads):
    qw = lb.quantize(rng.normal(0, 0.05, (1000, 256)).astype(np.float32), bits=8)
    x = rng.normal(size=(700, 256)).astype(np.float32)
    layer = lb.Linear(qw, epilogue="gelu")
    results = []
    for n in (1, 2, 3):
        lb.set_num_threads(n)
        results.append(layer(x))
    assert all(np.array_equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("epilogue", ["relu", "GELU", 1])
def test_bad_epilogue_raises(rng, epilogue):
    qw = lb.quantize(rng.normal(size=(16, 32)).astype(np.float32), bits=8)
    with pytest.raises(ValueError, match="epilogue"):
        lb.Linear(qw, epilogue=epilogue)
    with pytest.raises(ValueError, match="epilogue"):
        lb.matmul(np.zeros((1, 32), np.float32), qw, epilogue=epilogue)


@pytest.mark.parametrize("bits,group,activations", EPILOGUE_CONFIGS)
def test_input_scale_is_applied_in_the_kernel_like_a_scaled_input(isa, rng, bits, group, activations):
    """lb.quantize(w, input_scale=c) runs as quantize(w / c) on inputs x * c, bit for bit."""
    w = rng.normal(0, 0.05, (40, 128)).astype(np.float32)
    c = rng.uniform(0.25, 4, 128).astype(np.float32)
    x = rng.normal(size=(37, 128)).astype(np.float32)
    x[:, 5] *= 30  # an outlier channel, which the smoothing tames
    qw = lb.quantize(w, bits=bits, group_size=group, input_scale=c)
    plain = lb.quantize(w / c, bits=bits, group_size=group)
    assert np.array_equal(qw.input_scale, c)
    expected = lb.matmul(x * c, plain, activations=activations)
    assert np.array_equal(lb.matmul(x, qw, activations=activations), expected)
    assert np.array_equal(lb.Linear(qw, activations=activations)(x), expected)


def test_input_scale_dequantizes_to_the_weight_and_survives_save(tmp_path, rng):
    w = rng.normal(0, 0.05, (24, 64)).astype(np.float32)
    c = rng.uniform(0.5, 2, 64).astype(np.float32)
    qw = lb.quantize(w, bits=8, input_scale=c)
    assert np.abs(qw.dequantize() - w).max() < 2 * np.abs(w / c).max() * c.max() / 127
    lb.save(tmp_path / "w.lowbit", {"w": qw})
    back = lb.load(tmp_path / "w.lowbit")["w"]
    x = rng.normal(size=(3, 64)).astype(np.float32)
    assert np.array_equal(lb.matmul(x, back), lb.matmul(x, qw))


def test_input_scale_with_calibrated_methods_sees_the_scaled_inputs(rng):
    w = rng.normal(0, 0.05, (32, 64)).astype(np.float32)
    c = rng.uniform(0.5, 2, 64).astype(np.float32)
    x = rng.normal(size=(256, 64)).astype(np.float32)
    for method in ("mse", "gptq"):
        qw = lb.quantize(w, bits=4, group_size=32, method=method, calibration=x, input_scale=c)
        plain = lb.quantize(w / c, bits=4, group_size=32, method=method, calibration=x * c)
        assert np.array_equal(lb.matmul(x, qw), lb.matmul(x * c, plain))


@pytest.mark.parametrize("c", [np.zeros(64), -np.ones(64), np.full(64, np.inf), np.ones(63),
                               np.ones(64, np.int32), np.full(64, 1e39), np.full(64, 1e-50)])
def test_bad_input_scale_raises(rng, c):
    """Checked as the kernels see it, in float32: 1e39 (float64) is inf there, 1e-50 is 0."""
    w = rng.normal(size=(8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="input_scale"):
        lb.quantize(w, input_scale=c)
    with pytest.raises(ValueError, match="input_scale"):
        lb.QuantizedWeight.from_int(np.ones((8, 64), np.int8), np.ones((8, 1), np.float32), bits=8,
                                    input_scale=c)


def test_layers_and_weights_hold_copies_and_expose_read_only_arrays(rng):
    """A layer's bias and a weight's input_scale were the caller's arrays: changing them later
    changed the layer. Now both are copies, and every array a layer or weight exposes is
    read-only (writing qw.scales changed the weight under every layer using it)."""
    w = rng.normal(0, 0.02, (32, 64)).astype(np.float32)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    bias = rng.normal(size=32).astype(np.float32)
    c = rng.uniform(0.5, 2, 64).astype(np.float32)
    qw = lb.quantize(w, bits=4, group_size=32, symmetric=False, input_scale=c)
    layer = lb.Linear(qw, bias)
    expected = layer(x)
    bias[:] = 0
    c[:] = 1
    np.testing.assert_array_equal(layer(x), expected)
    assert not np.array_equal(layer.bias, bias) and not np.array_equal(qw.input_scale, c)
    perm = rng.permutation(64)
    q8 = lb.QuantizedWeight.from_int(rng.integers(-127, 128, (32, 64)), np.ones((32, 1), np.float32),
                                     bits=8, perm=perm)
    perm[:] = np.arange(64)
    assert not np.array_equal(q8.perm, perm)
    exposed = [layer.bias, qw.scales, qw.mins, qw.input_scale, q8.scales, q8.perm, q8._packed,
               q8._comp, lb.Linear(w, bias).bias]
    for a in exposed:
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0
    zero_point = lb.Linear(w, bias, activations=lb.StaticActivations(0.1, 3))
    with pytest.raises(ValueError, match="read-only"):
        zero_point._bias[...] = 0


def test_input_scale_is_refused_with_awq(rng):
    with pytest.raises(ValueError, match="awq"):
        lb.quantize(rng.normal(size=(8, 64)).astype(np.float32), bits=4, group_size=32,
                    method="awq", calibration=rng.normal(size=(64, 64)).astype(np.float32),
                    input_scale=np.ones(64, np.float32))


def misaligned(a):
    """A copy of `a` whose data starts at an odd byte address (as np.frombuffer at an odd offset,
    or a GGUF file aligned to 1, hands out): a valid array no kernel may read through a T*."""
    a = np.asarray(a)
    buf = np.empty(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, a.dtype, a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 2 == 1 and out.flags.writeable
    return out


def misaligned_parts(qw):
    """qw with every stored part (scales, comp, mins, zeros, input_scale) at an odd address."""
    parts = {p: getattr(qw, "_" + p) for p in ("scales", "comp", "mins", "zeros", "in_scale")}
    parts = {p: None if a is None else misaligned(a) for p, a in parts.items()}
    return lb.QuantizedWeight(qw.shape, qw.bits, qw.group_size, qw.symmetric, qw._packed,
                              parts["scales"], comp=parts["comp"], mins=parts["mins"],
                              zeros=parts["zeros"], in_scale=parts["in_scale"])


@pytest.mark.parametrize("bits,group,activations,symmetric", [
    (8, None, "int8", True), (8, 64, "int8", True), (8, 32, "float", True), (4, 32, "int8", False),
    (4, 64, "float", True), (4, None, "float", False)])
def test_misaligned_arrays_give_the_aligned_results(isa, rng, bits, group, activations, symmetric):
    """Arrays at odd byte addresses (inputs, bias, out, stored parts, weights to quantize) are
    copied at the binding into aligned memory: the same results, no misaligned float* in a kernel
    (UndefinedBehaviorSanitizer reported them in quant/, nn.cpp and ops.cpp: tests/sanitize.sh)."""
    n, k = 40, 128
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    x = rng.normal(size=(5, k)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    c = rng.uniform(0.5, 2, k).astype(np.float32)
    qw = lb.quantize(w, bits=bits, group_size=group, symmetric=symmetric, input_scale=c)
    expected = lb.matmul(x, qw, bias, activations=activations)
    q_mis = lb.quantize(misaligned(w), bits=bits, group_size=group, symmetric=symmetric,
                        input_scale=misaligned(c))
    np.testing.assert_array_equal(q_mis.dequantize(), qw.dequantize())
    got = lb.matmul(misaligned(x), misaligned_parts(qw), misaligned(bias), activations=activations)
    np.testing.assert_array_equal(got, expected)
    out = misaligned(np.zeros((5, n), np.float32))
    assert lb.matmul(x, qw, bias, activations=activations, out=out) is out
    np.testing.assert_array_equal(out, expected)
    layer = lb.Linear(qw, misaligned(bias), activations=activations, epilogue="gelu")
    np.testing.assert_array_equal(layer(misaligned(x)), nn.gelu(expected))
    q = qw.int_values()
    s = qw.scales
    rebuilt = lb.QuantizedWeight.from_int(misaligned(q), misaligned(s), bits=bits, group_size=group,
                                          mins=None if qw.mins is None else misaligned(qw.mins))
    np.testing.assert_array_equal(rebuilt.int_values(), q)
    np.testing.assert_array_equal(rebuilt.scales, s)


def test_misaligned_and_strided_integer_arrays(rng):
    a = rng.integers(-128, 128, (7, 33), dtype=np.int8)
    b = rng.integers(-128, 128, (5, 33), dtype=np.int8)
    expected = a.astype(np.int32) @ b.astype(np.int32).T
    np.testing.assert_array_equal(lb.gemm_s8(a, b[:, :]), expected)
    np.testing.assert_array_equal(lb._core.gemm_s8(np.asfortranarray(a), b), expected)
    q = rng.integers(0, 16, (4, 6), dtype=np.uint8)
    np.testing.assert_array_equal(lb._core.unpack_int4(lb._core.pack_int4(np.asfortranarray(q))), q)


def test_decode_prefetch_never_changes_results_and_survives_freed_weights(tmp_path):
    """A call sequence learns each layer's successor and has idle workers prefetch its weights
    (csrc/threadpool.cpp prefetch_async): results equal those without it (LOWBIT_PREFETCH=0, in a
    child), including after a learned successor was freed and with the thread count changing."""
    import os
    import subprocess
    import sys

    pytest.importorskip("gguf")  # (the child imports test_block_formats, which needs it)
    code = """if True:
        import numpy as np, lowbit as lb
        rng = np.random.default_rng(5)
        from test_block_formats import weight
        ws = [rng.normal(size=(n, 256)).astype(np.float32) for n in (300, 256, 512)]
        layers = [lb.Linear(ws[0]), lb.Linear(ws[1], bits=4, group_size=32, symmetric=False),
                  lb.Linear(weight("Q4_K", 512, 1, rng)), lb.Linear(ws[2], bits=4, group_size=64)]
        x = rng.normal(size=(2, 256)).astype(np.float32)
        out = []
        for step in range(6):
            lb.set_num_threads(1 + step % 3)
            for layer in layers:
                y = layer(x)
                out.append(y)
                x = y[:, :256] * np.float32(0.01)
            if step == 3:
                del layers[1]  # its predecessor still points at its (now freed) arrays
        np.save(__import__("sys").argv[1], np.concatenate([o.ravel() for o in out]))
    """
    here = os.path.dirname(os.path.abspath(__file__))
    got = {}
    for prefetch in ("1", "0"):
        path = str(tmp_path / f"out{prefetch}.npy")
        path_ = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, LOWBIT_PREFETCH=prefetch, PYTHONPATH=path_)
        r = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        got[prefetch] = np.load(path)
    np.testing.assert_array_equal(got["1"], got["0"])


def test_large_results_reuse_freed_blocks_safely(rng):
    """Results of 256 KB and more come from a cache of freed blocks: each is its own writeable
    array, and a reused block holds the new result, not the old."""
    w = rng.normal(0, 0.02, (1024, 256)).astype(np.float32)
    layer = lb.Linear(w)
    x1, x2 = (rng.normal(size=(128, 256)).astype(np.float32) for _ in range(2))
    want1, want2 = layer(x1).copy(), layer(x2).copy()
    a, b = layer(x1), layer(x1)
    assert not np.shares_memory(a, b) and a.flags.writeable and a.flags.c_contiguous
    del a
    c = layer(x2)  # (likely a's block)
    np.testing.assert_array_equal(c, want2)
    np.testing.assert_array_equal(b, want1)
    c[:] = 0  # writeable, and no other result changes
    np.testing.assert_array_equal(b, want1)
    assert c.__array_interface__["data"][0] % 4096 == 0  # page-aligned blocks


def test_block_cache_can_be_turned_off():
    import subprocess
    import sys
    code = ("import numpy as np, lowbit as lb; l = lb.Linear(np.eye(1024, 256, dtype=np.float32)); "
            "x = np.ones((128, 256), np.float32); y = l(x); del y; z = l(x); print(float(z.sum()))")
    for mb in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LOWBIT_CACHE_MB": mb},
                             capture_output=True, text=True, check=True).stdout
        assert abs(float(out) - 128 * 256) < 1


def test_a_refused_setting_leaves_the_layer_as_it_was(rng):
    w = rng.normal(size=(20, 64)).astype(np.float32)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    layer = lb.Linear(lb.quantize(w), activations=lb.StaticActivations(0.05, 3))
    before = layer(x)
    with pytest.raises(ValueError, match="zero point"):
        layer.weight = lb.quantize(w, bits=4, group_size=32)  # a zero point needs 8-bit weights
    assert layer.weight.bits == 8
    np.testing.assert_array_equal(layer(x), before)
    layer = lb.Linear(lb.quantize(w), bias=np.ones(20, np.float32))
    before = layer(x)
    with pytest.raises(ValueError, match="bias"):
        layer.weight = lb.quantize(rng.normal(size=(30, 64)).astype(np.float32))
    assert layer.out_features == 20
    np.testing.assert_array_equal(layer(x), before)
    assert pickle.loads(pickle.dumps(layer)).out_features == 20


def test_settings_given_beside_a_quantized_weight_must_agree(rng):
    w = rng.normal(size=(16, 64)).astype(np.float32)
    q4 = lb.quantize(w, bits=4, group_size=32)
    assert lb.Linear(q4, bits=4, group_size=32).weight is q4  # agreeing, or left out: fine
    whole = lb.quantize(w, group_size=64)  # one group of K: per channel, group_size None
    assert lb.Linear(whole, group_size=64).weight.group_size is None
    from test_block_formats import weight as block_weight
    q8_0 = block_weight("Q8_0", 16, 1, rng)  # K = 32 = its group: reads back 32
    assert lb.Linear(q8_0, group_size=32).weight is q8_0
    with pytest.raises(ValueError, match="bits=4 given with a QuantizedWeight of bits=8"):
        lb.Linear(lb.quantize(w), bits=4)
    for wrong in (dict(group_size=64), dict(symmetric=False)):
        with pytest.raises(ValueError, match="keeps its own"):
            lb.Linear(q4, **wrong)
