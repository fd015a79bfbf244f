/* Responses: the headers every answer carries (CORS, rate limits, the request id), JSON and
 * error bodies in the route's shape (OpenAI or TGI), and refusals before the API. */
#include "server/http_internal.h"

#include <stdio.h>
#include <string.h>

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

enum MHD_Result http_queue(http_req *r, int status, struct MHD_Response *resp)
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

struct MHD_Response *http_text_response(const char *content_type, const char *body, size_t len, int retry_after)
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

enum MHD_Result http_respond(http_req *r, int status, const char *content_type, const char *body, size_t len,
                               int retry_after)
{
    return http_queue(r, status, http_text_response(content_type, body, len, retry_after));
}

enum MHD_Result http_respond_json(http_req *r, int status, json_t *obj)
{
    char *s = obj ? json_dumps(obj, JSON_COMPACT) : NULL;
    json_decref(obj);
    if (!s)
        return MHD_NO;
    enum MHD_Result rc = http_respond(r, status, "application/json", s, strlen(s), 0);
    free(s);
    return rc;
}

/* the error in the route's shape; `allow` adds an Allow header (405), `close` a
 * Connection: close (answers given before the body was read) */
enum MHD_Result http_respond_error_with(http_req *r, const srv_error *e, const char *allow, bool close)
{
    char *s = http_route_is_tgi(r->route) ? srv_error_tgi_json(e) : srv_error_openai_json(e);
    if (!s)
        return MHD_NO;
    struct MHD_Response *resp = http_text_response("application/json", s, strlen(s), e->retry_after);
    free(s);
    if (resp && allow)
        MHD_add_response_header(resp, "Allow", allow);
    if (resp && close)
        MHD_add_response_header(resp, "Connection", "close");
    return http_queue(r, e->status, resp);
}

enum MHD_Result http_respond_error(http_req *r, const srv_error *e)
{
    return http_respond_error_with(r, e, NULL, false);
}

enum MHD_Result http_fail(http_req *r, int status, const char *type, const char *code, const char *message)
{
    srv_error e;
    srv_error_set(&e, status, type, code, NULL, "%s", message);
    if (status == 503)
        e.retry_after = LOADING_RETRY_AFTER_S;
    return http_respond_error(r, &e);
}

/* A refusal before the API: answered at once and the connection closed, unless the
 * client's address has used up its refusals for now; then it gets nothing. */
enum MHD_Result http_refuse(http_req *r, const srv_error *e, const char *allow)
{
    r->refused = true;
    r->status = e->status;
    if (!srv_guard_refuse(r->s->guard, r->client, zse_now()))
        return MHD_NO;
    return http_respond_error_with(r, e, allow, true);
}

void http_body_too_large(const srv_server *s, srv_error *e)
{
    srv_error_set(e, 413, "invalid_request_error", "request_too_large", NULL,
                  "the request body is larger than this server's limit of %zu bytes", s->cfg.max_body);
}
