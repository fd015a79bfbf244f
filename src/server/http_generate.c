/* Generation routes: the body is parsed, templated, tokenized and queued on a worker while
 * the connection waits suspended; then the answer streams from the HTTP thread, or waits
 * for every sequence to end and is built whole on a worker. */
#include "server/http_internal.h"

#include <stdio.h>
#include <string.h>

#define STREAM_BLOCK 16384

/* ---- generation: preparation on a worker ---------------------------------------------- */

void http_suspend(void *arg)
{
    MHD_suspend_connection(arg);
}

void http_resume(void *arg)
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
    http_release_body(s, r); /* parsed: the bytes are no longer needed */
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
    http_resume(conn); /* the last touch of r on this thread */
}

/* a whole answer is built here, off the HTTP threads (n × logprobs can be megabytes) */
static void render_task(void *arg)
{
    http_req *r = arg;
    struct MHD_Connection *conn = r->conn;
    srv_job_whole(r->job, &r->reply, &r->reply_status, &r->reply_retry);
    r->ph = PH_RENDERED;
    http_resume(conn);
}

/* the job's waker for whole answers: every sequence ended; runs on the engine's thread
 * under the job's lock, so it only queues the work */
static void whole_ready(void *arg)
{
    http_req *r = arg;
    if (srv_work_push(r->s->work, SRV_WORK_LIGHT, render_task, r) != 0)
        http_resume(r->conn); /* stopping: the answer is built on the HTTP thread */
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
        srv_pull p = srv_job_pull(sc->job, &sc->buf, &status, http_suspend, sc->conn);
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
    return http_queue(r, 200, resp);
}

/* non-streaming, admitted: suspended until every sequence ended, then built on a worker */
static enum MHD_Result wait_whole(http_req *r)
{
    r->ph = PH_RENDERING;
    if (!srv_job_wait_whole(r->job, http_suspend, r->conn))
        return MHD_YES; /* whole_ready queues the rendering when the last sequence ends */
    http_suspend(r->conn);
    whole_ready(r);
    return MHD_YES;
}

enum MHD_Result http_send_whole(http_req *r)
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
    return http_respond(r, r->reply_status, "application/json", zse_buf_str(&r->reply), r->reply.len, r->reply_retry);
}

/* the body is in: `task` runs on a worker of `lane` while the connection waits */
enum MHD_Result http_start_on_worker(http_req *r, srv_work_lane lane, void (*task)(void *))
{
    srv_server *s = r->s;
    if (r->too_large) {
        srv_error e;
        http_body_too_large(s, &e);
        return http_respond_error(r, &e);
    }
    if (r->over_buffer)
        return http_fail(r, 503, "server_error", "overloaded",
                    "the server holds too many request bodies at once; retry shortly");
    r->ph = PH_PREPARING;
    http_list_add(s, r);
    http_suspend(r->conn);
    if (srv_work_push(s->work, lane, task, r) != 0) {
        http_resume(r->conn);
        r->ph = PH_RECEIVING;
        return http_fail(r, 503, "server_error", "shutting_down", "the server is shutting down");
    }
    return MHD_YES;
}

enum MHD_Result http_start_generation(http_req *r)
{
    return http_start_on_worker(r, r->body.len >= HEAVY_BODY ? SRV_WORK_HEAVY : SRV_WORK_LIGHT, prepare_task);
}

/* resumed after preparation: the error, the stream, or the wait for the whole answer */
enum MHD_Result http_continue_generation(http_req *r)
{
    if (r->failed)
        return http_respond_error(r, &r->error);
    srv_job_set_waker(r->job, srv_job_streaming(r->job) ? http_resume : whole_ready,
                      srv_job_streaming(r->job) ? (void *)r->conn : (void *)r);
    return srv_job_streaming(r->job) ? start_stream(r) : wait_whole(r);
}
