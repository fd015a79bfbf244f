/* zse serve's environment: every flag --some-flag has a variable ZSE_SOME_FLAG (containers
 * and systemd units set variables, not argument lists). A variable becomes the flag it
 * names, placed before the command line's arguments; a flag also given on the command line
 * wins (its variable is skipped). Flags without a value take 1/true/yes/on (set) or
 * 0/false/no/off/"" (not set); flags given many times (--lora, --served-model-name) take
 * several values separated by spaces. ZSE_MODEL is the model when no path is given. */
#include "cli/cli.h"

#include "util/util.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const cli_serve_flag cli_serve_flags[] = {
    {"--host", true, false}, {"--port", true, false}, {"--model-id", true, false},
    {"--served-model-name", true, true}, {"--chat-template", true, false}, {"--pooling", true, false},
    {"--api-key", true, false}, {"--max-body", true, false}, {"--max-buffered", true, false},
    {"--max-connections", true, false}, {"--max-connections-per-ip", true, false}, {"--timeout", true, false},
    {"--header-timeout", true, false}, {"--body-timeout", true, false}, {"--max-refused-per-ip", true, false},
    {"--http-threads", true, false}, {"--workers", true, false}, {"--cors", true, false},
    {"--tls-cert", true, false}, {"--tls-key", true, false}, {"--auth", false, false}, {"--db", true, false},
    {"--no-audit", false, false}, {"--audit-retention", true, false}, {"--audit-max-rows", true, false},
    {"--max-seqs", true, false}, {"--max-batch-tokens", true, false}, {"--max-queue", true, false},
    {"--max-seqs-per-key", true, false}, {"--max-queued-tokens-per-key", true, false}, {"--ctx", true, false},
    {"--kv-cache", true, false}, {"--kv-cache-size", true, false}, {"--no-prefix-cache", false, false}, {"--no-fair-share", false, false},
    {"--threads", true, false}, {"--device", true, false}, {"--gpu-memory", true, false},
    {"--spec", true, false}, {"--draft", true, false}, {"--spec-tokens", true, false},
    {"--lora", true, true}, {"--lora-dir", true, false}, {"--max-gpu-loras", true, false},
    {"--max-cpu-loras", true, false}, {"--max-lora-rank", true, false}, {"--allow-lora-loading", false, false},
    {"--tool-parser", true, false}, {"--shutdown-timeout", true, false}, {"--quiet", false, false},
    {NULL, false, false},
};

void cli_serve_env_name(const char *flag, char *out, size_t cap)
{
    size_t o = snprintf(out, cap, "ZSE_");
    for (const char *p = flag + 2; *p && o + 1 < cap; p++)
        out[o++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
    out[o] = '\0';
}

static bool on_command_line(int argc, char **argv, const char *flag)
{
    size_t n = strlen(flag);
    for (int i = 1; i < argc; i++)
        if (strncmp(argv[i], flag, n) == 0 && (argv[i][n] == '\0' || argv[i][n] == '='))
            return true;
    return false;
}

static int truth(const char *name, const char *v, bool *out)
{
    static const char *const yes[] = {"1", "true", "yes", "on"}, *const no[] = {"0", "false", "no", "off", ""};
    for (size_t i = 0; i < 4; i++)
        if (strcasecmp(v, yes[i]) == 0)
            return *out = true, 0;
    for (size_t i = 0; i < 5; i++)
        if (strcasecmp(v, no[i]) == 0)
            return *out = false, 0;
    fprintf(stderr, "zse serve: %s is '%s'; it takes 1/true/yes/on or 0/false/no/off\n", name, v);
    return -1;
}

static int push(cli_serve_env *e, char *s)
{
    if (e->argc + 1 >= e->cap) {
        int cap = e->cap ? e->cap * 2 : 32;
        char **a = realloc(e->argv, (size_t)cap * sizeof *a);
        if (!a)
            return zse_fail("out of memory");
        e->argv = a;
        e->cap = cap;
    }
    e->argv[e->argc++] = s;
    e->argv[e->argc] = NULL;
    return 0;
}

/* a copy kept for the life of the arguments */
static char *keep(cli_serve_env *e, const char *s, size_t n)
{
    char **k = realloc(e->owned, (size_t)(e->n_owned + 1) * sizeof *k);
    if (!k)
        return NULL;
    e->owned = k;
    char *c = zse_strndup(s, n);
    if (c)
        e->owned[e->n_owned++] = c;
    return c;
}

static int add_values(cli_serve_env *e, const cli_serve_flag *f, const char *v)
{
    if (!f->many) {
        char *flag = keep(e, f->flag, strlen(f->flag)), *val = keep(e, v, strlen(v));
        return flag && val && push(e, flag) == 0 && push(e, val) == 0 ? 0 : zse_fail("out of memory");
    }
    for (const char *p = v; *p;) {
        while (*p && isspace((unsigned char)*p))
            p++;
        size_t n = 0;
        while (p[n] && !isspace((unsigned char)p[n]))
            n++;
        if (!n)
            break;
        char *flag = keep(e, f->flag, strlen(f->flag)), *val = keep(e, p, n);
        if (!flag || !val || push(e, flag) || push(e, val))
            return zse_fail("out of memory");
        p += n;
    }
    return 0;
}

int cli_serve_env_args(int argc, char **argv, cli_serve_env *e)
{
    memset(e, 0, sizeof *e);
    if (push(e, argv[0]) != 0)
        return -1;
    for (const cli_serve_flag *f = cli_serve_flags; f->flag; f++) {
        char name[64];
        cli_serve_env_name(f->flag, name, sizeof name);
        const char *v = getenv(name);
        if (!v || on_command_line(argc, argv, f->flag))
            continue;
        bool set = true;
        if (!f->value && truth(name, v, &set) != 0)
            return -1;
        if (!f->value && set && push(e, (char *)f->flag) != 0)
            return -1;
        if (f->value && add_values(e, f, v) != 0)
            return -1;
    }
    for (int i = 1; i < argc; i++)
        if (push(e, argv[i]) != 0)
            return -1;
    return 0;
}

void cli_serve_env_free(cli_serve_env *e)
{
    for (int i = 0; i < e->n_owned; i++)
        free(e->owned[i]);
    free(e->owned);
    free(e->argv);
    memset(e, 0, sizeof *e);
}
