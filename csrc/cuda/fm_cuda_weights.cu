/* fm_cuda_weights.cu: the CUDA backend's model: open/close, the dense weights in VRAM, the device.
 *
 * Owns: fm_cuda_model_open / fm_cuda_model_close (streams, events, one cudaMalloc per dense tensor,
 * uploaded from the mapped model; the expert tiers are opened by fmc_moe_open), the SM count,
 * fm_cuda_compiled / fm_cuda_available / fm_cuda_describe, the H2D / D2D bandwidth probes.
 * Does not own: the expert tiers (fm_cuda_moe.cu), sessions and the layer ops (fm_cuda_ops.cu),
 * model parsing (fm_model.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "fmc_internal.cuh"

int fmc_sm_count(void) {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 132;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 132;
    return n;
}

static int kind_of(const fm_qmat *W) {
    return W->dt == FM_DT_F32 ? 0 : W->dt == FM_DT_BF16 ? 1 : W->bits;
}

static fm_status dev_upload(fmc_model *cm, const void *src, size_t bytes, void **out, char *err, size_t errlen) {
    *out = NULL;
    if (!src || !bytes) return FM_OK;
    if (cm->n_allocs == cm->cap_allocs) {
        int32_t nc = cm->cap_allocs ? cm->cap_allocs * 2 : 256;
        void **na = (void **)realloc(cm->allocs, sizeof(void *) * (size_t)nc);
        if (!na) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
        cm->allocs = na;
        cm->cap_allocs = nc;
    }
    void *d = NULL;
    cudaError_t e = cudaMalloc(&d, bytes);
    if (e != cudaSuccess)
        return fm_errf(err, errlen, FM_ERR_OOM, "CUDA: cannot allocate %.1f MiB of VRAM for the dense weights: %s",
                       (double)bytes / 1048576.0, cudaGetErrorString(e));
    cm->allocs[cm->n_allocs++] = d;
    CK(cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice));
    *out = d;
    return FM_OK;
}

static fm_status up_mat(fmc_model *cm, const fm_qmat *q, DMat *o, char *err, size_t errlen) {
    memset(o, 0, sizeof *o);
    if (q->rows <= 0 || q->cols <= 0) return FM_OK;
    o->kind = kind_of(q);
    o->gs = q->group_size;
    o->rows = q->rows;
    o->cols = q->cols;
    uint64_t n = (uint64_t)q->rows * (uint64_t)q->cols;
    void *d;
    if (q->dt == FM_DT_F32 || q->dt == FM_DT_BF16) {
        if (!q->data) return FM_OK;
        CKS(dev_upload(cm, q->data, n * (q->dt == FM_DT_F32 ? 4 : 2), &d, err, errlen));
        o->w = d;
    } else {
        if (!q->q) return FM_OK;
        if (q->cols % 32 || q->group_size % 32)
            return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: affine matrix with %lld columns / group %d unsupported",
                           (long long)q->cols, q->group_size);
        CKS(dev_upload(cm, q->q, n * (uint64_t)q->bits / 8, &d, err, errlen));
        o->w = d;
        uint64_t sb = (uint64_t)q->rows * (uint64_t)(q->cols / q->group_size) * 2;
        CKS(dev_upload(cm, q->scales, sb, &d, err, errlen));
        o->s = (const uint16_t *)d;
        CKS(dev_upload(cm, q->biases, sb, &d, err, errlen));
        o->b = (const uint16_t *)d;
    }
    return FM_OK;
}

static fm_status up_vec(fmc_model *cm, const float *v, int64_t n, const float **o, char *err, size_t errlen) {
    void *d = NULL;
    CKS(dev_upload(cm, v, (size_t)(n > 0 ? n : 0) * sizeof(float), &d, err, errlen));
    *o = (const float *)d;
    return FM_OK;
}

static DPart to_dpart(const fm_part *p) {
    DPart d;
    d.kind = p->dt == FM_DT_F32 ? 0 : p->dt == FM_DT_BF16 ? 1 : p->bits;
    d.gs = p->group_size;
    d.rows = p->rows;
    d.cols = p->cols;
    if (p->dt == FM_DT_AFFINE) {
        d.off_w = p->off_q;
        d.off_s = p->off_s;
        d.off_b = p->off_b;
    } else {
        d.off_w = p->off_data;
        d.off_s = d.off_b = 0;
    }
    return d;
}

void fm_cuda_model_close(void *p) {
    fmc_model *cm = (fmc_model *)p;
    if (!cm) return;
    cudaSetDevice(0);
    if (cm->cs) cudaStreamSynchronize(cm->cs);
    if (cm->xs) cudaStreamSynchronize(cm->xs);
    fmc_moe_close(cm);
    for (int32_t i = 0; i < cm->n_allocs; i++) cudaFree(cm->allocs[i]);
    free(cm->allocs);
    if (cm->mma_ws) cudaFree(cm->mma_ws);
    if (cm->ev_topi) cudaEventDestroy(cm->ev_topi);
    if (cm->ev_copy) cudaEventDestroy(cm->ev_copy);
    if (cm->ev_comp) cudaEventDestroy(cm->ev_comp);
    if (cm->ev_t0) cudaEventDestroy(cm->ev_t0);
    if (cm->ev_t1) cudaEventDestroy(cm->ev_t1);
    if (cm->ev_h0) cudaEventDestroy(cm->ev_h0);
    if (cm->ev_h1) cudaEventDestroy(cm->ev_h1);
    for (int i = 0; i < FMC_PSET; i++)
        if (cm->ev_grp[i]) cudaEventDestroy(cm->ev_grp[i]);
    if (cm->cs) cudaStreamDestroy(cm->cs);
    if (cm->xs) cudaStreamDestroy(cm->xs);
    free(cm->L);
    free(cm);
}

fm_status fm_cuda_model_open(fm_model *m, const fm_model_params *p, void **out, char *err, size_t errlen) {
    *out = NULL;
    int ndev = 0;
    cudaError_t e0 = cudaGetDeviceCount(&ndev);
    if (e0 != cudaSuccess || ndev < 1)
        return fm_errf(err, errlen, FM_ERR_BACKEND, "backend cuda: no usable CUDA device (%s)",
                       e0 != cudaSuccess ? cudaGetErrorString(e0) : "device count is 0");
    CK(cudaSetDevice(0));
    fmc_model *cm = (fmc_model *)calloc(1, sizeof *cm);
    if (!cm) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    cm->m = m;
    cm->sms = fmc_sm_count();

    fm_status st = FM_OK;
#define TRY(x)                                                                                                \
    do {                                                                                                      \
        st = (x);                                                                                             \
        if (st != FM_OK) goto fail;                                                                           \
    } while (0)
#define TRYC(x)                                                                                               \
    do {                                                                                                      \
        cudaError_t e_ = (x);                                                                                 \
        if (e_ != cudaSuccess) {                                                                              \
            st = fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: %s: %s", #x, cudaGetErrorString(e_));            \
            goto fail;                                                                                        \
        }                                                                                                     \
    } while (0)
    {
        TRYC(cudaStreamCreateWithFlags(&cm->cs, cudaStreamNonBlocking));
        TRYC(cudaStreamCreateWithFlags(&cm->xs, cudaStreamNonBlocking));
        TRYC(cudaEventCreateWithFlags(&cm->ev_topi, cudaEventDisableTiming));
        TRYC(cudaEventCreateWithFlags(&cm->ev_copy, cudaEventDisableTiming));
        TRYC(cudaEventCreateWithFlags(&cm->ev_comp, cudaEventDisableTiming));
        TRYC(cudaEventCreate(&cm->ev_t0));
        TRYC(cudaEventCreate(&cm->ev_t1));
        TRYC(cudaEventCreate(&cm->ev_h0));
        TRYC(cudaEventCreate(&cm->ev_h1));
        for (int i = 0; i < FMC_PSET; i++) TRYC(cudaEventCreateWithFlags(&cm->ev_grp[i], cudaEventDisableTiming));
        cm->split = -1.0;
        cm->L = (cl_layer *)calloc((size_t)m->n_layers, sizeof(cl_layer));
        if (!cm->L) {
            st = fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
            goto fail;
        }
        const int64_t H = m->H, cd = fmc_conv_dim(m);
        for (int32_t il = 0; il < m->n_layers; il++) {
            const fm_layer *L = &m->layers[il];
            cl_layer *c = &cm->L[il];
            TRY(up_vec(cm, L->attn_norm, H, &c->attn_norm, err, errlen));
            TRY(up_vec(cm, L->ffn_norm, H, &c->ffn_norm, err, errlen));
            if (L->attn == FM_ATTN_FULL) {
                TRY(up_mat(cm, &L->wq, &c->wq, err, errlen));
                TRY(up_mat(cm, &L->wk, &c->wk, err, errlen));
                TRY(up_mat(cm, &L->wv, &c->wv, err, errlen));
                TRY(up_mat(cm, &L->wo, &c->wo, err, errlen));
                TRY(up_vec(cm, L->q_norm, m->head_dim, &c->q_norm, err, errlen));
                TRY(up_vec(cm, L->k_norm, m->head_dim, &c->k_norm, err, errlen));
            } else {
                TRY(up_mat(cm, &L->ssm_qkv, &c->ssm_qkv, err, errlen));
                TRY(up_mat(cm, &L->ssm_z, &c->ssm_z, err, errlen));
                TRY(up_mat(cm, &L->ssm_b, &c->ssm_b, err, errlen));
                TRY(up_mat(cm, &L->ssm_a, &c->ssm_a, err, errlen));
                TRY(up_mat(cm, &L->ssm_out, &c->ssm_out, err, errlen));
                TRY(up_vec(cm, L->ssm_conv, cd * m->conv_k, &c->ssm_conv, err, errlen));
                TRY(up_vec(cm, L->dt_bias, m->lin_nv, &c->dt_bias, err, errlen));
                TRY(up_vec(cm, L->A_log, m->lin_nv, &c->A_log, err, errlen));
                TRY(up_vec(cm, L->ssm_norm, m->lin_dv, &c->ssm_norm, err, errlen));
                if (m->conv_k > 9) {
                    st = fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: conv kernel %d > 9 unsupported", m->conv_k);
                    goto fail;
                }
            }
            if (L->ffn == FM_FFN_MOE) {
                TRY(up_mat(cm, &L->router, &c->router, err, errlen));
                if (L->router_bias) TRY(up_vec(cm, L->router_bias, m->n_experts, &c->router_bias, err, errlen));
                if (L->has_shexp) {
                    TRY(up_mat(cm, &L->sh_gate, &c->sh_gate, err, errlen));
                    TRY(up_mat(cm, &L->sh_up, &c->sh_up, err, errlen));
                    TRY(up_mat(cm, &L->sh_down, &c->sh_down, err, errlen));
                    TRY(up_mat(cm, &L->sh_router, &c->sh_router, err, errlen));
                }
                c->pg = to_dpart(&L->parts[FM_PART_GATE]);
                c->pu = to_dpart(&L->parts[FM_PART_UP]);
                c->pd = to_dpart(&L->parts[FM_PART_DOWN]);
                /* gate and up may differ in format (fmc_launch_experts: fused or split launches), not in
                 * shape (both write the pair's I rows of the gate/up buffer) */
                if (c->pg.rows != c->pu.rows || c->pg.cols != c->pu.cols || c->pd.cols != c->pg.rows) {
                    st = fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: layer %d: expert gate, up and down shapes disagree",
                                 il);
                    goto fail;
                }
                if (L->block_bytes > cm->slot_bytes) cm->slot_bytes = L->block_bytes;
                cm->total_expert_bytes += L->block_bytes * (uint64_t)m->n_experts;
            } else {
                TRY(up_mat(cm, &L->ffn_gate, &c->ffn_gate, err, errlen));
                TRY(up_mat(cm, &L->ffn_up, &c->ffn_up, err, errlen));
                TRY(up_mat(cm, &L->ffn_down, &c->ffn_down, err, errlen));
            }
        }
        TRY(up_mat(cm, &m->tok_embd, &cm->tok_embd, err, errlen));
        if (!m->tie) TRY(up_mat(cm, &m->output, &cm->output, err, errlen));
        TRY(up_vec(cm, m->output_norm, H, &cm->output_norm, err, errlen));

        if (m->n_moe) TRY(fmc_moe_open(cm, p, err, errlen));
        TRYC(cudaDeviceSynchronize());
    }
#undef TRY
#undef TRYC
    *out = cm;
    return FM_OK;
fail:
    fm_cuda_model_close(cm);
    return st;
}

/* ================================================================== availability */

extern "C" int32_t fm_cuda_compiled(void) { return 1; }

extern "C" int32_t fm_cuda_available(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n > 0;
}

extern "C" void fm_cuda_describe(char *buf, size_t len) {
    if (!buf || !len) return;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n < 1) {
        snprintf(buf, len, "no usable CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "count 0");
        cudaGetLastError();
        return;
    }
    cudaDeviceProp pr;
    if (cudaGetDeviceProperties(&pr, 0) != cudaSuccess) {
        snprintf(buf, len, "CUDA device 0 (properties unavailable)");
        return;
    }
    snprintf(buf, len, "%s (sm_%d%d, %zu MiB, %d SMs)", pr.name, pr.major, pr.minor, pr.totalGlobalMem >> 20,
             pr.multiProcessorCount);
}

fm_status fmc_device_ready(char *err, size_t errlen) {
    if (!fm_cuda_available()) return fm_errf(err, errlen, FM_ERR_BACKEND, "no usable CUDA device");
    CK(cudaSetDevice(0));
    return FM_OK;
}

/* Median GB/s of `reps` timed copies (1..64) after one untimed warm-up; `factor` counts bytes moved
 * per byte copied (2 for device-to-device: read + write). */
static double timed_copy_gbps(void *dst, const void *src, uint64_t bytes, cudaMemcpyKind kind, int32_t reps,
                              double factor) {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    double v[64];
    if (reps > 64) reps = 64;
    if (reps < 1) reps = 1;
    cudaMemcpy(dst, src, bytes, kind);
    for (int i = 0; i < reps; i++) {
        cudaEventRecord(a, 0);
        cudaMemcpyAsync(dst, src, bytes, kind, 0);
        cudaEventRecord(b, 0);
        cudaEventSynchronize(b);
        float ms = 0;
        cudaEventElapsedTime(&ms, a, b);
        v[i] = factor * (double)bytes / (ms * 1e-3) / 1e9;
    }
    for (int i = 1; i < reps; i++) /* insertion sort for the median */
        for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
            double t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return v[reps / 2];
}

extern "C" fm_status fm_cuda_h2d_bandwidth(uint64_t bytes, int32_t reps, double *gbps, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    void *h = NULL, *d = NULL;
    CK(cudaHostAlloc(&h, bytes, cudaHostAllocDefault));
    memset(h, 0x5a, bytes);
    cudaError_t e = cudaMalloc(&d, bytes);
    if (e != cudaSuccess) {
        cudaFreeHost(h);
        CK(e);
    }
    *gbps = timed_copy_gbps(d, h, bytes, cudaMemcpyHostToDevice, reps, 1.0);
    e = cudaGetLastError();
    cudaFree(d);
    cudaFreeHost(h);
    CK(e);
    return FM_OK;
}

extern "C" fm_status fm_cuda_d2d_bandwidth(uint64_t bytes, int32_t reps, double *gbps, char *err, size_t errlen) {
    CKS(fmc_device_ready(err, errlen));
    void *s = NULL, *d = NULL;
    CK(cudaMalloc(&s, bytes));
    cudaError_t e = cudaMalloc(&d, bytes);
    if (e != cudaSuccess) {
        cudaFree(s);
        CK(e);
    }
    cudaMemset(s, 0x3c, bytes);
    *gbps = timed_copy_gbps(d, s, bytes, cudaMemcpyDeviceToDevice, reps, 2.0);
    e = cudaGetLastError();
    cudaFree(s);
    cudaFree(d);
    CK(e);
    return FM_OK;
}
