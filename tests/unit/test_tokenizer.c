/* tokenizer: every golden of the project's fixture (and ../shared's tiny-qwen2 when
 * present) encodes and decodes exactly as Hugging Face did; round trips of random UTF-8;
 * invalid bytes and long inputs are handled; the streaming detokenizer emits whole
 * characters only and adds up to the full decode. */
#include "test.h"

#include "tokenizer/tokenizer.h"

#include <utf8proc.h>

static int goldens_checked;

static void check_goldens(const char *dir)
{
    char *path = zse_path_join(dir, "goldens.json");
    json_error_t err;
    json_t *g = json_load_file(path, 0, &err);
    free(path);
    zse_tokenizer *t = zse_tokenizer_from_dir(dir);
    CHECK_MSG(t != NULL, "%s", zse_error_message());
    if (!t || !g) {
        json_decref(g);
        zse_tokenizer_free(t);
        return;
    }
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(g, "tokenizer"), i, c) {
        const char *text = json_string_value(json_object_get(c, "text"));
        json_t *want = json_object_get(c, "ids");
        int32_t *ids;
        size_t n;
        CHECK(zse_tokenizer_encode(t, text, strlen(text), false, true, &ids, &n) == 0);
        bool same = n == json_array_size(want);
        for (size_t k = 0; same && k < n; k++)
            same = ids[k] == json_integer_value(json_array_get(want, k));
        CHECK_MSG(same, "%s: ids of \"%s\"", dir, text);
        char *back = zse_tokenizer_decode(t, ids, n, false);
        const char *dec = json_string_value(json_object_get(c, "decoded"));
        CHECK_MSG(back && dec && strcmp(back, dec) == 0, "%s: decode of \"%s\" gave \"%s\"", dir, text, back);
        free(back);
        free(ids);
        json_t *with = json_object_get(c, "ids_with_special");
        if (with) {
            CHECK(zse_tokenizer_encode(t, text, strlen(text), true, true, &ids, &n) == 0);
            same = n == json_array_size(with);
            for (size_t k = 0; same && k < n; k++)
                same = ids[k] == json_integer_value(json_array_get(with, k));
            CHECK_MSG(same, "%s: ids with special tokens of \"%s\"", dir, text);
            free(ids);
        }
        goldens_checked++;
    }
    json_array_foreach(json_object_get(g, "chat"), i, c) {
        const char *text = json_string_value(json_object_get(c, "rendered"));
        json_t *want = json_object_get(c, "ids");
        if (!text || !want)
            continue;
        int32_t *ids;
        size_t n;
        CHECK(zse_tokenizer_encode(t, text, strlen(text), false, true, &ids, &n) == 0);
        bool same = n == json_array_size(want);
        for (size_t k = 0; same && k < n; k++)
            same = ids[k] == json_integer_value(json_array_get(want, k));
        CHECK_MSG(same, "%s: ids of chat render %zu", dir, i);
        free(ids);
        goldens_checked++;
    }
    json_decref(g);
    zse_tokenizer_free(t);
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint32_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static void random_round_trips(const zse_tokenizer *t)
{
    static const uint32_t ranges[][2] = {{0x20, 0x7e}, {0xa0, 0x2ff}, {0x400, 0x4ff}, {0x4e00, 0x4fff},
                                         {0x1f300, 0x1f64f}, {0x9, 0xd}};
    for (int round = 0; round < 300; round++) {
        zse_buf s = {0};
        int len = (int)(next_rand() % 40);
        for (int i = 0; i < len; i++) {
            const uint32_t *r = ranges[next_rand() % 6];
            uint32_t cp = r[0] + next_rand() % (r[1] - r[0] + 1);
            char enc[4];
            int n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
            if (n == 1) enc[0] = (char)cp;
            else if (n == 2) { enc[0] = (char)(0xC0 | cp >> 6); enc[1] = (char)(0x80 | (cp & 63)); }
            else if (n == 3) { enc[0] = (char)(0xE0 | cp >> 12); enc[1] = (char)(0x80 | ((cp >> 6) & 63)); enc[2] = (char)(0x80 | (cp & 63)); }
            else { enc[0] = (char)(0xF0 | cp >> 18); enc[1] = (char)(0x80 | ((cp >> 12) & 63)); enc[2] = (char)(0x80 | ((cp >> 6) & 63)); enc[3] = (char)(0x80 | (cp & 63)); }
            zse_buf_append(&s, enc, (size_t)n);
        }
        int32_t *ids;
        size_t n;
        CHECK(zse_tokenizer_encode(t, zse_buf_str(&s), s.len, false, false, &ids, &n) == 0);
        char *back = zse_tokenizer_decode(t, ids, n, false);
        /* NFC: the random code points here are already in NFC except for rare
         * combining sequences, which compare after normalization on both sides */
        /* the tokenizer normalizes with NFC: decode(encode(s)) == NFC(s) exactly */
        utf8proc_uint8_t *nfc = s.len ? utf8proc_NFC((const utf8proc_uint8_t *)zse_buf_str(&s)) : NULL;
        const char *want = nfc ? (const char *)nfc : "";
        CHECK_MSG(back && strcmp(back, want) == 0, "round trip %d: \"%s\" came back as \"%s\"", round, want,
                  back ? back : "(null)");
        free(nfc);
        /* streaming: concatenated pieces equal the whole decode */
        zse_tokenizer_stream *st = zse_tokenizer_stream_new(t, false);
        zse_buf streamed = {0};
        for (size_t k = 0; k < n; k++)
            CHECK(zse_tokenizer_stream_push(st, ids[k], &streamed) == 0);
        CHECK(zse_tokenizer_stream_flush(st, &streamed) == 0);
        CHECK_MSG(back && strcmp(zse_buf_str(&streamed), back) == 0, "stream %d", round);
        zse_tokenizer_stream_free(st);
        zse_buf_free(&streamed);
        free(back);
        free(ids);
        zse_buf_free(&s);
    }
}

static void hostile_inputs(const zse_tokenizer *t)
{
    /* invalid UTF-8 becomes U+FFFD, as Python's decode(errors="replace") */
    const char bad[] = "ok\xff\xfe\xc3(\xe2\x82 end";
    int32_t *ids;
    size_t n;
    CHECK(zse_tokenizer_encode(t, bad, sizeof bad - 1, false, false, &ids, &n) == 0);
    char *back = zse_tokenizer_decode(t, ids, n, false);
    CHECK(back && strstr(back, "\xEF\xBF\xBD") != NULL && strncmp(back, "ok", 2) == 0);
    free(back);
    free(ids);
    /* 1 MB without a space: must not be quadratic (the whole test has a CTest timeout) */
    size_t big = 1 << 20;
    char *s = malloc(big);
    for (size_t i = 0; i < big; i++)
        s[i] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[next_rand() % 64];
    double t0 = zse_now();
    CHECK(zse_tokenizer_encode(t, s, big, false, false, &ids, &n) == 0);
    printf("1 MB base64-like text: %zu tokens in %.2f s\n", n, zse_now() - t0);
    back = zse_tokenizer_decode(t, ids, n, false);
    CHECK(back && strlen(back) == big && memcmp(back, s, big) == 0);
    free(back);
    free(ids);
    free(s);
    /* out-of-range ids are an error, not a crash */
    int32_t wrong[2] = {5, 1 << 30};
    CHECK(zse_tokenizer_decode(t, wrong, 2, false) == NULL);
    CHECK(strstr(zse_error_message(), "outside the vocabulary") != NULL);
    CHECK(zse_tokenizer_from_json("{", 1, NULL) == NULL);
    CHECK(zse_tokenizer_from_json("{\"model\":{\"type\":\"Unigram\"}}", 28, NULL) == NULL);
    CHECK(strstr(zse_error_message(), "Unigram") != NULL);
}

int main(void)
{
    const char *data = test_env("ZSE_TEST_DATA");
    char *dir = zse_path_join(data ? data : "tests/fixtures", "tiny-llama");
    check_goldens(dir);
    zse_tokenizer *t = zse_tokenizer_from_dir(dir);
    CHECK(t != NULL);
    if (t) {
        CHECK_EQ_INT(zse_tokenizer_bos(t), 0);
        CHECK_EQ_INT(zse_tokenizer_eos(t), 4);
        CHECK(zse_tokenizer_is_special(t, 4));
        CHECK(!zse_tokenizer_is_special(t, 300));
        /* special text is split only when asked */
        int32_t *ids;
        size_t n;
        const char *txt = "<|eot_id|>";
        CHECK(zse_tokenizer_encode(t, txt, strlen(txt), false, false, &ids, &n) == 0);
        CHECK(n > 1);
        free(ids);
        CHECK(zse_tokenizer_encode(t, txt, strlen(txt), false, true, &ids, &n) == 0);
        CHECK(n == 1 && ids[0] == 4);
        free(ids);
        random_round_trips(t);
        hostile_inputs(t);
    }
    zse_tokenizer_free(t);
    free(dir);
    char *qdir = zse_path_join(data ? data : "tests/fixtures", "tiny-qwen2");
    check_goldens(qdir);
    free(qdir);
    const char *shared = test_env("ZSE_SHARED");
    if (shared) {
        char *q = zse_path_join(shared, "fixtures/tiny-qwen2");
        char *gq = zse_path_join(q, "goldens.json");
        if (zse_file_exists(gq)) /* ../shared is optional: the project tests itself without it */
            check_goldens(q);
        free(gq);
        free(q);
    }
    printf("golden cases checked: %d\n", goldens_checked);
    return test_main_end();
}
