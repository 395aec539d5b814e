"""N:M selection: keep the N largest keys of every group of M consecutive elements along an axis.

The array is seen as (outer, L, inner) with the grouped axis in the middle (inner == 1 when it is
the last axis).  Within a group, element t outranks element u when key_t > key_u, or when the
keys are equal and t > u: ties prune the lowest index first.  An element is kept when fewer than
N elements outrank it.  The loops live in apr_keys.h: a branch-free path for M == 4 on the last
axis, an O(M^2) rank count for other M, and for inner > 1 a rank count vectorised across the
inner axis.  Parallel over groups (last axis) or group-rows (other axes).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, int16_t, int32_t
from cython.parallel cimport prange, threadid

import numpy as np

from ._common cimport real_t, inf_keys
from ._openmp cimport threads_for

cdef enum:
    GROUP_CHUNK = 4096      # groups per parallel task on the last axis


cdef extern from "apr_keys.h" nogil:
    Py_ssize_t apr_nm4_16(const uint16_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int magnitude,
                          uint16_t khi, uint16_t klo, uint8_t* out)
    Py_ssize_t apr_nm4_32(const uint32_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int magnitude,
                          uint32_t khi, uint32_t klo, uint8_t* out)
    Py_ssize_t apr_nm4_64(const uint64_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int magnitude,
                          uint64_t khi, uint64_t klo, uint8_t* out)
    Py_ssize_t apr_nm_16(const uint16_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int m,
                         int magnitude, uint16_t khi, uint16_t klo, int16_t* keys, uint8_t* out)
    Py_ssize_t apr_nm_32(const uint32_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int m,
                         int magnitude, uint32_t khi, uint32_t klo, int32_t* keys, uint8_t* out)
    Py_ssize_t apr_nm_64(const uint64_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int m,
                         int magnitude, uint64_t khi, uint64_t klo, int64_t* keys, uint8_t* out)
    Py_ssize_t apr_nm_cols_16(const uint16_t* x, Py_ssize_t inner, int n, int m, int magnitude,
                              uint16_t khi, uint16_t klo, int32_t* rank, uint8_t* out)
    Py_ssize_t apr_nm_cols_32(const uint32_t* x, Py_ssize_t inner, int n, int m, int magnitude,
                              uint32_t khi, uint32_t klo, int32_t* rank, uint8_t* out)
    Py_ssize_t apr_nm_cols_64(const uint64_t* x, Py_ssize_t inner, int n, int m, int magnitude,
                              uint64_t khi, uint64_t klo, int32_t* rank, uint8_t* out)


cdef inline Py_ssize_t _groups(const real_t* x, Py_ssize_t g0, Py_ssize_t g1, int n, int m,
                               int magnitude, uint64_t khi, uint64_t klo, uint64_t* scratch,
                               uint8_t* out) noexcept nogil:
    if m == 4:
        if real_t is float:
            return apr_nm4_32(<const uint32_t*>x, g0, g1, n, magnitude, <uint32_t>khi,
                              <uint32_t>klo, out)
        elif real_t is double:
            return apr_nm4_64(<const uint64_t*>x, g0, g1, n, magnitude, khi, klo, out)
        else:
            return apr_nm4_16(x, g0, g1, n, magnitude, <uint16_t>khi, <uint16_t>klo, out)
    if real_t is float:
        return apr_nm_32(<const uint32_t*>x, g0, g1, n, m, magnitude, <uint32_t>khi,
                         <uint32_t>klo, <int32_t*>scratch, out)
    elif real_t is double:
        return apr_nm_64(<const uint64_t*>x, g0, g1, n, m, magnitude, khi, klo,
                         <int64_t*>scratch, out)
    else:
        return apr_nm_16(x, g0, g1, n, m, magnitude, <uint16_t>khi, <uint16_t>klo,
                         <int16_t*>scratch, out)


cdef inline Py_ssize_t _cols(const real_t* x, Py_ssize_t inner, int n, int m, int magnitude,
                             uint64_t khi, uint64_t klo, int32_t* rank,
                             uint8_t* out) noexcept nogil:
    if real_t is float:
        return apr_nm_cols_32(<const uint32_t*>x, inner, n, m, magnitude, <uint32_t>khi,
                              <uint32_t>klo, rank, out)
    elif real_t is double:
        return apr_nm_cols_64(<const uint64_t*>x, inner, n, m, magnitude, khi, klo, rank, out)
    else:
        return apr_nm_cols_16(x, inner, n, m, magnitude, <uint16_t>khi, <uint16_t>klo, rank, out)


def nm_mask(const real_t[::1] x, Py_ssize_t outer, Py_ssize_t length, Py_ssize_t inner, int n,
            int m, int magnitude, uint16_t inf16, uint8_t[::1] out, int n_threads):
    """Write the N:M keep-mask of x (flat C-order view of an (outer, length, inner) array).
    Returns the number of non-finite values seen."""
    cdef Py_ssize_t size = x.shape[0], groups = length // m, ng, c, nch, g, o, base, bad = 0
    cdef int nt = 1
    cdef uint64_t khi, klo
    cdef uint64_t[::1] scratch
    cdef int32_t[::1] ranks
    cdef int64_t[::1] bads
    if size == 0:
        return 0
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    if inner == 1:
        ng = size // m
        nch = (ng + GROUP_CHUNK - 1) // GROUP_CHUNK
        nt = threads_for(n_threads, size, nch)
        scratch = np.empty(max(nt, 1) * m, dtype=np.uint64)
        bads = np.zeros(nch, dtype=np.int64)
        with nogil:
            for c in prange(nch, schedule="static", num_threads=nt):
                bads[c] = _groups(&x[0], c * GROUP_CHUNK, min(ng, (c + 1) * GROUP_CHUNK), n, m,
                                  magnitude, khi, klo, &scratch[threadid() * m], &out[0])
    else:
        ng = outer * groups
        nt = threads_for(n_threads, size, ng)
        ranks = np.empty(max(nt, 1) * inner, dtype=np.int32)
        bads = np.zeros(ng, dtype=np.int64)
        with nogil:
            for g in prange(ng, schedule="static", num_threads=nt):
                o = g // groups
                base = o * length * inner + (g % groups) * m * inner
                bads[g] = _cols(&x[base], inner, n, m, magnitude, khi, klo,
                                &ranks[threadid() * inner], &out[base])
    for c in range(bads.shape[0]):
        bad += bads[c]
    return bad


def nm_check(const uint8_t[::1] keep, Py_ssize_t outer, Py_ssize_t length, Py_ssize_t inner,
             int n, int m, int exact):
    """Count groups that break N:M: more than n kept (exact=0) or not exactly n kept (exact=1).
    Returns (bad_groups, first_bad_group_flat_index or -1)."""
    cdef Py_ssize_t groups = length // m, g, o, i, t, base, cnt, bad = 0, first = -1
    with nogil:
        for o in range(outer):
            for g in range(groups):
                base = o * length * inner + g * m * inner
                for i in range(inner):
                    cnt = 0
                    for t in range(m):
                        cnt += keep[base + i + t * inner] != 0
                    if cnt > n or (exact and cnt != n):
                        bad += 1
                        if first < 0:
                            first = (o * groups + g) * inner + i
    return bad, first
