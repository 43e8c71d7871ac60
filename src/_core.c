/* fastnorm._core: the only file that includes Python.h.
 *
 * It turns NumPy arrays that python/fastnorm has already checked and shaped into the fn_view
 * structs of fastnorm.h, releases the GIL around large work and maps kernel statuses to
 * exceptions. The checks here only guard memory safety; user-facing messages live in Python. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Keep in step with the NumPy requirement in pyproject.toml (numpy>=2.1). */
#define NPY_NO_DEPRECATED_API NPY_2_1_API_VERSION
#define NPY_TARGET_VERSION NPY_2_1_API_VERSION
#include <numpy/arrayobject.h>

#include <stdatomic.h>
#include <string.h>

#include "fastnorm.h"


/* ---- output memory -------------------------------------------------------------------------------
 * New outputs of KEEP_FROM bytes or more come from this NumPy memory handler, which keeps the
 * most recently freed of its blocks (up to KEPT_BLOCKS of them, at most keep_limit bytes in all)
 * and gives one to the next output that it fits. Memory fresh from the operating system is
 * zero-filled on first touch, which costs a large call as much as its own kernel; a loop that drops
 * each step's outputs gets them back without that. Two, because add_layer_norm/add_rms_norm make
 * two outputs a call. Blocks come from NumPy's default handler (its huge-page advice included) with
 * a header holding their capacity. The header is a whole page, so the data has the offset in its
 * page that NumPy's own arrays have (another offset makes some kernels meet 4 KiB address aliasing).
 * keep_limit 0 keeps nothing. The handler runs with the GIL held (NumPy calls it from array
 * creation and deallocation), which serializes it: the slots are swapped atomically, but a kept
 * block's header is read before its slot is taken, which is safe only under the GIL (fastnorm has
 * no free-threaded build). */
enum { BLOCK_HEAD = 4096, KEPT_BLOCKS = 2 };
#define KEEP_FROM ((size_t)1 << 20)
static _Atomic(char *) kept_blocks[KEPT_BLOCKS];           /* the newest first; a block's header, or NULL */
static _Atomic size_t keep_limit = (size_t)256 << 20;
static PyObject *output_handler_capsule;

static PyDataMemAllocator *default_allocator(void)
{
    PyDataMem_Handler *h = PyCapsule_GetPointer(PyDataMem_DefaultHandler, "mem_handler");
    return &h->allocator;
}

static size_t block_capacity(const char *block) { return block ? *(const size_t *)block : 0; }

static void release_block(char *block)
{
    PyDataMemAllocator *d = default_allocator();
    if (block) d->free(d->ctx, block, block_capacity(block) + BLOCK_HEAD);
}

/* Whether a block of `capacity` bytes serves an output of `size`: large enough, and not so large
 * that holding it would waste more than an eighth. */
static int block_fits(size_t capacity, size_t size) { return capacity >= size && capacity - size <= size / 8; }

/* A kept block that fits `size`, taken out of its slot, or NULL; when none fits, every kept block is
 * released (a program whose sizes changed does not hold the old ones). */
static char *take_kept_block(size_t size)
{
    for (int i = 0; i < KEPT_BLOCKS; i++) {
        char *block = atomic_load(&kept_blocks[i]);
        if (block && block_fits(block_capacity(block), size) &&
            atomic_compare_exchange_strong(&kept_blocks[i], &block, NULL))
            return block;
    }
    for (int i = 0; i < KEPT_BLOCKS; i++) release_block(atomic_exchange(&kept_blocks[i], NULL));
    return NULL;
}

/* Capacity of the blocks kept now. */
static size_t kept_bytes(void)
{
    size_t total = 0;
    for (int i = 0; i < KEPT_BLOCKS; i++) total += block_capacity(atomic_load(&kept_blocks[i]));
    return total;
}

/* Release the oldest kept blocks until the rest fit within `limit` in all. */
static void trim_kept_blocks(size_t limit)
{
    for (int i = KEPT_BLOCKS - 1; i >= 0 && kept_bytes() > limit; i--)
        release_block(atomic_exchange(&kept_blocks[i], NULL));
}

static void *output_malloc(void *ctx, size_t size)
{
    (void)ctx;
    char *block = take_kept_block(size);
    if (!block) {
        if (size > SIZE_MAX - BLOCK_HEAD) return NULL;
        PyDataMemAllocator *d = default_allocator();
        if (!(block = d->malloc(d->ctx, size + BLOCK_HEAD))) return NULL;
        *(size_t *)block = size;
    }
    return block + BLOCK_HEAD;
}

static void output_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx, (void)size;                          /* the header has the capacity */
    if (!ptr) return;
    char *block = (char *)ptr - BLOCK_HEAD;
    const size_t limit = atomic_load(&keep_limit);
    if (block_capacity(block) < KEEP_FROM || block_capacity(block) > limit) {
        release_block(block);
        return;
    }
    for (int i = 0; i < KEPT_BLOCKS && block; i++)  /* the newest into slot 0, the others one down to */
        block = atomic_exchange(&kept_blocks[i], block);    /* the first empty slot */
    release_block(block);                           /* the oldest, pushed out when every slot was full */
    trim_kept_blocks(limit);
}

static void *output_calloc(void *ctx, size_t nelem, size_t elsize)
{
    if (elsize && nelem > SIZE_MAX / elsize) return NULL;
    void *p = output_malloc(ctx, nelem * elsize);
    if (p) memset(p, 0, nelem * elsize);
    return p;
}

static void *output_realloc(void *ctx, void *ptr, size_t new_size)
{
    void *p = output_malloc(ctx, new_size);
    if (p && ptr) {
        size_t old = block_capacity((char *)ptr - BLOCK_HEAD);
        memcpy(p, ptr, old < new_size ? old : new_size);
        output_free(ctx, ptr, old);
    }
    return p;
}

static PyDataMem_Handler output_handler = {
    "fastnorm_output", 1, {NULL, output_malloc, output_calloc, output_realloc, output_free},
};

/* An uninitialized array like x (its layout; dtype: x's when NULL; stolen), from the handler above when
 * it is large enough to be kept. */
static PyObject *new_output(PyArrayObject *x, PyArray_Descr *dtype)
{
    npy_intp itemsize = dtype ? PyDataType_ELSIZE(dtype) : PyArray_ITEMSIZE(x);
    size_t bytes = (size_t)PyArray_SIZE(x) * (size_t)itemsize;
    if (bytes < KEEP_FROM || atomic_load(&keep_limit) < bytes) {
        if (!dtype && PyArray_IS_C_CONTIGUOUS(x))   /* the fast paths' case: skips the layout analysis */
            return PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), PyArray_TYPE(x));
        return PyArray_NewLikeArray(x, NPY_KEEPORDER, dtype, 0);
    }
    PyObject *previous = PyDataMem_SetHandler(output_handler_capsule);
    if (!previous) {
        Py_XDECREF(dtype);
        return NULL;
    }
    PyObject *result = PyArray_NewLikeArray(x, NPY_KEEPORDER, dtype, 0);
    PyObject *ours = PyDataMem_SetHandler(previous);
    Py_DECREF(previous);
    if (!ours) Py_CLEAR(result);
    Py_XDECREF(ours);
    return result;
}

/* _core.empty_like(x, dtype): np.empty_like(x, dtype) through new_output (dtype None: x's). */
static PyObject *py_empty_like(PyObject *self, PyObject *args)
{
    (void)self;
    PyArrayObject *x;
    PyArray_Descr *dtype = NULL;
    if (!PyArg_ParseTuple(args, "O!O&", &PyArray_Type, &x, PyArray_DescrConverter2, &dtype)) return NULL;
    return new_output(x, dtype);
}

/* _core.keep_output_memory(limit): the bytes of blocks kept, in all (0: none; releases the oldest
 * kept blocks above the new limit); returns the previous limit. */
static PyObject *py_keep_output_memory(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_ssize_t limit = PyLong_AsSsize_t(arg);
    if (limit < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_core: limit must be >= 0");
        return NULL;
    }
    size_t previous = atomic_exchange(&keep_limit, (size_t)limit);
    trim_kept_blocks((size_t)limit);
    return PyLong_FromSize_t(previous);
}

/* _core.kept_output_bytes(): the capacity of the blocks kept now (0: none), for the tests. */
static PyObject *py_kept_output_bytes(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return PyLong_FromSize_t(kept_bytes());
}


/* ml_dtypes.bfloat16 is a user dtype: NumPy gives it a type number when ml_dtypes registers it. The
 * Python side passes it to register_bfloat16 the first time it meets a bfloat16 array (it never
 * imports ml_dtypes itself); -1 until then. */
static int bfloat16_type = -1;

/* register_bfloat16(dtype): the bfloat16 dtype's type number, for to_view. */
static PyObject *py_register_bfloat16(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyArray_DescrCheck(arg) || PyDataType_ELSIZE((PyArray_Descr *)arg) != 2 ||
        ((PyArray_Descr *)arg)->type_num < NPY_USERDEF) {
        PyErr_SetString(PyExc_TypeError, "_core.register_bfloat16: expected the 2-byte ml_dtypes.bfloat16 dtype");
        return NULL;
    }
    bfloat16_type = ((PyArray_Descr *)arg)->type_num;
    Py_RETURN_NONE;
}

/* obj must be an aligned, native float16/32/64 (or registered bfloat16) ndarray of `ndim` dims;
 * fills v and shape. */
static int to_view(PyObject *obj, const char *name, int ndim, int writeable, fn_view *v, npy_intp *shape)
{
    if (!PyArray_Check(obj) || PyArray_NDIM((PyArrayObject *)obj) != ndim) {
        PyErr_Format(PyExc_TypeError, "_core: %s must be a %d-d ndarray", name, ndim);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    int t = PyArray_TYPE(a);
    if (!PyArray_ISNBO(PyArray_DESCR(a)->byteorder) || !PyArray_ISALIGNED(a) ||
        (t != NPY_HALF && t != NPY_FLOAT && t != NPY_DOUBLE && t != bfloat16_type)) {
        PyErr_Format(PyExc_TypeError, "_core: %s must be aligned native float16/32/64", name);
        return -1;
    }
    if (writeable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "_core: %s must be writeable", name);
        return -1;
    }
    v->data = PyArray_BYTES(a);
    v->dtype = t == NPY_HALF ? FN_F16 : t == NPY_FLOAT ? FN_F32 : t == NPY_DOUBLE ? FN_F64 : FN_BF16;
    for (int d = 0; d < 4; d++) v->stride[d] = d < ndim ? PyArray_STRIDE(a, d) : 0;
    for (int d = 0; d < ndim; d++) shape[d] = PyArray_DIM(a, d);
    return 0;
}

/* obj: None (no mask) or a (d0, d1) bool ndarray. */
static int to_mask(PyObject *obj, npy_intp d0, npy_intp d1, fn_mask *m)
{
    m->data = NULL;
    m->stride[0] = m->stride[1] = 0;
    if (obj == Py_None) return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_Check(obj) || PyArray_TYPE(a) != NPY_BOOL || PyArray_NDIM(a) != 2 ||
        PyArray_DIM(a, 0) != d0 || PyArray_DIM(a, 1) != d1) {
        PyErr_Format(PyExc_TypeError, "_core: mask must be a (%zd, %zd) bool ndarray", d0, d1);
        return -1;
    }
    m->data = (const unsigned char *)PyArray_BYTES(a);
    m->stride[0] = PyArray_STRIDE(a, 0);
    m->stride[1] = PyArray_STRIDE(a, 1);
    return 0;
}

/* obj: a C-contiguous float64 ndarray of n elements (None allowed when optional). */
static int to_doubles(PyObject *obj, const char *name, npy_intp n, int optional, int writeable, double **p)
{
    *p = NULL;
    if (obj == Py_None && optional) return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_Check(obj) || PyArray_TYPE(a) != NPY_DOUBLE || !PyArray_IS_C_CONTIGUOUS(a) ||
        !PyArray_ISALIGNED(a) || !PyArray_ISNBO(PyArray_DESCR(a)->byteorder) || PyArray_SIZE(a) != n ||
        (writeable && !PyArray_ISWRITEABLE(a))) {
        PyErr_Format(PyExc_TypeError, "_core: %s must be a contiguous, aligned float64 array of %zd elements", name, n);
        return -1;
    }
    *p = (double *)PyArray_DATA(a);
    return 0;
}

/* MemoryError for scratch memory a kernel (or the fast path) could not get: more than the machine
 * has, or a size that overflows (a zero-stride view of 2**60 elements, say). */
static PyObject *scratch_too_large(void)
{
    PyErr_SetString(PyExc_MemoryError,
                    "fastnorm: cannot allocate the scratch memory this call needs; it grows with the arrays' "
                    "shapes, also for zero-stride views (np.broadcast_to) that take no memory themselves");
    return NULL;
}

static PyObject *status_to_result(int status)
{
    if (status == FN_ENOMEM) return scratch_too_large();
    if (status != FN_OK) {
        PyErr_SetString(PyExc_ValueError, "_core: invalid sizes");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The kernels' statistic for the Python side's rms flag. */
static enum fn_stat stat_of(int rms) { return rms ? FN_MEAN_SQUARE : FN_MEAN_VAR; }

static int same_shape(const npy_intp *a, const npy_intp *b, int ndim)
{
    for (int d = 0; d < ndim; d++)
        if (a[d] != b[d]) {
            PyErr_SetString(PyExc_ValueError, "_core: arrays must have the same shape");
            return 0;
        }
    return 1;
}

/* group_forward(y, x, weight, bias, mask, mean, rstd, eps, rms, nthreads): x, y (A, G, K, S). */
static PyObject *py_group_forward(PyObject *self, PyObject *args)
{
    PyObject *oy, *ox, *ow, *ob, *om, *omean, *orstd;
    double eps, *w, *b, *mean, *rstd;
    int rms, status, nthreads;
    npy_intp sx[4], sy[4];
    fn_view x, y;
    fn_mask m;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOdpi", &oy, &ox, &ow, &ob, &om, &omean, &orstd, &eps, &rms, &nthreads)) return NULL;
    if (to_view(ox, "x", 4, 0, &x, sx) || to_view(oy, "y", 4, 1, &y, sy) || !same_shape(sx, sy, 4) ||
        to_doubles(ow, "weight", sx[1] * sx[2], 1, 0, &w) || to_doubles(ob, "bias", sx[1] * sx[2], 1, 0, &b) ||
        to_mask(om, sx[0], sx[3], &m) || to_doubles(omean, "mean", sx[0] * sx[1], 0, 1, &mean) ||
        to_doubles(orstd, "rstd", sx[0] * sx[1], 0, 1, &rstd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = group_norm_forward(y, mean, rstd, x, w, b, m, sx[0], sx[1], sx[2], sx[3], eps, stat_of(rms), nthreads);
    Py_END_ALLOW_THREADS
    return status_to_result(status);
}

/* group_backward(dx, dweight, dbias, dy, x, mean, rstd, weight, mask, rms, nthreads) */
static PyObject *py_group_backward(PyObject *self, PyObject *args)
{
    PyObject *odx, *odw, *odb, *ody, *ox, *omean, *orstd, *ow, *om;
    double *dw, *db, *mean, *rstd, *w;
    int rms, status, nthreads;
    npy_intp sx[4], sdy[4], sdx[4];
    fn_view x, dy, dx;
    fn_mask m;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOpi", &odx, &odw, &odb, &ody, &ox, &omean, &orstd, &ow, &om, &rms, &nthreads))
        return NULL;
    if (to_view(ox, "x", 4, 0, &x, sx) || to_view(ody, "dy", 4, 0, &dy, sdy) ||
        to_view(odx, "dx", 4, 1, &dx, sdx) || !same_shape(sx, sdy, 4) || !same_shape(sx, sdx, 4) ||
        to_doubles(odw, "dweight", sx[1] * sx[2], 1, 1, &dw) || to_doubles(odb, "dbias", sx[1] * sx[2], 1, 1, &db) ||
        to_doubles(omean, "mean", sx[0] * sx[1], rms, 0, &mean) ||
        to_doubles(orstd, "rstd", sx[0] * sx[1], 0, 0, &rstd) ||
        to_doubles(ow, "weight", sx[1] * sx[2], 1, 0, &w) || to_mask(om, sx[0], sx[3], &m))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = group_norm_backward(dx, dw, db, dy, x, mean, rstd, w, m, sx[0], sx[1], sx[2], sx[3], stat_of(rms), nthreads);
    Py_END_ALLOW_THREADS
    return status_to_result(status);
}

/* channel_moments(count, mean, var, x, mask, nthreads): x (O, C, S). */
static PyObject *py_channel_moments(PyObject *self, PyObject *args)
{
    PyObject *ocount, *omean, *ovar, *ox, *om;
    double *count, *mean, *var;
    npy_intp sx[3];
    fn_view x;
    fn_mask m;
    int status, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOi", &ocount, &omean, &ovar, &ox, &om, &nthreads)) return NULL;
    if (to_view(ox, "x", 3, 0, &x, sx) || to_doubles(ocount, "count", sx[1], 0, 1, &count) ||
        to_doubles(omean, "mean", sx[1], 0, 1, &mean) || to_doubles(ovar, "var", sx[1], 0, 1, &var) ||
        to_mask(om, sx[0], sx[2], &m))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = channel_moments(count, mean, var, x, m, sx[0], sx[1], sx[2], nthreads);
    Py_END_ALLOW_THREADS
    return status_to_result(status);
}

/* channel_summary(count, mean, m2, min, max, x, mask, nthreads): x (O, C, S). */
static PyObject *py_channel_summary(PyObject *self, PyObject *args)
{
    PyObject *o[5], *ox, *om;
    double *s[5];
    static const char *const names[5] = {"count", "mean", "m2", "min", "max"};
    npy_intp sx[3];
    fn_view x;
    fn_mask m;
    int status, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOi", &o[0], &o[1], &o[2], &o[3], &o[4], &ox, &om, &nthreads) ||
        to_view(ox, "x", 3, 0, &x, sx) || to_mask(om, sx[0], sx[2], &m))
        return NULL;
    for (int k = 0; k < 5; k++)
        if (to_doubles(o[k], names[k], sx[1], 0, 1, &s[k])) return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = channel_summary(s[0], s[1], s[2], s[3], s[4], x, m, sx[0], sx[1], sx[2], nthreads);
    Py_END_ALLOW_THREADS
    return status_to_result(status);
}

/* channel_combine(out, x, center, coef_x, dy, coef_dy, shift, mask, nthreads); dy/coef_dy may be None. */
static PyObject *py_channel_combine(PyObject *self, PyObject *args)
{
    PyObject *oout, *ox, *ocenter, *ocx, *ody, *ocdy, *oshift, *om;
    double *center, *cx, *cdy, *shift;
    npy_intp sx[3], sout[3], sdy[3];
    fn_view x, out, dy = {0};
    fn_mask m;
    int status, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOOi", &oout, &ox, &ocenter, &ocx, &ody, &ocdy, &oshift, &om, &nthreads)) return NULL;
    if (to_view(ox, "x", 3, 0, &x, sx) || to_view(oout, "out", 3, 1, &out, sout) || !same_shape(sx, sout, 3) ||
        (ody != Py_None && (to_view(ody, "dy", 3, 0, &dy, sdy) || !same_shape(sx, sdy, 3))) ||
        to_doubles(ocenter, "center", sx[1], 0, 0, &center) || to_doubles(ocx, "coef_x", sx[1], 0, 0, &cx) ||
        to_doubles(ocdy, "coef_dy", sx[1], ody == Py_None, 0, &cdy) ||
        to_doubles(oshift, "shift", sx[1], 0, 0, &shift) || to_mask(om, sx[0], sx[2], &m))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = channel_combine(out, x, center, cx, dy, cdy, shift, m, sx[0], sx[1], sx[2], nthreads);
    Py_END_ALLOW_THREADS
    return status_to_result(status);
}

/* channel_normalize_planes(out, x, weight, bias, eps, mean, var, nthreads): batch norm training of
 * float32 planes (see fastnorm.h); weight/bias may be None; mean, var written. */
static PyObject *py_channel_normalize_planes(PyObject *self, PyObject *args)
{
    PyObject *oout, *ox, *ow, *ob, *omean, *ovar;
    double *w, *b, *mean, *var, eps;
    npy_intp sx[3], sout[3];
    fn_view x, out;
    int status, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOdOOi", &oout, &ox, &ow, &ob, &eps, &omean, &ovar, &nthreads)) return NULL;
    if (to_view(ox, "x", 3, 0, &x, sx) || to_view(oout, "out", 3, 1, &out, sout) || !same_shape(sx, sout, 3) ||
        to_doubles(ow, "weight", sx[1], 1, 0, &w) || to_doubles(ob, "bias", sx[1], 1, 0, &b) ||
        to_doubles(omean, "mean", sx[1], 0, 1, &mean) || to_doubles(ovar, "var", sx[1], 0, 1, &var))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = channel_normalize_planes_f32(out, x, w, b, eps, mean, var, sx[0], sx[1], sx[2], nthreads);
    Py_END_ALLOW_THREADS
    return status_to_result(status);
}

/* channel_grad_sums(sum_dy, sum_dy_xc, dy, x, center, mask, nthreads) */
static PyObject *py_channel_grad_sums(PyObject *self, PyObject *args)
{
    PyObject *osdy, *osxc, *ody, *ox, *ocenter, *om;
    double *sdy_sum, *sxc, *center;
    npy_intp sx[3], sdy[3];
    fn_view x, dy;
    fn_mask m;
    int status, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOi", &osdy, &osxc, &ody, &ox, &ocenter, &om, &nthreads)) return NULL;
    if (to_view(ox, "x", 3, 0, &x, sx) || to_view(ody, "dy", 3, 0, &dy, sdy) || !same_shape(sx, sdy, 3) ||
        to_doubles(osdy, "sum_dy", sx[1], 0, 1, &sdy_sum) || to_doubles(osxc, "sum_dy_xc", sx[1], 0, 1, &sxc) ||
        to_doubles(ocenter, "center", sx[1], 0, 0, &center) || to_mask(om, sx[0], sx[2], &m))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = channel_grad_sums(sdy_sum, sxc, dy, x, center, m, sx[0], sx[1], sx[2], nthreads);
    Py_END_ALLOW_THREADS
    return status_to_result(status);
}

/* channel_backward_planes(dx, dy, x, mean, rstd, wr, sum_dy, sum_dy_xc, nthreads) */
static PyObject *py_channel_backward_planes(PyObject *self, PyObject *args)
{
    PyObject *o[3], *od[5];
    static const char *const views[3] = {"dx", "dy", "x"}, *const names[5] = {"mean", "rstd", "wr", "sum_dy", "sum_dy_xc"};
    double *d[5];
    npy_intp shape[3][3];
    fn_view v[3];
    int status, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOOi", &o[0], &o[1], &o[2], &od[0], &od[1], &od[2], &od[3], &od[4], &nthreads))
        return NULL;
    for (int k = 0; k < 3; k++)
        if (to_view(o[k], views[k], 3, k == 0, &v[k], shape[k]) || (k > 0 && !same_shape(shape[0], shape[k], 3)))
            return NULL;
    for (int k = 0; k < 5; k++)
        if (to_doubles(od[k], names[k], shape[0][1], 0, k >= 3, &d[k])) return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = channel_backward_planes_f32(v[0], v[1], v[2], d[0], d[1], d[2], d[3], d[4], shape[0][0], shape[0][1],
                                         shape[0][2], nthreads);
    Py_END_ALLOW_THREADS
    return status_to_result(status);
}

/* channel_dx_coefs(coef_x, shift, wr, rstd, sum_dy, sum_dy_xc, n) */
static PyObject *py_channel_dx_coefs(PyObject *self, PyObject *args)
{
    PyObject *o[6];
    static const char *const names[6] = {"coef_x", "shift", "wr", "rstd", "sum_dy", "sum_dy_xc"};
    double *d[6], n;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOd", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &n)) return NULL;
    if (!PyArray_Check(o[0])) return PyErr_Format(PyExc_TypeError, "_core: coef_x must be an ndarray");
    const npy_intp C = PyArray_SIZE((PyArrayObject *)o[0]);
    for (int k = 0; k < 6; k++)
        if (to_doubles(o[k], names[k], C, 0, k < 2, &d[k])) return NULL;
    channel_dx_coefs(d[0], d[1], d[2], d[3], d[4], d[5], n, C);
    Py_RETURN_NONE;
}

/* A C-contiguous, aligned, native float32/64 ndarray (the fast path's x, out, weight, bias). */
static int is_plain(PyObject *obj, int type)
{
    if (!PyArray_CheckExact(obj)) return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    return PyArray_TYPE(a) == type && PyArray_IS_C_CONTIGUOUS(a) && PyArray_ISALIGNED(a) &&
           PyArray_ISNBO(PyArray_DESCR(a)->byteorder);
}

/* A weight/bias for the fast path: None (NULL) or a plain 1-d array of D elements of x's dtype,
 * used in place. Returns 0 when it needs the general path. */
static int plain_param(PyObject *obj, int type, npy_intp D, const void **p)
{
    *p = NULL;
    if (obj == Py_None) return 1;
    if (!is_plain(obj, type) || PyArray_NDIM((PyArrayObject *)obj) != 1 || PyArray_DIM((PyArrayObject *)obj, 0) != D)
        return 0;
    *p = PyArray_DATA((PyArrayObject *)obj);
    return 1;
}

/* Whether the byte ranges [a, a + na) and [b, b + nb) meet (b NULL: no). */
static int bytes_overlap(const void *a, npy_intp na, const void *b, npy_intp nb)
{
    const char *pa = a, *pb = b;
    return pb != NULL && pa < pb + nb && pb < pa + na;
}

/* Below this many elements the fast path keeps the GIL: releasing it costs more than it frees. */
enum { FAST_KEEP_GIL_ELEMENTS = 1 << 15 };

/* Layer/RMS norm along the last axis of a plain C-contiguous float32/64 array x, the common case,
 * with no Python in between: weight, bias None or plain (D) arrays of x's dtype, out None or a
 * plain array of x's shape (x itself, or not overlapping it). Returns y, or NotImplemented when
 * any argument needs the general path (which also owns the errors). */
static PyObject *rows_forward_fast(PyObject *ox, PyObject *ow, PyObject *ob, double eps, PyObject *oout, int rms,
                                   long nthreads)
{
    PyObject *result = NULL;
    if (!PyArray_CheckExact(ox)) Py_RETURN_NOTIMPLEMENTED;
    PyArrayObject *x = (PyArrayObject *)ox;
    int type = PyArray_TYPE(x), nd = PyArray_NDIM(x), status;
    if ((type != NPY_FLOAT && type != NPY_DOUBLE) || !is_plain(ox, type) || nd < 1 || !(eps >= 0.0) ||
        eps == HUGE_VAL || PyArray_DIM(x, nd - 1) == 0 || nthreads < 1 || nthreads > 4096)
        Py_RETURN_NOTIMPLEMENTED;
    npy_intp D = PyArray_DIM(x, nd - 1), A = PyArray_SIZE(x) / D;
    const void *w, *b;
    if (!plain_param(ow, type, D, &w) || !plain_param(ob, type, D, &b)) Py_RETURN_NOTIMPLEMENTED;
    if (oout != Py_None) {
        /* out may be x itself; any other memory it shares with x, weight or bias needs the general
         * path, which reads copies of them */
        PyArrayObject *out = (PyArrayObject *)oout;
        if (!is_plain(oout, type) || !PyArray_ISWRITEABLE(out) || !PyArray_SAMESHAPE(out, x)) Py_RETURN_NOTIMPLEMENTED;
        const char *xb = PyArray_BYTES(x), *ob_ = PyArray_BYTES(out);
        const npy_intp nbytes = PyArray_NBYTES(x), pbytes = D * PyArray_ITEMSIZE(x);
        if ((ob_ != xb && bytes_overlap(ob_, nbytes, xb, nbytes)) || bytes_overlap(ob_, nbytes, w, pbytes) ||
            bytes_overlap(ob_, nbytes, b, pbytes))
            Py_RETURN_NOTIMPLEMENTED;
    }
    /* mean, rstd (A each): computed by the kernel, not returned here */
    size_t stats_bytes;
    if (fn_array_bytes(2, A, 0, sizeof(double), &stats_bytes)) return scratch_too_large();
    double stack_stats[128], *stats = A <= 64 ? stack_stats : PyMem_RawMalloc(stats_bytes);
    if (!stats) return scratch_too_large();
    if (oout == Py_None) {
        result = new_output(x, NULL);
        if (!result) goto done;
    } else {
        result = Py_NewRef(oout);
    }
    void *y = PyArray_DATA((PyArrayObject *)result);
    const int keep_gil = A * D < FAST_KEEP_GIL_ELEMENTS;
    PyThreadState *save = keep_gil ? NULL : PyEval_SaveThread();
    if (type == NPY_FLOAT) {
        status = layer_norm_rows_f32(y, stats, stats + A, PyArray_DATA(x), w, b, A, D, eps, stat_of(rms), (int)nthreads);
    } else {
        ptrdiff_t item = sizeof(double);
        fn_view vx = {PyArray_BYTES(x), FN_F64, {D * item, 0, item, 0}}, vy = {y, FN_F64, {D * item, 0, item, 0}};
        fn_mask none = {NULL, {0, 0}};
        status = group_norm_forward(vy, stats, stats + A, vx, w, b, none, A, 1, D, 1, eps, stat_of(rms), (int)nthreads);
    }
    if (save) PyEval_RestoreThread(save);
    if (status != FN_OK) {
        Py_CLEAR(result);
        status_to_result(status);
    }
done:
    if (stats != stack_stats) PyMem_RawFree(stats);
    return result;
}

/* ---- fastnorm.layer_norm and fastnorm.rms_norm ----------------------------------------------------
 * The public functions are objects of this type: a call that rows_forward_fast can take (x and
 * at most weight, bias positionally; keywords weight, bias, eps (a float), out; axis=-1;
 * mask=None; return_stats=False) runs there with no Python frame in between; every other call
 * goes, unchanged, to the Python function it wraps, which owns the general path, the checks and
 * the messages. That function also gives the object its __doc__, __name__, __module__ and, as
 * __wrapped__, its signature (inspect.signature, help()). Pickled by name, like a function. */
enum { KW_WEIGHT, KW_BIAS, KW_AXIS, KW_EPS, KW_MASK, KW_OUT, KW_RETURN_STATS, KW_COUNT };
static const char *const rows_keywords[KW_COUNT] = {"weight", "bias", "axis", "eps", "mask", "out", "return_stats"};

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *wrapped;                /* the Python function */
    PyObject *threads;                /* the fastnorm._threads module: num_threads, read per call */
    PyObject *names[KW_COUNT + 1];    /* interned: rows_keywords, then "num_threads" */
    int rms;
} RowsFunction;

/* Which of rows_keywords `name` is, or -1. */
static int keyword_index(const RowsFunction *f, PyObject *name)
{
    for (int j = 0; j < KW_COUNT; j++)
        if (name == f->names[j]) return j;
    for (int j = 0; j < KW_COUNT; j++)
        if (PyUnicode_Compare(name, f->names[j]) == 0) return j;
    return -1;
}

/* An exact int equal to `value`, without raising. */
static int is_int_equal(PyObject *obj, long value)
{
    int overflow;
    return PyLong_CheckExact(obj) && PyLong_AsLongAndOverflow(obj, &overflow) == value && !overflow;
}

static PyObject *rows_function_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    RowsFunction *f = (RowsFunction *)self;
    const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *given[KW_COUNT] = {NULL};
    if (nargs < 1 || nargs > 3) goto general;
    if (nargs > 1) given[KW_WEIGHT] = args[1];
    if (nargs > 2) given[KW_BIAS] = args[2];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        const int j = keyword_index(f, PyTuple_GET_ITEM(kwnames, i));
        if (j < 0 || given[j]) goto general;          /* unknown or given twice: the Python function raises */
        given[j] = args[nargs + i];
    }
    if ((given[KW_AXIS] && !is_int_equal(given[KW_AXIS], -1)) || (given[KW_EPS] && !PyFloat_CheckExact(given[KW_EPS])) ||
        (given[KW_MASK] && given[KW_MASK] != Py_None) ||
        (given[KW_RETURN_STATS] && given[KW_RETURN_STATS] != Py_False))
        goto general;
    PyObject *n = PyObject_GetAttr(f->threads, f->names[KW_COUNT]);
    if (!n) return NULL;
    int overflow;
    const long nthreads = PyLong_CheckExact(n) ? PyLong_AsLongAndOverflow(n, &overflow) : 0;
    Py_DECREF(n);
    PyObject *none = Py_None, *y = rows_forward_fast(
        args[0], given[KW_WEIGHT] ? given[KW_WEIGHT] : none, given[KW_BIAS] ? given[KW_BIAS] : none,
        given[KW_EPS] ? PyFloat_AS_DOUBLE(given[KW_EPS]) : 1e-5, given[KW_OUT] ? given[KW_OUT] : none, f->rms,
        nthreads);
    if (y != Py_NotImplemented) return y;         /* y, or NULL with the kernel's error */
    Py_DECREF(y);
general:
    return PyObject_Vectorcall(f->wrapped, args, nargsf, kwnames);
}

static int rows_function_traverse(PyObject *self, visitproc visit, void *arg)
{
    RowsFunction *f = (RowsFunction *)self;
    Py_VISIT(f->wrapped);
    Py_VISIT(f->threads);
    return 0;
}

static int rows_function_clear(PyObject *self)
{
    RowsFunction *f = (RowsFunction *)self;
    Py_CLEAR(f->wrapped);
    Py_CLEAR(f->threads);
    return 0;
}

static void rows_function_dealloc(PyObject *self)
{
    RowsFunction *f = (RowsFunction *)self;
    PyObject_GC_UnTrack(self);
    rows_function_clear(self);
    for (int j = 0; j <= KW_COUNT; j++) Py_XDECREF(f->names[j]);
    PyObject_GC_Del(self);
}

/* __doc__, __name__, __qualname__, __module__: the wrapped function's (closure: the name). */
static PyObject *rows_function_from_wrapped(PyObject *self, void *name)
{
    return PyObject_GetAttrString(((RowsFunction *)self)->wrapped, name);
}

static PyObject *rows_function_wrapped(PyObject *self, void *unused)
{
    (void)unused;
    return Py_NewRef(((RowsFunction *)self)->wrapped);
}

/* Any other attribute (__defaults__, __annotations__, ...) is the wrapped function's too. */
static PyObject *rows_function_getattro(PyObject *self, PyObject *name)
{
    PyObject *value = PyObject_GenericGetAttr(self, name);
    if (value || !PyErr_ExceptionMatches(PyExc_AttributeError)) return value;
    PyErr_Clear();
    return PyObject_GetAttr(((RowsFunction *)self)->wrapped, name);
}

/* As a class attribute it stays a plain function, as built-in functions do (no binding). */
static PyObject *rows_function_get(PyObject *self, PyObject *obj, PyObject *type)
{
    (void)obj;
    (void)type;
    return Py_NewRef(self);
}

static PyObject *rows_function_repr(PyObject *self)
{
    PyObject *name = rows_function_from_wrapped(self, "__qualname__");
    if (!name) return NULL;
    PyObject *r = PyUnicode_FromFormat("<function %U (C fast path)>", name);
    Py_DECREF(name);
    return r;
}

/* pickle and copy: by name, found again in __module__ (the object itself). */
static PyObject *rows_function_reduce(PyObject *self, PyObject *unused)
{
    (void)unused;
    return rows_function_from_wrapped(self, "__qualname__");
}

static PyGetSetDef rows_function_getset[] = {
    {"__doc__", rows_function_from_wrapped, NULL, NULL, "__doc__"},
    {"__name__", rows_function_from_wrapped, NULL, NULL, "__name__"},
    {"__qualname__", rows_function_from_wrapped, NULL, NULL, "__qualname__"},
    {"__module__", rows_function_from_wrapped, NULL, NULL, "__module__"},
    {"__wrapped__", rows_function_wrapped, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef rows_function_methods[] = {
    {"__reduce__", rows_function_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RowsFunctionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastnorm._core.function",
    .tp_doc = "fastnorm.layer_norm / rms_norm: the common call in C, every other call by the wrapped Python function.",
    .tp_basicsize = sizeof(RowsFunction),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(RowsFunction, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = rows_function_dealloc,
    .tp_traverse = rows_function_traverse,
    .tp_clear = rows_function_clear,
    .tp_getattro = rows_function_getattro,
    .tp_descr_get = rows_function_get,
    .tp_repr = rows_function_repr,
    .tp_getset = rows_function_getset,
    .tp_methods = rows_function_methods,
};

/* rows_function(wrapped, threads_module, rms): the public layer_norm (rms False) or rms_norm. */
static PyObject *py_rows_function(PyObject *self, PyObject *args)
{
    PyObject *wrapped, *threads;
    int rms;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOp", &wrapped, &threads, &rms)) return NULL;
    if (!PyCallable_Check(wrapped)) {
        PyErr_SetString(PyExc_TypeError, "rows_function: wrapped must be callable");
        return NULL;
    }
    RowsFunction *f = PyObject_GC_New(RowsFunction, &RowsFunctionType);
    if (!f) return NULL;
    f->vectorcall = rows_function_vectorcall;
    f->wrapped = Py_NewRef(wrapped);
    f->threads = Py_NewRef(threads);
    f->rms = rms;
    for (int j = 0; j <= KW_COUNT; j++) f->names[j] = NULL;
    for (int j = 0; j <= KW_COUNT; j++) {
        f->names[j] = PyUnicode_InternFromString(j < KW_COUNT ? rows_keywords[j] : "num_threads");
        if (!f->names[j]) {
            PyObject_GC_Track(f);
            Py_DECREF(f);
            return NULL;
        }
    }
    PyObject_GC_Track(f);
    return (PyObject *)f;
}

/* A plain float32/64 ndarray of x's shape without its last axis (the fast path's mean, rstd),
 * copied into (A) doubles. Returns 0 when it needs the general path. */
static int plain_stats(PyObject *obj, PyArrayObject *x, npy_intp A, double *dst)
{
    if (!is_plain(obj, NPY_FLOAT) && !is_plain(obj, NPY_DOUBLE)) return 0;
    PyArrayObject *s = (PyArrayObject *)obj;
    int nd = PyArray_NDIM(x);
    if (PyArray_NDIM(s) != nd - 1 || !PyArray_CompareLists(PyArray_DIMS(s), PyArray_DIMS(x), nd - 1)) return 0;
    fn_load(dst, PyArray_BYTES(s), A, PyArray_ITEMSIZE(s), PyArray_TYPE(s) == NPY_FLOAT ? FN_F32 : FN_F64);
    return 1;
}

/* rows_backward_fast(dy, x, mean, rstd, weight, out, rms, nthreads): layer/RMS norm gradients
 * (dx, dweight, dbias) along the last axis of plain C-contiguous float32/64 arrays of one dtype,
 * with plain float32/64 mean/rstd (mean None for RMS) and no mask; NotImplemented otherwise (the
 * general path owns the errors). out may be dy itself, never overlap x. */
static PyObject *py_rows_backward_fast(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "_core.rows_backward_fast takes 8 arguments");
        return NULL;
    }
    PyObject *ody = args[0], *ox = args[1], *omean = args[2], *orstd = args[3], *ow = args[4], *oout = args[5];
    if (!PyArray_CheckExact(ox) || !PyLong_CheckExact(args[7])) Py_RETURN_NOTIMPLEMENTED;
    const int rms = PyObject_IsTrue(args[6]);
    const long nthreads = PyLong_AsLong(args[7]);
    if (rms < 0 || (nthreads == -1 && PyErr_Occurred())) return NULL;
    PyArrayObject *x = (PyArrayObject *)ox;
    const int type = PyArray_TYPE(x), nd = PyArray_NDIM(x);
    if ((type != NPY_FLOAT && type != NPY_DOUBLE) || !is_plain(ox, type) || nd < 1 || PyArray_DIM(x, nd - 1) == 0 ||
        !is_plain(ody, type) || !PyArray_SAMESHAPE((PyArrayObject *)ody, x) || (rms ? omean != Py_None : omean == Py_None) ||
        nthreads < 1 || nthreads > 4096)
        Py_RETURN_NOTIMPLEMENTED;
    const npy_intp D = PyArray_DIM(x, nd - 1), A = PyArray_SIZE(x) / D, nbytes = PyArray_NBYTES(x);
    const char *xb = PyArray_BYTES(x), *dyb = PyArray_BYTES((PyArrayObject *)ody);
    if (oout != Py_None) {
        PyArrayObject *out = (PyArrayObject *)oout;
        if (!is_plain(oout, type) || !PyArray_ISWRITEABLE(out) || !PyArray_SAMESHAPE(out, x)) Py_RETURN_NOTIMPLEMENTED;
        const char *o = PyArray_BYTES(out);
        if (bytes_overlap(o, nbytes, xb, nbytes) || (o != dyb && bytes_overlap(o, nbytes, dyb, nbytes)))
            Py_RETURN_NOTIMPLEMENTED;          /* out may be dy itself, nothing else it reads */
    }
    const void *w;
    if (!plain_param(ow, type, D, &w)) Py_RETURN_NOTIMPLEMENTED;
    /* scratch: mean, rstd (A each), weight, dweight, dbias (D each) as doubles */
    int64_t n_scratch;
    size_t scratch_bytes;
    if (fn_mul_add_size(3, D, 2 * (int64_t)A, &n_scratch) || fn_array_bytes(1, n_scratch, 0, sizeof(double), &scratch_bytes))
        return scratch_too_large();
    double *scratch = PyMem_RawMalloc(scratch_bytes);
    if (!scratch) return scratch_too_large();
    double *mean = scratch, *rstd = mean + A, *wd = rstd + A, *dw = wd + D, *db = dw + D;
    PyObject *dx = NULL, *dwo = NULL, *dbo = NULL, *result = NULL;
    if ((!rms && !plain_stats(omean, x, A, mean)) || !plain_stats(orstd, x, A, rstd)) {
        result = Py_NewRef(Py_NotImplemented);
        goto done;
    }
    if (w) fn_load(wd, w, D, PyArray_ITEMSIZE(x), type == NPY_FLOAT ? FN_F32 : FN_F64);
    npy_intp dshape[1] = {D};
    dx = oout == Py_None ? new_output(x, NULL) : Py_NewRef(oout);
    dwo = PyArray_SimpleNew(1, dshape, type);
    dbo = PyArray_SimpleNew(1, dshape, type);
    if (!dx || !dwo || !dbo) goto done;
    const ptrdiff_t item = PyArray_ITEMSIZE(x);
    const int dt = type == NPY_FLOAT ? FN_F32 : FN_F64;
    fn_view vx = {PyArray_BYTES(x), dt, {D * item, 0, item, 0}}, vdy = {PyArray_BYTES((PyArrayObject *)ody), dt, {D * item, 0, item, 0}};
    fn_view vdx = {PyArray_BYTES((PyArrayObject *)dx), dt, {D * item, 0, item, 0}};
    fn_mask none = {NULL, {0, 0}};
    PyThreadState *save = A * D < FAST_KEEP_GIL_ELEMENTS ? NULL : PyEval_SaveThread();
    int status = group_norm_backward(vdx, dw, db, vdy, vx, rms ? NULL : mean, rstd, w ? wd : NULL, none, A, 1, D, 1,
                                     stat_of(rms), (int)nthreads);
    if (save) PyEval_RestoreThread(save);
    if (status != FN_OK) {
        status_to_result(status);
        goto done;
    }
    fn_store(PyArray_BYTES((PyArrayObject *)dwo), dw, D, item, dt);
    fn_store(PyArray_BYTES((PyArrayObject *)dbo), db, D, item, dt);
    result = PyTuple_Pack(3, dx, dwo, dbo);
done:
    Py_XDECREF(dx);
    Py_XDECREF(dwo);
    Py_XDECREF(dbo);
    PyMem_RawFree(scratch);
    return result;
}

/* ---- CPU dispatch, for fastnorm.show_config() ----------------------------------------------------
 * Which clone of the hot loops the loader picked (FN_VECTOR_CLONES in fastnorm.h: the first of
 * avx512f, avx2 the CPU has, else the baseline build) and which float16 conversion path vector.c
 * takes (AVX-512F, else F16C, else scalar), asked of the CPU the way that code asks it. */
static PyObject *py_cpu_dispatch(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
#if FN_X86_DISPATCH
    __builtin_cpu_init();
    const int avx512f = __builtin_cpu_supports("avx512f") != 0, avx2 = __builtin_cpu_supports("avx2") != 0;
    const int f16c = __builtin_cpu_supports("f16c") != 0;
    return Py_BuildValue("{s:O,s:{s:N,s:N,s:N},s:s,s:s}", "multiversioned", Py_True, "features",
                         "avx512f", PyBool_FromLong(avx512f), "avx2", PyBool_FromLong(avx2), "f16c",
                         PyBool_FromLong(f16c), "vector_loops", avx512f ? "avx512f" : avx2 ? "avx2" : "default",
                         "float16_conversion", avx512f ? "avx512f" : f16c ? "f16c" : "scalar");
#else
    return Py_BuildValue("{s:O,s:{},s:s,s:s}", "multiversioned", Py_False, "features", "vector_loops", "default",
                         "float16_conversion", "scalar");
#endif
}

/* ---- fastnorm.add_layer_norm and add_rms_norm: the common call -----------------------------------
 * add_rows_fast(x, residual, weight, bias, eps, out, residual_out, rms, return_stats, nthreads):
 * h = x + residual and y = layer (RMS) norm of h along the last axis of plain C-contiguous
 * float16/32/64 arrays of one dtype, weight/bias None or plain (D) arrays of that dtype, eps a
 * float. Returns (y, h), with return_stats (y, h, mean, rstd) ((y, h, rstd) for RMS), or
 * NotImplemented when any argument needs the general path (which also owns the errors). */

/* An output of add_rows_fast: None, or a plain writeable array of x's shape that is x or residual
 * itself (the kernel reads each element before writing it) or meets neither, nor weight or bias. */
static int add_output_fits(PyObject *obj, PyArrayObject *x, PyArrayObject *r, const void *w, const void *b)
{
    if (obj == Py_None) return 1;
    PyArrayObject *o = (PyArrayObject *)obj;
    if (!is_plain(obj, PyArray_TYPE(x)) || !PyArray_ISWRITEABLE(o) || !PyArray_SAMESHAPE(o, x)) return 0;
    const npy_intp n = PyArray_NBYTES(x), pn = PyArray_DIM(x, PyArray_NDIM(x) - 1) * PyArray_ITEMSIZE(x);
    const char *ob = PyArray_BYTES(o), *xb = PyArray_BYTES(x), *rb = PyArray_BYTES(r);
    return (ob == xb || !bytes_overlap(ob, n, xb, n)) && (ob == rb || !bytes_overlap(ob, n, rb, n)) &&
           !bytes_overlap(ob, n, w, pn) && !bytes_overlap(ob, n, b, pn);
}

/* The statistics as an array of x's shape without its last axis: float64 for float64 x, else float32. */
static PyObject *add_stats_array(PyArrayObject *x, const double *s, npy_intp A)
{
    const int type = PyArray_TYPE(x) == NPY_DOUBLE ? NPY_DOUBLE : NPY_FLOAT;
    PyObject *a = PyArray_SimpleNew(PyArray_NDIM(x) - 1, PyArray_DIMS(x), type);
    if (a) fn_store(PyArray_BYTES((PyArrayObject *)a), s, A, type == NPY_DOUBLE ? 8 : 4, type == NPY_DOUBLE ? FN_F64 : FN_F32);
    return a;
}

static PyObject *py_add_rows_fast(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "_core.add_rows_fast takes 10 arguments");
        return NULL;
    }
    PyObject *ox = args[0], *ores = args[1], *ow = args[2], *ob = args[3], *oout = args[5], *ohout = args[6];
    if (!PyArray_CheckExact(ox) || !PyArray_CheckExact(ores) || !PyFloat_CheckExact(args[4]) ||
        (args[8] != Py_True && args[8] != Py_False) || !PyLong_CheckExact(args[9]))
        Py_RETURN_NOTIMPLEMENTED;
    const int rms = PyObject_IsTrue(args[7]), with_stats = PyObject_IsTrue(args[8]);
    const long nthreads = PyLong_AsLong(args[9]);
    const double eps = PyFloat_AS_DOUBLE(args[4]);
    if (rms < 0 || with_stats < 0 || (nthreads == -1 && PyErr_Occurred())) return NULL;
    PyArrayObject *x = (PyArrayObject *)ox, *res = (PyArrayObject *)ores;
    const int type = PyArray_TYPE(x), nd = PyArray_NDIM(x);
    if ((type != NPY_HALF && type != NPY_FLOAT && type != NPY_DOUBLE) || !is_plain(ox, type) || nd < 1 ||
        PyArray_DIM(x, nd - 1) == 0 || !is_plain(ores, type) || !PyArray_SAMESHAPE(x, res) || !(eps >= 0.0) ||
        eps == HUGE_VAL || nthreads < 1 || nthreads > 4096)
        Py_RETURN_NOTIMPLEMENTED;
    const npy_intp D = PyArray_DIM(x, nd - 1), A = PyArray_SIZE(x) / D, nbytes = PyArray_NBYTES(x);
    const void *w, *b;
    if (!plain_param(ow, type, D, &w) || !plain_param(ob, type, D, &b) || !add_output_fits(oout, x, res, w, b) ||
        !add_output_fits(ohout, x, res, w, b) ||
        (oout != Py_None && ohout != Py_None &&
         bytes_overlap(PyArray_BYTES((PyArrayObject *)oout), nbytes, PyArray_BYTES((PyArrayObject *)ohout), nbytes)))
        Py_RETURN_NOTIMPLEMENTED;
    /* mean, rstd (A each); weight and bias are read in place, so no output may meet them */
    size_t stats_bytes;
    if (fn_array_bytes(2, A, 0, sizeof(double), &stats_bytes)) return scratch_too_large();
    double stack_stats[128], *mean = A <= 64 ? stack_stats : PyMem_RawMalloc(stats_bytes), *rstd = mean + A;
    if (!mean) return scratch_too_large();
    const ptrdiff_t item = PyArray_ITEMSIZE(x);
    const int dt = type == NPY_HALF ? FN_F16 : type == NPY_FLOAT ? FN_F32 : FN_F64;
    PyObject *y = oout == Py_None ? new_output(x, NULL) : Py_NewRef(oout);
    PyObject *h = ohout == Py_None ? new_output(x, NULL) : Py_NewRef(ohout), *result = NULL;
    if (!y || !h) goto done;
    fn_view vx = {PyArray_BYTES(x), dt, {D * item, item, 0, 0}}, vr = {PyArray_BYTES(res), dt, {D * item, item, 0, 0}};
    fn_view vy = {PyArray_BYTES((PyArrayObject *)y), dt, {D * item, item, 0, 0}};
    fn_view vh = {PyArray_BYTES((PyArrayObject *)h), dt, {D * item, item, 0, 0}};
    PyThreadState *save = A * D < FAST_KEEP_GIL_ELEMENTS ? NULL : PyEval_SaveThread();
    int status = add_norm_rows(vy, vh, mean, rstd, vx, vr, w, b, A, D, eps, stat_of(rms), (int)nthreads);
    if (save) PyEval_RestoreThread(save);
    if (status != FN_OK) {
        status_to_result(status);
        goto done;
    }
    if (!with_stats) {
        result = PyTuple_Pack(2, y, h);
    } else {
        PyObject *m = rms ? NULL : add_stats_array(x, mean, A), *r = add_stats_array(x, rstd, A);
        if (r && (rms || m)) result = rms ? PyTuple_Pack(3, y, h, r) : PyTuple_Pack(4, y, h, m, r);
        Py_XDECREF(m);
        Py_XDECREF(r);
    }
done:
    Py_XDECREF(y);
    Py_XDECREF(h);
    if (mean != stack_stats) PyMem_RawFree(mean);
    return result;
}

static PyMethodDef core_methods[] = {
    {"rows_function", py_rows_function, METH_VARARGS, "The public layer_norm/rms_norm around its Python function."},
    {"rows_backward_fast", (PyCFunction)(void (*)(void))py_rows_backward_fast, METH_FASTCALL,
     "Layer/RMS norm gradients along the last axis of plain arrays, or NotImplemented."},
    {"register_bfloat16", py_register_bfloat16, METH_O, "The type number of ml_dtypes.bfloat16, for the kernels' views."},
    {"empty_like", py_empty_like, METH_VARARGS, "np.empty_like(x, dtype) from the output memory."},
    {"keep_output_memory", py_keep_output_memory, METH_O, "Bytes of freed output blocks kept for reuse, in all; returns the previous limit."},
    {"kept_output_bytes", py_kept_output_bytes, METH_NOARGS, "Capacity of the output blocks kept now (0: none)."},
    {"group_forward", py_group_forward, METH_VARARGS, "Layer/RMS/instance/group norm on an (A, G, K, S) view."},
    {"group_backward", py_group_backward, METH_VARARGS, "Gradients of group_forward."},
    {"channel_moments", py_channel_moments, METH_VARARGS, "Per-channel count, mean, biased var of an (O, C, S) view."},
    {"channel_summary", py_channel_summary, METH_VARARGS,
     "Per-channel count, mean, m2, min, max of an (O, C, S) view, in one pass."},
    {"channel_combine", py_channel_combine, METH_VARARGS, "out = coef_x*(x - center) + coef_dy*dy + shift per channel."},
    {"channel_normalize_planes", py_channel_normalize_planes, METH_VARARGS,
     "Batch norm training of float32 planes (O, C, S), channel blocks at a time; writes mean, var."},
    {"cpu_dispatch", py_cpu_dispatch, METH_NOARGS, "CPU features and the kernel variants picked for them."},
    {"channel_grad_sums", py_channel_grad_sums, METH_VARARGS, "Per-channel sums of dy and dy*(x - center)."},
    {"channel_backward_planes", py_channel_backward_planes, METH_VARARGS,
     "Batch norm training dx of float32 planes (O, C, S), channel blocks at a time; writes the sums."},
    {"channel_dx_coefs", py_channel_dx_coefs, METH_VARARGS, "Batch norm dx coefficients coef_x, shift from the sums."},
    {"add_rows_fast", (PyCFunction)(void (*)(void))py_add_rows_fast, METH_FASTCALL,
     "h = x + residual and layer/RMS norm of h along the last axis of plain arrays, or NotImplemented."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "fastnorm._core", "fastnorm's C kernels (internal).", -1, core_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void)
{
    import_array();
    output_handler_capsule = PyCapsule_New(&output_handler, "mem_handler", NULL);
    if (!output_handler_capsule || PyType_Ready(&RowsFunctionType) < 0) return NULL;
    return PyModule_Create(&core_module);
}
