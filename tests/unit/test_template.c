/* The template API beyond the goldens: syntax errors with line and column, runtime errors,
 * limits (nesting, recursion, loop steps, output size) that end a render with an error,
 * concurrent renders of one parsed template, output buffer handling and
 * zse_chat_template_apply. */
#include "test.h"

#include "template/template.h"

#include <pthread.h>

static char *render(const char *src, const char *ctx_json, int *rc)
{
    json_t *ctx = ctx_json ? json_loads(ctx_json, 0, NULL) : NULL;
    zse_template *t = zse_template_parse(src, strlen(src));
    zse_buf out = {0};
    *rc = t ? zse_template_render(t, ctx, &out) : -2;
    zse_template_free(t);
    json_decref(ctx);
    char *s = zse_strdup(zse_buf_str(&out));
    zse_buf_free(&out);
    return s;
}

static void expect_render(const char *src, const char *ctx, const char *want)
{
    int rc;
    char *got = render(src, ctx, &rc);
    CHECK_MSG(rc == 0 && !strcmp(got, want), "%s -> rc %d \"%s\" (%s), want \"%s\"", src, rc, got, rc ? zse_error_message() : "", want);
    free(got);
}

/* the error (parse: rc -2, render: -1) and a substring of its message */
static void expect_error(const char *src, int want_rc, const char *msg_part)
{
    int rc;
    char *got = render(src, NULL, &rc);
    CHECK_MSG(rc == want_rc && strstr(zse_error_message(), msg_part), "%s -> rc %d, message \"%s\", want rc %d and \"%s\"", src, rc,
              zse_error_message(), want_rc, msg_part);
    free(got);
}

static void test_syntax_errors(void)
{
    expect_error("{% if %}x{% endif %}", -2, "line 1, column 7");
    expect_error("a\nb {{ x", -2, "line 2");
    expect_error("line1\n  {% frob %}", -2, "line 2, column 6: Encountered unknown tag 'frob'");
    expect_error("{% for x in y %}", -2, "endfor");
    expect_error("{{ 'unterminated }}", -2, "line 1, column 4");
    expect_error("{% if x %}{% endfor %}", -2, "line 1");
    expect_error("{{ 1 + }}", -2, "line 1");
    expect_error("{# never closed", -2, "comment");
    expect_error("{{ '\\u12' }}", -2, "escape");
}

static void test_runtime_errors(void)
{
    expect_error("\n  {{ x.y }}", -1, "2:7: 'x' is undefined");
    expect_error("{{ raise_exception('exact message') }}", -1, "exact message");
    /* a float past int64 (C's conversion would be undefined: found by fuzz_template) */
    expect_error("{{ 2.5e64 | int }}", -1, "does not fit a 64-bit integer");
    expect_error("{{ '-1e30' | int }}", -1, "does not fit a 64-bit integer");
    expect_error("{{ '%d' % 1e300 }}", -1, "does not fit a 64-bit integer");
    expect_render("{{ 3.9 | int }} {{ '-7.5' | int }} {{ 'x' | int(6) }} {{ (1e300 * 1e300) | int(4) }}", NULL, "3 -7 6 4");
    int rc;
    char *got = render("{{ raise_exception('exact message') }}", NULL, &rc);
    CHECK(rc == -1 && !strcmp(zse_error_message(), "exact message"));
    free(got);
    expect_error("{{ [].append(1) }}", -1, "unsafe");
    expect_error("{{ 1 | nosuchfilter }}", -1, "No filter named 'nosuchfilter'");
    expect_error("{{ 1 is nosuchtest }}", -1, "No test named 'nosuchtest'");
}

static void test_limits(void)
{
    /* deep nesting in the parser */
    size_t depth = 5000;
    char *deep = malloc(depth * 2 + 16);
    strcpy(deep, "{{ ");
    size_t o = 3;
    for (size_t i = 0; i < depth; i++) deep[o++] = '(';
    deep[o++] = '1';
    for (size_t i = 0; i < depth; i++) deep[o++] = ')';
    strcpy(deep + o, " }}");
    expect_error(deep, -2, "nesting too deep");
    free(deep);
    /* infinite macro recursion */
    expect_error("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", -1, "recursion");
    /* loops that never end within the step budget */
    expect_error("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", -1, "loop iterations");
    /* output size */
    expect_error("{% set s = 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' * 100000 %}{% for a in range(100000) %}{{ s }}{% endfor %}", -1,
                 "output exceeds");
    expect_error("{{ range(1000000) }}", -1, "Range too big");
}

typedef struct {
    const zse_template *t;
    json_t *ctx;
    const char *want;
    int ok;
} thread_arg;

static void *render_many(void *p)
{
    thread_arg *a = p;
    for (int i = 0; i < 50; i++) {
        zse_buf out = {0};
        if (zse_template_render(a->t, a->ctx, &out) == 0 && !strcmp(zse_buf_str(&out), a->want)) a->ok++;
        zse_buf_free(&out);
    }
    return NULL;
}

static void test_threads(void)
{
    const char *src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}<{{ m.role }}:{{ m.content | upper }}>{% endfor %}{{ ns.n }}";
    zse_template *t = zse_template_parse(src, strlen(src));
    CHECK(t != NULL);
    json_t *ctx = json_loads("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}", 0, NULL);
    thread_arg args[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thread_arg){t, ctx, "<user:HI><assistant:YO>2", 0};
        pthread_create(&th[i], NULL, render_many, &args[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ_INT(args[i].ok, 50);
    }
    json_decref(ctx);
    zse_template_free(t);
}

static void test_buffer_and_apply(void)
{
    zse_buf out = {0};
    zse_buf_puts(&out, "prefix:");
    zse_template *t = zse_template_parse("{{ x }}", 7);
    json_t *ctx = json_pack("{s:s}", "x", "v");
    CHECK(zse_template_render(t, ctx, &out) == 0);
    CHECK_EQ_STR(zse_buf_str(&out), "prefix:v");
    zse_template_free(t);
    t = zse_template_parse("more{{ raise_exception('no') }}", 31);
    CHECK(zse_template_render(t, ctx, &out) == -1);
    CHECK_EQ_STR(zse_buf_str(&out), "prefix:v"); /* untouched on error */
    zse_template_free(t);
    json_decref(ctx);
    zse_buf_free(&out);

    json_t *msgs = json_loads("[{\"role\": \"user\", \"content\": \"Q\"}]", 0, NULL);
    json_t *extra = json_pack("{s:s}", "flavor", "x");
    const char *src = "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}{{ tools is defined }}{{ flavor }}"
                      "{% if add_generation_prompt %}>{% endif %}{{ eos_token }}";
    CHECK(zse_chat_template_apply(src, msgs, NULL, true, "<s>", "</s>", extra, &out) == 0);
    CHECK_EQ_STR(zse_buf_str(&out), "<s>[Q]Falsex></s>");
    zse_buf_free(&out);
    json_t *tools = json_loads("[{\"type\": \"function\"}]", 0, NULL);
    CHECK(zse_chat_template_apply(src, msgs, tools, false, NULL, NULL, NULL, &out) == 0);
    CHECK_EQ_STR(zse_buf_str(&out), "[Q]True");
    zse_buf_free(&out);
    json_decref(tools);
    json_decref(extra);
    json_decref(msgs);

    expect_render("{{ strftime_now('%Y') | length }}", NULL, "4");
    json_t *tc = json_loads("{\"chat_template\": [{\"name\": \"rag\", \"template\": \"R\"}, {\"name\": \"default\", \"template\": \"D\"}]}", 0, NULL);
    char *s = zse_template_from_tokenizer_config(tc);
    CHECK(s && !strcmp(s, "D"));
    free(s);
    json_decref(tc);
    tc = json_loads("{\"chat_template\": [{\"name\": \"rag\", \"template\": \"R\"}]}", 0, NULL);
    CHECK(zse_template_from_tokenizer_config(tc) == NULL);
    json_decref(tc);
}

int main(void)
{
    test_syntax_errors();
    test_runtime_errors();
    test_limits();
    test_threads();
    test_buffer_and_apply();
    return test_main_end();
}
