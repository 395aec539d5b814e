# Shared declarations for the aprender kernels: fused input types, order keys, threading.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "apr_keys.h" nogil:
    int APR_FMT_F16
    int APR_FMT_BF16
    # bit patterns of the 16-bit formats (defined once, in apr_keys.h)
    uint16_t APR_F16_EXP        # exponent field of IEEE half, also its +inf
    uint16_t APR_BF16_EXP       # exponent field of bfloat16, also its +inf
    uint16_t APR_U16_ABS        # every bit but the sign
    uint16_t APR_U16_SIGN       # the sign bit
    uint64_t apr_key16(uint16_t b, int magnitude)
    uint64_t apr_key32(float x, int magnitude)
    uint64_t apr_key64(double x, int magnitude)
    int apr_nonfinite16(uint16_t b, uint16_t expmask)
    int apr_nonfinite32(float x)
    int apr_nonfinite64(double x)
    float apr_bf16_to_f32(uint16_t h)
    uint16_t apr_f32_to_bf16(float f)
    float apr_f16_to_f32(uint16_t h)
    uint16_t apr_f32_to_f16(float f)
    double apr_u16_to_f64(uint16_t h, int fmt)

# Floating inputs: float32, float64 and 16-bit floats carried as their uint16 bit patterns
# (IEEE half or bfloat16; the format is passed separately where it matters).
ctypedef fused real_t:
    float
    double
    uint16_t

# Order keys held in buffers at their input's own width (uint16 for 16-bit floats, uint32 for
# float32, uint64 for float64): a key buffer costs what the values it came from cost.
ctypedef fused key_t:
    uint16_t
    uint32_t
    uint64_t


cdef inline uint64_t key_of(real_t x, int magnitude) noexcept nogil:
    if real_t is float:
        return apr_key32(x, magnitude)
    elif real_t is double:
        return apr_key64(x, magnitude)
    else:
        return apr_key16(x, magnitude)


cdef inline void inf_keys(real_t* probe, uint16_t inf16, int magnitude,
                          uint64_t* khi, uint64_t* klo) noexcept nogil:
    """Keys at or beyond which a value is not finite: key >= khi or key <= klo.
    inf16 is the +inf bit pattern of the 16-bit format (APR_F16_EXP or APR_BF16_EXP)."""
    cdef real_t pinf, ninf
    if real_t is float:
        pinf = <float>1e300 * <float>1e300
        ninf = -pinf
    elif real_t is double:
        pinf = 1e300 * 1e300
        ninf = -pinf
    else:
        pinf = inf16
        ninf = inf16 | APR_U16_SIGN
    khi[0] = key_of(pinf, magnitude)
    klo[0] = 0 if magnitude else key_of(ninf, 0)
