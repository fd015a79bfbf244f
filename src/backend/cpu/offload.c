/* The CPU backend's ops for weights kept in host memory (backend.h: pins, slabs, marks).
 *
 * The engine never offloads on the CPU — its weights are already where it computes, used in
 * place from the mapping — but the model's offload path (src/model/offload.c) is the same
 * code whatever the backend, and these ops let the unit tests run it here and compare its
 * numbers with a resident model's, bit for bit.
 *
 * The compute queue is this backend's ordinary ops, which run when called. The copy queue is
 * lazy: slab_fetch only records the copy, and it lands when the compute queue waits for a
 * copy mark at or past it. A GPU's copy engine may run a copy any time between its issue and
 * that wait, and the latest moment is the one that exposes a missing wait: a weight read
 * without one is the slot's previous content here, and the numbers come out wrong. */
#include "backend/cpu/cpu.h"

#include <string.h>

struct zse_pinned {
    const uint8_t *p;
    size_t bytes;
};

struct zse_slab {
    uint8_t *mem;
    size_t slot_bytes;
    int n_slots;
};

typedef struct {
    uint8_t *dst;
    const uint8_t *src;
    size_t n;
    const zse_slab *slab;       /* NULL once its slab is freed (the copy is dropped) */
} pending_copy;

struct zse_cpu_copies {
    pending_copy *q;            /* copies issued and not yet landed, oldest at head */
    size_t head, n, cap;
    int64_t issued, landed;     /* copies so far: the copy queue's marks */
    int64_t compute_marks;
    uint64_t slab_bytes;
};

static zse_cpu_copies *copies(zse_backend *be)
{
    zse_cpu_copies **slot = zse_cpu_copies_slot(be);
    if (!*slot)
        *slot = zse_calloc(1, sizeof **slot);
    return *slot;
}

void zse_cpu_copies_free(zse_cpu_copies *q)
{
    if (q) {
        free(q->q);
        free(q);
    }
}

uint64_t zse_cpu_slab_bytes(zse_backend *be)
{
    zse_cpu_copies *q = *zse_cpu_copies_slot(be);
    return q ? q->slab_bytes : 0;
}

zse_pinned *zse_cpu_host_pin(zse_backend *be, const void *p, size_t bytes)
{
    (void)be;
    zse_pinned *h = zse_calloc(1, sizeof *h);
    if (h) {
        h->p = p;
        h->bytes = bytes;
    }
    return h;
}

void zse_cpu_host_unpin(zse_backend *be, zse_pinned *h)
{
    (void)be;
    free(h);
}

zse_slab *zse_cpu_slab_new(zse_backend *be, size_t slot_bytes, int n_slots)
{
    zse_cpu_copies *q = copies(be);
    size_t bytes;
    if (!q)
        return NULL;
    if (n_slots < 1 || slot_bytes == 0 || slot_bytes % 256 || !zse_mul_ok(slot_bytes, (size_t)n_slots, &bytes)) {
        zse_fail("slab of %d slots of %zu bytes is not possible (slots are multiples of 256 bytes)", n_slots,
                 slot_bytes);
        return NULL;
    }
    zse_slab *s = zse_calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (!(s->mem = zse_aligned_alloc(256, bytes))) {
        free(s);
        return NULL;
    }
    memset(s->mem, 0, bytes);
    s->slot_bytes = slot_bytes;
    s->n_slots = n_slots;
    q->slab_bytes += bytes;
    return s;
}

void zse_cpu_slab_free(zse_backend *be, zse_slab *s)
{
    if (!s)
        return;
    zse_cpu_copies *q = *zse_cpu_copies_slot(be);
    for (size_t i = q ? q->head : 0; q && i < q->n; i++)
        if (q->q[i].slab == s)
            q->q[i].slab = NULL;
    if (q)
        q->slab_bytes -= (uint64_t)s->slot_bytes * (uint64_t)s->n_slots;
    free(s->mem);
    free(s);
}

uint8_t *zse_cpu_slot_data(const zse_slab *s, int slot) { return s->mem + (size_t)slot * s->slot_bytes; }

void zse_cpu_slab_fetch(zse_backend *be, zse_slab *s, int slot, const zse_pinned *h, uint64_t off, size_t n,
                        int64_t after)
{
    (void)after; /* the compute queue has run everything issued before this call */
    zse_cpu_copies *q = copies(be);
    if (!q) {
        zse_cpu_note_failure(be, "slab_fetch: out of memory");
        return;
    }
    if (slot < 0 || slot >= s->n_slots || n > s->slot_bytes || off > h->bytes || n > h->bytes - off) {
        zse_cpu_note_failure(be, "slab_fetch: the copy does not fit the slot or the pinned range");
        return;
    }
    if (q->n == q->cap && q->head > 0) { /* slide the pending copies to the front */
        memmove(q->q, q->q + q->head, (q->n - q->head) * sizeof *q->q);
        q->n -= q->head;
        q->head = 0;
    }
    if (q->n == q->cap) {
        size_t cap = q->cap ? 2 * q->cap : 64;
        pending_copy *g = zse_realloc(q->q, cap * sizeof *g);
        if (!g) {
            zse_cpu_note_failure(be, "slab_fetch: out of memory");
            return;
        }
        q->q = g;
        q->cap = cap;
    }
    q->q[q->n++] = (pending_copy){zse_cpu_slot_data(s, slot), h->p + off, n, s};
    q->issued++;
}

int64_t zse_cpu_mark(zse_backend *be, int queue)
{
    zse_cpu_copies *q = copies(be);
    if (!q) {
        zse_cpu_note_failure(be, "mark: out of memory");
        return -1;
    }
    return queue == ZSE_QUEUE_COPY ? q->issued : q->compute_marks++;
}

void zse_cpu_wait_mark(zse_backend *be, int queue, int64_t mark)
{
    zse_cpu_copies *q = copies(be);
    if (!q || queue != ZSE_QUEUE_COMPUTE || mark < 0)
        return; /* the copy queue never waits here: the compute queue is done when it returns */
    if (mark > q->issued) {
        zse_cpu_note_failure(be, "wait_mark: a copy mark that was never made");
        return;
    }
    while (q->landed < mark) {
        const pending_copy *c = &q->q[q->head++];
        if (c->slab)
            memcpy(c->dst, c->src, c->n);
        q->landed++;
    }
    if (q->head == q->n)
        q->head = q->n = 0;
}

zse_weight *zse_cpu_weight_in_slab(zse_backend *be, const zse_tensor_info *t, const zse_slab *s, int slot,
                                   uint64_t at)
{
    (void)be;
    const size_t bytes = zse_qshape_bytes(&t->q);
    if (slot < 0 || slot >= s->n_slots || bytes == 0 || at > s->slot_bytes || bytes > s->slot_bytes - at) {
        zse_fail("%s does not fit slot %d of %zu bytes at %llu", t->name, slot, s->slot_bytes, (unsigned long long)at);
        return NULL;
    }
    zse_weight *w = zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->q = t->q;
    zse_qshape_planes(&w->q, &w->p);
    w->data = zse_cpu_slot_data(s, slot) + at;
    return w;
}

int zse_cpu_act_write_rows(zse_backend *be, zse_act *a, const float *src, const int32_t *rows, int64_t n)
{
    (void)be;
    for (int64_t i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= a->rows)
            return zse_fail("act_write_rows: row %d of an activation of %lld", rows[i], (long long)a->rows);
    for (int64_t i = 0; i < n; i++)
        memcpy(a->data + (int64_t)rows[i] * a->cols, src + i * a->cols, (size_t)a->cols * sizeof(float));
    return 0;
}
