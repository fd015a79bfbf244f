/* LoRA on the GPU: each row's adapter delta, y += scale · B·(A·x), for a step whose rows
 * belong to many adapters and to none (Punica's BGMV: a gather over adapter slots per row).
 *
 * The base matmul stays shared; this runs after it over the same x. A delta is two small
 * products of rank r (≤ 128): shrink u = A·x (r dots of the input's width) and expand
 * y += scale · B·u (each output column a dot of length r). Both read f16 weights 16 bytes
 * at a time and accumulate in f32. One launch at every batch size (lora_kernel), whose
 * blocks do one of two jobs:
 *
 *   shrink: a block per (row, projection, rank index): its 256 threads split the input's
 *     width, two 16-byte loads each in flight, and sum in the block. A dot is short (7 KB of
 *     A at width 3584), so what costs is latency: a warp walking a whole row alone (the first
 *     design, one launch whose blocks also repeated the shrink) waited ~150 dependent loads
 *     for a down projection and cost 4 ms a token on a 7B (docs/BENCHMARKS.md §LoRA).
 *   expand: a block per column range and 8 rows; a thread's 8 columns of all 8 rows at once,
 *     so the rows' loads of one rank index are in flight together (the first expand walked
 *     the rows one after the other) and rows of one adapter read the same bytes from L1.
 *     The expand blocks wait for every shrink block of the launch (a counter in l.sync).
 *     They were a second launch: at one row the two launches' latency was all an adapter
 *     cost (docs/BENCHMARKS.md §LoRA, ~15 µs a call).
 *
 * Which slot a row uses and every slot's table are read from device memory, so a recorded
 * step (CUDA graph) serves any mix of adapters; the grid covers the pool's largest rank
 * (l.max_rank; the backend drops its recordings when a load raises it). A row whose slot is
 * -1 or out of range, or whose adapter leaves the projection alone (rank 0), is not touched. */
#include "backend/cuda/common.cuh"

#define LORA_THREADS 256
#define LORA_WARPS (LORA_THREADS / 32)
#define LORA_VEC 8                                  /* f16 values a thread loads at once */
#define LORA_COLS (LORA_THREADS * LORA_VEC)         /* output columns a block owns */
#define LORA_EXPAND_ROWS 8

struct lora_launch {
    zse_cuda_lora l;
    int col_start[4];                               /* the first column block of each projection */
};

__device__ __forceinline__ const zse_cuda_lora_entry *lora_entry(const zse_cuda_lora &l, int32_t slot, int module)
{
    if (slot < 0 || slot >= l.n_slots)
        return nullptr;
    const zse_cuda_lora_entry *e =
        reinterpret_cast<const zse_cuda_lora_entry *>(l.slots + (uint64_t)slot * l.slot_bytes) +
        (int64_t)l.layer * 7 + module;
    return e->rank > 0 && e->rank <= ZSE_CUDA_LORA_MAX_RANK ? e : nullptr;
}

__device__ __forceinline__ int lora_output_of(const lora_launch &p, int block, int64_t *c0)
{
    int i = 0;
    while (i + 1 < p.l.n_outs && block >= p.col_start[i + 1])
        i++;
    *c0 = (int64_t)(block - p.col_start[i]) * LORA_COLS + (int64_t)threadIdx.x * LORA_VEC;
    return i;
}

/* u[t][i][j] = A[j]·x[t]: one block's share of the shrink, row t and (projection i, rank
 * index j) = ij */
__device__ void lora_shrink_block(const lora_launch &p, const int32_t *adapter_of, const float *x, int64_t xpitch,
                                  float *u, int t, int ij)
{
    __shared__ float part[LORA_WARPS];
    const int i = ij / p.l.max_rank, j = ij % p.l.max_rank;
    const zse_cuda_lora_entry *e = lora_entry(p.l, adapter_of[t], p.l.module[i]);
    if (!e || j >= e->rank)
        return; /* the expand reads u[t][i][0:rank] only */
    const int64_t in = p.l.in[i];
    const __half *a = reinterpret_cast<const __half *>(p.l.slots + (uint64_t)adapter_of[t] * p.l.slot_bytes + e->a) +
                      (int64_t)j * in;
    const float *xt = x + (int64_t)t * xpitch;
    float s = 0.f;
    if (in % LORA_VEC == 0) {
        for (int64_t c = (int64_t)threadIdx.x * LORA_VEC; c < in; c += 2 * LORA_COLS) {
            const bool second = c + LORA_COLS < in;
            const uint4 w0 = *reinterpret_cast<const uint4 *>(a + c);
            const uint4 w1 = second ? *reinterpret_cast<const uint4 *>(a + c + LORA_COLS) : make_uint4(0, 0, 0, 0);
            const __half2 *h0 = reinterpret_cast<const __half2 *>(&w0), *h1 = reinterpret_cast<const __half2 *>(&w1);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 f = __half22float2(h0[k]);
                s = fmaf(f.x, xt[c + 2 * k], s);
                s = fmaf(f.y, xt[c + 2 * k + 1], s);
            }
            if (second) {
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const float2 f = __half22float2(h1[k]);
                    s = fmaf(f.x, xt[c + LORA_COLS + 2 * k], s);
                    s = fmaf(f.y, xt[c + LORA_COLS + 2 * k + 1], s);
                }
            }
        }
    } else {
        for (int64_t c = threadIdx.x; c < in; c += LORA_THREADS)
            s = fmaf(__half2float(a[c]), xt[c], s);
    }
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0)
        part[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < LORA_WARPS ? part[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0)
            u[((int64_t)t * p.l.n_outs + i) * ZSE_CUDA_LORA_MAX_RANK + j] = v;
    }
}

/* y[t] += scale · B·u[t] over a block's 8 columns a thread for rows row_group * ROWS .. +
 * ROWS: the rows' Bᵀ loads of one rank index are independent, so they are in flight together
 * (rows of one adapter load the same bytes, from L1). One row (a lone sequence) has no other
 * rows to overlap with: UNROLL rank indices' loads are in flight instead. */
template <int ROWS, int UNROLL>
__device__ void lora_expand_block(const lora_launch &p, const int32_t *adapter_of, const float *u, int64_t n,
                                  int col_block, int row_group)
{
    __shared__ float us[ROWS][ZSE_CUDA_LORA_MAX_RANK];
    int64_t c0;
    const int i = lora_output_of(p, col_block, &c0);
    const int64_t t0 = (int64_t)row_group * ROWS, out = p.l.out[i];
    const __half *bt[ROWS];
    float scale[ROWS];
    int rank[ROWS], max_r = 0;
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        const zse_cuda_lora_entry *e = t0 + r < n ? lora_entry(p.l, adapter_of[t0 + r], p.l.module[i]) : nullptr;
        rank[r] = e ? e->rank : 0;
        scale[r] = e ? e->scale : 0.f;
        bt[r] = e ? reinterpret_cast<const __half *>(p.l.slots + (uint64_t)adapter_of[t0 + r] * p.l.slot_bytes + e->bt)
                  : nullptr;
        max_r = rank[r] > max_r ? rank[r] : max_r;
        for (int j = threadIdx.x; j < ZSE_CUDA_LORA_MAX_RANK; j += LORA_THREADS)
            us[r][j] = j < rank[r] ? __ldcg(&u[((t0 + r) * p.l.n_outs + i) * ZSE_CUDA_LORA_MAX_RANK + j]) : 0.f;
    }
    __syncthreads();
    if (max_r == 0 || c0 >= out)
        return;
    float acc[ROWS][LORA_VEC] = {};
    if (out % LORA_VEC == 0) { /* rows of Bᵀ 16-byte aligned, no tail */
#pragma unroll UNROLL
        for (int j = 0; j < max_r; j++) {
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                if (j >= rank[r])
                    continue;
                const uint4 w = *reinterpret_cast<const uint4 *>(bt[r] + (int64_t)j * out + c0);
                const __half2 *h = reinterpret_cast<const __half2 *>(&w);
                const float uj = us[r][j];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const float2 f = __half22float2(h[k]);
                    acc[r][2 * k] = fmaf(uj, f.x, acc[r][2 * k]);
                    acc[r][2 * k + 1] = fmaf(uj, f.y, acc[r][2 * k + 1]);
                }
            }
        }
    } else {
        for (int j = 0; j < max_r; j++) {
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                if (j >= rank[r])
                    continue;
                const __half *row = bt[r] + (int64_t)j * out + c0;
#pragma unroll
                for (int k = 0; k < LORA_VEC; k++)
                    if (c0 + k < out)
                        acc[r][k] = fmaf(us[r][j], __half2float(row[k]), acc[r][k]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        if (!rank[r])
            continue;
        float *y = p.l.y[i] + (t0 + r) * p.l.ypitch[i];
#pragma unroll
        for (int k = 0; k < LORA_VEC; k++)
            if (c0 + k < out)
                y[c0 + k] += scale[r] * acc[r][k];
    }
}

/* One launch for the whole delta. A block takes a ticket as it starts: the first
 * `shrink_blocks` tickets do the shrink (row = ticket % n, then projection and rank index),
 * each signalling when its u is stored; the rest do the expand once every shrink block has
 * signalled. Tickets, not block indices, decide the roles, so a block that waits started
 * after every shrink ticket was taken by a block already running: the wait always ends. The
 * last block to finish zeroes the counters for the next launch (which waits for this one to
 * finish before it takes a ticket: pdl_enter). Two launches cost two dependent launches'
 * latency, ~15 µs a call at one row, the whole of a lone sequence's adapter cost. */
template <int ROWS, int UNROLL>
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
        lora_shrink_block(p, adapter_of, x, xpitch, u, (int)(tk % (unsigned)n), (int)(tk / (unsigned)n));
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
        lora_expand_block<ROWS, UNROLL>(p, adapter_of, u, n, (int)(e % col_blocks), (int)(e / col_blocks));
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
    if (l->n_outs < 1 || l->n_outs > 3 || l->layer < 0 || l->layer >= l->n_layers || !l->slots || !l->sync || l->n_slots < 1 ||
        l->slot_bytes % 64 != 0 || max_rank > ZSE_CUDA_LORA_MAX_RANK)
        return zse_cuda_fail("cuda lora_apply: bad arguments (%d projections, layer %d of %d, rank %d)", l->n_outs,
                             l->layer, l->n_layers, max_rank);
    lora_launch p;
    p.l = *l;
    p.l.max_rank = max_rank;
    int blocks = 0;
    for (int i = 0; i < l->n_outs; i++) {
        if (l->module[i] < 0 || l->module[i] > 6 || l->in[i] < 1 || l->out[i] < 1 || l->in[i] > xpitch ||
            l->out[i] > l->ypitch[i])
            return zse_cuda_fail("cuda lora_apply: projection %d (module %d, %lld -> %lld) does not fit x or y", i,
                                 l->module[i], (long long)l->in[i], (long long)l->out[i]);
        p.col_start[i] = blocks;
        blocks += (int)zse_ceil_div(l->out[i], LORA_COLS);
    }
    p.col_start[l->n_outs] = blocks;
    if (!scratch || scratch_bytes < zse_cuda_lora_scratch_bytes(n, l->n_outs))
        return zse_cuda_fail("cuda lora_apply: %zu bytes of scratch for %lld rows (needs %zu)", scratch_bytes,
                             (long long)n, zse_cuda_lora_scratch_bytes(n, l->n_outs));
    if (n > 65535 * LORA_EXPAND_ROWS || n > INT32_MAX)
        return zse_cuda_fail("cuda lora_apply: %lld rows is too many for one step", (long long)n);
    cudaStream_t s = (cudaStream_t)st;
    const uint64_t shrink_blocks = (uint64_t)n * (uint64_t)(l->n_outs * max_rank);
    const unsigned rows1 = n == 1 ? 1 : LORA_EXPAND_ROWS;
    const uint64_t total = shrink_blocks + (uint64_t)blocks * (uint64_t)zse_ceil_div(n, rows1);
    if (total > INT32_MAX)
        return zse_cuda_fail("cuda lora_apply: %lld rows is too many for one step", (long long)n);
    if (n == 1)
        zse_launch(lora_kernel<1, 8>, dim3((unsigned)total), dim3(LORA_THREADS), 0, s, p, adapter_of, x, xpitch, scratch,
                   n, (unsigned)shrink_blocks, (unsigned)blocks, (unsigned)total);
    else
        zse_launch(lora_kernel<LORA_EXPAND_ROWS, 2>, dim3((unsigned)total), dim3(LORA_THREADS), 0, s, p, adapter_of, x,
                   xpitch, scratch, n, (unsigned)shrink_blocks, (unsigned)blocks, (unsigned)total);
    ZSE_CUDA_LAUNCHED("cuda lora");
    return 0;
}
