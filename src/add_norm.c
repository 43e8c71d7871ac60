/* The residual add of a transformer block fused with its normalization ("Add & Norm"):
 * h = x + residual, rounded once in the array's dtype, then y = layer or RMS norm of h.
 *
 * The rows are taken in blocks that fit in the L2 cache: a block's h is written, then normalized
 * (layer_norm_rows_f32, or group_norm_forward for other dtypes and layouts) while it is still in
 * the cache, so x and residual are read from memory once and h is not read back. y has the bits
 * of the layer/RMS norm of h: the normalization is those kernels' own.
 *
 * Outputs too large to stay in the cache (fn_streaming_pays) are built in two cached scratch
 * blocks (h, y) and copied out with non-temporal stores, which skip reading each output line
 * from memory before overwriting it: the call then moves 2 reads and 2 writes per element, less
 * than two copies (each a read, a write and the read of the written line). */
#include <stdlib.h>

#include "fastnorm.h"

#include <string.h>

typedef struct {
    fn_view y, h, x, r;              /* (A, D): stride[0] between rows, stride[1] between elements */
    double *mean, *rstd;
    const double *weight, *bias;     /* group_norm_forward's parameters (doubles, or NULL) */
    const float *wf, *bf;            /* float32 rows: layer_norm_rows_f32's (as given, or NULL) */
    int64_t D, item, block;          /* item: bytes per element; block: rows per block */
    double eps;
    enum fn_stat stat;
    int f32, stream;                 /* f32: float32 rows with C-contiguous h and y; stream: see above */
} add_norm_args;

/* float16 elements go through float buffers of this many elements (on the stack) */
enum { HALF_CHUNK = 256 };

/* h = x + r for n float16 values n_* bytes apart: the sum of two halves in float is exact to
 * float's precision and is rounded once to half, as NumPy's float16 add does. */
static void add_halves(char *h, const char *x, const char *r, int64_t n, ptrdiff_t sh, ptrdiff_t sx, ptrdiff_t sr)
{
    if (sh == 2 && sx == 2 && sr == 2) {
        float a[HALF_CHUNK], b[HALF_CHUNK];
        for (int64_t i = 0; i < n; i += HALF_CHUNK) {
            const int64_t m = n - i < HALF_CHUNK ? n - i : HALF_CHUNK;
            fn_halves_to_floats(a, (const uint16_t *)x + i, m);
            fn_halves_to_floats(b, (const uint16_t *)r + i, m);
            for (int64_t k = 0; k < m; k++) a[k] += b[k];
            fn_floats_to_halves((uint16_t *)h + i, a, m);
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        const float s = fn_half_to_float(*(const uint16_t *)(x + i * sx)) +
                        fn_half_to_float(*(const uint16_t *)(r + i * sr));
        *(uint16_t *)(h + i * sh) = fn_float_to_half(s);
    }
}

/* h = x + r for n elements of T, s_* bytes apart; contiguous rows in a loop the compiler vectorizes.
 * h may be x or r (each element is read before it is written). */
#define DEFINE_ADD(NAME, T)                                                                         \
    FN_INLINE void NAME(char *h, const char *x, const char *r, int64_t n, ptrdiff_t sh, ptrdiff_t sx,   \
                     ptrdiff_t sr)                                                                  \
    {                                                                                               \
        if (sh == sizeof(T) && sx == sizeof(T) && sr == sizeof(T)) {                                \
            T *hh = (T *)h;                                                                         \
            const T *xx = (const T *)x, *rr = (const T *)r;                                         \
            for (int64_t i = 0; i < n; i++) hh[i] = xx[i] + rr[i];                                  \
            return;                                                                                 \
        }                                                                                           \
        for (int64_t i = 0; i < n; i++)                                                             \
            *(T *)(h + i * sh) = *(const T *)(x + i * sx) + *(const T *)(r + i * sr);                \
    }
DEFINE_ADD(add_floats, float)
DEFINE_ADD(add_doubles, double)
#undef DEFINE_ADD

/* h = x + r along one row of D elements, in the dtype. */
FN_INLINE void add_row(const add_norm_args *p, char *h, ptrdiff_t sh, const char *x, const char *r)
{
    if (p->x.dtype == FN_F32) add_floats(h, x, r, p->D, sh, p->x.stride[1], p->r.stride[1]);
    else if (p->x.dtype == FN_F64) add_doubles(h, x, r, p->D, sh, p->x.stride[1], p->r.stride[1]);
    else add_halves(h, x, r, p->D, sh, p->x.stride[1], p->r.stride[1]);
}

/* Row a of a 2-d view. */
FN_INLINE char *row_of(fn_view v, int64_t a) { return v.data + a * v.stride[0]; }

/* The normalization of the n rows of h into y (2-d views from their first row), on this thread. */
static int normalize_rows(const add_norm_args *p, fn_view y, fn_view h, double *mean, double *rstd, int64_t n)
{
    if (p->f32)
        return layer_norm_rows_f32((float *)y.data, mean, rstd, (const float *)h.data, p->wf, p->bf, n, p->D, p->eps,
                                   p->stat, 1);
    const fn_view y4 = {y.data, y.dtype, {y.stride[0], 0, y.stride[1], 0}};
    const fn_view h4 = {h.data, h.dtype, {h.stride[0], 0, h.stride[1], 0}};
    const fn_mask no_mask = {NULL, {0, 0}};
    return group_norm_forward(y4, mean, rstd, h4, p->weight, p->bias, no_mask, n, 1, p->D, 1, p->eps, p->stat, 1);
}

/* Rows [begin, end), a block at a time: h, then its normalization while h is in the cache. */
FN_VECTOR_CLONES static int add_norm_slice(void *ctx, int64_t begin, int64_t end, int part)
{
    const add_norm_args *p = ctx;
    const int64_t row_bytes = p->D * p->item;
    char *scratch = NULL;               /* stream: the block's h, then its y, rows contiguous */
    (void)part;
    if (p->stream) {
        size_t bytes;
        if (fn_array_bytes(2 * p->block, row_bytes, 0, 1, &bytes) || !(scratch = aligned_alloc(64, (bytes + 63) / 64 * 64)))
            return FN_ENOMEM;
    }
    int status = FN_OK;
    for (int64_t a0 = begin; a0 < end && status == FN_OK; a0 += p->block) {
        const int64_t n = end - a0 < p->block ? end - a0 : p->block;
        fn_view h = p->h, y = p->y;
        h.data = row_of(p->h, a0), y.data = row_of(p->y, a0);
        if (scratch) {                  /* contiguous rows in the scratch block */
            h.data = scratch, y.data = scratch + n * row_bytes;
            h.stride[0] = y.stride[0] = row_bytes, h.stride[1] = y.stride[1] = p->item;
        }
        for (int64_t a = 0; a < n; a++)
            add_row(p, row_of(h, a), h.stride[1], row_of(p->x, a0 + a), row_of(p->r, a0 + a));
        status = normalize_rows(p, y, h, p->mean + a0, p->rstd + a0, n);
        if (scratch) {
            fn_stream_copy(row_of(p->h, a0), h.data, n * row_bytes);
            fn_stream_copy(row_of(p->y, a0), y.data, n * row_bytes);
        }
    }
    if (scratch) fn_stream_fence();
    free(scratch);
    return status;
}

/* Rows per block: the block's h and y together take at most half of the L2 cache, so that they
 * stay there beside the lines of x and residual passing through. Small arrays are one block
 * (the cache size is read once per process: fn_cache_bytes). */
static int64_t block_rows(int64_t A, int64_t row_bytes)
{
    int64_t bytes;
    if (fn_mul_add_size(A, row_bytes, 0, &bytes)) return 1;
    if (bytes <= ((int64_t)64 << 10)) return A > 0 ? A : 1;      /* 64 KiB: less than any L2 */
    const int64_t l2 = fn_cache_bytes(2);
    const int64_t cache = l2 > 0 ? l2 : (int64_t)256 << 10;
    const int64_t rows = cache / 4 / row_bytes;
    return rows > 0 ? rows : 1;
}

/* Whether a 2-d view has C-contiguous rows of D elements of `item` bytes. */
static int contiguous_rows(fn_view v, int64_t D, int64_t item)
{
    return v.stride[1] == item && v.stride[0] == D * item;
}

int add_norm_rows(fn_view y, fn_view h, double *mean, double *rstd, fn_view x, fn_view residual,
                  const void *weight, const void *bias, int64_t A, int64_t D, double eps, enum fn_stat stat, int nthreads)
{
    if (A < 0 || D < 1 || x.dtype < FN_F16 || x.dtype > FN_F64 || residual.dtype != x.dtype ||
        h.dtype != x.dtype || y.dtype != x.dtype)
        return FN_EINVAL;
    const int64_t item = x.dtype == FN_F16 ? 2 : x.dtype == FN_F32 ? 4 : 8, row_bytes = D * item;
    const int rows = contiguous_rows(h, D, item) && contiguous_rows(y, D, item);
    int64_t outputs;                    /* elements written: h and y */
    if (fn_mul_add_size(A, D, 0, &outputs) || fn_mul_add_size(2, outputs, 0, &outputs)) outputs = INT64_MAX;
    add_norm_args p = {.y = y, .h = h, .x = x, .r = residual, .mean = mean, .rstd = rstd, .D = D, .item = item,
                       .block = block_rows(A, row_bytes), .eps = eps, .stat = stat,
                       .f32 = x.dtype == FN_F32 && rows, .stream = rows && fn_streaming_pays(outputs, item)};
    double *wb = NULL;                  /* (2, D) weight and bias as doubles for group_norm_forward */
    if (p.f32) {
        p.wf = weight, p.bf = bias;
    } else if (weight || bias) {
        size_t bytes;
        if (fn_array_bytes(2, D, 0, sizeof(double), &bytes) || !(wb = malloc(bytes))) return FN_ENOMEM;
        if (weight) fn_load(wb, weight, D, (ptrdiff_t)item, x.dtype), p.weight = wb;
        if (bias) fn_load(wb + D, bias, D, (ptrdiff_t)item, x.dtype), p.bias = wb + D;
    }
    const int status = fn_parallel_for(fn_parts(nthreads, A * D), A, add_norm_slice, &p);
    free(wb);
    return status;
}
