/* fm_model.h: the resolved model (weights as fm_qmat views into the mmap, layer table, expert
 * layout), the generic session state and the compute ops. Private to csrc (the backends include it).
 *
 * Owns: struct fm_model, struct fm_session, the ops in fm_ops.c, the CPU backend's exported expert
 * op. Does not own: kernels (fm_quant.c), the manifest parser (fm_json.c), expert reads (fm_io.c),
 * the backend interface and the layer kinds (fm_backend.h), backend state (fm_model.bm,
 * fm_session.bs: fm_cpu.c, csrc/cuda).
 */
#ifndef FM_MODEL_H
#define FM_MODEL_H

#include <math.h>
#include <pthread.h>

#include "fm_backend.h"
#include "fm_internal.h"

/* the layer kinds FM_ATTN_* and FM_FFN_* are in fm_backend.h (they index the backend's op tables) */
enum { FM_PART_GATE = 0, FM_PART_UP = 1, FM_PART_DOWN = 2 };

/* model features as data (spec keys of docs/INTERNALS.md section 1; defaults: the Qwen3 family) */
enum { FM_ROUTER_SOFTMAX = 0, FM_ROUTER_SIGMOID = 1 };   /* spec.router softmax_topk | sigmoid_topk */
enum { FM_ACT_SWIGLU = 0, FM_ACT_SWIGLU_CLAMP = 1 };     /* spec.expert_act swiglu | swiglu_clamp */
enum { FM_SHGATE_SIGMOID = 0, FM_SHGATE_NONE = 1 };      /* spec.shared_gate sigmoid | none */

/* routing of one token (fm_route) */
typedef struct {
    int32_t kind;               /* FM_ROUTER_* */
    int32_t norm;               /* renormalise the K weights (spec.norm_topk_prob) */
    int32_t n_group, topk_group; /* group-limited top-K (sigmoid only; 1, 1: off) */
    float scale;                /* spec.routed_scaling_factor */
} fm_router_cfg;

/* routed-expert activation (fm_expert_act) */
typedef struct {
    int32_t kind;       /* FM_ACT_* */
    float limit, alpha; /* swiglu_clamp: spec.swiglu_limit, spec.swiglu_alpha */
} fm_act_cfg;

/* one part (gate/up/down) of an expert block: offsets relative to the block start; each part has
 * its own format */
typedef struct {
    fm_dtype dt;
    int32_t bits, group_size;
    int64_t rows, cols;
    uint64_t off_data;           /* FM_DT_BF16 / FM_DT_F32 */
    uint64_t off_q, off_s, off_b; /* FM_DT_AFFINE */
    int32_t has_bias;            /* optional f32 [rows] bias (manifest parts.X.bias) at off_bias */
    uint64_t off_bias;
} fm_part;

/* the part's bias (f32 [rows]) inside the block at blk, or NULL */
static inline const float *fm_part_bias(const fm_part *p, const uint8_t *blk) {
    return p->has_bias ? (const float *)(const void *)(blk + p->off_bias) : NULL;
}

/* fm_qmat view of one part (gate/up/down) of an expert block held at blk (CPU backend and the
 * CUDA backend's CPU share use the same view) */
static inline fm_qmat fm_part_view(const fm_part *p, const uint8_t *blk) {
    fm_qmat w;
    memset(&w, 0, sizeof w);
    w.dt = p->dt;
    w.bits = p->bits;
    w.group_size = p->group_size;
    w.rows = p->rows;
    w.cols = p->cols;
    if (p->dt == FM_DT_AFFINE) {
        w.q = (const uint32_t *)(const void *)(blk + p->off_q);
        w.scales = (const uint16_t *)(const void *)(blk + p->off_s);
        w.biases = (const uint16_t *)(const void *)(blk + p->off_b);
    } else {
        w.data = blk + p->off_data;
    }
    return w;
}


typedef struct {
    int32_t attn, ffn;   /* FM_ATTN_*, FM_FFN_* (fm_backend.h) */
    int32_t state_idx;   /* index into the session's KV caches (full) or linear states (linear) */
    const float *attn_norm, *ffn_norm;
    /* full attention */
    fm_qmat wq, wk, wv, wo;
    const float *q_norm, *k_norm;
    int32_t window;      /* spec.layers[il].sliding_window: keys of the last `window` positions (0: all) */
    int32_t has_sinks;   /* spec.layers[il].attn_sinks */
    const float *sinks;  /* blk.il.attn_sinks [n_heads] when has_sinks, else NULL */
    /* linear attention (GatedDeltaNet) */
    fm_qmat ssm_qkv, ssm_z, ssm_b, ssm_a, ssm_out;
    const float *ssm_conv;  /* [conv_dim, conv_kernel] */
    const float *dt_bias, *A_log, *ssm_norm;
    /* MoE */
    fm_qmat router, sh_gate, sh_up, sh_down, sh_router; /* sh_router: shared_gate sigmoid only */
    const float *router_bias; /* spec.router_bias: blk.il.ffn_router_bias [n_experts], or NULL */
    int32_t has_shexp;
    fm_part parts[3];
    uint64_t block_bytes;
    /* dense MLP */
    fm_qmat ffn_gate, ffn_up, ffn_down;
} fm_layer;

struct fm_model {
    /* spec (no architecture name: every feature is a field below) */
    int32_t H, n_layers, vocab;
    float eps, norm_offset;
    int32_t n_heads, n_kv_heads, head_dim, rotary_dim, attn_gate;
    float rope_theta;
    int32_t lin_nk, lin_nv, lin_dk, lin_dv, conv_k;
    int32_t n_experts, k_model, k_tok, moe_I, norm_topk, sh_I, dense_I, tie;
    int32_t max_pos;
    fm_router_cfg route;   /* route.norm == norm_topk */
    int32_t router_bias;   /* spec.router_bias: every MoE layer has blk.il.ffn_router_bias */
    fm_act_cfg act;        /* routed experts */
    int32_t shared_gate;   /* FM_SHGATE_* */
    int32_t n_full, n_linear, n_moe;
    int32_t max_batch; /* experts per fm_io_submit */

    fm_layer *layers;
    fm_qmat tok_embd, output;
    const float *output_norm;

    /* storage */
    char *dir;
    void *map;
    size_t map_len;
    int32_t dense_locked;      /* map is mlock'ed (fm_model_params.lock_dense) */
    void **owned; /* copies of misaligned tensors / f32 vectors */
    int32_t n_owned, cap_owned;
    fm_expert_file *files;
    char **paths;
    fm_io *io;     /* the expert reads: opened by the backend (model_open), closed by it (model_close) */
    fm_pool *pool; /* compute threads (every backend: the CUDA backend's CPU split uses them) */
    pthread_mutex_t mu; /* serialises evals of the sessions of this model (pool and io are shared) */
    int mu_init;
    fm_log_fn log_fn;
    void *log_user;
    fm_debug_params debug; /* fm_model_params.debug; changed by fm_model_set_debug under mu */
    const fm_backend *be; /* the backend (fm_model_params.backend), chosen by fm_model_open */
    void *bm;             /* its model state */
    int32_t be_open;      /* be->model_open was called (fm_model_close calls be->model_close) */
    /* session-state snapshots (fm_state.c), set once by fm_model_open: the structure's fingerprint
     * and the identity of the weights (a hash of the manifest as opened) */
    uint64_t state_fingerprint, state_weights_id;
};

struct fm_session {
    fm_model *m;
    int32_t n_ctx, pos;
    fm_stats st;
    void *bs;          /* the backend's session state (KV cache, conv + recurrent state, scratch) */
    fm_trace trace;    /* routing trace buffers (all NULL: off), fm_session_set_trace */
    int64_t trace_n;   /* tokens traced since set_trace */
    int64_t trace_row; /* trace row of the current pass's first token (fm_forward.c) */
};

/* fm_state.c: the model's state_fingerprint and state_weights_id (manifest: the bytes of
 * pyflashmoe.json fm_model_open parsed); after the layer table and k_tok are set */
void fm_state_model_ids(fm_model *m, const char *manifest, size_t len);

/* floats of session-state piece `piece` (fm_backend.h FM_STATE_*) for `rows` KV rows: the layouts
 * every backend's state_get / state_set use */
static inline int64_t fm_state_piece_floats(const fm_model *m, int32_t piece, int32_t rows) {
    if (piece == FM_STATE_K || piece == FM_STATE_V) return (int64_t)rows * m->n_kv_heads * m->head_dim;
    if (piece == FM_STATE_CONV)
        return (int64_t)(m->conv_k > 1 ? m->conv_k - 1 : 1) *
               (2 * (int64_t)m->lin_nk * m->lin_dk + (int64_t)m->lin_nv * m->lin_dv);
    return (int64_t)m->lin_nv * m->lin_dk * m->lin_dv;
}

/* ---- numerical guard (CPU forward and CUDA backend share the wording) ---- */
static inline const char *fm_layer_kind(const fm_layer *L) {
    if (L->attn == FM_ATTN_FULL) return L->ffn == FM_FFN_MOE ? "full attention + moe" : "full attention + dense ffn";
    return L->ffn == FM_FFN_MOE ? "linear attention + moe" : "linear attention + dense ffn";
}
/* FM_ERR_NUMERIC for a non-finite value found at position pos after stage: -1 the token embedding,
 * 0..n_layers-1 that layer (its token mixer and FFN), n_layers the logits */
static inline fm_status fm_numeric_error(const fm_model *m, int32_t stage, int64_t pos, char *err, size_t errlen) {
    if (stage < 0)
        return fm_errf(err, errlen, FM_ERR_NUMERIC,
                       "token embedding: non-finite hidden state at position %lld (damaged weights? run `flashmoe "
                       "verify`)",
                       (long long)pos);
    if (stage >= m->n_layers)
        return fm_errf(err, errlen, FM_ERR_NUMERIC,
                       "logits (final norm + lm_head): non-finite value at position %lld (damaged weights? run "
                       "`flashmoe verify`)",
                       (long long)pos);
    return fm_errf(err, errlen, FM_ERR_NUMERIC,
                   "layer %d (%s): non-finite hidden state at position %lld (damaged weights or expert data? run "
                   "`flashmoe verify`)",
                   stage, fm_layer_kind(&m->layers[stage]), (long long)pos);
}

/* ---- ops (fm_ops.c): single-threaded on one row / head unless noted ---- */
/* y = x̂ * (w + offset), x̂ = x / sqrt(mean(x²) + eps); y may alias x */
void fm_rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps, float offset);
/* y = x̂ * w * silu(z) (plain gated RMSNorm of GatedDeltaNet, per value head) */
void fm_rmsnorm_gated(float *y, const float *x, const float *z, const float *w, int64_t n, float eps);
/* x *= 1/sqrt(sum(x²) + eps) */
void fm_l2norm(float *x, int64_t n, float eps);
/* NeoX rotate-half RoPE on the first rot_dim dims of one head at position pos */
void fm_rope_neox(float *x, int32_t rot_dim, int32_t pos, float theta);
/* softmax in place */
void fm_softmax(float *x, int64_t n);
static inline float fm_silu(float x) { return x / (1.0f + expf(-x)); }
static inline float fm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float fm_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
/* indices of the k largest of x[n] (descending, ties: lower index first) */
void fm_topk(const float *x, int32_t n, int32_t k, int32_t *idx);
/* out[dh] = attention of one query head over keys/values 0..n_keys-1 (row stride kv_stride),
 * scores: scratch float[n_keys] */
void fm_attend_head(float *out, const float *q, const float *kc, const float *vc, int64_t kv_stride,
                    int32_t n_keys, int32_t dh, float scale, float *scores);
/* the same over keys k0..n_keys-1 only (a sliding window: k0 = max(0, n_keys - window)), with an
 * optional sink logit (gpt-oss: *sink joins the softmax max and denominator, no value); k0 = 0 and
 * sink NULL is fm_attend_head bit for bit. scores: scratch float[n_keys - k0] */
void fm_attend_head_ex(float *out, const float *q, const float *kc, const float *vc, int64_t kv_stride,
                       int32_t k0, int32_t n_keys, int32_t dh, float scale, const float *sink, float *scores);
/* first key of a query at position pos under a sliding window (0: none) */
static inline int32_t fm_window_start(int32_t pos, int32_t window) {
    return window > 0 && pos + 1 > window ? pos + 1 - window : 0;
}
/* routing of one token: p[E] the router logits (overwritten), bias[E] spec.router_bias or NULL
 * (softmax: added to the logits; sigmoid: selection-only correction bias) -> idx[K] (descending by
 * selection score, ties: lower index), w[K]. tmp: scratch float[2*E]. The softmax router without
 * bias and scale 1 is the arithmetic of transformers' Qwen3 MoE routers, bit for bit as before. */
void fm_route(const fm_router_cfg *rc, float *p, const float *bias, int32_t E, int32_t K, int32_t *idx, float *w,
              float *tmp);
/* routed-expert activation in place: g[i] = act(g[i], u[i]) over n values (swiglu: silu(g) * u) */
void fm_expert_act(const fm_act_cfg *a, float *g, const float *u, int64_t n);
/* y[n, rows] += b[rows] (b NULL: nothing) */
void fm_add_bias(float *y, const float *b, int64_t n, int64_t rows);
/* causal depthwise conv1d + SiLU over n tokens for channels [c0, c1): X, Y [n, C] row-major,
 * state[(k-1)*C] the last k-1 inputs (oldest first, updated), w[C, k] */
void fm_conv1d_seq(float *Y, const float *X, int64_t n, float *state, const float *w, int32_t C,
                   int32_t k, int32_t c0, int32_t c1);
/* one gated-delta-rule step of one value head: S[dk, dv] *= exp(g); kv = Sᵀk; delta = beta(v-kv);
 * S += k ⊗ delta; o = Sᵀq (q already L2-normalised and scaled) */
void fm_gdn_step(float *S, const float *q, const float *k, const float *v, float g, float beta,
                 int32_t dk, int32_t dv, float *o);

/* matrix helpers over the pool: Y[n, rows] = X[n, cols] Wᵀ */
void fm_mm(fm_pool *pool, const fm_qmat *W, const float *X, int64_t n, float *Y);

/* ---- CPU backend (fm_cpu.c) ---- */
/* The CPU backend's routed-expert op for one token: ye[c*H ..] = expert c (block blocks[c], the
 * layer's parts and activation) applied to xn[H], c < nc; g, u: scratch float[nc * moe_I].
 * Threads: pool. */
void fm_cpu_experts_token(fm_pool *pool, const fm_model *m, const fm_layer *L, const uint8_t *const *blocks,
                          int32_t nc, const float *xn, float *g, float *u, float *ye);

#endif
