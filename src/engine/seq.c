/* The sequence core: what every generating sequence holds, whether it is a zse_seq driven
 * by its caller (api.c: run, chat, perplexity, bench) or a request of the batching engine
 * (scheduler.c: serve). Token storage, the KV block table, host sampling against the
 * sequence's history and the acceptance of a sampled token live here once. */
#include "engine/engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
    q->lora_slot = -1;
    if (s && s->adapter && zse_adapter_cache(s->adapter) != m->lora)
        return zse_fail("the adapter belongs to another model");
    if (zse_kv_table_init(&q->kv, (m->ctx_size + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK) != 0)
        return -1;
    if (zse_gen_init(&q->gen, s, m->tok) != 0) {
        free(q->kv.blocks);
        memset(q, 0, sizeof *q);
        return -1;
    }
    q->gen.keep_ids = m->tool_marker_ids;
    q->gen.keep_texts = m->tool_marker_texts;
    q->gen.n_keep = m->n_tool_markers;
    if (q->gen.s.constraint) {
        /* speculative verification walks it through a step's drafts and back */
        zse_grammar *g = (zse_grammar *)q->gen.s.constraint;
        q->matcher = zse_matcher_new(g, ZSE_SPEC_MAX_TOKENS + 1);
        q->mask = zse_malloc((size_t)zse_grammar_mask_words(zse_grammar_vocab_of(g)) * sizeof *q->mask);
        if (!q->matcher || !q->mask) {
            zse_matcher_free(q->matcher);
            free(q->mask);
            zse_gen_free(&q->gen);
            free(q->kv.blocks);
            memset(q, 0, sizeof *q);
            return -1;
        }
    }
    q->gen.s.adapter = NULL; /* the sequence's own reference is q->adapter */
    if (s && s->adapter)
        q->adapter = zse_adapter_ref(s->adapter);
    return 0;
}

void zse_sequence_free(zse_sequence *q, zse_model *m)
{
    if (q->draft) { /* its mirror in the draft model (spec.c) */
        zse_sequence_free(q->draft, q->draft_model);
        free(q->draft);
    }
    if (q->kv.blocks) {
        pthread_mutex_lock(&m->run_lock);
        zse_kv_table_free(&q->kv, &m->blocks);
        pthread_mutex_unlock(&m->run_lock);
    }
    zse_sequence_unpin_adapter(q, m);
    zse_adapter_release(q->adapter);
    zse_gen_free(&q->gen);
    zse_matcher_free(q->matcher);
    free(q->mask);
    free(q->tokens);
    free(q->keys);
    memset(q, 0, sizeof *q);
}

void zse_sequence_unpin_adapter(zse_sequence *q, zse_model *m)
{
    if (q->adapter && q->lora_slot >= 0)
        zse_lora_unpin(m->lora, q->adapter);
    q->lora_slot = -1;
}

zse_lora_pin_state zse_sequence_pin_adapter(zse_sequence *q, zse_model *m, bool may_take_slot)
{
    if (!q->adapter || q->lora_slot >= 0)
        return ZSE_LORA_PINNED;
    const bool first = q->lora_wait_since == 0;
    int slot;
    zse_lora_pin_state st = zse_lora_pin(m->lora, q->adapter, may_take_slot, first, &slot, &q->lora_failures);
    if (first)
        q->lora_wait_since = zse_now();
    if (st == ZSE_LORA_PINNED) {
        q->lora_slot = slot;
        /* its blocks are computed with the adapter: keyed by it in the prefix cache */
        q->salt = zse_adapter_id(q->adapter);
        q->n_keys = 0;
        if (!first)
            zse_lora_note_wait(m->lora, zse_now() - q->lora_wait_since);
    }
    return st;
}

int zse_sequence_pin_adapter_wait(zse_sequence *q, zse_model *m)
{
    for (;;) {
        pthread_mutex_lock(&m->run_lock);
        zse_lora_pin_state st = zse_sequence_pin_adapter(q, m, true);
        pthread_mutex_unlock(&m->run_lock);
        if (st == ZSE_LORA_PINNED)
            return 0;
        if (st == ZSE_LORA_FAILED)
            return -1;
        if (st == ZSE_LORA_STARVED)
            return zse_fail("every adapter slot is in use by other sequences; load the model with more "
                            "(--max-gpu-loras)");
        /* read it here when nobody is reading it; otherwise a copy or the loader is on it */
        if (zse_lora_load_now(m->lora, q->adapter) != 0)
            continue; /* the failure is counted: the next pin reports it */
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
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
    if (q->n_published > q->kv.n_blocks)
        q->n_published = q->kv.n_blocks;
}

void zse_sequence_truncate(zse_sequence *q, zse_model *m, size_t n)
{
    zse_sequence_forget(q, m, n);
    if (q->n_tokens > n)
        q->n_tokens = n;
    if ((size_t)q->n_keys * ZSE_KV_BLOCK > n)
        q->n_keys = (int)(n / ZSE_KV_BLOCK);
}

/* ---- the prefix cache ------------------------------------------------------------------------ */

/* the keys of blocks [0, n_blocks) (all of whose tokens the sequence holds); -1 on no memory */
static int ensure_keys(zse_sequence *q, int n_blocks)
{
    if (n_blocks > q->cap_keys) {
        int cap = q->cap_keys ? q->cap_keys : 16;
        while (cap < n_blocks)
            cap *= 2;
        uint64_t *k = zse_realloc(q->keys, (size_t)cap * sizeof *k);
        if (!k)
            return -1;
        q->keys = k;
        q->cap_keys = cap;
    }
    for (int i = q->n_keys; i < n_blocks; i++)
        q->keys[i] = zse_block_key(i ? q->keys[i - 1] : 0, q->tokens + (size_t)i * ZSE_KV_BLOCK, q->salt);
    if (q->n_keys < n_blocks)
        q->n_keys = n_blocks;
    return 0;
}

static bool at_block_boundary(const zse_sequence *q)
{
    return q->n_cached % ZSE_KV_BLOCK == 0 && (size_t)q->kv.n_blocks * ZSE_KV_BLOCK == q->n_cached;
}

/* walks the cache from the sequence's first uncached block; fills found[] (may be NULL) */
static int walk_prefix(zse_sequence *q, const zse_model *m, int32_t *found, int *idle)
{
    *idle = 0;
    if (!m->blocks.key || !at_block_boundary(q) || q->n_tokens < 1)
        return 0;
    const int first = (int)(q->n_cached / ZSE_KV_BLOCK);
    /* the block of the last token is computed; a sequence past its context finds nothing
     * (reserving it fails with the context's error, cached or not) */
    const int last = (int)((q->n_tokens - 1) / ZSE_KV_BLOCK);
    if (q->n_tokens > (size_t)m->ctx_size || last > q->kv.max_blocks || last <= first || ensure_keys(q, last) != 0)
        return 0;
    int n = 0;
    for (int i = first; i < last; i++) {
        int32_t b = zse_block_find(&m->blocks, q->keys[i], i ? q->keys[i - 1] : 0, q->tokens + (size_t)i * ZSE_KV_BLOCK);
        if (b < 0)
            break;
        if (found)
            found[n] = b;
        *idle += m->blocks.ref[b] == 0;
        n++;
    }
    return n;
}

int zse_sequence_cached_prefix(zse_sequence *q, zse_model *m, int *idle) { return walk_prefix(q, m, NULL, idle); }

void zse_sequence_attach_prefix(zse_sequence *q, zse_model *m)
{
    if (!m->blocks.key || !at_block_boundary(q))
        return;
    int idle;
    /* found blocks go straight into the block table, which has room for the context */
    int n = walk_prefix(q, m, q->kv.blocks + q->kv.n_blocks, &idle);
    m->blocks.query_tokens += zse_sequence_pending(q);
    m->blocks.hit_tokens += (uint64_t)n * ZSE_KV_BLOCK;
    for (int i = 0; i < n; i++)
        zse_block_acquire(&m->blocks, q->kv.blocks[q->kv.n_blocks + i]);
    q->kv.n_blocks += n;
    q->n_cached += (size_t)n * ZSE_KV_BLOCK;
    if (q->n_published == q->kv.n_blocks - n) /* what it found is published already */
        q->n_published = q->kv.n_blocks;
}

void zse_sequence_publish(zse_sequence *q, zse_model *m)
{
    const int full = (int)(q->n_cached / ZSE_KV_BLOCK);
    if (!m->blocks.key || full <= q->n_published || ensure_keys(q, full) != 0)
        return;
    for (int i = q->n_published; i < full; i++)
        zse_block_publish(&m->blocks, q->kv.blocks[i], q->keys[i], i ? q->keys[i - 1] : 0,
                          q->tokens + (size_t)i * ZSE_KV_BLOCK);
    q->n_published = full;
}

bool zse_sequence_ctx_full(const zse_sequence *q, const zse_model *m)
{
    return q->n_tokens + 1 >= (size_t)m->ctx_size;
}

zse_history zse_sequence_history(const zse_sequence *q, size_t upto)
{
    size_t gen = upto > q->n_prompt ? upto - q->n_prompt : 0;
    return (zse_history){q->tokens, upto < q->n_prompt ? upto : q->n_prompt, q->tokens + q->n_prompt, gen};
}

/* -inf for every token the mask leaves out (32 at a time where a word is zero) */
static void apply_mask(float *logits, int vocab, const uint32_t *mask, int words)
{
    for (int w = 0; w < words; w++) {
        uint32_t bits = mask[w];
        if (bits == 0xFFFFFFFFu)
            continue;
        int base = w * 32, end = base + 32 < vocab ? base + 32 : vocab;
        for (int t = base; t < end; t++)
            if (!((bits >> (t - base)) & 1))
                logits[t] = -INFINITY;
    }
}

int zse_sequence_constrain(zse_sequence *q, const zse_model *m, float *logits, int generated)
{
    const zse_sampling *s = &q->gen.s;
    /* a grammar that is complete allows only an end: min_tokens gives way to it */
    const bool grammar_done = q->matcher && zse_matcher_must_end(q->matcher);
    if (generated < s->min_tokens && !grammar_done) { /* nothing may end generation yet */
        for (int i = 0; i < m->n_eos; i++)
            logits[m->eos[i]] = -INFINITY;
        for (int i = 0; i < s->n_stop_ids; i++)
            if (s->stop_ids[i] >= 0 && s->stop_ids[i] < m->vocab)
                logits[s->stop_ids[i]] = -INFINITY;
    }
    if (q->matcher) {
        const zse_grammar_vocab *v = zse_grammar_vocab_of((const zse_grammar *)s->constraint);
        int allowed = zse_mask_fill_timed(m, q->matcher, q->mask);
        if (allowed < 0)
            return -1;
        if (allowed == 0)
            return zse_fail("the constraint allows no token after %zu tokens", q->n_tokens);
        /* the model's rows past the tokenizer's vocabulary (padding) are never allowed */
        int gv = zse_grammar_vocab_size(v);
        apply_mask(logits, gv < m->vocab ? gv : m->vocab, q->mask, zse_grammar_mask_words(v));
        for (int t = gv; t < m->vocab; t++)
            logits[t] = -INFINITY;
    }
    return 0;
}

int32_t zse_sequence_sample(zse_sequence *q, const zse_model *m, float *logits, zse_sample_work *w,
                            zse_logprobs *lp)
{
    const bool want_lp = lp && (q->gen.s.logprobs || q->gen.s.top_logprobs > 0);
    if (want_lp)
        memcpy(w->raw, logits, (size_t)m->vocab * sizeof *logits);
    if (zse_sequence_constrain(q, m, logits, q->gen.generated) != 0)
        return -1;
    zse_history h = zse_sequence_history(q, q->n_tokens);
    int32_t t = zse_sample(&q->gen.s, logits, m->vocab, &h, &q->gen.rng, w->work_p, w->work_i);
    if (want_lp)
        zse_compute_logprobs(w->raw, m->vocab, t, q->gen.s.top_logprobs, lp);
    return t;
}

int zse_sequence_accept(zse_sequence *q, const zse_model *m, int32_t t, zse_buf *text, zse_finish *finish)
{
    q->sampled++;
    if (q->matcher) {
        int rc = zse_matcher_accept_token(q->matcher, t);
        if (rc != 0)
            return rc < 0 ? -1 : zse_fail("token %d does not follow the constraint (its mask was not applied)", t);
    }
    if (zse_gen_accept(&q->gen, t, zse_model_is_eos(m, t), zse_sequence_ctx_full(q, m), text, finish) != 0)
        return -1;
    /* the grammar is complete once it took its end: generation ends, ignore_eos or not */
    if (q->matcher && zse_matcher_ended(q->matcher) && *finish == ZSE_FINISH_NONE) {
        *finish = ZSE_FINISH_STOP;
        return 0;
    }
    /* the token joins the sequence (a later feed or step continues after it) while the
     * context has room; a stop token never does */
    if (*finish != ZSE_FINISH_STOP && q->n_tokens < (size_t)m->ctx_size)
        return zse_sequence_append(q, &t, 1);
    return 0;
}
