"""Weight methods beyond rounding (lb.quantize method="mse" / "gptq" / "awq"), lowbit.methods'
numpy Grid against the C++ rounding, act-order and input_scale through the layers and files."""
import json
import struct

import numpy as np
import pytest

import lowbit as lb
from lowbit import methods
from test_io import rewrite_header

F32 = np.float32

# (bits, symmetric, group_size): every grid lb.quantize has
GRIDS = [(8, True, None), (8, True, 64), (4, True, 32), (4, True, None), (4, False, 32),
         (4, False, None)]


def rtn(w, grid, group):
    """Round-to-nearest values and parameters from methods.Grid, clip 1: (q, d, m)."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    d, m = grid.params(wg)
    return grid.round(wg, d[..., None], None if m is None else m[..., None]).reshape(n, k), d, m


def group_errors(w, wq, group, h=None):
    """Per (row, group) squared error of the weights, or with h the output objective
    delta_g H_gg delta_g^T, in float64: (N, groups)."""
    n, k = w.shape
    delta = (wq.astype(np.float64) - w).reshape(n, k // group, group)
    if h is None:
        return np.einsum("ngi,ngi->ng", delta, delta)
    idx = np.arange(k).reshape(-1, group)
    hg = h[idx[:, :, None], idx[:, None, :]]  # (G, group, group)
    return np.einsum("ngi,gij,ngj->ng", delta, hg, delta)


def out_err(x, w, qw):
    """||X W^T - X Wq^T||^2 on the calibration rows, in float64."""
    return float(((x.astype(np.float64) @ (w.astype(np.float64) - qw.dequantize()).T) ** 2).sum())


def hess(x):
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    return x.T @ x / len(x)


def correlated(rng, s, k, rank=8, noise=0.1):
    """X = Z @ A (A low-rank) plus a little noise: strongly correlated inputs."""
    a = rng.normal(size=(rank, k))
    return (rng.normal(size=(s, rank)) @ a + noise * rng.normal(size=(s, k))).astype(F32)


def assert_close_to_dequantized(y, x, qw):
    """Weight-only float layers: y == x @ W^T up to float32 accumulation."""
    w = qw.dequantize().astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    slop = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T) + 1e-30
    assert np.all(np.abs(y - exact) <= slop)


def assert_int8_within_rounding(y, x, qw):
    """Dynamic int8 activations (4-bit weights: one scale per block of 32 of the packed inputs):
    |y - x W^T| <= sum over blocks of amax_b / 254 * sum_b |W|, plus float slop."""
    n, k = qw.shape
    x2 = x.astype(np.float64)
    if qw.input_scale is not None:
        x2 = x2 * qw.input_scale
    if qw.perm is not None:
        x2 = x2[:, qw.perm]
    stored = qw.dequantize().astype(np.float64)  # original order, input_scale included
    if qw.input_scale is not None:
        stored = stored / qw.input_scale
    if qw.perm is not None:
        stored = stored[:, qw.perm]
    kp = -(-k // 32) * 32
    xb = np.zeros((len(x), kp))
    xb[:, :k] = x2
    wb = np.zeros((n, kp))
    wb[:, :k] = np.abs(stored)
    amax = np.abs(xb).reshape(len(x), -1, 32).max(axis=2)  # (M, blocks)
    bound = (amax / 254) @ wb.reshape(n, -1, 32).sum(axis=2).T
    exact = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    slop = 1e-5 * (np.abs(x2) @ np.abs(stored).T)
    assert np.all(np.abs(y - exact) <= bound * 1.001 + slop)


# ---------------------------------------------------------------- Grid == the C++ rounding

def awkward_weights(rng, n, k, group):
    """Gaussian rows plus zero rows, zero / constant / negative-only groups, -0.0, tiny values
    (float16 scales underflow) and a row spanning nine decades."""
    w = rng.normal(0, 0.05, (n, k)).astype(F32)
    g = group or k
    w[1] = 0
    w[2] = -0.0
    w[3, :g] = 0  # a zero group (the whole row per channel)
    w[4, -g:] = 0.37  # a constant group
    w[5, :g] = -np.abs(w[5, :g])  # negative only
    w[6] = -np.abs(w[6]) - 0.01
    w[7] *= rng.permutation(np.logspace(-6, 3, k)).astype(F32)  # huge dynamic range
    w[8] = rng.normal(0, 1e-7, k)  # below float16's resolution for 4-bit scales
    w[9, ::3] = 0
    w[10] = 1e3 * rng.normal(size=k)
    return w


def near_ties(rng, grid, size):
    """A group of `size` values all within 2 ulps of rounding ties of the group's own grid, but
    for its two extremes: where w / d and w * (1 / d) round apart."""
    hi = F32(rng.uniform(0.5, 2.0))
    if grid.bits == 8 or grid.symmetric:
        lo = F32(-hi * rng.uniform(0.3, 0.95))
    else:
        lo = F32(rng.uniform(-1.0, 0.4))
    d, m = grid.params(np.array([[hi, lo]], F32))
    d, m = d[0], F32(0) if m is None else m[0]
    lim = (-126, 126) if grid.bits == 8 else (-8, 7) if grid.symmetric else (0, 15)
    v = (m + F32(rng.integers(*lim, size) + 0.5) * d).astype(F32)
    for _ in range(2):
        step = rng.integers(-1, 2, size)
        v = np.where(step > 0, np.nextafter(v, F32(np.inf)),
                     np.where(step < 0, np.nextafter(v, F32(-np.inf)), v)).astype(F32)
    v = np.clip(v, lo, hi)
    v[:2] = hi, lo
    return rng.permutation(v)


def bits_of(a):
    """The bit patterns of a float array (array_equal alone takes -0.0 for +0.0)."""
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


@pytest.mark.parametrize("bits,symmetric,group", GRIDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_grid_reproduces_rtn_bit_for_bit(bits, symmetric, group, seed):
    rng = np.random.default_rng(seed)
    n, k = 37, (256 if group else 200)  # per channel: K not a multiple of 32 (padded panels)
    grid = methods.Grid(bits, symmetric)
    g = group or k
    ties = [np.concatenate([near_ties(rng, grid, g) for _ in range(k // g)]) for _ in range(6)]
    w = np.concatenate([awkward_weights(rng, n - 6, k, group), ties])
    q, d, m = rtn(w, grid, g)
    ours = grid.build(q, d, m, group)
    ref = lb.quantize(w, bits, group, symmetric)
    assert (ours.bits, ours.group_size, ours.symmetric) == (ref.bits, ref.group_size, ref.symmetric)
    np.testing.assert_array_equal(ours.int_values(), ref.int_values())
    assert ours.scales.dtype == ref.scales.dtype
    np.testing.assert_array_equal(bits_of(ours.scales), bits_of(ref.scales))
    if symmetric:
        assert ours.mins is None and ref.mins is None
    else:
        np.testing.assert_array_equal(bits_of(ours.mins), bits_of(ref.mins))
    np.testing.assert_array_equal(bits_of(ours.dequantize()), bits_of(ref.dequantize()))
    # and Grid.dequant is what QuantizedWeight.dequantize computes
    mm = None if m is None else m[..., None]
    qi = ref.int_values().astype(F32).reshape(n, k // g, g)  # (Grid.round's q may hold -0.0)
    np.testing.assert_array_equal(qi.reshape(n, k), q)
    wq = grid.dequant(qi, d[..., None], mm).reshape(n, k)
    np.testing.assert_array_equal(bits_of(wq), bits_of(ref.dequantize()))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_grid_refuses_scales_beyond_float16():
    grid = methods.Grid(4, False)
    with pytest.raises(ValueError, match="float16"):
        grid.params(np.array([[-6e5, 6e5]], F32))


# ---------------------------------------------------------------- mse

def outlier_weights(rng, n, k):
    w = rng.normal(0, 0.02, (n, k)).astype(F32)
    hit = rng.random((n, k)) < 0.01
    w[hit] *= 8  # about one weight in a hundred is an outlier
    return w


def clip_errors(w, grid, group, h=None):
    """(clips, N, groups) objectives of every clipping "mse" tries, in float64."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    out = []
    for c in methods.CLIPS:
        d, m = grid.params(wg, c)
        mm = None if m is None else m[..., None]
        wq = grid.dequant(grid.round(wg, d[..., None], mm), d[..., None], mm).reshape(n, k)
        out.append(group_errors(w, wq, group, h))
    return np.array(out)


@pytest.mark.parametrize("bits,symmetric,group", GRIDS)
def test_mse_weight_error_is_the_best_clip_and_beats_rtn(rng, bits, symmetric, group):
    n, k = 48, 256
    w = outlier_weights(rng, n, k)
    g = group or k
    qw = lb.quantize(w, bits, group, symmetric, method="mse")
    rtn_qw = lb.quantize(w, bits, group, symmetric)
    got = group_errors(w, qw.dequantize(), g)
    base = group_errors(w, rtn_qw.dequantize(), g)
    assert np.all(got <= base * (1 + 1e-6))  # clip 1.0 (RTN) is among the candidates
    best = clip_errors(w, methods.Grid(bits, symmetric), g).min(axis=0)
    np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-12)  # and it finds the best one
    if bits == 4:  # 8 bits: a step of clipping (2%) costs the outliers more than it saves
        assert got.sum() < 0.97 * base.sum()


def test_mse_keeps_rtn_where_rounding_is_exact():
    # values on the grid already: clipping can only lose, so "mse" must give RTN's weights
    w = np.tile(np.arange(-8, 8, dtype=F32) * F32(0.25), (4, 4))  # (4, 64), all on d = 0.25
    qw = lb.quantize(w, 4, 32, method="mse")
    np.testing.assert_array_equal(qw.dequantize(), w)
    np.testing.assert_array_equal(qw.dequantize(), lb.quantize(w, 4, 32).dequantize())


@pytest.mark.parametrize("bits,symmetric,group", GRIDS)
def test_mse_with_calibration_minimises_the_block_objective(rng, bits, symmetric, group):
    n, k, s = 40, 256, 512
    w = outlier_weights(rng, n, k)
    x = correlated(rng, s, k, rank=16, noise=0.3)
    g = group or k
    h = hess(x)
    qw = lb.quantize(w, bits, group, symmetric, method="mse", calibration=x)
    rtn_qw = lb.quantize(w, bits, group, symmetric)
    got = group_errors(w, qw.dequantize(), g, h)
    base = group_errors(w, rtn_qw.dequantize(), g, h)
    scale = base.max()
    assert np.all(got <= base + 1e-5 * scale)
    best = clip_errors(w, methods.Grid(bits, symmetric), g, h).min(axis=0)
    np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-5 * scale)
    # the output error on the calibration rows is lower too (not guaranteed with groups: the
    # cross-group terms of H are left out; with 8-bit groups of 64 here it is about even)
    if bits == 4 or group is None:
        assert out_err(x, w, qw) < 0.97 * out_err(x, w, rtn_qw)
    if group is None:  # one block is all of H: the per-row output error itself
        assert out_err(x, w, qw) <= out_err(x, w, rtn_qw) * (1 + 1e-5)


def test_mse_calibration_may_be_batched_and_float16(rng):
    w = outlier_weights(rng, 16, 64)
    x = correlated(rng, 96, 64)
    flat = lb.quantize(w, 4, 32, method="mse", calibration=x)
    batched = lb.quantize(w, 4, 32, method="mse", calibration=x.reshape(4, 24, 64))
    np.testing.assert_array_equal(batched.int_values(), flat.int_values())
    np.testing.assert_array_equal(batched.scales, flat.scales)
    half = lb.quantize(w, 4, 32, method="mse", calibration=x.astype(np.float16))
    assert np.isfinite(half.dequantize()).all()


# ---------------------------------------------------------------- gptq

GPTQ_SHAPES = [(48, 64, None), (48, 128, 32), (40, 128, None), (40, 160, 32), (32, 256, None),
               (32, 192, 64), (24, 200, None), (24, 256, 128)]
GPTQ_GRIDS = [(4, True), (4, False), (8, True)]


@pytest.mark.parametrize("n,k,group", GPTQ_SHAPES)
@pytest.mark.parametrize("bits,symmetric", GPTQ_GRIDS)
def test_gptq_is_never_worse_than_rtn_on_the_calibration_rows(n, k, group, bits, symmetric):
    for seed in range(3):
        rng = np.random.default_rng(seed)
        w = rng.normal(0, 0.05, (n, k)).astype(F32)
        x = rng.normal(size=(384, k)).astype(F32)
        x[:, rng.integers(0, k, 4)] *= 4  # some inputs louder than others
        qw = lb.quantize(w, bits, group, symmetric, method="gptq", calibration=x)
        rtn_qw = lb.quantize(w, bits, group, symmetric)
        assert (qw.shape, qw.bits, qw.group_size, qw.symmetric) == (
            (n, k), bits, group, symmetric)
        assert qw.perm is None and qw.input_scale is None
        assert out_err(x, w, qw) <= out_err(x, w, rtn_qw), seed
        if group is None:  # per channel the scales are chosen before any update: RTN's
            np.testing.assert_array_equal(qw.scales, rtn_qw.scales)
            if not symmetric:
                np.testing.assert_array_equal(qw.mins, rtn_qw.mins)


@pytest.mark.parametrize("n,k,group", [(32, 128, None), (32, 160, 32), (24, 256, 64)])
@pytest.mark.parametrize("bits,symmetric", GPTQ_GRIDS)
def test_gptq_is_much_better_on_correlated_inputs(rng, n, k, group, bits, symmetric):
    w = rng.normal(0, 0.05, (n, k)).astype(F32)
    x = correlated(rng, 512, k)
    qw = lb.quantize(w, bits, group, symmetric, method="gptq", calibration=x)
    assert out_err(x, w, qw) < 0.5 * out_err(x, w, lb.quantize(w, bits, group, symmetric))


def reference_gptq(w, x, bits, symmetric, group, damp=0.1):
    """GPTQ as the paper states it, one column at a time with no lazy updates, H in float64;
    each group's parameters from its columns fully updated, by the "mse" search on H's block."""
    n, k = w.shape
    g = group or k
    grid = methods.Grid(bits, symmetric)
    h = hess(x)
    dead = np.diagonal(h) == 0
    live = np.diagonal(h)[~dead].mean() if (~dead).any() else 1.0
    h[dead, dead] = live
    h += damp * live * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    wt = w.astype(np.float64)
    q = np.zeros((n, k), F32)
    ds, ms = [], []
    for i in range(k):
        if i % g == 0:
            wg = wt[:, i:i + g].astype(F32)
            if g < k:
                _, d, m = methods.mse(wg, grid, g, h[i:i + g, i:i + g])
                d, m = d[:, 0], None if m is None else m[:, 0]
            else:
                d, m = grid.params(wg)
            ds.append(d)
            ms.append(m)
        q[:, i] = grid.round(wt[:, i].astype(F32), d, m)
        e = (wt[:, i] - grid.dequant(q[:, i], d, m)) / u[i, i]
        wt[:, i + 1:] -= np.outer(e, u[i, i + 1:])
    return grid.build(q, np.stack(ds, 1), None if ms[0] is None else np.stack(ms, 1), group)


@pytest.mark.parametrize("n,k,group", [(32, 256, None), (32, 256, 32), (24, 384, 64),
                                       (24, 200, None), (16, 256, 128)])
@pytest.mark.parametrize("bits,symmetric", GPTQ_GRIDS)
def test_gptq_is_the_sequential_algorithm(rng, n, k, group, bits, symmetric):
    # the blocked, lazily updated GPTQ gives the integers of the plain one but for rounding
    # flips (float32 sums in another order)
    w = rng.normal(0, 0.05, (n, k)).astype(F32)
    x = correlated(rng, 512, k, rank=32, noise=0.3)
    qw = lb.quantize(w, bits, group, symmetric, method="gptq", calibration=x)
    ref = reference_gptq(w, x, bits, symmetric, group)
    assert (qw.int_values() != ref.int_values()).mean() <= 0.005
    a, b = qw.scales.astype(np.float64), ref.scales.astype(np.float64)
    assert (np.abs(a - b) > 1e-5 * np.abs(b)).mean() <= 0.02  # 8 bits: float32 scales, ulps apart
    assert abs(out_err(x, w, qw) / out_err(x, w, ref) - 1) < 0.02


@pytest.mark.parametrize("k,group", [(288, 96), (320, 160)])
def test_gptq_groups_across_blocks_are_the_sequential_algorithm(rng, k, group):
    w = rng.normal(0, 0.05, (24, k)).astype(F32)
    x = correlated(rng, 512, k, rank=32, noise=0.3)
    qw = lb.quantize(w, 4, group, method="gptq", calibration=x)
    ref = reference_gptq(w, x, 4, True, group)
    assert (qw.int_values() != ref.int_values()).mean() <= 0.005
    assert (qw.scales != ref.scales).mean() <= 0.02


def test_gptq_generalises_to_held_out_rows(rng):
    k = 128
    a = rng.normal(size=(8, k))
    draw = lambda s: (rng.normal(size=(s, 8)) @ a + 0.1 * rng.normal(size=(s, k))).astype(F32)
    x, held = draw(512), draw(512)
    w = rng.normal(0, 0.05, (32, k)).astype(F32)
    qw = lb.quantize(w, 4, 32, method="gptq", calibration=x)
    assert out_err(held, w, qw) < 0.5 * out_err(held, w, lb.quantize(w, 4, 32))


def loud_inputs(rng, s, k):
    """Inputs whose mean squares are known and 1.7% apart: the act-order is by falling loudness."""
    z = rng.normal(size=(s, k))
    z /= np.sqrt((z ** 2).mean(axis=0))  # every column of mean square 1
    loud = rng.permutation(np.geomspace(0.2, 5.0, k))
    return (z * loud).astype(F32), np.argsort(-loud, kind="stable")


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (4, False, 64), (4, True, None),
                                                  (8, True, 32), (8, True, None)])
def test_act_order(rng, bits, symmetric, group):
    n, k = 40, 192
    w = rng.normal(0, 0.05, (n, k)).astype(F32)
    x, order = loud_inputs(rng, 512, k)
    qw = lb.quantize(w, bits, group, symmetric, method="gptq", calibration=x, act_order=True)
    perm = qw.perm
    assert perm is not None and perm.shape == (k,)
    np.testing.assert_array_equal(np.sort(perm), np.arange(k))
    np.testing.assert_array_equal(perm, order)  # loudest input first
    # the groups are contiguous in the permuted order: column j of the packed values is input
    # perm[j], and its scale is that of group j // group_size
    g = group or k
    grid = methods.Grid(bits, symmetric)
    q = qw.int_values().astype(F32).reshape(n, k // g, g)
    d = qw.scales.astype(F32)[..., None]
    m = None if qw.mins is None else qw.mins.astype(F32)[..., None]
    np.testing.assert_array_equal(qw.dequantize()[:, perm], grid.dequant(q, d, m).reshape(n, k))
    # it is GPTQ on the permuted problem
    assert out_err(x, w, qw) <= out_err(x, w, lb.quantize(w, bits, group, symmetric))
    # the layers gather their inputs in that order
    xs = rng.normal(size=(7, k)).astype(F32)
    if bits == 4:
        assert_close_to_dequantized(lb.Linear(qw, activations="float")(xs), xs, qw)
        assert_close_to_dequantized(lb.matmul(xs, qw, activations="float"), xs, qw)
        assert_int8_within_rounding(lb.Linear(qw, activations="int8")(xs), xs, qw)
    else:
        y = lb.Linear(qw)(xs)
        exact = xs.astype(np.float64) @ qw.dequantize().astype(np.float64).T
        amax = np.abs(xs).max(axis=1, keepdims=True).astype(np.float64)
        bound = amax / 254 * np.abs(qw.dequantize()).sum(axis=1) * 1.001 + 1e-5 * np.abs(exact).max()
        assert np.all(np.abs(y - exact) <= bound)


def test_act_order_is_gptq_on_the_permuted_problem(rng):
    n, k = 32, 160
    w = rng.normal(0, 0.05, (n, k)).astype(F32)
    x, order = loud_inputs(rng, 256, k)
    qw = lb.quantize(w, 4, 32, method="gptq", calibration=x, act_order=True)
    ref = lb.quantize(w[:, order], 4, 32, method="gptq", calibration=np.ascontiguousarray(x[:, order]))
    assert ref.perm is None
    np.testing.assert_array_equal(qw.int_values(), ref.int_values())
    np.testing.assert_array_equal(qw.scales, ref.scales)
    np.testing.assert_array_equal(qw.dequantize()[:, order], ref.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,symmetric", GPTQ_GRIDS)
def test_gptq_dead_inputs_are_only_rounded(rng, act_order, bits, symmetric):
    n, k = 24, 128
    w = rng.normal(0, 0.05, (n, k)).astype(F32)
    x = correlated(rng, 256, k)
    dead = [5, 77, 127]
    x[:, dead] = 0
    qw = lb.quantize(w, bits, None, symmetric, method="gptq", calibration=x, act_order=act_order)
    assert np.isfinite(qw.dequantize()).all()
    rtn_qw = lb.quantize(w, bits, None, symmetric)
    # per channel the scales are RTN's and the dead columns get no update: RTN's values there
    cols = np.arange(k) if qw.perm is None else np.argsort(qw.perm)  # input -> packed column
    np.testing.assert_array_equal(qw.int_values()[:, cols[dead]], rtn_qw.int_values()[:, dead])
    if act_order:
        assert set(qw.perm[-3:]) == set(dead)  # never seen: rounded last
    assert out_err(x, w, qw) < 0.5 * out_err(x, w, rtn_qw)
    # with groups too, and with no live input at all
    grouped = lb.quantize(w, bits, 32, symmetric, method="gptq", calibration=x, act_order=act_order)
    assert np.isfinite(grouped.dequantize()).all()
    nothing = lb.quantize(w, bits, None, symmetric, method="gptq", calibration=np.zeros((8, k), F32),
                          act_order=act_order)
    np.testing.assert_array_equal(nothing.dequantize(), rtn_qw.dequantize())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["gptq", "awq", "mse"])
def test_non_finite_calibration_is_refused(rng, bad, method):
    x = rng.normal(size=(64, 64)).astype(F32)
    x[40, 3] = bad
    with pytest.raises(ValueError, match="calibration.*NaN or Inf"):
        lb.quantize(rng.normal(size=(8, 64)).astype(F32), 4, 32, method=method, calibration=x)


def test_non_finite_weights_are_refused_by_the_methods(rng):
    w = rng.normal(size=(8, 64)).astype(F32)
    w[2, 2] = np.nan
    for method in ("mse", "gptq", "awq"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            lb.quantize(w, 4, 32, method=method, calibration=np.ones((4, 64), F32))


def test_damp_changes_gptq(rng):
    w = rng.normal(0, 0.05, (32, 128)).astype(F32)
    x = correlated(rng, 256, 128)
    a = lb.quantize(w, 4, 32, method="gptq", calibration=x, damp=0.01)
    b = lb.quantize(w, 4, 32, method="gptq", calibration=x, damp=0.5)
    assert not np.array_equal(a.int_values(), b.int_values())
    assert out_err(x, w, a) < out_err(x, w, b)  # less damping fits the calibration rows closer


# ---------------------------------------------------------------- _inverse_upper

@pytest.mark.parametrize("n", [1, 7, 256, 257, 600])
def test_inverse_upper_is_the_inverse(n):
    rng = np.random.default_rng(n)
    r = np.triu(rng.normal(size=(n, n))) / np.sqrt(n) + np.diag(rng.uniform(1, 2, n))
    got = methods._inverse_upper(r)
    ref = np.linalg.inv(r)
    assert got.shape == (n, n) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got @ r, np.eye(n), atol=1e-10)
    assert not np.tril(got, -1).any()  # upper triangular, exactly


# ---------------------------------------------------------------- awq

def awq_case(rng, n=48, k=256, s=512, loud=(3, 40, 41, 200)):
    """Inputs with a few channels of large magnitude (what AWQ exists for)."""
    x = rng.normal(size=(s, k)).astype(F32)
    x[:, list(loud)] *= 25
    w = rng.normal(0, 0.05, (n, k)).astype(F32)
    return w, x


@pytest.mark.parametrize("bits,symmetric,group", GRIDS)
def test_awq_input_scale_and_dequantize(rng, bits, symmetric, group):
    w, x = awq_case(rng)
    n, k = w.shape
    qw = lb.quantize(w, bits, group, symmetric, method="awq", calibration=x)
    s = qw.input_scale
    assert s is not None and s.shape == (k,) and s.dtype == F32
    assert np.all(np.isfinite(s) & (s > 0))
    assert qw.perm is None
    assert s[[3, 40, 41, 200]].max() < np.median(s)  # the loud channels' weights are scaled up
    # dequantize() = the stored values times their scales (and minima) times input_scale
    g = group or k
    grid = methods.Grid(bits, symmetric)
    q = qw.int_values().astype(F32).reshape(n, k // g, g)
    d = qw.scales.astype(F32)[..., None]
    m = None if qw.mins is None else qw.mins.astype(F32)[..., None]
    stored = grid.dequant(q, d, m).reshape(n, k)
    np.testing.assert_array_equal(qw.dequantize(), stored * s)
    np.testing.assert_array_equal(qw.dequantize(rows=slice(5, 9)), (stored * s)[5:9])
    # the layers multiply their inputs by input_scale
    xs = np.concatenate([x[:3], rng.normal(size=(3, k)).astype(F32)])
    if bits == 4:
        assert_close_to_dequantized(lb.matmul(xs, qw, activations="float"), xs, qw)
        assert_close_to_dequantized(lb.Linear(qw, activations="float")(xs), xs, qw)
        assert_int8_within_rounding(lb.matmul(xs, qw), xs, qw)
    else:
        y = lb.matmul(xs, qw)
        x2 = xs.astype(np.float64) * s
        exact = xs.astype(np.float64) @ qw.dequantize().astype(np.float64).T
        bound = np.abs(x2).max(axis=1, keepdims=True) / 254 * np.abs(stored).sum(axis=1)
        assert np.all(np.abs(y - exact) <= bound * 1.001 + 1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("bits,symmetric,group", GRIDS)
def test_awq_beats_rtn_with_loud_input_channels(rng, bits, symmetric, group):
    w, x = awq_case(rng)
    qw = lb.quantize(w, bits, group, symmetric, method="awq", calibration=x)
    rtn_qw = lb.quantize(w, bits, group, symmetric)
    assert out_err(x, w, qw) <= out_err(x, w, rtn_qw)
    if bits == 4:
        assert out_err(x, w, qw) < 0.8 * out_err(x, w, rtn_qw)
    # a batched calibration is the same calibration
    again = lb.quantize(w, bits, group, symmetric, method="awq", calibration=x.reshape(8, 64, -1))
    np.testing.assert_array_equal(again.int_values(), qw.int_values())
    np.testing.assert_array_equal(again.input_scale, qw.input_scale)


@pytest.mark.parametrize("bits,symmetric,group", GRIDS)
def test_awq_clipping_is_the_best_on_the_scaled_weights(rng, bits, symmetric, group):
    # given its input scale, AWQ's weights are those of the "mse" clipping search on W * s with
    # the output objective: per (row, group), the least delta H_gg delta^T of every clip tried
    w, x = awq_case(rng)
    n, k = w.shape
    g = group or k
    qw = lb.quantize(w, bits, group, symmetric, method="awq", calibration=x)
    s = (1 / qw.input_scale).astype(F32)
    grid = methods.Grid(bits, symmetric)
    h = hess(x)
    ws = (w * s).reshape(n, k // g, g)
    cands = []
    for c in methods.CLIPS:
        d, m = grid.params(ws, c)
        mm = None if m is None else m[..., None]
        wq = grid.dequant(grid.round(ws, d[..., None], mm), d[..., None], mm).reshape(n, k) / s
        cands.append(group_errors(w, wq, g, h))
    best = np.min(cands, axis=0)
    got = group_errors(w, qw.dequantize(), g, h)
    np.testing.assert_allclose(got, best, rtol=1e-3, atol=1e-6 * best.max())


def test_awq_with_flat_inputs_is_no_worse_than_rtn(rng):
    # all inputs alike: the scale search has little to gain, but the exponent-0 candidate (no
    # scaling: RTN) is among those tried and per channel the clip search is on the exact objective
    w = rng.normal(0, 0.05, (32, 128)).astype(F32)
    x = rng.normal(size=(512, 128)).astype(F32)
    a = lb.quantize(w, 4, None, method="awq", calibration=x)
    r = lb.quantize(w, 4, None)
    assert out_err(x, w, a) <= out_err(x, w, r)


def test_awq_dead_input_channel(rng):
    w, x = awq_case(rng, n=16, k=64, loud=(3,))
    x[:, 10] = 0
    qw = lb.quantize(w, 4, 32, method="awq", calibration=x)
    assert np.all(np.isfinite(qw.input_scale) & (qw.input_scale > 0))
    assert np.isfinite(qw.dequantize()).all()
    assert out_err(x, w, qw) <= out_err(x, w, lb.quantize(w, 4, 32))


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (4, False, None), (8, True, 64)])
def test_awq_save_load_round_trip(tmp_path, rng, bits, symmetric, group):
    w, x = awq_case(rng, n=40, k=128, loud=(7, 100))
    qw = lb.quantize(w, bits, group, symmetric, method="awq", calibration=x)
    act = lb.quantize(w, 4, 32, method="gptq", calibration=x, act_order=True)
    path = tmp_path / "awq.lowbit"
    lb.save(path, {"awq": qw, "act": act})
    got = lb.load(path)
    g = got["awq"]
    np.testing.assert_array_equal(g.input_scale, qw.input_scale)
    assert g.input_scale.dtype == F32 and g.perm is None and g.nbytes == qw.nbytes
    np.testing.assert_array_equal(g.dequantize(), qw.dequantize())
    np.testing.assert_array_equal(got["act"].perm, act.perm)
    assert got["act"].input_scale is None
    xs = rng.normal(size=(5, 128)).astype(F32)
    modes = ["int8", "float"] if bits == 4 else ["int8"]
    for activations in modes:
        np.testing.assert_array_equal(lb.Linear(g, activations=activations)(xs),
                                      lb.Linear(qw, activations=activations)(xs))
    np.testing.assert_array_equal(lb.matmul(xs, got["act"], activations="float"),
                                  lb.matmul(xs, act, activations="float"))
    assert json.loads(struct_header(path)["__metadata__"]["lowbit"])["version"] == lb.io.FORMAT_VERSION


def struct_header(path):
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + n])


def poke_in_scale(path, index, value):
    """Overwrites element `index` of the stored `w:in_scale` with `value` (the bytes only)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack_from("<Q", data)
    begin = json.loads(data[8:8 + n])["w:in_scale"]["data_offsets"][0]
    struct.pack_into("<f", data, 8 + n + begin + 4 * index, value)
    path.write_bytes(bytes(data))


def awq_file(tmp_path, rng):
    w, x = awq_case(rng, n=16, k=64, loud=(2,))
    path = tmp_path / "m.lowbit"
    lb.save(path, {"w": lb.quantize(w, 4, 32, method="awq", calibration=x)})
    lb.load(path)  # a good file first
    return path


@pytest.mark.parametrize("value", [-1.0, 0.0, -0.0, float("nan"), float("inf")])
def test_bad_in_scale_values_raise_format_error(tmp_path, rng, value):
    path = awq_file(tmp_path, rng)
    poke_in_scale(path, 17, value)
    with pytest.raises(lb.FormatError, match="in_scale must be positive"):
        lb.load(path)


@pytest.mark.parametrize("edit", [
    lambda h: h["w:in_scale"].update(shape=[32, 2]),  # same bytes, wrong shape
    lambda h: h["w:in_scale"].update(dtype="F16", shape=[128]),  # same bytes, wrong dtype
    lambda h: h["w:in_scale"].update(dtype="I32"),
])
def test_bad_in_scale_layout_raises_format_error(tmp_path, rng, edit):
    path = awq_file(tmp_path, rng)
    rewrite_header(path, edit)
    with pytest.raises(lb.FormatError, match="in_scale should be float32 \\(64,\\)"):
        lb.load(path)


# ---------------------------------------------------------------- errors

W = np.ones((4, 64), F32)
X = np.ones((16, 64), F32)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(method="GPTQ", calibration=X), ValueError, "method must be one of"),
    (dict(method="hqq"), ValueError, "method must be one of"),
    (dict(method=None), ValueError, "method must be one of"),
    (dict(method="gptq"), ValueError, "needs calibration"),
    (dict(method="awq"), ValueError, "needs calibration"),
    (dict(method="rtn", calibration=X), ValueError, "rtn.*takes none"),
    (dict(method="gptq", calibration=np.ones((16, 63), F32)), ValueError, r"calibration.*\(S, 64\)"),
    (dict(method="awq", calibration=np.ones((16, 65), F32)), ValueError, r"calibration.*\(S, 64\)"),
    (dict(method="mse", calibration=np.ones((16, 32), F32)), ValueError, r"calibration.*\(S, 64\)"),
    (dict(method="gptq", calibration=np.ones(64, F32)), ValueError, r"calibration.*\(S, 64\)"),
    (dict(method="gptq", calibration=np.ones((0, 64), F32)), ValueError, "calibration.*S >= 1"),
    (dict(method="awq", calibration=np.ones((2, 0, 64), F32)), ValueError, "calibration.*S >= 1"),
    (dict(method="gptq", calibration=np.ones((16, 64), np.int32)), TypeError, "calibration.*float"),
    (dict(method="awq", calibration=np.ones((16, 64), np.int8)), TypeError, "calibration.*float"),
    (dict(method="mse", calibration=np.ones((16, 64), bool)), TypeError, "calibration.*float"),
    (dict(method="mse", act_order=True), ValueError, "act_order"),
    (dict(method="awq", calibration=X, act_order=True), ValueError, "act_order"),
    (dict(act_order=True), ValueError, "act_order"),
    (dict(method="gptq", calibration=X, damp=0), ValueError, "damp"),
    (dict(method="gptq", calibration=X, damp=1), ValueError, "damp"),
    (dict(method="gptq", calibration=X, damp=1.5), ValueError, "damp"),
    (dict(method="gptq", calibration=X, damp=-0.1), ValueError, "damp"),
    (dict(method="gptq", calibration=X, damp=float("nan")), ValueError, "damp"),
    (dict(method="gptq", calibration=X, damp="0.1"), ValueError, "damp"),
    (dict(method="gptq", calibration=X, damp=True), ValueError, "damp"),
    (dict(method="gptq", calibration=X, bits=8, symmetric=False), ValueError, "symmetric"),
    (dict(method="awq", calibration=X, group_size=48), ValueError, "multiple of 32"),
])
def test_method_argument_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        lb.quantize(W, **{"bits": 4, **kwargs})


def test_damp_accepts_numpy_scalars(rng):
    w = rng.normal(size=(8, 64)).astype(F32)
    x = rng.normal(size=(32, 64)).astype(F32)
    qw = lb.quantize(w, 4, 32, method="gptq", calibration=x, damp=np.float32(0.05))
    ref = lb.quantize(w, 4, 32, method="gptq", calibration=x, damp=0.05)
    np.testing.assert_array_equal(qw.int_values(), ref.int_values())


def test_damp_accepts_ints_floats_and_numpy_float64(rng):
    w = rng.normal(size=(8, 64)).astype(F32)
    x = rng.normal(size=(32, 64)).astype(F32)
    a = lb.quantize(w, 4, 32, method="gptq", calibration=x, damp=0.25)
    b = lb.quantize(w, 4, 32, method="gptq", calibration=x, damp=np.float64(0.25))
    np.testing.assert_array_equal(a.int_values(), b.int_values())


@pytest.mark.parametrize("scale,match", [
    (np.ones(63, F32), "input_scale"),
    (np.ones((1, 64), F32), "input_scale"),
    (np.ones(64, np.int32), "input_scale"),
    (np.zeros(64, F32), "input_scale"),
    (np.r_[np.ones(63), 0.0].astype(F32), "input_scale"),
    (np.r_[np.ones(63), -2.0].astype(F32), "input_scale"),
    (np.r_[np.ones(63), np.nan].astype(F32), "input_scale"),
    (np.r_[np.ones(63), np.inf].astype(F32), "input_scale"),
])
def test_from_int_rejects_bad_input_scale(scale, match):
    q = np.full((4, 64), 8, np.uint8)
    d = np.full((4, 2), 0.5, np.float16)
    with pytest.raises(ValueError, match=match):
        lb.QuantizedWeight.from_int(q, d, bits=4, group_size=32, input_scale=scale)
    with pytest.raises(ValueError, match=match):
        lb.QuantizedWeight.from_int(q.astype(np.int8), np.ones((4, 1), F32), bits=8,
                                    input_scale=scale)


def test_from_int_with_perm_and_input_scale(rng):
    n, k = 20, 96
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    d = rng.uniform(0.01, 0.1, (n, 3)).astype(np.float16)
    perm = rng.permutation(k)
    s = rng.uniform(0.25, 4, k).astype(np.float64)  # other float dtypes are taken as float32
    qw = lb.QuantizedWeight.from_int(q, d, bits=4, group_size=32, perm=perm, input_scale=s)
    assert qw.input_scale.dtype == F32
    np.testing.assert_array_equal(qw.input_scale, s.astype(F32))
    stored = (d.astype(F32).repeat(32, axis=1) * (q.astype(F32) - 8))
    expect = np.empty_like(stored)
    expect[:, perm] = stored
    np.testing.assert_array_equal(qw.dequantize(), expect * s.astype(F32))
    x = rng.normal(size=(6, k)).astype(F32)
    assert_close_to_dequantized(lb.matmul(x, qw, activations="float"), x, qw)
    assert_int8_within_rounding(lb.matmul(x, qw), x, qw)
    assert "input_scale" in repr(qw) and "act-order" in repr(qw)
    assert qw.nbytes == sum(a.nbytes for a in (qw._packed, qw._scales, qw._perm, qw._in_scale))


# ---------------------------------------------------------------- progress, threads

def test_gptq_progress_goes_to_stderr(rng, capsys):
    w = rng.normal(size=(8, 256)).astype(F32)
    x = rng.normal(size=(32, 256)).astype(F32)
    lb.quantize(w, 4, 32, method="gptq", calibration=x, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "gptq: 128/256 columns" in err and err.endswith("gptq: 256/256 columns\n")
    for progress in (False, None):  # None: only for big matrices on a terminal
        lb.quantize(w, 4, 32, method="gptq", calibration=x, progress=progress)
        assert capsys.readouterr() == ("", "")
    lb.quantize(w, 4, 32, method="awq", calibration=x)
    lb.quantize(w, 4, 32, method="mse", calibration=x)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("method,act_order", [("gptq", False), ("gptq", True), ("awq", False),
                                              ("mse", False)])
def test_results_do_not_depend_on_thread_count(rng, threads, method, act_order):
    w = rng.normal(0, 0.05, (64, 256)).astype(F32)
    x = correlated(rng, 512, 256)
    results = []
    for t in (1, 2):
        lb.set_num_threads(t)
        assert lb.get_num_threads() == t
        results.append(lb.quantize(w, 4, 32, method=method, calibration=x, act_order=act_order))
    a, b = results
    np.testing.assert_array_equal(a.int_values(), b.int_values())
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())
    xs = x[:5]
    lb.set_num_threads(1)
    y1 = lb.matmul(xs, a, activations="float")
    lb.set_num_threads(2)
    np.testing.assert_array_equal(lb.matmul(xs, a, activations="float"), y1)


@pytest.mark.parametrize("bits,group,method", [(8, None, "gptq"), (4, 32, "gptq"), (4, 32, "awq"),
                                               (8, None, "mse")])
def test_calibration_of_any_magnitude(rng, bits, group, method):
    """The methods depend on the calibration rows only up to a positive factor. Rows near 1e19
    overflowed H in float32 (8-bit GPTQ silently returned weights with 99% error; AWQ raised
    TypeError on None), rows near 1e-20 underflowed it. Rows scaled by a power of two now give
    the same weights bit for bit, other large or tiny factors the same accuracy."""
    w = rng.normal(0, 0.02, (32, 64)).astype(F32)
    x = rng.normal(size=(128, 64)).astype(F32)
    kw = dict(bits=bits, group_size=group, method=method)
    expected = lb.quantize(w, calibration=x, **kw).dequantize()
    for factor in (2.0 ** 64, 2.0 ** -70):
        got = lb.quantize(w, calibration=x * F32(factor), **kw).dequantize()
        np.testing.assert_array_equal(got, expected)
    error = np.linalg.norm(expected - w)
    for factor in (1e19, 1e20, 3e37, 1e-20):
        got = lb.quantize(w, calibration=x * F32(factor), **kw).dequantize()
        assert np.linalg.norm(got - w) <= 1.05 * error, factor
    from lowbit.methods import hessian
    h = hessian(x.astype(np.float64) * 1e200, 64)  # float64 rows beyond float32
    assert np.isfinite(h).all() and h.max() > 0


def test_gptq_inputs_never_seen_leave_the_others_as_without_them(rng):
    """Calibration columns that are exactly zero (ReLU units that never fire) decouple from the
    rest of H; they must not change the damping either, so the live columns come out as GPTQ on
    the live columns alone gives them."""
    w = rng.normal(size=(16, 128)).astype(F32)
    x = rng.normal(size=(200, 128)).astype(F32)
    x[:, :64] = x[:, :64] @ rng.normal(size=(64, 64)).astype(F32)  # correlated live inputs
    x[:, 64:] = 0
    full = lb.quantize(w, 4, 32, method="gptq", calibration=x)
    alone = lb.quantize(w[:, :64], 4, 32, method="gptq", calibration=x[:, :64])
    np.testing.assert_array_equal(full.int_values()[:, :64], alone.int_values())
    np.testing.assert_array_equal(full.dequantize()[:, :64], alone.dequantize())


def test_calibration_checked_as_given_with_an_input_scale(rng):
    w = rng.normal(size=(16, 64)).astype(F32)
    x = rng.normal(size=(100, 64)).astype(F32)
    c = np.full(64, 0.5, F32)
    for bad, error in ((x[:, :1], ValueError), (x[:, :32], ValueError), (x.astype(np.int32), TypeError)):
        with pytest.raises(error, match="calibration"):  # not broadcast against the scale first
            lb.quantize(w, 4, 32, method="gptq", calibration=bad, input_scale=c)
