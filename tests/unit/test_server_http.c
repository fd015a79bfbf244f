/* server: the HTTP layer end to end over real sockets, driven by a scripted generator (this
 * file's fake_engine, not the real engine: it emits a fixed token script at a chosen pace,
 * so responses, streaming, disconnects and overload can be checked exactly). The real
 * engine behind `zse serve` is tested by the pytest suite in tests/api. */
#include "server_test_model.h"

#include "server/server.h"

#include <arpa/inet.h>
#include <signal.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

/* ---- the scripted generator ---------------------------------------------------------- */

typedef struct fake_req {
    struct fake_req *next;
    uint64_t id;
    zse_sampling s;
    int max_tokens;
    zse_token_cb cb;
    void *user;
    bool cancelled;
    bool paused;            /* under the engine's lock */
    int produced;
    int prompt_tokens;
} fake_req;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    fake_req *head;
    fake_req *live[256];    /* every request not yet ended (max_active at most) */
    int n_live;
    int n_active;
    int max_active;         /* submit fails beyond (queue full) */
    bool stop;
    pthread_t thread;
    const zse_model *m;
    int32_t script[16];
    int n_script;
    double delay_s;         /* between steps */
    uint64_t next_id;
    char last_tenant[96];   /* whose the last submitted sequence was */
    atomic_int cancels, submitted, finished, pauses, resumes;
} fake_engine;

static int fake_submit(void *ctx, const char *tenant, const int32_t *prompt, size_t n, const zse_sampling *s,
                       int priority, zse_token_cb cb, void *user, uint64_t *id)
{
    (void)prompt;
    (void)priority;
    fake_engine *fe = ctx;
    pthread_mutex_lock(&fe->mu);
    if (fe->n_active >= fe->max_active || fe->stop) {
        pthread_mutex_unlock(&fe->mu);
        return zse_fail("queue full (%d waiting)", fe->n_active);
    }
    snprintf(fe->last_tenant, sizeof fe->last_tenant, "%s", tenant ? tenant : "");
    fake_req *r = calloc(1, sizeof *r);
    r->id = ++fe->next_id;
    r->s = *s;
    r->max_tokens = s->max_tokens > 0 ? s->max_tokens : 20;
    r->cb = cb;
    r->user = user;
    r->prompt_tokens = (int)n;
    r->next = fe->head;
    fe->head = r;
    fe->n_active++;
    fe->live[fe->n_live++] = r;
    *id = r->id;
    atomic_fetch_add(&fe->submitted, 1);
    pthread_cond_signal(&fe->cv);
    pthread_mutex_unlock(&fe->mu);
    return 0;
}

static void fake_cancel(void *ctx, uint64_t id)
{
    fake_engine *fe = ctx;
    pthread_mutex_lock(&fe->mu);
    /* live, not head: during a step the running requests are off fe->head, and a cancel
     * then must not be lost (the sequence would run on, paused or not, past its client) */
    for (int i = 0; i < fe->n_live; i++)
        if (fe->live[i]->id == id && !fe->live[i]->cancelled) {
            fe->live[i]->cancelled = true;
            atomic_fetch_add(&fe->cancels, 1);
        }
    pthread_mutex_unlock(&fe->mu);
}

static void fake_pause(void *ctx, uint64_t id, bool paused)
{
    fake_engine *fe = ctx;
    pthread_mutex_lock(&fe->mu);
    for (int i = 0; i < fe->n_live; i++)
        if (fe->live[i]->id == id)
            fe->live[i]->paused = paused;
    atomic_fetch_add(paused ? &fe->pauses : &fe->resumes, 1);
    pthread_mutex_unlock(&fe->mu);
}

static void fake_stats(void *ctx, zse_engine_stats *out)
{
    fake_engine *fe = ctx;
    pthread_mutex_lock(&fe->mu);
    memset(out, 0, sizeof *out);
    out->running = fe->n_active;
    out->kv_blocks_used = fe->n_active * 2;
    out->kv_blocks_total = 512;
    pthread_mutex_unlock(&fe->mu);
}

/* one token for one request, as the real engine reports it (callback without the lock) */
static bool fake_emit(fake_engine *fe, fake_req *r, bool cancelled)
{
    zse_token_event ev;
    memset(&ev, 0, sizeof ev);
    ev.prompt_tokens = r->prompt_tokens;
    if (cancelled) {
        ev.token = -1;
        ev.text = "";
        ev.finish = ZSE_FINISH_CANCELLED;
        ev.completion_tokens = r->produced;
        r->cb(r->user, &ev);
        return true;
    }
    int32_t t = fe->script[r->produced % fe->n_script];
    char *text = zse_detokenize(fe->m, &t, 1, true);
    int32_t top[4] = {t, t + 1, t + 2, t + 3};
    float top_lp[4] = {-0.25f, -1.5f, -2.5f, -3.5f};
    r->produced++;
    ev.token = t;
    ev.text = text;
    ev.logprob = -0.25f;
    ev.n_top = r->s.top_logprobs < 4 ? r->s.top_logprobs : 4;
    ev.top_ids = top;
    ev.top_logprobs = top_lp;
    ev.completion_tokens = r->produced;
    ev.finish = r->produced >= r->max_tokens ? ZSE_FINISH_LENGTH : ZSE_FINISH_NONE;
    bool go_on = r->cb(r->user, &ev);
    free(text);
    if (!go_on && ev.finish == ZSE_FINISH_NONE) {
        pthread_mutex_lock(&fe->mu);
        if (!r->cancelled) {
            r->cancelled = true; /* the next step reports the end */
            atomic_fetch_add(&fe->cancels, 1);
        }
        pthread_mutex_unlock(&fe->mu);
    }
    return ev.finish != ZSE_FINISH_NONE;
}

static void *fake_main(void *arg)
{
    fake_engine *fe = arg;
    pthread_mutex_lock(&fe->mu);
    while (!fe->stop || fe->head) {
        if (!fe->head) {
            pthread_cond_wait(&fe->cv, &fe->mu);
            continue;
        }
        /* one step: every active request that is not paused gets one event */
        fake_req *list = fe->head;
        fe->head = NULL;
        pthread_mutex_unlock(&fe->mu);
        fake_req *keep = NULL;
        int emitted = 0;
        for (fake_req *r = list, *next; r; r = next) {
            next = r->next;
            pthread_mutex_lock(&fe->mu);
            bool stopping = fe->stop;
            if (stopping)
                r->cancelled = true;
            bool cancelled = r->cancelled, paused = r->paused && !cancelled;
            pthread_mutex_unlock(&fe->mu);
            if (paused) {
                r->next = keep;
                keep = r;
                continue;
            }
            emitted++;
            if (fake_emit(fe, r, cancelled)) {
                atomic_fetch_add(&fe->finished, 1);
                pthread_mutex_lock(&fe->mu);
                fe->n_active--;
                for (int i = 0; i < fe->n_live; i++)
                    if (fe->live[i] == r)
                        fe->live[i] = fe->live[--fe->n_live];
                pthread_mutex_unlock(&fe->mu);
                free(r);
            } else {
                r->next = keep;
                keep = r;
            }
        }
        if (fe->delay_s > 0 || !emitted) { /* all paused: no spinning */
            struct timespec ts = {0, emitted ? (long)(fe->delay_s * 1e9) : 1000000L};
            nanosleep(&ts, NULL);
        }
        pthread_mutex_lock(&fe->mu);
        /* requests submitted meanwhile join the ones still running */
        while (keep) {
            fake_req *r = keep;
            keep = keep->next;
            r->next = fe->head;
            fe->head = r;
        }
    }
    pthread_mutex_unlock(&fe->mu);
    return NULL;
}

static void fake_start(fake_engine *fe, const zse_model *m)
{
    memset(fe, 0, sizeof *fe);
    pthread_mutex_init(&fe->mu, NULL);
    pthread_cond_init(&fe->cv, NULL);
    fe->m = m;
    fe->max_active = 256;
    int32_t *ids;
    size_t n;
    const char *text = " The quick brown fox jumps over the lazy dog.";
    if (zse_tokenize(m, text, strlen(text), 0, &ids, &n) != 0 || n == 0) {
        fprintf(stderr, "cannot tokenize the script: %s\n", zse_last_error());
        exit(1);
    }
    fe->n_script = n < 16 ? (int)n : 16;
    memcpy(fe->script, ids, (size_t)fe->n_script * sizeof *ids);
    free(ids);
    pthread_create(&fe->thread, NULL, fake_main, fe);
}

static void fake_stop(fake_engine *fe)
{
    pthread_mutex_lock(&fe->mu);
    fe->stop = true;
    pthread_cond_signal(&fe->cv);
    pthread_mutex_unlock(&fe->mu);
    pthread_join(fe->thread, NULL);
}

/* the text the script makes in n tokens */
static char *script_text(fake_engine *fe, int n)
{
    zse_buf b = {0};
    for (int i = 0; i < n; i++) {
        char *t = zse_detokenize(fe->m, &fe->script[i % fe->n_script], 1, true);
        zse_buf_puts(&b, t);
        free(t);
    }
    zse_buf_reserve(&b, 0);
    return b.data;
}

/* ---- a small HTTP client over a socket --------------------------------------------- */

static int port;
static const char *source_address; /* NULL: the kernel picks (127.0.0.1) */

static int connect_server(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (source_address) { /* the whole 127/8 is loopback: other addresses are other clients */
        struct sockaddr_in src = {.sin_family = AF_INET};
        inet_pton(AF_INET, source_address, &src.sin_addr);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) {
            close(fd);
            return -1;
        }
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

static void send_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k <= 0)
            return;
        p += k;
        n -= (size_t)k;
    }
}

typedef struct {
    int status;
    zse_buf head;   /* status line and headers */
    zse_buf body;   /* de-chunked */
} response;

static void response_free(response *r)
{
    zse_buf_free(&r->head);
    zse_buf_free(&r->body);
}

/* reads to EOF and splits head/body, undoing chunked transfer encoding */
static void read_response(int fd, response *out)
{
    memset(out, 0, sizeof *out);
    zse_buf raw = {0};
    char buf[8192];
    ssize_t k;
    while ((k = recv(fd, buf, sizeof buf, 0)) > 0)
        zse_buf_append(&raw, buf, (size_t)k);
    const char *all = zse_buf_str(&raw);
    const char *sep = strstr(all, "\r\n\r\n");
    if (!sep) {
        zse_buf_free(&raw);
        return;
    }
    zse_buf_append(&out->head, all, (size_t)(sep - all));
    sscanf(all, "HTTP/1.%*d %d", &out->status);
    const char *p = sep + 4, *end = all + raw.len;
    if (strcasestr(zse_buf_str(&out->head), "transfer-encoding: chunked")) {
        while (p < end) {
            unsigned long n = strtoul(p, NULL, 16);
            const char *data = strstr(p, "\r\n");
            if (!data || n == 0)
                break;
            data += 2;
            if (data + n > end)
                n = (unsigned long)(end - data);
            zse_buf_append(&out->body, data, n);
            p = data + n + 2;
        }
    } else {
        zse_buf_append(&out->body, p, (size_t)(end - p));
    }
    zse_buf_reserve(&out->body, 0);
    zse_buf_free(&raw);
}

static int http(const char *method, const char *path, const char *extra_headers, const char *body, response *out)
{
    int fd = connect_server();
    if (fd < 0) {
        memset(out, 0, sizeof *out);
        return -1;
    }
    zse_buf req = {0};
    zse_buf_printf(&req, "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s", method, path,
                   extra_headers ? extra_headers : "");
    if (body)
        zse_buf_printf(&req, "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s", strlen(body), body);
    else
        zse_buf_puts(&req, "\r\n");
    send_all(fd, req.data, req.len);
    zse_buf_free(&req);
    read_response(fd, out);
    close(fd);
    return out->status;
}

static const char *header(response *r, const char *name, char *val, size_t cap)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\r\n%s: ", name);
    const char *h = strcasestr(zse_buf_str(&r->head), pat);
    if (!h)
        return NULL;
    h += strlen(pat);
    size_t n = strcspn(h, "\r\n");
    if (n >= cap)
        n = cap - 1;
    memcpy(val, h, n);
    val[n] = '\0';
    return val;
}

static json_t *body_json(response *r)
{
    return json_loadb(zse_buf_str(&r->body), r->body.len, 0, NULL);
}

/* the SSE events of a stream body, as JSON (the final [DONE] is counted apart) */
static int sse_events(response *r, json_t **events, int max, bool *done)
{
    int n = 0;
    *done = false;
    const char *p = zse_buf_str(&r->body);
    while ((p = strstr(p, "data: ")) != NULL) {
        p += 6;
        const char *e = strstr(p, "\n\n");
        if (!e)
            break;
        if (strncmp(p, "[DONE]", 6) == 0)
            *done = true;
        else if (n < max)
            events[n++] = json_loadb(p, (size_t)(e - p), 0, NULL);
        p = e + 2;
    }
    return n;
}

static void free_events(json_t **ev, int n)
{
    for (int i = 0; i < n; i++)
        json_decref(ev[i]);
}

/* the error object of an OpenAI error body, checked for its shape */
static bool openai_error_shape(response *r, const char *param)
{
    json_t *j = body_json(r);
    json_t *e = json_object_get(j, "error");
    bool ok = json_is_string(json_object_get(e, "message")) && json_is_string(json_object_get(e, "type")) &&
              json_object_get(e, "param") && json_object_get(e, "code");
    if (ok && param)
        ok = json_is_string(json_object_get(e, "param")) && strcmp(json_string_value(json_object_get(e, "param")), param) == 0;
    json_decref(j);
    return ok;
}

/* ---- the tests ----------------------------------------------------------------------- */

static fake_engine fe;
static srv_engine engine_binding = {&fe, fake_submit, fake_cancel, fake_stats, fake_pause};

static void test_loading(void)
{
    response r;
    CHECK(http("GET", "/health", NULL, NULL, &r) == 503);
    char v[32];
    CHECK(header(&r, "Retry-After", v, sizeof v) && atoi(v) > 0);
    CHECK(strstr(zse_buf_str(&r.body), "loading") != NULL);
    response_free(&r);
    CHECK(http("POST", "/v1/chat/completions", NULL, "{}", &r) == 503);
    CHECK(openai_error_shape(&r, NULL));
    CHECK(header(&r, "Retry-After", v, sizeof v) != NULL);
    response_free(&r);
    CHECK(http("GET", "/metrics", NULL, NULL, &r) == 200);
    CHECK(strstr(zse_buf_str(&r.body), "zse_model_ready 0") != NULL);
    response_free(&r);
}

static void test_routes(void)
{
    response r;
    CHECK(http("GET", "/health", NULL, NULL, &r) == 200);
    response_free(&r);
    CHECK(http("GET", "/v1/models", NULL, NULL, &r) == 200);
    json_t *j = body_json(&r);
    CHECK_EQ_STR(json_string_value(json_object_get(json_array_get(json_object_get(j, "data"), 0), "id")), "tiny");
    CHECK_EQ_STR(json_string_value(json_object_get(j, "object")), "list");
    json_decref(j);
    response_free(&r);
    CHECK(http("GET", "/v1/models/tiny", NULL, NULL, &r) == 200);
    response_free(&r);
    CHECK(http("GET", "/v1/models/gpt-4", NULL, NULL, &r) == 404);
    CHECK(openai_error_shape(&r, "model"));
    response_free(&r);
    CHECK(http("GET", "/nope", NULL, NULL, &r) == 404);
    CHECK(openai_error_shape(&r, NULL));
    response_free(&r);
    CHECK(http("GET", "/v1/chat/completions", NULL, NULL, &r) == 405);
    char v[32];
    CHECK(header(&r, "Allow", v, sizeof v) && strcmp(v, "POST") == 0);
    CHECK(openai_error_shape(&r, NULL));
    response_free(&r);
    CHECK(http("DELETE", "/health", NULL, NULL, &r) == 405);
    response_free(&r);
    CHECK(http("POST", "/v1/chat/completions", NULL, "{not json", &r) == 400);
    CHECK(openai_error_shape(&r, NULL));
    response_free(&r);
    CHECK(http("POST", "/v1/chat/completions", NULL, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\"}]}", &r) == 400);
    CHECK(openai_error_shape(&r, "messages[0].content"));
    response_free(&r);
    CHECK(http("POST", "/generate", NULL, "{\"inputs\":5}", &r) == 400);
    j = body_json(&r);
    CHECK_EQ_STR(json_string_value(json_object_get(j, "error_type")), "validation"); /* TGI's shape */
    json_decref(j);
    response_free(&r);
    CHECK(http("POST", "/generate", NULL, "{\"inputs\":\"x\",\"parameters\":{\"adapter_id\":\"lora-1\"}}", &r) == 404);
    CHECK(strstr(zse_buf_str(&r.body), "lora-1") != NULL);
    response_free(&r);
    /* context too long: both numbers */
    zse_buf big = {0};
    zse_buf_puts(&big, "{\"model\":\"tiny\",\"max_tokens\":100000,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
    CHECK(http("POST", "/v1/chat/completions", NULL, big.data, &r) == 400);
    CHECK(strstr(zse_buf_str(&r.body), "100000 in the completion") != NULL);
    CHECK(openai_error_shape(&r, "max_tokens"));
    response_free(&r);
    zse_buf_free(&big);
}

static void test_chat(void)
{
    response r;
    CHECK(http("POST", "/v1/chat/completions", NULL,
               "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":5,\"n\":2,"
               "\"logprobs\":true,\"top_logprobs\":2}",
               &r) == 200);
    json_t *j = body_json(&r);
    char *want = script_text(&fe, 5);
    CHECK_EQ_STR(json_string_value(json_object_get(j, "object")), "chat.completion");
    CHECK(strncmp(json_string_value(json_object_get(j, "id")), "chatcmpl-", 9) == 0);
    CHECK_EQ_STR(json_string_value(json_object_get(j, "model")), "tiny");
    CHECK(json_integer_value(json_object_get(j, "created")) > 1600000000);
    CHECK(json_is_string(json_object_get(j, "system_fingerprint")));
    json_t *choices = json_object_get(j, "choices");
    CHECK(json_array_size(choices) == 2);
    for (size_t i = 0; i < json_array_size(choices); i++) {
        json_t *c = json_array_get(choices, i);
        CHECK((size_t)json_integer_value(json_object_get(c, "index")) == i);
        CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(c, "message"), "content")), want);
        CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(c, "message"), "role")), "assistant");
        CHECK_EQ_STR(json_string_value(json_object_get(c, "finish_reason")), "length");
        json_t *content = json_object_get(json_object_get(c, "logprobs"), "content");
        CHECK(json_array_size(content) == 5);
        json_t *first = json_array_get(content, 0);
        CHECK(json_number_value(json_object_get(first, "logprob")) == -0.25);
        CHECK(json_array_size(json_object_get(first, "top_logprobs")) == 2);
        CHECK(json_array_size(json_object_get(first, "bytes")) == strlen(json_string_value(json_object_get(first, "token"))));
    }
    json_t *usage = json_object_get(j, "usage");
    CHECK(json_integer_value(json_object_get(usage, "completion_tokens")) == 10);
    CHECK(json_integer_value(json_object_get(usage, "prompt_tokens")) > 3);
    CHECK(json_integer_value(json_object_get(usage, "total_tokens")) ==
          json_integer_value(json_object_get(usage, "prompt_tokens")) + 10);
    char v[64];
    CHECK(header(&r, "X-Request-Id", v, sizeof v) && strcmp(v, json_string_value(json_object_get(j, "id"))) == 0);
    json_decref(j);
    response_free(&r);

    /* streaming: the role first, content deltas, the finish reason, usage, [DONE] */
    CHECK(http("POST", "/v1/chat/completions", NULL,
               "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":5,\"stream\":true,"
               "\"stream_options\":{\"include_usage\":true}}",
               &r) == 200);
    CHECK(header(&r, "Content-Type", v, sizeof v) && strcmp(v, "text/event-stream") == 0);
    json_t *ev[64];
    bool done;
    int n = sse_events(&r, ev, 64, &done);
    CHECK(done && n >= 4);
    CHECK_EQ_STR(json_string_value(json_object_get(ev[0], "object")), "chat.completion.chunk");
    json_t *d0 = json_object_get(json_array_get(json_object_get(ev[0], "choices"), 0), "delta");
    CHECK_EQ_STR(json_string_value(json_object_get(d0, "role")), "assistant");
    zse_buf text = {0};
    const char *finish = NULL;
    for (int i = 1; i < n - 1; i++) {
        json_t *c = json_array_get(json_object_get(ev[i], "choices"), 0);
        const char *piece = json_string_value(json_object_get(json_object_get(c, "delta"), "content"));
        if (piece)
            zse_buf_puts(&text, piece);
        if (json_is_string(json_object_get(c, "finish_reason")))
            finish = json_string_value(json_object_get(c, "finish_reason"));
        CHECK(json_is_null(json_object_get(ev[i], "usage")));
    }
    CHECK_EQ_STR(zse_buf_str(&text), want);
    CHECK(finish && strcmp(finish, "length") == 0);
    CHECK(json_array_size(json_object_get(ev[n - 1], "choices")) == 0);
    CHECK(json_integer_value(json_object_get(json_object_get(ev[n - 1], "usage"), "completion_tokens")) == 5);
    free_events(ev, n);
    zse_buf_free(&text);
    response_free(&r);
    free(want);
}

static void test_completions_and_tgi(void)
{
    response r;
    char *want = script_text(&fe, 3);
    CHECK(http("POST", "/v1/completions", NULL,
               "{\"model\":\"tiny\",\"prompt\":[\"def f(\",\"x = \"],\"max_tokens\":3,\"echo\":true,\"logprobs\":1}",
               &r) == 200);
    json_t *j = body_json(&r);
    CHECK_EQ_STR(json_string_value(json_object_get(j, "object")), "text_completion");
    json_t *choices = json_object_get(j, "choices");
    CHECK(json_array_size(choices) == 2);
    char expect[256];
    snprintf(expect, sizeof expect, "x = %s", want);
    CHECK_EQ_STR(json_string_value(json_object_get(json_array_get(choices, 1), "text")), expect);
    json_t *lp = json_object_get(json_array_get(choices, 0), "logprobs");
    CHECK(json_array_size(json_object_get(lp, "tokens")) == 3 && json_array_size(json_object_get(lp, "text_offset")) == 3);
    CHECK(json_integer_value(json_array_get(json_object_get(lp, "text_offset"), 0)) == 6); /* after the echoed prompt */
    CHECK(json_object_size(json_array_get(json_object_get(lp, "top_logprobs"), 0)) == 1);
    json_decref(j);
    response_free(&r);

    CHECK(http("POST", "/v1/completions", NULL, "{\"model\":\"tiny\",\"prompt\":\"def f(\",\"max_tokens\":3,\"stream\":true}",
               &r) == 200);
    json_t *ev[32];
    bool done;
    int n = sse_events(&r, ev, 32, &done);
    zse_buf text = {0};
    for (int i = 0; i < n; i++)
        zse_buf_puts(&text, json_string_value(json_object_get(json_array_get(json_object_get(ev[i], "choices"), 0), "text")));
    CHECK(done);
    CHECK_EQ_STR(zse_buf_str(&text), want);
    free_events(ev, n);
    zse_buf_free(&text);
    response_free(&r);

    CHECK(http("POST", "/generate", NULL, "{\"inputs\":\"def f(\",\"parameters\":{\"max_new_tokens\":3,\"details\":true}}",
               &r) == 200);
    j = body_json(&r);
    CHECK_EQ_STR(json_string_value(json_object_get(j, "generated_text")), want);
    json_t *details = json_object_get(j, "details");
    CHECK_EQ_STR(json_string_value(json_object_get(details, "finish_reason")), "length");
    CHECK(json_integer_value(json_object_get(details, "generated_tokens")) == 3);
    CHECK(json_array_size(json_object_get(details, "tokens")) == 3);
    CHECK(json_integer_value(json_object_get(json_array_get(json_object_get(details, "tokens"), 0), "id")) == fe.script[0]);
    json_decref(j);
    response_free(&r);

    CHECK(http("POST", "/generate_stream", NULL, "{\"inputs\":\"def f(\",\"parameters\":{\"max_new_tokens\":3}}", &r) == 200);
    n = sse_events(&r, ev, 32, &done);
    CHECK(n == 3 && !done);
    CHECK(n == 3 && json_is_null(json_object_get(ev[0], "generated_text")));
    CHECK(n == 3 && json_integer_value(json_object_get(json_object_get(ev[1], "token"), "id")) == fe.script[1]);
    CHECK(n == 3 && strcmp(json_string_value(json_object_get(ev[2], "generated_text")), want) == 0);
    free_events(ev, n);
    response_free(&r);
    free(want);
}

static void test_limits(void)
{
    response r;
    /* declared too large: refused before the body is read */
    int fd = connect_server();
    const char *req = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      "Content-Length: 100000000\r\n\r\n{";
    send_all(fd, req, strlen(req));
    read_response(fd, &r);
    close(fd);
    CHECK(r.status == 413);
    CHECK(openai_error_shape(&r, NULL));
    response_free(&r);
    /* chunked and too large: read, dropped, refused */
    fd = connect_server();
    req = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n";
    send_all(fd, req, strlen(req));
    char chunk[8200];
    memset(chunk, 'a', sizeof chunk);
    for (int i = 0; i < 20; i++) {
        char hdr[16];
        snprintf(hdr, sizeof hdr, "%x\r\n", 8192);
        send_all(fd, hdr, strlen(hdr));
        send_all(fd, chunk, 8192);
        send_all(fd, "\r\n", 2);
    }
    send_all(fd, "0\r\n\r\n", 5);
    read_response(fd, &r);
    close(fd);
    CHECK(r.status == 413);
    response_free(&r);

    /* the engine's queue is full: 503 with Retry-After */
    pthread_mutex_lock(&fe.mu);
    fe.max_active = 0;
    pthread_mutex_unlock(&fe.mu);
    CHECK(http("POST", "/v1/chat/completions", NULL, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
               &r) == 503);
    char v[16];
    CHECK(header(&r, "Retry-After", v, sizeof v) != NULL);
    CHECK(openai_error_shape(&r, NULL));
    response_free(&r);
    pthread_mutex_lock(&fe.mu);
    fe.max_active = 256;
    pthread_mutex_unlock(&fe.mu);

    /* malformed HTTP: the server answers or closes, and keeps serving */
    const char *junk[] = {"GARBAGE\r\n\r\n", "GET / HTTP/9.9\r\n\r\n", "\x01\x02\x03\xff\r\n\r\n",
                          "POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                          "GET /health HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n"};
    for (size_t i = 0; i < sizeof junk / sizeof junk[0]; i++) {
        fd = connect_server();
        send_all(fd, junk[i], strlen(junk[i]));
        shutdown(fd, SHUT_WR);
        read_response(fd, &r);
        close(fd);
        CHECK_MSG(r.status == 0 || r.status >= 400, "junk %zu answered %d", i, r.status);
        response_free(&r);
    }
    /* a huge header */
    fd = connect_server();
    zse_buf big = {0};
    zse_buf_puts(&big, "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ");
    for (int i = 0; i < 100000; i++)
        zse_buf_puts(&big, "a");
    zse_buf_puts(&big, "\r\n\r\n");
    send_all(fd, big.data, big.len);
    read_response(fd, &r);
    close(fd);
    CHECK(r.status == 0 || r.status == 431 || r.status == 413 || r.status == 400);
    response_free(&r);
    zse_buf_free(&big);
    CHECK(http("GET", "/health", NULL, NULL, &r) == 200);
    response_free(&r);
}

static void wait_for(atomic_int *counter, int target, double seconds)
{
    double end = zse_now() + seconds;
    while (atomic_load(counter) < target && zse_now() < end)
        usleep(10 * 1000);
}

static void test_disconnects(void)
{
    fe.delay_s = 0.01;
    /* a streaming client that leaves after the first bytes */
    int cancels = atomic_load(&fe.cancels);
    int fd = connect_server();
    const char *body = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1000,\"stream\":true}";
    char req[512];
    snprintf(req, sizeof req, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s", strlen(body), body);
    send_all(fd, req, strlen(req));
    char buf[512];
    CHECK(recv(fd, buf, sizeof buf, 0) > 0);
    close(fd);
    wait_for(&fe.cancels, cancels + 1, 5);
    CHECK(atomic_load(&fe.cancels) == cancels + 1);

    /* a non-streaming client that leaves while its connection is suspended */
    cancels = atomic_load(&fe.cancels);
    fd = connect_server();
    body = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1000}";
    snprintf(req, sizeof req, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s", strlen(body), body);
    send_all(fd, req, strlen(req));
    usleep(100 * 1000);
    close(fd);
    wait_for(&fe.cancels, cancels + 1, 5);
    CHECK(atomic_load(&fe.cancels) == cancels + 1);

    /* a slow reader does not hold up anyone else */
    fd = connect_server();
    body = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":200,\"stream\":true}";
    snprintf(req, sizeof req, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s", strlen(body), body);
    send_all(fd, req, strlen(req));
    response r;
    double t0 = zse_now();
    CHECK(http("POST", "/v1/completions", NULL, "{\"model\":\"tiny\",\"prompt\":\"a\",\"max_tokens\":3}", &r) == 200);
    CHECK(zse_now() - t0 < 2);
    response_free(&r);
    close(fd);
    fe.delay_s = 0;
}

static void test_concurrent(void)
{
    /* 32 simultaneous streaming clients: every one gets the whole script */
    enum { N = 32 };
    int fds[N];
    const char *body = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":8,\"stream\":true}";
    char req[512];
    snprintf(req, sizeof req, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    for (int i = 0; i < N; i++) {
        fds[i] = connect_server();
        send_all(fds[i], req, strlen(req));
    }
    char *want = script_text(&fe, 8);
    int good = 0;
    for (int i = 0; i < N; i++) {
        response r;
        read_response(fds[i], &r);
        close(fds[i]);
        json_t *ev[32];
        bool done;
        int n = sse_events(&r, ev, 32, &done);
        zse_buf text = {0};
        for (int k = 0; k < n; k++) {
            const char *piece = json_string_value(
                json_object_get(json_object_get(json_array_get(json_object_get(ev[k], "choices"), 0), "delta"), "content"));
            if (piece)
                zse_buf_puts(&text, piece);
        }
        good += done && strcmp(zse_buf_str(&text), want) == 0;
        free_events(ev, n);
        zse_buf_free(&text);
        response_free(&r);
    }
    CHECK_EQ_INT(good, N);
    free(want);
}

static void test_keep_alive(void)
{
    /* two requests on one connection */
    int fd = connect_server();
    const char *req = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    send_all(fd, req, strlen(req));
    char buf[1024];
    ssize_t k = recv(fd, buf, sizeof buf - 1, 0);
    CHECK(k > 0 && strncmp(buf, "HTTP/1.1 200", 12) == 0);
    send_all(fd, req, strlen(req));
    k = recv(fd, buf, sizeof buf - 1, 0);
    CHECK(k > 0 && strncmp(buf, "HTTP/1.1 200", 12) == 0);
    close(fd);
}

/* HEAD answers like GET without the body; framing that could smuggle a request is refused
 * and the connection closed; a request's priority is checked against its client's */
static void test_head_framing_priority(void)
{
    response r;
    CHECK(http("HEAD", "/health", NULL, NULL, &r) == 200);
    CHECK(r.body.len == 0);
    char v[64];
    CHECK(header(&r, "Content-Length", v, sizeof v) && atoi(v) > 0);
    response_free(&r);
    CHECK(http("HEAD", "/v1/models", NULL, NULL, &r) == 200 && r.body.len == 0);
    response_free(&r);
    CHECK(http("POST", "/health", NULL, "{}", &r) == 405);
    CHECK(header(&r, "Allow", v, sizeof v) && strcmp(v, "GET, HEAD") == 0);
    response_free(&r);
    const char *smuggle[] = {
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n{}{}",
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nxx",
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        "GET /health HTTP/1.1\r\n\r\n",
    };
    const int want[] = {400, 400, 501, 501, 400};
    for (size_t i = 0; i < sizeof smuggle / sizeof smuggle[0]; i++) {
        int fd = connect_server();
        send_all(fd, smuggle[i], strlen(smuggle[i]));
        read_response(fd, &r); /* to EOF: the server closes */
        close(fd);
        CHECK_MSG(r.status == want[i], "framing %zu answered %d", i, r.status);
        CHECK(header(&r, "Connection", v, sizeof v) && strcasecmp(v, "close") == 0);
        CHECK(openai_error_shape(&r, NULL));
        response_free(&r);
    }
    /* without keys every client is at priority 0: more urgent is refused, less is fine */
    CHECK(http("POST", "/v1/chat/completions", NULL,
               "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":2,\"priority\":-5}",
               &r) == 400);
    CHECK(openai_error_shape(&r, "priority"));
    response_free(&r);
    CHECK(http("POST", "/v1/chat/completions", NULL,
               "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":2,\"priority\":5}",
               &r) == 200);
    response_free(&r);
}

static int open_long_request(const char *body)
{
    int fd = connect_server();
    char req[512];
    snprintf(req, sizeof req, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    send_all(fd, req, strlen(req));
    return fd;
}

/* a client that fills the engine cannot starve another: its share is capped and the
 * next free slot goes to the client with the fewest running */
static void test_fairness(zse_model *m)
{
    srv_config c;
    srv_config_default(&c);
    c.port = 0;
    c.model_id = "tiny";
    c.log_requests = false;
    c.engine_slots = 4;
    c.max_seqs_per_key = 3;
    srv_server *s = srv_start(&c);
    CHECK(s != NULL);
    if (!s)
        return;
    int saved_port = port;
    port = srv_port(s);
    srv_set_ready(s, m, &engine_binding);
    fe.delay_s = 0.01;
    int running = atomic_load(&fe.submitted) - atomic_load(&fe.finished);
    source_address = "127.0.0.2"; /* the greedy client: 2 requests of 2 long choices */
    const char *greedy = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1500,\"n\":2}";
    int fds[2] = {open_long_request(greedy), open_long_request(greedy)};
    double end = zse_now() + 5;
    while (atomic_load(&fe.submitted) - atomic_load(&fe.finished) < running + 3 && zse_now() < end)
        usleep(10 * 1000);
    usleep(100 * 1000);
    CHECK_EQ_INT(atomic_load(&fe.submitted) - atomic_load(&fe.finished), running + 3); /* its share, not 4 */
    response r;
    source_address = "127.0.0.3";
    double t0 = zse_now();
    CHECK(http("POST", "/v1/completions", NULL, "{\"model\":\"tiny\",\"prompt\":\"a\",\"max_tokens\":3}", &r) == 200);
    CHECK(zse_now() - t0 < 2); /* the free slot, not the end of the greedy client's 15 s */
    pthread_mutex_lock(&fe.mu);
    CHECK_EQ_STR(fe.last_tenant, "client 127.0.0.3"); /* the engine shares its compute by it */
    pthread_mutex_unlock(&fe.mu);
    response_free(&r);
    CHECK(http("GET", "/metrics", NULL, NULL, &r) == 200);
    CHECK(strstr(zse_buf_str(&r.body), "zse_queue_depth 1\n") != NULL); /* the greedy client's 4th choice waits */
    response_free(&r);
    source_address = NULL;
    close(fds[0]);
    close(fds[1]);
    CHECK(srv_wait_idle(s, 5));
    srv_drain(s);
    srv_stop(s);
    fe.delay_s = 0;
    port = saved_port;
}

/* A stream whose client does not read: once SRV_UNREAD_PAUSE of its events wait unread,
 * its sequences are paused in the engine (nothing more piles up), and when the client reads
 * they go on; the answer arrives whole. */
static void test_unread_stream_pauses(void)
{
    int pauses = atomic_load(&fe.pauses), resumes = atomic_load(&fe.resumes), finished = atomic_load(&fe.finished);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int small = 4096; /* a small window: the kernel holds little of what the client leaves unread */
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    CHECK(connect(fd, (struct sockaddr *)&a, sizeof a) == 0);
    struct timeval tv = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    const char *body = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1500,"
                       "\"n\":8,\"logprobs\":true,\"top_logprobs\":4,\"stream\":true}";
    char req[512];
    snprintf(req, sizeof req, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    send_all(fd, req, strlen(req));
    /* 8 × 1500 events of about 700 bytes: more than the kernel's socket buffers hold */
    /* paused (every choice still running) and staying so: the server may pull a few times
     * while the kernel still takes bytes, each pull resuming, before the client's window is
     * full for good. A choice may end before its pause (one the engine ran ahead while the
     * others were being submitted): only the running ones count. The wait ends well before
     * the server's idle timeout (5 s) would close the connection under the client. */
    double end = zse_now() + 3.5, paused_since = 0;
    int running = 0;
    while (zse_now() < end && (paused_since == 0 || zse_now() - paused_since < 0.3)) {
        int p = atomic_load(&fe.pauses) - pauses, r = atomic_load(&fe.resumes) - resumes;
        running = 8 - (atomic_load(&fe.finished) - finished);
        if (running == 0 || p - r != running)
            paused_since = 0;
        else if (paused_since == 0)
            paused_since = zse_now();
        usleep(10 * 1000);
    }
    CHECK_MSG(paused_since > 0, "the stream's %d running choices were not paused (%d pauses, %d resumes)", running,
              atomic_load(&fe.pauses) - pauses, atomic_load(&fe.resumes) - resumes);
    resumes = atomic_load(&fe.resumes);
    /* the client reads it all now */
    zse_buf got = {0};
    char buf[16384];
    for (ssize_t k; (k = recv(fd, buf, sizeof buf, 0)) > 0;) {
        zse_buf_append(&got, buf, (size_t)k);
        if (strstr(zse_buf_str(&got), "data: [DONE]"))
            break;
    }
    close(fd);
    const char *text = zse_buf_str(&got);
    int ends = 0;
    for (const char *p = text; (p = strstr(p, "\"finish_reason\":\"length\"")); p++)
        ends++;
    CHECK_EQ_INT(ends, 8);
    CHECK(strstr(text, "data: [DONE]") != NULL);
    CHECK(atomic_load(&fe.resumes) >= resumes + running);
    zse_buf_free(&got);
}

/* a second server with --auth and an audit log */
static void test_auth_and_audit(zse_model *m)
{
    char path[256];
    snprintf(path, sizeof path, "%s/keys.db", server_test_dir);
    srv_db *db = srv_db_open(path);
    char key[SRV_KEY_CHARS + 1], slow[SRV_KEY_CHARS + 1];
    CHECK(db && srv_key_create(db, "team-a", 0, 0, key) == 0 && srv_key_create(db, "limited", 2, 0, slow) == 0);
    srv_keyring *kr = srv_keyring_new();
    srv_audit *audit = srv_audit_start(path, 0, 0, kr);
    CHECK(audit != NULL);
    srv_config c;
    srv_config_default(&c);
    c.port = 0;
    c.model_id = "tiny";
    c.auth = true;
    c.keyring = kr;
    c.audit = audit;
    c.log_requests = false;
    c.cors_origin = "*";
    srv_server *s = srv_start(&c);
    CHECK(s != NULL);
    if (!s || !audit || !db)
        return;
    int saved_port = port;
    port = srv_port(s);
    srv_set_ready(s, m, &engine_binding);
    const char *chat = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":2}";
    response r;
    CHECK(http("POST", "/v1/chat/completions", NULL, chat, &r) == 401);
    CHECK(openai_error_shape(&r, NULL));
    response_free(&r);
    CHECK(http("POST", "/v1/chat/completions", "Authorization: Bearer zse-wrong\r\n", chat, &r) == 401);
    CHECK(strstr(zse_buf_str(&r.body), "invalid_api_key") != NULL);
    response_free(&r);
    CHECK(http("GET", "/v1/models", NULL, NULL, &r) == 401);
    response_free(&r);
    /* refused before any body byte is read: the answer comes though the body never does */
    int fd = connect_server();
    const char *head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n{";
    send_all(fd, head, strlen(head));
    double t0 = zse_now();
    read_response(fd, &r);
    close(fd);
    CHECK(r.status == 401 && zse_now() - t0 < 2);
    response_free(&r);
    CHECK(http("GET", "/health", NULL, NULL, &r) == 200); /* probes need no key */
    response_free(&r);
    char hdr[128], v[64];
    snprintf(hdr, sizeof hdr, "Authorization: Bearer %s\r\n", key);
    CHECK(http("POST", "/v1/chat/completions", hdr, chat, &r) == 200);
    CHECK(header(&r, "Access-Control-Allow-Origin", v, sizeof v) && strcmp(v, "*") == 0);
    CHECK(header(&r, "X-RateLimit-Limit", v, sizeof v) == NULL); /* no limit on this key */
    response_free(&r);
    CHECK(http("OPTIONS", "/v1/chat/completions", NULL, NULL, &r) == 204); /* CORS preflight */
    CHECK(header(&r, "Access-Control-Allow-Headers", v, sizeof v) != NULL);
    response_free(&r);

    snprintf(hdr, sizeof hdr, "Authorization: Bearer %s\r\n", slow);
    CHECK(http("POST", "/v1/chat/completions", hdr, chat, &r) == 200);
    CHECK(header(&r, "X-RateLimit-Limit", v, sizeof v) && strcmp(v, "2") == 0);
    CHECK(header(&r, "X-RateLimit-Remaining", v, sizeof v) && strcmp(v, "1") == 0);
    CHECK(header(&r, "X-RateLimit-Reset", v, sizeof v) && atoi(v) > 0 && atoi(v) <= 60);
    response_free(&r);
    CHECK(http("POST", "/v1/chat/completions", hdr, chat, &r) == 200);
    CHECK(header(&r, "X-RateLimit-Remaining", v, sizeof v) && strcmp(v, "0") == 0);
    response_free(&r);
    CHECK(http("POST", "/v1/chat/completions", hdr, chat, &r) == 429);
    CHECK(header(&r, "Retry-After", v, sizeof v) && atoi(v) >= 1 && atoi(v) <= 60);
    CHECK(strstr(zse_buf_str(&r.body), "rate_limit_exceeded") != NULL);
    CHECK(openai_error_shape(&r, NULL));
    response_free(&r);
    CHECK(http("GET", "/metrics", NULL, NULL, &r) == 200);
    CHECK(strstr(zse_buf_str(&r.body), "zse_rate_limit_rejections_total 1") != NULL);
    response_free(&r);

    /* a disabled key stops working once the server reloads the table */
    CHECK(srv_key_set_enabled(db, "team-a", false) == 0);
    snprintf(hdr, sizeof hdr, "Authorization: Bearer %s\r\n", key);
    int status = 0;
    for (int i = 0; i < 40 && status != 401; i++) {
        usleep(100 * 1000);
        status = http("GET", "/v1/models", hdr, NULL, &r);
        response_free(&r);
    }
    CHECK_EQ_INT(status, 401);

    srv_drain(s);
    CHECK(srv_wait_idle(s, 5));
    srv_stop(s);
    CHECK(srv_audit_flush(audit) == 0);
    srv_audit_row *rows;
    size_t n;
    CHECK(srv_audit_query(db, 0, NULL, 0, &rows, &n) == 0);
    int ok_team = 0, limited_429 = 0;
    for (size_t i = 0; i < n; i++) {
        if (!strcmp(rows[i].key, "team-a") && rows[i].status == 200 && !strcmp(rows[i].route, "/v1/chat/completions")) {
            ok_team++;
            CHECK(rows[i].completion_tokens == 2 && rows[i].prompt_tokens > 0 && rows[i].latency_ms > 0);
            CHECK_EQ_STR(rows[i].client, "127.0.0.1");
            CHECK(strncmp(rows[i].request_id, "chatcmpl-", 9) == 0);
            CHECK_EQ_STR(rows[i].method, "POST");
        }
        limited_429 += !strcmp(rows[i].key, "limited") && rows[i].status == 429;
        CHECK(rows[i].status != 401);                 /* refusals are counted, not rows */
        CHECK(strcmp(rows[i].route, "/health") != 0); /* probes are not audited */
    }
    CHECK_EQ_INT(ok_team, 1);
    CHECK_EQ_INT(limited_429, 1);
    free(rows);
    srv_refused_row *counts;
    CHECK(srv_refused_query(db, 0, 0, &counts, &n) == 0);
    int64_t unauth = 0;
    for (size_t i = 0; i < n; i++)
        unauth += counts[i].status == 401 && !strcmp(counts[i].client, "127.0.0.1") ? counts[i].count : 0;
    CHECK(unauth >= 4);
    free(counts);
    srv_audit_stop(audit);
    srv_keyring_free(kr);
    srv_db_close(db);
    port = saved_port;
}

int main(void)
{
    zse_model *m = server_test_model("f32", 1);
    signal(SIGPIPE, SIG_IGN);
    fake_start(&fe, m);
    srv_config c;
    srv_config_default(&c);
    c.port = 0;
    c.max_body = 64 * 1024;
    c.model_id = "tiny";
    c.timeout_s = 5;
    c.log_requests = false;
    srv_server *s = srv_start(&c);
    CHECK(s != NULL);
    if (!s)
        return test_main_end();
    port = srv_port(s);
    CHECK(port > 0);
    test_loading();
    srv_set_ready(s, m, &engine_binding);
    test_routes();
    test_chat();
    test_completions_and_tgi();
    test_limits();
    test_keep_alive();
    test_disconnects();
    test_concurrent();
    test_head_framing_priority();
    test_fairness(m);
    test_unread_stream_pauses();
    test_auth_and_audit(m);
    CHECK(srv_wait_idle(s, 5));
    CHECK_EQ_INT(srv_active_requests(s), 0);
    CHECK_EQ_INT(atomic_load(&fe.submitted), atomic_load(&fe.finished));

    response r;
    CHECK(http("GET", "/metrics", NULL, NULL, &r) == 200);
    CHECK(strstr(zse_buf_str(&r.body), "zse_requests_total{route=\"/v1/chat/completions\",status=\"200\"}") != NULL);
    CHECK(strstr(zse_buf_str(&r.body), "zse_requests_total{route=\"/v1/chat/completions\",status=\"413\"} 2") != NULL);
    CHECK(strstr(zse_buf_str(&r.body), "zse_requests_total{route=\"/v1/chat/completions\",status=\"503\"} 2") != NULL);
    CHECK(strstr(zse_buf_str(&r.body), "zse_running_sequences 0") != NULL);
    CHECK(strstr(zse_buf_str(&r.body), "zse_time_to_first_token_seconds_count") != NULL);
    response_free(&r);

    /* draining: open connections get 503, new ones are refused */
    int fd = connect_server();
    const char *hello = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"; /* accepted and kept alive */
    send_all(fd, hello, strlen(hello));
    char buf[512];
    CHECK(recv(fd, buf, sizeof buf, 0) > 0);
    srv_drain(s);
    const char *req = "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    send_all(fd, req, strlen(req));
    read_response(fd, &r);
    close(fd);
    CHECK(r.status == 503);
    response_free(&r);
    CHECK(connect_server() == -1);
    srv_stop(s);
    fake_stop(&fe);
    zse_model_free(m);
    return test_main_end();
}
