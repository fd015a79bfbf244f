/* libFuzzer target: arbitrary bytes as a tokenizer.json (a model file is untrusted input).
 * Whatever loads must encode, decode and stream without a crash. */
#include "tokenizer/tokenizer.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    zse_tokenizer *t = zse_tokenizer_from_json((const char *)data, size, NULL);
    if (!t)
        return 0;
    static const char text[] = "Hello  world!\n<s>x</s> 123 日本 \xf0\x9f\xa4\x96 \xff";
    int32_t *ids;
    size_t n;
    if (zse_tokenizer_encode(t, text, sizeof text - 1, true, true, &ids, &n) == 0) {
        free(zse_tokenizer_decode(t, ids, n, false));
        zse_tokenizer_stream *st = zse_tokenizer_stream_new(t, true);
        zse_buf out = {0};
        for (size_t i = 0; st && i < n; i++)
            zse_tokenizer_stream_push(st, ids[i], &out);
        if (st)
            zse_tokenizer_stream_flush(st, &out);
        zse_tokenizer_stream_free(st);
        zse_buf_free(&out);
        free(ids);
    }
    int32_t some[4] = {0, 1, zse_tokenizer_n_vocab(t) - 1, 2};
    free(zse_tokenizer_decode(t, some, 4, false));
    zse_tokenizer_free(t);
    return 0;
}
