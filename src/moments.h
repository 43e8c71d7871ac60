/* Every statistic of the kernels: shifted sums (in double, or in float runs with a proven error
 * bound and a double fallback), the mean/variance and mean-square of a group, the second pass of a
 * far shift, merges of partial moments (Chan et al.), rstd_of, and the gradient sums of the float32
 * backward. Also the small memory helpers the kernels share (aligned buffers, 4 KiB aliasing,
 * prefetch, mask rows). Internal to src/. */
#ifndef FASTNORM_MOMENTS_H
#define FASTNORM_MOMENTS_H

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "elementwise.h"
#include "fastnorm.h"

/* Sums of d = x - shift and d*d over x[0..n), in double, with MOMENT_LANES independent
 * accumulators (no loop-carried dependency to wait on; also a pairwise-like summation order).
 * The two loaders differ only in the element type. */
enum { MOMENT_LANES = 32 };

/* a[0] + ... + a[n-1] for n a power of two, added pairwise in halves: each step is one vector
 * add, log2(n) steps deep instead of a chain of n dependent adds. Overwrites a. The outer loop
 * is unrolled so that each step has a constant length and is vectorized (GCC otherwise adds the
 * halves one double at a time through memory). */
FN_INLINE double sum_of_lanes(double *a, int n)
{
#pragma GCC unroll 8
    for (int half = n / 2; half >= 1; half /= 2)
        for (int j = 0; j < half; j++) a[j] += a[j + half];
    return a[0];
}

#define DEFINE_SHIFTED_SUMS(NAME, T)                                                          \
    FN_INLINE void NAME(const T *x, int64_t n, double shift, double *sum_d, double *sum_dd)   \
    {                                                                                         \
        FN_LANES double a[MOMENT_LANES] = {0}, b[MOMENT_LANES] = {0};                         \
        double s1 = 0.0, s2 = 0.0;                                                            \
        int64_t i = 0;                                                                        \
        for (; i + MOMENT_LANES <= n; i += MOMENT_LANES)                                      \
            for (int j = 0; j < MOMENT_LANES; j++) {                                          \
                double d = (double)x[i + j] - shift;                                          \
                a[j] += d;                                                                    \
                b[j] += d * d;                                                                \
            }                                                                                 \
        for (; i < n; i++) {                                                                  \
            double d = (double)x[i] - shift;                                                  \
            s1 += d;                                                                          \
            s2 += d * d;                                                                      \
        }                                                                                     \
        *sum_d = s1 + sum_of_lanes(a, MOMENT_LANES);                                          \
        *sum_dd = s2 + sum_of_lanes(b, MOMENT_LANES);                                         \
    }
DEFINE_SHIFTED_SUMS(shifted_sums, double)
DEFINE_SHIFTED_SUMS(shifted_sums_f32, float)
#undef DEFINE_SHIFTED_SUMS

/* The same sums for float data, added in float over short runs: each of the RUN_LANES lanes adds
 * at most `run` values in float before they go into the double sums, so the float rounding of a
 * sum errs by at most (run - 1) float ulps of the sum of magnitudes, and the loop is shorter than
 * one converting every element to double; d and d*d add ~2 ulps each. fn_half_sums (vector.c)
 * is this loop over float16 values, with runs of HALF_RUN: there d and d*d are (nearly) exact. */
enum { RUN_LANES = 32, HALF_RUN = 16, F32_RUN = 8 };

FN_INLINE void shifted_sums_in_runs(const float *x, int64_t n, float shift, int run, double *sum_d, double *sum_dd)
{
    double s1 = 0.0, s2 = 0.0;
    FN_LANES double a2[RUN_LANES] = {0}, b2[RUN_LANES] = {0};
    int64_t i = 0;
    while (i + RUN_LANES <= n) {
        FN_LANES float a[RUN_LANES] = {0}, b[RUN_LANES] = {0};
        int64_t stop = n - i >= RUN_LANES * run ? i + RUN_LANES * run : n - (n - i) % RUN_LANES;
        for (; i < stop; i += RUN_LANES)
            for (int j = 0; j < RUN_LANES; j++) {
                float d = x[i + j] - shift;
                a[j] += d;
                b[j] += d * d;
            }
        for (int j = 0; j < RUN_LANES; j++) a2[j] += a[j], b2[j] += b[j];
    }
    for (; i < n; i++) {
        double d = (double)x[i] - (double)shift;
        s1 += d;
        s2 += d * d;
    }
    *sum_d = s1 + sum_of_lanes(a2, RUN_LANES);
    *sum_dd = s2 + sum_of_lanes(b2, RUN_LANES);
}

/* The column sums of one row v[0..C) shifted by shift[c], added into sd, sdd (batch norm's
 * columns). */
#define DEFINE_ADD_SHIFTED_ROW(NAME, T)                                                          \
    FN_INLINE void NAME(const T *v, int64_t C, const double *shift, double *sd, double *sdd)    \
    {                                                                                            \
        _Pragma("omp simd")                                                                      \
        for (int64_t c = 0; c < C; c++) {                                                        \
            const double d = (double)v[c] - shift[c];                                            \
            sd[c] += d;                                                                          \
            sdd[c] += d * d;                                                                     \
        }                                                                                        \
    }
DEFINE_ADD_SHIFTED_ROW(add_shifted_row, double)
DEFINE_ADD_SHIFTED_ROW(add_shifted_row_f32, float)
#undef DEFINE_ADD_SHIFTED_ROW

/* The same for the four float32 rows at r0, r0 + stride, ...: one update of the sums per four rows. */
FN_INLINE void add_shifted_four_rows_f32(const char *r0, ptrdiff_t stride, int64_t C, const double *shift, double *sd,
                                         double *sdd)
{
    const float *xa = (const float *)r0, *xb = (const float *)(r0 + stride);
    const float *xc = (const float *)(r0 + 2 * stride), *xd = (const float *)(r0 + 3 * stride);
#pragma omp simd
    for (int64_t c = 0; c < C; c++) {
        double da = (double)xa[c] - shift[c], db = (double)xb[c] - shift[c];
        double dc = (double)xc[c] - shift[c], dd = (double)xd[c] - shift[c];
        sd[c] += (da + db) + (dc + dd);
        sdd[c] += (da * da + db * db) + (dc * dc + dd * dd);
    }
}

/* mean and biased variance from the shifted sums of n values. */
FN_INLINE void finish_moments(double shift, double sd, double sdd, int64_t n, double *mean, double *var)
{
    double v = (sdd - sd * sd / (double)n) / (double)n;
    *mean = shift + sd / (double)n;
    *var = v < 0.0 ? 0.0 : v;
}

/* Whether moments from sums shifted by a value within 8 standard deviations of the mean came out:
 * the one-pass sums are then accurate to ~64 ulp of var. False for a far shift, or NaN: the caller
 * sums again, shifted by the mean just found (the corrected two-pass algorithm). */
FN_INLINE int shift_was_near(double sd, int64_t n, double var)
{
    const double offset = sd / (double)n;
    return offset * offset <= 64.0 * var;
}

/* mean and biased variance of x[0..n), n > 0, never by E[x^2] - E[x]^2:
 * one pass of sums shifted by the first element, which is exact for a constant row and accurate
 * to ~64 ulp of var whenever that element lies within 8 standard deviations of the mean; when it
 * does not (an outlier first, or NaN), a second pass shifts by the mean just found (the corrected
 * two-pass algorithm). NaN or Inf in x makes both NaN. */
#define DEFINE_MOMENTS(NAME, T, SUMS, SHIFT_T, VALUE)                                         \
    FN_INLINE void NAME(const T *x, int64_t n, double *mean, double *var)                      \
    {                                                                                         \
        SHIFT_T shift = (SHIFT_T)VALUE(x[0]);                                                 \
        double sd, sdd;                                                                       \
        SUMS(x, n, shift, &sd, &sdd);                                                         \
        finish_moments(shift, sd, sdd, n, mean, var);                                         \
        if (shift_was_near(sd, n, *var)) return;                                              \
        shift = (SHIFT_T)*mean;                                                               \
        SUMS(x, n, shift, &sd, &sdd);                                                         \
        finish_moments(shift, sd, sdd, n, mean, var);                                         \
    }
#define AS_IS(v) (v)
DEFINE_MOMENTS(moments_of, double, shifted_sums, double, AS_IS)
DEFINE_MOMENTS(moments_of_f32_exact, float, shifted_sums_f32, double, AS_IS)
/* float16 values, read in place (fn_half_sums): the shift is a float too, as those sums take it */
DEFINE_MOMENTS(moments_of_halves, uint16_t, fn_half_sums, float, fn_half_to_float)
#undef AS_IS
#undef DEFINE_MOMENTS

/* Merge (nb, mean_b, m2_b) into the running (n, mean, m2) of one channel
 * (Chan et al.'s pairwise formula). */
FN_INLINE void merge_moments(double *n, double *mean, double *m2, double nb, double mean_b, double m2_b)
{
    if (nb == 0.0) return;
    double nt = *n + nb, delta = mean_b - *mean;
    *mean += delta * (nb / nt);
    *m2 += m2_b + delta * delta * (*n * nb / nt);
    *n = nt;
}

/* The second pass of a far shift, for column c of the real rows among o0..o0+nrows of x (O, C, 1),
 * nb of them: mean and biased variance from sums shifted by `center` (the first pass's mean). */
static inline void column_moments_again(double center, fn_view x, fn_mask mask, int64_t o0, int64_t nrows, int64_t c,
                                        int64_t nb, double *mean, double *var)
{
    double s1 = 0.0, s2 = 0.0, v;
    for (int64_t o = o0; o < o0 + nrows; o++) {
        if (mask.data && !mask.data[o * mask.stride[0]]) continue;
        fn_load(&v, x.data + o * x.stride[0] + c * x.stride[1], 1, 0, x.dtype);
        s1 += v - center;
        s2 += (v - center) * (v - center);
    }
    finish_moments(center, s1, s2, nb, mean, var);
}

/* mean of x*x for float16 values. */
FN_INLINE double mean_square_of_halves(const uint16_t *x, int64_t n)
{
    double sd, sdd;
    fn_half_sums(x, n, 0.0f, &sd, &sdd);
    return sdd / (double)n;
}

/* mean of x*x over x[0..n), n > 0 (the RMS-norm statistic), MOMENT_LANES accumulators. */
#define DEFINE_MEAN_SQUARE(NAME, T)                                                           \
    FN_INLINE double NAME(const T *x, int64_t n)                                              \
    {                                                                                         \
        FN_LANES double a[MOMENT_LANES] = {0};                                                \
        double s = 0.0;                                                                       \
        int64_t i = 0;                                                                        \
        for (; i + MOMENT_LANES <= n; i += MOMENT_LANES)                                      \
            for (int j = 0; j < MOMENT_LANES; j++) a[j] += (double)x[i + j] * (double)x[i + j]; \
        for (; i < n; i++) s += (double)x[i] * (double)x[i];                                  \
        return (s + sum_of_lanes(a, MOMENT_LANES)) / (double)n;                               \
    }
DEFINE_MEAN_SQUARE(mean_square_of, double)
DEFINE_MEAN_SQUARE(mean_square_of_f32_exact, float)
#undef DEFINE_MEAN_SQUARE

/* Float32 groups sum in float too, over runs of F32_RUN per lane (then in double), which takes
 * about a third less time than converting every element to double; whenever the error bound below
 * could fail, the group is done again in double (out of line: it is rare).
 *
 * mean square (RMS norm): the squares are all positive, so the float sums err by at most
 * (F32_RUN + 1) float ulps. Done again when not finite (NaN, Inf, overflow) or under 2^-80
 * (squares underflow).
 *
 * mean and variance (groups of F32_RUNS_FROM elements or more): one pass of d = x - shift and
 * d*d, the shift the mean of the group's first MEAN_SAMPLES elements. With k = |shift -
 * mean| / std, the float sums put an error of at most (F32_RUN + 2)(1 + k^2) + 2 (F32_RUN + 1) k
 * sqrt(1 + k^2) float ulps into the variance: ~23 ulps (1.4e-6 relative) for k <= 1/2, the
 * accepted range; typically under one ulp of rstd. Done again in double when k > 1/2 (an unlucky
 * or adversarial sample: ~1e-4 of Gaussian rows; rows with an outlier among the first elements),
 * when not finite, or for a variance under 2^-80 (this keeps constant groups exact). */
enum { MEAN_SAMPLES = 64 };
/* Shorter groups take their moments in double: below this the sampled shift and the run merges
 * cost more than the float sums save. */
enum { F32_RUNS_FROM = 512 };

FN_OUT_OF_LINE FN_VECTOR_CLONES double mean_square_of_f32_in_double(const float *x, int64_t n)
{
    return mean_square_of_f32_exact(x, n);
}

FN_OUT_OF_LINE FN_VECTOR_CLONES void moments_of_f32_in_double(const float *x, int64_t n, double *mean, double *var)
{
    moments_of_f32_exact(x, n, mean, var);
}

FN_INLINE double mean_square_of_f32(const float *x, int64_t n)
{
    double sd, sdd;
    shifted_sums_in_runs(x, n, 0.0f, F32_RUN, &sd, &sdd);
    const double ms = sdd / (double)n;
    return ms >= 0x1p-80 && ms < HUGE_VAL ? ms : mean_square_of_f32_in_double(x, n);
}

/* The mean of x[0..MEAN_SAMPLES), n >= MEAN_SAMPLES, in float (an estimate is all it needs to be).
 * The first elements, not a sample spread over the group: the pass that follows reads them first
 * anyway, while loads spread over a group in memory would stall each group for a memory latency. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FN_HAS_SHUFFLEVECTOR 1
#endif
#endif

FN_INLINE float first_mean_f32(const float *x)
{
#ifdef FN_HAS_SHUFFLEVECTOR
    /* GCC's vector types (GCC 12, clang): the halves are added in registers; as plain arrays GCC
     * stores each level to the stack and loads it back */
    typedef float f32x16 __attribute__((vector_size(64)));
    typedef float f32x8 __attribute__((vector_size(32)));
    typedef float f32x4 __attribute__((vector_size(16)));
    typedef float f32x2 __attribute__((vector_size(8)));
    f32x16 a = {0}, v;
    for (int j = 0; j < MEAN_SAMPLES; j += 16) {
        memcpy(&v, x + j, sizeof v);
        a += v;
    }
    /* pairwise, as below: element q plus element q + half */
    const f32x8 e = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    const f32x4 q = __builtin_shufflevector(e, e, 0, 1, 2, 3) + __builtin_shufflevector(e, e, 4, 5, 6, 7);
    const f32x2 h = __builtin_shufflevector(q, q, 0, 1) + __builtin_shufflevector(q, q, 2, 3);
    return (h[0] + h[1]) * (1.0f / MEAN_SAMPLES);
#else
    float a[16] = {0};
    for (int j = 0; j < MEAN_SAMPLES; j += 16)
        for (int q = 0; q < 16; q++) a[q] += x[j + q];
    for (int half = 8; half >= 1; half /= 2)         /* pairwise, as sum_of_lanes */
        for (int q = 0; q < half; q++) a[q] += a[q + half];
    return a[0] * (1.0f / MEAN_SAMPLES);
#endif
}

FN_INLINE void moments_of_f32(const float *x, int64_t n, double *mean, double *var)
{
    if (n < F32_RUNS_FROM) {
        moments_of_f32_exact(x, n, mean, var);
        return;
    }
    const float shift = first_mean_f32(x);
    double sd, sdd;
    shifted_sums_in_runs(x, n, shift, F32_RUN, &sd, &sdd);
    finish_moments(shift, sd, sdd, n, mean, var);
    const double offset = sd / (double)n;
    if (!(*var >= 0x1p-80 && *var < HUGE_VAL && 4.0 * offset * offset <= *var))
        moments_of_f32_in_double(x, n, mean, var);
}

/* malloc for the kernels' vector buffers, 64-byte aligned so that no 512-bit load or store splits
 * a cache line; free() releases it. */
FN_INLINE void *alloc_lines(size_t bytes)
{
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

/* Elements of `item` bytes from y to its first 64-byte boundary, at most n. */
FN_INLINE int64_t head_elements(const void *y, int64_t n, size_t item)
{
    const int64_t h = (int64_t)(((64 - ((uintptr_t)y & 63)) & 63) / item);
    return h < n ? h : n;
}

/* 4 KiB aliasing: a load waits for the older stores still in flight whose addresses have the same
 * low 12 bits as its own. A loop that walks y forward with x a little behind it modulo 4 KiB
 * (y - x in (0, ALIAS_WINDOW] bytes) makes, at every step, loads that match the stores just made,
 * and runs several times slower; walked backward the same loop is safe. Backward costs more than
 * an unhindered forward walk, so only x decides (weight and bias stay in L1, where a matching
 * store costs little). Elementwise loops only: the order does not change a bit. */
enum { ALIAS_WINDOW = 512 };

FN_INLINE int walk_backward(const void *y, const void *x)
{
    const uintptr_t d = ((uintptr_t)y - (uintptr_t)x) & 4095;
    return d > 0 && d <= ALIAS_WINDOW;
}

/* Ask for the `bytes` at p to be brought into the cache (a hint, never a fault): the kernels that
 * walk short rows (batch norm's columns) prefetch the row PREFETCH_ROWS ahead, as the hardware
 * prefetcher does not look that far across rows of a few hundred bytes. */
enum { PREFETCH_ROWS = 16 };

FN_INLINE void prefetch_bytes(const void *p, int64_t bytes)
{
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b);
}

/* Whether a float group's output may be computed in float arithmetic, as the float32/float16
 * paths do: (x - mu) * (r * w) + b with r * w rounded to float. It may when r <= 2^100 and
 * r * max|w| lies in [2^-100, 2^100] (the float coefficient neither overflows nor loses its
 * precision) and r >= sqrt(n) * 2^-125 (then |x - mu| <= sqrt(n * var) <= sqrt(n) / r < 2^125:
 * x - mu cannot overflow), or when r = 0 or w = 0 (y = b). Otherwise (extreme scales, or NaN)
 * the group is computed in double, so the result is finite whenever the double one is finite
 * and fits the output's dtype. w_max: max |w|. */
FN_INLINE int float_arithmetic_fits(double r, double w_max, int64_t n)
{
    const double rw = r * w_max;
    return r == 0.0 || (r <= 0x1p100 && r * r * 0x1p250 >= (double)n &&
                        (w_max == 0.0 || (rw <= 0x1p100 && rw >= 0x1p-100)));
}

/* 1 / sqrt(var + eps); 0 when var + eps == 0 (a constant row with eps = 0 then maps to bias). */
FN_INLINE double rstd_of(double var, double eps)
{
    double ve = var + eps;
    return ve == 0.0 ? 0.0 : 1.0 / sqrt(ve);
}

/* mu and r = rstd of the n values at x by `stat` (mu = 0 for the mean square), one per element
 * type: float32 with float runs, float16 read in place, double. */
FN_INLINE void group_stats_f32(const float *x, int64_t n, enum fn_stat stat, double eps, double *mu, double *r)
{
    double var;
    *mu = 0.0;
    if (stat == FN_MEAN_SQUARE) var = mean_square_of_f32(x, n);
    else moments_of_f32(x, n, mu, &var);
    *r = rstd_of(var, eps);
}

FN_INLINE void group_stats_f16(const uint16_t *x, int64_t n, enum fn_stat stat, double eps, double *mu, double *r)
{
    double var;
    *mu = 0.0;
    if (stat == FN_MEAN_SQUARE) var = mean_square_of_halves(x, n);
    else moments_of_halves(x, n, mu, &var);
    *r = rstd_of(var, eps);
}

/* mean and biased variance of n bfloat16 values read in place, as moments_of_f32 takes float32
 * rows' (the same shift, the mean of the first MEAN_SAMPLES values, and the same acceptance, k <=
 * 1/2), but in runs of HALF_RUN (fn_bf16_sums): with k <= 1/2 the float sums put at most ~40 float
 * ulps into the variance (the bound of moments_of_f32's comment with 16 for F32_RUN). 0 when
 * accepted; 1 (short rows, k > 1/2, a variance under 2^-80 or not finite) when the caller must
 * widen the values for group_stats_f32. */
FN_INLINE int moments_of_bf16s(const uint16_t *x, int64_t n, double *mean, double *var)
{
    if (n < F32_RUNS_FROM) return 1;
    FN_LANES float head[MEAN_SAMPLES];
    for (int j = 0; j < MEAN_SAMPLES; j++) head[j] = bf16_to_float(x[j]);
    const float shift = first_mean_f32(head);
    double sd, sdd;
    fn_bf16_sums(x, n, shift, &sd, &sdd);
    finish_moments(shift, sd, sdd, n, mean, var);
    const double offset = sd / (double)n;
    return !(*var >= 0x1p-80 && *var < HUGE_VAL && 4.0 * offset * offset <= *var);
}

/* group_stats_f32 for bfloat16 values read in place (moments_of_bf16s, or the mean square of
 * fn_bf16_sums, whose positive terms err by at most HALF_RUN + 1 float ulps): 0 when done; 1, with
 * nothing written, where those float sums are not accepted (see moments_of_bf16s; a mean square
 * under 2^-80 or from 2^100 up: bfloat16 spans float32's range, so squares may underflow or
 * overflow a float) -- the caller then widens the group to float32 for group_stats_f32. */
FN_INLINE int group_stats_bf16(const uint16_t *x, int64_t n, enum fn_stat stat, double eps, double *mu, double *r)
{
    double m = 0.0, var, sd, sdd;
    if (stat == FN_MEAN_SQUARE) {
        fn_bf16_sums(x, n, 0.0f, &sd, &sdd);
        var = sdd / (double)n;
        if (!(var >= 0x1p-80 && var < 0x1p100)) return 1;
    } else if (moments_of_bf16s(x, n, &m, &var)) {
        return 1;
    }
    *mu = m;
    *r = rstd_of(var, eps);
    return 0;
}

FN_INLINE void group_stats_f64(const double *x, int64_t n, enum fn_stat stat, double eps, double *mu, double *r)
{
    double var;
    *mu = 0.0;
    if (stat == FN_MEAN_SQUARE) var = mean_square_of(x, n);
    else moments_of(x, n, mu, &var);
    *r = rstd_of(var, eps);
}

/* sum of dy and of dy * xhat over contiguous float32 x, dy (n), xhat = fn_xhat_at(c, x): in float
 * over runs of F32_RUN per lane, then in double (the float32 backward of long planes). */
FN_INLINE void grad_sums_in_runs(const float *restrict x, const float *restrict dy, int64_t n, fn_affine c,
                                 double *sum_dy, double *sum_dy_xhat)
{
    double s1 = 0.0, s2 = 0.0;
    FN_LANES double a2[RUN_LANES] = {0}, b2[RUN_LANES] = {0};
    int64_t i = 0;
    while (i + RUN_LANES <= n) {
        FN_LANES float a[RUN_LANES] = {0}, b[RUN_LANES] = {0};
        const int64_t stop = n - i >= RUN_LANES * F32_RUN ? i + RUN_LANES * F32_RUN : n - (n - i) % RUN_LANES;
        for (; i < stop; i += RUN_LANES)
            for (int j = 0; j < RUN_LANES; j++) {
                const float d = dy[i + j], h = fn_xhat_at(c, x[i + j]);
                a[j] += d;
                b[j] += d * h;
            }
        for (int j = 0; j < RUN_LANES; j++) a2[j] += a[j], b2[j] += b[j];
    }
    for (; i < n; i++) {
        const float h = fn_xhat_at(c, x[i]);
        s1 += dy[i];
        s2 += (double)dy[i] * h;
    }
    *sum_dy = s1 + sum_of_lanes(a2, RUN_LANES);
    *sum_dy_xhat = s2 + sum_of_lanes(b2, RUN_LANES);
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
