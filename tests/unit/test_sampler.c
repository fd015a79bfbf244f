/* sampler, stop strings, KV block allocator, RoPE scaling frequencies. */
#include "test.h"

#include "engine/engine.h"
#include "model/model.h"

#define V 8

static int32_t draw(const zse_sampling *s, const float *base, zse_rng *rng, const zse_history *h)
{
    float logits[V], p[V];
    int32_t idx[V];
    memcpy(logits, base, sizeof logits);
    return zse_sample(s, logits, V, h, rng, p, idx);
}

int main(void)
{
    const float base[V] = {1.0f, 2.0f, 3.0f, 0.5f, -1.0f, 2.5f, 0.0f, -2.0f};
    zse_history none = {0};
    zse_sampling s;
    zse_sampling_default(&s);
    zse_rng rng;
    zse_rng_seed(&rng, 1);

    s.temperature = 0;
    CHECK_EQ_INT(draw(&s, base, &rng, &none), 2);

    /* temperature 1: frequencies follow softmax within a few percent */
    s.temperature = 1;
    int counts[V] = {0};
    const int N = 40000;
    for (int i = 0; i < N; i++)
        counts[draw(&s, base, &rng, &none)]++;
    double z = 0;
    for (int i = 0; i < V; i++)
        z += exp(base[i]);
    for (int i = 0; i < V; i++)
        CHECK_NEAR((double)counts[i] / N, exp(base[i]) / z, 0.01);

    /* top-k 2 only ever picks the two best; top-p 0.5 only the best here; min-p filters */
    s.top_k = 2;
    for (int i = 0; i < 500; i++) {
        int32_t t = draw(&s, base, &rng, &none);
        CHECK(t == 2 || t == 5);
    }
    s.top_k = 0;
    s.top_p = 0.3f;
    for (int i = 0; i < 200; i++)
        CHECK_EQ_INT(draw(&s, base, &rng, &none), 2);
    s.top_p = 1;
    s.min_p = 0.5f; /* keeps tokens with p >= 0.5 * p(best): ids 2 (e^3) and 5 (e^2.5) */
    for (int i = 0; i < 500; i++) {
        int32_t t = draw(&s, base, &rng, &none);
        CHECK(t == 2 || t == 5);
    }
    s.min_p = 0;

    /* same seed, same sequence */
    zse_rng a, b;
    zse_rng_seed(&a, 42);
    zse_rng_seed(&b, 42);
    for (int i = 0; i < 50; i++)
        CHECK_EQ_INT(draw(&s, base, &a, &none), draw(&s, base, &b, &none));

    /* penalties and logit bias (greedy) */
    s.temperature = 0;
    zse_logit_bias lb = {7, 10.0f};
    s.logit_bias = &lb;
    s.n_logit_bias = 1;
    CHECK_EQ_INT(draw(&s, base, &rng, &none), 7);
    s.n_logit_bias = 0;
    int32_t gen[3] = {2, 2, 5};
    zse_history h = {NULL, 0, gen, 3};
    s.frequency_penalty = 0.4f; /* 2: 3 - 0.8 = 2.2; 5: 2.5 - 0.4 = 2.1 */
    CHECK_EQ_INT(draw(&s, base, &rng, &h), 2);
    s.presence_penalty = 0.2f;  /* 2: 2.0; 5: 1.9; 1: 2.0 ... 2 wins ties by lower id? both 2.0 */
    int32_t t = draw(&s, base, &rng, &h);
    CHECK(t == 1 || t == 2);
    s.frequency_penalty = s.presence_penalty = 0;
    s.repetition_penalty = 2.0f; /* 2: 1.5, 5: 1.25 -> best is 1 (2.0) */
    int32_t prompt[2] = {2, 2};
    zse_history hp = {prompt, 2, gen + 2, 1};
    CHECK_EQ_INT(draw(&s, base, &rng, &hp), 1);

    /* stop strings: hold back what might start one */
    const char *stops[2] = {"</s>", "STOP"};
    CHECK_EQ_INT(zse_stop_holdback("hello </", 8, stops, 2), 2);
    CHECK_EQ_INT(zse_stop_holdback("hello ST", 8, stops, 2), 2);
    CHECK_EQ_INT(zse_stop_holdback("hello", 5, stops, 2), 0);
    CHECK_EQ_INT(zse_stop_holdback("<", 1, stops, 2), 1);

    /* KV blocks: all handed out once, exhaustion reported, released blocks reused */
    zse_block_pool pool;
    CHECK(zse_block_pool_init(&pool, 4) == 0);
    int32_t got[4];
    for (int i = 0; i < 4; i++)
        got[i] = zse_block_alloc(&pool);
    CHECK(got[0] == 0 && got[1] == 1 && got[2] == 2 && got[3] == 3);
    CHECK_EQ_INT(zse_block_alloc(&pool), -1);
    zse_block_release(&pool, 2);
    CHECK_EQ_INT(zse_block_alloc(&pool), 2);
    zse_block_pool_free(&pool);

    /* RoPE: llama3 keeps high frequencies, divides low ones by the factor */
    zse_config c = {0};
    c.head_dim = 64;
    c.rope_theta = 500000;
    c.rope_scaling.type = ZSE_ROPE_LLAMA3;
    c.rope_scaling.factor = 8;
    c.rope_scaling.low_freq_factor = 1;
    c.rope_scaling.high_freq_factor = 4;
    c.rope_scaling.original_max_position = 8192;
    float inv[32], ms;
    zse_rope_frequencies(&c, inv, &ms);
    CHECK_NEAR(inv[0], 1.0, 1e-6);
    CHECK_NEAR(inv[31], 1.0 / pow(500000, 62.0 / 64) / 8, 1e-9);
    CHECK_NEAR(ms, 1.0, 0);
    c.rope_scaling.type = ZSE_ROPE_LINEAR;
    zse_rope_frequencies(&c, inv, &ms);
    CHECK_NEAR(inv[0], 1.0 / 8, 1e-7);
    c.rope_scaling.type = ZSE_ROPE_YARN;
    c.rope_scaling.factor = 4;
    c.rope_scaling.beta_fast = 32;
    c.rope_scaling.beta_slow = 1;
    zse_rope_frequencies(&c, inv, &ms);
    CHECK_NEAR(ms, 0.1 * log(4) + 1, 1e-6);
    CHECK_NEAR(inv[0], 1.0, 1e-6);             /* extrapolated */
    CHECK_NEAR(inv[31], 1.0 / pow(500000, 62.0 / 64) / 4, 1e-9); /* interpolated */
    return test_main_end();
}
