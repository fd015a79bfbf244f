/* quant — quantization schemes and the packed layouts that the .zse file stores and the
 * kernels read. Shared by the writer (quantize) and the backends (dequantize, dot).
 * docs/FORMAT.md §Layouts is the specification; keep the two in step. */
#ifndef ZSE_QUANT_H
#define ZSE_QUANT_H

#include "util/util.h"

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

/* Scheme of one stored tensor. Values are written to files: never renumber. */
typedef enum {
    ZSE_SCHEME_F32 = 0,
    ZSE_SCHEME_F16 = 1,
    ZSE_SCHEME_BF16 = 2,
    ZSE_SCHEME_Q8 = 3,      /* int8, symmetric, one f32 scale per output row */
    ZSE_SCHEME_Q4 = 4,      /* int4 group-wise, asymmetric: w = q * scale + min */
    ZSE_SCHEME_Q4S = 5,     /* int4 group-wise, symmetric:  w = (q - 8) * scale */
    ZSE_SCHEME_NF4 = 6,     /* 4-bit NormalFloat code, group-wise absmax scale */
    ZSE_SCHEME_Q8G = 7,     /* int8 group-wise, symmetric: w = q * scale (format 2.0; GGUF Q8_0) */
    ZSE_SCHEME_COUNT
} zse_scheme;

/* Packed layout ids (docs/FORMAT.md). A scheme has one layout. */
typedef enum {
    ZSE_LAYOUT_PLAIN = 0,   /* row-major elements: f32, f16 or bf16 */
    ZSE_LAYOUT_Q8_ROW = 1,  /* int8 [rows][cols_padded] then f32 scale [rows] */
    ZSE_LAYOUT_Q4_G = 2,    /* nibbles [rows][cols_padded/2], f16 scale [rows][groups],
                               (Q4 only) f16 min [rows][groups] */
    ZSE_LAYOUT_Q8_G = 3,    /* int8 [rows][cols_padded] then f16 scale [rows][groups] */
} zse_layout;

/* Within each 32-element chunk of a row, 16 bytes hold the nibbles: byte j's low nibble is
 * element j and its high nibble element j + 16. One 16-byte load feeds 32 lanes of
 * dequantization on CPU (AVX2 and-with-0x0F / shift) and GPU alike. */
#define ZSE_Q4_CHUNK 32

/* Shape and parameters of one packed 2-D weight: rows = output features (HF weight's
 * first dimension), cols = input features. Vectors (norms, biases) are rows = 1. */
typedef struct {
    zse_scheme scheme;
    int64_t rows;
    int64_t cols;
    int group_size;         /* Q4, Q4S, NF4, Q8G: 32, 64 or 128; 0 otherwise */
} zse_qshape;

const char *zse_scheme_name(zse_scheme s);          /* "f32", "f16", "bf16", "int8", "int4", "int4s", "nf4", "int8g" */
int zse_scheme_from_name(const char *name, zse_scheme *out);
zse_layout zse_scheme_layout(zse_scheme s);
bool zse_scheme_is_quantized(zse_scheme s);
/* the scheme stores a group size (4-bit schemes and int8g) */
bool zse_scheme_is_grouped(zse_scheme s);

/* Columns rounded up to what the layout pads a row to (the group size for grouped
 * schemes, 32 for int8, unchanged for plain). Padding elements are zero. */
int64_t zse_qshape_cols_padded(const zse_qshape *q);
/* bytes of the packed tensor; 0 and an error on overflow or a bad shape */
size_t zse_qshape_bytes(const zse_qshape *q);
/* offsets of the planes inside the packed tensor */
typedef struct {
    size_t qs;          /* quantized values or plain elements */
    size_t scales;      /* scales plane (quantized schemes) */
    size_t mins;        /* mins plane (Q4 only) */
    size_t row_bytes;   /* bytes of one row in the qs plane */
    int64_t groups;     /* groups per row (4-bit schemes) */
} zse_qplanes;
void zse_qshape_planes(const zse_qshape *q, zse_qplanes *p);

/* Quantize rows [row0, row1) into dst (the whole packed tensor, zse_qshape_bytes() long).
 * src holds just those rows: (row1 - row0) x cols f32, row-major. Threads may call it on
 * disjoint row ranges. */
void zse_quantize_rows(const zse_qshape *q, const float *src, void *dst, int64_t row0, int64_t row1);
/* Dequantize one row of the packed tensor into cols floats. */
void zse_dequantize_row(const zse_qshape *q, const void *packed, int64_t row, float *out);

/* ---- one 4-bit group: what zse_quantize_rows does per group, for the calibrated
 * quantizers that choose codes themselves (gptq.c). */
typedef struct {
    float scale;            /* rounded through f16, as stored */
    float min;              /* int4 only (0 otherwise) */
} zse_q4_params;
/* the parameters the writer picks for a group of n values of a 4-bit scheme */
zse_q4_params zse_q4_group_params(zse_scheme s, const float *x, int n);
/* the code of x under p, and the value a code stands for */
int zse_q4_encode(zse_scheme s, zse_q4_params p, float x);
float zse_q4_decode(zse_scheme s, zse_q4_params p, int code);
/* writes group `group` of row `row` (group_size codes, padding included) and its
 * parameters into a packed tensor */
void zse_q4_store_group(const zse_qshape *q, void *packed, int64_t row, int64_t group, const uint8_t *codes,
                        zse_q4_params p);

/* ---- calibrated quantization (docs/QUANT.md) -------------------------------------
 * The math of `zse convert --calibrate`: Hessians of a linear layer's inputs, GPTQ,
 * AWQ scale search and the bit-budget plan. Everything here works on host f32 arrays
 * and knows nothing of models; src/calib runs the model and calls it. */

/* linalg.c. H += x^T x over `rows` rows of x (row stride `stride` floats), for the upper
 * triangle only (H[i][j], j >= i); zse_hessian_mirror copies it to the lower one. */
void zse_hessian_accumulate(float *H, int64_t n, const float *x, int64_t rows, int64_t stride, zse_pool *pool);
void zse_hessian_mirror(float *H, int64_t n);
/* Cholesky factor of a symmetric positive definite A (n x n, row-major, lower triangle
 * read): A = L L^T, L written over A's lower triangle. -1 (no error recorded) when A is
 * not positive definite. */
int zse_cholesky(double *A, int64_t n, zse_pool *pool);
/* X = L^-1 for a lower-triangular L (both n x n; X's upper triangle is zeroed), summed in
 * double, stored in f32 */
void zse_tri_lower_inverse(const double *L, float *X, int64_t n, zse_pool *pool);
/* y += a x over n floats (vectorized for the CPU it runs on) */
void zse_axpy_f32(float *y, float a, const float *x, int64_t n);
/* sum over rows r of (A_r - B_r)^T H (A_r - B_r): the squared output error that using B
 * for A adds on the inputs H was accumulated from (H full, n = cols). Every row_step-th
 * row is summed, scaled to all rows (an estimate when row_step > 1). */
double zse_weighted_error(const float *A, const float *B, int64_t rows, int64_t cols, const float *H,
                          int64_t row_step, zse_pool *pool);

/* gptq.c. GPTQ (Frantar et al. 2022): quantizes W (q->rows x q->cols f32) column by
 * column into the packed layout of q (a 4-bit scheme; packed zse_qshape_bytes(q) bytes,
 * zeroed), spreading each column's rounding error over the columns not yet quantized so
 * that the output error on the inputs of H (full, cols x cols) is least. Columns go in
 * act order with every group's parameters chosen up front (the layout is unchanged), then
 * each row's group parameters are refitted to the output error. The factor of H (its act
 * order and the Cholesky factor of the damped inverse) is computed once and serves every
 * weight reading that input, at every group size; it borrows H, which must outlive it.
 * damp: the fraction of H's mean diagonal added to its diagonal (0.01); raised tenfold
 * while H is not positive definite. */
typedef struct zse_gptq_factor zse_gptq_factor;
zse_gptq_factor *zse_gptq_factor_new(const float *H, int64_t n, double damp, zse_pool *pool);
void zse_gptq_factor_free(zse_gptq_factor *f);
int zse_gptq(const zse_qshape *q, const float *W, const zse_gptq_factor *f, void *packed, zse_pool *pool);
/* the dequantized rows of a packed tensor, all of them (rows x cols f32) */
void zse_dequantize_all(const zse_qshape *q, const void *packed, float *out);

/* awq.c. AWQ (Lin et al. 2023): per-input-channel scales s for weights that share one
 * input (Hessian H), s_c = (H_cc)^(alpha/2) normalized to a geometric mean-ish of 1
 * (max · min = 1), with alpha from a grid of 20 in [0, 1) chosen to minimize the summed
 * output error of round-to-nearest W·diag(s), unscaled: the weights are multiplied by s
 * column-wise and the input divided by s (folded into the RMSNorm or row scaling before).
 * ws[i] are rows[i] x cols f32; q gives the scheme and group size. alpha 0 (s = 1, plain
 * round-to-nearest) is in the grid, so the chosen s is never worse on this measure. */
typedef struct {
    double alpha;           /* the chosen exponent */
    double error;           /* the summed output error at alpha (estimated on sampled rows) */
    double error_rtn;       /* the same at alpha = 0 */
} zse_awq_result;
int zse_awq_search(const zse_qshape *q, const float *const *ws, const int64_t *rows, int n_ws, const float *H,
                   float *s, zse_awq_result *res, zse_pool *pool);
/* the round-to-nearest result of W (rows x cols) under q, dequantized into out */
int zse_fake_quantize(const zse_qshape *q, const float *W, float *out);

/* plan.c. Mixed precision within a byte budget: tensor t may be stored in any of its
 * n_opts[t] options (bytes, estimated cost); the plan picks one per tensor so the summed
 * cost is least (greedy over each tensor's lower convex hull of cost against bytes)
 * while the summed bytes stay within budget. choice[t] is an index into opts[t]. -1 with
 * an error when even the smallest options exceed the budget. */
typedef struct {
    uint64_t bytes;
    double cost;
} zse_plan_option;
int zse_plan_choose(const zse_plan_option *const *opts, const int *n_opts, int n, uint64_t budget, int *choice);

/* half-precision conversions (round to nearest even) */
uint16_t zse_f32_to_f16(float f);
float zse_f16_to_f32(uint16_t h);
uint16_t zse_f32_to_bf16(float f);
float zse_bf16_to_f32(uint16_t h);

/* the 16 NF4 code values (QLoRA), ascending, in [-1, 1] */
extern const float zse_nf4_values[16];

/* ---- GGML block formats (the tensor types of GGUF files; ggml.c) -----------------------
 * Types are ggml's ids (0 F32, 1 F16, 2 Q4_0, 8 Q8_0, 12 Q4_K, 30 BF16, ...). zse reads
 * F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K. */
const char *zse_ggml_type_name(uint32_t type);      /* "Q4_K"; NULL for an id ggml does not define */
bool zse_ggml_type_supported(uint32_t type);
int64_t zse_ggml_block_elems(uint32_t type);        /* elements per block (1 for F32/F16/BF16) */
/* bytes of a row of n elements; 0 for an unsupported type or n not a multiple of the block */
size_t zse_ggml_row_bytes(uint32_t type, int64_t n);
/* one row of n elements (a multiple of the block) of a supported type to f32 */
void zse_ggml_dequantize_row(uint32_t type, const void *src, int64_t n, float *out);
/* the zse scheme that holds a type's values exactly (F32/F16/BF16 → themselves, Q4_0 →
 * int4s, Q4_1 → int4, Q8_0 → int8g, all three at group 32, set in *group_size), or -1 */
int zse_ggml_exact_scheme(uint32_t type, int *group_size);
/* copies one row of that type into row `row` of packed tensor q, whose scheme and group
 * are the type's exact ones: no value changes */
void zse_ggml_repack_row(uint32_t type, const void *src, const zse_qshape *q, void *packed, int64_t row);

#endif
