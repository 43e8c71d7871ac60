/* fastnorm kernels: plain C11, no Python headers.
 *
 * Size key
 *   A  outer positions that each get their own statistics (samples, tokens)
 *   G  groups per position (1 for layer/RMS norm, C for instance norm)
 *   K  channels per group, carried by weight/bias (D for layer norm, C/G for group norm)
 *   S  positions inside a group that share one channel (H*W for instance/group norm, 1 otherwise)
 *   O, C, S  batch-norm view: statistics per channel c over every (o, s)
 *
 * Every array is addressed by byte strides, so any layout (transposed, sliced, negative strides)
 * reaches a kernel without a copy. Elements must be native-endian and aligned; the Python layer
 * copies the rare buffers that are not. Statistics are accumulated in double (float32 data may add
 * short runs in float first, with a proven error bound and a double fallback: moments.h). Outputs
 * of float64 data, and of strided or masked groups, are computed in double; contiguous float32 and
 * float16 outputs in float, with the mean split into two floats (elementwise.h), falling back to
 * double wherever a float coefficient could overflow or lose its precision.
 *
 * Kernels overwrite their outputs (never accumulate into caller memory) and return FN_OK or an
 * FN_E* status; they keep no global state and allocate only per call. `nthreads` is the most
 * threads a call may use; small inputs run on the calling thread. Sums split across threads are
 * combined in a fixed order, so a result depends on the thread count but never on timing.
 */
#ifndef FASTNORM_H
#define FASTNORM_H

#include <stddef.h>
#include <stdint.h>

/* Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and the best one the CPU has is
 * picked at load time (GCC/clang function multi-versioning); elsewhere they are compiled once.
 * No -ffast-math, no FMA contraction across the clones: only the vector width differs. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(FASTNORM_NO_CLONES)
#define FN_X86_DISPATCH 1
#define FN_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FN_X86_DISPATCH 0
#define FN_VECTOR_CLONES
#endif
/* Lane arrays of the hot loops, aligned for whole-vector access. Declared, not left to the
 * compiler's own choice: GCC 12 under ASan's detect_stack_use_after_return places arrays it
 * aligned by itself at 32-byte offsets of the fake stack frame, where 64-byte stores fault. */
#define FN_LANES _Alignas(64)
/* Helpers of the hot loops are inlined into each clone, so they get its vector width too. */
/* Rare paths of header helpers stay out of line (and may go unused in a file). */
#if defined(__GNUC__)
#define FN_INLINE static inline __attribute__((always_inline))
#define FN_OUT_OF_LINE static __attribute__((noinline, unused))
#else
#define FN_INLINE static inline
#define FN_OUT_OF_LINE static
#endif

/* FN_BF16: bfloat16 (ml_dtypes.bfloat16), the upper half of a float32; computed in float32/double. */
enum fn_dtype { FN_F16 = 0, FN_F32 = 1, FN_F64 = 2, FN_BF16 = 3 };
enum fn_status { FN_OK = 0, FN_ENOMEM = 1, FN_EINVAL = 2 };
/* The statistic a group is normalized by: mean and variance (layer, instance, group norm), or the
 * mean square alone, with no centering (RMS norm). */
enum fn_stat { FN_MEAN_VAR = 0, FN_MEAN_SQUARE = 1 };

/* ---- checked size arithmetic ------------------------------------------------------------------
 * Scratch sizes come from array shapes, and a zero-stride view (np.broadcast_to) may have 2**60
 * elements in no memory at all: the product sizing a buffer for it overflows. Every scratch size
 * and byte count in src/ is computed with these, never with a bare `n * sizeof(T)`:
 * *out = a * b + c for a, b, c >= 0, or FN_ENOMEM when that exceeds INT64_MAX (= PTRDIFF_MAX, which
 * no allocation can reach), reported as a failed allocation would be. */
FN_INLINE int fn_mul_add_size(int64_t a, int64_t b, int64_t c, int64_t *out)
{
    int64_t product;
    if (a < 0 || b < 0 || c < 0) return FN_ENOMEM;
#if defined(__GNUC__)
    if (__builtin_mul_overflow(a, b, &product) || __builtin_add_overflow(product, c, out)) return FN_ENOMEM;
#else
    if (b != 0 && a > INT64_MAX / b) return FN_ENOMEM;
    product = a * b;
    if (product > INT64_MAX - c) return FN_ENOMEM;
    *out = product + c;
#endif
    return FN_OK;
}

/* The bytes of a scratch array of a * n + extra elements of `item` bytes, checked as above. */
FN_INLINE int fn_array_bytes(int64_t a, int64_t n, int64_t extra, size_t item, size_t *bytes)
{
    int64_t elements, total;
    if (fn_mul_add_size(a, n, extra, &elements) || fn_mul_add_size(elements, (int64_t)item, 0, &total))
        return FN_ENOMEM;
    *bytes = (size_t)total;
    return FN_OK;
}

/* A strided view of up to 4 dimensions; `stride` is in bytes. */
typedef struct {
    char *data;
    int dtype;              /* enum fn_dtype */
    ptrdiff_t stride[4];
} fn_view;

/* A strided boolean (one byte per element) view; data == NULL means "no mask: all real". */
typedef struct {
    const unsigned char *data;
    ptrdiff_t stride[2];
} fn_mask;

/* ---- parallel.c: slices of [0, n) on POSIX threads made for one call ---- */
enum { FN_PARALLEL_MIN_ELEMENTS = 1 << 17 };   /* below this, threads cost more than they give */
typedef int (*fn_body)(void *ctx, int64_t begin, int64_t end, int part);
int fn_parallel_for(int parts, int64_t n, fn_body body, void *ctx);
/* The first index of slice p when fn_parallel_for splits [0, n) into `parts` slices. */
int64_t fn_slice_start(int64_t n, int p, int parts);
/* How many slices `elements` of work is worth with at most `nthreads` threads (>= 1). */
int fn_parts(int nthreads, int64_t elements);

/* ---- convert.c: strided elements of any dtype to and from contiguous doubles ----
 * FN_EINVAL for a dtype it does not know (nothing is read or written). */
int fn_dtype_size(int dtype);                 /* bytes of one element; 0 for an unknown dtype */
int fn_load(double *dst, const char *src, int64_t n, ptrdiff_t stride, int dtype);
int fn_store(char *dst, const double *src, int64_t n, ptrdiff_t stride, int dtype);
float fn_half_to_float(uint16_t h);
uint16_t fn_float_to_half(float f);
float fn_bf16_to_float(uint16_t h);
uint16_t fn_float_to_bf16(float f);
uint16_t fn_double_to_bf16(double d);

/* ---- vector.c: the intrinsics, and non-temporal writing of large outputs ----
 * The coefficient structs (fn_affine, fn_scale_shift, fn_dx) and the formulas they stand for are in
 * elementwise.h. */
typedef struct fn_affine fn_affine;
typedef struct fn_scale_shift fn_scale_shift;
typedef struct fn_dx fn_dx;
typedef struct fn_channel_coefs fn_channel_coefs;
void fn_halves_to_floats(float *dst, const uint16_t *src, int64_t n);
void fn_floats_to_halves(uint16_t *dst, const float *src, int64_t n);
void fn_affine_row_to_halves(uint16_t *dst, const uint16_t *x, int64_t n, fn_affine c, const float *w,
                             const float *b);
void fn_half_sums(const uint16_t *x, int64_t n, float shift, double *sum_d, double *sum_dd);
void fn_bf16_sums(const uint16_t *x, int64_t n, float shift, double *sum_d, double *sum_dd);
void fn_bf16s_to_floats(float *dst, const uint16_t *src, int64_t n);
void fn_floats_to_bf16s(uint16_t *dst, const float *src, int64_t n);
void fn_affine_row_to_bf16s(uint16_t *dst, const uint16_t *x, int64_t n, fn_affine c, const float *w,
                            const float *b);
/* The streamed writers compute the same formulas with non-temporal stores (the same bits).
 * next: the next row's x (n elements), brought into L1 while this row is written, or NULL.
 * carry (or NULL): for rows written one after another into contiguous memory by one thread, the
 * 64-byte line shared by the end of one row and the start of the next waits there until both
 * are known and is then written whole with one non-temporal store, instead of with plain stores
 * at both ends of every row, each of which would read the line from memory first.
 * Zero-initialize it; fn_line_carry_flush writes out what waits at the end of the run. */
typedef struct {
    _Alignas(64) unsigned char bytes[64];
    char *line;                      /* the line of the output the bytes belong to, or NULL */
    int64_t valid;                   /* bytes[0, valid) hold the end of a row */
} fn_line_carry;
void fn_line_carry_flush(fn_line_carry *carry);
/* Whether writing `elements` outputs of `item` bytes with non-temporal stores pays off. */
int fn_streaming_pays(int64_t elements, int64_t item);
int64_t fn_cache_bytes(int level);                 /* L2 or L3 data cache of CPU 0, bytes; 0: unknown */
void fn_stream_copy(char *dst, const char *src, int64_t bytes);
void fn_affine_row_streamed(float *y, const float *x, int64_t n, fn_affine c, const float *w, const float *b,
                            const float *next, fn_line_carry *carry);
void fn_affine_row_streamed_f64(double *y, const double *x, int64_t n, double mu, double r, const double *w,
                                const double *b, const double *next, fn_line_carry *carry);
void fn_dx_row_streamed(float *dx, const float *dy, const float *x, int64_t n, fn_dx c, const float *w,
                        fn_line_carry *carry);
void fn_affine_row_to_16bit_streamed(uint16_t *y, const uint16_t *x, int64_t n, int dtype, fn_affine c,
                                     const float *w, const float *b, fn_line_carry *carry);
void fn_scale_shift_streamed(float *y, const float *x, const float *dy, int64_t n, fn_scale_shift c,
                             fn_line_carry *carry);
void fn_combine_rows_streamed(float *y, const float *x, const float *dy, int64_t n, int64_t C,
                              const fn_channel_coefs *f);
void fn_stream_fence(void);

/* ---- group_norm.c: layer, RMS, instance and group norm on the (A, G, K, S) view ---- */

/* y = (x - mean) * rstd * weight[g*K + k] + bias[g*K + k], statistics over (k, s) for every (a, g).
 * x, y: (A, G, K, S); weight, bias: (G*K) doubles or NULL; mask: (A, S) or no mask.
 * mean, rstd: (A, G) doubles, written. stat FN_MEAN_SQUARE: no centering (mean written as 0).
 * A group with no real element gets y = 0, mean = 0, rstd = 0. Overwrites y (may alias x). */
int group_norm_forward(fn_view y, double *mean, double *rstd, fn_view x,
                       const double *weight, const double *bias, fn_mask mask,
                       int64_t A, int64_t G, int64_t K, int64_t S, double eps, enum fn_stat stat, int nthreads);

/* group_norm_forward of the rows of a C-contiguous float32 (A, D) array (G = 1, S = 1, no mask),
 * with float32 weight/bias of D elements (or NULL): the common call, with no parameter conversion.
 * y may be x; mean, rstd: (A) doubles, written. */
int layer_norm_rows_f32(float *y, double *mean, double *rstd, const float *x, const float *weight,
                        const float *bias, int64_t A, int64_t D, double eps, enum fn_stat stat, int nthreads);

/* Gradients of group_norm_forward, from the mean/rstd it returned.
 * dx: (A, G, K, S), written (may alias dy); dweight, dbias: (G*K) doubles, overwritten with
 * the sums over a and s. weight NULL means ones. Padded positions get dx = 0 and add nothing. */
int group_norm_backward(fn_view dx, double *dweight, double *dbias, fn_view dy, fn_view x,
                        const double *mean, const double *rstd, const double *weight,
                        fn_mask mask, int64_t A, int64_t G, int64_t K, int64_t S, enum fn_stat stat, int nthreads);

/* ---- batch_norm.c: statistics per channel c of the (O, C, S) view ---- */

/* count, mean, var: (C) doubles, written: the number of real elements of channel c, their mean
 * and biased variance (NaN where count is 0). mask: (O, S) or no mask. */
int channel_moments(double *count, double *mean, double *var, fn_view x, fn_mask mask,
                    int64_t O, int64_t C, int64_t S, int nthreads);

/* out = coef_x[c] * (x - center[c]) + coef_dy[c] * dy + shift[c], 0 where the mask is False.
 * Forward batch norm passes dy = no data (coef_dy unused); its backward passes both.
 * out, x, dy: (O, C, S); center, coef_x, coef_dy, shift: (C) doubles. out may alias x or dy. */
int channel_combine(fn_view out, fn_view x, const double *center, const double *coef_x,
                    fn_view dy, const double *coef_dy, const double *shift, fn_mask mask,
                    int64_t O, int64_t C, int64_t S, int nthreads);

/* Batch norm training of float32 planes (O, C, S), S > 1, each plane contiguous in x and out, no
 * mask: mean, var (C) written as channel_moments with one thread, then out as channel_combine
 * with center = mean, coef_x = rstd * weight, shift = bias (rstd = 1/sqrt(var + eps), 0 where
 * that is 1/0), a block of channels at a time so that x is read from memory once. weight, bias:
 * (C) doubles or NULL. out may be x. FN_EINVAL for anything else. */
int channel_normalize_planes_f32(fn_view out, fn_view x, const double *weight, const double *bias, double eps,
                                 double *mean, double *var, int64_t O, int64_t C, int64_t S, int nthreads);

/* sum_dy[c] = sum of dy, sum_dy_xc[c] = sum of dy * (x - center[c]) over the real (o, s).
 * Both (C) doubles, written. */
int channel_grad_sums(double *sum_dy, double *sum_dy_xc, fn_view dy, fn_view x,
                      const double *center, fn_mask mask, int64_t O, int64_t C, int64_t S, int nthreads);

/* Batch norm's training gradient of float32 planes (O, C, S), O >= 1, S > 1, each plane contiguous
 * in dx, dy and x, no mask: sum_dy, sum_dy_xc (C, written) as channel_grad_sums with `nthreads`,
 * then dx as channel_combine with coef_dy = wr (weight * rstd) and fn_batch_dx_coefs' coef_x and
 * shift, n = O * S; a block of channels at a time so that x and dy are read from memory once.
 * Where one channel's coefficients could overflow float, that channel alone is computed in double
 * (channel_combine would compute every channel of the call in double).
 * dx may be exactly dy or x. FN_EINVAL for anything else. */
int channel_backward_planes_f32(fn_view dx, fn_view dy, fn_view x, const double *mean, const double *rstd,
                                const double *wr, double *sum_dy, double *sum_dy_xc, int64_t O, int64_t C,
                                int64_t S, int nthreads);

/* coef_x, shift (C, written): fn_batch_dx_coefs of each channel, for channel_combine. */
void channel_dx_coefs(double *coef_x, double *shift, const double *wr, const double *rstd, const double *sum_dy,
                      const double *sum_dy_xc, double n, int64_t C);

/* ---- summary.c: the per-channel statistics of fastnorm.Moments ---- */

/* count, mean, m2, min, max: (C) doubles, written: the number of real elements of channel c of
 * the (O, C, S) view, their mean, sum of squared deviations from the mean, min and max, in one
 * pass over x. A channel with no real element gets count 0, m2 0 and NaN mean, min and max; NaN
 * in a channel makes its mean, m2, min and max NaN. mask: (O, S) or no mask. */
int channel_summary(double *count, double *mean, double *m2, double *min, double *max, fn_view x, fn_mask mask,
                    int64_t O, int64_t C, int64_t S, int nthreads);

/* ---- add_norm.c: the residual add of a transformer block with its layer/RMS norm ---- */

/* h = x + residual, rounded once in the dtype (NumPy's add), then y = group_norm_forward of h as
 * (A, 1, D, 1): layer norm, or RMS norm when rms != 0. x, residual, h, y: (A, D) views of one dtype
 * (stride[0] between rows, stride[1] between elements); weight, bias: (D) contiguous elements of
 * x's dtype, or NULL;
 * mean, rstd: (A) doubles, written. h may be x or residual; y may be x or residual; y and h may
 * not overlap. A block of rows sized to the L2 cache at a time: h is normalized while cached. */
int add_norm_rows(fn_view y, fn_view h, double *mean, double *rstd, fn_view x, fn_view residual,
                  const void *weight, const void *bias, int64_t A, int64_t D, double eps, enum fn_stat stat, int nthreads);

#endif
