/* The first call for each request — the head is complete, no body byte is stored yet —
 * and the body's bytes after it. libmicrohttpd 0.9.75 is lenient where request smuggling
 * lives, so the framing is checked here (RFC 9112), then route, method and API key
 * (404/405/401 before the body is read), then the declared body against --max-body and
 * the bytes held across all connections (--max-buffered). */
#include "server/http_internal.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#define BODY_RESERVE_STEP (64 * 1024)   /* chunked bodies reserve buffer budget in steps */

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

void http_release_body(srv_server *s, http_req *r)
{
    zse_buf_free(&r->body);
    atomic_fetch_sub(&s->buffered, r->reserved);
    r->reserved = 0;
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
    *result = http_refuse(r, &e, NULL);
    return false;
}

bool http_method_is(const http_req *r, const char *m)
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
        *result = http_refuse(r, &e, NULL);
        return false;
    }
    if (http_method_is(r, "OPTIONS") && r->s->cors)
        return true; /* a CORS preflight: 204 below */
    if (r->route == SRV_ROUTE_DASHBOARD && !srv_dashboard_asset(url)) {
        srv_error_set(&e, 404, "invalid_request_error", "unknown_url", NULL, "Unknown request URL: %s %s", r->method,
                      url);
        *result = http_refuse(r, &e, NULL);
        return false;
    }
    if (r->route == SRV_ROUTE_ADMIN) { /* GET, POST or DELETE by path */
        const char *allow = NULL;
        if (srv_admin_route(r->method, url, &r->admin, &allow, &e) == 0)
            return true;
        *result = http_refuse(r, &e, allow);
        return false;
    }
    bool want_post = http_route_is_post(r->route);
    bool ok = want_post ? http_method_is(r, "POST") : http_method_is(r, "GET") || http_method_is(r, "HEAD");
    if (ok)
        return true;
    srv_error_set(&e, 405, "invalid_request_error", "method_not_allowed", NULL, "%s is not allowed on %s; use %s",
                  r->method, url, want_post ? "POST" : "GET or HEAD");
    *result = http_refuse(r, &e, want_post ? "POST" : "GET, HEAD");
    return false;
}

/* 401 / 429 when the key is missing, wrong, disabled or over its limit; true to go on */
static bool authorize(http_req *r, enum MHD_Result *result)
{
    srv_server *s = r->s;
    if (r->route == SRV_ROUTE_ADMIN && !http_method_is(r, "OPTIONS") && !s->admin_db) {
        srv_error e;
        srv_error_set(&e, 403, "invalid_request_error", "admin_off", NULL,
                      "the admin routes are off: start zse serve with --auth and call them with an admin key "
                      "(zse api-key create NAME --admin)");
        *result = http_refuse(r, &e, NULL);
        return false;
    }
    if (!s->cfg.auth || !http_route_needs_key(r->route) || http_method_is(r, "OPTIONS"))
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
        *result = http_respond_error_with(r, &e, NULL, true); /* a known key: a row of its own */
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
        *result = http_respond_error_with(r, &e, NULL, true); /* a known key: a row of its own */
        return false;
    }
    r->key[0] = '\0'; /* a disabled key's name is not the caller's identity */
    *result = http_refuse(r, &e, NULL);
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
    if (!http_route_is_post(r->route) && !(r->route == SRV_ROUTE_ADMIN && r->admin.has_body)) {
        if (n <= 0 && !chunked)
            return true;
        srv_error_set(&e, 400, "invalid_request_error", "bad_request", NULL, "%s %s takes no request body", r->method,
                      r->path);
        *result = http_refuse(r, &e, NULL);
        return false;
    }
    if (n > 0 && (uint64_t)n > s->cfg.max_body) {
        r->too_large = true;
        http_body_too_large(s, &e);
        *result = http_respond_error_with(r, &e, NULL, true);
        return false;
    }
    if (n > 0 && !reserve_body(s, r, (size_t)n)) {
        srv_error_set(&e, 503, "server_error", "overloaded", NULL,
                      "the server holds too many request bodies at once; retry shortly");
        e.retry_after = 1;
        *result = http_respond_error_with(r, &e, NULL, true);
        return false;
    }
    if (n > 0 && zse_buf_reserve(&r->body, (size_t)n + 1) != 0)
        return (*result = MHD_NO), false;
    return true;
}

enum MHD_Result http_first_call(http_req *r, const char *url, const char *version)
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
        return http_respond_error_with(r, &e, NULL, true);
    }
    if (!authorize(r, &result) || !body_ok(r, &result))
        return result;
    if (st == STATE_LOADING && http_route_needs_key(r->route)) {
        srv_error e;
        srv_error_set(&e, 503, "server_error", "model_loading", NULL, "the model is still loading; retry shortly");
        e.retry_after = LOADING_RETRY_AFTER_S;
        return http_respond_error_with(r, &e, NULL, true);
    }
    return MHD_YES;
}

/* body bytes: stored up to --max-body while the server-wide budget allows */
void http_take_body(http_req *r, const char *data, size_t n)
{
    srv_server *s = r->s;
    if (r->too_large || r->over_buffer)
        return;
    if (r->body.len + n > s->cfg.max_body) {
        r->too_large = true;
        http_release_body(s, r);
        return;
    }
    if (r->body.len + n > r->reserved) { /* chunked: the budget grows in steps */
        size_t step = r->body.len + n - r->reserved;
        if (step < BODY_RESERVE_STEP)
            step = BODY_RESERVE_STEP;
        if (!reserve_body(s, r, step)) {
            r->over_buffer = true;
            http_release_body(s, r);
            return;
        }
    }
    if (zse_buf_append(&r->body, data, n) != 0) {
        r->over_buffer = true;
        http_release_body(s, r);
    }
}
