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

/* 64 weights of two packed 4-bit chunks as bytes in the interleaved order (see zse_qx):
 * [low nibbles | high nibbles]; NF4 codes mapped to round(127·v) + 128. `half`: only the
 * first chunk exists (an odd last chunk), the second reads as code 0 against zero bytes. */
AVX512 INLINE __m512i unpack_pair(const uint8_t *p, bool half, bool nf4, __m512i lut)
{
    __m256i raw = half ? _mm256_maskz_loadu_epi8(0xFFFF, p) : _mm256_loadu_si256((const __m256i *)p);
    __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
    u = _mm512_and_si512(u, _mm512_set1_epi8(0x0F));
    return nf4 ? _mm512_shuffle_epi8(lut, u) : u;
}

AVX512 INLINE __m512i nf4_lut(void)
{
    int8_t u[16];
    for (int i = 0; i < 16; i++)
        u[i] = (int8_t)(zse_cpu_nf4_i8[i] + 128);
    return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)u));
}

/* 4-bit weights, groups of 64 or 128 (one or two pairs, one activation block): the pairs'
 * dot products accumulate as integers; each group then adds cvt(sum) · S_g·d_g per token. */
AVX512 INLINE void q4_row(const zse_weight *w, const zse_qx *qx, int64_t r, int64_t t0, const int nt,
                          const float *S, const float *M, float *y, int64_t ldy)
{
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    const bool nf4 = w->q.scheme == ZSE_SCHEME_NF4;
    const __m512i lut = nf4 ? nf4_lut() : _mm512_setzero_si512();
    const int64_t ppg = w->q.group_size / 64;
    const int8_t *xq = qx->q + t0 * qx->stride;
    const float *d = qx->d + t0 * qx->nblk;
    __m512 acc[TILE];
    __m512i dot[TILE];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < qx->nblk; g++, d += nt) {
        __m512i u = unpack_pair(row, false, nf4, lut);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++)
            dot[t] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_load_si512(xq + t * 64));
        row += 32;
        xq += nt * 64;
        if (ppg == 2) {
            u = unpack_pair(row, false, nf4, lut);
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++)
                dot[t] = _mm512_dpbusd_epi32(dot[t], u, _mm512_load_si512(xq + t * 64));
            row += 32;
            xq += nt * 64;
        }
        float c[TILE];
        _mm256_storeu_ps(c, _mm256_mul_ps(_mm256_set1_ps(S[g]), _mm256_loadu_ps(d)));
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[t]), _mm512_set1_ps(c[t]), acc[t]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        y[(t0 + t) * ldy + r] = _mm512_reduce_add_ps(acc[t]) + dot_groups(M, qx->gsum + (t0 + t) * qx->groups, qx->groups);
}

/* 4-bit weights, group 32: a pair spans two groups, so each lane takes its block's
 * activation scale from dvec and the pair's two weight scales are spread over the lanes. */
AVX512 INLINE void q4g32_row(const zse_weight *w, const zse_qx *qx, int64_t r, int64_t t0, const int nt,
                             const float *S, const float *M, float *y, int64_t ldy)
{
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    const bool nf4 = w->q.scheme == ZSE_SCHEME_NF4;
    const __m512i lut = nf4 ? nf4_lut() : _mm512_setzero_si512();
    const int64_t nchunks = qx->nblk, npairs = (nchunks + 1) / 2;
    const int8_t *xq = qx->q + t0 * qx->stride;
    const float *dv = qx->dvec + t0 * (qx->stride / 4);
    /* lanes of chunk 0 take S[2p], those of chunk 1 S[2p + 1] */
    const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[TILE];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        acc[t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < npairs; p++, xq += nt * 64, dv += nt * 16) {
        __m512i u = unpack_pair(row + p * 32, 2 * p + 1 == nchunks, nf4, lut);
        __m128 two = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(S + 2 * p)));
        __m512 sv = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(two));
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_load_si512(xq + t * 64));
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_load_ps(dv + t * 16));
            acc[t] = _mm512_fmadd_ps(f, sv, acc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        y[(t0 + t) * ldy + r] = _mm512_reduce_add_ps(acc[t]) + dot_groups(M, qx->gsum + (t0 + t) * qx->groups, qx->groups);
}

/* int8 weights: 64-element activation blocks (one pair; the row's last may be shorter) */
AVX512 INLINE void q8_row(const zse_weight *w, const zse_qx *qx, int64_t r, int64_t t0, const int nt,
                          const float *S, const float *M, float *y, int64_t ldy)
{
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    const int64_t nchunks = qx->cp / 32, npairs = (nchunks + 1) / 2;
    const int8_t *xq = qx->q + t0 * qx->stride;
    const float *d = qx->d + t0 * qx->nblk;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512 acc[TILE];
    __m512i dot[TILE];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) {
        acc[t] = _mm512_setzero_ps();
        dot[t] = _mm512_setzero_si512();
    }
    for (int64_t p = 0; p < npairs; p++, xq += nt * 64) {
        __m512i wv = 2 * p + 1 < nchunks ? _mm512_loadu_si512(row + p * 64)
                                         : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, row + p * 64);
        __m512i u = _mm512_xor_si512(wv, bias); /* w + 128 */
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++)
            dot[t] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_load_si512(xq + t * 64));
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[t]), _mm512_set1_ps(d[t]), acc[t]);
        d += nt;
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
    for (int64_t t0 = 0; t0 < qx->tokens; t0 += TILE) {
        int nt = qx->tokens - t0 < TILE ? (int)(qx->tokens - t0) : TILE;
        for (int64_t r = r0; r < r1; r++) {
            row_scales(w, r, S, M);
            S[G] = 0; /* the missing second chunk of an odd last pair (group 32) */
            if (w->q.scheme == ZSE_SCHEME_Q8) {
                TILE_CASES(q8_row, w, qx, r, t0)
            } else if (w->q.group_size == 32) {
                TILE_CASES(q4g32_row, w, qx, r, t0)
            } else {
                TILE_CASES(q4_row, w, qx, r, t0)
            }
        }
    }
}

/* ---- activation blocks ----------------------------------------------------------------------- */

AVX512 void zse_cpu_quant_block_avx512(const float *x, int64_t n, int64_t ab, int8_t *q, float *d, int *isum)
{
    __m512 mx = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i)));
    }
    float amax = _mm512_reduce_max_ps(mx);
    *d = amax / 127.0f;
    __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < ab; i += 16) {
        __mmask16 k = i >= n ? 0 : n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), inv));
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtsepi32_epi8(v));
    }
    *isum = _mm512_reduce_add_epi32(sum);
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
