/* zse — the command. Dispatches to the verb named by argv[1]. */
#include "cli/cli.h"

#include "util/util.h"

#include <stdio.h>
#include <string.h>

struct zse_verb {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
};

#include "cli_verbs.h"

#define N_VERBS (sizeof zse_verbs / sizeof zse_verbs[0])

/* other names a verb answers to (listed under their verb in --help) */
static const struct {
    const char *alias, *verb;
} zse_aliases[] = {
    {"benchmark", "bench"},
};
#define N_ALIASES (sizeof zse_aliases / sizeof zse_aliases[0])

static const char *alias_of(const char *verb)
{
    for (size_t i = 0; i < N_ALIASES; i++)
        if (strcmp(zse_aliases[i].verb, verb) == 0)
            return zse_aliases[i].alias;
    return NULL;
}

static void print_usage(FILE *out)
{
    fprintf(out,
            "zse %s — lean LLM inference: convert, run and serve quantized models\n\n"
            "usage: zse <command> [options]   (zse <command> --help for its options)\n\n"
            "commands:\n",
            ZSE_VERSION);
    for (size_t i = 0; i < N_VERBS; i++) {
        const char *alias = alias_of(zse_verbs[i].name);
        fprintf(out, "  %-12s %s", zse_verbs[i].name, zse_verbs[i].summary);
        fprintf(out, alias ? " (also: zse %s)\n" : "\n", alias);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        print_usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        print_usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
        printf("zse %s\n", ZSE_VERSION);
        return 0;
    }
    const char *verb = argv[1];
    for (size_t i = 0; i < N_ALIASES; i++)
        if (strcmp(verb, zse_aliases[i].alias) == 0)
            verb = zse_aliases[i].verb;
    for (size_t i = 0; i < N_VERBS; i++)
        if (strcmp(verb, zse_verbs[i].name) == 0)
            return zse_verbs[i].run(argc - 1, argv + 1);
    fprintf(stderr, "zse: unknown command '%s' (zse --help lists them)\n", argv[1]);
    return 2;
}
