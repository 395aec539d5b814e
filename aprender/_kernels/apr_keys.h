/* Order keys, bit casts, non-finite tests and 16-bit float conversions: what every CPU kernel
 * family of aprender builds on.
 *
 * A key is an unsigned integer of the input's width whose unsigned order equals the numeric order
 * of the value it came from (carried zero-extended in a uint64 between kernels).  Two transforms:
 *
 *   magnitude: the sign bit is cleared first, so the key orders |x| (+0 and -0 become the same key);
 *   signed:    the usual IEEE total-order trick (negative: flip all bits, positive: set the sign bit),
 *              with -0 canonicalised to +0 so that equal values always get equal keys.
 *
 * The 16-bit formats (IEEE half and bfloat16) share one key transform: both are sign-magnitude
 * with the exponent above the mantissa, so their bit patterns order like their values.  Only
 * finiteness tests and conversions differ, and those take the format explicitly.  The bit patterns
 * of the formats (APR_F16_EXP, APR_BF16_EXP, ...) are defined here and nowhere else in C; the
 * Cython modules take them through _common.pxd.
 *
 * The kernel families, each in its own header that includes this one:
 *
 *   apr_passes.h  range / write / keep-equals / histogram / mark / gather passes over a flat span
 *   apr_select.h  radix select of the k-th smallest key of a buffer
 *   apr_row.h     exact per-row selection
 *   apr_nm.h      N:M selection
 *
 * (apr_sparse24.h, shared with the CUDA kernel, stands alone.)  This header includes the four at
 * its end, so a Cython module that names "apr_keys.h" in a `cdef extern from` sees every kernel.
 */
#ifndef APRENDER_KEYS_H
#define APRENDER_KEYS_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stddef.h>

#define APR_FMT_F16 1
#define APR_FMT_BF16 2

/* Bit patterns of the floating formats.  EXP: the exponent field, which is also the bit pattern
 * of +inf (a value is not finite when all its exponent bits are set); ABS: every bit but the sign;
 * SIGN: the sign bit. */
#define APR_F16_EXP 0x7c00u
#define APR_BF16_EXP 0x7f80u
#define APR_U16_ABS 0x7fffu
#define APR_U16_SIGN 0x8000u
#define APR_F32_EXP 0x7f800000u
#define APR_F32_ABS 0x7fffffffu
#define APR_F64_EXP 0x7ff0000000000000ull

static inline uint32_t apr_f32_bits(float x) { uint32_t b; memcpy(&b, &x, 4); return b; }
static inline uint64_t apr_f64_bits(double x) { uint64_t b; memcpy(&b, &x, 8); return b; }
static inline float apr_bits_f32(uint32_t b) { float x; memcpy(&x, &b, 4); return x; }
static inline double apr_bits_f64(uint64_t b) { double x; memcpy(&x, &b, 8); return x; }


static inline int apr_ctz64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(v);
#else
    int n = 0;
    while (!(v & 1u)) { v >>= 1; n++; }
    return n;
#endif
}

/* Software prefetch (a hint: never faults, whatever the address) for loops whose addresses the
 * hardware cannot predict: the sample's strata, the candidates' mask bytes. */
static inline void apr_prefetch(const void *p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 0);
#else
    (void)p;
#endif
}
static inline void apr_prefetch_w(const void *p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 1, 3);
#else
    (void)p;
#endif
}

/* Hot loops over raw bits: on x86-64 with GCC they are compiled twice (AVX2 and baseline) and
 * picked at load time. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(__CUDACC__) && !defined(APR_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define APR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define APR_CLONES
#endif

/* Native keys: same width as the input, branch-free so that loops over them vectorise.
 * amask is all ones (signed order) or all ones but the sign bit (magnitude order). */
#define APR_DEFINE_NKEY(W, UT, ST, SIGN)                                                  \
    static inline UT apr_nkey##W(UT b, UT amask) {                                          \
        b = (UT)(b & amask);                                                                \
        b = (b == (UT)(SIGN)) ? (UT)0 : b;                                                  \
        UT m = (UT)((ST)b >> (W - 1));                                                      \
        return (UT)(b ^ (UT)(m | (UT)(SIGN)));                                              \
    }                                                                                       \
    static inline UT apr_amask##W(int magnitude) {                                          \
        return magnitude ? (UT)~(UT)(SIGN) : (UT)~(UT)0;                                    \
    }
APR_DEFINE_NKEY(16, uint16_t, int16_t, 0x8000u)
APR_DEFINE_NKEY(32, uint32_t, int32_t, 0x80000000u)
APR_DEFINE_NKEY(64, uint64_t, int64_t, 0x8000000000000000ull)

static inline uint64_t apr_key16(uint16_t b, int magnitude) {
    return apr_nkey16(b, apr_amask16(magnitude));
}
static inline uint64_t apr_key32(float x, int magnitude) {
    return apr_nkey32(apr_f32_bits(x), apr_amask32(magnitude));
}
static inline uint64_t apr_key64(double x, int magnitude) {
    return apr_nkey64(apr_f64_bits(x), apr_amask64(magnitude));
}

/* Signed-domain keys: the native key with its sign bit flipped (skey = key ^ SIGN), so that the
 * loops compare keys as signed integers, which SSE2/AVX2 compare natively, and vectorise.
 * sdom moves a native key (a threshold, a bracket end) into that domain. */
#define APR_DEFINE_SKEY(W, UT, ST, SIGN)                                                  \
    static inline ST apr_skey##W(UT b, UT am) {                                             \
        b = (UT)(b & am);                                                                   \
        b = (b == (UT)(SIGN)) ? (UT)0 : b;                                                  \
        ST s = (ST)b;                                                                       \
        return (ST)(s ^ (ST)((s >> (W - 1)) & (ST)~(UT)(SIGN)));                            \
    }                                                                                       \
    static inline ST apr_sdom##W(UT key) { return (ST)(UT)(key ^ (UT)(SIGN)); }
APR_DEFINE_SKEY(16, uint16_t, int16_t, 0x8000u)
APR_DEFINE_SKEY(32, uint32_t, int32_t, 0x80000000u)
APR_DEFINE_SKEY(64, uint64_t, int64_t, 0x8000000000000000ull)


/* Non-finite test on raw bits, given the exponent mask of the format. */
static inline int apr_nonfinite16(uint16_t b, uint16_t expmask) { return (b & expmask) == expmask; }
static inline int apr_nonfinite32(float x) { return (apr_f32_bits(x) & APR_F32_EXP) == APR_F32_EXP; }
static inline int apr_nonfinite64(double x) {
    return (apr_f64_bits(x) & APR_F64_EXP) == APR_F64_EXP;
}

/* ---- 16-bit float conversions (exact decode, round-to-nearest-even encode) ---- */

static inline float apr_bf16_to_f32(uint16_t h) { return apr_bits_f32((uint32_t)h << 16); }

static inline uint16_t apr_f32_to_bf16(float f) {
    uint32_t u = apr_f32_bits(f);
    if ((u & APR_F32_ABS) > APR_F32_EXP) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float apr_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & APR_U16_SIGN) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t out;
    if (exp == 0x1fu) {
        out = sign | APR_F32_EXP | (man << 13);
    } else if (exp != 0) {
        out = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        out = sign;
    } else { /* subnormal half: man * 2^-24, exact in float */
        float v = (float)man * 5.9604644775390625e-08f;
        out = sign | apr_f32_bits(v);
    }
    return apr_bits_f32(out);
}

static inline uint16_t apr_f32_to_f16(float f) {
    uint32_t x = apr_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & APR_U16_SIGN);
    uint32_t ax = x & APR_F32_ABS;
    if (ax >= APR_F32_EXP) /* inf or NaN */
        return (uint16_t)(sign | APR_F16_EXP | (ax > APR_F32_EXP ? 0x200u : 0u));
    if (ax >= 0x477ff000u) /* >= 65520 rounds to inf */
        return (uint16_t)(sign | APR_F16_EXP);
    if (ax < 0x38800000u) { /* below the smallest normal half (2^-14): subnormal or zero */
        if (ax < 0x33000000u) return sign; /* <= 2^-25 rounds to zero (2^-25 ties to even 0) */
        uint32_t e = ax >> 23;
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* value = m * 2^(e-150); half subnormal unit is 2^-24 */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q += 1u;
        return (uint16_t)(sign | q);
    }
    /* normal: rebias exponent and round the 13 dropped mantissa bits to nearest even */
    uint32_t r = ax - 0x38000000u; /* exponent 127 -> 15 */
    uint32_t q = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) q += 1u;
    return (uint16_t)(sign | q);
}

static inline double apr_u16_to_f64(uint16_t h, int fmt) {
    return fmt == APR_FMT_BF16 ? (double)apr_bf16_to_f32(h) : (double)apr_f16_to_f32(h);
}


/* the kernel families (see the opening comment) */
#include "apr_passes.h"
#include "apr_select.h"
#include "apr_row.h"
#include "apr_nm.h"

#endif
