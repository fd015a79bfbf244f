/* sample.cu — the per-row token kernels: argmax (greedy sampling), token masks (constrained
 * decoding) and temperature / top-k / top-p / min-p sampling on the device. */
#include "backend/cuda/common.cuh"

#include <float.h>
#include <limits.h>

/* ---- argmax of each row (greedy sampling on the device) --------------------------------
 * One block per row: each thread scans a strided slice, then a shared-memory tree keeps
 * the larger value, and the lower index on ties: zse_argmax_f32's rule (util.h). */
enum { ARGMAX_THREADS = 1024 };

__device__ __forceinline__ bool argmax_better(float va, int64_t ia, float vb, int64_t ib)
{
    return va > vb || (va == vb && ia < ib);
}

/* the row's argmax by that rule, for a block of ARGMAX_THREADS; every thread gets it */
__device__ int32_t block_argmax(const float *row, int64_t cols)
{
    __shared__ float sv[ARGMAX_THREADS];
    __shared__ int64_t si[ARGMAX_THREADS];
    float best = -INFINITY;
    int64_t at = cols; /* "none yet": loses every tie against a real index */
    for (int64_t i = threadIdx.x; i < cols; i += ARGMAX_THREADS) {
        const float v = row[i];
        if (argmax_better(v, i, best, at))
            best = v, at = i;
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = at;
    __syncthreads();
    for (int s = ARGMAX_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s && argmax_better(sv[threadIdx.x + s], si[threadIdx.x + s], sv[threadIdx.x], si[threadIdx.x])) {
            sv[threadIdx.x] = sv[threadIdx.x + s];
            si[threadIdx.x] = si[threadIdx.x + s];
        }
        __syncthreads();
    }
    const int32_t id = (int32_t)(si[0] < cols ? si[0] : 0);
    __syncthreads(); /* si may be reused by the caller's next call */
    return id;
}

__global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_kernel(const float *x, int64_t xpitch, int64_t cols, int32_t *out)
{
    pdl_enter();
    const int32_t id = block_argmax(x + (int64_t)blockIdx.x * xpitch, cols);
    if (threadIdx.x == 0)
        out[blockIdx.x] = id;
}

extern "C" int zse_cuda_argmax_rows(const float *x, int64_t xpitch, int64_t rows, int64_t cols, int32_t *out,
                                    zse_cuda_stream st)
{
    if (rows < 1 || cols < 1)
        return 0;
    zse_launch(argmax_kernel, (unsigned)rows, ARGMAX_THREADS, 0, (cudaStream_t)st, x, xpitch, cols, out);
    ZSE_CUDA_LAUNCHED("cuda argmax_rows");
    return 0;
}

/* ---- token masks (constrained decoding) --------------------------------------------------
 * A thread a mask word: a row's 32 logits of that word, -inf where the bit is 0. Rows in
 * blockIdx.y, words across x. */
__global__ void __launch_bounds__(256)
mask_rows_kernel(float *x, int64_t xpitch, int64_t cols, const int32_t *rows, const uint32_t *bits, int64_t words)
{
    pdl_enter();
    const int64_t w = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t first = w * 32;
    if (first >= cols)
        return;
    float *row = x + (int64_t)rows[blockIdx.y] * xpitch;
    const uint32_t b = w < words ? bits[(int64_t)blockIdx.y * words + w] : 0u;
    if (b == 0xFFFFFFFFu)
        return;
    const int64_t end = first + 32 < cols ? first + 32 : cols;
    for (int64_t t = first; t < end; t++)
        if (!((b >> (t - first)) & 1u))
            row[t] = -INFINITY;
}

extern "C" int zse_cuda_mask_rows(float *x, int64_t xpitch, int64_t cols, const int32_t *rows, int n,
                                  const uint32_t *bits, int64_t words, zse_cuda_stream st)
{
    if (n < 1 || cols < 1)
        return 0;
    const int64_t need_words = (cols + 31) / 32;
    const dim3 grid((unsigned)((need_words + 255) / 256), (unsigned)n);
    zse_launch(mask_rows_kernel, grid, 256, 0, (cudaStream_t)st, x, xpitch, cols, rows, bits, words);
    ZSE_CUDA_LAUNCHED("cuda mask_rows");
    return 0;
}

/* ---- sampling on the device ------------------------------------------------------------
 * One block per row, as the host sampler decides (sampler.c) but without sorting: with
 * p_i = exp((l_i - max) / T) (so the largest is 1), top-k, top-p and min-p each keep the
 * values above a threshold, and the kept set is {p_i >= tau} for the largest of the three:
 * top-k's is the k-th largest p, top-p's the largest t whose mass {p >= t} (within top-k)
 * reaches top_p of the top-k mass, min-p's is min_p itself. Thresholds are found by
 * bisection on the bits of a positive float (exact: 30 passes). The draw walks the kept ids
 * in id order with the row's uniform u: the same distribution as the host's walk in
 * probability order, not the same token for the same u. Greedy rows (T <= 0, top-k 1) take
 * the argmax. The logits row is overwritten with p. */

/* the mass (count when count_only) of the row's values >= t */
__device__ float mass_at_least(const float *p, int64_t cols, float t, bool count_only)
{
    float m = 0.f;
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
        if (p[i] >= t)
            m += count_only ? 1.f : p[i];
    return block_sum(m);
}

/* the largest t in [floor, 1] (as float bits) with mass_at_least(t) >= want */
__device__ float largest_threshold(const float *p, int64_t cols, float floor, float want, bool count_only)
{
    uint32_t lo = __float_as_uint(floor), hi = __float_as_uint(1.f);
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo + 1) / 2;
        if (mass_at_least(p, cols, __uint_as_float(mid), count_only) >= want)
            lo = mid;
        else
            hi = mid - 1;
    }
    return __uint_as_float(lo);
}

__global__ void __launch_bounds__(ARGMAX_THREADS)
sample_kernel(float *x, int64_t xpitch, int64_t cols, const zse_cuda_sample *params, int32_t *out)
{
    pdl_enter();
    __shared__ float seg[ARGMAX_THREADS], red[ARGMAX_THREADS];
    __shared__ int32_t chosen;
    float *row = x + (int64_t)blockIdx.x * xpitch;
    const zse_cuda_sample sp = params[blockIdx.x];
    if (sp.temperature <= 0.f || sp.top_k == 1) {
        const int32_t id = block_argmax(row, cols);
        if (threadIdx.x == 0)
            out[blockIdx.x] = id;
        return;
    }
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
        mx = fmaxf(mx, row[i]); /* NaN never wins */
    red[threadIdx.x] = mx;
    __syncthreads();
    for (int s = ARGMAX_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s)
            red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    mx = red[0];
    const float inv_t = 1.f / sp.temperature;
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
        const float v = row[i];
        row[i] = v == v && mx > -INFINITY ? __expf((v - mx) * inv_t) : 0.f;
    }
    __syncthreads();
    float tau = 0.f;
    if (sp.top_k > 0 && sp.top_k < cols)
        tau = largest_threshold(row, cols, 0.f, (float)sp.top_k, true);
    if (sp.top_p > 0.f && sp.top_p < 1.f) {
        const float kept = mass_at_least(row, cols, tau, false);
        tau = largest_threshold(row, cols, tau, sp.top_p * kept, false);
    }
    if (sp.min_p > 0.f)
        tau = fmaxf(tau, fminf(sp.min_p, 1.f)); /* the largest p is 1: it always stays */
    /* the draw: contiguous segments of ids, their kept mass scanned in id order */
    const int64_t per = (cols + blockDim.x - 1) / blockDim.x;
    const int64_t s0 = threadIdx.x * per, s1 = min(cols, s0 + per);
    float mine = 0.f;
    for (int64_t i = s0; i < s1; i++)
        if (row[i] >= tau)
            mine += row[i];
    seg[threadIdx.x] = mine;
    if (threadIdx.x == 0)
        chosen = -1;
    __syncthreads();
    if (threadIdx.x == 0) { /* exclusive prefix, in order (1024 adds) */
        float run = 0.f;
        for (int i = 0; i < (int)blockDim.x; i++) {
            const float v = seg[i];
            seg[i] = run;
            run += v;
        }
        red[0] = run;
    }
    __syncthreads();
    const float r = sp.u * red[0];
    if (mine > 0.f && r >= seg[threadIdx.x] && r < seg[threadIdx.x] + mine) {
        float cum = seg[threadIdx.x];
        int64_t pick = -1;
        for (int64_t i = s0; i < s1 && pick < 0; i++)
            if (row[i] >= tau && row[i] > 0.f) {
                cum += row[i];
                if (cum > r)
                    pick = i;
            }
        if (pick >= 0)
            atomicCAS(&chosen, -1, (int32_t)pick);
    }
    __syncthreads();
    if (chosen < 0) { /* rounding left r at the very end: the last kept id */
        int32_t last = -1;
        for (int64_t i = s0; i < s1; i++)
            if (row[i] >= tau && row[i] > 0.f)
                last = (int32_t)i;
        atomicMax(&chosen, last);
        __syncthreads();
    }
    if (threadIdx.x == 0)
        out[blockIdx.x] = chosen < 0 ? 0 : chosen;
}

extern "C" int zse_cuda_sample_rows(float *x, int64_t xpitch, int64_t rows, int64_t cols,
                                    const zse_cuda_sample *params, int32_t *out, zse_cuda_stream st)
{
    if (rows < 1 || cols < 1)
        return 0;
    zse_launch(sample_kernel, (unsigned)rows, ARGMAX_THREADS, 0, (cudaStream_t)st,
        x, xpitch, cols, params, out);
    ZSE_CUDA_LAUNCHED("cuda sample_rows");
    return 0;
}
