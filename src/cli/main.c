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

static void print_usage(FILE *out)
{
    fprintf(out,
            "zse %s — lean LLM inference: convert, run and serve quantized models\n\n"
            "usage: zse <command> [options]   (zse <command> --help for its options)\n\n"
            "commands:\n",
            ZSE_VERSION);
    for (size_t i = 0; i < N_VERBS; i++)
        fprintf(out, "  %-12s %s\n", zse_verbs[i].name, zse_verbs[i].summary);
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
    for (size_t i = 0; i < N_VERBS; i++)
        if (strcmp(argv[1], zse_verbs[i].name) == 0)
            return zse_verbs[i].run(argc - 1, argv + 1);
    fprintf(stderr, "zse: unknown command '%s' (zse --help lists them)\n", argv[1]);
    return 2;
}
