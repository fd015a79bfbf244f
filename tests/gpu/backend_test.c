/* backend_test — the CUDA backend through zse_backend_ops, as the model code calls it, on
 * tensors packed by src/quant (zse_quantize_rows) and checked against zse_dequantize_row
 * and plain C references: weight_load (pinned ring, plane offsets, re-pitched plain rows),
 * act_write/act_read with padded pitches, begin_batch, embed, rmsnorm (whole rows and per
 * head), matmul on both paths, add_bias, silu_mul, add, rope, kv_store + attention over a
 * paged f16 and int8 cache, gather_out_rows, the mixture-of-experts ops (experts_load from a
 * bank, routing, gather, the grouped matmul, combine), weights in host memory (host_pin,
 * slabs, slab_fetch with marks, weights in slab slots, experts_host / experts_map,
 * moe_route_read, act_write_rows: the same numbers as resident weights, bit for bit), LoRA
 * slots and lora_apply, and the sticky error that sync() reports.
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
                       n_out, s->out_rows, NULL, 0};
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

/* mask_rows (constrained decoding): on 3 of 4 rows, the masked-out tokens become -inf and
 * argmax_rows then picks the best allowed one; the unlisted row is untouched; columns past
 * the mask's words are masked too */
static void test_mask(zse_backend *be)
{
    enum { ROWS = 4, COLS = 152064 + 5, WORDS = (152064 + 31) / 32 };
    float *x = rand_floats((size_t)ROWS * COLS), *back = malloc((size_t)ROWS * COLS * sizeof(float));
    uint32_t *bits = calloc((size_t)3 * WORDS, sizeof *bits);
    const int32_t rows[3] = {0, 2, 3};
    /* row 0 allows 5 and 150000, row 2 allows a word's worth from 64, row 3 only 152063 */
    bits[0 * WORDS + 0] = 1u << 5;
    bits[0 * WORDS + 150000 / 32] = 1u << (150000 % 32);
    bits[1 * WORDS + 2] = 0xFFFFFFFFu;
    bits[2 * WORDS + 152063 / 32] = 1u << (152063 % 32);
    x[150000] = 40.f;                        /* row 0's allowed best */
    x[(size_t)2 * COLS + 70] = 41.f;         /* row 2's */
    x[(size_t)2 * COLS + 9] = 99.f;          /* larger but masked */
    x[(size_t)1 * COLS + 33] = 98.f;         /* row 1 is not masked: it wins there */
    x[(size_t)3 * COLS + 152066] = 97.f;     /* past the mask's words: masked */
    zse_act *a = be->ops->act_new(be, ROWS, COLS);
    zse_row_masks m = {3, rows, bits, WORDS};
    CHECK(a && be->ops->act_write(be, a, x, ROWS) == 0);
    CHECK_MSG(a && be->ops->mask_rows && be->ops->mask_rows(be, a, COLS, &m) == 0, "%s", zse_error_message());
    int32_t got[ROWS] = {-1, -1, -1, -1};
    CHECK_MSG(a && be->ops->argmax_rows(be, a, ROWS, COLS, got) == 0, "%s", zse_error_message());
    CHECK_MSG(got[0] == 150000 && got[1] == 33 && got[2] == 70 && got[3] == 152063, "masked argmax %d %d %d %d",
              got[0], got[1], got[2], got[3]);
    CHECK(a && be->ops->act_read(be, a, back, ROWS) == 0);
    int wrong = 0;
    for (int64_t t = 0; t < COLS; t++) {
        bool allowed0 = t == 5 || t == 150000, allowed2 = t >= 64 && t < 96, allowed3 = t == 152063;
        wrong += (back[t] == -INFINITY) == allowed0;
        wrong += back[(size_t)COLS + t] != x[(size_t)COLS + t];
        wrong += (back[(size_t)2 * COLS + t] == -INFINITY) == allowed2;
        wrong += (back[(size_t)3 * COLS + t] == -INFINITY) == allowed3;
    }
    CHECK_MSG(wrong == 0, "mask_rows: %d logits wrong", wrong);
    be->ops->act_free(be, a);
    free(x);
    free(back);
    free(bits);
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


/* ---- mixture of experts ----------------------------------------------------------------
 * A layer's experts as a .zse bank in host memory (parts at multiples of 256, experts 4096
 * apart), loaded with experts_load, and the MoE MLP through the backend's ops against a
 * double reference: routing (moe_route_experts), gather, the grouped matmul on every path
 * the token count picks, SiLU·mul, combine with a gated shared expert. */
typedef struct {
    zse_expert_bank b;
    uint8_t *buf;
    float *deq[ZSE_EXPERT_PARTS];   /* [E][rows][cols] as the parts decode */
} host_bank;

static void make_host_bank(host_bank *hb, zse_scheme s, int group, int E, int64_t H, int64_t F)
{
    memset(hb, 0, sizeof *hb);
    zse_expert_bank *b = &hb->b;
    b->count = E;
    uint64_t at = 0;
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++) {
        zse_expert_part *ep = &b->part[p];
        ep->q.scheme = s;
        ep->q.rows = p == ZSE_EXPERT_DOWN ? H : F;
        ep->q.cols = p == ZSE_EXPERT_DOWN ? F : H;
        ep->q.group_size = zse_scheme_layout(s) == ZSE_LAYOUT_Q4_G ? group : 0;
        ep->layout = zse_scheme_layout(s);
        ep->size = zse_qshape_bytes(&ep->q);
        ep->at = at;
        at = (at + ep->size + 255) / 256 * 256;
    }
    b->size = b->part[2].at + b->part[2].size;
    b->stride = (b->size + 4095) / 4096 * 4096;
    hb->buf = calloc((size_t)E, (size_t)b->stride);
    b->data = hb->buf;
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++) {
        const zse_qshape *q = &b->part[p].q;
        const size_t n = (size_t)(q->rows * q->cols);
        hb->deq[p] = malloc((size_t)E * n * sizeof(float));
        for (int e = 0; e < E; e++) {
            float *src = rand_floats(n);
            for (size_t i = 0; i < n; i++)
                src[i] *= 0.3f;
            uint8_t *dst = hb->buf + (size_t)e * b->stride + b->part[p].at;
            zse_quantize_rows(q, src, dst, 0, q->rows);
            for (int64_t r = 0; r < q->rows; r++)
                zse_dequantize_row(q, dst, r, hb->deq[p] + (size_t)e * n + (size_t)(r * q->cols));
            free(src);
        }
    }
}

static void free_host_bank(host_bank *hb)
{
    free(hb->buf);
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++)
        free(hb->deq[p]);
}

static void check_moe_mlp(zse_backend *be, zse_scheme s, int group, int E, int k, int64_t H, int64_t F, int n)
{
    const zse_backend_ops *o = be->ops;
    host_bank hb;
    make_host_bank(&hb, s, group, E, H, F);
    zse_experts *ex = o->experts_load(be, &hb.b);
    CHECK_MSG(ex != NULL, "experts_load %s: %s", zse_scheme_name(s), zse_error_message());
    if (!ex) {
        free_host_bank(&hb);
        return;
    }
    const zse_moe_params mp = {E, k, n % 2 == 1};
    zse_moe_route *r = o->moe_route_new(be, n, &mp);
    CHECK(r != NULL);
    float *logits = rand_floats((size_t)(n * E)), *x = rand_floats((size_t)(n * H));
    float *shared = rand_floats((size_t)(n * H)), *gate = rand_floats((size_t)n);
    for (int i = 0; i < n * E; i++)
        logits[i] *= 3;
    zse_act *al = o->act_new(be, n, E), *ax = o->act_new(be, n, H), *axs = o->act_new(be, (int64_t)n * k, H);
    zse_act *ahs = o->act_new(be, (int64_t)n * k, F), *ahs2 = o->act_new(be, (int64_t)n * k, F);
    zse_act *ash = o->act_new(be, n, H), *ag = o->act_new(be, n, 1), *aout = o->act_new(be, n, H);
    float *zero = calloc((size_t)(n * H), sizeof *zero);
    CHECK(o->act_write(be, al, logits, n) == 0 && o->act_write(be, ax, x, n) == 0 &&
          o->act_write(be, ash, shared, n) == 0 && o->act_write(be, ag, gate, n) == 0 &&
          o->act_write(be, aout, zero, n) == 0);
    o->moe_route(be, r, al, n);
    int32_t active[64];
    const int n_active = o->moe_route_experts(be, r, active);
    o->moe_gather(be, r, ax, axs);
    const zse_moe_out gate_up[2] = {{ZSE_EXPERT_GATE, ahs}, {ZSE_EXPERT_UP, ahs2}}, down = {ZSE_EXPERT_DOWN, axs};
    o->moe_matmul(be, r, ex, axs, gate_up, 2);
    o->silu_mul(be, ahs, ahs2, (int64_t)n * k, F, ahs);
    o->moe_matmul(be, r, ex, ahs, &down, 1);
    o->moe_combine(be, r, axs, ash, ag, aout);
    float *got = malloc((size_t)(n * H) * sizeof *got);
    CHECK_MSG(o->sync(be) == 0 && o->act_read(be, aout, got, n) == 0, "%s", zse_error_message());
    /* the reference */
    double *ref = calloc((size_t)(n * H), sizeof *ref);
    bool used[64] = {false};
    for (int t = 0; t < n; t++) {
        const float *l = logits + t * E;
        double mx = l[0], sum = 0, p[64], w[8], ws = 0;
        int ch[8];
        for (int e = 1; e < E; e++)
            mx = l[e] > mx ? l[e] : mx;
        for (int e = 0; e < E; e++)
            sum += p[e] = exp(l[e] - mx);
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                bool taken = false;
                for (int i = 0; i < j; i++)
                    taken = taken || ch[i] == e;
                if (!taken && (best < 0 || p[e] > p[best]))
                    best = e;
            }
            ch[j] = best;
            ws += w[j] = p[best] / sum;
            used[best] = true;
        }
        for (int j = 0; j < k; j++) {
            if (mp.renormalize)
                w[j] /= ws;
            const float *Wg = hb.deq[0] + (size_t)ch[j] * (size_t)(F * H), *Wu = hb.deq[1] + (size_t)ch[j] * (size_t)(F * H);
            const float *Wd = hb.deq[2] + (size_t)ch[j] * (size_t)(H * F);
            double *h = calloc((size_t)F, sizeof *h);
            for (int64_t f = 0; f < F; f++) {
                double g = 0, u = 0;
                for (int64_t d = 0; d < H; d++) {
                    g += (double)Wg[f * H + d] * x[t * H + d];
                    u += (double)Wu[f * H + d] * x[t * H + d];
                }
                h[f] = g / (1 + exp(-g)) * u;
            }
            for (int64_t d = 0; d < H; d++) {
                double v = 0;
                for (int64_t f = 0; f < F; f++)
                    v += (double)Wd[d * F + f] * h[f];
                ref[t * H + d] += w[j] * v;
            }
            free(h);
        }
        for (int64_t d = 0; d < H; d++)
            ref[t * H + d] += shared[t * H + d] / (1 + exp(-(double)gate[t]));
    }
    int want_active = 0;
    for (int e = 0; e < E; e++)
        if (used[e])
            CHECK(want_active < n_active && active[want_active++] == e);
    CHECK_EQ_INT(n_active, want_active);
    const double err = rel_err(ref, got, (size_t)(n * H));
    /* 4-bit experts: x as two int8 codes (GEMV) or f16 (tensor cores); others fp32 */
    const double tol = s == ZSE_SCHEME_Q4 || s == ZSE_SCHEME_Q4S ? 5e-3 : 1e-4;
    CHECK_MSG(err < tol, "moe mlp %s, %d experts top %d, %d tokens: rel err %.3g (tol %.1g)", zse_scheme_name(s), E,
              k, n, err, tol);
    zse_act *acts[] = {al, ax, axs, ahs, ahs2, ash, ag, aout};
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++)
        o->act_free(be, acts[i]);
    o->moe_route_free(be, r);
    o->experts_free(be, ex);
    free(logits), free(x), free(shared), free(gate), free(zero), free(got), free(ref);
    free_host_bank(&hb);
}


/* ---- weights in host memory ---------------------------------------------------------------- */

/* y = W x for n rows of random x through w (host floats out) */
static void matmul_rows(zse_backend *be, const zse_weight *w, int64_t rows, int64_t cols, int n, const float *x, float *y)
{
    zse_act *ax = be->ops->act_new(be, n, cols), *ay = be->ops->act_new(be, n, rows);
    CHECK(be->ops->act_write(be, ax, x, n) == 0);
    be->ops->matmul(be, w, ax, n, ay);
    CHECK_MSG(be->ops->sync(be) == 0 && be->ops->act_read(be, ay, y, n) == 0, "%s", zse_error_message());
    be->ops->act_free(be, ax);
    be->ops->act_free(be, ay);
}

/* a matrix streamed through a slab slot: fetched (after the last use of the slot), waited
 * for, then multiplied — bit for bit the resident weight's numbers on every path (GEMV,
 * tensor cores, cuBLAS), and the slot refilled with another matrix gives that one's */
static void test_slab_weights(zse_backend *be)
{
    const zse_backend_ops *o = be->ops;
    const int64_t rows = 256, cols = 512;
    float *src[2] = {rand_floats((size_t)(rows * cols)), rand_floats((size_t)(rows * cols))};
    packed p[2];
    pack(&p[0], ZSE_SCHEME_Q4, rows, cols, 64, src[0]);
    pack(&p[1], ZSE_SCHEME_Q4, rows, cols, 64, src[1]);
    const size_t bytes = p[0].info.size, page = 4096, span = (bytes + page - 1) / page * page;
    /* the "file": both tensors page-aligned in one host range, as a layer's span */
    uint8_t *file = aligned_alloc(page, 2 * span);
    memcpy(file, p[0].bytes, bytes);
    memcpy(file + span, p[1].bytes, bytes);
    zse_backend_memory bm0, bm;
    o->memory(be, &bm0);
    zse_pinned *h = o->host_pin(be, file, 2 * span);
    zse_slab *sl = o->slab_new(be, (span + 255) / 256 * 256, 2);
    CHECK_MSG(h && sl, "%s", zse_error_message());
    o->memory(be, &bm);
    CHECK(bm.slabs == bm0.slabs + 2 * ((span + 255) / 256 * 256) && bm.host_pinned >= bm0.host_pinned + 2 * span);
    zse_weight *res[2] = {o->weight_load(be, &p[0].info), o->weight_load(be, &p[1].info)};
    zse_weight *view = o->weight_in_slab(be, &p[0].info, sl, 1, 0);
    CHECK_MSG(view && res[0] && res[1], "%s", zse_error_message());
    zse_tensor_info vec = p[0].info;
    vec.q.rows = 1;
    vec.q.cols = cols;
    vec.size = zse_qshape_bytes(&vec.q);
    CHECK(o->weight_in_slab(be, &vec, sl, 0, 0) == NULL); /* vectors stay resident */
    int64_t used = -1;
    for (int which = 0; view && which < 2; which++) {
        o->slab_fetch(be, sl, 1, h, (uint64_t)which * span, bytes, used);
        o->wait_mark(be, ZSE_QUEUE_COMPUTE, o->mark(be, ZSE_QUEUE_COPY));
        for (int n = 1; n <= 40; n = n == 1 ? 8 : n == 8 ? 40 : 41) {
            float *x = rand_floats((size_t)(n * cols)), *a = malloc((size_t)(n * rows) * 4), *b = malloc((size_t)(n * rows) * 4);
            matmul_rows(be, res[which], rows, cols, n, x, a);
            matmul_rows(be, view, rows, cols, n, x, b);
            CHECK_MSG(memcmp(a, b, (size_t)(n * rows) * 4) == 0, "a matrix in slab slot (fill %d), %d rows: differs "
                      "from the resident weight", which, n);
            free(x), free(a), free(b);
        }
        used = o->mark(be, ZSE_QUEUE_COMPUTE);
    }
    CHECK(o->sync(be) == 0);
    o->weight_free(be, view);
    o->weight_free(be, res[0]);
    o->weight_free(be, res[1]);
    o->slab_free(be, sl);
    o->host_unpin(be, h);
    o->memory(be, &bm);
    CHECK(bm.slabs == bm0.slabs && bm.host_pinned == bm0.host_pinned);
    free(file);
    for (int i = 0; i < 2; i++) {
        unpack(&p[i]);
        free(src[i]);
    }
}

/* the MoE MLP over experts kept in host memory, fetched into slab slots in reverse order and
 * placed through the table: the resident bank's output bit for bit; then with the odd experts
 * placed nowhere, their pairs' rows untouched by the grouped matmul and written back by index
 * (what the host's share does), the result again the same */
static void check_moe_offload(zse_backend *be, zse_scheme s, int group, int E, int k, int64_t H, int64_t F, int n)
{
    const zse_backend_ops *o = be->ops;
    host_bank hb;
    make_host_bank(&hb, s, group, E, H, F);
    const size_t span = (size_t)hb.b.stride * (size_t)E;
    uint8_t *aligned = aligned_alloc(4096, span);
    memcpy(aligned, hb.buf, span);
    hb.b.data = aligned;
    zse_experts *res = o->experts_load(be, &hb.b), *host = o->experts_host(be, &hb.b);
    zse_pinned *pin = o->host_pin(be, aligned, span);
    zse_slab *sl = o->slab_new(be, (hb.b.size + 255) / 256 * 256, E);
    CHECK_MSG(res && host && pin && sl, "%s", zse_error_message());
    const zse_moe_params mp = {E, k, true};
    zse_moe_route *r = o->moe_route_new(be, n, &mp);
    float *logits = rand_floats((size_t)(n * E)), *x = rand_floats((size_t)(n * H));
    for (int i = 0; i < n * E; i++)
        logits[i] *= 3;
    const int64_t P = (int64_t)n * k;
    zse_act *al = o->act_new(be, n, E), *ax = o->act_new(be, n, H), *axs = o->act_new(be, P, H);
    zse_act *ahs = o->act_new(be, P, F), *ahs2 = o->act_new(be, P, F);
    CHECK(o->act_write(be, al, logits, n) == 0 && o->act_write(be, ax, x, n) == 0);
    int32_t slot_of[64];
    for (int e = 0; e < E; e++) {
        slot_of[e] = E - 1 - e;
        o->slab_fetch(be, sl, slot_of[e], pin, (uint64_t)e * hb.b.stride, hb.b.size, -1);
    }
    const int64_t filled = o->mark(be, ZSE_QUEUE_COPY);
    float *want = malloc((size_t)(P * H) * 4), *got = malloc((size_t)(P * H) * 4);
    o->moe_route(be, r, al, n);
    for (int pass = 0; pass < 3; pass++) {
        /* 0: resident; 1: every expert in a slot; 2: the odd ones nowhere, then written in */
        zse_experts *ex = pass == 0 ? res : host;
        if (pass > 0) {
            int32_t map[64];
            for (int e = 0; e < E; e++)
                map[e] = pass == 2 && e % 2 ? -1 : slot_of[e];
            o->experts_map(be, host, sl, map);
            o->wait_mark(be, ZSE_QUEUE_COMPUTE, filled);
        }
        o->moe_gather(be, r, ax, axs);
        const zse_moe_out gate_up[2] = {{ZSE_EXPERT_GATE, ahs}, {ZSE_EXPERT_UP, ahs2}}, down = {ZSE_EXPERT_DOWN, axs};
        o->moe_matmul(be, r, ex, axs, gate_up, 2);
        o->silu_mul(be, ahs, ahs2, P, F, ahs);
        o->moe_matmul(be, r, ex, ahs, &down, 1);
        if (pass == 2) {
            int32_t seg[65], *tok = malloc((size_t)P * sizeof *tok), rows[4096];
            CHECK(o->moe_route_read(be, r, seg, tok) == 0);
            int32_t active[64];
            const int n_active = o->moe_route_experts(be, r, active);
            int a = 0, bad = 0;
            for (int e = 0; e < E; e++)
                if (seg[e + 1] > seg[e])
                    bad += a >= n_active || active[a++] != e;
            CHECK_MSG(bad == 0 && a == n_active && seg[E] == P, "moe_route_read's segments against the active list");
            /* the odd experts' rows as the resident pass computed them, written by index */
            int64_t m = 0;
            for (int e = 1; e < E; e += 2)
                for (int32_t i = seg[e]; i < seg[e + 1]; i++)
                    memcpy(got + (m * H), want + (int64_t)i * H, (size_t)H * 4), rows[m++] = i;
            CHECK(o->act_write_rows(be, axs, got, rows, m) == 0);
            free(tok);
        }
        CHECK_MSG(o->sync(be) == 0 && o->act_read(be, axs, pass == 0 ? want : got, P) == 0, "%s", zse_error_message());
        if (pass > 0)
            CHECK_MSG(memcmp(want, got, (size_t)(P * H) * 4) == 0, "moe %s, %d experts top %d, %d tokens, pass %d: "
                      "the experts from slab slots differ from the resident bank", zse_scheme_name(s), E, k, n, pass);
    }
    zse_act *acts[] = {al, ax, axs, ahs, ahs2};
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++)
        o->act_free(be, acts[i]);
    o->moe_route_free(be, r);
    o->experts_free(be, res);
    o->experts_free(be, host);
    o->slab_free(be, sl);
    o->host_unpin(be, pin);
    hb.b.data = hb.buf;
    free(aligned), free(logits), free(x), free(want), free(got);
    free_host_bank(&hb);
}

static void test_offload(zse_backend *be)
{
    test_slab_weights(be);
    for (int n = 1; n <= 20; n += n < 8 ? 7 : 12) { /* 1, 8 (GEMV tiles), 20 (tensor cores) */
        check_moe_offload(be, ZSE_SCHEME_Q4, 32, 8, 2, 64, 96, n);
        check_moe_offload(be, ZSE_SCHEME_Q8, 0, 8, 3, 64, 48, n);
    }
    /* the same with the pinned copy instead of a registration */
    setenv("ZSE_CUDA_PIN_COPY", "1", 1);
    check_moe_offload(be, ZSE_SCHEME_Q4, 32, 16, 4, 128, 64, 20);
    unsetenv("ZSE_CUDA_PIN_COPY");
}

/* PCIe host-to-device bandwidth (the bound a streamed or offloaded weight moves at): a plain
 * pinned buffer, and through the backend's ops from a registered range in 64 MiB slots */
static int bench_offload(void)
{
    zse_backend *be = zse_cuda_backend_create(0);
    if (!be) {
        fprintf(stderr, "%s\n", zse_error_message());
        return 1;
    }
    const zse_backend_ops *o = be->ops;
    const size_t big = (size_t)2 << 30, slot = (size_t)64 << 20;
    uint8_t *host = aligned_alloc(4096, big);
    if (!host)
        return 1;
    memset(host, 1, big);
    for (int copy = 0; copy < 2; copy++) {
        if (copy)
            setenv("ZSE_CUDA_PIN_COPY", "1", 1);
        zse_pinned *h = o->host_pin(be, host, big);
        zse_slab *sl = o->slab_new(be, slot, 2);
        if (!h || !sl) {
            fprintf(stderr, "%s\n", zse_error_message());
            return 1;
        }
        double best = 0;
        for (int run = 0; run < 3; run++) {
            const double t0 = now_s();
            for (size_t off = 0; off < big; off += slot)
                o->slab_fetch(be, sl, (int)(off / slot) % 2, h, off, slot, -1);
            o->wait_mark(be, ZSE_QUEUE_COMPUTE, o->mark(be, ZSE_QUEUE_COPY));
            if (o->sync(be) != 0)
                return 1;
            const double gbs = (double)big / (now_s() - t0) / 1e9;
            best = gbs > best ? gbs : best;
        }
        printf("BENCH h2d %s, %zu MiB in %zu MiB slots: %.1f GB/s\n", copy ? "pinned copy (cudaHostAlloc)"
               : "registered host range", big >> 20, slot >> 20, best);
        o->slab_free(be, sl);
        o->host_unpin(be, h);
    }
    unsetenv("ZSE_CUDA_PIN_COPY");
    free(host);
    be->ops->destroy(be);
    return 0;
}

static void test_moe(zse_backend *be)
{
    for (int n = 1; n <= 20; n += n < 8 ? 7 : 12) {  /* 1, 8 (GEMV tiles), 20 (tensor cores) */
        check_moe_mlp(be, ZSE_SCHEME_Q4, 32, 8, 2, 64, 96, n);
        check_moe_mlp(be, ZSE_SCHEME_Q4S, 64, 16, 4, 128, 64, n);
        check_moe_mlp(be, ZSE_SCHEME_Q8, 0, 8, 3, 64, 48, n);
        check_moe_mlp(be, ZSE_SCHEME_F32, 0, 6, 2, 32, 20, n);
        check_moe_mlp(be, ZSE_SCHEME_NF4, 64, 8, 2, 64, 96, n);
    }
    /* f16 rows of 24 bytes: refused with the reason, not read misaligned */
    host_bank hb;
    make_host_bank(&hb, ZSE_SCHEME_F16, 0, 4, 16, 12);
    CHECK(be->ops->experts_load(be, &hb.b) == NULL);
    CHECK_MSG(strstr(zse_error_message(), "not a multiple of 16") != NULL, "%s", zse_error_message());
    free_host_bank(&hb);
}

/* LoRA through the ops: a pool, pinned host images, asynchronous slot loads polled until
 * they land, a batch of three sequences (two adapters and none, several tokens each) and
 * lora_apply on q and v against a double reference; rows without an adapter untouched */
static void lora_part(uint8_t *img, int layer, int module, int rank, float scale, int64_t in, int64_t out, size_t *at)
{
    zse_lora_entry e = {rank, scale, (int64_t)*at, 0};
    *at = (*at + (size_t)rank * (size_t)in * 2 + 63) & ~(size_t)63;
    e.bt = (int64_t)*at;
    *at = (*at + (size_t)rank * (size_t)out * 2 + 63) & ~(size_t)63;
    memcpy(img + ((size_t)layer * ZSE_LORA_MODULES + (size_t)module) * sizeof e, &e, sizeof e);
    uint16_t *a = (uint16_t *)(img + e.a), *bt = (uint16_t *)(img + e.bt);
    for (int64_t i = 0; i < rank * in; i++)
        a[i] = zse_f32_to_f16(frand() * 0.5f);
    for (int64_t i = 0; i < rank * out; i++)
        bt[i] = zse_f32_to_f16(frand() * 0.5f);
}

static void check_lora_rows(zse_backend *be, zse_lora_pool *pool, const zse_lora_shape *sh, uint8_t *const imgs[2],
                            const int *take, int n_seqs)
{
    const int32_t adapters[3] = {1, -1, 0};
    int32_t tok[64], pos[64], seq[64], slots[64], lens[3], table[3] = {0, 1, 2}, out_rows[1] = {0};
    int n = 0;
    for (int s = 0; s < n_seqs; s++) {
        for (int k = 0; k < take[s]; k++, n++) {
            tok[n] = 1;
            pos[n] = k;
            seq[n] = s;
            slots[n] = -1;
        }
        lens[s] = take[s];
    }
    zse_batch b = {n, tok, pos, seq, slots, n_seqs, lens, table, 1, 1, out_rows, adapters,
                   1u << ZSE_LORA_Q | 1u << ZSE_LORA_V};
    CHECK(be->ops->begin_batch(be, &b) == 0);
    const int64_t in = sh->in[ZSE_LORA_Q];
    float *x = rand_floats((size_t)(n * in));
    float *y0[2] = {rand_floats((size_t)(n * sh->out[ZSE_LORA_Q])), rand_floats((size_t)(n * sh->out[ZSE_LORA_V]))};
    zse_act *ax = be->ops->act_new(be, n, in), *ay[2];
    CHECK(be->ops->act_write(be, ax, x, n) == 0);
    const int mods[2] = {ZSE_LORA_Q, ZSE_LORA_V};
    zse_lora_out outs[2];
    for (int i = 0; i < 2; i++) {
        ay[i] = be->ops->act_new(be, n, sh->out[mods[i]]);
        CHECK(be->ops->act_write(be, ay[i], y0[i], n) == 0);
        outs[i] = (zse_lora_out){mods[i], ay[i]};
    }
    be->ops->lora_apply(be, pool, 1, ax, n, outs, 2);
    CHECK_MSG(be->ops->sync(be) == 0, "lora_apply: %s", zse_error_message());
    double worst = 0;
    bool untouched = true;
    for (int i = 0; i < 2; i++) {
        const int64_t out = sh->out[mods[i]];
        float *y = malloc((size_t)(n * out) * sizeof *y);
        CHECK(be->ops->act_read(be, ay[i], y, n) == 0);
        for (int t = 0; t < n; t++) {
            const int slot = adapters[seq[t]];
            if (slot < 0) {
                untouched = untouched && memcmp(y + t * out, y0[i] + t * out, (size_t)out * 4) == 0;
                continue;
            }
            const uint8_t *img = imgs[slot];
            zse_lora_entry e;
            memcpy(&e, img + ((size_t)1 * ZSE_LORA_MODULES + (size_t)mods[i]) * sizeof e, sizeof e);
            const uint16_t *a = (const uint16_t *)(img + e.a), *bt = (const uint16_t *)(img + e.bt);
            for (int64_t o = 0; o < out; o++) {
                double d = 0;
                for (int j = 0; j < e.rank; j++) {
                    double u = 0;
                    for (int64_t k = 0; k < in; k++)
                        u += (double)zse_f16_to_f32(a[j * in + k]) * x[t * in + k];
                    d += u * zse_f16_to_f32(bt[j * out + o]);
                }
                double want = y0[i][t * out + o] + e.scale * d;
                worst = fmax(worst, fabs(y[t * out + o] - want) / (1 + fabs(want)));
            }
        }
        free(y);
        be->ops->act_free(be, ay[i]);
        free(y0[i]);
    }
    CHECK_MSG(worst < 1e-4, "lora_apply over %d rows: error %g", n, worst);
    CHECK(untouched);
    be->ops->act_free(be, ax);
    free(x);
}

static void test_lora(zse_backend *be)
{
    zse_lora_shape sh = {.n_layers = 2, .n_slots = 3, .slot_bytes = 65536};
    for (int m = 0; m < ZSE_LORA_MODULES; m++) {
        sh.in[m] = 96;
        sh.out[m] = m == ZSE_LORA_V ? 40 : 136;
    }
    zse_lora_pool *pool = be->ops->lora_pool_new(be, &sh);
    CHECK_MSG(pool != NULL, "lora_pool_new: %s", zse_error_message());
    if (!pool)
        return;
    zse_backend_memory mem;
    be->ops->memory(be, &mem);
    CHECK(mem.adapters == 3 * 65536);
    uint8_t *imgs[2];
    size_t bytes[2];
    for (int s = 0; s < 2; s++) {
        imgs[s] = be->ops->lora_host_alloc(be, sh.slot_bytes);
        memset(imgs[s], 0, sh.slot_bytes);
        size_t at = ((size_t)sh.n_layers * ZSE_LORA_MODULES * sizeof(zse_lora_entry) + 63) & ~(size_t)63;
        lora_part(imgs[s], 1, ZSE_LORA_Q, s ? 16 : 3, 0.5f + s, sh.in[ZSE_LORA_Q], sh.out[ZSE_LORA_Q], &at);
        lora_part(imgs[s], 1, ZSE_LORA_V, s ? 2 : 8, 1.5f - s, sh.in[ZSE_LORA_V], sh.out[ZSE_LORA_V], &at);
        bytes[s] = at;
        CHECK(be->ops->lora_slot_load(be, pool, s, imgs[s], bytes[s]) == 0);
    }
    for (int s = 0; s < 2; s++) {
        int r, polls = 0;
        while ((r = be->ops->lora_slot_ready(be, pool, s)) == 0 && polls++ < 100000)
            ;
        CHECK_MSG(r == 1, "slot %d did not land: %s", s, zse_error_message());
    }
    CHECK(be->ops->lora_slot_load(be, pool, 3, imgs[0], bytes[0]) == -1);
    CHECK(be->ops->lora_slot_load(be, pool, 2, imgs[0], sh.slot_bytes + 64) == -1);
    const int few[3] = {1, 1, 1}, many[3] = {3, 2, 5};
    check_lora_rows(be, pool, &sh, imgs, few, 3);   /* 3 rows: one launch */
    check_lora_rows(be, pool, &sh, imgs, many, 3);  /* 10 rows: shrink, then expand */
    for (int s = 0; s < 2; s++)
        be->ops->lora_host_free(be, imgs[s]);
    be->ops->lora_pool_free(be, pool);
    be->ops->memory(be, &mem);
    CHECK(mem.adapters == 0);
}

int main(int argc, char **argv)
{
    if (zse_cuda_device_count() < 1) {
        printf("no CUDA device: skipped\n");
        return 77;
    }
    if (argc > 1 && strcmp(argv[1], "--bench-load") == 0)
        return bench_load();
    if (argc > 1 && strcmp(argv[1], "--bench-offload") == 0)
        return bench_offload();
    CHECK(zse_cuda_backend_create(zse_cuda_device_count()) == NULL);
    zse_backend *be = zse_cuda_backend_create(0);
    CHECK_MSG(be != NULL, "%s", zse_error_message());
    if (!be)
        return test_main_end();
    CHECK(strcmp(be->ops->name, "cuda") == 0);
    test_matmul(be);
    test_argmax(be);
    test_mask(be);
    test_lookup(be);
    test_prep_handoff(be, 1);
    test_prep_handoff(be, 8);
    test_moe(be);
    test_offload(be);
    test_lora(be);
    test_elementwise(be); /* last: it leaves the backend's sticky error set */
    be->ops->destroy(be);
    test_attention(ZSE_KV_STORE_F16);
    test_attention(ZSE_KV_STORE_INT8);
    return test_main_end();
}
