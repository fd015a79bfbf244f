/* LoRA on the CPU: adapter slots in host memory and lora_apply, the delta scale · B·(A·x)
 * added to a projection's output for the rows whose sequence has an adapter.
 *
 * Punica's shrink/expand split over tiles: the step's rows are cut into tiles of up to
 * ZSE_CPU_LORA_TILE consecutive rows of one adapter (a prefill chunk is one long run; a
 * decode step's rows are tiles of one), then shrink (u = A·x) for each (tile, projection,
 * 4 ranks) and expand (y += scale · B·u) for each (tile, projection, 256 outputs). Each
 * unit converts its piece of A or Bᵀ from f16 once for every row of the tile (vec.c), so a
 * prefill reads the adapter once a tile instead of once a row. Every value is computed by
 * one loop in one order whatever the tile holds, so a row's result is the same alone or
 * beside rows of its own or other adapters (the batch invariance the engine's tests rely
 * on). */
#include "backend/cpu/cpu.h"

#include <string.h>

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

/* consecutive rows of one adapter */
typedef struct {
    int64_t t0;
    int n;
    int32_t slot;
} lora_tile;

typedef struct {
    const zse_lora_pool *p;
    int layer;
    const zse_act *x;
    const zse_lora_out *outs;
    int n_outs;
    const lora_tile *tiles;
    int64_t n_tiles;
    int rank_groups;        /* ZSE_CPU_LORA_RANKS-wide groups of the largest rank in use */
    int64_t out_chunks;     /* ZSE_CPU_LORA_CHUNK-wide pieces of the widest output */
    float *u;               /* [rows][n_outs][ZSE_LORA_MAX_RANK] */
} lora_ctx;

/* the entry of slot `slot` for projection i, or NULL when it leaves it alone */
static const zse_lora_entry *slot_entry(const lora_ctx *c, int32_t slot, int i, const uint8_t **base)
{
    *base = c->p->mem + (size_t)slot * c->p->shape.slot_bytes;
    const zse_lora_entry *e =
        (const zse_lora_entry *)*base + (size_t)c->layer * ZSE_LORA_MODULES + (size_t)c->outs[i].module;
    return e->rank > 0 ? e : NULL;
}

/* the step's rows with an adapter as tiles; returns how many */
static int64_t cut_tiles(zse_backend *be, const zse_lora_pool *p, int64_t rows, lora_tile *tiles)
{
    int64_t n = 0;
    for (int64_t t = 0; t < rows; t++) {
        const int32_t s = zse_cpu_row_adapter(be, t);
        if (s < 0 || s >= p->shape.n_slots)
            continue;
        lora_tile *last = n ? &tiles[n - 1] : NULL;
        if (last && last->slot == s && last->t0 + last->n == t && last->n < ZSE_CPU_LORA_TILE)
            last->n++;
        else
            tiles[n++] = (lora_tile){t, 1, s};
    }
    return n;
}

/* u[t][i][j] = A[j]·x[t] for (tile, projection, group of ranks) units */
static void shrink_range(void *arg, int64_t u0, int64_t u1)
{
    const lora_ctx *c = arg;
    const zse_cpu_vec *vec = zse_cpu_vec_ops();
    const int64_t per_tile = (int64_t)c->n_outs * c->rank_groups, ldu = (int64_t)c->n_outs * ZSE_LORA_MAX_RANK;
    for (int64_t k = u0; k < u1; k++) {
        const lora_tile *tl = &c->tiles[k / per_tile];
        const int i = (int)(k % per_tile / c->rank_groups);
        const int j0 = (int)(k % c->rank_groups) * ZSE_CPU_LORA_RANKS;
        const uint8_t *base;
        const zse_lora_entry *e = slot_entry(c, tl->slot, i, &base);
        if (!e || j0 >= e->rank)
            continue;
        const int nq = e->rank - j0 < ZSE_CPU_LORA_RANKS ? e->rank - j0 : ZSE_CPU_LORA_RANKS;
        const int64_t in = c->p->shape.in[c->outs[i].module];
        const uint16_t *a = (const uint16_t *)(base + e->a) + (size_t)j0 * (size_t)in;
        vec->lora_shrink(a, in, nq, c->x->data + tl->t0 * c->x->cols, c->x->cols, tl->n, in,
                         c->u + tl->t0 * ldu + (int64_t)i * ZSE_LORA_MAX_RANK + j0, ldu);
    }
}

/* y[t][o0 .. o0 + 256] += scale · Σ_j u[t][j] Bᵀ[j][o] for (tile, projection, chunk) units */
static void expand_range(void *arg, int64_t u0, int64_t u1)
{
    const lora_ctx *c = arg;
    const zse_cpu_vec *vec = zse_cpu_vec_ops();
    const int64_t per_tile = (int64_t)c->n_outs * c->out_chunks, ldu = (int64_t)c->n_outs * ZSE_LORA_MAX_RANK;
    for (int64_t k = u0; k < u1; k++) {
        const lora_tile *tl = &c->tiles[k / per_tile];
        const int i = (int)(k % per_tile / c->out_chunks);
        const int64_t o0 = k % c->out_chunks * ZSE_CPU_LORA_CHUNK;
        const uint8_t *base;
        const zse_lora_entry *e = slot_entry(c, tl->slot, i, &base);
        const int64_t out = c->p->shape.out[c->outs[i].module];
        if (!e || o0 >= out)
            continue;
        const int64_t n = out - o0 < ZSE_CPU_LORA_CHUNK ? out - o0 : ZSE_CPU_LORA_CHUNK;
        const zse_act *y = c->outs[i].y;
        vec->lora_expand((const uint16_t *)(base + e->bt) + o0, out, e->rank,
                         c->u + tl->t0 * ldu + (int64_t)i * ZSE_LORA_MAX_RANK, ldu, tl->n, e->scale,
                         y->data + tl->t0 * y->cols + o0, y->cols, n);
    }
}

/* the largest rank among the tiles' entries for these projections */
static int largest_rank(const lora_ctx *c)
{
    int most = 0;
    for (int64_t k = 0; k < c->n_tiles; k++)
        for (int i = 0; i < c->n_outs; i++) {
            const uint8_t *base;
            const zse_lora_entry *e = slot_entry(c, c->tiles[k].slot, i, &base);
            if (e && e->rank > most)
                most = e->rank;
        }
    return most;
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
    /* one workspace: u, then the tiles */
    const size_t n = rows > 0 ? (size_t)rows : 1;
    const size_t u_bytes = (n * (size_t)n_outs * ZSE_LORA_MAX_RANK * sizeof(float) + 63) & ~(size_t)63;
    uint8_t *work = zse_cpu_workspace(be, u_bytes + n * sizeof(lora_tile));
    if (!work) {
        zse_cpu_note_failure(be, "lora_apply: out of memory");
        return;
    }
    lora_ctx c = {p, layer, x, outs, n_outs, (const lora_tile *)(work + u_bytes), 0, 0,
                  (widest + ZSE_CPU_LORA_CHUNK - 1) / ZSE_CPU_LORA_CHUNK, (float *)work};
    c.n_tiles = cut_tiles(be, p, rows, (lora_tile *)(work + u_bytes));
    c.rank_groups = (largest_rank(&c) + ZSE_CPU_LORA_RANKS - 1) / ZSE_CPU_LORA_RANKS;
    if (c.n_tiles == 0 || c.rank_groups == 0)
        return;
    zse_cpu_parallel_for(be, c.n_tiles * n_outs * c.rank_groups, shrink_range, &c);
    zse_cpu_parallel_for(be, c.n_tiles * n_outs * c.out_chunks, expand_range, &c);
}
