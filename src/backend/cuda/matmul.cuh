/* matmul.cuh — the device-side pieces of the matmul kernels, shared by matmul.cu (the dense
 * GEMV, dp4a GEMV and tensor-core kernels) and moe.cu (the grouped expert matmul, which runs
 * the same per-block code over each active expert's segment of rows). Internal to
 * src/backend/cuda. */
#ifndef ZSE_CUDA_MATMUL_CUH
#define ZSE_CUDA_MATMUL_CUH

#include "backend/cuda/common.cuh"

/* ---- GEMV ------------------------------------------------------------------------- */

/* A block's warps share its rows and split the row's units between them (more loads in
 * flight per row, and enough blocks for the small 3584-wide projections); shared memory
 * adds the warps' sums at the end. */
enum { GEMV_WARPS = 4 };
/* rows per block: 4 while registers allow (fewer x re-reads), 2 for wide batches */
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

/* where a GEMV's sums go: y[b][row] = sum (+ bias[row]) (+ the y already there when
 * accumulating: a residual add done in the store, y_old + v as the add kernel does it) */
struct gemv_epi {
    float *y;
    int64_t ypitch;
    const float *bias;
    int accumulate;
};

/* add the lanes' and then the warps' partial sums; y[b][row0 + r] = sum (times the row's
 * int8 scale when row_scale), through the epilogue; lora_delta is added by the thread that
 * stores (thread b * R + r) */
template <int B, int R, int NW = GEMV_WARPS>
__device__ __forceinline__ void store_rows(float (&acc)[B][R], const zse_cuda_weight &w,
                                           int64_t row0, int n, const gemv_epi &e, bool row_scale,
                                           float lora_delta = 0.f)
{
    __shared__ float red[NW][B * R];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int b = 0; b < B; b++)
#pragma unroll
        for (int r = 0; r < R; r++) {
            float v = acc[b][r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
                v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0)
                red[warp][b * R + r] = v;
        }
    __syncthreads();
    const int i = threadIdx.x;
    if (i < B * R) {
        const int b = i / R, r = i % R;
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < NW; k++)
            v += red[k][i];
        if (b < n && row0 + r < w.rows) {
            if (row_scale)
                v *= ((const float *)w.scales)[row0 + r];
            if (e.bias)
                v += e.bias[row0 + r];
            v += lora_delta; /* a LoRA delta folded into the launch (lora.cuh): its storing thread's */
            float *dst = e.y + (int64_t)b * e.ypitch + row0 + r;
            *dst = e.accumulate ? *dst + v : v;
        }
    }
}

/* One GEMV block: rows row0 .. row0 + R of w (R = gemv_rows<B>::R) against the n <= B rows of
 * x, through the epilogue; table holds the NF4 code values (shared memory) */
template <int S, int B>
__device__ __forceinline__ void gemv_block(const zse_cuda_weight &w, const float *__restrict__ x, int64_t xpitch,
                                           int n, int64_t row0, const float *table, const gemv_epi &e)
{
    typedef scheme_traits<S> T;
    typedef scheme_scales<S> SC;
    constexpr int GEMV_ROWS = gemv_rows<B>::R;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const group_of grp = group_div(w.group_size);

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
    for (int64_t u = warp * 32 + lane; u < n_units; u += GEMV_WARPS * 32) {
        uint4 wv[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
            wv[r] = ld_stream16(rowp[r] + u * 16);
        float sc[GEMV_ROWS], mn[GEMV_ROWS];
        if (SC::group) {
            const int64_t g = grp(u * T::E);
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

    store_rows<B, GEMV_ROWS>(acc, w, row0, n, e, SC::row);
}

/* ---- 4-bit GEMV on integer dot products (matmul.cu has the scheme) ------------------- */

enum { XQ_BYTES = 64 + 16 };
/* rows per block. H100, int4 g128: at batch 1, 8 rows ran 10-15% slower than 4; at batch
 * 4-8 the kernel is bound by loading x chunks, and 8 rows sharing each one win: batch 8 on
 * 18944x3584 74.3 -> 58.6 us, 3584x18944 66.0 -> 60.7 us, the 152064x3584 head 560 -> 408 us;
 * batch 4 on 18944x3584 48.9 -> 40.3 us (kernels_test --bench, 2026-11-22) */
#ifndef ZSE_Q4_BATCH_ROWS
#define ZSE_Q4_BATCH_ROWS 8
#endif
template <int B> struct q4_rows { static constexpr int R = B >= 4 ? ZSE_Q4_BATCH_ROWS : 4; };    /* per chunk: 32 hi bytes, 32 lo bytes, float4 (d, dl, sx, 0) */

/* unit u (16 bytes, 32 codes) of each of the R rows, with its group's scale and min */
template <int S, int R>
__device__ __forceinline__ void q4_load_unit(const zse_cuda_weight &w, const uint8_t *const (&rowp)[R],
                                             const int64_t (&rr)[R], const group_of &grp, int64_t u,
                                             uint4 (&v)[R], float (&sc)[R], float (&mn)[R])
{
    const int64_t g = grp(u * 32);
#pragma unroll
    for (int r = 0; r < R; r++) {
        v[r] = ld_stream16(rowp[r] + u * 16);
        sc[r] = __half2float(((const __half *)w.scales)[rr[r] * w.groups + g]);
        mn[r] = S == ZSE_SCHEME_Q4 ? __half2float(((const __half *)w.mins)[rr[r] * w.groups + g]) : 0.f;
    }
}

/* acc[b][r] += row r's unit u (v, its group's scale and min) . x row b's chunk u */
template <int S, int B, int R>
__device__ __forceinline__ void q4_dot_unit(float (&acc)[B][R], const uint4 (&v)[R], const float (&sc)[R],
                                            const float (&mn)[R], const uint4 *__restrict__ xq,
                                            const float4 *__restrict__ xs, int64_t units, int n, int64_t u)
{
    int lo[R][4], hi[R][4];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const uint32_t vv[4] = {v[r].x, v[r].y, v[r].z, v[r].w};
#pragma unroll
        for (int p = 0; p < 4; p++) {
            lo[r][p] = (int)(vv[p] & 0x0F0F0F0Fu);
            hi[r][p] = (int)((vv[p] >> 4) & 0x0F0F0F0Fu);
        }
    }
#pragma unroll
    for (int b = 0; b < B; b++) {
        const int64_t c = (int64_t)min(b, n - 1) * units + u;
        const uint4 h0 = __ldg(xq + c * 4), h1 = __ldg(xq + c * 4 + 1);
        const uint4 l0 = __ldg(xq + c * 4 + 2), l1 = __ldg(xq + c * 4 + 3);
        const float4 f = __ldg(xs + c);
#pragma unroll
        for (int r = 0; r < R; r++) {
            int ih = 0, il = 0;
            ih = __dp4a(lo[r][0], (int)h0.x, ih); ih = __dp4a(lo[r][1], (int)h0.y, ih);
            ih = __dp4a(lo[r][2], (int)h0.z, ih); ih = __dp4a(lo[r][3], (int)h0.w, ih);
            ih = __dp4a(hi[r][0], (int)h1.x, ih); ih = __dp4a(hi[r][1], (int)h1.y, ih);
            ih = __dp4a(hi[r][2], (int)h1.z, ih); ih = __dp4a(hi[r][3], (int)h1.w, ih);
            il = __dp4a(lo[r][0], (int)l0.x, il); il = __dp4a(lo[r][1], (int)l0.y, il);
            il = __dp4a(lo[r][2], (int)l0.z, il); il = __dp4a(lo[r][3], (int)l0.w, il);
            il = __dp4a(hi[r][0], (int)l1.x, il); il = __dp4a(hi[r][1], (int)l1.y, il);
            il = __dp4a(hi[r][2], (int)l1.z, il); il = __dp4a(hi[r][3], (int)l1.w, il);
            const float qx = fmaf((float)ih, f.x, (float)il * f.y);
            if (S == ZSE_SCHEME_Q4)
                acc[b][r] = fmaf(sc[r], qx, fmaf(mn[r], f.z, acc[b][r]));
            else
                acc[b][r] = fmaf(sc[r], fmaf(-8.f, f.z, qx), acc[b][r]);
        }
    }
}

/* ---- 4-bit weights on tensor cores (matmul.cu has the scheme) ----------------------- */

enum { MMA_WARPS = 4, MMA_ROWS_W = 32, MMA_ROWS = MMA_WARPS * MMA_ROWS_W, MMA_KS = 64, MMA_CH = MMA_KS / 32,
       MMA_XP = MMA_KS + 8, MMA_STAGES = 4 };
static_assert(MMA_CH == 2, "the W tile's swizzle pairs two chunks a row");
static_assert(MMA_ROWS == MMA_WARPS * 32, "one thread loads each block row's scales");

/* one stage in shared memory: W chunks [MMA_ROWS][MMA_CH] (16 B each, the pair of a row
 * swapped on every other group of 4 rows so a fragment read hits 32 distinct banks), the x
 * tile [NT][MMA_XP] halves (a 144-byte pitch: ldmatrix's 8 row reads hit distinct banks),
 * then per (row, chunk) the scale and the min as f16 pairs */
template <int NT> struct mma_smem {
    static constexpr int W = MMA_ROWS * MMA_CH * 16;
    static constexpr int X = NT * MMA_XP * 2;
    static constexpr int SC = MMA_ROWS * MMA_CH * 8;
    static constexpr int STAGE = W + X + SC;
    static constexpr int BYTES = STAGE * MMA_STAGES;
};

/* where chunk c of block row r sits in a stage's W tile */
__device__ __forceinline__ int mma_wslot(int r, int c) { return r * MMA_CH + (c ^ ((r >> 2) & 1)); }

/* queue one stage's copies: W chunks of the block's rows (rows past the end re-read the
 * last row; chunks past the row are zeros) and the x tile (zeros past n and past cols) */
template <int NT>
__device__ __forceinline__ void mma_issue(uint8_t *stage, const zse_cuda_weight &w, const __half *__restrict__ xh,
                                          int64_t n, int64_t n0, int64_t k0, int64_t row_blk)
{
    const int64_t K = w.cols, units = (K + 31) / 32;
    uint4 *ws = reinterpret_cast<uint4 *>(stage);
#pragma unroll
    for (int k = 0; k < MMA_ROWS * MMA_CH / (MMA_WARPS * 32); k++) {
        const int i = k * MMA_WARPS * 32 + threadIdx.x, r = i / MMA_CH, c = i % MMA_CH;
        const int64_t row = min(row_blk + r, w.rows - 1), u = k0 / 32 + c;
        const bool ok = u < units;
        cp_async16_l2line(&ws[mma_wslot(r, c)], (const uint8_t *)w.qs + row * w.row_bytes + (ok ? u : 0) * 16, ok);
    }
    __half *xs = reinterpret_cast<__half *>(stage + mma_smem<NT>::W);
    constexpr int XN = NT * (MMA_KS / 8), XT = (XN + MMA_WARPS * 32 - 1) / (MMA_WARPS * 32);
#pragma unroll
    for (int it = 0; it < XT; it++) {
        const int i = it * MMA_WARPS * 32 + threadIdx.x, r = i / (MMA_KS / 8), p = i % (MMA_KS / 8);
        if (XN % (MMA_WARPS * 32) != 0 && i >= XN)
            break;
        const int64_t k = k0 + p * 8;
        const bool ok = n0 + r < n && k < K;
        cp_async16(xs + r * MMA_XP + p * 8, ok ? xh + (n0 + r) * K + k : xh, ok);
    }
}

/* this thread's block row's (scale, min) f16 pairs for the stage's chunks */
template <int S>
__device__ __forceinline__ void mma_scales(uint2 (&out)[MMA_CH], const zse_cuda_weight &w, int64_t k0, int64_t row_blk)
{
    const int64_t units = (w.cols + 31) / 32, row = min(row_blk + (int64_t)threadIdx.x, w.rows - 1);
#pragma unroll
    for (int c = 0; c < MMA_CH; c++) {
        const int64_t u = min(k0 / 32 + c, units - 1), grp = group_div(w.group_size)(u * 32);
        const __half s = ((const __half *)w.scales)[row * w.groups + grp];
        const __half m = S == ZSE_SCHEME_Q4 ? ((const __half *)w.mins)[row * w.groups + grp] : __float2half(0.f);
        const __half2 s2 = __halves2half2(s, s), m2 = __halves2half2(m, m);
        out[c] = make_uint2(*reinterpret_cast<const uint32_t *>(&s2), *reinterpret_cast<const uint32_t *>(&m2));
    }
}

template <int NT>
__device__ __forceinline__ void mma_park_scales(uint8_t *stage, const uint2 (&sc)[MMA_CH])
{
    uint2 *dst = reinterpret_cast<uint2 *>(stage + mma_smem<NT>::W + mma_smem<NT>::X);
#pragma unroll
    for (int c = 0; c < MMA_CH; c++)
        dst[threadIdx.x * MMA_CH + c] = sc[c];
}

/* two codes of a fragment (bytes of x as [a, 0, b, 0]; the high nibbles when hi) as the
 * f16 pair (w_a, w_b) */
template <int S>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t x, int hi, uint2 sm)
{
    const uint32_t v = ((hi ? x >> 4 : x) & 0x000F000Fu) | 0x64006400u;
    /* the f16 pairs (1024, 1024) and (1032, 1032), as bits: a constant, not a conversion */
    const uint32_t bias = S == ZSE_SCHEME_Q4 ? 0x64006400u : 0x64086408u;
    const __half2 q = __hsub2(*reinterpret_cast<const __half2 *>(&v), *reinterpret_cast<const __half2 *>(&bias));
    const __half2 sc = *reinterpret_cast<const __half2 *>(&sm.x);
    __half2 r;
    if (S == ZSE_SCHEME_Q4)
        r = __hfma2(q, sc, *reinterpret_cast<const __half2 *>(&sm.y));
    else
        r = __hmul2(q, sc);
    return *reinterpret_cast<const uint32_t *>(&r);
}

/* one stage's math for a warp: its 2 x 16 rows against the NT x-rows of the tile */
template <int S, int NT>
__device__ __forceinline__ void mma_stage_math(float (&acc)[2][NT / 8][4], const uint8_t *stage, int warp, int lane)
{
    constexpr int NJ = NT / 8;
    const int g = lane >> 2, t = lane & 3;
    const uint32_t *ws = reinterpret_cast<const uint32_t *>(stage);
    const __half *xs = reinterpret_cast<const __half *>(stage + mma_smem<NT>::W);
    const uint2 *scs = reinterpret_cast<const uint2 *>(stage + mma_smem<NT>::W + mma_smem<NT>::X);
    /* bytes 2t, 2t+1 of a 4-byte word: its bytes 0,1 for even t, 2,3 for odd */
    const uint32_t sel = (t & 1) ? 0x4342u : 0x4140u;
#pragma unroll
    for (int c = 0; c < MMA_CH; c++) {
        uint32_t x0[2][2], x1[2][2];
        uint2 sm[2][2];
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = warp * MMA_ROWS_W + mt * 16 + h * 8 + g;
                const uint32_t *chunk = ws + mma_wslot(r, c) * 4;
                x0[mt][h] = __byte_perm(chunk[t >> 1], 0, sel);       /* codes 2t, 2t+1 (+16) */
                x1[mt][h] = __byte_perm(chunk[2 + (t >> 1)], 0, sel); /* codes 2t+8, 2t+9 (+16) */
                sm[mt][h] = scs[r * MMA_CH + c];
            }
#pragma unroll
        for (int hi = 0; hi < 2; hi++) {
            uint32_t a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    a[mt][h] = dequant_pair<S>(x0[mt][h], hi, sm[mt][h]);
                    a[mt][2 + h] = dequant_pair<S>(x1[mt][h], hi, sm[mt][h]);
                }
            const int kb = c * 32 + hi * 16;
            if (NJ == 1) {
                uint32_t b0, b1;
                ldsm_x2(b0, b1, xs + (lane & 7) * MMA_XP + kb + ((lane >> 3) & 1) * 8);
                mma_16816(acc[0][0], a[0], b0, b1);
                mma_16816(acc[1][0], a[1], b0, b1);
            } else {
#pragma unroll
                for (int jp = 0; jp < NJ / 2; jp++) {
                    uint32_t b[4];
                    const int m = lane >> 3;
                    ldsm_x4(b, xs + ((2 * jp + (m >> 1)) * 8 + (lane & 7)) * MMA_XP + kb + (m & 1) * 8);
                    mma_16816(acc[0][2 * jp], a[0], b[0], b[1]);
                    mma_16816(acc[1][2 * jp], a[1], b[0], b[1]);
                    mma_16816(acc[0][2 * jp + 1], a[0], b[2], b[3]);
                    mma_16816(acc[1][2 * jp + 1], a[1], b[2], b[3]);
                }
            }
        }
    }
}

/* iteration s of the main loop: park the scales this thread loaded two iterations ago
 * (those of stage s + MMA_STAGES - 3) and reload `sc` with those of stage s + MMA_STAGES - 1,
 * whose copies it queues once stage s has landed; then stage s's math */
template <int S, int NT>
__device__ __forceinline__ void mma_iteration(float (&acc)[2][NT / 8][4], uint8_t *smem, int s, int nst,
                                              uint2 (&sc)[MMA_CH], const zse_cuda_weight &w,
                                              const __half *__restrict__ xh, int64_t n, int64_t n0, int64_t k_begin,
                                              int64_t row_blk)
{
    constexpr int ST = mma_smem<NT>::STAGE;
    cp_async_wait<MMA_STAGES - 2>();
    const int parked = s + MMA_STAGES - 3;
    if (s >= 2 && parked < nst)
        mma_park_scales<NT>(smem + (parked % MMA_STAGES) * ST, sc);
    __syncthreads();
    const int next = s + MMA_STAGES - 1;
    if (next < nst) {
        const int64_t k0 = k_begin + (int64_t)next * MMA_KS;
        mma_issue<NT>(smem + (next % MMA_STAGES) * ST, w, xh, n, n0, k0, row_blk);
        mma_scales<S>(sc, w, k0, row_blk);
    }
    cp_async_commit();
    mma_stage_math<S, NT>(acc, smem + (s % MMA_STAGES) * ST, threadIdx.x >> 5, threadIdx.x & 31);
}

/* One block's products on tensor cores: acc (its warp's 2 x 16 rows of the block's rows from
 * row_blk, against the NT x rows from n0, K from k_begin to k_end) from scratch, W streamed
 * through the stage ring in smem. acc's layout is mma.sync's: c0, c1 row g, x rows 2t and
 * 2t + 1; c2, c3 row g + 8 (g = lane / 4, t = lane % 4). */
template <int S, int NT>
__device__ __forceinline__ void mma_accumulate(float (&acc)[2][NT / 8][4], uint8_t *smem, const zse_cuda_weight &w,
                                               const __half *__restrict__ xh, int64_t n, int64_t n0, int64_t k_begin,
                                               int64_t k_end, int64_t row_blk)
{
    constexpr int NJ = NT / 8, ST = mma_smem<NT>::STAGE;
    static_assert(MMA_STAGES >= 4, "scales are parked two iterations after their load");
    const int nst = (int)((k_end - k_begin + MMA_KS - 1) / MMA_KS);

#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int j = 0; j < NJ; j++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[mt][j][i] = 0.f;

    /* the first MMA_STAGES - 1 stages, scales parked at once */
#pragma unroll
    for (int s = 0; s < MMA_STAGES - 1; s++) {
        if (s < nst) {
            const int64_t k0 = k_begin + (int64_t)s * MMA_KS;
            uint2 sc[MMA_CH];
            mma_issue<NT>(smem + s * ST, w, xh, n, n0, k0, row_blk);
            mma_scales<S>(sc, w, k0, row_blk);
            mma_park_scales<NT>(smem + s * ST, sc);
        }
        cp_async_commit();
    }
    /* even and odd iterations each keep their own set of scales in flight (a register
     * array indexed by s % 2 would live in local memory), so a turn runs two of them */
    uint2 sa[MMA_CH], sb[MMA_CH];
    for (int s = 0; s < nst; s += 2) {
        mma_iteration<S, NT>(acc, smem, s, nst, sa, w, xh, n, n0, k_begin, row_blk);
        if (s + 1 < nst)
            mma_iteration<S, NT>(acc, smem, s + 1, nst, sb, w, xh, n, n0, k_begin, row_blk);
    }
    cp_async_wait<0>();
}

/* matmul.cu's converting launches, for the grouped expert matmul (moe.cu): x's n rows
 * quantized for the dp4a GEMV (xq: n * ceil(cols / 32) * 64 bytes of codes, xs: a float4 per
 * 32 values), or to f16 rows [n][cols] for the tensor-core kernel */
void zse_cuda_quantize_x(const float *x, int64_t xpitch, int64_t n, int64_t cols, uint4 *xq, float4 *xs,
                         cudaStream_t st);
void zse_cuda_x_to_f16(const float *x, int64_t xpitch, int64_t n, int64_t cols, __half *out, cudaStream_t st);
/* the NF4 code values the dense kernels use (zse_cuda_set_nf4), on the host */
const float *zse_cuda_nf4_host(void);

/* x rows a block takes at a time: the smallest tile that holds n, at most 64 */
static inline int64_t mma_tile(int64_t n) { return n <= 8 ? 8 : n <= 16 ? 16 : n <= 32 ? 32 : 64; }

#endif
