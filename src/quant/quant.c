/* Quantizers and the packed layouts of src/quant/quant.h.
 *
 * Layout of a packed tensor (rows x cols, cols padded to cp = zse_qshape_cols_padded()):
 *   PLAIN   elements row-major, cols not padded: rows * cols * {4,2,2} bytes.
 *   Q8_ROW  qs: int8 [rows][cp] (cp = cols rounded up to 32), then at the next multiple of
 *           64 bytes scales: f32 [rows].  w = q * scale, scale = absmax / 127.
 *   Q4_G    qs: [rows][cp/2] bytes (cp = cols rounded up to the group size); within each
 *           32-element chunk, byte j holds element j in its low nibble and element j + 16
 *           in its high nibble. At the next multiple of 64 bytes: f16 scales
 *           [rows][cp/group]; for Q4 (asymmetric) at the next multiple of 64 bytes after
 *           that: f16 mins [rows][cp/group].
 *             Q4:  w = q * scale + min       (q in 0..15)
 *             Q4S: w = (q - 8) * scale
 *             NF4: w = nf4_values[q] * scale (scale = group absmax)
 *   Q8_G    qs: int8 [rows][cp] (cp = cols rounded up to the group size), then at the next
 *           multiple of 64 bytes f16 scales [rows][cp/group].  w = q * scale, q in
 *           -128..127 (the writer's own quantizer gives -127..127; GGUF Q8_0 blocks copied
 *           as they are may hold -128), scale = group absmax / 127 stored as f16 (codes
 *           from the unrounded scale, as ggml's Q8_0).
 * Padding elements quantize to the value that decodes to zero (or as near as the scheme
 * allows) and are never read by the kernels' callers. */
#include "quant/quant.h"

#include "util/util.h"

#include <math.h>
#include <string.h>

const float zse_nf4_values[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

static const char *const scheme_names[ZSE_SCHEME_COUNT] = {
    "f32", "f16", "bf16", "int8", "int4", "int4s", "nf4", "int8g",
};

const char *zse_scheme_name(zse_scheme s)
{
    return (unsigned)s < ZSE_SCHEME_COUNT ? scheme_names[s] : "unknown";
}

int zse_scheme_from_name(const char *name, zse_scheme *out)
{
    for (int i = 0; i < ZSE_SCHEME_COUNT; i++)
        if (strcmp(name, scheme_names[i]) == 0) {
            *out = (zse_scheme)i;
            return 0;
        }
    return zse_fail("unknown quantization scheme '%s' (use f32, f16, bf16, int8, int8g, int4, int4s or nf4)",
                    name);
}

zse_layout zse_scheme_layout(zse_scheme s)
{
    switch (s) {
    case ZSE_SCHEME_Q8: return ZSE_LAYOUT_Q8_ROW;
    case ZSE_SCHEME_Q4:
    case ZSE_SCHEME_Q4S:
    case ZSE_SCHEME_NF4: return ZSE_LAYOUT_Q4_G;
    case ZSE_SCHEME_Q8G: return ZSE_LAYOUT_Q8_G;
    default: return ZSE_LAYOUT_PLAIN;
    }
}

bool zse_scheme_is_quantized(zse_scheme s)
{
    return s == ZSE_SCHEME_Q8 || s == ZSE_SCHEME_Q4 || s == ZSE_SCHEME_Q4S || s == ZSE_SCHEME_NF4 ||
           s == ZSE_SCHEME_Q8G;
}

bool zse_scheme_is_grouped(zse_scheme s)
{
    return zse_scheme_layout(s) == ZSE_LAYOUT_Q4_G || s == ZSE_SCHEME_Q8G;
}

static size_t align64(size_t x)
{
    return (x + 63) & ~(size_t)63;
}

int64_t zse_qshape_cols_padded(const zse_qshape *q)
{
    if (q->scheme == ZSE_SCHEME_Q8)
        return (q->cols + 31) / 32 * 32;
    if (zse_scheme_is_grouped(q->scheme) && q->group_size > 0)
        return (q->cols + q->group_size - 1) / q->group_size * q->group_size;
    return q->cols;
}

static size_t element_size(zse_scheme s)
{
    return s == ZSE_SCHEME_F32 ? 4 : 2;
}

void zse_qshape_planes(const zse_qshape *q, zse_qplanes *p)
{
    memset(p, 0, sizeof *p);
    size_t rows = (size_t)q->rows, cp = (size_t)zse_qshape_cols_padded(q);
    switch (zse_scheme_layout(q->scheme)) {
    case ZSE_LAYOUT_PLAIN:
        p->row_bytes = cp * element_size(q->scheme);
        break;
    case ZSE_LAYOUT_Q8_ROW:
        p->row_bytes = cp;
        p->scales = align64(rows * cp);
        break;
    case ZSE_LAYOUT_Q4_G:
        p->row_bytes = cp / 2;
        p->groups = (int64_t)(cp / (size_t)q->group_size);
        p->scales = align64(rows * p->row_bytes);
        if (q->scheme == ZSE_SCHEME_Q4)
            p->mins = align64(p->scales + rows * (size_t)p->groups * 2);
        break;
    case ZSE_LAYOUT_Q8_G:
        p->row_bytes = cp;
        p->groups = (int64_t)(cp / (size_t)q->group_size);
        p->scales = align64(rows * cp);
        break;
    }
}

static bool valid_shape(const zse_qshape *q)
{
    if ((unsigned)q->scheme >= ZSE_SCHEME_COUNT)
        return zse_fail("unknown scheme id %d", (int)q->scheme), false;
    if (q->rows <= 0 || q->cols <= 0 || q->rows > ((int64_t)1 << 40) || q->cols > ((int64_t)1 << 40))
        return zse_fail("bad tensor shape %lld x %lld", (long long)q->rows, (long long)q->cols), false;
    if (zse_scheme_is_grouped(q->scheme) && q->group_size != 32 && q->group_size != 64 && q->group_size != 128)
        return zse_fail("group size %d is not supported (use 32, 64 or 128)", q->group_size), false;
    return true;
}

size_t zse_qshape_bytes(const zse_qshape *q)
{
    if (!valid_shape(q))
        return 0;
    size_t rows = (size_t)q->rows, cp = (size_t)zse_qshape_cols_padded(q), n;
    zse_qplanes p;
    zse_qshape_planes(q, &p);
    /* shapes are bounded to 2^40 each; check the product anyway */
    if (!zse_mul_ok(rows, cp, &n) || n > ((size_t)1 << 44)) {
        zse_fail("tensor of %zu x %zu elements is too large", rows, cp);
        return 0;
    }
    switch (zse_scheme_layout(q->scheme)) {
    case ZSE_LAYOUT_PLAIN:
        return n * element_size(q->scheme);
    case ZSE_LAYOUT_Q8_ROW:
        return p.scales + rows * 4;
    case ZSE_LAYOUT_Q4_G:
        if (q->scheme == ZSE_SCHEME_Q4)
            return p.mins + rows * (size_t)p.groups * 2;
        return p.scales + rows * (size_t)p.groups * 2;
    case ZSE_LAYOUT_Q8_G:
        return p.scales + rows * (size_t)p.groups * 2;
    }
    return 0;
}

/* ---- half precision ------------------------------------------------------------ */

uint16_t zse_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t exp = (x >> 23) & 0xff;
    uint32_t man = x & 0x7fffff;
    if (exp == 0xff) /* inf or nan (nan keeps a payload bit) */
        return (uint16_t)(sign | 0x7c00 | (man ? 0x200 | (man >> 13) : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31)
        return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10)
            return (uint16_t)sign;
        man |= 0x800000;
        int shift = 14 - e;
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)e << 10) | (man >> 13);
    uint32_t rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1)))
        half++; /* may carry into the exponent: correct rounding to inf */
    return (uint16_t)half;
}

float zse_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t x;
    if (exp == 0) {
        if (man == 0) {
            x = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400));
            x = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        x = sign | 0x7f800000 | (man << 13);
    } else {
        x = sign | ((exp - 15 + 127) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

uint16_t zse_f32_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000)
        return (uint16_t)((x >> 16) | 0x40); /* quiet nan */
    x += 0x7fff + ((x >> 16) & 1);          /* round to nearest even */
    return (uint16_t)(x >> 16);
}

float zse_bf16_to_f32(uint16_t h)
{
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* ---- quantizers ------------------------------------------------------------------ */

static void quantize_plain_row(const zse_qshape *q, const float *src, uint8_t *dst)
{
    if (q->scheme == ZSE_SCHEME_F32) {
        memcpy(dst, src, (size_t)q->cols * 4);
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    for (int64_t i = 0; i < q->cols; i++)
        d[i] = q->scheme == ZSE_SCHEME_F16 ? zse_f32_to_f16(src[i]) : zse_f32_to_bf16(src[i]);
}

static void quantize_q8_row(const float *src, int64_t cols, int64_t cp, int8_t *qs, float *scale)
{
    float amax = 0;
    for (int64_t i = 0; i < cols; i++)
        amax = fmaxf(amax, fabsf(src[i]));
    float s = amax / 127.0f;
    float inv = s > 0 ? 1.0f / s : 0;
    for (int64_t i = 0; i < cp; i++) {
        float v = i < cols ? src[i] * inv : 0;
        int r = (int)lrintf(v);
        qs[i] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
    }
    *scale = s;
}

/* int8 with one f16 scale per group, computed exactly as ggml's reference Q8_0 quantizer
 * does (d = absmax / 127, codes round(x / d) half away from zero, d stored as f16), so
 * int8g at group 32 of a checkpoint equals llama.cpp's Q8_0 of it byte for byte */
static void quantize_q8g_row(const zse_qshape *q, const zse_qplanes *p, const float *src, uint8_t *base,
                             int64_t row)
{
    int g = q->group_size;
    int8_t *qs = (int8_t *)(base + (size_t)row * p->row_bytes);
    uint16_t *scales = (uint16_t *)(base + p->scales) + (size_t)row * (size_t)p->groups;
    for (int64_t gi = 0; gi < p->groups; gi++) {
        int64_t c0 = gi * g;
        float amax = 0;
        for (int i = 0; i < g && c0 + i < q->cols; i++)
            amax = fmaxf(amax, fabsf(src[c0 + i]));
        float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
        for (int i = 0; i < g; i++) {
            float r = c0 + i < q->cols ? roundf(src[c0 + i] * id) : 0.0f;
            qs[c0 + i] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
        }
        scales[gi] = zse_f32_to_f16(d);
    }
}

static int nearest_nf4(float v)
{
    int best = 0;
    float bd = INFINITY;
    for (int i = 0; i < 16; i++) {
        float d = fabsf(v - zse_nf4_values[i]);
        if (d < bd) {
            bd = d;
            best = i;
        }
    }
    return best;
}

static int clamp4(float v)
{
    int r = (int)lrintf(v);
    return r < 0 ? 0 : r > 15 ? 15 : r;
}

/* Squared error of one asymmetric group encoding. */
static float q4_group_error(const float *x, int n, float scale, float min)
{
    float inv = scale > 0 ? 1.0f / scale : 0, err = 0;
    for (int i = 0; i < n; i++) {
        float d = (float)clamp4((x[i] - min) * inv) * scale + min - x[i];
        err += d * d;
    }
    return err;
}

/* Asymmetric 4-bit: start from the group's range and try a few shrunken ranges; the
 * clip that lowers squared error wins (outliers otherwise waste most of the 16 levels). */
static void choose_q4_params(const float *x, int n, float *scale_out, float *min_out)
{
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        lo = fminf(lo, x[i]);
        hi = fmaxf(hi, x[i]);
    }
    float best_s = (hi - lo) / 15.0f, best_m = lo;
    /* round through f16 so the error is judged on what is stored */
    best_s = zse_f16_to_f32(zse_f32_to_f16(best_s));
    best_m = zse_f16_to_f32(zse_f32_to_f16(best_m));
    float best_e = q4_group_error(x, n, best_s, best_m);
    for (int step = 1; step <= 8; step++) {
        float shrink = 1.0f - 0.02f * (float)step;
        float mid = (lo + hi) * 0.5f, half = (hi - lo) * 0.5f * shrink;
        float s = zse_f16_to_f32(zse_f32_to_f16(2 * half / 15.0f));
        float m = zse_f16_to_f32(zse_f32_to_f16(mid - half));
        float e = q4_group_error(x, n, s, m);
        if (e < best_e) {
            best_e = e;
            best_s = s;
            best_m = m;
        }
    }
    *scale_out = best_s;
    *min_out = best_m;
}

static float q4s_group_error(const float *x, int n, float scale)
{
    float inv = scale > 0 ? 1.0f / scale : 0, err = 0;
    for (int i = 0; i < n; i++) {
        int q = clamp4(x[i] * inv + 8.0f);
        float d = (float)(q - 8) * scale - x[i];
        err += d * d;
    }
    return err;
}

/* Symmetric 4-bit: the largest magnitude maps to -8 (its sign side has one more level);
 * a few smaller scales are tried like the asymmetric case. */
static float choose_q4s_scale(const float *x, int n)
{
    float amax = 0, signed_max = 0;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            signed_max = x[i];
        }
    if (amax == 0)
        return 0;
    float base = signed_max < 0 ? amax / 8.0f : amax / 7.0f;
    float best = zse_f16_to_f32(zse_f32_to_f16(base)), best_e = q4s_group_error(x, n, best);
    for (int step = 1; step <= 8; step++) {
        float s = zse_f16_to_f32(zse_f32_to_f16(base * (1.0f - 0.025f * (float)step)));
        float e = q4s_group_error(x, n, s);
        if (e < best_e) {
            best_e = e;
            best = s;
        }
    }
    return best;
}

zse_q4_params zse_q4_group_params(zse_scheme s, const float *x, int n)
{
    zse_q4_params p = {0, 0};
    if (s == ZSE_SCHEME_Q4) {
        choose_q4_params(x, n, &p.scale, &p.min);
    } else if (s == ZSE_SCHEME_Q4S) {
        p.scale = choose_q4s_scale(x, n);
    } else { /* NF4 */
        float amax = 0;
        for (int i = 0; i < n; i++)
            amax = fmaxf(amax, fabsf(x[i]));
        p.scale = zse_f16_to_f32(zse_f32_to_f16(amax));
    }
    return p;
}

int zse_q4_encode(zse_scheme s, zse_q4_params p, float x)
{
    float inv = p.scale > 0 ? 1.0f / p.scale : 0;
    if (s == ZSE_SCHEME_Q4)
        return clamp4((x - p.min) * inv);
    if (s == ZSE_SCHEME_Q4S)
        return clamp4(x * inv + 8.0f);
    return nearest_nf4(x * inv);
}

float zse_q4_decode(zse_scheme s, zse_q4_params p, int code)
{
    if (s == ZSE_SCHEME_Q4)
        return (float)code * p.scale + p.min;
    if (s == ZSE_SCHEME_Q4S)
        return (float)(code - 8) * p.scale;
    return zse_nf4_values[code] * p.scale;
}

void zse_q4_store_group(const zse_qshape *q, void *packed, int64_t row, int64_t group, const uint8_t *codes,
                        zse_q4_params p)
{
    zse_qplanes pl;
    zse_qshape_planes(q, &pl);
    uint8_t *base = packed;
    uint8_t *qs = base + (size_t)row * pl.row_bytes + (size_t)(group * q->group_size) / 2;
    for (int c = 0; c < q->group_size; c += ZSE_Q4_CHUNK)
        for (int j = 0; j < 16; j++)
            qs[c / 2 + j] = (uint8_t)(codes[c + j] | (codes[c + j + 16] << 4));
    size_t at = (size_t)row * (size_t)pl.groups + (size_t)group;
    ((uint16_t *)(base + pl.scales))[at] = zse_f32_to_f16(p.scale);
    if (q->scheme == ZSE_SCHEME_Q4)
        ((uint16_t *)(base + pl.mins))[at] = zse_f32_to_f16(p.min);
}

static void quantize_4bit_row(const zse_qshape *q, const zse_qplanes *p, const float *src,
                              uint8_t *base, int64_t row)
{
    int g = q->group_size;
    int64_t cols = q->cols;
    float group[128];
    uint8_t codes[128];
    for (int64_t gi = 0; gi < p->groups; gi++) {
        int64_t c0 = gi * g;
        for (int i = 0; i < g; i++)
            group[i] = c0 + i < cols ? src[c0 + i] : 0.0f;
        zse_q4_params prm = zse_q4_group_params(q->scheme, group, g);
        for (int i = 0; i < g; i++)
            codes[i] = (uint8_t)zse_q4_encode(q->scheme, prm, group[i]);
        zse_q4_store_group(q, base, row, gi, codes, prm);
    }
}

void zse_quantize_rows(const zse_qshape *q, const float *src, void *dst, int64_t row0, int64_t row1)
{
    zse_qplanes p;
    zse_qshape_planes(q, &p);
    uint8_t *base = dst;
    int64_t cp = zse_qshape_cols_padded(q);
    for (int64_t r = row0; r < row1; r++) {
        const float *x = src + (size_t)(r - row0) * (size_t)q->cols;
        switch (zse_scheme_layout(q->scheme)) {
        case ZSE_LAYOUT_PLAIN:
            quantize_plain_row(q, x, base + (size_t)r * p.row_bytes);
            break;
        case ZSE_LAYOUT_Q8_ROW:
            quantize_q8_row(x, q->cols, cp, (int8_t *)(base + (size_t)r * p.row_bytes),
                            (float *)(base + p.scales) + r);
            break;
        case ZSE_LAYOUT_Q4_G:
            quantize_4bit_row(q, &p, x, base, r);
            break;
        case ZSE_LAYOUT_Q8_G:
            quantize_q8g_row(q, &p, x, base, r);
            break;
        }
    }
}

void zse_dequantize_row(const zse_qshape *q, const void *packed, int64_t row, float *out)
{
    zse_qplanes p;
    zse_qshape_planes(q, &p);
    const uint8_t *base = packed;
    const uint8_t *rowp = base + (size_t)row * p.row_bytes;
    switch (q->scheme) {
    case ZSE_SCHEME_F32:
        memcpy(out, rowp, (size_t)q->cols * 4);
        return;
    case ZSE_SCHEME_F16:
    case ZSE_SCHEME_BF16: {
        const uint16_t *h = (const uint16_t *)rowp;
        for (int64_t i = 0; i < q->cols; i++)
            out[i] = q->scheme == ZSE_SCHEME_F16 ? zse_f16_to_f32(h[i]) : zse_bf16_to_f32(h[i]);
        return;
    }
    case ZSE_SCHEME_Q8: {
        float s = ((const float *)(base + p.scales))[row];
        const int8_t *qs = (const int8_t *)rowp;
        for (int64_t i = 0; i < q->cols; i++)
            out[i] = (float)qs[i] * s;
        return;
    }
    case ZSE_SCHEME_Q8G: {
        const uint16_t *sc = (const uint16_t *)(base + p.scales) + (size_t)row * (size_t)p.groups;
        const int8_t *qs = (const int8_t *)rowp;
        for (int64_t i = 0; i < q->cols; i++)
            out[i] = (float)qs[i] * zse_f16_to_f32(sc[i / q->group_size]);
        return;
    }
    default:
        break;
    }
    const uint16_t *scales = (const uint16_t *)(base + p.scales) + (size_t)row * (size_t)p.groups;
    const uint16_t *mins = q->scheme == ZSE_SCHEME_Q4
                               ? (const uint16_t *)(base + p.mins) + (size_t)row * (size_t)p.groups
                               : NULL;
    for (int64_t c = 0; c < q->cols; c++) {
        int64_t chunk = c / ZSE_Q4_CHUNK, j = c % ZSE_Q4_CHUNK;
        uint8_t byte = rowp[chunk * 16 + (j & 15)];
        int code = j < 16 ? (byte & 15) : (byte >> 4);
        int64_t gi = c / q->group_size;
        float s = zse_f16_to_f32(scales[gi]);
        if (q->scheme == ZSE_SCHEME_Q4)
            out[c] = (float)code * s + zse_f16_to_f32(mins[gi]);
        else if (q->scheme == ZSE_SCHEME_Q4S)
            out[c] = (float)(code - 8) * s;
        else
            out[c] = zse_nf4_values[code] * s;
    }
}
