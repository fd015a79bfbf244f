/* AVX2/FMA/F16C matmul kernels, compiled with per-function target attributes and called
 * only when zse_cpu_best_path() found AVX2 and FMA.
 *
 * Integer path (see zse_qx in cpu.h; activations in natural order): one 32-element chunk
 * per step. vpmaddubsw multiplies unsigned weight bytes by signed activation bytes and adds
 * pairs to int16 (no overflow: |u·x| ≤ 15·127 for 4-bit codes, ≤ 127·127 for the signed
 * ones below), vpmaddwd by ones widens to int32, and the lanes are scaled by the block's
 * activation scale into a group accumulator that S_g folds into the row's at group end.
 *   Q4, Q4S: u = the nibble (16-byte load, [bytes & 0x0F | bytes >> 4]); M_g carries the
 *            min or -8·s.
 *   NF4:     a byte shuffle gives the signed code round(127·v); int8: the weight byte. Signed
 *            weights use the sign trick: |w| (unsigned) times x with w's sign; M_g = 0.
 * Float path: f32/f16/bf16 widened to f32 (exact), FMA'd with f32 activations. */
#include "backend/cpu/cpu.h"

#include <immintrin.h>
#include <math.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

enum { TILE = ZSE_CPU_TILE_AVX2 };

AVX2 INLINE float hsum8(__m256 v)
{
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

AVX2 INLINE float dot_groups(const float *M, const float *gs, int64_t G)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(M + g), _mm256_loadu_ps(gs + g), acc);
    float s = hsum8(acc);
    for (; g < G; g++)
        s += M[g] * gs[g];
    return s;
}

/* S and M of one row's groups (zse_qx): signed codes (NF4, int8, int8g) use the sign trick.
 * The f16 scales go through F16C, eight at a time and then one by one: the portable
 * zse_f16_to_f32 of every group cost int8g at group 32 (28 groups a 896-wide row) 4x its
 * decode time. Exact conversions and one IEEE division: the same S and M as
 * zse_cpu_row_scales. */
AVX2 INLINE void row_scales(const zse_weight *w, int64_t r, float *S, float *M)
{
    const int64_t G = w->p.groups;
    const zse_scheme sch = w->q.scheme;
    if (sch == ZSE_SCHEME_Q8) {
        zse_cpu_row_scales(w, r, 0.0f, 0.0f, S, M);
        return;
    }
    const uint16_t *sc = (const uint16_t *)(w->data + w->p.scales) + (size_t)r * (size_t)G;
    const uint16_t *mn = (const uint16_t *)(w->data + w->p.mins) + (size_t)r * (size_t)G;
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g))), m;
        if (sch == ZSE_SCHEME_Q4) {
            m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + g)));
        } else if (sch == ZSE_SCHEME_Q4S) {
            m = _mm256_mul_ps(s, _mm256_set1_ps(-8.0f));
        } else if (sch == ZSE_SCHEME_NF4) {
            s = _mm256_div_ps(s, _mm256_set1_ps(127.0f));
            m = _mm256_setzero_ps();
        } else { /* int8g */
            m = _mm256_setzero_ps();
        }
        _mm256_storeu_ps(S + g, s);
        _mm256_storeu_ps(M + g, m);
    }
    for (; g < G; g++) {
        float s = _cvtsh_ss(sc[g]);
        switch (sch) {
        case ZSE_SCHEME_Q4: S[g] = s; M[g] = _cvtsh_ss(mn[g]); break;
        case ZSE_SCHEME_Q4S: S[g] = s; M[g] = -8.0f * s; break;
        case ZSE_SCHEME_NF4: S[g] = s / 127.0f; M[g] = 0.0f; break;
        default: S[g] = s; M[g] = 0.0f; break; /* int8g */
        }
    }
}

/* 32 weights of chunk c as bytes: unsigned codes (Q4, Q4S) or signed ones (NF4, int8, int8g) */
AVX2 INLINE __m256i load_chunk(const zse_weight *w, const uint8_t *row, int64_t c, __m256i nf4_lut)
{
    if (w->q.scheme == ZSE_SCHEME_Q8 || w->q.scheme == ZSE_SCHEME_Q8G)
        return _mm256_loadu_si256((const __m256i *)(row + c * 32));
    __m128i raw = _mm_loadu_si128((const __m128i *)(row + c * 16));
    __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    return w->q.scheme == ZSE_SCHEME_NF4 ? _mm256_shuffle_epi8(nf4_lut, u) : u;
}

/* one row, the `nt` tokens of the tile at t0: each activation block's chunks accumulate
 * as integers, then add cvt(sum) · S_g·d_g per token (int8: d only, S at the end). */
AVX2 INLINE void q_row(const zse_weight *w, const zse_qx *qx, int64_t r, int64_t t0, const int nt,
                       const float *S, const float *M, float *y, int64_t ldy)
{
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    const bool q8 = w->q.scheme == ZSE_SCHEME_Q8,
               sign = q8 || w->q.scheme == ZSE_SCHEME_NF4 || w->q.scheme == ZSE_SCHEME_Q8G;
    const int64_t nchunks = qx->cp / 32, per_block = qx->ab / 32;
    const int8_t *xq = qx->q + t0 * qx->stride;
    const float *d = qx->d + t0 * qx->nblk;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)zse_cpu_nf4_i8));
    __m256 acc[TILE];
    __m256i dot[TILE];
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++)
        acc[t] = _mm256_setzero_ps();
    for (int64_t c = 0, b = 0; c < nchunks; b++, d += nt) {
        int64_t end = c + per_block < nchunks ? c + per_block : nchunks;
        for (int64_t first = c; c < end; c++, xq += nt * 32) {
            __m256i wv = load_chunk(w, row, c, lut);
            __m256i u = sign ? _mm256_sign_epi8(wv, wv) : wv;
#pragma GCC unroll 4
            for (int t = 0; t < nt; t++) {
                __m256i x = _mm256_load_si256((const __m256i *)(xq + t * 32));
                if (sign)
                    x = _mm256_sign_epi8(x, wv);
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones);
                dot[t] = c == first ? p : _mm256_add_epi32(dot[t], p);
            }
        }
        float cs[TILE];
        _mm_storeu_ps(cs, _mm_mul_ps(_mm_set1_ps(q8 ? 1.0f : S[b]), _mm_loadu_ps(d)));
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), _mm256_set1_ps(cs[t]), acc[t]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++) {
        float s = hsum8(acc[t]);
        y[(t0 + t) * ldy + r] = q8 ? S[0] * s : s + dot_groups(M, qx->gsum + (t0 + t) * qx->groups, qx->groups);
    }
}

AVX2 void zse_cpu_q_rows_avx2(const zse_weight *w, const zse_qx *qx, float *y, int64_t ldy, int64_t r0,
                              int64_t r1, float *scratch)
{
    float *S = scratch, *M = scratch + qx->groups + 16;
    for (int64_t t0 = 0; t0 < qx->tokens; t0 += TILE) {
        int nt = qx->tokens - t0 < TILE ? (int)(qx->tokens - t0) : TILE;
        for (int64_t r = r0; r < r1; r++) {
            row_scales(w, r, S, M);
            switch (nt) {
            case 4: q_row(w, qx, r, t0, 4, S, M, y, ldy); break;
            case 3: q_row(w, qx, r, t0, 3, S, M, y, ldy); break;
            case 2: q_row(w, qx, r, t0, 2, S, M, y, ldy); break;
            default: q_row(w, qx, r, t0, 1, S, M, y, ldy); break;
            }
        }
    }
}

/* ---- activation blocks ----------------------------------------------------------------------- */

AVX2 void zse_cpu_quant_block_avx2(const float *x, int64_t n, int64_t ab, int8_t *q, float *d, int *isum)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 mx = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    for (; i < n; i++)
        amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    *d = amax / 127.0f;
    const float inv = amax > 0 ? 127.0f / amax : 0.0f;
    __m256 vinv = _mm256_set1_ps(inv);
    __m256i sum = _mm256_setzero_si256();
    for (i = 0; i < ab; i += 8) {
        __m256 v;
        if (i + 8 <= n) {
            v = _mm256_loadu_ps(x + i);
        } else {
            float tail[8] = {0};
            for (int64_t k = i; k < n; k++)
                tail[k - i] = x[k];
            v = _mm256_loadu_ps(tail);
        }
        /* round half to even (MXCSR default), as the AVX-512 path's vcvtps2dq */
        __m256i iv = _mm256_cvtps_epi32(_mm256_mul_ps(v, vinv));
        sum = _mm256_add_epi32(sum, iv);
        __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(iv), _mm256_extracti128_si256(iv, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packs_epi16(w16, w16));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
    *isum = _mm_cvtsi128_si32(s4);
}

/* ---- float weights ------------------------------------------------------------------------------ */

AVX2 INLINE __m256 load_w(zse_scheme s, const uint8_t *row, int64_t i)
{
    switch (s) {
    case ZSE_SCHEME_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)));
    case ZSE_SCHEME_BF16: {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
    default:
        return _mm256_loadu_ps((const float *)row + i);
    }
}

static float load_w1(zse_scheme s, const uint8_t *row, int64_t i)
{
    switch (s) {
    case ZSE_SCHEME_F16: return zse_f16_to_f32(((const uint16_t *)row)[i]);
    case ZSE_SCHEME_BF16: return zse_bf16_to_f32(((const uint16_t *)row)[i]);
    default: return ((const float *)row)[i];
    }
}

AVX2 INLINE void f_row(const zse_weight *w, const float *x, int64_t ldx, int64_t r, int64_t t0, const int nt,
                       float *y, int64_t ldy)
{
    const uint8_t *row = w->data + (size_t)r * w->p.row_bytes;
    const zse_scheme s = w->q.scheme;
    const int64_t n = w->q.cols;
    __m256 a0[TILE], a1[TILE];
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++)
        a0[t] = a1[t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = load_w(s, row, i), w1 = load_w(s, row, i + 8);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            const float *xt = x + (t0 + t) * ldx + i;
            a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), a0[t]);
            a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + 8), a1[t]);
        }
    }
    const int64_t tail = i;
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++) {
        float sum = hsum8(_mm256_add_ps(a0[t], a1[t]));
        for (int64_t k = tail; k < n; k++)
            sum += load_w1(s, row, k) * x[(t0 + t) * ldx + k];
        y[(t0 + t) * ldy + r] = sum;
    }
}

AVX2 void zse_cpu_f_rows_avx2(const zse_weight *w, const float *x, int64_t ldx, int64_t tokens, float *y,
                              int64_t ldy, int64_t r0, int64_t r1)
{
    for (int64_t t0 = 0; t0 < tokens; t0 += TILE) {
        int nt = tokens - t0 < TILE ? (int)(tokens - t0) : TILE;
        for (int64_t r = r0; r < r1; r++) {
            switch (nt) {
            case 4: f_row(w, x, ldx, r, t0, 4, y, ldy); break;
            case 3: f_row(w, x, ldx, r, t0, 3, y, ldy); break;
            case 2: f_row(w, x, ldx, r, t0, 2, y, ldy); break;
            default: f_row(w, x, ldx, r, t0, 1, y, ldy); break;
            }
        }
    }
}
