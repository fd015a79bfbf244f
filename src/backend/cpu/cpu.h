/* backend/cpu — internal header shared by the CPU backend's files (docs/CPU_BACKEND.md).
 *
 *   cpu.c            the backend: memory, batch state, every op except matmul
 *   matmul.c         matmul dispatch: path choice, int8 activations, threading, the
 *                    portable kernels (the reference every fast path is tested against)
 *   matmul_avx2.c    AVX2/FMA/F16C kernels      (compiled with target attributes only,
 *   matmul_avx512.c  AVX-512 BW/VL/VNNI kernels  chosen at run time: no global -march)
 *   vec.c            short-vector kernels (conversions, dot, axpy) for attention
 *   moe.c            mixture of experts: routing, the grouped expert matmul, the combine
 *   offload.c        weights kept in host memory: pins, slabs, the lazy copy queue
 *   lora.c           LoRA adapter slots and the per-row adapter delta */
#ifndef ZSE_BACKEND_CPU_H
#define ZSE_BACKEND_CPU_H

#include "backend/backend.h"

struct zse_act {
    float *data;
    int64_t rows, cols;
};

struct zse_weight {
    zse_qshape q;
    zse_qplanes p;
    const uint8_t *data;
};

/* fn(ctx, i0, i1) over [0, n) split across the backend's threads */
typedef void (*zse_cpu_range_fn)(void *ctx, int64_t i0, int64_t i1);
void zse_cpu_parallel_for(zse_backend *be, int64_t n, zse_cpu_range_fn fn, void *ctx);

/* y[t][0:w.rows] = W · x[t][0:w.cols] for t < rows (matmul.c) */
void zse_cpu_matmul(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t rows, zse_act *y);
/* one weight of a grouped matmul: y = W·x (+ bias), or y += that (accumulate), over the rows
 * of the views x and y (the same count) */
typedef struct {
    const zse_weight *w;
    const zse_weight *bias;     /* f32 of W's rows, or NULL */
    zse_act x, y;               /* views: data, rows, cols (y's row pitch) */
    bool accumulate;
} zse_cpu_mm;
/* Every weight of mm in two parallel passes whatever their count: each distinct x quantized
 * once (weights of one activation layout share it), then the row blocks of all the weights.
 * Each result is bit for bit what zse_cpu_matmul, add_bias and add give one by one. */
void zse_cpu_matmul_group(zse_backend *be, const zse_cpu_mm *mm, int n);
void zse_cpu_matmul_multi(zse_backend *be, const zse_act *x, int64_t rows, const zse_matmul_out *outs, int n_outs,
                          bool accumulate);

/* ops return nothing: a kernel that cannot finish (out of memory) records it here and
 * the next sync() reports it, so a step never silently yields garbage */
void zse_cpu_note_failure(zse_backend *be, const char *what);

/* offload.c: the copy queue's state (created on first use, freed with the backend) */
typedef struct zse_cpu_copies zse_cpu_copies;
zse_cpu_copies **zse_cpu_copies_slot(zse_backend *be);
void zse_cpu_copies_free(zse_cpu_copies *q);
uint64_t zse_cpu_slab_bytes(zse_backend *be);
/* the backend.h ops of offload.c and moe.c */
zse_pinned *zse_cpu_host_pin(zse_backend *be, const void *p, size_t bytes);
void zse_cpu_host_unpin(zse_backend *be, zse_pinned *h);
zse_slab *zse_cpu_slab_new(zse_backend *be, size_t slot_bytes, int n_slots);
void zse_cpu_slab_free(zse_backend *be, zse_slab *s);
void zse_cpu_slab_fetch(zse_backend *be, zse_slab *s, int slot, const zse_pinned *h, uint64_t off, size_t n,
                        int64_t after);
int64_t zse_cpu_mark(zse_backend *be, int queue);
void zse_cpu_wait_mark(zse_backend *be, int queue, int64_t mark);
zse_weight *zse_cpu_weight_in_slab(zse_backend *be, const zse_tensor_info *t, const zse_slab *s, int slot,
                                   uint64_t at);
int zse_cpu_act_write_rows(zse_backend *be, zse_act *a, const float *src, const int32_t *rows, int64_t n);
/* where slot `slot` of s starts (moe.c maps experts there) */
uint8_t *zse_cpu_slot_data(const zse_slab *s, int slot);
zse_experts *zse_cpu_experts_host(zse_backend *be, const zse_expert_bank *bank);
void zse_cpu_experts_map(zse_backend *be, zse_experts *ex, const zse_slab *s, const int32_t *slot_of);
int zse_cpu_moe_route_read(zse_backend *be, const zse_moe_route *r, int32_t *seg, int32_t *token_of);

/* the backend's thread count */
int zse_cpu_threads(zse_backend *be);
/* a 64-byte aligned scratch buffer of at least `bytes`, owned by the backend and reused by
 * the next call (grow-only; ops run one at a time); NULL with an error when out of memory */
void *zse_cpu_workspace(zse_backend *be, size_t bytes);

/* ---- kernel paths ----------------------------------------------------------------------
 * The best the CPU supports is chosen once; tests and benchmarks force a lesser one to
 * compare. Process-wide (set it before running work, not while kernels run). */
typedef enum { ZSE_CPU_PORTABLE = 0, ZSE_CPU_AVX2 = 1, ZSE_CPU_AVX512 = 2 } zse_cpu_path;
zse_cpu_path zse_cpu_best_path(void);
/* "auto", "portable", "avx2", "avx512"; -1 with an error if this CPU cannot run it */
int zse_cpu_set_path(const char *name);
zse_cpu_path zse_cpu_current_path(void);
const char *zse_cpu_path_name(void);

/* ---- int8 activations for the integer kernels --------------------------------------------
 * Each token's row is quantized once per matmul in blocks of `ab` elements: xq =
 * round(x / d), d = absmax / 127. The block is the weight's group for 4-bit weights (32, 64
 * or 128) and 64 for int8, so one block meets one weight scale: with weights
 * w = u·S_g + M_g (u small unsigned integers: the integer dot products run on u8 × s8
 * instructions, maddubs and dpbusd),
 *     Σ w·x ≈ Σ_g S_g · d_g · (Σ u·xq)_g  +  Σ_g M_g · gsum_g,    gsum_g = d_g · Σ xq_g
 * so a group costs integer multiply-adds and one float multiply-add per token.
 * (llama.cpp's k-quants use one activation scale per 256; finer blocks keep an outlier from
 * coarsening more than its group.)
 *
 * Packed for the kernel that reads them: tokens go in tiles of `tile` (the last may be
 * short, nt tokens); within a tile, unit i of every token lies together, [unit][token][unit
 * bytes], so a kernel walking a weight row finds the tile's activations for its next weight
 * bytes at one pointer and fixed offsets. Units are 32 bytes (AVX2: one 32-element chunk,
 * natural order) or 64 bytes (AVX-512: two chunks). With `il` a 64-byte unit holds
 * c0[0:16] c1[0:16] c0[16:32] c1[16:32] of its chunks c0, c1: the order a 32-byte load of two
 * packed int4 chunks yields as [low nibbles | high nibbles], so weights need no shuffle.
 * Block scales are stored [block][token] per tile; `dvec` (AVX-512 with 32-element blocks,
 * where one 64-byte unit spans two blocks) holds each 32-bit lane's d, [unit][token][16]. */
typedef struct {
    int64_t tokens;
    int64_t cp;             /* elements per token row (the weight's padded columns) */
    int64_t stride;         /* bytes per token of q (cp rounded up to 64) */
    int64_t ab, nblk;       /* elements per activation block; blocks per row */
    int64_t groups;         /* gsum entries per token: nblk (4-bit) or 1 (int8) */
    int tile;               /* tokens per tile */
    int unit;               /* 32 or 64 bytes */
    bool il;                /* interleaved 64-byte units (4-bit weights on AVX-512) */
    int8_t *q;              /* tile at token t0 starts at q + t0 * stride */
    float *d;               /* tile at t0 starts at d + t0 * nblk: [block][token] (+8 spare) */
    float *dvec;            /* tile at t0: dvec + t0 * stride / 4; NULL unless needed */
    float *gsum;            /* [tokens][groups] */
} zse_qx;

/* quantize n (≤ ab) floats into ab int8 (zero past n) in natural order: returns d and
 * Σ xq. Every path computes the same bytes (round half to even of x · 127/absmax). */
void zse_cpu_quant_block_avx2(const float *x, int64_t n, int64_t ab, int8_t *q, float *d, int *isum);
void zse_cpu_quant_block_avx512(const float *x, int64_t n, int64_t ab, int8_t *q, float *d, int *isum);

/* tokens per tile: AVX-512 keeps 2 x 8 accumulators in its 32 registers, AVX2 2 x 4 in 16 */
#define ZSE_CPU_TILE_AVX512 8
#define ZSE_CPU_TILE_AVX2 4

/* y[t * ldy + r] for r in [r0, r1), every token. scratch: 2 * (groups + 16) floats. */
void zse_cpu_q_rows_avx2(const zse_weight *w, const zse_qx *qx, float *y, int64_t ldy, int64_t r0,
                         int64_t r1, float *scratch);
void zse_cpu_q_rows_avx512(const zse_weight *w, const zse_qx *qx, float *y, int64_t ldy, int64_t r0,
                           int64_t r1, float *scratch);
/* f32/f16/bf16 weights times f32 activations, exact products, f32 sums */
void zse_cpu_f_rows_avx2(const zse_weight *w, const float *x, int64_t ldx, int64_t tokens, float *y,
                         int64_t ldy, int64_t r0, int64_t r1);
void zse_cpu_f_rows_avx512(const zse_weight *w, const float *x, int64_t ldx, int64_t tokens, float *y,
                           int64_t ldy, int64_t r0, int64_t r1);

/* the integer form of a 4-bit or int8 row: S and M per group (see zse_qx), for a path
 * whose u values are the raw nibbles (Q4, Q4S), NF4 codes as round(127·v) + `nf4_bias`,
 * or int8 values + `q8_bias` */
void zse_cpu_row_scales(const zse_weight *w, int64_t r, float nf4_bias, float q8_bias, float *S, float *M);
/* NF4 code values as int8: round(127 · zse_nf4_values[i]) */
extern const int8_t zse_cpu_nf4_i8[16];

/* short-vector kernels for the current path (vec.c) */
typedef struct {
    void (*f16_to_f32)(const uint16_t *h, int64_t n, float *out);
    void (*i8_to_f32)(const int8_t *q, float scale, int64_t n, float *out);
    float (*dot)(const float *a, const float *b, int64_t n);
    void (*axpy)(float *y, float a, const float *x, int64_t n);     /* y += a·x */
    void (*scale)(float *y, float a, int64_t n);                     /* y *= a */
    /* LoRA over a tile of nt ≤ ZSE_CPU_LORA_TILE rows of one adapter (lora.c): the shrink
     * s[t·lds + q] = A[q]·x[t] for nq ≤ ZSE_CPU_LORA_RANKS rows of f16 A, and the expand
     * y[t][o] += scale · Σ_j u[t][j]·Bᵀ[j][o]; each of A and Bᵀ converted once for the tile */
    void (*lora_shrink)(const uint16_t *a, int64_t lda, int nq, const float *x, int64_t ldx, int nt, int64_t n,
                        float *s, int64_t lds);
    void (*lora_expand)(const uint16_t *bt, int64_t ldb, int rank, const float *u, int64_t ldu, int nt, float scale,
                        float *y, int64_t ldy, int64_t n);
} zse_cpu_vec;
#define ZSE_CPU_LORA_TILE 8    /* rows of one adapter a shrink or expand unit takes */
#define ZSE_CPU_LORA_RANKS 4   /* ranks a shrink unit takes */
#define ZSE_CPU_LORA_CHUNK 256 /* columns of A a shrink converts at a time; outputs of an expand unit */
const zse_cpu_vec *zse_cpu_vec_ops(void);
/* the portable dot product (8 partial sums in a fixed order): the portable matmul path and
 * vec.c's portable table share it */
float zse_cpu_dot_portable(const float *a, const float *b, int64_t n);

/* mixture-of-experts ops (moe.c) */
zse_experts *zse_cpu_experts_load(zse_backend *be, const zse_expert_bank *bank);
void zse_cpu_experts_free(zse_backend *be, zse_experts *ex);
zse_moe_route *zse_cpu_moe_route_new(zse_backend *be, int64_t max_rows, const zse_moe_params *p);
void zse_cpu_moe_route_free(zse_backend *be, zse_moe_route *r);
void zse_cpu_moe_route(zse_backend *be, zse_moe_route *r, const zse_act *logits, int64_t rows);
int zse_cpu_moe_route_experts(zse_backend *be, const zse_moe_route *r, int32_t *experts);
void zse_cpu_moe_gather(zse_backend *be, const zse_moe_route *r, const zse_act *x, zse_act *xs);
void zse_cpu_moe_matmul(zse_backend *be, const zse_moe_route *r, const zse_experts *ex, const zse_act *xs,
                        const zse_moe_out *outs, int n_outs);
void zse_cpu_moe_combine(zse_backend *be, const zse_moe_route *r, const zse_act *ys, const zse_act *shared,
                         const zse_act *shared_gate, zse_act *x);

/* LoRA (lora.c); the batch's adapters are cpu.c's */
zse_lora_pool *zse_cpu_lora_pool_new(zse_backend *be, const zse_lora_shape *s);
void zse_cpu_lora_pool_free(zse_backend *be, zse_lora_pool *p);
void *zse_cpu_lora_host_alloc(zse_backend *be, size_t bytes);
void zse_cpu_lora_host_free(zse_backend *be, void *p);
int zse_cpu_lora_slot_load(zse_backend *be, zse_lora_pool *p, int slot, const void *image, size_t bytes);
int zse_cpu_lora_slot_ready(zse_backend *be, zse_lora_pool *p, int slot);
void zse_cpu_lora_apply(zse_backend *be, const zse_lora_pool *p, int layer, const zse_act *x, int64_t rows,
                        const zse_lora_out *outs, int n_outs);
/* the adapter slot of the current batch's row t (-1: none), whether the batch has any */
int32_t zse_cpu_row_adapter(zse_backend *be, int64_t t);
bool zse_cpu_has_adapters(zse_backend *be);
void zse_cpu_note_lora_bytes(zse_backend *be, int64_t delta);

/* rows of weights kept hot in L2 while every token of a batch passes over them */
int64_t zse_cpu_row_block(const zse_weight *w);

#endif
