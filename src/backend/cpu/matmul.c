/* CPU matmul against packed weights: each thread takes a range of output rows, unpacks a
 * row once into f32 and dots it with every token of the batch, so the weight streams from
 * memory once per step whatever the batch size. Each (row, token) result comes from the
 * same code in the same order for any batch, which keeps batching from changing outputs.
 * The dot product and the f16 conversion use AVX2/FMA/F16C when the CPU has them. */
#include "backend/cpu/cpu.h"

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static bool have_avx2(void)
{
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        /* every AVX2 CPU also has F16C (clang 14 cannot test for it by name) */
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
}

static float dot_portable(const float *a, const float *b, int64_t n)
{
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            acc[k] += a[i + k] * b[i + k];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
           s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float r = _mm_cvtss_f32(h);
    for (; i < n; i++)
        r += a[i] * b[i];
    return r;
}

__attribute__((target("avx2,f16c"))) static void f16_row_avx2(const uint16_t *h, int64_t n, float *out)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++)
        out[i] = zse_f16_to_f32(h[i]);
}

/* the row of a packed weight as f32 (cols values) */
static void unpack_row(const zse_weight *w, int64_t r, float *out, bool avx2)
{
    const zse_qshape *q = &w->q;
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    switch (q->scheme) {
    case ZSE_SCHEME_F32:
        memcpy(out, row, (size_t)q->cols * 4);
        return;
    case ZSE_SCHEME_F16:
        if (avx2) {
            f16_row_avx2((const uint16_t *)row, q->cols, out);
        } else {
            for (int64_t i = 0; i < q->cols; i++)
                out[i] = zse_f16_to_f32(((const uint16_t *)row)[i]);
        }
        return;
    case ZSE_SCHEME_BF16:
        for (int64_t i = 0; i < q->cols; i++)
            out[i] = zse_bf16_to_f32(((const uint16_t *)row)[i]);
        return;
    case ZSE_SCHEME_Q8: {
        float s = ((const float *)(w->data + w->p.scales))[r];
        for (int64_t i = 0; i < q->cols; i++)
            out[i] = (float)((const int8_t *)row)[i] * s;
        return;
    }
    default:
        break;
    }
    /* 4-bit: per 32-element chunk, 16 bytes: low nibbles are elements 0..15, high 16..31 */
    const uint16_t *scales = (const uint16_t *)(w->data + w->p.scales) + (size_t)r * (size_t)w->p.groups;
    const uint16_t *mins = q->scheme == ZSE_SCHEME_Q4
                               ? (const uint16_t *)(w->data + w->p.mins) + (size_t)r * (size_t)w->p.groups
                               : NULL;
    int64_t cp = zse_qshape_cols_padded(q);
    float buf[32];
    for (int64_t c0 = 0; c0 < cp; c0 += 32) {
        int64_t g = c0 / q->group_size;
        float s = zse_f16_to_f32(scales[g]);
        const uint8_t *b = row + c0 / 2;
        float lut[16];
        if (q->scheme == ZSE_SCHEME_Q4) {
            float m = zse_f16_to_f32(mins[g]);
            for (int k = 0; k < 16; k++)
                lut[k] = (float)k * s + m;
        } else if (q->scheme == ZSE_SCHEME_Q4S) {
            for (int k = 0; k < 16; k++)
                lut[k] = (float)(k - 8) * s;
        } else {
            for (int k = 0; k < 16; k++)
                lut[k] = zse_nf4_values[k] * s;
        }
        for (int j = 0; j < 16; j++) {
            buf[j] = lut[b[j] & 15];
            buf[j + 16] = lut[b[j] >> 4];
        }
        int64_t n = c0 + 32 <= q->cols ? 32 : q->cols - c0;
        if (n > 0)
            memcpy(out + c0, buf, (size_t)n * sizeof(float));
    }
}

/* ---- integer path: int8 activations × int4/int8 weights (AVX2) ----------------------
 * Each token's row is quantized once per call to int8 in blocks of 32 with one f32 scale
 * per block (and the block's sum, for the asymmetric min term). A 32-element chunk of an
 * int4 row is then one 16-byte load, a mask and a shift, and one maddubs:
 *   Σ w·x = Σ (q·s + m)·(xq·dx) = s·dx·Σ q·xq + m·dx·Σ xq.
 * int8 rows use the sign trick: |w| as unsigned times x with w's sign. */
typedef struct {
    int8_t *q;          /* [tokens][cp] */
    float *d;           /* [tokens][cp/32] block scales */
    float *sum;         /* [tokens][cp/32] d * Σ xq of the block */
    int64_t cp;
} qacts;

static int quantize_acts(const zse_act *x, int64_t tokens, int64_t cols, int64_t cp, qacts *qa)
{
    int64_t nb = cp / 32;
    qa->cp = cp;
    qa->q = zse_aligned_alloc(64, (size_t)(tokens * cp));
    qa->d = zse_malloc((size_t)(tokens * nb) * sizeof(float));
    qa->sum = zse_malloc((size_t)(tokens * nb) * sizeof(float));
    if (!qa->q || !qa->d || !qa->sum)
        return -1;
    for (int64_t t = 0; t < tokens; t++) {
        const float *xr = x->data + t * x->cols;
        for (int64_t b = 0; b < nb; b++) {
            float amax = 0;
            for (int j = 0; j < 32; j++) {
                int64_t c = b * 32 + j;
                if (c < cols)
                    amax = fmaxf(amax, fabsf(xr[c]));
            }
            float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0;
            int isum = 0;
            for (int j = 0; j < 32; j++) {
                int64_t c = b * 32 + j;
                int v = c < cols ? (int)lrintf(xr[c] * inv) : 0;
                qa->q[t * cp + c] = (int8_t)v;
                isum += v;
            }
            qa->d[t * nb + b] = d;
            qa->sum[t * nb + b] = d * (float)isum;
        }
    }
    return 0;
}

static void qacts_free(qacts *qa)
{
    free(qa->q);
    free(qa->d);
    free(qa->sum);
}

__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v)
{
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* the f16 scales and mins of one int4 row as f32, converted once per row rather than once
 * per token (Q4S: min = -8·scale, since w = (q - 8)·scale) */
static void row_scales(const zse_weight *w, int64_t r, float *rs, float *rm)
{
    const uint16_t *scales = (const uint16_t *)(w->data + w->p.scales) + (size_t)r * (size_t)w->p.groups;
    const uint16_t *mins = w->q.scheme == ZSE_SCHEME_Q4
                               ? (const uint16_t *)(w->data + w->p.mins) + (size_t)r * (size_t)w->p.groups
                               : NULL;
    for (int64_t g = 0; g < w->p.groups; g++) {
        rs[g] = zse_f16_to_f32(scales[g]);
        rm[g] = mins ? zse_f16_to_f32(mins[g]) : -8.0f * rs[g];
    }
}

/* Σ over one int4 row (Q4 or Q4S) for one token */
__attribute__((target("avx2,fma"))) static float dot_q4_avx2(const zse_weight *w, int64_t r, const float *rs,
                                                              const float *rm, const qacts *qa, int64_t t)
{
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    int64_t nb = qa->cp / 32, per_group = w->q.group_size / 32;
    const int8_t *xq = qa->q + t * qa->cp;
    const float *xd = qa->d + t * nb, *xs = qa->sum + t * nb;
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float min_acc = 0;
    for (int64_t g = 0; g < w->p.groups; g++) {
        float s = rs[g], m = rm[g];
        for (int64_t k = 0; k < per_group; k++) {
            int64_t b = g * per_group + k;
            __m128i raw = _mm_loadu_si128((const __m128i *)(row + b * 16));
            __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
            __m256i p16 = _mm256_maddubs_epi16(q, x);
            __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s * xd[b]), p, acc);
            min_acc += m * xs[b];
        }
    }
    return hsum8(acc) + min_acc;
}

__attribute__((target("avx2,fma"))) static float dot_q8_avx2(const zse_weight *w, int64_t r, const qacts *qa,
                                                              int64_t t)
{
    const int8_t *row = (const int8_t *)(w->data + (size_t)r * w->p.row_bytes);
    float ws = ((const float *)(w->data + w->p.scales))[r];
    int64_t nb = qa->cp / 32;
    const int8_t *xq = qa->q + t * qa->cp;
    const float *xd = qa->d + t * nb;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(row + b * 32));
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
        __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv));
        __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[b]), p, acc);
    }
    return hsum8(acc) * ws;
}

typedef struct {
    const zse_weight *w;
    const qacts *qa;
    zse_act *y;
    int64_t tokens;
} qmm_ctx;

static void qmatmul_rows(void *p, int64_t r0, int64_t r1)
{
    qmm_ctx *c = p;
    if (c->w->q.scheme == ZSE_SCHEME_Q8) {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t t = 0; t < c->tokens; t++)
                c->y->data[t * c->y->cols + r] = dot_q8_avx2(c->w, r, c->qa, t);
        return;
    }
    float rs[4096], rm[4096]; /* groups per row: cols / 32 at most, cols < 131072 */
    for (int64_t r = r0; r < r1; r++) {
        row_scales(c->w, r, rs, rm);
        for (int64_t t = 0; t < c->tokens; t++)
            c->y->data[t * c->y->cols + r] = dot_q4_avx2(c->w, r, rs, rm, c->qa, t);
    }
}

static bool integer_path(const zse_weight *w)
{
    if (w->q.scheme == ZSE_SCHEME_Q8)
        return true;
    /* the per-row scale buffers in qmatmul_rows hold 4096 groups */
    return (w->q.scheme == ZSE_SCHEME_Q4 || w->q.scheme == ZSE_SCHEME_Q4S) && w->p.groups <= 4096;
}

static int zse_cpu_force_portable = 0;

void zse_cpu_set_portable(bool portable)
{
    zse_cpu_force_portable = portable;
}

typedef struct {
    const zse_weight *w;
    const zse_act *x;
    zse_act *y;
    int64_t tokens;
    bool avx2;
    bool failed;
} mm_ctx;

static void matmul_rows(void *p, int64_t r0, int64_t r1)
{
    mm_ctx *c = p;
    int64_t cols = c->w->q.cols;
    float *row = NULL;
    bool direct = c->w->q.scheme == ZSE_SCHEME_F32;
    if (!direct && !(row = zse_aligned_alloc(64, (size_t)(cols + 32) * sizeof(float)))) {
        c->failed = true;
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        const float *wr = row;
        if (direct)
            wr = (const float *)(c->w->data + (size_t)r * c->w->p.row_bytes);
        else
            unpack_row(c->w, r, row, c->avx2);
        for (int64_t t = 0; t < c->tokens; t++) {
            const float *xt = c->x->data + t * c->x->cols;
            c->y->data[t * c->y->cols + r] = c->avx2 ? dot_avx2(wr, xt, cols) : dot_portable(wr, xt, cols);
        }
    }
    free(row);
}

void zse_cpu_matmul(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t rows, zse_act *y)
{
    bool avx2 = have_avx2() && !zse_cpu_force_portable;
    if (avx2 && integer_path(w)) {
        qacts qa = {0};
        if (quantize_acts(x, rows, w->q.cols, zse_qshape_cols_padded(&w->q), &qa) == 0) {
            qmm_ctx qc = {w, &qa, y, rows};
            zse_cpu_parallel_for(be, w->q.rows, qmatmul_rows, &qc);
            qacts_free(&qa);
            return;
        }
        qacts_free(&qa); /* out of memory for int8 activations: the f32 path below needs less */
    }
    mm_ctx c = {w, x, y, rows, avx2, false};
    zse_cpu_parallel_for(be, w->q.rows, matmul_rows, &c);
    if (c.failed)
        zse_cpu_note_failure(be, "matmul could not allocate a row buffer");
}
