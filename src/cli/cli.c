/* Flag parsing shared by the verbs. */
#include "cli/cli.h"

#include "util/util.h"

#include <stdio.h>
#include <string.h>

cli_args cli_begin(int argc, char **argv)
{
    cli_args a;
    memset(&a, 0, sizeof a);
    a.argc = argc;
    a.argv = argv;
    a.i = 0; /* argv[0] is the verb */
    a.verb = argc > 0 ? argv[0] : "zse";
    return a;
}

bool cli_next(cli_args *a)
{
    if (a->failed)
        return false;
    a->i++;
    if (a->i >= a->argc)
        return false;
    a->arg = a->argv[a->i];
    a->inline_value = NULL;
    const char *eq = strchr(a->arg, '=');
    if (a->arg[0] == '-' && a->arg[1] == '-' && eq && (size_t)(eq - a->arg) < sizeof a->name_buf) {
        memcpy(a->name_buf, a->arg, (size_t)(eq - a->arg));
        a->name_buf[eq - a->arg] = '\0';
        a->inline_value = eq + 1;
        a->arg = a->name_buf;
    }
    return true;
}

bool cli_is(cli_args *a, const char *short_name, const char *long_name)
{
    return (short_name && strcmp(a->arg, short_name) == 0) ||
           (long_name && strcmp(a->arg, long_name) == 0);
}

bool cli_positional(cli_args *a)
{
    return a->arg[0] != '-' || strcmp(a->arg, "-") == 0 ||
           (a->arg[1] >= '0' && a->arg[1] <= '9');
}

const char *cli_value(cli_args *a)
{
    if (a->inline_value)
        return a->inline_value;
    if (a->i + 1 >= a->argc) {
        fprintf(stderr, "zse %s: option %s needs a value\n", a->verb, a->arg);
        a->failed = true;
        return NULL;
    }
    return a->argv[++a->i];
}

bool cli_int(cli_args *a, int64_t min, int64_t max, int64_t *out)
{
    const char *name = a->arg;
    const char *v = cli_value(a);
    if (!v)
        return false;
    int64_t x;
    if (!zse_parse_i64(v, &x) || x < min || x > max) {
        fprintf(stderr, "zse %s: %s takes a whole number from %lld to %lld, not '%s'\n", a->verb,
                name, (long long)min, (long long)max, v);
        a->failed = true;
        return false;
    }
    *out = x;
    return true;
}

bool cli_size(cli_args *a, uint64_t min, uint64_t *out)
{
    const char *name = a->arg;
    const char *v = cli_value(a);
    if (!v)
        return false;
    uint64_t x;
    if (!zse_parse_size(v, &x) || x < min) {
        fprintf(stderr, "zse %s: %s takes a size like 512M or 20G (at least %llu bytes), not '%s'\n", a->verb, name,
                (unsigned long long)min, v);
        a->failed = true;
        return false;
    }
    *out = x;
    return true;
}

bool cli_float(cli_args *a, double min, double max, double *out)
{
    const char *name = a->arg;
    const char *v = cli_value(a);
    if (!v)
        return false;
    double x;
    if (!zse_parse_f64(v, &x) || x < min || x > max) {
        fprintf(stderr, "zse %s: %s takes a number from %g to %g, not '%s'\n", a->verb, name, min,
                max, v);
        a->failed = true;
        return false;
    }
    *out = x;
    return true;
}

int cli_unknown(cli_args *a)
{
    fprintf(stderr, "zse %s: unknown option or extra argument '%s' (see zse %s --help)\n",
            a->verb, a->argv[a->i], a->verb);
    a->failed = true;
    return 2;
}

int cli_error(const char *verb)
{
    fprintf(stderr, "zse %s: %s\n", verb, zse_error_message());
    return 1;
}

bool cli_wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0)
            return true;
    return false;
}

bool cli_spec_arg(cli_args *a, cli_spec *s)
{
    if (cli_is(a, NULL, "--spec"))
        s->mode = cli_value(a);
    else if (cli_is(a, NULL, "--draft"))
        s->draft = cli_value(a);
    else if (cli_is(a, NULL, "--spec-tokens"))
        s->tokens_given = cli_int(a, INT64_MIN, INT64_MAX, &s->tokens);
    else
        return false;
    return true;
}

int cli_spec_parse(const cli_spec *s, zse_spec_params *out, const char *verb)
{
    memset(out, 0, sizeof *out);
    const bool ngram = s->mode && strcmp(s->mode, "ngram") == 0, by_model = s->draft || (s->mode && !strcmp(s->mode, "draft"));
    if (s->mode && !ngram && strcmp(s->mode, "draft") != 0) {
        fprintf(stderr, "zse %s: --spec takes ngram or draft, not '%s'\n", verb, s->mode);
        return 2;
    }
    if (ngram && s->draft) {
        fprintf(stderr, "zse %s: --spec ngram takes no --draft model (use --spec draft --draft FILE)\n", verb);
        return 2;
    }
    if (by_model && !s->draft) {
        fprintf(stderr, "zse %s: --spec draft needs --draft FILE.zse, the draft model\n", verb);
        return 2;
    }
    if (!ngram && !by_model) {
        if (s->tokens_given) {
            fprintf(stderr, "zse %s: --spec-tokens needs --spec ngram or --draft FILE\n", verb);
            return 2;
        }
        return 0;
    }
    if (s->tokens_given && (s->tokens < 1 || s->tokens > ZSE_SPEC_MAX_TOKENS)) {
        fprintf(stderr, "zse %s: --spec-tokens takes 1 to %d draft tokens a step, not %lld\n", verb, ZSE_SPEC_MAX_TOKENS,
                (long long)s->tokens);
        return 2;
    }
    out->mode = ngram ? ZSE_SPEC_NGRAM : ZSE_SPEC_DRAFT;
    out->tokens = s->tokens_given ? (int)s->tokens : CLI_SPEC_DEFAULT_TOKENS;
    return 0;
}

int cli_spec_load_draft(const cli_spec *s, const zse_load_params *lp, zse_model **draft, zse_spec_params *out)
{
    *draft = NULL;
    if (out->mode != ZSE_SPEC_DRAFT)
        return 0;
    zse_load_params dp = *lp;
    dp.gpu_memory = 0; /* what the device has free; the target is sized after it */
    dp.max_loras = 0;  /* a draft runs without adapters: its drafts are verified by the target */
    if (!(*draft = zse_model_load(s->draft, &dp))) {
        zse_error_prefix("--draft");
        return -1;
    }
    out->draft = *draft;
    return 0;
}

const char *cli_human_bytes(uint64_t b, char buf[32])
{
    if (b >= 1000000000ull)
        snprintf(buf, 32, "%.2f GB", (double)b / 1e9);
    else if (b >= 1000000ull)
        snprintf(buf, 32, "%.1f MB", (double)b / 1e6);
    else
        snprintf(buf, 32, "%.1f KB", (double)b / 1e3);
    return buf;
}

bool cli_lora_arg(cli_args *a, cli_lora *l)
{
    if (cli_is(a, NULL, "--lora"))
        l->path = cli_value(a);
    else if (cli_is(a, NULL, "--lora-scale"))
        l->scale_given = cli_float(a, -1000, 1000, &l->scale);
    else
        return false;
    return true;
}

int cli_lora_prepare(const cli_lora *l, zse_load_params *lp, const char *verb)
{
    if (!l->path) {
        if (l->scale_given) {
            fprintf(stderr, "zse %s: --lora-scale needs --lora PATH\n", verb);
            return 2;
        }
        return 0;
    }
    int rank;
    if (zse_adapter_probe(l->path, &rank) != 0) {
        fprintf(stderr, "zse %s: --lora: %s\n", verb, zse_last_error());
        return 2;
    }
    lp->max_loras = 1; /* one adapter: a slot its size */
    lp->max_cpu_loras = 1;
    lp->max_lora_rank = rank;
    return 0;
}

int cli_lora_open(const cli_lora *l, zse_model *m, zse_adapter **out)
{
    *out = NULL;
    if (!l->path)
        return 0;
    if (!(*out = zse_adapter_open(m, l->path, l->scale_given ? (float)l->scale : 1.0f))) {
        zse_error_prefix("--lora");
        return -1;
    }
    return 0;
}
