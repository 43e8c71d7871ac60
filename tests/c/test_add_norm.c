/* add_norm_rows alone, without Python: the strided views the Python entry never passes (it sends
 * plain C-contiguous arrays, and other layouts take its two-step path). Build and run with
 *   cc -std=c11 -Wall -Wextra -pthread -Isrc tests/c/test_add_norm.c src/add_norm.c src/convert.c \
 *      src/parallel.c src/group_norm.c src/batch_norm.c -lm
 * h is checked against the sum computed here element by element; y and the statistics bit for
 * bit against group_norm_forward of that h into a y of the same layout, all rows in one call (and
 * y by hand for float64).
 * Prints "N passed, M failed". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastnorm.h"

static int passed, failed;

static void check(const char *what, int ok)
{
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL %s\n", what);
    }
}

/* h = x + r of rows [1, 2, 3, 4] and [0, 0, 0, 2] (float64, in place over r): [1, 2, 3, 6], whose
 * mean is 3 and biased variance 3.5 (eps 0); its RMS: mean square 50/4 */
static void test_by_hand(void)
{
    double x[4] = {1, 2, 3, 4}, r[4] = {0, 0, 0, 2}, y[4], mean, rstd, w[4] = {1, 2, 1, 1}, b[4] = {0, 0, 0, 10};
    fn_view vx = {(char *)x, FN_F64, {32, 8}}, vr = {(char *)r, FN_F64, {32, 8}}, vy = {(char *)y, FN_F64, {32, 8}};
    int st = add_norm_rows(vy, vr, &mean, &rstd, vx, vr, w, b, 1, 4, 0.0, 0, 1);
    check("by hand: status", st == FN_OK);
    check("by hand: h", r[0] == 1 && r[1] == 2 && r[2] == 3 && r[3] == 6);
    check("by hand: mean, rstd", mean == 3.0 && fabs(rstd - 1.0 / sqrt(3.5)) < 1e-15);
    check("by hand: y", fabs(y[0] + 2.0 / sqrt(3.5)) < 1e-14 && fabs(y[1] + 2.0 / sqrt(3.5)) < 1e-14 &&
                            fabs(y[3] - (3.0 / sqrt(3.5) + 10.0)) < 1e-14);
    double x2[4] = {1, 2, 3, 4}, r2[4] = {0, 0, 0, 2};
    vx.data = (char *)x2, vr.data = (char *)r2;
    st = add_norm_rows(vy, vr, &mean, &rstd, vx, vr, NULL, NULL, 1, 4, 0.0, 1, 1);
    check("by hand rms: y", st == FN_OK && fabs(rstd - 1.0 / sqrt(12.5)) < 1e-15 &&
                                fabs(y[3] - 6.0 / sqrt(12.5)) < 1e-14);
}

static double value(int dtype, const char *p)
{
    if (dtype == FN_F16) return fn_half_to_float(*(const uint16_t *)p);
    return dtype == FN_F32 ? *(const float *)p : *(const double *)p;
}

static void put(int dtype, char *p, double v)
{
    if (dtype == FN_F16) *(uint16_t *)p = fn_float_to_half((float)v);
    else if (dtype == FN_F32) *(float *)p = (float)v;
    else *(double *)p = v;
}

/* The sum in the dtype, rounded once (float16: the float sum rounded to half, as NumPy). */
static double sum_in(int dtype, double a, double b)
{
    if (dtype == FN_F16) return fn_half_to_float(fn_float_to_half((float)a + (float)b));
    return dtype == FN_F32 ? (double)((float)a + (float)b) : a + b;
}

/* A rows x D view into buf whose elements are `gap` elements apart and whose rows run backward
 * (negative row stride), filled with values from `seed`. */
static fn_view strided(char *buf, int dtype, int64_t rows, int64_t D, int64_t gap, unsigned seed)
{
    const ptrdiff_t item = dtype == FN_F16 ? 2 : dtype == FN_F32 ? 4 : 8, row = D * gap * item;
    fn_view v = {buf + (rows - 1) * row, dtype, {-row, gap * item}};
    srand(seed);
    for (int64_t a = 0; a < rows; a++)
        for (int64_t k = 0; k < D; k++)
            put(dtype, v.data + a * v.stride[0] + k * v.stride[1], 3.0 * rand() / RAND_MAX - 1.0 + 0.01 * k);
    return v;
}

/* Strided x, residual, h and y of every dtype, one block or several L2-sized ones, 1 and 2
 * threads: h against the sum here, y and the statistics bit for bit against group_norm_forward of
 * h into a y of the same layout (strided rows take its double path, contiguous ones float). */
static void test_strided(int dtype, int64_t rows, int64_t D, int rms, int nthreads)
{
    const int64_t item = dtype == FN_F16 ? 2 : dtype == FN_F32 ? 4 : 8, n = rows * D;
    char *bx = calloc((size_t)(2 * n), (size_t)item), *br = calloc((size_t)(3 * n), (size_t)item);
    char *bh = calloc((size_t)(2 * n), (size_t)item), *by = calloc((size_t)(3 * n), (size_t)item);
    char *byc = calloc((size_t)(3 * n), (size_t)item);
    double *stats = calloc((size_t)(4 * rows), sizeof(double)), *w = calloc((size_t)(2 * D), sizeof(double));
    for (int64_t k = 0; k < D; k++) w[k] = 1.0 + 0.01 * k, w[D + k] = 0.5 - 0.02 * k;
    fn_view x = strided(bx, dtype, rows, D, 2, 1), r = strided(br, dtype, rows, D, 3, 2);
    fn_view h = strided(bh, dtype, rows, D, 2, 3), y = strided(by, dtype, rows, D, 3, 4);
    /* weight and bias in the dtype (the kernel's parameters) */
    char *wb = calloc((size_t)(2 * D), (size_t)item);
    for (int64_t k = 0; k < 2 * D; k++) put(dtype, wb + k * item, w[k]);
    for (int64_t k = 0; k < 2 * D; k++) w[k] = value(dtype, wb + k * item);
    int st = add_norm_rows(y, h, stats, stats + rows, x, r, wb, wb + D * item, rows, D, 1e-5, rms, nthreads);
    int h_ok = st == FN_OK;
    for (int64_t a = 0; a < rows; a++)
        for (int64_t k = 0; k < D; k++) {
            const double s = sum_in(dtype, value(dtype, x.data + a * x.stride[0] + k * x.stride[1]),
                                    value(dtype, r.data + a * r.stride[0] + k * r.stride[1]));
            h_ok &= value(dtype, h.data + a * h.stride[0] + k * h.stride[1]) == s;
        }
    fn_view yc = strided(byc, dtype, rows, D, 3, 5);
    fn_view y4 = {yc.data, dtype, {yc.stride[0], 0, yc.stride[1], 0}}, h4 = {h.data, dtype, {h.stride[0], 0, h.stride[1], 0}};
    const fn_mask none = {NULL, {0, 0}};
    group_norm_forward(y4, stats + 2 * rows, stats + 3 * rows, h4, w, w + D, none, rows, 1, D, 1, 1e-5, rms, 1);
    int y_ok = 1;
    for (int64_t a = 0; a < rows; a++) {
        y_ok &= stats[a] == stats[2 * rows + a] && stats[rows + a] == stats[3 * rows + a];
        for (int64_t k = 0; k < D; k++)
            y_ok &= memcmp(y.data + a * y.stride[0] + k * y.stride[1], yc.data + a * yc.stride[0] + k * yc.stride[1],
                           (size_t)item) == 0;
    }
    char what[96];
    snprintf(what, sizeof what, "strided dtype %d rows %lld D %lld rms %d threads %d: h", dtype, (long long)rows,
             (long long)D, rms, nthreads);
    check(what, h_ok);
    snprintf(what, sizeof what, "strided dtype %d rows %lld D %lld rms %d threads %d: y", dtype, (long long)rows,
             (long long)D, rms, nthreads);
    check(what, y_ok);
    free(bx), free(br), free(bh), free(by), free(byc), free(stats), free(w), free(wb);
}

static void test_refusals(void)
{
    double v[2] = {0, 0}, s[2];
    fn_view d = {(char *)v, FN_F64, {16, 8}}, f = {(char *)v, FN_F32, {8, 4}}, bad = {(char *)v, 7, {16, 8}};
    check("refuses D = 0", add_norm_rows(d, d, s, s + 1, d, d, NULL, NULL, 1, 0, 0.0, 0, 1) == FN_EINVAL);
    check("refuses mixed dtypes", add_norm_rows(d, d, s, s + 1, d, f, NULL, NULL, 1, 2, 0.0, 0, 1) == FN_EINVAL);
    check("refuses an unknown dtype", add_norm_rows(bad, bad, s, s + 1, bad, bad, NULL, NULL, 1, 2, 0.0, 0, 1) == FN_EINVAL);
    check("no rows", add_norm_rows(d, d, s, s + 1, d, d, NULL, NULL, 0, 2, 0.0, 0, 1) == FN_OK);
}

int main(void)
{
    test_by_hand();
    test_refusals();
    for (int dtype = FN_F16; dtype <= FN_F64; dtype++)
        for (int rms = 0; rms <= 1; rms++) {
            test_strided(dtype, 5, 7, rms, 1);
            test_strided(dtype, 700, 301, rms, 2);          /* more than 64 KiB: L2-sized blocks */
        }
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
