/* CPU backend ops other than matmul (test_cpu_matmul covers that), each against a
 * straightforward reference: attention over a paged cache with shuffled block tables, GQA
 * and a sliding window (f16 and int8 storage), the int8 KV round-trip bound, RoPE pairing,
 * rmsnorm, embed for every scheme, the elementwise ops, gather, device selection. */
#include "test.h"

#include "backend/cpu/cpu.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static float frand(void) /* uniform in [-1, 1) */
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 4503599627370496.0 - 1.0);
}

static void fill(zse_act *a, float scale)
{
    for (int64_t i = 0; i < a->rows * a->cols; i++)
        a->data[i] = frand() * scale;
}

/* a weight the backend can read, over caller-owned packed bytes */
static zse_weight *load(zse_backend *be, zse_qshape q, const void *packed)
{
    zse_tensor_info ti = {.name = "t", .q = q, .layout = zse_scheme_layout(q.scheme),
                          .size = zse_qshape_bytes(&q), .data = packed};
    return be->ops->weight_load(be, &ti);
}

/* ---- attention ---------------------------------------------------------------------- */

enum { BS = 4, NBLOCKS = 24, HKV = 2, HQ = 6, D = 12, MAXB = 6, NSEQ = 3 };

typedef struct {
    int len[NSEQ];                  /* tokens in the cache per sequence */
    int32_t table[NSEQ][MAXB];      /* shuffled physical blocks */
    /* what the cache should hold, as the reference sees it: [seq][pos][head][D] */
    float k[NSEQ][MAXB * BS][HKV][D], v[NSEQ][MAXB * BS][HKV][D];
} paged_ref;

/* the value the cache stores: f16-rounded, or kept exact for the int8 comparison */
static float stored(float x, bool f16)
{
    return f16 ? zse_f16_to_f32(zse_f32_to_f16(x)) : x;
}

/* Feed one step: `add[s]` new tokens for each sequence; stores K/V and runs attention.
 * Returns the largest difference from the naive reference over every output element,
 * relative to the largest |V|. */
static double attention_step(zse_backend *be, zse_kv *kv, int layer, paged_ref *ref, const int add[NSEQ],
                             int window, bool f16)
{
    int n = 0;
    for (int s = 0; s < NSEQ; s++)
        n += add[s];
    int32_t tokens[64], positions[64], seq_of[64], slots[64], seq_lens[NSEQ], out_rows[1] = {0};
    int t = 0;
    for (int s = 0; s < NSEQ; s++)
        for (int i = 0; i < add[s]; i++, t++) {
            int pos = ref->len[s] + i;
            tokens[t] = 0;
            positions[t] = pos;
            seq_of[t] = s;
            slots[t] = ref->table[s][pos / BS] * BS + pos % BS;
        }
    for (int s = 0; s < NSEQ; s++)
        seq_lens[s] = ref->len[s] + add[s];
    zse_batch b = {n, tokens, positions, seq_of, slots, NSEQ, seq_lens, &ref->table[0][0], MAXB, 1, out_rows, NULL, 0};
    CHECK(be->ops->begin_batch(be, &b) == 0);

    zse_act *k = be->ops->act_new(be, n, HKV * D), *v = be->ops->act_new(be, n, HKV * D);
    zse_act *q = be->ops->act_new(be, n, HQ * D), *out = be->ops->act_new(be, n, HQ * D);
    fill(k, 2.0f);
    fill(v, 1.0f);
    fill(q, 1.0f);
    for (t = 0; t < n; t++)
        for (int h = 0; h < HKV; h++)
            for (int i = 0; i < D; i++) {
                ref->k[seq_of[t]][positions[t]][h][i] = stored(k->data[t * HKV * D + h * D + i], f16);
                ref->v[seq_of[t]][positions[t]][h][i] = stored(v->data[t * HKV * D + h * D + i], f16);
            }
    be->ops->kv_store(be, kv, layer, k, v);
    zse_attn_params p = {HQ, HKV, D, 1.0f / sqrtf((float)D), window};
    be->ops->attention(be, kv, layer, q, &p, out);

    double worst = 0;
    for (t = 0; t < n; t++) {
        int s = seq_of[t], pos = positions[t], lo = window > 0 ? pos - window + 1 : 0;
        if (lo < 0)
            lo = 0;
        for (int h = 0; h < HQ; h++) {
            int kh = h / (HQ / HKV);
            const float *qh = q->data + t * HQ * D + h * D;
            double scores[MAXB * BS], mx = -1e30, sum = 0, o[D] = {0};
            for (int j = lo; j <= pos; j++) {
                double dot = 0;
                for (int i = 0; i < D; i++)
                    dot += (double)qh[i] * ref->k[s][j][kh][i];
                scores[j] = dot * p.scale;
                mx = fmax(mx, scores[j]);
            }
            for (int j = lo; j <= pos; j++) {
                double e = exp(scores[j] - mx);
                sum += e;
                for (int i = 0; i < D; i++)
                    o[i] += e * ref->v[s][j][kh][i];
            }
            for (int i = 0; i < D; i++)
                worst = fmax(worst, fabs(o[i] / sum - out->data[t * HQ * D + h * D + i]));
        }
    }
    for (int s = 0; s < NSEQ; s++)
        ref->len[s] += add[s];
    be->ops->act_free(be, k);
    be->ops->act_free(be, v);
    be->ops->act_free(be, q);
    be->ops->act_free(be, out);
    return worst;
}

static void shuffled_tables(paged_ref *ref)
{
    int perm[NBLOCKS];
    for (int i = 0; i < NBLOCKS; i++)
        perm[i] = i;
    for (int i = NBLOCKS - 1; i > 0; i--) {
        int j = (int)((frand() + 1) * 0.5 * (i + 1)) % (i + 1), x = perm[i];
        perm[i] = perm[j];
        perm[j] = x;
    }
    int next = 0;
    for (int s = 0; s < NSEQ; s++)
        for (int b = 0; b < MAXB; b++)
            ref->table[s][b] = b < NBLOCKS / NSEQ ? perm[next++] : -1;
}

static void test_attention(zse_backend *be, zse_kv_store store, int window)
{
    bool f16 = store == ZSE_KV_STORE_F16;
    zse_kv_shape shape = {2, NBLOCKS, BS, HKV, D, store};
    zse_kv *kv = be->ops->kv_new(be, &shape);
    CHECK(kv != NULL);
    static paged_ref ref;
    memset(&ref, 0, sizeof ref);
    shuffled_tables(&ref);
    /* int8 storage: each value is off by at most absmax/254 of its (token, head) row; the
     * output is a convex mix of V rows, so its error stays near that (K error shifts the
     * weights a little too) */
    double tol = f16 ? 1e-5 : 0.03;
    const int prefill[NSEQ] = {13, 7, 1}, decode[NSEQ] = {1, 1, 1}, chunk[NSEQ] = {2, 5, 0};
    double e = attention_step(be, kv, 1, &ref, prefill, window, f16);
    CHECK_MSG(e < tol, "prefill store %d window %d: %g", store, window, e);
    for (int step = 0; step < 3; step++) {
        e = attention_step(be, kv, 1, &ref, decode, window, f16);
        CHECK_MSG(e < tol, "decode store %d window %d: %g", store, window, e);
    }
    e = attention_step(be, kv, 1, &ref, chunk, window, f16); /* a later chunk beside nothing */
    CHECK_MSG(e < tol, "chunk store %d window %d: %g", store, window, e);
    be->ops->kv_free(be, kv);
}

/* The int8 cache's round trip: with one visible position, attention returns that
 * position's V row, so the output is the stored value; each element is within
 * absmax/254 (half a quantization step) of what was written. */
static void test_kv_int8_round_trip(zse_backend *be)
{
    zse_kv_shape shape = {1, 4, BS, HKV, D, ZSE_KV_STORE_INT8};
    zse_kv *kv = be->ops->kv_new(be, &shape);
    int32_t tok[2] = {0, 0}, pos[2] = {0, 0}, seq[2] = {0, 1}, slots[2] = {3 * BS, 1 * BS}, lens[2] = {1, 1};
    int32_t table[2][2] = {{3, -1}, {1, -1}}, out_rows[1] = {0};
    zse_batch b = {2, tok, pos, seq, slots, 2, lens, &table[0][0], 2, 1, out_rows, NULL, 0};
    CHECK(be->ops->begin_batch(be, &b) == 0);
    zse_act *k = be->ops->act_new(be, 2, HKV * D), *v = be->ops->act_new(be, 2, HKV * D);
    zse_act *q = be->ops->act_new(be, 2, HQ * D), *out = be->ops->act_new(be, 2, HQ * D);
    fill(k, 1.0f);
    fill(v, 5.0f);
    fill(q, 1.0f);
    v->data[3] = 0; /* zeros and a row of all zeros survive exactly */
    for (int i = 0; i < D; i++)
        v->data[HKV * D + D + i] = 0;
    be->ops->kv_store(be, kv, 0, k, v);
    zse_attn_params p = {HQ, HKV, D, 0.3f, 0};
    be->ops->attention(be, kv, 0, q, &p, out);
    int bad = 0;
    for (int t = 0; t < 2; t++)
        for (int h = 0; h < HQ; h++) {
            const float *vr = v->data + t * HKV * D + (h / (HQ / HKV)) * D;
            float amax = 0;
            for (int i = 0; i < D; i++)
                amax = fmaxf(amax, fabsf(vr[i]));
            for (int i = 0; i < D; i++) {
                float got = out->data[t * HQ * D + h * D + i];
                if (fabsf(got - vr[i]) > amax / 254 * 1.0001f + 1e-7f || (vr[i] == 0 && got != 0))
                    bad++;
            }
        }
    CHECK_EQ_INT(bad, 0);
    be->ops->act_free(be, k);
    be->ops->act_free(be, v);
    be->ops->act_free(be, q);
    be->ops->act_free(be, out);
    be->ops->kv_free(be, kv);
}

/* a head layout the kernel cannot take is reported by sync(), not computed wrongly */
static void test_attention_limits(zse_backend *be)
{
    zse_kv_shape shape = {1, 2, BS, 1, 1024, ZSE_KV_STORE_F16};
    zse_kv *kv = be->ops->kv_new(be, &shape);
    int32_t tok[1] = {0}, pos[1] = {0}, seq[1] = {0}, slots[1] = {0}, lens[1] = {1}, table[1] = {0}, out_rows[1] = {0};
    zse_batch b = {1, tok, pos, seq, slots, 1, lens, table, 1, 1, out_rows, NULL, 0};
    CHECK(be->ops->begin_batch(be, &b) == 0);
    zse_act *q = be->ops->act_new(be, 1, 1024), *out = be->ops->act_new(be, 1, 1024);
    zse_attn_params p = {1, 1, 1024, 1.0f, 0};
    be->ops->attention(be, kv, 0, q, &p, out);
    CHECK(be->ops->sync(be) == -1);
    CHECK(strstr(zse_error_message(), "head_dim") != NULL);
    CHECK(be->ops->sync(be) == 0); /* reported once */
    be->ops->act_free(be, q);
    be->ops->act_free(be, out);
    be->ops->kv_free(be, kv);
}

/* ---- RoPE ---------------------------------------------------------------------------- */

static void test_rope(zse_backend *be)
{
    enum { T = 3, H = 3, HK = 1, HD = 8 };
    float inv_freq[HD / 2] = {1.0f, 0.1f, 0.01f, 0.001f};
    CHECK(be->ops->rope_init(be, inv_freq, HD / 2, 1.25f) == 0);
    int32_t tok[T] = {0}, pos[T] = {0, 5, 1000}, seq[T] = {0}, slots[T] = {0}, lens[1] = {1001}, table[1] = {0};
    int32_t out_rows[1] = {0};
    zse_batch b = {T, tok, pos, seq, slots, 1, lens, table, 1, 1, out_rows, NULL, 0};
    CHECK(be->ops->begin_batch(be, &b) == 0);
    zse_act *q = be->ops->act_new(be, T, H * HD), *k = be->ops->act_new(be, T, HK * HD);
    fill(q, 1.0f);
    fill(k, 1.0f);
    float q0[T * H * HD], k0[T * HK * HD];
    memcpy(q0, q->data, sizeof q0);
    memcpy(k0, k->data, sizeof k0);
    be->ops->rope(be, q, k, H, HK, HD);
    double worst = 0;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H + HK; h++) {
            const float *x = h < H ? q0 + t * H * HD + h * HD : k0 + t * HK * HD;
            const float *y = h < H ? q->data + t * H * HD + h * HD : k->data + t * HK * HD;
            for (int i = 0; i < HD / 2; i++) {
                /* rotate-half: element i pairs with i + HD/2 (Hugging Face's rotate_half) */
                double a = pos[t] * (double)inv_freq[i], c = cos(a) * 1.25, s = sin(a) * 1.25;
                worst = fmax(worst, fabs(x[i] * c - x[i + HD / 2] * s - y[i]));
                worst = fmax(worst, fabs(x[i] * s + x[i + HD / 2] * c - y[i + HD / 2]));
            }
        }
    CHECK_MSG(worst < 2e-4, "rope %g", worst); /* float angle at position 1000 */
    be->ops->act_free(be, q);
    be->ops->act_free(be, k);
}

/* ---- rmsnorm, embed, elementwise --------------------------------------------------------- */

static void test_rmsnorm(zse_backend *be)
{
    enum { R = 5, DIM = 37 };
    zse_act *x = be->ops->act_new(be, R, DIM), *out = be->ops->act_new(be, R, DIM);
    fill(x, 3.0f);
    float w[DIM];
    for (int i = 0; i < DIM; i++)
        w[i] = frand();
    zse_weight *wt = load(be, (zse_qshape){ZSE_SCHEME_F32, 1, DIM, 0}, w);
    be->ops->rmsnorm(be, x, wt, 1e-6f, R, DIM, out);
    double worst = 0;
    for (int r = 0; r < R; r++) {
        double ss = 0;
        for (int i = 0; i < DIM; i++)
            ss += (double)x->data[r * DIM + i] * x->data[r * DIM + i];
        double inv = 1 / sqrt(ss / DIM + 1e-6);
        for (int i = 0; i < DIM; i++)
            worst = fmax(worst, fabs(x->data[r * DIM + i] * inv * w[i] - out->data[r * DIM + i]));
    }
    CHECK_MSG(worst < 1e-5, "rmsnorm %g", worst);
    /* per-head use: rows = tokens * heads over a [tokens][heads * head_dim] buffer, in place */
    zse_act *qk = be->ops->act_new(be, 2, 3 * 4);
    fill(qk, 1.0f);
    float before[24];
    memcpy(before, qk->data, sizeof before);
    zse_weight *w4 = load(be, (zse_qshape){ZSE_SCHEME_F32, 1, 4, 0}, w);
    be->ops->rmsnorm(be, qk, w4, 1e-6f, 6, 4, qk);
    worst = 0;
    for (int r = 0; r < 6; r++) {
        double ss = 0;
        for (int i = 0; i < 4; i++)
            ss += (double)before[r * 4 + i] * before[r * 4 + i];
        for (int i = 0; i < 4; i++)
            worst = fmax(worst, fabs(before[r * 4 + i] / sqrt(ss / 4 + 1e-6) * w[i] - qk->data[r * 4 + i]));
    }
    CHECK_MSG(worst < 1e-5, "per-head rmsnorm %g", worst);
    be->ops->weight_free(be, wt);
    be->ops->weight_free(be, w4);
    be->ops->act_free(be, x);
    be->ops->act_free(be, out);
    be->ops->act_free(be, qk);
}

static void test_embed(zse_backend *be)
{
    enum { V = 11, DIM = 70, T = 4 };
    float table[V * DIM];
    for (int i = 0; i < V * DIM; i++)
        table[i] = frand();
    int32_t tok[T] = {10, 0, 3, 10}, pos[T] = {0, 1, 2, 3}, seq[T] = {0}, slots[T] = {0}, lens[1] = {4};
    int32_t bt[1] = {0}, out_rows[1] = {3};
    zse_batch b = {T, tok, pos, seq, slots, 1, lens, bt, 1, 1, out_rows, NULL, 0};
    CHECK(be->ops->begin_batch(be, &b) == 0);
    for (int s = 0; s < ZSE_SCHEME_COUNT; s++) {
        zse_qshape q = {(zse_scheme)s, V, DIM, zse_scheme_is_grouped((zse_scheme)s) ? 32 : 0};
        size_t bytes = zse_qshape_bytes(&q);
        uint8_t *packed = calloc(1, bytes);
        zse_quantize_rows(&q, table, packed, 0, V);
        zse_weight *w = load(be, q, packed);
        zse_act *out = be->ops->act_new(be, T, DIM);
        be->ops->embed(be, w, out);
        float row[DIM];
        int bad = 0;
        for (int t = 0; t < T; t++) {
            zse_dequantize_row(&q, packed, tok[t], row);
            bad += memcmp(row, out->data + t * DIM, sizeof row) != 0;
        }
        CHECK_MSG(bad == 0, "embed %s", zse_scheme_name(q.scheme));
        be->ops->act_free(be, out);
        be->ops->weight_free(be, w);
        free(packed);
    }
}

static void test_elementwise(zse_backend *be)
{
    enum { R = 3, DIM = 19 };
    zse_act *g = be->ops->act_new(be, R, DIM), *u = be->ops->act_new(be, R, DIM);
    zse_act *o = be->ops->act_new(be, R, DIM), *x = be->ops->act_new(be, R, DIM);
    fill(g, 6.0f);
    fill(u, 2.0f);
    fill(x, 1.0f);
    float x0[R * DIM];
    memcpy(x0, x->data, sizeof x0);
    be->ops->silu_mul(be, g, u, R, DIM, o);
    double worst = 0;
    for (int i = 0; i < R * DIM; i++) {
        double gv = g->data[i];
        worst = fmax(worst, fabs(gv / (1 + exp(-gv)) * u->data[i] - o->data[i]));
    }
    CHECK_MSG(worst < 1e-5, "silu_mul %g", worst);

    be->ops->add(be, x, u, R, DIM);
    int bad = 0;
    for (int i = 0; i < R * DIM; i++)
        bad += x->data[i] != x0[i] + u->data[i];
    CHECK_EQ_INT(bad, 0);

    float bias[DIM];
    for (int i = 0; i < DIM; i++)
        bias[i] = frand();
    memcpy(x0, x->data, sizeof x0);
    zse_weight *bw = load(be, (zse_qshape){ZSE_SCHEME_F32, 1, DIM, 0}, bias);
    be->ops->add_bias(be, x, bw, 2); /* only the first two rows */
    bad = 0;
    for (int i = 0; i < R * DIM; i++)
        bad += x->data[i] != (i < 2 * DIM ? x0[i] + bias[i % DIM] : x0[i]);
    CHECK_EQ_INT(bad, 0);
    be->ops->weight_free(be, bw);

    /* gather: the rows that need logits, in order */
    int32_t tok[R] = {0}, pos[R] = {0, 1, 2}, seq[R] = {0}, slots[R] = {0}, lens[1] = {3}, bt[1] = {0};
    int32_t out_rows[2] = {0, 2};
    zse_batch b = {R, tok, pos, seq, slots, 1, lens, bt, 1, 2, out_rows, NULL, 0};
    CHECK(be->ops->begin_batch(be, &b) == 0);
    zse_act *gathered = be->ops->act_new(be, 2, DIM);
    be->ops->gather_out_rows(be, x, DIM, gathered);
    CHECK(memcmp(gathered->data, x->data, DIM * sizeof(float)) == 0);
    CHECK(memcmp(gathered->data + DIM, x->data + 2 * DIM, DIM * sizeof(float)) == 0);
    CHECK(be->ops->sync(be) == 0);

    /* activation transfers refuse more rows than the buffer holds */
    float buf[4 * DIM];
    CHECK(be->ops->act_write(be, gathered, buf, 3) == -1);
    CHECK(be->ops->act_read(be, gathered, buf, 3) == -1);
    CHECK(be->ops->act_read(be, gathered, buf, 2) == 0 && memcmp(buf, gathered->data, sizeof(float) * 2 * DIM) == 0);
    CHECK(be->ops->act_new(be, 0, 4) == NULL);
    CHECK(be->ops->act_new(be, (int64_t)1 << 40, (int64_t)1 << 40) == NULL);

    be->ops->act_free(be, g);
    be->ops->act_free(be, u);
    be->ops->act_free(be, o);
    be->ops->act_free(be, x);
    be->ops->act_free(be, gathered);
}

/* argmax_rows: largest value, lowest index on ties, NaNs never win (the host sampler's
 * rule; tests/gpu/backend_test.c checks the CUDA kernel against the same rows) */
static void test_argmax(zse_backend *be)
{
    enum { COLS = 9 };
    const float rows[4][COLS] = {
        {1, 5, 2, 5, 0, -1, 5, 3, 4},                               /* tie: the first 5 */
        {NAN, 1, 7, NAN, 7, -3, 2, 0, 1},                           /* NaN first, then a tie */
        {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY},
        {NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN},
    };
    const int32_t want[4] = {1, 2, 0, 0};
    zse_act *a = be->ops->act_new(be, 4, COLS);
    int32_t got[4] = {-1, -1, -1, -1};
    CHECK(a && be->ops->act_write(be, a, &rows[0][0], 4) == 0);
    CHECK(a && be->ops->argmax_rows(be, a, 4, COLS, got) == 0);
    for (int r = 0; r < 4; r++)
        CHECK_MSG(got[r] == want[r], "argmax row %d: %d, expected %d", r, got[r], want[r]);
    be->ops->act_free(be, a);
}

static void test_device_names(void)
{
    zse_backend *be = zse_backend_create("cpu", 1);
    CHECK(be != NULL && strcmp(be->ops->name, "cpu") == 0);
    zse_backend_destroy(be);
    CHECK(zse_backend_create("tpu", 1) == NULL);
    CHECK(strstr(zse_error_message(), "unknown device 'tpu'") != NULL);
    CHECK(zse_backend_create("cuda:x", 1) == NULL);
#ifndef ZSE_HAVE_CUDA
    CHECK(!zse_backend_cuda_available());
    CHECK(zse_backend_create("cuda", 1) == NULL);
    CHECK(strstr(zse_error_message(), "without CUDA") != NULL);
#endif
    zse_backend_destroy(NULL);
}

int main(void)
{
    zse_backend *be = zse_cpu_backend_create(3);
    CHECK(be != NULL);
    const char *paths[] = {"portable", "avx2", "avx512"};
    for (int path = 0; path <= (int)zse_cpu_best_path(); path++) {
        CHECK(zse_cpu_set_path(paths[path]) == 0);
        for (int window = 0; window <= 5; window += 5) {
            test_attention(be, ZSE_KV_STORE_F16, window);
            test_attention(be, ZSE_KV_STORE_INT8, window);
        }
        test_kv_int8_round_trip(be);
    }
    CHECK(zse_cpu_set_path("auto") == 0);
    test_attention_limits(be);
    test_rope(be);
    test_rmsnorm(be);
    test_embed(be);
    test_elementwise(be);
    test_argmax(be);
    zse_backend_destroy(be);
    test_device_names();
    return test_main_end();
}
