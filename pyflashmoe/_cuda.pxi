# _cuda.pxi: the CUDA backend's Python surface (owned by the CUDA work, csrc/fm_backend.h).
#
# cuda_compiled() / cuda_available() / cuda_describe(); the test-only kernel entry points
# (cuda_test_* run the CUDA kernel, ref_* the C reference on the same inputs; tests/test_cuda.py
# compares them); bandwidth probes and the per-session CUDA counters for bench/.
import numpy as _np

cdef extern from "fm_backend.h" nogil:
    ctypedef struct fm_cuda_counters:
        int64_t syncs
        int64_t h2d_bytes
        int64_t vram_hits
        int64_t ram_hits
        int64_t storage_reads
        int64_t vram_slots
        int64_t ram_slots
        int32_t resident
        int64_t cpu_experts
        int64_t cpu_layers
        double cpu_ms
        double split
        double h2d_gbps
        double cpu_gbps
        double head_ms
        int64_t head_evals
    int32_t fm_cuda_compiled()
    int32_t fm_cuda_available()
    void fm_cuda_describe(char *buf, size_t len)
    fm_status fm_cuda_test_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *q,
                                  const uint16_t *scales, const uint16_t *biases, const float *X, int64_t n,
                                  float *Y, int32_t mma, char *err, size_t errlen)
    fm_status fm_ref_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *q,
                            const uint16_t *scales, const uint16_t *biases, const float *X, int64_t n,
                            float *Y, char *err, size_t errlen)
    fm_status fm_cuda_test_swiglu(int32_t bits, int32_t group_size, int32_t up_bits, int32_t up_group_size, int64_t rows, int64_t cols, const void *qg,
                                  const uint16_t *sg, const uint16_t *bg, const void *qu, const uint16_t *su,
                                  const uint16_t *bu, const float *X, int64_t n, float *Y, int32_t mma, char *err,
                                  size_t errlen)
    fm_status fm_cuda_test_experts(int32_t bits, int32_t group_size, int64_t H, int64_t I, int32_t E, int32_t K,
                                   const void *blocks, uint64_t block_bytes, const uint64_t *offs, const int32_t *ids,
                                   const float *X, int64_t n, float *Ye, char *err, size_t errlen)
    fm_status fm_cuda_test_norm(int32_t op, const float *x, const float *z, const float *w, int64_t n,
                                int64_t d, float eps, float offset, float *y, char *err, size_t errlen)
    fm_status fm_ref_norm(int32_t op, const float *x, const float *z, const float *w, int64_t n, int64_t d,
                          float eps, float offset, float *y, char *err, size_t errlen)
    fm_status fm_cuda_test_route(const float *logits, int64_t n, int32_t E, int32_t K, int32_t norm,
                                 int32_t *idx, float *w, char *err, size_t errlen)
    fm_status fm_ref_route(const float *logits, int64_t n, int32_t E, int32_t K, int32_t norm, int32_t *idx,
                           float *w, char *err, size_t errlen)
    fm_status fm_cuda_test_conv1d(const float *X, int64_t n, float *state, const float *w, int32_t C,
                                  int32_t k, float *Y, char *err, size_t errlen)
    fm_status fm_ref_conv1d(const float *X, int64_t n, float *state, const float *w, int32_t C, int32_t k,
                            float *Y, char *err, size_t errlen)
    fm_status fm_cuda_test_gdn(const float *qkv, const float *z, const float *a, const float *b,
                               const float *A_log, const float *dt_bias, const float *norm_w, int64_t n,
                               int32_t nk, int32_t nv, int32_t dk, int32_t dv, float eps, float *S, float *O,
                               int32_t gdn_chunk, char *err, size_t errlen)
    fm_status fm_ref_gdn(const float *qkv, const float *z, const float *a, const float *b,
                         const float *A_log, const float *dt_bias, const float *norm_w, int64_t n,
                         int32_t nk, int32_t nv, int32_t dk, int32_t dv, float eps, float *S, float *O,
                         char *err, size_t errlen)
    fm_status fm_cuda_test_attention(const float *qg, const float *k, const float *v, const float *q_norm,
                                     const float *k_norm, float *kc, float *vc, int64_t n, int32_t pos,
                                     int32_t nh, int32_t nkv, int32_t dh, int32_t rot, float theta,
                                     int32_t gate, float eps, float offset, float *out, char *err,
                                     size_t errlen)
    fm_status fm_ref_attention(const float *qg, const float *k, const float *v, const float *q_norm,
                               const float *k_norm, float *kc, float *vc, int64_t n, int32_t pos,
                               int32_t nh, int32_t nkv, int32_t dh, int32_t rot, float theta,
                               int32_t gate, float eps, float offset, float *out, char *err, size_t errlen)
    fm_status fm_cuda_h2d_bandwidth(uint64_t bytes, int32_t reps, double *gbps, char *err, size_t errlen)
    fm_status fm_cuda_d2d_bandwidth(uint64_t bytes, int32_t reps, double *gbps, char *err, size_t errlen)
    void fm_cuda_session_counters(const fm_session *s, fm_cuda_counters *out)


def cuda_compiled():
    """True when this build contains the CUDA backend (nvcc was found at build time)."""
    return fm_cuda_compiled() != 0


def cuda_available():
    """True when the CUDA backend is compiled in AND a CUDA device is usable."""
    cdef int32_t r
    with nogil:
        r = fm_cuda_available()
    return r != 0


def cuda_describe():
    """Device 0 as 'NAME (sm_XY, N MiB, S SMs)', or why no device is usable."""
    cdef char buf[256]
    with nogil:
        fm_cuda_describe(buf, sizeof(buf))
    return buf.decode("utf-8", "replace")


cdef inline object _f32(a):
    return _np.ascontiguousarray(a, dtype=_np.float32)


cdef inline const float *_fp(object a):
    cdef float[::1] v
    if a is None:
        return NULL
    v = a.reshape(-1)
    return &v[0]


def _kernel_matmul(bint gpu, int bits, int group_size, q, scales, biases, X, bint mma=True):
    """Y[n, rows] = X[n, cols] W^T on the GPU (gpu=True) or with the C reference. bits 2..8: q uint32
    [rows, cols*bits/32] + bf16 (uint16) scales/biases; 16: q uint16 bf16 [rows, cols]; 32: q float32.
    mma (GPU, n >= 2): tensor cores (debug cuda_mma=1, the default) or the fp32 kernels."""
    cdef int32_t use_mma = 1 if mma else 0
    X = _f32(X)
    if X.ndim == 1:
        X = X[None, :]
    cdef int64_t n = X.shape[0], cols = X.shape[1]
    q = _np.ascontiguousarray(q)
    cdef int64_t rows = q.shape[0]
    Y = _np.empty((n, rows), dtype=_np.float32)
    cdef const unsigned char[::1] qb = q.reshape(-1).view(_np.uint8)
    cdef const uint16_t[::1] sv
    cdef const uint16_t[::1] bv
    cdef const uint16_t *sp = NULL
    cdef const uint16_t *bp = NULL
    if bits < 16:
        sv = _np.ascontiguousarray(scales, dtype=_np.uint16).reshape(-1)
        bv = _np.ascontiguousarray(biases, dtype=_np.uint16).reshape(-1)
        sp = &sv[0]
        bp = &bv[0]
    cdef const float *xp = _fp(X)
    cdef float *yp = <float *>_fp(Y)
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        if gpu:
            st = fm_cuda_test_matmul(bits, group_size, rows, cols, &qb[0], sp, bp, xp, n, yp, use_mma, err,
                                     sizeof(err))
        else:
            st = fm_ref_matmul(bits, group_size, rows, cols, &qb[0], sp, bp, xp, n, yp, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return Y


def _kernel_swiglu(int bits, int group_size, qg, sg, bg, qu, su, bu, X, bint mma=True, up_bits=None,
                   up_group_size=None):
    """Y[n, rows] = silu(X G^T) * (X U^T) on the GPU; G (qg, sg, bg) and U as _kernel_matmul's q, scales,
    biases; G of bits / group_size, U of up_bits / up_group_size (default: G's); mma as _kernel_matmul's."""
    cdef int32_t use_mma = 1 if mma else 0
    cdef int32_t ubits = bits if up_bits is None else int(up_bits)
    cdef int32_t ugs = group_size if up_group_size is None else int(up_group_size)
    X = _f32(X)
    if X.ndim == 1:
        X = X[None, :]
    cdef int64_t n = X.shape[0], cols = X.shape[1]
    qg = _np.ascontiguousarray(qg)
    qu = _np.ascontiguousarray(qu)
    if qg.ndim != 2 or qu.ndim != 2 or qg.shape[0] != qu.shape[0]:
        raise ValueError("gate and up differ in rows")
    cdef int64_t rows = qg.shape[0]
    Y = _np.empty((n, rows), dtype=_np.float32)
    cdef const unsigned char[::1] gb = qg.reshape(-1).view(_np.uint8)
    cdef const unsigned char[::1] ub = qu.reshape(-1).view(_np.uint8)
    cdef const uint16_t[::1] v0
    cdef const uint16_t[::1] v1
    cdef const uint16_t[::1] v2
    cdef const uint16_t[::1] v3
    cdef const uint16_t *p0 = NULL
    cdef const uint16_t *p1 = NULL
    cdef const uint16_t *p2 = NULL
    cdef const uint16_t *p3 = NULL
    if bits < 16:
        v0 = _np.ascontiguousarray(sg, dtype=_np.uint16).reshape(-1)
        v1 = _np.ascontiguousarray(bg, dtype=_np.uint16).reshape(-1)
        p0 = &v0[0]
        p1 = &v1[0]
    if ubits < 16:
        v2 = _np.ascontiguousarray(su, dtype=_np.uint16).reshape(-1)
        v3 = _np.ascontiguousarray(bu, dtype=_np.uint16).reshape(-1)
        p2 = &v2[0]
        p3 = &v3[0]
    cdef const float *xp = _fp(X)
    cdef float *yp = <float *>_fp(Y)
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        st = fm_cuda_test_swiglu(bits, group_size, ubits, ugs, rows, cols, &gb[0], p0, p1, &ub[0], p2, p3, xp, n, yp, use_mma,
                                 err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return Y


def _kernel_experts(int bits, int group_size, int64_t H, int64_t I, blocks, offs, ids, X):
    """Routed experts grouped by expert on the GPU (the prefill path): Ye[p, H] for pair p = t*K + k of
    ids [n, K], expert blocks [E, block_bytes] (uint8) with gate/up [I, H] and down [H, I] at offs[9]
    (gate w, s, b, up w, s, b, down w, s, b)."""
    X = _f32(X)
    ids = _np.ascontiguousarray(ids, dtype=_np.int32)
    blocks = _np.ascontiguousarray(blocks, dtype=_np.uint8)
    cdef int64_t n = X.shape[0]
    cdef int32_t K = ids.shape[1], E = blocks.shape[0]
    cdef uint64_t bb = blocks.shape[1]
    if X.shape[1] != H or ids.shape[0] != n:
        raise ValueError("X / ids shapes do not match")
    o = _np.ascontiguousarray(offs, dtype=_np.uint64)
    if o.shape[0] != 9:
        raise ValueError("offs needs 9 offsets")
    Ye = _np.empty((n * K, H), dtype=_np.float32)
    cdef const unsigned char[::1] bv = blocks.reshape(-1)
    cdef const uint64_t[::1] ov = o
    cdef const int32_t[::1] iv = ids.reshape(-1)
    cdef const float *xp = _fp(X)
    cdef float *yp = <float *>_fp(Ye)
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        st = fm_cuda_test_experts(bits, group_size, H, I, E, K, &bv[0], bb, &ov[0], &iv[0], xp, n, yp, err,
                                  sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return Ye


def _kernel_norm(bint gpu, int op, x, z, w, float eps, float offset):
    """op 0 rmsnorm (x̂ (w + offset)), 1 gated (w x̂ silu(z)), 2 l2 norm; rows of x."""
    x = _f32(x)
    cdef int64_t n = x.shape[0], d = x.shape[1]
    z = _f32(z) if z is not None else None
    w = _f32(w) if w is not None else None
    y = _np.empty_like(x)
    cdef const float *xp = _fp(x)
    cdef const float *zp = _fp(z)
    cdef const float *wp = _fp(w)
    cdef float *yp = <float *>_fp(y)
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        if gpu:
            st = fm_cuda_test_norm(op, xp, zp, wp, n, d, eps, offset, yp, err, sizeof(err))
        else:
            st = fm_ref_norm(op, xp, zp, wp, n, d, eps, offset, yp, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return y


def _kernel_route(bint gpu, logits, int K, bint norm):
    """softmax + top-K (+ renormalise) of each row of logits [n, E] -> (idx int32 [n, K], w [n, K])"""
    logits = _f32(logits)
    cdef int64_t n = logits.shape[0]
    cdef int32_t E = logits.shape[1]
    idx = _np.empty((n, K), dtype=_np.int32)
    w = _np.empty((n, K), dtype=_np.float32)
    cdef int32_t[::1] iv = idx.reshape(-1)
    cdef const float *lp = _fp(logits)
    cdef float *wp = <float *>_fp(w)
    cdef char err[512]
    cdef fm_status st
    cdef int32_t nrm = 1 if norm else 0
    err[0] = 0
    with nogil:
        if gpu:
            st = fm_cuda_test_route(lp, n, E, K, nrm, &iv[0], wp, err, sizeof(err))
        else:
            st = fm_ref_route(lp, n, E, K, nrm, &iv[0], wp, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return idx, w


def _kernel_conv1d(bint gpu, X, state, w):
    """causal depthwise conv1d + SiLU: X [n, C], state [k-1, C] (copied, returned updated), w [C, k]
    -> (Y [n, C], state)"""
    X = _f32(X)
    w = _f32(w)
    state = _f32(state).copy()
    cdef int64_t n = X.shape[0]
    cdef int32_t C = X.shape[1], k = w.shape[1]
    Y = _np.empty_like(X)
    cdef const float *xp = _fp(X)
    cdef float *sp = <float *>_fp(state)
    cdef const float *wp = _fp(w)
    cdef float *yp = <float *>_fp(Y)
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        if gpu:
            st = fm_cuda_test_conv1d(xp, n, sp, wp, C, k, yp, err, sizeof(err))
        else:
            st = fm_ref_conv1d(xp, n, sp, wp, C, k, yp, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return Y, state


def _kernel_gdn(bint gpu, qkv, z, a, b, A_log, dt_bias, norm_w, S, int nk, int nv, int dk, int dv, float eps,
                int gdn_chunk=2):
    """GatedDeltaNet over n tokens (see fm_backend.h) -> (O [n, nv*dv], S updated copy); gdn_chunk (GPU):
    debug gdn_chunk, the chunked kernel from that many tokens on (0: never)"""
    if gdn_chunk < 0:
        raise ArgumentError(f"gdn_chunk must be >= 0 (got {gdn_chunk})")
    qkv = _f32(qkv)
    z = _f32(z)
    a = _f32(a)
    b = _f32(b)
    A_log = _f32(A_log)
    dt_bias = _f32(dt_bias)
    norm_w = _f32(norm_w)
    S = _f32(S).copy()
    cdef int64_t n = qkv.shape[0]
    O = _np.empty((n, nv * dv), dtype=_np.float32)
    cdef const float *p0 = _fp(qkv)
    cdef const float *p1 = _fp(z)
    cdef const float *p2 = _fp(a)
    cdef const float *p3 = _fp(b)
    cdef const float *p4 = _fp(A_log)
    cdef const float *p5 = _fp(dt_bias)
    cdef const float *p6 = _fp(norm_w)
    cdef float *ps = <float *>_fp(S)
    cdef float *po = <float *>_fp(O)
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        if gpu:
            st = fm_cuda_test_gdn(p0, p1, p2, p3, p4, p5, p6, n, nk, nv, dk, dv, eps, ps, po, gdn_chunk, err,
                                  sizeof(err))
        else:
            st = fm_ref_gdn(p0, p1, p2, p3, p4, p5, p6, n, nk, nv, dk, dv, eps, ps, po, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return O, S


def _kernel_attention(bint gpu, qg, k, v, q_norm, k_norm, kc, vc, int pos, int nh, int nkv, int dh, int rot,
                      float theta, bint gate, float eps, float offset):
    """full attention of n new tokens at pos (see fm_backend.h) -> (out [n, nh*dh], kc, vc updated copies)"""
    qg = _f32(qg)
    k = _f32(k)
    v = _f32(v)
    q_norm = _f32(q_norm) if q_norm is not None else None
    k_norm = _f32(k_norm) if k_norm is not None else None
    kc = _f32(kc).copy()
    vc = _f32(vc).copy()
    cdef int64_t n = qg.shape[0]
    out = _np.empty((n, nh * dh), dtype=_np.float32)
    cdef const float *p0 = _fp(qg)
    cdef const float *p1 = _fp(k)
    cdef const float *p2 = _fp(v)
    cdef const float *p3 = _fp(q_norm)
    cdef const float *p4 = _fp(k_norm)
    cdef float *p5 = <float *>_fp(kc)
    cdef float *p6 = <float *>_fp(vc)
    cdef float *po = <float *>_fp(out)
    cdef int32_t g = 1 if gate else 0
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        if gpu:
            st = fm_cuda_test_attention(p0, p1, p2, p3, p4, p5, p6, n, pos, nh, nkv, dh, rot, theta, g, eps,
                                        offset, po, err, sizeof(err))
        else:
            st = fm_ref_attention(p0, p1, p2, p3, p4, p5, p6, n, pos, nh, nkv, dh, rot, theta, g, eps, offset,
                                  po, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return out, kc, vc


def cuda_h2d_bandwidth(uint64_t nbytes=1 << 30, int reps=10):
    """Pinned host -> device copy bandwidth in GB/s (median of reps)."""
    cdef double g = 0
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        st = fm_cuda_h2d_bandwidth(nbytes, reps, &g, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return g


def cuda_d2d_bandwidth(uint64_t nbytes=1 << 30, int reps=10):
    """Device -> device copy bandwidth in GB/s, bytes read + written (median of reps)."""
    cdef double g = 0
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        st = fm_cuda_d2d_bandwidth(nbytes, reps, &g, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return g


def cuda_counters(Session session):
    """CUDA-side counters of a session (all zero on the CPU backend): host syncs, H2D expert bytes,
    hits per tier, storage reads, slot counts, resident flag; the CPU split's experts / layers / ms
    (cumulative), its setting (-1 auto), the model's measured PCIe and CPU-expert rates (GB/s), and the
    device time of the final norm + lm_head (head_ms, cumulative over head_evals evals; plain launches)."""
    cdef fm_cuda_counters c
    fm_cuda_session_counters(session._ptr(), &c)
    return {"syncs": c.syncs, "h2d_bytes": c.h2d_bytes, "vram_hits": c.vram_hits, "ram_hits": c.ram_hits,
            "storage_reads": c.storage_reads, "vram_slots": c.vram_slots, "ram_slots": c.ram_slots,
            "resident": bool(c.resident), "cpu_experts": c.cpu_experts, "cpu_layers": c.cpu_layers,
            "cpu_ms": c.cpu_ms, "split": c.split, "h2d_gbps": c.h2d_gbps, "cpu_gbps": c.cpu_gbps,
            "head_ms": c.head_ms, "head_evals": c.head_evals}
