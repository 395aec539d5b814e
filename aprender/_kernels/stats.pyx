"""Importance scores and their statistics in one pass.

scores = |w| (p == 1), w*w (p == 2) or |w|**p, written in the weight's own dtype (16-bit floats are
converted in registers and rounded to nearest even); min, max, mean and the population standard
deviation of the stored scores are accumulated in float64 over fixed chunks (shifted sums merged
with Chan's formula, in chunk order), so the statistics do not depend on the thread count.
"""
from libc.stdint cimport uint16_t
from libc.math cimport fabs, pow, sqrt, fabsf
from cython.parallel cimport prange

import numpy as np

from ._openmp cimport threads_for
from ._guard import guard
from ..errors import ShapeMismatchError
from ._common cimport (real_t, apr_bf16_to_f32, apr_f32_to_bf16, apr_f16_to_f32, apr_f32_to_f16,
                       apr_nonfinite16, apr_nonfinite32, apr_nonfinite64, APR_FMT_BF16,
                       APR_F16_EXP, APR_BF16_EXP, APR_U16_ABS)

cdef enum:
    CHUNK = 65536           # elements per statistics chunk (fixed: results never depend on it)


cdef inline double _score(real_t v, int pk, double p, int fmt, real_t* o, int* bad) noexcept nogil:
    cdef float f, s32
    cdef double d, s
    cdef uint16_t h
    if real_t is uint16_t:
        if fmt == APR_FMT_BF16:
            bad[0] += apr_nonfinite16(v, APR_BF16_EXP)
            f = apr_bf16_to_f32(v)
        else:
            bad[0] += apr_nonfinite16(v, APR_F16_EXP)
            f = apr_f16_to_f32(v)
        if pk == 1:
            h = v & APR_U16_ABS
            o[0] = h
            return fabsf(f)
        if pk == 2:
            s32 = f * f
        else:
            s32 = <float>pow(fabsf(f), p)
        if fmt == APR_FMT_BF16:
            h = apr_f32_to_bf16(s32)
            o[0] = h
            return apr_bf16_to_f32(h)
        h = apr_f32_to_f16(s32)
        o[0] = h
        return apr_f16_to_f32(h)
    elif real_t is float:
        bad[0] += apr_nonfinite32(v)
        if pk == 1:
            s32 = fabsf(v)
        elif pk == 2:
            s32 = v * v
        else:
            s32 = <float>pow(fabsf(v), p)
        o[0] = s32
        return s32
    else:
        bad[0] += apr_nonfinite64(v)
        if pk == 1:
            s = fabs(v)
        elif pk == 2:
            s = v * v
        else:
            s = pow(fabs(v), p)
        o[0] = s
        return s


cdef void _chunk(const real_t* x, Py_ssize_t n, int pk, double p, int fmt, real_t* out,
                 bint write, double* res) noexcept nogil:
    cdef Py_ssize_t i
    cdef int bad = 0
    cdef real_t tmp
    cdef double s, shift, s1 = 0.0, s2 = 0.0, mn, mx, d
    shift = _score(x[0], pk, p, fmt, &tmp, &bad)
    mn = shift
    mx = shift
    for i in range(n):
        if write:
            s = _score(x[i], pk, p, fmt, &out[i], &bad)
        else:
            s = _score(x[i], pk, p, fmt, &tmp, &bad)
        d = s - shift
        s1 += d
        s2 += d * d
        if s < mn:
            mn = s
        if s > mx:
            mx = s
    res[0] = mn
    res[1] = mx
    res[2] = shift + s1 / n
    res[3] = s2 - s1 * s1 / n
    if res[3] < 0:
        res[3] = 0
    res[4] = bad


def scores_stats(const real_t[::1] x not None, int pk, double p, int fmt,
                 real_t[::1] out not None, int n_threads):
    """Write the scores of x into out (skipped when out is empty) and return
    (min, max, mean, std, n_nonfinite) of the scores (population std)."""
    cdef Py_ssize_t n = x.shape[0], nch = (n + CHUNK - 1) // CHUNK, c, s, e
    cdef int nt = threads_for(n_threads, n, nch)
    if out.shape[0] != 0 and out.shape[0] != n:
        raise ShapeMismatchError(f"out holds {out.shape[0]} elements; it must be empty (no "
                                 f"scores written) or hold the input's {n}")
    cdef bint write = out.shape[0] == n and n > 0
    cdef double[:, ::1] res
    cdef double mean, m2, cnt, delta, cn, mn, mx, bad = 0
    if n == 0:
        return float("nan"), float("nan"), float("nan"), float("nan"), 0
    res = np.zeros((nch, 8), dtype=np.float64)
    with nogil:
        for c in prange(nch, schedule="static", num_threads=nt):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            _chunk(&x[s], e - s, pk, p, fmt, &out[s] if write else NULL, write, &res[c, 0])
        mn = res[0, 0]
        mx = res[0, 1]
        mean = res[0, 2]
        m2 = res[0, 3]
        cnt = min(n, <Py_ssize_t>CHUNK)
        bad = res[0, 4]
        for c in range(1, nch):
            cn = min(n - c * CHUNK, <Py_ssize_t>CHUNK)
            delta = res[c, 2] - mean
            mean = mean + delta * cn / (cnt + cn)
            m2 = m2 + res[c, 3] + delta * delta * cnt * cn / (cnt + cn)
            cnt = cnt + cn
            bad += res[c, 4]
            if res[c, 0] < mn:
                mn = res[c, 0]
            if res[c, 1] > mx:
                mx = res[c, 1]
    return mn, mx, mean, sqrt(m2 / cnt), int(bad)


guard(globals(), ["scores_stats"])
