/* Constrained decoding through the engine core (tests/fixtures/tiny-qwen2, f32, CPU): a random
 * model sampling at temperature 1 under a JSON Schema, a regex, a choice list and a
 * tool_choice grammar produces only text that parses and validates, through zse_seq and
 * through the engine, with speculative decoding too (and, greedy, the same text as without
 * it); a finished grammar ends generation even with ignore_eos; compile errors name what is
 * not supported. */
#include "fixture.h"
#include "test.h"

#include "engine/engine.h"
#include "format/format.h"
#include "toolcall/toolcall.h"
#include "zse.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <math.h>
#include <pthread.h>
#include <unistd.h>

#define MAX_TEXT 4096

static const char *SCHEMA = "{\"type\": \"object\", \"properties\": {"
                            "\"name\": {\"type\": \"string\", \"maxLength\": 12},"
                            "\"age\": {\"type\": \"integer\", \"minimum\": 0, \"maximum\": 120},"
                            "\"tags\": {\"type\": \"array\", \"items\": {\"enum\": [\"a\", \"b\", \"c\"]}, \"maxItems\": 3},"
                            "\"ok\": {\"type\": \"boolean\"}},"
                            "\"required\": [\"name\", \"age\", \"ok\"], \"additionalProperties\": false}";

/* the schema above, checked by hand */
static bool valid_person(const char *text)
{
    json_error_t err;
    json_t *v = json_loads(text, 0, &err);
    bool ok = json_is_object(v) && json_object_size(v) <= 4;
    const json_t *name = json_object_get(v, "name"), *age = json_object_get(v, "age"), *tags = json_object_get(v, "tags"),
                 *flag = json_object_get(v, "ok");
    ok = ok && json_is_string(name) && json_is_integer(age) && json_integer_value(age) >= 0 &&
         json_integer_value(age) <= 120 && json_is_boolean(flag);
    if (ok && name) {
        /* maxLength counts characters */
        const char *s = json_string_value(name);
        size_t chars = 0;
        for (; *s; s++)
            chars += ((unsigned char)*s & 0xC0) != 0x80;
        ok = chars <= 12;
    }
    if (ok && tags) {
        ok = json_is_array(tags) && json_array_size(tags) <= 3;
        for (size_t i = 0; ok && i < json_array_size(tags); i++) {
            const char *t = json_string_value(json_array_get(tags, i));
            ok = t && (!strcmp(t, "a") || !strcmp(t, "b") || !strcmp(t, "c"));
        }
    }
    size_t known = !!name + !!age + !!tags + !!flag;
    ok = ok && known == json_object_size(v);
    json_decref(v);
    return ok;
}

static bool matches(const char *pattern, const char *text)
{
    int code;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, PCRE2_ANCHORED | PCRE2_ENDANCHORED | PCRE2_UTF,
                                   &code, &off, NULL);
    pcre2_match_data *md = re ? pcre2_match_data_create_from_pattern(re, NULL) : NULL;
    bool ok = md && pcre2_match(re, (PCRE2_SPTR)text, strlen(text), 0, 0, md, NULL) >= 0;
    pcre2_match_data_free(md);
    pcre2_code_free(re);
    return ok;
}

/* the engine's events, collected */
typedef struct {
    char text[MAX_TEXT];
    size_t len;
    zse_finish finish;
} collected;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int finals;

static bool collect(void *user, const zse_token_event *ev)
{
    collected *c = user;
    pthread_mutex_lock(&mu);
    size_t l = strlen(ev->text);
    if (c->len + l < MAX_TEXT) {
        memcpy(c->text + c->len, ev->text, l + 1);
        c->len += l;
    }
    if (ev->finish != ZSE_FINISH_NONE) {
        c->finish = ev->finish;
        finals++;
        pthread_cond_broadcast(&cv);
    }
    pthread_mutex_unlock(&mu);
    return true;
}

static bool wait_all(int n)
{
    return test_wait_count(&mu, &cv, &finals, n, true);
}

/* generates with zse_seq (spec NULL: without drafts); the text and the finish */
static zse_finish generate(zse_model *m, const int32_t *ids, size_t n, const zse_sampling *s, const zse_spec_params *spec,
                           char *text)
{
    text[0] = '\0';
    zse_seq *q = zse_seq_new(m, s);
    CHECK(q && zse_seq_set_spec(q, spec) == 0 && zse_seq_feed(q, ids, n) == 0);
    zse_finish fin = ZSE_FINISH_NONE;
    size_t len = 0;
    while (q && fin == ZSE_FINISH_NONE) {
        int32_t t;
        char *piece;
        if (zse_seq_next(q, &t, &piece, &fin) != 0) {
            fprintf(stderr, "zse_seq_next: %s\n", zse_last_error());
            fin = ZSE_FINISH_ERROR;
            break;
        }
        size_t l = strlen(piece);
        if (len + l < MAX_TEXT) {
            memcpy(text + len, piece, l + 1);
            len += l;
        }
        zse_free(piece);
    }
    zse_seq_free(q);
    return fin;
}

static zse_sampling sampled(const zse_constraint *c, uint64_t seed, int max_tokens)
{
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 1.0f;
    s.seed = seed;
    s.max_tokens = max_tokens;
    s.constraint = c;
    return s;
}

static void json_schema_outputs(zse_model *m, const int32_t *ids, size_t n)
{
    zse_constraint *c = zse_constraint_json_schema(m, SCHEMA, strlen(SCHEMA), false);
    CHECK_MSG(c != NULL, "%s", zse_last_error());
    if (!c)
        return;
    static char text[MAX_TEXT];
    int valid = 0, stopped = 0;
    for (int i = 0; i < 12; i++) {
        zse_sampling s = sampled(c, 7 + (uint64_t)i, 400);
        zse_finish fin = generate(m, ids, n, &s, NULL, text);
        stopped += fin == ZSE_FINISH_STOP;
        bool ok = valid_person(text);
        valid += ok;
        if (!ok)
            fprintf(stderr, "not valid: %s\n", text);
    }
    CHECK_EQ_INT(valid, 12);
    CHECK_EQ_INT(stopped, 12);
    /* greedy: the same text with n-gram drafts and without; ignore_eos ends when it is whole */
    zse_sampling g = sampled(c, 0, 400);
    g.temperature = 0;
    g.ignore_eos = true;
    static char plain[MAX_TEXT], spec[MAX_TEXT];
    zse_spec_params ngram = {ZSE_SPEC_NGRAM, 4, NULL};
    CHECK(generate(m, ids, n, &g, NULL, plain) == ZSE_FINISH_STOP);
    CHECK(generate(m, ids, n, &g, &ngram, spec) == ZSE_FINISH_STOP);
    CHECK(valid_person(plain) && strcmp(plain, spec) == 0);
    /* a sequence truncated to a new prompt starts the grammar over: the same text again */
    {
        zse_seq *q = zse_seq_new(m, &g);
        size_t len = 0;
        static char again[MAX_TEXT];
        for (int round = 0; q && round < 2; round++) {
            char *dst = round ? again : text;
            zse_finish fin = ZSE_FINISH_NONE;
            len = 0;
            dst[0] = '\0';
            CHECK(zse_seq_truncate(q, 0) == 0 && zse_seq_feed(q, ids, n) == 0);
            while (fin == ZSE_FINISH_NONE) {
                int32_t t;
                char *piece;
                if (zse_seq_next(q, &t, &piece, &fin) != 0) {
                    CHECK_MSG(0, "zse_seq_next after truncate: %s", zse_last_error());
                    break;
                }
                if (len + strlen(piece) < MAX_TEXT) {
                    memcpy(dst + len, piece, strlen(piece) + 1);
                    len += strlen(piece);
                }
                zse_free(piece);
            }
        }
        CHECK_MSG(strcmp(text, plain) == 0 && strcmp(again, plain) == 0, "'%s' / '%s'", text, again);
        zse_seq_free(q);
    }
    /* sampled with drafts: still valid */
    zse_sampling sd = sampled(c, 99, 400);
    CHECK(generate(m, ids, n, &sd, &ngram, text) == ZSE_FINISH_STOP && valid_person(text));

    /* the engine, 8 sampled requests at once with n-gram drafts beside 2 unconstrained ones */
    zse_engine_params ep = {.max_seqs = 10, .max_batch_tokens = 128, .max_queue = 10, .spec = ngram};
    zse_engine *e = zse_engine_start(m, &ep);
    CHECK(e != NULL);
    static collected out[10];
    memset(out, 0, sizeof out);
    for (int i = 0; e && i < 10; i++) {
        zse_sampling s = sampled(i < 8 ? c : NULL, 200 + (uint64_t)i, i < 8 ? 400 : 16);
        CHECK(zse_engine_submit(e, ids, n, &s, 0, collect, &out[i], NULL) == 0);
    }
    CHECK(wait_all(10));
    for (int i = 0; i < 8; i++)
        CHECK_MSG(out[i].finish == ZSE_FINISH_STOP && valid_person(out[i].text), "engine %d: %s", i, out[i].text);
    zse_engine_stats st;
    zse_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    zse_engine_stop(e, 1);
    zse_constraint_free(c);
}

static void regex_and_choice(zse_model *m, const int32_t *ids, size_t n)
{
    static const char *const patterns[] = {"[A-Z][a-z]{2,6}-[0-9]{3}", "(yes|no|maybe)( please)?",
                                           "\\d{4}-\\d{2}-\\d{2}"};
    static char text[MAX_TEXT];
    for (size_t p = 0; p < sizeof patterns / sizeof patterns[0]; p++) {
        zse_constraint *c = zse_constraint_regex(m, patterns[p], strlen(patterns[p]));
        CHECK_MSG(c != NULL, "%s: %s", patterns[p], zse_last_error());
        for (int i = 0; c && i < 4; i++) {
            zse_sampling s = sampled(c, 31 + (uint64_t)i, 64);
            CHECK(generate(m, ids, n, &s, NULL, text) == ZSE_FINISH_STOP);
            CHECK_MSG(matches(patterns[p], text), "/%s/ gave \"%s\"", patterns[p], text);
        }
        zse_constraint_free(c);
    }
    static const char *const choices[] = {"red", "green", "blue light"};
    zse_constraint *c = zse_constraint_choice(m, choices, 3);
    for (int i = 0; c && i < 6; i++) {
        zse_sampling s = sampled(c, 50 + (uint64_t)i, 64);
        CHECK(generate(m, ids, n, &s, NULL, text) == ZSE_FINISH_STOP);
        CHECK_MSG(!strcmp(text, "red") || !strcmp(text, "green") || !strcmp(text, "blue light"), "choice \"%s\"", text);
    }
    zse_constraint_free(c);
}

/* tool_choice required and named, in the model's format (tiny-qwen2's template: hermes) */
static void tool_calls(zse_model *m, const int32_t *ids, size_t n)
{
    const char *tools = "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": "
                        "{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"maxLength\": 8}},"
                        " \"required\": [\"city\"]}}},"
                        " {\"type\": \"function\", \"function\": {\"name\": \"add\", \"parameters\": "
                        "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}, \"b\": {\"type\": \"integer\"}},"
                        " \"required\": [\"a\", \"b\"], \"additionalProperties\": false}}}]";
    static char text[MAX_TEXT];
    for (int k = 0; k < 2; k++) {
        zse_constraint *c = zse_constraint_tools(m, tools, k ? "add" : "required", false, NULL);
        CHECK_MSG(c != NULL, "%s", zse_last_error());
        for (int i = 0; c && i < 4; i++) {
            zse_sampling s = sampled(c, 70 + (uint64_t)i, 400);
            CHECK(generate(m, ids, n, &s, NULL, text) == ZSE_FINISH_STOP);
            zse_tool_result r;
            CHECK(zse_tool_parse(ZSE_TOOL_HERMES, text, strlen(text), 1, &r) == 0);
            CHECK_MSG(r.n_calls == 1 && (k == 0 || !strcmp(r.calls[0].name, "add")), "calls in \"%s\"", text);
            if (r.n_calls == 1) {
                json_t *args = json_loads(r.calls[0].arguments, 0, NULL);
                bool ok = json_is_object(args) &&
                          (!strcmp(r.calls[0].name, "add")
                               ? json_is_integer(json_object_get(args, "a")) && json_is_integer(json_object_get(args, "b"))
                               : json_is_string(json_object_get(args, "city")));
                CHECK_MSG(ok, "arguments %s of %s", r.calls[0].arguments, r.calls[0].name);
                json_decref(args);
            }
            zse_tool_result_free(&r);
        }
        zse_constraint_free(c);
    }
    CHECK(zse_constraint_tools(m, tools, "no_such_tool", false, NULL) == NULL);
    CHECK(strstr(zse_last_error(), "no_such_tool") != NULL);
    CHECK(zse_constraint_tools(m, tools, "required", false, "klingon") == NULL);
}

static void refusals(zse_model *m)
{
    const char *bad = "{\"type\": \"object\", \"properties\": {\"x\": {\"not\": {\"type\": \"string\"}}}}";
    CHECK(zse_constraint_json_schema(m, bad, strlen(bad), false) == NULL);
    CHECK_MSG(strstr(zse_last_error(), "not") && strstr(zse_last_error(), "properties/x"), "%s", zse_last_error());
    CHECK(zse_constraint_json_schema(m, "{nope", 5, false) == NULL);
    CHECK(zse_constraint_regex(m, "(a", 2) == NULL);
}

/* every mask computed so far was timed: counts, quantiles in order, within the buckets */
static void mask_stats(zse_model *m)
{
    zse_mask_stats st, none = {0};
    zse_model_get_mask_stats(m, &st);
    uint64_t sum = 0;
    for (int i = 0; i < ZSE_MASK_BUCKETS; i++)
        sum += st.count[i];
    CHECK(st.n > 10 && sum == st.n && st.total_s > 0);
    double p50 = zse_mask_stats_quantile(&st, 0.5), p99 = zse_mask_stats_quantile(&st, 0.99);
    CHECK(p50 > 0 && p50 <= p99 && p99 < 1.0);
    CHECK(zse_mask_bucket_le(0) == 1e-7 && zse_mask_bucket_le(4) == 2e-7 && isinf(zse_mask_bucket_le(ZSE_MASK_BUCKETS - 1)));
    CHECK(zse_mask_stats_quantile(&none, 0.5) == 0);
    zse_mask_stats d = st;
    zse_mask_stats_sub(&d, &st);
    CHECK(d.n == 0 && d.total_s == 0);
}

int main(void)
{
    char path[512];
    if (test_convert_fixture("tiny-qwen2", "constraint", path, sizeof path) != 0)
        return 1;
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.threads = 2;
    lp.max_seqs = 8;
    lp.ctx_size = 1024;
    zse_model *m = zse_model_load(path, &lp);
    CHECK(m != NULL);
    if (m) {
        const char *prompt = "Here is a person as JSON:\n";
        int32_t *ids;
        size_t n;
        CHECK(zse_tokenize(m, prompt, strlen(prompt), 0, &ids, &n) == 0);
        json_schema_outputs(m, ids, n);
        regex_and_choice(m, ids, n);
        tool_calls(m, ids, n);
        refusals(m);
        mask_stats(m);
        zse_free(ids);
    }
    zse_model_free(m);
    remove(path);
    return test_main_end();
}
