/* safetensors reader: mmap, sharded checkpoints via model.safetensors.index.json.
 *
 * A file is: u64 little-endian header length N, N bytes of JSON
 * {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
 * then the data; offsets are relative to the end of the header. Every offset, shape
 * and size is checked against the file before a tensor is handed out. */
#include "format/format.h"

#include <string.h>

#define ST_MAX_HEADER (100u << 20) /* the format's own limit is 100 MB */

static zse_st_dtype dtype_from_name(const char *s, size_t *elem_size)
{
    static const struct { const char *name; zse_st_dtype d; size_t size; } table[] = {
        {"F32", ZSE_ST_F32, 4}, {"F16", ZSE_ST_F16, 2}, {"BF16", ZSE_ST_BF16, 2},
        {"I8", ZSE_ST_I8, 1},   {"U8", ZSE_ST_U8, 1},   {"I32", ZSE_ST_I32, 4},
        {"F64", ZSE_ST_OTHER, 8}, {"I64", ZSE_ST_OTHER, 8}, {"I16", ZSE_ST_OTHER, 2},
        {"BOOL", ZSE_ST_OTHER, 1}, {"F8_E4M3", ZSE_ST_OTHER, 1}, {"F8_E5M2", ZSE_ST_OTHER, 1},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(s, table[i].name) == 0) {
            *elem_size = table[i].size;
            return table[i].d;
        }
    *elem_size = 0;
    return ZSE_ST_OTHER;
}

static int add_tensor(zse_safetensors *st, size_t *cap, const zse_st_tensor *t)
{
    if (st->n_tensors == *cap) {
        size_t ncap = *cap ? *cap * 2 : 64;
        zse_st_tensor *p = zse_realloc(st->tensors, ncap * sizeof *p);
        if (!p)
            return -1;
        st->tensors = p;
        *cap = ncap;
    }
    st->tensors[st->n_tensors++] = *t;
    return 0;
}

static int parse_tensor_entry(const zse_map *m, const char *name, json_t *v, size_t data_start,
                              int shard, zse_st_tensor *t)
{
    memset(t, 0, sizeof *t);
    const char *file = m->path;
    json_t *dt = json_object_get(v, "dtype"), *shape = json_object_get(v, "shape"),
           *offs = json_object_get(v, "data_offsets");
    if (!json_is_string(dt) || !json_is_array(shape) || !json_is_array(offs) ||
        json_array_size(offs) != 2)
        return zse_fail("%s: tensor '%s' has a malformed entry (needs dtype, shape, data_offsets)",
                        file, name);
    size_t esize;
    t->dtype = dtype_from_name(json_string_value(dt), &esize);
    if (esize == 0)
        return zse_fail("%s: tensor '%s' has unknown dtype '%s'", file, name, json_string_value(dt));
    if (json_array_size(shape) > 8)
        return zse_fail("%s: tensor '%s' has %zu dimensions (at most 8)", file, name,
                        json_array_size(shape));
    t->ndim = (int)json_array_size(shape);
    size_t count = 1;
    for (int i = 0; i < t->ndim; i++) {
        json_t *d = json_array_get(shape, (size_t)i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return zse_fail("%s: tensor '%s' has a bad shape", file, name);
        t->shape[i] = json_integer_value(d);
        if (!zse_mul_ok(count, (size_t)t->shape[i], &count))
            return zse_fail("%s: tensor '%s' shape overflows", file, name);
    }
    json_t *b = json_array_get(offs, 0), *e = json_array_get(offs, 1);
    if (!json_is_integer(b) || !json_is_integer(e) || json_integer_value(b) < 0 ||
        json_integer_value(e) < json_integer_value(b))
        return zse_fail("%s: tensor '%s' has bad data_offsets", file, name);
    size_t begin = (size_t)json_integer_value(b), end = (size_t)json_integer_value(e);
    size_t abs_end, bytes;
    if (!zse_add_ok(data_start, end, &abs_end) || abs_end > m->size)
        return zse_fail("%s: tensor '%s' data [%zu, %zu) runs past the end of the file (%zu bytes); "
                        "the file is truncated or corrupt", file, name, begin, end, m->size);
    if (!zse_mul_ok(count, esize, &bytes) || bytes != end - begin)
        return zse_fail("%s: tensor '%s' holds %zu bytes but its shape and dtype need %zu",
                        file, name, end - begin, bytes);
    t->name = zse_strdup(name);
    if (!t->name)
        return -1;
    t->data = m->data + data_start + begin;
    t->size = bytes;
    t->file_index = shard;
    return 0;
}

static int read_shard(zse_safetensors *st, size_t *cap, int shard)
{
    const zse_map *m = &st->shards[shard];
    if (m->size < 8)
        return zse_fail("%s: too short to be a safetensors file (%zu bytes)", m->path, m->size);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)m->data[i] << (8 * i);
    if (hlen > ST_MAX_HEADER || hlen > m->size - 8)
        return zse_fail("%s: header length %llu is larger than the file; truncated or not safetensors",
                        m->path, (unsigned long long)hlen);
    json_error_t jerr;
    json_t *root = json_loadb((const char *)m->data + 8, (size_t)hlen, 0, &jerr);
    if (!json_is_object(root)) {
        json_decref(root);
        return zse_fail("%s: header is not a JSON object (%s)", m->path, jerr.text);
    }
    const char *name;
    json_t *v;
    int rc = 0;
    json_object_foreach(root, name, v) {
        if (strcmp(name, "__metadata__") == 0)
            continue;
        zse_st_tensor t;
        if (!json_is_object(v) || parse_tensor_entry(m, name, v, 8 + (size_t)hlen, shard, &t) != 0) {
            if (!json_is_object(v))
                zse_fail("%s: tensor '%s' entry is not an object", m->path, name);
            rc = -1;
            break;
        }
        if (zse_st_find(st, name)) {
            free(t.name);
            rc = zse_fail("%s: tensor '%s' appears in more than one shard", m->path, name);
            break;
        }
        if (add_tensor(st, cap, &t) != 0) {
            free(t.name);
            rc = -1;
            break;
        }
    }
    json_decref(root);
    return rc;
}

/* shard names from model.safetensors.index.json's weight_map, deduplicated, in order */
static int index_shards(const char *dir, const char *index_path, char ***names_out, int *n_out)
{
    json_error_t jerr;
    json_t *idx = json_load_file(index_path, 0, &jerr);
    json_t *wm = json_object_get(idx, "weight_map");
    if (!json_is_object(wm)) {
        json_decref(idx);
        return zse_fail("%s: not a valid index (needs a weight_map object): %s", index_path,
                        idx ? "weight_map missing" : jerr.text);
    }
    char **names = NULL;
    int n = 0;
    const char *k;
    json_t *v;
    json_object_foreach(wm, k, v) {
        const char *f = json_string_value(v);
        if (!f || strchr(f, '/')) {
            zse_fail("%s: weight_map entry for '%s' is not a plain file name", index_path, k);
            goto fail;
        }
        bool seen = false;
        for (int i = 0; i < n && !seen; i++)
            seen = strcmp(strrchr(names[i], '/') + 1, f) == 0;
        if (seen)
            continue;
        char **p = zse_realloc(names, (size_t)(n + 1) * sizeof *p);
        if (!p)
            goto fail;
        names = p;
        if (!(names[n] = zse_path_join(dir, f)))
            goto fail;
        n++;
    }
    json_decref(idx);
    if (n == 0) {
        free(names);
        return zse_fail("%s: weight_map is empty", index_path);
    }
    *names_out = names;
    *n_out = n;
    return 0;
fail:
    for (int i = 0; i < n; i++)
        free(names[i]);
    free(names);
    json_decref(idx);
    return -1;
}

int zse_st_open(zse_safetensors *st, const char *path)
{
    memset(st, 0, sizeof *st);
    char **files = NULL;
    int n_files = 0;
    if (zse_file_exists(path)) {
        files = zse_malloc(sizeof *files);
        if (!files || !(files[0] = zse_strdup(path))) {
            free(files);
            return -1;
        }
        n_files = 1;
    } else {
        char *index = zse_path_join(path, "model.safetensors.index.json");
        char *single = zse_path_join(path, "model.safetensors");
        if (!index || !single) {
            free(index);
            free(single);
            return -1;
        }
        int rc = 0;
        if (zse_file_exists(index)) {
            rc = index_shards(path, index, &files, &n_files);
        } else if (zse_file_exists(single)) {
            files = zse_malloc(sizeof *files);
            if (files) {
                files[0] = single;
                single = NULL;
                n_files = 1;
            } else {
                rc = -1;
            }
        } else {
            rc = zse_fail("%s: no model.safetensors or model.safetensors.index.json found "
                          "(zse reads safetensors checkpoints; convert .bin files first)", path);
        }
        free(index);
        free(single);
        if (rc != 0)
            return -1;
    }
    int rc = 0;
    st->shards = zse_calloc((size_t)n_files, sizeof *st->shards);
    if (!st->shards)
        rc = -1;
    size_t cap = 0;
    for (int i = 0; rc == 0 && i < n_files; i++) {
        if (zse_map_open(&st->shards[i], files[i]) != 0) {
            rc = -1;
            break;
        }
        st->n_shards = i + 1;
        rc = read_shard(st, &cap, i);
    }
    for (int i = 0; i < n_files; i++)
        free(files[i]);
    free(files);
    if (rc != 0)
        zse_st_close(st);
    return rc;
}

void zse_st_close(zse_safetensors *st)
{
    for (size_t i = 0; i < st->n_tensors; i++)
        free(st->tensors[i].name);
    free(st->tensors);
    for (int i = 0; i < st->n_shards; i++)
        zse_map_close(&st->shards[i]);
    free(st->shards);
    memset(st, 0, sizeof *st);
}

const zse_st_tensor *zse_st_find(const zse_safetensors *st, const char *name)
{
    for (size_t i = 0; i < st->n_tensors; i++)
        if (strcmp(st->tensors[i].name, name) == 0)
            return &st->tensors[i];
    return NULL;
}

/* one loop per dtype, no call per element: conversion reads every weight of a model */
static void bf16_run_to_f32(const uint8_t *p, size_t n, float *out)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)(p[2 * i] | p[2 * i + 1] << 8) << 16;
        memcpy(&out[i], &u, 4);
    }
}

static void f16_run_to_f32(const uint8_t *p, size_t n, float *out)
{
    for (size_t i = 0; i < n; i++)
        out[i] = zse_f16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
}

int zse_st_read_f32(const zse_st_tensor *t, size_t first, size_t n, float *out)
{
    if (t->dtype == ZSE_ST_GGML)
        return zse_gguf_read_f32(t, first, n, out);
    size_t esize = t->dtype == ZSE_ST_F32 ? 4 : 2, end;
    if (t->dtype != ZSE_ST_F32 && t->dtype != ZSE_ST_F16 && t->dtype != ZSE_ST_BF16)
        return zse_fail("tensor '%s' is not a float tensor (F32, F16 or BF16)", t->name);
    if (!zse_add_ok(first, n, &end) || end > t->size / esize)
        return zse_fail("tensor '%s': read of elements [%zu, %zu) is out of range", t->name, first, end);
    const uint8_t *p = t->data + first * esize;
    if (t->dtype == ZSE_ST_F32)
        memcpy(out, p, n * 4);  /* little-endian host, like the file */
    else if (t->dtype == ZSE_ST_BF16)
        bf16_run_to_f32(p, n, out);
    else
        f16_run_to_f32(p, n, out);
    return 0;
}
