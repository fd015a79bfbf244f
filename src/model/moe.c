/* A mixture-of-experts layer's MLP (qwen2_moe, qwen3_moe, mixtral), as transformers runs
 * it:
 *
 *   h      = RMSNorm(x)
 *   p      = softmax(router · h)                  f32, over every expert
 *   top k  = the k largest p, weights p_j (or p_j / sum of the k: norm_topk, Mixtral)
 *   moe    = sum over the k experts, in ascending order, of weight_j * expert_j(h)
 *            expert(h) = W_down (SiLU(W_gate h) * W_up h)
 *   x     += moe + sigmoid(w_shared · h) * shared(h)   (qwen2_moe's shared expert)
 *
 * The routed experts run through the backend's grouped ops: the step's (token, expert)
 * pairs sorted by expert, one matmul call for all the active experts' gates and ups, one
 * for their downs. Routing comes before any expert runs (moe_route), so when the
 * experts live in host memory (offload.c) the step learns which ones it needs before any
 * runs: it fetches or places them, runs the rest on the host, and predicts the next MoE
 * layer's experts from this layer's hidden state with that layer's router, to prefetch them
 * while this layer computes and the next one's attention runs. */
#include "model/internal.h"

#include <stdio.h>

int zse_moe_layer_load(zse_llm *m, const zse_file *f, int l)
{
    const zse_config *c = &m->c;
    layer_weights *L = &m->layers[l];
    const zse_expert_bank *bank = zse_file_experts(f, l);
    if (!bank)
        return zse_fail("%s: layer %d runs experts but the file has no expert bank for it", zse_file_path(f), l);
    int rc = 0;
    L->router = zse_model_load_layer(m, f, l, "ffn_gate_inp.weight", true, &rc);
    if (c->shared_ffn > 0) {
        L->sh_gate = zse_model_load_layer(m, f, l, "ffn_gate_shexp.weight", true, &rc);
        L->sh_up = zse_model_load_layer(m, f, l, "ffn_up_shexp.weight", true, &rc);
        L->sh_down = zse_model_load_layer(m, f, l, "ffn_down_shexp.weight", true, &rc);
        if (c->shared_gate)
            L->sh_inp = zse_model_load_layer(m, f, l, "ffn_gate_inp_shexp.weight", true, &rc);
    }
    if (rc == 0 && !(L->experts = m->off.experts ? ops(m)->experts_host(m->be, bank) : ops(m)->experts_load(m->be, bank))) {
        zse_error_prefix("layer %d experts", l);
        rc = -1;
    }
    return rc;
}

void zse_moe_layer_free(zse_llm *m, layer_weights *L)
{
    const zse_backend_ops *o = ops(m);
    zse_weight *ws[] = {L->router, L->sh_gate, L->sh_up, L->sh_down, L->sh_inp};
    for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++)
        if (ws[i])
            o->weight_free(m->be, ws[i]);
    if (L->experts)
        o->experts_free(m->be, L->experts);
    L->experts = NULL;
}

void zse_moe_free_acts(zse_llm *m)
{
    zse_act **acts[] = {&m->router_logits, &m->shared_gate, &m->xs, &m->hs, &m->hs2};
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++) {
        if (*acts[i])
            ops(m)->act_free(m->be, *acts[i]);
        *acts[i] = NULL;
    }
    if (m->route)
        ops(m)->moe_route_free(m->be, m->route);
    m->route = NULL;
}

int zse_moe_alloc_acts(zse_llm *m, int64_t max_tokens)
{
    const zse_config *c = &m->c;
    zse_moe_free_acts(m);
    if (c->n_experts == 0)
        return 0;
    const zse_backend_ops *o = ops(m);
    const int64_t pairs = max_tokens * c->n_experts_used;
    const zse_moe_params p = {c->n_experts, c->n_experts_used, c->norm_topk};
    m->router_logits = o->act_new(m->be, max_tokens, c->n_experts);
    m->xs = o->act_new(m->be, pairs, c->hidden_size);
    m->hs = o->act_new(m->be, pairs, c->expert_ffn);
    m->hs2 = o->act_new(m->be, pairs, c->expert_ffn);
    if (c->shared_gate)
        m->shared_gate = o->act_new(m->be, max_tokens, 1);
    m->route = o->moe_route_new(m->be, max_tokens, &p);
    if (!m->router_logits || !m->xs || !m->hs || !m->hs2 || (c->shared_gate && !m->shared_gate) || !m->route) {
        zse_moe_free_acts(m);
        return -1;
    }
    return 0;
}

/* gate and up of the same input, one call where the backend has matmul_multi */
static void gate_up(zse_llm *m, const zse_weight *gate, const zse_weight *up, const zse_act *in, int64_t n,
                    zse_act *g, zse_act *u)
{
    const zse_backend_ops *o = ops(m);
    if (o->matmul_multi) {
        const zse_matmul_out outs[2] = {{gate, NULL, g}, {up, NULL, u}};
        o->matmul_multi(m->be, in, n, outs, 2, false);
    } else {
        o->matmul(m->be, gate, in, n, g);
        o->matmul(m->be, up, in, n, u);
    }
}

void zse_moe_block(zse_llm *m, int l, int64_t n)
{
    const zse_backend_ops *o = ops(m);
    const zse_config *c = &m->c;
    layer_weights *L = &m->layers[l];
    const int64_t pairs = n * c->n_experts_used;
    o->rmsnorm(m->be, m->x, L->ffn_norm, c->rms_eps, n, c->hidden_size, m->xb);
    /* route first: which experts run is known before any of them does */
    o->matmul(m->be, L->router, m->xb, n, m->router_logits);
    o->moe_route(m->be, m->route, m->router_logits, n);
    const int next = m->off.experts ? m->off.next_moe[l] : -1;
    if (next >= 0) {
        /* the next MoE layer's router over this layer's hidden state (before this MLP adds to
         * it): a prediction of what that layer will route to, read back with this routing */
        o->rmsnorm(m->be, m->x, m->layers[next].ffn_norm, c->rms_eps, n, c->hidden_size, m->xb2);
        o->matmul(m->be, m->layers[next].router, m->xb2, n, m->off.pred_logits);
        o->moe_route(m->be, m->off.pred_route, m->off.pred_logits, n);
    }
    if (m->off.experts)
        zse_offload_experts_place(m, l, n);
    o->moe_gather(m->be, m->route, m->xb, m->xs);
    const zse_moe_out experts_gate_up[2] = {{ZSE_EXPERT_GATE, m->hs}, {ZSE_EXPERT_UP, m->hs2}};
    o->moe_matmul(m->be, m->route, L->experts, m->xs, experts_gate_up, 2);
    o->silu_mul(m->be, m->hs, m->hs2, pairs, c->expert_ffn, m->hs);
    const zse_moe_out down = {ZSE_EXPERT_DOWN, m->xs}; /* the inputs are spent */
    o->moe_matmul(m->be, m->route, L->experts, m->hs, &down, 1);
    if (m->off.experts)
        zse_offload_experts_rest(m, l, n); /* prefetches, and the host's experts into xs */
    const zse_act *shared = NULL, *gate = NULL;
    if (L->sh_gate) {
        gate_up(m, L->sh_gate, L->sh_up, m->xb, n, m->hb, m->hb2);
        o->silu_mul(m->be, m->hb, m->hb2, n, c->shared_ffn, m->hb);
        o->matmul(m->be, L->sh_down, m->hb, n, m->xb2);
        shared = m->xb2;
        if (L->sh_inp) {
            o->matmul(m->be, L->sh_inp, m->xb, n, m->shared_gate);
            gate = m->shared_gate;
        }
    }
    o->moe_combine(m->be, m->route, m->xs, shared, gate, m->x);
    if (m->off.experts)
        zse_offload_experts_done(m, l);
}
