/* src/grammar: masks agree token by token with trying each token (accept + rollback) on
 * random walks through JSON Schema, regex, choice and composed grammars; outputs drawn under
 * the masks parse and hold the schema's constraints; EOS rules, forced bytes, rollback,
 * special tokens, compile errors naming keyword and path; a real tokenizer's vocabulary. */
#include "test.h"

#include "grammar/grammar.h"

#include <jansson.h>
#include <pthread.h>

/* a vocabulary: the 256 single bytes, some multi-byte tokens that cross JSON structure,
 * one special token (never matches) and EOS last */
static const char *multi[] = {"\"", "{\"", "\":", "\": ", "\", \"", "\",", "true", "null", "false", "12", "345",
                              "abc", "ab", " ", "\"}", "}", "},", "[", "]", "],", ", ", "-1", "0.", "e+",
                              "\\n", "\\\"", "hello", " world", "é", "\xc3", "\xa9", "日本", "::", "<tool_call>",
                              "{\"name\": \"", "\", \"arguments\": ", "}\n</tool_call>", "aaaa", "xyz\"", "\"a"};
#define N_MULTI (int)(sizeof multi / sizeof *multi)
#define SPECIAL_ID (256 + N_MULTI)
#define EOS_ID (SPECIAL_ID + 1)
#define N_VOCAB (EOS_ID + 1)

static zse_grammar_vocab *make_vocab(void)
{
    static uint8_t single[256];
    const uint8_t *bytes[N_VOCAB];
    uint32_t lens[N_VOCAB];
    for (int i = 0; i < 256; i++) {
        single[i] = (uint8_t)i;
        bytes[i] = &single[i];
        lens[i] = 1;
    }
    for (int i = 0; i < N_MULTI; i++) {
        bytes[256 + i] = (const uint8_t *)multi[i];
        lens[256 + i] = (uint32_t)strlen(multi[i]);
    }
    bytes[SPECIAL_ID] = NULL;
    lens[SPECIAL_ID] = 0;
    bytes[EOS_ID] = (const uint8_t *)"</s>";
    lens[EOS_ID] = 4;
    int32_t eos = EOS_ID;
    return zse_grammar_vocab_new(N_VOCAB, bytes, lens, &eos, 1);
}

static uint64_t rng_state = 88172645463325252ull;
static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static bool bit(const uint32_t *mask, int id)
{
    return mask[id >> 5] >> (id & 31) & 1;
}

/* every token's bit equals what accepting it says; returns mismatches */
static int check_mask_exact(zse_matcher *m, const uint32_t *mask)
{
    int bad = 0;
    for (int id = 0; id < N_VOCAB; id++) {
        int rc = zse_matcher_accept_token(m, id);
        bool ok = rc == 0;
        if (ok)
            zse_matcher_rollback(m, 1);
        if (ok != bit(mask, id)) {
            if (bad++ < 5)
                fprintf(stderr, "  token %d: mask %d, accept %d\n", id, bit(mask, id), ok);
        }
    }
    return bad;
}

/* a random walk under the mask (EOS taken with probability 1/4 where allowed); the text
 * produced, or NULL when the walk hit max steps; checks every mask on the way if exact */
static char *walk(zse_grammar *g, const zse_grammar_vocab *v, int max_steps, bool exact, int *mismatches)
{
    zse_matcher *m = zse_matcher_new(g, 4);
    uint32_t mask[(N_VOCAB + 31) / 32];
    zse_buf out = {0};
    char *text = NULL;
    for (int step = 0; step < max_steps; step++) {
        int n = zse_matcher_fill_mask(m, mask);
        if (n <= 0)
            break;
        if (exact)
            *mismatches += check_mask_exact(m, mask);
        int32_t pick = -1;
        if (bit(mask, EOS_ID) && (n == 1 || rnd() % 4 == 0)) {
            pick = EOS_ID;
        } else {
            int k = (int)(rnd() % (uint32_t)(bit(mask, EOS_ID) ? n - 1 : n));
            for (int id = 0; id < N_VOCAB; id++)
                if (bit(mask, id) && id != EOS_ID && k-- == 0) {
                    pick = id;
                    break;
                }
        }
        if (zse_matcher_accept_token(m, pick) != 0)
            break;
        if (pick == EOS_ID) {
            text = zse_strdup(zse_buf_str(&out));
            break;
        }
        (void)v;
        if (pick < 256)
            zse_buf_append(&out, (char[]){(char)pick}, 1);
        else
            zse_buf_puts(&out, multi[pick - 256]);
    }
    zse_buf_free(&out);
    zse_matcher_free(m);
    return text;
}

static zse_grammar *schema(const zse_grammar_vocab *v, const char *text)
{
    zse_grammar *g = zse_grammar_json_schema(v, text, strlen(text), 0);
    CHECK_MSG(g != NULL, "%s: %s", text, zse_error_message());
    return g;
}

static void masks_match_trials(const zse_grammar_vocab *v)
{
    const char *schemas[] = {
        "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"},\"b\":{\"type\":\"string\"},"
        "\"c\":{\"type\":\"array\",\"items\":{\"type\":\"boolean\"},\"maxItems\":3}},\"required\":[\"a\",\"c\"]}",
        "{\"type\":\"string\",\"maxLength\":5}",
        "{\"anyOf\":[{\"type\":\"number\"},{\"type\":\"null\"},{\"enum\":[\"x\",\"y\\\"z\",1.5]}]}",
        "{\"type\":\"object\",\"additionalProperties\":true,\"properties\":{\"ab\":{\"const\":1}}}",
        "{\"$defs\":{\"n\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\",\"minimum\":-5,\"maximum\":120},"
        "\"next\":{\"anyOf\":[{\"$ref\":\"#/$defs/n\"},{\"type\":\"null\"}]}},\"required\":[\"v\",\"next\"]}},"
        "\"$ref\":\"#/$defs/n\"}",
    };
    for (size_t i = 0; i < sizeof schemas / sizeof *schemas; i++) {
        zse_grammar *g = schema(v, schemas[i]);
        if (!g)
            continue;
        for (int t = 0; t < 6; t++) {
            int bad = 0;
            char *s = walk(g, v, 60, true, &bad);
            CHECK_MSG(bad == 0, "schema %zu: %d mask bits differ from accepting the token", i, bad);
            free(s);
        }
        zse_grammar_release(g);
    }
    zse_grammar *g = zse_grammar_regex(v, "(ab|c)*[0-9]{2,4}\\.?x", strlen("(ab|c)*[0-9]{2,4}\\.?x"));
    CHECK(g != NULL);
    for (int t = 0; g && t < 6; t++) {
        int bad = 0;
        free(walk(g, v, 40, true, &bad));
        CHECK_EQ_INT(bad, 0);
    }
    zse_grammar_release(g);
}

static bool is_int_in(const json_t *x, long long lo, long long hi)
{
    return json_is_integer(x) && json_integer_value(x) >= lo && json_integer_value(x) <= hi;
}

static void outputs_validate(const zse_grammar_vocab *v)
{
    zse_grammar *g = schema(v, "{\"type\":\"object\",\"properties\":{\"id\":{\"type\":\"integer\",\"minimum\":3,"
                               "\"maximum\":250},\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\","
                               "\"minLength\":1,\"maxLength\":3},\"minItems\":1,\"maxItems\":2},\"ok\":{\"type\":\"boolean\"}},"
                               "\"required\":[\"id\",\"tags\",\"ok\"],\"additionalProperties\":false}");
    int done = 0;
    for (int t = 0; g && t < 40; t++) {
        char *s = walk(g, v, 400, false, NULL);
        if (!s)
            continue;
        done++;
        json_error_t e;
        json_t *j = json_loads(s, 0, &e);
        CHECK_MSG(j != NULL, "not JSON: %s", s);
        if (!j) {
            free(s);
            continue;
        }
        CHECK_MSG(is_int_in(json_object_get(j, "id"), 3, 250), "%s", s);
        const json_t *tags = json_object_get(j, "tags");
        CHECK_MSG(json_is_array(tags) && json_array_size(tags) >= 1 && json_array_size(tags) <= 2, "%s", s);
        size_t i;
        const json_t *x;
        json_array_foreach(tags, i, x) {
            CHECK_MSG(json_is_string(x), "%s", s);
            size_t cps = 0;
            for (const char *p = json_string_value(x); *p; p++)
                cps += ((uint8_t)*p & 0xC0) != 0x80;
            CHECK_MSG(cps >= 1 && cps <= 3, "%s", s);
        }
        CHECK_MSG(json_is_boolean(json_object_get(j, "ok")), "%s", s);
        CHECK_EQ_INT(json_object_size(j), 3);
        json_decref(j);
        free(s);
    }
    CHECK_MSG(done >= 10, "only %d of 40 walks ended", done);
    zse_grammar_release(g);
}

static void eos_forced_rollback(const zse_grammar_vocab *v)
{
    const char *pat = "hello (world|there)!?";
    zse_grammar *g = zse_grammar_regex(v, pat, strlen(pat));
    CHECK(g != NULL);
    if (!g)
        return;
    zse_matcher *m = zse_matcher_new(g, 8);
    uint32_t mask[(N_VOCAB + 31) / 32];
    zse_buf f = {0};
    CHECK_EQ_INT(zse_matcher_forced_bytes(m, &f, 64), 0);
    CHECK_EQ_STR(zse_buf_str(&f), "hello ");
    CHECK(!zse_matcher_can_end(m));
    zse_matcher_fill_mask(m, mask);
    CHECK(bit(mask, 'h') && bit(mask, 256 + 26 /* "hello" */) && !bit(mask, EOS_ID) && !bit(mask, SPECIAL_ID));
    CHECK(!bit(mask, 'w'));
    CHECK_EQ_INT(zse_matcher_accept_token(m, EOS_ID), 1);
    CHECK_EQ_INT(zse_matcher_accept_token(m, 'x'), 1);
    CHECK_EQ_INT(zse_matcher_accept_token(m, SPECIAL_ID), 1);
    CHECK_EQ_INT(zse_matcher_accept_bytes(m, "hello wor", 9), 0);
    CHECK_EQ_INT(zse_matcher_accept_token(m, 'l'), 0);
    CHECK_EQ_INT(zse_matcher_accept_token(m, 'd'), 0);
    CHECK(zse_matcher_can_end(m) && !zse_matcher_must_end(m));
    zse_matcher_fill_mask(m, mask);
    CHECK(bit(mask, EOS_ID) && bit(mask, '!') && !bit(mask, 'd'));
    CHECK_EQ_INT(zse_matcher_accept_token(m, '!'), 0);
    CHECK(zse_matcher_must_end(m));
    CHECK_EQ_INT(zse_matcher_fill_mask(m, mask), 1);
    CHECK(bit(mask, EOS_ID));
    CHECK_EQ_INT(zse_matcher_accept_token(m, EOS_ID), 0);
    CHECK(zse_matcher_ended(m));
    /* back over EOS, '!', 'd', 'l': "hello wor" again */
    CHECK_EQ_INT(zse_matcher_rollback(m, 4), 0);
    CHECK(!zse_matcher_ended(m) && !zse_matcher_can_end(m));
    CHECK_EQ_INT(zse_matcher_accept_bytes(m, "ld", 2), 0);
    CHECK(zse_matcher_can_end(m));
    CHECK_EQ_INT(zse_matcher_rollback(m, 9), -1); /* only 8 kept */
    zse_matcher_reset(m);
    CHECK(!zse_matcher_can_end(m));
    CHECK_EQ_INT(zse_matcher_accept_bytes(m, "hello there", 11), 0);
    CHECK(zse_matcher_can_end(m));
    zse_buf_free(&f);
    zse_matcher_free(m);
    zse_grammar_release(g);

    /* choice: EOS exactly after a whole choice, and forced when nothing else can follow */
    const char *ch[] = {"ab", "abc", "x"};
    g = zse_grammar_choice(v, ch, 3);
    m = zse_matcher_new(g, 0);
    CHECK_EQ_INT(zse_matcher_accept_token(m, 256 + 12 /* "ab" */), 0);
    CHECK(zse_matcher_can_end(m) && !zse_matcher_must_end(m));
    CHECK_EQ_INT(zse_matcher_accept_token(m, 'c'), 0);
    CHECK(zse_matcher_must_end(m));
    CHECK_EQ_INT(zse_matcher_rollback(m, 1), -1); /* no history kept */
    zse_matcher_free(m);
    zse_grammar_release(g);
}

static void expect_error(const zse_grammar_vocab *v, const char *text, const char *want1, const char *want2)
{
    zse_grammar *g = zse_grammar_json_schema(v, text, strlen(text), 0);
    CHECK_MSG(g == NULL, "accepted: %s", text);
    zse_grammar_release(g);
    const char *msg = zse_error_message();
    CHECK_MSG(strstr(msg, want1) && (!want2 || strstr(msg, want2)), "%s: message \"%s\"", text, msg);
}

static void errors(const zse_grammar_vocab *v)
{
    expect_error(v, "{\"type\":\"object\",\"properties\":{\"x\":{\"not\":{\"type\":\"string\"}}}}", "'not'",
                 "#/properties/x/not");
    expect_error(v, "{\"type\":\"array\",\"uniqueItems\":true}", "'uniqueItems'", NULL);
    expect_error(v, "{\"type\":\"number\",\"multipleOf\":3}", "'multipleOf'", NULL);
    expect_error(v, "{\"type\":\"string\",\"format\":\"duration\"}", "format 'duration'", NULL);
    expect_error(v, "{\"$ref\":\"http://x/y.json\"}", "$ref", NULL);
    expect_error(v, "{\"$ref\":\"#/$defs/none\"}", "points at nothing", NULL);
    /* a schema that is only itself: no text and no character class at all (fuzz_routes found
     * the class table copied from NULL under UBSan); refused as left recursion */
    expect_error(v, "{\"$ref\":\"#\"}", "left recursion", NULL);
    expect_error(v, "{\"type\":\"object\",\"properties\":{\"a\":{}},\"required\":[\"b\"],\"additionalProperties\":false}",
                 "'b' is not in 'properties'", NULL);
    /* strict: every property required, additionalProperties false */
    const char *lax = "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\"}},\"additionalProperties\":false}";
    zse_grammar *g = zse_grammar_json_schema(v, lax, strlen(lax), ZSE_SCHEMA_STRICT);
    CHECK(g == NULL && strstr(zse_error_message(), "strict"));
    const char *tight = "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\"}},\"required\":[\"a\"],"
                        "\"additionalProperties\":false}";
    g = zse_grammar_json_schema(v, tight, strlen(tight), ZSE_SCHEMA_STRICT);
    CHECK(g != NULL);
    zse_grammar_release(g);
    expect_error(v, "{\"type\":\"string\",\"pattern\":\"(?=a)b\"}", "lookaround", "#/pattern");
    const char *bad_regex[] = {"a\\1", "(a", "a)", "*a", "a**", "(a*)*", "\\bfoo", "a{3,2}", "[z-a]"};
    for (size_t i = 0; i < sizeof bad_regex / sizeof *bad_regex; i++) {
        g = zse_grammar_regex(v, bad_regex[i], strlen(bad_regex[i]));
        CHECK_MSG(g == NULL && strstr(zse_error_message(), "regex"), "%s: %s", bad_regex[i], zse_error_message());
        zse_grammar_release(g);
    }
    /* a left-recursive composed grammar is refused */
    zse_gb *b = zse_gb_new();
    zse_gx r = zse_gb_rule(b);
    zse_gb_define(b, r, gb_alt2(b, gb_seq2(b, r, gb_cstr(b, "a")), gb_cstr(b, "b")));
    g = zse_grammar_compile(b, r, v);
    CHECK(g == NULL && strstr(zse_error_message(), "left recursion"));
    zse_gb_free(b);
}

/* composed: free text without the marker, then a tool call by schema, repeated */
static void composed(const zse_grammar_vocab *v)
{
    zse_gb *b = zse_gb_new();
    json_t *args = json_loads("{\"type\":\"object\",\"properties\":{\"q\":{\"type\":\"string\",\"maxLength\":4}},"
                              "\"required\":[\"q\"],\"additionalProperties\":false}", 0, NULL);
    zse_gx call = gb_seq3(b, gb_cstr(b, "<tool_call>{\"name\": \"f\", \"arguments\": "), zse_gb_json_schema(b, args, 0),
                          gb_cstr(b, "}</tool_call>"));
    zse_gx root = gb_seq2(b, zse_gb_text_without(b, "<tool_call>"), zse_gb_repeat(b, call, 0, 2));
    zse_grammar *g = zse_grammar_compile(b, root, v);
    zse_gb_free(b);
    json_decref(args);
    CHECK_MSG(g != NULL, "%s", zse_error_message());
    if (!g)
        return;
    zse_matcher *m = zse_matcher_new(g, 2);
    const char *good = "Hi <tool_ there<tool_call>{\"name\": \"f\", \"arguments\": {\"q\": \"ab\"}}</tool_call>";
    CHECK_EQ_INT(zse_matcher_accept_bytes(m, good, strlen(good)), 0);
    CHECK(zse_matcher_can_end(m));
    zse_matcher_reset(m);
    const char *bad = "Hi <tool_call>{\"name\": \"g\"";
    CHECK_EQ_INT(zse_matcher_accept_bytes(m, bad, strlen(bad)), 1);
    zse_matcher_free(m);
    for (int t = 0; t < 4; t++) {
        int bad_bits = 0;
        free(walk(g, v, 50, true, &bad_bits));
        CHECK_EQ_INT(bad_bits, 0);
    }
    zse_grammar_release(g);
}

/* a real byte-level vocabulary: outputs decode to valid JSON */
static void real_tokenizer(void)
{
    const char *dir = test_env("ZSE_TEST_DATA");
    if (!dir)
        return;
    char path[1024];
    snprintf(path, sizeof path, "%s/tiny-qwen2", dir);
    zse_tokenizer *tok = zse_tokenizer_open(path);
    CHECK(tok != NULL);
    if (!tok)
        return;
    int32_t eos = zse_tokenizer_eos(tok);
    zse_grammar_vocab *v = zse_grammar_vocab_from_tokenizer(tok, &eos, 1, NULL, 0);
    CHECK(v != NULL);
    const char *sch = "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":12},"
                      "\"n\":{\"type\":\"integer\"}},\"required\":[\"name\",\"n\"],\"additionalProperties\":false}";
    zse_grammar *g = zse_grammar_json_schema(v, sch, strlen(sch), 0);
    CHECK(g != NULL);
    int words = zse_grammar_mask_words(v), nv = zse_grammar_vocab_size(v);
    uint32_t *mask = calloc((size_t)words, sizeof *mask);
    int ok = 0;
    for (int t = 0; g && t < 10; t++) {
        zse_matcher *m = zse_matcher_new(g, 0);
        int32_t ids[512];
        int n = 0;
        while (n < 512) {
            int cnt = zse_matcher_fill_mask(m, mask);
            CHECK(cnt > 0);
            if (cnt <= 0)
                break;
            /* special tokens never pass, EOS aside */
            for (int id = 0; id < nv; id++)
                if (bit(mask, id) && id != eos && zse_tokenizer_is_special(tok, id)) {
                    CHECK_MSG(0, "special token %d allowed", id);
                    break;
                }
            int k = (int)(rnd() % (uint32_t)cnt), pick = -1;
            for (int id = 0; id < nv && pick < 0; id++)
                if (bit(mask, id) && k-- == 0)
                    pick = id;
            CHECK_EQ_INT(zse_matcher_accept_token(m, pick), 0);
            if (pick == eos)
                break;
            ids[n++] = pick;
        }
        if (zse_matcher_ended(m)) {
            char *text = zse_tokenizer_decode(tok, ids, (size_t)n, false);
            json_t *j = text ? json_loads(text, 0, NULL) : NULL;
            CHECK_MSG(j && json_is_string(json_object_get(j, "name")) && json_is_integer(json_object_get(j, "n")),
                      "output %s", text ? text : "(null)");
            ok += j != NULL;
            json_decref(j);
            free(text);
        }
        zse_matcher_free(m);
    }
    CHECK_MSG(ok >= 3, "%d of 10 ended with JSON", ok);
    free(mask);
    zse_grammar_release(g);
    zse_grammar_vocab_free(v);
    zse_tokenizer_free(tok);
}

/* one grammar shared by threads whose first masks fill its caches at the same time: every
 * mask equals the one a single thread computed on another copy */
#define TSTEPS 40
#define WORDS ((N_VOCAB + 31) / 32)
typedef struct {
    zse_grammar *g;
    const int32_t *path;
    int n;
    uint32_t (*want)[WORDS];
    int bad;
} thread_job;

static void *replay(void *arg)
{
    thread_job *j = arg;
    zse_matcher *m = zse_matcher_new(j->g, 0);
    uint32_t mask[WORDS];
    for (int i = 0; i < j->n; i++) {
        zse_matcher_fill_mask(m, mask);
        j->bad += memcmp(mask, j->want[i], sizeof mask) != 0;
        zse_matcher_accept_token(m, j->path[i]);
    }
    zse_matcher_free(m);
    return NULL;
}

static void threads(const zse_grammar_vocab *v)
{
    const char *sch = "{\"type\":\"object\",\"properties\":{\"s\":{\"type\":\"string\"},\"n\":{\"type\":\"number\"},"
                      "\"l\":{\"type\":\"array\",\"items\":{\"type\":\"string\",\"maxLength\":3}}},\"required\":[\"s\",\"n\",\"l\"]}";
    zse_grammar *ref = schema(v, sch), *shared = schema(v, sch);
    if (!ref || !shared)
        return;
    static uint32_t want[TSTEPS][WORDS];
    int32_t path[TSTEPS];
    int n = 0;
    zse_matcher *m = zse_matcher_new(ref, 0);
    while (n < TSTEPS) {
        int cnt = zse_matcher_fill_mask(m, want[n]);
        if (cnt <= 0 || zse_matcher_must_end(m))
            break;
        int k = (int)(rnd() % (uint32_t)cnt), pick = -1;
        for (int id = 0; id < N_VOCAB && pick < 0; id++)
            if (bit(want[n], id) && id != EOS_ID && k-- == 0)
                pick = id;
        if (pick < 0)
            break;
        path[n++] = pick;
        zse_matcher_accept_token(m, pick);
    }
    zse_matcher_free(m);
    pthread_t th[4];
    thread_job jobs[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (thread_job){shared, path, n, want, 0};
        pthread_create(&th[i], NULL, replay, &jobs[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_MSG(jobs[i].bad == 0, "thread %d: %d masks differ", i, jobs[i].bad);
    }
    CHECK(n >= 10);
    zse_grammar_release(ref);
    zse_grammar_release(shared);
}

int main(void)
{
    zse_grammar_vocab *v = make_vocab();
    CHECK(v != NULL);
    if (!v)
        return test_main_end();
    CHECK_EQ_INT(zse_grammar_mask_words(v), (N_VOCAB + 31) / 32);
    masks_match_trials(v);
    outputs_validate(v);
    eos_forced_rollback(v);
    errors(v);
    composed(v);
    threads(v);
    zse_grammar_vocab_free(v);
    real_tokenizer();
    return test_main_end();
}
