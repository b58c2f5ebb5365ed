"""Dispatch, environment overrides, threads, processes."""
import multiprocessing as mp
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import lowbit as lb
from conftest import ALL_ISAS, FEATURE_NAMES, NEEDS, isa_skip_reason


def run_python(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_cpu_info_reports_choice_and_features():
    info = lb.cpu_info()
    assert info["isa"] == info["available"][0] or os.environ.get("LOWBIT_ISA")
    assert "ref" in info["available"] and info["available"][-1] == "ref"
    assert set(info["available"]) <= set(info["compiled"])
    assert isinstance(info["features"], dict) and info["num_threads"] >= 1


def test_use_isa_switches_and_restores(isa):
    before = lb.cpu_info()["isa"]
    with lb.use_isa("ref"):
        assert lb.cpu_info()["isa"] == "ref"
    assert lb.cpu_info()["isa"] == before


def test_a_use_isa_object_entered_again_switches_again():
    """The switch happens at the call; a block entered again on the same object (reused, or
    nested) must switch again, not run on whatever set the thread has then."""
    default = lb.cpu_info()["isa"]
    u = lb.use_isa("ref")
    with u:
        assert lb.cpu_info()["isa"] == "ref"
    assert lb.cpu_info()["isa"] == default
    with u:
        assert lb.cpu_info()["isa"] == "ref"
        with u:
            assert lb.cpu_info()["isa"] == "ref"
        assert lb.cpu_info()["isa"] == "ref"
    assert lb.cpu_info()["isa"] == default


def test_use_isa_in_two_threads_interleaved_restores_each(rng):
    """Thread A enters ref, B enters another set, A exits, B exits: each thread saw its own
    choice throughout, the main thread never saw either, and the process ends where it began
    (a process-wide switch left it on ref for good)."""
    default = lb.cpu_info()["isa"]
    other = lb.cpu_info()["available"][0]
    layer = lb.Linear(rng.normal(0, 0.02, (256, 1024)).astype(np.float32))
    x = rng.normal(size=(64, 1024)).astype(np.float32)  # large enough for the pool
    expected = layer(x)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a(_):
        with lb.use_isa("ref"):
            a_in.set()
            assert b_in.wait(30)
            seen["a inside"] = lb.cpu_info()["isa"]
            seen["a result"] = layer(x)
        seen["a after"] = lb.cpu_info()["isa"]
        a_out.set()

    def thread_b(_):
        assert a_in.wait(30)
        with lb.use_isa(other):
            b_in.set()
            assert a_out.wait(30)
            seen["b inside"] = lb.cpu_info()["isa"]
            seen["b result"] = layer(x)
        seen["b after"] = lb.cpu_info()["isa"]

    run_threads(2, lambda i: (thread_a, thread_b)[i](i))
    assert seen["a inside"] == "ref" and seen["b inside"] == other
    assert seen["a after"] == default and seen["b after"] == default
    assert lb.cpu_info()["isa"] == default
    assert np.array_equal(seen["a result"], expected) and np.array_equal(seen["b result"], expected)


def test_use_isa_nests_and_leaves_other_threads_alone():
    default = lb.cpu_info()["isa"]
    inside = threading.Event()
    release = threading.Event()
    other_thread = []

    def hold():
        with lb.use_isa("ref"):
            inside.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(30)
        other_thread.append(lb.cpu_info()["isa"])  # main thread, while the other holds ref
    finally:
        release.set()
        t.join()
    assert other_thread == [default]
    with lb.use_isa("ref"):
        with lb.use_isa(lb.cpu_info()["available"][0]):
            assert lb.cpu_info()["isa"] == lb.cpu_info()["available"][0]
        assert lb.cpu_info()["isa"] == "ref"
    assert lb.cpu_info()["isa"] == default
    with pytest.raises(ValueError, match="unknown ISA ''"):
        lb.use_isa("")


@pytest.mark.parametrize("name", ALL_ISAS)
def test_isa_skips_say_what_the_cpu_lacks(name):
    """~1,300 tests skipped on CPUs without AMX / AVX-VNNI with "not available on this CPU/build":
    the reason now names the missing feature (or the build)."""
    info = lb.cpu_info()
    reason = isa_skip_reason(name)
    if name in info["available"]:
        assert reason is None
    elif name in info["compiled"]:
        assert reason.startswith(f"{name}: this CPU lacks ") and "(kernel set not available)" in reason
        lacking = [FEATURE_NAMES[f] for f in NEEDS[name] if not info["features"][f]]
        assert lacking and all(f in reason for f in lacking), (reason, lacking)
    else:
        assert reason.startswith(f"{name}: not in this build")


def test_kernel_sets_and_features_are_this_architectures():
    """cpu_info names the sets and CPU features of the machine's architecture (getauxval hwcaps
    on aarch64, cpuid on x86-64), in the dispatch order: a set is available exactly when the CPU
    has every feature it needs (the emulated aarch64 runs check this on three CPU models)."""
    info = lb.cpu_info()
    assert set(info["compiled"]) <= set(ALL_ISAS) and "ref" in info["compiled"]
    assert set(info["features"]) == {f for needs in NEEDS.values() for f in needs}
    order = [i for i in reversed(ALL_ISAS) if i in info["compiled"]]
    assert info["compiled"] == order
    assert info["available"] == [i for i in order
                                 if all(info["features"][f] for f in NEEDS.get(i, []))]


def test_unknown_isa_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ISA 'sse9'.*available on this CPU: .*ref"):
        lb.use_isa("sse9")


def test_isa_the_cpu_lacks_is_a_clear_error():
    missing = [i for i in lb.cpu_info()["compiled"] if i not in lb.cpu_info()["available"]]
    if not missing:
        pytest.skip("this CPU runs every compiled ISA")
    with pytest.raises(ValueError, match="this CPU lacks it"):
        lb.use_isa(missing[0])


@pytest.mark.parametrize("name", ALL_ISAS)
def test_environment_forces_isa_in_a_new_process(name):
    if isa_skip_reason(name):
        pytest.skip(isa_skip_reason(name))
    r = run_python("import lowbit as lb; print(lb.cpu_info()['isa'])", LOWBIT_ISA=name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


def test_environment_with_unknown_isa_fails_at_import():
    r = run_python("import lowbit", LOWBIT_ISA="bogus")
    assert r.returncode != 0 and "unknown ISA 'bogus'" in r.stderr


def test_environment_sets_thread_count():
    r = run_python("import lowbit as lb; print(lb.get_num_threads())", LOWBIT_NUM_THREADS="3")
    assert r.stdout.strip() == "3", r.stderr


@pytest.mark.parametrize("value", ["1e3", "2abc", "4294967297", "99999999999", "0", "-2", " 3",
                                   "1025", "0x10"])
def test_environment_thread_count_is_parsed_strictly(value):
    """atoi read "1e3" as 1 and "99999999999" as 1,215,752,191 (then ~32,000 OS threads)."""
    r = run_python("import lowbit", LOWBIT_NUM_THREADS=value)
    assert r.returncode != 0
    assert f"LOWBIT_NUM_THREADS: expected a whole number of threads in 1..1024, got '{value}'" in r.stderr


def test_environment_thread_count_at_the_limit():
    r = run_python("import lowbit as lb; print(lb.get_num_threads())", LOWBIT_NUM_THREADS="1024")
    assert r.stdout.strip() == "1024", r.stderr


@pytest.mark.parametrize("value,limit", [("", 64), ("0", 0), ("256", 256), ("banana", None),
                                         ("-5", None), ("1e3", None), ("99999999999999999999", None)])
def test_environment_cache_size_is_parsed_strictly(value, limit):
    """LOWBIT_CACHE_MB: strtol took "banana" and "-5" as 0 and overflowed the shift on huge ones."""
    r = run_python("import lowbit; print(lowbit._core.cache_limit_mb())", LOWBIT_CACHE_MB=value)
    if limit is None:
        assert r.returncode != 0
        assert f"LOWBIT_CACHE_MB: expected a whole number of MB in 0..1048576, got '{value}'" in r.stderr
    else:
        assert r.stdout.strip() == str(limit), r.stderr


def test_set_num_threads_validates(threads):
    for bad in (0, -1, 1025, 2**31 + 1, 2**40, 2**70, -2**70):
        with pytest.raises(ValueError, match=r"num_threads must be in 1\.\.1024, got"):
            lb.set_num_threads(bad)
    with pytest.raises(TypeError):
        lb.set_num_threads(2.0)
    with pytest.raises(TypeError):
        lb.set_num_threads(True)
    lb.set_num_threads(3)
    assert lb.get_num_threads() == 3
    lb.set_num_threads(np.int64(2))
    assert lb.get_num_threads() == 2


def test_many_python_threads_share_one_layer(rng):
    w = rng.normal(size=(256, 512)).astype(np.float32)
    x = rng.normal(size=(32, 512)).astype(np.float32)
    layer = lb.Linear(w)
    expected = layer(x)
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(layer(x))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert len(results) == 160 and all(np.array_equal(r, expected) for r in results)


def _child(q):
    w = np.ones((64, 256), np.float32)
    q.put(float(lb.Linear(w)(np.ones((8, 256), np.float32)).sum()))


def test_pool_survives_fork(rng):
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    w = np.ones((64, 256), np.float32)
    expected = float(lb.Linear(w)(np.ones((8, 256), np.float32)).sum())  # pool started here
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    got = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0 and got == expected


def run_threads(n, work):
    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_16_threads_1000_calls_each_on_one_layer(rng):
    w = rng.normal(0, 0.02, (192, 256)).astype(np.float32)
    x = rng.normal(size=(16, 1, 256)).astype(np.float32)  # a different row per thread
    layers = [lb.Linear(w), lb.Linear(w, bits=4, group_size=32, symmetric=False),
              lb.Linear(w, bits=4, group_size=64, activations="float")]
    expected = [[layer(x[i]) for i in range(16)] for layer in layers]
    mismatches = []

    def work(i):
        for c in range(1000):
            j = c % len(layers)
            if not np.array_equal(layers[j](x[i]), expected[j][i]):
                mismatches.append((i, c))

    run_threads(16, work)
    assert not mismatches


def test_changing_the_thread_count_while_others_compute(rng, threads):
    w = rng.normal(0, 0.02, (512, 1024)).astype(np.float32)
    x = rng.normal(size=(64, 1024)).astype(np.float32)  # big enough for the pool
    layer = lb.Linear(w)
    expected = layer(x)
    mismatches = []

    def work(i):
        for c in range(40):
            if i == 0:
                lb.set_num_threads(1 + c % 3)
            elif not np.array_equal(layer(x), expected):
                mismatches.append((i, c))

    run_threads(5, work)
    assert not mismatches


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under AddressSanitizer freed memory waits in its quarantine (up to "
                           "256 MB): resident memory grows without a leak")
def test_100000_layer_calls_keep_memory_flat(rng):
    layer = lb.Linear(rng.normal(0, 0.02, (64, 128)).astype(np.float32), bits=4, group_size=32)
    x = rng.normal(size=(2, 128)).astype(np.float32)
    for _ in range(10000):  # warm: scratch buffers and allocator pools reach their size
        layer(x)
    before = rss_bytes()
    for _ in range(100000):
        layer(x)
    assert rss_bytes() - before < 4 << 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under AddressSanitizer freed memory waits in its quarantine")
@pytest.mark.parametrize("kind", ["w8a8", "w4a32", "w4a8 input_scale", "gemm_s8"])
def test_one_large_call_leaves_no_large_scratch_buffer(rng, kind):
    """The kernels' scratch buffers (activations quantized or padded, per-row scales) grow to
    the largest call and were kept for the thread's life: after one call on a 128 MB input, up
    to 128 MB more stayed resident. Now a call frees what exceeds a few MB as it returns. (A new
    thread for each case: the buffers are per thread.)"""
    k = 4096
    m = (128 << 20) // (4 * k)
    w = rng.normal(0, 0.02, (16, k)).astype(np.float32)
    if kind == "gemm_s8":
        b = np.ones((16, k), np.int8)
        x = np.ones((4 * m, k), np.int8)
        call = lambda x: lb.gemm_s8(x, b)  # noqa: E731
    else:
        if kind == "w8a8":
            qw = lb.quantize(w)
        else:
            qw = lb.quantize(w, bits=4, group_size=32,
                             input_scale=np.full(k, 0.5, np.float32) if "input" in kind else None)
        act = "float" if kind == "w4a32" else "int8"
        x = np.ones((m, k), np.float32)
        call = lambda x: lb.matmul(x, qw, activations=act)  # noqa: E731
    grown = []

    def measure(_):
        call(x[:64])  # warm: the pool and small buffers
        before = rss_bytes()
        call(x)
        grown.append(rss_bytes() - before)

    run_threads(1, measure)
    assert grown[0] < 16 << 20, f"{grown[0] / 2**20:.0f} MB more resident after the call"


BESIDE_OTHER_POOLS = """
import threading, numpy as np, lowbit as lb
use_torch = {torch}
if use_torch:
    import torch
    torch.set_num_threads(2)
lb.set_num_threads(2)
rng = np.random.default_rng(0)
w = rng.normal(size=(256, 512)).astype(np.float32)
layer = lb.Linear(w)
x = rng.normal(size=(64, 512)).astype(np.float32)
ref = layer(x)
a = rng.normal(size=(256, 256))
t = torch.from_numpy(a) if use_torch else None
def work():
    for _ in range(150):
        a @ a                                  # numpy's BLAS threads
        if use_torch:
            t @ t                              # PyTorch's OpenMP threads
        assert np.array_equal(layer(x), ref)   # lowbit's pool, in between and at once
threads = [threading.Thread(target=work) for _ in range(3)]
for th in threads: th.start()
work()
for th in threads: th.join()
print("ok")
"""


@pytest.mark.parametrize("with_torch", [False, True])
def test_no_deadlock_beside_blas_and_openmp_pools(with_torch):
    """lowbit's pool used in turn and at once with numpy's BLAS threads and PyTorch's OpenMP
    threads, from several Python threads: same results, no deadlock (a child process with a
    timeout: a hang fails the test instead of the suite)."""
    if with_torch:
        pytest.importorskip("torch")
    r = run_python(BESIDE_OTHER_POOLS.format(torch=with_torch), OMP_NUM_THREADS="2",
                   OPENBLAS_NUM_THREADS="2")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_a_finalizer_at_exit_may_call_lowbit():
    """A __del__ run by interpreter shutdown (on the main thread, which is finalizing) calls a
    layer: it gets the GIL back and finishes (it used to be parked like a daemon thread: a hang)."""
    code = """
import numpy as np, lowbit as lb
layer = lb.Linear(np.ones((64, 64), np.float32))
class AtExit:
    def __del__(self):
        print(float(layer(np.ones((1, 64), np.float32))[0, 0]))
keep = AtExit()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "64.0", (r.returncode, r.stdout, r.stderr)


def test_interpreter_exits_while_threads_still_compute():
    """Interpreter shutdown with lowbit calls still running in daemon threads: a clean exit.
    (On Python 3.12 and 3.13 a thread waiting for the GIL when finalization began was unwound
    through the binding and freed its output array with no thread state: a segfault in about one
    exit in four, hence the ten runs.)"""
    code = """
import threading, numpy as np, lowbit as lb
layer = lb.Linear(np.ones((512, 512), np.float32))
x = np.ones((128, 512), np.float32)
def spin():
    while True:
        layer(x)
for _ in range(4):
    threading.Thread(target=spin, daemon=True).start()
layer(x)
print("bye")
"""
    for _ in range(10):
        r = run_python(code)
        assert r.returncode == 0 and r.stdout.strip() == "bye", (r.returncode, r.stderr)
