/* The route table, and what each route does once its body is in: the quick routes answer
 * on the HTTP thread; tokenize, detokenize and embeddings are built on a worker; generation
 * goes to http_generate.c. */
#include "server/http_internal.h"

#include <stdio.h>
#include <string.h>

/* ---- the route table ---------------------------------------------------------------- */

/* every path the server answers, scanned in order: a prefix entry matches any path that
 * starts with it, so an exact entry that shares its start comes first */
static const struct {
    const char *path;
    bool prefix;
    srv_route route;
} route_table[] = {
    {"/v1/chat/completions", false, SRV_ROUTE_CHAT},
    {"/v1/completions", false, SRV_ROUTE_COMPLETIONS},
    {"/v1/models", false, SRV_ROUTE_MODELS},
    {"/v1/models/", true, SRV_ROUTE_MODELS},
    {"/generate", false, SRV_ROUTE_GENERATE},
    {"/generate_stream", false, SRV_ROUTE_GENERATE_STREAM},
    {"/health", false, SRV_ROUTE_HEALTH},
    {"/metrics", false, SRV_ROUTE_METRICS},
    {"/", false, SRV_ROUTE_TGI_COMPAT}, /* TGI's and LoRAX's compat route: /generate(_stream) by "stream" */
    {"/v1/load_lora_adapter", false, SRV_ROUTE_LORA_LOAD},
    {"/v1/unload_lora_adapter", false, SRV_ROUTE_LORA_UNLOAD},
    {"/ui/session", false, SRV_ROUTE_UI_SESSION},
    {"/ui/", true, SRV_ROUTE_DASHBOARD}, /* the dashboard's files (GET / is the page: new_request) */
    {"/admin/", true, SRV_ROUTE_ADMIN},
    {"/tokenize", false, SRV_ROUTE_TOKENIZE}, /* vLLM's tokenizer routes */
    {"/detokenize", false, SRV_ROUTE_DETOKENIZE},
    {"/tokenizer_info", false, SRV_ROUTE_TOKENIZER_INFO},
    {"/info", false, SRV_ROUTE_INFO},
    {"/v1/embeddings", false, SRV_ROUTE_EMBEDDINGS},
};

srv_route http_route_of(const char *url)
{
    for (size_t i = 0; i < sizeof route_table / sizeof route_table[0]; i++) {
        const char *p = route_table[i].path;
        if (route_table[i].prefix ? strncmp(url, p, strlen(p)) == 0 : strcmp(url, p) == 0)
            return route_table[i].route;
    }
    return SRV_ROUTE_OTHER;
}

bool http_route_is_post(srv_route r)
{
    return r == SRV_ROUTE_CHAT || r == SRV_ROUTE_COMPLETIONS || r == SRV_ROUTE_GENERATE ||
           r == SRV_ROUTE_GENERATE_STREAM || r == SRV_ROUTE_LORA_LOAD || r == SRV_ROUTE_LORA_UNLOAD ||
           r == SRV_ROUTE_TGI_COMPAT || r == SRV_ROUTE_TOKENIZE || r == SRV_ROUTE_DETOKENIZE ||
           r == SRV_ROUTE_EMBEDDINGS;
}

bool http_route_is_tgi(srv_route r)
{
    return r == SRV_ROUTE_GENERATE || r == SRV_ROUTE_GENERATE_STREAM || r == SRV_ROUTE_TGI_COMPAT ||
           r == SRV_ROUTE_INFO;
}

bool http_route_needs_key(srv_route r)
{
    return http_route_is_post(r) || r == SRV_ROUTE_MODELS || r == SRV_ROUTE_UI_SESSION || r == SRV_ROUTE_ADMIN ||
           r == SRV_ROUTE_TOKENIZER_INFO || r == SRV_ROUTE_INFO;
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
                return http_fail(r, 500, "server_error", NULL, "out of memory listing the models");
            }
        if (list && s->facts.adapters && srv_lora_models(s->model, &s->facts, (long long)s->started,
                                                         json_object_get(list, "data")) != 0) {
            json_decref(list);
            return http_fail(r, 500, "server_error", NULL, "cannot list the adapters");
        }
        return http_respond_json(r, 200, list);
    }
    const char *id = url + strlen("/v1/models/");
    if (srv_model_name_is(&s->facts, id))
        return http_respond_json(r, 200, model_object(s, id));
    json_t *adapter = srv_lora_model(s->model, &s->facts, (long long)s->started, id);
    if (adapter)
        return http_respond_json(r, 200, adapter);
    srv_error e;
    srv_error_set(&e, 404, "invalid_request_error", "model_not_found", "model",
                  "The model '%s' does not exist; this server serves '%s'", id, s->facts.name);
    return http_respond_error(r, &e);
}

static enum MHD_Result health(http_req *r)
{
    int st = atomic_load(&r->s->state);
    const char *body = st == STATE_READY ? "{\"status\":\"ok\"}"
                       : st == STATE_LOADING ? "{\"status\":\"loading\"}"
                                             : "{\"status\":\"shutting down\"}";
    return http_respond(r, st == STATE_READY ? 200 : 503, "application/json", body, strlen(body),
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
    enum MHD_Result mr = rc == 0 ? http_respond(r, 200, "text/plain; version=0.0.4", zse_buf_str(&out), out.len, 0) : MHD_NO;
    zse_buf_free(&out);
    return mr;
}

/* vLLM's runtime adapter routes: loads and drops adapters by name (--allow-lora-loading) */
static enum MHD_Result lora_admin(http_req *r)
{
    srv_server *s = r->s;
    srv_error e;
    if (r->too_large) {
        http_body_too_large(s, &e);
        return http_respond_error(r, &e);
    }
    if (!s->facts.adapters || !s->cfg.allow_lora_loading) {
        http_release_body(s, r);
        srv_error_set(&e, 404, "invalid_request_error", "unknown_url", NULL,
                      "loading adapters at run time is off: start zse serve with --allow-lora-loading%s",
                      s->facts.adapters ? "" : " (and adapter slots: --max-gpu-loras N)");
        return http_respond_error(r, &e);
    }
    char *msg = NULL;
    const char *body = r->body.data ? r->body.data : "";
    int rc = r->route == SRV_ROUTE_LORA_LOAD ? srv_lora_load(s->model, &s->facts, body, r->body.len, &msg, &e)
                                             : srv_lora_unload(s->model, body, r->body.len, &msg, &e);
    http_release_body(s, r);
    if (rc != 0)
        return http_respond_error(r, &e);
    zse_log(ZSE_LOG_INFO, "%s", msg);
    enum MHD_Result mr = http_respond(r, 200, "text/plain; charset=utf-8", msg, strlen(msg), 0);
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
        return http_fail(r, 404, "invalid_request_error", "unknown_url", "no such dashboard file");
    struct MHD_Response *resp = MHD_create_response_from_buffer(a->len, (void *)a->data, MHD_RESPMEM_PERSISTENT);
    if (resp)
        MHD_add_response_header(resp, "Content-Type", a->content_type);
    return http_queue(r, 200, with_dashboard_headers(resp));
}

static enum MHD_Result ui_session(http_req *r)
{
    srv_server *s = r->s;
    bool ready = atomic_load(&s->state) == STATE_READY;
    bool admin = s->cfg.auth && s->admin_db && srv_keyring_is_admin(s->cfg.keyring, r->key);
    bool may_see = !s->cfg.auth || r->key[0]; /* what is served is for key holders, as /v1/models */
    return http_respond_json(r, 200, srv_dashboard_session(ready && may_see ? s->model : NULL, s->facts.name, s->started,
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
        http_body_too_large(s, &e);
        return http_respond_error(r, &e);
    }
    int status;
    char *json;
    int rc = srv_admin_run(&r->admin, s->admin_db, s->cfg.keyring, r->key, r->body.data, r->body.len, query_arg,
                           r->conn, &status, &json, &e);
    http_release_body(s, r);
    if (rc != 0)
        return http_respond_error(r, &e);
    struct MHD_Response *resp = http_text_response("application/json", json, strlen(json), 0);
    free(json);
    if (resp)
        MHD_add_response_header(resp, "Cache-Control", "no-store"); /* a new key is in the answer */
    return http_queue(r, status, resp);
}

/* ---- tokenizer routes, /info, embeddings ------------------------------------------------ */

static enum MHD_Result info(http_req *r)
{
    srv_server *s = r->s;
    if (r->route == SRV_ROUTE_TOKENIZER_INFO)
        return http_respond_json(r, 200, srv_tokenizer_info(s->model, &s->facts));
    zse_engine_stats st;
    s->engine.get_stats(s->engine.ctx, &st);
    srv_tgi_limits lim = {.max_concurrent_requests = s->cfg.max_waiting + s->cfg.engine_slots,
                          .max_best_of = SRV_MAX_CHOICES,
                          .max_stop_sequences = SRV_MAX_STOP,
                          .max_batch_size = s->cfg.engine_slots,
                          .validation_workers = s->cfg.workers,
                          /* what the KV cache holds: its blocks of 16 tokens */
                          .max_batch_total_tokens = (long long)st.kv_blocks_total * 16};
    return http_respond_json(r, 200, srv_tgi_info(s->model, &s->facts, &lim));
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
    http_release_body(s, r);
    char *text = rc == 0 ? json_dumps(out, JSON_COMPACT) : NULL;
    json_decref(out);
    if (rc == 0 && (!text || zse_buf_puts(&r->reply, text) != 0))
        rc = srv_error_set(&r->error, 500, "server_error", NULL, NULL, "out of memory formatting the answer");
    free(text);
    r->failed = rc != 0;
    r->ph = PH_AUX_DONE;
    http_resume(conn); /* the last touch of r on this thread */
}

static enum MHD_Result start_aux(http_req *r)
{
    bool heavy = r->route == SRV_ROUTE_EMBEDDINGS || r->body.len >= HEAVY_BODY; /* embeddings run the model */
    return http_start_on_worker(r, heavy ? SRV_WORK_HEAVY : SRV_WORK_LIGHT, aux_task);
}

/* ---- the dispatch ------------------------------------------------------------------- */

/* the whole request is in (or a suspended one resumed) */
enum MHD_Result http_last_call(http_req *r, const char *url)
{
    srv_server *s = r->s;
    switch (r->ph) {
    case PH_PREPARING: /* not resumed yet: nothing to do */
        return MHD_YES;
    case PH_ADMITTED:
        return http_continue_generation(r);
    case PH_RENDERING:
    case PH_RENDERED:
        return http_send_whole(r);
    case PH_AUX_DONE:
        return r->failed ? http_respond_error(r, &r->error) : http_respond(r, 200, "application/json", zse_buf_str(&r->reply),
                                                                 r->reply.len, 0);
    case PH_RECEIVING:
        break;
    }
    srv_guard_set_state(s->guard, r->guarded, SRV_CONN_BUSY, zse_now());
    if (http_method_is(r, "OPTIONS"))
        return http_respond(r, 204, "text/plain", "", 0, 0);
    if (r->route == SRV_ROUTE_HEALTH)
        return health(r);
    if (r->route == SRV_ROUTE_METRICS)
        return metrics(r);
    if (r->route == SRV_ROUTE_DASHBOARD)
        return dashboard_file(r, url);
    if (atomic_load(&s->state) == STATE_DRAINING)
        return http_fail(r, 503, "server_error", "shutting_down", "the server is shutting down");
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
    return http_start_generation(r);
}
