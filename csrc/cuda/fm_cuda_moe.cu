/* fm_cuda_moe.cu: the CUDA backend's expert tiers and its MoE layer op.
 *
 * Owns: the tiers of the routed experts' weight blocks:
 *   VRAM slot cache (LRU over slots of max block_bytes, bounded by vram_budget; "resident" when
 *   every expert of every layer fits: loaded at open, no host sync per layer)
 *   <- pinned host cache (ram_budget; LRU, or "ram resident" when everything fits: filled at open)
 *   <- expert files (pread by a thread pool into pinned staging / pinned cache slots; each worker
 *   queues its own H2D copy on the copy stream as soon as its read lands).
 * Copies run on their own stream (xs), overlapped with the shared expert on the compute stream
 * (cs); expert id -> slot remap happens on the GPU (k_fill_ptrs, resident) or as one small pointer
 * array copy per chunk (cached mode).
 * Host syncs per decode step: resident: 1 (the logits); cached: 1 per MoE layer (reading the
 * routed ids, needed to manage the tiers) + 1 (the logits), whether the layer hits or misses.
 * Decode with a cache is pipelined (moe_decode_cached): hits run at once, each missed block's
 * compute waits only for its own copy. Prefill: + 1 per MoE layer per batch (the grouped expert
 * work list is built on the host). Kernel switches: docs/INTERNALS.md section 5.
 * Here: the read pool, the LRU, the tiers' open / close / preload (fmc_moe_open, fmc_moe_close),
 * reads and copies of missed blocks, the tier counters, the MoE op (fmc_op_moe: norm, router,
 * shared expert, routed experts through the tiers, combine).
 * Does not own: the experts' kernels' launches and the CPU share (fm_cuda_experts.cu), the dense
 * launches (fm_cuda_ops.cu), the host-side expert files (fm_model.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "fmc_internal.cuh"

/* ================================================================== read pool */

typedef struct {
    int fd;
    uint64_t off, len;
    uint8_t *dst;  /* pinned host */
    void *ddst;    /* device destination (H2D queued by the worker after the read) or NULL */
    int32_t il, e;
} rtask;

struct rpool {
    pthread_t *th;
    int n_th;
    pthread_mutex_t mu;
    pthread_cond_t cv, done_cv;
    rtask *tasks;
    int cap, ntasks, next, done, stop;
    int failed;
    char msg[512];
    cudaStream_t xs;
    const char *const *paths;
};

static void *rpool_worker(void *arg) {
    rpool *p = (rpool *)arg;
    cudaSetDevice(0);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->next >= p->ntasks) pthread_cond_wait(&p->cv, &p->mu);
        if (p->stop) break;
        rtask t = p->tasks[p->next++];
        pthread_mutex_unlock(&p->mu);
        uint64_t got = 0;
        int bad = 0, eno = 0;
        while (got < t.len) {
            ssize_t r = pread(t.fd, t.dst + got, t.len - got, (off_t)(t.off + got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                bad = 1;
                eno = r < 0 ? errno : 0;
                break;
            }
            got += (uint64_t)r;
        }
        cudaError_t ce = cudaSuccess;
        if (!bad && t.ddst) ce = cudaMemcpyAsync(t.ddst, t.dst, t.len, cudaMemcpyHostToDevice, p->xs);
        pthread_mutex_lock(&p->mu);
        if ((bad || ce != cudaSuccess) && !p->failed) {
            p->failed = bad ? 1 : 2;
            if (bad)
                snprintf(p->msg, sizeof p->msg, "%s: read of layer %d expert %d (%llu bytes at offset %llu) failed: %s",
                         p->paths[t.il], t.il, t.e, (unsigned long long)t.len, (unsigned long long)t.off,
                         eno ? strerror(eno) : "unexpected end of file");
            else
                snprintf(p->msg, sizeof p->msg, "CUDA: host-to-device copy of layer %d expert %d: %s", t.il, t.e,
                         cudaGetErrorString(ce));
        }
        p->done++;
        if (p->done == p->ntasks) pthread_cond_broadcast(&p->done_cv);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void rpool_free(rpool *p) {
    if (!p) return;
    if (p->th) {
        pthread_mutex_lock(&p->mu);
        p->stop = 1;
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        for (int i = 0; i < p->n_th; i++) pthread_join(p->th[i], NULL);
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->cv);
        pthread_cond_destroy(&p->done_cv);
    }
    free(p->th);
    free(p->tasks);
    free(p);
}

static rpool *rpool_new(int n_th, int cap, cudaStream_t xs, const char *const *paths) {
    rpool *p = (rpool *)calloc(1, sizeof *p);
    if (!p) return NULL;
    p->tasks = (rtask *)calloc((size_t)cap, sizeof(rtask));
    p->th = (pthread_t *)calloc((size_t)n_th, sizeof(pthread_t));
    if (!p->tasks || !p->th) {
        free(p->tasks);
        free(p->th);
        free(p);
        return NULL;
    }
    p->cap = cap;
    p->xs = xs;
    p->paths = paths;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    for (int i = 0; i < n_th; i++) {
        if (pthread_create(&p->th[i], NULL, rpool_worker, p) != 0) break;
        p->n_th++;
    }
    if (p->n_th == 0) {
        free(p->th);
        p->th = NULL;
        rpool_free(p);
        return NULL;
    }
    return p;
}

/* run tasks[0..n) (already in p->tasks) and wait; FM_ERR_IO / FM_ERR_BACKEND on failure */
static fm_status rpool_run(rpool *p, int n, char *err, size_t errlen) {
    if (n <= 0) return FM_OK;
    pthread_mutex_lock(&p->mu);
    p->ntasks = n;
    p->next = 0;
    p->done = 0;
    p->failed = 0;
    pthread_cond_broadcast(&p->cv);
    while (p->done < p->ntasks) pthread_cond_wait(&p->done_cv, &p->mu);
    int failed = p->failed;
    p->ntasks = 0;
    p->next = 0;
    pthread_mutex_unlock(&p->mu);
    if (failed) return fm_errf(err, errlen, failed == 1 ? FM_ERR_IO : FM_ERR_BACKEND, "%s", p->msg);
    return FM_OK;
}

/* ================================================================== LRU over slots */

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

/* fill every (layer, expert) key in [k0, k1) into the VRAM slots (resident) and/or the pinned
 * RAM slots (ram resident), through staging */
static fm_status preload(fmc_model *cm, int to_vram, int to_ram, char *err, size_t errlen) {
    fm_model *m = cm->m;
    const int64_t E = m->n_experts;
    int64_t key = 0;
    int nt = 0;
    for (int32_t il = 0; il < m->n_layers; il++) {
        if (m->layers[il].ffn != FM_FFN_MOE) continue;
        const uint64_t bb = m->layers[il].block_bytes;
        for (int64_t e = 0; e < E; e++) {
            key = (int64_t)il * E + e;
            rtask *t = &cm->pool->tasks[nt];
            t->fd = cm->fds[il];
            t->off = m->files[il].data_offset + (uint64_t)e * bb;
            t->len = bb;
            t->il = il;
            t->e = (int32_t)e;
            if (to_ram) {
                int64_t s = lru_take(&cm->rl, key, ++cm->epoch);
                t->dst = fmc_rslot_ptr(cm, s);
            } else {
                t->dst = cm->stage + (uint64_t)nt * cm->slot_bytes;
            }
            t->ddst = NULL;
            if (to_vram) {
                int64_t s = lru_take(&cm->vl, key, ++cm->epoch);
                t->ddst = cm->vram + (uint64_t)s * cm->slot_bytes;
            }
            nt++;
            if (nt == cm->chunk) {
                CKS(rpool_run(cm->pool, nt, err, errlen));
                CK(cudaStreamSynchronize(cm->xs));
                nt = 0;
            }
        }
    }
    CKS(rpool_run(cm->pool, nt, err, errlen));
    CK(cudaStreamSynchronize(cm->xs));
    return FM_OK;
}

/* the expert tiers of a model with MoE layers (cm->slot_bytes and total_expert_bytes are set):
 * slots, pinned host cache, staging, pointer and work-list buffers, files, read pool, CPU split
 * buffers; preloads the resident tiers. On failure the caller closes the model (fmc_moe_close). */
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
    /* host tier */
    int64_t nr = (int64_t)(p->ram_budget / cm->slot_bytes);
    if ((uint64_t)nr >= total_slots_needed) {
        nr = (int64_t)total_slots_needed;
        cm->ram_resident = 1;
    }
    if (nr > 0 && !cm->resident) {
        cm->has_ram = 1;
        cm->rslots_per_chunk = (int64_t)((1ull << 30) / cm->slot_bytes);
        if (cm->rslots_per_chunk < 1) cm->rslots_per_chunk = 1;
        cm->n_rchunks = (int32_t)((nr + cm->rslots_per_chunk - 1) / cm->rslots_per_chunk);
        cm->rchunks = (uint8_t **)calloc((size_t)cm->n_rchunks, sizeof(uint8_t *));
        if (!cm->rchunks) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
        for (int32_t i = 0; i < cm->n_rchunks; i++) {
            int64_t cnt = nr - (int64_t)i * cm->rslots_per_chunk;
            if (cnt > cm->rslots_per_chunk) cnt = cm->rslots_per_chunk;
            cudaError_t e = cudaHostAlloc((void **)&cm->rchunks[i], (size_t)cnt * cm->slot_bytes, cudaHostAllocDefault);
            if (e != cudaSuccess)
                TRY(fm_errf(err, errlen, FM_ERR_OOM, "CUDA: cannot pin %.2f GiB of host memory for ram_budget: %s",
                            (double)nr * (double)cm->slot_bytes / 1073741824.0, cudaGetErrorString(e)));
        }
        if (!lru_init(&cm->rl, nr, cm->n_keys)) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
    } else {
        cm->ram_resident = 0;
    }
    cm->chunk = FMC_CHUNK_MAX > K ? FMC_CHUNK_MAX : K;
    if (cm->chunk > nv) cm->chunk = (int32_t)nv;
    TRYC(cudaHostAlloc((void **)&cm->stage, (size_t)cm->chunk * cm->slot_bytes, cudaHostAllocDefault));
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
    cm->fds = (int *)malloc(sizeof(int) * (size_t)m->n_layers);
    if (!cm->eptr || !cm->used || !cm->fds) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
    for (int32_t il = 0; il < m->n_layers; il++) cm->fds[il] = -1;
    for (int32_t il = 0; il < m->n_layers; il++) {
        if (!m->files[il].path) continue;
        cm->fds[il] = open(m->files[il].path, O_RDONLY | O_CLOEXEC);
        if (cm->fds[il] < 0)
            TRY(fm_errf(err, errlen, FM_ERR_IO, "%s: cannot open (%s)", m->files[il].path, strerror(errno)));
    }
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
    cm->io_threads = p->io_threads > 0 ? p->io_threads : (K > 8 ? K : 8);
    cm->pool = rpool_new(cm->io_threads, cm->chunk, cm->xs, (const char *const *)m->paths);
    if (!cm->pool) TRY(fm_errf(err, errlen, FM_ERR_OOM, "cannot start %d read threads", cm->io_threads));
    if (cm->resident) {
        TRY(preload(cm, 1, 0, err, errlen));
        const uint8_t **tab = (const uint8_t **)calloc((size_t)cm->n_keys, sizeof(void *));
        if (!tab) TRY(fm_errf(err, errlen, FM_ERR_OOM, "out of memory"));
        for (int64_t k = 0; k < cm->n_keys; k++)
            tab[k] = cm->vl.of[k] >= 0 ? cm->vram + (uint64_t)cm->vl.of[k] * cm->slot_bytes : NULL;
        cudaError_t e = cudaMalloc((void **)&cm->d_table, (size_t)cm->n_keys * sizeof(void *));
        if (e == cudaSuccess)
            e = cudaMemcpy((void *)cm->d_table, tab, (size_t)cm->n_keys * sizeof(void *), cudaMemcpyHostToDevice);
        free(tab);
        TRYC(e);
    } else if (cm->has_ram && cm->ram_resident) {
        TRY(preload(cm, 0, 1, err, errlen));
    }
    return FM_OK;
#undef TRY
#undef TRYC
}

void fmc_moe_close(fmc_model *cm) {
    fmc_split_stop(cm);
    rpool_free(cm->pool);
    cm->pool = NULL;
    if (cm->vram) cudaFree(cm->vram);
    if (cm->d_table) cudaFree((void *)cm->d_table);
    if (cm->d_ptrs) cudaFree((void *)cm->d_ptrs);
    if (cm->h_ptrs) cudaFreeHost((void *)cm->h_ptrs);
    if (cm->h_topi) cudaFreeHost(cm->h_topi);
    if (cm->h_mwork) cudaFreeHost(cm->h_mwork);
    if (cm->d_mwork) cudaFree(cm->d_mwork);
    free(cm->mcnt);
    if (cm->stage) cudaFreeHost(cm->stage);
    for (int32_t i = 0; i < cm->n_rchunks; i++)
        if (cm->rchunks[i]) cudaFreeHost(cm->rchunks[i]);
    free(cm->rchunks);
    lru_free(&cm->vl);
    lru_free(&cm->rl);
    free(cm->eptr);
    free(cm->used);
    if (cm->fds) {
        for (int32_t i = 0; i < cm->m->n_layers; i++)
            if (cm->fds[i] >= 0) close(cm->fds[i]);
        free(cm->fds);
    }
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

/* queue the read of layer il's expert e from storage (task nt of the read pool): into a pinned
 * host-cache slot when there is a host tier (the block stays cached), else into staging slot nt;
 * the worker then copies it to the VRAM slot ddst */
static fm_status queue_read(fmc_model *cm, int32_t il, int64_t e, uint8_t *ddst, int64_t ep, int *nt, char *err,
                            size_t errlen) {
    const fm_model *m = cm->m;
    const uint64_t bb = m->layers[il].block_bytes;
    rtask *t = &cm->pool->tasks[*nt];
    if (cm->has_ram) {
        const int64_t rs = lru_take(&cm->rl, (int64_t)il * m->n_experts + e, ep);
        if (rs < 0) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no free pinned expert slot");
        t->dst = fmc_rslot_ptr(cm, rs);
    } else {
        t->dst = cm->stage + (uint64_t)*nt * cm->slot_bytes;
    }
    t->fd = cm->fds[il];
    t->off = m->files[il].data_offset + (uint64_t)e * bb;
    t->len = bb;
    t->ddst = ddst;
    t->il = il;
    t->e = (int32_t)e;
    (*nt)++;
    return FM_OK;
}

/* run the nt queued reads of layer il; on failure the slots assigned to them hold garbage and are
 * forgotten */
static fm_status run_reads(fmc_ctx *x, int32_t il, int nt, char *err, size_t errlen) {
    fmc_model *cm = x->cm;
    const double tr = fm_now_ms();
    const fm_status rst = rpool_run(cm->pool, nt, err, errlen);
    x->s->st.ms_io_wait += fm_now_ms() - tr;
    if (rst != FM_OK) {
        for (int i = 0; i < nt; i++) {
            const int64_t key = (int64_t)il * x->m->n_experts + cm->pool->tasks[i].e;
            if (cm->vl.of[key] >= 0) { cm->vl.key[cm->vl.of[key]] = -1; cm->vl.of[key] = -1; }
            if (cm->has_ram && cm->rl.of[key] >= 0) { cm->rl.key[cm->rl.of[key]] = -1; cm->rl.of[key] = -1; }
        }
    }
    return rst;
}

/* a layer's tier counts: vh VRAM hits, rh pinned-cache hits (copied or computed on the host),
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

/* the copies / reads of a decode layer's misses that the GPU takes (moe_decode_cached) */
typedef struct {
    int64_t rh, sr;
    int nstore;
    PairSet ss; /* the misses read from storage */
} dec_miss;

static fm_status dec_issue_misses(fmc_ctx *x, int32_t il, const int32_t *list, const int32_t *pair_of, int64_t nu,
                                  int64_t ep, dec_miss *dm, char *err, size_t errlen) {
    fm_model *m = x->m;
    fmc_model *cm = x->cm;
    const cl_layer *L = &cm->L[il];
    const int64_t E = m->n_experts;
    const uint64_t bb = m->layers[il].block_bytes;
    int nt = 0, ng = 0;
    CK(cudaEventRecord(cm->ev_t0, cm->xs));
    for (int64_t i = 0; i < nu; i++) {
        const int64_t e = list[i], key = (int64_t)il * E + e;
        if (cm->eptr[e]) continue; /* a hit, or the host's */
        const int64_t vs = lru_take(&cm->vl, key, ep);
        if (vs < 0) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no free VRAM expert slot");
        uint8_t *dst = cm->vram + (uint64_t)vs * cm->slot_bytes;
        cm->eptr[e] = dst;
        const int64_t rs0 = cm->has_ram ? cm->rl.of[key] : -1;
        if (rs0 >= 0) { /* pinned host cache -> VRAM, then its compute behind its own event */
            lru_touch(&cm->rl, rs0, ep);
            CK(cudaMemcpyAsync(dst, fmc_rslot_ptr(cm, rs0), bb, cudaMemcpyHostToDevice, cm->xs));
            CK(cudaEventRecord(cm->ev_grp[ng], cm->xs));
            CK(cudaStreamWaitEvent(cm->cs, cm->ev_grp[ng], 0));
            ng++;
            PairSet one;
            one.p[0] = dst;
            one.pair[0] = pair_of[i];
            CKS(fmc_launch_dec(x, L, &one, 1, err, errlen));
            dm->rh++;
            continue;
        }
        CKS(queue_read(cm, il, e, dst, ep, &nt, err, errlen));
        dm->ss.p[dm->nstore] = dst;
        dm->ss.pair[dm->nstore++] = pair_of[i];
        dm->sr++;
    }
    CKS(run_reads(x, il, nt, err, errlen));
    CK(cudaEventRecord(cm->ev_copy, cm->xs));
    CK(cudaEventRecord(cm->ev_t1, cm->xs));
    if (dm->nstore) {
        CK(cudaStreamWaitEvent(cm->cs, cm->ev_copy, 0));
        CKS(fmc_launch_dec(x, L, &dm->ss, dm->nstore, err, errlen));
    }
    return FM_OK;
}

/* One decode layer's routed experts with a VRAM cache (not resident), the nu distinct experts in
 * list (nu <= K <= FMC_PSET, one token):
 *   hits: computed at once (they overlap the copies);
 *   the CPU share (try_split) of the misses in the pinned host cache: started first, on the split
 *   worker thread, so the host computes while the main thread queues the GPU's part;
 *   other misses in the pinned host cache: each copied on the copy stream, its compute queued behind
 *   an event on its own copy, so the GPU works through the misses as they land and only the last
 *   one's compute trails the copies;
 *   misses from storage: pread by the pool (each worker queues its copy), computed after the last.
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
    static const uint8_t host_mark = 0;
    int32_t pair_of[FMC_PSET];
    for (int64_t i = 0; i < nu; i++) {
        pair_of[i] = 0;
        for (int32_t p = 0; p < K; p++)
            if (cm->h_topi[p] == list[i]) pair_of[i] = p;
    }
    /* hits first (touched now, so no slot in use is evicted below) */
    PairSet hs;
    int nh = 0;
    int64_t m_ram = 0, m_other = 0;
    for (int64_t i = 0; i < nu; i++) {
        const int64_t key = (int64_t)il * E + list[i];
        const int64_t vs = cm->vl.of[key];
        if (vs >= 0) {
            lru_touch(&cm->vl, vs, ep);
            cm->eptr[list[i]] = cm->vram + (uint64_t)vs * cm->slot_bytes;
            hs.p[nh] = cm->eptr[list[i]];
            hs.pair[nh++] = pair_of[i];
        } else if (cm->has_ram && cm->rl.of[key] >= 0) {
            m_ram++;
        } else {
            m_other++;
        }
    }
    /* the host's share: chosen, then started before anything else is queued */
    const int64_t ncpu_want =
        try_split ? fmc_split_count(cm->split, cm->rate_h2d, cm->rate_cpu, m_ram, m_other, (++cm->split_calls & 63) == 0)
                  : 0;
    int64_t ncpu = 0;
    for (int64_t i = 0; i < nu && ncpu < ncpu_want; i++) {
        const int64_t e = list[i], key = (int64_t)il * E + e;
        if (cm->eptr[e] || cm->rl.of[key] < 0) continue;
        lru_touch(&cm->rl, cm->rl.of[key], ep);
        cm->cblk[ncpu] = fmc_rslot_ptr(cm, cm->rl.of[key]);
        cm->cpair[ncpu++] = pair_of[i];
        cm->eptr[e] = &host_mark;
    }
    /* FM_CUDA_SPLIT_THREAD=1: the host share starts on the split worker before the GPU's part is
     * queued; default (0): on this thread after it (measured faster on the H100 machine: with the
     * worker, the compute pool's 16 threads plus this one oversubscribe the 16 cores and a
     * descheduled pool thread stalls the share; bench/RESULTS.md) */
    const int async = cm->split_async;
    if (ncpu > 0 && async) fmc_host_share_start(cm, FL, ncpu);
    dec_miss dm;
    memset(&dm, 0, sizeof dm);
    fm_status st = fmc_launch_dec(x, L, &hs, nh, err, errlen);
    if (st == FM_OK) st = dec_issue_misses(x, il, list, pair_of, nu, ep, &dm, err, errlen);
    for (int64_t i = 0; i < nu; i++) cm->eptr[list[i]] = NULL;
    if (ncpu > 0 && !async) {
        if (st != FM_OK) return st;
        fmc_host_share_inline(cm, FL, ncpu);
    }
    /* the worker must be done with this layer's buffers before anything returns */
    if (ncpu > 0) {
        char e2[256];
        fm_status s2 = fmc_host_share_finish(x, FL, ncpu, hostmask, ycpu, e2, sizeof e2);
        if (st == FM_OK && s2 != FM_OK) return fm_errf(err, errlen, s2, "%s", e2);
    }
    if (st != FM_OK) return st;
    const int64_t rh = dm.rh + ncpu, sr = dm.sr;
    cm->t_bytes = (uint64_t)(dm.rh + sr) * bb;
    cm->t_pending = cm->t_bytes > 0;
    count_tiers(x, nh, rh, sr, dm.rh + sr, bb);
    return FM_OK;
}

fm_status fmc_op_moe(void *vx, int32_t il, char *err, size_t errlen) {
    fmc_ctx *x = (fmc_ctx *)vx;
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
    CKS(fmc_launch_mm(st, sms, L->router, c->xn, H, n, c->lr, E, 0, err, errlen));
    k_route<<<(unsigned)n, 32, sizeof(float) * (size_t)E, st>>>(c->lr, (int)E, K, m->norm_topk, c->topi, c->topw);
    CKL();
    /* CPU split possible: decode, pinned host tier; the layer's normalized input and routing weights
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
        CKS(fmc_launch_swiglu(st, sms, L->sh_gate, L->sh_up, c->xn, H, n, c->shg, err, errlen));
        CKS(fmc_launch_mm(st, sms, L->sh_down, c->shg, m->sh_I, n, c->sho, H, 0, err, errlen));
        CKS(fmc_launch_mm(st, sms, L->sh_router, c->xn, H, n, c->shs, 1, 0, err, errlen));
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
        /* decode: the pipelined path (hits at once, each copied miss as soon as it lands); the chunk
         * loop below serves prefill (and FM_CUDA_PIPE=0, for comparison) */
        const char *pv = getenv("FM_CUDA_PIPE");
        const int pipe = n == 1 && npairs <= FMC_PSET && nu <= cm->chunk && !(pv && pv[0] == '0');
        if (pipe) CKS(moe_decode_cached(x, il, list, nu, try_split, &hostmask, &ycpu, err, errlen));
        int64_t ci = 0;
        for (int64_t c0 = 0; !pipe && c0 < nu; c0 += cm->chunk, ci++) {
            const int64_t nc = nu - c0 < cm->chunk ? nu - c0 : cm->chunk;
            const int64_t ep = ++cm->epoch;
            if (c0 > 0) { /* staging / pinned slots of the previous chunk may still be in flight */
                double t0 = fm_now_ms();
                CK(cudaEventSynchronize(cm->ev_copy));
                c->cnt.syncs++;
                x->s->st.ms_io_wait += fm_now_ms() - t0;
                /* the previous chunk's experts may still read the slots this chunk overwrites */
                CK(cudaEventRecord(cm->ev_comp, st));
                CK(cudaStreamWaitEvent(cm->xs, cm->ev_comp, 0));
            }
            /* first chunk: every kernel that reads expert slots was queued before ev_topi, which has
             * completed; the copies need not wait for the shared expert */
            CK(cudaEventRecord(cm->ev_t0, cm->xs));
            /* pass 1: hits (touch first so that no slot in use is evicted) */
            for (int64_t i = 0; i < nc; i++) {
                const int64_t e = list[c0 + i], key = (int64_t)il * E + e;
                const int64_t vs = cm->vl.of[key];
                if (vs >= 0) {
                    lru_touch(&cm->vl, vs, ep);
                    cm->eptr[e] = cm->vram + (uint64_t)vs * cm->slot_bytes;
                }
            }
            int nt = 0;
            int64_t vh = 0, rh = 0, sr = 0;
            /* CPU share: decode, one chunk; taken from the misses found in the pinned host cache */
            int64_t ncpu = 0, ncpu_want = 0;
            if (try_split && c0 == 0 && nc == nu) {
                int64_t m_ram = 0, m_other = 0;
                for (int64_t i = 0; i < nc; i++) {
                    const int64_t e = list[i], key = (int64_t)il * E + e;
                    if (cm->eptr[e]) continue;
                    if (cm->rl.of[key] >= 0) m_ram++;
                    else m_other++;
                }
                ncpu_want = fmc_split_count(cm->split, cm->rate_h2d, cm->rate_cpu, m_ram, m_other,
                                        (++cm->split_calls & 63) == 0);
            }
            for (int64_t i = 0; i < nc; i++) {
                const int64_t e = list[c0 + i], key = (int64_t)il * E + e;
                if (cm->eptr[e]) {
                    vh++;
                    continue;
                }
                if (ncpu < ncpu_want && cm->rl.of[key] >= 0) { /* computed on the host, not copied */
                    const int64_t rs = cm->rl.of[key];
                    lru_touch(&cm->rl, rs, ep);
                    cm->cblk[ncpu] = fmc_rslot_ptr(cm, rs);
                    cm->cpair[ncpu] = -1;
                    for (int64_t p = 0; p < npairs; p++)
                        if (cm->h_topi[p] == e) cm->cpair[ncpu] = (int32_t)p;
                    ncpu++;
                    rh++;
                    continue;
                }
                const int64_t vs = lru_take(&cm->vl, key, ep);
                if (vs < 0) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: no free VRAM expert slot");
                uint8_t *dst = cm->vram + (uint64_t)vs * cm->slot_bytes;
                cm->eptr[e] = dst;
                const int64_t rs = cm->has_ram ? cm->rl.of[key] : -1;
                if (rs >= 0) {
                    lru_touch(&cm->rl, rs, ep);
                    CK(cudaMemcpyAsync(dst, fmc_rslot_ptr(cm, rs), bb, cudaMemcpyHostToDevice, cm->xs));
                    rh++;
                    continue;
                }
                CKS(queue_read(cm, il, e, dst, ep, &nt, err, errlen));
                sr++;
            }
            CKS(run_reads(x, il, nt, err, errlen));
            CK(cudaEventRecord(cm->ev_copy, cm->xs));
            CK(cudaEventRecord(cm->ev_t1, cm->xs));
            cm->t_bytes = (uint64_t)(rh - ncpu + sr) * bb;
            cm->t_pending = cm->t_bytes > 0;
            CK(cudaStreamWaitEvent(st, cm->ev_copy, 0));
            count_tiers(x, vh, rh, sr, rh - ncpu + sr, bb);
            const uint8_t **hp = cm->h_ptrs + ci * (int64_t)FMC_UBATCH * K;
            const uint8_t **dp = cm->d_ptrs + ci * (int64_t)FMC_UBATCH * K;
            for (int64_t p = 0; p < npairs; p++) hp[p] = cm->eptr[cm->h_topi[p]];
            CK(cudaMemcpyAsync((void *)dp, (const void *)hp, sizeof(void *) * (size_t)npairs, cudaMemcpyHostToDevice, st));
            CKS(fmc_launch_experts(x, L, dp, hp, ci, npairs, err, errlen));
            for (int64_t i = 0; i < nc; i++) cm->eptr[list[c0 + i]] = NULL;
            if (ncpu > 0) CKS(fmc_host_share(x, FL, ncpu, &hostmask, &ycpu, err, errlen));
        }
    }
    k_moe_combine<<<dim3((unsigned)((H + 255) / 256), (unsigned)n), 256, 0, st>>>(
        c->x, c->ye, c->topw, K, c->sho, c->shs, FL->has_shexp, n, H, hostmask, ycpu, fmc_guard_code(x, il), c->d_bad);
    CKL();
    return FM_OK;
}

