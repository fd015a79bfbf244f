/* libFuzzer target: GGUF vocabulary metadata from arbitrary bytes, and encoding with
 * whatever it accepts. */
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz-gguf-%d.gguf", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f)
        return 0;
    fwrite(data, 1, size, f);
    fclose(f);
    zse_tokenizer *t = zse_tokenizer_from_gguf(path);
    if (t) {
        int32_t *ids;
        size_t n;
        if (zse_tokenizer_encode(t, "ab a<|end|>", 11, true, true, &ids, &n) == 0) {
            free(zse_tokenizer_decode(t, ids, n, false));
            free(ids);
        }
        zse_tokenizer_free(t);
    }
    unlink(path);
    return 0;
}
