/* GPTQ: second-order quantization of one weight matrix into zse's 4-bit group layouts
 * (docs/QUANT.md §GPTQ).
 *
 * The output error of a row w quantized to q on inputs X is (w - q)^T H (w - q) with
 * H = X^T X. GPTQ quantizes the columns one at a time; after each it moves the columns
 * still to come by the optimal correction for the error just made, -(w_i - q_i) / [H^-1]_ii
 * times row i of H^-1 restricted to them. With U the upper Cholesky factor of H^-1
 * (H^-1 = U^T U) that is: e = (w_i - q_i) / U_ii, w[i+1:] -= e U[i, i+1:].
 *
 * U comes from one Cholesky factorization: for J the reversal permutation, J H J = L L^T
 * gives H = R R^T with R = J L J upper, so H^-1 = (R^-1)^T R^-1 and U = R^-1 = J L^-1 J.
 *
 * Order and groups: columns go in act order (decreasing H_ii, the most used inputs first,
 * while most columns are left to absorb their error), and every group's scale (and min)
 * is chosen up front from the weights as they are, with the writer's own search ("static
 * groups"): the groups stay contiguous in the layout whatever the order. Then, codes fixed,
 * each row's group parameters are refitted to the least output error (refit_row). Rows
 * are independent: threads take tiles of rows and read each row of U once per tile. */
#include "quant/quant.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>

#define ROW_TILE 32

/* ---- U: the upper Cholesky factor of (H + damping)^-1, as f32 ------------------------ */

/* H in act order (row and column i of the result are perm[i] of H), plus damp * mean(diag)
 * on the diagonal, reversed, in double; channels no input reached (H_ii = 0) get 1 on the
 * diagonal so the matrix stays invertible (their weights are never used) */
static void damped_reversed(const float *H, const int64_t *perm, int64_t n, double damp, double *A)
{
    double mean = 0;
    for (int64_t i = 0; i < n; i++)
        mean += H[i * n + i];
    mean = mean > 0 ? mean / (double)n : 1.0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < n; c++)
            A[(n - 1 - i) * n + (n - 1 - c)] = H[perm[i] * n + perm[c]];
    for (int64_t i = 0; i < n; i++) {
        double *d = &A[(n - 1 - i) * n + (n - 1 - i)];
        if (*d <= 0)
            *d = 1.0;
        *d += damp * mean;
    }
}

/* U (n x n f32, upper) from H; raises the damping tenfold, at most four times, while the
 * damped H is not positive definite */
static int inverse_cholesky_upper(const float *H, const int64_t *perm, int64_t n, double damp, float *U,
                                  zse_pool *pool)
{
    size_t nn;
    if (!zse_mul_ok((size_t)n, (size_t)n, &nn) || !zse_mul_ok(nn, sizeof(double), &nn))
        return zse_fail("a Hessian of %lld channels is too large", (long long)n);
    double *A = zse_malloc(nn);
    int rc = A ? -1 : -2;
    for (int tries = 0; rc == -1 && tries < 5; tries++, damp *= 10) {
        damped_reversed(H, perm, n, damp, A);
        rc = zse_cholesky(A, n, pool);
    }
    if (rc == 0) {
        /* L^-1 of the reversed matrix, then reversed back: U[i][c] = X[n-1-i][n-1-c] is the
         * flat array read backwards */
        zse_tri_lower_inverse(A, U, n, pool);
        for (size_t a = 0, b = (size_t)(n * n) - 1; a < b; a++, b--) {
            float t = U[a];
            U[a] = U[b];
            U[b] = t;
        }
    } else if (rc == -1) {
        rc = zse_fail("the calibration Hessian is not positive definite even with %g of its diagonal added "
                      "(the calibration activations are degenerate: use a longer, more varied text)", damp / 10);
    }
    free(A);
    return rc < 0 ? -1 : 0;
}

/* ---- the groups' parameters, refitted ---------------------------------------------------
 * GPTQ picks a group's scale (and min) when it reaches the group, from weights its later
 * corrections still move. With the codes fixed, a row's values are linear in its groups'
 * parameters, v = A θ (a column's entry is its code's level — q, q - 8 or NF4[q] — times its
 * group's scale, plus 1 times the min for int4), so the parameters with the least output
 * error (v - w)^T H (v - w) solve A^T H A θ = A^T H w: a system of one or two unknowns per
 * group. The refit is kept only when, rounded to f16, it lowers the row's error. */

typedef struct {
    float *hw, *z;          /* H w; H times one column of A */
    double *M, *y, *theta, *theta0;
} refit_scratch;

static int refit_alloc(refit_scratch *r, int64_t cols, int64_t P)
{
    r->hw = zse_malloc((size_t)cols * sizeof *r->hw);
    r->z = zse_malloc((size_t)cols * sizeof *r->z);
    r->M = zse_malloc((size_t)(P * P) * sizeof *r->M);
    r->y = zse_malloc((size_t)P * sizeof *r->y);
    r->theta = zse_malloc((size_t)P * sizeof *r->theta);
    r->theta0 = zse_malloc((size_t)P * sizeof *r->theta0);
    return r->hw && r->z && r->M && r->y && r->theta && r->theta0 ? 0 : -1;
}

static void refit_free(refit_scratch *r)
{
    free(r->hw);
    free(r->z);
    free(r->M);
    free(r->y);
    free(r->theta);
    free(r->theta0);
}

/* the level a code stands for before its group's scale */
static float code_level(zse_scheme s, int code)
{
    return s == ZSE_SCHEME_Q4 ? (float)code : s == ZSE_SCHEME_Q4S ? (float)(code - 8) : zse_nf4_values[code];
}

static int row_code(const uint8_t *rowp, int64_t c)
{
    uint8_t byte = rowp[(c / ZSE_Q4_CHUNK) * 16 + (c % 16)];
    return c % ZSE_Q4_CHUNK < 16 ? (byte & 15) : (byte >> 4);
}

/* theta^T M theta - 2 theta^T y (+ w^T H w, the same for every theta) */
static double quad_error(const double *M, const double *y, const double *t, int64_t P)
{
    double e = 0;
    for (int64_t a = 0; a < P; a++) {
        double m = 0;
        for (int64_t b = 0; b < P; b++)
            m += M[a * P + b] * t[b];
        e += t[a] * m - 2 * t[a] * y[a];
    }
    return e;
}

static void refit_row(const zse_qshape *q, uint8_t *packed, int64_t row, const float *w, const float *H,
                      refit_scratch *r)
{
    zse_qplanes pl;
    zse_qshape_planes(q, &pl);
    const int64_t cols = q->cols, G = pl.groups, g = q->group_size;
    const bool mins = q->scheme == ZSE_SCHEME_Q4;
    const int64_t P = mins ? 2 * G : G;
    const uint8_t *rowp = packed + (size_t)row * pl.row_bytes;
    uint16_t *sc = (uint16_t *)(packed + pl.scales) + (size_t)row * (size_t)G;
    uint16_t *mn = mins ? (uint16_t *)(packed + pl.mins) + (size_t)row * (size_t)G : NULL;
    /* H w, and y = A^T H w, M = A^T H A column by column */
    memset(r->hw, 0, (size_t)cols * sizeof *r->hw);
    for (int64_t c = 0; c < cols; c++)
        if (w[c] != 0)
            zse_axpy_f32(r->hw, w[c], H + c * cols, cols);
    for (int64_t p = 0; p < P; p++) {
        const int64_t gi = p % G, c0 = gi * g, c1 = c0 + g < cols ? c0 + g : cols;
        const bool is_min = p >= G;
        memset(r->z, 0, (size_t)cols * sizeof *r->z);
        double yp = 0;
        for (int64_t c = c0; c < c1; c++) {
            const float a = is_min ? 1.0f : code_level(q->scheme, row_code(rowp, c));
            if (a != 0)
                zse_axpy_f32(r->z, a, H + c * cols, cols);
            yp += (double)a * r->hw[c];
        }
        r->y[p] = yp;
        for (int64_t p2 = 0; p2 < P; p2++) {
            const int64_t g2 = p2 % G, d0 = g2 * g, d1 = d0 + g < cols ? d0 + g : cols;
            double m = 0;
            for (int64_t c = d0; c < d1; c++)
                m += (double)(p2 >= G ? 1.0f : code_level(q->scheme, row_code(rowp, c))) * r->z[c];
            r->M[p2 * P + p] = m;
        }
    }
    for (int64_t gi = 0; gi < G; gi++) {
        r->theta0[gi] = zse_f16_to_f32(sc[gi]);
        if (mins)
            r->theta0[G + gi] = zse_f16_to_f32(mn[gi]);
    }
    /* solve (M + ridge) theta = y by Cholesky, in place on a copy of M kept in theta's room */
    double trace = 0;
    for (int64_t p = 0; p < P; p++)
        trace += r->M[p * P + p];
    double *L = zse_malloc((size_t)(P * P) * sizeof *L);
    if (!L || !(trace > 0))
        goto done;
    for (int64_t i = 0; i < P * P; i++)
        L[i] = r->M[i];
    for (int64_t p = 0; p < P; p++)
        L[p * P + p] += 1e-9 * trace / (double)P + 1e-30;
    if (zse_cholesky(L, P, NULL) != 0)
        goto done;
    for (int64_t i = 0; i < P; i++) { /* L u = y, then L^T theta = u */
        double v = r->y[i];
        for (int64_t k = 0; k < i; k++)
            v -= L[i * P + k] * r->theta[k];
        r->theta[i] = v / L[i * P + i];
    }
    for (int64_t i = P - 1; i >= 0; i--) {
        double v = r->theta[i];
        for (int64_t k = i + 1; k < P; k++)
            v -= L[k * P + i] * r->theta[k];
        r->theta[i] = v / L[i * P + i];
    }
    for (int64_t p = 0; p < P; p++) { /* what f16 stores */
        if (!isfinite(r->theta[p]) || fabs(r->theta[p]) > 60000)
            goto done;
        r->theta[p] = zse_f16_to_f32(zse_f32_to_f16((float)r->theta[p]));
    }
    if (quad_error(r->M, r->y, r->theta, P) < quad_error(r->M, r->y, r->theta0, P))
        for (int64_t gi = 0; gi < G; gi++) {
            sc[gi] = zse_f32_to_f16((float)r->theta[gi]);
            if (mins)
                mn[gi] = zse_f32_to_f16((float)r->theta[G + gi]);
        }
done:
    free(L);
}

/* ---- the column loop ------------------------------------------------------------------ */

typedef struct {
    const zse_qshape *q;
    const float *W;
    const float *H;
    const float *U;         /* of H permuted: its column i is column perm[i] of W */
    const int64_t *perm;
    uint8_t *packed;
    atomic_int next;
    atomic_int failed;
} gptq_job;

/* rows [r0, r0 + nr): the groups' parameters from the weights as they are, then the
 * columns in act order, each one's rounding error spread over those still to come */
static void quantize_tile(const gptq_job *j, int64_t r0, int64_t nr, float *w, uint8_t *codes,
                          zse_q4_params *prm)
{
    const zse_qshape *q = j->q;
    const int64_t cols = q->cols, cp = zse_qshape_cols_padded(q), G = cp / q->group_size;
    const int g = q->group_size;
    const zse_scheme s = q->scheme;
    float *tmp = w + ROW_TILE * cols; /* one padded row in natural order */
    for (int64_t r = 0; r < nr; r++) {
        const float *src = j->W + (r0 + r) * cols;
        memcpy(tmp, src, (size_t)cols * sizeof *tmp);
        memset(tmp + cols, 0, (size_t)(cp - cols) * sizeof *tmp);
        for (int64_t gi = 0; gi < G; gi++)
            prm[r * G + gi] = zse_q4_group_params(s, tmp + gi * g, g);
        for (int64_t c = cols; c < cp; c++) /* padding: the zero it is */
            codes[r * cp + c] = (uint8_t)zse_q4_encode(s, prm[r * G + c / g], 0.0f);
        for (int64_t i = 0; i < cols; i++)
            w[r * cols + i] = src[j->perm[i]];
    }
    for (int64_t i = 0; i < cols; i++) {
        const int64_t c = j->perm[i];
        const float *u = j->U + i * cols;
        for (int64_t r = 0; r < nr; r++) {
            float *wr = w + r * cols;
            const zse_q4_params p = prm[r * G + c / g];
            const int code = zse_q4_encode(s, p, wr[i]);
            codes[r * cp + c] = (uint8_t)code;
            const float e = (wr[i] - zse_q4_decode(s, p, code)) / u[i];
            zse_axpy_f32(wr + i + 1, -e, u + i + 1, cols - i - 1);
        }
    }
    for (int64_t r = 0; r < nr; r++)
        for (int64_t gi = 0; gi < G; gi++)
            zse_q4_store_group(q, j->packed, r0 + r, gi, codes + r * cp + gi * g, prm[r * G + gi]);
}

static void gptq_share(void *arg, int ith, int nth)
{
    (void)ith, (void)nth;
    gptq_job *j = arg;
    const zse_qshape *q = j->q;
    const int64_t cols = q->cols, cp = zse_qshape_cols_padded(q), G = cp / q->group_size;
    float *w = zse_malloc((size_t)(ROW_TILE + 1) * (size_t)cp * sizeof *w);
    uint8_t *codes = zse_malloc((size_t)ROW_TILE * (size_t)cp);
    zse_q4_params *prm = zse_malloc((size_t)ROW_TILE * (size_t)G * sizeof *prm);
    refit_scratch rs = {0};
    if (w && codes && prm && refit_alloc(&rs, cols, q->scheme == ZSE_SCHEME_Q4 ? 2 * G : G) == 0) {
        for (;;) {
            const int64_t r0 = (int64_t)atomic_fetch_add(&j->next, 1) * ROW_TILE;
            if (r0 >= q->rows)
                break;
            const int64_t nr = q->rows - r0 < ROW_TILE ? q->rows - r0 : ROW_TILE;
            quantize_tile(j, r0, nr, w, codes, prm);
            for (int64_t r = 0; r < nr; r++)
                refit_row(q, j->packed, r0 + r, j->W + (r0 + r) * cols, j->H, &rs);
        }
    } else {
        atomic_store(&j->failed, 1);
    }
    free(w);
    free(codes);
    free(prm);
    refit_free(&rs);
}

/* act order: columns by decreasing H_ii (the most used inputs first, while the most columns
 * are left to absorb their error); ties by index */
static const float *order_key;
static int by_activation(const void *a, const void *b)
{
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    const float kx = order_key[x], ky = order_key[y];
    return kx < ky ? 1 : kx > ky ? -1 : (x > y) - (x < y);
}

static int act_order(const float *H, int64_t n, int64_t *perm)
{
    float *diag = zse_malloc((size_t)n * sizeof *diag);
    if (!diag)
        return -1;
    for (int64_t i = 0; i < n; i++) {
        perm[i] = i;
        diag[i] = H[i * n + i];
    }
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; /* qsort has no context argument */
    pthread_mutex_lock(&mu);
    order_key = diag;
    qsort(perm, (size_t)n, sizeof *perm, by_activation);
    pthread_mutex_unlock(&mu);
    free(diag);
    return 0;
}

struct zse_gptq_factor {
    int64_t n;
    const float *H;         /* the caller's, for the refit */
    int64_t *perm;          /* act order */
    float *U;               /* upper Cholesky factor of the damped H^-1, in act order */
};

zse_gptq_factor *zse_gptq_factor_new(const float *H, int64_t n, double damp, zse_pool *pool)
{
    size_t nn;
    if (!zse_mul_ok((size_t)n, (size_t)n, &nn) || !zse_mul_ok(nn, sizeof(float), &nn)) {
        zse_fail("a Hessian of %lld channels is too large", (long long)n);
        return NULL;
    }
    zse_gptq_factor *f = zse_calloc(1, sizeof *f);
    if (!f)
        return NULL;
    f->n = n;
    f->H = H;
    f->U = zse_malloc(nn);
    f->perm = zse_malloc((size_t)n * sizeof *f->perm);
    int rc = f->U && f->perm ? act_order(H, n, f->perm) : -1;
    if (rc == 0)
        rc = inverse_cholesky_upper(H, f->perm, n, damp, f->U, pool);
    if (rc != 0) {
        zse_gptq_factor_free(f);
        return NULL;
    }
    return f;
}

void zse_gptq_factor_free(zse_gptq_factor *f)
{
    if (!f)
        return;
    free(f->U);
    free(f->perm);
    free(f);
}

int zse_gptq(const zse_qshape *q, const float *W, const zse_gptq_factor *f, void *packed, zse_pool *pool)
{
    if (zse_scheme_layout(q->scheme) != ZSE_LAYOUT_Q4_G)
        return zse_fail("GPTQ quantizes to 4-bit schemes, not %s", zse_scheme_name(q->scheme));
    if (!zse_qshape_bytes(q))
        return -1;
    if (q->cols != f->n)
        return zse_fail("a weight of %lld columns against a Hessian of %lld channels", (long long)q->cols,
                        (long long)f->n);
    gptq_job j = {.q = q, .W = W, .H = f->H, .U = f->U, .perm = f->perm, .packed = packed};
    atomic_init(&j.next, 0);
    atomic_init(&j.failed, 0);
    if (pool)
        zse_pool_run(pool, gptq_share, &j);
    else
        gptq_share(&j, 0, 1);
    return atomic_load(&j.failed) ? zse_fail("out of memory in GPTQ") : 0;
}

void zse_dequantize_all(const zse_qshape *q, const void *packed, float *out)
{
    for (int64_t r = 0; r < q->rows; r++)
        zse_dequantize_row(q, packed, r, out + r * q->cols);
}
