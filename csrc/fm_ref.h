/* fm_ref.h: test entry points of the model-feature ops (csrc/cuda/fm_ref.c), host buffers in and out.
 *
 * Owns: the declarations that pyflashmoe/_ops.pxi calls so that tests/test_model_features.py can
 * compare each CPU op (fm_ops.c) with an independent reference (transformers' DeepSeek-V3 router,
 * gpt-oss experts and eager attention). Each composes the ops the way the CPU backend does.
 * Does not own: any arithmetic of its own, the CUDA kernel tests (fm_backend.h).
 */
#ifndef FM_REF_H
#define FM_REF_H

#include <stddef.h>
#include <stdint.h>

#include "fm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* fm_route over n tokens: logits [n, E], bias [E] or NULL; kind 0 softmax_topk, 1 sigmoid_topk;
 * -> idx [n, K], w [n, K]. FM_ERR_ARG on a bad configuration. */
fm_status fm_ref_route_ex(const float *logits, const float *bias, int64_t n, int32_t E, int32_t K, int32_t kind,
                          int32_t norm, int32_t n_group, int32_t topk_group, float scale, int32_t *idx, float *w,
                          char *err, size_t errlen);
/* the same sigmoid router on the GPU (csrc/cuda/fm_cuda_test.cu k_route_sigmoid; FM_ERR_BACKEND without
 * CUDA): tests/test_cuda.py compares it with fm_ref_route_ex */
fm_status fm_cuda_test_route_sigmoid(const float *logits, const float *bias, int64_t n, int32_t E, int32_t K,
                                     int32_t norm, int32_t n_group, int32_t topk_group, float scale, int32_t *idx,
                                     float *w, char *err, size_t errlen);
/* one routed expert over n tokens with f32 parts: y[n, H] = down(act(gate x + bg, up x + bu)) + bd;
 * wg, wu [I, H], wd [H, I]; biases may be NULL; act 0 swiglu, 1 swiglu_clamp (limit, alpha) */
fm_status fm_ref_expert(const float *x, int64_t n, int64_t H, int64_t I, const float *wg, const float *bg,
                        const float *wu, const float *bu, const float *wd, const float *bd, int32_t act, float limit,
                        float alpha, float *y, char *err, size_t errlen);
/* attention of n queries at positions pos..pos+n-1 (q [n, nh*dh], already normed / roped) over the
 * caches kc, vc [pos+n, nkv*dh]: GQA, causal, keys of the last `window` positions (0: all), sinks
 * [nh] or NULL; scale on q.k. out [n, nh*dh]. */
fm_status fm_ref_attend(const float *q, const float *kc, const float *vc, int64_t n, int32_t pos, int32_t nh,
                        int32_t nkv, int32_t dh, int32_t window, const float *sinks, float scale, float *out,
                        char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
