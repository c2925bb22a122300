/* fm.h: the public C API of the pyflashmoe core.
 *
 * Owns: the opaque handles (model, session), status codes, parameter and stats structs, and the
 * quantization entry points. Does not own: tokenization, sampling, chat templates (Python).
 *
 * Conventions (every function):
 *  - returns fm_status; FM_OK == 0. On error a NUL-terminated message naming the file, field or
 *    parameter is written into err[errlen] (err may be NULL).
 *  - the caller owns every buffer and passes its length; the library never keeps a pointer to one
 *    after the call returns.
 *  - no global state, no exit(), no printing. Thread-safety: one session is used by one thread at a
 *    time; several sessions of one model may run concurrently.
 */
#ifndef FM_H
#define FM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fm_model fm_model;     /* dense weights (in memory), expert files, expert cache, thread pools */
typedef struct fm_session fm_session; /* one timeline: KV cache + linear-attention state */

typedef enum {
    FM_OK = 0,
    FM_ERR_ARG = -1,     /* a bad argument: the message names the parameter */
    FM_ERR_IO = -2,      /* a read/open failed: the message names the file */
    FM_ERR_FORMAT = -3,  /* the model dir is malformed: the message names the file and field */
    FM_ERR_OOM = -4,     /* an allocation failed */
    FM_ERR_BACKEND = -5, /* the backend is unavailable or failed */
    FM_ERR_NUMERIC = -6, /* a non-finite hidden state or logit: the message names the layer and the
                            position; the session was reset (damaged weights or expert data) */
    FM_ERR_CTX_FULL = 1  /* the session has no room for the tokens; state unchanged */
} fm_status;

typedef enum { FM_BACKEND_CPU = 0, FM_BACKEND_CUDA = 1 } fm_backend_kind;

/* Switches for comparisons and breakdowns (CUDA backend; the CPU backend ignores them). The
 * defaults (fm_model_default_params) are the measured-faster choice. Checked at fm_model_open and
 * by fm_model_set_debug: FM_ERR_ARG names the field. */
typedef struct {
    int32_t cuda_graph;  /* 1 (default): a resident decode step is one CUDA graph; 0: plain launches */
    int32_t cuda_timing; /* 0 (default); 1: a host sync after every op, its time charged to fm_stats.ms_*
                            (breakdowns; slower overall) */
    int32_t cuda_mma;    /* 1 (default): prefill matmuls and grouped experts on tensor cores; 0: the fp32
                            kernels */
    int32_t gdn_chunk;   /* GatedDeltaNet: the chunked kernel for passes of at least max(gdn_chunk, 2)
                            tokens; 0: never (the sequential kernel); default 2; must be >= 0 */
    double cpu_split;    /* decode with a pinned host cache: share of the missed experts computed on the
                            CPU. < 0 (default -1): automatic, by the measured PCIe and CPU rates; 0: off;
                            (0, 1]: that fraction of the misses found in the pinned cache */
} fm_debug_params;

typedef struct {
    int32_t backend;           /* fm_backend_kind */
    int32_t n_threads;         /* compute threads; <= 0: number of online CPUs */
    int32_t io_threads;        /* pread threads; <= 0: default (K of the model, at least 4) */
    int32_t direct_io;         /* 1: O_DIRECT reads into aligned buffers (bypass page cache) */
    int32_t experts_per_token; /* <= 0: the model's K; else override (1..n_experts) */
    uint64_t ram_budget;       /* bytes for the engine's expert RAM cache (LFU, fm_io.c); 0: none (page cache only) */
    uint64_t vram_budget;      /* CUDA: bytes for the VRAM expert cache */
    int32_t verify_sizes;      /* 1 (default): check every file's size against the manifest at open */
    int32_t prefetch;          /* decode predicts the next MoE layer's experts from the current hidden
                                  state and has the kernel read them into the page cache early
                                  (buffered I/O only; results unchanged). 0: off; 1 (default): the
                                  top ceil(0.3 K) predicted; n >= 2: the top n (at most K) */
    int32_t lock_dense;        /* 1 (default): mlock the dense weights (read into anonymous memory at
                                  open) so memory pressure from the streamed experts cannot page them
                                  out; when RLIMIT_MEMLOCK refuses, they stay unlocked
                                  (fm_model_dense_locked tells) */
    fm_debug_params debug;     /* comparison switches (see fm_debug_params); fm_model_set_debug changes them */
} fm_model_params;

typedef struct {
    /* cumulative since the session was created or fm_session_reset_stats */
    int64_t n_eval_calls;
    int64_t n_tokens;          /* tokens evaluated */
    int64_t bytes_read;        /* bytes read from expert files (storage tier) */
    int64_t expert_loads;      /* expert blocks read from storage */
    int64_t expert_hits;       /* expert blocks served from the engine's RAM cache */
    int64_t expert_hits_vram;  /* CUDA: served from the VRAM cache */
    double ms_total;
    double ms_attn;            /* attention + linear attention (incl. norms, projections) */
    double ms_route;           /* router matvec + softmax + top-k */
    double ms_io_wait;         /* time the compute thread waited for expert reads */
    double ms_expert;          /* routed + shared expert compute */
    double ms_other;           /* embeddings, final norm, lm_head */
    /* last eval call only */
    int64_t last_bytes_read;
    int64_t last_expert_loads;
    int64_t last_expert_hits;
    int32_t last_n_tokens;
    /* speculative prefetch (cumulative): blocks queued for prefetch, and how many of them the
     * real routing of that layer then used */
    int64_t prefetch_blocks;
    int64_t prefetch_used;
} fm_stats;

typedef void (*fm_log_fn)(void *user, int level, const char *msg);

/* ---- model ---- */
fm_model_params fm_model_default_params(void);

/* Open a model directory written by the converter: parses DIR/pyflashmoe.json, reads
 * dense.safetensors whole into private anonymous memory (page-aligned, read-only afterwards; the
 * file is not referenced after open, so truncating or replacing it later cannot fault the process),
 * opens the expert files, validates sizes, shapes, dtypes, offsets and alignment, and rejects
 * manifest file paths that leave the model dir (absolute, or with a ".." component).
 * FM_ERR_FORMAT / FM_ERR_IO name the file and the field on failure. */
fm_status fm_model_open(fm_model **out, const char *dir, const fm_model_params *params,
                        char *err, size_t errlen);
void fm_model_close(fm_model *m);
void fm_model_set_log(fm_model *m, fm_log_fn fn, void *user);
/* The model's debug switches now, and a change of them (checked as at open: FM_ERR_ARG names the
 * field, nothing changes). Waits for an eval running on any session of the model; the change
 * applies from the next eval. */
fm_debug_params fm_model_debug(const fm_model *m);
fm_status fm_model_set_debug(fm_model *m, const fm_debug_params *d, char *err, size_t errlen);

int32_t fm_model_n_vocab(const fm_model *m);
int32_t fm_model_n_layers(const fm_model *m);
int32_t fm_model_hidden(const fm_model *m);
int32_t fm_model_experts_per_token(const fm_model *m);
uint64_t fm_model_dense_bytes(const fm_model *m);
int32_t fm_model_dense_locked(const fm_model *m); /* 1 when the dense weights are mlock'ed */
uint64_t fm_model_expert_block_bytes(const fm_model *m, int32_t il); /* 0 for non-MoE layers */

/* ---- session ---- */
fm_status fm_session_new(fm_session **out, fm_model *m, int32_t n_ctx, char *err, size_t errlen);
void fm_session_free(fm_session *s);
void fm_session_reset(fm_session *s);        /* pos 0; KV rows written so far, conv and recurrent state zeroed */
int32_t fm_session_pos(const fm_session *s); /* tokens held */
int32_t fm_session_n_ctx(const fm_session *s);

/* Evaluate n_tokens tokens at positions pos..pos+n-1.
 * logits: float[n_logits]; all_logits=0: n_logits >= vocab, gets the last token's logits;
 * all_logits=1: n_logits >= n_tokens*vocab, row t gets token t's logits. logits may be NULL
 * (prefill without output). FM_ERR_CTX_FULL when pos+n_tokens > n_ctx (nothing evaluated);
 * FM_ERR_ARG for a token id outside [0, vocab). On any other error mid-eval (FM_ERR_IO, FM_ERR_NUMERIC,
 * ...) the state before the call cannot be restored: the session is reset (pos 0, KV rows,
 * convolution and recurrent state zeroed) and the error says so.
 * Numerical guard (always on): after the embedding and after every layer the hidden state of the
 * call's tokens is scanned for NaN/Inf, and so are the logits returned; the first hit ends the call
 * with FM_ERR_NUMERIC naming the layer and the position. */
fm_status fm_session_eval(fm_session *s, const int32_t *tokens, int32_t n_tokens, float *logits,
                          int64_t n_logits, int32_t all_logits, char *err, size_t errlen);

/* One decode step of n_seqs sessions of one model together: token tokens[i] for sessions[i] at its
 * own position (each session advances by one). Every layer's dense weights are read once for the
 * batch, and every MoE layer reads the union of the experts the batch routes to once.
 * logits: float[n_logits >= n_seqs * vocab], row i for sessions[i]. The sessions must be distinct,
 * of one model, with no routing trace set (FM_ERR_ARG naming the index). FM_ERR_CTX_FULL when a
 * session is full (nothing evaluated). On an error mid-step every session of the batch is reset.
 * Statistics: each session counts its token; the step's I/O, timing and eval call are charged to
 * sessions[0]. n_seqs == 1 is fm_session_eval of one token. */
fm_status fm_session_eval_batch(fm_session *const *sessions, int32_t n_seqs, const int32_t *tokens, float *logits,
                                int64_t n_logits, char *err, size_t errlen);

void fm_session_get_stats(const fm_session *s, fm_stats *out);
void fm_session_reset_stats(fm_session *s);

/* ---- session state snapshots (fm_state.c) ----
 * The state at the session's current position: the KV rows [0, pos) of the full-attention layers,
 * the conv and recurrent states of the linear-attention layers, and pos, behind a header (magic,
 * format version, the model's dims and layer kinds, a fingerprint of its layer table, features and
 * weight formats, the weights' identity (a hash of the model dir's pyflashmoe.json, which lists the
 * sha256 of every weight file: read at each save and load, FM_ERR_IO when it cannot be), a
 * checksum). Host byte order. The payload is the same for
 * every backend: a snapshot saved from a CPU session loads into a CUDA session of the same model
 * dir and back. Save and load hold the model mutex (they wait for an eval of any session of the
 * model, as fm_session_eval does); the routing trace and the stats are not part of the state.
 *  - fm_session_state_size: *bytes = what fm_session_state_save writes now (it grows with pos);
 *    FM_ERR_ARG for a NULL argument.
 *  - fm_session_state_save: writes it into buf[cap]; *written (may be NULL) = the bytes written, or
 *    the bytes needed with FM_ERR_ARG when cap is smaller (buf may then be NULL).
 *  - fm_session_state_load: replaces the session's state and position with the snapshot buf[len].
 *    Refused with nothing changed: FM_ERR_FORMAT naming what differs for a buffer that is truncated,
 *    too long, damaged (checksum), not a snapshot (magic), of another format version, or of another
 *    model (the first differing dim or layer kind is named; otherwise the fingerprint, or "other
 *    weights");
 *    FM_ERR_CTX_FULL when the snapshot's pos exceeds the session's n_ctx. A backend failure
 *    during the copy leaves the state undefined: the session is reset (pos 0) and the error says so.
 *  - FM_ERR_BACKEND when the model's backend has no state hooks. */
fm_status fm_session_state_size(const fm_session *s, uint64_t *bytes);
fm_status fm_session_state_save(fm_session *s, void *buf, uint64_t cap, uint64_t *written, char *err,
                                size_t errlen);
fm_status fm_session_state_load(fm_session *s, const void *buf, uint64_t len, char *err, size_t errlen);

/* ---- routing trace (optional; off by default, and then it costs one pointer test per layer) ----
 * Caller-owned buffers the CPU forward pass fills while they are set; any of them may be NULL.
 *   ids:      int32[cap_tokens * n_layers * K] (K = fm_model_experts_per_token): for the t-th token
 *             evaluated since fm_session_set_trace (prefill and decode alike, t < cap_tokens), the
 *             K expert ids layer il routed it to, by descending router probability, at
 *             ids[(t * n_layers + il) * K + k]; -1 for a layer without routed experts. Tokens past
 *             cap_tokens are counted (fm_session_trace_tokens) but their ids are not stored.
 *   counts:   int64[n_layers * n_experts] (fm_model_n_experts): counts[il * n_experts + e] += 1 per
 *             token that layer il routed to expert e (never capped; each MoE row sums to n x K).
 *   layer_ms: double[n_layers * 2]: += wall ms of layer il's token mixer [il * 2] and its FFN
 *             [il * 2 + 1] (routing, expert reads and compute).
 * The buffers are added to, never cleared: the caller zeroes them. The pointers are kept until the
 * next fm_session_set_trace (NULL or an all-NULL trace: off) or fm_session_free, so the buffers must
 * outlive that. Tokens of an eval that fails mid-way are not counted in fm_session_trace_tokens and
 * their ids rows are left as garbage past it, but counts and layer_ms include the layers that ran.
 * FM_ERR_BACKEND for a CUDA session: the CUDA backend does not record the trace. */
typedef struct {
    int32_t *ids;
    int64_t cap_tokens; /* rows of ids (>= 0; 0 with ids NULL) */
    int64_t *counts;
    double *layer_ms;
} fm_trace;

int32_t fm_model_n_experts(const fm_model *m); /* routed experts per MoE layer (0: none) */
fm_status fm_session_set_trace(fm_session *s, const fm_trace *trace, char *err, size_t errlen);
int64_t fm_session_trace_tokens(const fm_session *s); /* tokens traced since the last set_trace */

/* ---- group-affine quantization (MLX layout, see docs/INTERNALS.md) ---- */
/* w: float[rows*cols] row-major; cols % group_size == 0; bits in {2,3,4,5,6,8}; group_size in {32,64,128}.
 * q: uint32[rows*cols*bits/32]; scales, biases: bf16 bit patterns [rows*cols/group_size]. */
fm_status fm_quantize_affine(const float *w, int64_t rows, int64_t cols, int32_t bits,
                             int32_t group_size, uint32_t *q, uint16_t *scales, uint16_t *biases,
                             char *err, size_t errlen);
fm_status fm_dequantize_affine(const uint32_t *q, const uint16_t *scales, const uint16_t *biases,
                               int64_t rows, int64_t cols, int32_t bits, int32_t group_size,
                               float *out, char *err, size_t errlen);

/* y[rows] = W x, W quantized as above (bits 16 means W is bf16 [rows, cols] passed in q as uint16).
 * Kernel chosen by the running CPU (AVX-512, AVX2/FMA, NEON, scalar). n_threads<=1: calling thread. */
fm_status fm_matvec(const void *q, const uint16_t *scales, const uint16_t *biases, int64_t rows,
                    int64_t cols, int32_t bits, int32_t group_size, const float *x, float *y,
                    int32_t n_threads, char *err, size_t errlen);

/* Which SIMD path is in use: "avx512", "avx2", "neon", "scalar". FM_SIMD=scalar|avx2|avx512 in the
 * environment forces a lower path (testing). */
const char *fm_simd_name(void);

/* ---- I/O probe ----
 * The engine's own disk probe: n_reads random reads of block_bytes (a multiple of 4096) at
 * block-aligned offsets of path, from `threads` threads (<= 0: 4), through O_DIRECT when direct_io
 * (FM_ERR_IO if the filesystem refuses it). *gbps = bytes read / wall time / 1e9. Warm or cold
 * depends on the page cache: the caller drops it first for a cold number. */
fm_status fm_io_probe(const char *path, uint64_t block_bytes, int32_t n_reads, int32_t threads, int32_t direct_io,
                      double *gbps, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
