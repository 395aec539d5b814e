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

/* Per-row selection inside a bracket shared by all rows (apr_rowb): one mark pass over the row
 * (apr_markc of apr_passes.h: AVX2 for 16- and 32-bit keys) writes the provisional mask (1 above
 * the bracket, 0 below, 2 inside), counts the keys below it and collects the keys inside
 * [lo, hi] (native keys) with their positions; when the k-th smallest key lies in the bracket, a
 * select among those few candidates (apr_select_in) gives the threshold and only their mask bytes are
 * rewritten, in index order (the tie rule: equal keys prune the lowest index first, and every
 * key equal to the threshold is a candidate).  Returns 0 (done), 1 (a non-finite value: out is
 * not meaningful) or 2 (the bracket missed the k-th key, or more than cap keys fell inside it:
 * out is not meaningful and the caller runs apr_row).  keys: cap slots; pos: cap slots;
 * n < 2^32. */
#define APR_DEFINE_ROWB(W, UT, ST, SIGN)                                                      \
    static ptrdiff_t apr_rowb##W(const UT *x, ptrdiff_t n, ptrdiff_t k, int magnitude,         \
                                 UT khi_, UT klo_, UT lo_, UT hi_, ptrdiff_t cap, UT *keys,    \
                                 uint32_t *pos, uint8_t *out) {                                \
        UT am = apr_amask##W(magnitude);                                                      \
        int64_t res[4];                                                                       \
        ptrdiff_t below, w, below2 = 0, r, j, seen = 0;                                       \
        ST st;                                                                                \
        UT t;                                                                                 \
        apr_markc##W(x, 0, n, magnitude, lo_, hi_, khi_, klo_, out, res, keys, pos, cap);     \
        if (res[2]) return 1;                                                                 \
        if (res[3] < 0) return 2;                                                             \
        below = (ptrdiff_t)res[0];                                                            \
        w = (ptrdiff_t)res[3];                                                                \
        if (!(below < k && k <= below + w)) return 2;                                         \
        t = apr_select_in##W(keys, w, k - 1 - below, lo_, hi_, &below2);                   \
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
