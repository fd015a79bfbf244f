/* matmul.cu — y = W·x for every packed scheme, reading the .zse layouts as stored.
 *
 * Decode (n <= 8 rows of x): a GEMV whose warps each own ROWS weight rows. A lane streams
 * one 16-byte unit of each of its rows per step (coalesced: a warp reads 512 contiguous
 * bytes per row), decodes it in registers and multiplies it with the matching x values of
 * every batch row, accumulating in fp32. Sharing one x load across ROWS rows keeps the
 * L1 traffic for x below the L1's bandwidth; the weight loads bypass L1.
 *
 * Prefill and wide batches: W is dequantized to f16 in slabs and multiplied by cuBLAS
 * (tensor cores, fp32 accumulation). For plain f16/bf16 weights, x is split into two f16
 * halves (hi + lo) so the product keeps fp32-grade precision; f32 weights use SGEMM. */
#include "backend/cuda/common.cuh"

#include <cublas_v2.h>
#include <stdarg.h>
#include <stdio.h>

static __thread char cuda_error[512];

extern "C" const char *zse_cuda_last_error(void) { return cuda_error; }

int zse_cuda_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cuda_error, sizeof cuda_error, fmt, ap);
    va_end(ap);
    return -1;
}

/* NF4 code values; the backend overwrites them with src/quant's zse_nf4_values at start
 * (zse_cuda_set_nf4) so both backends decode with the same 16 numbers. */
__constant__ float zse_cuda_nf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982434654236f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

extern "C" int zse_cuda_set_nf4(const float values[16])
{
    cudaError_t e = cudaMemcpyToSymbol(zse_cuda_nf4, values, 16 * sizeof(float));
    if (e != cudaSuccess)
        return zse_cuda_fail("cuda: setting the NF4 table: %s", cudaGetErrorString(e));
    return 0;
}

/* ---- GEMV ------------------------------------------------------------------------- */

enum { GEMV_WARPS = 4 };
/* rows per warp: 4 while registers allow (fewer x re-reads), 2 for wide batches */
template <int B> struct gemv_rows { static constexpr int R = B <= 2 ? 4 : 2; };

/* x[b][k0 .. k0+3], zero past cols; the pitch is a multiple of 4 so a whole float4 is
 * inside the row's storage whenever its first element is. */
__device__ __forceinline__ float4 load_x4(const float *xr, int64_t k, int64_t cols)
{
    if (k + 4 <= cols)
        return __ldg(reinterpret_cast<const float4 *>(xr + k));
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (k < cols) {
        float4 t = __ldg(reinterpret_cast<const float4 *>(xr + k));
        v.x = t.x;
        if (k + 1 < cols) v.y = t.y;
        if (k + 2 < cols) v.z = t.z;
        if (k + 3 < cols) v.w = t.w;
    }
    return v;
}

template <int S, int B>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_kernel(const zse_cuda_weight w, const float *__restrict__ x, int64_t xpitch, int n,
            float *__restrict__ y, int64_t ypitch)
{
    typedef scheme_traits<S> T;
    typedef scheme_scales<S> SC;
    constexpr int GEMV_ROWS = gemv_rows<B>::R;
    __shared__ float table[16];
    if (S == ZSE_SCHEME_NF4) {
        if (threadIdx.x < 16)
            table[threadIdx.x] = zse_cuda_nf4[threadIdx.x];
        __syncthreads();
    }
    const int lane = threadIdx.x & 31;
    const int64_t row0 = ((int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * GEMV_ROWS;
    if (row0 >= w.rows)
        return;

    /* rows past the end re-read the last row (valid memory) and are not stored */
    const uint8_t *rowp[GEMV_ROWS];
    int64_t rr[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        rr[r] = min(row0 + r, w.rows - 1);
        rowp[r] = (const uint8_t *)w.qs + rr[r] * w.row_bytes;
    }
    const float *xr[B];
#pragma unroll
    for (int b = 0; b < B; b++)
        xr[b] = x + (int64_t)min(b, n - 1) * xpitch;

    float acc[B][GEMV_ROWS];
#pragma unroll
    for (int b = 0; b < B; b++)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
            acc[b][r] = 0.f;

    const int64_t n_units = zse_ceil_div(w.cols, T::E);
    for (int64_t u = lane; u < n_units; u += 32) {
        uint4 wv[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
            wv[r] = ld_stream16(rowp[r] + u * 16);
        float sc[GEMV_ROWS], mn[GEMV_ROWS];
        if (SC::group) {
            const int64_t g = u * T::E / w.group_size;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                sc[r] = __half2float(((const __half *)w.scales)[rr[r] * w.groups + g]);
                mn[r] = SC::min ? __half2float(((const __half *)w.mins)[rr[r] * w.groups + g]) : 0.f;
            }
        }
        const int64_t k0 = u * T::E;
        float dot[B][GEMV_ROWS], sx[B];
#pragma unroll
        for (int b = 0; b < B; b++) {
            sx[b] = 0.f;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++)
                dot[b][r] = 0.f;
        }
#pragma unroll
        for (int p = 0; p < T::P; p++) {
            float f[GEMV_ROWS][8];
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++)
                T::piece(wv[r], p, table, f[r]);
#pragma unroll
            for (int b = 0; b < B; b++) {
                float xv[8];
                float4 a = load_x4(xr[b], k0 + T::off0(p), w.cols);
                xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
                if (T::NV == 8) {
                    float4 c = load_x4(xr[b], k0 + T::off1(p), w.cols);
                    xv[4] = c.x; xv[5] = c.y; xv[6] = c.z; xv[7] = c.w;
                }
                if (SC::min) {
#pragma unroll
                    for (int j = 0; j < T::NV; j++)
                        sx[b] += xv[j];
                }
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
                    for (int j = 0; j < T::NV; j++)
                        dot[b][r] = fmaf(f[r][j], xv[j], dot[b][r]);
            }
        }
#pragma unroll
        for (int b = 0; b < B; b++)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                if (SC::group) {
                    acc[b][r] = fmaf(sc[r], dot[b][r], acc[b][r]);
                    if (SC::min)
                        acc[b][r] = fmaf(mn[r], sx[b], acc[b][r]);
                } else {
                    acc[b][r] += dot[b][r];
                }
            }
    }

#pragma unroll
    for (int b = 0; b < B; b++)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            float v = acc[b][r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
                v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[b][r] = v;
        }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            if (row0 + r >= w.rows)
                break;
            const float rs = SC::row ? ((const float *)w.scales)[row0 + r] : 1.f;
#pragma unroll
            for (int b = 0; b < B; b++)
                if (b < n)
                    y[(int64_t)b * ypitch + row0 + r] = acc[b][r] * rs;
        }
    }
}

static int check_weight(const zse_cuda_weight *w)
{
    if (w->rows <= 0 || w->cols <= 0)
        return zse_cuda_fail("cuda matmul: empty weight %lld x %lld", (long long)w->rows,
                             (long long)w->cols);
    if (((uintptr_t)w->qs & 15) || (w->row_bytes & 15))
        return zse_cuda_fail("cuda matmul: weight rows are not 16-byte aligned (row_bytes %lld)",
                             (long long)w->row_bytes);
    bool g = w->scheme == ZSE_SCHEME_Q4 || w->scheme == ZSE_SCHEME_Q4S || w->scheme == ZSE_SCHEME_NF4;
    if (g && (w->group_size < 32 || w->group_size % 32 != 0))
        return zse_cuda_fail("cuda matmul: group size %d is not a multiple of 32", w->group_size);
    return 0;
}

template <int S, int B>
static void launch_gemv(const zse_cuda_weight *w, const float *x, int64_t xp, int n, float *y,
                        int64_t yp, cudaStream_t st)
{
    const int64_t per_block = GEMV_WARPS * gemv_rows<B>::R;
    dim3 grid((unsigned)zse_ceil_div(w->rows, per_block));
    gemv_kernel<S, B><<<grid, GEMV_WARPS * 32, 0, st>>>(*w, x, xp, n, y, yp);
}

template <int S>
static void launch_gemv_batch(const zse_cuda_weight *w, const float *x, int64_t xp, int n,
                              float *y, int64_t yp, cudaStream_t st)
{
    if (n == 1) launch_gemv<S, 1>(w, x, xp, n, y, yp, st);
    else if (n == 2) launch_gemv<S, 2>(w, x, xp, n, y, yp, st);
    else if (n <= 4) launch_gemv<S, 4>(w, x, xp, n, y, yp, st);
    else launch_gemv<S, 8>(w, x, xp, n, y, yp, st);
}

extern "C" int zse_cuda_matmul_gemv(const zse_cuda_weight *w, const float *x, int64_t xpitch,
                                    int64_t n, float *y, int64_t ypitch, zse_cuda_stream st)
{
    if (check_weight(w) != 0)
        return -1;
    if (n < 1 || n > ZSE_CUDA_GEMV_MAX)
        return zse_cuda_fail("cuda gemv: %lld rows of x (1..%d)", (long long)n, ZSE_CUDA_GEMV_MAX);
    if ((xpitch & 3) || ((uintptr_t)x & 15))
        return zse_cuda_fail("cuda gemv: x pitch %lld is not a multiple of 4 floats", (long long)xpitch);
    ZSE_CUDA_SCHEME_SWITCH(w->scheme, launch_gemv_batch<S_>(w, x, xpitch, (int)n, y, ypitch, (cudaStream_t)st));
    ZSE_CUDA_LAUNCHED("cuda gemv");
    return 0;
}

/* ---- dequantization (to f16 for the GEMM path, to f32 for embeddings) -------------- */

template <int S, typename O>
__device__ __forceinline__ void dequant_unit(const zse_cuda_weight &w, int64_t row, int64_t u,
                                             const float *table, O *out)
{
    typedef scheme_traits<S> T;
    typedef scheme_scales<S> SC;
    const uint4 v = *reinterpret_cast<const uint4 *>((const uint8_t *)w.qs + row * w.row_bytes + u * 16);
    float sc = 1.f, mn = 0.f;
    if (SC::group) {
        const int64_t g = u * T::E / w.group_size;
        sc = __half2float(((const __half *)w.scales)[row * w.groups + g]);
        if (SC::min)
            mn = __half2float(((const __half *)w.mins)[row * w.groups + g]);
    }
    if (SC::row)
        sc = ((const float *)w.scales)[row];
    const int64_t k0 = u * T::E;
#pragma unroll
    for (int p = 0; p < T::P; p++) {
        float f[8];
        T::piece(v, p, table, f);
#pragma unroll
        for (int j = 0; j < T::NV; j++) {
            const int64_t k = k0 + (j < 4 ? T::off0(p) + j : T::off1(p) + j - 4);
            if (k < w.cols) {
                const float val = fmaf(f[j], sc, mn);
                if (sizeof(O) == 2)
                    ((__half *)out)[k] = __float2half_rn(val);
                else
                    ((float *)out)[k] = val;
            }
        }
    }
}

template <int S>
__global__ void dequant_f16_kernel(const zse_cuda_weight w, int64_t row0, int64_t nrows,
                                   __half *out, int64_t opitch)
{
    __shared__ float table[16];
    if (threadIdx.x < 16)
        table[threadIdx.x] = zse_cuda_nf4[threadIdx.x];
    __syncthreads();
    const int64_t n_units = zse_ceil_div(w.cols, scheme_traits<S>::E);
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_units * nrows)
        return;
    const int64_t r = i / n_units, u = i % n_units;
    dequant_unit<S>(w, row0 + r, u, table, out + r * opitch);
}

template <int S>
__global__ void embed_kernel(const zse_cuda_weight w, const int32_t *ids, float *out, int64_t opitch)
{
    __shared__ float table[16];
    if (threadIdx.x < 16)
        table[threadIdx.x] = zse_cuda_nf4[threadIdx.x];
    __syncthreads();
    const int64_t t = blockIdx.y;
    const int64_t n_units = zse_ceil_div(w.cols, scheme_traits<S>::E);
    const int32_t id = ids[t];
    float *o = out + t * opitch;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < n_units;
         u += (int64_t)gridDim.x * blockDim.x) {
        if (id < 0 || id >= w.rows) {
            for (int64_t k = u * scheme_traits<S>::E; k < min((u + 1) * scheme_traits<S>::E, w.cols); k++)
                o[k] = 0.f;
        } else {
            dequant_unit<S>(w, id, u, table, o);
        }
    }
}

template <int S>
static void launch_dequant(const zse_cuda_weight *w, int64_t row0, int64_t nrows, __half *out,
                           int64_t opitch, cudaStream_t st)
{
    const int64_t total = zse_ceil_div(w->cols, scheme_traits<S>::E) * nrows;
    dequant_f16_kernel<S><<<(unsigned)zse_ceil_div(total, 256), 256, 0, st>>>(*w, row0, nrows, out, opitch);
}

extern "C" int zse_cuda_dequant_f16(const zse_cuda_weight *w, int64_t row0, int64_t nrows,
                                    uint16_t *out, int64_t opitch, zse_cuda_stream st)
{
    if (check_weight(w) != 0)
        return -1;
    if (row0 < 0 || nrows < 1 || row0 + nrows > w->rows)
        return zse_cuda_fail("cuda dequant: rows %lld..%lld outside the weight's %lld",
                             (long long)row0, (long long)(row0 + nrows), (long long)w->rows);
    ZSE_CUDA_SCHEME_SWITCH(w->scheme, launch_dequant<S_>(w, row0, nrows, (__half *)out, opitch, (cudaStream_t)st));
    ZSE_CUDA_LAUNCHED("cuda dequant");
    return 0;
}

template <int S>
static void launch_embed(const zse_cuda_weight *w, const int32_t *ids, int64_t n, float *out,
                         int64_t opitch, cudaStream_t st)
{
    const int64_t units = zse_ceil_div(w->cols, scheme_traits<S>::E);
    dim3 grid((unsigned)zse_ceil_div(units, 128), (unsigned)n);
    embed_kernel<S><<<grid, 128, 0, st>>>(*w, ids, out, opitch);
}

extern "C" int zse_cuda_embed(const zse_cuda_weight *w, const int32_t *ids, int64_t n, float *out,
                              int64_t opitch, zse_cuda_stream st)
{
    if (check_weight(w) != 0)
        return -1;
    if (n < 1 || n > 65535)
        return zse_cuda_fail("cuda embed: %lld tokens (1..65535 per call)", (long long)n);
    ZSE_CUDA_SCHEME_SWITCH(w->scheme, launch_embed<S_>(w, ids, n, out, opitch, (cudaStream_t)st));
    ZSE_CUDA_LAUNCHED("cuda embed");
    return 0;
}

/* ---- GEMM through cuBLAS ------------------------------------------------------------ */

/* x f32 [n][xpitch] -> f16 hi [n][cols] (and lo = f16(x - hi) when lo != NULL) */
__global__ void split_x_kernel(const float *x, int64_t xpitch, int64_t n, int64_t cols,
                               __half *hi, __half *lo)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * cols)
        return;
    const int64_t t = i / cols, k = i % cols;
    const float v = x[t * xpitch + k];
    const __half h = __float2half_rn(v);
    hi[i] = h;
    if (lo)
        lo[i] = __float2half_rn(v - __half2float(h));
}

static int cublas_ok(cublasStatus_t s, const char *what)
{
    if (s != CUBLAS_STATUS_SUCCESS)
        return zse_cuda_fail("cuda gemm: %s failed (cuBLAS status %d)", what, (int)s);
    return 0;
}

/* y[t][row0 + i] = sum_k A[i][k] * X[t][k]: A f16 [m][lda] row-major is the column-major
 * k x m matrix A^T, so C^T = op(T)(A) * X^T in cuBLAS terms; C = y column-major with ldc =
 * ypitch. */
static int gemm_f16(cublasHandle_t h, const __half *a, int64_t lda, int64_t m, const __half *xh,
                    int64_t n, int64_t k, float *y, int64_t ypitch, float beta)
{
    const float one = 1.f;
    return cublas_ok(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)k, &one, a,
                                  CUDA_R_16F, (int)lda, xh, CUDA_R_16F, (int)k, &beta, y,
                                  CUDA_R_32F, (int)ypitch, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx");
}

extern "C" int zse_cuda_matmul_gemm(const zse_cuda_weight *w, const float *x, int64_t xpitch,
                                    int64_t n, float *y, int64_t ypitch, void *cublas,
                                    void *scratch, size_t scratch_bytes, zse_cuda_stream st)
{
    if (check_weight(w) != 0)
        return -1;
    cublasHandle_t h = (cublasHandle_t)cublas;
    if (cublas_ok(cublasSetStream(h, (cudaStream_t)st), "cublasSetStream") != 0)
        return -1;
    const int64_t k = w->cols;
    if (w->scheme == ZSE_SCHEME_F32) {
        /* f32 weights: plain SGEMM on the stored rows, no conversion */
        const float one = 1.f, zero = 0.f;
        return cublas_ok(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)w->rows, (int)n, (int)k,
                                     &one, (const float *)w->qs, (int)(w->row_bytes / 4), x,
                                     (int)xpitch, &zero, y, (int)ypitch),
                         "cublasSgemm");
    }
    /* plain 16-bit weights keep fp32-grade x through the hi/lo split */
    const bool split = w->scheme == ZSE_SCHEME_F16 || w->scheme == ZSE_SCHEME_BF16;
    const size_t xbytes = (size_t)n * k * sizeof(__half) * (split ? 2 : 1);
    const size_t xalloc = (xbytes + 255) & ~(size_t)255;
    const int64_t lda = (k + 7) & ~(int64_t)7;
    const size_t row_f16 = (size_t)lda * sizeof(__half);
    if (scratch_bytes < xalloc + row_f16 * 64)
        return zse_cuda_fail("cuda gemm: scratch of %zu bytes is too small for %lld x %lld",
                             scratch_bytes, (long long)n, (long long)k);
    __half *xh = (__half *)scratch, *xl = split ? xh + n * k : NULL;
    __half *slab = (__half *)((uint8_t *)scratch + xalloc);
    int64_t slab_rows = (int64_t)((scratch_bytes - xalloc) / row_f16);
    slab_rows = slab_rows >= 128 ? slab_rows & ~(int64_t)127 : slab_rows;
    split_x_kernel<<<(unsigned)zse_ceil_div(n * k, 256), 256, 0, (cudaStream_t)st>>>(x, xpitch, n, k, xh, xl);
    ZSE_CUDA_LAUNCHED("cuda gemm: x to f16");
    for (int64_t r0 = 0; r0 < w->rows; r0 += slab_rows) {
        const int64_t m = min(slab_rows, w->rows - r0);
        if (zse_cuda_dequant_f16(w, r0, m, (uint16_t *)slab, lda, st) != 0)
            return -1;
        if (gemm_f16(h, slab, lda, m, xh, n, k, y + r0, ypitch, 0.f) != 0)
            return -1;
        if (split && gemm_f16(h, slab, lda, m, xl, n, k, y + r0, ypitch, 1.f) != 0)
            return -1;
    }
    return 0;
}

extern "C" int zse_cuda_matmul(const zse_cuda_weight *w, const float *x, int64_t xpitch, int64_t n,
                               float *y, int64_t ypitch, void *cublas, void *scratch,
                               size_t scratch_bytes, zse_cuda_stream st)
{
    if (n <= ZSE_CUDA_GEMV_MAX)
        return zse_cuda_matmul_gemv(w, x, xpitch, n, y, ypitch, st);
    return zse_cuda_matmul_gemm(w, x, xpitch, n, y, ypitch, cublas, scratch, scratch_bytes, st);
}
