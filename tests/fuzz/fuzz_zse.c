/* libFuzzer target: the .zse reader must reject any malformed file cleanly, and anything
 * it accepts must be safe to walk (every tensor's bytes inside the mapping).
 *
 * A mutated byte almost never leaves the XXH3 checksums valid, so left alone the fuzzer
 * would only ever reach the preamble check. Unless bit 0 of the flags byte (offset 12) is
 * set, the input's file size, header checksum and preamble checksum are repaired before
 * the file is opened, which lets mutations reach the JSON header, the config and the
 * tensor directory; with the bit set the bytes are used as they are. */
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
    snprintf(path, sizeof path, "/tmp/fuzz-zse-%d.zse", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(b);
        return 0;
    }
    fwrite(b, 1, size, f);
    fclose(f);
    free(b);
    zse_file *z = zse_file_open(path);
    if (z) {
        int bad;
        zse_file_verify(z, &bad);
        size_t len;
        zse_file_tokenizer_json(z, &len);
        for (size_t i = 0; i < zse_file_n_tensors(z); i++) {
            const zse_tensor_info *t = zse_file_tensor_at(z, i);
            float row[256];
            if (t->q.cols <= 256) {
                zse_dequantize_row(&t->q, t->data, 0, row);
                zse_dequantize_row(&t->q, t->data, t->q.rows - 1, row);
            }
        }
        /* every part of the first and the last expert of each bank lies inside the mapping */
        for (size_t i = 0; i < zse_file_n_expert_banks(z); i++) {
            const zse_expert_bank *bank = zse_file_expert_bank_at(z, i);
            for (int e = 0; e < bank->count; e += bank->count > 1 ? bank->count - 1 : 1)
                for (int p = 0; p < ZSE_EXPERT_PARTS; p++) {
                    char name[64];
                    zse_tensor_info t;
                    zse_expert_tensor(bank, e, p, name, &t);
                    float row[256];
                    if (t.q.cols <= 256) {
                        zse_dequantize_row(&t.q, t.data, 0, row);
                        zse_dequantize_row(&t.q, t.data, t.q.rows - 1, row);
                    }
                }
        }
        zse_file_close(z);
    }
    unlink(path);
    return 0;
}
