/* GPTQ: second-order quantization of one weight matrix into zse's 4-bit group layouts
 * (docs/QUANT.md §GPTQ).
 *
 * The output error of a row w quantized to q on inputs X is (w - q)^T H (w - q) with
 * H = X^T X. GPTQ quantizes the columns in order; after column i it moves the rest of the
 * row by the optimal correction for the error just made, -(w_i - q_i) / [H^-1]_ii times
 * row i of H^-1 restricted to the columns left. With U the upper Cholesky factor of H^-1
 * (H^-1 = U^T U) that is: e = (w_i - q_i) / U_ii, w[i+1:] -= e U[i, i+1:].
 *
 * U comes from one Cholesky factorization: for J the reversal permutation, J H J = L L^T
 * gives H = R R^T with R = J L J upper, so H^-1 = (R^-1)^T R^-1 and U = R^-1 = J L^-1 J.
 *
 * Groups: a group's scale (and min) is chosen, with the writer's own search, when the
 * group's first column is reached, from the weights as the corrections left them; the
 * padding columns past `cols` count as 0.0, as the writer quantizes them. Rows are
 * independent, so threads take tiles of rows and read each row of U once per tile. */
#include "quant/quant.h"

#include <math.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>

#define ROW_TILE 32

/* ---- U: the upper Cholesky factor of (H + damping)^-1, as f32 ------------------------ */

/* H + damp * mean(diag) * I, reversed, in double; channels no input reached (H_ii = 0) get
 * 1 on the diagonal so the matrix stays invertible (their weights are never used) */
static void damped_reversed(const float *H, int64_t n, double damp, double *A)
{
    double mean = 0;
    for (int64_t i = 0; i < n; i++)
        mean += H[i * n + i];
    mean = mean > 0 ? mean / (double)n : 1.0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < n; c++)
            A[(n - 1 - i) * n + (n - 1 - c)] = H[i * n + c];
    for (int64_t i = 0; i < n; i++) {
        double *d = &A[(n - 1 - i) * n + (n - 1 - i)];
        if (*d <= 0)
            *d = 1.0;
        *d += damp * mean;
    }
}

/* U (n x n f32, upper) from H; raises the damping tenfold, at most four times, while the
 * damped H is not positive definite */
static int inverse_cholesky_upper(const float *H, int64_t n, double damp, float *U, zse_pool *pool)
{
    size_t nn;
    if (!zse_mul_ok((size_t)n, (size_t)n, &nn) || !zse_mul_ok(nn, sizeof(double), &nn))
        return zse_fail("a Hessian of %lld channels is too large", (long long)n);
    double *A = zse_malloc(nn), *X = zse_malloc(nn);
    int rc = A && X ? -1 : -2;
    for (int tries = 0; rc == -1 && tries < 5; tries++, damp *= 10) {
        damped_reversed(H, n, damp, A);
        rc = zse_cholesky(A, n, pool);
    }
    if (rc == 0) {
        zse_tri_lower_inverse(A, X, n, pool);
        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < n; c++)
                U[i * n + c] = c >= i ? (float)X[(n - 1 - i) * n + (n - 1 - c)] : 0.0f;
    } else if (rc == -1) {
        rc = zse_fail("the calibration Hessian is not positive definite even with %g of its diagonal added "
                      "(the calibration activations are degenerate: use a longer, more varied text)", damp / 10);
    }
    free(A);
    free(X);
    return rc < 0 ? -1 : 0;
}

/* ---- the column loop ------------------------------------------------------------------ */

typedef struct {
    const zse_qshape *q;
    const float *W;
    const float *U;
    uint8_t *packed;
    atomic_int next;
    atomic_int failed;
} gptq_job;

static void gptq_share(void *arg, int ith, int nth)
{
    (void)ith, (void)nth;
    gptq_job *j = arg;
    const zse_qshape *q = j->q;
    const int64_t cols = q->cols, cp = zse_qshape_cols_padded(q);
    const int g = q->group_size;
    const zse_scheme s = q->scheme;
    float *w = zse_malloc((size_t)ROW_TILE * (size_t)cp * sizeof *w);
    uint8_t *codes = zse_malloc((size_t)ROW_TILE * (size_t)g);
    if (!w || !codes) {
        atomic_store(&j->failed, 1);
        free(w);
        free(codes);
        return;
    }
    zse_q4_params prm[ROW_TILE];
    for (;;) {
        const int64_t r0 = (int64_t)atomic_fetch_add(&j->next, 1) * ROW_TILE;
        if (r0 >= q->rows)
            break;
        const int64_t nr = q->rows - r0 < ROW_TILE ? q->rows - r0 : ROW_TILE;
        for (int64_t r = 0; r < nr; r++) {
            memcpy(w + r * cp, j->W + (r0 + r) * cols, (size_t)cols * sizeof *w);
            memset(w + r * cp + cols, 0, (size_t)(cp - cols) * sizeof *w);
        }
        for (int64_t i = 0; i < cp; i++) {
            const int64_t gi = i / g, k = i % g;
            if (k == 0)
                for (int64_t r = 0; r < nr; r++)
                    prm[r] = zse_q4_group_params(s, w + r * cp + i, g);
            const float *u = j->U + i * cols;
            for (int64_t r = 0; r < nr; r++) {
                float *wr = w + r * cp;
                const int code = zse_q4_encode(s, prm[r], wr[i]);
                codes[r * g + k] = (uint8_t)code;
                if (i >= cols)
                    continue; /* padding: quantized as the zero it is, no input behind it */
                const float e = (wr[i] - zse_q4_decode(s, prm[r], code)) / u[i];
                zse_axpy_f32(wr + i + 1, -e, u + i + 1, cols - i - 1);
            }
            if (k == g - 1)
                for (int64_t r = 0; r < nr; r++)
                    zse_q4_store_group(q, j->packed, r0 + r, gi, codes + r * g, prm[r]);
        }
    }
    free(w);
    free(codes);
}

int zse_gptq(const zse_qshape *q, const float *W, const float *H, double damp, void *packed, zse_pool *pool)
{
    if (zse_scheme_layout(q->scheme) != ZSE_LAYOUT_Q4_G)
        return zse_fail("GPTQ quantizes to 4-bit schemes, not %s", zse_scheme_name(q->scheme));
    if (!zse_qshape_bytes(q))
        return -1;
    const int64_t n = q->cols;
    size_t nn;
    if (!zse_mul_ok((size_t)n, (size_t)n, &nn) || !zse_mul_ok(nn, sizeof(float), &nn))
        return zse_fail("a Hessian of %lld channels is too large", (long long)n);
    float *U = zse_malloc(nn);
    if (!U)
        return -1;
    int rc = inverse_cholesky_upper(H, n, damp, U, pool);
    if (rc == 0) {
        gptq_job j = {.q = q, .W = W, .U = U, .packed = packed};
        atomic_init(&j.next, 0);
        atomic_init(&j.failed, 0);
        if (pool)
            zse_pool_run(pool, gptq_share, &j);
        else
            gptq_share(&j, 0, 1);
        if (atomic_load(&j.failed))
            rc = zse_fail("out of memory in GPTQ");
    }
    free(U);
    return rc;
}

void zse_dequantize_all(const zse_qshape *q, const void *packed, float *out)
{
    for (int64_t r = 0; r < q->rows; r++)
        zse_dequantize_row(q, packed, r, out + r * q->cols);
}
