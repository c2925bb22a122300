/* fm_cuda_test.cu: the CUDA backend's kernel entry points for tests (fm_cuda_test_* in fm_backend.h).
 *
 * Owns: fm_cuda_test_matmul / swiglu / experts / norm / route (+ route_sigmoid, fm_ref.h) / conv1d / gdn /
 * attention: each puts
 * its host inputs in fresh device buffers (outputs poisoned), runs the same launch path as the
 * layer ops, and copies the results back; tests/test_cuda.py compares them with the CPU kernels.
 * Does not own: the launches (fm_cuda_ops.cu, fm_cuda_experts.cu), kernels (fm_cuda_*.cuh).
 */
#include <stdlib.h>

#include "fmc_internal.cuh"
#include "fm_ref.h"

typedef struct {
    void *p[40];
    int n;
} tbufs;

static void tb_free(tbufs *t) {
    for (int i = 0; i < t->n; i++) cudaFree(t->p[i]);
    t->n = 0;
}

/* the split-K workspace a launch allocated (fmc_launch_mm's *ws, NULL if none): freed with tb */
static void tb_own(tbufs *t, void *p) {
    if (!p) return;
    if (t->n < 40) t->p[t->n++] = p;
    else {
        cudaDeviceSynchronize();
        cudaFree(p);
    }
}

static void *tb_put(tbufs *t, const void *src, size_t bytes) {
    if (!bytes) bytes = 4;
    void *d = NULL;
    if (t->n >= 40 || cudaMalloc(&d, bytes) != cudaSuccess) return NULL;
    t->p[t->n++] = d;
    if (src && cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice) != cudaSuccess) return NULL;
    if (!src) cudaMemset(d, 0xff, bytes); /* poison: every output element must be written */
    return d;
}

#define TPUT(dst, src, bytes)                                                                                 \
    do {                                                                                                      \
        (dst) = tb_put(&tb, (src), (bytes));                                                                  \
        if (!(dst)) {                                                                                         \
            tb_free(&tb);                                                                                     \
            return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: test buffer allocation/copy failed");          \
        }                                                                                                     \
    } while (0)

#define TEND(out, dsrc, bytes)                                                                                \
    do {                                                                                                      \
        cudaError_t e_ = cudaDeviceSynchronize();                                                             \
        if (e_ == cudaSuccess) e_ = cudaMemcpy((out), (dsrc), (bytes), cudaMemcpyDeviceToHost);               \
        if (e_ != cudaSuccess) {                                                                              \
            tb_free(&tb);                                                                                     \
            return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: %s", cudaGetErrorString(e_));                  \
        }                                                                                                     \
    } while (0)

extern "C" fm_status fm_cuda_test_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *q,
                                         const uint16_t *scales, const uint16_t *biases, const float *X, int64_t n,
                                         float *Y, int32_t mma, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    tbufs tb = {{0}, 0};
    DMat W;
    memset(&W, 0, sizeof W);
    W.rows = rows;
    W.cols = cols;
    W.gs = group_size;
    void *d;
    if (bits == 32 || bits == 16) {
        W.kind = bits == 32 ? 0 : 1;
        TPUT(d, q, (size_t)(rows * cols * (bits / 8)));
        W.w = d;
    } else {
        if (cols % 32 || group_size % 32 || cols % group_size) {
            return fm_errf(err, errlen, FM_ERR_ARG, "cols/group_size must be multiples of 32");
        }
        W.kind = bits;
        TPUT(d, q, (size_t)(rows * cols * bits / 8));
        W.w = d;
        TPUT(d, scales, (size_t)(rows * (cols / group_size) * 2));
        W.s = (const uint16_t *)d;
        TPUT(d, biases, (size_t)(rows * (cols / group_size) * 2));
        W.b = (const uint16_t *)d;
    }
    void *dx, *dy;
    TPUT(dx, X, (size_t)(n * cols) * 4);
    TPUT(dy, NULL, (size_t)(n * rows) * 4);
    float *ws = NULL;
    fm_status st =
        fmc_launch_mm(0, fmc_sm_count(), mma, &ws, W, (const float *)dx, cols, n, (float *)dy, rows, 0, err, errlen);
    tb_own(&tb, ws);
    if (st != FM_OK) {
        tb_free(&tb);
        return st;
    }
    TEND(Y, dy, (size_t)(n * rows) * 4);
    tb_free(&tb);
    return FM_OK;
}

/* a test matrix (bits as fm_cuda_test_matmul) into device buffers owned by tb; 0 on failure */
static int test_mat(tbufs *tb, int32_t bits, int32_t gs, int64_t rows, int64_t cols, const void *q,
                    const uint16_t *scales, const uint16_t *biases, DMat *W) {
    memset(W, 0, sizeof *W);
    W->rows = rows;
    W->cols = cols;
    W->gs = gs;
    if (bits == 32 || bits == 16) {
        W->kind = bits == 32 ? 0 : 1;
        return (W->w = tb_put(tb, q, (size_t)(rows * cols * (bits / 8)))) != NULL;
    }
    W->kind = bits;
    if (!(W->w = tb_put(tb, q, (size_t)(rows * cols * bits / 8)))) return 0;
    if (!(W->s = (const uint16_t *)tb_put(tb, scales, (size_t)(rows * (cols / gs) * 2)))) return 0;
    return (W->b = (const uint16_t *)tb_put(tb, biases, (size_t)(rows * (cols / gs) * 2))) != NULL;
}

extern "C" fm_status fm_cuda_test_swiglu(int32_t bits, int32_t group_size, int32_t up_bits, int32_t up_group_size,
                                         int64_t rows, int64_t cols, const void *qg, const uint16_t *sg,
                                         const uint16_t *bg, const void *qu, const uint16_t *su, const uint16_t *bu,
                                         const float *X, int64_t n, float *Y, int32_t mma, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    if ((bits != 16 && bits != 32 && (cols % 32 || group_size % 32 || cols % group_size)) ||
        (up_bits != 16 && up_bits != 32 && (cols % 32 || up_group_size % 32 || cols % up_group_size)))
        return fm_errf(err, errlen, FM_ERR_ARG, "cols/group_size must be multiples of 32");
    tbufs tb = {{0}, 0};
    DMat G, U;
    void *dx, *dy;
    if (!test_mat(&tb, bits, group_size, rows, cols, qg, sg, bg, &G) ||
        !test_mat(&tb, up_bits, up_group_size, rows, cols, qu, su, bu, &U)) {
        tb_free(&tb);
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: test buffer allocation/copy failed");
    }
    TPUT(dx, X, (size_t)(n * cols) * 4);
    TPUT(dy, NULL, (size_t)(n * rows) * 4);
    float *ws = NULL;
    fm_status st =
        fmc_launch_swiglu(0, fmc_sm_count(), mma, &ws, G, U, (const float *)dx, cols, n, (float *)dy, err, errlen);
    tb_own(&tb, ws);
    if (st != FM_OK) {
        tb_free(&tb);
        return st;
    }
    TEND(Y, dy, (size_t)(n * rows) * 4);
    tb_free(&tb);
    return FM_OK;
}

extern "C" fm_status fm_cuda_test_experts(int32_t bits, int32_t group_size, int64_t H, int64_t I, int32_t E, int32_t K,
                                          const void *blocks, uint64_t block_bytes, const uint64_t *offs,
                                          const int32_t *ids, const float *X, int64_t n, float *Ye, char *err,
                                          size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    const int kind = bits == 32 ? 0 : bits == 16 ? 1 : bits;
    DPart pg = {kind, group_size, I, H, offs[0], offs[1], offs[2]};
    DPart pu = {kind, group_size, I, H, offs[3], offs[4], offs[5]};
    DPart pd = {kind, group_size, H, I, offs[6], offs[7], offs[8]};
    if (!fmc_mma_experts_ok(pg, pu, pd, H))
        return fm_errf(err, errlen, FM_ERR_ARG, "expert shapes / kind not supported by the grouped kernels");
    const int64_t npairs = n * K;
    if (npairs <= 0) return FM_OK;
    tbufs tb = {{0}, 0};
    void *dblk, *dx, *dhb, *dye, *dp, *dw;
    TPUT(dblk, blocks, (size_t)E * block_bytes);
    TPUT(dx, X, (size_t)(n * H) * 4);
    TPUT(dhb, NULL, (size_t)(npairs * I) * 4);
    TPUT(dye, NULL, (size_t)(npairs * H) * 4);
    const uint8_t **hp = (const uint8_t **)malloc(sizeof(void *) * (size_t)npairs);
    int32_t *cnt = (int32_t *)malloc(sizeof(int32_t) * (size_t)E);
    int32_t *hw = (int32_t *)malloc(sizeof(int32_t) * 3 * (size_t)npairs);
    fm_status st = FM_OK;
    int nt = 1;
    int64_t nitems = 0, np = 0;
    if (!hp || !cnt || !hw) {
        st = fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
        goto done;
    }
    for (int64_t p = 0; p < npairs; p++) {
        if (ids[p] < 0 || ids[p] >= E) {
            st = fm_errf(err, errlen, FM_ERR_ARG, "expert id %d out of range", ids[p]);
            goto done;
        }
        hp[p] = (const uint8_t *)dblk + (uint64_t)ids[p] * block_bytes;
    }
    st = fmc_mma_work_build(ids, NULL, npairs, E, cnt, hw, &nt, &nitems, &np, err, errlen);
    if (st != FM_OK) goto done;
    dp = tb_put(&tb, hp, sizeof(void *) * (size_t)npairs);
    dw = tb_put(&tb, hw, sizeof(int32_t) * (size_t)(2 * nitems + np));
    if (!dp || !dw) {
        st = fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: test buffer allocation/copy failed");
        goto done;
    }
    st = fmc_mma_launch_experts(0, (const uint8_t *const *)dp, (const int32_t *)dw, nitems, nt, pg, pu, pd, K, H,
                            (const float *)dx, (float *)dhb, (float *)dye, err, errlen);
done:
    free(hp);
    free(cnt);
    free(hw);
    if (st != FM_OK) {
        tb_free(&tb);
        return st;
    }
    TEND(Ye, dye, (size_t)(npairs * H) * 4);
    tb_free(&tb);
    return FM_OK;
}

extern "C" fm_status fm_cuda_test_norm(int32_t op, const float *x, const float *z, const float *w, int64_t n, int64_t d,
                                       float eps, float offset, float *y, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    tbufs tb = {{0}, 0};
    void *dx, *dz = NULL, *dw = NULL, *dy;
    TPUT(dx, x, (size_t)(n * d) * 4);
    if (op == 1) TPUT(dz, z, (size_t)(n * d) * 4);
    if (op != 2) TPUT(dw, w, (size_t)d * 4);
    TPUT(dy, NULL, (size_t)(n * d) * 4);
    fm_status st = fmc_launch_norm(0, op, (const float *)dx, (const float *)dz, (const float *)dw, n, d, eps, offset,
                               (float *)dy, err, errlen);
    if (st != FM_OK) {
        tb_free(&tb);
        return st;
    }
    TEND(y, dy, (size_t)(n * d) * 4);
    tb_free(&tb);
    return FM_OK;
}

extern "C" fm_status fm_cuda_test_route(const float *logits, int64_t n, int32_t E, int32_t K, int32_t norm, int32_t *idx,
                                        float *w, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    tbufs tb = {{0}, 0};
    void *dl, *di, *dw;
    TPUT(dl, logits, (size_t)(n * E) * 4);
    TPUT(di, NULL, (size_t)(n * K) * 4);
    TPUT(dw, NULL, (size_t)(n * K) * 4);
    k_route<<<(unsigned)n, 32, sizeof(float) * (size_t)E>>>((const float *)dl, E, K, norm, (int32_t *)di, (float *)dw);
    TEND(idx, di, (size_t)(n * K) * 4);
    TEND(w, dw, (size_t)(n * K) * 4);
    tb_free(&tb);
    return FM_OK;
}

/* the sigmoid router of n tokens (k_route_sigmoid; reference fm_ref_route_ex of fm_ref.h) */
extern "C" fm_status fm_cuda_test_route_sigmoid(const float *logits, const float *bias, int64_t n, int32_t E, int32_t K,
                                                int32_t norm, int32_t n_group, int32_t topk_group, float scale,
                                                int32_t *idx, float *w, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    if (E < 1 || K < 1 || K > E || n_group < 1 || topk_group < 1 || topk_group > n_group || E % n_group ||
        (n_group > 1 && E / n_group < 2) || K > topk_group * (E / n_group))
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_cuda_test_route_sigmoid: bad configuration");
    tbufs tb = {{0}, 0};
    void *dl, *db = NULL, *di, *dw;
    TPUT(dl, logits, (size_t)(n * E) * 4);
    if (bias) TPUT(db, bias, (size_t)E * 4);
    TPUT(di, NULL, (size_t)(n * K) * 4);
    TPUT(dw, NULL, (size_t)(n * K) * 4);
    k_route_sigmoid<<<(unsigned)n, 32, sizeof(float) * (size_t)(2 * E + 2 * n_group)>>>(
        (const float *)dl, (const float *)db, E, K, norm, n_group, topk_group, scale, (int32_t *)di, (float *)dw);
    TEND(idx, di, (size_t)(n * K) * 4);
    TEND(w, dw, (size_t)(n * K) * 4);
    tb_free(&tb);
    return FM_OK;
}

extern "C" fm_status fm_cuda_test_conv1d(const float *X, int64_t n, float *state, const float *w, int32_t C, int32_t k,
                                         float *Y, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    if (k < 1 || k > 9) return fm_errf(err, errlen, FM_ERR_ARG, "k must be in 1..9");
    tbufs tb = {{0}, 0};
    void *dx, *ds, *dw, *dy;
    TPUT(dx, X, (size_t)(n * C) * 4);
    TPUT(ds, state, (size_t)((k > 1 ? k - 1 : 1) * (int64_t)C) * 4);
    TPUT(dw, w, (size_t)((int64_t)C * k) * 4);
    TPUT(dy, NULL, (size_t)(n * C) * 4);
    k_conv<<<(unsigned)((C + 127) / 128), 128>>>((const float *)dx, n, (float *)ds, (const float *)dw, C, k, (float *)dy);
    TEND(Y, dy, (size_t)(n * C) * 4);
    if (k > 1) TEND(state, ds, (size_t)((k - 1) * (int64_t)C) * 4);
    tb_free(&tb);
    return FM_OK;
}

extern "C" fm_status fm_cuda_test_gdn(const float *qkv, const float *z, const float *a, const float *b,
                                      const float *A_log, const float *dt_bias, const float *norm_w, int64_t n, int32_t nk,
                                      int32_t nv, int32_t dk, int32_t dv, float eps, float *S, float *O,
                                      int32_t gdn_chunk, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    tbufs tb = {{0}, 0};
    const int64_t cd = 2 * (int64_t)nk * dk + (int64_t)nv * dv, vd = (int64_t)nv * dv;
    void *dq, *dz, *da, *db, *dA, *dt, *dn, *dS, *dO;
    TPUT(dq, qkv, (size_t)(n * cd) * 4);
    TPUT(dz, z, (size_t)(n * vd) * 4);
    TPUT(da, a, (size_t)(n * nv) * 4);
    TPUT(db, b, (size_t)(n * nv) * 4);
    TPUT(dA, A_log, (size_t)nv * 4);
    TPUT(dt, dt_bias, (size_t)nv * 4);
    TPUT(dn, norm_w, (size_t)dv * 4);
    TPUT(dS, S, (size_t)((int64_t)nv * dk * dv) * 4);
    TPUT(dO, NULL, (size_t)(n * vd) * 4);
    fm_status st = fmc_launch_gdn(0, (const float *)dq, (const float *)dz, (const float *)da, (const float *)db,
                                  (const float *)dA, (const float *)dt, (const float *)dn, (float *)dS, (float *)dO, n,
                                  nk, nv, dk, dv, eps, gdn_chunk, err, errlen);
    if (st != FM_OK) {
        tb_free(&tb);
        return st;
    }
    TEND(O, dO, (size_t)(n * vd) * 4);
    TEND(S, dS, (size_t)((int64_t)nv * dk * dv) * 4);
    tb_free(&tb);
    return FM_OK;
}

extern "C" fm_status fm_cuda_test_attention(const float *qg, const float *k, const float *v, const float *q_norm,
                                            const float *k_norm, float *kc, float *vc, int64_t n, int32_t pos, int32_t nh,
                                            int32_t nkv, int32_t dh, int32_t rot, float theta, int32_t gate, float eps,
                                            float offset, float *out, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    tbufs tb = {{0}, 0};
    const int64_t qd = (int64_t)nh * dh, kvd = (int64_t)nkv * dh, nk = pos + n;
    void *dqg, *dk, *dv, *dqn = NULL, *dkn = NULL, *dkc, *dvc, *dq, *dg, *dout;
    TPUT(dqg, qg, (size_t)(n * qd * (gate ? 2 : 1)) * 4);
    TPUT(dk, k, (size_t)(n * kvd) * 4);
    TPUT(dv, v, (size_t)(n * kvd) * 4);
    if (q_norm) TPUT(dqn, q_norm, (size_t)dh * 4);
    if (k_norm) TPUT(dkn, k_norm, (size_t)dh * 4);
    TPUT(dkc, kc, (size_t)(nk * kvd) * 4);
    TPUT(dvc, vc, (size_t)(nk * kvd) * 4);
    TPUT(dq, NULL, (size_t)(n * qd) * 4);
    TPUT(dg, NULL, (size_t)(n * qd) * 4);
    TPUT(dout, NULL, (size_t)(n * qd) * 4);
    fm_status st = fmc_launch_attn(0, (const float *)dqg, (const float *)dk, (const float *)dv, (const float *)dqn,
                               (const float *)dkn, (float *)dq, (float *)dg, (float *)dkc, (float *)dvc, (float *)dout, n,
                               pos, NULL, nh, nkv, dh, rot, theta, gate, eps, offset, err, errlen);
    if (st != FM_OK) {
        tb_free(&tb);
        return st;
    }
    TEND(out, dout, (size_t)(n * qd) * 4);
    TEND(kc, dkc, (size_t)(nk * kvd) * 4);
    TEND(vc, dvc, (size_t)(nk * kvd) * 4);
    tb_free(&tb);
    return FM_OK;
}

