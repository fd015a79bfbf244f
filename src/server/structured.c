/* Structured output and tool calls, the request's side: OpenAI's response_format, vLLM's
 * guided_* fields (and their newer structured_outputs object), TGI's parameters.grammar, and
 * tools / tool_choice / parallel_tool_calls, checked into srv_structured; then compiled
 * against the model into the one constraint every choice of the request samples with.
 *
 * Which field wins when several are sent is never guessed: two grammars at once, or a
 * grammar with a forced tool call, is a 400 naming both. The grammar compiler's errors
 * (a JSON Schema keyword or regex construct it does not support) become a 400 naming it.
 *
 * How tool calls are parsed out of the output is render.c's (src/toolcall does the work);
 * this file decides whether they are, and with which format. */
#include "server/server.h"

#include "toolcall/toolcall.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#define MAX_GUIDED_CHOICES 256
#define MAX_TOOLS 128

static int oom(srv_error *e)
{
    return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory reading the request");
}

static bool absent(const json_t *v) { return !v || json_is_null(v); }

int srv_tool_parser_from_name(const char *name, int *format)
{
    if (name && strcmp(name, "none") == 0) {
        *format = 0;
        return 0;
    }
    zse_tool_format f;
    if (!name || zse_tool_format_from_name(name, &f) != 0)
        return zse_fail("unknown tool parser '%s': use one of %s", name ? name : "", SRV_TOOL_PARSER_NAMES);
    *format = (int)f;
    return 0;
}

void srv_structured_free(srv_structured *st)
{
    free(st->text);
    for (int i = 0; st->choices && i < st->n_choices; i++)
        free(st->choices[i]);
    free(st->choices);
    free(st->tools_json);
    free(st->tool_name);
    zse_constraint_free(st->constraint);
    memset(st, 0, sizeof *st);
}

/* ---- grammars ---------------------------------------------------------------------------- */

/* claims the request's one grammar for `param`; a second one is a conflict */
static int claim(srv_structured *st, srv_grammar_kind kind, const char *param, srv_error *e)
{
    if (st->kind != SRV_GRAMMAR_NONE)
        return srv_error_invalid(e, param, "'%s' and '%s' both constrain the output: send one of them", st->param,
                                 param);
    st->kind = kind;
    snprintf(st->param, sizeof st->param, "%.63s", param); /* field names are short */
    return 0;
}

/* a JSON Schema given as an object, a boolean, or (vLLM, TGI) a string holding one */
static int claim_schema(srv_structured *st, json_t *schema, const char *param, srv_error *e)
{
    json_t *parsed = NULL;
    if (json_is_string(schema)) {
        json_error_t jerr;
        parsed = json_loads(json_string_value(schema), JSON_DECODE_ANY, &jerr);
        if (!parsed)
            return srv_error_invalid(e, param, "'%s' is a string that is not JSON: %s", param, jerr.text);
        schema = parsed;
    }
    int rc;
    if (!json_is_object(schema) && !json_is_boolean(schema))
        rc = srv_error_invalid(e, param, "'%s' must be a JSON Schema (an object)", param);
    else if ((rc = claim(st, SRV_GRAMMAR_JSON_SCHEMA, param, e)) == 0 &&
             !(st->text = json_dumps(schema, JSON_COMPACT | JSON_ENCODE_ANY)))
        rc = oom(e);
    json_decref(parsed);
    return rc;
}

static int claim_regex(srv_structured *st, json_t *v, const char *param, srv_error *e)
{
    if (!json_is_string(v) || json_string_length(v) == 0 || strlen(json_string_value(v)) != json_string_length(v))
        return srv_error_invalid(e, param, "'%s' must be a non-empty regular expression without NUL", param);
    if (claim(st, SRV_GRAMMAR_REGEX, param, e))
        return -1;
    return (st->text = zse_strdup(json_string_value(v))) ? 0 : oom(e);
}

static int claim_choice(srv_structured *st, json_t *v, const char *param, srv_error *e)
{
    size_t n = json_array_size(v);
    if (!json_is_array(v) || n == 0 || n > MAX_GUIDED_CHOICES)
        return srv_error_invalid(e, param, "'%s' must be a list of 1 to %d strings", param, MAX_GUIDED_CHOICES);
    for (size_t i = 0; i < n; i++) {
        json_t *s = json_array_get(v, i);
        if (!json_is_string(s) || strlen(json_string_value(s)) != json_string_length(s))
            return srv_error_invalid(e, param, "'%s[%zu]' must be a string without NUL", param, i);
    }
    if (claim(st, SRV_GRAMMAR_CHOICE, param, e))
        return -1;
    if (!(st->choices = zse_calloc(n, sizeof *st->choices)))
        return oom(e);
    for (size_t i = 0; i < n; i++, st->n_choices++)
        if (!(st->choices[i] = zse_strdup(json_string_value(json_array_get(v, i)))))
            return oom(e);
    return 0;
}

/* OpenAI: {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "description",
 * "schema", "strict"}}. name and description label the schema (OpenAI requires the name; the
 * grammar holds the output to the schema whatever they say). */
static int parse_response_format(json_t *body, const char *route, srv_structured *st, srv_error *e)
{
    static const char *const fields[] = {"type", "json_schema", NULL};
    static const char *const schema_fields[] = {"name", "description", "schema", "strict", NULL};
    json_t *rf = json_object_get(body, "response_format");
    if (absent(rf))
        return 0;
    const char *type = json_string_value(json_object_get(rf, "type"));
    if (!json_is_object(rf) || !type)
        return srv_error_invalid(e, "response_format", "'response_format' must be an object with a 'type'");
    if (srv_check_fields(rf, fields, "response_format", route, e))
        return -1;
    json_t *js = json_object_get(rf, "json_schema");
    bool typed_schema = strcmp(type, "json_schema") == 0;
    if (!typed_schema && !absent(js))
        return srv_error_invalid(e, "response_format.json_schema", "'response_format.json_schema' is only taken with "
                                 "type \"json_schema\", not \"%s\"", type);
    if (strcmp(type, "text") == 0)
        return 0;
    if (strcmp(type, "json_object") == 0)
        return claim(st, SRV_GRAMMAR_JSON_OBJECT, "response_format", e);
    if (!typed_schema)
        return srv_error_invalid(e, "response_format.type",
                                 "response_format type '%s' is not supported (text, json_object or json_schema)", type);
    if (!json_is_object(js))
        return srv_error_invalid(e, "response_format.json_schema",
                                 "'response_format.json_schema' must be an object with 'name' and 'schema'");
    if (srv_check_fields(js, schema_fields, "response_format.json_schema", route, e))
        return -1;
    json_t *strict = json_object_get(js, "strict");
    if (!absent(strict) && !json_is_boolean(strict))
        return srv_error_invalid(e, "response_format.json_schema.strict",
                                 "'response_format.json_schema.strict' must be true or false");
    json_t *schema = json_object_get(js, "schema");
    if (absent(schema))
        return srv_error_invalid(e, "response_format.json_schema.schema",
                                 "'response_format.json_schema.schema' is required (the JSON Schema the output follows)");
    st->strict = json_is_true(strict);
    return claim_schema(st, schema, "response_format.json_schema.schema", e);
}

/* vLLM's guided_json / guided_regex / guided_choice (prefix "guided_") and, newer, the same in
 * a structured_outputs object {"json", "regex", "choice", "json_object"} (prefix "") */
static int parse_guided(json_t *obj, const char *prefix, const char *where, srv_structured *st, srv_error *e)
{
    char key[64], param[96];
#define FIELD(name)                                                                        \
    (snprintf(key, sizeof key, "%s%s", prefix, name),                                      \
     snprintf(param, sizeof param, "%s%s", where, key), json_object_get(obj, key))
    json_t *v;
    if (!absent(v = FIELD("json")) && claim_schema(st, v, param, e))
        return -1;
    if (!absent(v = FIELD("regex")) && claim_regex(st, v, param, e))
        return -1;
    if (!absent(v = FIELD("choice")) && claim_choice(st, v, param, e))
        return -1;
    if (!absent(v = FIELD("grammar")))
        return srv_error_invalid(e, param, "'%s' (an EBNF / Lark grammar) is not supported: use a JSON Schema "
                                           "(%sjson), a regular expression (%sregex) or a list of choices (%schoice)",
                                 param, prefix, prefix, prefix);
    if (!*prefix && !absent(v = FIELD("json_object"))) {
        if (!json_is_boolean(v))
            return srv_error_invalid(e, param, "'%s' must be true or false", param);
        if (json_is_true(v) && claim(st, SRV_GRAMMAR_JSON_OBJECT, param, e))
            return -1;
    }
    if (!absent(v = FIELD("structural_tag")))
        return srv_error_invalid(e, param, "'%s' is not supported: use a JSON Schema, a regex or tools", param);
    if (!absent(v = FIELD("whitespace_pattern")))
        return srv_error_invalid(e, param, "'%s' is not supported: JSON output uses the grammar's own whitespace", param);
    if (!absent(v = FIELD("decoding_backend")) || !absent(v = FIELD("backend")))
        return srv_error_invalid(e, param, "'%s' is not supported: zse has one grammar engine (leave the field out)",
                                 param);
#undef FIELD
    return 0;
}

/* ---- tools ---------------------------------------------------------------------------- */

static int check_tools(json_t *tools, const char *route, srv_error *e)
{
    static const char *const tool_fields[] = {"type", "function", NULL};
    static const char *const function_fields[] = {"name", "description", "parameters", "strict", NULL};
    if (!json_is_array(tools))
        return srv_error_invalid(e, "tools", "'tools' must be a list");
    if (json_array_size(tools) > MAX_TOOLS)
        return srv_error_invalid(e, "tools", "'tools' may hold at most %d tools", MAX_TOOLS);
    size_t i;
    json_t *t;
    json_array_foreach(tools, i, t) {
        char param[64];
        snprintf(param, sizeof param, "tools[%zu]", i);
        const char *type = json_string_value(json_object_get(t, "type"));
        json_t *fn = json_object_get(t, "function");
        if (!json_is_object(t) || !type || strcmp(type, "function") != 0 || !json_is_object(fn))
            return srv_error_invalid(e, param, "'%s' must be {\"type\": \"function\", \"function\": {\"name\", ...}}",
                                     param);
        char fparam[80];
        snprintf(fparam, sizeof fparam, "%s.function", param);
        if (srv_check_fields(t, tool_fields, param, route, e) || srv_check_fields(fn, function_fields, fparam, route, e))
            return -1;
        const char *name = json_string_value(json_object_get(fn, "name"));
        if (!name || !*name)
            return srv_error_invalid(e, param, "'%s.function.name' must be a non-empty string", param);
        /* strict false is what happens here; OpenAI's strict mode (closed objects, every
         * property required, for every tool format) is not what the tool grammar does */
        json_t *strict = json_object_get(fn, "strict");
        snprintf(fparam, sizeof fparam, "%s.function.strict", param);
        if (!absent(strict) && !json_is_boolean(strict))
            return srv_error_invalid(e, fparam, "'%s' must be true or false", fparam);
        if (json_is_true(strict))
            return srv_error_invalid(e, fparam, "'%s': true (OpenAI's strict function calling) is not supported; "
                                                "leave it out or false (the arguments of a forced call still follow "
                                                "'parameters')", fparam);
        json_t *params = json_object_get(fn, "parameters");
        if (!absent(params) && !json_is_object(params))
            return srv_error_invalid(e, param, "'%s.function.parameters' must be a JSON Schema object", param);
    }
    return 0;
}

/* "none" | "auto" | "required" | {"type": "function", "function": {"name"}} */
static int parse_tool_choice(json_t *v, bool have_tools, const char *route, srv_structured *st, srv_error *e)
{
    static const char *const fields[] = {"type", "function", NULL};
    static const char *const function_fields[] = {"name", NULL};
    st->tools = have_tools ? SRV_TOOLS_AUTO : SRV_TOOLS_OFF;
    if (absent(v))
        return 0;
    const char *s = json_string_value(v);
    if (s && strcmp(s, "none") == 0) {
        st->tools = SRV_TOOLS_OFF;
        return 0;
    }
    if (s && strcmp(s, "auto") == 0)
        st->tools = SRV_TOOLS_AUTO;
    else if (s && strcmp(s, "required") == 0)
        st->tools = SRV_TOOLS_REQUIRED;
    else if (json_is_object(v)) {
        if (srv_check_fields(v, fields, "tool_choice", route, e) ||
            srv_check_fields(json_object_get(v, "function"), function_fields, "tool_choice.function", route, e))
            return -1;
        const char *type = json_string_value(json_object_get(v, "type"));
        const char *name = json_string_value(json_object_get(json_object_get(v, "function"), "name"));
        if (!type || strcmp(type, "function") != 0 || !name)
            return srv_error_invalid(e, "tool_choice",
                                     "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                                     "\"function\": {\"name\": NAME}}");
        st->tools = SRV_TOOLS_NAMED;
        if (!(st->tool_name = zse_strdup(name)))
            return oom(e);
    } else
        return srv_error_invalid(e, "tool_choice",
                                 "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                                 "\"function\": {\"name\": NAME}}");
    if (!have_tools)
        return srv_error_invalid(e, "tool_choice", "'tool_choice' other than \"none\" needs 'tools'");
    return 0;
}

static int parse_tools(json_t *body, const char *route, srv_structured *st, srv_error *e)
{
    json_t *tools = json_object_get(body, "tools");
    bool have = !absent(tools) && json_array_size(tools) > 0;
    if (!absent(tools) && check_tools(tools, route, e))
        return -1;
    if (parse_tool_choice(json_object_get(body, "tool_choice"), have, route, st, e))
        return -1;
    json_t *par = json_object_get(body, "parallel_tool_calls");
    if (!absent(par) && !json_is_boolean(par))
        return srv_error_invalid(e, "parallel_tool_calls", "'parallel_tool_calls' must be true or false");
    st->parallel = absent(par) || json_is_true(par);
    if (st->tools != SRV_TOOLS_OFF && !(st->tools_json = json_dumps(tools, JSON_COMPACT)))
        return oom(e);
    return 0;
}

int srv_structured_parse(json_t *body, srv_request *r, srv_error *e)
{
    static const char *const so_fields[] = {"json", "regex", "choice", "grammar", "json_object", "structural_tag",
                                            "whitespace_pattern", "decoding_backend", "backend", NULL};
    srv_structured *st = &r->structured;
    const char *route = srv_api_route(r->api);
    if (parse_response_format(body, route, st, e) || parse_guided(body, "guided_", "", st, e))
        return -1;
    json_t *so = json_object_get(body, "structured_outputs");
    if (!absent(so)) {
        if (!json_is_object(so))
            return srv_error_invalid(e, "structured_outputs", "'structured_outputs' must be an object");
        if (srv_check_fields(so, so_fields, "structured_outputs", route, e) ||
            parse_guided(so, "", "structured_outputs.", st, e))
            return -1;
    }
    if (r->api != SRV_API_CHAT)
        return 0;
    static const char *const legacy[] = {"functions", "function_call"};
    for (int i = 0; i < 2; i++)
        if (!absent(json_object_get(body, legacy[i])))
            return srv_error_invalid(e, legacy[i], "'%s' (OpenAI's deprecated function calling) is not supported: "
                                                   "send 'tools' and 'tool_choice'", legacy[i]);
    if (parse_tools(body, route, st, e))
        return -1;
    if (st->kind != SRV_GRAMMAR_NONE && (st->tools == SRV_TOOLS_REQUIRED || st->tools == SRV_TOOLS_NAMED))
        return srv_error_invalid(e, "tool_choice",
                                 "'tool_choice' %s forces a tool call, which '%s' forbids: send one of them",
                                 st->tools == SRV_TOOLS_REQUIRED ? "\"required\"" : "naming a function", st->param);
    return 0;
}

/* LoRAX's parameters.response_format: {"type": "json_object", "schema": SCHEMA} (without a
 * schema: any JSON object) */
static int parse_lorax_response_format(json_t *params, srv_request *r, srv_error *e)
{
    static const char *const fields[] = {"type", "schema", NULL};
    json_t *rf = json_object_get(params, "response_format");
    if (absent(rf))
        return 0;
    const char *type = json_string_value(json_object_get(rf, "type"));
    if (!json_is_object(rf) || !type)
        return srv_error_invalid(e, "parameters.response_format", "'parameters.response_format' must be "
                                 "{\"type\": \"json_object\", \"schema\": SCHEMA}");
    if (srv_check_fields(rf, fields, "parameters.response_format", srv_api_route(r->api), e))
        return -1;
    if (strcmp(type, "json_object") != 0)
        return srv_error_invalid(e, "parameters.response_format.type", "response_format type '%s' is not supported "
                                 "(json_object)", type);
    json_t *schema = json_object_get(rf, "schema");
    if (absent(schema))
        return claim(&r->structured, SRV_GRAMMAR_JSON_OBJECT, "parameters.response_format", e);
    return claim_schema(&r->structured, schema, "parameters.response_format.schema", e);
}

int srv_structured_parse_tgi(json_t *params, srv_request *r, srv_error *e)
{
    static const char *const fields[] = {"type", "value", NULL};
    if (parse_lorax_response_format(params, r, e))
        return -1;
    json_t *g = json_object_get(params, "grammar");
    if (absent(g))
        return 0;
    const char *type = json_string_value(json_object_get(g, "type"));
    json_t *value = json_object_get(g, "value");
    if (!json_is_object(g) || !type || absent(value))
        return srv_error_invalid(e, "parameters.grammar",
                                 "'parameters.grammar' must be {\"type\": \"json\" | \"regex\", \"value\": ...}");
    if (srv_check_fields(g, fields, "parameters.grammar", srv_api_route(r->api), e))
        return -1;
    if (strcmp(type, "json") == 0)
        return claim_schema(&r->structured, value, "parameters.grammar.value", e);
    if (strcmp(type, "regex") == 0)
        return claim_regex(&r->structured, value, "parameters.grammar.value", e);
    return srv_error_invalid(e, "parameters.grammar.type", "grammar type '%s' is not supported (json or regex)", type);
}

/* ---- the cache of compiled constraints ----------------------------------------------------- */

typedef struct {
    char *key;                  /* NULL: a free slot */
    size_t key_len;
    uint64_t hash;
    uint64_t used;              /* the cache's clock at the last use */
    zse_constraint *c;          /* the cache's reference */
} cache_entry;

struct srv_grammar_cache {
    pthread_mutex_t mu;
    cache_entry *e;
    int cap;
    uint64_t clock;
};

srv_grammar_cache *srv_grammar_cache_new(int capacity)
{
    srv_grammar_cache *c = zse_calloc(1, sizeof *c);
    if (!c || !(c->e = zse_calloc((size_t)capacity, sizeof *c->e))) {
        free(c);
        return NULL;
    }
    pthread_mutex_init(&c->mu, NULL);
    c->cap = capacity;
    return c;
}

void srv_grammar_cache_free(srv_grammar_cache *c)
{
    if (!c)
        return;
    for (int i = 0; i < c->cap; i++) {
        free(c->e[i].key);
        zse_constraint_free(c->e[i].c);
    }
    free(c->e);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

/* a reference to the cached constraint of key, or NULL */
static zse_constraint *cache_get(srv_grammar_cache *c, const zse_buf *key)
{
    if (!c)
        return NULL;
    uint64_t h = fnv1a(key->data, key->len);
    zse_constraint *found = NULL;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->cap && !found; i++) {
        cache_entry *x = &c->e[i];
        if (x->key && x->hash == h && x->key_len == key->len && memcmp(x->key, key->data, key->len) == 0) {
            x->used = ++c->clock;
            found = zse_constraint_retain(x->c);
        }
    }
    pthread_mutex_unlock(&c->mu);
    return found;
}

/* keeps a reference to con under key, in a free slot or the least recently used one's */
static void cache_put(srv_grammar_cache *c, const zse_buf *key, zse_constraint *con)
{
    char *k = c ? zse_malloc(key->len + 1) : NULL;
    if (!k)
        return; /* not cached: the request still has its constraint */
    memcpy(k, key->data, key->len);
    k[key->len] = '\0';
    pthread_mutex_lock(&c->mu);
    cache_entry *slot = &c->e[0];
    for (int i = 0; i < c->cap; i++) {
        if (!c->e[i].key) {
            slot = &c->e[i];
            break;
        }
        if (c->e[i].used < slot->used)
            slot = &c->e[i];
    }
    zse_constraint *old = slot->c;
    free(slot->key);
    *slot = (cache_entry){k, key->len, fnv1a(key->data, key->len), ++c->clock, zse_constraint_retain(con)};
    pthread_mutex_unlock(&c->mu);
    zse_constraint_free(old);
}

/* what identifies a compiled constraint: the grammar (kind, strict, text or choices) or the
 * tool grammar (tools, choice, parallel, format); fields end with 0x1f (JSON text never holds
 * it raw), choices with NUL */
static int cache_key(const srv_structured *st, int tool_format, zse_buf *key)
{
    int rc = zse_buf_printf(key, "%d\x1f%d\x1f", st->kind, st->strict);
    if (st->kind == SRV_GRAMMAR_NONE)
        rc = rc || zse_buf_printf(key, "tools\x1f%d\x1f%d\x1f%d\x1f%s\x1f%s", st->tools, st->parallel, tool_format,
                                  st->tool_name ? st->tool_name : "", st->tools_json);
    else if (st->kind == SRV_GRAMMAR_CHOICE)
        for (int i = 0; rc == 0 && i < st->n_choices; i++)
            rc = zse_buf_append(key, st->choices[i], strlen(st->choices[i]) + 1);
    else if (st->text)
        rc = rc || zse_buf_puts(key, st->text);
    return rc;
}

/* ---- compiling against the model --------------------------------------------------------- */

static zse_constraint *compile_grammar(const srv_structured *st, zse_model *m)
{
    switch (st->kind) {
    case SRV_GRAMMAR_JSON_OBJECT: return zse_constraint_json_object(m);
    case SRV_GRAMMAR_JSON_SCHEMA: return zse_constraint_json_schema(m, st->text, strlen(st->text), st->strict);
    case SRV_GRAMMAR_REGEX: return zse_constraint_regex(m, st->text, strlen(st->text));
    case SRV_GRAMMAR_CHOICE: return zse_constraint_choice(m, (const char *const *)st->choices, st->n_choices);
    case SRV_GRAMMAR_NONE: break;
    }
    return NULL;
}

/* the tool-call grammar: forced for required / named; for auto, free text that turns into a
 * valid call once the model writes the format's call marker (formats without a marker, and
 * tools whose schemas the compiler refuses, sample auto without one: nothing is forced) */
static int compile_tools(srv_structured *st, zse_model *m, zse_tool_format f, srv_error *e)
{
    const char *fmt = zse_tool_format_name(f);
    if (st->tools == SRV_TOOLS_AUTO) {
        if (f == ZSE_TOOL_HERMES || f == ZSE_TOOL_MISTRAL)
            st->constraint = zse_constraint_tools(m, st->tools_json, "auto", st->parallel, fmt);
        return 0;
    }
    const char *choice = st->tools == SRV_TOOLS_REQUIRED ? "required" : st->tool_name;
    if (!(st->constraint = zse_constraint_tools(m, st->tools_json, choice, st->parallel, fmt)))
        return srv_error_invalid(e, st->tools == SRV_TOOLS_NAMED ? "tool_choice" : "tools", "%s", zse_last_error());
    return 0;
}

/* the request's constraint from the cache, else compiled (and cached) */
static int constrain(srv_structured *st, zse_model *m, srv_grammar_cache *cache, srv_error *e)
{
    zse_buf key = {0};
    bool keyed = cache && cache_key(st, st->tool_format, &key) == 0;
    if (keyed && (st->constraint = cache_get(cache, &key))) {
        zse_buf_free(&key);
        return 0;
    }
    int rc = 0;
    if (st->kind != SRV_GRAMMAR_NONE) {
        if (!(st->constraint = compile_grammar(st, m)))
            rc = srv_error_invalid(e, st->param, "%s", zse_last_error());
    } else {
        rc = compile_tools(st, m, (zse_tool_format)st->tool_format, e);
    }
    if (rc == 0 && keyed && st->constraint)
        cache_put(cache, &key, st->constraint);
    zse_buf_free(&key);
    return rc;
}

int srv_structured_prepare(srv_request *r, zse_model *m, int tool_format, srv_grammar_cache *cache, srv_error *e)
{
    srv_structured *st = &r->structured;
    if (st->kind != SRV_GRAMMAR_NONE) {
        if (constrain(st, m, cache, e))
            return -1;
    } else if (st->tools != SRV_TOOLS_OFF) {
        zse_tool_format detected;
        if (zse_tool_format_from_name(zse_model_tool_format(m), &detected) != 0)
            detected = ZSE_TOOL_JSON;
        if (tool_format == 0 && st->tools != SRV_TOOLS_AUTO)
            return srv_error_invalid(e, "tool_choice",
                                     "'tool_choice' forces a tool call, but this server parses none (--tool-parser "
                                     "none): use \"auto\" or \"none\"");
        /* with a grammar from response_format the output is that grammar's: never parsed as calls */
        st->tool_format = tool_format < 0 ? (int)detected : tool_format;
        if (st->tool_format && constrain(st, m, cache, e))
            return -1;
    }
    r->sampling.constraint = st->constraint;
    return 0;
}

/* ---- messages: assistant tool calls as templates read them ---------------------------------
 * OpenAI sends a call's arguments as a JSON string; chat templates write them with tojson
 * (Llama 3.1, Mistral, Hermes) and expect an object, as transformers passes it. Arguments
 * that are a JSON object in a string become that object; anything else stays as sent. */
json_t *srv_template_tool_calls(json_t *calls, size_t mi, srv_error *e)
{
    char param[64];
    snprintf(param, sizeof param, "messages[%zu].tool_calls", mi);
    if (!json_is_array(calls))
        return srv_error_invalid(e, param, "'%s' must be a list", param), NULL;
    json_t *out = json_deep_copy(calls);
    if (!out)
        return oom(e), NULL;
    size_t i;
    json_t *call;
    json_array_foreach(out, i, call) {
        json_t *fn = json_object_get(call, "function");
        if (!json_is_object(call) || !json_is_object(fn) || !json_is_string(json_object_get(fn, "name"))) {
            json_decref(out);
            snprintf(param, sizeof param, "messages[%zu].tool_calls[%zu]", mi, i);
            return srv_error_invalid(e, param, "'%s' must be {\"id\", \"type\": \"function\", \"function\": {\"name\", "
                                               "\"arguments\"}}", param), NULL;
        }
        json_t *args = json_object_get(fn, "arguments");
        json_t *parsed = json_is_string(args) ? json_loads(json_string_value(args), 0, NULL) : NULL;
        if (json_is_object(parsed) && json_object_set(fn, "arguments", parsed) != 0) {
            json_decref(parsed);
            json_decref(out);
            return oom(e), NULL;
        }
        json_decref(parsed);
    }
    return out;
}
