// 2:4 compression on the GPU: the same per-group logic as the CPU kernel (apr_sparse24.h, found
// through the include path aprender/_kernels), one thread per chunk of groups.
//
// A chunk is one CUTLASS metadata word (4 groups for 16-bit elements, 8 for int8) for layout 0,
// and one code/bitmask byte (2 groups) for layouts 1 (bitmask) and 2 (raw).  Row statuses are
// first_bad_group * 4 + kind (see sparse24.pyx), kept as an atomic minimum per row, initialised by
// the host to all ones (no error).
#include "apr_sparse24.h"

__device__ __forceinline__ int64_t apr24_span(const uint16_t* x, const uint8_t* keep, int64_t n,
                                              int mode, uint32_t kinf, uint16_t* v, uint8_t* c,
                                              uint8_t* b, int* bad)
{
    return apr24_span_u16(x, keep, n, mode, kinf, v, c, b, bad);
}
__device__ __forceinline__ int64_t apr24_span(const int8_t* x, const uint8_t* keep, int64_t n,
                                              int mode, uint32_t kinf, int8_t* v, uint8_t* c,
                                              uint8_t* b, int* bad)
{
    return apr24_span_i8(x, keep, n, mode, kinf, v, c, b, bad);
}
__device__ __forceinline__ int64_t apr24_span(const uint32_t* x, const uint8_t* keep, int64_t n,
                                              int mode, uint32_t kinf, uint32_t* v, uint8_t* c,
                                              uint8_t* b, int* bad)
{
    return apr24_span_u32(x, keep, n, mode, kinf, v, c, b, bad);
}
__device__ __forceinline__ void apr24_expand(const uint16_t* v, const uint8_t* c, int64_t n,
                                             uint16_t* o)
{
    apr24_expand_u16(v, c, n, o);
}
__device__ __forceinline__ void apr24_expand(const int8_t* v, const uint8_t* c, int64_t n,
                                             int8_t* o)
{
    apr24_expand_i8(v, c, n, o);
}
__device__ __forceinline__ void apr24_expand(const uint32_t* v, const uint8_t* c, int64_t n,
                                             uint32_t* o)
{
    apr24_expand_u32(v, c, n, o);
}

template <typename T>
__device__ void apr24_compress_impl(const T* x, const uint8_t* keep, int64_t rows, int64_t cols,
                                    int mode, uint32_t kinf, int layout, int wide, T* vals,
                                    uint8_t* codes, uint8_t* bits, void* meta,
                                    unsigned long long* status)
{
    int64_t ngroups = cols / 4, nbytes = (ngroups + 1) / 2;
    int64_t gpt = layout == 0 ? (wide ? 8 : 4) : 2;
    int64_t chunks = (ngroups + gpt - 1) / gpt;
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * chunks)
        return;
    int64_t r = t / chunks, j = t % chunks, g0 = j * gpt;
    int64_t n = ngroups - g0 < gpt ? ngroups - g0 : gpt;
    uint8_t local[4];
    uint8_t* cp = layout == 2 ? codes + r * nbytes + g0 / 2 : local;
    uint8_t* bp = layout == 1 ? bits + r * nbytes + g0 / 2 : (uint8_t*)0;
    int bad = 0;
    int64_t first = apr24_span(x + r * cols + 4 * g0, keep ? keep + r * cols + 4 * g0 : keep, n,
                               mode, kinf, vals + r * (cols / 2) + 2 * g0, cp, bp, &bad);
    if (first >= 0)
        atomicMin(status + r, (unsigned long long)((g0 + first) * 4 - bad));
    if (layout == 0) {
        if (wide)
            ((uint32_t*)meta)[apr24_meta_offset(r, j, rows, 1)] = apr24_word(local, 0, 1);
        else
            ((uint16_t*)meta)[apr24_meta_offset(r, j, rows, 0)] = (uint16_t)apr24_word(local, 0, 0);
    }
}

template <typename T>
__device__ void apr24_decompress_impl(const T* vals, const uint8_t* codes, const void* meta,
                                      int64_t rows, int64_t cols, int layout, int wide, T* out,
                                      unsigned long long* status)
{
    int64_t ngroups = cols / 4, nbytes = (ngroups + 1) / 2;
    int64_t gpt = layout == 0 ? (wide ? 8 : 4) : 2;
    int64_t chunks = (ngroups + gpt - 1) / gpt;
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * chunks)
        return;
    int64_t r = t / chunks, j = t % chunks, g0 = j * gpt;
    int64_t n = ngroups - g0 < gpt ? ngroups - g0 : gpt;
    uint8_t local[4];
    const uint8_t* cp = local;
    if (layout == 2) {
        cp = codes + r * nbytes + g0 / 2;
    } else if (layout == 1) {
        int64_t first = apr24_bits_to_codes(codes + r * nbytes + g0 / 2, n, local);
        if (first >= 0)
            atomicMin(status + r, (unsigned long long)((g0 + first) * 4 + 3));
    } else if (wide) {
        apr24_unword(((const uint32_t*)meta)[apr24_meta_offset(r, j, rows, 1)], local, 0, 1);
    } else {
        apr24_unword(((const uint16_t*)meta)[apr24_meta_offset(r, j, rows, 0)], local, 0, 0);
    }
    apr24_expand(vals + r * (cols / 2) + 2 * g0, cp, n, out + r * cols + 4 * g0);
}

#define APR24_KERNELS(S, T)                                                                      \
    extern "C" __global__ void apr24_compress_##S(                                               \
        const T* x, const uint8_t* keep, long long rows, long long cols, int mode,               \
        unsigned int kinf, int layout, int wide, T* vals, uint8_t* codes, uint8_t* bits,         \
        void* meta, unsigned long long* status)                                                  \
    {                                                                                            \
        apr24_compress_impl<T>(x, keep, rows, cols, mode, kinf, layout, wide, vals, codes, bits, \
                               meta, status);                                                    \
    }                                                                                            \
    extern "C" __global__ void apr24_decompress_##S(                                             \
        const T* vals, const uint8_t* codes, const void* meta, long long rows, long long cols,   \
        int layout, int wide, T* out, unsigned long long* status)                                \
    {                                                                                            \
        apr24_decompress_impl<T>(vals, codes, meta, rows, cols, layout, wide, out, status);      \
    }

APR24_KERNELS(u16, uint16_t)
APR24_KERNELS(i8, int8_t)
APR24_KERNELS(u32, uint32_t)
