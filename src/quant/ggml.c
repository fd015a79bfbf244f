/* GGML block formats: the tensor types a GGUF file stores, decoded to f32 and, where a zse
 * scheme holds the same numbers, copied into that scheme's packed layout code for code.
 *
 * Layouts (ggml's, little-endian, one block after another along a row):
 *   Q4_0  32 elems, 18 bytes: f16 d; 16 bytes of nibbles (byte j: element j low, j+16 high);
 *         w = (q - 8) d                                — zse int4s at group 32, exactly
 *   Q4_1  32 elems, 20 bytes: f16 d, f16 m; nibbles as Q4_0; w = q d + m
 *                                                      — zse int4 at group 32, exactly
 *   Q5_0  32 elems, 22 bytes: f16 d; u32 qh (bit j: fifth bit of element j); nibbles;
 *         w = (q - 16) d
 *   Q5_1  32 elems, 24 bytes: f16 d, f16 m; u32 qh; nibbles; w = q d + m
 *   Q8_0  32 elems, 34 bytes: f16 d; 32 int8; w = q d    — zse int8g at group 32, exactly
 *   Q4_K  256 elems, 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8
 *         sub-blocks of 32, 128 bytes of nibbles (each 32 bytes: sub-block 2i low, 2i+1 high);
 *         w = d sc q - dmin m
 *   Q5_K  256 elems, 176 bytes: as Q4_K plus 32 bytes qh (bit s of byte l: fifth bit of
 *         element l of sub-block s) before the nibbles
 *   Q6_K  256 elems, 210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales, f16 d;
 *         w = d sc (q - 32), sixteen sub-blocks of 16
 * Products are formed in the order ggml's reference code (and the gguf Python package)
 * uses, d·sc first, so the f32 values are the same. */
#include "quant/quant.h"

#include <string.h>

enum { QK = 32, QK_K = 256 };

typedef struct {
    const char *name;
    int64_t block;      /* elements per block; 0 = a type zse cannot read */
    size_t bytes;       /* bytes per block */
} ggml_type_info;

/* ids are ggml's (ggml.h enum ggml_type); names as gguf-py and llama.cpp print them */
static const ggml_type_info TYPES[] = {
    [0] = {"F32", 1, 4},        [1] = {"F16", 1, 2},        [2] = {"Q4_0", QK, 18},
    [3] = {"Q4_1", QK, 20},     [6] = {"Q5_0", QK, 22},     [7] = {"Q5_1", QK, 24},
    [8] = {"Q8_0", QK, 34},     [9] = {"Q8_1", 0, 0},       [10] = {"Q2_K", 0, 0},
    [11] = {"Q3_K", 0, 0},      [12] = {"Q4_K", QK_K, 144}, [13] = {"Q5_K", QK_K, 176},
    [14] = {"Q6_K", QK_K, 210}, [15] = {"Q8_K", 0, 0},      [16] = {"IQ2_XXS", 0, 0},
    [17] = {"IQ2_XS", 0, 0},    [18] = {"IQ3_XXS", 0, 0},   [19] = {"IQ1_S", 0, 0},
    [20] = {"IQ4_NL", 0, 0},    [21] = {"IQ3_S", 0, 0},     [22] = {"IQ2_S", 0, 0},
    [23] = {"IQ4_XS", 0, 0},    [24] = {"I8", 0, 0},        [25] = {"I16", 0, 0},
    [26] = {"I32", 0, 0},       [27] = {"I64", 0, 0},       [28] = {"F64", 0, 0},
    [29] = {"IQ1_M", 0, 0},     [30] = {"BF16", 1, 2},      [34] = {"TQ1_0", 0, 0},
    [35] = {"TQ2_0", 0, 0},     [39] = {"MXFP4", 0, 0},
};
#define N_TYPES (sizeof TYPES / sizeof TYPES[0])

const char *zse_ggml_type_name(uint32_t type)
{
    return type < N_TYPES && TYPES[type].name ? TYPES[type].name : NULL;
}

bool zse_ggml_type_supported(uint32_t type)
{
    return type < N_TYPES && TYPES[type].block > 0;
}

int64_t zse_ggml_block_elems(uint32_t type)
{
    return zse_ggml_type_supported(type) ? TYPES[type].block : 0;
}

size_t zse_ggml_row_bytes(uint32_t type, int64_t n)
{
    if (!zse_ggml_type_supported(type) || n <= 0 || n % TYPES[type].block)
        return 0;
    return (size_t)(n / TYPES[type].block) * TYPES[type].bytes;
}

static float f16_at(const uint8_t *p)
{
    return zse_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

/* sub-block j's 6-bit scale and min (ggml's get_scale_min_k4) */
static void scale_min_k4(int j, const uint8_t *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static void block_q4_0(const uint8_t *b, float *y)
{
    float d = f16_at(b);
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((b[2 + j] & 0xF) - 8) * d;
        y[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
    }
}

static void block_q4_1(const uint8_t *b, float *y)
{
    float d = f16_at(b), m = f16_at(b + 2);
    for (int j = 0; j < 16; j++) {
        y[j] = (float)(b[4 + j] & 0xF) * d + m;
        y[j + 16] = (float)(b[4 + j] >> 4) * d + m;
    }
}

static void block_q5(const uint8_t *b, bool with_min, float *y)
{
    float d = f16_at(b), m = with_min ? f16_at(b + 2) : 0;
    const uint8_t *qhp = b + (with_min ? 4 : 2), *qs = qhp + 4;
    uint32_t qh = (uint32_t)qhp[0] | (uint32_t)qhp[1] << 8 | (uint32_t)qhp[2] << 16 | (uint32_t)qhp[3] << 24;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
        int hi = (qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        if (with_min) {
            y[j] = (float)lo * d + m;
            y[j + 16] = (float)hi * d + m;
        } else {
            y[j] = (float)(lo - 16) * d;
            y[j + 16] = (float)(hi - 16) * d;
        }
    }
}

static void block_q8_0(const uint8_t *b, float *y)
{
    float d = f16_at(b);
    for (int j = 0; j < QK; j++)
        y[j] = (float)(int8_t)b[2 + j] * d;
}

/* Q4_K and Q5_K (qh NULL for Q4_K) */
static void block_q45_k(const uint8_t *b, bool five, float *y)
{
    float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t *scales = b + 4, *qh = five ? b + 16 : NULL, *qs = b + (five ? 48 : 16);
    for (int s = 0; s < 8; s++) {
        int sc, m;
        scale_min_k4(s, scales, &sc, &m);
        float dl = d * (float)sc, ml = dmin * (float)m;
        const uint8_t *q = qs + (s / 2) * 32;
        for (int l = 0; l < 32; l++) {
            int v = s % 2 ? q[l] >> 4 : q[l] & 0xF;
            if (qh)
                v |= ((qh[l] >> s) & 1) << 4;
            y[s * 32 + l] = dl * (float)v - ml;
        }
    }
}

static void block_q6_k(const uint8_t *b, float *y)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = f16_at(b + 208);
    for (int n = 0; n < 2; n++, ql += 64, qh += 32, sc += 8, y += 128)
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * (float)sc[is] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
}

void zse_ggml_dequantize_row(uint32_t type, const void *src, int64_t n, float *out)
{
    const uint8_t *b = src;
    if (type == 0) {
        memcpy(out, b, (size_t)n * 4);
        return;
    }
    if (type == 1 || type == 30) {
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = (uint16_t)(b[2 * i] | b[2 * i + 1] << 8);
            out[i] = type == 1 ? zse_f16_to_f32(h) : zse_bf16_to_f32(h);
        }
        return;
    }
    const int64_t blk = TYPES[type].block;
    for (int64_t i = 0; i < n / blk; i++, b += TYPES[type].bytes, out += blk) {
        switch (type) {
        case 2: block_q4_0(b, out); break;
        case 3: block_q4_1(b, out); break;
        case 6: block_q5(b, false, out); break;
        case 7: block_q5(b, true, out); break;
        case 8: block_q8_0(b, out); break;
        case 12: block_q45_k(b, false, out); break;
        case 13: block_q45_k(b, true, out); break;
        case 14: block_q6_k(b, out); break;
        default: break; /* callers pass supported types only */
        }
    }
}

int zse_ggml_exact_scheme(uint32_t type, int *group_size)
{
    *group_size = 0;
    switch (type) {
    case 0: return ZSE_SCHEME_F32;
    case 1: return ZSE_SCHEME_F16;
    case 30: return ZSE_SCHEME_BF16;
    case 2: *group_size = QK; return ZSE_SCHEME_Q4S;
    case 3: *group_size = QK; return ZSE_SCHEME_Q4;
    case 8: *group_size = QK; return ZSE_SCHEME_Q8G;
    default: return -1;
    }
}

/* Q4_0 → int4s g32: the nibbles are already in zse's chunk order (byte j: element j low,
 * j + 16 high), the scale is the block's d, and both decode (q - 8)·d. Q4_1 → int4 g32:
 * the same nibbles, scale d and min m, both decode q·d + m.
 * Q8_0 → int8g g32: the codes and d as they are. Plain types: the elements. */
void zse_ggml_repack_row(uint32_t type, const void *src, const zse_qshape *q, void *packed, int64_t row)
{
    zse_qplanes p;
    zse_qshape_planes(q, &p);
    const uint8_t *b = src;
    uint8_t *base = packed, *dst = base + (size_t)row * p.row_bytes;
    if (type == 0 || type == 1 || type == 30) {
        memcpy(dst, b, (size_t)q->cols * (type == 0 ? 4 : 2));
        return;
    }
    uint8_t *scales = base + p.scales + (size_t)row * (size_t)p.groups * 2;
    uint8_t *mins = base + p.mins + (size_t)row * (size_t)p.groups * 2;
    for (int64_t g = 0; g < q->cols / QK; g++, b += TYPES[type].bytes) {
        memcpy(scales + 2 * g, b, 2);
        if (type == 2) {
            memcpy(dst + g * 16, b + 2, 16);
        } else if (type == 3) {
            memcpy(mins + 2 * g, b + 2, 2);
            memcpy(dst + g * 16, b + 4, 16);
        } else {
            memcpy(dst + g * QK, b + 2, QK);
        }
    }
}
