/* backend_offload.cu — the CUDA backend's weights in host memory: pins, slabs, the copy
 * stream's marks, streamed tensors and experts, and memory accounting; backend.cu says how
 * the pieces fit. */
#include "backend/cuda/backend_internal.cuh"

/* ---- weights in host memory ---------------------------------------------------------------
 * src/model/offload.c keeps a MoE model's experts, or a dense model's streamed layers, in
 * pinned host memory and moves them into slab slots on the copy stream while the compute
 * stream runs; marks (events) order the two. Nothing here is recorded into a CUDA graph: the
 * model runs such steps eagerly (llama.c says why). */

struct zse_pinned {
    const uint8_t *src;         /* where copies read the bytes: in place, or the pinned copy */
    void *registered;           /* the page-aligned range registered with the driver, or NULL */
    uint8_t *copy;              /* a pinned copy where registering failed, or NULL */
    size_t bytes;               /* of the range pinned */
    size_t counted;             /* bytes pinned (memory accounting) */
};

struct zse_slab {
    uint8_t *dev;
    size_t slot_bytes;
    int n_slots;
};

static zse_pool *fill_pool_of(cuda_impl *c)
{
    if (!c->fill_pool) {
        int n = zse_physical_cores();
        n = n < 1 ? 1 : n > FILL_THREADS_MAX ? FILL_THREADS_MAX : n;
        c->fill_pool = zse_pool_create(n); /* NULL: fill on this thread alone */
    }
    return c->fill_pool;
}

/* Registered in place (read-only: the mapping is PROT_READ) where the driver can, so the
 * file's page-cache pages are what the copy engine reads and nothing is duplicated; else a
 * pinned copy (twice the host memory for those bytes). ZSE_CUDA_PIN_COPY=1 takes the copy
 * to compare the two. */
zse_pinned *cuda_host_pin(zse_backend *be, const void *p, size_t bytes)
{
    cuda_impl *c = impl_of(be);
    zse_pinned *h = (zse_pinned *)zse_calloc(1, sizeof *h);
    if (!h || be_cuda_call(cudaSetDevice(c->device), "selecting the device") != 0) {
        free(h);
        return NULL;
    }
    h->bytes = bytes;
    const long pg = sysconf(_SC_PAGESIZE);
    const uintptr_t page = pg > 0 ? (uintptr_t)pg : 4096;
    const uintptr_t start = (uintptr_t)p & ~(page - 1), end = ((uintptr_t)p + bytes + page - 1) & ~(page - 1);
    int read_only = 0;
    if (cudaDeviceGetAttribute(&read_only, cudaDevAttrHostRegisterReadOnlySupported, c->device) != cudaSuccess)
        read_only = 0;
    const char *force_copy = getenv("ZSE_CUDA_PIN_COPY");
    if (read_only && !(force_copy && strcmp(force_copy, "1") == 0)) {
        cudaError_t e = cudaHostRegister((void *)start, end - start, cudaHostRegisterReadOnly);
        if (e == cudaSuccess) {
            h->registered = (void *)start;
            h->src = (const uint8_t *)p;
            h->counted = end - start;
        } else {
            cudaGetLastError();
            zse_log(ZSE_LOG_INFO, "cuda: cannot register %zu MiB of the mapping (%s); copying it into pinned memory",
                    bytes >> 20, cudaGetErrorString(e));
        }
    }
    if (!h->registered) {
        if (be_cuda_call(cudaHostAlloc((void **)&h->copy, bytes ? bytes : 1, cudaHostAllocDefault),
                         "allocating pinned host memory") != 0) {
            free(h);
            return NULL;
        }
        image im = {(const uint8_t *)p, bytes, bytes, bytes};
        fill_job job = {&im, 0, bytes, h->copy};
        zse_pool *pool = bytes >= FILL_PARALLEL_MIN ? fill_pool_of(c) : NULL;
        if (pool)
            zse_pool_run(pool, be_fill_share, &job);
        else
            be_image_fill(&im, 0, bytes, h->copy);
        h->src = h->copy;
        h->counted = bytes;
    }
    c->pinned_bytes += h->counted;
    return h;
}

void cuda_host_unpin(zse_backend *be, zse_pinned *h)
{
    if (!h)
        return;
    cuda_impl *c = impl_of(be);
    cudaStreamSynchronize(c->copy_stream); /* no copy may still read it */
    if (h->registered)
        cudaHostUnregister(h->registered);
    cudaFreeHost(h->copy);
    c->pinned_bytes -= h->counted;
    free(h);
}

zse_slab *cuda_slab_new(zse_backend *be, size_t slot_bytes, int n_slots)
{
    cuda_impl *c = impl_of(be);
    size_t bytes;
    if (n_slots < 1 || slot_bytes == 0 || slot_bytes % 256 || !zse_mul_ok(slot_bytes, (size_t)n_slots, &bytes)) {
        zse_fail("cuda: a slab of %d slots of %zu bytes is not possible (slots are multiples of 256 bytes)", n_slots,
                 slot_bytes);
        return NULL;
    }
    zse_slab *s = (zse_slab *)zse_calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (be_cuda_call(cudaSetDevice(c->device), "selecting the device") != 0 ||
        be_cuda_call(cudaMalloc((void **)&s->dev, bytes), "allocating a slab") != 0) {
        zse_error_prefix("cuda: %d slots of %zu MiB: ", n_slots, slot_bytes >> 20);
        free(s);
        return NULL;
    }
    s->slot_bytes = slot_bytes;
    s->n_slots = n_slots;
    c->slab_bytes += bytes;
    return s;
}

void cuda_slab_free(zse_backend *be, zse_slab *s)
{
    if (!s)
        return;
    cuda_impl *c = impl_of(be);
    cudaStreamSynchronize(c->stream);
    cudaStreamSynchronize(c->copy_stream);
    be_drop_graphs(c);
    c->slab_bytes -= s->slot_bytes * (size_t)s->n_slots;
    cudaFree(s->dev);
    free(s);
}

static int make_marks(cuda_impl *c)
{
    if (c->marks_made)
        return 0;
    for (int q = 0; q < 2; q++)
        for (int i = 0; i < MARK_RING; i++)
            if (be_cuda_call(cudaEventCreateWithFlags(&c->marks[q][i], cudaEventDisableTiming), "creating an event") != 0) {
                for (int k = 0; k < q * MARK_RING + i; k++)
                    cudaEventDestroy(c->marks[k / MARK_RING][k % MARK_RING]);
                return -1;
            }
    c->marks_made = true;
    return 0;
}

static cudaStream_t queue_stream(cuda_impl *c, int queue) { return queue == ZSE_QUEUE_COPY ? c->copy_stream : c->stream; }

int64_t cuda_mark(zse_backend *be, int queue)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return -1;
    if (queue != ZSE_QUEUE_COMPUTE && queue != ZSE_QUEUE_COPY) {
        be_set_error(c, "cuda mark: no queue %d", queue);
        return -1;
    }
    if (c->recording >= 0) {
        be_set_error(c, "cuda mark: a step with weights in host memory is not recorded");
        return -1;
    }
    if (make_marks(c) != 0) {
        be_set_error(c, "%s", zse_error_message());
        return -1;
    }
    const int64_t n = c->n_marks[queue];
    cudaError_t e = cudaEventRecord(c->marks[queue][n % MARK_RING], queue_stream(c, queue));
    if (e != cudaSuccess) {
        be_set_error(c, "cuda mark: %s", cudaGetErrorString(e));
        return -1;
    }
    c->n_marks[queue] = n + 1;
    return n;
}

/* `queue` waits for the other queue's mark m (once: a later wait covers an earlier one) */
static void wait_other(cuda_impl *c, int queue, int64_t m)
{
    const int other = 1 - queue;
    if (m < 0 || c->failed || m <= c->waited[queue])
        return;
    if (!c->marks_made || m >= c->n_marks[other])
        return be_set_error(c, "cuda wait_mark: mark %lld of queue %d was never made", (long long)m, other);
    cudaError_t e = cudaStreamWaitEvent(queue_stream(c, queue), c->marks[other][m % MARK_RING], 0);
    if (e != cudaSuccess)
        return be_set_error(c, "cuda wait_mark: %s", cudaGetErrorString(e));
    c->waited[queue] = m;
}

void cuda_wait_mark(zse_backend *be, int queue, int64_t mark)
{
    cuda_impl *c = impl_of(be);
    if (queue != ZSE_QUEUE_COMPUTE && queue != ZSE_QUEUE_COPY)
        return be_set_error(c, "cuda wait_mark: no queue %d", queue);
    if (c->recording >= 0)
        return be_set_error(c, "cuda wait_mark: a step with weights in host memory is not recorded");
    wait_other(c, queue, mark);
}

void cuda_slab_fetch(zse_backend *be, zse_slab *s, int slot, const zse_pinned *h, uint64_t off, size_t n,
                     int64_t after)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (c->recording >= 0)
        return be_set_error(c, "cuda slab_fetch: a step with weights in host memory is not recorded");
    if (slot < 0 || slot >= s->n_slots || n > s->slot_bytes || off > h->bytes || n > h->bytes - off)
        return be_set_error(c, "cuda slab_fetch: %zu bytes from %llu of a pinned %zu into slot %d of %d slots of %zu", n,
                            (unsigned long long)off, h->bytes, slot, s->n_slots, s->slot_bytes);
    wait_other(c, ZSE_QUEUE_COPY, after); /* the slot's last reader is done */
    cudaError_t e = cudaMemcpyAsync(s->dev + (size_t)slot * s->slot_bytes, h->src + off, n, cudaMemcpyHostToDevice,
                                    c->copy_stream);
    if (e != cudaSuccess)
        be_set_error(c, "cuda slab_fetch: %s", cudaGetErrorString(e));
}

/* a streamed layer's matrix where its layer buffer will hold it: the file's bytes as they
 * are, so rows must already be 16-byte units (no re-pitching) and vectors, which keep an f32
 * copy made at load, are refused */
zse_weight *cuda_weight_in_slab(zse_backend *be, const zse_tensor_info *t, const zse_slab *s, int slot,
                                uint64_t at)
{
    cuda_impl *c = impl_of(be);
    const zse_qshape *q = &t->q;
    const size_t bytes = be_checked_tensor_bytes(t);
    if (bytes == 0)
        return NULL;
    zse_qplanes pl;
    zse_qshape_planes(q, &pl);
    if (q->rows == 1 || pl.qs % 16 || pl.row_bytes % 16 || at % 256) {
        zse_fail("cuda: tensor %s cannot be streamed: a vector, or rows that are not 16-byte units", t->name);
        return NULL;
    }
    if (slot < 0 || slot >= s->n_slots || at > s->slot_bytes || bytes > s->slot_bytes - at) {
        zse_fail("cuda: tensor %s does not fit slot %d of %zu bytes at %llu", t->name, slot, s->slot_bytes,
                 (unsigned long long)at);
        return NULL;
    }
    zse_weight *w = (zse_weight *)zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    be_describe_planes(&w->w, q, &pl, s->dev + (size_t)slot * s->slot_bytes + at, (int64_t)pl.row_bytes);
    c->q4_loaded = c->q4_loaded || q->scheme == ZSE_SCHEME_Q4 || q->scheme == ZSE_SCHEME_Q4S;
    return w; /* bytes 0: the slab counts them */
}

zse_experts *cuda_experts_host(zse_backend *be, const zse_expert_bank *bank)
{
    cuda_impl *c = impl_of(be);
    zse_experts *ex = (zse_experts *)zse_calloc(1, sizeof *ex);
    if (!ex)
        return NULL;
    const size_t table = (size_t)bank->count * sizeof *ex->base;
    int rc = be_describe_experts(ex, bank);
    if (rc == 0)
        rc = be_cuda_call(cudaSetDevice(c->device), "selecting the device");
    if (rc == 0)
        rc = be_cuda_call(cudaMalloc((void **)&ex->base, table), "allocating an expert table");
    if (rc == 0) /* nowhere until experts_map places them */
        rc = be_cuda_call(cudaMemset(ex->base, 0, table), "clearing an expert table");
    if (rc == 0)
        rc = be_cuda_call(cudaHostAlloc((void **)&ex->shadow, table, cudaHostAllocDefault), "allocating an expert table");
    if (rc == 0)
        rc = be_cuda_call(cudaEventCreateWithFlags(&ex->map_done, cudaEventDisableTiming), "creating an event");
    if (rc != 0) {
        zse_error_prefix("the experts of layer %d: ", bank->layer);
        cudaFree(ex->base);
        cudaFreeHost(ex->shadow);
        free(ex);
        return NULL;
    }
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++)
        ex->part[p].base = ex->base;
    c->q4_loaded = c->q4_loaded || bank->part[0].q.scheme == ZSE_SCHEME_Q4 || bank->part[0].q.scheme == ZSE_SCHEME_Q4S;
    ex->bytes = table;
    c->weight_bytes += ex->bytes;
    be_drop_graphs(c);
    return ex;
}

void cuda_experts_map(zse_backend *be, zse_experts *ex, const zse_slab *s, const int32_t *slot_of)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!ex->shadow)
        return be_set_error(c, "cuda experts_map: these experts were loaded onto the device (experts_load)");
    /* the table's previous copy must have read the image before it changes */
    if (ex->map_pending && be_cuda_call(cudaEventSynchronize(ex->map_done), "experts_map") != 0)
        return be_set_error(c, "%s", zse_error_message());
    for (int e = 0; e < ex->count; e++) {
        if (slot_of[e] >= s->n_slots)
            return be_set_error(c, "cuda experts_map: expert %d in slot %d of %d", e, slot_of[e], s->n_slots);
        ex->shadow[e] = slot_of[e] >= 0 ? s->dev + (size_t)slot_of[e] * s->slot_bytes : NULL;
    }
    cudaError_t err = cudaMemcpyAsync(ex->base, ex->shadow, (size_t)ex->count * sizeof *ex->base,
                                      cudaMemcpyHostToDevice, c->stream);
    if (err == cudaSuccess)
        err = cudaEventRecord(ex->map_done, c->stream);
    if (err != cudaSuccess)
        return be_set_error(c, "cuda experts_map: %s", cudaGetErrorString(err));
    ex->map_pending = true;
}

int cuda_moe_route_read(zse_backend *be, const zse_moe_route *r, int32_t *seg, int32_t *token_of)
{
    cuda_impl *c = impl_of(be);
    be_prep_forget(c);
    if (c->failed)
        return zse_fail("%s", c->err);
    const size_t sb = ((size_t)r->p.n_experts + 1) * sizeof(int32_t), tb = (size_t)(r->rows * r->p.k) * sizeof(int32_t);
    if (be_ensure_pinned(c, &c->bounce, &c->bounce_cap, sb + tb, "moe_route_read") != 0 ||
        be_cuda_call(cudaMemcpyAsync(c->bounce, r->d.seg, sb, cudaMemcpyDeviceToHost, c->stream), "moe_route_read") != 0 ||
        be_cuda_call(cudaMemcpyAsync(c->bounce + sb, r->d.token_of, tb, cudaMemcpyDeviceToHost, c->stream),
                     "moe_route_read") != 0 ||
        be_cuda_call(cudaStreamSynchronize(c->stream), "moe_route_read") != 0)
        return -1;
    memcpy(seg, c->bounce, sb);
    memcpy(token_of, c->bounce + sb, tb);
    return 0;
}

int cuda_act_write_rows(zse_backend *be, zse_act *a, const float *src, const int32_t *rows, int64_t n)
{
    cuda_impl *c = impl_of(be);
    be_prep_forget(c);
    if (c->failed)
        return zse_fail("%s", c->err);
    for (int64_t i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= a->rows)
            return zse_fail("cuda act_write_rows: row %d of an activation of %lld", rows[i], (long long)a->rows);
    if (n == 0)
        return 0;
    const size_t row = (size_t)a->cols * sizeof(float), bytes = row * (size_t)n;
    /* the previous write's copy must have read the image before it changes */
    if (c->upload_pending && be_cuda_call(cudaEventSynchronize(c->upload_done), "act_write_rows") != 0)
        return -1;
    c->upload_pending = false;
    if (!c->upload_done &&
        be_cuda_call(cudaEventCreateWithFlags(&c->upload_done, cudaEventDisableTiming), "creating an event") != 0)
        return -1;
    if (be_ensure_pinned(c, &c->upload, &c->upload_cap, bytes, "act_write_rows") != 0)
        return -1;
    memcpy(c->upload, src, bytes);
    /* one copy per run of consecutive rows (an expert's pairs are one run) */
    for (int64_t i = 0; i < n;) {
        int64_t j = i + 1;
        while (j < n && rows[j] == rows[j - 1] + 1)
            j++;
        if (be_cuda_call(cudaMemcpy2DAsync(a->d + (int64_t)rows[i] * a->pitch, (size_t)a->pitch * sizeof(float),
                                           c->upload + (size_t)i * row, row, row, (size_t)(j - i), cudaMemcpyHostToDevice,
                                           c->stream),
                         "act_write_rows") != 0)
            return -1;
        i = j;
    }
    if (be_cuda_call(cudaEventRecord(c->upload_done, c->stream), "act_write_rows") != 0)
        return -1;
    c->upload_pending = true;
    return 0;
}

void cuda_memory(zse_backend *be, zse_backend_memory *out)
{
    cuda_impl *c = impl_of(be);
    memset(out, 0, sizeof *out);
    out->weights = c->weight_bytes;
    out->kv_cache = c->kv_bytes;
    out->activations = c->act_bytes;
    out->adapters = c->lora_bytes;
    out->workspace = c->scratch_cap + c->att_work_cap + c->batch_cap * sizeof(int32_t);
    out->slabs = c->slab_bytes;
    out->host_pinned = c->pinned_bytes;
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(c->device) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
        out->on_device = true;
        out->device_used = total_b - free_b;
        out->device_total = total_b;
    } else {
        cudaGetLastError(); /* reported as "not on a device", not as a failure */
    }
}
