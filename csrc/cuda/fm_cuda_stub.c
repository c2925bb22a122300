/* fm_cuda_stub.c: the CUDA entry points of fm_backend.h for builds without CUDA (FLASHMOE_CUDA=0
 * or no nvcc). fm_cuda_compiled() and fm_cuda_available() return 0, fm_cuda_backend() NULL, and
 * every other entry point reports FM_ERR_BACKEND. setup.py compiles this file instead of the .cu
 * files in csrc/cuda.
 */
#include "fm_backend.h"
#include "fm_ref.h"
#include "fm_internal.h"

#define NO_CUDA "backend cuda: this build of pyflashmoe was compiled without CUDA (no nvcc, or FLASHMOE_CUDA=0)"

int32_t fm_cuda_compiled(void) { return 0; }
int32_t fm_cuda_available(void) { return 0; }
void fm_cuda_describe(char *buf, size_t len) {
    if (buf && len) snprintf(buf, len, "%s", "compiled without CUDA");
}

/* no CUDA backend table: fm_model_open refuses backend cuda (fm_cuda_available() is 0) */
const fm_backend *fm_cuda_backend(void) { return NULL; }

fm_status fm_cuda_test_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *q,
                              const uint16_t *scales, const uint16_t *biases, const float *X, int64_t n, float *Y,
                              int32_t mma, char *err, size_t errlen) {
    (void)bits, (void)group_size, (void)rows, (void)cols, (void)q, (void)scales, (void)biases, (void)X, (void)n, (void)Y;
    (void)mma;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_test_swiglu(int32_t bits, int32_t group_size, int32_t up_bits, int32_t up_group_size, int64_t rows, int64_t cols, const void *qg,
                              const uint16_t *sg, const uint16_t *bg, const void *qu, const uint16_t *su,
                              const uint16_t *bu, const float *X, int64_t n, float *Y, int32_t mma, char *err,
                              size_t errlen) {
    (void)bits, (void)group_size, (void)up_bits, (void)up_group_size, (void)rows, (void)cols, (void)qg, (void)sg, (void)bg, (void)qu, (void)su, (void)bu;
    (void)X, (void)n, (void)Y, (void)mma;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_test_experts(int32_t bits, int32_t group_size, int64_t H, int64_t I, int32_t E, int32_t K,
                               const void *blocks, uint64_t block_bytes, const uint64_t *offs, const int32_t *ids,
                               const float *X, int64_t n, float *Ye, char *err, size_t errlen) {
    (void)bits, (void)group_size, (void)H, (void)I, (void)E, (void)K, (void)blocks, (void)block_bytes, (void)offs;
    (void)ids, (void)X, (void)n, (void)Ye;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_test_norm(int32_t op, const float *x, const float *z, const float *w, int64_t n, int64_t d,
                            float eps, float offset, float *y, char *err, size_t errlen) {
    (void)op, (void)x, (void)z, (void)w, (void)n, (void)d, (void)eps, (void)offset, (void)y;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_test_route(const float *logits, int64_t n, int32_t E, int32_t K, int32_t norm, int32_t *idx,
                             float *w, char *err, size_t errlen) {
    (void)logits, (void)n, (void)E, (void)K, (void)norm, (void)idx, (void)w;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_test_route_sigmoid(const float *logits, const float *bias, int64_t n, int32_t E, int32_t K,
                                     int32_t norm, int32_t n_group, int32_t topk_group, float scale, int32_t *idx,
                                     float *w, char *err, size_t errlen) {
    (void)logits, (void)bias, (void)n, (void)E, (void)K, (void)norm, (void)n_group, (void)topk_group, (void)scale;
    (void)idx, (void)w;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_test_conv1d(const float *X, int64_t n, float *state, const float *w, int32_t C, int32_t k,
                              float *Y, char *err, size_t errlen) {
    (void)X, (void)n, (void)state, (void)w, (void)C, (void)k, (void)Y;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_test_gdn(const float *qkv, const float *z, const float *a, const float *b, const float *A_log,
                           const float *dt_bias, const float *norm_w, int64_t n, int32_t nk, int32_t nv, int32_t dk,
                           int32_t dv, float eps, float *S, float *O, int32_t gdn_chunk, char *err, size_t errlen) {
    (void)qkv, (void)z, (void)a, (void)b, (void)A_log, (void)dt_bias, (void)norm_w, (void)n, (void)nk, (void)nv;
    (void)dk, (void)dv, (void)eps, (void)S, (void)O, (void)gdn_chunk;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_test_attention(const float *qg, const float *k, const float *v, const float *q_norm,
                                 const float *k_norm, float *kc, float *vc, int64_t n, int32_t pos, int32_t nh,
                                 int32_t nkv, int32_t dh, int32_t rot, float theta, int32_t gate, float eps,
                                 float offset, float *out, char *err, size_t errlen) {
    (void)qg, (void)k, (void)v, (void)q_norm, (void)k_norm, (void)kc, (void)vc, (void)n, (void)pos, (void)nh;
    (void)nkv, (void)dh, (void)rot, (void)theta, (void)gate, (void)eps, (void)offset, (void)out;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_h2d_bandwidth(uint64_t bytes, int32_t reps, double *gbps, char *err, size_t errlen) {
    (void)bytes, (void)reps, (void)gbps;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
fm_status fm_cuda_d2d_bandwidth(uint64_t bytes, int32_t reps, double *gbps, char *err, size_t errlen) {
    (void)bytes, (void)reps, (void)gbps;
    return fm_errf(err, errlen, FM_ERR_BACKEND, NO_CUDA);
}
void fm_cuda_session_counters(const struct fm_session *s, fm_cuda_counters *out) {
    (void)s;
    if (out) memset(out, 0, sizeof *out);
}
