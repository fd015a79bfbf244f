/* LoRA adapters as files (src/format/lora.c):
 * - the PEFT fixtures (tests/fixtures/lora) read as PEFT defines them: ranks, scales
 *   (lora_alpha / r, rsLoRA's / sqrt(r), rank_pattern / alpha_pattern by PEFT's regex rule,
 *   a layer subset), A as stored and B transposed, every value the file's;
 * - a .zsa written and read back holds the same parts bit for bit; a flipped byte, a
 *   truncation, another magic or version are refused with what and where;
 * - every kind of bad adapter is refused with an error naming the field or tensor: no
 *   config, not JSON, another peft_type, DoRA, bias, modules_to_save, ranks out of range,
 *   a pickle only, lm_head / embedding / expert / unknown tensors, a lone lora_A, ranks
 *   that disagree, values f16 cannot hold; and against the base: another width, a layer
 *   the model lacks, the MLP of a mixture-of-experts layer. */
#include "format_testlib.h"

#include <math.h>

static zse_config fixture_config(const char *name)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", test_env("ZSE_TEST_DATA"), name);
    zse_hf_dir hf;
    if (zse_hf_open(&hf, dir) != 0) {
        fprintf(stderr, "cannot open %s: %s\n", dir, zse_error_message());
        exit(1);
    }
    zse_config c = hf.config;
    zse_hf_close(&hf);
    return c;
}

static const zse_lora_part *part(const zse_lora_file *f, int layer, int module)
{
    return &f->parts[layer * ZSE_LORA_MODULES + module];
}

/* every value of a part equals the safetensors file's (A as is, B transposed) */
static bool part_matches(const zse_lora_part *p, const zse_safetensors *st, const char *key)
{
    char name[256];
    snprintf(name, sizeof name, "base_model.model.%s.lora_A.weight", key);
    const zse_st_tensor *ta = zse_st_find(st, name);
    snprintf(name, sizeof name, "base_model.model.%s.lora_B.weight", key);
    const zse_st_tensor *tb = zse_st_find(st, name);
    if (!ta || !tb)
        return false;
    float *a = malloc((size_t)(p->rank * p->in) * sizeof *a), *b = malloc((size_t)(p->rank * p->out) * sizeof *b);
    bool ok = a && b && zse_st_read_f32(ta, 0, (size_t)(p->rank * p->in), a) == 0 &&
              zse_st_read_f32(tb, 0, (size_t)(p->rank * p->out), b) == 0;
    for (int64_t i = 0; ok && i < p->rank * p->in; i++)
        ok = zse_f16_to_f32(p->a[i]) == zse_f16_to_f32(zse_f32_to_f16(a[i]));
    for (int64_t o = 0; ok && o < p->out; o++)
        for (int j = 0; ok && j < p->rank; j++)
            ok = zse_f16_to_f32(p->bt[j * p->out + o]) == zse_f16_to_f32(zse_f32_to_f16(b[o * p->rank + j]));
    free(a);
    free(b);
    return ok;
}

static void test_fixtures(void)
{
    char dir[1024], st_path[1100];
    snprintf(dir, sizeof dir, "%s/lora/tiny-llama/all-r8", test_env("ZSE_TEST_DATA"));
    zse_lora_file f;
    CHECK(zse_lora_open(&f, dir) == 0);
    CHECK_EQ_INT(f.n_layers, 4);
    CHECK_EQ_INT(f.modules, 0x7f);
    CHECK_EQ_INT(f.max_rank, 8);
    CHECK(!f.zsa && json_is_object(f.peft_config));
    const int64_t in[] = {128, 128, 128, 128, 128, 128, 352}, out[] = {128, 64, 64, 128, 352, 352, 128};
    for (int m = 0; m < ZSE_LORA_MODULES; m++) {
        CHECK_EQ_INT(part(&f, 2, m)->rank, 8);
        CHECK_EQ_INT(part(&f, 2, m)->in, in[m]);
        CHECK_EQ_INT(part(&f, 2, m)->out, out[m]);
        CHECK(part(&f, 2, m)->scale == 2.0f); /* lora_alpha 16 / r 8 */
    }
    snprintf(st_path, sizeof st_path, "%s/adapter_model.safetensors", dir);
    zse_safetensors st;
    CHECK(zse_st_open(&st, st_path) == 0);
    CHECK(part_matches(part(&f, 0, ZSE_LORA_Q), &st, "model.layers.0.self_attn.q_proj"));
    CHECK(part_matches(part(&f, 3, ZSE_LORA_DOWN), &st, "model.layers.3.mlp.down_proj"));
    CHECK(part_matches(part(&f, 1, ZSE_LORA_K), &st, "model.layers.1.self_attn.k_proj"));
    zse_st_close(&st);
    zse_config llama = fixture_config("tiny-llama"), qwen = fixture_config("tiny-qwen2");
    CHECK(zse_lora_check_base(&f, &llama) == 0);
    CHECK(zse_lora_check_base(&f, &qwen) == -1 && tl_has("trained for another base model"));
    int rank = 0;
    CHECK(zse_lora_probe(dir, &rank) == 0 && rank == 8);

    /* .zsa: the same parts, bit for bit */
    const char *zsa = tl_path("all-r8.zsa");
    CHECK(zse_lora_write_zsa(&f, zsa, false) == 0);
    CHECK(zse_lora_write_zsa(&f, zsa, false) == -1 && tl_has("already exists"));
    zse_lora_file z;
    CHECK(zse_lora_open(&z, zsa) == 0);
    CHECK(z.zsa && z.n_layers == 4 && z.modules == 0x7f && z.max_rank == 8);
    CHECK(json_equal(z.peft_config, f.peft_config));
    bool same = true;
    for (int i = 0; i < 4 * ZSE_LORA_MODULES; i++) {
        const zse_lora_part *a = &f.parts[i], *b = &z.parts[i];
        same = same && a->rank == b->rank && a->scale == b->scale && a->in == b->in && a->out == b->out &&
               !memcmp(a->a, b->a, (size_t)(a->rank * a->in) * 2) && !memcmp(a->bt, b->bt, (size_t)(a->rank * a->out) * 2);
    }
    CHECK(same);
    CHECK(zse_lora_probe(zsa, &rank) == 0 && rank == 8);
    CHECK(zse_lora_check_base(&z, &llama) == 0);
    zse_lora_close(&z);
    zse_lora_close(&f);

    /* rsLoRA: alpha / sqrt(r), q and v only */
    snprintf(dir, sizeof dir, "%s/lora/tiny-llama/qv-rslora", test_env("ZSE_TEST_DATA"));
    CHECK(zse_lora_open(&f, dir) == 0);
    CHECK_EQ_INT(f.modules, 1u << ZSE_LORA_Q | 1u << ZSE_LORA_V);
    CHECK(part(&f, 0, ZSE_LORA_Q)->rank == 4 && part(&f, 0, ZSE_LORA_Q)->scale == 4.0f); /* 8 / sqrt(4) */
    CHECK(part(&f, 0, ZSE_LORA_K)->rank == 0);
    zse_lora_close(&f);

    /* rank_pattern / alpha_pattern and a layer subset */
    snprintf(dir, sizeof dir, "%s/lora/tiny-llama/patterns", test_env("ZSE_TEST_DATA"));
    CHECK(zse_lora_open(&f, dir) == 0);
    CHECK(part(&f, 0, ZSE_LORA_Q)->rank == 8 && part(&f, 0, ZSE_LORA_Q)->scale == 2.0f);
    CHECK(part(&f, 1, ZSE_LORA_K)->rank == 2 && part(&f, 1, ZSE_LORA_K)->scale == 8.0f);     /* "k_proj": 2 */
    CHECK(part(&f, 0, ZSE_LORA_O)->rank == 8 && part(&f, 3, ZSE_LORA_O)->rank == 16);        /* layer 3 only */
    CHECK(part(&f, 3, ZSE_LORA_O)->scale == 1.0f);
    CHECK(part(&f, 0, ZSE_LORA_DOWN)->rank == 8 && part(&f, 0, ZSE_LORA_DOWN)->scale == 0.5f); /* alpha 4 / 8 */
    for (int m = 0; m < ZSE_LORA_MODULES; m++)
        CHECK(part(&f, 2, m)->rank == 0); /* layers_to_transform [0, 1, 3] */
    CHECK(zse_lora_probe(dir, &rank) == 0 && rank == 16);
    zse_lora_close(&f);
}

/* a .zsa file edited at `at`, or cut to `len` bytes */
static void test_zsa_damage(void)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/lora/tiny-llama/qv-rslora", test_env("ZSE_TEST_DATA"));
    zse_lora_file f;
    const char *good = tl_path("qv.zsa");
    CHECK(zse_lora_open(&f, dir) == 0 && zse_lora_write_zsa(&f, good, false) == 0);
    zse_lora_close(&f);
    size_t n;
    char *bytes = zse_read_file(good, &n);
    CHECK(bytes && n > 4096);
    const char *bad = tl_path("bad.zsa");
    bytes[n - 100] ^= 0x40; /* inside the last part */
    tl_write(bad, bytes, n);
    CHECK(zse_lora_open(&f, bad) == -1 && tl_has("checksum mismatch") && tl_has("layer 3's attn_v B"));
    bytes[n - 100] ^= 0x40;
    tl_write(bad, bytes, n - 10);
    CHECK(zse_lora_open(&f, bad) == -1 && tl_has("truncated"));
    bytes[100] ^= 1; /* the header */
    tl_write(bad, bytes, n);
    CHECK(zse_lora_open(&f, bad) == -1 && tl_has("header checksum mismatch"));
    bytes[100] ^= 1;
    bytes[8] = 2; /* major 2 */
    tl_write(bad, bytes, n);
    CHECK(zse_lora_open(&f, bad) == -1 && tl_has("upgrade zse"));
    memcpy(bytes, "ZSEMODEL", 8);
    tl_write(bad, bytes, n);
    CHECK(zse_lora_open(&f, bad) == -1 && tl_has("not a .zsa adapter"));
    free(bytes);
    tl_write_text(bad, "");
    CHECK(zse_lora_open(&f, bad) == -1 && tl_has("not a .zsa adapter"));
    CHECK(zse_lora_open(&f, tl_path("missing.zsa")) == -1 && tl_has("No such file"));
}

/* a PEFT directory of a config and tensors (F32) */
static const char *peft_dir(const char *name, const char *config, const tl_spec *s, int n)
{
    const char *dir = tl_path("%s", name);
    mkdir(dir, 0755);
    if (config)
        tl_write_text(tl_path("%s/adapter_config.json", name), config);
    if (s)
        tl_write_safetensors(tl_path("%s/adapter_model.safetensors", name), s, n, 0);
    return dir;
}

#define CFG(extra) "{\"peft_type\":\"LORA\",\"r\":4,\"lora_alpha\":8" extra "}"

static bool refused(const char *dir, const char *needle)
{
    zse_lora_file f;
    if (zse_lora_open(&f, dir) == 0) {
        zse_lora_close(&f);
        fprintf(stderr, "%s: opened, expected \"%s\"\n", dir, needle);
        return false;
    }
    if (!tl_has(needle))
        fprintf(stderr, "%s: \"%s\" lacks \"%s\"\n", dir, zse_error_message(), needle);
    return tl_has(needle);
}

static void test_bad_peft(void)
{
    const tl_spec ok[] = {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 4, 32, "F32"},
                          {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 32, 4, "F32"}};
    zse_lora_file f;
    CHECK(zse_lora_open(&f, peft_dir("good", CFG(""), ok, 2)) == 0 && part(&f, 0, ZSE_LORA_Q)->scale == 2.0f);
    zse_lora_close(&f);
    CHECK(refused(tl_path("nowhere"), "No such file"));
    CHECK(refused(peft_dir("noconfig", NULL, ok, 2), "no adapter_config.json"));
    CHECK(refused(peft_dir("notjson", "{\"r\": 4,", ok, 2), "line 1"));
    CHECK(refused(peft_dir("ia3", "{\"peft_type\":\"IA3\"}", ok, 2), "LoRA adapters only"));
    CHECK(refused(peft_dir("dora", CFG(",\"use_dora\":true"), ok, 2), "use_dora"));
    CHECK(refused(peft_dir("bias", CFG(",\"bias\":\"all\""), ok, 2), "bias is \"all\""));
    CHECK(refused(peft_dir("mts", CFG(",\"modules_to_save\":[\"lm_head\"]"), ok, 2), "modules_to_save"));
    CHECK(refused(peft_dir("tti", CFG(",\"trainable_token_indices\":[1,2]"), ok, 2), "trainable_token_indices"));
    CHECK(refused(peft_dir("r0", "{\"peft_type\":\"LORA\",\"r\":0}", ok, 2), "r must be an integer rank"));
    CHECK(refused(peft_dir("r256", "{\"peft_type\":\"LORA\",\"r\":256}", ok, 2), "rank up to 128"));
    CHECK(refused(peft_dir("alpha", "{\"r\":4,\"lora_alpha\":\"big\"}", ok, 2), "lora_alpha must be"));
    CHECK(refused(peft_dir("rp", CFG(",\"rank_pattern\":{\"q_proj\":-1}"), ok, 2), "rank_pattern[\"q_proj\"]"));
    CHECK(refused(peft_dir("re", CFG(",\"rank_pattern\":{\"(q\":2}"), ok, 2), "not a regular expression"));
    CHECK(refused(peft_dir("nost", CFG(""), NULL, 0), "no adapter_model.safetensors"));
    peft_dir("pickle", CFG(""), NULL, 0);
    tl_write_text(tl_path("pickle/adapter_model.bin"), "PK");
    CHECK(refused(tl_path("pickle"), "safe_serialization"));

    const tl_spec lm[] = {{"base_model.model.lm_head.lora_A.weight", 4, 32, "F32"}};
    CHECK(refused(peft_dir("lm", CFG(""), lm, 1), "an lm_head adapter"));
    const tl_spec emb[] = {{"base_model.model.model.embed_tokens.lora_embedding_A", 4, 32, "F32"}};
    CHECK(refused(peft_dir("emb", CFG(""), emb, 1), "embedding adapter"));
    const tl_spec mag[] = {ok[0], ok[1], {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", 32, 0, "F32"}};
    CHECK(refused(peft_dir("mag", CFG(""), mag, 3), "DoRA"));
    const tl_spec exp[] = {{"base_model.model.model.layers.0.mlp.experts.3.gate_proj.lora_A.weight", 4, 32, "F32"}};
    CHECK(refused(peft_dir("exp", CFG(""), exp, 1), "experts are not LoRA targets"));
    const tl_spec mix[] = {{"base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight", 4, 32, "F32"}};
    CHECK(refused(peft_dir("mix", CFG(""), mix, 1), "mixture-of-experts"));
    const tl_spec router[] = {{"base_model.model.model.layers.0.mlp.gate.lora_A.weight", 4, 32, "F32"}};
    CHECK(refused(peft_dir("router", CFG(""), router, 1), "router"));
    const tl_spec odd[] = {{"base_model.model.model.layers.0.self_attn.rotary.lora_A.weight", 4, 32, "F32"}};
    CHECK(refused(peft_dir("odd", CFG(""), odd, 1), "not a LoRA weight of q/k/v/o/gate/up/down_proj"));
    CHECK(refused(peft_dir("lone", CFG(""), ok, 1), "has lora_A but no lora_B"));
    const tl_spec r8[] = {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 8, 32, "F32"},
                          {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 32, 8, "F32"}};
    CHECK(refused(peft_dir("rank", CFG(""), r8, 2), "has rank 8 but adapter_config.json's r says 4"));
    CHECK(refused(peft_dir("rankp", CFG(",\"rank_pattern\":{\"layers.0.self_attn.q_proj\":2}"), ok, 2),
                  "rank_pattern[\"layers.0.self_attn.q_proj\"] says 2"));
    const tl_spec split[] = {ok[0], {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 32, 2, "F32"}};
    CHECK(refused(peft_dir("split", CFG(""), split, 2), "the ranks differ"));

    /* a value f16 cannot hold */
    const char *big = peft_dir("big", CFG(""), ok, 2);
    size_t n;
    char *bytes = zse_read_file(tl_path("big/adapter_model.safetensors"), &n);
    float huge = 1e6f;
    memcpy(bytes + n - 4, &huge, 4);
    tl_write(tl_path("big/adapter_model.safetensors"), bytes, n);
    free(bytes);
    CHECK(refused(big, "f16 cannot hold"));

    /* against a base model */
    zse_config llama = fixture_config("tiny-llama"), moe = fixture_config("random/qwen2-moe");
    CHECK(zse_lora_open(&f, peft_dir("w32", CFG(""), ok, 2)) == 0);
    CHECK(zse_lora_check_base(&f, &llama) == -1 && tl_has("32 -> 32 wide in the adapter") && tl_has("128 -> 128"));
    zse_lora_close(&f);
    const tl_spec deep[] = {{"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", 4, 128, "F32"},
                            {"base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight", 128, 4, "F32"}};
    CHECK(zse_lora_open(&f, peft_dir("deep", CFG(""), deep, 2)) == 0);
    CHECK(zse_lora_check_base(&f, &llama) == -1 && tl_has("adapts layer 9; the model has 4 layers"));
    zse_lora_close(&f);
    /* qwen2-moe: layer 1 runs experts (decoder_sparse_step 2), layer 0 the dense MLP */
    const tl_spec mlp[] = {{"base_model.model.model.layers.1.mlp.up_proj.lora_A.weight", 4, 16, "F32"},
                           {"base_model.model.model.layers.1.mlp.up_proj.lora_B.weight", 40, 4, "F32"}};
    CHECK(zse_lora_open(&f, peft_dir("moe", CFG(""), mlp, 2)) == 0);
    CHECK(zse_lora_check_base(&f, &moe) == -1 && tl_has("mixture-of-experts layer"));
    zse_lora_close(&f);
    const tl_spec attn[] = {{"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", 4, 16, "F32"},
                            {"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", 16, 4, "F32"},
                            {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", 4, 16, "F32"},
                            {"base_model.model.model.layers.0.mlp.up_proj.lora_B.weight", 40, 4, "F32"}};
    CHECK(zse_lora_open(&f, peft_dir("moe-attn", CFG(""), attn, 4)) == 0);
    CHECK(zse_lora_check_base(&f, &moe) == 0); /* attention everywhere, the MLP of a dense layer */
    zse_lora_close(&f);
}

int main(void)
{
    if (!test_env("ZSE_TEST_DATA")) {
        fprintf(stderr, "skip: ZSE_TEST_DATA is not set\n");
        return 77;
    }
    tl_begin("lora-format");
    test_fixtures();
    test_zsa_damage();
    test_bad_peft();
    tl_end();
    return test_main_end();
}
