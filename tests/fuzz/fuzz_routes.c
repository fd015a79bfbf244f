/* libFuzzer target: the request bodies of the routes fuzz_request does not reach, called
 * as the server's workers call them, against the real tiny model. The first byte picks the
 * route (its value modulo 8; the seed corpus uses the digits '0'..'7'):
 *
 *   0 /tokenize      1 /detokenize      2 /v1/embeddings (the second byte picks the pooling)
 *   3 chat, 4 completions, 5 TGI: parsed and prepared as http_generate.c does — template,
 *     tokens, then response_format / guided_* / grammar / tools / tool_choice compiled into
 *     a constraint (structured.c) through a grammar cache shared across inputs
 *   6 /admin: "METHOD PATH?QUERY\n" then the body, against a key database of its own
 *   7 /v1/unload_lora_adapter (loading opens files by path, which a fuzzer must not)
 *
 * Whatever the bytes: an answer or an error naming what is wrong, never a crash, a leak or
 * a hang. */
#include "fuzz_model.h"
#include "server/server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CALLER "fuzz-admin"

static zse_model *model;
static srv_model_facts facts;
static srv_grammar_cache *grammars;
static srv_db *db;
static srv_keyring *keyring;

static char db_dir[] = "/tmp/zse-fuzz-routes-XXXXXX";

/* the database and its WAL and shared-memory files go when the run ends (the -wal and -shm
 * files outlive an unlinked database while its connection is open) */
static void finish(void)
{
    srv_db_close(db);
    db = NULL;
    const char *names[] = {"zse.db", "zse.db-wal", "zse.db-shm"};
    char path[256];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", db_dir, names[i]);
        unlink(path);
    }
    rmdir(db_dir);
}

static void start(void)
{
    zse_log_set_level(ZSE_LOG_ERROR);
    model = fuzz_load_model("fuzz_routes");
    zse_model_info info;
    zse_model_get_info(model, &info);
    facts = (srv_model_facts){.name = "tiny", .vocab_size = info.vocab_size, .ctx_size = info.ctx_size,
                              .max_prompt_bytes = (size_t)info.ctx_size * 64};
    grammars = srv_grammar_cache_new(8);
    if (!grammars || !mkdtemp(db_dir))
        abort();
    char path[256];
    snprintf(path, sizeof path, "%s/zse.db", db_dir);
    char key[SRV_KEY_CHARS + 1];
    if (!(db = srv_db_open(path)) || atexit(finish) != 0 || !(keyring = srv_keyring_new()) ||
        srv_key_create_as(db, CALLER, 0, 0, true, key) != 0)
        abort();
}

static void answer(int rc, json_t *out)
{
    char *text = rc == 0 ? json_dumps(out, JSON_COMPACT) : NULL; /* as the routes render it */
    free(text);
    json_decref(out);
}

/* parse, template, tokenize, compile the constraint: what prepare() does before queueing */
static void generation(srv_api api, const char *body, size_t len)
{
    srv_request req;
    srv_error e;
    if (srv_request_parse(api, body, len, &facts, &req, &e) != 0)
        return;
    if (srv_request_adapter(&req, model, &facts, &e) == 0 && srv_request_prepare(&req, model, &facts, &e) == 0)
        srv_structured_prepare(&req, model, -1, grammars, &e);
    srv_request_free(&req);
}

typedef struct {
    const char *query;
    size_t len;
    char value[256];
} query_args;

/* NAME=VALUE pairs split by '&', as libmicrohttpd hands them (no percent-decoding here) */
static const char *query_arg(void *ctx, const char *name)
{
    query_args *q = ctx;
    size_t n = strlen(name);
    for (const char *p = q->query, *end = q->query + q->len; p < end;) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *stop = amp ? amp : end;
        if ((size_t)(stop - p) > n && memcmp(p, name, n) == 0 && p[n] == '=') {
            size_t vlen = (size_t)(stop - p) - n - 1;
            if (vlen >= sizeof q->value)
                vlen = sizeof q->value - 1;
            memcpy(q->value, p + n + 1, vlen);
            q->value[vlen] = '\0';
            return q->value;
        }
        p = stop + 1;
    }
    return NULL;
}

/* "METHOD PATH[?QUERY]\n" then the body */
static void admin(const char *in, size_t len)
{
    const char *nl = memchr(in, '\n', len);
    const char *sp = nl ? memchr(in, ' ', (size_t)(nl - in)) : NULL;
    if (!sp || sp - in >= 8 || nl - sp - 1 >= 256)
        return;
    char method[8], path[256];
    memcpy(method, in, (size_t)(sp - in));
    method[sp - in] = '\0';
    memcpy(path, sp + 1, (size_t)(nl - sp - 1));
    path[nl - sp - 1] = '\0';
    if (strlen(method) != (size_t)(sp - in) || strlen(path) != (size_t)(nl - sp - 1))
        return; /* a NUL inside: libmicrohttpd never hands one over */
    query_args q = {"", 0, {0}};
    char *qm = strchr(path, '?');
    if (qm) {
        *qm = '\0';
        q.query = qm + 1;
        q.len = strlen(qm + 1);
    }
    srv_admin_call call;
    const char *allow;
    srv_error e;
    if (srv_admin_route(method, path, &call, &allow, &e) != 0)
        return;
    const char *body = nl + 1;
    size_t blen = len - (size_t)(body - in);
    int status;
    char *json = NULL;
    if (srv_admin_run(&call, db, keyring, CALLER, body, blen, query_arg, &q, &status, &json, &e) == 0)
        free(json);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (!model)
        start();
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    json_t *out = NULL;
    srv_error e;
    int rc = -1;
    switch (data[0] % 8) {
    case 0:
        rc = srv_tokenize(model, &facts, body, len, &out, &e);
        break;
    case 1:
        rc = srv_detokenize(model, &facts, body, len, &out, &e);
        break;
    case 2: {
        if (len < 1)
            return 0;
        int tokens = 0;
        char user[128];
        zse_pooling pool = body[0] % 2 ? ZSE_POOL_LAST : ZSE_POOL_MEAN;
        rc = srv_embeddings(model, &facts, pool, body + 1, len - 1, &out, &tokens, user, sizeof user, &e);
        break;
    }
    case 3:
        generation(SRV_API_CHAT, body, len);
        break;
    case 4:
        generation(SRV_API_COMPLETION, body, len);
        break;
    case 5:
        generation(SRV_API_TGI, body, len);
        break;
    case 6:
        admin(body, len);
        break;
    case 7: {
        char *msg = NULL;
        if (srv_lora_unload(model, body, len, &msg, &e) == 0)
            free(msg);
        break;
    }
    }
    answer(rc, out); /* the routes that build JSON */
    return 0;
}
