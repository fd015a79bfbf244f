/* The audit writer: requests queue their row in memory and a background thread writes
 * them in one transaction every quarter second, so no request waits for the disk. The same
 * thread prunes old rows (retention) and reloads the keyring when `zse api-key` changed the
 * key table (PRAGMA data_version moves when another connection commits). */
#include "server/server.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

#define QUEUE_MAX 65536         /* rows waiting at most; beyond, rows are dropped and counted */
#define FLUSH_INTERVAL_S 0.25
#define PRUNE_INTERVAL_S 60.0
#define KEY_POLL_INTERVAL_S 1.0

struct srv_audit {
    pthread_mutex_t mu;
    pthread_cond_t wake;        /* rows queued past the batch size, a flush, or stop */
    pthread_cond_t written;     /* a batch reached the database */
    srv_audit_row *queue;
    size_t n, cap;
    uint64_t queued_total;      /* rows ever queued (not dropped) */
    uint64_t written_total;     /* rows ever taken off the queue and written or failed */
    uint64_t dropped;
    bool flush_requested;
    bool stopping;
    pthread_t thread;
    bool thread_started;
    srv_db *db;
    double retention_s;
    int64_t max_rows;
    srv_keyring *keyring;
    int64_t data_version;
};

static double unix_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int reload_keys(srv_audit *a)
{
    srv_key *keys;
    size_t n;
    if (srv_key_list(a->db, &keys, &n) != 0)
        return -1;
    int rc = srv_keyring_set(a->keyring, keys, n);
    free(keys);
    return rc;
}

static void reload_keys_if_changed(srv_audit *a)
{
    int64_t v = srv_db_data_version(a->db);
    if (v == a->data_version)
        return;
    if (reload_keys(a) == 0) {
        a->data_version = v;
        zse_log(ZSE_LOG_INFO, "api keys reloaded (%zu keys)", srv_keyring_size(a->keyring));
    } else {
        zse_log(ZSE_LOG_WARN, "cannot reload api keys: %s", zse_error_message());
    }
}

static void prune(srv_audit *a)
{
    double older = a->retention_s > 0 ? unix_now() - a->retention_s : 0;
    if ((older > 0 || a->max_rows > 0) && srv_audit_prune(a->db, older, a->max_rows) != 0)
        zse_log(ZSE_LOG_WARN, "audit retention: %s", zse_error_message());
}

static void abs_deadline(struct timespec *ts, double seconds)
{
    clock_gettime(CLOCK_REALTIME, ts);
    long ns = ts->tv_nsec + (long)(seconds * 1e9);
    ts->tv_sec += ns / 1000000000L;
    ts->tv_nsec = ns % 1000000000L;
}

static void *writer_main(void *arg)
{
    srv_audit *a = arg;
    double last_prune = 0, last_poll = zse_now();
    srv_audit_row *spare = NULL;    /* the other of the two buffers the queue swaps between */
    size_t spare_cap = 0;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        if (!a->stopping && !a->flush_requested) {
            struct timespec dl;
            abs_deadline(&dl, FLUSH_INTERVAL_S);
            pthread_cond_timedwait(&a->wake, &a->mu, &dl);
        }
        /* take the queue and write it unlocked, so requests keep queueing meanwhile */
        srv_audit_row *rows = a->queue;
        size_t n = a->n, rows_cap = a->cap;
        a->queue = spare;
        a->cap = spare_cap;
        a->n = 0;
        a->flush_requested = false;
        bool stopping = a->stopping;
        pthread_mutex_unlock(&a->mu);

        if (n && srv_audit_write(a->db, rows, n) != 0)
            zse_log(ZSE_LOG_WARN, "audit: %zu rows not written: %s", n, zse_error_message());
        spare = rows;
        spare_cap = rows_cap;
        double now = zse_now();
        if (now - last_prune >= PRUNE_INTERVAL_S || stopping) {
            prune(a);
            last_prune = now;
        }
        if (a->keyring && now - last_poll >= KEY_POLL_INTERVAL_S) {
            reload_keys_if_changed(a);
            last_poll = now;
        }

        pthread_mutex_lock(&a->mu);
        a->written_total += n;
        pthread_cond_broadcast(&a->written);
        if (stopping && a->n == 0)
            break;
    }
    pthread_mutex_unlock(&a->mu);
    free(spare);
    return NULL;
}

srv_audit *srv_audit_start(const char *db_path, double retention_s, int64_t max_rows,
                           srv_keyring *kr)
{
    srv_audit *a = zse_calloc(1, sizeof *a);
    if (!a)
        return NULL;
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->wake, NULL);
    pthread_cond_init(&a->written, NULL);
    a->retention_s = retention_s;
    a->max_rows = max_rows;
    a->keyring = kr;
    if (!(a->db = srv_db_open(db_path)))
        goto fail;
    a->data_version = srv_db_data_version(a->db);
    if (kr && reload_keys(a) != 0)
        goto fail;
    prune(a);
    int rc = pthread_create(&a->thread, NULL, writer_main, a);
    if (rc != 0) {
        zse_fail("cannot start the audit thread: %s", strerror(rc));
        goto fail;
    }
    a->thread_started = true;
    return a;
fail:
    srv_audit_stop(a);
    return NULL;
}

void srv_audit_log(srv_audit *a, const srv_audit_row *row)
{
    pthread_mutex_lock(&a->mu);
    if (a->n == a->cap && a->cap < QUEUE_MAX) {
        size_t ncap = a->cap ? a->cap * 2 : 256;
        srv_audit_row *q = zse_realloc(a->queue, ncap * sizeof *q);
        if (q) {
            a->queue = q;
            a->cap = ncap;
        }
    }
    if (a->n < a->cap) {
        a->queue[a->n++] = *row;
        a->queued_total++;
    } else {
        a->dropped++;
    }
    pthread_mutex_unlock(&a->mu);
}

uint64_t srv_audit_dropped(srv_audit *a)
{
    pthread_mutex_lock(&a->mu);
    uint64_t d = a->dropped;
    pthread_mutex_unlock(&a->mu);
    return d;
}

int srv_audit_flush(srv_audit *a)
{
    pthread_mutex_lock(&a->mu);
    uint64_t target = a->queued_total;
    a->flush_requested = true;
    pthread_cond_signal(&a->wake);
    while (a->written_total < target && a->thread_started)
        pthread_cond_wait(&a->written, &a->mu);
    pthread_mutex_unlock(&a->mu);
    return 0;
}

void srv_audit_stop(srv_audit *a)
{
    if (!a)
        return;
    if (a->thread_started) {
        pthread_mutex_lock(&a->mu);
        a->stopping = true;
        pthread_cond_signal(&a->wake);
        pthread_mutex_unlock(&a->mu);
        pthread_join(a->thread, NULL);
    }
    srv_db_close(a->db);
    free(a->queue);
    pthread_cond_destroy(&a->wake);
    pthread_cond_destroy(&a->written);
    pthread_mutex_destroy(&a->mu);
    free(a);
}
