"""N:M selection: keep the N largest keys of every group of M consecutive elements along an axis.

The array is seen as (outer, L, inner) with the grouped axis in the middle (inner == 1 when it is
the last axis).  Within a group, element t outranks element u when key_t > key_u, or when the
keys are equal and t > u: ties prune the lowest index first.  An element is kept when fewer than
N elements outrank it.  The loops live in apr_nm.h: a branch-free path for M == 4 on the last
axis, an O(M^2) rank count for other M, and for inner > 1 a rank count vectorised across the
inner axis in tiles.  Parallel over groups (last axis) or group-rows (other axes).  No heap
scratch: the per-group keys and rank counts live on the stack (M <= 1024).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from cython.parallel cimport prange

import numpy as np

from ._common cimport real_t, inf_keys
from ._openmp cimport threads_for
from ._guard import guard
from ..errors import InvalidArgumentError, InvalidShapeError, ShapeMismatchError

cdef enum:
    GROUP_CHUNK = 4096      # groups per parallel task on the last axis
    MAX_M = 1024            # APR_NM_MAX_M in apr_nm.h: the stack holds one group's keys


cdef extern from "apr_nm.h" nogil:
    void apr_nm_init()
    int apr_nm_simd(int on)
    Py_ssize_t apr_nm4_fast32(const uint32_t* x, Py_ssize_t g0, Py_ssize_t g1, int n,
                              int magnitude, uint32_t khi, uint32_t klo, uint8_t* out)
    Py_ssize_t apr_nm4_16(const uint16_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int magnitude,
                          uint16_t khi, uint16_t klo, uint8_t* out)
    Py_ssize_t apr_nm4_32(const uint32_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int magnitude,
                          uint32_t khi, uint32_t klo, uint8_t* out)
    Py_ssize_t apr_nm4_64(const uint64_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int magnitude,
                          uint64_t khi, uint64_t klo, uint8_t* out)
    Py_ssize_t apr_nm_16(const uint16_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int m,
                         int magnitude, uint16_t khi, uint16_t klo, uint8_t* out)
    Py_ssize_t apr_nm_32(const uint32_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int m,
                         int magnitude, uint32_t khi, uint32_t klo, uint8_t* out)
    Py_ssize_t apr_nm_64(const uint64_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int m,
                         int magnitude, uint64_t khi, uint64_t klo, uint8_t* out)
    Py_ssize_t apr_nm_cols_16(const uint16_t* x, Py_ssize_t inner, int n, int m, int magnitude,
                              uint16_t khi, uint16_t klo, uint8_t* out)
    Py_ssize_t apr_nm_cols_32(const uint32_t* x, Py_ssize_t inner, int n, int m, int magnitude,
                              uint32_t khi, uint32_t klo, uint8_t* out)
    Py_ssize_t apr_nm_cols_64(const uint64_t* x, Py_ssize_t inner, int n, int m, int magnitude,
                              uint64_t khi, uint64_t klo, uint8_t* out)


apr_nm_init()  # the AVX2 N:4 kernel's CPU check, before any thread runs


def simd(on=None):
    """Whether N:4 along the last axis runs the AVX2 kernel (32-bit keys); on=False switches to
    the scalar kernel (same masks), on=True back where the CPU has it.  For tests and
    benchmarks."""
    return bool(apr_nm_simd(-1 if on is None else (1 if on else 0)))


cdef inline Py_ssize_t _groups(const real_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int m,
                               int magnitude, uint64_t khi, uint64_t klo,
                               uint8_t* out) noexcept nogil:
    if m == 4:
        if real_t is float:
            return apr_nm4_fast32(<const uint32_t*>x, g0, g1, n, magnitude, <uint32_t>khi,
                                  <uint32_t>klo, out)
        elif real_t is double:
            return apr_nm4_64(<const uint64_t*>x, g0, g1, n, magnitude, khi, klo, out)
        else:
            return apr_nm4_16(x, g0, g1, n, magnitude, <uint16_t>khi, <uint16_t>klo, out)
    if real_t is float:
        return apr_nm_32(<const uint32_t*>x, g0, g1, n, m, magnitude, <uint32_t>khi,
                         <uint32_t>klo, out)
    elif real_t is double:
        return apr_nm_64(<const uint64_t*>x, g0, g1, n, m, magnitude, khi, klo, out)
    else:
        return apr_nm_16(x, g0, g1, n, m, magnitude, <uint16_t>khi, <uint16_t>klo, out)


cdef inline Py_ssize_t _cols(const real_t* x, Py_ssize_t inner, int n, int m, int magnitude,
                             uint64_t khi, uint64_t klo, uint8_t* out) noexcept nogil:
    if real_t is float:
        return apr_nm_cols_32(<const uint32_t*>x, inner, n, m, magnitude, <uint32_t>khi,
                              <uint32_t>klo, out)
    elif real_t is double:
        return apr_nm_cols_64(<const uint64_t*>x, inner, n, m, magnitude, khi, klo, out)
    else:
        return apr_nm_cols_16(x, inner, n, m, magnitude, <uint16_t>khi, <uint16_t>klo, out)


cdef _check_layout(Py_ssize_t size, Py_ssize_t outer, Py_ssize_t length, Py_ssize_t inner,
                   int n, int m, str what):
    """The (outer, length, inner) view must cover the flat buffer exactly, length must hold
    whole groups of m, and 1 <= n <= m <= MAX_M."""
    if not 1 <= m <= MAX_M:
        raise InvalidArgumentError(f"M must be in [1, {MAX_M}], got {m}")
    if not 1 <= n <= m:
        raise InvalidArgumentError(f"N must be in [1, M={m}], got {n}")
    if outer < 0 or length < 0 or inner < 0:
        raise InvalidShapeError(f"view (outer={outer}, length={length}, inner={inner}) needs "
                                "sizes >= 0")
    if length % m:
        raise InvalidShapeError(f"length {length} is not a multiple of M={m}")
    if <object>outer * length * inner != size:  # Python ints: no overflow
        raise ShapeMismatchError(f"{what} holds {size} elements, the view (outer={outer}, "
                                 f"length={length}, inner={inner}) {outer * length * inner}")


def nm_mask(const real_t[::1] x not None, Py_ssize_t outer, Py_ssize_t length,
            Py_ssize_t inner, int n, int m, int magnitude, uint16_t inf16,
            uint8_t[::1] out not None, int n_threads):
    """Write the N:M keep-mask of x (flat C-order view of an (outer, length, inner) array).
    Returns the number of non-finite values seen."""
    cdef Py_ssize_t size = x.shape[0], groups, ng, c, nch, g, t, o, base, bad = 0, b_t, g0, g1
    cdef int nt = 1
    cdef uint64_t khi, klo
    cdef int64_t[::1] bads
    _check_layout(size, outer, length, inner, n, m, "x")
    if out.shape[0] != size:
        raise ShapeMismatchError(f"out holds {out.shape[0]} elements, x {size}")
    if size == 0:
        return 0
    groups = length // m
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    if inner == 1:
        ng = size // m
        nch = (ng + GROUP_CHUNK - 1) // GROUP_CHUNK
        nt = threads_for(n_threads, size, nch)
        bads = np.zeros(nch, dtype=np.int64)
        with nogil:
            for c in prange(nch, schedule="static", num_threads=nt):
                bads[c] = _groups(&x[0], c * GROUP_CHUNK, min(ng, (c + 1) * GROUP_CHUNK), n, m,
                                  magnitude, khi, klo, &out[0])
    else:
        # one task per thread, each a run of group-rows (a result slot per task, not per row)
        ng = outer * groups
        nt = threads_for(n_threads, size, ng)
        bads = np.zeros(nt, dtype=np.int64)
        with nogil:
            for t in prange(nt, schedule="static", num_threads=nt):
                g0 = (t * ng) // nt
                g1 = ((t + 1) * ng) // nt
                b_t = 0
                for g in range(g0, g1):
                    o = g // groups
                    base = o * length * inner + (g % groups) * m * inner
                    b_t = b_t + _cols(&x[base], inner, n, m, magnitude, khi, klo, &out[base])
                bads[t] = b_t
    for c in range(bads.shape[0]):
        bad += bads[c]
    return bad


def nm_check(const uint8_t[::1] keep not None, Py_ssize_t outer, Py_ssize_t length,
             Py_ssize_t inner, int n, int m):
    """The number of groups that keep more than n of their m elements."""
    cdef Py_ssize_t groups, g, o, i, t, base, cnt, bad = 0
    _check_layout(keep.shape[0], outer, length, inner, n, m, "keep")
    groups = length // m
    with nogil:
        for o in range(outer):
            for g in range(groups):
                base = o * length * inner + g * m * inner
                for i in range(inner):
                    cnt = 0
                    for t in range(m):
                        cnt += keep[base + i + t * inner] != 0
                    if cnt > n:
                        bad += 1
    return bad


guard(globals(), ["nm_mask", "nm_check", "simd"])
