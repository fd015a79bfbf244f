/* Each pipeline component against Hugging Face `tokenizers` goldens
 * (tests/fixtures/tokenizers, made by tools/make_tokenizer_goldens.py; index.json lists
 * them): normalizers NFKC, NFKD, NFD, Lowercase, Strip, Replace (string and regex),
 * Prepend; pre-tokenizers Split (every behaviour, invert), ByteLevel with prefix space,
 * Digits, Punctuation, Whitespace, WhitespaceSplit, CharDelimiterSplit, Metaspace (first,
 * always, no split); BPE with byte fallback, unk fusion, subword prefix and word suffix,
 * ignore_merges; added tokens special or not, normalized or not, lstrip, rstrip,
 * single_word; post-processors Template, Roberta, Bert; decoders ByteLevel, Metaspace,
 * Replace, ByteFallback, Fuse, Strip and none. Encode, decode, encode with special tokens
 * added, and decode of arbitrary id sequences. */
#include "test.h"

#include "tokenizer/tokenizer.h"

static bool same_ids(const int32_t *ids, size_t n, const json_t *want)
{
    if (n != json_array_size(want))
        return false;
    for (size_t k = 0; k < n; k++)
        if (ids[k] != json_integer_value(json_array_get(want, k)))
            return false;
    return true;
}

static int check_encode(const zse_tokenizer *t, const char *name, const json_t *cases)
{
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        const char *s = json_string_value(json_object_get(c, "text"));
        size_t sl = json_string_length(json_object_get(c, "text")); /* texts may hold NUL */
        int32_t *ids;
        size_t n;
        CHECK(zse_tokenizer_encode(t, s, sl, false, true, &ids, &n) == 0);
        CHECK_MSG(same_ids(ids, n, json_object_get(c, "ids")), "%s: ids of \"%s\"", name, s);
        char *back = zse_tokenizer_decode(t, ids, n, false);
        const char *dec = json_string_value(json_object_get(c, "decoded"));
        CHECK_MSG(back && strcmp(back, dec) == 0, "%s: decode of \"%s\" gave \"%s\" not \"%s\"", name, s, back, dec);
        free(back);
        free(ids);
        CHECK(zse_tokenizer_encode(t, s, sl, true, true, &ids, &n) == 0);
        CHECK_MSG(same_ids(ids, n, json_object_get(c, "ids_with_special")), "%s: ids with special of \"%s\"", name, s);
        free(ids);
    }
    return (int)json_array_size(cases);
}

static int check_decode(const zse_tokenizer *t, const char *name, const json_t *cases)
{
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        json_t *jids = json_object_get(c, "ids");
        int32_t ids[64];
        size_t n = json_array_size(jids);
        for (size_t k = 0; k < n && k < 64; k++)
            ids[k] = (int32_t)json_integer_value(json_array_get(jids, k));
        char *text = zse_tokenizer_decode(t, ids, n, json_is_true(json_object_get(c, "skip_special")));
        const char *want = json_string_value(json_object_get(c, "text"));
        CHECK_MSG(text && strcmp(text, want) == 0, "%s: decode case %zu gave \"%s\" not \"%s\"", name, i, text, want);
        free(text);
    }
    return (int)json_array_size(cases);
}

int main(void)
{
    const char *data = test_env("ZSE_TEST_DATA");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/tokenizers", data ? data : "tests/fixtures");
    char *index_path = zse_path_join(dir, "index.json");
    json_error_t err;
    json_t *index = json_load_file(index_path, 0, &err);
    CHECK_MSG(json_array_size(index) >= 10, "%s: %s", index_path, err.text);
    int n_enc = 0, n_dec = 0;
    size_t v;
    json_t *jname;
    json_array_foreach(index, v, jname) {
        const char *name = json_string_value(jname);
        char path[600], gpath[600];
        snprintf(path, sizeof path, "%s/%s.json", dir, name);
        snprintf(gpath, sizeof gpath, "%s/%s.goldens.json", dir, name);
        size_t len;
        char *text = zse_read_file(path, &len);
        zse_tokenizer *t = text ? zse_tokenizer_from_json(text, len, NULL) : NULL;
        free(text);
        CHECK_MSG(t != NULL, "%s: %s", name, zse_error_message());
        json_t *g = json_load_file(gpath, JSON_ALLOW_NUL, &err);
        CHECK_MSG(g != NULL, "%s: %s", gpath, err.text);
        if (t && g) {
            n_enc += check_encode(t, name, json_object_get(g, "encode"));
            n_dec += check_decode(t, name, json_object_get(g, "decode"));
        }
        json_decref(g);
        zse_tokenizer_free(t);
    }
    json_decref(index);
    free(index_path);
    printf("pipeline golden cases: %d encode, %d decode\n", n_enc, n_dec);
    return test_main_end();
}
