/* libFuzzer target: a GGUF file as zse convert reads it — the container (header, key/value
 * pairs, tensor directory), the config normalization (Llama-3 rope_freqs fit included) and
 * the block decoders over a few rows of every tensor. The seed (corpus/gguf_model) is a
 * one-layer llama with a tensor of most types zse reads, written with the gguf package
 * (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K; rope_freqs of Llama-3 scaling). */
#include "format/format.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void read_some_rows(const zse_safetensors *st)
{
    for (size_t i = 0; i < st->n_tensors; i++) {
        const zse_st_tensor *t = &st->tensors[i];
        int64_t rows = t->ndim == 2 ? t->shape[0] : 1, cols = t->ndim == 2 ? t->shape[1] : t->shape[0];
        if (cols > 1 << 16)
            continue;
        int64_t n = rows < 3 ? rows : 3;
        float *out = malloc((size_t)(n * cols) * sizeof *out);
        if (out)
            zse_st_read_f32(t, (size_t)((rows - n) * cols), (size_t)(n * cols), out); /* the last rows */
        free(out);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz-gguf-model-%d.gguf", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f)
        return 0;
    fwrite(data, 1, size, f);
    fclose(f);
    zse_hf_dir meta;
    zse_safetensors st;
    if (zse_gguf_open_source(path, &meta, &st) == 0) {
        read_some_rows(&st);
        zse_st_close(&st);
        zse_hf_close(&meta);
    }
    unlink(path);
    return 0;
}
