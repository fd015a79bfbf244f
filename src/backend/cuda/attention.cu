/* attention.cu — attention over the paged KV cache, and zse_cuda_attention, which picks
 * the kernels for a step (attention_mma.cu has the prefill kernel on tensor cores).
 *
 * Attention is one kernel for prefill and decode: a warp owns one (token, head, split) and
 * walks that split's visible cache positions with an online softmax, 32 keys a tile,
 * keeping its share of the head's dimensions (lane + 32 i) in registers (head dims that
 * are not a multiple of 16 take a key-at-a-time variant). When there are too few (token, head)
 * pairs to fill the GPU — decode — the visible range is split (flash-decoding) and a second
 * kernel merges the partial softmax states; otherwise the warp writes the output itself. */
#include "backend/cuda/attention.cuh"

#include <float.h>
#include <limits.h>

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
    const bool mma = n > FA_STEP_MIN && att_mma_ok(L, a, q, qpitch, out, opitch);
    if (mma) {
        const int rc = a->head_dim == 64 ? att_launch_mma<64>(L, a, q, qpitch, n, out, opitch, (cudaStream_t)st)
                                         : att_launch_mma<128>(L, a, q, qpitch, n, out, opitch, (cudaStream_t)st);
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
