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
    free(c->uncertain_lcp);
    free(c);
}

typedef struct {
    const uint8_t *rest;
    uint32_t len;
    int32_t id;
    uint16_t from;
} unc_entry;

/* whole checks first, then by the bytes after the frame is left */
static int cmp_unc(const void *a, const void *b)
{
    const unc_entry *x = a, *y = b;
    if ((x->from == 0) != (y->from == 0))
        return x->from == 0 ? -1 : 1;
    uint32_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->rest, y->rest, n);
    if (c)
        return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

/* sorts the uncertain tokens so that a step checks their rests as a trie walk */
static int order_uncertain(const zse_grammar_vocab *v, gr_pos_cache *c)
{
    uint32_t n = c->n_uncertain;
    if (!n)
        return 0;
    unc_entry *e = zse_malloc(n * sizeof *e);
    c->uncertain_lcp = zse_malloc(n * sizeof *c->uncertain_lcp);
    if (!e || !c->uncertain_lcp) {
        free(e);
        return -1;
    }
    for (uint32_t k = 0; k < n; k++) {
        int32_t id = c->uncertain_ids[k];
        uint16_t from = c->uncertain_from[k];
        e[k] = (unc_entry){v->bytes[id] + from, v->lens[id] - from, id, from};
    }
    qsort(e, n, sizeof *e, cmp_unc);
    c->n_whole = 0;
    for (uint32_t k = 0; k < n; k++) {
        c->uncertain_ids[k] = e[k].id;
        c->uncertain_from[k] = e[k].from;
        c->n_whole += e[k].from == 0;
        uint32_t l = 0;
        if (k > 0 && e[k].from && e[k - 1].from)
            while (l < e[k].len && l < e[k - 1].len && l < 65535 && e[k].rest[l] == e[k - 1].rest[l])
                l++;
        c->uncertain_lcp[k] = (uint16_t)l;
    }
    free(e);
    return 0;
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

/* The sets of stacks met while classifying one position, made canonical (nodes interned,
 * tops sorted) and numbered, with the byte transitions between them memoized: a string
 * body or a number reaches a handful of distinct sets, so walking the trie costs a table
 * lookup per node instead of a closure (a lazily built DFA). */
typedef struct {
    uint32_t off, n;
    bool accept, escaped;
} dfa_set;

typedef struct {
    const zse_grammar *g;
    gr_store s;
    uint32_t *pool;
    uint32_t n_pool, cap_pool;
    dfa_set *sets;
    uint32_t n_sets, cap_sets;
    uint32_t *set_hash; /* id + 1 */
    uint32_t set_hcap;
    uint64_t *tr_key;
    uint32_t *tr_val; /* next set id + 1; 0 = empty slot */
    uint32_t tr_cap, tr_used;
    gr_set in, out;
} dfa;

static void dfa_free(dfa *d)
{
    gr_store_free(&d->s);
    free(d->pool);
    free(d->sets);
    free(d->set_hash);
    free(d->tr_key);
    free(d->tr_val);
    free(d->out.tops);
}

static uint32_t set_hash_of(const uint32_t *tops, uint32_t n, bool accept, bool escaped)
{
    uint64_t h = 1469598103934665603ull ^ (accept ? 1 : 0) ^ (escaped ? 2 : 0);
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ tops[i]) * 1099511628211ull;
    return (uint32_t)(h ^ h >> 32);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int set_rehash(dfa *d)
{
    uint32_t cap = d->set_hcap ? d->set_hcap * 2 : 256;
    uint32_t *h = zse_calloc(cap, sizeof *h);
    if (!h)
        return -1;
    for (uint32_t i = 0; i < d->n_sets; i++) {
        const dfa_set *x = &d->sets[i];
        uint32_t k = set_hash_of(d->pool + x->off, x->n, x->accept, x->escaped) & (cap - 1);
        while (h[k])
            k = (k + 1) & (cap - 1);
        h[k] = i + 1;
    }
    free(d->set_hash);
    d->set_hash = h;
    d->set_hcap = cap;
    return 0;
}

/* the id of the set `cur` (scratch tops are made persistent first); -1 on failure */
static int64_t dfa_intern(dfa *d, const gr_set *cur)
{
    if (gr_grow((void **)&d->pool, &d->cap_pool, d->n_pool + cur->n, sizeof *d->pool))
        return -1;
    uint32_t *tops = d->pool + d->n_pool;
    for (uint32_t i = 0; i < cur->n; i++) {
        int64_t id = gr_persist(&d->s, cur->tops[i]);
        if (id < 0)
            return -1;
        tops[i] = (uint32_t)id;
    }
    d->s.n_scratch = 0;
    qsort(tops, cur->n, sizeof *tops, cmp_u32);
    if ((d->n_sets + 1) * 2 > d->set_hcap && set_rehash(d))
        return -1;
    uint32_t k = set_hash_of(tops, cur->n, cur->accept, cur->escaped) & (d->set_hcap - 1);
    while (d->set_hash[k]) {
        const dfa_set *x = &d->sets[d->set_hash[k] - 1];
        if (x->n == cur->n && x->accept == cur->accept && x->escaped == cur->escaped &&
            !memcmp(d->pool + x->off, tops, (size_t)cur->n * sizeof *tops))
            return d->set_hash[k] - 1;
        k = (k + 1) & (d->set_hcap - 1);
    }
    if (gr_grow((void **)&d->sets, &d->cap_sets, d->n_sets + 1, sizeof *d->sets))
        return -1;
    d->sets[d->n_sets] = (dfa_set){d->n_pool, cur->n, cur->accept, cur->escaped};
    d->n_pool += cur->n;
    d->set_hash[k] = d->n_sets + 1;
    return d->n_sets++;
}

static int tr_rehash(dfa *d)
{
    uint32_t cap = d->tr_cap ? d->tr_cap * 2 : 1024;
    uint64_t *key = zse_malloc((size_t)cap * sizeof *key);
    uint32_t *val = zse_calloc(cap, sizeof *val);
    if (!key || !val) {
        free(key);
        free(val);
        return -1;
    }
    for (uint32_t i = 0; i < d->tr_cap; i++) {
        if (!d->tr_val[i])
            continue;
        uint32_t k = (uint32_t)((d->tr_key[i] * 0x9E3779B97F4A7C15ull) >> 32) & (cap - 1);
        while (val[k])
            k = (k + 1) & (cap - 1);
        key[k] = d->tr_key[i];
        val[k] = d->tr_val[i];
    }
    free(d->tr_key);
    free(d->tr_val);
    d->tr_key = key;
    d->tr_val = val;
    d->tr_cap = cap;
    return 0;
}

/* the set after `byte` from set `from` */
static int64_t dfa_step(dfa *d, uint32_t from, uint8_t byte)
{
    if ((d->tr_used + 1) * 2 > d->tr_cap && tr_rehash(d))
        return -1;
    uint64_t key = (uint64_t)from << 8 | byte;
    uint32_t k = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & (d->tr_cap - 1);
    while (d->tr_val[k]) {
        if (d->tr_key[k] == key)
            return d->tr_val[k] - 1;
        k = (k + 1) & (d->tr_cap - 1);
    }
    const dfa_set *x = &d->sets[from];
    d->in.tops = d->pool + x->off;
    d->in.n = d->in.cap = x->n;
    if (gr_advance(d->g, &d->s, &d->in, byte, &d->out))
        return -1;
    int64_t next = dfa_intern(d, &d->out);
    if (next < 0)
        return -1;
    d->tr_key[k] = key;
    d->tr_val[k] = (uint32_t)next + 1;
    d->tr_used++;
    return next;
}

/* classifies the vocabulary at position elem (a GE_CLASS element) */
static gr_pos_cache *compute_cache(const zse_grammar *g, uint32_t elem)
{
    const zse_grammar_vocab *v = g->vocab;
    dfa d = {.g = g};
    gr_store_init(&d.s);
    id_list acc = {0}, unc = {0};
    uint32_t max_depth = 1;
    for (uint32_t i = 0; i < v->n_trie; i++)
        if (v->trie[i].depth > max_depth)
            max_depth = v->trie[i].depth;
    /* per depth d: the set after d bytes, the first depth (< d) where a path left the
     * frame (0: none) and whether more than one did */
    uint32_t *sid = zse_calloc(max_depth + 1, sizeof *sid);
    uint16_t *first_esc = zse_calloc(max_depth + 2, sizeof *first_esc);
    bool *multi_esc = zse_calloc(max_depth + 2, sizeof *multi_esc);
    gr_pos_cache *c = NULL;
    if (!sid || !first_esc || !multi_esc)
        goto out;
    /* the start: one stack, (elem, BOTTOM) */
    if (gr_close(g, &d.s, elem, GR_BOTTOM, &d.out))
        goto out;
    int64_t start = dfa_intern(&d, &d.out);
    if (start < 0)
        goto out;
    sid[0] = (uint32_t)start;
    uint32_t i = 0;
    while (i < v->n_trie) {
        const gr_trie_node *nd = &v->trie[i];
        uint32_t dep = nd->depth;
        uint16_t fe = first_esc[dep]; /* a path left the frame after fe bytes (0: none) */
        bool me = multi_esc[dep];
        int64_t next = dfa_step(&d, sid[dep - 1], nd->byte);
        if (next < 0)
            goto out;
        sid[dep] = (uint32_t)next;
        const dfa_set cur = d.sets[next];
        /* escapes seen up to and including this depth, for the nodes below */
        uint16_t fe_next = fe;
        bool me_next = me;
        if (cur.escaped) {
            if (fe_next == 0)
                fe_next = (uint16_t)dep;
            else
                me_next = true;
        }
        if (dep + 1 <= max_depth) {
            first_esc[dep + 1] = fe_next;
            multi_esc[dep + 1] = me_next;
        }
        bool alive = cur.n > 0 || cur.accept;
        if (nd->token >= 0) {
            if (alive || cur.escaped) {
                if (add_tokens(v, i, &acc, 0, false))
                    goto out;
            } else if (fe) {
                if (add_tokens(v, i, &unc, me ? 0 : fe, true))
                    goto out;
            }
        }
        if (cur.n == 0 && fe_next == 0) {
            i = nd->end; /* every token below is rejected */
            continue;
        }
        if (cur.n == 0) {
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
    if (order_uncertain(v, c)) {
        gr_cache_free(c);
        c = NULL;
    }
    goto out;
fail_c:
    free(c);
    c = NULL;
out:
    dfa_free(&d);
    free(sid);
    free(first_esc);
    free(multi_esc);
    free(acc.ids);
    free(unc.ids);
    free(unc.from);
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

int zse_grammar_precompute(zse_grammar *g)
{
    for (uint32_t e = 0; e < g->n_elems; e++)
        if (g->elems[e].kind == GE_CLASS && !gr_cache_get(g, e))
            return -1;
    return 0;
}
