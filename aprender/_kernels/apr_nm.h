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

#endif
