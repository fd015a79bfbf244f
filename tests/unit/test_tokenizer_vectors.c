/* GGUF vocabularies against ../shared/tokenizer-vectors: every test string encodes to the
 * ids Hugging Face produced (no added special tokens, no special-token parsing), and
 * decodes back to itself where the vocabulary does not normalize. The first five
 * vocabularies must be there; the others (deepseek-llm, bert-bge: llama.cpp's vectors of
 * the same form) are checked when their files are. Skips (77) when ../shared is absent. */
#include "test.h"

#include "tokenizer/tokenizer.h"

static const struct {
    const char *name;
    bool required;
    bool round_trip; /* decode gives the text back (no normalizer) */
} vocabs[] = {
    {"gpt-2", true, true},        {"llama-spm", true, true},     {"deepseek-coder", true, true},
    {"falcon", true, true},       {"starcoder", true, true},
    /* deepseek-llm's added tokens for Latin letters ("ü", id 100014) go through the
     * ByteLevel decoder as HF's decode sends them, which reads U+00FC as the byte 0xFC */
    {"deepseek-llm", false, false},
    {"bert-bge", false, false}, /* lowercases and strips accents */
};
static int total_pass, total_cases;

static void check_vocab(const char *dir, const char *name, bool required, bool round_trip)
{
    char path[512], inp[560], outp[560];
    snprintf(path, sizeof path, "%s/ggml-vocab-%s.gguf", dir, name);
    if (!required && !zse_file_exists(path)) {
        printf("%s: absent, not checked\n", name);
        return;
    }
    snprintf(inp, sizeof inp, "%s.inp", path);
    snprintf(outp, sizeof outp, "%s.out", path);
    zse_tokenizer *t = zse_tokenizer_from_gguf(path);
    CHECK_MSG(t != NULL, "%s", zse_error_message());
    size_t il, ol;
    char *in = zse_read_file(inp, &il), *out = zse_read_file(outp, &ol);
    if (!t || !in || !out) {
        free(in), free(out), zse_tokenizer_free(t);
        return;
    }
    const char *sep = "\n__ggml_vocab_test__\n";
    char *s = in, *o = out;
    int pass = 0, cases = 0, round = 0;
    while (s && *s) {
        char *end = strstr(s, sep);
        size_t sl = end ? (size_t)(end - s) : strlen(s);
        char *nl = strchr(o, '\n');
        if (!nl)
            break;
        *nl = '\0';
        int32_t want[4096];
        int nw = 0;
        for (char *p = o; *p && nw < 4096;) {
            char *q;
            long v = strtol(p, &q, 10);
            if (q == p)
                break;
            want[nw++] = (int32_t)v;
            p = q;
        }
        int32_t *ids;
        size_t n;
        bool ok = zse_tokenizer_encode(t, s, sl, false, false, &ids, &n) == 0 && (int)n == nw &&
                  memcmp(ids, want, n * sizeof *ids) == 0;
        if (!ok && cases < 200)
            fprintf(stderr, "%s case %d: \"%.*s\" differs\n", name, cases, (int)(sl > 60 ? 60 : sl), s);
        if (ok) {
            char *back = zse_tokenizer_decode(t, ids, n, false);
            if (!round_trip || (back && strlen(back) == sl && memcmp(back, s, sl) == 0))
                round++;
            else
                fprintf(stderr, "%s case %d: decodes to \"%.60s\"\n", name, cases, back ? back : "(error)");
            free(back);
        }
        if (ids)
            free(ids);
        pass += ok;
        cases++;
        o = nl + 1;
        s = end ? end + strlen(sep) : NULL;
    }
    printf("%s: %d of %d vectors encode exactly; %d decode back to the same text\n", name, pass, cases, round);
    CHECK_MSG(pass == cases, "%s: %d of %d", name, pass, cases);
    CHECK_MSG(round == cases, "%s: %d of %d decode back", name, round, cases);
    total_pass += pass;
    total_cases += cases;
    free(in);
    free(out);
    zse_tokenizer_free(t);
}

int main(void)
{
    const char *shared = test_env("ZSE_SHARED");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/tokenizer-vectors", shared ? shared : "../shared");
    char probe[600];
    snprintf(probe, sizeof probe, "%s/ggml-vocab-gpt-2.gguf", dir);
    if (!zse_file_exists(probe)) {
        printf("skipped: %s is absent\n", dir);
        return 77;
    }
    for (size_t i = 0; i < sizeof vocabs / sizeof vocabs[0]; i++)
        check_vocab(dir, vocabs[i].name, vocabs[i].required, vocabs[i].round_trip);
    printf("all vocabularies: %d of %d vectors\n", total_pass, total_cases);
    /* add_bos_token: llama-spm adds <s> (1) when special tokens are added; gpt-2 does not */
    char spm[600];
    snprintf(spm, sizeof spm, "%s/ggml-vocab-llama-spm.gguf", dir);
    zse_tokenizer *t = zse_tokenizer_from_gguf(spm);
    int32_t *ids;
    size_t n;
    CHECK(t && zse_tokenizer_encode(t, "Hello", 5, true, false, &ids, &n) == 0 && n >= 2 && ids[0] == 1);
    if (t && n)
        free(ids);
    zse_tokenizer_free(t);
    t = zse_tokenizer_from_gguf(probe);
    CHECK(t && zse_tokenizer_encode(t, "Hello", 5, true, false, &ids, &n) == 0 && n == 1 && ids[0] == 15496);
    if (t)
        free(ids);
    zse_tokenizer_free(t);
    return test_main_end();
}
