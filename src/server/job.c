/* Generation jobs: the sequences of one HTTP request (prompts × n choices), the events the
 * engine reports for them, and their rendering as OpenAI chat / completion objects or TGI
 * objects, streamed (SSE) or whole.
 *
 * Threads: the engine thread calls on_event(), which only copies the event into the job's
 * queue and, if the connection is waiting, wakes it. The connection's thread (a
 * libmicrohttpd worker) calls srv_job_pull() and does all formatting, so the engine loop
 * spends microseconds per token on the server. The job lives until the HTTP side and every
 * submitted sequence have let go of it (reference count). */
#include "server/server.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

typedef struct srv_event {
    struct srv_event *next;
    int choice;
    int32_t token;
    float logprob;
    int n_top;
    int32_t *top_ids;       /* owned */
    float *top_logprobs;    /* owned */
    zse_finish finish;
    int prompt_tokens;
    int completion_tokens;
    double time;
    char *text;             /* owned */
} srv_event;

/* what the engine thread's callback gets as `user`: the job and which sequence */
typedef struct {
    srv_job *job;
    int index;
} seq_ref;

typedef struct {
    /* engine side (under the job's lock) */
    uint64_t engine_id;
    bool submitted;
    bool engine_done;
    /* consumer side (the connection's thread only) */
    int prompt;             /* index into req.prompts */
    bool finished;
    zse_finish finish;
    int32_t last_token;
    int completion_tokens;
    double t_first, t_last;
    int n_timed;
    zse_buf text;           /* whole text (non-streaming, TGI's final generated_text) */
    size_t text_offset;     /* completions logprobs: characters before the next token */
    json_t *logprobs;       /* chat: content list; completions: the legacy object; TGI: tokens */
} choice;

struct srv_job {
    pthread_mutex_t mu;
    int refs;
    srv_request req;
    const zse_model *model;
    int32_t eos[8];
    int n_eos;
    char *model_id;
    char *fingerprint;
    char id[48];
    long long created;
    double t_arrival;
    choice *choices;
    seq_ref *refs_for_engine;
    int n_choices;
    /* under mu */
    srv_event *head, *tail;
    int n_submitted;
    int n_engine_done;
    bool waiting;
    bool gone;
    srv_wake_fn wake;
    void *wake_arg;
    /* consumer side */
    bool started;           /* the first stream bytes (roles, echo) went out */
    bool tail_sent;
    int n_finished;
    bool failed;
    double ttft;
    char error[512];        /* why the first failed sequence failed (under mu; read after its end) */
};

/* ---- life ---------------------------------------------------------------------------- */

static void random_hex(char *out, size_t n_chars)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char raw[32];
    size_t n = (n_chars + 1) / 2;
    if (n > sizeof raw)
        n = sizeof raw;
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(raw, 1, n, f) : 0;
    if (f)
        fclose(f);
    uint64_t x = (uint64_t)(zse_now() * 1e9);
    for (size_t i = got; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        raw[i] = (unsigned char)(x >> 56);
    }
    for (size_t i = 0; i < n_chars; i++)
        out[i] = hex[(raw[i / 2] >> (i % 2 ? 0 : 4)) & 15];
    out[n_chars] = '\0';
}

static const char *id_prefix(srv_api api)
{
    return api == SRV_API_CHAT ? "chatcmpl-" : api == SRV_API_COMPLETION ? "cmpl-" : "gen-";
}

srv_job *srv_job_new(srv_request *req, const zse_model *m, const char *model_id, const char *fingerprint,
                     double t_arrival)
{
    srv_job *j = zse_calloc(1, sizeof *j);
    if (!j)
        return NULL;
    pthread_mutex_init(&j->mu, NULL);
    j->refs = 1;
    j->req = *req;
    memset(req, 0, sizeof *req);
    j->model = m;
    j->t_arrival = t_arrival;
    j->ttft = -1;
    j->created = (long long)time(NULL);
    size_t pre = strlen(id_prefix(j->req.api));
    memcpy(j->id, id_prefix(j->req.api), pre);
    random_hex(j->id + pre, 24);
    zse_model_info info;
    zse_model_get_info(m, &info);
    for (int i = 0; i < info.n_eos && j->n_eos < 8; i++)
        j->eos[j->n_eos++] = info.eos_ids[i];
    j->n_choices = (int)j->req.n_prompts * j->req.n;
    j->model_id = zse_strdup(model_id);
    j->fingerprint = zse_strdup(fingerprint);
    j->choices = zse_calloc((size_t)j->n_choices, sizeof *j->choices);
    j->refs_for_engine = zse_calloc((size_t)j->n_choices, sizeof *j->refs_for_engine);
    if (!j->model_id || !j->fingerprint || !j->choices || !j->refs_for_engine) {
        srv_job_unref(j);
        return NULL;
    }
    for (int i = 0; i < j->n_choices; i++) {
        j->choices[i].prompt = i / j->req.n;
        j->refs_for_engine[i].job = j;
        j->refs_for_engine[i].index = i;
    }
    return j;
}

static void free_event(srv_event *ev)
{
    free(ev->text);
    free(ev->top_ids);
    free(ev->top_logprobs);
    free(ev);
}

static void free_job(srv_job *j)
{
    for (srv_event *ev = j->head, *next; ev; ev = next) {
        next = ev->next;
        free_event(ev);
    }
    for (int i = 0; j->choices && i < j->n_choices; i++) {
        zse_buf_free(&j->choices[i].text);
        json_decref(j->choices[i].logprobs);
    }
    free(j->choices);
    free(j->refs_for_engine);
    free(j->model_id);
    free(j->fingerprint);
    srv_request_free(&j->req);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

void srv_job_ref(srv_job *j)
{
    pthread_mutex_lock(&j->mu);
    j->refs++;
    pthread_mutex_unlock(&j->mu);
}

void srv_job_unref(srv_job *j)
{
    if (!j)
        return;
    pthread_mutex_lock(&j->mu);
    bool last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (last)
        free_job(j);
}

void srv_job_set_waker(srv_job *j, srv_wake_fn wake, void *arg)
{
    pthread_mutex_lock(&j->mu);
    j->wake = wake;
    j->wake_arg = arg;
    pthread_mutex_unlock(&j->mu);
}

const char *srv_job_id(const srv_job *j) { return j->id; }
bool srv_job_streaming(const srv_job *j) { return j->req.stream; }

/* ---- the engine side ----------------------------------------------------------------- */

static srv_event *copy_event(int choice_index, const zse_token_event *ev)
{
    srv_event *e = zse_calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->choice = choice_index;
    e->token = ev->token;
    e->logprob = ev->logprob;
    e->finish = ev->finish;
    e->prompt_tokens = ev->prompt_tokens;
    e->completion_tokens = ev->completion_tokens;
    e->time = zse_now();
    e->text = zse_strdup(ev->text ? ev->text : "");
    if (ev->n_top > 0 && ev->top_ids && ev->top_logprobs) {
        e->n_top = ev->n_top;
        e->top_ids = zse_malloc((size_t)ev->n_top * sizeof *e->top_ids);
        e->top_logprobs = zse_malloc((size_t)ev->n_top * sizeof *e->top_logprobs);
        if (e->top_ids && e->top_logprobs) {
            memcpy(e->top_ids, ev->top_ids, (size_t)ev->n_top * sizeof *e->top_ids);
            memcpy(e->top_logprobs, ev->top_logprobs, (size_t)ev->n_top * sizeof *e->top_logprobs);
        }
    }
    if (!e->text || (e->n_top && (!e->top_ids || !e->top_logprobs))) {
        free_event(e);
        return NULL;
    }
    return e;
}

static bool on_event(void *user, const zse_token_event *ev)
{
    seq_ref *ref = user;
    srv_job *j = ref->job;
    bool final = ev->finish != ZSE_FINISH_NONE;
    srv_event *e = copy_event(ref->index, ev);
    pthread_mutex_lock(&j->mu);
    if (ev->finish == ZSE_FINISH_ERROR && ev->error && !j->error[0])
        snprintf(j->error, sizeof j->error, "%s", ev->error);
    bool keep_going = !j->gone && e != NULL;
    if (keep_going) {
        if (j->tail)
            j->tail->next = e;
        else
            j->head = e;
        j->tail = e;
        e = NULL;
    } else if (!j->gone) {
        j->failed = true; /* out of memory copying: the sequence ends as failed */
    }
    if (final) {
        j->choices[ref->index].engine_done = true;
        j->n_engine_done++;
    }
    bool all_done = j->n_engine_done == j->n_submitted;
    if (j->waiting && (j->req.stream || all_done)) {
        j->waiting = false;
        if (j->wake)
            j->wake(j->wake_arg);
    }
    pthread_mutex_unlock(&j->mu);
    if (e)
        free_event(e);
    if (final)
        srv_job_unref(j); /* the sequence's reference */
    return keep_going;
}

int srv_job_submit(srv_job *j, const srv_engine *engine, srv_error *err)
{
    for (int i = 0; i < j->n_choices; i++) {
        choice *c = &j->choices[i];
        srv_prompt *p = &j->req.prompts[c->prompt];
        zse_sampling s = j->req.sampling;
        s.seed += (uint64_t)(i % j->req.n); /* choices of one prompt differ, reproducibly */
        srv_job_ref(j);
        pthread_mutex_lock(&j->mu);
        j->n_submitted++;
        pthread_mutex_unlock(&j->mu);
        uint64_t id = 0;
        if (engine->submit(engine->ctx, p->ids, p->n_ids, &s, j->req.priority, on_event, &j->refs_for_engine[i],
                           &id) != 0) {
            pthread_mutex_lock(&j->mu);
            j->n_submitted--;
            pthread_mutex_unlock(&j->mu);
            srv_job_unref(j);
            srv_error_set(err, 503, "server_error", "overloaded", NULL,
                          "the server cannot take this request now (%s); retry shortly", zse_last_error());
            err->retry_after = 1;
            srv_job_abandon(j, engine);
            return -1;
        }
        pthread_mutex_lock(&j->mu);
        c->engine_id = id;
        c->submitted = true;
        pthread_mutex_unlock(&j->mu);
    }
    return 0;
}

void srv_job_abandon(srv_job *j, const srv_engine *engine)
{
    uint64_t ids[64];
    int n = 0;
    pthread_mutex_lock(&j->mu);
    j->gone = true;
    for (int i = 0; i < j->n_choices && n < 64; i++)
        if (j->choices[i].submitted && !j->choices[i].engine_done)
            ids[n++] = j->choices[i].engine_id;
    pthread_mutex_unlock(&j->mu);
    /* outside the lock: the engine may hold its own lock while it calls on_event */
    for (int i = 0; i < n; i++)
        engine->cancel(engine->ctx, ids[i]);
}

bool srv_job_probe_waiting(srv_job *j, bool (*probe)(void *arg), void *arg)
{
    pthread_mutex_lock(&j->mu);
    bool hung_up = j->waiting && !j->gone && probe(arg);
    if (hung_up)
        j->gone = true;
    pthread_mutex_unlock(&j->mu);
    return hung_up;
}

void srv_job_get_usage(srv_job *j, srv_job_usage *u)
{
    memset(u, 0, sizeof *u);
    for (size_t i = 0; i < j->req.n_prompts; i++)
        u->prompt_tokens += (int)j->req.prompts[i].n_ids;
    u->ttft = j->ttft;
    for (int i = 0; i < j->n_choices; i++) {
        const choice *c = &j->choices[i];
        u->completion_tokens += c->completion_tokens;
        if (c->n_timed >= 2 && u->n_tpot < 64)
            u->tpot[u->n_tpot++] = (c->t_last - c->t_first) / (c->n_timed - 1);
    }
}

/* ---- formatting ---------------------------------------------------------------------- */

static const char *openai_finish(zse_finish f)
{
    switch (f) {
    case ZSE_FINISH_STOP: return "stop";
    case ZSE_FINISH_LENGTH: return "length";
    case ZSE_FINISH_CANCELLED: return "abort";
    default: return "error";
    }
}

static bool is_eos(const srv_job *j, int32_t t)
{
    for (int i = 0; i < j->n_eos; i++)
        if (j->eos[i] == t)
            return true;
    return false;
}

static const char *tgi_finish(const srv_job *j, const choice *c)
{
    if (c->finish == ZSE_FINISH_LENGTH)
        return "length";
    if (c->finish == ZSE_FINISH_STOP)
        return is_eos(j, c->last_token) ? "eos_token" : "stop_sequence";
    return "error";
}

/* a token's text as logprobs show it */
static json_t *token_string(const srv_job *j, int32_t id)
{
    char *s = zse_detokenize(j->model, &id, 1, false);
    json_t *v = s ? json_string(s) : NULL;
    if (!v && s)
        v = json_string("\xef\xbf\xbd"); /* not valid UTF-8 on its own */
    free(s);
    return v;
}

static json_t *utf8_bytes(json_t *str)
{
    json_t *a = json_array();
    const unsigned char *p = (const unsigned char *)json_string_value(str);
    for (size_t i = 0; a && p && i < json_string_length(str); i++)
        if (json_array_append_new(a, json_integer(p[i])) != 0) {
            json_decref(a);
            return NULL;
        }
    return a;
}

/* whether the event carries a generated token (not the EOS that ended the sequence, nor
 * an end without a token) */
static bool carries_token(const srv_job *j, const srv_event *ev)
{
    if (ev->token < 0)
        return false;
    return !(ev->finish == ZSE_FINISH_STOP && !ev->text[0] && is_eos(j, ev->token));
}

/* chat: {"token","logprob","bytes","top_logprobs":[{"token","logprob","bytes"}]} */
static json_t *chat_logprob(const srv_job *j, const srv_event *ev)
{
    json_t *top = json_array();
    for (int k = 0; top && k < ev->n_top; k++) {
        json_t *t = token_string(j, ev->top_ids[k]);
        json_t *entry = t ? json_pack("{s:O, s:f, s:o}", "token", t, "logprob", (double)ev->top_logprobs[k], "bytes",
                                      utf8_bytes(t))
                          : NULL;
        json_decref(t);
        if (!entry || json_array_append_new(top, entry) != 0) {
            json_decref(top);
            return NULL;
        }
    }
    json_t *tok = token_string(j, ev->token);
    json_t *entry = tok && top ? json_pack("{s:O, s:f, s:o, s:O}", "token", tok, "logprob", (double)ev->logprob,
                                           "bytes", utf8_bytes(tok), "top_logprobs", top)
                               : NULL;
    json_decref(tok);
    json_decref(top);
    return entry;
}

/* completions: appends to the legacy {"tokens","token_logprobs","top_logprobs","text_offset"} */
static int completion_logprob(const srv_job *j, const srv_event *ev, size_t offset, json_t *lp)
{
    json_t *tok = token_string(j, ev->token);
    json_t *top = json_object();
    for (int k = 0; tok && top && k < ev->n_top; k++) {
        char *s = zse_detokenize(j->model, &ev->top_ids[k], 1, false);
        int rc = s ? json_object_set_new(top, s, json_real(ev->top_logprobs[k])) : -1;
        free(s);
        if (rc != 0)
            break;
    }
    int rc = tok && top &&
                     json_array_append(json_object_get(lp, "tokens"), tok) == 0 &&
                     json_array_append_new(json_object_get(lp, "token_logprobs"), json_real(ev->logprob)) == 0 &&
                     json_array_append(json_object_get(lp, "top_logprobs"), top) == 0 &&
                     json_array_append_new(json_object_get(lp, "text_offset"), json_integer((json_int_t)offset)) == 0
                 ? 0
                 : -1;
    json_decref(tok);
    json_decref(top);
    return rc;
}

static json_t *empty_completion_logprobs(void)
{
    return json_pack("{s:[], s:[], s:[], s:[]}", "tokens", "token_logprobs", "top_logprobs", "text_offset");
}

/* TGI: {"id","text","logprob","special"} */
static json_t *tgi_token(const srv_job *j, const srv_event *ev)
{
    return json_pack("{s:i, s:s, s:f, s:b}", "id", (int)ev->token, "text", ev->text, "logprob", (double)ev->logprob,
                     "special", is_eos(j, ev->token));
}

static json_t *base_object(const srv_job *j, const char *object)
{
    return json_pack("{s:s, s:s, s:I, s:s, s:s}", "id", j->id, "object", object, "created", (json_int_t)j->created,
                     "model", j->model_id, "system_fingerprint", j->fingerprint);
}

static json_t *usage_object(srv_job *j)
{
    srv_job_usage u;
    srv_job_get_usage(j, &u);
    return json_pack("{s:i, s:i, s:i}", "prompt_tokens", u.prompt_tokens, "completion_tokens", u.completion_tokens,
                     "total_tokens", u.prompt_tokens + u.completion_tokens);
}

/* "data: JSON\n\n"; consumes obj */
static int sse(zse_buf *out, json_t *obj)
{
    char *s = obj ? json_dumps(obj, JSON_COMPACT) : NULL;
    json_decref(obj);
    if (!s)
        return zse_fail("out of memory formatting a stream event");
    int rc = zse_buf_puts(out, "data: ") || zse_buf_puts(out, s) || zse_buf_puts(out, "\n\n") ? -1 : 0;
    free(s);
    return rc;
}

/* a chat.completion.chunk / text_completion chunk holding one choice */
static json_t *chunk(srv_job *j, json_t *choice_obj)
{
    bool chat = j->req.api == SRV_API_CHAT;
    json_t *o = base_object(j, chat ? "chat.completion.chunk" : "text_completion");
    if (!o || !choice_obj || json_object_set_new(o, "choices", json_pack("[o]", choice_obj)) != 0) {
        json_decref(o);
        return NULL;
    }
    if (j->req.include_usage)
        json_object_set_new(o, "usage", json_null());
    return o;
}

static json_t *chat_delta_choice(int index, json_t *delta, json_t *logprobs, const char *finish)
{
    return json_pack("{s:i, s:o, s:o, s:o}", "index", index, "delta", delta, "logprobs",
                     logprobs ? logprobs : json_null(), "finish_reason", finish ? json_string(finish) : json_null());
}

static json_t *completion_choice(int index, const char *text, size_t len, json_t *logprobs, const char *finish)
{
    return json_pack("{s:i, s:s#, s:o, s:o}", "index", index, "text", text, len, "logprobs",
                     logprobs ? logprobs : json_null(), "finish_reason", finish ? json_string(finish) : json_null());
}

/* the text a completion choice starts with when echo is on */
static char *prompt_text(srv_job *j, const srv_prompt *p)
{
    return p->text ? zse_strdup(p->text) : zse_detokenize(j->model, p->ids, p->n_ids, false);
}

/* what goes out before any token: the assistant role of each chat choice, or the echoed
 * prompt of each completion choice */
static int start_stream(srv_job *j, zse_buf *out)
{
    for (int i = 0; i < j->n_choices; i++) {
        if (j->req.api == SRV_API_CHAT) {
            json_t *delta = json_pack("{s:s, s:s}", "role", "assistant", "content", "");
            if (sse(out, chunk(j, chat_delta_choice(i, delta, NULL, NULL))))
                return -1;
        } else if (j->req.api == SRV_API_COMPLETION && j->req.echo) {
            char *t = prompt_text(j, &j->req.prompts[j->choices[i].prompt]);
            int rc = t ? sse(out, chunk(j, completion_choice(i, t, strlen(t), NULL, NULL))) : -1;
            if (t)
                j->choices[i].text_offset = strlen(t);
            free(t);
            if (rc)
                return -1;
        }
    }
    return 0;
}

static int stream_chat_event(srv_job *j, const srv_event *ev, bool token, zse_buf *out)
{
    json_t *lp = NULL;
    if (j->req.logprobs && token) {
        json_t *entry = chat_logprob(j, ev);
        if (!entry || !(lp = json_pack("{s:[o]}", "content", entry)))
            return zse_fail("out of memory formatting logprobs");
    }
    if (ev->text[0] || lp) {
        json_t *delta = json_pack("{s:s}", "content", ev->text);
        if (sse(out, chunk(j, chat_delta_choice(ev->choice, delta, lp, NULL))))
            return -1;
    }
    if (ev->finish != ZSE_FINISH_NONE)
        return sse(out, chunk(j, chat_delta_choice(ev->choice, json_object(), NULL, openai_finish(ev->finish))));
    return 0;
}

static int stream_completion_event(srv_job *j, const srv_event *ev, bool token, zse_buf *out)
{
    choice *c = &j->choices[ev->choice];
    json_t *lp = NULL;
    if (j->req.logprobs && token) {
        lp = empty_completion_logprobs();
        if (!lp || completion_logprob(j, ev, c->text_offset, lp)) {
            json_decref(lp);
            return zse_fail("out of memory formatting logprobs");
        }
    }
    size_t len = strlen(ev->text);
    c->text_offset += len;
    const char *finish = ev->finish != ZSE_FINISH_NONE ? openai_finish(ev->finish) : NULL;
    if (!len && !lp && !finish)
        return 0;
    return sse(out, chunk(j, completion_choice(ev->choice, ev->text, len, lp, finish)));
}

static json_t *tgi_details(srv_job *j, const choice *c, bool with_tokens)
{
    /* prompt_tokens: LoRAX's details carry it (its client requires it; TGI's ignore it) */
    json_t *d = json_pack("{s:s, s:I, s:i, s:o}", "finish_reason", tgi_finish(j, c), "prompt_tokens",
                          (json_int_t)j->req.prompts[c->prompt].n_ids, "generated_tokens", c->completion_tokens, "seed",
                          j->req.sampling.temperature > 0 ? json_integer((json_int_t)j->req.sampling.seed) : json_null());
    if (d && with_tokens) {
        json_object_set_new(d, "prefill", json_array());
        json_object_set(d, "tokens", c->logprobs ? c->logprobs : json_array());
    }
    return d;
}

static int stream_tgi_event(srv_job *j, const srv_event *ev, zse_buf *out)
{
    if (ev->token < 0 && ev->finish == ZSE_FINISH_NONE)
        return 0;
    choice *c = &j->choices[ev->choice];
    bool final = ev->finish != ZSE_FINISH_NONE;
    json_t *o = json_pack("{s:i, s:o, s:n, s:n}", "index", c->completion_tokens, "token",
                          ev->token >= 0 ? tgi_token(j, ev) : json_null(), "generated_text", "details");
    if (o && final) {
        zse_buf full = {0};
        if (j->req.echo) {
            char *t = prompt_text(j, &j->req.prompts[0]);
            zse_buf_puts(&full, t ? t : "");
            free(t);
        }
        zse_buf_append(&full, zse_buf_str(&c->text), c->text.len);
        json_object_set_new(o, "generated_text", json_stringn(zse_buf_str(&full), full.len));
        zse_buf_free(&full);
        if (j->req.details)
            json_object_set_new(o, "details", tgi_details(j, c, false));
    }
    return sse(out, o);
}

/* consumer-side bookkeeping of one event, then its bytes when streaming */
static int apply_event(srv_job *j, const srv_event *ev, zse_buf *out)
{
    choice *c = &j->choices[ev->choice];
    bool token = carries_token(j, ev);
    if (token) {
        c->completion_tokens++;
        if (c->n_timed++ == 0)
            c->t_first = ev->time;
        c->t_last = ev->time;
        if (j->ttft < 0)
            j->ttft = ev->time - j->t_arrival;
    }
    if (ev->finish != ZSE_FINISH_NONE) {
        c->finished = true;
        c->finish = ev->finish;
        c->last_token = ev->token;
        if (ev->completion_tokens > c->completion_tokens)
            c->completion_tokens = ev->completion_tokens;
        j->n_finished++;
    }
    /* whole text: non-streaming answers and TGI's final generated_text */
    if ((!j->req.stream || j->req.api == SRV_API_TGI) && zse_buf_puts(&c->text, ev->text))
        return -1;
    if (j->req.stream) {
        if (j->req.api == SRV_API_CHAT)
            return stream_chat_event(j, ev, token, out);
        if (j->req.api == SRV_API_COMPLETION)
            return stream_completion_event(j, ev, token, out);
        return stream_tgi_event(j, ev, out);
    }
    if (!j->req.logprobs || !token)
        return 0;
    if (j->req.api == SRV_API_CHAT) {
        if (!c->logprobs && !(c->logprobs = json_array()))
            return -1;
        json_t *entry = chat_logprob(j, ev);
        return entry ? json_array_append_new(c->logprobs, entry) : -1;
    }
    if (j->req.api == SRV_API_COMPLETION) {
        if (!c->logprobs) {
            if (!(c->logprobs = empty_completion_logprobs()))
                return -1;
            if (j->req.echo) { /* offsets count the echoed prompt too */
                char *t = prompt_text(j, &j->req.prompts[c->prompt]);
                c->text_offset = t ? strlen(t) : 0;
                free(t);
            }
        }
        int rc = completion_logprob(j, ev, c->text_offset, c->logprobs);
        c->text_offset += strlen(ev->text);
        return rc;
    }
    if (!c->logprobs && !(c->logprobs = json_array()))
        return -1;
    return json_array_append_new(c->logprobs, tgi_token(j, ev));
}

/* sequences whose end never reached us (dropped when memory ran out, or abandoned) end as
 * errors so the answer can still close */
static void end_missing(srv_job *j)
{
    for (int i = 0; i < j->n_choices; i++) {
        choice *c = &j->choices[i];
        if (!c->finished) {
            c->finished = true;
            c->finish = ZSE_FINISH_ERROR;
            j->n_finished++;
        }
    }
}

static bool any_error(const srv_job *j)
{
    for (int i = 0; i < j->n_choices; i++)
        if (j->choices[i].finish == ZSE_FINISH_ERROR)
            return true;
    return j->failed;
}

static int stream_tail(srv_job *j, zse_buf *out)
{
    if (j->req.api == SRV_API_TGI)
        return 0;
    if (any_error(j)) {
        srv_error e;
        srv_error_set(&e, 500, "server_error", NULL, NULL, "generation failed part-way; the output is incomplete%s%s",
                      j->error[0] ? ": " : "", j->error);
        char *s = srv_error_openai_json(&e);
        int rc = s ? zse_buf_printf(out, "data: %s\n\n", s) : -1;
        free(s);
        if (rc)
            return -1;
    }
    if (j->req.include_usage) {
        json_t *o = base_object(j, j->req.api == SRV_API_CHAT ? "chat.completion.chunk" : "text_completion");
        if (!o || json_object_set_new(o, "choices", json_array()) || json_object_set_new(o, "usage", usage_object(j)) ||
            sse(out, o))
            return -1;
    }
    return zse_buf_puts(out, "data: [DONE]\n\n");
}

/* the non-streaming answer: the API's object around `choices` (taken) and usage */
static json_t *whole_object(srv_job *j, const char *object, json_t *choices)
{
    json_t *o = base_object(j, object);
    if (!o || !choices) {
        json_decref(o);
        json_decref(choices);
        return NULL;
    }
    /* json_object_set_new takes its value even when it fails */
    if (json_object_set_new(o, "choices", choices) || json_object_set_new(o, "usage", usage_object(j))) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static json_t *whole_chat(srv_job *j)
{
    json_t *choices = json_array();
    for (int i = 0; choices && i < j->n_choices; i++) {
        choice *c = &j->choices[i];
        json_t *msg = json_pack("{s:s, s:s#}", "role", "assistant", "content", zse_buf_str(&c->text), c->text.len);
        json_t *lp = j->req.logprobs ? json_pack("{s:O}", "content", c->logprobs ? c->logprobs : json_array()) : json_null();
        json_t *ch = json_pack("{s:i, s:o, s:o, s:s}", "index", i, "message", msg, "logprobs", lp, "finish_reason",
                               openai_finish(c->finish));
        if (!ch || json_array_append_new(choices, ch)) {
            json_decref(choices);
            return NULL;
        }
    }
    return whole_object(j, "chat.completion", choices);
}

static json_t *whole_completion(srv_job *j)
{
    json_t *choices = json_array();
    for (int i = 0; choices && i < j->n_choices; i++) {
        choice *c = &j->choices[i];
        zse_buf text = {0};
        if (j->req.echo) {
            char *t = prompt_text(j, &j->req.prompts[c->prompt]);
            zse_buf_puts(&text, t ? t : "");
            free(t);
        }
        zse_buf_append(&text, zse_buf_str(&c->text), c->text.len);
        json_t *lp = j->req.logprobs ? (c->logprobs ? json_incref(c->logprobs) : empty_completion_logprobs()) : NULL;
        json_t *ch = completion_choice(i, zse_buf_str(&text), text.len, lp, openai_finish(c->finish));
        zse_buf_free(&text);
        if (!ch || json_array_append_new(choices, ch)) {
            json_decref(choices);
            return NULL;
        }
    }
    return whole_object(j, "text_completion", choices);
}

static json_t *whole_tgi(srv_job *j)
{
    choice *c = &j->choices[0];
    zse_buf full = {0};
    if (j->req.echo) {
        char *t = prompt_text(j, &j->req.prompts[0]);
        zse_buf_puts(&full, t ? t : "");
        free(t);
    }
    zse_buf_append(&full, zse_buf_str(&c->text), c->text.len);
    json_t *o = json_pack("{s:s#}", "generated_text", zse_buf_str(&full), full.len);
    zse_buf_free(&full);
    if (o && j->req.details)
        json_object_set_new(o, "details", tgi_details(j, c, true));
    return o;
}

static int whole_body(srv_job *j, zse_buf *out, int *status)
{
    json_t *o;
    if (any_error(j)) {
        srv_error e;
        srv_error_set(&e, 500, "server_error", NULL, NULL, "generation failed; nothing was produced%s%s",
                      j->error[0] ? ": " : "", j->error);
        char *s = j->req.api == SRV_API_TGI ? srv_error_tgi_json(&e) : srv_error_openai_json(&e);
        int rc = s ? zse_buf_puts(out, s) : -1;
        free(s);
        *status = 500;
        return rc;
    }
    o = j->req.api == SRV_API_CHAT ? whole_chat(j) : j->req.api == SRV_API_COMPLETION ? whole_completion(j) : whole_tgi(j);
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s)
        return zse_fail("out of memory formatting the response");
    int rc = zse_buf_puts(out, s);
    free(s);
    return rc;
}

srv_pull srv_job_pull(srv_job *j, zse_buf *out, int *status, srv_wake_fn suspend, void *arg)
{
    *status = 200;
    if (j->req.stream && !j->started) {
        j->started = true;
        if (start_stream(j, out) != 0)
            j->failed = true;
    }
    for (;;) {
        if (j->tail_sent)
            return out->len ? SRV_PULL_DATA : SRV_PULL_DONE;
        pthread_mutex_lock(&j->mu);
        srv_event *evs = j->head;
        j->head = j->tail = NULL;
        bool engine_done = j->n_engine_done == j->n_submitted;
        if (!evs && !engine_done && out->len == 0) {
            j->waiting = true;
            suspend(arg); /* under the lock: a wake cannot come before the suspension */
            pthread_mutex_unlock(&j->mu);
            return SRV_PULL_WAIT;
        }
        pthread_mutex_unlock(&j->mu);
        for (srv_event *ev = evs, *next; ev; ev = next) {
            next = ev->next;
            if (apply_event(j, ev, out) != 0)
                j->failed = true;
            free_event(ev);
        }
        if (!evs && engine_done && j->n_finished < j->n_choices)
            end_missing(j);
        if (j->n_finished == j->n_choices) {
            int rc = j->req.stream ? stream_tail(j, out) : whole_body(j, out, status);
            if (rc != 0 && !j->req.stream)
                *status = 500;
            j->tail_sent = true;
        }
        if (out->len && (j->req.stream || j->tail_sent))
            return SRV_PULL_DATA;
    }
}
