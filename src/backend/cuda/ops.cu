/* ops.cu — the non-matmul ops: RMSNorm, bias, SiLU·mul, residual add, row gather, RoPE,
 * paged KV store (f16 / int8) and attention over the paged cache.
 *
 * Attention is one kernel for prefill and decode: a warp owns one (token, head, split) and
 * walks that split's visible cache positions with an online softmax, 32 keys a tile,
 * keeping its share of the head's dimensions (lane + 32 i) in registers (head dims that
 * are not a multiple of 16 take a key-at-a-time variant). When there are too few (token, head)
 * pairs to fill the GPU — decode — the visible range is split (flash-decoding) and a second
 * kernel merges the partial softmax states; otherwise the warp writes the output itself. */
#include "backend/cuda/common.cuh"

#include <float.h>
#include <limits.h>

enum { EW_THREADS = 256 };

/* ---- RMSNorm --------------------------------------------------------------------- */

/* every thread of the block gets the sum of v over the block */
__device__ float block_sum(float v)
{
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0)
            part[0] = v;
    }
    __syncthreads();
    v = part[0];
    __syncthreads();
    return v;
}


/* x quantized for the int4 dp4a GEMV (q8_codes; matmul.cu's quantize_x_kernel gives the same
 * numbers but for the order of the chunk sum): a 32-value chunk held 4 values a lane by 8
 * consecutive lanes (p = lane % 8) gives its 32 high and 32 low int8 codes at xq_chunk
 * and (d, dl, sum) at *xs_chunk. The producer of x writing this saves the GEMV a launch
 * that would quantize it. Every lane of the warp calls it (the 8-lane shuffles); `valid`
 * says whether its chunk exists. */
__device__ __forceinline__ void q8_store_chunk(float4 v, bool valid, uint8_t *xq_chunk, float4 *xs_chunk, int p)
{
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    float sx = (v.x + v.y) + (v.z + v.w);
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        sx += __shfl_xor_sync(0xffffffffu, sx, o);
    }
    if (!valid)
        return;
    const float d = amax / 127.f, dl = d / 254.f;
    const float f[4] = {v.x, v.y, v.z, v.w};
    uint32_t hw = 0, lw = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float h, l;
        q8_codes(f[j], d, dl, h, l);
        hw |= ((uint32_t)(int)h & 0xFFu) << (8 * j);
        lw |= ((uint32_t)(int)l & 0xFFu) << (8 * j);
    }
    reinterpret_cast<uint32_t *>(xq_chunk)[p] = hw;
    reinterpret_cast<uint32_t *>(xq_chunk + 32)[p] = lw;
    if (p == 0)
        *xs_chunk = make_float4(d, dl, sx, 0.f);
}

/* a thread's 4 values of x as the matmul after it reads them (zse_cuda_xprep): quantized
 * (M == ZSE_CUDA_XPREP_Q8; every lane of the warp calls it) or in f16 for the tensor-core
 * kernel (M == ZSE_CUDA_XPREP_F16, as its own conversion rounds them). i: the float4's index
 * in its row of dim values. */
template <int M>
__device__ __forceinline__ void xprep_store(float4 v, bool valid, const zse_cuda_xprep &xp, int64_t row, int64_t dim,
                                            int64_t i)
{
    if (M == ZSE_CUDA_XPREP_Q8) {
        const int64_t chunk = row * (dim / 32) + i / 8;
        q8_store_chunk(v, valid, (uint8_t *)xp.x + chunk * 64, (float4 *)xp.scales + chunk, (int)(i & 7));
    } else if (M == ZSE_CUDA_XPREP_F16 && valid) {
        const __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
        uint2 u;
        u.x = *reinterpret_cast<const uint32_t *>(&a);
        u.y = *reinterpret_cast<const uint32_t *>(&b);
        reinterpret_cast<uint2 *>((__half *)xp.x + row * dim)[i] = u;
    }
}

__global__ void rmsnorm_kernel(const float *x, int64_t xpitch, const float *w, float eps,
                               int64_t dim, float *out, int64_t opitch)
{
    pdl_enter();
    const float *xr = x + blockIdx.x * xpitch;
    float *o = out + blockIdx.x * opitch;
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
        ss = fmaf(xr[i], xr[i], ss);
    const float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
        o[i] = xr[i] * inv * w[i];
}

/* The same in one pass over 16-byte vectors held in registers: every load of a row is issued
 * before the sum needs it, so a row costs one memory latency, not one per loop trip (the
 * loop above, 256 threads over 3584 floats, waits 14 times: 14 us against 2 on an H100).
 * dim, the pitches and the pointers are multiples of 4 floats; rows longer than
 * RMS_VEC * 4 * blockDim re-read the rest. */
enum { RMS_VEC = 4 };

template <int M>
__global__ void rmsnorm_vec_kernel(const float *x, int64_t xpitch, const float *w, float eps,
                                   int64_t dim, float *out, int64_t opitch, const zse_cuda_xprep xp)
{
    pdl_enter();
    const float4 *xr = reinterpret_cast<const float4 *>(x + blockIdx.x * xpitch);
    const float4 *w4 = reinterpret_cast<const float4 *>(w);
    float4 *o = reinterpret_cast<float4 *>(out + blockIdx.x * opitch);
    const int64_t n4 = dim / 4, step = blockDim.x;
    float4 c[RMS_VEC];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < RMS_VEC; j++) {
        const int64_t i = threadIdx.x + j * step;
        c[j] = i < n4 ? xr[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < RMS_VEC; j++)
        ss += c[j].x * c[j].x + c[j].y * c[j].y + c[j].z * c[j].z + c[j].w * c[j].w;
    for (int64_t i = threadIdx.x + RMS_VEC * step; i < n4; i += step) {
        const float4 v = xr[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
#pragma unroll
    for (int j = 0; j < RMS_VEC; j++) {
        const int64_t i = threadIdx.x + j * step;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < n4) {
            const float4 g = w4[i];
            v = make_float4(c[j].x * inv * g.x, c[j].y * inv * g.y, c[j].z * inv * g.z, c[j].w * inv * g.w);
            o[i] = v;
        }
        /* M: the row fits the registers (no loop below), and dim % 32 == 0 with a block of
         * whole warps, so a chunk's 8 lanes are 8 aligned lanes of one warp, all in or out */
        if (M)
            xprep_store<M>(v, i < n4, xp, blockIdx.x, dim, i);
    }
    for (int64_t i = threadIdx.x + RMS_VEC * step; i < n4; i += step) {
        const float4 v = xr[i], g = w4[i];
        o[i] = make_float4(v.x * inv * g.x, v.y * inv * g.y, v.z * inv * g.z, v.w * inv * g.w);
    }
}

static bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* the vector kernel's block for rows of dim floats: two vectors a thread, 448 threads for a
 * 3584-wide row, one warp for a 128-wide head */
static unsigned rmsnorm_threads(int64_t dim)
{
    const int64_t n4 = dim / 4;
    int64_t threads = (n4 + 1) / 2;
    threads = threads < 32 ? 32 : threads > 1024 ? 1024 : (threads + 31) / 32 * 32;
    return (unsigned)threads;
}

static bool rmsnorm_vec_ok(const float *x, int64_t xpitch, const float *w, int64_t dim, const float *out,
                           int64_t opitch)
{
    return dim % 4 == 0 && xpitch % 4 == 0 && opitch % 4 == 0 && aligned16(x) && aligned16(w) && aligned16(out);
}

extern "C" int zse_cuda_rmsnorm(const float *x, int64_t xpitch, const float *w, float eps,
                                int64_t rows, int64_t dim, float *out, int64_t opitch,
                                zse_cuda_stream st)
{
    if (rows < 1 || dim < 1)
        return 0;
    if (rows > 0x7fffffff)
        return zse_cuda_fail("cuda rmsnorm: %lld rows", (long long)rows);
    if (rmsnorm_vec_ok(x, xpitch, w, dim, out, opitch)) {
        const zse_cuda_xprep none = {ZSE_CUDA_XPREP_NONE, NULL, NULL};
        zse_launch(rmsnorm_vec_kernel<ZSE_CUDA_XPREP_NONE>, (unsigned)rows, rmsnorm_threads(dim), 0,
            (cudaStream_t)st, x, xpitch, w, eps, dim, out, opitch, none);
    } else {
        const int threads = dim >= 1024 ? 256 : dim >= 256 ? 128 : 64;
        zse_launch(rmsnorm_kernel, (unsigned)rows, threads, 0, (cudaStream_t)st,
            x, xpitch, w, eps, dim, out, opitch);
    }
    ZSE_CUDA_LAUNCHED("cuda rmsnorm");
    return 0;
}

/* x prepared as xp asks fits: whole 32-value chunks, 16-byte vectors, planes aligned */
static bool xprep_ok(int64_t dim, const zse_cuda_xprep *xp)
{
    if (xp->kind == ZSE_CUDA_XPREP_Q8)
        return dim % 32 == 0 && ((uintptr_t)xp->x & 3) == 0 && aligned16(xp->scales);
    return xp->kind == ZSE_CUDA_XPREP_F16 && dim % 4 == 0 && ((uintptr_t)xp->x & 7) == 0;
}

extern "C" int zse_cuda_rmsnorm_prep(const float *x, int64_t xpitch, const float *w, float eps, int64_t rows,
                                     int64_t dim, float *out, int64_t opitch, const zse_cuda_xprep *xp,
                                     zse_cuda_stream st)
{
    if (rows < 1 || dim < 1 || rows > 0x7fffffff ||
        !(rmsnorm_vec_ok(x, xpitch, w, dim, out, opitch) && xprep_ok(dim, xp) &&
          dim / 4 <= RMS_VEC * (int64_t)rmsnorm_threads(dim)))
        return zse_cuda_rmsnorm(x, xpitch, w, eps, rows, dim, out, opitch, st) == 0 ? 0 : -1;
    if (xp->kind == ZSE_CUDA_XPREP_Q8)
        zse_launch(rmsnorm_vec_kernel<ZSE_CUDA_XPREP_Q8>, (unsigned)rows, rmsnorm_threads(dim), 0, (cudaStream_t)st,
            x, xpitch, w, eps, dim, out, opitch, *xp);
    else
        zse_launch(rmsnorm_vec_kernel<ZSE_CUDA_XPREP_F16>, (unsigned)rows, rmsnorm_threads(dim), 0, (cudaStream_t)st,
            x, xpitch, w, eps, dim, out, opitch, *xp);
    ZSE_CUDA_LAUNCHED("cuda rmsnorm (x prepared)");
    return 1;
}

/* ---- elementwise ---------------------------------------------------------------- */

/* Elementwise kernels run over rows x dim with per-row pitches: blockIdx.y walks the rows
 * and the x threads a row's columns, V floats at a time (V = 4 when every row start is
 * 16-byte aligned), so no thread divides a flat index and a warp moves 512 bytes a load. */
#define ROWS_DIM_LOOP(rows, cols, ...)                                                     \
    for (int64_t r = blockIdx.y; r < (rows); r += gridDim.y)                              \
        for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < (cols);      \
             c += (int64_t)gridDim.x * blockDim.x) {                                      \
            __VA_ARGS__;                                                                  \
        }

static unsigned ew_blocks(int64_t n)
{
    int64_t b = zse_ceil_div(n, EW_THREADS);
    return (unsigned)(b < 1 ? 1 : b > 65536 ? 65536 : b);
}

/* the grid for rows x cols (cols in vectors) */
static dim3 ew_grid(int64_t rows, int64_t cols)
{
    const int64_t bx = zse_ceil_div(cols, EW_THREADS);
    return dim3((unsigned)(bx < 1 ? 1 : bx > 1024 ? 1024 : bx), (unsigned)(rows > 65535 ? 65535 : rows));
}

/* true when rows of `dim` floats at these pitches can go 4 floats at a time */
static bool ew_vec4(int64_t dim, const void *a, int64_t ap, const void *b, int64_t bp, const void *c, int64_t cp)
{
    return dim % 4 == 0 && ap % 4 == 0 && bp % 4 == 0 && cp % 4 == 0 && aligned16(a) && aligned16(b) &&
           aligned16(c);
}

template <int V> __device__ __forceinline__ void vload(const float *p, float (&v)[V])
{
    if (V == 4) {
        const float4 f = *reinterpret_cast<const float4 *>(p);
        v[0] = f.x, v[1 % V] = f.y, v[2 % V] = f.z, v[3 % V] = f.w;
    } else {
        v[0] = *p;
    }
}

template <int V> __device__ __forceinline__ void vstore(float *p, const float (&v)[V])
{
    if (V == 4)
        *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1 % V], v[2 % V], v[3 % V]);
    else
        *p = v[0];
}

template <int V>
__global__ void add_bias_kernel(float *y, int64_t yp, const float *bias, int64_t rows, int64_t dim)
{
    pdl_enter();
    ROWS_DIM_LOOP(rows, dim / V, {
        float a[V], b[V];
        vload<V>(y + r * yp + c * V, a);
        vload<V>(bias + c * V, b);
#pragma unroll
        for (int j = 0; j < V; j++)
            a[j] += b[j];
        vstore<V>(y + r * yp + c * V, a);
    });
}

template <int V>
__global__ void silu_mul_kernel(const float *g, int64_t gp, const float *u, int64_t up,
                                int64_t rows, int64_t dim, float *o, int64_t op)
{
    pdl_enter();
    ROWS_DIM_LOOP(rows, dim / V, {
        float a[V], b[V];
        vload<V>(g + r * gp + c * V, a);
        vload<V>(u + r * up + c * V, b);
#pragma unroll
        for (int j = 0; j < V; j++)
            a[j] = a[j] / (1.f + __expf(-a[j])) * b[j];
        vstore<V>(o + r * op + c * V, a);
    });
}

template <int V>
__global__ void add_kernel(float *x, int64_t xp, const float *y, int64_t yp, int64_t rows, int64_t dim)
{
    pdl_enter();
    ROWS_DIM_LOOP(rows, dim / V, {
        float a[V], b[V];
        vload<V>(x + r * xp + c * V, a);
        vload<V>(y + r * yp + c * V, b);
#pragma unroll
        for (int j = 0; j < V; j++)
            a[j] += b[j];
        vstore<V>(x + r * xp + c * V, a);
    });
}

template <int V>
__global__ void gather_kernel(const float *x, int64_t xp, const int32_t *idx, int64_t n,
                              int64_t dim, float *o, int64_t op)
{
    pdl_enter();
    ROWS_DIM_LOOP(n, dim / V, {
        float a[V];
        vload<V>(x + (int64_t)idx[r] * xp + c * V, a);
        vstore<V>(o + r * op + c * V, a);
    });
}

extern "C" int zse_cuda_add_bias(float *y, int64_t ypitch, const float *bias, int64_t rows,
                                 int64_t dim, zse_cuda_stream st)
{
    if (rows < 1 || dim < 1)
        return 0;
    if (ew_vec4(dim, y, ypitch, bias, 0, y, ypitch))
        zse_launch(add_bias_kernel<4>, ew_grid(rows, dim / 4), EW_THREADS, 0, (cudaStream_t)st,
            y, ypitch, bias, rows, dim);
    else
        zse_launch(add_bias_kernel<1>, ew_grid(rows, dim), EW_THREADS, 0, (cudaStream_t)st,
            y, ypitch, bias, rows, dim);
    ZSE_CUDA_LAUNCHED("cuda add_bias");
    return 0;
}

/* SiLU(gate) * up, also written as the matmul after it reads x (xprep_store): a thread per
 * 4 values, blockIdx.y the row */
template <int M>
__global__ void silu_mul_prep_kernel(const float *g, int64_t gp, const float *u, int64_t up, int64_t dim, float *o,
                                     int64_t op, const zse_cuda_xprep xp)
{
    pdl_enter();
    const int64_t r = blockIdx.y, i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n4 = dim / 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i < n4) {
        const float4 a = reinterpret_cast<const float4 *>(g + r * gp)[i];
        const float4 b = reinterpret_cast<const float4 *>(u + r * up)[i];
        v = make_float4(a.x / (1.f + __expf(-a.x)) * b.x, a.y / (1.f + __expf(-a.y)) * b.y,
                        a.z / (1.f + __expf(-a.z)) * b.z, a.w / (1.f + __expf(-a.w)) * b.w);
        reinterpret_cast<float4 *>(o + r * op)[i] = v;
    }
    xprep_store<M>(v, i < n4, xp, r, dim, i);
}

extern "C" int zse_cuda_silu_mul(const float *gate, int64_t gpitch, const float *up,
                                 int64_t upitch, int64_t rows, int64_t dim, float *out,
                                 int64_t opitch, zse_cuda_stream st)
{
    if (rows < 1 || dim < 1)
        return 0;
    if (ew_vec4(dim, gate, gpitch, up, upitch, out, opitch))
        zse_launch(silu_mul_kernel<4>, ew_grid(rows, dim / 4), EW_THREADS, 0, (cudaStream_t)st,
            gate, gpitch, up, upitch, rows, dim, out, opitch);
    else
        zse_launch(silu_mul_kernel<1>, ew_grid(rows, dim), EW_THREADS, 0, (cudaStream_t)st,
            gate, gpitch, up, upitch, rows, dim, out, opitch);
    ZSE_CUDA_LAUNCHED("cuda silu_mul");
    return 0;
}

extern "C" int zse_cuda_silu_mul_prep(const float *gate, int64_t gpitch, const float *up, int64_t upitch,
                                      int64_t rows, int64_t dim, float *out, int64_t opitch,
                                      const zse_cuda_xprep *xp, zse_cuda_stream st)
{
    if (rows < 1 || dim < 1 || rows > 65535 || !ew_vec4(dim, gate, gpitch, up, upitch, out, opitch) ||
        !xprep_ok(dim, xp))
        return zse_cuda_silu_mul(gate, gpitch, up, upitch, rows, dim, out, opitch, st) == 0 ? 0 : -1;
    const dim3 grid((unsigned)zse_ceil_div(dim / 4, EW_THREADS), (unsigned)rows);
    if (xp->kind == ZSE_CUDA_XPREP_Q8)
        zse_launch(silu_mul_prep_kernel<ZSE_CUDA_XPREP_Q8>, grid, EW_THREADS, 0, (cudaStream_t)st,
            gate, gpitch, up, upitch, dim, out, opitch, *xp);
    else
        zse_launch(silu_mul_prep_kernel<ZSE_CUDA_XPREP_F16>, grid, EW_THREADS, 0, (cudaStream_t)st,
            gate, gpitch, up, upitch, dim, out, opitch, *xp);
    ZSE_CUDA_LAUNCHED("cuda silu_mul (x prepared)");
    return 1;
}

extern "C" int zse_cuda_add(float *x, int64_t xpitch, const float *y, int64_t ypitch,
                            int64_t rows, int64_t dim, zse_cuda_stream st)
{
    if (rows < 1 || dim < 1)
        return 0;
    if (ew_vec4(dim, x, xpitch, y, ypitch, x, xpitch))
        zse_launch(add_kernel<4>, ew_grid(rows, dim / 4), EW_THREADS, 0, (cudaStream_t)st,
            x, xpitch, y, ypitch, rows, dim);
    else
        zse_launch(add_kernel<1>, ew_grid(rows, dim), EW_THREADS, 0, (cudaStream_t)st,
            x, xpitch, y, ypitch, rows, dim);
    ZSE_CUDA_LAUNCHED("cuda add");
    return 0;
}

extern "C" int zse_cuda_gather_rows(const float *x, int64_t xpitch, const int32_t *rows_idx,
                                    int64_t n, int64_t dim, float *out, int64_t opitch,
                                    zse_cuda_stream st)
{
    if (n < 1 || dim < 1)
        return 0;
    if (ew_vec4(dim, x, xpitch, out, opitch, out, opitch))
        zse_launch(gather_kernel<4>, ew_grid(n, dim / 4), EW_THREADS, 0, (cudaStream_t)st,
            x, xpitch, rows_idx, n, dim, out, opitch);
    else
        zse_launch(gather_kernel<1>, ew_grid(n, dim), EW_THREADS, 0, (cudaStream_t)st,
            x, xpitch, rows_idx, n, dim, out, opitch);
    ZSE_CUDA_LAUNCHED("cuda gather_rows");
    return 0;
}

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

/* ---- RoPE (rotate-half pairing) ------------------------------------------------------ */

/* rotate the pair (j, j + half) of one head by pos * inv_freq[j] */
__device__ __forceinline__ void rope_pair(float *p, int j, int half, int32_t pos, const float *inv_freq, float mscale)
{
    float s, c;
    sincosf((float)pos * inv_freq[j], &s, &c);
    c *= mscale;
    s *= mscale;
    const float a = p[j], b = p[j + half];
    p[j] = a * c - b * s;
    p[j + half] = b * c + a * s;
}

__global__ void rope_kernel(float *x, int64_t xp, int64_t n, int n_heads, int head_dim,
                            const int32_t *pos, const float *inv_freq, float mscale)
{
    pdl_enter();
    const int half = head_dim / 2;
    const int64_t total = n * n_heads * half;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t th = div_idx(i, half), t = div_idx(th, n_heads);
        const int j = (int)(i - th * half);
        const int h = (int)(th - t * n_heads);
        rope_pair(x + t * xp + (int64_t)h * head_dim, j, half, pos[t], inv_freq, mscale);
    }
}

extern "C" int zse_cuda_rope(float *x, int64_t xpitch, int64_t n, int n_heads, int head_dim,
                             const int32_t *pos, const float *inv_freq, float mscale,
                             zse_cuda_stream st)
{
    if (n < 1 || n_heads < 1)
        return 0;
    if (head_dim < 2 || head_dim % 2)
        return zse_cuda_fail("cuda rope: head_dim %d is not even", head_dim);
    zse_launch(rope_kernel, ew_blocks(n * n_heads * (head_dim / 2)), EW_THREADS, 0, (cudaStream_t)st,
        x, xpitch, n, n_heads, head_dim, pos, inv_freq, mscale);
    ZSE_CUDA_LAUNCHED("cuda rope");
    return 0;
}

/* ---- paged KV store ----------------------------------------------------------------- */

/* one warp stores one (slot, kv head) row of k and of v: f16, or int8 with scale =
 * absmax / 127 */
__device__ __forceinline__ void store_kv_head(const zse_cuda_kv_layer &L, const float *k, const float *v,
                                              int64_t slot, int h, int lane)
{
    const int hd = L.head_dim;
    const int64_t dst = (slot * L.n_kv_heads + h) * hd;
    for (int which = 0; which < 2; which++) {
        const float *src = which == 0 ? k : v;
        void *pool = which == 0 ? L.k : L.v;
        if (!L.int8) {
            __half *o = (__half *)pool + dst;
            for (int d = lane; d < hd; d += 32)
                o[d] = __float2half_rn(src[d]);
            continue;
        }
        float amax = 0.f;
        for (int d = lane; d < hd; d += 32)
            amax = fmaxf(amax, fabsf(src[d]));
        for (int off = 16; off > 0; off >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const float scale = amax / 127.f;
        const float inv = scale > 0.f ? 1.f / scale : 0.f;
        int8_t *o = (int8_t *)pool + dst;
        for (int d = lane; d < hd; d += 32)
            o[d] = (int8_t)__float2int_rn(fminf(fmaxf(src[d] * inv, -127.f), 127.f));
        if (lane == 0)
            (which == 0 ? L.kscale : L.vscale)[slot * L.n_kv_heads + h] = scale;
    }
}

/* one warp per (token, kv head) */
__global__ void kv_store_kernel(zse_cuda_kv_layer L, const float *k, int64_t kp, const float *v,
                                int64_t vp, const int32_t *slots, int64_t n)
{
    pdl_enter();
    const int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (item >= n * L.n_kv_heads)
        return;
    const int64_t t = div_idx(item, L.n_kv_heads);
    const int h = (int)(item - t * L.n_kv_heads);
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= L.n_slots)
        return;
    store_kv_head(L, k + t * kp + (int64_t)h * L.head_dim, v + t * vp + (int64_t)h * L.head_dim, slot, h, lane);
}

extern "C" int zse_cuda_kv_store(const zse_cuda_kv_layer *L, const float *k, int64_t kpitch,
                                 const float *v, int64_t vpitch, const int32_t *slots, int64_t n,
                                 zse_cuda_stream st)
{
    if (n < 1)
        return 0;
    const int64_t threads = n * L->n_kv_heads * 32;
    zse_launch(kv_store_kernel, (unsigned)zse_ceil_div(threads, 128), 128, 0, (cudaStream_t)st,
        *L, k, kpitch, v, vpitch, slots, n);
    ZSE_CUDA_LAUNCHED("cuda kv_store");
    return 0;
}

/* RoPE on q and k and the K/V store in one launch (decode would otherwise pay three): one
 * warp per (token, head) of q, then per (token, KV head) that rotates its k row and stores it
 * and v as kv_store_kernel does. The arithmetic is rope_kernel's and kv_store_kernel's. */
__global__ void rope_kv_store_kernel(zse_cuda_kv_layer L, float *q, int64_t qp, float *k, int64_t kp,
                                     const float *v, int64_t vp, const int32_t *slots, int64_t n, int n_heads,
                                     const int32_t *pos, const float *inv_freq, float mscale)
{
    pdl_enter();
    const int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const int per_token = n_heads + L.n_kv_heads;
    if (item >= n * per_token)
        return;
    const int64_t t = div_idx(item, per_token);
    const int hs = (int)(item - t * per_token);
    const int hd = L.head_dim, half = hd / 2;
    const bool is_q = hs < n_heads;
    const int h = is_q ? hs : hs - n_heads;
    float *p = is_q ? q + t * qp + (int64_t)h * hd : k + t * kp + (int64_t)h * hd;
    for (int j = lane; j < half; j += 32)
        rope_pair(p, j, half, pos[t], inv_freq, mscale);
    if (is_q)
        return;
    __syncwarp(); /* the rotated k row, written by every lane, is read by every lane below */
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= L.n_slots)
        return;
    store_kv_head(L, p, v + t * vp + (int64_t)h * hd, slot, h, lane);
}

extern "C" int zse_cuda_rope_kv_store(const zse_cuda_kv_layer *L, float *q, int64_t qpitch, float *k,
                                      int64_t kpitch, const float *v, int64_t vpitch, const int32_t *slots,
                                      int64_t n, int n_heads, const int32_t *pos, const float *inv_freq,
                                      float mscale, zse_cuda_stream st)
{
    if (n < 1)
        return 0;
    if (L->head_dim < 2 || L->head_dim % 2 || n_heads < 1)
        return zse_cuda_fail("cuda rope_kv_store: head_dim %d, %d heads", L->head_dim, n_heads);
    const int64_t threads = n * (n_heads + L->n_kv_heads) * 32;
    zse_launch(rope_kv_store_kernel, (unsigned)zse_ceil_div(threads, 128), 128, 0, (cudaStream_t)st,
        *L, q, qpitch, k, kpitch, v, vpitch, slots, n, n_heads, pos, inv_freq, mscale);
    ZSE_CUDA_LAUNCHED("cuda rope_kv_store");
    return 0;
}

/* ---- attention ---------------------------------------------------------------------- */

enum {
    ATT_MAX_DPL = 8,            /* dims per lane: head_dim <= 256 */
    ATT_WARPS = 4,
    ATT_MIN_SPLIT = 32,         /* fewest keys a split is worth: one tile */
    ATT_TARGET_ITEMS = 1024,    /* (token, head, split) warps that fill an H100 well */
};

/* the splits for n tokens x n_heads over at most max_ctx keys */
static int attention_splits(int64_t n, int n_heads, int max_ctx)
{
    const int64_t pairs = n * n_heads;
    if (pairs >= ATT_TARGET_ITEMS)
        return 1;
    int64_t s = zse_ceil_div(ATT_TARGET_ITEMS, pairs);
    const int64_t by_len = zse_ceil_div(max_ctx, ATT_MIN_SPLIT);
    if (s > by_len) s = by_len;
    return (int)(s < 1 ? 1 : s);
}

extern "C" size_t zse_cuda_attention_work_bytes(int64_t n, int n_heads, int head_dim)
{
    /* splits > 1 only when n * n_heads < ATT_TARGET_ITEMS, and then n*n_heads*splits <
     * 2 * ATT_TARGET_ITEMS; each partial is head_dim sums + (max, denominator) */
    (void)n;
    (void)n_heads;
    return (size_t)2 * ATT_TARGET_ITEMS * (size_t)(head_dim + 2) * sizeof(float);
}

__device__ __forceinline__ float kv_elem(const zse_cuda_kv_layer &L, const void *pool, int64_t idx)
{
    return L.int8 ? (float)((const int8_t *)pool)[idx] : __half2float(((const __half *)pool)[idx]);
}

/* what one warp of an attention kernel works on: a (token, head, split) and its keys */
struct att_item {
    int64_t t;
    int h, kvh, seq, k_begin, k_end;
};

enum {
    FA_ROWS = 64, FA_KEYS = 64, FA_WARPS = 4,
    FA_MIN_RUN = 16,    /* a run this long goes to tensor cores */
    FA_STEP_MIN = 64,   /* ... in a step of more tokens than this */
};

/* token t sits in a run of >= FA_MIN_RUN consecutive tokens of its sequence */
__device__ __forceinline__ bool att_long_run(const int32_t *seq_of, int64_t n, int64_t t)
{
    const int32_t s = seq_of[t];
    int len = 1;
    for (int64_t u = t - 1; u >= 0 && len < FA_MIN_RUN && seq_of[u] == s; u--)
        len++;
    for (int64_t u = t + 1; u < n && len < FA_MIN_RUN && seq_of[u] == s; u++)
        len++;
    return len >= FA_MIN_RUN;
}

/* token it.t's sequence and the keys of its split: the visible positions (p <= pos, and
 * pos - p < window when sliding) in `splits` equal parts */
__device__ __forceinline__ void att_keys_of(const zse_cuda_attn &a, int split, int splits, att_item &it)
{
    it.seq = a.seq_of[it.t];
    const int pos = a.pos[it.t];
    const int lo_vis = a.window > 0 ? max(0, pos - a.window + 1) : 0;
    const int per = (pos - lo_vis + 1 + splits - 1) / splits;
    it.k_begin = lo_vis + split * per;
    it.k_end = min(pos + 1, it.k_begin + per);
}

__device__ __forceinline__ bool att_item_of(const zse_cuda_attn &a, int64_t item, int64_t n, int splits, bool skip_long,
                                            att_item &it)
{
    if (item >= n * a.n_heads * splits)
        return false;
    const int64_t th = div_idx(item, splits);
    const int split = (int)(item - th * splits);
    it.t = div_idx(th, a.n_heads);
    it.h = (int)(th - it.t * a.n_heads);
    if (skip_long && att_long_run(a.seq_of, n, it.t))
        return false;   /* attention_mma_kernel's */
    it.kvh = it.h / (a.n_heads / a.n_kv_heads);
    att_keys_of(a, split, splits, it);
    return true;
}

/* dot + q[0:16] . the 16 int8 values of v (in order, one fma each) */
__device__ __forceinline__ float dot_i8x16(const uint4 &v, const float *q, float dot)
{
    const int8_t *b = reinterpret_cast<const int8_t *>(&v);
    const float4 *q4 = reinterpret_cast<const float4 *>(q);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float4 qq = q4[j];
        dot = fmaf(qq.x, (float)b[4 * j], dot);
        dot = fmaf(qq.y, (float)b[4 * j + 1], dot);
        dot = fmaf(qq.z, (float)b[4 * j + 2], dot);
        dot = fmaf(qq.w, (float)b[4 * j + 3], dot);
    }
    return dot;
}

/* dot + q[0:8] . the 8 f16 values of v */
__device__ __forceinline__ float dot_f16x8(const uint4 &v, const float *q, float dot)
{
    const __half2 *h2 = reinterpret_cast<const __half2 *>(&v);
    const float4 *q4 = reinterpret_cast<const float4 *>(q);
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const float4 qq = q4[j];
        const float2 a0 = __half22float2(h2[2 * j]), a1 = __half22float2(h2[2 * j + 1]);
        dot = fmaf(qq.x, a0.x, dot);
        dot = fmaf(qq.y, a0.y, dot);
        dot = fmaf(qq.z, a1.x, dot);
        dot = fmaf(qq.w, a1.y, dot);
    }
    return dot;
}

/* the cache slot of key position p through the sequence's block-table row, -1 when the
 * engine never stored it */
__device__ __forceinline__ int att_slot(const zse_cuda_kv_layer &L, const zse_cuda_attn &a, const int32_t *bt, int p)
{
    const int bi = p / L.block_size;
    const int blk = bi < a.max_blocks ? bt[bi] : -1;
    const int64_t sl = (int64_t)blk * L.block_size + p % L.block_size;
    return blk >= 0 && sl < L.n_slots ? (int)sl : -1;
}

/* one 32-key tile's online-softmax update from each lane's score (valid: its key exists):
 * returns the lane's weight and the factor the running sums were scaled by */
__device__ __forceinline__ float att_tile_softmax(float s, bool valid, float &m, float &l, float &corr)
{
    float tmax = s;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
    const float m_new = fmaxf(m, tmax);
    corr = __expf(m - m_new);
    const float pw = valid ? __expf(s - m_new) : 0.f;
    float psum = pw;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        psum += __shfl_xor_sync(0xffffffffu, psum, o);
    l = l * corr + psum;
    m = m_new;
    return pw;
}

/* the tile's softmax update, the running V sums rescaled by it: returns the lane's key
 * weight times its V scale (what the V walk broadcasts) */
template <int NV>
__device__ __forceinline__ float att_tile_update(float s, bool valid, float vscale, float &m, float &l,
                                                 float (&acc)[NV])
{
    float corr;
    const float pw = att_tile_softmax(s, valid, m, l, corr);
#pragma unroll
    for (int i = 0; i < NV; i++)
        acc[i] *= corr;
    return pw * vscale;
}

/* the warp's result: the output row when it had all the keys, else its partial state
 * (acc, max, sum) for attention_combine_kernel. A lane holds dims d0 + i * stride. */
template <int NV>
__device__ __forceinline__ void att_finish(const float (&acc)[NV], int d0, int stride, int hd, float m, float l,
                                           int splits, int64_t item, const att_item &it, float *out, int64_t op,
                                           float *work, int lane)
{
    if (splits == 1) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int i = 0; i < NV; i++) {
            const int d = d0 + i * stride;
            if (d < hd)
                out[it.t * op + (int64_t)it.h * hd + d] = acc[i] * inv;
        }
        return;
    }
    float *wp = work + item * (hd + 2);
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int d = d0 + i * stride;
        if (d < hd)
            wp[d] = acc[i];
    }
    if (lane == 0) {
        wp[hd] = m;
        wp[hd + 1] = l;
    }
}

__global__ void __launch_bounds__(ATT_WARPS * 32)
attention_kernel(const zse_cuda_kv_layer L, const zse_cuda_attn a, const float *q, int64_t qp,
                 int64_t n, int splits, bool skip_long, float *out, int64_t op, float *work)
{
    pdl_enter();
    const int64_t item = (int64_t)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    att_item it;
    if (!att_item_of(a, item, n, splits, skip_long, it))
        return;
    const int64_t t = it.t;
    const int h = it.h, kvh = it.kvh, hd = a.head_dim;

    float qv[ATT_MAX_DPL], acc[ATT_MAX_DPL];
#pragma unroll
    for (int i = 0; i < ATT_MAX_DPL; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < hd ? q[t * qp + (int64_t)h * hd + d] * a.scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -FLT_MAX, l = 0.f;
    const int32_t *bt = a.block_table + (int64_t)it.seq * a.max_blocks;
    for (int p = it.k_begin; p < it.k_end; p++) {
        const int64_t slot = att_slot(L, a, bt, p);
        if (slot < 0)
            continue;   /* not in the cache: the engine never stored this position */
        const int64_t base = (slot * L.n_kv_heads + kvh) * hd;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < ATT_MAX_DPL; i++) {
            const int d = lane + 32 * i;
            if (d < hd)
                s = fmaf(qv[i], kv_elem(L, L.k, base + d), s);
        }
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, off);
        float vs = 1.f;
        if (L.int8) {
            s *= L.kscale[slot * L.n_kv_heads + kvh];
            vs = L.vscale[slot * L.n_kv_heads + kvh];
        }
        const float m_new = fmaxf(m, s);
        const float corr = __expf(m - m_new);
        const float pw = __expf(s - m_new);
        l = l * corr + pw;
        m = m_new;
#pragma unroll
        for (int i = 0; i < ATT_MAX_DPL; i++) {
            const int d = lane + 32 * i;
            if (d < hd)
                acc[i] = acc[i] * corr + pw * vs * kv_elem(L, L.v, base + d);
        }
    }
    att_finish<ATT_MAX_DPL>(acc, lane, 32, hd, m, l, splits, item, it, out, op, work, lane);
}

/* The same walk, 32 keys at a time: lane j scores key j of the tile with whole-row 16-byte
 * loads (q sits in shared memory, read by all lanes at once), one max and one sum per tile
 * update the softmax state, and the weighted V rows are summed with each key's weight
 * broadcast from its lane. Every load of a tile is independent of the others, so a warp
 * keeps ~32 rows in flight where the key-at-a-time walk kept one. head_dim % 16 == 0. */
__global__ void __launch_bounds__(ATT_WARPS * 32)
attention_tile_kernel(const zse_cuda_kv_layer L, const zse_cuda_attn a, const float *q, int64_t qp,
                      int64_t n, int splits, bool skip_long, float *out, int64_t op, float *work)
{
    pdl_enter();
    __shared__ __align__(16) float qs[ATT_WARPS][32 * ATT_MAX_DPL];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t item = (int64_t)blockIdx.x * ATT_WARPS + warp;
    att_item it;
    if (!att_item_of(a, item, n, splits, skip_long, it))
        return;
    const int64_t t = it.t;
    const int h = it.h, kvh = it.kvh, hd = a.head_dim, k_end = it.k_end;

    float *qw = qs[warp];
    for (int d = lane; d < hd; d += 32)
        qw[d] = q[t * qp + (int64_t)h * hd + d] * a.scale;
    __syncwarp();

    float acc[ATT_MAX_DPL];
#pragma unroll
    for (int i = 0; i < ATT_MAX_DPL; i++)
        acc[i] = 0.f;
    float m = -FLT_MAX, l = 0.f;
    const int32_t *bt = a.block_table + (int64_t)it.seq * a.max_blocks;
    for (int k0 = it.k_begin; k0 < k_end; k0 += 32) {
        /* score: lane j takes key k0 + j */
        const int p = k0 + lane;
        const int slot = p < k_end ? att_slot(L, a, bt, p) : -1;
        float s = -INFINITY, vscale = 1.f;
        if (slot >= 0) {
            const int64_t base = ((int64_t)slot * L.n_kv_heads + kvh) * hd;
            float dot = 0.f;
            if (L.int8) {
                const int8_t *kr = (const int8_t *)L.k + base;
                for (int d = 0; d < hd; d += 16)
                    dot = dot_i8x16(*reinterpret_cast<const uint4 *>(kr + d), qw + d, dot);
                dot *= L.kscale[(int64_t)slot * L.n_kv_heads + kvh];
                vscale = L.vscale[(int64_t)slot * L.n_kv_heads + kvh];
            } else {
                const __half *kr = (const __half *)L.k + base;
                for (int d = 0; d < hd; d += 16) {
                    const uint4 v0 = *reinterpret_cast<const uint4 *>(kr + d);
                    const uint4 v1 = *reinterpret_cast<const uint4 *>(kr + d + 8);
                    const __half2 *h0 = reinterpret_cast<const __half2 *>(&v0);
                    const __half2 *h1 = reinterpret_cast<const __half2 *>(&v1);
                    const float4 *q4 = reinterpret_cast<const float4 *>(qw + d);
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const float4 qa = q4[j], qb = q4[2 + j];
                        const float2 a0 = __half22float2(h0[2 * j]), a1 = __half22float2(h0[2 * j + 1]);
                        const float2 b0 = __half22float2(h1[2 * j]), b1 = __half22float2(h1[2 * j + 1]);
                        dot = fmaf(qa.x, a0.x, dot);
                        dot = fmaf(qa.y, a0.y, dot);
                        dot = fmaf(qa.z, a1.x, dot);
                        dot = fmaf(qa.w, a1.y, dot);
                        dot = fmaf(qb.x, b0.x, dot);
                        dot = fmaf(qb.y, b0.y, dot);
                        dot = fmaf(qb.z, b1.x, dot);
                        dot = fmaf(qb.w, b1.y, dot);
                    }
                }
            }
            s = dot;
        }
        /* V: every lane its dims, each key's weight (times its int8 scale) from its lane */
        const float pv = att_tile_update(s, slot >= 0, vscale, m, l, acc);
        const int nk = min(32, k_end - k0);
        /* no branch per key, so the V loads of several keys are in flight together: a hole
         * (slot -1, weight 0) reads slot 0, which the pool's zero fill keeps finite */
#pragma unroll 4
        for (int j = 0; j < nk; j++) {
            const float pj = __shfl_sync(0xffffffffu, pv, j);
            const int sj = max(0, __shfl_sync(0xffffffffu, slot, j));
            const int64_t base = ((int64_t)sj * L.n_kv_heads + kvh) * hd;
#pragma unroll
            for (int i = 0; i < ATT_MAX_DPL; i++) {
                const int d = lane + 32 * i;
                if (d < hd)
                    acc[i] = fmaf(pj, kv_elem(L, L.v, base + d), acc[i]);
            }
        }
    }
    att_finish<ATT_MAX_DPL>(acc, lane, 32, hd, m, l, splits, item, it, out, op, work, lane);
}

template <int HD, bool I8> struct kv_vec;   /* a lane's HD / 32 values of one V row */
template <> struct kv_vec<64, false> { typedef uint32_t T; };
template <> struct kv_vec<128, false> { typedef uint2 T; };
template <> struct kv_vec<256, false> { typedef uint4 T; };
template <> struct kv_vec<64, true> { typedef uint16_t T; };
template <> struct kv_vec<128, true> { typedef uint32_t T; };
template <> struct kv_vec<256, true> { typedef uint2 T; };

template <int HD, bool I8>
__device__ __forceinline__ void kv_vec_unpack(const typename kv_vec<HD, I8>::T &v, float (&f)[HD / 32])
{
    if (I8) {
        const int8_t *b = reinterpret_cast<const int8_t *>(&v);
#pragma unroll
        for (int i = 0; i < HD / 32; i++)
            f[i] = (float)b[i];
    } else {
        const __half2 *h = reinterpret_cast<const __half2 *>(&v);
#pragma unroll
        for (int i = 0; i < HD / 64; i++) {
            const float2 t = __half22float2(h[i]);
            f[2 * i] = t.x;
            f[2 * i + 1] = t.y;
        }
    }
}

/* Decode attention for the common head sizes (64, 128, 256), the head size and the storage
 * known at compile time. A block takes one (token, KV head, split) and a warp each of the
 * query heads that share that KV head (GQA; a group of more than ATT_GQA_MAX heads is taken
 * in chunks), so each K and V row is read once for the whole group. The block copies tiles
 * of 32 keys' K and V rows into shared memory with cp.async, the next tile's copies in
 * flight while the warps work on the current one: every load of a tile is in the air at
 * once. (A warp per (token, head) that loaded its K row and V rows into registers had the
 * compiler interleave the loads with their use, ~20 round trips to memory a tile: 13 us a
 * tile, 72.6 us a layer at 64 sequences of 140 tokens on the H200.) A warp then works as
 * the tile walk above does: lane j scores key j against q in shared memory, one online-
 * softmax update a tile, and the V rows are accumulated with each key's weight broadcast
 * from its lane, a lane holding HD / 32 contiguous dims. Same keys in the same order, so
 * the same results. Rows are padded by 16 bytes: the 8 lanes of a quarter warp reading 16
 * bytes of 8 different rows hit 32 distinct banks. */
enum { ATT_GQA_MAX = 8, ATT_TILE = 32 };

template <int HD, bool I8> struct att_tiles {
    static constexpr int RB = HD * (I8 ? 1 : 2);        /* bytes of a K or V row */
    static constexpr int ROW = RB + 16;                 /* its pitch in shared memory */
    static constexpr int BUF = 2 * ATT_TILE * ROW;      /* a tile: 32 K rows, then 32 V rows */
    static constexpr int BYTES = 2 * BUF;               /* the current tile and the next */
};

/* the slot of each key of one tile and the copies of its K and V rows (zeros for holes and
 * keys past the range; their int8 scales are not read) */
template <int HD, bool I8>
__device__ __forceinline__ void att_issue_tile(uint8_t *buf, int *slots, float *ksc, float *vsc,
                                               const zse_cuda_kv_layer &L, const zse_cuda_attn &a,
                                               const int32_t *bt, int kvh, int k0, int k_end)
{
    typedef att_tiles<HD, I8> T;
    constexpr int CH = T::RB / 16;
    for (int i = threadIdx.x; i < ATT_TILE * CH; i += blockDim.x) {
        const int j = i / CH, c = i - j * CH, p = k0 + j;
        const int slot = p < k_end ? att_slot(L, a, bt, p) : -1;
        const int64_t row = (int64_t)max(slot, 0) * L.n_kv_heads + kvh;
        cp_async16(buf + j * T::ROW + c * 16, (const uint8_t *)L.k + row * T::RB + c * 16, slot >= 0);
        cp_async16(buf + (ATT_TILE + j) * T::ROW + c * 16, (const uint8_t *)L.v + row * T::RB + c * 16, slot >= 0);
        if (c == 0) {
            slots[j] = slot;
            if (I8 && slot >= 0) {
                cp_async4(&ksc[j], L.kscale + row);
                cp_async4(&vsc[j], L.vscale + row);
            }
        }
    }
}

/* one warp's pass over a tile in shared memory */
template <int HD, bool I8>
__device__ __forceinline__ void att_tile_math(const uint8_t *buf, const int *slots, const float *ksc, const float *vsc,
                                              const float *qw, int lane, int nk, float &m, float &l,
                                              float (&acc)[HD / 32])
{
    typedef att_tiles<HD, I8> T;
    typedef typename kv_vec<HD, I8>::T vrow;
    constexpr int CH = T::RB / 16;
    const int slot = slots[lane];
    float s = -INFINITY, vscale = 1.f;
    if (slot >= 0) {
        const uint4 *kr = reinterpret_cast<const uint4 *>(buf + lane * T::ROW);
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < CH; c++) {
            const uint4 kc = kr[c];
            dot = I8 ? dot_i8x16(kc, qw + c * 16, dot) : dot_f16x8(kc, qw + c * 8, dot);
        }
        if (I8) {
            dot *= ksc[lane];
            vscale = vsc[lane];
        }
        s = dot;
    }
    const float pv = att_tile_update(s, slot >= 0, vscale, m, l, acc);
    const uint8_t *vbase = buf + ATT_TILE * T::ROW + lane * sizeof(vrow);
#pragma unroll 8
    for (int j = 0; j < nk; j++) {
        const float pj = __shfl_sync(0xffffffffu, pv, j);
        float f[HD / 32];
        kv_vec_unpack<HD, I8>(*reinterpret_cast<const vrow *>(vbase + j * T::ROW), f);
#pragma unroll
        for (int i = 0; i < HD / 32; i++)
            acc[i] = fmaf(pj, f[i], acc[i]);
    }
}

/* grid: (token, KV head, chunk of its query heads, split) blocks of hpb warps */
template <int HD, bool I8>
__global__ void __launch_bounds__(ATT_GQA_MAX * 32)
attention_gqa_kernel(const zse_cuda_kv_layer L, const zse_cuda_attn a, const float *q, int64_t qp, int64_t n,
                     int splits, int chunks, int hpb, bool skip_long, float *out, int64_t op, float *work)
{
    pdl_enter();
    typedef att_tiles<HD, I8> T;
    extern __shared__ __align__(16) uint8_t att_buf[];
    __shared__ __align__(16) float qs[ATT_GQA_MAX][HD];
    __shared__ int slot_s[2][ATT_TILE];
    __shared__ float ksc_s[2][ATT_TILE], vsc_s[2][ATT_TILE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int64_t b = blockIdx.x;
    const int split = (int)(b % splits);
    b /= splits;
    const int chunk = (int)(b % chunks);
    b /= chunks;
    const int kvh = (int)(b % a.n_kv_heads);
    const int64_t t = b / a.n_kv_heads;
    if (t >= n || (skip_long && att_long_run(a.seq_of, n, t)))
        return;     /* the whole block: the tensor-core kernel has this token */
    const int group = a.n_heads / a.n_kv_heads, gh = chunk * hpb + warp;
    const bool active = warp < hpb && gh < group;

    att_item it;
    it.t = t;
    it.h = kvh * group + gh;
    it.kvh = kvh;
    att_keys_of(a, split, splits, it);
    const int32_t *bt = a.block_table + (int64_t)it.seq * a.max_blocks;

    float *qw = qs[warp];
    if (active) {
#pragma unroll
        for (int i = 0; i < HD / 32; i++)
            qw[lane + 32 * i] = q[t * qp + (int64_t)it.h * HD + lane + 32 * i] * a.scale;
    }
    float acc[HD / 32];
#pragma unroll
    for (int i = 0; i < HD / 32; i++)
        acc[i] = 0.f;
    float m = -FLT_MAX, l = 0.f;
    const int tiles = it.k_end > it.k_begin ? (it.k_end - it.k_begin + ATT_TILE - 1) / ATT_TILE : 0;
    if (tiles > 0)
        att_issue_tile<HD, I8>(att_buf, slot_s[0], ksc_s[0], vsc_s[0], L, a, bt, kvh, it.k_begin, it.k_end);
    cp_async_commit();
    for (int i = 0; i < tiles; i++) {
        const int nb = (i + 1) & 1, k0 = it.k_begin + i * ATT_TILE;
        if (i + 1 < tiles)
            att_issue_tile<HD, I8>(att_buf + nb * T::BUF, slot_s[nb], ksc_s[nb], vsc_s[nb], L, a, bt, kvh,
                                   k0 + ATT_TILE, it.k_end);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();    /* tile i and its slots are in for every thread (q too) */
        if (active)
            att_tile_math<HD, I8>(att_buf + (i & 1) * T::BUF, slot_s[i & 1], ksc_s[i & 1], vsc_s[i & 1], qw, lane,
                                  min(ATT_TILE, it.k_end - k0), m, l, acc);
        __syncthreads();    /* every warp is done with it before tile i + 2 is copied over it */
    }
    if (active) {
        const int64_t item = ((int64_t)t * a.n_heads + it.h) * splits + split;
        att_finish<HD / 32>(acc, lane * (HD / 32), 1, HD, m, l, splits, item, it, out, op, work, lane);
    }
}

/* the query heads of a block: the group, or equal chunks of at most ATT_GQA_MAX */
static void att_gqa_shape(const zse_cuda_attn *a, int *chunks, int *hpb)
{
    const int group = a->n_heads / a->n_kv_heads;
    *chunks = (group + ATT_GQA_MAX - 1) / ATT_GQA_MAX;
    *hpb = (group + *chunks - 1) / *chunks;
}

/* the tiles of head_dim 256 in f16 need more than the 48 KB of shared memory a launch gets
 * unasked: the limit is raised once per instantiation, on its first (never-recorded) use */
template <int HD, bool I8> static int launch_attention_gqa(const zse_cuda_kv_layer *L, const zse_cuda_attn *a,
                                                           const float *q, int64_t qp, int64_t n, int splits,
                                                           bool skip_long, float *out, int64_t op, float *work,
                                                           cudaStream_t st)
{
    static int ready = 0;
    if (!ready) {
        cudaError_t err = cudaFuncSetAttribute(attention_gqa_kernel<HD, I8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               att_tiles<HD, I8>::BYTES);
        if (err != cudaSuccess)
            return zse_cuda_fail("cuda attention: %d bytes of shared memory: %s", att_tiles<HD, I8>::BYTES,
                                 cudaGetErrorString(err));
        ready = 1;
    }
    int chunks, hpb;
    att_gqa_shape(a, &chunks, &hpb);
    const int64_t blocks = n * a->n_kv_heads * chunks * splits;
    zse_launch(attention_gqa_kernel<HD, I8>, (unsigned)blocks, hpb * 32, att_tiles<HD, I8>::BYTES, st,
        *L, *a, q, qp, n, splits, chunks, hpb, skip_long, out, op, work);
    return 0;
}

/* merge the splits of one (token, head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
 * Warp 0 turns each split's (max, sum) into its weight e^(m_s - M) in shared memory first, so
 * the per-dimension sums are independent loads the loop can keep in flight: a loop that
 * re-read (max, sum) and took the exponential per split and dimension waited on each load
 * in turn (15 us for 28 heads x 32 splits on an H200, longer than the attention itself). */
__global__ void __launch_bounds__(128)
attention_combine_kernel(const float *work, int64_t n, int n_heads, int hd, int splits, float *out, int64_t op)
{
    pdl_enter();
    __shared__ float weight[ATT_TARGET_ITEMS];
    __shared__ float inv_den;
    const int64_t th = blockIdx.x;
    const int64_t t = div_idx(th, n_heads);
    const int h = (int)(th - t * n_heads);
    const int stride = hd + 2;
    const float *w0 = work + th * splits * stride;
    if (threadIdx.x < 32) {
        float M = -FLT_MAX;
        for (int s = threadIdx.x; s < splits; s += 32)
            if (w0[s * stride + hd + 1] > 0.f)
                M = fmaxf(M, w0[s * stride + hd]);
        for (int o = 16; o > 0; o >>= 1)
            M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
        float den = 0.f;
        for (int s = threadIdx.x; s < splits; s += 32) {
            const float l = w0[s * stride + hd + 1];
            const float e = l > 0.f ? __expf(w0[s * stride + hd] - M) : 0.f;
            weight[s] = e;
            den += e * l;
        }
        for (int o = 16; o > 0; o >>= 1)
            den += __shfl_xor_sync(0xffffffffu, den, o);
        if (threadIdx.x == 0)
            inv_den = den > 0.f ? 1.f / den : 0.f;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        int s = 0;
        for (; s + 8 <= splits; s += 8) {
#pragma unroll
            for (int j = 0; j < 8; j++)
                num[j] = fmaf(weight[s + j], w0[(s + j) * stride + d], num[j]);
        }
        for (; s < splits; s++)
            num[0] = fmaf(weight[s], w0[s * stride + d], num[0]);
        const float sum = ((num[0] + num[1]) + (num[2] + num[3])) + ((num[4] + num[5]) + (num[6] + num[7]));
        out[t * op + (int64_t)h * hd + d] = sum * inv_den;
    }
}

/* ---- prefill attention on tensor cores ---------------------------------------------
 * A block takes FA_ROWS query tokens of one head; each of its 4 warps owns 16 of them. Key
 * tiles of FA_KEYS cache rows (K and V, f16) are gathered through the block table into shared
 * memory by cp.async; S = Q K^T and O += P V run as m16n8k16 MMAs (f16 in, f32 accumulate) with
 * the online softmax on the S fragments in registers (in the log2 domain: the scale carries
 * log2 e), P going straight from S's accumulator layout into the A fragments of P V.
 *
 * Tokens of a batch are grouped by runs of one sequence: the tokens of a run of at least
 * FA_MIN_RUN consecutive rows come here, the others (the decode rows of a mixed batch) to
 * the warp-per-(token, head) kernel, which skips what this one does. A tile holding rows of
 * two runs walks each run's keys in turn. Q and P in f16 cost ~1e-3 relative error; the
 * cache holds K and V in f16 already. */
__device__ __forceinline__ uint32_t pack_half2(float a, float b)
{
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t *>(&h);
}

template <int HD> struct fa_smem {
    static constexpr int PITCH = HD + 8;    /* halves: a 16-byte skew keeps ldmatrix rows on distinct banks */
    static constexpr int TILE = FA_KEYS * PITCH;
    static constexpr int BYTES = 2 * TILE * 2;  /* K and V tiles (Q passes through the K tile first) */
};

template <int HD>
__global__ void __launch_bounds__(FA_WARPS * 32)
attention_mma_kernel(const zse_cuda_kv_layer L, const zse_cuda_attn a, const float *q, int64_t qp, int64_t n,
                     float *out, int64_t op)
{
    pdl_enter();
    typedef fa_smem<HD> SM;
    constexpr int KS = HD / 16;             /* k-steps of Q K^T */
    constexpr int DT = HD / 8;              /* 8-wide dim tiles of O */
    extern __shared__ __align__(16) uint8_t fa_raw[];
    __half *ks = reinterpret_cast<__half *>(fa_raw), *vs = ks + SM::TILE;
    __shared__ int32_t row_seq[FA_ROWS], row_pos[FA_ROWS], key_slot[FA_KEYS];
    __shared__ int32_t run_seq, run_lo, run_hi, run_next;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, qd = lane & 3;     /* the accumulator row (and +8) and column pair */
    const int64_t t0 = (int64_t)blockIdx.x * FA_ROWS;
    const int h = blockIdx.y, kvh = h / (a.n_heads / a.n_kv_heads);

    if (threadIdx.x < FA_ROWS) {
        const int64_t t = t0 + threadIdx.x;
        const bool mine = t < n && att_long_run(a.seq_of, n, t);
        row_seq[threadIdx.x] = mine ? a.seq_of[t] : -1;
        row_pos[threadIdx.x] = mine ? a.pos[t] : 0;
    }
    /* Q to f16 through the K tile, scaled by scale * log2(e) */
    const float qscale = a.scale * 1.4426950408889634f;
    for (int i = threadIdx.x; i < FA_ROWS * HD / 4; i += FA_WARPS * 32) {
        const int r = i / (HD / 4), c = (i % (HD / 4)) * 4;
        const int64_t t = t0 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (t < n)
            v = *reinterpret_cast<const float4 *>(q + t * qp + (int64_t)h * HD + c);
        uint2 hv;
        hv.x = pack_half2(v.x * qscale, v.y * qscale);
        hv.y = pack_half2(v.z * qscale, v.w * qscale);
        *reinterpret_cast<uint2 *>(ks + r * SM::PITCH + c) = hv;
    }
    __syncthreads();
    uint32_t qf[KS][4];
#pragma unroll
    for (int k = 0; k < KS; k++)
        ldsm_x4(qf[k], ks + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SM::PITCH + k * 16 + (lane >> 4) * 8);
    const int r0 = warp * 16 + g, r1 = r0 + 8;  /* this thread's two rows of the tile */
    const int pos0 = row_pos[r0], pos1 = row_pos[r1];
    const int32_t seq0 = row_seq[r0], seq1 = row_seq[r1];
    const int32_t *bt_base = a.block_table;

    if (threadIdx.x == 0)
        run_next = 0;       /* runs are taken in row order: the first row not yet handled */
    for (;;) {
        __syncthreads();    /* every warp is past the previous run's tiles (and Q's) */
        if (threadIdx.x == 0) {
            int first = run_next;
            while (first < FA_ROWS && row_seq[first] < 0)
                first++;
            int lo = INT_MAX, hi = -1, last = first;
            if (first < FA_ROWS) {
                const int32_t sq = row_seq[first];
                for (int r = first; r < FA_ROWS && (row_seq[r] == sq || row_seq[r] < 0); r++) {
                    if (row_seq[r] != sq)
                        continue;
                    const int p = row_pos[r];
                    lo = min(lo, a.window > 0 ? max(0, p - a.window + 1) : 0);
                    hi = max(hi, p + 1);
                    last = r;
                }
                run_seq = sq;
            } else {
                run_seq = -1;
            }
            run_lo = lo;
            run_hi = hi;
            run_next = last + 1;
        }
        __syncthreads();
        const int32_t sq = run_seq;
        if (sq < 0)
            break;
        const int k_lo = run_lo, k_hi = run_hi;
        const bool in0 = seq0 == sq, in1 = seq1 == sq;
        const int lo0 = a.window > 0 ? max(0, pos0 - a.window + 1) : 0;
        const int lo1 = a.window > 0 ? max(0, pos1 - a.window + 1) : 0;
        /* the warp's key span for this run (none when it has no row in it) */
        int wlo = INT_MAX, whi = -1;
        if (in0) wlo = min(wlo, lo0), whi = max(whi, pos0);
        if (in1) wlo = min(wlo, lo1), whi = max(whi, pos1);
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) {
            wlo = min(wlo, __shfl_xor_sync(0xffffffffu, wlo, o));
            whi = max(whi, __shfl_xor_sync(0xffffffffu, whi, o));
        }
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            wlo = min(wlo, __shfl_xor_sync(0xffffffffu, wlo, o));
            whi = max(whi, __shfl_xor_sync(0xffffffffu, whi, o));
        }

        float o_acc[DT][4];
#pragma unroll
        for (int d = 0; d < DT; d++)
            o_acc[d][0] = o_acc[d][1] = o_acc[d][2] = o_acc[d][3] = 0.f;
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
        const int32_t *bt = bt_base + (int64_t)sq * a.max_blocks;

        for (int kt = k_lo; kt < k_hi; kt += FA_KEYS) {
            if (threadIdx.x < FA_KEYS) {
                const int p = kt + threadIdx.x;
                key_slot[threadIdx.x] = p < k_hi ? att_slot(L, a, bt, p) : -1;
            }
            __syncthreads();
            /* gather the tile: FA_KEYS rows of HD halves for K and for V, 16 bytes a copy */
            constexpr int CH = HD / 8;
            for (int i = threadIdx.x; i < FA_KEYS * CH; i += FA_WARPS * 32) {
                const int kr = i / CH, c = i % CH;
                const int slot = key_slot[kr];
                const int64_t off = ((int64_t)(slot < 0 ? 0 : slot) * L.n_kv_heads + kvh) * HD + c * 8;
                cp_async16(ks + kr * SM::PITCH + c * 8, (const __half *)L.k + off, slot >= 0);
                cp_async16(vs + kr * SM::PITCH + c * 8, (const __half *)L.v + off, slot >= 0);
            }
            cp_async_commit();
            cp_async_wait<0>();
            __syncthreads();
            if (whi >= kt && wlo < kt + FA_KEYS) {
                /* S = Q K^T for the warp's 16 rows x FA_KEYS keys */
                float s[FA_KEYS / 8][4];
#pragma unroll
                for (int j = 0; j < FA_KEYS / 8; j++) {
                    s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
                    for (int k = 0; k < KS; k += 2) {
                        uint32_t b[4];
                        ldsm_x4(b, ks + (j * 8 + (lane & 7)) * SM::PITCH + k * 16 + (lane >> 3) * 8);
                        mma_16816(s[j], qf[k], b[0], b[1]);
                        mma_16816(s[j], qf[k + 1], b[2], b[3]);
                    }
                }
                /* mask and the online softmax, rows r0 (s[.][0..1]) and r1 (s[.][2..3]) */
                float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
                for (int j = 0; j < FA_KEYS / 8; j++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int kk = j * 8 + 2 * qd + e, p = kt + kk;
                        const bool ok = key_slot[kk] >= 0;
                        if (!(ok && in0 && p >= lo0 && p <= pos0))
                            s[j][e] = -INFINITY;
                        if (!(ok && in1 && p >= lo1 && p <= pos1))
                            s[j][2 + e] = -INFINITY;
                        mx0 = fmaxf(mx0, s[j][e]);
                        mx1 = fmaxf(mx1, s[j][2 + e]);
                    }
                }
#pragma unroll
                for (int o = 1; o < 4; o <<= 1) {
                    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
                    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
                }
                const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
                const float b0 = n0 == -INFINITY ? 0.f : n0, b1 = n1 == -INFINITY ? 0.f : n1;
                const float c0 = exp2f(m0 - b0), c1 = exp2f(m1 - b1);
                m0 = n0;
                m1 = n1;
                l0 *= c0;
                l1 *= c1;
#pragma unroll
                for (int d = 0; d < DT; d++) {
                    o_acc[d][0] *= c0, o_acc[d][1] *= c0;
                    o_acc[d][2] *= c1, o_acc[d][3] *= c1;
                }
                uint32_t pf[FA_KEYS / 16][4];
#pragma unroll
                for (int j = 0; j < FA_KEYS / 8; j++) {
                    const float p0 = exp2f(s[j][0] - b0), p1 = exp2f(s[j][1] - b0);
                    const float p2 = exp2f(s[j][2] - b1), p3 = exp2f(s[j][3] - b1);
                    l0 += p0 + p1;
                    l1 += p2 + p3;
                    pf[j >> 1][(j & 1) * 2] = pack_half2(p0, p1);
                    pf[j >> 1][(j & 1) * 2 + 1] = pack_half2(p2, p3);
                }
                /* O += P V: V rows are keys (k), its columns dims (n): ldmatrix transposes */
#pragma unroll
                for (int kk = 0; kk < FA_KEYS / 16; kk++) {
#pragma unroll
                    for (int d = 0; d < DT; d += 2) {
                        uint32_t b[4];
                        const int m = lane >> 3;
                        ldsm_x4<true>(b, vs + (kk * 16 + (m & 1) * 8 + (lane & 7)) * SM::PITCH + (d + (m >> 1)) * 8);
                        mma_16816(o_acc[d], pf[kk], b[0], b[1]);
                        mma_16816(o_acc[d + 1], pf[kk], b[2], b[3]);
                    }
                }
            }
            __syncthreads();    /* the tile is free for the next one */
        }
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            l0 += __shfl_xor_sync(0xffffffffu, l0, o);
            l1 += __shfl_xor_sync(0xffffffffu, l1, o);
        }
        const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
        for (int d = 0; d < DT; d++) {
            const int col = h * HD + d * 8 + 2 * qd;
            if (in0)
                *reinterpret_cast<float2 *>(out + (t0 + r0) * op + col) = make_float2(o_acc[d][0] * i0, o_acc[d][1] * i0);
            if (in1)
                *reinterpret_cast<float2 *>(out + (t0 + r1) * op + col) = make_float2(o_acc[d][2] * i1, o_acc[d][3] * i1);
        }
    }
}

/* the tensor-core prefill path applies: f16 cache, head_dim 64 or 128, q and out rows of whole
 * 16-byte vectors, an sm_80+ GPU, and ZSE_CUDA_NO_MMA unset */
static bool attention_mma_ok(const zse_cuda_kv_layer *L, const zse_cuda_attn *a, const float *q, int64_t qp,
                             const float *out, int64_t op)
{
    return zse_cuda_mma_usable() && !L->int8 && (a->head_dim == 64 || a->head_dim == 128) && qp % 4 == 0 &&
           op % 2 == 0 && ((uintptr_t)q & 15) == 0 && ((uintptr_t)out & 7) == 0;
}

template <int HD>
static int launch_attention_mma(const zse_cuda_kv_layer *L, const zse_cuda_attn *a, const float *q, int64_t qp,
                                int64_t n, float *out, int64_t op, cudaStream_t st)
{
    const dim3 grid((unsigned)zse_ceil_div(n, FA_ROWS), (unsigned)a->n_heads);
    zse_launch(attention_mma_kernel<HD>, grid, FA_WARPS * 32, fa_smem<HD>::BYTES, st,
        *L, *a, q, qp, n, out, op);
    ZSE_CUDA_LAUNCHED("cuda attention (tensor cores)");
    return 0;
}

extern "C" int zse_cuda_attention(const zse_cuda_kv_layer *L, const zse_cuda_attn *a,
                                  const float *q, int64_t qpitch, int64_t n, int max_ctx,
                                  float *out, int64_t opitch, void *work, size_t work_bytes,
                                  zse_cuda_stream st)
{
    if (n < 1)
        return 0;
    if (a->head_dim < 1 || a->head_dim > 32 * ATT_MAX_DPL)
        return zse_cuda_fail("cuda attention: head_dim %d (1..%d)", a->head_dim, 32 * ATT_MAX_DPL);
    if (a->n_kv_heads < 1 || a->n_heads % a->n_kv_heads)
        return zse_cuda_fail("cuda attention: %d heads over %d kv heads", a->n_heads, a->n_kv_heads);
    /* steps of more than FA_STEP_MIN tokens (prefill; never a recorded step) send the rows of
     * long runs to tensor cores and only the rest to the warp-per-(token, head) kernels */
    const bool mma = n > FA_STEP_MIN && attention_mma_ok(L, a, q, qpitch, out, opitch);
    if (mma) {
        const int rc = a->head_dim == 64 ? launch_attention_mma<64>(L, a, q, qpitch, n, out, opitch, (cudaStream_t)st)
                                         : launch_attention_mma<128>(L, a, q, qpitch, n, out, opitch, (cudaStream_t)st);
        if (rc != 0)
            return -1;
    }
    /* with tensor cores taking part, no splits: the merge would write over their rows */
    const int splits = mma ? 1 : attention_splits(n, a->n_heads, max_ctx < 1 ? 1 : max_ctx);
    const int64_t items = n * a->n_heads * splits;
    if (splits > 1 && (size_t)items * (a->head_dim + 2) * sizeof(float) > work_bytes)
        return zse_cuda_fail("cuda attention: work buffer of %zu bytes is too small", work_bytes);
    const unsigned grid = (unsigned)zse_ceil_div(items, ATT_WARPS);
    int rc = 0;
#define ZSE_ATT_HD(HD)                                                                                   \
    if (a->head_dim == HD)                                                                               \
        rc = L->int8 ? launch_attention_gqa<HD, true>(L, a, q, qpitch, n, splits, mma, out, opitch,      \
                                                      (float *)work, (cudaStream_t)st)                   \
                     : launch_attention_gqa<HD, false>(L, a, q, qpitch, n, splits, mma, out, opitch,     \
                                                       (float *)work, (cudaStream_t)st);                 \
    else
    ZSE_ATT_HD(64) ZSE_ATT_HD(128) ZSE_ATT_HD(256)
#undef ZSE_ATT_HD
    if (a->head_dim % 16 == 0)
        zse_launch(attention_tile_kernel, grid, ATT_WARPS * 32, 0, (cudaStream_t)st,
            *L, *a, q, qpitch, n, splits, mma, out, opitch, (float *)work);
    else
        zse_launch(attention_kernel, grid, ATT_WARPS * 32, 0, (cudaStream_t)st,
            *L, *a, q, qpitch, n, splits, mma, out, opitch, (float *)work);
    if (rc != 0)
        return -1;
    ZSE_CUDA_LAUNCHED("cuda attention");
    if (splits > 1) {
        zse_launch(attention_combine_kernel, (unsigned)(n * a->n_heads), 128, 0, (cudaStream_t)st,
            (const float *)work, n, a->n_heads, a->head_dim, splits, out, opitch);
        ZSE_CUDA_LAUNCHED("cuda attention combine");
    }
    return 0;
}
