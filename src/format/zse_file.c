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
    unsigned major;             /* the preamble's major version */
    zse_config config;
    zse_tensor_info *tensors;
    size_t n_tensors;
    zse_expert_bank *banks;     /* in file order */
    size_t n_banks;
    int *bank_of_layer;         /* [n_layers]: index into banks, -1 for a dense layer */
    uint64_t tok_offset, tok_size, tok_checksum;
};

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
    /* a 1.x reader refuses major 2 here, before reading anything the new version adds */
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
    if (zse_hash64(p, 56) != zse_load_le64(p + 56))
        return zse_fail("%s: preamble checksum mismatch; the file is corrupt", path);
    *hoff = zse_load_le64(p + 16);
    *hsize = zse_load_le64(p + 24);
    *data_offset = zse_load_le64(p + 40);
    uint64_t fsize = zse_load_le64(p + 48), hend;
    if (fsize != f->map.size)
        return zse_fail("%s is %zu bytes but its preamble says %" PRIu64 "; the file is truncated "
                        "or was not fully written", path, f->map.size, fsize);
    if (*hoff < 64 || __builtin_add_overflow(*hoff, *hsize, &hend) || hend > *data_offset ||
        *data_offset > f->map.size || *data_offset % ZSE_TENSOR_ALIGN != 0)
        return zse_fail("%s: header region is out of bounds; the file is corrupt", path);
    if (zse_hash64(p + *hoff, (size_t)*hsize) != zse_load_le64(p + 32))
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
        !zse_parse_hex64(json_string_value(json_object_get(e, "checksum")), &t->checksum))
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

/* the shape, scheme and packed size of part `p` of a bank entry, checked against the config */
static int read_expert_part(zse_file *f, const json_t *e, int layer, int p, zse_expert_part *part)
{
    const char *path = f->map.path, *want = zse_expert_part_name(p);
    const char *name = json_string_value(json_object_get(e, "name"));
    const char *scheme = json_string_value(json_object_get(e, "scheme"));
    json_t *shape = json_object_get(e, "shape"), *g = json_object_get(e, "group_size");
    json_t *r = json_array_get(shape, 0), *c = json_array_get(shape, 1);
    if (!name || strcmp(name, want) != 0)
        return zse_fail("%s: expert bank of layer %d: part %d is '%s', not %s", path, layer, p, name ? name : "?", want);
    if (!scheme || zse_scheme_from_name(scheme, &part->q.scheme) != 0)
        return zse_fail("%s: layer %d %s: unknown scheme '%s'", path, layer, want, scheme ? scheme : "?");
    if (json_array_size(shape) != 2 || !json_is_integer(r) || !json_is_integer(c) || (g && !json_is_integer(g)))
        return zse_fail("%s: layer %d %s: malformed shape or group size", path, layer, want);
    part->q.rows = json_integer_value(r);
    part->q.cols = json_integer_value(c);
    json_int_t gv = g ? json_integer_value(g) : 0;
    part->layout = zse_scheme_layout(part->q.scheme);
    if (gv < 0 || gv > 1 << 20 || (gv != 0 && part->layout != ZSE_LAYOUT_Q4_G))
        return zse_fail("%s: layer %d %s: group size %lld does not fit scheme %s", path, layer, want, (long long)gv, scheme);
    part->q.group_size = (int)gv;
    json_t *lay = json_object_get(e, "layout");
    if (!json_is_integer(lay) || json_integer_value(lay) != (json_int_t)part->layout)
        return zse_fail("%s: layer %d %s: layout is not the %s layout %d", path, layer, want, scheme, (int)part->layout);
    /* every expert's part is what the config gives it: kernels size loops from the config */
    const int64_t hidden = f->config.hidden_size, ffn = f->config.expert_ffn;
    const int64_t want_rows = p == ZSE_EXPERT_DOWN ? hidden : ffn, want_cols = p == ZSE_EXPERT_DOWN ? ffn : hidden;
    if (part->q.rows != want_rows || part->q.cols != want_cols)
        return zse_fail("%s: layer %d %s is %lld x %lld but the config (hidden %lld, expert ffn %lld) needs "
                        "%lld x %lld", path, layer, want, (long long)part->q.rows, (long long)part->q.cols,
                        (long long)hidden, (long long)ffn, (long long)want_rows, (long long)want_cols);
    size_t need = zse_qshape_bytes(&part->q);
    if (need == 0) {
        zse_error_prefix("%s: layer %d %s", path, layer, want);
        return -1;
    }
    if (get_u64(e, "at", &part->at) || get_u64(e, "size", &part->size) || part->size != need ||
        part->at % ZSE_EXPERT_PART_ALIGN != 0)
        return zse_fail("%s: layer %d %s: offset or size missing, misaligned or not the %zu bytes its shape "
                        "needs", path, layer, want, need);
    return 0;
}

/* One "experts" entry: a MoE layer's bank. Its parts lie in order inside an expert without
 * overlapping, the expert fits its stride, and all `count` experts lie inside the file. */
static int read_bank(zse_file *f, const json_t *e, uint64_t data_offset, zse_expert_bank *b)
{
    const char *path = f->map.path;
    json_t *layer = json_object_get(e, "layer"), *count = json_object_get(e, "count");
    json_t *parts = json_object_get(e, "parts"), *sums = json_object_get(e, "checksums");
    if (!json_is_integer(layer) || json_integer_value(layer) < 0 || json_integer_value(layer) >= f->config.n_layers)
        return zse_fail("%s: an expert bank has no valid layer", path);
    b->layer = (int)json_integer_value(layer);
    if (!zse_config_layer_is_moe(&f->config, b->layer))
        return zse_fail("%s: layer %d has an expert bank but the config makes it a dense layer", path, b->layer);
    if (!json_is_integer(count) || json_integer_value(count) != f->config.n_experts)
        return zse_fail("%s: the expert bank of layer %d does not hold the config's %d experts", path, b->layer,
                        f->config.n_experts);
    b->count = f->config.n_experts;
    if (!json_is_array(parts) || json_array_size(parts) != ZSE_EXPERT_PARTS)
        return zse_fail("%s: the expert bank of layer %d needs %d parts (gate, up, down)", path, b->layer,
                        ZSE_EXPERT_PARTS);
    uint64_t end = 0;
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++) {
        if (read_expert_part(f, json_array_get(parts, (size_t)p), b->layer, p, &b->part[p]) != 0)
            return -1;
        if (b->part[p].at < end || __builtin_add_overflow(b->part[p].at, b->part[p].size, &end))
            return zse_fail("%s: layer %d: expert parts overlap or are out of order", path, b->layer);
    }
    if (get_u64(e, "offset", &b->offset) || get_u64(e, "stride", &b->stride) || get_u64(e, "size", &b->size))
        return zse_fail("%s: the expert bank of layer %d lacks offset, stride or size", path, b->layer);
    uint64_t span, last;
    if (b->size != end || b->stride < b->size || b->stride % ZSE_TENSOR_ALIGN != 0 ||
        b->offset % ZSE_TENSOR_ALIGN != 0 ||
        __builtin_mul_overflow(b->stride, (uint64_t)(b->count - 1), &span) ||
        __builtin_add_overflow(span, b->offset, &last) || !region_ok(f, data_offset, last, b->size) ||
        b->offset < data_offset)
        return zse_fail("%s: the expert bank of layer %d (offset %" PRIu64 ", stride %" PRIu64 ", %d experts of "
                        "%" PRIu64 " bytes) is misaligned or outside the file; the file is truncated or corrupt",
                        path, b->layer, b->offset, b->stride, b->count, b->size);
    if (!json_is_array(sums) || json_array_size(sums) != (size_t)b->count)
        return zse_fail("%s: the expert bank of layer %d needs %d checksums", path, b->layer, b->count);
    b->checksums = zse_malloc((size_t)b->count * sizeof *b->checksums);
    if (!b->checksums)
        return -1;
    for (int i = 0; i < b->count; i++)
        if (!zse_parse_hex64(json_string_value(json_array_get(sums, (size_t)i)), &b->checksums[i]))
            return zse_fail("%s: layer %d expert %d: malformed checksum", path, b->layer, i);
    b->data = f->map.data + b->offset;
    return 0;
}

/* The "experts" key: one bank for every layer the config makes a MoE layer, none for the
 * others. Dense files (format 1) have neither. */
static int read_banks(zse_file *f, uint64_t data_offset)
{
    const zse_config *c = &f->config;
    json_t *arr = json_object_get(f->header, "experts");
    if (c->n_experts == 0)
        return 0;
    if (f->major < 2)
        return zse_fail("%s: a model with experts needs .zse format 2 but the file says %u; the file is corrupt",
                        f->map.path, f->major);
    const size_t want = (size_t)zse_config_moe_layer_count(c);
    if (!json_is_array(arr) || json_array_size(arr) != want)
        return zse_fail("%s: the config has %zu layers with experts but the header lists %zu expert banks",
                        f->map.path, want, json_is_array(arr) ? json_array_size(arr) : 0);
    f->banks = zse_calloc(want, sizeof *f->banks);
    f->bank_of_layer = zse_malloc((size_t)c->n_layers * sizeof *f->bank_of_layer);
    if (!f->banks || !f->bank_of_layer)
        return -1;
    for (int l = 0; l < c->n_layers; l++)
        f->bank_of_layer[l] = -1;
    for (size_t i = 0; i < want; i++) {
        zse_expert_bank *b = &f->banks[f->n_banks++];
        if (read_bank(f, json_array_get(arr, i), data_offset, b) != 0)
            return -1;
        if (f->bank_of_layer[b->layer] >= 0)
            return zse_fail("%s: layer %d has two expert banks; the file is corrupt", f->map.path, b->layer);
        f->bank_of_layer[b->layer] = (int)i;
    }
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
        !zse_parse_hex64(json_string_value(json_object_get(tok, "checksum")), &f->tok_checksum) ||
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
    if (check_unique_names(f) != 0 || read_banks(f, data_offset) != 0)
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
    for (size_t i = 0; i < f->n_banks; i++)
        free(f->banks[i].checksums);
    free(f->banks);
    free(f->bank_of_layer);
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
    for (size_t i = 0; i < f->n_banks; i++)
        for (int e = 0; e < f->banks[i].count; e++)
            if (!zse_expert_verify(&f->banks[i], e)) {
                if (!*n_bad)
                    snprintf(first, sizeof first, "blk.%d.ffn_exps expert %d", f->banks[i].layer, e);
                (*n_bad)++;
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

unsigned zse_file_major(const zse_file *f) { return f->major; }
size_t zse_file_n_expert_banks(const zse_file *f) { return f->n_banks; }

const zse_expert_bank *zse_file_expert_bank_at(const zse_file *f, size_t i)
{
    return i < f->n_banks ? &f->banks[i] : NULL;
}

const zse_expert_bank *zse_file_experts(const zse_file *f, int layer)
{
    if (!f->bank_of_layer || layer < 0 || layer >= f->config.n_layers || f->bank_of_layer[layer] < 0)
        return NULL;
    return &f->banks[f->bank_of_layer[layer]];
}

void zse_expert_tensor(const zse_expert_bank *b, int expert, int part, char *name, zse_tensor_info *out)
{
    const zse_expert_part *p = &b->part[part];
    snprintf(name, 64, "blk.%d.%s.%d", b->layer, zse_expert_part_name(part), expert);
    memset(out, 0, sizeof *out);
    out->name = name;
    out->q = p->q;
    out->layout = p->layout;
    out->offset = b->offset + (uint64_t)expert * b->stride + p->at;
    out->size = p->size;
    out->data = b->data + (uint64_t)expert * b->stride + p->at;
}

bool zse_expert_verify(const zse_expert_bank *b, int expert)
{
    return expert >= 0 && expert < b->count &&
           zse_hash64(b->data + (uint64_t)expert * b->stride, (size_t)b->size) == b->checksums[expert];
}
