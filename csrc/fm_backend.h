/* fm_backend.h: the backend seam of the forward pass, and the CUDA backend's entry points.
 *
 * Owns: fm_backend_ops (a table of function pointers at layer-op granularity: embed, token mixer
 * (full | linear attention), FFN (MoE | dense), final norm + lm_head), the CUDA entry points that
 * fm_model.c / fm_forward.c call when params.backend == FM_BACKEND_CUDA, and the test-only kernel
 * entry points (fm_cuda_test_*) that tests/test_cuda.py reaches through pyflashmoe/_cuda.pxi.
 * Does not own: the layer table (fm_model.h), the CPU kernels (fm_quant.c, fm_ops.c).
 *
 * The layer loop (the same for every backend, see fm_cuda.cu:cuda_forward and fm_forward.c):
 *   ops->embed(tokens) ; for each layer L: ops->mixer[L->attn](L) ; ops->ffn[L->ffn](L) ;
 *   ops->final(logits)
 * Each op applies its own pre-norm and residual add, so the hidden state can stay in the
 * backend's memory (VRAM for CUDA) for the whole pass.
 *
 * Builds without CUDA link csrc/cuda/fm_cuda_stub.c: fm_cuda_compiled() == 0 and every entry
 * point returns FM_ERR_BACKEND with a message saying so.
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

/* One backend's layer ops over one evaluation of n tokens at position pos (ctx: the backend's
 * per-eval state). Every op returns FM_OK or an fm_status with err filled. */
typedef struct {
    const char *name;
    fm_status (*embed)(void *ctx, const int32_t *tokens, int64_t n, char *err, size_t errlen);
    fm_status (*attn_full)(void *ctx, int32_t il, char *err, size_t errlen);
    fm_status (*attn_linear)(void *ctx, int32_t il, char *err, size_t errlen);
    fm_status (*moe)(void *ctx, int32_t il, char *err, size_t errlen);
    fm_status (*ffn_dense)(void *ctx, int32_t il, char *err, size_t errlen);
    /* logits: host float[n_logits] (NULL: none); all_logits as fm_session_eval */
    fm_status (*final)(void *ctx, float *logits, int32_t all_logits, char *err, size_t errlen);
} fm_backend_ops;

/* ---- CUDA backend (csrc/cuda/fm_cuda.cu, or the stub) ---- */
int32_t fm_cuda_compiled(void);  /* 1 when this build has the CUDA backend */
int32_t fm_cuda_available(void); /* compiled in AND a CUDA device is usable */
/* "NAME (sm_XY, N MiB)" of device 0, or why none is usable */
void fm_cuda_describe(char *buf, size_t len);

/* Called by fm_model_open after the CPU-side load succeeded (weights mmap'd, expert layout read):
 * uploads the dense weights to device 0, sets up the VRAM expert slot cache (vram_budget), the
 * pinned host cache (ram_budget) and the pinned staging + pread threads. *out is the backend's
 * model state (stored in fm_model.cuda). */
fm_status fm_cuda_model_open(struct fm_model *m, const fm_model_params *p, void **out, char *err,
                             size_t errlen);
void fm_cuda_model_close(void *cm);
/* Per session: KV cache, conv + recurrent state and scratch in VRAM (stored in fm_session.cuda). */
fm_status fm_cuda_session_new(struct fm_session *s, void **out, char *err, size_t errlen);
void fm_cuda_session_free(void *cs);
void fm_cuda_session_reset(void *cs);
/* The whole evaluation (arguments already validated by fm_session_eval; the model mutex held).
 * Updates s->st (n_eval_calls/ms_total/n_tokens are the caller's). */
fm_status fm_cuda_session_eval(struct fm_session *s, const int32_t *tokens, int32_t n_tokens,
                               float *logits, int32_t all_logits, char *err, size_t errlen);

/* ---- test-only kernel entry points: host buffers in, host buffers out ----
 * Each runs the CUDA kernel on device copies of the inputs; the caller compares with the C
 * reference (fm_quant.c / fm_ops.c), which fm_ref_* below runs on the same inputs. */
/* Y[n, rows] = X[n, cols] W^T. bits: 2..8 affine (q, scales, biases), 16 bf16 (q = data),
 * 32 f32 (q = data). */
fm_status fm_cuda_test_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols,
                              const void *q, const uint16_t *scales, const uint16_t *biases,
                              const float *X, int64_t n, float *Y, char *err, size_t errlen);
fm_status fm_ref_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *q,
                        const uint16_t *scales, const uint16_t *biases, const float *X, int64_t n,
                        float *Y, char *err, size_t errlen);
/* Y[n, rows] = silu(X G^T) * (X U^T), G and U of one kind (bits as above) */
fm_status fm_cuda_test_swiglu(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *qg,
                              const uint16_t *sg, const uint16_t *bg, const void *qu, const uint16_t *su,
                              const uint16_t *bu, const float *X, int64_t n, float *Y, char *err, size_t errlen);
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
 * recurrence and the gated RMSNorm, as the engine's linear-attention layer) */
fm_status fm_cuda_test_gdn(const float *qkv, const float *z, const float *a, const float *b,
                           const float *A_log, const float *dt_bias, const float *norm_w, int64_t n,
                           int32_t nk, int32_t nv, int32_t dk, int32_t dv, float eps, float *S, float *O,
                           char *err, size_t errlen);
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
    /* CPU split (FM_CUDA_CPU_SPLIT, decode with a pinned host tier): missed experts computed on the
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
