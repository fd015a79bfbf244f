/* kernels_test: MoE routing, the grouped expert matmul (every path, experts the table
 * places nowhere left alone) and the combine */
#include "kernels_test.cuh"

/* ---- mixture of experts ---------------------------------------------------------------- */

/* the host reference of one token's routing: softmax, the k largest (ties to the lower
 * expert), weights renormalized or not */
static void moe_reference_route(const float *l, int E, int k, bool renorm, int *ex, double *w)
{
    double mx = l[0], sum = 0;
    for (int e = 1; e < E; e++)
        mx = std::max(mx, (double)l[e]);
    std::vector<double> p((size_t)E);
    for (int e = 0; e < E; e++)
        sum += p[(size_t)e] = exp(l[e] - mx);
    std::vector<bool> taken((size_t)E, false);
    double s = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[(size_t)e] && (best < 0 || p[(size_t)e] > p[(size_t)best]))
                best = e;
        taken[(size_t)best] = true;
        ex[j] = best;
        s += w[j] = p[(size_t)best] / sum;
    }
    for (int j = 0; renorm && j < k; j++)
        w[j] /= s;
}

/* Routing, the grouped expert matmul and the combine for n tokens over E experts of one
 * scheme: the routing's arrays against the host's, every pair's row against the dense
 * reference of its expert (bit for bit against the dense GEMV of that expert alone for the
 * float GEMV schemes, whose per-token sums do not depend on the batch), the combine against
 * its definition. Experts live in separate allocations, reached through the base table. */
static void check_moe(int scheme, int E, int k, int64_t rows, int64_t cols, int group, int n, bool renorm)
{
    std::vector<packed> ps((size_t)E);
    std::vector<const uint8_t *> bases((size_t)E);
    for (int e = 0; e < E; e++) {
        pack_random(ps[(size_t)e], scheme, rows, cols, group);
        bases[(size_t)e] = (const uint8_t *)ps[(size_t)e].dev;
    }
    zse_cuda_experts ex;
    memset(&ex, 0, sizeof ex);
    ex.w = ps[0].w;
    ex.w.qs = ex.w.scales = ex.w.mins = NULL;
    ex.qs_off = 0;
    ex.scales_off = ps[0].w.scales ? (int64_t)ps[0].off_scales : -1;
    ex.mins_off = ps[0].w.mins ? (int64_t)ps[0].off_mins : -1;
    const uint8_t **dbase;
    CU(cudaMalloc(&dbase, (size_t)E * sizeof *dbase));
    CU(cudaMemcpy(dbase, bases.data(), (size_t)E * sizeof *dbase, cudaMemcpyHostToDevice));
    ex.base = dbase;
    /* routing */
    const int64_t lp = pitch_of(E), P = (int64_t)n * k, xp = pitch_of(cols), yp = pitch_of(rows);
    std::vector<float> logits((size_t)(n * lp));
    for (auto &v : logits)
        v = rnd_uniform(-3.f, 3.f);
    float *dl = dev_floats(logits);
    void *mem;
    CU(cudaMalloc(&mem, zse_cuda_moe_bytes(n, E, k)));
    zse_cuda_moe r;
    zse_cuda_moe_at(mem, n, E, k, renorm, &r);
    LAUNCH(zse_cuda_moe_route(&r, dl, lp, n, 0));
    std::vector<int32_t> pe((size_t)P), slot((size_t)P), tok((size_t)P), seg((size_t)E + 1), act((size_t)E + 1);
    std::vector<float> pw((size_t)P);
    CU(cudaDeviceSynchronize());
    CU(cudaMemcpy(pe.data(), r.pair_expert, (size_t)P * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(pw.data(), r.pair_weight, (size_t)P * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(slot.data(), r.pair_slot, (size_t)P * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(tok.data(), r.token_of, (size_t)P * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(seg.data(), r.seg, (size_t)(E + 1) * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(act.data(), r.active, (size_t)(E + 1) * 4, cudaMemcpyDeviceToHost));
    int bad_route = 0, place = 0, n_active = 0;
    std::vector<int> want_tok, want_expert;
    for (int e = 0; e < E; e++) {
        bool any = false;
        for (int t = 0; t < n; t++) {
            int exs[64];
            double ws[64];
            moe_reference_route(&logits[(size_t)(t * lp)], E, k, renorm, exs, ws);
            for (int j = 0; j < k; j++) {
                if (e == 0) { /* each (t, j) once: the pair's expert and weight */
                    /* f32 softmax over up to 64 experts against double: a few ulp of the sum */
                    bad_route += pe[(size_t)(t * k + j)] != exs[j] || fabs(pw[(size_t)(t * k + j)] - ws[j]) > 1e-5;
                }
                if (exs[j] == e) {
                    want_tok.push_back(t);
                    want_expert.push_back(e);
                    bad_route += tok[(size_t)place] != t || slot[(size_t)(t * k + j)] != place;
                    place++;
                    any = true;
                }
            }
        }
        bad_route += seg[(size_t)e + 1] != place;
        if (any)
            bad_route += act[(size_t)n_active++] != e;
    }
    bad_route += act[(size_t)E] != n_active;
    CHECK(bad_route == 0, "moe route: %d of %d experts, top %d of %d tokens (renorm %d): %d differences from the host",
          E, k, n, k, renorm, bad_route);
    /* the grouped matmul over P random rows */
    std::vector<float> xs((size_t)(P * xp));
    for (auto &v : xs)
        v = rnd_uniform(-1.f, 1.f);
    float *dxs = dev_floats(xs), *dys;
    CU(cudaMalloc(&dys, (size_t)(P * yp) * 4));
    poison(dys, (size_t)(P * yp));
    const size_t need = zse_cuda_moe_matmul_scratch_bytes(&ex, n, k);
    CHECK(need <= scratch_bytes, "moe scratch %zu", need);
    zse_cuda_moe_parts one;
    memset(&one, 0, sizeof one);
    one.n = 1;
    one.ex[0] = ex;
    one.ys[0] = dys;
    one.ypitch = yp;
    LAUNCH(zse_cuda_moe_matmul(&r, n, &one, dxs, xp, scratch, scratch_bytes, 0));
    std::vector<float> ys = host_floats(dys, (size_t)(P * yp)), got;
    {
        /* two parts in one launch (a layer's gate and up): the second part here is the same
         * bank with every expert's table entry moved to its neighbour, so each part's rows
         * must be what that part gives alone, bit for bit */
        std::vector<const uint8_t *> moved((size_t)E);
        for (int e = 0; e < E; e++)
            moved[(size_t)e] = bases[(size_t)((e + 1) % E)];
        const uint8_t **dmoved;
        CU(cudaMalloc(&dmoved, (size_t)E * sizeof *dmoved));
        CU(cudaMemcpy(dmoved, moved.data(), (size_t)E * sizeof *dmoved, cudaMemcpyHostToDevice));
        float *dy2, *dy3;
        CU(cudaMalloc(&dy2, (size_t)(P * yp) * 4));
        CU(cudaMalloc(&dy3, (size_t)(P * yp) * 4));
        zse_cuda_moe_parts alone = one, both = one;
        alone.ex[0].base = dmoved;
        alone.ys[0] = dy2;
        LAUNCH(zse_cuda_moe_matmul(&r, n, &alone, dxs, xp, scratch, scratch_bytes, 0));
        std::vector<float> want2 = host_floats(dy2, (size_t)(P * yp));
        poison(dys, (size_t)(P * yp));
        poison(dy3, (size_t)(P * yp));
        both.n = 2;
        both.ex[1] = alone.ex[0];
        both.ys[1] = dy3;
        LAUNCH(zse_cuda_moe_matmul(&r, n, &both, dxs, xp, scratch, scratch_bytes, 0));
        std::vector<float> got1 = host_floats(dys, (size_t)(P * yp)), got2 = host_floats(dy3, (size_t)(P * yp));
        int differ = 0;
        for (int64_t i = 0; i < P; i++)
            differ += memcmp(&got1[(size_t)(i * yp)], &ys[(size_t)(i * yp)], (size_t)rows * 4) != 0 ||
                      memcmp(&got2[(size_t)(i * yp)], &want2[(size_t)(i * yp)], (size_t)rows * 4) != 0;
        CHECK(differ == 0, "moe matmul %s, %d tokens, two parts in one launch: %d pairs differ from each part alone",
              scheme_names[scheme], n, differ);
        cudaFree(dmoved);
        cudaFree(dy2);
        cudaFree(dy3);
    }
    std::vector<double> ref;
    for (int64_t i = 0; i < P; i++) {
        const packed &pk = ps[(size_t)want_expert[(size_t)i]];
        for (int64_t row = 0; row < rows; row++) {
            double sum = 0;
            for (int64_t c = 0; c < cols; c++)
                sum += ref_weight(pk, row, c) * xs[(size_t)(i * xp + c)];
            ref.push_back(sum);
            got.push_back(ys[(size_t)(i * yp + row)]);
        }
    }
    const bool four = scheme == Q4 || scheme == Q4S, quant_x = four;
    const double e = rel_err(ref, got), tol = quant_x ? 2e-3 : scheme == NF4 || scheme == Q8 ? 1e-4 : 2e-5;
    CHECK(e < tol, "moe matmul %s %d experts top %d, %lldx%lld g%d, %d tokens: rel err %.3g (tol %.1g)",
          scheme_names[scheme], E, k, (long long)rows, (long long)cols, group, n, e, tol);
    if (!four) {
        /* each pair's row bit for bit the dense GEMV of its expert over that row alone */
        int differ = 0;
        float *dy1;
        CU(cudaMalloc(&dy1, (size_t)yp * 4));
        for (int64_t i = 0; i < P; i++) {
            LAUNCH(zse_cuda_matmul_gemv(&ps[(size_t)want_expert[(size_t)i]].w, dxs + i * xp, xp, 1, dy1, yp, scratch,
                                        scratch_bytes, 0));
            std::vector<float> one = host_floats(dy1, (size_t)rows);
            differ += memcmp(one.data(), &ys[(size_t)(i * yp)], (size_t)rows * 4) != 0;
        }
        cudaFree(dy1);
        CHECK(differ == 0, "moe matmul %s, %d tokens: %d pairs differ from their expert's GEMV alone",
              scheme_names[scheme], n, differ);
    }
    {
        /* experts the table places nowhere (NULL: kept in host memory, run there this step):
         * their pairs' rows are left as they were, every other row is what it was above */
        std::vector<const uint8_t *> holes(bases);
        for (int h = 1; h < E; h += 2)
            holes[(size_t)h] = NULL;
        CU(cudaMemcpy(dbase, holes.data(), (size_t)E * sizeof *dbase, cudaMemcpyHostToDevice));
        poison(dys, (size_t)(P * yp));
        std::vector<float> before = host_floats(dys, (size_t)(P * yp));
        LAUNCH(zse_cuda_moe_matmul(&r, n, &one, dxs, xp, scratch, scratch_bytes, 0));
        std::vector<float> after = host_floats(dys, (size_t)(P * yp));
        int wrong = 0;
        for (int64_t i = 0; i < P; i++) {
            const std::vector<float> &want = want_expert[(size_t)i] % 2 ? before : ys;
            wrong += memcmp(&after[(size_t)(i * yp)], &want[(size_t)(i * yp)], (size_t)rows * 4) != 0;
        }
        CHECK(wrong == 0, "moe matmul %s, %d tokens, odd experts placed nowhere: %d of %lld pairs' rows wrong",
              scheme_names[scheme], n, wrong, (long long)P);
        CU(cudaMemcpy(dbase, bases.data(), (size_t)E * sizeof *dbase, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dys, ys.data(), ys.size() * 4, cudaMemcpyHostToDevice)); /* the combine below reads them */
    }
    /* combine: x[t] += sum (experts ascending) weight * ys[place] + sigmoid(gate) * shared */
    const int64_t D = rows;
    std::vector<float> x0((size_t)(n * yp)), sh((size_t)(n * yp)), gate((size_t)(n * 4));
    for (auto &v : x0)
        v = rnd_uniform(-1.f, 1.f);
    for (auto &v : sh)
        v = rnd_uniform(-1.f, 1.f);
    for (auto &v : gate)
        v = rnd_uniform(-2.f, 2.f);
    float *dx0 = dev_floats(x0), *dsh = dev_floats(sh), *dg = dev_floats(gate);
    for (int with_shared = 0; with_shared < 2; with_shared++) {
        CU(cudaMemcpy(dx0, x0.data(), x0.size() * 4, cudaMemcpyHostToDevice));
        LAUNCH(zse_cuda_moe_combine(&r, n, dys, yp, with_shared ? dsh : NULL, yp, with_shared ? dg : NULL, 4, dx0, yp,
                                    D, 0));
        std::vector<float> xo = host_floats(dx0, x0.size());
        std::vector<double> cref;
        std::vector<float> cgot;
        for (int t = 0; t < n; t++) {
            int exs[64];
            double ws[64];
            moe_reference_route(&logits[(size_t)(t * lp)], E, k, renorm, exs, ws);
            for (int64_t d = 0; d < D; d++) {
                double acc = 0;
                for (int j = 0; j < k; j++)
                    acc += ws[j] * ys[(size_t)(slot[(size_t)(t * k + j)] * yp + d)];
                if (with_shared)
                    acc += sh[(size_t)(t * yp + d)] / (1 + exp(-gate[(size_t)(t * 4)]));
                cref.push_back(x0[(size_t)(t * yp + d)] + acc);
                cgot.push_back(xo[(size_t)(t * yp + d)]);
            }
        }
        const double ce = rel_err(cref, cgot);
        CHECK(ce < 1e-5, "moe combine (shared %d), %d tokens: rel err %.3g", with_shared, n, ce);
    }
    cudaFree(dx0);
    cudaFree(dsh);
    cudaFree(dg);
    cudaFree(dxs);
    cudaFree(dys);
    cudaFree(dl);
    cudaFree(mem);
    cudaFree(dbase);
    for (auto &pk : ps)
        cudaFree(pk.dev);
}

void test_moe(void)
{
    /* token counts through each path: dp4a GEMV tiles 1, 2, 4, 8; tensor cores past 8 (tiles
     * 16, 32, 64, and 70 tokens: a segment past one tile) */
    const int ns[] = {1, 2, 3, 8, 9, 20, 40, 70};
    for (int s : {Q4, Q4S})
        for (int n : ns)
            check_moe(s, 7, 3, 70, 96, s == Q4 ? 32 : 64, n, n % 2 == 0);
    for (int s : {F32, F16, BF16, Q8, NF4})
        for (int n : {1, 5, 12})
            check_moe(s, 6, 2, 45, 64, 32, n, true);
    /* Mixtral's few large experts and many tokens a segment; Qwen's many experts, top 8 */
    check_moe(Q4, 8, 2, 128, 256, 128, 64, true);
    check_moe(Q4, 64, 8, 40, 128, 128, 3, false);
    check_moe(Q4, 64, 8, 40, 128, 128, 33, false);
    /* Qwen3-MoE's 128 experts, top 8: one decode token, and a prefill whose tokens split
     * over every routing warp; 1,024 experts (the most a layer may have: fewer warps route) */
    check_moe(Q4, 128, 8, 40, 128, 128, 1, true);
    check_moe(Q4, 128, 8, 40, 128, 128, 300, true);
    check_moe(Q4, 1024, 4, 16, 64, 32, 20, false);
}
