/* The paged KV cache: the block pool and block tables (allocation, exhaustion, all-or-
 * nothing reservations, double releases refused), the prefix cache (publishing, finding by
 * key, parent and tokens, shared references, LRU eviction of idle blocks only, a random
 * workload whose counts always add up), and the stored K/V read back through the
 * CPU backend's attention over a scattered block table — f16 within f16 rounding, int8
 * within its per-head scale. */
#include "test.h"

#include "backend/backend.h"
#include "engine/engine.h"

static void pool_and_tables(void)
{
    zse_block_pool pool;
    CHECK(zse_block_pool_init(&pool, 0, false) == -1);
    CHECK(zse_block_pool_init(&pool, 4, false) == 0);
    int32_t got[4];
    for (int i = 0; i < 4; i++)
        got[i] = zse_block_alloc(&pool);
    CHECK(got[0] == 0 && got[1] == 1 && got[2] == 2 && got[3] == 3);
    CHECK_EQ_INT(zse_block_alloc(&pool), -1);
    CHECK_EQ_INT(zse_block_pool_used(&pool), 4);
    CHECK(zse_block_release(&pool, 2) == 0);
    CHECK(zse_block_release(&pool, 2) == -1); /* already free */
    CHECK(zse_block_release(&pool, 9) == -1); /* not a block */
    CHECK_EQ_INT(zse_block_alloc(&pool), 2);
    for (int i = 0; i < 4; i++)
        CHECK(zse_block_release(&pool, got[i]) == 0);
    CHECK_EQ_INT(zse_block_pool_used(&pool), 0);

    /* tables: 16 tokens a block, all or nothing, truncation gives blocks back */
    zse_kv_table a, b;
    CHECK(zse_kv_table_init(&a, 3) == 0 && zse_kv_table_init(&b, 3) == 0);
    CHECK(zse_kv_table_reserve(&a, &pool, 17) == 0 && a.n_blocks == 2);
    CHECK_EQ_INT(zse_kv_table_blocks_needed(&a, 32), 0);
    CHECK_EQ_INT(zse_kv_table_blocks_needed(&a, 33), 1);
    CHECK(zse_kv_table_reserve(&a, &pool, 49) == -1); /* past its 3 blocks */
    CHECK(zse_kv_table_reserve(&b, &pool, 48) == -1); /* 3 needed, 2 free: nothing taken */
    CHECK(strstr(zse_error_message(), "KV cache is full") != NULL);
    CHECK_EQ_INT(b.n_blocks, 0);
    CHECK_EQ_INT(zse_block_pool_used(&pool), 2);
    CHECK(zse_kv_table_reserve(&b, &pool, 20) == 0);
    CHECK_EQ_INT(zse_kv_slot(&b, 17), b.blocks[1] * 16 + 1);
    zse_kv_table_truncate(&a, &pool, 16);
    CHECK_EQ_INT(a.n_blocks, 1);
    CHECK_EQ_INT(zse_block_pool_used(&pool), 3);
    zse_kv_table_free(&a, &pool);
    zse_kv_table_free(&b, &pool);
    CHECK_EQ_INT(zse_block_pool_used(&pool), 0);
    zse_block_pool_free(&pool);
}

/* the prefix cache's own rules */
static void prefix_cache_rules(void)
{
    zse_block_pool pool;
    CHECK(zse_block_pool_init(&pool, 3, true) == 0);
    int32_t tok_a[16], tok_b[16];
    for (int i = 0; i < 16; i++) {
        tok_a[i] = i;
        tok_b[i] = 100 + i;
    }
    uint64_t ka = zse_block_key(0, tok_a, 0), kb = zse_block_key(ka, tok_b, 0);
    CHECK(ka != 0 && kb != 0 && ka != kb);
    CHECK(zse_block_key(0, tok_a, 7) != ka); /* another salt (adapter): another key */
    CHECK(zse_block_key(kb, tok_a, 0) != ka); /* the same tokens after another prefix */
    int32_t a = zse_block_alloc(&pool), b = zse_block_alloc(&pool);
    zse_block_publish(&pool, a, ka, 0, tok_a);
    zse_block_publish(&pool, b, kb, ka, tok_b);
    CHECK_EQ_INT(pool.n_published, 2);
    CHECK_EQ_INT(zse_block_find(&pool, ka, 0, tok_a), a);
    CHECK_EQ_INT(zse_block_find(&pool, kb, ka, tok_b), b);
    CHECK_EQ_INT(zse_block_find(&pool, kb, 0, tok_b), -1);   /* another parent */
    CHECK_EQ_INT(zse_block_find(&pool, ka, 0, tok_b), -1);   /* another content under the key */
    /* a second sequence shares a: releasing one reference leaves it held */
    zse_block_acquire(&pool, a);
    CHECK(zse_block_release(&pool, a) == 0);
    CHECK_EQ_INT(zse_block_pool_used(&pool), 2);
    /* idle published blocks stay cached and still count as available */
    CHECK(zse_block_release(&pool, b) == 0 && zse_block_release(&pool, a) == 0);
    CHECK(zse_block_release(&pool, a) == -1); /* nobody holds it */
    CHECK_EQ_INT(zse_block_pool_used(&pool), 0);
    CHECK_EQ_INT(zse_block_pool_available(&pool), 3);
    CHECK_EQ_INT(pool.n_idle, 2);
    /* a hit takes an idle block back out of the LRU list */
    zse_block_acquire(&pool, a);
    CHECK_EQ_INT(pool.n_idle, 1);
    /* allocation uses the free block first, then evicts the oldest idle one (b) */
    int32_t c = zse_block_alloc(&pool), d = zse_block_alloc(&pool);
    CHECK(c != a && c != b && d == b);
    CHECK_EQ_INT(zse_block_find(&pool, kb, ka, tok_b), -1);
    CHECK_EQ_INT(zse_block_find(&pool, ka, 0, tok_a), a);
    CHECK_EQ_INT(zse_block_alloc(&pool), -1); /* a is held: never evicted */
    CHECK_EQ_INT((int)pool.evictions, 1);
    /* publishing a key that is already published leaves the second block private */
    zse_block_publish(&pool, c, ka, 0, tok_a);
    CHECK_EQ_INT(zse_block_find(&pool, ka, 0, tok_a), a);
    CHECK(zse_block_release(&pool, c) == 0);
    CHECK_EQ_INT(pool.n_free, 1); /* c was never published: straight to the free list */
    zse_block_pool_free(&pool);

    /* random traffic: shared chains, releases, evictions; the counts always add up and a
     * found block always holds what was published for it */
    enum { SEQS = 24, CHAIN = 6, POOL = 20 };
    CHECK(zse_block_pool_init(&pool, POOL, true) == 0);
    int32_t held[SEQS][CHAIN];
    int n_held[SEQS] = {0};
    unsigned st = 99;
    for (int round = 0; round < 20000; round++) {
        int s = (int)((st = st * 1664525u + 1013904223u) >> 16) % SEQS;
        if (n_held[s] > 0 && (st >> 8) % 3 == 0) { /* the sequence ends */
            for (int i = n_held[s] - 1; i >= 0; i--)
                CHECK(zse_block_release(&pool, held[s][i]) == 0);
            n_held[s] = 0;
            continue;
        }
        if (n_held[s] == CHAIN)
            continue;
        /* the next block of a chain picked among 8 prompts: found, or computed and published */
        int32_t tok[16];
        int prompt = (int)((st >> 4) % 8);
        uint64_t parent = 0;
        const int next = n_held[s];
        for (int i = 0; i <= next; i++) {
            for (int j = 0; j < 16; j++)
                tok[j] = prompt * 1000 + i * 16 + j;
            uint64_t k = zse_block_key(parent, tok, 0);
            if (i == next) {
                int32_t blk = zse_block_find(&pool, k, parent, tok);
                if (blk >= 0) {
                    CHECK(memcmp(pool.tokens + blk * 16, tok, sizeof tok) == 0);
                    zse_block_acquire(&pool, blk);
                } else if ((blk = zse_block_alloc(&pool)) >= 0) {
                    zse_block_publish(&pool, blk, k, parent, tok);
                }
                if (blk >= 0)
                    held[s][n_held[s]++] = blk;
            }
            parent = k;
        }
        int refs = 0;
        for (int b2 = 0; b2 < POOL; b2++)
            refs += pool.ref[b2] > 0;
        CHECK(refs == zse_block_pool_used(&pool) && pool.n_free + pool.n_idle + refs == POOL);
        CHECK(pool.n_published <= POOL && pool.n_idle <= pool.n_published);
    }
    for (int s = 0; s < SEQS; s++)
        for (int i = n_held[s] - 1; i >= 0; i--)
            CHECK(zse_block_release(&pool, held[s][i]) == 0);
    CHECK_EQ_INT(zse_block_pool_used(&pool), 0);
    CHECK_EQ_INT(zse_block_pool_available(&pool), POOL);
    CHECK(pool.evictions > 0 && pool.n_published > 0);
    zse_block_pool_free(&pool);
}

/* a deterministic pseudo-random value in [-1, 1) */
static float noise(unsigned *state)
{
    *state = *state * 1664525u + 1013904223u;
    return (float)((*state >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

enum { T = 40, H = 4, KVH = 2, D = 32, BLOCKS = 6 };

/* causal GQA attention of one sequence in double, the reference */
static void reference(const float *q, const float *k, const float *v, float scale, double *out)
{
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            int g = h / (H / KVH);
            double s[T], mx = -1e300, z = 0;
            for (int j = 0; j <= t; j++) {
                double d = 0;
                for (int i = 0; i < D; i++)
                    d += (double)q[(t * H + h) * D + i] * k[(j * KVH + g) * D + i];
                s[j] = d * scale;
                mx = s[j] > mx ? s[j] : mx;
            }
            for (int j = 0; j <= t; j++)
                z += exp(s[j] - mx);
            for (int i = 0; i < D; i++) {
                double acc = 0;
                for (int j = 0; j <= t; j++)
                    acc += exp(s[j] - mx) / z * v[(j * KVH + g) * D + i];
                out[(t * H + h) * D + i] = acc;
            }
        }
}

static double attention_error(zse_kv_store store, double *v_roundtrip)
{
    static float q[T * H * D], k[T * KVH * D], v[T * KVH * D], got[T * H * D];
    static double want[T * H * D];
    unsigned st = 12345;
    for (int i = 0; i < T * H * D; i++)
        q[i] = noise(&st);
    for (int i = 0; i < T * KVH * D; i++) {
        k[i] = 2 * noise(&st);
        v[i] = 3 * noise(&st);
    }
    float scale = 1.0f / sqrtf((float)D);
    reference(q, k, v, scale, want);

    zse_backend *be = zse_cpu_backend_create(2);
    CHECK(be != NULL);
    if (!be)
        return 1e9;
    const zse_backend_ops *o = be->ops;
    zse_kv_shape shape = {1, BLOCKS, 16, KVH, D, store};
    zse_kv *kv = o->kv_new(be, &shape);
    /* the sequence's three blocks are scattered over the pool */
    int32_t table[3] = {4, 1, 3};
    int32_t tokens[T], pos[T], seq_of[T], slots[T], len = T, row = T - 1;
    for (int t = 0; t < T; t++) {
        tokens[t] = 0;
        pos[t] = t;
        seq_of[t] = 0;
        slots[t] = table[t / 16] * 16 + t % 16;
    }
    zse_batch b = {T, tokens, pos, seq_of, slots, 1, &len, table, 3, 1, &row, NULL, 0};
    zse_act *aq = o->act_new(be, T, H * D), *ak = o->act_new(be, T, KVH * D), *av = o->act_new(be, T, KVH * D),
            *out = o->act_new(be, T, H * D);
    CHECK(kv && aq && ak && av && out);
    CHECK(o->begin_batch(be, &b) == 0);
    o->act_write(be, aq, q, T);
    o->act_write(be, ak, k, T);
    o->act_write(be, av, v, T);
    o->kv_store(be, kv, 0, ak, av);
    zse_attn_params p = {H, KVH, D, scale, 0};
    o->attention(be, kv, 0, aq, &p, out);
    CHECK(o->sync(be) == 0);
    o->act_read(be, out, got, T);
    double worst = 0;
    for (int i = 0; i < T * H * D; i++)
        worst = fmax(worst, fabs(got[i] - want[i]));
    /* position 0 sees only itself: its output is V[0] as stored */
    *v_roundtrip = 0;
    for (int h = 0; h < H; h++)
        for (int i = 0; i < D; i++)
            *v_roundtrip = fmax(*v_roundtrip, fabs(got[h * D + i] - v[(h / (H / KVH)) * D + i]));
    o->act_free(be, aq);
    o->act_free(be, ak);
    o->act_free(be, av);
    o->act_free(be, out);
    o->kv_free(be, kv);
    zse_backend_destroy(be);
    return worst;
}

int main(void)
{
    pool_and_tables();
    prefix_cache_rules();
    double v16, v8;
    double e16 = attention_error(ZSE_KV_STORE_F16, &v16);
    double e8 = attention_error(ZSE_KV_STORE_INT8, &v8);
    /* |v| < 3: f16 keeps 11 bits (error < 3 * 2^-11); int8 one scale per (token, head):
     * error <= max|v| / 127 / 2 */
    CHECK_MSG(v16 < 3.0 / 2048, "f16 V round trip error %g", v16);
    CHECK_MSG(v8 < 3.0 / 254 + 1e-6, "int8 V round trip error %g", v8);
    CHECK_MSG(v8 > v16, "int8 (%g) should be coarser than f16 (%g)", v8, v16);
    CHECK_MSG(e16 < 2e-3, "f16 attention error %g", e16);
    CHECK_MSG(e8 < 2e-2, "int8 attention error %g", e8);
    printf("attention max error: f16 %.2e, int8 %.2e; V round trip: f16 %.2e, int8 %.2e\n", e16, e8, v16, v8);
    return test_main_end();
}
