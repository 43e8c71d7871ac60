/* Moving strided elements of any supported dtype to and from contiguous double buffers.
 * src/dst: n elements, `stride` bytes apart (may be negative), native-endian and aligned.
 * Contiguous rows take a loop the compiler vectorizes; other strides an element-wise loop. */
#include <math.h>
#include <string.h>

#include "fastnorm.h"

/* IEEE binary16 -> binary32, exact. */
float fn_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);            /* Inf, NaN */
    } else if (exp == 0) {
        float f = (float)mant * 0x1p-24f;                   /* zero, subnormal */
        return sign ? -f : f;
    } else {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);  /* rebias 15 -> 127 */
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* binary32 -> binary16, round to nearest even; overflow gives Inf, NaN stays NaN. */
uint16_t fn_float_to_half(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u)                                    /* NaN: keep it quiet */
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u)                                   /* >= 65520: Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) {                                  /* below 2**-14: subnormal */
        float a;
        memcpy(&a, &ax, sizeof a);
        return (uint16_t)(sign | (uint16_t)lrintf(a * 0x1p24f));
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1u);                   /* rebias 127 -> 15, round */
    return (uint16_t)(sign | (ax >> 13));
}

FN_VECTOR_CLONES void fn_load(double *dst, const char *src, int64_t n, ptrdiff_t stride, int dtype)
{
    if (dtype == FN_F32) {
        if (stride == (ptrdiff_t)sizeof(float)) {
            const float *s = (const float *)src;
            for (int64_t i = 0; i < n; i++) dst[i] = s[i];
        } else {
            for (int64_t i = 0; i < n; i++) dst[i] = *(const float *)(src + i * stride);
        }
    } else if (dtype == FN_F64) {
        if (stride == (ptrdiff_t)sizeof(double)) {
            memcpy(dst, src, (size_t)n * sizeof(double));
        } else {
            for (int64_t i = 0; i < n; i++) dst[i] = *(const double *)(src + i * stride);
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            dst[i] = fn_half_to_float(*(const uint16_t *)(src + i * stride));
    }
}

/* float16 is rounded through float32: at most one extra rounding of the last half ulp. */
FN_VECTOR_CLONES void fn_store(char *dst, const double *src, int64_t n, ptrdiff_t stride, int dtype)
{
    if (dtype == FN_F32) {
        if (stride == (ptrdiff_t)sizeof(float)) {
            float *d = (float *)dst;
            for (int64_t i = 0; i < n; i++) d[i] = (float)src[i];
        } else {
            for (int64_t i = 0; i < n; i++) *(float *)(dst + i * stride) = (float)src[i];
        }
    } else if (dtype == FN_F64) {
        if (stride == (ptrdiff_t)sizeof(double)) {
            memmove(dst, src, (size_t)n * sizeof(double));
        } else {
            for (int64_t i = 0; i < n; i++) *(double *)(dst + i * stride) = src[i];
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            *(uint16_t *)(dst + i * stride) = fn_float_to_half((float)src[i]);
    }
}
