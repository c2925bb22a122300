/* fm_cuda.cu: the CUDA backend: weights in VRAM, the layer ops of fm_backend.h, the expert tiers.
 *
 * Owns: the device copy of the dense weights (one cudaMalloc per tensor), per-session device state
 * (KV cache, conv + recurrent state, scratch), the layer loop over fm_model.layers calling the
 * backend ops table (cuda_ops), and the expert tiers:
 *   VRAM slot cache (LRU over slots of max block_bytes, bounded by vram_budget; "resident" when
 *   every expert of every layer fits: loaded at open, no host sync per layer)
 *   <- pinned host cache (ram_budget; LRU, or "ram resident" when everything fits: filled at open)
 *   <- expert files (pread by a thread pool into pinned staging / pinned cache slots; each worker
 *   queues its own H2D copy on the copy stream as soon as its read lands).
 * Copies run on their own stream (xs), overlapped with the shared expert on the compute stream
 * (cs); expert id -> slot remap happens on the GPU (k_fill_ptrs, resident) or as one small pointer
 * array copy per chunk (cached mode).
 * Host syncs per decode step: resident: 1 (the logits); cached: 1 per MoE layer (reading the
 * routed ids, needed to manage the tiers) + 1 (the logits), whether the layer hits or misses.
 * Decode with a cache is pipelined (moe_decode_cached): hits run at once, each missed block's
 * compute waits only for its own copy. Prefill: + 1 per MoE layer per batch (the grouped expert
 * work list is built on the host). Kernel switches: docs/INTERNALS.md section 5.
 * Does not own: model parsing (fm_model.c), the CPU forward pass (fm_forward.c), kernels
 * (fm_cuda_kernels.cuh).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

extern "C" {
#include "fm_model.h"
#include "fm_backend.h"
}
#include "fm_cuda_kernels.cuh"
#include "fm_cuda_gdn_chunk.cuh"
#include "fm_cuda_mma.cuh"

#define CK(x)                                                                                                 \
    do {                                                                                                      \
        cudaError_t e_ = (x);                                                                                 \
        if (e_ != cudaSuccess)                                                                                \
            return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: %s: %s (%s:%d)", #x, cudaGetErrorString(e_),   \
                           __FILE__, __LINE__);                                                               \
    } while (0)
#define CKL()  CK(cudaGetLastError())
#define CKS(x)                                                                                                \
    do {                                                                                                      \
        fm_status s_ = (x);                                                                                   \
        if (s_ != FM_OK) return s_;                                                                           \
    } while (0)

#define FMC_UBATCH 256    /* tokens per pass (bounds scratch) */
#define FMC_LOGIT_ROWS 16 /* rows of logits per lm_head pass when all_logits */
#define FMC_CHUNK_MAX 32  /* experts per copy chunk (staging slots) */

static int g_sm_count(void) {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 132;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 132;
    return n;
}

/* ================================================================== launches */

static int kind_of(const fm_qmat *W) {
    return W->dt == FM_DT_F32 ? 0 : W->dt == FM_DT_BF16 ? 1 : W->bits;
}

static dim3 row_grid(int64_t rows, int sms) {
    int64_t b = (rows + FMC_WARPS - 1) / FMC_WARPS;
    int64_t cap = (int64_t)sms * 16;
    if (b > cap) b = cap;
    if (b < 1) b = 1;
    return dim3((unsigned)b);
}

#define KIND_SWITCH(kind, MACRO)                                                                              \
    switch (kind) {                                                                                           \
    case 0: MACRO(0); break;                                                                                  \
    case 1: MACRO(1); break;                                                                                  \
    case 2: MACRO(2); break;                                                                                  \
    case 3: MACRO(3); break;                                                                                  \
    case 4: MACRO(4); break;                                                                                  \
    case 5: MACRO(5); break;                                                                                  \
    case 6: MACRO(6); break;                                                                                  \
    case 8: MACRO(8); break;                                                                                  \
    default: return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: unsupported weight kind %d", kind);        \
    }

static dim3 mv_grid(int64_t rows, int rows_per_warp, int sms) {
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
    dim3 g = mv_grid(maxr, FMC_MV_R, sms);
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
static int mma_enabled(void) {
    const char *e = getenv("FM_CUDA_MMA");
    return !(e && e[0] == '0');
}

static int mma_mat_ok(int kind, int64_t cols, int gs) {
    if (kind < 1 || kind > 8 || kind == 7 || cols <= 0 || cols % 32) return 0;
    return kind == 1 || (gs > 0 && gs % 32 == 0 && cols % gs == 0);
}

static int mma_x_ok(const float *X, int64_t ldx) { return ((uintptr_t)X & 15) == 0 && ldx % 4 == 0; }

/* split-K workspace: one per stream (a stream runs one kernel at a time, the reduction follows
 * the partials on the same stream), allocated on first use, released by mma_ws_release */
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

static void mma_ws_release(cudaStream_t st) {
    pthread_mutex_lock(&g_mma_ws_mu);
    for (int i = 0; i < FMC_MMA_WS_SLOTS; i++)
        if (g_mma_ws[i].p && g_mma_ws[i].st == st) {
            cudaFree(g_mma_ws[i].p);
            g_mma_ws[i].p = NULL;
        }
    pthread_mutex_unlock(&g_mma_ws_mu);
}

/* 8-token n-tiles per block for up to n tokens per block */
static int mma_nt(int64_t n) { return n <= 8 ? 1 : n <= 16 ? 2 : n <= 32 ? 4 : 8; }

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

/* dense Y (+)= W X (U == NULL) or Y = silu(W X) * (U X), n >= 2 tokens. The tile grid is
 * (row tiles, token tiles); when it would leave SMs idle (small n or few rows) the columns are
 * split over gridDim.z and the partials summed in order by k_mma_reduce. */
static fm_status launch_mma_dense(cudaStream_t st, int sms, const DMat &W, const DMat *U, const float *X, int64_t ldx,
                                  int64_t n, float *Y, int64_t ldy, int acc, char *err, size_t errlen) {
    const int swi = U != NULL;
    const int nt = mma_nt(n);
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

static fm_status launch_mm(cudaStream_t st, int sms, const DMat &W, const float *X, int64_t ldx, int64_t n, float *Y,
                           int64_t ldy, int acc, char *err, size_t errlen) {
    if (n <= 0 || W.rows <= 0) return FM_OK;
    if (n == 1) {
        const DMat *Ws[1] = {&W};
        float *ys[1] = {Y};
        int accs[1] = {acc};
        return launch_mv_multi(st, sms, 1, Ws, ys, accs, X, err, errlen);
    }
    if (mma_mat_ok(W.kind, W.cols, W.gs) && mma_x_ok(X, ldx) && mma_enabled())
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

static fm_status launch_swiglu(cudaStream_t st, int sms, const DMat &G, const DMat &U, const float *X, int64_t ldx,
                               int64_t n, float *Hout, char *err, size_t errlen) {
    if (n <= 0 || G.rows <= 0) return FM_OK;
    if (G.kind != U.kind || G.rows != U.rows || G.cols != U.cols)
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: gate and up projections differ in dtype or shape");
    if (n == 1) {
        dim3 g1 = mv_grid(G.rows, 2, sms);
#define LS(K) k_mv_swiglu<K><<<g1, FMC_WARPS * 32, 0, st>>>(G, U, X, Hout)
        KIND_SWITCH(G.kind, LS)
#undef LS
        CKL();
        return FM_OK;
    }
    if (mma_mat_ok(G.kind, G.cols, G.gs) && G.gs == U.gs && mma_x_ok(X, ldx) && mma_enabled())
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

static fm_status launch_norm(cudaStream_t st, int op, const float *X, const float *Z, const float *w, int64_t n,
                             int64_t d, float eps, float off, float *Y, char *err, size_t errlen) {
    if (n <= 0) return FM_OK;
    int bs = d >= 1024 ? 1024 : (int)((d + 31) / 32 * 32);
    k_norm<<<(unsigned)n, bs, 0, st>>>(op, X, Z, w, d, eps, off, Y);
    CKL();
    return FM_OK;
}

static fm_status launch_gdn(cudaStream_t st, const float *QKV, const float *Z, const float *A, const float *B,
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
        return launch_norm(st, 1, O, Z, normw, n * nv, dv, eps, 0.f, O, err, errlen);
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
        return launch_norm(st, 1, O, Z, normw, nv, dv, eps, 0.f, O, err, errlen);
    }
    int bs = (dv + 31) / 32 * 32;
    if (dk <= 32)
        k_gdn<32><<<nv, bs, 0, st>>>(QKV, Z, A, B, A_log, dt_bias, normw, S, O, n, nk, nv, dk, dv, eps);
    else
        k_gdn<128><<<nv, bs, 0, st>>>(QKV, Z, A, B, A_log, dt_bias, normw, S, O, n, nk, nv, dk, dv, eps);
    CKL();
    return FM_OK;
}

static fm_status launch_attn(cudaStream_t st, const float *QG, const float *Kn, const float *Vn, const float *qnw,
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

/* ================================================================== read pool */

typedef struct {
    int fd;
    uint64_t off, len;
    uint8_t *dst;  /* pinned host */
    void *ddst;    /* device destination (H2D queued by the worker after the read) or NULL */
    int32_t il, e;
} rtask;

typedef struct {
    pthread_t *th;
    int n_th;
    pthread_mutex_t mu;
    pthread_cond_t cv, done_cv;
    rtask *tasks;
    int cap, ntasks, next, done, stop;
    int failed;
    char msg[512];
    cudaStream_t xs;
    const char *const *paths;
} rpool;

static void *rpool_worker(void *arg) {
    rpool *p = (rpool *)arg;
    cudaSetDevice(0);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->next >= p->ntasks) pthread_cond_wait(&p->cv, &p->mu);
        if (p->stop) break;
        rtask t = p->tasks[p->next++];
        pthread_mutex_unlock(&p->mu);
        uint64_t got = 0;
        int bad = 0, eno = 0;
        while (got < t.len) {
            ssize_t r = pread(t.fd, t.dst + got, t.len - got, (off_t)(t.off + got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                bad = 1;
                eno = r < 0 ? errno : 0;
                break;
            }
            got += (uint64_t)r;
        }
        cudaError_t ce = cudaSuccess;
        if (!bad && t.ddst) ce = cudaMemcpyAsync(t.ddst, t.dst, t.len, cudaMemcpyHostToDevice, p->xs);
        pthread_mutex_lock(&p->mu);
        if ((bad || ce != cudaSuccess) && !p->failed) {
            p->failed = bad ? 1 : 2;
            if (bad)
                snprintf(p->msg, sizeof p->msg, "%s: read of layer %d expert %d (%llu bytes at offset %llu) failed: %s",
                         p->paths[t.il], t.il, t.e, (unsigned long long)t.len, (unsigned long long)t.off,
                         eno ? strerror(eno) : "unexpected end of file");
            else
                snprintf(p->msg, sizeof p->msg, "CUDA: host-to-device copy of layer %d expert %d: %s", t.il, t.e,
                         cudaGetErrorString(ce));
        }
        p->done++;
        if (p->done == p->ntasks) pthread_cond_broadcast(&p->done_cv);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void rpool_free(rpool *p) {
    if (!p) return;
    if (p->th) {
        pthread_mutex_lock(&p->mu);
        p->stop = 1;
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        for (int i = 0; i < p->n_th; i++) pthread_join(p->th[i], NULL);
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->cv);
        pthread_cond_destroy(&p->done_cv);
    }
    free(p->th);
    free(p->tasks);
    free(p);
}

static rpool *rpool_new(int n_th, int cap, cudaStream_t xs, const char *const *paths) {
    rpool *p = (rpool *)calloc(1, sizeof *p);
    if (!p) return NULL;
    p->tasks = (rtask *)calloc((size_t)cap, sizeof(rtask));
    p->th = (pthread_t *)calloc((size_t)n_th, sizeof(pthread_t));
    if (!p->tasks || !p->th) {
        free(p->tasks);
        free(p->th);
        free(p);
        return NULL;
    }
    p->cap = cap;
    p->xs = xs;
    p->paths = paths;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    for (int i = 0; i < n_th; i++) {
        if (pthread_create(&p->th[i], NULL, rpool_worker, p) != 0) break;
        p->n_th++;
    }
    if (p->n_th == 0) {
        free(p->th);
        p->th = NULL;
        rpool_free(p);
        return NULL;
    }
    return p;
}

/* run tasks[0..n) (already in p->tasks) and wait; FM_ERR_IO / FM_ERR_BACKEND on failure */
static fm_status rpool_run(rpool *p, int n, char *err, size_t errlen) {
    if (n <= 0) return FM_OK;
    pthread_mutex_lock(&p->mu);
    p->ntasks = n;
    p->next = 0;
    p->done = 0;
    p->failed = 0;
    pthread_cond_broadcast(&p->cv);
    while (p->done < p->ntasks) pthread_cond_wait(&p->done_cv, &p->mu);
    int failed = p->failed;
    p->ntasks = 0;
    p->next = 0;
    pthread_mutex_unlock(&p->mu);
    if (failed) return fm_errf(err, errlen, failed == 1 ? FM_ERR_IO : FM_ERR_BACKEND, "%s", p->msg);
    return FM_OK;
}

/* ================================================================== LRU over slots */

typedef struct {
    int64_t n;
    int64_t *key;    /* slot -> key (-1 empty) */
    int64_t *of;     /* key -> slot (-1 absent) */
    int64_t *prev, *next;
    int64_t head, tail; /* head: most recent */
    int64_t *stamp;  /* epoch of last use in the current chunk (not evictable) */
} lru_t;

static void lru_free(lru_t *l) {
    free(l->key);
    free(l->of);
    free(l->prev);
    free(l->next);
    free(l->stamp);
    memset(l, 0, sizeof *l);
}

static int lru_init(lru_t *l, int64_t n, int64_t n_keys) {
    memset(l, 0, sizeof *l);
    l->n = n;
    l->key = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    l->of = (int64_t *)malloc(sizeof(int64_t) * (size_t)n_keys);
    l->prev = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    l->next = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    l->stamp = (int64_t *)calloc((size_t)n, sizeof(int64_t));
    if (!l->key || !l->of || !l->prev || !l->next || !l->stamp) {
        lru_free(l);
        return 0;
    }
    for (int64_t i = 0; i < n_keys; i++) l->of[i] = -1;
    for (int64_t i = 0; i < n; i++) {
        l->key[i] = -1;
        l->prev[i] = i - 1;
        l->next[i] = i + 1 < n ? i + 1 : -1;
    }
    l->head = n ? 0 : -1;
    l->tail = n - 1;
    return 1;
}

static void lru_unlink(lru_t *l, int64_t s) {
    if (l->prev[s] >= 0) l->next[l->prev[s]] = l->next[s];
    else l->head = l->next[s];
    if (l->next[s] >= 0) l->prev[l->next[s]] = l->prev[s];
    else l->tail = l->prev[s];
}

static void lru_touch(lru_t *l, int64_t s, int64_t epoch) {
    l->stamp[s] = epoch;
    if (l->head == s) return;
    lru_unlink(l, s);
    l->prev[s] = -1;
    l->next[s] = l->head;
    if (l->head >= 0) l->prev[l->head] = s;
    l->head = s;
    if (l->tail < 0) l->tail = s;
}

/* least recently used slot not stamped with epoch, re-keyed to key and made most recent */
static int64_t lru_take(lru_t *l, int64_t key, int64_t epoch) {
    int64_t s = l->tail;
    while (s >= 0 && l->stamp[s] == epoch) s = l->prev[s];
    if (s < 0) return -1;
    if (l->key[s] >= 0) l->of[l->key[s]] = -1;
    l->key[s] = key;
    l->of[key] = s;
    lru_touch(l, s, epoch);
    return s;
}

/* ================================================================== model */

typedef struct {
    DMat wq, wk, wv, wo, ssm_qkv, ssm_z, ssm_b, ssm_a, ssm_out, router, sh_gate, sh_up, sh_down, sh_router,
        ffn_gate, ffn_up, ffn_down;
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm, *ssm_conv, *dt_bias, *A_log, *ssm_norm;
    DPart pg, pu, pd;
} cl_layer;

typedef struct {
    fm_model *m;
    int sms;
    cl_layer *L;
    DMat tok_embd, output;
    const float *output_norm;
    void **allocs;
    int32_t n_allocs, cap_allocs;
    cudaStream_t cs, xs;
    cudaEvent_t ev_topi, ev_copy, ev_comp;
    /* experts */
    int64_t n_keys; /* n_layers * n_experts */
    uint64_t slot_bytes, total_expert_bytes;
    int resident, ram_resident;
    uint8_t *vram;
    lru_t vl;
    const uint8_t **d_table; /* resident: device [n_keys] slot pointers */
    uint8_t **rchunks;
    int32_t n_rchunks;
    int64_t rslots_per_chunk;
    lru_t rl;
    int has_ram;
    uint8_t *stage;
    int32_t chunk;
    const uint8_t **h_ptrs, **d_ptrs;
    int64_t ptr_cap;
    int32_t *h_topi;
    int32_t *h_mwork, *d_mwork; /* prefill expert work lists: per chunk [2 * items + pairs], pinned / device */
    int32_t *mcnt;              /* host scratch [E]: pairs per expert */
    const uint8_t **eptr; /* host scratch [E] */
    int32_t *used;        /* host scratch [E] */
    int64_t epoch;
    int *fds;
    rpool *pool;
    int io_threads;
    int timing; /* FM_CUDA_TIMING=1 (read per eval): sync after every op, charge its time to fm_stats.ms_* */
    /* CPU split (decode, pinned host tier): part of a layer's missed experts is computed on the host
     * from the pinned cache (fm_pool + fm_qmat_matvec_rows) while the GPU copies + computes the rest */
    double split;             /* FM_CUDA_CPU_SPLIT (read per eval): <0 auto, else the fraction in [0, 1] */
    double rate_h2d, rate_cpu; /* bytes per ms (= GB/s * 1e6), EMAs of the measured rates; 0: unknown */
    int calibrated;
    float *h_xn, *h_topw, *h_ycpu; /* pinned [H], [K], [H] */
    float *d_ycpu;                 /* device [H] */
    float *cg, *cu, *cy;           /* host [K*I], [K*I], [K*H] */
    const uint8_t **cblk;          /* host [K]: pinned blocks of the CPU share */
    int32_t *cpair;                /* host [K]: their pair index */
    cudaEvent_t ev_t0, ev_t1;      /* timing events around a layer's copies */
    cudaEvent_t ev_h0, ev_h1;      /* timing events around the final norm + lm_head */
    cudaEvent_t ev_grp[FMC_PSET];  /* decode: one per copied miss (its compute waits for it) */
    /* the host share runs on its own thread (the split worker) while the main thread queues the
     * layer's copies and kernels; started on first use */
    pthread_t sw_th;
    pthread_mutex_t sw_mu;
    pthread_cond_t sw_cv;
    int sw_state; /* 0 none, 1 running, -1 could not start (host share runs inline) */
    int split_async; /* FM_CUDA_SPLIT_THREAD (read per eval) */
    int64_t split_calls; /* auto-split decisions (every 64th may probe the host with one expert) */
    int sw_stop, sw_job, sw_done;
    const fm_layer *sw_FL;
    int64_t sw_ncpu;
    double sw_ms;
    int t_pending;
    uint64_t t_bytes;
} fmc_model;

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

static int64_t conv_dim(const fm_model *m) {
    return 2 * (int64_t)m->lin_nk * m->lin_dk + (int64_t)m->lin_nv * m->lin_dv;
}

static uint8_t *rslot_ptr(fmc_model *cm, int64_t s) {
    return cm->rchunks[s / cm->rslots_per_chunk] + (uint64_t)(s % cm->rslots_per_chunk) * cm->slot_bytes;
}

void fm_cuda_model_close(void *p) {
    fmc_model *cm = (fmc_model *)p;
    if (!cm) return;
    cudaSetDevice(0);
    if (cm->cs) cudaStreamSynchronize(cm->cs);
    if (cm->xs) cudaStreamSynchronize(cm->xs);
    if (cm->sw_state == 1) {
        pthread_mutex_lock(&cm->sw_mu);
        cm->sw_stop = 1;
        pthread_cond_broadcast(&cm->sw_cv);
        pthread_mutex_unlock(&cm->sw_mu);
        pthread_join(cm->sw_th, NULL);
        pthread_mutex_destroy(&cm->sw_mu);
        pthread_cond_destroy(&cm->sw_cv);
    }
    rpool_free(cm->pool);
    for (int32_t i = 0; i < cm->n_allocs; i++) cudaFree(cm->allocs[i]);
    free(cm->allocs);
    if (cm->vram) cudaFree(cm->vram);
    if (cm->d_table) cudaFree((void *)cm->d_table);
    if (cm->d_ptrs) cudaFree((void *)cm->d_ptrs);
    if (cm->h_ptrs) cudaFreeHost((void *)cm->h_ptrs);
    if (cm->h_topi) cudaFreeHost(cm->h_topi);
    if (cm->h_mwork) cudaFreeHost(cm->h_mwork);
    if (cm->d_mwork) cudaFree(cm->d_mwork);
    free(cm->mcnt);
    if (cm->cs) mma_ws_release(cm->cs);
    if (cm->stage) cudaFreeHost(cm->stage);
    for (int32_t i = 0; i < cm->n_rchunks; i++)
        if (cm->rchunks[i]) cudaFreeHost(cm->rchunks[i]);
    free(cm->rchunks);
    lru_free(&cm->vl);
    lru_free(&cm->rl);
    free(cm->eptr);
    free(cm->used);
    if (cm->fds) {
        for (int32_t i = 0; i < cm->m->n_layers; i++)
            if (cm->fds[i] >= 0) close(cm->fds[i]);
        free(cm->fds);
    }
    if (cm->ev_topi) cudaEventDestroy(cm->ev_topi);
    if (cm->ev_copy) cudaEventDestroy(cm->ev_copy);
    if (cm->ev_comp) cudaEventDestroy(cm->ev_comp);
    if (cm->ev_t0) cudaEventDestroy(cm->ev_t0);
    if (cm->ev_t1) cudaEventDestroy(cm->ev_t1);
    if (cm->ev_h0) cudaEventDestroy(cm->ev_h0);
    if (cm->ev_h1) cudaEventDestroy(cm->ev_h1);
    for (int i = 0; i < FMC_PSET; i++)
        if (cm->ev_grp[i]) cudaEventDestroy(cm->ev_grp[i]);
    if (cm->h_xn) cudaFreeHost(cm->h_xn);
    if (cm->h_topw) cudaFreeHost(cm->h_topw);
    if (cm->h_ycpu) cudaFreeHost(cm->h_ycpu);
    if (cm->d_ycpu) cudaFree(cm->d_ycpu);
    free(cm->cg);
    free(cm->cu);
    free(cm->cy);
    free((void *)cm->cblk);
    free(cm->cpair);
    if (cm->cs) cudaStreamDestroy(cm->cs);
    if (cm->xs) cudaStreamDestroy(cm->xs);
    free(cm->L);
    free(cm);
}

/* fill every (layer, expert) key in [k0, k1) into the VRAM slots (resident) and/or the pinned
 * RAM slots (ram resident), through staging */
static fm_status preload(fmc_model *cm, int to_vram, int to_ram, char *err, size_t errlen) {
    fm_model *m = cm->m;
    const int64_t E = m->n_experts;
    int64_t key = 0;
    int nt = 0;
    for (int32_t il = 0; il < m->n_layers; il++) {
        if (m->layers[il].ffn != FM_FFN_MOE) continue;
        const uint64_t bb = m->layers[il].block_bytes;
        for (int64_t e = 0; e < E; e++) {
            key = (int64_t)il * E + e;
            rtask *t = &cm->pool->tasks[nt];
            t->fd = cm->fds[il];
            t->off = m->files[il].data_offset + (uint64_t)e * bb;
            t->len = bb;
            t->il = il;
            t->e = (int32_t)e;
            if (to_ram) {
                int64_t s = lru_take(&cm->rl, key, ++cm->epoch);
                t->dst = rslot_ptr(cm, s);
            } else {
                t->dst = cm->stage + (uint64_t)nt * cm->slot_bytes;
            }
            t->ddst = NULL;
            if (to_vram) {
                int64_t s = lru_take(&cm->vl, key, ++cm->epoch);
                t->ddst = cm->vram + (uint64_t)s * cm->slot_bytes;
            }
            nt++;
            if (nt == cm->chunk) {
                CKS(rpool_run(cm->pool, nt, err, errlen));
                CK(cudaStreamSynchronize(cm->xs));
                nt = 0;
            }
        }
    }
    CKS(rpool_run(cm->pool, nt, err, errlen));
    CK(cudaStreamSynchronize(cm->xs));
    return FM_OK;
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
    cm->sms = g_sm_count();

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
        const int64_t H = m->H, cd = conv_dim(m);
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
                if (L->has_shexp) {
                    TRY(up_mat(cm, &L->sh_gate, &c->sh_gate, err, errlen));
                    TRY(up_mat(cm, &L->sh_up, &c->sh_up, err, errlen));
                    TRY(up_mat(cm, &L->sh_down, &c->sh_down, err, errlen));
                    TRY(up_mat(cm, &L->sh_router, &c->sh_router, err, errlen));
                }
                c->pg = to_dpart(&L->parts[FM_PART_GATE]);
                c->pu = to_dpart(&L->parts[FM_PART_UP]);
                c->pd = to_dpart(&L->parts[FM_PART_DOWN]);
                if (c->pg.kind != c->pu.kind) {
                    st = fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: layer %d: expert gate and up differ in dtype", il);
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

        if (m->n_moe) {
            const int64_t E = m->n_experts;
            const int32_t K = m->k_tok;
            cm->n_keys = (int64_t)m->n_layers * E;
            uint64_t total_slots_needed = (uint64_t)m->n_moe * (uint64_t)E;
            uint64_t budget = p->vram_budget;
            if (!budget) { /* default: 60% of the free VRAM, at most every expert */
                size_t fr = 0, tot = 0;
                TRYC(cudaMemGetInfo(&fr, &tot));
                budget = (uint64_t)((double)fr * 0.6);
            }
            int64_t nv = (int64_t)(budget / cm->slot_bytes);
            if ((uint64_t)nv >= total_slots_needed) {
                nv = (int64_t)total_slots_needed;
                cm->resident = 1;
            }
            if (nv < K)
                TRY(fm_errf(err, errlen, FM_ERR_ARG,
                            "vram_budget %llu bytes holds %lld expert slots of %llu bytes; at least experts_per_token "
                            "(%d) are needed",
                            (unsigned long long)budget, (long long)nv, (unsigned long long)cm->slot_bytes, K));
            {
                cudaError_t e = cudaMalloc((void **)&cm->vram, (size_t)nv * cm->slot_bytes);
                if (e != cudaSuccess)
                    TRY(fm_errf(err, errlen, FM_ERR_OOM, "CUDA: cannot allocate the VRAM expert cache (%lld slots, %.2f GiB): %s",
                                (long long)nv, (double)nv * (double)cm->slot_bytes / 1073741824.0, cudaGetErrorString(e)));
            }
            if (!lru_init(&cm->vl, nv, cm->n_keys)) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
            /* host tier */
            int64_t nr = (int64_t)(p->ram_budget / cm->slot_bytes);
            if ((uint64_t)nr >= total_slots_needed) {
                nr = (int64_t)total_slots_needed;
                cm->ram_resident = 1;
            }
            if (nr > 0 && !cm->resident) {
                cm->has_ram = 1;
                cm->rslots_per_chunk = (int64_t)((1ull << 30) / cm->slot_bytes);
                if (cm->rslots_per_chunk < 1) cm->rslots_per_chunk = 1;
                cm->n_rchunks = (int32_t)((nr + cm->rslots_per_chunk - 1) / cm->rslots_per_chunk);
                cm->rchunks = (uint8_t **)calloc((size_t)cm->n_rchunks, sizeof(uint8_t *));
                if (!cm->rchunks) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
                for (int32_t i = 0; i < cm->n_rchunks; i++) {
                    int64_t cnt = nr - (int64_t)i * cm->rslots_per_chunk;
                    if (cnt > cm->rslots_per_chunk) cnt = cm->rslots_per_chunk;
                    cudaError_t e = cudaHostAlloc((void **)&cm->rchunks[i], (size_t)cnt * cm->slot_bytes, cudaHostAllocDefault);
                    if (e != cudaSuccess)
                        TRY(fm_errf(err, errlen, FM_ERR_OOM, "CUDA: cannot pin %.2f GiB of host memory for ram_budget: %s",
                                    (double)nr * (double)cm->slot_bytes / 1073741824.0, cudaGetErrorString(e)));
                }
                if (!lru_init(&cm->rl, nr, cm->n_keys)) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
            } else {
                cm->ram_resident = 0;
            }
            cm->chunk = FMC_CHUNK_MAX > K ? FMC_CHUNK_MAX : K;
            if (cm->chunk > nv) cm->chunk = (int32_t)nv;
            TRYC(cudaHostAlloc((void **)&cm->stage, (size_t)cm->chunk * cm->slot_bytes, cudaHostAllocDefault));
            int64_t max_chunks = (E + cm->chunk - 1) / cm->chunk;
            cm->ptr_cap = max_chunks * (int64_t)FMC_UBATCH * K;
            TRYC(cudaHostAlloc((void **)&cm->h_ptrs, (size_t)cm->ptr_cap * sizeof(void *), cudaHostAllocDefault));
            TRYC(cudaMalloc((void **)&cm->d_ptrs, (size_t)cm->ptr_cap * sizeof(void *)));
            TRYC(cudaHostAlloc((void **)&cm->h_topi, (size_t)FMC_UBATCH * K * sizeof(int32_t), cudaHostAllocDefault));
            {
                const size_t wb = (size_t)max_chunks * 3 * FMC_UBATCH * (size_t)K * sizeof(int32_t);
                TRYC(cudaHostAlloc((void **)&cm->h_mwork, wb, cudaHostAllocDefault));
                TRYC(cudaMalloc((void **)&cm->d_mwork, wb));
                cm->mcnt = (int32_t *)calloc((size_t)E, sizeof(int32_t));
                if (!cm->mcnt) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
            }
            cm->eptr = (const uint8_t **)calloc((size_t)E, sizeof(void *));
            cm->used = (int32_t *)calloc((size_t)E, sizeof(int32_t));
            cm->fds = (int *)malloc(sizeof(int) * (size_t)m->n_layers);
            if (!cm->eptr || !cm->used || !cm->fds) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
            for (int32_t il = 0; il < m->n_layers; il++) cm->fds[il] = -1;
            for (int32_t il = 0; il < m->n_layers; il++) {
                if (!m->files[il].path) continue;
                cm->fds[il] = open(m->files[il].path, O_RDONLY | O_CLOEXEC);
                if (cm->fds[il] < 0)
                    TRY(fm_errf(err, errlen, FM_ERR_IO, "%s: cannot open (%s)", m->files[il].path, strerror(errno)));
            }
            if (cm->has_ram) { /* CPU split buffers */
                TRYC(cudaHostAlloc((void **)&cm->h_xn, sizeof(float) * (size_t)m->H, cudaHostAllocDefault));
                TRYC(cudaHostAlloc((void **)&cm->h_topw, sizeof(float) * (size_t)K, cudaHostAllocDefault));
                TRYC(cudaHostAlloc((void **)&cm->h_ycpu, sizeof(float) * (size_t)m->H, cudaHostAllocDefault));
                TRYC(cudaMalloc((void **)&cm->d_ycpu, sizeof(float) * (size_t)m->H));
                cm->cg = (float *)malloc(sizeof(float) * (size_t)K * (size_t)m->moe_I);
                cm->cu = (float *)malloc(sizeof(float) * (size_t)K * (size_t)m->moe_I);
                cm->cy = (float *)malloc(sizeof(float) * (size_t)K * (size_t)m->H);
                cm->cblk = (const uint8_t **)calloc((size_t)K, sizeof(void *));
                cm->cpair = (int32_t *)calloc((size_t)K, sizeof(int32_t));
                if (!cm->cg || !cm->cu || !cm->cy || !cm->cblk || !cm->cpair)
                    TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
            }
            cm->io_threads = p->io_threads > 0 ? p->io_threads : (K > 8 ? K : 8);
            cm->pool = rpool_new(cm->io_threads, cm->chunk, cm->xs, (const char *const *)m->paths);
            if (!cm->pool) TRY(fm_errf(err, errlen, FM_ERR_OOM, "cannot start %d read threads", cm->io_threads));
            if (cm->resident) {
                TRY(preload(cm, 1, 0, err, errlen));
                const uint8_t **tab = (const uint8_t **)calloc((size_t)cm->n_keys, sizeof(void *));
                if (!tab) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
                for (int64_t k = 0; k < cm->n_keys; k++)
                    tab[k] = cm->vl.of[k] >= 0 ? cm->vram + (uint64_t)cm->vl.of[k] * cm->slot_bytes : NULL;
                cudaError_t e = cudaMalloc((void **)&cm->d_table, (size_t)cm->n_keys * sizeof(void *));
                if (e == cudaSuccess)
                    e = cudaMemcpy((void *)cm->d_table, tab, (size_t)cm->n_keys * sizeof(void *), cudaMemcpyHostToDevice);
                free(tab);
                TRYC(e);
            } else if (cm->has_ram && cm->ram_resident) {
                TRY(preload(cm, 0, 1, err, errlen));
            }
        }
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

/* ================================================================== session */

typedef struct {
    fmc_model *cm;
    int32_t n_ctx, nb;
    float **kc, **vc, **conv, **ssm;
    float *x, *xn, *qg, *q, *gate, *k, *v, *att, *qkv, *qkvc, *z, *ba, *bb, *o, *lr, *topw, *shg, *sho, *shs,
        *hb, *ye, *dg, *logits;
    int32_t *topi, *tok;
    int32_t *d_pos, *h_io;     /* graph decode: position on the device, pinned [token, pos] */
    cudaGraphExec_t gexec;     /* resident decode step captured once (embed .. lm_head) */
    int graph_failed;
    /* numerical guard: the first non-finite hidden state / logit of an eval (k_check_finite codes,
     * UINT64_MAX none) on the device, copied to pinned h_bad before the eval's last sync */
    unsigned long long *d_bad, *h_bad;
    fm_cuda_counters cnt;
} fmc_session;

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
    const int64_t cd = conv_dim(m), vd = (int64_t)m->lin_nv * m->lin_dv;
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
    c->cnt.ram_slots = cm->rl.n;
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
        cudaMemset(c->conv[i], 0, sizeof(float) * (size_t)(m->conv_k > 1 ? m->conv_k - 1 : 1) * (size_t)conv_dim(m));
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

typedef struct {
    fm_session *s;
    fmc_session *c;
    fmc_model *cm;
    fm_model *m;
    int64_t n;
    int32_t pos;
    int graph; /* capturing the decode graph: no host copies or syncs, position read from c->d_pos */
    int32_t chunk; /* index of this pass among the eval's passes of c->nb tokens (numerical guard) */
} fmc_ctx;

/* numerical guard: record a NaN/Inf among the n rows of `row` floats at v, seen after `sub` (-1 the
 * embedding, 0..n_layers-1 that layer, n_layers the logits; row t is token t_off + t of this pass),
 * in c->d_bad. One small kernel, no host sync (capturable: the code is fixed per graph). A MoE
 * layer's check is fused into its k_moe_combine (the residual add), the same code. */
static unsigned long long guard_code(const fmc_ctx *x, int32_t sub) {
    return ((unsigned long long)(uint32_t)x->chunk << 33) | ((unsigned long long)(uint32_t)(sub + 1) << 16);
}

static fm_status check_finite(fmc_ctx *x, const float *v, int64_t n, int64_t row, int32_t sub, int64_t t_off,
                              char *err, size_t errlen) {
    const int64_t tot = n * row;
    int64_t blocks = (tot + 255) / 256, cap = (int64_t)x->cm->sms * 2;
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    k_check_finite<<<(unsigned)blocks, 256, 0, x->cm->cs>>>(v, n, row, guard_code(x, sub), t_off, x->c->d_bad);
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
    CKS(launch_norm(st, 0, c->x, NULL, L->attn_norm, n, H, m->eps, m->norm_offset, c->xn, err, errlen));
    if (n == 1 && L->wq.kind == L->wk.kind && L->wq.kind == L->wv.kind) {
        const DMat *Ws[3] = {&L->wq, &L->wk, &L->wv};
        float *ys[3] = {c->qg, c->k, c->v};
        CKS(launch_mv_multi(st, sms, 3, Ws, ys, NULL, c->xn, err, errlen));
    } else {
        CKS(launch_mm(st, sms, L->wq, c->xn, H, n, c->qg, L->wq.rows, 0, err, errlen));
        CKS(launch_mm(st, sms, L->wk, c->xn, H, n, c->k, kvd, 0, err, errlen));
        CKS(launch_mm(st, sms, L->wv, c->xn, H, n, c->v, kvd, 0, err, errlen));
    }
    CKS(launch_attn(st, c->qg, c->k, c->v, L->q_norm, L->k_norm, c->q, c->gate, c->kc[si], c->vc[si], c->att, n, x->pos,
                    x->graph ? c->d_pos : NULL, m->n_heads, m->n_kv_heads, m->head_dim, m->rotary_dim, m->rope_theta, m->attn_gate, m->eps,
                    m->norm_offset, err, errlen));
    CKS(launch_mm(st, sms, L->wo, c->att, qd, n, c->x, H, 1, err, errlen));
    return FM_OK;
}

static fm_status op_attn_linear(void *vx, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)vx;
    fm_model *m = x->m;
    fmc_session *c = x->c;
    const cl_layer *L = &x->cm->L[il];
    cudaStream_t st = x->cm->cs;
    const int sms = x->cm->sms;
    const int64_t n = x->n, H = m->H, cd = conv_dim(m), vd = (int64_t)m->lin_nv * m->lin_dv;
    const int32_t si = m->layers[il].state_idx;
    CKS(launch_norm(st, 0, c->x, NULL, L->attn_norm, n, H, m->eps, m->norm_offset, c->xn, err, errlen));
    if (n == 1 && L->ssm_qkv.kind == L->ssm_z.kind && L->ssm_qkv.kind == L->ssm_b.kind &&
        L->ssm_qkv.kind == L->ssm_a.kind) {
        const DMat *Ws[4] = {&L->ssm_qkv, &L->ssm_z, &L->ssm_b, &L->ssm_a};
        float *ys[4] = {c->qkv, c->z, c->bb, c->ba};
        CKS(launch_mv_multi(st, sms, 4, Ws, ys, NULL, c->xn, err, errlen));
    } else {
        CKS(launch_mm(st, sms, L->ssm_qkv, c->xn, H, n, c->qkv, cd, 0, err, errlen));
        CKS(launch_mm(st, sms, L->ssm_z, c->xn, H, n, c->z, vd, 0, err, errlen));
        CKS(launch_mm(st, sms, L->ssm_b, c->xn, H, n, c->bb, m->lin_nv, 0, err, errlen));
        CKS(launch_mm(st, sms, L->ssm_a, c->xn, H, n, c->ba, m->lin_nv, 0, err, errlen));
    }
    k_conv<<<(unsigned)((cd + 127) / 128), 128, 0, st>>>(c->qkv, n, c->conv[si], L->ssm_conv, (int)cd, m->conv_k,
                                                         c->qkvc);
    CKL();
    CKS(launch_gdn(st, c->qkvc, c->z, c->ba, c->bb, L->A_log, L->dt_bias, L->ssm_norm, c->ssm[si], c->o, n, m->lin_nk,
                   m->lin_nv, m->lin_dk, m->lin_dv, m->eps, err, errlen));
    CKS(launch_mm(st, sms, L->ssm_out, c->o, vd, n, c->x, H, 1, err, errlen));
    return FM_OK;
}

static fm_status op_ffn_dense(void *vx, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)vx;
    fm_model *m = x->m;
    fmc_session *c = x->c;
    const cl_layer *L = &x->cm->L[il];
    cudaStream_t st = x->cm->cs;
    const int64_t n = x->n, H = m->H;
    CKS(launch_norm(st, 0, c->x, NULL, L->ffn_norm, n, H, m->eps, m->norm_offset, c->xn, err, errlen));
    CKS(launch_swiglu(st, x->cm->sms, L->ffn_gate, L->ffn_up, c->xn, H, n, c->dg, err, errlen));
    CKS(launch_mm(st, x->cm->sms, L->ffn_down, c->dg, m->dense_I, n, c->x, H, 1, err, errlen));
    return FM_OK;
}

/* prefill (n > 1): the routed experts grouped by expert on tensor cores. The host sorts a chunk's
 * pairs by expert id (counting sort, pairs ascending within an expert) into a permutation and a
 * work list of items {first, count <= 8*NT}: hw = [items (2 * nitems) | perm (np)]. Pairs with
 * hptrs[p] == NULL (not in this chunk) are left out. cnt: scratch [E]. */
static fm_status mma_work_build(const int32_t *ids, const uint8_t *const *hptrs, int64_t npairs, int64_t E,
                                int32_t *cnt, int32_t *hw, int *nt_out, int64_t *nitems_out, int64_t *np_out, char *err,
                                size_t errlen) {
    for (int64_t e = 0; e < E; e++) cnt[e] = 0;
    int64_t np = 0;
    for (int64_t p = 0; p < npairs; p++) {
        if (hptrs && !hptrs[p]) continue;
        const int32_t e = ids[p];
        if (e < 0 || e >= E) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: router produced expert id %d", e);
        cnt[e]++;
        np++;
    }
    int32_t maxc = 0;
    for (int64_t e = 0; e < E; e++)
        if (cnt[e] > maxc) maxc = cnt[e];
    const int nt = mma_nt(maxc), cap = 8 * nt;
    int64_t nitems = 0, run = 0;
    for (int64_t e = 0; e < E; e++) {
        const int32_t v = cnt[e];
        nitems += (v + cap - 1) / cap;
        cnt[e] = (int32_t)run; /* exclusive offsets */
        run += v;
    }
    int32_t *perm = hw + 2 * nitems;
    for (int64_t p = 0; p < npairs; p++) {
        if (hptrs && !hptrs[p]) continue;
        perm[cnt[ids[p]]++] = (int32_t)p; /* cnt[e] ends as the end of expert e */
    }
    int64_t it = 0, beg = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t end = cnt[e];
        for (int64_t f = beg; f < end; f += cap) {
            hw[2 * it] = (int32_t)f;
            hw[2 * it + 1] = (int32_t)(end - f < cap ? end - f : cap);
            it++;
        }
        beg = end;
    }
    *nt_out = nt;
    *nitems_out = nitems;
    *np_out = np;
    return FM_OK;
}

static int mma_experts_ok(const DPart &pg, const DPart &pu, const DPart &pd, int64_t H) {
    return mma_mat_ok(pg.kind, pg.cols, pg.gs) && pu.kind == pg.kind && pu.rows == pg.rows && pu.cols == pg.cols &&
           pu.gs == pg.gs && mma_mat_ok(pd.kind, pd.cols, pd.gs) && pd.cols == pg.rows && pg.cols == H;
}

/* dw: the device copy of a work list (mma_work_build). gate + up: Hbuf[p*I + r] = silu(g) * u from
 * row p / K of xn [., H]; down: Ye[p*H + r] from Hbuf[p]. Each block reads one row tile of one
 * expert once for all of its item's pairs. */
static fm_status mma_launch_experts(cudaStream_t st, const uint8_t *const *dptrs, const int32_t *dw, int64_t nitems,
                                    int nt, const DPart &pg, const DPart &pu, const DPart &pd, int K, int64_t H,
                                    const float *xn, float *hb, float *ye, char *err, size_t errlen) {
    if (nitems <= 0) return FM_OK;
    if (nitems > 65535) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: %lld expert work items", (long long)nitems);
    MmaArgs a;
    memset(&a, 0, sizeof a);
    a.ptrs = dptrs;
    a.items = dw;
    a.perm = dw + 2 * nitems;
    a.PA = pg;
    a.PB = pu;
    a.in_div = K;
    a.X = xn;
    a.ldx = H;
    a.Y = hb;
    a.ldy = pg.rows;
    dim3 g1((unsigned)((pg.rows + FMC_MMA_ROWS / 2 - 1) / (FMC_MMA_ROWS / 2)), (unsigned)nitems);
    CKS(mma_launch<1>(st, a, pg.kind, nt, g1, err, errlen));
    a.PA = a.PB = pd;
    a.in_div = 1;
    a.X = hb;
    a.ldx = pd.cols;
    a.Y = ye;
    a.ldy = pd.rows;
    dim3 g2((unsigned)((pd.rows + FMC_MMA_ROWS - 1) / FMC_MMA_ROWS), (unsigned)nitems);
    CKS(mma_launch<0>(st, a, pd.kind, nt, g2, err, errlen));
    return FM_OK;
}

/* the work list goes up in one copy from this chunk's region of the pinned cm->h_mwork; a region is
 * rewritten only after the host has synced past the copy that read it (the next layer's ev_topi
 * wait, or the stream sync below) */
static fm_status launch_experts_grouped(fmc_ctx *x, const cl_layer *L, const uint8_t *const *dptrs,
                                        const uint8_t *const *hptrs, int64_t ci, int64_t npairs, char *err,
                                        size_t errlen) {
    fm_model *m = x->m;
    fmc_session *c = x->c;
    fmc_model *cm = x->cm;
    cudaStream_t st = cm->cs;
    if (!hptrs) { /* resident: the routed ids live on the device only */
        CK(cudaMemcpyAsync(cm->h_topi, c->topi, sizeof(int32_t) * (size_t)npairs, cudaMemcpyDeviceToHost, st));
        CK(cudaStreamSynchronize(st));
        c->cnt.syncs++;
    }
    const int64_t reg = 3 * (int64_t)FMC_UBATCH * m->k_tok;
    int32_t *hw = cm->h_mwork + ci * reg, *dw = cm->d_mwork + ci * reg;
    int nt = 1;
    int64_t nitems = 0, np = 0;
    CKS(mma_work_build(cm->h_topi, hptrs, npairs, m->n_experts, cm->mcnt, hw, &nt, &nitems, &np, err, errlen));
    if (!np) return FM_OK;
    CK(cudaMemcpyAsync(dw, hw, sizeof(int32_t) * (size_t)(2 * nitems + np), cudaMemcpyHostToDevice, st));
    return mma_launch_experts(st, dptrs, dw, nitems, nt, L->pg, L->pu, L->pd, m->k_tok, m->H, c->xn, c->hb, c->ye, err,
                              errlen);
}

/* the routed experts of npairs (token, k) pairs; dptrs: device pointer per pair (NULL: not in
 * this chunk). Prefill (n > 1) goes grouped by expert (launch_experts_grouped); hptrs: the host
 * copy of this chunk's pointers (cached tiers; NULL: resident, ids read back here), ci: chunk */
/* grids of the gate+up and down expert kernels for n experts (blockIdx.y): a pair's rows spread
 * over fewer blocks when many pairs run at once */
static void expert_grids(const cl_layer *L, int sms, int64_t n, dim3 *gu, dim3 *gd) {
    dim3 g1 = mv_grid(L->pg.rows, 2, sms), g2 = mv_grid(L->pd.rows, FMC_MV_R, sms);
    const int64_t want = (int64_t)sms * 8;
    if ((int64_t)g1.x * n > want) g1.x = (unsigned)((want + n - 1) / n);
    if ((int64_t)g2.x * n > want) g2.x = (unsigned)((want + n - 1) / n);
    if (g1.x < 1) g1.x = 1;
    if (g2.x < 1) g2.x = 1;
    g1.y = g2.y = (unsigned)n;
    *gu = g1;
    *gd = g2;
}

static fm_status launch_experts(fmc_ctx *x, const cl_layer *L, const uint8_t *const *dptrs,
                                const uint8_t *const *hptrs, int64_t ci, int64_t npairs, char *err, size_t errlen) {
    fm_model *m = x->m;
    fmc_session *c = x->c;
    cudaStream_t st = x->cm->cs;
    const int K = m->k_tok;
    if (x->n > 1 && !x->graph && x->cm->mcnt && mma_enabled() && mma_experts_ok(L->pg, L->pu, L->pd, m->H))
        return launch_experts_grouped(x, L, dptrs, hptrs, ci, npairs, err, errlen);
    dim3 gg, gd;
    expert_grids(L, x->cm->sms, npairs, &gg, &gd);
#define LG(KD) k_moe_gateup<KD><<<gg, FMC_WARPS * 32, 0, st>>>(L->pg, L->pu, dptrs, K, c->xn, m->H, c->hb)
#define LD(KD) k_moe_down<KD><<<gd, FMC_WARPS * 32, 0, st>>>(L->pd, dptrs, c->hb, c->ye)
    KIND_SWITCH(L->pg.kind, LG)
    CKL();
    KIND_SWITCH(L->pd.kind, LD)
    CKL();
#undef LG
#undef LD
    return FM_OK;
}

/* ---- the CPU share of a layer's missed experts (decode, one token) ----
 * y_cpu = sum_j w_j * down_j(silu(gate_j x) * up_j x) over the experts in cm->cblk, straight from
 * the pinned host cache, on the model's fm_pool (the same kernels and views as the CPU backend) */
typedef struct {
    const fm_part *parts;
    const uint8_t *const *blk;
    const float *x;
    float *g, *u, *y;
    int64_t I, H;
} cpu_job;

static void cpu_job_gu(void *ctx, int64_t s, int64_t e, int32_t tid) {
    (void)tid;
    cpu_job *j = (cpu_job *)ctx;
    const int64_t I = j->I;
    while (s < e) {
        const int64_t c = s / (2 * I), r = s % (2 * I);
        const int up = r >= I;
        const int64_t r0 = up ? r - I : r;
        const int64_t end = c * 2 * I + (up ? 2 * I : I);
        const int64_t r1 = r0 + ((e < end ? e : end) - s);
        const fm_qmat w = fm_part_view(&j->parts[up ? FM_PART_UP : FM_PART_GATE], j->blk[c]);
        fm_qmat_matvec_rows(&w, j->x, (up ? j->u : j->g) + c * I, r0, r1);
        s += r1 - r0;
    }
}

static void cpu_job_down(void *ctx, int64_t s, int64_t e, int32_t tid) {
    (void)tid;
    cpu_job *j = (cpu_job *)ctx;
    const int64_t H = j->H;
    while (s < e) {
        const int64_t c = s / H, r0 = s % H;
        const int64_t end = (c + 1) * H;
        const int64_t r1 = r0 + ((e < end ? e : end) - s);
        const fm_qmat w = fm_part_view(&j->parts[FM_PART_DOWN], j->blk[c]);
        fm_qmat_matvec_rows(&w, j->g + c * j->I, j->y + c * H, r0, r1);
        s += r1 - r0;
    }
}

static int64_t cpu_grain(const fm_part *p) {
    const int64_t bits = p->dt == FM_DT_F32 ? 32 : p->dt == FM_DT_BF16 ? 16 : p->bits;
    int64_t rb = p->cols * bits / 8 + 1;
    if (p->dt == FM_DT_AFFINE && p->group_size > 0) rb += p->cols / p->group_size * 4;
    const int64_t g = 16384 / rb;
    return g < 4 ? 4 : g;
}

/* the nc experts of cm->cblk on the host: cm->cy[j*H..] = expert j's output (unweighted) */
static void cpu_experts(fmc_model *cm, const fm_layer *FL, int64_t nc, const float *xn) {
    fm_model *m = cm->m;
    const int64_t I = FL->parts[FM_PART_GATE].rows, H = m->H;
    cpu_job j = {FL->parts, cm->cblk, xn, cm->cg, cm->cu, cm->cy, I, H};
    fm_pool_for(m->pool, nc * 2 * I, cpu_grain(&FL->parts[FM_PART_GATE]), cpu_job_gu, &j);
    for (int64_t i = 0; i < nc * I; i++) cm->cg[i] = fm_silu(cm->cg[i]) * cm->cu[i];
    fm_pool_for(m->pool, nc * H, cpu_grain(&FL->parts[FM_PART_DOWN]), cpu_job_down, &j);
}

/* how many of a layer's misses the CPU takes: m_ram of them are in the pinned host cache (the only
 * ones the CPU can take), m_other come from storage (always the GPU's). split > 0: that fraction of
 * m_ram; split < 0 (auto): both sides finish at once when the CPU takes a share rate_cpu /
 * (rate_cpu + rate_h2d) of all the missed bytes. */
static int64_t split_count(double split, double rate_h2d, double rate_cpu, int64_t m_ram, int64_t m_other,
                           int probe) {
    if (split == 0.0 || m_ram <= 0) return 0;
    double want;
    if (split > 0.0) {
        want = split * (double)m_ram;
    } else if (rate_h2d <= 0.0 || rate_cpu <= 0.0) {
        want = 1.0; /* a rate not measured yet: one expert on the host measures both sides */
    } else {
        want = (double)(m_ram + m_other) * rate_cpu / (rate_cpu + rate_h2d);
        /* a share under 2 experts does not pay for itself: its result still has to cross PCIe
         * after the host's fixed costs, and on the H100 machine such shares made decode slower
         * than PCIe alone (bench/RESULTS.md). Off then, except a 1-expert probe (probe != 0) that
         * keeps rate_cpu current, so the split comes back when the host is fast again. */
        if (want < 1.5) want = probe ? 1.0 : 0.0;
    }
    int64_t n = (int64_t)(want + 0.5);
    if (n < 0) n = 0;
    if (n > m_ram) n = m_ram;
    return n;
}

static void ema(double *r, double sample) {
    if (!(sample > 0.0) || !isfinite(sample)) return;
    *r = *r > 0.0 ? 0.75 * *r + 0.25 * sample : sample;
}

/* first auto-split layer: time a few blocks of the pinned cache over PCIe and on the CPU pool
 * (the online EMAs refine both afterwards) */
static fm_status split_calibrate(fmc_model *cm, fmc_session *c, int32_t il, const fm_layer *FL, char *err,
                                 size_t errlen) {
    (void)c;
    cm->calibrated = 1;
    fm_model *m = cm->m;
    const int64_t E = m->n_experts, cap = m->k_tok < 4 ? m->k_tok : 4;
    const uint64_t bb = FL->block_bytes;
    int64_t nb = 0;
    for (int64_t sl = 0; sl < cm->rl.n && nb < cap; sl++) {
        const int64_t key = cm->rl.key[sl];
        if (key >= 0 && key / E == il) cm->cblk[nb++] = rslot_ptr(cm, sl);
    }
    if (nb < 1) return FM_OK; /* nothing of this layer pinned yet: the online rates decide */
    void *d = NULL;
    CK(cudaMalloc(&d, (size_t)nb * bb));
    float best = 0.f;
    cudaError_t e = cudaSuccess;
    for (int rep = 0; rep < 3 && e == cudaSuccess; rep++) {
        cudaEventRecord(cm->ev_t0, cm->xs);
        for (int64_t i = 0; i < nb; i++)
            cudaMemcpyAsync((uint8_t *)d + (uint64_t)i * bb, cm->cblk[i], bb, cudaMemcpyHostToDevice, cm->xs);
        cudaEventRecord(cm->ev_t1, cm->xs);
        e = cudaEventSynchronize(cm->ev_t1);
        float ms = 0.f;
        if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, cm->ev_t0, cm->ev_t1);
        if (e == cudaSuccess && ms > 0.f && (best == 0.f || ms < best)) best = ms;
    }
    cudaFree(d);
    CK(e);
    if (best > 0.f) cm->rate_h2d = (double)((uint64_t)nb * bb) / (double)best;
    double bc = 0.0;
    for (int rep = 0; rep < 3; rep++) {
        const double t0 = fm_now_ms();
        cpu_experts(cm, FL, nb, cm->h_xn);
        const double ms = fm_now_ms() - t0;
        if (rep > 0 && (bc == 0.0 || ms < bc)) bc = ms;
    }
    if (bc > 0.0) cm->rate_cpu = (double)((uint64_t)nb * bb) / bc;
    return FM_OK;
}

/* the host's share of a decode layer's misses (cm->cblk / cm->cpair, ncpu of them): the experts on
 * the CPU pool, then their weighted sum into h_ycpu */
static void host_share_compute(fmc_model *cm, const fm_layer *FL, int64_t ncpu) {
    const int64_t H = cm->m->H;
    cpu_experts(cm, FL, ncpu, cm->h_xn);
    for (int64_t d = 0; d < H; d++) cm->h_ycpu[d] = 0.f;
    for (int64_t j = 0; j < ncpu; j++) {
        const float w = cm->cpair[j] >= 0 ? cm->h_topw[cm->cpair[j]] : 0.f;
        const float *src = cm->cy + j * H;
        for (int64_t d = 0; d < H; d++) cm->h_ycpu[d] += w * src[d];
    }
}

static void *split_main(void *arg) {
    fmc_model *cm = (fmc_model *)arg;
    pthread_mutex_lock(&cm->sw_mu);
    for (;;) {
        while (!cm->sw_stop && !cm->sw_job) pthread_cond_wait(&cm->sw_cv, &cm->sw_mu);
        if (cm->sw_stop) break;
        const fm_layer *FL = cm->sw_FL;
        const int64_t ncpu = cm->sw_ncpu;
        pthread_mutex_unlock(&cm->sw_mu);
        const double t0 = fm_now_ms();
        host_share_compute(cm, FL, ncpu);
        const double ms = fm_now_ms() - t0;
        pthread_mutex_lock(&cm->sw_mu);
        cm->sw_ms = ms;
        cm->sw_job = 0;
        cm->sw_done = 1;
        pthread_cond_broadcast(&cm->sw_cv);
    }
    pthread_mutex_unlock(&cm->sw_mu);
    return NULL;
}

/* the host share on the calling thread, now */
static void host_share_inline(fmc_model *cm, const fm_layer *FL, int64_t ncpu) {
    const double t0 = fm_now_ms();
    host_share_compute(cm, FL, ncpu);
    cm->sw_ms = fm_now_ms() - t0;
    cm->sw_done = 1;
}

/* start the host share on the split worker (inline, now, if the worker cannot start) */
static void host_share_start(fmc_model *cm, const fm_layer *FL, int64_t ncpu) {
    if (cm->sw_state == 0) {
        pthread_mutex_init(&cm->sw_mu, NULL);
        pthread_cond_init(&cm->sw_cv, NULL);
        if (pthread_create(&cm->sw_th, NULL, split_main, cm) == 0) {
            cm->sw_state = 1;
        } else {
            pthread_mutex_destroy(&cm->sw_mu);
            pthread_cond_destroy(&cm->sw_cv);
            cm->sw_state = -1;
        }
    }
    if (cm->sw_state != 1) {
        host_share_inline(cm, FL, ncpu);
        return;
    }
    pthread_mutex_lock(&cm->sw_mu);
    cm->sw_FL = FL;
    cm->sw_ncpu = ncpu;
    cm->sw_done = 0;
    cm->sw_job = 1;
    pthread_cond_broadcast(&cm->sw_cv);
    pthread_mutex_unlock(&cm->sw_mu);
}

/* wait for the host share, then queue its sum for the combine (d_ycpu) and set the pairs' bits */
static fm_status host_share_finish(fmc_ctx *x, const fm_layer *FL, int64_t ncpu, uint32_t *hostmask,
                                   const float **ycpu, char *err, size_t errlen) {
    fmc_model *cm = x->cm;
    fmc_session *c = x->c;
    if (cm->sw_state == 1 && !cm->sw_done) {
        pthread_mutex_lock(&cm->sw_mu);
        while (!cm->sw_done) pthread_cond_wait(&cm->sw_cv, &cm->sw_mu);
        pthread_mutex_unlock(&cm->sw_mu);
    }
    cm->sw_done = 0;
    const double ms = cm->sw_ms;
    for (int64_t j = 0; j < ncpu; j++)
        if (cm->cpair[j] >= 0 && cm->cpair[j] < 32) *hostmask |= 1u << cm->cpair[j];
    ema(&cm->rate_cpu, (double)((uint64_t)ncpu * FL->block_bytes) / ms);
    c->cnt.cpu_experts += ncpu;
    c->cnt.cpu_layers++;
    c->cnt.cpu_ms += ms;
    CK(cudaMemcpyAsync(cm->d_ycpu, cm->h_ycpu, sizeof(float) * (size_t)x->m->H, cudaMemcpyHostToDevice, cm->cs));
    *ycpu = cm->d_ycpu;
    return FM_OK;
}

/* the host share, start to finish (the prefill-era chunk loop: nothing to overlap it with there) */
static fm_status host_share(fmc_ctx *x, const fm_layer *FL, int64_t ncpu, uint32_t *hostmask, const float **ycpu,
                            char *err, size_t errlen) {
    host_share_start(x->cm, FL, ncpu);
    return host_share_finish(x, FL, ncpu, hostmask, ycpu, err, errlen);
}

/* decode experts whose VRAM blocks are in S (cnt members), on the compute stream */
static fm_status launch_dec(fmc_ctx *x, const cl_layer *L, const PairSet *S, int cnt, char *err, size_t errlen) {
    if (cnt <= 0) return FM_OK;
    fmc_session *c = x->c;
    cudaStream_t st = x->cm->cs;
    dim3 g1, g2;
    expert_grids(L, x->cm->sms, cnt, &g1, &g2);
#define LG(KD) k_dec_gateup<KD><<<g1, FMC_WARPS * 32, 0, st>>>(L->pg, L->pu, *S, c->xn, c->hb)
#define LD(KD) k_dec_down<KD><<<g2, FMC_WARPS * 32, 0, st>>>(L->pd, *S, c->hb, c->ye)
    KIND_SWITCH(L->pg.kind, LG)
    CKL();
    KIND_SWITCH(L->pd.kind, LD)
    CKL();
#undef LG
#undef LD
    return FM_OK;
}

/* queue the read of layer il's expert e from storage (task nt of the read pool): into a pinned
 * host-cache slot when there is a host tier (the block stays cached), else into staging slot nt;
 * the worker then copies it to the VRAM slot ddst */
static fm_status queue_read(fmc_model *cm, int32_t il, int64_t e, uint8_t *ddst, int64_t ep, int *nt, char *err,
                            size_t errlen) {
    const fm_model *m = cm->m;
    const uint64_t bb = m->layers[il].block_bytes;
    rtask *t = &cm->pool->tasks[*nt];
    if (cm->has_ram) {
        const int64_t rs = lru_take(&cm->rl, (int64_t)il * m->n_experts + e, ep);
        if (rs < 0) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no free pinned expert slot");
        t->dst = rslot_ptr(cm, rs);
    } else {
        t->dst = cm->stage + (uint64_t)*nt * cm->slot_bytes;
    }
    t->fd = cm->fds[il];
    t->off = m->files[il].data_offset + (uint64_t)e * bb;
    t->len = bb;
    t->ddst = ddst;
    t->il = il;
    t->e = (int32_t)e;
    (*nt)++;
    return FM_OK;
}

/* run the nt queued reads of layer il; on failure the slots assigned to them hold garbage and are
 * forgotten */
static fm_status run_reads(fmc_ctx *x, int32_t il, int nt, char *err, size_t errlen) {
    fmc_model *cm = x->cm;
    const double tr = fm_now_ms();
    const fm_status rst = rpool_run(cm->pool, nt, err, errlen);
    x->s->st.ms_io_wait += fm_now_ms() - tr;
    if (rst != FM_OK) {
        for (int i = 0; i < nt; i++) {
            const int64_t key = (int64_t)il * x->m->n_experts + cm->pool->tasks[i].e;
            if (cm->vl.of[key] >= 0) { cm->vl.key[cm->vl.of[key]] = -1; cm->vl.of[key] = -1; }
            if (cm->has_ram && cm->rl.of[key] >= 0) { cm->rl.key[cm->rl.of[key]] = -1; cm->rl.of[key] = -1; }
        }
    }
    return rst;
}

/* a layer's tier counts: vh VRAM hits, rh pinned-cache hits (copied or computed on the host),
 * sr storage reads; copied = blocks that crossed PCIe */
static void count_tiers(fmc_ctx *x, int64_t vh, int64_t rh, int64_t sr, int64_t copied, uint64_t bb) {
    fmc_session *c = x->c;
    c->cnt.vram_hits += vh;
    c->cnt.ram_hits += rh;
    c->cnt.storage_reads += sr;
    c->cnt.h2d_bytes += (int64_t)((uint64_t)copied * bb);
    x->s->st.expert_hits_vram += vh;
    x->s->st.last_expert_hits += rh;
    x->s->st.last_expert_loads += sr;
    x->s->st.last_bytes_read += (int64_t)((uint64_t)sr * bb);
}

/* the copies / reads of a decode layer's misses that the GPU takes (moe_decode_cached) */
typedef struct {
    int64_t rh, sr;
    int nstore;
    PairSet ss; /* the misses read from storage */
} dec_miss;

static fm_status dec_issue_misses(fmc_ctx *x, int32_t il, const int32_t *list, const int32_t *pair_of, int64_t nu,
                                  int64_t ep, dec_miss *dm, char *err, size_t errlen) {
    fm_model *m = x->m;
    fmc_model *cm = x->cm;
    const cl_layer *L = &cm->L[il];
    const int64_t E = m->n_experts;
    const uint64_t bb = m->layers[il].block_bytes;
    int nt = 0, ng = 0;
    CK(cudaEventRecord(cm->ev_t0, cm->xs));
    for (int64_t i = 0; i < nu; i++) {
        const int64_t e = list[i], key = (int64_t)il * E + e;
        if (cm->eptr[e]) continue; /* a hit, or the host's */
        const int64_t vs = lru_take(&cm->vl, key, ep);
        if (vs < 0) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no free VRAM expert slot");
        uint8_t *dst = cm->vram + (uint64_t)vs * cm->slot_bytes;
        cm->eptr[e] = dst;
        const int64_t rs0 = cm->has_ram ? cm->rl.of[key] : -1;
        if (rs0 >= 0) { /* pinned host cache -> VRAM, then its compute behind its own event */
            lru_touch(&cm->rl, rs0, ep);
            CK(cudaMemcpyAsync(dst, rslot_ptr(cm, rs0), bb, cudaMemcpyHostToDevice, cm->xs));
            CK(cudaEventRecord(cm->ev_grp[ng], cm->xs));
            CK(cudaStreamWaitEvent(cm->cs, cm->ev_grp[ng], 0));
            ng++;
            PairSet one;
            one.p[0] = dst;
            one.pair[0] = pair_of[i];
            CKS(launch_dec(x, L, &one, 1, err, errlen));
            dm->rh++;
            continue;
        }
        CKS(queue_read(cm, il, e, dst, ep, &nt, err, errlen));
        dm->ss.p[dm->nstore] = dst;
        dm->ss.pair[dm->nstore++] = pair_of[i];
        dm->sr++;
    }
    CKS(run_reads(x, il, nt, err, errlen));
    CK(cudaEventRecord(cm->ev_copy, cm->xs));
    CK(cudaEventRecord(cm->ev_t1, cm->xs));
    if (dm->nstore) {
        CK(cudaStreamWaitEvent(cm->cs, cm->ev_copy, 0));
        CKS(launch_dec(x, L, &dm->ss, dm->nstore, err, errlen));
    }
    return FM_OK;
}

/* One decode layer's routed experts with a VRAM cache (not resident), the nu distinct experts in
 * list (nu <= K <= FMC_PSET, one token):
 *   hits: computed at once (they overlap the copies);
 *   the CPU share (try_split) of the misses in the pinned host cache: started first, on the split
 *   worker thread, so the host computes while the main thread queues the GPU's part;
 *   other misses in the pinned host cache: each copied on the copy stream, its compute queued behind
 *   an event on its own copy, so the GPU works through the misses as they land and only the last
 *   one's compute trails the copies;
 *   misses from storage: pread by the pool (each worker queues its copy), computed after the last.
 * Still one host sync (the routed ids) per layer. */
static fm_status moe_decode_cached(fmc_ctx *x, int32_t il, const int32_t *list, int64_t nu, int try_split,
                                   uint32_t *hostmask, const float **ycpu, char *err, size_t errlen) {
    fm_model *m = x->m;
    fmc_model *cm = x->cm;
    const fm_layer *FL = &m->layers[il];
    const cl_layer *L = &cm->L[il];
    const int64_t E = m->n_experts;
    const int32_t K = m->k_tok;
    const uint64_t bb = FL->block_bytes;
    const int64_t ep = ++cm->epoch;
    static const uint8_t host_mark = 0;
    int32_t pair_of[FMC_PSET];
    for (int64_t i = 0; i < nu; i++) {
        pair_of[i] = 0;
        for (int32_t p = 0; p < K; p++)
            if (cm->h_topi[p] == list[i]) pair_of[i] = p;
    }
    /* hits first (touched now, so no slot in use is evicted below) */
    PairSet hs;
    int nh = 0;
    int64_t m_ram = 0, m_other = 0;
    for (int64_t i = 0; i < nu; i++) {
        const int64_t key = (int64_t)il * E + list[i];
        const int64_t vs = cm->vl.of[key];
        if (vs >= 0) {
            lru_touch(&cm->vl, vs, ep);
            cm->eptr[list[i]] = cm->vram + (uint64_t)vs * cm->slot_bytes;
            hs.p[nh] = cm->eptr[list[i]];
            hs.pair[nh++] = pair_of[i];
        } else if (cm->has_ram && cm->rl.of[key] >= 0) {
            m_ram++;
        } else {
            m_other++;
        }
    }
    /* the host's share: chosen, then started before anything else is queued */
    const int64_t ncpu_want =
        try_split ? split_count(cm->split, cm->rate_h2d, cm->rate_cpu, m_ram, m_other, (++cm->split_calls & 63) == 0)
                  : 0;
    int64_t ncpu = 0;
    for (int64_t i = 0; i < nu && ncpu < ncpu_want; i++) {
        const int64_t e = list[i], key = (int64_t)il * E + e;
        if (cm->eptr[e] || cm->rl.of[key] < 0) continue;
        lru_touch(&cm->rl, cm->rl.of[key], ep);
        cm->cblk[ncpu] = rslot_ptr(cm, cm->rl.of[key]);
        cm->cpair[ncpu++] = pair_of[i];
        cm->eptr[e] = &host_mark;
    }
    /* FM_CUDA_SPLIT_THREAD=1: the host share starts on the split worker before the GPU's part is
     * queued; default (0): on this thread after it (measured faster on the H100 machine: with the
     * worker, the compute pool's 16 threads plus this one oversubscribe the 16 cores and a
     * descheduled pool thread stalls the share; bench/RESULTS.md) */
    const int async = cm->split_async;
    if (ncpu > 0 && async) host_share_start(cm, FL, ncpu);
    dec_miss dm;
    memset(&dm, 0, sizeof dm);
    fm_status st = launch_dec(x, L, &hs, nh, err, errlen);
    if (st == FM_OK) st = dec_issue_misses(x, il, list, pair_of, nu, ep, &dm, err, errlen);
    for (int64_t i = 0; i < nu; i++) cm->eptr[list[i]] = NULL;
    if (ncpu > 0 && !async) {
        if (st != FM_OK) return st;
        host_share_inline(cm, FL, ncpu);
    }
    /* the worker must be done with this layer's buffers before anything returns */
    if (ncpu > 0) {
        char e2[256];
        fm_status s2 = host_share_finish(x, FL, ncpu, hostmask, ycpu, e2, sizeof e2);
        if (st == FM_OK && s2 != FM_OK) return fm_errf(err, errlen, s2, "%s", e2);
    }
    if (st != FM_OK) return st;
    const int64_t rh = dm.rh + ncpu, sr = dm.sr;
    cm->t_bytes = (uint64_t)(dm.rh + sr) * bb;
    cm->t_pending = cm->t_bytes > 0;
    count_tiers(x, nh, rh, sr, dm.rh + sr, bb);
    return FM_OK;
}

static fm_status op_moe(void *vx, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)vx;
    fm_model *m = x->m;
    fmc_session *c = x->c;
    fmc_model *cm = x->cm;
    const fm_layer *FL = &m->layers[il];
    const cl_layer *L = &cm->L[il];
    cudaStream_t st = cm->cs;
    const int sms = cm->sms;
    const int64_t n = x->n, H = m->H, E = m->n_experts;
    const int32_t K = m->k_tok;
    const int64_t npairs = n * K;
    CKS(launch_norm(st, 0, c->x, NULL, L->ffn_norm, n, H, m->eps, m->norm_offset, c->xn, err, errlen));
    CKS(launch_mm(st, sms, L->router, c->xn, H, n, c->lr, E, 0, err, errlen));
    k_route<<<(unsigned)n, 32, sizeof(float) * (size_t)E, st>>>(c->lr, (int)E, K, m->norm_topk, c->topi, c->topw);
    CKL();
    /* CPU split possible: decode, pinned host tier; the layer's normalized input and routing weights
     * come back with the routed ids (one sync) */
    const int try_split = !cm->resident && n == 1 && K <= 32 && cm->has_ram && cm->split != 0.0 && !x->graph;
    if (!cm->resident) {
        CK(cudaMemcpyAsync(cm->h_topi, c->topi, sizeof(int32_t) * (size_t)npairs, cudaMemcpyDeviceToHost, st));
        if (try_split) {
            CK(cudaMemcpyAsync(cm->h_topw, c->topw, sizeof(float) * (size_t)K, cudaMemcpyDeviceToHost, st));
            CK(cudaMemcpyAsync(cm->h_xn, c->xn, sizeof(float) * (size_t)H, cudaMemcpyDeviceToHost, st));
        }
        CK(cudaEventRecord(cm->ev_topi, st));
    }
    uint32_t hostmask = 0; /* combine: bit k = pair k computed on the host (decode) */
    const float *ycpu = NULL;
    /* shared expert: queued now, runs while the host waits for the ids and the copies fly */
    if (FL->has_shexp) {
        CKS(launch_swiglu(st, sms, L->sh_gate, L->sh_up, c->xn, H, n, c->shg, err, errlen));
        CKS(launch_mm(st, sms, L->sh_down, c->shg, m->sh_I, n, c->sho, H, 0, err, errlen));
        CKS(launch_mm(st, sms, L->sh_router, c->xn, H, n, c->shs, 1, 0, err, errlen));
    }
    if (cm->resident) {
        k_fill_ptrs<<<(unsigned)((npairs + 255) / 256), 256, 0, st>>>(c->topi, npairs, cm->d_table + (int64_t)il * E,
                                                                      cm->d_ptrs);
        CKL();
        CKS(launch_experts(x, L, cm->d_ptrs, NULL, 0, npairs, err, errlen));
        c->cnt.vram_hits += npairs;
        x->s->st.expert_hits_vram += npairs;
    } else {
        double tw = fm_now_ms();
        CK(cudaEventSynchronize(cm->ev_topi));
        c->cnt.syncs++;
        x->s->st.ms_io_wait += fm_now_ms() - tw;
        if (cm->t_pending) { /* the previous layer's copies are done: their PCIe rate */
            float ms = 0.f;
            if (cudaEventElapsedTime(&ms, cm->ev_t0, cm->ev_t1) == cudaSuccess && ms > 0.f)
                ema(&cm->rate_h2d, (double)cm->t_bytes / (double)ms);
            cudaGetLastError();
            cm->t_pending = 0;
        }
        if (try_split && cm->split < 0.0 && !cm->calibrated) CKS(split_calibrate(cm, c, il, FL, err, errlen));
        /* union of the routed experts, ascending */
        int64_t nu = 0;
        int32_t *list = cm->used; /* reuse as a list after marking */
        for (int64_t e = 0; e < E; e++) cm->eptr[e] = NULL;
        /* mark with a non-NULL sentinel */
        static const uint8_t mark = 0;
        for (int64_t p = 0; p < npairs; p++) {
            int32_t e = cm->h_topi[p];
            if (e < 0 || e >= E) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: router produced expert id %d", e);
            cm->eptr[e] = &mark;
        }
        for (int64_t e = 0; e < E; e++)
            if (cm->eptr[e]) {
                list[nu++] = (int32_t)e;
                cm->eptr[e] = NULL;
            }
        const uint64_t bb = FL->block_bytes;
        /* decode: the pipelined path (hits at once, each copied miss as soon as it lands); the chunk
         * loop below serves prefill (and FM_CUDA_PIPE=0, for comparison) */
        const char *pv = getenv("FM_CUDA_PIPE");
        const int pipe = n == 1 && npairs <= FMC_PSET && nu <= cm->chunk && !(pv && pv[0] == '0');
        if (pipe) CKS(moe_decode_cached(x, il, list, nu, try_split, &hostmask, &ycpu, err, errlen));
        int64_t ci = 0;
        for (int64_t c0 = 0; !pipe && c0 < nu; c0 += cm->chunk, ci++) {
            const int64_t nc = nu - c0 < cm->chunk ? nu - c0 : cm->chunk;
            const int64_t ep = ++cm->epoch;
            if (c0 > 0) { /* staging / pinned slots of the previous chunk may still be in flight */
                double t0 = fm_now_ms();
                CK(cudaEventSynchronize(cm->ev_copy));
                c->cnt.syncs++;
                x->s->st.ms_io_wait += fm_now_ms() - t0;
                /* the previous chunk's experts may still read the slots this chunk overwrites */
                CK(cudaEventRecord(cm->ev_comp, st));
                CK(cudaStreamWaitEvent(cm->xs, cm->ev_comp, 0));
            }
            /* first chunk: every kernel that reads expert slots was queued before ev_topi, which has
             * completed; the copies need not wait for the shared expert */
            CK(cudaEventRecord(cm->ev_t0, cm->xs));
            /* pass 1: hits (touch first so that no slot in use is evicted) */
            for (int64_t i = 0; i < nc; i++) {
                const int64_t e = list[c0 + i], key = (int64_t)il * E + e;
                const int64_t vs = cm->vl.of[key];
                if (vs >= 0) {
                    lru_touch(&cm->vl, vs, ep);
                    cm->eptr[e] = cm->vram + (uint64_t)vs * cm->slot_bytes;
                }
            }
            int nt = 0;
            int64_t vh = 0, rh = 0, sr = 0;
            /* CPU share: decode, one chunk; taken from the misses found in the pinned host cache */
            int64_t ncpu = 0, ncpu_want = 0;
            if (try_split && c0 == 0 && nc == nu) {
                int64_t m_ram = 0, m_other = 0;
                for (int64_t i = 0; i < nc; i++) {
                    const int64_t e = list[i], key = (int64_t)il * E + e;
                    if (cm->eptr[e]) continue;
                    if (cm->rl.of[key] >= 0) m_ram++;
                    else m_other++;
                }
                ncpu_want = split_count(cm->split, cm->rate_h2d, cm->rate_cpu, m_ram, m_other,
                                        (++cm->split_calls & 63) == 0);
            }
            for (int64_t i = 0; i < nc; i++) {
                const int64_t e = list[c0 + i], key = (int64_t)il * E + e;
                if (cm->eptr[e]) {
                    vh++;
                    continue;
                }
                if (ncpu < ncpu_want && cm->rl.of[key] >= 0) { /* computed on the host, not copied */
                    const int64_t rs = cm->rl.of[key];
                    lru_touch(&cm->rl, rs, ep);
                    cm->cblk[ncpu] = rslot_ptr(cm, rs);
                    cm->cpair[ncpu] = -1;
                    for (int64_t p = 0; p < npairs; p++)
                        if (cm->h_topi[p] == e) cm->cpair[ncpu] = (int32_t)p;
                    ncpu++;
                    rh++;
                    continue;
                }
                const int64_t vs = lru_take(&cm->vl, key, ep);
                if (vs < 0) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no free VRAM expert slot");
                uint8_t *dst = cm->vram + (uint64_t)vs * cm->slot_bytes;
                cm->eptr[e] = dst;
                const int64_t rs = cm->has_ram ? cm->rl.of[key] : -1;
                if (rs >= 0) {
                    lru_touch(&cm->rl, rs, ep);
                    CK(cudaMemcpyAsync(dst, rslot_ptr(cm, rs), bb, cudaMemcpyHostToDevice, cm->xs));
                    rh++;
                    continue;
                }
                CKS(queue_read(cm, il, e, dst, ep, &nt, err, errlen));
                sr++;
            }
            CKS(run_reads(x, il, nt, err, errlen));
            CK(cudaEventRecord(cm->ev_copy, cm->xs));
            CK(cudaEventRecord(cm->ev_t1, cm->xs));
            cm->t_bytes = (uint64_t)(rh - ncpu + sr) * bb;
            cm->t_pending = cm->t_bytes > 0;
            CK(cudaStreamWaitEvent(st, cm->ev_copy, 0));
            count_tiers(x, vh, rh, sr, rh - ncpu + sr, bb);
            const uint8_t **hp = cm->h_ptrs + ci * (int64_t)FMC_UBATCH * K;
            const uint8_t **dp = cm->d_ptrs + ci * (int64_t)FMC_UBATCH * K;
            for (int64_t p = 0; p < npairs; p++) hp[p] = cm->eptr[cm->h_topi[p]];
            CK(cudaMemcpyAsync((void *)dp, (const void *)hp, sizeof(void *) * (size_t)npairs, cudaMemcpyHostToDevice, st));
            CKS(launch_experts(x, L, dp, hp, ci, npairs, err, errlen));
            for (int64_t i = 0; i < nc; i++) cm->eptr[list[c0 + i]] = NULL;
            if (ncpu > 0) CKS(host_share(x, FL, ncpu, &hostmask, &ycpu, err, errlen));
        }
    }
    k_moe_combine<<<dim3((unsigned)((H + 255) / 256), (unsigned)n), 256, 0, st>>>(
        c->x, c->ye, c->topw, K, c->sho, c->shs, FL->has_shexp, n, H, hostmask, ycpu, guard_code(x, il), c->d_bad);
    CKL();
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
        CKS(launch_norm(st, 0, c->x + r0 * H, NULL, cm->output_norm, nr, H, m->eps, m->norm_offset, c->xn, err, errlen));
        CKS(launch_mm(st, cm->sms, lm, c->xn, H, nr, c->logits, V, 0, err, errlen));
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

static const fm_backend_ops cuda_ops = {"cuda", op_embed, op_attn_full, op_attn_linear, op_moe, op_ffn_dense, op_final};

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
        if (L->ffn != FM_FFN_MOE) /* the residual stream after the layer (op_moe's combine checks its own) */
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

/* ================================================================== tests and measurement */

typedef struct {
    void *p[40];
    int n;
} tbufs;

static void tb_free(tbufs *t) {
    for (int i = 0; i < t->n; i++) cudaFree(t->p[i]);
    t->n = 0;
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

static fm_status test_ready(char *err, size_t errlen) {
    if (!fm_cuda_available()) return fm_errf(err, errlen, FM_ERR_BACKEND, "no usable CUDA device");
    CK(cudaSetDevice(0));
    return FM_OK;
}

extern "C" fm_status fm_cuda_test_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *q,
                                         const uint16_t *scales, const uint16_t *biases, const float *X, int64_t n,
                                         float *Y, char *err, size_t errlen) {
    CKS(test_ready(err, errlen));
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
    fm_status st = launch_mm(0, g_sm_count(), W, (const float *)dx, cols, n, (float *)dy, rows, 0, err, errlen);
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

extern "C" fm_status fm_cuda_test_swiglu(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *qg,
                                         const uint16_t *sg, const uint16_t *bg, const void *qu, const uint16_t *su,
                                         const uint16_t *bu, const float *X, int64_t n, float *Y, char *err,
                                         size_t errlen) {
    CKS(test_ready(err, errlen));
    if (bits != 16 && bits != 32 && (cols % 32 || group_size % 32 || cols % group_size))
        return fm_errf(err, errlen, FM_ERR_ARG, "cols/group_size must be multiples of 32");
    tbufs tb = {{0}, 0};
    DMat G, U;
    void *dx, *dy;
    if (!test_mat(&tb, bits, group_size, rows, cols, qg, sg, bg, &G) ||
        !test_mat(&tb, bits, group_size, rows, cols, qu, su, bu, &U)) {
        tb_free(&tb);
        return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: test buffer allocation/copy failed");
    }
    TPUT(dx, X, (size_t)(n * cols) * 4);
    TPUT(dy, NULL, (size_t)(n * rows) * 4);
    fm_status st = launch_swiglu(0, g_sm_count(), G, U, (const float *)dx, cols, n, (float *)dy, err, errlen);
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
    CKS(test_ready(err, errlen));
    const int kind = bits == 32 ? 0 : bits == 16 ? 1 : bits;
    DPart pg = {kind, group_size, I, H, offs[0], offs[1], offs[2]};
    DPart pu = {kind, group_size, I, H, offs[3], offs[4], offs[5]};
    DPart pd = {kind, group_size, H, I, offs[6], offs[7], offs[8]};
    if (!mma_experts_ok(pg, pu, pd, H))
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
    st = mma_work_build(ids, NULL, npairs, E, cnt, hw, &nt, &nitems, &np, err, errlen);
    if (st != FM_OK) goto done;
    dp = tb_put(&tb, hp, sizeof(void *) * (size_t)npairs);
    dw = tb_put(&tb, hw, sizeof(int32_t) * (size_t)(2 * nitems + np));
    if (!dp || !dw) {
        st = fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: test buffer allocation/copy failed");
        goto done;
    }
    st = mma_launch_experts(0, (const uint8_t *const *)dp, (const int32_t *)dw, nitems, nt, pg, pu, pd, K, H,
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
    CKS(test_ready(err, errlen));
    tbufs tb = {{0}, 0};
    void *dx, *dz = NULL, *dw = NULL, *dy;
    TPUT(dx, x, (size_t)(n * d) * 4);
    if (op == 1) TPUT(dz, z, (size_t)(n * d) * 4);
    if (op != 2) TPUT(dw, w, (size_t)d * 4);
    TPUT(dy, NULL, (size_t)(n * d) * 4);
    fm_status st = launch_norm(0, op, (const float *)dx, (const float *)dz, (const float *)dw, n, d, eps, offset,
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
    CKS(test_ready(err, errlen));
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

extern "C" fm_status fm_cuda_test_conv1d(const float *X, int64_t n, float *state, const float *w, int32_t C, int32_t k,
                                         float *Y, char *err, size_t errlen) {
    CKS(test_ready(err, errlen));
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
                                      int32_t nv, int32_t dk, int32_t dv, float eps, float *S, float *O, char *err,
                                      size_t errlen) {
    CKS(test_ready(err, errlen));
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
    fm_status st = launch_gdn(0, (const float *)dq, (const float *)dz, (const float *)da, (const float *)db,
                              (const float *)dA, (const float *)dt, (const float *)dn, (float *)dS, (float *)dO, n, nk, nv,
                              dk, dv, eps, err, errlen);
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
    CKS(test_ready(err, errlen));
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
    fm_status st = launch_attn(0, (const float *)dqg, (const float *)dk, (const float *)dv, (const float *)dqn,
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
    CKS(test_ready(err, errlen));
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
    CKS(test_ready(err, errlen));
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
