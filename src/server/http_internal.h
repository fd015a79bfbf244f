/* server/http_internal.h — what the files of the HTTP layer share (not part of server.h's API).
 * A request goes through them in this order:
 *
 *   http.c           the daemon's life (start, ready, drain, stop), connections, the access
 *                    handler every libmicrohttpd call enters by, the watcher, and the end of
 *                    every request (metrics, log line, audit row)
 *   http_head.c      the first call (head complete, no body byte stored): RFC 9112 framing,
 *                    route and method, API key, body size; then the body's bytes, within
 *                    --max-body and the server-wide budget (--max-buffered)
 *   http_route.c     the route table and the dispatch once the body is in: /health,
 *                    /metrics, /v1/models, the dashboard, /admin, LoRA loading, /info, and
 *                    tokenize / detokenize / embeddings on a worker
 *   http_generate.c  generation routes: preparation on a worker, then a stream or a whole
 *                    answer built on a worker
 *   http_reply.c     responses: common headers, JSON and error bodies, refusals */
#ifndef ZSE_SERVER_HTTP_INTERNAL_H
#define ZSE_SERVER_HTTP_INTERNAL_H

#include "server/server.h"

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>

#define LOADING_RETRY_AFTER_S 5
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

/* ---- http.c ---- */
void http_list_add(srv_server *s, http_req *r); /* past its body: the watcher and shutdown see it */

/* ---- http_head.c ---- */
enum MHD_Result http_first_call(http_req *r, const char *url, const char *version);
void http_take_body(http_req *r, const char *data, size_t n);
void http_release_body(srv_server *s, http_req *r);
bool http_method_is(const http_req *r, const char *m);

/* ---- http_route.c ---- */
srv_route http_route_of(const char *url);
bool http_route_is_post(srv_route r);
bool http_route_is_tgi(srv_route r);
bool http_route_needs_key(srv_route r);
enum MHD_Result http_last_call(http_req *r, const char *url);

/* ---- http_generate.c ---- */
void http_suspend(void *conn); /* MHD_suspend_connection / MHD_resume_connection as callbacks */
void http_resume(void *conn);
enum MHD_Result http_start_on_worker(http_req *r, srv_work_lane lane, void (*task)(void *));
enum MHD_Result http_start_generation(http_req *r);
enum MHD_Result http_continue_generation(http_req *r);
enum MHD_Result http_send_whole(http_req *r);

/* ---- http_reply.c ---- */
struct MHD_Response *http_text_response(const char *content_type, const char *body, size_t len, int retry_after);
enum MHD_Result http_queue(http_req *r, int status, struct MHD_Response *resp);
enum MHD_Result http_respond(http_req *r, int status, const char *content_type, const char *body, size_t len,
                             int retry_after);
enum MHD_Result http_respond_json(http_req *r, int status, json_t *obj);
enum MHD_Result http_respond_error_with(http_req *r, const srv_error *e, const char *allow, bool close);
enum MHD_Result http_respond_error(http_req *r, const srv_error *e);
/* e becomes the 413 for a request body over the server's --max-body */
void http_body_too_large(const srv_server *s, srv_error *e);
enum MHD_Result http_fail(http_req *r, int status, const char *type, const char *code, const char *message);
enum MHD_Result http_refuse(http_req *r, const srv_error *e, const char *allow);

#endif
