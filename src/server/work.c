/* The server's worker threads: everything slow that a request needs before or after
 * generation — parsing its JSON, rendering the chat template, tokenizing, and building a
 * whole non-streaming answer — runs here, never on libmicrohttpd's threads. A 4 MB body
 * that takes seconds to tokenize then delays other requests' preparation, not /health or
 * the bytes of running streams.
 *
 * Two lanes, each served in order of arrival by threads of its own: light tasks (small
 * bodies, whole answers) by --workers threads at nice +5, heavy ones (bodies of 64 KB and
 * more) by threads at nice +19. A client posting 4 MB bodies back to back thus delays only
 * its like, and its parsing gets only the CPU the engine and the HTTP threads leave
 * (Linux schedules threads one by one, so each thread sets its own priority). */
#include "server/server.h"

#include <pthread.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_THREADS 64
#define HEAVY_NICE 19

typedef struct task {
    struct task *next;
    srv_work_fn fn;
    void *arg;
} task;

typedef struct {
    task *head, *tail;
    pthread_cond_t wake;
} lane;

struct srv_work {
    pthread_mutex_t mu;
    lane lanes[2];          /* SRV_WORK_LIGHT, SRV_WORK_HEAVY */
    bool stopping;
    int nice;               /* of the light lane's threads */
    pthread_t threads[MAX_THREADS];
    int n_threads;
};

typedef struct {
    srv_work *w;
    srv_work_lane lane;
} thread_arg;

static void *work_main(void *arg)
{
    thread_arg ta = *(thread_arg *)arg;
    free(arg);
    srv_work *w = ta.w;
    lane *l = &w->lanes[ta.lane];
    int nice = ta.lane == SRV_WORK_HEAVY ? HEAVY_NICE : w->nice;
    if (nice > 0 && setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice) != 0)
        zse_log(ZSE_LOG_DEBUG, "worker thread keeps its priority (setpriority failed)");
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!l->head && !w->stopping)
            pthread_cond_wait(&l->wake, &w->mu);
        task *t = l->head;
        if (!t)
            break; /* stopping and nothing left */
        l->head = t->next;
        if (!l->head)
            l->tail = NULL;
        pthread_mutex_unlock(&w->mu);
        t->fn(t->arg);
        free(t);
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

static int start_thread(srv_work *w, srv_work_lane which)
{
    thread_arg *ta = zse_malloc(sizeof *ta);
    if (!ta)
        return -1;
    ta->w = w;
    ta->lane = which;
    int rc = pthread_create(&w->threads[w->n_threads], NULL, work_main, ta);
    if (rc != 0) {
        free(ta);
        return zse_fail("cannot start a worker thread: %s", strerror(rc));
    }
    w->n_threads++;
    return 0;
}

srv_work *srv_work_start(int n_light, int n_heavy, int nice)
{
    n_light = n_light < 1 ? 1 : n_light > MAX_THREADS / 2 ? MAX_THREADS / 2 : n_light;
    n_heavy = n_heavy < 1 ? 1 : n_heavy > MAX_THREADS / 2 ? MAX_THREADS / 2 : n_heavy;
    srv_work *w = zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->lanes[SRV_WORK_LIGHT].wake, NULL);
    pthread_cond_init(&w->lanes[SRV_WORK_HEAVY].wake, NULL);
    w->nice = nice;
    for (int i = 0; i < n_light + n_heavy; i++)
        if (start_thread(w, i < n_light ? SRV_WORK_LIGHT : SRV_WORK_HEAVY) != 0) {
            srv_work_free(w);
            return NULL;
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
    pthread_cond_signal(&l->wake);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

void srv_work_stop(srv_work *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stopping = true;
    pthread_cond_broadcast(&w->lanes[SRV_WORK_LIGHT].wake);
    pthread_cond_broadcast(&w->lanes[SRV_WORK_HEAVY].wake);
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
    pthread_cond_destroy(&w->lanes[SRV_WORK_LIGHT].wake);
    pthread_cond_destroy(&w->lanes[SRV_WORK_HEAVY].wake);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
