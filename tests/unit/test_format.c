/* format: safetensors reader (single, sharded, corrupt), HF normalization, .zse writer and
 * reader round trips, corruption of every region, overwrite refusal, interrupted
 * conversion. Builds its own small HF directories in a temp dir. */
#include "test.h"

#include "format/format.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char tmpdir[256];

static const char *tmp_path(const char *name)
{
    static char buf[32][512];
    static int k;
    k = (k + 1) % 32;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    fputs(text, f);
    fclose(f);
}

typedef struct {
    const char *name;
    int64_t rows, cols; /* cols == 0: a vector of rows elements */
} spec;

/* writes a BF16 safetensors file with deterministic values */
static void write_safetensors(const char *path, const spec *s, int n, float scale)
{
    char header[16384];
    size_t off = 0;
    int len = snprintf(header, sizeof header, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        size_t count = (size_t)(s[i].cols ? s[i].rows * s[i].cols : s[i].rows);
        if (s[i].cols)
            len += snprintf(header + len, sizeof header - (size_t)len,
                            ",\"%s\":{\"dtype\":\"BF16\",\"shape\":[%lld,%lld],\"data_offsets\":[%zu,%zu]}",
                            s[i].name, (long long)s[i].rows, (long long)s[i].cols, off, off + 2 * count);
        else
            len += snprintf(header + len, sizeof header - (size_t)len,
                            ",\"%s\":{\"dtype\":\"BF16\",\"shape\":[%lld],\"data_offsets\":[%zu,%zu]}",
                            s[i].name, (long long)s[i].rows, off, off + 2 * count);
        off += 2 * count;
    }
    len += snprintf(header + len, sizeof header - (size_t)len, "}");
    FILE *f = fopen(path, "wb");
    uint64_t hl = (uint64_t)len;
    fwrite(&hl, 8, 1, f);
    fwrite(header, 1, (size_t)len, f);
    uint32_t state = 12345;
    for (int i = 0; i < n; i++) {
        size_t count = (size_t)(s[i].cols ? s[i].rows * s[i].cols : s[i].rows);
        for (size_t j = 0; j < count; j++) {
            state = state * 1664525u + 1013904223u;
            float v = s[i].cols ? ((float)(state >> 8) / 16777216.0f - 0.5f) * scale : 1.0f;
            uint16_t h = zse_f32_to_bf16(v);
            fwrite(&h, 2, 1, f);
        }
    }
    fclose(f);
}

static int model_specs(spec *s, int layers, int hidden, int ffn, int vocab, bool untied)
{
    static char names[64][64];
    int n = 0;
    const struct { const char *suffix; int kind; } per[] = {
        {"input_layernorm.weight", 0}, {"self_attn.q_proj.weight", 1}, {"self_attn.q_proj.bias", 4},
        {"self_attn.k_proj.weight", 2}, {"self_attn.k_proj.bias", 5}, {"self_attn.v_proj.weight", 2},
        {"self_attn.v_proj.bias", 5}, {"self_attn.o_proj.weight", 1},
        {"post_attention_layernorm.weight", 0}, {"mlp.gate_proj.weight", 3},
        {"mlp.up_proj.weight", 3}, {"mlp.down_proj.weight", 6}};
    s[n++] = (spec){"model.embed_tokens.weight", vocab, hidden};
    int kv = hidden / 4; /* 8 heads, 2 kv heads */
    for (int l = 0; l < layers; l++)
        for (size_t k = 0; k < sizeof per / sizeof per[0]; k++) {
            snprintf(names[n], sizeof names[n], "model.layers.%d.%s", l, per[k].suffix);
            int64_t r = 0, c = 0;
            switch (per[k].kind) {
            case 0: r = hidden; break;
            case 1: r = hidden; c = hidden; break;
            case 2: r = kv; c = hidden; break;
            case 3: r = ffn; c = hidden; break;
            case 4: r = hidden; break;
            case 5: r = kv; break;
            case 6: r = hidden; c = ffn; break;
            }
            s[n] = (spec){names[n], r, c};
            n++;
        }
    s[n++] = (spec){"model.norm.weight", hidden, 0};
    if (untied)
        s[n++] = (spec){"lm_head.weight", vocab, hidden};
    return n;
}

static void make_hf_dir(const char *dir, int layers, int hidden, int ffn, int vocab, bool untied)
{
    mkdir(dir, 0755);
    char path[512], cfg[2048];
    snprintf(cfg, sizeof cfg,
             "{\"model_type\":\"qwen2\",\"num_hidden_layers\":%d,\"num_attention_heads\":8,"
             "\"num_key_value_heads\":2,\"hidden_size\":%d,\"intermediate_size\":%d,"
             "\"vocab_size\":%d,\"max_position_embeddings\":512,\"rms_norm_eps\":1e-6,"
             "\"rope_theta\":1000000.0,\"tie_word_embeddings\":%s,\"hidden_act\":\"silu\","
             "\"sliding_window\":4096,\"use_sliding_window\":false,\"eos_token_id\":2,"
             "\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":128}}",
             layers, hidden, ffn, vocab, untied ? "false" : "true");
    snprintf(path, sizeof path, "%s/config.json", dir);
    write_text(path, cfg);
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    write_text(path, "{\"eos_token_id\":[2,3],\"bos_token_id\":1}");
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    write_text(path, "{\"eos_token\":\"<|end|>\",\"model_max_length\":1000000000000000019884624838656,"
                     "\"chat_template\":\"{{ messages[0]['content'] }}\"}");
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    write_text(path, "{\"version\":\"1.0\",\"added_tokens\":[{\"id\":5,\"content\":\"<|end|>\"}],"
                     "\"model\":{\"type\":\"BPE\",\"vocab\":{},\"merges\":[]},"
                     "\"decoder\":{\"type\":\"ByteLevel\"}}");
    spec s[64];
    int n = model_specs(s, layers, hidden, ffn, vocab, untied);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_safetensors(path, s, n, 0.2f);
}

static void test_hf_normalize(const char *dir)
{
    zse_hf_dir d;
    CHECK(zse_hf_open(&d, dir) == 0);
    const zse_config *c = &d.config;
    CHECK_EQ_STR(c->arch, "qwen2");
    CHECK_EQ_INT(c->n_layers, 2);
    CHECK_EQ_INT(c->n_heads, 8);
    CHECK_EQ_INT(c->n_kv_heads, 2);
    CHECK_EQ_INT(c->head_dim, 4);
    CHECK_EQ_INT(c->vocab_size, 96);
    CHECK(c->attn_bias);
    CHECK_EQ_INT(c->sliding_window, 0); /* qwen2: only with use_sliding_window */
    CHECK(c->rope_scaling.type == ZSE_ROPE_YARN);
    CHECK_NEAR(c->rope_scaling.factor, 4.0, 0);
    CHECK_EQ_INT(c->rope_scaling.original_max_position, 128);
    CHECK_NEAR(c->rope_theta, 1e6, 0);
    CHECK_EQ_INT(c->bos_id, 1);
    CHECK_EQ_INT(c->n_eos, 3); /* 2, 3 from generation_config, 5 from tokenizer_config's name */
    CHECK(c->n_eos == 3 && c->eos_ids[0] == 2 && c->eos_ids[1] == 3 && c->eos_ids[2] == 5);
    CHECK(d.chat_template && strcmp(d.chat_template, "{{ messages[0]['content'] }}") == 0);
    char *name = zse_hf_canonical_name(c, "model.layers.1.self_attn.k_proj.bias");
    CHECK(name && strcmp(name, "blk.1.attn_k.bias") == 0);
    free(name);
    CHECK(zse_hf_canonical_name(c, "model.layers.7.mlp.up_proj.weight") == NULL);
    CHECK(zse_hf_canonical_name(c, "vision_tower.weight") == NULL);
    /* config <-> JSON round trip */
    json_t *j = zse_config_to_json(c);
    zse_config back;
    CHECK(zse_config_from_json(&back, j) == 0);
    CHECK(memcmp(&back, c, sizeof back) == 0);
    json_decref(j);
    zse_hf_close(&d);

    /* rope_theta inside rope_parameters (transformers 5), llama3 scaling, mistral window */
    json_error_t e;
    json_t *cfg = json_loads("{\"model_type\":\"mistral\",\"num_hidden_layers\":1,\"num_attention_heads\":4,"
                             "\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":10,"
                             "\"sliding_window\":4096,\"rope_parameters\":{\"rope_theta\":5e5,"
                             "\"rope_type\":\"llama3\",\"factor\":8,\"low_freq_factor\":1,"
                             "\"high_freq_factor\":4,\"original_max_position_embeddings\":8192}}", 0, &e);
    zse_config m;
    CHECK(zse_hf_normalize_config(&m, cfg, NULL, NULL) == 0);
    CHECK_NEAR(m.rope_theta, 5e5, 0);
    CHECK(m.rope_scaling.type == ZSE_ROPE_LLAMA3);
    CHECK_EQ_INT(m.rope_scaling.original_max_position, 8192);
    CHECK_EQ_INT(m.sliding_window, 4096);
    CHECK_EQ_INT(m.n_kv_heads, 4);
    json_object_set_new(cfg, "model_type", json_string("gpt_neox"));
    CHECK(zse_hf_normalize_config(&m, cfg, NULL, NULL) == -1);
    CHECK(strstr(zse_error_message(), "gpt_neox") != NULL);
    json_object_set_new(cfg, "model_type", json_string("llama"));
    json_object_del(cfg, "vocab_size");
    CHECK(zse_hf_normalize_config(&m, cfg, NULL, NULL) == -1);
    CHECK(strstr(zse_error_message(), "vocab_size") != NULL);
    json_decref(cfg);
    CHECK(zse_hf_open(&d, tmp_path("no-such-dir")) == -1);
    CHECK(strstr(zse_error_message(), "config.json") != NULL);
}

static void copy_file(const char *from, const char *to, long truncate_at, long flip_at)
{
    size_t n;
    char *data = zse_read_file(from, &n);
    if (flip_at >= 0 && (size_t)flip_at < n)
        data[flip_at] ^= 0x5a;
    FILE *f = fopen(to, "wb");
    fwrite(data, 1, truncate_at >= 0 && (size_t)truncate_at < n ? (size_t)truncate_at : n, f);
    fclose(f);
    free(data);
}

static void test_safetensors(const char *dir)
{
    zse_safetensors st;
    CHECK(zse_st_open(&st, dir) == 0);
    CHECK_EQ_INT(st.n_tensors, 27);
    const zse_st_tensor *t = zse_st_find(&st, "model.layers.0.mlp.down_proj.weight");
    CHECK(t && t->ndim == 2 && t->shape[0] == 32 && t->shape[1] == 80 && t->dtype == ZSE_ST_BF16);
    float v[4];
    CHECK(zse_st_read_f32(t, 0, 4, v) == 0);
    CHECK(zse_st_read_f32(t, 32 * 80 - 2, 4, v) == -1);

    /* sharded: split the tensors over two files plus an index */
    const char *sdir = tmp_path("sharded");
    mkdir(sdir, 0755);
    spec s[64];
    int n = model_specs(s, 2, 32, 80, 96, true);
    char p1[512], p2[512], idx[512];
    snprintf(p1, sizeof p1, "%s/model-00001-of-00002.safetensors", sdir);
    snprintf(p2, sizeof p2, "%s/model-00002-of-00002.safetensors", sdir);
    write_safetensors(p1, s, n / 2, 0.2f);
    write_safetensors(p2, s + n / 2, n - n / 2, 0.2f);
    zse_buf b = {0};
    zse_buf_puts(&b, "{\"metadata\":{},\"weight_map\":{");
    for (int i = 0; i < n; i++)
        zse_buf_printf(&b, "%s\"%s\":\"model-0000%d-of-00002.safetensors\"", i ? "," : "", s[i].name,
                       i < n / 2 ? 1 : 2);
    zse_buf_puts(&b, "}}");
    snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", sdir);
    write_text(idx, b.data);
    zse_buf_free(&b);
    zse_safetensors sh;
    CHECK(zse_st_open(&sh, sdir) == 0);
    CHECK_EQ_INT(sh.n_shards, 2);
    CHECK_EQ_INT(sh.n_tensors, st.n_tensors);
    zse_st_close(&sh);

    /* corrupt files: truncated anywhere, bad header length, offsets past the end */
    char src[512];
    snprintf(src, sizeof src, "%s/model.safetensors", dir);
    const char *bad = tmp_path("bad.safetensors");
    long cuts[] = {0, 4, 8, 20, 200, (long)(st.shards[0].size - 1)};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        copy_file(src, bad, cuts[i], -1);
        CHECK_MSG(zse_st_open(&sh, bad) == -1, "truncated at %ld", cuts[i]);
        CHECK(strstr(zse_error_message(), "bad.safetensors") != NULL);
    }
    copy_file(src, bad, -1, 7); /* header length's top byte */
    CHECK(zse_st_open(&sh, bad) == -1);
    write_text(bad, "");
    CHECK(zse_st_open(&sh, bad) == -1);
    /* a tensor whose offsets overrun */
    FILE *f = fopen(bad, "wb");
    const char *h = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16000]}}";
    uint64_t hl = strlen(h);
    fwrite(&hl, 8, 1, f);
    fputs(h, f);
    fwrite("0123456789abcdef", 1, 16, f);
    fclose(f);
    CHECK(zse_st_open(&sh, bad) == -1);
    CHECK(strstr(zse_error_message(), "'w'") != NULL);
    f = fopen(bad, "wb");
    h = "{\"w\":{\"dtype\":\"F32\",\"shape\":[5],\"data_offsets\":[0,16]}}";
    hl = strlen(h);
    fwrite(&hl, 8, 1, f);
    fputs(h, f);
    fwrite("0123456789abcdef", 1, 16, f);
    fclose(f);
    CHECK(zse_st_open(&sh, bad) == -1); /* shape needs 20 bytes */
    zse_st_close(&st);
}

static void test_zse_round_trip(const char *dir)
{
    const char *out = tmp_path("m.zse");
    const char *keep[] = {"blk.1.ffn_down*"};
    zse_convert_opts o = {.scheme = ZSE_SCHEME_Q4, .group_size = 32, .embed_scheme = -1,
                          .lm_head_scheme = ZSE_SCHEME_Q8, .keep_fp16 = keep, .n_keep_fp16 = 1,
                          .threads = 2};
    CHECK_MSG(zse_convert(dir, out, &o) == 0, "%s", zse_error_message());
    CHECK(zse_convert(dir, out, &o) == -1); /* no overwrite without force */
    CHECK(strstr(zse_error_message(), "--force") != NULL);
    o.force = true;
    CHECK(zse_convert(dir, out, &o) == 0);
    zse_file *f = zse_file_open(out);
    CHECK(f != NULL);
    if (!f)
        return;
    const zse_config *c = zse_file_config(f);
    CHECK_EQ_INT(c->n_layers, 2);
    CHECK_EQ_INT(c->vocab_size, 96);
    CHECK_EQ_INT(zse_file_n_tensors(f), 27);
    CHECK_EQ_STR(zse_file_tensor_at(f, 0)->name, "token_embd.weight");
    CHECK_EQ_STR(zse_file_tensor_at(f, 1)->name, "blk.0.attn_norm.weight");
    CHECK_EQ_STR(zse_file_tensor_at(f, 25)->name, "output_norm.weight");
    CHECK_EQ_STR(zse_file_tensor_at(f, 26)->name, "output.weight");
    const zse_tensor_info *emb = zse_file_tensor(f, "token_embd.weight");
    CHECK(emb && emb->q.scheme == ZSE_SCHEME_Q8);
    CHECK(zse_file_tensor(f, "output.weight")->q.scheme == ZSE_SCHEME_Q8);
    CHECK(zse_file_tensor(f, "blk.1.ffn_down.weight")->q.scheme == ZSE_SCHEME_F16);
    const zse_tensor_info *wq = zse_file_tensor(f, "blk.0.attn_q.weight");
    CHECK(wq && wq->q.scheme == ZSE_SCHEME_Q4 && wq->q.group_size == 32);
    CHECK(zse_file_tensor(f, "blk.0.attn_q.bias")->q.scheme == ZSE_SCHEME_F32);
    for (size_t i = 0; i < zse_file_n_tensors(f); i++)
        CHECK(zse_file_tensor_at(f, i)->offset % ZSE_TENSOR_ALIGN == 0);
    size_t tl;
    const char *tj = zse_file_tokenizer_json(f, &tl);
    CHECK(tj && tl > 10 && memcmp(tj, "{\"version\"", 10) == 0);
    CHECK_EQ_STR(zse_file_chat_template(f), "{{ messages[0]['content'] }}");
    int nbad;
    CHECK(zse_file_verify(f, &nbad) == 0 && nbad == 0);

    /* dequantized weights are close to the source */
    zse_safetensors st;
    zse_st_open(&st, dir);
    const zse_st_tensor *src = zse_st_find(&st, "model.layers.0.self_attn.q_proj.weight");
    float a[32], b[32];
    zse_st_read_f32(src, 32 * 5, 32, a);
    zse_dequantize_row(&wq->q, wq->data, 5, b);
    double num = 0, den = 0;
    for (int i = 0; i < 32; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += a[i] * a[i];
    }
    CHECK(sqrt(num / den) < 0.12);
    zse_st_close(&st);
    uint64_t size = zse_file_size(f);
    uint64_t tensor_off = zse_file_tensor(f, "blk.1.ffn_up.weight")->offset;
    zse_file_close(f);

    /* bf16 pass-through is bit exact */
    const char *bf = tmp_path("bf16.zse");
    zse_convert_opts ob = {.scheme = ZSE_SCHEME_BF16, .embed_scheme = -1, .lm_head_scheme = -1, .threads = 1};
    CHECK(zse_convert(dir, bf, &ob) == 0);
    f = zse_file_open(bf);
    zse_st_open(&st, dir);
    const zse_tensor_info *t = zse_file_tensor(f, "blk.0.mlp.gate_proj.weight") ? NULL
                                                                                 : zse_file_tensor(f, "blk.0.ffn_gate.weight");
    src = zse_st_find(&st, "model.layers.0.mlp.gate_proj.weight");
    CHECK(t && t->q.scheme == ZSE_SCHEME_BF16 && t->size == src->size &&
          memcmp(t->data, src->data, src->size) == 0);
    zse_st_close(&st);
    zse_file_close(f);

    /* corruption: truncation anywhere and flipped bytes in each region */
    const char *bad = tmp_path("bad.zse");
    long cuts[] = {0, 10, 63, 64, 100, 4096, (long)tensor_off + 7, (long)size - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        copy_file(out, bad, cuts[i], -1);
        CHECK_MSG(zse_file_open(bad) == NULL, "truncated at %ld", cuts[i]);
    }
    long flips[] = {0, 9, 20, 40, 60, 70, 500};
    for (size_t i = 0; i < sizeof flips / sizeof flips[0]; i++) {
        copy_file(out, bad, -1, flips[i]);
        zse_file *g = zse_file_open(bad);
        CHECK_MSG(g == NULL, "flip at %ld", flips[i]);
        zse_file_close(g);
    }
    copy_file(out, bad, -1, (long)tensor_off + 100);
    f = zse_file_open(bad);
    CHECK(f != NULL); /* tensor bytes are not read at open */
    CHECK(f && zse_file_verify(f, &nbad) == -1 && nbad == 1);
    CHECK(strstr(zse_error_message(), "blk.1.ffn_up.weight") != NULL);
    zse_file_close(f);

    /* a newer major version is refused with a clear message */
    copy_file(out, bad, -1, -1);
    int fd = open(bad, O_RDWR);
    uint8_t pre[64];
    CHECK(pread(fd, pre, 64, 0) == 64);
    pre[8] = 2;
    uint64_t ph = zse_hash64(pre, 56);
    memcpy(pre + 56, &ph, 8);
    CHECK(pwrite(fd, pre, 64, 0) == 64);
    close(fd);
    CHECK(zse_file_open(bad) == NULL);
    CHECK(strstr(zse_error_message(), "newer") != NULL);
}

/* SIGINT during a conversion leaves neither OUT nor a temp file */
static void test_interrupted(void)
{
    const char *dir = tmp_path("big");
    make_hf_dir(dir, 2, 512, 4096, 96, false);
    const char *out = tmp_path("big.zse");
    pid_t pid = fork();
    if (pid == 0) {
        zse_convert_opts o = {.scheme = ZSE_SCHEME_Q4, .group_size = 128, .embed_scheme = -1,
                              .lm_head_scheme = -1, .threads = 1};
        _exit(zse_convert(dir, out, &o) == 0 ? 0 : 3);
    }
    usleep(150000);
    kill(pid, SIGINT);
    int status = 0;
    waitpid(pid, &status, 0);
    bool exists = access(out, F_OK) == 0;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        /* finished before the signal: the file must then be whole */
        zse_file *f = zse_file_open(out);
        CHECK(f != NULL);
        zse_file_close(f);
    } else {
        CHECK_MSG(!exists, "interrupted conversion left %s", out);
    }
    char cmd[600];
    snprintf(cmd, sizeof cmd, "ls %s | grep -q tmp", tmpdir);
    CHECK(system(cmd) != 0);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/zse-test-format-XXXXXX");
    if (!mkdtemp(tmpdir))
        return 1;
    const char *dir = tmp_path("hf");
    make_hf_dir(dir, 2, 32, 80, 96, true);
    test_hf_normalize(dir);
    test_safetensors(dir);
    test_zse_round_trip(dir);
    test_interrupted();
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        return 1;
    return test_main_end();
}
