"""The raw kernels, for users who bring their own integers."""
import numpy as np

from . import _core


def _int_matrix(a, name, dtype):
    a = np.asarray(a)
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {a.shape}")
    return np.ascontiguousarray(a)


def gemm_s8(a, b) -> np.ndarray:
    """Exact ``a @ b.T`` in int32 for int8 ``a`` (M, K) and int8 ``b`` (N, K)."""
    a = _int_matrix(a, "a", np.int8)
    b = _int_matrix(b, "b", np.int8)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"gemm_s8: a is {a.shape} and b is {b.shape}; expected the same K")
    return _core.gemm_s8(a, b)


def pack_int4(q) -> np.ndarray:
    """Pack integers 0..15 of shape (N, K), K even, into uint8 (N, K // 2): element 2i in the
    low nibble, 2i+1 in the high."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu":
        raise TypeError(f"pack_int4: expected integers 0..15, got dtype {q.dtype}")
    if q.ndim != 2:
        raise ValueError(f"pack_int4: expected a 2-D array, got shape {q.shape}")
    if q.dtype != np.uint8:
        if q.size and (q.min() < 0 or q.max() > 15):
            bad = np.argwhere((q < 0) | (q > 15))[0]
            raise ValueError(f"pack_int4: values must be in 0..15, got {q[tuple(bad)]} at {tuple(bad)}")
        q = q.astype(np.uint8)
    return _core.pack_int4(np.ascontiguousarray(q))


def unpack_int4(p) -> np.ndarray:
    """Inverse of :func:`pack_int4`: uint8 (N, K // 2) to uint8 (N, K) values 0..15."""
    return _core.unpack_int4(_int_matrix(p, "p", np.uint8))
