/* The paged KV cache: the block pool and block tables (allocation, exhaustion, all-or-
 * nothing reservations, double releases refused), and the stored K/V read back through the
 * CPU backend's attention over a scattered block table — f16 within f16 rounding, int8
 * within its per-head scale. */
#include "test.h"

#include "backend/backend.h"
#include "engine/engine.h"

static void pool_and_tables(void)
{
    zse_block_pool pool;
    CHECK(zse_block_pool_init(&pool, 0) == -1);
    CHECK(zse_block_pool_init(&pool, 4) == 0);
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
    zse_batch b = {T, tokens, pos, seq_of, slots, 1, &len, table, 3, 1, &row};
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
