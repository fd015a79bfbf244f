/* kernels_test — the CUDA kernels against a CPU reference, then their speed.
 *
 *   kernels_test            correctness: every scheme through GEMV and GEMM on odd shapes
 *                           (rows/cols not multiples of the tiles, groups 32/64/128, batch
 *                           1..64), embed, the elementwise ops, RoPE, KV store and paged
 *                           attention (f16 and int8, GQA, sliding window, split-K decode),
 *                           MoE routing, the grouped expert matmul (every path, and experts the
 *                           table places nowhere left alone) and combine
 *   kernels_test --bench    GB/s of each matmul path on Qwen2.5-7B shapes, the device copy
 *                           bandwidth it is measured against, and attention timings
 *   kernels_test --bench int4 int4s   only the matmuls of the named schemes
 *   kernels_test --bench lora         only the LoRA delta's launches (separate and folded)
 *
 * Packed weights are built here from random codes following docs/FORMAT.md (so this
 * program needs nothing but the kernels); the reference dequantizes them in double.
 * Output ends "N passed, N failed"; exit 1 on any failure. */
#include "backend/cuda/cuda_kernels.h"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

/* scheme ids, as src/quant/quant.h numbers them (written to files: never renumbered) */
enum { F32 = 0, F16 = 1, BF16 = 2, Q8 = 3, Q4 = 4, Q4S = 5, NF4 = 6, Q8G = 7 };
static const char *scheme_names[] = {"f32", "f16", "bf16", "int8", "int4", "int4s", "nf4", "int8g"};
static const float nf4_values[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982434654236f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

static int passed, failed;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (cond) {                                                          \
            passed++;                                                        \
        } else {                                                             \
            failed++;                                                        \
            fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
        }                                                                    \
    } while (0)

#define CU(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

#define LAUNCH(call)                                                                      \
    do {                                                                                  \
        if ((call) != 0) {                                                                \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, zse_cuda_last_error()); \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

/* ---- random numbers (xorshift; a fresh seed per check) ---- */
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd_u32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float rnd_uniform(float lo, float hi) { return lo + (hi - lo) * (rnd_u32() / 4294967296.0f); }

static uint16_t f2h(float f) { __half_raw r = __half(__float2half_rn(f)); return r.x; }
static float h2f(uint16_t u) { __half_raw r; r.x = u; return __half2float(__half(r)); }
static uint16_t f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }

/* ---- a packed weight on the host and the device ---- */
struct packed {
    int scheme, group;
    int64_t rows, cols, row_bytes, groups;
    std::vector<uint8_t> bytes;
    size_t off_scales, off_mins;
    void *dev;
    zse_cuda_weight w;
};

static int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

static void pack_random(packed &p, int scheme, int64_t rows, int64_t cols, int group)
{
    p.scheme = scheme;
    p.rows = rows;
    p.cols = cols;
    p.group = group;
    p.groups = 0;
    bool four = scheme == Q4 || scheme == Q4S || scheme == NF4;
    if (four) {
        int64_t cp = round_up(cols, group);
        p.row_bytes = cp / 2;
        p.groups = cp / group;
    } else if (scheme == Q8) {
        p.row_bytes = round_up(cols, 32);
    } else if (scheme == Q8G) {
        p.row_bytes = round_up(cols, group);
        p.groups = p.row_bytes / group;
    } else {
        int es = scheme == F32 ? 4 : 2;
        p.row_bytes = round_up(cols * es, 16);     /* the loader's re-pitch */
    }
    size_t qs_bytes = (size_t)(rows * p.row_bytes);
    p.off_scales = (size_t)round_up((int64_t)qs_bytes, 256);
    size_t sc_bytes = four || scheme == Q8G ? (size_t)(rows * p.groups * 2) : scheme == Q8 ? (size_t)rows * 4 : 0;
    p.off_mins = (size_t)round_up((int64_t)(p.off_scales + sc_bytes), 256);
    size_t total = p.off_mins + (scheme == Q4 ? sc_bytes : 0);
    p.bytes.assign(total, 0);
    uint8_t *q = p.bytes.data();
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *row = q + r * p.row_bytes;
        for (int64_t k = 0; k < cols; k++) {
            if (four) {
                uint8_t v = rnd_u32() & 15;
                int64_t c = k / 32, j = k % 32;
                row[c * 16 + (j & 15)] |= (uint8_t)(j < 16 ? v : v << 4);
            } else if (scheme == Q8 || scheme == Q8G) { /* int8g (GGUF Q8_0) may hold -128 */
                row[k] = (uint8_t)(int8_t)((int)(rnd_u32() % (scheme == Q8G ? 256 : 255)) - (scheme == Q8G ? 128 : 127));
            } else if (scheme == F32) {
                float f = rnd_uniform(-1.f, 1.f);
                memcpy(row + 4 * k, &f, 4);
            } else {
                uint16_t u = scheme == F16 ? f2h(rnd_uniform(-1.f, 1.f)) : f2bf(rnd_uniform(-1.f, 1.f));
                memcpy(row + 2 * k, &u, 2);
            }
        }
    }
    if (four) {
        uint16_t *s = (uint16_t *)(q + p.off_scales), *m = (uint16_t *)(q + p.off_mins);
        for (int64_t i = 0; i < rows * p.groups; i++) {
            s[i] = f2h(rnd_uniform(0.005f, 0.05f));
            if (scheme == Q4)
                m[i] = f2h(rnd_uniform(-0.4f, 0.f));
        }
    } else if (scheme == Q8) {
        float *s = (float *)(q + p.off_scales);
        for (int64_t r = 0; r < rows; r++)
            s[r] = rnd_uniform(0.001f, 0.01f);
    } else if (scheme == Q8G) {
        uint16_t *s = (uint16_t *)(q + p.off_scales);
        for (int64_t i = 0; i < rows * p.groups; i++)
            s[i] = f2h(rnd_uniform(0.001f, 0.01f));
    }
    CU(cudaMalloc(&p.dev, total));
    CU(cudaMemcpy(p.dev, q, total, cudaMemcpyHostToDevice));
    uint8_t *d = (uint8_t *)p.dev;
    p.w.scheme = scheme;
    p.w.rows = rows;
    p.w.cols = cols;
    p.w.group_size = group;
    p.w.qs = d;
    p.w.scales = (four || scheme == Q8 || scheme == Q8G) ? d + p.off_scales : NULL;
    p.w.mins = scheme == Q4 ? d + p.off_mins : NULL;
    p.w.row_bytes = p.row_bytes;
    p.w.groups = p.groups;
}

static double ref_weight(const packed &p, int64_t r, int64_t k)
{
    const uint8_t *row = p.bytes.data() + r * p.row_bytes;
    switch (p.scheme) {
    case F32: { float f; memcpy(&f, row + 4 * k, 4); return f; }
    case F16: { uint16_t u; memcpy(&u, row + 2 * k, 2); return h2f(u); }
    case BF16: { uint16_t u; memcpy(&u, row + 2 * k, 2); return bf2f(u); }
    case Q8: return (double)(int8_t)row[k] * ((const float *)(p.bytes.data() + p.off_scales))[r];
    case Q8G: return (double)(int8_t)row[k] * h2f(((const uint16_t *)(p.bytes.data() + p.off_scales))[r * p.groups + k / p.group]);
    default: break;
    }
    int64_t c = k / 32, j = k % 32;
    uint8_t byte = row[c * 16 + (j & 15)];
    int v = j < 16 ? byte & 15 : byte >> 4;
    int64_t g = k / p.group;
    double s = h2f(((const uint16_t *)(p.bytes.data() + p.off_scales))[r * p.groups + g]);
    if (p.scheme == Q4)
        return v * s + h2f(((const uint16_t *)(p.bytes.data() + p.off_mins))[r * p.groups + g]);
    if (p.scheme == Q4S)
        return (v - 8) * s;
    return nf4_values[v] * s;
}

static size_t packed_bytes(const packed &p) { return p.bytes.size(); }

static std::vector<float> rand_vec(size_t n, float lo = -2.f, float hi = 2.f)
{
    std::vector<float> v(n);
    for (auto &f : v)
        f = rnd_uniform(lo, hi);
    return v;
}

/* ---- activations: f32 [n][pitch] ---- */
static int64_t pitch_of(int64_t cols) { return round_up(cols, 4); }

static float *dev_floats(const std::vector<float> &h)
{
    float *d;
    CU(cudaMalloc(&d, h.size() * 4 + 16));
    CU(cudaMemcpy(d, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    return d;
}

static std::vector<float> host_floats(const float *d, size_t n)
{
    std::vector<float> h(n);
    CU(cudaDeviceSynchronize());
    CU(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
    return h;
}

/* ||a - b|| / ||b|| over the used entries; NaN (an unwritten poisoned output) fails */
static double rel_err(const std::vector<double> &ref, const std::vector<float> &got)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        if (!std::isfinite(got[i]))
            return INFINITY;
        num += (got[i] - ref[i]) * (got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void poison(float *d, size_t n) { CU(cudaMemset(d, 0xFF, n * 4)); }  /* NaN */

/* ---- matmul ---- */
static cublasHandle_t cublas;
static void *scratch;
static const size_t scratch_bytes = (size_t)256 << 20;

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

static void test_matmul(void)
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
static void test_embed(void)
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

static void test_prep_producers(void)
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

static void test_elementwise(void)
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

static void test_sample(void)
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
static void test_rope_kv_store(void)
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

static void test_attention(void)
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

/* ---- bench ---------------------------------------------------------------------------- */

static float time_ms(cudaStream_t st, int iters, void (*fn)(void *), void *arg)
{
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    for (int i = 0; i < 3; i++)
        fn(arg);
    std::vector<float> t;
    for (int i = 0; i < iters; i++) {
        CU(cudaEventRecord(a, st));
        fn(arg);
        CU(cudaEventRecord(b, st));
        CU(cudaEventSynchronize(b));
        float ms;
        CU(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return t[t.size() / 2];
}

/* per call, when `reps` calls run back to back (as a decode step issues them): the launch
 * gaps shrink to what the GPU itself needs between kernels */
static float time_stream_ms(int reps, void (*fn)(void *), void *arg)
{
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    fn(arg);
    std::vector<float> t;
    for (int i = 0; i < 5; i++) {
        CU(cudaEventRecord(a, 0));
        for (int r = 0; r < reps; r++)
            fn(arg);
        CU(cudaEventRecord(b, 0));
        CU(cudaEventSynchronize(b));
        float ms;
        CU(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms / reps);
    }
    std::sort(t.begin(), t.end());
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return t[t.size() / 2];
}

/* cuBLAS alone on a prefill-sized product, to see what the GEMM path can reach */
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

static void bench_lora(void); /* below, beside the LoRA checks */
static void bench_lora_fold(void);

static void bench(int argc, char **argv)
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

static void test_moe(void)
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

static void bench_lora(void)
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

static void bench_lora_fold(void)
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

static void test_lora(void)
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
    printf("lora done: %d passed, %d failed\n", passed, failed);
}

int main(int argc, char **argv)
{
    bool do_bench = argc > 1 && strcmp(argv[1], "--bench") == 0;
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("no CUDA device: skipped\n");
        return 77;
    }
    cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s (compute capability %d.%d), %d SMs, %.0f MB L2; code built for sm_%d\n", prop.name, prop.major,
           prop.minor, prop.multiProcessorCount, prop.l2CacheSize / 1e6, zse_cuda_code_arch());
    if (cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "cuBLAS did not initialize\n");
        return 2;
    }
    CU(cudaMalloc(&scratch, scratch_bytes));
    if (do_bench) {
        bench(argc, argv);
        return 0;
    }
    test_matmul();
    printf("matmul done: %d passed, %d failed\n", passed, failed);
    test_embed();
    test_elementwise();
    test_prep_producers();
    test_rope_kv_store();
    test_sample();
    test_attention();
    test_moe();
    test_lora();
    CU(cudaDeviceSynchronize());
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
