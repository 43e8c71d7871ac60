/* A parallel for over [0, n) with POSIX threads created for the call.
 * Slice p covers [n*p/parts, n*(p+1)/parts); slice 0 runs on the calling thread. No thread
 * outlives the call, so there is no pool to break across fork() and no global state.
 * pthread_create, not C11's thrd_create: glibc's thrd_create calls pthread_create inside libc,
 * past the interceptors of ASan/LSan/TSan, which would then not know the worker threads. */
#include <pthread.h>
#include <stdlib.h>

#include "fastnorm.h"

typedef struct {
    fn_body body;
    void *ctx;
    int64_t begin, end;
    int part, status;
} slice;

static void *run_slice(void *arg)
{
    slice *s = arg;
    s->status = s->body(s->ctx, s->begin, s->end, s->part);
    return NULL;
}

/* n * p / parts without forming n * p, which overflows for the 2**60 elements of a zero-stride view:
 * with n = q * parts + r, n * p / parts = q * p + r * p / parts (r * p < parts**2). */
int64_t fn_slice_start(int64_t n, int p, int parts)
{
    return n / parts * p + n % parts * p / parts;
}

int fn_parallel_for(int parts, int64_t n, fn_body body, void *ctx)
{
    if (parts > n) parts = n > 0 ? (int)n : 1;
    if (parts <= 1) return body(ctx, 0, n, 0);
    slice *s = calloc((size_t)parts, sizeof *s);
    pthread_t *t = calloc((size_t)parts, sizeof *t);
    char *started = calloc((size_t)parts, 1);
    int status = FN_OK;
    if (!s || !t || !started) {
        free(s), free(t), free(started);
        return FN_ENOMEM;
    }
    for (int p = 0; p < parts; p++) {
        s[p] = (slice){body, ctx, fn_slice_start(n, p, parts), fn_slice_start(n, p + 1, parts), p, FN_OK};
        if (p > 0) started[p] = pthread_create(&t[p], NULL, run_slice, &s[p]) == 0;
    }
    run_slice(&s[0]);
    for (int p = 1; p < parts; p++) {
        if (started[p]) pthread_join(t[p], NULL);
        else run_slice(&s[p]);                  /* no thread to be had: do it here */
    }
    for (int p = 0; p < parts; p++)
        if (s[p].status != FN_OK && status == FN_OK) status = s[p].status;
    free(s), free(t), free(started);
    return status;
}

int fn_parts(int nthreads, int64_t elements)
{
    if (nthreads < 1 || elements < FN_PARALLEL_MIN_ELEMENTS) return 1;
    int64_t most = elements / (FN_PARALLEL_MIN_ELEMENTS / 2);
    return most < nthreads ? (int)most : nthreads;
}
