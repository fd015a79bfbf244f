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
 * timeout, so this file adds, on the first call for each request (the head is complete,
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
 * Every request ends in request_completed(): metrics, one log line, one audit row. */
#include "server/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define GRAMMAR_CACHE_ENTRIES 64 /* compiled constraints kept for requests of the same shape */
#define LOADING_RETRY_AFTER_S 5
#define WATCH_INTERVAL_S 0.1
#define STREAM_BLOCK 16384
#define BODY_RESERVE_STEP (64 * 1024)   /* chunked bodies reserve buffer budget in steps */
#define BYTES_PER_TOKEN_MARGIN 4        /* normalizers may shrink text (NFC composes up to 3:1) */
#define HEAVY_BODY (64 * 1024)          /* bodies from this size are prepared by the heavy lane's threads */

enum { STATE_LOADING, STATE_READY, STATE_DRAINING };

/* where a request is: reading its body, being prepared on a worker, admitted (streaming or
 * waiting for the whole answer), or with the whole answer built */
typedef enum { PH_RECEIVING, PH_PREPARING, PH_ADMITTED, PH_RENDERING, PH_RENDERED, PH_AUX_DONE } phase;

typedef struct http_req http_req;

struct srv_server {
    srv_config cfg;
    char *host, *cors, *model_id;
    char *tls_cert_pem, *tls_key_pem;
    struct MHD_Daemon *daemon;
    int port;
    atomic_int state;
    zse_model *model;
    srv_engine engine;
    srv_model_facts facts;
    srv_grammar_cache *grammars;    /* compiled constraints by request shape (structured.c) */
    char fingerprint[64];
    long long started;
    srv_metrics *metrics;
    srv_guard *guard;
    srv_work *work;
    srv_admit *admit;
    atomic_size_t buffered;         /* request body bytes reserved across connections */
    /* requests past their body (preparing or holding a job), for the watcher and shutdown */
    pthread_mutex_t mu;
    pthread_cond_t idle;
    http_req *active;
    int n_active;
    pthread_t watcher;
    bool watcher_started;
    atomic_bool stopping;
    srv_db *admin_db;               /* the key database for the /admin routes (with --auth) */
};

struct http_req {
    srv_server *s;
    struct MHD_Connection *conn;
    srv_conn *guarded;              /* the connection's entry in the guard (NULL if none) */
    http_req *prev, *next;          /* in s->active from its preparation on */
    bool listed;
    srv_route route;
    phase ph;
    char method[8];
    char path[64];
    char client[64];
    char user[128];                 /* the OpenAI "user" of an embeddings request (the log line) */
    double t_start;                 /* monotonic */
    double t_unix;
    zse_buf body;
    size_t reserved;                /* of s->buffered */
    bool too_large;
    bool over_buffer;               /* the server-wide body budget ran out mid-body */
    bool refused;                   /* answered before reaching the API: counted, not a row */
    bool responded;
    int status;
    char key[SRV_KEY_NAME_MAX + 1];
    int key_priority;               /* the most urgent priority this client may ask for */
    bool has_rate;
    srv_rate rate;
    srv_error error;                /* a preparation that failed */
    bool failed;
    srv_job *job;
    zse_buf reply;                  /* a whole answer, built on a worker */
    int reply_status, reply_retry;
    srv_admin_call admin;           /* what an /admin route asks for */
    int aux_tokens;                 /* the tokens a route without a job used (embeddings) */
};

/* ---- small helpers ------------------------------------------------------------------- */

static double unix_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* vLLM's tokenizer routes, TGI's /info, OpenAI's embeddings */
static srv_route route_of_extra(const char *url)
{
    if (strcmp(url, "/tokenize") == 0)
        return SRV_ROUTE_TOKENIZE;
    if (strcmp(url, "/detokenize") == 0)
        return SRV_ROUTE_DETOKENIZE;
    if (strcmp(url, "/tokenizer_info") == 0)
        return SRV_ROUTE_TOKENIZER_INFO;
    if (strcmp(url, "/info") == 0)
        return SRV_ROUTE_INFO;
    if (strcmp(url, "/v1/embeddings") == 0)
        return SRV_ROUTE_EMBEDDINGS;
    return SRV_ROUTE_OTHER;
}

static srv_route route_of(const char *url)
{
    if (strcmp(url, "/v1/chat/completions") == 0)
        return SRV_ROUTE_CHAT;
    if (strcmp(url, "/v1/completions") == 0)
        return SRV_ROUTE_COMPLETIONS;
    if (strcmp(url, "/v1/models") == 0 || strncmp(url, "/v1/models/", 11) == 0)
        return SRV_ROUTE_MODELS;
    if (strcmp(url, "/generate") == 0)
        return SRV_ROUTE_GENERATE;
    if (strcmp(url, "/generate_stream") == 0)
        return SRV_ROUTE_GENERATE_STREAM;
    if (strcmp(url, "/health") == 0)
        return SRV_ROUTE_HEALTH;
    if (strcmp(url, "/metrics") == 0)
        return SRV_ROUTE_METRICS;
    if (strcmp(url, "/") == 0) /* TGI's and LoRAX's compat route: /generate(_stream) by "stream" */
        return SRV_ROUTE_TGI_COMPAT;
    if (strcmp(url, "/v1/load_lora_adapter") == 0)
        return SRV_ROUTE_LORA_LOAD;
    if (strcmp(url, "/v1/unload_lora_adapter") == 0)
        return SRV_ROUTE_LORA_UNLOAD;
    if (strcmp(url, "/ui/session") == 0)
        return SRV_ROUTE_UI_SESSION;
    if (strncmp(url, "/ui/", 4) == 0) /* the dashboard's files (GET / is the page: new_request) */
        return SRV_ROUTE_DASHBOARD;
    if (strncmp(url, "/admin/", 7) == 0)
        return SRV_ROUTE_ADMIN;
    return route_of_extra(url);
}

static bool route_is_post(srv_route r)
{
    return r == SRV_ROUTE_CHAT || r == SRV_ROUTE_COMPLETIONS || r == SRV_ROUTE_GENERATE ||
           r == SRV_ROUTE_GENERATE_STREAM || r == SRV_ROUTE_LORA_LOAD || r == SRV_ROUTE_LORA_UNLOAD ||
           r == SRV_ROUTE_TGI_COMPAT || r == SRV_ROUTE_TOKENIZE || r == SRV_ROUTE_DETOKENIZE ||
           r == SRV_ROUTE_EMBEDDINGS;
}

static bool route_is_tgi(srv_route r)
{
    return r == SRV_ROUTE_GENERATE || r == SRV_ROUTE_GENERATE_STREAM || r == SRV_ROUTE_TGI_COMPAT ||
           r == SRV_ROUTE_INFO;
}

static bool route_needs_key(srv_route r)
{
    return route_is_post(r) || r == SRV_ROUTE_MODELS || r == SRV_ROUTE_UI_SESSION || r == SRV_ROUTE_ADMIN ||
           r == SRV_ROUTE_TOKENIZER_INFO || r == SRV_ROUTE_INFO;
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

/* ---- the server-wide body budget ----------------------------------------------------- */

static bool reserve_body(srv_server *s, http_req *r, size_t n)
{
    size_t cur = atomic_load(&s->buffered);
    do {
        if (cur + n > s->cfg.max_buffered)
            return false;
    } while (!atomic_compare_exchange_weak(&s->buffered, &cur, cur + n));
    r->reserved += n;
    return true;
}

static void release_body(srv_server *s, http_req *r)
{
    zse_buf_free(&r->body);
    atomic_fetch_sub(&s->buffered, r->reserved);
    r->reserved = 0;
}

/* ---- responses ----------------------------------------------------------------------- */

static void add_common_headers(http_req *r, struct MHD_Response *resp)
{
    srv_server *s = r->s;
    if (s->cors) {
        MHD_add_response_header(resp, "Access-Control-Allow-Origin", s->cors);
        MHD_add_response_header(resp, "Access-Control-Allow-Headers", "Authorization, Content-Type");
        MHD_add_response_header(resp, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        MHD_add_response_header(resp, "Access-Control-Max-Age", "600");
    }
    if (r->has_rate) {
        char v[32];
        snprintf(v, sizeof v, "%d", r->rate.limit);
        MHD_add_response_header(resp, "X-RateLimit-Limit", v);
        snprintf(v, sizeof v, "%d", r->rate.remaining);
        MHD_add_response_header(resp, "X-RateLimit-Remaining", v);
        snprintf(v, sizeof v, "%d", r->rate.reset_s);
        MHD_add_response_header(resp, "X-RateLimit-Reset", v);
    }
    if (r->job)
        MHD_add_response_header(resp, "X-Request-Id", srv_job_id(r->job));
}

static enum MHD_Result queue(http_req *r, int status, struct MHD_Response *resp)
{
    if (!resp)
        return MHD_NO; /* out of memory: libmicrohttpd closes the connection */
    add_common_headers(r, resp);
    enum MHD_Result rc = MHD_queue_response(r->conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    r->responded = true;
    r->status = status;
    return rc;
}

static struct MHD_Response *text_response(const char *content_type, const char *body, size_t len, int retry_after)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return NULL;
    MHD_add_response_header(resp, "Content-Type", content_type);
    if (retry_after > 0) {
        char v[16];
        snprintf(v, sizeof v, "%d", retry_after);
        MHD_add_response_header(resp, "Retry-After", v);
    }
    return resp;
}

static enum MHD_Result respond(http_req *r, int status, const char *content_type, const char *body, size_t len,
                               int retry_after)
{
    return queue(r, status, text_response(content_type, body, len, retry_after));
}

static enum MHD_Result respond_json(http_req *r, int status, json_t *obj)
{
    char *s = obj ? json_dumps(obj, JSON_COMPACT) : NULL;
    json_decref(obj);
    if (!s)
        return MHD_NO;
    enum MHD_Result rc = respond(r, status, "application/json", s, strlen(s), 0);
    free(s);
    return rc;
}

/* the error in the route's shape; `allow` adds an Allow header (405), `close` a
 * Connection: close (answers given before the body was read) */
static enum MHD_Result respond_error_with(http_req *r, const srv_error *e, const char *allow, bool close)
{
    char *s = route_is_tgi(r->route) ? srv_error_tgi_json(e) : srv_error_openai_json(e);
    if (!s)
        return MHD_NO;
    struct MHD_Response *resp = text_response("application/json", s, strlen(s), e->retry_after);
    free(s);
    if (resp && allow)
        MHD_add_response_header(resp, "Allow", allow);
    if (resp && close)
        MHD_add_response_header(resp, "Connection", "close");
    return queue(r, e->status, resp);
}

static enum MHD_Result respond_error(http_req *r, const srv_error *e)
{
    return respond_error_with(r, e, NULL, false);
}

static enum MHD_Result fail(http_req *r, int status, const char *type, const char *code, const char *message)
{
    srv_error e;
    srv_error_set(&e, status, type, code, NULL, "%s", message);
    if (status == 503)
        e.retry_after = LOADING_RETRY_AFTER_S;
    return respond_error(r, &e);
}

/* A refusal before the API: answered at once and the connection closed, unless the
 * client's address has used up its refusals for now; then it gets nothing. */
static enum MHD_Result refuse(http_req *r, const srv_error *e, const char *allow)
{
    r->refused = true;
    r->status = e->status;
    if (!srv_guard_refuse(r->s->guard, r->client, zse_now()))
        return MHD_NO;
    return respond_error_with(r, e, allow, true);
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

static void list_add(srv_server *s, http_req *r)
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

/* ---- generation: preparation on a worker ---------------------------------------------- */

static void suspend_connection(void *arg)
{
    MHD_suspend_connection(arg);
}

static void resume_connection(void *arg)
{
    MHD_resume_connection(arg);
}

static srv_api api_of(srv_route route)
{
    return route == SRV_ROUTE_CHAT ? SRV_API_CHAT : route == SRV_ROUTE_COMPLETIONS ? SRV_API_COMPLETION : SRV_API_TGI;
}

/* the key's name, or the client's address when keys are off: whose share a request uses */
static void tenant_of(const http_req *r, char *out, size_t cap)
{
    if (r->key[0])
        snprintf(out, cap, "key '%s'", r->key);
    else
        snprintf(out, cap, "client %s", r->client);
}

/* a request's `priority` may be what its key allows or less urgent (a larger number) */
static int check_priority(http_req *r, srv_request *req, srv_error *e)
{
    if (!req->has_priority) {
        req->priority = r->key_priority;
        return 0;
    }
    if (req->priority >= r->key_priority)
        return 0;
    if (r->key[0])
        return srv_error_invalid(e, "priority",
                                 "'priority' %d is more urgent than key '%s' may ask for (%d or more; lower runs "
                                 "first); `zse api-key set-priority` grants more", req->priority, r->key,
                                 r->key_priority);
    return srv_error_invalid(e, "priority",
                             "'priority' %d is more urgent than clients may ask for (0 or more; lower runs first): "
                             "urgent priorities are granted per API key (`zse api-key create NAME --priority P` "
                             "with --auth)", req->priority);
}

/* parse, template, tokenize, check, queue: the request becomes an admitted job or an error */
static int prepare(http_req *r)
{
    srv_server *s = r->s;
    srv_request req;
    srv_error *e = &r->error;
    int rc = srv_request_parse(api_of(r->route), r->body.data ? r->body.data : "", r->body.len, &s->facts, &req, e);
    release_body(s, r); /* parsed: the bytes are no longer needed */
    if (rc != 0)
        return -1;
    bool path_stream = r->route == SRV_ROUTE_GENERATE_STREAM;
    if (((r->route == SRV_ROUTE_GENERATE || path_stream) && srv_request_set_stream(&req, path_stream, e) != 0) ||
        check_priority(r, &req, e) != 0 || srv_request_adapter(&req, s->model, &s->facts, e) != 0 ||
        srv_request_prepare(&req, s->model, &s->facts, e) != 0 ||
        srv_structured_prepare(&req, s->model, s->cfg.tool_parser, s->grammars, e) != 0) {
        srv_request_free(&req);
        return -1;
    }
    /* answers name the model asked for: the adapter's name for an adapter's request */
    const char *model_id = req.adapter ? zse_adapter_name(req.adapter) : s->facts.name;
    srv_job *job = srv_job_new(&req, s->model, model_id, s->fingerprint, r->t_start);
    if (!job) {
        srv_request_free(&req);
        return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    }
    char tenant[96];
    tenant_of(r, tenant, sizeof tenant);
    if (srv_admit_enqueue(s->admit, tenant, job, e) != 0) {
        srv_job_unref(job);
        return -1;
    }
    pthread_mutex_lock(&s->mu); /* the watcher reads r->job under it */
    r->job = job;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

static void prepare_task(void *arg)
{
    http_req *r = arg;
    struct MHD_Connection *conn = r->conn;
    r->failed = prepare(r) != 0;
    r->ph = PH_ADMITTED;
    resume_connection(conn); /* the last touch of r on this thread */
}

/* a whole answer is built here, off the HTTP threads (n × logprobs can be megabytes) */
static void render_task(void *arg)
{
    http_req *r = arg;
    struct MHD_Connection *conn = r->conn;
    srv_job_whole(r->job, &r->reply, &r->reply_status, &r->reply_retry);
    r->ph = PH_RENDERED;
    resume_connection(conn);
}

/* the job's waker for whole answers: every sequence ended; runs on the engine's thread
 * under the job's lock, so it only queues the work */
static void whole_ready(void *arg)
{
    http_req *r = arg;
    if (srv_work_push(r->s->work, SRV_WORK_LIGHT, render_task, r) != 0)
        resume_connection(r->conn); /* stopping: the answer is built on the HTTP thread */
}

typedef struct {
    srv_job *job;
    struct MHD_Connection *conn;
    zse_buf buf;
    size_t off;
} stream_ctx;

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    stream_ctx *sc = cls;
    if (sc->off == sc->buf.len) {
        sc->buf.len = sc->off = 0;
        int status;
        srv_pull p = srv_job_pull(sc->job, &sc->buf, &status, suspend_connection, sc->conn);
        if (p == SRV_PULL_WAIT)
            return 0;
        if (p == SRV_PULL_DONE)
            return MHD_CONTENT_READER_END_OF_STREAM;
    }
    size_t n = sc->buf.len - sc->off;
    if (n > max)
        n = max;
    memcpy(buf, sc->buf.data + sc->off, n);
    sc->off += n;
    return (ssize_t)n;
}

static void stream_free(void *cls)
{
    stream_ctx *sc = cls;
    srv_job_unref(sc->job);
    zse_buf_free(&sc->buf);
    free(sc);
}

static enum MHD_Result start_stream(http_req *r)
{
    stream_ctx *sc = zse_calloc(1, sizeof *sc);
    if (!sc)
        return MHD_NO;
    sc->job = r->job;
    sc->conn = r->conn;
    srv_job_ref(r->job);
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, STREAM_BLOCK, stream_read, sc,
                                                                  stream_free);
    if (!resp) {
        stream_free(sc);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", "text/event-stream");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    return queue(r, 200, resp);
}

/* non-streaming, admitted: suspended until every sequence ended, then built on a worker */
static enum MHD_Result wait_whole(http_req *r)
{
    r->ph = PH_RENDERING;
    if (!srv_job_wait_whole(r->job, suspend_connection, r->conn))
        return MHD_YES; /* whole_ready queues the rendering when the last sequence ends */
    suspend_connection(r->conn);
    whole_ready(r);
    return MHD_YES;
}

static enum MHD_Result send_whole(http_req *r)
{
    if (r->ph != PH_RENDERED) /* the workers were stopping: built here */
        srv_job_whole(r->job, &r->reply, &r->reply_status, &r->reply_retry);
    if (r->route == SRV_ROUTE_TGI_COMPAT && r->reply_status == 200) { /* the compat route answers a list of one */
        zse_buf list = {0};
        if (zse_buf_printf(&list, "[%s]", zse_buf_str(&r->reply)) != 0) {
            zse_buf_free(&list);
            return MHD_NO;
        }
        zse_buf_free(&r->reply);
        r->reply = list;
    }
    return respond(r, r->reply_status, "application/json", zse_buf_str(&r->reply), r->reply.len, r->reply_retry);
}

/* the body is in: `task` runs on a worker of `lane` while the connection waits */
static enum MHD_Result start_on_worker(http_req *r, srv_work_lane lane, void (*task)(void *))
{
    srv_server *s = r->s;
    if (r->too_large) {
        srv_error e;
        srv_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                      "the request body is larger than this server's limit of %zu bytes", s->cfg.max_body);
        return respond_error(r, &e);
    }
    if (r->over_buffer)
        return fail(r, 503, "server_error", "overloaded",
                    "the server holds too many request bodies at once; retry shortly");
    r->ph = PH_PREPARING;
    list_add(s, r);
    suspend_connection(r->conn);
    if (srv_work_push(s->work, lane, task, r) != 0) {
        resume_connection(r->conn);
        r->ph = PH_RECEIVING;
        return fail(r, 503, "server_error", "shutting_down", "the server is shutting down");
    }
    return MHD_YES;
}

static enum MHD_Result start_generation(http_req *r)
{
    return start_on_worker(r, r->body.len >= HEAVY_BODY ? SRV_WORK_HEAVY : SRV_WORK_LIGHT, prepare_task);
}

/* resumed after preparation: the error, the stream, or the wait for the whole answer */
static enum MHD_Result continue_generation(http_req *r)
{
    if (r->failed)
        return respond_error(r, &r->error);
    srv_job_set_waker(r->job, srv_job_streaming(r->job) ? resume_connection : whole_ready,
                      srv_job_streaming(r->job) ? (void *)r->conn : (void *)r);
    return srv_job_streaming(r->job) ? start_stream(r) : wait_whole(r);
}

/* ---- the other routes ---------------------------------------------------------------- */

static json_t *model_object(srv_server *s, const char *name)
{
    return json_pack("{s:s, s:s, s:I, s:s, s:i}", "id", name, "object", "model", "created",
                     (json_int_t)s->started, "owned_by", "zse", "max_model_len", s->facts.ctx_size);
}

static enum MHD_Result models(http_req *r, const char *url)
{
    srv_server *s = r->s;
    if (strcmp(url, "/v1/models") == 0) {
        json_t *list = json_pack("{s:s, s:[o]}", "object", "list", "data", model_object(s, s->facts.name));
        for (int i = 0; list && i < s->facts.n_aliases; i++) /* --served-model-name's other names */
            if (strcmp(s->facts.aliases[i], s->facts.name) != 0 &&
                json_array_append_new(json_object_get(list, "data"), model_object(s, s->facts.aliases[i])) != 0) {
                json_decref(list);
                return fail(r, 500, "server_error", NULL, "out of memory listing the models");
            }
        if (list && s->facts.adapters && srv_lora_models(s->model, &s->facts, (long long)s->started,
                                                         json_object_get(list, "data")) != 0) {
            json_decref(list);
            return fail(r, 500, "server_error", NULL, "cannot list the adapters");
        }
        return respond_json(r, 200, list);
    }
    const char *id = url + strlen("/v1/models/");
    if (srv_model_name_is(&s->facts, id))
        return respond_json(r, 200, model_object(s, id));
    json_t *adapter = srv_lora_model(s->model, &s->facts, (long long)s->started, id);
    if (adapter)
        return respond_json(r, 200, adapter);
    srv_error e;
    srv_error_set(&e, 404, "invalid_request_error", "model_not_found", "model",
                  "The model '%s' does not exist; this server serves '%s'", id, s->facts.name);
    return respond_error(r, &e);
}

static enum MHD_Result health(http_req *r)
{
    int st = atomic_load(&r->s->state);
    const char *body = st == STATE_READY ? "{\"status\":\"ok\"}"
                       : st == STATE_LOADING ? "{\"status\":\"loading\"}"
                                             : "{\"status\":\"shutting down\"}";
    return respond(r, st == STATE_READY ? 200 : 503, "application/json", body, strlen(body),
                   st == STATE_READY ? 0 : LOADING_RETRY_AFTER_S);
}

static void live_stats(srv_server *s, zse_engine_stats *st, srv_live_stats *live)
{
    memset(live, 0, sizeof *live);
    live->ready = atomic_load(&s->state) == STATE_READY;
    if (live->ready) {
        s->engine.get_stats(s->engine.ctx, st);
        live->engine = st;
    }
    live->active_requests = srv_active_requests(s);
    live->waiting = srv_admit_waiting(s->admit);
    live->body_bytes = atomic_load(&s->buffered);
    srv_guard_get_stats(s->guard, &live->guard);
    if (s->cfg.audit) {
        live->audit_dropped = srv_audit_dropped(s->cfg.audit);
        live->refused = srv_audit_refused_total(s->cfg.audit);
    }
}

static enum MHD_Result metrics(http_req *r)
{
    srv_server *s = r->s;
    zse_engine_stats st;
    srv_live_stats live;
    live_stats(s, &st, &live);
    zse_mask_stats mask;
    if (live.ready) {
        zse_model_get_mask_stats(s->model, &mask);
        live.mask = &mask;
    }
    zse_buf out = {0};
    int rc = srv_metrics_render(s->metrics, &live, &out);
    if (rc == 0 && live.ready)
        rc = srv_lora_metrics(s->model, &out);
    if (rc == 0 && live.ready)
        rc = srv_memory_metrics(s->model, &out);
    enum MHD_Result mr = rc == 0 ? respond(r, 200, "text/plain; version=0.0.4", zse_buf_str(&out), out.len, 0) : MHD_NO;
    zse_buf_free(&out);
    return mr;
}

/* vLLM's runtime adapter routes: loads and drops adapters by name (--allow-lora-loading) */
static enum MHD_Result lora_admin(http_req *r)
{
    srv_server *s = r->s;
    srv_error e;
    if (r->too_large) {
        srv_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                      "the request body is larger than this server's limit of %zu bytes", s->cfg.max_body);
        return respond_error(r, &e);
    }
    if (!s->facts.adapters || !s->cfg.allow_lora_loading) {
        release_body(s, r);
        srv_error_set(&e, 404, "invalid_request_error", "unknown_url", NULL,
                      "loading adapters at run time is off: start zse serve with --allow-lora-loading%s",
                      s->facts.adapters ? "" : " (and adapter slots: --max-gpu-loras N)");
        return respond_error(r, &e);
    }
    char *msg = NULL;
    const char *body = r->body.data ? r->body.data : "";
    int rc = r->route == SRV_ROUTE_LORA_LOAD ? srv_lora_load(s->model, &s->facts, body, r->body.len, &msg, &e)
                                             : srv_lora_unload(s->model, body, r->body.len, &msg, &e);
    release_body(s, r);
    if (rc != 0)
        return respond_error(r, &e);
    zse_log(ZSE_LOG_INFO, "%s", msg);
    enum MHD_Result mr = respond(r, 200, "text/plain; charset=utf-8", msg, strlen(msg), 0);
    free(msg);
    return mr;
}

/* ---- the dashboard (dashboard.c) and its admin routes (admin.c) ------------------------ */

static struct MHD_Response *with_dashboard_headers(struct MHD_Response *resp)
{
    for (size_t i = 0; resp && i < srv_dashboard_n_headers; i++)
        MHD_add_response_header(resp, srv_dashboard_headers[i][0], srv_dashboard_headers[i][1]);
    return resp;
}

static enum MHD_Result dashboard_file(http_req *r, const char *url)
{
    const srv_asset *a = srv_dashboard_asset(url); /* route_ok found it */
    if (!a)
        return fail(r, 404, "invalid_request_error", "unknown_url", "no such dashboard file");
    struct MHD_Response *resp = MHD_create_response_from_buffer(a->len, (void *)a->data, MHD_RESPMEM_PERSISTENT);
    if (resp)
        MHD_add_response_header(resp, "Content-Type", a->content_type);
    return queue(r, 200, with_dashboard_headers(resp));
}

static enum MHD_Result ui_session(http_req *r)
{
    srv_server *s = r->s;
    bool ready = atomic_load(&s->state) == STATE_READY;
    bool admin = s->cfg.auth && s->admin_db && srv_keyring_is_admin(s->cfg.keyring, r->key);
    bool may_see = !s->cfg.auth || r->key[0]; /* what is served is for key holders, as /v1/models */
    return respond_json(r, 200, srv_dashboard_session(ready && may_see ? s->model : NULL, s->facts.name, s->started,
                                                      ready, s->cfg.auth, r->key, admin));
}

static const char *query_arg(void *ctx, const char *name)
{
    return MHD_lookup_connection_value(ctx, MHD_GET_ARGUMENT_KIND, name);
}

/* keys and the audit log; the caller's admin role was checked before the body was read */
static enum MHD_Result admin(http_req *r)
{
    srv_server *s = r->s;
    srv_error e;
    if (r->too_large) {
        srv_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                      "the request body is larger than this server's limit of %zu bytes", s->cfg.max_body);
        return respond_error(r, &e);
    }
    int status;
    char *json;
    int rc = srv_admin_run(&r->admin, s->admin_db, s->cfg.keyring, r->key, r->body.data, r->body.len, query_arg,
                           r->conn, &status, &json, &e);
    release_body(s, r);
    if (rc != 0)
        return respond_error(r, &e);
    struct MHD_Response *resp = text_response("application/json", json, strlen(json), 0);
    free(json);
    if (resp)
        MHD_add_response_header(resp, "Cache-Control", "no-store"); /* a new key is in the answer */
    return queue(r, status, resp);
}

/* ---- tokenizer routes, /info, embeddings ------------------------------------------------ */

static enum MHD_Result info(http_req *r)
{
    srv_server *s = r->s;
    if (r->route == SRV_ROUTE_TOKENIZER_INFO)
        return respond_json(r, 200, srv_tokenizer_info(s->model, &s->facts));
    zse_engine_stats st;
    s->engine.get_stats(s->engine.ctx, &st);
    srv_tgi_limits lim = {.max_concurrent_requests = s->cfg.max_waiting + s->cfg.engine_slots,
                          .max_best_of = SRV_MAX_CHOICES,
                          .max_stop_sequences = SRV_MAX_STOP,
                          .max_batch_size = s->cfg.engine_slots,
                          .validation_workers = s->cfg.workers,
                          /* what the KV cache holds: its blocks of 16 tokens */
                          .max_batch_total_tokens = (long long)st.kv_blocks_total * 16};
    return respond_json(r, 200, srv_tgi_info(s->model, &s->facts, &lim));
}

/* tokenize, detokenize, embeddings: the answer is built on a worker (embeddings run the
 * model) while the connection waits */
static void aux_task(void *arg)
{
    http_req *r = arg;
    srv_server *s = r->s;
    struct MHD_Connection *conn = r->conn;
    const char *body = r->body.data ? r->body.data : "";
    json_t *out = NULL;
    int rc = r->route == SRV_ROUTE_TOKENIZE ? srv_tokenize(s->model, &s->facts, body, r->body.len, &out, &r->error)
             : r->route == SRV_ROUTE_DETOKENIZE
                 ? srv_detokenize(s->model, &s->facts, body, r->body.len, &out, &r->error)
                 : srv_embeddings(s->model, &s->facts, s->cfg.pooling, body, r->body.len, &out, &r->aux_tokens, r->user, sizeof r->user,
                                  &r->error);
    release_body(s, r);
    char *text = rc == 0 ? json_dumps(out, JSON_COMPACT) : NULL;
    json_decref(out);
    if (rc == 0 && (!text || zse_buf_puts(&r->reply, text) != 0))
        rc = srv_error_set(&r->error, 500, "server_error", NULL, NULL, "out of memory formatting the answer");
    free(text);
    r->failed = rc != 0;
    r->ph = PH_AUX_DONE;
    resume_connection(conn); /* the last touch of r on this thread */
}

static enum MHD_Result start_aux(http_req *r)
{
    bool heavy = r->route == SRV_ROUTE_EMBEDDINGS || r->body.len >= HEAVY_BODY; /* embeddings run the model */
    return start_on_worker(r, heavy ? SRV_WORK_HEAVY : SRV_WORK_LIGHT, aux_task);
}

/* ---- the first call: the head is complete, no body byte is stored ---------------------- */

typedef struct {
    int content_lengths;
    int transfer_encodings;
    const char *transfer_encoding;
    bool host;
} framing;

static enum MHD_Result count_framing(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
    (void)kind;
    framing *f = cls;
    if (strcasecmp(key, "Content-Length") == 0)
        f->content_lengths++;
    else if (strcasecmp(key, "Transfer-Encoding") == 0) {
        f->transfer_encodings++;
        f->transfer_encoding = value ? value : "";
    } else if (strcasecmp(key, "Host") == 0)
        f->host = true;
    return MHD_YES;
}

/* "chunked" alone, spaces around allowed, any case */
static bool is_chunked(const char *v)
{
    while (*v == ' ' || *v == '\t')
        v++;
    size_t n = strlen(v);
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    return n == 7 && strncasecmp(v, "chunked", 7) == 0;
}

/* RFC 9112 §6.1 and §6.3: a request whose body length is ambiguous is refused and its
 * connection closed, or another request could be smuggled inside its body */
static bool framing_ok(http_req *r, const char *version, enum MHD_Result *result)
{
    framing f = {0};
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, count_framing, &f);
    srv_error e;
    if (strcmp(version, "HTTP/1.1") == 0 && !f.host)
        srv_error_set(&e, 400, "invalid_request_error", "bad_request", NULL,
                      "an HTTP/1.1 request needs a Host header (RFC 9112 section 3.2)");
    else if (f.content_lengths > 1)
        srv_error_set(&e, 400, "invalid_request_error", "bad_request", NULL,
                      "more than one Content-Length header: the body's length is ambiguous (RFC 9112 section 6.3)");
    else if (f.content_lengths && f.transfer_encodings)
        srv_error_set(&e, 400, "invalid_request_error", "bad_request", NULL,
                      "Content-Length and Transfer-Encoding together: the body's length is ambiguous (RFC 9112 "
                      "section 6.1)");
    else if (f.transfer_encodings > 1 || (f.transfer_encodings && !is_chunked(f.transfer_encoding)))
        srv_error_set(&e, 501, "invalid_request_error", "unsupported_transfer_encoding", NULL,
                      "Transfer-Encoding '%s' is not supported: send the body as it is, with Content-Length, or "
                      "chunked (once)", f.transfer_encodings > 1 ? "(several headers)" : f.transfer_encoding);
    else
        return true;
    *result = refuse(r, &e, NULL);
    return false;
}

static bool method_is(const http_req *r, const char *m)
{
    return strcmp(r->method, m) == 0;
}

/* 404 unknown routes, 405 wrong methods (HEAD is GET without the body); true to go on */
static bool route_ok(http_req *r, const char *url, enum MHD_Result *result)
{
    srv_error e;
    if (r->route == SRV_ROUTE_OTHER) {
        srv_error_set(&e, 404, "invalid_request_error", "unknown_url", NULL, "Unknown request URL: %s %s", r->method,
                      url);
        *result = refuse(r, &e, NULL);
        return false;
    }
    if (method_is(r, "OPTIONS") && r->s->cors)
        return true; /* a CORS preflight: 204 below */
    if (r->route == SRV_ROUTE_DASHBOARD && !srv_dashboard_asset(url)) {
        srv_error_set(&e, 404, "invalid_request_error", "unknown_url", NULL, "Unknown request URL: %s %s", r->method,
                      url);
        *result = refuse(r, &e, NULL);
        return false;
    }
    if (r->route == SRV_ROUTE_ADMIN) { /* GET, POST or DELETE by path */
        const char *allow = NULL;
        if (srv_admin_route(r->method, url, &r->admin, &allow, &e) == 0)
            return true;
        *result = refuse(r, &e, allow);
        return false;
    }
    bool want_post = route_is_post(r->route);
    bool ok = want_post ? method_is(r, "POST") : method_is(r, "GET") || method_is(r, "HEAD");
    if (ok)
        return true;
    srv_error_set(&e, 405, "invalid_request_error", "method_not_allowed", NULL, "%s is not allowed on %s; use %s",
                  r->method, url, want_post ? "POST" : "GET or HEAD");
    *result = refuse(r, &e, want_post ? "POST" : "GET, HEAD");
    return false;
}

/* 401 / 429 when the key is missing, wrong, disabled or over its limit; true to go on */
static bool authorize(http_req *r, enum MHD_Result *result)
{
    srv_server *s = r->s;
    if (r->route == SRV_ROUTE_ADMIN && !method_is(r, "OPTIONS") && !s->admin_db) {
        srv_error e;
        srv_error_set(&e, 403, "invalid_request_error", "admin_off", NULL,
                      "the admin routes are off: start zse serve with --auth and call them with an admin key "
                      "(zse api-key create NAME --admin)");
        *result = refuse(r, &e, NULL);
        return false;
    }
    if (!s->cfg.auth || !route_needs_key(r->route) || method_is(r, "OPTIONS"))
        return true;
    const char *h = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Authorization");
    if (!h && r->route == SRV_ROUTE_UI_SESSION)
        return true; /* the page asks before logging in: told only that a key is needed */
    srv_auth a = srv_keyring_check(s->cfg.keyring, h, zse_now(), r->key, &r->key_priority, &r->rate);
    r->has_rate = r->rate.limit > 0;
    srv_error e;
    switch (a) {
    case SRV_AUTH_OK:
        if (r->route != SRV_ROUTE_ADMIN || srv_keyring_is_admin(s->cfg.keyring, r->key))
            return true;
        srv_error_set(&e, 403, "invalid_request_error", "not_admin", NULL,
                      "key '%s' is not an admin key: the admin routes need one (zse api-key set-role %s admin)",
                      r->key, r->key);
        *result = respond_error_with(r, &e, NULL, true); /* a known key: a row of its own */
        return false;
    case SRV_AUTH_MISSING:
        srv_error_set(&e, 401, "invalid_request_error", "missing_api_key", NULL,
                      "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.");
        break;
    case SRV_AUTH_UNKNOWN:
        srv_error_set(&e, 401, "invalid_request_error", "invalid_api_key", NULL, "Incorrect API key provided.");
        break;
    case SRV_AUTH_DISABLED:
        srv_error_set(&e, 401, "invalid_request_error", "invalid_api_key", NULL,
                      "This API key is disabled (zse api-key enable turns it back on).");
        break;
    case SRV_AUTH_LIMITED:
        srv_error_set(&e, 429, "rate_limit_error", "rate_limit_exceeded", NULL,
                      "Rate limit reached for key '%s': %d requests per minute. Retry in %d s.", r->key, r->rate.limit,
                      r->rate.retry_after_s);
        e.retry_after = r->rate.retry_after_s;
        srv_metrics_rate_limited(s->metrics);
        *result = respond_error_with(r, &e, NULL, true); /* a known key: a row of its own */
        return false;
    }
    r->key[0] = '\0'; /* a disabled key's name is not the caller's identity */
    *result = refuse(r, &e, NULL);
    return false;
}

/* the declared body: none on GET routes, within --max-body, within the server's budget */
static bool body_ok(http_req *r, enum MHD_Result *result)
{
    srv_server *s = r->s;
    const char *cl = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    bool chunked = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING) != NULL;
    int64_t n = 0;
    if (cl && !zse_parse_i64(cl, &n))
        n = 0; /* libmicrohttpd answers malformed lengths itself */
    srv_error e;
    if (!route_is_post(r->route) && !(r->route == SRV_ROUTE_ADMIN && r->admin.has_body)) {
        if (n <= 0 && !chunked)
            return true;
        srv_error_set(&e, 400, "invalid_request_error", "bad_request", NULL, "%s %s takes no request body", r->method,
                      r->path);
        *result = refuse(r, &e, NULL);
        return false;
    }
    if (n > 0 && (uint64_t)n > s->cfg.max_body) {
        r->too_large = true;
        srv_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                      "the request body is larger than this server's limit of %zu bytes", s->cfg.max_body);
        *result = respond_error_with(r, &e, NULL, true);
        return false;
    }
    if (n > 0 && !reserve_body(s, r, (size_t)n)) {
        srv_error_set(&e, 503, "server_error", "overloaded", NULL,
                      "the server holds too many request bodies at once; retry shortly");
        e.retry_after = 1;
        *result = respond_error_with(r, &e, NULL, true);
        return false;
    }
    if (n > 0 && zse_buf_reserve(&r->body, (size_t)n + 1) != 0)
        return (*result = MHD_NO), false;
    return true;
}

static enum MHD_Result first_call(http_req *r, const char *url, const char *version)
{
    srv_server *s = r->s;
    enum MHD_Result result = MHD_YES;
    srv_guard_set_state(s->guard, r->guarded, SRV_CONN_BODY, zse_now());
    if (!framing_ok(r, version, &result) || !route_ok(r, url, &result))
        return result;
    int st = atomic_load(&s->state);
    if (st == STATE_DRAINING && r->route != SRV_ROUTE_HEALTH && r->route != SRV_ROUTE_METRICS) {
        srv_error e;
        srv_error_set(&e, 503, "server_error", "shutting_down", NULL, "the server is shutting down");
        e.retry_after = LOADING_RETRY_AFTER_S;
        return respond_error_with(r, &e, NULL, true);
    }
    if (!authorize(r, &result) || !body_ok(r, &result))
        return result;
    if (st == STATE_LOADING && route_needs_key(r->route)) {
        srv_error e;
        srv_error_set(&e, 503, "server_error", "model_loading", NULL, "the model is still loading; retry shortly");
        e.retry_after = LOADING_RETRY_AFTER_S;
        return respond_error_with(r, &e, NULL, true);
    }
    return MHD_YES;
}

/* body bytes: stored up to --max-body while the server-wide budget allows */
static void take_body(http_req *r, const char *data, size_t n)
{
    srv_server *s = r->s;
    if (r->too_large || r->over_buffer)
        return;
    if (r->body.len + n > s->cfg.max_body) {
        r->too_large = true;
        release_body(s, r);
        return;
    }
    if (r->body.len + n > r->reserved) { /* chunked: the budget grows in steps */
        size_t step = r->body.len + n - r->reserved;
        if (step < BODY_RESERVE_STEP)
            step = BODY_RESERVE_STEP;
        if (!reserve_body(s, r, step)) {
            r->over_buffer = true;
            release_body(s, r);
            return;
        }
    }
    if (zse_buf_append(&r->body, data, n) != 0) {
        r->over_buffer = true;
        release_body(s, r);
    }
}

/* the whole request is in (or a suspended one resumed) */
static enum MHD_Result last_call(http_req *r, const char *url)
{
    srv_server *s = r->s;
    switch (r->ph) {
    case PH_PREPARING: /* not resumed yet: nothing to do */
        return MHD_YES;
    case PH_ADMITTED:
        return continue_generation(r);
    case PH_RENDERING:
    case PH_RENDERED:
        return send_whole(r);
    case PH_AUX_DONE:
        return r->failed ? respond_error(r, &r->error) : respond(r, 200, "application/json", zse_buf_str(&r->reply),
                                                                 r->reply.len, 0);
    case PH_RECEIVING:
        break;
    }
    srv_guard_set_state(s->guard, r->guarded, SRV_CONN_BUSY, zse_now());
    if (method_is(r, "OPTIONS"))
        return respond(r, 204, "text/plain", "", 0, 0);
    if (r->route == SRV_ROUTE_HEALTH)
        return health(r);
    if (r->route == SRV_ROUTE_METRICS)
        return metrics(r);
    if (r->route == SRV_ROUTE_DASHBOARD)
        return dashboard_file(r, url);
    if (atomic_load(&s->state) == STATE_DRAINING)
        return fail(r, 503, "server_error", "shutting_down", "the server is shutting down");
    if (r->route == SRV_ROUTE_UI_SESSION)
        return ui_session(r);
    if (r->route == SRV_ROUTE_ADMIN)
        return admin(r);
    if (r->route == SRV_ROUTE_MODELS)
        return models(r, url);
    if (r->route == SRV_ROUTE_LORA_LOAD || r->route == SRV_ROUTE_LORA_UNLOAD)
        return lora_admin(r);
    if (r->route == SRV_ROUTE_INFO || r->route == SRV_ROUTE_TOKENIZER_INFO)
        return info(r);
    if (r->route == SRV_ROUTE_TOKENIZE || r->route == SRV_ROUTE_DETOKENIZE || r->route == SRV_ROUTE_EMBEDDINGS)
        return start_aux(r);
    return start_generation(r);
}

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
    r->route = route_of(url);
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
        enum MHD_Result rc = first_call(r, url, version);
        if (r->responded) /* answered early: the body is discarded, the deadlines no longer apply */
            srv_guard_set_state(s->guard, r->guarded, SRV_CONN_BUSY, zse_now());
        return rc;
    }
    if (*upload_data_size) {
        take_body(r, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (r->responded)
        return MHD_YES;
    return last_call(r, url);
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
    release_body(s, r);
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
