/* fm_cpu.c: the CPU backend (fm_cpu_backend of fm_backend.h).
 *
 * Owns: the CPU session state (KV cache, conv + recurrent state, scratch), the CPU layer ops
 * (embedding, full attention, GatedDeltaNet, MoE, dense FFN, final norm + lm_head; each applies its
 * own pre-norm and residual add on the session's hidden state), the numerical guard (a scan), the
 * MoE path with fm_io (expert reads, decode prefetch, routing trace), and fm_cpu_experts_token (the
 * routed-expert op for one token, also used by the CUDA backend's CPU split).
 * The layer loop is fm_forward.c's. A pass holds up to pass_cap tokens (the whole prompt unless its
 * activations would pass FM_PASS_BYTES); token mixers and the dense FFN run in chunks of FM_UBATCH
 * tokens, the MoE routes every token of the pass and reads the union of its experts once per layer.
 * MoE: router -> fm_io_submit(union of routed experts, chunks of max_batch) -> shared expert while
 * the reads are in flight -> fm_io_wait -> each expert applied to the tokens routed to it ->
 * weighted combine (ascending expert order, then + shared, as transformers does).
 * Decode prefetch (fm_model_params.prefetch, buffered I/O): once a MoE layer's reads are in, the
 * next MoE layer's router is applied to the current residual (under that layer's ffn_norm) and its
 * top experts (fm_model_params.prefetch says how many) go to fm_io_prefetch, so the disk reads them
 * while this layer and the next layer's attention compute; the first MoE layer is predicted from
 * the embedding. Only the page cache is touched: logits are identical with prefetch on or off.
 * Does not own: kernels (fm_quant.c), ops (fm_ops.c), weights and expert layout (fm_model.c), reads
 * (fm_io.c), the layer loop, stats and trace settings (fm_forward.c).
 */
#include <stdlib.h>

#include "fm_backend.h"
#include "fm_model.h"

#define FM_UBATCH 512 /* tokens per attention / dense chunk; bounds that scratch */
/* bytes of per-token activations (x, xn, y, shared-expert out, routing) one pass may hold: a
 * longer prompt is split into passes, each reading its experts once per layer */
#define FM_PASS_BYTES ((int64_t)256 << 20)

typedef struct fm_scratch fm_scratch;

/* the CPU backend's session state (fm_session.bs) */
typedef struct {
    int32_t n_ctx;
    int32_t kv_hw;          /* KV rows [0, kv_hw) may have been written since the last reset */
    float **kc, **vc;       /* per full layer: [n_ctx, n_kv_heads*head_dim] */
    float **conv, **ssm;    /* per linear layer: conv [conv_k-1, conv_dim], ssm [nv, dk, dv] */
    fm_scratch *scratch;    /* work buffers, kept between evals */
} cpu_session;

static int64_t conv_dim_of(const fm_model *m) {
    return 2 * (int64_t)m->lin_nk * m->lin_dk + (int64_t)m->lin_nv * m->lin_dv;
}

/* ---------------------------------------------------------------- numerical guard */

typedef uint32_t __attribute__((may_alias)) fm_u32_alias;

/* index of the first NaN or Inf in x[n], -1 if none: exponent bits all ones, tested on the bits (no
 * float compare, so no compiler flag can fold it away); blocks of 256 reduce branch-free and
 * vectorise, the exact index is looked for only in a block that has one */
static int64_t first_nonfinite(const float *x, int64_t n) {
    const fm_u32_alias *u = (const fm_u32_alias *)(const void *)x;
    for (int64_t i0 = 0; i0 < n; i0 += 256) {
        int64_t i1 = n - i0 < 256 ? n : i0 + 256;
        uint32_t bad = 0;
        for (int64_t i = i0; i < i1; i++) bad |= (uint32_t)((u[i] & 0x7f800000u) == 0x7f800000u);
        if (bad)
            for (int64_t i = i0; i < i1; i++)
                if ((u[i] & 0x7f800000u) == 0x7f800000u) return i;
    }
    return -1;
}

/* position of row t of pass p (a multi-sequence pass: its session's position) */
static int64_t row_pos(const fm_pass *p, int64_t t) { return p->seqs ? p->seq_pos[t] : p->pos + t; }

/* FM_ERR_NUMERIC when the n rows of `row` floats at x hold a non-finite value (stage as
 * fm_numeric_error; row t is row t0 + t of pass p) */
static fm_status guard(const fm_pass *p, int32_t stage, const float *x, int64_t n, int64_t row, int64_t t0,
                       char *err, size_t errlen) {
    int64_t i = first_nonfinite(x, n * row);
    return i < 0 ? FM_OK : fm_numeric_error(p->s->m, stage, row_pos(p, t0 + i / row), err, errlen);
}

/* ---------------------------------------------------------------- scratch */

struct fm_scratch {
    int64_t nb; /* chunk capacity in tokens (attention, dense FFN, router, shared expert) */
    int32_t n_ctx; /* attention scores per thread (the largest n_ctx of the sessions it served) */
    int64_t np; /* pass capacity in tokens (x, xn, y, sho, shs, routing tables) */
    float *x, *xn, *y;
    /* full attention */
    float *qg, *q, *gate, *k, *v, *att, *scores;
    /* linear attention */
    float *qkv, *qkvc, *z, *ba, *bb, *o;
    /* moe */
    float *logits_r, *topw, *shg, *shu, *sho, *shs, *xe, *ge, *ue, *ye;
    float *rtmp; /* fm_route scratch [2 * n_experts] */
    int32_t *topi, *cnt, *off, *fill, *etok, *elist;
    float *ew;
    /* dense mlp */
    float *dg, *du;
    /* decode prefetch: the experts predicted for layer pf_il (-1: none), pf_n of them queued */
    int32_t *pfi;
    int32_t pf_il, pf_n;
};

static void scratch_free(fm_scratch *b) {
    float **f[] = {&b->x,   &b->xn,  &b->y,   &b->qg,  &b->q,   &b->gate, &b->k,   &b->v,   &b->att,
                   &b->scores, &b->qkv, &b->qkvc, &b->z, &b->ba, &b->bb, &b->o, &b->logits_r, &b->topw,
                   &b->shg, &b->shu, &b->sho, &b->shs, &b->xe, &b->ge, &b->ue, &b->ye, &b->ew,
                   &b->dg, &b->du, &b->rtmp};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        free(*f[i]);
        *f[i] = NULL;
    }
    int32_t **g[] = {&b->topi, &b->cnt, &b->off, &b->fill, &b->etok, &b->elist, &b->pfi};
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) {
        free(*g[i]);
        *g[i] = NULL;
    }
}

static int scratch_alloc(fm_scratch *b, const fm_model *m, int64_t nb, int64_t np, int32_t n_ctx) {
    memset(b, 0, sizeof *b);
    b->nb = nb;
    b->np = np;
    b->n_ctx = n_ctx;
    int64_t H = m->H;
    int64_t qd = (int64_t)m->n_heads * m->head_dim, kvd = (int64_t)m->n_kv_heads * m->head_dim;
    int64_t cd = conv_dim_of(m), vd = (int64_t)m->lin_nv * m->lin_dv;
    int64_t K = m->k_tok, E = m->n_experts;
    int64_t I = m->moe_I > m->sh_I ? m->moe_I : m->sh_I;
    int nt = fm_pool_size(m->pool);
    int64_t ne = nb > m->max_batch ? nb : m->max_batch; /* rows of the per-expert buffers */
#define FA(p, cnt) ((p) = malloc(sizeof(float) * (size_t)((cnt) > 0 ? (cnt) : 1)), (p) != NULL)
#define IA(p, cnt) ((p) = malloc(sizeof(int32_t) * (size_t)((cnt) > 0 ? (cnt) : 1)), (p) != NULL)
    int ok = FA(b->x, np * H) && FA(b->xn, np * H) && FA(b->y, np * H);
    if (ok && m->n_full)
        ok = FA(b->qg, nb * qd * (m->attn_gate ? 2 : 1)) && FA(b->q, nb * qd) && FA(b->gate, nb * qd) &&
             FA(b->k, nb * kvd) && FA(b->v, nb * kvd) && FA(b->att, nb * qd) && FA(b->scores, (int64_t)nt * n_ctx);
    if (ok && m->n_linear)
        ok = FA(b->qkv, nb * cd) && FA(b->qkvc, nb * cd) && FA(b->z, nb * vd) && FA(b->ba, nb * m->lin_nv) &&
             FA(b->bb, nb * m->lin_nv) && FA(b->o, nb * vd);
    if (ok && m->n_moe)
        ok = FA(b->logits_r, nb * E) && FA(b->topw, np * K) && IA(b->topi, np * K) && FA(b->shg, nb * I) &&
             FA(b->shu, nb * I) && FA(b->sho, np * H) && FA(b->shs, np) && FA(b->xe, ne * H) &&
             FA(b->ge, ne * I) && FA(b->ue, ne * I) && FA(b->ye, ne * H) && IA(b->cnt, E) && IA(b->off, E + 1) &&
             IA(b->fill, E) && IA(b->etok, np * K) && FA(b->ew, np * K) &&
             IA(b->elist, E) && IA(b->pfi, E) && FA(b->rtmp, 2 * E);
    b->pf_il = -1;
    if (ok && m->n_moe < m->n_layers && m->dense_I > 0) ok = FA(b->dg, nb * m->dense_I) && FA(b->du, nb * m->dense_I);
#undef FA
#undef IA
    if (!ok) scratch_free(b);
    return ok;
}

static void scratch_release(void *p) {
    if (!p) return;
    scratch_free(p);
    free(p);
}

/* the session's scratch for chunks of nb and passes of np tokens over contexts of up to n_ctx
 * (kept and reused; regrown when a larger batch comes) */
static fm_scratch *session_scratch(fm_session *s, int64_t nb, int64_t np, int32_t n_ctx) {
    cpu_session *cs = s->bs;
    fm_scratch *b = cs->scratch;
    if (b && b->nb >= nb && b->np >= np && b->n_ctx >= n_ctx) return b;
    scratch_release(b);
    cs->scratch = NULL;
    b = malloc(sizeof *b);
    if (!b) return NULL;
    if (!scratch_alloc(b, s->m, nb, np, n_ctx)) {
        free(b);
        return NULL;
    }
    cs->scratch = b;
    return b;
}

/* ---------------------------------------------------------------- parallel pieces */

typedef struct {
    const fm_model *m;
    const cpu_session *s;
    const fm_layer *L;
    fm_scratch *b;
    int64_t n;
    int32_t pos;
    fm_session *const *rows; /* a multi-sequence pass: row t's session (NULL: every row is s's) */
    const int32_t *rpos;     /* and its position */
} fm_job;

/* the state and the position of row t */
static const cpu_session *job_state(const fm_job *j, int64_t t) {
    return j->rows ? (const cpu_session *)j->rows[t]->bs : j->s;
}
static int32_t job_pos(const fm_job *j, int64_t t) { return j->rows ? j->rpos[t] : j->pos + (int32_t)t; }

/* attention: items = n * n_heads */
static void job_attend(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    fm_job *j = ctx;
    const fm_model *m = j->m;
    int32_t nh = m->n_heads, dh = m->head_dim, rep = m->n_heads / m->n_kv_heads;
    int64_t qd = (int64_t)nh * dh, kvd = (int64_t)m->n_kv_heads * dh;
    float *scores = j->b->scores + (int64_t)tid * j->b->n_ctx;
    float scale = 1.0f / sqrtf((float)dh);
    for (int64_t it = i0; it < i1; it++) {
        int64_t t = it / nh;
        int32_t h = (int32_t)(it % nh), kh = h / rep;
        float *out = j->b->att + t * qd + (int64_t)h * dh;
        const cpu_session *cs = job_state(j, t);
        const float *kc = cs->kc[j->L->state_idx], *vc = cs->vc[j->L->state_idx];
        int32_t p = job_pos(j, t);
        fm_attend_head_ex(out, j->b->q + t * qd + (int64_t)h * dh, kc + (int64_t)kh * dh, vc + (int64_t)kh * dh, kvd,
                          fm_window_start(p, j->L->window), p + 1, dh, scale, j->L->sinks ? j->L->sinks + h : NULL,
                          scores);
        if (m->attn_gate) {
            const float *g = j->b->gate + t * qd + (int64_t)h * dh;
            for (int32_t d = 0; d < dh; d++) out[d] *= fm_sigmoid(g[d]);
        }
    }
}

/* q/k norm + RoPE + cache write: items = n */
static void job_qk_prep(void *ctx, int64_t t0, int64_t t1, int32_t tid) {
    (void)tid;
    fm_job *j = ctx;
    const fm_model *m = j->m;
    const fm_layer *L = j->L;
    fm_scratch *b = j->b;
    int32_t nh = m->n_heads, nkv = m->n_kv_heads, dh = m->head_dim;
    int64_t qd = (int64_t)nh * dh, kvd = (int64_t)nkv * dh;
    for (int64_t t = t0; t < t1; t++) {
        const cpu_session *cs = job_state(j, t);
        float *kc = cs->kc[L->state_idx], *vc = cs->vc[L->state_idx];
        int32_t p = job_pos(j, t);
        for (int32_t h = 0; h < nh; h++) {
            float *q = b->q + t * qd + (int64_t)h * dh;
            if (m->attn_gate) {
                const float *src = b->qg + t * qd * 2 + (int64_t)h * dh * 2;
                memcpy(q, src, sizeof(float) * (size_t)dh);
                memcpy(b->gate + t * qd + (int64_t)h * dh, src + dh, sizeof(float) * (size_t)dh);
            } else {
                memcpy(q, b->qg + t * qd + (int64_t)h * dh, sizeof(float) * (size_t)dh);
            }
            if (L->q_norm) fm_rmsnorm(q, q, L->q_norm, dh, m->eps, m->norm_offset);
            fm_rope_neox(q, m->rotary_dim, p, m->rope_theta);
        }
        float *kdst = kc + (int64_t)p * kvd, *vdst = vc + (int64_t)p * kvd;
        for (int32_t h = 0; h < nkv; h++) {
            float *k = kdst + (int64_t)h * dh;
            memcpy(k, b->k + t * kvd + (int64_t)h * dh, sizeof(float) * (size_t)dh);
            if (L->k_norm) fm_rmsnorm(k, k, L->k_norm, dh, m->eps, m->norm_offset);
            fm_rope_neox(k, m->rotary_dim, p, m->rope_theta);
        }
        memcpy(vdst, b->v + t * kvd, sizeof(float) * (size_t)kvd);
    }
}

/* conv1d over channel ranges */
static void job_conv(void *ctx, int64_t c0, int64_t c1, int32_t tid) {
    (void)tid;
    fm_job *j = ctx;
    const fm_model *m = j->m;
    int32_t cd = (int32_t)conv_dim_of(m);
    if (!j->rows) {
        fm_conv1d_seq(j->b->qkvc, j->b->qkv, j->n, j->s->conv[j->L->state_idx], j->L->ssm_conv, cd, m->conv_k,
                      (int32_t)c0, (int32_t)c1);
        return;
    }
    for (int64_t t = 0; t < j->n; t++) /* one token of each row's own timeline */
        fm_conv1d_seq(j->b->qkvc + t * cd, j->b->qkv + t * cd, 1, job_state(j, t)->conv[j->L->state_idx],
                      j->L->ssm_conv, cd, m->conv_k, (int32_t)c0, (int32_t)c1);
}

/* gated delta rule + gated norm: items = value heads, each runs its tokens in order */
static void job_gdn(void *ctx, int64_t h0, int64_t h1, int32_t tid) {
    (void)tid;
    fm_job *j = ctx;
    const fm_model *m = j->m;
    const fm_layer *L = j->L;
    fm_scratch *b = j->b;
    int32_t nk = m->lin_nk, nv = m->lin_nv, dk = m->lin_dk, dv = m->lin_dv, rep = nv / nk;
    int64_t cd = conv_dim_of(m), vd = (int64_t)nv * dv;
    for (int64_t h = h0; h < h1; h++) {
        int32_t kh = (int32_t)h / rep; /* repeat_interleave: value head h uses key head h // (nv/nk) */
        float A = -expf(L->A_log[h]);
        for (int64_t t = 0; t < j->n; t++) {
            float *S = job_state(j, t)->ssm[L->state_idx] + h * (int64_t)dk * dv;
            const float *row = b->qkvc + t * cd;
            const float *q = row + (int64_t)kh * dk;
            const float *k = row + (int64_t)nk * dk + (int64_t)kh * dk;
            const float *v = row + 2 * (int64_t)nk * dk + h * dv;
            float beta = fm_sigmoid(b->bb[t * nv + h]);
            float g = A * fm_softplus(b->ba[t * nv + h] + L->dt_bias[h]);
            float *o = b->o + t * vd + h * dv;
            fm_gdn_step(S, q, k, v, g, beta, dk, dv, o);
            fm_rmsnorm_gated(o, o, b->z + t * vd + h * dv, L->ssm_norm, dv, m->eps);
        }
    }
}

/* ---------------------------------------------------------------- layers */

/* token mixers: n tokens of b->xn at positions pos.. into b->y */
static void layer_full_attn(fm_session *s, const fm_layer *L, fm_scratch *b, int64_t n, int32_t pos,
                            fm_session *const *rows, const int32_t *rpos) {
    fm_model *m = s->m;
    fm_mm(m->pool, &L->wq, b->xn, n, b->qg);
    fm_mm(m->pool, &L->wk, b->xn, n, b->k);
    fm_mm(m->pool, &L->wv, b->xn, n, b->v);
    fm_job j = {m, s->bs, L, b, n, pos, rows, rpos};
    fm_pool_for(m->pool, n, 1, job_qk_prep, &j);
    fm_pool_for(m->pool, n * m->n_heads, 1, job_attend, &j);
    fm_mm(m->pool, &L->wo, b->att, n, b->y);
}

static void layer_linear_attn(fm_session *s, const fm_layer *L, fm_scratch *b, int64_t n, int32_t pos,
                              fm_session *const *rows, const int32_t *rpos) {
    fm_model *m = s->m;
    int32_t nk = m->lin_nk, dk = m->lin_dk;
    int64_t cd = conv_dim_of(m);
    fm_mm(m->pool, &L->ssm_qkv, b->xn, n, b->qkv);
    fm_mm(m->pool, &L->ssm_z, b->xn, n, b->z);
    fm_mm(m->pool, &L->ssm_b, b->xn, n, b->bb);
    fm_mm(m->pool, &L->ssm_a, b->xn, n, b->ba);
    fm_job j = {m, s->bs, L, b, n, pos, rows, rpos};
    fm_pool_for(m->pool, cd, 64, job_conv, &j);
    /* q, k: L2 norm per key head (eps 1e-6 as the reference l2norm), q scaled by 1/sqrt(dk) */
    float qs = 1.0f / sqrtf((float)dk);
    for (int64_t t = 0; t < n; t++) {
        float *row = b->qkvc + t * cd;
        for (int32_t h = 0; h < nk; h++) {
            float *q = row + (int64_t)h * dk, *k = row + (int64_t)nk * dk + (int64_t)h * dk;
            fm_l2norm(q, dk, 1e-6f);
            fm_l2norm(k, dk, 1e-6f);
            for (int32_t d = 0; d < dk; d++) q[d] *= qs;
        }
    }
    fm_pool_for(m->pool, m->lin_nv, 1, job_gdn, &j);
    fm_mm(m->pool, &L->ssm_out, b->o, n, b->y);
}

static void swiglu(float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] = fm_silu(g[i]) * u[i];
}

static void layer_dense_ffn(fm_session *s, const fm_layer *L, fm_scratch *b, int64_t n) {
    fm_model *m = s->m;
    fm_mm(m->pool, &L->ffn_gate, b->xn, n, b->dg);
    fm_mm(m->pool, &L->ffn_up, b->xn, n, b->du);
    swiglu(b->dg, b->du, n * m->dense_I);
    fm_mm(m->pool, &L->ffn_down, b->dg, n, b->y);
}

/* decode prefetch: predict the experts of the first MoE layer after `after` (-1: from the start)
 * from the residual x (H floats) and queue them for the page cache (uses logits_r and xe, which
 * are free between routing and expert compute) */
static void prefetch_predict(fm_session *s, fm_scratch *b, int32_t after, const float *x) {
    fm_model *m = s->m;
    b->pf_il = -1;
    if (!m->io || !fm_io_prefetch_active(m->io)) return;
    int32_t jl = after + 1;
    while (jl < m->n_layers && m->layers[jl].ffn != FM_FFN_MOE) jl++;
    if (jl >= m->n_layers) return;
    const fm_layer *J = &m->layers[jl];
    double t0 = fm_now_ms();
    fm_rmsnorm(b->xe, x, J->ffn_norm, m->H, m->eps, m->norm_offset);
    fm_qmat_matvec(m->pool, &J->router, b->xe, b->logits_r);
    /* how many: prefetch == 1 (default) the top ceil(K * 3 / 10), the ranks predicted well enough
     * that prefetching them pays (bench/RESULTS.md); prefetch = n >= 2: the top n (at most K) */
    int32_t pf = fm_io_prefetch_active(m->io);
    int32_t nk = pf == 1 ? (m->k_tok * 3 + 9) / 10 : pf;
    if (nk > m->k_tok) nk = m->k_tok;
    if (nk > m->n_experts) nk = m->n_experts;
    if (nk < 1) nk = 1;
    const float *sel = b->logits_r; /* top-K of the logits == top-K of the softmax */
    if (J->router_bias || m->route.kind == FM_ROUTER_SIGMOID) { /* the router's selection scores (no groups) */
        for (int32_t e = 0; e < m->n_experts; e++)
            b->rtmp[e] = (m->route.kind == FM_ROUTER_SIGMOID ? fm_sigmoid(b->logits_r[e]) : b->logits_r[e]) +
                         (J->router_bias ? J->router_bias[e] : 0.0f);
        sel = b->rtmp;
    }
    fm_topk(sel, m->n_experts, nk, b->pfi);
    b->pf_n = fm_io_prefetch(m->io, jl, b->pfi, nk);
    b->pf_il = jl;
    s->st.prefetch_blocks += b->pf_n;
    s->st.ms_route += fm_now_ms() - t0;
}

/* routing trace (fm_session_set_trace): layer il's picks b->topi of the pass's n tokens */
static void trace_route(fm_session *s, int32_t il, const fm_scratch *b, int64_t n) {
    const fm_model *m = s->m;
    int32_t K = m->k_tok, NL = m->n_layers;
    if (s->trace.counts) {
        int64_t *c = s->trace.counts + (int64_t)il * m->n_experts;
        for (int64_t e = 0; e < m->n_experts; e++) c[e] += b->cnt[e];
    }
    if (!s->trace.ids) return;
    for (int64_t t = 0; t < n && s->trace_row + t < s->trace.cap_tokens; t++)
        memcpy(s->trace.ids + ((s->trace_row + t) * NL + il) * K, b->topi + t * K, sizeof(int32_t) * (size_t)K);
}

/* MoE block for the n (<= b->np) tokens of b->xn into b->y; FM_ERR_IO on a failed read. Every
 * expert routed by any of the n tokens is read once. */
static fm_status layer_moe(fm_session *s, int32_t il, const fm_layer *L, fm_scratch *b, int64_t n, char *err,
                           size_t errlen) {
    fm_model *m = s->m;
    int64_t H = m->H, E = m->n_experts, I = m->moe_I, shI = m->sh_I;
    int32_t K = m->k_tok;
    int64_t ne = b->nb > m->max_batch ? b->nb : m->max_batch; /* rows of xe/ge/ue/ye */
    double t0 = fm_now_ms();
    /* routing (router logits in chunks of nb tokens): softmax over all experts, top-K,
     * renormalise when norm_topk_prob, or the sigmoid router (fm_route, spec.router) */
    memset(b->cnt, 0, sizeof(int32_t) * (size_t)E);
    for (int64_t t = 0; t < n; t++) {
        if (t % b->nb == 0)
            fm_mm(m->pool, &L->router, b->xn + t * H, n - t < b->nb ? n - t : b->nb, b->logits_r);
        int32_t *idx = b->topi + t * K;
        fm_route(&m->route, b->logits_r + (t % b->nb) * E, L->router_bias, (int32_t)E, K, idx, b->topw + t * K,
                 b->rtmp);
        for (int32_t k = 0; k < K; k++) b->cnt[idx[k]]++;
    }
    /* union of routed experts (ascending) and, per expert, its tokens */
    int32_t n_used = 0;
    b->off[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        b->off[e + 1] = b->off[e] + b->cnt[e];
        b->fill[e] = b->off[e];
        if (b->cnt[e]) b->elist[n_used++] = (int32_t)e;
    }
    for (int64_t t = 0; t < n; t++)
        for (int32_t k = 0; k < K; k++) {
            int32_t e = b->topi[t * K + k];
            int32_t at = b->fill[e]++;
            b->etok[at] = (int32_t)t;
            b->ew[at] = b->topw[t * K + k];
        }
    if (s->trace.ids || s->trace.counts) trace_route(s, il, b, n);
    if (b->pf_il == il) { /* how many of the blocks prefetched for this layer the routing used */
        for (int32_t i = 0; i < b->pf_n; i++) s->st.prefetch_used += b->cnt[b->pfi[i]] > 0;
        b->pf_il = -1;
    }
    double t1 = fm_now_ms();
    s->st.ms_route += t1 - t0;

    memset(b->y, 0, sizeof(float) * (size_t)(n * H));
    int shared_done = 0;
    for (int32_t c0 = 0; c0 < n_used; c0 += m->max_batch) {
        int32_t nc = n_used - c0 < m->max_batch ? n_used - c0 : m->max_batch;
        fm_status st = fm_io_submit(m->io, il, b->elist + c0, nc, err, errlen);
        if (st != FM_OK) return st;
        if (!shared_done && L->has_shexp) {
            /* shared expert while the reads are in flight (chunks of nb tokens) */
            double ts = fm_now_ms();
            for (int64_t c = 0; c < n; c += b->nb) {
                int64_t nn = n - c < b->nb ? n - c : b->nb;
                const float *xc = b->xn + c * H;
                fm_mm(m->pool, &L->sh_gate, xc, nn, b->shg);
                fm_mm(m->pool, &L->sh_up, xc, nn, b->shu);
                swiglu(b->shg, b->shu, nn * shI);
                fm_mm(m->pool, &L->sh_down, b->shg, nn, b->sho + c * H);
                if (m->shared_gate == FM_SHGATE_SIGMOID) fm_mm(m->pool, &L->sh_router, xc, nn, b->shs + c);
            }
            s->st.ms_expert += fm_now_ms() - ts;
        }
        shared_done = 1;
        const uint8_t *blocks[m->max_batch];
        fm_io_stats ios;
        memset(&ios, 0, sizeof ios);
        if (n == 1) {
            /* decode: each expert is computed as soon as its block is in, while the rest are read */
            double tx = 0, tn = fm_now_ms();
            int32_t c, got = 0;
            const uint8_t *blk;
            while (fm_io_next(m->io, &c, &blk) && blk) {
                double tg = fm_now_ms();
                s->st.ms_io_wait += tg - tn;
                /* every read of this layer is in: the disk is free for the next MoE layer's
                 * predicted experts (issued only now so they never delay this layer's reads) */
                if (++got == nc && c0 == 0) {
                    prefetch_predict(s, b, il, b->x);
                    tg = fm_now_ms();
                }
                fm_cpu_experts_token(m->pool, m, L, &blk, 1, b->xn, b->ge + (int64_t)c * I, b->ue + (int64_t)c * I,
                                     b->ye + (int64_t)c * H);
                tn = fm_now_ms();
                tx += tn - tg;
            }
            st = fm_io_wait(m->io, blocks, &ios, err, errlen); /* stats, RAM cache, error text */
            double te = fm_now_ms();
            s->st.ms_io_wait += te - tn;
            s->st.ms_expert += tx;
            s->st.last_bytes_read += ios.bytes_read;
            s->st.last_expert_loads += ios.loads;
            s->st.last_expert_hits += ios.hits;
            if (st != FM_OK) return st;
            for (int32_t c = 0; c < nc; c++) {
                int32_t e = b->elist[c0 + c];
                float wt = b->ew[b->off[e]];
                const float *src = b->ye + (int64_t)c * H;
                for (int64_t d = 0; d < H; d++) b->y[d] += wt * src[d];
            }
            s->st.ms_expert += fm_now_ms() - te;
            continue;
        }
        double tw = fm_now_ms();
        st = fm_io_wait(m->io, blocks, &ios, err, errlen);
        double te = fm_now_ms();
        s->st.ms_io_wait += te - tw;
        s->st.last_bytes_read += ios.bytes_read;
        s->st.last_expert_loads += ios.loads;
        s->st.last_expert_hits += ios.hits;
        if (st != FM_OK) return st;
        for (int32_t c = 0; c < nc; c++) {
            int32_t e = b->elist[c0 + c];
            fm_qmat wg = fm_part_view(&L->parts[FM_PART_GATE], blocks[c]);
            fm_qmat wu = fm_part_view(&L->parts[FM_PART_UP], blocks[c]);
            fm_qmat wd = fm_part_view(&L->parts[FM_PART_DOWN], blocks[c]);
            /* the expert's tokens, gathered ne rows at a time */
            for (int64_t r0 = 0; r0 < b->cnt[e]; r0 += ne) {
                int64_t me = b->cnt[e] - r0 < ne ? b->cnt[e] - r0 : ne;
                const int32_t *toks = b->etok + b->off[e] + r0;
                const float *wts = b->ew + b->off[e] + r0;
                for (int64_t r = 0; r < me; r++)
                    memcpy(b->xe + r * H, b->xn + (int64_t)toks[r] * H, sizeof(float) * (size_t)H);
                fm_mm(m->pool, &wg, b->xe, me, b->ge);
                fm_mm(m->pool, &wu, b->xe, me, b->ue);
                fm_add_bias(b->ge, fm_part_bias(&L->parts[FM_PART_GATE], blocks[c]), me, I);
                fm_add_bias(b->ue, fm_part_bias(&L->parts[FM_PART_UP], blocks[c]), me, I);
                fm_expert_act(&m->act, b->ge, b->ue, me * I);
                fm_mm(m->pool, &wd, b->ge, me, b->ye);
                fm_add_bias(b->ye, fm_part_bias(&L->parts[FM_PART_DOWN], blocks[c]), me, H);
                for (int64_t r = 0; r < me; r++) {
                    float *dst = b->y + (int64_t)toks[r] * H;
                    const float *src = b->ye + r * H;
                    float w = wts[r];
                    for (int64_t d = 0; d < H; d++) dst[d] += w * src[d];
                }
            }
        }
        s->st.ms_expert += fm_now_ms() - te;
    }
    if (L->has_shexp) {
        for (int64_t t = 0; t < n; t++) {
            float gsc = m->shared_gate == FM_SHGATE_SIGMOID ? fm_sigmoid(b->shs[t]) : 1.0f;
            float *dst = b->y + t * H;
            const float *src = b->sho + t * H;
            for (int64_t d = 0; d < H; d++) dst[d] += gsc * src[d];
        }
    }
    return FM_OK;
}

/* ---------------------------------------------------------------- routed experts of one token */

/* one token through nc experts: gate+up rows of every expert in one pool job, then down rows */
typedef struct {
    const fm_part *parts;
    const uint8_t *const *blk;
    const float *x;
    float *g, *u, *y;
    int64_t I, H;
} fm_exp_job;

static void job_exp_gu(void *ctx, int64_t s, int64_t e, int32_t tid) {
    (void)tid;
    fm_exp_job *j = ctx;
    int64_t I = j->I;
    while (s < e) {
        int64_t c = s / (2 * I), r = s % (2 * I);
        int up = r >= I;
        int64_t r0 = up ? r - I : r;
        int64_t end = c * 2 * I + (up ? 2 * I : I);
        int64_t r1 = r0 + ((e < end ? e : end) - s);
        fm_qmat w = fm_part_view(&j->parts[up ? FM_PART_UP : FM_PART_GATE], j->blk[c]);
        fm_qmat_matvec_rows(&w, j->x, (up ? j->u : j->g) + c * I, r0, r1);
        s += r1 - r0;
    }
}

static void job_exp_down(void *ctx, int64_t s, int64_t e, int32_t tid) {
    (void)tid;
    fm_exp_job *j = ctx;
    int64_t H = j->H;
    while (s < e) {
        int64_t c = s / H, r0 = s % H;
        int64_t end = (c + 1) * H;
        int64_t r1 = r0 + ((e < end ? e : end) - s);
        fm_qmat w = fm_part_view(&j->parts[FM_PART_DOWN], j->blk[c]);
        fm_qmat_matvec_rows(&w, j->g + c * j->I, j->y + c * H, r0, r1);
        s += r1 - r0;
    }
}

/* rows per pool chunk: about 16 KiB of weights */
static int64_t grain_rows(const fm_qmat *W) {
    int64_t rb = (int64_t)(fm_qmat_bytes(W) / (uint64_t)(W->rows > 0 ? W->rows : 1)) + 1;
    int64_t g = 16384 / rb;
    return g < 4 ? 4 : g;
}

void fm_cpu_experts_token(fm_pool *pool, const fm_model *m, const fm_layer *L, const uint8_t *const *blocks,
                          int32_t nc, const float *xn, float *g, float *u, float *ye) {
    if (nc <= 0) return;
    int64_t I = m->moe_I, H = m->H;
    fm_exp_job j = {L->parts, blocks, xn, g, u, ye, I, H};
    fm_qmat wg = fm_part_view(&L->parts[FM_PART_GATE], blocks[0]);
    fm_qmat wd = fm_part_view(&L->parts[FM_PART_DOWN], blocks[0]);
    fm_pool_for(pool, (int64_t)nc * 2 * I, grain_rows(&wg), job_exp_gu, &j);
    for (int32_t c = 0; c < nc; c++) { /* part biases (spec model features) */
        fm_add_bias(g + c * I, fm_part_bias(&L->parts[FM_PART_GATE], blocks[c]), 1, I);
        fm_add_bias(u + c * I, fm_part_bias(&L->parts[FM_PART_UP], blocks[c]), 1, I);
    }
    fm_expert_act(&m->act, g, u, (int64_t)nc * I);
    fm_pool_for(pool, (int64_t)nc * H, grain_rows(&wd), job_exp_down, &j);
    for (int32_t c = 0; c < nc; c++) fm_add_bias(ye + c * H, fm_part_bias(&L->parts[FM_PART_DOWN], blocks[c]), 1, H);
}

/* ---------------------------------------------------------------- session */

static void session_free_bufs(const fm_model *m, cpu_session *c) {
    if (c->kc)
        for (int32_t i = 0; i < m->n_full; i++) free(c->kc[i]);
    if (c->vc)
        for (int32_t i = 0; i < m->n_full; i++) free(c->vc[i]);
    if (c->conv)
        for (int32_t i = 0; i < m->n_linear; i++) free(c->conv[i]);
    if (c->ssm)
        for (int32_t i = 0; i < m->n_linear; i++) free(c->ssm[i]);
    free(c->kc);
    free(c->vc);
    free(c->conv);
    free(c->ssm);
}

static fm_status cpu_session_new(fm_session *s, char *err, size_t errlen) {
    const fm_model *m = s->m;
    int32_t n_ctx = s->n_ctx;
    int64_t kvd = (int64_t)m->n_kv_heads * m->head_dim;
    int64_t cd = conv_dim_of(m);
    size_t kv_bytes;
    if (__builtin_mul_overflow((size_t)n_ctx, (size_t)kvd * sizeof(float), &kv_bytes) ||
        kv_bytes > ((size_t)1 << 48))
        return fm_errf(err, errlen, FM_ERR_OOM,
                       "fm_session_new: a KV cache of %d tokens x %lld values per layer is too large", n_ctx,
                       (long long)kvd);
    cpu_session *c = calloc(1, sizeof *c);
    if (!c) return fm_errf(err, errlen, FM_ERR_OOM, "fm_session_new: out of memory");
    c->n_ctx = n_ctx;
    c->kc = calloc((size_t)m->n_full + 1, sizeof(float *));
    c->vc = calloc((size_t)m->n_full + 1, sizeof(float *));
    c->conv = calloc((size_t)m->n_linear + 1, sizeof(float *));
    c->ssm = calloc((size_t)m->n_linear + 1, sizeof(float *));
    int ok = c->kc && c->vc && c->conv && c->ssm;
    for (int32_t i = 0; ok && i < m->n_full; i++) {
        c->kc[i] = calloc((size_t)n_ctx * (size_t)kvd, sizeof(float));
        c->vc[i] = calloc((size_t)n_ctx * (size_t)kvd, sizeof(float));
        ok = c->kc[i] && c->vc[i];
    }
    for (int32_t i = 0; ok && i < m->n_linear; i++) {
        c->conv[i] = calloc((size_t)(m->conv_k > 1 ? m->conv_k - 1 : 1) * (size_t)cd, sizeof(float));
        c->ssm[i] = calloc((size_t)m->lin_nv * m->lin_dk * m->lin_dv, sizeof(float));
        ok = c->conv[i] && c->ssm[i];
    }
    if (!ok) {
        session_free_bufs(m, c);
        free(c);
        return fm_errf(err, errlen, FM_ERR_OOM,
                       "fm_session_new: out of memory for a context of %d tokens (KV cache %.1f MiB)", n_ctx,
                       (double)m->n_full * 2.0 * (double)n_ctx * (double)kvd * 4.0 / 1048576.0);
    }
    s->bs = c;
    return FM_OK;
}

static void cpu_session_free(fm_session *s) {
    cpu_session *c = s->bs;
    if (!c) return;
    scratch_release(c->scratch);
    session_free_bufs(s->m, c);
    free(c);
    s->bs = NULL;
}

static void cpu_session_reset(fm_session *s) {
    const fm_model *m = s->m;
    cpu_session *c = s->bs;
    int64_t cd = conv_dim_of(m);
    /* rows past pos are always written before they are read, but an error (FM_ERR_NUMERIC above
     * all) must not leave anything of the old timeline behind: zero what was written */
    int64_t kvd = (int64_t)m->n_kv_heads * m->head_dim;
    if (c->kv_hw > 0)
        for (int32_t i = 0; i < m->n_full; i++) {
            memset(c->kc[i], 0, sizeof(float) * (size_t)c->kv_hw * (size_t)kvd);
            memset(c->vc[i], 0, sizeof(float) * (size_t)c->kv_hw * (size_t)kvd);
        }
    c->kv_hw = 0;
    for (int32_t i = 0; i < m->n_linear; i++) {
        memset(c->conv[i], 0, sizeof(float) * (size_t)(m->conv_k > 1 ? m->conv_k - 1 : 1) * (size_t)cd);
        memset(c->ssm[i], 0, sizeof(float) * (size_t)m->lin_nv * m->lin_dk * m->lin_dv);
    }
}

/* ---------------------------------------------------------------- model */

/* every layer kind of fm_backend.h has its op; nothing model-wide is refused */
static fm_status cpu_supports(const fm_model *m, int32_t il, char *err, size_t errlen) {
    (void)m, (void)il, (void)err, (void)errlen;
    return FM_OK;
}

/* the expert reads (fm_io) over the model's expert files */
static fm_status cpu_model_open(fm_model *m, const fm_model_params *p, char *err, size_t errlen) {
    if (!m->n_moe) return FM_OK;
    int32_t iot = p->io_threads > 0 ? p->io_threads : (m->k_tok > 4 ? m->k_tok : 4);
    fm_status st = fm_io_open(&m->io, m->files, m->n_layers, iot, p->direct_io, p->ram_budget, m->max_batch, err,
                              errlen);
    if (st != FM_OK) return st;
    fm_io_set_prefetch(m->io, p->prefetch);
    return FM_OK;
}

static void cpu_model_close(fm_model *m) {
    if (m->io) fm_io_close(m->io);
    m->io = NULL;
}

/* ---------------------------------------------------------------- eval and the layer ops */

/* pass length: the whole call unless its per-token activations would pass FM_PASS_BYTES; the
 * session's scratch sized for it */
static fm_status cpu_eval_begin(fm_eval *ev, char *err, size_t errlen) {
    fm_session *s = ev->s;
    const fm_model *m = s->m;
    int64_t per_tok = (int64_t)sizeof(float) * (4 * (int64_t)m->H + 1 + 3 * (int64_t)m->k_tok);
    int64_t np_cap = FM_PASS_BYTES / per_tok;
    if (np_cap < FM_UBATCH) np_cap = FM_UBATCH;
    int64_t np = ev->n_tokens < np_cap ? ev->n_tokens : np_cap;
    int64_t nb = np < FM_UBATCH ? np : FM_UBATCH;
    int32_t n_ctx = s->n_ctx;
    for (int32_t i = 0; ev->seqs && i < ev->n_tokens; i++)
        if (ev->seqs[i]->n_ctx > n_ctx) n_ctx = ev->seqs[i]->n_ctx;
    fm_scratch *b = session_scratch(s, nb, np, n_ctx);
    if (!b)
        return fm_errf(err, errlen, FM_ERR_OOM, "fm_session_eval: out of memory for scratch of %lld tokens",
                       (long long)np);
    ev->pass_cap = np;
    ev->timed = 1;
    ev->graph = FM_GRAPH_NONE;
    ev->ctx = b;
    return FM_OK;
}

static fm_status cpu_embed(fm_pass *p, char *err, size_t errlen) {
    (void)err, (void)errlen;
    fm_session *s = p->s;
    const fm_model *m = s->m;
    cpu_session *c = s->bs;
    fm_scratch *b = p->ctx;
    int64_t n = p->n, H = m->H;
    if (p->seqs) /* rows this pass may write */
        for (int64_t t = 0; t < n; t++) {
            cpu_session *ct = p->seqs[t]->bs;
            if (p->seq_pos[t] + 1 > ct->kv_hw) ct->kv_hw = p->seq_pos[t] + 1;
        }
    else if (p->pos + n > c->kv_hw)
        c->kv_hw = p->pos + (int32_t)n;
    for (int64_t t = 0; t < n; t++) fm_qmat_get_row(&m->tok_embd, p->tokens[t], b->x + t * H);
    b->pf_il = -1;
    if (n == 1 && m->n_moe) prefetch_predict(s, b, -1, b->x); /* first MoE layer, from the embedding */
    return FM_OK;
}

/* a token mixer: x += mixer(rmsnorm(x)) over chunks of b->nb tokens */
static void cpu_mixer(fm_pass *p, int32_t il,
                      void (*layer)(fm_session *, const fm_layer *, fm_scratch *, int64_t, int32_t,
                                    fm_session *const *, const int32_t *)) {
    fm_session *s = p->s;
    const fm_model *m = s->m;
    const fm_layer *L = &m->layers[il];
    fm_scratch *b = p->ctx;
    int64_t n = p->n, H = m->H;
    for (int64_t t = 0; t < n; t++) fm_rmsnorm(b->xn + t * H, b->x + t * H, L->attn_norm, H, m->eps, m->norm_offset);
    for (int64_t c = 0; c < n; c += b->nb) {
        fm_scratch v = *b; /* the chunk's rows of xn (in) and y (out) */
        v.xn = b->xn + c * H;
        v.y = b->y + c * H;
        int64_t nn = n - c < b->nb ? n - c : b->nb;
        layer(s, L, &v, nn, p->pos + (int32_t)c, p->seqs ? p->seqs + c : NULL, p->seqs ? p->seq_pos + c : NULL);
    }
    for (int64_t i = 0; i < n * H; i++) b->x[i] += b->y[i];
}

static fm_status cpu_attn_full(fm_pass *p, int32_t il, char *err, size_t errlen) {
    (void)err, (void)errlen;
    cpu_mixer(p, il, layer_full_attn);
    return FM_OK;
}

static fm_status cpu_attn_linear(fm_pass *p, int32_t il, char *err, size_t errlen) {
    (void)err, (void)errlen;
    cpu_mixer(p, il, layer_linear_attn);
    return FM_OK;
}

static fm_status cpu_moe(fm_pass *p, int32_t il, char *err, size_t errlen) {
    fm_session *s = p->s;
    const fm_model *m = s->m;
    const fm_layer *L = &m->layers[il];
    fm_scratch *b = p->ctx;
    int64_t n = p->n, H = m->H;
    for (int64_t t = 0; t < n; t++) fm_rmsnorm(b->xn + t * H, b->x + t * H, L->ffn_norm, H, m->eps, m->norm_offset);
    fm_status st = layer_moe(s, il, L, b, n, err, errlen);
    if (st != FM_OK) return st;
    for (int64_t i = 0; i < n * H; i++) b->x[i] += b->y[i];
    return FM_OK;
}

static fm_status cpu_ffn_dense(fm_pass *p, int32_t il, char *err, size_t errlen) {
    (void)err, (void)errlen;
    fm_session *s = p->s;
    const fm_model *m = s->m;
    const fm_layer *L = &m->layers[il];
    fm_scratch *b = p->ctx;
    int64_t n = p->n, H = m->H;
    for (int64_t t = 0; t < n; t++) fm_rmsnorm(b->xn + t * H, b->x + t * H, L->ffn_norm, H, m->eps, m->norm_offset);
    for (int64_t c = 0; c < n; c += b->nb) {
        fm_scratch v = *b;
        v.xn = b->xn + c * H;
        v.y = b->y + c * H;
        layer_dense_ffn(s, L, &v, n - c < b->nb ? n - c : b->nb);
    }
    if (s->trace.ids) /* no routed experts: -1 */
        for (int64_t t = 0; t < n && s->trace_row + t < s->trace.cap_tokens; t++)
            for (int32_t k = 0; k < m->k_tok; k++)
                s->trace.ids[((s->trace_row + t) * m->n_layers + il) * m->k_tok + k] = -1;
    for (int64_t i = 0; i < n * H; i++) b->x[i] += b->y[i];
    return FM_OK;
}

static fm_status cpu_final(fm_pass *p, char *err, size_t errlen) {
    if (!p->logits) return FM_OK;
    const fm_model *m = p->s->m;
    fm_scratch *b = p->ctx;
    int64_t n = p->n, H = m->H;
    const fm_qmat *lm = m->tie ? &m->tok_embd : &m->output;
    if (p->all_logits) {
        for (int64_t t = 0; t < n; t++)
            fm_rmsnorm(b->xn + t * H, b->x + t * H, m->output_norm, H, m->eps, m->norm_offset);
        fm_mm(m->pool, lm, b->xn, n, p->logits);
        return guard(p, m->n_layers, p->logits, n, m->vocab, 0, err, errlen);
    }
    fm_rmsnorm(b->xn, b->x + (n - 1) * H, m->output_norm, H, m->eps, m->norm_offset);
    fm_qmat_matvec(m->pool, lm, b->xn, p->logits);
    return guard(p, m->n_layers, p->logits, 1, m->vocab, n - 1, err, errlen);
}

/* the residual stream after the embedding (stage -1) or layer il: a NaN/Inf ends the call here */
static fm_status cpu_guard(fm_pass *p, int32_t stage, char *err, size_t errlen) {
    const fm_scratch *b = p->ctx;
    return guard(p, stage, b->x, p->n, p->s->m->H, 0, err, errlen);
}

/* ---------------------------------------------------------------- session state (fm_state.c) */

/* the host array of piece (fm_backend.h FM_STATE_*) idx and its floats for `rows` KV rows */
static float *state_piece(fm_session *s, int32_t piece, int32_t idx, int32_t rows, size_t *n) {
    cpu_session *c = s->bs;
    *n = (size_t)fm_state_piece_floats(s->m, piece, rows);
    return piece == FM_STATE_K ? c->kc[idx] : piece == FM_STATE_V ? c->vc[idx] : piece == FM_STATE_CONV ? c->conv[idx]
                                                                                                  : c->ssm[idx];
}

static fm_status cpu_state_get(fm_session *s, int32_t piece, int32_t idx, int32_t rows, void *dst, char *err,
                               size_t errlen) {
    (void)err, (void)errlen;
    size_t n;
    const float *a = state_piece(s, piece, idx, rows, &n);
    memcpy(dst, a, n * sizeof(float));
    return FM_OK;
}

static fm_status cpu_state_set(fm_session *s, int32_t piece, int32_t idx, int32_t rows, const void *src,
                               char *err, size_t errlen) {
    (void)err, (void)errlen;
    size_t n;
    float *a = state_piece(s, piece, idx, rows, &n);
    memcpy(a, src, n * sizeof(float));
    cpu_session *c = s->bs;
    if ((piece == FM_STATE_K || piece == FM_STATE_V) && rows > c->kv_hw) c->kv_hw = rows;
    return FM_OK;
}

const fm_backend fm_cpu_backend = {
    .name = "cpu",
    .records_trace = 1,
    .host_dense = 1,
    .multi_seq = 1,
    .supports = cpu_supports,
    .model_open = cpu_model_open,
    .model_close = cpu_model_close,
    .session_new = cpu_session_new,
    .session_free = cpu_session_free,
    .session_reset = cpu_session_reset,
    .eval_begin = cpu_eval_begin,
    .eval_end = NULL,
    .embed = cpu_embed,
    .mixer = {[FM_ATTN_FULL] = cpu_attn_full, [FM_ATTN_LINEAR] = cpu_attn_linear},
    .ffn = {[FM_FFN_MOE] = cpu_moe, [FM_FFN_DENSE] = cpu_ffn_dense},
    .final = cpu_final,
    .guard = cpu_guard,
    .sync = NULL,
    .capture_begin = NULL,
    .capture_end = NULL,
    .replay = NULL,
    .state_get = cpu_state_get,
    .state_set = cpu_state_set,
};
