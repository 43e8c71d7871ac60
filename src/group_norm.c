/* Layer, RMS, instance and group norm: one statistic per (a, g) of the (A, G, K, S) view.
 *
 *   layer/RMS norm   (rows, 1, D, 1)          statistics along each row
 *   instance norm    (N, C, 1, H*W)           statistics per (sample, channel)
 *   group norm       (N, G, C/G, H*W)         statistics per (sample, group)
 *
 * weight/bias index the channel g*K + k; the mask marks real (a, s) positions.
 * Each call chooses one path (enum forward_path, enum backward_path) from the dtypes and layout:
 * contiguous float32 rows or groups, float16, bfloat16 and float64 groups are read in place; anything else
 * (strided groups, mixed dtypes) goes through a contiguous double buffer, and so does every group
 * with padding. The statistics come from moments.h, every output formula from elementwise.h. */
#include <stdlib.h>

#include "elementwise.h"
#include "moments.h"

/* ---- groups in memory ---- */

/* The address of group (a, g) of v. */
FN_INLINE char *group_at(fn_view v, int64_t a, int64_t g)
{
    return v.data + a * v.stride[0] + g * v.stride[1];
}

/* A group (K, S) whose elements are contiguous in memory (k-major). */
FN_INLINE int group_contiguous(fn_view v, int64_t K, int64_t S)
{
    const ptrdiff_t item = fn_dtype_size(v.dtype);
    return (S == 1 || v.stride[3] == item) && (K == 1 || v.stride[2] == S * item);
}

/* buf[k*S + s] = v[a, g, k, s] */
FN_INLINE void load_group(double *buf, fn_view v, int64_t a, int64_t g, int64_t K, int64_t S)
{
    const char *p = group_at(v, a, g);
    if (S == 1) {
        fn_load(buf, p, K, v.stride[2], v.dtype);
    } else {
        for (int64_t k = 0; k < K; k++) fn_load(buf + k * S, p + k * v.stride[2], S, v.stride[3], v.dtype);
    }
}

/* v[a, g, k, s] = buf[k*S + s] */
FN_INLINE void store_group(fn_view v, const double *buf, int64_t a, int64_t g, int64_t K, int64_t S)
{
    char *p = group_at(v, a, g);
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

/* buf (K, S) = 0 where m[s] is 0 */
FN_INLINE void zero_padding(double *buf, const unsigned char *m, int64_t K, int64_t S)
{
    for (int64_t k = 0; k < K; k++)
        for (int64_t s = 0; s < S; s++)
            if (!m[s]) buf[k * S + s] = 0.0;
}

/* The largest |w[k]|, k < n: the float paths' bound for rstd * w (float_arithmetic_fits). */
FN_INLINE double max_abs_f32(const float *w, int64_t n)
{
    float m = 0.0f;
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < n; k++) m = fabsf(w[k]) > m ? fabsf(w[k]) : m;
    return (double)m;
}

/* ---- weight and bias, as the paths read them ----
 * Made once per call: doubles for the double paths (ones and zeros standing in for a missing
 * one), float copies for the float32/float16 paths, and max |w| for float_arithmetic_fits
 * (vector clones: max_abs_f32 is a vector loop). */
typedef struct {
    const double *w, *b;
    const float *wf, *bf;
    double w_max;
    void *owned;                     /* the one allocation behind them, or NULL */
} group_params;

FN_VECTOR_CLONES static int params_make(group_params *q, const double *weight, const double *bias, int64_t n)
{
    const int64_t n_pad = (n + 15) / 16 * 16;           /* each array starts on a 64-byte line */
    size_t bytes;
    *q = (group_params){0};
    if (fn_array_bytes(6, n_pad, 16, sizeof(float), &bytes) || !(q->owned = alloc_lines(bytes))) return FN_ENOMEM;
    double *ones = q->owned, *zeros = ones + n_pad;
    float *wf = (float *)(zeros + n_pad), *bf = wf + n_pad;
    for (int64_t c = 0; c < n; c++) {
        ones[c] = 1.0, zeros[c] = 0.0;
        wf[c] = weight ? (float)weight[c] : 1.0f, bf[c] = bias ? (float)bias[c] : 0.0f;
    }
    *q = (group_params){weight ? weight : ones, bias ? bias : zeros, wf, bf, max_abs_f32(wf, n), q->owned};
    return FN_OK;
}

/* The same from float32 weight and bias (the rows entry): no copy unless one is missing. */
FN_VECTOR_CLONES static int params_make_f32(group_params *q, const float *weight, const float *bias, int64_t n)
{
    *q = (group_params){.wf = weight, .bf = bias};
    if (!weight || !bias) {
        size_t bytes;
        if (fn_array_bytes(2, n, 0, sizeof(float), &bytes) || !(q->owned = malloc(bytes))) return FN_ENOMEM;
        float *ones = q->owned, *zeros = ones + n;
        for (int64_t k = 0; k < n; k++) ones[k] = 1.0f, zeros[k] = 0.0f;
        q->wf = weight ? weight : ones, q->bf = bias ? bias : zeros;
    }
    q->w_max = max_abs_f32(q->wf, n);
    return FN_OK;
}

/* ---- the output of one group, by dtype ---- */

/* y = fn_affine_at(c, x, w[k], b[k]) of a contiguous float32 row of K; y may be x.
 * The elements before y's first 64-byte line go first, so that no vector store splits a line; when
 * y is a little ahead of x modulo 4 KiB, the row is walked backward (walk_backward, moments.h). */
FN_INLINE void affine_row_f32(float *y, const float *x, int64_t K, fn_affine c, const float *w, const float *b)
{
    const int64_t h = head_elements(y, K, sizeof *y);
    if (walk_backward(y, x)) {
        /* the tail after the last whole 16 elements, the 16s from the last down, the head */
        const int64_t t = h + (K - h) / 16 * 16;
#pragma omp simd
        for (int64_t k = t; k < K; k++) y[k] = fn_affine_at(c, x[k], w[k], b[k]);
        for (int64_t k0 = t - 16; k0 >= h; k0 -= 16) {
            /* counted from 0 to a constant: one vector, no checks */
#pragma omp simd
            for (int j = 0; j < 16; j++) y[k0 + j] = fn_affine_at(c, x[k0 + j], w[k0 + j], b[k0 + j]);
        }
#pragma omp simd
        for (int64_t k = 0; k < h; k++) y[k] = fn_affine_at(c, x[k], w[k], b[k]);
        return;
    }
#pragma omp simd
    for (int64_t k = 0; k < h; k++) y[k] = fn_affine_at(c, x[k], w[k], b[k]);
#pragma omp simd
    for (int64_t k = h; k < K; k++) y[k] = fn_affine_at(c, x[k], w[k], b[k]);
}

/* affine_row_f32 out of line: inlined into a loop over rows, GCC ran out of registers. */
FN_OUT_OF_LINE FN_VECTOR_CLONES void affine_row_f32_call(float *y, const float *x, int64_t K, fn_affine c,
                                                         const float *w, const float *b)
{
    affine_row_f32(y, x, K, c, w, b);
}

/* A contiguous float32 group (K, S) in float: rows as above, planes with the scale of each channel
 * rounded once (fn_scale_shift_at). y may be x. */
FN_INLINE void affine_group_f32(float *y, const float *x, int64_t K, int64_t S, double mu, double r,
                                const float *w, const float *b)
{
    if (S == 1) {
        affine_row_f32(y, x, K, fn_affine_of(mu, r), w, b);
        return;
    }
    for (int64_t k = 0; k < K; k++) {
        const fn_scale_shift c = fn_scale_shift_of(mu, r * (double)w[k], b[k], 0.0);
#pragma omp simd
        for (int64_t s = 0; s < S; s++) y[k * S + s] = fn_scale_shift_at(c, x[k * S + s]);
    }
}

/* A contiguous float32 or float16 group in double arithmetic, element by element: the groups whose
 * float arithmetic could overflow (float_arithmetic_fits). y may be x. */
FN_OUT_OF_LINE void affine_group_in_double(void *y, const void *x, int dtype, int64_t K, int64_t S, double mu,
                                           double r, const float *w, const float *b)
{
    const ptrdiff_t item = fn_dtype_size(dtype);
    for (int64_t i = 0; i < K * S; i++) {
        double v;
        fn_load(&v, (const char *)x + i * item, 1, item, dtype);
        v = fn_affine_f64_at(mu, r, v, (double)w[i / S], (double)b[i / S]);
        fn_store((char *)y + i * item, &v, 1, item, dtype);
    }
}

/* A float64 group, or the double buffer of any group; y may be x. */
FN_INLINE void affine_group_f64(double *y, const double *x, int64_t K, int64_t S, double mu, double r,
                                const double *w, const double *b)
{
    if (S == 1) {
#pragma omp simd
        for (int64_t k = 0; k < K; k++) y[k] = fn_affine_f64_at(mu, r, x[k], w[k], b[k]);
        return;
    }
    for (int64_t k = 0; k < K; k++) {
        const double wk = w[k], bk = b[k];      /* in registers: y may alias w, b for all GCC knows */
        const double *xk = x + k * S;
        double *yk = y + k * S;
#pragma omp simd
        for (int64_t s = 0; s < S; s++) yk[s] = fn_affine_f64_at(mu, r, xk[s], wk, bk);
    }
}

/* ---- forward ---- */

enum forward_path {
    FWD_F32_ROWS,                    /* layer/RMS norm of float32 rows, contiguous, no mask */
    FWD_F32,                         /* contiguous float32 groups (padded groups: buffered) */
    FWD_F16,                         /* contiguous float16 groups (padded groups: buffered) */
    FWD_F64,                         /* contiguous float64 groups (padded groups: buffered) */
    FWD_BF16,                        /* contiguous bfloat16 groups (padded groups: buffered) */
    FWD_BUFFERED                     /* every group through a double buffer */
};

/* Everything a slice of (a, g) groups needs; shared read-only by the threads of one call. */
typedef struct {
    fn_view y, x, dy;
    double *mean, *rstd, *partial;   /* partial: (parts, 2, G*K) dweight/dbias sums per slice */
    group_params q;
    fn_mask mask;
    int64_t A, G, K, S;
    double eps;
    enum fn_stat stat;
    int path;                        /* enum forward_path or enum backward_path */
    int stream;                      /* write rows (S = 1) with non-temporal stores */
} group_args;

/* One slice's scratch, one allocation: n_doubles doubles (buf, and real after the first n_group
 * of them when there are 2 * n_group: the buffered groups), n_floats floats and the mask row m (S). */
typedef struct {
    double *buf, *real;
    float *floats;
    unsigned char *m;
} slice_scratch;

static int scratch_make(slice_scratch *sc, int64_t n_doubles, int64_t n_floats, int64_t n_group, int64_t S)
{
    int64_t n;
    size_t bytes;
    *sc = (slice_scratch){0};
    if (fn_mul_add_size(n_floats, sizeof(float), S + 1, &n) || fn_array_bytes(sizeof(double), n_doubles, n, 1, &bytes) ||
        !(sc->buf = alloc_lines(bytes)))
        return FN_ENOMEM;
    sc->real = n_doubles - n_group >= n_group ? sc->buf + n_group : NULL;
    sc->floats = (float *)(sc->buf + n_doubles);
    sc->m = (unsigned char *)(sc->floats + n_floats);
    return FN_OK;
}

/* The prefetch target of a streamed row: the next row of the slice, when rows are short enough
 * (at most NEXT_ROW_BYTES) not to push the row being written out of L1; NULL otherwise. */
enum { NEXT_ROW_BYTES = 16 << 10 };

FN_INLINE const char *next_row(fn_view v, int64_t i, int64_t end, int64_t G, int64_t row_bytes)
{
    if (i + 1 >= end || row_bytes > NEXT_ROW_BYTES) return NULL;
    return group_at(v, (i + 1) / G, (i + 1) % G);
}

/* Group i of a contiguous float32 call: statistics, then the output in float (streamed rows
 * through the slice's carry), or in double where float could overflow. */
FN_INLINE void forward_f32(const group_args *p, int64_t i, int64_t end, double *mu, double *r, fn_line_carry *carry)
{
    const int64_t a = i / p->G, g = i % p->G, K = p->K, S = p->S;
    const float *x = (const float *)group_at(p->x, a, g), *w = p->q.wf + g * K, *b = p->q.bf + g * K;
    float *y = (float *)group_at(p->y, a, g);
    group_stats_f32(x, K * S, p->stat, p->eps, mu, r);
    if (!float_arithmetic_fits(*r, p->q.w_max, K * S))
        affine_group_in_double(y, x, FN_F32, K, S, *mu, *r, w, b);
    else if (S == 1 && p->stream)
        fn_affine_row_streamed(y, x, K, fn_affine_of(*mu, *r), w, b,
                               (const float *)next_row(p->x, i, end, p->G, K * 4), carry);
    else
        affine_group_f32(y, x, K, S, *mu, *r, w, b);
}

/* Group (a, g) of a contiguous float16 call: statistics read in place, the float32 arithmetic:
 * a row normalized and rounded in one pass, planes through a float copy. */
FN_INLINE void forward_f16(const group_args *p, const slice_scratch *sc, int64_t i, int64_t end, double *mu, double *r,
                            fn_line_carry *carry)
{
    const int64_t a = i / p->G, g = i % p->G, K = p->K, S = p->S;
    const char *next = S == 1 ? next_row(p->x, i, end, p->G, K * 2) : NULL;
    if (next) prefetch_bytes(next, K * 2);          /* rows of 2 KiB: the prefetcher stops at each 4 KiB page */
    const uint16_t *x = (const uint16_t *)group_at(p->x, a, g);
    uint16_t *y = (uint16_t *)group_at(p->y, a, g);
    const float *w = p->q.wf + g * K, *b = p->q.bf + g * K;
    group_stats_f16(x, K * S, p->stat, p->eps, mu, r);
    if (!float_arithmetic_fits(*r, p->q.w_max, K * S)) {
        affine_group_in_double(y, x, FN_F16, K, S, *mu, *r, w, b);
    } else if (S == 1 && p->stream) {
        fn_affine_row_to_16bit_streamed(y, x, K, FN_F16, fn_affine_of(*mu, *r), w, b, carry);
    } else if (S == 1) {
        fn_affine_row_to_halves(y, x, K, fn_affine_of(*mu, *r), w, b);
    } else {
        fn_halves_to_floats(sc->floats, x, K * S);
        affine_group_f32(sc->floats, sc->floats, K, S, *mu, *r, w, b);
        fn_floats_to_halves(y, sc->floats, K * S);
    }
}

/* Group (a, g) of a contiguous bfloat16 call: a row's statistics read in place in float runs
 * (group_stats_bf16), planes and the rows those cannot serve widened into the slice's float copy
 * (exactly) for the float32 group's statistics; then the float32 arithmetic, each output rounded
 * once to bfloat16 (a row in one pass from x, planes through the copy). */
FN_INLINE void forward_bf16(const group_args *p, const slice_scratch *sc, int64_t i, int64_t end, double *mu,
                             double *r, fn_line_carry *carry)
{
    const int64_t a = i / p->G, g = i % p->G, K = p->K, S = p->S;
    const char *next = S == 1 ? next_row(p->x, i, end, p->G, K * 2) : NULL;
    if (next) prefetch_bytes(next, K * 2);          /* as forward_f16 */
    const uint16_t *x = (const uint16_t *)group_at(p->x, a, g);
    uint16_t *y = (uint16_t *)group_at(p->y, a, g);
    const float *w = p->q.wf + g * K, *b = p->q.bf + g * K;
    const int widened = S > 1 || group_stats_bf16(x, K, p->stat, p->eps, mu, r);
    if (widened) {                                   /* planes, or rows whose float sums fall short */
        fn_bf16s_to_floats(sc->floats, x, K * S);
        group_stats_f32(sc->floats, K * S, p->stat, p->eps, mu, r);
    }
    if (!float_arithmetic_fits(*r, p->q.w_max, K * S)) {
        affine_group_in_double(y, x, FN_BF16, K, S, *mu, *r, w, b);
    } else if (S == 1 && p->stream) {
        fn_affine_row_to_16bit_streamed(y, x, K, FN_BF16, fn_affine_of(*mu, *r), w, b, carry);
    } else if (S == 1) {
        fn_affine_row_to_bf16s(y, x, K, fn_affine_of(*mu, *r), w, b);
    } else {
        affine_group_f32(sc->floats, sc->floats, K, S, *mu, *r, w, b);
        fn_floats_to_bf16s(y, sc->floats, K * S);
    }
}

/* Group i of a contiguous float64 call. */
FN_INLINE void forward_f64(const group_args *p, int64_t i, int64_t end, double *mu, double *r, fn_line_carry *carry)
{
    const int64_t a = i / p->G, g = i % p->G, K = p->K, S = p->S;
    const double *x = (const double *)group_at(p->x, a, g), *w = p->q.w + g * K, *b = p->q.b + g * K;
    double *y = (double *)group_at(p->y, a, g);
    group_stats_f64(x, K * S, p->stat, p->eps, mu, r);
    if (S == 1 && p->stream)
        fn_affine_row_streamed_f64(y, x, K, *mu, *r, w, b, (const double *)next_row(p->x, i, end, p->G, K * 8), carry);
    else
        affine_group_f64(y, x, K, S, *mu, *r, w, b);
}

/* Group (a, g) through the double buffer, s_real of its S positions real (m): statistics of the
 * real elements, y = 0 at padding. A group with no real element gets mu = r = 0. */
FN_INLINE void forward_buffered(const group_args *p, const slice_scratch *sc, int64_t a, int64_t g, int64_t s_real,
                                double *mu, double *r)
{
    const int64_t K = p->K, S = p->S;
    load_group(sc->buf, p->x, a, g, K, S);
    *mu = *r = 0.0;
    if (s_real == S) group_stats_f64(sc->buf, K * S, p->stat, p->eps, mu, r);
    else if (s_real > 0) group_stats_f64(sc->real, gather_real(sc->real, sc->buf, sc->m, K, S), p->stat, p->eps, mu, r);
    affine_group_f64(sc->buf, sc->buf, K, S, *mu, *r, p->q.w + g * K, p->q.b + g * K);
    if (s_real < S) zero_padding(sc->buf, sc->m, K, S);
    store_group(p->y, sc->buf, a, g, K, S);
}

/* Forward over groups [begin, end) of the flattened (A, G) index, groups with padding buffered. */
FN_VECTOR_CLONES static int forward_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const group_args *p = ctx;
    int64_t a_loaded = -1, s_real = 0;
    fn_line_carry carry = {.line = NULL};      /* streamed rows: the line shared with the next one */
    slice_scratch sc;
    (void)part;
    /* the double buffer and the real elements for buffered groups, or a float copy of float16 planes */
    const int64_t n_group = p->K * p->S;
    const int64_t n_floats = (p->path == FWD_F16 && p->S > 1) || p->path == FWD_BF16 ? n_group : 0;
    int64_t n_doubles = 0;
    if ((p->path == FWD_BUFFERED || p->mask.data) && fn_mul_add_size(2, n_group, 0, &n_doubles)) return FN_ENOMEM;
    if (scratch_make(&sc, n_doubles, n_floats, n_group, p->S)) return FN_ENOMEM;
    for (int64_t i = begin; i < end; i++) {
        const int64_t a = i / p->G, g = i % p->G;
        double mu, r;
        if (a != a_loaded) s_real = load_mask_row(sc.m, p->mask, a, p->S), a_loaded = a;
        if (s_real < p->S || p->path == FWD_BUFFERED) forward_buffered(p, &sc, a, g, s_real, &mu, &r);
        else if (p->path == FWD_F32) forward_f32(p, i, end, &mu, &r, &carry);
        else if (p->path == FWD_F16) forward_f16(p, &sc, i, end, &mu, &r, &carry);
        else if (p->path == FWD_BF16) forward_bf16(p, &sc, i, end, &mu, &r, &carry);
        else forward_f64(p, i, end, &mu, &r, &carry);
        p->mean[i] = mu;
        p->rstd[i] = r;
    }
    fn_line_carry_flush(&carry);
    if (p->stream) fn_stream_fence();
    free(sc.buf);
    return FN_OK;
}

/* Rows [begin, end) of a float32 layer/RMS norm (FWD_F32_ROWS). Short rows that are not streamed
 * take row a + 1's statistics before row a's output, so that the end of a row's statistics (lane
 * sums, division, square root) overlaps the output of the row before; rows in place are safe, as
 * row a + 1 is read before it is written. */
FN_VECTOR_CLONES static int rows_f32_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const group_args *p = ctx;
    const int64_t D = p->K;
    const float *w = p->q.wf, *b = p->q.bf;
    const int short_rows = D * (int64_t)sizeof(float) <= NEXT_ROW_BYTES;
    fn_line_carry carry = {.line = NULL};     /* streamed rows: the line shared with the next one */
    (void)part;
    if (!short_rows || p->stream) {
        for (int64_t i = begin; i < end; i++) forward_f32(p, i, end, &p->mean[i], &p->rstd[i], &carry);
        fn_line_carry_flush(&carry);
        if (p->stream) fn_stream_fence();
        return FN_OK;
    }
#define ROW(v, a) ((float *)((v).data + (a) * (v).stride[0]))
    if (begin < end) group_stats_f32(ROW(p->x, begin), D, p->stat, p->eps, &p->mean[begin], &p->rstd[begin]);
    for (int64_t a = begin; a < end; a++) {
        if (a + 1 < end) group_stats_f32(ROW(p->x, a + 1), D, p->stat, p->eps, &p->mean[a + 1], &p->rstd[a + 1]);
        if (float_arithmetic_fits(p->rstd[a], p->q.w_max, D))
            affine_row_f32_call(ROW(p->y, a), ROW(p->x, a), D, fn_affine_of(p->mean[a], p->rstd[a]), w, b);
        else
            affine_group_in_double(ROW(p->y, a), ROW(p->x, a), FN_F32, D, 1, p->mean[a], p->rstd[a], w, b);
    }
#undef ROW
    return FN_OK;
}

/* The path of a forward call, chosen once. */
static enum forward_path forward_path_of(fn_view y, fn_view x, fn_mask mask, int64_t G, int64_t K, int64_t S)
{
    const int contiguous = x.dtype == y.dtype && group_contiguous(x, K, S) && group_contiguous(y, K, S);
    if (!contiguous) return FWD_BUFFERED;
    if (x.dtype == FN_F32) return G == 1 && S == 1 && !mask.data ? FWD_F32_ROWS : FWD_F32;
    if (x.dtype == FN_F16) return FWD_F16;
    if (x.dtype == FN_BF16) return FWD_BF16;
    return x.dtype == FN_F64 ? FWD_F64 : FWD_BUFFERED;   /* a dtype with no in-place path: buffered */
}

static int valid_views(fn_view a, fn_view b, int64_t A, int64_t G, int64_t K, int64_t S)
{
    return A >= 0 && G >= 0 && K >= 0 && S >= 0 && fn_dtype_size(a.dtype) && fn_dtype_size(b.dtype);
}

int group_norm_forward(fn_view y, double *mean, double *rstd, fn_view x,
                       const double *weight, const double *bias, fn_mask mask,
                       int64_t A, int64_t G, int64_t K, int64_t S, double eps, enum fn_stat stat, int nthreads)
{
    if (!valid_views(x, y, A, G, K, S)) return FN_EINVAL;
    group_args p = {.y = y, .x = x, .mean = mean, .rstd = rstd, .mask = mask, .A = A, .G = G, .K = K, .S = S,
                    .eps = eps, .stat = stat, .path = forward_path_of(y, x, mask, G, K, S),
                    .stream = S == 1 && fn_streaming_pays(A * G * K, fn_dtype_size(y.dtype))};
    if (params_make(&p.q, weight, bias, G * K)) return FN_ENOMEM;
    const int parts = fn_parts(nthreads, A * G * K * S);
    const int status = fn_parallel_for(parts, A * G, p.path == FWD_F32_ROWS ? rows_f32_slice : forward_slice, &p);
    free(p.q.owned);
    return status;
}

int layer_norm_rows_f32(float *y, double *mean, double *rstd, const float *x, const float *weight,
                        const float *bias, int64_t A, int64_t D, double eps, enum fn_stat stat, int nthreads)
{
    if (A < 0 || D < 1) return FN_EINVAL;
    const ptrdiff_t row = D * (ptrdiff_t)sizeof(float);
    group_args p = {.y = {(char *)y, FN_F32, {row, row, 4, 4}}, .x = {(char *)x, FN_F32, {row, row, 4, 4}},
                    .mean = mean, .rstd = rstd, .A = A, .G = 1, .K = D, .S = 1, .eps = eps, .stat = stat,
                    .path = FWD_F32_ROWS, .stream = fn_streaming_pays(A * D, sizeof(float))};
    if (params_make_f32(&p.q, weight, bias, D)) return FN_ENOMEM;
    const int status = fn_parallel_for(fn_parts(nthreads, A * D), A, rows_f32_slice, &p);
    free(p.q.owned);
    return status;
}

/* ---- backward ---- */

enum backward_path {
    BWD_F32_ROWS,                    /* layer/RMS norm of float32 rows, contiguous, no mask: two at a time */
    BWD_F32,                         /* contiguous float32 groups (padded groups: buffered) */
    BWD_BUFFERED                     /* every group through double buffers */
};

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

/* Group (a, g) through the double buffers, s_real of its S positions real: dx = rstd * (g -
 * mean(g) - xhat * mean(g * xhat)), g = dy * w, without mean(g) for RMS; padding adds nothing
 * (x = dy = 0 there, even if NaN) and gets dx = 0. */
FN_INLINE void backward_buffered(const group_args *p, const slice_scratch *sc, int64_t a, int64_t g, int64_t s_real,
                                 double mu, double r, double *dw, double *db)
{
    const int64_t K = p->K, S = p->S;
    const double *w = p->q.w + g * K;
    double *bx = sc->buf, *bdy = sc->real, sum_g, sum_g_xhat;
    load_group(bx, p->x, a, g, K, S);
    load_group(bdy, p->dy, a, g, K, S);
    if (s_real < S) zero_padding(bx, sc->m, K, S), zero_padding(bdy, sc->m, K, S);
    backward_sums(bx, bdy, K, S, mu, r, w, dw, db, &sum_g, &sum_g_xhat);
    const double n = (double)(s_real * K);
    const double mean_g = (p->stat == FN_MEAN_SQUARE || n == 0.0) ? 0.0 : sum_g / n;
    const double mean_g_xhat = n == 0.0 ? 0.0 : sum_g_xhat / n;
    if (S == 1) {
#pragma omp simd
        for (int64_t k = 0; k < K; k++) bdy[k] = fn_dx_buffered_at(mu, r, mean_g, mean_g_xhat, bdy[k], bx[k], w[k]);
    } else {
        for (int64_t k = 0; k < K; k++) {
            const double wk = w[k];
            const double *xk = bx + k * S;
            double *dk = bdy + k * S;
#pragma omp simd
            for (int64_t s = 0; s < S; s++) dk[s] = fn_dx_buffered_at(mu, r, mean_g, mean_g_xhat, dk[s], xk[s], wk);
        }
    }
    if (s_real < S) zero_padding(bdy, sc->m, K, S);
    store_group(p->y, bdy, a, g, K, S);
}

/* dx of a contiguous float32 group (K, S) in double: the groups whose float coefficients could
 * overflow (see dx_group_f32). dx may be dy. */
FN_OUT_OF_LINE void dx_group_in_double(float *dx, const float *dy, const float *x, int64_t K, int64_t S, double mu,
                                       double r, const float *w, double c0, double c1)
{
    for (int64_t i = 0; i < K * S; i++) dx[i] = (float)fn_dx_f64_at(mu, r, c0, c1, dy[i], x[i], w[i / S]);
}

/* dx = fn_dx_at of one contiguous float32 group from its sums: c0 = -r * mean(g) (0 for RMS),
 * c1 = r^2 * mean(g * xhat). r * w fits a float (the caller checked float_arithmetic_fits); c0 and
 * c1 are checked here. A streamed row shares its end line through the slice's carry. */
FN_INLINE void dx_group_f32(const group_args *p, int64_t a, int64_t g, double mu, double r, double sum_g,
                            double sum_g_xhat, fn_line_carry *carry)
{
    const int64_t K = p->K, S = p->S;
    const float *x = (const float *)group_at(p->x, a, g), *dy = (const float *)group_at(p->dy, a, g);
    const float *w = p->q.wf + g * K;
    float *dx = (float *)group_at(p->y, a, g);
    const double n = (double)(K * S);
    const double c0 = p->stat == FN_MEAN_SQUARE ? 0.0 : -r * sum_g / n, c1 = r * r * sum_g_xhat / n;
    if (!(fabs(c0) <= 0x1p100 && fabs(c1) <= 0x1p100)) {
        dx_group_in_double(dx, dy, x, K, S, mu, r, w, c0, c1);
        return;
    }
    const fn_dx c = fn_dx_of(mu, r, c0, c1);
    if (S == 1 && p->stream) {
        fn_dx_row_streamed(dx, dy, x, K, c, w, carry);
    } else if (S == 1) {
#pragma omp simd
        for (int64_t k = 0; k < K; k++) dx[k] = fn_dx_at(c, dy[k], x[k], w[k]);
    } else {
        for (int64_t k = 0; k < K; k++) {
            const float wk = w[k];                  /* in a register: dx may alias w for all GCC knows */
            const float *xk = x + k * S, *dyk = dy + k * S;
            float *dxk = dx + k * S;
#pragma omp simd
            for (int64_t s = 0; s < S; s++) dxk[s] = fn_dx_at(c, dyk[s], xk[s], wk);
        }
    }
}

/* Backward of one contiguous float32 group (no padding), read in place: adds the group's
 * dweight/dbias sums into dw, db (K), then dx_group_f32. Planes of F32_RUNS_FROM elements or more
 * take their sums in float runs (grad_sums_in_runs, moments.h), others in double. */
FN_INLINE void backward_f32(const group_args *p, int64_t a, int64_t g, double mu, double r, double *dw, double *db,
                            fn_line_carry *carry)
{
    const int64_t K = p->K, S = p->S;
    const float *x = (const float *)group_at(p->x, a, g), *dy = (const float *)group_at(p->dy, a, g);
    const double *w = p->q.w + g * K;
    double sum_g = 0.0, sum_g_xhat = 0.0;
    if (S >= F32_RUNS_FROM) {
        for (int64_t k = 0; k < K; k++) {
            double dbk, dwk;
            grad_sums_in_runs(x + k * S, dy + k * S, S, fn_affine_of(mu, r), &dbk, &dwk);
            dw[k] += dwk;
            db[k] += dbk;
            sum_g += dbk * w[k];
            sum_g_xhat += dwk * w[k];
        }
    } else {
        backward_sums_f32(x, dy, K, S, mu, r, w, dw, db, &sum_g, &sum_g_xhat);
    }
    dx_group_f32(p, a, g, mu, r, sum_g, sum_g_xhat, carry);
}

/* backward_f32 of the two float32 rows a and a + 1 of a layer norm (G = 1, S = 1), with float
 * sums as the forward's float32 statistics (moments.h): the row sums sum(g) and sum(g * xhat) in
 * float over runs of F32_RUN vectors of ROW_LANES per lane, then in double, and the rows'
 * dweight/dbias terms added into the float column sums dwf, dbf (K), which the slice adds into its
 * double sums every BACKWARD_ROWS_RUN rows. Each float sum errs by at most ~10 float ulps of the
 * sum of its terms' magnitudes. mu, r: (2) the rows' statistics. */
enum { ROW_LANES = 16, BACKWARD_ROWS_RUN = 8 };

FN_INLINE void backward_two_rows_f32(const group_args *p, int64_t a, const double *mu, const double *r,
                                     float *restrict dwf, float *restrict dbf, fn_line_carry *carry)
{
    const int64_t K = p->K;
    const float *restrict wf = p->q.wf;
    const float *restrict xa = (const float *)group_at(p->x, a, 0), *restrict xb = (const float *)group_at(p->x, a + 1, 0);
    const float *restrict ga = (const float *)group_at(p->dy, a, 0), *restrict gb = (const float *)group_at(p->dy, a + 1, 0);
    const fn_affine ca = fn_affine_of(mu[0], r[0]), cb = fn_affine_of(mu[1], r[1]);
    /* lanes of sum(g), sum(g * xhat) of row a, then of row b */
    FN_LANES double s0[ROW_LANES] = {0}, s1[ROW_LANES] = {0}, s2[ROW_LANES] = {0}, s3[ROW_LANES] = {0};
    int64_t k = 0;
    while (k + ROW_LANES <= K) {
        FN_LANES float t0[ROW_LANES] = {0}, t1[ROW_LANES] = {0}, t2[ROW_LANES] = {0}, t3[ROW_LANES] = {0};
        const int64_t stop = K - k >= ROW_LANES * F32_RUN ? k + ROW_LANES * F32_RUN : K - (K - k) % ROW_LANES;
        for (; k < stop; k += ROW_LANES)
            for (int j = 0; j < ROW_LANES; j++) {
                const float ha = fn_xhat_at(ca, xa[k + j]), hb = fn_xhat_at(cb, xb[k + j]);
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
        const float ha = fn_xhat_at(ca, xa[k]), hb = fn_xhat_at(cb, xb[k]), da = ga[k], db = gb[k];
        s0[0] += (double)da * wf[k];
        s1[0] += (double)da * wf[k] * ha;
        s2[0] += (double)db * wf[k];
        s3[0] += (double)db * wf[k] * hb;
        dwf[k] += da * ha + db * hb;
        dbf[k] += da + db;
    }
    dx_group_f32(p, a, 0, mu[0], r[0], sum_of_lanes(s0, ROW_LANES), sum_of_lanes(s1, ROW_LANES), carry);
    dx_group_f32(p, a + 1, 0, mu[1], r[1], sum_of_lanes(s2, ROW_LANES), sum_of_lanes(s3, ROW_LANES), carry);
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

/* Backward over groups [begin, end): dx, and this slice's dweight/dbias sums in p->partial.
 * Groups whose float arithmetic could overflow (float_arithmetic_fits) and groups with padding
 * are buffered; float32 rows go two at a time. */
FN_VECTOR_CLONES static int backward_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const group_args *p = ctx;
    const int64_t G = p->G, K = p->K, S = p->S, n_group = K * S, n_pad = (K + 15) / 16 * 16;
    const int rows = p->path == BWD_F32_ROWS;
    int64_t a_loaded = -1, s_real = 0, n_doubles;
    fn_line_carry carry = {.line = NULL};      /* streamed dx rows: the line shared with the next one */
    slice_scratch sc;
    if (fn_mul_add_size(2, n_group, 0, &n_doubles) || scratch_make(&sc, n_doubles, rows ? 2 * n_pad : 0, n_group, S))
        return FN_ENOMEM;
    float *dwf = sc.floats, *dbf = sc.floats + n_pad;    /* rows: float column sums */
    double *dweight = p->partial + (int64_t)part * 2 * G * K, *dbias = dweight + G * K;
    for (int64_t c = 0; c < G * K; c++) dweight[c] = dbias[c] = 0.0;
    for (int64_t c = 0; rows && c < K; c++) dwf[c] = dbf[c] = 0.0f;
    int rows_pending = 0;                                /* rows in dwf, dbf */
    for (int64_t i = begin; i < end; i++) {
        const int64_t a = i / G, g = i % G;
        double *dw = dweight + g * K, *db = dbias + g * K;
        const double mu = p->stat == FN_MEAN_SQUARE ? 0.0 : p->mean[i], r = p->rstd[i];
        const int fits = float_arithmetic_fits(r, p->q.w_max, n_group);
        if (a != a_loaded) s_real = load_mask_row(sc.m, p->mask, a, S), a_loaded = a;
        if (rows && i + 1 < end && fits && float_arithmetic_fits(p->rstd[i + 1], p->q.w_max, n_group)) {
            const double mu2[2] = {mu, p->stat == FN_MEAN_SQUARE ? 0.0 : p->mean[i + 1]}, r2[2] = {r, p->rstd[i + 1]};
            backward_two_rows_f32(p, a, mu2, r2, dwf, dbf, &carry);
            if ((rows_pending += 2) >= BACKWARD_ROWS_RUN) flush_float_sums(dw, db, dwf, dbf, K), rows_pending = 0;
            i++;
        } else if (p->path != BWD_BUFFERED && s_real == S && fits) {
            backward_f32(p, a, g, mu, r, dw, db, &carry);
        } else {
            backward_buffered(p, &sc, a, g, s_real, mu, r, dw, db);
        }
    }
    if (rows) flush_float_sums(dweight, dbias, dwf, dbf, K);
    fn_line_carry_flush(&carry);
    if (p->stream) fn_stream_fence();
    free(sc.buf);
    return FN_OK;
}

/* The path of a backward call, chosen once. */
static enum backward_path backward_path_of(fn_view dx, fn_view dy, fn_view x, fn_mask mask, int64_t G, int64_t K,
                                           int64_t S)
{
    if (!(x.dtype == FN_F32 && dy.dtype == FN_F32 && dx.dtype == FN_F32 && group_contiguous(x, K, S) &&
          group_contiguous(dy, K, S) && group_contiguous(dx, K, S)))
        return BWD_BUFFERED;
    return G == 1 && S == 1 && !mask.data ? BWD_F32_ROWS : BWD_F32;
}

int group_norm_backward(fn_view dx, double *dweight, double *dbias, fn_view dy, fn_view x,
                        const double *mean, const double *rstd, const double *weight,
                        fn_mask mask, int64_t A, int64_t G, int64_t K, int64_t S, enum fn_stat stat, int nthreads)
{
    if (!valid_views(x, dx, A, G, K, S) || !fn_dtype_size(dy.dtype) || !dweight || !dbias) return FN_EINVAL;
    int parts = fn_parts(nthreads, A * G * K * S);
    if (parts > A * G) parts = A * G > 0 ? (int)(A * G) : 1;
    size_t partial_bytes;
    group_args p = {.y = dx, .x = x, .dy = dy, .mean = (double *)mean, .rstd = (double *)rstd, .mask = mask,
                    .A = A, .G = G, .K = K, .S = S, .stat = stat, .path = backward_path_of(dx, dy, x, mask, G, K, S),
                    .stream = S == 1 && dx.dtype == FN_F32 && fn_streaming_pays(A * G * K, sizeof(float))};
    if (fn_array_bytes(2 * (int64_t)parts, G * K, 1, sizeof(double), &partial_bytes) ||
        !(p.partial = malloc(partial_bytes)))
        return FN_ENOMEM;
    if (params_make(&p.q, weight, NULL, G * K)) {
        free(p.partial);
        return FN_ENOMEM;
    }
    const int status = fn_parallel_for(parts, A * G, backward_slice, &p);
    /* dweight, dbias = the slices' sums, added in slice order */
    for (int64_t c = 0; c < G * K; c++) {
        double dw = 0.0, db = 0.0;
        for (int q = 0; q < parts; q++) dw += p.partial[(q * 2) * G * K + c], db += p.partial[(q * 2 + 1) * G * K + c];
        dweight[c] = dw;
        dbias[c] = db;
    }
    free(p.partial);
    free(p.q.owned);
    return status;
}
