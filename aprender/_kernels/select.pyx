"""Exact threshold selection: prune the k smallest order keys, ties broken by the lowest index.

Pipeline for one tensor or many (global scope), all passes parallel and independent of the thread
count in their result:

1. sample   a stratified, hash-scrambled sample of keys (SAMPLE of them in runs of RUN consecutive
            keys, proportional to each tensor's size) brackets the k-th key between two sample
            quantiles lo <= T <= hi (one 16-bit histogram of the sample, then an exact select of
            the two bins' keys);
2. range    one pass per tensor counts keys below lo and copies the keys inside [lo, hi] into
            per-task candidate buffers (under 1 % of n for a smooth distribution, never a
            full-size copy).  For masks held in memory (threshold_masks) the same pass also
            writes the provisional mask keep = key > hi and records the candidates' indices;
3. select   an MSD radix select with branch-free compaction finds T among the candidates
            exactly, in at most 8 linear passes (several tensors' candidates are selected
            without concatenating them);
4. write    in memory: only the candidates' mask bytes are rewritten, in index order, pruning the
            first r = k - #(key < T) keys equal to T.  Streaming (find_threshold + write_pass):
            one pass writes keep = key > T and counts keys equal to T per fixed chunk; a prefix
            over the chunks keeps every equal key after the first r in flat order.

If the bracket misses (adversarial data) or a candidate buffer overflows, the threshold is found
instead by 16-bit radix histograms over the keys, top digit first: a fixed number of linear
passes (1 for 16-bit floats, 2 for float32, 4 for float64).  Either way the result is the same.

Sources for the multi-tensor entry points may be arrays or callables that return an array; a
callable is called once per pass (with sequential=True/False when it accepts that keyword), so
a caller can stream memory-mapped tensors.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memset, memcpy
from libc.math cimport sqrt, ceil, floor
from cython.parallel cimport prange, threadid

import inspect

import numpy as np

from ._common cimport real_t, key_of, inf_keys, apr_u16_to_f64
from ._openmp cimport threads_for

cdef enum:
    SAMPLE = 262144         # total sample size for the bracket
    CHUNK = 65536           # elements per chunk in the write pass (fixed: results never depend on it)
    SMALL = 131072          # at or below this many keys, gather them all and select directly
    NBINS = 65536
    PAD = 8                 # int64 slots per task in result arrays (64 bytes: no false sharing)
    RUN = 8                 # consecutive keys per sample stratum


# ----------------------------------------------------------------------------------------------
# selection on a key buffer
# ----------------------------------------------------------------------------------------------

cdef extern from "apr_keys.h" nogil:
    uint64_t apr_radix_select64(uint64_t* a, Py_ssize_t n, Py_ssize_t rank, Py_ssize_t* below)
    void apr_quantile_pair(const uint64_t* a, Py_ssize_t n, Py_ssize_t r_lo, Py_ssize_t r_hi,
                           int width, int64_t* hist, uint64_t* scratch, uint64_t* lo,
                           uint64_t* hi)
    uint64_t apr_select_segments(const uint64_t* const* seg, const Py_ssize_t* len, int nseg,
                                 Py_ssize_t rank, uint64_t base, int shift, int64_t* hist,
                                 uint64_t* scratch, Py_ssize_t scratch_cap, Py_ssize_t* below,
                                 int* ok)


def select_keys(uint64_t[::1] keys, Py_ssize_t rank):
    """rank-th smallest key (0-based) of a uint64 buffer by the branch-free MSD radix select
    (worst-case linear); only permutes the buffer."""
    return select_keys_below(keys, rank)[0]


def select_keys_below(uint64_t[::1] keys, Py_ssize_t rank):
    """(rank-th smallest key, number of keys strictly below it); only permutes keys."""
    if not 0 <= rank < keys.shape[0]:
        raise IndexError("rank out of range")
    cdef uint64_t out
    cdef Py_ssize_t below = 0
    with nogil:
        out = apr_radix_select64(&keys[0], keys.shape[0], rank, &below)
    return out, below


def quantile_pair(const uint64_t[::1] keys, Py_ssize_t r_lo, Py_ssize_t r_hi, int width):
    """(key of rank r_lo, key of rank r_hi) of keys of the given bit width (16, 32 or 64)."""
    cdef Py_ssize_t n = keys.shape[0]
    cdef uint64_t lo = 0, hi = 0
    if not (0 <= r_lo <= r_hi < n):
        raise IndexError("ranks out of range")
    cdef int64_t[::1] hist = np.empty(65536, dtype=np.int64)
    cdef uint64_t[::1] scratch = np.empty(n, dtype=np.uint64)
    with nogil:
        apr_quantile_pair(&keys[0], n, r_lo, r_hi, width, &hist[0], &scratch[0], &lo, &hi)
    return lo, hi


def select_segments(list segments, Py_ssize_t rank, uint64_t lo, uint64_t hi):
    """(rank-th smallest key over the uint64 arrays in segments, number strictly below it),
    without concatenating them; every key must lie in [lo, hi].  Falls back to concatenation
    when one histogram bin holds too many keys (heavy ties)."""
    cdef int nseg = len(segments), g, ok = 0, shift = 0
    cdef Py_ssize_t total = 0, below = 0, cap
    cdef uint64_t t, span = hi - lo
    cdef uint64_t[::1] view
    while shift < 48 and (span >> shift) >= 65536:
        shift += 1
    ptrs = np.empty(max(nseg, 1), dtype=np.uintp)
    lens = np.empty(max(nseg, 1), dtype=np.intp)
    cdef size_t[::1] pv = ptrs
    cdef Py_ssize_t[::1] lv = lens
    for g in range(nseg):
        view = segments[g]
        lv[g] = view.shape[0]
        pv[g] = <size_t>&view[0] if view.shape[0] else 0
        total += view.shape[0]
    cap = max(4096, total // 16)
    cdef int64_t[::1] hist = np.empty(65536, dtype=np.int64)
    cdef uint64_t[::1] scratch = np.empty(cap + 1, dtype=np.uint64)
    with nogil:
        t = apr_select_segments(<const uint64_t* const*>&pv[0], &lv[0], nseg, rank, lo, shift,
                                &hist[0], &scratch[0], cap, &below, &ok)
    if not ok:
        cand = np.concatenate(segments)
        return select_keys_below(cand, rank)
    return t, below


# ----------------------------------------------------------------------------------------------
# per-tensor passes (raw pointers inside; the def wrappers below expose them per dtype)
# ----------------------------------------------------------------------------------------------

cdef inline int _tasks(Py_ssize_t n, int n_threads) noexcept nogil:
    # a range pass splits its input into one contiguous task per thread
    return threads_for(n_threads, n, n)


cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    # splitmix64 finaliser: a fixed, seedless scramble (results are reproducible)
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef void _sample_stratum(const real_t* x, Py_ssize_t n, Py_ssize_t nstrata, Py_ssize_t j,
                          uint64_t salt, int magnitude, uint64_t* out) noexcept nogil:
    cdef Py_ssize_t a = (j * n) // nstrata, b = ((j + 1) * n) // nstrata, i, start
    start = a + <Py_ssize_t>(_mix(salt * 0x9e3779b97f4a7c15ULL + <uint64_t>j)
                             % <uint64_t>(b - a - RUN + 1))
    for i in range(RUN):
        out[j * RUN + i] = key_of(x[start + i], magnitude)


cdef Py_ssize_t _sample(const real_t* x, Py_ssize_t n, Py_ssize_t s, uint64_t salt, int magnitude,
                        uint64_t* out, int nt) noexcept nogil:
    """At most s keys (all n when s >= n): s / RUN equal strata of x, from each a run of RUN
    consecutive keys starting at a hashed position inside the stratum (runs keep the reads
    cache-friendly; every stratum holds more than RUN keys because s < n).  Writes at most
    min(s, n) keys to out."""
    cdef Py_ssize_t j, i, nstrata
    if s >= n:
        for i in range(n):
            out[i] = key_of(x[i], magnitude)
        return n
    if s < RUN or n < 2 * RUN:
        # too few for runs: s single keys, one from each of s equal strata (never more than s)
        for j in range(s):
            out[j] = key_of(x[(j * n) // s], magnitude)
        return s
    nstrata = s // RUN
    if nstrata * RUN >= n:
        nstrata = n // (2 * RUN)
    for j in prange(nstrata, schedule="static", num_threads=nt):
        _sample_stratum(x, n, nstrata, j, salt, magnitude, out)
    return nstrata * RUN


cdef extern from "apr_keys.h" nogil:
    void apr_range16(const uint16_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint16_t lo,
                     uint16_t hi, uint16_t khi, uint16_t klo, uint64_t* buf, Py_ssize_t cap,
                     int64_t* res)
    void apr_range32(const uint32_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint32_t lo,
                     uint32_t hi, uint32_t khi, uint32_t klo, uint64_t* buf, Py_ssize_t cap,
                     int64_t* res)
    void apr_range64(const uint64_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint64_t lo,
                     uint64_t hi, uint64_t khi, uint64_t klo, uint64_t* buf, Py_ssize_t cap,
                     int64_t* res)
    int64_t apr_write16(const uint16_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint16_t t,
                        uint8_t* out)
    int64_t apr_write32(const uint32_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint32_t t,
                        uint8_t* out)
    int64_t apr_write64(const uint64_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint64_t t,
                        uint8_t* out)
    void apr_keep_equals_from16(const uint16_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                                uint16_t t, Py_ssize_t first, uint8_t* out)
    void apr_keep_equals_from32(const uint32_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                                uint32_t t, Py_ssize_t first, uint8_t* out)
    void apr_keep_equals_from64(const uint64_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                                uint64_t t, Py_ssize_t first, uint8_t* out)
    void apr_hist16(const uint16_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, int shift,
                    uint16_t prefix, uint16_t pmask, uint16_t khi, uint16_t klo, int64_t* hist,
                    int64_t* res)
    void apr_hist32(const uint32_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, int shift,
                    uint32_t prefix, uint32_t pmask, uint32_t khi, uint32_t klo, int64_t* hist,
                    int64_t* res)
    void apr_hist64(const uint64_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, int shift,
                    uint64_t prefix, uint64_t pmask, uint64_t khi, uint64_t klo, int64_t* hist,
                    int64_t* res)


cdef inline void _range_task(const real_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                             uint64_t lo, uint64_t hi, uint64_t khi, uint64_t klo,
                             uint64_t* buf, Py_ssize_t cap, int64_t* res) noexcept nogil:
    if real_t is float:
        apr_range32(<const uint32_t*>x, s, e, magnitude, <uint32_t>lo, <uint32_t>hi,
                    <uint32_t>khi, <uint32_t>klo, buf, cap, res)
    elif real_t is double:
        apr_range64(<const uint64_t*>x, s, e, magnitude, lo, hi, khi, klo, buf, cap, res)
    else:
        apr_range16(x, s, e, magnitude, <uint16_t>lo, <uint16_t>hi, <uint16_t>khi,
                    <uint16_t>klo, buf, cap, res)


cdef inline void _hist_task(const real_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, int shift,
                            uint64_t prefix, uint64_t pmask, uint64_t khi, uint64_t klo,
                            int64_t* hist, int64_t* res) noexcept nogil:
    if real_t is float:
        apr_hist32(<const uint32_t*>x, s, e, magnitude, shift, <uint32_t>prefix, <uint32_t>pmask,
                   <uint32_t>khi, <uint32_t>klo, hist, res)
    elif real_t is double:
        apr_hist64(<const uint64_t*>x, s, e, magnitude, shift, prefix, pmask, khi, klo, hist, res)
    else:
        apr_hist16(x, s, e, magnitude, shift, <uint16_t>prefix, <uint16_t>pmask, <uint16_t>khi,
                   <uint16_t>klo, hist, res)


cdef inline int64_t _write_task(const real_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                                uint64_t t, uint8_t* out) noexcept nogil:
    if real_t is float:
        return apr_write32(<const uint32_t*>x, s, e, magnitude, <uint32_t>t, out)
    elif real_t is double:
        return apr_write64(<const uint64_t*>x, s, e, magnitude, t, out)
    else:
        return apr_write16(x, s, e, magnitude, <uint16_t>t, out)


cdef inline void _keep_equals_from(const real_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                                   uint64_t t, Py_ssize_t first, uint8_t* out) noexcept nogil:
    if real_t is float:
        apr_keep_equals_from32(<const uint32_t*>x, s, e, magnitude, <uint32_t>t, first, out)
    elif real_t is double:
        apr_keep_equals_from64(<const uint64_t*>x, s, e, magnitude, t, first, out)
    else:
        apr_keep_equals_from16(x, s, e, magnitude, <uint16_t>t, first, out)


# ---- def wrappers: one typed pass over one contiguous 1-D tensor --------------------------------

def sample_keys(const real_t[::1] x, Py_ssize_t s, uint64_t salt, int magnitude,
                int n_threads=1, uint64_t[::1] out=None):
    """Stratified sample of about s keys (all of them if x is not longer) as a uint64 array;
    written into out (which must hold max(s, 8) keys) when given.  Returns the filled part."""
    cdef Py_ssize_t n = x.shape[0], w
    if out is None:
        out = np.empty(max(min(s, n), RUN), dtype=np.uint64)
    cdef uint64_t[::1] o = out
    if n == 0 or s <= 0:
        return np.asarray(out)[:0]
    cdef int nt = threads_for(n_threads, min(s, n), (min(s, n) + RUN - 1) // RUN)
    with nogil:
        w = _sample(&x[0], n, s, salt, magnitude, &o[0], nt)
    return np.asarray(out)[:w]


cdef tuple _sum_tasks(int64_t[::1] res, Py_ssize_t ntask, Py_ssize_t per):
    """(below, inside, non-finite, overflowed) summed over the tasks of a range pass."""
    cdef Py_ssize_t t, below = 0, inside = 0, bad = 0
    cdef bint overflow = False
    for t in range(ntask):
        below += res[t * PAD]
        inside += res[t * PAD + 1]
        bad += res[t * PAD + 2]
        if res[t * PAD + 1] > per:
            overflow = True
    return below, inside, bad, overflow


def range_pass(const real_t[::1] x, uint64_t lo, uint64_t hi, int magnitude, uint16_t inf16,
               Py_ssize_t cap, int n_threads):
    """Count keys < lo and copy keys in [lo, hi] (at most cap in all).
    Returns (n_below, n_inside, n_nonfinite, candidates or None when more than cap fell inside)."""
    cdef Py_ssize_t n = x.shape[0], t, ntask = _tasks(n, n_threads)
    cdef uint64_t khi, klo
    cdef Py_ssize_t per = cap if cap > 0 else 1
    cdef int64_t[::1] res = np.zeros(ntask * PAD, dtype=np.int64)
    cdef uint64_t[::1] buf = np.empty(ntask * (per + 1), dtype=np.uint64)
    cdef Py_ssize_t below = 0, inside = 0, bad = 0, w = 0
    cdef bint overflow = False
    if n == 0:
        return 0, 0, 0, np.empty(0, np.uint64)
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=ntask):
            _range_task(&x[0], (t * n) // ntask, ((t + 1) * n) // ntask, magnitude, lo, hi,
                        khi, klo, &buf[t * (per + 1)], per, &res[t * PAD])
    below, inside, bad, overflow = _sum_tasks(res, ntask, per)
    if overflow or inside > cap:
        return below, inside, bad, None
    arr = np.asarray(buf)
    for t in range(ntask):
        if res[t * PAD + 1]:
            arr[w:w + res[t * PAD + 1]] = arr[t * (per + 1):t * (per + 1) + res[t * PAD + 1]]
            w += res[t * PAD + 1]
    return below, inside, bad, arr[:w].copy()


def hist_pass(const real_t[::1] x, int shift, uint64_t prefix, uint64_t pmask, int magnitude,
              uint16_t inf16, int64_t[::1] hist, int n_threads):
    """Add to hist (65536 bins) the 16-bit digit at shift of every key whose bits under pmask
    equal prefix.  Returns the number of non-finite values."""
    cdef Py_ssize_t n = x.shape[0], t, i, ntask = _tasks(n, n_threads)
    cdef uint64_t khi, klo
    cdef int64_t[::1] res = np.zeros(ntask * PAD, dtype=np.int64)
    cdef int64_t[::1] local
    cdef Py_ssize_t bad = 0
    if n == 0:
        return 0
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    if ntask == 1:
        with nogil:
            _hist_task(&x[0], 0, n, magnitude, shift, prefix, pmask, khi, klo, &hist[0], &res[0])
        return res[2]
    local = np.zeros(ntask * NBINS, dtype=np.int64)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=ntask):
            _hist_task(&x[0], (t * n) // ntask, ((t + 1) * n) // ntask, magnitude, shift, prefix,
                       pmask, khi, klo, &local[t * NBINS], &res[t * PAD])
        for t in range(ntask):
            bad += res[t * PAD + 2]
            for i in range(NBINS):
                hist[i] += local[t * NBINS + i]
    return bad


def write_pass(const real_t[::1] x, uint64_t thresh, Py_ssize_t r, int magnitude,
               uint8_t[::1] out, int n_threads):
    """keep = key > thresh, except that the first r keys equal to thresh (flat order) are pruned
    and the rest kept.  Returns how many equal keys it pruned (min(r, number equal))."""
    cdef Py_ssize_t n = x.shape[0], c, nch = (n + CHUNK - 1) // CHUNK, total = 0, first
    cdef int nt = threads_for(n_threads, n, nch)
    cdef int64_t[::1] eq = np.zeros(max(nch, 1) * 1, dtype=np.int64)
    cdef int64_t[::1] before = np.zeros(max(nch, 1), dtype=np.int64)
    if n == 0:
        return 0
    with nogil:
        for c in prange(nch, schedule="static", num_threads=nt):
            eq[c] = _write_task(&x[0], c * CHUNK, min(n, (c + 1) * CHUNK), magnitude, thresh,
                                &out[0])
        for c in range(nch):
            before[c] = total
            total += eq[c]
        if total > r:
            for c in prange(nch, schedule="static", num_threads=nt):
                first = r - before[c]
                if eq[c] > 0 and first < eq[c]:
                    _keep_equals_from(&x[0], c * CHUNK, min(n, (c + 1) * CHUNK), magnitude,
                                      thresh, first if first > 0 else 0, &out[0])
    return min(r, total)


cdef extern from "apr_keys.h" nogil:
    void apr_rangew16(const uint16_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint16_t lo,
                      uint16_t hi, uint16_t khi, uint16_t klo, uint64_t* kbuf, int64_t* ibuf,
                      Py_ssize_t cap, uint8_t* out, int64_t* res)
    void apr_rangew32(const uint32_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint32_t lo,
                      uint32_t hi, uint32_t khi, uint32_t klo, uint64_t* kbuf, int64_t* ibuf,
                      Py_ssize_t cap, uint8_t* out, int64_t* res)
    void apr_rangew64(const uint64_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint64_t lo,
                      uint64_t hi, uint64_t khi, uint64_t klo, uint64_t* kbuf, int64_t* ibuf,
                      Py_ssize_t cap, uint8_t* out, int64_t* res)
    Py_ssize_t apr_fix16(const uint16_t* x, const int64_t* idx, Py_ssize_t m, int magnitude,
                         uint16_t t, Py_ssize_t r, uint8_t* out)
    Py_ssize_t apr_fix32(const uint32_t* x, const int64_t* idx, Py_ssize_t m, int magnitude,
                         uint32_t t, Py_ssize_t r, uint8_t* out)
    Py_ssize_t apr_fix64(const uint64_t* x, const int64_t* idx, Py_ssize_t m, int magnitude,
                         uint64_t t, Py_ssize_t r, uint8_t* out)


cdef inline void _rangew_task(const real_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                              uint64_t lo, uint64_t hi, uint64_t khi, uint64_t klo,
                              uint64_t* kbuf, int64_t* ibuf, Py_ssize_t cap, uint8_t* out,
                              int64_t* res) noexcept nogil:
    if real_t is float:
        apr_rangew32(<const uint32_t*>x, s, e, magnitude, <uint32_t>lo, <uint32_t>hi,
                     <uint32_t>khi, <uint32_t>klo, kbuf, ibuf, cap, out, res)
    elif real_t is double:
        apr_rangew64(<const uint64_t*>x, s, e, magnitude, lo, hi, khi, klo, kbuf, ibuf, cap, out,
                     res)
    else:
        apr_rangew16(x, s, e, magnitude, <uint16_t>lo, <uint16_t>hi, <uint16_t>khi,
                     <uint16_t>klo, kbuf, ibuf, cap, out, res)


def range_write_pass(const real_t[::1] x, uint64_t lo, uint64_t hi, int magnitude,
                     uint16_t inf16, Py_ssize_t cap, uint8_t[::1] out, int n_threads,
                     double expect=1.0):
    """range_pass fused with a provisional mask write (out = key > hi).  Returns
    (n_below, n_inside, n_nonfinite, candidate keys, candidate indices); the last two are None
    when more than cap keys fell inside the bracket."""
    cdef Py_ssize_t n = x.shape[0], t, ntask = _tasks(n, n_threads)
    cdef uint64_t khi, klo
    # each task's buffers hold twice the candidates the bracket predicts for its share (more
    # means the sample was unlucky: the caller falls back to the exact histogram path)
    cdef Py_ssize_t per = min(cap, <Py_ssize_t>(2.0 * expect * n / ntask) + 4096)
    if per < 1:
        per = 1
    cdef int64_t[::1] res = np.zeros(ntask * PAD, dtype=np.int64)
    cdef uint64_t[::1] kbuf = np.empty(ntask * (per + 1), dtype=np.uint64)
    cdef int64_t[::1] ibuf = np.empty(ntask * (per + 1), dtype=np.int64)
    cdef Py_ssize_t below = 0, inside = 0, bad = 0, w = 0, c
    cdef bint overflow = False
    if n == 0:
        return 0, 0, 0, np.empty(0, np.uint64), np.empty(0, np.int64)
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=ntask):
            _rangew_task(&x[0], (t * n) // ntask, ((t + 1) * n) // ntask, magnitude, lo, hi,
                         khi, klo, &kbuf[t * (per + 1)], &ibuf[t * (per + 1)], per, &out[0],
                         &res[t * PAD])
    below, inside, bad, overflow = _sum_tasks(res, ntask, per)
    if overflow or inside > cap:
        return below, inside, bad, None, None
    ka = np.asarray(kbuf)
    ia = np.asarray(ibuf)
    for t in range(ntask):
        c = res[t * PAD + 1]
        if c:
            ka[w:w + c] = ka[t * (per + 1):t * (per + 1) + c]
            ia[w:w + c] = ia[t * (per + 1):t * (per + 1) + c]
            w += c
    return below, inside, bad, ka[:w], ia[:w]  # views: untouched buffer pages cost no memory


def fix_candidates(const real_t[::1] x, const int64_t[::1] idx, uint64_t thresh, Py_ssize_t r,
                   int magnitude, uint8_t[::1] out):
    """Final mask bytes of the candidates (ascending indices): keep key > thresh, prune the first
    r keys equal to thresh.  Returns how many equal keys it pruned."""
    cdef Py_ssize_t m = idx.shape[0], used
    if m == 0:
        return 0
    with nogil:
        if real_t is float:
            used = apr_fix32(<const uint32_t*>&x[0], &idx[0], m, magnitude, <uint32_t>thresh, r,
                             &out[0])
        elif real_t is double:
            used = apr_fix64(<const uint64_t*>&x[0], &idx[0], m, magnitude, thresh, r, &out[0])
        else:
            used = apr_fix16(&x[0], &idx[0], m, magnitude, <uint16_t>thresh, r, &out[0])
    return used


def fill_pass(const real_t[::1] x, uint8_t value, int magnitude, uint16_t inf16,
              uint8_t[::1] out, int n_threads):
    """out[:] = value; returns the number of non-finite inputs (k == 0 or k == n)."""
    cdef Py_ssize_t n = x.shape[0], t, ntask = _tasks(n, n_threads), bad = 0
    cdef uint64_t khi, klo
    cdef int64_t[::1] res = np.zeros(ntask * PAD, dtype=np.int64)
    if n == 0:
        return 0
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=ntask):
            _range_task(&x[0], (t * n) // ntask, ((t + 1) * n) // ntask, magnitude, 0, 0,
                        khi, klo, NULL, 0, &res[t * PAD])
        memset(&out[0], value, n)
        for t in range(ntask):
            bad += res[t * PAD + 2]
    return bad


# ----------------------------------------------------------------------------------------------
# threshold over one or many tensors
# ----------------------------------------------------------------------------------------------

def _get(src, bint sequential=False):
    """The array behind a source.  A callable source is called once per pass; if it takes a
    `sequential` keyword it learns whether the pass reads every element (so a memory map can
    be populated up front) or samples a few (so it should not be)."""
    if not callable(src):
        return src
    try:
        params = inspect.signature(src).parameters
    except (TypeError, ValueError):
        params = {}
    return src(sequential=sequential) if "sequential" in params else src()


def _bracket(sources, sizes, Py_ssize_t total, Py_ssize_t k, int magnitude, int n_threads=1):
    """Keys lo <= hi that bracket the k-th smallest key with high probability, from a stratified
    sample proportional to each source's size (every key when the total is small)."""
    cdef Py_ssize_t j, s_t, lo_r, hi_r, delta
    cdef double q, sig
    cdef Py_ssize_t sample = SAMPLE
    itemsize = 8
    # every source's sample goes straight into one buffer (no concatenation copy)
    buf = np.empty(sum(min(max(n_t if total <= SMALL else (sample * n_t) // total, 1), n_t) + RUN
                       for n_t in sizes), dtype=np.uint64)
    s = 0
    for j, (src, n_t) in enumerate(zip(sources, sizes)):
        if n_t == 0:
            continue
        if total <= SMALL:
            s_t = n_t
        else:
            s_t = max(1, (sample * n_t) // total)
        x = _get(src)
        itemsize = x.dtype.itemsize
        s += sample_keys(x, s_t, j + 1, magnitude, n_threads, buf[s:]).shape[0]
    smp = buf[:s]
    if total <= SMALL and s == total:
        lo_key, hi_key, band = 0, np.iinfo(np.uint64).max, 1.0
    else:
        q = k / <double>total
        sig = sqrt(s * q * (1.0 - q))
        delta = <Py_ssize_t>ceil(3.5 * sig) + 16
        lo_r = <Py_ssize_t>floor(q * s) - delta
        hi_r = <Py_ssize_t>ceil(q * s) + delta
        width = 16 if itemsize == 2 else 8 * itemsize
        qlo, qhi = quantile_pair(smp, max(lo_r, 0), min(hi_r, s - 1), width)
        lo_key = 0 if lo_r < 0 else int(qlo)
        hi_key = np.iinfo(np.uint64).max if hi_r >= s else int(qhi)
        band = (min(hi_r, s - 1) - max(lo_r, 0) + 1) / <double>s
    return lo_key, hi_key, band


def _select_candidates(segments, Py_ssize_t rank, uint64_t lo, uint64_t hi):
    """(rank-th smallest candidate key, number below it) over per-source candidate arrays, all
    inside [lo, hi]; several sources are selected without concatenating them."""
    present = [c for c in segments if c is not None and c.shape[0]]
    if len(present) == 1:
        return select_keys_below(present[0], rank)
    return select_segments(present, rank, lo, hi)


def threshold_masks(sources, outs, sizes, Py_ssize_t k, int magnitude, uint16_t inf16,
                    int n_threads, Py_ssize_t cand_budget=-1):
    """Write keep-masks (uint8, 1 = keep) pruning exactly the k smallest keys over the sources
    (ties: earlier source, then lower index, pruned first).  One fused pass counts against the
    sample bracket, writes provisional mask bytes and gathers the in-bracket keys with their
    indices; only those candidates are rewritten once the threshold is known.  Returns the
    number of non-finite values (then the masks are not meaningful)."""
    cdef Py_ssize_t total = sum(sizes)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside [1, {total}]")
    if cand_budget < 0:
        cand_budget = max(65536, total // 48, total if total <= SMALL else 0)
    lo_key, hi_key, band = _bracket(sources, sizes, total, k, magnitude, n_threads)
    expect = band  # expected fraction of keys inside the bracket
    width = 64
    below = 0
    inside = 0
    bad = 0
    keys = []
    idxs = []
    ok = True
    for src, out, n_t in zip(sources, outs, sizes):
        if n_t == 0:
            keys.append(None)
            idxs.append(None)
            continue
        x = _get(src, True)
        width = 16 if x.dtype.itemsize == 2 else 8 * x.dtype.itemsize
        b_t, i_t, bad_t, k_t, x_t = range_write_pass(x, lo_key, hi_key, magnitude, inf16,
                                                     cand_budget - inside, out, n_threads,
                                                     expect)
        below += b_t
        inside += i_t
        bad += bad_t
        if k_t is None:
            ok = False
            break
        keys.append(k_t)
        idxs.append(x_t)
    if bad:
        return bad
    if ok and below < k <= below + inside:
        thresh, cbelow = _select_candidates(keys, k - below - 1, lo_key, hi_key)
        r = k - below - cbelow
        for src, out, x_t, n_t in zip(sources, outs, idxs, sizes):
            if n_t and x_t is not None and x_t.shape[0]:
                r -= fix_candidates(_get(src), x_t, thresh, r, magnitude, out)
        return 0
    thresh, below, bad = _radix_threshold(sources, sizes, k, magnitude, inf16, n_threads)
    if bad:
        return bad
    r = k - below
    for src, out, n_t in zip(sources, outs, sizes):
        if n_t:
            r -= write_pass(_get(src, True), thresh, r, magnitude, out, n_threads)
    return 0


def find_threshold(sources, sizes, Py_ssize_t k, int magnitude, uint16_t inf16, int n_threads,
                   Py_ssize_t cand_budget=-1):
    """Exact k-th smallest key over the concatenation of the sources (k >= 1, k <= total).

    Returns (thresh, n_below, n_nonfinite, method): n_below keys are strictly smaller than thresh,
    so the first k - n_below keys equal to thresh (in source order, then flat order) are pruned.
    cand_budget bounds the candidate keys held at once (default: about 2 % of the elements).
    """
    cdef Py_ssize_t total = sum(sizes)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside [1, {total}]")
    if cand_budget < 0:
        cand_budget = max(65536, total // 48, total if total <= SMALL else 0)
    lo_key, hi_key, _ = _bracket(sources, sizes, total, k, magnitude, n_threads)
    # 2. range pass
    below = 0
    inside = 0
    bad = 0
    cands = []
    ok = True
    for src, n_t in zip(sources, sizes):
        if n_t == 0:
            continue
        b_t, i_t, bad_t, c_t = range_pass(_get(src, True), lo_key, hi_key, magnitude, inf16,
                                          cand_budget - inside, n_threads)
        below += b_t
        inside += i_t
        bad += bad_t
        if c_t is None:
            ok = False
            break
        cands.append(c_t)
    if bad:
        return 0, 0, bad, "nonfinite"
    if ok and below < k <= below + inside:
        thresh, cbelow = _select_candidates(cands, k - below - 1, lo_key, hi_key)
        return int(thresh), below + cbelow, 0, "sample"
    # 3. fallback: radix histograms, top digit first
    return _radix_threshold(sources, sizes, k, magnitude, inf16, n_threads) + ("radix",)


def _radix_threshold(sources, sizes, Py_ssize_t k, int magnitude, uint16_t inf16, int n_threads):
    cdef int shift = -1
    cdef Py_ssize_t rank = k - 1, below = 0, b
    prefix = 0
    pmask = 0
    bad = 0
    while True:
        hist = np.zeros(NBINS, dtype=np.int64)
        for src, n_t in zip(sources, sizes):
            if n_t == 0:
                continue
            x = _get(src, True)
            if shift < 0:
                shift = 8 * x.dtype.itemsize - 16
            bad += hist_pass(x, shift, prefix, pmask, magnitude, inf16, hist, n_threads)
        if bad:
            return 0, 0, bad
        cum = np.cumsum(hist)
        b = int(np.searchsorted(cum, rank, side="right"))
        lower = int(cum[b - 1]) if b > 0 else 0
        rank -= lower
        below += lower
        prefix |= int(b) << int(shift)
        pmask |= int(0xffff) << int(shift)
        if shift == 0:
            return prefix, below, 0
        shift -= 16


# ----------------------------------------------------------------------------------------------
# per-row selection
# ----------------------------------------------------------------------------------------------

cdef extern from "apr_keys.h" nogil:
    Py_ssize_t apr_row16(const uint16_t* x, Py_ssize_t n, Py_ssize_t k, int magnitude,
                         uint16_t khi, uint16_t klo, uint16_t* keys, uint8_t* out)
    Py_ssize_t apr_row32(const uint32_t* x, Py_ssize_t n, Py_ssize_t k, int magnitude,
                         uint32_t khi, uint32_t klo, uint32_t* keys, uint8_t* out)
    Py_ssize_t apr_row64(const uint64_t* x, Py_ssize_t n, Py_ssize_t k, int magnitude,
                         uint64_t khi, uint64_t klo, uint64_t* keys, uint8_t* out)


cdef inline Py_ssize_t _row(const real_t* x, Py_ssize_t ncols, Py_ssize_t k, int magnitude,
                            uint64_t khi, uint64_t klo, uint64_t* buf, uint8_t* out) noexcept nogil:
    if real_t is float:
        return apr_row32(<const uint32_t*>x, ncols, k, magnitude, <uint32_t>khi, <uint32_t>klo,
                         <uint32_t*>buf, out)
    elif real_t is double:
        return apr_row64(<const uint64_t*>x, ncols, k, magnitude, khi, klo, buf, out)
    else:
        return apr_row16(x, ncols, k, magnitude, <uint16_t>khi, <uint16_t>klo, <uint16_t*>buf,
                         out)


def rows_mask(const real_t[:, ::1] x, Py_ssize_t k, int magnitude, uint16_t inf16,
              uint8_t[:, ::1] out, int n_threads):
    """Prune the k smallest keys of every row (ties: lowest column first).
    Returns the number of rows holding non-finite values (their mask is left unwritten)."""
    cdef Py_ssize_t nrows = x.shape[0], ncols = x.shape[1], i, bad = 0
    cdef int nt = threads_for(n_threads, nrows * ncols, nrows)
    cdef uint64_t khi, klo
    cdef uint64_t[::1] bufs
    cdef int64_t[::1] badrow
    if nrows == 0 or ncols == 0:
        return 0
    inf_keys(<real_t*>&x[0, 0], inf16, magnitude, &khi, &klo)
    if k <= 0 or k >= ncols:
        flat = np.asarray(x).reshape(-1)
        return fill_pass(flat, 1 if k <= 0 else 0, magnitude, inf16,
                         np.asarray(out).reshape(-1), n_threads)
    bufs = np.empty(nt * ncols, dtype=np.uint64)
    badrow = np.zeros(nrows, dtype=np.int64)
    with nogil:
        for i in prange(nrows, schedule="static", num_threads=nt):
            badrow[i] = _row(&x[i, 0], ncols, k, magnitude, khi, klo,
                             &bufs[threadid() * ncols], &out[i, 0])
        for i in range(nrows):
            bad += badrow[i]
    return bad


# ----------------------------------------------------------------------------------------------
# structured: block sums and expansion
# ----------------------------------------------------------------------------------------------

cdef inline double _val(real_t v, int fmt) noexcept nogil:
    if real_t is uint16_t:
        return apr_u16_to_f64(v, fmt)
    else:
        return v


def block_sums(const real_t[:, ::1] x, Py_ssize_t bh, Py_ssize_t bw, int fmt,
               double[:, ::1] out, int n_threads):
    """out[I, J] = sum of x over block (I, J) of shape (bh, bw), accumulated in float64."""
    cdef Py_ssize_t nbr = out.shape[0], nbc = out.shape[1], I, i, j
    cdef int nt = threads_for(n_threads, x.shape[0] * x.shape[1], nbr)
    with nogil:
        for I in prange(nbr, schedule="static", num_threads=nt):
            for j in range(nbc):
                out[I, j] = 0.0
            for i in range(I * bh, I * bh + bh):
                for j in range(x.shape[1]):
                    out[I, j // bw] += _val(x[i, j], fmt)


def expand_blocks(const uint8_t[:, ::1] bmask, Py_ssize_t bh, Py_ssize_t bw,
                  uint8_t[:, ::1] out, int n_threads):
    cdef Py_ssize_t i, j
    cdef int nt = threads_for(n_threads, out.shape[0] * out.shape[1], out.shape[0])
    with nogil:
        for i in prange(out.shape[0], schedule="static", num_threads=nt):
            for j in range(out.shape[1]):
                out[i, j] = bmask[i // bh, j // bw]
