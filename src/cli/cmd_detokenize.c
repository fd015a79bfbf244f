/* zse detokenize MODEL --ids '[1,2,3]' — the text of token ids. */
#include "cli/cli.h"

#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <string.h>

const char cmd_detokenize_summary[] = "print the text of a JSON array of token ids";

int cmd_detokenize(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse detokenize MODEL --ids '[1,2,3]' [--skip-special]\n");
        return 0;
    }
    const char *model = NULL, *ids_text = NULL;
    bool skip = false;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, NULL, "--ids"))
            ids_text = cli_value(&a);
        else if (cli_is(&a, NULL, "--skip-special"))
            skip = true;
        else if (cli_positional(&a) && !model)
            model = a.arg;
        else
            return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!model || !ids_text) {
        fprintf(stderr, "usage: zse detokenize MODEL --ids '[1,2,3]'\n");
        return 2;
    }
    json_error_t err;
    json_t *arr = json_loads(ids_text, 0, &err);
    if (!json_is_array(arr)) {
        json_decref(arr);
        fprintf(stderr, "zse detokenize: --ids must be a JSON array of integers\n");
        return 2;
    }
    size_t n = json_array_size(arr);
    int32_t *ids = zse_malloc((n + 1) * sizeof *ids);
    for (size_t i = 0; ids && i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX) {
            fprintf(stderr, "zse detokenize: --ids element %zu is not a token id\n", i);
            free(ids);
            json_decref(arr);
            return 2;
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    json_decref(arr);
    zse_tokenizer *t = ids ? zse_tokenizer_open(model) : NULL;
    char *text = t ? zse_tokenizer_decode(t, ids, n, skip) : NULL;
    int rc = text ? 0 : cli_error("detokenize");
    if (text)
        fputs(text, stdout);
    free(text);
    zse_tokenizer_free(t);
    free(ids);
    return rc;
}
