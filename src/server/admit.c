/* Fair admission: which waiting sequence the engine gets next.
 *
 * Every sequence goes to the engine with its tenant (the API key; the client address when
 * --auth is off), and the engine shares its slots and compute between tenants (it admits
 * the tenant running the fewest first, takes a slot from a tenant running two or more
 * beyond a waiting one's, and shares each step's compute by deficit round robin:
 * docs/ARCHITECTURE.md, *The batching engine*). What stays here is what the engine does
 * not bound, per tenant:
 *  - a tenant may have at most --max-seqs-per-key sequences in the engine (running or
 *    queued there; by default all but an eighth of --max-seqs), so a tenant with many
 *    requests never fills the engine's queue, and a newcomer usually finds a free slot
 *    without the engine preempting anyone;
 *  - all tenants together have at most the engine's slots and queue (--max-seqs +
 *    --max-queue) there, so the engine never refuses a sequence for a full queue; beyond,
 *    the most urgent priority goes first, among equals the tenant with the fewest in the
 *    engine, then the one served least recently (round robin);
 *  - a tenant may have at most --max-queued-tokens-per-key tokens (prompt + completion)
 *    waiting here, beyond which its requests get 429; all tenants together at most
 *    --max-queue sequences, beyond which requests get 503.
 *
 * One thread hands sequences to the engine (never with the lock held: the engine may hold
 * its own lock while it calls back), woken when a sequence is queued or one ends. */
#include "server/server.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

typedef struct ticket {
    struct ticket *next;
    srv_job *job;           /* a reference */
    int choice;
    int priority;
    int64_t cost;           /* prompt + completion tokens at most */
    uint64_t order;
} ticket;

typedef struct tenant {
    struct tenant *next;
    srv_admit *admit;
    char name[96];
    ticket *queue;          /* most urgent first, then in order of arrival */
    int waiting;
    int running;            /* handed to the engine (running or queued there) and not ended */
    int64_t waiting_tokens;
    uint64_t served;        /* the dispatch clock when it last got a slot */
} tenant;

struct srv_admit {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    srv_admit_config cfg;
    srv_engine engine;
    bool have_engine;
    tenant *tenants;
    int waiting, running;
    uint64_t order, clock;
    bool stopping;
    pthread_t thread;
    bool thread_started;
};

/* ---- tenants ------------------------------------------------------------------------- */

static tenant *find_tenant(srv_admit *a, const char *name, bool create)
{
    for (tenant *t = a->tenants; t; t = t->next)
        if (strcmp(t->name, name) == 0)
            return t;
    if (!create)
        return NULL;
    tenant *t = zse_calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->admit = a;
    snprintf(t->name, sizeof t->name, "%s", name);
    t->next = a->tenants;
    a->tenants = t;
    return t;
}

/* a tenant with nothing waiting or running is forgotten; under a->mu */
static void drop_if_idle(srv_admit *a, tenant *t)
{
    if (t->waiting || t->running)
        return;
    for (tenant **p = &a->tenants; *p; p = &(*p)->next)
        if (*p == t) {
            *p = t->next;
            free(t);
            return;
        }
}

static void insert_ticket(tenant *t, ticket *k)
{
    ticket **p = &t->queue;
    while (*p && ((*p)->priority < k->priority || ((*p)->priority == k->priority && (*p)->order < k->order)))
        p = &(*p)->next;
    k->next = *p;
    *p = k;
}

/* ---- the dispatcher ------------------------------------------------------------------ */

/* the tenant whose head ticket goes next, or NULL when none may go now; under a->mu */
static tenant *pick(srv_admit *a)
{
    if (!a->have_engine || a->running >= a->cfg.slots)
        return NULL;
    tenant *best = NULL;
    for (tenant *t = a->tenants; t; t = t->next) {
        if (!t->queue || t->running >= a->cfg.slots_per_tenant)
            continue;
        if (!best)
            best = t;
        else if (t->queue->priority != best->queue->priority) {
            if (t->queue->priority < best->queue->priority)
                best = t;
        } else if (t->running != best->running) {
            if (t->running < best->running)
                best = t;
        } else if (t->served < best->served) {
            best = t;
        }
    }
    return best;
}

static void seq_ended(void *arg)
{
    tenant *t = arg;
    srv_admit *a = t->admit;
    pthread_mutex_lock(&a->mu);
    t->running--;
    a->running--;
    drop_if_idle(a, t);
    pthread_cond_signal(&a->wake);
    pthread_mutex_unlock(&a->mu);
}

static void *dispatch_main(void *arg)
{
    srv_admit *a = arg;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        tenant *t = NULL;
        while (!a->stopping && !(t = pick(a)))
            pthread_cond_wait(&a->wake, &a->mu);
        if (a->stopping)
            break;
        ticket *k = t->queue;
        t->queue = k->next;
        t->waiting--;
        a->waiting--;
        t->waiting_tokens -= k->cost;
        t->running++; /* counted before the engine has it: its end may come before submit returns */
        a->running++;
        t->served = ++a->clock;
        srv_engine engine = a->engine;
        char name[sizeof t->name];
        memcpy(name, t->name, sizeof name);
        pthread_mutex_unlock(&a->mu);

        bool started = false;
        if (srv_job_gone(k->job))
            srv_job_end_choice(k->job, k->choice, ZSE_FINISH_CANCELLED);
        else
            started = srv_job_submit_choice(k->job, k->choice, &engine, name) == 0;
        srv_job_unref(k->job);
        free(k);

        pthread_mutex_lock(&a->mu);
        if (!started) { /* no end will come from the engine for it */
            t->running--;
            a->running--;
            drop_if_idle(a, t);
        }
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* ---- life ---------------------------------------------------------------------------- */

srv_admit *srv_admit_start(const srv_admit_config *c)
{
    srv_admit *a = zse_calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->cfg = *c;
    if (a->cfg.slots < 1)
        a->cfg.slots = 1;
    if (a->cfg.slots_per_tenant < 1 || a->cfg.slots_per_tenant > a->cfg.slots)
        a->cfg.slots_per_tenant = a->cfg.slots;
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->wake, NULL);
    int rc = pthread_create(&a->thread, NULL, dispatch_main, a);
    if (rc != 0) {
        zse_fail("cannot start the admission thread: %s", strerror(rc));
        srv_admit_stop(a);
        return NULL;
    }
    a->thread_started = true;
    return a;
}

void srv_admit_set_engine(srv_admit *a, const srv_engine *e, int64_t tokens_per_tenant)
{
    pthread_mutex_lock(&a->mu);
    a->engine = *e;
    a->have_engine = true;
    if (a->cfg.tokens_per_tenant <= 0)
        a->cfg.tokens_per_tenant = tokens_per_tenant;
    pthread_cond_signal(&a->wake);
    pthread_mutex_unlock(&a->mu);
}

/* the tickets of job `only` (all tickets when NULL), taken out of their queues; under a->mu */
static ticket *take_tickets(srv_admit *a, const srv_job *only)
{
    ticket *taken = NULL;
    for (tenant *t = a->tenants, *next; t; t = next) {
        next = t->next;
        for (ticket **p = &t->queue; *p;) {
            ticket *k = *p;
            if (only && k->job != only) {
                p = &k->next;
                continue;
            }
            *p = k->next;
            t->waiting--;
            a->waiting--;
            t->waiting_tokens -= k->cost;
            k->next = taken;
            taken = k;
        }
        drop_if_idle(a, t);
    }
    return taken;
}

/* ends each taken ticket's choice as cancelled; outside a->mu */
static void end_tickets(ticket *k)
{
    while (k) {
        ticket *next = k->next;
        srv_job_end_choice(k->job, k->choice, ZSE_FINISH_CANCELLED);
        srv_job_unref(k->job);
        free(k);
        k = next;
    }
}

void srv_admit_stop(srv_admit *a)
{
    if (!a)
        return;
    pthread_mutex_lock(&a->mu);
    a->stopping = true;
    pthread_cond_signal(&a->wake);
    pthread_mutex_unlock(&a->mu);
    if (a->thread_started)
        pthread_join(a->thread, NULL);
    pthread_mutex_lock(&a->mu);
    ticket *left = take_tickets(a, NULL);
    int running = a->running;
    pthread_mutex_unlock(&a->mu);
    end_tickets(left);
    if (running)
        zse_log(ZSE_LOG_ERROR, "admission stopped with %d sequences still running", running);
    while (a->tenants) {
        tenant *t = a->tenants;
        a->tenants = t->next;
        free(t);
    }
    pthread_cond_destroy(&a->wake);
    pthread_mutex_destroy(&a->mu);
    free(a);
}

/* ---- requests ------------------------------------------------------------------------ */

int srv_admit_enqueue(srv_admit *a, const char *tenant_name, srv_job *j, srv_error *err)
{
    int n = srv_job_choices(j);
    int64_t cost = 0;
    for (int i = 0; i < n; i++)
        cost += srv_job_choice_cost(j, i);
    ticket **tickets = zse_calloc((size_t)n, sizeof *tickets);
    for (int i = 0; tickets && i < n; i++)
        if (!(tickets[i] = zse_calloc(1, sizeof *tickets[i]))) {
            for (int k = 0; k < i; k++)
                free(tickets[k]);
            free(tickets);
            tickets = NULL;
        }
    if (!tickets)
        return srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory queueing the request");
    pthread_mutex_lock(&a->mu);
    int rc = 0;
    tenant *t = NULL;
    if (a->stopping) {
        rc = srv_error_set(err, 503, "server_error", "shutting_down", NULL, "the server is shutting down");
        err->retry_after = 5;
    } else if (a->waiting + n > a->cfg.max_waiting) {
        rc = srv_error_set(err, 503, "server_error", "overloaded", NULL,
                           "the server's queue is full (%d sequences waiting); retry shortly", a->waiting);
        err->retry_after = 1;
    } else if (!(t = find_tenant(a, tenant_name, true))) {
        rc = srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory queueing the request");
    } else if (t->waiting > 0 && t->waiting_tokens + cost > a->cfg.tokens_per_tenant) {
        /* a request alone may exceed the budget (else it could never run); a second one may not */
        rc = srv_error_set(err, 429, "rate_limit_error", "too_many_queued_tokens", NULL,
                           "%s has %lld tokens waiting already and this request adds %lld (at most %lld may "
                           "wait); retry when some of its requests have finished",
                           t->name, (long long)t->waiting_tokens, (long long)cost,
                           (long long)a->cfg.tokens_per_tenant);
        err->retry_after = 2;
    }
    if (rc != 0) {
        if (t)
            drop_if_idle(a, t);
        pthread_mutex_unlock(&a->mu);
        for (int i = 0; i < n; i++)
            free(tickets[i]);
        free(tickets);
        return -1;
    }
    srv_job_set_seq_end(j, seq_ended, t);
    for (int i = 0; i < n; i++) {
        ticket *k = tickets[i];
        srv_job_ref(j);
        k->job = j;
        k->choice = i;
        k->priority = srv_job_priority(j);
        k->cost = srv_job_choice_cost(j, i);
        k->order = ++a->order;
        insert_ticket(t, k);
    }
    t->waiting += n;
    a->waiting += n;
    t->waiting_tokens += cost;
    pthread_cond_signal(&a->wake);
    pthread_mutex_unlock(&a->mu);
    free(tickets);
    return 0;
}

void srv_admit_forget(srv_admit *a, srv_job *j)
{
    pthread_mutex_lock(&a->mu);
    ticket *taken = take_tickets(a, j);
    pthread_mutex_unlock(&a->mu);
    end_tickets(taken);
}

int srv_admit_waiting(srv_admit *a)
{
    pthread_mutex_lock(&a->mu);
    int n = a->waiting;
    pthread_mutex_unlock(&a->mu);
    return n;
}
