/* A GGUF file as a source for zse convert: the normalized config from the {arch}.*
 * metadata, the chat template, and the tensor list under zse's canonical names (GGUF's
 * own names are the canonical ones: blk.N.attn_q.weight, ...).
 *
 * Architectures: llama (which llama.cpp also uses for Mistral) and qwen2. llama.cpp's
 * converter reorders the rows of a llama model's q and k projections for ggml's RoPE
 * (interleaved pairs); those tensors are marked so the reader puts the rows back. Llama-3
 * RoPE scaling arrives as a rope_freqs tensor of per-frequency divisors rather than as
 * parameters; zse stores the parameters, so it finds the ones that give those divisors
 * and refuses the file when none do. */
#include "format/format.h"

#include <math.h>
#include <string.h>

typedef struct {
    const zse_gguf *g;
    const char *arch;
    char key[160];
} meta;

static const zse_gguf_kv *arch_kv(meta *m, const char *suffix)
{
    snprintf(m->key, sizeof m->key, "%s.%s", m->arch, suffix);
    return zse_gguf_find(m->g, m->key);
}

/* an integer {arch}.suffix: absent → dflt (required: an error naming the key) */
static int arch_int(meta *m, const char *suffix, int64_t dflt, bool required, int64_t lo, int64_t hi, int *out)
{
    const zse_gguf_kv *kv = arch_kv(m, suffix);
    int64_t v = dflt;
    if (!kv && required)
        return zse_fail("%s: GGUF key %s is missing", m->g->map.path, m->key);
    if (kv && !zse_gguf_kv_int(kv, &v))
        return zse_fail("%s: GGUF key %s is not an integer%s", m->g->map.path, m->key,
                        kv->type == ZSE_GGUF_ARR ? " (per-layer arrays are not supported)" : "");
    if (v < lo || v > hi)
        return zse_fail("%s: GGUF key %s is %lld, outside [%lld, %lld]", m->g->map.path, m->key, (long long)v,
                        (long long)lo, (long long)hi);
    *out = (int)v;
    return 0;
}

static double arch_num(meta *m, const char *suffix, double dflt)
{
    const zse_gguf_kv *kv = arch_kv(m, suffix);
    double v;
    return kv && zse_gguf_kv_num(kv, &v) ? v : dflt;
}

static int token_id_of(const zse_gguf *g, const char *key)
{
    const zse_gguf_kv *kv = zse_gguf_find(g, key);
    int64_t v;
    return kv && zse_gguf_kv_int(kv, &v) && v >= 0 && v < (1 << 30) ? (int)v : -1;
}

static void add_eos(zse_config *c, int id)
{
    if (id < 0 || c->n_eos == ZSE_MAX_EOS)
        return;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] == id)
            return;
    c->eos_ids[c->n_eos++] = id;
}

/* Llama-3 RoPE: frequency i is divided by 1 (short wavelengths), by `factor` (long ones)
 * or by 1 / ((1 - s) / factor + s) between, s = (orig / wavelength - low) / (high - low) —
 * the formula transformers and zse's model use (src/model: zse_rope_frequencies). */
static double llama3_divisor(double inv_freq, double factor, double low, double high, double orig)
{
    double wavelen = 2 * M_PI / inv_freq;
    if (wavelen < orig / high)
        return 1.0;
    if (wavelen > orig / low)
        return factor;
    double s = (orig / wavelen - low) / (high - low);
    return 1.0 / ((1 - s) / factor + s);
}

static bool llama3_matches(const float *div, int n, double theta, int head_dim, double factor, double low,
                           double high, double orig)
{
    for (int i = 0; i < n; i++) {
        double inv = pow(theta, -2.0 * i / head_dim);
        double want = llama3_divisor(inv, factor, low, high, orig);
        if (fabs(want - div[i]) > 1e-4 * want)
            return false;
    }
    return true;
}

/* Parameters that reproduce the divisors. Scaling orig, low and high together changes
 * nothing, so low is taken as 1 (Meta's value); the smoothed frequencies, where there are
 * any, pin orig and high, else Meta's high of 4 and an orig at the boundary are tried. */
static int fit_llama3(zse_config *c, const zse_gguf_tensor *t, const char *path)
{
    int n = c->head_dim / 2;
    if (t->type != 0 || t->n_dims != 1 || t->ne[0] != n)
        return zse_fail("%s: rope_freqs.weight must be %d F32 values (head_dim / 2)", path, n);
    const float *div = (const float *)t->data;
    double factor = 1;
    for (int i = 0; i < n; i++) {
        if (!(div[i] >= 1 && isfinite(div[i])))
            return zse_fail("%s: rope_freqs.weight holds %g; Llama-3 RoPE divisors are finite and >= 1", path,
                            (double)div[i]);
        factor = div[i] > factor ? div[i] : factor;
    }
    double theta = c->rope_theta, cand_orig[2] = {0, 0}, cand_high[2] = {4, 4};
    int found = 0, mids[2], nm = 0;
    for (int i = 0; i < n && nm < 2; i++)
        if (div[i] > 1 + 1e-6 && div[i] < factor * (1 - 1e-6))
            mids[nm++] = i;
    /* s = (orig / wavelength - 1) / (high - 1) is linear in 1 / wavelength */
    double s[2], f[2];
    for (int k = 0; k < nm; k++) {
        s[k] = (1.0 / div[mids[k]] - 1.0 / factor) / (1.0 - 1.0 / factor);
        f[k] = pow(theta, -2.0 * mids[k] / c->head_dim) / (2 * M_PI);
    }
    if (nm == 2) {
        double a = (s[1] - s[0]) / (f[1] - f[0]), b = s[0] - a * f[0]; /* s = a f + b */
        if (b < 0) {
            double high = 1 - 1 / b;
            cand_orig[found] = a * (high - 1);
            cand_high[found++] = high;
        }
    } else if (nm == 1) {
        cand_orig[found++] = (1 + 3 * s[0]) / f[0];
    } else {
        /* no smoothed frequency: orig just above the last divided wavelength's bound */
        for (int i = 0; i < n; i++)
            if (div[i] > 1 + 1e-6) {
                cand_orig[found++] = 2 * M_PI / pow(theta, -2.0 * i / c->head_dim);
                break;
            }
    }
    for (int k = 0; k < found; k++) {
        double orig = round(cand_orig[k]);
        if (orig >= 1 && orig < (1 << 30) &&
            llama3_matches(div, n, theta, c->head_dim, factor, 1.0, cand_high[k], orig)) {
            c->rope_scaling.type = ZSE_ROPE_LLAMA3;
            c->rope_scaling.factor = factor;
            c->rope_scaling.low_freq_factor = 1.0;
            c->rope_scaling.high_freq_factor = round(cand_high[k] * 1e6) / 1e6;
            c->rope_scaling.original_max_position = (int)orig;
            return 0;
        }
    }
    if (factor == 1)
        return 0; /* every divisor 1: no scaling */
    return zse_fail("%s: rope_freqs.weight is not a Llama-3 RoPE scaling that zse can express; this GGUF is "
                    "not supported (convert the Hugging Face model instead)", path);
}

static int rope_scaling(meta *m, zse_config *c)
{
    const char *path = m->g->map.path;
    c->rope_scaling.type = ZSE_ROPE_NONE;
    c->rope_scaling.factor = 1;
    c->rope_scaling.beta_fast = arch_num(m, "rope.scaling.yarn_beta_fast", 32);
    c->rope_scaling.beta_slow = arch_num(m, "rope.scaling.yarn_beta_slow", 1);
    c->rope_scaling.attn_factor = arch_num(m, "rope.scaling.attn_factor", 0);
    c->rope_scaling.original_max_position = (int)arch_num(m, "rope.scaling.original_context_length",
                                                          c->max_position);
    const zse_gguf_kv *kv = arch_kv(m, "rope.scaling.type");
    size_t len = 0;
    const char *type = kv ? zse_gguf_kv_str(kv, &len) : NULL;
    double linear = arch_num(m, "rope.scale_linear", 0); /* older files */
    if (type && !(len == 4 && memcmp(type, "none", 4) == 0)) {
        c->rope_scaling.factor = arch_num(m, "rope.scaling.factor", 1);
        if (len == 6 && memcmp(type, "linear", 6) == 0)
            c->rope_scaling.type = ZSE_ROPE_LINEAR;
        else if (len == 4 && memcmp(type, "yarn", 4) == 0)
            c->rope_scaling.type = ZSE_ROPE_YARN;
        else
            return zse_fail("%s: GGUF rope scaling type '%.*s' is not supported (none, linear, yarn and Llama-3 "
                            "rope_freqs are)", path, (int)len, type);
    } else if (linear > 0 && linear != 1) {
        c->rope_scaling.type = ZSE_ROPE_LINEAR;
        c->rope_scaling.factor = linear;
    }
    const zse_gguf_tensor *rf = zse_gguf_tensor_named(m->g, "rope_freqs.weight");
    if (rf) {
        if (c->rope_scaling.type != ZSE_ROPE_NONE)
            return zse_fail("%s: rope_freqs.weight together with rope scaling '%.*s' is not supported", path,
                            (int)len, type ? type : "linear");
        return fit_llama3(c, rf, path);
    }
    return 0;
}

static bool has_tensor(const zse_gguf *g, const char *name)
{
    return zse_gguf_tensor_named(g, name) != NULL;
}

static int normalize_config(const zse_gguf *g, zse_config *c)
{
    const char *path = g->map.path;
    const zse_gguf_kv *ak = zse_gguf_find(g, "general.architecture");
    size_t alen = 0;
    const char *a = ak ? zse_gguf_kv_str(ak, &alen) : NULL;
    if (!a)
        return zse_fail("%s: GGUF key general.architecture is missing", path);
    char arch[32];
    snprintf(arch, sizeof arch, "%.*s", (int)(alen < sizeof arch ? alen : sizeof arch - 1), a);
    if (strcmp(arch, "llama") != 0 && strcmp(arch, "qwen2") != 0)
        return zse_fail("%s: GGUF architecture '%.*s' is not supported (zse converts GGUF architectures llama "
                        "— Llama and Mistral models — and qwen2)", path, (int)alen, a);
    memset(c, 0, sizeof *c);
    snprintf(c->arch, sizeof c->arch, "%s", arch);
    meta m = {g, arch, ""};
    int experts = 0;
    if (arch_int(&m, "expert_count", 0, false, 0, 1 << 20, &experts) != 0)
        return -1;
    if (experts > 0)
        return zse_fail("%s: this GGUF is a mixture-of-experts model (%d experts); zse converts dense models only",
                        path, experts);
    const int big = 1 << 30;
    if (arch_int(&m, "block_count", 0, true, 1, 100000, &c->n_layers) ||
        arch_int(&m, "embedding_length", 0, true, 1, big, &c->hidden_size) ||
        arch_int(&m, "feed_forward_length", 0, true, 1, big, &c->intermediate_size) ||
        arch_int(&m, "attention.head_count", 0, true, 1, 100000, &c->n_heads) ||
        arch_int(&m, "attention.head_count_kv", c->n_heads, false, 1, 100000, &c->n_kv_heads) ||
        arch_int(&m, "context_length", 4096, false, 1, big, &c->max_position))
        return -1;
    int head_dim, v_dim, rope_dim;
    if (arch_int(&m, "attention.key_length", c->hidden_size / c->n_heads, false, 2, 1024, &head_dim) ||
        arch_int(&m, "attention.value_length", head_dim, false, 2, 1024, &v_dim) ||
        arch_int(&m, "rope.dimension_count", head_dim, false, 1, 1024, &rope_dim))
        return -1;
    if (v_dim != head_dim || rope_dim != head_dim)
        return zse_fail("%s: key length %d, value length %d and RoPE dimensions %d differ; zse needs them equal "
                        "(full-width RoPE)", path, head_dim, v_dim, rope_dim);
    c->head_dim = head_dim;
    const zse_gguf_tensor *emb = zse_gguf_tensor_named(g, "token_embd.weight");
    if (!emb || emb->n_dims != 2)
        return zse_fail("%s: tensor token_embd.weight is missing or not 2-D", path);
    if (arch_int(&m, "vocab_size", emb->ne[1], false, 1, big, &c->vocab_size) != 0)
        return -1;
    double eps = arch_num(&m, "attention.layer_norm_rms_epsilon", -1);
    if (eps < 0)
        return zse_fail("%s: GGUF key %s.attention.layer_norm_rms_epsilon is missing", path, arch);
    c->rms_eps = (float)eps;
    c->rope_theta = arch_num(&m, "rope.freq_base", 10000.0);
    if (rope_scaling(&m, c) != 0)
        return -1;
    c->tie_embeddings = !has_tensor(g, "output.weight");
    c->attn_bias = has_tensor(g, "blk.0.attn_q.bias");
    c->attn_out_bias = has_tensor(g, "blk.0.attn_output.bias");
    c->bos_id = token_id_of(g, "tokenizer.ggml.bos_token_id");
    c->pad_id = token_id_of(g, "tokenizer.ggml.padding_token_id");
    add_eos(c, token_id_of(g, "tokenizer.ggml.eos_token_id"));
    add_eos(c, token_id_of(g, "tokenizer.ggml.eot_token_id"));
    add_eos(c, token_id_of(g, "tokenizer.ggml.eom_token_id"));
    /* the reader's checks, through the same JSON a .zse header holds */
    json_t *j = zse_config_to_json(c);
    zse_config back;
    int rc = j ? zse_config_from_json(&back, j) : -1;
    json_decref(j);
    if (rc != 0)
        zse_error_prefix("%s", path);
    return rc;
}

/* GGUF 2-D tensors are ne = [cols, rows]; zse's shapes are [rows, cols] */
static int add_tensors(const zse_gguf *g, const zse_config *c, zse_safetensors *st)
{
    bool llama = strcmp(c->arch, "llama") == 0;
    if (!(st->tensors = zse_calloc(g->n_tensors ? g->n_tensors : 1, sizeof *st->tensors)))
        return -1;
    for (size_t i = 0; i < g->n_tensors; i++) {
        const zse_gguf_tensor *t = &g->tensors[i];
        if (strcmp(t->name, "rope_freqs.weight") == 0)
            continue; /* became the config's rope scaling */
        if (!zse_ggml_type_supported(t->type))
            return zse_fail("%s: tensor '%s' has GGML type %s, which zse cannot read (it reads F32, F16, BF16, "
                            "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K); convert from a GGUF of one of those "
                            "types or from the Hugging Face weights", g->map.path, t->name,
                            zse_ggml_type_name(t->type));
        if (t->n_dims > 2)
            for (int d = 2; d < t->n_dims; d++)
                if (t->ne[d] != 1)
                    return zse_fail("%s: tensor '%s' has %d dimensions; weights must be 1-D or 2-D", g->map.path,
                                    t->name, t->n_dims);
        zse_st_tensor *s = &st->tensors[st->n_tensors];
        if (!(s->name = zse_strdup(t->name)))
            return -1;
        st->n_tensors++;
        bool two_d = t->n_dims >= 2 && t->ne[1] > 1;
        s->dtype = ZSE_ST_GGML;
        s->ggml_type = t->type;
        s->ndim = two_d ? 2 : 1;
        s->shape[0] = two_d ? t->ne[1] : t->ne[0];
        s->shape[1] = two_d ? t->ne[0] : 0;
        s->data = t->data;
        s->size = (size_t)t->size;
        const char *dot = strchr(t->name, '.');
        const char *rest = dot && strncmp(t->name, "blk.", 4) == 0 ? strchr(dot + 1, '.') : NULL;
        if (llama && rest && (strncmp(rest, ".attn_q.", 8) == 0 || strncmp(rest, ".attn_k.", 8) == 0)) {
            int heads = rest[6] == 'q' ? c->n_heads : c->n_kv_heads;
            if (s->shape[0] % heads || (s->shape[0] / heads) % 2)
                return zse_fail("%s: tensor '%s' has %lld rows, not %d heads of an even width", g->map.path, t->name,
                                (long long)s->shape[0], heads);
            s->permuted_heads = heads;
        }
    }
    return 0;
}

static char *chat_template_of(const zse_gguf *g)
{
    const zse_gguf_kv *kv = zse_gguf_find(g, "tokenizer.chat_template");
    size_t len;
    const char *s = kv ? zse_gguf_kv_str(kv, &len) : NULL;
    return s ? zse_strndup(s, len) : NULL;
}

int zse_gguf_open_source(const char *path, zse_hf_dir *meta_out, zse_safetensors *st)
{
    memset(meta_out, 0, sizeof *meta_out);
    memset(st, 0, sizeof *st);
    zse_gguf *g = zse_gguf_open(path);
    if (!g)
        return -1;
    int rc = normalize_config(g, &meta_out->config);
    if (rc == 0)
        rc = add_tensors(g, &meta_out->config, st);
    if (rc == 0 && zse_gguf_find(g, "tokenizer.chat_template") && !(meta_out->chat_template = chat_template_of(g)))
        rc = -1;
    /* the tensors point into g's mapping: st takes it over as its one shard */
    if (rc == 0 && !(st->shards = zse_calloc(1, sizeof *st->shards)))
        rc = -1;
    if (rc == 0) {
        st->shards[0] = g->map;
        st->n_shards = 1;
        st->canonical_names = true;
        memset(&g->map, 0, sizeof g->map);
    }
    zse_gguf_close(g);
    if (rc != 0) {
        zse_st_close(st);
        zse_hf_close(meta_out);
    }
    return rc;
}
