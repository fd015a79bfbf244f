/* tokenizer — text to token ids and back, exactly as Hugging Face tokenizers does, built
 * from tokenizer.json (and so from .zse files) or a GGUF vocabulary: BPE (byte-level as
 * GPT-2/Qwen2/Llama-3/DeepSeek, SentencePiece-style as Llama-2/Mistral), Unigram (T5,
 * ALBERT, XLNet, XLM-R) and WordPiece (BERT) with their normalizers, pre-tokenizers, added
 * tokens, post-processors and decoders.
 * A tokenizer is immutable after loading: encode/decode are safe from many threads. */
#ifndef ZSE_TOKENIZER_H
#define ZSE_TOKENIZER_H

#include "format/format.h"
#include "util/util.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct zse_tokenizer zse_tokenizer;

/* tokenizer_config may be NULL; it supplies bos/eos names and add_bos_token */
zse_tokenizer *zse_tokenizer_from_json(const char *json, size_t len, const json_t *tokenizer_config);
/* an HF directory: tokenizer.json (+ tokenizer_config.json) */
zse_tokenizer *zse_tokenizer_from_dir(const char *dir);
/* the tokenizer.ggml.* vocabulary of a .gguf file (models gpt2 and llama) */
zse_tokenizer *zse_tokenizer_from_gguf(const char *path);
/* the same vocabulary as tokenizer.json text (heap, *len bytes) and the tokenizer_config
 * to load it with (bos_token, eos_token, add_bos_token; caller decrefs): what zse convert
 * stores for a GGUF source */
char *zse_tokenizer_json_from_gguf(const char *path, size_t *len, json_t **tokenizer_config);
/* the tokenizer stored in a .zse file */
zse_tokenizer *zse_tokenizer_from_zse(const zse_file *f);
/* a .zse file, a .gguf file or an HF directory */
zse_tokenizer *zse_tokenizer_open(const char *path);
void zse_tokenizer_free(zse_tokenizer *t);

/* add_special: the post-processor's tokens (BOS); parse_special: special added tokens in
 * the text become their ids (non-special added tokens always do, as in HF) */
int zse_tokenizer_encode(const zse_tokenizer *t, const char *text, size_t len, bool add_special,
                         bool parse_special, int32_t **ids, size_t *n);
char *zse_tokenizer_decode(const zse_tokenizer *t, const int32_t *ids, size_t n, bool skip_special);

int zse_tokenizer_n_vocab(const zse_tokenizer *t);
int32_t zse_tokenizer_bos(const zse_tokenizer *t);  /* -1 when none */
int32_t zse_tokenizer_eos(const zse_tokenizer *t);  /* -1 when none */
/* whether add_special puts the BOS token first (the post-processor's template) */
bool zse_tokenizer_add_bos(const zse_tokenizer *t);
/* "bpe-bytelevel", "bpe-sentencepiece", "bpe", "unigram" or "wordpiece" */
const char *zse_tokenizer_type(const zse_tokenizer *t);
const char *zse_tokenizer_token_text(const zse_tokenizer *t, int32_t id);
int32_t zse_tokenizer_token_id(const zse_tokenizer *t, const char *text); /* -1 if absent */
bool zse_tokenizer_is_special(const zse_tokenizer *t, int32_t id);

/* appends to out the bytes token `id` adds to decoded text when it follows other tokens,
 * before any UTF-8 check (a byte-level or <0xNN> token holding part of a character gives
 * that byte, not U+FFFD); for grammars and logprobs. -1 for an id outside the vocabulary. */
int zse_tokenizer_token_bytes(const zse_tokenizer *t, int32_t id, zse_buf *out);

/* streaming detokenizer: push ids one at a time; only complete UTF-8 is appended */
typedef struct zse_tokenizer_stream zse_tokenizer_stream;
zse_tokenizer_stream *zse_tokenizer_stream_new(const zse_tokenizer *t, bool skip_special);
int zse_tokenizer_stream_push(zse_tokenizer_stream *s, int32_t id, zse_buf *out);
int zse_tokenizer_stream_flush(zse_tokenizer_stream *s, zse_buf *out);
void zse_tokenizer_stream_free(zse_tokenizer_stream *s);

#endif
