/* 2:4 selection and packing, shared by the Cython CPU kernel (sparse24.pyx) and the CUDA kernel
 * (aprender/cuda/sparse24.cu).  Everything here is a small static inline function on one group of
 * four elements, a span of groups of one row, or one metadata word, so both back ends produce the
 * same bytes by construction.
 *
 * Group code.  For a group of four elements with "present" flags f (bit t = element t is non-zero
 * and kept), the code is the 4-bit value idx0 | idx1 << 2 that PyTorch's
 * sparse_semi_structured_from_dense_cutlass computes (and CUTLASS consumes): idx0 < idx1 are the
 * in-group positions stored.  Groups with fewer than two present elements store zero-valued
 * positions chosen by the same boolean formula (0000 -> {2,3}, 1000 -> {0,2}, 0100 -> {1,2},
 * 0010 -> {2,3}, 0001 -> {2,3}; flags listed as elements 0..3).
 *
 * Spans.  A span is a run of consecutive groups of one row, starting at an even group, so that two
 * groups fill one byte: code byte = code(g) | code(g+1) << 4 (the "raw" layout, also the CUTLASS
 * word before reordering, read little-endian) and bitmask byte = pos(g) | pos(g+1) << 4 where
 * pos = (1 << idx0) | (1 << idx1) (numpy.packbits(keep, bitorder="little") of the stored
 * positions: the sparse-24-bitmask layout).
 */
#ifndef APR_SPARSE24_H
#define APR_SPARSE24_H

#ifdef __CUDACC_RTC__
/* NVRTC (CuPy RawModule) ships no C headers */
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#ifdef __CUDACC__
#define APR24_FN static inline __host__ __device__
#else
#define APR24_FN static inline
#endif

/* how the present flags of a group are formed */
#define APR24_NONZERO 0 /* non-zero elements (the weight is already 2:4) */
#define APR24_MASK 1    /* non-zero elements that a keep-mask keeps */
#define APR24_SELECT 2  /* non-zero elements among the two largest |w| (ties prune lowest index) */

/* statuses of a group (>= 0 is the group code) */
#define APR24_TOO_MANY (-1)  /* more than two present elements */
#define APR24_NONFINITE (-2) /* SELECT met an inf or NaN */
#define APR24_BAD_BITMASK (-3) /* a bitmask group without exactly two bits set */

/* PyTorch's / CUTLASS's code of a group from its present flags (a 4-bit flag set). */
APR24_FN unsigned apr24_code(unsigned f)
{
    unsigned m0 = f & 1u, m1 = (f >> 1) & 1u, m3 = (f >> 3) & 1u;
    unsigned n0 = m0 ^ 1u, n1 = m1 ^ 1u;
    unsigned both = m0 & m1, only1 = n0 & m1, none01 = n0 & n1;
    unsigned b0 = only1, b1 = none01, b2 = both | none01 | m3, b3 = only1 | n1;
    return b0 | (b1 << 1) | (b2 << 2) | (b3 << 3);
}

/* positions stored by a code, as a 4-bit set */
APR24_FN unsigned apr24_pos(unsigned code)
{
    return (1u << (code & 3u)) | (1u << (code >> 2));
}

APR24_FN int apr24_pop4(unsigned f)
{
    return (int)((f & 1u) + ((f >> 1) & 1u) + ((f >> 2) & 1u) + ((f >> 3) & 1u));
}

/* code of a bitmask nibble with exactly two bits set, else APR24_BAD_BITMASK.  Branch-free:
 * 0x1668 has bit p set for the six two-bit nibbles p; APR24_POS_CODES holds their codes, 4 bits
 * per nibble value. */
#define APR24_POS_CODES ((4ull << 12) | (8ull << 20) | (9ull << 24) | (12ull << 36) | (13ull << 40) \
                         | (14ull << 48))
APR24_FN int apr24_code_of_pos(unsigned p)
{
    p &= 0xFu;
    if (!((0x1668u >> p) & 1u))
        return APR24_BAD_BITMASK;
    return (int)((APR24_POS_CODES >> (4u * p)) & 0xFu);
}

/* The two largest keys of four: element t is kept when fewer than two elements outrank it;
 * u outranks t when key_u > key_t, or key_u == key_t and u > t (ties prune the lowest index). */
APR24_FN unsigned apr24_keep2(uint32_t k0, uint32_t k1, uint32_t k2, uint32_t k3)
{
    int r0 = (k1 >= k0) + (k2 >= k0) + (k3 >= k0);
    int r1 = (k0 > k1) + (k2 >= k1) + (k3 >= k1);
    int r2 = (k0 > k2) + (k1 > k2) + (k3 >= k2);
    int r3 = (k0 > k3) + (k1 > k3) + (k2 > k3);
    return (unsigned)(r0 < 2) | ((unsigned)(r1 < 2) << 1) | ((unsigned)(r2 < 2) << 2)
           | ((unsigned)(r3 < 2) << 3);
}

APR24_FN unsigned apr24_keepbits(const uint8_t* keep)
{
    return (unsigned)(keep[0] != 0) | ((unsigned)(keep[1] != 0) << 1)
           | ((unsigned)(keep[2] != 0) << 2) | ((unsigned)(keep[3] != 0) << 3);
}

/* Offset of metadata word (r, c) of a rows x ncols metadata matrix in CUTLASS's reordered
 * (ColumnMajorInterleaved<2>, 2x2-swizzled) layout.  wide = 0 for 16-bit words (f16/bf16: rows
 * permuted within blocks of 32, interweave 4), 1 for 32-bit words (int8: blocks of 16,
 * interweave 2). */
APR24_FN int64_t apr24_meta_offset(int64_t r, int64_t c, int64_t rows, int wide)
{
    int64_t group = wide ? 16 : 32, weave = wide ? 2 : 4;
    int64_t dr = r / group * group + (r % 8) * weave + (r % group) / 8;
    int64_t swap = (int64_t)(((dr & 1) == 0) & ((c & 1) == 1)) - (int64_t)(((dr & 1) == 1) & ((c & 1) == 0));
    int64_t dc = c - swap;
    dr += swap;
    return (dc >> 1) * rows * 2 + dr * 2 + (dc & 1);
}

/* Element types: the bits of a 16-bit float (f16/bf16), int8, and the bits of a float32.
 * NZ: the element compares unequal to zero (so -0.0 is zero, NaN is not); KEY: orders like |w|. */
#define APR24_NZ_U16(x) ((unsigned)(((x) & 0x7FFFu) != 0))
#define APR24_KEY_U16(x) ((uint32_t)((x) & 0x7FFFu))
#define APR24_NZ_I8(x) ((unsigned)((x) != 0))
#define APR24_KEY_I8(x) ((uint32_t)((x) < 0 ? -(int)(x) : (int)(x)))
#define APR24_NZ_U32(x) ((unsigned)(((x) & 0x7FFFFFFFu) != 0))
#define APR24_KEY_U32(x) ((uint32_t)((x) & 0x7FFFFFFFu))

/* For each element type S/T:
 *
 * apr24_group_S(x, keep, mode, kinf, v): the code of the group x[0..3] (keep: its 4 mask bytes
 *   in MASK mode), writing the two stored values to v[0], v[1]; or a negative status.  kinf: the
 *   key of +inf for float types in SELECT mode (0: no check).
 *
 * apr24_span_S(x, keep, ngroups, mode, kinf, vals, codes, bits, bad): ngroups groups from x
 *   (a row start or an even group of it); 2 values per group to vals, code bytes to codes and,
 *   when bits is not NULL, bitmask bytes to bits.  Returns -1 when every group is fine, else
 *   the index (within the span) of the first bad group, its status in *bad.
 *
 * apr24_expand_S(vals, codes, ngroups, out): the inverse: 4 * ngroups dense elements, zeros
 *   everywhere but the stored positions.
 */
#define APR24_DEFINE(S, T, NZ, KEY)                                                              \
    APR24_FN int apr24_group_##S(const T* x, const uint8_t* keep, int mode, uint32_t kinf, T* v) \
    {                                                                                            \
        unsigned f = NZ(x[0]) | (NZ(x[1]) << 1) | (NZ(x[2]) << 2) | (NZ(x[3]) << 3);             \
        unsigned code;                                                                           \
        if (mode == APR24_MASK) {                                                                \
            f &= apr24_keepbits(keep);                                                           \
        } else if (mode == APR24_SELECT) {                                                       \
            uint32_t k0 = KEY(x[0]), k1 = KEY(x[1]), k2 = KEY(x[2]), k3 = KEY(x[3]);             \
            if (kinf && (k0 >= kinf || k1 >= kinf || k2 >= kinf || k3 >= kinf))                  \
                return APR24_NONFINITE;                                                          \
            f &= apr24_keep2(k0, k1, k2, k3);                                                    \
        }                                                                                        \
        if (apr24_pop4(f) > 2)                                                                   \
            return APR24_TOO_MANY;                                                               \
        code = apr24_code(f);                                                                    \
        v[0] = x[code & 3u];                                                                     \
        v[1] = x[code >> 2];                                                                     \
        if (mode != APR24_NONZERO) { /* a filler position the mask or selection drops: +0 */  \
            if (!((f >> (code & 3u)) & 1u)) v[0] = 0;                                           \
            if (!((f >> (code >> 2)) & 1u)) v[1] = 0;                                           \
        }                                                                                        \
        return (int)code;                                                                        \
    }                                                                                            \
                                                                                                 \
    APR24_FN int64_t apr24_span_##S(const T* x, const uint8_t* keep, int64_t ngroups, int mode,  \
                                    uint32_t kinf, T* vals, uint8_t* codes, uint8_t* bits,       \
                                    int* bad)                                                    \
    {                                                                                            \
        int64_t g;                                                                               \
        int64_t first = -1;                                                                      \
        for (g = 0; g < ngroups; g += 2) {                                                       \
            int c0 = apr24_group_##S(x + 4 * g, keep ? keep + 4 * g : keep, mode, kinf,         \
                                     vals + 2 * g);                                              \
            int c1 = 0xE; /* an odd trailing group: high nibble as if empty, never stored */    \
            if (g + 1 < ngroups)                                                                 \
                c1 = apr24_group_##S(x + 4 * g + 4, keep ? keep + 4 * g + 4 : keep, mode, kinf, \
                                     vals + 2 * g + 2);                                          \
            if ((c0 < 0 || c1 < 0) && first < 0) {                                               \
                first = c0 < 0 ? g : g + 1;                                                      \
                *bad = c0 < 0 ? c0 : c1;                                                         \
            }                                                                                    \
            c0 &= 0xF;                                                                           \
            c1 &= 0xF;                                                                           \
            if (g + 1 < ngroups) {                                                               \
                codes[g >> 1] = (uint8_t)(c0 | (c1 << 4));                                       \
                if (bits)                                                                        \
                    bits[g >> 1] = (uint8_t)(apr24_pos((unsigned)c0)                             \
                                             | (apr24_pos((unsigned)c1) << 4));                  \
            } else {                                                                             \
                codes[g >> 1] = (uint8_t)c0;                                                     \
                if (bits)                                                                        \
                    bits[g >> 1] = (uint8_t)apr24_pos((unsigned)c0);                             \
            }                                                                                    \
        }                                                                                        \
        return first;                                                                            \
    }                                                                                            \
                                                                                                 \
    APR24_FN void apr24_expand_##S(const T* vals, const uint8_t* codes, int64_t ngroups, T* out) \
    {                                                                                            \
        int64_t g;                                                                               \
        for (g = 0; g < ngroups; g++) {                                                          \
            unsigned code = (codes[g >> 1] >> ((g & 1) * 4)) & 0xFu;                             \
            T* o = out + 4 * g;                                                                  \
            o[0] = 0;                                                                            \
            o[1] = 0;                                                                            \
            o[2] = 0;                                                                            \
            o[3] = 0;                                                                            \
            o[code & 3u] = vals[2 * g];                                                          \
            o[code >> 2] = vals[2 * g + 1];                                                      \
        }                                                                                        \
    }

APR24_DEFINE(u16, uint16_t, APR24_NZ_U16, APR24_KEY_U16)
APR24_DEFINE(i8, int8_t, APR24_NZ_I8, APR24_KEY_I8)
APR24_DEFINE(u32, uint32_t, APR24_NZ_U32, APR24_KEY_U32)

/* float32 in PyTorch's CUTLASS layout: 1:2 pairs.  PyTorch's conversion reads a float32 row as
 * pairs (e0, e1) and encodes each pair as the group of four with flags (e0, e0, e1, e1): code
 * 0b0100 stores e0, code 0b1110 stores e1 (also when neither is present); one value per pair,
 * four codes per 16-bit metadata word.  Pair flags: non-zero (NONZERO), non-zero and kept (MASK),
 * non-zero and the larger |w| of the two, ties keeping e1 (SELECT: the lower index is pruned).
 * Two present elements are an error (APR24_TOO_MANY).  In MASK mode a stored element the mask
 * drops is written as +0 (a group stores one value whether or not any is kept).
 *
 * apr24_pairs_u32(x, keep, npairs, mode, kinf, vals, codes, bad): like apr24_span_u32 with pairs
 *   for groups (npairs even): vals one per pair, code bytes two pairs each; returns -1 or the
 *   first bad pair.  apr24_expand_pairs_u32: the inverse (the element at (code & 3) >> 1 of the
 *   pair holds the value, the other +0; any code decodes inside the pair). */
APR24_FN int apr24_pair_u32(const uint32_t* x, const uint8_t* keep, int mode, uint32_t kinf,
                            uint32_t* v)
{
    unsigned f = APR24_NZ_U32(x[0]) | (APR24_NZ_U32(x[1]) << 1), code, e;
    if (mode == APR24_MASK) {
        f &= (unsigned)(keep[0] != 0) | ((unsigned)(keep[1] != 0) << 1);
    } else if (mode == APR24_SELECT) {
        uint32_t k0 = APR24_KEY_U32(x[0]), k1 = APR24_KEY_U32(x[1]);
        if (kinf && (k0 >= kinf || k1 >= kinf))
            return APR24_NONFINITE;
        f &= k0 > k1 ? 1u : 2u;
    }
    if (f == 3u)
        return APR24_TOO_MANY;
    code = apr24_code((f & 1u) * 3u | (f >> 1) * 12u);
    e = (code & 3u) >> 1;
    v[0] = (mode == APR24_MASK && !keep[e]) ? 0u : x[e];
    return (int)code;
}

APR24_FN int64_t apr24_pairs_u32(const uint32_t* x, const uint8_t* keep, int64_t npairs, int mode,
                                 uint32_t kinf, uint32_t* vals, uint8_t* codes, int* bad)
{
    int64_t p, first = -1;
    for (p = 0; p < npairs; p += 2) {
        int c0 = apr24_pair_u32(x + 2 * p, keep ? keep + 2 * p : keep, mode, kinf, vals + p);
        int c1 = apr24_pair_u32(x + 2 * p + 2, keep ? keep + 2 * p + 2 : keep, mode, kinf,
                                vals + p + 1);
        if ((c0 < 0 || c1 < 0) && first < 0) {
            first = c0 < 0 ? p : p + 1;
            *bad = c0 < 0 ? c0 : c1;
        }
        codes[p >> 1] = (uint8_t)((c0 & 0xF) | ((c1 & 0xF) << 4));
    }
    return first;
}

APR24_FN void apr24_expand_pairs_u32(const uint32_t* vals, const uint8_t* codes, int64_t npairs,
                                     uint32_t* out)
{
    int64_t p;
    for (p = 0; p < npairs; p++) {
        unsigned code = (codes[p >> 1] >> ((p & 1) * 4)) & 0xFu, e = (code & 3u) >> 1;
        out[2 * p] = e ? 0u : vals[p];
        out[2 * p + 1] = e ? vals[p] : 0u;
    }
}

/* Bitmask bytes -> code bytes for nbytes bytes of one row (ngroups groups).  Returns -1, or the
 * first group whose nibble does not have exactly two bits set. */
APR24_FN int64_t apr24_bits_to_codes(const uint8_t* bits, int64_t ngroups, uint8_t* codes)
{
    int64_t g, first = -1;
    for (g = 0; g < ngroups; g += 2) {
        int c0 = apr24_code_of_pos(bits[g >> 1] & 0xFu);
        int c1 = 0;
        if (g + 1 < ngroups)
            c1 = apr24_code_of_pos(bits[g >> 1] >> 4);
        if ((c0 < 0 || c1 < 0) && first < 0)
            first = c0 < 0 ? g : g + 1;
        codes[g >> 1] = (uint8_t)((c0 & 0xF) | ((c1 & 0xF) << 4));
    }
    return first;
}

/* Metadata word c of a row from its code bytes (2 bytes for 16-bit words, 4 for 32-bit). */
APR24_FN uint32_t apr24_word(const uint8_t* codes, int64_t c, int wide)
{
    if (wide)
        return (uint32_t)codes[4 * c] | ((uint32_t)codes[4 * c + 1] << 8)
               | ((uint32_t)codes[4 * c + 2] << 16) | ((uint32_t)codes[4 * c + 3] << 24);
    return (uint32_t)codes[2 * c] | ((uint32_t)codes[2 * c + 1] << 8);
}

APR24_FN void apr24_unword(uint32_t w, uint8_t* codes, int64_t c, int wide)
{
    if (wide) {
        codes[4 * c] = (uint8_t)w;
        codes[4 * c + 1] = (uint8_t)(w >> 8);
        codes[4 * c + 2] = (uint8_t)(w >> 16);
        codes[4 * c + 3] = (uint8_t)(w >> 24);
    } else {
        codes[2 * c] = (uint8_t)w;
        codes[2 * c + 1] = (uint8_t)(w >> 8);
    }
}

/* Scatter the metadata words of rows r0..r1 (at most 32 rows, one CUTLASS row block; their code
 * bytes at codes + (r - r0) * stride) into the reordered buffer (m16 for 16-bit words, else
 * m32): apr24_meta_offset with the per-row part computed once.  The offset of word c of row r is
 * (c >> 1) * 2 * rows + 2 * dr + step[c & 1], where dr is the row's permuted index and the 2x2
 * swizzle gives step = {0, 2} for an even dr and {-1, 1} for an odd one.  Word pairs go out
 * column by column over the block's rows: consecutive addresses, where a row at a time would
 * write one word every 2 * rows words (a power-of-two stride that thrashes one cache set). */
APR24_FN void apr24_meta_block(const uint8_t* codes, int64_t stride, int64_t r0, int64_t r1,
                               int64_t rows, int wide, int64_t nwords, uint16_t* m16,
                               uint32_t* m32)
{
    int64_t group = wide ? 16 : 32, weave = wide ? 2 : 4, col = 2 * rows, c, r;
    int64_t base[32], s0[32], s1[32];
    for (r = r0; r < r1; r++) {
        int64_t dr = r / group * group + (r % 8) * weave + (r % group) / 8;
        base[r - r0] = 2 * dr;
        s0[r - r0] = (dr & 1) ? -1 : 0;
        s1[r - r0] = (dr & 1) ? 1 : 2;
    }
    for (c = 0; c + 1 < nwords; c += 2) {
        int64_t o = (c >> 1) * col;
        for (r = 0; r < r1 - r0; r++) {
            const uint8_t* cp = codes + r * stride;
            if (wide) {
                m32[o + base[r] + s0[r]] = apr24_word(cp, c, 1);
                m32[o + base[r] + s1[r]] = apr24_word(cp, c + 1, 1);
            } else {
                m16[o + base[r] + s0[r]] = (uint16_t)apr24_word(cp, c, 0);
                m16[o + base[r] + s1[r]] = (uint16_t)apr24_word(cp, c + 1, 0);
            }
        }
    }
    if (c < nwords) {
        for (r = r0; r < r1; r++) {
            if (wide)
                m32[apr24_meta_offset(r, c, rows, 1)] = apr24_word(codes + (r - r0) * stride, c, 1);
            else
                m16[apr24_meta_offset(r, c, rows, 0)] =
                    (uint16_t)apr24_word(codes + (r - r0) * stride, c, 0);
        }
    }
}

#ifndef __CUDACC__
/* apr24_pairs_u32 as branch-free loops, one per mode, over blocks of pairs (GCC vectorises them;
 * on x86-64 they are built for AVX2 and baseline and picked at load time).  Same bytes: a block
 * holding a bad pair (two present, or inf/NaN under SELECT) is redone by apr24_pairs_u32 for
 * its statuses. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(APR_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define APR24_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define APR24_CLONES
#endif
#define APR24_PAIR_BLOCK 256
APR24_CLONES static int64_t apr24_pairs_fast_u32(const uint32_t* x, const uint8_t* keep,
                                                 int64_t npairs, int mode, uint32_t kinf,
                                                 uint32_t* vals, uint8_t* codes, int* bad)
{
    int64_t p0, first = -1;
    uint8_t cn[APR24_PAIR_BLOCK];
    for (p0 = 0; p0 < npairs; p0 += APR24_PAIR_BLOCK) {
        int64_t np = npairs - p0 < APR24_PAIR_BLOCK ? npairs - p0 : APR24_PAIR_BLOCK, p;
        const uint32_t* xb = x + 2 * p0;
        uint32_t* vb = vals + p0;
        unsigned any = 0;
        if (mode == APR24_NONZERO) {
            for (p = 0; p < np; p++) {
                uint32_t a = xb[2 * p], b = xb[2 * p + 1];
                unsigned na = (a & 0x7FFFFFFFu) != 0, nb = (b & 0x7FFFFFFFu) != 0;
                any |= na & nb;
                vb[p] = na ? a : b;
                cn[p] = (uint8_t)(na ? 0x4 : 0xE);
            }
        } else if (mode == APR24_MASK) {
            const uint8_t* kb = keep + 2 * p0;
            for (p = 0; p < np; p++) {
                uint32_t a = xb[2 * p], b = xb[2 * p + 1];
                unsigned ka = kb[2 * p] != 0, kk = kb[2 * p + 1] != 0;
                unsigned na = ((a & 0x7FFFFFFFu) != 0) & ka, nb = ((b & 0x7FFFFFFFu) != 0) & kk;
                any |= na & nb;
                vb[p] = na ? a : (kk ? b : 0u);
                cn[p] = (uint8_t)(na ? 0x4 : 0xE);
            }
        } else {
            for (p = 0; p < np; p++) {
                uint32_t a = xb[2 * p], b = xb[2 * p + 1];
                uint32_t ka = a & 0x7FFFFFFFu, kb2 = b & 0x7FFFFFFFu;
                unsigned na = (ka != 0) & (ka > kb2);
                any |= kinf ? ((ka >= kinf) | (kb2 >= kinf)) : 0u;
                vb[p] = na ? a : b;
                cn[p] = (uint8_t)(na ? 0x4 : 0xE);
            }
        }
        if (any) {
            int b2 = 0;
            int64_t fs = apr24_pairs_u32(xb, keep ? keep + 2 * p0 : keep, np, mode, kinf, vb,
                                         codes + p0 / 2, &b2);
            if (fs >= 0 && first < 0) {
                first = p0 + fs;
                *bad = b2;
            }
            continue;
        }
        for (p = 0; p + 1 < np; p += 2)
            codes[(p0 + p) >> 1] = (uint8_t)(cn[p] | (cn[p + 1] << 4));
    }
    return first;
}
#endif

/* SIMD span encoder (x86-64 AVX2, host only), picked at load time by apr24_init: 16 groups per
 * step.  Presence flags of 64 elements become one 64-bit word (compare, pack, movemask; AND the
 * keep bytes in MASK mode), the group codes and bitmask nibbles come from 16-entry tables by
 * pshufb, and the two stored values of every group are gathered by pshufb with a control word
 * per code byte.  A step whose flags hold a group with more than two present elements, SELECT
 * mode, other element types and the tail of a row go through the scalar apr24_span_*, which
 * also reports the statuses; the bytes written are the same by construction (same tables). */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__) && !defined(APR_NO_CLONES)
#include <immintrin.h>
#define APR24_SIMD 1
static int apr24_avx2 = 0;
static uint64_t apr24_ctrl16[256]; /* pshufb control: values of 2 u16 groups of a code byte */

static void apr24_init(void)
{
    unsigned cb, g, b;
    for (cb = 0; cb < 256; cb++) {
        uint64_t c = 0;
        for (g = 0; g < 2; g++) {
            unsigned code = (cb >> (4 * g)) & 0xFu, i0 = code & 3u, i1 = code >> 2;
            unsigned char by[4] = {(unsigned char)(8 * g + 2 * i0), (unsigned char)(8 * g + 2 * i0 + 1),
                                   (unsigned char)(8 * g + 2 * i1), (unsigned char)(8 * g + 2 * i1 + 1)};
            for (b = 0; b < 4; b++) c |= (uint64_t)by[b] << (8 * (4 * g + b));
        }
        apr24_ctrl16[cb] = c;
    }
    __builtin_cpu_init();
    apr24_avx2 = __builtin_cpu_supports("avx2");
}

/* groups (nibbles) of a 64-bit flag word with three or four bits set */
static inline uint64_t apr24_over2(uint64_t f)
{
    uint64_t c = f - ((f >> 1) & 0x5555555555555555ull);
    c = (c & 0x3333333333333333ull) + ((c >> 2) & 0x3333333333333333ull);
    return (c & 0x4444444444444444ull) | ((c >> 1) & c & 0x1111111111111111ull);
}

__attribute__((target("avx2"))) static int64_t apr24_span_u16_avx2(
    const uint16_t* x, const uint8_t* keep, int64_t ngroups, int mode, uint16_t* vals,
    uint8_t* codes, uint8_t* bits, int* bad)
{
    const __m256i absm = _mm256_set1_epi16(0x7FFF), zero = _mm256_setzero_si256();
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    __m128i ctab, ptab;
    int64_t g = 0, first = -1, fs;
    int b2 = 0;
    {
        unsigned char ct[16], pt[16];
        unsigned n;
        for (n = 0; n < 16; n++) {
            ct[n] = (unsigned char)apr24_code(n);
            pt[n] = (unsigned char)apr24_pos(apr24_code(n));
        }
        ctab = _mm_loadu_si128((const __m128i*)ct);
        ptab = _mm_loadu_si128((const __m128i*)pt);
    }
    for (; g + 16 <= ngroups; g += 16) {
        const uint16_t* xg = x + 4 * g;
        __m256i a[4], p01, p23;
        uint64_t f, cw;
        __m128i fv, lo, hi, cb;
        int j;
        for (j = 0; j < 4; j++) a[j] = _mm256_loadu_si256((const __m256i*)(xg + 16 * j));
        p01 = _mm256_permute4x64_epi64(
            _mm256_packs_epi16(_mm256_cmpeq_epi16(_mm256_and_si256(a[0], absm), zero),
                               _mm256_cmpeq_epi16(_mm256_and_si256(a[1], absm), zero)), 0xD8);
        p23 = _mm256_permute4x64_epi64(
            _mm256_packs_epi16(_mm256_cmpeq_epi16(_mm256_and_si256(a[2], absm), zero),
                               _mm256_cmpeq_epi16(_mm256_and_si256(a[3], absm), zero)), 0xD8);
        f = ~((uint64_t)(uint32_t)_mm256_movemask_epi8(p01)
              | ((uint64_t)(uint32_t)_mm256_movemask_epi8(p23) << 32));
        if (mode == APR24_MASK) {
            const uint8_t* kg = keep + 4 * g;
            __m256i k0 = _mm256_loadu_si256((const __m256i*)kg);
            __m256i k1 = _mm256_loadu_si256((const __m256i*)(kg + 32));
            f &= ~((uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(k0, zero))
                   | ((uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(k1, zero)) << 32));
            /* a filler position the mask drops is stored as +0: clear the dropped elements */
            for (j = 0; j < 4; j++) {
                __m256i kw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(kg + 16 * j)));
                a[j] = _mm256_andnot_si256(_mm256_cmpeq_epi16(kw, zero), a[j]);
            }
        }
        if (apr24_over2(f)) {
            fs = apr24_span_u16(xg, keep ? keep + 4 * g : keep, 16, mode, 0, vals + 2 * g,
                                codes + g / 2, bits ? bits + g / 2 : bits, &b2);
            if (fs >= 0 && first < 0) {
                first = g + fs;
                *bad = b2;
            }
            continue;
        }
        fv = _mm_cvtsi64_si128((long long)f);
        lo = _mm_and_si128(fv, lo4);
        hi = _mm_and_si128(_mm_srli_epi16(fv, 4), lo4);
        cb = _mm_or_si128(_mm_shuffle_epi8(ctab, lo), _mm_slli_epi16(_mm_shuffle_epi8(ctab, hi), 4));
        _mm_storel_epi64((__m128i*)(codes + g / 2), cb);
        if (bits)
            _mm_storel_epi64((__m128i*)(bits + g / 2),
                             _mm_or_si128(_mm_shuffle_epi8(ptab, lo),
                                          _mm_slli_epi16(_mm_shuffle_epi8(ptab, hi), 4)));
        cw = (uint64_t)_mm_cvtsi128_si64(cb);
        for (j = 0; j < 4; j++) {
            __m256i ctl = _mm256_set_epi64x(-1LL, (long long)apr24_ctrl16[(cw >> (16 * j + 8)) & 0xFF],
                                            -1LL, (long long)apr24_ctrl16[(cw >> (16 * j)) & 0xFF]);
            __m256i v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(a[j], ctl), 0x08);
            _mm_storeu_si128((__m128i*)(vals + 2 * g + 8 * j), _mm256_castsi256_si128(v));
        }
    }
    if (g < ngroups) {
        fs = apr24_span_u16(x + 4 * g, keep ? keep + 4 * g : keep, ngroups - g, mode, 0,
                            vals + 2 * g, codes + g / 2, bits ? bits + g / 2 : bits, &b2);
        if (fs >= 0 && first < 0) {
            first = g + fs;
            *bad = b2;
        }
    }
    return first;
}
#endif

#ifndef __CUDACC__
#ifndef APR24_SIMD
static void apr24_init(void) {}
#endif

/* Switch the SIMD encoder off (0) or back on where the CPU has it (1), or only ask (-1);
 * returns whether it was on.  For tests and benchmarks of the scalar fallback; not to be called
 * while a kernel runs. */
static int apr24_simd(int on)
{
#ifdef APR24_SIMD
    int prev = apr24_avx2;
    if (on >= 0) apr24_avx2 = on ? __builtin_cpu_supports("avx2") : 0;
    return prev;
#else
    (void)on;
    return 0;
#endif
}

/* apr24_span_u16 with the SIMD encoder where the CPU has it (NONZERO and MASK modes). */
static inline int64_t apr24_span_u16_fast(const uint16_t* x, const uint8_t* keep, int64_t ngroups,
                                          int mode, uint32_t kinf, uint16_t* vals, uint8_t* codes,
                                          uint8_t* bits, int* bad)
{
#ifdef APR24_SIMD
    if (apr24_avx2 && mode != APR24_SELECT)
        return apr24_span_u16_avx2(x, keep, ngroups, mode, vals, codes, bits, bad);
#endif
    return apr24_span_u16(x, keep, ngroups, mode, kinf, vals, codes, bits, bad);
}
#endif /* !__CUDACC__ */

#endif /* APR_SPARSE24_H */
