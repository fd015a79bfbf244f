/* backend_weights.cu — the CUDA backend's weights (weight_load, weight_load_lookup,
 * weight_free) and its paged KV pool (kv_new, kv_free); backend.cu says how the pieces fit.
 *
 * Loading: each tensor goes mmap -> pinned staging buffer -> cudaMemcpyAsync, through a
 * ring of staging buffers so that the CPU fills one (with several threads) while the copy
 * engine drains another; pageable memory never feeds a copy on this path. */
#include "backend/cuda/backend_internal.cuh"

/* ---- weights ------------------------------------------------------------------------ */

/* copy dev image bytes [off, off + n) into dst */
void be_image_fill(const image *im, size_t off, size_t n, uint8_t *dst)
{
    if (im->src_row == im->dev_row) {
        memcpy(dst, im->src + off, n);
        return;
    }
    while (n > 0) {
        const size_t r = off / im->dev_row, in = off % im->dev_row;
        const size_t take = n < im->dev_row - in ? n : im->dev_row - in;
        const size_t real = in < im->src_row ? (im->src_row - in < take ? im->src_row - in : take) : 0;
        if (real)
            memcpy(dst, im->src + r * im->src_row + in, real);
        memset(dst + real, 0, take - real);
        dst += take;
        off += take;
        n -= take;
    }
}

void be_fill_share(void *arg, int ith, int nth)
{
    const fill_job *j = (const fill_job *)arg;
    size_t share = (j->n + (size_t)nth - 1) / (size_t)nth;
    share = (share + 4095) & ~(size_t)4095;
    const size_t begin = (size_t)ith * share;
    if (begin >= j->n)
        return;
    const size_t len = j->n - begin < share ? j->n - begin : share;
    be_image_fill(j->im, j->off + begin, len, j->dst + begin);
}

/* the ring: fill a pinned buffer while earlier ones are still being copied */
int be_upload(cuda_impl *c, const image *im, void *dev)
{
    if (!c->fill_pool && im->dev_bytes >= FILL_PARALLEL_MIN) {
        int n = zse_physical_cores();
        n = n < 1 ? 1 : n > FILL_THREADS_MAX ? FILL_THREADS_MAX : n;
        c->fill_pool = zse_pool_create(n);     /* NULL: fill on this thread alone */
    }
    for (size_t off = 0; off < im->dev_bytes; off += STAGE_BYTES) {
        const size_t n = im->dev_bytes - off < (size_t)STAGE_BYTES ? im->dev_bytes - off : (size_t)STAGE_BYTES;
        const int i = c->stage_next;
        c->stage_next = (i + 1) % STAGE_COUNT;
        if (be_cuda_call(cudaEventSynchronize(c->stage_done[i]), "waiting for a staging buffer") != 0)
            return -1;
        fill_job job = {im, off, n, c->stage[i]};
        if (c->fill_pool && n >= FILL_PARALLEL_MIN)
            zse_pool_run(c->fill_pool, be_fill_share, &job);
        else
            be_image_fill(im, off, n, c->stage[i]);
        if (be_cuda_call(cudaMemcpyAsync((uint8_t *)dev + off, c->stage[i], n, cudaMemcpyHostToDevice,
                                         c->copy_stream),
                         "copying a weight to the GPU") != 0 ||
            be_cuda_call(cudaEventRecord(c->stage_done[i], c->copy_stream), "recording a copy") != 0)
            return -1;
    }
    return 0;
}

/* the kernels' view of a packed tensor whose planes start at base */
void be_describe_planes(zse_cuda_weight *cw, const zse_qshape *q, const zse_qplanes *pl, const uint8_t *base,
                        int64_t row_bytes)
{
    const bool plain = zse_scheme_layout(q->scheme) == ZSE_LAYOUT_PLAIN;
    cw->scheme = q->scheme;
    cw->rows = q->rows;
    cw->cols = q->cols;
    cw->group_size = q->group_size;
    cw->qs = base + pl->qs;
    cw->row_bytes = row_bytes;
    cw->scales = plain ? NULL : base + pl->scales;
    cw->mins = q->scheme == ZSE_SCHEME_Q4 ? base + pl->mins : NULL;
    cw->groups = pl->groups;
}

/* the packed bytes of a tensor whose shape and scheme make sense and fit what is stored; 0
 * (and an error naming it) otherwise */
size_t be_checked_tensor_bytes(const zse_tensor_info *t)
{
    const zse_qshape *q = &t->q;
    if (q->rows < 1 || q->cols < 1 || q->scheme < 0 || q->scheme >= ZSE_SCHEME_COUNT) {
        zse_fail("cuda: tensor %s has a bad shape or scheme", t->name);
        return 0;
    }
    const size_t bytes = zse_qshape_bytes(q);
    if (bytes == 0 || bytes > t->size) {
        zse_fail("cuda: tensor %s: %llu bytes stored, %zu expected", t->name, (unsigned long long)t->size, bytes);
        return 0;
    }
    return bytes;
}

zse_weight *cuda_weight_load(zse_backend *be, const zse_tensor_info *t)
{
    cuda_impl *c = impl_of(be);
    const zse_qshape *q = &t->q;
    const size_t bytes = be_checked_tensor_bytes(t);
    if (bytes == 0)
        return NULL;
    zse_qplanes pl;
    zse_qshape_planes(q, &pl);
    zse_weight *w = (zse_weight *)zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    image im = {(const uint8_t *)t->data, pl.row_bytes, pl.row_bytes, bytes};
    const bool plain = zse_scheme_layout(q->scheme) == ZSE_LAYOUT_PLAIN;
    if (plain && pl.row_bytes % 16) {
        im.dev_row = (pl.row_bytes + 15) / 16 * 16;
        im.dev_bytes = im.dev_row * (size_t)q->rows;
    } else if (pl.qs % 16 || pl.row_bytes % 16) {
        zse_fail("cuda: tensor %s: packed rows are not 16-byte aligned (row %zu bytes at %zu); "
                 "re-convert the model with this version of zse", t->name, pl.row_bytes, pl.qs);
        free(w);
        return NULL;
    }
    if (be_cuda_call(cudaSetDevice(c->device), "selecting the device") != 0 ||
        be_cuda_call(cudaMalloc(&w->dev, im.dev_bytes), "allocating a weight") != 0 ||
        be_upload(c, &im, w->dev) != 0) {
        zse_error_prefix("loading %s: ", t->name);
        cudaFree(w->dev);
        free(w);
        return NULL;
    }
    be_describe_planes(&w->w, q, &pl, (const uint8_t *)w->dev, (int64_t)im.dev_row);
    c->q4_loaded = c->q4_loaded || q->scheme == ZSE_SCHEME_Q4 || q->scheme == ZSE_SCHEME_Q4S;
    /* the compute stream must see the upload before the first use */
    if (be_cuda_call(cudaStreamSynchronize(c->copy_stream), "finishing a weight copy") != 0) {
        cudaFree(w->dev);
        free(w);
        return NULL;
    }
    if (q->rows == 1) {
        /* norms and biases: keep an f32 vector beside the packed row */
        int32_t *zero_id = NULL;
        int rc = be_cuda_call(cudaMalloc((void **)&w->vec, (size_t)((q->cols + 3) & ~3) * sizeof(float)), "allocating a vector");
        if (rc == 0)
            rc = be_cuda_call(cudaMalloc((void **)&zero_id, sizeof(int32_t)), "allocating a vector");
        if (rc == 0)
            rc = be_cuda_call(cudaMemsetAsync(zero_id, 0, sizeof(int32_t), c->stream), "vector");
        if (rc == 0 && zse_cuda_embed(&w->w, zero_id, 1, w->vec, q->cols, c->stream) != 0)
            rc = zse_fail("%s", zse_cuda_last_error());
        if (rc == 0)
            rc = be_cuda_call(cudaStreamSynchronize(c->stream), "vector");
        cudaFree(zero_id);
        if (rc != 0) {
            zse_error_prefix("loading %s: ", t->name);
            cudaFree(w->vec);
            cudaFree(w->dev);
            free(w);
            return NULL;
        }
        w->bytes += (size_t)((q->cols + 3) & ~3) * sizeof(float);
    }
    w->bytes += im.dev_bytes;
    c->weight_bytes += w->bytes;
    return w;
}

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

size_t be_lookup_layout_of(const zse_weight *w, size_t n, lookup_layout *l)
{
    l->qs_pitch = round16(w->qs_row);
    l->scales = n * l->qs_pitch;
    l->mins = l->scales + round16(n * w->scale_row);
    return l->mins + round16(n * w->min_row);
}

/* An embedding table is read one row per token: VRAM would hold the whole table (545 MB for
 * a 7B model at int8) to serve a few KB a step. It stays in the file's mapping instead. */
zse_weight *cuda_weight_load_lookup(zse_backend *be, const zse_tensor_info *t)
{
    cuda_impl *c = impl_of(be);
    const zse_qshape *q = &t->q;
    int slot = 0;
    while (slot < MAX_LOOKUPS && c->lookups[slot])
        slot++;
    if (q->rows < 2 || slot == MAX_LOOKUPS)
        return cuda_weight_load(be, t);
    if (be_checked_tensor_bytes(t) == 0)
        return NULL;
    zse_qplanes pl;
    zse_qshape_planes(q, &pl);
    zse_weight *w = (zse_weight *)zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    const bool plain = zse_scheme_layout(q->scheme) == ZSE_LAYOUT_PLAIN;
    w->host = true;
    be_describe_planes(&w->w, q, &pl, (const uint8_t *)t->data, (int64_t)pl.row_bytes);
    w->qs_row = pl.row_bytes;
    w->scale_row = plain ? 0 : q->scheme == ZSE_SCHEME_Q8 ? sizeof(float) : (size_t)pl.groups * 2;
    w->min_row = q->scheme == ZSE_SCHEME_Q4 ? (size_t)pl.groups * 2 : 0;
    be_drop_graphs(c); /* the batch image's layout changes */
    c->lookups[slot] = w;
    return w;
}

void cuda_weight_free(zse_backend *be, zse_weight *w)
{
    if (!w)
        return;
    be_drop_graphs(impl_of(be));
    for (int i = 0; i < MAX_LOOKUPS; i++)
        if (impl_of(be)->lookups[i] == w)
            impl_of(be)->lookups[i] = NULL;
    impl_of(be)->weight_bytes -= w->bytes;
    cudaFree(w->vec);
    cudaFree(w->dev);
    free(w);
}

/* ---- KV cache ----------------------------------------------------------------------- */

zse_kv *cuda_kv_new(zse_backend *be, const zse_kv_shape *s)
{
    cuda_impl *c = impl_of(be);
    if (s->n_layers < 1 || s->n_blocks < 1 || s->block_size < 1 || s->n_kv_heads < 1 ||
        s->head_dim < 1) {
        zse_fail("cuda kv_new: bad shape");
        return NULL;
    }
    const bool int8 = s->store == ZSE_KV_STORE_INT8;
    const size_t slots = (size_t)s->n_blocks * (size_t)s->block_size;
    size_t elems, pool_bytes, scale_bytes = 0, layer_bytes, total;
    if (!zse_mul_ok(slots, (size_t)s->n_kv_heads * (size_t)s->head_dim, &elems)) {
        zse_fail("cuda kv_new: the cache size overflows");
        return NULL;
    }
    pool_bytes = (elems * (int8 ? 1 : 2) + 255) & ~(size_t)255;
    if (int8)
        scale_bytes = (slots * (size_t)s->n_kv_heads * sizeof(float) + 255) & ~(size_t)255;
    layer_bytes = 2 * (pool_bytes + scale_bytes);
    if (!zse_mul_ok(layer_bytes, (size_t)s->n_layers, &total)) {
        zse_fail("cuda kv_new: the cache size overflows");
        return NULL;
    }
    zse_kv *kv = (zse_kv *)zse_calloc(1, sizeof *kv);
    if (!kv)
        return NULL;
    kv->shape = *s;
    kv->layers = (zse_cuda_kv_layer *)zse_calloc((size_t)s->n_layers, sizeof *kv->layers);
    if (!kv->layers || be_cuda_call(cudaMalloc(&kv->pool, total), "allocating the KV cache") != 0) {
        zse_error_prefix("cuda kv_new (%zu MiB): ", total >> 20);
        free(kv->layers);
        free(kv);
        return NULL;
    }
    /* zeros, not garbage: attention reads slot 0 with weight 0 for holes in a block table */
    if (be_cuda_call(cudaMemsetAsync(kv->pool, 0, total, c->stream), "clearing the KV cache") != 0) {
        cudaFree(kv->pool);
        free(kv->layers);
        free(kv);
        return NULL;
    }
    uint8_t *p = (uint8_t *)kv->pool;
    for (int l = 0; l < s->n_layers; l++) {
        zse_cuda_kv_layer *L = &kv->layers[l];
        L->k = p;
        L->v = p + pool_bytes;
        p += 2 * pool_bytes;
        if (int8) {
            L->kscale = (float *)p;
            L->vscale = (float *)(p + scale_bytes);
            p += 2 * scale_bytes;
        }
        L->int8 = int8;
        L->block_size = s->block_size;
        L->n_kv_heads = s->n_kv_heads;
        L->head_dim = s->head_dim;
        L->n_slots = (int64_t)slots;
    }
    kv->bytes = total;
    c->kv_bytes += total;
    return kv;
}

void cuda_kv_free(zse_backend *be, zse_kv *kv)
{
    if (!kv)
        return;
    be_drop_graphs(impl_of(be));
    impl_of(be)->kv_bytes -= kv->bytes;
    cudaFree(kv->pool);
    free(kv->layers);
    free(kv);
}
