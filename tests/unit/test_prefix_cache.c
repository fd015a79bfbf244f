/* The prefix cache on a real fixture (tests/fixtures/tiny-qwen2 at f32, on the CPU):
 * - outputs with the cache equal outputs without it, greedy, alone and batched through the
 *   engine, with f16 and int8 KV, while most of each prompt is found in the cache;
 * - zse_seq: the same prompt fed twice gives bit-identical logits, and the second feed
 *   computes only the last block;
 * - 64 concurrent requests sharing a prefix with random cancels leave no block referenced
 *   and every block free or idle-cached; a small pool evicts and still answers right;
 * - a prompt longer than the context fails with the same error, cached or not. */
#include "fixture.h"
#include "test.h"

#include "engine/engine.h"
#include "format/format.h"
#include "zse.h"

#include <pthread.h>
#include <unistd.h>

#define N_REQ 64
#define MAX_OUT 8

typedef struct {
    int32_t ids[MAX_OUT];
    int n;
    int n_final;
    int cancel_after;
    zse_finish finish;
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
    bool keep = !(r->cancel_after && r->n >= r->cancel_after);
    if (ev->finish != ZSE_FINISH_NONE) {
        r->finish = ev->finish;
        r->n_final++;
        finals++;
        pthread_cond_broadcast(&cv);
    }
    pthread_mutex_unlock(&mu);
    return keep;
}

static void reset(result *r, int n)
{
    memset(r, 0, (size_t)n * sizeof *r);
    pthread_mutex_lock(&mu);
    finals = 0;
    pthread_mutex_unlock(&mu);
}

static bool wait_finals(int n)
{
    return test_wait_count(&mu, &cv, &finals, n, false);
}

typedef struct {
    int32_t *ids;
    size_t n;
} prompt;

/* a shared "system prompt" of about 70 tokens, then a distinct tail of 3..40 tokens */
static void make_prompts(zse_model *m, const char *text, prompt *p, int n)
{
    int32_t *sys;
    size_t n_sys;
    char head[400];
    snprintf(head, sizeof head, "%.300s", text);
    CHECK(zse_tokenize(m, head, strlen(head), 0, &sys, &n_sys) == 0 && n_sys > 40);
    size_t len = strlen(text);
    for (int i = 0; i < n; i++) {
        char buf[256];
        snprintf(buf, sizeof buf, "%.*s", 10 + (i * 37) % 120, text + 400 + ((size_t)i * 977) % (len / 2));
        int32_t *tail;
        size_t n_tail;
        CHECK(zse_tokenize(m, buf, strlen(buf), 0, &tail, &n_tail) == 0);
        p[i].ids = zse_malloc((n_sys + n_tail) * sizeof *p[i].ids);
        memcpy(p[i].ids, sys, n_sys * sizeof *sys);
        memcpy(p[i].ids + n_sys, tail, n_tail * sizeof *tail);
        p[i].n = n_sys + n_tail;
        zse_free(tail);
    }
    zse_free(sys);
}

static zse_model *load(const char *path, int max_seqs, uint64_t kv_bytes, zse_kv_type kv, bool cache)
{
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.threads = 2;
    lp.max_seqs = max_seqs;
    lp.kv_cache_bytes = kv_bytes;
    lp.kv_type = kv;
    lp.ctx_size = 256;
    lp.no_prefix_cache = !cache;
    zse_model *m = zse_model_load(path, &lp);
    CHECK_MSG(m != NULL, "%s", zse_last_error());
    return m;
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

static void run_alone(zse_model *m, const prompt *p, const zse_sampling *s, result *r)
{
    zse_seq *q = zse_seq_new(m, s);
    CHECK(q && zse_seq_feed(q, p->ids, p->n) == 0);
    zse_finish fin = ZSE_FINISH_NONE;
    while (q && fin == ZSE_FINISH_NONE && r->n < MAX_OUT) {
        int32_t t;
        char *piece;
        if (zse_seq_next(q, &t, &piece, &fin) != 0)
            break;
        r->ids[r->n++] = t;
        zse_free(piece);
    }
    zse_seq_free(q);
}

static bool same(const result *a, const result *b)
{
    return a->n == b->n && memcmp(a->ids, b->ids, (size_t)a->n * sizeof a->ids[0]) == 0;
}

/* every block is free or idle in the cache: nothing is referenced, nothing lost */
static void check_pool_settled(zse_model *m)
{
    CHECK_EQ_INT(zse_block_pool_used(&m->blocks), 0);
    CHECK_EQ_INT(zse_block_pool_available(&m->blocks), m->blocks.n_blocks);
    int refs = 0;
    for (int b = 0; b < m->blocks.n_blocks; b++)
        refs += m->blocks.ref[b] != 0;
    CHECK_EQ_INT(refs, 0);
}

/* cache on equals cache off, alone and batched, for one KV type, over n prompts */
static void equal_with_and_without(const char *path, const prompt *p, zse_kv_type kv, int n)
{
    zse_model *off = load(path, n, 0, kv, false), *on = load(path, n, 0, kv, true);
    if (!off || !on) {
        zse_model_free(off);
        zse_model_free(on);
        return;
    }
    static result ref[N_REQ], alone[N_REQ], batched[N_REQ];
    zse_sampling s = greedy(MAX_OUT);
    reset(ref, n);
    reset(alone, n);
    for (int i = 0; i < n; i++) {
        run_alone(off, &p[i], &s, &ref[i]);
        run_alone(on, &p[i], &s, &alone[i]);
    }
    CHECK_EQ_INT((int)off->blocks.hit_tokens, 0);
    CHECK_MSG(on->blocks.hit_tokens >= (uint64_t)(n - 1) * 48, "only %llu prompt tokens hit",
              (unsigned long long)on->blocks.hit_tokens);
    int n_same = 0;
    for (int i = 0; i < n; i++)
        n_same += same(&ref[i], &alone[i]);
    CHECK_EQ_INT(n_same, n);

    /* batched: the engine over the same cache (its blocks already warm, and more published
     * as the requests run), small steps so prompts prefill in chunks beside decodes */
    zse_engine_params ep = {.max_seqs = n, .max_batch_tokens = 96, .max_queue = n};
    zse_engine *e = zse_engine_start(on, &ep);
    CHECK(e != NULL);
    reset(batched, n);
    for (int i = 0; e && i < n; i++)
        CHECK(zse_engine_submit(e, p[i].ids, p[i].n, &s, 0, on_token, &batched[i], NULL) == 0);
    CHECK(wait_finals(n));
    n_same = 0;
    for (int i = 0; i < n; i++)
        n_same += same(&ref[i], &batched[i]) && batched[i].n_final == 1;
    CHECK_EQ_INT(n_same, n);
    zse_engine_stats st;
    zse_engine_get_stats(e, &st);
    CHECK(st.prefix_hit_tokens > 0 && st.prefix_query_tokens >= st.prefix_hit_tokens && st.prefix_cached_blocks > 0);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    zse_engine_stop(e, 1);
    check_pool_settled(on);
    zse_model_free(off);
    zse_model_free(on);
}

/* zse_seq: a prompt fed twice: bit-identical logits, and only its last block recomputed */
static void seq_repeat(const char *path, const prompt *p)
{
    zse_model *m = load(path, 2, 0, ZSE_KV_F16, true);
    if (!m)
        return;
    zse_sampling s = greedy(4);
    s.logprobs = true; /* logits to the host */
    zse_seq *a = zse_seq_new(m, &s), *b = zse_seq_new(m, &s);
    size_t vocab = (size_t)m->vocab;
    float *first = zse_malloc(vocab * sizeof *first);
    CHECK(a && b && first && zse_seq_feed(a, p[0].ids, p[0].n) == 0);
    const float *la = zse_seq_logits(a);
    CHECK(la != NULL);
    if (la)
        memcpy(first, la, vocab * sizeof *first);
    uint64_t hits0 = m->blocks.hit_tokens;
    CHECK(zse_seq_feed(b, p[0].ids, p[0].n) == 0);
    uint64_t hit = m->blocks.hit_tokens - hits0;
    /* every full block before the last token's */
    CHECK_EQ_INT((int)hit, (int)((p[0].n - 1) / ZSE_KV_BLOCK * ZSE_KV_BLOCK));
    const float *lb = zse_seq_logits(b);
    CHECK(lb && memcmp(lb, first, vocab * sizeof *first) == 0);
    /* the two sequences share those blocks: a and b hold them, the pool counts them once */
    int shared = (int)(p[0].n - 1) / ZSE_KV_BLOCK, total = (int)(p[0].n + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK;
    CHECK_EQ_INT(zse_block_pool_used(&m->blocks), 2 * total - shared);
    /* truncating one (chat's /reset) leaves the other's blocks in place */
    CHECK(zse_seq_truncate(a, 0) == 0);
    CHECK_EQ_INT(zse_block_pool_used(&m->blocks), total);
    zse_seq_free(a);
    zse_seq_free(b);
    check_pool_settled(m);
    free(first);
    zse_model_free(m);
}

/* 64 concurrent requests over one prefix, random cancels, a pool too small for all of them
 * (preemption and eviction): every request ends once, nothing stays referenced, and the
 * ones that ran to the end said what they say alone */
static void shared_prefix_with_cancels(const char *path, const prompt *p)
{
    /* a block of this model at f16: 2 * 4 layers * 2 KV heads * 16 * 16 dims * 2 bytes */
    zse_model *m = load(path, N_REQ, 48 * 8192, ZSE_KV_F16, true);
    zse_model *ref_m = load(path, 1, 0, ZSE_KV_F16, false);
    if (!m || !ref_m) {
        zse_model_free(m);
        zse_model_free(ref_m);
        return;
    }
    zse_sampling s = greedy(MAX_OUT);
    static result ref[N_REQ], got[N_REQ];
    reset(ref, N_REQ);
    for (int i = 0; i < N_REQ; i++)
        run_alone(ref_m, &p[i], &s, &ref[i]);
    zse_engine_params ep = {.max_seqs = 16, .max_batch_tokens = 128, .max_queue = N_REQ};
    zse_engine *e = zse_engine_start(m, &ep);
    CHECK(e != NULL);
    reset(got, N_REQ);
    uint64_t ids[N_REQ];
    unsigned st = 7;
    for (int i = 0; e && i < N_REQ; i++) {
        st = st * 1664525u + 1013904223u;
        if ((st >> 20) % 4 == 0)
            got[i].cancel_after = 1 + (int)((st >> 8) % 5); /* the client goes away */
        CHECK(zse_engine_submit(e, p[i].ids, p[i].n, &s, 0, on_token, &got[i], &ids[i]) == 0);
    }
    for (int i = 0; e && i < N_REQ; i += 9) /* and some are cancelled from outside */
        zse_engine_cancel(e, ids[i]);
    CHECK(wait_finals(N_REQ));
    int finished = 0, n_same = 0;
    for (int i = 0; i < N_REQ; i++) {
        CHECK_EQ_INT(got[i].n_final, 1);
        if (got[i].finish == ZSE_FINISH_LENGTH) {
            finished++;
            n_same += same(&ref[i], &got[i]);
        }
    }
    CHECK(finished > N_REQ / 2);
    CHECK_EQ_INT(n_same, finished);
    zse_engine_stats es;
    zse_engine_get_stats(e, &es);
    CHECK(es.prefix_hit_tokens > 0);
    CHECK_EQ_INT(es.kv_blocks_used, 0);
    zse_engine_stop(e, 1);
    CHECK(m->blocks.evictions > 0);
    check_pool_settled(m);
    zse_model_free(m);
    zse_model_free(ref_m);
}

/* a prompt past the context: the same error whether or not its head is cached */
static void too_long(const char *path, const prompt *p)
{
    zse_model *m = load(path, 1, 0, ZSE_KV_F16, true);
    if (!m)
        return;
    int32_t *longp = zse_malloc(300 * sizeof *longp);
    for (int i = 0; i < 300; i++)
        longp[i] = p[0].ids[i % p[0].n];
    zse_seq *q = zse_seq_new(m, NULL);
    CHECK(q && zse_seq_feed(q, longp, 200) == 0); /* its first 200 tokens are cached now */
    zse_seq_free(q);
    q = zse_seq_new(m, NULL);
    CHECK(q && zse_seq_feed(q, longp, 300) == -1);
    CHECK(strstr(zse_last_error(), "300 tokens is longer than the context of 256") != NULL);
    CHECK(q && zse_seq_length(q) == 0);
    zse_seq_free(q);
    zse_engine *e = zse_engine_start(m, NULL);
    result r;
    CHECK(e && zse_engine_submit(e, longp, 300, NULL, 0, on_token, &r, NULL) == -1);
    CHECK(strstr(zse_last_error(), "300 tokens, more than the context of 256") != NULL);
    zse_engine_stop(e, 1);
    check_pool_settled(m);
    free(longp);
    zse_model_free(m);
}

int main(void)
{
    char path[512], eval[512];
    test_fixture_path("eval.txt", eval, sizeof eval);
    if (test_convert_fixture("tiny-qwen2", "prefix", path, sizeof path) != 0)
        return 1;
    char *text = zse_read_file(eval, NULL);
    CHECK(text != NULL);
    zse_model *tok_m = text ? load(path, 1, 0, ZSE_KV_F16, false) : NULL;
    if (tok_m) {
        static prompt p[N_REQ];
        make_prompts(tok_m, text, p, N_REQ);
        zse_model_free(tok_m);
        equal_with_and_without(path, p, ZSE_KV_F16, 24);
        equal_with_and_without(path, p, ZSE_KV_INT8, 12);
        seq_repeat(path, p);
        shared_prefix_with_cancels(path, p);
        too_long(path, p);
        for (int i = 0; i < N_REQ; i++)
            free(p[i].ids);
    }
    free(text);
    remove(path);
    return test_main_end();
}
