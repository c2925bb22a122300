/* fm_state.c: session state snapshots (fm_session_state_size / _save / _load), for every backend.
 *
 * Owns: the snapshot format (header + payload, below), the model fingerprint it carries, the checks
 * that refuse a snapshot of another model or a damaged buffer, and the order in which the pieces
 * travel through the backend's state_get / state_set hooks (fm_backend.h).
 * Does not own: where a backend keeps its state (fm_cpu.c, csrc/cuda), the layer loop (fm_forward.c).
 *
 * Format (host byte order, every field naturally aligned; version FM_STATE_VERSION):
 *   header  fm_state_hdr (magic "FMSTATE\0", checksum of every byte after it, version, header
 *           bytes, fingerprint, payload bytes, pos, the model's dims, the weights' identity: a hash
 *           of the model dir's pyflashmoe.json as the model was opened, which lists every weight file's
 *           sha256; both computed once by fm_model_open, fm_state_model_ids), then one byte per layer
 *           (attn kind | ffn kind << 4), zero-padded to a multiple of 8 bytes
 *   payload f32, for each full-attention layer in state_idx order: K rows [0, pos) then V rows
 *           [0, pos) ([pos, kv_dim] each); then for each linear-attention layer in state_idx order:
 *           the conv state [conv_rows, conv_dim] then the recurrent state [lin_nv, lin_dk, lin_dv]
 * The payload is the same for every backend (both keep f32 in these layouts), so a snapshot saved
 * by one backend loads into a session of another backend over the same model dir.
 */
#include <stdlib.h>

#include "fm_backend.h"
#include "fm_model.h"

#define FM_STATE_VERSION 1u
static const char FM_STATE_MAGIC[8] = {'F', 'M', 'S', 'T', 'A', 'T', 'E', 0};

typedef struct {
    char magic[8];
    uint64_t checksum;      /* fm_state_hash of every byte after this field (header rest + payload) */
    uint32_t version;
    uint32_t header_bytes;  /* this struct + the layer-kind bytes, padded to 8 */
    uint64_t fingerprint;   /* model_fingerprint */
    uint64_t payload_bytes;
    int32_t pos;
    int32_t n_layers, H, vocab, k_tok;
    int32_t n_full, n_linear, kv_dim;
    int32_t conv_rows, conv_dim, lin_nv, lin_dk, lin_dv;
    int32_t reserved;
    uint64_t weights_id;    /* weights_id: the model dir's manifest, which lists every file's sha256 */
} fm_state_hdr;

/* ---------------------------------------------------------------- hashing */

/* 64-bit hash of n bytes: four independent multiply-xorshift lanes over 8-byte words (several
 * GB/s; it guards against damage, not against an adversary), the tail bytes, the length */
static uint64_t fm_state_hash(const void *data, uint64_t n, uint64_t seed) {
    const uint8_t *p = (const uint8_t *)data;
    const uint64_t M = 0x9E3779B97F4A7C15ull;
    uint64_t h[4] = {seed ^ 0x243F6A8885A308D3ull, seed ^ 0x13198A2E03707344ull, seed ^ 0xA4093822299F31D0ull,
                     seed ^ 0x082EFA98EC4E6C89ull};
    uint64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int l = 0; l < 4; l++) {
            uint64_t w;
            memcpy(&w, p + i + 8 * (uint64_t)l, 8);
            h[l] = (h[l] ^ w) * M;
            h[l] ^= h[l] >> 29;
        }
    uint64_t r = h[0] ^ (h[1] * 3) ^ (h[2] * 5) ^ (h[3] * 7);
    for (; i < n; i++) {
        r = (r ^ p[i]) * M;
        r ^= r >> 31;
    }
    r ^= n;
    r *= M;
    r ^= r >> 32;
    return r;
}

static uint64_t mix_u64(uint64_t h, uint64_t v) { return fm_state_hash(&v, sizeof v, h); }
static uint64_t mix_f32(uint64_t h, float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return mix_u64(h, u);
}
static uint64_t mix_qmat(uint64_t h, const fm_qmat *w) {
    h = mix_u64(h, (uint64_t)w->dt);
    h = mix_u64(h, ((uint64_t)(uint32_t)w->bits << 32) | (uint32_t)w->group_size);
    h = mix_u64(h, (uint64_t)w->rows);
    return mix_u64(h, (uint64_t)w->cols);
}

/* the model's structure: dims, features, every layer's kinds and features and the formats (kind,
 * bits, group size, shape) of every dense tensor and expert part. Not the weight values. */
static uint64_t model_fingerprint(const fm_model *m) {
    uint64_t h = 0x6A09E667F3BCC908ull;
    const int32_t dims[] = {m->H, m->n_layers, m->vocab, m->n_heads, m->n_kv_heads, m->head_dim, m->rotary_dim,
                            m->attn_gate, m->lin_nk, m->lin_nv, m->lin_dk, m->lin_dv, m->conv_k, m->n_experts,
                            m->k_model, m->k_tok, m->moe_I, m->norm_topk, m->sh_I, m->dense_I, m->tie,
                            m->route.kind, m->route.norm, m->route.n_group, m->route.topk_group, m->router_bias,
                            m->act.kind, m->shared_gate};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) h = mix_u64(h, (uint64_t)(uint32_t)dims[i]);
    const float fl[] = {m->eps, m->norm_offset, m->rope_theta, m->route.scale, m->act.limit, m->act.alpha};
    for (size_t i = 0; i < sizeof fl / sizeof fl[0]; i++) h = mix_f32(h, fl[i]);
    h = mix_qmat(h, &m->tok_embd);
    if (!m->tie) h = mix_qmat(h, &m->output);
    for (int32_t il = 0; il < m->n_layers; il++) {
        const fm_layer *L = &m->layers[il];
        h = mix_u64(h, ((uint64_t)(uint32_t)L->attn << 32) | (uint32_t)L->ffn);
        h = mix_u64(h, ((uint64_t)(uint32_t)L->window << 32) | (uint32_t)L->has_sinks);
        const fm_qmat *ws[16];
        int nw = 0;
        if (L->attn == FM_ATTN_FULL) {
            ws[nw++] = &L->wq, ws[nw++] = &L->wk, ws[nw++] = &L->wv, ws[nw++] = &L->wo;
        } else {
            ws[nw++] = &L->ssm_qkv, ws[nw++] = &L->ssm_z, ws[nw++] = &L->ssm_b, ws[nw++] = &L->ssm_a;
            ws[nw++] = &L->ssm_out;
        }
        if (L->ffn == FM_FFN_MOE) {
            ws[nw++] = &L->router;
            if (L->has_shexp) ws[nw++] = &L->sh_gate, ws[nw++] = &L->sh_up, ws[nw++] = &L->sh_down;
        } else {
            ws[nw++] = &L->ffn_gate, ws[nw++] = &L->ffn_up, ws[nw++] = &L->ffn_down;
        }
        for (int i = 0; i < nw; i++) h = mix_qmat(h, ws[i]);
        if (L->ffn == FM_FFN_MOE) {
            h = mix_u64(h, (uint64_t)L->has_shexp);
            for (int pi = 0; pi < 3; pi++) {
                const fm_part *pt = &L->parts[pi];
                h = mix_u64(h, (uint64_t)pt->dt);
                h = mix_u64(h, ((uint64_t)(uint32_t)pt->bits << 32) | (uint32_t)pt->group_size);
                h = mix_u64(h, (uint64_t)pt->rows);
                h = mix_u64(h, (uint64_t)pt->cols);
                h = mix_u64(h, (uint64_t)pt->has_bias);
            }
        }
    }
    return h;
}

/* the model's fingerprint, and the identity of its weights: a hash of the manifest it was opened
 * from (pyflashmoe.json lists the size and sha256 of every weight file, so other weights of the same
 * shapes give another id), in 16 KiB pieces */
void fm_state_model_ids(fm_model *m, const char *manifest, size_t len) {
    m->state_fingerprint = model_fingerprint(m);
    uint64_t h = 0x510E527FADE682D1ull;
    for (size_t i = 0; i < len; i += 16384) h = fm_state_hash(manifest + i, len - i < 16384 ? len - i : 16384, h);
    m->state_weights_id = h;
}

/* ---------------------------------------------------------------- layout */

typedef struct {
    int64_t kv_dim, conv_rows, conv_dim, ssm;
    uint64_t header_bytes;
} fm_state_dims;

static fm_state_dims dims_of(const fm_model *m) {
    fm_state_dims d;
    d.kv_dim = (int64_t)m->n_kv_heads * m->head_dim;
    d.conv_rows = m->conv_k > 1 ? m->conv_k - 1 : 1;
    d.conv_dim = 2 * (int64_t)m->lin_nk * m->lin_dk + (int64_t)m->lin_nv * m->lin_dv;
    d.ssm = (int64_t)m->lin_nv * m->lin_dk * m->lin_dv;
    d.header_bytes = (sizeof(fm_state_hdr) + (uint64_t)m->n_layers + 7) & ~(uint64_t)7;
    return d;
}

static uint64_t payload_bytes_of(const fm_model *m, const fm_state_dims *d, int64_t pos) {
    uint64_t full = (uint64_t)m->n_full * 2u * (uint64_t)pos * (uint64_t)d->kv_dim;
    uint64_t lin = (uint64_t)m->n_linear * ((uint64_t)d->conv_rows * (uint64_t)d->conv_dim + (uint64_t)d->ssm);
    return (full + lin) * sizeof(float);
}

static void fill_header(const fm_session *s, const fm_state_dims *d, fm_state_hdr *h) {
    const fm_model *m = s->m;
    memset(h, 0, sizeof *h);
    memcpy(h->magic, FM_STATE_MAGIC, 8);
    h->version = FM_STATE_VERSION;
    h->header_bytes = (uint32_t)d->header_bytes;
    h->fingerprint = m->state_fingerprint;
    h->payload_bytes = payload_bytes_of(m, d, s->pos);
    h->pos = s->pos;
    h->n_layers = m->n_layers, h->H = m->H, h->vocab = m->vocab, h->k_tok = m->k_tok;
    h->n_full = m->n_full, h->n_linear = m->n_linear, h->kv_dim = (int32_t)d->kv_dim;
    h->conv_rows = (int32_t)d->conv_rows, h->conv_dim = (int32_t)d->conv_dim;
    h->lin_nv = m->lin_nv, h->lin_dk = m->lin_dk, h->lin_dv = m->lin_dv;
}

static uint8_t layer_kind_byte(const fm_layer *L) { return (uint8_t)((L->attn & 15) | ((L->ffn & 15) << 4)); }

/* ---------------------------------------------------------------- the API */

fm_status fm_session_state_size(const fm_session *s, uint64_t *bytes) {
    if (bytes) *bytes = 0;
    if (!s || !bytes) return FM_ERR_ARG;
    fm_state_dims d = dims_of(s->m);
    *bytes = d.header_bytes + payload_bytes_of(s->m, &d, s->pos);
    return FM_OK;
}

/* the pieces in payload order through the backend's hook: get (save) or set (load) */
static fm_status copy_pieces(fm_session *s, const fm_state_dims *d, int32_t pos, uint8_t *save_to,
                             const uint8_t *load_from, char *err, size_t errlen) {
    const fm_model *m = s->m;
    const fm_backend *be = m->be;
    uint64_t off = 0;
    for (int32_t j = 0; j < m->n_full; j++)
        for (int32_t piece = FM_STATE_K; piece <= FM_STATE_V; piece++) {
            fm_status st = FM_OK;
            if (pos > 0)
                st = save_to ? be->state_get(s, piece, j, pos, save_to + off, err, errlen)
                             : be->state_set(s, piece, j, pos, load_from + off, err, errlen);
            if (st != FM_OK) return st;
            off += (uint64_t)pos * (uint64_t)d->kv_dim * sizeof(float);
        }
    for (int32_t j = 0; j < m->n_linear; j++)
        for (int32_t piece = FM_STATE_CONV; piece <= FM_STATE_SSM; piece++) {
            fm_status st = save_to ? be->state_get(s, piece, j, 0, save_to + off, err, errlen)
                                   : be->state_set(s, piece, j, 0, load_from + off, err, errlen);
            if (st != FM_OK) return st;
            off += (uint64_t)(piece == FM_STATE_CONV ? d->conv_rows * d->conv_dim : d->ssm) * sizeof(float);
        }
    return FM_OK;
}

static fm_status no_hooks(const fm_session *s, const char *fn, char *err, size_t errlen) {
    return fm_errf(err, errlen, FM_ERR_BACKEND, "%s: the %s backend does not save or load session states", fn,
                   s->m->be->name);
}

fm_status fm_session_state_save(fm_session *s, void *buf, uint64_t cap, uint64_t *written, char *err,
                                size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (written) *written = 0;
    if (!s) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_state_save: session is NULL");
    fm_model *m = s->m;
    if (!m->be->state_get) return no_hooks(s, "fm_session_state_save", err, errlen);
    pthread_mutex_lock(&m->mu);
    fm_state_dims d = dims_of(m);
    fm_state_hdr h;
    fill_header(s, &d, &h);
    h.weights_id = m->state_weights_id;
    uint64_t total = d.header_bytes + h.payload_bytes;
    if (written) *written = total;
    if (!buf || cap < total) {
        pthread_mutex_unlock(&m->mu);
        return fm_errf(err, errlen, FM_ERR_ARG,
                       "fm_session_state_save: buf holds %llu bytes, the state at position %d needs %llu "
                       "(fm_session_state_size)",
                       (unsigned long long)(buf ? cap : 0), s->pos, (unsigned long long)total);
    }
    uint8_t *b = (uint8_t *)buf;
    memset(b, 0, d.header_bytes);
    for (int32_t il = 0; il < m->n_layers; il++) b[sizeof h + (size_t)il] = layer_kind_byte(&m->layers[il]);
    fm_status st = copy_pieces(s, &d, s->pos, b + d.header_bytes, NULL, err, errlen);
    pthread_mutex_unlock(&m->mu);
    if (st != FM_OK) {
        if (written) *written = 0;
        return st;
    }
    memcpy(b, &h, sizeof h);
    h.checksum = fm_state_hash(b + 16, total - 16, 0);
    memcpy(b + 8, &h.checksum, 8);
    return FM_OK;
}

#define REFUSE(...) return fm_errf(err, errlen, FM_ERR_FORMAT, "session state: " __VA_ARGS__)

/* every check of a snapshot against the session, before anything is copied */
static fm_status check_snapshot(const fm_session *s, const uint8_t *b, uint64_t len, fm_state_hdr *out, char *err,
                                size_t errlen) {
    const fm_model *m = s->m;
    fm_state_hdr h;
    if (len < 16)
        REFUSE("%llu bytes is too short for a snapshot (truncated; a header alone is %zu bytes)",
               (unsigned long long)len, sizeof h);
    if (memcmp(b, FM_STATE_MAGIC, 8) != 0) REFUSE("bad magic: not a pyflashmoe session state");
    if (len < sizeof h)
        REFUSE("truncated: %llu bytes, the header alone is %zu", (unsigned long long)len, sizeof h);
    memcpy(&h, b, sizeof h);
    if (h.version != FM_STATE_VERSION)
        REFUSE("format version %u, this build reads version %u", h.version, FM_STATE_VERSION);
    if (h.header_bytes < sizeof h || h.header_bytes % 8 || (uint64_t)h.header_bytes > len)
        REFUSE("header size %u is damaged or truncated (buffer of %llu bytes)", h.header_bytes,
               (unsigned long long)len);
    if (h.payload_bytes > len - h.header_bytes)
        REFUSE("truncated: %llu bytes, the header says %llu", (unsigned long long)len,
               (unsigned long long)h.header_bytes + (unsigned long long)h.payload_bytes);
    if (h.payload_bytes < len - h.header_bytes)
        REFUSE("%llu bytes past the end of the snapshot (%llu bytes)",
               (unsigned long long)(len - h.header_bytes - h.payload_bytes),
               (unsigned long long)h.header_bytes + (unsigned long long)h.payload_bytes);
    if (fm_state_hash(b + 16, len - 16, 0) != h.checksum) REFUSE("checksum mismatch: the buffer is damaged");
    /* another model? name the first thing that differs */
    fm_state_dims d = dims_of(m);
#define SAME(field, val, what)                                                                                \
    if ((int64_t)h.field != (int64_t)(val))                                                                   \
    REFUSE("snapshot of another model: %s is %lld in the snapshot, %lld in this model", what,                 \
           (long long)h.field, (long long)(val))
    SAME(n_layers, m->n_layers, "the number of layers");
    SAME(H, m->H, "the hidden size");
    SAME(vocab, m->vocab, "the vocabulary size");
    if (h.header_bytes != d.header_bytes)
        REFUSE("header size %u, %llu for this model", h.header_bytes, (unsigned long long)d.header_bytes);
    for (int32_t il = 0; il < m->n_layers; il++) {
        uint8_t k = b[sizeof h + (size_t)il], mine = layer_kind_byte(&m->layers[il]);
        if (k != mine)
            REFUSE("snapshot of another model: layer %d is %s + %s in the snapshot, %s + %s in this model", il,
                   fm_attn_kind_desc(k & 15), fm_ffn_kind_desc(k >> 4), fm_attn_kind_desc(mine & 15),
                   fm_ffn_kind_desc(mine >> 4));
    }
    SAME(kv_dim, d.kv_dim, "the KV row size (n_kv_heads x head_dim)");
    SAME(conv_rows, d.conv_rows, "conv_kernel - 1");
    SAME(conv_dim, d.conv_dim, "the linear-attention conv dim");
    SAME(lin_nv, m->lin_nv, "the linear-attention value heads");
    SAME(lin_dk, m->lin_dk, "the linear-attention key head dim");
    SAME(lin_dv, m->lin_dv, "the linear-attention value head dim");
    SAME(k_tok, m->k_tok, "the experts per token");
#undef SAME
    uint64_t fp = m->state_fingerprint;
    if (h.fingerprint != fp)
        REFUSE("snapshot of another model: same dims and layer kinds, but the weight formats or model features "
               "differ (fingerprint %016llx in the snapshot, %016llx in this model)",
               (unsigned long long)h.fingerprint, (unsigned long long)fp);
    if (h.weights_id != m->state_weights_id)
        REFUSE("snapshot of another model: the same layer table and formats, other weights (the model dir's "
               "pyflashmoe.json differs)");
    if (h.pos < 0 || h.payload_bytes != payload_bytes_of(m, &d, h.pos))
        REFUSE("position %d does not match the payload of %llu bytes", h.pos, (unsigned long long)h.payload_bytes);
    *out = h;
    return FM_OK;
}
#undef REFUSE

fm_status fm_session_state_load(fm_session *s, const void *buf, uint64_t len, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (!s) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_state_load: session is NULL");
    if (!buf) return fm_errf(err, errlen, FM_ERR_ARG, "fm_session_state_load: buf is NULL");
    fm_model *m = s->m;
    if (!m->be->state_set) return no_hooks(s, "fm_session_state_load", err, errlen);
    fm_state_hdr h;
    memset(&h, 0, sizeof h);
    fm_status st = check_snapshot(s, (const uint8_t *)buf, len, &h, err, errlen);
    if (st != FM_OK) return st;
    if (h.pos > s->n_ctx)
        return fm_errf(err, errlen, FM_ERR_CTX_FULL,
                       "session state: the snapshot holds %d tokens, the session's n_ctx is %d (nothing was loaded)",
                       h.pos, s->n_ctx);
    fm_state_dims d = dims_of(m);
    pthread_mutex_lock(&m->mu);
    st = copy_pieces(s, &d, h.pos, NULL, (const uint8_t *)buf + h.header_bytes, err, errlen);
    if (st == FM_OK) s->pos = h.pos;
    pthread_mutex_unlock(&m->mu);
    if (st != FM_OK) {
        fm_session_reset(s);
        size_t l = err ? strlen(err) : 0;
        if (err && l + 1 < errlen) snprintf(err + l, errlen - l, " (the session was reset to position 0)");
    }
    return st;
}
