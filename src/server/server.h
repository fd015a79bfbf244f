/* server — `zse serve`: HTTP on libmicrohttpd, the OpenAI and TGI request and response
 * shapes, API keys, per-key rate limits, the audit log and Prometheus metrics.
 *
 * The server calls the engine only through include/zse.h. Generation goes through a
 * srv_engine (the engine's submit/cancel/stats behind function pointers) so the HTTP layer
 * can be tested against a scripted generator; `zse serve` binds it to zse_engine_*. */
#ifndef ZSE_SERVER_H
#define ZSE_SERVER_H

#include "zse.h"

#include "util/util.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

/* ---- errors in the API's shape --------------------------------------------------------
 * OpenAI routes answer {"error":{"message","type","param","code"}}; TGI routes answer
 * {"error","error_type"}. One srv_error carries what both need. */
typedef struct {
    int status;             /* HTTP status */
    const char *type;       /* "invalid_request_error", "authentication_error", ... */
    const char *code;       /* NULL or a machine-readable code ("model_not_found", ...) */
    char param[96];         /* the offending field ("messages[1].content"), "" for none */
    char message[600];
    int retry_after;        /* seconds, sent as Retry-After on 429/503; 0 = none */
} srv_error;

/* fills *e and returns -1; param may be NULL */
int srv_error_set(srv_error *e, int status, const char *type, const char *code, const char *param,
                  const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* shorthand for 400 invalid_request_error naming `param` */
int srv_error_invalid(srv_error *e, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
char *srv_error_openai_json(const srv_error *e);   /* heap; NULL on allocation failure */
char *srv_error_tgi_json(const srv_error *e);

/* ---- requests: what a client asked for, validated ------------------------------------- */
typedef enum { SRV_API_CHAT, SRV_API_COMPLETION, SRV_API_TGI } srv_api;

typedef struct {
    char *text;             /* prompt text; NULL when the client sent token ids */
    int32_t *ids;           /* the prompt's tokens (from the client or srv_request_prepare) */
    size_t n_ids;
} srv_prompt;

/* What the parser needs to know about the model (a subset of zse_model_info). */
typedef struct {
    const char *name;       /* the API model id */
    int vocab_size;
    int ctx_size;
    bool adapters;          /* LoRA adapters are served: another model name (or TGI adapter_id)
                             * is an adapter's, resolved by srv_request_adapter */
} srv_model_facts;

typedef struct {
    srv_api api;
    char *model;                /* as the client named it (OpenAI) */
    json_t *messages;           /* chat: messages with text content, ready for the template */
    json_t *template_extra;     /* chat: {"tools": [...]} or NULL */
    srv_prompt *prompts;        /* completions: one or more; chat and TGI: one */
    size_t n_prompts;
    int n;                      /* choices per prompt */
    bool stream;
    bool include_usage;         /* stream_options.include_usage */
    bool echo;                  /* completions: the prompt text starts each choice */
    bool details;               /* TGI: "details" object with tokens and finish reason */
    int logprobs;               /* 0 = none; chat: 1 when asked; completions: 1 + alternatives */
    int max_tokens;             /* 0 = not given (until EOS or the context is full) */
    bool has_seed;
    zse_sampling sampling;      /* stop and logit_bias point into the arrays below */
    char **stop;
    int n_stop;
    zse_logit_bias *bias;
    int n_bias;
    int priority;
    char *user;
    char *adapter_id;           /* the adapter named by OpenAI model or TGI adapter_id; NULL: the base */
    zse_adapter *adapter;       /* it, resolved by srv_request_adapter (a reference) */
} srv_request;

/* Parses and validates a request body. Everything is checked that can be without
 * tokenizing; errors name the field. */
int srv_request_parse(srv_api api, const char *body, size_t len, const srv_model_facts *model,
                      srv_request *out, srv_error *err);
/* Chat: renders the template. All: tokenizes text prompts and checks the context (both
 * numbers in the message). */
int srv_request_prepare(srv_request *r, const zse_model *m, const srv_model_facts *facts,
                        srv_error *err);
void srv_request_free(srv_request *r);

/* ---- LoRA adapters (lora.c) ------------------------------------------------------------- */
/* the request's adapter (r->adapter_id) from the model: 404 naming the adapters there are
 * when it has none of that name, 400 when the one found cannot be used */
int srv_request_adapter(srv_request *r, zse_model *m, const srv_model_facts *mf, srv_error *e);
/* appends every adapter to data as a model object with "parent": the base model */
int srv_lora_models(zse_model *m, const srv_model_facts *mf, long long created, json_t *data);
/* the model object of adapter id, or NULL when there is none */
json_t *srv_lora_model(zse_model *m, const srv_model_facts *mf, long long created, const char *id);
/* vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter
 * {"lora_name"}: 0 and *message (heap), or -1 and the error */
int srv_lora_load(zse_model *m, const srv_model_facts *mf, const char *body, size_t len, char **message, srv_error *e);
int srv_lora_unload(zse_model *m, const char *body, size_t len, char **message, srv_error *e);
/* the adapter tiers' metrics (nothing for a model without adapter slots) */
int srv_lora_metrics(zse_model *m, zse_buf *out);

/* ---- the generator the server drives -------------------------------------------------- */
typedef struct {
    void *ctx;
    /* as zse_engine_submit: 0 and *id, or -1 when the queue is full or stopping */
    int (*submit)(void *ctx, const int32_t *prompt, size_t n, const zse_sampling *s, int priority,
                  zse_token_cb cb, void *user, uint64_t *id);
    void (*cancel)(void *ctx, uint64_t id);
    void (*get_stats)(void *ctx, zse_engine_stats *out);
} srv_engine;

/* ---- generation jobs: one HTTP request's sequences and what they produce --------------
 * The engine calls back on its own thread; a job copies each event into a queue and wakes
 * the connection, whose thread turns events into bytes (SSE chunks, or one body at the
 * end). Engine functions are never called with the job's lock held. */
typedef struct srv_job srv_job;
typedef void (*srv_wake_fn)(void *arg);

/* takes ownership of *req (prepared). model_id and fingerprint are copied. */
srv_job *srv_job_new(srv_request *req, const zse_model *m, const char *model_id, const char *fingerprint,
                     double t_arrival);
/* called (under the job's lock) when events arrive for a consumer that is waiting */
void srv_job_set_waker(srv_job *j, srv_wake_fn wake, void *arg);
/* submits every sequence; on failure cancels those already submitted (503 queue full) */
int srv_job_submit(srv_job *j, const srv_engine *engine, srv_error *err);
const char *srv_job_id(const srv_job *j);
bool srv_job_streaming(const srv_job *j);

typedef enum { SRV_PULL_DATA, SRV_PULL_WAIT, SRV_PULL_DONE } srv_pull;
/* Streaming: appends the SSE bytes of the events that arrived. With nothing new, calls
 * suspend(arg) under the lock (so a wake cannot slip in between) and returns WAIT; after
 * the last bytes it returns DONE. Non-streaming: WAIT (suspended) until every sequence
 * ended, then DATA with the whole body and *status (200, or 500 when generation failed). */
srv_pull srv_job_pull(srv_job *j, zse_buf *out, int *status, srv_wake_fn suspend, void *arg);
/* the client left: engine requests are cancelled and later events dropped */
void srv_job_abandon(srv_job *j, const srv_engine *engine);
/* while the consumer waits (its connection suspended), asks probe(arg) whether the client
 * hung up; true marks the job abandoned (call srv_job_abandon to cancel) */
bool srv_job_probe_waiting(srv_job *j, bool (*probe)(void *arg), void *arg);
typedef struct {
    int prompt_tokens;
    int completion_tokens;
    double ttft;            /* seconds from arrival to the first token; < 0 when none came */
    int n_tpot;             /* choices with two or more tokens */
    double tpot[64];        /* their mean seconds per output token after the first */
} srv_job_usage;
void srv_job_get_usage(srv_job *j, srv_job_usage *u);
void srv_job_ref(srv_job *j);
void srv_job_unref(srv_job *j);

/* ---- sliding-window rate limit: at most `limit` admissions in any `window` seconds ----- */
typedef struct {
    double *times;          /* ring of admission times, oldest at head */
    int limit;
    int head, count;
} srv_window;

typedef struct {
    bool allowed;
    int limit;
    int remaining;          /* admissions left in the window after this one */
    int reset_s;            /* seconds until the whole limit is available again */
    int retry_after_s;      /* rejected: seconds until one admission frees */
} srv_rate;

int srv_window_init(srv_window *w, int limit);
void srv_window_free(srv_window *w);
srv_rate srv_window_admit(srv_window *w, double now, double window_s);

/* ---- the database (SQLite): API keys and the audit log ------------------------------- */
typedef struct srv_db srv_db;

/* $ZSE_DB, else $XDG_DATA_HOME/zse/zse.db, else ~/.local/share/zse/zse.db (heap) */
char *srv_db_default_path(void);
/* opens (creating the file, its folders and the schema) */
srv_db *srv_db_open(const char *path);
void srv_db_close(srv_db *db);
/* changes whenever another connection commits (PRAGMA data_version) */
int64_t srv_db_data_version(srv_db *db);

#define SRV_KEY_NAME_MAX 64
#define SRV_KEY_CHARS 52        /* "zse-" + 48 hex digits */

typedef struct {
    char name[SRV_KEY_NAME_MAX + 1];
    char prefix[16];            /* the key's first characters, for telling keys apart */
    unsigned char hash[32];     /* SHA-256 of the key */
    int rate_limit;             /* requests per minute; 0 = unlimited */
    bool enabled;
    double created;             /* unix seconds */
    double last_used;           /* 0 = never */
} srv_key;

bool srv_key_name_valid(const char *name);
void srv_key_hash(const char *key, size_t len, unsigned char out[32]);
/* makes a key, stores its hash, writes the key (shown once) to key_out */
int srv_key_create(srv_db *db, const char *name, int rate_limit, char key_out[SRV_KEY_CHARS + 1]);
int srv_key_delete(srv_db *db, const char *name);
int srv_key_set_enabled(srv_db *db, const char *name, bool enabled);
int srv_key_set_rate_limit(srv_db *db, const char *name, int rate_limit);
int srv_key_list(srv_db *db, srv_key **out, size_t *n);
int srv_key_touch(srv_db *db, const char *name, double when);

/* The keys a running server checks requests against, with their rate-limit windows. */
typedef struct srv_keyring srv_keyring;
typedef enum { SRV_AUTH_OK, SRV_AUTH_MISSING, SRV_AUTH_UNKNOWN, SRV_AUTH_DISABLED, SRV_AUTH_LIMITED } srv_auth;

srv_keyring *srv_keyring_new(void);
void srv_keyring_free(srv_keyring *kr);
/* replaces the keys; windows of keys that stay (same name and limit) keep their history */
int srv_keyring_set(srv_keyring *kr, const srv_key *keys, size_t n);
size_t srv_keyring_size(srv_keyring *kr);
/* Checks "Bearer KEY" (the Authorization header value, may be NULL) in constant time over
 * the stored hashes, then the key's rate limit. name_out gets the key's name when known. */
srv_auth srv_keyring_check(srv_keyring *kr, const char *authorization, double now,
                           char name_out[SRV_KEY_NAME_MAX + 1], srv_rate *rate);

/* ---- audit: one row per request, written by a background thread in batches ------------ */
typedef struct {
    double time;                /* unix seconds when the request arrived */
    char key[SRV_KEY_NAME_MAX + 1];   /* "" without auth */
    char method[8];
    char route[64];
    int status;
    double latency_ms;
    int prompt_tokens;
    int completion_tokens;
    char client[64];
    char request_id[40];
} srv_audit_row;

typedef struct srv_audit srv_audit;
/* Opens its own connection to db_path and starts the writer thread. Rows older than
 * retention_s (0 = keep) or beyond max_rows (0 = no cap) are pruned as it runs. When kr is
 * not NULL the thread reloads it whenever the key table changes. */
srv_audit *srv_audit_start(const char *db_path, double retention_s, int64_t max_rows,
                           srv_keyring *kr);
/* queues a row; never waits for the disk (rows beyond the queue bound are counted, dropped) */
void srv_audit_log(srv_audit *a, const srv_audit_row *row);
uint64_t srv_audit_dropped(srv_audit *a);
/* writes what is queued and waits for it (tests, shutdown) */
int srv_audit_flush(srv_audit *a);
void srv_audit_stop(srv_audit *a);   /* flushes, joins, closes */
/* rows since `since` (unix seconds), for one key when key != NULL, oldest first, at most
 * limit (0 = all) of the newest */
int srv_audit_query(srv_db *db, double since, const char *key, int limit, srv_audit_row **rows,
                    size_t *n);
/* inserts rows in one transaction and records each key's last use */
int srv_audit_write(srv_db *db, const srv_audit_row *rows, size_t n);
int srv_audit_prune(srv_db *db, double older_than, int64_t max_rows);

/* "90s", "15m", "1h", "7d", "2w" or plain seconds */
bool srv_parse_duration(const char *s, double *seconds);

/* ---- metrics (Prometheus text) ------------------------------------------------------- */
typedef enum {
    SRV_ROUTE_CHAT, SRV_ROUTE_COMPLETIONS, SRV_ROUTE_MODELS, SRV_ROUTE_GENERATE,
    SRV_ROUTE_GENERATE_STREAM, SRV_ROUTE_HEALTH, SRV_ROUTE_METRICS, SRV_ROUTE_LORA_LOAD,
    SRV_ROUTE_LORA_UNLOAD, SRV_ROUTE_TGI_COMPAT, SRV_ROUTE_OTHER,
    SRV_N_ROUTES
} srv_route;
const char *srv_route_name(srv_route r);

typedef struct srv_metrics srv_metrics;
srv_metrics *srv_metrics_new(void);
void srv_metrics_free(srv_metrics *m);
void srv_metrics_request(srv_metrics *m, srv_route route, int status);
void srv_metrics_tokens(srv_metrics *m, int prompt_tokens, int completion_tokens);
void srv_metrics_ttft(srv_metrics *m, double seconds);
void srv_metrics_tpot(srv_metrics *m, double seconds);
void srv_metrics_rate_limited(srv_metrics *m);
/* appends the exposition text; st may be NULL while the model loads */
int srv_metrics_render(srv_metrics *m, const zse_engine_stats *st, bool ready, int active_requests,
                       uint64_t audit_dropped, zse_buf *out);

/* ---- the HTTP server ----------------------------------------------------------------- */
typedef struct {
    const char *host;           /* "127.0.0.1" */
    int port;                   /* 0 = any free port (srv_port() says which) */
    size_t max_body;            /* bytes */
    int max_connections;
    int timeout_s;              /* idle connection timeout */
    int http_threads;
    const char *cors_origin;    /* NULL = no CORS headers */
    const char *tls_cert;       /* PEM files; both or neither */
    const char *tls_key;
    bool auth;                  /* require a Bearer key on the API routes */
    srv_keyring *keyring;       /* with auth */
    srv_audit *audit;           /* NULL = no audit rows */
    const char *model_id;       /* the API id while loading; replaced by the model's name */
    bool log_requests;          /* one structured line per request on stderr */
    bool allow_lora_loading;    /* /v1/load_lora_adapter and /v1/unload_lora_adapter answer */
} srv_config;

void srv_config_default(srv_config *c);

typedef struct srv_server srv_server;
/* binds and starts answering (health says "loading" until srv_set_ready) */
srv_server *srv_start(const srv_config *c);
int srv_port(const srv_server *s);
/* the model is loaded and the engine runs: generation routes open */
void srv_set_ready(srv_server *s, zse_model *m, const srv_engine *engine);
/* stop accepting new connections; requests on open ones get 503 */
void srv_drain(srv_server *s);
int srv_active_requests(srv_server *s);
/* waits until no request runs or timeout_s passes; true when none is left */
bool srv_wait_idle(srv_server *s, double timeout_s);
/* stops the HTTP daemon (after the engine has ended every request) and frees */
void srv_stop(srv_server *s);

#endif
