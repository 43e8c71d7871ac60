/* Layer, RMS, instance and group norm: one statistic per (a, g) of the (A, G, K, S) view.
 *
 *   layer/RMS norm   (rows, 1, D, 1)          statistics along each row
 *   instance norm    (N, C, 1, H*W)           statistics per (sample, channel)
 *   group norm       (N, G, C/G, H*W)         statistics per (sample, group)
 *
 * weight/bias index the channel g*K + k; the mask marks real (a, s) positions.
 * Each group is loaded into a contiguous double buffer (K*S), so the statistics and the output
 * are computed from one read of x, whatever its dtype and strides. */
#include <stdlib.h>

#include "moments.h"

/* buf[k*S + s] = v[a, g, k, s] */
FN_INLINE void load_group(double *buf, fn_view v, int64_t a, int64_t g, int64_t K, int64_t S)
{
    const char *p = v.data + a * v.stride[0] + g * v.stride[1];
    if (S == 1) {
        fn_load(buf, p, K, v.stride[2], v.dtype);
    } else {
        for (int64_t k = 0; k < K; k++) fn_load(buf + k * S, p + k * v.stride[2], S, v.stride[3], v.dtype);
    }
}

/* v[a, g, k, s] = buf[k*S + s] */
FN_INLINE void store_group(fn_view v, const double *buf, int64_t a, int64_t g, int64_t K, int64_t S)
{
    char *p = v.data + a * v.stride[0] + g * v.stride[1];
    if (S == 1) {
        fn_store(p, buf, K, v.stride[2], v.dtype);
    } else {
        for (int64_t k = 0; k < K; k++) fn_store(p + k * v.stride[2], buf + k * S, S, v.stride[3], v.dtype);
    }
}

/* real[0..n) = the elements of buf (K, S) at real positions s; returns n. */
FN_INLINE int64_t gather_real(double *real, const double *buf, const unsigned char *m, int64_t K, int64_t S)
{
    int64_t n = 0;
    for (int64_t k = 0; k < K; k++)
        for (int64_t s = 0; s < S; s++)
            if (m[s]) real[n++] = buf[k * S + s];
    return n;
}

/* A group (K, S) whose elements are contiguous in memory (k-major), for the float32 fast path. */
FN_INLINE int group_contiguous(fn_view v, int64_t K, int64_t S, ptrdiff_t item)
{
    return (S == 1 || v.stride[3] == item) && (K == 1 || v.stride[2] == S * item);
}

/* y = (x - mu) * r * w[k] + b[k] for a contiguous float32 group (K, S); y may be x.
 * Computed in float: mu is split into mu_hi + mu_lo (both float), so x - mu_hi is exact or has
 * a rounding error relative to |x - mu|, never to |mu|; every step then errs by ~1 ulp of the
 * output's scale, also for rows with a large mean offset. wf, bf: (K) float copies of w, b. */
FN_INLINE void affine_group_f32(float *y, const float *x, int64_t K, int64_t S, double mu, double r,
                                const float *wf, const float *bf)
{
    const float mu_hi = (float)mu, mu_lo = (float)(mu - (double)mu_hi), rf = (float)r;
    if (S == 1) {
        /* a row: the elements before y's first 64-byte line, then the rest, so that no vector
         * store splits a line (measured on (8, 768) rows 16 bytes into a line: the loop 1.04 ->
         * 0.78 us) */
        const int64_t h = head_elements(y, K, sizeof *y);
#define AFFINE_ROW(k) (((x[k] - mu_hi) - mu_lo) * (rf * wf[k]) + bf[k])
        if (walk_backward(y, x)) {
            /* from the end: the tail after the last whole 16 elements, the 16s backward, the head */
            const int64_t t = h + (K - h) / 16 * 16;
#pragma omp simd
            for (int64_t k = t; k < K; k++) y[k] = AFFINE_ROW(k);
            for (int64_t k0 = t - 16; k0 >= h; k0 -= 16) {
                /* 16 from k0, counted from 0 to a constant: one vector, no checks (with k from k0
                 * to k0 + 16, -fwrapv kept GCC from knowing the count, and the loop ran 1.3x
                 * slower than forward) */
#pragma omp simd
                for (int j = 0; j < 16; j++) y[k0 + j] = AFFINE_ROW(k0 + j);
            }
#pragma omp simd
            for (int64_t k = 0; k < h; k++) y[k] = AFFINE_ROW(k);
            return;
        }
#pragma omp simd
        for (int64_t k = 0; k < h; k++) y[k] = AFFINE_ROW(k);
#pragma omp simd
        for (int64_t k = h; k < K; k++) y[k] = AFFINE_ROW(k);
#undef AFFINE_ROW
        return;
    }
    for (int64_t k = 0; k < K; k++) {
        const float scale = (float)(r * (double)wf[k]), shift = bf[k];
#pragma omp simd
        for (int64_t s = 0; s < S; s++) y[k * S + s] = ((x[k * S + s] - mu_hi) - mu_lo) * scale + shift;
    }
}

/* y = (x - mu) * (r * w[k]) + b[k] of a contiguous float32 or float16 group (K, S) in double
 * arithmetic, element by element: the groups whose float arithmetic could overflow
 * (float_arithmetic_fits in moments.h). y may be x. */
FN_OUT_OF_LINE void affine_group_in_double(void *y, const void *x, int dtype, int64_t K, int64_t S, double mu,
                                           double r, const float *wf, const float *bf)
{
    const ptrdiff_t item = dtype == FN_F16 ? 2 : 4;
    for (int64_t i = 0; i < K * S; i++) {
        double v;
        fn_load(&v, (const char *)x + i * item, 1, item, dtype);
        v = (v - mu) * (r * (double)wf[i / S]) + (double)bf[i / S];
        fn_store((char *)y + i * item, &v, 1, item, dtype);
    }
}

/* The largest |w[k]|, k < n: the float paths' bound for r * w (float_arithmetic_fits). Partial
 * maxima of 32 lanes are independent, so the scan is not one chain of dependent max operations. */
FN_INLINE double max_abs_f32(const float *w, int64_t n)
{
    float part[32] = {0.0f}, m = 0.0f;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32)
        for (int j = 0; j < 32; j++) part[j] = fabsf(w[k + j]) > part[j] ? fabsf(w[k + j]) : part[j];
    for (; k < n; k++) m = fabsf(w[k]) > m ? fabsf(w[k]) : m;
    for (int half = 16; half > 0; half /= 2)                 /* halving: each step one vector max */
        for (int j = 0; j < half; j++) part[j] = part[j + half] > part[j] ? part[j + half] : part[j];
    return (double)(part[0] > m ? part[0] : m);
}

/* affine_group_f32 of a row, as a function of its own: inlined into the loop of rows_f32_slice,
 * GCC ran out of registers and reloaded the weight pointer and the loop bound from the stack on
 * every vector. */
FN_OUT_OF_LINE FN_VECTOR_CLONES void affine_row_f32(float *y, const float *x, int64_t D, double mu, double r,
                                                    const float *wf, const float *bf)
{
    affine_group_f32(y, x, D, 1, mu, r, wf, bf);
}

/* mu and r = rstd of the n contiguous float32 values at x (mu = 0 for RMS norm). */
FN_INLINE void group_stats_f32(const float *x, int64_t n, int rms, double eps, double *mu, double *r)
{
    double var;
    *mu = 0.0;
    if (rms) var = mean_square_of_f32(x, n);
    else moments_of_f32(x, n, mu, &var);
    *r = rstd_of(var, eps);
}

/* Statistics of a contiguous float32 group (K, S), then y = affine_group_f32(x); y may be x.
 * mu, r: written (mu = 0 for RMS norm). stream: a row (S = 1) is written with non-temporal
 * stores (convert.c: the same arithmetic, the same bits), prefetching `next` (next_row), the
 * line it shares with the row before through `carry` (the slice's). w_max: max |wf|. */
FN_INLINE void normalize_group_f32(float *y, const float *x, int64_t K, int64_t S, int rms, double eps,
                                   const float *wf, const float *bf, double w_max, double *mu, double *r,
                                   int stream, const float *next, fn_line_carry *carry)
{
    group_stats_f32(x, K * S, rms, eps, mu, r);
    if (!float_arithmetic_fits(*r, w_max, K * S)) {
        affine_group_in_double(y, x, FN_F32, K, S, *mu, *r, wf, bf);
    } else if (S == 1 && stream) {
        const float mu_hi = (float)*mu, c[3] = {mu_hi, (float)(*mu - (double)mu_hi), (float)*r};
        fn_affine_row_streamed(y, x, K, c, wf, bf, next, carry);
    } else {
        affine_group_f32(y, x, K, S, *mu, *r, wf, bf);
    }
}

/* The same in double, for a contiguous float64 group or the double buffer of any group; y may be x. */
FN_INLINE void affine_group(double *y, const double *x, int64_t K, int64_t S, double mu, double r, const double *w,
                            const double *b)
{
    if (S == 1) {
#pragma omp simd
        for (int64_t k = 0; k < K; k++) y[k] = (x[k] - mu) * (r * w[k]) + b[k];
        return;
    }
    for (int64_t k = 0; k < K; k++) {
        double scale = r * w[k], shift = b[k];
#pragma omp simd
        for (int64_t s = 0; s < S; s++) y[k * S + s] = (x[k * S + s] - mu) * scale + shift;
    }
}

/* buf (K, S) = 0 where m[s] is 0 */
FN_INLINE void zero_padding(double *buf, const unsigned char *m, int64_t K, int64_t S)
{
    for (int64_t k = 0; k < K; k++)
        for (int64_t s = 0; s < S; s++)
            if (!m[s]) buf[k * S + s] = 0.0;
}

/* Everything a slice of (a, g) groups needs; shared read-only by the threads of one call. */
typedef struct {
    fn_view y, x, dy;
    double *mean, *rstd, *partial;   /* partial: (parts, 2, G*K) dweight/dbias sums per slice */
    const double *weight, *bias;
    fn_mask mask;
    int64_t A, G, K, S;
    double eps;
    int rms, stream;                 /* stream: write float32 rows (S = 1) with non-temporal stores */
} group_args;

/* The streamed row writers prefetch the next row's x into L1 as they write a row (convert.c).
 * Measured on 64 MiB of rows of 1024, paired A/B over the time of a copy: float32 layer norm one
 * thread 1.56x -> 1.44x, two threads 0.82x -> 0.73x; RMS 0.87x -> 0.75x; float64 0.81x -> 0.65x.
 * Only for rows of at most NEXT_ROW_BYTES: longer ones would push the row being written out of
 * L1. The next row is group i + 1 of the same slice (NULL: none). */
enum { NEXT_ROW_BYTES = 16 << 10 };

FN_INLINE const char *next_row(fn_view v, int64_t i, int64_t end, int64_t G, int64_t row_bytes)
{
    if (i + 1 >= end || row_bytes > NEXT_ROW_BYTES) return NULL;
    return v.data + (i + 1) / G * v.stride[0] + (i + 1) % G * v.stride[1];
}

/* Forward over groups [begin, end) of the flattened (A, G) index. */
FN_VECTOR_CLONES static int forward_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const group_args *p = ctx;
    int64_t G = p->G, K = p->K, S = p->S, n_group = K * S, a_loaded = -1, s_real = 0;
    fn_line_carry carry = {.line = NULL};      /* streamed rows: the line shared with the next one */
    /* float32 and float64 groups contiguous in x and y are read in place: no double buffer */
    const int f32_in_place = p->x.dtype == FN_F32 && p->y.dtype == FN_F32 &&
                             group_contiguous(p->x, K, S, 4) && group_contiguous(p->y, K, S, 4);
    const int f64_in_place = p->x.dtype == FN_F64 && p->y.dtype == FN_F64 &&
                             group_contiguous(p->x, K, S, 8) && group_contiguous(p->y, K, S, 8);
    /* contiguous float16 groups: statistics read in place, the float32 arithmetic (planes through
     * a float32 buffer) */
    const int f16_via_f32 = p->x.dtype == FN_F16 && p->y.dtype == FN_F16 &&
                            group_contiguous(p->x, K, S, 2) && group_contiguous(p->y, K, S, 2);
    /* float32/float16 groups use float copies of weight and bias (wf, bf); the double paths
     * (float64, masked or strided groups) use them as doubles, ones and zeros standing in for
     * a missing one. Only what this call uses is allocated: memory grows by 8 to 24 bytes per
     * channel, 16 bytes per group element for the double buffer of the strided (or masked) path,
     * 4 for the float buffer of float16 planes. */
    const int use_wf = f32_in_place || f16_via_f32;
    const int use_buffer = !(f32_in_place || f64_in_place || f16_via_f32) || p->mask.data;
    const int use_double_params = !use_wf || p->mask.data;
    const int64_t n_ones = use_double_params && !p->weight ? G * K : 0;
    const int64_t n_zeros = use_double_params && !p->bias ? G * K : 0;
    /* the counts above, checked (fastnorm.h): a zero-stride x may have more elements than any buffer
     * could hold. n_group_buf: 2 * n_group doubles for the buffer, else (n_group + 1) / 2 for float16 planes */
    int64_t n_group_buf = use_buffer ? 0 : f16_via_f32 && S > 1 ? (n_group + 1) / 2 : 0, n_buf, n_wf;
    size_t buf_bytes, wf_bytes, m_bytes;
    (void)part;
    if (fn_mul_add_size(use_buffer ? 2 : 0, n_group, n_group_buf, &n_group_buf) ||
        fn_mul_add_size((n_ones > 0) + (n_zeros > 0), G * K, n_group_buf, &n_buf) ||
        fn_array_bytes(1, n_buf, 1, sizeof(double), &buf_bytes) ||
        fn_mul_add_size((G * K + 15) / 16, 16, 0, &n_wf) ||     /* bf starts on a 64-byte line too */
        fn_array_bytes(2, n_wf, 1, sizeof(float), &wf_bytes) || fn_array_bytes(1, S, 1, 1, &m_bytes))
        return FN_ENOMEM;
    double *buf = alloc_lines(buf_bytes);
    float *wf = use_wf ? alloc_lines(wf_bytes) : NULL, *bf = wf ? wf + n_wf : NULL;
    unsigned char *m = malloc(m_bytes);
    if (!buf || !m || (use_wf && !wf)) {
        free(buf);
        free(wf);
        free(m);
        return FN_ENOMEM;
    }
    double *real = use_buffer ? buf + n_group : NULL;   /* (n_group) the real elements, when masked */
    double *ones = buf + n_group_buf, *zeros = ones + n_ones;
    for (int64_t c = 0; c < n_ones; c++) ones[c] = 1.0;
    for (int64_t c = 0; c < n_zeros; c++) zeros[c] = 0.0;
    const double *weight = p->weight ? p->weight : ones, *bias = p->bias ? p->bias : zeros;
    for (int64_t c = 0; use_wf && c < G * K; c++) {
        wf[c] = p->weight ? (float)p->weight[c] : 1.0f;
        bf[c] = p->bias ? (float)p->bias[c] : 0.0f;
    }
    const double w_max = use_wf ? max_abs_f32(wf, G * K) : 0.0;     /* for float_arithmetic_fits */

    for (int64_t i = begin; i < end; i++) {
        int64_t a = i / G, g = i % G;
        double mu = 0.0, r = 0.0, var;
        if (a != a_loaded) s_real = load_mask_row(m, p->mask, a, S), a_loaded = a;
        if (f32_in_place && s_real == S) {
            const float *xg = (const float *)(p->x.data + a * p->x.stride[0] + g * p->x.stride[1]);
            float *yg = (float *)(p->y.data + a * p->y.stride[0] + g * p->y.stride[1]);
            normalize_group_f32(yg, xg, K, S, p->rms, p->eps, wf + g * K, bf + g * K, w_max, &mu, &r, p->stream,
                                (const float *)next_row(p->x, i, end, G, K * 4), &carry);
        } else if (f16_via_f32 && s_real == S) {
            const uint16_t *xg = (const uint16_t *)(p->x.data + a * p->x.stride[0] + g * p->x.stride[1]);
            if (p->rms) var = mean_square_of_halves(xg, n_group);
            else moments_of_halves(xg, n_group, &mu, &var);
            r = rstd_of(var, p->eps);
            uint16_t *yg = (uint16_t *)(p->y.data + a * p->y.stride[0] + g * p->y.stride[1]);
            if (!float_arithmetic_fits(r, w_max, n_group)) {
                affine_group_in_double(yg, xg, FN_F16, K, S, mu, r, wf + g * K, bf + g * K);
            } else if (S == 1) {        /* a row: normalize and round to float16 in one pass */
                const float c[3] = {(float)mu, (float)(mu - (double)(float)mu), (float)r};
                fn_affine_row_to_halves(yg, xg, K, c, wf + g * K, bf + g * K);
            } else {                    /* planes: through a float buffer */
                float *fb = (float *)buf;
                fn_halves_to_floats(fb, xg, n_group);
                affine_group_f32(fb, fb, K, S, mu, r, wf + g * K, bf + g * K);
                fn_floats_to_halves(yg, fb, n_group);
            }
        } else if (f64_in_place && s_real == S) {
            const double *xg = (const double *)(p->x.data + a * p->x.stride[0] + g * p->x.stride[1]);
            double *yg = (double *)(p->y.data + a * p->y.stride[0] + g * p->y.stride[1]);
            if (p->rms) var = mean_square_of(xg, n_group);
            else moments_of(xg, n_group, &mu, &var);
            r = rstd_of(var, p->eps);
            if (S == 1 && p->stream)
                fn_affine_row_streamed_f64(yg, xg, K, mu, r, weight + g * K, bias + g * K,
                                           (const double *)next_row(p->x, i, end, G, K * 8), &carry);
            else affine_group(yg, xg, K, S, mu, r, weight + g * K, bias + g * K);
        } else {
            load_group(buf, p->x, a, g, K, S);
            if (s_real > 0) {
                const double *stats_of = buf;
                int64_t n = n_group;
                if (s_real < S) n = gather_real(real, buf, m, K, S), stats_of = real;
                if (p->rms) var = mean_square_of(stats_of, n);
                else moments_of(stats_of, n, &mu, &var);
                r = rstd_of(var, p->eps);
            }
            /* y = (x - mean) * rstd * w + b at real positions, 0 at padding */
            affine_group(buf, buf, K, S, mu, r, weight + g * K, bias + g * K);
            if (s_real < S) zero_padding(buf, m, K, S);
            store_group(p->y, buf, a, g, K, S);
        }
        p->mean[i] = mu;
        p->rstd[i] = r;
    }
    fn_line_carry_flush(&carry);
    if (p->stream) fn_stream_fence();
    free(buf);
    free(wf);
    free(m);
    return FN_OK;
}

int group_norm_forward(fn_view y, double *mean, double *rstd, fn_view x,
                       const double *weight, const double *bias, fn_mask mask,
                       int64_t A, int64_t G, int64_t K, int64_t S, double eps, int rms, int nthreads)
{
    if (A < 0 || G < 0 || K < 0 || S < 0) return FN_EINVAL;
    group_args p = {.y = y, .x = x, .mean = mean, .rstd = rstd, .weight = weight, .bias = bias,
                    .mask = mask, .A = A, .G = G, .K = K, .S = S, .eps = eps, .rms = rms,
                    .stream = S == 1 && y.dtype != FN_F16 &&
                              fn_streaming_pays(A * G * K, y.dtype == FN_F64 ? 8 : 4)};
    return fn_parallel_for(fn_parts(nthreads, A * G * K * S), A * G, forward_slice, &p);
}

/* The rows of a C-contiguous float32 (A, D) array, float32 weight and bias: the common layer/RMS
 * norm call, as group_norm_forward's float32 path but with no parameter passing through double. */
typedef struct {
    float *y;
    const float *x, *weight, *bias;
    double *mean, *rstd;
    int64_t D;
    double eps;
    int rms, stream;                 /* stream: write y with non-temporal stores */
} rows_args;

FN_VECTOR_CLONES static int rows_f32_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const rows_args *p = ctx;
    const int64_t D = p->D;
    float *ones_zeros = NULL;                 /* (2, D): stand-ins for a missing weight or bias */
    fn_line_carry carry = {.line = NULL};     /* streamed rows: the line shared with the next one */
    (void)part;
    if (!p->weight || !p->bias) {
        size_t bytes;
        if (fn_array_bytes(2, D, 0, sizeof(float), &bytes) || !(ones_zeros = malloc(bytes))) return FN_ENOMEM;
        for (int64_t k = 0; k < D; k++) ones_zeros[k] = 1.0f, ones_zeros[D + k] = 0.0f;
    }
    const float *w = p->weight ? p->weight : ones_zeros, *b = p->bias ? p->bias : ones_zeros + D;
    const double w_max = max_abs_f32(w, D);                        /* for float_arithmetic_fits */
    const int short_rows = D * (int64_t)sizeof(float) <= NEXT_ROW_BYTES;
    if (short_rows && !p->stream) {
        /* Row a + 1's statistics before row a's output: the end of each row's statistics (lane
         * sums, divisions, square root: a chain of ~100 cycles) then overlaps the output of the
         * row before, instead of holding up its own row's output. Rows in place (y == x) are
         * safe: row a + 1 is read before row a + 1 is written. Measured on (8, 768): 2.19 ->
         * 2.08 us. */
        if (begin < end) group_stats_f32(p->x + begin * D, D, p->rms, p->eps, &p->mean[begin], &p->rstd[begin]);
        for (int64_t a = begin; a < end; a++) {
            if (a + 1 < end)
                group_stats_f32(p->x + (a + 1) * D, D, p->rms, p->eps, &p->mean[a + 1], &p->rstd[a + 1]);
            if (float_arithmetic_fits(p->rstd[a], w_max, D))
                affine_row_f32(p->y + a * D, p->x + a * D, D, p->mean[a], p->rstd[a], w, b);
            else
                affine_group_in_double(p->y + a * D, p->x + a * D, FN_F32, D, 1, p->mean[a], p->rstd[a], w, b);
        }
    } else {
        for (int64_t a = begin; a < end; a++)
            normalize_group_f32(p->y + a * D, p->x + a * D, D, 1, p->rms, p->eps, w, b, w_max, &p->mean[a],
                                &p->rstd[a], p->stream, short_rows && a + 1 < end ? p->x + (a + 1) * D : NULL,
                                &carry);
    }
    fn_line_carry_flush(&carry);
    if (p->stream) fn_stream_fence();
    free(ones_zeros);
    return FN_OK;
}

int layer_norm_rows_f32(float *y, double *mean, double *rstd, const float *x, const float *weight,
                        const float *bias, int64_t A, int64_t D, double eps, int rms, int nthreads)
{
    if (A < 0 || D < 1) return FN_EINVAL;
    rows_args p = {.y = y, .x = x, .weight = weight, .bias = bias, .mean = mean, .rstd = rstd, .D = D,
                   .eps = eps, .rms = rms, .stream = fn_streaming_pays(A * D, sizeof(float))};
    return fn_parallel_for(fn_parts(nthreads, A * D), A, rows_f32_slice, &p);
}

/* The sums of a group's backward (K, S), read from x and dy of element type T: adds
 * sum_s dy * xhat into dw[k] and sum_s dy into db[k], and returns sum(g) and sum(g * xhat) with
 * g = dy * w[k], xhat = (x - mu) * r. All in double. */
#define DEFINE_BACKWARD_SUMS(NAME, T)                                                              \
    FN_INLINE void NAME(const T *x, const T *dy, int64_t K, int64_t S, double mu, double r,         \
                        const double *w, double *dw, double *db, double *sum_g, double *sum_g_xhat) \
    {                                                                                              \
        double sg = 0.0, sgx = 0.0;                                                                \
        if (S == 1) {                   /* a row: k is the vector dimension */                     \
            _Pragma("omp simd reduction(+ : sg, sgx)")                                             \
            for (int64_t k = 0; k < K; k++) {                                                      \
                double xhat = ((double)x[k] - mu) * r, d = (double)dy[k];                          \
                dw[k] += d * xhat;                                                                 \
                db[k] += d;                                                                        \
                sg += d * w[k];                                                                    \
                sgx += d * w[k] * xhat;                                                            \
            }                                                                                      \
        } else {                                                                                   \
            for (int64_t k = 0; k < K; k++) {                                                      \
                const T *xk = x + k * S, *dyk = dy + k * S;                                        \
                double dwk = 0.0, dbk = 0.0;                                                       \
                _Pragma("omp simd reduction(+ : dwk, dbk)")                                        \
                for (int64_t s = 0; s < S; s++) {                                                  \
                    dwk += (double)dyk[s] * (((double)xk[s] - mu) * r);                            \
                    dbk += (double)dyk[s];                                                         \
                }                                                                                  \
                dw[k] += dwk;                                                                      \
                db[k] += dbk;                                                                      \
                sg += dbk * w[k];                                                                  \
                sgx += dwk * w[k];                                                                 \
            }                                                                                      \
        }                                                                                          \
        *sum_g = sg;                                                                               \
        *sum_g_xhat = sgx;                                                                         \
    }
DEFINE_BACKWARD_SUMS(backward_sums, double)
DEFINE_BACKWARD_SUMS(backward_sums_f32, float)
#undef DEFINE_BACKWARD_SUMS

/* dx of a float32 group from its sums, below. */
FN_INLINE void dx_group_f32(const group_args *p, int64_t a, int64_t g, double mu, double r, const float *wf,
                            double sum_g, double sum_g_xhat, fn_line_carry *carry);

/* sum of dy and of dy * xhat over contiguous float32 x, dy (n), xhat = ((x - mh) - ml) * r as in
 * affine_group_f32: in float over runs of F32_RUN per lane, then in double (see moments.h). */
FN_INLINE void grad_sums_in_runs(const float *restrict x, const float *restrict dy, int64_t n, float mh, float ml,
                                 float r, double *sum_dy, double *sum_dy_xhat)
{
    double s1 = 0.0, s2 = 0.0, a2[RUN_LANES] = {0}, b2[RUN_LANES] = {0};
    int64_t i = 0;
    while (i + RUN_LANES <= n) {
        float a[RUN_LANES] = {0}, b[RUN_LANES] = {0};
        const int64_t stop = n - i >= RUN_LANES * F32_RUN ? i + RUN_LANES * F32_RUN : n - (n - i) % RUN_LANES;
        for (; i < stop; i += RUN_LANES)
            for (int j = 0; j < RUN_LANES; j++) {
                const float d = dy[i + j], h = ((x[i + j] - mh) - ml) * r;
                a[j] += d;
                b[j] += d * h;
            }
        for (int j = 0; j < RUN_LANES; j++) a2[j] += a[j], b2[j] += b[j];
    }
    for (; i < n; i++) {
        const float h = ((x[i] - mh) - ml) * r;
        s1 += dy[i];
        s2 += (double)dy[i] * h;
    }
    *sum_dy = s1 + sum_of_lanes(a2, RUN_LANES);
    *sum_dy_xhat = s2 + sum_of_lanes(b2, RUN_LANES);
}

/* Backward of one contiguous float32 group (no padding), read in place: adds the group's
 * dweight/dbias sums into dw, db (K) and writes dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
 * g = dy * w, in float arithmetic with the mean split as in affine_group_f32. Planes of
 * F32_RUNS_FROM elements or more take their sums in float runs (grad_sums_in_runs), others in
 * double. */
FN_INLINE void backward_group_f32(const group_args *p, int64_t a, int64_t g, double mu, double r,
                                  const double *w, const float *wf, double *dw, double *db,
                                  fn_line_carry *carry)
{
    const int64_t K = p->K, S = p->S;
    const float *x = (const float *)(p->x.data + a * p->x.stride[0] + g * p->x.stride[1]);
    const float *dy = (const float *)(p->dy.data + a * p->dy.stride[0] + g * p->dy.stride[1]);
    double sum_g = 0.0, sum_g_xhat = 0.0;
    if (S >= F32_RUNS_FROM) {           /* instance/group-norm planes: their sums in float runs */
        const float mh = (float)mu, ml = (float)(mu - (double)mh), rf = (float)r;
        for (int64_t k = 0; k < K; k++) {
            double dbk, dwk;
            grad_sums_in_runs(x + k * S, dy + k * S, S, mh, ml, rf, &dbk, &dwk);
            dw[k] += dwk;
            db[k] += dbk;
            sum_g += dbk * w[k];
            sum_g_xhat += dwk * w[k];
        }
    } else {
        backward_sums_f32(x, dy, K, S, mu, r, w, dw, db, &sum_g, &sum_g_xhat);
    }
    dx_group_f32(p, a, g, mu, r, wf, sum_g, sum_g_xhat, carry);
}

/* backward_group_f32 for the two float32 rows a and a + 1 of a layer norm (G = 1, S = 1), with
 * float sums as the forward's float32 statistics (see moments.h): the row sums sum(g) and
 * sum(g * xhat) in float over runs of F32_RUN vectors of ROW_LANES per lane, then in double, and
 * the rows' dweight/dbias terms added into the float column sums dwf, dbf (K), which the caller
 * adds into its double sums every BACKWARD_ROWS_RUN rows. Each float sum errs by at most ~10
 * float ulps of the sum of its terms' magnitudes; xhat is computed as in affine_group_f32.
 * About 1.6x faster than the sums in double. mu, r: (2) the rows' statistics. */
enum { ROW_LANES = 16, BACKWARD_ROWS_RUN = 8 };

FN_INLINE void backward_two_rows_f32(const group_args *p, int64_t a, const double *mu, const double *r,
                                     const float *restrict wf, float *restrict dwf, float *restrict dbf,
                                     fn_line_carry *carry)
{
    const int64_t K = p->K;
    const float *restrict xa = (const float *)(p->x.data + a * p->x.stride[0]);
    const float *restrict xb = (const float *)((const char *)xa + p->x.stride[0]);
    const float *restrict ga = (const float *)(p->dy.data + a * p->dy.stride[0]);
    const float *restrict gb = (const float *)((const char *)ga + p->dy.stride[0]);
    const float mha = (float)mu[0], mla = (float)(mu[0] - (double)mha), ra = (float)r[0];
    const float mhb = (float)mu[1], mlb = (float)(mu[1] - (double)mhb), rb = (float)r[1];
    /* lanes of sum(g), sum(g * xhat) of row a, then of row b */
    double s0[ROW_LANES] = {0}, s1[ROW_LANES] = {0}, s2[ROW_LANES] = {0}, s3[ROW_LANES] = {0};
    int64_t k = 0;
    while (k + ROW_LANES <= K) {
        float t0[ROW_LANES] = {0}, t1[ROW_LANES] = {0}, t2[ROW_LANES] = {0}, t3[ROW_LANES] = {0};
        const int64_t stop = K - k >= ROW_LANES * F32_RUN ? k + ROW_LANES * F32_RUN : K - (K - k) % ROW_LANES;
        for (; k < stop; k += ROW_LANES)
            for (int j = 0; j < ROW_LANES; j++) {
                const float ha = ((xa[k + j] - mha) - mla) * ra, hb = ((xb[k + j] - mhb) - mlb) * rb;
                const float da = ga[k + j], db = gb[k + j], gwa = da * wf[k + j], gwb = db * wf[k + j];
                t0[j] += gwa;
                t1[j] += gwa * ha;
                t2[j] += gwb;
                t3[j] += gwb * hb;
                dwf[k + j] += da * ha + db * hb;
                dbf[k + j] += da + db;
            }
        for (int j = 0; j < ROW_LANES; j++) s0[j] += t0[j], s1[j] += t1[j], s2[j] += t2[j], s3[j] += t3[j];
    }
    for (; k < K; k++) {                /* the last K % ROW_LANES columns */
        const float ha = ((xa[k] - mha) - mla) * ra, hb = ((xb[k] - mhb) - mlb) * rb;
        const float da = ga[k], db = gb[k];
        s0[0] += (double)da * wf[k];
        s1[0] += (double)da * wf[k] * ha;
        s2[0] += (double)db * wf[k];
        s3[0] += (double)db * wf[k] * hb;
        dwf[k] += da * ha + db * hb;
        dbf[k] += da + db;
    }
    dx_group_f32(p, a, 0, mu[0], r[0], wf, sum_of_lanes(s0, ROW_LANES), sum_of_lanes(s1, ROW_LANES), carry);
    dx_group_f32(p, a + 1, 0, mu[1], r[1], wf, sum_of_lanes(s2, ROW_LANES), sum_of_lanes(s3, ROW_LANES), carry);
}

/* dw[k] += dwf[k], db[k] += dbf[k] and the float sums back to 0, k < K. */
FN_INLINE void flush_float_sums(double *dw, double *db, float *dwf, float *dbf, int64_t K)
{
    for (int64_t k = 0; k < K; k++) {
        dw[k] += dwf[k];
        db[k] += dbf[k];
        dwf[k] = dbf[k] = 0.0f;
    }
}

/* dx = dy * (r * w[k]) + c0 - (x - mu) * c1 of a contiguous float32 group (K, S) in double: the
 * groups whose float coefficients could overflow (see dx_group_f32). dx may be dy. */
FN_OUT_OF_LINE void dx_group_in_double(float *dx, const float *dy, const float *x, int64_t K, int64_t S, double mu,
                                       double r, const float *wf, double c0, double c1)
{
    for (int64_t i = 0; i < K * S; i++)
        dx[i] = (float)((double)dy[i] * (r * (double)wf[i / S]) + c0 - ((double)x[i] - mu) * c1);
}

/* dx of one contiguous float32 group from its sums (see backward_group_f32); a streamed row shares
 * its end line through the slice's carry. */
FN_INLINE void dx_group_f32(const group_args *p, int64_t a, int64_t g, double mu, double r, const float *wf,
                            double sum_g, double sum_g_xhat, fn_line_carry *carry)
{
    int64_t K = p->K, S = p->S;
    const float *x = (const float *)(p->x.data + a * p->x.stride[0] + g * p->x.stride[1]);
    const float *dy = (const float *)(p->dy.data + a * p->dy.stride[0] + g * p->dy.stride[1]);
    float *dx = (float *)(p->y.data + a * p->y.stride[0] + g * p->y.stride[1]);
    double n = (double)(K * S);
    /* dx = dy * (r * w) + c0 - (x - mu) * c1; r * w fits a float (the caller checked
     * float_arithmetic_fits), c0 and c1 are checked here */
    const double c0d = p->rms ? 0.0 : -r * sum_g / n, c1d = r * r * sum_g_xhat / n;
    if (!(fabs(c0d) <= 0x1p100 && fabs(c1d) <= 0x1p100)) {
        dx_group_in_double(dx, dy, x, K, S, mu, r, wf, c0d, c1d);
        return;
    }
    const float rf = (float)r, c0 = (float)c0d, c1 = (float)c1d;
    const float mu_hi = (float)mu, mu_lo = (float)(mu - (double)mu_hi);
    if (S == 1 && p->stream) {
        const float c[5] = {rf, c0, mu_hi, mu_lo, c1};
        fn_dx_row_streamed(dx, dy, x, K, c, wf, carry);
        return;
    }
    if (S == 1) {
#pragma omp simd
        for (int64_t k = 0; k < K; k++) dx[k] = dy[k] * (rf * wf[k]) + c0 - ((x[k] - mu_hi) - mu_lo) * c1;
        return;
    }
    for (int64_t k = 0; k < K; k++) {
        const float scale = rf * wf[k];
        const float *xk = x + k * S, *dyk = dy + k * S;
        float *dxk = dx + k * S;
#pragma omp simd
        for (int64_t s = 0; s < S; s++) dxk[s] = dyk[s] * scale + c0 - ((xk[s] - mu_hi) - mu_lo) * c1;
    }
}

/* Backward over groups [begin, end): dx, and this slice's dweight/dbias sums in p->partial. */
FN_VECTOR_CLONES static int backward_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const group_args *p = ctx;
    int64_t G = p->G, K = p->K, S = p->S, n_group = K * S, a_loaded = -1, s_real = 0;
    fn_line_carry carry = {.line = NULL};      /* streamed dx rows: the line shared with the next one */
    int64_t n_bx;
    size_t bx_bytes, m_bytes;
    if (fn_mul_add_size(2, n_group, G * K, &n_bx) || fn_array_bytes(1, n_bx, 1, sizeof(double), &bx_bytes) ||
        fn_array_bytes(1, S, 1, 1, &m_bytes))
        return FN_ENOMEM;
    double *bx = malloc(bx_bytes);
    unsigned char *m = malloc(m_bytes);
    if (!bx || !m) {
        free(bx);
        free(m);
        return FN_ENOMEM;
    }
    double *bdy = bx + n_group;     /* (K, S) dy of the group, then dx */
    double *ones = bdy + n_group;   /* (G*K) the weight when there is none */
    double *dweight = p->partial + (int64_t)part * 2 * G * K, *dbias = dweight + G * K;
    for (int64_t c = 0; c < G * K; c++) dweight[c] = dbias[c] = 0.0, ones[c] = 1.0;
    const double *weight = p->weight ? p->weight : ones;
    /* float32 groups contiguous in x, dy and dx are read in place */
    const int f32_in_place = p->x.dtype == FN_F32 && p->dy.dtype == FN_F32 && p->y.dtype == FN_F32 &&
                             group_contiguous(p->x, K, S, 4) && group_contiguous(p->dy, K, S, 4) &&
                             group_contiguous(p->y, K, S, 4);
    /* layer norm rows of float32 go two at a time, with float column sums dwf, dbf (K) */
    const int rows_f32 = f32_in_place && G == 1 && S == 1 && !p->mask.data;
    const int64_t n_wf = (G * K + 15) / 16 * 16;        /* each array on its own 64-byte line */
    size_t wf_bytes = 0;
    float *wf = f32_in_place && !fn_array_bytes(rows_f32 ? 3 : 1, n_wf, 1, sizeof(float), &wf_bytes)
                    ? alloc_lines(wf_bytes) : NULL;
    if (f32_in_place && !wf) {
        free(bx);
        free(m);
        return FN_ENOMEM;
    }
    float *dwf = rows_f32 ? wf + n_wf : NULL, *dbf = rows_f32 ? dwf + n_wf : NULL;
    for (int64_t c = 0; f32_in_place && c < G * K; c++) wf[c] = (float)weight[c];
    const double w_max = f32_in_place ? max_abs_f32(wf, G * K) : 0.0;     /* for float_arithmetic_fits */
    for (int64_t c = 0; rows_f32 && c < K; c++) dwf[c] = dbf[c] = 0.0f;
    int rows_pending = 0;                                /* rows in dwf, dbf */

    for (int64_t i = begin; i < end; i++) {
        int64_t a = i / G, g = i % G;
        if (a != a_loaded) s_real = load_mask_row(m, p->mask, a, S), a_loaded = a;
        const double *w = weight + g * K;
        double *dw = dweight + g * K, *db = dbias + g * K;
        double mu = p->rms ? 0.0 : p->mean[i], r = p->rstd[i];
        double sum_g = 0.0, sum_g_xhat = 0.0;
        /* float arithmetic only for groups it can carry (float_arithmetic_fits); others in double */
        const int fits = float_arithmetic_fits(r, w_max, n_group);
        if (rows_f32 && i + 1 < end && fits && float_arithmetic_fits(p->rstd[i + 1], w_max, n_group)) {
            const double mu2[2] = {mu, p->rms ? 0.0 : p->mean[i + 1]}, r2[2] = {r, p->rstd[i + 1]};
            backward_two_rows_f32(p, a, mu2, r2, wf, dwf, dbf, &carry);
            if ((rows_pending += 2) >= BACKWARD_ROWS_RUN) flush_float_sums(dw, db, dwf, dbf, K), rows_pending = 0;
            i++;
            continue;
        }
        if (f32_in_place && s_real == S && fits) {
            backward_group_f32(p, a, g, mu, r, w, wf + g * K, dw, db, &carry);
            continue;
        }
        load_group(bx, p->x, a, g, K, S);
        load_group(bdy, p->dy, a, g, K, S);
        if (s_real < S) {               /* padding: x = dy = 0, so it adds nothing, even if NaN */
            zero_padding(bx, m, K, S);
            zero_padding(bdy, m, K, S);
        }
        /* with g = dy * w: partial sums of dweight, dbias and of the two means dx needs */
        backward_sums(bx, bdy, K, S, mu, r, w, dw, db, &sum_g, &sum_g_xhat);
        /* dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), without mean(g) for RMS */
        double n = (double)(s_real * K);
        double mean_g = (p->rms || n == 0.0) ? 0.0 : sum_g / n;
        double mean_g_xhat = n == 0.0 ? 0.0 : sum_g_xhat / n;
        if (S == 1) {
#pragma omp simd
            for (int64_t k = 0; k < K; k++)
                bdy[k] = r * (bdy[k] * w[k] - mean_g - (bx[k] - mu) * r * mean_g_xhat);
        } else {
            for (int64_t k = 0; k < K; k++) {
                const double *xr = bx + k * S;
                double *dr = bdy + k * S, wk = w[k];
#pragma omp simd
                for (int64_t s = 0; s < S; s++)
                    dr[s] = r * (dr[s] * wk - mean_g - (xr[s] - mu) * r * mean_g_xhat);
            }
        }
        if (s_real < S) zero_padding(bdy, m, K, S);
        store_group(p->y, bdy, a, g, K, S);
    }
    if (rows_f32) flush_float_sums(dweight, dbias, dwf, dbf, K);
    fn_line_carry_flush(&carry);
    if (p->stream) fn_stream_fence();
    free(bx);
    free(wf);
    free(m);
    return FN_OK;
}

int group_norm_backward(fn_view dx, double *dweight, double *dbias, fn_view dy, fn_view x,
                        const double *mean, const double *rstd, const double *weight,
                        fn_mask mask, int64_t A, int64_t G, int64_t K, int64_t S, int rms, int nthreads)
{
    if (A < 0 || G < 0 || K < 0 || S < 0 || !dweight || !dbias) return FN_EINVAL;
    int parts = fn_parts(nthreads, A * G * K * S);
    if (parts > A * G) parts = A * G > 0 ? (int)(A * G) : 1;
    size_t partial_bytes;
    if (fn_array_bytes(2 * (int64_t)parts, G * K, 1, sizeof(double), &partial_bytes)) return FN_ENOMEM;
    double *partial = malloc(partial_bytes);
    if (!partial) return FN_ENOMEM;
    group_args p = {.y = dx, .x = x, .dy = dy, .mean = (double *)mean, .rstd = (double *)rstd,
                    .partial = partial, .weight = weight, .mask = mask,
                    .A = A, .G = G, .K = K, .S = S, .rms = rms,
                    .stream = S == 1 && dx.dtype == FN_F32 && fn_streaming_pays(A * G * K, sizeof(float))};
    int status = fn_parallel_for(parts, A * G, backward_slice, &p);
    /* dweight, dbias = the slices' sums, added in slice order */
    for (int64_t c = 0; c < G * K; c++) {
        double dw = 0.0, db = 0.0;
        for (int q = 0; q < parts; q++) dw += partial[(q * 2) * G * K + c], db += partial[(q * 2 + 1) * G * K + c];
        dweight[c] = dw;
        dbias[c] = db;
    }
    free(partial);
    return status;
}
