/* One forward pass over several sequences: the flattened batch (tokens, positions, KV
 * slots, block tables, the rows that need logits) and the choice of what the pass hands
 * back. zse_seq's prefill and decode (api.c) and the engine's steps (scheduler.c) build
 * their passes here, so a sequence runs the same way alone or batched. */
#include "engine/engine.h"

#include <stdlib.h>
#include <string.h>

void zse_batcher_free(zse_batcher *b)
{
    free(b->tokens);
    free(b->pos);
    free(b->seq);
    free(b->slots);
    free(b->rows);
    free(b->lens);
    free(b->adapters);
    free(b->table);
    free(b->mask_rows);
    free(b->mask_bits);
    memset(b, 0, sizeof *b);
}

static int grow_i32(int32_t **p, size_t n)
{
    int32_t *q = zse_realloc(*p, (n ? n : 1) * sizeof *q);
    if (!q)
        return -1;
    *p = q;
    return 0;
}

static int batcher_reserve(zse_batcher *b, size_t tokens, size_t seqs, size_t table)
{
    if (tokens > b->tok_cap) {
        if (grow_i32(&b->tokens, tokens) || grow_i32(&b->pos, tokens) || grow_i32(&b->seq, tokens) ||
            grow_i32(&b->slots, tokens) || grow_i32(&b->rows, tokens))
            return -1;
        b->tok_cap = tokens;
    }
    if (seqs > b->seq_cap) {
        if (grow_i32(&b->lens, seqs) || grow_i32(&b->adapters, seqs))
            return -1;
        b->seq_cap = seqs;
    }
    if (table > b->table_cap) {
        if (grow_i32(&b->table, table))
            return -1;
        b->table_cap = table;
    }
    return 0;
}

int zse_batcher_pack(zse_batcher *b, zse_step_seq *e, int n, zse_batch *out)
{
    size_t n_tokens = 0;
    int width = 1;
    for (int s = 0; s < n; s++) {
        n_tokens += (size_t)e[s].take;
        if (e[s].q->kv.n_blocks > width)
            width = e[s].q->kv.n_blocks;
    }
    if (batcher_reserve(b, n_tokens, (size_t)n, (size_t)n * (size_t)width) != 0)
        return -1;
    int t = 0, n_out = 0;
    uint32_t lora_modules = 0;
    for (int s = 0; s < n; s++) {
        const zse_sequence *q = e[s].q;
        /* a sequence runs with its adapter, whose slot it pins, never without it */
        if (q->adapter && q->lora_slot < 0)
            return zse_fail("a sequence was stepped before its adapter was in a slot");
        b->adapters[s] = q->adapter ? q->lora_slot : -1;
        if (b->adapters[s] >= 0)
            lora_modules |= zse_adapter_modules(q->adapter);
        for (int k = 0; k < e[s].take; k++, t++) {
            size_t pos = q->n_cached + (size_t)k;
            b->tokens[t] = q->tokens[pos];
            b->pos[t] = (int32_t)pos;
            b->seq[t] = s;
            b->slots[t] = zse_kv_slot(&q->kv, pos);
        }
        b->lens[s] = (int32_t)(q->n_cached + (size_t)e[s].take);
        int32_t *row = b->table + (size_t)s * (size_t)width;
        for (int k = 0; k < width; k++)
            row[k] = k < q->kv.n_blocks ? q->kv.blocks[k] : -1;
        int want = e[s].n_out < e[s].take ? e[s].n_out : e[s].take;
        e[s].out = want > 0 ? n_out : -1;
        for (int k = want; k > 0; k--)
            b->rows[n_out++] = t - k;
    }
    *out = (zse_batch){(int)n_tokens, b->tokens, b->pos, b->seq, b->slots, n, b->lens, b->table, width, n_out,
                       b->rows, lora_modules ? b->adapters : NULL, lora_modules};
    return 0;
}

zse_out_mode zse_step_out_mode(const zse_model *m, const zse_step_seq *e, int n, bool allow_sampled)
{
    bool any = false, greedy = true, on_device = allow_sampled && zse_llm_can_sample(m->llm);
    for (int s = 0; s < n; s++) {
        if (e[s].n_out <= 0 || e[s].take <= 0)
            continue;
        any = true;
        /* prompt scoring wants logits; a constrained row goes to the device only where the
         * backend applies masks, and one row a sequence (drafts walk the matcher) */
        if (e[s].logits || (e[s].q->matcher && (!zse_llm_can_mask(m->llm) || e[s].n_out > 1)))
            return ZSE_OUT_LOGITS;
        greedy = greedy && zse_sampling_plain_greedy(&e[s].q->gen.s);
        /* drafts are verified against their rows on the host (rejection sampling) */
        on_device = on_device && e[s].n_out == 1 && zse_sampling_on_device(&e[s].q->gen.s);
    }
    if (!any)
        return ZSE_OUT_LOGITS;
    return greedy ? ZSE_OUT_ARGMAX : on_device ? ZSE_OUT_SAMPLED : ZSE_OUT_LOGITS;
}

int zse_batcher_masks(const zse_model *m, zse_batcher *b, const zse_step_seq *e, int n, zse_row_masks *out)
{
    *out = (zse_row_masks){0};
    int n_masked = 0;
    int64_t words = 0;
    for (int s = 0; s < n; s++)
        if (e[s].q->matcher && e[s].out >= 0) {
            n_masked++;
            words = zse_grammar_mask_words(zse_grammar_vocab_of((const zse_grammar *)e[s].q->gen.s.constraint));
        }
    if (n_masked == 0)
        return 0;
    if ((size_t)n_masked > b->mask_cap) {
        if (grow_i32(&b->mask_rows, (size_t)n_masked) != 0)
            return -1;
        b->mask_cap = (size_t)n_masked;
    }
    size_t need = (size_t)n_masked * (size_t)words;
    if (need > b->mask_bits_cap) {
        uint32_t *p = zse_realloc(b->mask_bits, need * sizeof *p);
        if (!p)
            return -1;
        b->mask_bits = p;
        b->mask_bits_cap = need;
    }
    int k = 0;
    for (int s = 0; s < n; s++) {
        const zse_sequence *q = e[s].q;
        if (!q->matcher || e[s].out < 0)
            continue;
        /* every constraint of a model masks over the same vocabulary, hence one width */
        int allowed = zse_mask_fill_timed(m, q->matcher, b->mask_bits + (size_t)k * (size_t)words);
        if (allowed < 0)
            return -1;
        if (allowed == 0)
            return zse_fail("the constraint allows no token after %zu tokens", q->n_tokens);
        b->mask_rows[k++] = e[s].out + e[s].n_out - 1;
    }
    *out = (zse_row_masks){k, b->mask_rows, b->mask_bits, words};
    return 0;
}
