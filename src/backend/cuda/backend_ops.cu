/* backend_ops.cu — the CUDA backend's ops: each a launch of the kernels of cuda_kernels.h
 * on the compute stream (embed, RMSNorm, matmul, RoPE, KV store, attention, ...), and the
 * per-row token ops that read ids back (argmax_rows, sample_rows, mask_rows); backend.cu says
 * how the pieces fit. */
#include "backend/cuda/backend_internal.cuh"

/* ---- ops ------------------------------------------------------------------------------ */

void cuda_embed(zse_backend *be, const zse_weight *table, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (out->cols < table->w.cols || out->rows < c->b.n_tokens)
        return be_set_error(c, "cuda embed: output %lld x %lld is too small", (long long)out->rows, (long long)out->cols);
    if (table->host) {
        /* this step's rows came with the batch: a table of n_tokens rows read in order */
        int i = 0;
        while (i < MAX_LOOKUPS && c->lookups[i] != table)
            i++;
        if (i == MAX_LOOKUPS || !c->b.lookup_rows[i])
            return be_set_error(c, "cuda embed: the lookup table is not registered");
        lookup_layout l;
        be_lookup_layout_of(table, (size_t)c->b.n_tokens, &l);
        zse_cuda_weight v = table->w;
        uint8_t *base = c->b.lookup_rows[i];
        v.rows = c->b.n_tokens;
        v.qs = base;
        v.row_bytes = (int64_t)l.qs_pitch;
        v.scales = table->scale_row ? base + l.scales : NULL;
        v.mins = table->min_row ? base + l.mins : NULL;
        be_check_launch(c, zse_cuda_embed(&v, c->b.iota, c->b.n_tokens, out->d, out->pitch, c->stream));
        return;
    }
    be_check_launch(c, zse_cuda_embed(&table->w, c->b.tokens, c->b.n_tokens, out->d, out->pitch, c->stream));
}

/* where an op writing `rows` of `cols` puts them as the 4-bit matmul after it reads them
 * (zse_cuda_xprep_kind: quantized or f16 by the rows): the matmul scratch, grown to what that
 * needs (the GEMV's own reservation for Q8, so the matmul after it does not move it). 1
 * placed; 0 not (no 4-bit weight loaded, rows past the tensor-core ones, or a step being
 * recorded, which cannot grow the scratch: the op runs plain); -1 on an error */
static int prep_place(cuda_impl *c, int64_t rows, int64_t cols, zse_cuda_xprep *xp)
{
    const int kind = c->q4_loaded ? zse_cuda_xprep_kind(rows) : ZSE_CUDA_XPREP_NONE;
    if (kind == ZSE_CUDA_XPREP_NONE)
        return 0;
    const size_t need = zse_cuda_xprep_bytes(rows, cols, kind);
    if (need > c->scratch_cap && c->recording >= 0)
        return 0;
    if (be_ensure_device(c, &c->scratch, &c->scratch_cap, need, "matmul scratch") != 0)
        return -1;
    zse_cuda_xprep_at(c->scratch, rows, cols, kind, xp);
    return 1;
}

/* the end of an op that was asked to prepare x: rc from its zse_cuda_*_prep launcher (1 x
 * prepared, 0 the plain op ran, -1 an error) */
static void prep_done(cuda_impl *c, int rc, const zse_cuda_xprep *xp, const float *x, int64_t rows, int64_t cols)
{
    be_check_launch(c, rc < 0 ? -1 : 0);
    if (rc != 1)
        return;
    c->prep_x = x;
    c->prep_rows = rows;
    c->prep_cols = cols;
    c->prep_kind = xp->kind;
    c->prep_scratch = c->scratch;
}

/* the kind x (rows of cols) was left in by the last op, still in place; NONE otherwise */
static int prep_of(const cuda_impl *c, const zse_act *x, int64_t rows, int64_t cols)
{
    const bool held = c->prep_x && c->prep_x == x->d && c->prep_rows == rows && c->prep_cols == cols &&
                      c->prep_scratch == c->scratch;
    return held ? c->prep_kind : ZSE_CUDA_XPREP_NONE;
}

void cuda_rmsnorm(zse_backend *be, const zse_act *x, const zse_weight *w, float eps,
                  int64_t rows, int64_t dim, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!w->vec || w->w.cols != dim)
        return be_set_error(c, "cuda rmsnorm: weight is not a vector of %lld", (long long)dim);
    /* rows of `dim` inside rows of cols (per-head norm) need contiguous rows */
    int64_t xp = x->pitch, op = out->pitch;
    if (dim != x->cols || dim != out->cols) {
        if (x->pitch != x->cols || out->pitch != out->cols || rows * dim > x->rows * x->cols ||
            rows * dim > out->rows * out->cols)
            return be_set_error(c, "cuda rmsnorm: %lld rows of %lld do not tile a %lld-wide buffer",
                                (long long)rows, (long long)dim, (long long)x->cols);
        xp = op = dim;
    } else if (rows > x->rows || rows > out->rows) {
        return be_set_error(c, "cuda rmsnorm: %lld rows in a buffer of %lld", (long long)rows, (long long)x->rows);
    }
    zse_cuda_xprep prep;
    const int placed = dim == x->cols && dim == out->cols ? prep_place(c, rows, dim, &prep) : 0;
    if (placed < 0)
        return be_set_error(c, "%s", zse_error_message());
    if (placed)
        return prep_done(c, zse_cuda_rmsnorm_prep(x->d, xp, w->vec, eps, rows, dim, out->d, op, &prep, c->stream),
                         &prep, out->d, rows, dim);
    be_check_launch(c, zse_cuda_rmsnorm(x->d, xp, w->vec, eps, rows, dim, out->d, op, c->stream));
}

void cuda_matmul(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t rows, zse_act *y)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (c->lora_next.armed)
        return be_set_error(c, "cuda matmul: a LoRA delta was announced for a matmul_multi");
    if (w->host)
        return be_set_error(c, "cuda matmul: a lookup table (weight_load_lookup) is not on the device");
    if (x->cols < w->w.cols || y->cols < w->w.rows || rows > x->rows || rows > y->rows || rows < 1)
        return be_set_error(c, "cuda matmul: %lld x %lld weight with x %lld x %lld, y %lld x %lld",
                            (long long)w->w.rows, (long long)w->w.cols, (long long)x->rows,
                            (long long)x->cols, (long long)y->rows, (long long)y->cols);
    zse_cuda_multi mm;
    memset(&mm, 0, sizeof mm);
    mm.count = 1;
    mm.w[0] = w->w;
    mm.y[0] = y->d;
    mm.ypitch[0] = y->pitch;
    const size_t need = zse_cuda_matmul_multi_scratch_bytes(&mm, rows);
    if (be_ensure_device(c, &c->scratch, &c->scratch_cap, need, "matmul scratch") != 0)
        return be_set_error(c, "%s", zse_error_message());
    mm.x_ready = prep_of(c, x, rows, w->w.cols);
    be_check_launch(c, zse_cuda_matmul_multi(&mm, x->d, x->pitch, rows, c->cublas, c->scratch, c->scratch_cap,
                                             c->stream));
}

void cuda_matmul_multi(zse_backend *be, const zse_act *x, int64_t rows, const zse_matmul_out *outs,
                       int n_outs, bool accumulate)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    zse_cuda_lora lora;
    float *lora_scratch = NULL;
    size_t lora_bytes = 0;
    const int with_lora = cuda_lora_take(c, x, rows, &lora, &lora_scratch, &lora_bytes);
    if (with_lora < 0)
        return;
    if (n_outs < 1 || n_outs > ZSE_CUDA_MULTI_MAX || rows < 1 || rows > x->rows)
        return be_set_error(c, "cuda matmul_multi: %d weights over %lld rows", n_outs, (long long)rows);
    zse_cuda_multi mm;
    memset(&mm, 0, sizeof mm);
    mm.count = n_outs;
    mm.accumulate = accumulate;
    for (int i = 0; i < n_outs; i++) {
        const zse_cuda_weight *w = &outs[i].w->w;
        const zse_act *y = outs[i].y;
        const zse_weight *b = outs[i].bias;
        if (outs[i].w->host)
            return be_set_error(c, "cuda matmul_multi: a lookup table is not on the device");
        if (x->cols < w->cols || y->cols < w->rows || rows > y->rows || y->d == x->d)
            return be_set_error(c, "cuda matmul_multi: %lld x %lld weight with x %lld x %lld, y %lld x %lld",
                                (long long)w->rows, (long long)w->cols, (long long)x->rows, (long long)x->cols,
                                (long long)y->rows, (long long)y->cols);
        if (b && (!b->vec || b->w.cols != w->rows))
            return be_set_error(c, "cuda matmul_multi: a bias of %lld for %lld rows", (long long)b->w.cols,
                                (long long)w->rows);
        mm.w[i] = *w;
        mm.y[i] = y->d;
        mm.ypitch[i] = y->pitch;
        mm.bias[i] = b ? b->vec : NULL;
    }
    const size_t need = zse_cuda_matmul_multi_scratch_bytes(&mm, rows);
    if (be_ensure_device(c, &c->scratch, &c->scratch_cap, need, "matmul scratch") != 0)
        return be_set_error(c, "%s", zse_error_message());
    mm.x_ready = prep_of(c, x, rows, mm.w[0].cols);
    if (with_lora)
        be_check_launch(c, zse_cuda_matmul_multi_lora(&mm, x->d, x->pitch, rows, c->cublas, c->scratch, c->scratch_cap,
                                                      &lora, c->b.adapter_of, lora_scratch, lora_bytes, NULL,
                                                      c->stream));
    else
        be_check_launch(c, zse_cuda_matmul_multi(&mm, x->d, x->pitch, rows, c->cublas, c->scratch, c->scratch_cap,
                                                 c->stream));
}

void cuda_add_bias(zse_backend *be, zse_act *y, const zse_weight *bias, int64_t rows)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!bias->vec || bias->w.cols > y->cols || rows > y->rows)
        return be_set_error(c, "cuda add_bias: bias of %lld for a %lld-wide buffer", (long long)bias->w.cols, (long long)y->cols);
    be_check_launch(c, zse_cuda_add_bias(y->d, y->pitch, bias->vec, rows, bias->w.cols, c->stream));
}

void cuda_rope(zse_backend *be, zse_act *q, zse_act *k, int n_heads, int n_kv_heads, int head_dim)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!c->inv_freq || c->n_freq < head_dim / 2)
        return be_set_error(c, "cuda rope: rope_init was not called for head_dim %d", head_dim);
    if ((int64_t)n_heads * head_dim > q->cols || (int64_t)n_kv_heads * head_dim > k->cols)
        return be_set_error(c, "cuda rope: heads do not fit the q/k buffers");
    be_check_launch(c, zse_cuda_rope(q->d, q->pitch, c->b.n_tokens, n_heads, head_dim, c->b.positions, c->inv_freq, c->mscale, c->stream));
    be_check_launch(c, zse_cuda_rope(k->d, k->pitch, c->b.n_tokens, n_kv_heads, head_dim, c->b.positions, c->inv_freq, c->mscale, c->stream));
}

void cuda_kv_store(zse_backend *be, zse_kv *kv, int layer, const zse_act *k, const zse_act *v)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (layer < 0 || layer >= kv->shape.n_layers)
        return be_set_error(c, "cuda kv_store: layer %d of %d", layer, kv->shape.n_layers);
    const int64_t w = (int64_t)kv->shape.n_kv_heads * kv->shape.head_dim;
    if (k->cols < w || v->cols < w)
        return be_set_error(c, "cuda kv_store: k/v rows narrower than %lld", (long long)w);
    be_check_launch(c, zse_cuda_kv_store(&kv->layers[layer], k->d, k->pitch, v->d, v->pitch,
                                         c->b.slots, c->b.n_tokens, c->stream));
}

void cuda_rope_kv_store(zse_backend *be, zse_act *q, zse_act *k, const zse_act *v, zse_kv *kv, int layer,
                        int n_heads, int n_kv_heads, int head_dim)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!c->inv_freq || c->n_freq < head_dim / 2)
        return be_set_error(c, "cuda rope: rope_init was not called for head_dim %d", head_dim);
    if (layer < 0 || layer >= kv->shape.n_layers || n_kv_heads != kv->shape.n_kv_heads ||
        head_dim != kv->shape.head_dim)
        return be_set_error(c, "cuda rope_kv_store: layer %d or heads do not match the cache", layer);
    const int64_t w = (int64_t)n_kv_heads * head_dim;
    if ((int64_t)n_heads * head_dim > q->cols || k->cols < w || v->cols < w)
        return be_set_error(c, "cuda rope_kv_store: heads do not fit the q/k/v buffers");
    be_check_launch(c, zse_cuda_rope_kv_store(&kv->layers[layer], q->d, q->pitch, k->d, k->pitch, v->d, v->pitch,
                                              c->b.slots, c->b.n_tokens, n_heads, c->b.positions, c->inv_freq,
                                              c->mscale, c->stream));
}

void cuda_attention(zse_backend *be, const zse_kv *kv, int layer, const zse_act *q,
                    const zse_attn_params *p, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (layer < 0 || layer >= kv->shape.n_layers || p->n_kv_heads != kv->shape.n_kv_heads ||
        p->head_dim != kv->shape.head_dim)
        return be_set_error(c, "cuda attention: parameters do not match the cache");
    const size_t need = zse_cuda_attention_work_bytes(c->b.n_tokens, p->n_heads, p->head_dim);
    if (be_ensure_device(c, &c->att_work, &c->att_work_cap, need, "attention work") != 0)
        return be_set_error(c, "%s", zse_error_message());
    zse_cuda_attn a;
    a.n_heads = p->n_heads;
    a.n_kv_heads = p->n_kv_heads;
    a.head_dim = p->head_dim;
    a.scale = p->scale;
    a.window = p->sliding_window;
    a.seq_of = c->b.seq_of;
    a.pos = c->b.positions;
    a.block_table = c->b.block_table;
    a.max_blocks = c->b.max_blocks;
    be_check_launch(c, zse_cuda_attention(&kv->layers[layer], &a, q->d, q->pitch, c->b.n_tokens,
                                          c->b.max_ctx, out->d, out->pitch, c->att_work,
                                          c->att_work_cap, c->stream));
}

void cuda_silu_mul(zse_backend *be, const zse_act *gate, const zse_act *up, int64_t rows,
                   int64_t dim, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (dim > gate->cols || dim > up->cols || dim > out->cols || rows > out->rows)
        return be_set_error(c, "cuda silu_mul: shapes do not match");
    zse_cuda_xprep prep;
    const int placed = dim == out->cols ? prep_place(c, rows, dim, &prep) : 0;
    if (placed < 0)
        return be_set_error(c, "%s", zse_error_message());
    if (placed)
        return prep_done(c,
                         zse_cuda_silu_mul_prep(gate->d, gate->pitch, up->d, up->pitch, rows, dim, out->d, out->pitch,
                                                &prep, c->stream),
                         &prep, out->d, rows, dim);
    be_check_launch(c, zse_cuda_silu_mul(gate->d, gate->pitch, up->d, up->pitch, rows, dim, out->d, out->pitch, c->stream));
}

void cuda_add(zse_backend *be, zse_act *x, const zse_act *y, int64_t rows, int64_t dim)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (dim > x->cols || dim > y->cols || rows > x->rows || rows > y->rows)
        return be_set_error(c, "cuda add: shapes do not match");
    be_check_launch(c, zse_cuda_add(x->d, x->pitch, y->d, y->pitch, rows, dim, c->stream));
}

void cuda_gather_out_rows(zse_backend *be, const zse_act *x, int64_t dim, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (dim > x->cols || dim > out->cols || c->b.n_out > out->rows)
        return be_set_error(c, "cuda gather_out_rows: shapes do not match");
    be_check_launch(c, zse_cuda_gather_rows(x->d, x->pitch, c->b.out_rows, c->b.n_out, dim, out->d, out->pitch, c->stream));
}

int cuda_sync(zse_backend *be)
{
    cuda_impl *c = impl_of(be);
    cudaError_t e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess)
        be_set_error(c, "cuda: a kernel failed: %s", cudaGetErrorString(e));
    if (c->failed)
        return zse_fail("%s", c->err);
    return 0;
}
/* rows x cols of x hold the logits a per-row token op reads; its message otherwise */
static int check_logit_rows(cuda_impl *c, const char *op, const zse_act *x, int64_t rows, int64_t cols)
{
    if (c->failed)
        return zse_fail("%s", c->err);
    if (rows < 0 || rows > x->rows || cols > x->cols)
        return zse_fail("cuda %s: %lld x %lld of a %lld x %lld buffer", op, (long long)rows, (long long)cols,
                        (long long)x->rows, (long long)x->cols);
    return 0;
}

/* the step's token ids, left by a kernel at the attention workspace's start, to the host
 * through the pinned bounce buffer, after the queued work */
static int read_ids(cuda_impl *c, const char *op, int64_t rows, int32_t *out)
{
    const size_t bytes = (size_t)rows * sizeof(int32_t);
    if (be_cuda_call(cudaMemcpyAsync(c->bounce, c->att_work, bytes, cudaMemcpyDeviceToHost, c->stream), op) != 0 ||
        be_cuda_call(cudaStreamSynchronize(c->stream), op) != 0)
        return -1;
    memcpy(out, c->bounce, bytes);
    return 0;
}

int cuda_argmax_rows(zse_backend *be, const zse_act *x, int64_t rows, int64_t cols, int32_t *out)
{
    cuda_impl *c = impl_of(be);
    be_prep_forget(c);
    if (check_logit_rows(c, "argmax_rows", x, rows, cols) != 0)
        return -1;
    if (rows == 0)
        return 0;
    /* the ids go to the attention workspace's start (free between steps) */
    const size_t bytes = (size_t)rows * sizeof(int32_t);
    if (be_ensure_device(c, &c->att_work, &c->att_work_cap, bytes, "argmax_rows") != 0 ||
        be_ensure_pinned(c, &c->bounce, &c->bounce_cap, bytes, "argmax_rows") != 0)
        return -1;
    if (zse_cuda_argmax_rows(x->d, x->pitch, rows, cols, (int32_t *)c->att_work, c->stream) != 0)
        return zse_fail("%s", zse_cuda_last_error());
    return read_ids(c, "argmax_rows", rows, out);
}

int cuda_sample_rows(zse_backend *be, zse_act *x, int64_t rows, int64_t cols, const zse_sample_row *p,
                     int32_t *out)
{
    cuda_impl *c = impl_of(be);
    be_prep_forget(c);   /* the rows are overwritten */
    if (check_logit_rows(c, "sample_rows", x, rows, cols) != 0)
        return -1;
    if (rows == 0)
        return 0;
    /* the attention workspace: ids, then from 256 bytes on the parameters; the pinned
     * bounce buffer likewise */
    const size_t ids = ((size_t)rows * sizeof(int32_t) + 255) & ~(size_t)255, prm = (size_t)rows * sizeof(zse_cuda_sample);
    if (be_ensure_device(c, &c->att_work, &c->att_work_cap, ids + prm, "sample_rows") != 0 ||
        be_ensure_pinned(c, &c->bounce, &c->bounce_cap, ids + prm, "sample_rows") != 0)
        return -1;
    zse_cuda_sample *hp = (zse_cuda_sample *)(c->bounce + ids);
    for (int64_t r = 0; r < rows; r++) {
        hp[r].temperature = p[r].temperature;
        hp[r].top_p = p[r].top_p;
        hp[r].min_p = p[r].min_p;
        hp[r].u = p[r].u;
        hp[r].top_k = p[r].top_k;
    }
    uint8_t *dev = (uint8_t *)c->att_work;
    if (be_cuda_call(cudaMemcpyAsync(dev + ids, hp, prm, cudaMemcpyHostToDevice, c->stream), "sample_rows") != 0)
        return -1;
    if (zse_cuda_sample_rows(x->d, x->pitch, rows, cols, (const zse_cuda_sample *)(dev + ids), (int32_t *)dev,
                             c->stream) != 0)
        return zse_fail("%s", zse_cuda_last_error());
    return read_ids(c, "sample_rows", rows, out);
}

int cuda_mask_rows(zse_backend *be, zse_act *x, int64_t cols, const zse_row_masks *m)
{
    cuda_impl *c = impl_of(be);
    be_prep_forget(c);   /* the rows change */
    if (check_logit_rows(c, "mask_rows", x, x->rows, cols) != 0)
        return -1;
    if (m->n == 0)
        return 0;
    for (int i = 0; i < m->n; i++)
        if (m->rows[i] < 0 || m->rows[i] >= x->rows)
            return zse_fail("cuda mask_rows: row %d of a %lld-row buffer", m->rows[i], (long long)x->rows);
    /* the row list, then from 256 bytes on the masks */
    const size_t rows = ((size_t)m->n * sizeof(int32_t) + 255) & ~(size_t)255,
                 bits = (size_t)m->n * (size_t)m->words * sizeof(uint32_t);
    if (be_ensure_device(c, &c->mask_dev, &c->mask_dev_cap, rows + bits, "mask_rows") != 0 ||
        be_ensure_pinned(c, &c->mask_host, &c->mask_host_cap, rows + bits, "mask_rows") != 0)
        return -1;
    /* the previous step's upload is done (its ids were read back after it, synchronously) */
    memcpy(c->mask_host, m->rows, (size_t)m->n * sizeof(int32_t));
    memcpy(c->mask_host + rows, m->bits, bits);
    uint8_t *dev = (uint8_t *)c->mask_dev;
    if (be_cuda_call(cudaMemcpyAsync(dev, c->mask_host, rows + bits, cudaMemcpyHostToDevice, c->stream), "mask_rows") != 0)
        return -1;
    if (zse_cuda_mask_rows(x->d, x->pitch, cols, (const int32_t *)dev, m->n, (const uint32_t *)(dev + rows), m->words,
                           c->stream) != 0)
        return zse_fail("%s", zse_cuda_last_error());
    return 0;
}
