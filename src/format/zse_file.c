/* The .zse reader. Opening maps the file and checks the preamble, the header checksum and
 * every tensor's and blob's offset, size and shape against the file before anything is
 * handed out; tensor bytes are not touched (zse info stays instant on any size). */
#include "format/format.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

struct zse_file {
    zse_map map;
    json_t *header;
    zse_config config;
    zse_tensor_info *tensors;
    size_t n_tensors;
    uint64_t tok_offset, tok_size, tok_checksum;
    unsigned major;             /* the preamble's major version */
};

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static int parse_hex64(const json_t *v, uint64_t *out)
{
    const char *s = json_string_value(v);
    if (!s || strlen(s) != 16)
        return -1;
    uint64_t x = 0;
    for (int i = 0; i < 16; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0)
            return -1;
        x = x << 4 | (uint64_t)d;
    }
    *out = x;
    return 0;
}

static int get_u64(const json_t *o, const char *k, uint64_t *out)
{
    json_t *v = json_object_get(o, k);
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return -1;
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

/* [offset, offset + size) lies inside the data region of the file */
static bool region_ok(const zse_file *f, uint64_t data_offset, uint64_t off, uint64_t size)
{
    uint64_t end;
    return off >= data_offset && !__builtin_add_overflow(off, size, &end) && end <= f->map.size;
}

static int read_preamble(zse_file *f, uint64_t *hoff, uint64_t *hsize, uint64_t *data_offset)
{
    const uint8_t *p = f->map.data;
    const char *path = f->map.path;
    if (f->map.size < 64 || memcmp(p, "ZSEMODEL", 8) != 0)
        return zse_fail("%s is not a .zse file (bad magic); convert a model with `zse convert`", path);
    unsigned major = (unsigned)(p[8] | p[9] << 8), minor = (unsigned)(p[10] | p[11] << 8);
    if (major > ZSE_FORMAT_MAJOR)
        return zse_fail("%s uses .zse format %u.%u, newer than this zse reads (%d.x); upgrade zse",
                        path, major, minor, ZSE_FORMAT_MAJOR);
    if (major < 1)
        return zse_fail("%s: format version %u.%u is not valid", path, major, minor);
    f->major = major;
    if (zse_hash64(p, 56) != rd64(p + 56))
        return zse_fail("%s: preamble checksum mismatch; the file is corrupt", path);
    *hoff = rd64(p + 16);
    *hsize = rd64(p + 24);
    *data_offset = rd64(p + 40);
    uint64_t fsize = rd64(p + 48), hend;
    if (fsize != f->map.size)
        return zse_fail("%s is %zu bytes but its preamble says %" PRIu64 "; the file is truncated "
                        "or was not fully written", path, f->map.size, fsize);
    if (*hoff < 64 || __builtin_add_overflow(*hoff, *hsize, &hend) || hend > *data_offset ||
        *data_offset > f->map.size || *data_offset % ZSE_TENSOR_ALIGN != 0)
        return zse_fail("%s: header region is out of bounds; the file is corrupt", path);
    if (zse_hash64(p + *hoff, (size_t)*hsize) != rd64(p + 32))
        return zse_fail("%s: header checksum mismatch; the file is corrupt", path);
    return 0;
}

static int read_tensor(zse_file *f, const json_t *e, uint64_t data_offset, zse_tensor_info *t)
{
    const char *path = f->map.path;
    const char *name = json_string_value(json_object_get(e, "name"));
    const char *scheme = json_string_value(json_object_get(e, "scheme"));
    json_t *shape = json_object_get(e, "shape");
    if (!name || !scheme || !json_is_array(shape) || json_array_size(shape) != 2)
        return zse_fail("%s: a tensor entry lacks name, scheme or a 2-element shape", path);
    t->name = zse_strdup(name);
    if (!t->name)
        return -1;
    if (zse_scheme_from_name(scheme, &t->q.scheme) != 0)
        return zse_fail("%s: tensor '%s' has unknown scheme '%s'", path, name, scheme);
    json_t *r = json_array_get(shape, 0), *c = json_array_get(shape, 1);
    json_t *g = json_object_get(e, "group_size");
    if (!json_is_integer(r) || !json_is_integer(c) || (g && !json_is_integer(g)))
        return zse_fail("%s: tensor '%s' has a malformed shape", path, name);
    t->q.rows = json_integer_value(r);
    t->q.cols = json_integer_value(c);
    json_int_t gv = g ? json_integer_value(g) : 0;
    if (gv < 0 || gv > 1 << 20)
        return zse_fail("%s: tensor '%s' has group size %lld", path, name, (long long)gv);
    t->q.group_size = (int)gv;
    if (t->q.scheme == ZSE_SCHEME_Q8G && f->major < 2)
        return zse_fail("%s: tensor '%s' has scheme int8g, which format %u.x does not have (2.0 added it)",
                        path, name, f->major);
    if (gv != 0 && !zse_scheme_is_grouped(t->q.scheme))
        return zse_fail("%s: tensor '%s' has group size %d but scheme %s has no groups", path, name,
                        t->q.group_size, scheme);
    t->layout = zse_scheme_layout(t->q.scheme);
    json_t *lay = json_object_get(e, "layout");
    if (!json_is_integer(lay) || json_integer_value(lay) != (json_int_t)t->layout)
        return zse_fail("%s: tensor '%s' has layout %lld, not the %s layout %d", path, name,
                        (long long)json_integer_value(lay), scheme, (int)t->layout);
    size_t need = zse_qshape_bytes(&t->q);
    if (need == 0) {
        zse_error_prefix("%s: tensor '%s'", path, name); /* zse_qshape_bytes said why */
        return -1;
    }
    if (get_u64(e, "offset", &t->offset) || get_u64(e, "size", &t->size) ||
        parse_hex64(json_object_get(e, "checksum"), &t->checksum))
        return zse_fail("%s: tensor '%s' lacks offset, size or checksum", path, name);
    if (t->size != need)
        return zse_fail("%s: tensor '%s' is %" PRIu64 " bytes but its shape needs %zu", path, name,
                        t->size, need);
    if (t->offset % ZSE_TENSOR_ALIGN != 0 || !region_ok(f, data_offset, t->offset, t->size))
        return zse_fail("%s: tensor '%s' at offset %" PRIu64 " (+%" PRIu64 ") is misaligned or "
                        "outside the file; the file is truncated or corrupt", path, name,
                        t->offset, t->size);
    /* the kernels size their loops from the config, so a tensor smaller than the config
     * says would be read past its end */
    if (zse_check_tensor_shape(&f->config, name, t->q.rows, t->q.cols) != 0) {
        zse_error_prefix("%s", path);
        return -1;
    }
    t->data = f->map.data + t->offset;
    return 0;
}

static int cmp_name_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* two entries with one name would let a lookup and a walk of the table disagree */
static int check_unique_names(const zse_file *f)
{
    const char **names = zse_malloc(f->n_tensors * sizeof *names);
    if (!names)
        return -1;
    for (size_t i = 0; i < f->n_tensors; i++)
        names[i] = f->tensors[i].name;
    qsort(names, f->n_tensors, sizeof *names, cmp_name_ptr);
    int rc = 0;
    for (size_t i = 1; i < f->n_tensors && rc == 0; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            rc = zse_fail("%s: tensor '%s' appears twice in the directory; the file is corrupt",
                          f->map.path, names[i]);
    free(names);
    return rc;
}

zse_file *zse_file_open(const char *path)
{
    zse_file *f = zse_calloc(1, sizeof *f);
    if (!f)
        return NULL;
    if (zse_map_open(&f->map, path) != 0) {
        free(f);
        return NULL;
    }
    uint64_t hoff = 0, hsize = 0, data_offset = 0;
    if (read_preamble(f, &hoff, &hsize, &data_offset) != 0)
        goto fail;
    json_error_t err;
    f->header = json_loadb((const char *)f->map.data + hoff, (size_t)hsize, 0, &err);
    if (!json_is_object(f->header)) {
        zse_fail("%s: header is not valid JSON (%s)", path, err.text);
        goto fail;
    }
    if (zse_config_from_json(&f->config, json_object_get(f->header, "config")) != 0) {
        zse_error_prefix("%s", path);
        goto fail;
    }
    json_t *tok = json_object_get(json_object_get(f->header, "blobs"), "tokenizer.json");
    if (!tok || get_u64(tok, "offset", &f->tok_offset) || get_u64(tok, "size", &f->tok_size) ||
        parse_hex64(json_object_get(tok, "checksum"), &f->tok_checksum) ||
        !region_ok(f, data_offset, f->tok_offset, f->tok_size) ||
        f->tok_offset % ZSE_TENSOR_ALIGN != 0) {
        zse_fail("%s: the tokenizer.json blob is missing, misaligned or out of bounds", path);
        goto fail;
    }
    json_t *tensors = json_object_get(f->header, "tensors");
    if (!json_is_array(tensors) || json_array_size(tensors) == 0) {
        zse_fail("%s: header has no tensors", path);
        goto fail;
    }
    f->n_tensors = json_array_size(tensors);
    f->tensors = zse_calloc(f->n_tensors, sizeof *f->tensors);
    if (!f->tensors)
        goto fail;
    for (size_t i = 0; i < f->n_tensors; i++)
        if (read_tensor(f, json_array_get(tensors, i), data_offset, &f->tensors[i]) != 0)
            goto fail;
    if (check_unique_names(f) != 0)
        goto fail;
    return f;
fail:
    zse_file_close(f);
    return NULL;
}

void zse_file_close(zse_file *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->n_tensors; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    json_decref(f->header);
    zse_map_close(&f->map);
    free(f);
}

const zse_config *zse_file_config(const zse_file *f) { return &f->config; }
const json_t *zse_file_header(const zse_file *f) { return f->header; }
size_t zse_file_n_tensors(const zse_file *f) { return f->n_tensors; }
const char *zse_file_path(const zse_file *f) { return f->map.path; }
uint64_t zse_file_size(const zse_file *f) { return f->map.size; }
const uint8_t *zse_file_base(const zse_file *f) { return f->map.data; }

const zse_tensor_info *zse_file_tensor_at(const zse_file *f, size_t i)
{
    return i < f->n_tensors ? &f->tensors[i] : NULL;
}

const zse_tensor_info *zse_file_tensor(const zse_file *f, const char *name)
{
    for (size_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}

const char *zse_file_tokenizer_json(const zse_file *f, size_t *len)
{
    const char *p = (const char *)f->map.data + f->tok_offset;
    if (zse_hash64(p, (size_t)f->tok_size) != f->tok_checksum) {
        zse_fail("%s: tokenizer.json checksum mismatch; the file is corrupt", f->map.path);
        return NULL;
    }
    *len = (size_t)f->tok_size;
    return p;
}

const char *zse_file_chat_template(const zse_file *f)
{
    return json_string_value(json_object_get(f->header, "chat_template"));
}

const json_t *zse_file_tokenizer_config(const zse_file *f)
{
    json_t *v = json_object_get(f->header, "tokenizer_config");
    return json_is_object(v) ? v : NULL;
}

const json_t *zse_file_generation(const zse_file *f)
{
    json_t *v = json_object_get(f->header, "generation");
    return json_is_object(v) ? v : NULL;
}

int zse_file_verify(const zse_file *f, int *n_bad)
{
    *n_bad = 0;
    char first[256] = "";
    for (size_t i = 0; i < f->n_tensors; i++) {
        const zse_tensor_info *t = &f->tensors[i];
        if (zse_hash64(t->data, (size_t)t->size) != t->checksum) {
            if (!*n_bad)
                snprintf(first, sizeof first, "%s", t->name);
            (*n_bad)++;
        }
    }
    size_t len;
    if (!zse_file_tokenizer_json(f, &len)) {
        if (!*n_bad)
            snprintf(first, sizeof first, "tokenizer.json");
        (*n_bad)++;
    }
    if (*n_bad)
        return zse_fail("%s: %d checksum mismatch(es), first in '%s'; the file is corrupt — "
                        "convert the model again", f->map.path, *n_bad, first);
    return 0;
}
