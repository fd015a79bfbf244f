/* From sampled tokens to text and a finish reason, for zse_seq and the engine alike: the
 * streaming detokenizer gives whole UTF-8 only, and text that could be the beginning of a
 * stop string is held back until the next token shows whether the stop string completes. */
#include "engine/engine.h"

#include <stdlib.h>
#include <string.h>

static void *dup_array(const void *src, size_t n, size_t size, int *rc)
{
    if (n == 0 || !src)
        return NULL;
    void *p = zse_malloc(n * size);
    if (!p)
        *rc = -1;
    else
        memcpy(p, src, n * size);
    return p;
}

int zse_gen_init(zse_gen *g, const zse_sampling *s, const zse_tokenizer *tok)
{
    memset(g, 0, sizeof *g);
    zse_sampling_default(&g->s);
    if (s)
        g->s = *s;
    /* the caller's arrays may go away after this call: keep copies */
    int rc = 0;
    int n_stop = g->s.stop ? g->s.n_stop : 0;
    g->s.stop = NULL;
    g->s.n_stop = 0;
    g->s.stop_ids = dup_array(g->s.stop_ids, g->s.stop_ids ? (size_t)g->s.n_stop_ids : 0, sizeof(int32_t), &rc);
    g->s.n_stop_ids = g->s.stop_ids ? g->s.n_stop_ids : 0;
    g->s.logit_bias = dup_array(g->s.logit_bias, g->s.logit_bias ? (size_t)g->s.n_logit_bias : 0,
                                sizeof(zse_logit_bias), &rc);
    g->s.n_logit_bias = g->s.logit_bias ? g->s.n_logit_bias : 0;
    if (g->s.top_logprobs > ZSE_MAX_TOP_LOGPROBS)
        g->s.top_logprobs = ZSE_MAX_TOP_LOGPROBS;
    if (g->s.top_logprobs < 0)
        g->s.top_logprobs = 0;
    if (g->s.prompt_top_logprobs > ZSE_MAX_TOP_LOGPROBS)
        g->s.prompt_top_logprobs = ZSE_MAX_TOP_LOGPROBS;
    if (g->s.prompt_top_logprobs < 0)
        g->s.prompt_top_logprobs = 0;
    if (g->s.min_tokens < 0)
        g->s.min_tokens = 0;
    if (rc == 0 && n_stop > 0) {
        g->stop = zse_calloc((size_t)n_stop, sizeof *g->stop);
        rc = g->stop ? 0 : -1;
        for (int i = 0; rc == 0 && i < n_stop; i++) {
            g->stop[i] = zse_strdup(s->stop[i] ? s->stop[i] : "");
            rc = g->stop[i] ? 0 : -1;
            g->s.n_stop = i + 1; /* zse_gen_free frees what was copied */
        }
        g->s.stop = (const char *const *)g->stop;
    }
    zse_rng_seed(&g->rng, g->s.seed);
    if (rc == 0 && !(g->detok = zse_tokenizer_stream_new(tok, true)))
        rc = -1;
    if (rc != 0)
        zse_gen_free(g);
    return rc;
}

void zse_gen_free(zse_gen *g)
{
    for (int i = 0; g->stop && i < g->s.n_stop; i++)
        free(g->stop[i]);
    free(g->stop);
    free((void *)g->s.stop_ids);
    free((void *)g->s.logit_bias);
    zse_tokenizer_stream_free(g->detok);
    zse_buf_free(&g->pending);
    memset(g, 0, sizeof *g);
}

int zse_gen_restart(zse_gen *g, const zse_tokenizer *tok)
{
    zse_tokenizer_stream *fresh = zse_tokenizer_stream_new(tok, true);
    if (!fresh)
        return -1;
    zse_tokenizer_stream_free(g->detok);
    g->detok = fresh;
    g->pending.len = 0;
    g->generated = 0;
    return 0;
}

/* moves text that can no longer start a stop string from pending to out; true when a stop
 * string completed (the text before it is released, the rest dropped) */
static int release_text(zse_gen *g, zse_buf *out, bool final, bool *stopped)
{
    const char *p = zse_buf_str(&g->pending);
    /* before min_tokens no stop string counts */
    const int n_stop = g->generated < g->s.min_tokens ? 0 : g->s.n_stop;
    const char *hit = zse_stop_find(p, g->pending.len, g->s.stop, n_stop);
    *stopped = hit != NULL;
    size_t emit, hold;
    if (hit) {
        emit = (size_t)(hit - p);
        hold = 0;
    } else {
        hold = final ? 0 : zse_stop_holdback(p, g->pending.len, g->s.stop, n_stop);
        emit = g->pending.len - hold;
    }
    if (zse_buf_append(out, p, emit) != 0)
        return -1;
    if (hold)
        memmove(g->pending.data, g->pending.data + emit, hold);
    g->pending.len = hold;
    if (g->pending.data)
        g->pending.data[hold] = '\0';
    return 0;
}

static bool is_stop_id(const zse_gen *g, int32_t t)
{
    for (int i = 0; i < g->s.n_stop_ids; i++)
        if (g->s.stop_ids[i] == t)
            return true;
    return false;
}

int zse_gen_accept(zse_gen *g, int32_t t, bool is_eos, bool ctx_full, zse_buf *out, zse_finish *finish)
{
    *finish = ZSE_FINISH_NONE;
    /* before min_tokens an end-of-sequence or stop id is just a token (the sampler keeps
     * them from being drawn, zse_sequence_sample) */
    const bool may_stop = g->generated >= g->s.min_tokens;
    if (may_stop && ((is_eos && !g->s.ignore_eos) || is_stop_id(g, t))) {
        /* the stop token adds no text; what was held back for a stop string that never
         * completed is released */
        bool stopped = false;
        *finish = ZSE_FINISH_STOP;
        zse_buf rest = {0};
        int rc = zse_tokenizer_stream_flush(g->detok, &rest) == 0 &&
                         zse_buf_append(&g->pending, rest.data ? rest.data : "", rest.len) == 0
                     ? release_text(g, out, true, &stopped)
                     : -1;
        zse_buf_free(&rest);
        return rc;
    }
    g->generated++;
    zse_buf piece = {0};
    int rc = zse_tokenizer_stream_push(g->detok, t, &piece);
    if (rc == 0)
        rc = zse_buf_append(&g->pending, piece.data ? piece.data : "", piece.len);
    for (int i = 0; rc == 0 && i < g->n_keep; i++) /* a kept special token: its text (the stream skipped it) */
        if (g->keep_ids[i] == t)
            rc = zse_buf_puts(&g->pending, g->keep_texts[i]);
    zse_buf_free(&piece);
    if (rc != 0)
        return -1;
    bool stopped = false;
    if (release_text(g, out, false, &stopped) != 0)
        return -1;
    if (stopped) {
        *finish = ZSE_FINISH_STOP;
        return 0;
    }
    if ((g->s.max_tokens > 0 && g->generated >= g->s.max_tokens) || ctx_full) {
        *finish = ZSE_FINISH_LENGTH;
        zse_buf rest = {0};
        rc = zse_tokenizer_stream_flush(g->detok, &rest);
        if (rc == 0)
            rc = zse_buf_append(&g->pending, rest.data ? rest.data : "", rest.len);
        zse_buf_free(&rest);
        if (rc == 0)
            rc = release_text(g, out, true, &stopped);
        if (stopped)
            *finish = ZSE_FINISH_STOP;
    }
    return rc;
}
