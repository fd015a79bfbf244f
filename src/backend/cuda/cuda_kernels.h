/* cuda_kernels — the C surface of the CUDA kernels (the .cu files of src/backend/cuda), below the
 * backend ops. backend*.cu build zse_backend_ops on top of these; tests/gpu/kernels_test.cu
 * calls them directly against a CPU reference. Everything here takes device pointers and
 * runs on the given stream; launchers return 0, or -1 with zse_cuda_last_error() set.
 *
 * Not named cuda.h: that name belongs to the CUDA driver API header. */
#ifndef ZSE_CUDA_KERNELS_H
#define ZSE_CUDA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *zse_cuda_stream;    /* cudaStream_t */

/* The message of the last failing launcher on this thread ("" when none). */
const char *zse_cuda_last_error(void);

/* The architecture this build's kernels were compiled for, as the current device runs them
 * (75, 80, 86, 89, 90: the PTX __CUDA_ARCH__, which may be below the device's compute
 * capability when the driver JIT-compiles older PTX), or -1 with an error that says how to
 * rebuild when the build carries no code the device can run. The tensor-core paths need 80,
 * overlapping launches 90; below that the portable kernels run. */
int zse_cuda_code_arch(void);

/* A packed weight in device memory, in the .zse layout (src/quant/quant.h):
 *   plain (F32/F16/BF16): qs = rows of elements, row_bytes apart;
 *   Q8_ROW:  qs = int8 rows, row_bytes apart; scales = f32 [rows];
 *   Q4_G:    qs = 16-byte chunks of 32 nibbles (byte j: element j low, j+16 high), row_bytes
 *            apart; scales (and for Q4 mins) = f16 [rows][groups].
 * The kernels load 16 bytes at a time: qs and row_bytes must be multiples of 16 and a row's
 * bytes past its last element must be zero (the 4-bit and int8 layouts pad rows with zeros;
 * the loader re-pitches plain rows that are not). */
typedef struct {
    int scheme;                 /* zse_scheme */
    int64_t rows, cols;
    int group_size;             /* 4-bit schemes */
    const void *qs;
    const void *scales;
    const void *mins;
    int64_t row_bytes;
    int64_t groups;             /* scale entries per row (4-bit schemes) */
} zse_cuda_weight;

/* Activations: f32 [rows][pitch] with pitch a multiple of 4 floats, 16-byte aligned. */

/* y[t][0:w.rows] = W · x[t][0:w.cols] for t < n (any n). Batches of at most
 * ZSE_CUDA_GEMV_MAX use the in-register-dequant GEMV; larger ones dequantize W to f16 in
 * slabs of `scratch` (scratch_bytes) and multiply with cuBLAS (cublas: a cublasHandle_t
 * bound to the stream). */
#define ZSE_CUDA_GEMV_MAX 8
/* int4/int4s batches of ZSE_CUDA_MMA_MIN..ZSE_CUDA_MMA_MAX rows run on tensor cores with
 * the weights dequantized in registers (sm_80 on; ZSE_CUDA_NO_MMA=1 turns it off): from 5
 * rows on they beat the dp4a GEMV (H200, 18944x3584 at 8 rows: 38.5 against 51.5 us, both
 * measured before the scale-group fix; at 4 rows the GEMV still wins on 3584x18944) */
#define ZSE_CUDA_MMA_MIN 5
#define ZSE_CUDA_MMA_MAX 64
#define ZSE_CUDA_GEMM_SLAB ((size_t)32 << 20)   /* f16 slab of dequantized weight rows */
/* scratch that zse_cuda_matmul needs for this weight and batch (0: none) */
size_t zse_cuda_matmul_scratch_bytes(const zse_cuda_weight *w, int64_t n);
int zse_cuda_matmul(const zse_cuda_weight *w, const float *x, int64_t xpitch, int64_t n,
                    float *y, int64_t ypitch, void *cublas, void *scratch,
                    size_t scratch_bytes, zse_cuda_stream st);
/* The two paths on their own (tests and benches pick one). gemv: n <= ZSE_CUDA_GEMV_MAX. */
int zse_cuda_matmul_gemv(const zse_cuda_weight *w, const float *x, int64_t xpitch, int64_t n,
                         float *y, int64_t ypitch, void *scratch, size_t scratch_bytes,
                         zse_cuda_stream st);
int zse_cuda_matmul_gemm(const zse_cuda_weight *w, const float *x, int64_t xpitch, int64_t n,
                         float *y, int64_t ypitch, void *cublas, void *scratch,
                         size_t scratch_bytes, zse_cuda_stream st);
/* Several weights over the same x (q, k and v; gate and up) with the epilogues a layer
 * needs: y_i[t] = W_i · x[t] (+ bias_i) (+ y_i[t] when accumulating, the residual add).
 * The weights share x's width; 4-bit weights of one scheme share one conversion of x and
 * one launch, at GEMV batches (n <= ZSE_CUDA_GEMV_MAX) and on tensor cores (MMA_MIN..MAX). */
#define ZSE_CUDA_MULTI_MAX 3
typedef struct {
    int count;
    zse_cuda_weight w[ZSE_CUDA_MULTI_MAX];
    float *y[ZSE_CUDA_MULTI_MAX];
    int64_t ypitch[ZSE_CUDA_MULTI_MAX];
    const float *bias[ZSE_CUDA_MULTI_MAX];  /* NULL: none */
    int accumulate;
    int x_ready;    /* a ZSE_CUDA_XPREP_ kind: the scratch already holds x so (zse_cuda_xprep_at) */
} zse_cuda_multi;
/* x as the 4-bit matmul reads it, written by the kernel that produces x (RMSNorm, SiLU·mul:
 * zse_cuda_*_prep) instead of by a launch of the matmul's own: quantized for the dp4a GEMV
 * (x ~ d*h + dl*l per 32 values; 1-4 rows, 1-8 without tensor cores) or in f16 for the
 * tensor-core kernel (5-64 rows). xprep_kind says which a call of n rows of 4-bit weights
 * takes (NONE past 64 rows: the GEMM path converts x itself); xprep_bytes the matmul scratch
 * that needs and xprep_at where in it x lies. */
enum { ZSE_CUDA_XPREP_NONE = 0, ZSE_CUDA_XPREP_Q8 = 1, ZSE_CUDA_XPREP_F16 = 2 };
typedef struct {
    int kind;
    void *x;        /* Q8: 64 bytes of codes per 32 values; F16: the rows, cols apart */
    void *scales;   /* Q8: a float4 (d, dl, sum, 0) per 32 values */
} zse_cuda_xprep;
int zse_cuda_xprep_kind(int64_t n);
size_t zse_cuda_xprep_bytes(int64_t n, int64_t cols, int kind);
void zse_cuda_xprep_at(void *scratch, int64_t n, int64_t cols, int kind, zse_cuda_xprep *out);
size_t zse_cuda_matmul_multi_scratch_bytes(const zse_cuda_multi *mm, int64_t n);
int zse_cuda_matmul_multi(const zse_cuda_multi *mm, const float *x, int64_t xpitch, int64_t n,
                          void *cublas, void *scratch, size_t scratch_bytes, zse_cuda_stream st);
/* the tensor-core path on its own, any n (x in 64-row tiles): 4-bit group schemes with
 * cols % 8 == 0 on sm_80 or newer; scratch holds x in f16 (n * cols * 2 bytes) */
int zse_cuda_matmul_mma(const zse_cuda_weight *w, const float *x, int64_t xpitch, int64_t n,
                        float *y, int64_t ypitch, void *scratch, size_t scratch_bytes,
                        zse_cuda_stream st);
/* Rows [row0, row0 + nrows) of W dequantized to f16, out[r][0:cols] with pitch opitch (a
 * multiple of 4, out 8-byte aligned: the kernel stores 4 halves at a time). */
int zse_cuda_dequant_f16(const zse_cuda_weight *w, int64_t row0, int64_t nrows, uint16_t *out,
                         int64_t opitch, zse_cuda_stream st);
/* out[t][0:cols] = row ids[t] of W dequantized to f32 (embedding lookup); ids on device.
 * An id outside [0, w.rows) gives a zero row. */
int zse_cuda_embed(const zse_cuda_weight *w, const int32_t *ids, int64_t n, float *out,
                   int64_t opitch, zse_cuda_stream st);

/* ---- elementwise and normalization (rows x dim, pitches in floats) ---- */
int zse_cuda_rmsnorm(const float *x, int64_t xpitch, const float *w, float eps, int64_t rows,
                     int64_t dim, float *out, int64_t opitch, zse_cuda_stream st);
int zse_cuda_add_bias(float *y, int64_t ypitch, const float *bias, int64_t rows, int64_t dim,
                      zse_cuda_stream st);
int zse_cuda_silu_mul(const float *gate, int64_t gpitch, const float *up, int64_t upitch,
                      int64_t rows, int64_t dim, float *out, int64_t opitch, zse_cuda_stream st);
int zse_cuda_add(float *x, int64_t xpitch, const float *y, int64_t ypitch, int64_t rows,
                 int64_t dim, zse_cuda_stream st);
/* The same RMSNorm and SiLU·mul, also writing out as *xp says (zse_cuda_xprep_at of the rows
 * and dim): 1 when they did, 0 when the shape does not allow it (dim % 32 for Q8, 16-byte
 * rows; only the plain op ran), -1 on an error. */
int zse_cuda_rmsnorm_prep(const float *x, int64_t xpitch, const float *w, float eps, int64_t rows,
                          int64_t dim, float *out, int64_t opitch, const zse_cuda_xprep *xp,
                          zse_cuda_stream st);
int zse_cuda_silu_mul_prep(const float *gate, int64_t gpitch, const float *up, int64_t upitch,
                           int64_t rows, int64_t dim, float *out, int64_t opitch, const zse_cuda_xprep *xp,
                           zse_cuda_stream st);
/* out[i] = x[rows_idx[i]] (rows_idx on device) */
/* out[r] = the lowest index of the largest value of row r (NaNs never win); device ints */
int zse_cuda_argmax_rows(const float *x, int64_t xpitch, int64_t rows, int64_t cols, int32_t *out,
                         zse_cuda_stream st);
/* one row's sampling parameters: temperature (<= 0: greedy), top_k (0 off, 1 greedy),
 * top_p (1 off), min_p (0 off), and the uniform in [0, 1) that draws the token */
typedef struct {
    float temperature, top_p, min_p, u;
    int top_k;
} zse_cuda_sample;
/* out[r] = a token drawn from row r of the logits x by params[r] (device arrays); x is
 * overwritten with the rows' unnormalized probabilities */
int zse_cuda_sample_rows(float *x, int64_t xpitch, int64_t rows, int64_t cols, const zse_cuda_sample *params,
                         int32_t *out, zse_cuda_stream st);
/* constrained decoding: row rows[i] of the logits x gets -inf for every column whose bit in
 * bits[i * words ...] is 0, and for every column past words * 32 (device arrays) */
int zse_cuda_mask_rows(float *x, int64_t xpitch, int64_t cols, const int32_t *rows, int n, const uint32_t *bits,
                       int64_t words, zse_cuda_stream st);
int zse_cuda_gather_rows(const float *x, int64_t xpitch, const int32_t *rows_idx, int64_t n,
                         int64_t dim, float *out, int64_t opitch, zse_cuda_stream st);

/* RoPE, rotate-half (NeoX) pairing: element i pairs with i + head_dim/2; angle =
 * pos * inv_freq[i]; cos/sin scaled by mscale. x: [n][pitch] holding n_heads heads. */
int zse_cuda_rope(float *x, int64_t xpitch, int64_t n, int n_heads, int head_dim,
                  const int32_t *pos, const float *inv_freq, float mscale, zse_cuda_stream st);

/* ---- paged KV cache ----
 * One layer's K (and V) pool: [n_blocks][block_size][n_kv_heads][head_dim] elements,
 * f16, or int8 with one f32 scale per (slot, head) in kscale/vscale [n_blocks*block_size]
 * [n_kv_heads]. */
typedef struct {
    void *k, *v;
    float *kscale, *vscale;     /* int8 only */
    int int8;
    int block_size, n_kv_heads, head_dim;
    int64_t n_slots;            /* n_blocks * block_size */
} zse_cuda_kv_layer;

/* write k/v rows [n][pitch] (n_kv_heads*head_dim wide) at slots[n] (device). A negative
 * slot skips its token. */
int zse_cuda_kv_store(const zse_cuda_kv_layer *L, const float *k, int64_t kpitch,
                      const float *v, int64_t vpitch, const int32_t *slots, int64_t n,
                      zse_cuda_stream st);

/* RoPE on q (n_heads) and k (L's n_kv_heads) by pos, then k and v stored at slots, in one
 * launch: the same numbers as zse_cuda_rope twice and zse_cuda_kv_store. */
int zse_cuda_rope_kv_store(const zse_cuda_kv_layer *L, float *q, int64_t qpitch, float *k, int64_t kpitch,
                           const float *v, int64_t vpitch, const int32_t *slots, int64_t n, int n_heads,
                           const int32_t *pos, const float *inv_freq, float mscale, zse_cuda_stream st);

/* Attention over the paged cache for n query tokens. Per token t: seq = seq_of[t], pos =
 * pos[t]; the keys visible are cache positions p with p <= pos (and pos - p < window when
 * window > 0) of that sequence, found through block_table[seq][p / block_size]. q: [n][qpitch]
 * (n_heads*head_dim), out likewise. Work for the split-K (flash-decoding) path lives in
 * `work` (work_bytes; zse_cuda_attention_work_bytes() says how much). */
typedef struct {
    int n_heads, n_kv_heads, head_dim;
    float scale;
    int window;
    const int32_t *seq_of, *pos;        /* [n] device */
    const int32_t *block_table;         /* [n_seqs][max_blocks] device */
    int max_blocks;
} zse_cuda_attn;
size_t zse_cuda_attention_work_bytes(int64_t n, int n_heads, int head_dim);
int zse_cuda_attention(const zse_cuda_kv_layer *L, const zse_cuda_attn *a, const float *q,
                       int64_t qpitch, int64_t n, int max_ctx, float *out, int64_t opitch,
                       void *work, size_t work_bytes, zse_cuda_stream st);

/* ---- mixture of experts (moe.cu) ----
 * One part (gate, up or down) of a MoE layer's routed experts: every expert's part has w's
 * shape and scheme (w's qs/scales/mins are unused), lying at the byte offsets below inside
 * that expert's range, which starts at base[e] (a device array of n_experts pointers: the
 * bank as loaded, or wherever a cache keeps each expert; NULL: the expert is not on the device
 * this step, and the grouped matmul leaves its pairs' rows alone). Offsets are multiples of 16. */
typedef struct {
    zse_cuda_weight w;
    int64_t qs_off, scales_off, mins_off;   /* -1: the scheme has no such plane */
    const uint8_t *const *base;
} zse_cuda_experts;

/* A step's routing in device memory (zse_cuda_moe_at lays the arrays out in one allocation,
 * zse_cuda_moe_route fills them):
 *   pair_expert, pair_weight, pair_slot [rows * k], token-major (pair (t, j) at t * k + j):
 *       the expert, its weight, and the pair's place in expert order
 *   token_of [rows * k]: the token at each place
 *   seg [n_experts + 1]: expert e's places are seg[e] .. seg[e + 1]
 *   active [n_experts + 1]: the experts with pairs, ascending; active[n_experts] = their count */
#define ZSE_CUDA_MOE_K_MAX 32     /* experts a token takes, at most (format.h's ZSE_MAX_EXPERTS_USED) */
#define ZSE_CUDA_MOE_E_MAX 1024   /* experts a layer has, at most (format.h's ZSE_MAX_EXPERTS) */
typedef struct {
    int n_experts, k, renormalize;
    int32_t *pair_expert;
    float *pair_weight;
    int32_t *pair_slot, *token_of, *seg, *active;
} zse_cuda_moe;
size_t zse_cuda_moe_bytes(int64_t max_rows, int n_experts, int k);
void zse_cuda_moe_at(void *mem, int64_t max_rows, int n_experts, int k, int renormalize, zse_cuda_moe *out);
/* routes rows tokens by their router logits [rows][n_experts] (pitch lpitch): p = softmax
 * (f32), the k largest (ties to the lower expert), weights p or p / (sum of the k), then the
 * pairs sorted by expert (token order within one) — the CPU backend's routing (the softmax
 * sums in another order: weights within a few ulp). One block, a warp per token. */
int zse_cuda_moe_route(const zse_cuda_moe *r, const float *logits, int64_t lpitch, int64_t rows, zse_cuda_stream st);
/* the grouped expert matmul over a route of rows tokens: P->ys[p][i] = W_e · xs[i] for each
 * of the rows * k pairs i, e the pair's expert, W its part P->ex[p]; one launch over every
 * active expert of every part (grid: weight rows x experts that may be active x parts);
 * the parts of one call (a layer's gate and up) share xs, which is quantized once, and so
 * must have one shape and scheme. 4-bit experts on dp4a GEMVs (rows <= ZSE_CUDA_GEMV_MAX)
 * or tensor cores (sm_80 on), other schemes on the float GEMV in tiles of 8 pairs */
#define ZSE_CUDA_MOE_PARTS_MAX 2
typedef struct {
    zse_cuda_experts ex[ZSE_CUDA_MOE_PARTS_MAX];
    float *ys[ZSE_CUDA_MOE_PARTS_MAX];
    int64_t ypitch;     /* of every ys */
    int n;
} zse_cuda_moe_parts;
size_t zse_cuda_moe_matmul_scratch_bytes(const zse_cuda_experts *ex, int64_t rows, int k);
int zse_cuda_moe_matmul(const zse_cuda_moe *r, int64_t rows, const zse_cuda_moe_parts *P, const float *xs,
                        int64_t xpitch, void *scratch, size_t scratch_bytes, zse_cuda_stream st);
/* x[t][0:dim] += sum over t's k pairs, experts ascending, of weight * ys[place], plus
 * sigmoid(gate[t][0]) * shared[t] (shared NULL: none; gate NULL: unscaled) */
int zse_cuda_moe_combine(const zse_cuda_moe *r, int64_t rows, const float *ys, int64_t ypitch, const float *shared,
                         int64_t spitch, const float *gate, int64_t gpitch, float *x, int64_t xpitch, int64_t dim,
                         zse_cuda_stream st);

/* ---- LoRA (lora.cu) ----
 * Adapter slots in one device allocation: slot s at slots + s * slot_bytes begins with a
 * table of n_layers x 7 entries (layer-major: q, k, v, o, gate, up, down), each the rank (0:
 * not adapted), the scale and the byte offsets in the slot of A, f16 [rank][in], and B
 * transposed, f16 [rank][out] (64-byte aligned). The layout of backend.h's zse_lora_entry. */
#define ZSE_CUDA_LORA_MAX_RANK 128
typedef struct {
    int32_t rank;
    float scale;
    int64_t a, bt;
} zse_cuda_lora_entry;

typedef struct {
    const uint8_t *slots;
    uint64_t slot_bytes;
    int n_slots, n_layers;
    int layer;
    int n_outs;                     /* 1..3 projections over one x */
    int max_rank;                   /* the largest rank any slot holds (0: ZSE_CUDA_LORA_MAX_RANK) */
    int module[3];
    float *y[3];
    int64_t ypitch[3];
    int64_t in[3], out[3];
    unsigned *sync;                 /* device, 3 counters: zero before a launch, left zero after it */
} zse_cuda_lora;
/* scratch lora_apply needs for n rows (the rank-wide u = A·x of each row and projection) */
size_t zse_cuda_lora_scratch_bytes(int64_t n, int n_outs);
/* y_i[t] += scale · B·(A·x[t]) for every row t < n whose adapter_of[t] (device, one slot per
 * row; -1: none) adapts l->module[i] of l->layer; other rows untouched. One launch: shrink
 * blocks (a row, projection and 4 rank indices each) and then expand blocks (a warp per row
 * and 256 columns) that wait on l->sync for the shrink. Launches that share l->sync must run one after the other (one stream). Ranks above
 * l->max_rank are not applied: it must cover every slot's. */
int zse_cuda_lora_apply(const zse_cuda_lora *l, const int32_t *adapter_of, const float *x, int64_t xpitch,
                        int64_t n, float *scratch, size_t scratch_bytes, zse_cuda_stream st);
/* zse_cuda_matmul_multi and then the LoRA delta of l over the same x: each of l's
 * projections is one of mm's outputs (l->y[i] == mm->y[k], with its shape), the matmul's store
 * then writes y (+ bias) (+ y when accumulating) + the delta. At one row on the shared 4-bit
 * GEMV the delta folds into that launch (lora.cuh: the GEMV's first blocks run the shrink,
 * every block adds its rows' expand in its store; ZSE_CUDA_LORA_FOLD=0 turns it off);
 * otherwise zse_cuda_lora_apply runs after the matmul. lscratch: at least
 * zse_cuda_matmul_lora_scratch_bytes(n, l->n_outs, x's width) bytes. *folded (unless NULL):
 * 1 when the delta went into the matmul's launch. */
size_t zse_cuda_matmul_lora_scratch_bytes(int64_t n, int n_outs, int64_t in);
int zse_cuda_matmul_multi_lora(const zse_cuda_multi *mm, const float *x, int64_t xpitch, int64_t n, void *cublas,
                               void *scratch, size_t scratch_bytes, const zse_cuda_lora *l, const int32_t *adapter_of,
                               float *lscratch, size_t lscratch_bytes, int *folded, zse_cuda_stream st);

#ifdef __cplusplus
}
#endif

#endif
