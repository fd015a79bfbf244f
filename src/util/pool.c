/* A fixed thread pool for data-parallel kernels.
 *
 * Decode calls the pool a few hundred times per token, so waking workers must be cheap:
 * workers spin on a generation counter for a short while before sleeping on a condition
 * variable. The caller works as thread 0 and then waits for the others to finish. */
#include "util/util.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SPIN_ROUNDS 20000

struct zse_pool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    atomic_uint generation;   /* bumped for every job */
    atomic_int pending;       /* workers still running the current job */
    atomic_bool quit;
    zse_pool_fn fn;
    void *arg;
};

struct worker_arg {
    zse_pool *pool;
    int index;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *p)
{
    struct worker_arg *wa = p;
    zse_pool *pool = wa->pool;
    int index = wa->index;
    free(wa);
    unsigned seen = 0; /* jobs may be posted before this thread first runs */
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool->generation, memory_order_acquire) == seen &&
               !atomic_load(&pool->quit)) {
            if (++spins < SPIN_ROUNDS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool->mu);
            while (atomic_load(&pool->generation) == seen && !atomic_load(&pool->quit))
                pthread_cond_wait(&pool->wake, &pool->mu);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->quit))
            return NULL;
        seen++;  /* the caller waits for every job, so generations come one at a time */
        pool->fn(pool->arg, index, pool->n);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel);
    }
}

zse_pool *zse_pool_create(int n_threads)
{
    if (n_threads < 1)
        n_threads = 1;
    if (n_threads > 1024) {
        zse_fail("thread count %d is too large (at most 1024)", n_threads);
        return NULL;
    }
    zse_pool *pool = zse_calloc(1, sizeof *pool);
    if (!pool)
        return NULL;
    pool->n = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->quit, false);
    if (n_threads > 1) {
        pool->threads = zse_calloc((size_t)n_threads, sizeof(pthread_t));
        if (!pool->threads) {
            zse_pool_free(pool);
            return NULL;
        }
    }
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = zse_malloc(sizeof *wa);
        if (!wa) {
            pool->n = i;
            zse_pool_free(pool);
            return NULL;
        }
        wa->pool = pool;
        wa->index = i;
        if (pthread_create(&pool->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            pool->n = i;
            zse_pool_free(pool);
            zse_fail("cannot start worker thread %d", i);
            return NULL;
        }
    }
    return pool;
}

int zse_pool_size(const zse_pool *pool)
{
    return pool ? pool->n : 1;
}

void zse_pool_run(zse_pool *pool, zse_pool_fn fn, void *arg)
{
    if (!pool || pool->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store(&pool->pending, pool->n - 1);
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    fn(arg, 0, pool->n);
    /* a worker that is not running (more threads than free cores) finishes only once it
     * gets a core: after a short spin, give ours up instead of burning the time slice */
    for (int spins = 0; atomic_load_explicit(&pool->pending, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_ROUNDS)
            cpu_relax();
        else
            sched_yield();
    }
}

void zse_pool_free(zse_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->quit, true);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++)
        if (pool->threads && pool->threads[i])
            pthread_join(pool->threads[i], NULL);
    free(pool->threads);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
    free(pool);
}

/* Physical cores: distinct (physical id, core id) pairs in /proc/cpuinfo, falling back
 * to the online CPU count. SMT siblings slow memory-bound kernels down. */
int zse_physical_cores(void)
{
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return online > 0 ? (int)online : 1;
    char line[512];
    int phys = 0, seen_n = 0;
    int seen[4096][2];
    while (fgets(line, sizeof line, f)) {
        int v;
        if (sscanf(line, "physical id : %d", &v) == 1)
            phys = v;
        else if (sscanf(line, "core id : %d", &v) == 1) {
            bool dup = false;
            for (int i = 0; i < seen_n; i++)
                if (seen[i][0] == phys && seen[i][1] == v)
                    dup = true;
            if (!dup && seen_n < 4096) {
                seen[seen_n][0] = phys;
                seen[seen_n][1] = v;
                seen_n++;
            }
        }
    }
    fclose(f);
    if (seen_n > 0)
        return seen_n;
    return online > 0 ? (int)online : 1;
}
