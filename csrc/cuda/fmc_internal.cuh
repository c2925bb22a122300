/* fmc_internal.cuh: what the csrc/cuda/*.cu files of the CUDA backend share.
 *
 * Owns: the device model (fmc_model: dense weights as DMat per layer, streams and events, the expert
 * tier state) and session (fmc_session: KV cache, conv + recurrent state, scratch) structs, the
 * per-eval context of the layer ops (fmc_ctx), the CK / CKL / CKS status macros, KIND_SWITCH, the
 * shared constants and the declarations of the functions one file calls in another (fmc_*).
 * The files:
 *   fm_cuda_weights.cu  model open/close, device upload of the dense weights, availability,
 *                       describe, bandwidth measurement
 *   fm_cuda_ops.cu      the launch wrappers (mv/mm/mma/swiglu/norm/gdn/attn), sessions, the layer
 *                       ops except the MoE one, the numerical guard, the eval and graph hooks, the
 *                       capability check and the backend table (fm_cuda_backend); the layer loop is
 *                       fm_forward.c's
 *   fm_cuda_moe.cu      the expert tiers: VRAM slots (LRU) over fm_io (reads, RAM cache) with pinned
 *                       buffers, tier open/close/preload, the MoE op
 *   fm_cuda_experts.cu  the routed experts' compute: GPU launches (per pair, grouped on tensor
 *                       cores, decode pair sets) and the CPU share of a decode layer's misses
 *   fm_cuda_test.cu     the fm_cuda_test_* kernel entry points of tests/test_cuda.py
 *   fm_cuda_state.cu    the session state hooks of fm_state.c's snapshots (device <-> host copies)
 * Does not own: kernels (fm_cuda_kernels.cuh, fm_cuda_mma.cuh, fm_cuda_gdn_chunk.cuh), model
 * parsing (fm_model.c), the layer loop (fm_forward.c), the CPU backend (fm_cpu.c).
 */
#pragma once
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

/* LRU over slots (fm_cuda_moe.cu) */
typedef struct {
    int64_t n;
    int64_t *key;    /* slot -> key (-1 empty) */
    int64_t *of;     /* key -> slot (-1 absent) */
    int64_t *prev, *next;
    int64_t head, tail; /* head: most recent */
    int64_t *stamp;  /* epoch of last use in the current chunk (not evictable) */
} lru_t;

/* page-locked host memory for fm_io's block buffers (fm_cuda_moe.cu): blocks of one size carved
 * from chunks of up to 1 GiB pinned at open, a free list; past that one cudaHostAlloc per block */
typedef struct {
    pthread_mutex_t mu;
    int mu_init;
    size_t bytes;       /* block size */
    uint8_t **chunks;
    int32_t n_chunks;
    uint64_t *chunk_len;
    void **free_list;
    int64_t n_free, cap;
    int64_t n_extra;    /* blocks allocated one by one (live) */
} fmc_pinned;

typedef struct {
    DMat wq, wk, wv, wo, ssm_qkv, ssm_z, ssm_b, ssm_a, ssm_out, router, sh_gate, sh_up, sh_down, sh_router,
        ffn_gate, ffn_up, ffn_down;
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm, *ssm_conv, *dt_bias, *A_log, *ssm_norm;
    const float *router_bias; /* spec.router_bias [n_experts] on the device, or NULL */
    DPart pg, pu, pd;
} cl_layer;

typedef struct fmc_model {
    fm_model *m;
    int sms;
    cl_layer *L;
    DMat tok_embd, output;
    const float *output_norm;
    void **allocs;
    int32_t n_allocs, cap_allocs;
    cudaStream_t cs, xs;
    float *mma_ws; /* split-K workspace of the tensor-core matmuls on cs (fmc_launch_mm: allocated on first
                    * use, FMC_MMA_WS_FLOATS floats), freed by fm_cuda_model_close */
    cudaEvent_t ev_topi, ev_copy, ev_comp; /* ev_copy: after the copies of the last fm_io request */
    /* experts */
    int64_t n_keys; /* n_layers * n_experts */
    uint64_t slot_bytes, total_expert_bytes;
    int resident, ram_resident;
    uint8_t *vram;
    lru_t vl;
    const uint8_t **d_table; /* resident: device [n_keys] slot pointers */
    /* host tier: the model's fm_io (m->io), opened here with page-locked block buffers (pin) and
     * the on_block hook that queues each block's host-to-device copy the moment it is available */
    int io_opened;     /* m->io is ours: fmc_moe_close closes it (before pin is released) */
    fmc_pinned pin;
    int has_ram;       /* fm_io has a RAM cache (ram_budget, not resident) */
    int64_t ram_slots; /* its capacity in blocks */
    int io_copies;     /* copies from the last fm_io request's blocks may still run: ev_copy */
    int t1_recorded;   /* ev_t1 (end of the request's copies, PCIe rate) already recorded for this request */
    /* the current fm_io request, read by the on_block hook (on fm_io's threads) */
    int32_t *rq_e;          /* [chunk] the experts asked for */
    uint8_t **rq_ddst;      /* [chunk] VRAM slot to copy request index i into (NULL: none) */
    int32_t *rq_ev;         /* [chunk] ev_grp index to record after that copy (-1: none) */
    const uint8_t **rq_blk; /* [chunk] the block fm_io delivered (page-locked host memory) */
    uint64_t rq_bytes;      /* the layer's block_bytes */
    pthread_mutex_t rq_mu;
    int rq_mu_init;
    cudaError_t rq_cerr;    /* the first failed copy of the request (under rq_mu) */
    int32_t rq_cerr_index;
    int32_t chunk;          /* experts per fm_io request (its max_batch; <= VRAM slots) */
    const uint8_t **h_ptrs, **d_ptrs;
    int64_t ptr_cap;
    int32_t *h_topi;
    int32_t *h_mwork, *d_mwork; /* prefill expert work lists: per chunk [2 * items + pairs], pinned / device */
    int32_t *mcnt;              /* host scratch [E]: pairs per expert */
    const uint8_t **eptr; /* host scratch [E] */
    int32_t *used;        /* host scratch [E] */
    int64_t epoch;
    int timing; /* fm_debug_params.cuda_timing of this eval: sync after every op, time to fm_stats.ms_* */
    /* CPU split (decode, RAM tier): part of a layer's missed experts found in fm_io's RAM cache is
     * computed on the host from that cache (fm_cpu_experts_token) while the GPU copies + computes the rest */
    double split;             /* fm_debug_params.cpu_split of this eval: -1 auto, else the fraction in [0, 1] */
    double rate_h2d, rate_cpu; /* bytes per ms (= GB/s * 1e6), EMAs of the measured rates; 0: unknown */
    int calibrated;
    float *h_xn, *h_topw, *h_ycpu; /* pinned [H], [K], [H] */
    float *d_ycpu;                 /* device [H] */
    float *cg, *cu, *cy;           /* host [K*I], [K*I], [K*H] */
    const uint8_t **cblk;          /* host [K]: the CPU share's blocks (fm_io RAM cache) */
    int32_t *cpair;                /* host [K]: their pair index */
    cudaEvent_t ev_t0, ev_t1;      /* timing events around a layer's copies */
    cudaEvent_t ev_h0, ev_h1;      /* timing events around the final norm + lm_head */
    cudaEvent_t ev_grp[FMC_PSET];  /* decode: one per copied miss (its compute waits for it) */
    double share_ms;     /* the last host share's time (fmc_host_share_inline) */
    int64_t split_calls; /* auto-split decisions (every 64th may probe the host with one expert) */
    int t_pending;
    uint64_t t_bytes;
} fmc_model;

typedef struct fmc_session fmc_session;

/* the layer ops' context: the session's, set for each pass from the fm_pass (fmc_pass_ctx) */
typedef struct {
    fm_session *s;
    fmc_session *c;
    fmc_model *cm;
    fm_model *m;
    int64_t n;
    int32_t pos;
    int graph; /* capturing the decode graph: no host copies or syncs, position read from c->d_pos */
    int32_t chunk; /* index of this pass among the eval's passes of c->nb tokens (numerical guard) */
    fm_session *const *rows; /* a multi-sequence pass (fm_pass.seqs): row t's session, else NULL */
    const int32_t *rpos;     /* and its position */
} fmc_ctx;

/* a multi-sequence pass's per-row state pointers on the device (fmc_session.d_rows of the pass's
 * session, filled by op_embed): for full-attention state si and row r, kc at [si * nb + r] and vc
 * at [(n_full + si) * nb + r]; for linear-attention state si, conv at [(2 n_full + si) * nb + r] and
 * ssm at [(2 n_full + n_linear + si) * nb + r]; then the rows' positions (int32 [nb]) */
static inline float *const *fmc_rows_at(float *const *d_rows, int64_t nb, int64_t slot) { return d_rows + slot * nb; }

struct fmc_session {
    fmc_model *cm;
    int32_t n_ctx, nb;
    float **kc, **vc, **conv, **ssm;
    float *x, *xn, *qg, *q, *gate, *k, *v, *att, *qkv, *qkvc, *z, *ba, *bb, *o, *lr, *topw, *shg, *sho, *shs,
        *hb, *ye, *dg, *logits;
    int32_t *topi, *tok;
    int32_t *d_pos, *h_io;     /* graph decode: position on the device, pinned [token, pos] */
    float **d_rows, **h_rows;  /* multi-sequence passes: per-row state pointers + positions (fmc_rows_at) */
    cudaGraphExec_t gexec;     /* resident decode step captured once (embed .. lm_head) */
    int graph_failed;
    /* resident multi-sequence steps of n <= FMC_LOGIT_ROWS rows led by this session: [n] captured on
     * first use (the rows' states and positions come from d_rows, uploaded before each replay) */
    cudaGraphExec_t gexec_b[FMC_LOGIT_ROWS + 1];
    int graph_failed_b;
    /* numerical guard: the first non-finite hidden state / logit of an eval (k_check_finite codes,
     * UINT64_MAX none) on the device, copied to pinned h_bad before the eval's last sync */
    unsigned long long *d_bad, *h_bad;
    fm_cuda_counters cnt;
    fmc_ctx xc;                /* the context every pass of an eval hands to the ops (fm_eval.ctx) */
    fm_cuda_counters cap_cnt;  /* counters saved while the graph is captured (capture charges nothing) */
    int64_t cap_hits;
};

/* numerical guard: record a NaN/Inf among the n rows of `row` floats at v, seen after `sub` (-1 the
 * embedding, 0..n_layers-1 that layer, n_layers the logits; row t is token t_off + t of this pass),
 * in c->d_bad. One small kernel, no host sync (capturable: the code is fixed per graph). A MoE
 * layer's check is fused into its k_moe_combine (the residual add), the same code. */
static inline unsigned long long fmc_guard_code(const fmc_ctx *x, int32_t sub) {
    return ((unsigned long long)(uint32_t)x->chunk << 33) | ((unsigned long long)(uint32_t)(sub + 1) << 16);
}

static inline int64_t fmc_conv_dim(const fm_model *m) {
    return 2 * (int64_t)m->lin_nk * m->lin_dk + (int64_t)m->lin_nv * m->lin_dv;
}

/* the context of pass p (fm_pass.ctx is the session's fmc_ctx) */
static inline fmc_ctx *fmc_pass_ctx(const fm_pass *p) {
    fmc_ctx *x = (fmc_ctx *)p->ctx;
    x->n = p->n;
    x->pos = p->pos;
    x->graph = p->capture;
    x->chunk = p->index;
    x->rows = p->seqs;
    x->rpos = p->seq_pos;
    return x;
}

/* ---- fm_cuda_weights.cu */
/* the backend's model state (fm_model.bm): dense weights in VRAM, streams, the expert tiers */
fm_status fm_cuda_model_open(fm_model *m, const fm_model_params *p, void **out, char *err, size_t errlen);
void fm_cuda_model_close(void *cm);
int fmc_sm_count(void);
fm_status fmc_device_ready(char *err, size_t errlen); /* a usable device, made current */

/* ---- fm_cuda_ops.cu: launches on stream st (sms: the device's SM count) */
dim3 fmc_mv_grid(int64_t rows, int rows_per_warp, int sms);
int fmc_mma_mat_ok(int kind, int64_t cols, int gs);
int fmc_mma_nt(int64_t n);
fm_status fmc_mma_launch(int swi, cudaStream_t st, const MmaArgs &a, int kind, int nt, dim3 g, char *err,
                         size_t errlen);
fm_status fmc_launch_mm(cudaStream_t st, int sms, int mma, float **ws, const DMat &W, const float *X, int64_t ldx, int64_t n,
                        float *Y, int64_t ldy, int acc, char *err, size_t errlen);
fm_status fmc_launch_swiglu(cudaStream_t st, int sms, int mma, float **ws, const DMat &G, const DMat &U, const float *X, int64_t ldx,
                            int64_t n, float *Hout, char *err, size_t errlen);
fm_status fmc_launch_norm(cudaStream_t st, int op, const float *X, const float *Z, const float *w, int64_t n,
                          int64_t d, float eps, float off, float *Y, char *err, size_t errlen);
fm_status fmc_launch_gdn(cudaStream_t st, const float *QKV, const float *Z, const float *A, const float *B,
                         const float *A_log, const float *dt_bias, const float *normw, float *S, float *O, int64_t n,
                         int nk, int nv, int dk, int dv, float eps, int gdn_chunk, char *err, size_t errlen,
                         float *const *Srows = NULL);
fm_status fmc_launch_attn(cudaStream_t st, const float *QG, const float *Kn, const float *Vn, const float *qnw,
                          const float *knw, float *Q, float *Gt, float *KC, float *VC, float *O, int64_t n, int pos,
                          const int *dpos, int nh, int nkv, int dh, int rot, float theta, int gate, float eps,
                          float off, char *err, size_t errlen, fmc_rows_attn rows = fmc_rows_attn{NULL, NULL, NULL});

/* ---- fm_cuda_moe.cu: the expert tiers */
fm_status fmc_moe_open(fmc_model *cm, const fm_model_params *p, char *err, size_t errlen);
void fmc_moe_close(fmc_model *cm); /* after both streams are synced */
fm_status fmc_op_moe(fm_pass *p, int32_t il, char *err, size_t errlen); /* the table's ffn[FM_FFN_MOE] */

/* ---- fm_cuda_experts.cu: the routed experts' compute */
fm_status fmc_mma_work_build(const int32_t *ids, const uint8_t *const *hptrs, int64_t npairs, int64_t E,
                             int32_t *cnt, int32_t *hw, int *nt_out, int64_t *nitems_out, int64_t *np_out, char *err,
                             size_t errlen);
int fmc_mma_experts_ok(const DPart &pg, const DPart &pu, const DPart &pd, int64_t H);
fm_status fmc_mma_launch_experts(cudaStream_t st, const uint8_t *const *dptrs, const int32_t *dw, int64_t nitems,
                                 int nt, const DPart &pg, const DPart &pu, const DPart &pd, int K, int64_t H,
                                 const float *xn, float *hb, float *ye, char *err, size_t errlen);
fm_status fmc_launch_experts(fmc_ctx *x, const cl_layer *L, const uint8_t *const *dptrs,
                             const uint8_t *const *hptrs, int64_t ci, int64_t npairs, char *err, size_t errlen);
fm_status fmc_launch_dec(fmc_ctx *x, const cl_layer *L, const PairSet *S, int cnt, char *err, size_t errlen);
int64_t fmc_split_count(double split, double rate_h2d, double rate_cpu, int64_t m_ram, int64_t m_other, int probe);
void fmc_ema(double *r, double sample);
fm_status fmc_split_calibrate(fmc_model *cm, fmc_session *c, int32_t il, const fm_layer *FL, char *err,
                              size_t errlen);
void fmc_host_share_inline(fmc_model *cm, const fm_layer *FL, int64_t ncpu);
fm_status fmc_host_share_finish(fmc_ctx *x, const fm_layer *FL, int64_t ncpu, uint32_t *hostmask,
                                const float **ycpu, char *err, size_t errlen);

/* ---- fm_cuda_state.cu: the session state hooks (fm_backend.state_get / state_set) */
fm_status fmc_state_get(fm_session *s, int32_t piece, int32_t idx, int32_t rows, void *dst, char *err, size_t errlen);
fm_status fmc_state_set(fm_session *s, int32_t piece, int32_t idx, int32_t rows, const void *src, char *err,
                        size_t errlen);
