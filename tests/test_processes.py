"""Layers and weights travel by value to worker processes (pickle, multiprocessing under fork and
spawn) and give there bit for bit what they give in the parent."""
import multiprocessing as mp
import pickle

import numpy as np
import pytest

import lowbit as lb
from lowbit.formats import BLOCK_FORMATS
from test_block_formats import weight


def block_weight(name, n, k, rng):
    return weight(name, n, k // BLOCK_FORMATS[name].block, rng)


def layers(rng):
    """One small layer of each kind of weight: int8, int4 with minima, GPTQ act-order (perm and
    zero points), AWQ (input_scale), a block format, static activations, a FusedLinear."""
    w = rng.normal(size=(48, 64)).astype(np.float32)
    b = rng.normal(size=48).astype(np.float32)
    cal = rng.normal(size=(64, 64)).astype(np.float32)
    gptq = lb.quantize(w, bits=4, group_size=32, symmetric=False, method="gptq", calibration=cal,
                       act_order=True)
    awq = lb.quantize(w, bits=4, group_size=32, method="awq", calibration=cal)
    return [lb.Linear(w, b), lb.Linear(w, b, bits=4, group_size=32, symmetric=False),
            lb.Linear(gptq, b), lb.Linear(awq, activations="float"),
            lb.Linear(block_weight("Q4_K", 48, 256, rng)),
            lb.Linear(w, b, activations=lb.StaticActivations(0.02, 3)),
            lb.FusedLinear([lb.quantize(w, bits=4, group_size=32), block_weight("Q8_0", 16, 64, rng)])]


def inputs(layer, rng):
    return rng.normal(size=(3, layer.in_features)).astype(np.float32)


def _init(threads):
    lb.set_num_threads(threads)


def _run(args):
    layer, x = args
    return layer(x), lb.get_num_threads()


def test_weights_and_layers_pickle_by_value_and_stay_read_only(rng, tmp_path):
    for layer in layers(rng):
        x = inputs(layer, rng)
        copy = pickle.loads(pickle.dumps(layer))
        np.testing.assert_array_equal(copy(x), layer(x))
    qw = lb.quantize(rng.normal(size=(16, 64)).astype(np.float32), bits=4, group_size=32)
    lb.save(tmp_path / "w.lowbit", {"w": qw, "blk": block_weight("Q6_K", 16, 256, rng)})
    for name, loaded in lb.load(tmp_path / "w.lowbit").items():
        copy = pickle.loads(pickle.dumps(loaded))
        held = [a for a in (copy._packed, copy._scales, copy._mins) if a is not None]
        held += list((copy._parts or {}).values())
        assert held and not any(a.flags.writeable for a in held), name
        np.testing.assert_array_equal(copy.dequantize(), loaded.dequantize())
    fresh = pickle.loads(pickle.dumps(qw))
    assert not fresh._packed.flags.writeable  # a weight's arrays are read-only, however made


def test_arrays_that_went_through_pickle_are_accepted(rng):
    layer = lb.Linear(rng.normal(size=(16, 64)).astype(np.float32))
    x = inputs(layer, rng)
    x2 = pickle.loads(pickle.dumps(x))  # an equal dtype object, not numpy's float32 singleton
    np.testing.assert_array_equal(layer(x2), layer(x))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_workers_give_the_results_of_one_process(method, rng):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    jobs = [(layer, inputs(layer, rng)) for layer in layers(rng)]
    expected = [layer(x) for layer, x in jobs]
    with mp.get_context(method).Pool(2, initializer=_init, initargs=(1,)) as pool:
        got = pool.map(_run, jobs)
    for (y, threads), want in zip(got, expected):
        assert threads == 1
        np.testing.assert_array_equal(y, want)
