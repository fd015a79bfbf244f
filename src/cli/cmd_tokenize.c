/* zse tokenize MODEL (--text S | --file F) [--special] — ids as a JSON array. */
#include "cli/cli.h"

#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <string.h>

const char cmd_tokenize_summary[] = "print the token ids of a text as a JSON array";

int cmd_tokenize(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse tokenize MODEL (--text S | --file F) [--special] [--bos]\n\n"
               "MODEL is a .zse file or a Hugging Face model directory. Text is encoded like\n"
               "tokenizer(text, add_special_tokens=False); --special also turns special-token\n"
               "text (e.g. <|im_start|>) into its id; --bos adds the tokenizer's special prefix.\n"
               "--file encodes the file's bytes exactly as they are.\n");
        return 0;
    }
    const char *model = NULL, *text = NULL, *file = NULL;
    bool special = false, bos = false;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, NULL, "--text"))
            text = cli_value(&a);
        else if (cli_is(&a, NULL, "--file"))
            file = cli_value(&a);
        else if (cli_is(&a, NULL, "--special"))
            special = true;
        else if (cli_is(&a, NULL, "--bos"))
            bos = true;
        else if (cli_positional(&a) && !model)
            model = a.arg;
        else
            return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!model || (!text == !file)) {
        fprintf(stderr, "usage: zse tokenize MODEL (--text S | --file F) [--special]\n");
        return 2;
    }
    size_t len = text ? strlen(text) : 0;
    char *data = file ? zse_read_file(file, &len) : NULL;
    if (file && !data)
        return cli_error("tokenize");
    zse_tokenizer *t = zse_tokenizer_open(model);
    if (!t) {
        free(data);
        return cli_error("tokenize");
    }
    int32_t *ids;
    size_t n;
    int rc = zse_tokenizer_encode(t, file ? data : text, len, bos, special, &ids, &n);
    if (rc == 0) {
        zse_buf out = {0};
        zse_buf_puts(&out, "[");
        for (size_t i = 0; i < n; i++)
            zse_buf_printf(&out, "%s%d", i ? ", " : "", ids[i]);
        zse_buf_puts(&out, "]\n");
        fwrite(out.data, 1, out.len, stdout);
        zse_buf_free(&out);
        free(ids);
    }
    zse_tokenizer_free(t);
    free(data);
    return rc == 0 ? 0 : cli_error("tokenize");
}
