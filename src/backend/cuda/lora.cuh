/* lora.cuh — a LoRA delta folded into the launch of the base matmul it follows (matmul.cu's
 * one-row 4-bit GEMV). Internal to src/backend/cuda; lora.cu has the separate launch.
 *
 * At one row of x, lora_apply after the GEMV cost ~14 µs a call whatever its size (the
 * chain x -> u -> y behind the matmul: docs/BENCHMARKS.md §LoRA adapters), 1.6 ms of a 7B's
 * 2.3 ms token. Folded, the delta rides on the GEMV's blocks:
 *
 *   shrink: u = A·x is cut into tasks (a weight of the launch, 4 rank indices, 1,024 input
 *     columns); a block takes tasks from a counter right after pdl_enter until none is left
 *     and writes each task's 4 partial sums (no atomics on the sums: the result does not
 *     depend on which block ran what). The first blocks to start take them all; a task is
 *     ~8 KB of A, a microsecond or two against the GEMV's 6-20 µs.
 *   expand: a block, done with its rows' dot products, waits until every task is done (they
 *     are all taken by blocks already running, so the wait ends whatever order the blocks
 *     start in), adds up u from the partials and puts scale · B[row]·u into its rows' store.
 *
 * The last block out zeroes the counters for the next launch, which takes its first task
 * only after its pdl_enter, i.e. after this launch finished. */
#ifndef ZSE_CUDA_LORA_CUH
#define ZSE_CUDA_LORA_CUH

#include "backend/cuda/common.cuh"

#define LORA_FUSE_CHUNK 1024 /* input columns of a shrink task */
#define LORA_FUSE_J 4        /* rank indices of a shrink task */

/* what a folded launch needs, by value in the kernel's parameters */
struct lora_fuse {
    const uint8_t *slots;
    uint64_t slot_bytes;
    int n_slots, layer;
    const int32_t *adapter_of;      /* device: the row's slot (-1: none) */
    const float *x;                 /* the row of x, f32, 16-byte aligned */
    int64_t in;                     /* x's width, a multiple of 8 */
    int module[ZSE_CUDA_MULTI_MAX]; /* the launch's weight i adapts this projection (-1: none) */
    int chunks, groups;             /* LORA_FUSE_CHUNK column ranges; LORA_FUSE_J rank groups */
    unsigned tasks;                 /* weights x groups x chunks */
    float *part;                    /* [weight][ZSE_CUDA_LORA_MAX_RANK][chunks] partial sums */
    unsigned *sync;                 /* [0] tasks taken, [1] tasks done, [2] blocks finished */
};

/* The expand's latency is what a GEMV block adds to its life (a bs1 GEMV block lives a few
 * microseconds, and the SM's bytes in flight drop while it waits), so its chain is short: the
 * row's slot is read before pdl_enter (no kernel of the step writes it), the entry once the
 * dot products start, and the block's B values are loaded while it waits for the shrink. */
#define LORA_FUSE_PRE 4 /* B values a thread loads ahead (rank <= 4 x the thread groups) */

/* the table entry of (layer, module) in slot `slot` of a pool of n_slots, or NULL when the
 * slot is out of range (-1: the row has no adapter) */
__device__ __forceinline__ const zse_cuda_lora_entry *lora_slot_entry(const uint8_t *slots, uint64_t slot_bytes,
                                                                      int n_slots, int layer, int32_t slot, int module)
{
    if (slot < 0 || slot >= n_slots)
        return nullptr;
    return reinterpret_cast<const zse_cuda_lora_entry *>(slots + (uint64_t)slot * slot_bytes) + (int64_t)layer * 7 +
           module;
}

/* e when it adapts its projection (a rank in 1..ZSE_CUDA_LORA_MAX_RANK), else NULL */
__device__ __forceinline__ const zse_cuda_lora_entry *lora_adapting(const zse_cuda_lora_entry *e)
{
    return e && e->rank > 0 && e->rank <= ZSE_CUDA_LORA_MAX_RANK ? e : nullptr;
}

/* the 8 x values at c of row xt, as two 16-byte loads where aligned (vec) */
__device__ __forceinline__ void lora_load_x(const float *xt, int64_t c, bool vec, float (&v)[8])
{
    if (vec) {
        const float4 a = *reinterpret_cast<const float4 *>(xt + c), b = *reinterpret_cast<const float4 *>(xt + c + 4);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++)
            v[k] = xt[c + k];
    }
}

/* the entry of weight wi for the row's slot (read ahead), or NULL */
__device__ __forceinline__ const zse_cuda_lora_entry *lora_fuse_entry_of(const lora_fuse &f, int32_t slot, int wi)
{
    if (wi >= ZSE_CUDA_MULTI_MAX || f.module[wi] < 0)
        return nullptr;
    return lora_slot_entry(f.slots, f.slot_bytes, f.n_slots, f.layer, slot, f.module[wi]);
}

/* the adapter's entry for weight wi of the launch, or NULL when nothing adapts it */
__device__ __forceinline__ const zse_cuda_lora_entry *lora_fuse_entry(const lora_fuse &f, int wi)
{
    return lora_adapting(lora_fuse_entry_of(f, *f.adapter_of, wi));
}

/* One pass of a shrink: s[q] += A[q][col .. col + 8]·xv for the first nj of J rows of A
 * (f16, rows `in` apart, 16-byte aligned at col): J independent 16-byte loads in flight, x's
 * 8 values held in registers for all J rows. lora.cu's shrink blocks and the folded shrink's
 * tasks both run on it. */
template <int J>
__device__ __forceinline__ void lora_shrink_pass(const __half *a, int64_t in, int64_t col, int nj,
                                                 const float (&xv)[8], float (&s)[J])
{
    uint4 w[J];
#pragma unroll
    for (int q = 0; q < J; q++)
        w[q] = q < nj ? *reinterpret_cast<const uint4 *>(a + (int64_t)q * in + col) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int q = 0; q < J; q++) {
        const __half2 *h = reinterpret_cast<const __half2 *>(&w[q]);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float2 v = __half22float2(h[k]);
            s[q] = fmaf(v.x, xv[2 * k], s[q]);
            s[q] = fmaf(v.y, xv[2 * k + 1], s[q]);
        }
    }
}

/* one shrink task: part[wi][j0 + q][c] = A[j0 + q][cols of chunk c]·x[same] for q < 4 */
template <int NT>
__device__ void lora_fuse_task(const lora_fuse &f, unsigned task)
{
    __shared__ float red[NT / 32][LORA_FUSE_J];
    const int per_weight = f.groups * f.chunks;
    const int wi = (int)(task / (unsigned)per_weight), rest = (int)(task % (unsigned)per_weight);
    const int j0 = rest / f.chunks * LORA_FUSE_J, c = rest % f.chunks;
    const zse_cuda_lora_entry *e = lora_fuse_entry(f, wi);
    if (!e || j0 >= e->rank)
        return; /* the expand reads ranks below e->rank only */
    const int nj = min(e->rank - j0, LORA_FUSE_J);
    const __half *a = reinterpret_cast<const __half *>(f.slots + (uint64_t)*f.adapter_of * f.slot_bytes + e->a) +
                      (int64_t)j0 * f.in;
    const int64_t c0 = (int64_t)c * LORA_FUSE_CHUNK, c1 = min(f.in, c0 + LORA_FUSE_CHUNK);
    float s[LORA_FUSE_J] = {};
    for (int64_t col = c0 + (int64_t)threadIdx.x * 8; col < c1; col += NT * 8) {
        float xv[8];
        lora_load_x(f.x, col, true, xv); /* f.x is 16-byte aligned, col a multiple of 8 */
        lora_shrink_pass<LORA_FUSE_J>(a, f.in, col, nj, xv, s);
    }
#pragma unroll
    for (int q = 0; q < LORA_FUSE_J; q++) {
        const float v = warp_sum(s[q]);
        if (threadIdx.x % 32 == 0)
            red[threadIdx.x / 32][q] = v;
    }
    __syncthreads();
    if (threadIdx.x < nj) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < NT / 32; w++)
            v += red[w][threadIdx.x];
        f.part[((int64_t)wi * ZSE_CUDA_LORA_MAX_RANK + j0 + threadIdx.x) * f.chunks + c] = v;
        __threadfence(); /* the sum is in memory before the block says the task is done */
    }
}

/* shrink tasks from the launch's counter until none is left */
template <int NT>
__device__ void lora_fuse_shrink(const lora_fuse &f)
{
    __shared__ unsigned taken;
    for (;;) {
        if (threadIdx.x == 0) {
            /* a plain read first: once the tasks are gone, most blocks never touch the atomic */
            unsigned t = f.tasks;
            if (*reinterpret_cast<volatile const unsigned *>(&f.sync[0]) < f.tasks)
                t = atomicAdd(&f.sync[0], 1u);
            taken = t;
        }
        __syncthreads();
        const unsigned task = taken;
        if (task >= f.tasks)
            return;
        lora_fuse_task<NT>(f, task);
        __syncthreads(); /* the task's sums are stored (and fenced); `taken` may be reused */
        if (threadIdx.x == 0)
            atomicAdd(&f.sync[1], 1u);
    }
}

/* delta[r] = scale · B[row0 + r]·u for the block's R rows of weight wi (0 when nothing adapts
 * it), once every shrink task is done; threads below R hold their row's delta on return.
 * e: lora_fuse_entry_of's, its fields rank/scale/bt read by the caller early. */
template <int NT, int R>
__device__ float lora_fuse_delta(const lora_fuse &f, int32_t slot, int wi, int rank, float scale, int64_t bt_off,
                                 int64_t row0, int64_t out)
{
    static_assert(NT % R == 0, "a block's threads split into groups of R rows");
    constexpr int G = NT / R;
    __shared__ float us[ZSE_CUDA_LORA_MAX_RANK];
    __shared__ float red[G][R];
    if (rank <= 0 || rank > ZSE_CUDA_LORA_MAX_RANK)
        return 0.f; /* the same answer for every thread of the block: no barrier is skipped */
    const int r = threadIdx.x % R, g = threadIdx.x / R;
    const int64_t row = row0 + r;
    const __half *bt = reinterpret_cast<const __half *>(f.slots + (uint64_t)slot * f.slot_bytes + bt_off);
    float b[LORA_FUSE_PRE];
#pragma unroll
    for (int k = 0; k < LORA_FUSE_PRE; k++) /* in flight while the shrink is waited for */
        b[k] = row < out && g + k * G < rank ? __half2float(bt[(int64_t)(g + k * G) * out + row]) : 0.f;
    if (threadIdx.x == 0) {
        while (*reinterpret_cast<volatile const unsigned *>(&f.sync[1]) < f.tasks)
            __nanosleep(64);
        __threadfence();
    }
    __syncthreads();
    for (int j = threadIdx.x; j < rank; j += NT) {
        const float *p = f.part + ((int64_t)wi * ZSE_CUDA_LORA_MAX_RANK + j) * f.chunks;
        float v = 0.f;
#pragma unroll 8 /* the loads of 8 chunks in flight at once (a down projection has 19) */
        for (int c = 0; c < f.chunks; c++)
            v += __ldcg(p + c); /* written by other blocks of this launch: through L2 */
        us[j] = v;
    }
    __syncthreads();
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < LORA_FUSE_PRE; k++)
        if (g + k * G < rank)
            acc = fmaf(us[g + k * G], b[k], acc);
    if (row < out)
        for (int j = g + LORA_FUSE_PRE * G; j < rank; j += G)
            acc = fmaf(us[j], __half2float(bt[(int64_t)j * out + row]), acc);
    red[g][r] = acc;
    __syncthreads();
    float d = 0.f;
    if (threadIdx.x < R) {
#pragma unroll
        for (int k = 0; k < G; k++)
            d += red[k][threadIdx.x];
        d *= scale;
    }
    return d;
}

/* the last block of the launch out zeroes the counters */
__device__ __forceinline__ void lora_fuse_finish(const lora_fuse &f)
{
    if (threadIdx.x == 0 && atomicAdd(&f.sync[2], 1u) == gridDim.x - 1) {
        f.sync[0] = 0;
        f.sync[1] = 0;
        f.sync[2] = 0;
    }
}

#endif
