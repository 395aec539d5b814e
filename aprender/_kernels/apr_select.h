/* Radix select of the k-th smallest key of a key buffer (the candidates that the range, mark or
 * gather passes of apr_passes.h collected), one function per key width.  Permutes the buffer.
 */
#ifndef APRENDER_SELECT_H
#define APRENDER_SELECT_H

#include "apr_keys.h"

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

/* k-th smallest (0-based rank) of a[0:n] whose keys all lie in [lo, hi], for the few hundred
 * candidates of one row: one histogram of (key - lo) in at most 256 bins (a kilobyte to clear,
 * where the radix select clears four per digit), the rank's bin moved to the front, then the
 * radix select among that bin's keys.  Same result and *below_out as apr_radix_select; only
 * permutes a. */
#define APR_DEFINE_SELECT_IN(W, UT)                                                             \
    static UT apr_select_in##W(UT *a, ptrdiff_t n, ptrdiff_t rank, UT lo, UT hi,              \
                               ptrdiff_t *below_out) {                                      \
        uint32_t cnt[256];                                                                  \
        uint64_t span = (uint64_t)(UT)(hi - lo);                                            \
        ptrdiff_t i, m = 0, acc = 0, nb, b;                                                 \
        int shift = 0;                                                                      \
        UT t;                                                                               \
        while ((span >> shift) >= 256u) shift++;                                            \
        nb = (ptrdiff_t)(span >> shift) + 1;                                                \
        memset(cnt, 0, (size_t)nb * sizeof(uint32_t));                                      \
        for (i = 0; i < n; i++) cnt[(uint64_t)(UT)(a[i] - lo) >> shift]++;                  \
        for (b = 0; b < nb - 1; b++) {                                                      \
            if (acc + (ptrdiff_t)cnt[b] > rank) break;                                      \
            acc += cnt[b];                                                                  \
        }                                                                                   \
        for (i = 0; i < n; i++) { /* the bin's keys to the front, order kept */            \
            UT v = a[i];                                                                    \
            UT tmp = a[m];                                                                  \
            ptrdiff_t hit = (ptrdiff_t)(((uint64_t)(UT)(v - lo) >> shift) == (uint64_t)b);  \
            a[m] = hit ? v : tmp;                                                           \
            a[i] = hit ? tmp : v;                                                           \
            m += hit;                                                                       \
        }                                                                                   \
        t = apr_radix_select##W(a, m, rank - acc, below_out);                               \
        *below_out += acc;                                                                  \
        return t;                                                                           \
    }
APR_DEFINE_SELECT_IN(16, uint16_t)
APR_DEFINE_SELECT_IN(32, uint32_t)
APR_DEFINE_SELECT_IN(64, uint64_t)

/* A bracket [lo, hi] of keys around ranks r_lo <= r_hi (0-based) of a[0:n], read-only: lo is at
 * most the r_lo-th smallest key and hi at least the r_hi-th, and both are edges of histogram bins
 * (at most 65536 bins over [lo, hi], refined while the bracket holds more than 5/4 of the keys
 * between the ranks plus 64, and while refining still narrows it).  hist: 65536 counters of
 * scratch.  Returns the keys inside [lo, hi].  The sample bracket of the threshold search: one
 * histogram pass or two instead of two radix selects and a count. */
#define APR_DEFINE_BRACKET(W, UT)                                                               \
    APR_CLONES static ptrdiff_t apr_bracket##W(const UT *a, ptrdiff_t n, ptrdiff_t r_lo,       \
                                               ptrdiff_t r_hi, UT *lo_out, UT *hi_out,       \
                                               int32_t *hist) {                              \
        UT base = a[0], top = a[0];                                                         \
        ptrdiff_t i, below = 0, inside = n, want = r_hi - r_lo + 1;                         \
        for (i = 1; i < n; i++) {                                                           \
            base = a[i] < base ? a[i] : base;                                               \
            top = a[i] > top ? a[i] : top;                                                  \
        }                                                                                   \
        while (inside > want + want / 4 + 64 && base < top) {                               \
            int shift = 0;                                                                  \
            ptrdiff_t nb, b, b_lo = -1, b_hi = -1, acc = below, acc_lo = 0, in_ = 0;        \
            UT nbase, ntop;                                                                 \
            while ((uint64_t)(top - base) >> shift >= 65536u) shift++;                      \
            nb = (ptrdiff_t)((uint64_t)(top - base) >> shift) + 1;                          \
            memset(hist, 0, (size_t)nb * sizeof(int32_t));                                  \
            for (i = 0; i < n; i++) {                                                       \
                UT k = a[i];                                                                \
                if (k >= base && k <= top) hist[(uint64_t)(k - base) >> shift]++;           \
            }                                                                               \
            for (b = 0; b < nb; b++) {                                                      \
                if (b_lo < 0 && acc + hist[b] > r_lo) { b_lo = b; acc_lo = acc; }           \
                if (b_lo >= 0) in_ += hist[b];                                              \
                acc += hist[b];                                                             \
                if (acc > r_hi) { b_hi = b; break; }                                        \
            }                                                                               \
            if (b_lo < 0 || b_hi < 0) break; /* cannot happen: the ranks are inside */     \
            nbase = (UT)(base + ((UT)b_lo << shift));                                       \
            ntop = (UT)(base + ((UT)b_hi << shift) + (((UT)1 << shift) - 1));               \
            if (ntop > top || ntop < nbase) ntop = top;                                     \
            if (nbase == base && ntop == top) break; /* no narrower: keep what there is */ \
            base = nbase;                                                                   \
            top = ntop;                                                                     \
            below = acc_lo;                                                                 \
            inside = in_;                                                                   \
            if (shift == 0) break; /* bins of single keys: nothing narrower */             \
        }                                                                                   \
        *lo_out = base;                                                                     \
        *hi_out = top;                                                                      \
        return inside;                                                                      \
    }
APR_DEFINE_BRACKET(16, uint16_t)
APR_DEFINE_BRACKET(32, uint32_t)
APR_DEFINE_BRACKET(64, uint64_t)

#endif
