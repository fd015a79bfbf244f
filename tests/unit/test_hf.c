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
    test_config_json();
    tl_end();
    return test_main_end();
}
