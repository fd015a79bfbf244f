/* Fair sharing between tenants in the batching engine (zse_engine_submit_for) on the tiny
 * fixture: one tenant runs exactly as with zse_engine_submit; a tenant with many long
 * contexts does not slow a short one to its share of slots (the short one runs every
 * step, the long ones share the rest of the compute and catch up once it is gone, their
 * outputs unchanged); a tenant far below another's count of slots takes one; priorities
 * still come first across tenants; a paused request waits and resumes unchanged. ctx_cost
 * is fixed, so the sharing does not depend on the machine's timing. */
#include "fixture.h"
#include "test.h"

#include "engine/engine.h"
#include "format/format.h"
#include "zse.h"

#include <pthread.h>
#include <unistd.h>

#define MAX_OUT 160

typedef struct {
    int tenant;             /* which counter its tokens go to */
    int32_t ids[MAX_OUT];
    int n;
    zse_finish finish;
    int n_final;
    long first_event;       /* order of its first event among all requests' (-1: none yet) */
    uint64_t steps_first, steps_last;   /* the engine's steps at its first and last event */
    long others_first, others_last;     /* the other tenants' tokens then */
} result;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static zse_engine *engine;
static long tokens_of[3];   /* tokens emitted per tenant */
static long event_clock;
static int finals;

static bool on_token(void *user, const zse_token_event *ev)
{
    result *r = user;
    zse_engine_stats st;
    zse_engine_get_stats(engine, &st);
    pthread_mutex_lock(&mu);
    long others = tokens_of[0] + tokens_of[1] + tokens_of[2] - tokens_of[r->tenant];
    if (r->first_event < 0) {
        r->first_event = event_clock++;
        r->steps_first = st.steps;
        r->others_first = others;
    }
    r->steps_last = st.steps;
    r->others_last = others;
    if (ev->token >= 0) {
        tokens_of[r->tenant]++;
        if (r->n < MAX_OUT)
            r->ids[r->n++] = ev->token;
    }
    if (ev->finish != ZSE_FINISH_NONE) {
        r->finish = ev->finish;
        r->n_final++;
        finals++;
    }
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return true;
}

static void reset(result *r, int n, int tenant)
{
    for (int i = 0; i < n; i++) {
        memset(&r[i], 0, sizeof r[i]);
        r[i].first_event = -1;
        r[i].tenant = tenant;
    }
}

static void reset_clocks(void)
{
    pthread_mutex_lock(&mu);
    memset(tokens_of, 0, sizeof tokens_of);
    event_clock = 0;
    finals = 0;
    pthread_mutex_unlock(&mu);
}

/* waits until cond(arg) holds (checked under mu) or 300 s pass */
static bool wait_for(bool (*cond)(void *), void *arg)
{
    bool ok = true;
    pthread_mutex_lock(&mu);
    double t0 = zse_now();
    while (!cond(arg) && ok) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&cv, &mu, &ts);
        ok = zse_now() - t0 < 300;
    }
    pthread_mutex_unlock(&mu);
    CHECK_MSG(ok, "timed out waiting for the engine");
    return ok;
}

static int finals_wanted;
static bool all_final(void *arg)
{
    (void)arg;
    return finals >= finals_wanted;
}

typedef struct {
    result *r;
    int n, tokens;
} started;
static bool each_has_tokens(void *arg)
{
    started *s = arg;
    for (int i = 0; i < s->n; i++)
        if (s->r[i].n < s->tokens)
            return false;
    return true;
}

static zse_sampling greedy(int max_tokens)
{
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0;
    s.max_tokens = max_tokens;
    s.ignore_eos = true;
    return s;
}

static bool share_off; /* zse_engine_params.no_compute_share for the engines start() makes */

static zse_engine *start(zse_model *m, int max_seqs)
{
    zse_engine_params ep = {.max_seqs = max_seqs, .max_batch_tokens = 256, .max_queue = 64, .ctx_cost = 1.0 / 32,
                            .no_compute_share = share_off};
    engine = zse_engine_start(m, &ep);
    CHECK_MSG(engine != NULL, "%s", zse_last_error());
    return engine;
}

static void stop(void)
{
    zse_engine_stats st;
    zse_engine_get_stats(engine, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    CHECK_EQ_INT(st.running + st.queued, 0);
    CHECK_EQ_INT(st.tenants, 0); /* a tenant lives while it has requests */
    zse_engine_stop(engine, 5);
    engine = NULL;
}

/* a prompt of n tokens: the fixture's text, repeated */
static int32_t *make_prompt(zse_model *m, const char *text, size_t offset, size_t n)
{
    int32_t *all = NULL;
    size_t n_all = 0;
    CHECK(zse_tokenize(m, text + offset, strlen(text + offset), 0, &all, &n_all) == 0 && n_all > 0);
    int32_t *p = zse_malloc(n * sizeof *p);
    for (size_t i = 0; p && all && i < n; i++)
        p[i] = all[i % n_all];
    zse_free(all);
    return p;
}

/* One tenant: zse_engine_submit and zse_engine_submit_for("a") give the same tokens in the
 * same number of steps, and nothing ever sits out. */
static void one_tenant(zse_model *m, int32_t **prompts)
{
    result a[4], b[4];
    uint64_t steps[2];
    for (int pass = 0; pass < 2; pass++) {
        result *r = pass ? b : a;
        reset(r, 4, 0);
        reset_clocks();
        start(m, 8);
        zse_sampling s = greedy(24);
        /* one request alone first: its steps are its tokens (the prompt and first token in one) */
        CHECK(pass ? zse_engine_submit_for(engine, "a", prompts[0], 40, &s, 0, on_token, &r[0], NULL) == 0
                   : zse_engine_submit(engine, prompts[0], 40, &s, 0, on_token, &r[0], NULL) == 0);
        finals_wanted = 1;
        wait_for(all_final, NULL);
        zse_engine_stats st;
        zse_engine_get_stats(engine, &st);
        steps[pass] = st.steps;
        for (int i = 1; i < 4; i++)
            CHECK(pass ? zse_engine_submit_for(engine, "a", prompts[i], 30 + 20 * (size_t)i, &s, 0, on_token, &r[i],
                                               NULL) == 0
                       : zse_engine_submit(engine, prompts[i], 30 + 20 * (size_t)i, &s, 0, on_token, &r[i], NULL) == 0);
        finals_wanted = 4;
        wait_for(all_final, NULL);
        zse_engine_get_stats(engine, &st);
        CHECK_EQ_INT(st.fair_waits, 0);
        stop();
    }
    CHECK_EQ_INT(steps[0], 24);
    CHECK_EQ_INT(steps[1], 24);
    for (int i = 0; i < 4; i++) {
        CHECK_EQ_INT(a[i].n, 24);
        CHECK(a[i].n == b[i].n && memcmp(a[i].ids, b[i].ids, (size_t)a[i].n * sizeof a[i].ids[0]) == 0);
    }
}

/* Six long-context sequences of one tenant, then one short sequence of another: the short
 * one runs in (nearly) every step while it lives, not at 1/7 of the engine; the long ones
 * get about as much compute as it takes (a few tokens, not six per step), sit out the rest
 * and finish afterwards with the tokens they would have had alone. */
static void compute_share(zse_model *m, int32_t **prompts)
{
    enum { N_LONG = 6, LONG_PROMPT = 320, LONG_OUT = 48, SHORT_OUT = 40 };
    static result longs[N_LONG], solo, shorter;
    reset(longs, N_LONG, 1);
    reset(&shorter, 1, 2);
    reset(&solo, 1, 1);
    reset_clocks();
    start(m, 8);
    zse_sampling sl = greedy(LONG_OUT), ss = greedy(SHORT_OUT);
    for (int i = 0; i < N_LONG; i++)
        CHECK(zse_engine_submit_for(engine, "long", prompts[i], LONG_PROMPT, &sl, 0, on_token, &longs[i], NULL) == 0);
    started st = {longs, N_LONG, 2};
    wait_for(each_has_tokens, &st); /* all decoding */
    CHECK(zse_engine_submit_for(engine, "short", prompts[7], 8, &ss, 0, on_token, &shorter, NULL) == 0);
    finals_wanted = N_LONG + 1;
    wait_for(all_final, NULL);
    zse_engine_stats es;
    zse_engine_get_stats(engine, &es);
    stop();

    CHECK_EQ_INT(shorter.n, SHORT_OUT);
    uint64_t steps = shorter.steps_last - shorter.steps_first + 1;
    long long_tokens = shorter.others_last - shorter.others_first;
    fprintf(stderr, "fairness: the short tenant's %d tokens took %llu steps; the long tenant had %ld tokens meanwhile "
                    "(%d sequences); %llu sequence-steps sat out; ctx_cost %.4f\n",
            shorter.n, (unsigned long long)steps, long_tokens, N_LONG, (unsigned long long)es.fair_waits, es.ctx_cost);
    /* every step (a step more or so for its prompt) */
    CHECK_MSG(steps <= SHORT_OUT + 2, "%llu steps for %d tokens", (unsigned long long)steps, SHORT_OUT);
    /* each long token costs ~1 + 400/32 against ~1 + 30/32: an equal share of cost is
     * several short tokens per long one; without sharing it would be 6 long per short */
    CHECK_MSG(long_tokens * 2 <= SHORT_OUT, "%ld long tokens beside %d short ones", long_tokens, SHORT_OUT);
    CHECK_MSG(long_tokens >= 1, "the long tenant made no progress while the short one ran");
    CHECK(es.fair_waits > 0);
    for (int i = 0; i < N_LONG; i++) {
        CHECK_EQ_INT(longs[i].n, LONG_OUT);
        CHECK_EQ_INT(longs[i].finish, ZSE_FINISH_LENGTH);
    }
    /* sitting out changes no output: the first long one alone */
    reset_clocks();
    start(m, 8);
    CHECK(zse_engine_submit(engine, prompts[0], LONG_PROMPT, &sl, 0, on_token, &solo, NULL) == 0);
    finals_wanted = 1;
    wait_for(all_final, NULL);
    stop();
    CHECK(solo.n == longs[0].n && memcmp(solo.ids, longs[0].ids, (size_t)solo.n * sizeof solo.ids[0]) == 0);
}

/* The same two tenants with compute sharing off (zse serve --no-fair-share): nothing sits
 * out, so the long tenant's six sequences each take a token in every step the short one
 * runs in. */
static void compute_share_off(zse_model *m, int32_t **prompts)
{
    enum { N_LONG = 6, LONG_PROMPT = 320, LONG_OUT = 48, SHORT_OUT = 16 };
    static result longs[N_LONG], shorter;
    reset(longs, N_LONG, 1);
    reset(&shorter, 1, 2);
    reset_clocks();
    share_off = true;
    start(m, 8);
    share_off = false;
    zse_sampling sl = greedy(LONG_OUT), ss = greedy(SHORT_OUT);
    for (int i = 0; i < N_LONG; i++)
        CHECK(zse_engine_submit_for(engine, "long", prompts[i], LONG_PROMPT, &sl, 0, on_token, &longs[i], NULL) == 0);
    started st = {longs, N_LONG, 2};
    wait_for(each_has_tokens, &st);
    CHECK(zse_engine_submit_for(engine, "short", prompts[7], 8, &ss, 0, on_token, &shorter, NULL) == 0);
    finals_wanted = N_LONG + 1;
    wait_for(all_final, NULL);
    zse_engine_stats es;
    zse_engine_get_stats(engine, &es);
    stop();
    CHECK_EQ_INT(shorter.n, SHORT_OUT);
    long long_tokens = shorter.others_last - shorter.others_first;
    CHECK_MSG(es.fair_waits == 0, "%llu sequence-steps sat out with sharing off", (unsigned long long)es.fair_waits);
    CHECK_MSG(long_tokens >= (long)(SHORT_OUT - 2) * 2, "%ld long tokens beside %d short ones with sharing off",
              long_tokens, SHORT_OUT);
}

/* Four slots, all a tenant's: another tenant's request takes one of them (the first's newest
 * goes back to the queue) instead of waiting for the first tenant's to end. */
static void slot_preemption(zse_model *m, int32_t **prompts)
{
    static result a[6], b;
    reset(a, 6, 1);
    reset(&b, 1, 2);
    reset_clocks();
    start(m, 4);
    zse_sampling sl = greedy(150), ss = greedy(8); /* long enough that a stalled test thread still finds them running */
    for (int i = 0; i < 6; i++)
        CHECK(zse_engine_submit_for(engine, "a", prompts[i], 24, &sl, 0, on_token, &a[i], NULL) == 0);
    started st = {a, 4, 2};
    wait_for(each_has_tokens, &st);
    CHECK(zse_engine_submit_for(engine, "b", prompts[7], 8, &ss, 0, on_token, &b, NULL) == 0);
    static started one = {&b, 1, 8};
    wait_for(each_has_tokens, &one);
    zse_engine_stats es;
    zse_engine_get_stats(engine, &es);
    pthread_mutex_lock(&mu);
    int a_done = 0;
    for (int i = 0; i < 6; i++)
        a_done += a[i].n_final;
    pthread_mutex_unlock(&mu);
    CHECK_EQ_INT(a_done, 0); /* b did not wait for a's */
    CHECK(es.preemptions >= 1);
    finals_wanted = 7;
    wait_for(all_final, NULL);
    stop();
    for (int i = 0; i < 6; i++)
        CHECK_EQ_INT(a[i].n, 150);
}

/* Priorities come before tenants: a waiting request of a better priority is admitted before
 * another tenant's with fewer running, and an urgent one preempts where fairness would not. */
static void priorities_first(zse_model *m, int32_t **prompts)
{
    static result a[3], b[2], urgent;
    reset(a, 3, 1);
    reset(b, 2, 2);
    reset(&urgent, 1, 2);
    reset_clocks();
    start(m, 3);
    zse_sampling sl = greedy(120), ss = greedy(6);
    /* a: two running; b: one running; all three slots full */
    CHECK(zse_engine_submit_for(engine, "a", prompts[0], 16, &sl, 0, on_token, &a[0], NULL) == 0);
    CHECK(zse_engine_submit_for(engine, "a", prompts[1], 16, &sl, 0, on_token, &a[1], NULL) == 0);
    CHECK(zse_engine_submit_for(engine, "b", prompts[2], 16, &sl, 0, on_token, &b[0], NULL) == 0);
    started st = {a, 2, 1};
    wait_for(each_has_tokens, &st);
    started sb = {b, 1, 1};
    wait_for(each_has_tokens, &sb);
    /* b has one running, a two: fairness alone would preempt nobody; priority -10 does */
    CHECK(zse_engine_submit_for(engine, "b", prompts[3], 8, &ss, -10, on_token, &urgent, NULL) == 0);
    /* waiting behind it: b's at priority 5 and a's at priority 3 (a runs more, but ranks first) */
    CHECK(zse_engine_submit_for(engine, "b", prompts[4], 8, &ss, 5, on_token, &b[1], NULL) == 0);
    CHECK(zse_engine_submit_for(engine, "a", prompts[5], 8, &ss, 3, on_token, &a[2], NULL) == 0);
    finals_wanted = 6;
    wait_for(all_final, NULL);
    stop();
    CHECK_EQ_INT(urgent.n, 6);
    CHECK(urgent.first_event >= 0 && urgent.first_event < event_clock);
    for (int i = 0; i < 2; i++)
        CHECK_MSG(a[i].n_final == 1 && urgent.steps_last < a[i].steps_last, "the urgent request waited for a's");
    CHECK_MSG(a[2].first_event < b[1].first_event, "priority 3 of a busier tenant goes before priority 5 (%ld, %ld)",
              a[2].first_event, b[1].first_event);
}

/* A paused request runs no step until resumed, then ends with the tokens it would have had;
 * another tenant's request runs meanwhile. */
static void pause_resume(zse_model *m, int32_t **prompts)
{
    static result r, other, solo;
    reset(&r, 1, 1);
    reset(&other, 1, 2);
    reset(&solo, 1, 1);
    reset_clocks();
    start(m, 4);
    zse_sampling s = greedy(40);
    uint64_t id = 0;
    CHECK(zse_engine_submit_for(engine, "a", prompts[0], 20, &s, 0, on_token, &r, &id) == 0);
    started st = {&r, 1, 5};
    wait_for(each_has_tokens, &st);
    zse_engine_pause(engine, id, true);
    zse_engine_stats es;
    zse_engine_get_stats(engine, &es);
    CHECK_EQ_INT(es.paused, 1);
    CHECK(zse_engine_submit_for(engine, "b", prompts[1], 12, &s, 0, on_token, &other, NULL) == 0);
    /* a step under way when it paused may still give it a token; b's first steps began after */
    started sb = {&other, 1, 2};
    wait_for(each_has_tokens, &sb);
    pthread_mutex_lock(&mu);
    int n_paused = r.n;
    pthread_mutex_unlock(&mu);
    finals_wanted = 1;
    wait_for(all_final, NULL);
    pthread_mutex_lock(&mu);
    CHECK_EQ_INT(r.n, n_paused); /* nothing while paused, though b ran 40 steps */
    CHECK_EQ_INT(other.n, 40);
    pthread_mutex_unlock(&mu);
    zse_engine_pause(engine, id, false);
    finals_wanted = 2;
    wait_for(all_final, NULL);
    zse_engine_get_stats(engine, &es);
    CHECK_EQ_INT(es.paused, 0);
    stop();
    reset_clocks();
    start(m, 4);
    CHECK(zse_engine_submit(engine, prompts[0], 20, &s, 0, on_token, &solo, NULL) == 0);
    finals_wanted = 1;
    wait_for(all_final, NULL);
    stop();
    CHECK(r.n == 40 && solo.n == 40 && memcmp(r.ids, solo.ids, sizeof r.ids[0] * 40) == 0);
}

int main(void)
{
    char path[512], eval[512];
    test_fixture_path("eval.txt", eval, sizeof eval);
    if (test_convert_fixture("tiny-qwen2", "fairness", path, sizeof path) != 0)
        return 1;
    char *text = zse_read_file(eval, NULL);
    CHECK(text != NULL);
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.threads = 2;
    lp.max_seqs = 8;
    lp.ctx_size = 512;
    zse_model *m = text ? zse_model_load(path, &lp) : NULL;
    CHECK_MSG(m != NULL, "%s", zse_last_error());
    if (m) {
        int32_t *prompts[8];
        for (int i = 0; i < 8; i++)
            prompts[i] = make_prompt(m, text, (size_t)i * 211 % (strlen(text) / 2), 400);
        one_tenant(m, prompts);
        compute_share(m, prompts);
        compute_share_off(m, prompts);
        slot_preemption(m, prompts);
        priorities_first(m, prompts);
        pause_resume(m, prompts);
        for (int i = 0; i < 8; i++)
            zse_free(prompts[i]);
        zse_model_free(m);
    }
    free(text);
    remove(path);
    return test_main_end();
}
