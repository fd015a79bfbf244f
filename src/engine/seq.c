/* The sequence core: what every generating sequence holds, whether it is a zse_seq driven
 * by its caller (api.c: run, chat, perplexity, bench) or a request of the batching engine
 * (scheduler.c: serve). Token storage, the KV block table, host sampling against the
 * sequence's history and the acceptance of a sampled token live here once. */
#include "engine/engine.h"

#include <stdlib.h>
#include <string.h>

int zse_sample_work_init(zse_sample_work *w, int vocab)
{
    w->raw = zse_malloc((size_t)vocab * sizeof *w->raw);
    w->work_p = zse_malloc((size_t)vocab * sizeof *w->work_p);
    w->work_i = zse_calloc((size_t)vocab, sizeof *w->work_i);
    if (!w->raw || !w->work_p || !w->work_i) {
        zse_sample_work_free(w);
        return -1;
    }
    return 0;
}

void zse_sample_work_free(zse_sample_work *w)
{
    free(w->raw);
    free(w->work_p);
    free(w->work_i);
    memset(w, 0, sizeof *w);
}

int zse_sequence_init(zse_sequence *q, const zse_model *m, const zse_sampling *s)
{
    memset(q, 0, sizeof *q);
    if (zse_kv_table_init(&q->kv, (m->ctx_size + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK) != 0)
        return -1;
    if (zse_gen_init(&q->gen, s, m->tok) != 0) {
        free(q->kv.blocks);
        memset(q, 0, sizeof *q);
        return -1;
    }
    return 0;
}

void zse_sequence_free(zse_sequence *q, zse_model *m)
{
    if (q->kv.blocks) {
        pthread_mutex_lock(&m->run_lock);
        zse_kv_table_free(&q->kv, &m->blocks);
        pthread_mutex_unlock(&m->run_lock);
    }
    zse_gen_free(&q->gen);
    free(q->tokens);
    memset(q, 0, sizeof *q);
}

int zse_sequence_append(zse_sequence *q, const int32_t *ids, size_t n)
{
    if (q->n_tokens + n > q->cap_tokens) {
        size_t cap = q->cap_tokens ? q->cap_tokens : 64;
        while (cap < q->n_tokens + n)
            cap *= 2;
        int32_t *p = zse_realloc(q->tokens, cap * sizeof *p);
        if (!p)
            return -1;
        q->tokens = p;
        q->cap_tokens = cap;
    }
    memcpy(q->tokens + q->n_tokens, ids, n * sizeof *ids);
    q->n_tokens += n;
    return 0;
}

int zse_sequence_reserve(zse_sequence *q, zse_model *m, size_t n_tokens)
{
    if (n_tokens > (size_t)m->ctx_size)
        return zse_fail("a sequence of %zu tokens is longer than the context of %d", n_tokens, m->ctx_size);
    return zse_kv_table_reserve(&q->kv, &m->blocks, n_tokens);
}

int zse_sequence_blocks_needed(const zse_sequence *q, size_t n_tokens)
{
    return zse_kv_table_blocks_needed(&q->kv, n_tokens);
}

void zse_sequence_forget(zse_sequence *q, zse_model *m, size_t n)
{
    zse_kv_table_truncate(&q->kv, &m->blocks, n);
    if (q->n_cached > n)
        q->n_cached = n;
}

bool zse_sequence_ctx_full(const zse_sequence *q, const zse_model *m)
{
    return q->n_tokens + 1 >= (size_t)m->ctx_size;
}

int32_t zse_sequence_sample(zse_sequence *q, const zse_model *m, float *logits, zse_sample_work *w,
                            zse_logprobs *lp)
{
    const bool want_lp = lp && (q->gen.s.logprobs || q->gen.s.top_logprobs > 0);
    if (want_lp)
        memcpy(w->raw, logits, (size_t)m->vocab * sizeof *logits);
    zse_history h = {q->tokens, q->n_prompt, q->tokens + q->n_prompt, q->n_tokens - q->n_prompt};
    int32_t t = zse_sample(&q->gen.s, logits, m->vocab, &h, &q->gen.rng, w->work_p, w->work_i);
    if (want_lp)
        zse_compute_logprobs(w->raw, m->vocab, t, q->gen.s.top_logprobs, lp);
    return t;
}

int zse_sequence_accept(zse_sequence *q, const zse_model *m, int32_t t, zse_buf *text, zse_finish *finish)
{
    q->sampled++;
    if (zse_gen_accept(&q->gen, t, zse_model_is_eos(m, t), zse_sequence_ctx_full(q, m), text, finish) != 0)
        return -1;
    /* the token joins the sequence (a later feed or step continues after it) while the
     * context has room; a stop token never does */
    if (*finish != ZSE_FINISH_STOP && q->n_tokens < (size_t)m->ctx_size)
        return zse_sequence_append(q, &t, 1);
    return 0;
}
