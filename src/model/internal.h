/* model/internal.h — what the files of src/model share (not part of model.h's API):
 *
 *   llama.c   loading, activations, the step driver, attention and the dense MLP
 *   moe.c     a mixture-of-experts layer's MLP: router, routed experts, shared expert */
#ifndef ZSE_MODEL_INTERNAL_H
#define ZSE_MODEL_INTERNAL_H

#include "model/model.h"

typedef struct {
    zse_weight *attn_norm;  /* (hidden) */
    zse_weight *wq, *wk, *wv; /* (heads*hd, hidden), (kv*hd, hidden) x2 */
    zse_weight *bq, *bk, *bv; /* biases (attn_bias) */
    zse_weight *q_norm, *k_norm; /* (hd), qwen3 */
    zse_weight *wo;         /* (hidden, heads*hd) */
    zse_weight *bo;         /* (hidden), attn_out_bias */
    zse_weight *ffn_norm;   /* (hidden) */
    /* a dense layer's MLP */
    zse_weight *gate, *up;  /* (ffn, hidden) */
    zse_weight *down;       /* (hidden, ffn) */
    /* a MoE layer's (moe.c) */
    zse_weight *router;     /* (n_experts, hidden), f32 */
    zse_experts *experts;   /* the routed experts */
    zse_weight *sh_gate, *sh_up; /* the shared expert: (shared_ffn, hidden) */
    zse_weight *sh_down;    /* (hidden, shared_ffn) */
    zse_weight *sh_inp;     /* its sigmoid gate: (1, hidden) */
} layer_weights;

struct zse_llm {
    zse_config c;
    zse_backend *be;
    zse_weight *tok_embd;   /* (vocab, hidden) */
    zse_weight *out_norm;   /* (hidden) */
    zse_weight *output;     /* (vocab, hidden); tok_embd when tied */
    layer_weights *layers;
    int max_tokens;         /* rows per step */
    int max_out;            /* rows per step that get logits */
    /* activations, [max_tokens][width]; xo, xo2 and logits [max_out][width] */
    zse_act *x, *xb, *xb2, *q, *k, *v, *att, *hb, *hb2, *xo, *xo2, *logits;
    /* MoE layers: router logits [max_tokens][n_experts], the shared expert's gate
     * [max_tokens][1], and the (token, expert) pairs' rows [max_tokens * k][width]: xs the
     * inputs, then the outputs (the down projection writes over them), hs and hs2 the
     * experts' hidden rows; one routing reused by every layer */
    zse_act *router_logits, *shared_gate, *xs, *hs, *hs2;
    zse_moe_route *route;
    uint64_t steps;         /* forward passes run (zse_llm_steps) */
    zse_lora_pool *lora;    /* the adapter slots (zse_llm_set_lora), or NULL */
    uint32_t step_lora;     /* the projections this step's adapters adapt (0: none) */
    /* a small step padded to the backend's recording size (pad_step) */
    int32_t pad_tokens[ZSE_STEP_PAD_MAX], pad_pos[ZSE_STEP_PAD_MAX], pad_seq[ZSE_STEP_PAD_MAX],
        pad_slots[ZSE_STEP_PAD_MAX], pad_rows[ZSE_STEP_PAD_MAX];
};

static inline const zse_backend_ops *ops(const zse_llm *m) { return m->be->ops; }

/* llama.c: tensor blk.l.what onto the backend; NULL when absent (and *rc = -1 with an
 * error when required) or when loading fails (*rc = -1) */
zse_weight *zse_model_load_layer(zse_llm *m, const zse_file *f, int l, const char *what, bool required, int *rc);

/* moe.c: load and free a MoE layer's weights (0 / -1) */
int zse_moe_layer_load(zse_llm *m, const zse_file *f, int l);
void zse_moe_layer_free(zse_llm *m, layer_weights *L);
/* x += MoE-MLP(RMSNorm(x)) for layer l over n tokens */
void zse_moe_block(zse_llm *m, int l, int64_t n);
/* the MoE activations and routing for max_tokens rows (0 / -1); freed by the second */
int zse_moe_alloc_acts(zse_llm *m, int64_t max_tokens);
void zse_moe_free_acts(zse_llm *m);

#endif
