/* LoRA on the CPU: adapter slots in host memory and lora_apply, the delta scale · B·(A·x)
 * added to a projection's output for the rows whose sequence has an adapter.
 *
 * Punica's shrink/expand split, by rows: shrink (u = A·x, rank dots of the input's width)
 * for each (row, projection), then expand (y += scale · B·u) for each (row, projection,
 * chunk of outputs). Every value is computed by one loop in one order whatever else is in
 * the step, so a row's result is the same alone or beside rows of other adapters (the
 * batch invariance the engine's tests rely on). */
#include "backend/cpu/cpu.h"

#include <string.h>

/* elements converted from f16 at a time (a stack buffer) */
#define CHUNK 256

struct zse_lora_pool {
    zse_lora_shape shape;
    uint8_t *mem;           /* [n_slots][slot_bytes] */
};

zse_lora_pool *zse_cpu_lora_pool_new(zse_backend *be, const zse_lora_shape *s)
{
    (void)be;
    size_t bytes;
    if (s->n_slots < 1 || s->n_layers < 1 || s->slot_bytes % 64 != 0 ||
        s->slot_bytes < (uint64_t)s->n_layers * ZSE_LORA_MODULES * sizeof(zse_lora_entry) ||
        !zse_mul_ok((size_t)s->n_slots, (size_t)s->slot_bytes, &bytes)) {
        zse_fail("a LoRA pool of %d slots of %llu bytes is not possible", s->n_slots,
                 (unsigned long long)s->slot_bytes);
        return NULL;
    }
    zse_lora_pool *p = zse_calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->shape = *s;
    p->mem = zse_aligned_alloc(64, bytes);
    if (!p->mem) {
        free(p);
        zse_error_prefix("LoRA adapter slots (%d x %.1f MiB)", s->n_slots, (double)s->slot_bytes / 1048576.0);
        return NULL;
    }
    /* a slot never loaded adapts nothing */
    memset(p->mem, 0, bytes);
    zse_cpu_note_lora_bytes(be, (int64_t)bytes);
    return p;
}

void zse_cpu_lora_pool_free(zse_backend *be, zse_lora_pool *p)
{
    if (!p)
        return;
    zse_cpu_note_lora_bytes(be, -(int64_t)((size_t)p->shape.n_slots * p->shape.slot_bytes));
    free(p->mem);
    free(p);
}

void *zse_cpu_lora_host_alloc(zse_backend *be, size_t bytes)
{
    (void)be;
    return zse_aligned_alloc(64, bytes ? bytes : 64);
}

void zse_cpu_lora_host_free(zse_backend *be, void *p)
{
    (void)be;
    free(p);
}

int zse_cpu_lora_slot_load(zse_backend *be, zse_lora_pool *p, int slot, const void *image, size_t bytes)
{
    (void)be;
    if (slot < 0 || slot >= p->shape.n_slots)
        return zse_fail("LoRA slot %d of %d", slot, p->shape.n_slots);
    if (zse_lora_image_check(&p->shape, image, bytes) != 0)
        return -1;
    uint8_t *dst = p->mem + (size_t)slot * p->shape.slot_bytes;
    memcpy(dst, image, bytes);
    return 0;
}

int zse_cpu_lora_slot_ready(zse_backend *be, zse_lora_pool *p, int slot)
{
    (void)be;
    return slot >= 0 && slot < p->shape.n_slots ? 1 : zse_fail("LoRA slot %d of %d", slot, p->shape.n_slots);
}

typedef struct {
    zse_backend *be;
    const zse_lora_pool *p;
    int layer;
    const zse_act *x;
    const zse_lora_out *outs;
    int n_outs;
    int64_t out_chunks;     /* CHUNK-wide pieces of the widest output */
    float *u;               /* [rows][n_outs][ZSE_LORA_MAX_RANK] */
} lora_ctx;

/* the entry of the adapter of row t for projection i, or NULL when it has none */
static const zse_lora_entry *row_entry(const lora_ctx *c, int64_t t, int i, const uint8_t **slot)
{
    int32_t s = zse_cpu_row_adapter(c->be, t);
    if (s < 0 || s >= c->p->shape.n_slots)
        return NULL;
    *slot = c->p->mem + (size_t)s * c->p->shape.slot_bytes;
    const zse_lora_entry *e =
        (const zse_lora_entry *)*slot + (size_t)c->layer * ZSE_LORA_MODULES + (size_t)c->outs[i].module;
    return e->rank > 0 ? e : NULL;
}

/* u = A · x[t] for (row, projection) units */
static void shrink_range(void *arg, int64_t u0, int64_t u1)
{
    const lora_ctx *c = arg;
    const zse_cpu_vec *vec = zse_cpu_vec_ops();
    float tmp[CHUNK];
    for (int64_t k = u0; k < u1; k++) {
        const int64_t t = k / c->n_outs;
        const int i = (int)(k % c->n_outs);
        const uint8_t *slot;
        const zse_lora_entry *e = row_entry(c, t, i, &slot);
        if (!e)
            continue;
        const int64_t in = c->p->shape.in[c->outs[i].module];
        const uint16_t *a = (const uint16_t *)(slot + e->a);
        const float *x = c->x->data + t * c->x->cols;
        float *u = c->u + k * ZSE_LORA_MAX_RANK;
        for (int j = 0; j < e->rank; j++) {
            float sum = 0;
            for (int64_t i0 = 0; i0 < in; i0 += CHUNK) {
                int64_t n = in - i0 < CHUNK ? in - i0 : CHUNK;
                vec->f16_to_f32(a + (size_t)j * (size_t)in + (size_t)i0, n, tmp);
                sum += vec->dot(tmp, x + i0, n);
            }
            u[j] = sum;
        }
    }
}

/* y[t][o0:o0+CHUNK] += scale · Σ_j u[j] Bᵀ[j][o] for (row, projection, chunk) units */
static void expand_range(void *arg, int64_t u0, int64_t u1)
{
    const lora_ctx *c = arg;
    const zse_cpu_vec *vec = zse_cpu_vec_ops();
    float tmp[CHUNK], acc[CHUNK];
    for (int64_t k = u0; k < u1; k++) {
        const int64_t unit = k / c->out_chunks, o0 = k % c->out_chunks * CHUNK;
        const int64_t t = unit / c->n_outs;
        const int i = (int)(unit % c->n_outs);
        const uint8_t *slot;
        const zse_lora_entry *e = row_entry(c, t, i, &slot);
        const int64_t out = c->p->shape.out[c->outs[i].module];
        if (!e || o0 >= out)
            continue;
        const int64_t n = out - o0 < CHUNK ? out - o0 : CHUNK;
        const uint16_t *bt = (const uint16_t *)(slot + e->bt);
        const float *u = c->u + unit * ZSE_LORA_MAX_RANK;
        memset(acc, 0, (size_t)n * sizeof *acc);
        for (int j = 0; j < e->rank; j++) {
            vec->f16_to_f32(bt + (size_t)j * (size_t)out + (size_t)o0, n, tmp);
            vec->axpy(acc, u[j], tmp, n);
        }
        float *y = c->outs[i].y->data + t * c->outs[i].y->cols + o0;
        vec->axpy(y, e->scale, acc, n);
    }
}

void zse_cpu_lora_apply(zse_backend *be, const zse_lora_pool *p, int layer, const zse_act *x, int64_t rows,
                        const zse_lora_out *outs, int n_outs)
{
    if (!zse_cpu_has_adapters(be))
        return;
    if (n_outs < 1 || n_outs > 3 || layer < 0 || layer >= p->shape.n_layers || rows < 0) {
        zse_cpu_note_failure(be, "lora_apply: bad arguments (1-3 projections, a layer of the pool)");
        return;
    }
    int64_t widest = 0;
    for (int i = 0; i < n_outs; i++) {
        const int m = outs[i].module;
        if (m < 0 || m >= ZSE_LORA_MODULES || x->cols < p->shape.in[m] || outs[i].y->cols < p->shape.out[m]) {
            zse_cpu_note_failure(be, "lora_apply: a projection's widths do not match the pool's");
            return;
        }
        widest = p->shape.out[m] > widest ? p->shape.out[m] : widest;
    }
    const size_t units = (size_t)rows * (size_t)n_outs;
    float *u = zse_cpu_workspace(be, (units ? units : 1) * ZSE_LORA_MAX_RANK * sizeof(float));
    if (!u) {
        zse_cpu_note_failure(be, "lora_apply: out of memory");
        return;
    }
    lora_ctx c = {be, p, layer, x, outs, n_outs, (widest + CHUNK - 1) / CHUNK, u};
    zse_cpu_parallel_for(be, (int64_t)units, shrink_range, &c);
    zse_cpu_parallel_for(be, (int64_t)units * c.out_chunks, expand_range, &c);
}
