/* Shared helpers of the kernels: numerically careful moments of a contiguous double buffer,
 * and the masks of one outer position. Internal to src/. */
#ifndef FASTNORM_MOMENTS_H
#define FASTNORM_MOMENTS_H

#include <math.h>

#include "fastnorm.h"

/* mean and biased variance of x[0..n), n > 0, by the corrected two-pass algorithm:
 * the second pass sums the deviations too, which removes the rounding error of the first mean.
 * NaN or Inf in x makes both NaN. */
FN_INLINE void finish_moments(double m0, double sd, double sdd, int64_t n, double *mean, double *var)
{
    double v = (sdd - sd * sd / (double)n) / (double)n;
    *mean = m0 + sd / (double)n;
    *var = v < 0.0 ? 0.0 : v;
}

FN_INLINE void moments_of(const double *x, int64_t n, double *mean, double *var)
{
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += x[i];
    double m0 = s / (double)n, sd = 0.0, sdd = 0.0;
#pragma omp simd reduction(+ : sd, sdd)
    for (int64_t i = 0; i < n; i++) {
        double d = x[i] - m0;
        sd += d;
        sdd += d * d;
    }
    finish_moments(m0, sd, sdd, n, mean, var);
}

/* The same, straight from contiguous float32 (widened to double element by element). */
FN_INLINE void moments_of_f32(const float *x, int64_t n, double *mean, double *var)
{
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += (double)x[i];
    double m0 = s / (double)n, sd = 0.0, sdd = 0.0;
#pragma omp simd reduction(+ : sd, sdd)
    for (int64_t i = 0; i < n; i++) {
        double d = (double)x[i] - m0;
        sd += d;
        sdd += d * d;
    }
    finish_moments(m0, sd, sdd, n, mean, var);
}

/* mean of x*x over x[0..n), n > 0 (the RMS-norm statistic). */
FN_INLINE double mean_square_of(const double *x, int64_t n)
{
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return s / (double)n;
}

FN_INLINE double mean_square_of_f32(const float *x, int64_t n)
{
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    return s / (double)n;
}

/* 1 / sqrt(var + eps); 0 when var + eps == 0 (a constant row with eps = 0 then maps to bias). */
FN_INLINE double rstd_of(double var, double eps)
{
    double ve = var + eps;
    return ve == 0.0 ? 0.0 : 1.0 / sqrt(ve);
}

/* m[0..n) = 1 where mask (row `a` of an (A, n) mask) is True; all 1 without a mask.
 * Returns the number of real positions. */
FN_INLINE int64_t load_mask_row(unsigned char *m, fn_mask mask, int64_t a, int64_t n)
{
    int64_t real = 0;
    for (int64_t i = 0; i < n; i++) {
        m[i] = mask.data ? (mask.data[a * mask.stride[0] + i * mask.stride[1]] != 0) : 1;
        real += m[i];
    }
    return real;
}

#endif
