/* fm_cuda_moe.cu: the CUDA backend's expert tiers and its MoE layer op.
 *
 * Owns: the tiers of the routed experts' weight blocks:
 *   VRAM slot cache (LRU over slots of max block_bytes, bounded by vram_budget; "resident" when
 *   every expert of every layer fits: loaded at open, no host sync per layer)
 *   <- fm_io (csrc/fm_io.c), the model's only storage -> host tier: its pread threads and its RAM
 *   cache (ram_budget, LFU with aging; everything when it fits: "ram resident", filled at open).
 *   The CUDA backend opens it as m->io with two hooks: its block buffers (read slots and cache
 *   entries) are page-locked (carved from chunks pinned at open, fmc_pinned), so a block is copied
 *   to VRAM straight from where it was read or cached; and on_block queues a block's host-to-
 *   device copy on the copy stream the moment the block is available (cache hits inside
 *   fm_io_submit, reads on fm_io's thread right after the read landed).
 * Copies run on their own stream (xs), overlapped with the shared expert on the compute stream
 * (cs); expert id -> slot remap happens on the GPU (k_fill_ptrs, resident) or as one small pointer
 * array copy per chunk (cached mode).
 * Host syncs per decode step: resident: 1 (the logits); cached: 1 per MoE layer (reading the
 * routed ids, needed to manage the tiers) + 1 (the logits), whether the layer hits or misses.
 * Decode with a cache is pipelined (moe_decode_cached): VRAM hits run at once, each missed
 * block's compute waits only for its own copy, the CPU share of the misses found in RAM runs while
 * the storage reads are in flight. Prefill: + 1 per MoE layer per batch (the grouped expert work
 * list is built on the host). Kernel switches: docs/INTERNALS.md section 5.
 *
 * Buffer reuse, the two hazards of asynchronous copies, and how they are excluded:
 *   host buffers: fm_io may write a block buffer again once the caller has submitted its next
 *   request (fm_internal.h). Every copy out of a request's blocks is queued by on_block before
 *   fm_io can hand that block out, so once fm_io_next has handed out all of them, io_end records
 *   ev_copy on the copy stream behind every copy of the request; io_begin makes the host wait for
 *   ev_copy before it submits the next request (io_reuse_wait). In decode that wait never blocks:
 *   the compute stream waited for each copy before the layer's expert kernels, which precede the
 *   next layer's router, whose routed ids the host synced on before it submits again.
 *   VRAM slots: a copy into a slot is queued only after the host synced on the layer's routed ids
 *   (ev_topi), so every expert kernel of an earlier layer (queued before it) is done; within a
 *   layer or chunk a slot is taken by lru_take with the chunk's epoch, which never evicts a slot
 *   that chunk uses (its hits are touched first); a later prefill chunk's copies wait on the copy
 *   stream for ev_comp, recorded on the compute stream after the previous chunk's kernels.
 *   A failed read or copy forgets the VRAM slots of its request (their contents are unknown).
 * Here: the VRAM LRU, the pinned buffers and the fm_io hooks, the tiers' open / close / preload
 * (fmc_moe_open, fmc_moe_close), the fm_io requests of the MoE op, the tier counters, the MoE op
 * (fmc_op_moe: norm, router, shared expert, routed experts through the tiers, combine).
 * Does not own: reads and the RAM cache policy (fm_io.c), the experts' kernels' launches and the
 * CPU share (fm_cuda_experts.cu, fm_cpu.c), the dense launches (fm_cuda_ops.cu).
 */
#include <pthread.h>
#include <stdlib.h>

#include "fmc_internal.cuh"

/* ================================================================== LRU over VRAM slots */

static void lru_free(lru_t *l) {
    free(l->key);
    free(l->of);
    free(l->prev);
    free(l->next);
    free(l->stamp);
    memset(l, 0, sizeof *l);
}

static int lru_init(lru_t *l, int64_t n, int64_t n_keys) {
    memset(l, 0, sizeof *l);
    l->n = n;
    l->key = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    l->of = (int64_t *)malloc(sizeof(int64_t) * (size_t)n_keys);
    l->prev = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    l->next = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    l->stamp = (int64_t *)calloc((size_t)n, sizeof(int64_t));
    if (!l->key || !l->of || !l->prev || !l->next || !l->stamp) {
        lru_free(l);
        return 0;
    }
    for (int64_t i = 0; i < n_keys; i++) l->of[i] = -1;
    for (int64_t i = 0; i < n; i++) {
        l->key[i] = -1;
        l->prev[i] = i - 1;
        l->next[i] = i + 1 < n ? i + 1 : -1;
    }
    l->head = n ? 0 : -1;
    l->tail = n - 1;
    return 1;
}

static void lru_unlink(lru_t *l, int64_t s) {
    if (l->prev[s] >= 0) l->next[l->prev[s]] = l->next[s];
    else l->head = l->next[s];
    if (l->next[s] >= 0) l->prev[l->next[s]] = l->prev[s];
    else l->tail = l->prev[s];
}

static void lru_touch(lru_t *l, int64_t s, int64_t epoch) {
    l->stamp[s] = epoch;
    if (l->head == s) return;
    lru_unlink(l, s);
    l->prev[s] = -1;
    l->next[s] = l->head;
    if (l->head >= 0) l->prev[l->head] = s;
    l->head = s;
    if (l->tail < 0) l->tail = s;
}

/* least recently used slot not stamped with epoch, re-keyed to key and made most recent */
static int64_t lru_take(lru_t *l, int64_t key, int64_t epoch) {
    int64_t s = l->tail;
    while (s >= 0 && l->stamp[s] == epoch) s = l->prev[s];
    if (s < 0) return -1;
    if (l->key[s] >= 0) l->of[l->key[s]] = -1;
    l->key[s] = key;
    l->of[key] = s;
    lru_touch(l, s, epoch);
    return s;
}


/* ================================================================== page-locked block buffers */

static void pin_release(fmc_pinned *a) {
    for (int32_t i = 0; i < a->n_chunks; i++)
        if (a->chunks[i]) cudaFreeHost(a->chunks[i]);
    free(a->chunks);
    free(a->chunk_len);
    free(a->free_list);
    if (a->mu_init) pthread_mutex_destroy(&a->mu);
    memset(a, 0, sizeof *a);
}

/* n blocks of `bytes`, pinned now in chunks of up to 1 GiB (as the old pinned cache was: no
 * cudaHostAlloc on the decode path) */
static fm_status pin_reserve(fmc_pinned *a, size_t bytes, int64_t n, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    if (pthread_mutex_init(&a->mu, NULL) != 0) return fm_errf(err, errlen, FM_ERR_OOM, "cannot create a mutex");
    a->mu_init = 1;
    a->bytes = bytes;
    if (n <= 0) return FM_OK;
    int64_t per = (int64_t)((1ull << 30) / bytes);
    if (per < 1) per = 1;
    const int32_t nch = (int32_t)((n + per - 1) / per);
    a->chunks = (uint8_t **)calloc((size_t)nch, sizeof(uint8_t *));
    a->chunk_len = (uint64_t *)calloc((size_t)nch, sizeof(uint64_t));
    a->free_list = (void **)malloc(sizeof(void *) * (size_t)n);
    if (!a->chunks || !a->chunk_len || !a->free_list) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    for (int32_t i = 0; i < nch; i++) {
        const int64_t cnt = n - (int64_t)i * per < per ? n - (int64_t)i * per : per;
        cudaError_t e = cudaHostAlloc((void **)&a->chunks[i], (size_t)cnt * bytes, cudaHostAllocDefault);
        if (e != cudaSuccess) {
            cudaGetLastError();
            a->chunks[i] = NULL;
            return fm_errf(err, errlen, FM_ERR_OOM,
                           "CUDA: cannot pin %.2f GiB of host memory for the expert blocks (ram_budget + read "
                           "buffers): %s", (double)n * (double)bytes / 1073741824.0, cudaGetErrorString(e));
        }
        a->n_chunks++;
        a->chunk_len[i] = (uint64_t)cnt * bytes;
        for (int64_t k = cnt - 1; k >= 0; k--) a->free_list[a->n_free++] = a->chunks[i] + (uint64_t)k * bytes;
    }
    a->cap = n;
    return FM_OK;
}

/* fm_io_hooks.alloc (fm_io_submit's thread): a reserved block; one pinned now only if fm_io ever
 * asked for more than it can hold at once (not expected) */
static void *pin_alloc(void *user, size_t bytes) {
    fmc_pinned *a = &((fmc_model *)user)->pin;
    void *p = NULL;
    pthread_mutex_lock(&a->mu);
    if (bytes == a->bytes && a->n_free > 0) p = a->free_list[--a->n_free];
    pthread_mutex_unlock(&a->mu);
    if (p) return p;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        return NULL; /* fm_io_submit: FM_ERR_OOM */
    }
    pthread_mutex_lock(&a->mu);
    a->n_extra++;
    pthread_mutex_unlock(&a->mu);
    return p;
}

/* fm_io_hooks.free (fm_io_close, after the streams were synced) */
static void pin_free(void *user, void *p, size_t bytes) {
    (void)bytes;
    fmc_pinned *a = &((fmc_model *)user)->pin;
    pthread_mutex_lock(&a->mu);
    for (int32_t i = 0; i < a->n_chunks; i++)
        if ((uint8_t *)p >= a->chunks[i] && (uint8_t *)p < a->chunks[i] + a->chunk_len[i]) {
            a->free_list[a->n_free++] = p;
            pthread_mutex_unlock(&a->mu);
            return;
        }
    a->n_extra--;
    pthread_mutex_unlock(&a->mu);
    cudaFreeHost(p);
}

/* fm_io_hooks.on_block: block i of the current request is in page-locked memory (a cache hit,
 * inside fm_io_submit, or a read, on the fm_io thread that did it, before fm_io_next can hand it
 * out). Queues its copy into the VRAM slot chosen for it (rq_ddst) on the copy stream, then its
 * event (rq_ev) so that its compute can wait for that copy alone. Runs concurrently with itself
 * and with the main thread's launches (the CUDA runtime is thread-safe; a concurrent copy landing
 * between another block's copy and its event only delays that event). */
static void moe_on_block(void *user, int32_t i, const uint8_t *blk) {
    fmc_model *cm = (fmc_model *)user;
    cm->rq_blk[i] = blk;
    uint8_t *dst = cm->rq_ddst[i];
    if (!dst) return; /* the host computes it, or a preload into the RAM cache only */
    cudaError_t e = cudaSetDevice(0);
    if (e == cudaSuccess) e = cudaMemcpyAsync(dst, blk, (size_t)cm->rq_bytes, cudaMemcpyHostToDevice, cm->xs);
    if (e == cudaSuccess && cm->rq_ev[i] >= 0) e = cudaEventRecord(cm->ev_grp[cm->rq_ev[i]], cm->xs);
    if (e != cudaSuccess) {
        pthread_mutex_lock(&cm->rq_mu);
        if (cm->rq_cerr == cudaSuccess) {
            cm->rq_cerr = e;
            cm->rq_cerr_index = i;
        }
        pthread_mutex_unlock(&cm->rq_mu);
    }
}

/* ================================================================== fm_io requests */

/* before fm_io may write the last request's buffers again: its copies are done (see the note at
 * the top). x: counts a real wait (NULL at open). */
static fm_status io_reuse_wait(fmc_model *cm, fmc_ctx *x, char *err, size_t errlen) {
    if (!cm->io_copies) return FM_OK;
    cudaError_t q = cudaEventQuery(cm->ev_copy);
    if (q == cudaErrorNotReady) {
        const double t0 = fm_now_ms();
        q = cudaEventSynchronize(cm->ev_copy);
        if (x) {
            x->c->cnt.syncs++;
            x->s->st.ms_io_wait += fm_now_ms() - t0;
        }
    }
    CK(q);
    cm->io_copies = 0;
    return FM_OK;
}

/* forget the VRAM slots given to the first n request entries (their contents are not the block) */
static void forget_req(fmc_model *cm, int32_t il, int32_t n) {
    const int64_t E = cm->m->n_experts;
    for (int32_t j = 0; j < n; j++) {
        if (!cm->rq_ddst[j]) continue;
        const int64_t key = (int64_t)il * E + cm->rq_e[j], vs = cm->vl.of[key];
        if (vs >= 0) {
            cm->vl.key[vs] = -1;
            cm->vl.of[key] = -1;
        }
    }
}

/* submit the request rq_e[0..n) of layer il (rq_ddst / rq_ev set): its cache hits' copies are
 * queued before this returns, its reads' copies as they land. On failure no request is active. */
static fm_status io_begin(fmc_model *cm, fmc_ctx *x, int32_t il, int32_t n, char *err, size_t errlen) {
    fm_status st = io_reuse_wait(cm, x, err, errlen);
    if (st == FM_OK) {
        for (int32_t j = 0; j < n; j++) cm->rq_blk[j] = NULL;
        cm->rq_bytes = cm->m->layers[il].block_bytes;
        cm->rq_cerr = cudaSuccess;
        cm->rq_cerr_index = -1;
        cm->t1_recorded = 0;
        cudaError_t e = cudaEventRecord(cm->ev_t0, cm->xs); /* the copies' PCIe rate (split) */
        st = e == cudaSuccess ? fm_io_submit(cm->m->io, il, cm->rq_e, n, err, errlen)
                              : fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: cudaEventRecord: %s", cudaGetErrorString(e));
    }
    if (st != FM_OK) forget_req(cm, il, n);
    return st;
}

/* end the request of io_begin, whatever happened since (st: the caller's status so far, kept when
 * not FM_OK): lets every block arrive (its copy is queued then), records ev_copy (and ev_t1) behind
 * the request's copies, fm_io_wait (RAM cache admission, stats, the read error naming file, layer
 * and expert). On failure the request's VRAM slots are forgotten. */
static fm_status io_end(fmc_model *cm, int32_t il, int32_t n, fm_status st, fm_io_stats *ios, char *err,
                        size_t errlen) {
    fm_io *io = cm->m->io;
    int32_t i;
    const uint8_t *b;
    while (fm_io_next(io, &i, &b)) {}
    cudaError_t e = cudaEventRecord(cm->ev_copy, cm->xs);
    if (e == cudaSuccess && !cm->t1_recorded) e = cudaEventRecord(cm->ev_t1, cm->xs);
    if (e == cudaSuccess) {
        cm->io_copies = 1;
    } else { /* no event to wait for: wait for the copies now */
        cudaStreamSynchronize(cm->xs);
        cudaGetLastError();
        cm->io_copies = 0;
    }
    char e2[512];
    e2[0] = 0;
    const fm_status ws = fm_io_wait(io, NULL, ios, e2, sizeof e2);
    if (st == FM_OK && ws != FM_OK) st = fm_errf(err, errlen, ws, "%s", e2);
    if (st == FM_OK && cm->rq_cerr != cudaSuccess)
        st = fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: host-to-device copy of layer %d expert %d: %s", il,
                     cm->rq_e[cm->rq_cerr_index], cudaGetErrorString(cm->rq_cerr));
    if (st == FM_OK && e != cudaSuccess)
        st = fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: cudaEventRecord: %s", cudaGetErrorString(e));
    if (st != FM_OK) forget_req(cm, il, n);
    return st;
}

/* ================================================================== open / close / preload */

/* every (layer, expert) block through fm_io in requests of a chunk: copied into VRAM slots
 * (to_vram: resident) or admitted into fm_io's RAM cache (ram resident: room for all) */
static fm_status preload(fmc_model *cm, int to_vram, char *err, size_t errlen) {
    fm_model *m = cm->m;
    const int64_t E = m->n_experts;
    const int32_t batch = cm->chunk;
    for (int32_t il = 0; il < m->n_layers; il++) {
        if (m->layers[il].ffn != FM_FFN_MOE) continue;
        for (int64_t e0 = 0; e0 < E; e0 += batch) {
            const int32_t n = (int32_t)(E - e0 < batch ? E - e0 : batch);
            for (int32_t j = 0; j < n; j++) {
                cm->rq_e[j] = (int32_t)(e0 + j);
                cm->rq_ev[j] = -1;
                cm->rq_ddst[j] = NULL;
                if (to_vram) {
                    const int64_t s = lru_take(&cm->vl, (int64_t)il * E + e0 + j, ++cm->epoch);
                    if (s < 0) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no free VRAM expert slot");
                    cm->rq_ddst[j] = cm->vram + (uint64_t)s * cm->slot_bytes;
                }
            }
            CKS(io_begin(cm, NULL, il, n, err, errlen));
            fm_io_stats ios;
            CKS(io_end(cm, il, n, FM_OK, &ios, err, errlen));
        }
    }
    CKS(io_reuse_wait(cm, NULL, err, errlen));
    CK(cudaStreamSynchronize(cm->xs));
    return FM_OK;
}

/* the expert tiers of a model with MoE layers (cm->slot_bytes and total_expert_bytes are set):
 * VRAM slots, pointer and work-list buffers, the pinned buffers, fm_io (m->io) with its RAM cache,
 * CPU split buffers; preloads the resident tiers. On failure the caller closes the model
 * (fmc_moe_close). */
fm_status fmc_moe_open(fmc_model *cm, const fm_model_params *p, char *err, size_t errlen) {
    fm_model *m = cm->m;
#define TRY(x) CKS(x)
#define TRYC(x)                                                                                               \
    do {                                                                                                      \
        cudaError_t e_ = (x);                                                                                 \
        if (e_ != cudaSuccess) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: %s: %s", #x, cudaGetErrorString(e_)); \
    } while (0)
    const int64_t E = m->n_experts;
    const int32_t K = m->k_tok;
    cm->n_keys = (int64_t)m->n_layers * E;
    uint64_t total_slots_needed = (uint64_t)m->n_moe * (uint64_t)E;
    uint64_t budget = p->vram_budget;
    if (!budget) { /* default: 60% of the free VRAM, at most every expert */
        size_t fr = 0, tot = 0;
        TRYC(cudaMemGetInfo(&fr, &tot));
        budget = (uint64_t)((double)fr * 0.6);
    }
    int64_t nv = (int64_t)(budget / cm->slot_bytes);
    if ((uint64_t)nv >= total_slots_needed) {
        nv = (int64_t)total_slots_needed;
        cm->resident = 1;
    }
    if (nv < K)
        TRY(fm_errf(err, errlen, FM_ERR_ARG,
                    "vram_budget %llu bytes holds %lld expert slots of %llu bytes; at least experts_per_token "
                    "(%d) are needed",
                    (unsigned long long)budget, (long long)nv, (unsigned long long)cm->slot_bytes, K));
    {
        cudaError_t e = cudaMalloc((void **)&cm->vram, (size_t)nv * cm->slot_bytes);
        if (e != cudaSuccess)
            TRY(fm_errf(err, errlen, FM_ERR_OOM, "CUDA: cannot allocate the VRAM expert cache (%lld slots, %.2f GiB): %s",
                        (long long)nv, (double)nv * (double)cm->slot_bytes / 1073741824.0, cudaGetErrorString(e)));
    }
    if (!lru_init(&cm->vl, nv, cm->n_keys)) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
    /* host tier: fm_io's RAM cache, at most every block ("ram resident"); none when every expert
     * lives in VRAM */
    int64_t nr = cm->resident ? 0 : (int64_t)(p->ram_budget / cm->slot_bytes);
    if (nr > 0 && (uint64_t)nr >= total_slots_needed) {
        nr = (int64_t)total_slots_needed;
        cm->ram_resident = 1;
    }
    cm->has_ram = nr > 0;
    cm->chunk = FMC_CHUNK_MAX > K ? FMC_CHUNK_MAX : K;
    if (cm->chunk > nv) cm->chunk = (int32_t)nv;
    int64_t max_chunks = (E + cm->chunk - 1) / cm->chunk;
    cm->ptr_cap = max_chunks * (int64_t)FMC_UBATCH * K;
    TRYC(cudaHostAlloc((void **)&cm->h_ptrs, (size_t)cm->ptr_cap * sizeof(void *), cudaHostAllocDefault));
    TRYC(cudaMalloc((void **)&cm->d_ptrs, (size_t)cm->ptr_cap * sizeof(void *)));
    TRYC(cudaHostAlloc((void **)&cm->h_topi, (size_t)FMC_UBATCH * K * sizeof(int32_t), cudaHostAllocDefault));
    {
        const size_t wb = (size_t)max_chunks * 3 * FMC_UBATCH * (size_t)K * sizeof(int32_t);
        TRYC(cudaHostAlloc((void **)&cm->h_mwork, wb, cudaHostAllocDefault));
        TRYC(cudaMalloc((void **)&cm->d_mwork, wb));
        cm->mcnt = (int32_t *)calloc((size_t)E, sizeof(int32_t));
        if (!cm->mcnt) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
    }
    cm->eptr = (const uint8_t **)calloc((size_t)E, sizeof(void *));
    cm->used = (int32_t *)calloc((size_t)E, sizeof(int32_t));
    cm->rq_e = (int32_t *)calloc((size_t)cm->chunk, sizeof(int32_t));
    cm->rq_ddst = (uint8_t **)calloc((size_t)cm->chunk, sizeof(uint8_t *));
    cm->rq_ev = (int32_t *)calloc((size_t)cm->chunk, sizeof(int32_t));
    cm->rq_blk = (const uint8_t **)calloc((size_t)cm->chunk, sizeof(uint8_t *));
    if (!cm->eptr || !cm->used || !cm->rq_e || !cm->rq_ddst || !cm->rq_ev || !cm->rq_blk)
        TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
    if (pthread_mutex_init(&cm->rq_mu, NULL) != 0) TRY(fm_errf(err, errlen, FM_ERR_OOM, "cannot create a mutex"));
    cm->rq_mu_init = 1;
    if (cm->has_ram) { /* CPU split buffers */
        TRYC(cudaHostAlloc((void **)&cm->h_xn, sizeof(float) * (size_t)m->H, cudaHostAllocDefault));
        TRYC(cudaHostAlloc((void **)&cm->h_topw, sizeof(float) * (size_t)K, cudaHostAllocDefault));
        TRYC(cudaHostAlloc((void **)&cm->h_ycpu, sizeof(float) * (size_t)m->H, cudaHostAllocDefault));
        TRYC(cudaMalloc((void **)&cm->d_ycpu, sizeof(float) * (size_t)m->H));
        cm->cg = (float *)malloc(sizeof(float) * (size_t)K * (size_t)m->moe_I);
        cm->cu = (float *)malloc(sizeof(float) * (size_t)K * (size_t)m->moe_I);
        cm->cy = (float *)malloc(sizeof(float) * (size_t)K * (size_t)m->H);
        cm->cblk = (const uint8_t **)calloc((size_t)K, sizeof(void *));
        cm->cpair = (int32_t *)calloc((size_t)K, sizeof(int32_t));
        if (!cm->cg || !cm->cu || !cm->cy || !cm->cblk || !cm->cpair)
            TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
    }
    /* page-locked block buffers for fm_io: every buffer it can hold at once, the RAM cache plus
     * its read slots (two halves of max_batch = chunk), pinned now (nothing is pinned on the
     * decode path; the old layout had the cache plus one chunk of staging) */
    TRY(pin_reserve(&cm->pin, (size_t)cm->slot_bytes, nr + 2 * (int64_t)cm->chunk, err, errlen));
    /* the one storage -> host tier of the model: a reader the loader opened would be a second
     * one (its own threads, files and cache), so it is replaced */
    if (m->io) {
        fm_io_close(m->io);
        m->io = NULL;
    }
    {
        fm_io_hooks hk;
        memset(&hk, 0, sizeof hk);
        hk.alloc = pin_alloc;
        hk.free = pin_free;
        hk.on_block = moe_on_block;
        hk.user = cm;
        const int32_t iot = p->io_threads > 0 ? p->io_threads : (K > 8 ? K : 8);
        TRY(fm_io_open_ex(&m->io, m->files, m->n_layers, iot, p->direct_io, (uint64_t)nr * cm->slot_bytes,
                          cm->chunk, &hk, err, errlen));
        cm->io_opened = 1;
        cm->ram_slots = fm_io_cache_capacity(m->io);
    }
    if (cm->resident) {
        TRY(preload(cm, 1, err, errlen));
        const uint8_t **tab = (const uint8_t **)calloc((size_t)cm->n_keys, sizeof(void *));
        if (!tab) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
        for (int64_t k = 0; k < cm->n_keys; k++)
            tab[k] = cm->vl.of[k] >= 0 ? cm->vram + (uint64_t)cm->vl.of[k] * cm->slot_bytes : NULL;
        cudaError_t e = cudaMalloc((void **)&cm->d_table, (size_t)cm->n_keys * sizeof(void *));
        if (e == cudaSuccess)
            e = cudaMemcpy((void *)cm->d_table, tab, (size_t)cm->n_keys * sizeof(void *), cudaMemcpyHostToDevice);
        free(tab);
        TRYC(e);
    } else if (cm->ram_resident) {
        TRY(preload(cm, 0, err, errlen));
    }
    return FM_OK;
#undef TRY
#undef TRYC
}

/* after both streams were synced (no copy out of fm_io's buffers is in flight) */
void fmc_moe_close(fmc_model *cm) {
    /* fm_io first: its threads stop, and it hands every block buffer back to pin */
    if (cm->io_opened && cm->m->io) {
        fm_io_close(cm->m->io);
        cm->m->io = NULL;
    }
    cm->io_opened = 0;
    pin_release(&cm->pin);
    if (cm->vram) cudaFree(cm->vram);
    if (cm->d_table) cudaFree((void *)cm->d_table);
    if (cm->d_ptrs) cudaFree((void *)cm->d_ptrs);
    if (cm->h_ptrs) cudaFreeHost((void *)cm->h_ptrs);
    if (cm->h_topi) cudaFreeHost(cm->h_topi);
    if (cm->h_mwork) cudaFreeHost(cm->h_mwork);
    if (cm->d_mwork) cudaFree(cm->d_mwork);
    free(cm->mcnt);
    lru_free(&cm->vl);
    free(cm->eptr);
    free(cm->used);
    free(cm->rq_e);
    free(cm->rq_ddst);
    free(cm->rq_ev);
    free((void *)cm->rq_blk);
    if (cm->rq_mu_init) pthread_mutex_destroy(&cm->rq_mu);
    cm->rq_mu_init = 0;
    if (cm->h_xn) cudaFreeHost(cm->h_xn);
    if (cm->h_topw) cudaFreeHost(cm->h_topw);
    if (cm->h_ycpu) cudaFreeHost(cm->h_ycpu);
    if (cm->d_ycpu) cudaFree(cm->d_ycpu);
    free(cm->cg);
    free(cm->cu);
    free(cm->cy);
    free((void *)cm->cblk);
    free(cm->cpair);
}

/* ================================================================== the MoE op */

/* a layer's tier counts: vh VRAM hits, rh RAM-cache hits (copied or computed on the host),
 * sr storage reads; copied = blocks that crossed PCIe */
static void count_tiers(fmc_ctx *x, int64_t vh, int64_t rh, int64_t sr, int64_t copied, uint64_t bb) {
    fmc_session *c = x->c;
    c->cnt.vram_hits += vh;
    c->cnt.ram_hits += rh;
    c->cnt.storage_reads += sr;
    c->cnt.h2d_bytes += (int64_t)((uint64_t)copied * bb);
    x->s->st.expert_hits_vram += vh;
    x->s->st.last_expert_hits += rh;
    x->s->st.last_expert_loads += sr;
    x->s->st.last_bytes_read += (int64_t)((uint64_t)sr * bb);
}

/* decode: request entry j's compute, behind its own copy (queued by on_block with event rq_ev[j]) */
static fm_status dec_one(fmc_ctx *x, const cl_layer *L, int32_t j, int32_t pair, char *err, size_t errlen) {
    fmc_model *cm = x->cm;
    CK(cudaStreamWaitEvent(cm->cs, cm->ev_grp[cm->rq_ev[j]], 0));
    PairSet one;
    one.p[0] = cm->rq_ddst[j];
    one.pair[0] = pair;
    return fmc_launch_dec(x, L, &one, 1, err, errlen);
}

/* One decode layer's routed experts with a VRAM cache (not resident), the nu distinct experts in
 * list (nu <= K <= FMC_PSET, one token):
 *   VRAM hits: computed at once (they overlap everything below);
 *   the misses, all in one fm_io request: those in fm_io's RAM cache are hits there, copied inside
 *   fm_io_submit (on_block) and each computed behind its own copy; the CPU share (try_split) of
 *   them is computed on the host straight from the cache (fm_cpu_experts_token), while the
 *   storage reads are in flight; each storage read's copy is queued by the fm_io thread that read
 *   it and its compute as soon as fm_io_next hands it out.
 * Still one host sync (the routed ids) per layer. */
static fm_status moe_decode_cached(fmc_ctx *x, int32_t il, const int32_t *list, int64_t nu, int try_split,
                                   uint32_t *hostmask, const float **ycpu, char *err, size_t errlen) {
    fm_model *m = x->m;
    fmc_model *cm = x->cm;
    const fm_layer *FL = &m->layers[il];
    const cl_layer *L = &cm->L[il];
    const int64_t E = m->n_experts;
    const int32_t K = m->k_tok;
    const uint64_t bb = FL->block_bytes;
    const int64_t ep = ++cm->epoch;
    int32_t pair_of[FMC_PSET];
    for (int64_t i = 0; i < nu; i++) {
        pair_of[i] = 0;
        for (int32_t p = 0; p < K; p++)
            if (cm->h_topi[p] == list[i]) pair_of[i] = p;
    }
    /* VRAM hits first (touched now, so that no slot in use is evicted below); where each miss is,
     * looked up without counting a use */
    PairSet hs;
    int nh = 0;
    int64_t m_ram = 0, m_other = 0;
    int8_t where[FMC_PSET]; /* 0 VRAM, 1 fm_io's RAM cache, 2 storage */
    for (int64_t i = 0; i < nu; i++) {
        const int64_t key = (int64_t)il * E + list[i];
        const int64_t vs = cm->vl.of[key];
        if (vs >= 0) {
            lru_touch(&cm->vl, vs, ep);
            hs.p[nh] = cm->vram + (uint64_t)vs * cm->slot_bytes;
            hs.pair[nh++] = pair_of[i];
            where[i] = 0;
        } else if (cm->has_ram && fm_io_peek(m->io, il, list[i])) {
            where[i] = 1;
            m_ram++;
        } else {
            where[i] = 2;
            m_other++;
        }
    }
    CKS(fmc_launch_dec(x, L, &hs, nh, err, errlen));
    if (m_ram + m_other == 0) {
        count_tiers(x, nh, 0, 0, 0, bb);
        return FM_OK;
    }
    /* the request: every miss; the host's share (the first ncpu_want of those in RAM) gets no VRAM
     * slot, each of the GPU's a slot and an event */
    const int64_t ncpu_want =
        try_split ? fmc_split_count(cm->split, cm->rate_h2d, cm->rate_cpu, m_ram, m_other, (++cm->split_calls & 63) == 0)
                  : 0;
    int32_t n = 0, ncpu = 0, rpair[FMC_PSET];
    int8_t rwhere[FMC_PSET], rcpu[FMC_PSET];
    int64_t rh_gpu = 0, sr = 0;
    for (int64_t i = 0; i < nu; i++) {
        if (where[i] == 0) continue;
        const int32_t j = n++;
        cm->rq_e[j] = list[i];
        cm->rq_ddst[j] = NULL;
        cm->rq_ev[j] = -1;
        rpair[j] = pair_of[i];
        rwhere[j] = where[i];
        rcpu[j] = where[i] == 1 && ncpu < ncpu_want;
        if (rcpu[j]) {
            ncpu++;
            continue;
        }
        const int64_t vs = lru_take(&cm->vl, (int64_t)il * E + list[i], ep);
        if (vs < 0) {
            forget_req(cm, il, j);
            return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no free VRAM expert slot");
        }
        cm->rq_ddst[j] = cm->vram + (uint64_t)vs * cm->slot_bytes;
        cm->rq_ev[j] = j; /* j < nu <= FMC_PSET events */
        if (where[i] == 1) rh_gpu++;
        else sr++;
    }
    CKS(io_begin(cm, x, il, n, err, errlen));
    /* no storage reads: every copy was queued inside fm_io_submit, so the PCIe window ends here (recorded
     * in io_end it would also span the host's share below and understate the rate the split uses) */
    if (sr == 0 && cudaEventRecord(cm->ev_t1, cm->xs) == cudaSuccess) cm->t1_recorded = 1;
    /* the RAM hits the GPU takes: copied inside fm_io_submit; each compute behind its copy */
    fm_status st = FM_OK;
    for (int32_t j = 0; j < n && st == FM_OK; j++)
        if (rwhere[j] == 1 && !rcpu[j]) st = dec_one(x, L, j, rpair[j], err, errlen);
    /* the host's share, from the RAM cache (hits: their blocks came with fm_io_submit), while the
     * storage reads are in flight */
    if (st == FM_OK && ncpu > 0) {
        int32_t c = 0;
        for (int32_t j = 0; j < n; j++)
            if (rcpu[j]) {
                cm->cblk[c] = cm->rq_blk[j];
                cm->cpair[c++] = rpair[j];
            }
        fmc_host_share_inline(cm, FL, ncpu);
    }
    /* the storage reads as they land (each one's copy already queued by its fm_io thread) */
    double t = fm_now_ms();
    int32_t j;
    const uint8_t *blk;
    while (fm_io_next(m->io, &j, &blk)) {
        x->s->st.ms_io_wait += fm_now_ms() - t;
        if (st == FM_OK && blk && rwhere[j] == 2) st = dec_one(x, L, j, rpair[j], err, errlen);
        t = fm_now_ms();
    }
    fm_io_stats ios;
    st = io_end(cm, il, n, st, &ios, err, errlen);
    x->s->st.ms_io_wait += fm_now_ms() - t;
    if (st != FM_OK) return st;
    if (ncpu > 0) CKS(fmc_host_share_finish(x, FL, ncpu, hostmask, ycpu, err, errlen));
    cm->t_bytes = (uint64_t)(rh_gpu + sr) * bb;
    cm->t_pending = cm->t_bytes > 0;
    count_tiers(x, nh, rh_gpu + ncpu, sr, rh_gpu + sr, bb);
    return FM_OK;
}

fm_status fmc_op_moe(fm_pass *p, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = fmc_pass_ctx(p);
    fm_model *m = x->m;
    fmc_session *c = x->c;
    fmc_model *cm = x->cm;
    const fm_layer *FL = &m->layers[il];
    const cl_layer *L = &cm->L[il];
    cudaStream_t st = cm->cs;
    const int sms = cm->sms;
    const int64_t n = x->n, H = m->H, E = m->n_experts;
    const int32_t K = m->k_tok;
    const int64_t npairs = n * K;
    CKS(fmc_launch_norm(st, 0, c->x, NULL, L->ffn_norm, n, H, m->eps, m->norm_offset, c->xn, err, errlen));
    CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &cm->mma_ws, L->router, c->xn, H, n, c->lr, E, 0, err, errlen));
    /* routing (fm_ops.c fm_route): the default softmax router is k_route as always; a router bias or a
     * routed scaling factor takes k_route_ex, the sigmoid router k_route_sigmoid */
    if (m->route.kind == FM_ROUTER_SIGMOID)
        k_route_sigmoid<<<(unsigned)n, 32, sizeof(float) * (size_t)(2 * E + 2 * (int64_t)m->route.n_group), st>>>(
            c->lr, L->router_bias, (int)E, K, m->norm_topk, m->route.n_group, m->route.topk_group, m->route.scale,
            c->topi, c->topw);
    else if (L->router_bias || m->route.scale != 1.0f)
        k_route_ex<<<(unsigned)n, 32, sizeof(float) * (size_t)E, st>>>(c->lr, L->router_bias, m->route.scale, (int)E, K,
                                                                       m->norm_topk, c->topi, c->topw);
    else
        k_route<<<(unsigned)n, 32, sizeof(float) * (size_t)E, st>>>(c->lr, (int)E, K, m->norm_topk, c->topi, c->topw);
    CKL();
    /* CPU split possible: decode, fm_io's RAM cache; the layer's normalized input and routing weights
     * come back with the routed ids (one sync) */
    const int try_split = !cm->resident && n == 1 && K <= 32 && cm->has_ram && cm->split != 0.0 && !x->graph;
    if (!cm->resident) {
        CK(cudaMemcpyAsync(cm->h_topi, c->topi, sizeof(int32_t) * (size_t)npairs, cudaMemcpyDeviceToHost, st));
        if (try_split) {
            CK(cudaMemcpyAsync(cm->h_topw, c->topw, sizeof(float) * (size_t)K, cudaMemcpyDeviceToHost, st));
            CK(cudaMemcpyAsync(cm->h_xn, c->xn, sizeof(float) * (size_t)H, cudaMemcpyDeviceToHost, st));
        }
        CK(cudaEventRecord(cm->ev_topi, st));
    }
    uint32_t hostmask = 0; /* combine: bit k = pair k computed on the host (decode) */
    const float *ycpu = NULL;
    /* shared expert: queued now, runs while the host waits for the ids and the copies fly */
    if (FL->has_shexp) {
        CKS(fmc_launch_swiglu(st, sms, m->debug.cuda_mma, &cm->mma_ws, L->sh_gate, L->sh_up, c->xn, H, n, c->shg, err, errlen));
        CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &cm->mma_ws, L->sh_down, c->shg, m->sh_I, n, c->sho, H, 0, err, errlen));
        if (m->shared_gate == FM_SHGATE_SIGMOID) /* spec.shared_gate none: weight 1, no gate logit */
            CKS(fmc_launch_mm(st, sms, m->debug.cuda_mma, &cm->mma_ws, L->sh_router, c->xn, H, n, c->shs, 1, 0, err, errlen));
    }
    if (cm->resident) {
        k_fill_ptrs<<<(unsigned)((npairs + 255) / 256), 256, 0, st>>>(c->topi, npairs, cm->d_table + (int64_t)il * E,
                                                                      cm->d_ptrs);
        CKL();
        CKS(fmc_launch_experts(x, L, cm->d_ptrs, NULL, 0, npairs, err, errlen));
        c->cnt.vram_hits += npairs;
        x->s->st.expert_hits_vram += npairs;
    } else {
        double tw = fm_now_ms();
        CK(cudaEventSynchronize(cm->ev_topi));
        c->cnt.syncs++;
        x->s->st.ms_io_wait += fm_now_ms() - tw;
        if (cm->t_pending) { /* the previous layer's copies are done: their PCIe rate */
            float ms = 0.f;
            if (cudaEventElapsedTime(&ms, cm->ev_t0, cm->ev_t1) == cudaSuccess && ms > 0.f)
                fmc_ema(&cm->rate_h2d, (double)cm->t_bytes / (double)ms);
            cudaGetLastError();
            cm->t_pending = 0;
        }
        if (try_split && cm->split < 0.0 && !cm->calibrated) CKS(fmc_split_calibrate(cm, c, il, FL, err, errlen));
        /* union of the routed experts, ascending */
        int64_t nu = 0;
        int32_t *list = cm->used; /* reuse as a list after marking */
        for (int64_t e = 0; e < E; e++) cm->eptr[e] = NULL;
        /* mark with a non-NULL sentinel */
        static const uint8_t mark = 0;
        for (int64_t p = 0; p < npairs; p++) {
            int32_t e = cm->h_topi[p];
            if (e < 0 || e >= E) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: router produced expert id %d", e);
            cm->eptr[e] = &mark;
        }
        for (int64_t e = 0; e < E; e++)
            if (cm->eptr[e]) {
                list[nu++] = (int32_t)e;
                cm->eptr[e] = NULL;
            }
        const uint64_t bb = FL->block_bytes;
        /* decode: the pipelined path (hits at once, each copied miss as soon as it lands; the CPU
         * split); the chunk loop below serves prefill (and decode with K > FMC_PSET: try_split
         * implies pipe, as chunk >= K) */
        const int pipe = n == 1 && npairs <= FMC_PSET && nu <= cm->chunk;
        if (pipe) CKS(moe_decode_cached(x, il, list, nu, try_split, &hostmask, &ycpu, err, errlen));
        int64_t ci = 0;
        for (int64_t c0 = 0; !pipe && c0 < nu; c0 += cm->chunk, ci++) {
            const int64_t nc = nu - c0 < cm->chunk ? nu - c0 : cm->chunk;
            const int64_t ep = ++cm->epoch;
            if (c0 > 0) { /* the previous chunk's experts may still read the slots this chunk
                           * overwrites: the copies (queued once the request is submitted) wait */
                CK(cudaEventRecord(cm->ev_comp, st));
                CK(cudaStreamWaitEvent(cm->xs, cm->ev_comp, 0));
            }
            /* first chunk: every kernel that reads expert slots was queued before ev_topi, which has
             * completed; the copies need not wait for the shared expert */
            /* pass 1: hits (touch first so that no slot in use is evicted) */
            int64_t vh = 0, rh = 0, sr = 0;
            for (int64_t i = 0; i < nc; i++) {
                const int64_t e = list[c0 + i], key = (int64_t)il * E + e;
                const int64_t vs = cm->vl.of[key];
                if (vs >= 0) {
                    lru_touch(&cm->vl, vs, ep);
                    cm->eptr[e] = cm->vram + (uint64_t)vs * cm->slot_bytes;
                    vh++;
                }
            }
            /* the misses: a VRAM slot each, one fm_io request (on_block copies each block into its
             * slot as it becomes available) */
            int32_t nr = 0;
            for (int64_t i = 0; i < nc; i++) {
                const int64_t e = list[c0 + i], key = (int64_t)il * E + e;
                if (cm->eptr[e]) continue;
                const int64_t vs = lru_take(&cm->vl, key, ep);
                if (vs < 0) {
                    forget_req(cm, il, nr);
                    return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no free VRAM expert slot");
                }
                uint8_t *dst = cm->vram + (uint64_t)vs * cm->slot_bytes;
                cm->eptr[e] = dst;
                cm->rq_e[nr] = (int32_t)e;
                cm->rq_ddst[nr] = dst;
                cm->rq_ev[nr++] = -1;
                if (cm->has_ram && fm_io_peek(m->io, il, (int32_t)e)) rh++;
                else sr++;
            }
            if (nr > 0) {
                CKS(io_begin(cm, x, il, nr, err, errlen));
                const double t0 = fm_now_ms();
                fm_io_stats ios;
                const fm_status rs = io_end(cm, il, nr, FM_OK, &ios, err, errlen);
                x->s->st.ms_io_wait += fm_now_ms() - t0;
                CKS(rs);
                CK(cudaStreamWaitEvent(st, cm->ev_copy, 0));
                cm->t_bytes = (uint64_t)(rh + sr) * bb;
                cm->t_pending = 1;
            }
            count_tiers(x, vh, rh, sr, rh + sr, bb);
            const uint8_t **hp = cm->h_ptrs + ci * (int64_t)FMC_UBATCH * K;
            const uint8_t **dp = cm->d_ptrs + ci * (int64_t)FMC_UBATCH * K;
            for (int64_t p = 0; p < npairs; p++) hp[p] = cm->eptr[cm->h_topi[p]];
            CK(cudaMemcpyAsync((void *)dp, (const void *)hp, sizeof(void *) * (size_t)npairs, cudaMemcpyHostToDevice, st));
            CKS(fmc_launch_experts(x, L, dp, hp, ci, npairs, err, errlen));
            for (int64_t i = 0; i < nc; i++) cm->eptr[list[c0 + i]] = NULL;
        }
    }
    const dim3 cgrid((unsigned)((H + 255) / 256), (unsigned)n);
    if (m->shared_gate == FM_SHGATE_SIGMOID)
        k_moe_combine<false><<<cgrid, 256, 0, st>>>(c->x, c->ye, c->topw, K, c->sho, c->shs, FL->has_shexp, n, H,
                                                    hostmask, ycpu, fmc_guard_code(x, il), c->d_bad);
    else /* spec.shared_gate none: the shared expert's output with weight 1 */
        k_moe_combine<true><<<cgrid, 256, 0, st>>>(c->x, c->ye, c->topw, K, c->sho, c->shs, FL->has_shexp, n, H,
                                                   hostmask, ycpu, fmc_guard_code(x, il), c->d_bad);
    CKL();
    return FM_OK;
}

