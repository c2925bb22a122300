# _quant.pxi: quantizer and kernel entry points (owned by the quantizer work).
#
# Low level: every function takes C-contiguous buffers (flat uint8 views where the element type
# varies) and checks their sizes before the C call; pyflashmoe/quant.py is the numpy-facing API.
# Also declares (for this module, once) fm_pool and fm_qmat from csrc/fm_internal.h: other .pxi
# files must not redeclare them.
import numpy as _np

cdef extern from "fm_quant_impl.h" nogil:
    ctypedef struct fm_pool:
        pass
    ctypedef struct fm_kernels:
        float (*dot)(const float *a, const float *b, int64_t n) noexcept nogil
        void (*axpy)(float *y, float a, const float *x, int64_t n) noexcept nogil
    ctypedef enum fm_dtype:
        FM_DT_F32
        FM_DT_BF16
        FM_DT_AFFINE
    ctypedef struct fm_qmat:
        fm_dtype dt
        int32_t bits
        int32_t group_size
        int64_t rows
        int64_t cols
        const void *data
        const uint32_t *q
        const uint16_t *scales
        const uint16_t *biases
    ctypedef enum fm_simd_level:
        FM_SIMD_SCALAR
        FM_SIMD_AVX2
        FM_SIMD_AVX512
        FM_SIMD_NEON
    fm_pool *fm_pool_new(int32_t n_threads)
    void fm_pool_free(fm_pool *p)
    int32_t fm_pool_size(const fm_pool *p)
    const fm_kernels *fm_kernels_for(fm_simd_level lv)
    fm_simd_level fm_simd_level_active()
    int32_t fm_simd_level_supported(int32_t lv)
    void fm_qmat_matvec_k(const fm_kernels *k, fm_pool *pool, const fm_qmat *W, const float *x,
                          float *y)
    void fm_qmat_matmul_k(const fm_kernels *k, fm_pool *pool, const fm_qmat *W, const float *X,
                          int64_t n, float *Y)
    void fm_qmat_matvec_rows_k(const fm_kernels *k, const fm_qmat *W, const float *x, float *y,
                               int64_t r0, int64_t r1)
    void fm_qmat_get_row(const fm_qmat *W, int64_t r, float *out)
    void fm_qmat_get_row_k(const fm_kernels *k, const fm_qmat *W, int64_t r, float *out)
    uint64_t fm_qmat_bytes(const fm_qmat *W)
    float fm_dot_f32(const float *a, const float *b, int64_t n)
    void fm_axpy_f32(float *y, float a, const float *x, int64_t n)
    uint16_t fm_f32_to_bf16(float f)
    float fm_bf16_to_f32(uint16_t h)

_LEVELS = {"scalar": FM_SIMD_SCALAR, "avx2": FM_SIMD_AVX2, "avx512": FM_SIMD_AVX512,
           "neon": FM_SIMD_NEON}


def simd_levels():
    """The SIMD paths this CPU and build can run, scalar first."""
    return [name for name, lv in _LEVELS.items() if fm_simd_level_supported(lv)]


cdef const fm_kernels *_kernels(object level) except NULL:
    if level is None:
        return fm_kernels_for(fm_simd_level_active())
    if level not in _LEVELS:
        raise ArgumentError(f"level: {level!r} is not one of {sorted(_LEVELS)}")
    if not fm_simd_level_supported(_LEVELS[level]):
        raise ArgumentError(f"level: {level!r} is not supported on this CPU")
    return fm_kernels_for(_LEVELS[level])


cdef inline void _raise(fm_status st, char *err) except *:
    if st != FM_OK:
        raise _error_from(st, err)


def quantize_affine(const float[:, ::1] w, int32_t bits, int32_t group_size,
                    uint32_t[:, ::1] q, uint16_t[:, ::1] scales, uint16_t[:, ::1] biases):
    """fm_quantize_affine over w[rows, cols] into caller-allocated q, scales, biases."""
    cdef char err[512]
    cdef fm_status st
    cdef int64_t rows = w.shape[0], cols = w.shape[1]
    if bits in (2, 3, 4, 5, 6, 8) and group_size in (32, 64, 128):
        if q.shape[0] != rows or q.shape[1] * 32 != cols * bits:
            raise ArgumentError(f"q: shape {(q.shape[0], q.shape[1])} does not fit w {(rows, cols)} at {bits} bits")
        if cols % group_size == 0 and (scales.shape[0] != rows or scales.shape[1] * group_size != cols):
            raise ArgumentError(f"scales: shape {(scales.shape[0], scales.shape[1])} does not fit w {(rows, cols)}")
        if biases.shape[0] != scales.shape[0] or biases.shape[1] != scales.shape[1]:
            raise ArgumentError(f"biases: shape {(biases.shape[0], biases.shape[1])} != scales shape")
    err[0] = 0
    with nogil:
        st = fm_quantize_affine(&w[0, 0] if rows else NULL, rows, cols, bits, group_size,
                                &q[0, 0] if rows else NULL, &scales[0, 0] if rows else NULL,
                                &biases[0, 0] if rows else NULL, err, sizeof(err))
    _raise(st, err)


def dequantize_affine(const uint32_t[:, ::1] q, const uint16_t[:, ::1] scales,
                      const uint16_t[:, ::1] biases, int32_t bits, int32_t group_size,
                      float[:, ::1] out):
    """fm_dequantize_affine into caller-allocated out[rows, cols]."""
    cdef char err[512]
    cdef fm_status st
    cdef int64_t rows = out.shape[0], cols = out.shape[1]
    if q.shape[0] != rows or q.shape[1] * 32 != cols * bits:
        raise ArgumentError(f"q: shape {(q.shape[0], q.shape[1])} does not fit out {(rows, cols)} at {bits} bits")
    if group_size in (32, 64, 128) and (scales.shape[0] != rows or scales.shape[1] * group_size != cols):
        raise ArgumentError(f"scales: shape {(scales.shape[0], scales.shape[1])} does not fit out {(rows, cols)}")
    if biases.shape[0] != scales.shape[0] or biases.shape[1] != scales.shape[1]:
        raise ArgumentError(f"biases: shape {(biases.shape[0], biases.shape[1])} != scales shape")
    err[0] = 0
    with nogil:
        st = fm_dequantize_affine(&q[0, 0] if rows else NULL, &scales[0, 0] if rows else NULL,
                                  &biases[0, 0] if rows else NULL, rows, cols, bits, group_size,
                                  &out[0, 0] if rows else NULL, err, sizeof(err))
    _raise(st, err)


def matvec(const unsigned char[::1] q, const uint16_t[::1] scales, const uint16_t[::1] biases,
           int64_t rows, int64_t cols, int32_t bits, int32_t group_size, const float[::1] x,
           float[::1] y, int32_t n_threads=1):
    """fm_matvec: y[rows] = W x; q is the weight bytes (bits 16: bf16 [rows, cols]); scales and
    biases may be empty for bits 16."""
    cdef char err[512]
    cdef fm_status st
    cdef int64_t need = rows * cols * bits // 8
    if bits in (2, 3, 4, 5, 6, 8, 16) and rows > 0 and cols > 0:
        if q.shape[0] != need:
            raise ArgumentError(f"q: {q.shape[0]} bytes, expected {need} for {rows}x{cols} at {bits} bits")
        if bits != 16 and group_size > 0 and cols % group_size == 0:
            if scales.shape[0] != rows * (cols // group_size):
                raise ArgumentError(f"scales: {scales.shape[0]} values, expected {rows * (cols // group_size)}")
            if biases.shape[0] != scales.shape[0]:
                raise ArgumentError(f"biases: {biases.shape[0]} values, expected {scales.shape[0]}")
    elif bits not in (2, 3, 4, 5, 6, 8, 16):
        raise ArgumentError(f"bits: {bits} is not one of 2, 3, 4, 5, 6, 8, 16")
    if x.shape[0] != cols:
        raise ArgumentError(f"x: length {x.shape[0]} != cols {cols}")
    if y.shape[0] != rows:
        raise ArgumentError(f"y: length {y.shape[0]} != rows {rows}")
    err[0] = 0
    with nogil:
        st = fm_matvec(&q[0] if q.shape[0] else NULL,
                       &scales[0] if scales.shape[0] else NULL,
                       &biases[0] if biases.shape[0] else NULL, rows, cols, bits, group_size,
                       &x[0] if x.shape[0] else NULL, &y[0] if y.shape[0] else NULL, n_threads,
                       err, sizeof(err))
    _raise(st, err)


def f32_to_bf16(const float[::1] src, uint16_t[::1] dst):
    """dst[i] = bf16 bits of src[i], round to nearest even (NaN stays NaN)."""
    cdef Py_ssize_t i, n = src.shape[0]
    if dst.shape[0] != n:
        raise ArgumentError(f"dst: length {dst.shape[0]} != src length {n}")
    with nogil:
        for i in range(n):
            dst[i] = fm_f32_to_bf16(src[i])


def bf16_to_f32(const uint16_t[::1] src, float[::1] dst):
    """dst[i] = float of the bf16 bits src[i] (exact)."""
    cdef Py_ssize_t i, n = src.shape[0]
    if dst.shape[0] != n:
        raise ArgumentError(f"dst: length {dst.shape[0]} != src length {n}")
    with nogil:
        for i in range(n):
            dst[i] = fm_bf16_to_f32(src[i])


cdef class Pool:
    """A compute thread pool (fm_pool) of n_threads threads including the caller."""
    cdef fm_pool *_p

    def __cinit__(self, int32_t n_threads=0):
        self._p = fm_pool_new(n_threads)
        if self._p == NULL:
            raise MemoryError(f"n_threads: cannot start a pool of {n_threads} threads")

    def __dealloc__(self):
        if self._p != NULL:
            fm_pool_free(self._p)
            self._p = NULL

    @property
    def n_threads(self):
        return fm_pool_size(self._p)


_DTYPES = {"f32": FM_DT_F32, "bf16": FM_DT_BF16, "affine": FM_DT_AFFINE}


cdef class QMatrix:
    """A view of one weight matrix as the forward pass sees it (fm_qmat). Keeps its arrays alive.

    dtype "f32": data float32 [rows, cols]; "bf16": data uint16 [rows, cols];
    "affine": q uint32 [rows, cols*bits/32], scales/biases uint16 [rows, cols/group_size].
    """
    cdef fm_qmat _m
    cdef object _keep

    def __cinit__(self, str dtype, int64_t rows, int64_t cols, data=None, q=None, scales=None,
                  biases=None, int32_t bits=0, int32_t group_size=0):
        cdef const unsigned char[::1] buf
        if dtype not in _DTYPES:
            raise ArgumentError(f"dtype: {dtype!r} is not one of {sorted(_DTYPES)}")
        if rows <= 0 or cols <= 0:
            raise ArgumentError(f"{'rows' if rows <= 0 else 'cols'}: must be positive")
        self._m.dt = _DTYPES[dtype]
        self._m.rows = rows
        self._m.cols = cols
        self._m.data = NULL
        self._m.q = NULL
        self._m.scales = NULL
        self._m.biases = NULL
        keep = []
        if dtype in ("f32", "bf16"):
            esz = 4 if dtype == "f32" else 2
            buf = _flat_bytes(data, "data", rows * cols * esz)
            self._m.data = &buf[0]
            keep.append(buf)
        else:
            if bits not in (2, 3, 4, 5, 6, 8):
                raise ArgumentError(f"bits: {bits} is not one of 2, 3, 4, 5, 6, 8")
            if group_size not in (32, 64, 128) or cols % group_size:
                raise ArgumentError(f"group_size: {group_size} is not 32, 64 or 128 dividing cols {cols}")
            self._m.bits = bits
            self._m.group_size = group_size
            buf = _flat_bytes(q, "q", rows * cols * bits // 8)
            self._m.q = <const uint32_t *>&buf[0]
            keep.append(buf)
            buf = _flat_bytes(scales, "scales", rows * (cols // group_size) * 2)
            self._m.scales = <const uint16_t *>&buf[0]
            keep.append(buf)
            buf = _flat_bytes(biases, "biases", rows * (cols // group_size) * 2)
            self._m.biases = <const uint16_t *>&buf[0]
            keep.append(buf)
        self._keep = keep

    @property
    def rows(self):
        return self._m.rows

    @property
    def cols(self):
        return self._m.cols

    @property
    def nbytes(self):
        """Bytes of weight data (fm_qmat_bytes)."""
        return fm_qmat_bytes(&self._m)

    def matvec(self, const float[::1] x, float[::1] y=None, Pool pool=None, level=None):
        """y = W x (fm_qmat_matvec); level forces a SIMD path (tests)."""
        cdef const fm_kernels *k = _kernels(level)
        cdef fm_pool *p = pool._p if pool is not None else NULL
        if x.shape[0] != self._m.cols:
            raise ArgumentError(f"x: length {x.shape[0]} != cols {self._m.cols}")
        if y is None:
            y = _np.empty(self._m.rows, dtype=_np.float32)
        elif y.shape[0] != self._m.rows:
            raise ArgumentError(f"y: length {y.shape[0]} != rows {self._m.rows}")
        with nogil:
            fm_qmat_matvec_k(k, p, &self._m, &x[0], &y[0])
        return _np.asarray(y)

    def matvec_rows(self, const float[::1] x, float[::1] y, int64_t r0, int64_t r1, level=None):
        """y[r] = (W x)[r] for r in [r0, r1) only (fm_qmat_matvec_rows); y has `rows` entries."""
        cdef const fm_kernels *k = _kernels(level)
        if x.shape[0] != self._m.cols:
            raise ArgumentError(f"x: length {x.shape[0]} != cols {self._m.cols}")
        if y.shape[0] != self._m.rows:
            raise ArgumentError(f"y: length {y.shape[0]} != rows {self._m.rows}")
        if not (0 <= r0 <= r1 <= self._m.rows):
            raise ArgumentError(f"r0, r1: [{r0}, {r1}) outside [0, {self._m.rows}]")
        with nogil:
            fm_qmat_matvec_rows_k(k, &self._m, &x[0], &y[0], r0, r1)

    def matmul(self, const float[:, ::1] X, Pool pool=None, level=None):
        """Y[n, rows] = X[n, cols] W^T (fm_qmat_matmul)."""
        cdef const fm_kernels *k = _kernels(level)
        cdef fm_pool *p = pool._p if pool is not None else NULL
        cdef int64_t n = X.shape[0]
        if X.shape[1] != self._m.cols:
            raise ArgumentError(f"X: {X.shape[1]} columns != cols {self._m.cols}")
        cdef float[:, ::1] Y = _np.empty((n, self._m.rows), dtype=_np.float32)
        if n:
            with nogil:
                fm_qmat_matmul_k(k, p, &self._m, &X[0, 0], n, &Y[0, 0])
        return _np.asarray(Y)

    def get_row(self, int64_t r, level=None):
        """Row r dequantized to float32 (fm_qmat_get_row)."""
        cdef const fm_kernels *k = _kernels(level)
        cdef bint active = level is None
        if r < 0 or r >= self._m.rows:
            raise ArgumentError(f"r: {r} outside [0, {self._m.rows})")
        cdef float[::1] out = _np.empty(self._m.cols, dtype=_np.float32)
        with nogil:
            if active:
                fm_qmat_get_row(&self._m, r, &out[0])
            else:
                fm_qmat_get_row_k(k, &self._m, r, &out[0])
        return _np.asarray(out)


cdef const unsigned char[::1] _flat_bytes(object a, str name, int64_t nbytes):
    if a is None:
        raise ArgumentError(f"{name}: required")
    arr = _np.asarray(a)
    if not arr.flags.c_contiguous:
        raise ArgumentError(f"{name}: must be C-contiguous")
    if arr.nbytes != nbytes:
        raise ArgumentError(f"{name}: {arr.nbytes} bytes, expected {nbytes}")
    return arr.reshape(-1).view(_np.uint8)


def dot_f32(const float[::1] a, const float[::1] b, level=None):
    """fm_dot_f32 (level None: the active SIMD path, as the C core calls it)."""
    cdef const fm_kernels *k = _kernels(level)
    if a.shape[0] != b.shape[0]:
        raise ArgumentError(f"b: length {b.shape[0]} != a length {a.shape[0]}")
    cdef float r
    cdef bint active = level is None
    with nogil:
        if active:
            r = fm_dot_f32(&a[0] if a.shape[0] else NULL, &b[0] if b.shape[0] else NULL, a.shape[0])
        else:
            r = k.dot(&a[0] if a.shape[0] else NULL, &b[0] if b.shape[0] else NULL, a.shape[0])
    return r


def axpy_f32(float[::1] y, float a, const float[::1] x, level=None):
    """y += a*x in place (fm_axpy_f32; level None: the active SIMD path)."""
    cdef const fm_kernels *k = _kernels(level)
    if y.shape[0] != x.shape[0]:
        raise ArgumentError(f"x: length {x.shape[0]} != y length {y.shape[0]}")
    cdef bint active = level is None
    with nogil:
        if active:
            fm_axpy_f32(&y[0] if y.shape[0] else NULL, a, &x[0] if x.shape[0] else NULL, y.shape[0])
        else:
            k.axpy(&y[0] if y.shape[0] else NULL, a, &x[0] if x.shape[0] else NULL, y.shape[0])
