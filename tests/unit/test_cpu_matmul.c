/* CPU matmul: every scheme, odd shapes and batch sizes, against dequantize + a double
 * dot product; the AVX2 integer path and the portable path both; batch invariance. */
#include "test.h"

#include "backend/cpu/cpu.h"

static uint32_t rng = 2463534242u;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return (float)rng / 4294967296.0f - 0.5f;
}

static double rel_err(zse_backend *be, zse_scheme s, int group, int64_t rows, int64_t cols, int64_t tokens,
                      bool *invariant)
{
    zse_qshape q = {s, rows, cols, group};
    size_t bytes = zse_qshape_bytes(&q);
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    uint8_t *packed = zse_aligned_alloc(64, bytes);
    memset(packed, 0, bytes);
    for (int64_t i = 0; i < rows * cols; i++)
        w[i] = frand();
    zse_quantize_rows(&q, w, packed, 0, rows);
    zse_tensor_info ti = {.name = "w", .q = q, .layout = zse_scheme_layout(s), .size = bytes, .data = packed};
    zse_weight *wt = be->ops->weight_load(be, &ti);
    zse_act *x = be->ops->act_new(be, tokens, cols), *y = be->ops->act_new(be, tokens, rows);
    zse_act *y1 = be->ops->act_new(be, 1, rows);
    for (int64_t i = 0; i < tokens * cols; i++)
        x->data[i] = frand() * 2;
    be->ops->matmul(be, wt, x, tokens, y);
    /* the last token alone gives bit-identical results: batching must not change outputs */
    zse_act *xl = be->ops->act_new(be, 1, cols);
    memcpy(xl->data, x->data + (tokens - 1) * cols, (size_t)cols * sizeof(float));
    be->ops->matmul(be, wt, xl, 1, y1);
    *invariant = memcmp(y1->data, y->data + (tokens - 1) * rows, (size_t)rows * sizeof(float)) == 0;
    float *row = malloc((size_t)cols * sizeof *row);
    double num = 0, den = 0;
    for (int64_t r = 0; r < rows; r++) {
        zse_dequantize_row(&q, packed, r, row);
        for (int64_t t = 0; t < tokens; t++) {
            double ref = 0;
            for (int64_t c = 0; c < cols; c++)
                ref += (double)row[c] * x->data[t * cols + c];
            double d = y->data[t * rows + r] - ref;
            num += d * d;
            den += ref * ref;
        }
    }
    free(row);
    free(w);
    free(packed);
    be->ops->weight_free(be, wt);
    be->ops->act_free(be, x);
    be->ops->act_free(be, y);
    be->ops->act_free(be, y1);
    be->ops->act_free(be, xl);
    return sqrt(num / den);
}

int main(void)
{
    zse_backend *be = zse_cpu_backend_create(3);
    CHECK(be != NULL);
    const zse_scheme schemes[] = {ZSE_SCHEME_F32, ZSE_SCHEME_F16, ZSE_SCHEME_BF16, ZSE_SCHEME_Q8,
                                  ZSE_SCHEME_Q4, ZSE_SCHEME_Q4S, ZSE_SCHEME_NF4};
    const int64_t shapes[][3] = {{1, 32, 1}, {7, 100, 3}, {33, 200, 17}, {64, 384, 5}};
    for (int portable = 0; portable < 2; portable++) {
        zse_cpu_set_portable(portable);
        for (size_t s = 0; s < sizeof schemes / sizeof schemes[0]; s++)
            for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++)
                for (int g = 32; g <= 128; g *= 2) {
                    if (zse_scheme_layout(schemes[s]) != ZSE_LAYOUT_Q4_G && g != 32)
                        continue;
                    bool inv;
                    double e = rel_err(be, schemes[s], g, shapes[k][0], shapes[k][1], shapes[k][2], &inv);
                    /* exact weights (dequantized) against x: only the activation
                     * quantization of the integer path (int8 per 32) adds error */
                    double bound = portable || schemes[s] <= ZSE_SCHEME_BF16 || schemes[s] == ZSE_SCHEME_NF4 ? 1e-5 : 2e-2;
                    if (bound > 1e-5 && shapes[k][0] * shapes[k][2] < 8)
                        bound = 0.3; /* one lone dot product may cancel: relative error is noisy */
                    CHECK_MSG(e < bound, "%s g%d %lldx%lld b%lld portable=%d: %g", zse_scheme_name(schemes[s]), g,
                              (long long)shapes[k][0], (long long)shapes[k][1], (long long)shapes[k][2], portable, e);
                    CHECK_MSG(inv, "%s: batch changed the last token's result", zse_scheme_name(schemes[s]));
                }
    }
    zse_backend_destroy(be);
    return test_main_end();
}
