/* zse convert-adapter DIR -o OUT.zsa — a PEFT LoRA adapter directory to one .zsa file. */
#include "cli/cli.h"

#include "format/format.h"

#include <stdio.h>
#include <string.h>

const char cmd_convert_adapter_summary[] = "convert a PEFT LoRA adapter directory into a .zsa file";

static void usage(FILE *out)
{
    fprintf(out,
            "usage: zse convert-adapter DIR -o OUT.zsa [options]\n\n"
            "DIR is a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors). The\n"
            ".zsa file holds its parts in f16, checksummed, laid out as zse loads them.\n\n"
            "  -o, --output FILE       the .zsa file to write\n"
            "  --base MODEL.zse        check the adapter against the model it is for (layers,\n"
            "                          widths, targets) before writing\n"
            "  --force                 overwrite OUT if it exists\n");
}

int cmd_convert_adapter(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *src = NULL, *out = NULL, *base = NULL;
    bool force = false;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, "-o", "--output")) out = cli_value(&a);
        else if (cli_is(&a, NULL, "--base")) base = cli_value(&a);
        else if (cli_is(&a, NULL, "--force")) force = true;
        else if (cli_positional(&a) && !src) src = a.arg;
        else return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!src || !out) {
        usage(stderr);
        return 2;
    }
    zse_lora_file f;
    if (zse_lora_open(&f, src) != 0)
        return cli_error("convert-adapter");
    int rc = 0;
    if (base) {
        zse_file *m = zse_file_open(base);
        rc = m ? zse_lora_check_base(&f, zse_file_config(m)) : -1;
        zse_file_close(m);
    }
    if (rc == 0)
        rc = zse_lora_write_zsa(&f, out, force);
    if (rc == 0) {
        int parts = 0;
        uint64_t bytes = 0;
        for (int i = 0; i < f.n_layers * ZSE_LORA_MODULES; i++)
            if (f.parts[i].rank) {
                parts++;
                bytes += (uint64_t)f.parts[i].rank * (uint64_t)(f.parts[i].in + f.parts[i].out) * 2;
            }
        printf("%s: %d parts over %d layers, rank up to %d, on", out, parts, f.n_layers, f.max_rank);
        for (int m = 0; m < ZSE_LORA_MODULES; m++)
            if (f.modules >> m & 1)
                printf(" %s", zse_lora_hf_module(m));
        printf("; %.2f MB of f16 weights\n", (double)bytes / 1e6);
    }
    zse_lora_close(&f);
    return rc == 0 ? 0 : cli_error("convert-adapter");
}
