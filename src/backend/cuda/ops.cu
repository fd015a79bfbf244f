/* ops.cu — the elementwise and per-row ops: RMSNorm, bias, SiLU·mul, residual add, row gather,
 * RoPE and the paged KV store (f16 / int8). The other non-matmul kernels have their own files:
 * sample.cu (argmax, token masks, sampling) and attention.cu / attention_mma.cu (attention over
 * the paged cache). */
#include "backend/cuda/common.cuh"

#include <float.h>
#include <limits.h>

enum { EW_THREADS = 256 };

/* ---- RMSNorm --------------------------------------------------------------------- */

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
