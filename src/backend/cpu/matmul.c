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

/* the int8 activation layout a weight's kernels read for `tokens` rows (no buffers yet) */
static void qx_layout(const zse_weight *w, int64_t tokens, zse_cpu_path path, zse_qx *qx)
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
}

/* whether two layouts are the same bytes (one quantization serves both weights) */
static bool qx_same(const zse_qx *a, const zse_qx *b)
{
    return a->tokens == b->tokens && a->cp == b->cp && a->ab == b->ab && a->groups == b->groups &&
           a->tile == b->tile && a->il == b->il;
}

/* the bytes qx's buffers take (q, d, dvec, gsum; each 64-byte aligned) and their offsets */
static size_t qx_bytes(const zse_qx *qx, zse_cpu_path path, size_t offs[4])
{
    bool dvec = path == ZSE_CPU_AVX512 && qx->ab == 32;
    size_t T = (size_t)qx->tokens;
    size_t sizes[4] = {T * (size_t)qx->stride, (T * (size_t)qx->nblk + 8) * 4, dvec ? T * (size_t)qx->stride : 0,
                       T * (size_t)qx->groups * 4};
    size_t total = 0;
    for (int i = 0; i < 4; i++) {
        offs[i] = total;
        total += (sizes[i] + 63) & ~(size_t)63;
    }
    return total;
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

/* ---- the threaded job: every weight of a group, a block of rows at a time --------------------- */

/* one weight of the group, as the threads see it */
typedef struct {
    zse_cpu_mm mm;
    zse_cpu_path path;
    const zse_qx *qx;           /* integer schemes on a SIMD path; else NULL */
    float *out;                 /* where the kernels write: mm.y, or the accumulate temp */
    int64_t ldo;
    int64_t unit_rows, first_unit, units;
} mm_part;

typedef struct {
    mm_part *parts;
    int n_parts;
    const int64_t *split;       /* thread i takes units [split[i], split[i + 1]) */
    float *scratch;             /* per thread: scratch_per floats */
    int64_t scratch_per;
    bool failed;
} mm_job;

static void portable_rows(mm_job *j, const mm_part *p, int64_t r0, int64_t r1)
{
    int64_t cols = p->mm.w->q.cols;
    float *row = zse_aligned_alloc(64, (size_t)(cols + 32) * sizeof(float));
    if (!row) {
        j->failed = true;
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        unpack_row(p->mm.w, r, row);
        for (int64_t t = 0; t < p->mm.x.rows; t++)
            p->out[t * p->ldo + r] = zse_cpu_dot_portable(row, p->mm.x.data + t * p->mm.x.cols, cols);
    }
    free(row);
}

/* rows [r0, r1) of part p's outputs for every token, then its epilogue: + bias, and the
 * residual add where it accumulates — the same additions in the same order as add_bias and
 * add after a plain matmul, so the numbers are those of the ops one by one */
static void part_rows(mm_job *j, const mm_part *p, int64_t r0, int64_t r1, float *scratch)
{
    const zse_cpu_mm *mm = &p->mm;
    if (p->path == ZSE_CPU_PORTABLE)
        portable_rows(j, p, r0, r1);
    else if (p->qx && p->path == ZSE_CPU_AVX512)
        zse_cpu_q_rows_avx512(mm->w, p->qx, p->out, p->ldo, r0, r1, scratch);
    else if (p->qx)
        zse_cpu_q_rows_avx2(mm->w, p->qx, p->out, p->ldo, r0, r1, scratch);
    else if (p->path == ZSE_CPU_AVX512)
        zse_cpu_f_rows_avx512(mm->w, mm->x.data, mm->x.cols, mm->x.rows, p->out, p->ldo, r0, r1);
    else
        zse_cpu_f_rows_avx2(mm->w, mm->x.data, mm->x.cols, mm->x.rows, p->out, p->ldo, r0, r1);
    if (!mm->bias && !mm->accumulate)
        return;
    const float *b = mm->bias ? (const float *)mm->bias->data : NULL;
    for (int64_t t = 0; t < mm->x.rows; t++) {
        float *o = p->out + t * p->ldo, *y = mm->y.data + t * mm->y.cols;
        for (int64_t r = r0; r < r1; r++) {
            float v = b ? o[r] + b[r] : o[r];
            y[r] = mm->accumulate ? y[r] + v : v;
        }
    }
}

static void thread_units(mm_job *j, int64_t u0, int64_t u1, float *scratch)
{
    int k = 0;
    while (k < j->n_parts && j->parts[k].first_unit + j->parts[k].units <= u0)
        k++;
    for (int64_t u = u0; u < u1 && k < j->n_parts; u++) {
        while (u >= j->parts[k].first_unit + j->parts[k].units)
            k++;
        const mm_part *p = &j->parts[k];
        const int64_t r0 = (u - p->first_unit) * p->unit_rows, rows = p->mm.w->q.rows;
        part_rows(j, p, r0, r0 + p->unit_rows < rows ? r0 + p->unit_rows : rows, scratch);
    }
}

/* Cuts the units into `threads` contiguous ranges of about equal work, work being a unit's
 * weight bytes plus its multiply-adds (rows x cols x (tokens + 2)): segments of a grouped
 * matmul differ in tokens (an expert routed 3 tokens, another 20), so an even count of
 * units would leave one thread waiting on the other. */
static void split_units(const mm_part *parts, int n_parts, int64_t units, int threads, int64_t *split)
{
    double total = 0;
    for (int k = 0; k < n_parts; k++)
        total += (double)parts[k].mm.w->q.rows * (double)parts[k].mm.w->q.cols * (double)(parts[k].mm.x.rows + 2);
    split[0] = 0;
    int i = 1, k = 0;
    double done = 0;
    for (int64_t u = 0; u < units && i < threads; u++) {
        while (u >= parts[k].first_unit + parts[k].units)
            k++;
        const mm_part *p = &parts[k];
        const int64_t r0 = (u - p->first_unit) * p->unit_rows, rows = p->mm.w->q.rows;
        const int64_t n = (r0 + p->unit_rows < rows ? p->unit_rows : rows - r0);
        done += (double)n * (double)p->mm.w->q.cols * (double)(p->mm.x.rows + 2);
        while (i < threads && done >= total * i / threads)
            split[i++] = u + 1;
    }
    while (i <= threads)
        split[i++] = units;
}

static void group_units(void *arg, int64_t i0, int64_t i1)
{
    mm_job *j = arg;
    for (int64_t i = i0; i < i1; i++)
        thread_units(j, j->split[i], j->split[i + 1], j->scratch ? j->scratch + i * j->scratch_per : NULL);
}

/* ---- quantizing every distinct x of the group in one pass -------------------------------------- */

/* one distinct x of a group (weights of one activation layout share it): its int8 layout and
 * buffers, and the tokens [first, first + qx.tokens) it takes of the quantization pass */
typedef struct {
    zse_qx qx;
    quant_job job;
    int64_t first;
} qx_slot;

typedef struct {
    qx_slot *slots;
    int n;
} quant_pass;

static void quantize_pass(void *arg, int64_t t0, int64_t t1)
{
    quant_pass *qp = arg;
    int i = 0;
    for (int64_t t = t0; t < t1; t++) {
        while (i + 1 < qp->n && t >= qp->slots[i + 1].first)
            i++;
        const int64_t local = t - qp->slots[i].first;
        quantize_tokens(&qp->slots[i].job, local, local + 1);
    }
}

/* the slot of a distinct x that already quantizes p's activations, or NULL */
static qx_slot *find_slot(qx_slot *slots, int n, const mm_part *p, const zse_qx *want)
{
    const bool q8 = p->mm.w->q.scheme == ZSE_SCHEME_Q8;
    for (int k = 0; k < n; k++)
        if (slots[k].job.x->data == p->mm.x.data && slots[k].job.cols == p->mm.w->q.cols && slots[k].job.q8 == q8 &&
            slots[k].job.path == p->path && qx_same(&slots[k].qx, want))
            return &slots[k];
    return NULL;
}

/* rows a unit of part p takes: a row block that stays in L2, smaller where the weight would
 * otherwise be split unevenly over the threads (4 units a thread at least) */
static int64_t unit_rows_of(const zse_weight *w, int threads)
{
    int64_t rb = zse_cpu_row_block(w), even = (w->q.rows + (int64_t)threads * 4 - 1) / ((int64_t)threads * 4);
    even = even < 4 ? 4 : even;
    return rb < even ? rb : even;
}

/* a group's bookkeeping lives on the stack up to a decode step's experts (top 8, gate and
 * up: 16 weights) and a machine's threads; past that, one allocation */
#define GROUP_ON_STACK 16
#define THREADS_ON_STACK 64

/* The quantized activations, the accumulating weights' temps and the threads' scratch all
 * live in the backend's grow-only workspace: fresh large allocations at every one of a
 * step's calls would fault their pages in every time. */
void zse_cpu_matmul_group(zse_backend *be, const zse_cpu_mm *mm, int n)
{
    if (n < 1)
        return;
    const int threads = zse_cpu_threads(be);
    mm_part parts_s[GROUP_ON_STACK];
    qx_slot slots_s[GROUP_ON_STACK];
    int64_t split_s[THREADS_ON_STACK + 1];
    mm_part *parts = parts_s;
    qx_slot *slots = slots_s;
    int64_t *split = split_s;
    void *heap = NULL;
    if (n > GROUP_ON_STACK || threads > THREADS_ON_STACK) {
        heap = zse_calloc(1, (size_t)n * (sizeof *parts + sizeof *slots) + ((size_t)threads + 1) * sizeof *split);
        if (!heap) {
            zse_cpu_note_failure(be, "matmul: out of memory");
            return;
        }
        parts = heap;
        slots = (qx_slot *)(parts + n);
        split = (int64_t *)(slots + n);
    }
    /* the layouts: one quantization per distinct (x, layout) */
    int n_slots = 0;
    int64_t scratch_per = 0, units = 0, qtokens = 0;
    size_t bytes = 0;
    for (int i = 0; i < n; i++) {
        mm_part *p = &parts[i];
        *p = (mm_part){.mm = mm[i], .path = zse_cpu_current_path()};
        /* int8g (GGUF Q8_0) has AVX2 kernels only; every AVX-512 CPU also runs those */
        if (mm[i].w->q.scheme == ZSE_SCHEME_Q8G && p->path == ZSE_CPU_AVX512)
            p->path = ZSE_CPU_AVX2;
        p->unit_rows = unit_rows_of(mm[i].w, threads);
        p->first_unit = units;
        p->units = (mm[i].w->q.rows + p->unit_rows - 1) / p->unit_rows;
        units += p->units;
        if (p->path == ZSE_CPU_PORTABLE || !integer_scheme(mm[i].w->q.scheme) || mm[i].x.rows <= 0)
            continue;
        zse_qx want;
        qx_layout(mm[i].w, mm[i].x.rows, p->path, &want);
        qx_slot *slot = find_slot(slots, n_slots, p, &want);
        if (!slot) {
            slot = &slots[n_slots++];
            slot->qx = want;
            slot->job = (quant_job){&p->mm.x, mm[i].w->q.cols, mm[i].w->q.scheme == ZSE_SCHEME_Q8, p->path, &slot->qx};
            slot->first = qtokens;
            qtokens += want.tokens;
            size_t offs[4];
            bytes += qx_bytes(&want, p->path, offs);
        }
        p->qx = &slot->qx; /* its buffers are placed below */
        int64_t per = 2 * (slot->qx.groups + 16);
        scratch_per = per > scratch_per ? per : scratch_per;
    }
    /* the accumulating parts' temps, then the threads' scratch */
    size_t acc_at = bytes;
    for (int i = 0; i < n; i++)
        if (mm[i].accumulate)
            bytes += ((size_t)mm[i].x.rows * (size_t)mm[i].w->q.rows * sizeof(float) + 63) & ~(size_t)63;
    size_t scratch_at = bytes;
    bytes += (size_t)threads * (size_t)scratch_per * sizeof(float);
    uint8_t *ws = zse_cpu_workspace(be, bytes ? bytes : 64);
    if (!ws) {
        zse_cpu_note_failure(be, "matmul: out of memory for its int8 activations");
        free(heap);
        return;
    }
    size_t at = 0;
    for (int k = 0; k < n_slots; k++) {
        zse_qx *qx = &slots[k].qx;
        size_t offs[4], total = qx_bytes(qx, slots[k].job.path, offs);
        qx->q = (int8_t *)(ws + at + offs[0]);
        qx->d = (float *)(ws + at + offs[1]);
        qx->dvec = slots[k].job.path == ZSE_CPU_AVX512 && qx->ab == 32 ? (float *)(ws + at + offs[2]) : NULL;
        qx->gsum = (float *)(ws + at + offs[3]);
        /* the padding past cp (an odd last 32-chunk) stays zero; the spare d entries are
         * read (and ignored) by a short tile's vector load */
        memset(ws + at, 0, offs[2]);
        at += total;
    }
    for (int i = 0; i < n; i++) {
        mm_part *p = &parts[i];
        if (mm[i].accumulate) {
            p->out = (float *)(ws + acc_at);
            p->ldo = mm[i].w->q.rows;
            acc_at += ((size_t)mm[i].x.rows * (size_t)mm[i].w->q.rows * sizeof(float) + 63) & ~(size_t)63;
        } else {
            p->out = mm[i].y.data;
            p->ldo = mm[i].y.cols;
        }
    }
    if (qtokens > 0) {
        quant_pass qp = {slots, n_slots};
        zse_cpu_parallel_for(be, qtokens, quantize_pass, &qp);
    }
    split_units(parts, n, units, threads, split);
    mm_job j = {parts, n, split, scratch_per ? (float *)(ws + scratch_at) : NULL, scratch_per, false};
    zse_cpu_parallel_for(be, threads, group_units, &j);
    if (j.failed)
        zse_cpu_note_failure(be, "matmul: out of memory for a row buffer");
    free(heap);
}

void zse_cpu_matmul(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t rows, zse_act *y)
{
    if (rows <= 0)
        return;
    const zse_cpu_mm mm = {w, NULL, {x->data, rows, x->cols}, {y->data, rows, y->cols}, false};
    zse_cpu_matmul_group(be, &mm, 1);
}

/* backend.h's matmul_multi: the weights over one x as one group (one quantization of x, one
 * pass over their rows), bias and residual add in the same pass */
void zse_cpu_matmul_multi(zse_backend *be, const zse_act *x, int64_t rows, const zse_matmul_out *outs, int n_outs,
                          bool accumulate)
{
    if (rows <= 0)
        return;
    if (n_outs < 1 || n_outs > 3) {
        zse_cpu_note_failure(be, "matmul_multi: 1 to 3 weights a call");
        return;
    }
    zse_cpu_mm mm[3];
    for (int i = 0; i < n_outs; i++) {
        const zse_weight *w = outs[i].w;
        if (w->q.cols > x->cols || w->q.rows > outs[i].y->cols || (outs[i].bias && outs[i].bias->q.rows * outs[i].bias->q.cols < w->q.rows)) {
            zse_cpu_note_failure(be, "matmul_multi: a weight's shape does not match x, y or its bias");
            return;
        }
        mm[i] = (zse_cpu_mm){w, outs[i].bias, {x->data, rows, x->cols}, {outs[i].y->data, rows, outs[i].y->cols},
                             accumulate};
    }
    zse_cpu_matmul_group(be, mm, n_outs);
}
