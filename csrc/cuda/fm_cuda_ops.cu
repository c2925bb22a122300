/* fm_cuda_ops.cu: the CUDA backend's launches, sessions, layer ops, eval hooks and backend table.
 *
 * Owns: the launch wrappers of the dense kernels (matrix x vectors, tensor-core prefill matmuls and
 * their split-K workspace, SwiGLU, norms, GatedDeltaNet (sequential, decode and chunked forms),
 * attention), per-session device state (KV cache, conv + recurrent state, scratch: new / free /
 * reset / counters), the layer ops of fm_backend.h but the MoE one (embed, full and linear
 * attention, dense FFN, final norm + lm_head), the numerical guard op (a small kernel recording
 * into a flag word, no sync), the eval hooks (switches, the flag word, passes of FMC_UBATCH tokens),
 * the graph hooks (the resident decode step recorded as a CUDA graph while fm_forward.c's layer
 * loop runs with capture set, then replayed), the capability check and the table
 * (fm_cuda_backend). The layer loop itself is fm_forward.c's. Host syncs per decode step and the
 * kernel switches: fm_cuda_moe.cu and docs/INTERNALS.md section 5.
 * Does not own: the device model and dense weights (fm_cuda_weights.cu), the MoE op and the expert
 * tiers (fm_cuda_moe.cu, fm_cuda_experts.cu), kernels (fm_cuda_*.cuh).
 */
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
 * odd bf16 widths keep k_mm). mma == 0 (fm_debug_params.cuda_mma, prefill only) falls back to the
 * fp32 kernels, for A/B benchmarks. */
int fmc_mma_mat_ok(int kind, int64_t cols, int gs) {
    if (kind < 1 || kind > 8 || kind == 7 || cols <= 0 || cols % 32) return 0;
    return kind == 1 || (gs > 0 && gs % 32 == 0 && cols % gs == 0);
}

static int mma_x_ok(const float *X, int64_t ldx) { return ((uintptr_t)X & 15) == 0 && ldx % 4 == 0; }

/* split-K workspace: FMC_MMA_WS_FLOATS floats owned by the caller (*wsp: the model's cm->mma_ws, or
 * a test entry point's own), allocated on first use and kept there; the caller frees it (cudaFree).
 * One workspace serves one stream at a time: the reduction follows the partials on that stream, and a
 * model's evals all run on its compute stream cm->cs, serialised by the model mutex. If the
 * allocation fails the matmul runs unsplit (and the next one tries again). */
#define FMC_MMA_WS_FLOATS ((int64_t)4 << 20)

static float *mma_ws(float **wsp) {
    if (!wsp) return NULL;
    if (!*wsp) {
        float *r = NULL;
        if (cudaMalloc((void **)&r, (size_t)FMC_MMA_WS_FLOATS * sizeof(float)) != cudaSuccess) {
            cudaGetLastError();
            return NULL;
        }
        *wsp = r;
    }
    return *wsp;
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
static fm_status launch_mma_dense(cudaStream_t st, int sms, float **wsp, const DMat &W, const DMat *U, const float *X, int64_t ldx,
                                  int64_t n, float *Y, int64_t ldy, int acc, char *err, size_t errlen) {
    const int swi = U != NULL;
    /* the SwiGLU tile reads gate and up with the gate's kind and group size */
    if (swi && (!fmc_gu_fused(W.kind, W.gs, U->kind, U->gs) || U->rows != W.rows || U->cols != W.cols))
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: fused gate/up matmul with gate and up of different formats");
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
        if (splits >= 2) ws = mma_ws(wsp);
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

fm_status fmc_launch_mm(cudaStream_t st, int sms, int mma, float **ws, const DMat &W, const float *X, int64_t ldx, int64_t n,
                        float *Y, int64_t ldy, int acc, char *err, size_t errlen) {
    if (n <= 0 || W.rows <= 0) return FM_OK;
    if (n == 1) {
        const DMat *Ws[1] = {&W};
        float *ys[1] = {Y};
        int accs[1] = {acc};
        return launch_mv_multi(st, sms, 1, Ws, ys, accs, X, err, errlen);
    }
    if (fmc_mma_mat_ok(W.kind, W.cols, W.gs) && mma_x_ok(X, ldx) && mma)
        return launch_mma_dense(st, sms, ws, W, NULL, X, ldx, n, Y, ldy, acc, err, errlen);
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

/* Hout = silu(G X) * (U X). Gate and up of one format (kind and group size, fmc_gu_fused): one
 * fused kernel (k_mv_swiglu decode, tensor cores or k_mm_swiglu prefill). Otherwise the split path,
 * each its own matmul (fmc_launch_mm: mv / mma / k_mm by its own format), the gate into Hout, then
 * the up stored as silu(Hout) * (U X) (FMC_Y_GLU): no extra buffer. */
fm_status fmc_launch_swiglu(cudaStream_t st, int sms, int mma, float **ws, const DMat &G, const DMat &U, const float *X,
                            int64_t ldx, int64_t n, float *Hout, char *err, size_t errlen) {
    if (n <= 0 || G.rows <= 0) return FM_OK;
    if (G.rows != U.rows || G.cols != U.cols)
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: gate [%lld x %lld] and up [%lld x %lld] differ in shape",
                       (long long)G.rows, (long long)G.cols, (long long)U.rows, (long long)U.cols);
    if (!fmc_gu_fused(G.kind, G.gs, U.kind, U.gs)) {
        CKS(fmc_launch_mm(st, sms, mma, ws, G, X, ldx, n, Hout, G.rows, FMC_Y_SET, err, errlen));
        return fmc_launch_mm(st, sms, mma, ws, U, X, ldx, n, Hout, G.rows, FMC_Y_GLU, err, errlen);
    }
    /* from here one format: the fused kernels read both with the gate's kind and group size */
    if (n == 1) {
        dim3 g1 = fmc_mv_grid(G.rows, 2, sms);
#define LS(K) k_mv_swiglu<K><<<g1, FMC_WARPS * 32, 0, st>>>(G, U, X, Hout)
        KIND_SWITCH(G.kind, LS)
#undef LS
        CKL();
        return FM_OK;
    }
    if (fmc_mma_mat_ok(G.kind, G.cols, G.gs) && mma_x_ok(X, ldx) && mma)
        return launch_mma_dense(st, sms, ws, G, &U, X, ldx, n, Hout, G.rows, 0, err, errlen);
    dim3 g = row_grid(G.rows, sms);
#define L8(K) k_mm_swiglu<K, 8><<<g, FMC_WARPS * 32, 0, st>>>(G, U, X, ldx, n, Hout)
    KIND_SWITCH(G.kind, L8)
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
                         int nk, int nv, int dk, int dv, float eps, int gdn_chunk, char *err, size_t errlen,
                         float *const *Srows) {
    if (dv > 256 || dk > 128)
        return fm_errf(err, errlen, FM_ERR_BACKEND,
                       "CUDA: GatedDeltaNet with key dim %d / value dim %d is not supported (max 128 / 256)", dk, dv);
    if (nk <= 0 || nv % nk)
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: GatedDeltaNet needs n_v_heads %% n_k_heads == 0");
    /* Chunked form (fm_cuda_gdn_chunk.cuh) from gdn_chunk tokens on (fm_debug_params.gdn_chunk:
     * default and minimum 2; 0: never). Its cost per chunk of up to 64 tokens is a few dependent
     * phases, where the sequential kernel pays 3 block reductions per token; the default 2 is a
     * guess, not yet timed (a larger minimum moves the switch). Decode (n == 1) runs k_gdn_dec;
     * other passes below the switch run the sequential k_gdn. */
    if (Srows) {
        /* multi-sequence: n rows, each one decode step of its own state Srows[r], then the norm */
        const dim3 grid((unsigned)nv, (unsigned)((dv + 31) / 32), (unsigned)n);
        if (dk <= 32)
            k_gdn_dec<8><<<grid, 128, 0, st>>>(QKV, A, B, A_log, dt_bias, S, O, nk, nv, dk, dv, Srows);
        else
            k_gdn_dec<32><<<grid, 128, 0, st>>>(QKV, A, B, A_log, dt_bias, S, O, nk, nv, dk, dv, Srows);
        CKL();
        return fmc_launch_norm(st, 1, O, Z, normw, n * nv, dv, eps, 0.f, O, err, errlen);
    }
    if (gdn_chunk > 0 && n >= (gdn_chunk > 2 ? gdn_chunk : 2)) {
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
    if (n == 1) {
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
                             float off, char *err, size_t errlen, fmc_rows_attn rows) {
    if (dh > 256 || nkv <= 0 || nh % nkv)
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: attention with head_dim %d (max 256), %d/%d heads", dh, nh,
                       nkv);
    k_attn_prep<<<dim3((unsigned)n, (unsigned)(nh + nkv)), 128, (size_t)dh * sizeof(float), st>>>(
        QG, Kn, Vn, qnw, knw, Q, Gt, KC, VC, pos, dpos, nh, nkv, dh, rot, theta, gate, eps, off, rows);
    CKL();
    k_attn<<<dim3((unsigned)n, (unsigned)nh), FMC_ATT_WARPS * 32, 0, st>>>(Q, KC, VC, Gt, O, pos, dpos, nh, nkv, dh,
                                                                           1.0f / sqrtf((float)dh), gate, rows);
    CKL();
    return FM_OK;
}

/* ================================================================== session */

static void fm_cuda_session_reset(void *p);

static void fm_cuda_session_free(void *p) {
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
    cudaFree(c->d_rows);
    free(c->h_rows);
    if (c->gexec) cudaGraphExecDestroy(c->gexec);
    for (int i = 0; i <= FMC_LOGIT_ROWS; i++)
        if (c->gexec_b[i]) cudaGraphExecDestroy(c->gexec_b[i]);
    free(c);
}

static fm_status fm_cuda_session_new(fm_session *s, void **out, char *err, size_t errlen) {
    *out = NULL;
    fm_model *m = s->m;
    fmc_model *cm = (fmc_model *)m->bm;
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

static void fm_cuda_session_reset(void *p) {
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
    if (s && s->m->be == fm_cuda_backend() && s->bs) {
        const fmc_session *c = (const fmc_session *)s->bs;
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

/* FM_ERR_NUMERIC when the guard saw a non-finite value in this eval (h_bad copied and synced),
 * naming the position: ev->pos0 + the token's index, or (a multi-sequence step) its session's */
static fm_status numeric_status(const fm_model *m, const fmc_session *c, const fm_eval *ev, char *err,
                                size_t errlen) {
    const unsigned long long b = *c->h_bad;
    if (b == ~0ull) return FM_OK;
    const int64_t chunk = (int64_t)(b >> 33), t = (int64_t)(b & 0xffffu);
    const int32_t sub = (int32_t)((b >> 16) & 0x1ffffu) - 1;
    const int64_t i = chunk * c->nb + t;
    const int64_t pos = ev->seqs && i < ev->n_tokens ? (int64_t)ev->seq_pos[i] : (int64_t)ev->pos0 + i;
    return fm_numeric_error(m, sub, pos, err, errlen);
}

/* a multi-sequence pass's table (fmc_rows_at) of the session leading it: allocated once (before any
 * capture), sized for the session's pass capacity */
static fm_status rows_alloc(const fm_model *m, fmc_session *c, char *err, size_t errlen) {
    if (c->d_rows) return FM_OK;
    const int64_t slots = 2 * (int64_t)m->n_full + 2 * m->n_linear;
    const size_t bytes = sizeof(float *) * (size_t)((slots + 1) * c->nb);
    c->h_rows = (float **)calloc(1, bytes);
    if (!c->h_rows) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    if (cudaMalloc((void **)&c->d_rows, bytes) != cudaSuccess) {
        cudaGetLastError();
        c->d_rows = NULL;
        free(c->h_rows);
        c->h_rows = NULL;
        return fm_errf(err, errlen, FM_ERR_OOM, "CUDA: out of VRAM for a multi-sequence table");
    }
    return FM_OK;
}

/* the n rows' state pointers and positions into c's table (one copy on st) */
static fm_status rows_upload(const fm_model *m, fmc_session *c, fm_session *const *rows, const int32_t *rpos, int64_t n,
                             cudaStream_t st, char *err, size_t errlen) {
    CKS(rows_alloc(m, c, err, errlen));
    const int64_t nb = c->nb, nf = m->n_full, nl = m->n_linear, slots = 2 * nf + 2 * nl;
    for (int64_t r = 0; r < n; r++) {
        const fmc_session *rc = (const fmc_session *)rows[r]->bs;
        for (int64_t i = 0; i < nf; i++) {
            c->h_rows[i * nb + r] = rc->kc[i];
            c->h_rows[(nf + i) * nb + r] = rc->vc[i];
        }
        for (int64_t i = 0; i < nl; i++) {
            c->h_rows[(2 * nf + i) * nb + r] = rc->conv[i];
            c->h_rows[(2 * nf + nl + i) * nb + r] = rc->ssm[i];
        }
        ((int32_t *)(c->h_rows + slots * nb))[r] = rpos[r];
    }
    /* pageable source: the call returns once h_rows is consumed, so the next pass may rewrite it */
    CK(cudaMemcpyAsync(c->d_rows, c->h_rows, sizeof(float *) * (size_t)((slots + 1) * nb), cudaMemcpyHostToDevice, st));
    return FM_OK;
}

static fm_status op_embed(fm_pass *p, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
    const int64_t n = x->n;
    if (!x->graph)
        CK(cudaMemcpyAsync(x->c->tok, p->tokens, sizeof(int32_t) * (size_t)n, cudaMemcpyHostToDevice, x->cm->cs));
    k_embed<<<(unsigned)n, 256, 0, x->cm->cs>>>(x->cm->tok_embd, x->c->tok, x->c->x);
    CKL();
    if (x->rows && !x->graph) CKS(rows_upload(x->m, x->c, x->rows, x->rpos, n, x->cm->cs, err, errlen));
    return FM_OK;
}

static fm_status op_attn_full(fm_pass *p, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
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
        CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &x->cm->mma_ws, L->wq, c->xn, H, n, c->qg, L->wq.rows, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &x->cm->mma_ws, L->wk, c->xn, H, n, c->k, kvd, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &x->cm->mma_ws, L->wv, c->xn, H, n, c->v, kvd, 0, err, errlen));
    }
    if (x->rows) { /* multi-sequence: each row against its own session's KV cache at its position */
        const int64_t nb = c->nb;
        float *const *R = c->d_rows;
        const fmc_rows_attn rows = {fmc_rows_at(R, nb, si), fmc_rows_at(R, nb, m->n_full + si),
                                    (const int *)fmc_rows_at(R, nb, 2 * (int64_t)m->n_full + 2 * m->n_linear)};
        CKS(fmc_launch_attn(st, c->qg, c->k, c->v, L->q_norm, L->k_norm, c->q, c->gate, NULL, NULL, c->att, n, 0, NULL,
                            m->n_heads, m->n_kv_heads, m->head_dim, m->rotary_dim, m->rope_theta, m->attn_gate, m->eps,
                            m->norm_offset, err, errlen, rows));
    } else {
        CKS(fmc_launch_attn(st, c->qg, c->k, c->v, L->q_norm, L->k_norm, c->q, c->gate, c->kc[si], c->vc[si], c->att, n,
                            x->pos, x->graph ? c->d_pos : NULL, m->n_heads, m->n_kv_heads, m->head_dim, m->rotary_dim,
                            m->rope_theta, m->attn_gate, m->eps, m->norm_offset, err, errlen));
    }
    CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &x->cm->mma_ws, L->wo, c->att, qd, n, c->x, H, 1, err, errlen));
    return FM_OK;
}

static fm_status op_attn_linear(fm_pass *p, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
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
        CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &x->cm->mma_ws, L->ssm_qkv, c->xn, H, n, c->qkv, cd, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &x->cm->mma_ws, L->ssm_z, c->xn, H, n, c->z, vd, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &x->cm->mma_ws, L->ssm_b, c->xn, H, n, c->bb, m->lin_nv, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &x->cm->mma_ws, L->ssm_a, c->xn, H, n, c->ba, m->lin_nv, 0, err, errlen));
    }
    if (x->rows) { /* multi-sequence: each row one step of its own session's conv + recurrent state */
        const int64_t nb = c->nb, nf = m->n_full, nl = m->n_linear;
        k_conv<<<dim3((unsigned)((cd + 127) / 128), (unsigned)n), 128, 0, st>>>(
            c->qkv, 1, NULL, L->ssm_conv, (int)cd, m->conv_k, c->qkvc, fmc_rows_at(c->d_rows, nb, 2 * nf + si));
        CKL();
        CKS(fmc_launch_gdn(st, c->qkvc, c->z, c->ba, c->bb, L->A_log, L->dt_bias, L->ssm_norm, NULL, c->o, n, m->lin_nk,
                           m->lin_nv, m->lin_dk, m->lin_dv, m->eps, m->debug.gdn_chunk, err, errlen,
                           fmc_rows_at(c->d_rows, nb, 2 * nf + nl + si)));
    } else {
        k_conv<<<(unsigned)((cd + 127) / 128), 128, 0, st>>>(c->qkv, n, c->conv[si], L->ssm_conv, (int)cd, m->conv_k,
                                                             c->qkvc);
        CKL();
        CKS(fmc_launch_gdn(st, c->qkvc, c->z, c->ba, c->bb, L->A_log, L->dt_bias, L->ssm_norm, c->ssm[si], c->o, n,
                           m->lin_nk, m->lin_nv, m->lin_dk, m->lin_dv, m->eps, m->debug.gdn_chunk, err, errlen));
    }
    CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &x->cm->mma_ws, L->ssm_out, c->o, vd, n, c->x, H, 1, err, errlen));
    return FM_OK;
}

static fm_status op_ffn_dense(fm_pass *p, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
    fm_model *m = x->m;
    fmc_session *c = x->c;
    const cl_layer *L = &x->cm->L[il];
    cudaStream_t st = x->cm->cs;
    const int64_t n = x->n, H = m->H;
    CKS(fmc_launch_norm(st, 0, c->x, NULL, L->ffn_norm, n, H, m->eps, m->norm_offset, c->xn, err, errlen));
    CKS(fmc_launch_swiglu(st, x->cm->sms, m->debug.cuda_mma, &x->cm->mma_ws, L->ffn_gate, L->ffn_up, c->xn, H, n, c->dg, err, errlen));
    CKS(fmc_launch_mm(st, x->cm->sms, m->debug.cuda_mma, &x->cm->mma_ws, L->ffn_down, c->dg, m->dense_I, n, c->x, H, 1, err, errlen));
    return FM_OK;
}

static fm_status op_final(fm_pass *p, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
    float *logits = p->logits;
    const int32_t all_logits = p->all_logits;
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
        CKS(fmc_launch_mm(st, cm->sms, m->debug.cuda_mma, &cm->mma_ws, lm, c->xn, H, nr, c->logits, V, 0, err, errlen));
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

/* the residual stream after the embedding (stage -1) or layer il, recorded in c->d_bad (no sync;
 * eval_end reports it). A MoE layer's check is fused into fmc_op_moe's combine: nothing to add. */
static fm_status op_guard(fm_pass *p, int32_t stage, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
    if (stage >= 0 && x->m->layers[stage].ffn == FM_FFN_MOE) return FM_OK;
    return check_finite(x, x->c->x, x->n, x->m->H, stage, 0, err, errlen);
}

/* per-op timing (fm_debug_params.cuda_timing): wait for the queued work */
static fm_status op_sync(fm_pass *p, char *err, size_t errlen) {
    CK(cudaStreamSynchronize(fmc_pass_ctx(p)->cm->cs));
    return FM_OK;
}

/* ================================================================== the eval hooks and the graph */

/* the switches of this eval, the guard's flag word cleared, passes of c->nb tokens; a resident
 * decode step runs as a CUDA graph (captured on first use: no launch gaps, one sync) */
static fm_status cu_eval_begin(fm_eval *ev, char *err, size_t errlen) {
    fm_session *s = ev->s;
    fm_model *m = s->m;
    fmc_session *c = (fmc_session *)s->bs;
    CK(cudaSetDevice(0));
    /* the switches of this eval (fm_model_set_debug may change them between evals; evals hold m->mu) */
    c->cm->timing = m->debug.cuda_timing;
    c->cm->split = m->debug.cpu_split < 0.0 ? -1.0 : m->debug.cpu_split;
    *c->h_bad = ~0ull;
    CK(cudaMemsetAsync(c->d_bad, 0xff, sizeof *c->d_bad, c->cm->cs)); /* the guard's "nothing seen" */
    fmc_ctx *x = &c->xc;
    memset(x, 0, sizeof *x);
    x->s = s;
    x->c = c;
    x->cm = c->cm;
    x->m = m;
    ev->ctx = x;
    ev->pass_cap = c->nb;
    ev->timed = c->cm->timing;
    ev->graph = FM_GRAPH_NONE;
    if (ev->n_tokens == 1 && !ev->seqs && ev->logits && !ev->all_logits && c->cm->resident && !c->cm->timing && !c->graph_failed &&
        m->debug.cuda_graph)
        ev->graph = c->gexec ? FM_GRAPH_REPLAY : FM_GRAPH_CAPTURE;
    if (ev->seqs) {
        CKS(rows_alloc(m, c, err, errlen)); /* never inside a capture */
        if (ev->n_tokens <= FMC_LOGIT_ROWS && ev->n_tokens <= c->nb && ev->logits && c->cm->resident &&
            !c->cm->timing && !c->graph_failed_b && m->debug.cuda_graph)
            ev->graph = c->gexec_b[ev->n_tokens] ? FM_GRAPH_REPLAY : FM_GRAPH_CAPTURE;
    }
    return FM_OK;
}

/* after an error: the stream drained and the sticky error cleared; else the guard's finding (the
 * flag word came back with the logits; without logits it is fetched here) */
static fm_status cu_eval_end(fm_eval *ev, fm_status st, char *err, size_t errlen) {
    fmc_session *c = (fmc_session *)ev->s->bs;
    if (st != FM_OK) {
        cudaStreamSynchronize(c->cm->cs);
        cudaGetLastError();
        return st;
    }
    if (!ev->logits) {
        CK(cudaMemcpyAsync(c->h_bad, c->d_bad, sizeof *c->h_bad, cudaMemcpyDeviceToHost, c->cm->cs));
        CK(cudaStreamSynchronize(c->cm->cs));
        c->cnt.syncs++;
    }
    return numeric_status(ev->s->m, c, ev, err, errlen);
}

/* recording the decode step: what the captured ops count is not a real eval (saved, then restored) */
static fm_status cu_capture_begin(fm_pass *p, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
    x->c->cap_cnt = x->c->cnt;
    x->c->cap_hits = p->s->st.expert_hits_vram;
    CK(cudaStreamBeginCapture(x->cm->cs, cudaStreamCaptureModeThreadLocal));
    return FM_OK;
}

static fm_status cu_capture_end(fm_pass *p, fm_status st, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
    fmc_session *c = x->c;
    cudaGraph_t g = NULL;
    cudaError_t ce = cudaStreamEndCapture(x->cm->cs, &g);
    c->cnt = c->cap_cnt;
    p->s->st.expert_hits_vram = c->cap_hits;
    cudaGraphExec_t *slot = p->seqs ? &c->gexec_b[p->n] : &c->gexec;
    if (st == FM_OK && ce == cudaSuccess) ce = cudaGraphInstantiate(slot, g, 0);
    if (g) cudaGraphDestroy(g);
    if (st != FM_OK || ce != cudaSuccess) { /* plain launches from now on */
        cudaGetLastError();
        *slot = NULL;
        if (p->seqs)
            c->graph_failed_b = 1;
        else
            c->graph_failed = 1;
        return st != FM_OK ? st : fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: graph capture: %s", cudaGetErrorString(ce));
    }
    return FM_OK;
}

/* the recorded decode step for p's token at p->pos: the logits and the guard's flag word back, one sync */
static fm_status cu_replay(fm_pass *p, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
    fmc_session *c = x->c;
    const fm_model *m = x->m;
    cudaStream_t st = x->cm->cs;
    if (p->seqs) { /* a multi-sequence step: the rows' table and tokens up, n rows of logits back */
        const int64_t n = p->n;
        CKS(rows_upload(m, c, p->seqs, p->seq_pos, n, st, err, errlen));
        CK(cudaMemcpyAsync(c->tok, p->tokens, sizeof(int32_t) * (size_t)n, cudaMemcpyHostToDevice, st));
        CK(cudaGraphLaunch(c->gexec_b[n], st));
        CK(cudaMemcpyAsync(p->logits, c->logits, sizeof(float) * (size_t)(n * m->vocab), cudaMemcpyDeviceToHost, st));
        CK(cudaMemcpyAsync(c->h_bad, c->d_bad, sizeof *c->h_bad, cudaMemcpyDeviceToHost, st));
        CK(cudaStreamSynchronize(st));
        c->cnt.syncs++;
        c->cnt.vram_hits += n * m->k_tok * m->n_moe;
        p->s->st.expert_hits_vram += n * m->k_tok * m->n_moe;
        return FM_OK;
    }
    c->h_io[0] = p->tokens[0];
    c->h_io[1] = p->pos;
    CK(cudaMemcpyAsync(c->tok, &c->h_io[0], sizeof(int32_t), cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(c->d_pos, &c->h_io[1], sizeof(int32_t), cudaMemcpyHostToDevice, st));
    CK(cudaGraphLaunch(c->gexec, st));
    CK(cudaMemcpyAsync(p->logits, c->logits, sizeof(float) * (size_t)m->vocab, cudaMemcpyDeviceToHost, st));
    CK(cudaMemcpyAsync(c->h_bad, c->d_bad, sizeof *c->h_bad, cudaMemcpyDeviceToHost, st));
    CK(cudaStreamSynchronize(st));
    c->cnt.syncs++;
    c->cnt.vram_hits += (int64_t)m->k_tok * m->n_moe;
    p->s->st.expert_hits_vram += (int64_t)m->k_tok * m->n_moe;
    return FM_OK;
}

/* ================================================================== the backend table */

/* what the kernels cannot run, refused at open (il -1: model-wide; else layer il) */
static fm_status cu_supports(const fm_model *m, int32_t il, char *err, size_t errlen) {
    if (il < 0) {
        if (m->n_full && (m->head_dim > 256 || m->n_kv_heads <= 0 || m->n_heads % m->n_kv_heads))
            return fm_errf(err, errlen, FM_ERR_BACKEND,
                           "backend cuda: full attention with head_dim %d and %d/%d heads is not supported (the "
                           "attention kernel takes head_dim <= 256 and n_heads a multiple of n_kv_heads)",
                           m->head_dim, m->n_heads, m->n_kv_heads);
        if (m->n_linear && (m->lin_dk > 128 || m->lin_dv > 256 || m->lin_nk <= 0 || m->lin_nv % m->lin_nk))
            return fm_errf(err, errlen, FM_ERR_BACKEND,
                           "backend cuda: linear attention with key dim %d, value dim %d, %d/%d heads is not supported "
                           "(the GatedDeltaNet kernels take key dim <= 128, value dim <= 256, value heads a multiple "
                           "of key heads)",
                           m->lin_dk, m->lin_dv, m->lin_nv, m->lin_nk);
        if (m->n_linear && m->conv_k > 9)
            return fm_errf(err, errlen, FM_ERR_BACKEND,
                           "backend cuda: linear attention with conv kernel %d is not supported (at most 9)", m->conv_k);
        /* model features (spec data) the CUDA kernels do not implement: the CPU backend does */
        const char *feat = NULL;
        /* (spec.router, router_bias, routed_scaling_factor and shared_gate are all implemented: fmc_op_moe) */
        if (m->n_moe && m->act.kind != FM_ACT_SWIGLU) feat = "spec.expert_act swiglu_clamp";
        if (feat)
            return fm_errf(err, errlen, FM_ERR_BACKEND,
                           "backend cuda: model feature %s is not implemented by the CUDA backend (use the cpu "
                           "backend)",
                           feat);
        return FM_OK;
    }
    const fm_layer *L = &m->layers[il];
    if (L->attn == FM_ATTN_FULL && (L->window > 0 || L->has_sinks))
        return fm_errf(err, errlen, FM_ERR_BACKEND,
                       "backend cuda: layer %d (%s): model feature %s is not implemented by the CUDA backend (use the "
                       "cpu backend)",
                       il, fm_layer_kind(L), L->window > 0 ? "spec.layers[].sliding_window" : "spec.layers[].attn_sinks");
    if (L->ffn == FM_FFN_MOE &&
        (L->parts[FM_PART_GATE].has_bias || L->parts[FM_PART_UP].has_bias || L->parts[FM_PART_DOWN].has_bias))
        return fm_errf(err, errlen, FM_ERR_BACKEND,
                       "backend cuda: layer %d (%s): model feature expert part biases (experts.layers[\"%d\"].parts.*.bias) "
                       "is not implemented by the CUDA backend (use the cpu backend)",
                       il, fm_layer_kind(L), il);
    return FM_OK;
}

static fm_status cu_model_open(fm_model *m, const fm_model_params *p, char *err, size_t errlen) {
    return fm_cuda_model_open(m, p, &m->bm, err, errlen);
}

static void cu_model_close(fm_model *m) {
    fm_cuda_model_close(m->bm);
    m->bm = NULL;
}

static fm_status cu_session_new(fm_session *s, char *err, size_t errlen) {
    return fm_cuda_session_new(s, &s->bs, err, errlen);
}

static void cu_session_free(fm_session *s) {
    fm_cuda_session_free(s->bs);
    s->bs = NULL;
}

static void cu_session_reset(fm_session *s) { fm_cuda_session_reset(s->bs); }

static fm_backend make_backend(void) {
    fm_backend b;
    memset(&b, 0, sizeof b);
    b.name = "cuda";
    b.records_trace = 0;
    b.host_dense = 0; /* every dense tensor is uploaded at open */
    b.multi_seq = 1;
    b.supports = cu_supports;
    b.model_open = cu_model_open;
    b.model_close = cu_model_close;
    b.session_new = cu_session_new;
    b.session_free = cu_session_free;
    b.session_reset = cu_session_reset;
    b.eval_begin = cu_eval_begin;
    b.eval_end = cu_eval_end;
    b.embed = op_embed;
    b.mixer[FM_ATTN_FULL] = op_attn_full;
    b.mixer[FM_ATTN_LINEAR] = op_attn_linear;
    b.ffn[FM_FFN_MOE] = fmc_op_moe;
    b.ffn[FM_FFN_DENSE] = op_ffn_dense;
    b.final = op_final;
    b.guard = op_guard;
    b.sync = op_sync;
    b.capture_begin = cu_capture_begin;
    b.capture_end = cu_capture_end;
    b.replay = cu_replay;
    b.state_get = fmc_state_get; /* fm_cuda_state.cu */
    b.state_set = fmc_state_set;
    return b;
}

static const fm_backend cuda_backend = make_backend();

extern "C" const fm_backend *fm_cuda_backend(void) { return &cuda_backend; }
