/* The server's worker threads: everything slow that a request needs before or after
 * generation — parsing its JSON, rendering the chat template, tokenizing, and building a
 * whole non-streaming answer — runs here, never on libmicrohttpd's threads. A 4 MB body
 * that takes seconds to tokenize then delays other requests' preparation, not /health or
 * the bytes of running streams. Tasks come in two lanes, each in order of arrival: light
 * ones (small bodies, whole answers) always go first, and heavy ones (large bodies) may
 * occupy all threads but one, so a client sending 4 MB bodies back to back delays other
 * such clients, not everyone's ordinary requests. The threads run at
 * a lower scheduling priority (nice) than the HTTP threads, so on a busy CPU the HTTP
 * threads still get their turn. */
#include "server/server.h"

#include <pthread.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_THREADS 64

typedef struct task {
    struct task *next;
    srv_work_fn fn;
    void *arg;
} task;

typedef struct {
    task *head, *tail;
} lane;

struct srv_work {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    lane lanes[2];          /* SRV_WORK_LIGHT first */
    int queued;
    int heavy_running, heavy_max;
    bool stopping;
    int nice;
    pthread_t threads[MAX_THREADS];
    int n_threads;
};

/* the lane this thread takes its next task from, or NULL: light first; heavy while fewer
 * than heavy_max threads run heavy tasks. Under w->mu. */
static lane *next_lane(srv_work *w)
{
    if (w->lanes[SRV_WORK_LIGHT].head)
        return &w->lanes[SRV_WORK_LIGHT];
    if (w->lanes[SRV_WORK_HEAVY].head && w->heavy_running < w->heavy_max)
        return &w->lanes[SRV_WORK_HEAVY];
    return NULL;
}

static void *work_main(void *arg)
{
    srv_work *w = arg;
    /* Linux schedules threads one by one: this lowers the priority of this thread only */
    if (w->nice > 0 && setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), w->nice) != 0)
        zse_log(ZSE_LOG_DEBUG, "worker thread keeps its priority (setpriority failed)");
    pthread_mutex_lock(&w->mu);
    for (;;) {
        lane *l;
        while (!(l = next_lane(w)) && !(w->stopping && !w->queued))
            pthread_cond_wait(&w->wake, &w->mu);
        if (!l)
            break; /* stopping and nothing left */
        task *t = l->head;
        bool heavy = l == &w->lanes[SRV_WORK_HEAVY];
        l->head = t->next;
        if (!l->head)
            l->tail = NULL;
        w->queued--;
        w->heavy_running += heavy;
        pthread_mutex_unlock(&w->mu);
        t->fn(t->arg);
        free(t);
        pthread_mutex_lock(&w->mu);
        if (heavy) {
            w->heavy_running--;
            pthread_cond_broadcast(&w->wake); /* a heavy task may wait for this slot */
        }
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

srv_work *srv_work_start(int n_threads, int nice)
{
    if (n_threads < 1)
        n_threads = 1;
    if (n_threads > MAX_THREADS)
        n_threads = MAX_THREADS;
    srv_work *w = zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->wake, NULL);
    w->nice = nice;
    w->heavy_max = n_threads > 1 ? n_threads - 1 : 1; /* one thread is kept for light work */
    for (int i = 0; i < n_threads; i++) {
        int rc = pthread_create(&w->threads[i], NULL, work_main, w);
        if (rc != 0) {
            zse_fail("cannot start a worker thread: %s", strerror(rc));
            srv_work_free(w);
            return NULL;
        }
        w->n_threads++;
    }
    return w;
}

int srv_work_push(srv_work *w, srv_work_lane which, srv_work_fn fn, void *arg)
{
    task *t = zse_malloc(sizeof *t);
    if (!t)
        return -1;
    t->next = NULL;
    t->fn = fn;
    t->arg = arg;
    pthread_mutex_lock(&w->mu);
    if (w->stopping) {
        pthread_mutex_unlock(&w->mu);
        free(t);
        return zse_fail("the server is stopping");
    }
    lane *l = &w->lanes[which == SRV_WORK_HEAVY ? SRV_WORK_HEAVY : SRV_WORK_LIGHT];
    if (l->tail)
        l->tail->next = t;
    else
        l->head = t;
    l->tail = t;
    w->queued++;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

void srv_work_stop(srv_work *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stopping = true;
    pthread_cond_broadcast(&w->wake);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->n_threads; i++)
        pthread_join(w->threads[i], NULL);
    w->n_threads = 0; /* a second stop joins nothing; pushes keep failing */
}

void srv_work_free(srv_work *w)
{
    if (!w)
        return;
    srv_work_stop(w);
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
