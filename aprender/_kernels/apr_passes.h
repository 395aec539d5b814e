/* Passes over a flat span x[s:e] of raw input bits, one set per key width (16, 32, 64): the
 * building blocks of the threshold search and of mask writing for unstructured selection (whole
 * tensors, global selection over many tensors, streamed checkpoint tensors).  Keys are compared in
 * the signed domain (apr_skey/apr_sdom in apr_keys.h) so that the loops vectorise; the hot ones
 * carry APR_CLONES.
 *
 * range:             count keys < lo, count keys in [lo, hi] and copy them (native keys of the
 *                    input's width, at most cap) to buf (cap + 1 slots), count non-finite keys
 *                    (key >= khi or key <= klo); blocks without candidates take a counting loop.
 * write:             out[i] = key > t; returns the number of keys equal to t.
 * keep_equals_from:  keep the keys equal to t from the first-th on.
 * hist:              histogram of one 16-bit digit of the keys that share a prefix, and the
 *                    non-finite count.
 * mark:              the in-memory variant of range: a mask byte per key (kept, pruned or
 *                    candidate), nothing copied.
 * gather, fix_marks: the candidates a mark pass left, gathered, then decided once t is known.
 */
#ifndef APRENDER_PASSES_H
#define APRENDER_PASSES_H

#include "apr_keys.h"

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

#define APR_DEFINE_PASSES(W, UT, ST, SIGN, AT)                                                  \
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
APR_DEFINE_PASSES(16, uint16_t, int16_t, 0x8000u, int16_t)
APR_DEFINE_PASSES(32, uint32_t, int32_t, 0x80000000u, int32_t)
APR_DEFINE_PASSES(64, uint64_t, int64_t, 0x8000000000000000ull, int64_t)


/* Zero pass: the dense write of a magnitude selection without a mask, over raw words in place.
 * zero_below: words whose magnitude key is below t become 0 (every bit: +0.0); counts them
 * (*below) and the words whose key equals t (returned).  zero_equal: the first count words of
 * [s, e) whose key equals t become 0 (the tie rule: the lowest indices are pruned first). */
#define APR_DEFINE_ZERO(W, UT, ST, SIGN)                                                        \
    APR_CLONES static int64_t apr_zero_below##W(UT *x, ptrdiff_t s, ptrdiff_t e, UT t_,       \
                                                int64_t *below) {                           \
        const UT am = (UT)~(UT)(SIGN);                                                      \
        const ST t = apr_sdom##W(t_);                                                       \
        int64_t eq = 0, lt = 0;                                                             \
        ptrdiff_t i;                                                                        \
        for (i = s; i < e; i++) {                                                           \
            ST k = (ST)(x[i] & am);                                                         \
            x[i] = (UT)(x[i] & (UT)((UT)0 - (UT)(k >= t)));                                 \
            eq += k == t;                                                                   \
            lt += k < t;                                                                    \
        }                                                                                   \
        *below = lt;                                                                        \
        return eq;                                                                          \
    }                                                                                       \
    APR_CLONES static void apr_zero_equal##W(UT *x, ptrdiff_t s, ptrdiff_t e, UT t_,          \
                                             ptrdiff_t count) {                             \
        const UT am = (UT)~(UT)(SIGN);                                                      \
        const ST t = apr_sdom##W(t_);                                                       \
        ptrdiff_t i0, i;                                                                    \
        /* whole blocks whose equal keys are all pruned: counted, then zeroed, branch free */ \
        for (i0 = s; i0 < e && count > 0; i0 += 256) {                                      \
            ptrdiff_t e0 = i0 + 256 < e ? i0 + 256 : e;                                     \
            int32_t q = 0;                                                                  \
            for (i = i0; i < e0; i++) q += (ST)(x[i] & am) == t;                            \
            if (q <= count) {                                                               \
                for (i = i0; i < e0; i++)                                                   \
                    x[i] = (UT)(x[i] & (UT)((UT)0 - (UT)((ST)(x[i] & am) != t)));           \
                count -= q;                                                                 \
            } else {                                                                        \
                for (i = i0; i < e0 && count > 0; i++)                                      \
                    if ((ST)(x[i] & am) == t) {                                             \
                        x[i] = 0;                                                           \
                        count--;                                                            \
                    }                                                                       \
            }                                                                               \
        }                                                                                   \
    }
APR_DEFINE_ZERO(16, uint16_t, int16_t, 0x8000u)
APR_DEFINE_ZERO(32, uint32_t, int32_t, 0x80000000u)
APR_DEFINE_ZERO(64, uint64_t, int64_t, 0x8000000000000000ull)


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
/* mark: the mark pass alone, as markc collecting nothing (one definition of the pass). */
#define APR_DEFINE_MARK(W, UT, ST, SIGN, AT)                                                    \
    static void apr_mark##W(const UT *x, ptrdiff_t s, ptrdiff_t e, int magnitude, UT lo_,     \
                            UT hi_, UT khi_, UT klo_, uint8_t *out, int64_t *res) {           \
        int64_t r4[4];                                                                      \
        apr_markc##W(x, s, e, magnitude, lo_, hi_, khi_, klo_, out, r4, NULL, NULL, 0);      \
        res[0] = r4[0];                                                                     \
        res[1] = r4[1];                                                                     \
        res[2] = r4[2];                                                                     \
    }
/* markc: the mark pass that also collects the candidates' native keys and positions (at most
 * cap; positions absolute, e <= 2^32) while each block's mask bytes are still in L1, so that no
 * second scan of the mask gathers them.  res[3]: how many were collected, -1 when they did not
 * fit (the marks are complete either way). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define APR_MARK_COLLECT_BLOCK(W, UT, SIGN)                                                       \
    for (j = 0; j < len; j++)                                                                   \
        if (ob[j] == 2) {                                                                       \
            keys[c] = (UT)((UT)apr_skey##W(xb[j], am) ^ (UT)(SIGN));                           \
            pos[c++] = (uint32_t)(i0 + j);                                                      \
        }
#else
#define APR_MARK_COLLECT_BLOCK(W, UT, SIGN)                                                     \
    {                                                                                           \
        for (j = 0; j + 8 <= len; j += 8) {                                                     \
            uint64_t w_;                                                                        \
            memcpy(&w_, ob + j, 8);                                                             \
            w_ &= 0x0202020202020202ull;                                                        \
            while (w_) {                                                                        \
                ptrdiff_t jj = j + (apr_ctz64(w_) >> 3);                                        \
                keys[c] = (UT)((UT)apr_skey##W(xb[jj], am) ^ (UT)(SIGN));                      \
                pos[c++] = (uint32_t)(i0 + jj);                                                 \
                w_ &= w_ - 1;                                                                   \
            }                                                                                   \
        }                                                                                       \
        for (; j < len; j++)                                                                    \
            if (ob[j] == 2) {                                                                   \
                keys[c] = (UT)((UT)apr_skey##W(xb[j], am) ^ (UT)(SIGN));                       \
                pos[c++] = (uint32_t)(i0 + j);                                                  \
            }                                                                                   \
    }
#endif
#define APR_DEFINE_MARKC(W, UT, ST, SIGN, AT)                                                   \
    APR_CLONES static void apr_markc_base##W(const UT *x, ptrdiff_t s, ptrdiff_t e, int magnitude, \
                                        UT lo_, UT hi_, UT khi_, UT klo_, uint8_t *out,      \
                                        int64_t *res, UT *keys, uint32_t *pos,               \
                                        ptrdiff_t cap) {                                     \
        UT am = apr_amask##W(magnitude);                                                    \
        ST lo = apr_sdom##W(lo_), hi = apr_sdom##W(hi_);                                    \
        ST khi = apr_sdom##W(khi_), klo = apr_sdom##W(klo_);                                \
        int64_t lt = 0, inside = 0, bad = 0;                                                \
        ptrdiff_t i0, j, c = 0;                                                             \
        int full = 0;                                                                       \
        for (i0 = s; i0 < e; i0 += APR_RANGE_BLOCK) {                                       \
            ptrdiff_t len = e - i0 < APR_RANGE_BLOCK ? e - i0 : APR_RANGE_BLOCK;            \
            const UT *xb = x + i0;                                                          \
            uint8_t *ob = out + i0;                                                         \
            AT l = 0, q = 0, b = 0;                                                         \
            if (magnitude)                                                                  \
                APR_MARK_LOOP(ST, (ST)(xb[j] & am), k >= khi)                               \
            else                                                                            \
                APR_MARK_LOOP(ST, apr_skey##W(xb[j], am), (k >= khi) | (k <= klo))          \
            lt += l;                                                                        \
            inside += q;                                                                    \
            bad += b;                                                                       \
            if (q && !full) {                                                               \
                if (c + q > cap)                                                            \
                    full = 1;                                                               \
                else                                                                        \
                    APR_MARK_COLLECT_BLOCK(W, UT, SIGN)                                     \
            }                                                                               \
        }                                                                                   \
        res[0] = lt;                                                                        \
        res[1] = inside;                                                                    \
        res[2] = bad;                                                                       \
        res[3] = full ? -1 : c;                                                             \
    }
APR_DEFINE_MARKC(16, uint16_t, int16_t, 0x8000u, int16_t)
APR_DEFINE_MARKC(32, uint32_t, int32_t, 0x80000000u, int32_t)
APR_DEFINE_MARKC(64, uint64_t, int64_t, 0x8000000000000000ull, int64_t)

/* markc with AVX2 for 16- and 32-bit keys (picked at load time by apr_mark_init; markc_base is
 * the fallback and does the tail): 32 keys per step.  The three compares (below the bracket,
 * above it, finite) are packed to flat-order bytes, so the mask bytes are one store and the
 * counts are popcounts of byte movemasks; a step with candidates collects them by ctz while its
 * keys are in L1.  Same bytes, counts, candidates (in flat order) and overflow rule as the base:
 * res[3] is -1 exactly when the span holds more candidates than cap. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__) && !defined(APR_NO_CLONES)
#include <immintrin.h>
#define APR_MARK_AVX2 1
static int apr_mark_avx2_ok = 0;

/* flat-order bytes (0x00 / 0xFF) of four 8-lane 32-bit masks, and of two 16-lane 16-bit masks */
__attribute__((target("avx2"))) static inline __m256i apr_bytes_of32(__m256i a, __m256i b,
                                                                   __m256i c, __m256i d) {
    const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    return _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)), fix);
}
__attribute__((target("avx2"))) static inline __m256i apr_bytes_of16(__m256i a, __m256i b) {
    return _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8);
}

/* signed-domain keys of one vector (see apr_skey in apr_keys.h): magnitude clears the sign bit
 * (the key is then the bits themselves); signed order also maps -0 to +0 and flips the
 * magnitude bits of negative values */
#define APR_DEFINE_VKEY(W, SUF, SIGNC, LOWC)                                                    \
    __attribute__((target("avx2"))) static inline __m256i apr_vkey##W(__m256i v, __m256i am, \
                                                                      int magnitude) {        \
        __m256i b = _mm256_and_si256(v, am);                                                    \
        if (magnitude) return b;                                                                \
        b = _mm256_andnot_si256(_mm256_cmpeq_##SUF(b, _mm256_set1_##SUF(SIGNC)), b);           \
        return _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_##SUF(b, W - 1),                \
                                                    _mm256_set1_##SUF(LOWC)));                  \
    }
APR_DEFINE_VKEY(16, epi16, (short)0x8000, 0x7FFF)
APR_DEFINE_VKEY(32, epi32, (int)0x80000000u, 0x7FFFFFFF)

/* Left-pack permutations: apr_mark_perm[m] lists the set bits of m, lowest first (filled once by
 * apr_mark_init). */
static uint32_t apr_mark_perm[256][8];

/* Candidates of eight 32-bit lanes (signed-domain keys kv, lane mask m) appended at keys + c,
 * pos + c without a branch: eight slots are written, popcount(m) kept. */
#define APR_PACK8_32(kv, m, p0)                                                                 \
    {                                                                                           \
        __m256i perm_ = _mm256_loadu_si256((const __m256i *)apr_mark_perm[(m)]);               \
        _mm256_storeu_si256((__m256i *)(keys + c),                                              \
                            _mm256_permutevar8x32_epi32(_mm256_xor_si256((kv), sign32), perm_)); \
        _mm256_storeu_si256((__m256i *)(pos + c),                                               \
                            _mm256_permutevar8x32_epi32(                                        \
                                _mm256_add_epi32(lane8, _mm256_set1_epi32((int)(p0))), perm_)); \
        c += __builtin_popcount((m));                                                           \
    }
/* the same for eight 16-bit lanes (a 128-bit half), widened to 32 bits to permute */
#define APR_PACK8_16(kv, m, p0)                                                                 \
    {                                                                                           \
        __m256i perm_ = _mm256_loadu_si256((const __m256i *)apr_mark_perm[(m)]);               \
        __m256i w_ = _mm256_permutevar8x32_epi32(                                               \
            _mm256_xor_si256(_mm256_cvtepu16_epi32((kv)), sign32), perm_);                      \
        w_ = _mm256_permute4x64_epi64(_mm256_packus_epi32(w_, w_), 0x08);                      \
        _mm_storeu_si128((__m128i *)(keys + c), _mm256_castsi256_si128(w_));                   \
        _mm256_storeu_si256((__m256i *)(pos + c),                                               \
                            _mm256_permutevar8x32_epi32(                                        \
                                _mm256_add_epi32(lane8, _mm256_set1_epi32((int)(p0))), perm_)); \
        c += __builtin_popcount((m));                                                           \
    }

/* One step's bookkeeping, given the flat-order bytes lt (key < lo), gt (key > hi) and ok
 * (finite) of 32 keys at x + i: store the marks, count, collect the candidates (PACK: the
 * branch-free left-pack while 32 slots remain, else one candidate at a time by ctz). */
#define APR_MARK_STEP(W, UT, SIGN, PACK)                                                        \
    {                                                                                           \
        __m256i out_ = _mm256_or_si256(                                                         \
            _mm256_and_si256(gt, one), _mm256_andnot_si256(_mm256_or_si256(lt, gt), two));      \
        _mm256_storeu_si256((__m256i *)(out + i), out_);                                       \
        uint32_t lb = (uint32_t)_mm256_movemask_epi8(lt);                                       \
        uint32_t ib = ~(uint32_t)_mm256_movemask_epi8(_mm256_or_si256(lt, gt));                 \
        lt_n += __builtin_popcount(lb);                                                         \
        bad_n += 32 - __builtin_popcount((uint32_t)_mm256_movemask_epi8(ok));                   \
        if (ib) {                                                                               \
            int q_ = __builtin_popcount(ib);                                                    \
            in_n += q_;                                                                         \
            if (!full) {                                                                        \
                if (c + q_ > cap) {                                                             \
                    full = 1;                                                                   \
                } else if (c + 32 <= cap) {                                                     \
                    PACK                                                                        \
                } else {                                                                        \
                    while (ib) {                                                                \
                        int jj = __builtin_ctz(ib);                                             \
                        keys[c] = (UT)((UT)apr_skey##W(x[i + jj], am_) ^ (UT)(SIGN));          \
                        pos[c++] = (uint32_t)(i + jj);                                          \
                        ib &= ib - 1;                                                           \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

/* the broadcast bracket and finiteness bounds, in the signed domain (magnitude keys are never
 * below klo: it is the smallest signed value) */
#define APR_MARK_CONSTS(W, UT, SET1, CAST, MINV)                                                \
    const UT am_ = apr_amask##W(magnitude);                                                     \
    const __m256i am = SET1((CAST)am_);                                                         \
    const __m256i lo = SET1(apr_sdom##W(lo_)), hi = SET1(apr_sdom##W(hi_));                     \
    const __m256i khi = SET1(apr_sdom##W(khi_));                                                \
    const __m256i klo = SET1(magnitude ? (MINV) : apr_sdom##W(klo_));

/* what both widths' steps share: byte constants, the lane offsets of the left-pack, the counts
 * and the collection's state */
#define APR_MARK_LOCALS                                                                         \
    const __m256i one = _mm256_set1_epi8(1), two = _mm256_set1_epi8(2);                         \
    const __m256i lane8 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);                            \
    int64_t lt_n = 0, in_n = 0, bad_n = 0;                                                      \
    ptrdiff_t i = s, c = 0;                                                                     \
    int full = 0;

/* the rest of a span after the SIMD steps, through the base, folded into res */
#define APR_MARK_TAIL(W)                                                                        \
    {                                                                                           \
        int64_t r4[4];                                                                          \
        apr_markc_base##W(x, i, e, magnitude, lo_, hi_, khi_, klo_, out, r4,                    \
                          full ? NULL : (keys ? keys + c : NULL),                               \
                          full ? NULL : (pos ? pos + c : NULL), full ? 0 : cap - c);            \
        res[0] = lt_n + r4[0];                                                                  \
        res[1] = in_n + r4[1];                                                                  \
        res[2] = bad_n + r4[2];                                                                 \
        res[3] = (full || r4[3] < 0) ? -1 : c + r4[3];                                          \
    }

__attribute__((target("avx2,popcnt"))) static void apr_markc_avx2_32(
        const uint32_t *x, ptrdiff_t s, ptrdiff_t e, int magnitude, uint32_t lo_, uint32_t hi_,
        uint32_t khi_, uint32_t klo_, uint8_t *out, int64_t *res, uint32_t *keys, uint32_t *pos,
        ptrdiff_t cap) {
    APR_MARK_CONSTS(32, uint32_t, _mm256_set1_epi32, int, INT32_MIN)
    const __m256i sign32 = _mm256_set1_epi32((int)0x80000000u);
    APR_MARK_LOCALS
    for (; i + 32 <= e; i += 32) {
        __m256i k0 = apr_vkey32(_mm256_loadu_si256((const __m256i *)(x + i)), am, magnitude);
        __m256i k1 = apr_vkey32(_mm256_loadu_si256((const __m256i *)(x + i + 8)), am, magnitude);
        __m256i k2 = apr_vkey32(_mm256_loadu_si256((const __m256i *)(x + i + 16)), am, magnitude);
        __m256i k3 = apr_vkey32(_mm256_loadu_si256((const __m256i *)(x + i + 24)), am, magnitude);
        __m256i lt = apr_bytes_of32(_mm256_cmpgt_epi32(lo, k0), _mm256_cmpgt_epi32(lo, k1),
                                    _mm256_cmpgt_epi32(lo, k2), _mm256_cmpgt_epi32(lo, k3));
        __m256i gt = apr_bytes_of32(_mm256_cmpgt_epi32(k0, hi), _mm256_cmpgt_epi32(k1, hi),
                                    _mm256_cmpgt_epi32(k2, hi), _mm256_cmpgt_epi32(k3, hi));
#define APR_OK32(k) _mm256_and_si256(_mm256_cmpgt_epi32(khi, k), _mm256_cmpgt_epi32(k, klo))
        __m256i ok = apr_bytes_of32(APR_OK32(k0), APR_OK32(k1), APR_OK32(k2), APR_OK32(k3));
#undef APR_OK32
        APR_MARK_STEP(32, uint32_t, 0x80000000u,
                      APR_PACK8_32(k0, ib & 0xff, i) APR_PACK8_32(k1, (ib >> 8) & 0xff, i + 8)
                      APR_PACK8_32(k2, (ib >> 16) & 0xff, i + 16)
                      APR_PACK8_32(k3, ib >> 24, i + 24))
    }
    APR_MARK_TAIL(32)
}

__attribute__((target("avx2,popcnt"))) static void apr_markc_avx2_16(
        const uint16_t *x, ptrdiff_t s, ptrdiff_t e, int magnitude, uint16_t lo_, uint16_t hi_,
        uint16_t khi_, uint16_t klo_, uint8_t *out, int64_t *res, uint16_t *keys, uint32_t *pos,
        ptrdiff_t cap) {
    APR_MARK_CONSTS(16, uint16_t, _mm256_set1_epi16, short, INT16_MIN)
    const __m256i sign32 = _mm256_set1_epi32(0x8000);
    APR_MARK_LOCALS
    for (; i + 32 <= e; i += 32) {
        __m256i k0 = apr_vkey16(_mm256_loadu_si256((const __m256i *)(x + i)), am, magnitude);
        __m256i k1 = apr_vkey16(_mm256_loadu_si256((const __m256i *)(x + i + 16)), am, magnitude);
        __m256i lt = apr_bytes_of16(_mm256_cmpgt_epi16(lo, k0), _mm256_cmpgt_epi16(lo, k1));
        __m256i gt = apr_bytes_of16(_mm256_cmpgt_epi16(k0, hi), _mm256_cmpgt_epi16(k1, hi));
        __m256i ok = apr_bytes_of16(
            _mm256_and_si256(_mm256_cmpgt_epi16(khi, k0), _mm256_cmpgt_epi16(k0, klo)),
            _mm256_and_si256(_mm256_cmpgt_epi16(khi, k1), _mm256_cmpgt_epi16(k1, klo)));
        APR_MARK_STEP(16, uint16_t, 0x8000u,
                      APR_PACK8_16(_mm256_castsi256_si128(k0), ib & 0xff, i)
                      APR_PACK8_16(_mm256_extracti128_si256(k0, 1), (ib >> 8) & 0xff, i + 8)
                      APR_PACK8_16(_mm256_castsi256_si128(k1), (ib >> 16) & 0xff, i + 16)
                      APR_PACK8_16(_mm256_extracti128_si256(k1, 1), ib >> 24, i + 24))
    }
    APR_MARK_TAIL(16)
}
#endif

static void apr_mark_init(void) {
#ifdef APR_MARK_AVX2
    int m, b, c;
    for (m = 0; m < 256; m++) {
        c = 0;
        for (b = 0; b < 8; b++)
            if (m & (1 << b)) apr_mark_perm[m][c++] = (uint32_t)b;
        for (; c < 8; c++) apr_mark_perm[m][c] = 0;
    }
    __builtin_cpu_init();
    apr_mark_avx2_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#endif
}

/* Switch the AVX2 mark pass off (0), back on where the CPU has it (1), or only ask (-1);
 * returns whether it was on. */
static int apr_mark_simd(int on) {
#ifdef APR_MARK_AVX2
    int prev = apr_mark_avx2_ok;
    if (on >= 0)
        apr_mark_avx2_ok = on ? (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) : 0;
    return prev;
#else
    (void)on;
    return 0;
#endif
}

#ifdef APR_MARK_AVX2
#define APR_MARK_DISPATCH(W) if (apr_mark_avx2_ok) { apr_markc_avx2_##W(x, s, e, magnitude, lo_, hi_, khi_, klo_, out, res, keys, pos, cap); return; }
#else
#define APR_MARK_DISPATCH(W)
#endif
#define APR_DEFINE_MARKC_PICK(W, UT, PICK)                                                      \
    static void apr_markc##W(const UT *x, ptrdiff_t s, ptrdiff_t e, int magnitude, UT lo_,    \
                             UT hi_, UT khi_, UT klo_, uint8_t *out, int64_t *res, UT *keys,  \
                             uint32_t *pos, ptrdiff_t cap) {                                  \
        PICK                                                                                    \
        apr_markc_base##W(x, s, e, magnitude, lo_, hi_, khi_, klo_, out, res, keys, pos, cap); \
    }
APR_DEFINE_MARKC_PICK(16, uint16_t, APR_MARK_DISPATCH(16))
APR_DEFINE_MARKC_PICK(32, uint32_t, APR_MARK_DISPATCH(32))
APR_DEFINE_MARKC_PICK(64, uint64_t, )

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

#endif
