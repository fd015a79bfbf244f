/* The audit writer: requests queue their row in memory and a background thread writes
 * them in one transaction every quarter second, so no request waits for the disk. The same
 * thread prunes old rows (retention) and reloads the keyring when `zse api-key` changed the
 * key table (PRAGMA data_version moves when another connection commits).
 *
 * Refused requests (no valid key, unknown routes, malformed HTTP) never take a row or a
 * place in the queue: they are counted per minute, client and status in a small table of
 * their own (audit_refused), so anyone who can reach the port cannot push the rows of real
 * requests out of the queue or, through --audit-max-rows, out of the database. */
#include "server/server.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

#define QUEUE_MAX 65536         /* rows waiting at most; beyond, rows are dropped and counted */
#define FLUSH_INTERVAL_S 0.25
#define PRUNE_INTERVAL_S 60.0
#define KEY_POLL_INTERVAL_S 1.0
#define REFUSED_MAX 4096        /* distinct (minute, client, status) counted between writes */
#define REFUSED_SLOTS 8192      /* open-addressing index over them (a power of two) */

/* refused requests counted since the last write */
typedef struct {
    srv_refused_row rows[REFUSED_MAX];
    int32_t index[REFUSED_SLOTS];   /* row + 1, 0 = empty */
    size_t n;
} refused_counts;

struct srv_audit {
    pthread_mutex_t mu;
    pthread_cond_t wake;        /* rows queued past the batch size, a flush, or stop */
    pthread_cond_t written;     /* a batch reached the database */
    srv_audit_row *queue;
    size_t n, cap;
    uint64_t dropped;
    refused_counts *refused;        /* filled by requests */
    refused_counts *refused_spare;  /* written by the thread */
    uint64_t refused_total;
    uint64_t flush_asked;       /* flushes requested so far */
    uint64_t flush_done;        /* the last of them whose rows and counts are written */
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
    if (older <= 0 && a->max_rows <= 0)
        return;
    if (srv_audit_prune(a->db, older, a->max_rows) != 0 || srv_refused_prune(a->db, older, a->max_rows) != 0)
        zse_log(ZSE_LOG_WARN, "audit retention: %s", zse_error_message());
}

static void refused_reset(refused_counts *c)
{
    memset(c->index, 0, sizeof c->index);
    c->n = 0;
}

static uint32_t refused_slot(double minute, const char *client, int status)
{
    char key[96];
    int n = snprintf(key, sizeof key, "%.0f|%d|%s", minute, status, client);
    return (uint32_t)zse_hash64(key, (size_t)(n < (int)sizeof key ? n : (int)sizeof key - 1)) & (REFUSED_SLOTS - 1);
}

/* the counting row of (minute, client, status); past REFUSED_MAX distinct ones, the row of
 * client "*" for that minute and status takes the rest */
static srv_refused_row *refused_row(refused_counts *c, double minute, const char *client, int status)
{
    for (int pass = 0; pass < 2; pass++) {
        const char *who = pass == 0 ? client : "*";
        uint32_t i = refused_slot(minute, who, status);
        for (;;) {
            int32_t k = c->index[i];
            if (k == 0)
                break;
            srv_refused_row *r = &c->rows[k - 1];
            if (r->minute == minute && r->status == status && strcmp(r->client, who) == 0)
                return r;
            i = (i + 1) & (REFUSED_SLOTS - 1);
        }
        /* keep one place for the overflow row */
        if (c->n < (pass == 0 ? REFUSED_MAX - 1 : REFUSED_MAX)) {
            srv_refused_row *r = &c->rows[c->n++];
            memset(r, 0, sizeof *r);
            r->minute = minute;
            r->status = status;
            snprintf(r->client, sizeof r->client, "%s", who);
            c->index[i] = (int32_t)c->n;
            return r;
        }
    }
    return NULL;
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
        if (!a->stopping && a->flush_asked == a->flush_done) {
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
        refused_counts *refused = a->refused;
        a->refused = a->refused_spare;
        a->refused_spare = refused;
        uint64_t serving = a->flush_asked; /* everything asked for until now is in this batch */
        bool stopping = a->stopping;
        pthread_mutex_unlock(&a->mu);

        /* rows a write loses (disk full, I/O error) are counted like rows the queue drops */
        uint64_t lost = 0;
        if (n && srv_audit_write(a->db, rows, n) != 0) {
            zse_log(ZSE_LOG_WARN, "audit: %zu rows not written: %s", n, zse_error_message());
            lost = n;
        }
        if (refused->n && srv_refused_write(a->db, refused->rows, refused->n) != 0)
            zse_log(ZSE_LOG_WARN, "audit: %zu refused-request counts not written: %s", refused->n,
                    zse_error_message());
        refused_reset(refused);
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
        a->dropped += lost;
        a->flush_done = serving;
        pthread_cond_broadcast(&a->written);
        if (stopping && a->n == 0 && a->refused->n == 0)
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
    a->refused = zse_malloc(sizeof *a->refused);
    a->refused_spare = zse_malloc(sizeof *a->refused_spare);
    if (!a->refused || !a->refused_spare)
        goto fail;
    refused_reset(a->refused);
    refused_reset(a->refused_spare);
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
    } else {
        a->dropped++;
    }
    pthread_mutex_unlock(&a->mu);
}

void srv_audit_refused(srv_audit *a, double when, const char *client, int status, const char *route)
{
    double minute = 60.0 * (double)(long long)(when / 60.0);
    pthread_mutex_lock(&a->mu);
    srv_refused_row *r = refused_row(a->refused, minute, client, status);
    if (r) {
        r->count++;
        snprintf(r->route, sizeof r->route, "%s", route);
    }
    a->refused_total++;
    pthread_mutex_unlock(&a->mu);
}

uint64_t srv_audit_refused_total(srv_audit *a)
{
    pthread_mutex_lock(&a->mu);
    uint64_t n = a->refused_total;
    pthread_mutex_unlock(&a->mu);
    return n;
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
    uint64_t mine = ++a->flush_asked;
    pthread_cond_signal(&a->wake);
    while (a->flush_done < mine && a->thread_started)
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
    free(a->refused);
    free(a->refused_spare);
    pthread_cond_destroy(&a->wake);
    pthread_cond_destroy(&a->written);
    pthread_mutex_destroy(&a->mu);
    free(a);
}
