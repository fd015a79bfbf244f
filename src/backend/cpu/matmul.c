/* CPU matmul against packed weights: the dispatch, the int8 activations the integer
 * kernels read, the threading, and the portable kernels.
 *
 * Work split: each thread takes a contiguous range of output rows and walks it in row
 * blocks small enough to stay in L2; within a block the kernel takes the tokens a tile at a
 * time (up to 8) and, for each row, unpacks each weight chunk once and multiplies it into
 * every token of the tile. So the weight streams from memory once per step whatever the
 * batch size, and a prefill reuses each unpacked chunk across the tile from registers.
 *
 * Batch invariance: every (row, token) result comes from the same sequence of operations
 * whatever the batch size or the token's place in a tile (the tile only shares the weight
 * unpacking), which keeps batching from changing outputs.
 *
 * Paths (docs/CPU_BACKEND.md): portable C — rows unpacked to f32 and dotted in f32, the
 * reference the others are tested against; AVX2 and AVX-512 — f32/f16/bf16 weights as exact
 * f32 products, 4-bit and int8 weights as integer dot products with int8 activations. */
#include "backend/cpu/cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- path selection ----------------------------------------------------------------------- */

zse_cpu_path zse_cpu_best_path(void)
{
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        /* every AVX2 CPU also has F16C (clang 14 cannot test for it by name) */
        bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vnni");
        cached = avx512 ? ZSE_CPU_AVX512 : avx2 ? ZSE_CPU_AVX2 : ZSE_CPU_PORTABLE;
    }
    return (zse_cpu_path)cached;
}

static const char *const path_names[] = {"portable", "avx2", "avx512"};
static int forced_path = -1;

zse_cpu_path zse_cpu_current_path(void)
{
    return forced_path >= 0 ? (zse_cpu_path)forced_path : zse_cpu_best_path();
}

const char *zse_cpu_path_name(void)
{
    return path_names[zse_cpu_current_path()];
}

int zse_cpu_set_path(const char *name)
{
    if (strcmp(name, "auto") == 0) {
        forced_path = -1;
        return 0;
    }
    for (int p = 0; p < 3; p++)
        if (strcmp(name, path_names[p]) == 0) {
            if (p > (int)zse_cpu_best_path())
                return zse_fail("this CPU cannot run the %s kernels (best: %s)", name,
                                path_names[zse_cpu_best_path()]);
            forced_path = p;
            return 0;
        }
    return zse_fail("unknown CPU kernel path '%s' (use auto, portable, avx2 or avx512)", name);
}

/* ---- shared by the integer kernels -------------------------------------------------------------- */

const int8_t zse_cpu_nf4_i8[16] = {-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127};

void zse_cpu_row_scales(const zse_weight *w, int64_t r, float nf4_bias, float q8_bias, float *S, float *M)
{
    if (w->q.scheme == ZSE_SCHEME_Q8) {
        float s = ((const float *)(w->data + w->p.scales))[r];
        S[0] = s;
        M[0] = -q8_bias * s;
        return;
    }
    int64_t G = w->p.groups;
    const uint16_t *sc = (const uint16_t *)(w->data + w->p.scales) + (size_t)r * (size_t)G;
    const uint16_t *mn = (const uint16_t *)(w->data + w->p.mins) + (size_t)r * (size_t)G;
    for (int64_t g = 0; g < G; g++) {
        float s = zse_f16_to_f32(sc[g]);
        switch (w->q.scheme) {
        case ZSE_SCHEME_Q4: S[g] = s; M[g] = zse_f16_to_f32(mn[g]); break;
        case ZSE_SCHEME_Q4S: S[g] = s; M[g] = -8.0f * s; break;
        case ZSE_SCHEME_Q8G: S[g] = s; M[g] = 0.0f; break;
        default: S[g] = s / 127.0f; M[g] = -nf4_bias * (s / 127.0f); break; /* NF4 */
        }
    }
}

int64_t zse_cpu_row_block(const zse_weight *w)
{
    /* ~192 KiB of weights per block: they stay in L2 while every token tile passes */
    int64_t rb = (int64_t)(((size_t)192 << 10) / (w->p.row_bytes ? w->p.row_bytes : 1));
    return rb < 4 ? 4 : rb > 256 ? 256 : rb;
}

static bool integer_scheme(zse_scheme s)
{
    return s == ZSE_SCHEME_Q8 || s == ZSE_SCHEME_Q4 || s == ZSE_SCHEME_Q4S || s == ZSE_SCHEME_NF4 ||
           s == ZSE_SCHEME_Q8G;
}

/* ---- int8 activations ------------------------------------------------------------------------- */

typedef struct {
    const zse_act *x;
    int64_t cols;           /* valid columns */
    bool q8;
    zse_cpu_path path;
    zse_qx *qx;
} quant_job;

/* the bytes of 32-element chunk c of the token at index ti of its tile (nt tokens) */
static void place_chunk(const zse_qx *qx, int8_t *tile_q, int64_t nt, int64_t ti, int64_t c, const int8_t *src)
{
    if (qx->unit == 32) {
        memcpy(tile_q + (c * nt + ti) * 32, src, 32);
        return;
    }
    int8_t *u = tile_q + ((c / 2) * nt + ti) * 64;
    if (qx->il) {
        memcpy(u + (c % 2) * 16, src, 16);
        memcpy(u + 32 + (c % 2) * 16, src + 16, 16);
    } else {
        memcpy(u + (c % 2) * 32, src, 32);
    }
}

static void quantize_tokens(void *p, int64_t t0, int64_t t1)
{
    quant_job *job = p;
    zse_qx *qx = job->qx;
    int8_t tmp[128];
    for (int64_t t = t0; t < t1; t++) {
        const float *xr = job->x->data + t * job->x->cols;
        int64_t base = t - t % qx->tile, ti = t - base;
        int64_t nt = qx->tokens - base < qx->tile ? qx->tokens - base : qx->tile;
        int8_t *q = qx->q + base * qx->stride;
        float *d = qx->d + base * qx->nblk, *gs = qx->gsum + t * qx->groups;
        gs[0] = 0;
        for (int64_t b = 0; b < qx->nblk; b++) {
            int64_t first = b * qx->ab, n = job->cols - first, len = qx->cp - first;
            n = n > qx->ab ? qx->ab : n < 0 ? 0 : n;
            len = len > qx->ab ? qx->ab : len;
            float db;
            int isum;
            if (job->path == ZSE_CPU_AVX512)
                zse_cpu_quant_block_avx512(xr + first, n, qx->ab, tmp, &db, &isum);
            else
                zse_cpu_quant_block_avx2(xr + first, n, qx->ab, tmp, &db, &isum);
            for (int64_t c = 0; c < len / 32; c++)
                place_chunk(qx, q, nt, ti, first / 32 + c, tmp + c * 32);
            d[b * nt + ti] = db;
            if (job->q8)
                gs[0] += db * (float)isum;
            else
                gs[b] = db * (float)isum;
        }
        if (qx->dvec) {
            /* 32-element blocks: lane k of a 64-byte unit covers its bytes 4k..4k+3 */
            float *dv = qx->dvec + base * (qx->stride / 4);
            for (int64_t i = 0; i < qx->stride / 64; i++)
                for (int k = 0; k < 16; k++) {
                    int64_t b = i * 2 + (qx->il ? (k / 4) % 2 : k / 8);
                    dv[(i * nt + ti) * 16 + k] = b < qx->nblk ? d[b * nt + ti] : 0;
                }
        }
    }
}

/* A grow-only workspace of the backend holds the activations: a decode step calls matmul a
 * few hundred times, and fresh large allocations would fault their pages in every time. */
static int quantize_acts(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t tokens,
                         zse_cpu_path path, int threads, zse_qx *qx, float **scratch, int64_t *scratch_per)
{
    int64_t cp = zse_qshape_cols_padded(&w->q);
    bool q8 = w->q.scheme == ZSE_SCHEME_Q8, avx512 = path == ZSE_CPU_AVX512;
    memset(qx, 0, sizeof *qx);
    qx->tokens = tokens;
    qx->cp = cp;
    qx->stride = (cp + 63) / 64 * 64;
    qx->ab = q8 ? 64 : w->q.group_size;
    qx->nblk = (cp + qx->ab - 1) / qx->ab;
    qx->groups = q8 ? 1 : qx->nblk;
    qx->tile = avx512 ? ZSE_CPU_TILE_AVX512 : ZSE_CPU_TILE_AVX2;
    qx->unit = avx512 ? 64 : 32;
    qx->il = avx512 && !q8;
    bool dvec = avx512 && qx->ab == 32;
    size_t T = (size_t)tokens;
    *scratch_per = 2 * (qx->groups + 16);
    size_t sizes[5] = {T * (size_t)qx->stride, (T * (size_t)qx->nblk + 8) * 4, dvec ? T * (size_t)qx->stride : 0,
                       T * (size_t)qx->groups * 4, (size_t)threads * (size_t)*scratch_per * 4};
    size_t total = 0, offs[5];
    for (int i = 0; i < 5; i++) {
        offs[i] = total;
        total += (sizes[i] + 63) & ~(size_t)63;
    }
    uint8_t *ws = zse_cpu_workspace(be, total);
    if (!ws)
        return -1;
    qx->q = (int8_t *)(ws + offs[0]);
    qx->d = (float *)(ws + offs[1]);
    qx->dvec = dvec ? (float *)(ws + offs[2]) : NULL;
    qx->gsum = (float *)(ws + offs[3]);
    *scratch = (float *)(ws + offs[4]);
    /* the padding past cp (an odd last 32-chunk) stays zero; the spare d entries are read
     * (and ignored) by a short tile's vector load */
    memset(qx->q, 0, sizes[0]);
    memset(qx->d, 0, sizes[1]);
    quant_job job = {x, w->q.cols, q8, path, qx};
    zse_cpu_parallel_for(be, tokens, quantize_tokens, &job);
    return 0;
}

/* ---- portable kernels: unpack a row to f32, dot it with every token ------------------------- */

/* the row of a packed weight as f32 (cols values) */
static void unpack_row(const zse_weight *w, int64_t r, float *out)
{
    if (w->q.scheme == ZSE_SCHEME_F32)
        memcpy(out, w->data + (size_t)r * w->p.row_bytes, (size_t)w->q.cols * 4);
    else
        zse_dequantize_row(&w->q, w->data, r, out);
}

/* ---- the threaded job ------------------------------------------------------------------------ */

typedef struct {
    zse_backend *be;
    const zse_weight *w;
    const zse_act *x;
    zse_act *y;
    int64_t tokens;
    zse_cpu_path path;
    const zse_qx *qx;           /* integer schemes on a SIMD path */
    float *scratch;             /* per thread: scratch_per floats */
    int64_t scratch_per, per_thread_rows;
    bool failed;
} mm_job;

static void portable_rows(mm_job *j, int64_t r0, int64_t r1)
{
    int64_t cols = j->w->q.cols;
    float *row = zse_aligned_alloc(64, (size_t)(cols + 32) * sizeof(float));
    if (!row) {
        j->failed = true;
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        unpack_row(j->w, r, row);
        for (int64_t t = 0; t < j->tokens; t++)
            j->y->data[t * j->y->cols + r] = zse_cpu_dot_portable(row, j->x->data + t * j->x->cols, cols);
    }
    free(row);
}

static void simd_rows(void *p, int64_t r0, int64_t r1)
{
    mm_job *j = p;
    if (j->path == ZSE_CPU_PORTABLE) {
        portable_rows(j, r0, r1);
        return;
    }
    /* the range is one thread's share (parallel_for gives each thread one range) */
    float *scratch = j->scratch ? j->scratch + (r0 / j->per_thread_rows) * j->scratch_per : NULL;
    int64_t rb = zse_cpu_row_block(j->w);
    for (int64_t b0 = r0; b0 < r1; b0 += rb) {
        int64_t b1 = b0 + rb < r1 ? b0 + rb : r1;
        if (j->qx && j->path == ZSE_CPU_AVX512)
            zse_cpu_q_rows_avx512(j->w, j->qx, j->y->data, j->y->cols, b0, b1, scratch);
        else if (j->qx)
            zse_cpu_q_rows_avx2(j->w, j->qx, j->y->data, j->y->cols, b0, b1, scratch);
        else if (j->path == ZSE_CPU_AVX512)
            zse_cpu_f_rows_avx512(j->w, j->x->data, j->x->cols, j->tokens, j->y->data, j->y->cols, b0, b1);
        else
            zse_cpu_f_rows_avx2(j->w, j->x->data, j->x->cols, j->tokens, j->y->data, j->y->cols, b0, b1);
    }
}

void zse_cpu_matmul(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t rows, zse_act *y)
{
    if (rows <= 0)
        return;
    int threads = zse_cpu_threads(be);
    mm_job j = {.be = be, .w = w, .x = x, .y = y, .tokens = rows, .path = zse_cpu_current_path()};
    /* int8g (GGUF Q8_0) has AVX2 kernels only; every AVX-512 CPU also runs those */
    if (w->q.scheme == ZSE_SCHEME_Q8G && j.path == ZSE_CPU_AVX512)
        j.path = ZSE_CPU_AVX2;
    j.per_thread_rows = (w->q.rows + threads - 1) / threads;
    zse_qx qx;
    if (j.path != ZSE_CPU_PORTABLE && integer_scheme(w->q.scheme)) {
        if (quantize_acts(be, w, x, rows, j.path, threads, &qx, &j.scratch, &j.scratch_per) != 0) {
            zse_cpu_note_failure(be, "matmul: out of memory for its int8 activations");
            return;
        }
        j.qx = &qx;
    }
    zse_cpu_parallel_for(be, w->q.rows, simd_rows, &j);
    if (j.failed)
        zse_cpu_note_failure(be, "matmul: out of memory for a row buffer");
}
