/* fm_internal.h: types shared by the csrc C files, never seen by Python.
 *
 * Owns: bf16 helpers, the quantized-matrix view (fm_qmat) and the kernel entry points every backend
 * implements, the compute thread pool, timing. Does not own: model layout (fm_model.c), I/O (fm_io.c).
 */
#ifndef FM_INTERNAL_H
#define FM_INTERNAL_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "fm.h"

/* ---- bf16 ---- */
static inline float fm_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}
static inline uint16_t fm_f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    uint32_t r = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + r) >> 16);
}

/* ---- errors ---- */
static inline fm_status fm_errf(char *err, size_t errlen, fm_status st, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return st;
}

static inline double fm_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* ---- compute thread pool (fm_pool.c) ----
 * Persistent workers; fm_pool_for splits [0, n) into chunks of at least `grain` and runs
 * fn(ctx, start, end, tid) on the workers and the calling thread, returning when all are done.
 * Not re-entrant: one fm_pool_for at a time per pool. */
typedef struct fm_pool fm_pool;
typedef void (*fm_pool_fn)(void *ctx, int64_t start, int64_t end, int32_t tid);
fm_pool *fm_pool_new(int32_t n_threads); /* n_threads counts the caller; <=0: online CPUs */
void fm_pool_free(fm_pool *p);
int32_t fm_pool_size(const fm_pool *p);
void fm_pool_for(fm_pool *p, int64_t n, int64_t grain, fm_pool_fn fn, void *ctx);

/* ---- matrices (fm_quant.c is the reference for every backend) ---- */
typedef enum { FM_DT_F32 = 0, FM_DT_BF16 = 1, FM_DT_AFFINE = 2 } fm_dtype;

typedef struct {
    fm_dtype dt;
    int32_t bits, group_size;  /* FM_DT_AFFINE only */
    int64_t rows, cols;        /* logical [out, in] */
    const void *data;          /* FM_DT_F32: float[rows*cols]; FM_DT_BF16: uint16_t[rows*cols] */
    const uint32_t *q;         /* FM_DT_AFFINE: uint32[rows * cols*bits/32] */
    const uint16_t *scales;    /* FM_DT_AFFINE: bf16[rows * cols/group_size] */
    const uint16_t *biases;
} fm_qmat;

/* y[r] = sum_c W[r,c] x[c] for r in [r0, r1); single thread; SIMD chosen at run time. */
void fm_qmat_matvec_rows(const fm_qmat *W, const float *x, float *y, int64_t r0, int64_t r1);
/* y = W x over the pool (pool may be NULL: calling thread). */
void fm_qmat_matvec(fm_pool *pool, const fm_qmat *W, const float *x, float *y);
/* Y[n, rows] = X[n, cols] W^T (prefill; reads each weight row once for all n vectors). */
void fm_qmat_matmul(fm_pool *pool, const fm_qmat *W, const float *X, int64_t n, float *Y);
/* out[cols] = row r of W dequantized (embedding lookup). */
void fm_qmat_get_row(const fm_qmat *W, int64_t r, float *out);
/* bytes of weight data in W (for bandwidth stats) */
uint64_t fm_qmat_bytes(const fm_qmat *W);

/* float dot and axpy with the run-time SIMD choice (attention, delta rule) */
float fm_dot_f32(const float *a, const float *b, int64_t n);
void fm_axpy_f32(float *y, float a, const float *x, int64_t n); /* y += a*x */

/* ---- JSON (fm_json.c): a small read-only DOM for the manifest ---- */
typedef struct fm_json fm_json;
typedef enum { FM_JSON_NULL, FM_JSON_BOOL, FM_JSON_NUM, FM_JSON_STR, FM_JSON_ARR, FM_JSON_OBJ } fm_json_type;
/* Parse len bytes; NULL on error with "line L col C: what" in err. */
fm_json *fm_json_parse(const char *text, size_t len, char *err, size_t errlen);
void fm_json_free(fm_json *root);                    /* frees the whole tree (root only) */
fm_json_type fm_json_kind(const fm_json *v);
const fm_json *fm_json_get(const fm_json *obj, const char *key); /* NULL if absent / not an object */
int32_t fm_json_len(const fm_json *v);               /* array or object entries; 0 otherwise */
const fm_json *fm_json_at(const fm_json *v, int32_t i);       /* i-th array element or object value */
const char *fm_json_key_at(const fm_json *obj, int32_t i);     /* i-th object key */
double fm_json_num(const fm_json *v, double dflt);   /* dflt if NULL / not a number */
int fm_json_bool(const fm_json *v, int dflt);
const char *fm_json_str(const fm_json *v);           /* NULL if not a string */

/* ---- expert reader (fm_io.c): owns I/O threads, slot buffers and the optional RAM cache ----
 * Usage per MoE layer: fm_io_submit(il, experts, n) starts all n reads at once (cache hits need no
 * read), the caller computes something else (shared expert), then fm_io_wait() returns a pointer
 * to each requested block, valid until the next fm_io_submit. n <= max_batch. */
typedef struct fm_io fm_io;
typedef struct {
    const char *path;       /* NULL: layer has no experts */
    uint64_t data_offset;   /* byte offset of expert 0 in the file (multiple of 4096) */
    uint64_t block_bytes;   /* multiple of 4096 */
    int32_t n_experts;
} fm_expert_file;
typedef struct {
    int64_t bytes_read, loads, hits;
    double ms_wait;
} fm_io_stats;
fm_status fm_io_open(fm_io **out, const fm_expert_file *files, int32_t n_layers, int32_t io_threads,
                     int32_t direct_io, uint64_t ram_budget, int32_t max_batch, char *err, size_t errlen);
/* Hooks for a backend that moves blocks on (the CUDA backend: page-locked buffers, a host-to-device
 * copy per block as soon as it lands). Any member may be NULL; alloc and free are set together.
 *   alloc(user, bytes): a block buffer (bytes = the largest block_bytes; aligned to 4096 for
 *     O_DIRECT), called on the thread of fm_io_submit when a read slot needs memory (cache entries
 *     are former slots: every block buffer comes from here). NULL: fm_io_submit fails with FM_ERR_OOM.
 *   free(user, p, bytes): each buffer alloc returned, once, from fm_io_close.
 *   on_block(user, index, block): once per distinct block of a request when it is available: cache
 *     hits from inside fm_io_submit on its thread (all of them before it returns), reads on the I/O
 *     thread that did the read, right after it landed and before fm_io_next can hand it out. index:
 *     the block's first request index. Not called for a failed read. Must be thread-safe and quick,
 *     and must not call fm_io.
 * Buffer reuse: a block handed out by a request is not written by fm_io before the next fm_io_submit
 * (see fm_io.c), so asynchronous uses (device copies) of a request's blocks must be finished before
 * the caller submits again. */
typedef struct {
    void *(*alloc)(void *user, size_t bytes);
    void (*free)(void *user, void *p, size_t bytes);
    void (*on_block)(void *user, int32_t index, const uint8_t *block);
    void *user;
} fm_io_hooks;
/* fm_io_open with hooks (NULL: none, the same as fm_io_open) */
fm_status fm_io_open_ex(fm_io **out, const fm_expert_file *files, int32_t n_layers, int32_t io_threads,
                        int32_t direct_io, uint64_t ram_budget, int32_t max_batch, const fm_io_hooks *hooks,
                        char *err, size_t errlen);
/* The RAM-cache copy of block (il, ie), or NULL when it is not cached (or out of range). Counts no
 * use and pins nothing: the pointer is valid until the next fm_io_submit or fm_io_wait. For a
 * caller deciding before a request which blocks it would find in RAM. Not with a request's I/O
 * threads in mind: call it from the thread that submits. */
const uint8_t *fm_io_peek(const fm_io *io, int32_t il, int32_t ie);
int32_t fm_io_cache_capacity(const fm_io *io); /* blocks the RAM cache can hold (ram_budget / block) */
int32_t fm_io_max_batch(const fm_io *io);      /* the max_batch it was opened with */
void fm_io_close(fm_io *io);
fm_status fm_io_submit(fm_io *io, int32_t il, const int32_t *experts, int32_t n, char *err, size_t errlen);
fm_status fm_io_wait(fm_io *io, const uint8_t **blocks, fm_io_stats *st, char *err, size_t errlen);
/* Between fm_io_submit and fm_io_wait: blocks until one more distinct block of the request is in
 * (cache hits first, then reads in completion order), sets *index (its first request index) and
 * *block (NULL if its read failed) and returns 1; 0 once every distinct block was handed out.
 * The pointer stays valid until the next fm_io_submit; fm_io_wait must still be called (stats,
 * RAM cache, error text) and then returns at once. */
int32_t fm_io_next(fm_io *io, int32_t *index, const uint8_t **block);
/* 1 when direct_io was asked for and every expert file is read through O_DIRECT; 0 when the
 * filesystem refused it (reads fell back to buffered) or direct_io was not asked for. */
int32_t fm_io_direct_active(const fm_io *io);
/* Speculative prefetch into the page cache (buffered reads only). fm_io_set_prefetch(v > 0) starts
 * the prefetch thread and keeps v (fm_model_params.prefetch), returned by it and by
 * fm_io_prefetch_active while prefetch is on (0: off, always with direct_io). fm_io_prefetch queues the
 * blocks of (il, experts[n]) that are not in the RAM cache, replacing what was queued and not yet
 * issued; never blocks on the disk; returns q, the number queued, and moves the queued experts to
 * experts[0..q). Results never change. */
int32_t fm_io_set_prefetch(fm_io *io, int32_t on);
int32_t fm_io_prefetch_active(const fm_io *io);
int32_t fm_io_prefetch(fm_io *io, int32_t il, int32_t *experts, int32_t n);
/* Disk probe (also in fm.h): n_reads random block-aligned reads of path, `threads` in flight. */
fm_status fm_io_probe(const char *path, uint64_t block_bytes, int32_t n_reads, int32_t threads, int32_t direct_io,
                      double *gbps, char *err, size_t errlen);

#endif
