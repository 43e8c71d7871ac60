/* The kernels alone, without Python: build and run with
 *   cc -std=c11 -Wall -Wextra -pthread -Isrc tests/c/test_kernels.c src/convert.c src/vector.c \
 *      src/parallel.c src/group_norm.c src/batch_norm.c -lm
 * Expected values are computed by hand (see each comment). Prints "N passed, M failed". */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "elementwise.h"

static int passed, failed;

static void check_close(const char *what, double got, double want, double tol)
{
    if (got == want || fabs(got - want) <= tol || (isnan(got) && isnan(want))) {
        passed++;
    } else {
        failed++;
        printf("FAIL %s: got %.17g, want %.17g\n", what, got, want);
    }
}

static fn_view view_f64(double *p, ptrdiff_t s0, ptrdiff_t s1, ptrdiff_t s2, ptrdiff_t s3)
{
    fn_view v = {(char *)p, FN_F64, {s0, s1, s2, s3}};
    return v;
}

/* layer norm of the row [1, 2, 3, 6]: mean 3, biased var (4 + 1 + 0 + 9) / 4 = 3.5 */
static void test_layer_norm_row(void)
{
    double x[4] = {1, 2, 3, 6}, y[4], mean, rstd, w[4] = {1, 2, 1, 1}, b[4] = {0, 0, 0, 10};
    fn_mask none = {0};
    int st = group_norm_forward(view_f64(y, 32, 32, 8, 8), &mean, &rstd, view_f64(x, 32, 32, 8, 8),
                                w, b, none, 1, 1, 4, 1, 0.0, 0, 1);
    check_close("layer status", st, FN_OK, 0);
    check_close("layer mean", mean, 3.0, 1e-15);
    check_close("layer rstd", rstd, 1.0 / sqrt(3.5), 1e-15);
    check_close("layer y0", y[0], -2.0 / sqrt(3.5), 1e-14);
    check_close("layer y1", y[1], 2.0 * -1.0 / sqrt(3.5), 1e-14);
    check_close("layer y3", y[3], 3.0 / sqrt(3.5) + 10.0, 1e-14);
}

/* float32 row with mean 1e4 and values +-1: var exactly 1 */
static void test_mean_offset_f32(void)
{
    float x[4] = {10001.0f, 9999.0f, 10001.0f, 9999.0f}, y[4];
    double mean, rstd;
    fn_view vx = {(char *)x, FN_F32, {16, 16, 4, 4}}, vy = {(char *)y, FN_F32, {16, 16, 4, 4}};
    fn_mask none = {0};
    group_norm_forward(vy, &mean, &rstd, vx, NULL, NULL, none, 1, 1, 4, 1, 0.0, 0, 1);
    check_close("offset mean", mean, 1e4, 0);
    check_close("offset y0", y[0], 1.0, 1e-7);
    check_close("offset y1", y[1], -1.0, 1e-7);
}

/* layer_norm_rows_f32 on two float32 rows [1, 2, 3, 6] and [10001, 9999, 10001, 9999], in place,
 * with a weight and no bias: mean 3, var 3.5 and mean 1e4, var 1 (as above); then RMS norm of
 * [3, 4, 0, 0]: mean square 25/4, rstd 2/5 */
static void test_rows_f32(void)
{
    float x[8] = {1, 2, 3, 6, 10001.0f, 9999.0f, 10001.0f, 9999.0f}, w[4] = {1, 2, 1, 1};
    double mean[2], rstd[2];
    int st = layer_norm_rows_f32(x, mean, rstd, x, w, NULL, 2, 4, 0.0, 0, 1);
    check_close("rows status", st, FN_OK, 0);
    check_close("rows mean0", mean[0], 3.0, 1e-12);
    check_close("rows rstd0", rstd[0], 1.0 / sqrt(3.5), 1e-7);
    check_close("rows y1", x[1], 2.0 * -1.0 / sqrt(3.5), 1e-6);
    check_close("rows y3", x[3], 3.0 / sqrt(3.5), 1e-6);
    check_close("rows mean1", mean[1], 1e4, 0);
    check_close("rows y5", x[5], -2.0, 1e-7);
    float r[4] = {3, 4, 0, 0}, b[4] = {0, 0, 0, 7}, y[4];
    layer_norm_rows_f32(y, mean, rstd, r, NULL, b, 1, 4, 0.0, 1, 1);
    check_close("rows rms rstd", rstd[0], 0.4, 1e-7);
    check_close("rows rms y1", y[1], 1.6, 1e-6);
    check_close("rows rms y3", y[3], 7.0, 0);
    check_close("rows bad D", layer_norm_rows_f32(y, mean, rstd, r, NULL, NULL, 1, 0, 0.0, 0, 1), FN_EINVAL, 0);
}

/* a constant row with eps = 0 gives bias, not NaN; a NaN row stays NaN */
static void test_constant_and_nan_rows(void)
{
    double x[6] = {0.1, 0.1, 0.1, 1.0, NAN, 2.0}, y[6], mean[2], rstd[2], b[3] = {5, 6, 7};
    fn_mask none = {0};
    group_norm_forward(view_f64(y, 24, 24, 8, 8), mean, rstd, view_f64(x, 24, 24, 8, 8), NULL, b, none,
                       2, 1, 3, 1, 0.0, 0, 1);
    check_close("constant y0", y[0], 5.0, 0);
    check_close("constant y2", y[2], 7.0, 0);
    check_close("nan row y3", y[3], NAN, 0);
    check_close("nan row y5", y[5], NAN, 0);
}

/* masked instance norm: (A=1, G=1, K=1, S=4), positions 0 and 2 real: values 2, 6 -> mean 4, var 4 */
static void test_masked_instance(void)
{
    double x[4] = {2, 100, 6, -50}, y[4], mean, rstd;
    unsigned char m[4] = {1, 0, 1, 0};
    fn_mask mask = {m, {4, 1}};
    group_norm_forward(view_f64(y, 32, 32, 32, 8), &mean, &rstd, view_f64(x, 32, 32, 32, 8), NULL, NULL,
                       mask, 1, 1, 1, 4, 0.0, 0, 1);
    check_close("masked mean", mean, 4.0, 1e-15);
    check_close("masked y0", y[0], -1.0, 1e-15);
    check_close("masked y1 (padding)", y[1], 0.0, 0);
    check_close("masked y2", y[2], 1.0, 1e-15);
}

/* batch moments down the columns of a (3, 2) array with a negative row stride */
static void test_channel_moments(void)
{
    double x[6] = {1, 10, 2, 20, 6, 60}, count[2], mean[2], var[2];
    fn_mask none = {0};
    fn_view v = view_f64(x + 4, -16, 8, 8, 0);   /* rows read bottom-up */
    channel_moments(count, mean, var, v, none, 3, 2, 1, 1);
    check_close("bn count", count[0], 3.0, 0);
    check_close("bn mean0", mean[0], 3.0, 1e-15);
    check_close("bn var0", var[0], 14.0 / 3.0, 1e-14);     /* (4 + 1 + 9) / 3 */
    check_close("bn var1", var[1], 1400.0 / 3.0, 1e-12);
}

/* layer-norm backward: dx sums to zero per row; dbias = sum of dy */
static void test_group_backward(void)
{
    double x[3] = {1, 2, 4}, y[3], dy[3] = {0.5, -1, 2}, dx[3], mean, rstd, dw[3], db[3];
    fn_mask none = {0};
    group_norm_forward(view_f64(y, 24, 24, 8, 8), &mean, &rstd, view_f64(x, 24, 24, 8, 8), NULL, NULL, none,
                       1, 1, 3, 1, 1e-5, 0, 1);
    group_norm_backward(view_f64(dx, 24, 24, 8, 8), dw, db, view_f64(dy, 24, 24, 8, 8), view_f64(x, 24, 24, 8, 8),
                        &mean, &rstd, NULL, none, 1, 1, 3, 1, 0, 1);
    check_close("dx sums to 0", dx[0] + dx[1] + dx[2], 0.0, 1e-14);
    check_close("dbias", db[2], 2.0, 0);
    check_close("dweight", dw[0], 0.5 * (1 - mean) * rstd, 1e-15);
}

/* 2 threads give the 1-thread answer: layer norm (512, 512) rows, batch moments of (512*512/4, 4) */
static void test_threads_agree(void)
{
    enum { R = 512, D = 512 };
    static double x[R * D], y1[R * D], y2[R * D], m1[R], r1[R], m2[R], r2[R];
    double c1[4], mu1[4], v1[4], c2[4], mu2[4], v2[4], worst = 0.0;
    fn_mask none = {0};
    for (int i = 0; i < R * D; i++) x[i] = sin(0.001 * i) * 3.0 + (i % 7);
    group_norm_forward(view_f64(y1, D * 8, D * 8, 8, 8), m1, r1, view_f64(x, D * 8, D * 8, 8, 8), NULL, NULL,
                       none, R, 1, D, 1, 1e-5, 0, 1);
    group_norm_forward(view_f64(y2, D * 8, D * 8, 8, 8), m2, r2, view_f64(x, D * 8, D * 8, 8, 8), NULL, NULL,
                       none, R, 1, D, 1, 1e-5, 0, 2);
    for (int i = 0; i < R * D; i++) worst = fmax(worst, fabs(y1[i] - y2[i]));
    check_close("threads: layer norm", worst, 0.0, 0.0);
    channel_moments(c1, mu1, v1, view_f64(x, 32, 8, 8, 0), none, R * D / 4, 4, 1, 1);
    channel_moments(c2, mu2, v2, view_f64(x, 32, 8, 8, 0), none, R * D / 4, 4, 1, 2);
    check_close("threads: bn count", c2[3], c1[3], 0.0);
    check_close("threads: bn mean", mu2[3], mu1[3], 1e-13);
    check_close("threads: bn var", v2[3], v1[3], 1e-12);
}

/* every finite half survives half -> float -> half; 1/3 rounds to nearest */
static void test_half_conversion(void)
{
    int bad = 0;
    for (unsigned h = 0; h < 65536; h++) {
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) continue;   /* NaN payloads */
        if (fn_float_to_half(fn_half_to_float((uint16_t)h)) != h) bad++;
    }
    check_close("half round trips failing", bad, 0, 0);
    check_close("half(1/3)", fn_half_to_float(fn_float_to_half(1.0f / 3.0f)), 0.333251953125, 0);
    check_close("half(65520) = inf", fn_half_to_float(fn_float_to_half(65520.0f)), INFINITY, 0);
}

/* The run conversions (F16C instructions where the CPU has them, else the scalar code) equal the
 * scalar ones: every half, and floats around every half-way point, odd lengths for the tails. */
static void test_half_runs(void)
{
    static uint16_t h[65536], back[65536];
    static float f[65536], probes[3 * 65536];
    int bad = 0;
    for (unsigned i = 0; i < 65536; i++) h[i] = (uint16_t)i;
    fn_halves_to_floats(f, h, 65535);
    f[65535] = fn_half_to_float(h[65535]);
    for (unsigned i = 0; i < 65536; i++) {
        float want = fn_half_to_float(h[i]);
        if (isnan(want) ? !isnan(f[i]) : memcmp(&want, &f[i], sizeof want) != 0) bad++;
    }
    check_close("half runs -> float differing", bad, 0, 0);
    /* each finite half, and the floats just below and above half-way to the next half */
    int n = 0;
    for (unsigned i = 0; i < 0x7c00u; i++) {
        float a = fn_half_to_float((uint16_t)i), b = fn_half_to_float((uint16_t)(i + 1));
        float mid = a + (b - a) / 2;
        probes[n++] = a;
        probes[n++] = nextafterf(mid, -INFINITY);
        probes[n++] = -mid;                                 /* a tie: rounds to even */
    }
    static uint16_t got[3 * 65536];
    bad = 0;
    for (int len = n; len > n - 9; len -= 4) {               /* tails of 0..7 after the 8-wide body */
        fn_floats_to_halves(got, probes, len);
        for (int i = 0; i < len; i++) bad += got[i] != fn_float_to_half(probes[i]);
    }
    check_close("float runs -> half differing", bad, 0, 0);
    fn_floats_to_halves(back, f, 0x7c00);
    bad = 0;
    for (unsigned i = 0; i < 0x7c00u; i++) bad += back[i] != h[i];
    check_close("half runs round trip", bad, 0, 0);
    /* runs of 8, too short for the 16-wide AVX-512 code: the 8-wide F16C code (where the CPU has
     * it) converts every half and every probe, as the portable code does */
    bad = 0;
    for (unsigned i = 0; i < 65536; i += 8) {
        float f8[8];
        fn_halves_to_floats(f8, h + i, 8);
        for (unsigned j = 0; j < 8; j++) {
            float want = fn_half_to_float(h[i + j]);
            bad += isnan(want) ? !isnan(f8[j]) : memcmp(&want, &f8[j], sizeof want) != 0;
        }
    }
    for (int i = 0; i + 8 <= n; i += 8) {
        uint16_t h8[8];
        fn_floats_to_halves(h8, probes + i, 8);
        for (int j = 0; j < 8; j++) bad += h8[j] != fn_float_to_half(probes[i + j]);
    }
    check_close("8-wide runs differing", bad, 0, 0);
    /* the fused normalize-and-round of a float16 row equals the same float steps done one by one */
    enum { N = 1003 };
    static float w[N], b[N];
    static uint16_t x[N], y[N];
    const fn_affine c = {1234.5f, 0.000123f, 0.37f};
    for (int i = 0; i < N; i++) {
        x[i] = fn_float_to_half(1234.5f + (float)((i * 7919) % 2001 - 1000) / 64.0f);
        w[i] = (float)(i % 13) / 4.0f - 1.0f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    fn_affine_row_to_halves(y, x, N, c, w, b);
    bad = 0;
    for (int i = 0; i < N; i++) {
        bad += y[i] != fn_float_to_half(fn_affine_at(c, fn_half_to_float(x[i]), w[i], b[i]));
    }
    check_close("fused float16 rows differing", bad, 0, 0);
    bad = 0;
    for (int i = 0; i + 8 <= N; i += 8) {                    /* 8 at a time: the F16C code (see above) */
        uint16_t y8[8];
        fn_affine_row_to_halves(y8, x + i, 8, c, w + i, b + i);
        for (int j = 0; j < 8; j++) bad += y8[j] != y[i + j];
    }
    check_close("fused float16 rows, 8 at a time, differing", bad, 0, 0);
}

/* fn_half_sums and fn_bf16_sums against the algorithm they implement, written out here: RUN_LANES =
 * 32 float lanes summing runs of 16 values each, merged into double lanes, the lanes added
 * pairwise, the tail in double. Must agree to the bit for every length (the F16C lanes add in the
 * same order). */
static float value_16bit(uint16_t v, int half) { return half ? fn_half_to_float(v) : fn_bf16_to_float(v); }

static void test_half_sums(void)
{
    static uint16_t h[5000];
    const int lengths[] = {0, 1, 31, 32, 33, 100, 511, 512, 513, 1000, 1024, 4999, 5000};
    int bad = 0;
    for (int half = 0; half < 2; half++)
    for (unsigned t = 0; t < sizeof lengths / sizeof lengths[0]; t++) {
        for (int i = 0; i < 5000; i++) {
            const float v = 100.0f + (float)((i * 7919) % 1999 - 999) / 37.0f;
            h[i] = half ? fn_float_to_half(v) : fn_float_to_bf16(v);
        }
        const int n = lengths[t];
        const float shift = n ? value_16bit(h[n / 2], half) : 0.0f;
        double a2[32] = {0}, b2[32] = {0}, s1 = 0.0, s2 = 0.0, got_d, got_dd;
        int i = 0;
        while (i + 32 <= n) {
            float a[32] = {0}, b[32] = {0};
            int stop = n - i >= 32 * 16 ? i + 32 * 16 : n - (n - i) % 32;
            for (; i < stop; i += 32)
                for (int j = 0; j < 32; j++) {
                    float d = value_16bit(h[i + j], half) - shift;
                    a[j] += d;
                    b[j] += d * d;
                }
            for (int j = 0; j < 32; j++) a2[j] += a[j], b2[j] += b[j];
        }
        for (; i < n; i++) {
            double d = (double)value_16bit(h[i], half) - (double)shift;
            s1 += d;
            s2 += d * d;
        }
        for (int k = 16; k >= 1; k /= 2)
            for (int j = 0; j < k; j++) a2[j] += a2[j + k], b2[j] += b2[j + k];
        if (half) fn_half_sums(h, n, shift, &got_d, &got_dd);
        else fn_bf16_sums(h, n, shift, &got_d, &got_dd);
        bad += got_d != s1 + a2[0] || got_dd != s2 + b2[0];
    }
    check_close("float16 and bfloat16 sums differing from the written-out algorithm", bad, 0, 0);
}

/* Every streamed writer (vector.c) against the scalar formula of elementwise.h, bit for bit:
 * every length 0..80 and every start 0..16 floats into a 64-byte
 * aligned buffer, so that the plain-store head, the 16-wide non-temporal middle (on AVX-512F
 * CPUs) and the tail all run. Bit for bit; dx also in place (dx = dy); `next` rows only
 * prefetched. */
static void test_streamed_rows(void)
{
    static float buf[5][128] __attribute__((aligned(64))), ibuf[128] __attribute__((aligned(64)));
    static double dbuf[128] __attribute__((aligned(64)));
    double xd[96], wd[96], bd[96];
    float x[96], dy[96], w[96], b[96];
    const fn_affine c3 = {3.25f, 1e-7f, 0.75f};
    const fn_dx c5 = {0.75f, -0.125f, 3.25f, 1e-7f, 0.0625f};
    const fn_scale_shift c4 = {3.25f, 1e-7f, 0.75f, -0.375f, 0.5f};
    for (int i = 0; i < 96; i++) {
        x[i] = 3.0f + (float)((i * 37) % 23) / 8.0f;
        dy[i] = (float)((i * 11) % 7) / 3.0f - 1.0f;
        w[i] = (float)(i % 13) / 4.0f - 1.0f;
        b[i] = (float)(i % 5) * 0.1f;
        xd[i] = x[i] * 1.1, wd[i] = w[i] * 0.9, bd[i] = b[i] - 0.3;
    }
    int bad = 0;
    for (int start = 0; start <= 16; start++)
        for (int n = 0; n <= 80; n++) {
            float *y = buf[0] + start, *dx = buf[1] + start, *g = buf[2] + start;
            memcpy(g, dy, (size_t)n * sizeof(float));
            fn_affine_row_streamed(y, x, n, c3, w, b, n % 2 ? b : NULL, NULL);     /* next: prefetched only */
            fn_dx_row_streamed(dx, dy, x, n, c5, w, NULL);
            fn_dx_row_streamed(g, g, x, n, c5, w, NULL);
            fn_affine_row_streamed_f64(dbuf + start, xd, n, 3.25, 0.75, wd, bd, n % 2 ? NULL : bd, NULL);
            fn_scale_shift_streamed(buf[3] + start, x, NULL, n, c4, NULL);
            fn_scale_shift_streamed(buf[4] + start, x, dy, n, c4, NULL);
            fn_stream_fence();
            for (int in_dy = 0; in_dy < 2; in_dy++) {                /* in place: y is dy, then y is x */
                float *io = ibuf + start;
                memcpy(io, in_dy ? dy : x, (size_t)n * sizeof(float));
                fn_scale_shift_streamed(io, in_dy ? x : io, in_dy ? io : dy, n, c4, NULL);
                fn_stream_fence();
                for (int i = 0; i < n; i++) bad += io[i] != fn_scale_shift_dy_at(c4, x[i], dy[i]);
            }
            for (int i = 0; i < n; i++) bad += dbuf[start + i] != fn_affine_f64_at(3.25, 0.75, xd[i], wd[i], bd[i]);
            for (int i = 0; i < n; i++) {
                float want_y = fn_affine_at(c3, x[i], w[i], b[i]);
                float want_dx = fn_dx_at(c5, dy[i], x[i], w[i]);
                float want_plane = fn_scale_shift_at(c4, x[i]);
                bad += y[i] != want_y || dx[i] != want_dx || g[i] != want_dx || buf[3][start + i] != want_plane;
                bad += buf[4][start + i] != fn_scale_shift_dy_at(c4, x[i], dy[i]);
            }
        }
    check_close("streamed rows differing", bad, 0, 0);
    /* three rows one after another into contiguous memory through a line carry, flushed at the
     * end: every start 0..16 and row length 1..40, float32 (y, dx, also dx = dy in place, and
     * batch-norm planes) and float64; the elements around the rows must keep their sentinel */
    static float rows[5][160] __attribute__((aligned(64)));
    static double drows[160] __attribute__((aligned(64)));
    bad = 0;
    for (int start = 0; start <= 16; start++)
        for (int n = 1; n <= 40; n++) {
            for (int i = 0; i < 160; i++) rows[0][i] = rows[1][i] = rows[3][i] = rows[4][i] = -7.0f, drows[i] = -7.0;
            for (int i = 0; i < 3 * n; i++) rows[2][start + i] = dy[i % 96];
            fn_line_carry cy = {.line = NULL}, cd = {.line = NULL}, cg = {.line = NULL}, c64 = {.line = NULL},
                          cp = {.line = NULL}, cq = {.line = NULL};
            for (int r = 0; r < 3; r++) {
                float *g = rows[2] + start + r * n;
                fn_affine_row_streamed(rows[0] + start + r * n, x + r, n, c3, w, b, NULL, &cy);
                fn_dx_row_streamed(rows[1] + start + r * n, dy + r, x + r, n, c5, w, &cd);
                fn_dx_row_streamed(g, g, x + r, n, c5, w, &cg);
                fn_affine_row_streamed_f64(drows + start + r * n, xd + r, n, 3.25, 0.75, wd, bd, NULL, &c64);
                fn_scale_shift_streamed(rows[3] + start + r * n, x + r, NULL, n, c4, &cp);
                fn_scale_shift_streamed(rows[4] + start + r * n, x + r, dy + r, n, c4, &cq);
            }
            fn_line_carry_flush(&cp);
            fn_line_carry_flush(&cq);
            fn_line_carry_flush(&cy);
            fn_line_carry_flush(&cd);
            fn_line_carry_flush(&cg);
            fn_line_carry_flush(&c64);
            fn_stream_fence();
            for (int i = 0; i < 160; i++) {
                const int r = (i - start) / n, k = (i - start) % n;
                if (i < start || i >= start + 3 * n) {
                    bad += rows[0][i] != -7.0f || rows[1][i] != -7.0f || rows[3][i] != -7.0f || rows[4][i] != -7.0f ||
                           drows[i] != -7.0;
                    continue;
                }
                const float gk = dy[(r * n + k) % 96];
                bad += rows[0][i] != fn_affine_at(c3, x[r + k], w[k], b[k]);
                bad += rows[1][i] != fn_dx_at(c5, dy[r + k], x[r + k], w[k]);
                bad += rows[2][i] != fn_dx_at(c5, gk, x[r + k], w[k]);
                bad += drows[i] != fn_affine_f64_at(3.25, 0.75, xd[r + k], wd[k], bd[k]);
                bad += rows[3][i] != fn_scale_shift_at(c4, x[r + k]);
                bad += rows[4][i] != fn_scale_shift_dy_at(c4, x[r + k], dy[r + k]);
            }
        }
    check_close("rows through a line carry differing", bad, 0, 0);
    /* batch norm's rows of C channels, from channel 0 of a row, with and without dy */
    static float f2[10 * 40], yb[400] __attribute__((aligned(64)));
    float xs[384], dys[384];
    for (int i = 0; i < 384; i++) xs[i] = 2.0f + (float)((i * 29) % 31) / 8.0f, dys[i] = (float)((i * 13) % 9) / 4.0f - 1.0f;
    bad = 0;
    const int channels[] = {16, 17, 40};
    for (int t = 0; t < 3; t++) {
        const int C = channels[t];
        for (int k = 0; k < 5; k++)
            for (int c = 0; c < 2 * C; c++) f2[2 * k * C + c] = (float)(k + 1) * 0.5f + (float)(c % C) / 16.0f;
        const fn_channel_coefs f = {f2, f2 + 2 * C, f2 + 4 * C, f2 + 6 * C, f2 + 8 * C};
        for (int start = 0; start <= 16; start += 3)
            for (int n = 0; n <= 384 - 16; n += 7)
                for (int with_dy = 0; with_dy < 2; with_dy++) {
                    fn_combine_rows_streamed(yb + start, xs, with_dy ? dys : NULL, n, C, &f);
                    fn_stream_fence();
                    for (int i = 0; i < n; i++) {
                        const fn_scale_shift c = fn_channel_at(&f, i % C);
                        const float want = with_dy ? fn_scale_shift_dy_at(c, xs[i], dys[i]) : fn_scale_shift_at(c, xs[i]);
                        bad += yb[start + i] != want;
                    }
                }
    }
    check_close("streamed channel rows differing", bad, 0, 0);
    /* float16 and bfloat16 rows (32 values a line): every start 0..32 and length 0..90, alone and
     * three rows through a line carry, bfloat16 also with subnormal results in most lines (which
     * AVX-512 BF16's conversion would flush); the bits of the scalar formula, sentinels kept */
    static uint16_t hrows[2][448] __attribute__((aligned(64)));
    uint16_t hx[128];
    float wt[96], bt[96];
    bad = 0;
    for (int variant = 0; variant < 3; variant++) {   /* float16; bfloat16; bfloat16 with subnormal results */
        const int half = variant == 0, dtype = half ? FN_F16 : FN_BF16;
        for (int k = 0; k < 96; k++) wt[k] = variant == 2 && k % 3 ? w[k] * 1e-39f : w[k], bt[k] = variant == 2 ? 0.0f : b[k];
        for (int i = 0; i < 128; i++) hx[i] = half ? fn_float_to_half(x[i % 96]) : fn_float_to_bf16(x[i % 96]);
        for (int start = 0; start <= 32; start++)
            for (int n = 0; n <= 90; n++) {
                for (int i = 0; i < 448; i++) hrows[0][i] = hrows[1][i] = 0x7e00u;
                fn_line_carry ch = {.line = NULL};
                fn_affine_row_to_16bit_streamed(hrows[0] + start, hx, n, dtype, c3, wt, bt, NULL);
                for (int r = 0; r < 3; r++)
                    fn_affine_row_to_16bit_streamed(hrows[1] + start + r * n, hx + r, n, dtype, c3, wt, bt, &ch);
                fn_line_carry_flush(&ch);
                fn_stream_fence();
                for (int i = 0; i < 448; i++) {
                    const int r = n ? (i - start) / n : 0, k = n ? (i - start) % n : 0;
                    for (int t = 0; t < 2; t++) {
                        const int row = t ? r : 0;
                        if (i < start || i >= start + (t ? 3 : 1) * n) {
                            bad += hrows[t][i] != 0x7e00u;
                            continue;
                        }
                        const float v = half ? fn_half_to_float(hx[row + k]) : fn_bf16_to_float(hx[row + k]);
                        const float want = fn_affine_at(c3, v, wt[k], bt[k]);
                        bad += hrows[t][i] != (half ? fn_float_to_half(want) : fn_float_to_bf16(want));
                    }
                }
            }
    }
    check_close("streamed float16 and bfloat16 rows differing", bad, 0, 0);
}

/* Checked sizes: products past INT64_MAX are FN_ENOMEM; kernels refuse zero-stride views whose
 * scratch could not exist (2**60 elements in one group, 2**61 in one batch-norm plane) before
 * touching memory; the thread slices of 2**63 - 1 items cover them exactly, without overflow. */
typedef struct {
    int64_t begin[3], end[3];
} slices_seen;

static int record_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    slices_seen *seen = ctx;
    seen->begin[part] = begin, seen->end[part] = end;
    return FN_OK;
}

static void test_size_checks(void)
{
    int64_t n = -1;
    size_t bytes = 0;
    check_close("size 3 * 5 + 1", fn_mul_add_size(3, 5, 1, &n) == FN_OK && n == 16, 1, 0);
    check_close("size 2**62 * 2 overflows", fn_mul_add_size((int64_t)1 << 62, 2, 0, &n), FN_ENOMEM, 0);
    check_close("size INT64_MAX + 1 overflows", fn_mul_add_size(INT64_MAX, 1, 1, &n), FN_ENOMEM, 0);
    check_close("size negative", fn_mul_add_size(-1, 1, 0, &n), FN_ENOMEM, 0);
    check_close("bytes (2 * 2**59 + 1) doubles", fn_array_bytes(2, (int64_t)1 << 59, 1, 8, &bytes), FN_ENOMEM, 0);
    check_close("bytes (2 * 7 + 1) doubles", fn_array_bytes(2, 7, 1, 8, &bytes) == FN_OK && bytes == 120, 1, 0);

    double one = 1.0, sink = 0.0, mean = 0.0, rstd = 0.0, count = 0.0, var = 0.0;
    fn_mask none = {0};
    const int64_t big = (int64_t)1 << 60;
    int st = group_norm_forward(view_f64(&sink, 0, 0, 0, 0), &mean, &rstd, view_f64(&one, 0, 0, 0, 0), NULL, NULL,
                                none, 1, 1, big, 1, 0.0, 0, 2);
    check_close("group of 2**60 zero-stride elements", st, FN_ENOMEM, 0);
    double dw = 0.0, db = 0.0;
    st = group_norm_backward(view_f64(&sink, 0, 0, 0, 0), &dw, &db, view_f64(&one, 0, 0, 0, 0),
                             view_f64(&one, 0, 0, 0, 0), &mean, &rstd, NULL, none, 1, 1, 1, big, 0, 2);
    check_close("backward group of 2**60 elements", st, FN_ENOMEM, 0);
    st = channel_moments(&count, &mean, &var, view_f64(&one, 0, 0, 0, 0), none, 1, 1, 2 * big, 2);
    check_close("batch-norm plane of 2**61 elements", st, FN_ENOMEM, 0);
    check_close("nothing written", sink, 0.0, 0);

    slices_seen seen = {{0}, {0}};
    st = fn_parallel_for(3, INT64_MAX, record_slice, &seen);
    int exact = st == FN_OK && seen.begin[0] == 0 && seen.end[2] == INT64_MAX;
    for (int p = 0; p < 3; p++) exact &= seen.end[p] - seen.begin[p] >= INT64_MAX / 3;
    for (int p = 0; p < 2; p++) exact &= seen.end[p] == seen.begin[p + 1];
    check_close("slices of 2**63 - 1 items", exact, 1, 0);
}

/* ---- bfloat16: the conversions against references written out here, with branches and ldexp ---- */

/* the value of bfloat16 bits h, decoded field by field */
static double bf16_value_ref(uint16_t h)
{
    const int sign = h >> 15, e = (h >> 7) & 0xff, m = h & 0x7f;
    double v = e == 0 ? ldexp(m, -133) : e == 255 ? (m ? NAN : INFINITY) : ldexp(128 + m, e - 134);
    return sign ? -v : v;
}

/* bfloat16 nearest to the finite or infinite double d (ties to even; beyond the largest bfloat16
 * by half an ulp or more, Inf). The two neighbours of |d| are found by search over the decoded
 * values, independently of any bit trick. */
static uint16_t bf16_nearest_ref(double d)
{
    const uint16_t sign = signbit(d) ? 0x8000 : 0;
    const double a = fabs(d);
    uint16_t lo = 0, hi = 0x7f81;         /* bisection: the largest bf16 magnitude <= |d| (values grow with bits) */
    while (hi - lo > 1) {
        const uint16_t mid = (uint16_t)((lo + hi) / 2);
        if (bf16_value_ref(mid) <= a) lo = mid;
        else hi = mid;
    }
    if (lo == 0x7f80 || bf16_value_ref(lo) == a) return (uint16_t)(sign | lo);
    const double hi_value = lo + 1 == 0x7f80 ? ldexp(1.0, 128) : bf16_value_ref((uint16_t)(lo + 1));
    const double below = a - bf16_value_ref(lo), above = hi_value - a;
    const int up = above < below || (above == below && (lo & 1));
    return (uint16_t)(sign | (lo + up));
}

/* every bfloat16 widens exactly; every float32 (a sweep: each bfloat16, the float32s one ulp
 * around it and around the half-way point above it, NaNs) rounds to nearest even. */
static void test_bf16_conversion(void)
{
    int bad_widen = 0, bad_round = 0, bad_nan = 0, bad_double = 0, bad_runs = 0, bad_roundtrip = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = fn_bf16_to_float((uint16_t)h);
        const double want = bf16_value_ref((uint16_t)h);
        if (isnan(want) ? !(isnan(f) && fn_bits_of(f) == h << 16) : (double)f != want || !signbit(f) != !signbit(want))
            bad_widen++;
        if (!isnan(want) && fn_float_to_bf16(f) != h) bad_roundtrip++;
    }
    /* float32s near each bfloat16 and near each half-way point: bit patterns u + delta */
    static const int32_t deltas[] = {-1, 1, 0x7fff, 0x8000, 0x8001, 0xffff};
    for (uint32_t h = 0; h < 0x7f80; h += (h < 0x100 || h > 0x7e00) ? 1 : 7) {   /* all ends, a stride between */
        for (unsigned j = 0; j < sizeof deltas / sizeof deltas[0]; j++) {
            const uint32_t u = (h << 16) + (uint32_t)deltas[j];
            if (h == 0 && deltas[j] < 0) continue;
            for (int sign = 0; sign < 2; sign++) {
                const float f = fn_float_of(u | (uint32_t)sign << 31);
                if (isnan(f)) continue;
                if (fn_float_to_bf16(f) != bf16_nearest_ref((double)f)) bad_round++;
                /* doubles just off the float: one rounding from the double, never two */
                const double off = ldexp(fabs((double)f), -40), d1 = (double)f + off, d2 = (double)f - off;
                if (fn_double_to_bf16(d1) != bf16_nearest_ref(d1) || fn_double_to_bf16(d2) != bf16_nearest_ref(d2))
                    bad_double++;
            }
        }
    }
    /* NaNs: any payload stays NaN, quiet, with its sign */
    static const uint32_t nans[] = {0x7f800001u, 0x7fbfffffu, 0x7fc00000u, 0xff800001u, 0xffffffffu, 0x7f80ffffu};
    for (unsigned j = 0; j < sizeof nans / sizeof nans[0]; j++) {
        const uint16_t b = fn_float_to_bf16(fn_float_of(nans[j]));
        if ((b & 0x7f80) != 0x7f80 || !(b & 0x0040) || (b >> 15) != (nans[j] >> 31)) bad_nan++;
        const uint16_t bd = fn_double_to_bf16((double)fn_float_of(nans[j]));
        if ((bd & 0x7f80) != 0x7f80 || !(bd & 0x0040)) bad_nan++;
    }
    /* the run conversions of vector.c: the scalar ones, at odd lengths (vector tails) */
    static uint16_t all[65536], back[65536];
    static float wide[65536];
    for (uint32_t h = 0; h < 65536; h++) all[h] = (uint16_t)h;
    for (int64_t n = 65536; n > 0; n = n / 3 - 1) {
        fn_bf16s_to_floats(wide, all, n);
        for (int64_t i = 0; i < n; i++) bad_runs += fn_bits_of(wide[i]) != fn_bits_of(fn_bf16_to_float(all[i]));
        for (int64_t i = 0; i < n; i++) wide[i] = fn_float_of(((uint32_t)all[i] << 16) + (uint32_t)(i * 2654435761u >> 16));
        fn_floats_to_bf16s(back, wide, n);
        for (int64_t i = 0; i < n; i++) bad_runs += back[i] != fn_float_to_bf16(wide[i]);
    }
    check_close("bf16 -> float differing from the decoded value", bad_widen, 0, 0);
    check_close("bf16 -> float -> bf16 not the identity", bad_roundtrip, 0, 0);
    check_close("float -> bf16 not the nearest (even)", bad_round, 0, 0);
    check_close("double -> bf16 not rounded once", bad_double, 0, 0);
    check_close("NaN -> bf16 not a quiet NaN", bad_nan, 0, 0);
    check_close("bf16 runs differing from the scalar conversions", bad_runs, 0, 0);
    /* the fused normalize-and-round of a bfloat16 row (AVX-512F where the CPU has it) equals the
     * scalar steps, at every length up to 40 (vector body and tail) and for a long row */
    enum { N = 1003 };
    static float w[N], b[N];
    static uint16_t x[N], y[N];
    const fn_affine c = {1234.5f, 0.000123f, 0.37f};
    int bad_rows = 0;
    for (int i = 0; i < N; i++) {
        x[i] = fn_float_to_bf16(1234.5f + (float)((i * 7919) % 2001 - 1000) / 8.0f);
        w[i] = (float)(i % 13) / 4.0f - 1.0f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    x[5] = 0x7fc1, x[17] = 0x7f80, x[40] = 0x0001;           /* NaN, Inf, a subnormal */
    for (int n = 0; n <= 40; n++) {
        fn_affine_row_to_bf16s(y, x, n, c, w, b);
        for (int i = 0; i < n; i++) bad_rows += y[i] != fn_float_to_bf16(fn_affine_at(c, fn_bf16_to_float(x[i]), w[i], b[i]));
    }
    fn_affine_row_to_bf16s(y, x, N, c, w, b);
    for (int i = 0; i < N; i++) bad_rows += y[i] != fn_float_to_bf16(fn_affine_at(c, fn_bf16_to_float(x[i]), w[i], b[i]));
    check_close("fused bfloat16 rows differing", bad_rows, 0, 0);
    check_close("bf16(1/3)", fn_bf16_to_float(fn_float_to_bf16(1.0f / 3.0f)), 0.333984375, 0);
    check_close("bf16(FLT_MAX) = inf", fn_bf16_to_float(fn_float_to_bf16(3.4028235e38f)), INFINITY, 0);
}

/* A dtype convert.c does not know is refused, never decoded as another one; so is a kernel
 * call with one (nothing written). */
static void test_unknown_dtype(void)
{
    enum { UNKNOWN = 99 };     /* no fn_dtype value */
    double d[4] = {1, 2, 3, 4}, y[4] = {0}, mean = -1, rstd = -1;
    char raw[32] = {0};
    check_close("load of an unknown dtype", fn_load(d, raw, 4, 8, UNKNOWN), FN_EINVAL, 0);
    check_close("store of dtype -1", fn_store(raw, d, 4, 8, -1), FN_EINVAL, 0);
    check_close("raw untouched", raw[0] == 0 && raw[31] == 0, 1, 0);
    check_close("size of dtype 7", fn_dtype_size(7), 0, 0);
    check_close("size of float16", fn_dtype_size(FN_F16), 2, 0);
    check_close("size of bfloat16", fn_dtype_size(FN_BF16), 2, 0);
    fn_view x = {(char *)d, UNKNOWN, {32, 32, 8, 8}}, out = {(char *)y, FN_F64, {32, 32, 8, 8}};
    fn_mask none = {0};
    check_close("group_norm_forward of an unknown dtype",
                group_norm_forward(out, &mean, &rstd, x, NULL, NULL, none, 1, 1, 4, 1, 0.0, FN_MEAN_VAR, 1), FN_EINVAL, 0);
    check_close("output untouched", y[0] == 0 && mean == -1, 1, 0);
    double cnt, mu, var;
    check_close("channel_moments of an unknown dtype", channel_moments(&cnt, &mu, &var, x, none, 1, 4, 1, 1), FN_EINVAL, 0);
}

int main(void)
{
    test_layer_norm_row();
    test_mean_offset_f32();
    test_rows_f32();
    test_constant_and_nan_rows();
    test_masked_instance();
    test_channel_moments();
    test_group_backward();
    test_half_conversion();
    test_half_runs();
    test_half_sums();
    test_bf16_conversion();
    test_threads_agree();
    test_streamed_rows();
    test_unknown_dtype();
    test_size_checks();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
