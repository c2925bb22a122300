/* fm_forward.c: sessions and THE layer loop, for every backend.
 *
 * Owns: fm_session_* (the generic part: new/free/reset through the model's backend, stats, trace
 * settings) and fm_session_eval: argument checks, the model mutex, the eval hooks, passes of
 * fm_eval.pass_cap tokens, and run_pass: the only loop over the layer table in csrc/ (embed, per
 * layer the token mixer op of its attn kind and the FFN op of its ffn kind, the numerical guard,
 * final norm + lm_head), per-op timing into fm_stats and the trace's per-layer ms, and the graph
 * path (the same loop run with fm_pass.capture set between the backend's capture hooks, then
 * replayed).
 * Does not own: the ops and the backends' state (fm_cpu.c, csrc/cuda), the backend interface
 * (fm_backend.h), the layer table (fm_model.c).
 */
#include <ctype.h>
#include <stdlib.h>

#include "fm_backend.h"
#include "fm_model.h"

/* ---------------------------------------------------------------- session */

fm_status fm_session_new(fm_session **out, fm_model *m, int32_t n_ctx, char *err, size_t errlen) {
    if (!out) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_new: out is NULL");
    *out = NULL;
    if (!m) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_new: model is NULL");
    if (n_ctx < 1) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_new: n_ctx must be >= 1 (got %d)", n_ctx);
    fm_session *s = calloc(1, sizeof *s);
    if (!s) return fm_errf(err, errlen, FM_ERR_OOM, "fm_session_new: out of memory");
    s->m = m;
    s->n_ctx = n_ctx;
    fm_status st = m->be->session_new(s, err, errlen);
    if (st != FM_OK) {
        free(s);
        return st;
    }
    *out = s;
    return FM_OK;
}

void fm_session_free(fm_session *s) {
    if (!s) return;
    s->m->be->session_free(s);
    free(s);
}

void fm_session_reset(fm_session *s) {
    if (!s) return;
    s->m->be->session_reset(s);
    s->pos = 0;
}

int32_t fm_session_pos(const fm_session *s) { return s ? s->pos : 0; }
int32_t fm_session_n_ctx(const fm_session *s) { return s ? s->n_ctx : 0; }

void fm_session_get_stats(const fm_session *s, fm_stats *out) {
    if (!out) return;
    if (!s) {
        memset(out, 0, sizeof *out);
        return;
    }
    *out = s->st;
}

void fm_session_reset_stats(fm_session *s) {
    if (s) memset(&s->st, 0, sizeof s->st);
}

fm_status fm_session_set_trace(fm_session *s, const fm_trace *trace, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (!s) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_set_trace: session is NULL");
    fm_trace t = {NULL, 0, NULL, NULL};
    if (trace) t = *trace;
    if (t.cap_tokens < 0)
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_set_trace: cap_tokens must be >= 0 (got %lld)",
                       (long long)t.cap_tokens);
    if (!t.ids) t.cap_tokens = 0;
    if ((t.ids || t.counts || t.layer_ms) && !s->m->be->records_trace) {
        char name[16]; /* "CUDA backend" */
        size_t i = 0;
        for (; s->m->be->name[i] && i + 1 < sizeof name; i++) name[i] = (char)toupper((unsigned char)s->m->be->name[i]);
        name[i] = 0;
        return fm_errf(err, errlen, FM_ERR_BACKEND,
                       "fm_session_set_trace: the %s backend does not record the routing trace (use the CPU "
                       "backend)",
                       name);
    }
    if (t.ids && t.cap_tokens == 0) t.ids = NULL;
    s->trace = t;
    s->trace_n = 0;
    return FM_OK;
}

int64_t fm_session_trace_tokens(const fm_session *s) { return s ? s->trace_n : 0; }

/* ---------------------------------------------------------------- the layer loop */

/* the ms an op charged to fm_stats itself (the per-op timing adds only the rest) */
static double charged_ms(const fm_stats *st) {
    return st->ms_attn + st->ms_route + st->ms_io_wait + st->ms_expert + st->ms_other;
}

/* per-op timing: the wall time since t0 (after be->sync) less what the op charged itself goes to
 * *acc; *layer (the trace's per-layer ms, may be NULL) gets all of it */
static fm_status op_time(const fm_backend *be, fm_pass *p, double t0, double c0, double *acc, double *layer,
                         char *err, size_t errlen) {
    if (be->sync) {
        fm_status st = be->sync(p, err, errlen);
        if (st != FM_OK) return st;
    }
    fm_stats *st = &p->s->st;
    double dt = fm_now_ms() - t0;
    *acc += dt - (charged_ms(st) - c0);
    if (layer) *layer += dt;
    return FM_OK;
}

#define TRY(x)                                                                                                \
    do {                                                                                                      \
        fm_status s_ = (x);                                                                                   \
        if (s_ != FM_OK) return s_;                                                                           \
    } while (0)

/* one pass of p->n tokens through the model: THE loop over the layer table (fm_model_open checked
 * that every layer's kinds index ops the backend has). timed: per-op timing into fm_stats. */
static fm_status run_pass(const fm_backend *be, fm_pass *p, int32_t timed, char *err, size_t errlen) {
    fm_session *s = p->s;
    const fm_model *m = s->m;
    fm_stats *st = &s->st;
    double t = 0, c = 0;
    if (timed) t = fm_now_ms(), c = charged_ms(st);
    TRY(be->embed(p, err, errlen));
    TRY(be->guard(p, -1, err, errlen));
    if (timed) TRY(op_time(be, p, t, c, &st->ms_other, NULL, err, errlen));
    double *lms = timed ? s->trace.layer_ms : NULL;
    for (int32_t il = 0; il < m->n_layers; il++) {
        const fm_layer *L = &m->layers[il];
        if (timed) t = fm_now_ms(), c = charged_ms(st);
        TRY(be->mixer[L->attn](p, il, err, errlen));
        if (timed) TRY(op_time(be, p, t, c, &st->ms_attn, lms ? &lms[2 * il] : NULL, err, errlen));
        if (timed) t = fm_now_ms(), c = charged_ms(st);
        TRY(be->ffn[L->ffn](p, il, err, errlen));
        if (timed) TRY(op_time(be, p, t, c, &st->ms_expert, lms ? &lms[2 * il + 1] : NULL, err, errlen));
        TRY(be->guard(p, il, err, errlen));
    }
    if (timed) t = fm_now_ms(), c = charged_ms(st);
    TRY(be->final(p, err, errlen));
    if (timed) TRY(op_time(be, p, t, c, &st->ms_other, NULL, err, errlen));
    return FM_OK;
}

/* pass `index` of ev: cnt tokens from token done */
static fm_pass pass_of(const fm_eval *ev, int32_t done, int64_t cnt, int32_t index) {
    fm_pass p;
    memset(&p, 0, sizeof p);
    p.s = ev->s;
    p.tokens = ev->tokens + done;
    p.n = cnt;
    p.pos = ev->seqs ? ev->seq_pos[done] : ev->s->pos;
    if (ev->seqs) {
        p.seqs = ev->seqs + done;
        p.seq_pos = ev->seq_pos + done;
    }
    p.index = index;
    p.all_logits = ev->all_logits;
    p.ctx = ev->ctx;
    if (ev->logits) {
        if (ev->all_logits)
            p.logits = ev->logits + (int64_t)done * ev->s->m->vocab;
        else if (done + cnt == ev->n_tokens)
            p.logits = ev->logits;
    }
    return p;
}

/* the eval as one recorded pass: record it first when asked (the loop with capture set between the
 * backend's hooks; a failed capture falls back to plain passes: *plain = 1), then replay */
static fm_status run_graph(const fm_backend *be, fm_eval *ev, int32_t *plain, char *err, size_t errlen) {
    fm_session *s = ev->s;
    fm_pass p = pass_of(ev, 0, ev->n_tokens, 0);
    if (ev->graph == FM_GRAPH_CAPTURE) {
        char cerr[256];
        cerr[0] = 0;
        fm_pass cp = p;
        cp.capture = 1;
        cp.tokens = NULL;
        fm_status st = be->capture_begin(&cp, cerr, sizeof cerr);
        if (st == FM_OK) st = run_pass(be, &cp, 0, cerr, sizeof cerr);
        if (be->capture_end(&cp, st, cerr, sizeof cerr) != FM_OK) {
            *plain = 1;
            return FM_OK;
        }
    }
    TRY(be->replay(&p, err, errlen));
    if (!ev->seqs) s->pos += (int32_t)p.n; /* a multi-sequence step: the caller moves the positions */
    return FM_OK;
}

/* the eval under the model mutex: eval_begin, passes of pass_cap tokens, eval_end. A single
 * sequence advances its position pass by pass; a multi-sequence step (ev->seqs) moves no position
 * (the caller does, on success). *begun = 0 when eval_begin refused (nothing was evaluated). */
static fm_status run_eval(fm_eval *ev, int32_t *begun, char *err, size_t errlen) {
    fm_session *s = ev->s;
    fm_model *m = s->m;
    const fm_backend *be = m->be;
    *begun = 0;
    pthread_mutex_lock(&m->mu);
    fm_status st = be->eval_begin(ev, err, errlen);
    if (st == FM_OK && ev->pass_cap < 1)
        st = fm_errf(err, errlen, FM_ERR_BACKEND, "backend %s: pass capacity %lld", be->name, (long long)ev->pass_cap);
    if (st != FM_OK) {
        pthread_mutex_unlock(&m->mu);
        return st;
    }
    *begun = 1;
    s->st.last_bytes_read = s->st.last_expert_loads = s->st.last_expert_hits = 0;
    int32_t plain = 1;
    if (ev->graph != FM_GRAPH_NONE && be->replay && ev->n_tokens <= ev->pass_cap) {
        plain = 0;
        st = run_graph(be, ev, &plain, err, errlen);
    }
    for (int32_t done = 0, index = 0; plain && done < ev->n_tokens; done += (int32_t)ev->pass_cap, index++) {
        int64_t cnt = ev->n_tokens - done < ev->pass_cap ? ev->n_tokens - done : ev->pass_cap;
        fm_pass p = pass_of(ev, done, cnt, index);
        s->trace_row = s->trace_n + done;
        st = run_pass(be, &p, ev->timed, err, errlen);
        if (st != FM_OK) break;
        if (!ev->seqs) s->pos += (int32_t)cnt;
    }
    if (be->eval_end) st = be->eval_end(ev, st, err, errlen);
    pthread_mutex_unlock(&m->mu);
    return st;
}

/* an eval of n tokens of s (the loop's block of fm_eval) */
static fm_eval eval_of(fm_session *s, const int32_t *tokens, int32_t n, float *logits, int32_t all_logits) {
    fm_eval ev;
    memset(&ev, 0, sizeof ev);
    ev.s = s;
    ev.tokens = tokens;
    ev.n_tokens = n;
    ev.logits = logits;
    ev.all_logits = all_logits;
    ev.pos0 = s->pos;
    return ev;
}

/* the I/O counters of the eval into the session's totals */
static void add_io_stats(fm_session *s, double t0) {
    s->st.n_eval_calls++;
    s->st.ms_total += fm_now_ms() - t0;
    s->st.bytes_read += s->st.last_bytes_read;
    s->st.expert_loads += s->st.last_expert_loads;
    s->st.expert_hits += s->st.last_expert_hits;
}

/* an error mid-eval: the session reset, the message says so */
static fm_status failed(fm_session *const *ss, int32_t n, fm_status st, char *err, size_t errlen) {
    for (int32_t i = 0; i < n; i++) fm_session_reset(ss[i]);
    size_t l = err ? strlen(err) : 0;
    if (err && l + 1 < errlen)
        snprintf(err + l, errlen - l, n == 1 ? " (the session was reset to position 0)"
                                             : " (every session of the batch was reset to position 0)");
    return st;
}

fm_status fm_session_eval(fm_session *s, const int32_t *tokens, int32_t n_tokens, float *logits,
                          int64_t n_logits, int32_t all_logits, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (!s) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval: session is NULL");
    fm_model *m = s->m;
    if (n_tokens < 1) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval: n_tokens must be >= 1 (got %d)", n_tokens);
    if (!tokens) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval: tokens is NULL");
    for (int32_t t = 0; t < n_tokens; t++)
        if (tokens[t] < 0 || tokens[t] >= m->vocab)
            return fm_errf(err, errlen, FM_ERR_ARG,
                           "fm_session_eval: token id %d at position %d is outside the vocabulary [0, %d)",
                           tokens[t], t, m->vocab);
    if (logits) {
        int64_t need = all_logits ? (int64_t)n_tokens * m->vocab : (int64_t)m->vocab;
        if (n_logits < need)
            return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval: n_logits is %lld, need %lld",
                           (long long)n_logits, (long long)need);
    }
    if ((int64_t)s->pos + n_tokens > s->n_ctx)
        return fm_errf(err, errlen, FM_ERR_CTX_FULL,
                       "context full: %d tokens held + %d new > n_ctx %d (nothing was evaluated)", s->pos,
                       n_tokens, s->n_ctx);
    fm_eval ev = eval_of(s, tokens, n_tokens, logits, all_logits);
    double t0 = fm_now_ms();
    int32_t begun;
    fm_status st = run_eval(&ev, &begun, err, errlen);
    if (!begun) return st; /* nothing was evaluated: the session is as it was */
    add_io_stats(s, t0);
    s->st.last_n_tokens = n_tokens;
    if (st != FM_OK) return failed(&s, 1, st, err, errlen);
    s->st.n_tokens += n_tokens;
    if (m->be->records_trace) s->trace_n += n_tokens;
    return FM_OK;
}

fm_status fm_session_eval_batch(fm_session *const *ss, int32_t n, const int32_t *tokens, float *logits,
                                int64_t n_logits, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (!ss) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval_batch: sessions is NULL");
    if (n < 1) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval_batch: n_seqs must be >= 1 (got %d)", n);
    if (!tokens) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval_batch: tokens is NULL");
    if (!ss[0]) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval_batch: session 0 is NULL");
    fm_model *m = ss[0]->m;
    if (logits && n_logits < (int64_t)n * m->vocab)
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval_batch: n_logits is %lld, need %lld",
                       (long long)n_logits, (long long)n * m->vocab);
    for (int32_t i = 0; i < n; i++) {
        fm_session *s = ss[i];
        if (!s) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval_batch: session %d is NULL", i);
        if (s->m != m)
            return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_eval_batch: session %d belongs to another model", i);
        for (int32_t j = 0; j < i; j++)
            if (ss[j] == s)
                return fm_errf(err, errlen, FM_ERR_ARG,
                               "fm_session_eval_batch: session %d is also session %d (one token per session)", i, j);
        if (s->trace.ids || s->trace.counts || s->trace.layer_ms)
            return fm_errf(err, errlen, FM_ERR_ARG,
                           "fm_session_eval_batch: session %d records a routing trace (evaluate it alone)", i);
        if (tokens[i] < 0 || tokens[i] >= m->vocab)
            return fm_errf(err, errlen, FM_ERR_ARG,
                           "fm_session_eval_batch: token id %d of session %d is outside the vocabulary [0, %d)",
                           tokens[i], i, m->vocab);
        if (s->pos + 1 > s->n_ctx)
            return fm_errf(err, errlen, FM_ERR_CTX_FULL,
                           "context full: session %d holds %d tokens = n_ctx %d (nothing was evaluated)", i, s->pos,
                           s->n_ctx);
    }
    if (n == 1 || !m->be->multi_seq) { /* one at a time (a backend without multi-sequence passes) */
        if (n == 1) return fm_session_eval(ss[0], tokens, 1, logits, n_logits, 0, err, errlen);
        for (int32_t i = 0; i < n; i++) {
            fm_status st = fm_session_eval(ss[i], tokens + i, 1, logits ? logits + (int64_t)i * m->vocab : NULL,
                                           m->vocab, 0, err, errlen);
            if (st != FM_OK) {
                for (int32_t j = 0; j < n; j++)
                    if (j != i) fm_session_reset(ss[j]);
                return st;
            }
        }
        return FM_OK;
    }
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)n);
    if (!pos) return fm_errf(err, errlen, FM_ERR_OOM, "fm_session_eval_batch: out of memory");
    for (int32_t i = 0; i < n; i++) pos[i] = ss[i]->pos;
    fm_session *s = ss[0];
    fm_eval ev = eval_of(s, tokens, n, logits, 1);
    ev.seqs = ss;
    ev.seq_pos = pos;
    double t0 = fm_now_ms();
    int32_t begun;
    fm_status st = run_eval(&ev, &begun, err, errlen);
    free(pos);
    if (!begun) return st;
    add_io_stats(s, t0);
    s->st.last_n_tokens = n;
    if (st != FM_OK) return failed(ss, n, st, err, errlen);
    for (int32_t i = 0; i < n; i++) {
        ss[i]->pos++;
        ss[i]->st.n_tokens++;
        if (i) ss[i]->st.n_eval_calls++;
    }
    return FM_OK;
}
