/* The HTTP server: libmicrohttpd with its own thread pool polling sockets (epoll), so a
 * connection holds a thread only while bytes move. Those threads do only what is quick:
 * parse the HTTP head, route, check the key, buffer the body, answer /health, /metrics and
 * /v1/models, and turn a running stream's events into bytes. Everything slow — the JSON
 * body, the chat template, tokenization, building a whole answer — runs on the server's
 * worker threads (work.c) while the connection is suspended, so no request body can
 * starve /health. Generation never blocks a thread either: a connection waits suspended
 * until the engine has something for it (job.c), and sequences reach the engine through
 * the fair admission queue (admit.c).
 *
 * libmicrohttpd 0.9.75 is lenient where request smuggling lives and has only an idle
 * timeout, so http_head.c adds, on the first call for each request (the head is complete,
 * no body byte is stored yet):
 *  - RFC 9112 framing: two Content-Length headers, Content-Length with Transfer-Encoding,
 *    a transfer coding other than chunked, or HTTP/1.1 without Host end in 400/501 and a
 *    closed connection;
 *  - route, method and API key: 404/405/401 at once, before the body is read;
 *  - --max-body and the cap on body bytes held across all connections (--max-buffered);
 * and the connection guard (guard.c) adds deadlines for a whole request head and body,
 * eviction of idle heads when the table fills, and a per-address budget for refused
 * requests. Refused requests are counted per address and minute in the audit log instead
 * of taking a row each.
 *
 * Every request ends in request_completed(): metrics, one log line, one audit row.
 *
 * This file is the daemon's life, its connections and the entry and end of every request;
 * http_internal.h lists the files that do the stages in between. */
#include "server/http_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define GRAMMAR_CACHE_ENTRIES 64 /* compiled constraints kept for requests of the same shape */
#define WATCH_INTERVAL_S 0.1
#define BYTES_PER_TOKEN_MARGIN 4        /* normalizers may shrink text (NFC composes up to 3:1) */

/* ---- small helpers ------------------------------------------------------------------- */

static double unix_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sockaddr_text(const struct sockaddr *sa, char *out, size_t cap)
{
    snprintf(out, cap, "?");
    if (!sa)
        return;
    if (sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, out, (socklen_t)cap);
    else if (sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, out, (socklen_t)cap);
}

static void client_address(struct MHD_Connection *c, char *out, size_t cap)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    sockaddr_text(ci ? ci->client_addr : NULL, out, cap);
}

static srv_conn *guard_entry(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

/* ---- the watcher: deadlines, and clients that hang up while suspended ------------------ */

static bool peer_hung_up(void *arg)
{
    http_req *r = arg;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci)
        return false;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

/* the client left: its waiting sequences leave the queue, its running ones are cancelled */
static void abandon(srv_server *s, srv_job *j)
{
    srv_admit_forget(s->admit, j);
    srv_job_abandon(j, &s->engine);
}

static void *watcher_main(void *arg)
{
    srv_server *s = arg;
    while (!atomic_load(&s->stopping)) {
        srv_guard_tick(s->guard, zse_now());
        srv_job *gone[64];
        int n = 0;
        pthread_mutex_lock(&s->mu);
        for (http_req *r = s->active; r && n < 64; r = r->next)
            if (r->job && srv_job_probe_waiting(r->job, peer_hung_up, r)) {
                srv_job_ref(r->job);
                gone[n++] = r->job;
            }
        pthread_mutex_unlock(&s->mu);
        for (int i = 0; i < n; i++) {
            abandon(s, gone[i]);
            srv_job_unref(gone[i]);
        }
        struct timespec ts = {0, (long)(WATCH_INTERVAL_S * 1e9)};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

void http_list_add(srv_server *s, http_req *r)
{
    pthread_mutex_lock(&s->mu);
    r->next = s->active;
    r->prev = NULL;
    if (s->active)
        s->active->prev = r;
    s->active = r;
    r->listed = true;
    s->n_active++;
    pthread_mutex_unlock(&s->mu);
}

static void list_remove(srv_server *s, http_req *r)
{
    pthread_mutex_lock(&s->mu);
    if (r->listed) {
        if (r->prev)
            r->prev->next = r->next;
        else
            s->active = r->next;
        if (r->next)
            r->next->prev = r->prev;
        r->listed = false;
        if (--s->n_active == 0)
            pthread_cond_broadcast(&s->idle);
    }
    pthread_mutex_unlock(&s->mu);
}


/* ---- the access handler: every call for a request enters here ----------------------- */

static http_req *new_request(srv_server *s, struct MHD_Connection *conn, const char *url, const char *method)
{
    http_req *r = zse_calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->s = s;
    r->conn = conn;
    r->guarded = guard_entry(conn);
    r->t_start = zse_now();
    r->t_unix = unix_now();
    r->route = http_route_of(url);
    if (r->route == SRV_ROUTE_TGI_COMPAT && (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0))
        r->route = SRV_ROUTE_DASHBOARD; /* GET / is the dashboard; POST / stays TGI's compat route */
    snprintf(r->method, sizeof r->method, "%s", method);
    snprintf(r->path, sizeof r->path, "%s", url);
    client_address(conn, r->client, sizeof r->client);
    return r;
}

static enum MHD_Result access_handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                      const char *version, const char *upload_data, size_t *upload_data_size,
                                      void **con_cls)
{
    srv_server *s = cls;
    http_req *r = *con_cls;
    if (!r) {
        if (!(r = new_request(s, conn, url, method)))
            return MHD_NO;
        *con_cls = r;
        enum MHD_Result rc = http_first_call(r, url, version);
        if (r->responded) /* answered early: the body is discarded, the deadlines no longer apply */
            srv_guard_set_state(s->guard, r->guarded, SRV_CONN_BUSY, zse_now());
        return rc;
    }
    if (*upload_data_size) {
        http_take_body(r, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (r->responded)
        return MHD_YES;
    return http_last_call(r, url);
}

/* ---- connections --------------------------------------------------------------------- */

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
    srv_server *s = cls;
    if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        srv_guard_close(s->guard, *socket_context);
        *socket_context = NULL;
        return;
    }
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    char addr[64];
    client_address(conn, addr, sizeof addr);
    *socket_context = ci ? srv_guard_open(s->guard, ci->connect_fd, addr, zse_now()) : NULL;
    if (!*socket_context && ci)
        shutdown(ci->connect_fd, SHUT_RDWR); /* cannot be watched: not kept (out of memory) */
}

/* ---- the end of every request -------------------------------------------------------- */

static void record(http_req *r, enum MHD_RequestTerminationCode toe)
{
    srv_server *s = r->s;
    srv_job_usage u = {0};
    u.ttft = -1;
    u.prompt_tokens = r->aux_tokens;
    if (r->job)
        srv_job_get_usage(r->job, &u);
    /* a client that left before its answer is logged as 499, as nginx does; a body that
     * did not arrive in time as 408 */
    int status = r->responded || r->refused ? r->status : 499;
    if (!r->responded && srv_guard_reason(s->guard, r->guarded) == SRV_CLOSE_BODY_TIMEOUT)
        status = 408;
    if (r->job && (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK || srv_job_gone(r->job)))
        status = 499;
    double latency_ms = (zse_now() - r->t_start) * 1000;
    srv_metrics_request(s->metrics, r->route, status);
    if (r->job) {
        srv_metrics_tokens(s->metrics, u.prompt_tokens, u.completion_tokens);
        if (u.ttft >= 0)
            srv_metrics_ttft(s->metrics, u.ttft);
        for (int i = 0; i < u.n_tpot; i++)
            srv_metrics_tpot(s->metrics, u.tpot[i]);
    }
    /* the path as the client sent it may hold CR/LF, ESC or invalid UTF-8 */
    char path[sizeof r->path * 4];
    srv_text_clean(path, sizeof path, r->path, strlen(r->path), SRV_TEXT_ESCAPE_CONTROLS);
    char method[sizeof r->method * 4];
    srv_text_clean(method, sizeof method, r->method, strlen(r->method), SRV_TEXT_ESCAPE_CONTROLS);
    const char *id = r->job ? srv_job_id(r->job) : "-";
    /* OpenAI's "user": the client's id of its end user, for telling abuse apart (cleaned: it is
     * client text) */
    const char *end_user = r->job && srv_job_user(r->job) ? srv_job_user(r->job) : r->user;
    char user[sizeof r->user * 4];
    srv_text_clean(user, sizeof user, end_user, strlen(end_user), SRV_TEXT_ESCAPE_CONTROLS);
    /* refusals past their address's budget are not logged one by one either: a flood would
     * turn into as many log lines (they are counted in the metrics and the audit) */
    if (s->cfg.log_requests && !(r->refused && !r->responded))
        zse_log(ZSE_LOG_INFO,
                "request id=%s method=%s path=%s status=%d latency_ms=%.1f prompt_tokens=%d completion_tokens=%d "
                "ttft_ms=%.1f key=%s client=%s user=%s",
                id, method, path, status, latency_ms, u.prompt_tokens, u.completion_tokens,
                u.ttft >= 0 ? u.ttft * 1000 : -1.0, r->key[0] ? r->key : "-", r->client, user[0] ? user : "-");
    /* the dashboard's static files are not audited either: a page load would be rows of noise */
    if (!s->cfg.audit || r->route == SRV_ROUTE_HEALTH || r->route == SRV_ROUTE_METRICS ||
        (r->route == SRV_ROUTE_DASHBOARD && !r->refused))
        return;
    if (r->refused) {
        srv_audit_refused(s->cfg.audit, r->t_unix, r->client, status, path);
        return;
    }
    srv_audit_row row;
    memset(&row, 0, sizeof row);
    row.time = r->t_unix;
    memcpy(row.key, r->key, sizeof row.key);
    srv_text_clean(row.method, sizeof row.method, method, strlen(method), 0);
    srv_text_clean(row.route, sizeof row.route, path, strlen(path), 0);
    row.status = status;
    row.latency_ms = latency_ms;
    row.prompt_tokens = u.prompt_tokens;
    row.completion_tokens = u.completion_tokens;
    snprintf(row.client, sizeof row.client, "%s", r->client);
    snprintf(row.request_id, sizeof row.request_id, "%s", r->job ? id : "");
    srv_audit_log(s->cfg.audit, &row);
}

static void request_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                              enum MHD_RequestTerminationCode toe)
{
    srv_server *s = cls;
    http_req *r = *con_cls;
    if (!r)
        return;
    *con_cls = NULL;
    if (r->job && toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
        abandon(s, r->job); /* the client left: free its sequences now */
    record(r, toe);
    list_remove(s, r);
    srv_job_unref(r->job);
    http_release_body(s, r);
    zse_buf_free(&r->reply);
    free(r);
    /* a kept-alive connection waits for its next request head */
    srv_guard_set_state(s->guard, guard_entry(conn), SRV_CONN_HEAD, zse_now());
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char line[512], clean[1024];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    srv_text_clean(clean, sizeof clean, line, n, SRV_TEXT_ESCAPE_CONTROLS);
    zse_log(ZSE_LOG_DEBUG, "http: %s", clean);
}

/* ---- life ---------------------------------------------------------------------------- */

void srv_config_default(srv_config *c)
{
    memset(c, 0, sizeof *c);
    c->host = "127.0.0.1";
    c->port = 8000;
    c->listen = true;
    c->max_body = 4u << 20;
    c->max_buffered = 256u << 20;
    c->max_connections = 1024;
    c->max_connections_per_ip = 128;
    c->timeout_s = 60;
    c->header_timeout_s = 30;
    c->body_timeout_s = 60;
    c->refused_per_min = 600;
    c->http_threads = 4;
    c->workers = 2;
    c->engine_slots = 16;
    c->max_waiting = 256;
    c->model_id = "model";
    c->log_requests = true;
    c->tool_parser = -1;
    c->pooling = ZSE_POOL_LAST;
}

static int resolve(const char *host, int port, struct sockaddr_storage *ss)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(host, ps, &hints, &res);
    if (rc != 0 || !res)
        return zse_fail("cannot resolve --host %s: %s", host, gai_strerror(rc));
    memset(ss, 0, sizeof *ss);
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    return 0;
}

static void free_server(srv_server *s)
{
    srv_work_free(s->work);
    srv_admit_stop(s->admit);
    srv_guard_free(s->guard);
    srv_metrics_free(s->metrics);
    srv_db_close(s->admin_db);
    srv_grammar_cache_free(s->grammars); /* before the model, which its constraints use */
    free(s->host);
    free(s->cors);
    free(s->model_id);
    free(s->tls_cert_pem);
    free(s->tls_key_pem);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->idle);
    free(s);
}

static int load_tls(srv_server *s, const srv_config *c)
{
    if (!c->tls_cert && !c->tls_key)
        return 0;
    if (!c->tls_cert || !c->tls_key)
        return zse_fail("TLS needs both --tls-cert and --tls-key");
    if (!(s->tls_cert_pem = zse_read_file(c->tls_cert, NULL)) || !(s->tls_key_pem = zse_read_file(c->tls_key, NULL)))
        return -1;
    return 0;
}

/* the guard, the workers and the admission queue */
static int start_parts(srv_server *s)
{
    const srv_config *c = &s->cfg;
    srv_guard_config gc = {c->max_connections, c->header_timeout_s, c->body_timeout_s, c->refused_per_min};
    int slots = c->engine_slots > 0 ? c->engine_slots : 1;
    int reserve = slots / 8 > 1 ? slots / 8 : 1;
    int per_key = c->max_seqs_per_key > 0 ? c->max_seqs_per_key : slots > reserve ? slots - reserve : 1;
    /* the engine's slots and its queue (as long as --max-queue): it shares them between
     * tenants itself, so each gets what it may there at once */
    int in_engine = slots + (c->max_waiting > 0 ? c->max_waiting : 1);
    srv_admit_config ac = {in_engine, per_key, c->max_queued_tokens_per_key, c->max_waiting};
    if (!(s->guard = srv_guard_new(&gc)) || !(s->work = srv_work_start(c->workers, c->workers > 1 ? c->workers / 2 : 1, 5)) ||
        !(s->admit = srv_admit_start(&ac)))
        return -1;
    return 0;
}

static struct MHD_Daemon *start_daemon(srv_server *s, const struct sockaddr_storage *ss)
{
    const srv_config *c = &s->cfg;
    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG | MHD_USE_ITC;
    if (!c->listen)
        flags |= MHD_USE_NO_LISTEN_SOCKET;
    else if (ss->ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    if (s->tls_cert_pem)
        flags |= MHD_USE_TLS;
    struct MHD_OptionItem tls_opts[] = {
        {MHD_OPTION_HTTPS_MEM_CERT, 0, s->tls_cert_pem},
        {MHD_OPTION_HTTPS_MEM_KEY, 0, s->tls_key_pem},
        {MHD_OPTION_END, 0, NULL},
    };
    struct MHD_OptionItem no_opts[] = {{MHD_OPTION_END, 0, NULL}};
    struct MHD_OptionItem listen_opts[] = {
        {MHD_OPTION_SOCK_ADDR, 0, (void *)ss},
        {MHD_OPTION_END, 0, NULL},
    };
    /* one thread is the daemon's own (libmicrohttpd warns about a pool of one) */
    struct MHD_OptionItem pool_opts[] = {
        {c->http_threads > 1 ? MHD_OPTION_THREAD_POOL_SIZE : MHD_OPTION_END, c->http_threads, NULL},
        {MHD_OPTION_END, 0, NULL},
    };
    /* no MHD_OPTION_LISTENING_ADDRESS_REUSE: set to 1 it means SO_REUSEPORT, and a second
     * server on the same port would start and silently share its connections; the default
     * (SO_REUSEADDR only) still allows a restart while old connections sit in TIME_WAIT */
    return MHD_start_daemon(
        flags, 0, NULL, NULL, access_handler, s, MHD_OPTION_ARRAY, c->listen ? listen_opts : no_opts,
        MHD_OPTION_ARRAY, pool_opts, MHD_OPTION_CONNECTION_LIMIT, (unsigned)c->max_connections,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)(c->max_connections_per_ip > 0 ? c->max_connections_per_ip : 0),
        MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)c->timeout_s, MHD_OPTION_NOTIFY_COMPLETED, request_completed, s, MHD_OPTION_NOTIFY_CONNECTION,
        on_connection, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s, MHD_OPTION_ARRAY,
        s->tls_cert_pem ? tls_opts : no_opts, MHD_OPTION_END);
}

srv_server *srv_start(const srv_config *c)
{
    srv_server *s = zse_calloc(1, sizeof *s);
    if (!s)
        return NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->idle, NULL);
    s->cfg = *c;
    s->started = (long long)time(NULL);
    s->host = zse_strdup(c->host ? c->host : "127.0.0.1");
    s->model_id = zse_strdup(c->model_id ? c->model_id : "model");
    s->cors = c->cors_origin ? zse_strdup(c->cors_origin) : NULL;
    s->metrics = srv_metrics_new();
    if (!s->host || !s->model_id || (c->cors_origin && !s->cors) || !s->metrics || load_tls(s, c) != 0 ||
        start_parts(s) != 0) {
        free_server(s);
        return NULL;
    }
    s->cfg.host = s->host;
    s->cfg.cors_origin = s->cors;
    s->facts.name = s->model_id;
    s->facts.aliases = c->aliases;
    s->facts.n_aliases = c->n_aliases;
    if (c->auth && !c->keyring) {
        zse_fail("--auth needs the key database");
        free_server(s);
        return NULL;
    }
    /* the dashboard's admin routes use a connection of their own to the file the audit
     * writer opened (and checked) already */
    if (c->auth && c->db_path && !(s->admin_db = srv_db_open_shared(c->db_path))) {
        free_server(s);
        return NULL;
    }
    struct sockaddr_storage ss;
    if (c->listen && resolve(s->host, c->port, &ss) != 0) {
        free_server(s);
        return NULL;
    }
    if (!(s->daemon = start_daemon(s, &ss))) {
        zse_fail("cannot listen on %s:%d (in use, or not an address of this machine?)", s->host, c->port);
        free_server(s);
        return NULL;
    }
    const union MHD_DaemonInfo *di = c->listen ? MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT) : NULL;
    s->port = di ? di->port : c->port;
    int rc = pthread_create(&s->watcher, NULL, watcher_main, s);
    if (rc != 0) {
        zse_fail("cannot start the connection watcher: %s", strerror(rc));
        MHD_stop_daemon(s->daemon);
        free_server(s);
        return NULL;
    }
    s->watcher_started = true;
    return s;
}

int srv_port(const srv_server *s) { return s->port; }

int srv_adopt_connection(srv_server *s, int fd, const struct sockaddr *addr, socklen_t len)
{
    return MHD_add_connection(s->daemon, fd, addr, len) == MHD_YES ? 0 : zse_fail("the connection was refused");
}

/* the longest text one token stands for: a prompt of more bytes than the context times
 * this (with a margin for normalizers) cannot fit, and is refused before tokenizing */
static size_t longest_token_bytes(const zse_model *m, int vocab)
{
    size_t longest = 1;
    for (int32_t id = 0; id < vocab; id++) {
        char *t = zse_detokenize(m, &id, 1, false);
        if (t && strlen(t) > longest)
            longest = strlen(t);
        free(t);
    }
    return longest;
}

void srv_set_ready(srv_server *s, zse_model *m, const srv_engine *engine)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    s->model = m;
    s->engine = *engine;
    /* without it (out of memory) every request compiles its own */
    s->grammars = srv_grammar_cache_new(GRAMMAR_CACHE_ENTRIES);
    s->facts.vocab_size = info.vocab_size;
    s->facts.ctx_size = info.ctx_size;
    zse_adapter_stats ast;
    zse_adapter_get_stats(m, &ast);
    s->facts.adapters = ast.slots > 0;
    size_t longest = longest_token_bytes(m, info.vocab_size);
    s->facts.max_prompt_bytes = (size_t)info.ctx_size * longest * BYTES_PER_TOKEN_MARGIN;
    snprintf(s->fingerprint, sizeof s->fingerprint, "fp_zse_%s_%s", zse_version(), info.quant ? info.quant : "");
    /* by default a tenant may have as many tokens waiting as the engine's slots hold */
    srv_admit_set_engine(s->admit, engine, (int64_t)s->cfg.engine_slots * info.ctx_size);
    atomic_store(&s->state, STATE_READY);
}

void srv_drain(srv_server *s)
{
    atomic_store(&s->state, STATE_DRAINING);
    /* stops accepting; connections already open are answered (503 for new requests) */
    MHD_socket fd = MHD_quiesce_daemon(s->daemon);
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
}

int srv_active_requests(srv_server *s)
{
    pthread_mutex_lock(&s->mu);
    int n = s->n_active;
    pthread_mutex_unlock(&s->mu);
    return n;
}

bool srv_wait_idle(srv_server *s, double timeout_s)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    long ns = dl.tv_nsec + (long)((timeout_s - (long)timeout_s) * 1e9);
    dl.tv_sec += (time_t)timeout_s + ns / 1000000000L;
    dl.tv_nsec = ns % 1000000000L;
    pthread_mutex_lock(&s->mu);
    while (s->n_active > 0)
        if (pthread_cond_timedwait(&s->idle, &s->mu, &dl) == ETIMEDOUT)
            break;
    bool idle = s->n_active == 0;
    pthread_mutex_unlock(&s->mu);
    return idle;
}

void srv_stop(srv_server *s)
{
    if (!s)
        return;
    atomic_store(&s->stopping, true);
    if (s->watcher_started)
        pthread_join(s->watcher, NULL);
    /* preparations finish and resume their connections before the daemon closes them */
    srv_work_stop(s->work);
    MHD_stop_daemon(s->daemon);
    free_server(s);
}
