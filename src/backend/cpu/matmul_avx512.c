/* AVX-512 matmul kernels (F, BW, VL, DQ and VNNI), compiled with per-function target
 * attributes and called only when zse_cpu_best_path() found those features.
 *
 * Integer path (4-bit and int8 weights × int8 activations, see zse_qx in cpu.h): one
 * vpdpbusd multiplies 64 weight bytes (unsigned) by 64 activation bytes (signed) and sums
 * each 4 into a 32-bit lane; the lanes are converted to f32 and scaled by their block's
 * activation scale into a group accumulator, which the weight scale S_g folds into the row's
 * accumulator at the end of each group. The constant part of each weight (M_g: the
 * asymmetric min, Q4S's -8·s, and the +128 that makes signed codes unsigned) meets the
 * activations only through their block sums, once per group.
 *   4-bit: a 32-byte load is two chunks; [bytes & 0x0F | bytes >> 4] is their 64 elements in
 *          the interleaved order the activations were stored in. NF4 codes go through a
 *          byte shuffle to round(127·v) + 128.
 *   int8:  weight bytes xor 0x80 = w + 128, natural order.
 * Float path: f32/f16/bf16 weights widened to f32 (exact) and FMA'd with f32 activations. */
#include "backend/cpu/cpu.h"

#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

enum { TILE = ZSE_CPU_TILE_AVX512 };

AVX512 INLINE float dot_groups(const float *M, const float *gs, int64_t G)
{
    __m512 acc = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(M + g), _mm512_loadu_ps(gs + g), acc);
    if (g < G) {
        __mmask16 k = (__mmask16)((1u << (G - g)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, M + g), _mm512_maskz_loadu_ps(k, gs + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* S and M of one row's groups (zse_qx): codes offset by +128 for NF4 and int8 */
AVX512 INLINE void row_scales(const zse_weight *w, int64_t r, float *S, float *M)
{
    if (w->q.scheme == ZSE_SCHEME_Q8) {
        zse_cpu_row_scales(w, r, 128.0f, 128.0f, S, M);
        return;
    }
    const int64_t G = w->p.groups;
    const uint16_t *sc = (const uint16_t *)(w->data + w->p.scales) + (size_t)r * (size_t)G;
    const uint16_t *mn = (const uint16_t *)(w->data + w->p.mins) + (size_t)r * (size_t)G;
    for (int64_t g = 0; g < G; g += 16) {
        __mmask16 k = G - g >= 16 ? 0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sc + g)), m;
        if (w->q.scheme == ZSE_SCHEME_Q4) {
            m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + g));
        } else if (w->q.scheme == ZSE_SCHEME_Q4S) {
            m = _mm512_mul_ps(s, _mm512_set1_ps(-8.0f));
        } else { /* NF4: u = round(127 v) + 128 */
            s = _mm512_div_ps(s, _mm512_set1_ps(127.0f));
            m = _mm512_mul_ps(s, _mm512_set1_ps(-128.0f));
        }
        _mm512_mask_storeu_ps(S + g, k, s);
        _mm512_mask_storeu_ps(M + g, k, m);
    }
}

/* one row, the `nt` tokens of the tile at t0: the 4-bit schemes. Each group's first pair
 * starts its accumulator with a multiply, so nothing needs zeroing between groups. */
AVX512 INLINE void q4_row(const zse_weight *w, const zse_qx *qx, int64_t r, int64_t t0, const int nt,
                          const float *S, const float *M, float *y, int64_t ldy)
{
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    const bool nf4 = w->q.scheme == ZSE_SCHEME_NF4;
    const int64_t nchunks = qx->nb, npairs = (nchunks + 1) / 2;
    const int64_t ppg = w->q.group_size / 64; /* pairs per group; 0: group 32, two per pair */
    const int8_t *xq = qx->q + t0 * qx->stride;
    const float *dv = qx->dvec + t0 * (qx->stride / 4);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i lut = _mm512_setzero_si512();
    if (nf4) {
        int8_t u[16];
        for (int i = 0; i < 16; i++)
            u[i] = (int8_t)(zse_cpu_nf4_i8[i] + 128);
        lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)u));
    }
    /* for group 32: lanes of chunk 0 take S[2p], those of chunk 1 S[2p + 1] */
    const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[TILE], gacc[TILE];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        acc[t] = gacc[t] = _mm512_setzero_ps();
    int64_t in_group = 0, g = 0;
    for (int64_t p = 0; p < npairs; p++, xq += nt * 64, dv += nt * 16) {
        __m256i raw = 2 * p + 1 < nchunks ? _mm256_loadu_si256((const __m256i *)(row + p * 32))
                                          : _mm256_maskz_loadu_epi8(0xFFFF, row + p * 32);
        __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
        u = _mm512_and_si512(u, low4);
        if (nf4)
            u = _mm512_shuffle_epi8(lut, u);
        if (in_group == 0) {
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_load_si512(xq + t * 64));
                gacc[t] = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_load_ps(dv + t * 16));
            }
        } else {
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_load_si512(xq + t * 64));
                gacc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_load_ps(dv + t * 16), gacc[t]);
            }
        }
        __m512 sv;
        if (ppg == 0) {
            __m128 two = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(S + 2 * p)));
            sv = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(two));
        } else if (++in_group == ppg) {
            sv = _mm512_set1_ps(S[g++]);
            in_group = 0;
        } else {
            continue;
        }
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++)
            acc[t] = _mm512_fmadd_ps(gacc[t], sv, acc[t]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        y[(t0 + t) * ldy + r] = _mm512_reduce_add_ps(acc[t]) + dot_groups(M, qx->gsum + (t0 + t) * qx->groups, qx->groups);
}

/* one row, the `nt` tokens of the tile at t0: int8 weights */
AVX512 INLINE void q8_row(const zse_weight *w, const zse_qx *qx, int64_t r, int64_t t0, const int nt,
                          const float *S, const float *M, float *y, int64_t ldy)
{
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    const int64_t nchunks = qx->nb, npairs = (nchunks + 1) / 2;
    const int8_t *xq = qx->q + t0 * qx->stride;
    const float *dv = qx->dvec + t0 * (qx->stride / 4);
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512 acc[TILE];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        acc[t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < npairs; p++, xq += nt * 64, dv += nt * 16) {
        __m512i wv = 2 * p + 1 < nchunks ? _mm512_loadu_si512(row + p * 64)
                                         : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, row + p * 64);
        __m512i u = _mm512_xor_si512(wv, bias);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_load_si512(xq + t * 64));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_load_ps(dv + t * 16), acc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        y[(t0 + t) * ldy + r] = S[0] * _mm512_reduce_add_ps(acc[t]) + M[0] * qx->gsum[t0 + t];
}

#define TILE_CASES(fn, ...)                     \
    switch (nt) {                               \
    case 8: fn(__VA_ARGS__, 8, S, M, y, ldy); break; \
    case 7: fn(__VA_ARGS__, 7, S, M, y, ldy); break; \
    case 6: fn(__VA_ARGS__, 6, S, M, y, ldy); break; \
    case 5: fn(__VA_ARGS__, 5, S, M, y, ldy); break; \
    case 4: fn(__VA_ARGS__, 4, S, M, y, ldy); break; \
    case 3: fn(__VA_ARGS__, 3, S, M, y, ldy); break; \
    case 2: fn(__VA_ARGS__, 2, S, M, y, ldy); break; \
    default: fn(__VA_ARGS__, 1, S, M, y, ldy); break; \
    }

AVX512 void zse_cpu_q_rows_avx512(const zse_weight *w, const zse_qx *qx, float *y, int64_t ldy, int64_t r0,
                                  int64_t r1, float *scratch)
{
    int64_t G = qx->groups;
    float *S = scratch, *M = scratch + G + 16;
    bool q8 = w->q.scheme == ZSE_SCHEME_Q8;
    for (int64_t t0 = 0; t0 < qx->tokens; t0 += TILE) {
        int nt = qx->tokens - t0 < TILE ? (int)(qx->tokens - t0) : TILE;
        for (int64_t r = r0; r < r1; r++) {
            row_scales(w, r, S, M);
            S[G] = 0; /* the missing second chunk of an odd last pair (group 32) */
            if (q8) {
                TILE_CASES(q8_row, w, qx, r, t0)
            } else {
                TILE_CASES(q4_row, w, qx, r, t0)
            }
        }
    }
}

/* ---- float weights ------------------------------------------------------------------------------ */

/* 16 weights of a row from element i as f32; `k` masks a tail */
AVX512 INLINE __m512 load_w(zse_scheme s, const uint8_t *row, int64_t i, __mmask16 k)
{
    switch (s) {
    case ZSE_SCHEME_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)row + i));
    case ZSE_SCHEME_BF16: {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, (const uint16_t *)row + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    }
    default:
        return _mm512_maskz_loadu_ps(k, (const float *)row + i);
    }
}

AVX512 INLINE void f_row(const zse_weight *w, const float *x, int64_t ldx, int64_t r, int64_t t0, const int nt,
                         float *y, int64_t ldy)
{
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    const zse_scheme s = w->q.scheme;
    const int64_t n = w->q.cols;
    __m512 a0[TILE], a1[TILE];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        a0[t] = a1[t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 w0 = load_w(s, row, i, 0xFFFF), w1 = load_w(s, row, i + 16, 0xFFFF);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            const float *xt = x + (t0 + t) * ldx + i;
            a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt), a0[t]);
            a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt + 16), a1[t]);
        }
    }
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 w0 = load_w(s, row, i, k);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++)
            a0[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(k, x + (t0 + t) * ldx + i), a0[t]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        y[(t0 + t) * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
}

AVX512 void zse_cpu_f_rows_avx512(const zse_weight *w, const float *x, int64_t ldx, int64_t tokens, float *y,
                                  int64_t ldy, int64_t r0, int64_t r1)
{
    for (int64_t t0 = 0; t0 < tokens; t0 += TILE) {
        int nt = tokens - t0 < TILE ? (int)(tokens - t0) : TILE;
        for (int64_t r = r0; r < r1; r++) {
            switch (nt) {
            case 8: f_row(w, x, ldx, r, t0, 8, y, ldy); break;
            case 7: f_row(w, x, ldx, r, t0, 7, y, ldy); break;
            case 6: f_row(w, x, ldx, r, t0, 6, y, ldy); break;
            case 5: f_row(w, x, ldx, r, t0, 5, y, ldy); break;
            case 4: f_row(w, x, ldx, r, t0, 4, y, ldy); break;
            case 3: f_row(w, x, ldx, r, t0, 3, y, ldy); break;
            case 2: f_row(w, x, ldx, r, t0, 2, y, ldy); break;
            default: f_row(w, x, ldx, r, t0, 1, y, ldy); break;
            }
        }
    }
}
