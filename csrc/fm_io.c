/* fm_io.c: the expert reader (SSD -> host RAM tier).
 *
 * Owns: the expert files (one buffered fd each, plus an O_DIRECT fd when asked), a persistent pool
 * of I/O threads serving whole-block preads, the slot buffers reads land in, and the optional RAM
 * cache (an LFU of whole blocks keyed by (layer, expert), see "RAM cache policy"). Also the engine's
 * disk probe. Does not
 * own: what a block contains (fm_model.c parses parts), compute, or the OS page cache.
 *
 * One request at a time: fm_io_submit queues every missing block of the request at once (so all
 * reads are in flight across the threads), fm_io_wait blocks until they are done. A block read
 * into a slot joins the cache by swapping buffers with the evicted entry (no copy); entries handed
 * out by the current request are pinned so an insertion never frees memory the caller still
 * holds. Slots: 2*max_batch buffers, allocated on first use; consecutive requests alternate
 * between the two halves, so memory grows only to twice the largest request's misses (prefill
 * batches can be large). A failed read leaves the reader usable: the next submit starts afresh.
 *
 * Speculative prefetch (fm_io_prefetch, buffered reads only): blocks the caller expects to need
 * soon are handed to one prefetch thread that asks the kernel to read them into the page cache
 * (posix_fadvise WILLNEED; the call can block while the device queue is full, hence the thread).
 * It touches only the page cache, never the slots or the RAM cache, so results cannot change; a
 * later fm_io_submit of such a block finds it in (or on its way into) the page cache.
 *
 * RAM cache policy: LFU with aging, a recency tie-break and frequency admission (docs/ROUTING.md).
 * Decode visits the layers in a fixed cycle, so one LRU over all layers hits nothing until it holds
 * a whole token's working set (n_layers x K blocks); counting uses fixes that. Every distinct block
 * of a request counts one use in a saturating per-(layer, expert) counter kept for all blocks,
 * cached or not (1 byte each). When a counter would pass FM_IO_FREQ_MAX every counter is halved
 * (aging: old popularity fades, amortized O(1) per use). Cached entries sit in one list per count
 * (head = most recent), so a use is O(1) and the victim is the least recent unpinned entry of the
 * lowest non-empty count (at most FM_IO_FREQ_MAX + 1 list heads plus the pinned entries skipped).
 * A block just read is admitted only if its count is at least the victim's; otherwise it stays in
 * its slot (valid until the next submit, as every block) and the cache is unchanged.
 *
 * Hooks (fm_io_open_ex, for a backend that copies blocks on to a device): every block buffer (slots
 * and cache entries alike: they swap, so one allocator serves both) comes from hooks.alloc and goes
 * back through hooks.free at close, e.g. page-locked memory a GPU can copy from asynchronously; and
 * hooks.on_block sees each block of a request the moment it is available (hits inside
 * fm_io_submit, reads on the I/O thread right after the read landed), so the backend can start its
 * own copy without waiting for the caller's thread to wake up. Buffer reuse, which a caller that
 * reads blocks asynchronously must respect: a block handed out by request r is never written by
 * fm_io before request r + 1 has been submitted (a read slot is rewritten at request r + 2 at the
 * earliest, a cache entry only after it was evicted by a later fm_io_wait); so a caller that
 * finishes every asynchronous use of request r's blocks before its next fm_io_submit is safe.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fm_internal.h"

#define FM_IO_ALIGN 4096
#define FM_IO_MAX_THREADS 256
#define FM_IO_FREQ_MAX 255  /* use counters saturate here; reaching it halves all of them */

typedef struct {
    char *path;             /* NULL: layer has no experts */
    int fd, dfd;            /* buffered fd; O_DIRECT fd or -1 */
    atomic_int direct;      /* reads go through dfd (cleared if the filesystem refuses O_DIRECT) */
    uint64_t data_offset, block_bytes;
    int32_t n_experts;
    int32_t *cache_slot;    /* [n_experts]: cache entry index or -1 (only with a cache) */
    uint8_t *freq;          /* [n_experts]: use counts (aged), cached or not (only with a cache) */
} io_layer;

typedef struct {
    int32_t il, ie;
    uint8_t *buf;           /* max_block bytes, aligned */
    int32_t prev, next;     /* list of entries with count f: head = most recent */
    int32_t f;              /* count the entry is listed under (= its layer's freq[ie]) */
    int pinned;             /* handed out by the current request */
} io_entry;

typedef struct {
    int32_t il, ie;
    int32_t index;          /* first request index of this block (for hooks.on_block) */
    int32_t slot;           /* index into slot_buf */
    uint8_t *dst;
    uint64_t offset, len;
    /* result */
    uint64_t got;
    int err_no;             /* 0 and got < len: short read */
    int done_ok;
    int done;               /* finished (ok or not); set under fm_io.mu */
} io_task;

struct fm_io {
    int32_t n_layers, max_batch, n_threads;
    fm_io_hooks hooks;      /* alloc/free NULL: posix_memalign/free; on_block NULL: none */
    io_layer *layers;
    uint64_t max_block;
    int32_t direct_requested;
    /* slots */
    int32_t n_slots, slot_half;
    uint8_t **slot_buf;     /* [n_slots]: NULL until first used */
    /* RAM cache (LFU, see the policy note at the top) */
    int32_t cache_cap, cache_n;
    io_entry *entries;      /* [cache_cap] */
    int32_t fb_head[FM_IO_FREQ_MAX + 1], fb_tail[FM_IO_FREQ_MAX + 1]; /* per-count lists or -1 */
    /* current request */
    int32_t req_il, req_n, req_active;
    int32_t *req_map;       /* [max_batch]: request index -> distinct index */
    int32_t n_distinct;
    int32_t *dist_ie;       /* [max_batch] */
    uint8_t **dist_ptr;     /* [max_batch]: block memory (hit: cache; miss: slot) */
    int32_t *dist_task;     /* [max_batch]: task index or -1 (hit) */
    uint8_t *dist_taken;    /* [max_batch]: already handed out by fm_io_next */
    int32_t *pinned;        /* [max_batch]: entries pinned by this request */
    int32_t n_pinned;
    int64_t req_hits;
    /* I/O threads */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    int stop;
    io_task *tasks;         /* [max_batch] */
    int32_t n_tasks, next_task, pending;
    /* prefetch thread: a queue of (layer, expert) replaced by each fm_io_prefetch call */
    int32_t pf_on, pf_started, pf_stop, pf_cap, pf_n, pf_next;
    int32_t *pf_il, *pf_ie;  /* [pf_cap] */
    pthread_t pf_thread;
    pthread_mutex_t pf_mu;
    pthread_cond_t pf_cv;
};

/* ---- helpers ---- */
static const char *errno_text(int e, char *buf, size_t n) {
#if defined(__GLIBC__) && defined(_GNU_SOURCE)
    return strerror_r(e, buf, n);
#else
    if (strerror_r(e, buf, n) != 0) snprintf(buf, n, "errno %d", e);
    return buf;
#endif
}

static uint8_t *aligned_block(uint64_t n) {
    void *p = NULL;
    if (n == 0) n = FM_IO_ALIGN;
    if (posix_memalign(&p, FM_IO_ALIGN, (size_t)n) != 0) return NULL;
    return p;
}

/* a block buffer of max_block bytes: through hooks.alloc when set */
static uint8_t *block_alloc(fm_io *io) {
    if (io->hooks.alloc) return io->hooks.alloc(io->hooks.user, (size_t)io->max_block);
    return aligned_block(io->max_block);
}

static void block_free(fm_io *io, uint8_t *p) {
    if (!p) return;
    if (io->hooks.free) io->hooks.free(io->hooks.user, p, (size_t)io->max_block);
    else if (!io->hooks.alloc) free(p);
}

/* Read len bytes at off into dst: loops over partial reads and EINTR; an O_DIRECT fd that refuses
 * the read (EINVAL) falls back to the buffered fd. Returns bytes read; *err_no set on failure. */
static uint64_t read_full(io_layer *L, uint8_t *dst, uint64_t off, uint64_t len, int *err_no) {
    uint64_t got = 0;
    *err_no = 0;
    int use_direct = L->dfd >= 0 && atomic_load(&L->direct);
    while (got < len) {
        ssize_t r = pread(use_direct ? L->dfd : L->fd, dst + got, (size_t)(len - got), (off_t)(off + got));
        if (r < 0) {
            if (errno == EINTR) continue;
            if (use_direct && errno == EINVAL) {
                if (got == 0) atomic_store(&L->direct, 0); /* filesystem refuses O_DIRECT reads */
                use_direct = 0;
                continue;
            }
            *err_no = errno;
            return got;
        }
        if (r == 0) return got; /* EOF: short read */
        got += (uint64_t)r;
    }
    return got;
}

/* ---- I/O threads ---- */
static void *io_main(void *arg) {
    fm_io *io = arg;
    pthread_mutex_lock(&io->mu);
    for (;;) {
        while (!io->stop && io->next_task >= io->n_tasks) pthread_cond_wait(&io->cv_work, &io->mu);
        if (io->stop) break;
        io_task *t = &io->tasks[io->next_task++];
        pthread_mutex_unlock(&io->mu);
        int e;
        t->got = read_full(&io->layers[t->il], t->dst, t->offset, t->len, &e);
        t->err_no = e;
        t->done_ok = t->got == t->len;
        /* before the block is marked done: fm_io_next hands it out only after the hook returned */
        if (t->done_ok && io->hooks.on_block) io->hooks.on_block(io->hooks.user, t->index, t->dst);
        pthread_mutex_lock(&io->mu);
        t->done = 1;
        io->pending--;
        pthread_cond_broadcast(&io->cv_done); /* fm_io_next waits for any one block */
    }
    pthread_mutex_unlock(&io->mu);
    return NULL;
}

static void *pf_main(void *arg) {
    fm_io *io = arg;
    pthread_mutex_lock(&io->pf_mu);
    for (;;) {
        while (!io->pf_stop && io->pf_next >= io->pf_n) pthread_cond_wait(&io->pf_cv, &io->pf_mu);
        if (io->pf_stop) break;
        int32_t il = io->pf_il[io->pf_next], ie = io->pf_ie[io->pf_next];
        io->pf_next++;
        pthread_mutex_unlock(&io->pf_mu);
        io_layer *L = &io->layers[il];
#ifdef POSIX_FADV_WILLNEED
        posix_fadvise(L->fd, (off_t)(L->data_offset + (uint64_t)ie * L->block_bytes), (off_t)L->block_bytes,
                      POSIX_FADV_WILLNEED);
#else
        (void)L;
#endif
        pthread_mutex_lock(&io->pf_mu);
    }
    pthread_mutex_unlock(&io->pf_mu);
    return NULL;
}

static void io_drain(fm_io *io) {
    pthread_mutex_lock(&io->mu);
    while (io->pending > 0) pthread_cond_wait(&io->cv_done, &io->mu);
    io->n_tasks = io->next_task = 0;
    pthread_mutex_unlock(&io->mu);
}

/* ---- RAM cache: LFU with aging ---- */
static void fb_unlink(fm_io *io, int32_t k) {
    io_entry *E = &io->entries[k];
    if (E->prev >= 0) io->entries[E->prev].next = E->next;
    else io->fb_head[E->f] = E->next;
    if (E->next >= 0) io->entries[E->next].prev = E->prev;
    else io->fb_tail[E->f] = E->prev;
    E->prev = E->next = -1;
}

static void fb_push_front(fm_io *io, int32_t k, int32_t f) {
    io_entry *E = &io->entries[k];
    E->f = f;
    E->prev = -1;
    E->next = io->fb_head[f];
    if (io->fb_head[f] >= 0) io->entries[io->fb_head[f]].prev = k;
    io->fb_head[f] = k;
    if (io->fb_tail[f] < 0) io->fb_tail[f] = k;
}

/* Halve every use count and move the cached entries to their new lists. Old lists are walked from
 * the lowest count up, each from its least recent entry, pushing to the front: within a new list the
 * relative recency of each old list is kept (entries from count 2f+1 land before those from 2f). */
static void cache_age(fm_io *io) {
    for (int32_t il = 0; il < io->n_layers; il++) {
        io_layer *L = &io->layers[il];
        if (!L->freq) continue;
        for (int32_t e = 0; e < L->n_experts; e++) L->freq[e] >>= 1;
    }
    int32_t tail[FM_IO_FREQ_MAX + 1];
    for (int32_t f = 0; f <= FM_IO_FREQ_MAX; f++) {
        tail[f] = io->fb_tail[f];
        io->fb_head[f] = io->fb_tail[f] = -1;
    }
    for (int32_t f = 0; f <= FM_IO_FREQ_MAX; f++)
        for (int32_t k = tail[f]; k >= 0;) {
            int32_t p = io->entries[k].prev; /* saved: pushing rewrites it */
            fb_push_front(io, k, f >> 1);
            k = p;
        }
}

/* One use of block (il, ie) by a request (hit or miss): count it; a cached entry moves up a list. */
static void cache_count(fm_io *io, int32_t il, int32_t ie) {
    io_layer *L = &io->layers[il];
    if (L->freq[ie] >= FM_IO_FREQ_MAX) cache_age(io);
    L->freq[ie]++;
    int32_t k = L->cache_slot[ie];
    if (k >= 0) {
        fb_unlink(io, k);
        fb_push_front(io, k, L->freq[ie]);
    }
}

static void pin(fm_io *io, int32_t k) {
    if (!io->entries[k].pinned) {
        io->entries[k].pinned = 1;
        io->pinned[io->n_pinned++] = k;
    }
}

/* Put the block just read into slot s into the cache by swapping buffers; returns the entry or -1
 * (not admitted: the victim, the least recent unpinned entry of the lowest count, is used more than
 * the block; or no room: every entry is pinned by this request). */
static int32_t cache_insert(fm_io *io, int32_t il, int32_t ie, int32_t s) {
    int32_t k = -1, f_new = io->layers[il].freq[ie];
    if (io->cache_n < io->cache_cap) {
        k = io->cache_n++;
        io->entries[k].buf = io->slot_buf[s];
        io->slot_buf[s] = NULL; /* allocated again when next used */
    } else {
        for (int32_t f = 0; f <= FM_IO_FREQ_MAX && k < 0; f++)
            for (k = io->fb_tail[f]; k >= 0 && io->entries[k].pinned; k = io->entries[k].prev) {}
        if (k < 0 || io->entries[k].f > f_new) return -1;
        io_entry *E = &io->entries[k];
        io->layers[E->il].cache_slot[E->ie] = -1;
        fb_unlink(io, k);
        uint8_t *old = E->buf;
        E->buf = io->slot_buf[s];
        io->slot_buf[s] = old;
    }
    io_entry *E = &io->entries[k];
    E->il = il;
    E->ie = ie;
    io->layers[il].cache_slot[ie] = k;
    fb_push_front(io, k, f_new);
    pin(io, k);
    return k;
}

/* ---- open / close ---- */
void fm_io_close(fm_io *io) {
    if (!io) return;
    if (io->pf_started) {
        pthread_mutex_lock(&io->pf_mu);
        io->pf_stop = 1;
        pthread_cond_broadcast(&io->pf_cv);
        pthread_mutex_unlock(&io->pf_mu);
        pthread_join(io->pf_thread, NULL);
    }
    pthread_mutex_destroy(&io->pf_mu);
    pthread_cond_destroy(&io->pf_cv);
    free(io->pf_il);
    free(io->pf_ie);
    if (io->threads) {
        io_drain(io);
        pthread_mutex_lock(&io->mu);
        io->stop = 1;
        pthread_cond_broadcast(&io->cv_work);
        pthread_mutex_unlock(&io->mu);
        for (int32_t i = 0; i < io->n_threads; i++) pthread_join(io->threads[i], NULL);
        free(io->threads);
    }
    pthread_mutex_destroy(&io->mu);
    pthread_cond_destroy(&io->cv_work);
    pthread_cond_destroy(&io->cv_done);
    if (io->layers) {
        for (int32_t il = 0; il < io->n_layers; il++) {
            io_layer *L = &io->layers[il];
            if (L->fd >= 0) close(L->fd);
            if (L->dfd >= 0) close(L->dfd);
            free(L->path);
            free(L->cache_slot);
            free(L->freq);
        }
        free(io->layers);
    }
    if (io->slot_buf)
        for (int32_t s = 0; s < io->n_slots; s++) block_free(io, io->slot_buf[s]);
    free(io->slot_buf);
    if (io->entries)
        for (int32_t k = 0; k < io->cache_n; k++) block_free(io, io->entries[k].buf);
    free(io->entries);
    free(io->req_map);
    free(io->dist_ie);
    free(io->dist_ptr);
    free(io->dist_task);
    free(io->dist_taken);
    free(io->pinned);
    free(io->tasks);
    free(io);
}

fm_status fm_io_open(fm_io **out, const fm_expert_file *files, int32_t n_layers, int32_t io_threads,
                     int32_t direct_io, uint64_t ram_budget, int32_t max_batch, char *err, size_t errlen) {
    return fm_io_open_ex(out, files, n_layers, io_threads, direct_io, ram_budget, max_batch, NULL, err, errlen);
}

fm_status fm_io_open_ex(fm_io **out, const fm_expert_file *files, int32_t n_layers, int32_t io_threads,
                        int32_t direct_io, uint64_t ram_budget, int32_t max_batch, const fm_io_hooks *hooks,
                        char *err, size_t errlen) {
    if (!out) return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_open: out is NULL");
    *out = NULL;
    if (hooks && (!hooks->alloc) != (!hooks->free))
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_open: hooks.alloc and hooks.free must both be set or both NULL");
    if (n_layers <= 0 || !files)
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_open: n_layers = %d (need >= 1 and files != NULL)", n_layers);
    if (max_batch <= 0 || max_batch > 65536)
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_open: max_batch = %d (need 1..65536)", max_batch);
    if (io_threads <= 0) io_threads = max_batch > 4 ? max_batch : 4;
    if (io_threads > FM_IO_MAX_THREADS) io_threads = FM_IO_MAX_THREADS;

    fm_io *io = calloc(1, sizeof *io);
    if (!io) return fm_errf(err, errlen, FM_ERR_OOM, "fm_io_open: out of memory");
    pthread_mutex_init(&io->mu, NULL);
    pthread_cond_init(&io->cv_work, NULL);
    pthread_cond_init(&io->cv_done, NULL);
    pthread_mutex_init(&io->pf_mu, NULL);
    pthread_cond_init(&io->pf_cv, NULL);
    io->n_layers = n_layers;
    io->max_batch = max_batch;
    if (hooks) io->hooks = *hooks;
    io->direct_requested = direct_io != 0;
    for (int32_t f = 0; f <= FM_IO_FREQ_MAX; f++) io->fb_head[f] = io->fb_tail[f] = -1;
    fm_status st = FM_OK;
    char eb[128];

    io->layers = calloc((size_t)n_layers, sizeof *io->layers);
    if (!io->layers) { st = fm_errf(err, errlen, FM_ERR_OOM, "fm_io_open: out of memory"); goto fail; }
    for (int32_t il = 0; il < n_layers; il++) io->layers[il].fd = io->layers[il].dfd = -1;

    for (int32_t il = 0; il < n_layers; il++) {
        const fm_expert_file *f = &files[il];
        io_layer *L = &io->layers[il];
        if (!f->path) continue;
        if (f->n_experts <= 0 || f->block_bytes == 0 || f->block_bytes % FM_IO_ALIGN || f->data_offset % FM_IO_ALIGN) {
            st = fm_errf(err, errlen, FM_ERR_FORMAT,
                         "%s (layer %d): n_experts = %d, block_bytes = %llu, data_offset = %llu "
                         "(need n_experts >= 1 and block_bytes > 0, block_bytes and data_offset multiples of 4096)",
                         f->path, il, f->n_experts, (unsigned long long)f->block_bytes,
                         (unsigned long long)f->data_offset);
            goto fail;
        }
        L->path = strdup(f->path);
        L->cache_slot = malloc((size_t)f->n_experts * sizeof(int32_t));
        L->freq = calloc((size_t)f->n_experts, 1);
        if (!L->path || !L->cache_slot || !L->freq) { st = fm_errf(err, errlen, FM_ERR_OOM, "fm_io_open: out of memory"); goto fail; }
        for (int32_t e = 0; e < f->n_experts; e++) L->cache_slot[e] = -1;
        L->data_offset = f->data_offset;
        L->block_bytes = f->block_bytes;
        L->n_experts = f->n_experts;
        do L->fd = open(f->path, O_RDONLY | O_CLOEXEC); while (L->fd < 0 && errno == EINTR);
        if (L->fd < 0) {
            st = fm_errf(err, errlen, FM_ERR_IO, "%s (layer %d): cannot open: %s", f->path, il,
                         errno_text(errno, eb, sizeof eb));
            goto fail;
        }
        struct stat sb;
        if (fstat(L->fd, &sb) != 0) {
            st = fm_errf(err, errlen, FM_ERR_IO, "%s (layer %d): fstat failed: %s", f->path, il,
                         errno_text(errno, eb, sizeof eb));
            goto fail;
        }
        uint64_t need = f->data_offset + (uint64_t)f->n_experts * f->block_bytes;
        if ((uint64_t)sb.st_size < need) {
            st = fm_errf(err, errlen, FM_ERR_FORMAT,
                         "%s (layer %d): file is %llu bytes, expected at least %llu (data_offset %llu + "
                         "%d experts * block_bytes %llu)", f->path, il, (unsigned long long)sb.st_size,
                         (unsigned long long)need, (unsigned long long)f->data_offset, f->n_experts,
                         (unsigned long long)f->block_bytes);
            goto fail;
        }
#ifdef POSIX_FADV_RANDOM
        posix_fadvise(L->fd, 0, 0, POSIX_FADV_RANDOM); /* no readahead past the block we asked for */
#endif
#ifdef O_DIRECT
        if (direct_io) {
            do L->dfd = open(f->path, O_RDONLY | O_CLOEXEC | O_DIRECT); while (L->dfd < 0 && errno == EINTR);
            atomic_store(&L->direct, L->dfd >= 0); /* e.g. tmpfs on old kernels: buffered fallback */
        }
#endif
        if (f->block_bytes > io->max_block) io->max_block = f->block_bytes;
    }

    /* per-request tables, slots, cache */
    io->req_map = malloc((size_t)max_batch * sizeof(int32_t));
    io->dist_ie = malloc((size_t)max_batch * sizeof(int32_t));
    io->dist_ptr = malloc((size_t)max_batch * sizeof(uint8_t *));
    io->dist_task = malloc((size_t)max_batch * sizeof(int32_t));
    io->dist_taken = malloc((size_t)max_batch);
    io->pinned = malloc((size_t)max_batch * sizeof(int32_t));
    io->tasks = calloc((size_t)max_batch, sizeof(io_task));
    if (!io->req_map || !io->dist_ie || !io->dist_ptr || !io->dist_task || !io->dist_taken || !io->pinned ||
        !io->tasks) {
        st = fm_errf(err, errlen, FM_ERR_OOM, "fm_io_open: out of memory");
        goto fail;
    }
    if (io->max_block) {
        io->n_slots = 2 * max_batch;
        io->slot_buf = calloc((size_t)io->n_slots, sizeof(uint8_t *));
        if (!io->slot_buf) { st = fm_errf(err, errlen, FM_ERR_OOM, "fm_io_open: out of memory"); goto fail; }
        uint64_t cap = ram_budget / io->max_block;
        if (cap > INT32_MAX / 2) cap = INT32_MAX / 2;
        io->cache_cap = (int32_t)cap;
        if (cap) {
            io->entries = calloc((size_t)cap, sizeof(io_entry));
            if (!io->entries) { st = fm_errf(err, errlen, FM_ERR_OOM, "fm_io_open: out of memory"); goto fail; }
        }
    }

    io->threads = calloc((size_t)io_threads, sizeof(pthread_t));
    if (!io->threads) { st = fm_errf(err, errlen, FM_ERR_OOM, "fm_io_open: out of memory"); goto fail; }
    for (int32_t i = 0; i < io_threads; i++) {
        if (pthread_create(&io->threads[i], NULL, io_main, io) != 0) break;
        io->n_threads++;
    }
    if (io->n_threads == 0) {
        st = fm_errf(err, errlen, FM_ERR_OOM, "fm_io_open: cannot start any of %d io_threads", io_threads);
        goto fail;
    }
    *out = io;
    return FM_OK;
fail:
    fm_io_close(io);
    return st;
}

int32_t fm_io_direct_active(const fm_io *io) {
    if (!io || !io->direct_requested) return 0;
    int32_t any = 0;
    for (int32_t il = 0; il < io->n_layers; il++) {
        io_layer *L = &io->layers[il];
        if (!L->path) continue;
        if (L->dfd < 0 || !atomic_load(&L->direct)) return 0;
        any = 1;
    }
    return any;
}

/* ---- speculative prefetch ---- */
int32_t fm_io_set_prefetch(fm_io *io, int32_t on) {
    if (!io) return 0;
    io->pf_on = 0;
    if (on <= 0 || io->direct_requested || !io->max_block) return 0; /* O_DIRECT bypasses the page cache */
    if (!io->pf_started) {
        int32_t cap = 0;
        for (int32_t il = 0; il < io->n_layers; il++)
            if (io->layers[il].n_experts > cap) cap = io->layers[il].n_experts;
        io->pf_il = malloc((size_t)cap * sizeof(int32_t));
        io->pf_ie = malloc((size_t)cap * sizeof(int32_t));
        if (!io->pf_il || !io->pf_ie) return 0;
        io->pf_cap = cap;
        if (pthread_create(&io->pf_thread, NULL, pf_main, io) != 0) return 0;
        io->pf_started = 1;
    }
    io->pf_on = on;
    return on;
}

int32_t fm_io_prefetch_active(const fm_io *io) { return io ? io->pf_on : 0; }

const uint8_t *fm_io_peek(const fm_io *io, int32_t il, int32_t ie) {
    if (!io || !io->cache_cap || il < 0 || il >= io->n_layers) return NULL;
    const io_layer *L = &io->layers[il];
    if (!L->path || ie < 0 || ie >= L->n_experts || L->cache_slot[ie] < 0) return NULL;
    return io->entries[L->cache_slot[ie]].buf;
}

int32_t fm_io_cache_capacity(const fm_io *io) { return io ? io->cache_cap : 0; }

int32_t fm_io_max_batch(const fm_io *io) { return io ? io->max_batch : 0; }

int32_t fm_io_prefetch(fm_io *io, int32_t il, int32_t *experts, int32_t n) {
    if (!io || !io->pf_on || il < 0 || il >= io->n_layers || !experts || n <= 0) return 0;
    io_layer *L = &io->layers[il];
    if (!L->path) return 0;
    int32_t q = 0;
    pthread_mutex_lock(&io->pf_mu);
    io->pf_n = io->pf_next = 0; /* what was not yet issued is stale now */
    for (int32_t i = 0; i < n && q < io->pf_cap; i++) {
        int32_t ie = experts[i];
        if (ie < 0 || ie >= L->n_experts) continue;
        if (io->cache_cap && L->cache_slot[ie] >= 0) continue; /* in the engine's RAM cache */
        io->pf_il[q] = il;
        io->pf_ie[q] = ie;
        experts[q++] = ie; /* the queued ones first, for the caller's stats */
    }
    io->pf_n = q;
    if (q) pthread_cond_signal(&io->pf_cv);
    pthread_mutex_unlock(&io->pf_mu);
    return q;
}

/* ---- requests ---- */
fm_status fm_io_submit(fm_io *io, int32_t il, const int32_t *experts, int32_t n, char *err, size_t errlen) {
    if (!io) return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_submit: io is NULL");
    if (io->req_active) io_drain(io); /* the previous request was never waited for */
    io->req_active = 0;
    for (int32_t i = 0; i < io->n_pinned; i++) io->entries[io->pinned[i]].pinned = 0;
    io->n_pinned = 0;
    if (il < 0 || il >= io->n_layers)
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_submit: il = %d out of range [0, %d)", il, io->n_layers);
    io_layer *L = &io->layers[il];
    if (!L->path) return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_submit: layer %d has no expert file", il);
    if (n < 0 || n > io->max_batch)
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_submit: n = %d out of range [0, max_batch %d]", n, io->max_batch);
    if (n > 0 && !experts) return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_submit: experts is NULL");
    for (int32_t i = 0; i < n; i++)
        if (experts[i] < 0 || experts[i] >= L->n_experts)
            return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_submit: experts[%d] = %d out of range [0, %d) (layer %d)",
                           i, experts[i], L->n_experts, il);

    io->req_il = il;
    io->req_n = n;
    io->n_distinct = 0;
    io->req_hits = 0;
    int32_t n_tasks = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t ie = experts[i], d;
        for (d = 0; d < io->n_distinct && io->dist_ie[d] != ie; d++) {}
        io->req_map[i] = d;
        if (d < io->n_distinct) continue; /* duplicate: read once */
        io->n_distinct++;
        io->dist_taken[d] = 0;
        io->dist_ie[d] = ie;
        if (io->cache_cap) cache_count(io, il, ie);
        int32_t k = io->cache_cap ? L->cache_slot[ie] : -1;
        if (k >= 0) { /* hit: counted above, and pinned until the next submit */
            pin(io, k);
            io->dist_ptr[d] = io->entries[k].buf;
            io->dist_task[d] = -1;
            io->req_hits++;
            continue;
        }
        int32_t s = io->slot_half * io->max_batch + n_tasks;
        if (!io->slot_buf[s] && !(io->slot_buf[s] = block_alloc(io))) {
            io->n_distinct = 0;
            return fm_errf(err, errlen, FM_ERR_OOM, "fm_io_submit: cannot allocate a slot buffer of %llu bytes",
                           (unsigned long long)io->max_block);
        }
        io_task *t = &io->tasks[n_tasks];
        t->il = il;
        t->ie = ie;
        t->index = i;
        t->slot = s;
        t->dst = io->slot_buf[s];
        t->offset = L->data_offset + (uint64_t)ie * L->block_bytes;
        t->len = L->block_bytes;
        t->got = 0;
        t->err_no = 0;
        t->done_ok = 0;
        t->done = 0;
        io->dist_ptr[d] = NULL;
        io->dist_task[d] = n_tasks++;
    }
    io->slot_half ^= 1;
    pthread_mutex_lock(&io->mu);
    io->n_tasks = n_tasks;
    io->next_task = 0;
    io->pending = n_tasks;
    if (n_tasks) pthread_cond_broadcast(&io->cv_work);
    pthread_mutex_unlock(&io->mu);
    io->req_active = 1;
    /* the hits, on this thread, while the reads are under way */
    if (io->hooks.on_block)
        for (int32_t d = 0; d < io->n_distinct; d++) {
            if (io->dist_task[d] >= 0) continue;
            int32_t i = 0;
            while (io->req_map[i] != d) i++;
            io->hooks.on_block(io->hooks.user, i, io->dist_ptr[d]);
        }
    return FM_OK;
}

int32_t fm_io_next(fm_io *io, int32_t *index, const uint8_t **block) {
    if (!io || !io->req_active || !index || !block) return 0;
    pthread_mutex_lock(&io->mu);
    for (;;) {
        int32_t left = 0, pick = -1;
        for (int32_t d = 0; d < io->n_distinct && pick < 0; d++) {
            if (io->dist_taken[d]) continue;
            left++;
            if (io->dist_task[d] < 0 || io->tasks[io->dist_task[d]].done) pick = d;
        }
        if (pick >= 0) {
            io->dist_taken[pick] = 1;
            int32_t ti = io->dist_task[pick];
            *block = ti < 0 ? io->dist_ptr[pick] : (io->tasks[ti].done_ok ? io->tasks[ti].dst : NULL);
            int32_t i = 0;
            while (i < io->req_n && io->req_map[i] != pick) i++;
            *index = i;
            pthread_mutex_unlock(&io->mu);
            return 1;
        }
        if (!left) break;
        pthread_cond_wait(&io->cv_done, &io->mu);
    }
    pthread_mutex_unlock(&io->mu);
    return 0;
}

fm_status fm_io_wait(fm_io *io, const uint8_t **blocks, fm_io_stats *st, char *err, size_t errlen) {
    if (!io) return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_wait: io is NULL");
    if (!io->req_active) return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_wait: no request submitted");
    double t0 = fm_now_ms();
    io_drain(io);
    double t1 = fm_now_ms();
    io->req_active = 0;

    fm_status status = FM_OK;
    int64_t bytes = 0, loads = 0;
    for (int32_t d = 0; d < io->n_distinct; d++) {
        int32_t ti = io->dist_task[d];
        if (ti < 0) continue;
        io_task *t = &io->tasks[ti];
        bytes += (int64_t)t->got;
        if (!t->done_ok) {
            if (status == FM_OK) {
                io_layer *L = &io->layers[t->il];
                char eb[128];
                if (t->err_no)
                    fm_errf(err, errlen, FM_ERR_IO, "%s (layer %d, expert %d): read of %llu bytes at offset %llu failed: %s",
                            L->path, t->il, t->ie, (unsigned long long)t->len, (unsigned long long)t->offset,
                            errno_text(t->err_no, eb, sizeof eb));
                else
                    fm_errf(err, errlen, FM_ERR_IO, "%s (layer %d, expert %d): short read: got %llu of %llu bytes at "
                            "offset %llu (file truncated?)", L->path, t->il, t->ie, (unsigned long long)t->got,
                            (unsigned long long)t->len, (unsigned long long)t->offset);
                status = FM_ERR_IO;
            }
            continue;
        }
        loads++;
        /* keep it: swap the slot buffer into the cache (same memory, so the pointer is unchanged) */
        if (io->cache_cap) cache_insert(io, t->il, t->ie, t->slot);
        io->dist_ptr[d] = t->dst;
    }
    if (blocks)
        for (int32_t i = 0; i < io->req_n; i++) {
            int32_t d = io->req_map[i];
            blocks[i] = io->dist_task[d] >= 0 && !io->tasks[io->dist_task[d]].done_ok ? NULL : io->dist_ptr[d];
        }
    if (st) {
        st->bytes_read = bytes;
        st->loads = loads;
        st->hits = io->req_hits;
        st->ms_wait = t1 - t0;
    }
    return status;
}

/* ---- disk probe ---- */
typedef struct {
    int fd;
    uint64_t block_bytes, n_blocks;
    int32_t n_reads;
    atomic_int next;
    atomic_int failed;
    int err_no;
    uint64_t mul, add;      /* read i goes to block (mul*i + add) % n_blocks: distinct for i < n_blocks */
    pthread_mutex_t mu;     /* start gate: threads and their buffers are ready before the clock starts */
    pthread_cond_t cv;
    int go;
} probe_ctx;

typedef struct { probe_ctx *c; uint8_t *buf; } probe_arg;

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t gcd_u64(uint64_t a, uint64_t b) {
    while (b) { uint64_t t = a % b; a = b; b = t; }
    return a;
}

static void *probe_main(void *arg) {
    probe_ctx *c = ((probe_arg *)arg)->c;
    uint8_t *buf = ((probe_arg *)arg)->buf;
    pthread_mutex_lock(&c->mu);
    while (!c->go) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    for (;;) {
        int i = atomic_fetch_add(&c->next, 1);
        if (i >= c->n_reads || atomic_load(&c->failed)) break;
        uint64_t off = ((c->mul * (uint64_t)i + c->add) % c->n_blocks) * c->block_bytes;
        uint64_t got = 0;
        while (got < c->block_bytes) {
            ssize_t r = pread(c->fd, buf + got, (size_t)(c->block_bytes - got), (off_t)(off + got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                c->err_no = r < 0 ? errno : EIO;
                atomic_store(&c->failed, 1);
                break;
            }
            got += (uint64_t)r;
        }
    }
    return NULL;
}

fm_status fm_io_probe(const char *path, uint64_t block_bytes, int32_t n_reads, int32_t threads, int32_t direct_io,
                      double *gbps, char *err, size_t errlen) {
    if (!path || !gbps) return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_probe: path and gbps must not be NULL");
    if (block_bytes == 0 || block_bytes % FM_IO_ALIGN)
        return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_probe: block_bytes = %llu (need a multiple of 4096)",
                       (unsigned long long)block_bytes);
    if (n_reads <= 0) return fm_errf(err, errlen, FM_ERR_ARG, "fm_io_probe: n_reads = %d (need >= 1)", n_reads);
    if (threads <= 0) threads = 4;
    if (threads > FM_IO_MAX_THREADS) threads = FM_IO_MAX_THREADS;
    *gbps = 0;
    char eb[128];
    int flags = O_RDONLY | O_CLOEXEC;
#ifdef O_DIRECT
    if (direct_io) flags |= O_DIRECT;
#else
    if (direct_io) return fm_errf(err, errlen, FM_ERR_IO, "%s: O_DIRECT is not available on this platform", path);
#endif
    int fd;
    do fd = open(path, flags); while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return fm_errf(err, errlen, FM_ERR_IO, "%s: cannot open%s: %s", path, direct_io ? " with O_DIRECT" : "",
                       errno_text(errno, eb, sizeof eb));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || (uint64_t)sb.st_size < block_bytes) {
        close(fd);
        return fm_errf(err, errlen, FM_ERR_ARG, "%s: file is smaller than one block of %llu bytes", path,
                       (unsigned long long)block_bytes);
    }
#ifdef POSIX_FADV_RANDOM
    if (!direct_io) posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
#endif
    probe_ctx c = {.fd = fd, .block_bytes = block_bytes, .n_blocks = (uint64_t)sb.st_size / block_bytes,
                   .n_reads = n_reads};
    /* a random stride coprime to n_blocks visits blocks in a scrambled order without repeats, so
     * a cold probe never re-reads a block it just pulled into the page cache */
    uint64_t seed = splitmix64((uint64_t)sb.st_size ^ (uint64_t)(fm_now_ms() * 1e3));
    c.add = seed % c.n_blocks;
    c.mul = 1 + splitmix64(seed) % c.n_blocks;
    while (gcd_u64(c.mul, c.n_blocks) != 1) c.mul++;
    atomic_init(&c.next, 0);
    atomic_init(&c.failed, 0);
    pthread_mutex_init(&c.mu, NULL);
    pthread_cond_init(&c.cv, NULL);
    pthread_t *th = calloc((size_t)threads, sizeof *th);
    probe_arg *args = calloc((size_t)threads, sizeof *args);
    fm_status st = FM_OK;
    int32_t started = 0;
    double ms = 0;
    if (!th || !args) { st = fm_errf(err, errlen, FM_ERR_OOM, "fm_io_probe: out of memory"); goto done; }
    for (int32_t i = 0; i < threads; i++) {
        args[i].c = &c;
        args[i].buf = aligned_block(block_bytes);
        if (!args[i].buf) {
            st = fm_errf(err, errlen, FM_ERR_OOM, "fm_io_probe: cannot allocate %d buffers of %llu bytes", threads,
                         (unsigned long long)block_bytes);
            goto done;
        }
        memset(args[i].buf, 0, (size_t)block_bytes); /* fault the pages in outside the timed region */
    }
    for (int32_t i = 0; i < threads; i++)
        if (pthread_create(&th[i], NULL, probe_main, &args[i]) == 0) started++;
        else break;
    pthread_mutex_lock(&c.mu);
    c.go = 1;
    double t0 = fm_now_ms();
    pthread_cond_broadcast(&c.cv);
    pthread_mutex_unlock(&c.mu);
    if (started == 0) probe_main(&args[0]);
    for (int32_t i = 0; i < started; i++) pthread_join(th[i], NULL);
    ms = fm_now_ms() - t0;
done:
    if (args)
        for (int32_t i = 0; i < threads; i++) free(args[i].buf);
    free(args);
    free(th);
    close(fd);
    pthread_mutex_destroy(&c.mu);
    pthread_cond_destroy(&c.cv);
    if (st != FM_OK) return st;
    if (atomic_load(&c.failed))
        return fm_errf(err, errlen, FM_ERR_IO, "%s: probe read failed: %s", path, errno_text(c.err_no, eb, sizeof eb));
    *gbps = (double)n_reads * (double)block_bytes / 1e9 / (ms > 1e-6 ? ms * 1e-3 : 1e-9);
    return FM_OK;
}
