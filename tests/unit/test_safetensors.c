/* safetensors reader: values of each float dtype, other dtypes recognized, sharded
 * checkpoints through the index, and every kind of damage — truncation at every byte,
 * malformed headers, offsets past the end, sizes that disagree with shapes, broken
 * indexes — refused with an error naming the file and tensor. */
#include "format_testlib.h"

/* a file whose header is `json` followed by `data_len` bytes of data */
static const char *raw_file(const char *name, const char *json, size_t data_len)
{
    const char *path = tl_path("%s", name);
    size_t hl = strlen(json);
    uint8_t *d = calloc(1, 8 + hl + data_len);
    tl_wr64(d, hl);
    memcpy(d + 8, json, hl);
    tl_write(path, d, 8 + hl + data_len);
    free(d);
    return path;
}

static void test_values(void)
{
    const tl_spec s[] = {
        {"w.bf16", 3, 5, "BF16"}, {"w.f16", 4, 3, "F16"}, {"w.f32", 7, 0, "F32"},
    };
    const char *path = tl_path("values.safetensors");
    tl_write_safetensors(path, s, 3, 0);
    zse_safetensors st;
    CHECK(zse_st_open(&st, path) == 0);
    CHECK_EQ_INT(st.n_tensors, 3);
    CHECK_EQ_INT(st.n_shards, 1);
    for (int k = 0; k < 3; k++) {
        const zse_st_tensor *t = zse_st_find(&st, s[k].name);
        CHECK(t != NULL);
        if (!t)
            continue;
        CHECK_EQ_INT(t->ndim, s[k].cols ? 2 : 1);
        CHECK_EQ_INT(t->shape[0], s[k].rows);
        CHECK_EQ_INT(t->size, tl_count(&s[k]) * tl_esize(&s[k]));
        float got[64];
        size_t n = tl_count(&s[k]);
        CHECK(zse_st_read_f32(t, 0, n, got) == 0);
        for (size_t i = 0; i < n; i++) {
            float want = tl_value(k, i, s[k].cols == 0);
            /* what the dtype can hold: the writer rounded the same way */
            if (k == 0)
                want = zse_bf16_to_f32(zse_f32_to_bf16(want));
            else if (k == 1)
                want = zse_f16_to_f32(zse_f32_to_f16(want));
            CHECK_MSG(got[i] == want, "%s[%zu]: %g vs %g", s[k].name, i, got[i], want);
        }
        /* a window in the middle, and reads past the end refused */
        float mid[2];
        CHECK(zse_st_read_f32(t, n - 2, 2, mid) == 0 && mid[1] == got[n - 1]);
        CHECK(zse_st_read_f32(t, n - 1, 2, mid) == -1);
        CHECK(zse_st_read_f32(t, SIZE_MAX, 2, mid) == -1);
        CHECK(tl_has(s[k].name));
    }
    CHECK(zse_st_find(&st, "absent") == NULL);
    zse_st_close(&st);

    /* integer dtypes are recognized (sizes checked) but are not floats */
    const char *ints = raw_file("ints.safetensors",
        "{\"a\":{\"dtype\":\"I8\",\"shape\":[4],\"data_offsets\":[0,4]},"
        "\"b\":{\"dtype\":\"U8\",\"shape\":[2,2],\"data_offsets\":[4,8]},"
        "\"c\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[8,16]},"
        "\"d\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[16,24]},"
        "\"e\":{\"dtype\":\"BF16\",\"shape\":[0],\"data_offsets\":[24,24]}}", 24);
    CHECK(zse_st_open(&st, ints) == 0);
    CHECK(zse_st_find(&st, "a")->dtype == ZSE_ST_I8);
    CHECK(zse_st_find(&st, "b")->dtype == ZSE_ST_U8);
    CHECK(zse_st_find(&st, "c")->dtype == ZSE_ST_I32);
    CHECK(zse_st_find(&st, "d")->dtype == ZSE_ST_OTHER);
    CHECK(zse_st_find(&st, "e")->size == 0);
    float v[4];
    CHECK(zse_st_read_f32(zse_st_find(&st, "a"), 0, 4, v) == -1);
    CHECK(tl_has("'a'") && tl_has("not a float"));
    zse_st_close(&st);
}

static void test_sharded(void)
{
    tl_model m;
    tl_default_model(&m);
    m.shards = 3;
    m.untied = true;
    const char *dir = tl_path("sharded");
    tl_make_hf_dir(dir, &m);
    tl_spec s[64];
    int n = tl_model_specs(&m, s);
    zse_safetensors st;
    CHECK_MSG(zse_st_open(&st, dir) == 0, "%s", zse_error_message());
    CHECK_EQ_INT(st.n_shards, 3);
    CHECK_EQ_INT(st.n_tensors, n);
    /* every tensor found, in its shard, with the values written */
    int per = (n + 2) / 3;
    for (int i = 0; i < n; i++) {
        const zse_st_tensor *t = zse_st_find(&st, s[i].name);
        CHECK_MSG(t != NULL, "%s", s[i].name);
        if (!t)
            continue;
        CHECK_EQ_INT(t->file_index, i / per);
        float x;
        CHECK(zse_st_read_f32(t, 1, 1, &x) == 0);
        CHECK(x == zse_bf16_to_f32(zse_f32_to_bf16(tl_value(i, 1, s[i].cols == 0))));
    }
    zse_st_close(&st);

    /* a shard the index names but that is missing: the error names it */
    char shard2[600];
    snprintf(shard2, sizeof shard2, "%s/model-00002-of-00003.safetensors", dir);
    const char *moved = tl_path("moved.safetensors");
    CHECK(rename(shard2, moved) == 0);
    CHECK(zse_st_open(&st, dir) == -1);
    CHECK(tl_has("model-00002-of-00003.safetensors"));
    CHECK(rename(moved, shard2) == 0);

    /* broken indexes */
    const char *idir = tl_path("bad-index");
    mkdir(idir, 0755);
    char idx[600];
    snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", idir);
    const char *bad_indexes[] = {
        "{\"weight_map\":{\"a\":\"../../etc/passwd\"}}",    /* a path, not a file name */
        "{\"weight_map\":{}}",                             /* empty */
        "{\"weight_map\":[1,2]}",                          /* not an object */
        "{\"metadata\":{}}",                               /* no weight_map */
        "{\"weight_map\":{\"a\":7}}",                       /* not a string */
        "not json",
    };
    for (size_t i = 0; i < sizeof bad_indexes / sizeof bad_indexes[0]; i++) {
        tl_write_text(idx, bad_indexes[i]);
        CHECK_MSG(zse_st_open(&st, idir) == -1, "index %zu accepted", i);
        CHECK_MSG(tl_has("model.safetensors.index.json"), "%s", zse_error_message());
    }

    /* one tensor in two shards */
    const tl_spec one[] = {{"x", 2, 2, "F32"}};
    char p1[600], p2[600];
    snprintf(p1, sizeof p1, "%s/a.safetensors", idir);
    snprintf(p2, sizeof p2, "%s/b.safetensors", idir);
    tl_write_safetensors(p1, one, 1, 0);
    tl_write_safetensors(p2, one, 1, 0);
    tl_write_text(idx, "{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}}");
    CHECK(zse_st_open(&st, idir) == -1);
    CHECK(tl_has("'x'") && tl_has("more than one shard"));

    /* a directory with no weights at all */
    const char *empty = tl_path("empty");
    mkdir(empty, 0755);
    CHECK(zse_st_open(&st, empty) == -1);
    CHECK(tl_has("no model.safetensors"));
}

static void test_truncation(void)
{
    const tl_spec s[] = {{"a", 4, 8, "BF16"}, {"b", 8, 0, "F32"}};
    const char *good = tl_path("good.safetensors");
    tl_write_safetensors(good, s, 2, 0);
    size_t n;
    free(tl_read(good, &n));
    const char *bad = tl_path("cut.safetensors");
    zse_safetensors st;
    /* every length short of the whole file is refused, naming the file */
    int refused = 0;
    for (long cut = 0; cut < (long)n; cut++) {
        tl_copy(good, bad, cut, -1);
        if (zse_st_open(&st, bad) == -1 && tl_has("cut.safetensors"))
            refused++;
        else if (zse_st_open(&st, bad) == 0)
            zse_st_close(&st);
    }
    CHECK_EQ_INT(refused, (long)n);
    /* flipped bytes anywhere: refused or, where only data changed, still within bounds */
    for (long at = 0; at < (long)n; at++) {
        tl_copy(good, bad, -1, at);
        if (zse_st_open(&st, bad) == 0) {
            for (size_t i = 0; i < st.n_tensors; i++) {
                const zse_st_tensor *t = &st.tensors[i];
                CHECK(t->data >= st.shards[0].data &&
                      t->data + t->size <= st.shards[0].data + st.shards[0].size);
            }
            zse_st_close(&st);
        }
    }
}

static void test_malformed(void)
{
    static const struct { const char *json; size_t data; const char *why; } cases[] = {
        {"[1,2,3]", 0, "not a JSON object"},
        {"{\"w\":5}", 0, "'w'"},
        {"{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'"},
        {"{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "'w'"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "'w'"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "'w'"},
        {"{\"w\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unknown dtype"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "bad shape"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "bad shape"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "dimensions"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}}", 4, "overflows"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, "data_offsets"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, "data_offsets"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4000]}}", 4, "past the end"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,9223372036854775807]}}", 4, "past the end"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, "need 8"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"w\":{}}", 4, NULL},
    };
    zse_safetensors st;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *path = raw_file("m.safetensors", cases[i].json, cases[i].data);
        int rc = zse_st_open(&st, path);
        if (!cases[i].why) { /* duplicate keys: jansson keeps the last; must not crash */
            if (rc == 0)
                zse_st_close(&st);
            continue;
        }
        CHECK_MSG(rc == -1, "case %zu accepted", i);
        CHECK_MSG(tl_has(cases[i].why) && tl_has("m.safetensors"), "case %zu: %s", i,
                  zse_error_message());
    }
    /* a header length beyond the file, or beyond the format's 100 MB limit */
    uint8_t hdr[16] = {0};
    tl_wr64(hdr, 1000);
    tl_write(tl_path("long.safetensors"), hdr, sizeof hdr);
    CHECK(zse_st_open(&st, tl_path("long.safetensors")) == -1 && tl_has("header length"));
    tl_wr64(hdr, UINT64_MAX);
    tl_write(tl_path("long.safetensors"), hdr, sizeof hdr);
    CHECK(zse_st_open(&st, tl_path("long.safetensors")) == -1 && tl_has("header length"));
    tl_write(tl_path("empty.safetensors"), "", 0);
    CHECK(zse_st_open(&st, tl_path("empty.safetensors")) == -1 && tl_has("too short"));
    CHECK(zse_st_open(&st, tl_path("nope.safetensors")) == -1);
}

int main(void)
{
    tl_begin("safetensors");
    test_values();
    test_sharded();
    test_truncation();
    test_malformed();
    tl_end();
    return test_main_end();
}
