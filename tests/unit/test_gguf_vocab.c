/* GGUF vocabularies from the project's own fixtures (tests/fixtures/gguf, made by
 * tools/make_gguf_vocab_fixtures.py): a Llama-3-style byte-level vocabulary (pre
 * "llama-bpe": ignore_merges, add_bos), a Qwen2 one, a DeepSeek LLM one (pre "deepseek-llm":
 * its five splits and single digits, under merges that cross every split boundary, so any other
 * split changes the ids), a SentencePiece one (scores, token
 * types, byte tokens), a T5 Unigram one (precompiled charsmap) and a BERT WordPiece one
 * (phantom-space vocabulary), each carrying metadata of every GGUF value type. Every golden text
 * encodes as Hugging Face did — specials as text, specials parsed, BOS added — and decodes
 * back. Then malformed files: every truncation of a fixture, lengths and counts past the
 * end, unknown value types, arrays nested too deep, a missing vocabulary, an unknown model;
 * each fails with an error, never a crash. */
#include "test.h"

#include "tokenizer/tokenizer.h"

#include <unistd.h>

static bool same_ids(const int32_t *ids, size_t n, const json_t *want)
{
    if (n != json_array_size(want))
        return false;
    for (size_t k = 0; k < n; k++)
        if (ids[k] != json_integer_value(json_array_get(want, k)))
            return false;
    return true;
}

static int check_fixture(const char *dir, const char *name, int32_t bos, int32_t eos, const char *type,
                         bool round_trip)
{
    char path[600], gpath[600];
    snprintf(path, sizeof path, "%s/%s.gguf", dir, name);
    snprintf(gpath, sizeof gpath, "%s/%s.goldens.json", dir, name);
    zse_tokenizer *t = zse_tokenizer_from_gguf(path);
    CHECK_MSG(t != NULL, "%s: %s", name, zse_error_message());
    json_error_t err;
    json_t *g = json_load_file(gpath, 0, &err);
    CHECK_MSG(g != NULL, "%s: %s", gpath, err.text);
    int cases = 0;
    if (t && g) {
        CHECK_EQ_INT(zse_tokenizer_bos(t), bos);
        CHECK_EQ_INT(zse_tokenizer_eos(t), eos);
        CHECK_EQ_STR(zse_tokenizer_type(t), type);
        size_t i;
        json_t *c;
        json_array_foreach(g, i, c) {
            const char *s = json_string_value(json_object_get(c, "text"));
            static const struct { const char *key; bool add, special; } modes[] = {
                {"ids", false, false}, {"ids_special", false, true}, {"ids_bos", true, false}};
            for (int m = 0; m < 3; m++) {
                int32_t *ids = NULL;
                size_t n = 0;
                CHECK(zse_tokenizer_encode(t, s, strlen(s), modes[m].add, modes[m].special, &ids, &n) == 0);
                CHECK_MSG(same_ids(ids, n, json_object_get(c, modes[m].key)), "%s: %s of \"%s\"", name, modes[m].key,
                          s);
                if (m == 0 && round_trip) { /* no normalizer: the text comes back exactly */
                    char *back = zse_tokenizer_decode(t, ids, n, false);
                    CHECK_MSG(back && strcmp(back, s) == 0, "%s: \"%s\" decoded as \"%s\"", name, s, back);
                    free(back);
                }
                free(ids);
            }
            cases++;
        }
    }
    json_decref(g);
    zse_tokenizer_free(t);
    return cases;
}

/* every prefix of a good file is a bad file */
static void check_truncations(const char *path)
{
    size_t len;
    char *whole = zse_read_file(path, &len);
    CHECK(whole != NULL);
    char cut[64];
    snprintf(cut, sizeof cut, "/tmp/zse-gguf-cut-%d.gguf", (int)getpid());
    int failed_cleanly = 0, tried = 0;
    for (size_t at = 0; whole && at < len; at += at < 4096 ? 97 : len / 40 + 1) {
        FILE *f = fopen(cut, "wb");
        fwrite(whole, 1, at, f);
        fclose(f);
        zse_tokenizer *bad = zse_tokenizer_from_gguf(cut);
        failed_cleanly += bad == NULL && zse_error_message()[0];
        tried++;
        zse_tokenizer_free(bad);
    }
    CHECK_EQ_INT(failed_cleanly, tried);
    remove(cut);
    free(whole);
}

/* ---- hand-made files ------------------------------------------------------------------ */

static void put(zse_buf *b, uint64_t v, int n)
{
    for (int i = 0; i < n; i++) {
        char c = (char)(v >> (8 * i));
        zse_buf_append(b, &c, 1);
    }
}

static void put_str(zse_buf *b, const char *s)
{
    put(b, strlen(s), 8);
    zse_buf_puts(b, s);
}

static void header(zse_buf *b, uint64_t n_kv)
{
    zse_buf_puts(b, "GGUF");
    put(b, 3, 4);
    put(b, 0, 8);
    put(b, n_kv, 8);
}

/* a minimal gpt2 vocabulary: tokens a, b, ab, <|x|> (CONTROL); merge "a b" */
static void tiny_vocab(zse_buf *b, const char *model)
{
    put_str(b, "tokenizer.ggml.model");
    put(b, 8, 4);
    put_str(b, model);
    put_str(b, "tokenizer.ggml.tokens");
    put(b, 9, 4);
    put(b, 8, 4);
    put(b, 4, 8);
    put_str(b, "a");
    put_str(b, "b");
    put_str(b, "ab");
    put_str(b, "<|x|>");
    put_str(b, "tokenizer.ggml.token_type");
    put(b, 9, 4);
    put(b, 5, 4);
    put(b, 4, 8);
    put(b, 1, 4);
    put(b, 1, 4);
    put(b, 1, 4);
    put(b, 3, 4);
    put_str(b, "tokenizer.ggml.merges");
    put(b, 9, 4);
    put(b, 8, 4);
    put(b, 1, 8);
    put_str(b, "a b");
}

static zse_tokenizer *load_bytes(const zse_buf *b)
{
    char path[64];
    snprintf(path, sizeof path, "/tmp/zse-gguf-made-%d.gguf", (int)getpid());
    FILE *f = fopen(path, "wb");
    fwrite(b->data, 1, b->len, f);
    fclose(f);
    zse_tokenizer *t = zse_tokenizer_from_gguf(path);
    remove(path);
    return t;
}

static void check_made(void)
{
    /* the tiny vocabulary works: "aab<|x|>" → a, ab, and <|x|> only when parsed */
    zse_buf b = {0};
    header(&b, 4);
    tiny_vocab(&b, "gpt2");
    zse_tokenizer *t = load_bytes(&b);
    CHECK_MSG(t != NULL, "%s", zse_error_message());
    int32_t *ids = NULL;
    size_t n = 0;
    if (t && zse_tokenizer_encode(t, "aab<|x|>", 8, false, true, &ids, &n) == 0) {
        CHECK(n == 3 && ids[0] == 0 && ids[1] == 2 && ids[2] == 3);
        free(ids);
    }
    CHECK(t && zse_tokenizer_is_special(t, 3) && !zse_tokenizer_add_bos(t));
    zse_tokenizer_free(t);

    struct {
        const char *what, *error;
        uint32_t type;     /* of an extra key placed before the vocabulary */
        uint64_t count;    /* its array count or string length */
        int depth;         /* arrays nested this deep */
    } bad[] = {
        {"array count past the end", "past the end", 5, 1ull << 60, 1},
        {"string length past the end", "past the end", 8, 1ull << 62, 0},
        {"unknown value type", "unknown GGUF value type", 13, 0, 0},
        {"arrays nested too deep", "nested", 5, 1, 6},
        {"array of strings past the end", "past the end", 8, 1ull << 50, 1},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        b.len = 0;
        header(&b, 5);
        put_str(&b, "zse.bad");
        if (bad[i].depth == 0) {
            put(&b, bad[i].type, 4);
            if (bad[i].type == 8)
                put(&b, bad[i].count, 8);
        } else {
            put(&b, 9, 4);
            for (int d = 1; d < bad[i].depth; d++) { /* [[[...]]] one element each */
                put(&b, 9, 4);
                put(&b, 1, 8);
            }
            put(&b, bad[i].type, 4);
            put(&b, bad[i].count, 8);
            put(&b, 7, 4);
        }
        tiny_vocab(&b, "gpt2");
        t = load_bytes(&b);
        CHECK_MSG(t == NULL && strstr(zse_error_message(), bad[i].error), "%s: %s", bad[i].what,
                  zse_error_message());
        zse_tokenizer_free(t);
    }
    /* a model zse does not know, and a file without a vocabulary */
    b.len = 0;
    header(&b, 4);
    tiny_vocab(&b, "rwkv");
    t = load_bytes(&b);
    CHECK_MSG(t == NULL && strstr(zse_error_message(), "'rwkv' is not supported"), "%s", zse_error_message());
    /* a t5 vocabulary without its scores */
    b.len = 0;
    header(&b, 4);
    tiny_vocab(&b, "t5");
    t = load_bytes(&b);
    CHECK_MSG(t == NULL && strstr(zse_error_message(), "missing or inconsistent"), "%s", zse_error_message());
    b.len = 0;
    header(&b, 0);
    t = load_bytes(&b);
    CHECK_MSG(t == NULL && strstr(zse_error_message(), "not supported"), "%s", zse_error_message());
    /* huge kv count: refused before any loop (the container reader's check) */
    b.len = 0;
    header(&b, 1ull << 62);
    t = load_bytes(&b);
    CHECK_MSG(t == NULL && strstr(zse_error_message(), "more than the file can hold"), "%s", zse_error_message());
    zse_buf_free(&b);
    CHECK(zse_tokenizer_from_gguf("/nonexistent/x.gguf") == NULL);
}

int main(void)
{
    const char *data = test_env("ZSE_TEST_DATA");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/gguf", data ? data : "tests/fixtures");
    int cases = check_fixture(dir, "llama-bpe", 0, 4, "bpe-bytelevel", true) +
                check_fixture(dir, "qwen2", -1, 2, "bpe-bytelevel", true) +
                check_fixture(dir, "deepseek-llm", 1000, 1001, "bpe-bytelevel", true) +
                check_fixture(dir, "spm", 1, 2, "bpe-sentencepiece", true) +
                check_fixture(dir, "t5", -1, 1, "unigram", false) + check_fixture(dir, "bert", 2, 3, "wordpiece", false);
    printf("GGUF fixture cases: %d\n", cases);
    char path[600];
    snprintf(path, sizeof path, "%s/qwen2.gguf", dir);
    check_truncations(path);
    snprintf(path, sizeof path, "%s/spm.gguf", dir);
    check_truncations(path);
    check_made();
    return test_main_end();
}
