/* src/toolcall: format detection from real chat templates and by name; complete parses of
 * every format (content, several calls, ids, arguments as written, malformed calls kept as
 * text); the streaming parser fed in every split gives the same content and calls, holds
 * back a marker's beginning and sends id and name before the arguments; tool_choice
 * grammars force calls that parse and validate, whatever the "model" draws. */
#include "test.h"

#include "toolcall/toolcall.h"

#include <jansson.h>

static void detect(void)
{
    const char *dir = test_env("ZSE_TEST_DATA");
    struct {
        const char *file;
        zse_tool_format want;
    } cases[] = {{"templates/Qwen-Qwen2.5-7B-Instruct.jinja", ZSE_TOOL_HERMES},
                 {"templates/Qwen-Qwen3-0.6B.jinja", ZSE_TOOL_HERMES},
                 {"templates/meta-llama-Llama-3.1-8B-Instruct.jinja", ZSE_TOOL_LLAMA3},
                 {"templates/google-gemma-2-2b-it.jinja", ZSE_TOOL_JSON}};
    for (size_t i = 0; dir && i < sizeof cases / sizeof *cases; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, cases[i].file);
        char *t = zse_read_file(path, NULL);
        CHECK_MSG(t != NULL, "%s", path);
        if (t)
            CHECK_MSG(zse_tool_format_detect(t) == cases[i].want, "%s: %s", cases[i].file,
                      zse_tool_format_name(zse_tool_format_detect(t)));
        free(t);
    }
    CHECK(zse_tool_format_detect("{{ '[TOOL_CALLS]' }}") == ZSE_TOOL_MISTRAL);
    zse_tool_format f;
    CHECK(zse_tool_format_from_name("qwen3", &f) == 0 && f == ZSE_TOOL_HERMES);
    CHECK(zse_tool_format_from_name("llama3_json", &f) == 0 && f == ZSE_TOOL_LLAMA3);
    CHECK(zse_tool_format_from_name("mistral", &f) == 0 && f == ZSE_TOOL_MISTRAL);
    CHECK(zse_tool_format_from_name("pythonic", &f) == -1 && strstr(zse_error_message(), "hermes"));
}

typedef struct {
    zse_tool_format f;
    const char *text;
    const char *content; /* NULL: none */
    int n;
    const char *names[3], *args[3];
} parse_case;

static const parse_case cases[] = {
    {ZSE_TOOL_HERMES,
     "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>\n"
     "<tool_call>\n{\"arguments\": {\"q\": \"a}b\\\"\"}, \"name\": \"search\"}\n</tool_call>",
     "Let me check.\n\n", 2, {"get_weather", "search"}, {"{\"city\": \"Paris\", \"unit\": \"c\"}", "{\"q\": \"a}b\\\"\"}"}},
    {ZSE_TOOL_HERMES, "No tools needed: 2 < 3 and <tool> is fine.", "No tools needed: 2 < 3 and <tool> is fine.", 0,
     {0}, {0}},
    {ZSE_TOOL_HERMES, "<tool_call>\n{\"name\": \"f\", \"arguments\": {broken}\n</tool_call>",
     "<tool_call>\n{\"name\": \"f\", \"arguments\": {broken}\n</tool_call>", 0, {0}, {0}},
    {ZSE_TOOL_HERMES, "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}</tool_call>", NULL, 1, {"f"},
     {"{\"x\": 1}"}},
    {ZSE_TOOL_LLAMA3, "<|python_tag|>{\"name\": \"get_time\", \"parameters\": {\"tz\": \"UTC\"}}", NULL, 1, {"get_time"},
     {"{\"tz\": \"UTC\"}"}},
    {ZSE_TOOL_LLAMA3, " {\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"k\": [1, 2]}}", NULL, 2,
     {"a", "b"}, {"{}", "{\"k\": [1, 2]}"}},
    {ZSE_TOOL_LLAMA3, "{\"answer\": 42}", "{\"answer\": 42}", 0, {0}, {0}},
    {ZSE_TOOL_LLAMA3, "The answer is 42.", "The answer is 42.", 0, {0}, {0}},
    {ZSE_TOOL_MISTRAL, "Sure.[TOOL_CALLS][{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}, {\"name\": \"neg\", "
                       "\"arguments\": {\"x\": -1}}]",
     "Sure.", 2, {"add", "neg"}, {"{\"a\": 1, \"b\": 2}", "{\"x\": -1}"}},
    {ZSE_TOOL_MISTRAL, "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Oslo\"}[TOOL_CALLS]get_time[ARGS]{}", NULL, 2,
     {"get_weather", "get_time"}, {"{\"city\": \"Oslo\"}", "{}"}},
    {ZSE_TOOL_JSON, "```json\n[{\"name\": \"x\", \"arguments\": {\"v\": true}}]\n```", NULL, 1, {"x"}, {"{\"v\": true}"}},
    {ZSE_TOOL_JSON, "{\"name\": \"y\", \"parameters\": {\"s\": \"t\"}}", NULL, 1, {"y"}, {"{\"s\": \"t\"}"}},
    {ZSE_TOOL_JSON, "Just text, {not a call}", "Just text, {not a call}", 0, {0}, {0}},
};

static void complete_parse(void)
{
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const parse_case *c = &cases[i];
        zse_tool_result r;
        CHECK(zse_tool_parse(c->f, c->text, strlen(c->text), 7, &r) == 0);
        CHECK_MSG(r.n_calls == c->n, "case %zu: %d calls, want %d", i, r.n_calls, c->n);
        CHECK_MSG((c->content == NULL) == (r.content == NULL) && (!c->content || !strcmp(c->content, r.content)),
                  "case %zu: content \"%s\"", i, r.content ? r.content : "(null)");
        for (int k = 0; k < r.n_calls && k < c->n; k++) {
            CHECK_MSG(!strcmp(r.calls[k].name, c->names[k]), "case %zu call %d: %s", i, k, r.calls[k].name);
            CHECK_MSG(!strcmp(r.calls[k].arguments, c->args[k]), "case %zu call %d: %s", i, k, r.calls[k].arguments);
            if (c->f == ZSE_TOOL_MISTRAL)
                CHECK_EQ_INT(strlen(r.calls[k].id), 9);
            else
                CHECK(!strncmp(r.calls[k].id, "call_", 5) && strlen(r.calls[k].id) == 29);
            for (int j = 0; j < k; j++)
                CHECK(strcmp(r.calls[j].id, r.calls[k].id));
        }
        if (r.n_calls) {
            json_t *j = zse_tool_calls_json(&r);
            CHECK(json_array_size(j) == (size_t)r.n_calls);
            CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(json_array_get(j, 0), "function"), "name")),
                         c->names[0]);
            json_decref(j);
            zse_tool_result again;
            zse_tool_parse(c->f, c->text, strlen(c->text), 7, &again);
            CHECK_EQ_STR(again.calls[0].id, r.calls[0].id); /* the same seed, the same ids */
            zse_tool_result_free(&again);
        }
        zse_tool_result_free(&r);
    }
}

/* streams a case in pieces of `step` bytes and checks the deltas against the parse */
static void stream_case(const parse_case *c, size_t step, size_t ci)
{
    zse_tool_stream *s = zse_tool_stream_new(c->f, 7);
    zse_tool_deltas d = {0};
    zse_buf content = {0}, args[3] = {{0}};
    char *names[3] = {0}, *ids[3] = {0};
    bool order_ok = true;
    size_t len = strlen(c->text);
    for (size_t at = 0; at < len; at += step) {
        size_t n = at + step > len ? len - at : step;
        CHECK(zse_tool_stream_push(s, c->text + at, n, &d) == 0);
    }
    CHECK(zse_tool_stream_finish(s, &d) == 0);
    for (int i = 0; i < d.n; i++) {
        zse_tool_delta *x = &d.d[i];
        if (x->kind == ZSE_TOOL_DELTA_CONTENT) {
            zse_buf_puts(&content, x->text);
            continue;
        }
        if (x->index < 0 || x->index >= 3) {
            order_ok = false;
            continue;
        }
        if (x->name) {
            order_ok = order_ok && !names[x->index];
            names[x->index] = x->name;
            ids[x->index] = x->id;
            x->name = x->id = NULL;
        } else {
            order_ok = order_ok && names[x->index]; /* arguments only after the name */
        }
        zse_buf_puts(&args[x->index], x->text);
    }
    CHECK_MSG(order_ok, "case %zu step %zu: a call's arguments came before its name", ci, step);
    CHECK_MSG(zse_tool_stream_calls(s) == c->n, "case %zu step %zu: %d calls", ci, step, zse_tool_stream_calls(s));
    zse_tool_result r;
    zse_tool_parse(c->f, c->text, strlen(c->text), 7, &r);
    /* the complete parser drops whitespace-only content next to calls; streaming sends it */
    bool content_ok = r.content ? !strcmp(zse_buf_str(&content), r.content)
                                : strspn(zse_buf_str(&content), " \n\t") == content.len;
    CHECK_MSG(content_ok, "case %zu step %zu: streamed content \"%s\"", ci, step, zse_buf_str(&content));
    for (int k = 0; k < r.n_calls && k < 3; k++) {
        CHECK_MSG(names[k] && !strcmp(names[k], r.calls[k].name), "case %zu step %zu call %d name", ci, step, k);
        CHECK_MSG(ids[k] && !strcmp(ids[k], r.calls[k].id), "case %zu step %zu call %d id", ci, step, k);
        CHECK_MSG(!strcmp(zse_buf_str(&args[k]), r.calls[k].arguments), "case %zu step %zu call %d args %s", ci, step,
                  k, zse_buf_str(&args[k]));
    }
    zse_tool_result_free(&r);
    for (int k = 0; k < 3; k++) {
        free(names[k]);
        free(ids[k]);
        zse_buf_free(&args[k]);
    }
    zse_buf_free(&content);
    zse_tool_deltas_free(&d);
    zse_tool_stream_free(s);
}

static void streaming(void)
{
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        if (i == 2)
            continue; /* a call that turns out malformed after its name was sent: not comparable */
        for (size_t step = 1; step <= 7; step += 3)
            stream_case(&cases[i], step, i);
        stream_case(&cases[i], 100000, i);
    }
    /* the marker's beginning is held back, and released when it is not one */
    zse_tool_stream *s = zse_tool_stream_new(ZSE_TOOL_HERMES, 1);
    zse_tool_deltas d = {0};
    zse_tool_stream_push(s, "Hello <tool", 11, &d);
    CHECK(d.n == 1 && !strcmp(d.d[0].text, "Hello "));
    zse_tool_deltas_clear(&d);
    zse_tool_stream_push(s, "box> ok", 7, &d);
    CHECK(d.n == 1 && !strcmp(d.d[0].text, "<toolbox> ok"));
    zse_tool_deltas_clear(&d);
    /* a call: name first (with id), arguments as they arrive, before the call is closed */
    const char *call = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": ";
    zse_tool_stream_push(s, call, strlen(call), &d);
    CHECK(d.n == 2 && d.d[0].kind == ZSE_TOOL_DELTA_CALL && d.d[0].name && !strcmp(d.d[0].name, "f") && d.d[0].id &&
          !strcmp(d.d[1].text, "{\"a\": "));
    zse_tool_deltas_clear(&d);
    zse_tool_stream_push(s, "1}}\n</tool_call>", 16, &d);
    CHECK(d.n == 1 && d.d[0].index == 0 && !d.d[0].name && !strcmp(d.d[0].text, "1}"));
    zse_tool_deltas_free(&d);
    zse_tool_stream_free(s);
}

/* a vocabulary of single bytes plus a few call-shaped tokens, EOS last */
static const char *multi[] = {"<tool_call>", "\n{\"name\": \"", "\", \"arguments\": ", "}\n</tool_call>", "get_weather",
                              "{\"", "\": \"", "\"}", "[TOOL_CALLS]", "Paris", " "};
#define NM (int)(sizeof multi / sizeof *multi)
#define EOS (256 + NM)

static zse_grammar_vocab *vocab(void)
{
    static uint8_t single[256];
    const uint8_t *bytes[EOS + 1];
    uint32_t lens[EOS + 1];
    for (int i = 0; i < 256; i++) {
        single[i] = (uint8_t)i;
        bytes[i] = &single[i];
        lens[i] = 1;
    }
    for (int i = 0; i < NM; i++) {
        bytes[256 + i] = (const uint8_t *)multi[i];
        lens[256 + i] = (uint32_t)strlen(multi[i]);
    }
    bytes[EOS] = (const uint8_t *)"";
    lens[EOS] = 0;
    int32_t eos = EOS;
    return zse_grammar_vocab_new(EOS + 1, bytes, lens, &eos, 1);
}

static uint64_t rs = 12345;
static uint32_t rnd(void)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (uint32_t)(rs >> 20);
}

/* a random walk to EOS under the grammar; the text or NULL */
static char *draw(zse_grammar *g, int max)
{
    zse_matcher *m = zse_matcher_new(g, 0);
    uint32_t mask[(EOS + 32) / 32];
    zse_buf out = {0};
    char *r = NULL;
    for (int step = 0; step < max; step++) {
        int n = zse_matcher_fill_mask(m, mask);
        if (n <= 0)
            break;
        bool eos_ok = mask[EOS >> 5] >> (EOS & 31) & 1;
        int pick = -1;
        if (eos_ok && (n == 1 || rnd() % 3 == 0)) {
            pick = EOS;
        } else {
            int k = (int)(rnd() % (uint32_t)(n - eos_ok));
            for (int id = 0; id < EOS; id++)
                if ((mask[id >> 5] >> (id & 31) & 1) && k-- == 0) {
                    pick = id;
                    break;
                }
        }
        if (zse_matcher_accept_token(m, pick))
            break;
        if (pick == EOS) {
            r = zse_strndup(out.data ? out.data : "", out.len);
            break;
        }
        if (pick < 256)
            zse_buf_append(&out, (char[]){(char)pick}, 1);
        else
            zse_buf_puts(&out, multi[pick - 256]);
    }
    zse_buf_free(&out);
    zse_matcher_free(m);
    return r;
}

static void grammars(void)
{
    zse_grammar_vocab *v = vocab();
    json_t *weather = json_loads("{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\",\"maxLength\":6},"
                                 "\"days\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":7}},"
                                 "\"required\":[\"city\",\"days\"],\"additionalProperties\":false}", 0, NULL);
    json_t *time = json_loads("{\"type\":\"object\",\"properties\":{\"tz\":{\"enum\":[\"UTC\",\"CET\"]}},\"required\":[\"tz\"]}",
                              0, NULL);
    zse_tool_def tools[2] = {{"get_weather", weather}, {"get_time", time}};
    zse_tool_format formats[4] = {ZSE_TOOL_HERMES, ZSE_TOOL_LLAMA3, ZSE_TOOL_MISTRAL, ZSE_TOOL_JSON};
    for (int fi = 0; fi < 4; fi++) {
        for (int mode = 0; mode < 3; mode++) {
            zse_tool_choice choice = mode == 2 ? ZSE_TOOL_CHOICE_NAMED : ZSE_TOOL_CHOICE_REQUIRED;
            bool parallel = mode == 1;
            zse_grammar *g = zse_tool_grammar(formats[fi], tools, 2, choice, "get_time", parallel, v);
            CHECK_MSG(g != NULL, "%s mode %d: %s", zse_tool_format_name(formats[fi]), mode, zse_error_message());
            int ended = 0, multi_calls = 0;
            for (int t = 0; g && t < 12; t++) {
                char *text = draw(g, 400);
                if (!text)
                    continue;
                ended++;
                zse_tool_result r;
                CHECK(zse_tool_parse(formats[fi], text, strlen(text), 1, &r) == 0);
                CHECK_MSG(r.n_calls >= 1 && (parallel || r.n_calls == 1), "%s mode %d: %d calls in %s",
                          zse_tool_format_name(formats[fi]), mode, r.n_calls, text);
                multi_calls += r.n_calls > 1;
                for (int k = 0; k < r.n_calls; k++) {
                    json_t *a = json_loads(r.calls[k].arguments, 0, NULL);
                    bool is_time = !strcmp(r.calls[k].name, "get_time");
                    CHECK_MSG(is_time || (choice != ZSE_TOOL_CHOICE_NAMED && !strcmp(r.calls[k].name, "get_weather")),
                              "name %s", r.calls[k].name);
                    if (is_time) {
                        const char *tz = json_string_value(json_object_get(a, "tz"));
                        CHECK_MSG(tz && (!strcmp(tz, "UTC") || !strcmp(tz, "CET")), "%s", r.calls[k].arguments);
                    } else {
                        json_t *days = json_object_get(a, "days"), *city = json_object_get(a, "city");
                        CHECK_MSG(json_is_integer(days) && json_integer_value(days) >= 1 && json_integer_value(days) <= 7 &&
                                      json_is_string(city) && json_object_size(a) == 2,
                                  "%s", r.calls[k].arguments);
                    }
                    json_decref(a);
                }
                zse_tool_result_free(&r);
                free(text);
            }
            CHECK_MSG(ended >= 6, "%s mode %d: %d of 12 draws ended", zse_tool_format_name(formats[fi]), mode, ended);
            if (parallel)
                CHECK_MSG(multi_calls > 0, "%s: parallel never gave two calls", zse_tool_format_name(formats[fi]));
            zse_grammar_release(g);
        }
    }
    /* auto: free text, then once the marker is written a valid call */
    zse_grammar *g = zse_tool_grammar(ZSE_TOOL_HERMES, tools, 2, ZSE_TOOL_CHOICE_AUTO, NULL, false, v);
    CHECK(g != NULL);
    zse_matcher *m = zse_matcher_new(g, 0);
    const char *ok = "I will look. <tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>";
    CHECK(zse_matcher_accept_bytes(m, ok, strlen(ok)) == 0 && zse_matcher_can_end(m));
    zse_matcher_reset(m);
    CHECK(zse_matcher_accept_bytes(m, "plain answer", 12) == 0 && zse_matcher_can_end(m));
    const char *bad = " <tool_call>\n{\"name\": \"rm_rf\"";
    CHECK(zse_matcher_accept_bytes(m, bad, strlen(bad)) == 1);
    zse_matcher_free(m);
    zse_grammar_release(g);
    CHECK(zse_tool_grammar(ZSE_TOOL_LLAMA3, tools, 2, ZSE_TOOL_CHOICE_AUTO, NULL, false, v) == NULL);
    CHECK(zse_tool_grammar(ZSE_TOOL_HERMES, tools, 2, ZSE_TOOL_CHOICE_NAMED, "nope", false, v) == NULL &&
          strstr(zse_error_message(), "'nope'"));
    json_t *bad_schema = json_loads("{\"type\":\"object\",\"properties\":{\"x\":{\"not\":{}}}}", 0, NULL);
    zse_tool_def bad_tool = {"bad", bad_schema};
    CHECK(zse_tool_grammar(ZSE_TOOL_HERMES, &bad_tool, 1, ZSE_TOOL_CHOICE_REQUIRED, NULL, false, v) == NULL &&
          strstr(zse_error_message(), "tool 'bad'") && strstr(zse_error_message(), "'not'"));
    json_decref(bad_schema);
    json_decref(weather);
    json_decref(time);
    zse_grammar_vocab_free(v);
}

int main(void)
{
    detect();
    complete_parse();
    streaming();
    grammars();
    return test_main_end();
}
