/* Order keys and 16-bit float conversions shared by the aprender kernels.
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
 * finiteness tests and conversions differ, and those take the format explicitly.
 */
#ifndef APRENDER_KEYS_H
#define APRENDER_KEYS_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stddef.h>

#define APR_FMT_F16 1
#define APR_FMT_BF16 2

static inline uint32_t apr_f32_bits(float x) { uint32_t b; memcpy(&b, &x, 4); return b; }
static inline uint64_t apr_f64_bits(double x) { uint64_t b; memcpy(&b, &x, 8); return b; }
static inline float apr_bits_f32(uint32_t b) { float x; memcpy(&x, &b, 4); return x; }
static inline double apr_bits_f64(uint64_t b) { double x; memcpy(&x, &b, 8); return x; }

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

/* Hot loops over raw bits, one set per width.  Inside the loops keys are compared as signed
 * integers (skey = key ^ SIGN), which SSE2/AVX2 compare natively, so the loops vectorise.
 * On x86-64 with GCC they are compiled twice (AVX2 and baseline) and picked at load time.
 * range: count keys < lo, count keys in [lo, hi] and copy them (at most cap) to buf (cap + 1
 *        slots), count non-finite (key >= khi or key <= klo); blocks without candidates take
 *        a pure counting loop.
 * write: out[i] = key > t; returns the number of keys equal to t.
 * keep_equals_from: keep the keys equal to t from the first-th on. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(__CUDACC__) && !defined(APR_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define APR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define APR_CLONES
#endif

#define APR_RANGE_BLOCK 64

#define APR_DEFINE_LOOPS(W, UT, ST, SIGN)                                                   \
    static inline ST apr_skey##W(UT b, UT am) {                                             \
        b = (UT)(b & am);                                                                   \
        b = (b == (UT)(SIGN)) ? (UT)0 : b;                                                  \
        ST s = (ST)b;                                                                       \
        return (ST)(s ^ (ST)((s >> (W - 1)) & (ST)~(UT)(SIGN)));                            \
    }                                                                                       \
    static inline ST apr_sdom##W(UT key) { return (ST)(UT)(key ^ (UT)(SIGN)); }             \
    APR_CLONES static void apr_range##W(const UT *x, ptrdiff_t s, ptrdiff_t e, int magnitude, \
                                        UT lo_, UT hi_, UT khi_, UT klo_, uint64_t *buf,    \
                                        ptrdiff_t cap, int64_t *res) {                      \
        UT am = apr_amask##W(magnitude);                                                    \
        ST lo = apr_sdom##W(lo_), hi = apr_sdom##W(hi_);                                    \
        ST khi = apr_sdom##W(khi_), klo = apr_sdom##W(klo_);                                \
        int64_t lt = 0, inside = 0, bad = 0;                                                \
        ptrdiff_t i0, i;                                                                    \
        for (i0 = s; i0 < e; i0 += APR_RANGE_BLOCK) {                                       \
            ptrdiff_t e0 = i0 + APR_RANGE_BLOCK < e ? i0 + APR_RANGE_BLOCK : e;             \
            int32_t l = 0, q = 0, b = 0;                                                    \
            for (i = i0; i < e0; i++) {                                                     \
                ST k = apr_skey##W(x[i], am);                                               \
                b += (k >= khi) | (k <= klo);                                               \
                l += k < lo;                                                                \
                q += (k >= lo) & (k <= hi);                                                 \
            }                                                                               \
            lt += l;                                                                        \
            bad += b;                                                                       \
            if (q && buf != NULL) {                                                         \
                for (i = i0; i < e0; i++) {                                                 \
                    ST k = apr_skey##W(x[i], am);                                           \
                    buf[inside < cap ? inside : cap] = (uint64_t)(UT)((UT)k ^ (UT)(SIGN));  \
                    inside += (k >= lo) & (k <= hi);                                        \
                }                                                                           \
            } else {                                                                        \
                inside += q;                                                                \
            }                                                                               \
        }                                                                                   \
        res[0] = lt;                                                                        \
        res[1] = inside;                                                                    \
        res[2] = bad;                                                                       \
    }                                                                                       \
    APR_CLONES static int64_t apr_write##W(const UT *x, ptrdiff_t s, ptrdiff_t e,           \
                                           int magnitude, UT t_, uint8_t *out) {            \
        UT am = apr_amask##W(magnitude);                                                    \
        ST t = apr_sdom##W(t_);                                                             \
        int64_t eq = 0;                                                                     \
        ptrdiff_t i0, i;                                                                    \
        for (i0 = s; i0 < e; i0 += 4096) {                                                  \
            ptrdiff_t e0 = i0 + 4096 < e ? i0 + 4096 : e;                                   \
            int32_t q = 0;                                                                  \
            for (i = i0; i < e0; i++) {                                                     \
                ST k = apr_skey##W(x[i], am);                                               \
                out[i] = k > t;                                                             \
                q += k == t;                                                                \
            }                                                                               \
            eq += q;                                                                        \
        }                                                                                   \
        return eq;                                                                          \
    }                                                                                       \
    APR_CLONES static int64_t apr_count_less##W(const UT *x, ptrdiff_t s, ptrdiff_t e,      \
                                                int magnitude, UT t_) {                     \
        UT am = apr_amask##W(magnitude);                                                    \
        ST t = apr_sdom##W(t_);                                                             \
        int64_t c = 0;                                                                      \
        ptrdiff_t i;                                                                        \
        for (i = s; i < e; i++) c += apr_skey##W(x[i], am) < t;                             \
        return c;                                                                           \
    }                                                                                       \
    static void apr_keep_equals_from##W(const UT *x, ptrdiff_t s, ptrdiff_t e,              \
                                        int magnitude, UT t, ptrdiff_t first,               \
                                        uint8_t *out) {                                     \
        UT am = apr_amask##W(magnitude);                                                    \
        ptrdiff_t i, j = 0;                                                                 \
        for (i = s; i < e; i++) {                                                           \
            if (apr_nkey##W(x[i], am) == t) {                                               \
                if (j >= first) out[i] = 1;                                                 \
                j++;                                                                        \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    static void apr_hist##W(const UT *x, ptrdiff_t s, ptrdiff_t e, int magnitude,           \
                            int shift, UT prefix, UT pmask, UT khi, UT klo,                 \
                            int64_t *hist, int64_t *res) {                                  \
        UT am = apr_amask##W(magnitude);                                                    \
        ptrdiff_t i, bad = 0;                                                               \
        for (i = s; i < e; i++) {                                                           \
            UT k = apr_nkey##W(x[i], am);                                                   \
            bad += (k >= khi) | (k <= klo);                                                 \
            if ((UT)(k & pmask) == prefix) hist[(k >> shift) & 0xffff] += 1;                \
        }                                                                                   \
        res[2] = bad;                                                                       \
    }
APR_DEFINE_LOOPS(16, uint16_t, int16_t, 0x8000u)
APR_DEFINE_LOOPS(32, uint32_t, int32_t, 0x80000000u)
APR_DEFINE_LOOPS(64, uint64_t, int64_t, 0x8000000000000000ull)

/* Non-finite test on raw bits, given the exponent mask of the format. */
static inline int apr_nonfinite16(uint16_t b, uint16_t expmask) { return (b & expmask) == expmask; }
static inline int apr_nonfinite32(float x) { return (apr_f32_bits(x) & 0x7f800000u) == 0x7f800000u; }
static inline int apr_nonfinite64(double x) {
    return (apr_f64_bits(x) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

/* ---- 16-bit float conversions (exact decode, round-to-nearest-even encode) ---- */

static inline float apr_bf16_to_f32(uint16_t h) { return apr_bits_f32((uint32_t)h << 16); }

static inline uint16_t apr_f32_to_bf16(float f) {
    uint32_t u = apr_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float apr_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t out;
    if (exp == 0x1fu) {
        out = sign | 0x7f800000u | (man << 13);
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
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or NaN */
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) /* >= 65520 rounds to inf */
        return (uint16_t)(sign | 0x7c00u);
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

#endif
