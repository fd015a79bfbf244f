/* Speculative decoding: drafts proposed after a sequence's last token, checked in one pass
 * of the model, kept as far as the model agrees. Shared by zse_seq (api.c) and the engine
 * (scheduler.c); docs/ARCHITECTURE.md §Speculative decoding says how a step goes.
 *
 * Drafts are always proposed with certainty (the n-gram continuation, the draft model's
 * argmax), so verification is the rule for a point-mass proposal: greedy keeps a draft
 * while it is the model's argmax, sampling keeps draft x with probability p(x) and on
 * rejection draws from p without x. Either way the output is distributed exactly as
 * decoding without drafts (and, greedy, is the same tokens). */
#include "engine/engine.h"

#include <stdlib.h>
#include <string.h>

/* n-gram sizes prompt lookup tries, longest first */
#define NGRAM_MAX 4
#define NGRAM_MIN 1

int zse_spec_check(const zse_model *target, const zse_spec_params *p)
{
    if (!p || p->mode == ZSE_SPEC_OFF)
        return 0;
    if (p->mode != ZSE_SPEC_NGRAM && p->mode != ZSE_SPEC_DRAFT)
        return zse_fail("unknown speculative decoding mode %d (ngram or a draft model)", (int)p->mode);
    if (p->tokens < 1 || p->tokens > ZSE_SPEC_MAX_TOKENS)
        return zse_fail("--spec-tokens must be 1..%d draft tokens a step, not %d", ZSE_SPEC_MAX_TOKENS, p->tokens);
    if (p->mode == ZSE_SPEC_NGRAM)
        return 0;
    const zse_model *d = p->draft;
    if (!d)
        return zse_fail("speculative decoding with a draft model needs the draft model (--draft FILE)");
    /* the same tokenizer: the same vocabulary, token for token (the embedding tables may be
     * padded to different sizes, as Qwen2.5's 0.5B and 7B are) */
    int nt = zse_tokenizer_n_vocab(target->tok), nd = zse_tokenizer_n_vocab(d->tok);
    if (nt != nd)
        return zse_fail("the draft model %s has a vocabulary of %d tokens, the model %s %d: a draft model must "
                        "share the model's tokenizer",
                        d->name, nd, target->name, nt);
    for (int32_t i = 0; i < nt; i++) {
        const char *a = zse_tokenizer_token_text(target->tok, i), *b = zse_tokenizer_token_text(d->tok, i);
        if ((a || b) && (!a || !b || strcmp(a, b) != 0))
            return zse_fail("the draft model %s's token %d is \"%s\", the model %s's \"%s\": a draft model must "
                            "share the model's tokenizer",
                            d->name, (int)i, b ? b : "", target->name, a ? a : "");
    }
    return 0;
}

int zse_spec_init(zse_spec *sp, const zse_spec_params *p)
{
    memset(sp, 0, sizeof *sp);
    if (p)
        sp->p = *p;
    return 0;
}

void zse_spec_free(zse_spec *sp)
{
    zse_batcher_free(&sp->batcher);
    free(sp->entries);
    free(sp->ids);
    free(sp->who);
    free(sp->stopped);
    memset(sp, 0, sizeof *sp);
}

int zse_spec_room(const zse_spec *sp, const zse_sequence *q, const zse_model *m)
{
    if (!zse_spec_on(sp) || zse_sequence_pending(q) != 1 || q->n_draft || q->n_tokens <= q->n_prompt)
        return 0;
    int room = sp->p.tokens;
    /* a pass gives the drafts kept plus one more token, and the pending token already
     * counts as generated: what goes past max_tokens is wasted */
    if (q->gen.s.max_tokens > 0) {
        int left = q->gen.s.max_tokens - q->gen.generated - 1;
        room = left < room ? left : room;
    }
    /* every draft and the token after the last one need a position in the context */
    long ctx_left = (long)m->ctx_size - (long)q->n_tokens - 1;
    if (ctx_left < room)
        room = (int)(ctx_left > 0 ? ctx_left : 0);
    return room > 0 ? room : 0;
}

void zse_spec_drop(zse_sequence *q)
{
    q->n_tokens -= (size_t)q->n_draft;
    q->n_draft = 0;
}

static int append_draft(zse_sequence *q, int32_t t)
{
    if (zse_sequence_append(q, &t, 1) != 0)
        return -1;
    q->n_draft++;
    return 0;
}

/* ---- prompt lookup ------------------------------------------------------------------------- */

/* The tokens that followed the latest earlier occurrence of the sequence's last n tokens,
 * for the longest n that occurs; appends up to want of them. Where that continuation runs
 * into the end of the sequence it goes on with the drafts themselves: text that repeats
 * with period p is drafted as repeating further. */
static int propose_ngram(zse_sequence *q, int want)
{
    const int32_t *t = q->tokens;
    const size_t len = q->n_tokens;
    for (int n = NGRAM_MAX; n >= NGRAM_MIN; n--) {
        if (len < (size_t)n + 1)
            continue;
        const int32_t *suffix = t + len - n;
        /* latest first: start where the match ends just before the suffix */
        for (size_t end = len - 1; end >= (size_t)n; end--) {
            if (t[end - 1] != suffix[n - 1] || memcmp(t + end - n, suffix, (size_t)n * sizeof *t) != 0)
                continue;
            for (int k = 0; k < want; k++) {
                /* q->tokens may move as drafts are appended: index it afresh */
                if (append_draft(q, q->tokens[end + (size_t)k]) != 0)
                    return -1;
            }
            return 0;
        }
    }
    return 0;
}

/* ---- a draft model ---------------------------------------------------------------------------- */

static int grow_scratch(zse_spec *sp, int n)
{
    if (n <= sp->cap)
        return 0;
    zse_step_seq *e = zse_realloc(sp->entries, (size_t)n * sizeof *e);
    if (!e)
        return -1;
    sp->entries = e;
    int32_t *ids = zse_realloc(sp->ids, (size_t)n * sizeof *ids);
    if (!ids)
        return -1;
    sp->ids = ids;
    int *who = zse_realloc(sp->who, (size_t)n * sizeof *who);
    if (!who)
        return -1;
    sp->who = who;
    bool *stopped = zse_realloc(sp->stopped, (size_t)n * sizeof *stopped);
    if (!stopped)
        return -1;
    sp->stopped = stopped;
    sp->cap = n;
    return 0;
}

/* The mirror of q in the draft model holds q's tokens: what they share stays (with its
 * K/V), the rest is replaced. Draft run_lock held. */
static int sync_mirror(zse_sequence *q, zse_model *dm)
{
    if (!q->draft) {
        zse_sequence *d = zse_calloc(1, sizeof *d);
        if (!d || zse_sequence_init(d, dm, NULL) != 0) {
            free(d);
            return -1;
        }
        q->draft = d;
        q->draft_model = dm;
    }
    zse_sequence *d = q->draft;
    size_t common = 0, lim = d->n_tokens < q->n_tokens ? d->n_tokens : q->n_tokens;
    while (common < lim && d->tokens[common] == q->tokens[common])
        common++;
    /* the last token always runs again: its logits give the first draft (the K/V it stores
     * again only ever feed drafts, which verification checks) */
    if (common == q->n_tokens && common > 0)
        common--;
    zse_sequence_truncate(d, dm, common);
    return zse_sequence_append(d, q->tokens + common, q->n_tokens - common);
}

/* One pass of the draft model over the mirrors still drafting: each runs its pending tokens
 * (as many as the pass holds: a long catch-up takes several passes), with an out row for
 * those whose last pending token runs. Returns the entries placed (sp->entries, sp->who), 0
 * when none could be, -1 on an error. */
static int mirror_pass(zse_spec *sp, zse_model *dm, zse_sequence **qs, const int *want, int n)
{
    /* a row for every sequence of the pass: grown once to what the caller drafts for */
    int budget = zse_llm_max_tokens(dm->llm), rows = zse_llm_max_out(dm->llm), n_e = 0;
    if (rows < n && rows < budget && zse_llm_reserve(dm->llm, budget, n < budget ? n : budget) == 0)
        rows = zse_llm_max_out(dm->llm);
    for (int i = 0; i < n && budget > 0 && rows > 0; i++) {
        zse_sequence *d = qs[i]->draft;
        if (sp->stopped[i] || qs[i]->n_draft >= want[i])
            continue;
        int take = (int)zse_sequence_pending(d);
        take = take < budget ? take : budget;
        if (zse_sequence_reserve(d, dm, d->n_cached + (size_t)take) != 0) {
            sp->stopped[i] = true; /* its KV does not fit: it drafts nothing more this step */
            continue;
        }
        budget -= take;
        bool last = d->n_cached + (size_t)take == d->n_tokens;
        rows -= last;
        sp->entries[n_e] = (zse_step_seq){.q = d, .take = take, .n_out = last ? 1 : 0, .out = -1};
        sp->who[n_e++] = i;
    }
    if (n_e == 0)
        return 0;
    zse_batch b;
    if (zse_batcher_pack(&sp->batcher, sp->entries, n_e, &b) != 0 ||
        (b.n_out ? zse_llm_forward_argmax(dm->llm, dm->kv, &b, NULL, sp->ids) : zse_llm_forward(dm->llm, dm->kv, &b, NULL)) != 0)
        return -1;
    for (int k = 0; k < n_e; k++) {
        sp->entries[k].q->n_cached += (size_t)sp->entries[k].take;
        zse_sequence_publish(sp->entries[k].q, dm);
    }
    return n_e;
}

/* The draft model's greedy continuation of each sequence: its mirror catches up on what it
 * has not seen, then gives one token a pass; a draft outside the target's vocabulary (a
 * padded embedding row) ends that sequence's drafting. */
static int propose_draft_model(zse_spec *sp, zse_model *dm, const zse_model *target, zse_sequence **qs,
                               const int *want, int n)
{
    if (grow_scratch(sp, n) != 0)
        return -1;
    const int32_t limit = target->vocab < zse_tokenizer_n_vocab(target->tok) ? target->vocab
                                                                                : zse_tokenizer_n_vocab(target->tok);
    pthread_mutex_lock(&dm->run_lock);
    int rc = 0;
    for (int i = 0; i < n; i++)
        sp->stopped[i] = want[i] <= 0 || sync_mirror(qs[i], dm) != 0;
    for (int ran; rc == 0 && (ran = mirror_pass(sp, dm, qs, want, n)) != 0;) {
        if (ran < 0) {
            rc = -1;
            break;
        }
        for (int k = 0, r = 0; k < ran && rc == 0; k++) {
            if (!sp->entries[k].n_out) /* still catching up */
                continue;
            int32_t t = sp->ids[r++];
            int i = sp->who[k];
            if (t < 0 || t >= limit)
                sp->stopped[i] = true;
            else if (append_draft(qs[i], t) != 0 || zse_sequence_append(qs[i]->draft, &t, 1) != 0)
                rc = -1;
        }
    }
    pthread_mutex_unlock(&dm->run_lock);
    return rc;
}

int zse_spec_propose(zse_spec *sp, const zse_model *target, zse_sequence **qs, const int *want, int n)
{
    if (sp->p.mode == ZSE_SPEC_NGRAM) {
        for (int i = 0; i < n; i++)
            if (want[i] > 0 && propose_ngram(qs[i], want[i]) != 0)
                return -1;
        return 0;
    }
    if (sp->p.mode == ZSE_SPEC_DRAFT)
        return propose_draft_model(sp, sp->p.draft, target, qs, want, n);
    return 0;
}

/* ---- verification ------------------------------------------------------------------------------ */

int zse_spec_verify(zse_spec *sp, zse_sequence *q, const zse_model *m, float *logits, const int32_t *ids,
                    zse_sample_work *w, int32_t *out, zse_logprobs *lps)
{
    const int n_draft = q->n_draft;
    const size_t base = q->n_cached; /* the pending token's position */
    const int32_t *drafts = q->tokens + base + 1;
    const bool want_lp = lps && logits && (q->gen.s.logprobs || q->gen.s.top_logprobs > 0);
    int n_out = 0, advanced = 0, rc = 0;
    for (int i = 0; i <= n_draft && rc == 0; i++) {
        bool accepted = false;
        int32_t t;
        if (!logits) { /* plain greedy: the argmax of each row */
            t = ids[i];
            accepted = i < n_draft && t == drafts[i];
        } else {
            float *row = logits + (size_t)i * (size_t)m->vocab;
            if (want_lp)
                memcpy(w->raw, row, (size_t)m->vocab * sizeof *row);
            /* the row's token follows the pending token and the drafts before it (a
             * constraint's matcher has been walked through them) */
            if ((rc = zse_sequence_constrain(q, m, row, q->gen.generated + i)) != 0)
                break;
            zse_history h = zse_sequence_history(q, base + 1 + (size_t)i);
            zse_dist d;
            zse_sample_dist(&q->gen.s, row, m->vocab, &h, w->work_p, w->work_i, &d);
            t = i < n_draft ? zse_dist_verify(&d, w->work_p, w->work_i, drafts[i], &q->gen.rng, &accepted)
                            : d.greedy ? d.argmax : zse_dist_draw(&d, w->work_p, w->work_i, zse_rng_uniform(&q->gen.rng));
            zse_dist_release(&d, w->work_i);
            if (want_lp)
                zse_compute_logprobs(w->raw, m->vocab, t, q->gen.s.top_logprobs, &lps[n_out]);
        }
        out[n_out++] = t;
        if (!accepted)
            break;
        if (q->matcher && i < n_draft && (rc = zse_matcher_accept_token(q->matcher, t)) == 0)
            advanced++;
    }
    /* the kept tokens go through zse_sequence_accept, which walks the matcher itself */
    if (q->matcher && advanced)
        zse_matcher_rollback(q->matcher, advanced);
    /* the constraint failed at the first row: an id no accept takes ends the sequence with
     * the error; past it, the drafts kept so far stand */
    if (rc != 0 && n_out == 0)
        out[n_out++] = -1;
    sp->stats.drafted += (uint64_t)n_draft;
    sp->stats.accepted += (uint64_t)(n_out - 1);
    sp->stats.passes++;
    sp->stats.emitted += (uint64_t)n_out;
    zse_spec_drop(q);
    q->n_cached = base + 1;
    return n_out;
}
