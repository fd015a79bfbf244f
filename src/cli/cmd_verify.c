/* zse verify FILE.zse — check every checksum. */
#include "cli/cli.h"

#include "format/format.h"

#include <stdio.h>

const char cmd_verify_summary[] = "check every tensor checksum of a .zse file";

int cmd_verify(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse verify FILE.zse\n\nExits 0 when the header and every tensor (and expert) "
               "checksum match; otherwise names each damaged tensor or expert and exits 1.\n");
        return 0;
    }
    const char *path = NULL;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_positional(&a) && !path)
            path = a.arg;
        else
            return cli_unknown(&a);
    }
    if (!path) {
        fprintf(stderr, "usage: zse verify FILE.zse\n");
        return 2;
    }
    zse_file *f = zse_file_open(path);
    if (!f)
        return cli_error("verify");
    int bad = 0;
    for (size_t i = 0; i < zse_file_n_tensors(f); i++) {
        const zse_tensor_info *t = zse_file_tensor_at(f, i);
        if (zse_hash64(t->data, (size_t)t->size) != t->checksum) {
            fprintf(stderr, "zse verify: %s: tensor '%s' checksum mismatch\n", path, t->name);
            bad++;
        }
    }
    /* a file with experts: each expert's range has its own checksum */
    size_t experts = 0;
    for (size_t i = 0; i < zse_file_n_expert_banks(f); i++) {
        const zse_expert_bank *b = zse_file_expert_bank_at(f, i);
        for (int e = 0; e < b->count; e++, experts++)
            if (!zse_expert_verify(b, e)) {
                fprintf(stderr, "zse verify: %s: layer %d expert %d checksum mismatch\n", path, b->layer, e);
                bad++;
            }
    }
    size_t len;
    if (!zse_file_tokenizer_json(f, &len)) {
        fprintf(stderr, "zse verify: %s\n", zse_error_message());
        bad++;
    }
    if (bad == 0 && experts)
        printf("%s: OK (%zu tensors, %zu experts, header and tokenizer checksums match)\n", path,
               zse_file_n_tensors(f), experts);
    else if (bad == 0)
        printf("%s: OK (%zu tensors, header and tokenizer checksums match)\n", path,
               zse_file_n_tensors(f));
    else
        fprintf(stderr, "zse verify: %s: %d damaged; convert the model again\n", path, bad);
    zse_file_close(f);
    return bad ? 1 : 0;
}
