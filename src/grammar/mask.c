/* Token masks. For each grammar position (a byte-class element where a stack top can
 * stand) the vocabulary is classified once, whatever lies below the position's frame
 * (XGrammar's context-independent tokens):
 *   accepted  — the token's bytes are consumed inside the frame (or end exactly as it ends);
 *   rejected  — every path dies inside the frame;
 *   uncertain — a path leaves the frame with bytes left: decided per step against the real
 *               stack, from the offset where it left.
 * The classification walks the vocabulary trie once per position (computed on first use,
 * published with a compare-and-swap, so a grammar is shared between threads without locks).
 * A step's mask is then the OR of its tops' accepted sets plus the few uncertain tokens
 * that the real stacks let through. */
#include "grammar/grammar.h"

#include <stdlib.h>
#include <string.h>

void gr_cache_free(gr_pos_cache *c)
{
    if (!c)
        return;
    free(c->accepted_bits);
    free(c->accepted_ids);
    free(c->uncertain_ids);
    free(c->uncertain_from);
    free(c);
}

typedef struct {
    int32_t *ids;
    uint16_t *from;
    uint32_t n, cap;
} id_list;

static int list_add(id_list *l, int32_t id, uint16_t from, bool with_from)
{
    if (l->n == l->cap) {
        uint32_t cap = l->cap ? l->cap * 2 : 256;
        int32_t *ids = zse_realloc(l->ids, (size_t)cap * sizeof *ids);
        if (!ids)
            return -1;
        l->ids = ids;
        if (with_from) {
            uint16_t *f = zse_realloc(l->from, (size_t)cap * sizeof *f);
            if (!f)
                return -1;
            l->from = f;
        }
        l->cap = cap;
    }
    l->ids[l->n] = id;
    if (with_from)
        l->from[l->n] = from;
    l->n++;
    return 0;
}

/* every token ending at trie node i (duplicates of the same bytes included) */
static int add_tokens(const zse_grammar_vocab *v, uint32_t node, id_list *l, uint16_t from, bool with_from)
{
    for (int32_t t = v->trie[node].token; t >= 0; t = v->dup_next[t])
        if (list_add(l, t, from, with_from))
            return -1;
    return 0;
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : x > y;
}

/* classifies the vocabulary at position elem (a GE_CLASS element) */
static gr_pos_cache *compute_cache(const zse_grammar *g, uint32_t elem)
{
    const zse_grammar_vocab *v = g->vocab;
    gr_store s;
    gr_store_init(&s);
    id_list acc = {0}, unc = {0};
    uint32_t max_depth = 1;
    for (uint32_t i = 0; i < v->n_trie; i++)
        if (v->trie[i].depth > max_depth)
            max_depth = v->trie[i].depth;
    /* per depth d: the set after d bytes, the scratch in use once it is made, the first depth (< d)
     * where a path left the frame (0: none) and whether more than one did */
    gr_set *sets = zse_calloc(max_depth + 1, sizeof *sets);
    uint32_t *mark = zse_calloc(max_depth + 1, sizeof *mark);
    uint16_t *first_esc = zse_calloc(max_depth + 2, sizeof *first_esc);
    bool *multi_esc = zse_calloc(max_depth + 2, sizeof *multi_esc);
    gr_pos_cache *c = NULL;
    if (!sets || !mark || !first_esc || !multi_esc)
        goto out;
    /* the start: one stack, (elem, BOTTOM) */
    if (gr_close(g, &s, elem, GR_BOTTOM, &sets[0]))
        goto out;
    mark[0] = s.n_scratch;
    uint32_t i = 0;
    while (i < v->n_trie) {
        const gr_trie_node *nd = &v->trie[i];
        uint32_t d = nd->depth;
        gr_set *prev = &sets[d - 1], *cur = &sets[d];
        uint16_t fe = first_esc[d]; /* a path left the frame after fe bytes (0: none) */
        bool me = multi_esc[d];
        s.n_scratch = mark[d - 1]; /* drop the nodes of the previous sibling's set at depth d */
        if (gr_advance(g, &s, prev, nd->byte, cur))
            goto out;
        mark[d] = s.n_scratch;
        /* escapes seen up to and including this depth, for the nodes below */
        uint16_t fe_next = fe;
        bool me_next = me;
        if (cur->escaped) {
            if (fe_next == 0)
                fe_next = (uint16_t)d;
            else
                me_next = true;
        }
        if (d + 1 <= max_depth) {
            first_esc[d + 1] = fe_next;
            multi_esc[d + 1] = me_next;
        }
        bool alive = cur->n > 0 || cur->accept;
        if (nd->token >= 0) {
            if (alive || cur->escaped) {
                if (add_tokens(v, i, &acc, 0, false))
                    goto out;
            } else if (fe) {
                if (add_tokens(v, i, &unc, me ? 0 : fe, true))
                    goto out;
            }
        }
        if (cur->n == 0 && fe_next == 0) {
            i = nd->end; /* every token below is rejected */
            continue;
        }
        if (cur->n == 0) {
            /* dead inside the frame but left it before: the subtree is uncertain */
            for (uint32_t j = i + 1; j < nd->end; j++)
                if (v->trie[j].token >= 0 && add_tokens(v, j, &unc, me_next ? 0 : fe_next, true))
                    goto out;
            i = nd->end;
            continue;
        }
        i++;
    }
    c = zse_calloc(1, sizeof *c);
    if (!c)
        goto out;
    int words = zse_grammar_mask_words(v);
    if (acc.n > (uint32_t)words) {
        c->accepted_bits = zse_calloc((size_t)words, sizeof *c->accepted_bits);
        if (!c->accepted_bits)
            goto fail_c;
        for (uint32_t k = 0; k < acc.n; k++)
            c->accepted_bits[acc.ids[k] >> 5] |= 1u << (acc.ids[k] & 31);
        free(acc.ids);
    } else {
        qsort(acc.ids, acc.n, sizeof *acc.ids, cmp_i32);
        c->accepted_ids = acc.ids;
    }
    acc.ids = NULL;
    c->n_accepted = acc.n;
    c->uncertain_ids = unc.ids;
    c->uncertain_from = unc.from;
    c->n_uncertain = unc.n;
    unc.ids = NULL;
    unc.from = NULL;
    goto out;
fail_c:
    free(c);
    c = NULL;
out:
    if (sets)
        for (uint32_t d = 0; d <= max_depth; d++)
            gr_set_free(&sets[d]);
    free(sets);
    free(mark);
    free(first_esc);
    free(multi_esc);
    free(acc.ids);
    free(unc.ids);
    free(unc.from);
    gr_store_free(&s);
    return c;
}

const gr_pos_cache *gr_cache_get(const zse_grammar *g, uint32_t elem)
{
    gr_pos_cache *c = atomic_load_explicit(&g->caches[elem], memory_order_acquire);
    if (c)
        return c;
    c = compute_cache(g, elem);
    if (!c)
        return NULL;
    gr_pos_cache *expected = NULL;
    if (!atomic_compare_exchange_strong_explicit(&g->caches[elem], &expected, c, memory_order_acq_rel,
                                                 memory_order_acquire)) {
        gr_cache_free(c); /* another thread finished first */
        return expected;
    }
    return c;
}
