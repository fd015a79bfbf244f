/* The batching engine on a real fixture (tests/fixtures/tiny-qwen2 converted to f32):
 * greedy and seeded outputs are the same alone, among 63 others, with chunked prefill and
 * under KV pressure (preemption); cancel, client-gone, queue limits, priorities, logprobs,
 * stop strings, shutdown; no KV block is leaked. */
#include "fixture.h"
#include "test.h"

#include "engine/engine.h"
#include "format/format.h"
#include "zse.h"

#include <pthread.h>
#include <unistd.h>

#define N_REQ 64
#define MAX_OUT 64

typedef struct {
    pthread_mutex_t *mu;
    pthread_cond_t *cv;
    int32_t ids[MAX_OUT];
    int n;
    char text[4096];
    size_t text_len;
    zse_finish finish;
    int n_final;            /* must end as 1 */
    int cancel_after;       /* return false after this many tokens (0 = never) */
    const bool *gate;       /* from hold_at tokens on, its events wait while *gate (under mu):
                             * the scheduler thread stalls in the callback, so the test acts
                             * while the request is certainly still running */
    int hold_at;
    int prompt_tokens, completion_tokens;
    float logprob[MAX_OUT];
    float top0[MAX_OUT];
    int32_t top0_id[MAX_OUT];
    int n_top;
    double first_event;     /* order of the first event (priority test) */
    int first_token_clock;  /* tokens of every request emitted before this one's first */
} result;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int finals;
static int event_clock;     /* requests that had their first event */
static int token_clock;     /* token events of all requests */
static bool gate_a, gate_b; /* under mu: closed (true) holds the requests that point at them */

static bool on_token(void *user, const zse_token_event *ev)
{
    result *r = user;
    pthread_mutex_lock(&mu);
    if (r->first_event < 0) {
        r->first_event = event_clock++;
        r->first_token_clock = token_clock;
    }
    token_clock += ev->token >= 0;
    while (r->gate && *r->gate && r->n >= r->hold_at && ev->finish == ZSE_FINISH_NONE)
        pthread_cond_wait(&cv, &mu); /* the scheduler thread waits here: nothing else runs */
    if (ev->token >= 0 && r->n < MAX_OUT) {
        r->logprob[r->n] = ev->logprob;
        r->n_top = ev->n_top;
        r->top0[r->n] = ev->n_top ? ev->top_logprobs[0] : 0;
        r->top0_id[r->n] = ev->n_top ? ev->top_ids[0] : -1;
        r->ids[r->n++] = ev->token;
    }
    size_t l = strlen(ev->text);
    if (r->text_len + l < sizeof r->text) {
        memcpy(r->text + r->text_len, ev->text, l + 1);
        r->text_len += l;
    }
    bool keep = !(r->cancel_after && r->n >= r->cancel_after);
    if (ev->finish != ZSE_FINISH_NONE) {
        r->finish = ev->finish;
        r->n_final++;
        r->prompt_tokens = ev->prompt_tokens;
        r->completion_tokens = ev->completion_tokens;
        finals++;
        pthread_cond_broadcast(&cv);
    }
    pthread_mutex_unlock(&mu);
    return keep;
}

static void set_gate(bool *gate, bool closed)
{
    pthread_mutex_lock(&mu);
    *gate = closed;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

/* until pred(r) holds under mu (polled), at most 10 s */
static bool wait_until(bool (*pred)(const result *), const result *r)
{
    for (int tries = 0; tries < 20000; tries++) {
        pthread_mutex_lock(&mu);
        const bool ok = pred(r);
        pthread_mutex_unlock(&mu);
        if (ok)
            return true;
        usleep(500);
    }
    return false;
}

static bool first_event_seen(const result *r) { return r[0].first_event >= 0; }
static bool both_generating(const result *r) { return r[0].n >= 2 && r[1].n >= 2; }

static void reset(result *r, int n)
{
    for (int i = 0; i < n; i++) {
        memset(&r[i], 0, sizeof r[i]);
        r[i].first_event = -1;
    }
    pthread_mutex_lock(&mu);
    finals = 0;
    event_clock = 0;
    token_clock = 0;
    pthread_mutex_unlock(&mu);
}

static bool wait_finals(int n)
{
    return test_wait_count(&mu, &cv, &finals, n, false);
}

/* prompts of varied lengths: slices of the fixture's eval text */
typedef struct {
    int32_t *ids;
    size_t n;
} prompt;

static void make_prompts(zse_model *m, const char *text, prompt *p)
{
    size_t len = strlen(text);
    for (int i = 0; i < N_REQ; i++) {
        size_t start = ((size_t)i * 977) % (len / 2);
        size_t want = 8 + (size_t)((i * 37) % 160); /* bytes: about 3..60 tokens */
        char buf[512];
        snprintf(buf, sizeof buf, "%.*s", (int)want, text + start);
        CHECK(zse_tokenize(m, buf, strlen(buf), 0, &p[i].ids, &p[i].n) == 0 && p[i].n > 0);
    }
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

/* the reference: one zse_seq, no engine */
static void run_alone(zse_model *m, const prompt *p, const zse_sampling *s, result *r)
{
    zse_seq *q = zse_seq_new(m, s);
    CHECK(q && zse_seq_feed(q, p->ids, p->n) == 0);
    zse_finish fin = ZSE_FINISH_NONE;
    while (q && fin == ZSE_FINISH_NONE && r->n < MAX_OUT) {
        int32_t t;
        char *piece;
        if (zse_seq_next(q, &t, &piece, &fin) != 0) {
            fprintf(stderr, "zse_seq_next after %d tokens of a %zu-token prompt: %s\n", r->n, p->n, zse_last_error());
            break;
        }
        r->ids[r->n++] = t;
        zse_free(piece);
    }
    r->finish = fin;
    zse_seq_free(q);
}

static bool equal_ids(const result *a, const result *b)
{
    return a->n == b->n && memcmp(a->ids, b->ids, (size_t)a->n * sizeof a->ids[0]) == 0;
}

/* equal, or say how they differ */
static bool same_ids(const result *a, const result *b)
{
    bool same = equal_ids(a, b);
    if (!same) {
        fprintf(stderr, "differ (%d vs %d tokens, finish %d vs %d):", a->n, b->n, a->finish, b->finish);
        for (int i = 0; i < a->n || i < b->n; i++)
            fprintf(stderr, " %d/%d", i < a->n ? a->ids[i] : -1, i < b->n ? b->ids[i] : -1);
        fprintf(stderr, "\n");
    }
    return same;
}

static zse_model *load(const char *path, int max_seqs, uint64_t kv_bytes)
{
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.threads = 2;
    lp.max_seqs = max_seqs;
    lp.kv_cache_bytes = kv_bytes;
    lp.ctx_size = 512;
    zse_model *m = zse_model_load(path, &lp);
    CHECK_MSG(m != NULL, "%s", zse_last_error());
    return m;
}

static void check_no_leak(zse_engine *e)
{
    zse_engine_stats st;
    zse_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    CHECK_EQ_INT(st.running, 0);
    CHECK_EQ_INT(st.queued, 0);
}

/* all 64 at once must equal each alone; then under KV pressure */
static void batch_invariance(const char *path, const char *text)
{
    zse_model *m = load(path, N_REQ, 0);
    if (!m)
        return;
    static prompt p[N_REQ];
    make_prompts(m, text, p);
    static result alone[N_REQ], together[N_REQ];
    reset(alone, N_REQ);
    zse_sampling s = greedy(8);
    for (int i = 0; i < N_REQ; i++)
        run_alone(m, &p[i], &s, &alone[i]);

    /* small steps: long prompts are prefilled in several chunks beside decodes */
    zse_engine_params ep = {.max_seqs = N_REQ, .max_batch_tokens = 96, .max_queue = N_REQ};
    zse_engine *e = zse_engine_start(m, &ep);
    CHECK(e != NULL);
    reset(together, N_REQ);
    for (int i = 0; i < N_REQ; i++)
        CHECK(zse_engine_submit(e, p[i].ids, p[i].n, &s, 0, on_token, &together[i], NULL) == 0);
    CHECK(wait_finals(N_REQ));
    int same = 0;
    for (int i = 0; i < N_REQ; i++) {
        same += same_ids(&alone[i], &together[i]);
        CHECK_EQ_INT(together[i].n_final, 1);
        CHECK_EQ_INT(together[i].finish, ZSE_FINISH_LENGTH);
        CHECK_EQ_INT(together[i].prompt_tokens, (int)p[i].n);
        CHECK_EQ_INT(together[i].completion_tokens, 8);
    }
    CHECK_EQ_INT(same, N_REQ);
    check_no_leak(e);
    zse_engine_stop(e, 1);
    zse_model_free(m);

    /* 6 blocks of KV (96 tokens) shared by 16 sequences that grow to at most 84 tokens:
     * preemption, same outputs. A block of this model: 2 (K, V) * 4 layers * 2 KV heads *
     * 16 tokens * 16 dims * 2 bytes = 8 KiB */
    m = load(path, 16, 12 * 4096);
    if (!m)
        return;
    ep = (zse_engine_params){.max_seqs = 16, .max_batch_tokens = 64, .max_queue = 64};
    e = zse_engine_start(m, &ep);
    zse_sampling s40 = greedy(24);
    static result ref[16];
    reset(ref, 16);
    for (int i = 0; i < 16; i++)
        run_alone(m, &p[i], &s40, &ref[i]);
    reset(together, 16);
    for (int i = 0; i < 16; i++)
        CHECK(zse_engine_submit(e, p[i].ids, p[i].n, &s40, 0, on_token, &together[i], NULL) == 0);
    CHECK(wait_finals(16));
    zse_engine_stats st;
    zse_engine_get_stats(e, &st);
    CHECK_MSG(st.preemptions > 0, "expected preemptions with %d blocks", st.kv_blocks_total);
    same = 0;
    for (int i = 0; i < 16; i++)
        same += same_ids(&ref[i], &together[i]) && together[i].n_final == 1;
    CHECK_EQ_INT(same, 16);
    check_no_leak(e);
    zse_engine_stop(e, 1);
    zse_model_free(m);
    for (int i = 0; i < N_REQ; i++)
        zse_free(p[i].ids);
}

/* A plain-greedy zse_seq takes its argmax in the backend and leaves the logits there: its
 * tokens equal a host-sampled greedy run (logprobs on keeps that one on the host), and
 * zse_seq_logits still gives the right rows, read back while fresh or recomputed after
 * another sequence's step has overwritten the model's buffer. */
static void seq_device_argmax(zse_model *m, const prompt *p)
{
    zse_sampling fast = greedy(24), host = greedy(24);
    host.logprobs = true;
    for (int i = 0; i < 4; i++) {
        result a, b;
        reset(&a, 1);
        reset(&b, 1);
        run_alone(m, &p[i], &fast, &a);
        run_alone(m, &p[i], &host, &b);
        CHECK(same_ids(&a, &b));
    }
    zse_model_info info;
    zse_model_get_info(m, &info);
    size_t vocab = (size_t)info.vocab_size;
    float *want = zse_malloc(vocab * sizeof *want);
    zse_seq *x = zse_seq_new(m, &fast), *y = zse_seq_new(m, &fast), *ref = zse_seq_new(m, &host);
    CHECK(want && x && y && ref);
    if (want && x && y && ref) {
        CHECK(zse_seq_feed(ref, p[0].ids, p[0].n) == 0);
        const float *r = zse_seq_logits(ref);
        CHECK(r != NULL);
        if (r)
            memcpy(want, r, vocab * sizeof *want);
        /* fresh: read back from the model's buffer */
        CHECK(zse_seq_feed(x, p[0].ids, p[0].n) == 0);
        const float *got = zse_seq_logits(x);
        CHECK(got && memcmp(got, want, vocab * sizeof *want) == 0);
        /* stale: y's logits were overwritten by x's next step */
        CHECK(zse_seq_feed(y, p[0].ids, p[0].n) == 0);
        int32_t t;
        char *piece;
        zse_finish fin;
        CHECK(zse_seq_next(x, &t, &piece, &fin) == 0);
        zse_free(piece);
        got = zse_seq_logits(y);
        CHECK(got && memcmp(got, want, vocab * sizeof *want) == 0);
        /* and y goes on as if nothing happened: the same next token as ref */
        int32_t ty, tr;
        CHECK(zse_seq_next(y, &ty, &piece, &fin) == 0);
        zse_free(piece);
        CHECK(zse_seq_next(ref, &tr, &piece, &fin) == 0);
        zse_free(piece);
        CHECK_EQ_INT(ty, tr);
    }
    zse_seq_free(x);
    zse_seq_free(y);
    zse_seq_free(ref);
    free(want);
}

/* seeded sampling through the engine equals zse_seq with the same seed, batched or not */
static void seeded(zse_model *m, const prompt *p)
{
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0.9f;
    s.top_p = 0.95f;
    s.top_k = 40;
    s.max_tokens = 16;
    s.ignore_eos = true;
    static result ref[8], got[8];
    reset(ref, 8);
    for (int i = 0; i < 8; i++) {
        s.seed = 1000 + (uint64_t)i;
        run_alone(m, &p[i], &s, &ref[i]);
    }
    zse_engine_params ep = {.max_seqs = 8, .max_batch_tokens = 128, .max_queue = 8};
    zse_engine *e = zse_engine_start(m, &ep);
    reset(got, 8);
    for (int i = 0; i < 8; i++) {
        s.seed = 1000 + (uint64_t)i;
        CHECK(zse_engine_submit(e, p[i].ids, p[i].n, &s, 0, on_token, &got[i], NULL) == 0);
    }
    CHECK(wait_finals(8));
    int same = 0, differ = 0;
    for (int i = 0; i < 8; i++) {
        same += same_ids(&ref[i], &got[i]);
        differ += i > 0 && !equal_ids(&got[i], &got[0]);
    }
    CHECK_EQ_INT(same, 8);
    CHECK(differ > 0);
    check_no_leak(e);
    zse_engine_stop(e, 1);
}

/* cancel, a callback that returns false, queue limit, bad prompts, priorities, shutdown */
static void control(zse_model *m, const prompt *p)
{
    zse_engine_params ep = {.max_seqs = 1, .max_batch_tokens = 32, .max_queue = 3};
    zse_engine *e = zse_engine_start(m, &ep);
    static result r[8];
    reset(r, 8);
    zse_sampling s = greedy(48);
    uint64_t id[8];
    /* r0 runs, held inside its first token's callback (so however fast the build, it is still
     * running when the cancels come); r1..r3 wait (queue of 3); r4 is refused */
    set_gate(&gate_a, true);
    r[0].gate = &gate_a;
    CHECK(zse_engine_submit(e, p[0].ids, p[0].n, &s, 0, on_token, &r[0], &id[0]) == 0);
    CHECK(wait_until(first_event_seen, &r[0])); /* r0 is in its callback: the queue holds the next three */
    CHECK(zse_engine_submit(e, p[1].ids, p[1].n, &s, 5, on_token, &r[1], &id[1]) == 0);
    CHECK(zse_engine_submit(e, p[2].ids, p[2].n, &s, 0, on_token, &r[2], &id[2]) == 0);
    CHECK(zse_engine_submit(e, p[3].ids, p[3].n, &s, -5, on_token, &r[3], &id[3]) == 0);
    CHECK(zse_engine_submit(e, p[4].ids, p[4].n, &s, 0, on_token, &r[4], &id[4]) == -1);
    CHECK(strstr(zse_last_error(), "queue is full") != NULL);
    zse_engine_cancel(e, id[2]);            /* waiting: ends without running */
    zse_engine_cancel(e, id[0]);            /* running: ends, frees its KV */
    zse_engine_cancel(e, 987654);           /* unknown: nothing happens */
    set_gate(&gate_a, false);
    CHECK(wait_finals(4));
    CHECK_EQ_INT(r[0].finish, ZSE_FINISH_CANCELLED);
    CHECK_EQ_INT(r[2].finish, ZSE_FINISH_CANCELLED);
    CHECK_EQ_INT(r[2].n, 0);
    /* priority -5 (r3) ran before priority 5 (r1) */
    CHECK(r[3].first_event >= 0 && r[1].first_event > r[3].first_event);
    CHECK_EQ_INT(r[1].finish, ZSE_FINISH_LENGTH);
    CHECK_EQ_INT(r[3].finish, ZSE_FINISH_LENGTH);
    for (int i = 0; i < 4; i++)
        CHECK_EQ_INT(r[i].n_final, 1);
    check_no_leak(e);

    /* the client goes away after 3 tokens */
    reset(r, 1);
    r[0].cancel_after = 3;
    CHECK(zse_engine_submit(e, p[5].ids, p[5].n, &s, 0, on_token, &r[0], NULL) == 0);
    CHECK(wait_finals(1));
    CHECK_EQ_INT(r[0].n, 3);
    CHECK_EQ_INT(r[0].finish, ZSE_FINISH_CANCELLED);
    check_no_leak(e);

    /* prompts the engine refuses, naming the numbers */
    int32_t bad = 1 << 30;
    CHECK(zse_engine_submit(e, &bad, 1, &s, 0, on_token, &r[0], NULL) == -1);
    CHECK(strstr(zse_last_error(), "vocabulary") != NULL);
    CHECK(zse_engine_submit(e, p[0].ids, 0, &s, 0, on_token, &r[0], NULL) == -1);
    int32_t *longp = calloc(600, sizeof *longp);
    CHECK(zse_engine_submit(e, longp, 600, &s, 0, on_token, &r[0], NULL) == -1);
    CHECK(strstr(zse_last_error(), "600") && strstr(zse_last_error(), "512"));
    free(longp);

    /* shutdown with work in flight and no time left: everything ends, cancelled */
    reset(r, 4);
    zse_sampling slow = greedy(48);
    for (int i = 0; i < 3; i++)
        CHECK(zse_engine_submit(e, p[i].ids, p[i].n, &slow, 0, on_token, &r[i], NULL) == 0);
    zse_engine_stop(e, 0);
    int ended = 0;
    for (int i = 0; i < 3; i++)
        ended += r[i].n_final == 1;
    CHECK_EQ_INT(ended, 3);
}

/* Every slot busy with long priority-0 generations: a priority -10 request starts in the
 * next step (a running one is preempted: at most the events of the step in flight and the
 * other running request's event of that step come before its first one), and everything
 * still says what it says alone. Aging: a priority-5 request that has waited outranks
 * priority-0 requests that arrive after it. */
static void priority_preemption(zse_model *m, const prompt *p)
{
    zse_engine_params ep = {.max_seqs = 2, .max_batch_tokens = 256, .max_queue = 16, .priority_aging_s = -1};
    zse_engine *e = zse_engine_start(m, &ep);
    static result r[3], ref[3];
    reset(ref, 3);
    zse_sampling slow = greedy(40), quick = greedy(6);
    run_alone(m, &p[0], &slow, &ref[0]);
    run_alone(m, &p[1], &slow, &ref[1]);
    run_alone(m, &p[2], &quick, &ref[2]);
    reset(r, 3);
    /* however fast the build, both are still generating when the urgent one comes: the first
     * is held at its first token until the second is queued, the second at its third (the
     * first, admitted before it, has as many by then) */
    set_gate(&gate_a, true);
    set_gate(&gate_b, true);
    r[0].gate = &gate_a;
    r[1].gate = &gate_b;
    r[1].hold_at = 2;
    CHECK(zse_engine_submit(e, p[0].ids, p[0].n, &slow, 0, on_token, &r[0], NULL) == 0);
    CHECK(wait_until(first_event_seen, &r[0]));
    CHECK(zse_engine_submit(e, p[1].ids, p[1].n, &slow, 0, on_token, &r[1], NULL) == 0);
    set_gate(&gate_a, false);
    CHECK(wait_until(both_generating, r));
    pthread_mutex_lock(&mu);
    int before = token_clock;
    pthread_mutex_unlock(&mu);
    CHECK(zse_engine_submit(e, p[2].ids, p[2].n, &quick, -10, on_token, &r[2], NULL) == 0);
    set_gate(&gate_b, false);
    CHECK(wait_finals(3));
    CHECK(r[2].first_event >= 0);
    zse_engine_stats st;
    zse_engine_get_stats(e, &st);
    CHECK(st.preemptions >= 1);
    for (int i = 0; i < 3; i++)
        CHECK_MSG(same_ids(&ref[i], &r[i]) && r[i].n_final == 1, "request %d", i);
    CHECK_MSG(r[2].first_token_clock - before <= 3, "%d events of other requests before the urgent one's first",
              r[2].first_token_clock - before);
    check_no_leak(e);
    zse_engine_stop(e, 1);

    /* aging: one slot, a long request running; a priority-5 request waits, then ten
     * priority-0 ones arrive; with a level a 10 ms it has outranked them by then */
    ep = (zse_engine_params){.max_seqs = 1, .max_batch_tokens = 256, .max_queue = 16, .priority_aging_s = 0.01};
    e = zse_engine_start(m, &ep);
    static result w[12];
    reset(w, 12);
    zse_sampling mid = greedy(12);
    CHECK(zse_engine_submit(e, p[3].ids, p[3].n, &mid, 0, on_token, &w[0], NULL) == 0);
    CHECK(zse_engine_submit(e, p[4].ids, p[4].n, &quick, 5, on_token, &w[1], NULL) == 0);
    usleep(100000);
    for (int i = 2; i < 12; i++)
        CHECK(zse_engine_submit(e, p[3 + i].ids, p[3 + i].n, &quick, 0, on_token, &w[i], NULL) == 0);
    CHECK(wait_finals(12));
    int later = 0;
    for (int i = 2; i < 12; i++)
        later += w[i].first_event > w[1].first_event;
    CHECK_MSG(later == 10, "the aged priority-5 request ran before only %d of 10 fresh priority-0 ones", later);
    check_no_leak(e);
    zse_engine_stop(e, 1);
}

/* logprobs, stop strings and stop ids through the engine */
static void outputs(zse_model *m, const prompt *p)
{
    zse_engine *e = zse_engine_start(m, NULL);
    static result r[3];
    reset(r, 3);
    zse_sampling s = greedy(10);
    s.logprobs = true;
    s.top_logprobs = 5;
    CHECK(zse_engine_submit(e, p[6].ids, p[6].n, &s, 0, on_token, &r[0], NULL) == 0);
    CHECK(wait_finals(1));
    CHECK_EQ_INT(r[0].n, 10);
    CHECK_EQ_INT(r[0].n_top, 5);
    for (int k = 0; k < r[0].n; k++) {
        /* greedy picks the most likely token: its logprob is the first alternative's */
        CHECK(r[0].logprob[k] <= 0 && r[0].top0_id[k] == r[0].ids[k]);
        CHECK_NEAR(r[0].logprob[k], r[0].top0[k], 1e-6);
    }
    /* a stop string taken from the greedy text itself: output ends right before it */
    char full[4096];
    snprintf(full, sizeof full, "%s", r[0].text);
    size_t fl = strlen(full);
    if (fl >= 6) {
        char stop[4];
        memcpy(stop, full + fl / 2, 3);
        stop[3] = '\0';
        const char *stops[1] = {stop};
        zse_sampling ss = greedy(10);
        ss.stop = stops;
        ss.n_stop = 1;
        reset(r, 1);
        CHECK(zse_engine_submit(e, p[6].ids, p[6].n, &ss, 0, on_token, &r[0], NULL) == 0);
        CHECK(wait_finals(1));
        CHECK_EQ_INT(r[0].finish, ZSE_FINISH_STOP);
        const char *first = strstr(full, stop);
        CHECK(first && r[0].text_len == (size_t)(first - full) && memcmp(r[0].text, full, r[0].text_len) == 0);
    }
    check_no_leak(e);
    zse_engine_stop(e, 1);
}

/* zse_model_get_memory: on the CPU the weights are the file's tensors (in place), the KV
 * cache is exactly the blocks asked for, and both follow the load parameters */
static void memory_accounting(const char *path)
{
    zse_model *small = load(path, 1, 0), *big = load(path, 4, 0);
    if (small && big) {
        zse_memory_info a, b;
        zse_model_get_memory(small, &a);
        zse_model_get_memory(big, &b);
        zse_model_info info;
        zse_model_get_info(small, &info);
        /* 512 tokens of context: 32 blocks of 16 per sequence; f16 K and V */
        uint64_t per_seq = 32ull * 16 * 2 * (uint64_t)info.n_layers * (uint64_t)info.n_kv_heads *
                           (uint64_t)info.head_dim * 2;
        CHECK(!a.on_device && a.weights > 0 && a.weights == b.weights);
        CHECK_MSG(a.kv_cache == per_seq, "kv %llu, expected %llu", (unsigned long long)a.kv_cache,
                  (unsigned long long)per_seq);
        CHECK(b.kv_cache == 4 * per_seq);
        CHECK(a.activations > 0);
        /* while a step holds the run lock the answer is the last reading, without waiting */
        pthread_mutex_lock(&small->run_lock);
        zse_memory_info during;
        zse_model_get_memory(small, &during);
        pthread_mutex_unlock(&small->run_lock);
        CHECK(during.weights == a.weights && during.kv_cache == a.kv_cache && during.activations == a.activations);
        zse_map map;
        CHECK(zse_map_open(&map, path) == 0);
        CHECK(a.weights < map.size); /* the tensors, not the header or the tokenizer */
        zse_map_close(&map);
    }
    zse_model_free(small);
    zse_model_free(big);
}

int main(void)
{
    char path[512], eval[512];
    test_fixture_path("eval.txt", eval, sizeof eval);
    if (test_convert_fixture("tiny-qwen2", "engine", path, sizeof path) != 0)
        return 1;
    char *text = zse_read_file(eval, NULL);
    CHECK(text != NULL);
    memory_accounting(path);
    if (text) {
        batch_invariance(path, text);
        zse_model *m = load(path, 8, 0);
        if (m) {
            static prompt p[N_REQ];
            make_prompts(m, text, p);
            seq_device_argmax(m, p);
            seeded(m, p);
            control(m, p);
            priority_preemption(m, p);
            outputs(m, p);
            zse_model_free(m);
            for (int i = 0; i < N_REQ; i++)
                zse_free(p[i].ids);
        }
    }
    free(text);
    remove(path);
    return test_main_end();
}
