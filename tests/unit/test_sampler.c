/* The sampler: greedy, temperature, top-k / top-p / min-p as distributions with a fixed
 * seed, penalties to the exact value, logit bias, seeds, logprobs; stop strings that
 * arrive split across tokens (through the real tokenizer of a fixture); RoPE scaling. */
#include "test.h"

#include "engine/engine.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

#define V 8

static float scratch_p[4096];
static int32_t scratch_i[4096]; /* zero, as zse_sample requires and leaves it */

static int32_t draw(const zse_sampling *s, const float *base, int n, zse_rng *rng, const zse_history *h)
{
    float logits[4096];
    memcpy(logits, base, (size_t)n * sizeof *logits);
    return zse_sample(s, logits, n, h, rng, scratch_p, scratch_i);
}

static bool scratch_zero(void)
{
    for (int i = 0; i < 4096; i++)
        if (scratch_i[i])
            return false;
    return true;
}

/* draws N tokens and compares their frequencies with the expected distribution */
static void check_distribution(const char *what, const zse_sampling *s, const float *base, const double *want)
{
    zse_rng rng;
    zse_rng_seed(&rng, 7);
    zse_history none = {0};
    int counts[V] = {0};
    const int N = 20000;
    for (int i = 0; i < N; i++)
        counts[draw(s, base, V, &rng, &none)]++;
    for (int i = 0; i < V; i++)
        CHECK_MSG(fabs((double)counts[i] / N - want[i]) < 0.012, "%s: id %d drawn %.4f, want %.4f", what, i,
                  (double)counts[i] / N, want[i]);
    CHECK(scratch_zero());
}

/* softmax(base / t) restricted to `keep` (1 = kept), renormalized */
static void expected(const float *base, float t, const int *keep, double *out)
{
    double z = 0;
    for (int i = 0; i < V; i++)
        z += keep[i] ? exp(base[i] / t) : 0;
    for (int i = 0; i < V; i++)
        out[i] = keep[i] ? exp(base[i] / t) / z : 0;
}

static void distributions(void)
{
    /* probabilities at t=1: id2 .441, id5 .268, id1 .162, id0 .060, id3 .036 ... */
    const float base[V] = {1.0f, 2.0f, 3.0f, 0.5f, -1.0f, 2.5f, 0.0f, -2.0f};
    zse_sampling s;
    zse_sampling_default(&s);
    double want[V];
    int all[V] = {1, 1, 1, 1, 1, 1, 1, 1};

    expected(base, 1, all, want);
    check_distribution("t=1", &s, base, want);
    s.temperature = 0.5f;
    expected(base, 0.5f, all, want);
    check_distribution("t=0.5", &s, base, want);
    s.temperature = 1;

    s.top_k = 3; /* ids 2, 5, 1 renormalized */
    int k3[V] = {0, 1, 1, 0, 0, 1, 0, 0};
    expected(base, 1, k3, want);
    check_distribution("top-k 3", &s, base, want);
    s.top_k = 0;

    /* top-p 0.75: p(2) + p(5) = .709 < .75, + p(1) crosses: keep 2, 5, 1 */
    s.top_p = 0.75f;
    expected(base, 1, k3, want);
    check_distribution("top-p 0.75", &s, base, want);
    s.top_p = 0.7f; /* .709 reaches it: 2 and 5 */
    int k2[V] = {0, 0, 1, 0, 0, 1, 0, 0};
    expected(base, 1, k2, want);
    check_distribution("top-p 0.7", &s, base, want);
    /* top-k 2 then top-p 0.6 of the renormalized pair: .62/.38 -> only id 2 survives */
    s.top_k = 2;
    s.top_p = 0.6f;
    int only2[V] = {0, 0, 1, 0, 0, 0, 0, 0};
    expected(base, 1, only2, want);
    check_distribution("top-k 2 + top-p 0.6", &s, base, want);
    s.top_k = 0;
    s.top_p = 1;

    /* min-p 0.3: keep p >= 0.3 p(best): e^(x-3) >= .3 -> x >= 1.796: ids 1, 2, 5 */
    s.min_p = 0.3f;
    expected(base, 1, k3, want);
    check_distribution("min-p 0.3", &s, base, want);
    s.min_p = 0;

    /* greedy, and top-k 1 is greedy at any temperature */
    s.temperature = 0;
    zse_rng rng;
    zse_rng_seed(&rng, 1);
    zse_history none = {0};
    CHECK_EQ_INT(draw(&s, base, V, &rng, &none), 2);
    s.temperature = 5;
    s.top_k = 1;
    CHECK_EQ_INT(draw(&s, base, V, &rng, &none), 2);
    s.top_k = 0;

    /* same seed, same draws; another seed, other draws */
    s.temperature = 1;
    zse_rng a, b, c;
    zse_rng_seed(&a, 42);
    zse_rng_seed(&b, 42);
    zse_rng_seed(&c, 43);
    int same = 0, diff = 0;
    for (int i = 0; i < 200; i++) {
        int32_t x = draw(&s, base, V, &a, &none), y = draw(&s, base, V, &b, &none), z = draw(&s, base, V, &c, &none);
        same += x == y;
        diff += x != z;
    }
    CHECK_EQ_INT(same, 200);
    CHECK(diff > 20);
}

/* Speculative verification of a draft proposed with certainty: over many trials the token
 * it yields (the draft when accepted, else a draw from p without it) is distributed as the
 * plain sampler's p, for a likely draft, an unlikely one and one outside top-k; the draft is
 * accepted with probability p(draft); greedy accepts exactly the argmax. */
static void verify_distribution(const char *what, const zse_sampling *s, const float *base, int32_t x,
                                const double *want)
{
    zse_rng rng;
    zse_rng_seed(&rng, 11);
    zse_history none = {0};
    int counts[V] = {0}, accepted = 0;
    const int N = 40000;
    for (int i = 0; i < N; i++) {
        float logits[V];
        memcpy(logits, base, sizeof logits);
        zse_dist d;
        zse_sample_dist(s, logits, V, &none, scratch_p, scratch_i, &d);
        bool ok;
        int32_t t = zse_dist_verify(&d, scratch_p, scratch_i, x, &rng, &ok);
        zse_dist_release(&d, scratch_i);
        CHECK(!ok || t == x);
        counts[t]++;
        accepted += ok;
    }
    for (int i = 0; i < V; i++)
        CHECK_MSG(fabs((double)counts[i] / N - want[i]) < 0.01, "%s: id %d came %.4f, want %.4f", what, i,
                  (double)counts[i] / N, want[i]);
    CHECK_MSG(fabs((double)accepted / N - want[x]) < 0.01, "%s: draft %d accepted %.4f, p %.4f", what, x,
              (double)accepted / N, want[x]);
    CHECK(scratch_zero());
}

static void speculative_verification(void)
{
    const float base[V] = {1.0f, 2.0f, 3.0f, 0.5f, -1.0f, 2.5f, 0.0f, -2.0f};
    zse_sampling s;
    zse_sampling_default(&s);
    double want[V];
    int all[V] = {1, 1, 1, 1, 1, 1, 1, 1};
    expected(base, 1, all, want);
    verify_distribution("likely draft", &s, base, 2, want);
    verify_distribution("unlikely draft", &s, base, 7, want);
    s.top_k = 3; /* ids 2, 5, 1: a draft of 0 is never accepted */
    int k3[V] = {0, 1, 1, 0, 0, 1, 0, 0};
    expected(base, 1, k3, want);
    verify_distribution("draft outside top-k", &s, base, 0, want);
    verify_distribution("draft inside top-k", &s, base, 5, want);
    s.top_k = 0;
    /* greedy: the argmax, accepted only when it is the draft */
    s.temperature = 0;
    zse_rng rng;
    zse_rng_seed(&rng, 3);
    zse_history none = {0};
    for (int32_t x = 0; x < V; x++) {
        float logits[V];
        memcpy(logits, base, sizeof logits);
        zse_dist d;
        zse_sample_dist(&s, logits, V, &none, scratch_p, scratch_i, &d);
        bool ok;
        int32_t t = zse_dist_verify(&d, scratch_p, scratch_i, x, &rng, &ok);
        zse_dist_release(&d, scratch_i);
        CHECK(t == 2 && ok == (x == 2));
    }
}

/* a large vocabulary with a long tail: top-p sorts only the head, yet the nucleus is exact */
static void large_vocab(void)
{
    enum { N = 4096 };
    static float base[N];
    for (int i = 0; i < N; i++)
        base[i] = -0.002f * (float)i; /* slowly decaying: the nucleus is most of the vocabulary */
    zse_sampling s;
    zse_sampling_default(&s);
    s.top_p = 0.95f;
    double total = 0, cum = 0;
    for (int i = 0; i < N; i++)
        total += exp(base[i]);
    int cut = 0;
    while (cum < 0.95 * total)
        cum += exp(base[cut++]);
    zse_rng rng;
    zse_rng_seed(&rng, 3);
    zse_history none = {0};
    int32_t worst = 0;
    for (int i = 0; i < 3000; i++) {
        int32_t t = draw(&s, base, N, &rng, &none);
        worst = t > worst ? t : worst;
    }
    CHECK_MSG(worst < cut && worst > cut - 300, "largest id drawn %d, nucleus ends at %d", worst, cut);
    CHECK(scratch_zero());
}

/* A 150k vocabulary of 500 distinct logits (ties everywhere) at top-p 0.9: the nucleus is
 * most of it and is sorted by a radix sort, which must give the order the comparator
 * defines (probability down, id up), so the same draws: checked against that order built
 * with qsort here, over 40 seeds */
static const float *ref_p;
static int ref_order(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (ref_p[x] != ref_p[y])
        return ref_p[x] > ref_p[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

static void sorted_nucleus(void)
{
    enum { N = 150000 };
    static float base[N], p[N], work_p[N];
    static int32_t idx[N], work_i[N];
    for (int i = 0; i < N; i++)
        base[i] = -0.001f * (float)((i * 7919) % 500);
    zse_sampling s;
    zse_sampling_default(&s);
    s.top_p = 0.9f;
    /* the reference: the sampler's arithmetic, the order from qsort */
    float mx = base[0];
    for (int i = 1; i < N; i++)
        mx = base[i] > mx ? base[i] : mx;
    double total = 0;
    for (int i = 0; i < N; i++) {
        p[i] = expf((base[i] - mx) / s.temperature);
        total += p[i];
        idx[i] = i;
    }
    ref_p = p;
    qsort(idx, N, sizeof *idx, ref_order);
    double cum = 0;
    int n = 0;
    while (n < N) {
        cum += p[idx[n++]];
        if (cum >= (double)s.top_p * total)
            break;
    }
    double kept = 0;
    for (int k = 0; k < n; k++)
        kept += p[idx[k]];
    int same = 0;
    for (int seed = 1; seed <= 40; seed++) {
        zse_rng a, b;
        zse_rng_seed(&a, (uint64_t)seed);
        zse_rng_seed(&b, (uint64_t)seed);
        double r = zse_rng_uniform(&b) * kept, acc = 0;
        int32_t want = idx[n - 1];
        for (int k = 0; k < n; k++) {
            acc += p[idx[k]];
            if (r < acc) {
                want = idx[k];
                break;
            }
        }
        static float logits[N];
        memcpy(logits, base, sizeof logits);
        zse_history none = {0};
        same += zse_sample(&s, logits, N, &none, &a, work_p, work_i) == want;
    }
    CHECK_EQ_INT(same, 40);
    int nonzero = 0;
    for (int i = 0; i < N; i++)
        nonzero += work_i[i] != 0;
    CHECK_EQ_INT(nonzero, 0); /* the scratch handed back zeroed */
}

static void penalties(void)
{
    const float base[V] = {1.0f, 2.0f, 3.0f, 0.5f, -1.0f, 2.5f, 0.0f, -2.0f};
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0;
    zse_rng rng;
    zse_rng_seed(&rng, 1);
    float l[V];

    zse_logit_bias lb[2] = {{7, 10.0f}, {99, 5.0f}}; /* an id past the vocabulary is ignored */
    s.logit_bias = lb;
    s.n_logit_bias = 2;
    zse_history none = {0};
    CHECK_EQ_INT(draw(&s, base, V, &rng, &none), 7);
    s.n_logit_bias = 0;

    /* OpenAI: logit - count * frequency - presence, over generated tokens */
    int32_t gen[4] = {2, 2, 5, 2};
    zse_history h = {NULL, 0, gen, 4};
    s.frequency_penalty = 0.25f;
    s.presence_penalty = 0.5f;
    memcpy(l, base, sizeof l);
    zse_sample(&s, l, V, &h, &rng, scratch_p, scratch_i);
    CHECK_NEAR(l[2], 3.0 - 3 * 0.25 - 0.5, 1e-6);
    CHECK_NEAR(l[5], 2.5 - 0.25 - 0.5, 1e-6);
    CHECK_NEAR(l[1], 2.0, 0);
    CHECK(scratch_zero());
    s.frequency_penalty = s.presence_penalty = 0;

    /* Hugging Face repetition penalty: once per distinct token of prompt and output,
     * positive logits divided, negative multiplied */
    int32_t prompt[3] = {4, 2, 4};
    zse_history hp = {prompt, 3, gen, 4};
    s.repetition_penalty = 2.0f;
    memcpy(l, base, sizeof l);
    int32_t t = zse_sample(&s, l, V, &hp, &rng, scratch_p, scratch_i);
    CHECK_NEAR(l[2], 1.5, 1e-6);
    CHECK_NEAR(l[5], 1.25, 1e-6);
    CHECK_NEAR(l[4], -2.0, 1e-6);
    CHECK_NEAR(l[0], 1.0, 0);
    CHECK_EQ_INT(t, 1); /* 2.0 is now the best */
    CHECK(scratch_zero());
}

static void logprobs(void)
{
    const float base[V] = {1.0f, 2.0f, 3.0f, 0.5f, -1.0f, 2.5f, 0.0f, -2.0f};
    double z = 0;
    for (int i = 0; i < V; i++)
        z += exp(base[i]);
    zse_logprobs lp;
    zse_compute_logprobs(base, V, 5, 3, &lp);
    CHECK_NEAR(lp.logprob, 2.5 - log(z), 1e-5);
    CHECK_EQ_INT(lp.n_top, 3);
    CHECK(lp.top_ids[0] == 2 && lp.top_ids[1] == 5 && lp.top_ids[2] == 1);
    CHECK_NEAR(lp.top_logprobs[0], 3.0 - log(z), 1e-5);
    zse_compute_logprobs(base, V, 0, 50, &lp); /* more than the vocabulary: all of it, sorted */
    CHECK_EQ_INT(lp.n_top, V);
    CHECK(lp.top_ids[V - 1] == 7);
    const float ties[4] = {1, 1, 1, 1};
    zse_compute_logprobs(ties, 4, 3, 2, &lp);
    CHECK(lp.top_ids[0] == 0 && lp.top_ids[1] == 1);
    CHECK_NEAR(lp.logprob, -log(4.0), 1e-6);
}

static void stop_strings(void)
{
    const char *stops[2] = {"</s>", "STOP"};
    CHECK_EQ_INT(zse_stop_holdback("hello </", 8, stops, 2), 2);
    CHECK_EQ_INT(zse_stop_holdback("hello ST", 8, stops, 2), 2);
    CHECK_EQ_INT(zse_stop_holdback("hello", 5, stops, 2), 0);
    CHECK_EQ_INT(zse_stop_holdback("<", 1, stops, 2), 1);
    const char *text = "a STOP b </s>";
    CHECK(zse_stop_find(text, strlen(text), stops, 2) == text + 2);    /* the earliest wins */
    CHECK(zse_stop_find("</s>STOP", 8, stops, 2) != NULL);
    CHECK(zse_stop_find("no", 2, stops, 2) == NULL);
    const char *empty[1] = {""};
    CHECK(zse_stop_find("abc", 3, empty, 1) == NULL);
}

/* feeds the ids of `text` one by one; returns the released text and the finish */
static zse_finish stream(const zse_tokenizer *tok, const zse_sampling *s, const char *text, zse_buf *out, int *n_ids)
{
    zse_gen g;
    CHECK(zse_gen_init(&g, s, tok) == 0);
    int32_t *ids;
    size_t n;
    CHECK(zse_tokenizer_encode(tok, text, strlen(text), false, false, &ids, &n) == 0);
    zse_finish fin = ZSE_FINISH_NONE;
    size_t i = 0;
    for (; i < n && fin == ZSE_FINISH_NONE; i++)
        CHECK(zse_gen_accept(&g, ids[i], false, false, out, &fin) == 0);
    *n_ids = (int)i;
    free(ids);
    zse_gen_free(&g);
    return fin;
}

static void stops_across_tokens(const char *data)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s/tiny-qwen2", data);
    zse_tokenizer *tok = zse_tokenizer_from_dir(dir);
    CHECK_MSG(tok != NULL, "%s", zse_error_message());
    if (!tok)
        return;
    const char *text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n-1)\n";
    /* each stop string spans several tokens of this text (the check below shows it) */
    const char *stop_a[1] = {"return n if"};
    const char *stop_b[2] = {"zzz", "else fib"};
    zse_sampling s;
    zse_sampling_default(&s);
    s.stop = stop_a;
    s.n_stop = 1;
    zse_buf out = {0};
    int used;
    CHECK_EQ_INT(stream(tok, &s, text, &out, &used), ZSE_FINISH_STOP);
    CHECK_EQ_STR(zse_buf_str(&out), "def fibonacci(n):\n    ");
    int32_t *ids;
    size_t n;
    CHECK(zse_tokenizer_encode(tok, "return n if", 11, false, false, &ids, &n) == 0 && n >= 3);
    free(ids);
    zse_buf_free(&out);

    s.stop = stop_b;
    s.n_stop = 2;
    CHECK_EQ_INT(stream(tok, &s, text, &out, &used), ZSE_FINISH_STOP);
    CHECK_EQ_STR(zse_buf_str(&out), "def fibonacci(n):\n    return n if n < 2 ");
    zse_buf_free(&out);

    /* a stop string that never completes holds nothing back at the end */
    const char *stop_c[1] = {"(n-1)\nX"};
    s.stop = stop_c;
    s.n_stop = 1;
    s.max_tokens = 1000;
    CHECK_EQ_INT(stream(tok, &s, text, &out, &used), ZSE_FINISH_NONE);
    CHECK_EQ_STR(zse_buf_str(&out), "def fibonacci(n):\n    return n if n < 2 else fibonacci");
    zse_buf_free(&out);
    /* ... and max_tokens releases it: the last token ends with LENGTH and all the text */
    zse_gen g;
    CHECK(zse_gen_init(&g, &s, tok) == 0);
    CHECK(zse_tokenizer_encode(tok, text, strlen(text), false, false, &ids, &n) == 0);
    g.s.max_tokens = (int)n;
    zse_finish fin = ZSE_FINISH_NONE;
    for (size_t i = 0; i < n; i++)
        CHECK(zse_gen_accept(&g, ids[i], false, false, &out, &fin) == 0);
    CHECK_EQ_INT(fin, ZSE_FINISH_LENGTH);
    CHECK_EQ_STR(zse_buf_str(&out), text);
    zse_buf_free(&out);
    /* an EOS ends with STOP and releases held text too; stop ids end like EOS */
    CHECK(zse_gen_restart(&g, tok) == 0);
    CHECK(zse_gen_accept(&g, ids[0], false, false, &out, &fin) == 0 && fin == ZSE_FINISH_NONE);
    CHECK(zse_gen_accept(&g, 2, true, false, &out, &fin) == 0 && fin == ZSE_FINISH_STOP);
    CHECK_EQ_INT(g.generated, 1);
    zse_buf_free(&out);
    zse_gen_free(&g);
    free(ids);
    int32_t stop_id = 5;
    zse_sampling si;
    zse_sampling_default(&si);
    si.stop_ids = &stop_id;
    si.n_stop_ids = 1;
    CHECK(zse_gen_init(&g, &si, tok) == 0);
    CHECK(zse_gen_accept(&g, 5, false, false, &out, &fin) == 0 && fin == ZSE_FINISH_STOP);
    zse_gen_free(&g);
    zse_buf_free(&out);
    zse_tokenizer_free(tok);
}

static void rope_scaling(void)
{
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
    CHECK_NEAR(inv[0], 1.0, 1e-6);                               /* extrapolated */
    CHECK_NEAR(inv[31], 1.0 / pow(500000, 62.0 / 64) / 4, 1e-9); /* interpolated */
    c.rope_scaling.type = ZSE_ROPE_DYNAMIC; /* within the context: plain RoPE */
    zse_rope_frequencies(&c, inv, &ms);
    CHECK_NEAR(inv[31], 1.0 / pow(500000, 62.0 / 64), 1e-9);
}

int main(void)
{
    speculative_verification();
    distributions();
    large_vocab();
    sorted_nucleus();
    penalties();
    logprobs();
    stop_strings();
    const char *data = test_env("ZSE_TEST_DATA");
    stops_across_tokens(data ? data : "tests/fixtures");
    rope_scaling();
    return test_main_end();
}
