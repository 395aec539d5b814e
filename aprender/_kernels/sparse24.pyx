"""2:4 compressed layouts: one parallel pass over row blocks, the per-group logic in apr_sparse24.h.

Elements arrive as bit patterns: uint16 for float16/bfloat16, int8, uint32 for float32.  A row of
`cols` elements is `cols // 4` groups; two groups fill one code byte (see apr_sparse24.h).

layout codes: 0 = CUTLASS (reordered 16/32-bit metadata words), 1 = sparse-24-bitmask, 2 = raw.
Row statuses returned by both entry points: -1 when the row is fine, else
`first_bad_group * 4 + k` with k = 1 (more than two non-zeros), 2 (inf/NaN under selection),
3 (a bitmask group without exactly two bits).

Both entry points check every buffer's shape against (rows, cols) and the layout's rules before
touching it (typed errors), and size their per-thread scratch by the threads the work gets.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int8_t, int64_t
from cython.parallel cimport prange, threadid

import numpy as np

from ._openmp cimport threads_for
from ._guard import guard
from ..errors import InvalidArgumentError, InvalidShapeError, ShapeMismatchError

cdef extern from "apr_sparse24.h" nogil:
    void apr24_init()
    int apr24_simd(int on)
    int64_t apr24_span_u16_fast(const uint16_t* x, const uint8_t* keep, int64_t ngroups, int mode,
                                uint32_t kinf, uint16_t* vals, uint8_t* codes, uint8_t* bits,
                                int* bad)
    int64_t apr24_span_u16(const uint16_t* x, const uint8_t* keep, int64_t ngroups, int mode,
                           uint32_t kinf, uint16_t* vals, uint8_t* codes, uint8_t* bits, int* bad)
    int64_t apr24_span_i8(const int8_t* x, const uint8_t* keep, int64_t ngroups, int mode,
                          uint32_t kinf, int8_t* vals, uint8_t* codes, uint8_t* bits, int* bad)
    int64_t apr24_span_u32(const uint32_t* x, const uint8_t* keep, int64_t ngroups, int mode,
                           uint32_t kinf, uint32_t* vals, uint8_t* codes, uint8_t* bits, int* bad)
    void apr24_expand_u16(const uint16_t* vals, const uint8_t* codes, int64_t ngroups,
                          uint16_t* out)
    void apr24_expand_i8(const int8_t* vals, const uint8_t* codes, int64_t ngroups, int8_t* out)
    void apr24_expand_u32(const uint32_t* vals, const uint8_t* codes, int64_t ngroups,
                          uint32_t* out)
    int64_t apr24_pairs_u32(const uint32_t* x, const uint8_t* keep, int64_t npairs, int mode,
                            uint32_t kinf, uint32_t* vals, uint8_t* codes, int* bad)
    int64_t apr24_pairs_fast_u32(const uint32_t* x, const uint8_t* keep, int64_t npairs,
                                 int mode, uint32_t kinf, uint32_t* vals, uint8_t* codes,
                                 int* bad)
    void apr24_expand_pairs_u32(const uint32_t* vals, const uint8_t* codes, int64_t npairs,
                                uint32_t* out)
    int64_t apr24_bits_to_codes(const uint8_t* bits, int64_t ngroups, uint8_t* codes)
    int64_t apr24_meta_offset(int64_t r, int64_t c, int64_t rows, int wide)
    void apr24_meta_block(const uint8_t* codes, int64_t stride, int64_t r0, int64_t r1,
                          int64_t rows, int wide, int64_t nwords, uint16_t* m16, uint32_t* m32)
    uint32_t apr24_word(const uint8_t* codes, int64_t c, int wide)
    void apr24_unword(uint32_t w, uint8_t* codes, int64_t c, int wide)

apr24_init()  # the SIMD encoder's tables and CPU check, before any thread runs

ctypedef fused elem_t:
    uint16_t
    int8_t
    uint32_t

cdef enum:
    BLOCK = 32              # rows per parallel task


cdef inline int64_t _span(const elem_t* x, const uint8_t* keep, int64_t ngroups, int mode,
                          uint32_t kinf, elem_t* vals, uint8_t* codes, uint8_t* bits,
                          int* bad) noexcept nogil:
    if elem_t is uint16_t:
        return apr24_span_u16_fast(x, keep, ngroups, mode, kinf, vals, codes, bits, bad)
    elif elem_t is int8_t:
        return apr24_span_i8(x, keep, ngroups, mode, kinf, vals, codes, bits, bad)
    else:
        return apr24_span_u32(x, keep, ngroups, mode, kinf, vals, codes, bits, bad)


cdef inline void _expand(const elem_t* vals, const uint8_t* codes, int64_t ngroups,
                         elem_t* out) noexcept nogil:
    if elem_t is uint16_t:
        apr24_expand_u16(vals, codes, ngroups, out)
    elif elem_t is int8_t:
        apr24_expand_i8(vals, codes, ngroups, out)
    else:
        apr24_expand_u32(vals, codes, ngroups, out)


cdef _check_2d(object name, Py_ssize_t r, Py_ssize_t c, Py_ssize_t er, Py_ssize_t ec):
    if r != er or c != ec:
        raise ShapeMismatchError(f"{name} has shape ({r}, {c}), expected ({er}, {ec})")


cdef Py_ssize_t _check_plan(Py_ssize_t rows, Py_ssize_t cols, int layout, int wide,
                            Py_ssize_t meta_bytes, bint has_meta, size_t meta_addr) except -1:
    """Checks shared by compress and decompress; returns the metadata words per row (layout 0)."""
    cdef Py_ssize_t ngroups = cols // 4, nwords = 0, wsize
    if layout not in (0, 1, 2):
        raise InvalidArgumentError(f"layout code must be 0 (cutlass), 1 (bitmask) or 2 (raw), "
                                   f"got {layout}")
    if wide not in (0, 1, 2):
        raise InvalidArgumentError(f"wide must be 0 (16-bit metadata words), 1 (32-bit) or 2 "
                                   f"(float32 1:2 pairs, 16-bit words), got {wide}")
    if cols % 4:
        raise InvalidShapeError(f"{cols} columns are not whole groups of four")
    if wide == 2:
        # float32 pairs: four pairs (eight elements) per 16-bit word, rows in blocks of 32
        if layout != 0:
            raise InvalidArgumentError("wide=2 (float32 pairs) is a cutlass layout (code 0)")
        if rows % 32 or cols % 16:
            raise InvalidShapeError(f"the cutlass layout for float32 needs rows a multiple of 32 "
                                    f"and columns a multiple of 16, got ({rows}, {cols})")
        if not has_meta:
            raise InvalidArgumentError("the cutlass layout needs a metadata buffer, got None")
        nwords = cols // 8
        if meta_bytes != rows * nwords * 2:
            raise ShapeMismatchError(f"metadata holds {meta_bytes} bytes, ({rows}, {cols}) needs "
                                     f"{rows * nwords * 2} ({rows} x {nwords} words of 2 bytes)")
        if meta_addr % 2:
            raise InvalidArgumentError("metadata is not aligned to its 2-byte words")
        return nwords
    if layout == 0:
        # CUTLASS reorders rows within blocks of 32 (16 for 32-bit words) and swaps pairs of
        # words: only whole blocks and an even number of words per row stay inside the buffer
        if rows % (16 if wide else 32) or ngroups % (16 if wide else 8):
            raise InvalidShapeError(f"the cutlass layout needs rows a multiple of "
                                    f"{16 if wide else 32} and columns a multiple of "
                                    f"{64 if wide else 32}, got ({rows}, {cols})")
        if not has_meta:
            raise InvalidArgumentError("the cutlass layout needs a metadata buffer, got None")
        wsize = 4 if wide else 2
        nwords = ngroups // (8 if wide else 4)
        if meta_bytes != rows * nwords * wsize:
            raise ShapeMismatchError(f"metadata holds {meta_bytes} bytes, ({rows}, {cols}) needs "
                                     f"{rows * nwords * wsize} ({rows} x {nwords} words of "
                                     f"{wsize} bytes)")
        if meta_addr % wsize:
            raise InvalidArgumentError(f"metadata is not aligned to its {wsize}-byte words")
    return nwords


def compress(const elem_t[:, ::1] x not None, const uint8_t[:, ::1] keep, int mode, uint32_t kinf,
             int layout, int wide, elem_t[:, ::1] vals not None, uint8_t[:, ::1] codes,
             uint8_t[:, ::1] bits, uint8_t[::1] meta, int n_threads):
    """Compress the (rows, cols) bit patterns x into vals (rows, cols / 2).  keep: (rows, cols)
    mask bytes (mode 1) or None.  codes: (rows, cols / 8 rounded up) raw code output for
    layout 2, else None.  bits: likewise the bitmask output for layout 1, else None.  meta: the
    CUTLASS metadata buffer as bytes for layout 0, else None.  Returns the int64 row statuses."""
    cdef Py_ssize_t rows = x.shape[0], cols = x.shape[1]
    cdef int64_t ngroups = cols // 4, nwords, c, r, b, r0, r1, first
    cdef Py_ssize_t nblocks = (rows + BLOCK - 1) // BLOCK, nbytes = (cols // 4 + 1) // 2
    cdef int nt = threads_for(n_threads, rows * cols, nblocks)
    cdef int tid
    if mode not in (0, 1, 2):
        raise InvalidArgumentError(f"mode must be 0 (non-zeros), 1 (mask) or 2 (select), got "
                                   f"{mode}")
    nwords = _check_plan(rows, cols, layout, wide, meta.shape[0] if meta is not None else 0,
                         meta is not None,
                         <size_t>&meta[0] if meta is not None and meta.shape[0] else 0)
    _check_2d("vals", vals.shape[0], vals.shape[1], rows, cols // 2)
    if mode == 1:
        if keep is None:
            raise InvalidArgumentError("mode 1 (mask) needs a keep buffer, got None")
        _check_2d("keep", keep.shape[0], keep.shape[1], rows, cols)
    if layout == 2:
        if codes is None:
            raise InvalidArgumentError("the raw layout needs a codes buffer, got None")
        _check_2d("codes", codes.shape[0], codes.shape[1], rows, nbytes)
    if layout == 1:
        if bits is None:
            raise InvalidArgumentError("the bitmask layout needs a bits buffer, got None")
        _check_2d("bits", bits.shape[0], bits.shape[1], rows, nbytes)
    if wide == 2 and elem_t is not uint32_t:
        raise InvalidArgumentError("wide=2 (float32 pairs) takes 32-bit elements")
    cdef int64_t[::1] status = np.full(rows, -1, dtype=np.int64)
    if rows == 0 or ngroups == 0:
        return np.asarray(status)
    if wide == 2:
        nbytes = cols // 4  # a code per pair, two pairs per byte
    cdef int[::1] bad = np.zeros(rows, dtype=np.intc)
    # one row of code bytes per thread (bitmask), a block of rows' (cutlass: scattered per block)
    cdef uint8_t[:, ::1] scratch = np.empty(
        (nt if layout != 2 else 1, nbytes * (BLOCK if layout == 0 else 1)), dtype=np.uint8)
    cdef const uint8_t* kp = &keep[0, 0] if mode == 1 else NULL
    cdef uint8_t* cp
    cdef uint8_t* bp = NULL
    cdef uint16_t* m16 = NULL
    cdef uint32_t* m32 = NULL
    if layout == 0:
        if wide == 1:
            m32 = <uint32_t*>&meta[0]
        else:
            m16 = <uint16_t*>&meta[0]
    with nogil:
        for b in prange(nblocks, schedule="static", num_threads=nt):
            tid = threadid()
            r0 = b * BLOCK
            r1 = r0 + BLOCK
            if r1 > rows:
                r1 = rows
            for r in range(r0, r1):
                if layout == 2:
                    cp = &codes[r, 0]
                elif layout == 0:
                    cp = &scratch[tid, (r - r0) * nbytes]
                else:
                    cp = &scratch[tid, 0]
                if layout == 1:
                    bp = &bits[r, 0]
                else:
                    bp = NULL
                if elem_t is uint32_t:
                    if wide == 2:
                        first = apr24_pairs_fast_u32(&x[r, 0],
                                                     kp + r * cols if kp != NULL else NULL,
                                                     cols // 2, mode, kinf, &vals[r, 0], cp,
                                                     &bad[r])
                    else:
                        first = _span(&x[r, 0], kp + r * cols if kp != NULL else NULL, ngroups,
                                      mode, kinf, &vals[r, 0], cp, bp, &bad[r])
                else:
                    first = _span(&x[r, 0], kp + r * cols if kp != NULL else NULL, ngroups,
                                  mode, kinf, &vals[r, 0], cp, bp, &bad[r])
                if first >= 0:
                    status[r] = first * 4 - bad[r]
            if layout == 0:
                apr24_meta_block(&scratch[tid, 0], nbytes, r0, r1, rows, wide == 1, nwords, m16,
                                 m32)
    return np.asarray(status)


def decompress(const elem_t[:, ::1] vals not None, const uint8_t[:, ::1] codes,
               const uint8_t[::1] meta, int layout, int wide, elem_t[:, ::1] out not None,
               int n_threads):
    """Inverse of compress into out (rows, cols).  codes: raw codes (layout 2) or bitmask bytes
    (layout 1), (rows, cols / 8 rounded up), None for layout 0; meta: CUTLASS metadata bytes
    (layout 0) else None.  Returns the int64 row statuses (bitmask validation)."""
    cdef Py_ssize_t rows = out.shape[0], cols = out.shape[1]
    cdef int64_t ngroups = cols // 4, nwords, c, r, b, r0, r1, first
    cdef Py_ssize_t nblocks = (rows + BLOCK - 1) // BLOCK, nbytes = (cols // 4 + 1) // 2
    cdef int nt = threads_for(n_threads, rows * cols, nblocks)
    cdef int tid
    nwords = _check_plan(rows, cols, layout, wide, meta.shape[0] if meta is not None else 0,
                         meta is not None,
                         <size_t>&meta[0] if meta is not None and meta.shape[0] else 0)
    _check_2d("vals", vals.shape[0], vals.shape[1], rows, cols // 2)
    if layout != 0:
        if codes is None:
            raise InvalidArgumentError(f"the {'raw' if layout == 2 else 'bitmask'} layout needs "
                                       "a codes buffer, got None")
        _check_2d("codes" if layout == 2 else "bitmask", codes.shape[0], codes.shape[1], rows,
                  nbytes)
    cdef int64_t[::1] status = np.full(rows, -1, dtype=np.int64)
    if rows == 0 or ngroups == 0:
        return np.asarray(status)
    if wide == 2 and elem_t is not uint32_t:
        raise InvalidArgumentError("wide=2 (float32 pairs) takes 32-bit elements")
    if wide == 2:
        nbytes = cols // 4  # a code per pair, two pairs per byte
    cdef uint8_t[:, ::1] scratch = np.empty((nt, nbytes), dtype=np.uint8)
    cdef const uint8_t* cp
    cdef uint8_t* sp
    cdef const uint16_t* m16 = NULL
    cdef const uint32_t* m32 = NULL
    if layout == 0:
        if wide == 1:
            m32 = <const uint32_t*>&meta[0]
        else:
            m16 = <const uint16_t*>&meta[0]
    with nogil:
        for b in prange(nblocks, schedule="static", num_threads=nt):
            tid = threadid()
            r0 = b * BLOCK
            r1 = r0 + BLOCK
            if r1 > rows:
                r1 = rows
            for r in range(r0, r1):
                sp = &scratch[tid, 0]
                if layout == 2:
                    cp = &codes[r, 0]
                elif layout == 1:
                    first = apr24_bits_to_codes(&codes[r, 0], ngroups, sp)
                    if first >= 0:
                        status[r] = first * 4 + 3
                    cp = sp
                else:
                    for c in range(nwords):
                        if wide == 1:
                            apr24_unword(m32[apr24_meta_offset(r, c, rows, 1)], sp, c, 1)
                        else:
                            apr24_unword(m16[apr24_meta_offset(r, c, rows, 0)], sp, c, 0)
                    cp = sp
                if elem_t is uint32_t:
                    if wide == 2:
                        apr24_expand_pairs_u32(&vals[r, 0], cp, cols // 2, &out[r, 0])
                    else:
                        _expand(&vals[r, 0], cp, ngroups, &out[r, 0])
                else:
                    _expand(&vals[r, 0], cp, ngroups, &out[r, 0])
    return np.asarray(status)


def simd(on=None):
    """Whether the SIMD group encoder is in use; on=False switches it off (the scalar encoder,
    same bytes), on=True back on where the CPU has it.  For tests and benchmarks."""
    return bool(apr24_simd(-1 if on is None else (1 if on else 0)))


guard(globals(), ["compress", "decompress", "simd"])
