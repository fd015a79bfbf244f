/* Prompt scoring and generation bounds through the engine (tests/fixtures/tiny-qwen2, f32, CPU):
 * - prompt_logprobs: every prompt token's logprob, rank and alternatives equal what the
 *   logits of zse_seq_feed_logits give, for prompts longer than a step's scoring rows, beside
 *   ordinary requests, with the prefix cache warm for the same prompt (a scored prompt is
 *   computed whole); the first entry is empty;
 * - max_tokens ZSE_MAX_TOKENS_NONE: the prompt is scored and nothing generated;
 * - min_tokens: a stop id the model would pick first is not drawn before min_tokens, and a
 *   stop string does not end generation before it either. */
#include "fixture.h"
#include "test.h"

#include "engine/engine.h"
#include "format/format.h"
#include "zse.h"

#include <pthread.h>
#include <unistd.h>

#define MAX_OUT 16
#define MAX_PROMPT 400

typedef struct {
    int32_t ids[MAX_OUT];
    int n;
    zse_finish finish;
    int n_final;
    int first_token;        /* the token of the first event (-1 for none) */
    zse_logprobs plp[MAX_PROMPT];
    bool got_plp;
    char text[1024];
} result;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int finals;

static bool on_token(void *user, const zse_token_event *ev)
{
    result *r = user;
    pthread_mutex_lock(&mu);
    if (ev->prompt_logprobs && !r->got_plp && ev->prompt_tokens <= MAX_PROMPT) {
        memcpy(r->plp, ev->prompt_logprobs, (size_t)ev->prompt_tokens * sizeof *r->plp);
        r->got_plp = true;
        r->first_token = ev->token;
    }
    if (ev->token >= 0 && r->n < MAX_OUT)
        r->ids[r->n++] = ev->token;
    strncat(r->text, ev->text, sizeof r->text - strlen(r->text) - 1);
    if (ev->finish != ZSE_FINISH_NONE) {
        r->finish = ev->finish;
        r->n_final++;
        finals++;
        pthread_cond_broadcast(&cv);
    }
    pthread_mutex_unlock(&mu);
    return true;
}

static bool wait_finals(int n)
{
    return test_wait_count(&mu, &cv, &finals, n, false);
}

static void reset(result *r, int n)
{
    memset(r, 0, (size_t)n * sizeof *r);
    pthread_mutex_lock(&mu);
    finals = 0;
    pthread_mutex_unlock(&mu);
}

/* the reference: every position's logits from zse_seq, turned into logprobs the same way */
static void reference(zse_model *m, const int32_t *ids, size_t n, int top, zse_logprobs *want)
{
    size_t vocab = (size_t)m->vocab;
    float *all = zse_malloc(n * vocab * sizeof *all);
    zse_seq *q = zse_seq_new(m, NULL);
    CHECK(all && q && zse_seq_feed_logits(q, ids, n, all) == 0);
    memset(want, 0, n * sizeof *want);
    for (size_t i = 1; all && i < n; i++)
        zse_compute_logprobs(all + (i - 1) * vocab, m->vocab, ids[i], top, &want[i]);
    zse_seq_free(q);
    free(all);
}

static bool same_logprobs(const zse_logprobs *a, const zse_logprobs *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bool eq = a[i].logprob == b[i].logprob && a[i].rank == b[i].rank && a[i].n_top == b[i].n_top &&
                  memcmp(a[i].top_ids, b[i].top_ids, (size_t)a[i].n_top * sizeof a[i].top_ids[0]) == 0 &&
                  memcmp(a[i].top_logprobs, b[i].top_logprobs, (size_t)a[i].n_top * sizeof(float)) == 0;
        if (!eq) {
            fprintf(stderr, "position %zu: logprob %g/%g rank %d/%d\n", i, a[i].logprob, b[i].logprob, a[i].rank,
                    b[i].rank);
            return false;
        }
    }
    return true;
}

static void prompt_scoring(zse_model *m, const int32_t *ids, size_t n)
{
    static zse_logprobs want[MAX_PROMPT];
    reference(m, ids, n, 5, want);
    CHECK(want[1].rank >= 1 && want[1].n_top == 5);
    /* warm the prefix cache with the same prompt: a scored prompt must not use it */
    zse_seq *warm = zse_seq_new(m, NULL);
    CHECK(warm && zse_seq_feed(warm, ids, n) == 0);
    zse_seq_free(warm);

    zse_engine_params ep = {.max_seqs = 6, .max_batch_tokens = 128, .max_queue = 8};
    zse_engine *e = zse_engine_start(m, &ep);
    static result r[4];
    reset(r, 4);
    zse_sampling score;
    zse_sampling_default(&score);
    score.temperature = 0;
    score.prompt_logprobs = true;
    score.prompt_top_logprobs = 5;
    score.max_tokens = ZSE_MAX_TOKENS_NONE;
    zse_sampling gen = score;
    gen.max_tokens = 4;
    gen.ignore_eos = true;
    zse_sampling plain;
    zse_sampling_default(&plain);
    plain.temperature = 0;
    plain.max_tokens = 8;
    plain.ignore_eos = true;
    CHECK(zse_engine_submit(e, ids, n / 2, &plain, 0, on_token, &r[2], NULL) == 0);
    CHECK(zse_engine_submit(e, ids, n, &score, 0, on_token, &r[0], NULL) == 0);
    CHECK(zse_engine_submit(e, ids, n, &gen, 0, on_token, &r[1], NULL) == 0);
    CHECK(zse_engine_submit(e, ids + 7, n - 7, &plain, 0, on_token, &r[3], NULL) == 0);
    CHECK(wait_finals(4));
    /* scored, nothing generated */
    CHECK(r[0].got_plp && r[0].n == 0 && r[0].finish == ZSE_FINISH_LENGTH && r[0].first_token == -1);
    CHECK(same_logprobs(r[0].plp, want, n));
    CHECK(r[0].plp[0].n_top == 0 && r[0].plp[0].logprob == 0);
    /* scored, then generated: the logprobs came with the first token */
    CHECK(r[1].got_plp && r[1].n == 4 && r[1].first_token == r[1].ids[0]);
    CHECK(same_logprobs(r[1].plp, want, n));
    CHECK(!r[2].got_plp && r[2].n == 8 && !r[3].got_plp && r[3].n == 8);
    zse_engine_stats st;
    zse_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    zse_engine_stop(e, 1);
}

/* min_tokens: the greedy first token made a stop id (and its text a stop string) ends
 * nothing before min_tokens, and the stop id is never drawn before it */
static void min_tokens(zse_model *m, const int32_t *ids, size_t n)
{
    zse_sampling g;
    zse_sampling_default(&g);
    g.temperature = 0;
    g.max_tokens = 1;
    zse_engine *e = zse_engine_start(m, NULL);
    static result r[3];
    reset(r, 3);
    CHECK(zse_engine_submit(e, ids, n, &g, 0, on_token, &r[0], NULL) == 0);
    CHECK(wait_finals(1));
    int32_t first = r[0].ids[0];
    char first_text[64];
    snprintf(first_text, sizeof first_text, "%.63s", r[0].text);
    reset(r, 3);
    zse_sampling s = g;
    s.max_tokens = 6;
    s.stop_ids = &first;
    s.n_stop_ids = 1;
    CHECK(zse_engine_submit(e, ids, n, &s, 0, on_token, &r[0], NULL) == 0); /* stops at once */
    s.min_tokens = 3;
    CHECK(zse_engine_submit(e, ids, n, &s, 0, on_token, &r[1], NULL) == 0);
    CHECK(wait_finals(2));
    CHECK(r[0].n == 1 && r[0].ids[0] == first && r[0].finish == ZSE_FINISH_STOP);
    CHECK(r[1].n >= 3);
    for (int i = 0; i < 3 && i < r[1].n; i++)
        CHECK_MSG(r[1].ids[i] != first, "the stop id came at %d before min_tokens", i);
    /* the same first token's text as a stop string: with min_tokens 3 the output goes past
     * it (the stop string may still end generation later) */
    CHECK(first_text[0] != '\0');
    const char *stops[1] = {first_text};
    zse_sampling t = g;
    t.max_tokens = 6;
    t.stop = stops;
    t.n_stop = 1;
    t.min_tokens = 3;
    reset(r, 3);
    CHECK(zse_engine_submit(e, ids, n, &t, 0, on_token, &r[2], NULL) == 0);
    CHECK(wait_finals(1));
    CHECK_MSG(r[2].n >= 3 && strncmp(r[2].text, first_text, strlen(first_text)) == 0,
              "%d tokens, text \"%s\"", r[2].n, r[2].text);
    zse_engine_stop(e, 1);
}

int main(void)
{
    char path[512], eval[512];
    test_fixture_path("eval.txt", eval, sizeof eval);
    if (test_convert_fixture("tiny-qwen2", "scoring", path, sizeof path) != 0)
        return 1;
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.threads = 2;
    lp.max_seqs = 6;
    lp.ctx_size = 512;
    zse_model *m = zse_model_load(path, &lp);
    char *text = zse_read_file(eval, NULL);
    CHECK(m && text);
    if (m && text) {
        int32_t *ids;
        size_t n;
        char buf[1200];
        snprintf(buf, sizeof buf, "%.1000s", text + 500);
        CHECK(zse_tokenize(m, buf, strlen(buf), 0, &ids, &n) == 0);
        if (n > MAX_PROMPT)
            n = MAX_PROMPT;
        CHECK(n > 150); /* longer than a step's scoring rows */
        prompt_scoring(m, ids, n);
        min_tokens(m, ids, 40);
        zse_free(ids);
    }
    free(text);
    zse_model_free(m);
    remove(path);
    return test_main_end();
}
