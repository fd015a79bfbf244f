/* Chat-template goldens made with Python jinja2 configured as transformers does:
 * tests/fixtures/templates/goldens.json (test template_goldens; regenerate with
 * tools/make_template_goldens.py), and with the argument "shared" (test
 * template_shared_goldens) ../shared/chat-templates/goldens.json and the chat renders of
 * ../shared/fixtures/tiny-qwen2, skipped when ../shared is absent. Each case renders
 * byte for byte, or fails when its golden is an error. */
#include "test.h"

#include "template/template.h"

#include <jansson.h>
#include <time.h>

static int cases_ok, cases_bad;

static void show_diff(const char *want, const char *got)
{
    size_t i = 0;
    while (want[i] && want[i] == got[i]) i++;
    size_t from = i > 40 ? i - 40 : 0;
    fprintf(stderr, "    first difference at byte %zu\n    want: %.80s\n    got:  %.80s\n", i, want + from, got + from);
}

/* one case: template source, context, and "rendered" or "error" */
static void run_case(const char *label, const char *src, json_t *ctx, json_t *want_rendered, json_t *want_error)
{
    zse_buf out = {0};
    zse_template *t = zse_template_parse(src, strlen(src));
    int rc = t ? zse_template_render(t, ctx, &out) : -1;
    const char *got = zse_buf_str(&out);
    bool ok;
    if (want_error) {
        ok = rc < 0;
        if (!ok) fprintf(stderr, "%s: expected error \"%s\", rendered instead\n", label, json_string_value(want_error));
        else if (!strstr(zse_error_message(), json_string_value(want_error)))
            fprintf(stderr, "%s: note: error message \"%s\" differs from jinja2's \"%s\"\n", label, zse_error_message(), json_string_value(want_error));
    } else {
        const char *want = json_string_value(want_rendered);
        ok = rc == 0 && want && strcmp(want, got) == 0;
        if (rc < 0) fprintf(stderr, "%s: failed: %s\n", label, zse_error_message());
        else if (!ok) {
            fprintf(stderr, "%s: output differs\n", label);
            show_diff(want ? want : "", got);
        }
    }
    CHECK(ok);
    if (ok) cases_ok++;
    else cases_bad++;
    zse_template_free(t);
    zse_buf_free(&out);
}

/* goldens.json: a list of {template | source, case, context, rendered | error} */
static int run_goldens(const char *path, const char *template_dir)
{
    json_error_t je;
    json_t *g = json_load_file(path, 0, &je);
    if (!g) {
        fprintf(stderr, "%s: %s\n", path, je.text);
        CHECK(0);
        return 0;
    }
    size_t i;
    json_t *c;
    int before_ok = cases_ok, before_bad = cases_bad;
    json_array_foreach(g, i, c) {
        const char *name = json_string_value(json_object_get(c, "template"));
        const char *inline_src = json_string_value(json_object_get(c, "source"));
        char label[512];
        snprintf(label, sizeof label, "%s #%zu %s/%s", path, i, name ? name : "inline", json_string_value(json_object_get(c, "case")));
        char *src = NULL;
        if (inline_src) {
            src = strdup(inline_src);
        } else {
            char file[2048];
            snprintf(file, sizeof file, "%s/%s.jinja", template_dir, name);
            src = zse_read_file(file, NULL);
        }
        if (!src) {
            fprintf(stderr, "%s: cannot read the template\n", label);
            CHECK(0);
            continue;
        }
        run_case(label, src, json_object_get(c, "context"), json_object_get(c, "rendered"), json_object_get(c, "error"));
        free(src);
    }
    printf("%s: %d of %d cases pass\n", path, cases_ok - before_ok, cases_ok - before_ok + cases_bad - before_bad);
    json_decref(g);
    return 1;
}

/* tiny-qwen2 goldens: "chat" entries rendered by apply_chat_template */
static void run_tiny_qwen2(const char *shared)
{
    char path[2048], tpath[2048];
    snprintf(path, sizeof path, "%s/fixtures/tiny-qwen2/goldens.json", shared);
    snprintf(tpath, sizeof tpath, "%s/fixtures/tiny-qwen2/chat_template.jinja", shared);
    json_t *g = json_load_file(path, 0, NULL);
    char *src = zse_read_file(tpath, NULL);
    CHECK(g && src);
    if (!g || !src) {
        json_decref(g);
        free(src);
        return;
    }
    size_t i;
    json_t *c;
    int n = 0, ok = 0;
    json_array_foreach(json_object_get(g, "chat"), i, c) {
        zse_buf out = {0};
        int rc = zse_chat_template_apply(src, json_object_get(c, "messages"), json_object_get(c, "tools"),
                                         json_is_true(json_object_get(c, "add_generation_prompt")), NULL, NULL,
                                         json_object_get(c, "template_kwargs"), &out);
        const char *want = json_string_value(json_object_get(c, "rendered"));
        bool good = rc == 0 && want && !strcmp(want, zse_buf_str(&out));
        if (!good) fprintf(stderr, "tiny-qwen2 chat #%zu: %s\n", i, rc ? zse_error_message() : "output differs");
        CHECK(good);
        n++;
        ok += good;
        zse_buf_free(&out);
    }
    printf("tiny-qwen2 chat: %d of %d renders pass\n", ok, n);
    json_decref(g);
    free(src);
}

/* no argument: the project's own goldens; "shared": ../shared's (exit 77 when absent) */
int main(int argc, char **argv)
{
    /* the goldens fix strftime_now to 2024-07-26 09:30:00 */
    struct tm tm = {.tm_year = 124, .tm_mon = 6, .tm_mday = 26, .tm_hour = 9, .tm_min = 30};
    zse_template_set_fixed_time(timegm(&tm));
    char path[2048], dir[1024];

    if (argc > 1 && !strcmp(argv[1], "shared")) {
        const char *shared = test_env("ZSE_SHARED");
        snprintf(dir, sizeof dir, "%s/chat-templates/templates", shared ? shared : "");
        snprintf(path, sizeof path, "%s/chat-templates/goldens.json", shared ? shared : "");
        if (!shared || !zse_file_exists(path)) {
            printf("../shared/chat-templates is absent: skipped\n");
            return 77;
        }
        run_goldens(path, dir);
        run_tiny_qwen2(shared);
    } else {
        const char *data = test_env("ZSE_TEST_DATA");
        if (!data) {
            fprintf(stderr, "ZSE_TEST_DATA is not set\n");
            return 1;
        }
        snprintf(dir, sizeof dir, "%s/templates", data);
        snprintf(path, sizeof path, "%s/goldens.json", dir);
        run_goldens(path, dir);
    }
    printf("cases: %d pass, %d fail\n", cases_ok, cases_bad);
    return test_main_end();
}
