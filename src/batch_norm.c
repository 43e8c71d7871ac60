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

enum { BLOCK_ELEMENTS = 8192 };     /* a block of rows: 64 KiB of doubles */

/* Merge (nb, mean_b, m2_b) into the running (n, mean, m2) of one channel. */
static void merge_moments(double *n, double *mean, double *m2, double nb, double mean_b, double m2_b)
{
    if (nb == 0.0) return;
    double nt = *n + nb, delta = mean_b - *mean;
    *mean += delta * (nb / nt);
    *m2 += m2_b + delta * delta * (*n * nb / nt);
    *n = nt;
}

static int64_t rows_per_block(int64_t C)
{
    return C >= BLOCK_ELEMENTS ? 1 : BLOCK_ELEMENTS / (C > 0 ? C : 1);
}

/* Column statistics of rows o0..o0+nrows of x (O, C, 1): buf (nrows, C) holds the real rows. */
static void merge_block_columns(double *count, double *mean, double *m2, double *buf, double *tmp,
                                fn_view x, fn_mask mask, int64_t o0, int64_t nrows, int64_t C)
{
    int64_t nb = 0;
    for (int64_t o = o0; o < o0 + nrows; o++) {
        if (mask.data && !mask.data[o * mask.stride[0]]) continue;
        fn_load(buf + nb * C, x.data + o * x.stride[0], C, x.stride[1], x.dtype);
        nb++;
    }
    if (nb == 0) return;
    double *bmean = tmp, *sd = tmp + C, *sdd = tmp + 2 * C;
    for (int64_t c = 0; c < C; c++) bmean[c] = sd[c] = sdd[c] = 0.0;
    for (int64_t r = 0; r < nb; r++)
        for (int64_t c = 0; c < C; c++) bmean[c] += buf[r * C + c];
    for (int64_t c = 0; c < C; c++) bmean[c] /= (double)nb;
    for (int64_t r = 0; r < nb; r++)
        for (int64_t c = 0; c < C; c++) {
            double d = buf[r * C + c] - bmean[c];
            sd[c] += d;
            sdd[c] += d * d;
        }
    for (int64_t c = 0; c < C; c++)
        merge_moments(&count[c], &mean[c], &m2[c], (double)nb, bmean[c] + sd[c] / (double)nb,
                      sdd[c] - sd[c] * sd[c] / (double)nb);
}

int channel_moments(double *count, double *mean, double *var, fn_view x, fn_mask mask,
                    int64_t O, int64_t C, int64_t S)
{
    if (O < 0 || C < 0 || S < 0) return FN_EINVAL;
    int64_t rows = rows_per_block(C);
    int64_t nbuf = S == 1 ? rows * C + 3 * C : 2 * S;
    double *buf = malloc((size_t)(nbuf + 1) * sizeof(double));
    unsigned char *m = malloc((size_t)S + 1);
    if (!buf || !m) {
        free(buf);
        free(m);
        return FN_ENOMEM;
    }
    double *m2 = var;   /* holds the sum of squared deviations until the end */
    for (int64_t c = 0; c < C; c++) count[c] = mean[c] = m2[c] = 0.0;

    if (S == 1) {
        for (int64_t o0 = 0; o0 < O; o0 += rows)
            merge_block_columns(count, mean, m2, buf, buf + rows * C, x, mask, o0,
                                O - o0 < rows ? O - o0 : rows, C);
    } else {
        double *real = buf + S;
        for (int64_t o = 0; o < O; o++) {
            int64_t n = load_mask_row(m, mask, o, S);
            if (n == 0) continue;
            for (int64_t c = 0; c < C; c++) {
                const double *plane = buf;
                double pm, pv;
                fn_load(buf, x.data + o * x.stride[0] + c * x.stride[1], S, x.stride[2], x.dtype);
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
    for (int64_t c = 0; c < C; c++) {
        if (count[c] == 0.0) mean[c] = var[c] = NAN;
        else var[c] = m2[c] / count[c];
    }
    free(buf);
    free(m);
    return FN_OK;
}

int channel_combine(fn_view out, fn_view x, const double *center, const double *coef_x,
                    fn_view dy, const double *coef_dy, const double *shift, fn_mask mask,
                    int64_t O, int64_t C, int64_t S)
{
    if (O < 0 || C < 0 || S < 0) return FN_EINVAL;
    int64_t line = S == 1 ? C : S;      /* elements handled per load: a row, or a plane */
    double *bx = malloc((size_t)(2 * line + 1) * sizeof(double));
    unsigned char *m = malloc((size_t)S + 1);
    if (!bx || !m) {
        free(bx);
        free(m);
        return FN_ENOMEM;
    }
    double *bdy = bx + line;

    for (int64_t o = 0; o < O; o++) {
        load_mask_row(m, mask, o, S);
        if (S == 1) {
            /* one row of C channels */
            fn_load(bx, x.data + o * x.stride[0], C, x.stride[1], x.dtype);
            if (dy.data) fn_load(bdy, dy.data + o * dy.stride[0], C, dy.stride[1], dy.dtype);
            for (int64_t c = 0; c < C; c++) {
                double v = coef_x[c] * (bx[c] - center[c]) + shift[c];
                if (dy.data) v += coef_dy[c] * bdy[c];
                bx[c] = m[0] ? v : 0.0;
            }
            fn_store(out.data + o * out.stride[0], bx, C, out.stride[1], out.dtype);
            continue;
        }
        for (int64_t c = 0; c < C; c++) {
            /* one plane of S positions of channel c */
            fn_load(bx, x.data + o * x.stride[0] + c * x.stride[1], S, x.stride[2], x.dtype);
            if (dy.data)
                fn_load(bdy, dy.data + o * dy.stride[0] + c * dy.stride[1], S, dy.stride[2], dy.dtype);
            double cx = coef_x[c], mu = center[c], sh = shift[c], cdy = dy.data ? coef_dy[c] : 0.0;
            for (int64_t i = 0; i < S; i++) {
                double v = cx * (bx[i] - mu) + sh;
                if (dy.data) v += cdy * bdy[i];
                bx[i] = m[i] ? v : 0.0;
            }
            fn_store(out.data + o * out.stride[0] + c * out.stride[1], bx, S, out.stride[2], out.dtype);
        }
    }
    free(bx);
    free(m);
    return FN_OK;
}

int channel_grad_sums(double *sum_dy, double *sum_dy_xc, fn_view dy, fn_view x,
                      const double *center, fn_mask mask, int64_t O, int64_t C, int64_t S)
{
    if (O < 0 || C < 0 || S < 0) return FN_EINVAL;
    int64_t line = S == 1 ? C : S;
    double *bx = malloc((size_t)(2 * line + 1) * sizeof(double));
    unsigned char *m = malloc((size_t)S + 1);
    if (!bx || !m) {
        free(bx);
        free(m);
        return FN_ENOMEM;
    }
    double *bdy = bx + line;
    for (int64_t c = 0; c < C; c++) sum_dy[c] = sum_dy_xc[c] = 0.0;

    for (int64_t o = 0; o < O; o++) {
        if (load_mask_row(m, mask, o, S) == 0) continue;
        if (S == 1) {
            fn_load(bx, x.data + o * x.stride[0], C, x.stride[1], x.dtype);
            fn_load(bdy, dy.data + o * dy.stride[0], C, dy.stride[1], dy.dtype);
            for (int64_t c = 0; c < C; c++) {
                sum_dy[c] += bdy[c];
                sum_dy_xc[c] += bdy[c] * (bx[c] - center[c]);
            }
            continue;
        }
        for (int64_t c = 0; c < C; c++) {
            fn_load(bx, x.data + o * x.stride[0] + c * x.stride[1], S, x.stride[2], x.dtype);
            fn_load(bdy, dy.data + o * dy.stride[0] + c * dy.stride[1], S, dy.stride[2], dy.dtype);
            double s = 0.0, sxc = 0.0, mu = center[c];
            for (int64_t i = 0; i < S; i++) {
                if (!m[i]) continue;
                s += bdy[i];
                sxc += bdy[i] * (bx[i] - mu);
            }
            sum_dy[c] += s;
            sum_dy_xc[c] += sxc;
        }
    }
    free(bx);
    free(m);
    return FN_OK;
}
