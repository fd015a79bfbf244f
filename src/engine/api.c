/* include/zse.h, the sequence half: zse_seq, one sequence driven by its caller (run, chat,
 * perplexity, bench, the C API). It is a zse_sequence (seq.c) run one pass at a time through
 * the same batch building and output choice as the engine's steps (step.c): prefill in
 * chunks, then one token a call. The logits of the last fed position stay where the model
 * left them until asked for: a plain-greedy sequence takes their argmax there instead. */
#include "engine/engine.h"

#include "model/model.h"

#include <stdio.h>
#include <string.h>

/* rows of logits per pass when every position's logits are wanted (perplexity) */
#define ALL_LOGITS_ROWS 64
#define SPEC_ROWS (1 + ZSE_SPEC_MAX_TOKENS)

/* a token verified by a speculative pass, waiting for its zse_seq_next call */
typedef struct {
    int32_t token;
    char *text;
    zse_finish finish;
} ready_token;

struct zse_seq {
    zse_model *m;
    zse_sequence q;
    zse_batcher batcher;
    zse_sample_work work;
    zse_spec spec;
    ready_token ready[SPEC_ROWS];
    int n_ready, next_ready;
    float *logits;          /* vocab; SPEC_ROWS * vocab with speculative decoding */
    bool have_logits;       /* the last fed token's logits exist: on the host, or ... */
    bool logits_on_host;    /* ... only in the model's buffer, with their argmax in next_id
                             * (plain greedy sampling: they need not leave a GPU) */
    int32_t next_id;
    uint64_t logits_step;   /* the model's step counter when they were computed */
};

zse_seq *zse_seq_new(zse_model *m, const zse_sampling *s)
{
    zse_seq *q = zse_calloc(1, sizeof *q);
    if (!q)
        return NULL;
    q->m = m;
    if (zse_sequence_init(&q->q, m, s) != 0) {
        free(q);
        return NULL;
    }
    q->logits = zse_malloc((size_t)m->vocab * sizeof *q->logits);
    if (!q->logits || zse_sample_work_init(&q->work, m->vocab) != 0) {
        zse_seq_free(q);
        return NULL;
    }
    return q;
}

static void drop_ready(zse_seq *q)
{
    for (int i = q->next_ready; i < q->n_ready; i++)
        free(q->ready[i].text);
    q->n_ready = q->next_ready = 0;
}

void zse_seq_free(zse_seq *q)
{
    if (!q)
        return;
    drop_ready(q);
    zse_spec_free(&q->spec);
    zse_sequence_free(&q->q, q->m);
    zse_batcher_free(&q->batcher);
    zse_sample_work_free(&q->work);
    free(q->logits);
    free(q);
}

size_t zse_seq_length(const zse_seq *q) { return q->q.n_cached; }
const int32_t *zse_seq_tokens(const zse_seq *q) { return q->q.tokens; }

/* Runs the sequence's pending tokens through the model in chunks (run_lock held); the last
 * row's logits land in q->logits (or their argmax in next_id), and every row's in
 * all_logits [n][vocab] when it is given. */
static int run_pending(zse_seq *q, float *all_logits)
{
    zse_model *m = q->m;
    const size_t vocab = (size_t)m->vocab, n = zse_sequence_pending(&q->q);
    const size_t max_chunk = all_logits ? (size_t)zse_llm_max_out(m->llm) : ZSE_PREFILL_CHUNK;
    for (size_t done = 0; done < n;) {
        int chunk = (int)(n - done < max_chunk ? n - done : max_chunk);
        bool last = done + (size_t)chunk == n;
        zse_step_seq e = {.q = &q->q, .take = chunk, .n_out = all_logits ? chunk : last ? 1 : 0, .out = -1};
        zse_batch b;
        if (zse_batcher_pack(&q->batcher, &e, 1, &b) != 0)
            return -1;
        float *dst = all_logits ? all_logits + done * vocab : q->logits;
        /* plain greedy: the next token is the argmax, taken where the logits are */
        bool argmax_only = last && !all_logits && zse_step_out_mode(m, &e, 1, false) == ZSE_OUT_ARGMAX;
        zse_row_masks masks;
        if (argmax_only && zse_batcher_masks(m, &q->batcher, &e, 1, &masks) != 0)
            return -1;
        if (argmax_only ? zse_llm_forward_argmax(m->llm, m->kv, &b, &masks, &q->next_id) != 0
                        : zse_llm_forward(m->llm, m->kv, &b, dst) != 0)
            return -1;
        if (last) {
            q->logits_on_host = !argmax_only;
            q->logits_step = zse_llm_steps(m->llm);
        }
        if (all_logits && last)
            memcpy(q->logits, dst + (size_t)(chunk - 1) * vocab, vocab * sizeof *dst);
        q->q.n_cached += (size_t)chunk;
        done += (size_t)chunk;
    }
    q->have_logits = true;
    return 0;
}

/* appends ids (when given) and runs every pending token */
static int feed(zse_seq *q, const int32_t *ids, size_t n, float *all_logits)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= q->m->vocab)
            return zse_fail("token id %d at %zu is outside the vocabulary (0..%d)", ids[i], i, q->m->vocab - 1);
    /* its adapter in a slot first (read from disk and copied now when it is not) */
    if (zse_sequence_pin_adapter_wait(&q->q, q->m) != 0)
        return -1;
    if (n && zse_sequence_append(&q->q, ids, n) != 0)
        return -1;
    if (zse_sequence_pending(&q->q) == 0)
        return 0;
    zse_model *m = q->m;
    pthread_mutex_lock(&m->run_lock);
    if (all_logits && zse_llm_max_out(m->llm) < ALL_LOGITS_ROWS &&
        zse_llm_reserve(m->llm, zse_llm_max_tokens(m->llm), ALL_LOGITS_ROWS) != 0)
        zse_log(ZSE_LOG_WARN, "%s; going on %d rows at a time", zse_error_message(), zse_llm_max_out(m->llm));
    /* a prompt's leading blocks may be in the prefix cache (not when every position's logits
     * are wanted: they must all be computed) */
    if (!all_logits && zse_sequence_pending(&q->q) > ZSE_KV_BLOCK)
        zse_sequence_attach_prefix(&q->q, m);
    int rc = zse_sequence_reserve(&q->q, m, q->q.n_tokens);
    if (rc == 0)
        rc = run_pending(q, all_logits);
    zse_sequence_publish(&q->q, m);
    pthread_mutex_unlock(&m->run_lock);
    if (rc != 0) /* what was not run is not part of the sequence */
        q->q.n_tokens = q->q.n_cached;
    if (rc == 0 && q->q.gen.generated == 0)
        q->q.n_prompt = q->q.n_tokens;
    return rc;
}

int zse_seq_feed(zse_seq *q, const int32_t *ids, size_t n) { return feed(q, ids, n, NULL); }

int zse_seq_feed_logits(zse_seq *q, const int32_t *ids, size_t n, float *logits)
{
    return feed(q, ids, n, logits);
}

/* Brings logits left in the model's buffer to the host: read them while no other step has
 * run since, else run the last token again (its K/V are stored again, unchanged) */
static int logits_to_host(zse_seq *q)
{
    if (q->logits_on_host)
        return 0;
    zse_model *m = q->m;
    pthread_mutex_lock(&m->run_lock);
    int rc;
    if (zse_llm_steps(m->llm) == q->logits_step) {
        rc = zse_llm_read_logits(m->llm, 1, q->logits);
    } else {
        q->q.n_cached--;
        zse_step_seq e = {.q = &q->q, .take = 1, .n_out = 1, .out = -1};
        zse_batch b;
        rc = zse_batcher_pack(&q->batcher, &e, 1, &b);
        if (rc == 0)
            rc = zse_llm_forward(m->llm, m->kv, &b, q->logits);
        q->q.n_cached++;
    }
    pthread_mutex_unlock(&m->run_lock);
    if (rc == 0)
        q->logits_on_host = true;
    return rc;
}

const float *zse_seq_logits(zse_seq *q)
{
    if (!q->have_logits || logits_to_host(q) != 0)
        return NULL;
    return q->logits;
}

/* One speculative pass (run_lock taken here): drafts after the pending token, one forward
 * over both with a row each, verification; the kept tokens are accepted and queued in
 * q->ready. Without room for drafts it is a plain one-token pass. */
static int spec_step(zse_seq *q)
{
    zse_model *m = q->m;
    zse_sequence *sq = &q->q;
    int want = zse_spec_room(&q->spec, sq, m);
    if (want > 0 && zse_spec_propose(&q->spec, m, &sq, &want, 1) != 0) {
        zse_log(ZSE_LOG_WARN, "speculative decoding: drafting failed (%s); going on without", zse_error_message());
        zse_spec_drop(sq);
    }
    pthread_mutex_lock(&m->run_lock);
    int rows = 1 + sq->n_draft, rc = 0;
    if (zse_llm_max_out(m->llm) < SPEC_ROWS)
        rc = zse_llm_reserve(m->llm, zse_llm_max_tokens(m->llm), SPEC_ROWS);
    if (rc == 0 && zse_sequence_reserve(sq, m, sq->n_tokens) != 0) {
        zse_spec_drop(sq); /* no KV room for the drafts: the pending token alone */
        rows = 1;
        rc = zse_sequence_reserve(sq, m, sq->n_tokens);
    }
    zse_step_seq e = {.q = sq, .take = rows, .n_out = rows, .out = -1};
    zse_batch b;
    int32_t ids[SPEC_ROWS];
    bool argmax = zse_step_out_mode(m, &e, 1, false) == ZSE_OUT_ARGMAX;
    if (rc == 0)
        rc = zse_batcher_pack(&q->batcher, &e, 1, &b);
    zse_row_masks masks = {0};
    if (rc == 0 && argmax)
        rc = zse_batcher_masks(m, &q->batcher, &e, 1, &masks);
    if (rc == 0)
        rc = argmax ? zse_llm_forward_argmax(m->llm, m->kv, &b, &masks, ids)
                    : zse_llm_forward(m->llm, m->kv, &b, q->logits);
    pthread_mutex_unlock(&m->run_lock);
    if (rc != 0) {
        zse_spec_drop(sq);
        return -1;
    }
    int32_t out[SPEC_ROWS];
    int n = zse_spec_verify(&q->spec, sq, m, argmax ? NULL : q->logits, argmax ? ids : NULL, &q->work, out, NULL);
    q->have_logits = false;
    for (int k = 0; k < n; k++) {
        zse_buf text = {0};
        zse_finish fin;
        if (zse_sequence_accept(sq, m, out[k], &text, &fin) != 0 || zse_buf_reserve(&text, 1) != 0) {
            zse_buf_free(&text);
            return -1;
        }
        text.data[text.len] = '\0';
        if (k < n - 1 && fin == ZSE_FINISH_NONE)
            sq->n_cached++; /* an accepted draft: its K/V came with the pass */
        q->ready[q->n_ready++] = (ready_token){out[k], text.data, fin};
        if (fin != ZSE_FINISH_NONE)
            break;
    }
    return 0;
}

int zse_seq_next(zse_seq *q, int32_t *token, char **text_piece, zse_finish *finish)
{
    *finish = ZSE_FINISH_NONE;
    *text_piece = NULL;
    if (q->next_ready < q->n_ready) { /* verified by the last speculative pass */
        ready_token *r = &q->ready[q->next_ready++];
        *token = r->token;
        *text_piece = r->text;
        *finish = r->finish;
        if (q->next_ready == q->n_ready)
            q->n_ready = q->next_ready = 0;
        if (*finish != ZSE_FINISH_NONE && q->q.n_tokens > q->q.n_cached)
            return feed(q, NULL, 0, NULL); /* a finished sequence continues from its last token */
        return 0;
    }
    if (!q->have_logits) {
        if (zse_spec_on(&q->spec) && zse_sequence_pending(&q->q) == 1)
            return spec_step(q) != 0 ? -1 : zse_seq_next(q, token, text_piece, finish);
        return zse_fail("feed a prompt before generating");
    }
    int32_t t;
    if (!q->logits_on_host && zse_sampling_plain_greedy(&q->q.gen.s)) {
        t = q->next_id;
    } else {
        if (logits_to_host(q) != 0)
            return -1;
        t = zse_sequence_sample(&q->q, q->m, q->logits, &q->work, NULL);
    }
    *token = t;
    q->have_logits = false;
    zse_buf out = {0};
    if (zse_sequence_accept(&q->q, q->m, t, &out, finish) != 0 || zse_buf_reserve(&out, 1) != 0) {
        zse_buf_free(&out);
        return -1;
    }
    /* the token runs now, unless speculative decoding runs it with its drafts next call */
    if ((!zse_spec_on(&q->spec) || *finish != ZSE_FINISH_NONE) && feed(q, NULL, 0, NULL) != 0) {
        zse_buf_free(&out);
        return -1;
    }
    out.data[out.len] = '\0';
    *text_piece = out.data;
    return 0;
}

int zse_seq_set_spec(zse_seq *q, const zse_spec_params *p)
{
    if (zse_spec_check(q->m, p) != 0)
        return -1;
    if (p && p->mode != ZSE_SPEC_OFF) {
        float *l = zse_realloc(q->logits, (size_t)SPEC_ROWS * (size_t)q->m->vocab * sizeof *l);
        if (!l)
            return -1;
        q->logits = l;
    }
    zse_spec_free(&q->spec);
    return zse_spec_init(&q->spec, p);
}

void zse_seq_get_spec_stats(const zse_seq *q, zse_spec_stats *out) { *out = q->spec.stats; }

int zse_seq_truncate(zse_seq *q, size_t length)
{
    if (length > q->q.n_cached)
        return zse_fail("cannot truncate a sequence of %zu tokens to %zu", q->q.n_cached, length);
    drop_ready(q);
    pthread_mutex_lock(&q->m->run_lock);
    zse_sequence_truncate(&q->q, q->m, length);
    pthread_mutex_unlock(&q->m->run_lock);
    q->have_logits = false;
    /* what follows is a new prompt: generation counts, stop-string state, the detokenizer
     * and the constraint's grammar start over */
    q->q.n_prompt = length;
    if (q->q.matcher)
        zse_matcher_reset(q->q.matcher);
    return zse_gen_restart(&q->q.gen, q->m->tok);
}
