/* zse tokenize MODEL (--text S | --file F) [--special] [--bos] [--time] — ids as a JSON array. */
#include "cli/cli.h"

#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <string.h>

const char cmd_tokenize_summary[] = "print the token ids of a text as a JSON array";

/* "[1, 2, 3]\n" — written with a hand-rolled itoa: a megabyte of text is a million ids */
static void print_ids(const int32_t *ids, size_t n)
{
    zse_buf out = {0};
    if (zse_buf_reserve(&out, n * 8 + 4) != 0)
        return;
    out.data[out.len++] = '[';
    for (size_t i = 0; i < n; i++) {
        char tmp[16];
        int k = 0;
        uint32_t v = (uint32_t)ids[i]; /* ids are never negative */
        do
            tmp[k++] = (char)('0' + v % 10);
        while ((v /= 10) && k < 15);
        if (zse_buf_reserve(&out, (size_t)k + 3) != 0)
            break;
        if (i) {
            out.data[out.len++] = ',';
            out.data[out.len++] = ' ';
        }
        while (k)
            out.data[out.len++] = tmp[--k];
    }
    zse_buf_append(&out, "]\n", 2);
    fwrite(out.data, 1, out.len, stdout);
    zse_buf_free(&out);
}

int cmd_tokenize(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse tokenize MODEL (--text S | --file F) [--special] [--bos] [--time]\n\n"
               "MODEL is a .zse file, a Hugging Face model directory or a .gguf file. Text is\n"
               "encoded like tokenizer(text, add_special_tokens=False); --special also turns\n"
               "special-token text (e.g. <|im_start|>) into its id; --bos adds the tokens the\n"
               "tokenizer puts around a sequence (BOS). --file encodes the file's bytes exactly\n"
               "as they are. --time reports the encoding time and throughput on stderr.\n");
        return 0;
    }
    const char *model = NULL, *text = NULL, *file = NULL;
    bool special = false, bos = false, timed = false;
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
        else if (cli_is(&a, NULL, "--time"))
            timed = true;
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
    double t0 = zse_now();
    int rc = zse_tokenizer_encode(t, file ? data : text, len, bos, special, &ids, &n);
    double dt = zse_now() - t0;
    if (rc == 0) {
        print_ids(ids, n);
        if (timed)
            fprintf(stderr, "encoded %zu bytes into %zu tokens in %.3f s (%.2f MB/s, one thread)\n", len, n, dt,
                    dt > 0 ? (double)len / dt / 1e6 : 0.0);
        free(ids);
    }
    zse_tokenizer_free(t);
    free(data);
    return rc == 0 ? 0 : cli_error("tokenize");
}
