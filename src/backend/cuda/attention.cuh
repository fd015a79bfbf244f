/* attention.cuh — the device-side pieces shared by attention.cu (the warp-per-(token, head)
 * kernels and zse_cuda_attention) and attention_mma.cu (the prefill kernel on tensor cores),
 * and the tensor-core entry points zse_cuda_attention calls. Internal to src/backend/cuda. */
#ifndef ZSE_CUDA_ATTENTION_CUH
#define ZSE_CUDA_ATTENTION_CUH

#include "backend/cuda/common.cuh"

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

/* the cache slot of key position p through the sequence's block-table row, -1 when the
 * engine never stored it */
__device__ __forceinline__ int att_slot(const zse_cuda_kv_layer &L, const zse_cuda_attn &a, const int32_t *bt, int p)
{
    const int bi = p / L.block_size;
    const int blk = bi < a.max_blocks ? bt[bi] : -1;
    const int64_t sl = (int64_t)blk * L.block_size + p % L.block_size;
    return blk >= 0 && sl < L.n_slots ? (int)sl : -1;
}

/* ---- attention_mma.cu ------------------------------------------------------------- */

/* the tensor-core prefill path applies: f16 cache, head_dim 64 or 128, q and out rows of whole
 * 16-byte vectors, an sm_80+ GPU, and ZSE_CUDA_NO_MMA unset */
bool att_mma_ok(const zse_cuda_kv_layer *L, const zse_cuda_attn *a, const float *q, int64_t qp,
                const float *out, int64_t op);

/* launches the tensor-core kernel for head_dim HD (64 and 128 are instantiated) */
template <int HD>
int att_launch_mma(const zse_cuda_kv_layer *L, const zse_cuda_attn *a, const float *q, int64_t qp,
                   int64_t n, float *out, int64_t op, cudaStream_t st);

#endif
