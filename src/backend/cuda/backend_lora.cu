/* backend_lora.cu — the CUDA backend's LoRA adapter slots and lora_apply (lora.cu's
 * kernels); backend.cu says how the pieces fit. */
#include "backend/cuda/backend_internal.cuh"

/* ---- LoRA adapter slots ---------------------------------------------------------------------
 * One device allocation of n_slots slots. A load is one cudaMemcpyAsync from the engine's
 * pinned host image on the copy stream, after whatever the compute stream has queued (a
 * slot is reloaded only once no sequence uses it, but a step that used its last adapter may
 * still be running); an event says when it landed. The engine lets a sequence use the slot
 * only then, so a step never waits for a copy and a copy never waits for a step's end. */

static_assert(sizeof(zse_cuda_lora_entry) == sizeof(zse_lora_entry) && ZSE_CUDA_LORA_MAX_RANK == ZSE_LORA_MAX_RANK,
              "a slot's table is read by the kernels as zse_cuda_lora_entry");

struct zse_lora_pool {
    zse_lora_shape shape;
    uint8_t *dev;
    cudaEvent_t *landed;        /* [n_slots] recorded after each slot's last copy */
    bool *copying;
    cudaEvent_t queued;         /* the compute stream's work before a copy */
    float *u;                   /* lora_apply's scratch: the shrink's output */
    size_t u_cap;
    unsigned *sync;             /* lora_apply's counters (zero between launches) */
    int max_rank;               /* the largest rank a slot was loaded with: the shrink's grid */
};

void cuda_lora_pool_free(zse_backend *be, zse_lora_pool *p)
{
    cuda_impl *c = impl_of(be);
    if (!p)
        return;
    cudaSetDevice(c->device);
    cudaStreamSynchronize(c->copy_stream);
    cudaStreamSynchronize(c->stream);
    be_drop_graphs(c); /* recordings hold the slots' and the scratch's addresses */
    for (int s = 0; p->landed && s < p->shape.n_slots; s++)
        if (p->landed[s])
            cudaEventDestroy(p->landed[s]);
    if (p->queued)
        cudaEventDestroy(p->queued);
    cudaFree(p->dev);
    cudaFree(p->u);
    cudaFree(p->sync);
    if (p->dev)
        c->lora_bytes -= (uint64_t)p->shape.n_slots * p->shape.slot_bytes;
    free(p->landed);
    free(p->copying);
    free(p);
}

zse_lora_pool *cuda_lora_pool_new(zse_backend *be, const zse_lora_shape *s)
{
    cuda_impl *c = impl_of(be);
    size_t bytes;
    if (s->n_slots < 1 || s->n_layers < 1 || s->slot_bytes % 64 != 0 ||
        s->slot_bytes < (uint64_t)s->n_layers * ZSE_LORA_MODULES * sizeof(zse_lora_entry) ||
        __builtin_mul_overflow((size_t)s->n_slots, (size_t)s->slot_bytes, &bytes)) {
        zse_fail("a LoRA pool of %d slots of %llu bytes is not possible", s->n_slots, (unsigned long long)s->slot_bytes);
        return NULL;
    }
    zse_lora_pool *p = (zse_lora_pool *)zse_calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->shape = *s;
    p->landed = (cudaEvent_t *)zse_calloc((size_t)s->n_slots, sizeof *p->landed);
    p->copying = (bool *)zse_calloc((size_t)s->n_slots, sizeof *p->copying);
    int rc = p->landed && p->copying ? 0 : -1;
    if (rc == 0)
        rc = be_cuda_call(cudaSetDevice(c->device), "LoRA slots");
    if (rc == 0 && be_cuda_call(cudaMalloc((void **)&p->dev, bytes), "LoRA slots") == 0) {
        c->lora_bytes += bytes;
        be_drop_graphs(c);
        /* a slot never loaded adapts nothing: its table is all zero ranks */
        rc = be_cuda_call(cudaMemsetAsync(p->dev, 0, bytes, c->stream), "LoRA slots") ||
             be_cuda_call(cudaStreamSynchronize(c->stream), "LoRA slots");
    } else {
        rc = -1;
    }
    for (int i = 0; rc == 0 && i < s->n_slots; i++)
        rc = be_cuda_call(cudaEventCreateWithFlags(&p->landed[i], cudaEventDisableTiming), "LoRA slots");
    /* the scratch for steps of up to 1,024 rows now: a recorded step cannot grow it */
    if (rc == 0)
        rc = be_ensure_device(c, (void **)&p->u, &p->u_cap, zse_cuda_lora_scratch_bytes(1024, 3), "LoRA scratch");
    if (rc == 0)
        rc = be_cuda_call(cudaMalloc((void **)&p->sync, 4 * sizeof *p->sync), "LoRA counters") ||
             be_cuda_call(cudaMemsetAsync(p->sync, 0, 4 * sizeof *p->sync, c->stream), "LoRA counters") ||
             be_cuda_call(cudaStreamSynchronize(c->stream), "LoRA counters");
    if (rc == 0)
        rc = be_cuda_call(cudaEventCreateWithFlags(&p->queued, cudaEventDisableTiming), "LoRA slots");
    if (rc != 0) {
        zse_error_prefix("%d LoRA adapter slots of %.1f MiB", s->n_slots, (double)s->slot_bytes / 1048576.0);
        cuda_lora_pool_free(be, p);
        return NULL;
    }
    return p;
}

void *cuda_lora_host_alloc(zse_backend *be, size_t bytes)
{
    (void)be;
    void *p = NULL;
    if (cudaHostAlloc(&p, bytes ? bytes : 64, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        zse_fail("cannot allocate %.1f MiB of pinned host memory for a LoRA adapter (--max-cpu-loras)",
                 (double)bytes / 1048576.0);
        return NULL;
    }
    return p;
}

void cuda_lora_host_free(zse_backend *be, void *p)
{
    (void)be;
    cudaFreeHost(p);
}

int cuda_lora_slot_load(zse_backend *be, zse_lora_pool *p, int slot, const void *image, size_t bytes)
{
    cuda_impl *c = impl_of(be);
    if (slot < 0 || slot >= p->shape.n_slots)
        return zse_fail("LoRA slot %d of %d", slot, p->shape.n_slots);
    if (zse_lora_image_check(&p->shape, image, bytes) != 0)
        return -1;
    /* the shrink's grid covers the largest rank loaded; recordings made with a smaller one
     * would leave the new ranks out, so they go (slots are loaded between steps) */
    int rank = 0;
    for (int i = 0; i < p->shape.n_layers * ZSE_LORA_MODULES; i++) {
        zse_lora_entry e;
        memcpy(&e, (const uint8_t *)image + (size_t)i * sizeof e, sizeof e);
        rank = e.rank > rank ? e.rank : rank;
    }
    if (rank > p->max_rank) {
        if (c->recording >= 0)
            return zse_fail("cuda: a LoRA slot loaded while a step is recorded");
        be_drop_graphs(c);
        p->max_rank = rank;
    }
    uint8_t *dst = p->dev + (size_t)slot * p->shape.slot_bytes;
    if (be_cuda_call(cudaSetDevice(c->device), "loading a LoRA slot") != 0 ||
        be_cuda_call(cudaEventRecord(p->queued, c->stream), "loading a LoRA slot") != 0 ||
        be_cuda_call(cudaStreamWaitEvent(c->copy_stream, p->queued, 0), "loading a LoRA slot") != 0 ||
        be_cuda_call(cudaMemcpyAsync(dst, image, bytes, cudaMemcpyHostToDevice, c->copy_stream), "loading a LoRA slot") != 0 ||
        be_cuda_call(cudaEventRecord(p->landed[slot], c->copy_stream), "loading a LoRA slot") != 0)
        return -1;
    p->copying[slot] = true;
    return 0;
}

int cuda_lora_slot_ready(zse_backend *be, zse_lora_pool *p, int slot)
{
    (void)be;
    if (slot < 0 || slot >= p->shape.n_slots)
        return zse_fail("LoRA slot %d of %d", slot, p->shape.n_slots);
    if (!p->copying[slot])
        return 1;
    cudaError_t e = cudaEventQuery(p->landed[slot]);
    if (e == cudaErrorNotReady) {
        cudaGetLastError();
        return 0;
    }
    p->copying[slot] = false;
    return e == cudaSuccess ? 1 : zse_fail("cuda: copying a LoRA adapter into slot %d failed: %s", slot,
                                           cudaGetErrorString(e));
}

/* lora_apply's arguments as the kernels take them, with the pool's scratch grown to `need`
 * bytes; -1 with the backend's error set */
static int lora_args(cuda_impl *c, zse_lora_pool *p, int layer, const zse_act *x, int64_t rows,
                     const zse_lora_out *outs, int n_outs, size_t need, zse_cuda_lora *l)
{
    if (n_outs < 1 || n_outs > 3 || rows < 1 || rows > c->b.n_tokens || rows > x->rows) {
        be_set_error(c, "cuda lora_apply: %d projections over %lld rows", n_outs, (long long)rows);
        return -1;
    }
    memset(l, 0, sizeof *l);
    l->slots = p->dev;
    l->slot_bytes = p->shape.slot_bytes;
    l->n_slots = p->shape.n_slots;
    l->n_layers = p->shape.n_layers;
    l->layer = layer;
    l->n_outs = n_outs;
    l->max_rank = p->max_rank > 0 ? p->max_rank : 1;
    l->sync = p->sync;
    for (int i = 0; i < n_outs; i++) {
        const int m = outs[i].module;
        if (m < 0 || m >= ZSE_LORA_MODULES || outs[i].y->rows < rows) {
            be_set_error(c, "cuda lora_apply: projection %d is not one of the pool's", m);
            return -1;
        }
        l->module[i] = m;
        l->y[i] = outs[i].y->d;
        l->ypitch[i] = outs[i].y->pitch;
        l->in[i] = p->shape.in[m];
        l->out[i] = p->shape.out[m];
    }
    if (need && be_ensure_device(c, (void **)&p->u, &p->u_cap, need, "LoRA scratch") != 0) {
        be_set_error(c, "%s", zse_error_message());
        return -1;
    }
    return 0;
}

void cuda_lora_apply(zse_backend *be, const zse_lora_pool *pc, int layer, const zse_act *x, int64_t rows,
                     const zse_lora_out *outs, int n_outs)
{
    cuda_impl *c = impl_of(be);
    zse_lora_pool *p = (zse_lora_pool *)pc; /* its scratch grows here */
    if (c->failed || !c->b.lora_modules)
        return;
    zse_cuda_lora l;
    if (lora_args(c, p, layer, x, rows, outs, n_outs, zse_cuda_lora_scratch_bytes(rows, n_outs), &l) != 0)
        return;
    be_check_launch(c, zse_cuda_lora_apply(&l, c->b.adapter_of, x->d, x->pitch, rows, p->u, p->u_cap, c->stream));
}

int cuda_lora_with_next_matmul(zse_backend *be, const zse_lora_pool *pc, int layer, const zse_act *x, int64_t rows,
                               const zse_lora_out *outs, int n_outs)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return 1; /* the step is lost either way */
    if (c->lora_next.armed) {
        be_set_error(c, "cuda: a LoRA delta announced for a matmul that never ran");
        return 1;
    }
    if (!c->b.lora_modules || n_outs < 1 || n_outs > 3)
        return 0;
    c->lora_next.armed = true;
    c->lora_next.pool = (zse_lora_pool *)pc;
    c->lora_next.layer = layer;
    c->lora_next.x = x->d;
    c->lora_next.rows = rows;
    c->lora_next.n_outs = n_outs;
    for (int i = 0; i < n_outs; i++)
        c->lora_next.outs[i] = outs[i];
    return 1;
}

int cuda_lora_take(cuda_impl *c, const zse_act *x, int64_t rows, zse_cuda_lora *l, float **scratch, size_t *bytes)
{
    if (!c->lora_next.armed)
        return 0;
    c->lora_next.armed = false;
    if (c->lora_next.x != x->d || c->lora_next.rows != rows) {
        be_set_error(c, "cuda: a LoRA delta announced over other rows than the matmul after it");
        return -1;
    }
    zse_lora_pool *p = c->lora_next.pool;
    const int n = c->lora_next.n_outs;
    const size_t need = zse_cuda_matmul_lora_scratch_bytes(rows, n, x->cols);
    if (lora_args(c, p, c->lora_next.layer, x, rows, c->lora_next.outs, n, need, l) != 0)
        return -1;
    *scratch = p->u;
    *bytes = p->u_cap;
    return 1;
}
