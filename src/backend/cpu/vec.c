/* Small vector kernels for the ops around matmul (attention over the KV cache above all):
 * conversions of cached rows to f32, dot, axpy, scale, and LoRA's shrink and expand over a
 * tile of rows that share an adapter. Portable C and AVX2/FMA/F16C
 * versions, chosen by the current kernel path (AVX-512 machines use the AVX2 ones: these
 * loops are short — one head's 64..256 values — and gain nothing from wider vectors). */
#include "backend/cpu/cpu.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

/* ---- portable -------------------------------------------------------------------------- */

static void f16_to_f32_c(const uint16_t *h, int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i++)
        out[i] = zse_f16_to_f32(h[i]);
}

static void i8_to_f32_c(const int8_t *q, float scale, int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i++)
        out[i] = (float)q[i] * scale;
}

float zse_cpu_dot_portable(const float *a, const float *b, int64_t n)
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

static void axpy_c(float *y, float a, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] += a * x[i];
}

static void scale_c(float *y, float a, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] *= a;
}

/* LoRA's shrink over a tile of rows of one adapter: s[t * lds + q] = Σ_c A[q][c]·x[t][c]
 * for q < nq rows of f16 A (lda apart) and t < nt rows of x (ldx apart). Each sum is
 * computed in one order whatever nq and nt are (a row's result is the same in any tile). */
static void lora_shrink_c(const uint16_t *a, int64_t lda, int nq, const float *x, int64_t ldx, int nt, int64_t n,
                          float *s, int64_t lds)
{
    float row[ZSE_CPU_LORA_CHUNK], acc[ZSE_CPU_LORA_TILE][ZSE_CPU_LORA_RANKS][8] = {{{0}}};
    for (int64_t c0 = 0; c0 < n; c0 += ZSE_CPU_LORA_CHUNK) {
        const int64_t m = n - c0 < ZSE_CPU_LORA_CHUNK ? n - c0 : ZSE_CPU_LORA_CHUNK;
        for (int q = 0; q < nq; q++) {
            f16_to_f32_c(a + (size_t)q * (size_t)lda + (size_t)c0, m, row);
            for (int t = 0; t < nt; t++)
                for (int64_t c = 0; c < m; c++)
                    acc[t][q][c % 8] += row[c] * x[(size_t)t * (size_t)ldx + (size_t)(c0 + c)];
        }
    }
    for (int t = 0; t < nt; t++)
        for (int q = 0; q < nq; q++) {
            const float *v = acc[t][q];
            s[(size_t)t * (size_t)lds + (size_t)q] = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
        }
}

/* LoRA's expand over a tile: y[t][o] += scale · Σ_j u[t][j]·Bᵀ[j][o] for o < n, j < rank,
 * t < nt (Bᵀ f16, ldb apart; u ldu apart; y ldy apart); one order per value, as above */
static void lora_expand_c(const uint16_t *bt, int64_t ldb, int rank, const float *u, int64_t ldu, int nt, float scale,
                          float *y, int64_t ldy, int64_t n)
{
    float row[ZSE_CPU_LORA_CHUNK], acc[ZSE_CPU_LORA_TILE][ZSE_CPU_LORA_CHUNK];
    for (int64_t o0 = 0; o0 < n; o0 += ZSE_CPU_LORA_CHUNK) {
        const int64_t m = n - o0 < ZSE_CPU_LORA_CHUNK ? n - o0 : ZSE_CPU_LORA_CHUNK;
        for (int t = 0; t < nt; t++)
            memset(acc[t], 0, (size_t)m * sizeof acc[t][0]);
        for (int j = 0; j < rank; j++) {
            f16_to_f32_c(bt + (size_t)j * (size_t)ldb + (size_t)o0, m, row);
            for (int t = 0; t < nt; t++) {
                const float uj = u[(size_t)t * (size_t)ldu + (size_t)j];
                for (int64_t o = 0; o < m; o++)
                    acc[t][o] += uj * row[o];
            }
        }
        for (int t = 0; t < nt; t++)
            for (int64_t o = 0; o < m; o++)
                y[(size_t)t * (size_t)ldy + (size_t)(o0 + o)] += scale * acc[t][o];
    }
}

/* ---- AVX2 ------------------------------------------------------------------------------ */

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static void f16_to_f32_avx2(const uint16_t *h, int64_t n, float *out)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++)
        out[i] = zse_f16_to_f32(h[i]);
}

AVX2 static void i8_to_f32_avx2(const int8_t *q, float scale, int64_t n, float *out)
{
    __m256 s = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), s));
    }
    for (; i < n; i++)
        out[i] = (float)q[i] * scale;
}

AVX2 static float dot_avx2(const float *a, const float *b, int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m256 s = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float r = _mm_cvtss_f32(h);
    for (; i < n; i++)
        r += a[i] * b[i];
    return r;
}

AVX2 static void axpy_avx2(float *y, float a, const float *x, int64_t n)
{
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] += a * x[i];
}

AVX2 static void scale_avx2(float *y, float a, int64_t n)
{
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] *= a;
}

/* the shrink with each A chunk converted in registers once for every row of the tile: a
 * row's 8 lanes accumulate its columns c ≡ lane (mod 8) in order, the tail (n % 8) is added
 * after the lanes are summed in a fixed order */
_Static_assert(ZSE_CPU_LORA_RANKS == 4, "lora_shrink_avx2 keeps four sums in registers");
_Static_assert(ZSE_CPU_LORA_CHUNK % 8 == 0, "a chunk is whole 8-lane vectors");

AVX2 static void lora_shrink_avx2(const uint16_t *a, int64_t lda, int nq, const float *x, int64_t ldx, int nt,
                                  int64_t n, float *s, int64_t lds)
{
    __m256 acc[ZSE_CPU_LORA_TILE][ZSE_CPU_LORA_RANKS];
    for (int t = 0; t < nt; t++)
        for (int q = 0; q < ZSE_CPU_LORA_RANKS; q++)
            acc[t][q] = _mm256_setzero_ps();
    const int64_t n8 = n / 8 * 8;
    for (int64_t c0 = 0; c0 < n8; c0 += ZSE_CPU_LORA_CHUNK) {
        const int64_t c1 = n8 - c0 < ZSE_CPU_LORA_CHUNK ? n8 : c0 + ZSE_CPU_LORA_CHUNK;
        __m256 w[ZSE_CPU_LORA_CHUNK / 8][ZSE_CPU_LORA_RANKS]; /* the chunk of A, converted once */
        for (int64_t c = c0; c < c1; c += 8)
            for (int q = 0; q < ZSE_CPU_LORA_RANKS; q++) /* rows past nq: zeros, their sums unused */
                w[(c - c0) / 8][q] = q < nq ? _mm256_cvtph_ps(_mm_loadu_si128(
                                                  (const __m128i *)(a + (size_t)q * (size_t)lda + (size_t)c)))
                                            : _mm256_setzero_ps();
        for (int t = 0; t < nt; t++) {
            const float *xt = x + (size_t)t * (size_t)ldx;
            __m256 s0 = acc[t][0], s1 = acc[t][1], s2 = acc[t][2], s3 = acc[t][3];
            for (int64_t c = c0; c < c1; c += 8) {
                const __m256 xv = _mm256_loadu_ps(xt + c);
                const __m256 *wc = w[(c - c0) / 8];
                s0 = _mm256_fmadd_ps(wc[0], xv, s0);
                s1 = _mm256_fmadd_ps(wc[1], xv, s1);
                s2 = _mm256_fmadd_ps(wc[2], xv, s2);
                s3 = _mm256_fmadd_ps(wc[3], xv, s3);
            }
            acc[t][0] = s0, acc[t][1] = s1, acc[t][2] = s2, acc[t][3] = s3;
        }
    }
    for (int t = 0; t < nt; t++)
        for (int q = 0; q < nq; q++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[t][q]), _mm256_extractf128_ps(acc[t][q], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            float r = _mm_cvtss_f32(h);
            const uint16_t *aq = a + (size_t)q * (size_t)lda;
            const float *xt = x + (size_t)t * (size_t)ldx;
            for (int64_t c = n8; c < n; c++)
                r = fmaf(zse_f16_to_f32(aq[c]), xt[c], r);
            s[(size_t)t * (size_t)lds + (size_t)q] = r;
        }
}

/* the expand with each 8 columns of Bᵀ converted once for every row of the tile; a rank's
 * row of Bᵀ is read as one run of up to 256 columns (the sums wait in L1), not 8 columns of
 * every rank at a time, whose rank-many strided streams the prefetchers do not keep fed */
AVX2 static void lora_expand_avx2(const uint16_t *bt, int64_t ldb, int rank, const float *u, int64_t ldu, int nt,
                                  float scale, float *y, int64_t ldy, int64_t n)
{
    const __m256 vs = _mm256_set1_ps(scale);
    __m256 acc[ZSE_CPU_LORA_TILE][ZSE_CPU_LORA_CHUNK / 8];
    for (int64_t o0 = 0; o0 < n; o0 += ZSE_CPU_LORA_CHUNK) {
        const int64_t m = n - o0 < ZSE_CPU_LORA_CHUNK ? n - o0 : ZSE_CPU_LORA_CHUNK, m8 = m / 8;
        for (int t = 0; t < nt; t++)
            for (int64_t v = 0; v < m8; v++)
                acc[t][v] = _mm256_setzero_ps();
        for (int j = 0; j < rank; j++) {
            const uint16_t *bj = bt + (size_t)j * (size_t)ldb + (size_t)o0;
            for (int64_t v = 0; v < m8; v++) {
                const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bj + v * 8)));
                for (int t = 0; t < nt; t++)
                    acc[t][v] = _mm256_fmadd_ps(_mm256_set1_ps(u[(size_t)t * (size_t)ldu + (size_t)j]), b, acc[t][v]);
            }
        }
        for (int t = 0; t < nt; t++) {
            float *yt = y + (size_t)t * (size_t)ldy + (size_t)o0;
            for (int64_t v = 0; v < m8; v++)
                _mm256_storeu_ps(yt + v * 8, _mm256_fmadd_ps(vs, acc[t][v], _mm256_loadu_ps(yt + v * 8)));
            for (int64_t o = m8 * 8; o < m; o++) { /* the tail, a value at a time in the same order */
                float r = 0;
                for (int j = 0; j < rank; j++)
                    r = fmaf(u[(size_t)t * (size_t)ldu + (size_t)j],
                             zse_f16_to_f32(bt[(size_t)j * (size_t)ldb + (size_t)(o0 + o)]), r);
                yt[o] = fmaf(scale, r, yt[o]);
            }
        }
    }
}

static const zse_cpu_vec vec_c = {f16_to_f32_c, i8_to_f32_c, zse_cpu_dot_portable, axpy_c, scale_c,
                                  lora_shrink_c, lora_expand_c};
static const zse_cpu_vec vec_avx2 = {f16_to_f32_avx2, i8_to_f32_avx2, dot_avx2,        axpy_avx2,
                                     scale_avx2,      lora_shrink_avx2, lora_expand_avx2};

const zse_cpu_vec *zse_cpu_vec_ops(void)
{
    return zse_cpu_current_path() == ZSE_CPU_PORTABLE ? &vec_c : &vec_avx2;
}
