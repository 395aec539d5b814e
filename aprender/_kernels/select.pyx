"""Exact threshold selection: prune the k smallest order keys, ties broken by the lowest index.

Pipeline for one tensor or many (global scope), all passes parallel and independent of the thread
count in their result:

1. sample   a stratified, hash-scrambled sample of keys (about SAMPLE of them, proportional to each
            tensor's size) brackets the k-th key between two sample quantiles lo <= T <= hi;
2. range    one pass per tensor counts keys below lo, and copies keys inside [lo, hi] into per-task
            candidate buffers (a few percent of n at most, never a full-size copy);
3. select   introselect on the candidates finds T exactly (quickselect with three-way partitioning;
            when a partition step fails to halve the range it escapes to an 8-bit radix select, which
            is linear in the worst case);
4. write    one pass writes keep = key > T and counts keys equal to T per fixed chunk; a prefix over
            the chunks then keeps all equal keys after the first r = k - #(key < T) in flat order.

If the bracket misses (adversarial or tiny data) the threshold is found instead by 16-bit radix
histograms over the keys, top digit first: a fixed number of linear passes (1 for 16-bit floats,
2 for float32, 4 for float64).  Either way the result is the same exact threshold.

Sources for the multi-tensor entry points may be arrays or zero-argument callables that return an
array; a callable is called once per pass, so a caller can stream memory-mapped tensors.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memset, memcpy
from libc.math cimport sqrt, ceil, floor
from cython.parallel cimport prange, threadid

import numpy as np

from ._common cimport real_t, key_of, inf_keys, apr_u16_to_f64

cdef enum:
    SAMPLE = 262144         # total sample size for the bracket
    CHUNK = 65536           # elements per chunk in the write pass (fixed: results never depend on it)
    SMALL = 131072          # at or below this many keys, gather them all and select directly
    NBINS = 65536
    PAD = 8                 # int64 slots per task in result arrays (64 bytes: no false sharing)
    PARALLEL_MIN = 32768    # below this many elements a pass stays serial
    RUN = 8                 # consecutive keys per sample stratum


# ----------------------------------------------------------------------------------------------
# selection on a key buffer
# ----------------------------------------------------------------------------------------------

cdef inline void _swap(uint64_t* a, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef uint64_t t = a[i]
    a[i] = a[j]
    a[j] = t


cdef uint64_t radix_select(uint64_t* a, Py_ssize_t n, Py_ssize_t rank) noexcept nogil:
    """rank-th smallest (0-based) of a[0:n], by 8-bit digits from the top; only permutes a.
    At most 8 linear passes: worst-case O(n)."""
    cdef Py_ssize_t cnt[256]
    cdef int shift, d, b
    cdef Py_ssize_t i, w, below
    cdef uint64_t prefix = 0
    for shift in range(56, -8, -8):
        memset(cnt, 0, sizeof(cnt))
        for i in range(n):
            cnt[(a[i] >> shift) & 0xff] += 1
        below = 0
        b = 0
        for d in range(256):
            if below + cnt[d] > rank:
                b = d
                break
            below += cnt[d]
        rank -= below
        prefix |= (<uint64_t>b) << shift
        w = 0
        for i in range(n):
            if <int>((a[i] >> shift) & 0xff) == b:
                _swap(a, w, i)
                w += 1
        n = w
        if n == 1:
            return a[0]
    return prefix


cdef uint64_t quickselect(uint64_t* a, Py_ssize_t n, Py_ssize_t rank) noexcept nogil:
    """rank-th smallest (0-based) of a[0:n]; permutes a.  Introselect: median-of-3 quickselect with
    three-way partitioning, escaping to radix_select when two steps fail to halve the range."""
    cdef Py_ssize_t lo = 0, hi = n - 1, lt, gt, i, mid, size, last_size = n
    cdef int steps = 0
    cdef uint64_t p, x0, x1, x2
    while hi > lo:
        size = hi - lo + 1
        if size <= 16:
            # insertion sort for tiny ranges
            for i in range(lo + 1, hi + 1):
                p = a[i]
                mid = i - 1
                while mid >= lo and a[mid] > p:
                    a[mid + 1] = a[mid]
                    mid -= 1
                a[mid + 1] = p
            return a[rank]
        steps += 1
        if steps % 2 == 0:
            if size > last_size // 2:
                return radix_select(a + lo, size, rank - lo)
            last_size = size
        mid = lo + size // 2
        x0 = a[lo]
        x1 = a[mid]
        x2 = a[hi]
        if x0 > x1:
            x0, x1 = x1, x0
        if x1 > x2:
            x1 = x2
        p = x1 if x1 > x0 else x0
        lt = lo
        i = lo
        gt = hi
        while i <= gt:
            if a[i] < p:
                _swap(a, lt, i)
                lt += 1
                i += 1
            elif a[i] > p:
                _swap(a, i, gt)
                gt -= 1
            else:
                i += 1
        if rank < lt:
            hi = lt - 1
        elif rank > gt:
            lo = gt + 1
        else:
            return p
    return a[lo]


cdef extern from "apr_keys.h" nogil:
    uint64_t apr_radix_select64(uint64_t* a, Py_ssize_t n, Py_ssize_t rank, Py_ssize_t* below)


def select_keys(uint64_t[::1] keys, Py_ssize_t rank, bint radix=False, bint quick=False):
    """rank-th smallest key (0-based) of a uint64 buffer, only permuting it.  Default: the
    branch-free MSD radix select (worst-case linear); quick=True: introselect; radix=True: the
    plain radix_select."""
    if not 0 <= rank < keys.shape[0]:
        raise IndexError("rank out of range")
    cdef uint64_t out
    cdef Py_ssize_t below
    with nogil:
        if radix:
            out = radix_select(&keys[0], keys.shape[0], rank)
        elif quick:
            out = quickselect(&keys[0], keys.shape[0], rank)
        else:
            out = apr_radix_select64(&keys[0], keys.shape[0], rank, &below)
    return out


def select_keys_below(uint64_t[::1] keys, Py_ssize_t rank):
    """(rank-th smallest key, number of keys strictly below it); only permutes keys."""
    cdef uint64_t out
    cdef Py_ssize_t below = 0
    with nogil:
        out = apr_radix_select64(&keys[0], keys.shape[0], rank, &below)
    return out, below


# ----------------------------------------------------------------------------------------------
# per-tensor passes (raw pointers inside; the def wrappers below expose them per dtype)
# ----------------------------------------------------------------------------------------------

cdef inline int _tasks(Py_ssize_t n, int n_threads) noexcept nogil:
    if n < PARALLEL_MIN or n_threads <= 1:
        return 1
    return n_threads


cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    # splitmix64 finaliser: a fixed, seedless scramble (results are reproducible)
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef Py_ssize_t _sample(const real_t* x, Py_ssize_t n, Py_ssize_t s, uint64_t salt, int magnitude,
                        uint64_t* out) noexcept nogil:
    """About s keys: s / RUN equal strata of x, from each a run of RUN consecutive keys starting
    at a hashed position inside the stratum (runs keep the reads cache-friendly)."""
    cdef Py_ssize_t j, a, b, i, start, w = 0, nstrata, span
    if s >= n:
        for i in range(n):
            out[i] = key_of(x[i], magnitude)
        return n
    nstrata = s // RUN if s >= RUN else 1
    for j in range(nstrata):
        a = (j * n) // nstrata
        b = ((j + 1) * n) // nstrata
        span = b - a - RUN + 1
        if span <= 0:
            start = a
        else:
            start = a + <Py_ssize_t>(_mix(salt * 0x9e3779b97f4a7c15ULL + <uint64_t>j)
                                     % <uint64_t>span)
        for i in range(start, min(start + RUN, b)):
            out[w] = key_of(x[i], magnitude)
            w += 1
    return w


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
    int64_t apr_count_less16(const uint16_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                             uint16_t t)
    int64_t apr_count_less32(const uint32_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                             uint32_t t)
    int64_t apr_count_less64(const uint64_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                             uint64_t t)
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


cdef inline int64_t _count_less(const real_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                                uint64_t t) noexcept nogil:
    if real_t is float:
        return apr_count_less32(<const uint32_t*>x, s, e, magnitude, <uint32_t>t)
    elif real_t is double:
        return apr_count_less64(<const uint64_t*>x, s, e, magnitude, t)
    else:
        return apr_count_less16(x, s, e, magnitude, <uint16_t>t)


cdef inline void _keep_equals_from(const real_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                                   uint64_t t, Py_ssize_t first, uint8_t* out) noexcept nogil:
    if real_t is float:
        apr_keep_equals_from32(<const uint32_t*>x, s, e, magnitude, <uint32_t>t, first, out)
    elif real_t is double:
        apr_keep_equals_from64(<const uint64_t*>x, s, e, magnitude, t, first, out)
    else:
        apr_keep_equals_from16(x, s, e, magnitude, <uint16_t>t, first, out)


# ---- def wrappers: one typed pass over one contiguous 1-D tensor --------------------------------

def sample_keys(const real_t[::1] x, Py_ssize_t s, uint64_t salt, int magnitude):
    """Stratified sample of s keys (fewer if x is shorter) as a uint64 array."""
    cdef Py_ssize_t n = x.shape[0], w
    out = np.empty(max(min(s, n), RUN), dtype=np.uint64)
    cdef uint64_t[::1] o = out
    if n == 0 or s <= 0:
        return out[:0]
    with nogil:
        w = _sample(&x[0], n, s, salt, magnitude, &o[0])
    return out[:w]


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
    for t in range(ntask):
        below += res[t * PAD]
        inside += res[t * PAD + 1]
        bad += res[t * PAD + 2]
        if res[t * PAD + 1] > per:
            overflow = True
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
    cdef int nt = _tasks(n, n_threads)
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

def _get(src):
    return src() if callable(src) else src


def find_threshold(sources, sizes, Py_ssize_t k, int magnitude, uint16_t inf16, int n_threads,
                   Py_ssize_t cand_budget=-1):
    """Exact k-th smallest key over the concatenation of the sources (k >= 1, k <= total).

    Returns (thresh, n_below, n_nonfinite, method): n_below keys are strictly smaller than thresh,
    so the first k - n_below keys equal to thresh (in source order, then flat order) are pruned.
    cand_budget bounds the candidate keys held at once (default: about 2 % of the elements).
    """
    cdef Py_ssize_t total = sum(sizes), j, s_t, lo_r, hi_r, delta
    cdef double q, sig
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside [1, {total}]")
    if cand_budget < 0:
        cand_budget = max(65536, total // 48)
    # 1. sample (or take every key when small)
    samples = []
    for j, (src, n_t) in enumerate(zip(sources, sizes)):
        if n_t == 0:
            continue
        if total <= SMALL:
            s_t = n_t
        else:
            s_t = max(1, (SAMPLE * n_t) // total)
        samples.append(sample_keys(_get(src), s_t, j + 1, magnitude))
    smp = np.concatenate(samples) if samples else np.empty(0, np.uint64)
    s = smp.shape[0]
    if total <= SMALL and s == total:
        lo_key, hi_key = 0, np.iinfo(np.uint64).max
    else:
        q = k / <double>total
        sig = sqrt(s * q * (1.0 - q))
        delta = <Py_ssize_t>ceil(3.5 * sig) + 16
        lo_r = <Py_ssize_t>floor(q * s) - delta
        hi_r = <Py_ssize_t>ceil(q * s) + delta
        lo_key = 0 if lo_r < 0 else int(select_keys(smp, lo_r))
        hi_key = np.iinfo(np.uint64).max if hi_r >= s else int(select_keys(smp, hi_r))
    # 2. range pass
    below = 0
    inside = 0
    bad = 0
    cands = []
    ok = True
    for src, n_t in zip(sources, sizes):
        if n_t == 0:
            continue
        b_t, i_t, bad_t, c_t = range_pass(_get(src), lo_key, hi_key, magnitude, inf16,
                                          cand_budget - inside if ok else 0, n_threads)
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
        cand = np.concatenate(cands) if len(cands) > 1 else cands[0]
        thresh, cbelow = select_keys_below(cand, k - below - 1)
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
            x = _get(src)
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
    cdef int nt = n_threads if nrows * ncols >= PARALLEL_MIN and n_threads > 1 else 1
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
    cdef int nt = n_threads if x.shape[0] * x.shape[1] >= PARALLEL_MIN and n_threads > 1 else 1
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
    cdef int nt = n_threads if out.shape[0] * out.shape[1] >= PARALLEL_MIN and n_threads > 1 else 1
    with nogil:
        for i in prange(out.shape[0], schedule="static", num_threads=nt):
            for j in range(out.shape[1]):
                out[i, j] = bmask[i // bh, j // bw]
