/* quant: round trips per scheme, padding, plane sizes, half-precision conversions. */
#include "test.h"

#include "quant/quant.h"
#include "util/util.h"

#include <stdint.h>

static uint64_t rng = 88172645463325252ull;

static float gauss(void)
{
    /* xorshift + Box-Muller: deterministic test data */
    double u[2];
    for (int i = 0; i < 2; i++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        u[i] = ((double)(rng >> 11) + 0.5) / 9007199254740992.0;
    }
    return (float)(sqrt(-2 * log(u[0])) * cos(6.283185307179586 * u[1]));
}

/* relative RMS error of dequantize(quantize(w)) */
static double round_trip_error(zse_scheme s, int group, int64_t rows, int64_t cols, bool *bit_exact)
{
    zse_qshape q = {s, rows, cols, group};
    size_t bytes = zse_qshape_bytes(&q);
    CHECK(bytes > 0);
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    float *back = malloc((size_t)cols * sizeof *back);
    uint8_t *packed = calloc(1, bytes);
    for (int64_t i = 0; i < rows * cols; i++)
        w[i] = gauss() * 0.02f;
    zse_quantize_rows(&q, w, packed, 0, rows / 2);
    zse_quantize_rows(&q, w + (rows / 2) * cols, packed, rows / 2, rows); /* disjoint row ranges, as threads do */
    double num = 0, den = 0;
    *bit_exact = true;
    for (int64_t r = 0; r < rows; r++) {
        zse_dequantize_row(&q, packed, r, back);
        for (int64_t c = 0; c < cols; c++) {
            double d = back[c] - w[r * cols + c];
            num += d * d;
            den += (double)w[r * cols + c] * w[r * cols + c];
            if (back[c] != w[r * cols + c])
                *bit_exact = false;
        }
    }
    free(w);
    free(back);
    free(packed);
    return sqrt(num / den);
}

int main(void)
{
    bool exact;
    CHECK(round_trip_error(ZSE_SCHEME_F32, 0, 7, 33, &exact) == 0 && exact);
    CHECK(round_trip_error(ZSE_SCHEME_F16, 0, 7, 33, &exact) < 1e-3);
    CHECK(round_trip_error(ZSE_SCHEME_BF16, 0, 7, 33, &exact) < 5e-3);
    CHECK_MSG(round_trip_error(ZSE_SCHEME_Q8, 0, 9, 300, &exact) < 0.012, "int8");
    const int groups[3] = {32, 64, 128};
    for (int i = 0; i < 3; i++) {
        double e4 = round_trip_error(ZSE_SCHEME_Q4, groups[i], 5, 256 + 40, &exact);
        double e4s = round_trip_error(ZSE_SCHEME_Q4S, groups[i], 5, 256 + 40, &exact);
        double enf = round_trip_error(ZSE_SCHEME_NF4, groups[i], 5, 256 + 40, &exact);
        printf("g%d: int4 %.4f int4s %.4f nf4 %.4f\n", groups[i], e4, e4s, enf);
        CHECK_MSG(e4 < 0.13, "int4 g%d %.4f", groups[i], e4);
        CHECK_MSG(e4s < 0.13, "int4s g%d %.4f", groups[i], e4s);
        CHECK_MSG(enf < 0.13, "nf4 g%d %.4f", groups[i], enf);
        double e8 = round_trip_error(ZSE_SCHEME_Q8G, groups[i], 5, 256 + 40, &exact);
        CHECK_MSG(e8 < 0.008, "int8g g%d %.4f", groups[i], e8);
    }

    /* int8g at group 32 is ggml's Q8_0, byte for byte: d = absmax / 127 stored as f16, codes
     * round(x / d) (half away from zero) from the unrounded d */
    {
        enum { C = 64 };
        float w[C];
        for (int i = 0; i < C; i++)
            w[i] = gauss() * 0.03f;
        w[3] = 0.5f * (0.03f * 2.5f / 127.0f); /* near a half step */
        zse_qshape q8g = {ZSE_SCHEME_Q8G, 1, C, 32};
        uint8_t packed[512] = {0};
        CHECK(zse_qshape_bytes(&q8g) == 64 + 4 && zse_qshape_bytes(&q8g) <= sizeof packed);
        zse_quantize_rows(&q8g, w, packed, 0, 1);
        int bad = 0;
        for (int b = 0; b < 2; b++) {
            float amax = 0;
            for (int i = 0; i < 32; i++)
                amax = fmaxf(amax, fabsf(w[b * 32 + i]));
            float d = amax / 127.0f, id = 1.0f / d;
            uint16_t h;
            memcpy(&h, packed + 64 + 2 * b, 2);
            bad += h != zse_f32_to_f16(d);
            for (int i = 0; i < 32; i++)
                bad += (int8_t)packed[b * 32 + i] != (int8_t)roundf(w[b * 32 + i] * id);
        }
        CHECK_EQ_INT(bad, 0);
        zse_qplanes pl;
        zse_qshape_planes(&q8g, &pl);
        CHECK(pl.row_bytes == 64 && pl.groups == 2 && pl.scales == 64);
        zse_qshape q8g_bad = {ZSE_SCHEME_Q8G, 1, C, 0};
        CHECK(zse_qshape_bytes(&q8g_bad) == 0); /* int8g needs a group size */
        CHECK(zse_scheme_is_grouped(ZSE_SCHEME_Q8G) && !zse_scheme_is_grouped(ZSE_SCHEME_Q8));
        CHECK(zse_scheme_layout(ZSE_SCHEME_Q8G) == ZSE_LAYOUT_Q8_G);
    }

    /* bit-exact bf16 pass-through: a bf16 value survives f32 -> bf16 -> f32 */
    for (uint32_t h = 0; h < 65536; h += 7) {
        float f = zse_bf16_to_f32((uint16_t)h);
        if (f == f)
            CHECK(zse_f32_to_bf16(f) == h);
    }
    /* f16: every finite value round-trips, rounding is to nearest even */
    int f16_bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = zse_f16_to_f32((uint16_t)h);
        if (f == f && zse_f32_to_f16(f) != h)
            f16_bad++;
    }
    CHECK_EQ_INT(f16_bad, 0);
    CHECK(zse_f32_to_f16(65520.0f) == 0x7c00);            /* rounds to inf */
    CHECK(zse_f32_to_f16(1.0f + 1.0f / 2048) == 0x3c00);  /* tie to even */
    CHECK(zse_f16_to_f32(0x0001) == 5.9604644775390625e-08f);
    CHECK(zse_f32_to_f16(1e-9f) == 0);

    /* sizes and planes */
    zse_qshape q = {ZSE_SCHEME_Q4, 3, 200, 128};
    CHECK_EQ_INT(zse_qshape_cols_padded(&q), 256);
    zse_qplanes p;
    zse_qshape_planes(&q, &p);
    CHECK_EQ_INT(p.row_bytes, 128);
    CHECK_EQ_INT(p.groups, 2);
    CHECK_EQ_INT(p.scales, 384);
    CHECK_EQ_INT(p.mins, 384 + 64);
    CHECK_EQ_INT(zse_qshape_bytes(&q), 384 + 64 + 12);
    zse_qshape bad = {ZSE_SCHEME_Q4, 3, 200, 48};
    CHECK(zse_qshape_bytes(&bad) == 0);
    zse_qshape huge = {ZSE_SCHEME_F32, (int64_t)1 << 40, (int64_t)1 << 40, 0};
    CHECK(zse_qshape_bytes(&huge) == 0);
    zse_scheme s;
    CHECK(zse_scheme_from_name("nf4", &s) == 0 && s == ZSE_SCHEME_NF4);
    CHECK(zse_scheme_from_name("int8g", &s) == 0 && s == ZSE_SCHEME_Q8G);
    CHECK(zse_scheme_from_name("int3", &s) == -1);
    return test_main_end();
}
