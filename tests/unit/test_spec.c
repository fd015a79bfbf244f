/* Speculative decoding on a real fixture (tests/fixtures/tiny-qwen2 on the CPU):
 * - greedy output with n-gram drafts, with a draft model that differs (the int8 conversion
 *   of the same weights) and with the model as its own draft equals decoding without drafts,
 *   token for token, through zse_seq and through the engine (requests with and without
 *   drafts in one step); the self-draft accepts every draft;
 * - max_tokens, end-of-sequence and a full context end generation exactly where they do
 *   without drafts;
 * - sampled requests work through both paths, and agree for the same seed;
 * - a draft model with another tokenizer, a missing draft, 0 or 17 draft tokens: refused
 *   with an error naming the problem.
 * The acceptance rule's distribution is checked in test_sampler. */
#include "test.h"

#include "engine/engine.h"
#include "format/format.h"
#include "zse.h"

#include <pthread.h>
#include <unistd.h>

#define N_PROMPTS 4
#define MAX_OUT 32

typedef struct {
    int32_t ids[MAX_OUT];
    int n;
    zse_finish finish;
    int n_final;
} result;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int finals;

static bool on_token(void *user, const zse_token_event *ev)
{
    result *r = user;
    pthread_mutex_lock(&mu);
    if (ev->token >= 0 && r->n < MAX_OUT)
        r->ids[r->n++] = ev->token;
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

typedef struct {
    int32_t *ids;
    size_t n;
} prompt;

static zse_model *load(const char *path, int ctx)
{
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.threads = 2;
    lp.max_seqs = 8;
    lp.ctx_size = ctx;
    zse_model *m = zse_model_load(path, &lp);
    CHECK_MSG(m != NULL, "%s: %s", path, zse_last_error());
    return m;
}

static zse_sampling greedy(int max_tokens, bool ignore_eos)
{
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0;
    s.max_tokens = max_tokens;
    s.ignore_eos = ignore_eos;
    return s;
}

/* zse_seq with (spec not NULL) or without drafts */
static void run_seq(zse_model *m, const prompt *p, const zse_sampling *s, const zse_spec_params *spec, result *r,
                    zse_spec_stats *st)
{
    memset(r, 0, sizeof *r);
    zse_seq *q = zse_seq_new(m, s);
    CHECK(q && zse_seq_set_spec(q, spec) == 0);
    CHECK(q && zse_seq_feed(q, p->ids, p->n) == 0);
    zse_finish fin = ZSE_FINISH_NONE;
    while (q && fin == ZSE_FINISH_NONE && r->n < MAX_OUT) {
        int32_t t;
        char *piece;
        if (zse_seq_next(q, &t, &piece, &fin) != 0) {
            fprintf(stderr, "zse_seq_next: %s\n", zse_last_error());
            break;
        }
        r->ids[r->n++] = t;
        zse_free(piece);
    }
    r->finish = fin;
    if (q && st)
        zse_seq_get_spec_stats(q, st);
    zse_seq_free(q);
}

static bool same(const result *a, const result *b)
{
    bool eq = a->n == b->n && a->finish == b->finish && memcmp(a->ids, b->ids, (size_t)a->n * sizeof a->ids[0]) == 0;
    if (!eq) {
        fprintf(stderr, "differ (%d vs %d tokens, finish %d vs %d):", a->n, b->n, a->finish, b->finish);
        for (int i = 0; i < a->n || i < b->n; i++)
            fprintf(stderr, " %d/%d", i < a->n ? a->ids[i] : -1, i < b->n ? b->ids[i] : -1);
        fprintf(stderr, "\n");
    }
    return eq;
}

/* greedy through zse_seq: ngram, another draft model, the model itself */
static void seq_greedy(zse_model *m, zse_model *other, const prompt *p)
{
    zse_spec_params ngram = {ZSE_SPEC_NGRAM, 4, NULL}, by_other = {ZSE_SPEC_DRAFT, 5, other},
                    by_self = {ZSE_SPEC_DRAFT, 3, m};
    zse_spec_stats st;
    uint64_t ngram_accepted = 0, other_accepted = 0;
    for (int i = 0; i < N_PROMPTS; i++) {
        /* half of them stop at end-of-sequence when the model says so */
        zse_sampling s = greedy(MAX_OUT - 4, i % 2 == 0);
        result ref, got;
        run_seq(m, &p[i], &s, NULL, &ref, NULL);
        run_seq(m, &p[i], &s, &ngram, &got, &st);
        CHECK_MSG(same(&ref, &got), "ngram, prompt %d", i);
        ngram_accepted += st.accepted;
        CHECK(st.emitted == st.accepted + st.passes);
        run_seq(m, &p[i], &s, &by_other, &got, &st);
        CHECK_MSG(same(&ref, &got), "draft model, prompt %d", i);
        other_accepted += st.accepted;
        run_seq(m, &p[i], &s, &by_self, &got, &st);
        CHECK_MSG(same(&ref, &got), "self draft, prompt %d", i);
        CHECK_MSG(st.drafted > 0 && st.accepted == st.drafted, "self draft accepted %llu of %llu",
                  (unsigned long long)st.accepted, (unsigned long long)st.drafted);
    }
    CHECK(ngram_accepted > 0 && other_accepted > 0);
}

/* a context that fills up mid-draft: the same last token and finish as without drafts */
static void seq_context_end(const char *path, const prompt *p)
{
    zse_model *m = load(path, 48);
    if (!m)
        return;
    zse_spec_params ngram = {ZSE_SPEC_NGRAM, 8, NULL};
    prompt head = {p[0].ids, p[0].n < 30 ? p[0].n : 30};
    zse_sampling s = greedy(0, true); /* until the context is full */
    result ref, got;
    run_seq(m, &head, &s, NULL, &ref, NULL);
    run_seq(m, &head, &s, &ngram, &got, NULL);
    CHECK(same(&ref, &got));
    CHECK_EQ_INT(got.finish, ZSE_FINISH_LENGTH);
    CHECK_EQ_INT(got.n, 48 - (int)head.n);
    zse_model_free(m);
}

/* the engine: drafted and plain greedy requests in one step equal zse_seq alone; sampled
 * requests with drafts equal zse_seq with drafts and the same seed */
static void engine_mixed(zse_model *m, zse_model *other, const prompt *p)
{
    static const zse_spec_params modes[2] = {{ZSE_SPEC_NGRAM, 4, NULL}, {ZSE_SPEC_DRAFT, 4, NULL}};
    for (int k = 0; k < 2; k++) {
        zse_spec_params spec = modes[k];
        if (spec.mode == ZSE_SPEC_DRAFT)
            spec.draft = other;
        zse_engine_params ep = {.max_seqs = 2 * N_PROMPTS, .max_batch_tokens = 64, .max_queue = 2 * N_PROMPTS,
                                .spec = spec};
        zse_engine *e = zse_engine_start(m, &ep);
        CHECK_MSG(e != NULL, "%s", zse_last_error());
        if (!e)
            return;
        static result ref[2 * N_PROMPTS], got[2 * N_PROMPTS];
        zse_sampling sg = greedy(24, true), ss;
        zse_sampling_default(&ss);
        ss.temperature = 0.8f;
        ss.top_k = 20;
        ss.max_tokens = 16;
        ss.ignore_eos = true;
        for (int i = 0; i < N_PROMPTS; i++) {
            run_seq(m, &p[i], &sg, NULL, &ref[i], NULL);
            ss.seed = 100 + (uint64_t)i;
            run_seq(m, &p[i], &ss, &spec, &ref[N_PROMPTS + i], NULL);
        }
        memset(got, 0, sizeof got);
        pthread_mutex_lock(&mu);
        finals = 0;
        pthread_mutex_unlock(&mu);
        for (int i = 0; i < N_PROMPTS; i++) {
            CHECK(zse_engine_submit(e, p[i].ids, p[i].n, &sg, 0, on_token, &got[i], NULL) == 0);
            ss.seed = 100 + (uint64_t)i;
            CHECK(zse_engine_submit(e, p[i].ids, p[i].n, &ss, 0, on_token, &got[N_PROMPTS + i], NULL) == 0);
        }
        CHECK(wait_finals(2 * N_PROMPTS));
        int n_same = 0;
        for (int i = 0; i < 2 * N_PROMPTS; i++)
            n_same += same(&ref[i], &got[i]) && got[i].n_final == 1;
        CHECK_MSG(n_same == 2 * N_PROMPTS, "mode %d: %d of %d the same", k, n_same, 2 * N_PROMPTS);
        zse_engine_stats st;
        zse_engine_get_stats(e, &st);
        CHECK(st.spec.passes > 0 && st.spec.drafted > 0 && st.spec.accepted > 0);
        CHECK_EQ_INT(st.kv_blocks_used, 0);
        zse_engine_stop(e, 1);
    }
}

static void bad_input(zse_model *m, zse_model *foreign)
{
    zse_spec_params p = {ZSE_SPEC_NGRAM, 0, NULL};
    CHECK(zse_spec_check(m, &p) == -1 && strstr(zse_last_error(), "1..16"));
    p.tokens = 17;
    CHECK(zse_spec_check(m, &p) == -1 && strstr(zse_last_error(), "not 17"));
    p = (zse_spec_params){ZSE_SPEC_DRAFT, 4, NULL};
    CHECK(zse_spec_check(m, &p) == -1 && strstr(zse_last_error(), "--draft"));
    p.draft = foreign;
    CHECK(foreign && zse_spec_check(m, &p) == -1 && strstr(zse_last_error(), "tokenizer"));
    zse_engine_params ep = {.spec = p};
    CHECK(zse_engine_start(m, &ep) == NULL && strstr(zse_last_error(), "tokenizer"));
    zse_seq *q = zse_seq_new(m, NULL);
    CHECK(q && zse_seq_set_spec(q, &p) == -1);
    zse_seq_free(q);
}

static int convert(const char *dir, const char *out, int scheme)
{
    zse_convert_opts o = {.scheme = scheme, .embed_scheme = -1, .lm_head_scheme = -1, .force = true};
    if (zse_convert(dir, out, &o) != 0) {
        fprintf(stderr, "cannot convert %s: %s\n", dir, zse_last_error());
        return -1;
    }
    return 0;
}

int main(void)
{
    const char *data = test_env("ZSE_TEST_DATA");
    if (!data)
        data = "tests/fixtures";
    char dir[512], llama_dir[512], path[512], path8[512], path_l[512], eval[512];
    snprintf(dir, sizeof dir, "%s/tiny-qwen2", data);
    snprintf(llama_dir, sizeof llama_dir, "%s/tiny-llama", data);
    snprintf(eval, sizeof eval, "%s/eval.txt", data);
    snprintf(path, sizeof path, "/tmp/zse-test-spec-%d.zse", (int)getpid());
    snprintf(path8, sizeof path8, "/tmp/zse-test-spec8-%d.zse", (int)getpid());
    snprintf(path_l, sizeof path_l, "/tmp/zse-test-specl-%d.zse", (int)getpid());
    if (convert(dir, path, ZSE_SCHEME_F32) || convert(dir, path8, ZSE_SCHEME_Q8) || convert(llama_dir, path_l, ZSE_SCHEME_Q8))
        return 1;
    char *text = zse_read_file(eval, NULL);
    zse_model *m = load(path, 256), *m8 = load(path8, 256), *ml = load(path_l, 256);
    if (text && m && m8 && ml) {
        /* prompts of code from the eval text: enough repetition for the n-gram drafts */
        static prompt p[N_PROMPTS];
        size_t len = strlen(text);
        for (int i = 0; i < N_PROMPTS; i++) {
            char buf[400];
            snprintf(buf, sizeof buf, "%.*s", 120 + 40 * i, text + ((size_t)i * 1777) % (len / 2));
            CHECK(zse_tokenize(m, buf, strlen(buf), 0, &p[i].ids, &p[i].n) == 0 && p[i].n > 8);
        }
        seq_greedy(m, m8, p);
        seq_context_end(path, p);
        engine_mixed(m, m8, p);
        bad_input(m, ml);
        for (int i = 0; i < N_PROMPTS; i++)
            zse_free(p[i].ids);
    }
    zse_model_free(m);
    zse_model_free(m8);
    zse_model_free(ml);
    free(text);
    remove(path);
    remove(path8);
    remove(path_l);
    return test_main_end();
}
