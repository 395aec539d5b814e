"""SparseGPT kernels (Frantar & Alistarh 2023): the Hessian checks and preparation around the
LAPACK factorisation, and the per-column loop that prunes a block of columns and propagates
each pruned weight's error to the block's remaining columns.

check_hessian
    the first problem of a Hessian, in row-major order: a NaN/infinity (1), a negative
    diagonal entry (3), or an asymmetric pair ``|h[i, j] - h[j, i]| > rtol * sqrt(h[i, i] *
    h[j, j])`` (2); compared tile by tile so both tiles stay in cache.
load_reversed
    ``out[n-1-i, n-1-j] = h[i, j]`` in float64, a dead input (``h[i, i] == 0``) getting 1 on
    the diagonal, and ``damp`` added to every diagonal entry.  Factorising the reversed matrix
    ``P H P = L Lᵀ`` gives the upper Cholesky factor of ``H⁻¹`` as ``P L⁻¹ P`` (one potrf and
    one trtri, half the work of inverting H and factorising again).
reverse_narrow
    reverses a flat float64 buffer in place and, on request, rounds it to float32 into the
    first half of the same bytes (no second n x n buffer).
saliency
    ``out[r, j] = w[r, c0 + j]² / u[c0 + j, c0 + j]²``: the mask criterion of a block.
prune_block
    the per-column loop over columns [c0, c1) of every row (rows are independent; one task per
    row, no GIL): N:M groups are chosen from the current weights as the loop reaches them
    (``m > 0``), otherwise the keep flags come from ``block_keep``; a pruned weight becomes
    +0.0, its error ``w / u[c, c]`` is stored in ``err`` and subtracted, times row c of ``u``,
    from the block's later columns.
narrow16
    float32 -> IEEE half or bfloat16 bit patterns, round to nearest even.

Every def checks the sizes of its buffers (typed errors): nothing reachable from Python reads
or writes out of bounds.
"""
from libc.stdint cimport uint8_t, uint16_t
from libc.math cimport sqrt, fabs
from libc.string cimport memcpy
from cython.parallel cimport prange

import numpy as np

from ._openmp cimport threads_for
from ._common cimport (APR_FMT_F16, APR_FMT_BF16, apr_nonfinite32, apr_nonfinite64,
                       apr_f32_to_bf16, apr_f32_to_f16)
from ._guard import guard
from ..errors import InvalidArgumentError, ShapeMismatchError

ctypedef fused hreal:
    float
    double

ctypedef fused wreal:
    float
    double

cdef enum:
    TILE = 64
    MAX_M = 256


cdef bint _has_forced(const uint8_t[:, ::1] forced, Py_ssize_t rows, Py_ssize_t cols,
                      str who) except -1:
    """Whether a forced-prune mask is given (0 x 0: none); raises if its shape is wrong."""
    if forced.shape[0] == 0 and forced.shape[1] == 0:
        return False
    if forced.shape[0] != rows or forced.shape[1] != cols:
        raise ShapeMismatchError(f"{who}: forced has shape ({forced.shape[0]}, "
                                 f"{forced.shape[1]}), expected ({rows}, {cols}) or (0, 0)")
    return True


cdef inline int _nonfinite(double v) noexcept nogil:
    return apr_nonfinite64(v)


def check_hessian(const hreal[:, ::1] h not None, double rtol, int n_threads):
    """(code, i, j) of the first problem of the square matrix h in row-major order of the
    tile rows (0, -1, -1 when there is none): 1 a non-finite entry, 2 an asymmetric pair,
    3 a negative diagonal entry."""
    cdef Py_ssize_t n = h.shape[0], nb, bi, bj, i, j, i0, i1, j0, j1
    cdef int nt
    cdef double a, b, tol
    cdef Py_ssize_t[:, ::1] first
    if h.shape[1] != n:
        raise ShapeMismatchError(f"the Hessian must be square, got shape ({n}, {h.shape[1]})")
    if n == 0:
        return 0, -1, -1
    nb = (n + TILE - 1) // TILE
    first = np.full((nb, 3), -1, dtype=np.intp)  # per tile row: code, i, j
    nt = threads_for(n_threads, n * n, nb)
    with nogil:
        for bi in prange(nb, schedule="static", num_threads=nt):
            i0 = bi * TILE
            i1 = min(n, i0 + TILE)
            for i in range(i0, i1):
                if first[bi, 0] >= 0:
                    break
                for j in range(n):
                    if _nonfinite(h[i, j]):
                        first[bi, 0] = 1
                        first[bi, 1] = i
                        first[bi, 2] = j
                        break
                if first[bi, 0] < 0 and h[i, i] < 0:
                    first[bi, 0] = 3
                    first[bi, 1] = i
                    first[bi, 2] = i
            if first[bi, 0] >= 0:
                continue
            for bj in range(bi, nb):
                j0 = bj * TILE
                j1 = min(n, j0 + TILE)
                for i in range(i0, i1):
                    for j in range(j0 if j0 > i else i + 1, j1):
                        a = h[i, j]
                        b = h[j, i]
                        tol = rtol * sqrt(fabs(<double>h[i, i])) * sqrt(fabs(<double>h[j, j]))
                        if fabs(a - b) > tol and first[bi, 0] < 0:
                            first[bi, 0] = 2
                            first[bi, 1] = i
                            first[bi, 2] = j
    for bi in range(nb):
        if first[bi, 0] >= 0:
            return int(first[bi, 0]), int(first[bi, 1]), int(first[bi, 2])
    return 0, -1, -1


def load_reversed(const hreal[:, ::1] h not None, double[:, ::1] out not None, double damp,
                  double scale, int n_threads):
    """out[n-1-i, n-1-j] = scale * h[i, j] (float64); diagonal: scale * (1 where h[i, i] == 0,
    else h[i, i], plus damp).  SparseGPT is invariant to the scale of H: a scale that brings
    the mean diagonal to 1 keeps U, and the saliencies w² / U[j, j]², inside float32's range
    whatever the units of the activations."""
    cdef Py_ssize_t n = h.shape[0], a, b
    cdef int nt
    cdef double d
    if h.shape[1] != n or out.shape[0] != n or out.shape[1] != n:
        raise ShapeMismatchError(f"load_reversed needs a square Hessian and an output of the "
                                 f"same shape, got ({h.shape[0]}, {h.shape[1]}) and "
                                 f"({out.shape[0]}, {out.shape[1]})")
    nt = threads_for(n_threads, n * n, n)
    with nogil:
        for a in prange(n, schedule="static", num_threads=nt):
            for b in range(n):
                out[a, b] = scale * h[n - 1 - a, n - 1 - b]
            d = h[n - 1 - a, n - 1 - a]
            out[a, a] = scale * ((1.0 if d == 0 else d) + damp)


def reverse_narrow(double[::1] buf not None, Py_ssize_t count, bint narrow, int n_threads):
    """Reverse buf[:count] in place; with narrow, then round it to float32 into the first
    4 * count bytes (in order, so no value is overwritten before it is read).  Returns the
    number of non-finite values."""
    cdef Py_ssize_t k, half, bad = 0
    cdef double t
    cdef float f
    cdef char* dst
    cdef int nt
    if count < 0 or count > buf.shape[0]:
        raise InvalidArgumentError(f"count {count} is outside the buffer of {buf.shape[0]} "
                                   "values")
    if count == 0:
        return 0
    half = count // 2
    nt = threads_for(n_threads, count, count)
    with nogil:
        for k in prange(half, schedule="static", num_threads=nt):
            t = buf[k]
            buf[k] = buf[count - 1 - k]
            buf[count - 1 - k] = t
        if narrow:
            # float k lands in the bytes of double k // 2, already read; memcpy keeps the
            # compiler from assuming the float stores and double loads do not alias
            dst = <char*>&buf[0]
            for k in range(count):
                t = buf[k]
                f = <float>t
                memcpy(dst + 4 * k, &f, 4)
                bad += apr_nonfinite32(f)
        else:
            for k in range(count):
                bad += _nonfinite(buf[k])
    return int(bad)


def saliency(const wreal[:, ::1] w not None, Py_ssize_t c0, Py_ssize_t c1,
             const wreal[:, ::1] u not None, wreal[:, ::1] out not None,
             const uint8_t[:, ::1] forced not None, int n_threads):
    """out[r, j] = w[r, c0 + j]**2 / u[c0 + j, c0 + j]**2 for j < c1 - c0; -1 (below every
    saliency) where ``forced`` (the weights' shape, or 0 x 0 for none) marks a weight that must
    be pruned."""
    cdef Py_ssize_t rows = w.shape[0], cols = w.shape[1], r, j, width = c1 - c0
    cdef wreal d, v
    cdef int nt
    cdef bint has_forced
    if not (0 <= c0 <= c1 <= cols) or u.shape[0] != cols or u.shape[1] != cols:
        raise ShapeMismatchError(f"saliency: columns [{c0}, {c1}) of weights with {cols} "
                                 f"columns and a factor of shape ({u.shape[0]}, {u.shape[1]})")
    if out.shape[0] != rows or out.shape[1] != width:
        raise ShapeMismatchError(f"saliency: out has shape ({out.shape[0]}, {out.shape[1]}), "
                                 f"expected ({rows}, {width})")
    has_forced = _has_forced(forced, rows, cols, "saliency")
    nt = threads_for(n_threads, rows * width, rows)
    with nogil:
        for r in prange(rows, schedule="static", num_threads=nt):
            for j in range(width):
                d = u[c0 + j, c0 + j]
                v = w[r, c0 + j]
                out[r, j] = (v * v) / (d * d)
                if has_forced and forced[r, c0 + j]:
                    out[r, j] = -1
    return None


cdef void _row(wreal* w, wreal* e, uint8_t* kp, const uint8_t* bk, const uint8_t* fc,
               const wreal* u, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t c1, int nkeep,
               int m) noexcept nogil:
    cdef Py_ssize_t c, j, k, q, cnt
    cdef wreal d, x, err, s
    cdef wreal sal[MAX_M]
    cdef const wreal* urow
    for c in range(c0, c1):
        if m > 0:
            if (c - c0) % m == 0:
                for k in range(m):
                    d = u[(c + k) * n + c + k]
                    x = w[c + k]
                    sal[k] = (x * x) / (d * d)
                    if fc != NULL and fc[c + k]:
                        sal[k] = -1
                for k in range(m):
                    cnt = 0
                    s = sal[k]
                    for q in range(m):
                        cnt = cnt + (sal[q] < s or (sal[q] == s and q < k))
                    kp[c + k] = cnt >= m - nkeep
        else:
            kp[c] = bk[c - c0] != 0
        if fc != NULL and fc[c]:
            kp[c] = 0  # forced: pruned even beyond the block's or group's share
        if kp[c]:
            e[c] = 0
            continue
        urow = u + c * n
        err = w[c] / urow[c]
        e[c] = err
        w[c] = 0
        for j in range(c + 1, c1):
            w[j] = w[j] - err * urow[j]


def prune_block(wreal[:, ::1] w not None, wreal[:, ::1] err not None,
                const wreal[:, ::1] u not None, Py_ssize_t c0, Py_ssize_t c1,
                const uint8_t[:, ::1] block_keep not None, int nkeep, int m,
                const uint8_t[:, ::1] forced not None, uint8_t[:, ::1] keep not None,
                int n_threads):
    """The per-column loop over columns [c0, c1) of every row of w (see the module text);
    ``forced`` (the weights' shape, or 0 x 0) marks weights that are pruned whatever the
    selection (N:M ranks them first)."""
    cdef Py_ssize_t rows = w.shape[0], cols = w.shape[1], r, width = c1 - c0
    cdef int nt
    cdef bint has_forced
    if not (0 <= c0 <= c1 <= cols):
        raise ShapeMismatchError(f"prune_block: columns [{c0}, {c1}) of {cols}")
    if u.shape[0] != cols or u.shape[1] != cols:
        raise ShapeMismatchError(f"prune_block: the factor has shape ({u.shape[0]}, "
                                 f"{u.shape[1]}), expected ({cols}, {cols})")
    if err.shape[0] != rows or err.shape[1] != cols or keep.shape[0] != rows \
            or keep.shape[1] != cols:
        raise ShapeMismatchError(f"prune_block: err and keep must have the weights' shape "
                                 f"({rows}, {cols})")
    if m < 0 or m > MAX_M or nkeep < 0 or nkeep > m:
        raise InvalidArgumentError(f"prune_block: N:M with 0 <= N <= M <= {MAX_M}, got "
                                   f"{nkeep}:{m}")
    if m > 0:
        if c0 % m or width % m:
            raise InvalidArgumentError(f"prune_block: columns [{c0}, {c1}) do not start and end "
                                       f"on groups of {m}")
    elif block_keep.shape[0] != rows or block_keep.shape[1] != width:
        raise ShapeMismatchError(f"prune_block: block_keep has shape ({block_keep.shape[0]}, "
                                 f"{block_keep.shape[1]}), expected ({rows}, {width})")
    has_forced = _has_forced(forced, rows, cols, "prune_block")
    if rows == 0 or width == 0:
        return None
    nt = threads_for(n_threads, rows * width * 16, rows)
    with nogil:
        for r in prange(rows, schedule="static", num_threads=nt):
            _row(&w[r, 0], &err[r, 0], &keep[r, 0],
                 &block_keep[r, 0] if m == 0 else <const uint8_t*>0,
                 &forced[r, 0] if has_forced else <const uint8_t*>0,
                 &u[0, 0], cols, c0, c1, nkeep, m)
    return None


def narrow16(const float[::1] w not None, uint16_t[::1] out not None, int fmt, int n_threads):
    """out[i] = the IEEE half (fmt F16) or bfloat16 (fmt BF16) bits of w[i], round to nearest
    even.  Returns the number of non-finite results (overflow to infinity)."""
    cdef Py_ssize_t n = w.shape[0], i, bad = 0
    cdef int nt
    cdef uint16_t b
    if out.shape[0] != n:
        raise ShapeMismatchError(f"narrow16: out holds {out.shape[0]} values, w {n}")
    if fmt != APR_FMT_F16 and fmt != APR_FMT_BF16:
        raise InvalidArgumentError(f"narrow16: unknown 16-bit format {fmt}")
    nt = threads_for(n_threads, n, n)
    with nogil:
        for i in prange(n, schedule="static", num_threads=nt):
            if fmt == APR_FMT_BF16:
                b = apr_f32_to_bf16(w[i])
                bad += (b & 0x7f80) == 0x7f80
            else:
                b = apr_f32_to_f16(w[i])
                bad += (b & 0x7c00) == 0x7c00
            out[i] = b
    return int(bad)


guard(globals(), ["check_hessian", "load_reversed", "reverse_narrow", "saliency", "prune_block",
                  "narrow16"])
