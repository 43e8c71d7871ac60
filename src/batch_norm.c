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
 * (count, mean, m2): one pass of sums shifted by the block's first real row (contiguous float32
 * rows read in place, four at a time where no mask intervenes); a column whose
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
        const char *r0 = x.data + o * x.stride[0];
        if (f32_rows && !mask.data && o + 4 <= o0 + nrows) {
            if (o + 4 + PREFETCH_ROWS < o0 + nrows)
                for (int j = 0; j < 4; j++) prefetch_bytes(r0 + (PREFETCH_ROWS + j) * x.stride[0], 4 * C);
            add_shifted_four_rows_f32(r0, x.stride[0], C, shift, sd, sdd);
            nb += 3, o += 3;
        } else if (f32_rows) {
            add_shifted_row_f32((const float *)r0, C, shift, sd, sdd);
        } else {
            fn_load(row, r0, C, x.stride[1], x.dtype);
            add_shifted_row(row, C, shift, sd, sdd);
        }
    }
    for (int64_t c = 0; nb > 0 && c < C; c++) {
        double bmean, bvar;
        finish_moments(shift[c], sd[c], sdd[c], nb, &bmean, &bvar);
        if (!shift_was_near(sd[c], nb, bvar))           /* far shift (or NaN): shift by the mean */
            column_moments_again(bmean, x, mask, o0, nrows, c, nb, &bmean, &bvar);
        merge_moments(&count[c], &mean[c], &m2[c], (double)nb, bmean, bvar * (double)nb);
    }
}

/* Everything a slice of outer indices o needs; shared read-only by the threads of one call. */
typedef struct {
    fn_view out, x, dy;
    fn_mask mask;
    const double *center, *coef_x, *coef_dy, *shift;
    const fn_channel_coefs *f;       /* channel_combine's float coefficients (float paths) */
    double *partial;                 /* per slice: (count, mean, m2) or (sum_dy, sum_dy_xc), C each */
    int64_t O, C, S;
    int path;                        /* channel_combine: enum combine_path */
} channel_args;

/* The planes of row o (S > 1), real positions m (n of them), merged into (count, mean, m2):
 * contiguous float32 planes with no padding read in place, others through the buffer (2S doubles). */
FN_INLINE void merge_planes(const channel_args *p, int64_t o, const unsigned char *m, int64_t n, double *buf,
                            double *count, double *mean, double *m2)
{
    const int64_t S = p->S;
    const int f32_planes = p->x.dtype == FN_F32 && p->x.stride[2] == 4;
    double *real = buf + S;
    for (int64_t c = 0; c < p->C; c++) {
        const char *src = p->x.data + o * p->x.stride[0] + c * p->x.stride[1];
        double pm, pv;
        if (f32_planes && n == S) {
            moments_of_f32((const float *)src, S, &pm, &pv);
        } else {
            fn_load(buf, src, S, p->x.stride[2], p->x.dtype);
            if (n < S)
                for (int64_t i = 0, j = 0; i < S; i++)
                    if (m[i]) real[j++] = buf[i];
            moments_of(n < S ? real : buf, n, &pm, &pv);
        }
        merge_moments(&count[c], &mean[c], &m2[c], (double)n, pm, pv * (double)n);
    }
}

/* Statistics of rows/planes o in [begin, end) into this slice's (count, mean, m2). */
FN_VECTOR_CLONES static int moments_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const channel_args *p = ctx;
    const int64_t C = p->C, S = p->S, rows = rows_per_block(C);
    double *count = p->partial + (int64_t)part * 3 * C, *mean = count + C, *m2 = mean + C;
    size_t bytes;
    /* rows: a row and 3C of shifted sums; planes: a plane and its real elements; then the mask row */
    double *buf = fn_array_bytes(S == 1 ? 4 : 2, S == 1 ? C : S, S + 1, sizeof(double), &bytes) ? NULL : malloc(bytes);
    if (!buf) return FN_ENOMEM;
    unsigned char *m = (unsigned char *)(buf + (S == 1 ? 4 * C : 2 * S));
    for (int64_t c = 0; c < C; c++) count[c] = mean[c] = m2[c] = 0.0;
    for (int64_t o = begin; S == 1 && o < end; o += rows)
        merge_block_columns(count, mean, m2, buf, buf + C, p->x, p->mask, o, end - o < rows ? end - o : rows, C);
    for (int64_t o = begin; S > 1 && o < end; o++) {
        const int64_t n = load_mask_row(m, p->mask, o, S);
        if (n > 0) merge_planes(p, o, m, n, buf, count, mean, m2);
    }
    free(buf);
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
    if (O < 0 || C < 0 || S < 0 || !fn_dtype_size(x.dtype)) return FN_EINVAL;
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

/* Whether channel c may be combined in float arithmetic: |center| and the coefficients at most
 * 2^100, so neither x - center nor a coefficient can overflow a float, and coef_x 0 or at least
 * 2^-100, so it keeps its precision (as float_arithmetic_fits in moments.h). NaN passes: it gives
 * NaN either way. Otherwise the call computes in double. */
FN_INLINE int channel_fits_float(double center, double coef_x, double coef_dy)
{
    const double cx = fabs(coef_x);
    return !(fabs(center) > 0x1p100 || cx > 0x1p100 || fabs(coef_dy) > 0x1p100 || (cx > 0.0 && cx < 0x1p-100));
}

enum combine_path {
    CMB_F32_STREAMED,                /* contiguous float32 rows of C >= 16, no mask, large: one streamed pass */
    CMB_F32,                         /* contiguous float32 lines in float (lines with padding: buffered) */
    CMB_BUFFERED                     /* every line through double buffers */
};

/* The float coefficients of every channel (fn_channel_coefs), made once per call. Each array holds
 * 2C values, the C channels twice over (the streamed rows read 16 channels from any c < C). */
static float *channel_coefs_make(fn_channel_coefs *f, const channel_args *p)
{
    size_t bytes;
    float *all = fn_array_bytes(10, p->C, 1, sizeof(float), &bytes) ? NULL : malloc(bytes);
    const int64_t C = p->C;
    if (!all) return NULL;
    *f = (fn_channel_coefs){all, all + 2 * C, all + 4 * C, all + 6 * C, all + 8 * C};
    for (int64_t c = 0; c < 2 * C; c++) {
        const fn_scale_shift k = fn_scale_shift_of(p->center[c % C], p->coef_x[c % C], p->shift[c % C],
                                                   p->dy.data ? p->coef_dy[c % C] : 0.0);
        f->mu_hi[c] = k.mu_hi, f->mu_lo[c] = k.mu_lo, f->scale[c] = k.scale, f->shift[c] = k.shift;
        f->scale_dy[c] = k.scale_dy;
    }
    return all;
}

/* Row o of C channels in float: out = fn_scale_shift(_dy)_at of each channel's coefficients; the
 * row PREFETCH_ROWS ahead is prefetched. */
FN_INLINE void combine_row_f32(const channel_args *p, int64_t o, int64_t end)
{
    const int64_t C = p->C;
    const char *xo = p->x.data + o * p->x.stride[0], *dyo = p->dy.data ? p->dy.data + o * p->dy.stride[0] : NULL;
    const float *x = (const float *)xo, *dy = (const float *)dyo;
    float *y = (float *)(p->out.data + o * p->out.stride[0]);
    if (o + PREFETCH_ROWS < end) {
        prefetch_bytes(xo + PREFETCH_ROWS * p->x.stride[0], 4 * C);
        if (dyo) prefetch_bytes(dyo + PREFETCH_ROWS * p->dy.stride[0], 4 * C);
    }
    if (dy) {
#pragma omp simd
        for (int64_t c = 0; c < C; c++) y[c] = fn_scale_shift_dy_at(fn_channel_at(p->f, c), x[c], dy[c]);
    } else {
#pragma omp simd
        for (int64_t c = 0; c < C; c++) y[c] = fn_scale_shift_at(fn_channel_at(p->f, c), x[c]);
    }
}

/* Plane (o, c) of S positions in float. */
FN_INLINE void combine_plane_f32(float *y, const float *x, const float *dy, int64_t S, fn_scale_shift k)
{
    if (dy) {
#pragma omp simd
        for (int64_t i = 0; i < S; i++) y[i] = fn_scale_shift_dy_at(k, x[i], dy[i]);
    } else {
#pragma omp simd
        for (int64_t i = 0; i < S; i++) y[i] = fn_scale_shift_at(k, x[i]);
    }
}

/* A row of C channels in the double buffers: bx = fn_combine(_dy)_f64_at, 0 if the row is padding. */
FN_INLINE void combine_row_doubles(const channel_args *p, double *bx, const double *bdy, int real)
{
    const double *mu = p->center, *cx = p->coef_x, *cdy = p->coef_dy, *sh = p->shift;
    if (bdy) {
#pragma omp simd
        for (int64_t c = 0; c < p->C; c++) bx[c] = fn_combine_dy_f64_at(mu[c], cx[c], cdy[c], sh[c], bx[c], bdy[c]);
    } else {
#pragma omp simd
        for (int64_t c = 0; c < p->C; c++) bx[c] = fn_combine_f64_at(mu[c], cx[c], sh[c], bx[c]);
    }
    for (int64_t c = 0; !real && c < p->C; c++) bx[c] = 0.0;
}

/* A plane of channel c in the double buffers, 0 at its padding (m). */
FN_INLINE void combine_plane_doubles(const channel_args *p, int64_t c, double *bx, const double *bdy,
                                     const unsigned char *m)
{
    const double mu = p->center[c], cx = p->coef_x[c], sh = p->shift[c];
    if (bdy) {
        const double cdy = p->coef_dy[c];
#pragma omp simd
        for (int64_t i = 0; i < p->S; i++) bx[i] = fn_combine_dy_f64_at(mu, cx, cdy, sh, bx[i], bdy[i]);
    } else {
#pragma omp simd
        for (int64_t i = 0; i < p->S; i++) bx[i] = fn_combine_f64_at(mu, cx, sh, bx[i]);
    }
    for (int64_t i = 0; i < p->S; i++)
        if (!m[i]) bx[i] = 0.0;
}

/* Row or planes o through the double buffers (bx, bdy: a line each), padding 0. */
FN_INLINE void combine_buffered(const channel_args *p, int64_t o, double *bx, double *bdy, const unsigned char *m)
{
    const int64_t C = p->C, S = p->S;
    const int has_dy = p->dy.data != NULL;
    if (S == 1) {
        fn_load(bx, p->x.data + o * p->x.stride[0], C, p->x.stride[1], p->x.dtype);
        if (has_dy) fn_load(bdy, p->dy.data + o * p->dy.stride[0], C, p->dy.stride[1], p->dy.dtype);
        combine_row_doubles(p, bx, has_dy ? bdy : NULL, m[0]);
        fn_store(p->out.data + o * p->out.stride[0], bx, C, p->out.stride[1], p->out.dtype);
        return;
    }
    for (int64_t c = 0; c < C; c++) {
        fn_load(bx, p->x.data + o * p->x.stride[0] + c * p->x.stride[1], S, p->x.stride[2], p->x.dtype);
        if (has_dy)
            fn_load(bdy, p->dy.data + o * p->dy.stride[0] + c * p->dy.stride[1], S, p->dy.stride[2], p->dy.dtype);
        combine_plane_doubles(p, c, bx, has_dy ? bdy : NULL, m);
        fn_store(p->out.data + o * p->out.stride[0] + c * p->out.stride[1], bx, S, p->out.stride[2], p->out.dtype);
    }
}

/* out = coef_x * (x - center) + coef_dy * dy + shift for rows/planes o in [begin, end). */
FN_VECTOR_CLONES static int combine_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const channel_args *p = ctx;
    const int64_t C = p->C, S = p->S, line = S == 1 ? C : S;     /* elements per load: a row, or a plane */
    (void)part;
    if (p->path == CMB_F32_STREAMED) {
        fn_combine_rows_streamed((float *)(p->out.data + begin * p->out.stride[0]),
                                 (const float *)(p->x.data + begin * p->x.stride[0]),
                                 p->dy.data ? (const float *)(p->dy.data + begin * p->dy.stride[0]) : NULL,
                                 (end - begin) * C, C, p->f);
        fn_stream_fence();
        return FN_OK;
    }
    size_t bytes;
    double *bx = fn_array_bytes(2, line, S + 1, sizeof(double), &bytes) ? NULL : malloc(bytes);
    if (!bx) return FN_ENOMEM;
    double *bdy = bx + line;
    unsigned char *m = (unsigned char *)(bdy + line);
    for (int64_t o = begin; o < end; o++) {
        const int64_t real = load_mask_row(m, p->mask, o, S);
        if (p->path == CMB_BUFFERED || real < S) {
            combine_buffered(p, o, bx, bdy, m);
        } else if (S == 1) {
            combine_row_f32(p, o, end);
        } else {
            const char *xo = p->x.data + o * p->x.stride[0], *dyo = p->dy.data ? p->dy.data + o * p->dy.stride[0] : NULL;
            char *yo = p->out.data + o * p->out.stride[0];
            for (int64_t c = 0; c < C; c++)
                combine_plane_f32((float *)(yo + c * p->out.stride[1]), (const float *)(xo + c * p->x.stride[1]),
                                  dyo ? (const float *)(dyo + c * p->dy.stride[1]) : NULL, S, fn_channel_at(p->f, c));
        }
    }
    free(bx);
    return FN_OK;
}

/* The path of a channel_combine call, chosen once. */
static enum combine_path combine_path_of(const channel_args *p)
{
    const int line_dim = p->S == 1 ? 1 : 2, has_dy = p->dy.data != NULL;
    int f32 = p->x.dtype == FN_F32 && p->out.dtype == FN_F32 && p->x.stride[line_dim] == 4 &&
              p->out.stride[line_dim] == 4 && (!has_dy || (p->dy.dtype == FN_F32 && p->dy.stride[line_dim] == 4));
    for (int64_t c = 0; f32 && c < p->C; c++)
        f32 = channel_fits_float(p->center[c], p->coef_x[c], has_dy ? p->coef_dy[c] : 0.0);
    if (!f32) return CMB_BUFFERED;
    const int64_t row = 4 * p->C;
    const int rows = p->S == 1 && p->C >= 16 && !p->mask.data && p->x.stride[0] == row && p->out.stride[0] == row &&
                     (!has_dy || p->dy.stride[0] == row);
    return rows && fn_streaming_pays(p->O * p->C, sizeof(float)) ? CMB_F32_STREAMED : CMB_F32;
}

int channel_combine(fn_view out, fn_view x, const double *center, const double *coef_x,
                    fn_view dy, const double *coef_dy, const double *shift, fn_mask mask,
                    int64_t O, int64_t C, int64_t S, int nthreads)
{
    if (O < 0 || C < 0 || S < 0 || !fn_dtype_size(out.dtype) || !fn_dtype_size(x.dtype) ||
        (dy.data && !fn_dtype_size(dy.dtype)))
        return FN_EINVAL;
    fn_channel_coefs f;
    channel_args p = {.out = out, .x = x, .dy = dy, .mask = mask, .center = center, .coef_x = coef_x,
                      .coef_dy = coef_dy, .shift = shift, .f = &f, .O = O, .C = C, .S = S};
    p.path = combine_path_of(&p);
    float *owned = p.path == CMB_BUFFERED ? NULL : channel_coefs_make(&f, &p);
    if (p.path != CMB_BUFFERED && !owned) return FN_ENOMEM;
    const int status = fn_parallel_for(channel_parts(nthreads, O, O * C * S), O, combine_slice, &p);
    free(owned);
    return status;
}

/* y = fn_scale_shift_f64_at over n contiguous floats, in double: a plane whose float arithmetic
 * could overflow (channel_fits_float). y may be x. */
FN_OUT_OF_LINE void scale_shift_in_double(float *y, const float *x, int64_t n, double center, double coef,
                                          double shift)
{
    for (int64_t i = 0; i < n; i++) y[i] = (float)fn_scale_shift_f64_at(center, coef, shift, x[i]);
}

/* channel_normalize_planes_f32: the channels in blocks of at most PLANE_BLOCK_BYTES of x (at least
 * one channel, at most 64), each block's statistics and then its output while the block is in
 * cache, so that x is read from memory once instead of twice; large outputs are streamed. Threads
 * take whole blocks, so the results do not depend on their number: each channel's planes are
 * merged in o order, as channel_moments with one thread. A constant block size: from 128 KiB to
 * 8 MiB it made no difference (docs/performance.md). */
enum { PLANE_BLOCK_BYTES = 1 << 20, PLANE_BLOCK_CHANNELS = 64 };

typedef struct {
    fn_view out, x;
    const double *weight, *bias;
    double *mean, *var, eps;
    int64_t O, C, S, block;          /* block: channels per block */
    int stream;                      /* write out with non-temporal stores */
} planes_args;

/* The channel after the last of block b (blocks of `block` channels out of C). */
FN_INLINE int64_t block_end(int64_t b, int64_t block, int64_t C)
{
    return (b + 1) * block < C ? (b + 1) * block : C;
}

/* Channels per block: PLANE_BLOCK_BYTES of `arrays` float32 planes (O, S) per channel, at least
 * one channel and at most PLANE_BLOCK_CHANNELS. */
static int64_t plane_block_channels(int64_t O, int64_t S, int arrays)
{
    int64_t channel_bytes;
    if (fn_mul_add_size(O * S, arrays * (int64_t)sizeof(float), 0, &channel_bytes)) channel_bytes = INT64_MAX;
    const int64_t block = channel_bytes > 0 ? PLANE_BLOCK_BYTES / channel_bytes : PLANE_BLOCK_CHANNELS;
    return block < 1 ? 1 : block > PLANE_BLOCK_CHANNELS ? PLANE_BLOCK_CHANNELS : block;
}

/* The running moments of one block's channels, plane by plane in o order. */
typedef struct {
    double n[PLANE_BLOCK_CHANNELS], mu[PLANE_BLOCK_CHANNELS], m2[PLANE_BLOCK_CHANNELS];
} block_sums;
static const block_sums no_sums;           /* all zero */

/* Plane o of channels [c0, c1) merged into s. */
FN_INLINE void block_moments_add(const planes_args *p, int64_t c0, int64_t c1, int64_t o, block_sums *s)
{
    for (int64_t c = c0; c < c1; c++) {
        double pm, pv;
        moments_of_f32((const float *)(p->x.data + o * p->x.stride[0] + c * p->x.stride[1]), p->S, &pm, &pv);
        merge_moments(&s->n[c - c0], &s->mu[c - c0], &s->m2[c - c0], (double)p->S, pm, pv * (double)p->S);
    }
}

/* mean and var of channels [c0, c1) from their merged planes. */
FN_INLINE void block_moments_finish(const planes_args *p, int64_t c0, int64_t c1, const block_sums *s)
{
    for (int64_t c = c0; c < c1; c++) {
        double count = 0.0, mean = 0.0, var = 0.0;
        merge_moments(&count, &mean, &var, s->n[c - c0], s->mu[c - c0], s->m2[c - c0]);  /* as channel_moments merges its slice */
        p->mean[c] = count == 0.0 ? NAN : mean;
        p->var[c] = count == 0.0 ? NAN : var / count;
    }
}

/* Plane o of the output of channels [c0, c1), whose coefficients are k and coef (rstd * weight in
 * double, for the fallback): in float (streamed when large) or, where float could overflow, in double. */
FN_INLINE void block_output_plane(const planes_args *p, int64_t c0, int64_t c1, int64_t o, const fn_scale_shift *k,
                                  const double *coef, fn_line_carry *carry)
{
    for (int64_t c = c0; c < c1; c++) {
        float *y = (float *)(p->out.data + o * p->out.stride[0] + c * p->out.stride[1]);
        const float *x = (const float *)(p->x.data + o * p->x.stride[0] + c * p->x.stride[1]);
        if (!channel_fits_float(p->mean[c], coef[c - c0], 0.0))
            scale_shift_in_double(y, x, p->S, p->mean[c], coef[c - c0], p->bias ? p->bias[c] : 0.0);
        else if (p->stream)
            fn_scale_shift_streamed(y, x, NULL, p->S, k[c - c0], carry);
        else
            combine_plane_f32(y, x, NULL, p->S, k[c - c0]);
    }
}

/* The blocks [first, last) of a slice, software-pipelined: while block b's output is written,
 * plane by plane, the statistics of block b + 1 are read plane by plane, so that reads from
 * memory and writes overlap as in a copy; block b's x is still in cache when its output reads it. */
FN_VECTOR_CLONES static int normalize_planes_slice(void *ctx, int64_t first, int64_t last, int part)
{
    const planes_args *p = ctx;
    fn_line_carry carry = {.line = NULL};      /* streamed planes: the line shared with the next one */
    fn_scale_shift k[PLANE_BLOCK_CHANNELS];
    double coef[PLANE_BLOCK_CHANNELS];
    block_sums sums = no_sums;
    (void)part;
    for (int64_t o = 0; first < last && o < p->O; o++)
        block_moments_add(p, first * p->block, block_end(first, p->block, p->C), o, &sums);
    for (int64_t b = first; b < last; b++) {
        const int64_t c0 = b * p->block, c1 = block_end(b, p->block, p->C), has_next = b + 1 < last;
        block_moments_finish(p, c0, c1, &sums);
        for (int64_t c = c0; c < c1; c++) {
            coef[c - c0] = rstd_of(p->var[c], p->eps) * (p->weight ? p->weight[c] : 1.0);
            k[c - c0] = fn_scale_shift_of(p->mean[c], coef[c - c0], p->bias ? p->bias[c] : 0.0, 0.0);
        }
        sums = no_sums;
        for (int64_t o = 0; o < p->O; o++) {
            block_output_plane(p, c0, c1, o, k, coef, &carry);
            if (has_next) block_moments_add(p, c1, block_end(b + 1, p->block, p->C), o, &sums);
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
    const int64_t block = plane_block_channels(O, S, 1);
    planes_args p = {.out = out, .x = x, .weight = weight, .bias = bias, .mean = mean, .var = var, .eps = eps,
                     .O = O, .C = C, .S = S, .block = block,
                     .stream = fn_streaming_pays(O * C * S, sizeof(float))};
    return fn_parallel_for(fn_parts(nthreads, O * C * S), (C + block - 1) / block, normalize_planes_slice, &p);
}

/* The gradient sums of four contiguous float32 rows o..o+3 of x and dy (no mask), added into sum_dy,
 * sum_dy_xc (C): one update of the sums per four rows. */
FN_INLINE void grad_sums_four_rows_f32(const channel_args *p, int64_t o, int64_t end, double *sum_dy, double *sum_dy_xc)
{
    const char *x0 = p->x.data + o * p->x.stride[0], *g0 = p->dy.data + o * p->dy.stride[0];
    const ptrdiff_t sx = p->x.stride[0], sg = p->dy.stride[0];
    const float *xa = (const float *)x0, *xb = (const float *)(x0 + sx), *xc = (const float *)(x0 + 2 * sx),
                *xd = (const float *)(x0 + 3 * sx);
    const float *ga = (const float *)g0, *gb = (const float *)(g0 + sg), *gc = (const float *)(g0 + 2 * sg),
                *gd = (const float *)(g0 + 3 * sg);
    if (o + 4 + PREFETCH_ROWS < end)
        for (int j = 0; j < 4; j++) {
            prefetch_bytes(x0 + (PREFETCH_ROWS + j) * sx, 4 * p->C);
            prefetch_bytes(g0 + (PREFETCH_ROWS + j) * sg, 4 * p->C);
        }
#pragma omp simd
    for (int64_t c = 0; c < p->C; c++) {
        const double mu = p->center[c];
        double a = ga[c], b = gb[c], cc = gc[c], d = gd[c];
        sum_dy[c] += (a + b) + (cc + d);
        sum_dy_xc[c] += (a * ((double)xa[c] - mu) + b * ((double)xb[c] - mu)) +
                        (cc * ((double)xc[c] - mu) + d * ((double)xd[c] - mu));
    }
}

/* The sums of dy and dy * (x - mu) over one contiguous float32 plane of S positions. */
FN_INLINE void plane_grad_sums_f32(const float *x, const float *dy, int64_t S, double mu, double *sum_dy,
                                   double *sum_dy_xc)
{
    double sd = 0.0, sxc = 0.0;
#pragma omp simd reduction(+ : sd, sxc)
    for (int64_t i = 0; i < S; i++) {
        sd += (double)dy[i];
        sxc += (double)dy[i] * ((double)x[i] - mu);
    }
    *sum_dy = sd;
    *sum_dy_xc = sxc;
}

/* The gradient sums of row or planes o, contiguous float32 lines with no padding, read in place. */
FN_INLINE void grad_sums_f32(const channel_args *p, int64_t o, double *sum_dy, double *sum_dy_xc)
{
    const char *xo = p->x.data + o * p->x.stride[0], *dyo = p->dy.data + o * p->dy.stride[0];
    if (p->S == 1) {
        const float *xr = (const float *)xo, *dyr = (const float *)dyo;
#pragma omp simd
        for (int64_t c = 0; c < p->C; c++) {
            double d = (double)dyr[c];
            sum_dy[c] += d;
            sum_dy_xc[c] += d * ((double)xr[c] - p->center[c]);
        }
        return;
    }
    for (int64_t c = 0; c < p->C; c++) {
        double sd, sxc;
        plane_grad_sums_f32((const float *)(xo + c * p->x.stride[1]), (const float *)(dyo + c * p->dy.stride[1]),
                            p->S, p->center[c], &sd, &sxc);
        sum_dy[c] += sd;
        sum_dy_xc[c] += sxc;
    }
}

/* The gradient sums of row or planes o through the double buffers bx, bdy, real positions m only. */
FN_INLINE void grad_sums_buffered(const channel_args *p, int64_t o, double *bx, double *bdy, const unsigned char *m,
                                  double *sum_dy, double *sum_dy_xc)
{
    if (p->S == 1) {
        fn_load(bx, p->x.data + o * p->x.stride[0], p->C, p->x.stride[1], p->x.dtype);
        fn_load(bdy, p->dy.data + o * p->dy.stride[0], p->C, p->dy.stride[1], p->dy.dtype);
#pragma omp simd
        for (int64_t c = 0; c < p->C; c++) {
            sum_dy[c] += bdy[c];
            sum_dy_xc[c] += bdy[c] * (bx[c] - p->center[c]);
        }
        return;
    }
    for (int64_t c = 0; c < p->C; c++) {
        fn_load(bx, p->x.data + o * p->x.stride[0] + c * p->x.stride[1], p->S, p->x.stride[2], p->x.dtype);
        fn_load(bdy, p->dy.data + o * p->dy.stride[0] + c * p->dy.stride[1], p->S, p->dy.stride[2], p->dy.dtype);
        double s = 0.0, sxc = 0.0, mu = p->center[c];
#pragma omp simd reduction(+ : s, sxc)
        for (int64_t i = 0; i < p->S; i++) {
            s += m[i] ? bdy[i] : 0.0;
            sxc += m[i] ? bdy[i] * (bx[i] - mu) : 0.0;
        }
        sum_dy[c] += s;
        sum_dy_xc[c] += sxc;
    }
}

/* This slice's sums of dy and dy * (x - center) over its real (o, s). */
FN_VECTOR_CLONES static int grad_sums_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const channel_args *p = ctx;
    const int64_t C = p->C, S = p->S, line = S == 1 ? C : S;
    double *sum_dy = p->partial + (int64_t)part * 2 * C, *sum_dy_xc = sum_dy + C;
    const int line_dim = S == 1 ? 1 : 2;
    const int f32 = p->x.dtype == FN_F32 && p->dy.dtype == FN_F32 && p->x.stride[line_dim] == 4 &&
                    p->dy.stride[line_dim] == 4;
    size_t bytes;
    double *bx = fn_array_bytes(2, line, S + 1, sizeof(double), &bytes) ? NULL : malloc(bytes);
    if (!bx) return FN_ENOMEM;
    double *bdy = bx + line;
    unsigned char *m = (unsigned char *)(bdy + line);
    for (int64_t c = 0; c < C; c++) sum_dy[c] = sum_dy_xc[c] = 0.0;
    for (int64_t o = begin; o < end; o++) {
        if (f32 && S == 1 && !p->mask.data && o + 4 <= end) {
            grad_sums_four_rows_f32(p, o, end, sum_dy, sum_dy_xc);
            o += 3;
            continue;
        }
        const int64_t real = load_mask_row(m, p->mask, o, S);
        if (real == 0) continue;
        if (f32 && real == S) grad_sums_f32(p, o, sum_dy, sum_dy_xc);
        else grad_sums_buffered(p, o, bx, bdy, m, sum_dy, sum_dy_xc);
    }
    free(bx);
    return FN_OK;
}

int channel_grad_sums(double *sum_dy, double *sum_dy_xc, fn_view dy, fn_view x,
                      const double *center, fn_mask mask, int64_t O, int64_t C, int64_t S, int nthreads)
{
    if (O < 0 || C < 0 || S < 0 || !fn_dtype_size(dy.dtype) || !fn_dtype_size(x.dtype)) return FN_EINVAL;
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

/* channel_backward_planes_f32: the gradient sums of a block of channels, then its dx while the
 * block is in cache, the next block's sums read while this block's dx is written (as
 * channel_normalize_planes_f32 does forward). Threads take whole blocks. Each channel's sums keep
 * channel_grad_sums' bits: its slices of o (`parts` of them) summed apart, then added in order. */
typedef struct {
    fn_view dx, dy, x;
    const double *mean, *rstd, *wr;
    double *sum_dy, *sum_dy_xc, n;
    int64_t O, C, S, block;
    int parts;                       /* channel_grad_sums' slices of o */
    int stream;                      /* write dx with non-temporal stores */
} grad_planes_args;

/* The running sums of one block's channels: the current slice's and the total of those before. */
typedef struct {
    double dy[PLANE_BLOCK_CHANNELS], dy_xc[PLANE_BLOCK_CHANNELS];
    double total_dy[PLANE_BLOCK_CHANNELS], total_dy_xc[PLANE_BLOCK_CHANNELS];
    int part;                        /* the slice of o being summed */
} grad_block_sums;
static const grad_block_sums no_grad_sums;  /* all zero */

/* Plane o of channels [c0, c1) added into s; at a slice's start the slice before goes into the total. */
FN_INLINE void grad_block_add(const grad_planes_args *p, int64_t c0, int64_t c1, int64_t o, grad_block_sums *s)
{
    if (s->part + 1 < p->parts && o == fn_slice_start(p->O, s->part + 1, p->parts)) {
        for (int64_t j = 0; j < c1 - c0; j++)
            s->total_dy[j] += s->dy[j], s->total_dy_xc[j] += s->dy_xc[j], s->dy[j] = s->dy_xc[j] = 0.0;
        s->part++;
    }
    for (int64_t c = c0; c < c1; c++) {
        double sd, sxc;
        plane_grad_sums_f32((const float *)(p->x.data + o * p->x.stride[0] + c * p->x.stride[1]),
                            (const float *)(p->dy.data + o * p->dy.stride[0] + c * p->dy.stride[1]), p->S,
                            p->mean[c], &sd, &sxc);
        s->dy[c - c0] += sd;
        s->dy_xc[c - c0] += sxc;
    }
}

/* Plane o of dx for channels [c0, c1): in float, or in double where float could overflow. */
FN_INLINE void grad_block_dx(const grad_planes_args *p, int64_t c0, int64_t c1, int64_t o, const double *coef_x,
                             const double *shift, fn_line_carry *carry)
{
    for (int64_t c = c0; c < c1; c++) {
        const int64_t j = c - c0;
        float *dx = (float *)(p->dx.data + o * p->dx.stride[0] + c * p->dx.stride[1]);
        const float *x = (const float *)(p->x.data + o * p->x.stride[0] + c * p->x.stride[1]);
        const float *dy = (const float *)(p->dy.data + o * p->dy.stride[0] + c * p->dy.stride[1]);
        const fn_scale_shift k = fn_scale_shift_of(p->mean[c], coef_x[j], shift[j], p->wr[c]);
        if (channel_fits_float(p->mean[c], coef_x[j], p->wr[c])) {
            if (p->stream) fn_scale_shift_streamed(dx, x, dy, p->S, k, carry);
            else combine_plane_f32(dx, x, dy, p->S, k);
            continue;
        }
        for (int64_t i = 0; i < p->S; i++)
            dx[i] = (float)fn_combine_dy_f64_at(p->mean[c], coef_x[j], p->wr[c], shift[j], x[i], dy[i]);
    }
}

FN_VECTOR_CLONES static int grad_planes_slice(void *ctx, int64_t first, int64_t last, int part)
{
    const grad_planes_args *p = ctx;
    double coef_x[PLANE_BLOCK_CHANNELS], shift[PLANE_BLOCK_CHANNELS];
    grad_block_sums s = no_grad_sums;
    fn_line_carry carry = {.line = NULL};      /* streamed planes: the line shared with the next one */
    (void)part;
    for (int64_t o = 0; first < last && o < p->O; o++)
        grad_block_add(p, first * p->block, block_end(first, p->block, p->C), o, &s);
    for (int64_t b = first; b < last; b++) {
        const int64_t c0 = b * p->block, c1 = block_end(b, p->block, p->C), c2 = block_end(b + 1, p->block, p->C);
        for (int64_t c = c0; c < c1; c++) {
            const int64_t j = c - c0;
            p->sum_dy[c] = s.total_dy[j] + s.dy[j];
            p->sum_dy_xc[c] = s.total_dy_xc[j] + s.dy_xc[j];
            fn_batch_dx_coefs(p->wr[c], p->rstd[c], p->sum_dy[c], p->sum_dy_xc[c], p->n, &coef_x[j], &shift[j]);
        }
        s = no_grad_sums;
        for (int64_t o = 0; o < p->O; o++) {
            grad_block_dx(p, c0, c1, o, coef_x, shift, &carry);
            if (b + 1 < last) grad_block_add(p, c1, c2, o, &s);
        }
    }
    fn_line_carry_flush(&carry);
    if (p->stream) fn_stream_fence();
    return FN_OK;
}

int channel_backward_planes_f32(fn_view dx, fn_view dy, fn_view x, const double *mean, const double *rstd,
                                const double *wr, double *sum_dy, double *sum_dy_xc, int64_t O, int64_t C,
                                int64_t S, int nthreads)
{
    const fn_view *v[3] = {&dx, &dy, &x};
    if (O < 1 || C < 0 || S < 2) return FN_EINVAL;
    for (int k = 0; k < 3; k++)
        if (v[k]->dtype != FN_F32 || v[k]->stride[2] != 4) return FN_EINVAL;
    const int64_t block = plane_block_channels(O, S, 2);         /* x and dy */
    grad_planes_args p = {.dx = dx, .dy = dy, .x = x, .mean = mean, .rstd = rstd, .wr = wr, .sum_dy = sum_dy,
                          .sum_dy_xc = sum_dy_xc, .n = (double)(O * S), .O = O, .C = C, .S = S, .block = block,
                          .parts = channel_parts(nthreads, O, O * C * S),
                          .stream = fn_streaming_pays(O * C * S, sizeof(float))};
    return fn_parallel_for(fn_parts(nthreads, O * C * S), (C + block - 1) / block, grad_planes_slice, &p);
}

void channel_dx_coefs(double *coef_x, double *shift, const double *wr, const double *rstd, const double *sum_dy,
                      const double *sum_dy_xc, double n, int64_t C)
{
    for (int64_t c = 0; c < C; c++) fn_batch_dx_coefs(wr[c], rstd[c], sum_dy[c], sum_dy_xc[c], n, &coef_x[c], &shift[c]);
}
