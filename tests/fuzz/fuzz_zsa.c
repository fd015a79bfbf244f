/* libFuzzer target: the .zsa (LoRA adapter) reader must reject any malformed file cleanly,
 * and every part of a file it accepts must lie inside the mapping (read here from its first
 * to its last value).
 *
 * As in fuzz_zse, unless bit 0 of the flags byte (offset 12) is set, the input's file size,
 * header checksum and preamble checksum are repaired before the file is opened, so that
 * mutations reach the JSON header and the parts. */
#include "format/format.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void wr64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void repair_checksums(uint8_t *b, size_t size)
{
    if (size < 64 || (b[12] & 1))
        return;
    wr64(b + 48, size);
    uint64_t hoff = rd64(b + 16), hsize = rd64(b + 24);
    if (hoff <= size && hsize <= size - hoff)
        wr64(b + 32, zse_hash64(b + hoff, (size_t)hsize));
    wr64(b + 56, zse_hash64(b, 56));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *b = malloc(size ? size : 1);
    if (!b)
        return 0;
    memcpy(b, data, size);
    repair_checksums(b, size);
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz-zsa-%d.zsa", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(b);
        return 0;
    }
    fwrite(b, 1, size, f);
    fclose(f);
    free(b);
    zse_lora_file z;
    if (zse_lora_open(&z, path) == 0) {
        volatile uint16_t sink = 0;
        for (int i = 0; i < z.n_layers * ZSE_LORA_MODULES; i++) {
            const zse_lora_part *p = &z.parts[i];
            if (!p->rank)
                continue;
            sink ^= p->a[0] ^ p->a[(size_t)p->rank * (size_t)p->in - 1];
            sink ^= p->bt[0] ^ p->bt[(size_t)p->rank * (size_t)p->out - 1];
        }
        (void)sink;
        zse_lora_close(&z);
    }
    unlink(path);
    return 0;
}
