/* kernels_test: every matmul scheme and path against the double-precision reference,
 * embed, the elementwise ops and the producers that hand x over quantized */
#include "kernels_test.cuh"

/* when nonzero, the scratch the GEMM path gets: small enough to make it walk W in slabs */
static size_t gemm_scratch_limit = 0;

static void check_matmul(int scheme, int64_t rows, int64_t cols, int group, int n, bool gemm)
{
    packed p;
    pack_random(p, scheme, rows, cols, group);
    const int64_t xp = pitch_of(cols), yp = pitch_of(rows) + 4;
    std::vector<float> x((size_t)(n * xp));
    for (auto &v : x)
        v = rnd_uniform(-1.f, 1.f);
    float *dx = dev_floats(x), *dy;
    CU(cudaMalloc(&dy, (size_t)(n * yp) * 4));
    poison(dy, (size_t)(n * yp));
    if (gemm)
        LAUNCH(zse_cuda_matmul_gemm(&p.w, dx, xp, n, dy, yp, cublas, scratch,
                                    gemm_scratch_limit ? gemm_scratch_limit : scratch_bytes, 0));
    else
        LAUNCH(zse_cuda_matmul_gemv(&p.w, dx, xp, n, dy, yp, scratch, scratch_bytes, 0));
    std::vector<float> y = host_floats(dy, (size_t)(n * yp)), got;
    std::vector<double> ref;
    std::vector<double> wrow((size_t)cols);
    /* GEMV: fp32, except 4-bit int4/int4s: x split per 32-element chunk into two int8 halves,
     * each element off by at most amax(chunk)/64516, and that error meets the code's scale
     * times the code, |s·q| <= 2·max|w| of the group. An output may be off by the sum of those
     * whatever its own size (a 7-element row can cancel to almost 0), plus fp32 rounding. */
    const bool dp4a = scheme == Q4 || scheme == Q4S;
    int over_bound = 0;
    std::vector<double> gmax((size_t)cols);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t k = 0; k < cols; k++)
            wrow[(size_t)k] = ref_weight(p, r, k);
        for (int64_t k0 = 0; k0 < cols; k0 += std::max(group, 1)) {
            double m = 0;
            for (int64_t k = k0; k < k0 + std::max(group, 1) && k < cols; k++)
                m = std::max(m, fabs(wrow[(size_t)k]));
            for (int64_t k = k0; k < k0 + std::max(group, 1) && k < cols; k++)
                gmax[(size_t)k] = m;
        }
        for (int t = 0; t < n; t++) {
            double s = 0, bound = 0, amax = 0, absdot = 0;
            for (int64_t k = 0; k < cols; k++) {
                if (k % 32 == 0) {
                    amax = 0;
                    for (int64_t j = k; j < k + 32 && j < cols; j++)
                        amax = std::max(amax, (double)fabsf(x[(size_t)(t * xp + j)]));
                }
                s += wrow[(size_t)k] * x[(size_t)(t * xp + k)];
                absdot += fabs(wrow[(size_t)k] * x[(size_t)(t * xp + k)]);
                bound += 2 * gmax[(size_t)k] * amax / 64516.0;
            }
            ref.push_back(s);
            got.push_back(y[(size_t)(t * yp + r)]);
            over_bound += fabs(s - y[(size_t)(t * yp + r)]) > 1.5 * bound + 1e-5 * absdot + 1e-7;
        }
    }
    /* GEMV: fp32 all the way. GEMM: x in f16 for 4/8-bit weights; hi+lo split for 16-bit */
    const bool quant = scheme == Q8 || scheme == Q4 || scheme == Q4S || scheme == NF4 || scheme == Q8G;
    const double e = rel_err(ref, got);
    if (dp4a && !gemm) {
        CHECK(over_bound == 0, "gemv %s %lldx%lld g%d n=%d: %d outputs past the x-quantization bound (rel err %.3g)",
              scheme_names[scheme], (long long)rows, (long long)cols, group, n, over_bound, e);
    } else {
        const double tol = !gemm ? 2e-5 : quant ? 2e-3 : 1e-4;
        CHECK(e < tol, "%s %s %lldx%lld g%d n=%d: rel err %.3g (tol %.1g)", gemm ? "gemm" : "gemv",
              scheme_names[scheme], (long long)rows, (long long)cols, group, n, e, tol);
    }
    cudaFree(dx);
    cudaFree(dy);
    cudaFree(p.dev);
}

/* zse_cuda_matmul at a batch the dispatcher may split into GEMV passes; or, with mma_only,
 * the tensor-core path on its own (any n: it tiles x in 64-row tiles) */
static void check_matmul_dispatch(int scheme, int64_t rows, int64_t cols, int group, int n, bool mma_only = false)
{
    packed p;
    pack_random(p, scheme, rows, cols, group);
    const int64_t xp = pitch_of(cols), yp = pitch_of(rows);
    std::vector<float> x = rand_vec((size_t)(n * xp), -1.f, 1.f);
    float *dx = dev_floats(x), *dy;
    CU(cudaMalloc(&dy, (size_t)(n * yp) * 4));
    poison(dy, (size_t)(n * yp));
    CHECK(zse_cuda_matmul_scratch_bytes(&p.w, n) <= scratch_bytes, "scratch estimate");
    if (mma_only && zse_cuda_code_arch() < 80) {
        /* code without tensor cores (compute_75 PTX): the path must refuse, not trap */
        CHECK(zse_cuda_matmul_mma(&p.w, dx, xp, n, dy, yp, scratch, scratch_bytes, 0) != 0 &&
                  strstr(zse_cuda_last_error(), "sm_80"),
              "mma path on sm_%d code: not refused", zse_cuda_code_arch());
        CU(cudaDeviceSynchronize());
        cudaFree(dx);
        cudaFree(dy);
        cudaFree(p.dev);
        return;
    }
    if (mma_only)
        LAUNCH(zse_cuda_matmul_mma(&p.w, dx, xp, n, dy, yp, scratch, scratch_bytes, 0));
    else
        LAUNCH(zse_cuda_matmul(&p.w, dx, xp, n, dy, yp, cublas, scratch, scratch_bytes, 0));
    std::vector<float> y = host_floats(dy, (size_t)(n * yp)), got;
    std::vector<double> ref;
    for (int t = 0; t < n; t++)
        for (int64_t r = 0; r < rows; r++) {
            double s = 0;
            for (int64_t k = 0; k < cols; k++)
                s += ref_weight(p, r, k) * x[(size_t)(t * xp + k)];
            ref.push_back(s);
            got.push_back(y[(size_t)(t * yp + r)]);
        }
    const double e = rel_err(ref, got);
    CHECK(e < 2e-3, "%s %s n=%d: rel err %.3g", mma_only ? "mma" : "matmul", scheme_names[scheme], n, e);
    cudaFree(dx);
    cudaFree(dy);
    cudaFree(p.dev);
}

/* zse_cuda_matmul_multi: three weights over one x (q/k/v-like rows), with biases and the
 * residual accumulate, one scheme (one shared launch at n <= 8) or mixed (one by one) */
static const int64_t multi_rows[3] = {37, 13, 21};

/* cols 296 by default: 9.25 chunks, a partial last one */
static void check_matmul_multi(const int schemes[3], int n, bool accumulate,
                               const int64_t (&rows)[3] = multi_rows, int64_t cols = 296)
{
    packed p[3];
    zse_cuda_multi mm;
    memset(&mm, 0, sizeof mm);
    mm.count = 3;
    mm.accumulate = accumulate;
    const int64_t xp = pitch_of(cols);
    std::vector<float> x = rand_vec((size_t)(n * xp), -1.f, 1.f);
    float *dx = dev_floats(x);
    std::vector<float> y0[3], bias[3];
    float *dy[3], *db[3];
    for (int i = 0; i < 3; i++) {
        pack_random(p[i], schemes[i], rows[i], cols, 64);
        const int64_t yp = pitch_of(rows[i]);
        y0[i] = rand_vec((size_t)(n * yp), -2.f, 2.f);
        bias[i] = rand_vec((size_t)rows[i], -1.f, 1.f);
        dy[i] = dev_floats(y0[i]);
        db[i] = dev_floats(bias[i]);
        mm.w[i] = p[i].w;
        mm.y[i] = dy[i];
        mm.ypitch[i] = yp;
        mm.bias[i] = i == 1 ? NULL : db[i];     /* one without a bias */
    }
    CHECK(zse_cuda_matmul_multi_scratch_bytes(&mm, n) <= scratch_bytes, "multi scratch estimate");
    LAUNCH(zse_cuda_matmul_multi(&mm, dx, xp, n, cublas, scratch, scratch_bytes, 0));
    std::vector<double> ref;
    std::vector<float> got;
    for (int i = 0; i < 3; i++) {
        const int64_t yp = pitch_of(rows[i]);
        std::vector<float> y = host_floats(dy[i], (size_t)(n * yp));
        for (int t = 0; t < n; t++)
            for (int64_t r = 0; r < rows[i]; r++) {
                double v = 0;
                for (int64_t k = 0; k < cols; k++)
                    v += ref_weight(p[i], r, k) * x[(size_t)(t * xp + k)];
                if (mm.bias[i])
                    v += bias[i][(size_t)r];
                if (accumulate)
                    v += y0[i][(size_t)(t * yp + r)];
                ref.push_back(v);
                got.push_back(y[(size_t)(t * yp + r)]);
            }
        cudaFree(dy[i]);
        cudaFree(db[i]);
        cudaFree(p[i].dev);
    }
    const double e = rel_err(ref, got);
    CHECK(e < 2e-3, "matmul_multi %s/%s/%s n=%d acc=%d: rel err %.3g", scheme_names[schemes[0]],
          scheme_names[schemes[1]], scheme_names[schemes[2]], n, (int)accumulate, e);
    cudaFree(dx);
}

void test_matmul(void)
{
    const int same[3] = {Q4, Q4, Q4}, same_s[3] = {Q4S, Q4S, Q4S}, mixed[3] = {Q4, Q8, F16};
    for (int n : {1, 3, 8, 13, 40})
        for (int acc = 0; acc < 2; acc++) {
            check_matmul_multi(same, n, acc);
            check_matmul_multi(same_s, n, acc);
            check_matmul_multi(mixed, n, acc);
        }
    /* batch 1 over 32M weights or more in one launch: the 8-rows-a-block GEMV, whose row
     * groups cross from one weight to the next (rows off 8) */
    const int64_t big_rows[3] = {8193, 13, 8195};
    check_matmul_multi(same, 1, true, big_rows, 2048);
    check_matmul_multi(same_s, 1, false, big_rows, 2048);
    /* tensor cores: one launch for all three weights, whose 128-row blocks and split
     * partials sit side by side (rows off the block size, K split at 64 rows); two
     * schemes make two launches */
    const int64_t qkv_rows[3] = {300, 129, 200};
    const int mixed4[3] = {Q4, Q4S, Q4};
    for (int n : {5, 16, 33, 64})
        for (int acc = 0; acc < 2; acc++) {
            check_matmul_multi(same, n, acc, qkv_rows, 2048);
            check_matmul_multi(same_s, n, acc, qkv_rows, 1000);
        }
    check_matmul_multi(mixed4, 64, true, qkv_rows, 2048);
    check_matmul_multi(mixed4, 12, false, qkv_rows, 2048);

    /* W in slabs of 128 rows (one stream), then 256 (two halves: the next dequantized on a
     * second stream while cuBLAS multiplies), 700 x 1000 at 33 rows */
    for (int s : {Q4, Q8, F16, BF16, NF4, Q8G})
        for (int64_t slab : {128, 256}) {
            const bool split = s == F16 || s == BF16;
            const size_t xbytes = (size_t)33 * 1000 * 2 * (split ? 2 : 1);
            gemm_scratch_limit = ((xbytes + 255) & ~(size_t)255) + (size_t)slab * 1000 * 2;
            check_matmul(s, 700, 1000, s == Q8 || split ? 0 : s == Q8G ? 32 : 64, 33, true);
        }
    gemm_scratch_limit = 0;

    const int schemes[] = {F32, F16, BF16, Q8, Q4, Q4S, NF4, Q8G};
    for (int s : schemes) {
        const bool grouped = s == Q4 || s == Q4S || s == NF4 || s == Q8G;
        const int groups[] = {32, 64, 128};
        for (int gi = 0; gi < (grouped ? 3 : 1); gi++) {
            const int g = grouped ? groups[gi] : 0;
            /* rows and cols off every tile; cols off the group too */
            const int64_t shapes[][2] = {{1, 7}, {37, 100}, {129, 301}, {300, 1000}, {17, 2053}};
            for (auto &sh : shapes)
                for (int n : {1, 2, 3, 5, 8})
                    check_matmul(s, sh[0], sh[1], g, n, false);
            for (int n : {1, 9, 33, 64})
                check_matmul(s, 131, 515, g, n, true);
            check_matmul_dispatch(s, 77, 300, g, 13);
            /* int4/int4s at 9..64 rows: tensor cores (cols % 8 == 0), a partial last chunk
             * (520 = 16.25 x 32), rows off the 128-row block, every x-row tile size */
            if (s == Q4 || s == Q4S)
                for (int n : {9, 16, 17, 33, 64})
                    check_matmul_dispatch(s, 131, 520, g, n);
            /* and on its own at decode sizes (the 8-row x tile, rows of it unused) */
            if (s == Q4 || s == Q4S)
                for (int n : {1, 3, 8})
                    check_matmul_dispatch(s, 131, 520, g, n, true);
            /* long rows: K split over several blocks, partials summed after */
            if (s == Q4 || s == Q4S)
                for (int n : {9, 40})
                    check_matmul_dispatch(s, 131, 4096, g, n);
        }
    }
    /* batch 1 over a launch of 32M weights or more takes the GEMV's 8-rows-a-block shape
     * (below that, 2 warps over 4 rows, which the shapes above cover): rows off the block */
    for (int s : {Q4, Q4S})
        for (int g : {32, 128})
            check_matmul(s, 8197, 4096, g, 1, false);
    /* the tensor-core path on its own at prefill sizes (several 64-row x tiles) */
    for (int s : {Q4, Q4S})
        for (int n : {65, 200})
            check_matmul_dispatch(s, 300, 1024, 128, n, true);
    /* the dispatcher picks the path by batch size */
    packed p;
    pack_random(p, Q4, 64, 256, 128);
    CHECK(zse_cuda_matmul_gemv(&p.w, NULL, 0, 9, NULL, 0, scratch, scratch_bytes, 0) != 0, "gemv took 9 rows");
    CHECK(zse_cuda_matmul_gemv(&p.w, (float *)scratch, 4, 1, NULL, 4, scratch, 10, 0) != 0, "tiny scratch accepted");
    p.w.group_size = 48;
    CHECK(zse_cuda_matmul_gemv(&p.w, NULL, 4, 1, NULL, 4, scratch, scratch_bytes, 0) != 0, "group 48 accepted");
    cudaFree(p.dev);
}

/* ---- embed ---- */
void test_embed(void)
{
    for (int s : {F32, F16, BF16, Q8, Q4, Q4S, NF4}) {
        packed p;
        const int64_t rows = 50, cols = 197;
        pack_random(p, s, rows, cols, 64);
        std::vector<int32_t> ids = {3, 0, 49, -1, 50, 7, 7};
        const int64_t n = (int64_t)ids.size(), op = pitch_of(cols);
        int32_t *dids;
        CU(cudaMalloc(&dids, ids.size() * 4));
        CU(cudaMemcpy(dids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
        float *dout;
        CU(cudaMalloc(&dout, (size_t)(n * op) * 4));
        poison(dout, (size_t)(n * op));
        LAUNCH(zse_cuda_embed(&p.w, dids, n, dout, op, 0));
        std::vector<float> out = host_floats(dout, (size_t)(n * op)), got;
        std::vector<double> ref;
        for (int64_t t = 0; t < n; t++)
            for (int64_t k = 0; k < cols; k++) {
                int id = ids[(size_t)t];
                ref.push_back(id >= 0 && id < rows ? ref_weight(p, id, k) : 0.0);
                got.push_back(out[(size_t)(t * op + k)]);
            }
        double e = rel_err(ref, got);
        CHECK(e < 1e-6, "embed %s: rel err %.3g", scheme_names[s], e);
        cudaFree(dids);
        cudaFree(dout);
        cudaFree(p.dev);
    }
}

/* ---- elementwise, norm, rope ---- */

/* RMSNorm and SiLU·mul also writing x as the 4-bit matmul after them reads it (zse_cuda_*_prep:
 * quantized for the GEMV, f16 for tensor cores): their f32 output must equal the plain op's
 * bit for bit, and the matmul handed a zeroed x with x_ready set must give what it gives
 * converting the plain op's x itself, which shows it read the producer's x and that the
 * two agree on the layout. Shapes the prepared form cannot take run the plain op and say so
 * (0). */
static void check_prep_producer(bool silu, int kind, int scheme, int64_t dim, int n, int want_rc)
{
    const int64_t p = pitch_of(dim), rows = 300;
    std::vector<float> a = rand_vec((size_t)(n * p)), b = rand_vec((size_t)(n * p)), w = rand_vec((size_t)dim, 0.5f, 1.5f);
    float *da = dev_floats(a), *db = dev_floats(b), *dw = dev_floats(w), *dref, *dout, *dzero, *yref, *y;
    CU(cudaMalloc(&dref, (size_t)(n * p) * 4));
    CU(cudaMalloc(&dout, (size_t)(n * p) * 4));
    CU(cudaMalloc(&dzero, (size_t)(n * p) * 4));
    CU(cudaMalloc(&yref, (size_t)(n * rows) * 4));
    CU(cudaMalloc(&y, (size_t)(n * rows) * 4));
    CU(cudaMemset(dzero, 0, (size_t)(n * p) * 4));
    poison(dout, (size_t)(n * p));
    if (silu)
        LAUNCH(zse_cuda_silu_mul(da, p, db, p, n, dim, dref, p, 0));
    else
        LAUNCH(zse_cuda_rmsnorm(da, p, dw, 1e-6f, n, dim, dref, p, 0));
    packed pk;
    pack_random(pk, scheme, rows, dim, dim % 64 ? 32 : 64);
    zse_cuda_multi mm;
    memset(&mm, 0, sizeof mm);
    mm.count = 1;
    mm.w[0] = pk.w;
    mm.y[0] = yref;
    mm.ypitch[0] = rows;
    const bool consumed = want_rc == 1 && zse_cuda_xprep_kind(n) == kind;
    if (consumed)   /* the matmul converting the plain op's x itself */
        LAUNCH(zse_cuda_matmul_multi(&mm, dref, p, n, cublas, scratch, scratch_bytes, 0));
    zse_cuda_xprep xp;
    zse_cuda_xprep_at(scratch, n, dim, kind, &xp);
    CU(cudaMemset(scratch, 0xFF, zse_cuda_xprep_bytes(n, dim, kind)));
    const int rc = silu ? zse_cuda_silu_mul_prep(da, p, db, p, n, dim, dout, p, &xp, 0)
                        : zse_cuda_rmsnorm_prep(da, p, dw, 1e-6f, n, dim, dout, p, &xp, 0);
    CU(cudaDeviceSynchronize());
    const char *what = silu ? "silu_mul_prep" : "rmsnorm_prep", *how = kind == ZSE_CUDA_XPREP_Q8 ? "q8" : "f16";
    CHECK(rc == want_rc, "%s %s dim %lld n=%d: returned %d, not %d", what, how, (long long)dim, n, rc, want_rc);
    const std::vector<float> r0 = host_floats(dref, (size_t)(n * p)), r1 = host_floats(dout, (size_t)(n * p));
    size_t differ = 0;
    for (int t = 0; t < n; t++)
        for (int64_t i = 0; i < dim; i++)
            differ += memcmp(&r0[(size_t)(t * p + i)], &r1[(size_t)(t * p + i)], 4) != 0;
    CHECK(differ == 0, "%s %s dim %lld n=%d: %zu outputs differ from the plain op", what, how, (long long)dim, n,
          differ);
    if (consumed) {
        mm.y[0] = y;
        mm.x_ready = kind;
        LAUNCH(zse_cuda_matmul_multi(&mm, dzero, p, n, cublas, scratch, scratch_bytes, 0));
        const std::vector<float> g0 = host_floats(yref, (size_t)(n * rows)), g1 = host_floats(y, (size_t)(n * rows));
        const std::vector<double> ref(g0.begin(), g0.end());
        const double e = rel_err(ref, g1);
        CHECK(e < 1e-5, "%s %s dim %lld n=%d %s: the matmul on the producer's x: rel err %.3g", what, how,
              (long long)dim, n, scheme_names[scheme], e);
    }
    cudaFree(pk.dev);
    for (float *d : {da, db, dw, dref, dout, dzero, yref, y})
        cudaFree(d);
}

void test_prep_producers(void)
{
    const int q8 = ZSE_CUDA_XPREP_Q8, f16 = ZSE_CUDA_XPREP_F16;
    for (int scheme : {Q4, Q4S}) {
        /* 448 threads, one warp, a row of 8 chunks */
        for (int n : {1, 2, 4})
            for (int64_t dim : {(int64_t)3584, (int64_t)128, (int64_t)256})
                check_prep_producer(false, q8, scheme, dim, n, 1);
        for (int n : {1, 2, 4})
            for (int64_t dim : {(int64_t)18944, (int64_t)96, (int64_t)4096})
                check_prep_producer(true, q8, scheme, dim, n, 1);
        /* f16 for tensor cores at the 8, 16 and 32-row x tiles; past 32 rows the producer still
         * writes it (checked) but the matmul converts x itself */
        for (int n : {5, 8, 16, 32, 33, 64}) {
            check_prep_producer(false, f16, scheme, 3584, n, 1);
            check_prep_producer(true, f16, scheme, n == 64 ? 18944 : 1000, n, 1);
        }
    }
    /* no prepared form: not whole chunks (q8); a row past the registers (20480 floats) */
    check_prep_producer(false, q8, Q4, 100, 1, 0);
    check_prep_producer(false, q8, Q4, 20480, 1, 0);
    check_prep_producer(false, f16, Q4, 20480, 8, 0);
    check_prep_producer(true, q8, Q4, 100, 2, 0);
}

void test_elementwise(void)
{
    const int64_t rows = 7, dim = 203, p = pitch_of(dim);
    std::vector<float> a = rand_vec((size_t)(rows * p)), b = rand_vec((size_t)(rows * p)),
                       w = rand_vec((size_t)dim, 0.5f, 1.5f);
    float *da = dev_floats(a), *db = dev_floats(b), *dw = dev_floats(w), *dout;
    CU(cudaMalloc(&dout, (size_t)(rows * p) * 4));

    /* rmsnorm: the scalar kernel (203), the vector one (4, 128, 3584) and its re-read tail
     * past 4 vectors a thread (20480 > 4 * 4 * 1024) */
    for (int64_t nd : {(int64_t)203, (int64_t)4, (int64_t)128, (int64_t)3584, (int64_t)20480}) {
        const int64_t np = pitch_of(nd);
        std::vector<float> na = rand_vec((size_t)(rows * np)), nw = rand_vec((size_t)nd, 0.5f, 1.5f);
        float *dna = dev_floats(na), *dnw = dev_floats(nw), *dno;
        CU(cudaMalloc(&dno, (size_t)(rows * np) * 4));
        poison(dno, (size_t)(rows * np));
        LAUNCH(zse_cuda_rmsnorm(dna, np, dnw, 1e-6f, rows, nd, dno, np, 0));
        std::vector<float> o = host_floats(dno, (size_t)(rows * np)), got;
        std::vector<double> ref;
        for (int64_t r = 0; r < rows; r++) {
            double ss = 0;
            for (int64_t i = 0; i < nd; i++)
                ss += (double)na[(size_t)(r * np + i)] * na[(size_t)(r * np + i)];
            double inv = 1.0 / sqrt(ss / nd + 1e-6);
            for (int64_t i = 0; i < nd; i++) {
                ref.push_back(na[(size_t)(r * np + i)] * inv * nw[(size_t)i]);
                got.push_back(o[(size_t)(r * np + i)]);
            }
        }
        CHECK(rel_err(ref, got) < 1e-6, "rmsnorm dim %lld: %.3g", (long long)nd, rel_err(ref, got));
        cudaFree(dna);
        cudaFree(dnw);
        cudaFree(dno);
    }

    /* silu_mul */
    std::vector<float> o, got;
    std::vector<double> ref;
    poison(dout, (size_t)(rows * p));
    LAUNCH(zse_cuda_silu_mul(da, p, db, p, rows, dim, dout, p, 0));
    o = host_floats(dout, (size_t)(rows * p));
    ref.clear();
    got.clear();
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < dim; i++) {
            double g = a[(size_t)(r * p + i)];
            ref.push_back(g / (1 + exp(-g)) * b[(size_t)(r * p + i)]);
            got.push_back(o[(size_t)(r * p + i)]);
        }
    CHECK(rel_err(ref, got) < 1e-5, "silu_mul: %.3g", rel_err(ref, got));

    /* add, add_bias (in place on a copy of a) */
    float *dc = dev_floats(a);
    LAUNCH(zse_cuda_add(dc, p, db, p, rows, dim, 0));
    LAUNCH(zse_cuda_add_bias(dc, p, dw, rows, dim, 0));
    o = host_floats(dc, (size_t)(rows * p));
    ref.clear();
    got.clear();
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < dim; i++) {
            ref.push_back((double)a[(size_t)(r * p + i)] + b[(size_t)(r * p + i)] + w[(size_t)i]);
            got.push_back(o[(size_t)(r * p + i)]);
        }
    CHECK(rel_err(ref, got) < 1e-6, "add+bias: %.3g", rel_err(ref, got));

    /* gather rows */
    std::vector<int32_t> idx = {6, 0, 3};
    int32_t *didx;
    CU(cudaMalloc(&didx, 12));
    CU(cudaMemcpy(didx, idx.data(), 12, cudaMemcpyHostToDevice));
    poison(dout, (size_t)(rows * p));
    LAUNCH(zse_cuda_gather_rows(da, p, didx, 3, dim, dout, p, 0));
    o = host_floats(dout, (size_t)(rows * p));
    bool same = true;
    for (int i = 0; i < 3; i++)
        for (int64_t k = 0; k < dim; k++)
            same = same && o[(size_t)(i * p + k)] == a[(size_t)(idx[(size_t)i] * p + k)];
    CHECK(same, "gather_rows copies the rows asked for");

    /* rope, rotate-half pairing, with mscale */
    const int n_heads = 3, hd = 64;
    const int64_t qp = pitch_of(n_heads * hd);
    std::vector<float> q = rand_vec((size_t)(rows * qp)), inv((size_t)hd / 2);
    for (int i = 0; i < hd / 2; i++)
        inv[(size_t)i] = (float)pow(10000.0, -2.0 * i / hd);
    std::vector<int32_t> pos = {0, 1, 5, 100, 4095, 17, 32767};
    int32_t *dpos;
    CU(cudaMalloc(&dpos, pos.size() * 4));
    CU(cudaMemcpy(dpos, pos.data(), pos.size() * 4, cudaMemcpyHostToDevice));
    float *dq = dev_floats(q), *dinv = dev_floats(inv);
    LAUNCH(zse_cuda_rope(dq, qp, rows, n_heads, hd, dpos, dinv, 1.25f, 0));
    o = host_floats(dq, (size_t)(rows * qp));
    ref.clear();
    got.clear();
    for (int64_t t = 0; t < rows; t++)
        for (int h = 0; h < n_heads; h++)
            for (int i = 0; i < hd / 2; i++) {
                const float *x = &q[(size_t)(t * qp + h * hd)];
                double ang = (double)(float)((float)pos[(size_t)t] * inv[(size_t)i]);
                double c = cos(ang) * 1.25, s = sin(ang) * 1.25;
                ref.push_back(x[i] * c - x[i + hd / 2] * s);
                ref.push_back(x[i + hd / 2] * c + x[i] * s);
                got.push_back(o[(size_t)(t * qp + h * hd + i)]);
                got.push_back(o[(size_t)(t * qp + h * hd + i + hd / 2)]);
            }
    CHECK(rel_err(ref, got) < 1e-5, "rope: %.3g", rel_err(ref, got));
    for (float *d : {da, db, dw, dout, dc, dq, dinv})
        cudaFree(d);
    cudaFree(didx);
    cudaFree(dpos);
}
