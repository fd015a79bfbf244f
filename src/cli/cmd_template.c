/* zse template (MODEL | --template FILE.jinja) --context CONTEXT.json — renders a chat
 * template exactly as transformers' apply_chat_template would and prints it unchanged. */
#include "cli/cli.h"

#include "format/format.h"
#include "template/template.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

const char cmd_template_summary[] = "render a model's chat template for a JSON context";

static bool is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* the token's text from tokenizer_config: a string or an AddedToken {"content": ...} */
static const char *token_text(const json_t *tc, const char *key)
{
    const json_t *v = json_object_get(tc, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_string_value(v);
}

/* MODEL's template: a .zse file, or an HF directory (chat_template.jinja, else
 * tokenizer_config.json's chat_template). Fills missing bos/eos tokens of ctx from the
 * tokenizer config, as transformers passes the tokenizer's special tokens. */
static char *model_template(const char *model, json_t *ctx)
{
    if (!is_dir(model)) {
        zse_file *f = zse_file_open(model);
        if (!f) return NULL;
        const char *t = zse_file_chat_template(f);
        char *r = t ? zse_strdup(t) : NULL;
        if (!t) zse_fail("%s has no chat template", model);
        const json_t *tc = zse_file_tokenizer_config(f);
        for (int i = 0; tc && i < 2; i++) {
            const char *key = i ? "eos_token" : "bos_token", *v = token_text(tc, key);
            if (v && !json_object_get(ctx, key)) json_object_set_new(ctx, key, json_string(v));
        }
        zse_file_close(f);
        return r;
    }
    char *tc_path = zse_path_join(model, "tokenizer_config.json");
    /* INT_AS_REAL: model_max_length is often larger than any 64-bit integer */
    json_t *tc = tc_path && zse_file_exists(tc_path) ? json_load_file(tc_path, JSON_DECODE_INT_AS_REAL, NULL) : NULL;
    free(tc_path);
    for (int i = 0; tc && i < 2; i++) {
        const char *key = i ? "eos_token" : "bos_token", *v = token_text(tc, key);
        if (v && !json_object_get(ctx, key)) json_object_set_new(ctx, key, json_string(v));
    }
    char *jinja = zse_path_join(model, "chat_template.jinja");
    char *src = NULL;
    if (jinja && zse_file_exists(jinja)) src = zse_read_file(jinja, NULL);
    else if (tc) src = zse_template_from_tokenizer_config(tc);
    else zse_fail("%s has neither chat_template.jinja nor tokenizer_config.json", model);
    free(jinja);
    json_decref(tc);
    return src;
}

int cmd_template(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse template (MODEL | --template FILE.jinja) --context CONTEXT.json [--now T]\n\n"
               "Renders the chat template as transformers' apply_chat_template does and prints\n"
               "the result exactly (no newline added). MODEL is a .zse file or a Hugging Face\n"
               "model directory (chat_template.jinja, or tokenizer_config.json's chat_template;\n"
               "of a list of named templates, \"default\"). CONTEXT is a JSON object with\n"
               "messages, tools, add_generation_prompt, bos_token, eos_token and any other\n"
               "variables. A template that raises exits with status 1 and its message.\n"
               "--now \"YYYY-MM-DD HH:MM:SS\" fixes what strftime_now() sees.\n");
        return 0;
    }
    const char *model = NULL, *tpath = NULL, *cpath = NULL, *now = NULL;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, "-t", "--template")) tpath = cli_value(&a);
        else if (cli_is(&a, NULL, "--now")) now = cli_value(&a);
        else if (cli_is(&a, "-c", "--context")) cpath = cli_value(&a);
        else if (cli_positional(&a) && !model) model = a.arg;
        else return cli_unknown(&a);
    }
    if (a.failed) return 2;
    if (!model == !tpath || !cpath) {
        fprintf(stderr, "usage: zse template (MODEL | --template FILE.jinja) --context CONTEXT.json\n");
        return 2;
    }
    if (now) {
        /* strftime_now() at a fixed time (reproducible renders) */
        struct tm tm = {0};
        const char *end = strptime(now, "%Y-%m-%d %H:%M:%S", &tm);
        if (!end || *end) {
            fprintf(stderr, "zse template: --now wants \"YYYY-MM-DD HH:MM:SS\", got \"%s\"\n", now);
            return 2;
        }
        zse_template_set_fixed_time(timegm(&tm));
    }
    json_error_t je;
    json_t *ctx = json_load_file(cpath, 0, &je);
    if (!ctx || !json_is_object(ctx)) {
        if (ctx) zse_fail("%s: the context must be a JSON object", cpath);
        else zse_fail("%s: line %d: %s", cpath, je.line, je.text);
        json_decref(ctx);
        return cli_error("template");
    }
    char *src = tpath ? zse_read_file(tpath, NULL) : model_template(model, ctx);
    if (!src) {
        json_decref(ctx);
        return cli_error("template");
    }
    zse_template *t = zse_template_parse(src, strlen(src));
    zse_buf out = {0};
    int rc = t ? zse_template_render(t, ctx, &out) : -1;
    if (rc == 0) fwrite(out.data ? out.data : "", 1, out.len, stdout);
    zse_buf_free(&out);
    zse_template_free(t);
    free(src);
    json_decref(ctx);
    return rc == 0 ? 0 : cli_error("template");
}
