/* The CPU backend: f32 activations, weights used in place from the mapping, paged KV in
 * f16 or int8, every op split over the thread pool.
 *
 * Batch invariance: a row's result never depends on which other rows share the batch —
 * each output element is computed by the same loop in the same order whatever the batch
 * size, so a greedy request gives the same tokens alone or among many. */
#include "backend/cpu/cpu.h"

#include <stdlib.h>

#include <math.h>
#include <string.h>

struct zse_kv {
    zse_kv_shape shape;
    uint64_t bytes;         /* what kv_new allocated (memory accounting) */
    size_t head_stride;     /* elements per (slot, head) = head_dim */
    uint16_t **k16, **v16;  /* [layer] -> [slot][kv_head][head_dim] */
    int8_t **k8, **v8;
    float **ks, **vs;       /* int8 scales [layer] -> [slot][kv_head] */
};

typedef struct {
    zse_pool *pool;
    /* the current batch (copied at begin_batch) */
    int n_tokens, n_seqs, max_blocks, n_out;
    int32_t *tokens, *positions, *seq_of, *slots, *seq_lens, *block_table, *out_rows;
    size_t cap_tokens, cap_positions, cap_seq_of, cap_slots, cap_out, cap_seqs, cap_table;
    int32_t *adapter_of_seq;        /* the batch's LoRA slots, when it has adapters */
    size_t cap_adapters;
    bool has_adapters;
    uint64_t lora_bytes;            /* LoRA slots (memory accounting) */
    float *inv_freq;
    int n_freq;
    float mscale;
    const char *failure;    /* first kernel failure since the last sync */
    void *work;             /* zse_cpu_workspace() */
    size_t work_bytes;
    uint64_t act_bytes, kv_bytes; /* held by activations and KV caches (memory accounting) */
    zse_cpu_copies *copies;     /* offload.c's copy queue and slabs (NULL until first used) */
} cpu_state;

static cpu_state *state(zse_backend *be) { return be->impl; }

zse_cpu_copies **zse_cpu_copies_slot(zse_backend *be) { return &state(be)->copies; }

/* ---- parallel for ------------------------------------------------------------------ */

typedef zse_cpu_range_fn range_fn;
typedef struct {
    range_fn fn;
    void *ctx;
    int64_t n;
} pfor_job;

static void pfor_thread(void *arg, int ith, int nth)
{
    pfor_job *j = arg;
    int64_t per = (j->n + nth - 1) / nth, i0 = per * ith, i1 = i0 + per < j->n ? i0 + per : j->n;
    if (i0 < i1)
        j->fn(j->ctx, i0, i1);
}

void zse_cpu_parallel_for(zse_backend *be, int64_t n, range_fn fn, void *ctx)
{
    pfor_job j = {fn, ctx, n};
    if (n < 2)
        fn(ctx, 0, n);
    else
        zse_pool_run(state(be)->pool, pfor_thread, &j);
}

/* ---- memory ------------------------------------------------------------------------- */

static zse_act *act_new(zse_backend *be, int64_t rows, int64_t cols)
{
    size_t n;
    if (rows <= 0 || cols <= 0 || !zse_mul_ok((size_t)rows, (size_t)cols, &n) || n > ((size_t)1 << 36)) {
        zse_fail("activation of %lld x %lld is not possible", (long long)rows, (long long)cols);
        return NULL;
    }
    zse_act *a = zse_calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->data = zse_aligned_alloc(64, n * sizeof(float));
    if (!a->data) {
        free(a);
        return NULL;
    }
    memset(a->data, 0, n * sizeof(float));
    a->rows = rows;
    a->cols = cols;
    state(be)->act_bytes += n * sizeof(float);
    return a;
}

static void act_free(zse_backend *be, zse_act *a)
{
    if (a) {
        state(be)->act_bytes -= (uint64_t)a->rows * (uint64_t)a->cols * sizeof(float);
        free(a->data);
        free(a);
    }
}

static int act_write(zse_backend *be, zse_act *a, const float *src, int64_t rows)
{
    (void)be;
    if (rows > a->rows)
        return zse_fail("writing %lld rows into an activation of %lld", (long long)rows, (long long)a->rows);
    memcpy(a->data, src, (size_t)(rows * a->cols) * sizeof(float));
    return 0;
}

static int act_read(zse_backend *be, const zse_act *a, float *dst, int64_t rows)
{
    (void)be;
    if (rows > a->rows)
        return zse_fail("reading %lld rows from an activation of %lld", (long long)rows, (long long)a->rows);
    memcpy(dst, a->data, (size_t)(rows * a->cols) * sizeof(float));
    return 0;
}

static zse_weight *weight_load(zse_backend *be, const zse_tensor_info *t)
{
    (void)be;
    zse_weight *w = zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->q = t->q;
    zse_qshape_planes(&w->q, &w->p);
    w->data = t->data; /* in place: the mapping stays the model's only copy */
    return w;
}

static void weight_free(zse_backend *be, zse_weight *w)
{
    (void)be;
    free(w);
}

static void kv_free(zse_backend *be, zse_kv *kv);

static zse_kv *kv_new(zse_backend *be, const zse_kv_shape *s)
{
    zse_kv *kv = zse_calloc(1, sizeof *kv);
    if (!kv)
        return NULL;
    kv->shape = *s;
    kv->head_stride = (size_t)s->head_dim;
    size_t slots = (size_t)s->n_blocks * (size_t)s->block_size;
    size_t elems = slots * (size_t)s->n_kv_heads * (size_t)s->head_dim;
    int L = s->n_layers;
    bool i8 = s->store == ZSE_KV_STORE_INT8;
    if (i8) {
        kv->k8 = zse_calloc((size_t)L, sizeof *kv->k8);
        kv->v8 = zse_calloc((size_t)L, sizeof *kv->v8);
        kv->ks = zse_calloc((size_t)L, sizeof *kv->ks);
        kv->vs = zse_calloc((size_t)L, sizeof *kv->vs);
    } else {
        kv->k16 = zse_calloc((size_t)L, sizeof *kv->k16);
        kv->v16 = zse_calloc((size_t)L, sizeof *kv->v16);
    }
    if (i8 ? !kv->k8 || !kv->v8 || !kv->ks || !kv->vs : !kv->k16 || !kv->v16)
        goto fail;
    for (int l = 0; l < L; l++) {
        if (i8) {
            kv->k8[l] = zse_malloc(elems);
            kv->v8[l] = zse_malloc(elems);
            kv->ks[l] = zse_calloc(slots * (size_t)s->n_kv_heads, sizeof(float));
            kv->vs[l] = zse_calloc(slots * (size_t)s->n_kv_heads, sizeof(float));
            if (!kv->k8[l] || !kv->v8[l] || !kv->ks[l] || !kv->vs[l])
                goto fail;
        } else {
            kv->k16[l] = zse_malloc(elems * 2);
            kv->v16[l] = zse_malloc(elems * 2);
            if (!kv->k16[l] || !kv->v16[l])
                goto fail;
        }
    }
    kv->bytes = (uint64_t)L * (i8 ? 2 * elems + 2 * slots * (uint64_t)s->n_kv_heads * sizeof(float) : 4 * elems);
    state(be)->kv_bytes += kv->bytes;
    return kv;
fail:
    zse_error_prefix("KV cache of %d blocks x %d tokens", s->n_blocks, s->block_size);
    kv_free(be, kv);
    return NULL;
}

static void kv_free(zse_backend *be, zse_kv *kv)
{
    if (!kv)
        return;
    state(be)->kv_bytes -= kv->bytes;
    for (int l = 0; l < kv->shape.n_layers; l++) {
        if (kv->k16) { free(kv->k16[l]); free(kv->v16[l]); }
        if (kv->k8) { free(kv->k8[l]); free(kv->v8[l]); free(kv->ks[l]); free(kv->vs[l]); }
    }
    free(kv->k16); free(kv->v16); free(kv->k8); free(kv->v8); free(kv->ks); free(kv->vs);
    free(kv);
}

/* ---- per step --------------------------------------------------------------------------- */

static int grow_copy(int32_t **dst, size_t *cap, const int32_t *src, size_t n)
{
    if (n > *cap) {
        int32_t *p = zse_realloc(*dst, n * sizeof *p);
        if (!p)
            return -1;
        *dst = p;
        *cap = n;
    }
    if (n)
        memcpy(*dst, src, n * sizeof **dst);
    return 0;
}

/* Each array keeps its own capacity: tokens, sequences, outputs and the table grow
 * independently (a batch may need more output rows than an earlier one had tokens). */
static int begin_batch(zse_backend *be, const zse_batch *b)
{
    cpu_state *s = state(be);
    if (b->n_tokens < 0 || b->n_seqs < 0 || b->n_out < 0 || b->max_blocks_per_seq < 0)
        return zse_fail("batch with negative sizes (%d tokens, %d sequences, %d outputs)", b->n_tokens,
                        b->n_seqs, b->n_out);
    size_t nt = (size_t)b->n_tokens, ns = (size_t)b->n_seqs, table;
    if (!zse_mul_ok(ns, (size_t)b->max_blocks_per_seq, &table))
        return zse_fail("batch block table of %zu x %d entries is too large", ns, b->max_blocks_per_seq);
    if (grow_copy(&s->tokens, &s->cap_tokens, b->tokens, nt) ||
        grow_copy(&s->positions, &s->cap_positions, b->positions, nt) ||
        grow_copy(&s->seq_of, &s->cap_seq_of, b->seq_of, nt) ||
        grow_copy(&s->slots, &s->cap_slots, b->slots, nt) ||
        grow_copy(&s->out_rows, &s->cap_out, b->out_rows, (size_t)b->n_out) ||
        grow_copy(&s->seq_lens, &s->cap_seqs, b->seq_lens, ns) ||
        grow_copy(&s->block_table, &s->cap_table, b->block_table, table) ||
        (b->adapter_of_seq && grow_copy(&s->adapter_of_seq, &s->cap_adapters, b->adapter_of_seq, ns)))
        return -1;
    s->has_adapters = b->adapter_of_seq && b->lora_modules;
    s->n_tokens = b->n_tokens;
    s->n_seqs = b->n_seqs;
    s->max_blocks = b->max_blocks_per_seq;
    s->n_out = b->n_out;
    return 0;
}

static int rope_init(zse_backend *be, const float *inv_freq, int n_freq, float mscale)
{
    cpu_state *s = state(be);
    float *p = zse_malloc((size_t)n_freq * sizeof *p);
    if (!p)
        return -1;
    memcpy(p, inv_freq, (size_t)n_freq * sizeof *p);
    free(s->inv_freq);
    s->inv_freq = p;
    s->n_freq = n_freq;
    s->mscale = mscale;
    return 0;
}

/* ---- elementwise ops ---------------------------------------------------------------------- */

typedef struct {
    zse_backend *be;
    const zse_act *x, *y;
    zse_act *out;
    const zse_weight *w;
    float eps;
    int64_t dim;
    int a, b, c;
} op_ctx;

static void embed_range(void *p, int64_t i0, int64_t i1)
{
    op_ctx *c = p;
    cpu_state *s = state(c->be);
    for (int64_t t = i0; t < i1; t++) {
        int32_t id = s->tokens[t];
        float *row = c->out->data + t * c->out->cols;
        if (id < 0 || id >= c->w->q.rows)
            memset(row, 0, (size_t)c->out->cols * sizeof(float)); /* the engine validates ids */
        else
            zse_dequantize_row(&c->w->q, c->w->data, id, row);
    }
}

static void embed(zse_backend *be, const zse_weight *table, zse_act *out)
{
    op_ctx c = {.be = be, .w = table, .out = out};
    zse_cpu_parallel_for(be, state(be)->n_tokens, embed_range, &c);
}

static void rmsnorm_range(void *p, int64_t i0, int64_t i1)
{
    op_ctx *c = p;
    const float *w = (const float *)c->w->data;
    for (int64_t r = i0; r < i1; r++) {
        const float *x = c->x->data + r * c->dim;
        float *o = c->out->data + r * c->dim;
        double ss = 0;
        for (int64_t i = 0; i < c->dim; i++)
            ss += (double)x[i] * x[i];
        float inv = 1.0f / sqrtf((float)(ss / (double)c->dim) + c->eps);
        for (int64_t i = 0; i < c->dim; i++)
            o[i] = x[i] * inv * w[i];
    }
}

static void rmsnorm(zse_backend *be, const zse_act *x, const zse_weight *w, float eps, int64_t rows,
                    int64_t dim, zse_act *out)
{
    op_ctx c = {.be = be, .x = x, .w = w, .eps = eps, .dim = dim, .out = out};
    zse_cpu_parallel_for(be, rows, rmsnorm_range, &c);
}

static void add_bias(zse_backend *be, zse_act *y, const zse_weight *bias, int64_t rows)
{
    (void)be;
    const float *b = (const float *)bias->data;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < y->cols; i++)
            y->data[r * y->cols + i] += b[i];
}

static void rope_rotate(const cpu_state *s, float *x, int heads, int head_dim, int32_t pos)
{
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float ang = (float)pos * s->inv_freq[i];
        float cs = cosf(ang) * s->mscale, sn = sinf(ang) * s->mscale;
        for (int h = 0; h < heads; h++) {
            float *v = x + h * head_dim;
            float x0 = v[i], x1 = v[i + half];
            v[i] = x0 * cs - x1 * sn;
            v[i + half] = x0 * sn + x1 * cs;
        }
    }
}

static void rope(zse_backend *be, zse_act *q, zse_act *k, int n_heads, int n_kv_heads, int head_dim)
{
    cpu_state *s = state(be);
    for (int t = 0; t < s->n_tokens; t++) {
        rope_rotate(s, q->data + t * q->cols, n_heads, head_dim, s->positions[t]);
        rope_rotate(s, k->data + t * k->cols, n_kv_heads, head_dim, s->positions[t]);
    }
}

static void kv_store(zse_backend *be, zse_kv *kv, int layer, const zse_act *k, const zse_act *v)
{
    cpu_state *s = state(be);
    int H = kv->shape.n_kv_heads, D = kv->shape.head_dim;
    const int64_t n_slots = (int64_t)kv->shape.n_blocks * kv->shape.block_size;
    for (int t = 0; t < s->n_tokens; t++) {
        /* a negative slot is a token whose K/V are not kept (the padding of a recorded
         * step); one past the pool would be an engine bug, and is skipped, not written */
        if (s->slots[t] < 0 || s->slots[t] >= n_slots)
            continue;
        size_t slot = (size_t)s->slots[t];
        for (int h = 0; h < H; h++) {
            const float *ks = k->data + t * k->cols + h * D, *vs = v->data + t * v->cols + h * D;
            size_t base = (slot * (size_t)H + (size_t)h) * (size_t)D;
            if (kv->k16) {
                for (int i = 0; i < D; i++) {
                    kv->k16[layer][base + i] = zse_f32_to_f16(ks[i]);
                    kv->v16[layer][base + i] = zse_f32_to_f16(vs[i]);
                }
            } else {
                float ka = 0, va = 0;
                for (int i = 0; i < D; i++) {
                    ka = fmaxf(ka, fabsf(ks[i]));
                    va = fmaxf(va, fabsf(vs[i]));
                }
                float ksc = ka / 127.0f, vsc = va / 127.0f;
                kv->ks[layer][slot * (size_t)H + (size_t)h] = ksc;
                kv->vs[layer][slot * (size_t)H + (size_t)h] = vsc;
                for (int i = 0; i < D; i++) {
                    kv->k8[layer][base + i] = (int8_t)lrintf(ksc > 0 ? ks[i] / ksc : 0);
                    kv->v8[layer][base + i] = (int8_t)lrintf(vsc > 0 ? vs[i] / vsc : 0);
                }
            }
        }
    }
}

typedef struct {
    zse_backend *be;
    const zse_kv *kv;
    int layer;
    const zse_act *q;
    const zse_attn_params *p;
    zse_act *out;
} attn_ctx;

/* Attention for one (token, KV head): the q heads that share the KV head (GQA) go
 * together, so each cached K and V row is converted to f32 once for all of them. Visible
 * positions are taken in chunks: the chunk's scores first, then one online-softmax update
 * (rescale the running output only when the running max grows), then the V rows. */
enum { ATTN_CHUNK = 32, ATTN_MAX_DIM = 512, ATTN_MAX_GROUP = 64 };

static void attend_group(const attn_ctx *c, int t, int kvh, const zse_cpu_vec *vec)
{
    const cpu_state *s = state(c->be);
    const zse_kv *kv = c->kv;
    const int D = c->p->head_dim, H = kv->shape.n_kv_heads, bs = kv->shape.block_size;
    const int group = c->p->n_heads / c->p->n_kv_heads, h0 = kvh * group;
    const int seq = s->seq_of[t], pos = s->positions[t];
    int lo = c->p->sliding_window > 0 ? pos - c->p->sliding_window + 1 : 0;
    if (lo < 0)
        lo = 0;
    const int32_t *table = s->block_table + (size_t)seq * (size_t)s->max_blocks;
    float row[ATTN_MAX_DIM], sc[ATTN_MAX_GROUP][ATTN_CHUNK], m[ATTN_MAX_GROUP], l[ATTN_MAX_GROUP];
    size_t slots[ATTN_CHUNK];
    const float *q[ATTN_MAX_GROUP];
    float *o[ATTN_MAX_GROUP];
    for (int g = 0; g < group; g++) {
        q[g] = c->q->data + (int64_t)t * c->q->cols + (int64_t)(h0 + g) * D;
        o[g] = c->out->data + (int64_t)t * c->out->cols + (int64_t)(h0 + g) * D;
        memset(o[g], 0, (size_t)D * sizeof(float));
        m[g] = -INFINITY;
        l[g] = 0;
    }
    for (int j0 = lo; j0 <= pos; j0 += ATTN_CHUNK) {
        int n = pos + 1 - j0 < ATTN_CHUNK ? pos + 1 - j0 : ATTN_CHUNK;
        for (int j = 0; j < n; j++) {
            int p = j0 + j;
            slots[j] = ((size_t)table[p / bs] * (size_t)bs + (size_t)(p % bs)) * (size_t)H + (size_t)kvh;
            if (kv->k16)
                vec->f16_to_f32(kv->k16[c->layer] + slots[j] * (size_t)D, D, row);
            else
                vec->i8_to_f32(kv->k8[c->layer] + slots[j] * (size_t)D, kv->ks[c->layer][slots[j]], D, row);
            for (int g = 0; g < group; g++)
                sc[g][j] = vec->dot(q[g], row, D) * c->p->scale;
        }
        for (int g = 0; g < group; g++) {
            float mx = m[g];
            for (int j = 0; j < n; j++)
                mx = sc[g][j] > mx ? sc[g][j] : mx;
            if (mx > m[g]) {
                float corr = expf(m[g] - mx); /* 0 on the first chunk (m = -inf) */
                l[g] *= corr;
                vec->scale(o[g], corr, D);
                m[g] = mx;
            }
            for (int j = 0; j < n; j++) {
                sc[g][j] = expf(sc[g][j] - mx);
                l[g] += sc[g][j];
            }
        }
        for (int j = 0; j < n; j++) {
            if (kv->v16)
                vec->f16_to_f32(kv->v16[c->layer] + slots[j] * (size_t)D, D, row);
            else
                vec->i8_to_f32(kv->v8[c->layer] + slots[j] * (size_t)D, kv->vs[c->layer][slots[j]], D, row);
            for (int g = 0; g < group; g++)
                vec->axpy(o[g], sc[g][j], row, D);
        }
    }
    for (int g = 0; g < group; g++)
        vec->scale(o[g], l[g] > 0 ? 1.0f / l[g] : 0.0f, D);
}

static void attn_range(void *p, int64_t i0, int64_t i1)
{
    attn_ctx *c = p;
    const zse_cpu_vec *vec = zse_cpu_vec_ops();
    for (int64_t i = i0; i < i1; i++)
        attend_group(c, (int)(i / c->p->n_kv_heads), (int)(i % c->p->n_kv_heads), vec);
}

static void attention(zse_backend *be, const zse_kv *kv, int layer, const zse_act *q,
                      const zse_attn_params *p, zse_act *out)
{
    if (p->head_dim > ATTN_MAX_DIM || p->head_dim != kv->shape.head_dim || p->n_kv_heads != kv->shape.n_kv_heads ||
        p->n_kv_heads <= 0 || p->n_heads % p->n_kv_heads != 0 || p->n_heads / p->n_kv_heads > ATTN_MAX_GROUP) {
        zse_cpu_note_failure(be, "attention: unsupported head layout (head_dim <= 512, at most 64 query heads "
                                 "per KV head, matching the cache)");
        return;
    }
    attn_ctx c = {be, kv, layer, q, p, out};
    zse_cpu_parallel_for(be, (int64_t)state(be)->n_tokens * p->n_kv_heads, attn_range, &c);
}

static void silu_mul_range(void *p, int64_t r0, int64_t r1)
{
    op_ctx *c = p;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < c->dim; i++) {
            float g = c->x->data[r * c->x->cols + i];
            c->out->data[r * c->out->cols + i] = g / (1.0f + expf(-g)) * c->y->data[r * c->y->cols + i];
        }
}

static void silu_mul(zse_backend *be, const zse_act *gate, const zse_act *up, int64_t rows, int64_t dim,
                     zse_act *out)
{
    op_ctx c = {.be = be, .x = gate, .y = up, .dim = dim, .out = out};
    zse_cpu_parallel_for(be, rows, silu_mul_range, &c);
}

static void add_range(void *p, int64_t r0, int64_t r1)
{
    op_ctx *c = p;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < c->dim; i++)
            c->out->data[r * c->out->cols + i] += c->y->data[r * c->y->cols + i];
}

static void add(zse_backend *be, zse_act *x, const zse_act *y, int64_t rows, int64_t dim)
{
    op_ctx c = {.be = be, .y = y, .dim = dim, .out = x};
    zse_cpu_parallel_for(be, rows, add_range, &c);
}

static void gather_out_rows(zse_backend *be, const zse_act *x, int64_t dim, zse_act *out)
{
    cpu_state *s = state(be);
    for (int i = 0; i < s->n_out; i++)
        memcpy(out->data + (int64_t)i * out->cols, x->data + (int64_t)s->out_rows[i] * x->cols,
               (size_t)dim * sizeof(float));
}

int32_t zse_cpu_row_adapter(zse_backend *be, int64_t t)
{
    const cpu_state *s = state(be);
    if (!s->has_adapters || t < 0 || t >= s->n_tokens)
        return -1;
    int32_t seq = s->seq_of[t];
    return seq >= 0 && seq < s->n_seqs ? s->adapter_of_seq[seq] : -1;
}

bool zse_cpu_has_adapters(zse_backend *be) { return state(be)->has_adapters; }

void zse_cpu_note_lora_bytes(zse_backend *be, int64_t delta) { state(be)->lora_bytes += (uint64_t)delta; }

int zse_cpu_threads(zse_backend *be)
{
    return zse_pool_size(state(be)->pool);
}

void *zse_cpu_workspace(zse_backend *be, size_t bytes)
{
    cpu_state *s = state(be);
    if (bytes > s->work_bytes) {
        size_t want = bytes + bytes / 4; /* some headroom: batch sizes vary step to step */
        void *p = zse_aligned_alloc(64, want);
        if (!p)
            return NULL;
        free(s->work);
        s->work = p;
        s->work_bytes = want;
    }
    return s->work;
}

void zse_cpu_note_failure(zse_backend *be, const char *what)
{
    cpu_state *s = state(be);
    if (!s->failure)
        s->failure = what;
}

static int sync_report(zse_backend *be)
{
    cpu_state *s = state(be);
    const char *what = s->failure;
    s->failure = NULL;
    return what ? zse_fail("CPU backend: %s", what) : 0;
}

static int mask_rows(zse_backend *be, zse_act *x, int64_t cols, const zse_row_masks *m)
{
    (void)be;
    for (int i = 0; i < m->n; i++) {
        float *row = x->data + (int64_t)m->rows[i] * x->cols;
        const uint32_t *bits = m->bits + (size_t)i * (size_t)m->words;
        for (int64_t t = 0; t < cols; t++)
            if (t >= m->words * 32 || !((bits[t >> 5] >> (t & 31)) & 1))
                row[t] = -INFINITY;
    }
    return 0;
}

static int argmax_rows(zse_backend *be, const zse_act *x, int64_t rows, int64_t cols, int32_t *out)
{
    if (sync_report(be) != 0)
        return -1;
    for (int64_t r = 0; r < rows; r++)
        out[r] = (int32_t)zse_argmax_f32(x->data + r * x->cols, cols);
    return 0;
}

static void memory(zse_backend *be, zse_backend_memory *out)
{
    cpu_state *s = state(be);
    memset(out, 0, sizeof *out);
    out->kv_cache = s->kv_bytes;
    out->activations = s->act_bytes;
    out->workspace = s->work_bytes;
    out->slabs = zse_cpu_slab_bytes(be);
    out->adapters = s->lora_bytes;
}

static void destroy(zse_backend *be)
{
    cpu_state *s = state(be);
    zse_pool_free(s->pool);
    free(s->tokens); free(s->positions); free(s->seq_of); free(s->slots); free(s->seq_lens);
    free(s->block_table); free(s->out_rows); free(s->inv_freq); free(s->work); free(s->adapter_of_seq);
    zse_cpu_copies_free(s->copies);
    free(s);
    free(be);
}

static const zse_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = destroy,
    .act_new = act_new,
    .act_free = act_free,
    .act_write = act_write,
    .act_read = act_read,
    .weight_load = weight_load,
    .weight_free = weight_free,
    .kv_new = kv_new,
    .kv_free = kv_free,
    .begin_batch = begin_batch,
    .rope_init = rope_init,
    .embed = embed,
    .rmsnorm = rmsnorm,
    .matmul = zse_cpu_matmul,
    .matmul_multi = zse_cpu_matmul_multi,
    .add_bias = add_bias,
    .rope = rope,
    .kv_store = kv_store,
    .attention = attention,
    .silu_mul = silu_mul,
    .add = add,
    .gather_out_rows = gather_out_rows,
    .sync = sync_report,
    .argmax_rows = argmax_rows,
    .memory = memory,
    .experts_load = zse_cpu_experts_load,
    .experts_free = zse_cpu_experts_free,
    .moe_route_new = zse_cpu_moe_route_new,
    .moe_route_free = zse_cpu_moe_route_free,
    .moe_route = zse_cpu_moe_route,
    .moe_route_experts = zse_cpu_moe_route_experts,
    .moe_gather = zse_cpu_moe_gather,
    .moe_matmul = zse_cpu_moe_matmul,
    .moe_combine = zse_cpu_moe_combine,
    .lora_pool_new = zse_cpu_lora_pool_new,
    .lora_pool_free = zse_cpu_lora_pool_free,
    .lora_host_alloc = zse_cpu_lora_host_alloc,
    .lora_host_free = zse_cpu_lora_host_free,
    .lora_slot_load = zse_cpu_lora_slot_load,
    .lora_slot_ready = zse_cpu_lora_slot_ready,
    .lora_apply = zse_cpu_lora_apply,
    .mask_rows = mask_rows,
    .host_pin = zse_cpu_host_pin,
    .host_unpin = zse_cpu_host_unpin,
    .slab_new = zse_cpu_slab_new,
    .slab_free = zse_cpu_slab_free,
    .slab_fetch = zse_cpu_slab_fetch,
    .mark = zse_cpu_mark,
    .wait_mark = zse_cpu_wait_mark,
    .weight_in_slab = zse_cpu_weight_in_slab,
    .experts_host = zse_cpu_experts_host,
    .experts_map = zse_cpu_experts_map,
    .moe_route_read = zse_cpu_moe_route_read,
    .act_write_rows = zse_cpu_act_write_rows,
};

zse_backend *zse_cpu_backend_create(int threads)
{
    /* ZSE_CPU_KERNELS=portable|avx2|avx512|auto picks the matmul kernels (to compare them,
     * or to rule one out); the portable path is the exact f32 reference */
    const char *kernels = getenv("ZSE_CPU_KERNELS");
    if (kernels && *kernels && zse_cpu_set_path(kernels) != 0) {
        zse_error_prefix("ZSE_CPU_KERNELS");
        return NULL;
    }
    zse_backend *be = zse_calloc(1, sizeof *be);
    cpu_state *s = zse_calloc(1, sizeof *s);
    if (!be || !s) {
        free(be);
        free(s);
        return NULL;
    }
    s->pool = zse_pool_create(threads > 0 ? threads : zse_physical_cores());
    if (!s->pool) {
        free(be);
        free(s);
        return NULL;
    }
    s->mscale = 1.0f;
    be->ops = &cpu_ops;
    be->impl = s;
    return be;
}

