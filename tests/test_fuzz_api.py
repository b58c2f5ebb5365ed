"""Property-based tests (hypothesis): random shapes against the definitions, and random malformed
arguments to the public API, which may only raise TypeError / ValueError (never crash or hang).
LOWBIT_FUZZ_EXAMPLES scales the number of examples (CI uses the default)."""
import os

import numpy as np
import pytest

import lowbit as lb

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "200"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True)


@fuzz
@given(m=st.integers(0, 9), n=st.integers(1, 40), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_gemm_s8_is_exact(m, n, k, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (n, k), dtype=np.int8)
    np.testing.assert_array_equal(lb.gemm_s8(a, b), a.astype(np.int64) @ b.astype(np.int64).T)


@fuzz
@given(m=st.integers(0, 7), n=st.integers(1, 40), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64]), bits=st.sampled_from([4, 8]), sym=st.booleans(),
       per_row=st.booleans(), act=st.sampled_from(["int8", "float"]), seed=st.integers(0, 2**32 - 1))
def test_linear_matches_the_dequantized_matmul(m, n, groups, group, bits, sym, per_row, act, seed):
    if bits == 8 and (not sym or act == "float"):
        return  # 8-bit weights are symmetric and run with int8 activations
    rng = np.random.default_rng(seed)
    k = groups * group
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    x = rng.normal(size=(m, k)).astype(np.float32)
    qw = lb.quantize(w, bits=bits, group_size=None if per_row else group, symmetric=sym)
    y = lb.matmul(x, qw, activations=act)
    assert y.shape == (m, n)
    if m:
        wd = qw.dequantize().astype(np.float64)
        exact = x.astype(np.float64) @ wd.T
        # float: rounding only; int8: each input moves by at most half a step, amax / 254
        step = 1e-6 if act == "float" else np.abs(x).max(1, keepdims=True) / 254
        bound = step * (np.abs(wd).sum(1)[None, :] * 1.01) + 1e-5 * np.abs(x) @ np.abs(wd).T
        assert (np.abs(y - exact) <= bound + 1e-7).all()
        with lb.use_isa("ref"):
            np.testing.assert_array_equal(y, lb.matmul(x, qw, activations=act))


arrays = st.one_of(
    st.none(), st.integers(-3, 3), st.text(max_size=3), st.just([[1.0, 2.0]]),
    st.tuples(st.sampled_from(["float32", "float16", "float64", "int8", "uint8", "int32", "bool",
                               "complex64", "object"]),
              st.lists(st.integers(0, 70), min_size=0, max_size=3))
    .map(lambda t: np.zeros(t[1], dtype=t[0]) if t[0] != "object" else np.array([None] * 2)))


@fuzz
@given(w=arrays, x=arrays, bits=st.one_of(st.sampled_from([4, 8]), st.integers(-2, 9), st.none()),
       group=st.one_of(st.none(), st.integers(-64, 256), st.just(32.0)), sym=st.booleans(),
       act=st.sampled_from(["int8", "float", "bad", None]))
def test_malformed_arguments_raise_clear_errors(w, x, bits, group, sym, act):
    calls = [lambda: lb.quantize(w, bits=bits, group_size=group, symmetric=sym),
             lambda: lb.Linear(w, bits=bits, group_size=group, symmetric=sym, activations=act)(x),
             lambda: lb.gemm_s8(w, x), lambda: lb.pack_int4(w), lambda: lb.unpack_int4(w),
             lambda: lb.QuantizedWeight.from_int(w, x, bits=bits, group_size=group),
             lambda: lb.QuantizedWeight.from_int(w, x, bits=bits, input_scale=x),
             lambda: lb.quantize(w, bits=bits, input_scale=x),
             lambda: lb.nn.gelu(w, out=x),
             lambda: lb.nn.rms_norm(x, w),
             lambda: lb.nn.layer_norm(x, w, w, residual=x, out=x)]
    for call in calls:
        try:
            call()
        except (TypeError, ValueError):
            pass


@fuzz
@given(w=arrays, x=arrays, bits=st.one_of(st.sampled_from([4, 8]), st.integers(-2, 9), st.none()),
       group=st.one_of(st.none(), st.integers(-64, 256), st.just(32.0)), sym=st.booleans(),
       method=st.sampled_from(["rtn", "mse", "gptq", "awq", "bad", None]),
       scale=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3),
                       st.none(), st.just("x")),
       zero=st.one_of(st.integers(-300, 300), st.floats(-2, 2), st.none()))
def test_malformed_arguments_to_the_methods_raise_clear_errors(w, x, bits, group, sym, method,
                                                               scale, zero):
    """The calibration, method, QAT and metrics entry points, given garbage, raise TypeError or
    ValueError (FormatError is a ValueError) and nothing else."""
    calls = [
        lambda: lb.quantize(w, bits=bits, group_size=group, symmetric=sym, method=method,
                            calibration=x),
        lambda: lb.StaticActivations(scale, zero),
        lambda: lb.Linear(np.ones((4, 32), np.float32), activations=lb.StaticActivations(scale, zero))(x),
        lambda: lb.PercentileObserver(symmetric=sym).observe(x).params(),
        lambda: lb.EntropyObserver(symmetric=sym).observe(w).range(),
        lambda: lb.MSEObserver(symmetric=sym).observe(x).observe(w).params(),
        lambda: lb.fake_quantize(w, bits=bits, group_size=group, symmetric=sym),
        lambda: lb.fake_quantize_grad(w, x, bits=bits, group_size=group, symmetric=sym),
        lambda: lb.metrics.compare(w, x),
        lambda: lb.metrics.report(w, x, targets=x),
        lambda: lb.layer_sensitivity({"a": w}, {"a": x}),
    ]
    for call in calls:
        try:
            call()
        except (TypeError, ValueError):
            pass
