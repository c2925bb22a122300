/* fm_backend.h: the backend interface of the forward pass, and the CUDA backend's extra entry points.
 *
 * Owns: the layer kinds (the values of fm_layer.attn / .ffn, which index the op tables), fm_backend
 * (a table of function pointers in the spirit of ggml's ggml_backend_i: model open/close, session
 * new/free/reset, the capability check, eval hooks, the layer ops, the numerical guard, sync and the
 * optional graph hooks), the structs the layer loop hands to them (fm_eval, fm_pass), the two tables
 * (fm_cpu_backend in fm_cpu.c, fm_cuda_backend in csrc/cuda or NULL from the stub), the CUDA
 * counters and the test-only kernel entry points (fm_cuda_test_*) that tests/test_cuda.py reaches
 * through pyflashmoe/_cuda.pxi.
 * Does not own: the layer table (fm_model.h), the layer loop (fm_forward.c), the kernels.
 *
 * THE layer loop (fm_forward.c, the only one, for every backend), per pass of at most
 * fm_eval.pass_cap tokens:
 *   be->embed(p) ; be->guard(p, -1) ;
 *   for each layer il: be->mixer[L->attn](p, il) ; be->ffn[L->ffn](p, il) ; be->guard(p, il) ;
 *   be->final(p)
 * Each op applies its own pre-norm and residual add, so the hidden state stays in the backend's
 * memory (VRAM for CUDA) for the whole pass. fm_model_open calls be->supports for the model (il -1)
 * and every layer, and checks that the layer's kinds have ops in the table, before anything is
 * loaded: a layer the backend cannot run is refused there, never skipped at eval time.
 *
 * Builds without CUDA link csrc/cuda/fm_cuda_stub.c: fm_cuda_compiled() == 0, fm_cuda_backend()
 * is NULL and the other entry points return FM_ERR_BACKEND with a message saying so.
 */
#ifndef FM_BACKEND_H
#define FM_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "fm.h"

#ifdef __cplusplus
extern "C" {
#endif

struct fm_model;
struct fm_session;

/* layer kinds: fm_layer.attn indexes fm_backend.mixer, fm_layer.ffn indexes fm_backend.ffn */
enum { FM_ATTN_FULL = 0, FM_ATTN_LINEAR = 1, FM_ATTN_KINDS };
enum { FM_FFN_MOE = 0, FM_FFN_DENSE = 1, FM_FFN_KINDS };
/* a kind's manifest name (spec.layers[i].attn / .ffn) and its name in messages */
static inline const char *fm_attn_kind_name(int32_t k) {
    return k == FM_ATTN_FULL ? "full" : k == FM_ATTN_LINEAR ? "linear" : "?";
}
static inline const char *fm_attn_kind_desc(int32_t k) {
    return k == FM_ATTN_FULL ? "full attention" : k == FM_ATTN_LINEAR ? "linear attention (GatedDeltaNet)" : "unknown";
}
static inline const char *fm_ffn_kind_name(int32_t k) {
    return k == FM_FFN_MOE ? "moe" : k == FM_FFN_DENSE ? "dense" : "?";
}
static inline const char *fm_ffn_kind_desc(int32_t k) {
    return k == FM_FFN_MOE ? "mixture-of-experts" : k == FM_FFN_DENSE ? "dense" : "unknown";
}

/* One fm_session_eval as the layer loop runs it. The loop fills the first block; eval_begin the
 * second. */
typedef struct {
    struct fm_session *s;
    const int32_t *tokens;
    int32_t n_tokens;
    float *logits;      /* as fm_session_eval (NULL: none) */
    int32_t all_logits;
    int32_t pos0;       /* the session's position before the eval */
    /* a multi-sequence decode step (fm_session_eval_batch): NULL, or n_tokens sessions (s ==
     * seqs[0]), token t for seqs[t] at its position seq_pos[t]; all_logits is 1 */
    struct fm_session *const *seqs;
    const int32_t *seq_pos;
    /* set by eval_begin */
    int64_t pass_cap;   /* tokens per pass (>= 1) */
    int32_t timed;      /* 1: time every op into fm_stats (after be->sync, when the backend has one) */
    int32_t graph;      /* FM_GRAPH_*: run this eval (one pass) as a recorded graph */
    void *ctx;          /* the backend's per-eval context, handed to every pass */
} fm_eval;

enum {
    FM_GRAPH_NONE = 0,    /* plain passes */
    FM_GRAPH_CAPTURE = 1, /* record the pass (capture_begin, the loop with capture set, capture_end), then replay */
    FM_GRAPH_REPLAY = 2   /* a recorded pass fits this eval: replay only */
};

/* One pass of the layer loop: n tokens at positions pos..pos+n-1 of s, or (seqs non-NULL) a
 * multi-sequence step: row t is the next token of session seqs[t] at position seq_pos[t] (s ==
 * seqs[0], whose scratch, I/O statistics and per-op timing the pass uses). The token mixers read
 * and write each row's own KV cache / conv / recurrent state; the FFN ops see n independent rows
 * (an MoE layer reads the union of the rows' experts once). */
typedef struct {
    struct fm_session *s;
    const int32_t *tokens; /* the pass's n tokens (NULL while capturing: replay feeds them) */
    int64_t n;
    int32_t pos;
    struct fm_session *const *seqs; /* NULL: one sequence */
    const int32_t *seq_pos;
    int32_t index;      /* the pass's index in its eval (0, 1, ...) */
    int32_t capture;    /* 1: being recorded as a graph: no host copies or syncs, no host-side decisions */
    float *logits;      /* host destination of this pass's logits (NULL: none) */
    int32_t all_logits; /* 1: n rows; 0: the last token's row */
    void *ctx;          /* fm_eval.ctx */
} fm_pass;

/* every op returns FM_OK or an fm_status with err filled */
typedef fm_status (*fm_pass_op)(fm_pass *p, char *err, size_t errlen);
typedef fm_status (*fm_layer_op)(fm_pass *p, int32_t il, char *err, size_t errlen);

typedef struct {
    const char *name;       /* "cpu", "cuda" */
    int32_t records_trace;  /* 1: the routing trace of fm_session_set_trace is recorded */
    /* 1: the ops read the dense weights (fm_layer's views) from host memory. 0: model_open copies
     * what it needs, and fm_model_open then releases the host copy (never locked); the fm_qmat
     * views of fm_model's dense tensors are invalid from then on (their shapes and formats stay) */
    int32_t host_dense;
    /* 1: the mixer ops run multi-sequence passes (fm_pass.seqs); eval_begin sizes the pass for
     * fm_eval.n_tokens rows (a graph for such a step records the rows' states and positions as
     * device data the replay uploads, never as launch arguments) */
    int32_t multi_seq;
    /* ---- model ----
     * supports: FM_OK when the backend can run layer il of the parsed spec (il -1: the model-wide
     * features), else FM_ERR_BACKEND / FM_ERR_FORMAT naming the layer and the feature. Called by
     * fm_model_open once the spec, the weights' formats and the expert layout are read, before
     * model_open (nothing of the backend's is allocated yet). */
    fm_status (*supports)(const struct fm_model *m, int32_t il, char *err, size_t errlen);
    /* after the generic load (dense weights, expert layout, fm_model.pool): the backend's model
     * state into fm_model.bm (and whatever else it opens; model_close undoes it, also after a
     * failed model_open) */
    fm_status (*model_open)(struct fm_model *m, const fm_model_params *p, char *err, size_t errlen);
    void (*model_close)(struct fm_model *m);
    /* ---- session: the backend's state (KV cache, conv + recurrent state, scratch) in fm_session.bs */
    fm_status (*session_new)(struct fm_session *s, char *err, size_t errlen);
    void (*session_free)(struct fm_session *s);
    void (*session_reset)(struct fm_session *s); /* state of the old timeline zeroed */
    /* ---- eval (the model mutex held) ----
     * eval_begin: sets pass_cap, timed, graph, ctx; nothing evaluated yet (an error leaves the
     * session as it was). eval_end (optional): called after every eval_begin that succeeded, with the
     * loop's status; returns the eval's status (e.g. the numerical guard's asynchronous finding). */
    fm_status (*eval_begin)(fm_eval *ev, char *err, size_t errlen);
    fm_status (*eval_end)(fm_eval *ev, fm_status st, char *err, size_t errlen);
    /* ---- the layer ops ---- */
    fm_pass_op embed;                 /* p->tokens -> the hidden state */
    fm_layer_op mixer[FM_ATTN_KINDS]; /* token mixer of layer il, by fm_layer.attn (NULL: unsupported) */
    fm_layer_op ffn[FM_FFN_KINDS];    /* FFN of layer il, by fm_layer.ffn (NULL: unsupported) */
    fm_pass_op final;                 /* final norm + lm_head into p->logits (nothing when NULL) and its guard */
    /* numerical guard after stage (-1 the embedding, il layer il): FM_ERR_NUMERIC (fm_numeric_error)
     * when the hidden state holds a NaN/Inf, or FM_OK and the finding is reported by eval_end */
    fm_layer_op guard;
    fm_pass_op sync; /* optional: wait for the queued work (per-op timing) */
    /* ---- graph (optional; all three or none): with fm_eval.graph == FM_GRAPH_CAPTURE the loop runs
     * capture_begin, the pass with capture set, capture_end(status of that pass): FM_OK when the
     * graph is recorded, else the backend falls back to plain passes (and says FM_GRAPH_NONE from
     * then on); then replay runs the recorded pass for p (tokens, pos, logits). */
    fm_pass_op capture_begin;
    fm_status (*capture_end)(fm_pass *p, fm_status st, char *err, size_t errlen);
    fm_pass_op replay;
    /* ---- session state (fm_state.c: fm_session_state_save / _load; optional: both NULL and the
     * backend refuses them). The model mutex is held. One piece at a time, f32 in the layouts the
     * backends share: FM_STATE_K / FM_STATE_V: rows [0, rows) (rows >= 1) of the KV cache idx (the
     * state_idx of a full-attention layer), [rows, n_kv_heads * head_dim]; FM_STATE_CONV: the conv
     * state of linear-attention state idx, [max(conv_k - 1, 1), conv_dim]; FM_STATE_SSM: its
     * recurrent state [lin_nv, lin_dk, lin_dv] (rows unused for these two). state_get copies the
     * piece into host memory dst; state_set replaces it from host memory src (the KV rows set count
     * as written, for what session_reset zeroes). Both return when the host buffer is done with. */
    fm_status (*state_get)(struct fm_session *s, int32_t piece, int32_t idx, int32_t rows, void *dst, char *err,
                           size_t errlen);
    fm_status (*state_set)(struct fm_session *s, int32_t piece, int32_t idx, int32_t rows, const void *src,
                           char *err, size_t errlen);
} fm_backend;

/* the pieces of fm_backend.state_get / state_set */
enum { FM_STATE_K = 0, FM_STATE_V = 1, FM_STATE_CONV = 2, FM_STATE_SSM = 3 };

extern const fm_backend fm_cpu_backend; /* fm_cpu.c */
const fm_backend *fm_cuda_backend(void); /* csrc/cuda (NULL from the stub) */

/* ---- CUDA backend: availability (csrc/cuda/fm_cuda_weights.cu, or the stub) ---- */
int32_t fm_cuda_compiled(void);  /* 1 when this build has the CUDA backend */
int32_t fm_cuda_available(void); /* compiled in AND a CUDA device is usable */
/* "NAME (sm_XY, N MiB)" of device 0, or why none is usable */
void fm_cuda_describe(char *buf, size_t len);

/* ---- test-only kernel entry points: host buffers in, host buffers out ----
 * Each runs the CUDA kernel on device copies of the inputs; the caller compares with the C
 * reference (fm_quant.c / fm_ops.c), which fm_ref_* below runs on the same inputs. */
/* Y[n, rows] = X[n, cols] W^T. bits: 2..8 affine (q, scales, biases), 16 bf16 (q = data),
 * 32 f32 (q = data). mma: fm_debug_params.cuda_mma (n >= 2: tensor cores or the fp32 kernels). */
fm_status fm_cuda_test_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols,
                              const void *q, const uint16_t *scales, const uint16_t *biases,
                              const float *X, int64_t n, float *Y, int32_t mma, char *err, size_t errlen);
fm_status fm_ref_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *q,
                        const uint16_t *scales, const uint16_t *biases, const float *X, int64_t n,
                        float *Y, char *err, size_t errlen);
/* Y[n, rows] = silu(X G^T) * (X U^T) (bits and mma as above): G of bits / group_size, U of up_bits /
 * up_group_size (a different format takes the split gate/up path) */
fm_status fm_cuda_test_swiglu(int32_t bits, int32_t group_size, int32_t up_bits, int32_t up_group_size, int64_t rows, int64_t cols, const void *qg,
                              const uint16_t *sg, const uint16_t *bg, const void *qu, const uint16_t *su,
                              const uint16_t *bu, const float *X, int64_t n, float *Y, int32_t mma, char *err,
                              size_t errlen);
/* routed experts grouped by expert (the prefill path): Ye[p, H] = down_e(silu(gate_e x) * up_e x)
 * for pair p = t*K + k, e = ids[p], x = X[t]. blocks: E expert blocks of block_bytes, gate/up
 * [I, H] and down [H, I] of one kind (bits as above) at offs[9] (gate w, s, b, up w, s, b, down
 * w, s, b; s and b unused for bf16) inside a block. */
fm_status fm_cuda_test_experts(int32_t bits, int32_t group_size, int64_t H, int64_t I, int32_t E, int32_t K,
                               const void *blocks, uint64_t block_bytes, const uint64_t *offs, const int32_t *ids,
                               const float *X, int64_t n, float *Ye, char *err, size_t errlen);
/* op: 0 rmsnorm(x, w, offset) 1 gated rmsnorm(x, z, w) 2 l2norm(x) on n rows of d */
fm_status fm_cuda_test_norm(int32_t op, const float *x, const float *z, const float *w, int64_t n,
                            int64_t d, float eps, float offset, float *y, char *err, size_t errlen);
fm_status fm_ref_norm(int32_t op, const float *x, const float *z, const float *w, int64_t n, int64_t d,
                      float eps, float offset, float *y, char *err, size_t errlen);
/* routing of n tokens: softmax over E logits, top-K (descending, ties lower index), renormalised
 * when norm */
fm_status fm_cuda_test_route(const float *logits, int64_t n, int32_t E, int32_t K, int32_t norm,
                             int32_t *idx, float *w, char *err, size_t errlen);
fm_status fm_ref_route(const float *logits, int64_t n, int32_t E, int32_t K, int32_t norm, int32_t *idx,
                       float *w, char *err, size_t errlen);
/* causal depthwise conv1d + SiLU over n tokens: X, Y [n, C]; state [(k-1), C] updated; w [C, k] */
fm_status fm_cuda_test_conv1d(const float *X, int64_t n, float *state, const float *w, int32_t C, int32_t k,
                              float *Y, char *err, size_t errlen);
fm_status fm_ref_conv1d(const float *X, int64_t n, float *state, const float *w, int32_t C, int32_t k,
                        float *Y, char *err, size_t errlen);
/* GatedDeltaNet for n tokens: qkv [n, 2*nk*dk + nv*dv] (after conv), z [n, nv*dv], a, b [n, nv],
 * A_log, dt_bias [nv], norm_w [dv]; S [nv, dk, dv] updated; O [n, nv*dv] (l2norm of q, k, q scale,
 * recurrence and the gated RMSNorm, as the engine's linear-attention layer); gdn_chunk:
 * fm_debug_params.gdn_chunk (which kernel runs a pass of n tokens) */
fm_status fm_cuda_test_gdn(const float *qkv, const float *z, const float *a, const float *b,
                           const float *A_log, const float *dt_bias, const float *norm_w, int64_t n,
                           int32_t nk, int32_t nv, int32_t dk, int32_t dv, float eps, float *S, float *O,
                           int32_t gdn_chunk, char *err, size_t errlen);
fm_status fm_ref_gdn(const float *qkv, const float *z, const float *a, const float *b, const float *A_log,
                     const float *dt_bias, const float *norm_w, int64_t n, int32_t nk, int32_t nv, int32_t dk,
                     int32_t dv, float eps, float *S, float *O, char *err, size_t errlen);
/* Full attention of n new tokens at positions pos..pos+n-1: qg [n, nh*dh*(gate?2:1)], k, v
 * [n, nkv*dh]; kc, vc [pos+n, nkv*dh] caches holding positions < pos (rows pos.. are written);
 * q/k RMSNorm (weights may be NULL), NeoX RoPE on rot dims, GQA, causal softmax, sigmoid gate.
 * out [n, nh*dh]. */
fm_status fm_cuda_test_attention(const float *qg, const float *k, const float *v, const float *q_norm,
                                 const float *k_norm, float *kc, float *vc, int64_t n, int32_t pos,
                                 int32_t nh, int32_t nkv, int32_t dh, int32_t rot, float theta, int32_t gate,
                                 float eps, float offset, float *out, char *err, size_t errlen);
fm_status fm_ref_attention(const float *qg, const float *k, const float *v, const float *q_norm,
                           const float *k_norm, float *kc, float *vc, int64_t n, int32_t pos, int32_t nh,
                           int32_t nkv, int32_t dh, int32_t rot, float theta, int32_t gate, float eps,
                           float offset, float *out, char *err, size_t errlen);

/* ---- measurement helpers (bench/) ---- */
/* pinned host -> device copy bandwidth (GB/s) of `bytes`, median of reps */
fm_status fm_cuda_h2d_bandwidth(uint64_t bytes, int32_t reps, double *gbps, char *err, size_t errlen);
/* device -> device copy bandwidth (GB/s, bytes read + written) */
fm_status fm_cuda_d2d_bandwidth(uint64_t bytes, int32_t reps, double *gbps, char *err, size_t errlen);
/* CUDA-side counters of a session: host syncs, H2D bytes, per-tier hits (cumulative) */
typedef struct {
    int64_t syncs;          /* host waits on the device (stream/event synchronizations) */
    int64_t h2d_bytes;      /* expert bytes copied host -> device */
    int64_t vram_hits, ram_hits, storage_reads;
    int64_t vram_slots, ram_slots;
    int32_t resident;       /* 1: every expert lives in VRAM (no per-layer sync) */
    /* CPU split (fm_debug_params.cpu_split, decode with a pinned host tier): missed experts computed on the
     * host from the pinned cache instead of copied (counted in ram_hits, not in h2d_bytes) */
    int64_t cpu_experts, cpu_layers;
    double cpu_ms;          /* host wall time of those expert computations */
    double split;           /* the setting of the last eval: <0 auto, else the fraction */
    double h2d_gbps, cpu_gbps; /* the model's measured rates (EMA over layers; 0: not measured yet) */
    double head_ms;         /* device time of the final norm + lm_head (CUDA events; plain launches only) */
    int64_t head_evals;     /* evals that timed it */
} fm_cuda_counters;
void fm_cuda_session_counters(const struct fm_session *s, fm_cuda_counters *out);

#ifdef __cplusplus
}
#endif
#endif
