# _ops.pxi: test entry points of the model-feature ops (csrc/fm_ref.h, csrc/cuda/fm_ref.c).
#
# _ref_route / _ref_expert / _ref_attend run the CPU backend's ops (csrc/fm_ops.c) on numpy inputs
# (_cuda_route_sigmoid: the CUDA sigmoid router kernel, compared in tests/test_cuda.py);
# tests/test_model_features.py compares them with transformers' DeepSeek-V3 router, gpt-oss experts
# and gpt-oss eager attention.

cdef extern from "fm_ref.h" nogil:
    fm_status fm_ref_route_ex(const float *logits, const float *bias, int64_t n, int32_t E, int32_t K,
                              int32_t kind, int32_t norm, int32_t n_group, int32_t topk_group, float scale,
                              int32_t *idx, float *w, char *err, size_t errlen)
    fm_status fm_cuda_test_route_sigmoid(const float *logits, const float *bias, int64_t n, int32_t E, int32_t K,
                                         int32_t norm, int32_t n_group, int32_t topk_group, float scale,
                                         int32_t *idx, float *w, char *err, size_t errlen)
    fm_status fm_ref_expert(const float *x, int64_t n, int64_t H, int64_t I, const float *wg, const float *bg,
                            const float *wu, const float *bu, const float *wd, const float *bd, int32_t act,
                            float limit, float alpha, float *y, char *err, size_t errlen)
    fm_status fm_ref_attend(const float *q, const float *kc, const float *vc, int64_t n, int32_t pos, int32_t nh,
                            int32_t nkv, int32_t dh, int32_t window, const float *sinks, float scale, float *out,
                            char *err, size_t errlen)

_ROUTER_KINDS = {"softmax_topk": 0, "sigmoid_topk": 1}
_ACT_KINDS = {"swiglu": 0, "swiglu_clamp": 1}


cdef inline object _c32(a):
    import numpy as np
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


cdef inline const float *_cp(object a):
    cdef float[::1] v
    if a is None:
        return NULL
    v = a.reshape(-1)
    return &v[0]


def _ref_route(logits, int K, router="softmax_topk", bias=None, bint norm=True, int n_group=1,
               int topk_group=1, float scale=1.0):
    """fm_route on each row of logits [n, E] -> (idx int32 [n, K], w float32 [n, K])"""
    import numpy as np
    if router not in _ROUTER_KINDS:
        raise ValueError(f"router must be one of {list(_ROUTER_KINDS)}")
    logits = _c32(logits)
    bias = _c32(bias)
    cdef int64_t n = logits.shape[0]
    cdef int32_t E = logits.shape[1]
    if bias is not None and bias.shape != (E,):
        raise ValueError("bias must have shape [E]")
    idx = np.empty((n, K), dtype=np.int32)
    w = np.empty((n, K), dtype=np.float32)
    cdef int32_t[::1] iv = idx.reshape(-1)
    cdef const float *lp = _cp(logits)
    cdef const float *bp = _cp(bias)
    cdef float *wp = <float *>_cp(w)
    cdef int32_t kind = _ROUTER_KINDS[router], nrm = 1 if norm else 0
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        st = fm_ref_route_ex(lp, bp, n, E, K, kind, nrm, n_group, topk_group, scale, &iv[0], wp, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return idx, w


def _cuda_route_sigmoid(logits, int K, bias=None, bint norm=True, int n_group=1, int topk_group=1,
                        float scale=1.0):
    """the sigmoid router on the GPU (k_route_sigmoid) -> (idx int32 [n, K], w float32 [n, K]);
    BackendError without CUDA"""
    import numpy as np
    logits = _c32(logits)
    bias = _c32(bias)
    cdef int64_t n = logits.shape[0]
    cdef int32_t E = logits.shape[1]
    if bias is not None and bias.shape != (E,):
        raise ValueError("bias must have shape [E]")
    idx = np.empty((n, K), dtype=np.int32)
    w = np.empty((n, K), dtype=np.float32)
    cdef int32_t[::1] iv = idx.reshape(-1)
    cdef const float *lp = _cp(logits)
    cdef const float *bp = _cp(bias)
    cdef float *wp = <float *>_cp(w)
    cdef int32_t nrm = 1 if norm else 0
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        st = fm_cuda_test_route_sigmoid(lp, bp, n, E, K, nrm, n_group, topk_group, scale, &iv[0], wp, err,
                                        sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return idx, w


def _ref_expert(x, wg, wu, wd, bg=None, bu=None, bd=None, act="swiglu", float limit=7.0, float alpha=1.702):
    """one routed expert with f32 parts over the rows of x [n, H]: down(act(gate x + bg, up x + bu)) + bd"""
    import numpy as np
    if act not in _ACT_KINDS:
        raise ValueError(f"act must be one of {list(_ACT_KINDS)}")
    x = _c32(x)
    wg, wu, wd, bg, bu, bd = (_c32(a) for a in (wg, wu, wd, bg, bu, bd))
    cdef int64_t n = x.shape[0], H = x.shape[1], I = wg.shape[0]
    if wg.shape != (I, H) or wu.shape != (I, H) or wd.shape != (H, I):
        raise ValueError("gate / up must be [I, H], down [H, I]")
    for b, r in ((bg, I), (bu, I), (bd, H)):
        if b is not None and b.shape != (r,):
            raise ValueError("a bias must have the rows of its part")
    y = np.empty((n, H), dtype=np.float32)
    cdef const float *p0 = _cp(x)
    cdef const float *p1 = _cp(wg)
    cdef const float *p2 = _cp(bg)
    cdef const float *p3 = _cp(wu)
    cdef const float *p4 = _cp(bu)
    cdef const float *p5 = _cp(wd)
    cdef const float *p6 = _cp(bd)
    cdef float *py = <float *>_cp(y)
    cdef int32_t akind = _ACT_KINDS[act]
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        st = fm_ref_expert(p0, n, H, I, p1, p2, p3, p4, p5, p6, akind, limit, alpha, py, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return y


def _ref_attend(q, kc, vc, int pos, int nh, int nkv, int dh, int window=0, sinks=None, scale=None):
    """attention of q [n, nh*dh] at positions pos.. over kc, vc [pos+n, nkv*dh] (sliding window,
    sinks [nh]) -> out [n, nh*dh]"""
    import numpy as np
    q, kc, vc, sinks = _c32(q), _c32(kc), _c32(vc), _c32(sinks)
    cdef int64_t n = q.shape[0]
    if q.shape[1] != nh * dh or kc.shape != (pos + n, nkv * dh) or vc.shape != kc.shape:
        raise ValueError("q must be [n, nh*dh], kc / vc [pos+n, nkv*dh]")
    if sinks is not None and sinks.shape != (nh,):
        raise ValueError("sinks must be [nh]")
    cdef float sc = (1.0 / dh ** 0.5) if scale is None else scale
    out = np.empty((n, nh * dh), dtype=np.float32)
    cdef const float *p0 = _cp(q)
    cdef const float *p1 = _cp(kc)
    cdef const float *p2 = _cp(vc)
    cdef const float *p3 = _cp(sinks)
    cdef float *po = <float *>_cp(out)
    cdef char err[512]
    cdef fm_status st
    err[0] = 0
    with nogil:
        st = fm_ref_attend(p0, p1, p2, n, pos, nh, nkv, dh, window, p3, sc, po, err, sizeof(err))
    if st != FM_OK:
        raise _error_from(st, err)
    return out
