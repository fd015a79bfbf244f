/* The HTTP server: libmicrohttpd with its own thread pool polling sockets (epoll), so a
 * connection holds a thread only while bytes move. Generation never blocks a worker: the
 * connection is suspended until the engine has something for it and resumed from the
 * engine's callback (srv_job). Slow or silent clients are cut off by the idle timeout; a
 * watcher thread notices clients that hang up while their connection is suspended (which
 * libmicrohttpd cannot see) and cancels their sequences at once.
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LOADING_RETRY_AFTER_S 5
#define WATCH_INTERVAL_S 0.1
#define STREAM_BLOCK 16384

enum { STATE_LOADING, STATE_READY, STATE_DRAINING };

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
    char fingerprint[64];
    long long started;
    srv_metrics *metrics;
    /* requests holding a generation job, for the watcher and shutdown */
    pthread_mutex_t mu;
    pthread_cond_t idle;
    http_req *active;
    int n_active;
    pthread_t watcher;
    bool watcher_started;
    atomic_bool stopping;
};

struct http_req {
    srv_server *s;
    struct MHD_Connection *conn;
    http_req *prev, *next;          /* in s->active while it holds a job */
    bool listed;
    srv_route route;
    char method[8];
    char path[64];
    double t_start;                 /* monotonic */
    double t_unix;
    zse_buf body;
    bool too_large;
    bool responded;
    int status;
    char key[SRV_KEY_NAME_MAX + 1];
    bool has_rate;
    srv_rate rate;
    srv_job *job;
    bool counted_tokens;
};

/* ---- small helpers ------------------------------------------------------------------- */

static double unix_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
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
    return SRV_ROUTE_OTHER;
}

static bool route_is_post(srv_route r)
{
    return r == SRV_ROUTE_CHAT || r == SRV_ROUTE_COMPLETIONS || r == SRV_ROUTE_GENERATE ||
           r == SRV_ROUTE_GENERATE_STREAM || r == SRV_ROUTE_LORA_LOAD || r == SRV_ROUTE_LORA_UNLOAD ||
           r == SRV_ROUTE_TGI_COMPAT;
}

static bool route_is_tgi(srv_route r)
{
    return r == SRV_ROUTE_GENERATE || r == SRV_ROUTE_GENERATE_STREAM || r == SRV_ROUTE_TGI_COMPAT;
}

static bool route_needs_key(srv_route r)
{
    return route_is_post(r) || r == SRV_ROUTE_MODELS;
}

static void client_address(struct MHD_Connection *c, char *out, size_t cap)
{
    snprintf(out, cap, "?");
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (!ci || !ci->client_addr)
        return;
    const struct sockaddr *sa = ci->client_addr;
    if (sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, out, (socklen_t)cap);
    else if (sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, out, (socklen_t)cap);
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

static enum MHD_Result respond(http_req *r, int status, const char *content_type, const char *body, size_t len,
                               int retry_after)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", content_type);
    if (retry_after > 0) {
        char v[16];
        snprintf(v, sizeof v, "%d", retry_after);
        MHD_add_response_header(resp, "Retry-After", v);
    }
    return queue(r, status, resp);
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

static enum MHD_Result respond_error(http_req *r, const srv_error *e)
{
    char *s = route_is_tgi(r->route) ? srv_error_tgi_json(e) : srv_error_openai_json(e);
    if (!s)
        return MHD_NO;
    enum MHD_Result rc = respond(r, e->status, "application/json", s, strlen(s), e->retry_after);
    free(s);
    return rc;
}

static enum MHD_Result fail(http_req *r, int status, const char *type, const char *code, const char *message)
{
    srv_error e;
    srv_error_set(&e, status, type, code, NULL, "%s", message);
    if (status == 503)
        e.retry_after = LOADING_RETRY_AFTER_S;
    return respond_error(r, &e);
}

/* ---- the watcher: clients that hang up while their connection is suspended ------------ */

static bool peer_hung_up(void *arg)
{
    http_req *r = arg;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci)
        return false;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

static void *watcher_main(void *arg)
{
    srv_server *s = arg;
    while (!atomic_load(&s->stopping)) {
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
            srv_job_abandon(gone[i], &s->engine);
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

/* ---- generation ---------------------------------------------------------------------- */

static void suspend_connection(void *arg)
{
    MHD_suspend_connection(arg);
}

static void resume_connection(void *arg)
{
    MHD_resume_connection(arg);
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

/* non-streaming: suspended until every sequence ended, then the whole body */
static enum MHD_Result finish_whole(http_req *r)
{
    zse_buf body = {0};
    int status;
    srv_pull p = srv_job_pull(r->job, &body, &status, suspend_connection, r->conn);
    if (p == SRV_PULL_WAIT)
        return MHD_YES;
    if (r->route == SRV_ROUTE_TGI_COMPAT && status == 200) { /* the compat route answers a list of one */
        zse_buf list = {0};
        if (zse_buf_printf(&list, "[%s]", zse_buf_str(&body)) != 0) {
            zse_buf_free(&body);
            return MHD_NO;
        }
        zse_buf_free(&body);
        body = list;
    }
    enum MHD_Result rc = respond(r, status, "application/json", zse_buf_str(&body), body.len, 0);
    zse_buf_free(&body);
    return rc;
}

static srv_api api_of(srv_route route)
{
    return route == SRV_ROUTE_CHAT ? SRV_API_CHAT : route == SRV_ROUTE_COMPLETIONS ? SRV_API_COMPLETION : SRV_API_TGI;
}

static enum MHD_Result generate(http_req *r)
{
    srv_server *s = r->s;
    srv_request req;
    srv_error e;
    if (srv_request_parse(api_of(r->route), r->body.data ? r->body.data : "", r->body.len, &s->facts, &req, &e) != 0)
        return respond_error(r, &e);
    if (r->route == SRV_ROUTE_GENERATE_STREAM)
        req.stream = true;
    if (r->route == SRV_ROUTE_GENERATE)
        req.stream = false;
    if (srv_request_adapter(&req, s->model, &s->facts, &e) != 0 || srv_request_prepare(&req, s->model, &s->facts, &e) != 0) {
        srv_request_free(&req);
        return respond_error(r, &e);
    }
    /* answers name the model asked for: the adapter's name for an adapter's request */
    const char *model_id = req.adapter ? zse_adapter_name(req.adapter) : s->facts.name;
    r->job = srv_job_new(&req, s->model, model_id, s->fingerprint, r->t_start);
    if (!r->job) {
        srv_request_free(&req);
        return fail(r, 500, "server_error", NULL, "out of memory");
    }
    srv_job_set_waker(r->job, resume_connection, r->conn);
    list_add(s, r);
    if (srv_job_submit(r->job, &s->engine, &e) != 0)
        return respond_error(r, &e);
    return srv_job_streaming(r->job) ? start_stream(r) : finish_whole(r);
}

/* ---- the other routes ---------------------------------------------------------------- */

static json_t *model_object(srv_server *s)
{
    return json_pack("{s:s, s:s, s:I, s:s, s:i}", "id", s->facts.name, "object", "model", "created",
                     (json_int_t)s->started, "owned_by", "zse", "max_model_len", s->facts.ctx_size);
}

static enum MHD_Result models(http_req *r, const char *url)
{
    srv_server *s = r->s;
    if (strcmp(url, "/v1/models") == 0) {
        json_t *list = json_pack("{s:s, s:[o]}", "object", "list", "data", model_object(s));
        if (list && s->facts.adapters && srv_lora_models(s->model, &s->facts, (long long)s->started,
                                                         json_object_get(list, "data")) != 0) {
            json_decref(list);
            return fail(r, 500, "server_error", NULL, "cannot list the adapters");
        }
        return respond_json(r, 200, list);
    }
    const char *id = url + strlen("/v1/models/");
    if (strcmp(id, s->facts.name) == 0)
        return respond_json(r, 200, model_object(s));
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

static enum MHD_Result metrics(http_req *r)
{
    srv_server *s = r->s;
    zse_engine_stats st;
    bool ready = atomic_load(&s->state) == STATE_READY;
    if (ready)
        s->engine.get_stats(s->engine.ctx, &st);
    zse_buf out = {0};
    int rc = srv_metrics_render(s->metrics, ready ? &st : NULL, ready, srv_active_requests(s),
                                s->cfg.audit ? srv_audit_dropped(s->cfg.audit) : 0, &out);
    if (rc == 0 && ready)
        rc = srv_lora_metrics(s->model, &out);
    enum MHD_Result mr = rc == 0 ? respond(r, 200, "text/plain; version=0.0.4", zse_buf_str(&out), out.len, 0) : MHD_NO;
    zse_buf_free(&out);
    return mr;
}

/* vLLM's runtime adapter routes: loads and drops adapters by name (--allow-lora-loading) */
static enum MHD_Result lora_admin(http_req *r)
{
    srv_server *s = r->s;
    srv_error e;
    if (!s->facts.adapters || !s->cfg.allow_lora_loading) {
        srv_error_set(&e, 404, "invalid_request_error", "unknown_url", NULL,
                      "loading adapters at run time is off: start zse serve with --allow-lora-loading%s",
                      s->facts.adapters ? "" : " (and adapter slots: --max-gpu-loras N)");
        return respond_error(r, &e);
    }
    char *msg = NULL;
    const char *body = r->body.data ? r->body.data : "";
    int rc = r->route == SRV_ROUTE_LORA_LOAD ? srv_lora_load(s->model, &s->facts, body, r->body.len, &msg, &e)
                                             : srv_lora_unload(s->model, body, r->body.len, &msg, &e);
    if (rc != 0)
        return respond_error(r, &e);
    zse_log(ZSE_LOG_INFO, "%s", msg);
    enum MHD_Result mr = respond(r, 200, "text/plain; charset=utf-8", msg, strlen(msg), 0);
    free(msg);
    return mr;
}

/* 401 / 429 when the key is missing, wrong, disabled or over its limit; true to go on */
static bool authorize(http_req *r, enum MHD_Result *result)
{
    srv_server *s = r->s;
    if (!s->cfg.auth || !route_needs_key(r->route))
        return true;
    const char *h = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Authorization");
    srv_auth a = srv_keyring_check(s->cfg.keyring, h, zse_now(), r->key, &r->rate);
    r->has_rate = r->rate.limit > 0;
    srv_error e;
    switch (a) {
    case SRV_AUTH_OK:
        return true;
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
        break;
    }
    *result = respond_error(r, &e);
    return false;
}

static enum MHD_Result dispatch(http_req *r, const char *url)
{
    srv_server *s = r->s;
    if (strcmp(r->method, "OPTIONS") == 0 && s->cors)
        return respond(r, 204, "text/plain", "", 0, 0);
    if (r->route == SRV_ROUTE_OTHER) {
        srv_error e;
        srv_error_set(&e, 404, "invalid_request_error", "unknown_url", NULL, "Unknown request URL: %s %s", r->method,
                      url);
        return respond_error(r, &e);
    }
    bool want_post = route_is_post(r->route);
    if (strcmp(r->method, want_post ? "POST" : "GET") != 0) {
        srv_error e;
        srv_error_set(&e, 405, "invalid_request_error", "method_not_allowed", NULL,
                      "%s is not allowed on %s; use %s", r->method, url, want_post ? "POST" : "GET");
        struct MHD_Response *resp = NULL;
        char *body = srv_error_openai_json(&e);
        if (body)
            resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
        if (!resp) {
            free(body);
            return MHD_NO;
        }
        MHD_add_response_header(resp, "Content-Type", "application/json");
        MHD_add_response_header(resp, "Allow", want_post ? "POST" : "GET");
        return queue(r, 405, resp);
    }
    if (r->route == SRV_ROUTE_HEALTH)
        return health(r);
    if (r->route == SRV_ROUTE_METRICS)
        return metrics(r);
    enum MHD_Result result;
    if (!authorize(r, &result))
        return result;
    int st = atomic_load(&s->state);
    if (st == STATE_LOADING)
        return fail(r, 503, "server_error", "model_loading", "the model is still loading; retry shortly");
    if (st == STATE_DRAINING)
        return fail(r, 503, "server_error", "shutting_down", "the server is shutting down");
    if (r->route == SRV_ROUTE_MODELS)
        return models(r, url);
    if (r->too_large) {
        srv_error e;
        srv_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                      "the request body is larger than this server's limit of %zu bytes", s->cfg.max_body);
        return respond_error(r, &e);
    }
    if (r->route == SRV_ROUTE_LORA_LOAD || r->route == SRV_ROUTE_LORA_UNLOAD)
        return lora_admin(r);
    return generate(r);
}

static bool content_length_too_large(http_req *r)
{
    const char *cl = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    int64_t n;
    return cl && zse_parse_i64(cl, &n) && n > 0 && (uint64_t)n > r->s->cfg.max_body;
}

static enum MHD_Result access_handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                      const char *version, const char *upload_data, size_t *upload_data_size,
                                      void **con_cls)
{
    (void)version;
    srv_server *s = cls;
    http_req *r = *con_cls;
    if (!r) {
        r = zse_calloc(1, sizeof *r);
        if (!r)
            return MHD_NO;
        r->s = s;
        r->conn = conn;
        r->t_start = zse_now();
        r->t_unix = unix_now();
        r->route = route_of(url);
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->path, sizeof r->path, "%s", url);
        *con_cls = r;
        /* a declared body over the limit is refused before it is read */
        if (content_length_too_large(r)) {
            r->too_large = true;
            srv_error e;
            srv_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                          "the request body is larger than this server's limit of %zu bytes", s->cfg.max_body);
            return respond_error(r, &e);
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (!r->too_large && r->body.len + *upload_data_size > s->cfg.max_body) {
            r->too_large = true;
            zse_buf_free(&r->body);
        }
        if (!r->too_large && zse_buf_append(&r->body, upload_data, *upload_data_size) != 0)
            return MHD_NO;
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (r->responded)
        return MHD_YES;
    if (r->job)
        return finish_whole(r); /* resumed: the sequences have ended */
    return dispatch(r, url);
}

/* ---- the end of every request -------------------------------------------------------- */

static void record(http_req *r, enum MHD_RequestTerminationCode toe)
{
    srv_server *s = r->s;
    srv_job_usage u = {0};
    if (r->job)
        srv_job_get_usage(r->job, &u);
    u.ttft = r->job ? u.ttft : -1;
    /* a client that left before any answer is logged as 499, as nginx does */
    int status = r->responded ? r->status : 499;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && r->job && status == 200)
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
    char client[64];
    client_address(r->conn, client, sizeof client);
    const char *id = r->job ? srv_job_id(r->job) : "-";
    if (s->cfg.log_requests)
        zse_log(ZSE_LOG_INFO,
                "request id=%s method=%s path=%s status=%d latency_ms=%.1f prompt_tokens=%d completion_tokens=%d "
                "ttft_ms=%.1f key=%s client=%s",
                id, r->method, r->path, status, latency_ms, u.prompt_tokens, u.completion_tokens,
                u.ttft >= 0 ? u.ttft * 1000 : -1.0, r->key[0] ? r->key : "-", client);
    if (s->cfg.audit && r->route != SRV_ROUTE_HEALTH && r->route != SRV_ROUTE_METRICS) {
        srv_audit_row row;
        memset(&row, 0, sizeof row);
        row.time = r->t_unix;
        memcpy(row.key, r->key, sizeof row.key);
        snprintf(row.method, sizeof row.method, "%s", r->method);
        snprintf(row.route, sizeof row.route, "%s", r->path);
        row.status = status;
        row.latency_ms = latency_ms;
        row.prompt_tokens = u.prompt_tokens;
        row.completion_tokens = u.completion_tokens;
        snprintf(row.client, sizeof row.client, "%s", client);
        snprintf(row.request_id, sizeof row.request_id, "%s", r->job ? id : "");
        srv_audit_log(s->cfg.audit, &row);
    }
}

static void request_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                              enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)conn;
    http_req *r = *con_cls;
    if (!r)
        return;
    *con_cls = NULL;
    srv_server *s = r->s;
    if (r->job && toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
        srv_job_abandon(r->job, &s->engine); /* the client left: free its sequences now */
    record(r, toe);
    list_remove(s, r);
    srv_job_unref(r->job);
    zse_buf_free(&r->body);
    free(r);
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    zse_log(ZSE_LOG_DEBUG, "http: %s", line);
}

/* ---- life ---------------------------------------------------------------------------- */

void srv_config_default(srv_config *c)
{
    memset(c, 0, sizeof *c);
    c->host = "127.0.0.1";
    c->port = 8000;
    c->max_body = 4u << 20;
    c->max_connections = 1024;
    c->timeout_s = 60;
    c->http_threads = 4;
    c->model_id = "model";
    c->log_requests = true;
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
    srv_metrics_free(s->metrics);
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
    if (!s->host || !s->model_id || (c->cors_origin && !s->cors) || !s->metrics || load_tls(s, c) != 0) {
        free_server(s);
        return NULL;
    }
    s->cfg.host = s->host;
    s->cfg.cors_origin = s->cors;
    s->facts.name = s->model_id;
    if (c->auth && !c->keyring) {
        zse_fail("--auth needs the key database");
        free_server(s);
        return NULL;
    }
    struct sockaddr_storage ss;
    if (resolve(s->host, c->port, &ss) != 0) {
        free_server(s);
        return NULL;
    }
    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    if (s->tls_cert_pem)
        flags |= MHD_USE_TLS;
    struct MHD_OptionItem tls_opts[] = {
        {MHD_OPTION_HTTPS_MEM_CERT, 0, s->tls_cert_pem},
        {MHD_OPTION_HTTPS_MEM_KEY, 0, s->tls_key_pem},
        {MHD_OPTION_END, 0, NULL},
    };
    struct MHD_OptionItem no_opts[] = {{MHD_OPTION_END, 0, NULL}};
    /* no MHD_OPTION_LISTENING_ADDRESS_REUSE: set to 1 it means SO_REUSEPORT, and a second
     * server on the same port would start and silently share its connections; the default
     * (SO_REUSEADDR only) still allows a restart while old connections sit in TIME_WAIT */
    s->daemon = MHD_start_daemon(
        flags, 0, NULL, NULL, access_handler, s, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)(c->http_threads > 0 ? c->http_threads : 1),
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)c->max_connections, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)c->timeout_s, MHD_OPTION_NOTIFY_COMPLETED, request_completed, s, MHD_OPTION_EXTERNAL_LOGGER,
        mhd_log, s, MHD_OPTION_ARRAY, s->tls_cert_pem ? tls_opts : no_opts,
        MHD_OPTION_END);
    if (!s->daemon) {
        zse_fail("cannot listen on %s:%d (in use, or not an address of this machine?)", s->host, c->port);
        free_server(s);
        return NULL;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
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

void srv_set_ready(srv_server *s, zse_model *m, const srv_engine *engine)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    s->model = m;
    s->engine = *engine;
    s->facts.vocab_size = info.vocab_size;
    s->facts.ctx_size = info.ctx_size;
    zse_adapter_stats ast;
    zse_adapter_get_stats(m, &ast);
    s->facts.adapters = ast.slots > 0;
    snprintf(s->fingerprint, sizeof s->fingerprint, "fp_zse_%s_%s", zse_version(), info.quant ? info.quant : "");
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
    MHD_stop_daemon(s->daemon);
    free_server(s);
}
