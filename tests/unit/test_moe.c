/* Mixture of experts, end to end on the CPU backend:
 *
 *  - routing: softmax, top-k with ties to the lower expert, the weights with and without
 *    renormalization, the pairs sorted by expert (by token within one), the active experts;
 *  - the grouped expert matmul against the dense matmul of each expert's part alone, bit for
 *    bit (f32, int8, int4, nf4 experts), and the whole expert MLP against a plain float
 *    reference, shared expert and its sigmoid gate included;
 *  - the .zse expert banks of the MoE fixtures: what the reader hands out, each expert's
 *    checksum on its own, a flipped byte found by zse verify and by that expert's check
 *    alone, and every corrupt bank entry refused at open with a message that says why;
 *  - the models: a batch of several sequences gives each the logits it gets alone, bit for
 *    bit, at f32 and int4. */
#include "format_testlib.h"

#include "backend/backend.h"
#include "model/model.h"
#include "quant/quant.h"
#include "zse.h"

#include <math.h>

static uint32_t rng = 2463534242u;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return (float)(rng & 0xFFFFFF) / (float)0x1000000 * 2.f - 1.f;
}

static zse_act *act_from(zse_backend *be, const float *data, int64_t rows, int64_t cols)
{
    zse_act *a = be->ops->act_new(be, rows, cols);
    CHECK(a != NULL);
    if (a && data)
        CHECK(be->ops->act_write(be, a, data, rows) == 0);
    return a;
}

static void read_act(zse_backend *be, const zse_act *a, float *out, int64_t rows)
{
    CHECK(be->ops->sync(be) == 0);
    CHECK(be->ops->act_read(be, a, out, rows) == 0);
}

/* ---- routing ------------------------------------------------------------------------- */

/* the k experts of one row of logits and their weights, in double: the reference */
static void reference_route(const float *l, int n, int k, bool renorm, int *experts, double *w)
{
    double mx = l[0], sum = 0, p[64];
    for (int e = 1; e < n; e++)
        mx = l[e] > mx ? l[e] : mx;
    for (int e = 0; e < n; e++)
        sum += p[e] = exp(l[e] - mx);
    bool taken[64] = {false};
    double s = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++)
            if (!taken[e] && (best < 0 || p[e] > p[best]))
                best = e;
        taken[best] = true;
        experts[j] = best;
        s += w[j] = p[best] / sum;
    }
    for (int j = 0; renorm && j < k; j++)
        w[j] /= s;
}

static void test_routing(zse_backend *be)
{
    const zse_backend_ops *o = be->ops;
    enum { N = 6, T = 4, K = 2, H = 3 };
    /* token 0: experts 1 and 2 tie (the lower first); token 1: five zeros tie for second;
     * token 2: descending; token 3: one expert far ahead */
    const float logits[T][N] = {{1, 3, 3, 0, -1, 2}, {0, 0, 0, 0, 0, 5}, {2, 1, 0, -1, -2, -3}, {0, 0, 9, 0, 1, 0}};
    for (int renorm = 0; renorm < 2; renorm++) {
        zse_moe_params p = {N, K, renorm == 1};
        zse_moe_route *r = o->moe_route_new(be, T, &p);
        CHECK(r != NULL);
        zse_act *lg = act_from(be, &logits[0][0], T, N);
        o->moe_route(be, r, lg, T);
        /* the active experts: every expert some token picked, ascending */
        int32_t active[N];
        int n_active = o->moe_route_experts(be, r, active);
        const int32_t want_active[] = {0, 1, 2, 4, 5};
        CHECK_EQ_INT(n_active, 5);
        CHECK(memcmp(active, want_active, sizeof want_active) == 0);
        /* the pairs in expert order: gather token ids */
        float xt[T][H];
        for (int t = 0; t < T; t++)
            for (int d = 0; d < H; d++)
                xt[t][d] = (float)(t * 10 + d);
        zse_act *x = act_from(be, &xt[0][0], T, H), *xs = act_from(be, NULL, T * K, H);
        o->moe_gather(be, r, x, xs);
        float got[T * K][H];
        read_act(be, xs, &got[0][0], T * K);
        /* expert 0: tokens 1, 2; 1: 0, 2; 2: 0, 3; 4: 3; 5: 1 */
        const int want_tokens[T * K] = {1, 2, 0, 2, 0, 3, 3, 1};
        for (int i = 0; i < T * K; i++)
            CHECK_MSG(got[i][0] == (float)(want_tokens[i] * 10) && got[i][2] == (float)(want_tokens[i] * 10 + 2),
                      "pair %d holds token %g, not %d", i, (double)got[i][0] / 10, want_tokens[i]);
        /* combine: pair i's output is i + 1 in every column; x[t] += sum of weight * (i + 1) */
        float ys[T * K][H];
        for (int i = 0; i < T * K; i++)
            for (int d = 0; d < H; d++)
                ys[i][d] = (float)(i + 1);
        zse_act *y = act_from(be, &ys[0][0], T * K, H);
        o->moe_combine(be, r, y, NULL, NULL, x);
        float xo[T][H];
        read_act(be, x, &xo[0][0], T);
        for (int t = 0; t < T; t++) {
            /* token t's pairs at their places in expert order (expert by expert, tokens
             * ascending within one), each weighted by the reference's weight */
            double want = t * 10;
            int place = 0;
            for (int e = 0; e < N; e++)
                for (int tt = 0; tt < T; tt++) {
                    int ex2[K];
                    double w2[K];
                    reference_route(logits[tt], N, K, renorm == 1, ex2, w2);
                    for (int j = 0; j < K; j++)
                        if (ex2[j] == e) {
                            if (tt == t)
                                want += w2[j] * (place + 1);
                            place++;
                        }
                }
            CHECK_MSG(fabs(xo[t][1] - (want + 1)) < 1e-5 * fabs(want + 1) + 1e-6,
                      "renorm %d token %d: combined %.7f, want %.7f", renorm, t, (double)xo[t][1], want + 1);
        }
        /* the weights themselves against the reference: a token whose pairs are all i + 1 = 1 */
        o->moe_route(be, r, lg, T);
        for (int i = 0; i < T * K; i++)
            for (int d = 0; d < H; d++)
                ys[i][d] = 1.f;
        float zero[T][H] = {{0}};
        zse_act *z = act_from(be, &zero[0][0], T, H), *ones = act_from(be, &ys[0][0], T * K, H);
        o->moe_combine(be, r, ones, NULL, NULL, z);
        read_act(be, z, &zero[0][0], T);
        for (int t = 0; t < T; t++) {
            int ex[K];
            double w[K];
            reference_route(logits[t], N, K, renorm == 1, ex, w);
            CHECK_NEAR(zero[t][0], w[0] + w[1], 1e-6);
        }
        o->act_free(be, z);
        o->act_free(be, ones);
        o->act_free(be, y);
        o->act_free(be, x);
        o->act_free(be, xs);
        o->act_free(be, lg);
        o->moe_route_free(be, r);
    }
    /* a routing that cannot be */
    zse_moe_params bad = {4, 5, false};
    CHECK(o->moe_route_new(be, 8, &bad) == NULL);
    CHECK(tl_has("not possible"));
}

/* ---- the grouped expert matmul ---------------------------------------------------------- */

typedef struct {
    zse_expert_bank b;
    uint8_t *buf;
    float *w[3];            /* the float weights, [E][rows][cols] per part */
} mem_bank;

/* a bank of E experts in memory, laid out as the writer lays it out */
static void make_bank(mem_bank *mb, zse_scheme scheme, int group, int E, int H, int F)
{
    memset(mb, 0, sizeof *mb);
    zse_expert_bank *b = &mb->b;
    b->count = E;
    uint64_t at = 0;
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++) {
        zse_expert_part *ep = &b->part[p];
        ep->q.scheme = scheme;
        ep->q.rows = p == ZSE_EXPERT_DOWN ? H : F;
        ep->q.cols = p == ZSE_EXPERT_DOWN ? F : H;
        ep->q.group_size = zse_scheme_layout(scheme) == ZSE_LAYOUT_Q4_G ? group : 0;
        ep->layout = zse_scheme_layout(scheme);
        ep->size = zse_qshape_bytes(&ep->q);
        ep->at = at;
        at = (at + ep->size + 255) / 256 * 256;
    }
    b->size = b->part[2].at + b->part[2].size;
    b->stride = (b->size + 4095) / 4096 * 4096;
    mb->buf = zse_aligned_alloc(4096, (size_t)b->stride * (size_t)E);
    memset(mb->buf, 0, (size_t)b->stride * (size_t)E);
    b->data = mb->buf;
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++) {
        const zse_qshape *q = &b->part[p].q;
        const size_t n = (size_t)(q->rows * q->cols);
        mb->w[p] = zse_malloc((size_t)E * n * sizeof(float));
        for (int e = 0; e < E; e++) {
            float *src = mb->w[p] + (size_t)e * n;
            for (size_t i = 0; i < n; i++)
                src[i] = frand() * 0.3f;
            zse_quantize_rows(q, src, mb->buf + (uint64_t)e * b->stride + b->part[p].at, 0, q->rows);
            /* the reference multiplies what the experts hold: their dequantized rows */
            for (int64_t r = 0; r < q->rows; r++)
                zse_dequantize_row(q, mb->buf + (uint64_t)e * b->stride + b->part[p].at, r, src + r * q->cols);
        }
    }
}

static void free_bank(mem_bank *mb)
{
    free(mb->buf);
    for (int p = 0; p < 3; p++)
        free(mb->w[p]);
}

static double silu(double g) { return g / (1 + exp(-g)); }

static void test_grouped(zse_backend *be, zse_scheme scheme, int group)
{
    const zse_backend_ops *o = be->ops;
    enum { E = 5, H = 64, F = 40, T = 7, K = 2 };
    mem_bank mb;
    make_bank(&mb, scheme, group, E, H, F);
    zse_experts *ex = o->experts_load(be, &mb.b);
    CHECK(ex != NULL);
    float logits[T][E], x[T][H], sh[T][H], gate[T][1];
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++)
            logits[t][e] = frand() * 3;
        for (int d = 0; d < H; d++) {
            x[t][d] = frand();
            sh[t][d] = frand();
        }
        gate[t][0] = frand() * 2;
    }
    zse_moe_params p = {E, K, scheme == ZSE_SCHEME_Q8};
    zse_moe_route *r = o->moe_route_new(be, T, &p);
    zse_act *lg = act_from(be, &logits[0][0], T, E), *xa = act_from(be, &x[0][0], T, H);
    zse_act *xs = act_from(be, NULL, T * K, H), *hs = act_from(be, NULL, T * K, F), *hs2 = act_from(be, NULL, T * K, F);
    zse_act *sha = act_from(be, &sh[0][0], T, H), *ga = act_from(be, &gate[0][0], T, 1), *out = act_from(be, NULL, T, H);
    o->moe_route(be, r, lg, T);
    o->moe_gather(be, r, xa, xs);
    const zse_moe_out gates = {ZSE_EXPERT_GATE, hs};
    o->moe_matmul(be, r, ex, xs, &gates, 1);
    /* each pair's gate rows equal the dense matmul of its expert alone over its token alone */
    float got[T * K][F], one[F];
    read_act(be, hs, &got[0][0], T * K);
    int place = 0;
    bool exact = true;
    for (int e = 0; e < E; e++) {
        char name[64];
        zse_tensor_info ti;
        zse_expert_tensor(&mb.b, e, ZSE_EXPERT_GATE, name, &ti);
        zse_weight *w = o->weight_load(be, &ti);
        for (int t = 0; t < T; t++) {
            int exs[K];
            double ws[K];
            reference_route(logits[t], E, K, p.renormalize, exs, ws);
            if (exs[0] != e && exs[1] != e)
                continue;
            zse_act *x1 = act_from(be, x[t], 1, H), *y1 = act_from(be, NULL, 1, F);
            o->matmul(be, w, x1, 1, y1);
            read_act(be, y1, one, 1);
            exact = exact && memcmp(one, got[place], sizeof one) == 0;
            place++;
            o->act_free(be, x1);
            o->act_free(be, y1);
        }
        o->weight_free(be, w);
    }
    CHECK_EQ_INT(place, T * K);
    CHECK_MSG(exact, "%s: a pair's row differs from its expert's matmul alone", zse_scheme_name(scheme));
    /* the whole MLP with the shared expert, against floats */
    /* gate again and up in one call, as the model runs them */
    const zse_moe_out gate_up[2] = {{ZSE_EXPERT_GATE, hs}, {ZSE_EXPERT_UP, hs2}}, down = {ZSE_EXPERT_DOWN, xs};
    o->moe_matmul(be, r, ex, xs, gate_up, 2);
    float again[T * K][F];
    read_act(be, hs, &again[0][0], T * K);
    CHECK_MSG(memcmp(again, got, sizeof again) == 0, "%s: gate rows differ when up shares the call",
              zse_scheme_name(scheme));
    o->silu_mul(be, hs, hs2, T * K, F, hs);
    o->moe_matmul(be, r, ex, hs, &down, 1);
    o->moe_combine(be, r, xs, sha, ga, out);
    float res[T][H];
    read_act(be, out, &res[0][0], T);
    double worst = 0;
    for (int t = 0; t < T; t++) {
        int exs[K];
        double ws[K], acc[H] = {0};
        reference_route(logits[t], E, K, p.renormalize, exs, ws);
        for (int j = 0; j < K; j++) {
            const float *Wg = mb.w[0] + (size_t)exs[j] * F * H, *Wu = mb.w[1] + (size_t)exs[j] * F * H;
            const float *Wd = mb.w[2] + (size_t)exs[j] * H * F;
            double h[F];
            for (int f = 0; f < F; f++) {
                double g = 0, u = 0;
                for (int d = 0; d < H; d++) {
                    g += (double)Wg[f * H + d] * x[t][d];
                    u += (double)Wu[f * H + d] * x[t][d];
                }
                h[f] = silu(g) * u;
            }
            for (int d = 0; d < H; d++) {
                double v = 0;
                for (int f = 0; f < F; f++)
                    v += (double)Wd[d * F + f] * h[f];
                acc[d] += ws[j] * v;
            }
        }
        const double sig = 1 / (1 + exp(-gate[t][0]));
        for (int d = 0; d < H; d++) {
            const double want = acc[d] + sig * sh[t][d];
            const double err = fabs(res[t][d] - want);
            worst = err > worst ? err : worst;
        }
    }
    /* integer kernels quantize x to int8 (per block): a few 1e-3 at these magnitudes */
    const double tol = scheme == ZSE_SCHEME_F32 ? 1e-5 : 2e-2;
    CHECK_MSG(worst < tol, "%s: the expert MLP is %.3g from the float reference", zse_scheme_name(scheme), worst);
    zse_act *acts[] = {lg, xa, xs, hs, hs2, sha, ga, out};
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++)
        o->act_free(be, acts[i]);
    o->moe_route_free(be, r);
    o->experts_free(be, ex);
    free_bank(&mb);
}

/* ---- the .zse banks --------------------------------------------------------------------- */

typedef struct {
    int bank;               /* index into "experts"; -1: the header itself */
    const char *key;
    const char *value;      /* JSON; NULL deletes the key */
    int part;               /* >= 0: edit that part instead */
} bank_edit;

static void apply_bank_edit(json_t *h, const void *arg)
{
    const bank_edit *e = arg;
    json_t *target = h;
    if (e->bank >= 0)
        target = json_array_get(json_object_get(h, "experts"), (size_t)e->bank);
    if (e->part >= 0)
        target = json_array_get(json_object_get(target, "parts"), (size_t)e->part);
    if (e->key && strcmp(e->key, "config.n_experts") == 0) {
        json_object_set_new(json_object_get(h, "config"), "n_experts", json_loads(e->value, JSON_DECODE_ANY, NULL));
        return;
    }
    if (!e->value)
        json_object_del(target, e->key);
    else
        json_object_set_new(target, e->key, json_loads(e->value, JSON_DECODE_ANY, NULL));
}

static void test_banks(const char *good)
{
    zse_file *f = zse_file_open(good);
    CHECK_MSG(f != NULL, "%s", zse_error_message());
    if (!f)
        return;
    const zse_config *c = zse_file_config(f);
    CHECK_EQ_INT((int)zse_file_major(f), 2);
    CHECK_EQ_INT((int)zse_file_n_expert_banks(f), zse_config_moe_layer_count(c));
    uint64_t first_offset = 0, stride = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const zse_expert_bank *b = zse_file_experts(f, l);
        CHECK(!b == !zse_config_layer_is_moe(c, l));
        if (!b)
            continue;
        CHECK_EQ_INT(b->layer, l);
        CHECK_EQ_INT(b->count, c->n_experts);
        CHECK(b->offset % 4096 == 0 && b->stride % 4096 == 0 && b->stride >= b->size);
        CHECK(b->part[0].at == 0 && b->part[1].at % 256 == 0 && b->part[2].at % 256 == 0);
        for (int e = 0; e < b->count; e++)
            CHECK(zse_expert_verify(b, e));
        char name[64];
        zse_tensor_info ti;
        zse_expert_tensor(b, 3, ZSE_EXPERT_DOWN, name, &ti);
        CHECK_EQ_INT((int)ti.q.rows, c->hidden_size);
        CHECK_EQ_INT((int)ti.q.cols, c->expert_ffn);
        CHECK(ti.data == zse_file_base(f) + b->offset + 3 * b->stride + b->part[2].at);
        char want[64];
        snprintf(want, sizeof want, "blk.%d.ffn_down_exps.3", l);
        CHECK(ti.name == name);
        CHECK_EQ_STR(ti.name, want);
        if (!first_offset) {
            first_offset = b->offset;
            stride = b->stride;
        }
    }
    int n_bad = 0;
    CHECK(zse_file_verify(f, &n_bad) == 0);
    zse_file_close(f);

    /* a flipped byte inside expert 1 of the first bank: verify names it, expert 1 alone fails */
    const char *bad = tl_path("moe-bad.zse");
    tl_copy(good, bad, -1, (long)(first_offset + stride + 40));
    f = zse_file_open(bad);
    CHECK(f != NULL);
    if (f) {
        const zse_expert_bank *b = zse_file_expert_bank_at(f, 0);
        CHECK(zse_expert_verify(b, 0) && !zse_expert_verify(b, 1) && zse_expert_verify(b, 2));
        CHECK(zse_file_verify(f, &n_bad) != 0);
        CHECK_EQ_INT(n_bad, 1);
        CHECK_MSG(tl_has("expert 1"), "%s", zse_error_message());
        zse_file_close(f);
    }
    /* corrupt entries, each refused at open with its reason */
    char misaligned[32], outside[32];
    snprintf(misaligned, sizeof misaligned, "%llu", (unsigned long long)(first_offset + 64));
    snprintf(outside, sizeof outside, "%llu", (unsigned long long)(first_offset + ((uint64_t)1 << 40)));
    const struct {
        bank_edit e;
        const char *needle;
    } cases[] = {
        {{0, "offset", misaligned, -1}, "misaligned or outside"},
        {{0, "offset", outside, -1}, "misaligned or outside"},
        {{0, "offset", "0", -1}, "misaligned or outside"},
        {{0, "stride", "4095", -1}, "misaligned or outside"},
        {{0, "stride", "9223372036854771712", -1}, "misaligned or outside"},
        {{0, "size", "5", -1}, "misaligned or outside"},
        {{0, "offset", NULL, -1}, "lacks offset"},
        {{0, "count", "3", -1}, "experts"},
        {{0, "layer", "1000", -1}, "no valid layer"},
        {{0, "checksums", "[]", -1}, "checksums"},
        {{0, "parts", "[]", -1}, "3 parts"},
        {{0, "name", "\"ffn_up_exps\"", 0}, "not ffn_gate_exps"},
        {{0, "shape", "[12,17]", 0}, "the config"},
        {{0, "scheme", "\"int3\"", 1}, "unknown scheme"},
        {{0, "at", "4", 1}, "misaligned"},
        {{0, "at", "0", 1}, "overlap"},
        {{0, "size", "7", 2}, "its shape needs"},
        {{0, "group_size", "48", 2}, "group size"},
        {{-1, "experts", NULL, -1}, "expert banks"},
        {{-1, "experts", "[]", -1}, "expert banks"},
        {{-1, "config.n_experts", "0", -1}, NULL}, /* a dense config: the banks are ignored */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (!tl_edit_header(good, bad, apply_bank_edit, &cases[i].e)) {
            CHECK_MSG(false, "case %zu: the edited header does not fit", i);
            continue;
        }
        zse_file *g = zse_file_open(bad);
        if (!cases[i].needle) {
            CHECK_MSG(g != NULL, "case %zu: %s", i, zse_error_message());
        } else {
            CHECK_MSG(g == NULL && tl_has(cases[i].needle), "case %zu: want '%s', got '%s'", i, cases[i].needle,
                      g ? "opened" : zse_error_message());
        }
        zse_file_close(g);
    }
    /* a file with experts that says it is format 1: a 1.x reader would skip the experts */
    tl_patch_preamble(good, bad, 8, 2, 1);
    f = zse_file_open(bad);
    CHECK(f == NULL && tl_has("needs .zse format 2"));
    zse_file_close(f);
    /* and a later major is refused as newer than this reader */
    tl_patch_preamble(good, bad, 8, 2, 3);
    f = zse_file_open(bad);
    CHECK(f == NULL && tl_has("newer than this zse reads (2.x)"));
    zse_file_close(f);
}

/* ---- the models: batched = alone ------------------------------------------------------- */

enum { NSEQ = 3, BLOCK = 16, NBLOCKS = 48, MAX_TOKENS = 64 };

typedef struct {
    zse_llm *m;
    zse_kv *kv;
    int32_t len[NSEQ];
} runner;

static bool open_runner(runner *r, const zse_file *f, zse_backend *be)
{
    memset(r, 0, sizeof *r);
    r->m = zse_llm_load(f, be, MAX_TOKENS, MAX_TOKENS);
    CHECK_MSG(r->m != NULL, "%s", zse_last_error());
    if (!r->m)
        return false;
    const zse_config *c = zse_llm_config(r->m);
    zse_kv_shape shape = {c->n_layers, NBLOCKS, BLOCK, c->n_kv_heads, c->head_dim, ZSE_KV_STORE_F16};
    r->kv = be->ops->kv_new(be, &shape);
    CHECK(r->kv != NULL);
    return r->kv != NULL;
}

/* one step of take[s] tokens of each sequence s (ids in sequence order); logits of each
 * taking sequence's last token into logits[s] */
static void step(runner *r, const int *take, int32_t (*ids)[MAX_TOKENS], int vocab, float **logits)
{
    int32_t tok[MAX_TOKENS], pos[MAX_TOKENS], seq_of[MAX_TOKENS], slots[MAX_TOKENS], rows[NSEQ];
    int32_t lens[NSEQ], table[NSEQ][NBLOCKS / NSEQ];
    int n = 0, n_seqs = 0, who[NSEQ];
    for (int s = 0; s < NSEQ; s++) {
        if (!take[s])
            continue;
        for (int k = 0; k < take[s]; k++, n++) {
            const int p = r->len[s] + k;
            tok[n] = ids[s][p];
            pos[n] = p;
            seq_of[n] = n_seqs;
            slots[n] = (s * (NBLOCKS / NSEQ) + p / BLOCK) * BLOCK + p % BLOCK;
        }
        for (int b = 0; b < NBLOCKS / NSEQ; b++)
            table[n_seqs][b] = s * (NBLOCKS / NSEQ) + b;
        rows[n_seqs] = n - 1;
        lens[n_seqs] = r->len[s] + take[s];
        who[n_seqs++] = s;
    }
    float *out = zse_malloc((size_t)n_seqs * (size_t)vocab * sizeof *out);
    zse_batch b = {n, tok, pos, seq_of, slots, n_seqs, lens, &table[0][0], NBLOCKS / NSEQ, n_seqs, rows, NULL, 0};
    CHECK_MSG(zse_llm_forward(r->m, r->kv, &b, out) == 0, "%s", zse_last_error());
    for (int i = 0; i < n_seqs; i++) {
        memcpy(logits[who[i]], out + (size_t)i * (size_t)vocab, (size_t)vocab * sizeof *out);
        r->len[who[i]] += take[who[i]];
    }
    free(out);
}

static void test_batched_alone(const char *path)
{
    zse_file *f = zse_file_open(path);
    CHECK_MSG(f != NULL, "%s", zse_error_message());
    zse_backend *be = zse_backend_create("cpu", 2);
    runner alone, together;
    if (!f || !be || !open_runner(&alone, f, be) || !open_runner(&together, f, be)) {
        zse_file_close(f);
        zse_backend_destroy(be);
        return;
    }
    const int vocab = zse_file_config(f)->vocab_size;
    static int32_t ids[NSEQ][MAX_TOKENS];
    for (int s = 0; s < NSEQ; s++)
        for (int i = 0; i < MAX_TOKENS; i++)
            ids[s][i] = (int32_t)((rng = rng * 1664525u + 1013904223u) >> 8) % vocab;
    float *la[NSEQ], *lb[NSEQ];
    for (int s = 0; s < NSEQ; s++) {
        la[s] = zse_malloc((size_t)vocab * sizeof(float));
        lb[s] = zse_malloc((size_t)vocab * sizeof(float));
    }
    /* prefills of different lengths in one step, then decodes of all three, then a mix */
    const int plans[][NSEQ] = {{11, 5, 17}, {1, 1, 1}, {1, 1, 1}, {4, 1, 1}, {1, 9, 1}};
    bool same = true;
    for (size_t p = 0; p < sizeof plans / sizeof plans[0]; p++) {
        step(&together, plans[p], ids, vocab, lb);
        for (int s = 0; s < NSEQ; s++) {
            int one[NSEQ] = {0};
            one[s] = plans[p][s];
            step(&alone, one, ids, vocab, la);
            if (memcmp(la[s], lb[s], (size_t)vocab * sizeof(float)) != 0) {
                same = false;
                fprintf(stderr, "%s: step %zu, sequence %d: batched logits differ from alone\n", path, p, s);
            }
        }
    }
    CHECK(same);
    for (int s = 0; s < NSEQ; s++) {
        free(la[s]);
        free(lb[s]);
    }
    be->ops->kv_free(be, alone.kv);
    be->ops->kv_free(be, together.kv);
    zse_llm_free(alone.m);
    zse_llm_free(together.m);
    zse_backend_destroy(be);
    zse_file_close(f);
}

int main(void)
{
    const char *data = test_env("ZSE_TEST_DATA");
    if (!data)
        data = "tests/fixtures";
    tl_begin("moe");
    zse_backend *be = zse_backend_create("cpu", 2);
    CHECK(be != NULL);
    if (be) {
        test_routing(be);
        test_grouped(be, ZSE_SCHEME_F32, 0);
        test_grouped(be, ZSE_SCHEME_Q8, 0);
        test_grouped(be, ZSE_SCHEME_Q4, 32);
        test_grouped(be, ZSE_SCHEME_NF4, 64);
        zse_backend_destroy(be);
    }
    static const char *const models[] = {"qwen3-moe", "qwen2-moe", "mixtral"};
    for (size_t i = 0; i < sizeof models / sizeof models[0]; i++) {
        char dir[512];
        snprintf(dir, sizeof dir, "%s/random/%s", data, models[i]);
        for (int q = 0; q < 2; q++) {
            const char *path = tl_path("%s-%d.zse", models[i], q);
            zse_convert_opts o = {.scheme = q ? ZSE_SCHEME_Q4 : ZSE_SCHEME_F32, .group_size = 32, .embed_scheme = -1,
                                  .lm_head_scheme = -1, .force = true, .threads = 2};
            if (zse_convert(dir, path, &o) != 0) {
                CHECK_MSG(false, "cannot convert %s: %s", dir, zse_error_message());
                continue;
            }
            if (i == 0)
                test_banks(path);
            test_batched_alone(path);
        }
    }
    tl_end();
    return test_main_end();
}
