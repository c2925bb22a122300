# Mirror of csrc/fm.h, nothing else.
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t

cdef extern from "fm.h" nogil:
    ctypedef struct fm_model:
        pass
    ctypedef struct fm_session:
        pass
    ctypedef enum fm_status:
        FM_OK
        FM_ERR_ARG
        FM_ERR_IO
        FM_ERR_FORMAT
        FM_ERR_OOM
        FM_ERR_BACKEND
        FM_ERR_NUMERIC
        FM_ERR_CTX_FULL
    ctypedef enum fm_backend_kind:
        FM_BACKEND_CPU
        FM_BACKEND_CUDA

    ctypedef struct fm_debug_params:
        int32_t cuda_graph
        int32_t cuda_timing
        int32_t cuda_mma
        int32_t gdn_chunk
        double cpu_split

    ctypedef struct fm_model_params:
        int32_t backend
        int32_t n_threads
        int32_t io_threads
        int32_t direct_io
        int32_t experts_per_token
        uint64_t ram_budget
        uint64_t vram_budget
        int32_t verify_sizes
        int32_t prefetch
        int32_t lock_dense
        fm_debug_params debug

    ctypedef struct fm_stats:
        int64_t n_eval_calls
        int64_t n_tokens
        int64_t bytes_read
        int64_t expert_loads
        int64_t expert_hits
        int64_t expert_hits_vram
        double ms_total
        double ms_attn
        double ms_route
        double ms_io_wait
        double ms_expert
        double ms_other
        int64_t last_bytes_read
        int64_t last_expert_loads
        int64_t last_expert_hits
        int32_t last_n_tokens
        int64_t prefetch_blocks
        int64_t prefetch_used

    fm_model_params fm_model_default_params()
    fm_status fm_model_open(fm_model **out, const char *dir, const fm_model_params *params,
                            char *err, size_t errlen)
    void fm_model_close(fm_model *m)
    fm_debug_params fm_model_debug(const fm_model *m)
    fm_status fm_model_set_debug(fm_model *m, const fm_debug_params *d, char *err, size_t errlen)
    int32_t fm_model_n_vocab(const fm_model *m)
    int32_t fm_model_n_layers(const fm_model *m)
    int32_t fm_model_hidden(const fm_model *m)
    int32_t fm_model_experts_per_token(const fm_model *m)
    uint64_t fm_model_dense_bytes(const fm_model *m)
    int32_t fm_model_dense_locked(const fm_model *m)
    uint64_t fm_model_expert_block_bytes(const fm_model *m, int32_t il)

    fm_status fm_session_new(fm_session **out, fm_model *m, int32_t n_ctx, char *err, size_t errlen)
    void fm_session_free(fm_session *s)
    void fm_session_reset(fm_session *s)
    int32_t fm_session_pos(const fm_session *s)
    int32_t fm_session_n_ctx(const fm_session *s)
    fm_status fm_session_eval_batch(fm_session *const *sessions, int32_t n_seqs, const int32_t *tokens,
                                    float *logits, int64_t n_logits, char *err, size_t errlen)
    fm_status fm_session_eval(fm_session *s, const int32_t *tokens, int32_t n_tokens, float *logits,
                              int64_t n_logits, int32_t all_logits, char *err, size_t errlen)
    void fm_session_get_stats(const fm_session *s, fm_stats *out)
    fm_status fm_session_state_size(const fm_session *s, uint64_t *bytes)
    fm_status fm_session_state_save(fm_session *s, void *buf, uint64_t cap, uint64_t *written, char *err,
                                    size_t errlen)
    fm_status fm_session_state_load(fm_session *s, const void *buf, uint64_t len, char *err, size_t errlen)
    void fm_session_reset_stats(fm_session *s)

    ctypedef struct fm_trace:
        int32_t *ids
        int64_t cap_tokens
        int64_t *counts
        double *layer_ms
    int32_t fm_model_n_experts(const fm_model *m)
    fm_status fm_session_set_trace(fm_session *s, const fm_trace *trace, char *err, size_t errlen)
    int64_t fm_session_trace_tokens(const fm_session *s)

    fm_status fm_quantize_affine(const float *w, int64_t rows, int64_t cols, int32_t bits,
                                 int32_t group_size, uint32_t *q, uint16_t *scales, uint16_t *biases,
                                 char *err, size_t errlen)
    fm_status fm_dequantize_affine(const uint32_t *q, const uint16_t *scales, const uint16_t *biases,
                                   int64_t rows, int64_t cols, int32_t bits, int32_t group_size,
                                   float *out, char *err, size_t errlen)
    fm_status fm_matvec(const void *q, const uint16_t *scales, const uint16_t *biases, int64_t rows,
                        int64_t cols, int32_t bits, int32_t group_size, const float *x, float *y,
                        int32_t n_threads, char *err, size_t errlen)
    const char *fm_simd_name()

    fm_status fm_io_probe(const char *path, uint64_t block_bytes, int32_t n_reads, int32_t threads,
                          int32_t direct_io, double *gbps, char *err, size_t errlen)
