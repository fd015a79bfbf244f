/* libFuzzer target: arbitrary bytes through encode (with and without special-token
 * parsing and added special tokens), decode and the streaming detokenizer. The first
 * byte picks the pipeline: the tiny-llama fixture (Llama-3-style byte-level BPE) or one of
 * the component fixtures in tests/fixtures/tokenizers (SentencePiece, Metaspace, subword
 * affixes, Split behaviours, normalized added tokens, ...). ZSE_FUZZ_TOKENIZER names the
 * tiny-llama directory; the component fixtures are found beside it. */
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_TOKENIZERS 16
static zse_tokenizer *toks[MAX_TOKENIZERS];
static int n_toks;

static void load_all(void)
{
    const char *dir = getenv("ZSE_FUZZ_TOKENIZER");
    if (!dir)
        dir = "tests/fixtures/tiny-llama";
    if (!(toks[n_toks++] = zse_tokenizer_from_dir(dir)))
        abort(); /* the fixture must load: a misconfigured run is not a pass */
    char path[1024];
    snprintf(path, sizeof path, "%s/../tokenizers/index.json", dir);
    json_error_t err;
    json_t *index = json_load_file(path, 0, &err);
    size_t i;
    json_t *name;
    json_array_foreach(index, i, name) {
        if (n_toks == MAX_TOKENIZERS)
            break;
        snprintf(path, sizeof path, "%s/../tokenizers/%s.json", dir, json_string_value(name));
        size_t len;
        char *text = zse_read_file(path, &len);
        if (!text || !(toks[n_toks++] = zse_tokenizer_from_json(text, len, NULL)))
            abort();
        free(text);
    }
    json_decref(index);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!n_toks)
        load_all();
    if (size == 0)
        return 0;
    const zse_tokenizer *tok = toks[data[0] % n_toks];
    data++, size--;
    for (int special = 0; special < 2; special++) {
        int32_t *ids;
        size_t n;
        if (zse_tokenizer_encode(tok, (const char *)data, size, special, special, &ids, &n) != 0)
            abort(); /* encoding never fails on any input */
        char *text = zse_tokenizer_decode(tok, ids, n, special);
        if (!text)
            abort();
        free(text);
        zse_tokenizer_stream *st = zse_tokenizer_stream_new(tok, special);
        zse_buf out = {0};
        for (size_t i = 0; st && i < n; i++)
            if (zse_tokenizer_stream_push(st, ids[i], &out) != 0)
                abort();
        if (st)
            zse_tokenizer_stream_flush(st, &out);
        zse_tokenizer_stream_free(st);
        zse_buf_free(&out);
        free(ids);
    }
    /* the bytes as ids: decoding arbitrary sequences, in range or not */
    int32_t ids[64];
    size_t n = 0;
    for (size_t i = 0; i + 1 < size && n < 64; i += 2)
        ids[n++] = (int32_t)((data[i] | data[i + 1] << 8) % (zse_tokenizer_n_vocab(tok) + 2));
    free(zse_tokenizer_decode(tok, ids, n, size & 1));
    zse_tokenizer_stream *st = zse_tokenizer_stream_new(tok, size & 1);
    zse_buf out = {0};
    for (size_t i = 0; st && i < n; i++)
        zse_tokenizer_stream_push(st, ids[i], &out);
    if (st)
        zse_tokenizer_stream_flush(st, &out);
    zse_tokenizer_stream_free(st);
    zse_buf_free(&out);
    return 0;
}
