/* fm_ref.c: the C reference side of the CUDA kernel tests (fm_ref_* of fm_backend.h).
 *
 * Owns: thin wrappers that run csrc/fm_quant.c and csrc/fm_ops.c on caller buffers, composed the
 * way fm_cpu.c composes them (routing, linear-attention, full-attention steps), so that
 * tests/test_cuda.py can compare every CUDA kernel with the CPU engine's own arithmetic.
 * Also the model-feature test entry points of fm_ref.h (routing, expert activation with part biases,
 * attention with a sliding window and sinks) for tests/test_model_features.py.
 * Compiled in every build (CPU-only too). Does not own: any arithmetic of its own.
 */
#include <stdlib.h>

#include "fm_backend.h"
#include "fm_model.h"
#include "fm_ref.h"

fm_status fm_ref_matmul(int32_t bits, int32_t group_size, int64_t rows, int64_t cols, const void *q,
                        const uint16_t *scales, const uint16_t *biases, const float *X, int64_t n, float *Y,
                        char *err, size_t errlen) {
    fm_qmat W;
    memset(&W, 0, sizeof W);
    W.rows = rows;
    W.cols = cols;
    if (bits == 32 || bits == 16) {
        W.dt = bits == 32 ? FM_DT_F32 : FM_DT_BF16;
        W.data = q;
    } else {
        if (cols % group_size) return fm_errf(err, errlen, FM_ERR_ARG, "cols must be a multiple of group_size");
        W.dt = FM_DT_AFFINE;
        W.bits = bits;
        W.group_size = group_size;
        W.q = (const uint32_t *)q;
        W.scales = scales;
        W.biases = biases;
    }
    if (n == 1) fm_qmat_matvec(NULL, &W, X, Y);
    else fm_qmat_matmul(NULL, &W, X, n, Y);
    return FM_OK;
}

fm_status fm_ref_norm(int32_t op, const float *x, const float *z, const float *w, int64_t n, int64_t d, float eps,
                      float offset, float *y, char *err, size_t errlen) {
    for (int64_t r = 0; r < n; r++) {
        if (op == 0) fm_rmsnorm(y + r * d, x + r * d, w, d, eps, offset);
        else if (op == 1) fm_rmsnorm_gated(y + r * d, x + r * d, z + r * d, w, d, eps);
        else if (op == 2) {
            memcpy(y + r * d, x + r * d, sizeof(float) * (size_t)d);
            fm_l2norm(y + r * d, d, eps);
        } else return fm_errf(err, errlen, FM_ERR_ARG, "op must be 0, 1 or 2");
    }
    return FM_OK;
}

fm_status fm_ref_route(const float *logits, int64_t n, int32_t E, int32_t K, int32_t norm, int32_t *idx, float *w,
                       char *err, size_t errlen) {
    float *p = malloc(sizeof(float) * (size_t)E);
    if (!p) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    fm_router_cfg rc = {FM_ROUTER_SOFTMAX, norm != 0, 1, 1, 1.0f};
    for (int64_t t = 0; t < n; t++) { /* as fm_cpu.c layer_moe (softmax, no bias: no scratch) */
        memcpy(p, logits + t * E, sizeof(float) * (size_t)E);
        fm_route(&rc, p, NULL, E, K, idx + t * K, w + t * K, NULL);
    }
    free(p);
    return FM_OK;
}

fm_status fm_ref_conv1d(const float *X, int64_t n, float *state, const float *w, int32_t C, int32_t k, float *Y,
                        char *err, size_t errlen) {
    if (k < 1 || k > 16) return fm_errf(err, errlen, FM_ERR_ARG, "k must be in 1..16");
    fm_conv1d_seq(Y, X, n, state, w, C, k, 0, C);
    return FM_OK;
}

fm_status fm_ref_gdn(const float *qkv, const float *z, const float *a, const float *b, const float *A_log,
                     const float *dt_bias, const float *norm_w, int64_t n, int32_t nk, int32_t nv, int32_t dk,
                     int32_t dv, float eps, float *S, float *O, char *err, size_t errlen) {
    const int64_t cd = 2 * (int64_t)nk * dk + (int64_t)nv * dv, vd = (int64_t)nv * dv;
    float *row = malloc(sizeof(float) * (size_t)cd);
    if (!row) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    const int32_t rep = nv / nk;
    const float qs = 1.0f / sqrtf((float)dk);
    for (int64_t t = 0; t < n; t++) { /* as fm_cpu.c layer_linear_attn + job_gdn */
        memcpy(row, qkv + t * cd, sizeof(float) * (size_t)cd);
        for (int32_t h = 0; h < nk; h++) {
            float *q = row + (int64_t)h * dk, *k = row + (int64_t)nk * dk + (int64_t)h * dk;
            fm_l2norm(q, dk, 1e-6f);
            fm_l2norm(k, dk, 1e-6f);
            for (int32_t d = 0; d < dk; d++) q[d] *= qs;
        }
        for (int32_t h = 0; h < nv; h++) {
            const int32_t kh = h / rep;
            const float A = -expf(A_log[h]);
            const float beta = fm_sigmoid(b[t * nv + h]);
            const float g = A * fm_softplus(a[t * nv + h] + dt_bias[h]);
            float *o = O + t * vd + (int64_t)h * dv;
            fm_gdn_step(S + (int64_t)h * dk * dv, row + (int64_t)kh * dk, row + (int64_t)nk * dk + (int64_t)kh * dk,
                        row + 2 * (int64_t)nk * dk + (int64_t)h * dv, g, beta, dk, dv, o);
            fm_rmsnorm_gated(o, o, z + t * vd + (int64_t)h * dv, norm_w, dv, eps);
        }
    }
    free(row);
    return FM_OK;
}

fm_status fm_ref_attention(const float *qg, const float *k, const float *v, const float *q_norm, const float *k_norm,
                           float *kc, float *vc, int64_t n, int32_t pos, int32_t nh, int32_t nkv, int32_t dh,
                           int32_t rot, float theta, int32_t gate, float eps, float offset, float *out, char *err,
                           size_t errlen) {
    const int64_t qd = (int64_t)nh * dh, kvd = (int64_t)nkv * dh;
    const int32_t rep = nh / nkv;
    float *q = malloc(sizeof(float) * (size_t)(n * qd));
    float *gt = malloc(sizeof(float) * (size_t)(n * qd));
    float *scores = malloc(sizeof(float) * (size_t)(pos + n));
    if (!q || !gt || !scores) {
        free(q);
        free(gt);
        free(scores);
        return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    }
    for (int64_t t = 0; t < n; t++) { /* as fm_cpu.c job_qk_prep */
        const int32_t p = pos + (int32_t)t;
        for (int32_t h = 0; h < nh; h++) {
            float *qh = q + t * qd + (int64_t)h * dh;
            if (gate) {
                const float *src = qg + t * qd * 2 + (int64_t)h * dh * 2;
                memcpy(qh, src, sizeof(float) * (size_t)dh);
                memcpy(gt + t * qd + (int64_t)h * dh, src + dh, sizeof(float) * (size_t)dh);
            } else {
                memcpy(qh, qg + t * qd + (int64_t)h * dh, sizeof(float) * (size_t)dh);
            }
            if (q_norm) fm_rmsnorm(qh, qh, q_norm, dh, eps, offset);
            fm_rope_neox(qh, rot, p, theta);
        }
        for (int32_t h = 0; h < nkv; h++) {
            float *kd = kc + (int64_t)p * kvd + (int64_t)h * dh;
            memcpy(kd, k + t * kvd + (int64_t)h * dh, sizeof(float) * (size_t)dh);
            if (k_norm) fm_rmsnorm(kd, kd, k_norm, dh, eps, offset);
            fm_rope_neox(kd, rot, p, theta);
        }
        memcpy(vc + (int64_t)p * kvd, v + t * kvd, sizeof(float) * (size_t)kvd);
    }
    const float scale = 1.0f / sqrtf((float)dh);
    for (int64_t t = 0; t < n; t++) /* as job_attend */
        for (int32_t h = 0; h < nh; h++) {
            float *o = out + t * qd + (int64_t)h * dh;
            const int32_t kh = h / rep;
            fm_attend_head(o, q + t * qd + (int64_t)h * dh, kc + (int64_t)kh * dh, vc + (int64_t)kh * dh, kvd,
                           pos + (int32_t)t + 1, dh, scale, scores);
            if (gate)
                for (int32_t d = 0; d < dh; d++) o[d] *= fm_sigmoid(gt[t * qd + (int64_t)h * dh + d]);
        }
    free(q);
    free(gt);
    free(scores);
    return FM_OK;
}

/* ---- model-feature ops (fm_ref.h): routing, expert activation + part biases, attention options ---- */

fm_status fm_ref_route_ex(const float *logits, const float *bias, int64_t n, int32_t E, int32_t K, int32_t kind,
                          int32_t norm, int32_t n_group, int32_t topk_group, float scale, int32_t *idx, float *w,
                          char *err, size_t errlen) {
    if (E < 1 || K < 1 || K > E || n < 0 || (kind != FM_ROUTER_SOFTMAX && kind != FM_ROUTER_SIGMOID) || n_group < 1 ||
        topk_group < 1 || topk_group > n_group || E % n_group || (n_group > 1 && E / n_group < 2) ||
        K > topk_group * (E / n_group) || (n_group > 1 && kind != FM_ROUTER_SIGMOID))
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_ref_route_ex: bad configuration E %d K %d kind %d groups %d/%d", E,
                       K, kind, topk_group, n_group);
    fm_router_cfg rc = {kind, norm != 0, n_group, topk_group, scale};
    float *p = malloc(sizeof(float) * 3 * (size_t)E);
    if (!p) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    for (int64_t t = 0; t < n; t++) { /* as the CPU backend's MoE layer */
        memcpy(p, logits + t * E, sizeof(float) * (size_t)E);
        fm_route(&rc, p, bias, E, K, idx + t * K, w + t * K, p + E);
    }
    free(p);
    return FM_OK;
}

fm_status fm_ref_expert(const float *x, int64_t n, int64_t H, int64_t I, const float *wg, const float *bg,
                        const float *wu, const float *bu, const float *wd, const float *bd, int32_t act, float limit,
                        float alpha, float *y, char *err, size_t errlen) {
    if (n < 1 || H < 1 || I < 1 || (act != FM_ACT_SWIGLU && act != FM_ACT_SWIGLU_CLAMP))
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_ref_expert: bad arguments");
    fm_qmat G, U, D;
    memset(&G, 0, sizeof G);
    G.dt = FM_DT_F32;
    G.rows = I;
    G.cols = H;
    U = G;
    D = G;
    G.data = wg;
    U.data = wu;
    D.rows = H;
    D.cols = I;
    D.data = wd;
    float *g = malloc(sizeof(float) * (size_t)(n * I)), *u = malloc(sizeof(float) * (size_t)(n * I));
    if (!g || !u) {
        free(g);
        free(u);
        return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    }
    fm_act_cfg a = {act, limit, alpha};
    /* as the CPU backend's routed expert: gate / up, their biases, the activation, down, its bias */
    fm_mm(NULL, &G, x, n, g);
    fm_mm(NULL, &U, x, n, u);
    fm_add_bias(g, bg, n, I);
    fm_add_bias(u, bu, n, I);
    fm_expert_act(&a, g, u, n * I);
    fm_mm(NULL, &D, g, n, y);
    fm_add_bias(y, bd, n, H);
    free(g);
    free(u);
    return FM_OK;
}

fm_status fm_ref_attend(const float *q, const float *kc, const float *vc, int64_t n, int32_t pos, int32_t nh,
                        int32_t nkv, int32_t dh, int32_t window, const float *sinks, float scale, float *out,
                        char *err, size_t errlen) {
    if (n < 1 || pos < 0 || nh < 1 || nkv < 1 || nh % nkv || dh < 1 || window < 0)
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_ref_attend: bad arguments");
    const int64_t qd = (int64_t)nh * dh, kvd = (int64_t)nkv * dh;
    const int32_t rep = nh / nkv;
    float *scores = malloc(sizeof(float) * (size_t)(pos + n));
    if (!scores) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    for (int64_t t = 0; t < n; t++) /* as the CPU backend's attention job */
        for (int32_t h = 0; h < nh; h++) {
            const int32_t p = pos + (int32_t)t, kh = h / rep;
            fm_attend_head_ex(out + t * qd + (int64_t)h * dh, q + t * qd + (int64_t)h * dh, kc + (int64_t)kh * dh,
                              vc + (int64_t)kh * dh, kvd, fm_window_start(p, window), p + 1, dh, scale,
                              sinks ? sinks + h : NULL, scores);
        }
    free(scores);
    return FM_OK;
}
