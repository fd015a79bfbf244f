/* Hugging Face model directories: config.json (+ generation_config.json,
 * tokenizer_config.json, tokenizer.json, chat template) normalized into zse_config, and
 * HF tensor names mapped to the canonical .zse names.
 *
 * Architectures are a table: an architecture is a row (which key holds its attention
 * biases, q/k norms, which layers slide, which MoE config it has), not new control flow. */
#include "format/format.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* Which layers attend through the sliding window when layer_types does not say: */
typedef enum {
    WINDOW_ALL,         /* every layer when sliding_window is set (llama, mistral, mixtral) */
    WINDOW_QWEN2,       /* with use_sliding_window, layers from max_window_layers on (qwen2, qwen3) */
    WINDOW_FLAG_ALL,    /* with use_sliding_window, every layer (qwen3_moe) */
    WINDOW_ODD_BELOW,   /* with use_sliding_window, layers i < max_window_layers with i + 1 odd
                           (transformers 5's qwen2_moe) */
} window_rule;

/* the config keys a mixture of experts is described by (none for a dense architecture) */
typedef enum { MOE_NONE, MOE_QWEN2, MOE_QWEN3, MOE_MIXTRAL } moe_style;

typedef struct {
    const char *model_type;
    const char *bias_key;       /* the config key that gives q/k/v biases; NULL: never */
    bool bias_default;          /* when the key is absent */
    bool out_bias;              /* o_proj carries a bias whenever q/k/v do (llama, qwen3) */
    bool qk_norm;               /* per-head RMSNorm of q and k (qwen3) */
    window_rule window;
    moe_style moe;
} arch_row;

static const arch_row archs[] = {
    {"llama", "attention_bias", false, true, false, WINDOW_ALL, MOE_NONE},
    {"mistral", NULL, false, false, false, WINDOW_ALL, MOE_NONE},
    {"qwen2", "attention_bias", true, false, false, WINDOW_QWEN2, MOE_NONE},
    {"qwen3", "attention_bias", false, true, true, WINDOW_QWEN2, MOE_NONE},
    {"qwen2_moe", "qkv_bias", true, false, false, WINDOW_ODD_BELOW, MOE_QWEN2},
    {"qwen3_moe", "attention_bias", false, true, true, WINDOW_FLAG_ALL, MOE_QWEN3},
    {"mixtral", NULL, false, false, false, WINDOW_ALL, MOE_MIXTRAL},
};
#define SUPPORTED_TYPES "llama, mistral, qwen2, qwen3, qwen2_moe, qwen3_moe, mixtral"

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

/* Which layers attend through the window: transformers 5's "layer_types" when the config
 * lists them, else the architecture's rule (window_rule). zse runs one window for all
 * layers, so a mix is refused. */
static int parse_sliding_window(zse_config *c, const json_t *cfg, const arch_row *arch)
{
    int window = 0, max_window_layers = 0;
    if (get_int(cfg, "sliding_window", 0, false, &window) ||
        get_int(cfg, "max_window_layers", 0, false, &max_window_layers))
        return -1;
    const bool flag = get_bool(cfg, "use_sliding_window", false);
    int n_sliding = 0;
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
    } else {
        for (int l = 0; l < c->n_layers; l++) {
            bool slides = false;
            switch (arch->window) {
            case WINDOW_ALL: slides = true; break;
            case WINDOW_QWEN2: slides = flag && l >= max_window_layers; break;
            case WINDOW_FLAG_ALL: slides = flag; break;
            case WINDOW_ODD_BELOW: slides = flag && (l + 1) % 2 == 1 && l < max_window_layers; break;
            }
            n_sliding += slides;
        }
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

/* Config keys other MoE families use to route differently (DeepSeek's grouped or sigmoid
 * routing, scaled weights, extra shared experts). The four architectures here have none of
 * them; a config that sets one describes a model whose routing zse would get wrong, so it
 * is refused rather than run with softmax top-k. `ok` is the one value that means "off". */
typedef struct {
    const char *key;
    enum { OK_ABSENT_OR_NULL, OK_STRING, OK_NUMBER } kind;
    const char *ok_string;
    double ok_number;
} routing_key;

static const routing_key foreign_routing[] = {
    {"scoring_func", OK_STRING, "softmax", 0},
    {"topk_method", OK_STRING, "greedy", 0},
    {"routed_scaling_factor", OK_NUMBER, NULL, 1.0},
    {"n_group", OK_NUMBER, NULL, 1.0},
    {"topk_group", OK_NUMBER, NULL, 1.0},
    {"n_shared_experts", OK_NUMBER, NULL, 0.0},
    {"first_k_dense_replace", OK_NUMBER, NULL, 0.0},
    {"moe_layer_freq", OK_NUMBER, NULL, 1.0},
    {"router_bias", OK_ABSENT_OR_NULL, NULL, 0},
    {"moe_router_type", OK_ABSENT_OR_NULL, NULL, 0},
};

static int check_routing_keys(const json_t *cfg)
{
    for (size_t i = 0; i < sizeof foreign_routing / sizeof foreign_routing[0]; i++) {
        const routing_key *k = &foreign_routing[i];
        json_t *v = json_object_get(cfg, k->key);
        if (!v || json_is_null(v) || (json_is_false(v) && k->kind != OK_STRING))
            continue;
        bool ok = (k->kind == OK_STRING && json_is_string(v) && strcmp(json_string_value(v), k->ok_string) == 0) ||
                  (k->kind == OK_NUMBER && json_is_number(v) && json_number_value(v) == k->ok_number);
        if (!ok) {
            char *text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
            zse_fail("config.json: '%s' is %s; zse routes experts by softmax over the router's logits and "
                     "the top k of them (Mixtral, Qwen2-MoE, Qwen3-MoE) and does not support this routing",
                     k->key, text ? text : "set");
            free(text);
            return -1;
        }
    }
    return 0;
}

/* Mixture-of-experts fields, with transformers' defaults where a key is absent (what
 * transformers itself would build). Which layers run experts follows Qwen's rule: layer l
 * does unless it is in mlp_only_layers, and only when (l + 1) % decoder_sparse_step == 0;
 * Mixtral's every layer does. */
static int parse_moe(zse_config *c, const json_t *cfg, const arch_row *arch)
{
    if (arch->moe == MOE_NONE)
        return 0;
    if (check_routing_keys(cfg) != 0)
        return -1;
    int step = 1;
    json_t *dense = NULL;
    if (arch->moe == MOE_MIXTRAL) {
        if (get_int(cfg, "num_local_experts", 8, false, &c->n_experts) ||
            get_int(cfg, "num_experts_per_tok", 2, false, &c->n_experts_used))
            return -1;
        c->expert_ffn = c->intermediate_size;   /* Mixtral's experts are its MLPs */
        c->norm_topk = true;                    /* MixtralTopKRouter always renormalizes */
        if (c->n_experts == 0)
            return zse_fail("config.json: num_local_experts is 0; a Mixtral model needs experts");
    } else {
        const bool q2 = arch->moe == MOE_QWEN2;
        /* transformers 5 writes qwen3_moe's num_experts as num_local_experts (an alias) */
        const char *count_key = json_object_get(cfg, "num_experts") ? "num_experts" : "num_local_experts";
        if (get_int(cfg, count_key, q2 ? 60 : 128, false, &c->n_experts) ||
            get_int(cfg, "num_experts_per_tok", q2 ? 4 : 8, false, &c->n_experts_used) ||
            get_int(cfg, "moe_intermediate_size", q2 ? 1408 : 768, false, &c->expert_ffn) ||
            get_int(cfg, "decoder_sparse_step", 1, false, &step))
            return -1;
        json_t *norm = json_object_get(cfg, "norm_topk_prob");
        if (norm && !json_is_boolean(norm) && !json_is_null(norm))
            return zse_fail("config.json: norm_topk_prob must be true or false");
        c->norm_topk = json_is_true(norm);
        if (q2) {
            if (get_int(cfg, "shared_expert_intermediate_size", 5632, false, &c->shared_ffn))
                return -1;
            if (c->shared_ffn == 0)
                return zse_fail("config.json: shared_expert_intermediate_size 0 (a shared expert of no "
                                "width) is not supported");
            c->shared_gate = true;
        }
        if (step < 1)
            return zse_fail("config.json: decoder_sparse_step must be at least 1");
        dense = json_object_get(cfg, "mlp_only_layers");
        if (dense && !json_is_null(dense) && !json_is_array(dense))
            return zse_fail("config.json: mlp_only_layers must be a list of layer indices");
        if (c->n_experts == 0) {    /* transformers: no layer runs experts */
            c->n_experts_used = c->expert_ffn = c->shared_ffn = 0;
            c->shared_gate = c->norm_topk = false;
            return 0;
        }
    }
    if (c->n_experts > ZSE_MAX_EXPERTS)
        return zse_fail("config.json: %d experts per layer; zse supports at most %d", c->n_experts, ZSE_MAX_EXPERTS);
    if (c->n_experts_used < 1 || c->n_experts_used > c->n_experts || c->n_experts_used > ZSE_MAX_EXPERTS_USED)
        return zse_fail("config.json: num_experts_per_tok %d must be 1..%d (and at most the %d experts)",
                        c->n_experts_used, ZSE_MAX_EXPERTS_USED, c->n_experts);
    if (c->expert_ffn < 1)
        return zse_fail("config.json: the experts' intermediate size must be positive");
    if (c->n_layers > ZSE_MAX_MOE_LAYERS)
        return zse_fail("config.json: %d layers; zse supports mixture-of-experts models of at most %d",
                        c->n_layers, ZSE_MAX_MOE_LAYERS);
    for (int l = 0; l < c->n_layers; l++) {
        bool moe = (l + 1) % step == 0;
        size_t i;
        json_t *d;
        json_array_foreach(dense, i, d) {
            if (!json_is_integer(d))
                return zse_fail("config.json: mlp_only_layers[%zu] is not a layer index", i);
            if (json_integer_value(d) == l)
                moe = false;
        }
        if (moe)
            c->moe_layers[l / 64] |= (uint64_t)1 << (l % 64);
    }
    if (zse_config_moe_layer_count(c) == 0) {   /* every layer dense: a dense model of this arch */
        c->n_experts = c->n_experts_used = c->expert_ffn = c->shared_ffn = 0;
        c->shared_gate = c->norm_topk = false;
    }
    return 0;
}

bool zse_config_layer_is_moe(const zse_config *c, int l)
{
    return c->n_experts > 0 && l >= 0 && l < c->n_layers && l < ZSE_MAX_MOE_LAYERS &&
           (c->moe_layers[l / 64] >> (l % 64) & 1);
}

int zse_config_moe_layer_count(const zse_config *c)
{
    int n = 0;
    for (int l = 0; l < c->n_layers && l < ZSE_MAX_MOE_LAYERS; l++)
        n += (int)(c->moe_layers[l / 64] >> (l % 64) & 1);
    return n;
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
        return zse_fail("config.json: model_type '%s' is not supported (supported: " SUPPORTED_TYPES ")", mt);
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
    c->attn_bias = arch->bias_key ? get_bool(cfg, arch->bias_key, arch->bias_default) : false;
    c->attn_out_bias = arch->out_bias && c->attn_bias;
    c->mlp_bias = get_bool(cfg, "mlp_bias", false);
    if (c->mlp_bias)
        return zse_fail("config.json: mlp_bias is true; MLP biases are not supported");
    c->qk_norm = arch->qk_norm;
    if (parse_sliding_window(c, cfg, arch) != 0 || parse_moe(c, cfg, arch) != 0)
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
        /* range first: converting a double past json_int_t's range is undefined */
        if (fabs(v) < 9e15 && v == (double)(json_int_t)v) {
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
    /* MoE layers: the router (Qwen: mlp.gate; Mixtral: block_sparse_moe.gate, or mlp.gate as
     * transformers 5 renames it) and Qwen2-MoE's shared expert with its gate */
    {"mlp.gate.weight", "ffn_gate_inp.weight"},
    {"block_sparse_moe.gate.weight", "ffn_gate_inp.weight"},
    {"mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight"},
    {"mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight"},
    {"mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"},
    {"mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight"},
};

static const char *const expert_part_names[ZSE_EXPERT_PARTS] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};

const char *zse_expert_part_name(int part)
{
    return part >= 0 && part < ZSE_EXPERT_PARTS ? expert_part_names[part] : "ffn_gate_up_exps";
}

/* the name of one expert's projection after "experts.E.": Qwen's gate/up/down_proj,
 * Mixtral's w1 (gate), w3 (up), w2 (down) */
static const struct {
    const char *suffix;
    int part;
} expert_suffixes[] = {
    {"gate_proj.weight", ZSE_EXPERT_GATE}, {"up_proj.weight", ZSE_EXPERT_UP},
    {"down_proj.weight", ZSE_EXPERT_DOWN}, {"w1.weight", ZSE_EXPERT_GATE},
    {"w3.weight", ZSE_EXPERT_UP},          {"w2.weight", ZSE_EXPERT_DOWN},
};

/* "digits." at p: the number, and p moved past the dot; -1 when p is not that */
static long take_index(const char **p)
{
    const char *q = *p;
    long n = 0;
    if (*q < '0' || *q > '9')
        return -1;
    while (*q >= '0' && *q <= '9') {
        n = n * 10 + (*q++ - '0');
        if (n > 1000000)
            return -1;
    }
    if (*q != '.')
        return -1;
    *p = q + 1;
    return n;
}

bool zse_hf_expert_ref_of(const zse_config *c, const char *hf, zse_hf_expert_ref *ref)
{
    const char *p = hf;
    if (c->n_experts <= 0 || strncmp(p, "model.layers.", 13) != 0)
        return false;
    p += 13;
    long layer = take_index(&p);
    if (layer < 0 || layer >= c->n_layers)
        return false;
    if (strncmp(p, "mlp.experts.", 12) == 0)
        p += 12;
    else if (strncmp(p, "block_sparse_moe.experts.", 25) == 0)
        p += 25;
    else
        return false;
    ref->layer = (int)layer;
    /* transformers 5's fused form: every expert in one 3-D tensor */
    if (strcmp(p, "gate_up_proj") == 0 || strcmp(p, "down_proj") == 0) {
        ref->expert = -1;
        ref->part = p[0] == 'g' ? ZSE_EXPERT_GATE_UP : ZSE_EXPERT_DOWN;
        return true;
    }
    long e = take_index(&p);
    if (e < 0)
        return false;
    for (size_t i = 0; i < sizeof expert_suffixes / sizeof expert_suffixes[0]; i++)
        if (strcmp(p, expert_suffixes[i].suffix) == 0) {
            ref->expert = (int)e;
            ref->part = expert_suffixes[i].part;
            return true;
        }
    return false;
}

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
    if (o && c->n_experts > 0) {
        /* only in files with experts, so a dense file's header stays format 1.0's */
        json_t *layers = json_array();
        for (int l = 0; l < c->n_layers; l++)
            if (zse_config_layer_is_moe(c, l))
                json_array_append_new(layers, json_integer(l));
        json_object_set_new(o, "expert_ffn", json_integer(c->expert_ffn));
        json_object_set_new(o, "shared_ffn", json_integer(c->shared_ffn));
        json_object_set_new(o, "shared_gate", json_boolean(c->shared_gate));
        json_object_set_new(o, "router", json_string("softmax_topk"));
        json_object_set_new(o, "norm_topk", json_boolean(c->norm_topk));
        json_object_set_new(o, "moe_layers", layers);
    }
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

/* the MoE keys of a header config (absent in dense files: n_experts 0) */
static int moe_from_json(zse_config *c, const json_t *o)
{
    const int big = 1 << 30;
    if (need_int(o, "n_experts", 0, ZSE_MAX_EXPERTS, &c->n_experts))
        return -1;
    if (c->n_experts == 0)
        return 0;
    if (need_int(o, "n_experts_used", 1, c->n_experts < ZSE_MAX_EXPERTS_USED ? c->n_experts : ZSE_MAX_EXPERTS_USED,
                 &c->n_experts_used) ||
        need_int(o, "expert_ffn", 1, big, &c->expert_ffn) || need_int(o, "shared_ffn", 0, big, &c->shared_ffn))
        return -1;
    const char *router = json_string_value(json_object_get(o, "router"));
    if (!router || strcmp(router, "softmax_topk") != 0)
        return zse_fail("header config: router '%s' is unknown to this zse; upgrade zse", router ? router : "?");
    c->shared_gate = get_bool(o, "shared_gate", false);
    c->norm_topk = get_bool(o, "norm_topk", false);
    if (c->n_layers > ZSE_MAX_MOE_LAYERS)
        return zse_fail("header config: %d layers with experts (at most %d)", c->n_layers, ZSE_MAX_MOE_LAYERS);
    json_t *layers = json_object_get(o, "moe_layers");
    size_t i;
    json_t *v;
    if (!json_is_array(layers) || json_array_size(layers) == 0)
        return zse_fail("header config: 'moe_layers' must list the layers that run experts");
    json_array_foreach(layers, i, v) {
        json_int_t l = json_integer_value(v);
        if (!json_is_integer(v) || l < 0 || l >= c->n_layers)
            return zse_fail("header config: moe_layers[%zu] is not a layer of the %d", i, c->n_layers);
        c->moe_layers[l / 64] |= (uint64_t)1 << (l % 64);
    }
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
    if (moe_from_json(c, o) != 0)
        return -1;
    return check_numbers(c, "header config");
}
