/* Loading strided elements of any supported dtype into contiguous doubles, and storing them back.
 * src/dst: n elements, `stride` bytes apart (may be negative), native-endian and aligned.
 * Contiguous rows take a loop the compiler vectorizes; other strides an element-wise loop.
 * A dtype this file does not know is FN_EINVAL, never decoded as another one. */
#include <string.h>

#include "elementwise.h"

int fn_dtype_size(int dtype)
{
    switch (dtype) {
    case FN_F16: return 2;
    case FN_F32: return 4;
    case FN_F64: return 8;
    case FN_BF16: return 2;
    default: return 0;
    }
}

/* bfloat16 widens exactly; stores round once, from the double (double_to_bf16). */
FN_INLINE void load_bf16(double *dst, const char *src, int64_t n, ptrdiff_t stride)
{
    if (stride == (ptrdiff_t)sizeof(uint16_t)) {
        const uint16_t *h = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(h[i]);
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(*(const uint16_t *)(src + i * stride));
    }
}

FN_INLINE void store_bf16(char *dst, const double *src, int64_t n, ptrdiff_t stride)
{
    if (stride == (ptrdiff_t)sizeof(uint16_t)) {
        uint16_t *h = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) h[i] = double_to_bf16(src[i]);
    } else {
        for (int64_t i = 0; i < n; i++) *(uint16_t *)(dst + i * stride) = double_to_bf16(src[i]);
    }
}

int fn_load(double *dst, const char *src, int64_t n, ptrdiff_t stride, int dtype)
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
    } else if (dtype == FN_F16) {
        if (stride == (ptrdiff_t)sizeof(uint16_t)) {
            const uint16_t *h = (const uint16_t *)src;
            for (int64_t i = 0; i < n; i++) dst[i] = half_to_float(h[i]);
        } else {
            for (int64_t i = 0; i < n; i++) dst[i] = half_to_float(*(const uint16_t *)(src + i * stride));
        }
    } else if (dtype == FN_BF16) {
        load_bf16(dst, src, n, stride);
    } else {
        return FN_EINVAL;
    }
    return FN_OK;
}

/* float16 is rounded through float32: at most one extra rounding of the last half ulp. */
FN_VECTOR_CLONES int fn_store(char *dst, const double *src, int64_t n, ptrdiff_t stride, int dtype)
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
    } else if (dtype == FN_F16) {
        if (stride == (ptrdiff_t)sizeof(uint16_t)) {
            uint16_t *h = (uint16_t *)dst;
            for (int64_t i = 0; i < n; i++) h[i] = float_to_half((float)src[i]);
        } else {
            for (int64_t i = 0; i < n; i++) *(uint16_t *)(dst + i * stride) = float_to_half((float)src[i]);
        }
    } else if (dtype == FN_BF16) {
        store_bf16(dst, src, n, stride);
    } else {
        return FN_EINVAL;
    }
    return FN_OK;
}

float fn_half_to_float(uint16_t h) { return half_to_float(h); }

uint16_t fn_float_to_half(float f) { return float_to_half(f); }

float fn_bf16_to_float(uint16_t h) { return bf16_to_float(h); }

uint16_t fn_float_to_bf16(float f) { return float_to_bf16(f); }

uint16_t fn_double_to_bf16(double d) { return double_to_bf16(d); }
