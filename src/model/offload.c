/* Weights in host memory (issue 18): the model's half of offloading, over the backend's
 * copy queue and slabs (backend.h) — the same code on every backend that has them.
 *
 * Experts from host memory. A MoE layer's bank stays in the file's mapping, pinned; the
 * device has a cache of expert slots (one slab). A layer's step:
 *   1. routes (and routes the next MoE layer's router over this layer's hidden state: a
 *      prediction) on the compute queue;
 *   2. place: reads the routing back (the one wait for the device a layer costs), asks the
 *      planner (xcache.c) which routed experts hit, which are fetched into which slots and
 *      which run on the host; issues the fetches on the copy queue, points the layer's
 *      expert table at the slots, and makes the compute queue wait for the fills;
 *   3. the grouped expert ops run on the device for the placed experts (the others' rows
 *      are left alone);
 *   4. rest: prefetches the predicted experts of the next MoE layer on the copy queue (they
 *      arrive while this layer computes and the next one's attention runs), then runs the
 *      host's share on a CPU backend over the mapped experts and writes its rows in;
 *   5. done: marks the slots' last use, which their next refill waits for.
 *
 * zStream. A streamed layer's matrices (q, k, v, o, gate, up, down) are one contiguous span
 * of the file, pinned. They reach the device through `buffers` layer buffers (one slab), in
 * the order the step computes them, cyclically: the g-th streamed layer computed uses
 * buffer g % buffers, and when it is done that buffer is refilled with the streamed layer
 * `buffers` later (wrapping into the next step), so the copy of the next layers overlaps the
 * compute of this one and of the resident layers between. Each streamed layer has views of
 * its matrices in every buffer; the ones of the buffer it is in are bound into its
 * layer_weights before it runs. Norms and biases stay resident. */
#include "model/internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const char *const stream_mats[ZSE_STREAM_MATS] = {"attn_q.weight",  "attn_k.weight", "attn_v.weight",
                                                        "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
                                                        "ffn_down.weight"};

static zse_weight **stream_slot(layer_weights *L, int k)
{
    zse_weight **slots[ZSE_STREAM_MATS] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->gate, &L->up, &L->down};
    return slots[k];
}

bool zse_offload_streams(const zse_placement *pl, int l) { return pl && pl->streamed && pl->streamed[l]; }

void zse_offload_fail(zse_llm *m, const char *fmt, ...)
{
    if (m->off.failed)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->off.error, sizeof m->off.error, fmt, ap);
    va_end(ap);
    m->off.failed = true;
}

static bool has_offload_ops(const zse_backend_ops *o)
{
    return o->host_pin && o->host_unpin && o->slab_new && o->slab_free && o->slab_fetch && o->mark &&
           o->wait_mark && o->weight_in_slab && o->experts_host && o->experts_map && o->moe_route_read &&
           o->act_write_rows;
}

static uint64_t align256(uint64_t n) { return (n + 255) & ~(uint64_t)255; }

/* ---- experts from host memory ------------------------------------------------------------ */

static const zse_expert_bank *bank_of(const zse_offload *o, int l) { return o->bank[l]; }

/* copies the planned fetches of layer l's experts; their slots are ready at the copy mark
 * made after them */
static void issue_fetches(zse_llm *m, int l, const zse_xplan *p)
{
    zse_offload *o = &m->off;
    const zse_backend_ops *bo = ops(m);
    if (p->n_fetch == 0)
        return;
    const zse_expert_bank *b = bank_of(o, l);
    for (int i = 0; i < p->n_fetch; i++) {
        const int s = p->fetch_slot[i];
        bo->slab_fetch(m->be, o->cache, s, o->bank_pin[l], (uint64_t)p->fetch_expert[i] * b->stride, b->size,
                       o->xc.use_mark[s]);
        o->stats.bytes_to_device += b->size;
    }
    const int64_t ready = bo->mark(m->be, ZSE_QUEUE_COPY);
    for (int i = 0; i < p->n_fetch; i++)
        o->xc.ready_mark[p->fetch_slot[i]] = ready;
}

/* the host backend's view of part `part` of expert e of layer l (in the mapping), made once */
static zse_weight *host_weight(zse_llm *m, int l, int e, int part)
{
    zse_offload *o = &m->off;
    zse_weight **w = &o->host_w[((size_t)l * (size_t)m->c.n_experts + (size_t)e) * ZSE_EXPERT_PARTS + (size_t)part];
    if (!*w) {
        char name[64];
        zse_tensor_info t;
        zse_expert_tensor(bank_of(o, l), e, part, name, &t);
        *w = o->host->ops->weight_load(o->host, &t);
    }
    return *w;
}

static bool grow_floats(float **p, size_t *cap, size_t need)
{
    if (*cap >= need)
        return true;
    float *g = zse_realloc(*p, need * sizeof *g);
    if (!g)
        return false;
    *p = g;
    *cap = need;
    return true;
}

/* expert e's pairs [s0, s0 + len) through its MLP on the host: rows of xb_host by token in,
 * the outputs to out_host from row `at` on. Chunks of ZSE_HOST_MAX_PAIRS rows: the CPU
 * kernels compute a row the same whatever the rows beside it. */
static int host_expert(zse_llm *m, int l, int e, int64_t s0, int64_t len, int64_t at)
{
    zse_offload *o = &m->off;
    zse_backend *h = o->host;
    const zse_backend_ops *ho = h->ops;
    const zse_config *c = &m->c;
    const int64_t H = c->hidden_size;
    zse_weight *wg = host_weight(m, l, e, ZSE_EXPERT_GATE), *wu = host_weight(m, l, e, ZSE_EXPERT_UP),
               *wd = host_weight(m, l, e, ZSE_EXPERT_DOWN);
    if (!wg || !wu || !wd)
        return -1;
    for (int64_t c0 = 0; c0 < len; c0 += ZSE_HOST_MAX_PAIRS) {
        const int64_t rows = len - c0 < ZSE_HOST_MAX_PAIRS ? len - c0 : ZSE_HOST_MAX_PAIRS;
        float *gx = o->out_host + (at + c0) * H; /* gathered in place of the outputs, then overwritten */
        for (int64_t i = 0; i < rows; i++) {
            const int32_t t = o->token_of[s0 + c0 + i];
            memcpy(gx + i * H, o->xb_host + (int64_t)t * H, (size_t)H * sizeof(float));
            o->out_rows[at + c0 + i] = (int32_t)(s0 + c0 + i);
        }
        if (ho->act_write(h, o->hx, gx, rows) != 0)
            return -1;
        ho->matmul(h, wg, o->hx, rows, o->hg);
        ho->matmul(h, wu, o->hx, rows, o->hu);
        ho->silu_mul(h, o->hg, o->hu, rows, c->expert_ffn, o->hg);
        ho->matmul(h, wd, o->hg, rows, o->hy);
        if (ho->sync(h) != 0 || ho->act_read(h, o->hy, gx, rows) != 0)
            return -1;
    }
    return 0;
}

/* the planned host experts of layer l, their rows written into xs (after the device's down
 * projection in the queue, before the combine) */
static void run_host_experts(zse_llm *m, int l)
{
    zse_offload *o = &m->off;
    const int64_t H = m->c.hidden_size;
    int64_t rows = 0;
    for (int a = 0; a < o->n_active; a++)
        if (o->plan.where[a] == ZSE_XPLAN_HOST)
            rows += o->pairs[a];
    if (!grow_floats(&o->out_host, &o->cap_out, (size_t)(rows * H))) {
        zse_offload_fail(m, "out of memory for %lld host expert rows", (long long)rows);
        return;
    }
    const double t0 = zse_now();
    uint64_t read = 0;
    int64_t at = 0;
    for (int a = 0; a < o->n_active; a++) {
        if (o->plan.where[a] != ZSE_XPLAN_HOST)
            continue;
        const int e = o->active[a];
        if (host_expert(m, l, e, o->seg[e], o->pairs[a], at) != 0) {
            zse_offload_fail(m, "layer %d expert %d on the host: %s", l, e, zse_error_message());
            return;
        }
        at += o->pairs[a];
        read += zse_xcache_host_bytes(o->expert_bytes, o->pairs[a]);
    }
    zse_xcache_measured(&o->xc, true, read, zse_now() - t0);
    if (ops(m)->act_write_rows(m->be, m->xs, o->out_host, o->out_rows, rows) != 0)
        zse_offload_fail(m, "layer %d: writing the host experts' rows: %s", l, zse_error_message());
}

void zse_offload_experts_place(zse_llm *m, int l, int64_t n)
{
    zse_offload *o = &m->off;
    const zse_backend_ops *bo = ops(m);
    const zse_config *c = &m->c;
    o->n_active = 0;
    o->n_pred = 0;
    o->plan.n_fetch = o->plan.n_host = 0;
    if (o->failed)
        return;
    if (bo->moe_route_read(m->be, m->route, o->seg, o->token_of) != 0) {
        zse_offload_fail(m, "layer %d: reading the routing: %s", l, zse_error_message());
        return;
    }
    /* the prediction was queued before this read: reading it waits for nothing more */
    const int next = o->next_moe[l];
    if (next >= 0 && (o->n_pred = bo->moe_route_experts(m->be, o->pred_route, o->pred)) < 0) {
        zse_offload_fail(m, "layer %d: reading the predicted routing: %s", l, zse_error_message());
        o->n_pred = 0;
        return;
    }
    for (int e = 0; e < c->n_experts; e++)
        if (o->seg[e + 1] > o->seg[e]) {
            o->active[o->n_active] = e;
            o->pairs[o->n_active++] = o->seg[e + 1] - o->seg[e];
        }
    zse_xcache_plan(&o->xc, l, o->active, o->pairs, o->n_active, o->expert_bytes, zse_now(), &o->plan);
    if (o->plan.n_host > 0 && !o->host) {
        zse_offload_fail(m, "layer %d: the expert cache has no free slot and nothing runs experts on the host", l);
        return;
    }
    issue_fetches(m, l, &o->plan);
    int64_t need = -1;
    for (int e = 0; e < c->n_experts; e++)
        o->slot_of[e] = -1;
    for (int a = 0; a < o->n_active; a++) {
        const int s = o->plan.where[a];
        if (s < 0)
            continue;
        o->slot_of[o->active[a]] = s;
        need = o->xc.ready_mark[s] > need ? o->xc.ready_mark[s] : need;
    }
    bo->experts_map(m->be, m->layers[l].experts, o->cache, o->slot_of);
    bo->wait_mark(m->be, ZSE_QUEUE_COMPUTE, need);
    /* the host's share reads this layer's normalized rows: now, while the queue is idle */
    if (o->plan.n_host > 0) {
        if (!grow_floats(&o->xb_host, &o->cap_xb, (size_t)(n * c->hidden_size)) ||
            bo->act_read(m->be, m->xb, o->xb_host, n) != 0)
            zse_offload_fail(m, "layer %d: reading the rows for the host's experts: %s", l, zse_error_message());
    }
}

void zse_offload_experts_rest(zse_llm *m, int l, int64_t n)
{
    zse_offload *o = &m->off;
    if (o->failed)
        return;
    const int next = o->next_moe[l];
    if (next >= 0 && o->n_pred > 0) {
        zse_xplan pf = {o->where_pf, o->fetch_e, o->fetch_s, 0, 0};
        /* the step's n x top-k pairs spread over the guessed experts */
        const int64_t k = m->c.n_experts_used, pairs = (n * k + o->n_pred - 1) / o->n_pred;
        zse_xcache_prefetch(&o->xc, next, o->pred, o->n_pred, pairs < INT32_MAX ? (int)pairs : INT32_MAX,
                            o->expert_bytes, zse_now(), &pf);
        issue_fetches(m, next, &pf);
    }
    if (o->plan.n_host > 0)
        run_host_experts(m, l);
}

void zse_offload_experts_done(zse_llm *m, int l)
{
    (void)l;
    zse_offload *o = &m->off;
    if (o->failed)
        return;
    const int64_t used = ops(m)->mark(m->be, ZSE_QUEUE_COMPUTE);
    for (int a = 0; a < o->n_active; a++)
        if (o->plan.where[a] >= 0)
            o->xc.use_mark[o->plan.where[a]] = used;
}

/* the first cache fill: the slots shared round-robin by the MoE layers, their lowest experts
 * first (no routing is known yet); also measures the copy queue's bandwidth */
static int warm_cache(zse_llm *m)
{
    zse_offload *o = &m->off;
    const zse_backend_ops *bo = ops(m);
    int moe[ZSE_MAX_MOE_LAYERS], n_moe = 0;
    for (int l = 0; l < m->c.n_layers && n_moe < ZSE_MAX_MOE_LAYERS; l++)
        if (o->bank[l])
            moe[n_moe++] = l;
    const double t0 = zse_now();
    uint64_t bytes = 0;
    int filled = 0;
    for (int s = 0; s < o->xc.n_slots && s / n_moe < m->c.n_experts; s++, filled++) {
        const int l = moe[s % n_moe], e = s / n_moe;
        const zse_expert_bank *b = bank_of(o, l);
        bo->slab_fetch(m->be, o->cache, s, o->bank_pin[l], (uint64_t)e * b->stride, b->size, -1);
        zse_xcache_fill(&o->xc, s, l, e);
        bytes += b->size;
    }
    const int64_t ready = bo->mark(m->be, ZSE_QUEUE_COPY);
    for (int s = 0; s < filled; s++)
        o->xc.ready_mark[s] = ready;
    bo->wait_mark(m->be, ZSE_QUEUE_COMPUTE, ready);
    if (bo->sync(m->be) != 0)
        return -1;
    zse_xcache_measured(&o->xc, false, bytes, zse_now() - t0);
    return 0;
}

/* the host's bandwidth, measured on one expert of one row (its second run: the first also
 * faults the expert's pages in) */
static int measure_host(zse_llm *m)
{
    zse_offload *o = &m->off;
    int l = 0;
    while (!o->bank[l])
        l++;
    memset(o->out_host, 0, (size_t)m->c.hidden_size * sizeof(float));
    memset(o->xb_host, 0, (size_t)m->c.hidden_size * sizeof(float));
    o->token_of[0] = 0;
    double secs = 0;
    for (int run = 0; run < 2; run++) {
        const double t0 = zse_now();
        if (host_expert(m, l, 0, 0, 1, 0) != 0)
            return -1;
        secs = zse_now() - t0;
    }
    zse_xcache_measured(&o->xc, true, zse_xcache_host_bytes(o->expert_bytes, 1), secs);
    return 0;
}

static int init_experts(zse_llm *m, const zse_file *f, const zse_placement *pl)
{
    zse_offload *o = &m->off;
    const zse_config *c = &m->c;
    const zse_backend_ops *bo = ops(m);
    const int L = c->n_layers, E = c->n_experts;
    if (E < 1)
        return zse_fail("%s: experts offloaded, but the model has none", zse_file_path(f));
    o->bank = zse_calloc((size_t)L, sizeof *o->bank);
    o->bank_pin = zse_calloc((size_t)L, sizeof *o->bank_pin);
    o->next_moe = zse_malloc((size_t)L * sizeof *o->next_moe);
    o->slot_of = zse_malloc((size_t)E * sizeof *o->slot_of);
    o->seg = zse_malloc(((size_t)E + 1) * sizeof *o->seg);
    o->active = zse_malloc((size_t)E * sizeof *o->active);
    o->pairs = zse_malloc((size_t)E * sizeof *o->pairs);
    o->pred = zse_malloc((size_t)E * sizeof *o->pred);
    o->fetch_e = zse_malloc((size_t)E * sizeof *o->fetch_e);
    o->fetch_s = zse_malloc((size_t)E * sizeof *o->fetch_s);
    o->where = zse_malloc((size_t)E * sizeof *o->where);
    o->where_pf = zse_malloc((size_t)E * sizeof *o->where_pf);
    if (!o->bank || !o->bank_pin || !o->next_moe || !o->slot_of || !o->seg || !o->active || !o->pairs || !o->pred ||
        !o->fetch_e || !o->fetch_s || !o->where || !o->where_pf)
        return -1;
    o->plan = (zse_xplan){o->where, o->fetch_e, o->fetch_s, 0, 0};
    uint64_t slot = 0;
    for (int l = L - 1, next = -1; l >= 0; l--) {
        o->next_moe[l] = next;
        if (!zse_config_layer_is_moe(c, l))
            continue;
        const zse_expert_bank *b = zse_file_experts(f, l);
        if (!b)
            return zse_fail("%s: layer %d has no expert bank", zse_file_path(f), l);
        o->bank[l] = b;
        slot = align256(b->size) > slot ? align256(b->size) : slot;
        o->expert_bytes = b->size > o->expert_bytes ? b->size : o->expert_bytes;
        if (!(o->bank_pin[l] = bo->host_pin(m->be, b->data, (size_t)(b->stride * (uint64_t)(b->count - 1) + b->size)))) {
            zse_error_prefix("pinning the experts of layer %d", l);
            return -1;
        }
        next = l;
    }
    o->slot_bytes = slot;
    if (zse_xcache_init(&o->xc, L, E, pl->expert_slots) != 0)
        return -1;
    o->xc.host_mode = pl->host_experts;
    if (!(o->cache = bo->slab_new(m->be, (size_t)slot, pl->expert_slots))) {
        zse_error_prefix("an expert cache of %d experts", pl->expert_slots);
        return -1;
    }
    if (pl->host_experts != ZSE_HOST_EXPERTS_NEVER) {
        if (!(o->host = zse_cpu_backend_create(pl->host_threads)))
            return -1;
        const zse_backend_ops *ho = o->host->ops;
        o->host_w = zse_calloc((size_t)L * (size_t)E * ZSE_EXPERT_PARTS, sizeof *o->host_w);
        o->hx = ho->act_new(o->host, ZSE_HOST_MAX_PAIRS, c->hidden_size);
        o->hg = ho->act_new(o->host, ZSE_HOST_MAX_PAIRS, c->expert_ffn);
        o->hu = ho->act_new(o->host, ZSE_HOST_MAX_PAIRS, c->expert_ffn);
        o->hy = ho->act_new(o->host, ZSE_HOST_MAX_PAIRS, c->hidden_size);
        o->out_rows = zse_malloc(ZSE_HOST_MAX_PAIRS * sizeof *o->out_rows);
        if (!o->host_w || !o->hx || !o->hg || !o->hu || !o->hy || !o->out_rows ||
            !grow_floats(&o->out_host, &o->cap_out, (size_t)c->hidden_size * ZSE_HOST_MAX_PAIRS) ||
            !grow_floats(&o->xb_host, &o->cap_xb, (size_t)c->hidden_size))
            return -1;
    }
    return 0;
}

int zse_offload_alloc_acts(zse_llm *m, int64_t max_tokens)
{
    zse_offload *o = &m->off;
    zse_offload_free_acts(m);
    if (!o->experts)
        return 0;
    const zse_config *c = &m->c;
    const zse_backend_ops *bo = ops(m);
    const int64_t pairs = max_tokens * c->n_experts_used;
    const zse_moe_params p = {c->n_experts, c->n_experts_used, c->norm_topk};
    o->token_of = zse_malloc((size_t)pairs * sizeof *o->token_of);
    int32_t *rows = zse_realloc(o->out_rows, (size_t)pairs * sizeof *rows);
    if (rows)
        o->out_rows = rows;
    o->pred_logits = bo->act_new(m->be, max_tokens, c->n_experts);
    o->pred_route = bo->moe_route_new(m->be, max_tokens, &p);
    if (!o->token_of || !rows || !o->pred_logits || !o->pred_route) {
        zse_offload_free_acts(m);
        return -1;
    }
    return 0;
}

void zse_offload_free_acts(zse_llm *m)
{
    zse_offload *o = &m->off;
    free(o->token_of);
    o->token_of = NULL;
    if (o->pred_logits)
        ops(m)->act_free(m->be, o->pred_logits);
    if (o->pred_route)
        ops(m)->moe_route_free(m->be, o->pred_route);
    o->pred_logits = NULL;
    o->pred_route = NULL;
}

/* ---- zStream ------------------------------------------------------------------------------ */

static zse_weight **view_at(const zse_offload *o, int i, int b)
{
    return o->views + ((size_t)i * (size_t)o->buffers + (size_t)b) * ZSE_STREAM_MATS;
}

/* buffer b gets streamed layer i (after the compute queue's mark `after`) */
static void fill_buffer(zse_llm *m, int b, int i, int64_t after)
{
    zse_offload *o = &m->off;
    const zse_backend_ops *bo = ops(m);
    bo->slab_fetch(m->be, o->ring, b, o->layer_pin[i], 0, (size_t)o->span_len[i], after);
    o->buf_ready[b] = bo->mark(m->be, ZSE_QUEUE_COPY);
    o->buf_layer[b] = i;
    o->stats.bytes_to_device += o->span_len[i];
}

void zse_offload_layer_begin(zse_llm *m, int l)
{
    zse_offload *o = &m->off;
    const int i = o->stream_of[l];
    if (i < 0)
        return;
    const int b = (int)(o->ring_pos % (uint64_t)o->buffers);
    if (o->buf_layer[b] != i) /* cannot happen: every step computes every streamed layer in order */
        zse_offload_fail(m, "layer %d: its buffer holds streamed layer %d (the stream lost its order)", l,
                         o->streamed_layer[o->buf_layer[b]]);
    ops(m)->wait_mark(m->be, ZSE_QUEUE_COMPUTE, o->buf_ready[b]);
    zse_weight **v = view_at(o, i, b);
    for (int k = 0; k < ZSE_STREAM_MATS; k++)
        *stream_slot(&m->layers[l], k) = v[k];
    o->stats.layers_streamed++;
}

void zse_offload_layer_end(zse_llm *m, int l)
{
    zse_offload *o = &m->off;
    const int i = o->stream_of[l];
    if (i < 0)
        return;
    const int b = (int)(o->ring_pos % (uint64_t)o->buffers);
    o->buf_used[b] = ops(m)->mark(m->be, ZSE_QUEUE_COMPUTE);
    /* the buffer's next user is the streamed layer `buffers` uses later (the next step's,
     * past the last); with every streamed layer in a buffer of its own it is this one */
    const int next = (int)((o->ring_pos + (uint64_t)o->buffers) % (uint64_t)o->n_streamed);
    if (next != o->buf_layer[b])
        fill_buffer(m, b, next, o->buf_used[b]);
    o->ring_pos++;
}

static const zse_tensor_info *layer_tensor(const zse_file *f, int l, const char *what)
{
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s", l, what);
    return zse_file_tensor(f, name);
}

static int init_stream(zse_llm *m, const zse_file *f, const zse_placement *pl)
{
    zse_offload *o = &m->off;
    const zse_backend_ops *bo = ops(m);
    const int L = m->c.n_layers;
    o->stream_of = zse_malloc((size_t)L * sizeof *o->stream_of);
    o->streamed_layer = zse_malloc((size_t)L * sizeof *o->streamed_layer);
    if (!o->stream_of || !o->streamed_layer)
        return -1;
    for (int l = 0; l < L; l++) {
        o->stream_of[l] = -1;
        if (!zse_offload_streams(pl, l))
            continue;
        if (zse_config_layer_is_moe(&m->c, l))
            return zse_fail("layer %d runs experts: a MoE layer is not streamed (its experts are offloaded instead)", l);
        o->stream_of[l] = o->n_streamed;
        o->streamed_layer[o->n_streamed++] = l;
    }
    const int k = o->n_streamed;
    o->buffers = pl->stream_buffers < 1 ? 1 : pl->stream_buffers > k ? k : pl->stream_buffers;
    o->layer_pin = zse_calloc((size_t)k, sizeof *o->layer_pin);
    o->span_len = zse_calloc((size_t)k, sizeof *o->span_len);
    o->views = zse_calloc((size_t)k * (size_t)o->buffers * ZSE_STREAM_MATS, sizeof *o->views);
    o->buf_layer = zse_malloc((size_t)o->buffers * sizeof *o->buf_layer);
    o->buf_ready = zse_malloc((size_t)o->buffers * sizeof *o->buf_ready);
    o->buf_used = zse_malloc((size_t)o->buffers * sizeof *o->buf_used);
    uint64_t *start = zse_calloc((size_t)k, sizeof *start);
    int rc = o->layer_pin && o->span_len && o->views && o->buf_layer && o->buf_ready && o->buf_used && start ? 0 : -1;
    uint64_t slot = 0;
    /* each streamed layer's span: from its first matrix to the end of its last */
    for (int i = 0; rc == 0 && i < k; i++) {
        const int l = o->streamed_layer[i];
        uint64_t lo = UINT64_MAX, hi = 0;
        const uint8_t *lo_data = NULL;
        for (int j = 0; j < ZSE_STREAM_MATS; j++) {
            const zse_tensor_info *t = layer_tensor(f, l, stream_mats[j]);
            if (!t) {
                rc = zse_fail("%s: tensor blk.%d.%s is missing", zse_file_path(f), l, stream_mats[j]);
                break;
            }
            if (t->offset < lo) {
                lo = t->offset;
                lo_data = t->data;
            }
            hi = t->offset + t->size > hi ? t->offset + t->size : hi;
        }
        if (rc != 0)
            break;
        start[i] = lo;
        o->span_len[i] = hi - lo;
        slot = align256(hi - lo) > slot ? align256(hi - lo) : slot;
        if (!(o->layer_pin[i] = bo->host_pin(m->be, lo_data, (size_t)(hi - lo)))) {
            zse_error_prefix("pinning layer %d", l);
            rc = -1;
        }
    }
    if (rc == 0 && !(o->ring = bo->slab_new(m->be, (size_t)slot, o->buffers))) {
        zse_error_prefix("%d layer buffers", o->buffers);
        rc = -1;
    }
    for (int i = 0; rc == 0 && i < k; i++)
        for (int b = 0; rc == 0 && b < o->buffers; b++)
            for (int j = 0; rc == 0 && j < ZSE_STREAM_MATS; j++) {
                const zse_tensor_info *t = layer_tensor(f, o->streamed_layer[i], stream_mats[j]);
                if (!(view_at(o, i, b)[j] = bo->weight_in_slab(m->be, t, o->ring, b, t->offset - start[i])))
                    rc = -1;
            }
    free(start);
    if (rc != 0)
        return -1;
    for (int b = 0; b < o->buffers; b++) {
        o->buf_used[b] = -1;
        fill_buffer(m, b, b, -1);
    }
    return 0;
}

/* ---- setup and teardown ---------------------------------------------------------------------- */

int zse_offload_init(zse_llm *m, const zse_file *f, const zse_placement *pl)
{
    zse_offload *o = &m->off;
    if (!has_offload_ops(ops(m)))
        return zse_fail("the %s backend cannot keep weights in host memory", ops(m)->name);
    o->pl = *pl;
    if (pl->streamed) {
        if (!(o->streamed_copy = zse_malloc((size_t)m->c.n_layers)))
            return -1;
        memcpy(o->streamed_copy, pl->streamed, (size_t)m->c.n_layers);
        o->pl.streamed = o->streamed_copy;
    }
    if (o->stream && init_stream(m, f, pl) != 0)
        return -1;
    if (o->experts && init_experts(m, f, pl) != 0)
        return -1;
    return 0;
}

/* after zse_llm_load has made the activations: the cache's first fill and the host's speed */
int zse_offload_start(zse_llm *m)
{
    zse_offload *o = &m->off;
    if (!o->experts)
        return 0;
    if (!o->pl.cold_cache && warm_cache(m) != 0)
        return -1;
    if (o->host && o->pl.host_experts == ZSE_HOST_EXPERTS_AUTO && measure_host(m) != 0)
        return -1;
    return 0;
}

void zse_offload_free(zse_llm *m)
{
    zse_offload *o = &m->off;
    const zse_backend_ops *bo = ops(m);
    if (!o->experts && !o->stream)
        return;
    bo->sync(m->be); /* nothing queued may still read a slab (a failure was reported already) */
    for (int i = 0; o->views && i < o->n_streamed; i++) {
        for (int k = 0; k < ZSE_STREAM_MATS; k++)
            *stream_slot(&m->layers[o->streamed_layer[i]], k) = NULL;
        for (int b = 0; b < o->buffers; b++)
            for (int k = 0; k < ZSE_STREAM_MATS; k++)
                if (view_at(o, i, b)[k])
                    bo->weight_free(m->be, view_at(o, i, b)[k]);
    }
    for (int i = 0; o->layer_pin && i < o->n_streamed; i++)
        if (o->layer_pin[i])
            bo->host_unpin(m->be, o->layer_pin[i]);
    for (int l = 0; o->bank_pin && l < m->c.n_layers; l++)
        if (o->bank_pin[l])
            bo->host_unpin(m->be, o->bank_pin[l]);
    if (o->ring)
        bo->slab_free(m->be, o->ring);
    if (o->cache)
        bo->slab_free(m->be, o->cache);
    if (o->host) {
        const size_t n = (size_t)m->c.n_layers * (size_t)m->c.n_experts * ZSE_EXPERT_PARTS;
        for (size_t i = 0; o->host_w && i < n; i++)
            if (o->host_w[i])
                o->host->ops->weight_free(o->host, o->host_w[i]);
        zse_act *acts[] = {o->hx, o->hg, o->hu, o->hy};
        for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++)
            if (acts[i])
                o->host->ops->act_free(o->host, acts[i]);
        zse_backend_destroy(o->host);
    }
    zse_xcache_free(&o->xc);
    void *owned[] = {o->bank, o->bank_pin, o->next_moe, o->slot_of, o->seg, o->active, o->pairs, o->pred,
                     o->fetch_e, o->fetch_s, o->where, o->where_pf, o->host_w, o->xb_host, o->out_host,
                     o->out_rows, o->stream_of, o->streamed_layer, o->layer_pin, o->span_len, o->views,
                     o->buf_layer, o->buf_ready, o->buf_used, o->streamed_copy};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++)
        free(owned[i]);
    zse_offload_free_acts(m);
    memset(o, 0, sizeof *o);
}

void zse_llm_offload_stats_get(const zse_llm *m, zse_llm_offload_stats *out)
{
    const zse_offload *o = &m->off;
    *out = o->stats;
    out->expert_hits = o->xc.stats.hits;
    out->expert_fetches = o->xc.stats.fetched;
    out->expert_prefetches = o->xc.stats.prefetched;
    out->expert_prefetch_hits = o->xc.stats.prefetch_hits;
    out->expert_host = o->xc.stats.host;
}
