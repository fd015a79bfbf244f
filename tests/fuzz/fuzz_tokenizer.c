/* libFuzzer target: arbitrary bytes through encode (with and without special-token
 * parsing), decode and the streaming detokenizer of the fixture's tokenizer. */
#include "tokenizer/tokenizer.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static zse_tokenizer *tok;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!tok) {
        const char *dir = getenv("ZSE_FUZZ_TOKENIZER");
        tok = zse_tokenizer_from_dir(dir ? dir : "tests/fixtures/tiny-llama");
        if (!tok)
            abort(); /* the fixture must load: a misconfigured run is not a pass */
    }
    for (int special = 0; special < 2; special++) {
        int32_t *ids;
        size_t n;
        if (zse_tokenizer_encode(tok, (const char *)data, size, special, special, &ids, &n) != 0)
            continue;
        char *text = zse_tokenizer_decode(tok, ids, n, special);
        free(text);
        zse_tokenizer_stream *st = zse_tokenizer_stream_new(tok, false);
        zse_buf out = {0};
        for (size_t i = 0; st && i < n; i++)
            zse_tokenizer_stream_push(st, ids[i], &out);
        if (st)
            zse_tokenizer_stream_flush(st, &out);
        zse_tokenizer_stream_free(st);
        zse_buf_free(&out);
        free(ids);
    }
    return 0;
}
