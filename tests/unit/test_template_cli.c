/* zse template as a user runs it: exact bytes on stdout (no newline added), an HF
 * directory's template with its bos/eos tokens, --template FILE, tokenizer_config's list
 * of named templates, and a template that raises (non-zero exit, its message). */
#include "test.h"

#include "util/util.h"

#include <jansson.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char tmpdir[] = "/tmp/zse-template-cli-XXXXXX";

/* runs zse with args, stdout into *out (heap), stderr into *err (heap); exit status */
static int run_zse(const char *args, char **out, char **err)
{
    char cmd[4096], opath[600], epath[600];
    snprintf(opath, sizeof opath, "%s/stdout", tmpdir);
    snprintf(epath, sizeof epath, "%s/stderr", tmpdir);
    snprintf(cmd, sizeof cmd, "\"%s\" template %s >%s 2>%s", getenv("ZSE_BIN"), args, opath, epath);
    int st = system(cmd);
    *out = zse_read_file(opath, NULL);
    *err = zse_read_file(epath, NULL);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void write_json(const char *path, json_t *j)
{
    CHECK(json_dump_file(j, path, 0) == 0);
}

int main(void)
{
    const char *data = test_env("ZSE_TEST_DATA");
    if (!data || !test_env("ZSE_BIN")) {
        fprintf(stderr, "ZSE_TEST_DATA and ZSE_BIN must be set\n");
        return 1;
    }
    if (!mkdtemp(tmpdir)) return 1;
    char path[1024], ctx_path[700], args[4096];
    char *out, *err;
    snprintf(ctx_path, sizeof ctx_path, "%s/ctx.json", tmpdir);

    /* 1. an HF directory: tiny-llama's goldens from transformers' apply_chat_template */
    snprintf(path, sizeof path, "%s/tiny-llama/goldens.json", data);
    json_t *g = json_load_file(path, JSON_DECODE_INT_AS_REAL, NULL);
    CHECK(g != NULL);
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(g, "chat"), i, c) {
        json_t *ctx = json_object();
        json_object_set(ctx, "messages", json_object_get(c, "messages"));
        json_object_set(ctx, "add_generation_prompt", json_object_get(c, "add_generation_prompt"));
        json_object_update(ctx, json_object_get(c, "template_kwargs"));
        write_json(ctx_path, ctx);
        json_decref(ctx);
        snprintf(args, sizeof args, "%s/tiny-llama --context %s", data, ctx_path);
        int rc = run_zse(args, &out, &err);
        CHECK_EQ_INT(rc, 0);
        CHECK(out && !strcmp(out, json_string_value(json_object_get(c, "rendered"))));
        free(out);
        free(err);
    }
    json_decref(g);

    /* 2. --template FILE: the first golden of a copied real template, byte for byte */
    snprintf(path, sizeof path, "%s/templates/goldens.json", data);
    g = json_load_file(path, 0, NULL);
    CHECK(g != NULL);
    int checked = 0;
    json_array_foreach(g, i, c) {
        const char *name = json_string_value(json_object_get(c, "template"));
        if (!name || !json_object_get(c, "rendered") || checked >= 3) continue;
        write_json(ctx_path, json_object_get(c, "context"));
        snprintf(args, sizeof args, "--template %s/templates/%s.jinja --context %s", data, name, ctx_path);
        int rc = run_zse(args, &out, &err);
        const char *want = json_string_value(json_object_get(c, "rendered"));
        CHECK_EQ_INT(rc, 0);
        CHECK_MSG(out && !strcmp(out, want), "%s: output differs", name);
        free(out);
        free(err);
        checked++;
    }
    CHECK_EQ_INT(checked, 3);
    json_decref(g);

    /* 3. a template that raises: non-zero exit, the template's message on stderr */
    snprintf(path, sizeof path, "%s/raise.jinja", tmpdir);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f) {
        fputs("partial {{ raise_exception('System role not supported') }}", f);
        fclose(f);
    }
    json_t *ctx = json_pack("{s:[]}", "messages");
    write_json(ctx_path, ctx);
    json_decref(ctx);
    snprintf(args, sizeof args, "--template %s --context %s", path, ctx_path);
    int rc = run_zse(args, &out, &err);
    CHECK(rc != 0);
    CHECK(out && out[0] == 0);  /* nothing printed on failure */
    CHECK(err && strstr(err, "System role not supported"));
    free(out);
    free(err);

    /* 4. tokenizer_config.json with a list of named templates: "default" is used */
    char model[700];
    snprintf(model, sizeof model, "%s/model", tmpdir);
    mkdir(model, 0755);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", model);
    json_t *tc = json_pack("{s:[{s:s,s:s},{s:s,s:s}], s:{s:s}}", "chat_template", "name", "tool_use", "template", "T",
                           "name", "default", "template", "{{ bos_token }}D{{ x }}\n", "bos_token", "content", "<B>");
    write_json(path, tc);
    json_decref(tc);
    ctx = json_pack("{s:i}", "x", 7);
    write_json(ctx_path, ctx);
    json_decref(ctx);
    snprintf(args, sizeof args, "%s --context %s", model, ctx_path);
    rc = run_zse(args, &out, &err);
    CHECK_EQ_INT(rc, 0);
    CHECK(out && !strcmp(out, "<B>D7"));
    free(out);
    free(err);

    /* 5. --now fixes strftime_now */
    snprintf(path, sizeof path, "%s/now.jinja", tmpdir);
    f = fopen(path, "w");
    CHECK(f != NULL);
    if (f) {
        fputs("{{ strftime_now('%d %b %Y %H:%M') }}", f);
        fclose(f);
    }
    snprintf(args, sizeof args, "--template %s --context %s --now '2024-07-26 09:30:00'", path, ctx_path);
    rc = run_zse(args, &out, &err);
    CHECK_EQ_INT(rc, 0);
    CHECK(out && !strcmp(out, "26 Jul 2024 09:30"));
    free(out);
    free(err);
    snprintf(args, sizeof args, "--template %s --context %s --now yesterday", path, ctx_path);
    rc = run_zse(args, &out, &err);
    CHECK(rc != 0);
    free(out);
    free(err);

    /* 6. usage errors */
    rc = run_zse("--context /nonexistent.json", &out, &err);
    CHECK(rc != 0);
    free(out);
    free(err);
    snprintf(args, sizeof args, "%s --context /nonexistent.json", model);
    rc = run_zse(args, &out, &err);
    CHECK(rc != 0);
    free(out);
    free(err);

    char cmd[800];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    CHECK(system(cmd) == 0);
    return test_main_end();
}
