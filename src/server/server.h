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
#include <sys/socket.h>

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

/* ---- client text made safe to show (text.c) --------------------------------------------
 * Copies len bytes of src into dst (cap bytes, always NUL-terminated): valid UTF-8 is kept,
 * every other byte becomes "\xNN", and with SRV_TEXT_ESCAPE_CONTROLS so do control
 * characters (C0, DEL, C1: CR/LF and ESC cannot forge log lines or drive a terminal).
 * Stops before a character or an escape that would not fit. Returns the length. */
enum { SRV_TEXT_ESCAPE_CONTROLS = 1 };
size_t srv_text_clean(char *dst, size_t cap, const char *src, size_t len, unsigned flags);

/* ---- requests: what a client asked for, validated ------------------------------------- */
typedef enum { SRV_API_CHAT, SRV_API_COMPLETION, SRV_API_TGI } srv_api;

/* The fields a JSON object of a route may hold: a field accepted and then ignored would be a
 * silent defect, so every route lists the fields it knows (NULL-terminated) and any other is
 * a 400 "unsupported field 'where.key' for ROUTE; remove it". A field listed is not thereby
 * valid: its parser checks it (null counts as absent, as OpenAI treats it). where is the
 * object's path ("" at the top, "parameters", "tools[2].function"); a non-object passes (its
 * type is its parser's to refuse). */
int srv_check_fields(json_t *obj, const char *const *allowed, const char *where, const char *route,
                     srv_error *e);
/* the route (or routes) a request shape is parsed for, as error messages name it */
const char *srv_api_route(srv_api api);

#define SRV_MAX_CHOICES 16      /* n (and TGI best_of) per prompt */
#define SRV_MAX_STOP 16         /* stop strings per request */

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
    size_t max_prompt_bytes;    /* longer prompt text cannot fit the context (0 = unknown) */
    bool adapters;              /* LoRA adapters are served: another model name (or TGI adapter_id)
                                 * is an adapter's, resolved by srv_request_adapter */
    const char *const *aliases; /* --served-model-name: further names of the model (name is the first) */
    int n_aliases;
} srv_model_facts;

/* ---- structured output and tool calls (structured.c) ------------------------------------
 * What a request asks the output to be: a grammar from response_format, TGI's grammar or
 * vLLM's guided_* fields, and the tools the model may call with tool_choice. Parsed with the
 * request; compiled against the model (srv_structured_prepare) into one constraint that
 * every choice of the request shares. */
typedef enum {
    SRV_GRAMMAR_NONE,
    SRV_GRAMMAR_JSON_OBJECT,    /* any JSON object */
    SRV_GRAMMAR_JSON_SCHEMA,    /* text: the schema's JSON */
    SRV_GRAMMAR_REGEX,          /* text: the pattern */
    SRV_GRAMMAR_CHOICE,         /* choices */
} srv_grammar_kind;

typedef enum {
    SRV_TOOLS_OFF,              /* no tools, or tool_choice "none": the output is text */
    SRV_TOOLS_AUTO,             /* calls parsed from what the model writes */
    SRV_TOOLS_REQUIRED,         /* one call or more, forced by the grammar */
    SRV_TOOLS_NAMED,            /* one call of tool_name, forced by the grammar */
} srv_tool_mode;

typedef struct {
    srv_grammar_kind kind;
    char param[64];             /* the field it came from, for errors ("response_format.json_schema") */
    char *text;
    bool strict;                /* json_schema strict: every object closed, every property required */
    char **choices;
    int n_choices;
    srv_tool_mode tools;
    char *tools_json;           /* the request's tools array (compact JSON) */
    char *tool_name;            /* SRV_TOOLS_NAMED */
    bool parallel;              /* parallel_tool_calls (default true) */
    int tool_format;            /* a zse_tool_format the output is parsed with; 0: not parsed */
    zse_constraint *constraint; /* compiled; the sampling points at it */
} srv_structured;

/* the tool-call formats --tool-parser accepts */
#define SRV_TOOL_PARSER_NAMES "hermes, llama3_json, mistral, json, none"
/* the format a --tool-parser name stands for: 0 for "none" (tool calls are never parsed),
 * -1 with an error listing the names for an unknown one */
int srv_tool_parser_from_name(const char *name, int *format);
/* whether a client's model name is the served model's (its name or an alias) */
bool srv_model_name_is(const srv_model_facts *mf, const char *name);

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
    int priority;               /* lower runs first (vLLM's convention) */
    bool has_priority;          /* the client sent one (checked against its key's) */
    char *user;
    char *adapter_id;           /* the adapter named by OpenAI model or TGI adapter_id; NULL: the base */
    zse_adapter *adapter;       /* it, resolved by srv_request_adapter (a reference) */
    srv_structured structured;  /* grammar and tools (structured.c) */
    /* chat template options */
    bool add_generation_prompt;     /* default true */
    bool continue_final_message;    /* the last (assistant) message is left open to be continued */
    /* scoring (prompt logprobs; sampling.prompt_logprobs is set when any of these asks) */
    bool echo_logprobs;         /* completions echo + logprobs: the prompt's tokens lead the legacy logprobs */
    int prompt_logprobs;        /* vLLM prompt_logprobs: 0 = not asked; else 1 + alternatives */
    /* TGI */
    bool decoder_input_details; /* details.prefill: the prompt's tokens with their logprobs */
    int top_n_tokens;           /* top_tokens: this many alternatives per generated token */
    int k_alternatives;         /* LoRAX return_k_alternatives: tokens[i].alternative_tokens */
    int best_of;                /* > 1: that many candidates (n), the most likely one answers */
    int n_answers;              /* completions best_of: the n best of the candidates are answered (0: all) */
    int truncate;               /* > 0: only the prompt's last this many tokens are kept */
} srv_request;

/* Parses and validates a request body. Everything is checked that can be without
 * tokenizing; errors name the field. */
int srv_request_parse(srv_api api, const char *body, size_t len, const srv_model_facts *model,
                      srv_request *out, srv_error *err);
/* chat messages and the template's options (add_generation_prompt, continue_final_message,
 * chat_template_kwargs, tools) from a body into r (chat and POST /tokenize: route names it) */
int srv_request_parse_messages(json_t *body, const char *route, srv_request *r, srv_error *e);
/* renders r->messages with the model's template into r->prompts[0].text */
int srv_request_render_chat(srv_request *r, const zse_model *m, srv_error *e);
/* sets r->stream (the TGI routes decide it by path) and refuses what cannot stream (TGI's
 * best_of > 1 and decoder_input_details) */
int srv_request_set_stream(srv_request *r, bool stream, srv_error *e);
/* Chat: renders the template. All: refuses text that cannot fit (facts->max_prompt_bytes)
 * before tokenizing, tokenizes text prompts and checks the context (both numbers in the
 * message). */
int srv_request_prepare(srv_request *r, const zse_model *m, const srv_model_facts *facts,
                        srv_error *err);
void srv_request_free(srv_request *r);

/* structured.c: the request's response_format / grammar / guided_* and tools / tool_choice /
 * parallel_tool_calls into r->structured (conflicts and malformed fields: 400 naming them) */
int srv_structured_parse(json_t *body, srv_request *r, srv_error *e);
/* TGI's parameters.grammar {"type": "json" | "regex", "value"} */
int srv_structured_parse_tgi(json_t *params, srv_request *r, srv_error *e);
/* Compiled constraints kept by request shape (the grammar's kind and text, or the tools,
 * tool_choice and format), least recently used out first: a schema or tool set sent again
 * reuses its grammar and the token classifications its earlier requests filled in (a new
 * grammar's first outputs pay for those). Thread-safe. Free it before the model. */
typedef struct srv_grammar_cache srv_grammar_cache;
srv_grammar_cache *srv_grammar_cache_new(int capacity);
void srv_grammar_cache_free(srv_grammar_cache *c);
/* Compiles the request's grammar or tool grammar against the model (or takes it from cache,
 * which may be NULL) into the constraint every choice shares (a schema feature the compiler
 * refuses: 400 naming the keyword) and settles how tool calls are parsed: tool_format is the
 * server's --tool-parser (-1: detect it from the chat template; 0: never parse). */
int srv_structured_prepare(srv_request *r, zse_model *m, int tool_format, srv_grammar_cache *cache, srv_error *e);
void srv_structured_free(srv_structured *st);
/* messages[mi].tool_calls as templates read them (arguments as objects); NULL and a 400 when
 * it is not a list of function calls */
json_t *srv_template_tool_calls(json_t *calls, size_t mi, srv_error *e);

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
    /* as zse_engine_submit_for: 0 and *id, or -1 when the queue is full or stopping; tenant:
     * whose share of the engine the sequence uses (the key, or the client's address) */
    int (*submit)(void *ctx, const char *tenant, const int32_t *prompt, size_t n, const zse_sampling *s,
                  int priority, zse_token_cb cb, void *user, uint64_t *id);
    void (*cancel)(void *ctx, uint64_t id);
    void (*get_stats)(void *ctx, zse_engine_stats *out);
    /* as zse_engine_pause; NULL: the generator cannot pause (unread output is not bounded) */
    void (*pause)(void *ctx, uint64_t id, bool paused);
} srv_engine;

/* a stream's sequences pause once this many of its events wait unread (its client reads
 * slower than they come, or not at all), and resume when the client has taken them all */
#define SRV_UNREAD_PAUSE 512

/* ---- generation jobs: one HTTP request's sequences and what they produce (job.c) ------
 * Each choice is handed to the engine by the admission queue (srv_job_submit_choice) or
 * ended without it (srv_job_end_choice); the engine calls back on its own thread, and a
 * job copies each event into a queue and wakes its consumer, which renders the events
 * (render.c). Engine functions are never called with the job's lock held. */
typedef struct srv_job srv_job;
typedef void (*srv_wake_fn)(void *arg);

/* takes ownership of *req (prepared). model_id and fingerprint are copied. */
srv_job *srv_job_new(srv_request *req, const zse_model *m, const char *model_id, const char *fingerprint,
                     double t_arrival);
/* called (under the job's lock) when the waiting consumer has something: a stream at every
 * event, a whole answer when every choice has ended */
void srv_job_set_waker(srv_job *j, srv_wake_fn wake, void *arg);
/* called (without the job's lock, on the engine thread) after each submitted choice ended */
void srv_job_set_seq_end(srv_job *j, void (*fn)(void *arg), void *arg);
const char *srv_job_id(const srv_job *j);
const char *srv_job_user(const srv_job *j);     /* the request's OpenAI "user" (NULL: none) */
bool srv_job_streaming(const srv_job *j);
int srv_job_choices(const srv_job *j);
int srv_job_priority(const srv_job *j);
int64_t srv_job_choice_cost(const srv_job *j, int i);   /* prompt + completion tokens at most */
/* hands choice i to the engine for `tenant`; -1 when the engine refused it (the choice has
 * ended, and the answer says the server was overloaded) */
int srv_job_submit_choice(srv_job *j, int i, const srv_engine *engine, const char *tenant);
/* ends choice i, which never reached the engine */
void srv_job_end_choice(srv_job *j, int i, zse_finish why);
bool srv_job_gone(srv_job *j);

typedef enum { SRV_PULL_DATA, SRV_PULL_WAIT, SRV_PULL_DONE } srv_pull;
/* Streaming: appends the SSE bytes of the events that arrived. With nothing new, calls
 * suspend(arg) under the lock (so a wake cannot slip in between) and returns WAIT; after
 * the last bytes it returns DONE. */
srv_pull srv_job_pull(srv_job *j, zse_buf *out, int *status, srv_wake_fn suspend, void *arg);
/* Whole answers: true when every choice has ended; else calls suspend(arg) under the lock
 * and the waker comes when the last one ends. */
bool srv_job_wait_whole(srv_job *j, srv_wake_fn suspend, void *arg);
/* the whole answer, its status (200; 500 when generation failed; 503 when the engine
 * refused it) and Retry-After; once every choice has ended */
int srv_job_whole(srv_job *j, zse_buf *out, int *status, int *retry_after);
/* the client left: engine requests are cancelled and later events dropped (its waiting
 * choices leave the admission queue through srv_admit_forget) */
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

/* ---- rendering: events → OpenAI / TGI JSON and SSE (render.c) --------------------------
 * The consumer-side state of a job; used only by the thread consuming its events. */
typedef struct srv_event {
    struct srv_event *next;
    int choice;
    int32_t token;          /* -1: an end without a token */
    float logprob;
    int n_top;
    int32_t *top_ids;       /* owned */
    float *top_logprobs;    /* owned */
    zse_finish finish;
    int prompt_tokens;
    int completion_tokens;
    double time;
    char *text;             /* owned */
    zse_logprobs *prompt_lp;    /* owned: [n_prompt_lp] the prompt's logprobs (first event, when asked) */
    int n_prompt_lp;
} srv_event;

typedef struct {
    int prompt;             /* index into req->prompts */
    bool finished;
    zse_finish finish;
    int32_t last_token;
    int completion_tokens;
    double t_first, t_last;
    int n_timed;
    zse_buf text;           /* whole text (non-streaming, TGI's final generated_text) */
    size_t text_offset;     /* completions logprobs: characters before the next token */
    json_t *logprobs;       /* chat: content list; completions: the legacy object; TGI: tokens */
    struct zse_tool_stream *tool_stream; /* streamed chat with tools: its text parsed into calls */
    json_t *prompt_lp;      /* vLLM prompt_logprobs list / TGI prefill list (once the first event came) */
    json_t *top_tokens;     /* TGI top_n_tokens: a list of alternatives per generated token */
    double sum_logprob;     /* of the generated tokens (TGI best_of picks the largest) */
} srv_choice;

typedef struct {
    const srv_request *req;
    const zse_model *model;
    const char *id, *model_id, *fingerprint;
    long long created;
    double t_arrival;
    double ttft;
    int32_t eos[8];
    int n_eos;
    char **echo;            /* per prompt, with echo: the text the answer starts with (made once) */
    srv_choice *choices;
    int n_choices;
    int n_finished;
    bool failed;            /* a choice's events were lost or could not be formatted */
    char error[512];        /* why the first failed sequence failed, as the engine said ("" = unsaid) */
    bool overloaded;        /* the engine refused a choice */
    const char *overload_reason;
} srv_render;

int srv_render_init(srv_render *rd, const srv_request *req, const zse_model *m, int n_choices);
void srv_render_free(srv_render *rd);
int srv_render_start(srv_render *rd, zse_buf *out);                      /* stream: roles, echo */
int srv_render_event(srv_render *rd, const srv_event *ev, zse_buf *out); /* bookkeeping (+ stream bytes) */
void srv_render_end_missing(srv_render *rd);                             /* unfinished choices end as errors */
int srv_render_tail(srv_render *rd, zse_buf *out);                       /* stream: error, usage, [DONE] */
int srv_render_whole(srv_render *rd, zse_buf *out, int *status, int *retry_after);
void srv_render_usage(const srv_render *rd, srv_job_usage *u);

/* ---- prompt logprobs in the APIs' shapes (score.c) ---------------------------------------
 * lp: the engine's [n_lp] entries for prompt p (the first is all zero; shown as null). */
json_t *srv_token_text(const zse_model *m, int32_t id);    /* the token decoded alone; U+FFFD if not UTF-8 */
/* OpenAI legacy (completions echo + logprobs): appends the prompt's tokens to legacy's lists;
 * *offset advances by each token's bytes */
int srv_score_legacy(const zse_model *m, const srv_prompt *p, const zse_logprobs *lp, int n_lp, int n_top,
                     json_t *legacy, size_t *offset);
/* vLLM prompt_logprobs: [null, {"<id>": {"logprob","rank","decoded_token"}}, ...] */
json_t *srv_score_vllm(const zse_model *m, const srv_prompt *p, const zse_logprobs *lp, int n_lp, int n_top);
/* TGI details.prefill: [{"id","text","logprob"}] */
json_t *srv_score_tgi_prefill(const zse_model *m, const srv_prompt *p, const zse_logprobs *lp, int n_lp);

/* ---- tokenizer routes, TGI /info, embeddings (tokenize.c, tgi_info.c, embed.c) -----------
 * Each takes a request body and gives 0 and *out (the answer object), or -1 and the error. */
/* vLLM's POST /tokenize: {"prompt"} or {"messages", add_generation_prompt, ...}, with
 * add_special_tokens and return_token_strs → {"count","max_model_len","tokens","token_strs"} */
int srv_tokenize(const zse_model *m, const srv_model_facts *mf, const char *body, size_t len, json_t **out,
                 srv_error *e);
/* vLLM's POST /detokenize: {"tokens"} → {"prompt"} */
int srv_detokenize(const zse_model *m, const srv_model_facts *mf, const char *body, size_t len, json_t **out,
                   srv_error *e);
/* vLLM's GET /tokenizer_info: tokenizer_config.json's fields, tokenizer_class, chat_template,
 * model_max_length */
json_t *srv_tokenizer_info(const zse_model *m, const srv_model_facts *mf);

typedef struct {
    int max_concurrent_requests;    /* sequences waiting and running at most */
    int max_best_of;
    int max_stop_sequences;
    int max_batch_size;             /* sequences the engine runs at once */
    int validation_workers;         /* threads that parse and tokenize */
    long long max_batch_total_tokens; /* 0: not reported */
} srv_tgi_limits;
json_t *srv_tgi_info(const zse_model *m, const srv_model_facts *mf, const srv_tgi_limits *lim);

/* POST /v1/embeddings (OpenAI): input a string, strings, token ids or lists of them;
 * encoding_format float or base64; the final hidden state pooled (pooling) and normalized.
 * user (may be NULL): the request's end-user id, for the request log ("" when none) */
int srv_embeddings(zse_model *m, const srv_model_facts *mf, zse_pooling pooling, const char *body, size_t len,
                   json_t **out, int *prompt_tokens, char *user, size_t user_cap, srv_error *e);

/* ---- fair admission of sequences to the engine (admit.c) ------------------------------- */
typedef struct srv_admit srv_admit;
typedef struct {
    int slots;                  /* sequences handed to the engine at once (running or queued
                                 * there: its --max-seqs and its queue) */
    int slots_per_tenant;       /* of them, at most this many for one key or address */
    int64_t tokens_per_tenant;  /* prompt + completion tokens one tenant may have waiting (0: set later) */
    int max_waiting;            /* sequences waiting in all; beyond, 503 */
} srv_admit_config;

srv_admit *srv_admit_start(const srv_admit_config *c);
/* sequences start flowing; tokens_per_tenant fills a budget the config left at 0 */
void srv_admit_set_engine(srv_admit *a, const srv_engine *e, int64_t tokens_per_tenant);
/* queues every choice of j for `tenant`; 429 (the tenant's waiting tokens) or 503 (the
 * queue is full, or stopping) in *err */
int srv_admit_enqueue(srv_admit *a, const char *tenant, srv_job *j, srv_error *err);
/* the client left: j's waiting choices end as cancelled */
void srv_admit_forget(srv_admit *a, srv_job *j);
int srv_admit_waiting(srv_admit *a);
/* ends what waits (as cancelled) and joins; after the engine has ended every sequence */
void srv_admit_stop(srv_admit *a);

/* ---- worker threads for slow request work (work.c) ------------------------------------- */
typedef struct srv_work srv_work;
typedef void (*srv_work_fn)(void *arg);
typedef enum { SRV_WORK_LIGHT, SRV_WORK_HEAVY } srv_work_lane;  /* each lane has threads of its own */
/* n_light threads at `nice` for light tasks, n_heavy at nice 19 for heavy ones */
srv_work *srv_work_start(int n_light, int n_heavy, int nice);
int srv_work_push(srv_work *w, srv_work_lane lane, srv_work_fn fn, void *arg);  /* -1 once stopping */
void srv_work_stop(srv_work *w);    /* runs what is queued, joins; later pushes fail */
void srv_work_free(srv_work *w);    /* stops, then frees */

/* ---- the connection guard: deadlines, eviction, refused-request budgets (guard.c) ------ */
typedef struct srv_guard srv_guard;
typedef struct srv_conn srv_conn;
typedef enum { SRV_CONN_HEAD, SRV_CONN_BODY, SRV_CONN_BUSY } srv_conn_state;
typedef enum {
    SRV_CLOSE_NONE, SRV_CLOSE_HEADER_TIMEOUT, SRV_CLOSE_BODY_TIMEOUT, SRV_CLOSE_EVICTED, SRV_CLOSE_HALF_CLOSED
} srv_close_reason;
typedef struct {
    int max_connections;        /* beyond 7/8 of it, the oldest waiting heads are closed */
    double header_timeout_s;    /* a request head must arrive within this (0 = no deadline) */
    double body_timeout_s;      /* a body within this of its head (0 = no deadline) */
    int refused_per_min;        /* refused requests answered per address and minute (0 = all) */
} srv_guard_config;
typedef struct {
    int open;
    uint64_t header_timeouts, body_timeouts, evicted, half_closed;
    uint64_t refused_unanswered;
} srv_guard_stats;

srv_guard *srv_guard_new(const srv_guard_config *c);
void srv_guard_free(srv_guard *g);
/* a connection opened (waiting for its first head); NULL when out of memory */
srv_conn *srv_guard_open(srv_guard *g, int fd, const char *addr, double now);
void srv_guard_set_state(srv_guard *g, srv_conn *c, srv_conn_state st, double now);
srv_close_reason srv_guard_reason(srv_guard *g, srv_conn *c);
/* before its descriptor is closed */
void srv_guard_close(srv_guard *g, srv_conn *c);
/* closes connections past their deadlines, heads the client half-closed before finishing,
 * and makes room when the table is nearly full (the watcher calls it every 100 ms) */
void srv_guard_tick(srv_guard *g, double now);
/* counts a refused request from addr: false when the address is over its budget (the
 * request gets no answer) */
bool srv_guard_refuse(srv_guard *g, const char *addr, double now);
void srv_guard_get_stats(srv_guard *g, srv_guard_stats *out);

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
/* opens (creating the file, its folders and the schema; making the file and its journals
 * private). Once per process and file: see srv_db_open_shared. */
srv_db *srv_db_open(const char *path);
/* another connection to a file this process has open already (srv_db_open checked it):
 * touches no descriptor of the file, as closing one would drop the first connection's locks */
srv_db *srv_db_open_shared(const char *path);
void srv_db_close(srv_db *db);
/* changes whenever another connection commits (PRAGMA data_version) */
int64_t srv_db_data_version(srv_db *db);

#define SRV_KEY_NAME_MAX 64
#define SRV_KEY_CHARS 52        /* "zse-" + 48 hex digits */
#define SRV_PRIORITY_MIN (-1000)
#define SRV_PRIORITY_MAX 1000

typedef struct {
    char name[SRV_KEY_NAME_MAX + 1];
    char prefix[16];            /* the key's first characters, for telling keys apart */
    unsigned char hash[32];     /* SHA-256 of the key */
    int rate_limit;             /* requests per minute; 0 = unlimited */
    int priority;               /* the most urgent priority its requests may ask for (lower runs first) */
    bool enabled;
    bool admin;                 /* role: may also call the /admin routes (the dashboard's) */
    double created;             /* unix seconds */
    double last_used;           /* 0 = never */
} srv_key;

bool srv_key_name_valid(const char *name);
void srv_key_hash(const char *key, size_t len, unsigned char out[32]);
/* makes a key, stores its hash, writes the key (shown once) to key_out */
int srv_key_create(srv_db *db, const char *name, int rate_limit, int priority, char key_out[SRV_KEY_CHARS + 1]);
/* the same, with the key's role: admin keys may also call the /admin routes */
int srv_key_create_as(srv_db *db, const char *name, int rate_limit, int priority, bool admin,
                      char key_out[SRV_KEY_CHARS + 1]);
int srv_key_set_admin(srv_db *db, const char *name, bool admin);
int srv_key_delete(srv_db *db, const char *name);
int srv_key_set_enabled(srv_db *db, const char *name, bool enabled);
int srv_key_set_rate_limit(srv_db *db, const char *name, int rate_limit);
int srv_key_set_priority(srv_db *db, const char *name, int priority);
int srv_key_list(srv_db *db, srv_key **out, size_t *n);
int srv_key_touch(srv_db *db, const char *name, double when);

/* The keys a running server checks requests against, with their rate-limit windows. */
typedef struct srv_keyring srv_keyring;
typedef enum { SRV_AUTH_OK, SRV_AUTH_MISSING, SRV_AUTH_UNKNOWN, SRV_AUTH_DISABLED, SRV_AUTH_LIMITED } srv_auth;

srv_keyring *srv_keyring_new(void);
void srv_keyring_free(srv_keyring *kr);
/* replaces the keys; windows of keys that stay (same name and limit) keep their history */
int srv_keyring_set(srv_keyring *kr, const srv_key *keys, size_t n);
/* a plain key given at start (zse serve --api-key, ZSE_API_KEY), accepted besides the
 * database's; requests with it are logged as key SRV_PLAIN_KEY_NAME */
#define SRV_PLAIN_KEY_NAME "api-key"
int srv_keyring_set_plain(srv_keyring *kr, const char *key);
size_t srv_keyring_size(srv_keyring *kr);
/* Checks "Bearer KEY" (the Authorization header value, may be NULL) in constant time over
 * the stored hashes, then the key's rate limit. name_out and priority get the key's name
 * and priority when known. */
srv_auth srv_keyring_check(srv_keyring *kr, const char *authorization, double now,
                           char name_out[SRV_KEY_NAME_MAX + 1], int *priority, srv_rate *rate);
/* the key of that name is enabled and an admin key (its role as the keyring holds it now) */
bool srv_keyring_is_admin(srv_keyring *kr, const char *name);

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
/* queues a row; never waits for the disk (rows beyond the queue bound, or lost to a failed
 * write, are counted as dropped) */
void srv_audit_log(srv_audit *a, const srv_audit_row *row);
uint64_t srv_audit_dropped(srv_audit *a);
/* counts a refused request (no valid key, unknown route, bad HTTP) for its minute, client
 * and status: refusals never take a row of the audit table or a place in its queue */
void srv_audit_refused(srv_audit *a, double when, const char *client, int status, const char *route);
uint64_t srv_audit_refused_total(srv_audit *a);
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

typedef struct {
    double minute;              /* unix seconds at the start of the minute */
    char client[64];            /* "*": addresses past the distinct ones counted in one write */
    int status;
    char route[64];             /* the last route refused */
    int64_t count;
} srv_refused_row;
/* adds the counts to those of the same (minute, client, status) */
int srv_refused_write(srv_db *db, const srv_refused_row *rows, size_t n);
int srv_refused_prune(srv_db *db, double older_than, int64_t max_rows);
/* counts of minutes since `since`, oldest first, at most limit (0 = all) of the newest */
int srv_refused_query(srv_db *db, double since, int limit, srv_refused_row **rows, size_t *n);

/* "90s", "15m", "1h", "7d", "2w" or plain seconds */
bool srv_parse_duration(const char *s, double *seconds);

/* ---- metrics (Prometheus text) ------------------------------------------------------- */
typedef enum {
    SRV_ROUTE_CHAT, SRV_ROUTE_COMPLETIONS, SRV_ROUTE_MODELS, SRV_ROUTE_GENERATE,
    SRV_ROUTE_GENERATE_STREAM, SRV_ROUTE_HEALTH, SRV_ROUTE_METRICS, SRV_ROUTE_LORA_LOAD,
    SRV_ROUTE_LORA_UNLOAD, SRV_ROUTE_TGI_COMPAT, SRV_ROUTE_DASHBOARD, SRV_ROUTE_UI_SESSION, SRV_ROUTE_ADMIN,
    SRV_ROUTE_TOKENIZE, SRV_ROUTE_DETOKENIZE, SRV_ROUTE_TOKENIZER_INFO, SRV_ROUTE_INFO, SRV_ROUTE_EMBEDDINGS,
    SRV_ROUTE_OTHER,
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
/* what the server knows at the moment of a scrape */
typedef struct {
    const zse_engine_stats *engine;     /* NULL while the model loads */
    bool ready;
    int active_requests;
    int waiting;                        /* sequences in the admission queue */
    size_t body_bytes;                  /* request bodies held */
    srv_guard_stats guard;
    uint64_t audit_dropped;
    uint64_t refused;
    const zse_mask_stats *mask;         /* constrained decoding's mask times; NULL while the model loads */
} srv_live_stats;
/* appends the exposition text */
int srv_metrics_render(srv_metrics *m, const srv_live_stats *live, zse_buf *out);
/* the model's memory (weights, KV cache, ...; the device's use and size on a GPU) as gauges;
 * waits for the engine's current step to end */
int srv_memory_metrics(zse_model *m, zse_buf *out);

/* ---- the web dashboard (dashboard.c) and its admin routes (admin.c) ---------------------
 * GET / is a single-page dashboard (a chat playground, a live view of /metrics, and with
 * --auth the keys and the audit log) whose files are compiled into the binary (CMake turns
 * src/server/dashboard/ into a C source), so it works offline and fetches nothing else. */
typedef struct {
    const char *path;               /* "/" for index.html, else "/ui/NAME" */
    const char *content_type;
    const unsigned char *data;
    size_t len;
} srv_asset;
extern const srv_asset srv_dashboard_assets[];   /* generated by cmake/embed_assets.cmake */
extern const size_t srv_dashboard_n_assets;
/* the file served at url, or NULL */
const srv_asset *srv_dashboard_asset(const char *url);
/* headers every dashboard answer carries: a strict Content-Security-Policy (scripts, styles
 * and fetches from this origin only, no inline code, no framing), nosniff, no referrer */
extern const char *const srv_dashboard_headers[][2];
extern const size_t srv_dashboard_n_headers;
/* GET /ui/session: who the caller is and what is served: {"auth", "key", "role", "ready",
 * "version", "started", "model": {...} or null}. m is NULL while loading and for a caller
 * without a key under --auth (the page then asks for one). */
json_t *srv_dashboard_session(const zse_model *m, const char *model_id, long long started, bool ready, bool auth,
                              const char *key, bool admin);

/* The admin routes (an admin key, --auth only): keys and the audit log.
 *   GET /admin/keys                      the keys (never their hashes)
 *   POST /admin/keys {name, rate_limit, priority, role}       201 with the new key, shown once
 *   POST /admin/keys/NAME {enabled, rate_limit, priority, role}   changes those given
 *   DELETE /admin/keys/NAME
 *   GET /admin/audit?since=1h&key=NAME&limit=N                the newest rows, oldest first */
typedef enum {
    SRV_ADMIN_KEYS_LIST, SRV_ADMIN_KEY_CREATE, SRV_ADMIN_KEY_UPDATE, SRV_ADMIN_KEY_DELETE, SRV_ADMIN_AUDIT
} srv_admin_op;
typedef struct {
    srv_admin_op op;
    char name[SRV_KEY_NAME_MAX + 1];    /* the key a /admin/keys/NAME route names */
    bool has_body;                      /* POST */
} srv_admin_call;
/* the operation of method + path (path without its query): 404 for a path that names none
 * (or a key name that cannot be), 405 with *allow set for a wrong method */
int srv_admin_route(const char *method, const char *path, srv_admin_call *out, const char **allow, srv_error *e);
/* a query argument by name (NULL when absent) */
typedef const char *(*srv_arg_fn)(void *ctx, const char *name);
/* Runs an admin call for the admin key `caller` on db: 0 with *status and *json (heap), or
 * -1 and the error (400 naming the field, 404 no such key, 409 a name taken or the caller's
 * own key disabled, deleted or demoted). After a change the keyring is reloaded at once. */
int srv_admin_run(const srv_admin_call *c, srv_db *db, srv_keyring *kr, const char *caller, const char *body,
                  size_t len, srv_arg_fn arg, void *arg_ctx, int *status, char **json, srv_error *e);

/* ---- the HTTP server ----------------------------------------------------------------- */
typedef struct {
    const char *host;           /* "127.0.0.1" */
    int port;                   /* 0 = any free port (srv_port() says which) */
    bool listen;                /* false: no listening socket, connections come by srv_adopt_connection */
    size_t max_body;            /* bytes */
    size_t max_buffered;        /* request body bytes held across all connections */
    int max_connections;
    int max_connections_per_ip; /* 0 = no cap */
    int timeout_s;              /* idle connection timeout */
    double header_timeout_s;    /* a whole request head, from the connection or the previous answer */
    double body_timeout_s;      /* a whole body, from its head */
    int refused_per_min;        /* refused requests answered per address and minute; 0 = all */
    int http_threads;
    int workers;                /* threads for parsing, templates, tokenizing, whole answers */
    int engine_slots;           /* sequences the engine runs at once (its max_seqs) */
    int max_seqs_per_key;       /* of them, for one key or address; 0 = all but an eighth */
    int64_t max_queued_tokens_per_key;  /* tokens waiting per key or address; 0 = engine_slots × context */
    int max_waiting;            /* sequences waiting in the server's queue; beyond, 503 */
    const char *cors_origin;    /* NULL = no CORS headers */
    const char *tls_cert;       /* PEM files; both or neither */
    const char *tls_key;
    bool auth;                  /* require a Bearer key on the API routes */
    srv_keyring *keyring;       /* with auth */
    srv_audit *audit;           /* NULL = no audit rows */
    const char *model_id;       /* the API id while loading; replaced by the model's name */
    bool log_requests;          /* one structured line per request on stderr */
    bool allow_lora_loading;    /* /v1/load_lora_adapter and /v1/unload_lora_adapter answer */
    const char *db_path;        /* the key database, for the /admin routes (with auth; opened already by audit) */
    int tool_parser;            /* --tool-parser: a zse_tool_format, 0 for none, -1 (default): detect */
    zse_pooling pooling;        /* /v1/embeddings: the last token's state (default) or the mean */
    const char *const *aliases; /* --served-model-name: the names requests may use (the first is the
                                 * one answers give); NULL: the model's own name */
    int n_aliases;
} srv_config;

void srv_config_default(srv_config *c);

typedef struct srv_server srv_server;
/* binds and starts answering (health says "loading" until srv_set_ready) */
srv_server *srv_start(const srv_config *c);
int srv_port(const srv_server *s);
/* hands an accepted socket to the server as a new connection (a server started without a
 * listening socket, e.g. fuzzing over a socketpair); the server closes it */
int srv_adopt_connection(srv_server *s, int fd, const struct sockaddr *addr, socklen_t len);
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
