/* GGUF container reader (versions 2 and 3): the header, every key/value pair and the tensor
 * directory of a mapped .gguf file. Nothing is trusted: every count, length, array and
 * tensor extent is checked against the file before it is used, nesting is bounded, and a
 * file that fails any check is refused with an error that says what and where.
 *
 *   "GGUF" u32 version, u64 n_tensors, u64 n_kv
 *   n_kv × { string key, u32 type, value }            string = u64 length + bytes
 *   n_tensors × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset }
 *   padding to general.alignment (default 32), then the tensor data; offsets are relative
 *   to the data start. ne[0] is the row length (ggml's innermost dimension). */
#include "format/format.h"

#include <inttypes.h>
#include <string.h>

#define MAX_ARRAY_DEPTH 4
#define MAX_DIMS 4

typedef struct {
    const uint8_t *p, *end;
    const char *path;
    bool bad;
} reader;

static bool need(reader *r, uint64_t n, const char *what)
{
    if (r->bad)
        return false;
    if ((uint64_t)(r->end - r->p) < n) {
        zse_fail("%s: GGUF %s runs past the end of the file (truncated or corrupt)", r->path, what);
        r->bad = true;
        return false;
    }
    return true;
}

static uint64_t rd(reader *r, int n, const char *what)
{
    uint64_t v = 0;
    if (!need(r, (uint64_t)n, what))
        return 0;
    for (int i = 0; i < n; i++)
        v |= (uint64_t)r->p[i] << (8 * i);
    r->p += n;
    return v;
}

static const char *rd_str(reader *r, uint64_t *len, const char *what)
{
    *len = rd(r, 8, what);
    if (!need(r, *len, what))
        return NULL;
    const char *s = (const char *)r->p;
    r->p += *len;
    return s;
}

int zse_gguf_scalar_size(uint32_t t)
{
    static const int sz[ZSE_GGUF_TYPES] = {1, 1, 2, 2, 4, 4, 4, 1, -1, -1, 8, 8, 8};
    return t < ZSE_GGUF_TYPES ? sz[t] : -1;
}

static void skip_value(reader *r, uint32_t t, int depth);

static void skip_array(reader *r, int depth, uint32_t *et_out, uint64_t *n_out)
{
    uint32_t et = (uint32_t)rd(r, 4, "array type");
    uint64_t n = rd(r, 8, "array length");
    if (et_out)
        *et_out = et, *n_out = n;
    if (r->bad)
        return;
    if (depth >= MAX_ARRAY_DEPTH) {
        zse_fail("%s: GGUF arrays nested more than %d deep", r->path, MAX_ARRAY_DEPTH);
        r->bad = true;
    } else if (zse_gguf_scalar_size(et) > 0) {
        if (n > (uint64_t)(r->end - r->p) / (uint64_t)zse_gguf_scalar_size(et)) {
            need(r, UINT64_MAX, "array");
            return;
        }
        r->p += n * (uint64_t)zse_gguf_scalar_size(et);
    } else if (et == ZSE_GGUF_STR || et == ZSE_GGUF_ARR) {
        /* every element takes at least 8 bytes, which bounds the loop by the file */
        for (uint64_t i = 0; i < n && !r->bad; i++)
            skip_value(r, et, depth + 1);
    } else {
        zse_fail("%s: unknown GGUF value type %u in an array", r->path, et);
        r->bad = true;
    }
}

static void skip_value(reader *r, uint32_t t, int depth)
{
    uint64_t len;
    if (t == ZSE_GGUF_STR)
        rd_str(r, &len, "string");
    else if (t == ZSE_GGUF_ARR)
        skip_array(r, depth, NULL, NULL);
    else if (zse_gguf_scalar_size(t) > 0)
        rd(r, zse_gguf_scalar_size(t), "value");
    else if (!r->bad) {
        zse_fail("%s: unknown GGUF value type %u", r->path, t);
        r->bad = true;
    }
}

static int add_kv(zse_gguf *g, const char *key, uint64_t klen, uint32_t type, const uint8_t *at,
                  uint32_t arr_type, uint64_t arr_n)
{
    zse_gguf_kv *kv = &g->kvs[g->n_kvs];
    if (!(kv->key = zse_strndup(key, (size_t)klen)))
        return -1;
    if (strlen(kv->key) != klen) {
        free(kv->key);
        return zse_fail("%s: a GGUF key contains a NUL byte", g->map.path);
    }
    kv->type = type;
    kv->at = at;
    kv->arr_type = arr_type;
    kv->arr_n = arr_n;
    g->n_kvs++;
    return 0;
}

static int read_kvs(zse_gguf *g, reader *r, uint64_t n_kv)
{
    /* each pair is at least 8 (key length) + 4 (type) + 1 bytes */
    if (n_kv > (uint64_t)(r->end - r->p) / 13)
        return zse_fail("%s: GGUF header claims %" PRIu64 " key/value pairs, more than the file can hold "
                        "(truncated or corrupt)", g->map.path, n_kv);
    if (!(g->kvs = zse_calloc(n_kv ? n_kv : 1, sizeof *g->kvs)))
        return -1;
    for (uint64_t i = 0; i < n_kv; i++) {
        uint64_t klen;
        const char *key = rd_str(r, &klen, "key");
        uint32_t t = (uint32_t)rd(r, 4, "value type");
        if (r->bad)
            return -1;
        const uint8_t *at = r->p;
        uint32_t et = 0;
        uint64_t an = 0;
        if (t == ZSE_GGUF_ARR)
            skip_array(r, 0, &et, &an);
        else
            skip_value(r, t, 0);
        if (r->bad)
            return -1;
        if (add_kv(g, key, klen, t, t == ZSE_GGUF_ARR ? at + 12 : at, et, an) != 0)
            return -1;
    }
    return 0;
}

static int read_tensor_info(zse_gguf *g, reader *r, zse_gguf_tensor *t)
{
    uint64_t nlen;
    const char *name = rd_str(r, &nlen, "tensor name");
    uint32_t nd = (uint32_t)rd(r, 4, "tensor dimensions");
    if (r->bad)
        return -1;
    if (!(t->name = zse_strndup(name, (size_t)nlen)))
        return -1;
    if (strlen(t->name) != nlen || nlen == 0)
        return zse_fail("%s: a GGUF tensor name is empty or contains a NUL byte", g->map.path);
    if (nd < 1 || nd > MAX_DIMS)
        return zse_fail("%s: tensor '%s' has %u dimensions (1 to %d are valid)", g->map.path, t->name, nd,
                        MAX_DIMS);
    t->n_dims = (int)nd;
    uint64_t elems = 1;
    for (uint32_t d = 0; d < MAX_DIMS; d++) {
        uint64_t ne = d < nd ? rd(r, 8, "tensor shape") : 1;
        if (r->bad)
            return -1;
        if (ne < 1 || ne > ((uint64_t)1 << 40) || __builtin_mul_overflow(elems, ne, &elems) ||
            elems > ((uint64_t)1 << 44))
            return zse_fail("%s: tensor '%s' has an invalid shape (dimension %u is %" PRIu64 ")", g->map.path,
                            t->name, d, ne);
        t->ne[d] = (int64_t)ne;
    }
    t->type = (uint32_t)rd(r, 4, "tensor type");
    t->offset = rd(r, 8, "tensor offset");
    if (r->bad)
        return -1;
    if (!zse_ggml_type_name(t->type))
        return zse_fail("%s: tensor '%s' has GGML type id %u, which no ggml version defines", g->map.path,
                        t->name, t->type);
    /* the size is known for the types zse reads; others are refused when used */
    size_t row = zse_ggml_row_bytes(t->type, t->ne[0]);
    if (zse_ggml_type_supported(t->type)) {
        if (!row)
            return zse_fail("%s: tensor '%s' (%s) has rows of %" PRId64 " elements, not a multiple of its "
                            "block of %" PRId64, g->map.path, t->name, zse_ggml_type_name(t->type), t->ne[0],
                            zse_ggml_block_elems(t->type));
        if (__builtin_mul_overflow((uint64_t)row, elems / (uint64_t)t->ne[0], &t->size))
            return zse_fail("%s: tensor '%s' is too large", g->map.path, t->name);
    }
    return 0;
}

/* places every tensor inside the data section, aligned, without overlap with the end */
static int check_tensor_extents(zse_gguf *g)
{
    for (size_t i = 0; i < g->n_tensors; i++) {
        zse_gguf_tensor *t = &g->tensors[i];
        uint64_t start, end;
        if (t->offset % g->alignment)
            return zse_fail("%s: tensor '%s' starts at offset %" PRIu64 ", not a multiple of the file's "
                            "alignment %" PRIu64, g->map.path, t->name, t->offset, g->alignment);
        if (__builtin_add_overflow(g->data_offset, t->offset, &start) ||
            __builtin_add_overflow(start, t->size, &end) || end > g->map.size)
            return zse_fail("%s: tensor '%s' (%" PRIu64 " bytes at data offset %" PRIu64 ") lies past the end "
                            "of the file (%zu bytes): truncated or corrupt", g->map.path, t->name, t->size,
                            t->offset, g->map.size);
        t->data = g->map.data + start;
        for (size_t j = 0; j < i; j++)
            if (strcmp(g->tensors[j].name, t->name) == 0)
                return zse_fail("%s: tensor '%s' appears twice", g->map.path, t->name);
    }
    return 0;
}

static int parse(zse_gguf *g)
{
    const char *path = g->map.path;
    if (g->map.size < 24 || memcmp(g->map.data, "GGUF", 4) != 0)
        return zse_fail("%s is not a GGUF file (bad magic)", path);
    reader r = {g->map.data + 4, g->map.data + g->map.size, path, false};
    g->version = (uint32_t)rd(&r, 4, "header");
    if (g->version < 2 || g->version > 3)
        return zse_fail("%s: GGUF version %u is not supported (2 and 3 are)", path, g->version);
    uint64_t n_tensors = rd(&r, 8, "header"), n_kv = rd(&r, 8, "header");
    if (r.bad || read_kvs(g, &r, n_kv) != 0)
        return -1;
    g->alignment = 32;
    const zse_gguf_kv *al = zse_gguf_find(g, "general.alignment");
    if (al) {
        int64_t a;
        if (!zse_gguf_kv_int(al, &a) || a < 1 || a > (1 << 20) || (a & (a - 1)))
            return zse_fail("%s: general.alignment must be a power of two up to 2^20", path);
        g->alignment = (uint64_t)a;
    }
    /* each tensor entry is at least 8 + 1 + 4 + 8 + 4 + 8 bytes */
    if (n_tensors > (uint64_t)(r.end - r.p) / 33)
        return zse_fail("%s: GGUF header claims %" PRIu64 " tensors, more than the file can hold (truncated or "
                        "corrupt)", path, n_tensors);
    if (!(g->tensors = zse_calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors)))
        return -1;
    for (uint64_t i = 0; i < n_tensors; i++) {
        g->n_tensors++;
        if (read_tensor_info(g, &r, &g->tensors[i]) != 0)
            return -1;
    }
    uint64_t here = (uint64_t)(r.p - g->map.data);
    g->data_offset = (here + g->alignment - 1) / g->alignment * g->alignment;
    if (g->data_offset > g->map.size && n_tensors > 0)
        return zse_fail("%s: the GGUF data section starts past the end of the file (truncated)", path);
    return check_tensor_extents(g);
}

zse_gguf *zse_gguf_open(const char *path)
{
    zse_gguf *g = zse_calloc(1, sizeof *g);
    if (!g)
        return NULL;
    if (zse_map_open(&g->map, path) != 0) {
        free(g);
        return NULL;
    }
    if (parse(g) != 0) {
        zse_gguf_close(g);
        return NULL;
    }
    return g;
}

void zse_gguf_close(zse_gguf *g)
{
    if (!g)
        return;
    for (size_t i = 0; i < g->n_kvs; i++)
        free(g->kvs[i].key);
    for (size_t i = 0; i < g->n_tensors; i++)
        free(g->tensors[i].name);
    free(g->kvs);
    free(g->tensors);
    zse_map_close(&g->map);
    free(g);
}

bool zse_is_gguf_file(const char *path)
{
    FILE *fp = fopen(path, "rb");
    char magic[4] = {0};
    size_t got = fp ? fread(magic, 1, 4, fp) : 0;
    if (fp)
        fclose(fp);
    return got == 4 && memcmp(magic, "GGUF", 4) == 0;
}

const zse_gguf_kv *zse_gguf_find(const zse_gguf *g, const char *key)
{
    for (size_t i = 0; i < g->n_kvs; i++)
        if (strcmp(g->kvs[i].key, key) == 0)
            return &g->kvs[i];
    return NULL;
}

const zse_gguf_tensor *zse_gguf_tensor_named(const zse_gguf *g, const char *name)
{
    for (size_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0)
            return &g->tensors[i];
    return NULL;
}

bool zse_gguf_kv_int(const zse_gguf_kv *kv, int64_t *out)
{
    int sz = kv ? zse_gguf_scalar_size(kv->type) : -1;
    if (sz <= 0 || kv->type == ZSE_GGUF_F32 || kv->type == ZSE_GGUF_F64)
        return false;
    uint64_t v = 0;
    for (int i = 0; i < sz; i++)
        v |= (uint64_t)kv->at[i] << (8 * i);
    bool is_signed = kv->type == ZSE_GGUF_I8 || kv->type == ZSE_GGUF_I16 || kv->type == ZSE_GGUF_I32 || kv->type == ZSE_GGUF_I64;
    if (is_signed && sz < 8 && (v >> (8 * sz - 1)) & 1)
        v |= ~0ull << (8 * sz);
    if (!is_signed && v > (uint64_t)INT64_MAX)
        return false;
    *out = (int64_t)v;
    return true;
}

bool zse_gguf_kv_num(const zse_gguf_kv *kv, double *out)
{
    int64_t i;
    if (kv->type == ZSE_GGUF_F32) {
        float f;
        memcpy(&f, kv->at, 4);
        *out = f;
        return true;
    }
    if (kv->type == ZSE_GGUF_F64) {
        memcpy(out, kv->at, 8);
        return true;
    }
    if (kv->type != ZSE_GGUF_BOOL && zse_gguf_kv_int(kv, &i)) {
        *out = (double)i;
        return true;
    }
    return false;
}

const char *zse_gguf_kv_str(const zse_gguf_kv *kv, size_t *len)
{
    if (kv->type != ZSE_GGUF_STR)
        return NULL;
    uint64_t n = 0;
    for (int i = 0; i < 8; i++)
        n |= (uint64_t)kv->at[i] << (8 * i);
    *len = (size_t)n; /* bounds were checked when the pair was read */
    return (const char *)kv->at + 8;
}

int zse_gguf_read_f32(const zse_st_tensor *t, size_t first, size_t n, float *out)
{
    int64_t cols = t->ndim == 1 ? t->shape[0] : t->shape[1];
    size_t end;
    if (!zse_add_ok(first, n, &end) || first % (size_t)cols || n % (size_t)cols)
        return zse_fail("tensor '%s': GGUF tensors are read by whole rows", t->name);
    size_t row_bytes = zse_ggml_row_bytes(t->ggml_type, cols);
    int64_t rows = t->ndim == 1 ? 1 : t->shape[0], r0 = (int64_t)(first / (size_t)cols);
    if (!row_bytes || end / (size_t)cols > (size_t)rows || row_bytes * (size_t)rows > t->size)
        return zse_fail("tensor '%s': read of rows [%" PRId64 ", %zu) is out of range", t->name, r0,
                        end / (size_t)cols);
    for (int64_t r = r0; r < (int64_t)(end / (size_t)cols); r++) {
        int64_t src = zse_gguf_source_row(t, r);
        zse_ggml_dequantize_row(t->ggml_type, t->data + (size_t)src * row_bytes, cols, out);
        out += cols;
    }
    return 0;
}

int64_t zse_gguf_source_row(const zse_st_tensor *t, int64_t r)
{
    /* llama.cpp's converter reorders each head's rows of q and k from [first half; second
     * half] (Hugging Face's rotate_half RoPE) to interleaved pairs (ggml's RoPE): HF row
     * h·d + p·d/2 + i sits at GGUF row h·d + 2i + p */
    if (t->permuted_heads <= 0)
        return r;
    int64_t d = t->shape[0] / t->permuted_heads, h = r / d, k = r % d, half = d / 2;
    int64_t p = k / half, i = k % half;
    return h * d + 2 * i + p;
}
