/* The .zse writer and reader: every header field after a conversion, the quantization
 * policy for each recipe, values after a round trip, sharded input, damage to every
 * region of a file (each check of the reader reached on its own by repairing the
 * checksums around the damage), verify naming the damaged tensor, and conversions that
 * fail or are interrupted leaving nothing behind. */
#include "format_testlib.h"

#include <fcntl.h>
#include <dirent.h>
#include <regex.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>

static zse_convert_opts opts(zse_scheme scheme, int group)
{
    zse_convert_opts o = {.scheme = scheme, .group_size = group, .embed_scheme = -1,
                          .lm_head_scheme = -1, .threads = 2};
    return o;
}

static json_t *load_json(const char *dir, const char *name)
{
    char path[600];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    json_error_t e;
    json_t *j = json_load_file(path, 0, &e);
    if (!j) /* tokenizer_config's 1e30: compare as the normalizer loads it */
        j = json_load_file(path, JSON_DECODE_INT_AS_REAL, &e);
    return j;
}

static const json_t *entry_of(const zse_file *f, const char *name)
{
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(zse_file_header(f), "tensors"), i, e)
        if (strcmp(json_string_value(json_object_get(e, "name")), name) == 0)
            return e;
    return NULL;
}

/* ---- every field of a converted file ------------------------------------------------ */

static void check_preamble(const char *path, const zse_file *f)
{
    size_t n;
    uint8_t *d = tl_read(path, &n);
    CHECK(memcmp(d, "ZSEMODEL", 8) == 0);
    CHECK(d[8] == 1 && d[9] == 0 && d[10] == 0 && d[11] == 0);
    CHECK(d[12] == 0 && d[13] == 0 && d[14] == 0 && d[15] == 0);
    CHECK_EQ_INT(tl_rd64(d + 16), 64);
    uint64_t hsize = tl_rd64(d + 24), data_offset = tl_rd64(d + 40);
    CHECK(tl_rd64(d + 32) == zse_hash64(d + 64, (size_t)hsize));
    CHECK(data_offset % 4096 == 0 && data_offset >= 64 + hsize && data_offset - (64 + hsize) < 4096);
    for (uint64_t i = 64 + hsize; i < data_offset; i++)
        if (d[i] != 0) {
            CHECK_MSG(false, "padding byte %llu is not zero", (unsigned long long)i);
            break;
        }
    CHECK_EQ_INT(tl_rd64(d + 48), n);
    CHECK(tl_rd64(d + 56) == zse_hash64(d, 56));
    CHECK_EQ_INT(zse_file_size(f), n);
    CHECK(zse_file_base(f) != NULL && memcmp(zse_file_base(f), "ZSEMODEL", 8) == 0);
    free(d);
}

static void check_provenance(const json_t *prov, const char *dir)
{
    const char *expect[] = {"model.safetensors", "tokenizer.json", "config.json",
                            "generation_config.json", "tokenizer_config.json"};
    json_t *files = json_object_get(prov, "source_files");
    CHECK_EQ_INT(json_array_size(files), 5);
    for (size_t k = 0; k < 5; k++) {
        char path[600], sha[65];
        snprintf(path, sizeof path, "%s/%s", dir, expect[k]);
        CHECK(zse_sha256_file(path, sha) == 0);
        size_t size;
        free(tl_read(path, &size));
        bool found = false;
        size_t i;
        json_t *e;
        json_array_foreach(files, i, e) {
            if (strcmp(json_string_value(json_object_get(e, "name")), expect[k]) != 0)
                continue;
            found = true;
            CHECK_EQ_STR(json_string_value(json_object_get(e, "sha256")), sha);
            CHECK_EQ_INT(json_integer_value(json_object_get(e, "size")), size);
        }
        CHECK_MSG(found, "%s not in provenance", expect[k]);
    }
    CHECK_EQ_STR(json_string_value(json_object_get(prov, "zse_version")), ZSE_VERSION);
    regex_t re;
    regcomp(&re, "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$", REG_EXTENDED | REG_NOSUB);
    const char *created = json_string_value(json_object_get(prov, "created"));
    CHECK(created && regexec(&re, created, 0, NULL, 0) == 0);
    regfree(&re);
}

static void check_directory(const zse_file *f, const zse_config *c)
{
    uint64_t end = 0;
    int64_t rank = -1;
    size_t tok_len;
    const char *tok = zse_file_tokenizer_json(f, &tok_len);
    CHECK(tok != NULL);
    const uint8_t *base = zse_file_base(f);
    for (size_t i = 0; i < zse_file_n_tensors(f); i++) {
        const zse_tensor_info *t = zse_file_tensor_at(f, i);
        const json_t *e = entry_of(f, t->name);
        CHECK(zse_canonical_rank(t->name) > rank); /* forward order */
        rank = zse_canonical_rank(t->name);
        char *canon = zse_hf_canonical_name(c, json_string_value(json_object_get(e, "source")));
        CHECK_MSG(canon && strcmp(canon, t->name) == 0, "source of %s", t->name);
        free(canon);
        CHECK(t->layout == zse_scheme_layout(t->q.scheme));
        CHECK_EQ_INT(json_integer_value(json_object_get(e, "layout")), t->layout);
        CHECK_EQ_STR(json_string_value(json_object_get(e, "scheme")), zse_scheme_name(t->q.scheme));
        CHECK(t->q.group_size == (t->layout == ZSE_LAYOUT_Q4_G ? t->q.group_size : 0));
        CHECK(t->offset % ZSE_TENSOR_ALIGN == 0);
        CHECK(t->offset >= (uint64_t)((const uint8_t *)tok - base) + tok_len); /* after the blob */
        CHECK(t->offset >= end);                                            /* no overlap */
        CHECK(t->offset - end < ZSE_TENSOR_ALIGN || end == 0);              /* no gaps */
        end = t->offset + t->size;
        CHECK_EQ_INT(t->size, zse_qshape_bytes(&t->q));
        CHECK(t->checksum == zse_hash64(t->data, (size_t)t->size));
        CHECK(t->data == base + t->offset);
        char hex[17];
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)t->checksum);
        CHECK_EQ_STR(json_string_value(json_object_get(e, "checksum")), hex);
        CHECK(zse_check_tensor_shape(c, t->name, t->q.rows, t->q.cols) == 0);
    }
    CHECK_EQ_INT(end, zse_file_size(f));
    CHECK(zse_file_tensor(f, "no.such.tensor") == NULL);
    CHECK(zse_file_tensor_at(f, zse_file_n_tensors(f)) == NULL);
}

static void test_header_fields(const char *dir, const char *out)
{
    const char *keep[] = {"blk.1.ffn_down*", "model.layers.0.mlp.up_proj.weight"};
    zse_convert_opts o = opts(ZSE_SCHEME_Q4, 32);
    o.keep_fp16 = keep;
    o.n_keep_fp16 = 2;
    CHECK_MSG(zse_convert(dir, out, &o) == 0, "%s", zse_error_message());
    zse_file *f = zse_file_open(out);
    CHECK_MSG(f != NULL, "%s", zse_error_message());
    if (!f)
        return;
    zse_hf_dir hf;
    CHECK(zse_hf_open(&hf, dir) == 0);
    const json_t *h = zse_file_header(f);
    CHECK_EQ_STR(json_string_value(json_object_get(h, "format")), "zse");
    json_t *ver = json_object_get(h, "version");
    CHECK(json_integer_value(json_array_get(ver, 0)) == 1 && json_integer_value(json_array_get(ver, 1)) == 0);
    json_t *cfg = zse_config_to_json(&hf.config);
    CHECK(json_equal(cfg, json_object_get(h, "config")));
    json_decref(cfg);
    CHECK(memcmp(zse_file_config(f), &hf.config, sizeof hf.config) == 0);
    CHECK(zse_file_config(f)->tie_embeddings);
    json_t *tc = load_json(dir, "tokenizer_config.json"), *gen = load_json(dir, "generation_config.json");
    CHECK(json_equal(tc, zse_file_tokenizer_config(f)));
    CHECK(json_equal(gen, zse_file_generation(f)));
    json_decref(tc);
    json_decref(gen);
    CHECK_EQ_STR(zse_file_chat_template(f), "{{ messages[0]['content'] }}");
    CHECK_EQ_STR(json_string_value(json_object_get(h, "tokenizer_type")), "bpe-bytelevel");
    json_t *q = json_object_get(h, "quant");
    CHECK_EQ_STR(json_string_value(json_object_get(q, "scheme")), "int4");
    CHECK_EQ_INT(json_integer_value(json_object_get(q, "group_size")), 32);
    CHECK_EQ_STR(json_string_value(json_object_get(q, "embed")), "int8");
    CHECK(json_is_null(json_object_get(q, "lm_head"))); /* tied */
    CHECK_EQ_INT(json_array_size(json_object_get(q, "keep_fp16")), 2);
    CHECK_EQ_STR(json_string_value(json_array_get(json_object_get(q, "keep_fp16"), 0)), "blk.1.ffn_down*");
    check_provenance(json_object_get(h, "provenance"), dir);
    size_t tl;
    const char *tj = zse_file_tokenizer_json(f, &tl);
    CHECK(tj && tl == strlen(tl_tokenizer_json) && memcmp(tj, tl_tokenizer_json, tl) == 0);
    /* tied: no lm_head stored */
    CHECK(zse_file_tensor(f, "output.weight") == NULL);
    CHECK_EQ_INT(zse_file_n_tensors(f), 2 + 2 * 12);
    CHECK(zse_file_tensor(f, "blk.1.ffn_down.weight")->q.scheme == ZSE_SCHEME_F16);
    CHECK(zse_file_tensor(f, "blk.0.ffn_up.weight")->q.scheme == ZSE_SCHEME_F16); /* by HF name */
    CHECK(zse_file_tensor(f, "blk.1.ffn_up.weight")->q.scheme == ZSE_SCHEME_Q4);
    check_preamble(out, f);
    check_directory(f, &hf.config);
    int nbad = -1;
    CHECK(zse_file_verify(f, &nbad) == 0 && nbad == 0);
    CHECK_EQ_STR(zse_file_path(f), out);
    zse_hf_close(&hf);
    zse_file_close(f);
}

/* ---- policy and values per recipe ------------------------------------------------------ */

static double rel_rms(const zse_tensor_info *t, const zse_st_tensor *src)
{
    int64_t rows = t->q.rows, cols = t->q.cols;
    float *a = malloc((size_t)cols * sizeof *a), *b = malloc((size_t)cols * sizeof *b);
    double num = 0, den = 0;
    for (int64_t r = 0; r < rows; r++) {
        zse_st_read_f32(src, (size_t)(r * cols), (size_t)cols, a);
        zse_dequantize_row(&t->q, t->data, r, b);
        for (int64_t c = 0; c < cols; c++) {
            num += (double)(a[c] - b[c]) * (a[c] - b[c]);
            den += (double)a[c] * a[c];
        }
    }
    free(a);
    free(b);
    return den > 0 ? sqrt(num / den) : 0;
}

static void test_policy(const char *dir)
{
    static const struct {
        zse_scheme recipe;
        int group;
        zse_scheme embed, linear;
        double max_err;     /* relative RMS error of a linear weight after a round trip */
    } cases[] = {
        {ZSE_SCHEME_F32, 0, ZSE_SCHEME_F32, ZSE_SCHEME_F32, 0},
        {ZSE_SCHEME_BF16, 0, ZSE_SCHEME_BF16, ZSE_SCHEME_BF16, 0},
        {ZSE_SCHEME_F16, 0, ZSE_SCHEME_F16, ZSE_SCHEME_F16, 1e-3},
        {ZSE_SCHEME_Q8, 0, ZSE_SCHEME_Q8, ZSE_SCHEME_Q8, 0.01},
        {ZSE_SCHEME_Q4, 64, ZSE_SCHEME_Q8, ZSE_SCHEME_Q4, 0.12},
        {ZSE_SCHEME_Q4S, 32, ZSE_SCHEME_Q8, ZSE_SCHEME_Q4S, 0.12},
        {ZSE_SCHEME_NF4, 128, ZSE_SCHEME_Q8, ZSE_SCHEME_NF4, 0.12},
        {ZSE_SCHEME_Q8G, 32, ZSE_SCHEME_Q8, ZSE_SCHEME_Q8G, 0.01},
    };
    zse_safetensors st;
    CHECK(zse_st_open(&st, dir) == 0);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *out = tl_path("policy-%zu.zse", i);
        zse_convert_opts o = opts(cases[i].recipe, cases[i].group ? cases[i].group : 128);
        CHECK_MSG(zse_convert(dir, out, &o) == 0, "%s", zse_error_message());
        zse_file *f = zse_file_open(out);
        CHECK(f != NULL);
        if (!f)
            continue;
        const zse_tensor_info *emb = zse_file_tensor(f, "token_embd.weight");
        const zse_tensor_info *lm = zse_file_tensor(f, "output.weight");
        const zse_tensor_info *wq = zse_file_tensor(f, "blk.0.attn_q.weight");
        CHECK_MSG(emb->q.scheme == cases[i].embed, "recipe %s: embeddings %s",
                  zse_scheme_name(cases[i].recipe), zse_scheme_name(emb->q.scheme));
        CHECK(lm && lm->q.scheme == cases[i].linear);   /* lm_head follows the recipe */
        CHECK(wq->q.scheme == cases[i].linear);
        if (cases[i].group)
            CHECK_EQ_INT(wq->q.group_size, cases[i].group);
        /* a file is the oldest version that has what it holds: int8g came with 2.0 */
        const uint8_t *base = zse_file_base(f);
        json_t *ver = json_object_get(zse_file_header(f), "version");
        int major = cases[i].recipe == ZSE_SCHEME_Q8G ? 2 : 1;
        CHECK_MSG(base[8] == major && json_integer_value(json_array_get(ver, 0)) == major, "recipe %s: version %d",
                  zse_scheme_name(cases[i].recipe), base[8]);
        if (major == 2) { /* marked 1.0, an int8g tensor is refused rather than misread */
            const char *old = tl_path("int8g-as-1.zse");
            tl_patch_preamble(out, old, 8, 2, 1);
            zse_file *g = zse_file_open(old);
            CHECK_MSG(!g && tl_has("int8g, which format 1.x does not have"), "%s", zse_error_message());
            zse_file_close(g);
        }
        CHECK(zse_file_tensor(f, "blk.1.attn_norm.weight")->q.scheme == ZSE_SCHEME_F32);
        CHECK(zse_file_tensor(f, "blk.1.attn_v.bias")->q.scheme == ZSE_SCHEME_F32);
        CHECK(zse_file_tensor(f, "output_norm.weight")->q.scheme == ZSE_SCHEME_F32);
        const zse_st_tensor *src = zse_st_find(&st, "model.layers.0.self_attn.q_proj.weight");
        double err = rel_rms(wq, src);
        CHECK_MSG(err <= cases[i].max_err, "recipe %s: error %g > %g", zse_scheme_name(cases[i].recipe),
                  err, cases[i].max_err);
        if (cases[i].recipe == ZSE_SCHEME_BF16) /* pass-through is bit exact */
            CHECK(wq->size == src->size && memcmp(wq->data, src->data, src->size) == 0);
        if (zse_scheme_is_quantized(cases[i].recipe))
            CHECK(rel_rms(emb, zse_st_find(&st, "model.embed_tokens.weight")) < 0.01);
        /* norms are exact */
        CHECK(rel_rms(zse_file_tensor(f, "blk.1.attn_norm.weight"),
                      zse_st_find(&st, "model.layers.1.input_layernorm.weight")) == 0);
        zse_file_close(f);
    }
    zse_st_close(&st);

    /* overrides: embedding and lm_head schemes, keep-fp16 on the lm_head by its HF name */
    zse_convert_opts o = opts(ZSE_SCHEME_Q4, 128);
    o.embed_scheme = ZSE_SCHEME_F16;
    o.lm_head_scheme = ZSE_SCHEME_Q8;
    const char *out = tl_path("override.zse");
    CHECK(zse_convert(dir, out, &o) == 0);
    zse_file *f = zse_file_open(out);
    CHECK(f && zse_file_tensor(f, "token_embd.weight")->q.scheme == ZSE_SCHEME_F16);
    CHECK(f && zse_file_tensor(f, "output.weight")->q.scheme == ZSE_SCHEME_Q8);
    CHECK(f && strcmp(json_string_value(json_object_get(json_object_get(zse_file_header(f), "quant"),
                                                        "lm_head")), "int8") == 0);
    zse_file_close(f);
    const char *keep[] = {"lm_head.weight"};
    o = opts(ZSE_SCHEME_NF4, 64);
    o.keep_fp16 = keep;
    o.n_keep_fp16 = 1;
    o.force = true;
    CHECK(zse_convert(dir, out, &o) == 0);
    f = zse_file_open(out);
    CHECK(f && zse_file_tensor(f, "output.weight")->q.scheme == ZSE_SCHEME_F16);
    zse_file_close(f);
}

/* sharded input gives the same tensors as one file */
static void test_sharded(const char *single_dir)
{
    tl_model m;
    tl_default_model(&m);
    m.untied = true;
    m.shards = 3;
    const char *dir = tl_path("sharded-model");
    tl_make_hf_dir(dir, &m);
    const char *a = tl_path("sharded-a.zse"), *b = tl_path("sharded-b.zse");
    zse_convert_opts o = opts(ZSE_SCHEME_Q4S, 32);
    CHECK_MSG(zse_convert(dir, a, &o) == 0, "%s", zse_error_message());
    CHECK(zse_convert(single_dir, b, &o) == 0);
    zse_file *fa = zse_file_open(a), *fb = zse_file_open(b);
    CHECK(fa && fb && zse_file_n_tensors(fa) == zse_file_n_tensors(fb));
    for (size_t i = 0; fa && fb && i < zse_file_n_tensors(fa); i++) {
        const zse_tensor_info *x = zse_file_tensor_at(fa, i), *y = zse_file_tensor_at(fb, i);
        CHECK_MSG(strcmp(x->name, y->name) == 0 && x->checksum == y->checksum, "%s", x->name);
    }
    /* the index is part of the provenance */
    json_t *files = json_object_get(json_object_get(zse_file_header(fa), "provenance"), "source_files");
    bool has_index = false;
    size_t i;
    json_t *e;
    json_array_foreach(files, i, e)
        has_index |= strcmp(json_string_value(json_object_get(e, "name")), "model.safetensors.index.json") == 0;
    CHECK(has_index && json_array_size(files) == 3 + 5);
    zse_file_close(fa);
    zse_file_close(fb);
}

/* ---- damage ------------------------------------------------------------------------- */

static void expect_refused(const char *path, const char *needle, const char *what)
{
    zse_file *f = zse_file_open(path);
    CHECK_MSG(f == NULL, "%s: accepted", what);
    zse_file_close(f);
    if (!f) {
        CHECK_MSG(tl_has(needle), "%s: '%s' not in: %s", what, needle, zse_error_message());
        CHECK_MSG(tl_has("bad.zse"), "%s: file not named: %s", what, zse_error_message());
    }
}

static void test_preamble_damage(const char *good)
{
    const char *bad = tl_path("bad.zse");
    size_t n;
    uint8_t *d = tl_read(good, &n);
    uint64_t data_offset = tl_rd64(d + 40), hsize = tl_rd64(d + 24);
    free(d);
    /* any flipped preamble byte: the magic, or the preamble checksum, catches it */
    for (long at = 0; at < 64; at++) {
        tl_copy(good, bad, -1, at);
        /* magic and major come first: a new major may lay the rest out differently */
        expect_refused(bad, at < 8 ? "not a .zse file" : at < 10 ? "format" : "preamble checksum",
                       "preamble flip");
    }
    /* each field wrong with the checksum repaired: its own check catches it */
    tl_patch_preamble(good, bad, 8, 2, 3);
    expect_refused(bad, "newer than this zse reads", "major 3");
    /* a dense file marked 2.0 reads as it is (2.0 adds expert banks, which it has none of) */
    tl_patch_preamble(good, bad, 8, 2, 2);
    zse_file *two = zse_file_open(bad);
    CHECK_MSG(two != NULL && zse_file_major(two) == 2, "%s", zse_error_message());
    zse_file_close(two);
    tl_patch_preamble(good, bad, 8, 2, 0);
    expect_refused(bad, "not valid", "major 0");
    tl_patch_preamble(good, bad, 16, 8, 32);
    expect_refused(bad, "header region", "header inside the preamble");
    tl_patch_preamble(good, bad, 24, 8, UINT64_MAX - 10);
    expect_refused(bad, "header region", "header size overflowing");
    tl_patch_preamble(good, bad, 24, 8, data_offset);
    expect_refused(bad, "header region", "header running into the data");
    tl_patch_preamble(good, bad, 24, 8, hsize - 1);
    expect_refused(bad, "header checksum", "header one byte short");
    tl_patch_preamble(good, bad, 32, 8, 12345);
    expect_refused(bad, "header checksum", "header checksum");
    tl_patch_preamble(good, bad, 40, 8, data_offset + 100);
    expect_refused(bad, "header region", "misaligned data offset");
    tl_patch_preamble(good, bad, 40, 8, UINT64_MAX & ~4095ull);
    expect_refused(bad, "header region", "data offset past the end");
    tl_patch_preamble(good, bad, 48, 8, n + 4096);
    expect_refused(bad, "truncated", "file size larger");
    /* a newer minor version and unknown flags are read */
    tl_patch_preamble(good, bad, 10, 2, 9);
    zse_file *f = zse_file_open(bad);
    CHECK_MSG(f != NULL, "minor 9 refused: %s", zse_error_message());
    zse_file_close(f);
    tl_patch_preamble(good, bad, 12, 4, 0x80000001u);
    f = zse_file_open(bad);
    CHECK_MSG(f != NULL, "flags refused: %s", zse_error_message());
    zse_file_close(f);
    /* truncation anywhere */
    long cuts[] = {0, 7, 8, 63, 64, 65, 200, (long)data_offset - 1, (long)data_offset,
                   (long)data_offset + 4096, (long)n / 2, (long)n - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        tl_copy(good, bad, cuts[i], -1);
        expect_refused(bad, cuts[i] < 64 ? "not a .zse file" : "truncated", "truncation");
    }
    /* flipped header bytes: the header checksum */
    for (long at = 64; at < (long)(64 + hsize); at += 97) {
        tl_copy(good, bad, -1, at);
        expect_refused(bad, "header checksum", "header flip");
    }
    /* not a .zse at all */
    tl_write(bad, "", 0);
    expect_refused(bad, "not a .zse file", "empty file");
    CHECK(zse_file_open(tl_tmpdir) == NULL && tl_has("not a regular file"));
}

/* header edits, written back with valid checksums */
typedef struct {
    const char *tensor;     /* entry to change, or NULL for the top level */
    const char *key;
    const char *value;      /* JSON text; NULL deletes the key */
} edit;

static void apply_edit(json_t *h, const void *arg)
{
    const edit *e = arg;
    json_t *target = h;
    if (e->tensor && strcmp(e->tensor, "config") == 0) {
        target = json_object_get(h, "config");
    } else if (e->tensor && strcmp(e->tensor, "tokenizer.json") == 0) {
        target = json_object_get(json_object_get(h, "blobs"), "tokenizer.json");
    } else if (e->tensor) {
        size_t i;
        json_t *t;
        json_array_foreach(json_object_get(h, "tensors"), i, t)
            if (strcmp(json_string_value(json_object_get(t, "name")), e->tensor) == 0)
                target = t;
    }
    if (!e->value) {
        json_object_del(target, e->key);
        return;
    }
    json_error_t err;
    json_t *v = json_loads(e->value, JSON_DECODE_ANY, &err);
    json_object_set_new(target, e->key, v ? v : json_string(e->value));
}

static void test_header_damage(const char *good)
{
    const char *bad = tl_path("bad.zse");
    zse_file *f = zse_file_open(good);
    const zse_tensor_info *t = zse_file_tensor(f, "blk.0.ffn_up.weight");
    char past_end[64], misaligned[64], inside_header[64], big_size[64], prev_offset[64];
    snprintf(past_end, sizeof past_end, "%llu", (unsigned long long)(zse_file_size(f) - 4096 + 4096));
    snprintf(misaligned, sizeof misaligned, "%llu", (unsigned long long)(t->offset + 64));
    snprintf(inside_header, sizeof inside_header, "%d", 0);
    snprintf(big_size, sizeof big_size, "%llu", (unsigned long long)INT64_MAX);
    snprintf(prev_offset, sizeof prev_offset, "%llu",
             (unsigned long long)zse_file_tensor(f, "token_embd.weight")->offset);
    zse_file_close(f);
    const struct { edit e; const char *needle; } cases[] = {
        {{"blk.0.ffn_up.weight", "offset", past_end}, "outside the file"},
        {{"blk.0.ffn_up.weight", "offset", "9223372036854771712"}, "outside the file"},
        {{"blk.0.ffn_up.weight", "offset", misaligned}, "misaligned"},
        {{"blk.0.ffn_up.weight", "offset", inside_header}, "outside the file"},
        {{"blk.0.ffn_up.weight", "offset", "-4096"}, "lacks offset"},
        {{"blk.0.ffn_up.weight", "offset", "\"4096\""}, "lacks offset"},
        {{"blk.0.ffn_up.weight", "size", big_size}, "shape needs"},
        {{"blk.0.ffn_up.weight", "size", "1"}, "shape needs"},
        {{"blk.0.ffn_up.weight", "shape", "[4294967296,4294967296]"}, "too large"},
        {{"blk.0.ffn_up.weight", "shape", "[-80,32]"}, "shape"},
        {{"blk.0.ffn_up.weight", "shape", "[0,32]"}, "shape"},
        {{"blk.0.ffn_up.weight", "shape", "[80]"}, "2-element shape"},
        {{"blk.0.ffn_up.weight", "shape", "[\"80\",32]"}, "malformed shape"},
        {{"blk.0.attn_norm.weight", "shape", "[2,16]"}, "the config"}, /* same bytes, wrong shape */
        {{"blk.0.ffn_up.weight", "scheme", "\"int3\""}, "unknown scheme"},
        {{"blk.0.ffn_up.weight", "scheme", "\"int8\""}, "layout"},
        {{"blk.0.ffn_up.weight", "layout", "1"}, "layout"},
        {{"blk.1.ffn_up.weight", "group_size", "48"}, "group size"},
        {{"blk.1.ffn_up.weight", "group_size", "4294967328"}, "group size"},
        {{"blk.1.ffn_up.weight", "group_size", "64"}, "shape needs"},
        {{"blk.0.ffn_up.weight", "group_size", "32"}, "group size"}, /* an f16 tensor */
        {{"blk.0.ffn_up.weight", "checksum", "\"12345\""}, "checksum"},
        {{"blk.0.ffn_up.weight", "checksum", "\"zzzzzzzzzzzzzzzz\""}, "checksum"},
        {{"blk.0.ffn_up.weight", "checksum", NULL}, "checksum"},
        {{"blk.0.ffn_up.weight", "name", NULL}, "lacks name"},
        {{"blk.0.ffn_up.weight", "name", "\"blk.0.ffn_gate.weight\""}, "appears twice"},
        {{"blk.0.ffn_up.weight", "offset", prev_offset}, NULL}, /* overlap: bytes shared, still in bounds */
        {{NULL, "tensors", "[]"}, "no tensors"},
        {{NULL, "tensors", "{}"}, "no tensors"},
        {{NULL, "blobs", NULL}, "tokenizer.json blob"},
        {{"tokenizer.json", "offset", past_end}, "tokenizer.json blob"},
        {{"tokenizer.json", "offset", "4097"}, "tokenizer.json blob"},
        {{"tokenizer.json", "size", big_size}, "tokenizer.json blob"},
        {{"tokenizer.json", "checksum", "\"x\""}, "tokenizer.json blob"},
        {{NULL, "config", NULL}, "config"},
        {{"config", "n_layers", NULL}, "n_layers"},
        {{"config", "hidden_size", "64"}, "the config"},
        {{"config", "vocab_size", "1000"}, "the config"},
        {{"config", "head_dim", "5"}, "inconsistent"},
        {{"config", "rope_theta", "-1"}, "rope_theta"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        bool fits = tl_edit_header(good, bad, apply_edit, &cases[i].e);
        CHECK_MSG(fits, "case %zu: edited header does not fit", i);
        if (!fits)
            continue;
        if (!cases[i].needle) {
            zse_file *g = zse_file_open(bad);
            zse_file_close(g);
            continue;
        }
        char what[128];
        snprintf(what, sizeof what, "case %zu (%s.%s)", i, cases[i].e.tensor ? cases[i].e.tensor : "",
                 cases[i].e.key);
        expect_refused(bad, cases[i].needle, what);
    }
    /* unknown keys anywhere are ignored */
    const edit extra[] = {{NULL, "future", "{\"x\":[1,2,3]}"}, {"blk.0.ffn_up.weight", "future", "1"},
                          {"config", "future", "true"}};
    for (size_t i = 0; i < sizeof extra / sizeof extra[0]; i++) {
        CHECK(tl_edit_header(good, bad, apply_edit, &extra[i]));
        zse_file *g = zse_file_open(bad);
        CHECK_MSG(g != NULL, "unknown key refused: %s", zse_error_message());
        zse_file_close(g);
    }
}

static void test_verify(const char *good)
{
    const char *bad = tl_path("bad.zse");
    zse_file *f = zse_file_open(good);
    uint64_t off = zse_file_tensor(f, "blk.1.ffn_gate.weight")->offset;
    size_t tl;
    const char *tok = zse_file_tokenizer_json(f, &tl);
    uint64_t tok_off = (uint64_t)(tok - (const char *)zse_file_base(f));
    uint64_t last = zse_file_size(f) - 1;
    zse_file_close(f);
    int nbad;
    /* a flipped byte inside a tensor: open is fine (data is not read), verify names it */
    tl_copy(good, bad, -1, (long)off + 17);
    f = zse_file_open(bad);
    CHECK(f != NULL);
    CHECK(f && zse_file_verify(f, &nbad) == -1 && nbad == 1);
    CHECK(tl_has("'blk.1.ffn_gate.weight'"));
    zse_file_close(f);
    /* the last byte of the file (the lm_head or final norm) */
    tl_copy(good, bad, -1, (long)last);
    f = zse_file_open(bad);
    CHECK(f && zse_file_verify(f, &nbad) == -1 && nbad == 1);
    zse_file_close(f);
    /* the tokenizer blob: verify fails and reading it is refused */
    tl_copy(good, bad, -1, (long)tok_off + 3);
    f = zse_file_open(bad);
    CHECK(f != NULL);
    CHECK(f && zse_file_verify(f, &nbad) == -1 && tl_has("tokenizer.json"));
    CHECK(f && zse_file_tokenizer_json(f, &tl) == NULL && tl_has("checksum"));
    zse_file_close(f);
}

/* docs/FORMAT.md's worked example of the Q4_G layout, byte for byte */
static void test_layout_example(void)
{
    zse_qshape q = {ZSE_SCHEME_Q4S, 1, 40, 32};
    float w[40];
    for (int c = 0; c < 40; c++)
        w[c] = (float)(c - 20) / 10.0f;
    CHECK_EQ_INT(zse_qshape_cols_padded(&q), 64);
    size_t n = zse_qshape_bytes(&q);
    CHECK_EQ_INT(n, 68);
    uint8_t *b = calloc(1, n);
    zse_quantize_rows(&q, w, b, 0, 1);
    CHECK_EQ_INT(b[0], 0x60);
    uint16_t s0 = (uint16_t)(b[64] | b[65] << 8), s1 = (uint16_t)(b[66] | b[67] << 8);
    CHECK_NEAR(zse_f16_to_f32(s0), 0.2375, 1e-4);
    CHECK_NEAR(zse_f16_to_f32(s1), 1.9 / 7 * 0.95, 1e-3);
    /* element c: byte (c / 32) * 16 + c % 16, high nibble when c % 32 >= 16 */
    for (int c = 0; c < 40; c++) {
        int byte = b[(c / 32) * 16 + c % 16], code = c % 32 < 16 ? byte & 15 : byte >> 4;
        float s = zse_f16_to_f32(c < 32 ? s0 : s1);
        float out[40];
        zse_dequantize_row(&q, b, 0, out);
        CHECK_NEAR(out[c], (code - 8) * s, 0);
    }
    free(b);
}

/* ---- conversions that fail ----------------------------------------------------------- */

/* names in the temp dir other than the ones a test made on purpose */
static int count_entries(const char *dir, const char *prefix)
{
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0)
            n++;
    if (d)
        closedir(d);
    return n;
}

static void test_failures(const char *dir)
{
    const char *out = tl_path("fail.zse");
    zse_convert_opts o = opts(ZSE_SCHEME_Q4, 128);
    CHECK(zse_convert(dir, out, &o) == 0);
    CHECK(zse_convert(dir, out, &o) == -1 && tl_has("already exists") && tl_has("--force"));
    o.force = true;
    CHECK(zse_convert(dir, out, &o) == 0);
    CHECK(zse_convert(dir, tl_path("no/such/dir/x.zse"), &o) == -1 && tl_has("no/such/dir"));
    CHECK(zse_convert(tl_path("missing-model"), tl_path("x.zse"), &o) == -1 && tl_has("config.json"));
    CHECK_EQ_INT(count_entries(tl_tmpdir, "x.zse"), 0);

    /* checkpoints that do not match their config: named */
    tl_model m;
    tl_default_model(&m);
    const char *mdir = tl_path("mismatch");
    tl_make_hf_dir(mdir, &m);
    char path[600];
    snprintf(path, sizeof path, "%s/config.json", mdir);
    size_t n;
    char *cfg = (char *)tl_read(path, &n);
    char *p = strstr(cfg, "\"intermediate_size\":80");
    memcpy(p, "\"intermediate_size\":81", 22);
    tl_write_text(path, cfg);
    free(cfg);
    CHECK(zse_convert(mdir, tl_path("x.zse"), &o) == -1);
    CHECK(tl_has("ffn_gate") && tl_has("needs 81 x 32") && tl_has("model.safetensors"));
    /* a tensor the architecture does not have, one missing, an integer tensor, no weights */
    const tl_spec extra[] = {{"model.embed_tokens.weight", 96, 32, NULL}, {"model.vision.proj", 4, 4, NULL}};
    snprintf(path, sizeof path, "%s/model.safetensors", mdir);
    tl_default_model(&m);
    tl_make_hf_dir(mdir, &m);
    tl_write_safetensors(path, extra, 2, 0);
    CHECK(zse_convert(mdir, tl_path("x.zse"), &o) == -1 && tl_has("model.vision.proj"));
    tl_write_safetensors(path, extra, 1, 0);
    CHECK(zse_convert(mdir, tl_path("x.zse"), &o) == -1 && tl_has("output_norm.weight") &&
          tl_has("missing"));
    unlink(path);
    CHECK(zse_convert(mdir, tl_path("x.zse"), &o) == -1 && tl_has("no model.safetensors"));
    CHECK_EQ_INT(count_entries(tl_tmpdir, "x.zse"), 0);

    /* the disk fills up midway (a file size limit makes the writes fail): no output and
     * no temp file */
    const char *full = tl_path("full.zse");
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {64 * 1024, 64 * 1024};
        setrlimit(RLIMIT_FSIZE, &rl);
        zse_convert_opts c = opts(ZSE_SCHEME_F32, 128);
        int rc = zse_convert(dir, full, &c);
        _exit(rc == 0 ? 0 : strstr(zse_error_message(), "cannot write") ? 3 : 4);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 3, "status %d", status);
    CHECK_EQ_INT(count_entries(tl_tmpdir, "full.zse"), 0);
}

/* a signal during a conversion leaves neither OUT nor a temp file */
static bool child_has_output_open(pid_t pid)
{
    char fd_dir[64], link[600], target[600];
    snprintf(fd_dir, sizeof fd_dir, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(fd_dir);
    bool found = false;
    struct dirent *e;
    while (d && !found && (e = readdir(d))) {
        snprintf(link, sizeof link, "%s/%s", fd_dir, e->d_name);
        ssize_t k = readlink(link, target, sizeof target - 1);
        if (k > 0) {
            target[k] = '\0';
            /* the anonymous output (or the named fallback) in the temp dir */
            found = strncmp(target, tl_tmpdir, strlen(tl_tmpdir)) == 0 &&
                    (strstr(target, "(deleted)") || strstr(target, ".tmp."));
        }
    }
    if (d)
        closedir(d);
    return found;
}

static void test_interrupted(int sig)
{
    tl_model m;
    tl_default_model(&m);
    m.hidden = 512;
    m.ffn = 4096;
    m.untied = true;
    const char *dir = tl_path("big-%d", sig);
    tl_make_hf_dir(dir, &m);
    const char *out = tl_path("big-%d.zse", sig);
    pid_t pid = fork();
    if (pid == 0) {
        zse_convert_opts o = opts(ZSE_SCHEME_Q4, 128);
        o.threads = 1;
        int rc = zse_convert(dir, out, &o);
        _exit(rc == 0 ? 0 : strstr(zse_error_message(), "interrupted") ? 3 : 4);
    }
    /* signal once the output file exists, i.e. in the middle of writing */
    double t0 = zse_now();
    while (!child_has_output_open(pid) && zse_now() - t0 < 20)
        usleep(1000);
    kill(pid, sig);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 3, "signal %d: status %d", sig, status);
    CHECK_EQ_INT(count_entries(tl_tmpdir, strrchr(out, '/') + 1), 0);
}

int main(void)
{
    tl_begin("zse-file");
    tl_model m;
    tl_default_model(&m);
    const char *tied = tl_path("tied");
    tl_make_hf_dir(tied, &m);
    m.untied = true;
    const char *untied = tl_path("untied");
    tl_make_hf_dir(untied, &m);
    const char *good = tl_path("good.zse");
    test_header_fields(tied, good);
    test_policy(untied);
    test_sharded(untied);
    test_preamble_damage(good);
    test_header_damage(good);
    test_verify(good);
    test_layout_example();
    test_failures(untied);
    test_interrupted(SIGINT);
    test_interrupted(SIGTERM);
    tl_end();
    return test_main_end();
}
