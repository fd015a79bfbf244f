/* Canonical tensor names: their forward order in a .zse file and the shape the config
 * gives each. One table serves the writer (order, shape checks of the source) and the
 * reader (a hostile file cannot pair a small tensor with a config that makes the kernels
 * read past it).
 *
 * Adding an architecture's tensors means rows in layer_tensors (with the layers that read
 * them), not new control flow. A MoE layer's routed experts are not tensors of this table
 * but an expert bank (format.h); its row here only places the bank in forward order. */
#include "format/format.h"

#include <stdio.h>
#include <string.h>

/* the dimensions a shape is made of */
typedef enum { D_ONE, D_HIDDEN, D_Q, D_KV, D_FFN, D_VOCAB, D_HEAD, D_EXPERTS, D_SHARED_FFN } dim;

/* which layers of which configs read a tensor */
typedef enum {
    USE_ALWAYS,
    USE_BIAS,           /* q/k/v biases (attn_bias) */
    USE_OUT_BIAS,       /* the output projection's bias (attn_out_bias) */
    USE_QK_NORM,
    USE_DENSE,          /* a layer with the dense MLP */
    USE_MOE,            /* a layer with routed experts */
    USE_SHARED,         /* a MoE layer's shared expert (shared_ffn > 0) */
    USE_SHARED_GATE,    /* its sigmoid gate */
    USE_BANK,           /* not a tensor: where the layer's expert bank lies in the file */
} use;

typedef struct {
    const char *suffix;     /* after "blk.N." */
    dim rows, cols;
    use used;
} layer_tensor;

/* a block's tensors in the order the forward pass reads them */
static const layer_tensor layer_tensors[] = {
    {"attn_norm.weight", D_ONE, D_HIDDEN, USE_ALWAYS},
    {"attn_q.weight", D_Q, D_HIDDEN, USE_ALWAYS},
    {"attn_q.bias", D_ONE, D_Q, USE_BIAS},
    {"attn_k.weight", D_KV, D_HIDDEN, USE_ALWAYS},
    {"attn_k.bias", D_ONE, D_KV, USE_BIAS},
    {"attn_v.weight", D_KV, D_HIDDEN, USE_ALWAYS},
    {"attn_v.bias", D_ONE, D_KV, USE_BIAS},
    {"attn_q_norm.weight", D_ONE, D_HEAD, USE_QK_NORM},
    {"attn_k_norm.weight", D_ONE, D_HEAD, USE_QK_NORM},
    {"attn_output.weight", D_HIDDEN, D_Q, USE_ALWAYS},
    {"attn_output.bias", D_ONE, D_HIDDEN, USE_OUT_BIAS},
    {"ffn_norm.weight", D_ONE, D_HIDDEN, USE_ALWAYS},
    {"ffn_gate_inp.weight", D_EXPERTS, D_HIDDEN, USE_MOE},
    {"ffn_exps", D_ONE, D_ONE, USE_BANK},
    {"ffn_gate_inp_shexp.weight", D_ONE, D_HIDDEN, USE_SHARED_GATE},
    {"ffn_gate_shexp.weight", D_SHARED_FFN, D_HIDDEN, USE_SHARED},
    {"ffn_up_shexp.weight", D_SHARED_FFN, D_HIDDEN, USE_SHARED},
    {"ffn_down_shexp.weight", D_HIDDEN, D_SHARED_FFN, USE_SHARED},
    {"ffn_gate.weight", D_FFN, D_HIDDEN, USE_DENSE},
    {"ffn_up.weight", D_FFN, D_HIDDEN, USE_DENSE},
    {"ffn_down.weight", D_HIDDEN, D_FFN, USE_DENSE},
};
#define N_LAYER_TENSORS (sizeof layer_tensors / sizeof layer_tensors[0])

/* layer l of config c reads the tensor of this row */
static bool layer_reads(const zse_config *c, int l, const layer_tensor *t)
{
    const bool moe = zse_config_layer_is_moe(c, l);
    switch (t->used) {
    case USE_ALWAYS: return true;
    case USE_BIAS: return c->attn_bias;
    case USE_OUT_BIAS: return c->attn_out_bias;
    case USE_QK_NORM: return c->qk_norm;
    case USE_DENSE: return !moe;
    case USE_MOE: return moe;
    case USE_SHARED: return moe && c->shared_ffn > 0;
    case USE_SHARED_GATE: return moe && c->shared_ffn > 0 && c->shared_gate;
    case USE_BANK: return false;
    }
    return false;
}

static const layer_tensor top_tensors[] = {
    {"token_embd.weight", D_VOCAB, D_HIDDEN, USE_ALWAYS},
    {"output_norm.weight", D_ONE, D_HIDDEN, USE_ALWAYS},
    {"output.weight", D_VOCAB, D_HIDDEN, USE_ALWAYS},
};

static int64_t dim_value(const zse_config *c, dim d)
{
    switch (d) {
    case D_ONE: return 1;
    case D_HIDDEN: return c->hidden_size;
    case D_Q: return (int64_t)c->n_heads * c->head_dim;
    case D_KV: return (int64_t)c->n_kv_heads * c->head_dim;
    case D_FFN: return c->intermediate_size;
    case D_VOCAB: return c->vocab_size;
    case D_HEAD: return c->head_dim;
    case D_EXPERTS: return c->n_experts;
    case D_SHARED_FFN: return c->shared_ffn;
    }
    return 0;
}

/* "blk.N.suffix" -> N and the table row; false for anything else */
static bool parse_layer_name(const char *name, int *layer, const layer_tensor **row)
{
    if (strncmp(name, "blk.", 4) != 0)
        return false;
    const char *p = name + 4;
    long n = 0;
    if (*p < '0' || *p > '9')
        return false;
    while (*p >= '0' && *p <= '9') {
        n = n * 10 + (*p++ - '0');
        if (n > 1000000)
            return false;
    }
    if (*p++ != '.')
        return false;
    for (size_t i = 0; i < N_LAYER_TENSORS; i++)
        if (strcmp(p, layer_tensors[i].suffix) == 0) {
            *layer = (int)n;
            *row = &layer_tensors[i];
            return true;
        }
    return false;
}

int64_t zse_canonical_rank(const char *name)
{
    if (strcmp(name, "token_embd.weight") == 0)
        return 0;
    if (strcmp(name, "output_norm.weight") == 0)
        return INT64_MAX - 1;
    if (strcmp(name, "output.weight") == 0)
        return INT64_MAX;
    int layer;
    const layer_tensor *row;
    if (parse_layer_name(name, &layer, &row))
        return 1 + (int64_t)layer * (int64_t)N_LAYER_TENSORS + (row - layer_tensors);
    return -1;
}

bool zse_canonical_shape(const zse_config *c, const char *name, int64_t *rows, int64_t *cols)
{
    const layer_tensor *row = NULL;
    for (size_t i = 0; i < sizeof top_tensors / sizeof top_tensors[0]; i++)
        if (strcmp(name, top_tensors[i].suffix) == 0)
            row = &top_tensors[i];
    int layer = 0;
    if (!row && (!parse_layer_name(name, &layer, &row) || layer >= c->n_layers || !layer_reads(c, layer, row)))
        return false;
    *rows = dim_value(c, row->rows);
    *cols = dim_value(c, row->cols);
    return true;
}

int zse_check_tensor_shape(const zse_config *c, const char *name, int64_t rows, int64_t cols)
{
    int64_t want_rows, want_cols;
    if (!zse_canonical_shape(c, name, &want_rows, &want_cols))
        return 0; /* not a tensor this config's forward pass reads */
    if (rows != want_rows || cols != want_cols)
        return zse_fail("tensor '%s' is %lld x %lld but the config (hidden %d, heads %d/%d x %d, "
                        "ffn %d, vocab %d) needs %lld x %lld", name, (long long)rows,
                        (long long)cols, c->hidden_size, c->n_heads, c->n_kv_heads, c->head_dim,
                        c->intermediate_size, c->vocab_size, (long long)want_rows,
                        (long long)want_cols);
    return 0;
}

int zse_check_required_tensors(const zse_config *c, bool (*has)(const void *ctx, const char *name),
                               const void *ctx)
{
    char name[96];
    for (size_t i = 0; i < sizeof top_tensors / sizeof top_tensors[0]; i++) {
        if (strcmp(top_tensors[i].suffix, "output.weight") == 0 && c->tie_embeddings)
            continue;
        if (!has(ctx, top_tensors[i].suffix))
            return zse_fail("tensor '%s' is missing; a %s model needs it", top_tensors[i].suffix,
                            c->arch);
    }
    static const char *const why[USE_BANK + 1] = {
        [USE_BIAS] = " with attention biases", [USE_OUT_BIAS] = " with an output projection bias",
        [USE_QK_NORM] = " with q/k norms", [USE_MOE] = " with experts in this layer",
        [USE_SHARED] = " with a shared expert", [USE_SHARED_GATE] = " with a gated shared expert",
    };
    for (int l = 0; l < c->n_layers; l++)
        for (size_t i = 0; i < N_LAYER_TENSORS; i++) {
            const layer_tensor *t = &layer_tensors[i];
            if (!layer_reads(c, l, t))
                continue;
            snprintf(name, sizeof name, "blk.%d.%s", l, t->suffix);
            if (!has(ctx, name))
                return zse_fail("tensor '%s' is missing; a %s model%s needs it", name, c->arch,
                                why[t->used] ? why[t->used] : "");
        }
    return 0;
}
