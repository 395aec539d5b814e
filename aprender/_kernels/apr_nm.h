/* N:M selection (keep the N largest keys of every group of M): the kernels behind nm.pyx.  Groups
 * are contiguous (last axis) or strided by `inner` (other axes); no kernel needs heap scratch.
 */
#ifndef APRENDER_NM_H
#define APRENDER_NM_H

#include "apr_keys.h"

/* N:M selection on native keys.  Element t of a group outranks u when key_t > key_u, or the keys
 * are equal and t > u; an element is kept when fewer than n elements outrank it.
 * nm4:      contiguous groups of 4 (g0..g1), branch-free;
 * nm:       contiguous groups of m <= APR_NM_MAX_M, O(m^2) rank count on m keys (on the stack);
 * nm_cols:  one group-row of an (outer, L, inner) array: m rows of `inner` contiguous elements at
 *           stride `inner`, vectorised across the inner axis in tiles of APR_NM_TILE columns
 *           (rank counts on the stack).  No kernel here needs heap scratch. */
#define APR_NM_MAX_M 1024
#define APR_NM_TILE 512
#define APR_DEFINE_NM(W, UT, ST, SIGN)                                                      \
    APR_CLONES static ptrdiff_t apr_nm4_##W(const UT *x, ptrdiff_t g0, ptrdiff_t g1, int n,  \
                                            int magnitude, UT khi_, UT klo_, uint8_t *out) { \
        UT am = apr_amask##W(magnitude);                                                    \
        ST khi = apr_sdom##W(khi_), klo = apr_sdom##W(klo_);                                \
        ptrdiff_t g, bad = 0;                                                               \
        for (g = g0; g < g1; g++) {                                                         \
            ST k0 = apr_skey##W(x[4 * g], am), k1 = apr_skey##W(x[4 * g + 1], am);          \
            ST k2 = apr_skey##W(x[4 * g + 2], am), k3 = apr_skey##W(x[4 * g + 3], am);      \
            int r0 = (k1 >= k0) + (k2 >= k0) + (k3 >= k0);                                  \
            int r1 = (k0 > k1) + (k2 >= k1) + (k3 >= k1);                                   \
            int r2 = (k0 > k2) + (k1 > k2) + (k3 >= k2);                                    \
            int r3 = (k0 > k3) + (k1 > k3) + (k2 > k3);                                     \
            out[4 * g] = r0 < n;                                                            \
            out[4 * g + 1] = r1 < n;                                                        \
            out[4 * g + 2] = r2 < n;                                                        \
            out[4 * g + 3] = r3 < n;                                                        \
            bad += ((k0 >= khi) | (k0 <= klo)) + ((k1 >= khi) | (k1 <= klo))                \
                 + ((k2 >= khi) | (k2 <= klo)) + ((k3 >= khi) | (k3 <= klo));               \
        }                                                                                   \
        return bad;                                                                         \
    }                                                                                       \
    static ptrdiff_t apr_nm_##W(const UT *x, ptrdiff_t g0, ptrdiff_t g1, int n, int m,      \
                                int magnitude, UT khi_, UT klo_, uint8_t *out) {            \
        UT am = apr_amask##W(magnitude);                                                    \
        ST khi = apr_sdom##W(khi_), klo = apr_sdom##W(klo_);                                \
        ST keys[APR_NM_MAX_M];                                                              \
        ptrdiff_t g, bad = 0;                                                               \
        int t, u;                                                                           \
        for (g = g0; g < g1; g++) {                                                         \
            const UT *xg = x + g * m;                                                       \
            for (t = 0; t < m; t++) {                                                       \
                keys[t] = apr_skey##W(xg[t], am);                                           \
                bad += (keys[t] >= khi) | (keys[t] <= klo);                                 \
            }                                                                               \
            for (t = 0; t < m; t++) {                                                       \
                ST kt = keys[t];                                                            \
                int rank = 0;                                                               \
                for (u = 0; u < t; u++) rank += keys[u] > kt;                               \
                for (u = t + 1; u < m; u++) rank += keys[u] >= kt;                          \
                out[g * m + t] = rank < n;                                                  \
            }                                                                               \
        }                                                                                   \
        return bad;                                                                         \
    }                                                                                       \
    APR_CLONES static ptrdiff_t apr_nm_cols_##W(const UT *x, ptrdiff_t inner, int n, int m,  \
                                                int magnitude, UT khi_, UT klo_,            \
                                                uint8_t *out) {                             \
        UT am = apr_amask##W(magnitude);                                                    \
        ST khi = apr_sdom##W(khi_), klo = apr_sdom##W(klo_);                                \
        int32_t rank[APR_NM_TILE];                                                          \
        ptrdiff_t i, j0, bad = 0;                                                           \
        int t, u;                                                                           \
        for (j0 = 0; j0 < inner; j0 += APR_NM_TILE) {                                       \
            ptrdiff_t w = inner - j0 < APR_NM_TILE ? inner - j0 : APR_NM_TILE;              \
            for (t = 0; t < m; t++) {                                                       \
                const UT *xt = x + t * inner + j0;                                          \
                for (i = 0; i < w; i++) rank[i] = 0;                                        \
                for (i = 0; i < w; i++) {                                                   \
                    ST kt = apr_skey##W(xt[i], am);                                         \
                    bad += (kt >= khi) | (kt <= klo);                                       \
                }                                                                           \
                for (u = 0; u < m; u++) {                                                   \
                    const UT *xu = x + u * inner + j0;                                      \
                    if (u == t) continue;                                                   \
                    if (u < t) {                                                            \
                        for (i = 0; i < w; i++)                                             \
                            rank[i] += apr_skey##W(xu[i], am) > apr_skey##W(xt[i], am);     \
                    } else {                                                                \
                        for (i = 0; i < w; i++)                                             \
                            rank[i] += apr_skey##W(xu[i], am) >= apr_skey##W(xt[i], am);    \
                    }                                                                       \
                }                                                                           \
                for (i = 0; i < w; i++) out[t * inner + j0 + i] = rank[i] < n;              \
            }                                                                               \
        }                                                                                   \
        return bad;                                                                         \
    }
APR_DEFINE_NM(16, uint16_t, int16_t, 0x8000u)
APR_DEFINE_NM(32, uint32_t, int32_t, 0x80000000u)
APR_DEFINE_NM(64, uint64_t, int64_t, 0x8000000000000000ull)

/* N:4 on 32-bit keys with AVX2 (picked at load time by apr_nm_init; apr_nm4_32 is the fallback
 * and does the tail): a group of four is one 128-bit lane, so an element's rivals are the lane
 * rotated by 1, 2 and 3 (pshufd).  Rival u = t + d (mod 4) outranks t when its key is greater,
 * or equal and u > t, i.e. t < 4 - d: a constant lane mask per rotation.  Keep = rank < n;
 * 32 elements per step, packed to bytes.  Same bytes and the same non-finite count. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__) && !defined(APR_NO_CLONES)
#include <immintrin.h>
#define APR_NM4_AVX2 1
static int apr_nm4_avx2_ok = 0;

__attribute__((target("avx2"))) static inline __m256i apr_nm4_keep8(__m256i x, __m256i am,
                                                                  __m256i n, __m256i khi,
                                                                  __m256i klo, int *bad) {
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), low31 = _mm256_set1_epi32(0x7FFFFFFF);
    /* ties: rival at rotation d outranks on equality in lanes t < 4 - d */
    const __m256i t1 = _mm256_setr_epi32(-1, -1, -1, 0, -1, -1, -1, 0);
    const __m256i t2 = _mm256_setr_epi32(-1, -1, 0, 0, -1, -1, 0, 0);
    const __m256i t3 = _mm256_setr_epi32(-1, 0, 0, 0, -1, 0, 0, 0);
    __m256i b = _mm256_and_si256(x, am), k, r1, r2, r3, rank, ok;
    b = _mm256_andnot_si256(_mm256_cmpeq_epi32(b, sign), b);
    k = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), low31));
    r1 = _mm256_shuffle_epi32(k, 0x39); /* lane t gets element t + 1 (mod 4) */
    r2 = _mm256_shuffle_epi32(k, 0x4E); /* t + 2 */
    r3 = _mm256_shuffle_epi32(k, 0x93); /* t + 3 */
    rank = _mm256_add_epi32(
        _mm256_add_epi32(
            _mm256_or_si256(_mm256_cmpgt_epi32(r1, k), _mm256_and_si256(_mm256_cmpeq_epi32(r1, k), t1)),
            _mm256_or_si256(_mm256_cmpgt_epi32(r2, k), _mm256_and_si256(_mm256_cmpeq_epi32(r2, k), t2))),
        _mm256_or_si256(_mm256_cmpgt_epi32(r3, k), _mm256_and_si256(_mm256_cmpeq_epi32(r3, k), t3)));
    /* rank holds minus the number of rivals that outrank: keep when -rank < n */
    ok = _mm256_and_si256(_mm256_cmpgt_epi32(khi, k), _mm256_cmpgt_epi32(k, klo));
    *bad += 8 - __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(ok)));
    return _mm256_cmpgt_epi32(n, _mm256_sub_epi32(_mm256_setzero_si256(), rank));
}

__attribute__((target("avx2"))) static ptrdiff_t apr_nm4_avx2_32(const uint32_t *x, ptrdiff_t g0,
                                                                 ptrdiff_t g1, int n,
                                                                 int magnitude, uint32_t khi_,
                                                                 uint32_t klo_, uint8_t *out) {
    const __m256i am = _mm256_set1_epi32((int)apr_amask32(magnitude)), vn = _mm256_set1_epi32(n);
    const __m256i khi = _mm256_set1_epi32(apr_sdom32(khi_)), klo = _mm256_set1_epi32(apr_sdom32(klo_));
    const __m256i one = _mm256_set1_epi8(1), fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    ptrdiff_t g = g0;
    int bad = 0;
    for (; g + 8 <= g1; g += 8) {
        const uint32_t *xg = x + 4 * g;
        __m256i a = apr_nm4_keep8(_mm256_loadu_si256((const __m256i *)xg), am, vn, khi, klo, &bad);
        __m256i b = apr_nm4_keep8(_mm256_loadu_si256((const __m256i *)(xg + 8)), am, vn, khi, klo, &bad);
        __m256i c = apr_nm4_keep8(_mm256_loadu_si256((const __m256i *)(xg + 16)), am, vn, khi, klo, &bad);
        __m256i d = apr_nm4_keep8(_mm256_loadu_si256((const __m256i *)(xg + 24)), am, vn, khi, klo, &bad);
        /* packs interleave 128-bit lanes: a0 b0 a1 b1 | ... ; the dword permutation restores
           element order */
        __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
        __m256i abcd = _mm256_packs_epi16(ab, cd);
        abcd = _mm256_permutevar8x32_epi32(abcd, fix);
        _mm256_storeu_si256((__m256i *)(out + 4 * g), _mm256_and_si256(abcd, one));
    }
    return (ptrdiff_t)bad + apr_nm4_32(x, g, g1, n, magnitude, khi_, klo_, out);
}
#endif

static void apr_nm_init(void) {
#ifdef APR_NM4_AVX2
    __builtin_cpu_init();
    apr_nm4_avx2_ok = __builtin_cpu_supports("avx2");
#endif
}

/* Switch the AVX2 N:4 kernel off (0), back on where the CPU has it (1), or only ask (-1);
 * returns whether it was on. */
static int apr_nm_simd(int on) {
#ifdef APR_NM4_AVX2
    int prev = apr_nm4_avx2_ok;
    if (on >= 0) apr_nm4_avx2_ok = on ? __builtin_cpu_supports("avx2") : 0;
    return prev;
#else
    (void)on;
    return 0;
#endif
}

static inline ptrdiff_t apr_nm4_fast32(const uint32_t *x, ptrdiff_t g0, ptrdiff_t g1, int n,
                                       int magnitude, uint32_t khi, uint32_t klo, uint8_t *out) {
#ifdef APR_NM4_AVX2
    if (apr_nm4_avx2_ok) return apr_nm4_avx2_32(x, g0, g1, n, magnitude, khi, klo, out);
#endif
    return apr_nm4_32(x, g0, g1, n, magnitude, khi, klo, out);
}

#endif
