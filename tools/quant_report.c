/* quant_report SRC_DIR — relative RMS error of every quantization scheme on a model's real
 * linear weights (the 2-D tensors of the transformer blocks), the numbers behind the
 * default INT4 recipe. Built as build/quant_report; not part of `zse`. */
#include "format/format.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    zse_scheme scheme;
    int group;
} recipe;

static double tensor_error(const zse_st_tensor *t, const recipe *r, double *den_out)
{
    zse_qshape q = {r->scheme, t->shape[0], t->shape[1], r->group};
    size_t bytes = zse_qshape_bytes(&q);
    float *src = malloc((size_t)(q.rows * q.cols) * sizeof *src);
    float *row = malloc((size_t)q.cols * sizeof *row);
    uint8_t *packed = calloc(1, bytes);
    if (!src || !row || !packed || zse_st_read_f32(t, 0, (size_t)(q.rows * q.cols), src) != 0) {
        free(src), free(row), free(packed);
        return -1;
    }
    zse_quantize_rows(&q, src, packed, 0, q.rows);
    double num = 0, den = 0;
    for (int64_t r0 = 0; r0 < q.rows; r0++) {
        zse_dequantize_row(&q, packed, r0, row);
        for (int64_t c = 0; c < q.cols; c++) {
            double d = row[c] - src[r0 * q.cols + c];
            num += d * d;
            den += (double)src[r0 * q.cols + c] * src[r0 * q.cols + c];
        }
    }
    free(src), free(row), free(packed);
    *den_out = den;
    return num;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: quant_report SRC_DIR\n");
        return 2;
    }
    zse_safetensors st;
    if (zse_st_open(&st, argv[1]) != 0) {
        fprintf(stderr, "quant_report: %s\n", zse_error_message());
        return 1;
    }
    const recipe recipes[] = {
        {ZSE_SCHEME_Q8, 0},   {ZSE_SCHEME_Q8G, 32}, {ZSE_SCHEME_Q4, 32},  {ZSE_SCHEME_Q4, 64},  {ZSE_SCHEME_Q4, 128},
        {ZSE_SCHEME_Q4S, 32}, {ZSE_SCHEME_Q4S, 64}, {ZSE_SCHEME_Q4S, 128}, {ZSE_SCHEME_NF4, 32},
        {ZSE_SCHEME_NF4, 64}, {ZSE_SCHEME_NF4, 128}, {ZSE_SCHEME_F16, 0}, {ZSE_SCHEME_BF16, 0},
    };
    printf("| scheme | group | relative RMS error | bits/weight |\n|---|---|---|---|\n");
    for (size_t i = 0; i < sizeof recipes / sizeof recipes[0]; i++) {
        double num = 0, den = 0, bytes = 0, elems = 0;
        for (size_t k = 0; k < st.n_tensors; k++) {
            const zse_st_tensor *t = &st.tensors[k];
            if (t->ndim != 2 || !strstr(t->name, "layers."))
                continue;
            double d;
            double n = tensor_error(t, &recipes[i], &d);
            if (n < 0) {
                fprintf(stderr, "quant_report: cannot read %s\n", t->name);
                return 1;
            }
            num += n;
            den += d;
            zse_qshape q = {recipes[i].scheme, t->shape[0], t->shape[1], recipes[i].group};
            bytes += (double)zse_qshape_bytes(&q);
            elems += (double)(t->shape[0] * t->shape[1]);
        }
        char group[16] = "—"; /* schemes without groups: a dash, not "-0" */
        if (recipes[i].group)
            snprintf(group, sizeof group, "%d", recipes[i].group);
        printf("| %s | %s | %.5f | %.3f |\n", zse_scheme_name(recipes[i].scheme), group, sqrt(num / den),
               8 * bytes / elems);
    }
    zse_st_close(&st);
    return 0;
}
