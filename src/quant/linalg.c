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

/* The inner loops below are built three times, for AVX-512, AVX2 and plain x86-64, and the
 * loader picks one for the CPU it runs on (GCC's target_clones): the default build targets
 * the oldest x86-64, whose 4-lane SSE would leave most of a modern core idle. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SIMD
#endif

/* ---- Hessian ------------------------------------------------------------------------
 * H += X^T X is a matrix product. The rows are taken HT tokens at a time and transposed, so
 * that H[k][c] gains the dot product of channels k and c over those tokens — two contiguous
 * vectors; a thread owns blocks of KB rows of H (dealt out in a zigzag: row k costs n - k)
 * and walks the columns right of its diagonal in blocks whose vectors stay in cache. */
#define HT 256
#define KB 128
#define CB 32
#define LANES 16

/* a dot product in LANES independent partial sums: each lane's chain is the compiler's to
 * put in one vector register (a single running sum could not be split without -ffast-math) */
SIMD static float dot_f32(const float *a, const float *b, int64_t n)
{
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++)
            acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++)
        s += a[i] * b[i];
    for (int j = 0; j < LANES; j++)
        s += acc[j];
    return s;
}

typedef struct {
    float *H;
    int64_t n;
    const float *xt;        /* [n][len]: the chunk, channel by channel */
    int64_t len;
} hess_job;

static void hessian_share(void *arg, int ith, int nth)
{
    hess_job *j = arg;
    const int64_t n = j->n, len = j->len;
    for (int64_t b = 0, k0 = 0; k0 < n; b++, k0 += KB) {
        int64_t round = b / nth, lane = b % nth;
        if ((round % 2 == 0 ? lane : nth - 1 - lane) != ith)
            continue;
        const int64_t k1 = k0 + KB < n ? k0 + KB : n;
        for (int64_t c0 = k0; c0 < n; c0 += CB) {
            const int64_t c1 = c0 + CB < n ? c0 + CB : n;
            for (int64_t k = k0; k < k1; k++) {
                float *h = j->H + k * n;
                const float *xk = j->xt + k * len;
                for (int64_t c = c0 > k ? c0 : k; c < c1; c++)
                    h[c] += dot_f32(xk, j->xt + c * len, len);
            }
        }
    }
}

void zse_hessian_accumulate(float *H, int64_t n, const float *x, int64_t rows, int64_t stride, zse_pool *pool)
{
    float *xt = zse_malloc((size_t)n * HT * sizeof *xt);
    if (!xt) { /* tiny fallback: one token at a time, no scratch */
        for (int64_t t = 0; t < rows; t++)
            for (int64_t k = 0; k < n; k++)
                for (int64_t c = k; c < n; c++)
                    H[k * n + c] += x[t * stride + k] * x[t * stride + c];
        return;
    }
    for (int64_t t0 = 0; t0 < rows; t0 += HT) {
        const int64_t len = rows - t0 < HT ? rows - t0 : HT;
        for (int64_t t = 0; t < len; t++)
            for (int64_t k = 0; k < n; k++)
                xt[k * len + t] = x[(t0 + t) * stride + k];
        hess_job j = {H, n, xt, len};
        if (pool)
            zse_pool_run(pool, hessian_share, &j);
        else
            hessian_share(&j, 0, 1);
    }
    free(xt);
}

void zse_hessian_mirror(float *H, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = i + 1; c < n; c++)
            H[c * n + i] = H[i * n + c];
}

/* y += a x over n floats (GPTQ's corrections, the output error) */
SIMD void zse_axpy_f32(float *y, float a, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] += a * x[i];
}

/* y += a x, y in double and x in float (the triangular inverse's running sums) */
SIMD static void axpy_f64_f32(double *y, double a, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] += a * (double)x[i];
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

/* the double dot product of the factorizations, in lanes like dot_f32 */
SIMD static double dot(const double *a, const double *b, int64_t n)
{
    double acc[LANES / 2] = {0};
    int64_t i = 0;
    for (; i + LANES / 2 <= n; i += LANES / 2)
        for (int j = 0; j < LANES / 2; j++)
            acc[j] += a[i + j] * b[i + j];
    double s = 0;
    for (; i < n; i++)
        s += a[i] * b[i];
    for (int j = 0; j < LANES / 2; j++)
        s += acc[j];
    return s;
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
 * of them. Sums run in double; X is stored in f32, which is what GPTQ reads (and half the
 * memory: a 7B down projection's input has 18,944 channels). */

typedef struct {
    const double *L;
    float *X;
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
            for (int64_t p = c0; p < i; p++) /* X[p][c] is 0 for p < c */
                axpy_f64_f32(acc, -li[p], j->X + p * n + c0, w);
            float *xi = j->X + i * n + c0;
            for (int64_t c = 0; c < w; c++)
                xi[c] = c0 + c <= i ? (float)(acc[c] / li[i]) : 0.0f;
        }
    }
}

void zse_tri_lower_inverse(const double *L, float *X, int64_t n, zse_pool *pool)
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
            zse_axpy_f32(y, di, j->H + i * n, n);
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
