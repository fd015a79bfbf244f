/* Helpers shared by the format tests (test_safetensors, test_hf, test_zse_file): a
 * private temp directory, safetensors files written byte by byte, small Hugging Face
 * model directories, and .zse files edited with their checksums repaired so that each
 * check of the reader is reached on its own. Header-only, like test.h. */
#ifndef ZSE_FORMAT_TESTLIB_H
#define ZSE_FORMAT_TESTLIB_H

#include "test.h"

#include "format/format.h"

#include <stdarg.h>
#include <sys/stat.h>
#include <unistd.h>

static char tl_tmpdir[256];

static inline void tl_begin(const char *name)
{
    snprintf(tl_tmpdir, sizeof tl_tmpdir, "/tmp/zse-test-%s-XXXXXX", name);
    if (!mkdtemp(tl_tmpdir)) {
        perror("mkdtemp");
        exit(1);
    }
}

static inline void tl_end(void)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tl_tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tl_tmpdir);
}

/* a path inside the temp dir; rotating static buffers so several can be live */
static inline const char *tl_path(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline const char *tl_path(const char *fmt, ...)
{
    static char buf[32][512];
    static int k;
    k = (k + 1) % 32;
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    snprintf(buf[k], sizeof buf[k], "%s/%s", tl_tmpdir, name);
    return buf[k];
}

static inline void tl_write(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) {
        perror(path);
        exit(1);
    }
    fclose(f);
}

static inline void tl_write_text(const char *path, const char *text)
{
    tl_write(path, text, strlen(text));
}

static inline bool tl_has(const char *needle)
{
    return strstr(zse_error_message(), needle) != NULL;
}

/* ---- safetensors -------------------------------------------------------------- */

typedef struct {
    const char *name;
    int64_t rows, cols;     /* cols == 0: a vector of rows elements */
    const char *dtype;      /* "BF16" (default when NULL), "F16", "F32" */
} tl_spec;

/* the deterministic value of element i of tensor k: what the tests compare against */
static inline float tl_value(int k, size_t i, bool vector)
{
    if (vector)
        return 1.0f + 0.0625f * (float)((k + i) % 8);
    uint32_t x = (uint32_t)(k * 7919 + 1) * 2654435761u ^ (uint32_t)i * 2246822519u;
    x ^= x >> 15;
    x *= 2654435761u;
    x ^= x >> 13;
    return ((float)(x >> 8) / 16777216.0f - 0.5f) * 0.2f;
}

static inline size_t tl_count(const tl_spec *s)
{
    return (size_t)(s->cols ? s->rows * s->cols : s->rows);
}

static inline size_t tl_esize(const tl_spec *s)
{
    return s->dtype && strcmp(s->dtype, "F32") == 0 ? 4 : 2;
}

/* writes a safetensors file of the given tensors; k0 numbers them for tl_value */
static inline void tl_write_safetensors(const char *path, const tl_spec *s, int n, int k0)
{
    zse_buf h = {0};
    size_t off = 0;
    zse_buf_puts(&h, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        size_t bytes = tl_count(&s[i]) * tl_esize(&s[i]);
        const char *dt = s[i].dtype ? s[i].dtype : "BF16";
        if (s[i].cols)
            zse_buf_printf(&h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld,%lld],\"data_offsets\":[%zu,%zu]}",
                           s[i].name, dt, (long long)s[i].rows, (long long)s[i].cols, off, off + bytes);
        else
            zse_buf_printf(&h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld],\"data_offsets\":[%zu,%zu]}",
                           s[i].name, dt, (long long)s[i].rows, off, off + bytes);
        off += bytes;
    }
    zse_buf_puts(&h, "}");
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(1);
    }
    uint8_t len[8];
    for (int i = 0; i < 8; i++)
        len[i] = (uint8_t)((uint64_t)h.len >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(h.data, 1, h.len, f);
    for (int i = 0; i < n; i++) {
        size_t count = tl_count(&s[i]);
        for (size_t j = 0; j < count; j++) {
            float v = tl_value(k0 + i, j, s[i].cols == 0);
            if (tl_esize(&s[i]) == 4) {
                fwrite(&v, 4, 1, f);
            } else {
                uint16_t b = strcmp(s[i].dtype ? s[i].dtype : "BF16", "F16") == 0
                                 ? zse_f32_to_f16(v) : zse_f32_to_bf16(v);
                uint8_t le[2] = {(uint8_t)b, (uint8_t)(b >> 8)};
                fwrite(le, 1, 2, f);
            }
        }
    }
    fclose(f);
    zse_buf_free(&h);
}

/* ---- Hugging Face model directories ------------------------------------------------ */

typedef struct {
    const char *model_type;     /* "qwen2" (default), "llama", "mistral" */
    int layers, hidden, ffn, vocab, heads, kv_heads;
    bool untied;
    int shards;                 /* 0/1: model.safetensors; N: N shards + index */
    const char *extra_config;   /* appended inside config.json's object, starting with ',' */
} tl_model;

static inline void tl_default_model(tl_model *m)
{
    memset(m, 0, sizeof *m);
    m->model_type = "qwen2";
    m->layers = 2;
    m->hidden = 32;
    m->ffn = 80;
    m->vocab = 96;
    m->heads = 8;
    m->kv_heads = 2;
}

/* the tensors of m in Hugging Face naming; names live in a static table */
static inline int tl_model_specs(const tl_model *m, tl_spec *s)
{
    static char names[512][64];
    int n = 0;
    bool bias = strcmp(m->model_type, "qwen2") == 0;
    int64_t hd = m->hidden / m->heads, q = (int64_t)m->heads * hd, kv = (int64_t)m->kv_heads * hd;
    s[n++] = (tl_spec){"model.embed_tokens.weight", m->vocab, m->hidden, NULL};
    for (int l = 0; l < m->layers; l++) {
        const struct { const char *suffix; int64_t r, c; bool need_bias; } per[] = {
            {"input_layernorm.weight", m->hidden, 0, false},
            {"self_attn.q_proj.weight", q, m->hidden, false},
            {"self_attn.q_proj.bias", q, 0, true},
            {"self_attn.k_proj.weight", kv, m->hidden, false},
            {"self_attn.k_proj.bias", kv, 0, true},
            {"self_attn.v_proj.weight", kv, m->hidden, false},
            {"self_attn.v_proj.bias", kv, 0, true},
            {"self_attn.o_proj.weight", m->hidden, q, false},
            {"post_attention_layernorm.weight", m->hidden, 0, false},
            {"mlp.gate_proj.weight", m->ffn, m->hidden, false},
            {"mlp.up_proj.weight", m->ffn, m->hidden, false},
            {"mlp.down_proj.weight", m->hidden, m->ffn, false},
        };
        for (size_t k = 0; k < sizeof per / sizeof per[0]; k++) {
            if (per[k].need_bias && !bias)
                continue;
            snprintf(names[n], sizeof names[n], "model.layers.%d.%s", l, per[k].suffix);
            s[n] = (tl_spec){names[n], per[k].r, per[k].c, NULL};
            n++;
        }
    }
    s[n++] = (tl_spec){"model.norm.weight", m->hidden, 0, NULL};
    if (m->untied)
        s[n++] = (tl_spec){"lm_head.weight", m->vocab, m->hidden, NULL};
    return n;
}

static const char tl_tokenizer_json[] =
    "{\"version\":\"1.0\",\"added_tokens\":[{\"id\":5,\"content\":\"<|end|>\",\"special\":true},"
    "{\"id\":4,\"content\":\"<|begin|>\",\"special\":true}],"
    "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[]},"
    "\"decoder\":{\"type\":\"ByteLevel\"}}";

static inline void tl_make_hf_dir(const char *dir, const tl_model *m)
{
    mkdir(dir, 0755);
    char path[600];
    zse_buf cfg = {0};
    zse_buf_printf(&cfg,
                   "{\"model_type\":\"%s\",\"num_hidden_layers\":%d,\"num_attention_heads\":%d,"
                   "\"num_key_value_heads\":%d,\"hidden_size\":%d,\"intermediate_size\":%d,"
                   "\"vocab_size\":%d,\"max_position_embeddings\":512,\"rms_norm_eps\":1e-6,"
                   "\"rope_theta\":1000000.0,\"tie_word_embeddings\":%s,\"hidden_act\":\"silu\","
                   "\"sliding_window\":4096,\"use_sliding_window\":false,\"eos_token_id\":2,"
                   "\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4.0,"
                   "\"original_max_position_embeddings\":128}%s}",
                   m->model_type, m->layers, m->heads, m->kv_heads, m->hidden, m->ffn, m->vocab,
                   m->untied ? "false" : "true", m->extra_config ? m->extra_config : "");
    snprintf(path, sizeof path, "%s/config.json", dir);
    tl_write_text(path, cfg.data);
    zse_buf_free(&cfg);
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    tl_write_text(path, "{\"eos_token_id\":[2,3],\"bos_token_id\":1,\"temperature\":0.7,\"top_p\":0.8}");
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    tl_write_text(path, "{\"eos_token\":\"<|end|>\",\"add_bos_token\":false,"
                        "\"model_max_length\":1000000000000000019884624838656,"
                        "\"chat_template\":\"{{ messages[0]['content'] }}\"}");
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    tl_write_text(path, tl_tokenizer_json);
    static tl_spec s[512];
    int n = tl_model_specs(m, s);
    if (m->shards <= 1) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        tl_write_safetensors(path, s, n, 0);
        return;
    }
    zse_buf idx = {0};
    zse_buf_puts(&idx, "{\"metadata\":{},\"weight_map\":{");
    int per = (n + m->shards - 1) / m->shards;
    for (int sh = 0; sh < m->shards; sh++) {
        int first = sh * per, count = first + per <= n ? per : n - first;
        snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", dir, sh + 1, m->shards);
        tl_write_safetensors(path, s + first, count, first);
        for (int i = first; i < first + count; i++)
            zse_buf_printf(&idx, "%s\"%s\":\"model-%05d-of-%05d.safetensors\"", i ? "," : "",
                           s[i].name, sh + 1, m->shards);
    }
    zse_buf_puts(&idx, "}}");
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    tl_write_text(path, idx.data);
    zse_buf_free(&idx);
}

/* ---- file surgery ---------------------------------------------------------------- */

static inline uint8_t *tl_read(const char *path, size_t *n)
{
    uint8_t *d = (uint8_t *)zse_read_file(path, n);
    if (!d) {
        fprintf(stderr, "%s\n", zse_error_message());
        exit(1);
    }
    return d;
}

/* a copy of `from`, cut to `truncate_at` bytes (when >= 0) with byte `flip_at` (when >= 0)
 * inverted */
static inline void tl_copy(const char *from, const char *to, long truncate_at, long flip_at)
{
    size_t n;
    uint8_t *d = tl_read(from, &n);
    if (flip_at >= 0 && (size_t)flip_at < n)
        d[flip_at] ^= 0xff;
    tl_write(to, d, truncate_at >= 0 && (size_t)truncate_at < n ? (size_t)truncate_at : n);
    free(d);
}

static inline uint64_t tl_rd64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static inline void tl_wr64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* writes `to`: `from` with its preamble field at `field_off` set to v (8 bytes; for the
 * u16 version fields pass 8 or 10 with width 2) and the preamble checksum redone */
static inline void tl_patch_preamble(const char *from, const char *to, int field_off, int width, uint64_t v)
{
    size_t n;
    uint8_t *d = tl_read(from, &n);
    for (int i = 0; i < width; i++)
        d[field_off + i] = (uint8_t)(v >> (8 * i));
    tl_wr64(d + 56, zse_hash64(d, 56));
    tl_write(to, d, n);
    free(d);
}

/* writes `to`: `from` with its JSON header changed by edit(header, arg) and written back
 * with valid checksums. The new header must fit before data_offset (tests edit small
 * headers whose padding leaves room). Returns false when it does not fit. */
static inline bool tl_edit_header(const char *from, const char *to, void (*edit)(json_t *h, const void *arg),
                           const void *arg)
{
    size_t n;
    uint8_t *d = tl_read(from, &n);
    uint64_t hsize = tl_rd64(d + 24), data_offset = tl_rd64(d + 40);
    json_error_t err;
    json_t *h = json_loadb((const char *)d + 64, (size_t)hsize, 0, &err);
    if (!h) {
        free(d);
        return false;
    }
    edit(h, arg);
    char *s = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
    json_decref(h);
    size_t len = strlen(s);
    bool fits = 64 + len <= data_offset;
    if (fits) {
        memset(d + 64, 0, (size_t)(data_offset - 64));
        memcpy(d + 64, s, len);
        tl_wr64(d + 24, len);
        tl_wr64(d + 32, zse_hash64(s, len));
        tl_wr64(d + 56, zse_hash64(d, 56));
        tl_write(to, d, n);
    }
    free(s);
    free(d);
    return fits;
}

#endif
