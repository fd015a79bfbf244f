/* backend/cpu — internal header shared by the CPU backend's files (docs/CPU_BACKEND.md).
 *
 *   cpu.c            the backend: memory, batch state, every op except matmul
 *   matmul.c         matmul dispatch: path choice, int8 activations, threading, the
 *                    portable kernels (the reference every fast path is tested against)
 *   matmul_avx2.c    AVX2/FMA/F16C kernels      (compiled with target attributes only,
 *   matmul_avx512.c  AVX-512 BW/VL/VNNI kernels  chosen at run time: no global -march) */
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

/* ops return nothing: a kernel that cannot finish (out of memory) records it here and
 * the next sync() reports it, so a step never silently yields garbage */
void zse_cpu_note_failure(zse_backend *be, const char *what);

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
 * Each token's row is quantized once per matmul in blocks of 32: xq = round(x / d),
 * d = absmax / 127. A weight group g then contributes
 *     Σ w·x ≈ S_g · Σ_b d_b · (Σ u·xq)_b  +  M_g · gsum_g,    gsum_g = Σ_b d_b · Σ xq_b
 * for weights w = u·S_g + M_g with small unsigned integers u (the integer dot products run
 * on u8 × s8 instructions: maddubs, dpbusd).
 *
 * Packed for the kernel that reads them: tokens go in tiles of `tile` (the last may be
 * short, nt tokens); within a tile, unit i of every token lies together, [unit][token][unit
 * bytes], so a kernel walking a weight row finds the tile's activations for its next weight
 * bytes at one pointer and fixed offsets. Units are 32 bytes (AVX2: one 32-element block,
 * natural order) or 64 bytes (AVX-512: two blocks). With `il` a 64-byte unit holds
 * c0[0:16] c1[0:16] c0[16:32] c1[16:32] of its blocks c0, c1: the order a 32-byte load of two
 * packed int4 chunks yields as [low nibbles | high nibbles], so weights need no shuffle.
 * `dvec` (64-byte units) holds each 32-bit lane's block scale, [unit][token][16]. */
typedef struct {
    int64_t tokens;
    int64_t cp;             /* elements per token row (the weight's padded columns) */
    int64_t stride;         /* bytes per token of q (cp rounded up to 64) */
    int64_t nb;             /* 32-blocks per row: cp / 32 */
    int64_t groups;         /* weight groups per row (1 for int8: the whole row) */
    int tile;               /* tokens per tile */
    int unit;               /* 32 or 64 bytes */
    bool il;                /* interleaved 64-byte units (4-bit weights on AVX-512) */
    int8_t *q;              /* tile at token t0 starts at q + t0 * stride */
    float *d;               /* block scales; tile at t0 starts at d + t0 * nb: [block][token] */
    float *dvec;            /* 64-byte units only; tile at t0: dvec + t0 * stride / 4 */
    float *gsum;            /* [tokens][groups] */
} zse_qx;

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

/* rows of weights kept hot in L2 while every token of a batch passes over them */
int64_t zse_cpu_row_block(const zse_weight *w);

#endif
