"""Which CPU kernels run, and on how many threads."""
import os

from . import _core

# Whether the user chose lowbit's thread count (else lowbit.torch follows torch's).
_chosen_threads = bool(os.environ.get("LOWBIT_NUM_THREADS"))


def cpu_info() -> dict:
    """What the CPU offers and what lowbit uses.

    Keys: ``isa`` (the kernel set in use), ``available`` (kernel sets this CPU can run, best
    first), ``compiled`` (all kernel sets in this build), ``features`` (CPU flags seen),
    ``num_threads``.
    """
    return {
        "isa": _core.isa(),
        "available": _core.available_isas(),
        "compiled": _core.compiled_isas(),
        "features": _core.cpu_features(),
        "num_threads": _core.get_num_threads(),
    }


def get_num_threads() -> int:
    """Threads used by the kernels (default: the CPUs this process may run on, or
    ``LOWBIT_NUM_THREADS``)."""
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for the kernels. Results do not depend on it."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: expected an int, got {type(n).__name__}")
    global _chosen_threads
    _core.set_num_threads(n)
    _chosen_threads = True


class use_isa:
    """Force a kernel set (``"ref"``, ``"avx2"``, ``"avxvnni"``, ``"avx512vnni"``).

    As a context manager it restores the previous one on exit; called bare it switches for the
    rest of the process (as ``LOWBIT_ISA`` does for a whole process). A name this CPU cannot run
    raises ``ValueError`` listing the available ones.
    """

    def __init__(self, name: str):
        if not isinstance(name, str):
            raise TypeError(f"use_isa: expected an ISA name (str), got {type(name).__name__}")
        self._previous = _core.isa()
        _core.set_isa(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _core.set_isa(self._previous)
        return False
