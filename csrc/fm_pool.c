/* fm_pool.c: the persistent compute thread pool.
 *
 * Owns: worker threads that split a range of rows between them. Does not own: I/O threads
 * (fm_io.c has its own pool so reads never wait behind compute).
 *
 * A job is published under the mutex with a generation counter; workers spin briefly on the
 * generation (decode issues hundreds of small jobs per token, where a condvar wake-up costs more
 * than the job), then sleep on the condvar. Chunks are claimed with an atomic counter so uneven
 * rows balance themselves.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "fm_internal.h"

#define FM_POOL_SPIN 20000

struct fm_pool {
    int32_t n;                 /* threads including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    atomic_uint_fast64_t gen;  /* job generation */
    atomic_int active;         /* workers still inside the current job */
    atomic_int_fast64_t next;  /* next chunk start */
    int stop;
    /* current job */
    fm_pool_fn fn;
    void *ctx;
    int64_t n_items, chunk;
};

static void pool_work(fm_pool *p, int32_t tid) {
    for (;;) {
        int64_t s = atomic_fetch_add(&p->next, p->chunk);
        if (s >= p->n_items) break;
        int64_t e = s + p->chunk < p->n_items ? s + p->chunk : p->n_items;
        p->fn(p->ctx, s, e, tid);
    }
}

typedef struct { fm_pool *p; int32_t tid; } worker_arg;

static void *pool_main(void *arg) {
    worker_arg wa = *(worker_arg *)arg;
    free(arg);
    fm_pool *p = wa.p;
    uint64_t seen = 0;
    for (;;) {
        uint64_t g = atomic_load(&p->gen);
        for (int spin = 0; g == seen && spin < FM_POOL_SPIN; spin++) {
            if ((spin & 255) == 255) sched_yield();
            g = atomic_load(&p->gen);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->gen) == seen && !p->stop) pthread_cond_wait(&p->cv_work, &p->mu);
            pthread_mutex_unlock(&p->mu);
            g = atomic_load(&p->gen);
        }
        if (p->stop) return NULL;
        seen = g;
        pool_work(p, wa.tid);
        if (atomic_fetch_sub(&p->active, 1) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

fm_pool *fm_pool_new(int32_t n_threads) {
    if (n_threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int32_t)c : 1;
    }
    fm_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    atomic_init(&p->gen, 0);
    atomic_init(&p->active, 0);
    atomic_init(&p->next, 0);
    if (n_threads > 1) {
        p->threads = calloc((size_t)n_threads - 1, sizeof(pthread_t));
        if (!p->threads) { free(p); return NULL; }
        for (int32_t i = 1; i < n_threads; i++) {
            worker_arg *wa = malloc(sizeof *wa);
            if (!wa) { p->n = i; break; }
            wa->p = p;
            wa->tid = i;
            if (pthread_create(&p->threads[i - 1], NULL, pool_main, wa) != 0) {
                free(wa);
                p->n = i;
                break;
            }
        }
    }
    return p;
}

void fm_pool_free(fm_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    for (int32_t i = 1; i < p->n; i++) pthread_join(p->threads[i - 1], NULL);
    free(p->threads);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_work);
    pthread_cond_destroy(&p->cv_done);
    free(p);
}

int32_t fm_pool_size(const fm_pool *p) { return p ? p->n : 1; }

void fm_pool_for(fm_pool *p, int64_t n, int64_t grain, fm_pool_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int32_t nt = p ? p->n : 1;
    if (nt <= 1 || n <= grain) {
        fn(ctx, 0, n, 0);
        return;
    }
    /* about 4 chunks per thread for balance, never below grain */
    int64_t chunk = (n + (int64_t)nt * 4 - 1) / ((int64_t)nt * 4);
    if (chunk < grain) chunk = grain;
    p->fn = fn;
    p->ctx = ctx;
    p->n_items = n;
    p->chunk = chunk;
    atomic_store(&p->next, 0);
    atomic_store(&p->active, nt - 1);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    pool_work(p, 0);
    /* wait for the workers: spin first, then sleep */
    for (int spin = 0; atomic_load(&p->active) > 0 && spin < FM_POOL_SPIN; spin++)
        if ((spin & 255) == 255) sched_yield();
    if (atomic_load(&p->active) > 0) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->active) > 0) pthread_cond_wait(&p->cv_done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}
