/* Weights in host memory (issue 18), on the CPU:
 *
 *  - the expert cache's planner with a fake clock: hits, misses into the least recently
 *    routed slot, slots the current layer uses never evicted (by its own misses or by a
 *    prefetch), prefetches and their hits, host-or-fetch by the measured bandwidths and the
 *    pairs, the modes, the bandwidth estimate;
 *  - the fit arithmetic on the fixtures: resident / experts offloaded / streamed around the
 *    budgets that separate them, the minimum an error states, the test knobs;
 *  - the CPU backend's lazy copy queue: a weight read before the wait for its copy is the
 *    slot's old content (so the model tests below would see a missing wait);
 *  - the models: MoE fixtures with their experts in host memory (the smallest cache, one
 *    slot more, every miss on the host, the automatic choice) and dense fixtures with layers
 *    streamed (some, all, one buffer, more buffers) give the resident model's logits bit for
 *    bit over prefills, decodes and a batch of two sequences; the counters add up. */
#include "format_testlib.h"

#include "backend/backend.h"
#include "model/internal.h"
#include "zse.h"

#include <stdint.h>

/* ---- the planner ----------------------------------------------------------------------- */

enum { PE = 8 };  /* experts per layer in the planner tests */

typedef struct {
    int32_t where[PE], fe[PE], fs[PE];
    zse_xplan p;
} plan_buf;

static zse_xplan *plan_of(plan_buf *b)
{
    b->p = (zse_xplan){b->where, b->fe, b->fs, 0, 0};
    return &b->p;
}

static void plan(zse_xcache *c, int layer, const int32_t *active, int n, double now, plan_buf *b)
{
    int32_t pairs[PE];
    for (int i = 0; i < n; i++)
        pairs[i] = 1;
    zse_xcache_plan(c, layer, active, pairs, n, 1000000, now, plan_of(b));
}

static void test_planner_lru(void)
{
    zse_xcache c;
    CHECK(zse_xcache_init(&c, 2, 4, 3) != 0); /* fewer slots than a layer's experts */
    CHECK(tl_has("at least one layer"));
    CHECK(zse_xcache_init(&c, 2, 4, 5) == 0);
    c.host_mode = ZSE_HOST_EXPERTS_NEVER;
    plan_buf b;
    /* layer 0 routes to 0 and 1: two misses into the two first (empty) slots */
    plan(&c, 0, (const int32_t[]){0, 1}, 2, 0, &b);
    CHECK_EQ_INT(b.p.n_fetch, 2);
    CHECK_EQ_INT(b.where[0], 0);
    CHECK_EQ_INT(b.where[1], 1);
    plan(&c, 1, (const int32_t[]){2, 3}, 2, 0, &b);
    CHECK_EQ_INT(b.p.n_fetch, 2);
    /* layer 0 again: 0 hits, 3 takes the last empty slot */
    plan(&c, 0, (const int32_t[]){0, 3}, 2, 0, &b);
    CHECK_EQ_INT(b.p.n_fetch, 1);
    CHECK_EQ_INT(b.where[0], 0);
    CHECK_EQ_INT(b.where[1], 4);
    CHECK_EQ_INT(c.stats.hits, 1);
    /* now full: layer 1's expert 0 evicts the least recently routed, layer 0's expert 1 (slot 1) */
    plan(&c, 1, (const int32_t[]){0}, 1, 0, &b);
    CHECK_EQ_INT(b.where[0], 1);
    CHECK_EQ_INT(zse_xcache_slot(&c, 0, 1), -1);
    CHECK_EQ_INT(zse_xcache_slot(&c, 1, 0), 1);
    CHECK_EQ_INT(c.stats.evicted, 1);
    /* a layer routing to every expert: its hits stay, its misses never evict one another */
    plan(&c, 0, (const int32_t[]){0, 1, 2, 3}, 4, 0, &b);
    bool distinct = true;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < i; j++)
            distinct = distinct && b.where[i] != b.where[j];
    CHECK(distinct);
    for (int e = 0; e < 4; e++)
        CHECK_EQ_INT(zse_xcache_slot(&c, 0, e), b.where[e]);
    /* the slot a layer uses is never the one its prefetch fills */
    plan_buf pf;
    zse_xcache_prefetch(&c, 1, (const int32_t[]){1, 2, 3}, 3, 1, 1000000, 0, plan_of(&pf));
    CHECK_EQ_INT(pf.p.n_fetch, 1); /* one slot is free of layer 0's four */
    for (int i = 0; i < pf.p.n_fetch; i++)
        for (int a = 0; a < 4; a++)
            CHECK(pf.fs[i] != b.where[a]);
    CHECK_EQ_INT(c.stats.prefetched, 1);
    /* the next tick routes to the prefetched expert: a hit that counts as a prefetch hit */
    plan(&c, 1, (const int32_t[]){pf.fe[0]}, 1, 0, &b);
    CHECK_EQ_INT(b.p.n_fetch, 0);
    CHECK_EQ_INT(c.stats.prefetch_hits, 1);
    zse_xcache_free(&c);
}

/* prefetching stops paying when its guesses miss: the planner then prefetches for one layer
 * in ZSE_PREFETCH_PROBE, and goes back to every layer once the probes hit again */
static void test_planner_prefetch_gate(void)
{
    zse_xcache c;
    CHECK(zse_xcache_init(&c, 2, PE, PE) == 0);
    c.host_mode = ZSE_HOST_EXPERTS_NEVER;
    plan_buf b, pf;
    uint64_t issued_late = 0, skipped_late = 0;
    /* layer 0 cycles over its 8 experts, layer 1 is routed to 4..7 in turn and guessed 1..3:
     * with 8 slots every one is a miss, so each guess is fetched and evicted unused */
    for (int i = 0; i < 400; i++) {
        const int32_t first = i % PE, guess = 1 + i % 3, routed = 4 + i % 4;
        plan(&c, 0, &first, 1, 0, &b);
        const uint64_t before = c.stats.prefetched;
        zse_xcache_prefetch(&c, 1, &guess, 1, 1, 1000, 0, plan_of(&pf));
        plan(&c, 1, &routed, 1, 0, &b);
        if (i >= 200) {
            issued_late += c.stats.prefetched - before;
            skipped_late = c.stats.prefetch_skipped;
        }
    }
    CHECK(c.prefetch_hit < ZSE_PREFETCH_MIN_HIT);
    CHECK_EQ_INT(c.stats.prefetch_hits, 0);
    /* past the first misses only the probes prefetch: 200 / 16 of the last 200 layers */
    CHECK(issued_late <= 200 / ZSE_PREFETCH_PROBE + 1);
    CHECK(skipped_late >= 150);
    /* phase 2: every guess is right (layer 1 cycles over all 8: misses again); the probes'
     * hits raise the share past the bar */
    uint64_t skipped_at = 0;
    for (int i = 0; i < 600; i++) {
        const int32_t first = i % PE, guess = (i + 3) % PE; /* every one a miss, as above */
        plan(&c, 0, &first, 1, 0, &b);
        zse_xcache_prefetch(&c, 1, &guess, 1, 1, 1000, 0, plan_of(&pf));
        plan(&c, 1, &guess, 1, 0, &b);
        if (i == 500)
            skipped_at = c.stats.prefetch_skipped;
    }
    CHECK(c.prefetch_hit >= ZSE_PREFETCH_MIN_HIT);
    CHECK_EQ_INT(c.stats.prefetch_skipped, skipped_at); /* none skipped in the last 100 */
    CHECK(c.stats.prefetch_hits >= 100);
    zse_xcache_free(&c);
}

static void test_planner_host(void)
{
    zse_xcache c;
    CHECK(zse_xcache_init(&c, 1, PE, PE) == 0);
    plan_buf b;
    /* an unmeasured host runs nothing */
    plan(&c, 0, (const int32_t[]){0}, 1, 0, &b);
    CHECK_EQ_INT(b.p.n_host, 0);
    zse_xcache_free(&c);

    CHECK(zse_xcache_init(&c, 1, PE, PE) == 0);
    zse_xcache_measured(&c, false, 1000000000, 1.0); /* 1 GB/s over PCIe */
    zse_xcache_measured(&c, true, 1000000000, 1.0);  /* and on the host */
    CHECK_NEAR(c.copy_bps, 1e9, 1);
    /* four missing 1 MB experts of one pair at time 10: fetch (done at 10.001), host (10.001),
     * then each goes where it finishes first: a tie fetches */
    plan(&c, 0, (const int32_t[]){0, 1, 2, 3}, 4, 10.0, &b);
    CHECK_EQ_INT(b.p.n_fetch, 2);
    CHECK_EQ_INT(b.p.n_host, 2);
    CHECK_NEAR(c.copy_free, 10.002, 1e-9);
    CHECK_NEAR(c.host_free, 10.002, 1e-9);
    /* later the queues are idle again; a token's worth (1 pair) is a tile on the host, 9
     * pairs are two: then fetching wins */
    int32_t pairs9[] = {9};
    zse_xcache_plan(&c, 0, (const int32_t[]){4}, pairs9, 1, 1000000, 20.0, plan_of(&b));
    CHECK_EQ_INT(b.p.n_host, 0);
    CHECK_EQ_INT(b.p.n_fetch, 1);
    /* a faster host takes the single pair */
    zse_xcache_measured(&c, true, 4000000000, 1.0); /* estimate: 0.75 * 1 + 0.25 * 4 GB/s */
    CHECK_NEAR(c.host_bps, 1.75e9, 1);
    plan(&c, 0, (const int32_t[]){5}, 1, 30.0, &b);
    CHECK_EQ_INT(b.p.n_host, 1);
    /* more pairs than the host takes at all */
    int32_t many[] = {ZSE_HOST_MAX_PAIRS + 1};
    c.host_bps = 1e15;
    zse_xcache_plan(&c, 0, (const int32_t[]){6}, many, 1, 1000000, 40.0, plan_of(&b));
    CHECK_EQ_INT(b.p.n_host, 0);
    /* the modes */
    c.host_mode = ZSE_HOST_EXPERTS_NEVER;
    plan(&c, 0, (const int32_t[]){7}, 1, 50.0, &b);
    CHECK_EQ_INT(b.p.n_host, 0);
    c.host_mode = ZSE_HOST_EXPERTS_ALWAYS;
    c.host_bps = 0;
    plan(&c, 0, (const int32_t[]){5}, 1, 60.0, &b); /* a miss again? 5 ran on the host: yes */
    CHECK_EQ_INT(b.p.n_host, 1);
    CHECK_EQ_INT(zse_xcache_host_bytes(100, 17), 300);
    zse_xcache_free(&c);
}

/* a guess is left for the host when the copy engine is so far behind that the host would
 * finish it first (AUTO), and fetched otherwise */
static void test_planner_prefetch_host(void)
{
    zse_xcache c;
    CHECK(zse_xcache_init(&c, 2, PE, 2 * PE) == 0);
    zse_xcache_measured(&c, false, 1000000000, 1.0); /* 1 GB/s over PCIe */
    zse_xcache_measured(&c, true, 1000000000, 1.0);  /* and on the host */
    plan_buf b, pf;
    plan(&c, 0, (const int32_t[]){0}, 1, 0.0, &b); /* its miss keeps the link until 0.001 */
    /* an idle link: a 1 MB guess of one pair is done at 10.001 either way; a tie fetches */
    zse_xcache_prefetch(&c, 1, (const int32_t[]){1}, 1, 1, 1000000, 10.0, plan_of(&pf));
    CHECK_EQ_INT(pf.p.n_fetch, 1);
    /* the link is now busy until 10.001: the host finishes the next guess first */
    zse_xcache_prefetch(&c, 1, (const int32_t[]){2}, 1, 1, 1000000, 10.0, plan_of(&pf));
    CHECK_EQ_INT(pf.p.n_fetch, 0);
    CHECK_EQ_INT(c.stats.prefetch_to_host, 1);
    /* a prefill's guess (more pairs than the host takes) streams whatever the backlog */
    zse_xcache_prefetch(&c, 1, (const int32_t[]){2}, 1, ZSE_HOST_MAX_PAIRS + 1, 1000000, 10.0, plan_of(&pf));
    CHECK_EQ_INT(pf.p.n_fetch, 1);
    /* NEVER fetches every guess */
    c.host_mode = ZSE_HOST_EXPERTS_NEVER;
    zse_xcache_prefetch(&c, 1, (const int32_t[]){3}, 1, 1, 1000000, 10.0, plan_of(&pf));
    CHECK_EQ_INT(pf.p.n_fetch, 1);
    CHECK_EQ_INT(c.stats.prefetch_to_host, 1);
    zse_xcache_free(&c);
}

/* ---- the lazy copy queue ------------------------------------------------------------------- */

static void test_copy_queue(void)
{
    zse_backend *be = zse_backend_create("cpu", 1);
    const zse_backend_ops *o = be->ops;
    float w[4 * 8], x[8], y[4];
    for (int i = 0; i < 32; i++)
        w[i] = (float)(i % 5) - 2.f;
    for (int i = 0; i < 8; i++)
        x[i] = 1.f;
    zse_tensor_info t = {.name = "w", .q = {ZSE_SCHEME_F32, 4, 8, 0}, .layout = ZSE_LAYOUT_PLAIN, .size = sizeof w};
    zse_pinned *h = o->host_pin(be, w, sizeof w);
    zse_slab *s = o->slab_new(be, 256, 2);
    zse_weight *v = o->weight_in_slab(be, &t, s, 1, 0);
    zse_act *xa = o->act_new(be, 1, 8), *ya = o->act_new(be, 1, 4);
    CHECK(h && s && v && xa && ya);
    CHECK(o->weight_in_slab(be, &t, s, 1, 200) == NULL); /* past the slot's end */
    o->act_write(be, xa, x, 1);
    o->slab_fetch(be, s, 1, h, 0, sizeof w, -1);
    const int64_t m = o->mark(be, ZSE_QUEUE_COPY);
    o->matmul(be, v, xa, 1, ya); /* no wait: the slot still holds zeros */
    o->act_read(be, ya, y, 1);
    CHECK(y[0] == 0.f && y[3] == 0.f);
    o->wait_mark(be, ZSE_QUEUE_COMPUTE, m);
    o->matmul(be, v, xa, 1, ya);
    o->act_read(be, ya, y, 1);
    CHECK(y[0] == -2.f + -1.f + 0.f + 1.f + 2.f + -2.f + -1.f + 0.f);
    zse_backend_memory bm;
    o->memory(be, &bm);
    CHECK_EQ_INT(bm.slabs, 512);
    /* act_write_rows: rows by index */
    zse_act *r = o->act_new(be, 4, 8);
    float two[16];
    for (int i = 0; i < 16; i++)
        two[i] = (float)i;
    CHECK(o->act_write_rows(be, r, two, (const int32_t[]){3, 1}, 2) == 0);
    float back[32];
    o->act_read(be, r, back, 4);
    CHECK(back[3 * 8] == 0.f && back[3 * 8 + 7] == 7.f && back[8] == 8.f && back[0] == 0.f);
    CHECK(o->act_write_rows(be, r, two, (const int32_t[]){4}, 1) != 0);
    o->act_free(be, r);
    o->weight_free(be, v);
    o->act_free(be, xa);
    o->act_free(be, ya);
    o->slab_free(be, s);
    o->host_unpin(be, h);
    zse_backend_destroy(be);
}

/* ---- the models ------------------------------------------------------------------------------- */

enum { NSEQ = 2, BLOCK = 16, NBLOCKS = 16, MAX_TOKENS = 32, STEPS = 6 };
static const int PLAN[STEPS][NSEQ] = {{11, 0}, {1, 7}, {1, 1}, {1, 1}, {3, 1}, {1, 1}};

/* the logits of every step of PLAN (each taking sequence's last token) into out; false
 * when the model did not load or a step failed */
static bool run_plan(const zse_file *f, const zse_placement *pl, float *out, zse_llm_offload_stats *st)
{
    zse_backend *be = zse_backend_create("cpu", 2);
    zse_llm *m = be ? zse_llm_load_placed(f, be, MAX_TOKENS, MAX_TOKENS, pl) : NULL;
    CHECK_MSG(m != NULL, "%s", zse_last_error());
    const zse_config *c = zse_file_config(f);
    zse_kv_shape shape = {c->n_layers, NBLOCKS, BLOCK, c->n_kv_heads, c->head_dim, ZSE_KV_STORE_F16};
    zse_kv *kv = m ? be->ops->kv_new(be, &shape) : NULL;
    bool ok = kv != NULL;
    uint32_t r = 12345;
    int32_t ids[NSEQ][MAX_TOKENS], len[NSEQ] = {0, 0};
    for (int s = 0; s < NSEQ; s++)
        for (int i = 0; i < MAX_TOKENS; i++)
            ids[s][i] = (int32_t)(((r = r * 1664525u + 1013904223u) >> 8) % (uint32_t)c->vocab_size);
    float *at = out;
    for (int p = 0; ok && p < STEPS; p++) {
        int32_t tok[MAX_TOKENS], pos[MAX_TOKENS], seq_of[MAX_TOKENS], slots[MAX_TOKENS], rows[NSEQ], lens[NSEQ];
        int32_t table[NSEQ][NBLOCKS / NSEQ];
        int n = 0, n_seqs = 0;
        for (int s = 0; s < NSEQ; s++) {
            if (!PLAN[p][s])
                continue;
            for (int k = 0; k < PLAN[p][s]; k++, n++) {
                const int q = len[s] + k;
                tok[n] = ids[s][q];
                pos[n] = q;
                seq_of[n] = n_seqs;
                slots[n] = (s * (NBLOCKS / NSEQ) + q / BLOCK) * BLOCK + q % BLOCK;
            }
            for (int k = 0; k < NBLOCKS / NSEQ; k++)
                table[n_seqs][k] = s * (NBLOCKS / NSEQ) + k;
            rows[n_seqs] = n - 1;
            lens[n_seqs++] = len[s] += PLAN[p][s];
        }
        zse_batch b = {n, tok, pos, seq_of, slots, n_seqs, lens, &table[0][0], NBLOCKS / NSEQ, n_seqs, rows, NULL, 0};
        ok = zse_llm_forward(m, kv, &b, at) == 0;
        CHECK_MSG(ok, "step %d: %s", p, zse_last_error());
        at += (size_t)n_seqs * (size_t)c->vocab_size;
    }
    if (m && st)
        zse_llm_offload_stats_get(m, st);
    if (kv)
        be->ops->kv_free(be, kv);
    zse_llm_free(m);
    zse_backend_destroy(be);
    return ok;
}

static size_t plan_rows(void)
{
    size_t n = 0;
    for (int p = 0; p < STEPS; p++)
        for (int s = 0; s < NSEQ; s++)
            n += PLAN[p][s] > 0;
    return n;
}

/* pairs the steps route: every token of a step, k each, in every MoE layer */
static uint64_t routed_pairs(const zse_config *c)
{
    uint64_t tokens = 0;
    for (int p = 0; p < STEPS; p++)
        for (int s = 0; s < NSEQ; s++)
            tokens += (uint64_t)PLAN[p][s];
    return tokens * (uint64_t)c->n_experts_used * (uint64_t)zse_config_moe_layer_count(c);
}

static void test_moe_offload(const char *path)
{
    zse_file *f = zse_file_open(path);
    CHECK_MSG(f != NULL, "%s", zse_error_message());
    if (!f)
        return;
    const zse_config *c = zse_file_config(f);
    const size_t n = plan_rows() * (size_t)c->vocab_size;
    float *want = zse_malloc(n * sizeof *want), *got = zse_malloc(n * sizeof *got);
    if (want && got && run_plan(f, NULL, want, NULL)) {
        /* a cold cache misses whatever the model's size; a warm one may hold every expert */
        const struct {
            int slots;
            zse_host_experts host;
            bool cold;
        } cases[] = {{c->n_experts, ZSE_HOST_EXPERTS_NEVER, true},
                     {c->n_experts + 1, ZSE_HOST_EXPERTS_NEVER, false},
                     {c->n_experts, ZSE_HOST_EXPERTS_ALWAYS, true},
                     {c->n_experts + 2, ZSE_HOST_EXPERTS_AUTO, false}};
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            zse_placement pl = {.expert_slots = cases[i].slots, .host_experts = cases[i].host, .host_threads = 1,
                                .cold_cache = cases[i].cold};
            zse_llm_offload_stats st;
            memset(got, 0xff, n * sizeof *got);
            if (!run_plan(f, &pl, got, &st))
                continue;
            CHECK_MSG(memcmp(want, got, n * sizeof *got) == 0, "%s: %d slots, host mode %d: logits differ from the "
                      "resident model's", path, cases[i].slots, (int)cases[i].host);
            /* every routed expert of every layer step was a hit, a fetch or a host run: at least
             * one a layer step, at most one a pair */
            const uint64_t routed = st.expert_hits + st.expert_fetches + st.expert_host;
            const uint64_t layer_steps = (uint64_t)STEPS * (uint64_t)zse_config_moe_layer_count(c);
            CHECK_MSG(routed >= layer_steps && routed <= routed_pairs(c), "%s: %llu experts placed for %llu pairs",
                      path, (unsigned long long)routed, (unsigned long long)routed_pairs(c));
            CHECK_EQ_INT(st.steps, STEPS);
            if (cases[i].host == ZSE_HOST_EXPERTS_ALWAYS)
                CHECK_MSG(st.expert_fetches == 0 && st.expert_host > 0, "%s: %llu fetched, %llu on the host", path,
                          (unsigned long long)st.expert_fetches, (unsigned long long)st.expert_host);
            if (cases[i].host == ZSE_HOST_EXPERTS_NEVER)
                CHECK(st.expert_host == 0 && (st.expert_fetches > 0 || !cases[i].cold));
        }
    }
    free(want);
    free(got);
    zse_file_close(f);
}

static void test_stream(const char *path)
{
    zse_file *f = zse_file_open(path);
    CHECK_MSG(f != NULL, "%s", zse_error_message());
    if (!f)
        return;
    const zse_config *c = zse_file_config(f);
    const size_t n = plan_rows() * (size_t)c->vocab_size;
    float *want = zse_malloc(n * sizeof *want), *got = zse_malloc(n * sizeof *got);
    uint8_t *streamed = zse_calloc((size_t)c->n_layers, 1);
    if (want && got && streamed && run_plan(f, NULL, want, NULL)) {
        /* which layers stream (a bit each) and through how many buffers */
        const struct {
            unsigned mask;
            int buffers;
        } cases[] = {{0x1, 2}, {0x2, 1}, {0x5, 2}, {0xF, 2}, {0xE, 1}, {0xF, 3}, {0xB, 8}};
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            int k = 0;
            for (int l = 0; l < c->n_layers; l++)
                k += streamed[l] = (uint8_t)((cases[i].mask >> l) & 1);
            if (k == 0)
                continue;
            zse_placement pl = {.streamed = streamed, .stream_buffers = cases[i].buffers};
            zse_llm_offload_stats st;
            memset(got, 0xff, n * sizeof *got);
            if (!run_plan(f, &pl, got, &st))
                continue;
            CHECK_MSG(memcmp(want, got, n * sizeof *got) == 0, "%s: layers 0x%x streamed through %d buffers: logits "
                      "differ from the resident model's", path, cases[i].mask, cases[i].buffers);
            CHECK_EQ_INT(st.layers_streamed, (uint64_t)k * STEPS);
            CHECK(st.bytes_to_device > 0);
        }
    }
    free(streamed);
    free(want);
    free(got);
    zse_file_close(f);
}

/* ---- the fit ------------------------------------------------------------------------------------ */

#define MB (1024ull * 1024ull)

/* step sizes: a tiny model's expert bytes are smaller than a 512-token step's predicted
 * routing, so the MoE fit takes small steps to make offloading save memory at all */
static zse_fit_in fit_in(uint64_t budget, int max_tokens)
{
    return (zse_fit_in){.budget = budget, .budget_what = "--gpu-memory allows", .kv_want = 4 * MB, .kv_min = 1 * MB,
                        .max_tokens = max_tokens, .max_out = 8, .embed_on_host = false};
}

static void test_fit_dense(const char *path)
{
    zse_file *f = zse_file_open(path);
    CHECK_MSG(f != NULL, "%s", zse_error_message());
    if (!f)
        return;
    const zse_config *c = zse_file_config(f);
    zse_fit fit;
    zse_fit_in in = fit_in(64ull << 30, 512);
    CHECK(zse_llm_fit(f, &in, &fit) == 0 && fit.mode == ZSE_FIT_RESIDENT);
    const uint64_t resident_min = fit.minimum;
    CHECK(fit.kv_bytes == in.kv_want);
    zse_fit_free(&fit);
    in.budget = resident_min;
    CHECK(zse_llm_fit(f, &in, &fit) == 0 && fit.mode == ZSE_FIT_RESIDENT && fit.kv_bytes >= in.kv_min);
    zse_fit_free(&fit);
    /* a little less: some layers stream, the fewest that fit */
    in.budget = resident_min - 1;
    CHECK_MSG(zse_llm_fit(f, &in, &fit) == 0, "%s", zse_error_message());
    CHECK(fit.mode == ZSE_FIT_STREAM && fit.layers_streamed >= 1 && fit.layers_streamed <= c->n_layers);
    CHECK(fit.kv_bytes >= in.kv_min);
    int k = 0;
    for (int l = 0; l < c->n_layers; l++)
        k += fit.streamed[l] != 0;
    CHECK_EQ_INT(k, fit.layers_streamed);
    CHECK(fit.reserve >= 256 * MB); /* what the engine keeps back for what grows later */
    const uint64_t stream_min = fit.minimum;
    CHECK(stream_min < resident_min);
    zse_fit_free(&fit);
    /* exactly the minimum: every layer streams; one byte less is an error that says it */
    in.budget = stream_min;
    CHECK(zse_llm_fit(f, &in, &fit) == 0 && fit.layers_streamed == c->n_layers && fit.stream_buffers == 2);
    zse_fit_free(&fit);
    in.budget = stream_min - 1;
    CHECK(zse_llm_fit(f, &in, &fit) != 0);
    char want[64];
    snprintf(want, sizeof want, "at least %.0f MiB", (double)stream_min / MB);
    CHECK_MSG(tl_has(want) && tl_has("every layer streamed") && tl_has("--gpu-memory allows"), "%s",
              zse_error_message());
    /* the test knob streams at least that many layers of a model that fits */
    in = fit_in(64ull << 30, 512);
    in.force_streamed = 3;
    in.stream_buffers = 1;
    CHECK(zse_llm_fit(f, &in, &fit) == 0 && fit.mode == ZSE_FIT_STREAM && fit.layers_streamed == 3 &&
          fit.stream_buffers == 1);
    zse_placement pl;
    zse_fit_placement(&fit, &pl);
    CHECK(pl.streamed == fit.streamed && pl.stream_buffers == 1 && pl.expert_slots == 0);
    zse_fit_free(&fit);
    CHECK_EQ_INT(strcmp(zse_fit_mode_name(ZSE_FIT_STREAM), "streamed"), 0);
    zse_file_close(f);
}

static void test_fit_moe(const char *path)
{
    zse_file *f = zse_file_open(path);
    CHECK_MSG(f != NULL, "%s", zse_error_message());
    if (!f)
        return;
    const zse_config *c = zse_file_config(f);
    zse_fit fit;
    zse_fit_in in = fit_in(64ull << 30, 8);
    CHECK(zse_llm_fit(f, &in, &fit) == 0 && fit.mode == ZSE_FIT_RESIDENT);
    const uint64_t resident_min = fit.minimum;
    zse_fit_free(&fit);
    in.budget = resident_min - 1;
    CHECK_MSG(zse_llm_fit(f, &in, &fit) == 0, "%s", zse_error_message());
    CHECK(fit.mode == ZSE_FIT_EXPERTS && fit.expert_slots >= c->n_experts && fit.expert_slots < fit.experts_total);
    CHECK_EQ_INT(fit.experts_total, c->n_experts * zse_config_moe_layer_count(c));
    CHECK(fit.host_weights > 0 && fit.kv_bytes >= in.kv_min && fit.reserve >= 256 * MB);
    const uint64_t least = fit.minimum;
    zse_fit_free(&fit);
    in.budget = least;
    CHECK(zse_llm_fit(f, &in, &fit) == 0 && fit.expert_slots == c->n_experts);
    zse_fit_free(&fit);
    in.budget = least - 1;
    CHECK(zse_llm_fit(f, &in, &fit) != 0);
    char want[64];
    snprintf(want, sizeof want, "at least %.0f MiB", (double)least / MB);
    CHECK_MSG(tl_has(want) && tl_has("experts in host memory"), "%s", zse_error_message());
    in = fit_in(64ull << 30, 8);
    in.force_expert_slots = c->n_experts + 1;
    CHECK(zse_llm_fit(f, &in, &fit) == 0 && fit.mode == ZSE_FIT_EXPERTS && fit.expert_slots == c->n_experts + 1);
    zse_fit_free(&fit);
    in.force_expert_slots = c->n_experts - 1;
    CHECK(zse_llm_fit(f, &in, &fit) != 0 && tl_has("cannot hold one layer"));
    zse_file_close(f);
}

/* the activations the fit counts are at least what the model allocates */
static void test_act_bytes(const char *path)
{
    zse_file *f = zse_file_open(path);
    zse_backend *be = zse_backend_create("cpu", 1);
    zse_llm *m = f && be ? zse_llm_load(f, be, 64, 8) : NULL;
    CHECK(m != NULL);
    if (m) {
        zse_backend_memory bm;
        be->ops->memory(be, &bm);
        const uint64_t counted = zse_llm_act_bytes(zse_file_config(f), 64, 8);
        CHECK_MSG(counted >= bm.activations && counted < bm.activations + bm.activations / 4 + 4096,
                  "%s: counted %llu, allocated %llu", path, (unsigned long long)counted,
                  (unsigned long long)bm.activations);
    }
    zse_llm_free(m);
    zse_backend_destroy(be);
    zse_file_close(f);
}

static const char *convert(const char *data, const char *fixture, const char *name, zse_scheme s)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", data, fixture);
    const char *path = tl_path("%s.zse", name);
    zse_convert_opts o = {.scheme = s, .group_size = 32, .embed_scheme = -1, .lm_head_scheme = -1, .force = true,
                          .threads = 2};
    if (zse_convert(dir, path, &o) != 0) {
        CHECK_MSG(false, "cannot convert %s: %s", dir, zse_error_message());
        return NULL;
    }
    return path;
}

int main(void)
{
    const char *data = test_env("ZSE_TEST_DATA");
    if (!data)
        data = "tests/fixtures";
    tl_begin("offload");
    test_planner_lru();
    test_planner_host();
    test_planner_prefetch_gate();
    test_planner_prefetch_host();
    test_copy_queue();
    const struct {
        const char *fixture, *name;
        zse_scheme s;
        bool moe;
    } models[] = {
        {"random/mixtral", "mixtral-f32", ZSE_SCHEME_F32, true},
        {"random/mixtral", "mixtral-int4", ZSE_SCHEME_Q4, true},
        {"random/qwen2-moe", "qwen2-moe-int4", ZSE_SCHEME_Q4, true},
        {"random/qwen3-moe", "qwen3-moe-int8", ZSE_SCHEME_Q8, true},
        {"tiny-llama", "tiny-llama-int4", ZSE_SCHEME_Q4, false},
        {"random/qwen3-headdim", "qwen3-f32", ZSE_SCHEME_F32, false},
    };
    for (size_t i = 0; i < sizeof models / sizeof models[0]; i++) {
        const char *path = convert(data, models[i].fixture, models[i].name, models[i].s);
        if (!path)
            continue;
        if (models[i].moe) {
            test_moe_offload(path);
            if (i == 0)
                test_fit_moe(path);
        } else {
            test_stream(path);
            if (strcmp(models[i].fixture, "tiny-llama") == 0) {
                test_fit_dense(path);
                test_act_bytes(path);
            }
        }
    }
    tl_end();
    return test_main_end();
}
