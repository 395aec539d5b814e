"""Typed passes of exact threshold selection: prune the k smallest order keys, ties broken by the
lowest index.

The orchestration of these passes (the sample's bracket, the candidates, the radix fallback, the
tie rule over several tensors, the capped global loop) lives in one Python module,
aprender.pruning.selection; this module holds only the def functions over typed memoryviews that
it calls, each one pass, all parallel and independent of the thread count in their result:

- sample_into / sample_keys: a stratified, hash-scrambled sample of keys (runs of RUN consecutive
  keys at hashed positions inside equal strata), into a buffer of the keys' own width;
- select_keys / sample_bracket / select_hist / count_in: selection and counting on key buffers (a
  radix select that permutes the buffer; the sample's bracket from 16-bit histograms of key -
  min, read-only; a histogram select over 11-bit digits of key - lo that reads several buffers
  without moving or concatenating them);
- mark_pass / gather_marked / fix_positions / fix_marked: the fused in-memory write (mark kept,
  pruned or candidate; gather the candidates' keys and positions; rewrite only marked bytes);
- range_pass: the streaming pass (count keys below the bracket, copy the keys inside it into
  per-task buffers sized from the bracket's expected share, an exact second pass on overflow);
- hist_pass: one 16-bit digit of the radix fallback (NBINS bins);
- write_pass / fill_pass: keep = key > T, pruning the first r keys equal to T in flat order
  (per fixed chunk, then a prefix over the chunks); or a constant mask (k == 0 or k == n);
- rows_mask: per-row selection of rows whose key buffers fit the scratch budget;
- block_sums / expand_blocks: structured (block, row, column) scores and masks.

Scratch is sized by the work, never by the thread count: everything a call holds at once stays
under scratch_budget(input bytes) = max(1 MiB, 4 % of the input's bytes) for smooth data, and the
number of threads (and of per-task slots) is capped by threads_for (_openmp.pxd).

Every def here checks the sizes of the buffers it is given (O(1) checks, typed errors from
aprender.errors), so no call from Python can read or write out of bounds.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.string cimport memset
from cython.parallel cimport prange, threadid

import math

import numpy as np

from ._common cimport real_t, key_t, key_of, inf_keys, apr_u16_to_f64
from ._openmp cimport threads_for
from ._guard import guard
from ..errors import InvalidArgumentError, InvalidShapeError, ShapeMismatchError

cdef enum:
    CHUNK = 65536           # elements per write-pass chunk (fixed: results never depend on it)
    NBINS = 65536           # bins of the radix fallback's 16-bit histograms
    PAD = 8                 # int64 slots per task in result arrays (64 bytes: no false sharing)
    RUN = 8                 # consecutive keys per sample stratum
    SBATCH = 16             # sample strata whose reads are prefetched together
    PREFETCH = 24           # candidates ahead whose mask bytes are prefetched
    DIGIT = 11              # bits per level of the candidates' histogram select
    SCRATCH_MIN = 1048576   # bytes of scratch any call may hold ...
    SCRATCH_DIV = 25        # ... else at most 1 / SCRATCH_DIV (4 %) of the input's bytes
    ROWS_SAMPLE = 16384     # keys sampled across the rows for the per-row bracket
    ROWS_MIN_COLS = 512     # shorter rows (or fewer than ROWS_MIN_ELEMS elements) skip it
    ROWS_MIN_ELEMS = 65536

RUN_KEYS = RUN      # for the engine: a sample buffer needs RUN spare keys
HIST_BINS = NBINS   # for the engine: bins of a hist_pass histogram


def scratch_budget(Py_ssize_t nbytes):
    """Bytes of scratch a kernel call over nbytes of input may hold at once, at any thread count:
    max(1 MiB, 4 % of nbytes)."""
    if nbytes < 0:
        raise InvalidArgumentError(f"nbytes must be >= 0, got {nbytes}")
    return max(<Py_ssize_t>SCRATCH_MIN, nbytes // SCRATCH_DIV)


cdef object _key_dtype(Py_ssize_t itemsize):
    return np.uint16 if itemsize == 2 else (np.uint32 if itemsize == 4 else np.uint64)


cdef inline int _tasks(Py_ssize_t n, int n_threads) noexcept nogil:
    # a range pass splits its input into one contiguous task per thread
    return threads_for(n_threads, n, n)


cdef _check_out(Py_ssize_t n_out, Py_ssize_t n, str what="out"):
    if n_out != n:
        raise ShapeMismatchError(f"{what} holds {n_out} elements, the input {n}")


cdef Py_ssize_t _check_counts(const int64_t[::1] counts, Py_ssize_t n, Py_ssize_t nkeys) except -1:
    """Validate per-task candidate counts of a mark pass; returns their sum."""
    cdef Py_ssize_t t, total = 0, ntask = counts.shape[0]
    if ntask < 1 or ntask > max(n, 1):
        raise InvalidShapeError(f"counts must hold between 1 and {max(n, 1)} tasks, got {ntask}")
    for t in range(ntask):
        if counts[t] < 0 or counts[t] > n:
            raise InvalidArgumentError(f"counts[{t}] = {counts[t]} outside [0, {n}]")
        total += counts[t]
    if total != nkeys:
        raise ShapeMismatchError(f"keys holds {nkeys} keys, the counts add up to {total}")
    return total


# ----------------------------------------------------------------------------------------------
# selection on key buffers
# ----------------------------------------------------------------------------------------------

cdef extern from "apr_keys.h" nogil:
    uint16_t apr_radix_select16(uint16_t* a, Py_ssize_t n, Py_ssize_t rank, Py_ssize_t* below)
    uint32_t apr_radix_select32(uint32_t* a, Py_ssize_t n, Py_ssize_t rank, Py_ssize_t* below)
    uint64_t apr_radix_select64(uint64_t* a, Py_ssize_t n, Py_ssize_t rank, Py_ssize_t* below)


cdef inline uint64_t _radix_select(key_t* a, Py_ssize_t n, Py_ssize_t rank,
                                   Py_ssize_t* below) noexcept nogil:
    if key_t is uint16_t:
        return apr_radix_select16(a, n, rank, below)
    elif key_t is uint32_t:
        return apr_radix_select32(a, n, rank, below)
    else:
        return apr_radix_select64(a, n, rank, below)


def select_keys(key_t[::1] keys not None, Py_ssize_t rank):
    """rank-th smallest key (0-based) of a key buffer by the branch-free MSD radix select
    (worst-case linear); only permutes the buffer."""
    return select_keys_below(keys, rank)[0]


def select_keys_below(key_t[::1] keys not None, Py_ssize_t rank):
    """(rank-th smallest key, number of keys strictly below it); only permutes keys."""
    cdef Py_ssize_t n = keys.shape[0], below = 0
    cdef uint64_t out
    if not 0 <= rank < n:
        raise InvalidArgumentError(f"rank {rank} outside [0, {n}) for {n} keys")
    with nogil:
        out = _radix_select(&keys[0], n, rank, &below)
    return out, below


cdef extern from "apr_keys.h" nogil:
    Py_ssize_t apr_bracket16(const uint16_t* a, Py_ssize_t n, Py_ssize_t r_lo, Py_ssize_t r_hi,
                             uint16_t* lo, uint16_t* hi, int32_t* hist)
    Py_ssize_t apr_bracket32(const uint32_t* a, Py_ssize_t n, Py_ssize_t r_lo, Py_ssize_t r_hi,
                             uint32_t* lo, uint32_t* hi, int32_t* hist)
    Py_ssize_t apr_bracket64(const uint64_t* a, Py_ssize_t n, Py_ssize_t r_lo, Py_ssize_t r_hi,
                             uint64_t* lo, uint64_t* hi, int32_t* hist)


def sample_bracket(const key_t[::1] keys not None, Py_ssize_t r_lo, Py_ssize_t r_hi):
    """(lo, hi, inside): keys lo <= hi that bracket the keys of ranks r_lo..r_hi (0-based) of the
    buffer, histogram bin edges close to them, and the number of keys inside [lo, hi].  Reads
    the buffer only."""
    cdef Py_ssize_t n = keys.shape[0], inside = 0
    cdef uint16_t l16 = 0, h16 = 0
    cdef uint32_t l32 = 0, h32 = 0
    cdef uint64_t l64 = 0, h64 = 0
    if not 0 <= r_lo <= r_hi < n:
        raise InvalidArgumentError(f"ranks ({r_lo}, {r_hi}) must satisfy 0 <= r_lo <= r_hi < "
                                   f"{n} for {n} keys")
    if n > 0x7FFFFFFF:  # 32-bit bin counts: a sample, never a tensor
        raise InvalidArgumentError(f"{n} keys: a sample bracket takes at most 2**31 - 1")
    cdef int32_t[::1] hist = np.empty(HIST_BINS, dtype=np.int32)
    with nogil:
        if key_t is uint16_t:
            inside = apr_bracket16(&keys[0], n, r_lo, r_hi, &l16, &h16, &hist[0])
            l64, h64 = l16, h16
        elif key_t is uint32_t:
            inside = apr_bracket32(&keys[0], n, r_lo, r_hi, &l32, &h32, &hist[0])
            l64, h64 = l32, h32
        else:
            inside = apr_bracket64(&keys[0], n, r_lo, r_hi, &l64, &h64, &hist[0])
    return l64, h64, inside


cdef void _level_hist(const key_t* a, Py_ssize_t n, uint64_t lo, int shift, uint64_t dmask,
                      uint64_t pmask, uint64_t prefix, int64_t* hist) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint64_t d
    for i in range(n):
        d = <uint64_t>a[i] - lo
        if (d & pmask) == prefix:
            hist[(d >> shift) & dmask] += 1


cdef int _segment_hist(object seg, uint64_t lo, int shift, uint64_t dmask, uint64_t pmask,
                       uint64_t prefix, int64_t* hist) except -1:
    cdef const uint16_t[::1] v16
    cdef const uint32_t[::1] v32
    cdef const uint64_t[::1] v64
    if seg.shape[0] == 0:
        return 0
    if seg.dtype == np.uint16:
        v16 = seg
        with nogil:
            _level_hist(&v16[0], v16.shape[0], lo, shift, dmask, pmask, prefix, hist)
    elif seg.dtype == np.uint32:
        v32 = seg
        with nogil:
            _level_hist(&v32[0], v32.shape[0], lo, shift, dmask, pmask, prefix, hist)
    else:
        v64 = seg
        with nogil:
            _level_hist(&v64[0], v64.shape[0], lo, shift, dmask, pmask, prefix, hist)
    return 0


def select_hist(segments, Py_ssize_t rank, uint64_t lo, uint64_t hi):
    """(rank-th smallest key over the key arrays in segments, number of keys strictly below it),
    every key in [lo, hi].  A histogram of 11-bit digits of key - lo per level, top digit first
    (at most 6 levels for 64-bit keys, 3 for 32-bit): the keys are read, never moved or
    concatenated."""
    cdef Py_ssize_t total = 0, acc, below = 0
    cdef int64_t hist[2048]
    cdef uint64_t span, dmask, pmask = 0, prefix = 0
    cdef int top = 0, w, shift, b
    segs = []
    dt = None
    for seg in segments:
        seg = np.asarray(seg)
        if seg.ndim != 1 or seg.dtype not in (np.uint16, np.uint32, np.uint64):
            raise InvalidArgumentError(f"select_hist takes 1-d uint16/uint32/uint64 key arrays, "
                                       f"got {seg.dtype} of shape {seg.shape}")
        if dt is None:
            dt = seg.dtype
        elif seg.dtype != dt:
            raise InvalidArgumentError(f"key arrays of one width expected, got {dt} and "
                                       f"{seg.dtype}")
        segs.append(np.ascontiguousarray(seg))
        total += seg.shape[0]
    if not 0 <= rank < total:
        raise InvalidArgumentError(f"rank {rank} outside [0, {total}) for {total} keys")
    if hi < lo:
        raise InvalidArgumentError(f"bracket lo={lo} > hi={hi}")
    span = hi - lo
    while top < 64 and (span >> top) != 0:
        top += 1
    if top == 0:
        return lo, 0
    while True:
        w = DIGIT if top > DIGIT else top
        shift = top - w
        dmask = ((<uint64_t>1) << w) - 1
        memset(hist, 0, sizeof(hist))
        for seg in segs:
            _segment_hist(seg, lo, shift, dmask, pmask, prefix, hist)
        acc = 0
        b = 0
        while b <= <int>dmask and acc + hist[b] <= rank:
            acc += hist[b]
            b += 1
        if b > <int>dmask:
            raise InvalidArgumentError(f"keys outside the bracket [{lo}, {hi}]")
        rank -= acc
        below += acc
        prefix |= (<uint64_t>b) << shift
        pmask |= dmask << shift
        if shift == 0:
            return lo + prefix, below
        top = shift

# ----------------------------------------------------------------------------------------------
# per-tensor passes (raw pointers inside; the def wrappers below expose them per dtype)
# ----------------------------------------------------------------------------------------------

cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    # splitmix64 finaliser: a fixed, seedless scramble (results are reproducible)
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef extern from "apr_keys.h" nogil:
    void apr_prefetch(const void* p)
    void apr_prefetch_w(const void* p)


cdef inline Py_ssize_t _stratum_start(Py_ssize_t n, Py_ssize_t nstrata, Py_ssize_t j,
                                      uint64_t salt) noexcept nogil:
    # the run of stratum j starts at a hashed offset inside it (multiply-shift, no division)
    cdef Py_ssize_t a = (j * n) // nstrata, b = ((j + 1) * n) // nstrata
    cdef uint64_t span = <uint64_t>(b - a - RUN + 1)
    cdef uint64_t h = _mix(salt * 0x9e3779b97f4a7c15ULL + <uint64_t>j)
    if span <= 0xFFFFFFFFULL:
        return a + <Py_ssize_t>(((h >> 32) * span) >> 32)
    return a + <Py_ssize_t>(h % span)


cdef void _sample_batch(const real_t* x, Py_ssize_t n, Py_ssize_t nstrata, Py_ssize_t j0,
                        uint64_t salt, int magnitude, key_t* out) noexcept nogil:
    # strata [j0, j0 + SBATCH): every run is prefetched before the first is read, so their
    # cache misses overlap instead of following one another
    cdef Py_ssize_t st[SBATCH]
    cdef Py_ssize_t j, i, j1 = min(j0 + SBATCH, nstrata)
    for j in range(j0, j1):
        st[j - j0] = _stratum_start(n, nstrata, j, salt)
        apr_prefetch(&x[st[j - j0]])
        apr_prefetch(&x[st[j - j0] + RUN - 1])
    for j in range(j0, j1):
        for i in range(RUN):
            out[j * RUN + i] = <key_t>key_of(x[st[j - j0] + i], magnitude)


cdef Py_ssize_t _sample(const real_t* x, Py_ssize_t n, Py_ssize_t s, uint64_t salt, int magnitude,
                        key_t* out, int nt) noexcept nogil:
    """At most s keys (all n when s >= n): s / RUN equal strata of x, from each a run of RUN
    consecutive keys starting at a hashed position inside the stratum (runs keep the reads
    cache-friendly; every stratum holds more than RUN keys because s < n).  Writes at most
    min(s, n) keys to out."""
    cdef Py_ssize_t j, i, nstrata
    if s >= n:
        for i in range(n):
            out[i] = <key_t>key_of(x[i], magnitude)
        return n
    if s < RUN or n < 2 * RUN:
        # too few for runs: s single keys, one from each of s equal strata (never more than s)
        for j in range(s):
            out[j] = <key_t>key_of(x[(j * n) // s], magnitude)
        return s
    nstrata = s // RUN
    for j in prange(0, nstrata, SBATCH, schedule="static", num_threads=nt):
        _sample_batch(x, n, nstrata, j, salt, magnitude, out)
    return nstrata * RUN


cdef extern from "apr_keys.h" nogil:
    void apr_range16(const uint16_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint16_t lo,
                     uint16_t hi, uint16_t khi, uint16_t klo, uint16_t* buf, Py_ssize_t cap,
                     int64_t* res)
    void apr_range32(const uint32_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint32_t lo,
                     uint32_t hi, uint32_t khi, uint32_t klo, uint32_t* buf, Py_ssize_t cap,
                     int64_t* res)
    void apr_range64(const uint64_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint64_t lo,
                     uint64_t hi, uint64_t khi, uint64_t klo, uint64_t* buf, Py_ssize_t cap,
                     int64_t* res)
    void apr_mark16(const uint16_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint16_t lo,
                    uint16_t hi, uint16_t khi, uint16_t klo, uint8_t* out, int64_t* res)
    void apr_mark32(const uint32_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint32_t lo,
                    uint32_t hi, uint32_t khi, uint32_t klo, uint8_t* out, int64_t* res)
    void apr_mark64(const uint64_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint64_t lo,
                    uint64_t hi, uint64_t khi, uint64_t klo, uint8_t* out, int64_t* res)
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
                             void* buf, Py_ssize_t cap, int64_t* res) noexcept nogil:
    if real_t is float:
        apr_range32(<const uint32_t*>x, s, e, magnitude, <uint32_t>lo, <uint32_t>hi,
                    <uint32_t>khi, <uint32_t>klo, <uint32_t*>buf, cap, res)
    elif real_t is double:
        apr_range64(<const uint64_t*>x, s, e, magnitude, lo, hi, khi, klo, <uint64_t*>buf, cap,
                    res)
    else:
        apr_range16(x, s, e, magnitude, <uint16_t>lo, <uint16_t>hi, <uint16_t>khi,
                    <uint16_t>klo, <uint16_t*>buf, cap, res)


cdef inline void _mark_task(const real_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                            uint64_t lo, uint64_t hi, uint64_t khi, uint64_t klo,
                            uint8_t* out, int64_t* res) noexcept nogil:
    if real_t is float:
        apr_mark32(<const uint32_t*>x, s, e, magnitude, <uint32_t>lo, <uint32_t>hi,
                   <uint32_t>khi, <uint32_t>klo, out, res)
    elif real_t is double:
        apr_mark64(<const uint64_t*>x, s, e, magnitude, lo, hi, khi, klo, out, res)
    else:
        apr_mark16(x, s, e, magnitude, <uint16_t>lo, <uint16_t>hi, <uint16_t>khi,
                   <uint16_t>klo, out, res)


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

def sample_keys(x, Py_ssize_t s, uint64_t salt, int magnitude, int n_threads=1, out=None):
    """Stratified sample of about s keys (all of them if x is not longer), written into out
    (keys at least as wide as x's elements, holding at least min(s, len(x)) of them; a new
    buffer of x's own width when None).  Returns the filled part."""
    x = np.asarray(x)
    if out is None:
        out = np.empty(max(min(s, x.shape[0] if x.ndim == 1 else 0), 0), _key_dtype(x.itemsize))
    w = sample_into(x, s, salt, magnitude, n_threads, out)
    return np.asarray(out)[:w]


def sample_into(const real_t[::1] x not None, Py_ssize_t s, uint64_t salt, int magnitude,
                int n_threads, key_t[::1] out not None):
    """Write the sample_keys sample into out; returns how many keys it wrote."""
    cdef Py_ssize_t n = x.shape[0], w, want
    if sizeof(key_t) < sizeof(real_t):
        raise InvalidArgumentError(f"out holds {8 * sizeof(key_t)}-bit keys; keys of "
                                   f"{8 * sizeof(real_t)}-bit values do not fit")
    if n == 0 or s <= 0:
        return 0
    want = min(s, n)
    if out.shape[0] < want:
        raise ShapeMismatchError(f"out holds {out.shape[0]} keys, the sample needs {want}")
    cdef int nt = threads_for(n_threads, want, (want + RUN - 1) // RUN)
    with nogil:
        w = _sample(&x[0], n, s, salt, magnitude, &out[0], nt)
    return w


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


def range_pass(const real_t[::1] x not None, uint64_t lo, uint64_t hi, int magnitude,
               uint16_t inf16, Py_ssize_t cap, int n_threads, double expect=1.0):
    """Count keys < lo and copy keys in [lo, hi] (native keys, at most cap in all).  Each task
    of the pass holds at most its share of cap, and no more than about twice what ``expect``
    (the expected fraction of keys inside the bracket) predicts for it; when a task finds more
    (this tensor is denser around the threshold than the sample said) a second pass copies the
    candidates into a buffer of exactly their number.  Returns (n_below, n_inside, n_nonfinite,
    candidates, or None when more than cap fell inside)."""
    cdef Py_ssize_t n = x.shape[0], t, w = 0, ntask = _tasks(n, n_threads), per, guess
    cdef uint64_t khi, klo
    cdef Py_ssize_t below = 0, inside = 0, bad = 0, c
    cdef bint overflow = False
    cdef int64_t[::1] off, res2
    if not expect >= 0.0:  # also refuses NaN
        raise InvalidArgumentError(f"expect must be a fraction >= 0, got {expect}")
    if n == 0:
        return 0, 0, 0, np.empty(0, _key_dtype(sizeof(real_t)))
    expect = min(expect, 1.0)
    per = cap // ntask + 1 if cap > 0 else 1
    guess = <Py_ssize_t>(2.0 * expect * (<double>n / ntask)) + 64
    if guess < per:
        per = guess
    cdef int64_t[::1] res = np.zeros(ntask * PAD, dtype=np.int64)
    buf = np.empty(ntask * (per + 1), dtype=_key_dtype(sizeof(real_t)))
    cdef uint8_t[::1] bytes_ = buf.view(np.uint8)
    cdef char* bp = <char*>&bytes_[0]
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=ntask):
            _range_task(&x[0], (t * n) // ntask, ((t + 1) * n) // ntask, magnitude, lo, hi,
                        khi, klo, bp + t * (per + 1) * sizeof(real_t), per, &res[t * PAD])
    below, inside, bad, overflow = _sum_tasks(res, ntask, per)
    if inside > cap or bad:
        return below, inside, bad, None
    if overflow:
        # exact shares: task t copies its res[t] candidates to off[t] (+1 slot each, unused)
        del buf, bytes_
        off = np.zeros(ntask + 1, dtype=np.int64)
        for t in range(ntask):
            off[t + 1] = off[t] + res[t * PAD + 1] + 1
        buf = np.empty(off[ntask], dtype=_key_dtype(sizeof(real_t)))
        bytes_ = buf.view(np.uint8)
        bp = <char*>&bytes_[0]
        res2 = np.zeros(ntask * PAD, dtype=np.int64)
        with nogil:
            for t in prange(ntask, schedule="static", num_threads=ntask):
                _range_task(&x[0], (t * n) // ntask, ((t + 1) * n) // ntask, magnitude, lo, hi,
                            khi, klo, bp + off[t] * sizeof(real_t), off[t + 1] - off[t] - 1,
                            &res2[t * PAD])
        for t in range(ntask):
            c = res[t * PAD + 1]
            if res2[t * PAD + 1] != c:  # the values changed under us (a memory map rewritten)
                return below, inside, bad, None
            if c:
                buf[w:w + c] = buf[off[t]:off[t] + c]
                w += c
        return below, inside, bad, buf[:w]
    for t in range(ntask):
        if res[t * PAD + 1]:
            buf[w:w + res[t * PAD + 1]] = buf[t * (per + 1):t * (per + 1) + res[t * PAD + 1]]
            w += res[t * PAD + 1]
    return below, inside, bad, buf[:w]  # a view: the buffer is about twice the candidates


def mark_pass(const real_t[::1] x not None, uint64_t lo, uint64_t hi, int magnitude,
              uint16_t inf16, uint8_t[::1] out not None, int n_threads):
    """out[i] = 1 (key > hi), 0 (key < lo) or 2 (key in [lo, hi]: a candidate).  Returns
    (n_below, n_inside, n_nonfinite, counts): counts[t] candidates lie in task t's part
    [t * n // T, (t + 1) * n // T) of x, T = len(counts) (for gather_marked and fix_marked)."""
    cdef Py_ssize_t n = x.shape[0], t, ntask = _tasks(n, n_threads)
    cdef Py_ssize_t below = 0, inside = 0, bad = 0
    cdef uint64_t khi, klo
    _check_out(out.shape[0], n)
    if n == 0:
        return 0, 0, 0, np.zeros(1, np.int64)
    cdef int64_t[::1] res = np.zeros(ntask * PAD, dtype=np.int64)
    counts = np.empty(ntask, dtype=np.int64)
    cdef int64_t[::1] cv = counts
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=ntask):
            _mark_task(&x[0], (t * n) // ntask, ((t + 1) * n) // ntask, magnitude, lo, hi,
                       khi, klo, &out[0], &res[t * PAD])
    for t in range(ntask):
        below += res[t * PAD]
        inside += res[t * PAD + 1]
        bad += res[t * PAD + 2]
        cv[t] = res[t * PAD + 1]
    return below, inside, bad, counts


cdef extern from "apr_keys.h" nogil:
    void apr_markc16(const uint16_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint16_t lo,
                     uint16_t hi, uint16_t khi, uint16_t klo, uint8_t* out, int64_t* res,
                     uint16_t* keys, uint32_t* pos, Py_ssize_t cap)
    void apr_markc32(const uint32_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint32_t lo,
                     uint32_t hi, uint32_t khi, uint32_t klo, uint8_t* out, int64_t* res,
                     uint32_t* keys, uint32_t* pos, Py_ssize_t cap)
    void apr_markc64(const uint64_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude, uint64_t lo,
                     uint64_t hi, uint64_t khi, uint64_t klo, uint8_t* out, int64_t* res,
                     uint64_t* keys, uint32_t* pos, Py_ssize_t cap)


cdef extern from "apr_keys.h" nogil:
    void apr_mark_init()
    int apr_mark_simd(int on)


apr_mark_init()


def simd(on=None):
    """Whether the mark pass (mark_pass, mark_collect and the per-row pass) runs its AVX2 loop;
    on=False switches to the scalar loop (same marks, counts and candidates), on=True back where
    the CPU has it.  For tests and benchmarks."""
    return bool(apr_mark_simd(-1 if on is None else (1 if on else 0)))


cdef inline void _markc_task(const real_t* x, Py_ssize_t s, Py_ssize_t e, int magnitude,
                             uint64_t lo, uint64_t hi, uint64_t khi, uint64_t klo, uint8_t* out,
                             int64_t* res, void* keys, uint32_t* pos,
                             Py_ssize_t cap) noexcept nogil:
    if real_t is float:
        apr_markc32(<const uint32_t*>x, s, e, magnitude, <uint32_t>lo, <uint32_t>hi,
                    <uint32_t>khi, <uint32_t>klo, out, res, <uint32_t*>keys, pos, cap)
    elif real_t is double:
        apr_markc64(<const uint64_t*>x, s, e, magnitude, lo, hi, khi, klo, out, res,
                    <uint64_t*>keys, pos, cap)
    else:
        apr_markc16(x, s, e, magnitude, <uint16_t>lo, <uint16_t>hi, <uint16_t>khi,
                    <uint16_t>klo, out, res, <uint16_t*>keys, pos, cap)


def mark_collect(const real_t[::1] x not None, uint64_t lo, uint64_t hi, int magnitude,
                 uint16_t inf16, uint8_t[::1] out not None, keys not None,
                 uint32_t[::1] pos not None, int n_threads):
    """mark_pass that also collects the candidates' keys (keys of x's own width) and positions
    while each block's mask bytes are in cache: task t of T writes into
    keys/pos[t * C:(t + 1) * C], C = len(keys) // T, T = the tasks mark_pass would use.
    Returns (n_below, n_inside, n_nonfinite, counts, got): counts as mark_pass's; got[t]
    candidates collected by task t, in flat order, or None when a task's did not fit (the marks
    are complete either way: gather_marked then reads them).  Fewer than 2**32 elements."""
    cdef Py_ssize_t n = x.shape[0], t, ntask = _tasks(n, n_threads), per
    cdef Py_ssize_t below = 0, inside = 0, bad = 0
    cdef uint64_t khi, klo
    cdef bint fits = True
    cdef char* kp
    _check_out(out.shape[0], n)
    if n > <Py_ssize_t>0xFFFFFFFF:
        raise InvalidShapeError(f"32-bit positions cannot index {n} elements")
    kv = np.asarray(keys)
    if kv.ndim != 1 or kv.dtype != _key_dtype(sizeof(real_t)) or not kv.flags.c_contiguous \
            or not kv.flags.writeable:
        raise InvalidArgumentError(f"keys must be a writeable contiguous 1-d "
                                   f"uint{8 * sizeof(real_t)} array for these values")
    if pos.shape[0] != kv.shape[0]:
        raise ShapeMismatchError(f"pos holds {pos.shape[0]} positions, keys {kv.shape[0]}")
    if n == 0:
        return 0, 0, 0, np.zeros(1, np.int64), np.zeros(1, np.int64)
    per = kv.shape[0] // ntask
    cdef uint8_t[::1] kbytes = kv.view(np.uint8)
    kp = <char*>&kbytes[0] if kv.shape[0] else NULL
    cdef uint32_t* pp = &pos[0] if pos.shape[0] else NULL
    cdef int64_t[::1] res = np.zeros(ntask * PAD, dtype=np.int64)
    counts = np.empty(ntask, dtype=np.int64)
    got = np.empty(ntask, dtype=np.int64)
    cdef int64_t[::1] cv = counts
    cdef int64_t[::1] gv = got
    inf_keys(<real_t*>&x[0], inf16, magnitude, &khi, &klo)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=ntask):
            _markc_task(&x[0], (t * n) // ntask, ((t + 1) * n) // ntask, magnitude, lo, hi,
                        khi, klo, &out[0], &res[t * PAD],
                        kp + t * per * <Py_ssize_t>sizeof(real_t) if kp != NULL else NULL,
                        pp + t * per if pp != NULL else NULL, per)
    for t in range(ntask):
        below += res[t * PAD]
        inside += res[t * PAD + 1]
        bad += res[t * PAD + 2]
        cv[t] = res[t * PAD + 1]
        gv[t] = res[t * PAD + 3]
        if gv[t] < 0:
            fits = False
    return below, inside, bad, counts, (got if fits else None)


cdef extern from "apr_keys.h" nogil:
    Py_ssize_t apr_gather16(const uint16_t* x, const uint8_t* out, Py_ssize_t s, Py_ssize_t e,
                            int magnitude, uint16_t* keys, uint32_t* pos, Py_ssize_t cap)
    Py_ssize_t apr_gather32(const uint32_t* x, const uint8_t* out, Py_ssize_t s, Py_ssize_t e,
                            int magnitude, uint32_t* keys, uint32_t* pos, Py_ssize_t cap)
    Py_ssize_t apr_gather64(const uint64_t* x, const uint8_t* out, Py_ssize_t s, Py_ssize_t e,
                            int magnitude, uint64_t* keys, uint32_t* pos, Py_ssize_t cap)
    Py_ssize_t apr_fix_marks16(uint8_t* out, Py_ssize_t s, Py_ssize_t e, const uint16_t* keys,
                               Py_ssize_t cap, uint16_t t, Py_ssize_t seen, Py_ssize_t r)
    Py_ssize_t apr_fix_marks32(uint8_t* out, Py_ssize_t s, Py_ssize_t e, const uint32_t* keys,
                               Py_ssize_t cap, uint32_t t, Py_ssize_t seen, Py_ssize_t r)
    Py_ssize_t apr_fix_marks64(uint8_t* out, Py_ssize_t s, Py_ssize_t e, const uint64_t* keys,
                               Py_ssize_t cap, uint64_t t, Py_ssize_t seen, Py_ssize_t r)


cdef inline Py_ssize_t _gather_task(const real_t* x, const uint8_t* out, Py_ssize_t s,
                                    Py_ssize_t e, int magnitude, void* keys, uint32_t* pos,
                                    Py_ssize_t cap) noexcept nogil:
    if real_t is float:
        return apr_gather32(<const uint32_t*>x, out, s, e, magnitude, <uint32_t*>keys, pos, cap)
    elif real_t is double:
        return apr_gather64(<const uint64_t*>x, out, s, e, magnitude, <uint64_t*>keys, pos, cap)
    else:
        return apr_gather16(x, out, s, e, magnitude, <uint16_t*>keys, pos, cap)


cdef inline Py_ssize_t _fix_task(uint8_t* out, Py_ssize_t s, Py_ssize_t e, const key_t* keys,
                                 Py_ssize_t cap, key_t t, Py_ssize_t seen,
                                 Py_ssize_t r) noexcept nogil:
    if key_t is uint16_t:
        return apr_fix_marks16(out, s, e, keys, cap, t, seen, r)
    elif key_t is uint32_t:
        return apr_fix_marks32(out, s, e, keys, cap, t, seen, r)
    else:
        return apr_fix_marks64(out, s, e, keys, cap, t, seen, r)


def gather_marked(const real_t[::1] x not None, const uint8_t[::1] out not None,
                  const int64_t[::1] counts not None, int magnitude, key_t[::1] keys not None,
                  int n_threads, uint32_t[::1] pos=None):
    """The keys of the candidates marked 2 by mark_pass, in flat order, into keys (exactly
    sum(counts) of them, keys of x's own width), and their positions into pos when given (as
    many; only for fewer than 2**32 elements)."""
    cdef Py_ssize_t n = x.shape[0], ntask = counts.shape[0], t
    cdef uint32_t* pp = NULL
    _check_out(out.shape[0], n)
    if sizeof(key_t) != sizeof(real_t):
        raise InvalidArgumentError(f"keys must be {8 * sizeof(real_t)}-bit for these values, "
                                   f"got {8 * sizeof(key_t)}-bit")
    _check_counts(counts, n, keys.shape[0])
    if pos is not None:
        if pos.shape[0] != keys.shape[0]:
            raise ShapeMismatchError(f"pos holds {pos.shape[0]} positions, keys {keys.shape[0]}")
        if n > <Py_ssize_t>0xFFFFFFFF:
            raise InvalidShapeError(f"32-bit positions cannot index {n} elements")
    if keys.shape[0] == 0:
        return 0
    if pos is not None:
        pp = &pos[0]
    cdef int64_t[::1] off = np.zeros(ntask + 1, dtype=np.int64)
    cdef int64_t[::1] got = np.zeros(ntask, dtype=np.int64)
    for t in range(ntask):
        off[t + 1] = off[t] + counts[t]
    cdef int nt = threads_for(n_threads, n, ntask)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=nt):
            got[t] = _gather_task(&x[0], &out[0], (t * n) // ntask, ((t + 1) * n) // ntask,
                                  magnitude, <void*>(&keys[0] + off[t]),
                                  pp + off[t] if pp != NULL else NULL, off[t + 1] - off[t])
    for t in range(ntask):
        if got[t] != counts[t]:
            raise InvalidArgumentError(f"task {t} holds {got[t]} marked candidates, counts says "
                                       f"{counts[t]}")
    return keys.shape[0]


def fix_marked(uint8_t[::1] out not None, const int64_t[::1] counts not None,
               const key_t[::1] keys not None, uint64_t thresh, Py_ssize_t r, int n_threads):
    """Decide the candidates marked 2, in flat order: keep key > thresh, prune key < thresh,
    prune the first r keys equal to thresh and keep the others.  keys: the candidates' keys in
    flat order (gather_marked).  Returns how many equal keys it pruned (min(r, number equal))."""
    cdef Py_ssize_t n = out.shape[0], ntask = counts.shape[0], t, j, eqs = 0
    cdef key_t tk = <key_t>thresh
    _check_counts(counts, n, keys.shape[0])
    if r < 0:
        r = 0
    if keys.shape[0] == 0:
        return 0
    cdef int64_t[::1] off = np.zeros(ntask + 1, dtype=np.int64)
    cdef int64_t[::1] eqb = np.zeros(ntask + 1, dtype=np.int64)
    for t in range(ntask):
        off[t + 1] = off[t] + counts[t]
    with nogil:
        for t in range(ntask):
            for j in range(off[t], off[t + 1]):
                eqs += keys[j] == tk
            eqb[t + 1] = eqs
    cdef int nt = threads_for(n_threads, n, ntask)
    with nogil:
        for t in prange(ntask, schedule="static", num_threads=nt):
            _fix_task(&out[0], (t * n) // ntask, ((t + 1) * n) // ntask, &keys[0] + off[t],
                      off[t + 1] - off[t], tk, eqb[t], r)
    return min(r, eqs)


def fix_positions(uint8_t[::1] out not None, const uint32_t[::1] pos not None,
                  const key_t[::1] keys not None, uint64_t thresh, Py_ssize_t r, int n_threads):
    """fix_marked with the candidates' positions (gather_marked's pos) instead of a scan of
    the mask: out[pos[j]] = keys[j] > thresh, except that the first r keys equal to thresh (in
    the order given: flat order from gather_marked) are pruned and the others kept.  Positions
    outside out are skipped.  Returns how many equal keys it pruned (min(r, number equal))."""
    cdef Py_ssize_t n = out.shape[0], m = keys.shape[0], nch, c, j, j0, j1, eqs = 0, seen
    cdef key_t tk = <key_t>thresh, kk
    cdef int eq
    cdef uint32_t q
    if pos.shape[0] != m:
        raise ShapeMismatchError(f"pos holds {pos.shape[0]} positions, keys {m}")
    if r < 0:
        r = 0
    if m == 0:
        return 0
    nch = (m + CHUNK - 1) // CHUNK
    cdef int64_t[::1] eqb = np.zeros(nch + 1, dtype=np.int64)
    with nogil:
        for c in range(nch):
            for j in range(c * CHUNK, min(m, (c + 1) * CHUNK)):
                eqs += keys[j] == tk
            eqb[c + 1] = eqs
    cdef int nt = threads_for(n_threads, m * 16, nch)  # a random write costs ~16 streamed bytes
    with nogil:
        for c in prange(nch, schedule="static", num_threads=nt):
            j0 = c * CHUNK
            j1 = min(m, j0 + CHUNK)
            seen = eqb[c]
            for j in range(j0, j1):
                if j + PREFETCH < j1:
                    # sorted, sparse writes: the hardware prefetcher does not follow them
                    apr_prefetch_w(&out[0] + (pos[j + PREFETCH] if pos[j + PREFETCH] < n else 0))
                kk = keys[j]
                q = pos[j]
                eq = kk == tk
                if q < n:
                    out[q] = <uint8_t>((kk > tk) | (eq & (seen >= r)))
                seen = seen + eq
    return min(r, eqs)


def hist_pass(const real_t[::1] x not None, int shift, uint64_t prefix, uint64_t pmask,
              int magnitude, uint16_t inf16, int64_t[::1] hist not None, int n_threads):
    """Add to hist (65536 bins) the 16-bit digit at shift of every key whose bits under pmask
    equal prefix.  Returns the number of non-finite values.  Per-task histograms (512 KiB each)
    are bounded by the scratch budget, so the task count may be below the thread count."""
    cdef Py_ssize_t n = x.shape[0], t, i, ntask = _tasks(n, n_threads), fit
    cdef uint64_t khi, klo
    cdef Py_ssize_t bad = 0
    if hist.shape[0] != NBINS:
        raise ShapeMismatchError(f"hist must hold {NBINS} bins, got {hist.shape[0]}")
    if not 0 <= shift < 8 * <int>sizeof(real_t):
        raise InvalidArgumentError(f"shift {shift} outside [0, {8 * sizeof(real_t)}) for "
                                   f"{8 * sizeof(real_t)}-bit keys")
    if n == 0:
        return 0
    fit = scratch_budget(n * <Py_ssize_t>sizeof(real_t)) // (NBINS * 8) - 1
    if ntask > fit:
        ntask = max(fit, 1)
    cdef int64_t[::1] res = np.zeros(ntask * PAD, dtype=np.int64)
    cdef int64_t[::1] local
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


def write_pass(const real_t[::1] x not None, uint64_t thresh, Py_ssize_t r, int magnitude,
               uint8_t[::1] out not None, int n_threads):
    """keep = key > thresh, except that the first r keys equal to thresh (flat order) are pruned
    and the rest kept.  Returns how many equal keys it pruned (min(r, number equal))."""
    cdef Py_ssize_t n = x.shape[0], c, nch = (n + CHUNK - 1) // CHUNK, total = 0, first
    cdef int nt = threads_for(n_threads, n, nch)
    _check_out(out.shape[0], n)
    if n == 0:
        return 0
    if r < 0:
        r = 0
    cdef int64_t[::1] eq = np.zeros(nch, dtype=np.int64)
    cdef int64_t[::1] before = np.zeros(nch, dtype=np.int64)
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
    int64_t apr_zero_below16(uint16_t* x, Py_ssize_t s, Py_ssize_t e, uint16_t t, int64_t* below)
    int64_t apr_zero_below32(uint32_t* x, Py_ssize_t s, Py_ssize_t e, uint32_t t, int64_t* below)
    int64_t apr_zero_below64(uint64_t* x, Py_ssize_t s, Py_ssize_t e, uint64_t t, int64_t* below)
    void apr_zero_equal16(uint16_t* x, Py_ssize_t s, Py_ssize_t e, uint16_t t, Py_ssize_t count)
    void apr_zero_equal32(uint32_t* x, Py_ssize_t s, Py_ssize_t e, uint32_t t, Py_ssize_t count)
    void apr_zero_equal64(uint64_t* x, Py_ssize_t s, Py_ssize_t e, uint64_t t, Py_ssize_t count)


cdef inline int64_t _zero_below(key_t* x, Py_ssize_t s, Py_ssize_t e, uint64_t t,
                                int64_t* below) noexcept nogil:
    if key_t is uint16_t:
        return apr_zero_below16(x, s, e, <uint16_t>t, below)
    elif key_t is uint32_t:
        return apr_zero_below32(x, s, e, <uint32_t>t, below)
    else:
        return apr_zero_below64(x, s, e, t, below)


cdef inline void _zero_equal(key_t* x, Py_ssize_t s, Py_ssize_t e, uint64_t t,
                             Py_ssize_t count) noexcept nogil:
    if key_t is uint16_t:
        apr_zero_equal16(x, s, e, <uint16_t>t, count)
    elif key_t is uint32_t:
        apr_zero_equal32(x, s, e, <uint32_t>t, count)
    else:
        apr_zero_equal64(x, s, e, t, count)


def zero_pass(key_t[::1] words not None, uint64_t thresh, Py_ssize_t r, int n_threads):
    """The dense write of a magnitude selection without a mask, in place on raw float words
    (a chunk of a tensor, in flat order): words whose magnitude key is below thresh (a native
    magnitude key, find_threshold's) become +0.0, and so do the first r words whose key equals
    thresh; the others are left as they are.  Returns (equal keys zeroed: min(r, number equal),
    words kept), so that a caller streaming chunks passes r minus the first on to the next."""
    cdef Py_ssize_t n = words.shape[0], c, nch = (n + CHUNK - 1) // CHUNK, total = 0, below = 0
    cdef Py_ssize_t first
    cdef int nt = threads_for(n_threads, n, nch)
    if n == 0:
        return 0, 0
    if r < 0:
        r = 0
    cdef int64_t[::1] eq = np.zeros(nch, dtype=np.int64)
    cdef int64_t[::1] lt = np.zeros(nch, dtype=np.int64)
    cdef int64_t[::1] before = np.zeros(nch, dtype=np.int64)
    with nogil:
        for c in prange(nch, schedule="static", num_threads=nt):
            eq[c] = _zero_below(&words[0], c * CHUNK, min(n, (c + 1) * CHUNK), thresh, &lt[c])
        for c in range(nch):
            before[c] = total
            total += eq[c]
            below += lt[c]
        if r > 0 and total > 0:
            for c in prange(nch, schedule="static", num_threads=nt):
                first = r - before[c]
                if eq[c] > 0 and first > 0:
                    _zero_equal(&words[0], c * CHUNK, min(n, (c + 1) * CHUNK), thresh,
                                min(first, eq[c]))
    return min(r, total), n - below - min(r, total)


def fill_pass(const real_t[::1] x not None, uint8_t value, int magnitude, uint16_t inf16,
              uint8_t[::1] out not None, int n_threads):
    """out[:] = value; returns the number of non-finite inputs (k == 0 or k == n)."""
    cdef Py_ssize_t n = x.shape[0], t, ntask = _tasks(n, n_threads), bad = 0
    cdef uint64_t khi, klo
    _check_out(out.shape[0], n)
    if n == 0:
        return 0
    cdef int64_t[::1] res = np.zeros(ntask * PAD, dtype=np.int64)
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
# counting keys of a sample
# ----------------------------------------------------------------------------------------------

cdef Py_ssize_t _count_range(const key_t* a, Py_ssize_t n, uint64_t lo, uint64_t hi) noexcept nogil:
    cdef Py_ssize_t i, c = 0
    for i in range(n):
        c += (<uint64_t>a[i] >= lo) & (<uint64_t>a[i] <= hi)
    return c


def count_in(const key_t[::1] keys not None, uint64_t lo, uint64_t hi):
    """Number of keys inside [lo, hi] (the sample's share inside a bracket)."""
    cdef Py_ssize_t n = keys.shape[0], c = 0
    if n == 0:
        return 0
    with nogil:
        c = _count_range(&keys[0], n, lo, hi)
    return c


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
    Py_ssize_t apr_rowb16(const uint16_t* x, Py_ssize_t n, Py_ssize_t k, int magnitude,
                          uint16_t khi, uint16_t klo, uint16_t lo, uint16_t hi, Py_ssize_t cap,
                          uint16_t* keys, uint32_t* pos, uint8_t* out)
    Py_ssize_t apr_rowb32(const uint32_t* x, Py_ssize_t n, Py_ssize_t k, int magnitude,
                          uint32_t khi, uint32_t klo, uint32_t lo, uint32_t hi, Py_ssize_t cap,
                          uint32_t* keys, uint32_t* pos, uint8_t* out)
    Py_ssize_t apr_rowb64(const uint64_t* x, Py_ssize_t n, Py_ssize_t k, int magnitude,
                          uint64_t khi, uint64_t klo, uint64_t lo, uint64_t hi, Py_ssize_t cap,
                          uint64_t* keys, uint32_t* pos, uint8_t* out)


cdef inline Py_ssize_t _row(const real_t* x, Py_ssize_t ncols, Py_ssize_t k, int magnitude,
                            uint64_t khi, uint64_t klo, char* buf, uint8_t* out) noexcept nogil:
    if real_t is float:
        return apr_row32(<const uint32_t*>x, ncols, k, magnitude, <uint32_t>khi, <uint32_t>klo,
                         <uint32_t*>buf, out)
    elif real_t is double:
        return apr_row64(<const uint64_t*>x, ncols, k, magnitude, khi, klo, <uint64_t*>buf, out)
    else:
        return apr_row16(x, ncols, k, magnitude, <uint16_t>khi, <uint16_t>klo, <uint16_t*>buf,
                         out)


cdef inline Py_ssize_t _rowb(const real_t* x, Py_ssize_t ncols, Py_ssize_t k, int magnitude,
                             uint64_t khi, uint64_t klo, uint64_t lo, uint64_t hi, Py_ssize_t cap,
                             char* buf, uint32_t* pos, uint8_t* out) noexcept nogil:
    if real_t is float:
        return apr_rowb32(<const uint32_t*>x, ncols, k, magnitude, <uint32_t>khi, <uint32_t>klo,
                          <uint32_t>lo, <uint32_t>hi, cap, <uint32_t*>buf, pos, out)
    elif real_t is double:
        return apr_rowb64(<const uint64_t*>x, ncols, k, magnitude, khi, klo, lo, hi, cap,
                          <uint64_t*>buf, pos, out)
    else:
        return apr_rowb16(x, ncols, k, magnitude, <uint16_t>khi, <uint16_t>klo, <uint16_t>lo,
                          <uint16_t>hi, cap, <uint16_t*>buf, pos, out)


cdef tuple _rows_bracket(const real_t[:, ::1] x, Py_ssize_t k, int magnitude):
    """(lo, hi, cap): native keys that bracket the k-th smallest key of most rows, from a sample
    of about ROWS_SAMPLE keys spread over the rows (hashed columns, so that outlier columns do
    not line up), and the candidates a row may hold; or None when the bracket would be too wide
    to pay off.  The bracket only decides speed: a row it misses is selected exactly by
    apr_row."""
    cdef Py_ssize_t nrows = x.shape[0], ncols = x.shape[1], nsr, m, a, j, i, col, stride, s
    cdef uint64_t kmax = (<uint64_t>1 << (8 * sizeof(real_t) - 1) << 1) - 1
    nsr = min(nrows, <Py_ssize_t>ROWS_SAMPLE)
    m = max(1, min(ncols // 8, <Py_ssize_t>ROWS_SAMPLE // nsr))
    stride = ncols // m
    s = nsr * m
    smp = np.empty(s, dtype=np.uint64)
    cdef uint64_t[::1] sv = smp
    with nogil:
        for a in range(nsr):
            i = (a * nrows) // nsr
            for j in range(m):
                col = j * stride + <Py_ssize_t>(_mix(<uint64_t>(i * m + j + 1)) % <uint64_t>stride)
                sv[a * m + j] = key_of(x[i, col], magnitude)
    q = k / <double>ncols
    sd = math.sqrt(q * (1.0 - q))
    # a row's k-th key sits at a sample rank that varies with the row (ncols draws) and with
    # the sample (s draws), independently: 3.5 of their combined deviations either side
    h = 3.5 * sd * math.sqrt(1.0 / ncols + 1.0 / s) + 4.0 / s
    if 2.0 * h > 0.25:
        return None
    lo_r = <Py_ssize_t>math.floor((q - h) * s)
    hi_r = <Py_ssize_t>math.ceil((q + h) * s)
    qlo, qhi, _ = sample_bracket(smp, max(lo_r, 0), min(hi_r, s - 1))
    lo = 0 if lo_r < 0 else int(qlo)
    hi = kmax if hi_r >= s else int(qhi)
    # slack for the histogram bracket's bin edges (up to a quarter wider, plus 64 sample keys)
    cap = min(ncols, int(4.0 * h * ncols) + 512)
    return lo, hi, cap


def rows_mask(const real_t[:, ::1] x not None, Py_ssize_t k, int magnitude, uint16_t inf16,
              uint8_t[:, ::1] out not None, int n_threads):
    """Prune the k smallest keys of every row (ties: lowest column first).
    Returns the number of rows holding non-finite values (their mask is not meaningful).

    Long enough inputs first take a bracket of the k-th key shared by all rows from a sample
    (_rows_bracket): each row is then one pass plus a select among its few candidates (apr_rowb);
    a row the bracket misses, and every row of other inputs, gets the exact radix select of
    apr_row.  Each thread works on whole rows with a key buffer of one row (and the candidates'
    positions); the threads are capped so that their buffers fit the scratch budget.  Rows so
    long that one buffer would not fit are refused (InvalidArgumentError): the selection engine
    selects those rows one after the other like tensors."""
    cdef Py_ssize_t nrows = x.shape[0], ncols = x.shape[1], i, bad = 0, rowbytes, fit, tb
    cdef Py_ssize_t cap = 0, st, koff
    cdef int nt = threads_for(n_threads, nrows * ncols, nrows)
    cdef uint64_t khi, klo, lo = 0, hi = 0
    cdef bint bracket = False
    cdef uint8_t[::1] bufs
    cdef int64_t[::1] badrow
    cdef char* kb
    if out.shape[0] != nrows or out.shape[1] != ncols:
        raise ShapeMismatchError(f"out has shape ({out.shape[0]}, {out.shape[1]}), the input "
                                 f"({nrows}, {ncols})")
    if nrows == 0 or ncols == 0:
        return 0
    if k <= 0 or k >= ncols:
        return fill_pass(np.asarray(x).reshape(-1), 1 if k <= 0 else 0, magnitude, inf16,
                         np.asarray(out).reshape(-1), n_threads)
    rowbytes = ncols * <Py_ssize_t>sizeof(real_t)
    fit = scratch_budget(nrows * rowbytes) // rowbytes
    if fit == 0:
        raise InvalidArgumentError(f"rows of {rowbytes} bytes do not fit the scratch budget of "
                                   f"{nrows} rows; select them one by one like tensors")
    if ncols >= ROWS_MIN_COLS and nrows * ncols >= ROWS_MIN_ELEMS and ncols < (<Py_ssize_t>1 << 32):
        b = _rows_bracket(x, k, magnitude)
        if b is not None:
            lo, hi, cap = b
            if scratch_budget(nrows * rowbytes) // (rowbytes + 4 * cap) > 0:
                bracket = True
                fit = scratch_budget(nrows * rowbytes) // (rowbytes + 4 * cap)
    if nt > fit:
        nt = <int>fit
    koff = (rowbytes + 7) // 8 * 8  # the candidates' positions start aligned
    tb = koff + (4 * cap if bracket else 0)
    tb = (tb + 63) // 64 * 64  # each thread's buffer on its own cache lines
    inf_keys(<real_t*>&x[0, 0], inf16, magnitude, &khi, &klo)
    bufs = np.empty(nt * tb, dtype=np.uint8)
    badrow = np.zeros(nrows, dtype=np.int64)
    with nogil:
        for i in prange(nrows, schedule="static", num_threads=nt):
            kb = <char*>&bufs[threadid() * tb]
            st = 2
            if bracket:
                st = _rowb(&x[i, 0], ncols, k, magnitude, khi, klo, lo, hi, cap, kb,
                           <uint32_t*>(kb + koff), &out[i, 0])
            if st == 2:
                st = _row(&x[i, 0], ncols, k, magnitude, khi, klo, kb, &out[i, 0])
            badrow[i] = st
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


def block_sums(const real_t[:, ::1] x not None, Py_ssize_t bh, Py_ssize_t bw, int fmt,
               double[:, ::1] out not None, int n_threads):
    """out[I, J] = sum of x over block (I, J) of shape (bh, bw), accumulated in float64."""
    cdef Py_ssize_t nbr = out.shape[0], nbc = out.shape[1], I, i, j
    if bh < 1 or bw < 1:
        raise InvalidArgumentError(f"block ({bh}, {bw}) must have sides >= 1")
    if nbr * bh != x.shape[0] or nbc * bw != x.shape[1]:
        raise ShapeMismatchError(f"out ({nbr}, {nbc}) of ({bh}, {bw}) blocks does not tile the "
                                 f"input ({x.shape[0]}, {x.shape[1]})")
    cdef int nt = threads_for(n_threads, x.shape[0] * x.shape[1], nbr)
    with nogil:
        for I in prange(nbr, schedule="static", num_threads=nt):
            for j in range(nbc):
                out[I, j] = 0.0
            for i in range(I * bh, I * bh + bh):
                for j in range(x.shape[1]):
                    out[I, j // bw] += _val(x[i, j], fmt)


def expand_blocks(const uint8_t[:, ::1] bmask not None, Py_ssize_t bh, Py_ssize_t bw,
                  uint8_t[:, ::1] out not None, int n_threads):
    """out[i, j] = bmask[i // bh, j // bw]."""
    cdef Py_ssize_t i, j
    if bh < 1 or bw < 1:
        raise InvalidArgumentError(f"block ({bh}, {bw}) must have sides >= 1")
    if bmask.shape[0] * bh != out.shape[0] or bmask.shape[1] * bw != out.shape[1]:
        raise ShapeMismatchError(f"bmask ({bmask.shape[0]}, {bmask.shape[1]}) of ({bh}, {bw}) "
                                 f"blocks does not tile out ({out.shape[0]}, {out.shape[1]})")
    cdef int nt = threads_for(n_threads, out.shape[0] * out.shape[1], out.shape[0])
    with nogil:
        for i in prange(out.shape[0], schedule="static", num_threads=nt):
            for j in range(out.shape[1]):
                out[i, j] = bmask[i // bh, j // bw]


guard(globals(), ["zero_pass", "scratch_budget", "select_keys", "select_keys_below", "sample_bracket",
                  "select_hist", "sample_keys", "sample_into", "range_pass", "mark_pass",
                  "gather_marked", "fix_marked", "fix_positions", "hist_pass", "write_pass",
                  "fill_pass", "count_in", "rows_mask", "block_sums", "expand_blocks", "simd",
                  "mark_collect"])
