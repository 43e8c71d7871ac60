/* Every elementwise formula of the kernels, written once: a small inline scalar function over a
 * named coefficient struct. The loops of group_norm.c and batch_norm.c call these (GCC vectorizes
 * them inside `omp simd` loops); the intrinsic writers of vector.c compute the same operations in
 * the same order, and tests/c checks each of them against these functions bit for bit.
 * Also the exact float16 and bfloat16 <-> float32 conversions, which the formulas on those data use.
 * Internal to src/. */
#ifndef FASTNORM_ELEMENTWISE_H
#define FASTNORM_ELEMENTWISE_H

#include <math.h>
#include <string.h>

#include "fastnorm.h"

/* ---- float32 arithmetic with a split mean ------------------------------------------------------
 * mu is carried as mu_hi + mu_lo (both float, mu_hi = (float)mu): x - mu_hi is exact or errs
 * relative to |x - mu|, never to |mu|, so every step errs by ~1 ulp of the output's scale, also
 * for data with a large mean offset. The caller checks that the float coefficients cannot
 * overflow (float_arithmetic_fits, channel_fits_float) and computes in double otherwise. */

/* a normalized row: y = ((x - mu_hi) - mu_lo) * (rstd * w) + b, rstd * w rounded to float */
struct fn_affine {
    float mu_hi, mu_lo, rstd;
};

/* one channel's line: y = ((x - mu_hi) - mu_lo) * scale + shift, scale rounded from double once
 * (planes of instance/group norm, batch norm); scale_dy adds dy * scale_dy (batch-norm backward) */
struct fn_scale_shift {
    float mu_hi, mu_lo, scale, shift, scale_dy;
};

/* a float32 gradient row: dx = dy * (rstd * w) + c0 - ((x - mu_hi) - mu_lo) * c1 */
struct fn_dx {
    float rstd, c0, mu_hi, mu_lo, c1;
};

/* per-channel fn_scale_shift coefficients as arrays (for vector loads along the channels) */
struct fn_channel_coefs {
    float *mu_hi, *mu_lo, *scale, *shift, *scale_dy;
};

FN_INLINE fn_scale_shift fn_channel_at(const fn_channel_coefs *f, int64_t c)
{
    return (fn_scale_shift){f->mu_hi[c], f->mu_lo[c], f->scale[c], f->shift[c], f->scale_dy[c]};
}

FN_INLINE float fn_mu_hi(double mu) { return (float)mu; }
FN_INLINE float fn_mu_lo(double mu) { return (float)(mu - (double)(float)mu); }

FN_INLINE fn_affine fn_affine_of(double mu, double rstd)
{
    return (fn_affine){fn_mu_hi(mu), fn_mu_lo(mu), (float)rstd};
}

FN_INLINE fn_scale_shift fn_scale_shift_of(double center, double scale, double shift, double scale_dy)
{
    return (fn_scale_shift){fn_mu_hi(center), fn_mu_lo(center), (float)scale, (float)shift, (float)scale_dy};
}

FN_INLINE fn_dx fn_dx_of(double mu, double rstd, double c0, double c1)
{
    return (fn_dx){(float)rstd, (float)c0, fn_mu_hi(mu), fn_mu_lo(mu), (float)c1};
}

FN_INLINE float fn_centered(float x, float mu_hi, float mu_lo) { return (x - mu_hi) - mu_lo; }

FN_INLINE float fn_affine_at(fn_affine c, float x, float w, float b)
{
    return fn_centered(x, c.mu_hi, c.mu_lo) * (c.rstd * w) + b;
}

FN_INLINE float fn_scale_shift_at(fn_scale_shift c, float x)
{
    return fn_centered(x, c.mu_hi, c.mu_lo) * c.scale + c.shift;
}

FN_INLINE float fn_scale_shift_dy_at(fn_scale_shift c, float x, float dy)
{
    return fn_centered(x, c.mu_hi, c.mu_lo) * c.scale + dy * c.scale_dy + c.shift;
}

FN_INLINE float fn_dx_at(fn_dx c, float dy, float x, float w)
{
    return dy * (c.rstd * w) + c.c0 - fn_centered(x, c.mu_hi, c.mu_lo) * c.c1;
}

/* xhat of the float32 backward sums: ((x - mu_hi) - mu_lo) * rstd */
FN_INLINE float fn_xhat_at(fn_affine c, float x) { return fn_centered(x, c.mu_hi, c.mu_lo) * c.rstd; }

/* ---- double arithmetic (float64 data, buffered groups, and the float paths' fallbacks) ---------- */

/* y = (x - mu) * (rstd * w) + b */
FN_INLINE double fn_affine_f64_at(double mu, double rstd, double x, double w, double b)
{
    return (x - mu) * (rstd * w) + b;
}

/* y = coef_x * (x - center) + shift (+ coef_dy * dy: batch-norm backward) */
FN_INLINE double fn_combine_f64_at(double center, double coef_x, double shift, double x)
{
    return coef_x * (x - center) + shift;
}

FN_INLINE double fn_combine_dy_f64_at(double center, double coef_x, double coef_dy, double shift, double x,
                                      double dy)
{
    return coef_x * (x - center) + coef_dy * dy + shift;
}

/* Batch norm's training dx, dx = wr * (dy - sum_dy/n - xhat * sum_dy_xhat/n) with wr = weight * rstd,
 * as a channel_combine of dy and x: coef_dy = wr and these two (sum_dy_xc: the sum of
 * dy * (x - mean), n the real values per channel). */
FN_INLINE void fn_batch_dx_coefs(double wr, double rstd, double sum_dy, double sum_dy_xc, double n, double *coef_x,
                                 double *shift)
{
    *coef_x = -wr * rstd * rstd * sum_dy_xc / n;
    *shift = -wr * sum_dy / n;
}

/* the float paths' fallback of a line: y = (x - center) * scale + shift, in double */
FN_INLINE double fn_scale_shift_f64_at(double center, double scale, double shift, double x)
{
    return (x - center) * scale + shift;
}

/* dx = dy * (rstd * w) + c0 - (x - mu) * c1, in double (the float32 gradient's fallback) */
FN_INLINE double fn_dx_f64_at(double mu, double rstd, double c0, double c1, double dy, double x, double w)
{
    return dy * (rstd * w) + c0 - (x - mu) * c1;
}

/* dx = rstd * (dy * w - mean_g - (x - mu) * rstd * mean_g_xhat): the buffered groups' gradient */
FN_INLINE double fn_dx_buffered_at(double mu, double rstd, double mean_g, double mean_g_xhat, double dy, double x,
                                   double w)
{
    return rstd * (dy * w - mean_g - (x - mu) * rstd * mean_g_xhat);
}

/* ---- float16 <-> float32, exact one way, round to nearest even the other ---------------------- */

FN_INLINE uint32_t fn_bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

FN_INLINE float fn_float_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* IEEE binary16 -> binary32, exact. Branch-free (selects only), so loops of it vectorize:
 * rebias the exponent; Inf/NaN get the rest of the rebias; subnormals are renormalized by
 * subtracting 2**-14 in float arithmetic. */
FN_INLINE float half_to_float(uint16_t h)
{
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13, exp = o & 0x0f800000u;
    o += (uint32_t)(127 - 15) << 23;
    uint32_t inf_nan = o + ((uint32_t)(128 - 16) << 23);
    uint32_t sub = fn_bits_of(fn_float_of(o + (1u << 23)) - 0x1p-14f);
    uint32_t special = 0u - (uint32_t)(exp == 0x0f800000u), subnormal = 0u - (uint32_t)(exp == 0);
    o = (inf_nan & special) | (sub & subnormal) | (o & ~(special | subnormal));   /* masks, not branches */
    return fn_float_of(o | (uint32_t)(h & 0x8000u) << 16);
}

/* binary32 -> binary16, round to nearest even; overflow gives Inf, NaN stays (quiet) NaN.
 * Branch-free: subnormal results come from adding a magic number in float arithmetic (whose
 * rounding is the round to nearest even we want), normal ones from integer rounding. */
FN_INLINE uint16_t float_to_half(float f)
{
    const uint32_t denorm_magic = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
    uint32_t x = fn_bits_of(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    uint32_t big = 0x7c00u | (0x0200u & (0u - (uint32_t)(ax > 0x7f800000u)));  /* Inf, or NaN */
    uint32_t sub = fn_bits_of(fn_float_of(ax) + fn_float_of(denorm_magic)) - denorm_magic;
    uint32_t nrm = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;              /* rebias, round */
    uint32_t huge = 0u - (uint32_t)(ax >= 0x47800000u), tiny = 0u - (uint32_t)(ax < 0x38800000u);
    uint32_t o = (big & huge) | (sub & tiny) | (nrm & ~(huge | tiny));      /* >= 2**16, < 2**-14 */
    return (uint16_t)(o | sign);
}

/* ---- bfloat16 <-> float32: the upper 16 bits of a float ----------------------------------------- */

/* bfloat16 -> binary32, exact: a shift. */
FN_INLINE float bf16_to_float(uint16_t h) { return fn_float_of((uint32_t)h << 16); }

/* binary32 -> bfloat16, round to nearest even; overflow gives Inf, NaN stays NaN (made quiet, sign
 * and upper payload kept). Selects only, so loops of it vectorize. */
FN_INLINE uint16_t float_to_bf16(float f)
{
    const uint32_t u = fn_bits_of(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = 0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u);
    return (uint16_t)((((u >> 16) | 0x0040u) & nan) | (rounded & ~nan));
}

/* binary64 -> bfloat16, correctly rounded (nearest even): rounded to float32 by round-to-odd (24
 * bits, at least 2 more than bfloat16's 8), then to bfloat16 -- which rounds as one rounding would.
 * Round-to-odd from the nearest float f: an inexact f with an even last bit moves one ulp toward d. */
FN_INLINE uint16_t double_to_bf16(double d)
{
    const float f = (float)d;
    uint32_t u = fn_bits_of(f);
    const int inexact = (double)f != d && d == d;
    if (inexact && !(u & 1u)) u = fabs((double)f) > fabs(d) ? u - 1u : u + 1u;
    return float_to_bf16(fn_float_of(u));
}

#endif
