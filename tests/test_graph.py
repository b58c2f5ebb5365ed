"""lowbit.nn.record: a function of lowbit calls recorded once and replayed from C++ gives, step
after step, the very bits the Python calls give; whatever it cannot replay is refused while
recording, never replayed with a stale value."""
import numpy as np
import pytest

import lowbit as lb
from lowbit import nn
from test_block_formats import weight as block_weight

F32 = np.float32
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 96, 50


class TinyLlama:
    """Two llama blocks on weights of several formats (int8, W4A8 g32, a fused Q5_0 + Q8_0
    projection run as two calls), a Q8_0 embedding, and the example's forward."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        dense = lambda n, k: rng.normal(0, 0.1, (n, k)).astype(F32)  # noqa: E731
        self.embed = block_weight("Q8_0", VOCAB, HIDDEN // 32, rng)
        nq, nkv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        self.layers = []
        for i in range(2):
            q = lb.quantize(dense(nq + nkv, HIDDEN), bits=8 if i == 0 else 4, group_size=32)
            v = lb.quantize(dense(nkv, HIDDEN), bits=8) if i == 0 else block_weight("Q5_0", nkv, HIDDEN // 32, rng)
            gate_up = (lb.Linear(lb.quantize(dense(2 * FFN, HIDDEN), bits=8)) if i == 0 else
                       lb.FusedLinear([block_weight("Q5_0", FFN, HIDDEN // 32, rng),
                                       block_weight("Q8_0", FFN, HIDDEN // 32, rng)]))
            self.layers.append(dict(
                norm1=rng.uniform(0.5, 1.5, HIDDEN).astype(F32),
                norm2=rng.uniform(0.5, 1.5, HIDDEN).astype(F32),
                qkv=lb.FusedLinear([q, v]), gate_up=gate_up,
                o=lb.Linear(lb.quantize(dense(HIDDEN, nq), bits=4, group_size=32, symmetric=False)),
                down=lb.Linear(block_weight("Q8_0", HIDDEN, FFN // 32, rng))))
        self.out_norm = rng.uniform(0.5, 1.5, HIDDEN).astype(F32)
        self.output = lb.Linear(self.embed)
        self.rope = nn.RoPE(HEAD_DIM, 10000.0)
        self.caches = [nn.KVCache(KV_HEADS, HEAD_DIM, capacity=32) for _ in self.layers]

    def run(self, ids, positions):
        t = len(ids)
        x = self.embed.dequantize(rows=ids)
        nq, nkv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        for layer, cache in zip(self.layers, self.caches):
            qkv = layer["qkv"](nn.rms_norm(x, layer["norm1"]))
            qk = self.rope(qkv[:, :nq + nkv].reshape(t, HEADS + KV_HEADS, HEAD_DIM), positions)
            cache.append(qk[:, HEADS:], qkv[:, nq + nkv:].reshape(t, KV_HEADS, HEAD_DIM))
            x = nn.add(x, layer["o"](cache.attend(qk[:, :HEADS])))
            gu = layer["gate_up"](nn.rms_norm(x, layer["norm2"]))
            x = nn.add(x, layer["down"](nn.swiglu(gu[:, :FFN], gu[:, FFN:])))
        return self.output(nn.rms_norm(x[-1:], self.out_norm))[0]

    def eager(self, ids, start):
        return self.run(np.asarray(ids, np.int64), np.arange(start, start + len(ids)))


def test_replay_matches_the_python_calls_bit_for_bit():
    """45 decode steps, the caches growing past their first capacity, the thread count changed
    between steps: every replay gives the eager step's logits exactly."""
    prompt = [3, 14, 15, 9, 26]
    eager, graphed = TinyLlama(), TinyLlama()
    eager.eager(prompt, 0), graphed.eager(prompt, 0)
    tokens = np.random.default_rng(1).integers(0, VOCAB, 45)
    step = None
    threads = lb.get_num_threads()
    try:
        for i, tok in enumerate(tokens):
            pos = len(prompt) + i
            want = eager.eager([tok], pos).copy()
            if step is None:
                step = nn.record(graphed.run, np.array([tok]), np.array([pos]))
                got = step.result
            else:
                lb.set_num_threads(1 if i % 3 == 1 else threads)
                got = step(np.array([tok]), np.array([pos]))
            np.testing.assert_array_equal(got, want)
    finally:
        lb.set_num_threads(threads)
    assert graphed.caches[0].length == len(prompt) + len(tokens) and graphed.caches[0].capacity >= 50
    np.testing.assert_array_equal(graphed.caches[1].keys(), eager.caches[1].keys())
    np.testing.assert_array_equal(graphed.caches[1].values(), eager.caches[1].values())
    assert len(step) > 20  # every call recorded: 2 x (norm, 1-2 linear, rope, append, attend, ...)
    # inputs: cast like np.copyto (a Python int, a list), shapes as recorded
    before = graphed.caches[0].length
    step([int(tokens[0])], [before])
    with pytest.raises(ValueError, match="shape"):
        step(np.array([1, 2]), np.array([before + 1]))
    with pytest.raises(TypeError, match="2 inputs"):
        step(np.array([1]))
    assert graphed.caches[0].length == before + 1  # refused replays ran nothing


def test_replay_checks_positions_and_rows_before_running_anything():
    m = TinyLlama()
    m.eager([1, 2], 0)
    step = nn.record(m.run, np.array([3]), np.array([2]))
    with pytest.raises(IndexError, match="position -1"):
        step(np.array([3]), np.array([-1]))
    with pytest.raises(IndexError, match="row 50 out of range"):
        step(np.array([50]), np.array([3]))
    with pytest.raises(IndexError, match="row -1"):
        step(np.array([-1]), np.array([3]))
    assert m.caches[0].length == 3  # nothing was appended
    # a position past the RoPE tables grows them before the replay (as an eager call does)
    ref = TinyLlama()
    ref.eager([1, 2, 3], 0)
    want = ref.eager([4], 1000).copy()
    got = step(np.array([4]), np.array([1000]))
    np.testing.assert_array_equal(got, want)
    assert m.rope._tables.rows >= 1001


def numpy_add(m):
    def run(ids, positions):
        x = m.embed.dequantize(rows=ids)
        return nn.rms_norm(x + x, m.out_norm)  # numpy's add: would be frozen
    return run


@pytest.mark.parametrize("body,error,match", [
    (lambda m: numpy_add(m), ValueError, "not computed by a recorded lowbit call"),
    (lambda m: lambda ids, p: nn.rope(m.embed.dequantize(rows=ids).reshape(1, 4, 16),
                                      *nn.rope_tables(16, p)), ValueError, "nn.RoPE"),
    (lambda m: lambda ids, p: nn.gelu(m.embed.dequantize(rows=ids)), TypeError, "cannot be recorded"),
    (lambda m: lambda ids, p: np.multiply(m.embed.dequantize(rows=ids), 2, out=m.embed.dequantize(rows=ids)),
     ValueError, "read-only"),
    (lambda m: lambda ids, p: 3, TypeError, "must return arrays"),
    (lambda m: lambda ids, p: (m.caches[0].clear(), m.embed.dequantize(rows=ids))[1], TypeError,
     "KVCache.clear"),
    (lambda m: lambda ids, p: (lambda y: (np.multiply(y, 2, out=y), y)[1])(
        m.layers[1]["gate_up"](m.embed.dequantize(rows=ids))), ValueError, "read-only"),
    (lambda m: lambda ids, p: (lambda buf: (nn.add(m.embed.dequantize(rows=ids), m.embed.dequantize(rows=ids), out=buf),
                                            np.multiply(buf, 2, out=buf), buf)[2])(np.empty((1, HIDDEN), F32)),
     ValueError, "read-only"),
    (lambda m: lambda ids, p: np.ones(3, F32), ValueError, "a result was not computed"),
    (lambda m: lambda ids, p: nn.record(lambda: None), ValueError, "another recording"),
    (lambda m: (lambda inner: lambda ids, p: inner(ids))(
        nn.record(lambda ids: m.embed.dequantize(rows=ids), np.array([1]))), TypeError, "replay"),
])
def test_what_cannot_be_replayed_is_refused_while_recording(body, error, match):
    m = TinyLlama()
    with pytest.raises(error, match=match):
        nn.record(body(m), np.array([3]), np.array([0]))
    # the failed recording is over: calls run (and record) as usual
    x = m.embed.dequantize(rows=np.array([1]))
    assert nn.gelu(x).shape == (1, HIDDEN)
    double = lambda ids: (lambda r: nn.add(r, r))(m.embed.dequantize(rows=ids))  # noqa: E731
    assert len(nn.record(double, np.array([2]))) == 2


def test_add_and_rope_at_positions():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 7)).astype(F32), rng.normal(size=(3, 7)).astype(F32)
    np.testing.assert_array_equal(nn.add(a, b), a + b)
    np.testing.assert_array_equal(nn.add(a.T, b.T), (a + b).T)  # any layout
    out = np.empty_like(a)
    assert nn.add(a, b, out=out) is out and np.array_equal(out, a + b)
    with pytest.raises(ValueError, match="one shape"):
        nn.add(a, b[:2])
    np.testing.assert_array_equal(nn.add(np.arange(3), np.ones(3)), np.arange(1, 4, dtype=F32))
    with pytest.raises(TypeError, match="real values"):
        nn.add(a.astype(np.complex64), b)
    x = rng.normal(size=(4, 3, 16)).astype(F32)
    positions = np.array([7, 0, 999, 7])  # past the first tables: they grow
    for style in ("pairs", "neox"):
        r = nn.RoPE(16, 500.0, style)
        np.testing.assert_array_equal(r(x, positions), nn.rope(x, *nn.rope_tables(16, positions, 500.0), style))
    with pytest.raises(IndexError, match="position -2"):
        r(x, np.array([0, 1, 2, -2]))
    with pytest.raises(TypeError, match="integers"):
        r(x, np.zeros(4))
    np.testing.assert_array_equal(nn.scale(a, 3.5), a * F32(3.5))
    v = np.arange(9, dtype=F32)
    for call in (lambda: nn.scale(v[:8], 2, out=v[1:]), lambda: nn.add(v[:8], v[1:], out=v[1:])):
        with pytest.raises(ValueError, match="overlap"):
            call()
    assert nn.add(v, v, out=v) is v and v[3] == 6  # in place: fine
    g, u = rng.normal(size=(2, 3, 40)).astype(F32), rng.normal(size=(2, 3, 40)).astype(F32)
    np.testing.assert_array_equal(nn.geglu(g, u), nn.gelu(g, approximate="tanh") * u)
    np.testing.assert_array_equal(nn.geglu(g, u[0, 0]), nn.gelu(g, approximate="tanh") * u[0, 0])


def test_kv_cache_clear_keeps_its_memory():
    rng = np.random.default_rng(4)
    cache = nn.KVCache(2, 8, capacity=32)
    k = rng.normal(size=(40, 2, 8)).astype(F32)
    cache.append(k, k)
    cap = cache.capacity
    cache.clear()
    assert cache.length == 0 and cache.k.shape[1] * 32 == cap
    cache.append(k[:3], k[:3])
    np.testing.assert_array_equal(cache.keys(), k[:3])
    cache.append(k[3:9], k[3:9])
    cache.length = 4  # forget the positions after the fourth
    cache.append(k[20:21], k[20:21])
    np.testing.assert_array_equal(cache.keys(), np.concatenate([k[:4], k[20:21]]))
    with pytest.raises(ValueError, match="length"):
        cache.length = 6
    with pytest.raises(ValueError, match="queries"):
        cache.attend(rng.normal(size=(6, 2, 8)).astype(F32))


def test_a_graph_keeps_what_it_reads_alive():
    """The model's layers, caches and tables may go: the graph holds what its calls read."""
    import gc
    m, ref = TinyLlama(), TinyLlama()
    m.eager([1, 2, 3], 0), ref.eager([1, 2, 3], 0)
    step = nn.record(m.run, np.array([4]), np.array([3]))
    ref.eager([4], 3)
    del m
    gc.collect()
    for pos, tok in enumerate([5, 6, 7], start=4):
        np.testing.assert_array_equal(step(np.array([tok]), np.array([pos])), ref.eager([tok], pos))


def test_caches_and_rope_pickle_by_value():
    import pickle
    rng = np.random.default_rng(5)
    cache = nn.KVCache(2, 8, capacity=32)
    k, v = rng.normal(size=(40, 2, 8)).astype(F32), rng.normal(size=(40, 2, 8)).astype(F32)
    cache.append(k, v)
    back = pickle.loads(pickle.dumps(cache))
    assert back.length == 40 and back.capacity == cache.capacity
    q = rng.normal(size=(3, 4, 8)).astype(F32)
    np.testing.assert_array_equal(back.attend(q), cache.attend(q))
    r = pickle.loads(pickle.dumps(nn.RoPE(8, 500.0, "neox")))
    x = rng.normal(size=(2, 3, 8)).astype(F32)
    np.testing.assert_array_equal(r(x, [5, 600]), nn.RoPE(8, 500.0, "neox")(x, [5, 600]))


def test_rope_is_freed():
    import gc
    import weakref
    r = nn.RoPE(8)
    r(np.zeros((1, 1, 8), F32), [1000])  # grown
    ref = weakref.ref(r)
    del r
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("make", [
    lambda w, b, obs: lb.Linear(w, b, activations=obs),              # static int8 activations
    lambda w, b, obs: lb.Linear(w, b, bits=4, group_size=32, activations="float"),  # W4A32
    lambda w, b, obs: lb.Linear(w, b, epilogue="gelu"),               # GELU in the epilogue
    lambda w, b, obs: lb.Linear(lb.quantize(w, input_scale=np.linspace(0.5, 2, 64).astype(F32)), b),
    lambda w, b, obs: lb.Linear(block_weight("Q4_K", 48, 1, np.random.default_rng(2)), activations="float"),
])
@pytest.mark.parametrize("rows", [1, 3])
def test_every_kind_of_layer_replays_exactly(make, rows):
    """Each layer setting records and replays the very kernel call it makes in Python, one row
    (a decode step) or several (a chunk)."""
    rng = np.random.default_rng(7)
    k = 64
    w, b = rng.normal(0, 0.1, (48, k)).astype(F32), rng.normal(size=48).astype(F32)
    obs = lb.MinMaxObserver()
    obs.observe(rng.normal(size=(16, k)).astype(F32))
    layer = make(w, b, obs.params())
    k = layer.in_features
    norm = rng.uniform(0.5, 1.5, k).astype(F32)
    step = lambda x: layer(nn.rms_norm(x, norm))  # noqa: E731
    x0 = rng.normal(size=(rows, k)).astype(F32)
    graph = nn.record(step, x0)
    np.testing.assert_array_equal(graph.result, step(x0))
    for _ in range(3):
        x = rng.normal(size=(rows, k)).astype(F32)
        want = step(x)
        np.testing.assert_array_equal(graph(x), want)


def test_rope_on_slices_of_a_fused_projection_records_for_several_tokens():
    """The README's pattern, rope(qkv[:, :nq].reshape(t, H, D), positions), for t > 1: RoPE reads
    the slice's rows where they are (no copy the replay could not see)."""
    rng = np.random.default_rng(3)
    lin = lb.Linear(rng.normal(size=(96, 64)).astype(F32))
    rope = nn.RoPE(16)

    def step(x, positions):
        return rope(lin(x)[:, :64].reshape(-1, 4, 16), positions)
    graph = nn.record(step, rng.normal(size=(3, 64)).astype(F32), np.arange(3))
    x, positions = rng.normal(size=(3, 64)).astype(F32), np.arange(3) + 7
    np.testing.assert_array_equal(graph(x, positions), step(x, positions))
    q = lin(x)[:, :64].reshape(-1, 4, 16)
    np.testing.assert_array_equal(rope(q, positions), rope(np.ascontiguousarray(q), positions))
    with pytest.raises(ValueError, match="scale's operand .* is not C-contiguous"):
        nn.record(lambda x: nn.scale(lin(x)[:, :64], 2.0), x)  # named, not "numpy work"


@pytest.mark.parametrize("bits,activations", [(4, "int8"), (4, "float"), (8, "int8"), (8, "float")])
def test_act_order_layers_gather_their_inputs_in_the_kernel_and_record(bits, activations):
    """An act-order weight (GPTQ's g_idx: qw.perm) gathers its inputs in the quantization pass,
    bit for bit as numpy's take did, so its calls record like any other."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(16, 64)).astype(F32)
    x = rng.normal(size=(50, 64)).astype(F32)
    x[:, 7] *= 20  # a dominant input: act order puts it first
    qw = lb.quantize(w, bits, 32, method="gptq", calibration=x, act_order=True,
                     input_scale=np.linspace(0.5, 2, 64).astype(F32))
    assert qw.perm is not None
    layer = lb.Linear(qw, activations=activations)
    taken = x[:3].take(qw.perm, axis=1) * qw.input_scale[qw.perm]  # the packed order, as it was
    unpermuted = lb.Linear(lb.QuantizedWeight(qw.shape, qw.bits, qw.group_size, qw.symmetric,
                                              qw._packed, qw._scales, comp=qw._comp, mins=qw._mins,
                                              zeros=qw._zeros), activations=activations)
    np.testing.assert_array_equal(layer(x[:3]), unpermuted(taken))
    graph = nn.record(lambda x: layer(x), x[:1])
    np.testing.assert_array_equal(graph(x[1:2]), layer(x[1:2]))
