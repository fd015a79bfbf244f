/* GGUF: the GGML block decoders and exact repacks, the container reader's checks (every
 * truncation, bad counts, offsets, alignment, types, duplicates, nesting), the config of a
 * GGUF source (Llama-3 rope_freqs fit, q/k row order) — on files built here byte by byte.
 * tests/gguf/check_gguf.py checks whole conversions against the gguf Python package. */
#include "test.h"

#include "format/format.h"
#include "quant/quant.h"
#include "util/util.h"

#include <math.h>
#include <unistd.h>

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint32_t next_u32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

/* ---- decoders and repacks --------------------------------------------------------------- */

/* random blocks whose f16 scales are finite and modest (random bytes elsewhere) */
static void random_blocks(uint32_t type, uint8_t *b, size_t bytes, size_t block_bytes)
{
    for (size_t i = 0; i < bytes; i++)
        b[i] = (uint8_t)next_u32();
    for (size_t off = 0; off < bytes; off += block_bytes) {
        uint16_t d = zse_f32_to_f16(0.001f + (float)(next_u32() % 1000) / 50000.0f);
        uint16_t m = zse_f32_to_f16(-(float)(next_u32() % 1000) / 40000.0f);
        if (type == 14) { /* Q6_K: d last */
            memcpy(b + off + 208, &d, 2);
        } else {
            memcpy(b + off, &d, 2);
            if (type == 3 || type == 7 || type == 12 || type == 13)
                memcpy(b + off + 2, type >= 12 ? &d : &m, 2);
        }
    }
}

static void test_exact_repacks(void)
{
    const uint32_t types[] = {0, 1, 30, 2, 3, 8};
    const int64_t rows = 5, cols = 96;
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
        uint32_t t = types[k];
        size_t rb = zse_ggml_row_bytes(t, cols);
        CHECK(rb > 0);
        uint8_t *src = malloc(rb * rows);
        int64_t per_block = zse_ggml_block_elems(t);
        random_blocks(t, src, rb * rows, per_block > 1 ? rb / (size_t)(cols / per_block) : rb);
        if (t == 0 || t == 1 || t == 30) /* plain types: finite values */
            for (int64_t i = 0; i < rows * cols; i++) {
                float v = (float)(next_u32() % 2001) / 1000.0f - 1.0f;
                uint16_t h = t == 1 ? zse_f32_to_f16(v) : zse_f32_to_bf16(v);
                if (t == 0)
                    memcpy(src + 4 * i, &v, 4);
                else
                    memcpy(src + 2 * i, &h, 2);
            }
        int g;
        int scheme = zse_ggml_exact_scheme(t, &g);
        CHECK_MSG(scheme >= 0, "%s has an exact scheme", zse_ggml_type_name(t));
        zse_qshape q = {(zse_scheme)scheme, rows, cols, g};
        size_t bytes = zse_qshape_bytes(&q);
        uint8_t *packed = calloc(1, bytes);
        float a[96], b[96];
        int bad = 0;
        for (int64_t r = 0; r < rows; r++)
            zse_ggml_repack_row(t, src + r * rb, &q, packed, r);
        for (int64_t r = 0; r < rows; r++) {
            zse_ggml_dequantize_row(t, src + r * rb, cols, a);
            zse_dequantize_row(&q, packed, r, b);
            bad += memcmp(a, b, sizeof a) != 0;
        }
        CHECK_MSG(bad == 0, "%s repacked as %s g%d decodes to other values", zse_ggml_type_name(t),
                  zse_scheme_name(q.scheme), g);
        free(src);
        free(packed);
    }
    int g;
    CHECK(zse_ggml_exact_scheme(12, &g) == -1 && zse_ggml_exact_scheme(14, &g) == -1); /* K-quants */
}

/* values of hand-made blocks, each computed here from the format's definition */
static void test_decoders(void)
{
    float y[256];
    uint8_t q4_0[18] = {0};
    uint16_t two = zse_f32_to_f16(2.0f);
    memcpy(q4_0, &two, 2);
    q4_0[2] = 0x9F;  /* element 0 = 15, element 16 = 9 */
    q4_0[17] = 0x08; /* element 15 = 8, element 31 = 0 */
    zse_ggml_dequantize_row(2, q4_0, 32, y);
    CHECK(y[0] == 14 && y[16] == 2 && y[15] == 0 && y[31] == -16 && y[1] == -16);

    uint8_t q5_0[22] = {0};
    memcpy(q5_0, &two, 2);
    q5_0[2] = 0x01;        /* qh bit 0: element 0's fifth bit */
    q5_0[5] = 0x80;        /* qh bit 31: element 31's */
    q5_0[6] = 0x03;        /* element 0 low nibble 3 */
    zse_ggml_dequantize_row(6, q5_0, 32, y);
    CHECK(y[0] == (19 - 16) * 2 && y[31] == (16 - 16) * 2 && y[1] == -32);

    uint8_t q8[34];
    memcpy(q8, &two, 2);
    for (int i = 0; i < 32; i++)
        q8[2 + i] = (uint8_t)(int8_t)(i - 16);
    q8[2] = 0x80; /* -128 */
    zse_ggml_dequantize_row(8, q8, 32, y);
    CHECK(y[0] == -256 && y[5] == -22 && y[31] == 30);

    /* Q4_K: d 1, dmin 0.5, sub-block 5 scale 3 min 2 (the high-index packing), code 7 */
    uint8_t q4k[144] = {0};
    uint16_t one = zse_f32_to_f16(1.0f), half = zse_f32_to_f16(0.5f);
    memcpy(q4k, &one, 2);
    memcpy(q4k + 2, &half, 2);
    uint8_t *sc = q4k + 4;
    sc[9] = (uint8_t)(3 | 2 << 4); /* j = 5: low 4 bits of scale and min in byte j + 4 */
    sc[1] |= (uint8_t)(1 << 6);    /* scale high bits (j - 4 = 1): +16 */
    q4k[16 + 2 * 32 + 4] = 0x70;   /* sub-block 5 = pair 2's high nibbles, element 4 */
    zse_ggml_dequantize_row(12, q4k, 256, y);
    CHECK_NEAR(y[5 * 32 + 4], 19.0f * 7 - 0.5f * 2, 0);
    CHECK_NEAR(y[5 * 32 + 5], -1.0f, 0);
    CHECK_NEAR(y[0], 0.0f, 0);

    /* Q6_K: d 0.25, sub-block 9 (second half, l 16..31 of q1) scale -4, code 40 - 32 = 8 */
    uint8_t q6k[210] = {0};
    uint16_t quarter = zse_f32_to_f16(0.25f);
    memcpy(q6k + 208, &quarter, 2);
    ((int8_t *)(q6k + 192))[9] = -4;
    q6k[64 + 20] = 40 & 0xF;              /* ql of element 128 + 20 */
    q6k[128 + 32 + 20] = (40 >> 4) & 3;   /* qh, bits 0-1 */
    zse_ggml_dequantize_row(14, q6k, 256, y);
    CHECK_NEAR(y[128 + 20], 0.25f * -4 * 8, 0);

    CHECK(zse_ggml_row_bytes(12, 255) == 0 && zse_ggml_row_bytes(12, 512) == 288);
    CHECK(zse_ggml_row_bytes(16, 256) == 0 && !zse_ggml_type_supported(16));
    CHECK_EQ_STR(zse_ggml_type_name(16), "IQ2_XXS");
    CHECK(zse_ggml_type_name(4) == NULL && zse_ggml_type_name(1000) == NULL);
}

/* ---- a GGUF writer for the tests --------------------------------------------------------- */

typedef struct {
    zse_buf b;
} gw;

static void put(gw *w, const void *p, size_t n) { zse_buf_append(&w->b, p, n); }
static void u32(gw *w, uint32_t v) { put(w, &v, 4); }
static void u64(gw *w, uint64_t v) { put(w, &v, 8); }
static void str(gw *w, const char *s)
{
    u64(w, strlen(s));
    put(w, s, strlen(s));
}
static void kv_u32(gw *w, const char *k, uint32_t v) { str(w, k), u32(w, 4), u32(w, v); }
static void kv_f32(gw *w, const char *k, float v) { str(w, k), u32(w, 6), put(w, &v, 4); }
static void kv_str(gw *w, const char *k, const char *v) { str(w, k), u32(w, 8), str(w, v); }

typedef struct {
    const char *name;
    uint32_t type;
    int64_t ne0, ne1; /* ne1 0: 1-D */
} tinfo;

/* a llama (or arch) of hidden 64, 1 layer, 2 heads of 32, 1 KV head, vocab 8, ffn 64, RoPE
 * base theta; llama3: the rope_freqs tensor of Llama-3 scaling (factor 8, low 1, high 4,
 * original context 64) as llama.cpp's converter computes it */
static size_t build_model(gw *w, const char *arch, double theta, bool llama3, const tinfo *extra, int n_extra)
{
    static const tinfo base[] = {
        {"token_embd.weight", 0, 64, 8},      {"blk.0.attn_norm.weight", 0, 64, 0},
        {"blk.0.attn_q.weight", 8, 64, 64},   {"blk.0.attn_k.weight", 2, 64, 32},
        {"blk.0.attn_v.weight", 1, 64, 32},   {"blk.0.attn_output.weight", 30, 64, 64},
        {"blk.0.ffn_norm.weight", 0, 64, 0},  {"blk.0.ffn_gate.weight", 8, 64, 64},
        {"blk.0.ffn_up.weight", 8, 64, 64},   {"blk.0.ffn_down.weight", 8, 64, 64},
        {"output_norm.weight", 0, 64, 0},
    };
    tinfo all[32];
    int n = 0;
    for (size_t i = 0; i < sizeof base / sizeof base[0]; i++)
        all[n++] = base[i];
    for (int i = 0; i < n_extra; i++)
        all[n++] = extra[i];
    if (llama3)
        all[n++] = (tinfo){"rope_freqs.weight", 0, 16, 0};
    memset(&w->b, 0, sizeof w->b);
    put(w, "GGUF", 4);
    u32(w, 3);
    u64(w, (uint64_t)n);
    u64(w, 11);
    char key[96];
    kv_str(w, "general.architecture", arch);
#define AK(s) (snprintf(key, sizeof key, "%s." s, arch), key)
    kv_u32(w, AK("block_count"), 1);
    kv_u32(w, AK("embedding_length"), 64);
    kv_u32(w, AK("feed_forward_length"), 64);
    kv_u32(w, AK("attention.head_count"), 2);
    kv_u32(w, AK("attention.head_count_kv"), 1);
    kv_u32(w, AK("context_length"), 4096);
    kv_f32(w, AK("attention.layer_norm_rms_epsilon"), 1e-5f);
    kv_f32(w, AK("rope.freq_base"), (float)theta);
    kv_u32(w, "tokenizer.ggml.eos_token_id", 2);
    /* an array of arrays of strings, to be skipped */
    str(w, "x.nested"), u32(w, 9), u32(w, 9), u64(w, 1), u32(w, 8), u64(w, 2), str(w, "a"), str(w, "bc");
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        str(w, all[i].name);
        u32(w, all[i].ne1 ? 2 : 1);
        u64(w, (uint64_t)all[i].ne0);
        if (all[i].ne1)
            u64(w, (uint64_t)all[i].ne1);
        u32(w, all[i].type);
        u64(w, off);
        size_t sz = zse_ggml_row_bytes(all[i].type, all[i].ne0) * (size_t)(all[i].ne1 ? all[i].ne1 : 1);
        off += (sz + 31) / 32 * 32;
    }
    while (w->b.len % 32)
        put(w, "", 1);
    size_t data = w->b.len;
    for (int i = 0; i < n; i++) {
        size_t sz = zse_ggml_row_bytes(all[i].type, all[i].ne0) * (size_t)(all[i].ne1 ? all[i].ne1 : 1);
        size_t start = w->b.len;
        for (size_t k = 0; k < (sz + 31) / 32 * 32; k++)
            put(w, "", 1);
        if (strcmp(all[i].name, "rope_freqs.weight") == 0) { /* Llama-3: factor 8, low 1, high 4, orig 64 */
            for (int f = 0; f < 16; f++) {
                double inv = 1.0 / pow((float)theta, (float)(2 * f) / 32.0f), wl = 2 * M_PI / inv, div;
                if (wl < 64 / 4.0)
                    div = 1;
                else if (wl > 64)
                    div = 8;
                else {
                    double s = (64 / wl - 1) / 3;
                    div = 1 / ((1 - s) / 8 + s);
                }
                float v = (float)div;
                memcpy(w->b.data + start + 4 * f, &v, 4);
            }
        } else if (all[i].type != 0) { /* valid scales for the block types */
            int64_t per = zse_ggml_block_elems(all[i].type);
            size_t blk = per > 1 ? zse_ggml_row_bytes(all[i].type, per) : sz;
            random_blocks(all[i].type, (uint8_t *)w->b.data + start, sz, blk);
        }
    }
    (void)data;
    return w->b.len;
}

static char *write_temp(const void *p, size_t n)
{
    static char path[64];
    snprintf(path, sizeof path, "/tmp/zse-test-gguf-%d.gguf", (int)getpid());
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    fwrite(p, 1, n, f);
    fclose(f);
    return path;
}

static int open_source(const void *p, size_t n, zse_hf_dir *meta, zse_safetensors *st)
{
    char *path = write_temp(p, n);
    int rc = zse_gguf_open_source(path, meta, st);
    unlink(path);
    return rc;
}

static void test_container(void)
{
    gw w;
    size_t n = build_model(&w, "llama", 500000.0, true, NULL, 0); /* one smoothed frequency */
    zse_hf_dir meta;
    zse_safetensors st;
    CHECK(open_source(w.b.data, n, &meta, &st) == 0);
    const zse_config *c = &meta.config;
    CHECK_EQ_STR(c->arch, "llama");
    CHECK(c->n_layers == 1 && c->hidden_size == 64 && c->n_heads == 2 && c->n_kv_heads == 1 && c->head_dim == 32);
    CHECK(c->vocab_size == 8 && c->max_position == 4096 && c->tie_embeddings && !c->attn_bias);
    CHECK(c->n_eos == 1 && c->eos_ids[0] == 2 && c->bos_id == -1);
    CHECK_MSG(c->rope_scaling.type == ZSE_ROPE_LLAMA3 && c->rope_scaling.factor == 8 &&
                  c->rope_scaling.low_freq_factor == 1 && c->rope_scaling.high_freq_factor == 4 &&
                  c->rope_scaling.original_max_position == 64,
              "llama3 fit: type %d factor %g low %g high %g orig %d", (int)c->rope_scaling.type,
              c->rope_scaling.factor, c->rope_scaling.low_freq_factor, c->rope_scaling.high_freq_factor,
              c->rope_scaling.original_max_position);
    CHECK(st.canonical_names && st.n_tensors == 11); /* rope_freqs became the config */
    const zse_st_tensor *q = zse_st_find(&st, "blk.0.attn_q.weight"), *k = zse_st_find(&st, "blk.0.attn_k.weight");
    const zse_st_tensor *v = zse_st_find(&st, "blk.0.attn_v.weight");
    CHECK(q && q->permuted_heads == 2 && k && k->permuted_heads == 1 && v && v->permuted_heads == 0);
    CHECK(q && q->shape[0] == 64 && q->shape[1] == 64 && q->ggml_type == 8);
    /* HF row h*32 + p*16 + i is GGUF row h*32 + 2i + p */
    CHECK(zse_gguf_source_row(q, 0) == 0 && zse_gguf_source_row(q, 1) == 2 && zse_gguf_source_row(q, 16) == 1 &&
          zse_gguf_source_row(q, 31) == 31 && zse_gguf_source_row(q, 33) == 34 && zse_gguf_source_row(q, 48) == 33);
    float rows[2 * 64], one[64];
    CHECK(zse_st_read_f32(q, 16 * 64, 2 * 64, rows) == 0); /* HF rows 16, 17 = GGUF rows 1, 3 */
    zse_ggml_dequantize_row(8, q->data + zse_ggml_row_bytes(8, 64) * 3, 64, one);
    CHECK(memcmp(rows + 64, one, sizeof one) == 0);
    CHECK(zse_st_read_f32(q, 10, 64, rows) == -1); /* not whole rows */
    CHECK(zse_st_read_f32(q, 63 * 64, 2 * 64, rows) == -1);
    zse_st_close(&st);
    zse_hf_close(&meta);
    free(w.b.data);
    n = build_model(&w, "llama", 10000.0, true, NULL, 0); /* three smoothed frequencies */
    CHECK(open_source(w.b.data, n, &meta, &st) == 0);
    CHECK_MSG(c->rope_scaling.type == ZSE_ROPE_LLAMA3 && c->rope_scaling.factor == 8 &&
                  c->rope_scaling.high_freq_factor == 4 && c->rope_scaling.original_max_position == 64,
              "llama3 fit at theta 1e4: high %g orig %d", c->rope_scaling.high_freq_factor,
              c->rope_scaling.original_max_position);
    zse_st_close(&st);
    zse_hf_close(&meta);

    /* every truncation is refused with an error, never a crash or a read past the end */
    int refused = 0;
    for (size_t cut = 0; cut < n; cut += cut < 2048 ? 1 : 97) {
        if (open_source(w.b.data, cut, &meta, &st) == 0) {
            zse_st_close(&st);
            zse_hf_close(&meta);
        } else {
            refused++;
            CHECK(zse_error_message()[0] != '\0');
        }
    }
    CHECK_MSG(refused > 100, "%d truncations refused", refused);
    free(w.b.data);

    /* qwen2 has no row permutation; an unknown architecture is named */
    n = build_model(&w, "qwen2", 1e6, false, NULL, 0);
    CHECK(open_source(w.b.data, n, &meta, &st) == 0 && zse_st_find(&st, "blk.0.attn_q.weight")->permuted_heads == 0);
    zse_st_close(&st);
    zse_hf_close(&meta);
    free(w.b.data);
    n = build_model(&w, "gemma2", 1e6, false, NULL, 0);
    CHECK(open_source(w.b.data, n, &meta, &st) == -1 && strstr(zse_error_message(), "architecture 'gemma2'"));
    free(w.b.data);

    /* a type zse does not read, a type no ggml defines, a tensor out of bounds, a duplicate */
    tinfo iq = {"output.weight", 0, 64, 8};
    n = build_model(&w, "llama", 1e4, false, &iq, 1);
    /* patch output.weight's type to IQ4_XS (23) after its dims */
    uint8_t *at = memmem(w.b.data, n, "output.weight", 13), saved[12];
    CHECK(at != NULL);
    memcpy(saved, at + 13 + 4 + 16, 12); /* type and offset */
    uint32_t t23 = 23, t99 = 99;
    memcpy(at + 13 + 4 + 16, &t23, 4);
    CHECK(open_source(w.b.data, n, &meta, &st) == -1 && strstr(zse_error_message(), "type IQ4_XS") &&
          strstr(zse_error_message(), "output.weight"));
    memcpy(at + 13 + 4 + 16, &t99, 4);
    CHECK(open_source(w.b.data, n, &meta, &st) == -1 && strstr(zse_error_message(), "type id 99"));
    uint64_t far = (uint64_t)1 << 40;
    memcpy(at + 13 + 4 + 16, &(uint32_t){0}, 4);
    memcpy(at + 13 + 4 + 16 + 4, &far, 8);
    CHECK(open_source(w.b.data, n, &meta, &st) == -1 && strstr(zse_error_message(), "past the end"));
    memcpy(at + 13 + 4 + 16 + 4, &(uint64_t){3}, 8);
    CHECK(open_source(w.b.data, n, &meta, &st) == -1 && strstr(zse_error_message(), "alignment"));
    memcpy(at + 13 + 4 + 16, saved, 12);
    CHECK(open_source(w.b.data, n, &meta, &st) == 0 && !meta.config.tie_embeddings);
    zse_st_close(&st);
    zse_hf_close(&meta);
    free(w.b.data);
    tinfo dup = {"blk.0.ffn_norm.weight", 0, 64, 0};
    n = build_model(&w, "llama", 1e4, false, &dup, 1);
    CHECK(open_source(w.b.data, n, &meta, &st) == -1 && strstr(zse_error_message(), "appears twice"));
    free(w.b.data);

    /* absurd counts */
    n = build_model(&w, "llama", 1e4, false, NULL, 0);
    uint64_t huge = (uint64_t)1 << 60;
    memcpy(w.b.data + 8, &huge, 8);
    CHECK(open_source(w.b.data, n, &meta, &st) == -1 && strstr(zse_error_message(), "tensors"));
    memcpy(w.b.data + 8, &(uint64_t){11}, 8);
    memcpy(w.b.data + 16, &huge, 8);
    CHECK(open_source(w.b.data, n, &meta, &st) == -1 && strstr(zse_error_message(), "key/value"));
    memcpy(w.b.data + 16, &(uint64_t){11}, 8);
    memcpy(w.b.data + 4, &(uint32_t){1}, 4);
    CHECK(open_source(w.b.data, n, &meta, &st) == -1 && strstr(zse_error_message(), "version 1"));
    free(w.b.data);
}

int main(void)
{
    test_exact_repacks();
    test_decoders();
    test_container();
    return test_main_end();
}
