/* backend_step.cu — the CUDA backend's per-step state: begin_batch packs the step's arrays
 * into one pinned image and copies it to the device, rope_init keeps the RoPE table, and
 * step_begin / step_end record a step as a CUDA graph and replay it; backend.cu says how the
 * pieces fit. */
#include "backend/cuda/backend_internal.cuh"

/* ---- per step ------------------------------------------------------------------------ */

/* the plane row r of a table into dst, or zeros where r is not a row of it */
static void copy_row_or_zero(uint8_t *dst, const void *plane, bool ok, size_t r, size_t bytes)
{
    if (ok)
        memcpy(dst, (const uint8_t *)plane + r * bytes, bytes);
    else
        memset(dst, 0, bytes);
}

/* rows ids[0..n) of a lookup table into dst, laid out as be_lookup_layout_of says; an id
 * outside the table is a zero row */
static void gather_lookup_rows(const zse_weight *w, const int32_t *ids, size_t n, uint8_t *dst)
{
    lookup_layout l;
    be_lookup_layout_of(w, n, &l);
    for (size_t t = 0; t < n; t++) {
        const bool ok = ids[t] >= 0 && ids[t] < w->w.rows;
        const size_t r = ok ? (size_t)ids[t] : 0;
        uint8_t *qs = dst + t * l.qs_pitch;
        copy_row_or_zero(qs, w->w.qs, ok, r, w->qs_row);
        memset(qs + w->qs_row, 0, l.qs_pitch - w->qs_row);
        if (w->scale_row)
            copy_row_or_zero(dst + l.scales + t * w->scale_row, w->w.scales, ok, r, w->scale_row);
        if (w->min_row)
            copy_row_or_zero(dst + l.mins + t * w->min_row, w->w.mins, ok, r, w->min_row);
    }
}

static int pow2_at_least(int v, int floor)
{
    int p = floor;
    while (p < v && p < (1 << 29))
        p <<= 1;
    return p;
}

int cuda_begin_batch(zse_backend *be, const zse_batch *b)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return zse_fail("%s", c->err);
    if (b->n_tokens < 1 || b->n_seqs < 1 || b->max_blocks_per_seq < 1 || b->n_out < 0 ||
        b->n_out > b->n_tokens)
        return zse_fail("cuda begin_batch: bad batch (%d tokens, %d seqs, %d out)", b->n_tokens,
                        b->n_seqs, b->n_out);
    /* layout: tokens, positions, seq_of, slots and out_rows at multiples of n_tokens, then
     * the block table, its pitch widened to a power of two (unused entries -1) */
    const size_t nt = (size_t)b->n_tokens, ns = (size_t)b->n_seqs;
    const int pitch = pow2_at_least(b->max_blocks_per_seq, MIN_TABLE_PITCH);
    const size_t table_rows = ns > nt ? ns : nt;
    const size_t tbl = table_rows * (size_t)pitch;
    /* then 0..n-1, each row's LoRA slot, and from a 16-byte boundary the rows of each lookup
     * table */
    const size_t ints = (5 * nt + tbl + 2 * nt + 3) / 4 * 4;
    size_t lookup_bytes = 0;
    lookup_layout l;
    for (int i = 0; i < MAX_LOOKUPS; i++)
        if (c->lookups[i])
            lookup_bytes += be_lookup_layout_of(c->lookups[i], nt, &l);
    const size_t need = ints + (lookup_bytes + 3) / 4;
    if (c->batch_cap < need) {
        size_t cap = need * 2, bytes = cap * sizeof(int32_t);
        if (be_cuda_call(cudaStreamSynchronize(c->stream), "begin_batch") != 0)
            return -1;
        be_drop_graphs(c);
        cudaFreeHost(c->batch_host);
        cudaFree(c->batch_dev);
        c->batch_host = c->batch_dev = NULL;
        c->batch_cap = 0;
        if (be_cuda_call(cudaHostAlloc((void **)&c->batch_host, bytes, cudaHostAllocDefault), "begin_batch") != 0 ||
            be_cuda_call(cudaMalloc((void **)&c->batch_dev, bytes), "begin_batch") != 0)
            return -1;
        c->batch_cap = cap;
    }
    /* the previous step's copy must be done before its pinned image is overwritten */
    if (be_cuda_call(cudaEventSynchronize(c->batch_copied), "begin_batch") != 0)
        return -1;
    int max_ctx = 0;
    for (size_t i = 0; i < ns; i++)
        if (b->seq_lens[i] > max_ctx)
            max_ctx = b->seq_lens[i];
    for (size_t t = 0; t < nt; t++) {
        if (b->seq_of[t] < 0 || b->seq_of[t] >= b->n_seqs || b->positions[t] < 0)
            return zse_fail("cuda begin_batch: token %zu has a bad sequence or position", t);
        if (b->positions[t] + 1 > max_ctx)
            max_ctx = b->positions[t] + 1;
    }
    for (int i = 0; i < b->n_out; i++)
        if (b->out_rows[i] < 0 || b->out_rows[i] >= b->n_tokens)
            return zse_fail("cuda begin_batch: out row %d outside the batch", b->out_rows[i]);
    int32_t *h = c->batch_host;
    memcpy(h, b->tokens, nt * 4);
    memcpy(h + nt, b->positions, nt * 4);
    memcpy(h + 2 * nt, b->seq_of, nt * 4);
    memcpy(h + 3 * nt, b->slots, nt * 4);
    if (b->n_out)
        memcpy(h + 4 * nt, b->out_rows, (size_t)b->n_out * 4);
    int32_t *table = h + 5 * nt;
    for (size_t s = 0; s < table_rows; s++) {
        int32_t *row = table + s * (size_t)pitch;
        int have = s < ns ? b->max_blocks_per_seq : 0;
        if (have)
            memcpy(row, b->block_table + s * (size_t)b->max_blocks_per_seq, (size_t)have * 4);
        for (int k = have; k < pitch; k++)
            row[k] = -1;
    }
    int32_t *iota = h + 5 * nt + tbl;
    for (size_t t = 0; t < nt; t++)
        iota[t] = (int32_t)t;
    const bool lora = b->adapter_of_seq && b->lora_modules;
    int32_t *adapter_of = iota + nt;
    for (size_t t = 0; t < nt; t++)
        adapter_of[t] = lora ? b->adapter_of_seq[b->seq_of[t]] : -1;
    uint8_t *lk = (uint8_t *)(h + ints);
    for (int i = 0; i < MAX_LOOKUPS; i++) {
        const zse_weight *w = c->lookups[i];
        c->b.lookup_rows[i] = NULL;
        if (!w)
            continue;
        c->b.lookup_rows[i] = (uint8_t *)c->batch_dev + (lk - (uint8_t *)h);
        gather_lookup_rows(w, b->tokens, nt, lk);
        lk += be_lookup_layout_of(w, nt, &l);
    }
    if (be_cuda_call(cudaMemcpyAsync(c->batch_dev, h, need * 4, cudaMemcpyHostToDevice, c->stream), "begin_batch") != 0 ||
        be_cuda_call(cudaEventRecord(c->batch_copied, c->stream), "begin_batch") != 0)
        return -1;
    int32_t *d = c->batch_dev;
    c->b.tokens = d;
    c->b.positions = d + nt;
    c->b.seq_of = d + 2 * nt;
    c->b.slots = d + 3 * nt;
    c->b.out_rows = d + 4 * nt;
    c->b.block_table = d + 5 * nt;
    c->b.iota = d + 5 * nt + tbl;
    c->b.adapter_of = d + 6 * nt + tbl;
    c->b.lora_modules = lora ? b->lora_modules : 0;
    c->lora_next.armed = false; /* a failed step may have left one announced */
    c->b.n_tokens = b->n_tokens;
    c->b.n_out = b->n_out;
    c->b.extra_seqs = ns > nt;
    c->b.max_ctx = pow2_at_least(max_ctx, MIN_CTX_BUCKET);
    c->b.max_blocks = pitch;
    return 0;
}

int cuda_rope_init(zse_backend *be, const float *inv_freq, int n_freq, float mscale)
{
    cuda_impl *c = impl_of(be);
    if (n_freq < 1)
        return zse_fail("cuda rope_init: %d frequencies", n_freq);
    be_drop_graphs(c);
    cudaFree(c->inv_freq);
    c->inv_freq = NULL;
    if (be_cuda_call(cudaMalloc((void **)&c->inv_freq, (size_t)n_freq * sizeof(float)), "rope_init") != 0 ||
        be_cuda_call(cudaMemcpy(c->inv_freq, inv_freq, (size_t)n_freq * sizeof(float), cudaMemcpyHostToDevice), "rope_init") != 0)
        return -1;
    c->n_freq = n_freq;
    c->mscale = mscale;
    return 0;
}

/* ---- recorded steps (CUDA graphs) ------------------------------------------------------
 * A decode step of a 7B model is some 700 launches of a few microseconds each: launched one
 * by one they cost as much as the work. A recording replays them as one launch. What may
 * vary between replays lives in device memory (the step's arrays, the cache, the
 * activations); what is baked into a recording is its step_shape, and the pointers of the
 * buffers, which is why any free drops every recording. */

void be_drop_graphs(cuda_impl *c)
{
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        if (c->graphs[i].exec)
            cudaGraphExecDestroy(c->graphs[i].exec); /* one in flight is freed when it ends */
        memset(&c->graphs[i], 0, sizeof c->graphs[i]);
    }
}

static bool same_shape(const step_shape *a, const step_shape *b)
{
    return a->model == b->model && a->kv == b->kv && a->n_tokens == b->n_tokens && a->n_out == b->n_out &&
           a->max_blocks == b->max_blocks && a->max_ctx == b->max_ctx && a->lora_modules == b->lora_modules;
}

/* the slot of this shape, or a fresh one (the least recently used when all are taken) */
static int graph_slot(cuda_impl *c, const step_shape *s, bool *found)
{
    int victim = 0;
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        step_graph *g = &c->graphs[i];
        if (g->live && same_shape(&g->shape, s)) {
            *found = true;
            return i;
        }
        if (!g->live || (c->graphs[victim].live && g->last_used < c->graphs[victim].last_used))
            victim = i;
    }
    step_graph *g = &c->graphs[victim];
    if (g->exec)
        cudaGraphExecDestroy(g->exec);
    memset(g, 0, sizeof *g);
    g->live = true;
    g->shape = *s;
    *found = false;
    return victim;
}

static int launch_graph(cuda_impl *c, step_graph *g)
{
    cudaError_t e = cudaGraphLaunch(g->exec, c->stream);
    if (e != cudaSuccess) {
        be_set_error(c, "cuda: launching a recorded step: %s", cudaGetErrorString(e));
        return zse_fail("%s", c->err);
    }
    c->graph_replays++;
    return ZSE_STEP_DONE;
}

int cuda_step_rows(zse_backend *be, int n_tokens)
{
    cuda_impl *c = impl_of(be);
    if (!c->graphs_on || n_tokens <= GRAPH_EXACT_ROWS || n_tokens > GRAPH_MAX_TOKENS)
        return n_tokens;
    return (n_tokens + GRAPH_ROW_STEP - 1) / GRAPH_ROW_STEP * GRAPH_ROW_STEP;
}

int cuda_step_begin(zse_backend *be, const void *model, const void *kv)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return zse_fail("%s", c->err);
    /* a table of more rows than tokens would move what follows it: such a step runs eagerly */
    if (!c->graphs_on || c->b.n_tokens > GRAPH_MAX_TOKENS || c->b.extra_seqs)
        return ZSE_STEP_ISSUE;
    step_shape s = {model, kv, c->b.n_tokens, c->b.n_out, c->b.max_blocks, c->b.max_ctx, c->b.lora_modules};
    bool found;
    const int i = graph_slot(c, &s, &found);
    step_graph *g = &c->graphs[i];
    g->last_used = ++c->graph_clock;
    if (g->exec)
        return launch_graph(c, g);
    /* the first sight runs eagerly: it also grows every scratch buffer the shape needs, which
     * a recording cannot do */
    if (!found || g->eager_only)
        return ZSE_STEP_ISSUE;
    cudaError_t e = cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) {
        cudaGetLastError();
        g->eager_only = true;
        zse_log(ZSE_LOG_DEBUG, "cuda: cannot record a step (%s); running it eagerly", cudaGetErrorString(e));
        return ZSE_STEP_ISSUE;
    }
    c->recording = i;
    c->record_broken = false;
    return ZSE_STEP_ISSUE;
}

int cuda_step_end(zse_backend *be)
{
    cuda_impl *c = impl_of(be);
    if (c->recording < 0)
        return c->failed ? zse_fail("%s", c->err) : ZSE_STEP_DONE;
    step_graph *g = &c->graphs[c->recording];
    c->recording = -1;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t e = cudaStreamEndCapture(c->stream, &graph);
    if (e == cudaSuccess && !c->record_broken)
        e = cudaGraphInstantiate(&exec, graph, 0);
    if (graph)
        cudaGraphDestroy(graph);
    if (e != cudaSuccess || c->record_broken) {
        zse_log(ZSE_LOG_INFO, "cuda: a step of %d tokens could not be recorded (%s); it runs eagerly",
                g->shape.n_tokens, e != cudaSuccess ? cudaGetErrorString(e) : "an op failed while recording");
        cudaGetLastError();
        if (exec)
            cudaGraphExecDestroy(exec);
        g->eager_only = true;
        return ZSE_STEP_ISSUE;
    }
    g->exec = exec;
    c->graphs_recorded++;
    return launch_graph(c, g);
}
