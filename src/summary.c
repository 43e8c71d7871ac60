/* Per-channel summary of the (O, C, S) view, the statistics behind fastnorm.Moments: the count,
 * mean, m2 (sum of squared deviations from the mean), min and max of every channel's real
 * elements, in one pass over x. The layout is batch norm's (batch_norm.c): rows of C channels
 * when S == 1, planes of S positions of one channel otherwise.
 *
 * Rows: a block of rows is summed shifted by its first real row (exact for a constant column, no
 * E[x^2] - E[x]^2), with a second pass over the block for a column whose shift lay more than 8
 * standard deviations from its mean; planes: moments_of (moments.h). Blocks, planes and the
 * threads' slices are merged with Chan et al.'s formula (merge_moments), in a fixed order.
 * NaN in a channel makes its mean, m2, min and max NaN, as NumPy's mean, var, min and max do. */
#include <stdint.h>
#include <stdlib.h>

#include "moments.h"

/* Rows whose sums share one shift: ~64K elements, at most 1024 rows (the sums of a column add
 * one row after another, so their rounding grows with the rows of a block: 1024 rows keep m2 to
 * ~1e-13 relative; the merges of blocks cost C operations per block, nothing next to the rows). */
enum { SUMMARY_BLOCK_ELEMENTS = 1 << 16, SUMMARY_BLOCK_ROWS = 1024 };

typedef struct {
    double *count, *mean, *m2, *min, *max;   /* (C) each */
} summary;

static summary summary_in(double *base, int64_t C)
{
    return (summary){base, base + C, base + 2 * C, base + 3 * C, base + 4 * C};
}

/* lo/hi := the smaller/larger of themselves and v; NaN, once seen, stays. */
FN_INLINE void widen(double *lo, double *hi, double v)
{
    const int nan = v != v;
    *lo = v < *lo || nan ? v : *lo;
    *hi = v > *hi || nan ? v : *hi;
}

/* (n, mean, m2, lo, hi) of some elements merged into channel c of `into` (n 0: nothing). */
FN_INLINE void merge_summary(summary into, int64_t c, double n, double mean, double m2, double lo, double hi)
{
    if (n == 0.0) return;
    if (into.count[c] == 0.0) {
        into.count[c] = n, into.mean[c] = mean, into.m2[c] = m2, into.min[c] = lo, into.max[c] = hi;
        return;
    }
    widen(&into.min[c], &into.max[c], lo);
    widen(&into.min[c], &into.max[c], hi);
    merge_moments(&into.count[c], &into.mean[c], &into.m2[c], n, mean, m2);
}

/* One row v[0..C) added to the shifted sums and the ranges of its columns (min/max as the
 * vector instructions take them, which skip a NaN x: a NaN makes the sums NaN, and the block then
 * looks for it, column_has_nan). */
#define DEFINE_ADD_ROW(NAME, T)                                                                    \
    FN_INLINE void NAME(const T *v, int64_t C, const double *shift, double *sd, double *sdd, double *lo, \
                        double *hi)                                                                \
    {                                                                                              \
        _Pragma("omp simd")                                                                        \
        for (int64_t c = 0; c < C; c++) {                                                          \
            const double x = (double)v[c], d = x - shift[c];                                       \
            sd[c] += d;                                                                            \
            sdd[c] += d * d;                                                                       \
            lo[c] = x < lo[c] ? x : lo[c];     /* NaN is skipped here: see column_has_nan */        \
            hi[c] = x > hi[c] ? x : hi[c];                                                         \
        }                                                                                          \
    }
DEFINE_ADD_ROW(add_row, double)
DEFINE_ADD_ROW(add_row_f32, float)
#undef DEFINE_ADD_ROW

/* Whether column c of the real rows among o0..o0+nrows holds a NaN. */
static int column_has_nan(fn_view x, fn_mask mask, int64_t o0, int64_t nrows, int64_t c)
{
    double v;
    for (int64_t o = o0; o < o0 + nrows; o++) {
        if (mask.data && !mask.data[o * mask.stride[0]]) continue;
        fn_load(&v, x.data + o * x.stride[0] + c * x.stride[1], 1, 0, x.dtype);
        if (v != v) return 1;
    }
    return 0;
}

/* The columns of the real rows among o0..o0+nrows of x (O, C, 1) merged into `into`.
 * tmp: 6C doubles. */
FN_VECTOR_CLONES static void summarize_rows(summary into, double *tmp, fn_view x, fn_mask mask, int64_t o0,
                                            int64_t nrows, int64_t C)
{
    double *shift = tmp, *sd = tmp + C, *sdd = tmp + 2 * C, *lo = tmp + 3 * C, *hi = tmp + 4 * C, *row = tmp + 5 * C;
    const int64_t item = fn_dtype_size(x.dtype);
    const int64_t row_bytes = x.stride[1] == item ? item * C : 0;      /* contiguous rows: prefetched */
    const int f32_rows = x.dtype == FN_F32 && x.stride[1] == 4;
    int64_t nb = 0;
    for (int64_t o = o0; o < o0 + nrows; o++) {
        if (mask.data && !mask.data[o * mask.stride[0]]) continue;
        const char *src = x.data + o * x.stride[0];
        if (nb++ == 0) {
            fn_load(shift, src, C, x.stride[1], x.dtype);
            for (int64_t c = 0; c < C; c++) {
                sd[c] = sdd[c] = 0.0;
                lo[c] = hi[c] = shift[c];
            }
            continue;
        }
        if (row_bytes && o + PREFETCH_ROWS < o0 + nrows) prefetch_bytes(src + PREFETCH_ROWS * x.stride[0], row_bytes);
        if (f32_rows) {
            add_row_f32((const float *)src, C, shift, sd, sdd, lo, hi);
        } else {
            fn_load(row, src, C, x.stride[1], x.dtype);
            add_row(row, C, shift, sd, sdd, lo, hi);
        }
    }
    for (int64_t c = 0; nb > 0 && c < C; c++) {
        double bmean, bvar;
        finish_moments(shift[c], sd[c], sdd[c], nb, &bmean, &bvar);
        if (sd[c] != sd[c] && column_has_nan(x, mask, o0, nrows, c))
            lo[c] = hi[c] = NAN;
        if (!shift_was_near(sd[c], nb, bvar))           /* far shift (or NaN): shift by the mean */
            column_moments_again(bmean, x, mask, o0, nrows, c, nb, &bmean, &bvar);
        merge_summary(into, c, (double)nb, bmean, bvar * (double)nb, lo[c], hi[c]);
    }
}

/* The planes of rows o in [begin, end) of x (O, C, S), S > 1, merged into `into`.
 * buf: 2S doubles; m: S bytes. */
static void summarize_planes(summary into, double *buf, unsigned char *m, fn_view x, fn_mask mask, int64_t begin,
                             int64_t end, int64_t C, int64_t S)
{
    double *real = buf + S;
    for (int64_t o = begin; o < end; o++) {
        const int64_t n = load_mask_row(m, mask, o, S);
        if (n == 0) continue;
        for (int64_t c = 0; c < C; c++) {
            const double *plane = buf;
            fn_load(buf, x.data + o * x.stride[0] + c * x.stride[1], S, x.stride[2], x.dtype);
            if (n < S) {
                for (int64_t i = 0, j = 0; i < S; i++)
                    if (m[i]) real[j++] = buf[i];
                plane = real;
            }
            double pmean, pvar, lo = plane[0], hi = plane[0];
            moments_of(plane, n, &pmean, &pvar);
            for (int64_t i = 1; i < n; i++) widen(&lo, &hi, plane[i]);
            merge_summary(into, c, (double)n, pmean, pvar * (double)n, lo, hi);
        }
    }
}

typedef struct {
    fn_view x;
    fn_mask mask;
    double *partial;                 /* per slice: a summary of 5C doubles */
    int64_t C, S;
} summary_args;

static int summary_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const summary_args *p = ctx;
    const int64_t C = p->C, S = p->S;
    summary into = summary_in(p->partial + (int64_t)part * 5 * C, C);
    double *buf = malloc((size_t)(S == 1 ? 6 * C : 2 * S) * sizeof(double) + 1);
    unsigned char *m = malloc((size_t)S + 1);
    if (!buf || !m) {
        free(buf);
        free(m);
        return FN_ENOMEM;
    }
    for (int64_t c = 0; c < C; c++) into.count[c] = 0.0;
    if (S == 1) {
        int64_t rows = SUMMARY_BLOCK_ELEMENTS / C > 16 ? SUMMARY_BLOCK_ELEMENTS / C : 16;
        rows = rows < SUMMARY_BLOCK_ROWS ? rows : SUMMARY_BLOCK_ROWS;
        for (int64_t o0 = begin; o0 < end; o0 += rows)
            summarize_rows(into, buf, p->x, p->mask, o0, end - o0 < rows ? end - o0 : rows, C);
    } else {
        summarize_planes(into, buf, m, p->x, p->mask, begin, end, C, S);
    }
    free(buf);
    free(m);
    return FN_OK;
}

int channel_summary(double *count, double *mean, double *m2, double *min, double *max, fn_view x, fn_mask mask,
                    int64_t O, int64_t C, int64_t S, int nthreads)
{
    if (O < 0 || C < 0 || S < 0 || !fn_dtype_size(x.dtype)) return FN_EINVAL;
    summary all = {count, mean, m2, min, max};
    for (int64_t c = 0; c < C; c++) {
        count[c] = m2[c] = 0.0;
        mean[c] = min[c] = max[c] = NAN;
    }
    if (O == 0 || C == 0 || S == 0) return FN_OK;
    int parts = fn_parts(nthreads, O * C * S);
    if (parts > O) parts = (int)O;
    /* sizes in bytes of the partial summaries (5C doubles per slice) and of a slice's buffers
     * (6C or 2S doubles) must fit in size_t */
    const int64_t most = (int64_t)(SIZE_MAX / sizeof(double) / 8) / (parts > 6 ? parts : 6);
    if (C > most || S > most) return FN_ENOMEM;
    double *partial = malloc((size_t)(parts * 5 * C) * sizeof(double));
    if (!partial) return FN_ENOMEM;
    summary_args p = {.x = x, .mask = mask, .partial = partial, .C = C, .S = S};
    int status = fn_parallel_for(parts, O, summary_slice, &p);
    for (int q = 0; status == FN_OK && q < parts; q++) {
        summary s = summary_in(partial + (int64_t)q * 5 * C, C);
        for (int64_t c = 0; c < C; c++) merge_summary(all, c, s.count[c], s.mean[c], s.m2[c], s.min[c], s.max[c]);
    }
    free(partial);
    return status;
}
