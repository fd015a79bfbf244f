/* Each pipeline component against Hugging Face `tokenizers` goldens
 * (tests/fixtures/tokenizers, made by tools/make_tokenizer_goldens.py): normalizers NFKC,
 * NFD, Lowercase, Strip, Replace, Prepend; pre-tokenizers Digits, Split behaviours,
 * Metaspace; SentencePiece-style BPE with byte fallback; added tokens with lstrip, rstrip,
 * single_word; decoders ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip. */
#include "test.h"

#include "tokenizer/tokenizer.h"

static const char *const names[] = {"nfkc-lowercase-digits", "nfd-strip-replace", "added-tokens",
                                    "spm-bytefallback", "metaspace-nfkc"};

static bool same_ids(const int32_t *ids, size_t n, const json_t *want)
{
    if (n != json_array_size(want))
        return false;
    for (size_t k = 0; k < n; k++)
        if (ids[k] != json_integer_value(json_array_get(want, k)))
            return false;
    return true;
}

int main(void)
{
    const char *data = test_env("ZSE_TEST_DATA");
    int cases = 0;
    for (size_t v = 0; v < sizeof names / sizeof names[0]; v++) {
        char path[512], gpath[512];
        snprintf(path, sizeof path, "%s/tokenizers/%s.json", data ? data : "tests/fixtures", names[v]);
        snprintf(gpath, sizeof gpath, "%s/tokenizers/%s.goldens.json", data ? data : "tests/fixtures", names[v]);
        size_t len;
        char *text = zse_read_file(path, &len);
        zse_tokenizer *t = text ? zse_tokenizer_from_json(text, len, NULL) : NULL;
        free(text);
        CHECK_MSG(t != NULL, "%s: %s", names[v], zse_error_message());
        json_error_t err;
        json_t *g = json_load_file(gpath, 0, &err);
        CHECK(g != NULL);
        size_t i;
        json_t *c;
        json_array_foreach(g, i, c) {
            if (!t)
                break;
            const char *s = json_string_value(json_object_get(c, "text"));
            int32_t *ids;
            size_t n;
            CHECK(zse_tokenizer_encode(t, s, strlen(s), false, true, &ids, &n) == 0);
            CHECK_MSG(same_ids(ids, n, json_object_get(c, "ids")), "%s: ids of \"%s\"", names[v], s);
            char *back = zse_tokenizer_decode(t, ids, n, false);
            const char *dec = json_string_value(json_object_get(c, "decoded"));
            CHECK_MSG(back && strcmp(back, dec) == 0, "%s: decode of \"%s\" gave \"%s\" not \"%s\"", names[v], s,
                      back, dec);
            free(back);
            free(ids);
            CHECK(zse_tokenizer_encode(t, s, strlen(s), true, true, &ids, &n) == 0);
            CHECK_MSG(same_ids(ids, n, json_object_get(c, "ids_with_special")), "%s: ids with special of \"%s\"",
                      names[v], s);
            free(ids);
            cases++;
        }
        json_decref(g);
        zse_tokenizer_free(t);
    }
    printf("pipeline golden cases: %d\n", cases);
    return test_main_end();
}
