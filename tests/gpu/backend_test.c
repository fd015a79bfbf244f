/* backend_test — the CUDA backend through zse_backend_ops, as the model code calls it, on
 * tensors packed by src/quant (zse_quantize_rows) and checked against zse_dequantize_row
 * and plain C references: weight_load (pinned ring, plane offsets, re-pitched plain rows),
 * act_write/act_read with padded pitches, begin_batch, embed, rmsnorm (whole rows and per
 * head), matmul on both paths, add_bias, silu_mul, add, rope, kv_store + attention over a
 * paged f16 and int8 cache, gather_out_rows, and the sticky error that sync() reports.
 * Runs on the GPU device (tests/gpu/run.sh); exits 77 without a CUDA device. */
#include "backend/backend.h"
#include "quant/quant.h"
#include "util/util.h"

#include "test.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rng = 88172645463325252ull;
static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.f - 1.f;
}

static float *rand_floats(size_t n)
{
    float *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++)
        v[i] = frand();
    return v;
}

/* a packed tensor made the way zse convert makes it */
typedef struct {
    zse_tensor_info info;
    void *bytes;
    float *deq;     /* rows x cols, what the packed tensor decodes to */
} packed;

static void pack(packed *p, zse_scheme s, int64_t rows, int64_t cols, int group, const float *src)
{
    memset(p, 0, sizeof *p);
    p->info.name = "test";
    p->info.q.scheme = s;
    p->info.q.rows = rows;
    p->info.q.cols = cols;
    p->info.q.group_size = zse_scheme_is_grouped(s) ? group : 0;
    p->info.layout = zse_scheme_layout(s);
    size_t bytes = zse_qshape_bytes(&p->info.q);
    p->bytes = calloc(1, bytes);
    zse_quantize_rows(&p->info.q, src, p->bytes, 0, rows);
    p->info.size = bytes;
    p->info.data = p->bytes;
    p->deq = malloc((size_t)(rows * cols) * sizeof(float));
    for (int64_t r = 0; r < rows; r++)
        zse_dequantize_row(&p->info.q, p->bytes, r, p->deq + r * cols);
}

static void unpack(packed *p)
{
    free(p->bytes);
    free(p->deq);
}

static double rel_err(const double *ref, const float *got, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        num += (got[i] - ref[i]) * (got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* a batch of n tokens of one sequence at positions 0..n-1, blocks given by table */
typedef struct {
    int32_t tokens[64], positions[64], seq_of[64], slots[64], seq_lens[1], table[8], out_rows[64];
    zse_batch b;
} one_seq;

static void one_seq_batch(one_seq *s, int n, const int32_t *tokens, int block_size, int n_out)
{
    memset(s, 0, sizeof *s);
    static const int32_t blocks[8] = {5, 2, 7, 0, 3, 6, 1, 4};    /* shuffled physical blocks */
    for (int i = 0; i < 8; i++)
        s->table[i] = blocks[i];
    for (int t = 0; t < n; t++) {
        s->tokens[t] = tokens ? tokens[t] : 0;
        s->positions[t] = t;
        s->seq_of[t] = 0;
        s->slots[t] = s->table[t / block_size] * block_size + t % block_size;
    }
    for (int i = 0; i < n_out; i++)
        s->out_rows[i] = n - n_out + i;
    s->seq_lens[0] = n;
    s->b = (zse_batch){n, s->tokens, s->positions, s->seq_of, s->slots, 1, s->seq_lens, s->table, 8,
                       n_out, s->out_rows};
}

static void test_matmul(zse_backend *be)
{
    const struct { zse_scheme s; int group; int64_t rows, cols; } cases[] = {
        {ZSE_SCHEME_Q4, 64, 45, 200}, {ZSE_SCHEME_Q4S, 32, 33, 96},  {ZSE_SCHEME_NF4, 128, 17, 300},
        {ZSE_SCHEME_Q8, 0, 40, 100},  {ZSE_SCHEME_F16, 0, 19, 37},   {ZSE_SCHEME_BF16, 0, 50, 128},
        {ZSE_SCHEME_F32, 0, 9, 21},   {ZSE_SCHEME_Q8G, 32, 23, 160}, {ZSE_SCHEME_Q8G, 128, 7, 300},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int64_t rows = cases[c].rows, cols = cases[c].cols;
        float *src = rand_floats((size_t)(rows * cols));
        packed p;
        pack(&p, cases[c].s, rows, cols, cases[c].group, src);
        zse_weight *w = be->ops->weight_load(be, &p.info);
        CHECK_MSG(w != NULL, "weight_load %s: %s", zse_scheme_name(cases[c].s), zse_error_message());
        if (!w)
            continue;
        for (int n = 1; n <= 20; n += 19) {     /* GEMV (1) and GEMM (20) */
            float *x = rand_floats((size_t)(n * cols)), *y = malloc((size_t)(n * rows) * sizeof(float));
            double *ref = malloc((size_t)(n * rows) * sizeof(double));
            zse_act *ax = be->ops->act_new(be, n, cols), *ay = be->ops->act_new(be, n, rows);
            CHECK(be->ops->act_write(be, ax, x, n) == 0);
            be->ops->matmul(be, w, ax, n, ay);
            CHECK(be->ops->sync(be) == 0);
            CHECK(be->ops->act_read(be, ay, y, n) == 0);
            for (int t = 0; t < n; t++)
                for (int64_t r = 0; r < rows; r++) {
                    double s = 0;
                    for (int64_t k = 0; k < cols; k++)
                        s += (double)p.deq[r * cols + k] * x[t * cols + k];
                    ref[t * rows + r] = s;
                }
            double e = rel_err(ref, y, (size_t)(n * rows)), tol = n == 1 ? 1e-4 : 3e-3;
            CHECK_MSG(e < tol, "matmul %s n=%d: rel err %g", zse_scheme_name(cases[c].s), n, e);
            be->ops->act_free(be, ax);
            be->ops->act_free(be, ay);
            free(x);
            free(y);
            free(ref);
        }
        be->ops->weight_free(be, w);
        unpack(&p);
        free(src);
    }
}

/* y = W v for the test weight (rows x cols) */
static void ref_matvec(const packed *w, int64_t rows, int64_t cols, const double *v, double *y)
{
    for (int64_t r = 0; r < rows; r++) {
        double s = 0;
        for (int64_t k = 0; k < cols; k++)
            s += (double)w->deq[r * cols + k] * v[k];
        y[r] = s;
    }
}

/* RMSNorm and SiLU·mul leave their output as the 4-bit matmul of the next op reads it
 * (quantized at 1 row, f16 for tensor cores at 8), and only for it: the matmul right after
 * uses it (results as the plain path's), a write in between (act_write, add) or a second
 * RMSNorm into another buffer makes the matmul convert x itself again. A hand-off that
 * outlived its op would multiply stale values here. */
static void test_prep_handoff(zse_backend *be, int n)
{
    enum { ROWS = 45, COLS = 96, N = 8 };
    const int64_t rows = ROWS, cols = COLS;
    float *src = rand_floats((size_t)(rows * cols)), *normw = rand_floats((size_t)cols);
    float *x = rand_floats((size_t)(N * cols)), *x2 = rand_floats((size_t)(N * cols)), *z = rand_floats((size_t)(N * cols)),
          *d = rand_floats((size_t)(N * cols)), *u = rand_floats((size_t)(N * cols)), y[N * ROWS];
    packed pw, pn;
    pack(&pw, ZSE_SCHEME_Q4, rows, cols, 32, src);
    pack(&pn, ZSE_SCHEME_F32, 1, cols, 0, normw);
    zse_weight *w = be->ops->weight_load(be, &pw.info), *wn = be->ops->weight_load(be, &pn.info);
    CHECK_MSG(w && wn, "weight_load: %s", zse_error_message());
    zse_act *ax = be->ops->act_new(be, n, cols), *ax2 = be->ops->act_new(be, n, cols),
            *ab = be->ops->act_new(be, n, cols), *ab2 = be->ops->act_new(be, n, cols),
            *ad = be->ops->act_new(be, n, cols), *au = be->ops->act_new(be, n, cols),
            *ay = be->ops->act_new(be, n, rows);
    if (!w || !wn || !ax || !ax2 || !ab || !ab2 || !ad || !au || !ay)
        return;
    CHECK(be->ops->act_write(be, ax, x, n) == 0 && be->ops->act_write(be, ax2, x2, n) == 0 &&
          be->ops->act_write(be, ad, d, n) == 0 && be->ops->act_write(be, au, u, n) == 0);
    double xn[N * COLS], v[COLS], ref[N * ROWS];
    for (int t = 0; t < n; t++) {
        double ss = 0;
        for (int64_t k = 0; k < cols; k++)
            ss += (double)x[t * cols + k] * x[t * cols + k];
        for (int64_t k = 0; k < cols; k++)
            xn[t * cols + k] = x[t * cols + k] / sqrt(ss / (double)cols + 1e-5) * normw[k];
    }
    const char *cases[] = {"rmsnorm -> matmul", "rmsnorm -> act_write -> matmul", "rmsnorm -> add -> matmul",
                           "rmsnorm, rmsnorm into another buffer -> matmul", "silu_mul -> matmul"};
    for (int c = 0; c < 5; c++) {
        be->ops->rmsnorm(be, ax, wn, 1e-5f, n, cols, ab);
        if (c == 1)
            CHECK(be->ops->act_write(be, ab, z, n) == 0);
        else if (c == 2)
            be->ops->add(be, ab, ad, n, cols);
        else if (c == 3)
            be->ops->rmsnorm(be, ax2, wn, 1e-5f, n, cols, ab2);
        else if (c == 4)
            be->ops->silu_mul(be, ad, au, n, cols, ab);
        be->ops->matmul(be, w, ab, n, ay);
        CHECK(be->ops->sync(be) == 0 && be->ops->act_read(be, ay, y, n) == 0);
        for (int t = 0; t < n; t++) {
            for (int64_t k = 0; k < cols; k++) {
                const int64_t i = t * cols + k;
                v[k] = c == 1 ? z[i] : c == 2 ? xn[i] + d[i] : c == 4 ? d[i] / (1.0 + exp(-(double)d[i])) * u[i] : xn[i];
            }
            ref_matvec(&pw, rows, cols, v, ref + t * rows);
        }
        double e = rel_err(ref, y, (size_t)(n * rows)), tol = n == 1 ? 1e-4 : 3e-3;
        CHECK_MSG(e < tol, "%s, %d rows: rel err %g", cases[c], n, e);
    }
    zse_act *acts[] = {ax, ax2, ab, ab2, ad, au, ay};
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++)
        be->ops->act_free(be, acts[i]);
    be->ops->weight_free(be, w);
    be->ops->weight_free(be, wn);
    unpack(&pw);
    unpack(&pn);
    free(src);
    free(normw);
    free(x);
    free(x2);
    free(z);
    free(d);
    free(u);
}

/* embed -> rmsnorm -> add_bias -> silu_mul -> add -> gather_out_rows, each checked */
static void test_elementwise(zse_backend *be)
{
    const int64_t vocab = 50, dim = 72;
    float *table_src = rand_floats((size_t)(vocab * dim)), *normw = rand_floats((size_t)dim);
    packed table, norm, hnorm;
    pack(&table, ZSE_SCHEME_Q8, vocab, dim, 0, table_src);
    pack(&norm, ZSE_SCHEME_F32, 1, dim, 0, normw);
    pack(&hnorm, ZSE_SCHEME_BF16, 1, 9, 0, normw);      /* per-head norm: head_dim 9, bf16 */
    zse_weight *wt = be->ops->weight_load(be, &table.info), *wn = be->ops->weight_load(be, &norm.info),
               *wh = be->ops->weight_load(be, &hnorm.info);
    CHECK(wt && wn && wh);
    if (!wt || !wn || !wh)
        return;
    const int32_t toks[5] = {3, 49, 0, 7, 3};
    one_seq s;
    one_seq_batch(&s, 5, toks, 16, 2);
    CHECK(be->ops->begin_batch(be, &s.b) == 0);
    zse_act *e = be->ops->act_new(be, 5, dim), *o = be->ops->act_new(be, 5, dim),
            *g = be->ops->act_new(be, 2, dim);
    be->ops->embed(be, wt, e);
    be->ops->rmsnorm(be, e, wn, 1e-5f, 5, dim, o);          /* whole rows */
    be->ops->add_bias(be, o, wn, 5);
    be->ops->silu_mul(be, o, e, 5, dim, o);
    be->ops->add(be, o, e, 5, dim);
    be->ops->rmsnorm(be, o, wh, 1e-5f, 5 * 8, dim / 8, e);  /* per head: 8 heads of 9 */
    be->ops->gather_out_rows(be, e, dim, g);
    CHECK(be->ops->sync(be) == 0);
    float got[5 * 72];
    CHECK(be->ops->act_read(be, g, got, 2) == 0);
    /* reference */
    double ref[5 * 72], cur[5 * 72];
    for (int t = 0; t < 5; t++) {
        const float *row = table.deq + toks[t] * dim;
        double ss = 0;
        for (int i = 0; i < dim; i++)
            ss += (double)row[i] * row[i];
        double inv = 1 / sqrt(ss / dim + 1e-5);
        for (int i = 0; i < dim; i++) {
            double v = row[i] * inv * normw[i] + normw[i];
            v = v / (1 + exp(-v)) * row[i] + row[i];
            cur[t * dim + i] = v;
        }
        for (int h = 0; h < 8; h++) {
            double hs = 0;
            for (int i = 0; i < 9; i++)
                hs += cur[t * dim + h * 9 + i] * cur[t * dim + h * 9 + i];
            double hinv = 1 / sqrt(hs / 9 + 1e-5);
            for (int i = 0; i < 9; i++)
                cur[t * dim + h * 9 + i] *= hinv * hnorm.deq[i];
        }
    }
    for (int i = 0; i < 2; i++)
        memcpy(ref + i * dim, cur + (3 + i) * dim, (size_t)dim * sizeof(double));
    double err = rel_err(ref, got, (size_t)(2 * dim));
    CHECK_MSG(err < 1e-5, "embed..gather chain: rel err %g", err);
    /* a shape error is kept and reported by sync() */
    be->ops->rmsnorm(be, e, wn, 1e-5f, 5, dim + 1, o);
    CHECK(be->ops->sync(be) != 0);
    CHECK(strstr(zse_error_message(), "rmsnorm") != NULL);
    be->ops->act_free(be, e);
    be->ops->act_free(be, o);
    be->ops->act_free(be, g);
    be->ops->weight_free(be, wt);
    be->ops->weight_free(be, wn);
    be->ops->weight_free(be, wh);
    unpack(&table);
    unpack(&norm);
    unpack(&hnorm);
    free(table_src);
    free(normw);
}

/* argmax_rows: the host sampler's rule (largest value, lowest index on ties) on rows wider
 * than a block, with the maximum at the first, the last and a tied position, and NaNs */
/* an embedding table left in host memory (weight_load_lookup) gives the rows a device copy
 * gives, bit for bit, for every layout: int8 rows, 4-bit groups with and without mins,
 * f16 rows whose bytes are not a multiple of 16; twice, with two batches between */
static void test_lookup(zse_backend *be)
{
    const struct { zse_scheme s; int64_t dim; int group; } cases[] = {
        {ZSE_SCHEME_Q8, 72, 0}, {ZSE_SCHEME_Q4, 96, 32}, {ZSE_SCHEME_Q4S, 128, 64}, {ZSE_SCHEME_F16, 36, 0}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int64_t vocab = 40, dim = cases[c].dim;
        float *src = rand_floats((size_t)(vocab * dim));
        packed table;
        pack(&table, cases[c].s, vocab, dim, cases[c].group, src);
        zse_weight *dev = be->ops->weight_load(be, &table.info), *host = be->ops->weight_load_lookup(be, &table.info);
        CHECK(dev && host);
        for (int round = 0; round < 2 && dev && host; round++) {
            const int32_t toks[2][6] = {{3, 39, 0, 7, 3, 21}, {1, 1, 38, 5, 0, 12}};
            one_seq s;
            one_seq_batch(&s, 6, toks[round], 16, 1);
            CHECK(be->ops->begin_batch(be, &s.b) == 0);
            zse_act *a = be->ops->act_new(be, 6, dim), *b = be->ops->act_new(be, 6, dim);
            be->ops->embed(be, dev, a);
            be->ops->embed(be, host, b);
            CHECK(be->ops->sync(be) == 0);
            float *ga = malloc((size_t)(6 * dim) * sizeof(float)), *gb = malloc((size_t)(6 * dim) * sizeof(float));
            CHECK(be->ops->act_read(be, a, ga, 6) == 0 && be->ops->act_read(be, b, gb, 6) == 0);
            CHECK_MSG(memcmp(ga, gb, (size_t)(6 * dim) * sizeof(float)) == 0, "lookup %s round %d differs",
                      zse_scheme_name(cases[c].s), round);
            const float want = table.deq[toks[round][0] * dim];
            CHECK_MSG(fabsf(ga[0] - want) <= 1e-5f * (1 + fabsf(want)), "lookup %s: row %d not embedded",
                      zse_scheme_name(cases[c].s), toks[round][0]);
            free(ga);
            free(gb);
            be->ops->act_free(be, a);
            be->ops->act_free(be, b);
        }
        be->ops->weight_free(be, dev);
        be->ops->weight_free(be, host);
        unpack(&table);
        free(src);
    }
}

static void test_argmax(zse_backend *be)
{
    enum { ROWS = 5, COLS = 152064 + 3 };
    float *x = rand_floats((size_t)ROWS * COLS);
    int32_t want[ROWS] = {0, COLS - 1, 777, 4096, 1};
    for (int r = 0; r < ROWS; r++)
        x[(size_t)r * COLS + (size_t)want[r]] = 50.f + (float)r;
    x[(size_t)2 * COLS + 90000] = 52.f;             /* a tie after the first: 777 must win */
    x[(size_t)3 * COLS + 10] = NAN;                 /* NaNs never win */
    x[(size_t)4 * COLS] = NAN;
    zse_act *a = be->ops->act_new(be, ROWS, COLS);
    int32_t got[ROWS];
    CHECK(a && be->ops->act_write(be, a, x, ROWS) == 0);
    int32_t got_init[ROWS] = {-1, -1, -1, -1, -1};
    memcpy(got, got_init, sizeof got);
    CHECK_MSG(a && be->ops->argmax_rows(be, a, ROWS, COLS, got) == 0, "%s", zse_error_message());
    for (int r = 0; a && r < ROWS; r++)
        CHECK_MSG(got[r] == want[r], "argmax row %d: %d, expected %d", r, got[r], want[r]);
    be->ops->act_free(be, a);
    free(x);
}

/* rope + kv_store + attention for a 40-token prompt, GQA 4:2, head_dim 32 */
static void test_attention(zse_kv_store store)
{
    zse_backend *be = zse_cuda_backend_create(0);
    CHECK(be != NULL);
    if (!be)
        return;
    enum { N = 40, NH = 4, NKV = 2, HD = 32, BS = 16 };
    zse_kv_shape shape = {2, 8, BS, NKV, HD, store};
    zse_kv *kv = be->ops->kv_new(be, &shape);
    CHECK(kv != NULL);
    float inv_freq[HD / 2];
    for (int i = 0; i < HD / 2; i++)
        inv_freq[i] = powf(10000.f, -2.f * i / HD);
    CHECK(be->ops->rope_init(be, inv_freq, HD / 2, 1.f) == 0);
    one_seq s;
    one_seq_batch(&s, N, NULL, BS, 1);
    CHECK(be->ops->begin_batch(be, &s.b) == 0);
    float *q = rand_floats(N * NH * HD), *k = rand_floats(N * NKV * HD), *v = rand_floats(N * NKV * HD);
    zse_act *aq = be->ops->act_new(be, N, NH * HD), *ak = be->ops->act_new(be, N, NKV * HD),
            *av = be->ops->act_new(be, N, NKV * HD), *ao = be->ops->act_new(be, N, NH * HD);
    be->ops->act_write(be, aq, q, N);
    be->ops->act_write(be, ak, k, N);
    be->ops->act_write(be, av, v, N);
    be->ops->rope(be, aq, ak, NH, NKV, HD);
    be->ops->kv_store(be, kv, 1, ak, av);
    zse_attn_params ap = {NH, NKV, HD, 1.f / sqrtf(HD), 0};
    be->ops->attention(be, kv, 1, aq, &ap, ao);
    CHECK(be->ops->sync(be) == 0);
    static float out[N * NH * HD];
    CHECK(be->ops->act_read(be, ao, out, N) == 0);
    /* reference: rope in double, then causal softmax attention */
    static double qr[N * NH * HD], kr[N * NKV * HD], ref[N * NH * HD];
    for (int t = 0; t < N; t++)
        for (int h = 0; h < NH + NKV; h++) {
            const float *src = h < NH ? q + (t * NH + h) * HD : k + (t * NKV + h - NH) * HD;
            double *dst = h < NH ? qr + (t * NH + h) * HD : kr + (t * NKV + h - NH) * HD;
            for (int i = 0; i < HD / 2; i++) {
                double a = (double)(float)(t * inv_freq[i]), c = cos(a), sn = sin(a);
                dst[i] = src[i] * c - src[i + HD / 2] * sn;
                dst[i + HD / 2] = src[i + HD / 2] * c + src[i] * sn;
            }
        }
    for (int t = 0; t < N; t++)
        for (int h = 0; h < NH; h++) {
            const int kh = h / (NH / NKV);
            double sc[N], m = -1e300, den = 0;
            for (int p = 0; p <= t; p++) {
                double d = 0;
                for (int i = 0; i < HD; i++)
                    d += qr[(t * NH + h) * HD + i] * kr[(p * NKV + kh) * HD + i];
                sc[p] = d / sqrt(HD);
                if (sc[p] > m)
                    m = sc[p];
            }
            for (int p = 0; p <= t; p++)
                den += (sc[p] = exp(sc[p] - m));
            for (int i = 0; i < HD; i++) {
                double a = 0;
                for (int p = 0; p <= t; p++)
                    a += sc[p] * v[(p * NKV + kh) * HD + i];
                ref[(t * NH + h) * HD + i] = a / den;
            }
        }
    double e = rel_err(ref, out, N * NH * HD), tol = store == ZSE_KV_STORE_INT8 ? 2e-2 : 3e-3;
    CHECK_MSG(e < tol, "rope+kv_store+attention (%s KV): rel err %g", store == ZSE_KV_STORE_INT8 ? "int8" : "f16", e);
    be->ops->act_free(be, aq);
    be->ops->act_free(be, ak);
    be->ops->act_free(be, av);
    be->ops->act_free(be, ao);
    be->ops->kv_free(be, kv);
    be->ops->destroy(be);
    free(q);
    free(k);
    free(v);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* weight_load throughput from host memory already resident (the page-cache case): one
 * 2 GiB f16 tensor and 64 tensors of 32 MiB, as a model's layers come */
static int bench_load(void)
{
    zse_backend *be = zse_cuda_backend_create(0);
    if (!be) {
        fprintf(stderr, "%s\n", zse_error_message());
        return 1;
    }
    const size_t big = (size_t)2 << 30;
    uint8_t *host = malloc(big);
    if (!host)
        return 1;
    for (size_t i = 0; i < big; i += 4096)
        host[i] = (uint8_t)i;   /* touch every page */
    const struct { int64_t rows, cols; int count; } shapes[] = {{32768, 32768, 1}, {4096, 4096, 64}};
    for (int s = 0; s < 2; s++) {
        zse_tensor_info t;
        memset(&t, 0, sizeof t);
        t.name = "bench";
        t.q.scheme = ZSE_SCHEME_F16;
        t.q.rows = shapes[s].rows;
        t.q.cols = shapes[s].cols;
        t.layout = ZSE_LAYOUT_PLAIN;
        t.size = (uint64_t)(shapes[s].rows * shapes[s].cols * 2);
        zse_weight *ws[64];
        double t0 = now_s();
        for (int i = 0; i < shapes[s].count; i++) {
            t.data = host + (size_t)i * t.size % big;
            ws[i] = be->ops->weight_load(be, &t);
            if (!ws[i]) {
                fprintf(stderr, "%s\n", zse_error_message());
                return 1;
            }
        }
        double dt = now_s() - t0;
        printf("BENCH weight_load %d x %lld x %lld f16: %.3f s, %.1f GB/s\n", shapes[s].count,
               (long long)shapes[s].rows, (long long)shapes[s].cols, dt,
               (double)t.size * shapes[s].count / dt / 1e9);
        for (int i = 0; i < shapes[s].count; i++)
            be->ops->weight_free(be, ws[i]);
    }
    free(host);
    be->ops->destroy(be);
    return 0;
}

int main(int argc, char **argv)
{
    if (zse_cuda_device_count() < 1) {
        printf("no CUDA device: skipped\n");
        return 77;
    }
    if (argc > 1 && strcmp(argv[1], "--bench-load") == 0)
        return bench_load();
    CHECK(zse_cuda_backend_create(zse_cuda_device_count()) == NULL);
    zse_backend *be = zse_cuda_backend_create(0);
    CHECK_MSG(be != NULL, "%s", zse_error_message());
    if (!be)
        return test_main_end();
    CHECK(strcmp(be->ops->name, "cuda") == 0);
    test_matmul(be);
    test_argmax(be);
    test_lookup(be);
    test_prep_handoff(be, 1);
    test_prep_handoff(be, 8);
    test_elementwise(be); /* last: it leaves the backend's sticky error set */
    be->ops->destroy(be);
    test_attention(ZSE_KV_STORE_F16);
    test_attention(ZSE_KV_STORE_INT8);
    return test_main_end();
}
