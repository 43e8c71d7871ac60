/* Everything that uses x86-64 intrinsics, and the non-temporal (streamed) writing of large outputs:
 *   float16 <-> float32 runs and the float16 statistics with AVX-512F or F16C conversions,
 *   bfloat16 <-> float32 runs and the bfloat16 row writer with AVX-512F,
 *   the streamed row writers of float32/64 outputs and the line carry between their rows.
 * Each vector loop computes the formula of elementwise.h (or the lanes of moments.h) with the same
 * operations in the same order, so its results equal the scalar ones bit for bit; the scalar code
 * here handles the heads, tails and CPUs without the instructions. Elsewhere than x86-64 Linux
 * (FN_X86_DISPATCH 0) only the scalar code is compiled. */
#define _POSIX_C_SOURCE 200809L     /* sysconf */
#include <stdatomic.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "elementwise.h"
#include "moments.h"

/* Contiguous runs of n float16 <-> float32 (the float16 path of the group kernels). On x86-64
 * CPUs with AVX-512F the conversion instructions do 16 at a time, with F16C 8 (exact one way, round to nearest
 * even the other, as above: the results only differ in the payload bits of a NaN). */
#if FN_X86_DISPATCH
#include <immintrin.h>

__attribute__((target("avx,f16c"))) static int64_t halves_to_floats_f16c(float *dst, const uint16_t *src, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    return i;
}

__attribute__((target("avx,f16c"))) static int64_t floats_to_halves_f16c(uint16_t *dst, const float *src, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    return i;
}

__attribute__((target("avx,f16c"))) static int64_t affine_row_to_halves_f16c(uint16_t *dst, const uint16_t *x, int64_t n,
                                                                          fn_affine c, const float *w, const float *b)
{
    const __m256 hi = _mm256_set1_ps(c.mu_hi), lo = _mm256_set1_ps(c.mu_lo), r = _mm256_set1_ps(c.rstd);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
        __m256 d = _mm256_sub_ps(_mm256_sub_ps(v, hi), lo);
        __m256 y = _mm256_add_ps(_mm256_mul_ps(d, _mm256_mul_ps(r, _mm256_loadu_ps(w + i))), _mm256_loadu_ps(b + i));
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
    }
    return i;
}

/* The lanes of shifted_sums_in_runs (moments.h) over float16 values, 8 lanes per vector: the
 * same float adds in the same order, so the same sums. Adds into a2, b2 (RUN_LANES); returns the
 * elements done (all whole groups of RUN_LANES). */
__attribute__((target("avx,f16c"))) static int64_t half_sums_f16c(const uint16_t *x, int64_t n, float shift,
                                                               double *a2, double *b2)
{
    const __m256 s = _mm256_set1_ps(shift);
    int64_t i = 0;
    while (i + RUN_LANES <= n) {
        __m256 a[RUN_LANES / 8], b[RUN_LANES / 8];
        for (int v = 0; v < RUN_LANES / 8; v++) a[v] = b[v] = _mm256_setzero_ps();
        const int64_t stop = n - i >= RUN_LANES * HALF_RUN ? i + RUN_LANES * HALF_RUN : n - (n - i) % RUN_LANES;
        for (; i < stop; i += RUN_LANES)
            for (int v = 0; v < RUN_LANES / 8; v++) {
                __m256 d = _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i + 8 * v))), s);
                a[v] = _mm256_add_ps(a[v], d);
                b[v] = _mm256_add_ps(b[v], _mm256_mul_ps(d, d));
            }
        for (int v = 0; v < RUN_LANES / 8; v++) {
            double *pa = a2 + 8 * v, *pb = b2 + 8 * v;
            _mm256_storeu_pd(pa, _mm256_add_pd(_mm256_loadu_pd(pa), _mm256_cvtps_pd(_mm256_castps256_ps128(a[v]))));
            _mm256_storeu_pd(pa + 4, _mm256_add_pd(_mm256_loadu_pd(pa + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(a[v], 1))));
            _mm256_storeu_pd(pb, _mm256_add_pd(_mm256_loadu_pd(pb), _mm256_cvtps_pd(_mm256_castps256_ps128(b[v]))));
            _mm256_storeu_pd(pb + 4, _mm256_add_pd(_mm256_loadu_pd(pb + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(b[v], 1))));
        }
    }
    return i;
}

/* The same 16 at a time with AVX-512F, which has 512-bit forms of both conversions. */
__attribute__((target("avx512f"))) static int64_t halves_to_floats_avx512(float *dst, const uint16_t *src, int64_t n)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    return i;
}

__attribute__((target("avx512f"))) static int64_t floats_to_halves_avx512(uint16_t *dst, const float *src, int64_t n)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    return i;
}

__attribute__((target("avx512f"))) static int64_t affine_row_to_halves_avx512(uint16_t *dst, const uint16_t *x, int64_t n,
                                                                            fn_affine c, const float *w, const float *b)
{
    const __m512 hi = _mm512_set1_ps(c.mu_hi), lo = _mm512_set1_ps(c.mu_lo), r = _mm512_set1_ps(c.rstd);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + i)));
        __m512 d = _mm512_sub_ps(_mm512_sub_ps(v, hi), lo);
        __m512 y = _mm512_add_ps(_mm512_mul_ps(d, _mm512_mul_ps(r, _mm512_loadu_ps(w + i))), _mm512_loadu_ps(b + i));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
    }
    return i;
}

/* One 64-byte line from `bytes` (64-byte aligned) to `line`, with a non-temporal store. */
__attribute__((target("avx512f"))) static void stream_line(char *line, const unsigned char *bytes)
{
    _mm512_stream_si512((void *)line, _mm512_load_si512((const void *)bytes));
}

/* The float32 row writers below, 16 at a time with non-temporal stores from the first 64-byte
 * aligned element of the output on (the ones before and after: plain stores, the same arithmetic).
 * They return how many elements they wrote, from 0. The row writers with a line carry get y
 * aligned and write whole vectors only (their callers write the row's head and tail).
 * backward: the vectors from the last one down (walk_backward). */
__attribute__((target("avx512f"))) static int64_t affine_row_streamed_avx512(float *y, const float *x, int64_t n,
                                                                         fn_affine c, const float *w,
                                                                         const float *b, const float *next,
                                                                         int backward)
{
    const __m512 hi = _mm512_set1_ps(c.mu_hi), lo = _mm512_set1_ps(c.mu_lo), r = _mm512_set1_ps(c.rstd);
    const int64_t whole = n / 16 * 16;
    for (int64_t v = 0; v < whole; v += 16) {
        const int64_t i = backward ? whole - 16 - v : v;
        _mm_prefetch((const char *)(next + i), _MM_HINT_T0);
        __m512 d = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), hi), lo);
        _mm512_stream_ps(y + i, _mm512_add_ps(_mm512_mul_ps(d, _mm512_mul_ps(r, _mm512_loadu_ps(w + i))),
                                              _mm512_loadu_ps(b + i)));
    }
    return whole;
}

__attribute__((target("avx512f"))) static int64_t scale_shift_streamed_avx512(float *y, const float *x,
                                                                           const float *dy, int64_t n,
                                                                           fn_scale_shift c)
{
    const __m512 hi = _mm512_set1_ps(c.mu_hi), lo = _mm512_set1_ps(c.mu_lo), k = _mm512_set1_ps(c.scale),
                 sh = _mm512_set1_ps(c.shift), kdy = _mm512_set1_ps(c.scale_dy);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), hi), lo), k);
        if (dy) v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_loadu_ps(dy + i), kdy));
        _mm512_stream_ps(y + i, _mm512_add_ps(v, sh));
    }
    return i;
}

__attribute__((target("avx512f"))) static int64_t dx_row_streamed_avx512(float *dx, const float *dy, const float *x,
                                                                     int64_t n, fn_dx c, const float *w)
{
    const __m512 rf = _mm512_set1_ps(c.rstd), c0 = _mm512_set1_ps(c.c0), hi = _mm512_set1_ps(c.mu_hi),
                 lo = _mm512_set1_ps(c.mu_lo), c1 = _mm512_set1_ps(c.c1);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 g = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(dy + i), _mm512_mul_ps(rf, _mm512_loadu_ps(w + i))), c0);
        __m512 h = _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), hi), lo), c1);
        _mm512_stream_ps(dx + i, _mm512_sub_ps(g, h));
    }
    return i;
}

__attribute__((target("avx512f"))) static int64_t affine_row_streamed_f64_avx512(double *y, const double *x, int64_t n,
                                                                             double mu, double r, const double *w,
                                                                             const double *b, const double *next)
{
    const __m512d m = _mm512_set1_pd(mu), rr = _mm512_set1_pd(r);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_prefetch((const char *)(next + i), _MM_HINT_T0);
        __m512d d = _mm512_sub_pd(_mm512_loadu_pd(x + i), m);
        _mm512_stream_pd(y + i, _mm512_add_pd(_mm512_mul_pd(d, _mm512_mul_pd(rr, _mm512_loadu_pd(w + i))),
                                              _mm512_loadu_pd(b + i)));
    }
    return i;
}

__attribute__((target("avx512f"))) static int64_t combine_rows_streamed_avx512(float *y, const float *x,
                                                                           const float *dy, int64_t n, int64_t C,
                                                                           const fn_channel_coefs *f)
{
    const float *hi = f->mu_hi, *lo = f->mu_lo, *cx = f->scale, *sh = f->shift, *cdy = f->scale_dy;
    int64_t i = 0, q = 0;                                   /* q = i % C */
    for (; i < n && ((uintptr_t)(y + i) & 63); i++, q = q + 1 == C ? 0 : q + 1)
        y[i] = dy ? fn_scale_shift_dy_at(fn_channel_at(f, q), x[i], dy[i]) : fn_scale_shift_at(fn_channel_at(f, q), x[i]);
    for (; i + 16 <= n; i += 16, q = q + 16 >= C ? q + 16 - C : q + 16) {
        __m512 d = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(hi + q)), _mm512_loadu_ps(lo + q));
        __m512 v = _mm512_mul_ps(d, _mm512_loadu_ps(cx + q));
        if (dy) v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_loadu_ps(dy + i), _mm512_loadu_ps(cdy + q)));
        _mm512_stream_ps(y + i, _mm512_add_ps(v, _mm512_loadu_ps(sh + q)));
    }
    return i;
}

#define HAS_AVX512F() __builtin_cpu_supports("avx512f")
#define HAS_AVX512BF16() __builtin_cpu_supports("avx512bf16")
#define HAS_F16C() __builtin_cpu_supports("f16c")
#else
#define HAS_F16C() 0
#define HAS_AVX512F() 0
#define HAS_AVX512BF16() 0
#define halves_to_floats_avx512(dst, src, n) ((int64_t)0)
#define floats_to_halves_avx512(dst, src, n) ((int64_t)0)
#define affine_row_to_halves_avx512(dst, x, n, c, w, b) ((int64_t)0)
#define half_sums_f16c(x, n, shift, a2, b2) ((int64_t)0)
#define halves_to_floats_f16c(dst, src, n) ((int64_t)0)
#define floats_to_halves_f16c(dst, src, n) ((int64_t)0)
#define affine_row_to_halves_f16c(dst, x, n, c, w, b) ((int64_t)0)
#define stream_line(line, bytes) memcpy((line), (bytes), 64)
#define affine_row_streamed_avx512(y, x, n, c, w, b, next, backward) ((void)(next), (void)(backward), (int64_t)0)
#define scale_shift_streamed_avx512(y, x, dy, n, c) ((int64_t)0)
#define dx_row_streamed_avx512(dx, dy, x, n, c, w) ((int64_t)0)
#define affine_row_streamed_f64_avx512(y, x, n, mu, r, w, b, next) ((void)(next), (int64_t)0)
#define combine_rows_streamed_avx512(y, x, dy, n, C, f) ((int64_t)0)
#endif

FN_VECTOR_CLONES void fn_halves_to_floats(float *dst, const uint16_t *src, int64_t n)
{
    int64_t i = HAS_AVX512F() ? halves_to_floats_avx512(dst, src, n) : 0;
    if (HAS_F16C()) i += halves_to_floats_f16c(dst + i, src + i, n - i);
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

FN_VECTOR_CLONES void fn_floats_to_halves(uint16_t *dst, const float *src, int64_t n)
{
    int64_t i = HAS_AVX512F() ? floats_to_halves_avx512(dst, src, n) : 0;
    if (HAS_F16C()) i += floats_to_halves_f16c(dst + i, src + i, n - i);
    for (; i < n; i++) dst[i] = float_to_half(src[i]);
}

/* dst[k] = half(fn_affine_at(c, half x[k], w[k], b[k])) on a float16 row, in one pass; dst may be x. */
FN_VECTOR_CLONES void fn_affine_row_to_halves(uint16_t *dst, const uint16_t *x, int64_t n, fn_affine c,
                                              const float *w, const float *b)
{
    int64_t i = HAS_AVX512F() ? affine_row_to_halves_avx512(dst, x, n, c, w, b) : 0;
    if (HAS_F16C()) i += affine_row_to_halves_f16c(dst + i, x + i, n - i, c, w + i, b + i);
    for (; i < n; i++) dst[i] = float_to_half(fn_affine_at(c, half_to_float(x[i]), w[i], b[i]));
}

/* ---- bfloat16 runs (the bfloat16 path of the group kernels) ----------------------------------------
 * The conversions of elementwise.h, 16 at a time with AVX-512F: the same integer shift, rounding
 * add and NaN select, so the same bits (AVX-512 BF16's conversion instructions would flush
 * subnormals to zero). Without AVX-512F, loops each clone vectorizes at its width. */
#if FN_X86_DISPATCH
__attribute__((target("avx512f"))) static inline __m512 bf16s_widen_avx512(const uint16_t *src)
{
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

/* float_to_bf16 of 16 floats */
__attribute__((target("avx512f"))) static inline __m256i bf16s_round_avx512(__m512 f)
{
    const __m512i u = _mm512_castps_si512(f), top = _mm512_srli_epi32(u, 16);
    const __m512i odd = _mm512_and_si512(top, _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i quiet = _mm512_or_si512(top, _mm512_set1_epi32(0x0040));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

__attribute__((target("avx512f"))) static int64_t bf16s_to_floats_avx512(float *dst, const uint16_t *src, int64_t n)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, bf16s_widen_avx512(src + i));
    return i;
}

__attribute__((target("avx512f"))) static int64_t floats_to_bf16s_avx512(uint16_t *dst, const float *src, int64_t n)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(dst + i), bf16s_round_avx512(_mm512_loadu_ps(src + i)));
    return i;
}

/* fn_affine_at of 16 bfloat16 at a time, as affine_row_to_halves_avx512 */
__attribute__((target("avx512f"))) static int64_t affine_row_to_bf16s_avx512(uint16_t *dst, const uint16_t *x, int64_t n,
                                                                           fn_affine c, const float *w, const float *b)
{
    const __m512 hi = _mm512_set1_ps(c.mu_hi), lo = _mm512_set1_ps(c.mu_lo), r = _mm512_set1_ps(c.rstd);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 d = _mm512_sub_ps(_mm512_sub_ps(bf16s_widen_avx512(x + i), hi), lo);
        __m512 y = _mm512_add_ps(_mm512_mul_ps(d, _mm512_mul_ps(r, _mm512_loadu_ps(w + i))), _mm512_loadu_ps(b + i));
        _mm256_storeu_si256((__m256i *)(dst + i), bf16s_round_avx512(y));
    }
    return i;
}

/* A float16 (dtype FN_F16) or bfloat16 row normalized and rounded as fn_affine_row_to_halves /
 * fn_affine_row_to_bf16s, on whole 64-byte lines of y (32 values, y aligned), each written with one
 * non-temporal store; returns how many elements it wrote. */
__attribute__((target("avx512f"))) static int64_t affine_row_to_16bit_streamed_avx512(uint16_t *y, const uint16_t *x,
                                                                                    int64_t n, int dtype, fn_affine c,
                                                                                    const float *w, const float *b)
{
    const __m512 hi = _mm512_set1_ps(c.mu_hi), lo = _mm512_set1_ps(c.mu_lo), r = _mm512_set1_ps(c.rstd);
    const int half = dtype == FN_F16;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i h[2];
        for (int v = 0; v < 2; v++) {
            const uint16_t *xk = x + i + 16 * v;
            const __m512 xf = half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)xk)) : bf16s_widen_avx512(xk);
            const __m512 d = _mm512_sub_ps(_mm512_sub_ps(xf, hi), lo);
            const __m512 out = _mm512_add_ps(_mm512_mul_ps(d, _mm512_mul_ps(r, _mm512_loadu_ps(w + i + 16 * v))),
                                             _mm512_loadu_ps(b + i + 16 * v));
            h[v] = half ? _mm512_cvtps_ph(out, _MM_FROUND_TO_NEAREST_INT) : bf16s_round_avx512(out);
        }
        _mm512_stream_si512((void *)(y + i), _mm512_inserti64x4(_mm512_castsi256_si512(h[0]), h[1], 1));
    }
    return i;
}

/* 32 floats, lo then hi, rounded to bfloat16 as float_to_bf16 does: by AVX-512 BF16's conversion
 * when no value is subnormal (it flushes those to zero; NaN, infinities and rounding otherwise
 * agree), else by the integer rounding. */
__attribute__((target("avx512f,avx512bf16"))) static inline __m512i bf16s_round_pair(__m512 lo, __m512 hi)
{
    const __m512 least = _mm512_set1_ps(0x1p-126f), zero = _mm512_setzero_ps();
    const __mmask16 sub_lo = _mm512_cmp_ps_mask(_mm512_abs_ps(lo), least, _CMP_LT_OQ) &
                             _mm512_cmp_ps_mask(lo, zero, _CMP_NEQ_OQ);
    const __mmask16 sub_hi = _mm512_cmp_ps_mask(_mm512_abs_ps(hi), least, _CMP_LT_OQ) &
                             _mm512_cmp_ps_mask(hi, zero, _CMP_NEQ_OQ);
    if (!(sub_lo | sub_hi)) return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    return _mm512_inserti64x4(_mm512_castsi256_si512(bf16s_round_avx512(lo)), bf16s_round_avx512(hi), 1);
}

/* affine_row_to_16bit_streamed_avx512 for bfloat16 with AVX-512 BF16's rounding (bf16s_round_pair). */
__attribute__((target("avx512f,avx512bf16"))) static int64_t affine_row_to_bf16s_streamed_bf16(uint16_t *y,
                                                                                            const uint16_t *x,
                                                                                            int64_t n, fn_affine c,
                                                                                            const float *w,
                                                                                            const float *b)
{
    const __m512 hi = _mm512_set1_ps(c.mu_hi), lo = _mm512_set1_ps(c.mu_lo), r = _mm512_set1_ps(c.rstd);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 out[2];
        for (int v = 0; v < 2; v++) {
            const int64_t k = i + 16 * v;
            const __m512 d = _mm512_sub_ps(_mm512_sub_ps(bf16s_widen_avx512(x + k), hi), lo);
            out[v] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_mul_ps(r, _mm512_loadu_ps(w + k))), _mm512_loadu_ps(b + k));
        }
        _mm512_stream_si512((void *)(y + i), bf16s_round_pair(out[0], out[1]));
    }
    return i;
}

/* half_sums_f16c 16 lanes per vector (the same lanes, adds and order: the same sums), over float16
 * (dtype FN_F16) or bfloat16 values. */
__attribute__((target("avx512f"))) static int64_t sums_16bit_avx512(const uint16_t *x, int64_t n, int dtype,
                                                                  float shift, double *a2, double *b2)
{
    const int half = dtype == FN_F16;
    const __m512 s = _mm512_set1_ps(shift);
    int64_t i = 0;
    while (i + RUN_LANES <= n) {
        __m512 a[RUN_LANES / 16], b[RUN_LANES / 16];
        for (int v = 0; v < RUN_LANES / 16; v++) a[v] = b[v] = _mm512_setzero_ps();
        const int64_t stop = n - i >= RUN_LANES * HALF_RUN ? i + RUN_LANES * HALF_RUN : n - (n - i) % RUN_LANES;
        for (; i < stop; i += RUN_LANES)
            for (int v = 0; v < RUN_LANES / 16; v++) {
                const uint16_t *xv = x + i + 16 * v;
                __m512 d = _mm512_sub_ps(half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)xv))
                                              : bf16s_widen_avx512(xv), s);
                a[v] = _mm512_add_ps(a[v], d);
                b[v] = _mm512_add_ps(b[v], _mm512_mul_ps(d, d));
            }
        for (int v = 0; v < RUN_LANES / 16; v++) {
            double *pa = a2 + 16 * v, *pb = b2 + 16 * v;
            const __m256 al = _mm512_castps512_ps256(a[v]), bl = _mm512_castps512_ps256(b[v]);
            const __m256 ah = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[v]), 1));
            const __m256 bh = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b[v]), 1));
            _mm512_storeu_pd(pa, _mm512_add_pd(_mm512_loadu_pd(pa), _mm512_cvtps_pd(al)));
            _mm512_storeu_pd(pa + 8, _mm512_add_pd(_mm512_loadu_pd(pa + 8), _mm512_cvtps_pd(ah)));
            _mm512_storeu_pd(pb, _mm512_add_pd(_mm512_loadu_pd(pb), _mm512_cvtps_pd(bl)));
            _mm512_storeu_pd(pb + 8, _mm512_add_pd(_mm512_loadu_pd(pb + 8), _mm512_cvtps_pd(bh)));
        }
    }
    return i;
}

#define HAS_AVX512F_BF16_RUNS() __builtin_cpu_supports("avx512f")
#else
#define affine_row_to_bf16s_streamed_bf16(y, x, n, c, w, b) ((int64_t)0)
#define sums_16bit_avx512(x, n, dtype, shift, a2, b2) ((int64_t)0)
#define affine_row_to_16bit_streamed_avx512(y, x, n, dtype, c, w, b) ((int64_t)0)
#define HAS_AVX512F_BF16_RUNS() 0
#define bf16s_to_floats_avx512(dst, src, n) ((int64_t)0)
#define floats_to_bf16s_avx512(dst, src, n) ((int64_t)0)
#define affine_row_to_bf16s_avx512(dst, x, n, c, w, b) ((int64_t)0)
#endif

FN_VECTOR_CLONES void fn_bf16s_to_floats(float *dst, const uint16_t *src, int64_t n)
{
    int64_t i = HAS_AVX512F_BF16_RUNS() ? bf16s_to_floats_avx512(dst, src, n) : 0;
#pragma omp simd
    for (int64_t k = i; k < n; k++) dst[k] = bf16_to_float(src[k]);
}

FN_VECTOR_CLONES void fn_floats_to_bf16s(uint16_t *dst, const float *src, int64_t n)
{
    int64_t i = HAS_AVX512F_BF16_RUNS() ? floats_to_bf16s_avx512(dst, src, n) : 0;
#pragma omp simd
    for (int64_t k = i; k < n; k++) dst[k] = float_to_bf16(src[k]);
}

/* dst[k] = bf16(fn_affine_at(c, bf16 x[k], w[k], b[k])) on a bfloat16 row, in one pass; dst may be x. */
FN_VECTOR_CLONES void fn_affine_row_to_bf16s(uint16_t *dst, const uint16_t *x, int64_t n, fn_affine c, const float *w,
                                             const float *b)
{
    int64_t i = HAS_AVX512F_BF16_RUNS() ? affine_row_to_bf16s_avx512(dst, x, n, c, w, b) : 0;
#pragma omp simd
    for (int64_t k = i; k < n; k++) dst[k] = float_to_bf16(fn_affine_at(c, bf16_to_float(x[k]), w[k], b[k]));
}

/* shifted_sums_in_runs (moments.h) with run HALF_RUN over float16 (dtype FN_F16) or bfloat16 values,
 * read in place: sums of d = x - shift and d*d, the lanes with AVX-512F (or, float16, F16C) where the
 * CPU has them; the same sums either way. */
FN_VECTOR_CLONES static void sums_16bit(const uint16_t *x, int64_t n, int dtype, float shift, double *sum_d,
                                        double *sum_dd)
{
    const int half = dtype == FN_F16;
    double s1 = 0.0, s2 = 0.0;
    FN_LANES double a2[RUN_LANES] = {0}, b2[RUN_LANES] = {0};
    int64_t i = HAS_AVX512F() ? sums_16bit_avx512(x, n, dtype, shift, a2, b2)
                : half && HAS_F16C() ? half_sums_f16c(x, n, shift, a2, b2) : 0;
    while (i + RUN_LANES <= n) {
        FN_LANES float a[RUN_LANES] = {0}, b[RUN_LANES] = {0};
        const int64_t stop = n - i >= RUN_LANES * HALF_RUN ? i + RUN_LANES * HALF_RUN : n - (n - i) % RUN_LANES;
        for (; i < stop; i += RUN_LANES)
            for (int j = 0; j < RUN_LANES; j++) {
                float d = (half ? half_to_float(x[i + j]) : bf16_to_float(x[i + j])) - shift;
                a[j] += d;
                b[j] += d * d;
            }
        for (int j = 0; j < RUN_LANES; j++) a2[j] += a[j], b2[j] += b[j];
    }
    for (; i < n; i++) {
        double d = (double)(half ? half_to_float(x[i]) : bf16_to_float(x[i])) - (double)shift;
        s1 += d;
        s2 += d * d;
    }
    *sum_d = s1 + sum_of_lanes(a2, RUN_LANES);
    *sum_dd = s2 + sum_of_lanes(b2, RUN_LANES);
}

void fn_half_sums(const uint16_t *x, int64_t n, float shift, double *sum_d, double *sum_dd)
{
    sums_16bit(x, n, FN_F16, shift, sum_d, sum_dd);
}

void fn_bf16_sums(const uint16_t *x, int64_t n, float shift, double *sum_d, double *sum_dd)
{
    sums_16bit(x, n, FN_BF16, shift, sum_d, sum_dd);
}

/* The size in bytes of the data cache of `level` (2, 3) that CPU 0 uses, 0 when unknown: from
 * Linux's /sys/devices/system/cpu/cpu0/cache, the kernel's reading of the CPU, else glibc's
 * sysconf. sysfs comes first because sysconf reports, on some AMD processors in virtual machines,
 * the L3 of the whole package (12 x 32 MiB = 384 MiB here) instead of the slice a core shares.
 * Read once per process and level. */
static int64_t cache_from_sysfs(int level)
{
    for (int index = 0; index < 16; index++) {
        char path[80], type[16] = "", size[32] = "";
        int lv = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", index);
        FILE *f = fopen(path, "r");
        if (!f) return 0;
        if (fscanf(f, "%d", &lv) != 1) lv = 0;
        fclose(f);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/type", index);
        if ((f = fopen(path, "r"))) {
            if (fscanf(f, "%15s", type) != 1) type[0] = 0;
            fclose(f);
        }
        if (lv != level || strcmp(type, "Instruction") == 0) continue;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
        if (!(f = fopen(path, "r"))) return 0;
        const int got = fscanf(f, "%31s", size);
        fclose(f);
        char *unit;
        const long long n = got == 1 ? strtoll(size, &unit, 10) : 0;
        if (n <= 0) return 0;
        return (int64_t)n * (*unit == 'K' ? 1024 : *unit == 'M' ? 1024 * 1024 : 1);
    }
    return 0;
}

int64_t fn_cache_bytes(int level)
{
    static _Atomic int64_t known[4] = {-1, -1, -1, -1};       /* -1: not read yet */
    if (level < 2 || level > 3) return 0;
    int64_t bytes = atomic_load_explicit(&known[level], memory_order_relaxed);
    if (bytes >= 0) return bytes;
    bytes = cache_from_sysfs(level);
#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
    if (bytes == 0) {
        const long n = sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
        bytes = n > 0 ? n : 0;
    }
#endif
    atomic_store_explicit(&known[level], bytes, memory_order_relaxed);
    return bytes;
}

/* Large outputs go to memory anyway: writing them with non-temporal stores skips reading
 * each output line into the cache before it is overwritten, a third of the traffic of a
 * normalization. Worth it from half the last-level cache up (the output would not stay in the
 * cache; the size is asked of the machine) and with AVX-512F (64-byte stores). */
int fn_streaming_pays(int64_t elements, int64_t item)
{
    int64_t bytes;
    if (fn_mul_add_size(elements, item, 0, &bytes)) bytes = INT64_MAX;   /* a zero-stride output */
    if (bytes < ((int64_t)8 << 20)) return 0;           /* at least 8 MiB: below any last-level cache */
    const int64_t cache = fn_cache_bytes(3);
    const int64_t from = cache > 0 ? cache / 2 : (int64_t)32 << 20;
    return HAS_AVX512F() && bytes >= from;
}

/* dst[0, bytes) = src[0, bytes): the whole 64-byte lines of dst with non-temporal stores (AVX-512F;
 * callers stream only where fn_streaming_pays, which asks for it), the partial ones at the ends
 * with plain stores. */
#if FN_X86_DISPATCH
__attribute__((target("avx512f"))) static void stream_copy_avx512(char *dst, const char *src, int64_t bytes)
{
    int64_t i = (int64_t)((64 - ((uintptr_t)dst & 63)) & 63);
    if (i > bytes) i = bytes;
    memcpy(dst, src, (size_t)i);
    for (; i + 64 <= bytes; i += 64) _mm512_stream_si512((void *)(dst + i), _mm512_loadu_si512((const void *)(src + i)));
    memcpy(dst + i, src + i, (size_t)(bytes - i));
}
#endif

void fn_stream_copy(char *dst, const char *src, int64_t bytes)
{
#if FN_X86_DISPATCH
    if (HAS_AVX512F()) {
        stream_copy_avx512(dst, src, bytes);
        return;
    }
#endif
    memcpy(dst, src, (size_t)bytes);
}

void fn_line_carry_flush(fn_line_carry *carry)
{
    if (carry && carry->valid) memcpy(carry->line, carry->bytes, (size_t)carry->valid);
    if (carry) carry->line = NULL, carry->valid = 0;
}

/* The first len bytes of a row, from y on (before its first line boundary), values in v: when the
 * carry holds the end of the row before in the same line, they complete it and the line goes out
 * whole with one non-temporal store; otherwise plain stores (after what the carry held). */
static void put_row_head(fn_line_carry *carry, char *y, const void *v, int64_t len)
{
    char *line = y - ((uintptr_t)y & 63);
    if (len > 0 && carry && carry->line == line && carry->valid == y - line && carry->valid + len == 64) {
        memcpy(carry->bytes + carry->valid, v, (size_t)len);
        stream_line(line, carry->bytes);
        carry->line = NULL, carry->valid = 0;
        return;
    }
    fn_line_carry_flush(carry);
    memcpy(y, v, (size_t)len);
}

/* The last len bytes of a row, from the line boundary y on, values in v: held in the carry for the
 * next row's head to complete (without a carry: plain stores). */
static void put_row_tail(fn_line_carry *carry, char *y, const void *v, int64_t len)
{
    if (!carry || len == 0) {
        memcpy(y, v, (size_t)len);
        return;
    }
    fn_line_carry_flush(carry);                    /* empty after any put_row_head; kept for safety */
    memcpy(carry->bytes, v, (size_t)len);
    carry->line = y, carry->valid = len;
}

/* The body of a streamed row writer: y[i] = ELEMENT(i) for i < n, of type T. Without AVX-512F all
 * with plain stores; with it, the head (to y's first line boundary) and the tail (after the last
 * whole vector) computed here and put through the carry, the whole vectors between by BODY, an
 * AVX-512 call on y + h_ (aligned) that returns how many elements it wrote. */
#define STREAMED_ROW(T, y, n, ELEMENT, BODY)                                                        \
    do {                                                                                            \
        _Alignas(64) T v_[64 / sizeof(T)];                                                          \
        if (!HAS_AVX512F()) {                                                                       \
            for (int64_t i = 0; i < (n); i++) (y)[i] = ELEMENT(i);                                  \
            break;                                                                                  \
        }                                                                                           \
        const int64_t h_ = head_elements((y), (n), sizeof(T));                                      \
        for (int64_t i = 0; i < h_; i++) v_[i] = ELEMENT(i);                                        \
        put_row_head(carry, (char *)(y), v_, h_ * (int64_t)sizeof(T));                              \
        const int64_t t_ = h_ + (BODY);                                                             \
        for (int64_t i = t_; i < (n); i++) v_[i - t_] = ELEMENT(i);                                 \
        put_row_tail(carry, (char *)((y) + t_), v_, ((n) - t_) * (int64_t)sizeof(T));               \
    } while (0)

/* y[k] = fn_affine_at(c, x[k], w[k], b[k]), streamed. Call fn_stream_fence before another thread reads y. With `next` (the next row's x),
 * one line of it is prefetched into L1 per line written, so that the next row's statistics find
 * it there instead of waiting for memory at the row's start (the hardware prefetcher does not
 * cross the 4 KiB page that a row of 1024 floats is). */
void fn_affine_row_streamed(float *y, const float *x, int64_t n, fn_affine c, const float *w, const float *b,
                            const float *next, fn_line_carry *carry)
{
#define AFFINE(i) fn_affine_at(c, x[i], w[i], b[i])
    STREAMED_ROW(float, y, n, AFFINE,
                 affine_row_streamed_avx512(y + h_, x + h_, n - h_, c, w + h_, b + h_, (next ? next : x) + h_,
                                            walk_backward(y, x)));
#undef AFFINE
}

/* fn_affine_row_to_halves (dtype FN_F16) or fn_affine_row_to_bf16s (FN_BF16), streamed: the whole
 * lines with non-temporal stores, the head (to y's first line boundary) and the tail by the plain
 * writer, through the carry. */
void fn_affine_row_to_16bit_streamed(uint16_t *y, const uint16_t *x, int64_t n, int dtype, fn_affine c,
                                     const float *w, const float *b, fn_line_carry *carry)
{
    void (*plain)(uint16_t *, const uint16_t *, int64_t, fn_affine, const float *, const float *) =
        dtype == FN_F16 ? fn_affine_row_to_halves : fn_affine_row_to_bf16s;
    _Alignas(64) uint16_t v[32];
    if (!HAS_AVX512F()) {
        plain(y, x, n, c, w, b);
        return;
    }
    const int64_t h = head_elements(y, n, sizeof *y);
    plain(v, x, h, c, w, b);
    put_row_head(carry, (char *)y, v, h * (int64_t)sizeof *y);
    const int64_t t = h + (dtype == FN_BF16 && HAS_AVX512BF16()
                               ? affine_row_to_bf16s_streamed_bf16(y + h, x + h, n - h, c, w + h, b + h)
                               : affine_row_to_16bit_streamed_avx512(y + h, x + h, n - h, dtype, c, w + h, b + h));
    plain(v, x + t, n - t, c, w + t, b + t);
    put_row_tail(carry, (char *)(y + t), v, (n - t) * (int64_t)sizeof *y);
}

/* y[i] = fn_scale_shift_at(c, x[i]), or with dy fn_scale_shift_dy_at(c, x[i], dy[i]) (one channel's
 * plane), streamed. y may be x or dy. */
void fn_scale_shift_streamed(float *y, const float *x, const float *dy, int64_t n, fn_scale_shift c,
                             fn_line_carry *carry)
{
#define SCALE_SHIFT(i) (dy ? fn_scale_shift_dy_at(c, x[i], dy[i]) : fn_scale_shift_at(c, x[i]))
    STREAMED_ROW(float, y, n, SCALE_SHIFT,
                 scale_shift_streamed_avx512(y + h_, x + h_, dy ? dy + h_ : NULL, n - h_, c));
#undef SCALE_SHIFT
}

/* y[k] = fn_affine_f64_at(mu, r, x[k], w[k], b[k]), streamed. */
void fn_affine_row_streamed_f64(double *y, const double *x, int64_t n, double mu, double r, const double *w,
                                const double *b, const double *next, fn_line_carry *carry)
{
#define AFFINE(i) fn_affine_f64_at(mu, r, x[i], w[i], b[i])
    STREAMED_ROW(double, y, n, AFFINE,
                 affine_row_streamed_f64_avx512(y + h_, x + h_, n - h_, mu, r, w + h_, b + h_,
                                                (next ? next : x) + h_));
#undef AFFINE
}

/* Contiguous float32 rows of C >= 16 channels, n elements from a row start: element i is
 * fn_scale_shift_at (fn_scale_shift_dy_at with dy) of channel i % C, streamed. f: each array of
 * 2C coefficients, the C channels written twice over, so that 16 channels from any q < C are
 * contiguous. dy may be NULL. */
void fn_combine_rows_streamed(float *y, const float *x, const float *dy, int64_t n, int64_t C,
                              const fn_channel_coefs *f)
{
    int64_t i = HAS_AVX512F() ? combine_rows_streamed_avx512(y, x, dy, n, C, f) : 0;
    for (; i < n; i++) {
        const fn_scale_shift c = fn_channel_at(f, i % C);
        y[i] = dy ? fn_scale_shift_dy_at(c, x[i], dy[i]) : fn_scale_shift_at(c, x[i]);
    }
}

/* dx[k] = fn_dx_at(c, dy[k], x[k], w[k]), streamed. dx may be dy. */
void fn_dx_row_streamed(float *dx, const float *dy, const float *x, int64_t n, fn_dx c, const float *w,
                        fn_line_carry *carry)
{
#define DX(i) fn_dx_at(c, dy[i], x[i], w[i])
    STREAMED_ROW(float, dx, n, DX, dx_row_streamed_avx512(dx + h_, dy + h_, x + h_, n - h_, c, w + h_));
#undef DX
}
#undef STREAMED_ROW

void fn_stream_fence(void)
{
#if FN_X86_DISPATCH
    _mm_sfence();
#endif
}
