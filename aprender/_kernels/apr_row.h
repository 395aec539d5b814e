/* Exact per-row selection (per_row=True): one call decides the mask of one row of n values,
 * pruning its k smallest keys (ties: the lowest index first), in the calling thread.  One function
 * per key width.
 */
#ifndef APRENDER_ROW_H
#define APRENDER_ROW_H

#include "apr_keys.h"

/* Per-row exact selection on native keys: MSD radix select with 8-bit digits and branch-free
 * compaction (no data-dependent branches), then a branch-free write with the tie rule.
 * keys: scratch of n slots; out[j] = 1 keeps x[j].  Returns the number of non-finite values
 * (then out is not written). */
#define APR_DEFINE_ROW(W, UT, ST, SIGN)                                                     \
    APR_CLONES static ptrdiff_t apr_row##W(const UT *x, ptrdiff_t n, ptrdiff_t k,            \
                                           int magnitude, UT khi_, UT klo_, UT *keys,        \
                                           uint8_t *out) {                                   \
        UT am = apr_amask##W(magnitude);                                                    \
        ST khi = apr_sdom##W(khi_), klo = apr_sdom##W(klo_);                                \
        ptrdiff_t i, m = n, rank = k - 1, below = 0, seen = 0, r;                           \
        int64_t cnt[2048], cnt4[4][256]; /* rows may exceed 2^31 elements */              \
        /* first digit: 11 bits under the top bit in magnitude order (which is always set), \
           from the top bit otherwise; then 8-bit digits down to bit 0 */                   \
        int sh = W - 11 - (magnitude ? 1 : 0), wd = 11, d;                                  \
        UT t = 0;                                                                           \
        {   /* keys, and whether any is non-finite (an OR in the keys' own lane width) */  \
            ST anybad = 0;                                                                  \
            for (i = 0; i < n; i++) {                                                       \
                ST sk = apr_skey##W(x[i], am);                                              \
                anybad |= (ST)((sk >= khi) | (sk <= klo));                                  \
                keys[i] = (UT)((UT)sk ^ (UT)(SIGN));                                        \
            }                                                                               \
            if (anybad) return 1;                                                           \
        }                                                                                   \
        for (;;) {                                                                          \
            ptrdiff_t w = 0, acc = 0, b = 0, nb = (ptrdiff_t)1 << wd;                        \
            UT dm = (UT)(nb - 1);                                                           \
            if (m <= 16) { /* few candidates left: insertion sort them */                   \
                ptrdiff_t a, c;                                                             \
                for (a = 1; a < m; a++) {                                                   \
                    UT v = keys[a];                                                         \
                    for (c = a - 1; c >= 0 && keys[c] > v; c--) keys[c + 1] = keys[c];      \
                    keys[c + 1] = v;                                                        \
                }                                                                           \
                t = keys[rank];                                                             \
                for (a = 0; a < rank; a++) below += keys[a] < t;                            \
                break;                                                                      \
            }                                                                               \
            if (wd == 11) {                                                                 \
                memset(cnt, 0, sizeof(int64_t) * 2048);                                     \
                for (i = 0; i < m; i++) cnt[(keys[i] >> sh) & dm]++;                        \
            } else {                                                                        \
                memset(cnt4, 0, sizeof(cnt4));                                              \
                for (i = 0; i + 4 <= m; i += 4) {                                           \
                    cnt4[0][(keys[i] >> sh) & dm]++;                                        \
                    cnt4[1][(keys[i + 1] >> sh) & dm]++;                                    \
                    cnt4[2][(keys[i + 2] >> sh) & dm]++;                                    \
                    cnt4[3][(keys[i + 3] >> sh) & dm]++;                                    \
                }                                                                           \
                for (; i < m; i++) cnt4[0][(keys[i] >> sh) & dm]++;                         \
                for (d = 0; d < nb; d++)                                                    \
                    cnt[d] = cnt4[0][d] + cnt4[1][d] + cnt4[2][d] + cnt4[3][d];             \
            }                                                                               \
            for (b = 0; b < nb; b++) {                                                      \
                if (acc + cnt[b] > rank) break;                                             \
                acc += cnt[b];                                                              \
            }                                                                               \
            rank -= acc;                                                                    \
            below += acc;                                                                   \
            if (cnt[b] != m) {                                                              \
                for (i = 0; i < m; i++) {                                                   \
                    UT kk = keys[i];                                                        \
                    keys[w] = kk;                                                           \
                    w += (ptrdiff_t)(((kk >> sh) & dm) == (UT)b);                           \
                }                                                                           \
                m = w;                                                                      \
            }                                                                               \
            if (sh == 0) { t = keys[0]; break; } /* every remaining key is equal */         \
            wd = sh >= 8 ? 8 : sh;                                                          \
            sh -= wd;                                                                       \
        }                                                                                   \
        r = k - below; /* equal keys to prune, lowest index first */                        \
        {                                                                                   \
            ST st = apr_sdom##W(t);                                                         \
            ptrdiff_t eqs = 0, i0;                                                          \
            for (i0 = 0; i0 < n; i0 += 4096) { /* 32-bit counts per block: rows may be huge */ \
                ptrdiff_t e0 = i0 + 4096 < n ? i0 + 4096 : n;                               \
                int32_t q = 0;                                                              \
                for (i = i0; i < e0; i++) {                                                 \
                    ST sk = apr_skey##W(x[i], am);                                          \
                    out[i] = (uint8_t)(sk > st);                                            \
                    q += sk == st;                                                          \
                }                                                                           \
                eqs += q;                                                                   \
            }                                                                               \
            if (eqs > r) { /* keep the equal keys after the first r */                      \
                for (i = 0; i < n; i++) {                                                   \
                    if (apr_skey##W(x[i], am) == st) {                                      \
                        out[i] = (uint8_t)(seen >= r);                                      \
                        seen++;                                                             \
                    }                                                                       \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        return 0;                                                                           \
    }
APR_DEFINE_ROW(16, uint16_t, int16_t, 0x8000u)
APR_DEFINE_ROW(32, uint32_t, int32_t, 0x80000000u)
APR_DEFINE_ROW(64, uint64_t, int64_t, 0x8000000000000000ull)

/* Compaction of a block's flagged keys (cf[i] = 1) and their positions (i0 + i) to keys[0..c),
 * pos[0..c), in order; returns c.  Slots up to nb - 1 may be written (they are scratch).  Branch
 * free; the 32-bit version has an AVX2 left-pack (permutation table) picked at load time by
 * apr_rowb_init, because that loop is store-bound when written as scalar code. */
#define APR_DEFINE_PACK(W, UT)                                                                \
    static inline ptrdiff_t apr_pack_scalar##W(const UT *kb, const uint8_t *cf, ptrdiff_t nb, \
                                               uint32_t i0, UT *keys, uint32_t *pos) {        \
        ptrdiff_t i, c = 0;                                                                   \
        for (i = 0; i < nb; i++) {                                                            \
            keys[c] = kb[i];                                                                  \
            pos[c] = i0 + (uint32_t)i;                                                        \
            c += cf[i];                                                                       \
        }                                                                                     \
        return c;                                                                             \
    }
APR_DEFINE_PACK(16, uint16_t)
APR_DEFINE_PACK(32, uint32_t)
APR_DEFINE_PACK(64, uint64_t)

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__) && !defined(APR_NO_CLONES)
#include <immintrin.h>
#define APR_PACK_AVX2 1
static uint32_t apr_pack_perm[256][8];
static int apr_pack_avx2_ok = 0;

__attribute__((target("avx2"))) static ptrdiff_t apr_pack_avx2_32(const uint32_t *kb,
                                                                  const uint8_t *cf,
                                                                  ptrdiff_t nb, uint32_t i0,
                                                                  uint32_t *keys,
                                                                  uint32_t *pos) {
    ptrdiff_t i, c = 0;
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)i0),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i eight = _mm256_set1_epi32(8), zero = _mm256_setzero_si256();
    for (i = 0; i + 8 <= nb; i += 8) {
        __m256i f = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cf + i)));
        int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(f, zero)));
        __m256i p = _mm256_loadu_si256((const __m256i *)apr_pack_perm[m]);
        __m256i k = _mm256_loadu_si256((const __m256i *)(kb + i));
        _mm256_storeu_si256((__m256i *)(keys + c), _mm256_permutevar8x32_epi32(k, p));
        _mm256_storeu_si256((__m256i *)(pos + c), _mm256_permutevar8x32_epi32(idx, p));
        c += __builtin_popcount((unsigned)m);
        idx = _mm256_add_epi32(idx, eight);
    }
    for (; i < nb; i++) {
        keys[c] = kb[i];
        pos[c] = i0 + (uint32_t)i;
        c += cf[i];
    }
    return c;
}
#endif

/* Called once when the module loads (before any thread runs): the left-pack table and the
 * CPU check. */
static void apr_rowb_init(void) {
#ifdef APR_PACK_AVX2
    int m, b, c;
    for (m = 0; m < 256; m++) {
        c = 0;
        for (b = 0; b < 8; b++)
            if (m & (1 << b)) apr_pack_perm[m][c++] = (uint32_t)b;
        for (; c < 8; c++) apr_pack_perm[m][c] = 0;
    }
    __builtin_cpu_init();
    apr_pack_avx2_ok = __builtin_cpu_supports("avx2");
#endif
}

/* Switch the AVX2 left-pack off (0) or back on where the CPU has it (1), or only ask (-1);
 * returns whether it was on (tests and benchmarks of the scalar fallback). */
static int apr_rowb_simd(int on) {
#ifdef APR_PACK_AVX2
    int prev = apr_pack_avx2_ok;
    if (on >= 0) apr_pack_avx2_ok = on ? __builtin_cpu_supports("avx2") : 0;
    return prev;
#else
    (void)on;
    return 0;
#endif
}

static inline ptrdiff_t apr_pack16(const uint16_t *kb, const uint8_t *cf, ptrdiff_t nb,
                                   uint32_t i0, uint16_t *keys, uint32_t *pos) {
    return apr_pack_scalar16(kb, cf, nb, i0, keys, pos);
}
static inline ptrdiff_t apr_pack32(const uint32_t *kb, const uint8_t *cf, ptrdiff_t nb,
                                   uint32_t i0, uint32_t *keys, uint32_t *pos) {
#ifdef APR_PACK_AVX2
    if (apr_pack_avx2_ok) return apr_pack_avx2_32(kb, cf, nb, i0, keys, pos);
#endif
    return apr_pack_scalar32(kb, cf, nb, i0, keys, pos);
}
static inline ptrdiff_t apr_pack64(const uint64_t *kb, const uint8_t *cf, ptrdiff_t nb,
                                   uint32_t i0, uint64_t *keys, uint32_t *pos) {
    return apr_pack_scalar64(kb, cf, nb, i0, keys, pos);
}

/* Per-row selection inside a bracket shared by all rows (apr_rowb): one pass over the row writes
 * the provisional mask (keep = key above the bracket), counts the keys below it and collects the
 * keys inside [lo, hi] (native keys) with their positions; when the k-th smallest key lies in the
 * bracket, a radix select among those few candidates gives the threshold and only their mask
 * bytes are rewritten, in index order (the tie rule: equal keys prune the lowest index first, and
 * every key equal to the threshold is a candidate).  The pass works in blocks of APR_ROWB_BLOCK:
 * a branch-free loop (vectorised) writes mask bytes and candidate flags, then the set flags are
 * walked eight at a time.  Returns 0 (done), 1 (a non-finite value: out is not meaningful) or
 * 2 (the bracket missed the k-th key, or more than cap keys fell inside it: out is not
 * meaningful and the caller runs apr_row).  keys: cap slots; pos: cap slots; n < 2^32. */
#define APR_ROWB_BLOCK 256
#define APR_DEFINE_ROWB(W, UT, ST, SIGN)                                                      \
    APR_CLONES static ptrdiff_t apr_rowb##W(const UT *x, ptrdiff_t n, ptrdiff_t k,             \
                                            int magnitude, UT khi_, UT klo_, UT lo_, UT hi_,   \
                                            ptrdiff_t cap, UT *keys, uint32_t *pos,            \
                                            uint8_t *out) {                                    \
        UT am = apr_amask##W(magnitude);                                                      \
        ST khi = apr_sdom##W(khi_), klo = apr_sdom##W(klo_);                                  \
        ST lo = apr_sdom##W(lo_), hi = apr_sdom##W(hi_);                                      \
        ptrdiff_t i0, w = 0, below = 0, below2 = 0, r, j, seen = 0;                           \
        ST anybad = 0, st;                                                                    \
        UT t;                                                                                 \
        uint8_t cf[APR_ROWB_BLOCK];                                                           \
        UT kb[APR_ROWB_BLOCK];                                                                \
        for (i0 = 0; i0 < n; i0 += APR_ROWB_BLOCK) {                                          \
            ptrdiff_t nb = n - i0 < APR_ROWB_BLOCK ? n - i0 : APR_ROWB_BLOCK, i;               \
            const UT *xb = x + i0;                                                            \
            uint8_t *ob = out + i0;                                                           \
            int32_t bl = 0;                                                                   \
            if (w + nb > cap) return 2;                                                       \
            for (i = 0; i < nb; i++) {                                                        \
                ST sk = apr_skey##W(xb[i], am);                                               \
                anybad |= (ST)((sk >= khi) | (sk <= klo));                                    \
                ob[i] = (uint8_t)(sk > hi);                                                   \
                bl += sk < lo;                                                                \
                cf[i] = (uint8_t)((sk >= lo) & (sk <= hi));                                   \
                kb[i] = (UT)((UT)sk ^ (UT)(SIGN));                                            \
            }                                                                                 \
            below += bl;                                                                      \
            w += apr_pack##W(kb, cf, nb, (uint32_t)i0, keys + w, pos + w);                    \
        }                                                                                     \
        if (anybad) return 1;                                                                 \
        if (!(below < k && k <= below + w)) return 2;                                         \
        t = apr_radix_select##W(keys, w, k - 1 - below, &below2);                             \
        r = k - below - below2; /* keys equal to t to prune, lowest index first */           \
        st = apr_sdom##W(t);                                                                  \
        for (j = 0; j < w; j++) {                                                             \
            uint32_t p = pos[j];                                                              \
            ST sk = apr_skey##W(x[p], am);                                                    \
            ptrdiff_t eq = sk == st;                                                          \
            out[p] = (uint8_t)((sk > st) | (eq & (seen >= r)));                               \
            seen += eq;                                                                       \
        }                                                                                     \
        return 0;                                                                             \
    }

APR_DEFINE_ROWB(16, uint16_t, int16_t, 0x8000u)
APR_DEFINE_ROWB(32, uint32_t, int32_t, 0x80000000u)
APR_DEFINE_ROWB(64, uint64_t, int64_t, 0x8000000000000000ull)

#endif
