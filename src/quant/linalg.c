/* The dense linear algebra of the calibrated quantizers (docs/QUANT.md): Hessian
 * accumulation, a Cholesky factorization and a triangular inverse, and the output error of
 * a weight change. Matrices are row-major n x n. The factorizations run in double: a
 * Hessian of real activations spans many orders of magnitude and GPTQ divides by its
 * inverse's diagonal.
 *
 * Sizes are those of a linear layer's input (up to ~30k for a 7B-70B down projection), so
 * the O(n^3) loops are tiled to stay in cache and spread over the thread pool; no BLAS. */
#include "quant/quant.h"

#include <math.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>

#define TILE 64

/* ---- Hessian ------------------------------------------------------------------------ */

typedef struct {
    float *H;
    int64_t n;
    const float *x;
    int64_t rows, stride;
} hess_job;

/* Row i of H costs n - i: rows are dealt out in a zigzag so every thread gets a fair share. */
static void hessian_share(void *arg, int ith, int nth)
{
    hess_job *j = arg;
    const int64_t n = j->n;
    for (int64_t k = 0; k < n; k++) {
        int64_t round = k / nth, lane = k % nth;
        if ((round % 2 == 0 ? lane : nth - 1 - lane) != ith)
            continue;
        float *h = j->H + k * n;
        for (int64_t t = 0; t < j->rows; t++) {
            const float *x = j->x + t * j->stride;
            const float xi = x[k];
            if (xi == 0.0f)
                continue;
            for (int64_t c = k; c < n; c++)
                h[c] += xi * x[c];
        }
    }
}

void zse_hessian_accumulate(float *H, int64_t n, const float *x, int64_t rows, int64_t stride, zse_pool *pool)
{
    hess_job j = {H, n, x, rows, stride};
    if (pool)
        zse_pool_run(pool, hessian_share, &j);
    else
        hessian_share(&j, 0, 1);
}

void zse_hessian_mirror(float *H, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = i + 1; c < n; c++)
            H[c * n + i] = H[i * n + c];
}

/* ---- Cholesky, right-looking by tiles of TILE columns --------------------------------
 * For each panel [k0, k1): factor its diagonal block, solve the rows below it against the
 * block (independent rows: threads), then subtract the panel's outer product from the
 * trailing lower triangle (independent row tiles: threads). */

typedef struct {
    double *A;
    int64_t n, k0, k1;
    atomic_int next;
} chol_job;

/* four partial sums: independent chains the CPU overlaps (a single sum cannot be
 * reordered into vector lanes without -ffast-math) */
static double dot(const double *a, const double *b, int64_t n)
{
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static void panel_solve_share(void *arg, int ith, int nth)
{
    chol_job *j = arg;
    double *A = j->A;
    const int64_t n = j->n, k0 = j->k0, k1 = j->k1;
    for (int64_t i = k1 + ith; i < n; i += nth) {
        double *ri = A + i * n;
        for (int64_t c = k0; c < k1; c++) {
            const double *rc = A + c * n;
            ri[c] = (ri[c] - dot(ri + k0, rc + k0, c - k0)) / rc[c];
        }
    }
}

/* A[i][c] -= panel_i . panel_c for k1 <= c <= i, by tiles of TILE rows taken in turn */
static void trailing_update_share(void *arg, int ith, int nth)
{
    (void)ith, (void)nth;
    chol_job *j = arg;
    double *A = j->A;
    const int64_t n = j->n, k0 = j->k0, k1 = j->k1, w = k1 - k0;
    for (;;) {
        int64_t tile = atomic_fetch_add(&j->next, 1);
        /* tiles from the bottom first: they are the largest */
        int64_t i1 = n - tile * TILE, i0 = i1 - TILE;
        if (i1 <= k1)
            break;
        if (i0 < k1)
            i0 = k1;
        for (int64_t c0 = k1; c0 < i1; c0 += TILE) {
            int64_t c1 = c0 + TILE < i1 ? c0 + TILE : i1;
            for (int64_t i = i0; i < i1; i++) {
                double *ri = A + i * n;
                const int64_t cend = c1 < i + 1 ? c1 : i + 1;
                for (int64_t c = c0; c < cend; c++)
                    ri[c] -= dot(ri + k0, A + c * n + k0, w);
            }
        }
    }
}

int zse_cholesky(double *A, int64_t n, zse_pool *pool)
{
    for (int64_t k0 = 0; k0 < n; k0 += TILE) {
        const int64_t k1 = k0 + TILE < n ? k0 + TILE : n;
        for (int64_t c = k0; c < k1; c++) { /* the diagonal block */
            double *rc = A + c * n;
            double d = rc[c] - dot(rc + k0, rc + k0, c - k0);
            if (!(d > 0) || !isfinite(d))
                return -1;
            rc[c] = sqrt(d);
            for (int64_t i = c + 1; i < k1; i++) {
                double *ri = A + i * n;
                ri[c] = (ri[c] - dot(ri + k0, rc + k0, c - k0)) / rc[c];
            }
        }
        if (k1 == n)
            break;
        chol_job j = {A, n, k0, k1, 0};
        if (pool) {
            zse_pool_run(pool, panel_solve_share, &j);
            zse_pool_run(pool, trailing_update_share, &j);
        } else {
            panel_solve_share(&j, 0, 1);
            trailing_update_share(&j, 0, 1);
        }
    }
    return 0;
}

/* ---- X = L^-1 ------------------------------------------------------------------------
 * Column blocks of X are independent (L X = I, one block of right-hand sides each): a
 * thread takes TILE columns and substitutes forward, reading each row of L once for all
 * of them. */

typedef struct {
    const double *L;
    double *X;
    int64_t n;
    atomic_int next;
} inv_job;

static void inverse_share(void *arg, int ith, int nth)
{
    (void)ith, (void)nth;
    inv_job *j = arg;
    const int64_t n = j->n;
    double acc[TILE];
    for (;;) {
        int64_t c0 = (int64_t)atomic_fetch_add(&j->next, 1) * TILE;
        if (c0 >= n)
            break;
        const int64_t c1 = c0 + TILE < n ? c0 + TILE : n, w = c1 - c0;
        for (int64_t i = c0; i < n; i++) {
            const double *li = j->L + i * n;
            for (int64_t c = 0; c < w; c++)
                acc[c] = c0 + c == i ? 1.0 : 0.0;
            for (int64_t p = c0; p < i; p++) { /* X[p][c] is 0 for p < c */
                const double l = li[p];
                const double *xp = j->X + p * n + c0;
                for (int64_t c = 0; c < w; c++)
                    acc[c] -= l * xp[c];
            }
            double *xi = j->X + i * n + c0;
            for (int64_t c = 0; c < w; c++)
                xi[c] = c0 + c <= i ? acc[c] / li[i] : 0.0;
        }
    }
}

void zse_tri_lower_inverse(const double *L, double *X, int64_t n, zse_pool *pool)
{
    for (int64_t i = 0; i < n; i++) /* the rows above each column block stay zero */
        memset(X + i * n, 0, (size_t)n * sizeof *X);
    inv_job j = {L, X, n, 0};
    if (pool)
        zse_pool_run(pool, inverse_share, &j);
    else
        inverse_share(&j, 0, 1);
}

/* ---- output error ---------------------------------------------------------------------- */

typedef struct {
    const float *A, *B, *H;
    int64_t rows, cols, step;
    double *partial;        /* one per thread */
    float *scratch;         /* 2 * cols per thread */
} err_job;

static void error_share(void *arg, int ith, int nth)
{
    err_job *j = arg;
    const int64_t n = j->cols;
    float *d = j->scratch + (size_t)ith * 2 * (size_t)n, *y = d + n;
    double sum = 0;
    int64_t k = 0;
    for (int64_t r = 0; r < j->rows; r += j->step, k++) {
        if (k % nth != ith)
            continue;
        for (int64_t c = 0; c < n; c++) {
            d[c] = j->A[r * n + c] - j->B[r * n + c];
            y[c] = 0;
        }
        /* y = H d as a sum of H's rows (no reduction in the inner loop: it vectorizes) */
        for (int64_t i = 0; i < n; i++) {
            const float di = d[i];
            if (di == 0.0f)
                continue;
            const float *h = j->H + i * n;
            for (int64_t c = 0; c < n; c++)
                y[c] += di * h[c];
        }
        double e = 0;
        for (int64_t c = 0; c < n; c++)
            e += (double)d[c] * y[c];
        sum += e;
    }
    j->partial[ith] = sum;
}

double zse_weighted_error(const float *A, const float *B, int64_t rows, int64_t cols, const float *H,
                          int64_t row_step, zse_pool *pool)
{
    if (row_step < 1)
        row_step = 1;
    const int nth = pool ? zse_pool_size(pool) : 1;
    double partial[1024] = {0};
    float *scratch = zse_malloc((size_t)nth * 2 * (size_t)cols * sizeof *scratch);
    if (!scratch)
        return NAN;
    err_job j = {A, B, H, rows, cols, row_step, partial, scratch};
    if (pool)
        zse_pool_run(pool, error_share, &j);
    else
        error_share(&j, 0, 1);
    free(scratch);
    double sum = 0;
    for (int i = 0; i < nth; i++)
        sum += partial[i];
    int64_t counted = (rows + row_step - 1) / row_step;
    return sum * (double)rows / (double)counted;
}
