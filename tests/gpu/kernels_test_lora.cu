/* kernels_test: LoRA deltas (lora.cu's separate launch and the delta folded into the
 * one-row GEMV) against a host reference, and --bench lora */
#include "kernels_test.cuh"

/* ---- LoRA: each row's adapter delta (lora.cu) ---- */

/* a pool of slots built on the host: slot s adapts the modules of `mods` with rank ranks[s]
 * (0: an empty slot) */
struct lora_pool_h {
    int n_slots, n_layers;
    uint64_t slot_bytes;
    int64_t in[7], out[7];
    std::vector<uint8_t> bytes;
};

static void lora_fill(lora_pool_h &p, int slot, int layer, int module, int rank, float scale, uint64_t *at)
{
    zse_cuda_lora_entry e = {rank, scale, (int64_t)*at, 0};
    *at = round_up(*at + (uint64_t)rank * p.in[module] * 2, 64);
    e.bt = (int64_t)*at;
    *at = round_up(*at + (uint64_t)rank * p.out[module] * 2, 64);
    uint8_t *base = p.bytes.data() + (size_t)slot * p.slot_bytes;
    memcpy(base + ((size_t)layer * 7 + module) * sizeof e, &e, sizeof e);
    uint16_t *a = (uint16_t *)(base + e.a), *bt = (uint16_t *)(base + e.bt);
    for (int64_t i = 0; i < rank * p.in[module]; i++)
        a[i] = f2h(rnd_uniform(-0.5f, 0.5f));
    for (int64_t i = 0; i < rank * p.out[module]; i++)
        bt[i] = f2h(rnd_uniform(-0.5f, 0.5f));
}

/* lora_apply's description of a host-built pool copied to `slots` (device), with fresh zeroed
 * counters (the caller frees l.sync); the projections are the caller's to fill in */
static zse_cuda_lora lora_desc(const lora_pool_h &p, const uint8_t *slots, int layer, int max_rank)
{
    zse_cuda_lora l = {};
    CU(cudaMalloc(&l.sync, 16));
    CU(cudaMemset(l.sync, 0, 16));
    l.slots = slots;
    l.slot_bytes = p.slot_bytes;
    l.n_slots = p.n_slots;
    l.n_layers = p.n_layers;
    l.layer = layer;
    l.max_rank = max_rank;
    return l;
}

static void check_lora(int n, int64_t in, int64_t out, int max_rank)
{
    lora_pool_h p;
    p.n_slots = 3;
    p.n_layers = 2;
    for (int m = 0; m < 7; m++) {
        p.in[m] = in;
        p.out[m] = out + m; /* widths that are and are not multiples of 8 */
    }
    p.slot_bytes = round_up(2 * 7 * sizeof(zse_cuda_lora_entry), 64) +
                   3 * (round_up((uint64_t)max_rank * in * 2, 64) + round_up((uint64_t)max_rank * (out + 6) * 2, 64));
    p.bytes.assign((size_t)p.n_slots * p.slot_bytes, 0);
    const int ranks[3][3] = {{max_rank, 3, 0}, {1, max_rank, 7}, {0, 0, 0}}; /* slot x (Q, K, V) of layer 1 */
    for (int s = 0; s < 2; s++) {
        uint64_t at = round_up(2 * 7 * sizeof(zse_cuda_lora_entry), 64);
        for (int m = 0; m < 3; m++)
            if (ranks[s][m])
                lora_fill(p, s, 1, m, ranks[s][m], 0.25f + s, &at);
    }
    uint8_t *slots;
    CU(cudaMalloc(&slots, p.bytes.size()));
    CU(cudaMemcpy(slots, p.bytes.data(), p.bytes.size(), cudaMemcpyHostToDevice));
    /* rows: slots 0, 1, none, out of range, 2 (empty) in turn */
    std::vector<int32_t> of(n);
    const int32_t pattern[5] = {0, 1, -1, 9, 2};
    for (int t = 0; t < n; t++)
        of[t] = pattern[(t * 7 + 1) % 5];
    int32_t *d_of;
    CU(cudaMalloc(&d_of, n * 4));
    CU(cudaMemcpy(d_of, of.data(), n * 4, cudaMemcpyHostToDevice));
    const int64_t xp = pitch_of(in);
    std::vector<float> x = rand_vec((size_t)n * xp);
    float *d_x = dev_floats(x);
    /* max_rank: the largest rank of any slot below, the shrink's grid */
    zse_cuda_lora l = lora_desc(p, slots, 1, max_rank > 7 ? max_rank : 7);
    l.n_outs = 3;
    std::vector<std::vector<float>> y0(3);
    for (int i = 0; i < 3; i++) {
        l.module[i] = i;
        l.in[i] = in;
        l.out[i] = p.out[i];
        l.ypitch[i] = pitch_of(p.out[i]);
        y0[i] = rand_vec((size_t)n * l.ypitch[i]);
        l.y[i] = dev_floats(y0[i]);
    }
    LAUNCH(zse_cuda_lora_apply(&l, d_of, d_x, xp, n, (float *)scratch, scratch_bytes, 0));
    unsigned counters[3];
    CU(cudaMemcpy(counters, l.sync, sizeof counters, cudaMemcpyDeviceToHost));
    CHECK(counters[0] == 0 && counters[1] == 0 && counters[2] == 0, "lora n=%d: the launch left its counters at %u %u %u",
          n, counters[0], counters[1], counters[2]);
    bool untouched = true;
    double worst = 0;
    for (int i = 0; i < 3; i++) {
        std::vector<float> y = host_floats(l.y[i], y0[i].size());
        for (int t = 0; t < n; t++) {
            const int s = of[t];
            const zse_cuda_lora_entry *e = s >= 0 && s < 3
                ? (const zse_cuda_lora_entry *)(p.bytes.data() + (size_t)s * p.slot_bytes) + 7 + i : NULL;
            const float *yr = &y[(size_t)t * l.ypitch[i]], *y0r = &y0[i][(size_t)t * l.ypitch[i]];
            if (!e || e->rank == 0) {
                untouched = untouched && memcmp(yr, y0r, (size_t)l.out[i] * 4) == 0;
                continue;
            }
            const uint8_t *base = p.bytes.data() + (size_t)s * p.slot_bytes;
            const uint16_t *a = (const uint16_t *)(base + e->a), *bt = (const uint16_t *)(base + e->bt);
            std::vector<double> u(e->rank);
            for (int j = 0; j < e->rank; j++) {
                u[j] = 0;
                for (int64_t k = 0; k < in; k++)
                    u[j] += (double)h2f(a[j * in + k]) * x[(size_t)t * xp + k];
            }
            double scale = 0;
            for (int64_t o = 0; o < l.out[i]; o++) {
                double d = 0;
                for (int j = 0; j < e->rank; j++)
                    d += u[j] * h2f(bt[j * l.out[i] + o]);
                scale = fmax(scale, fabs(e->scale * d));
                worst = fmax(worst, fabs(yr[o] - (y0r[o] + e->scale * d)) / (1 + fabs(e->scale * d)));
            }
        }
        CU(cudaFree(l.y[i]));
    }
    CHECK(untouched, "lora n=%d: rows without an adapter (or a projection it leaves alone) changed", n);
    CHECK(worst < 1e-4, "lora n=%d in=%lld out=%lld rank %d: error %.3g", n, (long long)in, (long long)out, max_rank, worst);
    /* bad arguments are refused */
    zse_cuda_lora bad = l;
    bad.layer = 2;
    CHECK(zse_cuda_lora_apply(&bad, d_of, d_x, xp, n, (float *)scratch, scratch_bytes, 0) == -1, "layer out of range");
    bad = l;
    bad.sync = NULL;
    CHECK(zse_cuda_lora_apply(&bad, d_of, d_x, xp, n, (float *)scratch, scratch_bytes, 0) == -1, "no counters");
    CU(cudaFree(l.sync));
    CU(cudaFree(slots));
    CU(cudaFree(d_of));
    CU(cudaFree(d_x));
}

/* A LoRA delta folded into the 4-bit GEMV's launch (zse_cuda_matmul_multi_lora at one row)
 * against the same matmul followed by zse_cuda_lora_apply (checked against the host above).
 * count weights of `rows` over x of `in`; weight k is projection mods[k] (-1: no LoRA for it);
 * the row's adapter is slot `slot` (-1 or past the pool: none); ranks[k] the adapter's rank on
 * weight k (0: the adapter leaves it alone). want_fold: whether the delta must fold. */
static void check_lora_fold(int count, int64_t in, const int64_t *rows, const int *mods, const int *ranks,
                            int slot, bool accumulate, int n, bool want_fold)
{
    lora_pool_h p;
    p.n_slots = 2;
    p.n_layers = 2;
    for (int m = 0; m < 7; m++)
        p.in[m] = in, p.out[m] = 8;
    uint64_t need = round_up(2 * 7 * sizeof(zse_cuda_lora_entry), 64);
    for (int k = 0; k < count; k++)
        if (mods[k] >= 0) {
            p.out[mods[k]] = rows[k];
            need += round_up((uint64_t)ranks[k] * in * 2, 64) + round_up((uint64_t)ranks[k] * rows[k] * 2, 64);
        }
    p.slot_bytes = need;
    p.bytes.assign((size_t)p.n_slots * p.slot_bytes, 0);
    int max_rank = 1;
    for (int s = 0; s < p.n_slots; s++) { /* both slots filled; the row uses one */
        uint64_t at = round_up(2 * 7 * sizeof(zse_cuda_lora_entry), 64);
        for (int k = 0; k < count; k++)
            if (mods[k] >= 0 && ranks[k] > 0) {
                lora_fill(p, s, 1, mods[k], ranks[k], 0.5f + s, &at);
                max_rank = ranks[k] > max_rank ? ranks[k] : max_rank;
            }
    }
    uint8_t *slots;
    CU(cudaMalloc(&slots, p.bytes.size()));
    CU(cudaMemcpy(slots, p.bytes.data(), p.bytes.size(), cudaMemcpyHostToDevice));
    std::vector<int32_t> of((size_t)n, slot);
    int32_t *d_of;
    CU(cudaMalloc(&d_of, (size_t)n * 4));
    CU(cudaMemcpy(d_of, of.data(), (size_t)n * 4, cudaMemcpyHostToDevice));
    const int64_t xp = pitch_of(in);
    std::vector<float> x = rand_vec((size_t)(n * xp), -1.f, 1.f);
    float *dx = dev_floats(x);
    packed w[3];
    zse_cuda_multi mm;
    memset(&mm, 0, sizeof mm);
    mm.count = count;
    mm.accumulate = accumulate;
    zse_cuda_lora l = lora_desc(p, slots, 1, max_rank);
    std::vector<float> y0[3], bias[3];
    float *y_ref[3], *y_fold[3], *db[3];
    for (int k = 0; k < count; k++) {
        pack_random(w[k], Q4, rows[k], in, 128);
        const int64_t yp = pitch_of(rows[k]);
        y0[k] = rand_vec((size_t)(n * yp));
        bias[k] = rand_vec((size_t)rows[k], -1.f, 1.f);
        y_ref[k] = dev_floats(y0[k]);
        y_fold[k] = dev_floats(y0[k]);
        db[k] = dev_floats(bias[k]);
        mm.w[k] = w[k].w;
        mm.ypitch[k] = yp;
        mm.bias[k] = k == 0 ? db[k] : NULL; /* q's bias (Qwen2) */
        if (mods[k] >= 0) {
            const int i = l.n_outs++;
            l.module[i] = mods[k];
            l.in[i] = in;
            l.out[i] = rows[k];
            l.ypitch[i] = yp;
        }
    }
    const size_t lbytes = zse_cuda_matmul_lora_scratch_bytes(n, l.n_outs, in);
    float *lscratch;
    CU(cudaMalloc(&lscratch, lbytes));
    /* the reference: the matmul, then the delta in its own launch */
    for (int k = 0, i = 0; k < count; k++) {
        mm.y[k] = y_ref[k];
        if (mods[k] >= 0)
            l.y[i++] = y_ref[k];
    }
    LAUNCH(zse_cuda_matmul_multi(&mm, dx, xp, n, cublas, scratch, scratch_bytes, 0));
    LAUNCH(zse_cuda_lora_apply(&l, d_of, dx, xp, n, lscratch, lbytes, 0));
    /* folded, twice over the same y buffers' copies: the second launch finds the counters the
     * first one left (zero) */
    int folded = -1;
    for (int k = 0, i = 0; k < count; k++) {
        mm.y[k] = y_fold[k];
        if (mods[k] >= 0)
            l.y[i++] = y_fold[k];
    }
    for (int rep = 0; rep < 2; rep++) {
        for (int k = 0; k < count; k++)
            CU(cudaMemcpy(y_fold[k], y0[k].data(), y0[k].size() * 4, cudaMemcpyHostToDevice));
        LAUNCH(zse_cuda_matmul_multi_lora(&mm, dx, xp, n, cublas, scratch, scratch_bytes, &l, d_of, lscratch, lbytes,
                                          &folded, 0));
    }
    CHECK(folded == (int)want_fold, "lora fold count=%d in=%lld n=%d: folded %d, expected %d", count, (long long)in, n,
          folded, (int)want_fold);
    unsigned counters[3];
    CU(cudaMemcpy(counters, l.sync, sizeof counters, cudaMemcpyDeviceToHost));
    CHECK(counters[0] == 0 && counters[1] == 0 && counters[2] == 0,
          "lora fold: the launch left its counters at %u %u %u", counters[0], counters[1], counters[2]);
    double worst = 0, moved = 0;
    for (int k = 0; k < count; k++) {
        const size_t len = y0[k].size();
        std::vector<float> a = host_floats(y_ref[k], len), b = host_floats(y_fold[k], len);
        for (int t = 0; t < n; t++)
            for (int64_t r = 0; r < rows[k]; r++) {
                const size_t i = (size_t)(t * mm.ypitch[k] + r);
                if (!std::isfinite(b[i]))
                    worst = INFINITY;
                worst = fmax(worst, fabs((double)a[i] - b[i]) / (1 + fabs((double)a[i])));
            }
        /* the delta is there at all (else a fold that dropped it would pass against a
         * reference that had none either): compare with the plain matmul */
        CU(cudaMemcpy(y_ref[k], y0[k].data(), len * 4, cudaMemcpyHostToDevice));
    }
    for (int k = 0; k < count; k++)
        mm.y[k] = y_ref[k];
    LAUNCH(zse_cuda_matmul_multi(&mm, dx, xp, n, cublas, scratch, scratch_bytes, 0));
    bool adapted = false;
    for (int k = 0; k < count; k++) {
        const size_t len = y0[k].size();
        std::vector<float> a = host_floats(y_ref[k], len), b = host_floats(y_fold[k], len);
        double d = 0;
        for (int64_t r = 0; r < rows[k]; r++)
            d = fmax(d, fabs((double)a[(size_t)r] - b[(size_t)r]) / (1 + fabs((double)a[(size_t)r])));
        const bool has = mods[k] >= 0 && ranks[k] > 0 && slot >= 0 && slot < p.n_slots;
        adapted = adapted || has;
        if (has)
            moved = fmax(moved, d);
        else
            CHECK(d < 1e-6, "lora fold count=%d: weight %d without a delta changed by %.3g", count, k, d);
    }
    CHECK(worst < 1e-4, "lora fold count=%d in=%lld n=%d rank %d acc=%d: error %.3g against the separate launch", count,
          (long long)in, n, max_rank, (int)accumulate, worst);
    CHECK(!adapted || moved > 1e-3, "lora fold count=%d: the adapted outputs equal the plain matmul's", count);
    /* a projection that is not one of the matmul's outputs is refused */
    zse_cuda_lora bad = l;
    bad.y[0] = y_ref[count - 1] + 4;
    CHECK(zse_cuda_matmul_multi_lora(&mm, dx, xp, n, cublas, scratch, scratch_bytes, &bad, d_of, lscratch, lbytes,
                                     NULL, 0) == -1, "lora fold: a delta for another output is refused");
    for (int k = 0; k < count; k++) {
        cudaFree(y_ref[k]);
        cudaFree(y_fold[k]);
        cudaFree(db[k]);
        cudaFree(w[k].dev);
    }
    cudaFree(lscratch);
    cudaFree(l.sync);
    cudaFree(slots);
    cudaFree(d_of);
    cudaFree(dx);
}

/* Qwen2.5-7B's projection shapes (q, k, v, o, gate, up, down) and a pool of `slots` slots,
 * each a rank-`rank` adapter on all seven of layer 0 (the benchmarks' adapters) */
static const int64_t q7_in[7] = {3584, 3584, 3584, 3584, 3584, 3584, 18944};
static const int64_t q7_out[7] = {3584, 512, 512, 3584, 18944, 18944, 3584};

static void lora_pool_7b(lora_pool_h &p, int slots, int64_t rank)
{
    p.n_slots = slots;
    p.n_layers = 1;
    uint64_t need = round_up(7 * sizeof(zse_cuda_lora_entry), 64);
    for (int m = 0; m < 7; m++) {
        p.in[m] = q7_in[m];
        p.out[m] = q7_out[m];
        need += round_up((uint64_t)rank * q7_in[m] * 2, 64) + round_up((uint64_t)rank * q7_out[m] * 2, 64);
    }
    p.slot_bytes = need;
    p.bytes.assign((size_t)slots * need, 0);
    for (int s = 0; s < slots; s++) {
        uint64_t at = round_up(7 * sizeof(zse_cuda_lora_entry), 64);
        for (int m = 0; m < 7; m++)
            lora_fill(p, s, 0, m, (int)rank, 2.f, &at);
    }
}

/* The adapter delta's launches on Qwen2.5-7B shapes, rank 16 on all seven projections, as
 * a decode step issues them (q/k/v together, o, gate/up together, down): µs per call at
 * n rows, every row on one adapter or each on its own (64 slots), and per token step over
 * 28 layers. A decode step's base matmuls are the yardstick (bench7b: ~2.3 ms at bs1). */
struct lora_bench_call {
    zse_cuda_lora l;
    const int32_t *of;
    const float *x;
    int64_t xp, n;
};

static void run_lora_call(void *arg)
{
    const lora_bench_call *c = (const lora_bench_call *)arg;
    LAUNCH(zse_cuda_lora_apply(&c->l, c->of, c->x, c->xp, c->n, (float *)scratch, scratch_bytes, 0));
}

void bench_lora(void)
{
    const int64_t F = 18944, rank = 16, slots = 64;
    const int64_t *ins = q7_in, *outs = q7_out;
    lora_pool_h p;
    lora_pool_7b(p, (int)slots, rank);
    uint8_t *d_slots;
    CU(cudaMalloc(&d_slots, p.bytes.size()));
    CU(cudaMemcpy(d_slots, p.bytes.data(), p.bytes.size(), cudaMemcpyHostToDevice));
    const int64_t max_n = 64, xp = pitch_of(F);
    std::vector<float> x = rand_vec((size_t)(max_n * xp));
    float *d_x = dev_floats(x), *d_y[3];
    for (int i = 0; i < 3; i++)
        CU(cudaMalloc(&d_y[i], (size_t)(max_n * pitch_of(F)) * 4));
    int32_t *d_of;
    CU(cudaMalloc(&d_of, max_n * 4));
    unsigned *d_sync;
    CU(cudaMalloc(&d_sync, 16));
    CU(cudaMemset(d_sync, 0, 16));
    const int groups[4][4] = {{3, 0, 1, 2}, {1, 3}, {2, 4, 5}, {1, 6}}; /* count, then modules */
    const char *names[4] = {"qkv", "o", "gate_up", "down"};
    printf("lora (rank 16, 7B shapes): n adapters | us per call: qkv o gate_up down | per token step (28 layers)\n");
    for (int64_t n : {1, 8, 32, 64})
        for (int distinct = 0; distinct < 2; distinct++) {
            if (n == 1 && distinct)
                continue;
            std::vector<int32_t> of((size_t)n);
            for (int64_t t = 0; t < n; t++)
                of[(size_t)t] = distinct ? (int32_t)(t % slots) : 0;
            CU(cudaMemcpy(d_of, of.data(), (size_t)n * 4, cudaMemcpyHostToDevice));
            double total = 0;
            printf("BENCH lora n=%lld %s |", (long long)n, distinct ? "distinct" : "one");
            for (int g = 0; g < 4; g++) {
                lora_bench_call c;
                memset(&c, 0, sizeof c);
                c.l.sync = d_sync;
                c.l.slots = d_slots;
                c.l.slot_bytes = p.slot_bytes;
                c.l.n_slots = (int)slots;
                c.l.n_layers = 1;
                c.l.layer = 0;
                c.l.max_rank = (int)rank;
                c.l.n_outs = groups[g][0];
                for (int i = 0; i < c.l.n_outs; i++) {
                    const int m = groups[g][1 + i];
                    c.l.module[i] = m;
                    c.l.in[i] = ins[m];
                    c.l.out[i] = outs[m];
                    c.l.ypitch[i] = pitch_of(F);
                    c.l.y[i] = d_y[i];
                }
                c.of = d_of;
                c.x = d_x;
                c.xp = xp;
                c.n = n;
                const float ms = time_ms(0, 50, run_lora_call, &c);
                total += ms;
                printf(" %s %.1f", names[g], ms * 1e3);
            }
            printf(" | %.2f ms\n", total * 28);
        }
    for (int i = 0; i < 3; i++)
        cudaFree(d_y[i]);
    cudaFree(d_slots);
    cudaFree(d_x);
    cudaFree(d_of);
    cudaFree(d_sync);
}

/* The delta folded into the one-row GEMV against the GEMV alone and against the GEMV then
 * lora_apply, per projection group of a Qwen2.5-7B-shaped decode step (rank 16), calls back
 * to back over weight copies larger than L2: what a token's 28 layers pay for the adapter. */
struct fold_bench_call {
    std::vector<zse_cuda_multi> *mms;
    size_t which;
    zse_cuda_lora l;
    const int32_t *of;
    const float *x;
    int64_t xp;
    float *ls;
    size_t lbytes;
    int path; /* 0 the GEMV alone, 1 GEMV + lora_apply, 2 zse_cuda_matmul_multi_lora */
    int folded;
};

static void run_fold_call(void *arg)
{
    fold_bench_call *c = (fold_bench_call *)arg;
    const zse_cuda_multi &mm = (*c->mms)[c->which++ % c->mms->size()];
    if (c->path == 2) {
        LAUNCH(zse_cuda_matmul_multi_lora(&mm, c->x, c->xp, 1, cublas, scratch, scratch_bytes, &c->l, c->of, c->ls,
                                          c->lbytes, &c->folded, 0));
        return;
    }
    LAUNCH(zse_cuda_matmul_multi(&mm, c->x, c->xp, 1, cublas, scratch, scratch_bytes, 0));
    if (c->path == 1)
        LAUNCH(zse_cuda_lora_apply(&c->l, c->of, c->x, c->xp, 1, c->ls, c->lbytes, 0));
}

void bench_lora_fold(void)
{
    const int64_t F = 18944, rank = 16;
    const int64_t *ins = q7_in, *outs = q7_out;
    lora_pool_h p;
    lora_pool_7b(p, 1, rank);
    uint8_t *d_slots;
    CU(cudaMalloc(&d_slots, p.bytes.size()));
    CU(cudaMemcpy(d_slots, p.bytes.data(), p.bytes.size(), cudaMemcpyHostToDevice));
    int32_t *d_of;
    const int32_t zero = 0;
    CU(cudaMalloc(&d_of, 4));
    CU(cudaMemcpy(d_of, &zero, 4, cudaMemcpyHostToDevice));
    unsigned *d_sync;
    CU(cudaMalloc(&d_sync, 16));
    CU(cudaMemset(d_sync, 0, 16));
    std::vector<float> x = rand_vec((size_t)pitch_of(F), -1.f, 1.f);
    float *d_x = dev_floats(x), *d_y[3];
    for (int i = 0; i < 3; i++)
        CU(cudaMalloc(&d_y[i], (size_t)pitch_of(F) * 4));
    const size_t lbytes = zse_cuda_matmul_lora_scratch_bytes(1, 3, F);
    float *d_ls;
    CU(cudaMalloc(&d_ls, lbytes));
    const int groups[4][4] = {{3, 0, 1, 2}, {1, 3}, {2, 4, 5}, {1, 6}}; /* count, then modules */
    const char *names[4] = {"qkv", "o", "gate_up", "down"};
    double tot[3] = {0, 0, 0};
    for (int g = 0; g < 4; g++) {
        const int count = groups[g][0];
        int64_t bytes = 0;
        for (int i = 0; i < count; i++)
            bytes += outs[groups[g][1 + i]] * ins[groups[g][1 + i]] / 2;
        const int copies = (int)std::max<int64_t>(2, (int64_t)(128 << 20) / bytes + 1);
        std::vector<packed> w((size_t)(copies * count));
        std::vector<zse_cuda_multi> mms((size_t)copies);
        for (int k = 0; k < copies; k++) {
            zse_cuda_multi &mm = mms[(size_t)k];
            memset(&mm, 0, sizeof mm);
            mm.count = count;
            mm.accumulate = g == 1 || g == 3;
            for (int i = 0; i < count; i++) {
                const int m = groups[g][1 + i];
                packed &pw = w[(size_t)(k * count + i)];
                pack_random(pw, Q4, outs[m], ins[m], 128);
                mm.w[i] = pw.w;
                mm.y[i] = d_y[i];
                mm.ypitch[i] = pitch_of(F);
            }
        }
        fold_bench_call c;
        c.folded = 0;
        c.mms = &mms;
        c.which = 0;
        memset(&c.l, 0, sizeof c.l);
        c.l.slots = d_slots;
        c.l.slot_bytes = p.slot_bytes;
        c.l.n_slots = 1;
        c.l.n_layers = 1;
        c.l.max_rank = (int)rank;
        c.l.sync = d_sync;
        c.l.n_outs = count;
        for (int i = 0; i < count; i++) {
            const int m = groups[g][1 + i];
            c.l.module[i] = m;
            c.l.in[i] = ins[m];
            c.l.out[i] = outs[m];
            c.l.y[i] = d_y[i];
            c.l.ypitch[i] = pitch_of(F);
        }
        c.of = d_of;
        c.x = d_x;
        c.xp = pitch_of(F);
        c.ls = d_ls;
        c.lbytes = lbytes;
        float us[3];
        for (int path = 0; path < 3; path++) {
            c.path = path;
            us[path] = time_stream_ms(56, run_fold_call, &c) * 1e3f;
            tot[path] += us[path];
        }
        printf("BENCH lora-fold %s: GEMV %.1f us, + lora_apply %.1f us, matmul_multi_lora %.1f us (%s)\n", names[g],
               us[0], us[1], us[2], c.folded ? "folded" : "not folded: the separate launch");
        for (auto &pw : w)
            cudaFree(pw.dev);
    }
    printf("BENCH lora-fold token (28 layers): GEMVs %.2f ms, + lora_apply %.2f ms, matmul_multi_lora %.2f ms\n", tot[0] * 28e-3,
           tot[1] * 28e-3, tot[2] * 28e-3);
    for (int i = 0; i < 3; i++)
        cudaFree(d_y[i]);
    cudaFree(d_ls);
    cudaFree(d_slots);
    cudaFree(d_x);
    cudaFree(d_of);
    cudaFree(d_sync);
}

void test_lora(void)
{
    for (int n : {1, 2, 4, 5, 9, 40, 64})
        check_lora(n, 256, 512, 16);
    check_lora(3, 37, 301, 5);       /* widths off the 8-value vectors: the scalar paths */
    check_lora(1, 37, 301, 5);
    check_lora(33, 37, 301, 5);
    check_lora(1, 3584, 3584, 128);  /* the largest rank on a 7B width */
    check_lora(17, 1000, 2049, 64);  /* a column block past 2048 */
    {   /* folded into the one-row GEMV: 7B shapes (q/k/v, o, gate/up, down) and odd ones */
        const int64_t qkv[3] = {3584, 512, 512}, one[1] = {3584}, gu[2] = {18944, 18944}, odd[2] = {301, 77};
        const int m_qkv[3] = {0, 1, 2}, m_qv[3] = {0, -1, 2}, m_o[1] = {3}, m_gu[2] = {4, 5}, m_down[1] = {6},
                  m_odd[2] = {2, 0};
        const int r16[3] = {16, 16, 16}, r_mixed[3] = {8, 0, 128}, r128[1] = {128}, r8[2] = {8, 8}, r5[2] = {5, 3};
        check_lora_fold(3, 3584, qkv, m_qkv, r16, 0, false, 1, true);
        check_lora_fold(3, 3584, qkv, m_qv, r_mixed, 1, false, 1, true);   /* k not in the call, v rank 128 */
        check_lora_fold(3, 3584, qkv, m_qkv, r_mixed, 0, false, 1, true);  /* k in the call, rank 0 */
        check_lora_fold(1, 3584, one, m_o, r128, 1, true, 1, true);        /* o + the residual */
        check_lora_fold(2, 3584, gu, m_gu, r8, 0, false, 1, false);        /* ~9 waves of blocks: not folded */
        check_lora_fold(1, 18944, one, m_down, r16, 0, true, 1, true);     /* 4 warps x 8 rows, 19 column chunks */
        check_lora_fold(2, 1000, odd, m_odd, r5, 1, false, 1, true);       /* rows off the blocks' 4 */
        check_lora_fold(3, 3584, qkv, m_qkv, r16, -1, false, 1, true);     /* the row has no adapter */
        check_lora_fold(3, 3584, qkv, m_qkv, r16, 7, false, 1, true);      /* a slot past the pool */
        check_lora_fold(3, 3584, qkv, m_qkv, r16, 0, false, 2, false);     /* two rows: the separate launch */
        check_lora_fold(2, 1004, odd, m_odd, r5, 0, false, 1, false);      /* x not in 8-value vectors */
    }
}
