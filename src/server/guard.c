/* The connection guard: what libmicrohttpd does not do against clients that hold
 * connections without using them.
 *
 * libmicrohttpd's --timeout is an idle timeout: every byte resets it, so a client sending
 * one header line every few seconds (slowloris) or one body byte at a time keeps its
 * connection forever, and 1,000 such clients hold every slot. The guard tracks each open
 * connection's state (waiting for a request head, reading a body, busy) and
 *  - closes a connection whose request head has not arrived within --header-timeout of the
 *    connection opening (or of the previous answer on it), and one whose body has not
 *    arrived within --body-timeout of its head, however steadily bytes trickle in
 *    (nginx's client_header_timeout / client_body_timeout);
 *  - closes a connection whose client half-closed it with its request unfinished;
 *  - when the table is nearly full, closes the connections that have waited longest for a
 *    request head (idle keep-alive or slowloris), so a new client always finds a slot;
 *  - counts refused requests per client address (a token bucket of --max-refused-per-ip a
 *    minute); past its budget an address's refused requests get no answer (the connection
 *    is closed), until it has earned one back. Its valid requests are still served: an
 *    address may be a NAT or a proxy shared with legitimate clients, so connections are
 *    not refused at accept.
 * Per-address connection caps are libmicrohttpd's own (MHD_OPTION_PER_IP_CONNECTION_LIMIT:
 * refused at accept, before any memory is given).
 *
 * Closing is shutdown(2) on the socket: libmicrohttpd sees the end of the stream on its
 * own thread and closes the connection as if the client had gone. It happens under the
 * guard's lock, and libmicrohttpd tells the guard (srv_guard_close) before it closes the
 * descriptor, so a descriptor number reused by a newer connection is never shut. */
#include "server/server.h"

#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#define EVICT_MIN_AGE_S 1.0     /* a head younger than this is never evicted: it may be on its way */
#define BUCKET_SLOTS 4096       /* addresses whose refusals are counted (a power of two) */
#define BUCKET_PROBE 16         /* slots searched for an address before one is reused */
#define PROBE_MAX 1024          /* unfinished requests checked for a half-close per tick */

struct srv_conn {
    srv_conn *prev, *next;      /* in the list of its state (heads or bodies); busy ones in none */
    int fd;
    char addr[64];
    srv_conn_state state;
    double since;               /* when it entered its state */
    bool listed;
    bool closing;               /* shut down by the guard; libmicrohttpd will close it */
    srv_close_reason why;
};

typedef struct {
    srv_conn *first, *last;     /* oldest first: entries are appended when they enter the state */
} conn_list;

typedef struct {
    char addr[64];              /* "" = free */
    double tokens;
    double last;
} bucket;

struct srv_guard {
    pthread_mutex_t mu;
    srv_guard_config cfg;
    conn_list heads, bodies;
    int open, closing;
    srv_guard_stats stats;
    bucket *buckets;
};

srv_guard *srv_guard_new(const srv_guard_config *c)
{
    srv_guard *g = zse_calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->cfg = *c;
    if (c->refused_per_min > 0 && !(g->buckets = zse_calloc(BUCKET_SLOTS, sizeof *g->buckets))) {
        free(g);
        return NULL;
    }
    pthread_mutex_init(&g->mu, NULL);
    return g;
}

void srv_guard_free(srv_guard *g)
{
    if (!g)
        return;
    /* libmicrohttpd reported every connection closed (srv_guard_close) when it stopped */
    free(g->buckets);
    pthread_mutex_destroy(&g->mu);
    free(g);
}

/* ---- lists --------------------------------------------------------------------------- */

static conn_list *list_of(srv_guard *g, srv_conn_state st)
{
    return st == SRV_CONN_HEAD ? &g->heads : st == SRV_CONN_BODY ? &g->bodies : NULL;
}

static void unlink_conn(srv_guard *g, srv_conn *c)
{
    conn_list *l = list_of(g, c->state);
    if (!c->listed || !l)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        l->first = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        l->last = c->prev;
    c->prev = c->next = NULL;
    c->listed = false;
}

static void append_conn(srv_guard *g, srv_conn *c)
{
    conn_list *l = list_of(g, c->state);
    if (!l)
        return;
    c->prev = l->last;
    c->next = NULL;
    if (l->last)
        l->last->next = c;
    else
        l->first = c;
    l->last = c;
    c->listed = true;
}

/* closes it the way a client leaving would (see the top of the file); under g->mu */
static void shut(srv_guard *g, srv_conn *c, srv_close_reason why)
{
    unlink_conn(g, c);
    c->closing = true;
    c->why = why;
    g->closing++;
    if (why == SRV_CLOSE_HEADER_TIMEOUT)
        g->stats.header_timeouts++;
    else if (why == SRV_CLOSE_BODY_TIMEOUT)
        g->stats.body_timeouts++;
    else if (why == SRV_CLOSE_HALF_CLOSED)
        g->stats.half_closed++;
    else
        g->stats.evicted++;
    shutdown(c->fd, SHUT_RDWR);
}

/* when the table is nearly full, the oldest waiting heads make room for new clients */
static void evict_if_full(srv_guard *g, double now)
{
    int max = g->cfg.max_connections;
    if (max <= 0)
        return;
    int high = max - (max / 8 > 1 ? max / 8 : 1);
    while (g->open - g->closing >= high) {
        srv_conn *oldest = g->heads.first;
        if (!oldest || now - oldest->since < EVICT_MIN_AGE_S)
            return;
        shut(g, oldest, SRV_CLOSE_EVICTED);
    }
}

/* ---- connections --------------------------------------------------------------------- */

srv_conn *srv_guard_open(srv_guard *g, int fd, const char *addr, double now)
{
    srv_conn *c = zse_calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->fd = fd;
    snprintf(c->addr, sizeof c->addr, "%s", addr);
    c->state = SRV_CONN_HEAD;
    c->since = now;
    pthread_mutex_lock(&g->mu);
    g->open++;
    append_conn(g, c);
    evict_if_full(g, now);
    pthread_mutex_unlock(&g->mu);
    return c;
}

void srv_guard_set_state(srv_guard *g, srv_conn *c, srv_conn_state st, double now)
{
    if (!c)
        return;
    pthread_mutex_lock(&g->mu);
    if (!c->closing) {
        unlink_conn(g, c);
        c->state = st;
        c->since = now;
        append_conn(g, c);
    }
    pthread_mutex_unlock(&g->mu);
}

srv_close_reason srv_guard_reason(srv_guard *g, srv_conn *c)
{
    if (!c)
        return SRV_CLOSE_NONE;
    pthread_mutex_lock(&g->mu);
    srv_close_reason why = c->why;
    pthread_mutex_unlock(&g->mu);
    return why;
}

void srv_guard_close(srv_guard *g, srv_conn *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&g->mu);
    unlink_conn(g, c);
    g->open--;
    if (c->closing)
        g->closing--;
    pthread_mutex_unlock(&g->mu);
    free(c);
}

/* A client that shut down its sending side with its request head or body unfinished will
 * never finish it; libmicrohttpd keeps such a connection until its idle timeout. Under
 * g->mu. */
static void close_half_closed(srv_guard *g)
{
    struct pollfd fds[PROBE_MAX];
    srv_conn *conns[PROBE_MAX];
    int n = 0;
    for (conn_list *l = &g->heads; l; l = l == &g->heads ? &g->bodies : NULL)
        for (srv_conn *c = l->first; c && n < PROBE_MAX; c = c->next) {
            fds[n] = (struct pollfd){.fd = c->fd, .events = POLLRDHUP};
            conns[n++] = c;
        }
    if (n == 0 || poll(fds, (nfds_t)n, 0) <= 0)
        return;
    for (int i = 0; i < n; i++) {
        int unread = 0;
        /* bytes still unread may complete the request: libmicrohttpd reads them first */
        if ((fds[i].revents & (POLLRDHUP | POLLHUP)) && ioctl(fds[i].fd, FIONREAD, &unread) == 0 && unread == 0)
            shut(g, conns[i], SRV_CLOSE_HALF_CLOSED);
    }
}

void srv_guard_tick(srv_guard *g, double now)
{
    pthread_mutex_lock(&g->mu);
    close_half_closed(g);
    /* each list is in order of entry, so the expired ones are at its front */
    while (g->heads.first && g->cfg.header_timeout_s > 0 && now - g->heads.first->since > g->cfg.header_timeout_s)
        shut(g, g->heads.first, SRV_CLOSE_HEADER_TIMEOUT);
    while (g->bodies.first && g->cfg.body_timeout_s > 0 && now - g->bodies.first->since > g->cfg.body_timeout_s)
        shut(g, g->bodies.first, SRV_CLOSE_BODY_TIMEOUT);
    /* at the limit libmicrohttpd stops accepting and new clients wait in the kernel's
     * backlog, where no open would trigger an eviction: make room here too */
    evict_if_full(g, now);
    pthread_mutex_unlock(&g->mu);
}

void srv_guard_get_stats(srv_guard *g, srv_guard_stats *out)
{
    pthread_mutex_lock(&g->mu);
    *out = g->stats;
    out->open = g->open;
    pthread_mutex_unlock(&g->mu);
}

/* ---- refused requests per address ---------------------------------------------------- */

/* the bucket of addr, refilled to now; a new one starts full. Where every slot near the
 * address's is taken, the fullest (the least suspicious) is given to it. Under g->mu. */
static bucket *bucket_of(srv_guard *g, const char *addr, double now)
{
    double cap = g->cfg.refused_per_min, rate = cap / 60.0;
    uint32_t h = (uint32_t)zse_hash64(addr, strlen(addr)) & (BUCKET_SLOTS - 1);
    bucket *victim = NULL;
    double victim_tokens = -1;
    for (int i = 0; i < BUCKET_PROBE; i++) {
        bucket *b = &g->buckets[(h + (uint32_t)i) & (BUCKET_SLOTS - 1)];
        double tokens = b->tokens + (now - b->last) * rate;
        if (tokens > cap)
            tokens = cap;
        if (b->addr[0] && strcmp(b->addr, addr) == 0) {
            b->tokens = tokens;
            b->last = now;
            return b;
        }
        if (!b->addr[0])
            tokens = cap + 1; /* a free slot beats any taken one */
        if (tokens > victim_tokens) {
            victim = b;
            victim_tokens = tokens;
        }
    }
    snprintf(victim->addr, sizeof victim->addr, "%s", addr);
    victim->tokens = cap;
    victim->last = now;
    return victim;
}

bool srv_guard_refuse(srv_guard *g, const char *addr, double now)
{
    if (!g->buckets)
        return true;
    pthread_mutex_lock(&g->mu);
    bucket *b = bucket_of(g, addr, now);
    bool answer = b->tokens >= 1;
    if (answer)
        b->tokens -= 1;
    else
        g->stats.refused_unanswered++;
    pthread_mutex_unlock(&g->mu);
    return answer;
}
