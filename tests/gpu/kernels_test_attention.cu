/* kernels_test: paged KV, RoPE and the KV store, attention (f16 and int8, GQA, sliding
 * window, split-K decode) and the device sampler against host references */
#include "kernels_test.cuh"

/* ---- paged KV + attention ---- */
struct attn_case {
    const char *name;
    int int8, n_heads, n_kv, hd, window, block_size;
    std::vector<int> seq_lens;   /* tokens in the cache per sequence after the store */
    std::vector<int> new_tokens; /* how many of those (the last ones) this step carries */
};

static void check_attention(const attn_case &c)
{
    const int n_seqs = (int)c.seq_lens.size(), bs = c.block_size;
    int max_blocks = 0, total_blocks = 0, max_ctx = 0;
    for (int l : c.seq_lens) {
        max_blocks = std::max(max_blocks, (l + bs - 1) / bs);
        total_blocks += (l + bs - 1) / bs;
        max_ctx = std::max(max_ctx, l);
    }
    const int n_blocks = total_blocks + 3;
    /* shuffled physical blocks so that table order != memory order */
    std::vector<int> perm((size_t)n_blocks);
    for (int i = 0; i < n_blocks; i++)
        perm[(size_t)i] = i;
    for (int i = n_blocks - 1; i > 0; i--)
        std::swap(perm[(size_t)i], perm[(size_t)(rnd_u32() % (uint32_t)(i + 1))]);
    std::vector<int32_t> table((size_t)(n_seqs * max_blocks), -1);
    int next = 0;
    for (int s = 0; s < n_seqs; s++)
        for (int b = 0; b < (c.seq_lens[(size_t)s] + bs - 1) / bs; b++)
            table[(size_t)(s * max_blocks + b)] = perm[(size_t)next++];

    const int kvw = c.n_kv * c.hd, qw = c.n_heads * c.hd;
    /* all cache contents (k, v per sequence position), stored in two steps: the history
     * first, then this step's tokens, which are also the queries */
    std::vector<std::vector<float>> K((size_t)n_seqs), V((size_t)n_seqs);
    for (int s = 0; s < n_seqs; s++) {
        K[(size_t)s] = rand_vec((size_t)(c.seq_lens[(size_t)s] * kvw), -1.f, 1.f);
        V[(size_t)s] = rand_vec((size_t)(c.seq_lens[(size_t)s] * kvw), -1.f, 1.f);
    }
    zse_cuda_kv_layer L;
    memset(&L, 0, sizeof L);
    L.int8 = c.int8;
    L.block_size = bs;
    L.n_kv_heads = c.n_kv;
    L.head_dim = c.hd;
    L.n_slots = (int64_t)n_blocks * bs;
    const size_t elems = (size_t)L.n_slots * kvw, es = c.int8 ? 1 : 2;
    CU(cudaMalloc(&L.k, elems * es));
    CU(cudaMalloc(&L.v, elems * es));
    CU(cudaMalloc(&L.kscale, (size_t)L.n_slots * c.n_kv * 4));
    CU(cudaMalloc(&L.vscale, (size_t)L.n_slots * c.n_kv * 4));
    /* the backend's kv_new zero-fills the pool; so does this */
    CU(cudaMemset(L.k, 0, elems * es));
    CU(cudaMemset(L.v, 0, elems * es));
    CU(cudaMemset(L.kscale, 0, (size_t)L.n_slots * c.n_kv * 4));
    CU(cudaMemset(L.vscale, 0, (size_t)L.n_slots * c.n_kv * 4));

    for (int phase = 0; phase < 2; phase++) {
        std::vector<float> kr, vr;
        std::vector<int32_t> slots;
        for (int s = 0; s < n_seqs; s++) {
            const int len = c.seq_lens[(size_t)s], first_new = len - c.new_tokens[(size_t)s];
            for (int p = phase == 0 ? 0 : first_new; p < (phase == 0 ? first_new : len); p++) {
                slots.push_back(table[(size_t)(s * max_blocks + p / bs)] * bs + p % bs);
                kr.insert(kr.end(), K[(size_t)s].begin() + p * kvw, K[(size_t)s].begin() + (p + 1) * kvw);
                vr.insert(vr.end(), V[(size_t)s].begin() + p * kvw, V[(size_t)s].begin() + (p + 1) * kvw);
            }
        }
        if (slots.empty())
            continue;
        slots.push_back(-1);    /* a padded token: skipped */
        kr.resize(kr.size() + (size_t)kvw, 9.f);
        vr.resize(vr.size() + (size_t)kvw, 9.f);
        float *dk = dev_floats(kr), *dv = dev_floats(vr);
        int32_t *dslots;
        CU(cudaMalloc(&dslots, slots.size() * 4));
        CU(cudaMemcpy(dslots, slots.data(), slots.size() * 4, cudaMemcpyHostToDevice));
        LAUNCH(zse_cuda_kv_store(&L, dk, kvw, dv, kvw, dslots, (int64_t)slots.size(), 0));
        CU(cudaDeviceSynchronize());
        cudaFree(dk);
        cudaFree(dv);
        cudaFree(dslots);
    }

    /* queries: this step's tokens */
    std::vector<int32_t> seq_of, pos;
    for (int s = 0; s < n_seqs; s++)
        for (int p = c.seq_lens[(size_t)s] - c.new_tokens[(size_t)s]; p < c.seq_lens[(size_t)s]; p++) {
            seq_of.push_back(s);
            pos.push_back(p);
        }
    const int64_t n = (int64_t)seq_of.size(), qp = pitch_of(qw);
    std::vector<float> q = rand_vec((size_t)(n * qp), -1.f, 1.f);
    float *dq = dev_floats(q), *dout;
    CU(cudaMalloc(&dout, (size_t)(n * qp) * 4));
    poison(dout, (size_t)(n * qp));
    int32_t *dseq, *dpos, *dtab;
    CU(cudaMalloc(&dseq, (size_t)n * 4));
    CU(cudaMalloc(&dpos, (size_t)n * 4));
    CU(cudaMalloc(&dtab, table.size() * 4));
    CU(cudaMemcpy(dseq, seq_of.data(), (size_t)n * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dpos, pos.data(), (size_t)n * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dtab, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
    zse_cuda_attn a;
    a.n_heads = c.n_heads;
    a.n_kv_heads = c.n_kv;
    a.head_dim = c.hd;
    a.scale = 1.f / sqrtf((float)c.hd);
    a.window = c.window;
    a.seq_of = dseq;
    a.pos = dpos;
    a.block_table = dtab;
    a.max_blocks = max_blocks;
    size_t wb = zse_cuda_attention_work_bytes(n, c.n_heads, c.hd);
    void *work;
    CU(cudaMalloc(&work, wb));
    LAUNCH(zse_cuda_attention(&L, &a, dq, qp, n, max_ctx, dout, qp, work, wb, 0));
    std::vector<float> o = host_floats(dout, (size_t)(n * qp)), got;
    std::vector<double> ref;
    const int group = c.n_heads / c.n_kv;
    for (int64_t t = 0; t < n; t++) {
        const int s = seq_of[(size_t)t], P = pos[(size_t)t];
        const int lo = c.window > 0 ? std::max(0, P - c.window + 1) : 0;
        for (int h = 0; h < c.n_heads; h++) {
            const int kh = h / group;
            std::vector<double> sc;
            double m = -1e300;
            for (int p = lo; p <= P; p++) {
                double d = 0;
                for (int i = 0; i < c.hd; i++)
                    d += (double)q[(size_t)(t * qp + h * c.hd + i)] * K[(size_t)s][(size_t)(p * kvw + kh * c.hd + i)];
                d *= a.scale;
                sc.push_back(d);
                m = std::max(m, d);
            }
            double den = 0;
            for (double &v : sc) {
                v = exp(v - m);
                den += v;
            }
            for (int i = 0; i < c.hd; i++) {
                double acc = 0;
                for (int p = lo; p <= P; p++)
                    acc += sc[(size_t)(p - lo)] * V[(size_t)s][(size_t)(p * kvw + kh * c.hd + i)];
                ref.push_back(acc / den);
                got.push_back(o[(size_t)(t * qp + h * c.hd + i)]);
            }
        }
    }
    const double tol = c.int8 ? 2e-2 : 3e-3, e = rel_err(ref, got);
    CHECK(e < tol, "attention %s: rel err %.3g (tol %.1g)", c.name, e, tol);
    cudaFree(L.k);
    cudaFree(L.v);
    cudaFree(L.kscale);
    cudaFree(L.vscale);
    cudaFree(dq);
    cudaFree(dout);
    cudaFree(dseq);
    cudaFree(dpos);
    cudaFree(dtab);
    cudaFree(work);
}

/* sampling on the device: N rows of the same logits drawn with stratified uniforms
 * (u = (i + 0.5) / N) must pick each kept id N * p(id) times, +-1, where the kept set and
 * p follow the host sampler's rules (temperature, top-k within ties, top-p over the top-k
 * mass, min-p against the largest); greedy rows give the argmax (lowest id on ties, NaN
 * never wins) */
static void check_sample(float temperature, int top_k, float top_p, float min_p)
{
    const int cols = 1000, N = 4000;
    std::vector<float> logits = rand_vec((size_t)cols, -4.f, 4.f);
    logits[17] = NAN;
    logits[18] = -INFINITY;
    logits[500] = logits[501] = 4.5f; /* a tie at the top */
    const bool greedy = temperature <= 0 || top_k == 1;
    /* the reference, in the kernel's float arithmetic */
    float mx = -INFINITY;
    for (float v : logits)
        mx = fmaxf(mx, v);
    std::vector<double> p((size_t)cols);
    for (int i = 0; i < cols; i++)
        p[(size_t)i] = logits[(size_t)i] == logits[(size_t)i] ? exp((logits[(size_t)i] - mx) / temperature) : 0.0;
    std::vector<int> order(cols);
    for (int i = 0; i < cols; i++)
        order[(size_t)i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return p[(size_t)a] > p[(size_t)b] || (p[(size_t)a] == p[(size_t)b] && a < b); });
    int n = cols;
    if (top_k > 0 && top_k < cols)
        n = top_k;
    double mass = 0;
    for (int i = 0; i < n; i++)
        mass += p[(size_t)order[(size_t)i]];
    if (top_p > 0 && top_p < 1) {
        double cum = 0;
        int k = 0;
        while (k < n) {
            cum += p[(size_t)order[(size_t)k++]];
            if (cum >= top_p * mass)
                break;
        }
        n = k;
    }
    if (min_p > 0) {
        int k = 1;
        while (k < n && p[(size_t)order[(size_t)k]] >= min_p)
            k++;
        n = k;
    }
    std::vector<double> want((size_t)cols, 0.0);
    double kept = 0;
    for (int i = 0; i < n; i++)
        kept += p[(size_t)order[(size_t)i]];
    for (int i = 0; i < n; i++)
        want[(size_t)order[(size_t)i]] = p[(size_t)order[(size_t)i]] / kept * N;

    std::vector<float> x((size_t)N * cols);
    for (int r = 0; r < N; r++)
        std::copy(logits.begin(), logits.end(), x.begin() + (size_t)r * cols);
    std::vector<zse_cuda_sample> prm((size_t)N);
    for (int r = 0; r < N; r++)
        prm[(size_t)r] = {temperature, top_p, min_p, (r + 0.5f) / N, top_k};
    float *dx = dev_floats(x);
    zse_cuda_sample *dp;
    int32_t *dout;
    CU(cudaMalloc(&dp, prm.size() * sizeof prm[0]));
    CU(cudaMalloc(&dout, (size_t)N * 4));
    CU(cudaMemcpy(dp, prm.data(), prm.size() * sizeof prm[0], cudaMemcpyHostToDevice));
    LAUNCH(zse_cuda_sample_rows(dx, cols, N, cols, dp, dout, 0));
    std::vector<int32_t> ids((size_t)N);
    CU(cudaMemcpy(ids.data(), dout, (size_t)N * 4, cudaMemcpyDeviceToHost));
    std::vector<int> count((size_t)cols, 0);
    bool in_range = true;
    for (int32_t id : ids) {
        in_range = in_range && id >= 0 && id < cols;
        if (id >= 0 && id < cols)
            count[(size_t)id]++;
    }
    CHECK(in_range, "sample: an id out of range");
    if (greedy) {
        CHECK(count[500] == N, "sample greedy: %d of %d rows took the argmax 500", count[500], N);
    } else {
        double worst = 0;
        int outside = 0;
        for (int i = 0; i < cols; i++) {
            worst = std::max(worst, fabs(count[(size_t)i] - want[(size_t)i]));
            outside += want[(size_t)i] == 0 && count[(size_t)i] > 0;
        }
        CHECK(outside == 0 && worst <= 2.0, "sample T=%g k=%d p=%g min_p=%g: %d draws outside the kept set, worst count off by %.1f",
              temperature, top_k, top_p, min_p, outside, worst);
    }
    cudaFree(dx);
    cudaFree(dp);
    cudaFree(dout);
}

void test_sample(void)
{
    check_sample(0.f, 0, 1.f, 0.f);         /* greedy */
    check_sample(0.8f, 1, 1.f, 0.f);        /* top-k 1 */
    check_sample(0.7f, 0, 1.f, 0.f);        /* temperature alone: the whole vocabulary */
    check_sample(1.0f, 50, 1.f, 0.f);
    check_sample(0.9f, 0, 0.8f, 0.f);
    check_sample(1.2f, 0, 1.f, 0.05f);
    check_sample(0.8f, 40, 0.9f, 0.02f);
    check_sample(2.0f, 999, 0.5f, 0.f);
}

/* the fused RoPE + K/V store equals RoPE on q and k then the store, bit for bit, in both
 * storages, with a skipped (negative) slot and GQA */
void test_rope_kv_store(void)
{
    const int n = 5, n_heads = 6, n_kv = 2, hd = 64, nblocks = 4, bs = 16;
    const int64_t qp = n_heads * hd, kp = n_kv * hd, n_slots = nblocks * bs;
    std::vector<float> q = rand_vec((size_t)(n * qp)), k = rand_vec((size_t)(n * kp)), v = rand_vec((size_t)(n * kp));
    std::vector<float> inv(hd / 2);
    for (int i = 0; i < hd / 2; i++)
        inv[(size_t)i] = powf(10000.f, -2.f * i / hd);
    const int32_t pos[n] = {0, 7, 300, 31, 5}, slots[n] = {3, 17, -1, 40, 63};
    int32_t *dpos, *dslots;
    CU(cudaMalloc(&dpos, sizeof pos));
    CU(cudaMalloc(&dslots, sizeof slots));
    CU(cudaMemcpy(dpos, pos, sizeof pos, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dslots, slots, sizeof slots, cudaMemcpyHostToDevice));
    float *dinv = dev_floats(inv);
    for (int int8 = 0; int8 < 2; int8++) {
        zse_cuda_kv_layer L[2];
        float *dq[2], *dk[2], *dv = dev_floats(v);
        const size_t elem = int8 ? 1 : 2, pool = (size_t)n_slots * kp * elem;
        for (int f = 0; f < 2; f++) {
            memset(&L[f], 0, sizeof L[f]);
            L[f].int8 = int8;
            L[f].block_size = bs;
            L[f].n_kv_heads = n_kv;
            L[f].head_dim = hd;
            L[f].n_slots = n_slots;
            CU(cudaMalloc(&L[f].k, pool));
            CU(cudaMalloc(&L[f].v, pool));
            CU(cudaMemset(L[f].k, 0, pool));
            CU(cudaMemset(L[f].v, 0, pool));
            CU(cudaMalloc(&L[f].kscale, (size_t)n_slots * n_kv * 4));
            CU(cudaMalloc(&L[f].vscale, (size_t)n_slots * n_kv * 4));
            CU(cudaMemset(L[f].kscale, 0, (size_t)n_slots * n_kv * 4));
            CU(cudaMemset(L[f].vscale, 0, (size_t)n_slots * n_kv * 4));
            dq[f] = dev_floats(q);
            dk[f] = dev_floats(k);
        }
        LAUNCH(zse_cuda_rope(dq[0], qp, n, n_heads, hd, dpos, dinv, 1.1f, 0));
        LAUNCH(zse_cuda_rope(dk[0], kp, n, n_kv, hd, dpos, dinv, 1.1f, 0));
        LAUNCH(zse_cuda_kv_store(&L[0], dk[0], kp, dv, kp, dslots, n, 0));
        LAUNCH(zse_cuda_rope_kv_store(&L[1], dq[1], qp, dk[1], kp, dv, kp, dslots, n, n_heads, dpos, dinv, 1.1f, 0));
        CU(cudaDeviceSynchronize());
        std::vector<uint8_t> a(pool), b(pool);
        bool same = host_floats(dq[0], (size_t)(n * qp)) == host_floats(dq[1], (size_t)(n * qp));
        CU(cudaMemcpy(a.data(), L[0].k, pool, cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(b.data(), L[1].k, pool, cudaMemcpyDeviceToHost));
        same = same && a == b;
        CU(cudaMemcpy(a.data(), L[0].v, pool, cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(b.data(), L[1].v, pool, cudaMemcpyDeviceToHost));
        same = same && a == b;
        if (int8)
            same = same && host_floats(L[0].kscale, (size_t)(n_slots * n_kv)) == host_floats(L[1].kscale, (size_t)(n_slots * n_kv)) &&
                   host_floats(L[0].vscale, (size_t)(n_slots * n_kv)) == host_floats(L[1].vscale, (size_t)(n_slots * n_kv));
        CHECK(same, "rope_kv_store %s differs from rope + kv_store", int8 ? "int8" : "f16");
        for (int f = 0; f < 2; f++) {
            cudaFree(L[f].k);
            cudaFree(L[f].v);
            cudaFree(L[f].kscale);
            cudaFree(L[f].vscale);
            cudaFree(dq[f]);
            cudaFree(dk[f]);
        }
        cudaFree(dv);
    }
    cudaFree(dpos);
    cudaFree(dslots);
    cudaFree(dinv);
}

void test_attention(void)
{
    for (int int8 = 0; int8 < 2; int8++) {
        const attn_case cases[] = {
            /* prefill of two prompts, GQA 4:1 */
            {"prefill", int8, 8, 2, 64, 0, 16, {37, 20}, {37, 20}},
            /* chunked prefill on top of a history, head_dim 128, MHA */
            {"chunked", int8, 4, 4, 128, 0, 16, {70, 50}, {9, 50}},
            /* decode: one token per sequence over long contexts (split-K merges) */
            {"decode", int8, 28, 4, 128, 0, 16, {1500, 33, 700}, {1, 1, 1}},
            /* sliding window, decode and prefill mixed, head_dim 80, block size 32 */
            {"window", int8, 6, 3, 80, 24, 32, {300, 45}, {1, 45}},
            /* head_dim 256, decode and a short prefill */
            {"hd256", int8, 8, 2, 256, 0, 16, {260, 7}, {1, 7}},
            /* head_dim 40 (not a multiple of 16: the key-at-a-time kernel), window, splits */
            {"hd40", int8, 4, 2, 40, 100, 16, {900, 60}, {1, 60}},
            /* steps of > 64 tokens: runs of >= 16 tokens on tensor cores (f16 cache), the
             * decode rows and the 5-token run beside them on the warp kernels */
            {"tc-mixed", int8, 28, 4, 128, 0, 16, {300, 1000, 20, 5}, {300, 1, 20, 5}},
            /* a prefill chunk over a history, sliding window, head_dim 64 */
            {"tc-window", int8, 8, 2, 64, 50, 16, {200, 90}, {130, 90}},
            /* three runs sharing one 64-row tile, 8 heads over 1 KV head, blocks of 32 */
            {"tc-runs", int8, 8, 1, 128, 0, 32, {150, 17, 40}, {150, 17, 40}},
            /* groups of 12 and 10 query heads a KV head: a block takes them in two chunks */
            {"gqa12", int8, 24, 2, 64, 0, 16, {100, 3, 33}, {1, 3, 1}},
            {"gqa10-window", int8, 20, 2, 256, 40, 16, {120, 64}, {1, 64}},
        };
        for (const auto &c : cases)
            check_attention(c);
        /* a decode step of 40 sequences of 1..300 tokens (no splits past 1024 warps' worth) */
        attn_case batch = {"batch40", int8, 28, 4, 128, 0, 16, {}, {}};
        for (int i = 0; i < 40; i++) {
            batch.seq_lens.push_back(1 + (i * 37) % 300);
            batch.new_tokens.push_back(1);
        }
        check_attention(batch);
    }
}
