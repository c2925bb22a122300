/* fm_ops.c: the non-matmul compute of the forward pass, one row / one head at a time.
 *
 * Owns: RMSNorm (plain and zero-centred), gated RMSNorm, L2 norm, NeoX partial RoPE, softmax,
 * top-k, routing (fm_route: softmax / sigmoid + correction bias + group-limited top-K), the expert
 * activation (SwiGLU, clamped SwiGLU), part bias add, one attention head over a KV cache (sliding
 * window, sinks), causal depthwise conv1d step, gated-delta-rule step. Each model feature of the
 * spec is written here once for the CPU backend.
 * Does not own: matrix kernels (fm_quant.c), threading (fm_forward.c splits heads over the pool).
 * Each function follows transformers' modeling_qwen3_5_moe.py / modeling_qwen3_next.py /
 * modeling_qwen3_moe.py (fp32 math).
 */
#include <math.h>

#include "fm_model.h"

void fm_rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps, float offset) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] * r) * (w[i] + offset);
}

void fm_rmsnorm_gated(float *y, const float *x, const float *z, const float *w, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r) * fm_silu(z[i]);
}

void fm_l2norm(float *x, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)ss + eps);
    for (int64_t i = 0; i < n; i++) x[i] *= r;
}

void fm_rope_neox(float *x, int32_t rot_dim, int32_t pos, float theta) {
    /* transformers: inv_freq = 1/(theta ** (arange(0, d, 2)/d)) in fp32; freqs = pos * inv_freq;
     * emb = cat(freqs, freqs); x_rot*cos + rotate_half(x_rot)*sin, rotate_half(x) = cat(-x2, x1) */
    int32_t half = rot_dim / 2;
    for (int32_t i = 0; i < half; i++) {
        float inv = 1.0f / powf(theta, (float)(2 * i) / (float)rot_dim);
        float ang = (float)pos * inv;
        float c = cosf(ang), s = sinf(ang);
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

void fm_softmax(float *x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

void fm_topk(const float *x, int32_t n, int32_t k, int32_t *idx) {
    /* insertion into a sorted list of k: O(n k), k is small (<= n_experts) */
    int32_t have = 0;
    for (int32_t i = 0; i < n; i++) {
        float v = x[i];
        if (have == k && !(v > x[idx[k - 1]])) continue;
        int32_t j = have < k ? have++ : k - 1;
        while (j > 0 && v > x[idx[j - 1]]) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = i;
    }
}

void fm_attend_head_ex(float *out, const float *q, const float *kc, const float *vc, int64_t kv_stride,
                       int32_t k0, int32_t n_keys, int32_t dh, float scale, const float *sink, float *scores) {
    /* transformers eager attention; with a sink (modeling_gpt_oss eager_attention_forward) the
     * head's sink logit is one more softmax column whose probability is dropped */
    const int32_t n = n_keys - k0;
    kc += (int64_t)k0 * kv_stride;
    vc += (int64_t)k0 * kv_stride;
    float mx = -INFINITY;
    for (int32_t j = 0; j < n; j++) {
        float s = fm_dot_f32(q, kc + (int64_t)j * kv_stride, dh) * scale;
        scores[j] = s;
        mx = s > mx ? s : mx;
    }
    if (sink) mx = *sink > mx ? *sink : mx;
    double sum = 0.0;
    for (int32_t j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    if (sink) sum += expf(*sink - mx);
    float inv = (float)(1.0 / sum);
    for (int32_t d = 0; d < dh; d++) out[d] = 0.0f;
    for (int32_t j = 0; j < n; j++) fm_axpy_f32(out, scores[j] * inv, vc + (int64_t)j * kv_stride, dh);
}

void fm_attend_head(float *out, const float *q, const float *kc, const float *vc, int64_t kv_stride,
                    int32_t n_keys, int32_t dh, float scale, float *scores) {
    fm_attend_head_ex(out, q, kc, vc, kv_stride, 0, n_keys, dh, scale, NULL, scores);
}

/* the topk_group best of n_group groups of E/n_group experts of sel[E] (each group ranked by the sum
 * of its two largest values, DeepSeek-V3); the others' experts are set to -inf. gs, chosen: scratch
 * float[n_group] each */
static void group_limit(float *sel, int32_t E, int32_t n_group, int32_t topk_group, float *gs, float *chosen) {
    const int32_t per = E / n_group;
    for (int32_t g = 0; g < n_group; g++) {
        const float *x = sel + (int64_t)g * per;
        float a = -INFINITY, b = -INFINITY; /* the two largest */
        for (int32_t i = 0; i < per; i++) {
            if (x[i] > a) {
                b = a;
                a = x[i];
            } else if (x[i] > b) {
                b = x[i];
            }
        }
        gs[g] = a + b;
        chosen[g] = 0.0f;
    }
    for (int32_t r = 0; r < topk_group; r++) {
        int32_t best = -1;
        for (int32_t g = 0; g < n_group; g++)
            if (chosen[g] == 0.0f && (best < 0 || gs[g] > gs[best])) best = g;
        chosen[best] = 1.0f;
    }
    for (int32_t g = 0; g < n_group; g++)
        if (chosen[g] == 0.0f)
            for (int32_t i = 0; i < per; i++) sel[(int64_t)g * per + i] = -INFINITY;
}

void fm_route(const fm_router_cfg *rc, float *p, const float *bias, int32_t E, int32_t K, int32_t *idx, float *w,
              float *tmp) {
    if (rc->kind == FM_ROUTER_SIGMOID) {
        /* transformers DeepseekV3TopkRouter: scores = sigmoid(logits); the choice uses scores + bias
         * (group-limited), the weights the unbiased scores; renormalised (+1e-20) when norm_topk_prob;
         * times routed_scaling_factor */
        for (int32_t e = 0; e < E; e++) {
            p[e] = fm_sigmoid(p[e]);
            tmp[e] = bias ? p[e] + bias[e] : p[e];
        }
        if (rc->n_group > 1 && rc->topk_group < rc->n_group)
            group_limit(tmp, E, rc->n_group, rc->topk_group, tmp + E, tmp + E + rc->n_group);
        fm_topk(tmp, E, K, idx);
        float sum = 0.0f;
        for (int32_t k = 0; k < K; k++) {
            w[k] = p[idx[k]];
            sum += w[k];
        }
        if (rc->norm) {
            float den = sum + 1e-20f;
            for (int32_t k = 0; k < K; k++) w[k] /= den;
        }
        if (rc->scale != 1.0f)
            for (int32_t k = 0; k < K; k++) w[k] *= rc->scale;
        return;
    }
    /* softmax over all experts, top-K, renormalise when norm_topk_prob (transformers' Qwen3 MoE
     * routers; gpt-oss: a logit bias, top-K then softmax over the K, which is the same
     * distribution) */
    if (bias)
        for (int32_t e = 0; e < E; e++) p[e] += bias[e];
    fm_softmax(p, E);
    fm_topk(p, E, K, idx);
    float sum = 0.0f;
    for (int32_t k = 0; k < K; k++) {
        w[k] = p[idx[k]];
        sum += w[k];
    }
    if (rc->norm)
        for (int32_t k = 0; k < K; k++) w[k] /= sum;
    if (rc->scale != 1.0f)
        for (int32_t k = 0; k < K; k++) w[k] *= rc->scale;
}

void fm_expert_act(const fm_act_cfg *a, float *g, const float *u, int64_t n) {
    if (a->kind == FM_ACT_SWIGLU_CLAMP) {
        /* transformers GptOssExperts._apply_gate: gate clamped above at limit, up to [-limit, limit],
         * (up + 1) * gate * sigmoid(alpha * gate); comparisons keep a NaN a NaN (the guard sees it) */
        const float lim = a->limit, al = a->alpha;
        for (int64_t i = 0; i < n; i++) {
            float x = g[i] > lim ? lim : g[i];
            float y = u[i] > lim ? lim : (u[i] < -lim ? -lim : u[i]);
            g[i] = (y + 1.0f) * (x * fm_sigmoid(x * al));
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) g[i] = fm_silu(g[i]) * u[i];
}

void fm_add_bias(float *y, const float *b, int64_t n, int64_t rows) {
    if (!b) return;
    for (int64_t t = 0; t < n; t++)
        for (int64_t r = 0; r < rows; r++) y[t * rows + r] += b[r];
}

void fm_conv1d_seq(float *Y, const float *X, int64_t n, float *state, const float *w, int32_t C,
                   int32_t k, int32_t c0, int32_t c1) {
    /* transformers causal_conv1d_fn / causal_conv1d_update: out[t] = sum_j w[c, j] * xpad[t + j],
     * xpad = [state (k-1 inputs, oldest first), x]; SiLU after */
    float win[16];
    for (int32_t c = c0; c < c1; c++) {
        const float *wc = w + (int64_t)c * k;
        for (int32_t j = 0; j < k - 1; j++) win[j] = state[(int64_t)j * C + c];
        for (int64_t t = 0; t < n; t++) {
            float xt = X[t * C + c];
            float acc = wc[k - 1] * xt;
            for (int32_t j = 0; j < k - 1; j++) acc += wc[j] * win[j];
            Y[t * C + c] = fm_silu(acc);
            for (int32_t j = 0; j + 1 < k - 1; j++) win[j] = win[j + 1];
            if (k > 1) win[k - 2] = xt;
        }
        for (int32_t j = 0; j < k - 1; j++) state[(int64_t)j * C + c] = win[j];
    }
}

void fm_gdn_step(float *S, const float *q, const float *k, const float *v, float g, float beta,
                 int32_t dk, int32_t dv, float *o) {
    /* transformers torch_recurrent_gated_delta_rule, state [dk, dv] row-major */
    float decay = expf(g);
    float kv[dv > 0 ? dv : 1];
    for (int32_t j = 0; j < dv; j++) kv[j] = 0.0f;
    for (int32_t i = 0; i < dk; i++) {
        float *row = S + (int64_t)i * dv;
        for (int32_t j = 0; j < dv; j++) row[j] *= decay;
        fm_axpy_f32(kv, k[i], row, dv);
    }
    for (int32_t j = 0; j < dv; j++) kv[j] = (v[j] - kv[j]) * beta; /* delta */
    for (int32_t j = 0; j < dv; j++) o[j] = 0.0f;
    for (int32_t i = 0; i < dk; i++) {
        float *row = S + (int64_t)i * dv;
        fm_axpy_f32(row, k[i], kv, dv);
        fm_axpy_f32(o, q[i], row, dv);
    }
}

void fm_mm(fm_pool *pool, const fm_qmat *W, const float *X, int64_t n, float *Y) {
    if (n == 1)
        fm_qmat_matvec(pool, W, X, Y);
    else
        fm_qmat_matmul(pool, W, X, n, Y);
}
