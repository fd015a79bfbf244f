/* tokenizer: every golden of the project's fixtures (and ../shared's tiny-qwen2 when
 * present) encodes and decodes exactly as Hugging Face did; round trips of random UTF-8;
 * random bytes, invalid UTF-8 and long inputs are handled; many threads share one
 * tokenizer; the streaming detokenizer emits whole characters only, drops
 * SentencePiece's leading space as the whole decode does, and adds up to the full decode. */
#include "test.h"

#include "tokenizer/tokenizer.h"

#include <pthread.h>
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


static bool valid_utf8(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0)
            return false;
        i += (size_t)k;
    }
    return true;
}

/* ---- many threads on one tokenizer ------------------------------------------------------ */

#define N_THREADS 4
static const char *const thread_texts[] = {
    "def add(a, b):\n    return a + b\n", "<|eot_id|>Hello there, 日本語 and émojis 🤖🤖", "x", "",
    "a very long line of prose that keeps going and going without a newline for quite a while"};

typedef struct {
    const zse_tokenizer *t;
    int32_t *want[5];
    size_t want_n[5];
    int bad;
} thread_job;

static void *thread_run(void *arg)
{
    thread_job *j = arg;
    for (int round = 0; round < 40; round++)
        for (int k = 0; k < 5; k++) {
            int32_t *ids;
            size_t n;
            if (zse_tokenizer_encode(j->t, thread_texts[k], strlen(thread_texts[k]), true, true, &ids, &n) != 0) {
                __atomic_add_fetch(&j->bad, 1, __ATOMIC_RELAXED);
                continue;
            }
            char *text = zse_tokenizer_decode(j->t, ids, n, true);
            if (n != j->want_n[k] || memcmp(ids, j->want[k], n * sizeof *ids) != 0 || !text)
                __atomic_add_fetch(&j->bad, 1, __ATOMIC_RELAXED);
            free(text);
            free(ids);
        }
    return NULL;
}

static void threads_share_one_tokenizer(const zse_tokenizer *t)
{
    thread_job j = {t, {0}, {0}, 0};
    for (int k = 0; k < 5; k++)
        CHECK(zse_tokenizer_encode(t, thread_texts[k], strlen(thread_texts[k]), true, true, &j.want[k], &j.want_n[k]) == 0);
    pthread_t th[N_THREADS];
    for (int i = 0; i < N_THREADS; i++)
        CHECK(pthread_create(&th[i], NULL, thread_run, &j) == 0);
    for (int i = 0; i < N_THREADS; i++)
        pthread_join(th[i], NULL);
    CHECK_EQ_INT(j.bad, 0);
    for (int k = 0; k < 5; k++)
        free(j.want[k]);
}

/* ---- streaming ------------------------------------------------------------------------------ */

/* pushes ids one by one: every piece is valid UTF-8 without a held-back half character,
 * and the pieces add up to the whole decode */
static void check_stream(const zse_tokenizer *t, const int32_t *ids, size_t n, bool skip, const char *what)
{
    char *whole = zse_tokenizer_decode(t, ids, n, skip);
    zse_tokenizer_stream *st = zse_tokenizer_stream_new(t, skip);
    zse_buf all = {0};
    bool pieces_ok = true;
    for (size_t k = 0; st && k < n; k++) {
        zse_buf piece = {0};
        CHECK(zse_tokenizer_stream_push(st, ids[k], &piece) == 0);
        if (!valid_utf8(piece.data, piece.len) || (piece.len >= 3 && !memcmp(piece.data + piece.len - 3, "\xEF\xBF\xBD", 3)))
            pieces_ok = false; /* whole characters only, none held back as U+FFFD */
        zse_buf_append(&all, piece.data ? piece.data : "", piece.len);
        zse_buf_free(&piece);
    }
    CHECK(st && zse_tokenizer_stream_flush(st, &all) == 0);
    CHECK_MSG(pieces_ok, "%s: a streamed piece split a character", what);
    CHECK_MSG(whole && strcmp(zse_buf_str(&all), whole) == 0, "%s: streamed \"%s\", decoded \"%s\"", what,
              zse_buf_str(&all), whole ? whole : "(null)");
    zse_tokenizer_stream_free(st);
    zse_buf_free(&all);
    free(whole);
}

static zse_tokenizer *fixture_json(const char *data, const char *name)
{
    char path[600];
    snprintf(path, sizeof path, "%s/tokenizers/%s.json", data, name);
    size_t len;
    char *text = zse_read_file(path, &len);
    zse_tokenizer *t = text ? zse_tokenizer_from_json(text, len, NULL) : NULL;
    free(text);
    CHECK_MSG(t != NULL, "%s: %s", name, zse_error_message());
    return t;
}

static void streams(const char *data)
{
    static const char *const texts[] = {"Hello world", " two  spaces", "日本語のテキスト 🤖 ok", "\n\nnewlines\n",
                                        "<s>tagged</s> text", "x"};
    static const char *const names[] = {"spm-bytefallback", "metaspace-nfkc", "metaspace-always-nosplit",
                                        "added-normalized", "subword-affixes", "unigram-t5", "unigram-albert",
                                        "wordpiece-bert", "wordpiece-cased-ctc"};
    for (size_t v = 0; v < sizeof names / sizeof names[0]; v++) {
        zse_tokenizer *t = fixture_json(data, names[v]);
        for (size_t i = 0; t && i < sizeof texts / sizeof texts[0]; i++) {
            int32_t *ids;
            size_t n;
            CHECK(zse_tokenizer_encode(t, texts[i], strlen(texts[i]), true, true, &ids, &n) == 0);
            check_stream(t, ids, n, false, names[v]);
            check_stream(t, ids, n, true, names[v]);
            free(ids);
        }
        zse_tokenizer_free(t);
    }
    /* SentencePiece: the first token's ▁ is not a space in the stream either */
    zse_tokenizer *t = fixture_json(data, "spm-bytefallback");
    if (!t)
        return;
    int32_t *ids;
    size_t n;
    CHECK(zse_tokenizer_encode(t, "Hello", 5, false, false, &ids, &n) == 0);
    zse_tokenizer_stream *st = zse_tokenizer_stream_new(t, false);
    zse_buf out = {0};
    for (size_t k = 0; k < n; k++)
        CHECK(zse_tokenizer_stream_push(st, ids[k], &out) == 0);
    CHECK(zse_tokenizer_stream_flush(st, &out) == 0);
    CHECK_EQ_STR(zse_buf_str(&out), "Hello");
    free(ids);
    /* a character in byte tokens: nothing until it is whole; ids past the vocabulary add
     * nothing; a negative id is an error */
    int32_t e6 = zse_tokenizer_token_id(t, "<0xE6>"), x97 = zse_tokenizer_token_id(t, "<0x97>"),
            xa5 = zse_tokenizer_token_id(t, "<0xA5>");
    CHECK(e6 >= 0 && x97 >= 0 && xa5 >= 0);
    out.len = 0;
    CHECK(zse_tokenizer_stream_push(st, e6, &out) == 0 && out.len == 0);
    CHECK(zse_tokenizer_stream_push(st, x97, &out) == 0 && out.len == 0);
    CHECK(zse_tokenizer_stream_push(st, zse_tokenizer_n_vocab(t) + 5, &out) == 0 && out.len == 0);
    CHECK(zse_tokenizer_stream_push(st, xa5, &out) == 0);
    CHECK_EQ_STR(zse_buf_str(&out), "\xE6\x97\xA5");
    CHECK(zse_tokenizer_stream_push(st, -1, &out) == -1);
    /* an unfinished character is flushed as U+FFFD */
    out.len = 0;
    CHECK(zse_tokenizer_stream_push(st, e6, &out) == 0 && out.len == 0);
    CHECK(zse_tokenizer_stream_flush(st, &out) == 0);
    CHECK_EQ_STR(zse_buf_str(&out), "\xEF\xBF\xBD");
    zse_buf_free(&out);
    zse_tokenizer_stream_free(st);
    zse_tokenizer_free(t);
}

/* ---- one token's bytes -------------------------------------------------------------------
 * Byte-level: the tokens' bytes put together are the text, whatever the characters (a
 * multi-byte character split over tokens included). SentencePiece: the same after the
 * first token's leading space, which only a mid-sequence token keeps; a <0xNN> token is
 * its byte, not U+FFFD. */
static void token_bytes_concatenate(const zse_tokenizer *byte_level, const char *data)
{
    static const char *const texts[] = {"def f(x):\n    return x * 2  # done", "日本語のテキスト and ünïcödé",
                                        "emoji 🎉🚀 mixed\twith\ttabs", "  leading spaces"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        int32_t *ids;
        size_t n;
        CHECK(zse_tokenizer_encode(byte_level, texts[i], strlen(texts[i]), false, false, &ids, &n) == 0);
        zse_buf all = {0};
        for (size_t k = 0; k < n; k++)
            CHECK(zse_tokenizer_token_bytes(byte_level, ids[k], &all) == 0);
        CHECK_MSG(all.len == strlen(texts[i]) && memcmp(all.data, texts[i], all.len) == 0,
                  "byte-level token bytes of \"%s\" gave \"%s\"", texts[i], zse_buf_str(&all));
        zse_buf_free(&all);
        free(ids);
    }
    zse_buf b = {0};
    CHECK(zse_tokenizer_token_bytes(byte_level, -1, &b) == -1);
    CHECK(zse_tokenizer_token_bytes(byte_level, zse_tokenizer_n_vocab(byte_level), &b) == -1);
    zse_tokenizer *spm = fixture_json(data, "spm-bytefallback");
    if (!spm)
        return;
    int32_t *ids;
    size_t n;
    const char *text = "Hello world, 日本";
    CHECK(zse_tokenizer_encode(spm, text, strlen(text), false, false, &ids, &n) == 0);
    for (size_t k = 0; k < n; k++)
        CHECK(zse_tokenizer_token_bytes(spm, ids[k], &b) == 0);
    CHECK_MSG(b.len == strlen(text) + 1 && b.data[0] == ' ' && memcmp(b.data + 1, text, b.len - 1) == 0,
              "SentencePiece token bytes gave \"%s\"", zse_buf_str(&b));
    free(ids);
    b.len = 0;
    int32_t e6 = zse_tokenizer_token_id(spm, "<0xE6>");
    CHECK(e6 >= 0 && zse_tokenizer_token_bytes(spm, e6, &b) == 0 && b.len == 1 && (unsigned char)b.data[0] == 0xE6);
    zse_buf_free(&b);
    zse_tokenizer_free(spm);
}

/* Unigram and WordPiece: a token's bytes are what the decoders make of it mid-sequence, so
 * the bytes of a text's tokens add up to its decode with the space the first token would
 * have after another ("##ab" gives "ab", a word-initial token " word", ▁ a space) */
static void token_bytes_models(const char *data)
{
    static const struct {
        const char *name, *text, *lead; /* lead: what the first token adds mid-sequence */
    } cases[] = {{"wordpiece-bert", "the tokenizer, it works! unbelievable", " "},
                 {"unigram-t5", "Hello World, the format", " "},
                 {"unigram-albert", "Hello World 日本", " "},
                 {"wordpiece-cased-ctc", "Format version 12", ""}}; /* CTC joins tokens as they are */
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        zse_tokenizer *t = fixture_json(data, cases[c].name);
        if (!t)
            continue;
        int32_t *ids;
        size_t n;
        CHECK(zse_tokenizer_encode(t, cases[c].text, strlen(cases[c].text), false, false, &ids, &n) == 0);
        zse_buf all = {0};
        for (size_t k = 0; k < n; k++)
            CHECK(zse_tokenizer_token_bytes(t, ids[k], &all) == 0);
        char *dec = zse_tokenizer_decode(t, ids, n, false);
        size_t ll = strlen(cases[c].lead);
        CHECK_MSG(dec && all.len == strlen(dec) + ll && memcmp(all.data, cases[c].lead, ll) == 0 &&
                      memcmp(all.data + ll, dec, all.len - ll) == 0,
                  "%s: token bytes \"%s\" for decode \"%s\"", cases[c].name, zse_buf_str(&all), dec);
        free(dec);
        free(ids);
        zse_buf_free(&all);
        zse_tokenizer_free(t);
    }
    zse_tokenizer *wp = fixture_json(data, "wordpiece-bert");
    int32_t cont = -1, word = wp ? zse_tokenizer_token_id(wp, "the") : -1;
    for (int i = 0; wp && cont < 0 && i < zse_tokenizer_n_vocab(wp); i++)
        if (strncmp(zse_tokenizer_token_text(wp, i), "##", 2) == 0 && strlen(zse_tokenizer_token_text(wp, i)) > 3)
            cont = i;
    zse_buf b = {0};
    CHECK(cont >= 0 && zse_tokenizer_token_bytes(wp, cont, &b) == 0);
    CHECK_EQ_STR(zse_buf_str(&b), zse_tokenizer_token_text(wp, cont) + 2);
    b.len = 0;
    CHECK(word >= 0 && zse_tokenizer_token_bytes(wp, word, &b) == 0);
    CHECK_EQ_STR(zse_buf_str(&b), " the");
    b.len = 0;
    int32_t comma = wp ? zse_tokenizer_token_id(wp, ",") : -1; /* the decoder's cleanup joins it */
    CHECK(comma >= 0 && zse_tokenizer_token_bytes(wp, comma, &b) == 0);
    CHECK_EQ_STR(zse_buf_str(&b), ",");
    zse_tokenizer_free(wp);
    zse_tokenizer *ug = fixture_json(data, "unigram-albert");
    int32_t e6 = ug ? zse_tokenizer_token_id(ug, "<0xE6>") : -1;
    b.len = 0;
    CHECK(e6 >= 0 && zse_tokenizer_token_bytes(ug, e6, &b) == 0 && b.len == 1 && (unsigned char)b.data[0] == 0xE6);
    zse_tokenizer_free(ug);
    zse_tokenizer *ctc = fixture_json(data, "wordpiece-cased-ctc");
    int32_t pad = ctc ? zse_tokenizer_token_id(ctc, "[PAD]") : -1;
    b.len = 0;
    CHECK(pad >= 0 && zse_tokenizer_token_bytes(ctc, pad, &b) == 0 && b.len == 0); /* CTC drops its pad */
    zse_tokenizer_free(ctc);
    zse_buf_free(&b);
}

/* ---- random bytes everywhere -------------------------------------------------------------- */

static void random_bytes(const char *data, const zse_tokenizer *byte_level)
{
    static const char *const names[] = {"spm-bytefallback", "metaspace-nfkc", "subword-affixes", "split-behaviours",
                                        "punct-bytefallback", "added-normalized", "nfd-strip-replace", "unigram-t5",
                                        "unigram-albert", "wordpiece-bert", "wordpiece-cased-ctc"};
    enum { N_NAMES = sizeof names / sizeof names[0] };
    zse_tokenizer *ts[N_NAMES];
    for (int v = 0; v < N_NAMES; v++)
        ts[v] = fixture_json(data, names[v]);
    char buf[300];
    for (int round = 0; round < 300; round++) {
        size_t len = next_rand() % sizeof buf;
        for (size_t i = 0; i < len; i++)
            buf[i] = round % 3 ? (char)next_rand() : "<s>[MASK] \xe2\x96\x81\xc3"[next_rand() % 14];
        for (int v = 0; v < N_NAMES; v++) {
            int32_t *ids;
            size_t n;
            if (!ts[v])
                continue;
            CHECK(zse_tokenizer_encode(ts[v], buf, len, round & 1, round & 2, &ids, &n) == 0);
            char *text = zse_tokenizer_decode(ts[v], ids, n, round & 4);
            CHECK(text != NULL);
            free(text);
            free(ids);
        }
        /* byte-level with NFC: invalid sequences come back as U+FFFD, the rest as NFC */
        int32_t *ids;
        size_t n;
        CHECK(zse_tokenizer_encode(byte_level, buf, len, false, false, &ids, &n) == 0);
        char *back = zse_tokenizer_decode(byte_level, ids, n, false);
        CHECK_MSG(back && valid_utf8(back, strlen(back)), "round %d: decode is not valid UTF-8", round);
        free(back);
        free(ids);
    }
    for (int v = 0; v < N_NAMES; v++)
        zse_tokenizer_free(ts[v]);
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
        CHECK(zse_tokenizer_add_bos(t));
        CHECK_EQ_STR(zse_tokenizer_type(t), "bpe-bytelevel");
        CHECK_EQ_STR(zse_tokenizer_token_text(t, 4), "<|eot_id|>");
        CHECK_EQ_INT(zse_tokenizer_token_id(t, "<|eot_id|>"), 4);
        CHECK_EQ_INT(zse_tokenizer_token_id(t, "no such token"), -1);
        CHECK(zse_tokenizer_token_text(t, -1) == NULL && zse_tokenizer_token_text(t, 1 << 30) == NULL);
        random_round_trips(t);
        hostile_inputs(t);
        threads_share_one_tokenizer(t);
        random_bytes(data ? data : "tests/fixtures", t);
        token_bytes_concatenate(t, data ? data : "tests/fixtures");
        token_bytes_models(data ? data : "tests/fixtures");
    }
    zse_tokenizer_free(t);
    free(dir);
    streams(data ? data : "tests/fixtures");
    char *qdir = zse_path_join(data ? data : "tests/fixtures", "tiny-qwen2");
    check_goldens(qdir);
    zse_tokenizer *q = zse_tokenizer_from_dir(qdir);
    CHECK(q && !zse_tokenizer_add_bos(q) && zse_tokenizer_bos(q) == -1);
    zse_tokenizer_free(q);
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
