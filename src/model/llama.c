/* The llama-family forward pass (llama, mistral, qwen2, qwen3 and, through moe.c, the
 * mixture-of-experts qwen2_moe, qwen3_moe and mixtral), read top to bottom like llama2.c's
 * forward(), with backend ops where its loops were. */
#include "model/internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

void zse_rope_frequencies(const zse_config *c, float *inv_freq, float *mscale)
{
    int half = c->head_dim / 2;
    double base = c->rope_theta;
    const double f = c->rope_scaling.factor;
    *mscale = 1.0f;
    for (int i = 0; i < half; i++)
        inv_freq[i] = (float)(1.0 / pow(base, (2.0 * i) / c->head_dim));
    switch (c->rope_scaling.type) {
    case ZSE_ROPE_LINEAR:
        for (int i = 0; i < half; i++)
            inv_freq[i] = (float)(inv_freq[i] / f);
        break;
    case ZSE_ROPE_LLAMA3: {
        double old = c->rope_scaling.original_max_position;
        double lo = c->rope_scaling.low_freq_factor, hi = c->rope_scaling.high_freq_factor;
        double low_wavelen = old / lo, high_wavelen = old / hi;
        for (int i = 0; i < half; i++) {
            double freq = 1.0 / pow(base, (2.0 * i) / c->head_dim);
            double wavelen = 2 * M_PI / freq;
            if (wavelen > low_wavelen) {
                freq /= f;
            } else if (wavelen >= high_wavelen) {
                double smooth = (old / wavelen - lo) / (hi - lo);
                freq = (1 - smooth) * freq / f + smooth * freq;
            }
            inv_freq[i] = (float)freq;
        }
        break;
    }
    case ZSE_ROPE_YARN: {
        double dim = c->head_dim, orig = c->rope_scaling.original_max_position;
        double attn = c->rope_scaling.attn_factor > 0 ? c->rope_scaling.attn_factor : 0.1 * log(f) + 1.0;
        double low = floor(dim * log(orig / (c->rope_scaling.beta_fast * 2 * M_PI)) / (2 * log(base)));
        double high = ceil(dim * log(orig / (c->rope_scaling.beta_slow * 2 * M_PI)) / (2 * log(base)));
        if (low < 0) low = 0;
        if (high > dim - 1) high = dim - 1;
        if (low == high) high += 0.001;
        for (int i = 0; i < half; i++) {
            double pos_freq = pow(base, (2.0 * i) / dim);
            double extra = 1.0 / pos_freq, inter = 1.0 / (f * pos_freq);
            double ramp = (i - low) / (high - low);
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            double extra_factor = 1 - ramp;
            inv_freq[i] = (float)(inter * (1 - extra_factor) + extra * extra_factor);
        }
        *mscale = (float)attn;
        break;
    }
    default: /* none; dynamic NTK changes nothing until a sequence passes the original length */
        break;
    }
}

/* lookup: the tensor is only read by embed (the backend may keep it off the device) */
static zse_weight *load_tensor(zse_llm *m, const zse_file *f, const char *name, bool required, bool lookup,
                               int *rc)
{
    const zse_tensor_info *t = zse_file_tensor(f, name);
    if (!t) {
        if (required)
            *rc = zse_fail("%s: tensor '%s' is missing", zse_file_path(f), name);
        return NULL;
    }
    const zse_backend_ops *o = ops(m);
    zse_weight *w = lookup && o->weight_load_lookup ? o->weight_load_lookup(m->be, t) : o->weight_load(m->be, t);
    if (!w)
        *rc = -1;
    return w;
}

static zse_weight *load_named(zse_llm *m, const zse_file *f, const char *name, bool required, int *rc)
{
    return load_tensor(m, f, name, required, false, rc);
}

zse_weight *zse_model_load_layer(zse_llm *m, const zse_file *f, int l, const char *what, bool required, int *rc)
{
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s", l, what);
    return load_named(m, f, name, required, rc);
}

static void free_acts(zse_llm *m)
{
    zse_act **acts[] = {&m->x, &m->xb, &m->xb2, &m->q, &m->k, &m->v, &m->att, &m->hb, &m->hb2, &m->xo, &m->xo2,
                        &m->logits};
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++) {
        if (*acts[i])
            ops(m)->act_free(m->be, *acts[i]);
        *acts[i] = NULL;
    }
    zse_moe_free_acts(m);
    zse_offload_free_acts(m);
}

/* the activation shapes alloc_acts makes, [rows][cols] each (zse_llm_act_bytes counts them) */
typedef struct {
    int64_t rows, cols;
} act_shape;

static int act_shapes(const zse_config *c, int64_t T, int64_t O, act_shape *out)
{
    const int64_t qd = (int64_t)c->n_heads * c->head_dim, kd = (int64_t)c->n_kv_heads * c->head_dim;
    /* the dense MLP's hidden rows (when a layer has one: not in Mixtral), and a shared expert's */
    const int64_t dense_ffn = zse_config_moe_layer_count(c) < c->n_layers ? c->intermediate_size : 1;
    const int64_t ffn = c->shared_ffn > dense_ffn ? c->shared_ffn : dense_ffn;
    const act_shape dense[] = {{T, c->hidden_size}, {T, c->hidden_size}, {T, c->hidden_size}, {T, qd}, {T, kd},
                               {T, kd}, {T, qd}, {T, ffn}, {T, ffn}, {O, c->hidden_size}, {O, c->hidden_size},
                               {O, c->vocab_size}};
    int n = 0;
    for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++)
        out[n++] = dense[i];
    if (c->n_experts > 0) { /* moe.c's: router logits, the pairs' rows, the shared expert's gate */
        const int64_t pairs = T * c->n_experts_used;
        out[n++] = (act_shape){T, c->n_experts};
        out[n++] = (act_shape){pairs, c->hidden_size};
        out[n++] = (act_shape){pairs, c->expert_ffn};
        out[n++] = (act_shape){pairs, c->expert_ffn};
        out[n++] = (act_shape){T, c->shared_gate ? 1 : 0};
    }
    return n;
}

uint64_t zse_llm_act_bytes(const zse_config *c, int max_tokens, int max_out)
{
    act_shape shapes[24];
    const int n = act_shapes(c, max_tokens, max_out, shapes);
    uint64_t bytes = 0;
    for (int i = 0; i < n; i++) /* rows padded to 16 bytes, as a GPU keeps them */
        bytes += (uint64_t)shapes[i].rows * (uint64_t)((shapes[i].cols + 3) / 4 * 4) * sizeof(float);
    if (c->n_experts > 0) /* the routing's arrays (pairs: expert, weight, place, token; the segments) */
        bytes += (uint64_t)max_tokens * (uint64_t)c->n_experts_used * 16 + (uint64_t)(c->n_experts + 1) * 8 + 1024;
    return bytes;
}

static int alloc_acts(zse_llm *m, int max_tokens, int max_out)
{
    const zse_config *c = &m->c;
    int64_t T = max_tokens, O = max_out;
    int64_t qd = (int64_t)c->n_heads * c->head_dim, kd = (int64_t)c->n_kv_heads * c->head_dim;
    const zse_backend_ops *o = ops(m);
    free_acts(m);
    m->x = o->act_new(m->be, T, c->hidden_size);
    m->xb = o->act_new(m->be, T, c->hidden_size);
    m->xb2 = o->act_new(m->be, T, c->hidden_size);
    m->q = o->act_new(m->be, T, qd);
    m->k = o->act_new(m->be, T, kd);
    m->v = o->act_new(m->be, T, kd);
    m->att = o->act_new(m->be, T, qd);
    /* the dense MLP's hidden rows (when a layer has one: not in Mixtral), and a shared expert's */
    const int64_t dense_ffn = zse_config_moe_layer_count(c) < c->n_layers ? c->intermediate_size : 1;
    const int64_t ffn = c->shared_ffn > dense_ffn ? c->shared_ffn : dense_ffn;
    m->hb = o->act_new(m->be, T, ffn);
    m->hb2 = o->act_new(m->be, T, ffn);
    m->xo = o->act_new(m->be, O, c->hidden_size);
    m->xo2 = o->act_new(m->be, O, c->hidden_size);
    m->logits = o->act_new(m->be, O, c->vocab_size);
    if (!(m->x && m->xb && m->xb2 && m->q && m->k && m->v && m->att && m->hb && m->hb2 && m->xo && m->xo2 &&
          m->logits) || zse_moe_alloc_acts(m, T) != 0 || zse_offload_alloc_acts(m, T) != 0) {
        free_acts(m);
        m->max_tokens = m->max_out = 0;
        return -1;
    }
    m->max_tokens = max_tokens;
    m->max_out = max_out;
    return 0;
}

int zse_llm_reserve(zse_llm *m, int max_tokens, int max_out)
{
    if (max_tokens < 1 || max_out < 1 || max_out > max_tokens)
        return zse_fail("step sizes of %d tokens with %d logit rows are invalid", max_tokens, max_out);
    if (max_tokens <= m->max_tokens && max_out <= m->max_out)
        return 0;
    int keep_t = m->max_tokens, keep_o = m->max_out;
    max_tokens = max_tokens > keep_t ? max_tokens : keep_t;
    max_out = max_out > keep_o ? max_out : keep_o;
    if (alloc_acts(m, max_tokens, max_out) == 0)
        return 0;
    char why[ZSE_ERROR_MAX];
    snprintf(why, sizeof why, "%s", zse_error_message());
    if (keep_t > 0 && alloc_acts(m, keep_t, keep_o) != 0) /* what worked before */
        zse_log(ZSE_LOG_ERROR, "cannot restore activations of %d tokens", keep_t);
    return zse_fail("activations for %d tokens per step: %s", max_tokens, why);
}

zse_llm *zse_llm_load(const zse_file *f, zse_backend *be, int max_tokens, int max_out)
{
    return zse_llm_load_placed(f, be, max_tokens, max_out, NULL);
}

/* the weight of a streamed layer's matrix is bound to a layer buffer by offload.c */
static zse_weight *load_matrix(zse_llm *m, const zse_file *f, int l, const char *what, bool streamed, int *rc)
{
    return streamed ? NULL : zse_model_load_layer(m, f, l, what, true, rc);
}

zse_llm *zse_llm_load_placed(const zse_file *f, zse_backend *be, int max_tokens, int max_out,
                             const zse_placement *pl)
{
    zse_llm *m = zse_calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->c = *zse_file_config(f);
    m->be = be;
    const zse_config *c = &m->c;
    static const char *const families[] = {"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"};
    bool known = false;
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++)
        known = known || strcmp(c->arch, families[i]) == 0;
    if (!known) {
        zse_fail("%s: architecture '%s' is not supported by this zse", zse_file_path(f), c->arch);
        free(m);
        return NULL;
    }
    m->layers = zse_calloc((size_t)c->n_layers, sizeof *m->layers);
    int rc = m->layers ? 0 : -1;
    /* which offload runs decides how layers load: experts kept in host memory, matrices of
     * streamed layers bound to layer buffers */
    m->off.experts = pl && pl->expert_slots > 0;
    for (int l = 0; pl && l < c->n_layers; l++)
        m->off.stream = m->off.stream || zse_offload_streams(pl, l);
    /* tied, the table is also the lm_head and must be where matmul reads it */
    m->tok_embd = load_tensor(m, f, "token_embd.weight", true, !c->tie_embeddings, &rc);
    m->out_norm = load_named(m, f, "output_norm.weight", true, &rc);
    m->output = c->tie_embeddings ? NULL : load_named(m, f, "output.weight", true, &rc);
    for (int l = 0; rc == 0 && l < c->n_layers; l++) {
        layer_weights *L = &m->layers[l];
        L->attn_norm = zse_model_load_layer(m, f, l, "attn_norm.weight", true, &rc);
        const bool streamed = zse_offload_streams(pl, l);
        L->wq = load_matrix(m, f, l, "attn_q.weight", streamed, &rc);
        L->wk = load_matrix(m, f, l, "attn_k.weight", streamed, &rc);
        L->wv = load_matrix(m, f, l, "attn_v.weight", streamed, &rc);
        /* only what the config reads: the reader checked the shapes of exactly those */
        if (c->attn_bias) {
            L->bq = zse_model_load_layer(m, f, l, "attn_q.bias", true, &rc);
            L->bk = zse_model_load_layer(m, f, l, "attn_k.bias", true, &rc);
            L->bv = zse_model_load_layer(m, f, l, "attn_v.bias", true, &rc);
        }
        if (c->qk_norm) {
            L->q_norm = zse_model_load_layer(m, f, l, "attn_q_norm.weight", true, &rc);
            L->k_norm = zse_model_load_layer(m, f, l, "attn_k_norm.weight", true, &rc);
        }
        L->wo = load_matrix(m, f, l, "attn_output.weight", streamed, &rc);
        if (c->attn_out_bias)
            L->bo = zse_model_load_layer(m, f, l, "attn_output.bias", true, &rc);
        L->ffn_norm = zse_model_load_layer(m, f, l, "ffn_norm.weight", true, &rc);
        if (zse_config_layer_is_moe(c, l)) {
            if (rc == 0)
                rc = zse_moe_layer_load(m, f, l);
            continue;
        }
        L->gate = load_matrix(m, f, l, "ffn_gate.weight", streamed, &rc);
        L->up = load_matrix(m, f, l, "ffn_up.weight", streamed, &rc);
        L->down = load_matrix(m, f, l, "ffn_down.weight", streamed, &rc);
    }
    if (rc == 0 && (m->off.experts || m->off.stream))
        rc = zse_offload_init(m, f, pl);
    if (rc == 0)
        rc = zse_llm_reserve(m, max_tokens, max_out);
    if (rc == 0)
        rc = zse_offload_start(m);
    if (rc == 0) {
        float *inv = zse_malloc((size_t)c->head_dim / 2 * sizeof *inv), mscale;
        rc = inv ? 0 : -1;
        if (inv) {
            zse_rope_frequencies(c, inv, &mscale);
            rc = ops(m)->rope_init(be, inv, c->head_dim / 2, mscale);
            free(inv);
        }
    }
    if (rc != 0) {
        zse_llm_free(m);
        return NULL;
    }
    return m;
}

void zse_llm_free(zse_llm *m)
{
    if (!m)
        return;
    zse_offload_free(m); /* first: a streamed layer's matrices are its views */
    const zse_backend_ops *o = ops(m);
    zse_weight **all[] = {&m->tok_embd, &m->out_norm, &m->output};
    for (size_t i = 0; i < 3; i++)
        if (*all[i])
            o->weight_free(m->be, *all[i]);
    for (int l = 0; m->layers && l < m->c.n_layers; l++) {
        layer_weights *L = &m->layers[l];
        zse_weight *ws[] = {L->attn_norm, L->wq, L->wk, L->wv, L->bq, L->bk, L->bv, L->q_norm,
                            L->k_norm, L->wo, L->bo, L->ffn_norm, L->gate, L->up, L->down};
        for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++)
            if (ws[i])
                o->weight_free(m->be, ws[i]);
        zse_moe_layer_free(m, L);
    }
    free(m->layers);
    free_acts(m);
    free(m->tap_buf);
    free(m);
}

const zse_config *zse_llm_config(const zse_llm *m) { return &m->c; }
int zse_llm_max_tokens(const zse_llm *m) { return m->max_tokens; }
int zse_llm_max_out(const zse_llm *m) { return m->max_out; }

void zse_llm_set_lora(zse_llm *m, zse_lora_pool *pool) { m->lora = pool; }

/* LoRA over the base matmul that reads x: each row's adapter (if any) adds its delta to the
 * projections it adapts; nothing at all when no sequence of the step has an adapter. The
 * projections of outs the step's adapters touch, into sel; how many */
static int lora_select(const zse_llm *m, const zse_lora_out *outs, int n_outs, zse_lora_out sel[3])
{
    int k = 0;
    for (int i = 0; i < n_outs; i++)
        if (m->step_lora >> outs[i].module & 1)
            sel[k++] = outs[i];
    return k;
}

/* before the matmul_multi that writes outs: whether the backend takes the delta on with it
 * (folded into the matmul's launch where it can); if not, lora() after the matmul */
static bool lora_with_matmul(zse_llm *m, int l, const zse_act *x, int64_t n, const zse_lora_out *outs, int n_outs)
{
    zse_lora_out sel[3];
    const int k = lora_select(m, outs, n_outs, sel);
    if (!k)
        return true; /* nothing to apply */
    const zse_backend_ops *o = ops(m);
    return o->matmul_multi && o->lora_with_next_matmul && o->lora_with_next_matmul(m->be, m->lora, l, x, n, sel, k);
}

static void lora(zse_llm *m, int l, const zse_act *x, int64_t n, const zse_lora_out *outs, int n_outs)
{
    zse_lora_out sel[3];
    const int k = lora_select(m, outs, n_outs, sel);
    if (k)
        ops(m)->lora_apply(m->be, m->lora, l, x, n, sel, k);
}

/* x += W·in (+ bias): in the matmul's store where the backend can, else through xb2 */
static void residual_matmul(zse_llm *m, const zse_weight *w, const zse_weight *bias, const zse_act *in, int64_t n)
{
    const zse_backend_ops *o = ops(m);
    if (o->matmul_multi) {
        const zse_matmul_out r = {w, bias, m->x};
        o->matmul_multi(m->be, in, n, &r, 1, true);
        return;
    }
    o->matmul(m->be, w, in, n, m->xb2);
    if (bias)
        o->add_bias(m->be, m->xb2, bias, n);
    o->add(m->be, m->x, m->xb2, n, m->c.hidden_size);
}

/* hands the tap the first `rows` rows of a (width `cols`), read back to the host */
static void tap_rows(zse_llm *m, int layer, zse_tap_point point, const zse_act *a, int64_t rows, int64_t cols)
{
    size_t need = (size_t)rows * (size_t)cols;
    if (need > m->tap_cap) {
        float *b = zse_realloc(m->tap_buf, need * sizeof *b);
        if (!b) { /* the tap counts the rows it saw: its pass refuses the shortfall */
            zse_log(ZSE_LOG_ERROR, "calibration tap: %s", zse_error_message());
            return;
        }
        m->tap_buf = b;
        m->tap_cap = need;
    }
    if (ops(m)->act_read(m->be, a, m->tap_buf, rows) == 0)
        m->tap_fn(m->tap_ctx, layer, point, m->tap_buf, rows, cols);
}

/* a tap point of the forward pass: without a tap (serving), one NULL check */
static inline void tap(zse_llm *m, int layer, zse_tap_point point, const zse_act *a, int64_t rows, int64_t cols)
{
    if (m->tap_fn)
        tap_rows(m, layer, point, a, rows, cols);
}

int zse_llm_set_tap(zse_llm *m, zse_tap_fn fn, void *ctx)
{
    if (fn && ops(m)->step_begin)
        return zse_fail("the %s backend records its steps and cannot be tapped; calibrate on the CPU", ops(m)->name);
    if (fn && m->c.n_experts > 0)
        return zse_fail("a mixture-of-experts model cannot be tapped: the taps do not see its experts' inputs");
    if (fn && (m->off.experts || m->off.stream))
        return zse_fail("a model with weights in host memory (layers streamed or experts offloaded, as "
                        "ZSE_STREAM_LAYERS / ZSE_EXPERT_CACHE or a GPU budget ask) cannot be tapped: calibration "
                        "needs every weight resident, its sensitivity pass swaps them; unset those knobs");
    m->tap_fn = fn;
    m->tap_ctx = ctx;
    return 0;
}

/* the model's slot for a swappable linear weight, or NULL */
static zse_weight **weight_slot(zse_llm *m, const char *name)
{
    if (strcmp(name, "output.weight") == 0)
        return m->output ? &m->output : NULL;
    int l, end = 0;
    char what[32];
    if (sscanf(name, "blk.%d.%31[a-z_].weight%n", &l, what, &end) != 2 || name[end] != '\0' || l < 0 ||
        l >= m->c.n_layers)
        return NULL;
    layer_weights *L = &m->layers[l];
    static const char *const names[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    zse_weight **slots[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->gate, &L->up, &L->down};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(what, names[i]) == 0)
            return *slots[i] ? slots[i] : NULL;
    return NULL;
}

int zse_llm_swap_weight(zse_llm *m, const char *name, const zse_tensor_info *t)
{
    if (m->off.stream) /* a streamed layer's matrices are views into the layer buffers */
        return zse_fail("cannot replace '%s' of a model with layers streamed from host memory", name);
    zse_weight **slot = weight_slot(m, name);
    if (!slot)
        return zse_fail("'%s' is not a linear weight of this model", name);
    int64_t rows, cols;
    if (!zse_canonical_shape(&m->c, name, &rows, &cols) || t->q.rows != rows || t->q.cols != cols)
        return zse_fail("a %lld x %lld tensor cannot replace '%s'", (long long)t->q.rows, (long long)t->q.cols, name);
    zse_weight *w = ops(m)->weight_load(m->be, t);
    if (!w)
        return -1;
    ops(m)->weight_free(m->be, *slot);
    *slot = w;
    return 0;
}

/* x += Attention(RMSNorm(x)) for one layer */
static void attention_block(zse_llm *m, zse_kv *kv, int l, int64_t n)
{
    const zse_backend_ops *o = ops(m);
    const zse_config *c = &m->c;
    layer_weights *L = &m->layers[l];
    o->rmsnorm(m->be, m->x, L->attn_norm, c->rms_eps, n, c->hidden_size, m->xb);
    tap(m, l, ZSE_TAP_ATTN_IN, m->xb, n, c->hidden_size);
    const zse_lora_out qkv_lora[3] = {{ZSE_LORA_Q, m->q}, {ZSE_LORA_K, m->k}, {ZSE_LORA_V, m->v}};
    const bool qkv_lora_done = lora_with_matmul(m, l, m->xb, n, qkv_lora, 3);
    if (o->matmul_multi) {
        const zse_matmul_out qkv[3] = {{L->wq, L->bq, m->q}, {L->wk, L->bk, m->k}, {L->wv, L->bv, m->v}};
        o->matmul_multi(m->be, m->xb, n, qkv, 3, false);
    } else {
        o->matmul(m->be, L->wq, m->xb, n, m->q);
        o->matmul(m->be, L->wk, m->xb, n, m->k);
        o->matmul(m->be, L->wv, m->xb, n, m->v);
        if (L->bq) {
            o->add_bias(m->be, m->q, L->bq, n);
            o->add_bias(m->be, m->k, L->bk, n);
            o->add_bias(m->be, m->v, L->bv, n);
        }
    }
    if (!qkv_lora_done)
        lora(m, l, m->xb, n, qkv_lora, 3);
    if (L->q_norm) { /* qwen3: per-head RMSNorm before RoPE */
        o->rmsnorm(m->be, m->q, L->q_norm, c->rms_eps, n * c->n_heads, c->head_dim, m->q);
        o->rmsnorm(m->be, m->k, L->k_norm, c->rms_eps, n * c->n_kv_heads, c->head_dim, m->k);
    }
    if (o->rope_kv_store) {
        o->rope_kv_store(m->be, m->q, m->k, m->v, kv, l, c->n_heads, c->n_kv_heads, c->head_dim);
    } else {
        o->rope(m->be, m->q, m->k, c->n_heads, c->n_kv_heads, c->head_dim);
        o->kv_store(m->be, kv, l, m->k, m->v);
    }
    zse_attn_params p = {c->n_heads, c->n_kv_heads, c->head_dim, 1.0f / sqrtf((float)c->head_dim),
                         c->sliding_window};
    o->attention(m->be, kv, l, m->q, &p, m->att);
    tap(m, l, ZSE_TAP_ATTN_OUT, m->att, n, (int64_t)c->n_heads * c->head_dim);
    const zse_lora_out o_lora = {ZSE_LORA_O, m->x};
    const bool o_lora_done = lora_with_matmul(m, l, m->att, n, &o_lora, 1);
    residual_matmul(m, L->wo, L->bo, m->att, n);
    if (!o_lora_done)
        lora(m, l, m->att, n, &o_lora, 1);
}

/* x += W_down(SiLU(W_gate(RMSNorm(x))) * W_up(RMSNorm(x))) */
static void mlp_block(zse_llm *m, int l, int64_t n)
{
    const zse_backend_ops *o = ops(m);
    const zse_config *c = &m->c;
    layer_weights *L = &m->layers[l];
    o->rmsnorm(m->be, m->x, L->ffn_norm, c->rms_eps, n, c->hidden_size, m->xb);
    tap(m, l, ZSE_TAP_FFN_IN, m->xb, n, c->hidden_size);
    const zse_lora_out gate_up_lora[2] = {{ZSE_LORA_GATE, m->hb}, {ZSE_LORA_UP, m->hb2}};
    const bool gate_up_lora_done = lora_with_matmul(m, l, m->xb, n, gate_up_lora, 2);
    if (o->matmul_multi) {
        const zse_matmul_out gate_up[2] = {{L->gate, NULL, m->hb}, {L->up, NULL, m->hb2}};
        o->matmul_multi(m->be, m->xb, n, gate_up, 2, false);
    } else {
        o->matmul(m->be, L->gate, m->xb, n, m->hb);
        o->matmul(m->be, L->up, m->xb, n, m->hb2);
    }
    if (!gate_up_lora_done)
        lora(m, l, m->xb, n, gate_up_lora, 2);
    o->silu_mul(m->be, m->hb, m->hb2, n, c->intermediate_size, m->hb);
    tap(m, l, ZSE_TAP_FFN_DOWN, m->hb, n, c->intermediate_size);
    const zse_lora_out down_lora = {ZSE_LORA_DOWN, m->x};
    const bool down_lora_done = lora_with_matmul(m, l, m->hb, n, &down_lora, 1);
    residual_matmul(m, L->down, NULL, m->hb, n);
    if (!down_lora_done)
        lora(m, l, m->hb, n, &down_lora, 1);
}

/* queues one step's ops: every layer, then the out rows' logits when there are any */
static void issue_step(zse_llm *m, zse_kv *kv, const zse_batch *b)
{
    const zse_backend_ops *o = ops(m);
    const zse_config *c = &m->c;
    int64_t n = b->n_tokens;
    o->embed(m->be, m->tok_embd, m->x);
    for (int l = 0; l < c->n_layers; l++) {
        if (m->off.stream)
            zse_offload_layer_begin(m, l);
        attention_block(m, kv, l, n);
        if (m->layers[l].experts)
            zse_moe_block(m, l, n);
        else
            mlp_block(m, l, n);
        if (m->off.stream)
            zse_offload_layer_end(m, l);
    }
    if (b->n_out == 0)
        return;
    o->gather_out_rows(m->be, m->x, c->hidden_size, m->xo);
    o->rmsnorm(m->be, m->xo, m->out_norm, c->rms_eps, b->n_out, c->hidden_size, m->xo2);
    tap(m, -1, ZSE_TAP_OUTPUT, m->xo2, b->n_out, c->hidden_size);
    o->matmul(m->be, m->output ? m->output : m->tok_embd, m->xo2, b->n_out, m->logits);
}

/* Pads a small step up to the row count the backend records steps at (step_rows), so one
 * recording serves every step size of its bucket. A padding token is token 0 at position 0
 * of sequence 0 with no KV slot (kv_store skips it, so the cache is untouched) and a logit
 * row of its own after the real ones: the real rows compute exactly what they would alone.
 * Returns b itself when there is nothing to pad or no room for it. */
static const zse_batch *pad_step(zse_llm *m, const zse_batch *b, zse_batch *pb)
{
    const zse_backend_ops *o = ops(m);
    const int rows = o->step_rows ? o->step_rows(m->be, b->n_tokens) : b->n_tokens;
    const int extra = rows - b->n_tokens;
    if (extra <= 0 || rows > ZSE_STEP_PAD_MAX || rows > m->max_tokens || b->n_out + extra > m->max_out)
        return b;
    const size_t nt = (size_t)b->n_tokens * sizeof(int32_t), no = (size_t)b->n_out * sizeof(int32_t);
    memcpy(m->pad_tokens, b->tokens, nt);
    memcpy(m->pad_pos, b->positions, nt);
    memcpy(m->pad_seq, b->seq_of, nt);
    memcpy(m->pad_slots, b->slots, nt);
    memcpy(m->pad_rows, b->out_rows, no);
    for (int i = 0; i < extra; i++) {
        int t = b->n_tokens + i;
        m->pad_tokens[t] = 0;
        m->pad_pos[t] = 0;
        m->pad_seq[t] = 0;
        m->pad_slots[t] = -1;
        m->pad_rows[b->n_out + i] = t;
    }
    *pb = *b;
    pb->n_tokens = rows;
    pb->tokens = m->pad_tokens;
    pb->positions = m->pad_pos;
    pb->seq_of = m->pad_seq;
    pb->slots = m->pad_slots;
    pb->n_out = b->n_out + extra;
    pb->out_rows = m->pad_rows;
    return pb;
}

/* runs the batch through every layer and leaves the out rows' logits in m->logits (the
 * first b->n_out rows are b's); 1 when there are none (n_out 0), 0 when there are, -1 on
 * failure */
static int forward_to_logits(zse_llm *m, zse_kv *kv, const zse_batch *b)
{
    const zse_backend_ops *o = ops(m);
    const zse_config *c = &m->c;
    if (b->n_tokens < 1 || b->n_tokens > m->max_tokens)
        return zse_fail("batch of %d tokens (at most %d per step)", b->n_tokens, m->max_tokens);
    if (b->n_out < 0 || b->n_out > m->max_out || b->n_out > b->n_tokens)
        return zse_fail("batch asks logits for %d rows (at most %d per step)", b->n_out, m->max_out);
    for (int i = 0; i < b->n_tokens; i++)
        if (b->tokens[i] < 0 || b->tokens[i] >= c->vocab_size)
            return zse_fail("token id %d is outside the vocabulary (0..%d)", b->tokens[i], c->vocab_size - 1);
    if (b->lora_modules && (!b->adapter_of_seq || !m->lora))
        return zse_fail("a batch with adapters on a model without adapter slots");
    m->step_lora = b->adapter_of_seq ? b->lora_modules : 0;
    /* A step with weights in host memory is not recorded: a MoE layer's host reads the
     * routing back in the middle of it, and the copies and waits of the layer stream run on a
     * second queue. What that costs is the launch time a recording saves (about 14 launches
     * a layer, a few microseconds each at decode), small beside the copies such a step waits
     * for. Nor is it padded, which only serves recordings. */
    const bool offloaded = m->off.experts || m->off.stream;
    zse_batch padded;
    const zse_batch *run = b->n_out > 0 && !offloaded ? pad_step(m, b, &padded) : b;
    m->steps++; /* from here on the logits buffer no longer holds the previous step's */
    if (o->begin_batch(m->be, run) != 0)
        return -1;
    int st = o->step_begin && !offloaded ? o->step_begin(m->be, m, kv) : ZSE_STEP_ISSUE;
    /* at most twice: a failed recording asks for the ops once more, and runs them eagerly */
    for (int tries = 0; st == ZSE_STEP_ISSUE && tries < 2; tries++) {
        issue_step(m, kv, run);
        st = o->step_end && !offloaded ? o->step_end(m->be) : ZSE_STEP_DONE;
    }
    if (offloaded) {
        m->off.stats.steps++;
        if (m->off.failed) {
            m->off.failed = false;
            return zse_fail("%s", m->off.error);
        }
    }
    if (st != ZSE_STEP_DONE)
        return st < 0 ? -1 : zse_fail("the backend did not run the step");
    if (b->n_out == 0)
        return o->sync(m->be) != 0 ? -1 : 1;
    return 0;
}

int zse_llm_forward(zse_llm *m, zse_kv *kv, const zse_batch *b, float *logits)
{
    int rc = forward_to_logits(m, kv, b);
    if (rc != 0)
        return rc < 0 ? -1 : 0;
    if (ops(m)->sync(m->be) != 0)
        return -1;
    return ops(m)->act_read(m->be, m->logits, logits, b->n_out);
}

uint64_t zse_llm_steps(const zse_llm *m) { return m->steps; }

bool zse_llm_can_sample(const zse_llm *m) { return ops(m)->sample_rows != NULL; }

bool zse_llm_can_mask(const zse_llm *m) { return ops(m)->mask_rows != NULL; }

/* the constrained rows' masks on the logits, where they are */
static int mask_logits(zse_llm *m, const zse_row_masks *masks)
{
    if (!masks || masks->n == 0)
        return 0;
    if (!ops(m)->mask_rows)
        return zse_fail("the %s backend does not mask logits", ops(m)->name);
    return ops(m)->mask_rows(m->be, m->logits, m->c.vocab_size, masks);
}

int zse_llm_forward_sample(zse_llm *m, zse_kv *kv, const zse_batch *b, const zse_row_masks *masks,
                           const zse_sample_row *p, int32_t *ids)
{
    if (!ops(m)->sample_rows)
        return zse_fail("the %s backend does not sample", ops(m)->name);
    int rc = forward_to_logits(m, kv, b);
    if (rc != 0)
        return rc < 0 ? -1 : 0;
    if (mask_logits(m, masks) != 0)
        return -1;
    return ops(m)->sample_rows(m->be, m->logits, b->n_out, m->c.vocab_size, p, ids);
}

int zse_llm_forward_hidden(zse_llm *m, zse_kv *kv, const zse_batch *b, float *hidden)
{
    int rc = forward_to_logits(m, kv, b);
    if (rc != 0)
        return rc < 0 ? -1 : 0;
    if (ops(m)->sync(m->be) != 0)
        return -1;
    /* the out rows after the final norm: what the head multiplies */
    return ops(m)->act_read(m->be, m->xo2, hidden, b->n_out);
}

int zse_llm_read_logits(zse_llm *m, int rows, float *logits)
{
    if (rows < 1 || rows > m->max_out)
        return zse_fail("reading %d logit rows of %d", rows, m->max_out);
    if (ops(m)->sync(m->be) != 0)
        return -1;
    return ops(m)->act_read(m->be, m->logits, logits, rows);
}

int zse_llm_forward_argmax(zse_llm *m, zse_kv *kv, const zse_batch *b, const zse_row_masks *masks, int32_t *ids)
{
    int rc = forward_to_logits(m, kv, b);
    if (rc != 0)
        return rc < 0 ? -1 : 0;
    if (mask_logits(m, masks) != 0)
        return -1;
    return ops(m)->argmax_rows(m->be, m->logits, b->n_out, m->c.vocab_size, ids);
}
