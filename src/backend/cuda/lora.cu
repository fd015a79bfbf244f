/* LoRA on the GPU: each row's adapter delta, y += scale · B·(A·x), for a step whose rows
 * belong to many adapters and to none (Punica's BGMV: a gather over adapter slots per row).
 *
 * The base matmul stays shared; this runs after it over the same x. A delta is two small
 * products of rank r (≤ 128): shrink u = A·x (r dots of the input's width) and expand
 * y += scale · B·u (each output column a dot of length r). Both read f16 weights 16 bytes
 * at a time and accumulate in f32. One launch at every batch size (lora_kernel), whose
 * blocks do one of two jobs:
 *
 *   shrink: a block per (row, projection, 4 rank indices): its 256 threads split the
 *     input's width, each holding its 8 x values of a pass in registers against the 4 rows
 *     of A (x is read once for 4 rank indices; 6 independent 16-byte loads in flight a
 *     pass), and sum in the block. A dot is short (7 KB of A at width 3584), so what costs
 *     is latency: a warp walking a whole row alone (the first design) waited ~150 dependent
 *     loads for a down projection and cost 4 ms a token on a 7B (docs/BENCHMARKS.md §LoRA).
 *   expand: a warp per (row, 256 output columns), R rows a block (1, 2, 4 or 8 by the
 *     batch) and the block's other warps on the next column ranges: a batch spreads over
 *     many blocks (an expand block of 2048 columns x 8 rows left a 7B's q/k/v 4 blocks at
 *     8 rows, and a call cost ~31 µs whatever its size). The expand blocks wait for every
 *     shrink block of the launch (a counter in l.sync).
 *
 * At one row a call still costs ~14 µs whatever its size: the chain x -> u -> y after the
 * base matmul. What would remove it is the shrink inside the base GEMV's launch (it reads
 * the same x) and the expand in its store (docs/CUDA.md §LoRA).
 *
 * Which slot a row uses and every slot's table are read from device memory, so a recorded
 * step (CUDA graph) serves any mix of adapters; the grid covers the pool's largest rank
 * (l.max_rank; the backend drops its recordings when a load raises it). A row whose slot is
 * -1 or out of range, or whose adapter leaves the projection alone (rank 0), is not touched. */
#include "backend/cuda/lora.cuh"

#define LORA_THREADS 256
#define LORA_WARPS (LORA_THREADS / 32)
#define LORA_VEC 8                                  /* f16 values a thread loads at once */
#define LORA_STRIDE (LORA_THREADS * LORA_VEC)       /* input columns a shrink block covers a pass */
#define LORA_WARP_COLS (32 * LORA_VEC)              /* output columns an expand warp owns */
#define LORA_SHRINK_J 4                             /* rank indices a shrink block computes */
static_assert(LORA_SHRINK_J * LORA_WARPS == 32, "the shrink's last sum takes a lane per (rank index, warp)");

struct lora_launch {
    zse_cuda_lora l;
    int col_start[4];                               /* the first column block of each projection */
    int warp_cols;                                  /* output columns an expand block covers */
    bool x_vec;                                     /* x rows 16-byte aligned: float4 loads */
};

__device__ __forceinline__ const zse_cuda_lora_entry *lora_entry(const zse_cuda_lora &l, int32_t slot, int module)
{
    return lora_adapting(lora_slot_entry(l.slots, l.slot_bytes, l.n_slots, l.layer, slot, module));
}

/* u[t][i][j0 + q] = A[j0 + q]·x[t] for q < LORA_SHRINK_J: one block's share of the shrink.
 * A thread holds its 8 x values of a pass in registers and dots them with the block's
 * LORA_SHRINK_J rows of A, so x is read once for those rank indices and a thread has
 * LORA_SHRINK_J + 2 independent 16-byte loads in flight a pass. */
__device__ void lora_shrink_block(const lora_launch &p, const int32_t *adapter_of, const float *x, int64_t xpitch,
                                  float *u, int t, int i, int j0)
{
    __shared__ float part[LORA_WARPS][LORA_SHRINK_J];
    const zse_cuda_lora_entry *e = lora_entry(p.l, adapter_of[t], p.l.module[i]);
    if (!e || j0 >= e->rank)
        return; /* the expand reads u[t][i][0:rank] only */
    const int nj = e->rank - j0 < LORA_SHRINK_J ? e->rank - j0 : LORA_SHRINK_J;
    const int64_t in = p.l.in[i];
    const __half *a = reinterpret_cast<const __half *>(p.l.slots + (uint64_t)adapter_of[t] * p.l.slot_bytes + e->a) +
                      (int64_t)j0 * in;
    const float *xt = x + (int64_t)t * xpitch;
    float s[LORA_SHRINK_J] = {};
    if (in % LORA_VEC == 0) {
        for (int64_t c = (int64_t)threadIdx.x * LORA_VEC; c < in; c += LORA_STRIDE) {
            float xv[LORA_VEC];
            lora_load_x(xt, c, p.x_vec, xv);
            lora_shrink_pass<LORA_SHRINK_J>(a, in, c, nj, xv, s);
        }
    } else {
        for (int64_t c = threadIdx.x; c < in; c += LORA_THREADS) {
            const float xc = xt[c];
#pragma unroll
            for (int q = 0; q < LORA_SHRINK_J; q++)
                if (q < nj)
                    s[q] = fmaf(__half2float(a[(int64_t)q * in + c]), xc, s[q]);
        }
    }
#pragma unroll
    for (int q = 0; q < LORA_SHRINK_J; q++) {
        const float v = warp_sum(s[q]);
        if (threadIdx.x % 32 == 0)
            part[threadIdx.x / 32][q] = v;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        const int q = threadIdx.x / LORA_WARPS, w = threadIdx.x % LORA_WARPS; /* 32 lanes = 4 x 8 */
        float v = part[w][q];
#pragma unroll
        for (int o = LORA_WARPS / 2; o > 0; o /= 2)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (w == 0 && q < nj)
            u[((int64_t)t * p.l.n_outs + i) * ZSE_CUDA_LORA_MAX_RANK + j0 + q] = v;
    }
}

/* y[t] += scale · B·u[t]: a warp per (row, 256 output columns), R rows a block and the
 * block's other warps on the next column ranges, so a batch's expand spreads over many
 * blocks (the first expand gave a block 2048 columns x 8 rows: 4 blocks for a 7B's q/k/v).
 * A lane's 8 columns take one 16-byte load of Bᵀ per rank index, all independent, so a
 * warp has up to 8 rank indices' loads in flight; rows of one adapter in a block read the
 * same Bᵀ bytes, from L1. */
template <int R>
__device__ void lora_expand_block(const lora_launch &p, const int32_t *adapter_of, const float *u, int64_t n,
                                  int col_block, int row_group)
{
    __shared__ float us[R][ZSE_CUDA_LORA_MAX_RANK];
    int i = 0;
    while (i + 1 < p.l.n_outs && col_block >= p.col_start[i + 1])
        i++;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = warp % R;
    const int64_t t = (int64_t)row_group * R + r, out = p.l.out[i];
    const int64_t c0 = (int64_t)(col_block - p.col_start[i]) * p.warp_cols + (int64_t)(warp / R) * LORA_WARP_COLS +
                       (int64_t)lane * LORA_VEC;
    const zse_cuda_lora_entry *e = t < n ? lora_entry(p.l, adapter_of[t], p.l.module[i]) : nullptr;
    const int rank = e ? e->rank : 0;
    /* the R rows' u into shared memory, by the block's first R warps (through L2: other
     * blocks of this launch wrote it) */
    if (warp < R)
        for (int j = lane; j < rank; j += 32)
            us[r][j] = __ldcg(&u[(t * p.l.n_outs + i) * ZSE_CUDA_LORA_MAX_RANK + j]);
    __syncthreads();
    if (!rank || c0 >= out)
        return;
    const __half *bt = reinterpret_cast<const __half *>(p.l.slots + (uint64_t)adapter_of[t] * p.l.slot_bytes + e->bt);
    float acc[LORA_VEC] = {};
    if (out % LORA_VEC == 0) { /* rows of Bᵀ 16-byte aligned, no tail */
#pragma unroll 8
        for (int j = 0; j < rank; j++) {
            const uint4 w = *reinterpret_cast<const uint4 *>(bt + (int64_t)j * out + c0);
            const __half2 *h = reinterpret_cast<const __half2 *>(&w);
            const float uj = us[r][j];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 f = __half22float2(h[k]);
                acc[2 * k] = fmaf(uj, f.x, acc[2 * k]);
                acc[2 * k + 1] = fmaf(uj, f.y, acc[2 * k + 1]);
            }
        }
    } else {
        for (int j = 0; j < rank; j++) {
            const __half *row = bt + (int64_t)j * out + c0;
#pragma unroll
            for (int k = 0; k < LORA_VEC; k++)
                if (c0 + k < out)
                    acc[k] = fmaf(us[r][j], __half2float(row[k]), acc[k]);
        }
    }
    float *y = p.l.y[i] + t * p.l.ypitch[i];
    const float scale = e->scale;
#pragma unroll
    for (int k = 0; k < LORA_VEC; k++)
        if (c0 + k < out)
            y[c0 + k] += scale * acc[k];
}

/* One launch for the whole delta. A block takes a ticket as it starts: the first
 * `shrink_blocks` tickets do the shrink (row = ticket % n, then projection and the rank
 * indices' group), each signalling when its u is stored; the rest do the expand once every
 * shrink block has signalled. Tickets, not block indices, decide the roles, so a block that
 * waits started after every shrink ticket was taken by a block already running: the wait
 * always ends. The last block to finish zeroes the counters for the next launch (which
 * waits for this one to finish before it takes a ticket: pdl_enter). Two launches (shrink,
 * then expand) measured the same at every batch size (docs/BENCHMARKS.md §LoRA adapters):
 * one is kept as the simpler schedule for a recorded step. */
template <int R>
__global__ void __launch_bounds__(LORA_THREADS)
lora_kernel(const lora_launch p, const int32_t *adapter_of, const float *x, int64_t xpitch, float *u, int64_t n,
            unsigned shrink_blocks, unsigned col_blocks, unsigned total)
{
    pdl_enter();
    __shared__ unsigned ticket;
    unsigned *const sync = p.l.sync; /* [0] tickets taken, [1] shrink blocks done, [2] blocks done */
    if (threadIdx.x == 0)
        ticket = atomicAdd(&sync[0], 1u);
    __syncthreads();
    const unsigned tk = ticket;
    if (tk < shrink_blocks) {
        const unsigned groups = (unsigned)((p.l.max_rank + LORA_SHRINK_J - 1) / LORA_SHRINK_J), ij = tk / (unsigned)n;
        lora_shrink_block(p, adapter_of, x, xpitch, u, (int)(tk % (unsigned)n), (int)(ij / groups),
                          (int)(ij % groups) * LORA_SHRINK_J);
        if (threadIdx.x == 0) { /* the thread that stored this block's u */
            __threadfence();
            atomicAdd(&sync[1], 1u);
        }
    } else {
        if (threadIdx.x == 0) {
            while (atomicAdd(&sync[1], 0u) < shrink_blocks)
                __nanosleep(32);
            __threadfence();
        }
        __syncthreads();
        const unsigned e = tk - shrink_blocks;
        lora_expand_block<R>(p, adapter_of, u, n, (int)(e % col_blocks), (int)(e / col_blocks));
    }
    if (threadIdx.x == 0 && atomicAdd(&sync[2], 1u) == total - 1) {
        sync[0] = 0;
        sync[1] = 0;
        sync[2] = 0;
    }
}

extern "C" size_t zse_cuda_lora_scratch_bytes(int64_t n, int n_outs)
{
    return (size_t)n * (size_t)n_outs * ZSE_CUDA_LORA_MAX_RANK * sizeof(float);
}

extern "C" int zse_cuda_lora_apply(const zse_cuda_lora *l, const int32_t *adapter_of, const float *x, int64_t xpitch,
                                   int64_t n, float *scratch, size_t scratch_bytes, zse_cuda_stream st)
{
    if (n < 1)
        return 0;
    const int max_rank = l->max_rank > 0 ? l->max_rank : ZSE_CUDA_LORA_MAX_RANK;
    if (l->n_outs < 1 || l->n_outs > 3 || l->layer < 0 || l->layer >= l->n_layers || !l->slots || !l->sync ||
        l->n_slots < 1 || l->slot_bytes % 64 != 0 || max_rank > ZSE_CUDA_LORA_MAX_RANK)
        return zse_cuda_fail("cuda lora_apply: bad arguments (%d projections, layer %d of %d, rank %d)", l->n_outs,
                             l->layer, l->n_layers, max_rank);
    lora_launch p;
    p.l = *l;
    p.l.max_rank = max_rank;
    /* R rows a block: a lone row's block spans 2048 columns, 8 rows' one warp's 256 */
    const int R = n >= 8 ? 8 : n >= 4 ? 4 : n >= 2 ? 2 : 1;
    p.warp_cols = LORA_WARP_COLS * (LORA_WARPS / R);
    p.x_vec = (uintptr_t)x % 16 == 0 && xpitch % 4 == 0;
    int blocks = 0;
    for (int i = 0; i < l->n_outs; i++) {
        if (l->module[i] < 0 || l->module[i] > 6 || l->in[i] < 1 || l->out[i] < 1 || l->in[i] > xpitch ||
            l->out[i] > l->ypitch[i])
            return zse_cuda_fail("cuda lora_apply: projection %d (module %d, %lld -> %lld) does not fit x or y", i,
                                 l->module[i], (long long)l->in[i], (long long)l->out[i]);
        p.col_start[i] = blocks;
        blocks += (int)zse_ceil_div(l->out[i], p.warp_cols);
    }
    p.col_start[l->n_outs] = blocks;
    if (!scratch || scratch_bytes < zse_cuda_lora_scratch_bytes(n, l->n_outs))
        return zse_cuda_fail("cuda lora_apply: %zu bytes of scratch for %lld rows (needs %zu)", scratch_bytes,
                             (long long)n, zse_cuda_lora_scratch_bytes(n, l->n_outs));
    if (n > INT32_MAX / 8)
        return zse_cuda_fail("cuda lora_apply: %lld rows is too many for one step", (long long)n);
    cudaStream_t s = (cudaStream_t)st;
    const uint64_t shrink_blocks =
        (uint64_t)n * (uint64_t)l->n_outs * (uint64_t)((max_rank + LORA_SHRINK_J - 1) / LORA_SHRINK_J);
    const uint64_t total = shrink_blocks + (uint64_t)blocks * (uint64_t)zse_ceil_div(n, R);
    if (total > INT32_MAX)
        return zse_cuda_fail("cuda lora_apply: %lld rows is too many for one step", (long long)n);
    void (*kernel)(const lora_launch, const int32_t *, const float *, int64_t, float *, int64_t, unsigned, unsigned,
                   unsigned) = R == 8 ? lora_kernel<8> : R == 4 ? lora_kernel<4> : R == 2 ? lora_kernel<2> : lora_kernel<1>;
    zse_launch(kernel, dim3((unsigned)total), dim3(LORA_THREADS), 0, s, p, adapter_of, x, xpitch, scratch, n,
               (unsigned)shrink_blocks, (unsigned)blocks, (unsigned)total);
    ZSE_CUDA_LAUNCHED("cuda lora");
    return 0;
}
