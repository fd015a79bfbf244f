/* attention_mma.cu — prefill attention on tensor cores, launched by zse_cuda_attention
 * (attention.cu) for the rows of long runs. */
#include "backend/cuda/attention.cuh"

#include <float.h>
#include <limits.h>

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
bool att_mma_ok(const zse_cuda_kv_layer *L, const zse_cuda_attn *a, const float *q, int64_t qp,
                const float *out, int64_t op)
{
    return zse_cuda_mma_usable() && !L->int8 && (a->head_dim == 64 || a->head_dim == 128) && qp % 4 == 0 &&
           op % 2 == 0 && ((uintptr_t)q & 15) == 0 && ((uintptr_t)out & 7) == 0;
}

template <int HD>
int att_launch_mma(const zse_cuda_kv_layer *L, const zse_cuda_attn *a, const float *q, int64_t qp,
                   int64_t n, float *out, int64_t op, cudaStream_t st)
{
    const dim3 grid((unsigned)zse_ceil_div(n, FA_ROWS), (unsigned)a->n_heads);
    zse_launch(attention_mma_kernel<HD>, grid, FA_WARPS * 32, fa_smem<HD>::BYTES, st,
        *L, *a, q, qp, n, out, op);
    ZSE_CUDA_LAUNCHED("cuda attention (tensor cores)");
    return 0;
}

template int att_launch_mma<64>(const zse_cuda_kv_layer *L, const zse_cuda_attn *a, const float *q, int64_t qp,
                                int64_t n, float *out, int64_t op, cudaStream_t st);
template int att_launch_mma<128>(const zse_cuda_kv_layer *L, const zse_cuda_attn *a, const float *q, int64_t qp,
                                 int64_t n, float *out, int64_t op, cudaStream_t st);
