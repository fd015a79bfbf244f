/* Hugging Face model directories: config.json (+ generation_config.json,
 * tokenizer_config.json, tokenizer.json, chat template) normalized into zse_config, and
 * HF tensor names mapped to the canonical .zse names.
 *
 * Architectures are a table: adding qwen3 / mixtral / qwen2_moe means a row here (flags
 * and the extra tensor names), not new control flow. */
#include "format/format.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    const char *model_type;
    bool attn_bias_default;     /* qwen2 has q/k/v biases */
    bool qk_norm;               /* qwen3 */
    bool sliding_window_flag;   /* window only when use_sliding_window (qwen2) */
} arch_row;

static const arch_row archs[] = {
    {"llama", false, false, false},
    {"mistral", false, false, false},
    {"qwen2", true, false, true},
};

static const arch_row *find_arch(const char *t)
{
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++)
        if (strcmp(archs[i].model_type, t) == 0)
            return &archs[i];
    return NULL;
}

static int get_int(const json_t *o, const char *key, int dflt, bool required, int *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required)
            return zse_fail("config.json: required field '%s' is missing", key);
        *out = dflt;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 30))
        return zse_fail("config.json: field '%s' must be a non-negative integer", key);
    *out = (int)json_integer_value(v);
    return 0;
}

static double get_num(const json_t *o, const char *key, double dflt)
{
    json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : dflt;
}

/* a JSON number as an int in [0, 2^30]; dflt when absent or not finite (a cast of an
 * out-of-range double would be undefined behaviour) */
static int get_num_int(const json_t *o, const char *key, int dflt)
{
    double v = get_num(o, key, dflt);
    if (!isfinite(v))
        return dflt;
    return v < 0 ? 0 : v > (double)(1 << 30) ? 1 << 30 : (int)v;
}

/* a token id: an integer in [0, 2^30), else -1 */
static int token_id(const json_t *v)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= (1 << 30))
        return -1;
    return (int)json_integer_value(v);
}

/* what the forward pass divides by or takes powers of: finite and in range */
static int check_numbers(const zse_config *c, const char *where)
{
    if (!(c->rms_eps > 0 && c->rms_eps < 1))
        return zse_fail("%s: rms_norm_eps %g must be in (0, 1)", where, (double)c->rms_eps);
    if (!(c->rope_theta > 1 && isfinite(c->rope_theta)))
        return zse_fail("%s: rope_theta %g must be a finite number above 1", where, c->rope_theta);
    const double *nums[] = {&c->rope_scaling.factor, &c->rope_scaling.low_freq_factor,
                            &c->rope_scaling.high_freq_factor, &c->rope_scaling.attn_factor,
                            &c->rope_scaling.beta_fast, &c->rope_scaling.beta_slow};
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++)
        if (!isfinite(*nums[i]) || *nums[i] < 0)
            return zse_fail("%s: rope scaling parameters must be finite and non-negative", where);
    if (!(c->rope_scaling.factor > 0))
        return zse_fail("%s: rope scaling factor must be positive", where);
    return 0;
}

static bool get_bool(const json_t *o, const char *key, bool dflt)
{
    json_t *v = json_object_get(o, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

static int parse_rope_scaling(zse_config *c, const json_t *cfg)
{
    /* transformers 5 keeps theta and scaling in rope_parameters; released models use
     * rope_theta and rope_scaling at the top level */
    const json_t *rp = json_object_get(cfg, "rope_parameters");
    const json_t *rs = json_object_get(cfg, "rope_scaling");
    c->rope_theta = get_num(cfg, "rope_theta", get_num(rp, "rope_theta", 10000.0));
    const json_t *src = json_is_object(rs) ? rs : rp;
    c->rope_scaling.type = ZSE_ROPE_NONE;
    c->rope_scaling.factor = 1.0;
    if (!json_is_object(src))
        return 0;
    const char *type = json_string_value(json_object_get(src, "rope_type"));
    if (!type)
        type = json_string_value(json_object_get(src, "type"));
    if (!type || strcmp(type, "default") == 0)
        return 0;
    c->rope_scaling.factor = get_num(src, "factor", 1.0);
    c->rope_scaling.original_max_position =
        get_num_int(src, "original_max_position_embeddings", c->max_position);
    if (strcmp(type, "linear") == 0) {
        c->rope_scaling.type = ZSE_ROPE_LINEAR;
    } else if (strcmp(type, "dynamic") == 0) {
        c->rope_scaling.type = ZSE_ROPE_DYNAMIC;
    } else if (strcmp(type, "llama3") == 0) {
        c->rope_scaling.type = ZSE_ROPE_LLAMA3;
        c->rope_scaling.low_freq_factor = get_num(src, "low_freq_factor", 1.0);
        c->rope_scaling.high_freq_factor = get_num(src, "high_freq_factor", 4.0);
    } else if (strcmp(type, "yarn") == 0) {
        c->rope_scaling.type = ZSE_ROPE_YARN;
        c->rope_scaling.attn_factor = get_num(src, "attention_factor", 0.0);
        c->rope_scaling.beta_fast = get_num(src, "beta_fast", 32.0);
        c->rope_scaling.beta_slow = get_num(src, "beta_slow", 1.0);
    } else {
        return zse_fail("config.json: rope scaling type '%s' is not supported "
                        "(linear, dynamic, llama3 and yarn are)", type);
    }
    return 0;
}

/* Which layers attend through the window. transformers 5 lists "layer_types"; older qwen2
 * configs say use_sliding_window and max_window_layers (layers from that index on slide,
 * so max_window_layers >= the layer count means none do); mistral slides every layer when
 * sliding_window is set. zse runs one window for all layers, so a mix is refused. */
static int parse_sliding_window(zse_config *c, const json_t *cfg, const arch_row *arch)
{
    int window = 0;
    if (get_int(cfg, "sliding_window", 0, false, &window))
        return -1;
    int first_sliding = 0, n_sliding = 0;
    json_t *types = json_object_get(cfg, "layer_types");
    if (json_is_array(types)) {
        if (json_array_size(types) != (size_t)c->n_layers)
            return zse_fail("config.json: layer_types has %zu entries for %d layers",
                            json_array_size(types), c->n_layers);
        size_t i;
        json_t *t;
        json_array_foreach(types, i, t) {
            const char *s = json_string_value(t);
            if (s && strcmp(s, "sliding_attention") == 0)
                n_sliding++;
            else if (!s || strcmp(s, "full_attention") != 0)
                return zse_fail("config.json: layer_types[%zu] is '%s' (full_attention and "
                                "sliding_attention are supported)", i, s ? s : "?");
        }
    } else if (arch->sliding_window_flag) {
        if (!get_bool(cfg, "use_sliding_window", false))
            window = 0;
        if (get_int(cfg, "max_window_layers", 0, false, &first_sliding))
            return -1;
        n_sliding = first_sliding < c->n_layers ? c->n_layers - first_sliding : 0;
    } else {
        n_sliding = c->n_layers;
    }
    if (window == 0 || n_sliding == 0) {
        c->sliding_window = 0;
        return 0;
    }
    if (n_sliding != c->n_layers)
        return zse_fail("config.json: %d of %d layers use a sliding window of %d; zse runs one "
                        "attention kind for every layer", n_sliding, c->n_layers, window);
    c->sliding_window = window;
    return 0;
}

/* eos ids: int or list in config.json and generation_config.json, merged, deduplicated */
static void add_eos_ids(zse_config *c, const json_t *v)
{
    if (json_is_integer(v)) {
        int id = token_id(v);
        for (int i = 0; i < c->n_eos; i++)
            if (c->eos_ids[i] == id)
                return;
        if (c->n_eos < ZSE_MAX_EOS && id >= 0)
            c->eos_ids[c->n_eos++] = id;
    } else if (json_is_array(v)) {
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) add_eos_ids(c, x);
    }
}

int zse_hf_normalize_config(zse_config *c, const json_t *cfg, const json_t *gen,
                            const json_t *tok_cfg)
{
    (void)tok_cfg;
    memset(c, 0, sizeof *c);
    if (!json_is_object(cfg))
        return zse_fail("config.json is not a JSON object");
    const char *mt = json_string_value(json_object_get(cfg, "model_type"));
    if (!mt)
        return zse_fail("config.json has no model_type");
    const arch_row *arch = find_arch(mt);
    if (!arch)
        return zse_fail("config.json: model_type '%s' is not supported (supported: llama, mistral, qwen2)", mt);
    snprintf(c->arch, sizeof c->arch, "%s", mt);
    if (get_int(cfg, "num_hidden_layers", 0, true, &c->n_layers) ||
        get_int(cfg, "num_attention_heads", 0, true, &c->n_heads) ||
        get_int(cfg, "hidden_size", 0, true, &c->hidden_size) ||
        get_int(cfg, "intermediate_size", 0, true, &c->intermediate_size) ||
        get_int(cfg, "vocab_size", 0, true, &c->vocab_size) ||
        get_int(cfg, "num_key_value_heads", c->n_heads, false, &c->n_kv_heads) ||
        get_int(cfg, "max_position_embeddings", 4096, false, &c->max_position))
        return -1;
    if (c->n_layers == 0 || c->n_heads == 0 || c->hidden_size == 0 || c->vocab_size == 0 ||
        c->intermediate_size == 0)
        return zse_fail("config.json: layers, heads, hidden, intermediate and vocab sizes must be positive");
    if (get_int(cfg, "head_dim", c->hidden_size / c->n_heads, false, &c->head_dim))
        return -1;
    if (c->n_kv_heads == 0 || c->n_heads % c->n_kv_heads != 0)
        return zse_fail("config.json: num_attention_heads (%d) must be a multiple of num_key_value_heads (%d)",
                        c->n_heads, c->n_kv_heads);
    if (c->head_dim == 0 || c->head_dim % 2 != 0 || c->head_dim > 1024)
        return zse_fail("config.json: head_dim %d must be even and at most 1024", c->head_dim);
    double eps = get_num(cfg, "rms_norm_eps", 1e-6);
    c->rms_eps = eps > 0 && eps < 1 ? (float)eps : 0.0f;
    if (parse_rope_scaling(c, cfg) != 0 || check_numbers(c, "config.json") != 0)
        return -1;
    c->tie_embeddings = get_bool(cfg, "tie_word_embeddings", false);
    c->attn_bias = get_bool(cfg, "attention_bias", arch->attn_bias_default);
    c->attn_out_bias = false;
    c->mlp_bias = get_bool(cfg, "mlp_bias", false);
    c->qk_norm = arch->qk_norm;
    if (parse_sliding_window(c, cfg, arch) != 0)
        return -1;
    json_t *act = json_object_get(cfg, "hidden_act");
    if (act && !(json_is_string(act) && (strcmp(json_string_value(act), "silu") == 0 ||
                                         strcmp(json_string_value(act), "swish") == 0)))
        return zse_fail("config.json: hidden_act '%s' is not supported (silu is)",
                        json_is_string(act) ? json_string_value(act) : "?");
    c->bos_id = -1;
    c->pad_id = -1;
    c->bos_id = token_id(json_object_get(gen, "bos_token_id"));
    if (c->bos_id < 0)
        c->bos_id = token_id(json_object_get(cfg, "bos_token_id"));
    c->pad_id = token_id(json_object_get(gen, "pad_token_id"));
    if (c->pad_id < 0)
        c->pad_id = token_id(json_object_get(cfg, "pad_token_id"));
    add_eos_ids(c, json_object_get(gen, "eos_token_id"));
    add_eos_ids(c, json_object_get(cfg, "eos_token_id"));
    return 0;
}

/* tokenizer_config's eos_token / bos_token / pad_token (a string, or an AddedToken object
 * with "content") → id through tokenizer.json's added tokens. EOS ids are merged into
 * those of the configs; BOS and PAD fill in only where the configs gave none. */
static void resolve_token_names(zse_config *c, const json_t *tok_cfg, const json_t *tok_json)
{
    json_t *added = json_object_get(tok_json, "added_tokens");
    const char *keys[3] = {"eos_token", "bos_token", "pad_token"};
    for (int k = 0; k < 3; k++) {
        json_t *v = json_object_get(tok_cfg, keys[k]);
        const char *name = json_is_string(v) ? json_string_value(v)
                                             : json_string_value(json_object_get(v, "content"));
        if (!name)
            continue;
        size_t i;
        json_t *t;
        json_array_foreach(added, i, t) {
            const char *content = json_string_value(json_object_get(t, "content"));
            json_t *id = json_object_get(t, "id");
            if (!content || token_id(id) < 0 || strcmp(content, name) != 0)
                continue;
            if (k == 0)
                add_eos_ids(c, id);
            else if (k == 1 && c->bos_id < 0)
                c->bos_id = token_id(id);
            else if (k == 2 && c->pad_id < 0)
                c->pad_id = token_id(id);
        }
    }
}

/* jansson refuses integers beyond 64 bits (tokenizer_config's model_max_length is often
 * 1e30); on that error, load with integers as reals and turn exact ones back into
 * integers, so ids stay integers and the huge value becomes a real */
static json_t *integral_reals_to_ints(json_t *j)
{
    if (json_is_real(j)) {
        double v = json_real_value(j);
        if (v == (double)(json_int_t)v && fabs(v) < 9e15) {
            json_decref(j);
            return json_integer((json_int_t)v);
        }
    } else if (json_is_object(j)) {
        const char *k;
        json_t *v;
        void *tmp;
        json_object_foreach_safe(j, tmp, k, v) json_object_set_new(j, k, integral_reals_to_ints(json_incref(v)));
    } else if (json_is_array(j)) {
        for (size_t i = 0; i < json_array_size(j); i++)
            json_array_set_new(j, i, integral_reals_to_ints(json_incref(json_array_get(j, i))));
    }
    return j;
}

static json_t *load_json_lenient(const char *path, json_error_t *err)
{
    json_t *j = json_load_file(path, JSON_DECODE_ANY, err);
    if (!j && strstr(err->text, "too big"))
        j = integral_reals_to_ints(json_load_file(path, JSON_DECODE_ANY | JSON_DECODE_INT_AS_REAL, err));
    return j;
}

static json_t *load_json_optional(const char *dir, const char *name, int *rc)
{
    char *path = zse_path_join(dir, name);
    if (!path) {
        *rc = -1;
        return NULL;
    }
    json_t *j = NULL;
    if (zse_file_exists(path)) {
        json_error_t err;
        j = load_json_lenient(path, &err);
        if (!j)
            *rc = zse_fail("%s: invalid JSON at line %d: %s", path, err.line, err.text);
    }
    free(path);
    return j;
}

/* chat template: chat_template.jinja, else tokenizer_config's chat_template (a string,
 * or a list of {name, template} where "default" is the one used for chat) */
static char *find_chat_template(const char *dir, const json_t *tok_cfg)
{
    char *path = zse_path_join(dir, "chat_template.jinja");
    if (path && zse_file_exists(path)) {
        char *t = zse_read_file(path, NULL);
        free(path);
        return t;
    }
    free(path);
    json_t *ct = json_object_get(tok_cfg, "chat_template");
    if (json_is_string(ct))
        return zse_strdup(json_string_value(ct));
    if (json_is_array(ct)) {
        size_t i;
        json_t *e;
        json_array_foreach(ct, i, e) {
            const char *name = json_string_value(json_object_get(e, "name"));
            const char *tpl = json_string_value(json_object_get(e, "template"));
            if (name && tpl && strcmp(name, "default") == 0)
                return zse_strdup(tpl);
        }
    }
    zse_error_clear();
    return NULL;
}

int zse_hf_open(zse_hf_dir *d, const char *dir)
{
    memset(d, 0, sizeof *d);
    int rc = 0;
    char *cfg_path = zse_path_join(dir, "config.json");
    if (!cfg_path)
        return -1;
    if (!zse_file_exists(cfg_path)) {
        free(cfg_path);
        return zse_fail("%s: no config.json here; is this a Hugging Face model directory?", dir);
    }
    free(cfg_path);
    d->config_json = load_json_optional(dir, "config.json", &rc);
    d->generation_config = load_json_optional(dir, "generation_config.json", &rc);
    d->tokenizer_config = load_json_optional(dir, "tokenizer_config.json", &rc);
    if (rc != 0)
        goto fail;
    d->tokenizer_json_path = zse_path_join(dir, "tokenizer.json");
    if (!d->tokenizer_json_path)
        goto fail;
    if (!zse_file_exists(d->tokenizer_json_path)) {
        zse_fail("%s: tokenizer.json is missing (zse needs the fast-tokenizer file; "
                 "save the tokenizer with transformers to create it)", dir);
        goto fail;
    }
    if (zse_hf_normalize_config(&d->config, d->config_json, d->generation_config,
                                d->tokenizer_config) != 0) {
        zse_error_prefix("%s", dir);
        goto fail;
    }
    {
        /* only added_tokens is needed here; tokenizer.json is parsed fully elsewhere */
        json_error_t err;
        json_t *tj = json_load_file(d->tokenizer_json_path, 0, &err);
        if (!tj) {
            zse_fail("%s: invalid JSON at line %d: %s", d->tokenizer_json_path, err.line, err.text);
            goto fail;
        }
        resolve_token_names(&d->config, d->tokenizer_config, tj);
        json_decref(tj);
    }
    d->chat_template = find_chat_template(dir, d->tokenizer_config);
    return 0;
fail:
    zse_hf_close(d);
    return -1;
}

void zse_hf_close(zse_hf_dir *d)
{
    json_decref(d->config_json);
    json_decref(d->generation_config);
    json_decref(d->tokenizer_config);
    free(d->tokenizer_json_path);
    free(d->chat_template);
    memset(d, 0, sizeof *d);
}

/* HF suffix (after "model.layers.N.") → canonical suffix (after "blk.N.") */
static const char *const layer_names[][2] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.q_norm.weight", "attn_q_norm.weight"},
    {"self_attn.k_norm.weight", "attn_k_norm.weight"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"self_attn.o_proj.bias", "attn_output.bias"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
};

char *zse_hf_canonical_name(const zse_config *c, const char *hf)
{
    if (strcmp(hf, "model.embed_tokens.weight") == 0)
        return zse_strdup("token_embd.weight");
    if (strcmp(hf, "model.norm.weight") == 0)
        return zse_strdup("output_norm.weight");
    if (strcmp(hf, "lm_head.weight") == 0)
        return zse_strdup("output.weight");
    int layer, used = 0;
    if (sscanf(hf, "model.layers.%d.%n", &layer, &used) == 1 && used > 0 && layer >= 0 &&
        layer < c->n_layers) {
        for (size_t i = 0; i < sizeof layer_names / sizeof layer_names[0]; i++)
            if (strcmp(hf + used, layer_names[i][0]) == 0) {
                char buf[128];
                snprintf(buf, sizeof buf, "blk.%d.%s", layer, layer_names[i][1]);
                return zse_strdup(buf);
            }
    }
    zse_fail("tensor '%s' is not used by the %s architecture", hf, c->arch);
    return NULL;
}

/* ---- config <-> JSON ---------------------------------------------------------------- */

static const char *const rope_names[] = {"none", "linear", "dynamic", "llama3", "yarn"};

json_t *zse_config_to_json(const zse_config *c)
{
    json_t *eos = json_array();
    for (int i = 0; i < c->n_eos; i++)
        json_array_append_new(eos, json_integer(c->eos_ids[i]));
    json_t *rs = json_pack("{s:s, s:f, s:f, s:f, s:i, s:f, s:f, s:f}",
                           "type", rope_names[c->rope_scaling.type],
                           "factor", c->rope_scaling.factor,
                           "low_freq_factor", c->rope_scaling.low_freq_factor,
                           "high_freq_factor", c->rope_scaling.high_freq_factor,
                           "original_max_position", c->rope_scaling.original_max_position,
                           "attn_factor", c->rope_scaling.attn_factor,
                           "beta_fast", c->rope_scaling.beta_fast,
                           "beta_slow", c->rope_scaling.beta_slow);
    json_t *o = json_pack(
        "{s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f, s:o, s:b, s:b, s:b, s:b, s:b,"
        " s:i, s:i, s:i, s:i, s:i, s:o}",
        "arch", c->arch, "n_layers", c->n_layers, "n_heads", c->n_heads, "n_kv_heads",
        c->n_kv_heads, "head_dim", c->head_dim, "hidden_size", c->hidden_size,
        "intermediate_size", c->intermediate_size, "vocab_size", c->vocab_size,
        "max_position", c->max_position, "rms_eps", (double)c->rms_eps, "rope_theta",
        c->rope_theta, "rope_scaling", rs, "tie_embeddings", c->tie_embeddings, "attn_bias",
        c->attn_bias, "attn_out_bias", c->attn_out_bias, "mlp_bias", c->mlp_bias, "qk_norm",
        c->qk_norm, "sliding_window", c->sliding_window, "n_experts", c->n_experts,
        "n_experts_used", c->n_experts_used, "bos_id", c->bos_id, "pad_id", c->pad_id,
        "eos_ids", eos);
    return o;
}

static int need_int(const json_t *o, const char *k, int lo, int hi, int *out)
{
    json_t *v = json_object_get(o, k);
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return zse_fail("header config: '%s' is missing or out of range [%d, %d]", k, lo, hi);
    *out = (int)json_integer_value(v);
    return 0;
}

int zse_config_from_json(zse_config *c, const json_t *o)
{
    memset(c, 0, sizeof *c);
    if (!json_is_object(o))
        return zse_fail("header has no config object");
    const char *arch = json_string_value(json_object_get(o, "arch"));
    if (!arch || strlen(arch) >= sizeof c->arch)
        return zse_fail("header config: 'arch' is missing");
    snprintf(c->arch, sizeof c->arch, "%s", arch);
    const int big = 1 << 30;
    if (need_int(o, "n_layers", 1, 100000, &c->n_layers) ||
        need_int(o, "n_heads", 1, 100000, &c->n_heads) ||
        need_int(o, "n_kv_heads", 1, 100000, &c->n_kv_heads) ||
        need_int(o, "head_dim", 2, 1024, &c->head_dim) ||
        need_int(o, "hidden_size", 1, big, &c->hidden_size) ||
        need_int(o, "intermediate_size", 1, big, &c->intermediate_size) ||
        need_int(o, "vocab_size", 1, big, &c->vocab_size) ||
        need_int(o, "max_position", 1, big, &c->max_position) ||
        need_int(o, "sliding_window", 0, big, &c->sliding_window) ||
        need_int(o, "bos_id", -1, big, &c->bos_id) || need_int(o, "pad_id", -1, big, &c->pad_id))
        return -1;
    if (c->n_heads % c->n_kv_heads != 0 || c->head_dim % 2 != 0)
        return zse_fail("header config: heads %d / kv heads %d / head_dim %d are inconsistent",
                        c->n_heads, c->n_kv_heads, c->head_dim);
    double eps = get_num(o, "rms_eps", 1e-6);
    c->rms_eps = eps > 0 && eps < 1 ? (float)eps : 0.0f;
    c->rope_theta = get_num(o, "rope_theta", 10000.0);
    c->tie_embeddings = get_bool(o, "tie_embeddings", false);
    c->attn_bias = get_bool(o, "attn_bias", false);
    c->attn_out_bias = get_bool(o, "attn_out_bias", false);
    c->mlp_bias = get_bool(o, "mlp_bias", false);
    c->qk_norm = get_bool(o, "qk_norm", false);
    json_t *rs = json_object_get(o, "rope_scaling");
    const char *rt = json_string_value(json_object_get(rs, "type"));
    c->rope_scaling.type = ZSE_ROPE_NONE;
    if (rt) {
        int found = -1;
        for (int i = 0; i < (int)(sizeof rope_names / sizeof rope_names[0]); i++)
            if (strcmp(rt, rope_names[i]) == 0)
                found = i;
        if (found < 0)
            return zse_fail("header config: rope scaling type '%s' is unknown to this zse; "
                            "upgrade zse", rt);
        c->rope_scaling.type = (zse_rope_type)found;
    }
    c->rope_scaling.factor = get_num(rs, "factor", 1.0);
    c->rope_scaling.low_freq_factor = get_num(rs, "low_freq_factor", 1.0);
    c->rope_scaling.high_freq_factor = get_num(rs, "high_freq_factor", 4.0);
    c->rope_scaling.original_max_position = get_num_int(rs, "original_max_position", 0);
    c->rope_scaling.attn_factor = get_num(rs, "attn_factor", 0);
    c->rope_scaling.beta_fast = get_num(rs, "beta_fast", 32);
    c->rope_scaling.beta_slow = get_num(rs, "beta_slow", 1);
    c->n_eos = 0;
    add_eos_ids(c, json_object_get(o, "eos_ids"));
    return check_numbers(c, "header config");
}
