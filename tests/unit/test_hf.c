/* Hugging Face directory normalization: the committed fixtures (each a real transformers
 * config), every config spelling the normalizer accepts (rope theta in two places, four
 * rope scaling types, explicit head_dim, eos as int or list from three files, sliding
 * windows), chat template sources, canonical names and shapes, config <-> JSON, and the
 * errors that name the missing file or field. */
#include "format_testlib.h"

static json_t *parse(const char *text)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    if (!j)
        fprintf(stderr, "bad test JSON: %s: %s\n", e.text, text);
    return j;
}

/* the id of an added token in dir/tokenizer.json, -1 if absent */
static int added_token_id(const char *dir, const char *content)
{
    char path[600];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    json_error_t e;
    json_t *t = json_load_file(path, 0, &e);
    size_t i;
    json_t *a;
    int id = -1;
    json_array_foreach(json_object_get(t, "added_tokens"), i, a)
        if (strcmp(json_string_value(json_object_get(a, "content")), content) == 0)
            id = (int)json_integer_value(json_object_get(a, "id"));
    json_decref(t);
    return id;
}

static bool has_eos(const zse_config *c, int id)
{
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] == id)
            return true;
    return false;
}

static void check_round_trip(const zse_config *c)
{
    json_t *j = zse_config_to_json(c);
    zse_config back;
    CHECK_MSG(zse_config_from_json(&back, j) == 0, "%s", zse_error_message());
    CHECK(memcmp(&back, c, sizeof back) == 0);
    json_decref(j);
}

static void test_fixtures(const char *fixtures)
{
    char dir[600];
    zse_hf_dir d;

    snprintf(dir, sizeof dir, "%s/tiny-llama", fixtures);
    CHECK_MSG(zse_hf_open(&d, dir) == 0, "%s", zse_error_message());
    const zse_config *c = &d.config;
    CHECK_EQ_STR(c->arch, "llama");
    CHECK_EQ_INT(c->n_layers, 4);
    CHECK_EQ_INT(c->n_heads, 4);
    CHECK_EQ_INT(c->n_kv_heads, 2);
    CHECK_EQ_INT(c->head_dim, 32);
    CHECK_EQ_INT(c->hidden_size, 128);
    CHECK_EQ_INT(c->intermediate_size, 352);
    CHECK_EQ_INT(c->vocab_size, 2048);
    CHECK_EQ_INT(c->max_position, 2048);
    CHECK_NEAR(c->rms_eps, 1e-5, 1e-12);
    CHECK_NEAR(c->rope_theta, 5e5, 0);
    CHECK(c->rope_scaling.type == ZSE_ROPE_LLAMA3);
    CHECK_NEAR(c->rope_scaling.factor, 8, 0);
    CHECK_NEAR(c->rope_scaling.low_freq_factor, 1, 0);
    CHECK_NEAR(c->rope_scaling.high_freq_factor, 4, 0);
    CHECK_EQ_INT(c->rope_scaling.original_max_position, 64);
    CHECK(!c->tie_embeddings && !c->attn_bias && !c->qk_norm);
    CHECK_EQ_INT(c->sliding_window, 0);
    CHECK_EQ_INT(c->bos_id, 0);
    CHECK(has_eos(c, 1) && has_eos(c, 4));
    CHECK(has_eos(c, added_token_id(dir, "<|eot_id|>")));
    CHECK_EQ_INT(c->pad_id, added_token_id(dir, "<|end_of_text|>"));
    CHECK(d.chat_template && strstr(d.chat_template, "start_header_id"));
    CHECK(d.generation_config && d.tokenizer_config);
    /* tokenizer_config's 1e30 model_max_length loads (as a real) */
    CHECK(json_is_real(json_object_get(d.tokenizer_config, "model_max_length")));
    check_round_trip(c);
    zse_hf_close(&d);

    snprintf(dir, sizeof dir, "%s/tiny-qwen2", fixtures);
    CHECK(zse_hf_open(&d, dir) == 0);
    CHECK_EQ_STR(d.config.arch, "qwen2");
    CHECK(d.config.tie_embeddings && d.config.attn_bias);
    CHECK_NEAR(d.config.rope_theta, 1e6, 0); /* inside rope_parameters */
    CHECK(d.config.rope_scaling.type == ZSE_ROPE_NONE);
    CHECK_EQ_INT(d.config.head_dim, 16);
    CHECK_EQ_INT(d.config.bos_id, -1);
    CHECK(has_eos(&d.config, 2));
    check_round_trip(&d.config);
    zse_hf_close(&d);

    snprintf(dir, sizeof dir, "%s/random/llama-headdim40", fixtures);
    CHECK(zse_hf_open(&d, dir) == 0);
    CHECK_EQ_INT(d.config.head_dim, 40); /* explicit, not hidden / heads = 16 */
    CHECK_EQ_INT(d.config.n_kv_heads, 1);
    zse_hf_close(&d);

    snprintf(dir, sizeof dir, "%s/random/llama-rope-linear", fixtures);
    CHECK(zse_hf_open(&d, dir) == 0);
    CHECK(d.config.rope_scaling.type == ZSE_ROPE_LINEAR);
    CHECK_NEAR(d.config.rope_scaling.factor, 4, 0);
    zse_hf_close(&d);

    snprintf(dir, sizeof dir, "%s/random/llama-rope-yarn", fixtures);
    CHECK(zse_hf_open(&d, dir) == 0);
    CHECK(d.config.rope_scaling.type == ZSE_ROPE_YARN);
    CHECK_EQ_INT(d.config.rope_scaling.original_max_position, 32);
    CHECK_NEAR(d.config.rope_scaling.beta_fast, 32, 0);
    CHECK_NEAR(d.config.rope_scaling.beta_slow, 1, 0);
    check_round_trip(&d.config);
    zse_hf_close(&d);

    snprintf(dir, sizeof dir, "%s/random/mistral-window", fixtures);
    CHECK(zse_hf_open(&d, dir) == 0);
    CHECK_EQ_STR(d.config.arch, "mistral");
    CHECK_EQ_INT(d.config.sliding_window, 8);
    zse_hf_close(&d);

    snprintf(dir, sizeof dir, "%s/random/qwen2-untied", fixtures);
    CHECK(zse_hf_open(&d, dir) == 0);
    CHECK(!d.config.tie_embeddings && d.config.attn_bias);
    CHECK_EQ_INT(d.config.sliding_window, 0);
    zse_hf_close(&d);
}

/* the released-model spellings, one field at a time, on a minimal llama config */
static void test_spellings(void)
{
    const char *base = "{\"model_type\":\"llama\",\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                       "\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100";
    char text[2048];
    zse_config c;
    json_t *cfg;

#define NORMALIZE(extra, gen, tok) \
    (snprintf(text, sizeof text, "%s%s}", base, extra), cfg = parse(text), \
     zse_hf_normalize_config(&c, cfg, gen, tok))

    CHECK(NORMALIZE("", NULL, NULL) == 0);
    CHECK_EQ_INT(c.n_kv_heads, 4);      /* defaults to the head count */
    CHECK_EQ_INT(c.head_dim, 16);       /* hidden / heads */
    CHECK_NEAR(c.rope_theta, 10000, 0);
    CHECK(c.rope_scaling.type == ZSE_ROPE_NONE);
    CHECK_EQ_INT(c.max_position, 4096);
    CHECK_EQ_INT(c.bos_id, -1);
    CHECK_EQ_INT(c.n_eos, 0);
    CHECK(!c.tie_embeddings && !c.attn_bias);
    json_decref(cfg);

    CHECK(NORMALIZE(",\"rope_theta\":500000,\"head_dim\":null,\"attention_bias\":true", NULL, NULL) == 0);
    CHECK_NEAR(c.rope_theta, 5e5, 0);
    CHECK_EQ_INT(c.head_dim, 16);
    CHECK(c.attn_bias);
    json_decref(cfg);

    /* rope_scaling at the top level, by "type" (old) or "rope_type" (new) */
    CHECK(NORMALIZE(",\"max_position_embeddings\":8192,\"rope_scaling\":{\"type\":\"dynamic\",\"factor\":2.0}", NULL, NULL) == 0);
    CHECK(c.rope_scaling.type == ZSE_ROPE_DYNAMIC);
    CHECK_NEAR(c.rope_scaling.factor, 2, 0);
    CHECK_EQ_INT(c.rope_scaling.original_max_position, 8192);
    json_decref(cfg);
    CHECK(NORMALIZE(",\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":3}", NULL, NULL) == 0);
    CHECK(c.rope_scaling.type == ZSE_ROPE_LINEAR && c.rope_scaling.factor == 3);
    json_decref(cfg);
    CHECK(NORMALIZE(",\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4,\"attention_factor\":0.8,"
                    "\"beta_fast\":16,\"beta_slow\":2,\"original_max_position_embeddings\":4096}", NULL, NULL) == 0);
    CHECK(c.rope_scaling.type == ZSE_ROPE_YARN);
    CHECK_NEAR(c.rope_scaling.attn_factor, 0.8, 1e-12);
    CHECK_NEAR(c.rope_scaling.beta_fast, 16, 0);
    CHECK_NEAR(c.rope_scaling.beta_slow, 2, 0);
    CHECK_EQ_INT(c.rope_scaling.original_max_position, 4096);
    json_decref(cfg);
    /* null rope_scaling (mistral, qwen2 releases) with theta at the top level */
    CHECK(NORMALIZE(",\"rope_scaling\":null,\"rope_theta\":1e6", NULL, NULL) == 0);
    CHECK(c.rope_scaling.type == ZSE_ROPE_NONE && c.rope_theta == 1e6);
    json_decref(cfg);
    /* unsupported or broken scaling */
    CHECK(NORMALIZE(",\"rope_scaling\":{\"rope_type\":\"longrope\",\"factor\":4}", NULL, NULL) == -1);
    CHECK(tl_has("longrope"));
    json_decref(cfg);
    CHECK(NORMALIZE(",\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":0}", NULL, NULL) == -1);
    CHECK(tl_has("factor"));
    json_decref(cfg);
    CHECK(NORMALIZE(",\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":4,"
                    "\"original_max_position_embeddings\":1e300}", NULL, NULL) == 0);
    CHECK_EQ_INT(c.rope_scaling.original_max_position, 1 << 30); /* clamped, not UB */
    json_decref(cfg);
    CHECK(NORMALIZE(",\"rope_theta\":-5", NULL, NULL) == -1 && tl_has("rope_theta"));
    json_decref(cfg);
    CHECK(NORMALIZE(",\"rms_norm_eps\":0", NULL, NULL) == -1 && tl_has("rms_norm_eps"));
    json_decref(cfg);

    /* eos: int or list, from config and generation_config, merged without duplicates;
     * bos from generation_config first; out-of-range ids dropped */
    json_t *gen = parse("{\"eos_token_id\":[7,8,7],\"bos_token_id\":3,\"pad_token_id\":9}");
    CHECK(NORMALIZE(",\"eos_token_id\":8,\"bos_token_id\":1,\"pad_token_id\":-1", gen, NULL) == 0);
    CHECK(c.n_eos == 2 && c.eos_ids[0] == 7 && c.eos_ids[1] == 8);
    CHECK_EQ_INT(c.bos_id, 3);
    CHECK_EQ_INT(c.pad_id, 9);
    json_decref(cfg);
    json_decref(gen);
    CHECK(NORMALIZE(",\"eos_token_id\":[1,2,3,4,5,6,7,8,9,10,11],\"bos_token_id\":99999999999", NULL, NULL) == 0);
    CHECK_EQ_INT(c.n_eos, ZSE_MAX_EOS);
    CHECK_EQ_INT(c.bos_id, -1);
    json_decref(cfg);

    /* sliding windows: mistral when set; qwen2 only with use_sliding_window and layers
     * from max_window_layers on; transformers 5's layer_types */
    CHECK(NORMALIZE(",\"sliding_window\":4096", NULL, NULL) == 0 && c.sliding_window == 4096);
    json_decref(cfg);
    CHECK(NORMALIZE(",\"sliding_window\":null", NULL, NULL) == 0 && c.sliding_window == 0);
    json_decref(cfg);
    const char *q = "{\"model_type\":\"qwen2\",\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                    "\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100,"
                    "\"sliding_window\":32,";
    const struct { const char *rest; int rc, window; } windows[] = {
        {"\"use_sliding_window\":false}", 0, 0},
        {"\"use_sliding_window\":true,\"max_window_layers\":0}", 0, 32},
        {"\"use_sliding_window\":true,\"max_window_layers\":28}", 0, 0},
        {"\"use_sliding_window\":true,\"max_window_layers\":1}", -1, 0},
        {"\"layer_types\":[\"sliding_attention\",\"sliding_attention\"]}", 0, 32},
        {"\"layer_types\":[\"full_attention\",\"full_attention\"]}", 0, 0},
        {"\"layer_types\":[\"full_attention\",\"sliding_attention\"]}", -1, 0},
        {"\"layer_types\":[\"full_attention\"]}", -1, 0},
        {"\"layer_types\":[\"chunked_attention\",\"full_attention\"]}", -1, 0},
    };
    for (size_t i = 0; i < sizeof windows / sizeof windows[0]; i++) {
        snprintf(text, sizeof text, "%s%s", q, windows[i].rest);
        cfg = parse(text);
        int rc = zse_hf_normalize_config(&c, cfg, NULL, NULL);
        CHECK_MSG(rc == windows[i].rc, "window case %zu: %s", i, zse_error_message());
        if (rc == 0)
            CHECK_EQ_INT(c.sliding_window, windows[i].window);
        else
            CHECK(tl_has("layer"));
        json_decref(cfg);
    }

    /* errors name the field */
    const struct { const char *text; const char *needle; } bad[] = {
        {"{\"num_hidden_layers\":2}", "model_type"},
        {"{\"model_type\":\"gpt_neox\"}", "gpt_neox"},
        {"{\"model_type\":\"llama\",\"num_attention_heads\":4,\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100}", "num_hidden_layers"},
        {"{\"model_type\":\"llama\",\"num_hidden_layers\":\"2\",\"num_attention_heads\":4,\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100}", "num_hidden_layers"},
        {"{\"model_type\":\"llama\",\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":3,\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100}", "num_key_value_heads"},
        {"{\"model_type\":\"llama\",\"num_hidden_layers\":2,\"num_attention_heads\":4,\"head_dim\":7,\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100}", "head_dim"},
        {"{\"model_type\":\"llama\",\"num_hidden_layers\":2,\"num_attention_heads\":4,\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100,\"hidden_act\":\"gelu\"}", "gelu"},
        {"{\"model_type\":\"llama\",\"num_hidden_layers\":0,\"num_attention_heads\":4,\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100}", "positive"},
        {"[]", "not a JSON object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cfg = parse(bad[i].text);
        CHECK_MSG(zse_hf_normalize_config(&c, cfg, NULL, NULL) == -1, "bad %zu accepted", i);
        CHECK_MSG(tl_has(bad[i].needle), "bad %zu: %s", i, zse_error_message());
        json_decref(cfg);
    }
#undef NORMALIZE
}

static void write_in(const char *dir, const char *name, const char *text)
{
    char path[600];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (text)
        tl_write_text(path, text);
    else
        unlink(path);
}

/* the directory: eos/bos/pad names resolved through tokenizer.json, chat templates,
 * files missing or broken */
static void test_directory(void)
{
    tl_model m;
    tl_default_model(&m);
    const char *dir = tl_path("hf");
    tl_make_hf_dir(dir, &m);
    zse_hf_dir d;
    CHECK_MSG(zse_hf_open(&d, dir) == 0, "%s", zse_error_message());
    /* 2 from config, [2, 3] from generation_config, "<|end|>" (5) from tokenizer_config */
    CHECK(d.config.n_eos == 3 && d.config.eos_ids[0] == 2 && d.config.eos_ids[1] == 3 &&
          d.config.eos_ids[2] == 5);
    CHECK_EQ_INT(d.config.bos_id, 1);
    CHECK_EQ_STR(d.chat_template, "{{ messages[0]['content'] }}");
    CHECK(json_is_false(json_object_get(d.tokenizer_config, "add_bos_token")));
    zse_hf_close(&d);

    /* AddedToken objects for names; bos only from the name when no id is given */
    write_in(dir, "generation_config.json", NULL);
    write_in(dir, "tokenizer_config.json",
             "{\"eos_token\":{\"content\":\"<|end|>\",\"lstrip\":false},\"bos_token\":\"<|begin|>\","
             "\"chat_template\":[{\"name\":\"tool_use\",\"template\":\"T\"},"
             "{\"name\":\"default\",\"template\":\"D\"}]}");
    CHECK(zse_hf_open(&d, dir) == 0);
    CHECK(d.config.n_eos == 2 && d.config.eos_ids[1] == 5);
    CHECK_EQ_INT(d.config.bos_id, 4);
    CHECK_EQ_STR(d.chat_template, "D");
    CHECK(d.generation_config == NULL);
    zse_hf_close(&d);

    /* chat_template.jinja wins over tokenizer_config */
    write_in(dir, "chat_template.jinja", "{{ 'jinja file' }}");
    CHECK(zse_hf_open(&d, dir) == 0);
    CHECK_EQ_STR(d.chat_template, "{{ 'jinja file' }}");
    zse_hf_close(&d);
    write_in(dir, "chat_template.jinja", NULL);
    write_in(dir, "tokenizer_config.json", "{}");
    CHECK(zse_hf_open(&d, dir) == 0);
    CHECK(d.chat_template == NULL);
    zse_hf_close(&d);

    /* broken or missing files: the error names the file */
    write_in(dir, "tokenizer_config.json", "{\"eos_token\": ");
    CHECK(zse_hf_open(&d, dir) == -1 && tl_has("tokenizer_config.json"));
    write_in(dir, "tokenizer_config.json", "{}");
    write_in(dir, "tokenizer.json", "{\"added_tokens\": [");
    CHECK(zse_hf_open(&d, dir) == -1 && tl_has("tokenizer.json"));
    write_in(dir, "tokenizer.json", NULL);
    CHECK(zse_hf_open(&d, dir) == -1 && tl_has("tokenizer.json is missing"));
    write_in(dir, "tokenizer.json", tl_tokenizer_json);
    write_in(dir, "config.json", "{\"model_type\":\"qwen2\",\n\"num_hidden_layers\": }");
    CHECK(zse_hf_open(&d, dir) == -1 && tl_has("config.json") && tl_has("line 2"));
    write_in(dir, "config.json", "{\"model_type\":\"bert\"}");
    CHECK(zse_hf_open(&d, dir) == -1 && tl_has("'bert'") && tl_has("llama, mistral, qwen2"));
    write_in(dir, "config.json", NULL);
    CHECK(zse_hf_open(&d, dir) == -1 && tl_has("no config.json"));
    CHECK(zse_hf_open(&d, tl_path("nowhere")) == -1 && tl_has("nowhere"));
}

static void test_names(void)
{
    zse_config c;
    json_t *cfg = parse("{\"model_type\":\"qwen2\",\"num_hidden_layers\":3,\"num_attention_heads\":8,"
                        "\"num_key_value_heads\":2,\"hidden_size\":64,\"intermediate_size\":96,"
                        "\"vocab_size\":50,\"head_dim\":16}");
    CHECK(zse_hf_normalize_config(&c, cfg, NULL, NULL) == 0);
    json_decref(cfg);
    c.qk_norm = true; /* qwen2's biases and qwen3's q/k norms in one table */
    const struct { const char *hf, *canon; int64_t rows, cols; } names[] = {
        {"model.embed_tokens.weight", "token_embd.weight", 50, 64},
        {"model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight", 1, 64},
        {"model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 128, 64},
        {"model.layers.1.self_attn.q_proj.bias", "blk.1.attn_q.bias", 1, 128},
        {"model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", 32, 64},
        {"model.layers.1.self_attn.k_proj.bias", "blk.1.attn_k.bias", 1, 32},
        {"model.layers.2.self_attn.v_proj.weight", "blk.2.attn_v.weight", 32, 64},
        {"model.layers.2.self_attn.v_proj.bias", "blk.2.attn_v.bias", 1, 32},
        {"model.layers.2.self_attn.q_norm.weight", "blk.2.attn_q_norm.weight", 1, 16},
        {"model.layers.2.self_attn.k_norm.weight", "blk.2.attn_k_norm.weight", 1, 16},
        {"model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight", 64, 128},
        {"model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight", 1, 64},
        {"model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight", 96, 64},
        {"model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight", 96, 64},
        {"model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", 64, 96},
        {"model.norm.weight", "output_norm.weight", 1, 64},
        {"lm_head.weight", "output.weight", 50, 64},
    };
    int64_t prev_rank = -1;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char *got = zse_hf_canonical_name(&c, names[i].hf);
        CHECK_MSG(got && strcmp(got, names[i].canon) == 0, "%s -> %s", names[i].hf, got ? got : "NULL");
        free(got);
        int64_t r = 0, k = 0;
        CHECK(zse_canonical_shape(&c, names[i].canon, &r, &k));
        CHECK_MSG(r == names[i].rows && k == names[i].cols, "%s: %lld x %lld", names[i].canon,
                  (long long)r, (long long)k);
        CHECK(zse_check_tensor_shape(&c, names[i].canon, names[i].rows, names[i].cols) == 0);
        CHECK(zse_check_tensor_shape(&c, names[i].canon, names[i].rows, names[i].cols + 1) == -1);
        CHECK(tl_has(names[i].canon));
        CHECK(zse_canonical_rank(names[i].canon) >= 0);
    }
    /* forward order: embeddings, layer 0 in block order, layer 1, ..., norm, lm_head */
    const char *order[] = {"token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight",
                           "blk.0.attn_q.bias", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                           "blk.0.attn_output.weight", "blk.0.ffn_norm.weight",
                           "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight",
                           "blk.1.attn_norm.weight", "blk.10.attn_norm.weight",
                           "output_norm.weight", "output.weight"};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        int64_t r = zse_canonical_rank(order[i]);
        CHECK_MSG(r > prev_rank, "%s out of order", order[i]);
        prev_rank = r;
    }
    const char *not_ours[] = {"model.layers.3.mlp.up_proj.weight", "model.layers.-1.mlp.up_proj.weight",
                              "model.layers.0.mlp.experts.0.up_proj.weight", "vision_tower.x",
                              "model.layers.0.self_attn.rotary_emb.inv_freq", ""};
    for (size_t i = 0; i < sizeof not_ours / sizeof not_ours[0]; i++) {
        CHECK_MSG(zse_hf_canonical_name(&c, not_ours[i]) == NULL, "%s", not_ours[i]);
        CHECK(tl_has("qwen2"));
    }
    int64_t r, k;
    CHECK(!zse_canonical_shape(&c, "blk.3.attn_q.weight", &r, &k)); /* past n_layers */
    CHECK(!zse_canonical_shape(&c, "blk.x.attn_q.weight", &r, &k));
    CHECK(!zse_canonical_shape(&c, "blk.0.attn_q.weightx", &r, &k));
    CHECK(zse_canonical_rank("blk.0.attn_q") == -1);
    CHECK(zse_canonical_rank("blk.99999999999.attn_q.weight") == -1);
    CHECK(zse_check_tensor_shape(&c, "something.else", 3, 3) == 0);
}

static void test_config_json(void)
{
    zse_config c;
    json_t *cfg = parse("{\"model_type\":\"mistral\",\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                        "\"num_key_value_heads\":2,\"hidden_size\":64,\"intermediate_size\":128,"
                        "\"vocab_size\":100,\"sliding_window\":16,\"eos_token_id\":[5,6],"
                        "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,"
                        "\"original_max_position_embeddings\":8192}}");
    CHECK(zse_hf_normalize_config(&c, cfg, NULL, NULL) == 0);
    json_decref(cfg);
    check_round_trip(&c);
    json_t *j = zse_config_to_json(&c);
    CHECK_EQ_STR(json_string_value(json_object_get(j, "arch")), "mistral");
    CHECK_EQ_INT(json_integer_value(json_object_get(j, "sliding_window")), 16);
    CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(j, "rope_scaling"), "type")), "llama3");
    /* a reader of this version refuses what it cannot run */
    const struct { const char *key; json_t *value; const char *needle; } bad[] = {
        {"n_layers", json_integer(0), "n_layers"},
        {"n_heads", json_string("4"), "n_heads"},
        {"head_dim", json_integer(7), "inconsistent"},
        {"n_kv_heads", json_integer(3), "inconsistent"},
        {"vocab_size", json_integer(-1), "vocab_size"},
        {"arch", json_integer(1), "arch"},
        {"rms_eps", json_real(-1), "rms"},
        {"rope_theta", json_real(0), "rope_theta"},
        {"bos_id", json_integer(1LL << 40), "bos_id"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        json_t *k = json_deep_copy(j);
        json_object_set_new(k, bad[i].key, bad[i].value);
        zse_config back;
        CHECK_MSG(zse_config_from_json(&back, k) == -1, "%s accepted", bad[i].key);
        CHECK_MSG(tl_has(bad[i].needle), "%s: %s", bad[i].key, zse_error_message());
        json_decref(k);
    }
    json_t *k = json_deep_copy(j);
    json_object_set_new(json_object_get(k, "rope_scaling"), "type", json_string("ntk-by-parts"));
    CHECK(zse_config_from_json(&c, k) == -1 && tl_has("ntk-by-parts"));
    json_decref(k);
    k = json_deep_copy(j);
    json_object_set_new(k, "future_field", json_string("ignored"));
    CHECK(zse_config_from_json(&c, k) == 0);
    json_decref(k);
    CHECK(zse_config_from_json(&c, NULL) == -1);
    json_decref(j);
}


/* normalizes `text` (a whole config.json): 0 / -1 */
static int normalize_text(zse_config *c, const char *text)
{
    json_t *cfg = parse(text);
    int rc = zse_hf_normalize_config(c, cfg, NULL, NULL);
    json_decref(cfg);
    return rc;
}

static int moe_layers_of(const zse_config *c, int *out)
{
    int n = 0;
    for (int l = 0; l < c->n_layers; l++)
        if (zse_config_layer_is_moe(c, l))
            out[n++] = l;
    return n;
}

/* qwen3, qwen2_moe, qwen3_moe, mixtral: what each reads, transformers' defaults for absent
 * keys, which layers run experts, and every MoE value zse refuses */
static void test_moe_configs(void)
{
    zse_config c;
    int layers[16];
#define SHAPE "\"num_attention_heads\":4,\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100"
    /* qwen3: q/k norms, an explicit head_dim, o_proj's bias with attention_bias */
    CHECK(normalize_text(&c, "{\"model_type\":\"qwen3\",\"num_hidden_layers\":2," SHAPE ",\"head_dim\":32,"
                             "\"attention_bias\":true}") == 0);
    CHECK(c.qk_norm && c.attn_bias && c.attn_out_bias && c.head_dim == 32 && c.n_experts == 0);
    CHECK(normalize_text(&c, "{\"model_type\":\"qwen3\",\"num_hidden_layers\":2," SHAPE "}") == 0);
    CHECK(!c.attn_bias && !c.attn_out_bias);
    /* qwen2_moe with transformers' defaults: 60 experts, top 4, not renormalized, a gated shared expert */
    CHECK(normalize_text(&c, "{\"model_type\":\"qwen2_moe\",\"num_hidden_layers\":3," SHAPE "}") == 0);
    CHECK_EQ_INT(c.n_experts, 60);
    CHECK_EQ_INT(c.n_experts_used, 4);
    CHECK_EQ_INT(c.expert_ffn, 1408);
    CHECK_EQ_INT(c.shared_ffn, 5632);
    CHECK(c.shared_gate && !c.norm_topk && c.attn_bias && !c.attn_out_bias);
    CHECK_EQ_INT(moe_layers_of(&c, layers), 3);
    check_round_trip(&c);
    /* decoder_sparse_step 2 and mlp_only_layers [3]: of 6 layers, 1 and 5 run experts */
    CHECK(normalize_text(&c, "{\"model_type\":\"qwen2_moe\",\"num_hidden_layers\":6," SHAPE ",\"num_experts\":8,"
                             "\"num_experts_per_tok\":2,\"moe_intermediate_size\":32,"
                             "\"shared_expert_intermediate_size\":48,\"decoder_sparse_step\":2,"
                             "\"mlp_only_layers\":[3],\"norm_topk_prob\":true,\"qkv_bias\":false}") == 0);
    CHECK(moe_layers_of(&c, layers) == 2 && layers[0] == 1 && layers[1] == 5);
    CHECK(c.norm_topk && !c.attn_bias && c.expert_ffn == 32 && c.shared_ffn == 48);
    check_round_trip(&c);
    /* qwen3_moe: num_local_experts is transformers 5's name for num_experts */
    CHECK(normalize_text(&c, "{\"model_type\":\"qwen3_moe\",\"num_hidden_layers\":2," SHAPE ",\"num_local_experts\":16,"
                             "\"num_experts_per_tok\":3,\"norm_topk_prob\":true}") == 0);
    CHECK(c.n_experts == 16 && c.n_experts_used == 3 && c.expert_ffn == 768 && c.norm_topk && c.qk_norm);
    CHECK(c.shared_ffn == 0 && !c.shared_gate);
    /* mixtral: every layer, the MLP width is the experts', always renormalized; the
     * training-only jitter is accepted */
    CHECK(normalize_text(&c, "{\"model_type\":\"mixtral\",\"num_hidden_layers\":2," SHAPE ",\"num_local_experts\":8,"
                             "\"num_experts_per_tok\":2,\"router_jitter_noise\":0.1,\"router_aux_loss_coef\":0.02,"
                             "\"head_dim\":null}") == 0);
    CHECK(c.n_experts == 8 && c.n_experts_used == 2 && c.expert_ffn == 128 && c.norm_topk && !c.attn_bias);
    CHECK_EQ_INT(moe_layers_of(&c, layers), 2);
    CHECK_EQ_INT(c.head_dim, 16);
    /* neutral values of other families' routing keys are fine */
    CHECK(normalize_text(&c, "{\"model_type\":\"qwen3_moe\",\"num_hidden_layers\":2," SHAPE ",\"scoring_func\":\"softmax\","
                             "\"routed_scaling_factor\":1.0,\"n_group\":null,\"topk_group\":1}") == 0);
    /* Qwen with no experts, or every layer dense: a dense model of that architecture */
    CHECK(normalize_text(&c, "{\"model_type\":\"qwen2_moe\",\"num_hidden_layers\":2," SHAPE ",\"num_experts\":0}") == 0);
    CHECK(c.n_experts == 0 && moe_layers_of(&c, layers) == 0);
    CHECK(normalize_text(&c, "{\"model_type\":\"qwen3_moe\",\"num_hidden_layers\":2," SHAPE ",\"mlp_only_layers\":[0,1]}") == 0);
    CHECK(c.n_experts == 0 && moe_layers_of(&c, layers) == 0);
    /* refused, each naming what */
    const struct { const char *type, *extra, *needle; } bad[] = {
        {"qwen3_moe", ",\"scoring_func\":\"sigmoid\"", "scoring_func"},
        {"qwen3_moe", ",\"topk_method\":\"noaux_tc\"", "topk_method"},
        {"qwen2_moe", ",\"routed_scaling_factor\":2.5", "routed_scaling_factor"},
        {"mixtral", ",\"n_group\":8", "n_group"},
        {"qwen3_moe", ",\"n_shared_experts\":2", "n_shared_experts"},
        {"qwen3_moe", ",\"router_bias\":true", "router_bias"},
        {"qwen3_moe", ",\"num_experts\":8,\"num_experts_per_tok\":9", "num_experts_per_tok"},
        {"qwen3_moe", ",\"num_experts_per_tok\":0", "num_experts_per_tok"},
        {"qwen3_moe", ",\"num_experts\":64,\"num_experts_per_tok\":33", "num_experts_per_tok"},
        {"qwen3_moe", ",\"num_experts\":2048", "at most 1024"},
        {"qwen3_moe", ",\"decoder_sparse_step\":0", "decoder_sparse_step"},
        {"qwen3_moe", ",\"mlp_only_layers\":\"0\"", "mlp_only_layers"},
        {"qwen3_moe", ",\"mlp_only_layers\":[\"a\"]", "mlp_only_layers"},
        {"qwen3_moe", ",\"norm_topk_prob\":\"yes\"", "norm_topk_prob"},
        {"qwen3_moe", ",\"moe_intermediate_size\":0", "intermediate size"},
        {"qwen2_moe", ",\"shared_expert_intermediate_size\":0", "shared_expert_intermediate_size"},
        {"mixtral", ",\"num_local_experts\":0", "num_local_experts"},
        {"mixtral", ",\"hidden_act\":\"gelu\"", "hidden_act"},
        {"qwen3", ",\"mlp_bias\":true", "mlp_bias"},
        {"qwen2_moe", ",\"use_sliding_window\":true,\"sliding_window\":64,\"max_window_layers\":2", "sliding window"},
        {"gpt_oss", "", "qwen3_moe"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char text[1024];
        snprintf(text, sizeof text, "{\"model_type\":\"%s\",\"num_hidden_layers\":2," SHAPE "%s}", bad[i].type,
                 bad[i].extra);
        CHECK_MSG(normalize_text(&c, text) == -1 && tl_has(bad[i].needle), "case %zu (%s%s): %s", i, bad[i].type,
                  bad[i].extra, zse_error_message());
    }
#undef SHAPE
    /* names: the router, the shared expert, and routed experts per expert or fused */
    CHECK(normalize_text(&c, "{\"model_type\":\"qwen2_moe\",\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                             "\"hidden_size\":64,\"intermediate_size\":128,\"vocab_size\":100,\"num_experts\":8,"
                             "\"moe_intermediate_size\":32,\"shared_expert_intermediate_size\":48,"
                             "\"decoder_sparse_step\":2}") == 0);
    const struct { const char *hf, *canon; int64_t rows, cols; } names[] = {
        {"model.layers.1.mlp.gate.weight", "blk.1.ffn_gate_inp.weight", 8, 64},
        {"model.layers.1.mlp.shared_expert_gate.weight", "blk.1.ffn_gate_inp_shexp.weight", 1, 64},
        {"model.layers.1.mlp.shared_expert.gate_proj.weight", "blk.1.ffn_gate_shexp.weight", 48, 64},
        {"model.layers.1.mlp.shared_expert.up_proj.weight", "blk.1.ffn_up_shexp.weight", 48, 64},
        {"model.layers.1.mlp.shared_expert.down_proj.weight", "blk.1.ffn_down_shexp.weight", 64, 48},
        {"model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight", 128, 64},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char *got = zse_hf_canonical_name(&c, names[i].hf);
        CHECK_MSG(got && strcmp(got, names[i].canon) == 0, "%s -> %s", names[i].hf, got ? got : "NULL");
        free(got);
        int64_t r = 0, k = 0;
        CHECK_MSG(zse_canonical_shape(&c, names[i].canon, &r, &k) && r == names[i].rows && k == names[i].cols,
                  "%s: %lld x %lld", names[i].canon, (long long)r, (long long)k);
    }
    int64_t r, k;
    CHECK(!zse_canonical_shape(&c, "blk.1.ffn_gate.weight", &r, &k));     /* layer 1 runs experts */
    CHECK(!zse_canonical_shape(&c, "blk.0.ffn_gate_inp.weight", &r, &k)); /* layer 0 is dense */
    CHECK(!zse_canonical_shape(&c, "blk.1.ffn_exps", &r, &k));            /* a bank, not a tensor */
    CHECK(zse_canonical_rank("blk.1.ffn_gate_inp.weight") < zse_canonical_rank("blk.1.ffn_exps") &&
          zse_canonical_rank("blk.1.ffn_exps") < zse_canonical_rank("blk.1.ffn_gate_inp_shexp.weight") &&
          zse_canonical_rank("blk.1.ffn_down_shexp.weight") < zse_canonical_rank("blk.2.attn_norm.weight"));
    const struct { const char *hf; int layer, expert, part; } refs[] = {
        {"model.layers.1.mlp.experts.7.gate_proj.weight", 1, 7, ZSE_EXPERT_GATE},
        {"model.layers.1.mlp.experts.0.up_proj.weight", 1, 0, ZSE_EXPERT_UP},
        {"model.layers.0.mlp.experts.3.down_proj.weight", 0, 3, ZSE_EXPERT_DOWN},
        {"model.layers.1.block_sparse_moe.experts.2.w1.weight", 1, 2, ZSE_EXPERT_GATE},
        {"model.layers.1.block_sparse_moe.experts.2.w3.weight", 1, 2, ZSE_EXPERT_UP},
        {"model.layers.1.block_sparse_moe.experts.2.w2.weight", 1, 2, ZSE_EXPERT_DOWN},
        {"model.layers.1.mlp.experts.gate_up_proj", 1, -1, ZSE_EXPERT_GATE_UP},
        {"model.layers.1.mlp.experts.down_proj", 1, -1, ZSE_EXPERT_DOWN},
    };
    for (size_t i = 0; i < sizeof refs / sizeof refs[0]; i++) {
        zse_hf_expert_ref ref;
        CHECK_MSG(zse_hf_expert_ref_of(&c, refs[i].hf, &ref) && ref.layer == refs[i].layer &&
                      ref.expert == refs[i].expert && ref.part == refs[i].part, "%s", refs[i].hf);
    }
    const char *not_experts[] = {"model.layers.2.mlp.experts.0.up_proj.weight", "model.layers.1.mlp.experts.x.w1.weight",
                                 "model.layers.1.mlp.experts.0.w4.weight", "model.layers.1.mlp.gate.weight",
                                 "model.layers.1.mlp.experts.0.up_proj.bias"};
    for (size_t i = 0; i < sizeof not_experts / sizeof not_experts[0]; i++) {
        zse_hf_expert_ref ref;
        CHECK_MSG(!zse_hf_expert_ref_of(&c, not_experts[i], &ref), "%s", not_experts[i]);
    }
}

int main(void)
{
    const char *fixtures = test_env("ZSE_TEST_DATA");
    tl_begin("hf");
    if (fixtures)
        test_fixtures(fixtures);
    else
        fprintf(stderr, "ZSE_TEST_DATA not set: committed fixtures not checked\n");
    test_spellings();
    test_directory();
    test_names();
    test_moe_configs();
    test_config_json();
    tl_end();
    return test_main_end();
}
