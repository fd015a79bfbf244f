/* LoRA adapters: PEFT directories (adapter_config.json + adapter_model.safetensors) and
 * .zsa files (zse convert-adapter; docs/FORMAT.md §LoRA adapters), read into one form:
 * per layer and projection, the rank, the scale and the f16 parts A [rank][in] and
 * B transposed [rank][out].
 *
 * A PEFT directory is checked against what PEFT can save: only a plain LoRA on the seven
 * projections of a decoder layer is accepted; DoRA, biases, embedding and lm_head adapters,
 * modules_to_save, trainable tokens and the like are refused with the field or tensor that
 * carries them, never silently dropped (an adapter half applied is another model). */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "format/format.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *const module_names[ZSE_LORA_MODULES] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                                           "ffn_gate", "ffn_up", "ffn_down"};
static const char *const hf_modules[ZSE_LORA_MODULES] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                                         "mlp.down_proj"};

const char *zse_lora_module_name(int module)
{
    return module >= 0 && module < ZSE_LORA_MODULES ? module_names[module] : "?";
}

const char *zse_lora_hf_module(int module)
{
    return module >= 0 && module < ZSE_LORA_MODULES ? strchr(hf_modules[module], '.') + 1 : "?";
}

bool zse_lora_base_dims(const zse_config *c, int layer, int module, int64_t *in, int64_t *out)
{
    const int64_t hidden = c->hidden_size, q = (int64_t)c->n_heads * c->head_dim,
                  kv = (int64_t)c->n_kv_heads * c->head_dim, ffn = c->intermediate_size;
    if (layer < 0 || layer >= c->n_layers || module < 0 || module >= ZSE_LORA_MODULES)
        return false;
    if (module >= ZSE_LORA_GATE && zse_config_layer_is_moe(c, layer))
        return false;
    static const int in_kind[] = {0, 0, 0, 1, 0, 0, 2}, out_kind[] = {1, 3, 3, 0, 2, 2, 0};
    const int64_t width[] = {hidden, q, ffn, kv};
    *in = width[in_kind[module]];
    *out = width[out_kind[module]];
    return true;
}

void zse_lora_close(zse_lora_file *f)
{
    free(f->parts);
    free(f->path);
    free(f->owned);
    json_decref(f->peft_config);
    zse_map_close(&f->map);
    memset(f, 0, sizeof *f);
}

static int alloc_parts(zse_lora_file *f, int n_layers)
{
    if (n_layers < 1 || n_layers > ZSE_LORA_MAX_LAYERS)
        return zse_fail("%s: an adapter of %d layers is not possible", f->path, n_layers);
    f->n_layers = n_layers;
    f->parts = zse_calloc((size_t)n_layers * ZSE_LORA_MODULES, sizeof *f->parts);
    return f->parts ? 0 : -1;
}

/* ---- PEFT's adapter_config.json ------------------------------------------------------------ */

typedef struct {
    int r;
    double alpha;
    bool rslora;
    const json_t *rank_pattern, *alpha_pattern;   /* objects, or NULL */
} peft_config;

static bool json_truthy(const json_t *v)
{
    return v && !json_is_null(v) && !json_is_false(v) &&
           !(json_is_array(v) && json_array_size(v) == 0) && !(json_is_object(v) && json_object_size(v) == 0) &&
           !(json_is_string(v) && json_string_length(v) == 0);
}

/* a rank from the config (r or a rank_pattern value) */
static int config_rank(const char *file, const char *field, const json_t *v, int *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > ZSE_LORA_MAX_RANK)
        return zse_fail("%s: %s must be an integer rank from 1 to %d%s", file, field, ZSE_LORA_MAX_RANK,
                        json_is_integer(v) && json_integer_value(v) > ZSE_LORA_MAX_RANK
                            ? " (zse serves adapters of rank up to 128)" : "");
    *out = (int)json_integer_value(v);
    return 0;
}

static int config_alpha(const char *file, const char *field, const json_t *v, double *out)
{
    if (!json_is_number(v) || !isfinite(json_number_value(v)))
        return zse_fail("%s: %s must be a finite number", file, field);
    *out = json_number_value(v);
    return 0;
}

/* Fields a plain LoRA leaves empty. Each names what it would add that zse does not apply. */
static int refuse_unsupported(const char *file, const json_t *cfg)
{
    static const struct { const char *field, *what; } refused[] = {
        {"use_dora", "DoRA adapters (weight-decomposed LoRA) are not supported"},
        {"modules_to_save", "adapters that replace whole modules (an lm_head or embeddings trained in full) are not supported"},
        {"trainable_token_indices", "adapters that train token embeddings are not supported"},
        {"layer_replication", "adapters that replicate layers are not supported"},
        {"target_parameters", "adapters on parameters (rather than modules) are not supported"},
        {"lora_bias", "adapters with a bias on lora_B are not supported"},
        {"alora_invocation_tokens", "activated LoRA (aLoRA) adapters are not supported"},
        {"use_qalora", "QA-LoRA adapters are not supported"},
        {"fan_in_fan_out", "fan_in_fan_out (GPT-2's Conv1D layers) does not occur in the models zse runs"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++)
        if (json_truthy(json_object_get(cfg, refused[i].field)))
            return zse_fail("%s: %s is set: %s", file, refused[i].field, refused[i].what);
    const json_t *bias = json_object_get(cfg, "bias");
    if (bias && !json_is_null(bias) && !(json_is_string(bias) && strcmp(json_string_value(bias), "none") == 0))
        return zse_fail("%s: bias is %s%s%s: only \"none\" is supported (PEFT's bias training changes the base "
                        "model's biases)", file, json_is_string(bias) ? "\"" : "",
                        json_is_string(bias) ? json_string_value(bias) : "not a string", json_is_string(bias) ? "\"" : "");
    return 0;
}

static int check_pattern_object(const char *file, const char *field, const json_t *obj, bool ranks)
{
    if (!obj || json_is_null(obj))
        return 0;
    if (!json_is_object(obj))
        return zse_fail("%s: %s must be an object of module patterns", file, field);
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)obj, key, v) {
        char where[200];
        snprintf(where, sizeof where, "%s[\"%.120s\"]", field, key);
        int r;
        double a;
        if (ranks ? config_rank(file, where, v, &r) != 0 : config_alpha(file, where, v, &a) != 0)
            return -1;
    }
    return 0;
}

static int read_peft_config(const char *file, const json_t *cfg, peft_config *pc)
{
    if (!json_is_object(cfg))
        return zse_fail("%s: not a JSON object", file);
    const json_t *type = json_object_get(cfg, "peft_type");
    if (type && !(json_is_string(type) && strcmp(json_string_value(type), "LORA") == 0))
        return zse_fail("%s: peft_type is %s%s%s: zse serves LoRA adapters only", file, json_is_string(type) ? "\"" : "",
                        json_is_string(type) ? json_string_value(type) : "not a string", json_is_string(type) ? "\"" : "");
    if (refuse_unsupported(file, cfg) != 0)
        return -1;
    const json_t *r = json_object_get(cfg, "r"), *alpha = json_object_get(cfg, "lora_alpha"),
                 *rs = json_object_get(cfg, "use_rslora");
    pc->r = 8; /* PEFT's LoraConfig defaults */
    pc->alpha = 8;
    if (r && config_rank(file, "r", r, &pc->r) != 0)
        return -1;
    if (alpha && config_alpha(file, "lora_alpha", alpha, &pc->alpha) != 0)
        return -1;
    if (rs && !json_is_boolean(rs) && !json_is_null(rs))
        return zse_fail("%s: use_rslora must be true or false", file);
    pc->rslora = json_is_true(rs);
    pc->rank_pattern = json_object_get(cfg, "rank_pattern");
    pc->alpha_pattern = json_object_get(cfg, "alpha_pattern");
    if (check_pattern_object(file, "rank_pattern", pc->rank_pattern, true) != 0 ||
        check_pattern_object(file, "alpha_pattern", pc->alpha_pattern, false) != 0)
        return -1;
    return 0;
}

/* PEFT's get_pattern_key: the first key (in the file's order) for which
 * re.match(rf"(.*\.)?({key})$", module) holds; NULL when none does. */
static const char *pattern_key(const char *file, const char *field, const json_t *obj, const char *module, int *rc)
{
    if (!json_is_object(obj))
        return NULL;
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)obj, key, v) {
        (void)v;
        zse_buf re = {0};
        if (zse_buf_printf(&re, "^(.*\\.)?(%s)$", key) != 0) {
            *rc = -1;
            return NULL;
        }
        int err;
        PCRE2_SIZE off;
        pcre2_code *code = pcre2_compile((PCRE2_SPTR)re.data, re.len, PCRE2_UTF, &err, &off, NULL);
        zse_buf_free(&re);
        if (!code) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(err, msg, sizeof msg);
            *rc = zse_fail("%s: %s key \"%.120s\" is not a regular expression: %s", file, field, key, (char *)msg);
            return NULL;
        }
        pcre2_match_data *md = pcre2_match_data_create_from_pattern(code, NULL);
        int m = md ? pcre2_match(code, (PCRE2_SPTR)module, strlen(module), 0, 0, md, NULL) : -1;
        pcre2_match_data_free(md);
        pcre2_code_free(code);
        if (m >= 0)
            return key;
    }
    return NULL;
}

/* the rank and scale PEFT gives the module `key` (model.layers.N.self_attn.q_proj) */
static int module_rank_scale(const char *file, const peft_config *pc, const char *key, int *rank, float *scale,
                             char *why, size_t why_len)
{
    int rc = 0;
    const char *rk = pattern_key(file, "rank_pattern", pc->rank_pattern, key, &rc);
    const char *ak = rc == 0 ? pattern_key(file, "alpha_pattern", pc->alpha_pattern, key, &rc) : NULL;
    if (rc != 0)
        return -1;
    *rank = rk ? (int)json_integer_value(json_object_get(pc->rank_pattern, rk)) : pc->r;
    double alpha = ak ? json_number_value(json_object_get(pc->alpha_pattern, ak)) : pc->alpha;
    *scale = (float)(pc->rslora ? alpha / sqrt((double)*rank) : alpha / (double)*rank);
    if (rk)
        snprintf(why, why_len, "rank_pattern[\"%s\"]", rk);
    else
        snprintf(why, why_len, "r");
    return 0;
}

/* ---- PEFT's adapter_model.safetensors ----------------------------------------------------- */

typedef struct {
    int layer, module;
    bool is_b;
} lora_key;

/* Why a tensor that is not lora_A/lora_B of a decoder projection cannot be applied */
static int refuse_tensor(const char *file, const char *name)
{
    static const struct { const char *part, *what; } known[] = {
        {"lora_magnitude_vector", "a DoRA magnitude vector: DoRA adapters are not supported"},
        {"lora_embedding_", "an embedding adapter: adapters on embed_tokens are not supported"},
        {"modules_to_save", "a module trained in full (modules_to_save): not supported"},
        {"trainable_tokens", "trained token embeddings: not supported"},
        {"lm_head", "an lm_head adapter: only the decoder layers' projections are LoRA targets"},
        {"embed_tokens", "an embedding adapter: only the decoder layers' projections are LoRA targets"},
        {".experts.", "a mixture-of-experts expert: experts are not LoRA targets"},
        {"block_sparse_moe", "a mixture-of-experts layer: its experts and router are not LoRA targets"},
        {"shared_expert", "a mixture-of-experts shared expert: not a LoRA target"},
        {".mlp.gate.", "a mixture-of-experts router: not a LoRA target"},
        {".lora_A.bias", "a LoRA bias (lora_bias): not supported"},
        {".lora_B.bias", "a LoRA bias (lora_bias): not supported"},
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strstr(name, known[i].part))
            return zse_fail("%s: tensor '%s' is %s", file, name, known[i].what);
    return zse_fail("%s: tensor '%s' is not a LoRA weight of q/k/v/o/gate/up/down_proj in a decoder layer "
                    "(expected names like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)", file, name);
}

/* base_model.model.model.layers.N.<module>.lora_{A,B}.weight -> layer, module, A or B, and
 * the module's key as PEFT matches patterns against it (model.layers.N.<module>) */
static int parse_tensor_name(const char *file, const char *name, lora_key *k, char *key, size_t key_len)
{
    size_t n = strlen(name);
    static const char sa[] = ".lora_A.weight", sb[] = ".lora_B.weight";
    const size_t sl = sizeof sa - 1;
    if (n <= sl || (strcmp(name + n - sl, sa) != 0 && strcmp(name + n - sl, sb) != 0))
        return refuse_tensor(file, name);
    k->is_b = name[n - sl + 6] == 'B';
    const char *start = strncmp(name, "base_model.model.", 17) == 0 ? name + 17 : name;
    size_t klen = (size_t)(name + n - sl - start);
    if (klen + 1 > key_len)
        return zse_fail("%s: tensor name '%.80s...' is too long", file, name);
    memcpy(key, start, klen);
    key[klen] = '\0';
    const char *layers = strstr(key, "layers.");
    if (!layers || (layers != key && layers[-1] != '.'))
        return refuse_tensor(file, name);
    char *end;
    errno = 0;
    long layer = strtol(layers + 7, &end, 10);
    if (end == layers + 7 || *end != '.' || errno || layer < 0 || layer >= ZSE_LORA_MAX_LAYERS)
        return refuse_tensor(file, name);
    for (int m = 0; m < ZSE_LORA_MODULES; m++)
        if (strcmp(end + 1, hf_modules[m]) == 0) {
            k->layer = (int)layer;
            k->module = m;
            return 0;
        }
    return refuse_tensor(file, name);
}

/* v converted to f16, or an error naming the tensor when it does not fit */
static int to_f16(const char *file, const char *tensor, float v, uint16_t *out)
{
    if (!isfinite(v) || fabsf(v) > 65504.0f)
        return zse_fail("%s: tensor '%s' holds %g, which f16 cannot hold (LoRA weights are stored in f16)", file,
                        tensor, (double)v);
    *out = zse_f32_to_f16(v);
    return 0;
}

/* A [rank][in] and B [out][rank] into f16 A and B transposed */
static int convert_part(const char *file, const zse_st_tensor *ta, const zse_st_tensor *tb, zse_lora_part *p,
                        uint16_t *a, uint16_t *bt)
{
    const int64_t r = p->rank, in = p->in, out = p->out;
    float *row = zse_malloc((size_t)(in > r ? in : r) * sizeof *row);
    if (!row)
        return -1;
    int rc = 0;
    for (int64_t j = 0; rc == 0 && j < r; j++) {
        rc = zse_st_read_f32(ta, (size_t)(j * in), (size_t)in, row);
        for (int64_t i = 0; rc == 0 && i < in; i++)
            rc = to_f16(file, ta->name, row[i], &a[j * in + i]);
    }
    for (int64_t o = 0; rc == 0 && o < out; o++) {
        rc = zse_st_read_f32(tb, (size_t)(o * r), (size_t)r, row);
        for (int64_t j = 0; rc == 0 && j < r; j++)
            rc = to_f16(file, tb->name, row[j], &bt[j * out + o]);
    }
    free(row);
    p->a = a;
    p->bt = bt;
    return rc;
}

static int check_float_matrix(const char *file, const zse_st_tensor *t)
{
    if (t->dtype != ZSE_ST_F32 && t->dtype != ZSE_ST_F16 && t->dtype != ZSE_ST_BF16)
        return zse_fail("%s: tensor '%s' is not F32, F16 or BF16", file, t->name);
    if (t->ndim != 2 || t->shape[0] < 1 || t->shape[1] < 1 || t->shape[1] > (1 << 30) || t->shape[0] > (1 << 30))
        return zse_fail("%s: tensor '%s' is not a matrix", file, t->name);
    return 0;
}

/* the A and B tensors of every (layer, module), with their shapes checked against each other
 * and against the config's rank */
static int pair_tensors(zse_lora_file *f, const char *file, const zse_safetensors *st, const peft_config *pc,
                        const zse_st_tensor ***pairs)
{
    int max_layer = -1;
    char key[256];
    for (size_t i = 0; i < st->n_tensors; i++) {
        lora_key k;
        if (parse_tensor_name(file, st->tensors[i].name, &k, key, sizeof key) != 0)
            return -1;
        if (k.layer > max_layer)
            max_layer = k.layer;
    }
    if (max_layer < 0)
        return zse_fail("%s: holds no LoRA weights", file);
    if (alloc_parts(f, max_layer + 1) != 0)
        return -1;
    const size_t n = (size_t)f->n_layers * ZSE_LORA_MODULES;
    *pairs = zse_calloc(2 * n, sizeof **pairs);
    if (!*pairs)
        return -1;
    for (size_t i = 0; i < st->n_tensors; i++) {
        lora_key k;
        parse_tensor_name(file, st->tensors[i].name, &k, key, sizeof key);
        (*pairs)[2 * ((size_t)k.layer * ZSE_LORA_MODULES + (size_t)k.module) + k.is_b] = &st->tensors[i];
    }
    for (int l = 0; l < f->n_layers; l++)
        for (int m = 0; m < ZSE_LORA_MODULES; m++) {
            const zse_st_tensor *a = (*pairs)[2 * ((size_t)l * ZSE_LORA_MODULES + (size_t)m)],
                                *b = (*pairs)[2 * ((size_t)l * ZSE_LORA_MODULES + (size_t)m) + 1];
            if (!a && !b)
                continue;
            if (!a || !b)
                return zse_fail("%s: layer %d's %s has lora_%s but no lora_%s", file, l, hf_modules[m], a ? "A" : "B",
                                a ? "B" : "A");
            if (check_float_matrix(file, a) != 0 || check_float_matrix(file, b) != 0)
                return -1;
            zse_lora_part *p = &f->parts[(size_t)l * ZSE_LORA_MODULES + (size_t)m];
            if (a->shape[0] != b->shape[1])
                return zse_fail("%s: '%s' is [%" PRId64 ", %" PRId64 "] and '%s' [%" PRId64 ", %" PRId64 "]: the ranks "
                                "differ", file, a->name, a->shape[0], a->shape[1], b->name, b->shape[0], b->shape[1]);
            snprintf(key, sizeof key, "model.layers.%d.%s", l, hf_modules[m]);
            char why[160];
            int want;
            if (module_rank_scale(file, pc, key, &want, &p->scale, why, sizeof why) != 0)
                return -1;
            if (a->shape[0] != want)
                return zse_fail("%s: '%s' has rank %" PRId64 " but adapter_config.json's %s says %d", file, a->name,
                                a->shape[0], why, want);
            p->rank = want;
            p->in = a->shape[1];
            p->out = b->shape[0];
        }
    return 0;
}

static int open_peft(zse_lora_file *f, const char *dir)
{
    char *cfg_path = zse_path_join(dir, "adapter_config.json");
    char *st_path = zse_path_join(dir, "adapter_model.safetensors");
    char *bin_path = zse_path_join(dir, "adapter_model.bin");
    zse_safetensors st = {0};
    const zse_st_tensor **pairs = NULL;
    int rc = cfg_path && st_path && bin_path ? 0 : -1;
    if (rc == 0 && !zse_file_exists(cfg_path))
        rc = zse_fail("%s has no adapter_config.json: not a PEFT adapter directory (or a .zsa file)", dir);
    json_error_t jerr;
    if (rc == 0 && !(f->peft_config = json_load_file(cfg_path, 0, &jerr)))
        rc = zse_fail("%s: line %d, column %d: %s", cfg_path, jerr.line, jerr.column, jerr.text);
    peft_config pc = {0};
    if (rc == 0)
        rc = read_peft_config(cfg_path, f->peft_config, &pc);
    if (rc == 0 && !zse_file_exists(st_path))
        rc = zse_fail(zse_file_exists(bin_path) ? "%s has adapter_model.bin, a pickle zse does not read: save the "
                                                  "adapter with safe_serialization=True (adapter_model.safetensors)"
                                                : "%s has no adapter_model.safetensors", dir);
    if (rc == 0 && zse_st_open(&st, st_path) != 0)
        rc = -1;
    if (rc == 0)
        rc = pair_tensors(f, st_path, &st, &pc, &pairs);
    size_t elems = 0;
    for (int i = 0; rc == 0 && i < f->n_layers * ZSE_LORA_MODULES; i++)
        elems += (size_t)f->parts[i].rank * (size_t)(f->parts[i].in + f->parts[i].out);
    if (rc == 0 && !(f->owned = zse_malloc((elems ? elems : 1) * sizeof *f->owned)))
        rc = -1;
    uint16_t *at = f->owned;
    for (int i = 0; rc == 0 && i < f->n_layers * ZSE_LORA_MODULES; i++) {
        zse_lora_part *p = &f->parts[i];
        if (!p->rank)
            continue;
        rc = convert_part(st_path, pairs[2 * i], pairs[2 * i + 1], p, at, at + (size_t)p->rank * (size_t)p->in);
        at += (size_t)p->rank * (size_t)(p->in + p->out);
    }
    free(pairs);
    zse_st_close(&st);
    free(cfg_path);
    free(st_path);
    free(bin_path);
    return rc;
}

/* ---- .zsa files ------------------------------------------------------------------------------ */

#define ZSA_MAGIC "ZSEADAPT"
#define ZSA_MAJOR 1
#define ZSA_MINOR 0
#define ZSA_ALIGN 64

static int module_index(const char *name)
{
    for (int m = 0; name && m < ZSE_LORA_MODULES; m++)
        if (strcmp(name, module_names[m]) == 0)
            return m;
    return -1;
}

/* the .zsa preamble: where the header and the data lie (checked against the file) */
static int zsa_preamble(const zse_map *map, uint64_t *hsize, uint64_t *data_offset)
{
    const uint8_t *p = map->data;
    const char *path = map->path;
    if (map->size < 64 || memcmp(p, ZSA_MAGIC, 8) != 0)
        return zse_fail("%s is not a .zsa adapter (bad magic); give a PEFT adapter directory or a file from "
                        "`zse convert-adapter`", path);
    unsigned major = (unsigned)(p[8] | p[9] << 8), minor = (unsigned)(p[10] | p[11] << 8);
    if (major != ZSA_MAJOR)
        return zse_fail("%s uses .zsa format %u.%u; this zse reads %d.x%s", path, major, minor, ZSA_MAJOR,
                        major > ZSA_MAJOR ? ": upgrade zse" : "");
    if (zse_hash64(p, 56) != zse_load_le64(p + 56))
        return zse_fail("%s: preamble checksum mismatch; the file is corrupt", path);
    uint64_t hoff = zse_load_le64(p + 16), fsize = zse_load_le64(p + 48), hend;
    *hsize = zse_load_le64(p + 24);
    *data_offset = zse_load_le64(p + 40);
    if (fsize != map->size)
        return zse_fail("%s is %zu bytes but its preamble says %" PRIu64 "; the file is truncated or was not fully "
                        "written", path, map->size, fsize);
    if (hoff != 64 || __builtin_add_overflow(hoff, *hsize, &hend) || hend > *data_offset ||
        *data_offset > map->size || *data_offset % ZSA_ALIGN != 0)
        return zse_fail("%s: header region is out of bounds; the file is corrupt", path);
    if (zse_hash64(p + hoff, (size_t)*hsize) != zse_load_le64(p + 32))
        return zse_fail("%s: header checksum mismatch; the file is corrupt", path);
    return 0;
}

/* one blob ({offset, size, checksum}) of a part: inside the data region, aligned, of the
 * size its shape needs, with a matching checksum */
static int zsa_blob(const zse_map *map, uint64_t data_offset, const json_t *b, uint64_t want, const char *what,
                    const uint16_t **out)
{
    uint64_t off, size, sum, start, end;
    json_t *o = json_object_get(b, "offset"), *s = json_object_get(b, "size");
    if (!json_is_integer(o) || !json_is_integer(s) || json_integer_value(o) < 0 || json_integer_value(s) < 0 ||
        !zse_parse_hex64(json_string_value(json_object_get(b, "checksum")), &sum))
        return zse_fail("%s: %s has a malformed entry (offset, size, checksum)", map->path, what);
    off = (uint64_t)json_integer_value(o);
    size = (uint64_t)json_integer_value(s);
    if (size != want)
        return zse_fail("%s: %s is %" PRIu64 " bytes; its shape needs %" PRIu64, map->path, what, size, want);
    if (off % ZSA_ALIGN != 0 || __builtin_add_overflow(data_offset, off, &start) ||
        __builtin_add_overflow(start, size, &end) || end > map->size)
        return zse_fail("%s: %s lies outside the file; the file is corrupt", map->path, what);
    if (zse_hash64(map->data + start, (size_t)size) != sum)
        return zse_fail("%s: %s checksum mismatch; the file is corrupt", map->path, what);
    *out = (const uint16_t *)(map->data + start);
    return 0;
}

static int zsa_int(const json_t *e, const char *k, int64_t lo, int64_t hi, int64_t *out)
{
    json_t *v = json_object_get(e, k);
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return -1;
    *out = json_integer_value(v);
    return 0;
}

static int zsa_part(zse_lora_file *f, const json_t *e, uint64_t data_offset, size_t index)
{
    const char *path = f->map.path;
    int64_t layer, rank, in, out;
    int m = module_index(json_string_value(json_object_get(e, "module")));
    const json_t *scale = json_object_get(e, "scale");
    if (zsa_int(e, "layer", 0, f->n_layers - 1, &layer) || m < 0 || zsa_int(e, "rank", 1, ZSE_LORA_MAX_RANK, &rank) ||
        zsa_int(e, "in", 1, 1 << 30, &in) || zsa_int(e, "out", 1, 1 << 30, &out) || !json_is_number(scale) ||
        !isfinite(json_number_value(scale)))
        return zse_fail("%s: parts[%zu] is malformed (layer below n_layers, module, rank 1..%d, in, out, finite "
                        "scale)", path, index, ZSE_LORA_MAX_RANK);
    zse_lora_part *p = &f->parts[layer * ZSE_LORA_MODULES + m];
    if (p->rank)
        return zse_fail("%s: layer %" PRId64 "'s %s appears twice", path, layer, module_names[m]);
    char what[96];
    snprintf(what, sizeof what, "layer %" PRId64 "'s %s A", layer, module_names[m]);
    if (zsa_blob(&f->map, data_offset, json_object_get(e, "a"), (uint64_t)(rank * in) * 2, what, &p->a) != 0)
        return -1;
    snprintf(what, sizeof what, "layer %" PRId64 "'s %s B", layer, module_names[m]);
    if (zsa_blob(&f->map, data_offset, json_object_get(e, "b"), (uint64_t)(rank * out) * 2, what, &p->bt) != 0)
        return -1;
    p->rank = (int)rank;
    p->in = in;
    p->out = out;
    p->scale = (float)json_number_value(scale);
    return 0;
}

static json_t *zsa_header(const zse_map *map, uint64_t hsize)
{
    json_error_t err;
    json_t *h = json_loadb((const char *)map->data + 64, (size_t)hsize, 0, &err);
    if (!h)
        zse_fail("%s: header is not JSON (%s); the file is corrupt", map->path, err.text);
    else if (!json_is_object(h) || !json_is_array(json_object_get(h, "parts")))
        zse_fail("%s: header has no parts array; the file is corrupt", map->path);
    else
        return h;
    json_decref(h);
    return NULL;
}

static int open_zsa(zse_lora_file *f, const char *path)
{
    uint64_t hsize, data_offset;
    if (zse_map_open(&f->map, path) != 0 || zsa_preamble(&f->map, &hsize, &data_offset) != 0)
        return -1;
    json_t *h = zsa_header(&f->map, hsize);
    if (!h)
        return -1;
    int64_t n_layers = 0;
    const json_t *parts = json_object_get(h, "parts");
    int rc = 0;
    if (zsa_int(h, "n_layers", 1, ZSE_LORA_MAX_LAYERS, &n_layers) != 0 || json_array_size(parts) == 0)
        rc = zse_fail("%s: header needs n_layers (1..%d) and at least one part", path, ZSE_LORA_MAX_LAYERS);
    if (rc == 0)
        rc = alloc_parts(f, (int)n_layers);
    for (size_t i = 0; rc == 0 && i < json_array_size(parts); i++)
        rc = zsa_part(f, json_array_get(parts, i), data_offset, i);
    if (rc == 0) {
        f->peft_config = json_incref(json_object_get(h, "peft_config"));
        f->zsa = true;
    }
    json_decref(h);
    return rc;
}

/* ---- opening either form ------------------------------------------------------------------------ */

static bool is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int zse_lora_open(zse_lora_file *f, const char *path)
{
    memset(f, 0, sizeof *f);
    struct stat st;
    if (stat(path, &st) != 0)
        return zse_fail("adapter %s: %s", path, strerror(errno));
    if (!(f->path = zse_strdup(path)))
        return -1;
    int rc = is_dir(path) ? open_peft(f, path) : open_zsa(f, path);
    for (int i = 0; rc == 0 && i < f->n_layers * ZSE_LORA_MODULES; i++) {
        const zse_lora_part *p = &f->parts[i];
        if (p->rank)
            f->modules |= 1u << (i % ZSE_LORA_MODULES);
        if (p->rank > f->max_rank)
            f->max_rank = p->rank;
    }
    if (rc != 0)
        zse_lora_close(f);
    return rc;
}

int zse_lora_check_base(const zse_lora_file *f, const zse_config *c)
{
    for (int l = 0; l < f->n_layers; l++)
        for (int m = 0; m < ZSE_LORA_MODULES; m++) {
            const zse_lora_part *p = &f->parts[(size_t)l * ZSE_LORA_MODULES + (size_t)m];
            if (!p->rank)
                continue;
            if (l >= c->n_layers)
                return zse_fail("%s adapts layer %d; the model has %d layers: the adapter was trained for another "
                                "base model", f->path, l, c->n_layers);
            int64_t in, out;
            if (!zse_lora_base_dims(c, l, m, &in, &out))
                return zse_fail("%s adapts layer %d's %s, which is a mixture-of-experts layer: its experts are not "
                                "LoRA targets", f->path, l, hf_modules[m]);
            if (p->in != in || p->out != out)
                return zse_fail("%s: layer %d's %s is %" PRId64 " -> %" PRId64 " wide in the adapter (lora_A [%d, %"
                                PRId64 "], lora_B [%" PRId64 ", %d]) but %" PRId64 " -> %" PRId64 " in the model: the "
                                "adapter was trained for another base model",
                                f->path, l, hf_modules[m], p->in, p->out, p->rank, p->in, p->out, p->rank, in, out);
        }
    return 0;
}

int zse_lora_probe(const char *path, int *max_rank)
{
    if (is_dir(path)) {
        char *cfg_path = zse_path_join(path, "adapter_config.json");
        if (!cfg_path)
            return -1;
        int rc = 0;
        json_error_t jerr;
        json_t *cfg = NULL;
        peft_config pc = {0};
        if (!zse_file_exists(cfg_path))
            rc = zse_fail("%s has no adapter_config.json: not a PEFT adapter directory (or a .zsa file)", path);
        else if (!(cfg = json_load_file(cfg_path, 0, &jerr)))
            rc = zse_fail("%s: line %d, column %d: %s", cfg_path, jerr.line, jerr.column, jerr.text);
        else
            rc = read_peft_config(cfg_path, cfg, &pc);
        if (rc == 0) {
            *max_rank = pc.r;
            const char *k;
            const json_t *v;
            if (json_is_object(pc.rank_pattern))
                json_object_foreach((json_t *)pc.rank_pattern, k, v)
                    if (json_integer_value(v) > *max_rank)
                        *max_rank = (int)json_integer_value(v);
        }
        json_decref(cfg);
        free(cfg_path);
        return rc;
    }
    zse_map map;
    uint64_t hsize, data_offset;
    if (zse_map_open(&map, path) != 0)
        return -1;
    json_t *h = zsa_preamble(&map, &hsize, &data_offset) == 0 ? zsa_header(&map, hsize) : NULL;
    int rc = h ? 0 : -1;
    *max_rank = 0;
    for (size_t i = 0; h && i < json_array_size(json_object_get(h, "parts")); i++) {
        json_int_t r = json_integer_value(json_object_get(json_array_get(json_object_get(h, "parts"), i), "rank"));
        if (r > *max_rank && r <= ZSE_LORA_MAX_RANK)
            *max_rank = (int)r;
    }
    json_decref(h);
    zse_map_close(&map);
    return rc;
}

/* ---- writing a .zsa ---------------------------------------------------------------------------- */

static uint64_t align_up(uint64_t x) { return (x + ZSA_ALIGN - 1) / ZSA_ALIGN * ZSA_ALIGN; }

static void hex64(uint64_t v, char out[17]) { snprintf(out, 17, "%016" PRIx64, v); }

static json_t *blob_json(uint64_t off, uint64_t size, const void *data)
{
    char sum[17];
    hex64(zse_hash64(data, (size_t)size), sum);
    return json_pack("{sIsIss}", "offset", (json_int_t)off, "size", (json_int_t)size, "checksum", sum);
}

/* the sources of a PEFT directory, by SHA-256, as .zse files record theirs */
static json_t *provenance(const zse_lora_file *f)
{
    json_t *files = json_array();
    static const char *const names[] = {"adapter_config.json", "adapter_model.safetensors"};
    for (size_t i = 0; files && !f->zsa && i < 2; i++) {
        char *p = zse_path_join(f->path, names[i]), hex[65];
        struct stat st;
        if (p && stat(p, &st) == 0 && zse_sha256_file(p, hex) == 0)
            json_array_append_new(files, json_pack("{sssssI}", "name", names[i], "sha256", hex, "size",
                                                   (json_int_t)st.st_size));
        free(p);
    }
    time_t now = time(NULL);
    struct tm tm;
    char when[32];
    gmtime_r(&now, &tm);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return json_pack("{sossssss}", "source_files", files ? files : json_array(), "source", f->path, "zse_version",
                     ZSE_VERSION, "created", when);
}

static int write_all(int fd, const void *buf, size_t n, uint64_t off, const char *path)
{
    const uint8_t *p = buf;
    while (n) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return zse_fail("cannot write %s: %s", path, w < 0 ? strerror(errno) : "short write");
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

int zse_lora_write_zsa(const zse_lora_file *f, const char *out_path, bool force)
{
    if (!force && access(out_path, F_OK) == 0)
        return zse_fail("%s already exists; pass --force to overwrite it", out_path);
    json_t *parts = json_array();
    uint64_t at = 0;
    for (int l = 0; parts && l < f->n_layers; l++)
        for (int m = 0; m < ZSE_LORA_MODULES; m++) {
            const zse_lora_part *p = &f->parts[(size_t)l * ZSE_LORA_MODULES + (size_t)m];
            if (!p->rank)
                continue;
            uint64_t as = (uint64_t)p->rank * (uint64_t)p->in * 2, bs = (uint64_t)p->rank * (uint64_t)p->out * 2;
            json_array_append_new(parts, json_pack("{sisssisIsIsfsoso}", "layer", l, "module", module_names[m], "rank",
                                                   p->rank, "in", (json_int_t)p->in, "out", (json_int_t)p->out, "scale",
                                                   (double)p->scale, "a", blob_json(at, as, p->a), "b",
                                                   blob_json(align_up(at + as), bs, p->bt)));
            at = align_up(align_up(at + as) + bs);
        }
    json_t *h = json_pack("{sss[ii]sisOsoso}", "format", "zsa", "version", ZSA_MAJOR, ZSA_MINOR, "n_layers",
                          f->n_layers, "peft_config", f->peft_config ? f->peft_config : json_null(), "provenance",
                          provenance(f), "parts", parts);
    char *hs = h ? json_dumps(h, JSON_COMPACT) : NULL;
    json_decref(h);
    if (!hs)
        return zse_fail("cannot build the .zsa header");
    const uint64_t hsize = strlen(hs), data_offset = align_up(64 + hsize), file_size = data_offset + at;
    uint8_t pre[64] = {0};
    memcpy(pre, ZSA_MAGIC, 8);
    pre[8] = ZSA_MAJOR;
    pre[10] = ZSA_MINOR;
    put64(pre + 16, 64);
    put64(pre + 24, hsize);
    put64(pre + 32, zse_hash64(hs, (size_t)hsize));
    put64(pre + 40, data_offset);
    put64(pre + 48, file_size);
    put64(pre + 56, zse_hash64(pre, 56));
    zse_out_file out = {.fd = -1};
    int rc = zse_out_create(&out, out_path);
    if (rc == 0)
        rc = write_all(out.fd, pre, 64, 0, out_path);
    if (rc == 0)
        rc = write_all(out.fd, hs, (size_t)hsize, 64, out_path);
    at = data_offset;
    for (int l = 0; rc == 0 && l < f->n_layers; l++)
        for (int m = 0; rc == 0 && m < ZSE_LORA_MODULES; m++) {
            const zse_lora_part *p = &f->parts[(size_t)l * ZSE_LORA_MODULES + (size_t)m];
            if (!p->rank)
                continue;
            uint64_t as = (uint64_t)p->rank * (uint64_t)p->in * 2, bs = (uint64_t)p->rank * (uint64_t)p->out * 2;
            rc = write_all(out.fd, p->a, (size_t)as, at, out_path);
            if (rc == 0)
                rc = write_all(out.fd, p->bt, (size_t)bs, data_offset + align_up(at - data_offset + as), out_path);
            at = data_offset + align_up(align_up(at - data_offset + as) + bs);
        }
    /* zero bytes up to the end: the last part may end before the aligned file size */
    if (rc == 0 && ftruncate(out.fd, (off_t)file_size) != 0)
        rc = zse_fail("cannot size %s: %s", out_path, strerror(errno));
    if (rc == 0 && fsync(out.fd) != 0)
        rc = zse_fail("cannot write %s: %s", out_path, strerror(errno));
    if (rc == 0)
        rc = zse_out_commit(&out, out_path, force);
    zse_out_close(&out, rc != 0);
    free(hs);
    return rc;
}
