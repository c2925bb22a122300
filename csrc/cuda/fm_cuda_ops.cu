/* fm_cuda_ops.cu: the CUDA backend's launches, sessions, layer ops and forward pass.
 *
 * Owns: the launch wrappers of the dense kernels (matrix x vectors, tensor-core prefill matmuls and
 * their split-K workspace, SwiGLU, norms, GatedDeltaNet (sequential, decode and chunked forms),
 * attention), per-session device state (KV cache, conv + recurrent state, scratch: new / free /
 * reset / counters), the layer ops of fm_backend.h but the MoE one (embed, full and linear
 * attention, dense FFN, final norm + lm_head), the numerical guard, the layer loop over
 * fm_model.layers through the ops table (cuda_ops), the resident decode step as a CUDA graph and
 * fm_cuda_session_eval. Host syncs per decode step and the kernel switches: fm_cuda_moe.cu and
 * docs/INTERNALS.md section 5.
 * Does not own: the device model and dense weights (fm_cuda_weights.cu), the MoE op and the expert
 * tiers (fm_cuda_moe.cu, fm_cuda_experts.cu), kernels (fm_cuda_*.cuh).
 */
#include <pthread.h>
#include <stdlib.h>

#include "fmc_internal.cuh"
#include "fm_cuda_gdn_chunk.cuh"

/* ================================================================== launches */

static dim3 row_grid(int64_t rows, int sms) {
    int64_t b = (rows + FMC_WARPS - 1) / FMC_WARPS;
    int64_t cap = (int64_t)sms * 16;
    if (b > cap) b = cap;
    if (b < 1) b = 1;
    return dim3((unsigned)b);
}

dim3 fmc_mv_grid(int64_t rows, int rows_per_warp, int sms) {
    int64_t per_block = (int64_t)FMC_WARPS * rows_per_warp;
    int64_t b = (rows + per_block - 1) / per_block;
    int64_t cap = (int64_t)sms * 16;
    if (b > cap) b = cap;
    if (b < 1) b = 1;
    return dim3((unsigned)b);
}

/* decode: y_j = W_j x for up to FMC_MULTI matrices of one kind sharing x, in one launch */
static fm_status launch_mv_multi(cudaStream_t st, int sms, int nm, const DMat *const *Ws, float *const *ys,
                                 const int *accs, const float *x, char *err, size_t errlen) {
    MVSet set;
    memset(&set, 0, sizeof set);
    int64_t maxr = 0;
    int k = 0;
    for (int j = 0; j < nm; j++) {
        if (Ws[j]->rows <= 0) continue;
        set.W[k] = *Ws[j];
        set.y[k] = ys[j];
        set.acc[k] = accs ? accs[j] : 0;
        if (Ws[j]->rows > maxr) maxr = Ws[j]->rows;
        k++;
    }
    if (!k) return FM_OK;
    if (maxr < (int64_t)sms * 2 * FMC_WARPS) {
        /* few rows (routers, 1-row gates, small heads): a warp per FMC_MV_R rows would leave most SMs
         * idle, so each block takes FMC_MV_R rows and its warps split the columns */
        int64_t b = (maxr + FMC_MV_R - 1) / FMC_MV_R;
        dim3 g((unsigned)(b < 1 ? 1 : b), (unsigned)k);
#define LS(K) k_mv_sk<K><<<g, FMC_WARPS * 32, 0, st>>>(set, x)
        KIND_SWITCH(set.W[0].kind, LS)
#undef LS
        CKL();
        return FM_OK;
    }
    dim3 g = fmc_mv_grid(maxr, FMC_MV_R, sms);
    g.y = (unsigned)k;
#define LM(K) k_mv<K><<<g, FMC_WARPS * 32, 0, st>>>(set, x)
    KIND_SWITCH(set.W[0].kind, LM)
#undef LM
    CKL();
    return FM_OK;
}

/* ---- tensor-core prefill matmuls (fm_cuda_mma.cuh) ----
 * Used for n >= 2 tokens when the weights are bf16 or affine with cols % 32 == 0 (f32 weights and
 * odd bf16 widths keep k_mm). FM_CUDA_MMA=0 (read per launch, prefill only) falls back to the
 * fp32 kernels, for A/B benchmarks. */
int fmc_mma_enabled(void) {
    const char *e = getenv("FM_CUDA_MMA");
    return !(e && e[0] == '0');
}

int fmc_mma_mat_ok(int kind, int64_t cols, int gs) {
    if (kind < 1 || kind > 8 || kind == 7 || cols <= 0 || cols % 32) return 0;
    return kind == 1 || (gs > 0 && gs % 32 == 0 && cols % gs == 0);
}

static int mma_x_ok(const float *X, int64_t ldx) { return ((uintptr_t)X & 15) == 0 && ldx % 4 == 0; }

/* split-K workspace: one per stream (a stream runs one kernel at a time, the reduction follows
 * the partials on the same stream), allocated on first use, released by fmc_mma_ws_release */
#define FMC_MMA_WS_FLOATS ((int64_t)4 << 20)
#define FMC_MMA_WS_SLOTS 16
static pthread_mutex_t g_mma_ws_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    cudaStream_t st;
    float *p;
} g_mma_ws[FMC_MMA_WS_SLOTS];

static float *mma_ws(cudaStream_t st) {
    float *r = NULL;
    pthread_mutex_lock(&g_mma_ws_mu);
    int fr = -1;
    for (int i = 0; i < FMC_MMA_WS_SLOTS && !r; i++) {
        if (g_mma_ws[i].p && g_mma_ws[i].st == st) r = g_mma_ws[i].p;
        else if (!g_mma_ws[i].p && fr < 0) fr = i;
    }
    if (!r && fr >= 0) {
        if (cudaMalloc((void **)&r, (size_t)FMC_MMA_WS_FLOATS * sizeof(float)) == cudaSuccess) {
            g_mma_ws[fr].st = st;
            g_mma_ws[fr].p = r;
        } else {
            cudaGetLastError();
            r = NULL;
        }
    }
    pthread_mutex_unlock(&g_mma_ws_mu);
    return r;
}

void fmc_mma_ws_release(cudaStream_t st) {
    pthread_mutex_lock(&g_mma_ws_mu);
    for (int i = 0; i < FMC_MMA_WS_SLOTS; i++)
        if (g_mma_ws[i].p && g_mma_ws[i].st == st) {
            cudaFree(g_mma_ws[i].p);
            g_mma_ws[i].p = NULL;
        }
    pthread_mutex_unlock(&g_mma_ws_mu);
}

/* 8-token n-tiles per block for up to n tokens per block */
int fmc_mma_nt(int64_t n) { return n <= 8 ? 1 : n <= 16 ? 2 : n <= 32 ? 4 : 8; }

template <int SWI>
static fm_status mma_launch(cudaStream_t st, const MmaArgs &a, int kind, int nt, dim3 g, char *err, size_t errlen) {
#define MMA_NT(K)                                                                                             \
    switch (nt) {                                                                                             \
    case 1: k_mma<K, 1, SWI><<<g, FMC_MMA_THREADS, 0, st>>>(a); break;                                         \
    case 2: k_mma<K, 2, SWI><<<g, FMC_MMA_THREADS, 0, st>>>(a); break;                                         \
    case 4: k_mma<K, 4, SWI><<<g, FMC_MMA_THREADS, 0, st>>>(a); break;                                         \
    default: k_mma<K, 8, SWI><<<g, FMC_MMA_THREADS, 0, st>>>(a); break;                                        \
    }
    switch (kind) {
    case 1: MMA_NT(1) break;
    case 2: MMA_NT(2) break;
    case 3: MMA_NT(3) break;
    case 4: MMA_NT(4) break;
    case 5: MMA_NT(5) break;
    case 6: MMA_NT(6) break;
    case 8: MMA_NT(8) break;
    default: return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no tensor-core kernel for weight kind %d", kind);
    }
#undef MMA_NT
    CKL();
    return FM_OK;
}

fm_status fmc_mma_launch(int swi, cudaStream_t st, const MmaArgs &a, int kind, int nt, dim3 g, char *err,
                         size_t errlen) {
    return swi ? mma_launch<1>(st, a, kind, nt, g, err, errlen) : mma_launch<0>(st, a, kind, nt, g, err, errlen);
}

/* dense Y (+)= W X (U == NULL) or Y = silu(W X) * (U X), n >= 2 tokens. The tile grid is
 * (row tiles, token tiles); when it would leave SMs idle (small n or few rows) the columns are
 * split over gridDim.z and the partials summed in order by k_mma_reduce. */
static fm_status launch_mma_dense(cudaStream_t st, int sms, const DMat &W, const DMat *U, const float *X, int64_t ldx,
                                  int64_t n, float *Y, int64_t ldy, int acc, char *err, size_t errlen) {
    const int swi = U != NULL;
    const int nt = fmc_mma_nt(n);
    const int64_t tr = (W.rows + (swi ? FMC_MMA_ROWS / 2 : FMC_MMA_ROWS) - 1) / (swi ? FMC_MMA_ROWS / 2 : FMC_MMA_ROWS);
    const int64_t tt = (n + 8 * nt - 1) / (8 * nt);
    const int64_t nst = (W.cols / 32 + 1) / 2; /* 64-column stages */
    const int64_t tiles = tr * tt, want = (int64_t)sms * 3;
    int64_t splits = 1;
    float *ws = NULL;
    if (tiles < want && nst >= 4 && tt <= 65535) {
        splits = (want + tiles - 1) / tiles;
        if (splits > nst / 2) splits = nst / 2; /* at least 2 stages per split */
        if (splits > 16) splits = 16;
        const int64_t per_split = n * W.rows * (swi ? 2 : 1);
        if (splits * per_split > FMC_MMA_WS_FLOATS) splits = FMC_MMA_WS_FLOATS / per_split;
        if (splits >= 2) ws = mma_ws(st);
        if (!ws) splits = 1;
        else { /* no empty split */
            const int64_t per = (nst + splits - 1) / splits;
            splits = (nst + per - 1) / per;
        }
    }
    if (tt > 65535) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: %lld tokens in one matmul", (long long)n);
    MmaArgs a;
    memset(&a, 0, sizeof a);
    a.A = W;
    a.B = swi ? *U : W;
    a.X = X;
    a.ldx = ldx;
    a.Y = Y;
    a.ldy = ldy;
    a.n = n;
    a.accumulate = acc;
    a.ws = splits > 1 ? ws : NULL;
    dim3 g((unsigned)tr, (unsigned)tt, (unsigned)splits);
    CKS(swi ? mma_launch<1>(st, a, W.kind, nt, g, err, errlen) : mma_launch<0>(st, a, W.kind, nt, g, err, errlen));
    if (splits > 1) {
        int64_t nb = (n * W.rows + 255) / 256;
        if (nb > (int64_t)sms * 8) nb = (int64_t)sms * 8;
        k_mma_reduce<<<(unsigned)nb, 256, 0, st>>>(ws, (int)splits, n, W.rows, swi, Y, ldy, acc);
        CKL();
    }
    return FM_OK;
}

fm_status fmc_launch_mm(cudaStream_t st, int sms, const DMat &W, const float *X, int64_t ldx, int64_t n, float *Y,
                           int64_t ldy, int acc, char *err, size_t errlen) {
    if (n <= 0 || W.rows <= 0) return FM_OK;
    if (n == 1) {
        const DMat *Ws[1] = {&W};
        float *ys[1] = {Y};
        int accs[1] = {acc};
        return launch_mv_multi(st, sms, 1, Ws, ys, accs, X, err, errlen);
    }
    if (fmc_mma_mat_ok(W.kind, W.cols, W.gs) && mma_x_ok(X, ldx) && fmc_mma_enabled())
        return launch_mma_dense(st, sms, W, NULL, X, ldx, n, Y, ldy, acc, err, errlen);
    dim3 g = row_grid(W.rows, sms);
#define L1(K) k_mm<K, 1><<<g, FMC_WARPS * 32, 0, st>>>(W, X, ldx, n, Y, ldy, acc)
#define L8(K) k_mm<K, 8><<<g, FMC_WARPS * 32, 0, st>>>(W, X, ldx, n, Y, ldy, acc)
    if (n == 1) {
        KIND_SWITCH(W.kind, L1)
    } else {
        KIND_SWITCH(W.kind, L8)
    }
#undef L1
#undef L8
    CKL();
    return FM_OK;
}

fm_status fmc_launch_swiglu(cudaStream_t st, int sms, const DMat &G, const DMat &U, const float *X, int64_t ldx,
                               int64_t n, float *Hout, char *err, size_t errlen) {
    if (n <= 0 || G.rows <= 0) return FM_OK;
    if (G.kind != U.kind || G.rows != U.rows || G.cols != U.cols)
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: gate and up projections differ in dtype or shape");
    if (n == 1) {
        dim3 g1 = fmc_mv_grid(G.rows, 2, sms);
#define LS(K) k_mv_swiglu<K><<<g1, FMC_WARPS * 32, 0, st>>>(G, U, X, Hout)
        KIND_SWITCH(G.kind, LS)
#undef LS
        CKL();
        return FM_OK;
    }
    if (fmc_mma_mat_ok(G.kind, G.cols, G.gs) && G.gs == U.gs && mma_x_ok(X, ldx) && fmc_mma_enabled())
        return launch_mma_dense(st, sms, G, &U, X, ldx, n, Hout, G.rows, 0, err, errlen);
    dim3 g = row_grid(G.rows, sms);
#define L1(K) k_mm_swiglu<K, 1><<<g, FMC_WARPS * 32, 0, st>>>(G, U, X, ldx, n, Hout)
#define L8(K) k_mm_swiglu<K, 8><<<g, FMC_WARPS * 32, 0, st>>>(G, U, X, ldx, n, Hout)
    if (n == 1) {
        KIND_SWITCH(G.kind, L1)
    } else {
        KIND_SWITCH(G.kind, L8)
    }
#undef L1
#undef L8
    CKL();
    return FM_OK;
}

fm_status fmc_launch_norm(cudaStream_t st, int op, const float *X, const float *Z, const float *w, int64_t n,
                             int64_t d, float eps, float off, float *Y, char *err, size_t errlen) {
    if (n <= 0) return FM_OK;
    int bs = d >= 1024 ? 1024 : (int)((d + 31) / 32 * 32);
    k_norm<<<(unsigned)n, bs, 0, st>>>(op, X, Z, w, d, eps, off, Y);
    CKL();
    return FM_OK;
}

fm_status fmc_launch_gdn(cudaStream_t st, const float *QKV, const float *Z, const float *A, const float *B,
                            const float *A_log, const float *dt_bias, const float *normw, float *S, float *O, int64_t n,
                            int nk, int nv, int dk, int dv, float eps, char *err, size_t errlen) {
    if (dv > 256 || dk > 128)
        return fm_errf(err, errlen, FM_ERR_BACKEND,
                       "CUDA: GatedDeltaNet with key dim %d / value dim %d is not supported (max 128 / 256)", dk, dv);
    if (nk <= 0 || nv % nk)
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: GatedDeltaNet needs n_v_heads %% n_k_heads == 0");
    /* Chunked form (fm_cuda_gdn_chunk.cuh) from FM_CUDA_GDN_CHUNK tokens on (default and minimum 2;
     * 0: never). Its cost per chunk of up to 64 tokens is a few dependent phases, where the
     * sequential kernel pays 3 block reductions per token; the default 2 is a guess, not yet timed
     * (set a larger minimum to move the switch). Decode (n == 1) stays on the sequential kernel,
     * which is also the fallback. */
    const char *cv = getenv("FM_CUDA_GDN_CHUNK");
    const long cmin = cv && *cv ? strtol(cv, NULL, 10) : 2;
    if (cmin > 0 && n >= (cmin > 2 ? cmin : 2)) {
        const size_t smem = gdn_chunk_smem(dk);
        const dim3 grid((unsigned)nv, (unsigned)((dv + 31) / 32));
#define GDN_CHUNK(K)                                                                                          \
    do {                                                                                                      \
        CK(cudaFuncSetAttribute(k_gdn_chunk<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));     \
        k_gdn_chunk<K><<<grid, FMC_GDN_THREADS, smem, st>>>(QKV, A, B, A_log, dt_bias, S, O, n, nk, nv, dk, dv); \
    } while (0)
        if (dk <= 32)
            GDN_CHUNK(32);
        else if (dk <= 64)
            GDN_CHUNK(64);
        else
            GDN_CHUNK(128);
#undef GDN_CHUNK
        CKL();
        /* gated RMSNorm of each (token, head) row of dv outputs, in place (as k_gdn's) */
        return fmc_launch_norm(st, 1, O, Z, normw, n * nv, dv, eps, 0.f, O, err, errlen);
    }
    const char *dvv = getenv("FM_CUDA_GDN_DEC"); /* 0: decode on the one-block-per-head k_gdn */
    if (n == 1 && !(dvv && dvv[0] == '0')) {
        /* decode: value columns over blocks, key dim over 4 slices (k_gdn_dec), then the norm */
        const dim3 grid((unsigned)nv, (unsigned)((dv + 31) / 32));
        if (dk <= 32)
            k_gdn_dec<8><<<grid, 128, 0, st>>>(QKV, A, B, A_log, dt_bias, S, O, nk, nv, dk, dv);
        else
            k_gdn_dec<32><<<grid, 128, 0, st>>>(QKV, A, B, A_log, dt_bias, S, O, nk, nv, dk, dv);
        CKL();
        return fmc_launch_norm(st, 1, O, Z, normw, nv, dv, eps, 0.f, O, err, errlen);
    }
    int bs = (dv + 31) / 32 * 32;
    if (dk <= 32)
        k_gdn<32><<<nv, bs, 0, st>>>(QKV, Z, A, B, A_log, dt_bias, normw, S, O, n, nk, nv, dk, dv, eps);
    else
        k_gdn<128><<<nv, bs, 0, st>>>(QKV, Z, A, B, A_log, dt_bias, normw, S, O, n, nk, nv, dk, dv, eps);
    CKL();
    return FM_OK;
}

fm_status fmc_launch_attn(cudaStream_t st, const float *QG, const float *Kn, const float *Vn, const float *qnw,
                             const float *knw, float *Q, float *Gt, float *KC, float *VC, float *O, int64_t n, int pos,
                             const int *dpos, int nh, int nkv, int dh, int rot, float theta, int gate, float eps,
                             float off, char *err, size_t errlen) {
    if (dh > 256 || nkv <= 0 || nh % nkv)
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: attention with head_dim %d (max 256), %d/%d heads", dh, nh,
                       nkv);
    k_attn_prep<<<dim3((unsigned)n, (unsigned)(nh + nkv)), 128, (size_t)dh * sizeof(float), st>>>(
        QG, Kn, Vn, qnw, knw, Q, Gt, KC, VC, pos, dpos, nh, nkv, dh, rot, theta, gate, eps, off);
    CKL();
    k_attn<<<dim3((unsigned)n, (unsigned)nh), FMC_ATT_WARPS * 32, 0, st>>>(Q, KC, VC, Gt, O, pos, dpos, nh, nkv, dh,
                                                                           1.0f / sqrtf((float)dh), gate);
    CKL();
    return FM_OK;
}

/* ================================================================== session */

void fm_cuda_session_free(void *p) {
    fmc_session *c = (fmc_session *)p;
    if (!c) return;
    cudaSetDevice(0);
    const fm_model *m = c->cm->m;
    if (c->cm->cs) cudaStreamSynchronize(c->cm->cs);
    float **arrs[4] = {c->kc, c->vc, c->conv, c->ssm};
    int32_t cnts[4] = {m->n_full, m->n_full, m->n_linear, m->n_linear};
    for (int a = 0; a < 4; a++) {
        if (!arrs[a]) continue;
        for (int32_t i = 0; i < cnts[a]; i++) cudaFree(arrs[a][i]);
        free(arrs[a]);
    }
    float *bufs[] = {c->x,  c->xn,  c->qg,  c->q,  c->gate, c->k,   c->v,   c->att, c->qkv, c->qkvc, c->z, c->ba,
                     c->bb, c->o,   c->lr,  c->topw, c->shg, c->sho, c->shs, c->hb,  c->ye,  c->dg,   c->logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) cudaFree(bufs[i]);
    cudaFree(c->topi);
    cudaFree(c->tok);
    cudaFree(c->d_pos);
    cudaFree(c->d_bad);
    if (c->h_io) cudaFreeHost(c->h_io);
    if (c->h_bad) cudaFreeHost(c->h_bad);
    if (c->gexec) cudaGraphExecDestroy(c->gexec);
    free(c);
}

fm_status fm_cuda_session_new(fm_session *s, void **out, char *err, size_t errlen) {
    *out = NULL;
    fm_model *m = s->m;
    fmc_model *cm = (fmc_model *)m->cuda;
    CK(cudaSetDevice(0));
    fmc_session *c = (fmc_session *)calloc(1, sizeof *c);
    if (!c) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    c->cm = cm;
    c->n_ctx = s->n_ctx;
    c->nb = s->n_ctx < FMC_UBATCH ? s->n_ctx : FMC_UBATCH;
    const int64_t nb = c->nb, H = m->H;
    const int64_t qd = (int64_t)m->n_heads * m->head_dim, kvd = (int64_t)m->n_kv_heads * m->head_dim;
    const int64_t cd = fmc_conv_dim(m), vd = (int64_t)m->lin_nv * m->lin_dv;
    const int64_t K = m->k_tok, E = m->n_experts;
    const int64_t I = m->moe_I, shI = m->sh_I;
    int ok = 1;
    size_t total = 0;
#define DA(p, n)                                                                                              \
    do {                                                                                                      \
        size_t b_ = sizeof(float) * (size_t)((n) > 0 ? (n) : 1);                                              \
        total += b_;                                                                                          \
        if (ok && cudaMalloc((void **)&(p), b_) != cudaSuccess) ok = 0;                                       \
    } while (0)
    c->kc = (float **)calloc((size_t)m->n_full + 1, sizeof(float *));
    c->vc = (float **)calloc((size_t)m->n_full + 1, sizeof(float *));
    c->conv = (float **)calloc((size_t)m->n_linear + 1, sizeof(float *));
    c->ssm = (float **)calloc((size_t)m->n_linear + 1, sizeof(float *));
    if (!c->kc || !c->vc || !c->conv || !c->ssm) ok = 0;
    for (int32_t i = 0; ok && i < m->n_full; i++) {
        DA(c->kc[i], (int64_t)s->n_ctx * kvd);
        DA(c->vc[i], (int64_t)s->n_ctx * kvd);
    }
    for (int32_t i = 0; ok && i < m->n_linear; i++) {
        DA(c->conv[i], (int64_t)(m->conv_k > 1 ? m->conv_k - 1 : 1) * cd);
        DA(c->ssm[i], (int64_t)m->lin_nv * m->lin_dk * m->lin_dv);
    }
    DA(c->x, nb * H);
    DA(c->xn, nb * H);
    DA(c->qg, nb * qd * 2);
    DA(c->q, nb * qd);
    DA(c->gate, nb * qd);
    DA(c->k, nb * kvd);
    DA(c->v, nb * kvd);
    DA(c->att, nb * qd);
    DA(c->qkv, nb * cd);
    DA(c->qkvc, nb * cd);
    DA(c->z, nb * vd);
    DA(c->ba, nb * m->lin_nv);
    DA(c->bb, nb * m->lin_nv);
    DA(c->o, nb * vd);
    DA(c->lr, nb * E);
    DA(c->topw, nb * K);
    DA(c->shg, nb * (shI > m->dense_I ? shI : m->dense_I));
    DA(c->sho, nb * H);
    DA(c->shs, nb);
    DA(c->hb, nb * K * I);
    DA(c->ye, nb * K * H);
    DA(c->dg, nb * m->dense_I);
    DA(c->logits, (int64_t)FMC_LOGIT_ROWS * m->vocab);
    if (ok && cudaMalloc((void **)&c->topi, sizeof(int32_t) * (size_t)(nb * K > 0 ? nb * K : 1)) != cudaSuccess) ok = 0;
    if (ok && cudaMalloc((void **)&c->tok, sizeof(int32_t) * (size_t)nb) != cudaSuccess) ok = 0;
    if (ok && cudaMalloc((void **)&c->d_pos, sizeof(int32_t)) != cudaSuccess) ok = 0;
    if (ok && cudaHostAlloc((void **)&c->h_io, 2 * sizeof(int32_t), cudaHostAllocDefault) != cudaSuccess) ok = 0;
    if (ok && cudaMalloc((void **)&c->d_bad, sizeof(unsigned long long)) != cudaSuccess) ok = 0;
    if (ok && cudaHostAlloc((void **)&c->h_bad, sizeof(unsigned long long), cudaHostAllocDefault) != cudaSuccess) ok = 0;
#undef DA
    if (!ok) {
        fm_cuda_session_free(c);
        cudaGetLastError();
        return fm_errf(err, errlen, FM_ERR_OOM,
                       "CUDA: out of VRAM for a session of %d tokens (KV cache + state + scratch, about %.1f MiB)",
                       s->n_ctx, (double)total / 1048576.0);
    }
    fm_cuda_session_reset(c);
    c->cnt.resident = cm->resident;
    c->cnt.vram_slots = cm->vl.n;
    c->cnt.ram_slots = cm->ram_slots;
    *out = c;
    return FM_OK;
}

void fm_cuda_session_reset(void *p) {
    fmc_session *c = (fmc_session *)p;
    if (!c) return;
    const fm_model *m = c->cm->m;
    cudaSetDevice(0);
    cudaStreamSynchronize(c->cm->cs);
    for (int32_t i = 0; i < m->n_linear; i++) {
        cudaMemset(c->conv[i], 0, sizeof(float) * (size_t)(m->conv_k > 1 ? m->conv_k - 1 : 1) * (size_t)fmc_conv_dim(m));
        cudaMemset(c->ssm[i], 0, sizeof(float) * (size_t)m->lin_nv * m->lin_dk * m->lin_dv);
    }
    /* the KV rows too: nothing of the old timeline survives a reset (after FM_ERR_NUMERIC above all) */
    const size_t kvb = sizeof(float) * (size_t)c->n_ctx * (size_t)m->n_kv_heads * (size_t)m->head_dim;
    for (int32_t i = 0; i < m->n_full; i++) {
        cudaMemset(c->kc[i], 0, kvb);
        cudaMemset(c->vc[i], 0, kvb);
    }
    cudaDeviceSynchronize();
}

void fm_cuda_session_counters(const fm_session *s, fm_cuda_counters *out) {
    memset(out, 0, sizeof *out);
    if (s && s->cuda) {
        const fmc_session *c = (const fmc_session *)s->cuda;
        *out = c->cnt;
        out->split = c->cm->split;
        out->h2d_gbps = c->cm->rate_h2d * 1e-6;
        out->cpu_gbps = c->cm->rate_cpu * 1e-6;
    }
}

/* ================================================================== the layer ops */

static fm_status check_finite(fmc_ctx *x, const float *v, int64_t n, int64_t row, int32_t sub, int64_t t_off,
                              char *err, size_t errlen) {
    const int64_t tot = n * row;
    int64_t blocks = (tot + 255) / 256, cap = (int64_t)x->cm->sms * 2;
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    k_check_finite<<<(unsigned)blocks, 256, 0, x->cm->cs>>>(v, n, row, fmc_guard_code(x, sub), t_off, x->c->d_bad);
    CKL();
    return FM_OK;
}

/* FM_ERR_NUMERIC when the guard saw a non-finite value in this eval (h_bad copied and synced);
 * pos0: the session position at the start of the eval */
static fm_status numeric_status(const fm_model *m, const fmc_session *c, int32_t pos0, char *err, size_t errlen) {
    const unsigned long long b = *c->h_bad;
    if (b == ~0ull) return FM_OK;
    const int64_t chunk = (int64_t)(b >> 33), t = (int64_t)(b & 0xffffu);
    const int32_t sub = (int32_t)((b >> 16) & 0x1ffffu) - 1;
    return fm_numeric_error(m, sub, (int64_t)pos0 + chunk * c->nb + t, err, errlen);
}

static fm_status op_embed(void *vx, const int32_t *tokens, int64_t n, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)vx;
    if (!x->graph)
        CK(cudaMemcpyAsync(x->c->tok, tokens, sizeof(int32_t) * (size_t)n, cudaMemcpyHostToDevice, x->cm->cs));
    k_embed<<<(unsigned)n, 256, 0, x->cm->cs>>>(x->cm->tok_embd, x->c->tok, x->c->x);
    CKL();
    return FM_OK;
}

static fm_status op_attn_full(void *vx, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)vx;
    fm_model *m = x->m;
    fmc_session *c = x->c;
    const cl_layer *L = &x->cm->L[il];
    cudaStream_t st = x->cm->cs;
    const int sms = x->cm->sms;
    const int64_t n = x->n, H = m->H;
    const int64_t qd = (int64_t)m->n_heads * m->head_dim, kvd = (int64_t)m->n_kv_heads * m->head_dim;
    const int32_t si = m->layers[il].state_idx;
    CKS(fmc_launch_norm(st, 0, c->x, NULL, L->attn_norm, n, H, m->eps, m->norm_offset, c->xn, err, errlen));
    if (n == 1 && L->wq.kind == L->wk.kind && L->wq.kind == L->wv.kind) {
        const DMat *Ws[3] = {&L->wq, &L->wk, &L->wv};
        float *ys[3] = {c->qg, c->k, c->v};
        CKS(launch_mv_multi(st, sms, 3, Ws, ys, NULL, c->xn, err, errlen));
    } else {
        CKS(fmc_launch_mm(st, sms, L->wq, c->xn, H, n, c->qg, L->wq.rows, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, L->wk, c->xn, H, n, c->k, kvd, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, L->wv, c->xn, H, n, c->v, kvd, 0, err, errlen));
    }
    CKS(fmc_launch_attn(st, c->qg, c->k, c->v, L->q_norm, L->k_norm, c->q, c->gate, c->kc[si], c->vc[si], c->att, n, x->pos,
                    x->graph ? c->d_pos : NULL, m->n_heads, m->n_kv_heads, m->head_dim, m->rotary_dim, m->rope_theta, m->attn_gate, m->eps,
                    m->norm_offset, err, errlen));
    CKS(fmc_launch_mm(st, sms, L->wo, c->att, qd, n, c->x, H, 1, err, errlen));
    return FM_OK;
}

static fm_status op_attn_linear(void *vx, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)vx;
    fm_model *m = x->m;
    fmc_session *c = x->c;
    const cl_layer *L = &x->cm->L[il];
    cudaStream_t st = x->cm->cs;
    const int sms = x->cm->sms;
    const int64_t n = x->n, H = m->H, cd = fmc_conv_dim(m), vd = (int64_t)m->lin_nv * m->lin_dv;
    const int32_t si = m->layers[il].state_idx;
    CKS(fmc_launch_norm(st, 0, c->x, NULL, L->attn_norm, n, H, m->eps, m->norm_offset, c->xn, err, errlen));
    if (n == 1 && L->ssm_qkv.kind == L->ssm_z.kind && L->ssm_qkv.kind == L->ssm_b.kind &&
        L->ssm_qkv.kind == L->ssm_a.kind) {
        const DMat *Ws[4] = {&L->ssm_qkv, &L->ssm_z, &L->ssm_b, &L->ssm_a};
        float *ys[4] = {c->qkv, c->z, c->bb, c->ba};
        CKS(launch_mv_multi(st, sms, 4, Ws, ys, NULL, c->xn, err, errlen));
    } else {
        CKS(fmc_launch_mm(st, sms, L->ssm_qkv, c->xn, H, n, c->qkv, cd, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, L->ssm_z, c->xn, H, n, c->z, vd, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, L->ssm_b, c->xn, H, n, c->bb, m->lin_nv, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, L->ssm_a, c->xn, H, n, c->ba, m->lin_nv, 0, err, errlen));
    }
    k_conv<<<(unsigned)((cd + 127) / 128), 128, 0, st>>>(c->qkv, n, c->conv[si], L->ssm_conv, (int)cd, m->conv_k,
                                                         c->qkvc);
    CKL();
    CKS(fmc_launch_gdn(st, c->qkvc, c->z, c->ba, c->bb, L->A_log, L->dt_bias, L->ssm_norm, c->ssm[si], c->o, n, m->lin_nk,
                   m->lin_nv, m->lin_dk, m->lin_dv, m->eps, err, errlen));
    CKS(fmc_launch_mm(st, sms, L->ssm_out, c->o, vd, n, c->x, H, 1, err, errlen));
    return FM_OK;
}

static fm_status op_ffn_dense(void *vx, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)vx;
    fm_model *m = x->m;
    fmc_session *c = x->c;
    const cl_layer *L = &x->cm->L[il];
    cudaStream_t st = x->cm->cs;
    const int64_t n = x->n, H = m->H;
    CKS(fmc_launch_norm(st, 0, c->x, NULL, L->ffn_norm, n, H, m->eps, m->norm_offset, c->xn, err, errlen));
    CKS(fmc_launch_swiglu(st, x->cm->sms, L->ffn_gate, L->ffn_up, c->xn, H, n, c->dg, err, errlen));
    CKS(fmc_launch_mm(st, x->cm->sms, L->ffn_down, c->dg, m->dense_I, n, c->x, H, 1, err, errlen));
    return FM_OK;
}

static fm_status op_final(void *vx, float *logits, int32_t all_logits, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)vx;
    fm_model *m = x->m;
    fmc_session *c = x->c;
    fmc_model *cm = x->cm;
    cudaStream_t st = cm->cs;
    const int64_t n = x->n, H = m->H, V = m->vocab;
    const DMat &lm = m->tie ? cm->tok_embd : cm->output;
    if (!logits) return FM_OK;
    int64_t r0 = all_logits ? 0 : n - 1;
    const int timed = !x->graph && !all_logits;
    if (timed) CK(cudaEventRecord(cm->ev_h0, st));
    for (; r0 < n; r0 += FMC_LOGIT_ROWS) {
        int64_t nr = n - r0 < FMC_LOGIT_ROWS ? n - r0 : FMC_LOGIT_ROWS;
        CKS(fmc_launch_norm(st, 0, c->x + r0 * H, NULL, cm->output_norm, nr, H, m->eps, m->norm_offset, c->xn, err, errlen));
        CKS(fmc_launch_mm(st, cm->sms, lm, c->xn, H, nr, c->logits, V, 0, err, errlen));
        CKS(check_finite(x, c->logits, nr, V, (int32_t)m->n_layers, r0, err, errlen));
        if (x->graph) return FM_OK; /* the caller copies the logits after the replay */
        if (timed) CK(cudaEventRecord(cm->ev_h1, st));
        float *dst = all_logits ? logits + r0 * V : logits;
        CK(cudaMemcpyAsync(dst, c->logits, sizeof(float) * (size_t)(nr * V), cudaMemcpyDeviceToHost, st));
    }
    CK(cudaMemcpyAsync(c->h_bad, c->d_bad, sizeof *c->h_bad, cudaMemcpyDeviceToHost, st));
    CK(cudaStreamSynchronize(st));
    c->cnt.syncs++;
    if (timed) {
        float ms = 0.f;
        if (cudaEventElapsedTime(&ms, cm->ev_h0, cm->ev_h1) == cudaSuccess) {
            c->cnt.head_ms += ms;
            c->cnt.head_evals++;
        }
        cudaGetLastError();
    }
    return FM_OK;
}

static const fm_backend_ops cuda_ops = {"cuda", op_embed, op_attn_full, op_attn_linear, fmc_op_moe, op_ffn_dense, op_final};

/* FM_CUDA_TIMING: wait for the op and charge its wall time to *acc (distorts overlap; for breakdowns) */
static fm_status op_timed(fmc_ctx *x, double t0, double *acc, char *err, size_t errlen) {
    if (!x->cm->timing) return FM_OK;
    CK(cudaStreamSynchronize(x->cm->cs));
    *acc += fm_now_ms() - t0;
    return FM_OK;
}

/* the layer loop (the same walk over fm_model.layers as fm_forward.c), through the ops table */
static fm_status cuda_forward(const fm_backend_ops *ops, void *ctx, const fm_model *m, const int32_t *tokens, int64_t n,
                              float *logits, int32_t all_logits, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)ctx;
    fm_stats *st = &x->s->st;
    double t = fm_now_ms();
    CKS(ops->embed(ctx, tokens, n, err, errlen));
    CKS(check_finite(x, x->c->x, n, m->H, -1, 0, err, errlen));
    CKS(op_timed(x, t, &st->ms_other, err, errlen));
    for (int32_t il = 0; il < m->n_layers; il++) {
        const fm_layer *L = &m->layers[il];
        t = fm_now_ms();
        CKS(L->attn == FM_ATTN_FULL ? ops->attn_full(ctx, il, err, errlen) : ops->attn_linear(ctx, il, err, errlen));
        CKS(op_timed(x, t, &st->ms_attn, err, errlen));
        t = fm_now_ms();
        CKS(L->ffn == FM_FFN_MOE ? ops->moe(ctx, il, err, errlen) : ops->ffn_dense(ctx, il, err, errlen));
        if (L->ffn != FM_FFN_MOE) /* the residual stream after the layer (fmc_op_moe's combine checks its own) */
            CKS(check_finite(x, x->c->x, n, m->H, il, 0, err, errlen));
        CKS(op_timed(x, t, &st->ms_expert, err, errlen));
    }
    t = fm_now_ms();
    CKS(ops->final(ctx, logits, all_logits, err, errlen));
    return op_timed(x, t, &st->ms_other, err, errlen);
}

/* one resident decode step as a CUDA graph (captured on first use): no launch gaps, one sync */
static fm_status graph_decode(fm_session *s, fmc_session *c, int32_t token, float *logits, char *err, size_t errlen) {
    fmc_model *cm = c->cm;
    fm_model *m = s->m;
    cudaStream_t st = cm->cs;
    if (!c->gexec) {
        fmc_ctx x = {s, c, cm, m, 1, s->pos, 1};
        fm_cuda_counters saved = c->cnt;
        int64_t saved_hits = s->st.expert_hits_vram;
        cudaGraph_t g = NULL;
        CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        fm_status rs = cuda_forward(&cuda_ops, &x, m, NULL, 1, logits, 0, err, errlen);
        cudaError_t ce = cudaStreamEndCapture(st, &g);
        c->cnt = saved;
        s->st.expert_hits_vram = saved_hits;
        if (rs == FM_OK && ce == cudaSuccess) ce = cudaGraphInstantiate(&c->gexec, g, 0);
        if (g) cudaGraphDestroy(g);
        if (rs != FM_OK || ce != cudaSuccess) {
            cudaGetLastError();
            c->gexec = NULL;
            c->graph_failed = 1;
            return FM_ERR_BACKEND; /* the caller falls back to plain launches */
        }
    }
    c->h_io[0] = token;
    c->h_io[1] = s->pos;
    CK(cudaMemcpyAsync(c->tok, &c->h_io[0], sizeof(int32_t), cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(c->d_pos, &c->h_io[1], sizeof(int32_t), cudaMemcpyHostToDevice, st));
    CK(cudaGraphLaunch(c->gexec, st));
    CK(cudaMemcpyAsync(logits, c->logits, sizeof(float) * (size_t)m->vocab, cudaMemcpyDeviceToHost, st));
    CK(cudaMemcpyAsync(c->h_bad, c->d_bad, sizeof *c->h_bad, cudaMemcpyDeviceToHost, st));
    CK(cudaStreamSynchronize(st));
    c->cnt.syncs++;
    c->cnt.vram_hits += (int64_t)m->k_tok * m->n_moe;
    s->st.expert_hits_vram += (int64_t)m->k_tok * m->n_moe;
    s->pos += 1;
    return FM_OK;
}

fm_status fm_cuda_session_eval(fm_session *s, const int32_t *tokens, int32_t n_tokens, float *logits,
                               int32_t all_logits, char *err, size_t errlen) {
    fmc_session *c = (fmc_session *)s->cuda;
    if (!c) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: session has no device state");
    CK(cudaSetDevice(0));
    fm_model *m = s->m;
    {
        const char *tv = getenv("FM_CUDA_TIMING"); /* read per eval: benchmarks toggle it */
        c->cm->timing = tv && tv[0] == '1';
        /* FM_CUDA_CPU_SPLIT=auto (default) | 0 (off) | fraction in (0, 1] of the missed experts that
         * sit in the pinned host cache, computed on the CPU (decode) */
        const char *sv = getenv("FM_CUDA_CPU_SPLIT");
        double sp = -1.0;
        if (sv && sv[0] && strcmp(sv, "auto") != 0) {
            char *end = NULL;
            sp = strtod(sv, &end);
            if (end == sv || *end || !(sp >= 0.0 && sp <= 1.0))
                return fm_errf(err, errlen, FM_ERR_ARG, "FM_CUDA_CPU_SPLIT=%s: expected auto, 0 or a fraction in [0, 1]",
                               sv);
        }
        c->cm->split = sp;
        const char *tv2 = getenv("FM_CUDA_SPLIT_THREAD");
        c->cm->split_async = tv2 && tv2[0] == '1';
    }
    const int32_t pos0 = s->pos;
    *c->h_bad = ~0ull;
    CK(cudaMemsetAsync(c->d_bad, 0xff, sizeof *c->d_bad, c->cm->cs)); /* the guard's "nothing seen" */
    {
        const char *gv = getenv("FM_CUDA_GRAPH"); /* 0: plain launches (comparison) */
        if (n_tokens == 1 && logits && !all_logits && c->cm->resident && !c->cm->timing && !c->graph_failed &&
            !(gv && gv[0] == '0')) {
            char gerr[256];
            gerr[0] = 0;
            fm_status gs = graph_decode(s, c, tokens[0], logits, gerr, sizeof gerr);
            if (gs == FM_OK) return numeric_status(m, c, pos0, err, errlen);
            if (!c->graph_failed) return fm_errf(err, errlen, gs, "%s", gerr);
            /* capture failed: plain launches below */
        }
    }
    for (int32_t done = 0; done < n_tokens; done += c->nb) {
        int64_t cnt = n_tokens - done < c->nb ? n_tokens - done : c->nb;
        float *lg = NULL;
        if (logits) {
            if (all_logits) lg = logits + (int64_t)done * m->vocab;
            else if (done + cnt == n_tokens) lg = logits;
        }
        fmc_ctx x = {s, c, c->cm, m, cnt, s->pos, 0, done / c->nb};
        fm_status st = cuda_forward(&cuda_ops, &x, m, tokens + done, cnt, lg, all_logits, err, errlen);
        if (st != FM_OK) {
            cudaStreamSynchronize(c->cm->cs);
            cudaGetLastError();
            return st;
        }
        s->pos += (int32_t)cnt;
    }
    if (!logits) {
        CK(cudaMemcpyAsync(c->h_bad, c->d_bad, sizeof *c->h_bad, cudaMemcpyDeviceToHost, c->cm->cs));
        CK(cudaStreamSynchronize(c->cm->cs));
        c->cnt.syncs++;
    }
    return numeric_status(m, c, pos0, err, errlen);
}

