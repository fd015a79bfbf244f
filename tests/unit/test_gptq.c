/* The math of calibrated quantization (src/quant: linalg.c, gptq.c, awq.c, plan.c):
 * Hessians, the Cholesky factor and triangular inverse, GPTQ against round to nearest on
 * the activations it was calibrated on, the AWQ scale search, and the bit-budget plan. */
#include "test.h"

#include "quant/quant.h"
#include "util/util.h"

#include <stdint.h>

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static double uniform(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return ((double)(rng >> 11) + 0.5) / 9007199254740992.0;
}

static float gauss(void)
{
    return (float)(sqrt(-2 * log(uniform())) * cos(6.283185307179586 * uniform()));
}

/* activations like a transformer's: correlated channels (a few shared directions) and a
 * handful of channels several times larger than the rest */
static float *make_activations(int64_t tokens, int64_t n)
{
    float *x = malloc((size_t)(tokens * n) * sizeof *x);
    float basis[4][512];
    for (int b = 0; b < 4; b++)
        for (int64_t c = 0; c < n; c++)
            basis[b][c] = gauss();
    for (int64_t t = 0; t < tokens; t++) {
        float z[4] = {gauss(), gauss(), gauss(), gauss()};
        for (int64_t c = 0; c < n; c++) {
            float v = 0.5f * gauss();
            for (int b = 0; b < 4; b++)
                v += z[b] * basis[b][c];
            if (c % 37 == 5)
                v *= 8; /* outlier channels */
            x[t * n + c] = v;
        }
    }
    return x;
}

static float *make_weights(int64_t rows, int64_t cols)
{
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    for (int64_t i = 0; i < rows * cols; i++)
        w[i] = 0.02f * gauss();
    return w;
}

/* ---- Hessian, Cholesky, inverse ---------------------------------------------------------- */

static void test_hessian(zse_pool *pool)
{
    const int64_t n = 70, T = 33;
    float *x = make_activations(T, n);
    float *H = calloc((size_t)(n * n), sizeof *H);
    /* two calls, the second with a row stride wider than n: sums add up */
    zse_hessian_accumulate(H, n, x, 20, n, pool);
    zse_hessian_accumulate(H, n, x + 20 * n, T - 20, n, NULL);
    zse_hessian_mirror(H, n);
    double worst = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < n; c++) {
            double ref = 0;
            for (int64_t t = 0; t < T; t++)
                ref += (double)x[t * n + i] * x[t * n + c];
            worst = fmax(worst, fabs(H[i * n + c] - ref) / (1 + fabs(ref)));
        }
    CHECK_MSG(worst < 1e-4, "Hessian off by %g", worst);
    free(x);
    free(H);
}

static void test_cholesky(zse_pool *pool)
{
    const int64_t n = 150; /* crosses two tile boundaries */
    double *B = malloc((size_t)(n * n) * sizeof *B), *A = malloc((size_t)(n * n) * sizeof *A);
    double *L = malloc((size_t)(n * n) * sizeof *L);
    float *X = malloc((size_t)(n * n) * sizeof *X);
    for (int64_t i = 0; i < n * n; i++)
        B[i] = gauss();
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < n; c++) {
            double s = i == c ? 1.0 : 0.0;
            for (int64_t k = 0; k < n; k++)
                s += B[i * n + k] * B[c * n + k];
            A[i * n + c] = s;
        }
    memcpy(L, A, (size_t)(n * n) * sizeof *L);
    CHECK(zse_cholesky(L, n, pool) == 0);
    double worst = 0, worst_inv = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c <= i; c++) {
            double s = 0;
            for (int64_t k = 0; k <= c; k++)
                s += L[i * n + k] * L[c * n + k];
            worst = fmax(worst, fabs(s - A[i * n + c]) / A[i * n + i]);
        }
    CHECK_MSG(worst < 1e-10, "L L^T off by %g", worst);
    zse_tri_lower_inverse(L, X, n, pool);
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < n; c++) {
            double s = 0;
            for (int64_t k = 0; k < n; k++)
                s += (k <= i ? L[i * n + k] : 0) * X[k * n + c];
            worst_inv = fmax(worst_inv, fabs(s - (i == c)));
            if (c > i && X[i * n + c] != 0)
                worst_inv = INFINITY; /* the upper triangle stays zero */
        }
    CHECK_MSG(worst_inv < 1e-5, "L X - I off by %g (X in f32)", worst_inv);
    /* not positive definite: refused, not a NaN factor */
    memcpy(L, A, (size_t)(n * n) * sizeof *L);
    L[77 * n + 77] = -1;
    CHECK(zse_cholesky(L, n, pool) == -1);
    free(B);
    free(A);
    free(L);
    free(X);
}

/* ---- GPTQ ---------------------------------------------------------------------------------- */

static double rtn_error(const zse_qshape *q, const float *W, const float *H, zse_pool *pool)
{
    float *deq = malloc((size_t)(q->rows * q->cols) * sizeof *deq);
    CHECK(zse_fake_quantize(q, W, deq) == 0);
    double e = zse_weighted_error(W, deq, q->rows, q->cols, H, 1, pool);
    free(deq);
    return e;
}

static double gptq_error(const zse_qshape *q, const float *W, const float *H, zse_pool *pool)
{
    size_t bytes = zse_qshape_bytes(q);
    uint8_t *packed = calloc(1, bytes);
    float *deq = malloc((size_t)(q->rows * q->cols) * sizeof *deq);
    zse_gptq_factor *f = zse_gptq_factor_new(H, q->cols, 0.01, pool);
    CHECK(f != NULL && zse_gptq(q, W, f, packed, pool) == 0);
    zse_gptq_factor_free(f);
    zse_dequantize_all(q, packed, deq);
    /* every value is one the layout can hold: the packed tensor is what the kernels read */
    float row[300];
    zse_dequantize_row(q, packed, q->rows - 1, row);
    CHECK(memcmp(row, deq + (q->rows - 1) * q->cols, (size_t)q->cols * sizeof *row) == 0);
    double e = zse_weighted_error(W, deq, q->rows, q->cols, H, 1, pool);
    free(packed);
    free(deq);
    return e;
}

static void test_gptq(zse_pool *pool)
{
    const int64_t rows = 48, T = 1024;
    static const struct {
        zse_scheme s;
        int64_t cols;
        int g;
    } cases[] = {
        {ZSE_SCHEME_Q4, 256, 128}, {ZSE_SCHEME_Q4, 256, 32}, {ZSE_SCHEME_Q4S, 256, 64},
        {ZSE_SCHEME_NF4, 256, 128}, {ZSE_SCHEME_Q4, 200, 64}, /* a padded last group */
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const int64_t n = cases[k].cols;
        float *x = make_activations(T, n), *W = make_weights(rows, n);
        float *H = calloc((size_t)(n * n), sizeof *H);
        zse_hessian_accumulate(H, n, x, T, n, pool);
        zse_hessian_mirror(H, n);
        zse_qshape q = {cases[k].s, rows, n, cases[k].g};
        double rtn = rtn_error(&q, W, H, pool), gptq = gptq_error(&q, W, H, pool);
        /* on the activations it saw, GPTQ's output error is well below round to nearest's */
        CHECK_MSG(gptq < 0.7 * rtn, "%s g%d cols %lld: GPTQ %g vs RTN %g", zse_scheme_name(q.scheme), q.group_size,
                  (long long)n, gptq, rtn);
        free(x);
        free(W);
        free(H);
    }
    /* a channel no input ever reached (H row and column zero) does not break the factor */
    const int64_t n = 128;
    float *x = make_activations(T, n), *W = make_weights(rows, n);
    for (int64_t t = 0; t < T; t++)
        x[t * n + 3] = 0;
    float *H = calloc((size_t)(n * n), sizeof *H);
    zse_hessian_accumulate(H, n, x, T, n, pool);
    zse_hessian_mirror(H, n);
    zse_qshape q = {ZSE_SCHEME_Q4, rows, n, 128};
    CHECK(gptq_error(&q, W, H, pool) < rtn_error(&q, W, H, pool));
    /* not a 4-bit scheme: refused */
    zse_qshape q8 = {ZSE_SCHEME_Q8, rows, n, 0};
    uint8_t *packed = calloc(1, zse_qshape_bytes(&q8));
    zse_gptq_factor *f = zse_gptq_factor_new(H, n, 0.01, pool);
    CHECK(zse_gptq(&q8, W, f, packed, pool) == -1);
    CHECK(strstr(zse_error_message(), "4-bit") != NULL);
    /* a Hessian that no damping makes positive definite: a clear error */
    float *bad = malloc((size_t)(n * n) * sizeof *bad);
    memcpy(bad, H, (size_t)(n * n) * sizeof *bad);
    bad[5 * n + 5] = NAN;
    CHECK(zse_gptq_factor_new(bad, n, 0.01, pool) == NULL);
    CHECK(strstr(zse_error_message(), "not positive definite") != NULL);
    free(bad);
    /* nor a weight of another width */
    zse_qshape q64 = {ZSE_SCHEME_Q4, rows, 64, 64};
    CHECK(zse_gptq(&q64, W, f, packed, pool) == -1);
    zse_gptq_factor_free(f);
    free(packed);
    free(x);
    free(W);
    free(H);
}

/* ---- AWQ ------------------------------------------------------------------------------------ */

static void test_awq(zse_pool *pool)
{
    const int64_t n = 256, T = 1024;
    float *x = make_activations(T, n);
    float *H = calloc((size_t)(n * n), sizeof *H);
    zse_hessian_accumulate(H, n, x, T, n, pool);
    zse_hessian_mirror(H, n);
    const int64_t rows[2] = {64, 32};
    float *w0 = make_weights(rows[0], n), *w1 = make_weights(rows[1], n);
    const float *ws[2] = {w0, w1};
    float *s = malloc((size_t)n * sizeof *s);
    zse_qshape q = {ZSE_SCHEME_Q4, 0, n, 128};
    zse_awq_result res;
    CHECK(zse_awq_search(&q, ws, rows, 2, H, s, &res, pool) == 0);
    /* outlier channels make scaling pay: some alpha > 0 wins, and never loses to plain RTN */
    CHECK_MSG(res.alpha > 0 && res.error < res.error_rtn, "alpha %g: %g vs %g", res.alpha, res.error, res.error_rtn);
    double lo = INFINITY, hi = 0;
    for (int64_t c = 0; c < n; c++) {
        lo = fmin(lo, s[c]);
        hi = fmax(hi, s[c]);
    }
    CHECK_NEAR(lo * hi, 1.0, 1e-4);
    CHECK(s[5] > s[6]); /* an outlier channel is scaled up against its neighbours */
    /* the error it reports is the error of those scales: RTN of W diag(s), then / s */
    float *a = malloc((size_t)(rows[0] * n) * sizeof *a), *b = malloc((size_t)(rows[0] * n) * sizeof *b);
    double e = 0;
    for (int t = 0; t < 2; t++) {
        zse_qshape qt = {ZSE_SCHEME_Q4, rows[t], n, 128};
        for (int64_t i = 0; i < rows[t] * n; i++)
            a[i] = ws[t][i] * s[i % n];
        CHECK(zse_fake_quantize(&qt, a, b) == 0);
        for (int64_t i = 0; i < rows[t] * n; i++)
            b[i] /= s[i % n];
        e += zse_weighted_error(ws[t], b, rows[t], n, H, 1, pool);
    }
    CHECK_MSG(fabs(e - res.error) < 1e-3 * e, "%g vs %g", e, res.error);
    /* the folding identity the converter relies on: y = W (g * v) = (W diag(s)) ((g / s) * v) */
    double worst = 0;
    for (int64_t r = 0; r < 4; r++) {
        double y = 0, ys = 0;
        for (int64_t c = 0; c < n; c++) {
            const float g = 1.0f + 0.1f * (float)(c % 7), v = x[c];
            y += (double)w0[r * n + c] * (g * v);
            ys += (double)(w0[r * n + c] * s[c]) * ((g / s[c]) * v);
        }
        worst = fmax(worst, fabs(y - ys) / (fabs(y) + 1e-3));
    }
    CHECK_MSG(worst < 1e-5, "folded output off by %g", worst);
    free(a);
    free(b);
    free(x);
    free(H);
    free(w0);
    free(w1);
    free(s);
}

/* ---- the plan ------------------------------------------------------------------------------- */

static void test_plan(void)
{
    /* tensor 0: sensitive; tensor 1: not; tensor 2: one option only */
    const zse_plan_option t0[4] = {{100, 10.0}, {110, 6.0}, {125, 5.5}, {200, 0.1}};
    const zse_plan_option t1[4] = {{100, 1.0}, {110, 0.8}, {125, 0.7}, {200, 0.01}};
    const zse_plan_option t2[1] = {{50, 0.5}};
    const zse_plan_option *opts[3] = {t0, t1, t2};
    const int n_opts[3] = {4, 4, 1};
    int choice[3];
    /* exactly the smallest: all at their first option */
    CHECK(zse_plan_choose(opts, n_opts, 3, 250, choice) == 0);
    CHECK(choice[0] == 0 && choice[1] == 0 && choice[2] == 0);
    /* below the smallest: a clear error */
    CHECK(zse_plan_choose(opts, n_opts, 3, 249, choice) == -1);
    CHECK(strstr(zse_error_message(), "over the budget") != NULL);
    /* 15 bytes more: the sensitive tensor's first step (4 per 10 bytes) takes 10 of them */
    CHECK(zse_plan_choose(opts, n_opts, 3, 265, choice) == 0);
    CHECK(choice[0] == 1 && choice[1] == 0);
    /* 20: then the other's first step (0.2 per 10 bytes) fits too */
    CHECK(zse_plan_choose(opts, n_opts, 3, 270, choice) == 0);
    CHECK(choice[0] == 1 && choice[1] == 1);
    /* t0's 125-byte option lies above its hull (110 -> 200 is better per byte): skipped */
    CHECK(zse_plan_choose(opts, n_opts, 3, 350, choice) == 0);
    CHECK(choice[0] == 3 && choice[1] == 0);
    /* every budget is respected, and more budget never costs more */
    double last = INFINITY;
    for (uint64_t budget = 250; budget <= 460; budget += 5) {
        CHECK(zse_plan_choose(opts, n_opts, 3, budget, choice) == 0);
        uint64_t used = t0[choice[0]].bytes + t1[choice[1]].bytes + t2[choice[2]].bytes;
        double cost = t0[choice[0]].cost + t1[choice[1]].cost + t2[choice[2]].cost;
        CHECK_MSG(used <= budget, "budget %llu: used %llu", (unsigned long long)budget, (unsigned long long)used);
        CHECK(cost <= last);
        last = cost;
    }
    /* a budget for everything: the least cost of each */
    CHECK(zse_plan_choose(opts, n_opts, 3, 1000, choice) == 0);
    CHECK(choice[0] == 3 && choice[1] == 3 && choice[2] == 0);
}

int main(void)
{
    zse_pool *pool = zse_pool_create(2);
    test_hessian(pool);
    test_cholesky(pool);
    test_cholesky(NULL);
    test_gptq(pool);
    test_awq(pool);
    test_plan();
    zse_pool_free(pool);
    return test_main_end();
}
