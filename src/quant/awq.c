/* AWQ: activation-aware per-input-channel scales (docs/QUANT.md §AWQ).
 *
 * A few input channels carry much larger activations than the rest, and the weights that
 * multiply them matter most. Scaling those weight columns up by s_c (and the input down by
 * the same factor, folded into the RMSNorm weight or the rows of the projection before)
 * changes nothing in f32 but gives them finer steps relative to their group. AWQ takes
 * s_c = mean|x_c|^alpha and searches alpha; here the activation size is the RMS of the
 * channel (from the Hessian's diagonal) and the search minimizes the output error each
 * candidate leaves, computed exactly from the Hessian instead of re-running the layer. */
#include "quant/quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define GRID 20
/* the search measures the error on at most this many rows of each weight (every k-th) */
#define SAMPLE_ROWS 128

int zse_fake_quantize(const zse_qshape *q, const float *W, float *out)
{
    size_t bytes = zse_qshape_bytes(q);
    if (!bytes)
        return -1;
    uint8_t *packed = zse_aligned_alloc(64, bytes);
    if (!packed)
        return -1;
    memset(packed, 0, bytes);
    zse_quantize_rows(q, W, packed, 0, q->rows);
    zse_dequantize_all(q, packed, out);
    free(packed);
    return 0;
}

/* s_c = H_cc^(alpha/2), floored, then divided by sqrt(max * min) so the scales straddle 1 */
static void scales_for(const float *H, int64_t n, double alpha, float *s)
{
    double hmax = 0;
    for (int64_t c = 0; c < n; c++)
        hmax = fmax(hmax, H[c * n + c]);
    const double floor_h = hmax > 0 ? hmax * 1e-8 : 1.0;
    double lo = INFINITY, hi = 0;
    for (int64_t c = 0; c < n; c++) {
        double h = fmax(H[c * n + c], floor_h);
        s[c] = (float)pow(h, alpha / 2);
        lo = fmin(lo, s[c]);
        hi = fmax(hi, s[c]);
    }
    const float norm = (float)sqrt(lo * hi);
    for (int64_t c = 0; c < n; c++)
        s[c] /= norm;
}

/* the summed output error of round-to-nearest(W diag(s)) diag(1/s) over the sampled rows
 * of every weight */
static double scaled_error(const zse_qshape *q, const float *const *ws, const int64_t *rows, int n_ws,
                           const float *H, const float *s, float *a, float *b, zse_pool *pool)
{
    const int64_t n = q->cols;
    double total = 0;
    for (int t = 0; t < n_ws; t++) {
        const int64_t step = rows[t] > SAMPLE_ROWS ? (rows[t] + SAMPLE_ROWS - 1) / SAMPLE_ROWS : 1;
        int64_t k = 0;
        for (int64_t r = 0; r < rows[t]; r += step, k++)
            for (int64_t c = 0; c < n; c++) {
                a[k * n + c] = ws[t][r * n + c];
                b[k * n + c] = a[k * n + c] * s[c];
            }
        zse_qshape qs = {q->scheme, k, n, q->group_size};
        if (zse_fake_quantize(&qs, b, b) != 0) /* in place: packed first, then read back */
            return NAN;
        for (int64_t i = 0; i < k * n; i++)
            b[i] /= s[i % n];
        total += zse_weighted_error(a, b, k, n, H, 1, pool) * (double)rows[t] / (double)k;
    }
    return total;
}

int zse_awq_search(const zse_qshape *q, const float *const *ws, const int64_t *rows, int n_ws, const float *H,
                   float *s, zse_awq_result *res, zse_pool *pool)
{
    const int64_t n = q->cols;
    int64_t most = 0;
    for (int t = 0; t < n_ws; t++)
        most = rows[t] > most ? rows[t] : most;
    if (most > SAMPLE_ROWS)
        most = SAMPLE_ROWS;
    float *a = zse_malloc((size_t)most * (size_t)n * sizeof *a);
    float *b = zse_malloc((size_t)most * (size_t)n * sizeof *b);
    float *cand = zse_malloc((size_t)n * sizeof *cand);
    int rc = a && b && cand ? 0 : -1;
    res->alpha = 0;
    res->error = res->error_rtn = INFINITY;
    for (int i = 0; rc == 0 && i < GRID; i++) {
        const double alpha = (double)i / GRID;
        scales_for(H, n, alpha, cand);
        double e = scaled_error(q, ws, rows, n_ws, H, cand, a, b, pool);
        if (isnan(e)) {
            rc = -1;
            break;
        }
        if (i == 0)
            res->error_rtn = e;
        if (e < res->error) {
            res->error = e;
            res->alpha = alpha;
            memcpy(s, cand, (size_t)n * sizeof *s);
        }
    }
    free(a);
    free(b);
    free(cand);
    return rc;
}
