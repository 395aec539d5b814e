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

#endif /* APR_SPARSE24_H */
