"""Calibration kernels: per-feature sums of squares of activations, Wanda scores, OWL outlier
counts.

sum_squares
    out[j] += sum over the selected rows i of x[i, j]**2, in float64.  Squares of float16,
    bfloat16 and float32 values are exact in float64; only the additions round, in a fixed
    order that never depends on the thread count: the selected rows are split into chunks of
    ``chunk_rows(d)`` consecutive rows (a function of the row length only); each chunk is summed
    row after row into its own float64 row of partial sums, and the partials are folded in chunk
    order, ``out[j] + (((p0[j] + p1[j]) + p2[j]) + ...)``.  16-bit floats are read as their
    uint16 bit patterns and converted in registers; no float64 copy of x is made.

wanda_scores32 / wanda_scores64
    out[i, j] = |w[i, j]| * scale[j], one IEEE multiply in float32 (16- and 32-bit weights) or
    float64 (float64 weights), so any caller that multiplies the same float32 |w| by the same
    float32 scale gets the same bits.

score_sum / count_above
    the float64 sum of a score array (fixed chunks of SUM_CHUNK elements, each summed in order,
    partials folded in chunk order) and the number of scores strictly above a threshold.

Every def checks the sizes of its buffers and raises typed errors, so nothing reachable from
Python reads or writes out of bounds.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.math cimport fabs, fabsf, sqrt
from cython.parallel cimport prange

import numpy as np

from ._openmp cimport threads_for
from ._common cimport (real_t, APR_FMT_F16, APR_FMT_BF16, APR_F16_EXP, APR_U16_ABS, apr_nonfinite32,
                       apr_nonfinite64)
from ._guard import guard
from ..errors import InvalidArgumentError, InvalidDTypeError, ShapeMismatchError

cdef extern from "apr_keys.h" nogil:
    float apr_bits_f32(uint32_t b)
    double apr_u16_to_f64(uint16_t h, int fmt)

cdef enum:
    CHUNK_ELEMS = 1 << 20    # elements per row chunk of sum_squares (rows = this // row length)
    MIN_CHUNK_ROWS = 256     # scratch (one float64 row per chunk) <= 8/256 bytes per element
    MAX_CHUNK_ROWS = 4096
    COL_BLOCK = 2048         # columns per task of sum_squares (does not change any result)
    SUM_CHUNK = 65536        # elements per chunk of score_sum (fixed: results never depend on it)

cdef extern from *:
    """
    /* 2**112: moves a half-precision exponent (bias 15) to single precision (bias 127) */
    #define APR_F16_SCALE 5192296858534827628530496329220096.0f
    """
    float APR_F16_SCALE


def chunk_rows(Py_ssize_t d):
    """Rows per chunk of sum_squares for rows of d elements (fixed by d alone)."""
    cdef Py_ssize_t r = CHUNK_ELEMS // (d if d > 0 else 1)
    return int(MIN_CHUNK_ROWS if r < MIN_CHUNK_ROWS else MAX_CHUNK_ROWS if r > MAX_CHUNK_ROWS
               else r)


cdef inline double _sq(real_t v, int fmt) noexcept nogil:
    """v**2 in float64 (exact for 16- and 32-bit inputs).  Half-precision infinities and NaNs
    come out finite here; the caller tests their exponent bits separately."""
    cdef double d
    if real_t is uint16_t:
        if fmt == APR_FMT_BF16:
            d = <double>apr_bits_f32((<uint32_t>v) << 16)
        else:
            d = <double>(apr_bits_f32((<uint32_t>(v & APR_U16_ABS)) << 13) * APR_F16_SCALE)
    else:
        d = <double>v
    return d * d


cdef void _ss_task(const real_t* base, Py_ssize_t rs, const Py_ssize_t* rows, Py_ssize_t r0,
                   Py_ssize_t r1, Py_ssize_t j0, Py_ssize_t j1, int fmt, double* acc,
                   int* bad) noexcept nogil:
    """acc[j] = sum of x[row, j]**2 over logical rows r0..r1-1 (rows[] maps a logical row to a
    row of x when not NULL), for j0 <= j < j1, accumulated in row order."""
    cdef Py_ssize_t i, j, nb = 0
    cdef const real_t* p0
    cdef const real_t* p1
    cdef const real_t* p2
    cdef const real_t* p3
    for j in range(j0, j1):
        acc[j] = 0.0
    i = r0
    # four rows per sweep: (((acc + a) + b) + c) + d is the same sum as row after row
    while i + 4 <= r1:
        if rows == NULL:
            p0 = base + i * rs
            p1 = p0 + rs
            p2 = p1 + rs
            p3 = p2 + rs
        else:
            p0 = base + rows[i] * rs
            p1 = base + rows[i + 1] * rs
            p2 = base + rows[i + 2] * rs
            p3 = base + rows[i + 3] * rs
        for j in range(j0, j1):
            acc[j] = acc[j] + _sq(p0[j], fmt) + _sq(p1[j], fmt) + _sq(p2[j], fmt) \
                + _sq(p3[j], fmt)
        if real_t is uint16_t:
            if fmt == APR_FMT_F16:
                for j in range(j0, j1):
                    nb += ((p0[j] & APR_F16_EXP) == APR_F16_EXP) \
                        + ((p1[j] & APR_F16_EXP) == APR_F16_EXP) \
                        + ((p2[j] & APR_F16_EXP) == APR_F16_EXP) \
                        + ((p3[j] & APR_F16_EXP) == APR_F16_EXP)
        i += 4
    while i < r1:
        p0 = base + (rows[i] if rows != NULL else i) * rs
        for j in range(j0, j1):
            acc[j] = acc[j] + _sq(p0[j], fmt)
        if real_t is uint16_t:
            if fmt == APR_FMT_F16:
                for j in range(j0, j1):
                    nb += (p0[j] & APR_F16_EXP) == APR_F16_EXP
        i += 1
    # a NaN or infinity anywhere in the block makes its column sum NaN or infinite (for float64
    # inputs an overflow does too: the caller tells the two apart)
    for j in range(j0, j1):
        nb += apr_nonfinite64(acc[j])
    bad[0] = <int>(nb != 0)


def sum_squares(const real_t[:, :] x not None, int fmt, const Py_ssize_t[::1] rows not None,
                bint all_rows, double[::1] out not None, int n_threads):
    """out[j] += sum of x[i, j]**2 over the rows i of ``rows`` (every row of x, in order, when
    all_rows; ``rows`` then must be empty).  Returns 0, or 1 when a sum is not finite (a NaN or
    infinity in x, or a float64 overflow): out is then left unchanged.  x may have any row
    stride; its elements within a row must be contiguous."""
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    cdef Py_ssize_t nsel, R, nch, nbl, ntask, t, c, b, j0, j1, r1, j
    cdef Py_ssize_t rs
    cdef int nt, any_bad = 0
    cdef const Py_ssize_t* rp = NULL
    cdef const real_t* base
    cdef double[:, ::1] part
    cdef int[::1] bad
    cdef double total
    if out.shape[0] != d:
        raise ShapeMismatchError(f"out holds {out.shape[0]} sums, the rows {d} elements")
    if d > 1 and x.strides[1] != <Py_ssize_t>sizeof(real_t):
        raise InvalidArgumentError("x: the elements of a row must be contiguous")
    if n > 1 and x.strides[0] % <Py_ssize_t>sizeof(real_t) != 0:
        raise InvalidArgumentError("x: the row stride must be a multiple of the element size")
    if real_t is uint16_t:
        if fmt != APR_FMT_F16 and fmt != APR_FMT_BF16:
            raise InvalidArgumentError(f"16-bit input needs format {APR_FMT_F16} (float16) or "
                                       f"{APR_FMT_BF16} (bfloat16), got {fmt}")
    elif fmt != 0:
        raise InvalidArgumentError(f"float32/float64 input needs format 0, got {fmt}")
    if all_rows:
        if rows.shape[0] != 0:
            raise InvalidArgumentError("rows must be empty when all_rows is set")
        nsel = n
    else:
        nsel = rows.shape[0]
        for t in range(nsel):  # O(selected rows), against out-of-bounds reads
            if rows[t] < 0 or rows[t] >= n:
                raise ShapeMismatchError(f"rows[{t}] = {rows[t]} is outside the {n} rows of x")
        if nsel:
            rp = &rows[0]
    if nsel == 0 or d == 0:
        return 0
    base = &x[0, 0]
    rs = x.strides[0] // <Py_ssize_t>sizeof(real_t)
    R = chunk_rows(d)
    nch = (nsel + R - 1) // R
    nbl = (d + COL_BLOCK - 1) // COL_BLOCK
    ntask = nch * nbl
    part = np.empty((nch, d), dtype=np.float64)
    bad = np.zeros(ntask, dtype=np.intc)
    nt = threads_for(n_threads, nsel * d, ntask)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=nt):
            c = t // nbl
            b = t - c * nbl
            j0 = b * COL_BLOCK
            j1 = min(d, j0 + COL_BLOCK)
            r1 = min(nsel, (c + 1) * R)
            _ss_task(base, rs, rp, c * R, r1, j0, j1, fmt, &part[c, 0], &bad[t])
        for t in range(ntask):
            any_bad |= bad[t]
        if not any_bad:
            for j in range(d):
                total = part[0, j]
                for c in range(1, nch):
                    total = total + part[c, j]
                out[j] = out[j] + total
    return int(any_bad)


ctypedef fused score_t:
    float
    double


cdef void _row_stats(const score_t* s, Py_ssize_t n, double* res) noexcept nogil:
    """res[0:4] = min, max, mean and the sum of squared deviations of s[0:n] (n >= 1), in
    float64: deviations from s[0] summed in four interleaved lanes (j % 4), then
    ((l0 + l1) + (l2 + l3)); a fixed order, so the result never depends on the thread count."""
    cdef double shift = s[0], d0, d1, d2, d3, v
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0, s1, s2
    cdef double mn = shift, mx = shift
    cdef Py_ssize_t j = 0
    while j + 4 <= n:
        d0 = s[j] - shift
        d1 = s[j + 1] - shift
        d2 = s[j + 2] - shift
        d3 = s[j + 3] - shift
        a0 += d0
        a1 += d1
        a2 += d2
        a3 += d3
        b0 += d0 * d0
        b1 += d1 * d1
        b2 += d2 * d2
        b3 += d3 * d3
        j += 4
    while j < n:
        d0 = s[j] - shift
        a0 += d0
        b0 += d0 * d0
        j += 1
    for j in range(n):
        v = s[j]
        mn = v if v < mn else mn
        mx = v if v > mx else mx
    s1 = (a0 + a1) + (a2 + a3)
    s2 = (b0 + b1) + (b2 + b3)
    res[0] = mn
    res[1] = mx
    res[2] = shift + s1 / n
    res[3] = s2 - s1 * s1 / n
    if res[3] < 0:
        res[3] = 0


cdef tuple _combine_rows(double[:, ::1] rs, Py_ssize_t cols):
    """(min, max, mean, population std) of all rows from per-row results, merged in row order
    with Chan's formula."""
    cdef Py_ssize_t i, rows = rs.shape[0]
    cdef double mn = rs[0, 0], mx = rs[0, 1], mean = rs[0, 2], m2 = rs[0, 3]
    cdef double cnt = cols, delta
    for i in range(1, rows):
        delta = rs[i, 2] - mean
        mean = mean + delta * cols / (cnt + cols)
        m2 = m2 + rs[i, 3] + delta * delta * cnt * cols / (cnt + cols)
        cnt = cnt + cols
        mn = rs[i, 0] if rs[i, 0] < mn else mn
        mx = rs[i, 1] if rs[i, 1] > mx else mx
    return mn, mx, mean, sqrt(m2 / cnt)


cdef _check_scores(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t n_scale, Py_ssize_t out_rows,
                   Py_ssize_t out_cols, Py_ssize_t n_bad):
    """The buffer checks shared by wanda_scores32 and wanda_scores64."""
    if n_scale != cols:
        raise ShapeMismatchError(f"scale holds {n_scale} values, the weight rows {cols}")
    if out_rows != rows or out_cols != cols:
        raise ShapeMismatchError(f"out has shape ({out_rows}, {out_cols}), the weights "
                                 f"({rows}, {cols})")
    if n_bad != rows:
        raise ShapeMismatchError(f"bad_rows holds {n_bad} flags for {rows} rows")


cdef _scores_stats(double[:, ::1] rs, const uint8_t[::1] bad_rows, Py_ssize_t cols):
    """The scores' (min, max, mean, std) from the per-row results, or None if a row is bad."""
    cdef Py_ssize_t i
    for i in range(bad_rows.shape[0]):
        if bad_rows[i]:
            return None
    return _combine_rows(rs, cols)


def wanda_scores32(const real_t[:, ::1] w not None, int fmt, const float[::1] scale not None,
                   float[:, ::1] out not None, uint8_t[::1] bad_rows not None, bint stats,
                   int n_threads):
    """out[i, j] = float32(|w[i, j]|) * scale[j] (float32 multiply) for float32 and 16-bit w;
    bad_rows[i] = 1 where a score of row i is not finite (NaN or infinite weight, overflow).
    Returns (min, max, mean, population std) of the scores in float64 when ``stats`` (and none
    is bad), else None."""
    cdef Py_ssize_t rows = w.shape[0], cols = w.shape[1], i, j
    cdef double[:, ::1] rs
    cdef int nt
    cdef float a, s
    cdef uint32_t nb
    if real_t is double:
        raise InvalidDTypeError("wanda_scores32 takes float32 or 16-bit weights; float64 "
                                "weights use wanda_scores64")
    if real_t is uint16_t:
        if fmt != APR_FMT_F16 and fmt != APR_FMT_BF16:
            raise InvalidArgumentError(f"16-bit weights need format {APR_FMT_F16} or "
                                       f"{APR_FMT_BF16}, got {fmt}")
    elif fmt != 0:
        raise InvalidArgumentError(f"float32 weights need format 0, got {fmt}")
    _check_scores(rows, cols, scale.shape[0], out.shape[0], out.shape[1], bad_rows.shape[0])
    if rows == 0 or cols == 0:
        return None
    rs = np.empty((rows if stats else 1, 4), dtype=np.float64)
    nt = threads_for(n_threads, rows * cols, rows)
    with nogil:
        for i in prange(rows, schedule="static", num_threads=nt):
            nb = 0
            for j in range(cols):
                if real_t is uint16_t:
                    if fmt == APR_FMT_BF16:
                        a = apr_bits_f32((<uint32_t>(w[i, j] & APR_U16_ABS)) << 16)
                    else:
                        a = apr_bits_f32((<uint32_t>(w[i, j] & APR_U16_ABS)) << 13) * APR_F16_SCALE
                        nb = nb | <uint32_t>((w[i, j] & APR_F16_EXP) == APR_F16_EXP)
                else:
                    a = fabsf(w[i, j])
                s = a * scale[j]
                out[i, j] = s
                nb = nb | <uint32_t>apr_nonfinite32(s)
            bad_rows[i] = <uint8_t>(nb != 0)
            if stats:
                _row_stats(&out[i, 0], cols, &rs[i, 0])
    return _scores_stats(rs, bad_rows, cols) if stats else None


def wanda_scores64(const double[:, ::1] w not None, const double[::1] scale not None,
                   double[:, ::1] out not None, uint8_t[::1] bad_rows not None, bint stats,
                   int n_threads):
    """out[i, j] = |w[i, j]| * scale[j] in float64; bad_rows and the result as in
    wanda_scores32."""
    cdef Py_ssize_t rows = w.shape[0], cols = w.shape[1], i, j
    cdef double[:, ::1] rs
    cdef int nt, nb
    cdef double s
    _check_scores(rows, cols, scale.shape[0], out.shape[0], out.shape[1], bad_rows.shape[0])
    if rows == 0 or cols == 0:
        return None
    rs = np.empty((rows if stats else 1, 4), dtype=np.float64)
    nt = threads_for(n_threads, rows * cols, rows)
    with nogil:
        for i in prange(rows, schedule="static", num_threads=nt):
            nb = 0
            for j in range(cols):
                s = fabs(w[i, j]) * scale[j]
                out[i, j] = s
                nb = nb | apr_nonfinite64(s)
            bad_rows[i] = <uint8_t>(nb != 0)
            if stats:
                _row_stats(&out[i, 0], cols, &rs[i, 0])
    return _scores_stats(rs, bad_rows, cols) if stats else None


cdef inline double _val(real_t v, int fmt) noexcept nogil:
    if real_t is uint16_t:
        return apr_u16_to_f64(v, fmt)
    else:
        return <double>v


def _check_fmt(int fmt, bint sixteen):
    if sixteen and fmt != APR_FMT_F16 and fmt != APR_FMT_BF16:
        raise InvalidArgumentError(f"16-bit input needs format {APR_FMT_F16} or {APR_FMT_BF16}, "
                                   f"got {fmt}")
    if not sixteen and fmt != 0:
        raise InvalidArgumentError(f"float32/float64 input needs format 0, got {fmt}")


def score_sum(const real_t[::1] x not None, int fmt, int n_threads):
    """(sum, bad): the float64 sum of x (chunks of SUM_CHUNK elements summed in order, partials
    folded in chunk order) and 1 if it is not finite (a NaN or infinity in x, or an overflow)."""
    cdef Py_ssize_t n = x.shape[0], nch = (n + SUM_CHUNK - 1) // SUM_CHUNK, c, i, e
    cdef int nt
    cdef double s, total = 0.0
    cdef double[::1] part
    _check_fmt(fmt, real_t is uint16_t)
    if n == 0:
        return 0.0, 0
    part = np.empty(nch, dtype=np.float64)
    nt = threads_for(n_threads, n, nch)
    with nogil:
        for c in prange(nch, schedule="static", num_threads=nt):
            s = 0.0
            e = min(n, (c + 1) * SUM_CHUNK)
            for i in range(c * SUM_CHUNK, e):
                s = s + _val(x[i], fmt)
            part[c] = s
        total = part[0]
        for c in range(1, nch):
            total = total + part[c]
    return total, int(apr_nonfinite64(total))


def count_above(const real_t[::1] x not None, int fmt, double threshold, int n_threads):
    """Number of elements of x whose value (as float64) is strictly greater than threshold."""
    cdef Py_ssize_t n = x.shape[0], nch = (n + SUM_CHUNK - 1) // SUM_CHUNK, c, i, e, k
    cdef Py_ssize_t total = 0
    cdef int nt
    _check_fmt(fmt, real_t is uint16_t)
    if n == 0:
        return 0
    nt = threads_for(n_threads, n, nch)
    with nogil:
        for c in prange(nch, schedule="static", num_threads=nt):
            k = 0
            e = min(n, (c + 1) * SUM_CHUNK)
            for i in range(c * SUM_CHUNK, e):
                k = k + (_val(x[i], fmt) > threshold)
            total += k
    return int(total)


guard(globals(), ["chunk_rows", "sum_squares", "wanda_scores32", "wanda_scores64", "score_sum",
                  "count_above"])
