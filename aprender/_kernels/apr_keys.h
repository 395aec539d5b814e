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


static inline int apr_ctz64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(v);
#else
    int n = 0;
    while (!(v & 1u)) { v >>= 1; n++; }
    return n;
#endif
}

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
 * range: count keys < lo, count keys in [lo, hi] and copy them (native keys of the input's
 *        width, at most cap) to buf (cap + 1 slots), count non-finite (key >= khi or
 *        key <= klo); blocks without candidates take a pure counting loop.
 * write: out[i] = key > t; returns the number of keys equal to t.
 * keep_equals_from: keep the keys equal to t from the first-th on. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(__CUDACC__) && !defined(APR_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define APR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define APR_CLONES
#endif

#define APR_RANGE_BLOCK 64

/* Shared pieces of the range pass (expanded inside apr_range, where j, len, xb,
 * am, lo, hi, khi, klo, l, q, b and fl are in scope).  COUNT: one block of keys, counting keys
 * below the bracket, inside it (flagged in fl) and non-finite, with an optional extra store.
 * GATHER: the flagged keys of a block, lowest index first, via ctz over 8 flag bytes at a time. */
#define APR_RANGE_COUNT(ST, KEYEXPR, BADEXPR, STORE)                                        \
    for (j = 0; j < len; j++) {                                                             \
        ST k = KEYEXPR;                                                                     \
        uint8_t f = (uint8_t)((k >= lo) & (k <= hi));                                       \
        b += BADEXPR;                                                                       \
        l += k < lo;                                                                        \
        q += f;                                                                             \
        fl[j] = f;                                                                          \
        STORE;                                                                              \
    }
#define APR_RANGE_GATHER(KEEP_CANDIDATE)                                                    \
    {                                                                                       \
        ptrdiff_t j8;                                                                       \
        for (j8 = len; j8 < APR_RANGE_BLOCK; j8++) fl[j8] = 0;                              \
        for (j8 = 0; j8 < APR_RANGE_BLOCK; j8 += 8) {                                       \
            uint64_t word;                                                                  \
            memcpy(&word, fl + j8, 8);                                                      \
            while (word) {                                                                  \
                ptrdiff_t jj = j8 + (apr_ctz64(word) >> 3);                                 \
                ptrdiff_t slot = inside < cap ? inside : cap;                               \
                KEEP_CANDIDATE;                                                             \
                inside++;                                                                   \
                word &= word - 1;                                                           \
            }                                                                               \
        }                                                                                   \
    }

#define APR_DEFINE_LOOPS(W, UT, ST, SIGN, AT)                                                   \
    static inline ST apr_skey##W(UT b, UT am) {                                             \
        b = (UT)(b & am);                                                                   \
        b = (b == (UT)(SIGN)) ? (UT)0 : b;                                                  \
        ST s = (ST)b;                                                                       \
        return (ST)(s ^ (ST)((s >> (W - 1)) & (ST)~(UT)(SIGN)));                            \
    }                                                                                       \
    static inline ST apr_sdom##W(UT key) { return (ST)(UT)(key ^ (UT)(SIGN)); }             \
    APR_CLONES static void apr_range##W(const UT *x, ptrdiff_t s, ptrdiff_t e, int magnitude, \
                                        UT lo_, UT hi_, UT khi_, UT klo_, UT *buf,          \
                                        ptrdiff_t cap, int64_t *res) {                      \
        UT am = apr_amask##W(magnitude);                                                    \
        ST lo = apr_sdom##W(lo_), hi = apr_sdom##W(hi_);                                    \
        ST khi = apr_sdom##W(khi_), klo = apr_sdom##W(klo_);                                \
        int64_t lt = 0, inside = 0, bad = 0;                                                \
        uint8_t fl[APR_RANGE_BLOCK];                                                        \
        ptrdiff_t i0, j;                                                                    \
        for (i0 = s; i0 < e; i0 += APR_RANGE_BLOCK) {                                       \
            ptrdiff_t len = e - i0 < APR_RANGE_BLOCK ? e - i0 : APR_RANGE_BLOCK;            \
            const UT *xb = x + i0;                                                          \
            AT l = 0, q = 0, b = 0; /* at most 64 per block: fits the key width */      \
            if (magnitude) /* |x| order: the sign-cleared bits, no flip needed */           \
                APR_RANGE_COUNT(ST, (ST)(xb[j] & am), k >= khi, (void)0)                    \
            else                                                                            \
                APR_RANGE_COUNT(ST, apr_skey##W(xb[j], am), (k >= khi) | (k <= klo), (void)0) \
            lt += l;                                                                        \
            bad += b;                                                                       \
            if (q && buf != NULL) {                                                         \
                APR_RANGE_GATHER(buf[slot] = (UT)((UT)apr_skey##W(xb[jj], am) ^ (UT)(SIGN))) \
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
            if (magnitude) {                                                                \
                for (i = i0; i < e0; i++) {                                                 \
                    ST k = (ST)(x[i] & am);                                                 \
                    out[i] = k > t;                                                         \
                    q += k == t;                                                            \
                }                                                                           \
            } else {                                                                        \
                for (i = i0; i < e0; i++) {                                                 \
                    ST k = apr_skey##W(x[i], am);                                           \
                    out[i] = k > t;                                                         \
                    q += k == t;                                                            \
                }                                                                           \
            }                                                                               \
            eq += q;                                                                        \
        }                                                                                   \
        return eq;                                                                          \
    }                                                                                       \
    APR_CLONES static void apr_keep_equals_from##W(const UT *x, ptrdiff_t s, ptrdiff_t e,   \
                                                   int magnitude, UT t, ptrdiff_t first,    \
                                                   uint8_t *out) {                          \
        UT am = apr_amask##W(magnitude);                                                    \
        ptrdiff_t i, j = 0;                                                                 \
        if (first <= 0) { /* every equal key in the range is kept: a vectorised OR */       \
            ST st = apr_sdom##W(t);                                                         \
            for (i = s; i < e; i++) out[i] |= (uint8_t)(apr_skey##W(x[i], am) == st);        \
            return;                                                                         \
        }                                                                                   \
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
APR_DEFINE_LOOPS(16, uint16_t, int16_t, 0x8000u, int16_t)
APR_DEFINE_LOOPS(32, uint32_t, int32_t, 0x80000000u, int32_t)
APR_DEFINE_LOOPS(64, uint64_t, int64_t, 0x8000000000000000ull, int64_t)


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


/* k-th smallest (0-based rank) of a[0:n] by MSD radix select: 8-bit digits from the highest
 * non-zero byte of the largest key, four split histograms, branch-free compaction.  At most W/8
 * linear passes (worst case O(n)); only permutes a.  *below receives the number of keys
 * strictly smaller than the result.  One function per key width (16, 32 and 64 bits). */
#define APR_DEFINE_SELECT(W, UT)                                                                \
    APR_CLONES static UT apr_radix_select##W(UT *a, ptrdiff_t n, ptrdiff_t rank,              \
                                             ptrdiff_t *below_out) {                        \
        int32_t cnt4[4][256];                                                               \
        int64_t cnt[256];                                                                   \
        UT mx = 0, t = 0;                                                                   \
        ptrdiff_t i, m = n, below = 0;                                                      \
        int shift, d;                                                                       \
        for (i = 0; i < n; i++) mx = a[i] > mx ? a[i] : mx;                                 \
        shift = W - 8;                                                                      \
        while (shift > 0 && (mx >> shift) == 0) shift -= 8;                                 \
        for (; shift >= 0; shift -= 8) {                                                    \
            ptrdiff_t w = 0, acc = 0;                                                       \
            int b = 0;                                                                      \
            if (m <= 16) {                                                                  \
                ptrdiff_t x, c;                                                             \
                for (x = 1; x < m; x++) {                                                   \
                    UT v = a[x];                                                            \
                    for (c = x - 1; c >= 0 && a[c] > v; c--) a[c + 1] = a[c];               \
                    a[c + 1] = v;                                                           \
                }                                                                           \
                t = a[rank];                                                                \
                for (x = 0; x < rank; x++) below += a[x] < t;                               \
                *below_out = below;                                                         \
                return t;                                                                   \
            }                                                                               \
            memset(cnt4, 0, sizeof(cnt4));                                                  \
            for (i = 0; i + 4 <= m; i += 4) {                                               \
                cnt4[0][(a[i] >> shift) & 0xff]++;                                          \
                cnt4[1][(a[i + 1] >> shift) & 0xff]++;                                      \
                cnt4[2][(a[i + 2] >> shift) & 0xff]++;                                      \
                cnt4[3][(a[i + 3] >> shift) & 0xff]++;                                      \
            }                                                                               \
            for (; i < m; i++) cnt4[0][(a[i] >> shift) & 0xff]++;                           \
            for (d = 0; d < 256; d++)                                                       \
                cnt[d] = (int64_t)cnt4[0][d] + cnt4[1][d] + cnt4[2][d] + cnt4[3][d];        \
            for (d = 0; d < 256; d++) {                                                     \
                if (acc + cnt[d] > rank) { b = d; break; }                                  \
                acc += cnt[d];                                                              \
            }                                                                               \
            rank -= acc;                                                                    \
            below += acc;                                                                   \
            t |= (UT)((UT)b << shift);                                                      \
            if (cnt[b] == m) continue;                                                      \
            for (i = 0; i < m; i++) {                                                       \
                UT v = a[i];                                                                \
                UT tmp = a[w];                                                              \
                ptrdiff_t hit = (ptrdiff_t)(((v >> shift) & 0xff) == (UT)b);                \
                a[w] = hit ? v : tmp; /* swap a[i] into slot w when it matches */           \
                a[i] = hit ? tmp : v;                                                       \
                w += hit;                                                                   \
            }                                                                               \
            m = w;                                                                          \
        }                                                                                   \
        *below_out = below;                                                                 \
        return t;                                                                           \
    }
APR_DEFINE_SELECT(16, uint16_t)
APR_DEFINE_SELECT(32, uint32_t)
APR_DEFINE_SELECT(64, uint64_t)


/* Mark pass, for masks held in memory: out[i] = 1 for key > hi (kept whatever the threshold),
 * 0 for key < lo (pruned), 2 for key in [lo, hi] (a candidate, decided once the threshold is
 * known); res[0..2] = keys below lo, keys inside [lo, hi], non-finite keys.  Nothing is copied:
 * the candidates are found again by their mark, so no buffer is sized by a guess. */
#define APR_MARK_LOOP(ST, KEYEXPR, BADEXPR)                                                 \
    for (j = 0; j < len; j++) {                                                             \
        ST k = KEYEXPR;                                                                     \
        uint8_t f = (uint8_t)((k >= lo) & (k <= hi));                                       \
        b += BADEXPR;                                                                       \
        l += k < lo;                                                                        \
        q += f;                                                                             \
        ob[j] = (uint8_t)((uint8_t)(k > hi) | (uint8_t)(f << 1));                           \
    }
#define APR_DEFINE_MARK(W, UT, ST, SIGN, AT)                                                    \
    APR_CLONES static void apr_mark##W(const UT *x, ptrdiff_t s, ptrdiff_t e, int magnitude,  \
                                       UT lo_, UT hi_, UT khi_, UT klo_, uint8_t *out,      \
                                       int64_t *res) {                                      \
        UT am = apr_amask##W(magnitude);                                                    \
        ST lo = apr_sdom##W(lo_), hi = apr_sdom##W(hi_);                                    \
        ST khi = apr_sdom##W(khi_), klo = apr_sdom##W(klo_);                                \
        int64_t lt = 0, inside = 0, bad = 0;                                                \
        ptrdiff_t i0, j;                                                                    \
        for (i0 = s; i0 < e; i0 += APR_RANGE_BLOCK) {                                       \
            ptrdiff_t len = e - i0 < APR_RANGE_BLOCK ? e - i0 : APR_RANGE_BLOCK;            \
            const UT *xb = x + i0;                                                          \
            uint8_t *ob = out + i0;                                                         \
            AT l = 0, q = 0, b = 0; /* at most 64 per block: fits the key width */      \
            if (magnitude)                                                                  \
                APR_MARK_LOOP(ST, (ST)(xb[j] & am), k >= khi)                               \
            else                                                                            \
                APR_MARK_LOOP(ST, apr_skey##W(xb[j], am), (k >= khi) | (k <= klo))          \
            lt += l;                                                                        \
            inside += q;                                                                    \
            bad += b;                                                                       \
        }                                                                                   \
        res[0] = lt;                                                                        \
        res[1] = inside;                                                                    \
        res[2] = bad;                                                                       \
    }
APR_DEFINE_MARK(16, uint16_t, int16_t, 0x8000u, int16_t)
APR_DEFINE_MARK(32, uint32_t, int32_t, 0x80000000u, int32_t)
APR_DEFINE_MARK(64, uint64_t, int64_t, 0x8000000000000000ull, int64_t)

/* The candidates a mark pass left in out[s:e] (bytes == 2), in flat order.  Most 8-byte words
 * of the mask hold none (bit 1 is set only in a mark) and are skipped whole; the positions
 * found are batched so that the loads they lead to do not wait on the scan's branches.
 * gather: their native keys into keys[0:cap] and, when pos is not NULL, their positions into
 *         pos[0:cap] (the caller guarantees e <= 2^32); returns how many.
 * fix:    decide them with their keys (keys[0:cap], gathered in the same order): keep key > t,
 *         prune key < t, prune the equal keys while fewer than r were seen (seen: equal keys
 *         before s) and keep the others; returns how many it decided. */
#define APR_MARK_BATCH 256
#define APR_MARK_WORDS(VISIT)                                                               \
    ptrdiff_t at_[APR_MARK_BATCH], np_ = 0, b_;                                             \
    while (i < e) {                                                                         \
        if (i + 8 <= e) {                                                                   \
            uint64_t w;                                                                     \
            memcpy(&w, out + i, 8);                                                         \
            w &= 0x0202020202020202ull;                                                     \
            while (w) {                                                                     \
                ptrdiff_t q = i + (apr_ctz64(w) >> 3);                                      \
                at_[np_] = q;                                                               \
                np_ += out[q] == 2;                                                         \
                w &= w - 1;                                                                 \
            }                                                                               \
            i += 8;                                                                         \
        } else {                                                                            \
            at_[np_] = i;                                                                   \
            np_ += out[i] == 2;                                                             \
            i++;                                                                            \
        }                                                                                   \
        if (np_ > APR_MARK_BATCH - 9 || i >= e) {                                           \
            if (np_ > cap - j) np_ = cap - j;                                               \
            for (b_ = 0; b_ < np_; b_++) {                                                  \
                ptrdiff_t q = at_[b_];                                                      \
                VISIT;                                                                      \
                j++;                                                                        \
            }                                                                               \
            np_ = 0;                                                                        \
            if (j >= cap) break;                                                            \
        }                                                                                   \
    }
#define APR_DEFINE_GATHER(W, UT)                                                                \
    static ptrdiff_t apr_gather##W(const UT *x, const uint8_t *out, ptrdiff_t s, ptrdiff_t e,  \
                                   int magnitude, UT *keys, uint32_t *pos, ptrdiff_t cap) { \
        UT am = apr_amask##W(magnitude);                                                    \
        ptrdiff_t i = s, j = 0;                                                             \
        if (cap <= 0) return 0;                                                             \
        if (pos != NULL) {                                                                  \
            APR_MARK_WORDS({ keys[j] = apr_nkey##W(x[q], am); pos[j] = (uint32_t)q; })      \
        } else {                                                                            \
            APR_MARK_WORDS(keys[j] = apr_nkey##W(x[q], am))                                 \
        }                                                                                   \
        return j;                                                                           \
    }                                                                                       \
    static ptrdiff_t apr_fix_marks##W(uint8_t *out, ptrdiff_t s, ptrdiff_t e, const UT *keys, \
                                      ptrdiff_t cap, UT t, ptrdiff_t seen, ptrdiff_t r) {   \
        ptrdiff_t i = s, j = 0;                                                             \
        if (cap <= 0) return 0;                                                             \
        {                                                                                   \
            APR_MARK_WORDS({                                                                \
                UT kk = keys[j];                                                            \
                ptrdiff_t eq = kk == t;                                                     \
                out[q] = (uint8_t)((kk > t) | (eq & (seen >= r)));                          \
                seen += eq;                                                                 \
            })                                                                              \
        }                                                                                   \
        return j;                                                                           \
    }
APR_DEFINE_GATHER(16, uint16_t)
APR_DEFINE_GATHER(32, uint32_t)
APR_DEFINE_GATHER(64, uint64_t)


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
