/* kernels_test --bench: GB/s of each matmul path on Qwen2.5-7B shapes beside the device
 * copy bandwidth, attention timings and a 7B decode step from the kernels alone */
#include "kernels_test.cuh"

struct gemm_probe { void *a, *b, *c; int m, n, k; cublasComputeType_t ct; cudaDataType_t ctype; };
static void run_gemm_probe(void *arg)
{
    gemm_probe *g = (gemm_probe *)arg;
    const float one = 1.f, zero = 0.f;
    const __half hone = __float2half(1.f), hzero = __float2half(0.f);
    const bool h = g->ct == CUBLAS_COMPUTE_16F;
    if (cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, g->m, g->n, g->k, h ? (const void *)&hone : &one,
                     g->a, CUDA_R_16F, g->k, g->b, CUDA_R_16F, g->k, h ? (const void *)&hzero : &zero,
                     g->c, g->ctype, g->m, g->ct, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "gemm probe failed\n");
        exit(2);
    }
}

static void probe_gemm(void)
{
    gemm_probe g;
    g.m = 18944;
    g.n = 512;
    g.k = 3584;
    CU(cudaMalloc(&g.a, (size_t)g.m * g.k * 2));
    CU(cudaMalloc(&g.b, (size_t)g.n * g.k * 2));
    CU(cudaMalloc(&g.c, (size_t)g.m * g.n * 4));
    CU(cudaMemset(g.a, 0x3c, (size_t)g.m * g.k * 2));   /* ~1.0 halves, not zeros */
    CU(cudaMemset(g.b, 0x2c, (size_t)g.n * g.k * 2));
    const struct { cublasComputeType_t ct; cudaDataType_t c; const char *name; } v[] = {
        {CUBLAS_COMPUTE_32F, CUDA_R_32F, "f16xf16->f32 compute32F"},
        {CUBLAS_COMPUTE_32F_FAST_16F, CUDA_R_32F, "f16xf16->f32 compute32F_FAST_16F"},
        {CUBLAS_COMPUTE_32F, CUDA_R_16F, "f16xf16->f16 compute32F"},
        {CUBLAS_COMPUTE_16F, CUDA_R_16F, "f16xf16->f16 compute16F"},
    };
    for (auto &x : v) {
        g.ct = x.ct;
        g.ctype = x.c;
        float ms = time_ms(0, 10, run_gemm_probe, &g);
        printf("BENCH gemm-probe %dx%dx%d %s: %.1f us, %.0f TFLOP/s\n", g.m, g.n, g.k, x.name,
               ms * 1e3, 2.0 * g.m * g.n * g.k / (ms * 1e-3) / 1e12);
    }
    cudaFree(g.a);
    cudaFree(g.b);
    cudaFree(g.c);
}

enum { MM_DISPATCH, MM_GEMV_PASSES, MM_GEMM, MM_MMA };
static const char *mm_path_names[] = {"gemv", "gemv*k", "gemm", "mma"};
struct mm_bench {
    std::vector<packed> *copies;
    size_t which;
    float *x, *y;
    int64_t xp, yp;
    int n;
    int path;
};

static void run_mm(void *arg)
{
    mm_bench *b = (mm_bench *)arg;
    packed &p = (*b->copies)[b->which++ % b->copies->size()];
    switch (b->path) {
    case MM_GEMM:
        LAUNCH(zse_cuda_matmul_gemm(&p.w, b->x, b->xp, b->n, b->y, b->yp, cublas, scratch, scratch_bytes, 0));
        break;
    case MM_MMA:
        LAUNCH(zse_cuda_matmul_mma(&p.w, b->x, b->xp, b->n, b->y, b->yp, scratch, scratch_bytes, 0));
        break;
    case MM_GEMV_PASSES:
        for (int r = 0; r < b->n; r += 8)
            LAUNCH(zse_cuda_matmul_gemv(&p.w, b->x + r * b->xp, b->xp, std::min(8, b->n - r), b->y + r * b->yp, b->yp,
                                        scratch, scratch_bytes, 0));
        break;
    default:
        LAUNCH(zse_cuda_matmul(&p.w, b->x, b->xp, b->n, b->y, b->yp, cublas, scratch, scratch_bytes, 0));
    }
}

struct copy_bench { void *a, *b; size_t n; };
static void run_copy(void *arg)
{
    copy_bench *c = (copy_bench *)arg;
    CU(cudaMemcpyAsync(c->b, c->a, c->n, cudaMemcpyDeviceToDevice, 0));
}

/* attention on a Qwen2.5-7B layer: 28 heads over 4 KV heads of 128, blocks of 16 */
struct att_bench {
    zse_cuda_kv_layer L;
    zse_cuda_attn a;
    float *q, *out;
    int64_t n;
    int ctx;
    void *work;
    size_t wb;
};
static void run_att(void *arg)
{
    att_bench *b = (att_bench *)arg;
    LAUNCH(zse_cuda_attention(&b->L, &b->a, b->q, 28 * 128, b->n, b->ctx, b->out, 28 * 128, b->work, b->wb, 0));
}

static void bench_attention(void)
{
    for (int int8 = 0; int8 < 2; int8++) {
        const int ctx = 4096, bs = 16, kvw = 4 * 128, nb = ctx / bs;
        att_bench b;
        memset(&b, 0, sizeof b);
        b.L.int8 = int8;
        b.L.block_size = bs;
        b.L.n_kv_heads = 4;
        b.L.head_dim = 128;
        b.L.n_slots = (int64_t)nb * bs;
        const size_t es = int8 ? 1 : 2;
        CU(cudaMalloc(&b.L.k, (size_t)b.L.n_slots * kvw * es));
        CU(cudaMalloc(&b.L.v, (size_t)b.L.n_slots * kvw * es));
        CU(cudaMalloc(&b.L.kscale, (size_t)b.L.n_slots * 4 * 4));
        CU(cudaMalloc(&b.L.vscale, (size_t)b.L.n_slots * 4 * 4));
        std::vector<float> kv = rand_vec((size_t)ctx * kvw, -1.f, 1.f);
        std::vector<int32_t> slots((size_t)ctx), table((size_t)nb), pos((size_t)ctx), seq((size_t)ctx, 0);
        for (int i = 0; i < nb; i++)
            table[(size_t)i] = nb - 1 - i;
        for (int p = 0; p < ctx; p++) {
            slots[(size_t)p] = table[(size_t)(p / bs)] * bs + p % bs;
            pos[(size_t)p] = p;
        }
        float *dkv = dev_floats(kv);
        int32_t *dslots, *dtab, *dpos, *dseq;
        CU(cudaMalloc(&dslots, (size_t)ctx * 4));
        CU(cudaMalloc(&dtab, (size_t)nb * 4));
        CU(cudaMalloc(&dpos, (size_t)ctx * 4));
        CU(cudaMalloc(&dseq, (size_t)ctx * 4));
        CU(cudaMemcpy(dslots, slots.data(), (size_t)ctx * 4, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dtab, table.data(), (size_t)nb * 4, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dpos, pos.data(), (size_t)ctx * 4, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dseq, seq.data(), (size_t)ctx * 4, cudaMemcpyHostToDevice));
        LAUNCH(zse_cuda_kv_store(&b.L, dkv, kvw, dkv, kvw, dslots, ctx, 0));
        b.a.n_heads = 28;
        b.a.n_kv_heads = 4;
        b.a.head_dim = 128;
        b.a.scale = 1.f / sqrtf(128.f);
        b.a.window = 0;
        b.a.seq_of = dseq;
        b.a.block_table = dtab;
        b.a.max_blocks = nb;
        std::vector<float> q = rand_vec((size_t)512 * 28 * 128, -1.f, 1.f);
        b.q = dev_floats(q);
        CU(cudaMalloc(&b.out, q.size() * 4));
        b.wb = zse_cuda_attention_work_bytes(512, 28, 128);
        CU(cudaMalloc(&b.work, b.wb));
        /* decode: the last position sees all 4096 keys */
        b.a.pos = dpos + ctx - 1;
        b.n = 1;
        b.ctx = ctx;
        float ms = time_ms(0, 20, run_att, &b);
        const double kv_bytes = (double)ctx * kvw * 2 * es;
        printf("BENCH attention decode %s ctx=%d: %.1f us, KV read %.0f GB/s\n", int8 ? "int8" : "f16",
               ctx, ms * 1e3, kv_bytes / (ms * 1e-3) / 1e9);
        /* prefill: 512 tokens of one sequence, causal */
        b.a.pos = dpos;
        b.n = 512;
        b.ctx = 512;
        ms = time_ms(0, 10, run_att, &b);
        printf("BENCH attention prefill %s 512 tokens: %.1f us\n", int8 ? "int8" : "f16", ms * 1e3);
        cudaFree(b.L.k); cudaFree(b.L.v); cudaFree(b.L.kscale); cudaFree(b.L.vscale);
        cudaFree(dkv); cudaFree(dslots); cudaFree(dtab); cudaFree(dpos); cudaFree(dseq);
        cudaFree(b.q); cudaFree(b.out); cudaFree(b.work);
    }
}

/* ---- a Qwen2.5-7B-shaped decode step from the kernels alone ----------------------------
 * 28 layers of the real op sequence at batch 1 with int4 (g128) weights filled on the
 * device (random codes, scales 0.01): what the backend can do per token before any engine,
 * sampling or host overhead. Timed eagerly and as one replayed CUDA graph. */
__global__ void fill_random_kernel(uint8_t *p, size_t n, uint32_t seed)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = (uint8_t)h;
    }
}
__global__ void fill_half_kernel(__half *p, size_t n, float v)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2half(v);
}

static zse_cuda_weight device_q4(int64_t rows, int64_t cols, std::vector<void *> &owned)
{
    zse_cuda_weight w;
    memset(&w, 0, sizeof w);
    w.scheme = Q4;
    w.rows = rows;
    w.cols = cols;
    w.group_size = 128;
    w.row_bytes = cols / 2;
    w.groups = cols / 128;
    const size_t qs = (size_t)(rows * w.row_bytes), sc = (size_t)(rows * w.groups);
    uint8_t *d;
    CU(cudaMalloc(&d, qs + 4 * sc + 512));
    owned.push_back(d);
    fill_random_kernel<<<1024, 256>>>(d, qs, (uint32_t)rows * 31u + (uint32_t)cols);
    __half *s = (__half *)(d + ((qs + 255) & ~(size_t)255));
    fill_half_kernel<<<256, 256>>>(s, 2 * sc, 0.01f);
    w.qs = d;
    w.scales = s;
    w.mins = s + sc;
    return w;
}

struct step_bench {
    int n_layers;
    std::vector<zse_cuda_weight> wq, wk, wv, wo, wg, wu, wd;
    zse_cuda_weight head;
    float *x, *xn, *q, *k, *v, *att, *o, *g, *u, *logits, *normw, *bq, *bk, *bv, *inv_freq;
    int32_t *pos, *slot;
    zse_cuda_kv_layer kv[28];
    zse_cuda_attn a;
    void *work;
    size_t wb;
    cudaStream_t st;
};

static void run_step(void *arg)
{
    step_bench *b = (step_bench *)arg;
    const int64_t H = 3584, F = 18944;
    for (int l = 0; l < b->n_layers; l++) {
        LAUNCH(zse_cuda_rmsnorm(b->x, H, b->normw, 1e-6f, 1, H, b->xn, H, b->st));
        LAUNCH(zse_cuda_matmul(&b->wq[(size_t)l], b->xn, H, 1, b->q, H, cublas, scratch, scratch_bytes, b->st));
        LAUNCH(zse_cuda_matmul(&b->wk[(size_t)l], b->xn, H, 1, b->k, 512, cublas, scratch, scratch_bytes, b->st));
        LAUNCH(zse_cuda_matmul(&b->wv[(size_t)l], b->xn, H, 1, b->v, 512, cublas, scratch, scratch_bytes, b->st));
        LAUNCH(zse_cuda_add_bias(b->q, H, b->bq, 1, H, b->st));
        LAUNCH(zse_cuda_add_bias(b->k, 512, b->bk, 1, 512, b->st));
        LAUNCH(zse_cuda_add_bias(b->v, 512, b->bv, 1, 512, b->st));
        LAUNCH(zse_cuda_rope(b->q, H, 1, 28, 128, b->pos, b->inv_freq, 1.f, b->st));
        LAUNCH(zse_cuda_rope(b->k, 512, 1, 4, 128, b->pos, b->inv_freq, 1.f, b->st));
        LAUNCH(zse_cuda_kv_store(&b->kv[l], b->k, 512, b->v, 512, b->slot, 1, b->st));
        LAUNCH(zse_cuda_attention(&b->kv[l], &b->a, b->q, H, 1, 256, b->att, H, b->work, b->wb, b->st));
        LAUNCH(zse_cuda_matmul(&b->wo[(size_t)l], b->att, H, 1, b->o, H, cublas, scratch, scratch_bytes, b->st));
        LAUNCH(zse_cuda_add(b->x, H, b->o, H, 1, H, b->st));
        LAUNCH(zse_cuda_rmsnorm(b->x, H, b->normw, 1e-6f, 1, H, b->xn, H, b->st));
        LAUNCH(zse_cuda_matmul(&b->wg[(size_t)l], b->xn, H, 1, b->g, F, cublas, scratch, scratch_bytes, b->st));
        LAUNCH(zse_cuda_matmul(&b->wu[(size_t)l], b->xn, H, 1, b->u, F, cublas, scratch, scratch_bytes, b->st));
        LAUNCH(zse_cuda_silu_mul(b->g, F, b->u, F, 1, F, b->g, F, b->st));
        LAUNCH(zse_cuda_matmul(&b->wd[(size_t)l], b->g, F, 1, b->o, H, cublas, scratch, scratch_bytes, b->st));
        LAUNCH(zse_cuda_add(b->x, H, b->o, H, 1, H, b->st));
    }
    LAUNCH(zse_cuda_rmsnorm(b->x, H, b->normw, 1e-6f, 1, H, b->xn, H, b->st));
    LAUNCH(zse_cuda_matmul(&b->head, b->xn, H, 1, b->logits, 152064, cublas, scratch, scratch_bytes, b->st));
}

static void bench_decode_step(void)
{
    step_bench b;
    b.n_layers = 28;
    std::vector<void *> owned;
    const int64_t H = 3584, F = 18944;
    size_t bytes = 0;
    for (int l = 0; l < b.n_layers; l++) {
        b.wq.push_back(device_q4(H, H, owned));
        b.wk.push_back(device_q4(512, H, owned));
        b.wv.push_back(device_q4(512, H, owned));
        b.wo.push_back(device_q4(H, H, owned));
        b.wg.push_back(device_q4(F, H, owned));
        b.wu.push_back(device_q4(F, H, owned));
        b.wd.push_back(device_q4(H, F, owned));
    }
    b.head = device_q4(152064, H, owned);
    const double per_elem = 0.5 + 4.0 / 128;   /* nibbles + f16 scale and min per group */
    bytes = (size_t)((28.0 * (2 * H * H + 2 * 512 * H + 3 * F * H) + 152064.0 * H) * per_elem);
    std::vector<float> ones((size_t)F, 1.f), small((size_t)F, 0.01f), inv(64);
    for (int i = 0; i < 64; i++)
        inv[(size_t)i] = (float)pow(1e6, -i / 64.0);
    std::vector<float> x0 = rand_vec((size_t)H, -1.f, 1.f);
    b.x = dev_floats(x0);
    b.normw = dev_floats(ones);
    b.bq = dev_floats(small);
    b.bk = dev_floats(small);
    b.bv = dev_floats(small);
    b.inv_freq = dev_floats(inv);
    for (float **p : {&b.xn, &b.q, &b.att, &b.o})
        CU(cudaMalloc(p, (size_t)H * 4));
    for (float **p : {&b.k, &b.v})
        CU(cudaMalloc(p, 512 * 4));
    for (float **p : {&b.g, &b.u})
        CU(cudaMalloc(p, (size_t)F * 4));
    CU(cudaMalloc(&b.logits, (size_t)152064 * 4));
    /* a 256-token context in 16 blocks per layer; this token at position 255 */
    std::vector<int32_t> table(16), posv = {255}, slotv = {15 * 16 + 15}, seqv = {0};
    for (int i = 0; i < 16; i++)
        table[(size_t)i] = i;
    int32_t *dtab, *dseq;
    CU(cudaMalloc(&dtab, 64));
    CU(cudaMalloc(&dseq, 4));
    CU(cudaMalloc(&b.pos, 4));
    CU(cudaMalloc(&b.slot, 4));
    CU(cudaMemcpy(dtab, table.data(), 64, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dseq, seqv.data(), 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(b.pos, posv.data(), 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(b.slot, slotv.data(), 4, cudaMemcpyHostToDevice));
    for (int l = 0; l < b.n_layers; l++) {
        zse_cuda_kv_layer &L = b.kv[l];
        memset(&L, 0, sizeof L);
        L.block_size = 16;
        L.n_kv_heads = 4;
        L.head_dim = 128;
        L.n_slots = 256;
        CU(cudaMalloc(&L.k, 256 * 512 * 2));
        CU(cudaMalloc(&L.v, 256 * 512 * 2));
        fill_half_kernel<<<64, 256>>>((__half *)L.k, 256 * 512, 0.02f);
        fill_half_kernel<<<64, 256>>>((__half *)L.v, 256 * 512, 0.03f);
    }
    b.a.n_heads = 28;
    b.a.n_kv_heads = 4;
    b.a.head_dim = 128;
    b.a.scale = 1.f / sqrtf(128.f);
    b.a.window = 0;
    b.a.seq_of = dseq;
    b.a.pos = b.pos;
    b.a.block_table = dtab;
    b.a.max_blocks = 16;
    b.wb = zse_cuda_attention_work_bytes(1, 28, 128);
    CU(cudaMalloc(&b.work, b.wb));
    CU(cudaStreamCreateWithFlags(&b.st, cudaStreamNonBlocking));
    CU(cudaDeviceSynchronize());
    if (cublasSetStream(cublas, b.st) != CUBLAS_STATUS_SUCCESS)
        exit(2);

    /* eager */
    cudaEvent_t e0, e1;
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    run_step(&b);
    std::vector<float> t;
    for (int i = 0; i < 10; i++) {
        CU(cudaEventRecord(e0, b.st));
        run_step(&b);
        CU(cudaEventRecord(e1, b.st));
        CU(cudaEventSynchronize(e1));
        float ms;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    const float eager = t[t.size() / 2];
    /* one graph per step */
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CU(cudaStreamBeginCapture(b.st, cudaStreamCaptureModeThreadLocal));
    run_step(&b);
    CU(cudaStreamEndCapture(b.st, &graph));
    CU(cudaGraphInstantiate(&exec, graph, 0));
    CU(cudaGraphLaunch(exec, b.st));
    t.clear();
    for (int i = 0; i < 10; i++) {
        CU(cudaEventRecord(e0, b.st));
        CU(cudaGraphLaunch(exec, b.st));
        CU(cudaEventRecord(e1, b.st));
        CU(cudaEventSynchronize(e1));
        float ms;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    const float graphed = t[t.size() / 2];
    printf("BENCH decode-step qwen2.5-7b-shape int4-g128 bs1 ctx256: weights %.2f GB, eager %.3f ms (%.0f tok/s), "
           "graph %.3f ms (%.0f tok/s), roofline at 3.0 TB/s %.0f tok/s\n",
           bytes / 1e9, eager, 1e3 / eager, graphed, 1e3 / graphed, 3.0e12 / bytes);
    cublasSetStream(cublas, 0);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    for (void *p : owned)
        cudaFree(p);
    for (int l = 0; l < b.n_layers; l++) {
        cudaFree(b.kv[l].k);
        cudaFree(b.kv[l].v);
    }
    for (float *p : {b.x, b.xn, b.q, b.k, b.v, b.att, b.o, b.g, b.u, b.logits, b.normw, b.bq, b.bk, b.bv, b.inv_freq})
        cudaFree(p);
    cudaFree(dtab);
    cudaFree(dseq);
    cudaFree(b.pos);
    cudaFree(b.slot);
    cudaFree(b.work);
    cudaStreamDestroy(b.st);
}

/* `--bench NAME...` measures only the matmuls of the named schemes (int4, f16, ...) and
 * skips the copy-free probes: a quick loop while a kernel is being tuned */
static bool bench_wants(int scheme, int argc, char **argv)
{
    if (argc <= 2)
        return true;
    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], scheme_names[scheme]) == 0)
            return true;
    return false;
}

/* ZSE_BENCH_SHAPES="18944x3584,..." narrows the matmul bench to those shapes and
 * ZSE_BENCH_NS="1,8,64" sets its batch sizes (1..512): a profiler run on one shape */
static bool env_lists(const char *var, const char *item)
{
    const char *v = getenv(var);
    if (!v || !*v)
        return true;
    const size_t n = strlen(item);
    for (const char *p = v; (p = strstr(p, item)) != NULL; p += n)
        if ((p == v || p[-1] == ',') && (p[n] == ',' || p[n] == 0))
            return true;
    return false;
}

void bench(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[2], "lora") == 0) { /* `--bench lora`: the LoRA launches alone */
        bench_lora();
        bench_lora_fold();
        return;
    }
    /* the ceiling: a device copy, counting bytes read plus written */
    copy_bench cb;
    cb.n = (size_t)2 << 30;
    CU(cudaMalloc(&cb.a, cb.n));
    CU(cudaMalloc(&cb.b, cb.n));
    CU(cudaMemset(cb.a, 1, cb.n));
    float ms = time_ms(0, 10, run_copy, &cb);
    const double copy_gbs = 2.0 * cb.n / (ms * 1e-3) / 1e9;
    printf("BENCH d2d-copy bytes=%zu ms=%.3f GB/s=%.0f\n", cb.n, ms, copy_gbs);
    cudaFree(cb.a);
    cudaFree(cb.b);

    /* Qwen2.5-7B shapes: qkv-ish, gate/up, down, lm_head */
    const int64_t shapes[][2] = {{3584, 3584}, {18944, 3584}, {3584, 18944}, {152064, 3584}};
    const int schemes[] = {Q4, Q4S, NF4, Q8, F16, BF16};
    if (argc <= 2) {
        probe_gemm();
        bench_attention();
        bench_decode_step();
        bench_lora();
        bench_lora_fold();
    }
    printf("%-6s %-14s %-5s %-6s %9s %9s %6s %9s %9s %6s\n", "scheme", "shape", "n", "path", "us",
           "GB/s", "%copy", "us-strm", "GB/s-str", "%copy");
    for (int s : schemes) {
        if (!bench_wants(s, argc, argv))
            continue;
        for (auto &sh : shapes) {
            const bool big = sh[0] * sh[1] > 200000000;
            char shape[32];
            snprintf(shape, sizeof shape, "%lldx%lld", (long long)sh[0], (long long)sh[1]);
            if (!env_lists("ZSE_BENCH_SHAPES", shape))
                continue;
            packed proto;
            pack_random(proto, s, sh[0], sh[1], 128);
            /* rotate through copies so the 50 MB L2 never holds the weight */
            const size_t bytes = packed_bytes(proto);
            size_t ncopies = std::max<size_t>(1, std::min<size_t>(8, ((size_t)400 << 20) / bytes + 1));
            std::vector<packed> copies(ncopies, proto);
            for (size_t i = 0; i < ncopies; i++) {
                CU(cudaMalloc(&copies[i].dev, bytes));
                CU(cudaMemcpy(copies[i].dev, proto.dev, bytes, cudaMemcpyDeviceToDevice));
                int64_t d = (uint8_t *)copies[i].dev - (uint8_t *)proto.dev;
                copies[i].w.qs = (uint8_t *)proto.w.qs + d;
                copies[i].w.scales = proto.w.scales ? (const uint8_t *)proto.w.scales + d : NULL;
                copies[i].w.mins = proto.w.mins ? (const uint8_t *)proto.w.mins + d : NULL;
            }
            const int nmax = 512;
            const int64_t xp = pitch_of(sh[1]), yp = pitch_of(sh[0]);
            std::vector<float> xh = rand_vec((size_t)(nmax * xp));
            float *dx = dev_floats(xh), *dy;
            CU(cudaMalloc(&dy, (size_t)(nmax * yp) * 4));
            std::vector<int> ns = {1, 2, 4, 8, 16, 32, 64, 512};
            if (big || s == NF4 || s == Q4S || s == BF16)
                ns = {1, 8, 64};
            if (getenv("ZSE_BENCH_NS") && *getenv("ZSE_BENCH_NS")) {
                ns.clear();
                for (const char *p = getenv("ZSE_BENCH_NS"); *p; p += *p == ',')
                    ns.push_back((int)strtol(p, (char **)&p, 10));
            }
            for (int n : ns) {
                if (n < 1 || n > 512)
                    continue;
                std::vector<int> paths = {MM_DISPATCH};
                const bool mma = s == Q4 || s == Q4S;
                if (n > 8)
                    paths = n <= 64 ? std::vector<int>{MM_GEMV_PASSES, MM_GEMM} : std::vector<int>{MM_GEMM};
                /* at 2..8 rows the dp4a GEMV alone (gemv*k is one pass) against tensor cores */
                if (n > 1 && n <= 8 && mma)
                    paths = {MM_DISPATCH, MM_GEMV_PASSES};
                if (n > 1 && mma)
                    paths.push_back(MM_MMA);
                for (int path : paths) {
                    mm_bench mb = {&copies, 0, dx, dy, xp, yp, n, path};
                    const float t = time_ms(0, 20, run_mm, &mb), ts = time_stream_ms(20, run_mm, &mb);
                    const double gbs = bytes / (t * 1e-3) / 1e9;
                    const double gbs_s = ts > 0 ? bytes / (ts * 1e-3) / 1e9 : 0;
                    printf("%-6s %-14s %-5d %-6s %9.1f %9.0f %5.0f%% %9.1f %9.0f %5.0f%%\n", scheme_names[s], shape, n,
                           mm_path_names[path], t * 1e3, gbs, 100.0 * gbs / copy_gbs, ts * 1e3, gbs_s,
                           100.0 * gbs_s / copy_gbs);
                }
            }
            cudaFree(dx);
            cudaFree(dy);
            for (auto &c : copies)
                cudaFree(c.dev);
            cudaFree(proto.dev);
        }
    }
}
