/* matmul.cu — y = W·x for every packed scheme, reading the .zse layouts as stored.
 *
 * Decode (n <= 8 rows of x): a GEMV whose blocks each own a few weight rows, their warps
 * splitting the rows' 16-byte units. A lane streams one unit of each of the block's rows per
 * step (coalesced: a warp reads 512 contiguous bytes per row), decodes it in registers and
 * multiplies it with the matching x values of every batch row, accumulating in fp32.
 * Sharing one x load across the rows keeps the L1 traffic for x below the L1's bandwidth;
 * the weight loads bypass L1. 4-bit weights take x as int8 pairs and multiply with dp4a.
 *
 * 4-bit batches of ZSE_CUDA_MMA_MIN..ZSE_CUDA_MMA_MAX rows: tensor cores (mma.sync) with the
 * nibbles dequantized in registers, W streamed through a cp.async stage ring.
 *
 * Prefill and wide batches: W is dequantized to f16 in slabs and multiplied by cuBLAS
 * (tensor cores, fp32 accumulation). For plain f16/bf16 weights, x is split into two f16
 * halves (hi + lo) so the product keeps fp32-grade precision; f32 weights use SGEMM. */
#include "backend/cuda/matmul.cuh"
#include "backend/cuda/lora.cuh"

#include <cublas_v2.h>
#include <mutex>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* the same 16 numbers on the host, for kernels of other files (moe.cu) that take them as a
 * launch argument */
static float nf4_host[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982434654236f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

const float *zse_cuda_nf4_host(void) { return nf4_host; }

extern "C" int zse_cuda_set_nf4(const float values[16])
{
    cudaError_t e = cudaMemcpyToSymbol(zse_cuda_nf4, values, 16 * sizeof(float));
    if (e != cudaSuccess)
        return zse_cuda_fail("cuda: setting the NF4 table: %s", cudaGetErrorString(e));
    memcpy(nf4_host, values, sizeof nf4_host);
    return 0;
}

/* ---- GEMV ------------------------------------------------------------------------- */

template <int S, int B>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_kernel(const zse_cuda_weight w, const float *__restrict__ x, int64_t xpitch, int n,
            const gemv_epi e)
{
    pdl_enter();
    constexpr int GEMV_ROWS = gemv_rows<B>::R;
    __shared__ float table[16];
    if (S == ZSE_SCHEME_NF4) {
        if (threadIdx.x < 16)
            table[threadIdx.x] = zse_cuda_nf4[threadIdx.x];
        __syncthreads();
    }
    gemv_block<S, B>(w, x, xpitch, n, (int64_t)blockIdx.x * GEMV_ROWS, table, e);
}

/* ---- 4-bit GEMV on integer dot products -----------------------------------------------
 * Decoding 4-bit codes to floats costs ~3 instructions an element, which caps an fp32 GEMV
 * well under the memory roof. Instead x is split per 32-element chunk into two int8
 * vectors, x ~= d*xh + dl*xl with d = amax/127 and dl = d/254: x keeps ~15 bits (error at
 * most amax/64516 per element, far under the weights' 4 bits) and a chunk's dot product
 * with the raw nibbles is 16 dp4a. Per chunk: sum(q*x) = d*ih + dl*il, and the scheme's
 * scale/min come in through the chunk's sum of x (sx):
 *   Q4:  sum(w*x) = s*sum(q*x) + m*sx        Q4S: sum(w*x) = s*(sum(q*x) - 8*sx) */
__global__ void quantize_x_kernel(const float *x, int64_t xpitch, int n, int64_t cols,
                                  int64_t units, uint4 *xq, float4 *xs)
{
    pdl_enter();
    const int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (item >= (int64_t)n * units)
        return;
    const int64_t b = div_idx(item, units), k = (item - b * units) * 32 + lane;
    const float v = k < cols ? x[b * xpitch + k] : 0.f;
    float amax = fabsf(v), sx = v;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        sx += __shfl_xor_sync(0xffffffffu, sx, o);
    }
    const float d = amax / 127.f, dl = d / 254.f;
    float h, l;
    q8_codes(v, d, dl, h, l);
    int8_t *q = (int8_t *)(xq + item * 4);
    q[lane] = (int8_t)h;
    q[32 + lane] = (int8_t)l;
    if (lane == 0)
        xs[item] = make_float4(d, dl, sx, 0.f);
}

/* An empty kernel whose attributes say which code of this build the device runs: the
 * PTX architecture (ptxVersion) is the __CUDA_ARCH__ every kernel of the build was compiled
 * for on this device. It is not the device's compute capability: a binary carrying only
 * compute_75 PTX runs on an H100 by JIT with every `__CUDA_ARCH__ >= 800` path (mma.sync,
 * cp.async, griddepcontrol) compiled out, so asking the device alone would launch
 * tensor-core kernels that trap and overlap launches that never wait. */
__global__ void arch_probe_kernel(void) {}

/* the PTX architecture of this build's code on the current device (75, 80, 90, ...), or -1
 * with an error when the build holds no code the device can run */
static int compiled_arch(void)
{
    cudaFuncAttributes fa;
    cudaError_t err = cudaFuncGetAttributes(&fa, arch_probe_kernel);
    if (err != cudaSuccess) {
        cudaGetLastError();
        int dev = 0, major = 0, minor = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        cudaGetLastError();
        return zse_cuda_fail("cuda: this zse carries no code for this GPU (compute capability %d.%d: %s); "
                             "rebuild with cmake -DCMAKE_CUDA_ARCHITECTURES=%d%d (docs/CUDA.md, Building)",
                             major, minor, cudaGetErrorString(err), major, minor);
    }
    return fa.ptxVersion;
}

/* what the launch paths need to know of the device and the environment, asked once:
 * whether the tensor-core path may run, whether launches may overlap, and how many SMs the
 * K splits should fill */
struct device_facts {
    bool mma;     /* the tensor-core paths may run (code built for sm_80 on, ZSE_CUDA_NO_MMA unset) */
    bool pdl;     /* launches may overlap their predecessor (common.cuh, zse_launch) */
    int arch;     /* compiled_arch(); -1: no code for the device */
    int sms;
};

static const device_facts &device_facts_once(void)
{
    static device_facts d = {false, false, 0, 0};
    if (d.sms == 0) {
        int dev = 0, sms = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            cudaGetLastError();
            sms = 132;
        }
        /* the code's architecture is never above the device's: JIT only compiles PTX up */
        d.arch = compiled_arch();
        const char *off = getenv("ZSE_CUDA_NO_MMA");
        d.mma = d.arch >= 80 && !(off && strcmp(off, "0") != 0);
        const char *no_pdl = getenv("ZSE_CUDA_NO_PDL");
        d.pdl = d.arch >= 90 && !(no_pdl && strcmp(no_pdl, "0") != 0);
        d.sms = sms > 0 ? sms : 132;
    }
    return d;
}

int zse_cuda_code_arch(void)
{
    const device_facts &d = device_facts_once();
    if (d.arch < 0)
        return compiled_arch(); /* sets the error again for this caller */
    return d.arch;
}
bool zse_cuda_mma_usable(void) { return device_facts_once().mma; }
bool zse_cuda_pdl_usable(void) { return device_facts_once().pdl; }

/* the rows of one block's turn: which weight of the launch, its first row, each row's bytes
 * (rows past the end re-read the last one; their sums are never stored) */
template <int R> struct q4_rowset {
    int wi;
    int64_t row0;
    int64_t rr[R];
    const uint8_t *rowp[R];
};

template <int R>
__device__ __forceinline__ q4_rowset<R> q4_rows_of(const zse_cuda_multi &mm, int64_t blk)
{
    q4_rowset<R> s;
    s.wi = 0;
    for (; s.wi < mm.count - 1; s.wi++) {
        const int64_t nb = (mm.w[s.wi].rows + R - 1) / R;
        if (blk < nb)
            break;
        blk -= nb;
    }
    const zse_cuda_weight &w = mm.w[s.wi];
    s.row0 = blk * R;
#pragma unroll
    for (int r = 0; r < R; r++) {
        s.rr[r] = min(s.row0 + r, w.rows - 1);
        s.rowp[r] = (const uint8_t *)w.qs + s.rr[r] * w.row_bytes;
    }
    return s;
}

/* One launch serves up to ZSE_CUDA_MULTI_MAX weights over the same x (q, k and v; gate and
 * up): the row groups of weight 0 come first, then those of weight 1, ... A block is NW warps
 * over R rows; each lane takes every (NW * 32)-th 16-byte unit of the rows, and its first P
 * units are loaded before the wait on the previous kernel.
 *
 * Batch 1 is latency-bound (ncu: long-scoreboard stalls on the weight loads): what counts
 * is the bytes a SM has in flight. 4 warps over 4 rows at 6 blocks a SM (80 registers) ran
 * 3584^2 in 7.0 us, 18944x3584 15.6, 3584x18944 18.8 and the 152064-row head 95.7 (H200,
 * back to back, launches overlapping). Twice the rows per lane - 8 rows, or 4 rows with two
 * units - at 128 registers does better where there are enough rows to fill the SMs
 * (launch_q4_dp4a_batch picks); a grid-stride variant that loaded its next rows before
 * reducing the current ones was slower than either (18944x3584 16.6 us). */
template <int S, int B, int NW, int R, int P, bool L = false>
__global__ void __launch_bounds__(NW * 32, B == 1 ? (R * P > 4 ? 16 : 24) / NW : 1)
gemv_q4_dp4a_kernel(const zse_cuda_multi mm, const uint4 *__restrict__ xq,
                    const float4 *__restrict__ xs, int64_t units, int n, const __grid_constant__ lora_fuse lf)
{
    static_assert(!L || B == 1, "a folded LoRA delta is for one row of x");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const q4_rowset<R> rs = q4_rows_of<R>(mm, blockIdx.x);
    const zse_cuda_weight &w = mm.w[rs.wi];
    const group_of grp = group_div(w.group_size);
    constexpr int64_t STRIDE = NW * 32;

    /* a lane's first P units, weights and scales, are loaded before waiting on the kernel
     * that wrote x (pdl_enter): they are constants, and their HBM latency then overlaps
     * that kernel's tail. */
    const int64_t u0 = warp * 32 + lane;
    uint4 v0[P][R];
    float sc0[P][R], mn0[P][R];
#pragma unroll
    for (int p = 0; p < P; p++)
        if (u0 + p * STRIDE < units)
            q4_load_unit<S, R>(w, rs.rowp, rs.rr, grp, u0 + p * STRIDE, v0[p], sc0[p], mn0[p]);
    const int32_t lora_slot = L ? *lf.adapter_of : -1; /* read ahead: no kernel of the step writes it */
    pdl_enter();
    int lora_rank = 0;
    float lora_scale = 0.f;
    int64_t lora_bt = 0;
    if (L) {
        const zse_cuda_lora_entry *le = lora_fuse_entry_of(lf, lora_slot, rs.wi);
        if (le) { /* loaded now, used after the dot products */
            lora_rank = le->rank;
            lora_scale = le->scale;
            lora_bt = le->bt;
        }
        lora_fuse_shrink<NW * 32>(lf); /* the shrink's tasks, taken by the blocks that start first */
    }

    float acc[B][R];
#pragma unroll
    for (int b = 0; b < B; b++)
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[b][r] = 0.f;
#pragma unroll
    for (int p = 0; p < P; p++)
        if (u0 + p * STRIDE < units)
            q4_dot_unit<S, B, R>(acc, v0[p], sc0[p], mn0[p], xq, xs, units, n, u0 + p * STRIDE);
#pragma unroll 1
    for (int64_t u = u0 + P * STRIDE; u < units; u += STRIDE) {
        uint4 v[R];
        float sc[R], mn[R];
        q4_load_unit<S, R>(w, rs.rowp, rs.rr, grp, u, v, sc, mn);
        q4_dot_unit<S, B, R>(acc, v, sc, mn, xq, xs, units, n, u);
    }
    const gemv_epi e = {mm.y[rs.wi], mm.ypitch[rs.wi], mm.bias[rs.wi], mm.accumulate};
    if (L) {
        store_rows<B, R, NW>(acc, w, rs.row0, n, e, false,
                             lora_fuse_delta<NW * 32, R>(lf, lora_slot, rs.wi, lora_rank, lora_scale, lora_bt, rs.row0,
                                                         w.rows));
        lora_fuse_finish(lf);
    } else {
        store_rows<B, R, NW>(acc, w, rs.row0, n, e, false);
    }
}

/* lf: a LoRA delta to fold into the launch (one row of x only), or NULL */
template <int S, int B, int NW, int R, int P = 1>
static void launch_q4_dp4a(const zse_cuda_multi *mm, const uint4 *xq, const float4 *xs,
                           int64_t units, int n, const lora_fuse *lf, cudaStream_t st)
{
    int64_t groups = 0;
    for (int i = 0; i < mm->count; i++)
        groups += zse_ceil_div(mm->w[i].rows, R);
    if constexpr (B == 1) /* the folded kernel exists for the one-row shapes only */
        if (lf) {
            zse_launch(gemv_q4_dp4a_kernel<S, 1, NW, R, P, true>, (unsigned)groups, NW * 32, 0, st, *mm, xq, xs,
                       units, n, *lf);
            return;
        }
    zse_launch(gemv_q4_dp4a_kernel<S, B, NW, R, P>, (unsigned)groups, NW * 32, 0, st, *mm, xq, xs, units, n,
               lora_fuse{});
}

/* the one-row GEMV's block shape for mm: 2 warps over 4 rows (small launches), else 4 over 8 */
static bool gemv1_small(const zse_cuda_multi *mm)
{
    int64_t elems = 0;
    for (int i = 0; i < mm->count; i++)
        elems += mm->w[i].rows * mm->w[i].cols;
    return elems < ((int64_t)32 << 20);
}

template <int S>
static void launch_q4_dp4a_batch(const zse_cuda_multi *mm, const uint4 *xq, const float4 *xs,
                                 int64_t units, int n, const lora_fuse *lf, cudaStream_t st)
{
    if (n == 1) {
        /* batch 1: small launches (qkv, o) as 2 warps over 4 rows with both of a lane's
         * units in flight at K = 3584; big ones as 4 warps over 8 rows (H200, us back to
         * back against 4 warps over 4 rows, all launched overlapping: 3584^2 7.0 -> 6.4,
         * 18944x3584 15.6 -> 14.5, 3584x18944 18.8 -> 13.7, the 152064-row head 95.7 ->
         * 84.3; 8 rows lose at 3584^2, 8.4, where 448 blocks do not fill the SMs) */
        if (gemv1_small(mm))
            launch_q4_dp4a<S, 1, 2, 4, 2>(mm, xq, xs, units, n, lf, st);
        else
            launch_q4_dp4a<S, 1, 4, 8, 1>(mm, xq, xs, units, n, lf, st);
    }
    else if (n == 2) launch_q4_dp4a<S, 2, GEMV_WARPS, q4_rows<2>::R>(mm, xq, xs, units, n, NULL, st);
    else if (n <= 4) launch_q4_dp4a<S, 4, GEMV_WARPS, q4_rows<4>::R>(mm, xq, xs, units, n, NULL, st);
    else launch_q4_dp4a<S, 8, GEMV_WARPS, q4_rows<8>::R>(mm, xq, xs, units, n, NULL, st);
}

static bool uses_dp4a(int scheme) { return scheme == ZSE_SCHEME_Q4 || scheme == ZSE_SCHEME_Q4S; }

static int check_weight(const zse_cuda_weight *w)
{
    if (w->rows <= 0 || w->cols <= 0)
        return zse_cuda_fail("cuda matmul: empty weight %lld x %lld", (long long)w->rows,
                             (long long)w->cols);
    if (((uintptr_t)w->qs & 15) || (w->row_bytes & 15))
        return zse_cuda_fail("cuda matmul: weight rows are not 16-byte aligned (row_bytes %lld)",
                             (long long)w->row_bytes);
    bool g = w->scheme == ZSE_SCHEME_Q4 || w->scheme == ZSE_SCHEME_Q4S || w->scheme == ZSE_SCHEME_NF4 ||
             w->scheme == ZSE_SCHEME_Q8G;
    if (g && (w->group_size < 32 || w->group_size % 32 != 0))
        return zse_cuda_fail("cuda matmul: group size %d is not a multiple of 32", w->group_size);
    return 0;
}

template <int S, int B>
static void launch_gemv(const zse_cuda_weight *w, const float *x, int64_t xp, int n,
                        const gemv_epi &e, cudaStream_t st)
{
    const int64_t per_block = gemv_rows<B>::R;
    dim3 grid((unsigned)zse_ceil_div(w->rows, per_block));
    zse_launch(gemv_kernel<S, B>, grid, GEMV_WARPS * 32, 0, st, *w, x, xp, n, e);
}

template <int S>
static void launch_gemv_batch(const zse_cuda_weight *w, const float *x, int64_t xp, int n,
                              const gemv_epi &e, cudaStream_t st)
{
    if (n == 1) launch_gemv<S, 1>(w, x, xp, n, e, st);
    else if (n == 2) launch_gemv<S, 2>(w, x, xp, n, e, st);
    else if (n <= 4) launch_gemv<S, 4>(w, x, xp, n, e, st);
    else launch_gemv<S, 8>(w, x, xp, n, e, st);
}

/* scratch of the tensor-core path: x in f16, then the K splits' partials */
static size_t mma_scratch_bytes(const zse_cuda_weight *w, int64_t n);
static size_t mma_multi_scratch_bytes(const zse_cuda_multi *mm, int64_t n);


/* the tensor-core path applies: 4-bit groups, x rows packable as 16-byte f16 vectors, and a
 * GPU with mma.sync for f16 (sm_80 on) */
static bool mma_q4_ok(const zse_cuda_weight *w)
{
    return device_facts_once().mma && uses_dp4a(w->scheme) && w->cols % 8 == 0;
}

extern "C" size_t zse_cuda_matmul_scratch_bytes(const zse_cuda_weight *w, int64_t n)
{
    /* tensor cores at MMA_MIN..MMA_MAX rows; the dp4a GEMV (in passes up to 16 rows) where
     * a multi-weight call of mixed schemes sends this weight instead: the larger of the two */
    const size_t mma = n >= ZSE_CUDA_MMA_MIN && n <= ZSE_CUDA_MMA_MAX && mma_q4_ok(w) ? mma_scratch_bytes(w, n) : 0;
    if (n <= ZSE_CUDA_GEMV_MAX || (uses_dp4a(w->scheme) && n <= 2 * ZSE_CUDA_GEMV_MAX)) {
        const size_t gemv = uses_dp4a(w->scheme) ? (size_t)ZSE_CUDA_GEMV_MAX * (size_t)zse_ceil_div(w->cols, 32) * XQ_BYTES + 256 : 0;
        return mma > gemv ? mma : gemv;
    }
    if (mma)
        return mma;
    const bool split = w->scheme == ZSE_SCHEME_F16 || w->scheme == ZSE_SCHEME_BF16;
    return (size_t)n * (size_t)w->cols * 2 * (split ? 2 : 1) + 256 + ZSE_CUDA_GEMM_SLAB;
}

/* f16 x handed over at every tensor-core batch size. 7B-shaped aggregate decode (H200)
 * gained 1.8-2.2% at 8 and 32 sequences (1,763-1,770 -> 1,792-1,802 and 4,557-4,599 ->
 * 4,666-4,677 tok/s). At 64 it first measured 2% slower (5,396-5,402 -> 5,279-5,287); once
 * q/k/v and gate/up were one launch each it measured 2% faster (7,829-7,928 -> 8,018-8,090),
 * so the cap of 32 went. A build can still set it (-DZSE_XPREP_F16_MAX=32) to compare. */
#ifndef ZSE_XPREP_F16_MAX
#define ZSE_XPREP_F16_MAX 64
#endif
enum { XPREP_F16_MAX = ZSE_XPREP_F16_MAX };

extern "C" int zse_cuda_xprep_kind(int64_t n)
{
    const bool mma = device_facts_once().mma;
    if (n >= 1 && n <= (mma ? ZSE_CUDA_MMA_MIN - 1 : ZSE_CUDA_GEMV_MAX))
        return ZSE_CUDA_XPREP_Q8;
    return mma && n >= ZSE_CUDA_MMA_MIN && n <= XPREP_F16_MAX ? ZSE_CUDA_XPREP_F16 : ZSE_CUDA_XPREP_NONE;
}

/* the layouts multi_gemv and gemm_q4_mma use: Q8 codes then scales from the scratch's start
 * (what the GEMV of that width reserves), f16 rows from its start */
extern "C" size_t zse_cuda_xprep_bytes(int64_t n, int64_t cols, int kind)
{
    if (kind == ZSE_CUDA_XPREP_Q8)
        return (size_t)ZSE_CUDA_GEMV_MAX * (size_t)zse_ceil_div(cols, 32) * XQ_BYTES + 256;
    return kind == ZSE_CUDA_XPREP_F16 ? (((size_t)n * (size_t)cols * sizeof(__half) + 255) & ~(size_t)255) + 256 : 0;
}

extern "C" void zse_cuda_xprep_at(void *scratch, int64_t n, int64_t cols, int kind, zse_cuda_xprep *out)
{
    out->kind = kind;
    out->x = scratch;
    out->scales = kind == ZSE_CUDA_XPREP_Q8 ? (uint8_t *)scratch + (size_t)n * (size_t)zse_ceil_div(cols, 32) * 64
                                            : NULL;
}

static zse_cuda_multi single(const zse_cuda_weight *w, float *y, int64_t ypitch)
{
    zse_cuda_multi mm;
    memset(&mm, 0, sizeof mm);
    mm.count = 1;
    mm.w[0] = *w;
    mm.y[0] = y;
    mm.ypitch[0] = ypitch;
    return mm;
}

/* n <= ZSE_CUDA_GEMV_MAX rows of x through every weight of mm (checked by the caller); lf: a
 * LoRA delta folded into the launch, where the caller found that it can be (lora_fold_args) */
static int multi_gemv(const zse_cuda_multi *mm, const float *x, int64_t xpitch, int64_t n, void *scratch,
                      size_t scratch_bytes, cudaStream_t st, const lora_fuse *lf = NULL)
{
    if (n < 1 || n > ZSE_CUDA_GEMV_MAX)
        return zse_cuda_fail("cuda gemv: %lld rows of x (1..%d)", (long long)n, ZSE_CUDA_GEMV_MAX);
    if ((xpitch & 3) || ((uintptr_t)x & 15))
        return zse_cuda_fail("cuda gemv: x pitch %lld is not a multiple of 4 floats", (long long)xpitch);
    const zse_cuda_weight *w = &mm->w[0];
    bool shared_dp4a = uses_dp4a(w->scheme);
    for (int i = 1; i < mm->count; i++)
        shared_dp4a = shared_dp4a && mm->w[i].scheme == w->scheme;
    if (shared_dp4a) {
        /* x is quantized once for all the weights, which then share one launch */
        const int64_t units = zse_ceil_div(w->cols, 32);
        if (scratch_bytes < zse_cuda_matmul_scratch_bytes(w, n) || ((uintptr_t)scratch & 15))
            return zse_cuda_fail("cuda gemv: scratch of %zu bytes is too small", scratch_bytes);
        uint4 *xq = (uint4 *)scratch;
        float4 *xs = (float4 *)((uint8_t *)scratch + (size_t)n * units * 64);
        if (mm->x_ready != ZSE_CUDA_XPREP_Q8)  /* else the kernel that wrote x left it quantized here */
            zse_launch(quantize_x_kernel, (unsigned)zse_ceil_div(n * units * 32, 128), 128, 0, st,
                x, xpitch, (int)n, w->cols, units, xq, xs);
        if (w->scheme == ZSE_SCHEME_Q4)
            launch_q4_dp4a_batch<ZSE_SCHEME_Q4>(mm, xq, xs, units, (int)n, lf, st);
        else
            launch_q4_dp4a_batch<ZSE_SCHEME_Q4S>(mm, xq, xs, units, (int)n, lf, st);
        ZSE_CUDA_LAUNCHED("cuda gemv");
        return 0;
    }
    for (int i = 0; i < mm->count; i++) {
        const zse_cuda_weight *wi = &mm->w[i];
        if (uses_dp4a(wi->scheme)) {
            zse_cuda_multi one = single(wi, mm->y[i], mm->ypitch[i]);
            one.bias[0] = mm->bias[i];
            one.accumulate = mm->accumulate;
            if (multi_gemv(&one, x, xpitch, n, scratch, scratch_bytes, st) != 0)
                return -1;
            continue;
        }
        const gemv_epi e = {mm->y[i], mm->ypitch[i], mm->bias[i], mm->accumulate};
        ZSE_CUDA_SCHEME_SWITCH(wi->scheme, launch_gemv_batch<S_>(wi, x, xpitch, (int)n, e, st));
        ZSE_CUDA_LAUNCHED("cuda gemv");
    }
    return 0;
}

void zse_cuda_quantize_x(const float *x, int64_t xpitch, int64_t n, int64_t cols, uint4 *xq, float4 *xs,
                         cudaStream_t st)
{
    const int64_t units = zse_ceil_div(cols, 32);
    zse_launch(quantize_x_kernel, (unsigned)zse_ceil_div(n * units * 32, 128), 128, 0, st, x, xpitch, (int)n, cols,
               units, xq, xs);
}

extern "C" int zse_cuda_matmul_gemv(const zse_cuda_weight *w, const float *x, int64_t xpitch,
                                    int64_t n, float *y, int64_t ypitch, void *scratch,
                                    size_t scratch_bytes, zse_cuda_stream st)
{
    if (check_weight(w) != 0)
        return -1;
    const zse_cuda_multi mm = single(w, y, ypitch);
    return multi_gemv(&mm, x, xpitch, n, scratch, scratch_bytes, (cudaStream_t)st);
}

/* ---- dequantization (to f16 for the GEMM path, to f32 for embeddings) -------------- */

/* one 16-byte unit of a weight row and its group's scale and min, as read from memory */
struct dq_unit {
    uint4 v;
    float sc, mn;
};

template <int S>
__device__ __forceinline__ dq_unit dequant_load(const zse_cuda_weight &w, int64_t row, int64_t u)
{
    typedef scheme_traits<S> T;
    typedef scheme_scales<S> SC;
    dq_unit d;
    d.v = *reinterpret_cast<const uint4 *>((const uint8_t *)w.qs + row * w.row_bytes + u * 16);
    d.sc = 1.f;
    d.mn = 0.f;
    if (SC::group) {
        const int64_t g = group_div(w.group_size)(u * T::E);
        d.sc = __half2float(((const __half *)w.scales)[row * w.groups + g]);
        if (SC::min)
            d.mn = __half2float(((const __half *)w.mins)[row * w.groups + g]);
    }
    if (SC::row)
        d.sc = ((const float *)w.scales)[row];
    return d;
}

/* unit u of a row to f32, out[u * E ...] (embedding rows) */
template <int S>
__device__ __forceinline__ void dequant_unit(const zse_cuda_weight &w, int64_t row, int64_t u,
                                             const float *table, float *out)
{
    typedef scheme_traits<S> T;
    const dq_unit d = dequant_load<S>(w, row, u);
    const int64_t k0 = u * T::E;
#pragma unroll
    for (int p = 0; p < T::P; p++) {
        float f[8];
        T::piece(d.v, p, table, f);
#pragma unroll
        for (int j = 0; j < T::NV; j++) {
            const int64_t k = k0 + (j < 4 ? T::off0(p) + j : T::off1(p) + j - 4);
            if (k < w.cols)
                out[k] = fmaf(f[j], d.sc, d.mn);
        }
    }
}

enum { DQ_THREADS = 256, DQ_ITEMS = 4 /* pieces a thread has in flight */ };

/* rows row0.. of W to f16 [nrows][opitch]. A thread takes one piece of a unit (8 values; the
 * P lanes of a unit read its 16 bytes together, one warp request), so each 8-byte store of a
 * warp fills whole 32-byte sectors: with a thread a unit, 16-byte stores 64 bytes apart wrote
 * half sectors and the kernel ran at ~40% of the copy bandwidth. DQ_ITEMS pieces, a block
 * apart, are loaded before any is converted, to keep enough bytes in flight. */
template <int S>
__global__ void __launch_bounds__(DQ_THREADS, 4)
dequant_f16_kernel(const zse_cuda_weight w, int64_t row0, int64_t nrows, __half *out, int64_t opitch)
{
    pdl_enter();
    typedef scheme_traits<S> T;
    __shared__ float table[16];
    if (threadIdx.x < 16)
        table[threadIdx.x] = zse_cuda_nf4[threadIdx.x];
    __syncthreads();
    const int64_t n_units = zse_ceil_div(w.cols, T::E);
    const int64_t total = nrows * n_units * T::P;
    for (int64_t base = (int64_t)blockIdx.x * DQ_THREADS * DQ_ITEMS + threadIdx.x; base < total;
         base += (int64_t)gridDim.x * DQ_THREADS * DQ_ITEMS) {
        dq_unit d[DQ_ITEMS];
        int64_t row[DQ_ITEMS], unit[DQ_ITEMS];
        int piece[DQ_ITEMS];
#pragma unroll
        for (int i = 0; i < DQ_ITEMS; i++) {
            const int64_t idx = base + i * DQ_THREADS, ui = (idx < total ? idx : 0) / T::P;
            piece[i] = (int)((idx < total ? idx : 0) - ui * T::P);
            row[i] = div_idx(ui, n_units);
            unit[i] = ui - row[i] * n_units;
            if (idx < total)
                d[i] = dequant_load<S>(w, row0 + row[i], unit[i]);
        }
#pragma unroll
        for (int i = 0; i < DQ_ITEMS; i++) {
            if (base + i * DQ_THREADS >= total)
                break;
            float f[8];
            T::piece(d[i].v, piece[i], table, f);
            __half h[8];
#pragma unroll
            for (int j = 0; j < T::NV; j++)
                h[j] = __float2half_rn(fmaf(f[j], d[i].sc, d[i].mn));
            __half *o = out + row[i] * opitch + unit[i] * T::E;
            const int a0 = T::off0(piece[i]), a1 = T::off1(piece[i]);
            if (unit[i] * T::E + T::E <= w.cols) {
                /* 8-byte aligned: the pitch is a multiple of 4 halves (checked), the offsets too */
                *reinterpret_cast<uint2 *>(o + a0) = *reinterpret_cast<const uint2 *>(h);
                if (T::NV == 8)
                    *reinterpret_cast<uint2 *>(o + a1) = *reinterpret_cast<const uint2 *>(h + 4);
            } else {
                const int64_t room = w.cols - unit[i] * T::E;
#pragma unroll
                for (int j = 0; j < T::NV; j++) {
                    const int at = j < 4 ? a0 + j : a1 + j - 4;
                    if (at < room)
                        o[at] = h[j];
                }
            }
        }
    }
}

template <int S>
__global__ void embed_kernel(const zse_cuda_weight w, const int32_t *ids, float *out, int64_t opitch)
{
    pdl_enter();
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
    const int64_t pieces = zse_ceil_div(w->cols, scheme_traits<S>::E) * scheme_traits<S>::P;
    const int64_t blocks = zse_ceil_div(nrows * pieces, (int64_t)DQ_THREADS * DQ_ITEMS);
    dequant_f16_kernel<S><<<(unsigned)(blocks < 65535 ? blocks : 65535), DQ_THREADS, 0, st>>>(*w, row0, nrows, out,
                                                                                                opitch);
}

extern "C" int zse_cuda_dequant_f16(const zse_cuda_weight *w, int64_t row0, int64_t nrows,
                                    uint16_t *out, int64_t opitch, zse_cuda_stream st)
{
    if (check_weight(w) != 0)
        return -1;
    if (row0 < 0 || nrows < 1 || row0 + nrows > w->rows)
        return zse_cuda_fail("cuda dequant: rows %lld..%lld outside the weight's %lld",
                             (long long)row0, (long long)(row0 + nrows), (long long)w->rows);
    if (opitch % 4 || opitch < w->cols || ((uintptr_t)out & 7))
        return zse_cuda_fail("cuda dequant: output pitch %lld for %lld columns (a multiple of 4, 8-byte aligned)",
                             (long long)opitch, (long long)w->cols);
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
    zse_launch(embed_kernel<S>, grid, 128, 0, st, *w, ids, out, opitch);
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

/* x f32 [n][xpitch] -> f16 hi [n][cols] (and lo = f16(x - hi) when lo != NULL); blockIdx.y
 * walks the rows, the x threads V columns at a time (V = 4 when rows are 16-byte aligned) */
template <int V>
__global__ void split_x_kernel(const float *x, int64_t xpitch, int64_t n, int64_t cols,
                               __half *hi, __half *lo)
{
    pdl_enter();
    for (int64_t t = blockIdx.y; t < n; t += gridDim.y)
        for (int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; c < cols;
             c += (int64_t)gridDim.x * blockDim.x * V) {
            float v[V];
            if (V == 4) {
                const float4 f = *reinterpret_cast<const float4 *>(x + t * xpitch + c);
                v[0] = f.x, v[1 % V] = f.y, v[2 % V] = f.z, v[3 % V] = f.w;
            } else {
                v[0] = x[t * xpitch + c];
            }
            __half h[V], l[V];
#pragma unroll
            for (int j = 0; j < V; j++) {
                h[j] = __float2half_rn(v[j]);
                l[j] = __float2half_rn(v[j] - __half2float(h[j]));
            }
            if (V == 4) {
                *reinterpret_cast<uint2 *>(hi + t * cols + c) = *reinterpret_cast<const uint2 *>(h);
                if (lo)
                    *reinterpret_cast<uint2 *>(lo + t * cols + c) = *reinterpret_cast<const uint2 *>(l);
            } else {
                hi[t * cols + c] = h[0];
                if (lo)
                    lo[t * cols + c] = l[0];
            }
        }
}

/* queues split_x_kernel for n rows of cols */
static void split_x(const float *x, int64_t xpitch, int64_t n, int64_t cols, __half *hi, __half *lo,
                    cudaStream_t st)
{
    const bool v4 = cols % 4 == 0 && xpitch % 4 == 0 && ((uintptr_t)x & 15) == 0 && ((uintptr_t)hi & 7) == 0 &&
                    ((uintptr_t)lo & 7) == 0;
    const int64_t vec = v4 ? 4 : 1, bx = zse_ceil_div(zse_ceil_div(cols, vec), 256);
    const dim3 grid((unsigned)(bx > 1024 ? 1024 : bx), (unsigned)(n > 65535 ? 65535 : n));
    if (v4)
        zse_launch(split_x_kernel<4>, grid, 256, 0, st, x, xpitch, n, cols, hi, lo);
    else
        zse_launch(split_x_kernel<1>, grid, 256, 0, st, x, xpitch, n, cols, hi, lo);
}

void zse_cuda_x_to_f16(const float *x, int64_t xpitch, int64_t n, int64_t cols, __half *out, cudaStream_t st)
{
    split_x(x, xpitch, n, cols, out, NULL, st);
}

/* ---- 4-bit weights on tensor cores (batches of 5..64 rows) -----------------------------
 * Dequantizing W to f16 for cuBLAS writes and re-reads twice the weight's size on every
 * step; here W is read once, in its packed layout, and dequantized in registers straight
 * into mma.sync's A fragments (m16n8k16, f16 in, f32 out). x goes to f16 once (as for
 * cuBLAS). A block is 4 warps x 32 weight rows; K advances MMA_KS elements a stage.
 *
 * The loads run MMA_STAGES - 1 stages ahead of the math: cp.async copies a stage's W
 * chunks and x tile to shared memory without passing through registers, so a thread keeps
 * only its accumulators and the block keeps ~3 stages of HBM reads in flight. The group
 * scales cannot go that way (2-byte values at no fixed alignment): each thread loads its
 * row's into registers when it queues their stage's copies and parks them in the stage's
 * shared slot two iterations later (one before their use), by when the load has landed.
 *
 * Dequantization works on nibble pairs: a byte permute puts two codes into the low bits
 * of an f16 pair's halves, OR-ing in 0x6400 makes them the halves 1024 + q, and one
 * half2 subtract and one half2 fma give q * scale + min (or (q - 8) * scale) - about 2
 * instructions an element, none of them an int-to-float conversion. Rows of x past n are
 * zeros, and so are x's columns past cols (padding nibbles dequantize to the group's min,
 * which must meet zeros). grid.y walks x in NT-row tiles, grid.z splits K. */
/* The weights of one tensor-core launch (q, k and v; gate and up: one scheme, one x):
 * the grid's x walks the 128-row blocks of weight 0, then those of weight 1, ..., so the
 * small k and v projections fill SMs the q projection leaves idle instead of each taking
 * a launch (and a split sum) of its own. The fp32 partials of a split launch lie as
 * [split][n][rows] with the weights' rows side by side (first_row). */
struct mma_set {
    int count;
    int64_t total_rows;
    zse_cuda_weight w[ZSE_CUDA_MULTI_MAX];
    gemv_epi e[ZSE_CUDA_MULTI_MAX];
    int64_t first_blk[ZSE_CUDA_MULTI_MAX];
    int64_t first_row[ZSE_CUDA_MULTI_MAX];
};

/* the weight that grid block (or partial row) `at` belongs to, given each one's first */
__device__ __forceinline__ int mma_weight_of(const mma_set &set, const int64_t (&first)[ZSE_CUDA_MULTI_MAX], int64_t at)
{
    int wi = 0;
#pragma unroll
    for (int i = 1; i < ZSE_CUDA_MULTI_MAX; i++)
        if (i < set.count && at >= first[i])
            wi = i;
    return wi;
}

/* grid: x = 128-row blocks of the set's weights, y = NT-row tiles of x, z = K splits. One
 * split stores through the weight's epilogue; several leave fp32 partials in work for
 * mma_reduce_kernel, which adds them in split order (deterministic). */
template <int S, int NT>
__global__ void __launch_bounds__(MMA_WARPS * 32, NT == 64 ? 3 : 1)   /* 64: 171 -> 168 registers, a third block */
gemm_q4_mma_kernel(const mma_set set, const __half *__restrict__ xh, int64_t n, int64_t split_k,
                   float *__restrict__ work)
{
    pdl_enter();
    constexpr int NJ = NT / 8;
    extern __shared__ __align__(16) uint8_t mma_smem_buf[];
    uint8_t *smem = mma_smem_buf;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wi = mma_weight_of(set, set.first_blk, (int64_t)blockIdx.x);
    /* a copy: the fields the stage loop reads stay in registers, not re-read at a computed
     * offset into the parameters every stage (H200, 8 rows: the 152064-row head took 190 us
     * that way, 164 with the copy; 7B-shaped aggregate decode at 64 sequences +7%) */
    const zse_cuda_weight w = set.w[wi];
    const int64_t row_blk = ((int64_t)blockIdx.x - set.first_blk[wi]) * MMA_ROWS;
    const int64_t n0 = (int64_t)blockIdx.y * NT;
    const int64_t k_begin = (int64_t)blockIdx.z * split_k, k_end = min(w.cols, k_begin + split_k);

    float acc[2][NJ][4];
    mma_accumulate<S, NT>(acc, smem, w, xh, n, n0, k_begin, k_end, row_blk);

    /* c0, c1: row g, x rows 2t, 2t + 1; c2, c3: row g + 8 */
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int j = 0; j < NJ; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int64_t row = row_blk + warp * MMA_ROWS_W + mt * 16 + g + (i >= 2 ? 8 : 0);
                const int64_t xr = n0 + j * 8 + 2 * t + (i & 1);
                if (row >= w.rows || xr >= n)
                    continue;
                float v = acc[mt][j][i];
                if (work) {
                    work[((int64_t)blockIdx.z * n + xr) * set.total_rows + set.first_row[wi] + row] = v;
                    continue;
                }
                const gemv_epi &e = set.e[wi];
                if (e.bias)
                    v += e.bias[row];
                float *dst = e.y + xr * e.ypitch + row;
                *dst = e.accumulate ? *dst + v : v;
            }
}

__global__ void mma_reduce_kernel(const float *__restrict__ work, int splits, int64_t n, const mma_set set)
{
    pdl_enter();
    const int64_t rows = set.total_rows, i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * rows)
        return;
    const int64_t xr = div_idx(i, rows), at = i - xr * rows;
    const int wi = mma_weight_of(set, set.first_row, at);
    const int64_t row = at - set.first_row[wi];
    const gemv_epi &e = set.e[wi];
    float v = 0.f;
    for (int z = 0; z < splits; z++)
        v += work[(int64_t)z * n * rows + i];
    if (e.bias)
        v += e.bias[row];
    float *dst = e.y + xr * e.ypitch + row;
    *dst = e.accumulate ? *dst + v : v;
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

/* A second stream and its events, one set per device, for dequantizing the next slab of W
 * while cuBLAS multiplies the current one. H200, 256-row prefill chunks: a 5760-row slab took
 * 24 us to dequantize and 18 us to multiply, one after the other. */
struct gemm_overlap {
    cudaStream_t aux;
    cudaEvent_t start, dequantized[2], multiplied[2];
};

enum { OVERLAP_DEVICES = 64 };

/* held while a set is made and while a call queues its work on it: the events are re-recorded
 * by every call, so two threads must not interleave theirs */
static std::mutex &overlap_lock(void)
{
    static std::mutex m;
    return m;
}

/* the set for the current device, made on first use; NULL while `st` is being captured into a
 * graph (a recording keeps to one stream) or when the device cannot give one */
static const gemm_overlap *overlap_for(cudaStream_t st)
{
    static gemm_overlap sets[OVERLAP_DEVICES];
    static signed char made[OVERLAP_DEVICES]; /* 0 not yet, 1 made, -1 failed */
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    int dev = 0;
    if (cudaStreamIsCapturing(st, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone ||
        cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= OVERLAP_DEVICES) {
        cudaGetLastError();
        return NULL;
    }
    std::lock_guard<std::mutex> hold(overlap_lock());
    if (made[dev] == 0) {
        gemm_overlap &o = sets[dev];
        bool ok = cudaStreamCreateWithFlags(&o.aux, cudaStreamNonBlocking) == cudaSuccess &&
                  cudaEventCreateWithFlags(&o.start, cudaEventDisableTiming) == cudaSuccess;
        for (int i = 0; i < 2; i++)
            ok = ok && cudaEventCreateWithFlags(&o.dequantized[i], cudaEventDisableTiming) == cudaSuccess &&
                 cudaEventCreateWithFlags(&o.multiplied[i], cudaEventDisableTiming) == cudaSuccess;
        if (!ok)
            cudaGetLastError();     /* what was made stays (a few handles); the GEMM runs on one stream */
        made[dev] = ok ? 1 : -1;
    }
    return made[dev] == 1 ? &sets[dev] : NULL;
}

static int gemm_f16(cublasHandle_t h, const __half *a, int64_t lda, int64_t m, const __half *xh,
                    int64_t n, int64_t k, float *y, int64_t ypitch, float beta);

static int overlap_call(cudaError_t e, const char *what)
{
    if (e != cudaSuccess)
        return zse_cuda_fail("cuda gemm: %s: %s", what, cudaGetErrorString(e));
    return 0;
}

/* W in slices of `half` rows alternating between the two halves of the slab: slice i is
 * dequantized on the aux stream once the GEMM of slice i - 2 (same half) is done, and
 * multiplied on st once it is dequantized. st's work before the call (x to f16, whatever
 * last read the slab) comes first; st waits for every dequantization, so the call ends with
 * st after all of it, as the one-stream loop did. */
static int gemm_slabs_overlapped(const zse_cuda_weight *w, cublasHandle_t h, const gemm_overlap &o, const __half *xh,
                                 const __half *xl, int64_t n, int64_t k, int64_t lda, __half *slab, int64_t half,
                                 float *y, int64_t ypitch, float beta, cudaStream_t st)
{
    std::lock_guard<std::mutex> hold(overlap_lock());
    if (overlap_call(cudaEventRecord(o.start, st), "event") != 0 ||
        overlap_call(cudaStreamWaitEvent(o.aux, o.start, 0), "stream wait") != 0)
        return -1;
    int64_t i = 0;
    for (int64_t r0 = 0; r0 < w->rows; r0 += half, i++) {
        const int b = (int)(i & 1);
        const int64_t m = min(half, w->rows - r0);
        __half *buf = slab + (int64_t)b * half * lda;
        if (i >= 2 && overlap_call(cudaStreamWaitEvent(o.aux, o.multiplied[b], 0), "stream wait") != 0)
            return -1;
        if (zse_cuda_dequant_f16(w, r0, m, (uint16_t *)buf, lda, o.aux) != 0 ||
            overlap_call(cudaEventRecord(o.dequantized[b], o.aux), "event") != 0 ||
            overlap_call(cudaStreamWaitEvent(st, o.dequantized[b], 0), "stream wait") != 0)
            return -1;
        if (gemm_f16(h, buf, lda, m, xh, n, k, y + r0, ypitch, beta) != 0)
            return -1;
        if (xl && gemm_f16(h, buf, lda, m, xl, n, k, y + r0, ypitch, 1.f) != 0)
            return -1;
        if (overlap_call(cudaEventRecord(o.multiplied[b], st), "event") != 0)
            return -1;
    }
    return 0;
}

/* y = W x (beta 0) or y += W x (beta 1, accumulating) through cuBLAS */
static int gemm_into(const zse_cuda_weight *w, const float *x, int64_t xpitch, int64_t n, float *y,
                     int64_t ypitch, float beta, void *cublas, void *scratch, size_t scratch_bytes,
                     zse_cuda_stream st)
{
    if (check_weight(w) != 0)
        return -1;
    cublasHandle_t h = (cublasHandle_t)cublas;
    if (cublas_ok(cublasSetStream(h, (cudaStream_t)st), "cublasSetStream") != 0)
        return -1;
    const int64_t k = w->cols;
    if (w->scheme == ZSE_SCHEME_F32) {
        /* f32 weights: plain SGEMM on the stored rows, no conversion */
        const float one = 1.f;
        return cublas_ok(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)w->rows, (int)n, (int)k,
                                     &one, (const float *)w->qs, (int)(w->row_bytes / 4), x,
                                     (int)xpitch, &beta, y, (int)ypitch),
                         "cublasSgemm");
    }
    /* plain 16-bit weights keep fp32-grade x through the hi/lo split */
    const bool split = w->scheme == ZSE_SCHEME_F16 || w->scheme == ZSE_SCHEME_BF16;
    const size_t xbytes = (size_t)n * k * sizeof(__half) * (split ? 2 : 1);
    const size_t xalloc = (xbytes + 255) & ~(size_t)255;
    const int64_t lda = (k + 7) & ~(int64_t)7;
    const size_t row_f16 = (size_t)lda * sizeof(__half);
    if (scratch_bytes < xalloc + row_f16 * 128)
        return zse_cuda_fail("cuda gemm: scratch of %zu bytes is too small for %lld x %lld",
                             scratch_bytes, (long long)n, (long long)k);
    __half *xh = (__half *)scratch, *xl = split ? xh + n * k : NULL;
    __half *slab = (__half *)((uint8_t *)scratch + xalloc);
    int64_t slab_rows = (int64_t)((scratch_bytes - xalloc) / row_f16);
    slab_rows = slab_rows >= 128 ? slab_rows & ~(int64_t)127 : slab_rows;
    split_x(x, xpitch, n, k, xh, xl, (cudaStream_t)st);
    ZSE_CUDA_LAUNCHED("cuda gemm: x to f16");
    /* more than one slab: two half slabs, the next one dequantized on a second stream while
     * cuBLAS multiplies this one (not while a step is being recorded) */
    const gemm_overlap *ov = w->rows > slab_rows && slab_rows >= 256 ? overlap_for((cudaStream_t)st) : NULL;
    if (ov)
        return gemm_slabs_overlapped(w, h, *ov, xh, xl, n, k, lda, slab, (slab_rows / 2) & ~(int64_t)127, y, ypitch,
                                     beta, (cudaStream_t)st);
    for (int64_t r0 = 0; r0 < w->rows; r0 += slab_rows) {
        const int64_t m = min(slab_rows, w->rows - r0);
        if (zse_cuda_dequant_f16(w, r0, m, (uint16_t *)slab, lda, st) != 0)
            return -1;
        if (gemm_f16(h, slab, lda, m, xh, n, k, y + r0, ypitch, beta) != 0)
            return -1;
        if (split && gemm_f16(h, slab, lda, m, xl, n, k, y + r0, ypitch, 1.f) != 0)
            return -1;
    }
    return 0;
}

extern "C" int zse_cuda_matmul_gemm(const zse_cuda_weight *w, const float *x, int64_t xpitch,
                                    int64_t n, float *y, int64_t ypitch, void *cublas,
                                    void *scratch, size_t scratch_bytes, zse_cuda_stream st)
{
    return gemm_into(w, x, xpitch, n, y, ypitch, 0.f, cublas, scratch, scratch_bytes, st);
}

/* the kernel for NT-row x tiles, its stage ring in dynamic shared memory (over the 48 KB
 * a launch gets unasked for NT = 64: the limit is raised once per instantiation, on the
 * first, never-recorded use) */
template <int S, int NT> static int mma_smem_ready(void)
{
    static int ready = 0;
    if (!ready) {
        cudaError_t err = cudaFuncSetAttribute(gemm_q4_mma_kernel<S, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               mma_smem<NT>::BYTES);
        if (err != cudaSuccess)
            return zse_cuda_fail("cuda mma: %d bytes of shared memory: %s", mma_smem<NT>::BYTES, cudaGetErrorString(err));
        ready = 1;
    }
    return 0;
}

/* how many blocks of the NT kernel one SM holds at once (registers, shared memory), asked
 * of the occupancy calculator once per instantiation; 1 if it cannot say */
template <int S, int NT> static int mma_residency_of(void)
{
    static int res = 0;
    if (!res) {
        int b = 0;
        if (mma_smem_ready<S, NT>() != 0 ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, gemm_q4_mma_kernel<S, NT>, MMA_WARPS * 32,
                                                          mma_smem<NT>::BYTES) != cudaSuccess) {
            cudaGetLastError();
            b = 1;
        }
        res = b > 0 ? b : 1;
    }
    return res;
}

static int mma_residency(int scheme, int64_t nt)
{
    const bool q4 = scheme == ZSE_SCHEME_Q4;
    switch (nt) {
    case 8: return q4 ? mma_residency_of<ZSE_SCHEME_Q4, 8>() : mma_residency_of<ZSE_SCHEME_Q4S, 8>();
    case 16: return q4 ? mma_residency_of<ZSE_SCHEME_Q4, 16>() : mma_residency_of<ZSE_SCHEME_Q4S, 16>();
    case 32: return q4 ? mma_residency_of<ZSE_SCHEME_Q4, 32>() : mma_residency_of<ZSE_SCHEME_Q4S, 32>();
    default: return q4 ? mma_residency_of<ZSE_SCHEME_Q4, 64>() : mma_residency_of<ZSE_SCHEME_Q4S, 64>();
    }
}

/* K splits for a launch of `blocks` (x, y) blocks of n-row tiles: the count that comes
 * nearest to one wave of resident blocks (`res` a SM, the occupancy calculator's figure),
 * each split at least 4 stages, the fp32 partials (written and read back, mostly in L2) at
 * most twice the weight's bytes. H200: a launch 13% over a wave of long blocks pays a second
 * round of them (3584 x 18944 at 64 rows: 16 splits, 448 blocks for 396 places, 79.8 us; 14
 * splits 62.5-64.3), while short blocks gain from a wave's worth more in flight (18944 x
 * 3584 at 8 rows: 3 splits, 444 blocks for 528 places, 39.6 us; 4 splits 38.3; at 64 rows
 * 2 splits 72.4, 3 splits 69.8) - hence nearest, not at most. Fewer rows per K split than
 * the old cap (cols / 16n) let 3584 x 3584 at 64 rows take 14 splits instead of 3: 33.2 ->
 * 26.5 us. */
static int mma_splits(int64_t blocks, int64_t n, int64_t cols, int res)
{
    const int64_t slots = (int64_t)res * device_facts_once().sms, b = blocks > 0 ? blocks : 1;
    const int64_t stages = (cols + MMA_KS - 1) / MMA_KS, traffic = cols / (4 * n);
    int64_t s = (slots + b / 2) / b;
    s = s < stages / 4 ? s : stages / 4;
    s = s < traffic ? s : traffic;
    return (int)(s < 1 ? 1 : s > 16 ? 16 : s);
}

/* the launch of weights [from, to) of mm (one scheme): its set, grid and split length */
static void mma_plan(const zse_cuda_multi *mm, int from, int to, int64_t n, mma_set *set, dim3 *grid,
                     int64_t *split_k)
{
    memset(set, 0, sizeof *set);
    set->count = to - from;
    int64_t blk = 0, row = 0;
    for (int i = from; i < to; i++) {
        const int k = i - from;
        set->w[k] = mm->w[i];
        set->e[k] = gemv_epi{mm->y[i], mm->ypitch[i], mm->bias[i], mm->accumulate};
        set->first_blk[k] = blk;
        set->first_row[k] = row;
        blk += zse_ceil_div(mm->w[i].rows, MMA_ROWS);
        row += mm->w[i].rows;
    }
    set->total_rows = row;
    const int64_t cols = mm->w[from].cols, nt = mma_tile(n), gy = zse_ceil_div(n, nt);
    const int splits = mma_splits(blk * gy, n, cols, mma_residency(mm->w[from].scheme, nt));
    /* splits start on stage boundaries */
    *split_k = zse_ceil_div(zse_ceil_div(cols, splits), MMA_KS) * MMA_KS;
    *grid = dim3((unsigned)blk, (unsigned)gy, (unsigned)zse_ceil_div(cols, *split_k));
}

/* weights i.. of mm that share one launch: all of them when they have one scheme */
static int mma_run_end(const zse_cuda_multi *mm, int i)
{
    int j = i + 1;
    while (j < mm->count && mm->w[j].scheme == mm->w[i].scheme)
        j++;
    return j;
}

static size_t mma_partials_bytes(const mma_set &set, const dim3 &grid, int64_t n)
{
    return grid.z > 1 ? (size_t)grid.z * (size_t)n * (size_t)set.total_rows * sizeof(float) : 0;
}

static size_t mma_multi_scratch_bytes(const zse_cuda_multi *mm, int64_t n)
{
    const size_t xbytes = ((size_t)n * (size_t)mm->w[0].cols * sizeof(__half) + 255) & ~(size_t)255;
    size_t most = 0;
    for (int i = 0; i < mm->count; i = mma_run_end(mm, i)) {
        mma_set set;
        dim3 grid;
        int64_t split_k;
        mma_plan(mm, i, mma_run_end(mm, i), n, &set, &grid, &split_k);
        const size_t b = mma_partials_bytes(set, grid, n);
        most = b > most ? b : most;
    }
    return xbytes + most + 256;
}

static size_t mma_scratch_bytes(const zse_cuda_weight *w, int64_t n)
{
    const zse_cuda_multi mm = single(w, NULL, 0);
    return mma_multi_scratch_bytes(&mm, n);
}

template <int NT>
static int launch_mma(int scheme, dim3 grid, const mma_set &set, const __half *xh, int64_t n, int64_t split_k,
                      float *part, cudaStream_t st)
{
    if (scheme == ZSE_SCHEME_Q4) {
        if (mma_smem_ready<ZSE_SCHEME_Q4, NT>() != 0)
            return -1;
        zse_launch(gemm_q4_mma_kernel<ZSE_SCHEME_Q4, NT>, grid, MMA_WARPS * 32, mma_smem<NT>::BYTES, st,
            set, xh, n, split_k, part);
    } else {
        if (mma_smem_ready<ZSE_SCHEME_Q4S, NT>() != 0)
            return -1;
        zse_launch(gemm_q4_mma_kernel<ZSE_SCHEME_Q4S, NT>, grid, MMA_WARPS * 32, mma_smem<NT>::BYTES, st,
            set, xh, n, split_k, part);
    }
    return 0;
}

/* every weight of mm (4-bit, tensor-core capable, one width) over n rows of x: one launch
 * per run of weights of one scheme (so q, k and v are one), x converted to f16 once unless
 * the kernel that wrote x left it so */
static int gemm_q4_mma(const zse_cuda_multi *mm, const float *x, int64_t xpitch, int64_t n, void *scratch,
                       size_t scratch_bytes, bool convert_x, cudaStream_t st)
{
    const int64_t cols = mm->w[0].cols;
    if (scratch_bytes < mma_multi_scratch_bytes(mm, n) || ((uintptr_t)scratch & 255))
        return zse_cuda_fail("cuda mma: scratch of %zu bytes is too small for %lld x %lld", scratch_bytes,
                             (long long)n, (long long)cols);
    __half *xh = (__half *)scratch;
    float *work = (float *)((uint8_t *)scratch + (((size_t)n * (size_t)cols * sizeof(__half) + 255) & ~(size_t)255));
    if (convert_x) {
        split_x(x, xpitch, n, cols, xh, NULL, st);
        ZSE_CUDA_LAUNCHED("cuda mma: x to f16");
    }
    for (int i = 0; i < mm->count; i = mma_run_end(mm, i)) {
        mma_set set;
        dim3 grid;
        int64_t split_k;
        mma_plan(mm, i, mma_run_end(mm, i), n, &set, &grid, &split_k);
        float *part = grid.z > 1 ? work : NULL;
        const int scheme = set.w[0].scheme;
        int rc = 0;
        switch (mma_tile(n)) {
        case 8: rc = launch_mma<8>(scheme, grid, set, xh, n, split_k, part, st); break;
        case 16: rc = launch_mma<16>(scheme, grid, set, xh, n, split_k, part, st); break;
        case 32: rc = launch_mma<32>(scheme, grid, set, xh, n, split_k, part, st); break;
        default: rc = launch_mma<64>(scheme, grid, set, xh, n, split_k, part, st); break;
        }
        if (rc != 0)
            return -1;
        ZSE_CUDA_LAUNCHED("cuda mma");
        if (part) {
            zse_launch(mma_reduce_kernel, (unsigned)zse_ceil_div(n * set.total_rows, 256), 256, 0, st,
                part, (int)grid.z, n, set);
            ZSE_CUDA_LAUNCHED("cuda mma: split sum");
        }
    }
    return 0;
}

extern "C" int zse_cuda_matmul_mma(const zse_cuda_weight *w, const float *x, int64_t xpitch, int64_t n,
                                   float *y, int64_t ypitch, void *scratch, size_t scratch_bytes,
                                   zse_cuda_stream st)
{
    if (check_weight(w) != 0)
        return -1;
    if (!mma_q4_ok(w))
        return zse_cuda_fail("cuda mma: needs a 4-bit group scheme, cols %% 8 == 0 and sm_80 or newer");
    if (n < 1)
        return 0;
    const zse_cuda_multi mm = single(w, y, ypitch);
    return gemm_q4_mma(&mm, x, xpitch, n, scratch, scratch_bytes, true, (cudaStream_t)st);
}

/* every weight of mm takes the tensor-core path at n rows (one x width, checked by the caller) */
static bool multi_on_mma(const zse_cuda_multi *mm, int64_t n)
{
    bool all = n >= ZSE_CUDA_MMA_MIN && n <= ZSE_CUDA_MMA_MAX;
    for (int i = 0; i < mm->count; i++)
        all = all && mma_q4_ok(&mm->w[i]);
    return all;
}

extern "C" size_t zse_cuda_matmul_multi_scratch_bytes(const zse_cuda_multi *mm, int64_t n)
{
    size_t most = 0;
    for (int i = 0; i < mm->count; i++) {
        size_t b = zse_cuda_matmul_scratch_bytes(&mm->w[i], n);
        most = b > most ? b : most;
    }
    if (mm->count >= 1 && multi_on_mma(mm, n)) {
        const size_t b = mma_multi_scratch_bytes(mm, n);   /* the weights' partials side by side */
        most = b > most ? b : most;
    }
    return most;
}

/* 1..ZSE_CUDA_MULTI_MAX valid weights over one x (the same width) */
static int check_multi(const zse_cuda_multi *mm)
{
    if (mm->count < 1 || mm->count > ZSE_CUDA_MULTI_MAX)
        return zse_cuda_fail("cuda matmul: %d weights in one call (1..%d)", mm->count, ZSE_CUDA_MULTI_MAX);
    for (int i = 0; i < mm->count; i++) {
        if (check_weight(&mm->w[i]) != 0)
            return -1;
        if (mm->w[i].cols != mm->w[0].cols)
            return zse_cuda_fail("cuda matmul: weights of %lld and %lld columns over one x",
                                 (long long)mm->w[0].cols, (long long)mm->w[i].cols);
    }
    return 0;
}

extern "C" int zse_cuda_matmul_multi(const zse_cuda_multi *mm, const float *x, int64_t xpitch, int64_t n,
                                     void *cublas, void *scratch, size_t scratch_bytes, zse_cuda_stream st)
{
    if (check_multi(mm) != 0)
        return -1;
    if (multi_on_mma(mm, n))
        return gemm_q4_mma(mm, x, xpitch, n, scratch, scratch_bytes, mm->x_ready != ZSE_CUDA_XPREP_F16,
                           (cudaStream_t)st);
    if (n <= ZSE_CUDA_GEMV_MAX)
        return multi_gemv(mm, x, xpitch, n, scratch, scratch_bytes, (cudaStream_t)st);
    for (int i = 0; i < mm->count; i++) {
        const zse_cuda_weight *w = &mm->w[i];
        float *y = mm->y[i];
        const int64_t yp = mm->ypitch[i];
        /* int4 at 9..16 rows: two GEMV passes read W twice yet beat dequantizing it
         * (H100: 2 x 69 us against 160 us for 18944 x 3584) */
        if (uses_dp4a(w->scheme) && n <= 2 * ZSE_CUDA_GEMV_MAX) {
            for (int64_t r = 0; r < n; r += ZSE_CUDA_GEMV_MAX) {
                const int64_t m = n - r < ZSE_CUDA_GEMV_MAX ? n - r : ZSE_CUDA_GEMV_MAX;
                zse_cuda_multi one = single(w, y + r * yp, yp);
                one.bias[0] = mm->bias[i];
                one.accumulate = mm->accumulate;
                if (multi_gemv(&one, x + r * xpitch, xpitch, m, scratch, scratch_bytes, (cudaStream_t)st) != 0)
                    return -1;
            }
            continue;
        }
        if (gemm_into(w, x, xpitch, n, y, yp, mm->accumulate ? 1.f : 0.f, cublas, scratch, scratch_bytes, st) != 0)
            return -1;
        if (mm->bias[i] && zse_cuda_add_bias(y, yp, mm->bias[i], n, w->rows, st) != 0)
            return -1;
    }
    return 0;
}

/* ---- a LoRA delta folded into the matmul (lora.cuh) ------------------------------------ */

/* the partial sums of a folded shrink over x of `in` columns */
static size_t lora_fold_part_bytes(int64_t in)
{
    return (size_t)ZSE_CUDA_MULTI_MAX * ZSE_CUDA_LORA_MAX_RANK * (size_t)zse_ceil_div(in, LORA_FUSE_CHUNK) *
           sizeof(float);
}

extern "C" size_t zse_cuda_matmul_lora_scratch_bytes(int64_t n, int n_outs, int64_t in)
{
    const size_t apply = zse_cuda_lora_scratch_bytes(n, n_outs), fold = lora_fold_part_bytes(in);
    return apply > fold ? apply : fold;
}

/* blocks of the folded one-row GEMV the device holds at once */
template <int S, int NW, int R, int P>
static int64_t fold_resident_blocks(void)
{
    static const int64_t blocks = [] {
        int per_sm = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_q4_dp4a_kernel<S, 1, NW, R, P, true>, NW * 32,
                                                          0) != cudaSuccess) {
            cudaGetLastError();
            per_sm = 1;
        }
        return (int64_t)(per_sm > 0 ? per_sm : 1) * device_facts_once().sms;
    }();
    return blocks;
}

/* Whether folding pays for mm: every block of the launch waits for the shrink and reads u
 * after its dot products, a few hundred ns that hold its slot. A launch of one or two waves
 * of blocks pays that once or twice; gate/up of a 7B (4,736 blocks, ~9 waves on an H100)
 * paid it every wave and ran 47.9 µs folded against 35.2 for the GEMV then the separate
 * launch, while q/k/v (1,152 blocks) went 16.3 -> 13.7 and down (448) 30.2 -> 26.7
 * (kernels_test --bench lora, docs/BENCHMARKS.md §LoRA adapters). */
static bool fold_pays(const zse_cuda_multi *mm)
{
    const bool small = gemv1_small(mm);
    const int rows_per_block = small ? 4 : 8;
    int64_t blocks = 0;
    for (int i = 0; i < mm->count; i++)
        blocks += zse_ceil_div(mm->w[i].rows, rows_per_block);
    int64_t resident;
    if (mm->w[0].scheme == ZSE_SCHEME_Q4)
        resident = small ? fold_resident_blocks<ZSE_SCHEME_Q4, 2, 4, 2>() : fold_resident_blocks<ZSE_SCHEME_Q4, 4, 8, 1>();
    else
        resident = small ? fold_resident_blocks<ZSE_SCHEME_Q4S, 2, 4, 2>() : fold_resident_blocks<ZSE_SCHEME_Q4S, 4, 8, 1>();
    return blocks <= 2 * resident;
}

/* ZSE_CUDA_LORA_FOLD=0 keeps every delta in its own launch after the matmul (A/B, debugging) */
static bool lora_fold_allowed(void)
{
    static const bool allowed = [] {
        const char *e = getenv("ZSE_CUDA_LORA_FOLD");
        return !(e && strcmp(e, "0") == 0);
    }();
    return allowed;
}

/* whether l's delta folds into mm's launch over n rows of x (1, f filled in), runs after it
 * (0), or does not belong to this matmul (-1): each of l's projections must be one of mm's
 * outputs, with its shape. It folds at one row on the shared 4-bit GEMV with x in 16-byte
 * vectors, where that pays (fold_pays). */
static int lora_fold_args(const zse_cuda_multi *mm, const float *x, int64_t n, const zse_cuda_lora *l,
                          const int32_t *adapter_of, float *part, size_t part_bytes, lora_fuse *f)
{
    memset(f, 0, sizeof *f);
    for (int k = 0; k < ZSE_CUDA_MULTI_MAX; k++)
        f->module[k] = -1;
    if (l->n_outs < 1 || l->n_outs > 3)
        return zse_cuda_fail("cuda matmul_multi_lora: %d projections", l->n_outs);
    for (int i = 0; i < l->n_outs; i++) {
        int k = 0;
        while (k < mm->count && mm->y[k] != l->y[i])
            k++;
        if (k == mm->count || l->in[i] != mm->w[k].cols || l->out[i] != mm->w[k].rows || l->ypitch[i] != mm->ypitch[k])
            return zse_cuda_fail("cuda matmul_multi_lora: LoRA projection %d (module %d, %lld -> %lld) is not an "
                                 "output of the matmul", i, l->module[i], (long long)l->in[i], (long long)l->out[i]);
        f->module[k] = l->module[i];
    }
    bool dp4a = uses_dp4a(mm->w[0].scheme);
    for (int k = 1; k < mm->count; k++)
        dp4a = dp4a && mm->w[k].scheme == mm->w[0].scheme;
    const int max_rank = l->max_rank > 0 ? l->max_rank : ZSE_CUDA_LORA_MAX_RANK;
    const int64_t in = mm->w[0].cols;
    if (!lora_fold_allowed() || n != 1 || !dp4a || multi_on_mma(mm, n) || in % 8 != 0 || (uintptr_t)x % 16 != 0 ||
        !part || part_bytes < lora_fold_part_bytes(in) || max_rank > ZSE_CUDA_LORA_MAX_RANK || !l->sync ||
        !l->slots || l->n_slots < 1 || l->layer < 0 || l->layer >= l->n_layers || !fold_pays(mm))
        return 0; /* lora_apply after the matmul (which checks and reports its own arguments) */
    f->slots = l->slots;
    f->slot_bytes = l->slot_bytes;
    f->n_slots = l->n_slots;
    f->layer = l->layer;
    f->adapter_of = adapter_of;
    f->x = x;
    f->in = in;
    f->chunks = (int)zse_ceil_div(in, LORA_FUSE_CHUNK);
    f->groups = (max_rank + LORA_FUSE_J - 1) / LORA_FUSE_J;
    f->tasks = (unsigned)(mm->count * f->groups * f->chunks);
    f->part = part;
    f->sync = l->sync;
    return 1;
}

extern "C" int zse_cuda_matmul_multi_lora(const zse_cuda_multi *mm, const float *x, int64_t xpitch, int64_t n,
                                          void *cublas, void *scratch, size_t scratch_bytes, const zse_cuda_lora *l,
                                          const int32_t *adapter_of, float *lscratch, size_t lscratch_bytes,
                                          int *folded, zse_cuda_stream st)
{
    if (folded)
        *folded = 0;
    if (check_multi(mm) != 0)
        return -1;
    lora_fuse f;
    const int fold = lora_fold_args(mm, x, n, l, adapter_of, lscratch, lscratch_bytes, &f);
    if (fold < 0)
        return -1;
    if (folded)
        *folded = fold;
    if (!fold)
        return zse_cuda_matmul_multi(mm, x, xpitch, n, cublas, scratch, scratch_bytes, st) != 0
                   ? -1
                   : zse_cuda_lora_apply(l, adapter_of, x, xpitch, n, lscratch, lscratch_bytes, st);
    return multi_gemv(mm, x, xpitch, n, scratch, scratch_bytes, (cudaStream_t)st, &f);
}

extern "C" int zse_cuda_matmul(const zse_cuda_weight *w, const float *x, int64_t xpitch, int64_t n,
                               float *y, int64_t ypitch, void *cublas, void *scratch,
                               size_t scratch_bytes, zse_cuda_stream st)
{
    const zse_cuda_multi mm = single(w, y, ypitch);
    return zse_cuda_matmul_multi(&mm, x, xpitch, n, cublas, scratch, scratch_bytes, st);
}
