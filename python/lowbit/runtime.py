"""Which CPU kernels run, and on how many threads."""
import numbers
import os

from . import _core

# Whether the user chose lowbit's thread count (else lowbit.torch follows torch's).
_chosen_threads = bool(os.environ.get("LOWBIT_NUM_THREADS"))


def cpu_info() -> dict:
    """What the CPU offers and what lowbit uses.

    Keys: ``isa`` (the kernel set in use), ``available`` (kernel sets this CPU can run, best
    first), ``compiled`` (all kernel sets in this build), ``features`` (the CPU flags the sets
    need, as seen: cpuid on x86-64, the kernel's hwcaps ``asimd`` / ``asimddp`` / ``i8mm`` on
    aarch64), ``num_threads``, ``threads`` (whose threads run the kernels: ``"lowbit"``, its own
    pool, or the path of an OpenMP runtime, see ``use_openmp``).
    """
    return {
        "isa": _core.isa(),
        "available": _core.available_isas(),
        "compiled": _core.compiled_isas(),
        "features": _core.cpu_features(),
        "num_threads": _core.get_num_threads(),
        "threads": _core.openmp_runtime() or "lowbit",
    }


def use_openmp(path):
    """Run the kernels' parallel work on the threads of an OpenMP runtime already loaded in this
    process, ``path`` being its shared library (e.g. PyTorch's ``libgomp.so.1``: ``import
    lowbit.torch`` does this when torch's parallel backend is OpenMP), or, with ``None``, on
    lowbit's own pool. Two pools on the same cores take turns badly (each one's idle threads spin
    while the other one works); on one runtime they take turns well. Results do not depend on it.
    Returns the previous choice (a path or None). Raises ValueError when no runtime with the GNU
    OpenMP entry points is loaded from ``path`` (it is never loaded by this call). A process
    made by fork starts on lowbit's own pool (it cannot use its parent's OpenMP threads)."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"use_openmp: expected a path or None, got {type(path).__name__}")
    return _core.use_openmp(os.fspath(path) if path is not None else "") or None


def loaded_openmp(under=None):
    """Paths of the OpenMP runtimes (libgomp, libiomp5) loaded in this process (Linux: from
    /proc/self/maps), only those inside the folder ``under`` when given; [] elsewhere."""
    try:
        with open("/proc/self/maps") as f:
            fields = (line.split(None, 5) for line in f)
            paths = {x[5].strip() for x in fields if len(x) == 6}
    except OSError:
        return []
    names = ("libgomp", "libiomp5")
    found = sorted(p for p in paths if os.path.basename(p).startswith(names) and ".so" in p)
    if under is not None:
        root = os.path.realpath(under) + os.sep
        found = [p for p in found if os.path.realpath(p).startswith(root)]
    return found


MAX_THREADS = _core.MAX_THREADS


def get_num_threads() -> int:
    """Threads used by the kernels (default: the CPUs this process may run on, at most
    ``MAX_THREADS``, or ``LOWBIT_NUM_THREADS``: a whole number in 1..MAX_THREADS, anything else
    fails at ``import lowbit``)."""
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for the kernels, 1 <= n <= ``MAX_THREADS`` (1024: each is an OS thread;
    beyond that a count is a mistake, not a machine). Results do not depend on it."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads: expected an int, got {type(n).__name__}")
    global _chosen_threads
    _core.set_num_threads(int(n))
    _chosen_threads = True


class use_isa:
    """Force a kernel set (x86-64: ``"ref"``, ``"avx2"``, ``"avxvnni"``, ``"avx512vnni"``,
    ``"amx"``; aarch64: ``"ref"``, ``"neon"``, ``"dotprod"``, ``"i8mm"``) on the calling thread,
    for its calls and the work they hand to lowbit's pool; other threads keep theirs (the
    process's: the best available, or ``LOWBIT_ISA``).

    As a context manager it restores the thread's previous choice on exit, so blocks nest, and
    threads entering and leaving blocks in any interleaving never change each other's kernels.
    Called bare it switches the calling thread until it switches again. A name this CPU cannot
    run raises ``ValueError`` listing the available ones.
    """

    def __init__(self, name: str):
        if not isinstance(name, str):
            raise TypeError(f"use_isa: expected an ISA name (str), got {type(name).__name__}")
        if not name:  # "" would mean "the process's choice" to set_thread_isa
            raise ValueError(f"unknown ISA ''; available on this CPU: "
                             f"{', '.join(_core.available_isas())}")
        self._name = name
        self._previous = [_core.set_thread_isa(name)]  # one entry per block open on the object
        self._switched = True  # by the call itself: the first block's switch

    def __enter__(self):
        if self._switched:
            self._switched = False
        else:  # the object entered again (reused, or nested): switch again
            self._previous.append(_core.set_thread_isa(self._name))
        return self

    def __exit__(self, *exc):
        _core.set_thread_isa(self._previous.pop())
        return False
