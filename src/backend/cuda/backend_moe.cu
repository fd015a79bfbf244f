/* backend_moe.cu — the CUDA backend's mixture-of-experts ops: expert banks on the device,
 * routing and the grouped expert matmul (moe.cu's kernels); backend.cu says how the pieces
 * fit. */
#include "backend/cuda/backend_internal.cuh"

/* ---- mixture of experts ------------------------------------------------------------------
 * A layer's expert bank is one device allocation holding the file's bytes of the bank as
 * they are (count * stride: every expert at its file offset from the bank's start, so a part
 * lies where the bank says), and a device table of each expert's start: the grouped kernels
 * find expert e through it, so a cache that keeps experts in slots elsewhere only rewrites
 * the table. */

static_assert(ZSE_MAX_EXPERTS_USED <= ZSE_CUDA_MOE_K_MAX && ZSE_MAX_EXPERTS <= ZSE_CUDA_MOE_E_MAX,
              "the routing kernel holds a token's experts in a warp and every expert's count in shared memory");

/* backend_test links no format code: the parts' names for messages are here */
static const char *const part_names[ZSE_EXPERT_PARTS] = {"gate", "up", "down"};

void cuda_experts_free(zse_backend *be, zse_experts *ex)
{
    if (!ex)
        return;
    cuda_impl *c = impl_of(be);
    be_drop_graphs(c);
    if (ex->map_pending)
        cudaEventSynchronize(ex->map_done);
    if (ex->map_done)
        cudaEventDestroy(ex->map_done);
    c->weight_bytes -= ex->bytes;
    cudaFree(ex->dev);
    cudaFree(ex->base);
    cudaFreeHost(ex->shadow);
    free(ex);
}

/* the kernels' view of each part of a bank's experts (the table comes later); 0 / -1 */
int be_describe_experts(zse_experts *ex, const zse_expert_bank *bank)
{
    ex->count = bank->count;
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++) {
        const zse_expert_part *ep = &bank->part[p];
        zse_qplanes pl;
        zse_qshape_planes(&ep->q, &pl);
        zse_cuda_experts *ce = &ex->part[p];
        const bool plain = zse_scheme_layout(ep->q.scheme) == ZSE_LAYOUT_PLAIN;
        ce->w.scheme = ep->q.scheme;
        ce->w.rows = ep->q.rows;
        ce->w.cols = ep->q.cols;
        ce->w.group_size = ep->q.group_size;
        ce->w.row_bytes = (int64_t)pl.row_bytes;
        ce->w.groups = pl.groups;
        ce->qs_off = (int64_t)(ep->at + pl.qs);
        ce->scales_off = plain ? -1 : (int64_t)(ep->at + pl.scales);
        ce->mins_off = ep->q.scheme == ZSE_SCHEME_Q4 ? (int64_t)(ep->at + pl.mins) : -1;
        /* the kernels read 16 bytes at a time: rows must be whole 16-byte units (plain rows
         * are not re-pitched here, unlike dense tensors, so an expert keeps the file's layout) */
        if (pl.row_bytes % 16 || ce->qs_off % 16)
            return zse_fail("cuda: layer %d's expert %s rows are %zu bytes, not a multiple of 16; the GPU reads "
                            "experts as stored: convert with --quant int8, int4 or f32 (or a width that gives "
                            "16-byte rows)", bank->layer, part_names[p], pl.row_bytes);
    }
    return 0;
}

zse_experts *cuda_experts_load(zse_backend *be, const zse_expert_bank *bank)
{
    cuda_impl *c = impl_of(be);
    zse_experts *ex = (zse_experts *)zse_calloc(1, sizeof *ex);
    if (!ex)
        return NULL;
    if (be_describe_experts(ex, bank) != 0) {
        free(ex);
        return NULL;
    }
    const size_t span = (size_t)bank->stride * (size_t)(bank->count - 1) + (size_t)bank->size;
    image im = {bank->data, (size_t)bank->stride, (size_t)bank->stride, span};
    const uint8_t **host_base = (const uint8_t **)zse_malloc((size_t)bank->count * sizeof *host_base);
    int rc = host_base ? 0 : -1;
    if (rc == 0)
        rc = be_cuda_call(cudaSetDevice(c->device), "selecting the device");
    if (rc == 0)
        rc = be_cuda_call(cudaMalloc(&ex->dev, span), "allocating experts");
    if (rc == 0)
        rc = be_cuda_call(cudaMalloc((void **)&ex->base, (size_t)bank->count * sizeof *ex->base), "allocating experts");
    if (rc == 0)
        rc = be_upload(c, &im, ex->dev);
    if (rc == 0) {
        for (int e = 0; e < bank->count; e++)
            host_base[e] = (const uint8_t *)ex->dev + (size_t)e * (size_t)bank->stride;
        rc = be_cuda_call(cudaMemcpy(ex->base, host_base, (size_t)bank->count * sizeof *host_base, cudaMemcpyHostToDevice),
                          "copying the expert table");
    }
    if (rc == 0)
        rc = be_cuda_call(cudaStreamSynchronize(c->copy_stream), "finishing an expert copy");
    free(host_base);
    if (rc != 0) {
        zse_error_prefix("loading the experts of layer %d: ", bank->layer);
        cudaFree(ex->dev);
        cudaFree(ex->base);
        free(ex);
        return NULL;
    }
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++)
        ex->part[p].base = ex->base;
    c->q4_loaded = c->q4_loaded || bank->part[0].q.scheme == ZSE_SCHEME_Q4 || bank->part[0].q.scheme == ZSE_SCHEME_Q4S;
    ex->bytes = span + (size_t)bank->count * sizeof *ex->base;
    c->weight_bytes += ex->bytes;
    be_drop_graphs(c);
    return ex;
}

void cuda_moe_route_free(zse_backend *be, zse_moe_route *r)
{
    if (!r)
        return;
    be_drop_graphs(impl_of(be));
    impl_of(be)->act_bytes -= r->bytes;
    cudaFree(r->mem);
    free(r);
}

zse_moe_route *cuda_moe_route_new(zse_backend *be, int64_t max_rows, const zse_moe_params *p)
{
    cuda_impl *c = impl_of(be);
    if (max_rows < 1 || max_rows > 65535 || p->n_experts < 1 || p->n_experts > ZSE_MAX_EXPERTS || p->k < 1 ||
        p->k > p->n_experts || p->k > ZSE_MAX_EXPERTS_USED) {
        zse_fail("cuda: moe routing of %lld tokens to %d of %d experts is not possible", (long long)max_rows, p->k,
                 p->n_experts);
        return NULL;
    }
    zse_moe_route *r = (zse_moe_route *)zse_calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->p = *p;
    r->max_rows = max_rows;
    r->bytes = zse_cuda_moe_bytes(max_rows, p->n_experts, p->k);
    if (be_cuda_call(cudaMalloc(&r->mem, r->bytes), "allocating a routing") != 0 ||
        be_cuda_call(cudaMemsetAsync(r->mem, 0, r->bytes, c->stream), "clearing a routing") != 0) {
        cudaFree(r->mem);
        free(r);
        return NULL;
    }
    zse_cuda_moe_at(r->mem, max_rows, p->n_experts, p->k, p->renormalize, &r->d);
    c->act_bytes += r->bytes;
    be_drop_graphs(c);
    return r;
}

void cuda_moe_route(zse_backend *be, zse_moe_route *r, const zse_act *logits, int64_t rows)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (rows < 1 || rows > r->max_rows || rows > logits->rows || logits->cols < r->p.n_experts)
        return be_set_error(c, "cuda moe_route: %lld tokens for a routing of %lld, logits %lld x %lld", (long long)rows,
                            (long long)r->max_rows, (long long)logits->rows, (long long)logits->cols);
    r->rows = rows;
    be_check_launch(c, zse_cuda_moe_route(&r->d, logits->d, logits->pitch, rows, c->stream));
}

int cuda_moe_route_experts(zse_backend *be, const zse_moe_route *r, int32_t *experts)
{
    cuda_impl *c = impl_of(be);
    be_prep_forget(c);
    const size_t bytes = ((size_t)r->p.n_experts + 1) * sizeof(int32_t);
    if (c->failed)
        return zse_fail("%s", c->err);
    if (be_ensure_pinned(c, &c->bounce, &c->bounce_cap, bytes, "moe_route_experts") != 0 ||
        be_cuda_call(cudaMemcpyAsync(c->bounce, r->d.active, bytes, cudaMemcpyDeviceToHost, c->stream), "moe_route_experts") != 0 ||
        be_cuda_call(cudaStreamSynchronize(c->stream), "moe_route_experts") != 0)
        return -1;
    const int32_t *a = (const int32_t *)c->bounce;
    const int n = a[r->p.n_experts];
    if (n < 0 || n > r->p.n_experts)
        return zse_fail("cuda moe_route_experts: %d active experts of %d", n, r->p.n_experts);
    memcpy(experts, a, (size_t)n * sizeof *experts);
    return n;
}

void cuda_moe_gather(zse_backend *be, const zse_moe_route *r, const zse_act *x, zse_act *xs)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    const int64_t pairs = r->rows * r->p.k, dim = x->cols < xs->cols ? x->cols : xs->cols;
    if (r->rows < 1 || pairs > xs->rows)
        return be_set_error(c, "cuda moe_gather: %lld pairs into a buffer of %lld", (long long)pairs, (long long)xs->rows);
    be_check_launch(c, zse_cuda_gather_rows(x->d, x->pitch, r->d.token_of, pairs, dim, xs->d, xs->pitch, c->stream));
}

void cuda_moe_matmul(zse_backend *be, const zse_moe_route *r, const zse_experts *ex, const zse_act *xs,
                     const zse_moe_out *outs, int n_outs)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (n_outs < 1 || n_outs > ZSE_MOE_OUTS_MAX || ex->count != r->p.n_experts)
        return be_set_error(c, "cuda moe_matmul: %d parts of %d experts for a routing over %d", n_outs, ex->count,
                            r->p.n_experts);
    zse_cuda_moe_parts P;
    memset(&P, 0, sizeof P);
    P.n = n_outs;
    P.ypitch = outs[0].ys->pitch;
    const int64_t pairs = r->rows * r->p.k;
    for (int o = 0; o < n_outs; o++) {
        const int part = outs[o].part;
        const zse_act *ys = outs[o].ys;
        if (part < 0 || part >= ZSE_EXPERT_PARTS)
            return be_set_error(c, "cuda moe_matmul: part %d", part);
        const zse_cuda_experts *ce = &ex->part[part];
        if (r->rows < 1 || pairs > xs->rows || pairs > ys->rows || ce->w.cols > xs->cols || ce->w.rows > ys->cols ||
            ys->pitch != P.ypitch)
            return be_set_error(c, "cuda moe_matmul: %lld x %lld experts with x %lld x %lld, y %lld x %lld for %lld pairs",
                                (long long)ce->w.rows, (long long)ce->w.cols, (long long)xs->rows, (long long)xs->cols,
                                (long long)ys->rows, (long long)ys->cols, (long long)pairs);
        P.ex[o] = *ce;
        P.ys[o] = ys->d;
    }
    const size_t need = zse_cuda_moe_matmul_scratch_bytes(&P.ex[0], r->rows, r->p.k);
    if (need && be_ensure_device(c, &c->scratch, &c->scratch_cap, need, "moe matmul scratch") != 0)
        return be_set_error(c, "%s", zse_error_message());
    be_check_launch(c, zse_cuda_moe_matmul(&r->d, r->rows, &P, xs->d, xs->pitch, c->scratch, c->scratch_cap, c->stream));
}

void cuda_moe_combine(zse_backend *be, const zse_moe_route *r, const zse_act *ys, const zse_act *shared,
                      const zse_act *shared_gate, zse_act *x)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    const int64_t dim = x->cols;
    if (r->rows < 1 || r->rows > x->rows || r->rows * r->p.k > ys->rows || ys->cols < dim ||
        (shared && (shared->cols < dim || shared->rows < r->rows)) || (shared_gate && shared_gate->rows < r->rows))
        return be_set_error(c, "cuda moe_combine: the routing and the buffers do not match");
    be_check_launch(c, zse_cuda_moe_combine(&r->d, r->rows, ys->d, ys->pitch, shared ? shared->d : NULL,
                                            shared ? shared->pitch : 0, shared_gate ? shared_gate->d : NULL,
                                            shared_gate ? shared_gate->pitch : 0, x->d, x->pitch, dim, c->stream));
}
