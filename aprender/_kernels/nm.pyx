"""N:M selection: keep the N largest keys of every group of M consecutive elements along an axis.

The array is seen as (outer, L, inner) with the grouped axis in the middle (inner == 1 when it is
the last axis).  Within a group, element t outranks element u when key_t > key_u, or when the
keys are equal and t > u: ties prune the lowest index first.  An element is kept when fewer than
N elements outrank it.  M == 4 has a branch-free fast path; other M use an O(M^2) rank count on a
per-thread scratch of M keys.
"""
from libc.stdint cimport uint8_t, uint16_t, uint64_t, int64_t
from cython.parallel cimport prange, threadid

import numpy as np

from ._common cimport real_t, key_of, inf_keys

cdef enum:
    PARALLEL_MIN = 32768


cdef inline Py_ssize_t _group4(const real_t* x, Py_ssize_t st, int n, int magnitude, uint64_t khi,
                               uint64_t klo, uint8_t* out) noexcept nogil:
    cdef uint64_t k0 = key_of(x[0], magnitude), k1 = key_of(x[st], magnitude)
    cdef uint64_t k2 = key_of(x[2 * st], magnitude), k3 = key_of(x[3 * st], magnitude)
    cdef int r0 = (k1 >= k0) + (k2 >= k0) + (k3 >= k0)
    cdef int r1 = (k0 > k1) + (k2 >= k1) + (k3 >= k1)
    cdef int r2 = (k0 > k2) + (k1 > k2) + (k3 >= k2)
    cdef int r3 = (k0 > k3) + (k1 > k3) + (k2 > k3)
    out[0] = r0 < n
    out[st] = r1 < n
    out[2 * st] = r2 < n
    out[3 * st] = r3 < n
    return (((k0 >= khi) | (k0 <= klo)) + ((k1 >= khi) | (k1 <= klo))
            + ((k2 >= khi) | (k2 <= klo)) + ((k3 >= khi) | (k3 <= klo)))


cdef inline Py_ssize_t _group(const real_t* x, Py_ssize_t st, int n, int m, int magnitude,
                              uint64_t khi, uint64_t klo, uint64_t* keys,
                              uint8_t* out) noexcept nogil:
    cdef int t, u, rank
    cdef Py_ssize_t bad = 0
    cdef uint64_t kt
    for t in range(m):
        keys[t] = key_of(x[t * st], magnitude)
        bad += (keys[t] >= khi) | (keys[t] <= klo)
    for t in range(m):
        kt = keys[t]
        rank = 0
        for u in range(t):
            rank += keys[u] > kt
        for u in range(t + 1, m):
            rank += keys[u] >= kt
        out[t * st] = rank < n
    return bad


def nm_mask(const real_t[::1] x, Py_ssize_t outer, Py_ssize_t length, Py_ssize_t inner, int n,
            int m, int magnitude, uint16_t inf16, uint8_t[::1] out, int n_threads):
    """Write the N:M keep-mask of x (flat C-order view of an (outer, length, inner) array).
    Returns the number of non-finite values seen."""
    cdef Py_ssize_t size = x.shape[0], groups = length // m, g, o, i, base, bad = 0, ng
    cdef int nt = n_threads if size >= PARALLEL_MIN and n_threads > 1 else 1
    cdef uint64_t khi, klo
    cdef uint64_t[::1] scratch = np.empty(max(nt, 1) * m, dtype=np.uint64)
    cdef int64_t[::1] bads
    if size == 0:
        return 0
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    ng = outer * groups
    bads = np.zeros(ng, dtype=np.int64)
    with nogil:
        if inner == 1 and m == 4:
            for g in prange(ng, schedule="static", num_threads=nt):
                bads[g] = _group4(&x[g * 4], 1, n, magnitude, khi, klo, &out[g * 4])
        elif inner == 1:
            for g in prange(ng, schedule="static", num_threads=nt):
                bads[g] = _group(&x[g * m], 1, n, m, magnitude, khi, klo,
                                 &scratch[threadid() * m], &out[g * m])
        else:
            for g in prange(ng, schedule="static", num_threads=nt):
                o = g // groups
                base = o * length * inner + (g % groups) * m * inner
                bads[g] = 0
                for i in range(inner):
                    if m == 4:
                        bads[g] += _group4(&x[base + i], inner, n, magnitude, khi, klo,
                                           &out[base + i])
                    else:
                        bads[g] += _group(&x[base + i], inner, n, m, magnitude, khi, klo,
                                          &scratch[threadid() * m], &out[base + i])
        for g in range(ng):
            bad += bads[g]
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
