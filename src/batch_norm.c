/* Batch norm: one statistic per channel c of the (O, C, S) view, over every real (o, s).
 *
 *   (N, C), axis=-1                 (N, C, 1)        columns: blocks of rows, vectorized along c
 *   (N, C, H, W), axis=1            (N, C, H*W)      planes: statistics per (n, c) plane, merged
 *   (N, L, D), axis=-1              (N*L, D, 1)
 *
 * Partial statistics of a block (or a plane) are two-pass from a cache-resident buffer and merged
 * across blocks with Chan et al.'s formula, so no E[x^2] - E[x]^2 anywhere. */
#include <stdlib.h>

#include "moments.h"

enum { BLOCK_ELEMENTS = 1 << 16 };  /* rows whose column sums share one shift: ~64K elements */

FN_INLINE int64_t rows_per_block(int64_t C)
{
    int64_t rows = BLOCK_ELEMENTS / (C > 0 ? C : 1);
    return rows < 16 ? 16 : rows;
}

/* Column statistics of the real rows among o0..o0+nrows of x (O, C, 1), merged into
 * (count, mean, m2): one pass of sums shifted by the block's first real row; a column whose
 * shift lay more than 8 standard deviations from its mean gets a second pass shifted by that
 * mean (as moments_of does for a row). row: (C) doubles; tmp: (3C) doubles. */
FN_INLINE void merge_block_columns(double *count, double *mean, double *m2, double *row, double *tmp,
                                   fn_view x, fn_mask mask, int64_t o0, int64_t nrows, int64_t C)
{
    double *shift = tmp, *sd = tmp + C, *sdd = tmp + 2 * C;
    const int f32_rows = x.dtype == FN_F32 && x.stride[1] == 4;
    int64_t nb = 0;
    for (int64_t o = o0; o < o0 + nrows; o++) {
        if (mask.data && !mask.data[o * mask.stride[0]]) continue;
        if (nb++ == 0) {
            fn_load(shift, x.data + o * x.stride[0], C, x.stride[1], x.dtype);
            for (int64_t c = 0; c < C; c++) sd[c] = sdd[c] = 0.0;
            continue;
        }
        if (f32_rows && !mask.data && o + 4 <= o0 + nrows) {
            /* four contiguous float32 rows, read in place: one update of the sums per four rows */
            const char *r0 = x.data + o * x.stride[0];
            const float *xa = (const float *)r0, *xb = (const float *)(r0 + x.stride[0]);
            const float *xc = (const float *)(r0 + 2 * x.stride[0]), *xd = (const float *)(r0 + 3 * x.stride[0]);
            if (o + 4 + PREFETCH_ROWS < o0 + nrows)
                for (int j = 0; j < 4; j++) prefetch_bytes(r0 + (PREFETCH_ROWS + j) * x.stride[0], 4 * C);
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                double da = (double)xa[c] - shift[c], db = (double)xb[c] - shift[c];
                double dc = (double)xc[c] - shift[c], dd = (double)xd[c] - shift[c];
                sd[c] += (da + db) + (dc + dd);
                sdd[c] += (da * da + db * db) + (dc * dc + dd * dd);
            }
            nb += 3, o += 3;
            continue;
        }
        if (f32_rows) {                 /* a contiguous float32 row, read in place */
            const float *xr = (const float *)(x.data + o * x.stride[0]);
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                double d = (double)xr[c] - shift[c];
                sd[c] += d;
                sdd[c] += d * d;
            }
            continue;
        }
        fn_load(row, x.data + o * x.stride[0], C, x.stride[1], x.dtype);
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            double d = row[c] - shift[c];
            sd[c] += d;
            sdd[c] += d * d;
        }
    }
    for (int64_t c = 0; nb > 0 && c < C; c++) {
        double bmean, bvar, offset = sd[c] / (double)nb;
        finish_moments(shift[c], sd[c], sdd[c], nb, &bmean, &bvar);
        if (!(offset * offset <= 64.0 * bvar)) {        /* far shift (or NaN): shift by the mean */
            double s1 = 0.0, s2 = 0.0, v;
            for (int64_t o = o0; o < o0 + nrows; o++) {
                if (mask.data && !mask.data[o * mask.stride[0]]) continue;
                fn_load(&v, x.data + o * x.stride[0] + c * x.stride[1], 1, 0, x.dtype);
                s1 += v - bmean;
                s2 += (v - bmean) * (v - bmean);
            }
            finish_moments(bmean, s1, s2, nb, &bmean, &bvar);
        }
        merge_moments(&count[c], &mean[c], &m2[c], (double)nb, bmean, bvar * (double)nb);
    }
}

/* Everything a slice of outer indices o needs; shared read-only by the threads of one call. */
typedef struct {
    fn_view out, x, dy;
    fn_mask mask;
    const double *center, *coef_x, *coef_dy, *shift;
    double *partial;                 /* per slice: (count, mean, m2) or (sum_dy, sum_dy_xc), C each */
    int64_t O, C, S;
    int stream;                      /* channel_combine: write float32 rows with non-temporal stores */
} channel_args;

/* Statistics of rows/planes o in [begin, end) into this slice's (count, mean, m2). */
FN_VECTOR_CLONES static int moments_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const channel_args *p = ctx;
    int64_t C = p->C, S = p->S, rows = rows_per_block(C);
    double *count = p->partial + (int64_t)part * 3 * C, *mean = count + C, *m2 = mean + C;
    size_t buf_bytes, m_bytes;
    if (fn_array_bytes(S == 1 ? 4 : 2, S == 1 ? C : S, 1, sizeof(double), &buf_bytes) ||
        fn_array_bytes(1, S, 1, 1, &m_bytes))
        return FN_ENOMEM;
    double *buf = malloc(buf_bytes);
    unsigned char *m = malloc(m_bytes);
    const int f32_planes = S > 1 && p->x.dtype == FN_F32 && p->x.stride[2] == 4;
    if (!buf || !m) {
        free(buf);
        free(m);
        return FN_ENOMEM;
    }
    for (int64_t c = 0; c < C; c++) count[c] = mean[c] = m2[c] = 0.0;
    if (S == 1) {
        for (int64_t o0 = begin; o0 < end; o0 += rows)
            merge_block_columns(count, mean, m2, buf, buf + C, p->x, p->mask, o0,
                                end - o0 < rows ? end - o0 : rows, C);
    } else {
        double *real = buf + S;
        for (int64_t o = begin; o < end; o++) {
            int64_t n = load_mask_row(m, p->mask, o, S);
            if (n == 0) continue;
            for (int64_t c = 0; c < C; c++) {
                const double *plane = buf;
                const char *src = p->x.data + o * p->x.stride[0] + c * p->x.stride[1];
                double pm, pv;
                if (f32_planes && n == S) {     /* a contiguous float32 plane, read in place */
                    moments_of_f32((const float *)src, S, &pm, &pv);
                    merge_moments(&count[c], &mean[c], &m2[c], (double)n, pm, pv * (double)n);
                    continue;
                }
                fn_load(buf, src, S, p->x.stride[2], p->x.dtype);
                if (n < S) {
                    for (int64_t i = 0, j = 0; i < S; i++)
                        if (m[i]) real[j++] = buf[i];
                    plane = real;
                }
                moments_of(plane, n, &pm, &pv);
                merge_moments(&count[c], &mean[c], &m2[c], (double)n, pm, pv * (double)n);
            }
        }
    }
    free(buf);
    free(m);
    return FN_OK;
}

/* How many slices of O `elements` of work is worth. */
static int channel_parts(int nthreads, int64_t O, int64_t elements)
{
    int parts = fn_parts(nthreads, elements);
    return parts > O ? (O > 0 ? (int)O : 1) : parts;
}

int channel_moments(double *count, double *mean, double *var, fn_view x, fn_mask mask,
                    int64_t O, int64_t C, int64_t S, int nthreads)
{
    if (O < 0 || C < 0 || S < 0) return FN_EINVAL;
    int parts = channel_parts(nthreads, O, O * C * S);
    size_t partial_bytes;
    if (fn_array_bytes(3 * (int64_t)parts, C, 1, sizeof(double), &partial_bytes)) return FN_ENOMEM;
    double *partial = malloc(partial_bytes);
    if (!partial) return FN_ENOMEM;
    channel_args p = {.x = x, .mask = mask, .partial = partial, .O = O, .C = C, .S = S};
    int status = fn_parallel_for(parts, O, moments_slice, &p);
    /* merge the slices in order; var holds m2 until the end */
    for (int64_t c = 0; c < C; c++) count[c] = mean[c] = var[c] = 0.0;
    for (int q = 0; q < parts; q++) {
        const double *qc = partial + (int64_t)q * 3 * C, *qm = qc + C, *q2 = qm + C;
        for (int64_t c = 0; c < C; c++) merge_moments(&count[c], &mean[c], &var[c], qc[c], qm[c], q2[c]);
    }
    for (int64_t c = 0; c < C; c++) {
        if (count[c] == 0.0) mean[c] = var[c] = NAN;
        else var[c] /= count[c];
    }
    free(partial);
    return status;
}

/* Whether channel c may be combined in float arithmetic (combine_line_f32): |center| and the
 * coefficients at most 2^100, so neither x - center nor a coefficient can overflow a float, and
 * coef_x 0 or at least 2^-100, so it keeps its precision (as float_arithmetic_fits in moments.h).
 * NaN passes: it gives NaN either way. Otherwise the call computes in double. */
FN_INLINE int channel_fits_float(double center, double coef_x, double coef_dy)
{
    const double cx = fabs(coef_x);
    return !(fabs(center) > 0x1p100 || cx > 0x1p100 || fabs(coef_dy) > 0x1p100 || (cx > 0.0 && cx < 0x1p-100));
}

/* channel_combine on one contiguous float32 line (a row of C channels, or a plane of channel c)
 * in float arithmetic, the center split into hi + lo floats as in affine_group_f32.
 * f: (5, C) floats: center_hi, center_lo, coef_x, shift, coef_dy; dy may be NULL;
 * `step` 1 walks the channels along the line, 0 stays on channel c. */
FN_INLINE void combine_line_f32(float *y, const float *x, const float *dy, int64_t n, const float *f, int64_t C,
                                int64_t c, int step)
{
    const float *hi = f, *lo = f + C, *cx = f + 2 * C, *sh = f + 3 * C, *cdy = f + 4 * C;
    if (step && dy) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[i] = ((x[i] - hi[i]) - lo[i]) * cx[i] + dy[i] * cdy[i] + sh[i];
    } else if (step) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[i] = ((x[i] - hi[i]) - lo[i]) * cx[i] + sh[i];
    } else if (dy) {
        const float h = hi[c], l = lo[c], k = cx[c], b = sh[c], kd = cdy[c];
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[i] = ((x[i] - h) - l) * k + dy[i] * kd + b;
    } else {
        const float h = hi[c], l = lo[c], k = cx[c], b = sh[c];
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[i] = ((x[i] - h) - l) * k + b;
    }
}

/* out = coef_x * (x - center) + coef_dy * dy + shift for rows/planes o in [begin, end). */
FN_VECTOR_CLONES static int combine_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const channel_args *p = ctx;
    int64_t C = p->C, S = p->S, line = S == 1 ? C : S;   /* elements per load: a row, or a plane */
    size_t bx_bytes, m_bytes, f_bytes;
    if (fn_array_bytes(2, line, 1, sizeof(double), &bx_bytes) || fn_array_bytes(1, S, 1, 1, &m_bytes) ||
        fn_array_bytes(5, C, 1, sizeof(float), &f_bytes))
        return FN_ENOMEM;
    double *bx = malloc(bx_bytes), *bdy = bx ? bx + line : NULL;
    unsigned char *m = malloc(m_bytes);
    const int has_dy = p->dy.data != NULL, line_dim = S == 1 ? 1 : 2;
    /* contiguous float32 lines of x, out (and dy): float arithmetic, no buffer */
    int f32 = p->x.dtype == FN_F32 && p->out.dtype == FN_F32 && p->x.stride[line_dim] == 4 &&
              p->out.stride[line_dim] == 4 && (!has_dy || (p->dy.dtype == FN_F32 && p->dy.stride[line_dim] == 4));
    for (int64_t c = 0; f32 && c < C; c++)
        f32 = channel_fits_float(p->center[c], p->coef_x[c], has_dy ? p->coef_dy[c] : 0.0);
    float *f = f32 ? malloc(f_bytes) : NULL;
    (void)part;
    if (!bx || !m || (f32 && !f)) {
        free(bx);
        free(m);
        free(f);
        return FN_ENOMEM;
    }
    for (int64_t c = 0; f32 && c < C; c++) {
        f[c] = (float)p->center[c];
        f[C + c] = (float)(p->center[c] - (double)f[c]);
        f[2 * C + c] = (float)p->coef_x[c];
        f[3 * C + c] = (float)p->shift[c];
        f[4 * C + c] = has_dy ? (float)p->coef_dy[c] : 0.0f;
    }
    /* a large output of contiguous rows (and no mask): the whole slice in one streamed pass */
    if (f32 && S == 1 && C >= 16 && !p->mask.data && p->stream && p->x.stride[0] == 4 * C &&
        p->out.stride[0] == 4 * C && (!has_dy || p->dy.stride[0] == 4 * C)) {
        size_t f2_bytes;
        float *f2 = fn_array_bytes(10, C, 0, sizeof(float), &f2_bytes) ? NULL : malloc(f2_bytes);
        if (f2) {
            for (int k = 0; k < 5; k++)
                for (int64_t c = 0; c < 2 * C; c++) f2[2 * k * C + c] = f[k * C + c % C];
            fn_combine_rows_streamed((float *)(p->out.data + begin * p->out.stride[0]),
                                     (const float *)(p->x.data + begin * p->x.stride[0]),
                                     has_dy ? (const float *)(p->dy.data + begin * p->dy.stride[0]) : NULL,
                                     (end - begin) * C, C, f2);
            fn_stream_fence();
            free(f2);
            begin = end;                /* done; the loop below has nothing left */
        }
    }
    for (int64_t o = begin; o < end; o++) {
        int64_t real = load_mask_row(m, p->mask, o, S);
        if (f32 && real == S) {
            const char *xo = p->x.data + o * p->x.stride[0], *dyo = has_dy ? p->dy.data + o * p->dy.stride[0] : NULL;
            char *yo = p->out.data + o * p->out.stride[0];
            if (S == 1) {
                if (o + PREFETCH_ROWS < end) {
                    prefetch_bytes(xo + PREFETCH_ROWS * p->x.stride[0], 4 * C);
                    if (dyo) prefetch_bytes(dyo + PREFETCH_ROWS * p->dy.stride[0], 4 * C);
                }
                combine_line_f32((float *)yo, (const float *)xo, (const float *)dyo, C, f, C, 0, 1);
            } else {
                for (int64_t c = 0; c < C; c++)
                    combine_line_f32((float *)(yo + c * p->out.stride[1]), (const float *)(xo + c * p->x.stride[1]),
                                     dyo ? (const float *)(dyo + c * p->dy.stride[1]) : NULL, S, f, C, c, 0);
            }
            continue;
        }
        if (S == 1) {
            /* one row of C channels */
            fn_load(bx, p->x.data + o * p->x.stride[0], C, p->x.stride[1], p->x.dtype);
            if (has_dy) fn_load(bdy, p->dy.data + o * p->dy.stride[0], C, p->dy.stride[1], p->dy.dtype);
            if (has_dy) {
#pragma omp simd
                for (int64_t c = 0; c < C; c++)
                    bx[c] = p->coef_x[c] * (bx[c] - p->center[c]) + p->coef_dy[c] * bdy[c] + p->shift[c];
            } else {
#pragma omp simd
                for (int64_t c = 0; c < C; c++) bx[c] = p->coef_x[c] * (bx[c] - p->center[c]) + p->shift[c];
            }
            if (!m[0])
                for (int64_t c = 0; c < C; c++) bx[c] = 0.0;
            fn_store(p->out.data + o * p->out.stride[0], bx, C, p->out.stride[1], p->out.dtype);
            continue;
        }
        for (int64_t c = 0; c < C; c++) {
            /* one plane of S positions of channel c */
            fn_load(bx, p->x.data + o * p->x.stride[0] + c * p->x.stride[1], S, p->x.stride[2], p->x.dtype);
            if (has_dy)
                fn_load(bdy, p->dy.data + o * p->dy.stride[0] + c * p->dy.stride[1], S, p->dy.stride[2],
                        p->dy.dtype);
            double cx = p->coef_x[c], mu = p->center[c], sh = p->shift[c], cdy = has_dy ? p->coef_dy[c] : 0.0;
            if (has_dy) {
#pragma omp simd
                for (int64_t i = 0; i < S; i++) bx[i] = cx * (bx[i] - mu) + cdy * bdy[i] + sh;
            } else {
#pragma omp simd
                for (int64_t i = 0; i < S; i++) bx[i] = cx * (bx[i] - mu) + sh;
            }
            for (int64_t i = 0; i < S; i++)
                if (!m[i]) bx[i] = 0.0;
            fn_store(p->out.data + o * p->out.stride[0] + c * p->out.stride[1], bx, S, p->out.stride[2],
                     p->out.dtype);
        }
    }
    free(bx);
    free(m);
    free(f);
    return FN_OK;
}

int channel_combine(fn_view out, fn_view x, const double *center, const double *coef_x,
                    fn_view dy, const double *coef_dy, const double *shift, fn_mask mask,
                    int64_t O, int64_t C, int64_t S, int nthreads)
{
    if (O < 0 || C < 0 || S < 0) return FN_EINVAL;
    channel_args p = {.out = out, .x = x, .dy = dy, .mask = mask, .center = center, .coef_x = coef_x,
                      .coef_dy = coef_dy, .shift = shift, .O = O, .C = C, .S = S,
                      .stream = out.dtype == FN_F32 && fn_streaming_pays(O * C * S, sizeof(float))};
    return fn_parallel_for(channel_parts(nthreads, O, O * C * S), O, combine_slice, &p);
}

/* y = (x - center) * coef + shift over n contiguous floats, in double: a plane whose float
 * arithmetic could overflow (channel_fits_float). y may be x. */
FN_OUT_OF_LINE void scale_shift_in_double(float *y, const float *x, int64_t n, double center, double coef,
                                          double shift)
{
    for (int64_t i = 0; i < n; i++) y[i] = (float)(((double)x[i] - center) * coef + shift);
}

/* channel_normalize_planes_f32: the channels in blocks of at most PLANE_BLOCK_BYTES of x (at least
 * one channel), each block's statistics and then its output while the block is in L2: x is read
 * from memory once instead of twice, and large outputs are streamed (as layer-norm rows are).
 * Threads take whole blocks, so the results do not depend on their number: each channel's planes
 * are merged in o order, as channel_moments with one thread. Measured against the two passes,
 * over the time of a copy: (64, 64, 64, 64) 2 threads 1.50x -> 1.12x, 1 thread 2.6x -> 2.0x;
 * (64, 64, 128, 128) 1.40x -> 1.05x; (32, 64, 64, 64), which stays in the L3 between the two
 * passes, 1.05x -> 1.03x. */
enum { PLANE_BLOCK_BYTES = 1 << 20 };

typedef struct {
    fn_view out, x;
    const double *weight, *bias;
    double *mean, *var, eps;
    int64_t O, C, S, block;          /* block: channels per block */
    int stream;                      /* write out with non-temporal stores */
} planes_args;

FN_VECTOR_CLONES static int normalize_planes_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const planes_args *p = ctx;
    const int64_t O = p->O, S = p->S;
    fn_line_carry carry = {.line = NULL};      /* streamed planes: the line shared with the next one */
    (void)part;
    for (int64_t c0 = begin * p->block; c0 < end * p->block && c0 < p->C; c0 += p->block) {
        const int64_t c1 = c0 + p->block < p->C ? c0 + p->block : p->C;
        for (int64_t c = c0; c < c1; c++) {
            double n = 0.0, mu = 0.0, m2 = 0.0, count = 0.0, mean = 0.0, var = 0.0;
            for (int64_t o = 0; o < O; o++) {
                double pm, pv;
                moments_of_f32((const float *)(p->x.data + o * p->x.stride[0] + c * p->x.stride[1]), S, &pm, &pv);
                merge_moments(&n, &mu, &m2, (double)S, pm, pv * (double)S);
            }
            merge_moments(&count, &mean, &var, n, mu, m2);      /* as channel_moments merges its slice */
            p->mean[c] = count == 0.0 ? NAN : mean;
            p->var[c] = count == 0.0 ? NAN : var / count;
        }
        float f[5 * 64];                 /* (5, block) for combine_line_f32: hi, lo, coef_x, shift, - */
        double coef_of[64];              /* (block) coef_x in double, for planes written in double */
        const int64_t nb = c1 - c0;
        for (int64_t c = c0; c < c1; c++) {
            const double r = rstd_of(p->var[c], p->eps), coef = p->weight ? r * p->weight[c] : r;
            const int64_t j = c - c0;
            coef_of[j] = coef;
            f[j] = (float)p->mean[c];
            f[nb + j] = (float)(p->mean[c] - (double)f[j]);
            f[2 * nb + j] = (float)coef;
            f[3 * nb + j] = p->bias ? (float)p->bias[c] : 0.0f;
            f[4 * nb + j] = 0.0f;
        }
        for (int64_t o = 0; o < O; o++)
            for (int64_t c = c0; c < c1; c++) {
                float *y = (float *)(p->out.data + o * p->out.stride[0] + c * p->out.stride[1]);
                const float *xp = (const float *)(p->x.data + o * p->x.stride[0] + c * p->x.stride[1]);
                const int64_t j = c - c0;
                if (!channel_fits_float(p->mean[c], coef_of[j], 0.0)) {
                    scale_shift_in_double(y, xp, S, p->mean[c], coef_of[j], p->bias ? p->bias[c] : 0.0);
                } else if (p->stream) {
                    const float k[4] = {f[j], f[nb + j], f[2 * nb + j], f[3 * nb + j]};
                    fn_scale_shift_streamed(y, xp, S, k, &carry);
                } else {
                    combine_line_f32(y, xp, NULL, S, f, nb, j, 0);
                }
            }
    }
    fn_line_carry_flush(&carry);
    if (p->stream) fn_stream_fence();
    return FN_OK;
}

int channel_normalize_planes_f32(fn_view out, fn_view x, const double *weight, const double *bias, double eps,
                                 double *mean, double *var, int64_t O, int64_t C, int64_t S, int nthreads)
{
    if (O < 0 || C < 0 || S < 2 || x.dtype != FN_F32 || out.dtype != FN_F32 || x.stride[2] != 4 ||
        out.stride[2] != 4)
        return FN_EINVAL;
    int64_t channel_bytes;
    if (fn_mul_add_size(O * S, sizeof(float), 0, &channel_bytes)) channel_bytes = INT64_MAX;
    int64_t block = channel_bytes > 0 ? PLANE_BLOCK_BYTES / channel_bytes : 64;
    block = block < 1 ? 1 : block > 64 ? 64 : block;
    const int64_t blocks = (C + block - 1) / block;
    planes_args p = {.out = out, .x = x, .weight = weight, .bias = bias, .mean = mean, .var = var, .eps = eps,
                     .O = O, .C = C, .S = S, .block = block,
                     .stream = fn_streaming_pays(O * C * S, sizeof(float))};
    int parts = fn_parts(nthreads, O * C * S);
    return fn_parallel_for(parts > blocks ? (blocks > 0 ? (int)blocks : 1) : parts, blocks, normalize_planes_slice, &p);
}

/* This slice's sums of dy and dy * (x - center) over its real (o, s). */
FN_VECTOR_CLONES static int grad_sums_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const channel_args *p = ctx;
    int64_t C = p->C, S = p->S, line = S == 1 ? C : S;
    double *sum_dy = p->partial + (int64_t)part * 2 * C, *sum_dy_xc = sum_dy + C;
    size_t bx_bytes, m_bytes;
    if (fn_array_bytes(2, line, 1, sizeof(double), &bx_bytes) || fn_array_bytes(1, S, 1, 1, &m_bytes))
        return FN_ENOMEM;
    double *bx = malloc(bx_bytes), *bdy = bx ? bx + line : NULL;
    unsigned char *m = malloc(m_bytes);
    if (!bx || !m) {
        free(bx);
        free(m);
        return FN_ENOMEM;
    }
    const int line_dim = S == 1 ? 1 : 2;
    const int f32 = p->x.dtype == FN_F32 && p->dy.dtype == FN_F32 && p->x.stride[line_dim] == 4 &&
                    p->dy.stride[line_dim] == 4;
    for (int64_t c = 0; c < C; c++) sum_dy[c] = sum_dy_xc[c] = 0.0;
    for (int64_t o = begin; o < end; o++) {
        if (f32 && S == 1 && !p->mask.data && o + 4 <= end) {
            /* four contiguous float32 rows of x and dy: one update of the sums per four rows */
            const char *x0 = p->x.data + o * p->x.stride[0], *g0 = p->dy.data + o * p->dy.stride[0];
            const ptrdiff_t sx = p->x.stride[0], sg = p->dy.stride[0];
            const float *xa = (const float *)x0, *xb = (const float *)(x0 + sx), *xc = (const float *)(x0 + 2 * sx),
                        *xd = (const float *)(x0 + 3 * sx);
            const float *ga = (const float *)g0, *gb = (const float *)(g0 + sg), *gc = (const float *)(g0 + 2 * sg),
                        *gd = (const float *)(g0 + 3 * sg);
            if (o + 4 + PREFETCH_ROWS < end)
                for (int j = 0; j < 4; j++) {
                    prefetch_bytes(x0 + (PREFETCH_ROWS + j) * sx, 4 * C);
                    prefetch_bytes(g0 + (PREFETCH_ROWS + j) * sg, 4 * C);
                }
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                const double mu = p->center[c];
                double a = ga[c], b = gb[c], cc = gc[c], d = gd[c];
                sum_dy[c] += (a + b) + (cc + d);
                sum_dy_xc[c] += (a * ((double)xa[c] - mu) + b * ((double)xb[c] - mu)) +
                                (cc * ((double)xc[c] - mu) + d * ((double)xd[c] - mu));
            }
            o += 3;
            continue;
        }
        int64_t real = load_mask_row(m, p->mask, o, S);
        if (real == 0) continue;
        if (f32 && real == S) {         /* contiguous float32 lines, read in place */
            const char *xo = p->x.data + o * p->x.stride[0], *dyo = p->dy.data + o * p->dy.stride[0];
            if (S == 1) {
                const float *xr = (const float *)xo, *dyr = (const float *)dyo;
#pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    double d = (double)dyr[c];
                    sum_dy[c] += d;
                    sum_dy_xc[c] += d * ((double)xr[c] - p->center[c]);
                }
                continue;
            }
            for (int64_t c = 0; c < C; c++) {
                const float *xr = (const float *)(xo + c * p->x.stride[1]), *dyr = (const float *)(dyo + c * p->dy.stride[1]);
                double sd = 0.0, sxc = 0.0, mu = p->center[c];
#pragma omp simd reduction(+ : sd, sxc)
                for (int64_t i = 0; i < S; i++) {
                    sd += (double)dyr[i];
                    sxc += (double)dyr[i] * ((double)xr[i] - mu);
                }
                sum_dy[c] += sd;
                sum_dy_xc[c] += sxc;
            }
            continue;
        }
        if (S == 1) {
            fn_load(bx, p->x.data + o * p->x.stride[0], C, p->x.stride[1], p->x.dtype);
            fn_load(bdy, p->dy.data + o * p->dy.stride[0], C, p->dy.stride[1], p->dy.dtype);
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                sum_dy[c] += bdy[c];
                sum_dy_xc[c] += bdy[c] * (bx[c] - p->center[c]);
            }
            continue;
        }
        for (int64_t c = 0; c < C; c++) {
            fn_load(bx, p->x.data + o * p->x.stride[0] + c * p->x.stride[1], S, p->x.stride[2], p->x.dtype);
            fn_load(bdy, p->dy.data + o * p->dy.stride[0] + c * p->dy.stride[1], S, p->dy.stride[2], p->dy.dtype);
            double s = 0.0, sxc = 0.0, mu = p->center[c];
#pragma omp simd reduction(+ : s, sxc)
            for (int64_t i = 0; i < S; i++) {
                s += m[i] ? bdy[i] : 0.0;
                sxc += m[i] ? bdy[i] * (bx[i] - mu) : 0.0;
            }
            sum_dy[c] += s;
            sum_dy_xc[c] += sxc;
        }
    }
    free(bx);
    free(m);
    return FN_OK;
}

int channel_grad_sums(double *sum_dy, double *sum_dy_xc, fn_view dy, fn_view x,
                      const double *center, fn_mask mask, int64_t O, int64_t C, int64_t S, int nthreads)
{
    if (O < 0 || C < 0 || S < 0) return FN_EINVAL;
    int parts = channel_parts(nthreads, O, O * C * S);
    size_t partial_bytes;
    if (fn_array_bytes(2 * (int64_t)parts, C, 1, sizeof(double), &partial_bytes)) return FN_ENOMEM;
    double *partial = malloc(partial_bytes);
    if (!partial) return FN_ENOMEM;
    channel_args p = {.x = x, .dy = dy, .mask = mask, .center = center, .partial = partial, .O = O, .C = C, .S = S};
    int status = fn_parallel_for(parts, O, grad_sums_slice, &p);
    for (int64_t c = 0; c < C; c++) {
        double s = 0.0, sxc = 0.0;
        for (int q = 0; q < parts; q++) s += partial[(int64_t)q * 2 * C + c], sxc += partial[(int64_t)q * 2 * C + C + c];
        sum_dy[c] = s;
        sum_dy_xc[c] = sxc;
    }
    free(partial);
    return status;
}
