/* moe.cu — a mixture-of-experts layer on the GPU: the routing (one block, a warp per
 * token: softmax, top-k; then the pairs sorted by expert), the grouped expert matmul (one
 * launch over every active expert: grid x walks the weight rows, grid y the experts that may be active, and a block
 * whose expert is not active this step returns at once; each block runs matmul.cuh's dense
 * per-block code over its expert's segment of pairs, in tiles), and the weighted combine.
 *
 * Everything a launch needs is on the device (the route's arrays), and the grid depends only
 * on the step's token count, so a recorded step (CUDA graph) replays MoE layers as it does
 * dense ones.
 *
 * A pair's result does not depend on which other pairs share its expert's segment: the
 * per-token arithmetic of the GEMV tiles and of the tensor-core tiles is the same whatever
 * the tile's other rows (and there are no K splits here). It does depend on the path, which
 * the step's token count picks (dp4a GEMV up to ZSE_CUDA_GEMV_MAX tokens, tensor cores above),
 * as for the dense matmul. */
#include "backend/cuda/matmul.cuh"

#include <string.h>

/* ---- layout of a route's arrays ------------------------------------------------------ */

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

extern "C" size_t zse_cuda_moe_bytes(int64_t max_rows, int n_experts, int k)
{
    const size_t pairs = (size_t)max_rows * (size_t)k;
    return 4 * align256(pairs * 4) + 2 * align256(((size_t)n_experts + 1) * 4);
}

extern "C" void zse_cuda_moe_at(void *mem, int64_t max_rows, int n_experts, int k, int renormalize, zse_cuda_moe *out)
{
    const size_t pairs = align256((size_t)max_rows * (size_t)k * 4), experts = align256(((size_t)n_experts + 1) * 4);
    uint8_t *p = (uint8_t *)mem;
    out->n_experts = n_experts;
    out->k = k;
    out->renormalize = renormalize;
    out->pair_expert = (int32_t *)p;
    out->pair_weight = (float *)(p + pairs);
    out->pair_slot = (int32_t *)(p + 2 * pairs);
    out->token_of = (int32_t *)(p + 3 * pairs);
    out->seg = (int32_t *)(p + 4 * pairs);
    out->active = (int32_t *)(p + 4 * pairs + experts);
}

/* ---- routing ------------------------------------------------------------------------- */

enum { ROUTE_THREADS = 1024, ROUTE_COUNTS = 8192 };

/* a candidate of the top-k scan beats another: a number beats NaN, the larger p wins, ties go
 * to the lower expert (the CPU backend's ascending scan keeps the first maximum); e < 0: none */
__device__ __forceinline__ bool route_beats(float pa, int ea, float pb, int eb)
{
    if (ea < 0 || eb < 0)
        return eb < 0 && ea >= 0;
    const bool na = isnan(pa), nb = isnan(pb);
    if (na != nb)
        return nb;
    if (!na && pa != pb)
        return pa > pb;
    return ea < eb;
}

/* One token's routing by one warp: expert e belongs to lane e % 32 (bit e / 32 of the lane's
 * `taken`); p = expf(l - max) / sum, recomputed where needed rather than held (up to 1,024
 * experts); k rounds of a warp arg-max. Lane j < k ends with the token's j-th expert and
 * weight, which it stores. */
__device__ void route_token(const zse_cuda_moe &r, const float *__restrict__ l, int t, int lane, int &my_e)
{
    const int E = r.n_experts, k = r.k;
    /* fmaxf drops NaNs where the CPU's running max keeps only l[0]'s; a NaN logit makes the
     * sum NaN either way, and with it every p: the same routing (the lowest experts) follows */
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32)
        mx = fmaxf(mx, l[e]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int e = lane; e < E; e += 32)
        sum += expf(l[e] - mx);
    sum = warp_sum(sum);
    uint32_t taken = 0;
    float my_p = 0.f;
    my_e = -1;
    for (int j = 0; j < k; j++) {
        float bp = 0.f;
        int be = -1;
        for (int i = 0, e = lane; e < E; i++, e += 32) {
            if (taken >> i & 1u)
                continue;
            const float p = expf(l[e] - mx) / sum;
            if (route_beats(p, e, bp, be)) {
                bp = p;
                be = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float op = __shfl_xor_sync(0xffffffffu, bp, o);
            const int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (route_beats(op, oe, bp, be)) {
                bp = op;
                be = oe;
            }
        }
        if (be >= 0 && (be & 31) == lane)
            taken |= 1u << (be >> 5);
        if (lane == j) {
            my_e = be;
            my_p = bp;
        }
    }
    const float wsum = warp_sum(lane < k ? my_p : 0.f);
    if (lane < k) {
        r.pair_expert[t * k + lane] = my_e;
        r.pair_weight[t * k + lane] = r.renormalize ? my_p / wsum : my_p;
    }
}

/* One block. Warp w routes a contiguous run of tokens (route_token) and counts its pairs per
 * expert in cnt[w][e]; then the counts become each warp's offset inside each expert's
 * segment, one warp lays the segments and the active list out, and each warp places its
 * pairs: token order within an expert, as the CPU backend's routing. Only up to ROUTE_COUNTS
 * counters fit in shared memory, so fewer warps route when there are many experts. */
__global__ void __launch_bounds__(ROUTE_THREADS)
moe_route_kernel(const zse_cuda_moe r, const float *__restrict__ logits, int64_t lpitch, int rows)
{
    pdl_enter();
    __shared__ int cnt[ROUTE_COUNTS];
    __shared__ int total[ZSE_CUDA_MOE_E_MAX], seg_s[ZSE_CUDA_MOE_E_MAX];
    const int E = r.n_experts, k = r.k;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = min(ROUTE_THREADS / 32, ROUTE_COUNTS / E);
    const int per = (rows + warps - 1) / warps;
    for (int i = threadIdx.x; i < warps * E; i += blockDim.x)
        cnt[i] = 0;
    __syncthreads();
    const int t0 = warp * per, t1 = warp < warps ? min(rows, t0 + per) : 0;
    for (int t = t0; t < t1; t++) {
        int e;
        route_token(r, logits + (int64_t)t * lpitch, t, lane, e);
        if (lane < k && e >= 0)
            cnt[warp * E + e]++;    /* a token's experts are distinct: no two lanes share e */
        __syncwarp();
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int run = 0;
        for (int w = 0; w < warps; w++) {
            const int c = cnt[w * E + e];
            cnt[w * E + e] = run;
            run += c;
        }
        total[e] = run;
    }
    __syncthreads();
    if (warp == 0) {
        const int chunk = (E + 31) / 32, e0 = min(E, lane * chunk), e1 = min(E, e0 + chunk);
        int pairs = 0, act = 0;
        for (int e = e0; e < e1; e++) {
            pairs += total[e];
            act += total[e] > 0;
        }
        int pin = pairs, ain = act;     /* inclusive scans over the lanes */
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int pp = __shfl_up_sync(0xffffffffu, pin, o), aa = __shfl_up_sync(0xffffffffu, ain, o);
            if (lane >= o) {
                pin += pp;
                ain += aa;
            }
        }
        int at = pin - pairs, a = ain - act;
        for (int e = e0; e < e1; e++) {
            const int c = total[e];
            seg_s[e] = at;
            r.seg[e] = at;
            if (c > 0)
                r.active[a++] = e;
            at += c;
        }
        if (lane == 31) {
            r.seg[E] = pin;
            r.active[E] = ain;
        }
    }
    __syncthreads();
    for (int t = t0; t < t1; t++) {
        if (lane < k) {
            const int e = r.pair_expert[t * k + lane];
            const int at = seg_s[e] + cnt[warp * E + e]++;
            r.pair_slot[t * k + lane] = at;
            r.token_of[at] = t;
        }
        __syncwarp();
    }
}

extern "C" int zse_cuda_moe_route(const zse_cuda_moe *r, const float *logits, int64_t lpitch, int64_t rows,
                                  zse_cuda_stream st)
{
    if (rows < 1 || r->n_experts < 1 || r->n_experts > ZSE_CUDA_MOE_E_MAX || r->k < 1 || r->k > ZSE_CUDA_MOE_K_MAX ||
        r->k > r->n_experts || rows * r->k > INT32_MAX)
        return zse_cuda_fail("cuda moe route: %lld tokens to %d of %d experts", (long long)rows, r->k, r->n_experts);
    zse_launch(moe_route_kernel, 1, ROUTE_THREADS, 0, (cudaStream_t)st, *r, logits, lpitch, (int)rows);
    ZSE_CUDA_LAUNCHED("cuda moe route");
    return 0;
}

/* ---- the grouped expert matmul --------------------------------------------------------- */

/* the segment of the a-th active expert: false when fewer experts are active this step */
struct moe_seg {
    int e;
    int64_t s0, len;
};

__device__ __forceinline__ bool moe_segment(const zse_cuda_moe &r, int a, moe_seg &sg)
{
    if (a >= r.active[r.n_experts])
        return false;
    sg.e = r.active[a];
    sg.s0 = r.seg[sg.e];
    sg.len = r.seg[sg.e + 1] - sg.s0;
    return sg.len > 0;
}

/* the same, and the expert's weights on the device: an expert kept in host memory that
 * experts_map placed nowhere this step (it runs on the host) has no address, and the
 * rows of its pairs are left to whoever computes them */
__device__ __forceinline__ bool moe_placed_segment(const zse_cuda_moe &r, const zse_cuda_experts &ex, int a,
                                                   moe_seg &sg)
{
    return moe_segment(r, a, sg) && ex.base[sg.e] != nullptr;
}

/* expert e's part as the dense kernels see a weight */
__device__ __forceinline__ zse_cuda_weight moe_weight(const zse_cuda_experts &ex, int e)
{
    zse_cuda_weight w = ex.w;
    const uint8_t *b = ex.base[e];
    w.qs = b + ex.qs_off;
    w.scales = ex.scales_off >= 0 ? b + ex.scales_off : NULL;
    w.mins = ex.mins_off >= 0 ? b + ex.mins_off : NULL;
    return w;
}

struct nf4_table {
    float v[16];
};

/* any scheme, f32 x: gemv_block over the segment's pairs B at a time */
template <int S, int B>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
moe_gemv_kernel(const zse_cuda_moe r, const zse_cuda_moe_parts P, const float *__restrict__ xs, int64_t xpitch,
                const nf4_table nf4)
{
    pdl_enter();
    const zse_cuda_experts &ex = P.ex[blockIdx.z];
    float *const ys = P.ys[blockIdx.z];
    const int64_t ypitch = P.ypitch;
    constexpr int R = gemv_rows<B>::R;
    __shared__ float table[16];
    if (threadIdx.x < 16)
        table[threadIdx.x] = nf4.v[threadIdx.x];
    __syncthreads();
    moe_seg sg;
    if (!moe_placed_segment(r, ex, blockIdx.y, sg))
        return;
    const zse_cuda_weight w = moe_weight(ex, sg.e);
    const int64_t row0 = (int64_t)blockIdx.x * R;
    for (int64_t t0 = 0; t0 < sg.len; t0 += B) {
        const gemv_epi e = {ys + (sg.s0 + t0) * ypitch, ypitch, NULL, 0};
        const int n = (int)min((int64_t)B, sg.len - t0);
        gemv_block<S, B>(w, xs + (sg.s0 + t0) * xpitch, xpitch, n, row0, table, e);
        __syncthreads();    /* store_rows' shared sums are rewritten by the next tile */
    }
}

/* 4-bit weights, x quantized for dp4a (xq, xsc: every pair's row): R rows a block, the
 * segment's pairs B at a time, each tile the dense dp4a GEMV's arithmetic */
template <int S, int B, int R>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
moe_q4_kernel(const zse_cuda_moe r, const zse_cuda_moe_parts P, const uint4 *__restrict__ xq,
              const float4 *__restrict__ xsc, int64_t units)
{
    pdl_enter();
    const zse_cuda_experts &ex = P.ex[blockIdx.z];
    float *const ys = P.ys[blockIdx.z];
    const int64_t ypitch = P.ypitch;
    moe_seg sg;
    if (!moe_placed_segment(r, ex, blockIdx.y, sg))
        return;
    const zse_cuda_weight w = moe_weight(ex, sg.e);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const group_of grp = group_div(w.group_size);
    const int64_t row0 = (int64_t)blockIdx.x * R;
    const uint8_t *rowp[R];
    int64_t rr[R];
#pragma unroll
    for (int i = 0; i < R; i++) {
        rr[i] = min(row0 + i, w.rows - 1);
        rowp[i] = (const uint8_t *)w.qs + rr[i] * w.row_bytes;
    }
    for (int64_t t0 = 0; t0 < sg.len; t0 += B) {
        const int n = (int)min((int64_t)B, sg.len - t0);
        const uint4 *xq_t = xq + (sg.s0 + t0) * units * 4;
        const float4 *xs_t = xsc + (sg.s0 + t0) * units;
        float acc[B][R];
#pragma unroll
        for (int b = 0; b < B; b++)
#pragma unroll
            for (int i = 0; i < R; i++)
                acc[b][i] = 0.f;
        for (int64_t u = warp * 32 + lane; u < units; u += GEMV_WARPS * 32) {
            uint4 v[R];
            float sc[R], mn[R];
            q4_load_unit<S, R>(w, rowp, rr, grp, u, v, sc, mn);
            q4_dot_unit<S, B, R>(acc, v, sc, mn, xq_t, xs_t, units, n, u);
        }
        const gemv_epi e = {ys + (sg.s0 + t0) * ypitch, ypitch, NULL, 0};
        store_rows<B, R, GEMV_WARPS>(acc, w, row0, n, e, false);
        __syncthreads();
    }
}

/* 4-bit weights on tensor cores: MMA_ROWS weight rows a block, the segment's pairs NT at a
 * time through mma_accumulate over all of K (no split: a pair's sum is the dense kernel's) */
template <int S, int NT>
__global__ void __launch_bounds__(MMA_WARPS * 32, NT == 64 ? 3 : 1)
moe_mma_kernel(const zse_cuda_moe r, const zse_cuda_moe_parts P, const __half *__restrict__ xh)
{
    pdl_enter();
    const zse_cuda_experts &ex = P.ex[blockIdx.z];
    float *const ys = P.ys[blockIdx.z];
    const int64_t ypitch = P.ypitch;
    constexpr int NJ = NT / 8;
    extern __shared__ __align__(16) uint8_t moe_mma_smem[];
    moe_seg sg;
    if (!moe_placed_segment(r, ex, blockIdx.y, sg))
        return;
    const zse_cuda_weight w = moe_weight(ex, sg.e);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int64_t row_blk = (int64_t)blockIdx.x * MMA_ROWS;
    const __half *xseg = xh + sg.s0 * w.cols;
    for (int64_t n0 = 0; n0 < sg.len; n0 += NT) {
        float acc[2][NJ][4];
        mma_accumulate<S, NT>(acc, moe_mma_smem, w, xseg, sg.len, n0, 0, w.cols, row_blk);
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int j = 0; j < NJ; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int64_t row = row_blk + warp * MMA_ROWS_W + mt * 16 + g + (i >= 2 ? 8 : 0);
                    const int64_t xr = n0 + j * 8 + 2 * t + (i & 1);
                    if (row < w.rows && xr < sg.len)
                        ys[(sg.s0 + xr) * ypitch + row] = acc[mt][j][i];
                }
        __syncthreads();    /* the next tile's copies reuse the stage ring */
    }
}

static bool moe_uses_dp4a(int scheme) { return scheme == ZSE_SCHEME_Q4 || scheme == ZSE_SCHEME_Q4S; }

/* tensor cores for 4-bit experts when the step has more tokens than a GEMV batch */
static bool moe_on_mma(const zse_cuda_experts *ex, int64_t rows)
{
    return moe_uses_dp4a(ex->w.scheme) && zse_cuda_mma_usable() && rows > ZSE_CUDA_GEMV_MAX && ex->w.cols % 8 == 0;
}

extern "C" size_t zse_cuda_moe_matmul_scratch_bytes(const zse_cuda_experts *ex, int64_t rows, int k)
{
    const size_t pairs = (size_t)rows * (size_t)k, cols = (size_t)ex->w.cols;
    if (moe_on_mma(ex, rows))
        return align256(pairs * cols * sizeof(__half)) + 256;
    if (moe_uses_dp4a(ex->w.scheme))
        return pairs * (size_t)zse_ceil_div(ex->w.cols, 32) * XQ_BYTES + 256;
    return 0;
}

/* the dynamic shared memory of the NT kernel, asked for once per instantiation (over the 48
 * KB a launch gets unasked for NT = 64) */
template <int S, int NT> static int moe_mma_ready(void)
{
    static int ready = 0;
    if (!ready) {
        cudaError_t err = cudaFuncSetAttribute(moe_mma_kernel<S, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               mma_smem<NT>::BYTES);
        if (err != cudaSuccess)
            return zse_cuda_fail("cuda moe mma: %d bytes of shared memory: %s", mma_smem<NT>::BYTES,
                                 cudaGetErrorString(err));
        ready = 1;
    }
    return 0;
}

template <int S, int NT>
static int launch_moe_mma(dim3 grid, const zse_cuda_moe *r, const zse_cuda_moe_parts *P, const __half *xh,
                          cudaStream_t st)
{
    if (moe_mma_ready<S, NT>() != 0)
        return -1;
    zse_launch(moe_mma_kernel<S, NT>, grid, MMA_WARPS * 32, mma_smem<NT>::BYTES, st, *r, *P, xh);
    return 0;
}

template <int S>
static int launch_moe_mma_tile(int64_t rows, dim3 grid, const zse_cuda_moe *r, const zse_cuda_moe_parts *P,
                               const __half *xh, cudaStream_t st)
{
    /* a segment holds at most `rows` pairs (a token takes an expert once) */
    switch (mma_tile(rows < 64 ? rows : 64)) {
    case 8: return launch_moe_mma<S, 8>(grid, r, P, xh, st);
    case 16: return launch_moe_mma<S, 16>(grid, r, P, xh, st);
    case 32: return launch_moe_mma<S, 32>(grid, r, P, xh, st);
    default: return launch_moe_mma<S, 64>(grid, r, P, xh, st);
    }
}

template <int S, int B>
static void launch_moe_q4(unsigned experts, const zse_cuda_moe *r, const zse_cuda_moe_parts *P, const uint4 *xq,
                          const float4 *xsc, int64_t units, cudaStream_t st)
{
    constexpr int R = q4_rows<B>::R;
    const dim3 grid((unsigned)zse_ceil_div(P->ex[0].w.rows, R), experts, (unsigned)P->n);
    zse_launch(moe_q4_kernel<S, B, R>, grid, GEMV_WARPS * 32, 0, st, *r, *P, xq, xsc, units);
}

template <int S>
static void launch_moe_q4_batch(int64_t rows, unsigned experts, const zse_cuda_moe *r, const zse_cuda_moe_parts *P,
                                const uint4 *xq, const float4 *xsc, int64_t units, cudaStream_t st)
{
    if (rows == 1) launch_moe_q4<S, 1>(experts, r, P, xq, xsc, units, st);
    else if (rows == 2) launch_moe_q4<S, 2>(experts, r, P, xq, xsc, units, st);
    else if (rows <= 4) launch_moe_q4<S, 4>(experts, r, P, xq, xsc, units, st);
    else launch_moe_q4<S, 8>(experts, r, P, xq, xsc, units, st);
}

template <int S>
static void launch_moe_gemv(int64_t rows, unsigned experts, const zse_cuda_moe *r, const zse_cuda_moe_parts *P,
                            const float *xs, int64_t xpitch, cudaStream_t st)
{
    nf4_table nf4;
    memcpy(nf4.v, zse_cuda_nf4_host(), sizeof nf4.v);
    if (rows == 1) {
        const dim3 grid((unsigned)zse_ceil_div(P->ex[0].w.rows, gemv_rows<1>::R), experts, (unsigned)P->n);
        zse_launch(moe_gemv_kernel<S, 1>, grid, GEMV_WARPS * 32, 0, st, *r, *P, xs, xpitch, nf4);
    } else if (rows <= 4) {
        const dim3 grid((unsigned)zse_ceil_div(P->ex[0].w.rows, gemv_rows<4>::R), experts, (unsigned)P->n);
        zse_launch(moe_gemv_kernel<S, 4>, grid, GEMV_WARPS * 32, 0, st, *r, *P, xs, xpitch, nf4);
    } else {
        const dim3 grid((unsigned)zse_ceil_div(P->ex[0].w.rows, gemv_rows<8>::R), experts, (unsigned)P->n);
        zse_launch(moe_gemv_kernel<S, 8>, grid, GEMV_WARPS * 32, 0, st, *r, *P, xs, xpitch, nf4);
    }
}

/* the parts of one call share x: the same scheme, width and group, and the same rows (gate
 * and up of one layer) so one grid covers both */
static bool moe_parts_match(const zse_cuda_moe_parts *P)
{
    if (P->n < 1 || P->n > ZSE_CUDA_MOE_PARTS_MAX)
        return false;
    const zse_cuda_weight *a = &P->ex[0].w;
    for (int i = 1; i < P->n; i++) {
        const zse_cuda_weight *b = &P->ex[i].w;
        if (b->scheme != a->scheme || b->rows != a->rows || b->cols != a->cols || b->group_size != a->group_size)
            return false;
    }
    return true;
}

extern "C" int zse_cuda_moe_matmul(const zse_cuda_moe *r, int64_t rows, const zse_cuda_moe_parts *P, const float *xs,
                                   int64_t xpitch, void *scratch, size_t scratch_bytes, zse_cuda_stream stream)
{
    const cudaStream_t st = (cudaStream_t)stream;
    if (!moe_parts_match(P))
        return zse_cuda_fail("cuda moe matmul: %d parts of different shapes or schemes in one call", P->n);
    const zse_cuda_experts *ex = &P->ex[0];
    const zse_cuda_weight *w = &ex->w;
    const int64_t pairs = rows * r->k;
    bool aligned = (xpitch & 3) == 0 && ((uintptr_t)xs & 15) == 0;
    for (int i = 0; i < P->n; i++)
        aligned = aligned && (P->ex[i].qs_off & 15) == 0;
    if (rows < 1 || w->rows < 1 || w->cols < 1 || (w->row_bytes & 15) || !aligned)
        return zse_cuda_fail("cuda moe matmul: %lld tokens over %lld x %lld experts with row bytes %lld (16-byte rows "
                             "and x needed)", (long long)rows, (long long)w->rows, (long long)w->cols,
                             (long long)w->row_bytes);
    const bool grouped_scheme = w->scheme == ZSE_SCHEME_Q4 || w->scheme == ZSE_SCHEME_Q4S || w->scheme == ZSE_SCHEME_NF4;
    if (grouped_scheme && (w->group_size < 32 || w->group_size % 32 != 0))
        return zse_cuda_fail("cuda moe matmul: group size %d is not a multiple of 32", w->group_size);
    if (scratch_bytes < zse_cuda_moe_matmul_scratch_bytes(ex, rows, r->k) || ((uintptr_t)scratch & 255))
        return zse_cuda_fail("cuda moe matmul: scratch of %zu bytes is too small", scratch_bytes);
    /* the experts that can be active: each pair picks one */
    const unsigned experts = (unsigned)(pairs < r->n_experts ? pairs : r->n_experts);
    if (moe_on_mma(ex, rows)) {
        __half *xh = (__half *)scratch;
        zse_cuda_x_to_f16(xs, xpitch, pairs, w->cols, xh, st);
        ZSE_CUDA_LAUNCHED("cuda moe mma: x to f16");
        const dim3 grid((unsigned)zse_ceil_div(w->rows, MMA_ROWS), experts, (unsigned)P->n);
        const int rc = w->scheme == ZSE_SCHEME_Q4 ? launch_moe_mma_tile<ZSE_SCHEME_Q4>(rows, grid, r, P, xh, st)
                                                  : launch_moe_mma_tile<ZSE_SCHEME_Q4S>(rows, grid, r, P, xh, st);
        if (rc != 0)
            return -1;
        ZSE_CUDA_LAUNCHED("cuda moe mma");
        return 0;
    }
    if (moe_uses_dp4a(w->scheme)) {
        const int64_t units = zse_ceil_div(w->cols, 32);
        uint4 *xq = (uint4 *)scratch;
        float4 *xsc = (float4 *)((uint8_t *)scratch + (size_t)pairs * (size_t)units * 64);
        zse_cuda_quantize_x(xs, xpitch, pairs, w->cols, xq, xsc, st);
        ZSE_CUDA_LAUNCHED("cuda moe gemv: x quantized");
        if (w->scheme == ZSE_SCHEME_Q4)
            launch_moe_q4_batch<ZSE_SCHEME_Q4>(rows, experts, r, P, xq, xsc, units, st);
        else
            launch_moe_q4_batch<ZSE_SCHEME_Q4S>(rows, experts, r, P, xq, xsc, units, st);
        ZSE_CUDA_LAUNCHED("cuda moe gemv");
        return 0;
    }
    ZSE_CUDA_SCHEME_SWITCH(w->scheme, launch_moe_gemv<S_>(rows, experts, r, P, xs, xpitch, st));
    ZSE_CUDA_LAUNCHED("cuda moe gemv");
    return 0;
}

/* ---- the combine ----------------------------------------------------------------------- */

/* grid.y = token; its k pairs in ascending expert order (the CPU backend's and transformers'
 * order of adding), then the shared expert, then the residual */
__global__ void moe_combine_kernel(const zse_cuda_moe r, const float *__restrict__ ys, int64_t ypitch,
                                   const float *__restrict__ shared, int64_t spitch, const float *__restrict__ gate,
                                   int64_t gpitch, float *x, int64_t xpitch, int64_t dim)
{
    pdl_enter();
    const int64_t t = blockIdx.y;
    const int k = r.k;
    __shared__ int slot[ZSE_CUDA_MOE_K_MAX];
    __shared__ float wt[ZSE_CUDA_MOE_K_MAX];
    if (threadIdx.x == 0) {
        int order[ZSE_CUDA_MOE_K_MAX];
        for (int i = 0; i < k; i++) {
            int at = i;
            while (at > 0 && r.pair_expert[t * k + order[at - 1]] > r.pair_expert[t * k + i]) {
                order[at] = order[at - 1];
                at--;
            }
            order[at] = i;
        }
        for (int i = 0; i < k; i++) {
            slot[i] = r.pair_slot[t * k + order[i]];
            wt[i] = r.pair_weight[t * k + order[i]];
        }
    }
    __syncthreads();
    const float sig = shared && gate ? 1.f / (1.f + expf(-gate[t * gpitch])) : 1.f;
    for (int64_t d = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; d < dim; d += (int64_t)gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int i = 0; i < k; i++)
            acc += ys[(int64_t)slot[i] * ypitch + d] * wt[i];
        if (shared)
            acc += sig * shared[t * spitch + d];
        x[t * xpitch + d] += acc;
    }
}

extern "C" int zse_cuda_moe_combine(const zse_cuda_moe *r, int64_t rows, const float *ys, int64_t ypitch,
                                    const float *shared, int64_t spitch, const float *gate, int64_t gpitch, float *x,
                                    int64_t xpitch, int64_t dim, zse_cuda_stream st)
{
    if (rows < 1 || rows > 65535 || dim < 1)
        return zse_cuda_fail("cuda moe combine: %lld tokens of %lld (1..65535 tokens)", (long long)rows, (long long)dim);
    const int64_t bx = zse_ceil_div(dim, 256);
    const dim3 grid((unsigned)(bx < 64 ? bx : 64), (unsigned)rows);
    zse_launch(moe_combine_kernel, grid, 256, 0, (cudaStream_t)st, *r, ys, ypitch, shared, spitch, gate, gpitch, x,
               xpitch, dim);
    ZSE_CUDA_LAUNCHED("cuda moe combine");
    return 0;
}
