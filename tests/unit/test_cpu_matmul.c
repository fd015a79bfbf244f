/* CPU matmul: every scheme and kernel path (portable, AVX2, AVX-512 where the CPU has
 * them), odd shapes, groups, tails and batch sizes 1..17+, against dequantize + a double dot
 * product; the SIMD paths against each other; batch invariance; matmul_multi against the
 * ops one by one. */
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

static const char *const path_names[] = {"portable", "avx2", "avx512"};

typedef struct {
    zse_qshape q;
    uint8_t *packed;
    float *x;       /* [tokens][cols] */
    double *ref;    /* [tokens][rows]: dequantized weights · x in double */
    int64_t tokens;
} problem;

static void problem_make(problem *p, zse_scheme s, int group, int64_t rows, int64_t cols, int64_t tokens)
{
    p->q = (zse_qshape){s, rows, cols, group};
    p->tokens = tokens;
    size_t bytes = zse_qshape_bytes(&p->q);
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    p->packed = zse_aligned_alloc(64, bytes);
    memset(p->packed, 0, bytes);
    for (int64_t i = 0; i < rows * cols; i++)
        w[i] = frand();
    if (rows > 2)
        for (int64_t c = 0; c < cols; c++)
            w[cols + c] = 0; /* an all-zero row */
    zse_quantize_rows(&p->q, w, p->packed, 0, rows);
    free(w);
    p->x = malloc((size_t)(tokens * cols) * sizeof *p->x);
    for (int64_t i = 0; i < tokens * cols; i++)
        p->x[i] = frand() * 2;
    if (cols > 40)
        for (int64_t c = 32; c < 40; c++)
            p->x[c] = 40.0f * frand(); /* an outlier block in the first token */
    p->ref = malloc((size_t)(tokens * rows) * sizeof *p->ref);
    float *row = malloc((size_t)cols * sizeof *row);
    for (int64_t r = 0; r < rows; r++) {
        zse_dequantize_row(&p->q, p->packed, r, row);
        for (int64_t t = 0; t < tokens; t++) {
            double acc = 0;
            for (int64_t c = 0; c < cols; c++)
                acc += (double)row[c] * p->x[t * cols + c];
            p->ref[t * rows + r] = acc;
        }
    }
    free(row);
}

static void problem_free(problem *p)
{
    free(p->packed);
    free(p->x);
    free(p->ref);
}

/* y = W · x on the current path; also checks that every token alone gives bit-identical
 * results to its row of the batch: the scheduler relies on a row not depending on the rest
 * of the batch (whether it lands in a full tile, a short tile or the remainder). Returns
 * y [tokens][rows] (malloc). */
static float *run(zse_backend *be, const problem *p, bool *invariant)
{
    int64_t rows = p->q.rows, cols = p->q.cols, T = p->tokens;
    zse_tensor_info ti = {.name = "w", .q = p->q, .layout = zse_scheme_layout(p->q.scheme),
                          .size = zse_qshape_bytes(&p->q), .data = p->packed};
    zse_weight *wt = be->ops->weight_load(be, &ti);
    zse_act *x = be->ops->act_new(be, T, cols), *y = be->ops->act_new(be, T, rows);
    zse_act *xl = be->ops->act_new(be, 1, cols), *yl = be->ops->act_new(be, 1, rows);
    memcpy(x->data, p->x, (size_t)(T * cols) * sizeof(float));
    be->ops->matmul(be, wt, x, T, y);
    CHECK(be->ops->sync(be) == 0);
    *invariant = true;
    for (int64_t t = 0; t < T; t++) {
        memcpy(xl->data, p->x + t * cols, (size_t)cols * sizeof(float));
        be->ops->matmul(be, wt, xl, 1, yl);
        CHECK(be->ops->sync(be) == 0);
        if (memcmp(yl->data, y->data + t * rows, (size_t)rows * sizeof(float)) != 0)
            *invariant = false;
    }
    float *out = malloc((size_t)(T * rows) * sizeof *out);
    memcpy(out, y->data, (size_t)(T * rows) * sizeof *out);
    be->ops->weight_free(be, wt);
    be->ops->act_free(be, x);
    be->ops->act_free(be, y);
    be->ops->act_free(be, xl);
    be->ops->act_free(be, yl);
    return out;
}

/* relative RMS difference of y from a reference over every element */
static double rel_rms(const float *y, const double *ref_d, const float *ref_f, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double r = ref_d ? ref_d[i] : ref_f[i];
        num += (y[i] - r) * (y[i] - r);
        den += r * r;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static bool is_integer(zse_scheme s)
{
    return s == ZSE_SCHEME_Q8 || s == ZSE_SCHEME_Q4 || s == ZSE_SCHEME_Q4S || s == ZSE_SCHEME_NF4 ||
           s == ZSE_SCHEME_Q8G;
}

static zse_weight *load_weight(zse_backend *be, const zse_qshape *q, const void *data)
{
    zse_tensor_info ti = {.name = "w", .q = *q, .layout = zse_scheme_layout(q->scheme), .size = zse_qshape_bytes(q),
                          .data = data};
    return be->ops->weight_load(be, &ti);
}

/* matmul_multi (one quantization of x per activation layout, one pass over every weight's
 * rows, bias and residual add in that pass) against matmul, add_bias and add one by one:
 * bit for bit, for weights of one layout and of three (int8, int4 g128, f16) in one call */
static void check_multi(zse_backend *be, const zse_scheme schemes[3], int group, int64_t tokens, bool bias,
                        bool accumulate)
{
    const int64_t rows[3] = {33, 7, 300}, cols = 200;
    problem p[3];
    zse_weight *w[3], *b[3] = {NULL, NULL, NULL};
    zse_act *y[3], *ref[3], *tmp[3];
    zse_act *x = be->ops->act_new(be, tokens, cols);
    float *bias_data[3];
    for (int i = 0; i < 3; i++) {
        problem_make(&p[i], schemes[i], zse_scheme_is_grouped(schemes[i]) ? group : 0, rows[i], cols, tokens);
        w[i] = load_weight(be, &p[i].q, p[i].packed);
        zse_qshape bq = {ZSE_SCHEME_F32, 1, rows[i], 0};
        bias_data[i] = zse_aligned_alloc(64, (size_t)rows[i] * sizeof(float));
        for (int64_t r = 0; r < rows[i]; r++)
            bias_data[i][r] = frand();
        if (bias)
            b[i] = load_weight(be, &bq, bias_data[i]);
        y[i] = be->ops->act_new(be, tokens, rows[i]);
        ref[i] = be->ops->act_new(be, tokens, rows[i]);
        tmp[i] = be->ops->act_new(be, tokens, rows[i]);
        for (int64_t k = 0; k < tokens * rows[i]; k++)
            y[i]->data[k] = ref[i]->data[k] = frand();
    }
    memcpy(x->data, p[0].x, (size_t)(tokens * cols) * sizeof(float));
    const zse_matmul_out outs[3] = {{w[0], b[0], y[0]}, {w[1], b[1], y[1]}, {w[2], b[2], y[2]}};
    be->ops->matmul_multi(be, x, tokens, outs, 3, accumulate);
    for (int i = 0; i < 3; i++) {
        zse_act *dst = accumulate ? tmp[i] : ref[i];
        be->ops->matmul(be, w[i], x, tokens, dst);
        if (b[i])
            be->ops->add_bias(be, dst, b[i], tokens);
        if (accumulate)
            be->ops->add(be, ref[i], tmp[i], tokens, rows[i]);
    }
    CHECK(be->ops->sync(be) == 0);
    for (int i = 0; i < 3; i++) {
        const bool same = memcmp(y[i]->data, ref[i]->data, (size_t)(tokens * rows[i]) * sizeof(float)) == 0;
        CHECK_MSG(same, "matmul_multi %s/%s/%s g%d, %lld tokens%s%s: weight %d differs from the ops one by one",
                  zse_scheme_name(schemes[0]), zse_scheme_name(schemes[1]), zse_scheme_name(schemes[2]), group,
                  (long long)tokens, bias ? ", bias" : "", accumulate ? ", accumulate" : "", i);
        be->ops->weight_free(be, w[i]);
        if (b[i])
            be->ops->weight_free(be, b[i]);
        be->ops->act_free(be, y[i]);
        be->ops->act_free(be, ref[i]);
        be->ops->act_free(be, tmp[i]);
        free(bias_data[i]);
        problem_free(&p[i]);
    }
    be->ops->act_free(be, x);
}

int main(void)
{
    zse_backend *be = zse_cpu_backend_create(3);
    CHECK(be != NULL);
    const zse_scheme schemes[] = {ZSE_SCHEME_F32, ZSE_SCHEME_F16, ZSE_SCHEME_BF16, ZSE_SCHEME_Q8,
                                  ZSE_SCHEME_Q4, ZSE_SCHEME_Q4S, ZSE_SCHEME_NF4, ZSE_SCHEME_Q8G};
    /* rows x cols x tokens: one element; float tails (cols % 16); an odd number of
     * 32-chunks (cols 96 at group 32, int8 at 200 -> 224); tiles of 8 and 4 plus remainders */
    const int64_t shapes[][3] = {{1, 32, 1}, {7, 100, 3}, {5, 96, 9}, {33, 200, 17}, {64, 384, 5}, {19, 1056, 11}};
    int best = (int)zse_cpu_best_path();
    printf("kernel paths on this CPU: portable..%s\n", path_names[best]);
    for (size_t s = 0; s < sizeof schemes / sizeof schemes[0]; s++)
        for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++)
            for (int g = 32; g <= 128; g *= 2) {
                zse_scheme sc = schemes[s];
                if (!zse_scheme_is_grouped(sc) && g != 32)
                    continue;
                problem p;
                problem_make(&p, sc, zse_scheme_is_grouped(sc) ? g : 0, shapes[k][0], shapes[k][1], shapes[k][2]);
                int64_t n = p.q.rows * p.tokens;
                float *ys[3] = {NULL, NULL, NULL};
                for (int path = 0; path <= best; path++) {
                    CHECK(zse_cpu_set_path(path_names[path]) == 0);
                    bool inv;
                    ys[path] = run(be, &p, &inv);
                    double e = rel_rms(ys[path], p.ref, NULL, n);
                    /* exact weights (dequantized) against x: the integer paths add the int8
                     * activation rounding (per block of 32-128, ~0.5%) and, for nf4, codes rounded to
                     * 1/127 of the group scale */
                    double bound = path == ZSE_CPU_PORTABLE || !is_integer(sc) ? 1e-5 : 2e-2;
                    if (bound > 1e-5 && n < 8)
                        bound = 0.1; /* a lone dot product may cancel: relative error is noisy */
                    CHECK_MSG(e < bound, "%s g%d %lldx%lld b%lld %s: %g", zse_scheme_name(sc), g,
                              (long long)shapes[k][0], (long long)shapes[k][1], (long long)shapes[k][2],
                              path_names[path], e);
                    CHECK_MSG(inv, "%s %s: batch changed a token's result", zse_scheme_name(sc),
                              path_names[path]);
                }
                /* the SIMD paths do the same integer arithmetic in different orders (and
                 * offset codes differently): they agree far closer than either to the reference */
                if (best == ZSE_CPU_AVX512) {
                    double e = rel_rms(ys[2], NULL, ys[1], n);
                    CHECK_MSG(e < 2e-6, "%s g%d %lldx%lld: avx2 vs avx512 %g", zse_scheme_name(sc), g,
                              (long long)shapes[k][0], (long long)shapes[k][1], e);
                }
                for (int path = 0; path <= best; path++)
                    free(ys[path]);
                problem_free(&p);
            }
    const zse_scheme one_layout[3] = {ZSE_SCHEME_Q4, ZSE_SCHEME_Q4, ZSE_SCHEME_Q4},
                     three[3] = {ZSE_SCHEME_Q8, ZSE_SCHEME_Q4, ZSE_SCHEME_F16};
    for (int path = 0; path <= best; path++) {
        CHECK(zse_cpu_set_path(path_names[path]) == 0);
        for (int64_t tokens = 1; tokens <= 17; tokens += 8)
            for (int k = 0; k < 4; k++) {
                check_multi(be, one_layout, 32, tokens, k & 1, k & 2);
                check_multi(be, three, 128, tokens, k & 1, k & 2);
            }
    }
    CHECK(zse_cpu_set_path("auto") == 0);
    CHECK(zse_cpu_current_path() == zse_cpu_best_path());
    CHECK(zse_cpu_set_path("sse9") == -1);
    CHECK(strstr(zse_error_message(), "sse9") != NULL);
    zse_backend_destroy(be);
    return test_main_end();
}
